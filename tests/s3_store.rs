//! The engine on a real S3-compatible object store (SeaweedFS on loopback,
//! started and stopped per test by tests/common_s3): a volume's life (write,
//! rename, snapshot, clone, fsck, reopen), range reads, tampering, two
//! writers (refusal, takeover, fencing), a reader on another "host" while
//! the writer writes and cleans, the store stopped mid-write, and the
//! bounded local cache.

mod common_s3;
mod engine_common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common_s3::Weed;
use engine_common::*;
use kmsfs::error::Error;
use kmsfs::store::{ObjectStorage, Storage};
use kmsfs::volume::{OpenOptions, ROOT_INO, Volume};

fn arc(s: ObjectStorage) -> Arc<dyn Storage> {
    Arc::new(s)
}

fn write_file(v: &Volume, parent: u64, name: &str, data: &[u8]) -> u64 {
    let a = v.create(parent, name.as_bytes(), 0o644, 0, 0).unwrap();
    let mut off = 0;
    for chunk in data.chunks(256 << 10) {
        v.write(a.ino, off, chunk).unwrap();
        off += chunk.len() as u64;
    }
    a.ino
}

fn read_all(v: &Volume, ino: u64) -> Vec<u8> {
    let size = v.getattr(ino).unwrap().inode.size;
    v.read(ino, 0, size as u32 + 1).unwrap()
}

#[test]
fn volume_life_on_the_object_store() {
    let w = Weed::start();
    w.bucket("vols");
    let env = env();
    let c1 = tempfile::tempdir().unwrap();
    let url = "s3://vols/team/a";
    let v = init(&env, arc(w.storage(url, c1.path())), &small_opts());
    let d = v.mkdir(ROOT_INO, b"dir", 0o755, 0, 0).unwrap();
    let big = pattern(1, 3 << 20);
    let small = pattern(2, 5000);
    write_file(&v, d.ino, "big", &big);
    let s = write_file(&v, ROOT_INO, "small", &small);
    v.fsync(s).unwrap();
    v.rename(ROOT_INO, b"small", d.ino, b"moved", Default::default())
        .unwrap();
    v.snapshot_create("snap1").unwrap();
    write_file(&v, ROOT_INO, "after", b"later");
    v.commit().unwrap();
    let before = dump(&v).unwrap();
    let snap_before = {
        let s = v.snapshot_list().unwrap();
        assert_eq!(s.len(), 1);
        s[0].name.clone()
    };
    drop(v);

    // Another "host": its own, empty cache.
    let c2 = tempfile::tempdir().unwrap();
    let st = w.storage(url, c2.path());
    let counters = st.remote_counters();
    let v = open(&env, arc(st));
    assert_eq!(dump(&v).unwrap(), before);
    assert_eq!(v.snapshot_list().unwrap()[0].name, snap_before);
    let r = v.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);

    // A 4 KiB read fetches a byte range, not the segment (1 MiB here).
    let moved = v.lookup(d.ino, b"moved").unwrap().ino;
    let after_open = counters.bytes_fetched.load(Ordering::Relaxed);
    let _ = v.read(moved, 0, 4096).unwrap();
    let fetched = counters.bytes_fetched.load(Ordering::Relaxed) - after_open;
    assert!(fetched < 64 << 10, "a 4 KiB read fetched {fetched} bytes");
    // A file read in order is fetched in large ranges (read-ahead), not one
    // request per block: 3 MiB of 4 KiB blocks is 768 records.
    let big_ino = v.lookup(d.ino, b"big").unwrap().ino;
    let gets = counters.gets.load(Ordering::Relaxed);
    assert_eq!(read_all(&v, big_ino), big);
    let used = counters.gets.load(Ordering::Relaxed) - gets;
    assert!(used < 100, "{used} GETs for a 3 MiB sequential read");

    // Reread by another process on this host (same cache directory): the
    // records come from the cache, not the network.
    let st3 = w.storage(url, c2.path());
    let counters3 = st3.remote_counters();
    let v3 = Volume::open(
        arc(st3),
        &env.kms,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let gets = counters3.gets.load(Ordering::Relaxed);
    let m3 = v3.lookup(d.ino, b"moved").unwrap().ino;
    assert_eq!(v3.read(m3, 0, 4096).unwrap(), &small[..4096]);
    assert_eq!(
        counters3.gets.load(Ordering::Relaxed),
        gets,
        "reread went to the store"
    );
    drop(v3);

    // Clone the snapshot into another prefix: the same files, its own id.
    let src = v.storage().clone();
    let dest = arc(w.storage("s3://vols/team/b", c2.path()));
    let d2 = dest.clone();
    let id = v
        .clone_snapshot("snap1", dest.clone(), &|name| {
            let data = src.read(name)?;
            d2.append(name, &data)?;
            d2.sync(name)
        })
        .unwrap();
    drop(v);
    assert_ne!(id, [0u8; 16]);
    let c = Volume::open(dest, &env.kms, OpenOptions::default()).unwrap();
    let cd = dump(&c).unwrap();
    assert!(cd.contains_key("/dir/big") && cd.contains_key("/dir/moved"));
    assert!(!cd.contains_key("/after"));
    assert!(c.fsck().unwrap().is_clean());
}

