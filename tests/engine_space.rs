//! Space: the cleaner reclaims what no root references, sparse files cost
//! nothing, and a full backing store gives ENOSPC and stays consistent.

mod engine_common;

use std::sync::Arc;

use engine_common::*;
use kmsfs::store::{MemStorage, Storage};
use kmsfs::volume::{ROOT_INO, Volume};

const MIB: u64 = 1 << 20;

#[test]
fn cleaner_reclaims_overwritten_and_deleted_data() {
    let env = env();
    let storage = MemStorage::new();
    let v = init(
        &env,
        Arc::new(storage.clone()) as Arc<dyn Storage>,
        &small_opts(),
    );
    let f = v.create(ROOT_INO, b"f", 0o644, 0, 0).unwrap();
    let keep = v.create(ROOT_INO, b"keep", 0o644, 0, 0).unwrap();
    v.write(keep.ino, 0, &pattern(9, 300_000)).unwrap();
    v.write(f.ino, 0, &pattern(1, 4 * MIB as usize)).unwrap();
    v.commit().unwrap();
    let first = v.stored_bytes().unwrap();
    assert!(first > 4 * MIB && first < 5 * MIB, "{first}");
    // Overwrite 90%: the store grows by about that much.
    let new = pattern(2, (4 * MIB as usize) * 9 / 10);
    v.write(f.ino, 0, &new).unwrap();
    v.commit().unwrap();
    let grown = v.stored_bytes().unwrap();
    assert!(grown > first + 3 * MIB, "{grown}");
    let stats = v.clean(0.5).unwrap();
    let cleaned = v.stored_bytes().unwrap();
    assert!(stats.segments_removed >= 2, "{stats:?}");
    assert!(
        cleaned < first + MIB,
        "after cleaning {cleaned}, before {grown}, first {first}"
    );
    let mut expect = new.clone();
    expect.extend_from_slice(&pattern(1, 4 * MIB as usize)[new.len()..]);
    assert_eq!(v.read(f.ino, 0, 8 * MIB as u32).unwrap(), expect);
    assert_eq!(
        v.read(keep.ino, 0, MIB as u32).unwrap(),
        pattern(9, 300_000)
    );
    assert!(v.fsck().unwrap().is_clean());
    // Delete the big file: cleaning returns its space.
    v.unlink(ROOT_INO, b"f").unwrap();
    v.clean(0.5).unwrap();
    let after_delete = v.stored_bytes().unwrap();
    assert!(after_delete < 2 * MIB, "{after_delete}");
    drop(v);
    let v = open(&env, Arc::new(storage));
    assert_eq!(
        v.read(keep.ino, 0, MIB as u32).unwrap(),
        pattern(9, 300_000)
    );
    let r = v.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
}

#[test]
fn sparse_files_cost_no_space() {
    let env = env();
    let storage = MemStorage::new();
    let v = init(
        &env,
        Arc::new(storage.clone()) as Arc<dyn Storage>,
        &small_opts(),
    );
    let f = v.create(ROOT_INO, b"sparse", 0o644, 0, 0).unwrap();
    // 1 TiB file with two small islands of data.
    v.write(f.ino, 0, b"head").unwrap();
    v.write(f.ino, (1u64 << 40) - 4, b"tail").unwrap();
    v.commit().unwrap();
    let a = v.getattr(f.ino).unwrap();
    assert_eq!(a.inode.size, 1 << 40);
    assert_eq!(a.inode.blocks, 2);
    assert!(v.stored_bytes().unwrap() < 64 * 1024);
    assert_eq!(v.read(f.ino, 1 << 30, 4096).unwrap(), vec![0u8; 4096]);
    assert_eq!(v.read(f.ino, (1u64 << 40) - 4, 100).unwrap(), b"tail");
    // Punching a hole frees the block.
    v.fallocate(
        f.ino,
        0,
        4096,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    )
    .unwrap();
    assert_eq!(v.getattr(f.ino).unwrap().inode.blocks, 1);
    assert_eq!(v.read(f.ino, 0, 4).unwrap(), vec![0u8; 4]);
}

