//! Snapshots and clones through the command line, on real mounts: a snapshot
//! of a volume mounted read-write (taken by the running mount), a read-only
//! snapshot mount beside the live one, space coming back after delete,
//! restore, clone, and rollback detection.

mod common;

use std::fs;

use common::{Env, errno_of, output_text, pattern};

/// Bytes allocated to the files under `dir` (st_blocks), recursively.
fn allocated_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = e.metadata().unwrap();
        total += if md.is_dir() {
            allocated_bytes(&e.path())
        } else {
            md.blocks() * 512
        };
    }
    total
}

#[test]
fn snapshot_of_a_mounted_volume_and_a_snapshot_mount_beside_it() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    fs::write(m.p("doc"), b"version one").unwrap();
    let out = env.ok(&["snapshot", "create", env.vol_str(), "s1"]);
    assert!(out.contains("snapshot s1 created"), "{out}");
    fs::write(m.p("doc"), b"version two").unwrap();
    fs::write(m.p("later"), b"after the snapshot").unwrap();
    // A second create of the same name fails cleanly.
    let o = env.run(&["snapshot", "create", env.vol_str(), "s1"]);
    assert!(!o.status.success(), "{}", output_text(&o));

    let snap_mnt = env.root().join("snapmnt");
    let s = env.mount_other(&env.vol, &snap_mnt, &["--snapshot", "s1"]);
    assert_eq!(fs::read(s.p("doc")).unwrap(), b"version one");
    assert!(!s.p("later").exists());
    let e = fs::write(s.p("new"), b"x").unwrap_err();
    assert_eq!(errno_of(&e), libc::EROFS);
    // The live mount keeps serving its own tree.
    assert_eq!(fs::read(m.p("doc")).unwrap(), b"version two");
    assert_eq!(s.unmount(), Some(0));

    let list: serde_json::Value =
        serde_json::from_str(&env.ok(&["snapshot", "list", env.vol_str(), "--json"])).unwrap();
    assert_eq!(list[0]["name"], "s1");
    assert!(list[0]["generation"].as_u64().unwrap() > 0);
    let table = env.ok(&["snapshot", "list", env.vol_str()]);
    // `info` on a mounted volume shows the mount's cache counters.
    let info = env.info_json();
    assert!(
        info["mount_cache"]["cache_capacity"].as_u64().unwrap() > 0,
        "{info}"
    );
    assert!(info["mount_cache"]["cache_misses"].is_u64(), "{info}");
    assert!(
        table.contains("s1") && table.contains("EXCLUSIVE"),
        "{table}"
    );

    // Space: a snapshot holds overwritten data; deleting it gives it back.
    fs::write(m.p("big"), pattern(48 << 20, 1)).unwrap();
    env.ok(&["snapshot", "create", env.vol_str(), "s2"]);
    fs::write(m.p("big"), pattern(48 << 20, 2)).unwrap();
    let f = fs::File::open(m.p("big")).unwrap();
    f.sync_all().unwrap();
    drop(f);
    // The volume directory's own allocation, not the disk's free space: other
    // tests and processes write to the same disk meanwhile.
    let held = allocated_bytes(&env.vol);
    env.ok(&["snapshot", "delete", env.vol_str(), "s2"]);
    let left = allocated_bytes(&env.vol);
    assert!(
        left + (40 << 20) < held,
        "volume directory {held} -> {left} bytes after deleting s2"
    );
    assert_eq!(m.unmount(), Some(0));
    env.assert_fsck_clean();
}

#[test]
fn restore_and_clone() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    fs::write(m.p("a"), b"original").unwrap();
    fs::create_dir(m.p("dir")).unwrap();
    fs::write(m.p("dir/b"), pattern(3 << 20, 7)).unwrap();
    env.ok(&["snapshot", "create", env.vol_str(), "base"]);
    fs::write(m.p("a"), b"changed").unwrap();
    fs::remove_file(m.p("dir/b")).unwrap();
    // Restore needs an unmounted volume and an explicit --yes.
    let o = env.run(&["snapshot", "restore", env.vol_str(), "base", "--yes"]);
    assert_eq!(o.status.code(), Some(5), "{}", output_text(&o));
    assert_eq!(m.unmount(), Some(0));
    let o = env.run(&["snapshot", "restore", env.vol_str(), "base"]);
    assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));

    // Clone first (from the snapshot), then restore the origin.
    let clone_dir = env.root().join("clone");
    let out = env.ok(&["clone", env.vol_str(), "base", clone_dir.to_str().unwrap()]);
    assert!(out.contains("nothing re-encrypted"), "{out}");
    env.ok(&["snapshot", "restore", env.vol_str(), "base", "--yes"]);
    let m = env.mount();
    assert_eq!(fs::read(m.p("a")).unwrap(), b"original");
    assert_eq!(fs::read(m.p("dir/b")).unwrap(), pattern(3 << 20, 7));

    // The clone mounts beside the origin and lives its own life.
    let cm = env.mount_other(&clone_dir, &env.root().join("clonemnt"), &[]);
    assert_eq!(fs::read(cm.p("a")).unwrap(), b"original");
    fs::write(cm.p("only-in-clone"), b"c").unwrap();
    fs::write(m.p("only-in-origin"), b"o").unwrap();
    assert!(!m.p("only-in-clone").exists());
    assert!(!cm.p("only-in-origin").exists());
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["info", clone_dir.to_str().unwrap(), "--json"])).unwrap();
    let orig = env.info_json();
    assert_ne!(info["id"], orig["id"]);
    assert_eq!(info["cmk_id"], orig["cmk_id"]);
    assert_eq!(cm.unmount(), Some(0));
    assert_eq!(m.unmount(), Some(0));
    env.assert_fsck_clean();
    let o = env.run(&["fsck", clone_dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
}

#[test]
fn rollback_of_the_backing_store_is_detected() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    fs::write(m.p("a"), b"first").unwrap();
    assert_eq!(m.unmount(), Some(0));
    let old = env.root().join("old-copy");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(&env.vol)
        .arg(&old)
        .status()
        .unwrap();
    assert!(st.success());
    let m = env.mount();
    fs::write(m.p("a"), b"second").unwrap();
    assert_eq!(m.unmount(), Some(0));
    // Put the old copy back in place.
    fs::remove_dir_all(&env.vol).unwrap();
    fs::rename(&old, &env.vol).unwrap();
    let o = env.try_mount("", &[]);
    assert_eq!(o.status.code(), Some(3), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("rolled back"),
        "{}",
        output_text(&o)
    );
    let o = env.run(&["fsck", env.vol_str(), "--accept-rollback"]);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    let m = env.mount();
    assert_eq!(fs::read(m.p("a")).unwrap(), b"first");
    assert_eq!(m.unmount(), Some(0));
}
