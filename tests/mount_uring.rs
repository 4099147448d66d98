//! FUSE over io_uring (`-o uring=auto|on|off`, vendor/fuser/src/uring.rs): real file work
//! over the ring, checked byte for byte and again after a classic remount; unmount with
//! requests in flight; and, with the kernel's `enable_uring` off (or missing), that
//! `uring=on` fails with the next step and `auto` mounts over /dev/fuse.
//!
//! The tests switch `/sys/module/fuse/parameters/enable_uring` (root) through a guard
//! that puts the old value back, also when a test fails; one test at a time.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use common::{Env, TIMEOUT, is_mounted, output_text, pattern, require_root, wait_exit, wait_until};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// One test at a time: they share the module parameter.
static SERIAL: Mutex<()> = Mutex::new(());

/// Sets `enable_uring` and restores the value it found on drop (also on panic).
struct EnableUring {
    old: Option<String>,
    _serial: MutexGuard<'static, ()>,
}

impl EnableUring {
    /// None when the kernel has no FUSE over io_uring (no parameter).
    fn set(on: bool) -> Option<EnableUring> {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let old = fs::read_to_string(ENABLE_URING).ok()?;
        fs::write(ENABLE_URING, if on { "Y" } else { "N" }).unwrap();
        Some(EnableUring {
            old: Some(old.trim().to_string()),
            _serial: serial,
        })
    }
}

impl Drop for EnableUring {
    fn drop(&mut self) {
        if let Some(old) = self.old.take() {
            let _ = fs::write(ENABLE_URING, old);
        }
    }
}

/// The log of the last mount in `log` (the file is appended to by each mount).
fn last_mount_log(log: &str) -> &str {
    log.rfind(") mounting ").map_or(log, |i| &log[i..])
}

