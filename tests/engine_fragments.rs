//! Small overwrites stored as fragments (volume version 2, docs/FORMAT.md
//! "Fragments"): what they cost in stored bytes, that reads see them in order
//! across merges, reopens, truncates, snapshots and cleans, and that a damaged
//! fragment is an integrity error, never wrong data.

mod engine_common;

use std::sync::Arc;

use engine_common::*;
use kmsfs::error::Error;
use kmsfs::format::{self, SEGMENT_DIR};
use kmsfs::store::{MemStorage, Storage};
use kmsfs::volume::{CreateOptions, OpenOptions, ROOT_INO, SetAttr, Volume};

const BS: usize = 65536;

fn default_opts() -> CreateOptions {
    CreateOptions::default()
}

/// Bytes in the segment directory (records and node mirrors).
fn stored_bytes(s: &MemStorage) -> u64 {
    s.list(SEGMENT_DIR)
        .unwrap()
        .iter()
        .map(|n| s.len(&format!("{SEGMENT_DIR}/{n}")).unwrap())
        .sum()
}

/// Each segment file's path and length.
fn segment_lens(s: &MemStorage) -> Vec<(String, u64)> {
    s.list(SEGMENT_DIR)
        .unwrap()
        .into_iter()
        .map(|n| {
            let p = format!("{SEGMENT_DIR}/{n}");
            let l = s.len(&p).unwrap();
            (p, l)
        })
        .collect()
}

/// Flips a bit in the first record appended to a segment since `lens` was
/// taken (in the segment being written, not a node mirror).
fn damage_first_appended(s: &MemStorage, lens: &[(String, u64)]) {
    let (seg, at) = lens
        .iter()
        .filter(|(p, _)| !p.contains("mirror") && !p.ends_with(".meta"))
        .find(|(p, l)| s.len(p).unwrap() > *l)
        .cloned()
        .expect("a segment grew");
    let mut bytes = s.read(&seg).unwrap();
    bytes[at as usize + 200] ^= 0x40;
    s.write_file(&seg, &bytes).unwrap();
}

fn new_file(v: &Volume, name: &[u8], len: usize, seed: u64) -> (u64, Vec<u8>) {
    let a = v.create(ROOT_INO, name, 0o644, 0, 0).unwrap();
    let data = pattern(seed, len);
    v.write(a.ino, 0, &data).unwrap();
    v.commit().unwrap();
    (a.ino, data)
}

fn overwrite(v: &Volume, model: &mut [u8], ino: u64, off: usize, bytes: &[u8]) {
    v.write(ino, off as u64, bytes).unwrap();
    model[off..off + bytes.len()].copy_from_slice(bytes);
}

fn read_all(v: &Volume, ino: u64, len: usize) -> Vec<u8> {
    v.read(ino, 0, len as u32 + 1).unwrap()
}

#[test]
fn the_default_block_size_makes_version_2_volumes() {
    let env = env();
    let s = MemStorage::new();
    let v = init(&env, Arc::new(s.clone()), &default_opts());
    assert_eq!(v.header().version, format::VOLUME_VERSION);
    assert_eq!(v.header().block_size as usize, BS);
}

#[test]
fn a_small_overwrite_stores_its_bytes_not_the_block() {
    let env = env();
    let s = MemStorage::new();
    let v = init(&env, Arc::new(s.clone()), &default_opts());
    let (ino, mut model) = new_file(&v, b"f", 16 * BS, 1);
    // Sixteen 4 KiB overwrites, one in each block, then a commit.
    let before = stored_bytes(&s);
    for b in 0..16 {
        overwrite(
            &v,
            &mut model,
            ino,
            b * BS + 12_288,
            &pattern(100 + b as u64, 4096),
        );
    }
    v.commit().unwrap();
    let grew = stored_bytes(&s) - before;
    // Whole blocks would be 16 x 64 KiB = 1 MiB of records; fragments are
    // 16 x (4 KiB + record overhead), plus the commit's tree nodes.
    assert!(
        grew < 256 << 10,
        "16 small overwrites stored {grew} bytes (whole blocks: {})",
        16 * BS
    );
    assert_eq!(read_all(&v, ino, model.len()), model);
    assert!(v.fsck().unwrap().is_clean());
}

