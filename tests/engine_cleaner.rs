//! The cleaner: it keeps snapshot metadata shared, runs beside writers
//! (changes made while it walks are kept), keeps exactly what a reader's
//! pinned root needs, and a crash at any write or sync point of a clean loses
//! nothing.

mod engine_common;

use std::collections::BTreeSet;
use std::sync::Arc;

use engine_common::*;
use kmsfs::format;
use kmsfs::store::{MemStorage, Storage};
use kmsfs::volume::{OpenOptions, ROOT_INO, Volume};

/// Many small files (metadata over many tree nodes), a snapshot, a spread of
/// changes after it, and a big file overwritten so segments become mostly
/// dead. Returns the inode numbers of the small files.
fn populate(v: &Volume, files: u64) -> Vec<u64> {
    populate_with(v, files, 3 << 20)
}

fn populate_with(v: &Volume, files: u64, big_len: usize) -> Vec<u64> {
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
    v.write(big.ino, 0, &pattern(7, big_len)).unwrap();
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

fn open_ro(env: &Env, s: Arc<dyn Storage>, snapshot: Option<&str>) -> Volume {
    Volume::open(
        s,
        &env.kms,
        OpenOptions {
            read_only: true,
            snapshot: snapshot.map(str::to_string),
            ..Default::default()
        },
    )
    .unwrap()
}

fn segment_ids(s: &MemStorage) -> BTreeSet<u64> {
    s.list(format::SEGMENT_DIR)
        .unwrap()
        .iter()
        .filter_map(|n| format::parse_segment_file_name(n))
        .collect()
}

/// Changes made while the cleaner walks and copies (it holds no lock then):
/// new files, overwrites, deletions, a snapshot taken, some
/// committed and some still dirty when it applies its relocation. All of
/// them are there afterwards, and the relocation still happened.
#[test]
fn changes_made_while_the_cleaner_runs_are_kept() {
    let env = env();
    let storage = MemStorage::new();
    let v = Arc::new(init(
        &env,
        Arc::new(storage.clone()) as Arc<dyn Storage>,
        &small_opts(),
    ));
    let inos = populate(&v, 1500);
    v.snapshot_create("old").unwrap();
    v.snapshot_create("doomed").unwrap();
    for ino in inos.iter().step_by(7) {
        v.write(*ino, 0, b"after the snapshots").unwrap();
    }
    v.commit().unwrap();
    let expected = Arc::new(std::sync::Mutex::new(None));
    let stages = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let (v2, expected, stages) = (Arc::downgrade(&v), expected.clone(), stages.clone());
        let inos = inos.clone();
        v.set_clean_hook(Some(Arc::new(move |stage: &str| {
            let v = v2.upgrade().unwrap();
            stages.lock().unwrap().push(stage.to_string());
            match stage {
                "walked" => {
                    // Committed changes over old nodes, a snapshot of them.
                    for (k, ino) in inos.iter().enumerate().step_by(11) {
                        v.write(*ino, 10, &pattern(k as u64, 5000)).unwrap();
                    }
                    for i in 0..50 {
                        let a = v
                            .create(ROOT_INO, format!("walk{i}").as_bytes(), 0o644, 0, 0)
                            .unwrap();
                        v.write(a.ino, 0, &pattern(1000 + i, 9000)).unwrap();
                    }
                    v.unlink(ROOT_INO, b"f3").unwrap();
                    v.snapshot_create("during").unwrap();
                    v.commit().unwrap();
                }
                "relocated" => {
                    // Left dirty: the cleaner applies its relocation to them.
                    for (k, ino) in inos.iter().enumerate().skip(5).step_by(13) {
                        v.write(*ino, 0, &pattern(k as u64 + 77, 300)).unwrap();
                    }
                    let a = v.create(ROOT_INO, b"dirty", 0o644, 0, 0).unwrap();
                    v.write(a.ino, 0, &pattern(5, 70_000)).unwrap();
                    v.unlink(ROOT_INO, b"f4").unwrap();
                    *expected.lock().unwrap() = Some(dump(&v).unwrap());
                }
                _ => {}
            }
        })));
    }
    let during_before;
    {
        let stats = v.clean(1.01).unwrap();
        assert!(stats.blocks_moved > 100, "{stats:?}");
        assert!(stats.segments_removed > 0, "{stats:?}");
        v.set_clean_hook(None);
        assert_eq!(*stages.lock().unwrap(), ["walked", "relocated"]);
        let expected = expected.lock().unwrap().clone().unwrap();
        assert_eq!(dump(&v).unwrap(), expected);
        let r = v.fsck().unwrap();
        assert!(r.is_clean(), "{:?}", r.errors);
        v.commit().unwrap();
        during_before = v
            .snapshot_list()
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect::<Vec<_>>();
    }
    assert_eq!(during_before, ["old", "doomed", "during"]);
    let live = dump(&v).unwrap();
    let v = Arc::into_inner(v).unwrap();
    drop(v);
    let v = open(&env, Arc::new(storage.clone()));
    assert_eq!(dump(&v).unwrap(), live);
    let r = v.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
    let during = open_ro(&env, Arc::new(storage.clone()), Some("during"));
    assert!(
        during.read(inos[11], 10, 5000).unwrap() == pattern(11, 5000),
        "the snapshot taken during the clean keeps its moment"
    );
    assert!(during.lookup(ROOT_INO, b"walk49").is_ok());
    assert!(during.lookup(ROOT_INO, b"dirty").is_err());
}