#[test]
fn tampered_or_swapped_segment_objects_are_integrity_errors() {
    let w = Weed::start();
    w.bucket("vols");
    let env = env();
    let cache = tempfile::tempdir().unwrap();
    let url = "s3://vols/t";
    let v = init(&env, arc(w.storage(url, cache.path())), &small_opts());
    let data = pattern(3, 200_000);
    let ino = write_file(&v, ROOT_INO, "f", &data);
    v.commit().unwrap();
    drop(v);

    // Flip one byte in the middle of every part of every segment (the
    // node mirrors stay intact: the tree still opens, the data does not).
    let raw = w.storage(url, tempfile::tempdir().unwrap().path());
    let mut flipped = 0;
    for seg in raw.list("seg").unwrap() {
        if !seg.ends_with(".seg") {
            continue;
        }
        for part in raw.list(&format!("seg/{seg}")).unwrap() {
            let part = format!("seg/{seg}/{part}");
            let mut b = raw.read(&part).unwrap();
            let i = b.len() / 2;
            b[i] ^= 0x40;
            raw.write_file(&part, &b).unwrap();
            flipped += 1;
        }
    }
    assert!(flipped > 0);

    let fresh = tempfile::tempdir().unwrap();
    let v = open(&env, arc(w.storage(url, fresh.path())));
    let e = match v.read(ino, 0, data.len() as u32) {
        Ok(got) => panic!(
            "tampered data read back ({} bytes, equal: {})",
            got.len(),
            got == data
        ),
        Err(e) => e,
    };
    assert!(matches!(e, Error::Integrity { .. }), "{e:?}");
    assert_eq!(e.errno(), libc::EIO);
    let r = v.fsck().unwrap();
    assert!(!r.is_clean());
}