#[test]
fn fragments_read_in_order_through_merges_and_reopens() {
    let env = env();
    let s = MemStorage::new();
    let storage: Arc<dyn Storage> = Arc::new(s.clone());
    let v = init(&env, storage.clone(), &default_opts());
    let (ino, mut model) = new_file(&v, b"f", 3 * BS + 1000, 2);
    // Overlapping small writes into one block, a commit after each: fragments
    // pile up, overlap (the newest wins) and get merged past the limit.
    for i in 0..40u64 {
        let off = BS + ((i * 1777) % (BS as u64 - 3000)) as usize;
        let len = 100 + (i as usize * 37) % 2500;
        overwrite(&v, &mut model, ino, off, &pattern(200 + i, len));
        if i % 3 == 0 {
            // Two writes into the same block before a commit: one piece each or merged.
            overwrite(&v, &mut model, ino, off + len + 10, &pattern(300 + i, 50));
        }
        v.commit().unwrap();
        assert_eq!(read_all(&v, ino, model.len()), model, "after write {i}");
        // Unaligned reads that start and end inside fragments.
        let got = v.read(ino, (off - 7) as u64, 4000).unwrap();
        assert_eq!(
            got,
            model[off - 7..off - 7 + 4000],
            "window after write {i}"
        );
    }
    // The short last block takes fragments too.
    let tail = 3 * BS + 200;
    overwrite(&v, &mut model, ino, tail, &pattern(9, 300));
    v.commit().unwrap();
    assert!(v.fsck().unwrap().is_clean());
    drop(v);
    let v = open(&env, storage.clone());
    assert_eq!(read_all(&v, ino, model.len()), model, "after reopen");
    assert!(v.fsck().unwrap().is_clean());
}

#[test]
fn page_overwrites_replace_their_own_fragments_instead_of_merging() {
    let env = env();
    let s = MemStorage::new();
    let v = init(&env, Arc::new(s.clone()), &default_opts());
    let (ino, mut model) = new_file(&v, b"f", 2 * BS, 5);
    let pages = BS / 4096;
    let before = stored_bytes(&s);
    // Every 4 KiB page of block 1 overwritten four times, in a shuffled order,
    // a commit (write-back) after each write.
    let mut order: Vec<usize> = (0..4 * pages).map(|i| i % pages).collect();
    let mut r = 77u64;
    for i in (1..order.len()).rev() {
        r = r
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        order.swap(i, (r >> 33) as usize % (i + 1));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, &p) in order.iter().enumerate() {
        overwrite(
            &v,
            &mut model,
            ino,
            BS + p * 4096,
            &pattern(500 + i as u64, 4096),
        );
        v.commit().unwrap();
        seen.insert(p);
        // One live fragment per page written so far: a rewrite of a page
        // replaces its fragment, so the block never reaches a merge.
        assert_eq!(
            v.fragment_count(ino, 1).unwrap(),
            seen.len(),
            "after write {i}"
        );
        assert_eq!(
            v.read(ino, BS as u64, BS as u32).unwrap(),
            model[BS..2 * BS]
        );
    }
    assert_eq!(v.fragment_count(ino, 0).unwrap(), 0);
    // 64 records of 4 KiB and the commits' tree nodes (a bound on growth; the
    // fragment counts above are what shows that no merge happened).
    let grew = stored_bytes(&s) - before;
    let records = (4 * pages * (4096 + 64)) as u64;
    assert!(
        grew < records + (4 * pages) as u64 * 8192,
        "64 page writes stored {grew} bytes"
    );
    assert_eq!(read_all(&v, ino, model.len()), model);
    assert!(v.fsck().unwrap().is_clean());
    // The idle merge folds the sixteen fragments into one block.
    assert_eq!(v.merge_idle_fragments(256).unwrap(), 1);
    assert_eq!(v.fragment_count(ino, 1).unwrap(), 0);
    assert_eq!(read_all(&v, ino, model.len()), model);
}