/// The counts the daemon logs at exit: (over the ring, over /dev/fuse).
fn ring_counts(log: &str) -> Option<(u64, u64)> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("FUSE over io_uring:") && l.contains("requests over the ring"))?;
    let rest = &line[line.find("FUSE over io_uring: ")? + "FUSE over io_uring: ".len()..];
    let mut words = rest.split_whitespace();
    let ring = words.next()?.parse().ok()?;
    let dev = rest
        .split(", ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((ring, dev))
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn xattr_set(p: &Path, name: &str, v: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid path, name and value buffer.
    let r = unsafe { libc::setxattr(cpath(p).as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    assert_eq!(r, 0, "setxattr {name}: {}", std::io::Error::last_os_error());
}

fn xattr_get(p: &Path, name: &str) -> Vec<u8> {
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: buf has room for buf.len() bytes.
    let r = unsafe {
        libc::getxattr(
            cpath(p).as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(
        r >= 0,
        "getxattr {name}: {}",
        std::io::Error::last_os_error()
    );
    buf.truncate(r as usize);
    buf
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Create, write, read back, rename, unlink, readdir, xattrs and fsync in `dir`, by
/// `threads` threads at once; returns the files left (name, content).
fn file_work(dir: &Path, threads: u64) -> Vec<(String, Vec<u8>)> {
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let dir = dir.to_path_buf();
            std::thread::spawn(move || {
                let sub = dir.join(format!("t{t}"));
                fs::create_dir(&sub).unwrap();
                let mut kept = Vec::new();
                for i in 0..40u64 {
                    let data = pattern(1 + (i as usize * 7919) % 200_000, t * 1000 + i);
                    let p = sub.join(format!("f{i}"));
                    let mut f = fs::File::create(&p).unwrap();
                    f.write_all(&data).unwrap();
                    f.sync_all().unwrap();
                    drop(f);
                    assert_eq!(fs::read(&p).unwrap(), data, "read back {}", p.display());
                    match i % 4 {
                        0 => fs::remove_file(&p).unwrap(),
                        1 => {
                            let q = sub.join(format!("r{i}"));
                            fs::rename(&p, &q).unwrap();
                            kept.push((format!("t{t}/r{i}"), data));
                        }
                        2 => {
                            xattr_set(&p, "user.kmsfs-test", &data[..data.len().min(300)]);
                            assert_eq!(
                                xattr_get(&p, "user.kmsfs-test"),
                                &data[..data.len().min(300)]
                            );
                            kept.push((format!("t{t}/f{i}"), data));
                        }
                        _ => kept.push((format!("t{t}/f{i}"), data)),
                    }
                }
                let mut want: Vec<String> = kept
                    .iter()
                    .map(|(n, _)| n.rsplit('/').next().unwrap().to_string())
                    .collect();
                want.sort();
                assert_eq!(names(&sub), want, "readdir of {}", sub.display());
                kept
            })
        })
        .collect();
    workers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

fn check_files(root: &Path, files: &[(String, Vec<u8>)], big: &[u8]) {
    for (name, data) in files {
        assert_eq!(&fs::read(root.join(name)).unwrap(), data, "{name}");
    }
    let got = fs::read(root.join("big")).unwrap();
    assert_eq!(got.len(), big.len());
    assert!(got == big, "the 16 MiB file differs");
}

#[test]
fn file_work_goes_over_the_ring_and_reads_back_after_a_classic_remount() {
    require_fuse!();
    require_root("switching /sys/module/fuse/parameters/enable_uring");
    let env = Env::new();
    let Some(guard) = EnableUring::set(true) else {
        // No FUSE over io_uring in this kernel: `on` must say so, `auto` mounts classic.
        let o = env.try_mount("uring=on", &[]);
        assert!(!o.status.success(), "{}", output_text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("echo Y > "),
            "{}",
            output_text(&o)
        );
        let m = env.mount_with("uring=auto", &[]);
        fs::write(m.p("x"), b"classic").unwrap();
        assert_eq!(m.unmount(), Some(0));
        assert!(last_mount_log(&env.log_text()).contains("FUSE transport: /dev/fuse"));
        return;
    };
    let m = env.mount_with("uring=on", &[]);
    let log = env.log_text();
    assert!(
        last_mount_log(&log).contains("FUSE transport: io_uring"),
        "log:\n{log}"
    );
    // A 16 MiB file, written in odd-sized pieces and read back at odd offsets.
    let big = pattern(16 << 20, 42);
    {
        let mut f = fs::File::create(m.p("big")).unwrap();
        for piece in big.chunks(1_000_003) {
            f.write_all(piece).unwrap();
        }
        f.sync_all().unwrap();
    }
    {
        let mut f = fs::File::open(m.p("big")).unwrap();
        let mut buf = vec![0u8; 333_333];
        for off in [0u64, 4095, 1 << 20, (16 << 20) - 333_333] {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.read_exact(&mut buf).unwrap();
            assert!(
                buf[..] == big[off as usize..off as usize + buf.len()],
                "at {off}"
            );
        }
    }
    let files = file_work(&m.path, 4);
    check_files(&m.path, &files, &big);
    assert_eq!(names(&m.path), vec!["big", "t0", "t1", "t2", "t3"]);
    assert_eq!(m.unmount(), Some(0), "log:\n{}", env.log_text());
    let log = env.log_text();
    let (ring, dev) = ring_counts(last_mount_log(&log)).unwrap_or_else(|| panic!("log:\n{log}"));
    assert!(
        last_mount_log(&log).contains("FUSE over io_uring: ") && log.contains(" queues x "),
        "log:\n{log}"
    );
    // Everything but FORGET and INTERRUPT comes over the ring.
    assert!(ring > 1000 && ring > dev, "ring {ring}, /dev/fuse {dev}");
    // `auto` (the default) takes the ring when the kernel offers it.
    let m = env.mount();
    check_files(&m.path, &files, &big);
    assert_eq!(m.unmount(), Some(0));
    let log = env.log_text();
    assert!(
        last_mount_log(&log).contains("FUSE transport: io_uring"),
        "log:\n{log}"
    );
    drop(guard);

    // The same volume over /dev/fuse.
    let m = env.mount_with("uring=off", &[]);
    let log = env.log_text();
    assert!(
        last_mount_log(&log).contains("FUSE transport: /dev/fuse"),
        "log:\n{log}"
    );
    check_files(&m.path, &files, &big);
    assert_eq!(m.unmount(), Some(0));
    assert!(ring_counts(last_mount_log(&env.log_text())).is_none());
    env.assert_fsck_clean();
}

#[test]
fn without_enable_uring_on_fails_with_the_next_step_and_auto_mounts_classic() {
    require_fuse!();
    require_root("switching /sys/module/fuse/parameters/enable_uring");
    let env = Env::new();
    // Missing parameter (kernel without it) or N: the same behaviour.
    let _guard = EnableUring::set(false);
    let o = env.try_mount("uring=on", &[]);
    assert!(!o.status.success(), "{}", output_text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("echo Y > /sys/module/fuse/parameters/enable_uring"),
        "{}",
        output_text(&o)
    );
    assert!(!is_mounted(&env.mnt));
    let m = env.mount_with("uring=auto", &[]);
    fs::write(m.p("x"), b"over /dev/fuse").unwrap();
    assert_eq!(fs::read(m.p("x")).unwrap(), b"over /dev/fuse");
    assert_eq!(m.unmount(), Some(0));
    let log = env.log_text();
    assert!(
        last_mount_log(&log).contains("FUSE transport: /dev/fuse"),
        "log:\n{log}"
    );
    assert!(ring_counts(last_mount_log(&log)).is_none(), "log:\n{log}");
}

/// A lazy unmount while threads keep sending requests: the connection ends under them,
/// the ring threads see it, and the daemon exits (final commit done) instead of hanging.
#[test]
fn unmount_with_requests_in_flight_ends_the_daemon() {
    require_fuse!();
    require_root("switching /sys/module/fuse/parameters/enable_uring");
    let env = Env::new();
    let Some(_guard) = EnableUring::set(true) else {
        eprintln!("this kernel has no FUSE over io_uring: covered by the classic tests");
        let o = env.try_mount("uring=on", &[]);
        assert!(!o.status.success(), "{}", output_text(&o));
        return;
    };
    let m = env.mount_with("uring=on", &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    // Each worker holds an open directory and works relative to it, so its requests
    // keep reaching the daemon after the mount is detached from the tree.
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let dir = m.p(&format!("w{t}"));
            fs::create_dir(&dir).unwrap();
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                let d = fs::File::open(&dir).unwrap();
                let data = pattern(100_000, t);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let name = CString::new(format!("f{}", i % 16)).unwrap();
                    let Ok(fd) = nix::fcntl::openat(
                        &d,
                        name.as_c_str(),
                        OFlag::O_CREAT | OFlag::O_RDWR | OFlag::O_TRUNC | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o644),
                    ) else {
                        break; // the connection is gone
                    };
                    let mut f = fs::File::from(fd);
                    if f.write_all(&data).is_err() || f.sync_all().is_err() {
                        break;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    wait_until("the workers to get going", TIMEOUT, || {
        done.load(Ordering::Relaxed) >= 40
    });
    let pid = m.pid;
    let path = m.path.clone();
    // Detach while the workers run; their directories keep the connection alive until
    // they stop, so requests are in flight around the end.
    assert!(common::fusermount_u(&path, true), "fusermount3 -uz");
    let before = done.load(Ordering::Relaxed);
    wait_until("requests after the detach", TIMEOUT, || {
        done.load(Ordering::Relaxed) >= before + 20
    });
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let code = wait_exit(pid, TIMEOUT);
    assert_eq!(code, Some(0), "daemon exit; log:\n{}", env.log_text());
    std::mem::forget(m); // unmounted and reaped above
    let log = env.log_text();
    let (ring, _) = ring_counts(last_mount_log(&log)).unwrap_or_else(|| panic!("log:\n{log}"));
    assert!(ring > 40, "ring {ring}");
    assert!(log.contains("final commit done"), "log:\n{log}");
    env.assert_fsck_clean();
}
