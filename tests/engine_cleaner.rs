//! The cleaner: it keeps snapshot metadata shared, runs beside writers
//! (changes made while it walks are kept), keeps exactly what a reader's
//! pinned root needs, and a crash at any write or sync point of a clean loses
//! nothing.

mod engine_common;

use std::sync::Arc;

use engine_common::*;
use kmsfs::store::{MemStorage, Storage};
use kmsfs::volume::{OpenOptions, ROOT_INO, Volume};

/// Many small files (metadata over many tree nodes), a snapshot, a spread of
/// changes after it, and a big file overwritten so segments become mostly
/// dead. Returns the inode numbers of the small files.
fn populate(v: &Volume, files: u64) -> Vec<u64> {
    let mut inos = Vec::new();
    for i in 0..files {
        let a = v
            .create(ROOT_INO, format!("f{i}").as_bytes(), 0o644, 0, 0)
            .unwrap();
        v.write(a.ino, 0, &pattern(i, 100 + (i as usize % 3000)))
            .unwrap();
        inos.push(a.ino);
    }
    let big = v.create(ROOT_INO, b"big", 0o644, 0, 0).unwrap();
    v.write(big.ino, 0, &pattern(7, 3 << 20)).unwrap();
    v.commit().unwrap();
    inos
}

fn snapshot_figures(v: &Volume) -> Vec<(String, u64, u64)> {
    v.snapshot_list()
        .unwrap()
        .into_iter()
        .map(|s| (s.name, s.exclusive_bytes, s.shared_bytes))
        .collect()
}

#[test]
fn a_clean_keeps_snapshot_metadata_shared() {
    let env = env();
    let storage = MemStorage::new();
    let v = init(
        &env,
        Arc::new(storage.clone()) as Arc<dyn Storage>,
        &small_opts(),
    );
    let inos = populate(&v, 3000);
    v.snapshot_create("s1").unwrap();
    // A few changes: the snapshot then owns a few paths of its own.
    for ino in inos.iter().step_by(500) {
        v.write(*ino, 0, b"changed").unwrap();
    }
    v.unlink(ROOT_INO, b"big").unwrap();
    v.commit().unwrap();
    v.snapshot_create("s2").unwrap();
    v.write(inos[1], 0, b"changed again").unwrap();
    v.commit().unwrap();
    let live_before = dump(&v).unwrap();
    let before = snapshot_figures(&v);
    // Everything with live data moves (threshold above 1): every tree node
    // shared by the live tree and the snapshots is relocated.
    let stats = v.clean(1.01).unwrap();
    assert!(stats.blocks_moved > 100, "{stats:?}");
    let after = snapshot_figures(&v);
    eprintln!("exclusive/shared bytes before {before:?}, after {after:?}");
    for ((name, excl_before, shared_before), (_, excl_after, shared_after)) in
        before.iter().zip(&after)
    {
        assert!(
            excl_after <= excl_before,
            "snapshot {name}: exclusive bytes grew from {excl_before} to {excl_after}"
        );
        assert!(
            shared_after >= shared_before,
            "snapshot {name}: shared bytes fell from {shared_before} to {shared_after}"
        );
    }
    assert_eq!(dump(&v).unwrap(), live_before);
    let r = v.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
    // A second clean finds nothing more to share or move back.
    v.clean(0.5).unwrap();
    assert_eq!(snapshot_figures(&v), after);
    drop(v);
    let v = open(&env, Arc::new(storage.clone()));
    assert_eq!(dump(&v).unwrap(), live_before);
    let s1 = Volume::open(
        Arc::new(storage),
        &env.kms,
        OpenOptions {
            snapshot: Some("s1".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        s1.read(inos[0], 0, 10_000).unwrap(),
        pattern(0, 100),
        "the snapshot keeps its moment"
    );
}