/// A read-only user pins the root it opened: the cleaner keeps exactly the
/// segments that root needs and deletes the other dead ones; once the reader
/// is gone (or left only a stale pin), the rest goes too.
#[test]
fn a_pinned_reader_keeps_exactly_its_segments() {
    let env = env();
    let storage = MemStorage::new();
    let s: Arc<dyn Storage> = Arc::new(storage.clone());
    let v = init(&env, s.clone(), &small_opts());
    let inos = populate(&v, 400);
    v.snapshot_create("kept").unwrap();
    // Churn the reader does not hold: overwritten data, a snapshot deleted.
    for (k, ino) in inos.iter().enumerate() {
        v.write(*ino, 0, &pattern(k as u64 + 1, 4096)).unwrap();
    }
    let big = v.lookup(ROOT_INO, b"big").unwrap().ino;
    v.write(big, 0, &pattern(8, 2 << 20)).unwrap();
    v.commit().unwrap();
    v.snapshot_create("gone").unwrap();
    v.write(big, 0, &pattern(9, 2 << 20)).unwrap();
    v.commit().unwrap();

    let reader = open_ro(&env, s.clone(), Some("kept"));
    let reader_view = dump(&reader).unwrap();
    let needed = reader.open_tree_segments().unwrap();
    let pins = storage.list_pins().unwrap();
    assert_eq!(pins.len(), 1, "{pins:?}");
    assert!(pins[0].held && pins[0].name.starts_with(kmsfs::store::PIN_PREFIX));
    // A reader of the live tree at this moment pins that root too.
    let live_reader = open_ro(&env, s.clone(), None);
    let live_view = dump(&live_reader).unwrap();
    let live_needed = live_reader.open_tree_segments().unwrap();
    drop(live_reader);
    assert_eq!(
        storage.list_pins().unwrap().len(),
        1,
        "a reader's pin goes with it"
    );

    v.snapshot_delete("gone").unwrap();
    v.snapshot_delete("kept").unwrap();
    for i in 0..200 {
        v.unlink(ROOT_INO, format!("f{i}").as_bytes()).unwrap();
    }
    v.unlink(ROOT_INO, b"big").unwrap();
    v.commit().unwrap();
    let before = segment_ids(&storage);
    let stats = v.clean(1.01).unwrap();
    let after = segment_ids(&storage);
    let writer_needs = v.open_tree_segments().unwrap();
    for id in &needed {
        assert!(
            after.contains(id),
            "segment {id} the reader needs was deleted"
        );
    }
    let newest = *after.iter().max().unwrap();
    let extra: Vec<u64> = after
        .iter()
        .copied()
        .filter(|id| !needed.contains(id) && !writer_needs.contains(id) && *id != newest)
        .collect();
    assert!(
        extra.is_empty(),
        "dead segments kept: {extra:?} ({stats:?})"
    );
    let deleted: Vec<u64> = before.difference(&after).copied().collect();
    assert!(
        deleted
            .iter()
            .any(|id| live_needed.contains(id) && !needed.contains(id)),
        "nothing only older roots needed was deleted: {deleted:?}"
    );
    assert_eq!(dump(&reader).unwrap(), reader_view);
    let r = reader.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
    assert!(live_view.contains_key("/big"));

    // The reader leaves; a pin left behind by a reader that died counts for
    // nothing (and is removed).
    let stale = storage.list_pins().unwrap().remove(0);
    drop(reader);
    assert!(storage.list_pins().unwrap().is_empty());
    storage.plant_stale_pin(&stale.name, &stale.data);
    v.clean(1.01).unwrap();
    assert!(
        storage.list_pins().unwrap().is_empty(),
        "the stale pin is left"
    );
    let now = segment_ids(&storage);
    let writer_needs = v.open_tree_segments().unwrap();
    let newest = *now.iter().max().unwrap();
    let kept: Vec<u64> = now
        .iter()
        .copied()
        .filter(|id| !writer_needs.contains(id) && *id != newest)
        .collect();
    assert!(
        kept.is_empty(),
        "segments kept for a reader that left: {kept:?}"
    );
    assert!(needed.iter().any(|id| !now.contains(id)));
    let r = v.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
}

