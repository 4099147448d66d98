//! Snapshots and clones at the engine level: exact contents while the live
//! tree changes, space accounting, the cleaner never freeing shared blocks,
//! crashes during snapshot operations, tampering, clones.

mod engine_common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::sync::Arc;

use engine_common::*;
use kmsfs::store::{FsStorage, MemStorage, Storage};
use kmsfs::volume::{OpenOptions, ROOT_INO, RenameFlags, Volume};

fn open_snapshot(env: &Env, s: Arc<dyn Storage>, name: &str) -> Volume {
    Volume::open(
        s,
        &env.kms,
        OpenOptions {
            snapshot: Some(name.into()),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("snapshot {name}: {e}"))
}

/// One random change to the live tree (names from a small set, so changes
/// collide with earlier ones).
fn random_change(v: &Volume, x: u64) {
    let name = format!("f{}", x % 13);
    let dir = if x.is_multiple_of(3) {
        match v.lookup(ROOT_INO, b"sub") {
            Ok(a) => a.ino,
            Err(_) => v.mkdir(ROOT_INO, b"sub", 0o755, 0, 0).unwrap().ino,
        }
    } else {
        ROOT_INO
    };
    match (x >> 8) % 6 {
        0..=2 => {
            let ino = match v.lookup(dir, name.as_bytes()) {
                Ok(a) => a.ino,
                Err(_) => v.create(dir, name.as_bytes(), 0o644, 0, 0).unwrap().ino,
            };
            if v.getattr(ino).unwrap().inode.kind == kmsfs::format::FileKind::File {
                v.write(
                    ino,
                    (x >> 16) % 100_000,
                    &pattern(x, ((x >> 24) % 30_000) as usize),
                )
                .unwrap();
            }
        }
        3 => {
            let _ = v.unlink(dir, name.as_bytes());
        }
        4 => {
            let _ = v.rename(
                dir,
                name.as_bytes(),
                ROOT_INO,
                format!("r{}", x % 5).as_bytes(),
                RenameFlags::default(),
            );
        }
        _ => {
            if let Ok(a) = v.lookup(dir, name.as_bytes()) {
                let _ = v.setxattr(a.ino, b"user.v", &pattern(x, (x % 4000) as usize), 0);
            }
        }
    }
}

#[test]
fn snapshots_keep_their_moment_and_the_cleaner_keeps_their_blocks() {
    let env = env();
    let mut storage = MemStorage::new();
    let mut v = init(
        &env,
        Arc::new(storage.clone()) as Arc<dyn Storage>,
        &small_opts(),
    );
    let mut snaps: BTreeMap<String, Dump> = BTreeMap::new();
    let mut committed_snaps = snaps.clone();
    let mut x: u64 = 0xfeed;
    for step in 0..1500u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        match x % 40 {
            0 => {
                let name = format!("s{step}");
                v.snapshot_create(&name).unwrap();
                snaps.insert(name, dump(&v).unwrap());
                committed_snaps = snaps.clone();
            }
            1 if snaps.len() > 2 => {
                let name = snaps
                    .keys()
                    .nth((x >> 8) as usize % snaps.len())
                    .unwrap()
                    .clone();
                v.snapshot_delete(&name).unwrap();
                snaps.remove(&name);
                committed_snaps = snaps.clone();
            }
            2 => {
                v.clean(0.9).unwrap();
                committed_snaps = snaps.clone();
            }
            3 => {
                // Power loss: snapshots committed so far survive.
                drop(v);
                storage = storage.reboot();
                snaps = committed_snaps.clone();
                v = open(&env, Arc::new(storage.clone()));
            }
            _ => random_change(&v, x),
        }
    }
    v.commit().unwrap();
    v.clean(0.99).unwrap();
    assert!(snaps.len() >= 3, "{}", snaps.len());
    let r = v.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
    let listed: Vec<String> = v
        .snapshot_list()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(listed, snaps.keys().cloned().collect::<Vec<_>>());
    drop(v);
    for (name, expect) in &snaps {
        let sv = open_snapshot(&env, Arc::new(storage.clone()), name);
        assert_eq!(&dump(&sv).unwrap(), expect, "snapshot {name} changed");
        let e = sv.create(ROOT_INO, b"x", 0o644, 0, 0).unwrap_err();
        assert_eq!(e.errno(), libc::EROFS);
    }
}

