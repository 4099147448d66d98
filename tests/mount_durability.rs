//! What was acknowledged survives: sync/syncfs followed by the idle commit,
//! `kmsfs umount` then an immediate copy of the backing directory, the
//! rollback mark raised by every commit, and a panic in one request (a bug,
//! injected with the `test-hooks` feature) that fails that request
//! alone and loses nothing.
//!
//! Nothing here waits on a clock to decide a result: each wait polls for an
//! event (a commit visible on disk, a daemon's exit) with a generous deadline.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::Duration;

use common::{Env, errno_of, output_text, pattern, wait_until};

fn generation(env: &Env) -> u64 {
    env.info_json()["generation"]
        .as_u64()
        .expect("generation in info --json")
}

/// Copies a directory tree (the backing store) with cp -a.
fn copy_dir(from: &Path, to: &Path) {
    common::sh(&format!("cp -a '{}' '{}'", from.display(), to.display()));
}

#[test]
fn syncfs_then_idle_commit_survives_kill9() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    let before = generation(&env);
    let data = pattern(3 << 20, 31);
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(m.p("synced"))
        .unwrap();
    (&f).write_all(&data).unwrap();
    fs::create_dir(m.p("dir-made")).unwrap();
    // syncfs, as `sync -f` does: the kernel writes the dirty pages to the
    // daemon and sends nothing else; the daemon commits once writes go idle.
    // SAFETY: syncfs on an open descriptor.
    assert_eq!(unsafe { libc::syncfs(f.as_raw_fd()) }, 0);
    drop(f);
    // No fsync anywhere: only the idle commit can make this durable. Once
    // the mount reports nothing pending, everything syncfs handed it is in a
    // commit (an event, not a delay).
    wait_until(
        "the idle commit after syncfs",
        Duration::from_secs(60),
        || {
            let info = env.info_json();
            info["mount_cache"]["pending_changes"] == serde_json::json!(false)
        },
    );
    assert!(generation(&env) > before, "no commit happened");
    m.kill9();
    let m = env.mount();
    assert!(fs::read(m.p("synced")).unwrap() == data, "synced data lost");
    assert!(m.p("dir-made").is_dir(), "directory lost");
    m.unmount();
    env.assert_fsck_clean();
}

/// Changes of every kind, none fsync'ed; checked by `check_changes`.
fn make_changes(m: &common::Mount) {
    fs::write(m.p("big"), pattern(5 << 20, 7)).unwrap();
    fs::create_dir_all(m.p("a/b/c")).unwrap();
    for i in 0..50u64 {
        let data = pattern(1000 + i as usize * 37, i);
        fs::write(m.p(&format!("a/b/c/f{i}")), data).unwrap();
    }
    fs::write(m.p("tmp"), b"replaced atomically").unwrap();
    fs::rename(m.p("tmp"), m.p("final")).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    fs::set_permissions(m.p("final"), mode).unwrap();
    fs::remove_file(m.p("a/b/c/f0")).unwrap();
}

fn check_changes(m: &common::Mount) {
    let big = fs::read(m.p("big")).unwrap();
    assert!(big == pattern(5 << 20, 7), "big differs");
    for i in 1..50u64 {
        let got = fs::read(m.p(&format!("a/b/c/f{i}"))).unwrap();
        assert!(got == pattern(1000 + i as usize * 37, i), "f{i} differs");
    }
    assert!(!m.p("a/b/c/f0").exists(), "the unlink is missing");
    assert!(!m.p("tmp").exists(), "the rename is missing");
    assert_eq!(fs::read(m.p("final")).unwrap(), b"replaced atomically");
    let mode = fs::metadata(m.p("final")).unwrap().permissions();
    let mode = std::os::unix::fs::PermissionsExt::mode(&mode);
    assert_eq!(mode & 0o777, 0o600, "the chmod is missing");
}