/// A pin the cleaner cannot read, held by a live reader: what it needs is
/// unknown, so nothing is deleted while it is there.
#[test]
fn an_unreadable_held_pin_stops_deletion() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let s: Arc<dyn Storage> = Arc::new(kmsfs::store::FsStorage::new(dir.path()));
    let v = init(&env, s.clone(), &small_opts());
    let f = v.create(ROOT_INO, b"f", 0o644, 0, 0).unwrap();
    v.write(f.ino, 0, &pattern(1, 3 << 20)).unwrap();
    v.commit().unwrap();
    v.write(f.ino, 0, &pattern(2, 3 << 20)).unwrap();
    v.commit().unwrap();
    let guard = s
        .create_pin(
            &format!("{}{}", kmsfs::store::PIN_PREFIX, "0".repeat(32)),
            b"garbage",
        )
        .unwrap();
    let stats = v.clean(0.5).unwrap();
    assert_eq!(stats.segments_removed, 0, "{stats:?}");
    drop(guard);
    assert!(
        s.list_pins().unwrap().is_empty(),
        "a pin goes with its guard"
    );
    // A pin file nobody holds (its reader died) is removed and ignored.
    std::fs::write(
        dir.path()
            .join(format!("{}{}", kmsfs::store::PIN_PREFIX, "1".repeat(32))),
        b"garbage",
    )
    .unwrap();
    let stats = v.clean(0.5).unwrap();
    assert!(stats.segments_removed > 0, "{stats:?}");
    assert!(s.list_pins().unwrap().is_empty());
    assert_eq!(v.read(f.ino, 0, 10).unwrap(), pattern(2, 10));
}

