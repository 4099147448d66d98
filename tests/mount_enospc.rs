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
        let chunk = pattern(1 << 20, 6);
        let mut f = File::create(m.p("fill")).unwrap();
        let mut err = None;
        for i in 1..=64 {
            let r = f
                .write_all(&chunk)
                .and_then(|()| if i % 2 == 0 { f.sync_all() } else { Ok(()) });
            if let Err(e) = r {
                err = Some(e);
                break;
            }
        }
        let e = err.expect("writing 64 MiB into a 24 MiB disk must fail");
        assert_eq!(
            errno_of(&e),
            libc::ENOSPC,
            "expected ENOSPC, got {e}; log:\n{}",
            env.log_text()
        );
        drop(f);
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