#[test]
fn full_store_gives_enospc_and_stays_consistent() {
    let env = env();
    let storage = MemStorage::new();
    let v = init(
        &env,
        Arc::new(storage.clone()) as Arc<dyn Storage>,
        &small_opts(),
    );
    let a = v.create(ROOT_INO, b"a", 0o644, 0, 0).unwrap();
    v.write(a.ino, 0, &pattern(1, 500_000)).unwrap();
    v.commit().unwrap();
    storage.set_capacity(Some(storage.used_bytes() + 5 * MIB));
    let b = v.create(ROOT_INO, b"b", 0o644, 0, 0).unwrap();
    let mut off = 0u64;
    let err = loop {
        let r = v
            .write(b.ino, off, &pattern(off, 256 * 1024))
            .and_then(|_| v.commit());
        match r {
            Ok(()) => off += 256 * 1024,
            Err(e) => break e,
        }
        assert!(off < 16 * MIB, "never ran out of space");
    };
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    assert!(err.to_string().contains("full"), "{err}");
    let committed_b = off;
    // A power cut now: the last commit is intact.
    let after = storage.reboot();
    after.set_capacity(None);
    let v2 = Volume::open(Arc::new(after), &env.kms, Default::default()).unwrap();
    assert!(v2.fsck().unwrap().is_clean());
    assert_eq!(v2.read(a.ino, 0, MIB as u32).unwrap(), pattern(1, 500_000));
    assert_eq!(v2.getattr(b.ino).unwrap().inode.size, committed_b);
    drop(v2);
    // The running volume recovers once space is freed: delete, clean, write.
    v.unlink(ROOT_INO, b"b").unwrap();
    v.commit().unwrap();
    v.clean(0.5).unwrap();
    let c = v.create(ROOT_INO, b"c", 0o644, 0, 0).unwrap();
    v.write(c.ino, 0, &pattern(3, 100_000)).unwrap();
    v.commit().unwrap();
    assert_eq!(v.read(c.ino, 0, MIB as u32).unwrap(), pattern(3, 100_000));
    assert!(v.fsck().unwrap().is_clean());
}

#[test]
fn large_reads_mix_holes_dirty_cached_and_stored_blocks() {
    let env = env();
    let storage = MemStorage::new();
    let v = init(
        &env,
        Arc::new(storage.clone()) as Arc<dyn Storage>,
        &small_opts(),
    );
    let f = v.create(ROOT_INO, b"mix", 0o644, 0, 0).unwrap();
    let mut model = vec![0u8; 3_000_000];
    let mut put = |v: &Volume, off: usize, data: Vec<u8>| {
        v.write(f.ino, off as u64, &data).unwrap();
        model[off..off + data.len()].copy_from_slice(&data);
    };
    put(&v, 0, pattern(1, 700_000));
    put(&v, 1_200_000, pattern(2, 1_000_000));
    put(&v, 2_999_000, pattern(3, 1_000)); // partial last block
    v.commit().unwrap();
    // Some blocks dirty again, some cached by small reads.
    put(&v, 300_001, pattern(4, 5_000));
    v.read(f.ino, 1_500_000, 100).unwrap();
    for (off, len) in [
        (0, 3_000_000),
        (1, 2_999_999),
        (4095, 1 << 20),
        (690_000, 600_000),
        (2_000_000, 1 << 20),
    ] {
        let got = v.read(f.ino, off as u64, len as u32).unwrap();
        let end = (off + len).min(model.len());
        assert!(got == model[off..end], "read at {off} of {len}");
    }
}

