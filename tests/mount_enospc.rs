//! A full backing disk: writes through the mount fail with ENOSPC (not EIO),
//! what was fsync'ed before survives, and the volume mounts again and passes
//! fsck. Needs root (mounts a small tmpfs as the backing filesystem).

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use common::{Env, errno_of, output_text, pattern};

/// A tmpfs mounted for the test; always unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(path: PathBuf, size: &str) -> Tmpfs {
        fs::create_dir_all(&path).unwrap();
        let o = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "kmsfs-test-tmpfs",
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(o.status.success(), "mount tmpfs: {}", output_text(&o));
        Tmpfs(path)
    }

    fn resize(&self, size: &str) {
        let o = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(o.status.success(), "remount tmpfs: {}", output_text(&o));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_backing_disk_gives_enospc_and_stays_consistent() {
    require_fuse!();
    common::require_root("the full-disk test (mounts a tmpfs)");
    let mut env = Env::bare();
    let tmpfs = Tmpfs::new(env.root().join("small"), "24m");
    env.vol = tmpfs.0.join("vol");
    env.ok(&["init", env.vol_str(), "--segment-size", "1M"]);
    {
        let m = env.mount();
        let keep = pattern(1 << 20, 5);
        let mut f = File::create(m.p("keep")).unwrap();
        f.write_all(&keep).unwrap();
        f.sync_all().unwrap();
        drop(f);

        // Fill: 1 MiB writes, fsync every 2 MiB, until something fails.
        let e = fill(&m, "fill");
        assert_eq!(
            errno_of(&e),
            libc::ENOSPC,
            "expected ENOSPC, got {e}; log:\n{}",
            env.log_text()
        );
        // Reads still work on a full disk.
        assert!(fs::read(m.p("keep")).unwrap() == keep);
        // Deleting cannot free space until the cleaner runs; unmount now.
        let _ = m.unmount();
    }
    // The volume mounts again, what was fsync'ed is there, fsck is clean.
    env.assert_fsck_clean();
    {
        let m = env.mount();
        assert!(fs::read(m.p("keep")).unwrap() == pattern(1 << 20, 5));
        m.unmount();
    }
    // With room again, it is writable.
    tmpfs.resize("64m");
    let m = env.mount();
    fs::write(m.p("after"), b"room again").unwrap();
    File::open(m.p("after")).unwrap().sync_all().unwrap();
    assert_eq!(m.unmount(), Some(0));
    env.assert_fsck_clean();
}

/// Fills the mount (1 MiB writes, fsync every 2 MiB) until a write fails;
/// returns that error.
fn fill(m: &common::Mount, name: &str) -> std::io::Error {
    let chunk = pattern(1 << 20, 6);
    let mut f = File::create(m.p(name)).unwrap();
    for i in 1..=256 {
        let r = f
            .write_all(&chunk)
            .and_then(|()| if i % 2 == 0 { f.sync_all() } else { Ok(()) });
        if let Err(e) = r {
            return e;
        }
    }
    panic!("writing 256 MiB into a small disk must fail");
}

#[test]
fn deleting_on_a_full_volume_makes_room_within_seconds() {
    require_fuse!();
    common::require_root("the full-disk test (mounts a tmpfs)");
    let mut env = Env::bare();
    let tmpfs = Tmpfs::new(env.root().join("small"), "24m");
    env.vol = tmpfs.0.join("vol");
    env.ok(&["init", env.vol_str(), "--segment-size", "1M"]);
    let m = env.mount();
    let e = fill(&m, "fill");
    assert_eq!(errno_of(&e), libc::ENOSPC, "{e}");
    // Keep hitting the full disk: the log must not repeat itself per request.
    // (With the kernel's write-back cache a write lands in the page cache
    // and the refusal shows at fsync: an application must fsync to know, as
    // on any filesystem that allocates at write-back.)
    for _ in 0..20 {
        let r = File::create(m.p("more")).and_then(|mut f| {
            f.write_all(&pattern(2 << 20, 1))?;
            f.sync_all()
        });
        assert!(r.is_err(), "a write to a full volume succeeded");
    }
    fs::remove_file(m.p("fill")).unwrap();
    let _ = fs::remove_file(m.p("more"));
    // The cleaner runs as soon as space was freed on a full volume, not at
    // its 5-minute period: a write of 4 MiB works again well within a minute.
    let data = pattern(4 << 20, 9);
    common::wait_until(
        "room after deleting",
        std::time::Duration::from_secs(60),
        || {
            let r = fs::write(m.p("again"), &data);
            r.is_ok() && File::open(m.p("again")).and_then(|f| f.sync_all()).is_ok()
        },
    );
    assert!(fs::read(m.p("again")).unwrap() == data);
    let log = env.log_text();
    let full = log.matches("backing store is full").count();
    assert!(
        (1..=6).contains(&full),
        "{full} 'full' warnings for dozens of refused writes:\n{log}"
    );
    assert!(!log.contains("nothing was lost"), "{log}");
    assert_eq!(m.unmount(), Some(0));
    env.assert_fsck_clean();
}

#[test]
fn kmsfs_clean_reclaims_now_mounted_or_not() {
    require_fuse!();
    let env = Env::with_init(&["--segment-size", "1M"]);
    let stored = |env: &Env| env.info_json()["stored_bytes"].as_u64().unwrap();
    // Unmounted: write, delete, clean.
    let m = env.mount();
    fs::write(m.p("a"), pattern(8 << 20, 1)).unwrap();
    m.unmount();
    let full = stored(&env);
    let m = env.mount();
    fs::remove_file(m.p("a")).unwrap();
    m.unmount();
    let out = env.ok(&["clean", env.vol_str(), "--json"]);
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(r["bytes_freed"].as_u64().unwrap() >= 7 << 20, "{r}");
    let after = stored(&env);
    assert!(after + (7 << 20) <= full, "stored {full} -> {after}");
    // Mounted: through the mount's control socket.
    let m = env.mount();
    fs::write(m.p("b"), pattern(8 << 20, 2)).unwrap();
    File::open(m.p("b")).unwrap().sync_all().unwrap();
    fs::remove_file(m.p("b")).unwrap();
    let before = stored(&env);
    let out = env.ok(&["clean", env.vol_str()]);
    assert!(out.contains("freed"), "{out}");
    assert!(
        stored(&env) + (7 << 20) <= before,
        "mounted clean freed nothing"
    );
    m.unmount();
    env.assert_fsck_clean();
}
