//! Real mounts: persistence across unmount and mount, `info` and `fsck` exit
//! codes, the volume lock, read-only and snapshot-free read-only mounts,
//! signals, foreground mode, and the mount(8) / mount.fuse3 entry points.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Env, TIMEOUT, errno_of, is_mounted, output_text, pattern, require_root, wait_until};

#[test]
fn data_persists_across_remount_and_info_fsck_report_it() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    let big = pattern(3 << 20, 1);
    fs::write(m.p("big"), &big).unwrap();
    fs::create_dir_all(m.p("d/e")).unwrap();
    fs::write(m.p("d/e/small"), b"hello kmsfs\n").unwrap();
    fs::write(m.p("empty"), b"").unwrap();
    let inos: Vec<u64> = ["big", "d", "d/e", "d/e/small", "empty"]
        .iter()
        .map(|p| fs::metadata(m.p(p)).unwrap().ino())
        .collect();
    assert_eq!(
        m.unmount(),
        Some(0),
        "daemon exit status; log:\n{}",
        env.log_text()
    );
    assert!(!is_mounted(&env.mnt));

    let info = env.info_json();
    assert_eq!(info["files"], 3);
    assert_eq!(info["directories"], 3);
    assert_eq!(info["logical_bytes"], (3 << 20) + 12);
    assert_eq!(info["cipher"], "aes-256-gcm-siv");
    assert_eq!(info["block_size"], 65536);
    assert_eq!(info["format_version"], kmsfs::format::VOLUME_VERSION);
    assert!(info["stored_bytes"].as_u64().unwrap() >= 3 << 20);
    assert!(info["generation"].as_u64().unwrap() >= 2);
    assert_eq!(info["snapshots"], 0);
    assert!(info["cmk_id"].as_str().unwrap().starts_with("cmk-"));
    let text = env.ok(&["info", env.vol_str()]);
    assert!(
        text.contains("logical bytes:") && text.contains("aes-256-gcm-siv"),
        "{text}"
    );
    env.assert_fsck_clean();
    let j: serde_json::Value =
        serde_json::from_str(&env.ok(&["fsck", env.vol_str(), "--json"])).unwrap();
    assert_eq!(j["clean"], true);

    let m = env.mount();
    assert_eq!(fs::read(m.p("big")).unwrap(), big);
    assert_eq!(fs::read(m.p("d/e/small")).unwrap(), b"hello kmsfs\n");
    assert_eq!(fs::read(m.p("empty")).unwrap(), b"");
    let again: Vec<u64> = ["big", "d", "d/e", "d/e/small", "empty"]
        .iter()
        .map(|p| fs::metadata(m.p(p)).unwrap().ino())
        .collect();
    assert_eq!(inos, again, "inode numbers must be stable across remounts");
    // info works while mounted (no lock taken).
    assert_eq!(env.info_json()["files"], 3);
    assert_eq!(m.unmount(), Some(0));
}

#[test]
fn second_read_write_mount_is_refused_but_read_only_works() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    fs::write(m.p("f"), b"data").unwrap();
    let f = fs::File::open(m.p("f")).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let other = env.root().join("mnt2");
    fs::create_dir(&other).unwrap();
    let log2 = env.root().join("log2");
    let o = env.run(&[
        "mount",
        env.vol_str(),
        other.to_str().unwrap(),
        "-o",
        &format!("log={}", log2.display()),
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", output_text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("kmsfs: ") && err.contains("already mounted read-write"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(!is_mounted(&other));

    // A read-only mount alongside the live one.
    let o = env.run(&[
        "mount",
        env.vol_str(),
        other.to_str().unwrap(),
        "-o",
        &format!("ro,log={}", log2.display()),
    ]);
    assert!(o.status.success(), "{}", output_text(&o));
    let ro_pid = common::daemon_pid(&other);
    assert_eq!(fs::read(other.join("f")).unwrap(), b"data");
    let e = fs::write(other.join("g"), b"x").unwrap_err();
    assert_eq!(errno_of(&e), libc::EROFS);
    assert!(common::fusermount_u(&other, false));
    assert_eq!(common::wait_exit(ro_pid, TIMEOUT), Some(0));
    assert_eq!(m.unmount(), Some(0));
}

#[test]
fn read_only_flag_refuses_writes() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    fs::write(m.p("f"), b"x").unwrap();
    m.unmount();
    let m = env.mount_with("", &["--read-only"]);
    assert_eq!(fs::read(m.p("f")).unwrap(), b"x");
    assert_eq!(
        errno_of(&fs::write(m.p("f"), b"y").unwrap_err()),
        libc::EROFS
    );
    assert_eq!(
        errno_of(&fs::create_dir(m.p("d")).unwrap_err()),
        libc::EROFS
    );
    assert_eq!(m.unmount(), Some(0));
}