#[test]
fn snapshot_space_accounting_and_reclaim() {
    const MIB: usize = 1 << 20;
    let env = env();
    let storage = MemStorage::new();
    let v = init(
        &env,
        Arc::new(storage.clone()) as Arc<dyn Storage>,
        &small_opts(),
    );
    let f = v.create(ROOT_INO, b"data", 0o644, 0, 0).unwrap();
    v.write(f.ino, 0, &pattern(1, 40 * MIB)).unwrap();
    v.commit().unwrap();
    let base = v.stored_bytes().unwrap() as f64;
    let t = std::time::Instant::now();
    v.snapshot_create("before").unwrap();
    let snap_time = t.elapsed();
    let after_snap = v.stored_bytes().unwrap() as f64;
    assert!(
        after_snap < base * 1.01,
        "a snapshot copied data: {base} -> {after_snap}"
    );
    // Overwrite 10%.
    v.write(f.ino, 0, &pattern(2, 4 * MIB)).unwrap();
    v.commit().unwrap();
    v.clean(0.5).unwrap();
    let grown = v.stored_bytes().unwrap() as f64;
    assert!(
        grown > base * 1.08 && grown < base * 1.15,
        "{grown} vs {base}"
    );
    let info = v.snapshot_list().unwrap();
    let excl = info[0].exclusive_bytes as f64;
    assert!(
        excl > 3.9 * MIB as f64 && excl < 4.5 * MIB as f64,
        "{info:?}"
    );
    assert!(info[0].shared_bytes as f64 > 35.0 * MIB as f64, "{info:?}");
    v.snapshot_delete("before").unwrap();
    let back = v.stored_bytes().unwrap() as f64;
    assert!(back < base * 1.03, "{back} vs {base}");
    eprintln!(
        "snapshot of 40 MiB in {snap_time:?}; store {:.1} MiB -> {:.1} MiB after 10% overwrite -> {:.1} MiB after delete",
        base / MIB as f64,
        grown / MIB as f64,
        back / MIB as f64
    );
}

#[test]
fn crash_during_snapshot_operations() {
    let env = env();
    let work = |v: &Volume| -> kmsfs::error::Result<()> {
        let f = v.create(ROOT_INO, b"a", 0o644, 0, 0)?;
        v.write(f.ino, 0, &pattern(1, 300_000))?;
        v.snapshot_create("one")?;
        v.write(f.ino, 0, &pattern(2, 600_000))?;
        v.snapshot_create("two")?;
        v.unlink(ROOT_INO, b"a")?;
        v.snapshot_delete("one")?;
        v.snapshot_restore("two")?;
        v.clean(0.99)?;
        Ok(())
    };
    let reference = MemStorage::new();
    let rv = init(
        &env,
        Arc::new(reference.clone()) as Arc<dyn Storage>,
        &small_opts(),
    );
    let start = reference.op_count();
    work(&rv).unwrap();
    let total = reference.op_count() - start;
    drop(rv);
    for n in 0..total {
        let s = MemStorage::new();
        let v = init(&env, Arc::new(s.clone()) as Arc<dyn Storage>, &small_opts());
        s.crash_after(n);
        assert!(work(&v).is_err());
        drop(v);
        let s = s.reboot();
        let v = Volume::open(Arc::new(s.clone()), &env.kms, Default::default())
            .unwrap_or_else(|e| panic!("crash point {n}: {e}"));
        let r = v.fsck().unwrap();
        assert!(r.is_clean(), "crash point {n}: {:?}", r.errors);
        let names: Vec<String> = v.snapshots().into_iter().map(|s| s.name).collect();
        drop(v);
        // Every snapshot present is complete: it opens and reads in full.
        for name in names {
            let sv = open_snapshot(&env, Arc::new(s.clone()), &name);
            let a = sv.lookup(ROOT_INO, b"a").unwrap();
            let want = if name == "one" {
                pattern(1, 300_000)
            } else {
                pattern(2, 600_000)
            };
            assert_eq!(
                sv.read(a.ino, 0, 1 << 20).unwrap(),
                want,
                "crash point {n}, snapshot {name}"
            );
        }
    }
}

