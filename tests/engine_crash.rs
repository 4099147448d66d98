//! Crash injection at every write and sync point of a scripted workload.
//!
//! The workload runs on `MemStorage`, which models exactly what a disk keeps
//! after a power loss (synced contents, synced directory entries, optionally a
//! torn tail of unsynced appends). For each point N, the storage "loses power"
//! at its N-th mutating call; the rebooted volume must open, pass fsck, and
//! show exactly the state of a completed commit: the last one that returned, or
//! the one in flight (if its root record had already become durable).

mod engine_common;

use std::sync::Arc;

use engine_common::*;
use kmsfs::error::Result;
use kmsfs::store::{MemStorage, Storage};
use kmsfs::volume::{ROOT_INO, RenameFlags, SetAttr, Volume};

/// The scripted workload; pushes the dump of every completed commit.
fn workload(v: &Volume, commits: &mut Vec<Dump>) -> Result<()> {
    let mut commit = |v: &Volume| -> Result<()> {
        v.commit()?;
        commits.push(dump(v)?);
        Ok(())
    };
    let d = v.mkdir(ROOT_INO, b"docs", 0o755, 0, 0)?;
    let a = v.create(d.ino, b"a.txt", 0o644, 0, 0)?;
    v.write(a.ino, 0, &pattern(1, 10_000))?;
    let b = v.create(ROOT_INO, b"b.bin", 0o600, 0, 0)?;
    v.write(b.ino, 0, &pattern(2, 300_000))?;
    v.setxattr(a.ino, b"user.tag", b"first", 0)?;
    commit(v)?;
    // Overwrite in the middle, extend, and add a sparse tail.
    v.write(a.ino, 5_000, &pattern(3, 7_000))?;
    v.write(b.ino, 1_000_000, &pattern(4, 5_000))?;
    // Small overwrites of stored blocks: fragments.
    v.write(b.ino, 70_000, &pattern(7, 500))?;
    v.write(b.ino, 130_001, &pattern(8, 1_000))?;
    v.symlink(ROOT_INO, b"link", b"docs/a.txt", 0, 0)?;
    v.link(a.ino, ROOT_INO, b"hard")?;
    commit(v)?;
    // Enough data to roll over several 1 MiB segments.
    let c = v.create(d.ino, b"big", 0o644, 0, 0)?;
    for i in 0..6 {
        v.write(c.ino, i * 400_000, &pattern(10 + i, 400_000))?;
    }
    v.rename(ROOT_INO, b"b.bin", d.ino, b"b2.bin", RenameFlags::default())?;
    commit(v)?;
    v.unlink(ROOT_INO, b"hard")?;
    v.setattr(
        c.ino,
        &SetAttr {
            size: Some(123_456),
            ..Default::default()
        },
    )?;
    v.removexattr(a.ino, b"user.tag")?;
    v.write(c.ino, 1_000, &pattern(9, 700))?; // a fragment the clean below moves
    v.setxattr(c.ino, b"user.big", &pattern(5, 10_000), 0)?;
    commit(v)?;
    // Free most of the data, then clean (moves live blocks, deletes segments).
    v.unlink(d.ino, b"b2.bin")?;
    v.write(c.ino, 0, &pattern(6, 50_000))?;
    commit(v)?;
    v.clean(0.9)?;
    commit(v)?;
    let e = v.create(ROOT_INO, b"after-clean", 0o644, 0, 0)?;
    v.write(e.ino, 0, b"tail")?;
    commit(v)?;
    Ok(())
}

fn crash_everywhere(torn: usize) {
    let env = env();
    // Reference run: count the mutating calls and record every commit.
    let storage = MemStorage::new();
    let v = init(
        &env,
        Arc::new(storage.clone()) as Arc<dyn Storage>,
        &small_opts(),
    );
    let start = storage.op_count();
    let mut reference = Vec::new();
    workload(&v, &mut reference).unwrap();
    let total = storage.op_count() - start;
    drop(v);
    assert!(total > 50, "workload too small: {total} ops");
    let empty = {
        let s = MemStorage::new();
        dump(&init(&env, Arc::new(s) as Arc<dyn Storage>, &small_opts())).unwrap()
    };

    for n in 0..=total {
        let storage = MemStorage::new();
        storage.set_torn_keep(torn);
        let v = init(
            &env,
            Arc::new(storage.clone()) as Arc<dyn Storage>,
            &small_opts(),
        );
        storage.crash_after(n);
        let mut done = Vec::new();
        let r = workload(&v, &mut done);
        assert_eq!(r.is_ok(), n == total, "crash point {n}: {r:?}");
        drop(v);
        let after = storage.reboot();
        let v = Volume::open(Arc::new(after.clone()), &env.kms, Default::default())
            .unwrap_or_else(|e| panic!("crash point {n}: volume does not open: {e}"));
        let report = v.fsck().unwrap();
        assert!(
            report.is_clean(),
            "crash point {n}: fsck: {:?}",
            report.errors
        );
        let got = dump(&v).unwrap();
        let last = done.len();
        let ok = if last == 0 {
            got == empty
        } else {
            got == reference[last - 1]
        } || reference.get(last) == Some(&got);
        assert!(
            ok,
            "crash point {n}: the tree is not the state of a completed commit (done {last})"
        );
        // The recovered volume keeps working.
        let f = v.create(ROOT_INO, b"post-crash", 0o644, 0, 0).unwrap();
        v.write(f.ino, 0, b"ok").unwrap();
        v.commit().unwrap();
        assert_eq!(v.read(f.ino, 0, 10).unwrap(), b"ok");
    }
}

#[test]
fn crash_at_every_point() {
    crash_everywhere(0);
}

#[test]
fn crash_at_every_point_with_torn_writes() {
    crash_everywhere(5);
}