#[test]
fn sigterm_commits_and_unmounts_cleanly() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    // No fsync: the final commit on the way out must save this.
    fs::write(m.p("unsynced"), pattern(200_000, 7)).unwrap();
    assert_eq!(m.signal(libc::SIGTERM), Some(0), "log:\n{}", env.log_text());
    env.assert_fsck_clean();
    let m = env.mount();
    assert_eq!(fs::read(m.p("unsynced")).unwrap(), pattern(200_000, 7));
    assert_eq!(m.signal(libc::SIGINT), Some(0));
}

#[test]
fn foreground_mount_serves_until_unmounted() {
    require_fuse!();
    let env = Env::new();
    let child = env
        .cmd()
        .args(["mount", "-f", env.vol_str(), env.mnt_str()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the foreground mount", TIMEOUT, || is_mounted(&env.mnt));
    fs::write(env.mnt.join("f"), b"fg").unwrap();
    assert!(common::fusermount_u(&env.mnt, false));
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("final commit done"), "{log}");
    let m = env.mount();
    assert_eq!(fs::read(m.p("f")).unwrap(), b"fg");
    m.unmount();
}

#[test]
fn mount_helper_and_mount_fuse3_forms() {
    require_fuse!();
    let env = Env::new();
    let bin = env.root().join("bin");
    fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(common::BIN, bin.join("mount.kmsfs")).unwrap();
    std::os::unix::fs::symlink(common::BIN, bin.join("kmsfs")).unwrap();
    let opts = format!(
        "keystore={},passphrase_file={},log={},_netdev,nofail,x-systemd.automount,noatime,rw",
        env.keystore.display(),
        env.pass.display(),
        env.log.display()
    );
    let clean = |c: &mut Command| {
        c.env_remove("KMSFS_KEYSTORE")
            .env_remove("KMSFS_PASSPHRASE_FILE")
            .env("KMSFS_KDF_TEST_PARAMS", "1")
            .stdin(Stdio::null());
    };

    // mount(8) style: mount.kmsfs SPEC DIR -o OPTS (and -f = fake: no mount).
    let mut c = Command::new(bin.join("mount.kmsfs"));
    clean(&mut c);
    let o = c
        .args([env.vol_str(), env.mnt_str(), "-f", "-o", &opts])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(!is_mounted(&env.mnt));
    let mut c = Command::new(bin.join("mount.kmsfs"));
    clean(&mut c);
    let o = c
        .args([env.vol_str(), env.mnt_str(), "-n", "-o", &opts])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    let m = env.guard();
    fs::write(m.p("via-helper"), b"1").unwrap();
    m.unmount();

    // The form mount.fuse3 runs: kmsfs VOLUME MOUNTPOINT -o OPTS.
    let mut c = Command::new(bin.join("kmsfs"));
    clean(&mut c);
    let o = c
        .args([env.vol_str(), env.mnt_str(), "-o", &opts])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    let m = env.guard();
    assert_eq!(fs::read(m.p("via-helper")).unwrap(), b"1");
    m.unmount();

    // And through mount.fuse3 itself (an fstab `fuse.kmsfs` entry).
    if common::is_root() && std::path::Path::new("/sbin/mount.fuse3").exists() {
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut c = Command::new("/sbin/mount.fuse3");
        clean(&mut c);
        let o = c
            .env("PATH", path)
            .args([env.vol_str(), env.mnt_str(), "-t", "kmsfs", "-o", &opts])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", output_text(&o));
        let m = env.guard();
        assert_eq!(fs::read(m.p("via-helper")).unwrap(), b"1");
        m.unmount();
    }
}

#[test]
fn mount_errors_are_one_line_with_exit_codes() {
    require_fuse!();
    let env = Env::new();
    let o = env.try_mount("bogus_option", &[]);
    assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("bogus_option"));

    let o = env.run(&[
        "mount",
        env.root().join("nope").to_str().unwrap(),
        env.mnt_str(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));

    let not_vol = env.root().join("plain");
    fs::create_dir(&not_vol).unwrap();
    let o = env.run(&["mount", not_vol.to_str().unwrap(), env.mnt_str()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("kmsfs init"),
        "{}",
        output_text(&o)
    );

    let wrong = env.root().join("wrong");
    fs::File::create(&wrong)
        .unwrap()
        .write_all(b"not it\n")
        .unwrap();
    fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let o = env
        .cmd()
        .env("KMSFS_PASSPHRASE_FILE", &wrong)
        .args([
            "mount",
            env.vol_str(),
            env.mnt_str(),
            "-o",
            &format!("log={}", env.log.display()),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", output_text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("wrong passphrase"));
    assert!(!is_mounted(&env.mnt));
}

#[test]
fn snapshot_mounts_read_only_alongside_the_live_mount() {
    require_fuse!();
    use kmsfs::crypto::{KdfParams, Passphrase};
    use kmsfs::kms::{LocalKeystore, Unlock};
    use kmsfs::store::FsStorage;
    use kmsfs::volume::{OpenOptions, Volume};

    let env = Env::new();
    let m = env.mount();
    fs::write(m.p("f"), b"version 1").unwrap();
    m.unmount();
    // No `kmsfs snapshot` command yet: take the snapshot through the library.
    {
        let unlock = Unlock::Passphrase(Passphrase::new(common::PASSPHRASE.into()));
        let kms = LocalKeystore::open_or_create_with_params(
            &env.keystore,
            unlock,
            KdfParams::for_tests(),
        )
        .unwrap();
        let storage = std::sync::Arc::new(FsStorage::new(&env.vol));
        let vol = Volume::open(storage, &kms, OpenOptions::default()).unwrap();
        vol.snapshot_create("s1").unwrap();
        vol.close().unwrap();
    }
    let m = env.mount();
    fs::write(m.p("f"), b"version 2").unwrap();
    let snap = env.root().join("snap");
    fs::create_dir(&snap).unwrap();
    let log2 = format!("log={}", env.root().join("snap.log").display());
    let o = env.run(&[
        "mount",
        env.vol_str(),
        snap.to_str().unwrap(),
        "--snapshot",
        "s1",
        "-o",
        &log2,
    ]);
    assert!(o.status.success(), "{}", output_text(&o));
    let pid = common::daemon_pid(&snap);
    assert_eq!(fs::read(snap.join("f")).unwrap(), b"version 1");
    assert_eq!(fs::read(m.p("f")).unwrap(), b"version 2");
    assert_eq!(
        errno_of(&fs::write(snap.join("g"), b"x").unwrap_err()),
        libc::EROFS
    );
    assert!(common::fusermount_u(&snap, false));
    assert_eq!(common::wait_exit(pid, TIMEOUT), Some(0));
    // The -o form, and an unknown snapshot name.
    let o = env.run(&[
        "mount",
        env.vol_str(),
        snap.to_str().unwrap(),
        "-o",
        &format!("snapshot=nope,{log2}"),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope"));
    assert_eq!(env.info_json()["snapshots"], 1);
    m.unmount();
}

#[test]
fn mount_right_after_umount_waits_for_the_final_commit() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    // Unsynced data: the old daemon's final commit has work to do.
    fs::write(m.p("late"), pattern(6 << 20, 3)).unwrap();
    let old = m.unmount_no_wait();
    let m = env.mount();
    assert_eq!(common::wait_exit(old, TIMEOUT), Some(0));
    assert!(fs::read(m.p("late")).unwrap() == pattern(6 << 20, 3));
    assert_eq!(m.unmount(), Some(0));
}

/// The mount raises the kernel's readahead window for itself (FUSE caps it at
/// the kernel default at INIT), so cold sequential reads arrive as 1 MiB
/// requests, four at once; `readahead=0` leaves the kernel's window; root only (sysfs).
#[test]
fn the_mount_raises_its_readahead_window() {
    require_fuse!();
    require_root("writing the bdi's read_ahead_kb");
    let ra_of = |mnt: &Path| -> u32 {
        let dev = fs::metadata(mnt).unwrap().dev();
        let p = format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            libc::major(dev),
            libc::minor(dev)
        );
        fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .trim()
            .parse()
            .unwrap()
    };
    let env = Env::new();
    let m = env.mount();
    // The daemon sets it from a thread once INIT is answered: wait for it.
    wait_until(
        "readahead raised to 4096 KiB",
        Duration::from_secs(30),
        || ra_of(&env.mnt) == 4096,
    );
    m.kmsfs_umount(&env);
    let m = env.mount_with("readahead=0", &[]);
    // Give a raise that should not happen every chance to show.
    fs::write(m.p("f"), b"x").unwrap();
    let _ = fs::read(m.p("f")).unwrap();
    assert_ne!(
        ra_of(&env.mnt),
        4096,
        "readahead=0 must keep the kernel's window"
    );
    m.kmsfs_umount(&env);
    let log = env.log_text();
    assert!(log.contains("readahead window"), "log: {log}");
}

/// `clone_fd`: every request thread reads its own clone of /dev/fuse; the
/// mount works as usual under concurrent writers and readers. Without it the
/// daemon holds one /dev/fuse descriptor.
#[test]
fn clone_fd_gives_each_request_thread_its_own_fuse_descriptor() {
    require_fuse!();
    let fuse_fds = |pid: i32| -> usize {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
            .filter(|t| t == Path::new("/dev/fuse"))
            .count()
    };
    let env = Env::new();
    let m = env.mount();
    assert_eq!(fuse_fds(m.pid), 1, "one shared descriptor by default");
    m.kmsfs_umount(&env);
    let m = env.mount_with("clone_fd", &[]);
    // Each request thread clones its descriptor when it starts, which may be
    // after the mount is visible: wait for them (a missing clone never comes).
    wait_until(
        "clone_fd: one descriptor per request thread",
        Duration::from_secs(30),
        || fuse_fds(m.pid) >= 4,
    );
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let p = m.p(&format!("f{t}"));
            std::thread::spawn(move || {
                let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 7 + t) as u8).collect();
                fs::write(&p, &data).unwrap();
                data
            })
        })
        .collect();
    let want: Vec<Vec<u8>> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let p = m.p(&format!("f{t}"));
            std::thread::spawn(move || fs::read(&p).unwrap())
        })
        .collect();
    for (t, h) in readers.into_iter().enumerate() {
        assert!(h.join().unwrap() == want[t], "f{t} read back differs");
    }
    m.kmsfs_umount(&env);
    env.assert_fsck_clean();
}