#[test]
fn tampered_snapshot_blocks_are_detected() {
    let env = env();
    let storage = MemStorage::new();
    let v = init(
        &env,
        Arc::new(storage.clone()) as Arc<dyn Storage>,
        &small_opts(),
    );
    let f = v.create(ROOT_INO, b"a", 0o644, 0, 0).unwrap();
    v.write(f.ino, 0, &pattern(1, 100_000)).unwrap();
    v.snapshot_create("s").unwrap();
    // The live tree moves on to new blocks in a new segment (a reopen starts one).
    drop(v);
    let v = open(&env, Arc::new(storage.clone()));
    v.write(f.ino, 0, &pattern(2, 100_000)).unwrap();
    v.commit().unwrap();
    drop(v);
    // Corrupt every byte-range of the oldest data segment (the snapshot's only).
    let seg = storage
        .names()
        .into_iter()
        .filter(|n| n.starts_with("seg/") && n.ends_with(".seg"))
        .nth(1)
        .unwrap();
    let s = storage.reboot();
    s.with_file(&seg, |d| {
        for b in d.iter_mut().skip(200).step_by(500) {
            *b ^= 0xff;
        }
    });
    let v = open(&env, Arc::new(s.clone()));
    // Live data (elsewhere) still reads; fsck names the snapshot's damage.
    assert_eq!(v.read(f.ino, 0, 200_000).unwrap(), pattern(2, 100_000));
    let r = v.fsck().unwrap();
    assert!(
        r.errors.iter().any(|e| e.contains("snapshot s")),
        "{:?}",
        r.errors
    );
    drop(v);
    let sv = open_snapshot(&env, Arc::new(s), "s");
    let e = match sv.lookup(ROOT_INO, b"a") {
        Ok(a) => sv.read(a.ino, 0, 200_000).unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(e.errno(), libc::EIO);
    // The root record authenticates the snapshot table: a change to both
    // root slots is refused.
    let s = storage.reboot();
    for slot in kmsfs::volume::ROOT_SLOTS {
        s.with_file(slot, |d| {
            let n = d.len();
            d[n - 30] ^= 1;
        });
    }
    assert_eq!(
        Volume::open(Arc::new(s), &env.kms, Default::default())
            .err()
            .unwrap()
            .errno(),
        libc::EIO
    );
}

#[test]
fn clones_share_key_and_blocks_and_live_independently() {
    let env = env();
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let src: Arc<dyn Storage> = Arc::new(FsStorage::new(src_dir.path()));
    let v = init(&env, src.clone(), &small_opts());
    let f = v.create(ROOT_INO, b"a", 0o644, 0, 0).unwrap();
    v.write(f.ino, 0, &pattern(1, 2_000_000)).unwrap();
    v.snapshot_create("base").unwrap();
    let at_snapshot = dump(&v).unwrap();
    v.write(f.ino, 0, b"changed after the snapshot").unwrap();
    v.commit().unwrap();
    // Clone while the origin is open read-write (as when mounted).
    let ro = Volume::open(
        src.clone(),
        &env.kms,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let dst: Arc<dyn Storage> = Arc::new(FsStorage::new(dst_dir.path().join("clone")));
    std::fs::create_dir(dst_dir.path().join("clone")).unwrap();
    let (sp, dp) = (src_dir.path().to_path_buf(), dst_dir.path().join("clone"));
    let clone_id = ro
        .clone_snapshot("base", dst.clone(), &|name| {
            std::fs::hard_link(sp.join(name), dp.join(name))
        })
        .unwrap();
    // The cleaner of the origin keeps everything the reader holds (its pin:
    // the live tree and snapshots of the root it opened).
    let ro_view = dump(&ro).unwrap();
    let ro_segments = ro.open_tree_segments().unwrap();
    v.unlink(ROOT_INO, b"a").unwrap();
    v.clean(0.99).unwrap();
    for id in &ro_segments {
        assert!(
            src.exists(&kmsfs::format::segment_file_name(*id)),
            "segment {id} the reader needs was deleted"
        );
    }
    assert_eq!(dump(&ro).unwrap(), ro_view);
    assert!(ro.fsck().unwrap().is_clean());
    drop(ro);
    let c = Volume::open(dst.clone(), &env.kms, Default::default()).unwrap();
    assert_eq!(c.volume_id(), clone_id);
    assert_ne!(c.volume_id(), v.volume_id());
    assert_eq!(c.header().key_domain, v.header().key_domain);
    assert_eq!(c.header().wrapped_dk, v.header().wrapped_dk);
    assert_eq!(dump(&c).unwrap(), at_snapshot);
    // Independent: writes to one do not show in the other; both fsck clean.
    let g = c.create(ROOT_INO, b"only-in-clone", 0o644, 0, 0).unwrap();
    c.write(g.ino, 0, b"clone data").unwrap();
    c.commit().unwrap();
    assert!(v.lookup(ROOT_INO, b"only-in-clone").is_err());
    v.snapshot_delete("base").unwrap();
    v.clean(0.99).unwrap();
    assert!(v.fsck().unwrap().is_clean());
    let r = c.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
    assert_eq!(
        c.read(c.lookup(ROOT_INO, b"a").unwrap().ino, 0, 100)
            .unwrap(),
        pattern(1, 100)
    );
}

#[test]
fn control_socket_takes_snapshots_of_an_open_volume() {
    use kmsfs::control::{ControlServer, Request, request};
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FsStorage::new(dir.path()));
    let v = Arc::new(init(&env, storage.clone(), &small_opts()));
    let f = v.create(ROOT_INO, b"a", 0o644, 0, 0).unwrap();
    v.write(f.ino, 0, b"version one").unwrap();
    let server = ControlServer::start(v.clone(), dir.path()).unwrap();
    // The socket is where clients look first; the volume directory holds none.
    let sock = kmsfs::control::socket_path(dir.path());
    assert!(
        fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_socket()),
        "no socket at {}",
        sock.display()
    );
    let legacy = dir.path().join(kmsfs::control::CONTROL_FILE);
    if kmsfs::control::runtime_base().is_some() {
        assert_ne!(sock, legacy);
        assert!(fs::symlink_metadata(&legacy).is_err());
    }
    let r = request(dir.path(), &Request::SnapshotCreate { name: "s1".into() }).unwrap();
    assert_eq!(r["name"], "s1");
    // The volume keeps serving; the snapshot holds the moment.
    v.write(f.ino, 0, b"version two").unwrap();
    let e = request(dir.path(), &Request::SnapshotCreate { name: "s1".into() }).unwrap_err();
    assert_eq!(e.errno(), libc::EEXIST);
    let list = request(dir.path(), &Request::SnapshotList).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let sv = open_snapshot(&env, storage.clone(), "s1");
    let a = sv.lookup(ROOT_INO, b"a").unwrap();
    assert_eq!(sv.read(a.ino, 0, 100).unwrap(), b"version one");
    drop(sv);
    request(dir.path(), &Request::SnapshotDelete { name: "s1".into() }).unwrap();
    assert!(v.snapshots().is_empty());
    drop(server);
    assert!(fs::symlink_metadata(&sock).is_err(), "the socket is left");
    assert!(fs::symlink_metadata(&legacy).is_err());
    assert!(request(dir.path(), &Request::Stats).is_err());
}