/// Writers in several threads (each with files of its own and a model of
/// them), snapshots taken and deleted, and cleans one after another: no
/// update is lost, fsck is clean, and so is the volume reopened.
#[test]
fn cleans_run_beside_writer_threads() {
    let env = env();
    let storage = MemStorage::new();
    let v = Arc::new(init(
        &env,
        Arc::new(storage.clone()) as Arc<dyn Storage>,
        &small_opts(),
    ));
    populate(&v, 300);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    for t in 0..3u64 {
        let (v, stop) = (v.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let dir = v
                .mkdir(ROOT_INO, format!("t{t}").as_bytes(), 0o755, 0, 0)
                .unwrap()
                .ino;
            let mut model: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
            let mut x = t + 1;
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 300 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let name = format!("g{}", x % 40);
                match x % 5 {
                    0 => {
                        if model.remove(&name).is_some() {
                            v.unlink(dir, name.as_bytes()).unwrap();
                        }
                    }
                    _ => {
                        let ino = match v.lookup(dir, name.as_bytes()) {
                            Ok(a) => a.ino,
                            Err(_) => v.create(dir, name.as_bytes(), 0o644, 0, 0).unwrap().ino,
                        };
                        let data = pattern(x, (x % 20_000) as usize);
                        let m = model.entry(name).or_default();
                        let off = (x >> 20) as usize % 10_000;
                        v.write(ino, off as u64, &data).unwrap();
                        if m.len() < off + data.len() {
                            m.resize(off + data.len(), 0);
                        }
                        m[off..off + data.len()].copy_from_slice(&data);
                    }
                }
                if n.is_multiple_of(25) {
                    v.commit().unwrap();
                }
                if t == 0 && n % 100 == 50 {
                    let _ = v.snapshot_create(&format!("s{n}"));
                    if n >= 200 {
                        v.snapshot_delete(&format!("s{}", n - 200)).unwrap();
                    }
                }
                n += 1;
            }
            (dir, model)
        }));
    }
    let mut cleans = 0;
    while cleans < 6 {
        v.clean(if cleans % 2 == 0 { 1.01 } else { 0.5 }).unwrap();
        cleans += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let models: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let check = |v: &Volume| {
        for (dir, model) in &models {
            let names: Vec<Vec<u8>> = v
                .readdir(*dir, 0, 1000)
                .unwrap()
                .into_iter()
                .map(|i| i.name)
                .filter(|n| n != b"." && n != b"..")
                .collect();
            assert_eq!(names.len(), model.len());
            for (name, data) in model {
                let ino = v.lookup(*dir, name.as_bytes()).unwrap().ino;
                assert!(
                    v.read(ino, 0, 1 << 20).unwrap() == *data,
                    "{name}: contents differ from the model"
                );
            }
        }
        let r = v.fsck().unwrap();
        assert!(r.is_clean(), "{:?}", r.errors);
    };
    check(&v);
    v.clean(0.5).unwrap();
    check(&v);
    v.commit().unwrap();
    drop(Arc::into_inner(v).unwrap());
    let v = open(&env, Arc::new(storage));
    check(&v);
}

/// Opens a copy of a volume whose original (or another copy) was opened
/// since: its generation is behind the keystore's mark on purpose.
fn open_copy(env: &Env, s: &MemStorage) -> Volume {
    Volume::open(
        Arc::new(s.clone()),
        &env.kms,
        OpenOptions {
            accept_rollback: true,
            ..Default::default()
        },
    )
    .unwrap()
}