/// Small overwrites leave fragments; once the mount is quiet, the daemon folds
/// them into whole blocks (the log says so), and the data is what was written.
#[test]
fn a_quiet_mount_merges_fragmented_blocks() {
    require_fuse!();
    use std::os::unix::fs::FileExt;
    let env = Env::new();
    let m = env.mount();
    let mut model = pattern(8 * 65536, 7);
    fs::write(m.p("f"), &model).unwrap();
    let f = fs::OpenOptions::new().write(true).open(m.p("f")).unwrap();
    f.sync_all().unwrap();
    for b in 0..8usize {
        let off = b * 65536 + 4096;
        let bytes = pattern(4096, 100 + b as u64);
        f.write_all_at(&bytes, off as u64).unwrap();
        model[off..off + 4096].copy_from_slice(&bytes);
    }
    f.sync_all().unwrap();
    drop(f);
    wait_until("the idle merge", Duration::from_secs(60), || {
        env.log_text().contains("idle merge: 8 fragmented blocks")
    });
    assert!(
        fs::read(m.p("f")).unwrap() == model,
        "content after the merge"
    );
    m.kmsfs_umount(&env);
    env.assert_fsck_clean();
    let m = env.mount();
    assert!(
        fs::read(m.p("f")).unwrap() == model,
        "content after remount"
    );
    m.kmsfs_umount(&env);
}