/// Without a usable runtime directory (none, or one that is not the user's
/// alone), the socket goes into the volume directory as `kmsfs.ctl`, and
/// clients find it there, past a stale socket at the runtime name.
#[test]
fn control_socket_in_the_volume_directory_without_a_runtime_directory() {
    use kmsfs::control::{CONTROL_FILE, ControlServer, Request, RuntimeBase, request};
    use std::os::unix::fs::PermissionsExt;
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FsStorage::new(dir.path()));
    let v = Arc::new(init(&env, storage.clone(), &small_opts()));
    let legacy = dir.path().join(CONTROL_FILE);
    let runtime = kmsfs::control::socket_path(dir.path());
    // A socket nobody listens on at the runtime name (a killed mount's):
    // clients go on to the next place.
    let stale = (runtime != legacy).then(|| {
        use std::os::unix::fs::DirBuilderExt;
        // Made as a mount makes them.
        let rt = runtime.parent().unwrap();
        let _ = fs::DirBuilder::new()
            .mode(0o755)
            .create(rt.parent().unwrap());
        let _ = fs::DirBuilder::new().mode(0o700).create(rt);
        drop(std::os::unix::net::UnixListener::bind(&runtime).unwrap());
        runtime.clone()
    });
    let bad = tempfile::tempdir().unwrap();
    let loose = bad.path().join("rt");
    fs::create_dir(&loose).unwrap();
    fs::set_permissions(&loose, fs::Permissions::from_mode(0o777)).unwrap();
    for base in [None, Some(RuntimeBase::at(&loose))] {
        let server = ControlServer::start_in(v.clone(), dir.path(), base.as_ref()).unwrap();
        assert!(
            fs::symlink_metadata(&legacy).is_ok_and(|m| m.file_type().is_socket()),
            "no kmsfs.ctl in the volume directory"
        );
        assert!(fs::read_dir(&loose).unwrap().next().is_none());
        let r = request(dir.path(), &Request::SnapshotCreate { name: "s1".into() }).unwrap();
        assert_eq!(r["name"], "s1");
        request(dir.path(), &Request::SnapshotDelete { name: "s1".into() }).unwrap();
        drop(server);
        assert!(fs::symlink_metadata(&legacy).is_err(), "kmsfs.ctl is left");
        let e = request(dir.path(), &Request::Stats)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&legacy.display().to_string()), "{e}");
    }
    if let Some(stale) = stale {
        fs::remove_file(stale).unwrap();
    }
}

