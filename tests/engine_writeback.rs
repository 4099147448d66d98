//! The write-back that seals without the volume lock (`Volume::write_back`,
//! run by a writer past the dirty limit, and `write_back_new_data`, run by
//! the mount's committer once a quarter of the limit is buffered): requests
//! go on while it seals, and a block written, truncated or deleted meanwhile
//! keeps what the user did last, through commits, reopens, crashes and fsck.

mod engine_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use engine_common::*;
use kmsfs::store::{MemStorage, Storage};
use kmsfs::volume::{CreateOptions, ROOT_INO, SetAttr, Volume};

const MIB: u64 = 1 << 20;

fn new_volume(env: &Env, storage: &MemStorage) -> Arc<Volume> {
    let v = init(
        env,
        Arc::new(storage.clone()) as Arc<dyn Storage>,
        &CreateOptions::default(),
    );
    v.commit().unwrap();
    Arc::new(v)
}

fn reopen(env: &Env, storage: &MemStorage) -> Volume {
    open(env, Arc::new(storage.reboot()))
}

/// Runs `f` once, at the first batch sealed by the next write-back(s), on
/// the write-back's own thread.
fn once_in_write_back(v: &Arc<Volume>, f: impl Fn(&Volume) + Send + Sync + 'static) {
    let done = AtomicBool::new(false);
    let w = Arc::downgrade(v);
    v.set_write_back_hook(Some(Arc::new(move || {
        if !done.swap(true, Ordering::SeqCst)
            && let Some(v) = w.upgrade()
        {
            f(&v);
        }
    })));
}

/// `check` holds now, after a commit and after a reopen from what is
/// durable, and fsck finds both clean.
fn survives_commit_and_reopen(
    v: Arc<Volume>,
    env: &Env,
    storage: &MemStorage,
    check: impl Fn(&Volume),
) {
    check(&v);
    v.commit().unwrap();
    check(&v);
    let r = v.fsck().unwrap();
    assert!(r.is_clean(), "{r:?}");
    drop(v);
    let v2 = reopen(env, storage);
    check(&v2);
    assert!(v2.fsck().unwrap().is_clean());
}

fn file(v: &Volume, name: &str, data: &[u8]) -> u64 {
    let f = v.create(ROOT_INO, name.as_bytes(), 0o644, 0, 0).unwrap();
    if !data.is_empty() {
        v.write(f.ino, 0, data).unwrap();
    }
    f.ino
}

#[test]
fn reads_writes_and_creates_go_on_while_a_write_back_seals() {
    let env = env();
    let storage = MemStorage::new();
    let v = new_volume(&env, &storage);
    let a = file(&v, "a", &pattern(1, 30_000));
    let b = file(&v, "b", &pattern(2, 20_000));
    let (tx, rx) = mpsc::channel();
    once_in_write_back(&v, move |v| {
        // On another thread: with the volume lock held by this write-back,
        // these would wait for it, and it waits for them.
        let (tx2, rx2) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let r = (|| -> kmsfs::error::Result<Vec<u8>> {
                    let got = v.read(b, 0, 1 << 16)?;
                    v.write(a, 100, b"written meanwhile")?;
                    let c = v.create(ROOT_INO, b"c", 0o644, 0, 0)?;
                    v.write(c.ino, 0, b"created meanwhile")?;
                    Ok(got)
                })();
                let _ = tx2.send(r);
            });
            // A generous bound: only a deadlock comes near it.
            let r = rx2.recv_timeout(Duration::from_secs(120));
            let _ = tx.send(r.map_err(|e| e.to_string()));
        });
    });
    v.write_back().unwrap();
    v.set_write_back_hook(None);
    let got = rx.recv().unwrap().expect("requests during the write-back");
    assert_eq!(got.unwrap(), pattern(2, 20_000));
    let mut want_a = pattern(1, 30_000);
    want_a[100..117].copy_from_slice(b"written meanwhile");
    let check = |v: &Volume| {
        assert_eq!(v.read(a, 0, 1 << 16).unwrap(), want_a);
        assert_eq!(v.read(b, 0, 1 << 16).unwrap(), pattern(2, 20_000));
        let c = v.lookup(ROOT_INO, b"c").unwrap().ino;
        assert_eq!(v.read(c, 0, 100).unwrap(), b"created meanwhile");
    };
    survives_commit_and_reopen(v, &env, &storage, check);
}