/// A crash at every write and sync point of a clean (snapshots sharing
/// metadata, every live record moved, a change committed from inside the
/// clean) loses nothing: the volume opens, fsck is clean, the live tree is
/// the state of a completed commit and every snapshot keeps its moment.
#[test]
fn crash_at_every_point_of_a_clean() {
    let env = env();
    let base = MemStorage::new();
    let mut snapshots = Vec::new();
    let pre = {
        let v = init(
            &env,
            Arc::new(base.clone()) as Arc<dyn Storage>,
            &small_opts(),
        );
        let inos = populate_with(&v, 80, 512 << 10);
        v.snapshot_create("a").unwrap();
        for (k, ino) in inos.iter().enumerate().step_by(3) {
            v.write(*ino, 0, &pattern(k as u64 + 500, 2000)).unwrap();
        }
        v.unlink(ROOT_INO, b"big").unwrap();
        v.commit().unwrap();
        v.snapshot_create("b").unwrap();
        v.unlink(ROOT_INO, b"f7").unwrap();
        v.commit().unwrap();
        let pre = dump(&v).unwrap();
        v.close().unwrap();
        for name in ["a", "b"] {
            let s = open_ro(&env, Arc::new(base.clone()), Some(name));
            snapshots.push((name, dump(&s).unwrap()));
        }
        pre
    };
    type Done = Arc<std::sync::Mutex<Vec<Dump>>>;
    // The clean, a change committed from inside it, one after it.
    let workload = |v: &Arc<Volume>, done: &Done| -> kmsfs::error::Result<()> {
        let (weak, d) = (Arc::downgrade(v), done.clone());
        v.set_clean_hook(Some(Arc::new(move |stage: &str| {
            let Some(v) = weak.upgrade() else { return };
            if stage != "walked" {
                return;
            }
            let r = (|| -> kmsfs::error::Result<()> {
                let a = v.create(ROOT_INO, b"mid", 0o644, 0, 0)?;
                v.write(a.ino, 0, &pattern(3, 50_000))?;
                v.commit()
            })();
            if r.is_ok() {
                d.lock().unwrap().push(dump(&v).unwrap());
            }
        })));
        let stats = v.clean(1.01)?;
        assert!(stats.blocks_moved > 0);
        v.set_clean_hook(None);
        let a = v.create(ROOT_INO, b"after", 0o644, 0, 0)?;
        v.write(a.ino, 0, b"tail")?;
        v.commit()?;
        done.lock().unwrap().push(dump(v).unwrap());
        Ok(())
    };
    // Reference run: the mutating calls of the workload, its states.
    let (states, total): (Vec<Dump>, usize) = {
        let s = base.reboot();
        let v = Arc::new(open_copy(&env, &s));
        let start = s.op_count();
        let done: Done = Default::default();
        workload(&v, &done).unwrap();
        let total = s.op_count() - start;
        assert!(total > 50, "workload too small: {total} ops");
        v.set_clean_hook(None);
        let d = done.lock().unwrap().clone();
        assert_eq!(d.len(), 2);
        (std::iter::once(pre.clone()).chain(d).collect(), total)
    };
    for n in 0..=total {
        let s = base.reboot();
        let v = Arc::new(open_copy(&env, &s));
        s.crash_after(n);
        let done: Done = Default::default();
        let r = workload(&v, &done);
        assert_eq!(r.is_ok(), n == total, "crash point {n}: {r:?}");
        v.set_clean_hook(None);
        drop(v);
        let after = s.reboot();
        let v = Volume::open(Arc::new(after.clone()), &env.kms, Default::default())
            .unwrap_or_else(|e| panic!("crash point {n}: the volume does not open: {e}"));
        let report = v.fsck().unwrap();
        assert!(
            report.is_clean(),
            "crash point {n}: fsck: {:?}",
            report.errors
        );
        let got = dump(&v).unwrap();
        assert!(
            states.contains(&got),
            "crash point {n}: the live tree is not the state of a completed commit"
        );
        for (name, view) in &snapshots {
            let sv = open_ro(&env, Arc::new(after.clone()), Some(name));
            assert_eq!(
                &dump(&sv).unwrap(),
                view,
                "crash point {n}: snapshot {name}"
            );
        }
        let f = v.create(ROOT_INO, b"post-crash", 0o644, 0, 0).unwrap();
        v.write(f.ino, 0, b"ok").unwrap();
        v.commit().unwrap();
        assert_eq!(v.read(f.ino, 0, 10).unwrap(), b"ok");
    }
}

/// fsck reads the node mirror of the open segment; nodes appended to it
/// afterwards (by commits, or by the cleaner's copies) are found there too.
#[test]
fn the_open_segment_mirror_is_read_again_after_it_grows() {
    let env = env();
    let storage = MemStorage::new();
    let v = init(
        &env,
        Arc::new(storage.clone()) as Arc<dyn Storage>,
        &small_opts(),
    );
    v.create(ROOT_INO, b"a", 0o644, 0, 0).unwrap();
    v.commit().unwrap();
    assert!(v.fsck().unwrap().is_clean());
    for i in 0..20 {
        v.create(ROOT_INO, format!("n{i}").as_bytes(), 0o644, 0, 0)
            .unwrap();
        v.commit().unwrap();
    }
    let r = v.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
}
