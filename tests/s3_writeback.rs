//! The write-back journal under the engine (no FUSE), against a real
//! SeaweedFS on loopback (tests/common_s3): the journal's bound holds while
//! the uploader keeps up, and with the store down a commit that does not fit
//! waits, then fails clearly (bounded), losing nothing fsync'ed before; the
//! journal drains when the store is back and the volume closes.

mod common_s3;
mod engine_common;

use std::sync::Arc;

use common_s3::Weed;
use engine_common::*;
use kmsfs::store::{ObjectStorage, Storage};
use kmsfs::volume::{ROOT_INO, Volume};

fn write_file(v: &Volume, name: &str, data: &[u8]) -> u64 {
    let a = v.create(ROOT_INO, name.as_bytes(), 0o644, 0, 0).unwrap();
    v.write(a.ino, 0, data).unwrap();
    a.ino
}

fn journal_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("journal-")
        })
        .count()
}

#[test]
fn writeback_journal_bounded_backpressure_and_drain() {
    let mut w = Weed::start();
    w.bucket("vols");
    let env = env();
    let url = "s3://vols/bp";
    let cache = tempfile::tempdir().unwrap();
    let jdir = tempfile::tempdir().unwrap();
    drop(init(
        &env,
        Arc::new(w.storage(url, cache.path())),
        &small_opts(),
    ));
    let bound = 256u64 << 10;
    let mut cfg = w.config(url, cache.path());
    cfg.writeback = Some(jdir.path().to_path_buf());
    cfg.writeback_bytes = bound;
    let st = Arc::new(ObjectStorage::open(cfg).unwrap());
    let v = open(&env, st.clone());

    // 2 MiB in commits of 32 KiB: the journal never holds more than its
    // bound of entries not uploaded (plus the one entry that may wait).
    for i in 0..64u64 {
        write_file(&v, &format!("a{i}"), &pattern(i, 32 << 10));
        v.commit().unwrap();
    }
    let (_, _, peak) = st.writeback_pending().unwrap();
    assert!(peak <= bound + (64 << 10), "journal peak {peak}");

    // The store goes away (once it has everything): a small commit goes into
    // the journal; one that does not fit waits for the uploader, then fails
    // (a bounded wait).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while st.writeback_pending().unwrap().0 > 0 {
        assert!(std::time::Instant::now() < deadline, "never uploaded");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    w.kill();
    let kept = pattern(99, 100_000);
    let k = write_file(&v, "kept", &kept);
    v.commit().unwrap();
    write_file(&v, "big", &pattern(98, 400_000));
    let e = v.commit().unwrap_err();
    assert!(e.to_string().contains("is full"), "{e}");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    let (n, _, _) = st.writeback_pending().unwrap();
    assert!(n > 0, "the fsync'ed commit is pending in the journal");
    // Reads of this volume see what is only in the journal.
    assert_eq!(v.read(k, 0, kept.len() as u32).unwrap(), kept);

    // The store is back: closing drains the journal into it.
    assert!(w.spawn(), "SeaweedFS did not come back:\n{}", w.log());
    drop(v);
    drop(st);
    assert_eq!(journal_files(jdir.path()), 0, "the journal was not drained");
    let other = tempfile::tempdir().unwrap();
    let v = open(&env, Arc::new(w.storage(url, other.path())));
    let ino = v.lookup(ROOT_INO, b"kept").unwrap().ino;
    assert_eq!(v.read(ino, 0, kept.len() as u32).unwrap(), kept);
    assert!(v.lookup(ROOT_INO, b"a63").is_ok());
    assert!(
        v.lookup(ROOT_INO, b"big").is_err(),
        "a failed commit landed"
    );
    let st: Arc<dyn Storage> = v.storage().clone();
    assert!(!st.exists("kmsfs.writeback"), "marker left after a drain");
    assert!(v.fsck().unwrap().is_clean());
}