#[test]
fn a_merge_of_a_block_its_fragments_cover_does_not_read_the_stored_block() {
    let env = env();
    let s = MemStorage::new();
    let storage: Arc<dyn Storage> = Arc::new(s.clone());
    let v = init(&env, storage.clone(), &default_opts());
    // Something written first, so that the file's blocks go into a segment
    // that exists now (and are the first bytes it gains).
    new_file(&v, b"first", 4096, 30);
    let lens = segment_lens(&s);
    let (ino, mut model) = new_file(&v, b"f", 2 * BS, 31);
    // The first half of every page of block 0, a fragment each.
    for k in 0..BS / 4096 {
        overwrite(
            &v,
            &mut model,
            ino,
            k * 4096,
            &pattern(600 + k as u64, 2048),
        );
        v.commit().unwrap();
    }
    assert_eq!(v.fragment_count(ino, 0).unwrap(), BS / 4096);
    drop(v);
    // Damage block 0's stored record: the first thing the file's write appended.
    damage_first_appended(&s, &lens);
    let v = open(&env, storage.clone());
    match v.read(ino, 0, BS as u32) {
        Err(Error::Integrity { .. }) => {}
        other => panic!("block 0 with a damaged record read as {other:?}"),
    }
    // The second halves in one write-back: too many fragments, so the block is
    // merged; the fragments and the new bytes cover all of it, so the damaged
    // record under them is never read and the merge succeeds.
    for k in 0..BS / 4096 {
        overwrite(
            &v,
            &mut model,
            ino,
            k * 4096 + 2048,
            &pattern(700 + k as u64, 2048),
        );
    }
    v.commit().unwrap();
    assert_eq!(v.fragment_count(ino, 0).unwrap(), 0);
    assert_eq!(read_all(&v, ino, model.len()), model);
    assert!(v.fsck().unwrap().is_clean());
    drop(v);
    let v = open(&env, storage);
    assert_eq!(read_all(&v, ino, model.len()), model, "after reopen");
}

#[test]
fn buffered_small_writes_read_back_before_the_write_back() {
    let env = env();
    let s = MemStorage::new();
    let v = init(&env, Arc::new(s.clone()), &default_opts());
    let (ino, mut model) = new_file(&v, b"f", 2 * BS, 3);
    overwrite(&v, &mut model, ino, 5000, &pattern(4, 3000));
    v.commit().unwrap(); // a fragment under the buffered writes below
    overwrite(&v, &mut model, ino, 6000, &pattern(5, 100));
    overwrite(&v, &mut model, ino, 60_000, &pattern(6, 9000)); // spans two blocks
    assert_eq!(read_all(&v, ino, model.len()), model);
    assert_eq!(v.read(ino, 5990, 20).unwrap(), model[5990..6010]);
    // Covering a whole block piece by piece makes it a whole block again.
    for k in 0..16 {
        overwrite(&v, &mut model, ino, k * 4096, &pattern(50 + k as u64, 4096));
    }
    v.commit().unwrap();
    assert_eq!(read_all(&v, ino, model.len()), model);
    assert!(v.fsck().unwrap().is_clean());
}

#[test]
fn truncate_punch_and_extend_drop_or_keep_fragments_correctly() {
    let env = env();
    let s = MemStorage::new();
    let storage: Arc<dyn Storage> = Arc::new(s.clone());
    let v = init(&env, storage.clone(), &default_opts());
    let (ino, mut model) = new_file(&v, b"f", 4 * BS, 7);
    for b in 0..4 {
        overwrite(
            &v,
            &mut model,
            ino,
            b * BS + 1000,
            &pattern(70 + b as u64, 2000),
        );
    }
    v.commit().unwrap();
    // Truncate into block 2, after its fragment: the fragment stays inside.
    let size = 2 * BS + 1500;
    v.setattr(
        ino,
        &SetAttr {
            size: Some(size as u64),
            ..Default::default()
        },
    )
    .unwrap();
    model.truncate(size);
    // Extending again reads zeros, not the old bytes or the old fragments.
    v.setattr(
        ino,
        &SetAttr {
            size: Some(4 * BS as u64),
            ..Default::default()
        },
    )
    .unwrap();
    model.resize(4 * BS, 0);
    v.commit().unwrap();
    assert_eq!(read_all(&v, ino, model.len()), model);
    // Punch block 1 whole, and part of block 0 across its fragment.
    v.fallocate(
        ino,
        1500,
        2 * BS as u64 - 1500,
        kmsfs::sys::FALLOC_FL_PUNCH_HOLE | kmsfs::sys::FALLOC_FL_KEEP_SIZE,
    )
    .unwrap();
    model[1500..2 * BS].fill(0);
    v.commit().unwrap();
    assert_eq!(read_all(&v, ino, model.len()), model);
    let r = v.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
    drop(v);
    let v = open(&env, storage);
    assert_eq!(read_all(&v, ino, model.len()), model);
}