#[test]
fn cleaner_never_drops_blocks_a_concurrent_writer_is_recording() {
    // Whole blocks are appended before they are in the tree. Run the cleaner
    // exactly in that window (a hook in `write`): it must wait for the writer,
    // not delete the segment holding the not-yet-recorded blocks.
    let env = env();
    let storage = MemStorage::new();
    let v = Arc::new(init(
        &env,
        Arc::new(storage.clone()) as Arc<dyn Storage>,
        &small_opts(),
    ));
    let f = v.create(ROOT_INO, b"w", 0o644, 0, 0).unwrap();
    v.write(f.ino, 0, &pattern(1, 1536 * 1024)).unwrap();
    v.commit().unwrap();
    let cleaner_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (v2, done2) = (v.clone(), cleaner_done.clone());
    let handle = std::sync::Mutex::new(None);
    let handle = Arc::new(handle);
    let h2 = handle.clone();
    v.set_write_hook(Some(Arc::new(move || {
        let (v3, d3) = (v2.clone(), done2.clone());
        let t = std::thread::spawn(move || {
            v3.clean(0.99).unwrap();
            d3.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        // Give the cleaner every chance to run inside the window.
        let start = std::time::Instant::now();
        while !done2.load(std::sync::atomic::Ordering::SeqCst)
            && start.elapsed() < std::time::Duration::from_millis(300)
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        *h2.lock().unwrap() = Some(t);
    })));
    // 1.5 MiB of whole blocks: more than one 1 MiB segment.
    v.write(f.ino, 0, &pattern(2, 1536 * 1024)).unwrap();
    v.set_write_hook(None);
    handle.lock().unwrap().take().unwrap().join().unwrap();
    assert!(cleaner_done.load(std::sync::atomic::Ordering::SeqCst));
    v.commit().unwrap();
    assert_eq!(v.read(f.ino, 0, 2 << 20).unwrap(), pattern(2, 1536 * 1024));
    let r = v.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
    drop(v);
    let v = open(&env, Arc::new(storage));
    assert_eq!(v.read(f.ino, 0, 2 << 20).unwrap(), pattern(2, 1536 * 1024));
}

#[test]
fn truncate_and_punch_inside_holes_keep_them_holes() {
    let env = env();
    let storage = MemStorage::new();
    let v = init(
        &env,
        Arc::new(storage.clone()) as Arc<dyn Storage>,
        &small_opts(),
    );
    let f = v.create(ROOT_INO, b"s", 0o644, 0, 0).unwrap();
    v.write(f.ino, 10 << 20, b"end").unwrap();
    v.commit().unwrap();
    assert_eq!(v.getattr(f.ino).unwrap().inode.blocks, 1);
    // Shrink to a size inside a hole, punch an unaligned range in a hole.
    v.setattr(
        f.ino,
        &kmsfs::volume::SetAttr {
            size: Some((5 << 20) + 123),
            ..Default::default()
        },
    )
    .unwrap();
    v.fallocate(
        f.ino,
        1000,
        5000,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    )
    .unwrap();
    v.commit().unwrap();
    assert_eq!(v.getattr(f.ino).unwrap().inode.blocks, 0);
    assert_eq!(
        v.read(f.ino, 0, 6 << 20).unwrap(),
        vec![0u8; (5 << 20) + 123]
    );
}

#[test]
fn a_write_back_of_several_batches_that_runs_out_of_space_loses_nothing() {
    // 800 small files, each a partial block buffered in memory: about 8 MB to
    // write back, more than one batch of the write-back (4 MiB).
    let env = env();
    let storage = MemStorage::new();
    let v = init(
        &env,
        Arc::new(storage.clone()) as Arc<dyn Storage>,
        &Default::default(),
    );
    v.commit().unwrap();
    let files: Vec<(u64, Vec<u8>)> = (0..800u64)
        .map(|i| {
            let f = v
                .create(ROOT_INO, format!("f{i}").as_bytes(), 0o644, 0, 0)
                .unwrap();
            let data = pattern(i, 9_000 + (i as usize * 13) % 2_000);
            v.write(f.ino, 0, &data).unwrap();
            (f.ino, data)
        })
        .collect();
    let check = |v: &Volume| {
        for (ino, data) in &files {
            assert_eq!(&v.read(*ino, 0, 1 << 16).unwrap(), data, "inode {ino}");
        }
    };
    // Room for part of it only: the write-back fails part way.
    let before = storage.used_bytes();
    storage.set_capacity(Some(before + 6 * MIB));
    let err = v.commit().unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    assert!(
        storage.used_bytes() > before + MIB,
        "some of the write-back was appended before the store filled"
    );
    // Every byte is still there, recorded or still buffered.
    check(&v);
    // With room again the commit completes, and everything survives a restart.
    storage.set_capacity(None);
    v.commit().unwrap();
    check(&v);
    assert!(v.fsck().unwrap().is_clean());
    drop(v);
    let v2 = Volume::open(Arc::new(storage.reboot()), &env.kms, Default::default()).unwrap();
    check(&v2);
    assert!(v2.fsck().unwrap().is_clean());
}
