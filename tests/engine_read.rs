//! The read path (`Volume::read_into`, the FUSE layer's reused buffer): every
//! byte of the answer is written whatever the buffer held before (holes,
//! short blocks, fragments, buffered writes, large reads that go around the
//! cache and, on a real directory, around the segment files' page cache with
//! O_DIRECT), and a damaged block fails the read, never returns bytes.

mod engine_common;

use std::sync::Arc;

use engine_common::*;
use kmsfs::error::Error;
use kmsfs::format::SEGMENT_DIR;
use kmsfs::store::{FsStorage, MemStorage, Storage};
use kmsfs::volume::{CreateOptions, ROOT_INO, Volume};

const BS: usize = 65536;

/// A file of 40 blocks and a bit with every kind of piece a read meets:
/// stored blocks written as runs, a hole, a short last block, fragments over
/// stored blocks (committed), a small write still buffered, a whole block
/// still buffered. Returns the inode and the expected bytes.
fn mixed_file(v: &Volume) -> (u64, Vec<u8>) {
    let a = v.create(ROOT_INO, b"f", 0o644, 0, 0).unwrap();
    let len = 40 * BS + 1234;
    let mut model = vec![0u8; len];
    let put = |model: &mut Vec<u8>, off: usize, b: &[u8]| {
        v.write(a.ino, off as u64, b).unwrap();
        model[off..off + b.len()].copy_from_slice(b);
    };
    // Blocks 0..16 and 20..40 stored; 16..20 a hole; the short tail.
    put(&mut model, 0, &pattern(1, 16 * BS));
    put(&mut model, 20 * BS, &pattern(2, 20 * BS));
    put(&mut model, 40 * BS, &pattern(3, 1234));
    v.commit().unwrap();
    // Fragments over stored blocks 3 and 25, committed.
    put(&mut model, 3 * BS + 100, &pattern(4, 4096));
    put(&mut model, 25 * BS + 9000, &pattern(5, 300));
    v.commit().unwrap();
    // Still buffered: a small write into the hole, one into a stored block,
    // and a whole block over a stored one.
    put(&mut model, 17 * BS + 5, &pattern(6, 777));
    put(&mut model, 30 * BS + 60_000, &pattern(7, 100));
    put(&mut model, 33 * BS, &pattern(8, BS));
    (a.ino, model)
}

fn check_windows(v: &Volume, ino: u64, model: &[u8]) {
    let len = model.len();
    let windows: &[(usize, usize)] = &[
        (0, 1 << 20),
        (1 << 20, 1 << 20),
        (2 << 20, 1 << 20),
        (0, 4096),
        (3 * BS + 50, 8192),
        (15 * BS + 1, 6 * BS),
        (16 * BS, 4 * BS),
        (25 * BS, 128 << 10),
        (32 * BS, 3 * BS),
        (40 * BS - 10, 1 << 20),
        (len - 1, 4096),
        (len, 4096),
    ];
    let mut buf = vec![0u8; 1 << 20];
    for &(off, n) in windows {
        for fill in [0xAAu8, 0x00, 0xFF] {
            buf.fill(fill);
            let got = v.read_into(ino, off as u64, &mut buf[..n]).unwrap();
            let want = &model[off.min(len)..(off + n).min(len)];
            assert_eq!(got, want.len(), "length at {off}+{n}");
            assert!(
                buf[..got] == *want,
                "bytes at {off}+{n} (buffer held {fill:#x})"
            );
        }
        assert!(
            v.read(ino, off as u64, n as u32).unwrap() == model[off.min(len)..(off + n).min(len)]
        );
    }
}

/// The mixed file read through every window before the commit and again
/// after a reopen.
fn check_before_and_after_reopen(storage: Arc<dyn Storage>) {
    let env = env();
    let v = init(&env, storage.clone(), &CreateOptions::default());
    let (ino, model) = mixed_file(&v);
    check_windows(&v, ino, &model);
    v.commit().unwrap();
    drop(v);
    let v = open(&env, storage);
    check_windows(&v, ino, &model);
}

#[test]
fn read_into_a_used_buffer_writes_every_byte() {
    check_before_and_after_reopen(Arc::new(MemStorage::new()));
}

#[test]
fn reads_on_a_real_directory_match_the_written_bytes() {
    // FsStorage: large reads of whole blocks go through O_DIRECT (or the
    // buffered fallback where the file system refuses it), right after the
    // buffered appends and again after a reopen.
    let dir = tempfile::tempdir().unwrap();
    check_before_and_after_reopen(Arc::new(FsStorage::new(dir.path())));
}

#[test]
fn a_damaged_block_fails_a_large_read() {
    for real in [false, true] {
        let env = env();
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> = if real {
            Arc::new(FsStorage::new(dir.path()))
        } else {
            Arc::new(MemStorage::new())
        };
        let v = init(&env, storage.clone(), &CreateOptions::default());
        let a = v.create(ROOT_INO, b"big", 0o644, 0, 0).unwrap();
        let data = pattern(11, 16 * BS);
        v.write(a.ino, 0, &data).unwrap();
        v.commit().unwrap();
        drop(v);
        // The data run is the largest thing in the largest segment: flip a
        // byte in its middle.
        let seg = storage
            .list(SEGMENT_DIR)
            .unwrap()
            .into_iter()
            .map(|n| format!("{SEGMENT_DIR}/{n}"))
            .filter(|p| !p.contains("mirror") && !p.ends_with(".meta"))
            .max_by_key(|p| storage.len(p).unwrap())
            .unwrap();
        let mut bytes = storage.read(&seg).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        storage.write_file(&seg, &bytes).unwrap();
        let v = open(&env, storage);
        let mut buf = vec![0x55u8; 1 << 20];
        match v.read_into(a.ino, 0, &mut buf) {
            Err(Error::Integrity { .. }) => {}
            other => panic!("a damaged block read as {other:?} (real directory: {real})"),
        }
        match v.read(a.ino, 0, 1 << 20) {
            Err(Error::Integrity { .. }) => {}
            other => panic!("a damaged block read as {other:?} (real directory: {real})"),
        }
    }
}