/// Mounts the copy of a volume (beside the original) and checks it.
fn check_copy(env: &Env, copy: &Path) {
    let mnt2 = env.root().join("mnt-copy");
    let m2 = env.mount_other(copy, &mnt2, &[]);
    check_changes(&m2);
    m2.unmount();
    let o = env.run(&["fsck", copy.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "fsck of the copy: {}",
        output_text(&o)
    );
}

#[test]
fn plain_umount_then_immediate_copy_is_complete() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    make_changes(&m);
    // util-linux umount, and the copy at once: the kernel does not wait for
    // the daemon, so the copy may run while it is still exiting.
    let pid = m.umount_plain();
    let copy = env.root().join("copy");
    copy_dir(&env.vol, &copy);
    common::wait_exit(pid, common::TIMEOUT);
    check_copy(&env, &copy);
}

/// Every socket under `dir`, and every name of the control socket or its
/// staging directory (`kmsfs.ctl`, `.kmsfs.ctl.*`).
fn runtime_state_in(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let md = fs::symlink_metadata(e.path()).unwrap();
        if md.file_type().is_socket() || name == "kmsfs.ctl" || name.starts_with(".kmsfs.ctl.") {
            found.push(e.path().display().to_string());
        } else if md.is_dir() {
            found.extend(runtime_state_in(&e.path()));
        }
    }
    found
}

/// While a volume is mounted its backing directory holds no runtime state:
/// the control socket lives in the mounting user's runtime directory, so
/// nothing in the backing directory changes after the data is complete (a
/// copy or rsync right after a plain umount meets no name vanishing).
#[test]
fn a_mounted_volume_directory_holds_no_socket() {
    require_fuse!();
    if kmsfs::control::runtime_base().is_none() {
        eprintln!("skipped: no runtime directory (not root, no XDG_RUNTIME_DIR)");
        return;
    }
    let env = Env::new();
    // A socket left in the volume directory by a killed mount of an older
    // version (kmsfs.ctl): the next mount removes it.
    drop(std::os::unix::net::UnixListener::bind(env.vol.join("kmsfs.ctl")).unwrap());
    let m = env.mount();
    make_changes(&m);
    let sock = kmsfs::control::socket_path(&env.vol);
    assert!(!sock.starts_with(&env.vol), "{}", sock.display());
    assert!(
        fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_socket()),
        "no control socket at {}",
        sock.display()
    );
    // The control socket answers (`kmsfs info` asks the mount for its cache).
    assert!(
        env.info_json()["mount_cache"].is_object(),
        "{}",
        env.info_json()
    );
    assert_eq!(runtime_state_in(&env.vol), Vec::<String>::new());
    let pid = m.umount_plain();
    assert_eq!(runtime_state_in(&env.vol), Vec::<String>::new());
    common::wait_exit(pid, common::TIMEOUT);
    assert!(
        fs::symlink_metadata(&sock).is_err(),
        "{} left after the unmount",
        sock.display()
    );
}

#[test]
fn kmsfs_umount_then_immediate_copy_is_complete() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    make_changes(&m);
    m.kmsfs_umount(&env);
    let copy = env.root().join("copy");
    copy_dir(&env.vol, &copy);
    check_copy(&env, &copy);
}

#[test]
fn every_fsync_raises_the_rollback_mark() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    fs::write(m.p("one"), b"first state").unwrap();
    File::open_sync(&m.p("one"));
    // A copy of the backing store as it stands after the first fsync.
    let old = env.root().join("old");
    copy_dir(&env.vol, &old);
    fs::write(m.p("two"), b"second state").unwrap();
    File::open_sync(&m.p("two"));
    // The daemon dies: no final commit, no mark raised at unmount. The mark
    // must already cover the second fsync.
    m.kill9();
    let cur = env.root().join("cur");
    fs::rename(&env.vol, &cur).unwrap();
    fs::rename(&old, &env.vol).unwrap();
    let o = env.try_mount("", &[]);
    if o.status.success() {
        // Unmount what should never have mounted, then fail.
        env.guard().unmount();
        panic!("the rolled-back volume was mounted: {}", output_text(&o));
    }
    let text = output_text(&o);
    assert!(
        text.contains("rolled back") && text.contains("--accept-rollback"),
        "unexpected message: {text}"
    );
    // The real state mounts, with both files.
    fs::rename(&env.vol, env.root().join("stale")).unwrap();
    fs::rename(&cur, &env.vol).unwrap();
    let m = env.mount();
    assert_eq!(fs::read(m.p("two")).unwrap(), b"second state");
    m.unmount();
}

