//! A long-lived snapshot mount no longer stops reclamation: it pins its own
//! snapshot, whose data stays readable, while the space of a snapshot deleted
//! meanwhile comes back at once.

mod common;

use std::fs;

use common::{Env, pattern};

fn statfs_free(p: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_bavail as u64 * s.f_frsize as u64
}

fn sync_file(p: &std::path::Path) {
    fs::File::open(p).unwrap().sync_all().unwrap();
}

#[test]
fn a_snapshot_mount_keeps_its_snapshot_and_the_rest_is_reclaimed() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    fs::write(m.p("kept"), pattern(8 << 20, 1)).unwrap();
    env.ok(&["snapshot", "create", env.vol_str(), "s1"]);
    fs::write(m.p("kept"), pattern(8 << 20, 2)).unwrap();
    sync_file(&m.p("kept"));
    // A read-only mount of s1 for the rest of the test.
    let snap_mnt = env.root().join("snapmnt");
    let s = env.mount_other(&env.vol, &snap_mnt, &["--snapshot", "s1"]);
    assert!(fs::read(s.p("kept")).unwrap() == pattern(8 << 20, 1));
    // Data only a second snapshot holds: deleting it frees it at once,
    // snapshot mount or not (all but the segment s1's own tree nodes share
    // with it: what a pin keeps is whole segments).
    fs::write(m.p("big"), pattern(96 << 20, 3)).unwrap();
    env.ok(&["snapshot", "create", env.vol_str(), "s2"]);
    fs::write(m.p("big"), pattern(96 << 20, 4)).unwrap();
    sync_file(&m.p("big"));
    let held = statfs_free(&env.mnt);
    env.ok(&["snapshot", "delete", env.vol_str(), "s2"]);
    let freed = statfs_free(&env.mnt);
    assert!(
        freed > held + (56 << 20),
        "free space {held} -> {freed} after deleting s2 with s1 mounted"
    );
    // What the snapshot mount holds is all there, and so is the live tree.
    assert!(fs::read(s.p("kept")).unwrap() == pattern(8 << 20, 1));
    assert!(!s.p("big").exists());
    assert!(fs::read(m.p("big")).unwrap() == pattern(96 << 20, 4));
    // Cleaning again (through the mount) keeps it so.
    env.ok(&["clean", env.vol_str()]);
    assert!(fs::read(s.p("kept")).unwrap() == pattern(8 << 20, 1));
    assert_eq!(s.unmount(), Some(0));
    assert_eq!(m.unmount(), Some(0));
    env.assert_fsck_clean();
}