#[test]
fn two_writers_refused_takeover_and_fencing() {
    let w = Weed::start();
    w.bucket("vols");
    let env = env();
    let url = "s3://vols/w";
    let (ca, cb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = init(&env, arc(w.storage(url, ca.path())), &small_opts());
    let kept = write_file(&a, ROOT_INO, "durable", b"reported durable by A");
    a.fsync(kept).unwrap();

    // A second writer elsewhere is refused while A's lease is live.
    let e = match Volume::open(
        arc(w.storage(url, cb.path())),
        &env.kms,
        OpenOptions::default(),
    ) {
        Ok(_) => panic!("a second writer was let in"),
        Err(e) => e,
    };
    assert!(matches!(e, Error::Locked(_)), "{e:?}");
    assert!(e.to_string().contains("--force-takeover"), "{e}");
    // Readers are welcome.
    let ro = Volume::open(
        arc(w.storage(url, cb.path())),
        &env.kms,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(ro.lookup(ROOT_INO, b"durable").is_ok());
    drop(ro);

    // --force-takeover: B writes; A is fenced and can commit nothing more.
    let mut cfg = w.config(url, cb.path());
    cfg.force_takeover = true;
    let b = open(&env, arc(ObjectStorage::open(cfg).unwrap()));
    write_file(&a, ROOT_INO, "late", b"A after the takeover");
    let e = a.commit().unwrap_err();
    assert!(
        e.to_string().contains("fenced") || e.to_string().contains("taken over"),
        "{e}"
    );
    assert!(a.commit().is_err(), "a fenced writer stays fenced");
    write_file(&b, ROOT_INO, "from-b", b"B");
    b.commit().unwrap();
    drop(a);
    drop(b);

    let v = open(&env, arc(w.storage(url, ca.path())));
    assert!(v.lookup(ROOT_INO, b"durable").is_ok());
    assert!(v.lookup(ROOT_INO, b"from-b").is_ok());
    assert!(v.lookup(ROOT_INO, b"late").is_err());
    drop(v);

    // A lease left by a writer that died expires, and is then taken over
    // without --force-takeover.
    let raw = w.storage(url, ca.path());
    let stale = format!(
        "kmsfs lease 1\nowner {}\nhost elsewhere\npid 4242\nexpires {}\n",
        "ab".repeat(16),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3
    );
    raw.write_file("kmsfs.lease", stale.as_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let v = loop {
        match Volume::open(
            arc(w.storage(url, ca.path())),
            &env.kms,
            OpenOptions::default(),
        ) {
            Ok(v) => break v,
            Err(Error::Locked(m)) => {
                assert!(m.contains("host elsewhere pid 4242"), "{m}");
                assert!(Instant::now() < deadline, "the stale lease never expired");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert!(v.lookup(ROOT_INO, b"from-b").is_ok());
}

#[test]
fn conditional_root_commit_one_winner() {
    // Below the lease: two storages that both believe they may write the
    // root slots; only the first conditional PUT wins.
    let w = Weed::start();
    w.bucket("vols");
    let c = tempfile::tempdir().unwrap();
    let s1 = w.storage("s3://vols/cas", c.path());
    let s2 = w.storage("s3://vols/cas", c.path());
    s1.replace_durably("r.tmp", "r", b"one").unwrap();
    assert_eq!(s2.read("r").unwrap(), b"one");
    assert_eq!(s1.read("r").unwrap(), b"one");
    s1.replace_durably("r.tmp", "r", b"two").unwrap();
    let e = s2.replace_durably("r.tmp", "r", b"three").unwrap_err();
    assert_eq!(e.1.kind(), std::io::ErrorKind::AlreadyExists, "{e:?}");
    // A name never seen is created only if absent.
    let s3 = w.storage("s3://vols/cas", c.path());
    assert!(s3.replace_durably("r.tmp", "r", b"four").is_err());
    assert_eq!(s3.read("r").unwrap(), b"two");
}

#[test]
fn reader_on_another_host_reads_a_snapshot_while_the_writer_writes_and_cleans() {
    let w = Weed::start();
    w.bucket("vols");
    let env = env();
    let url = "s3://vols/r";
    let (cw, cr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let v = init(&env, arc(w.storage(url, cw.path())), &small_opts());
    let mut files = Vec::new();
    for i in 0..6u64 {
        let data = pattern(10 + i, 300_000);
        write_file(&v, ROOT_INO, &format!("f{i}"), &data);
        files.push(data);
    }
    v.snapshot_create("s1").unwrap();
    v.commit().unwrap();

    let reader = Volume::open(
        arc(w.storage(url, cr.path())),
        &env.kms,
        OpenOptions {
            snapshot: Some("s1".into()),
            ..Default::default()
        },
    )
    .unwrap();
    // The writer overwrites everything, drops the snapshot and cleans: the
    // reader's pin keeps what it reads.
    for i in 0..6u64 {
        let ino = v.lookup(ROOT_INO, format!("f{i}").as_bytes()).unwrap().ino;
        v.write(ino, 0, &pattern(100 + i, 300_000)).unwrap();
    }
    v.commit().unwrap();
    v.snapshot_delete("s1").unwrap();
    v.commit().unwrap();
    let _ = v.clean(0.9).unwrap();
    for (i, data) in files.iter().enumerate() {
        let ino = reader
            .lookup(ROOT_INO, format!("f{i}").as_bytes())
            .unwrap()
            .ino;
        assert_eq!(
            &read_all(&reader, ino),
            data,
            "f{i} in the reader's snapshot"
        );
    }
    drop(reader);
    // With the reader gone, the cleaner reclaims the snapshot's segments.
    std::thread::sleep(Duration::from_millis(200));
    let st = v.clean(0.9).unwrap();
    assert!(st.segments_removed > 0, "{st:?}");
    let r = v.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
}

#[test]
fn store_stopped_mid_write_then_started_again() {
    let mut w = Weed::start();
    w.bucket("vols");
    let env = env();
    let url = "s3://vols/outage";
    let c = tempfile::tempdir().unwrap();
    let v = init(&env, arc(w.storage(url, c.path())), &small_opts());
    let kept = pattern(7, 500_000);
    let ino = write_file(&v, ROOT_INO, "kept", &kept);
    v.fsync(ino).unwrap();

    w.kill();
    let lost = write_file(&v, ROOT_INO, "during", &pattern(8, 400_000));
    let start = Instant::now();
    let e = v.fsync(lost).unwrap_err();
    // Bounded: the configured call limit (15 s) plus slack, never a hang.
    assert!(start.elapsed() < Duration::from_secs(120), "{e}");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    drop(v);

    assert!(w.spawn(), "SeaweedFS did not come back:\n{}", w.log());
    // The dead writer's lease may still be there: it expires.
    let deadline = Instant::now() + Duration::from_secs(60);
    let v = loop {
        match Volume::open(
            arc(w.storage(url, c.path())),
            &env.kms,
            OpenOptions::default(),
        ) {
            Ok(v) => break v,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let ino = v.lookup(ROOT_INO, b"kept").unwrap().ino;
    assert_eq!(read_all(&v, ino), kept);
    assert!(v.fsck().unwrap().is_clean());
}

#[test]
fn the_local_cache_stays_bounded() {
    let w = Weed::start();
    w.bucket("vols");
    let env = env();
    let url = "s3://vols/cache";
    let c = tempfile::tempdir().unwrap();
    let v = init(&env, arc(w.storage(url, c.path())), &small_opts());
    let mut files = Vec::new();
    for i in 0..8u64 {
        let data = pattern(20 + i, 1 << 20);
        files.push((write_file(&v, ROOT_INO, &format!("f{i}"), &data), data));
    }
    v.commit().unwrap();
    drop(v);
    let limit = 2u64 << 20;
    let c2 = tempfile::tempdir().unwrap();
    let mut cfg = w.config(url, c2.path());
    cfg.cache_bytes = limit;
    let st = Arc::new(ObjectStorage::open(cfg).unwrap());
    let v = open(&env, st.clone());
    for (ino, data) in &files {
        assert_eq!(&read_all(&v, *ino), data);
        assert!(st.cache().unwrap().used() <= limit);
    }
    let on_disk: u64 = std::fs::read_dir(c2.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(on_disk <= limit, "{on_disk}");
    assert!(on_disk > 0);
}