/// On a real directory large reads go through one reused O_DIRECT buffer
/// per thread (a larger span through one of its own): whatever an earlier
/// read left in it, a read returns its own file's current bytes, a damaged
/// block fails (and leaves the next read right), and a rewritten file reads
/// as rewritten.
#[test]
fn large_reads_through_the_reused_direct_buffer_return_their_own_bytes() {
    let env1 = env();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FsStorage::new(dir.path()));
    let v = init(&env1, storage.clone(), &CreateOptions::default());
    let a = v.create(ROOT_INO, b"a", 0o644, 0, 0).unwrap();
    let b = v.create(ROOT_INO, b"b", 0o644, 0, 0).unwrap();
    // 64 blocks each, written whole: runs longer than the 2 MiB buffer.
    let da = pattern(21, 64 * BS);
    let db = pattern(22, 64 * BS);
    v.write(a.ino, 0, &da).unwrap();
    v.commit().unwrap();
    v.write(b.ino, 0, &db).unwrap();
    v.commit().unwrap();
    drop(v);
    let v = open(&env1, storage.clone());
    let mut buf = vec![0u8; 4 << 20];
    for (ino, want) in [(a.ino, &da), (b.ino, &db), (a.ino, &da)] {
        // 1 MiB reads (spans within the reused buffer) at every MiB, then
        // one 4 MiB read (a span larger than it).
        for m in 0..4usize {
            let got = v
                .read_into(ino, (m << 20) as u64, &mut buf[..1 << 20])
                .unwrap();
            assert_eq!(got, 1 << 20);
            assert!(
                buf[..1 << 20] == want[m << 20..(m + 1) << 20],
                "ino {ino} MiB {m}"
            );
        }
        buf.fill(0x33);
        assert_eq!(v.read_into(ino, 0, &mut buf).unwrap(), 4 << 20);
        assert!(buf == **want, "ino {ino}, one 4 MiB read");
    }
    // Rewritten: the read after the commit (and after a reopen) sees the
    // new bytes, not what the buffer held.
    let dn = pattern(23, 64 * BS);
    v.write(a.ino, 0, &dn).unwrap();
    v.commit().unwrap();
    for _ in 0..2 {
        for m in 0..4usize {
            v.read_into(a.ino, (m << 20) as u64, &mut buf[..1 << 20])
                .unwrap();
            assert!(
                buf[..1 << 20] == dn[m << 20..(m + 1) << 20],
                "rewritten, MiB {m}"
            );
        }
    }
    // A damaged block (in a second volume) fails its reads; reads of the
    // first volume on the same thread, between and after, stay right.
    let env2 = env();
    let dir2 = tempfile::tempdir().unwrap();
    let storage2: Arc<dyn Storage> = Arc::new(FsStorage::new(dir2.path()));
    let w = init(&env2, storage2.clone(), &CreateOptions::default());
    let c = w.create(ROOT_INO, b"c", 0o644, 0, 0).unwrap();
    let dc = pattern(24, 64 * BS);
    w.write(c.ino, 0, &dc).unwrap();
    w.commit().unwrap();
    drop(w);
    let seg = storage2
        .list(SEGMENT_DIR)
        .unwrap()
        .into_iter()
        .map(|n| format!("{SEGMENT_DIR}/{n}"))
        .filter(|p| !p.contains("mirror") && !p.ends_with(".meta"))
        .max_by_key(|p| storage2.len(p).unwrap())
        .unwrap();
    let mut bytes = storage2.read(&seg).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    storage2.write_file(&seg, &bytes).unwrap();
    let w = open(&env2, storage2);
    for _ in 0..2 {
        v.read_into(a.ino, 0, &mut buf[..1 << 20]).unwrap();
        assert!(buf[..1 << 20] == dn[..1 << 20]);
        let mut failed = 0;
        for m in 0..4usize {
            match w.read_into(c.ino, (m << 20) as u64, &mut buf[..1 << 20]) {
                Err(Error::Integrity { .. }) => failed += 1,
                Err(e) => panic!("unexpected error {e}"),
                Ok(_) => assert!(buf[..1 << 20] == dc[m << 20..(m + 1) << 20]),
            }
            v.read_into(b.ino, (m << 20) as u64, &mut buf[..1 << 20])
                .unwrap();
            assert!(buf[..1 << 20] == db[m << 20..(m + 1) << 20]);
        }
        assert_eq!(failed, 1, "one damaged block, one failed 1 MiB read");
        match w.read_into(c.ino, 0, &mut buf) {
            Err(Error::Integrity { .. }) => {}
            other => panic!("a 4 MiB read over damage read as {other:?}"),
        }
        assert_eq!(v.read_into(b.ino, 0, &mut buf).unwrap(), 4 << 20);
        assert!(buf == db);
    }
}