#[test]
fn a_block_written_while_its_write_back_seals_keeps_the_newer_bytes() {
    let env = env();
    let storage = MemStorage::new();
    let v = new_volume(&env, &storage);
    // A new small file (sealed whole) and a small overwrite of a stored
    // block (sealed as a fragment): both are written again mid-write-back.
    let small = file(&v, "small", &pattern(3, 3_000));
    let big = file(&v, "big", &pattern(4, 200_000));
    v.commit().unwrap();
    v.write(big, 70_000, &[0xAB; 4096]).unwrap();
    assert!(v.dirty_bytes() > 0);
    once_in_write_back(&v, move |v| {
        v.write(small, 10, b"newer").unwrap();
        v.write(big, 70_000 + 8192, &[0xCD; 4096]).unwrap();
    });
    v.write_back().unwrap();
    v.set_write_back_hook(None);
    let mut want_small = pattern(3, 3_000);
    want_small[10..15].copy_from_slice(b"newer");
    let mut want_big = pattern(4, 200_000);
    want_big[70_000..74_096].fill(0xAB);
    want_big[78_192..82_288].fill(0xCD);
    let check = |v: &Volume| {
        assert_eq!(v.read(small, 0, 1 << 16).unwrap(), want_small);
        assert_eq!(v.read(big, 0, 1 << 18).unwrap(), want_big);
    };
    check(&v);
    // What was sealed before the second writes is not what the blocks hold
    // now: they stay buffered instead of being recorded.
    assert!(
        v.dirty_bytes() >= 5 + 4096,
        "blocks written during their write-back must stay buffered ({} bytes)",
        v.dirty_bytes()
    );
    // Power loss before a commit: the last commit, nothing newer, nothing torn.
    let crashed = open(&env, Arc::new(storage.reboot()));
    assert_eq!(crashed.read(small, 0, 1 << 16).unwrap(), pattern(3, 3_000));
    assert_eq!(crashed.read(big, 0, 1 << 18).unwrap(), pattern(4, 200_000));
    drop(crashed);
    v.commit().unwrap();
    assert_eq!(v.dirty_bytes(), 0);
    // The records sealed for nothing are garbage the cleaner may take.
    v.clean(0.99).unwrap();
    survives_commit_and_reopen(v, &env, &storage, check);
}

#[test]
fn a_file_truncated_or_deleted_while_its_write_back_seals_stays_so() {
    let env = env();
    let storage = MemStorage::new();
    let v = new_volume(&env, &storage);
    // Written in small pieces, so all its blocks are buffered (whole-block
    // writes are sealed at once, without the write-back).
    let cut = file(&v, "cut", &[]);
    let data = pattern(5, 150_000);
    for (k, c) in data.chunks(4_000).enumerate() {
        v.write(cut, (k * 4_000) as u64, c).unwrap();
    }
    let gone = file(&v, "gone", &pattern(6, 90_000));
    let kept = file(&v, "kept", &pattern(7, 40_000));
    once_in_write_back(&v, move |v| {
        // Shrink into the first block, then grow back: the old bytes past
        // the cut must read as zeros, whatever the write-back sealed.
        let s = SetAttr {
            size: Some(1_000),
            ..Default::default()
        };
        v.setattr(cut, &s).unwrap();
        let s = SetAttr {
            size: Some(150_000),
            ..Default::default()
        };
        v.setattr(cut, &s).unwrap();
        v.unlink(ROOT_INO, b"gone").unwrap();
    });
    v.write_back().unwrap();
    v.set_write_back_hook(None);
    let mut want_cut = pattern(5, 1_000);
    want_cut.resize(150_000, 0);
    let check = |v: &Volume| {
        assert_eq!(v.read(cut, 0, 1 << 18).unwrap(), want_cut);
        assert_eq!(v.read(kept, 0, 1 << 16).unwrap(), pattern(7, 40_000));
        assert!(v.lookup(ROOT_INO, b"gone").is_err());
        assert!(v.getattr(gone).is_err(), "the deleted file's inode is gone");
    };
    survives_commit_and_reopen(v, &env, &storage, check);
}