#[test]
fn snapshots_and_the_cleaner_keep_each_view() {
    let env = env();
    let s = MemStorage::new();
    let storage: Arc<dyn Storage> = Arc::new(s.clone());
    let v = init(&env, storage.clone(), &default_opts());
    let (ino, mut model) = new_file(&v, b"f", 8 * BS, 11);
    for b in 0..8 {
        overwrite(
            &v,
            &mut model,
            ino,
            b * BS + 4096,
            &pattern(110 + b as u64, 4096),
        );
    }
    v.commit().unwrap();
    let old = model.clone();
    v.snapshot_create("s1").unwrap();
    for b in 0..8 {
        overwrite(
            &v,
            &mut model,
            ino,
            b * BS + 20_000,
            &pattern(120 + b as u64, 3000),
        );
    }
    // Churn another file so the cleaner has segments to move.
    let (junk, _) = new_file(&v, b"junk", 40 * BS, 12);
    v.commit().unwrap();
    v.unlink(ROOT_INO, b"junk").unwrap();
    let _ = junk;
    v.commit().unwrap();
    let stats = v.clean(1.0).unwrap();
    v.commit().unwrap();
    assert!(
        stats.segments_removed > 0 || stats.blocks_moved > 0,
        "{stats:?}"
    );
    assert_eq!(read_all(&v, ino, model.len()), model);
    let r = v.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
    drop(v);
    let snap = Volume::open(
        storage.clone(),
        &env.kms,
        OpenOptions {
            read_only: true,
            snapshot: Some("s1".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(read_all(&snap, ino, old.len()), old, "snapshot view");
    drop(snap);
    let v = open(&env, storage);
    assert_eq!(read_all(&v, ino, model.len()), model, "live view");
}

#[test]
fn a_damaged_fragment_is_an_integrity_error() {
    let env = env();
    let s = MemStorage::new();
    let storage: Arc<dyn Storage> = Arc::new(s.clone());
    let v = init(&env, storage.clone(), &default_opts());
    let (ino, mut model) = new_file(&v, b"f", 2 * BS, 21);
    let lens = segment_lens(&s);
    overwrite(&v, &mut model, ino, 30_000, &pattern(22, 4096));
    v.commit().unwrap();
    drop(v);
    // The fragment's record is the first thing appended after the last commit,
    // in the segment being written (not a node mirror).
    damage_first_appended(&s, &lens);
    let v = open(&env, storage);
    match v.read(ino, 0, 2 * BS as u32) {
        Err(Error::Integrity { .. }) => {}
        other => panic!("a damaged fragment read as {other:?}"),
    }
    // The block without the fragment still reads.
    assert_eq!(v.read(ino, BS as u64, BS as u32).unwrap(), model[BS..]);
    let r = v.fsck().unwrap();
    assert!(
        r.errors.iter().any(|e| e.contains("fragment")),
        "fsck: {:?}",
        r.errors
    );
}

/// The idle merge (what a quiet mount runs) folds fragmented blocks into whole
/// ones: the data, the file's times and block count, and a snapshot taken
/// before stay as they were; a second pass finds nothing; a reopened volume
/// learns of fragmented blocks when it reads them.
#[test]
fn the_idle_merge_folds_fragments_into_blocks_and_changes_nothing_else() {
    let env = env();
    let s = MemStorage::new();
    let storage: Arc<dyn Storage> = Arc::new(s.clone());
    let v = init(&env, storage.clone(), &default_opts());
    // The last block is short: the merge must keep the file's size.
    let (ino, mut model) = new_file(&v, b"f", 6 * BS + 5000, 21);
    for b in 0..7 {
        for k in 0..3 {
            overwrite(
                &v,
                &mut model,
                ino,
                b * BS + k * 1500,
                &pattern(200 + (b * 3 + k) as u64, 1000),
            );
            v.commit().unwrap();
        }
    }
    assert_eq!(v.fragmented_blocks(ino).unwrap(), 7);
    v.snapshot_create("before").unwrap();
    let attr = v.getattr(ino).unwrap();
    assert_eq!(v.merge_idle_fragments(3).unwrap(), 3, "a batch is bounded");
    assert_eq!(v.fragmented_blocks(ino).unwrap(), 4);
    assert_eq!(v.merge_idle_fragments(100).unwrap(), 4);
    assert_eq!(v.fragmented_blocks(ino).unwrap(), 0);
    assert_eq!(v.merge_idle_fragments(100).unwrap(), 0, "nothing left");
    let after = v.getattr(ino).unwrap();
    assert_eq!(after.inode.size, attr.inode.size);
    assert_eq!(after.inode.mtime, attr.inode.mtime, "mtime kept");
    assert_eq!(after.inode.ctime, attr.inode.ctime, "ctime kept");
    assert_eq!(after.inode.blocks, attr.inode.blocks);
    assert_eq!(read_all(&v, ino, model.len()), model);
    let r = v.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
    drop(v);
    // Durable: the merge committed.
    let v = open(&env, storage.clone());
    assert_eq!(read_all(&v, ino, model.len()), model, "after reopen");
    assert_eq!(v.fragmented_blocks(ino).unwrap(), 0);
    drop(v);
    let snap = Volume::open(
        storage.clone(),
        &env.kms,
        OpenOptions {
            read_only: true,
            snapshot: Some("before".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(read_all(&snap, ino, model.len()), model, "snapshot view");
    assert_eq!(
        snap.fragmented_blocks(ino).unwrap(),
        7,
        "snapshot unchanged"
    );
    assert_eq!(snap.merge_idle_fragments(100).unwrap(), 0, "read-only");
    drop(snap);

    // A reopened volume knows of no fragmented block until it reads one.
    let v = open(&env, storage.clone());
    overwrite(&v, &mut model, ino, 2 * BS + 100, &pattern(300, 2000));
    v.commit().unwrap();
    drop(v);
    let v = open(&env, storage);
    assert_eq!(v.fragmented_blocks(ino).unwrap(), 1);
    assert_eq!(v.merge_idle_fragments(100).unwrap(), 0, "not seen yet");
    assert_eq!(read_all(&v, ino, model.len()), model);
    assert_eq!(v.merge_idle_fragments(100).unwrap(), 1, "seen by the read");
    assert_eq!(v.fragmented_blocks(ino).unwrap(), 0);
    assert_eq!(read_all(&v, ino, model.len()), model);
}

/// A block with buffered writes is left to its own write-back: the merge
/// never loses or reorders what was written after the fragments.
#[test]
fn the_idle_merge_leaves_buffered_writes_to_their_write_back() {
    let env = env();
    let s = MemStorage::new();
    let v = init(&env, Arc::new(s.clone()), &default_opts());
    let (ino, mut model) = new_file(&v, b"f", 2 * BS, 31);
    overwrite(&v, &mut model, ino, 100, &pattern(1, 500));
    overwrite(&v, &mut model, ino, BS + 100, &pattern(2, 500));
    v.commit().unwrap();
    assert_eq!(v.fragmented_blocks(ino).unwrap(), 2);
    // Block 0 gets a new buffered write over its fragment, not yet flushed.
    overwrite(&v, &mut model, ino, 300, &pattern(3, 100));
    assert_eq!(v.merge_idle_fragments(100).unwrap(), 1, "block 1 only");
    assert_eq!(read_all(&v, ino, model.len()), model);
    let r = v.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
}