/// fsync of a path, through a fresh descriptor.
struct File;
impl File {
    fn open_sync(p: &Path) {
        fs::File::open(p).unwrap().sync_all().unwrap();
    }
}

#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "needs --features test-hooks (scripts/test.sh sets it)"
)]
fn a_panic_fails_one_request_and_loses_nothing() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    let data = pattern(200_000, 5);
    fs::write(m.p("before"), &data).unwrap();
    let fault = "user.kmsfs-test-hooks";
    let getx = |p: &Path| {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let n = std::ffi::CString::new(fault).unwrap();
        let mut buf = [0u8; 64];
        // SAFETY: getxattr with valid C strings and a buffer of the given size.
        let r =
            unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        (r, std::io::Error::last_os_error())
    };
    let setx = |p: &Path| {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let n = std::ffi::CString::new(fault).unwrap();
        // SAFETY: setxattr with valid C strings and a 1-byte value.
        let r = unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), b"x".as_ptr().cast(), 1, 0) };
        (r, std::io::Error::last_os_error())
    };
    // A panic in a read-only request: EIO for it, the mount goes on read-write.
    let (r, e) = getx(&m.p("before"));
    assert_eq!((r, errno_of(&e)), (-1, libc::EIO), "getxattr: {e}");
    assert!(fs::read(m.p("before")).unwrap() == data);
    fs::write(m.p("still-writable"), b"yes").unwrap();
    // A panic in a changing request: EIO, then the mount turns read-only
    // after committing what it had acknowledged.
    let (r, e) = setx(&m.p("before"));
    assert_eq!((r, errno_of(&e)), (-1, libc::EIO), "setxattr: {e}");
    let e = fs::write(m.p("after"), b"no").unwrap_err();
    assert_eq!(errno_of(&e), libc::EROFS, "write after the panic: {e}");
    assert!(fs::read(m.p("before")).unwrap() == data, "reads go on");
    // The log says what happened and when the commit after it is done (it
    // is written after the reply went out: wait for it).
    wait_until(
        "the commit after the panic",
        Duration::from_secs(60),
        || fs::read_to_string(&env.log).is_ok_and(|l| l.contains("committed (generation")),
    );
    let log = fs::read_to_string(&env.log).unwrap();
    assert!(
        log.contains("internal error (panic) in setxattr") && log.contains("read-only"),
        "the log does not say what happened:\n{log}"
    );
    // Kill the daemon: what was written before the panic was committed then.
    m.kill9();
    let m = env.mount();
    assert!(fs::read(m.p("before")).unwrap() == data, "data lost");
    assert_eq!(fs::read(m.p("still-writable")).unwrap(), b"yes");
    assert!(!m.p("after").exists());
    m.unmount();
    env.assert_fsck_clean();
}

/// One root slot lost: the mount falls back to the commit before, says so in
/// its log, and the next commit makes both slots whole again.
#[test]
fn mount_falls_back_over_a_lost_root_slot_and_says_so() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    fs::write(m.p("early"), b"committed first").unwrap();
    File::open_sync(&m.p("early"));
    fs::write(m.p("late"), b"committed last").unwrap();
    File::open_sync(&m.p("late"));
    m.kmsfs_umount(&env);
    // The slot with the newest generation goes.
    let newest = kmsfs::volume::ROOT_SLOTS
        .iter()
        .filter_map(|n| {
            let b = fs::read(env.vol.join(n)).ok()?;
            let (_, g, _, _) = kmsfs::format::split_root(&b).ok()?;
            Some((g, *n))
        })
        .max()
        .expect("a root slot");
    fs::remove_file(env.vol.join(newest.1)).unwrap();
    let m = env.mount();
    assert_eq!(fs::read(m.p("early")).unwrap(), b"committed first");
    m.kmsfs_umount(&env);
    let log = env.log_text();
    assert!(
        log.contains(&format!(
            "the newest commit (generation {}) is damaged",
            newest.0
        )),
        "the log does not say what was skipped:\n{log}"
    );
    env.assert_fsck_clean();
    for n in kmsfs::volume::ROOT_SLOTS {
        assert!(env.vol.join(n).is_file(), "{n} was not rewritten");
    }
}