#[test]
fn a_write_back_that_runs_out_of_space_loses_nothing() {
    let env = env();
    let storage = MemStorage::new();
    let v = new_volume(&env, &storage);
    // About 8 MB in small files: more than one batch (4 MiB).
    let files: Vec<(u64, Vec<u8>)> = (0..800u64)
        .map(|i| {
            let data = pattern(i, 9_000 + (i as usize * 13) % 2_000);
            (file(&v, &format!("f{i}"), &data), data)
        })
        .collect();
    let check = |v: &Volume| {
        for (ino, data) in &files {
            assert_eq!(&v.read(*ino, 0, 1 << 16).unwrap(), data, "inode {ino}");
        }
    };
    let before = storage.used_bytes();
    storage.set_capacity(Some(before + 6 * MIB));
    let err = v.write_back().unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    assert!(v.dirty_bytes() > 0, "what did not fit stays buffered");
    check(&v);
    storage.set_capacity(None);
    v.write_back().unwrap();
    assert_eq!(v.dirty_bytes(), 0);
    survives_commit_and_reopen(v, &env, &storage, check);
}

#[test]
fn writers_racing_write_backs_and_commits_lose_nothing() {
    let env = env();
    let storage = MemStorage::new();
    let v = new_volume(&env, &storage);
    const WRITERS: u64 = 3;
    const SIZE: usize = 300_000;
    let inos: Vec<u64> = (0..WRITERS)
        .map(|w| file(&v, &format!("w{w}"), &[]))
        .collect();
    let stop = AtomicBool::new(false);
    let models: Vec<Vec<u8>> = std::thread::scope(|s| {
        let flusher = s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if n % 4 == 3 {
                    v.commit().unwrap();
                } else {
                    v.write_back().unwrap();
                }
                n += 1;
            }
        });
        let writers: Vec<_> = inos
            .iter()
            .enumerate()
            .map(|(w, &ino)| {
                let v = &v;
                s.spawn(move || {
                    let mut model = vec![0u8; SIZE];
                    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ w as u64;
                    for k in 0..1_500u64 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let off = (x % (SIZE as u64 - 9_000)) as usize;
                        let len = 1 + (x >> 40) as usize % 9_000;
                        let data = pattern(k * 31 + w as u64, len);
                        v.write(ino, off as u64, &data).unwrap();
                        model[off..off + len].copy_from_slice(&data);
                    }
                    // The file's size is the furthest byte written.
                    let size = v.getattr(ino).unwrap().inode.size as usize;
                    model.truncate(size);
                    model
                })
            })
            .collect();
        let models = writers.into_iter().map(|h| h.join().unwrap()).collect();
        stop.store(true, Ordering::SeqCst);
        flusher.join().unwrap();
        models
    });
    let check = |v: &Volume| {
        for (ino, model) in inos.iter().zip(&models) {
            assert_eq!(v.read(*ino, 0, SIZE as u32).unwrap(), *model, "inode {ino}");
        }
    };
    survives_commit_and_reopen(v, &env, &storage, check);
}

#[test]
fn the_background_write_back_seals_new_data_and_leaves_small_overwrites_buffered() {
    let env = env();
    let storage = MemStorage::new();
    let v = new_volume(&env, &storage);
    let old = file(&v, "old", &pattern(8, 256 * 1024));
    v.commit().unwrap();
    // Small overwrites of stored blocks: worth keeping buffered (later pages
    // of the same block join them in one fragment, or replace them).
    v.write(old, 4096, &[1; 4096]).unwrap();
    v.write(old, 70_000, &[2; 4096]).unwrap();
    let overwrites = v.dirty_bytes();
    assert_eq!(overwrites, 2 * 4096);
    // New data: small files, and an append in pieces past the old end.
    let news: Vec<(u64, Vec<u8>)> = (0..50u64)
        .map(|i| {
            let d = pattern(100 + i, 500 + 97 * i as usize);
            (file(&v, &format!("new{i}"), &d), d)
        })
        .collect();
    for k in 0..10u64 {
        v.write(old, 256 * 1024 + k * 3000, &[3; 3000]).unwrap();
    }
    assert!(v.dirty_bytes() > overwrites + 50 * 500);
    v.write_back_new_data().unwrap();
    assert_eq!(
        v.dirty_bytes(),
        overwrites,
        "new data sealed, the overwrites of stored blocks still buffered"
    );
    let mut want = pattern(8, 256 * 1024);
    want[4096..8192].fill(1);
    want[70_000..74_096].fill(2);
    want.resize(256 * 1024 + 30_000, 3);
    let check = |v: &Volume| {
        assert_eq!(v.read(old, 0, 1 << 20).unwrap(), want);
        for (ino, d) in &news {
            assert_eq!(&v.read(*ino, 0, 1 << 16).unwrap(), d);
        }
    };
    check(&v);
    v.write_back().unwrap();
    assert_eq!(v.dirty_bytes(), 0);
    survives_commit_and_reopen(v, &env, &storage, check);
}