/// Root reaches a user's own mount of their volume in that user's runtime
/// directory (`/run/user/UID/kmsfs`), and there only a server of that user
/// may answer: the user controls what is at that path.
#[test]
fn root_reaches_a_users_mount_in_the_users_runtime_directory() {
    use kmsfs::control::{ControlServer, Request, RuntimeBase, request};
    use std::os::unix::fs::PermissionsExt;
    const NOBODY: u32 = 65534;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (serves as another user)");
        return;
    }
    let user_run = std::path::Path::new("/run/user/65534");
    if fs::symlink_metadata(user_run).is_ok() {
        eprintln!("skipped: {} exists", user_run.display());
        return;
    }
    /// Removes the user's runtime directory made here.
    struct Made(&'static std::path::Path);
    impl Drop for Made {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(self.0);
        }
    }
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FsStorage::new(dir.path()));
    let v = Arc::new(init(&env, storage, &small_opts()));
    // The user's volume directory, and the user's runtime directory.
    fn chown_all(p: &std::path::Path) {
        std::os::unix::fs::lchown(p, Some(NOBODY), Some(NOBODY)).unwrap();
        if fs::symlink_metadata(p).unwrap().is_dir() {
            for e in fs::read_dir(p).unwrap() {
                chown_all(&e.unwrap().path());
            }
        }
    }
    chown_all(dir.path());
    fs::create_dir_all(user_run.parent().unwrap()).unwrap();
    fs::create_dir(user_run).unwrap();
    let _made = Made(user_run);
    std::os::unix::fs::chown(user_run, Some(NOBODY), Some(NOBODY)).unwrap();
    fs::set_permissions(user_run, fs::Permissions::from_mode(0o700)).unwrap();
    let rt = user_run.join("kmsfs");
    // Served by the user: from a thread running as nobody (raw setresuid
    // affects that thread alone; the server's threads inherit it).
    let (v2, vdir, base) = (v.clone(), dir.path().to_path_buf(), RuntimeBase::at(&rt));
    let server = std::thread::spawn(move || {
        // SAFETY: raw setresgid/setresuid on this thread only; it ends after
        // starting the server.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY),
                0
            );
            assert_eq!(
                libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY),
                0
            );
        }
        ControlServer::start_in(v2, &vdir, Some(&base))
    })
    .join()
    .unwrap()
    .unwrap();
    let sock = kmsfs::control::socket_candidates(dir.path())[1]
        .path
        .clone();
    assert!(sock.starts_with(&rt), "{}", sock.display());
    assert!(fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_socket()));
    let list = request(dir.path(), &Request::SnapshotList).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    drop(server);
    assert!(fs::symlink_metadata(&sock).is_err(), "the socket is left");
    // A socket of root's at that name is not the user's mount: refused.
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let e = request(dir.path(), &Request::Stats)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("the control socket {} of", sock.display()))
            && e.contains("served by uid 0")
            && e.contains(&format!("{} may have been tampered with", rt.display())),
        "{e}"
    );
}
