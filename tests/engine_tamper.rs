//! Tamper tests: every kind of modification of the backing store yields a clear
//! integrity error for what it affects (EIO), never wrong plaintext, and fsck
//! names it. Plus the ciphertext test: no known plaintext string appears in the
//! backing directory.

mod engine_common;

use std::sync::Arc;

use engine_common::*;
use kmsfs::format;
use kmsfs::store::{FsStorage, MemStorage, Storage};
use kmsfs::volume::{ROOT_INO, Volume};

struct Fixture {
    env: Env,
    base: MemStorage,
    reference: Dump,
    /// (path, ino, contents) of each regular file.
    files: Vec<(String, u64, Vec<u8>)>,
}

fn fixture() -> Fixture {
    let env = env();
    let base = MemStorage::new();
    let v = init(
        &env,
        Arc::new(base.clone()) as Arc<dyn Storage>,
        &small_opts(),
    );
    let d = v.mkdir(ROOT_INO, b"dir", 0o755, 0, 0).unwrap();
    let mut files = Vec::new();
    for (i, (parent, name, len)) in [
        (ROOT_INO, "small", 100usize),
        (ROOT_INO, "medium", 40_000),
        (d.ino, "large", 1_500_000),
        (d.ino, "other", 600_000),
        (d.ino, "exact", 8192),
    ]
    .into_iter()
    .enumerate()
    {
        let a = v.create(parent, name.as_bytes(), 0o644, 0, 0).unwrap();
        let data = pattern(i as u64 + 1, len);
        v.write(a.ino, 0, &data).unwrap();
        let path = if parent == ROOT_INO {
            format!("/{name}")
        } else {
            format!("/dir/{name}")
        };
        files.push((path, a.ino, data));
    }
    v.setxattr(files[0].1, b"user.big", &pattern(99, 5000), 0)
        .unwrap();
    v.setxattr(files[1].1, b"user.small", b"v", 0).unwrap();
    v.symlink(ROOT_INO, b"sl", b"dir/large", 0, 0).unwrap();
    v.commit().unwrap();
    // Move everything out of segments with dead records, so that (nearly)
    // every byte of the store is live and a flip anywhere must matter.
    v.clean(1.01).unwrap();
    // The segment being written is never cleaned: reopen (new segment) and clean again.
    drop(v);
    let v = open(&env, Arc::new(base.clone()));
    v.clean(1.01).unwrap();
    let reference = dump(&v).unwrap();
    drop(v);
    Fixture {
        env,
        base,
        reference,
        files,
    }
}

/// Opens a tampered copy; checks that nothing reads as wrong plaintext.
/// Returns (opened, paths that failed with EIO, fsck errors).
fn examine(fx: &Fixture, s: MemStorage) -> (bool, Vec<String>, Vec<String>) {
    let v = match Volume::open(Arc::new(s), &fx.env.kms, Default::default()) {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                matches!(e.errno(), libc::EIO | libc::EACCES),
                "open failed with an unexpected error: {msg}"
            );
            assert!(msg.len() > 20, "unclear message: {msg}");
            return (false, vec![], vec![msg]);
        }
        Ok(v) => v,
    };
    let mut failed = Vec::new();
    for (path, ino, data) in &fx.files {
        match v.read(*ino, 0, 4 << 20) {
            Ok(got) => assert!(&got == data, "{path}: wrong plaintext returned"),
            Err(e) => {
                assert_eq!(e.errno(), libc::EIO, "{path}: {e}");
                failed.push(path.clone());
            }
        }
    }
    match dump(&v) {
        Ok(d) => assert_eq!(
            d, fx.reference,
            "metadata read back differently without an error"
        ),
        Err(e) => {
            assert_eq!(e.errno(), libc::EIO, "{e}");
            failed.push(format!("metadata: {e}"));
        }
    }
    let report = v.fsck().unwrap();
    (true, failed, report.errors)
}

#[test]
fn flipped_bytes_anywhere_are_detected() {
    let fx = fixture();
    let mut detected = 0;
    let mut flips = 0;
    // Node mirrors hold, besides the live nodes, every superseded version of
    // them (dead, unreadable by anything): flip inside the live records there,
    // three places each, plus the header.
    let live_nodes = {
        let v = open(&fx.env, Arc::new(fx.base.reboot()));
        let p = v.node_pointers().unwrap();
        drop(v);
        p
    };
    let positions = |name: &str, len: usize| -> Vec<usize> {
        if !name.ends_with(".meta") {
            let step = (len / 150).max(1);
            return (0..len).step_by(step).chain([len - 1]).collect();
        }
        let bytes = fx.base.with_file(name, |d| d.clone()).unwrap();
        let mut out = vec![0, 8, 30];
        for p in &live_nodes {
            if let Some(at) = bytes.windows(16).position(|w| w == p.block_id) {
                let start = at - 5;
                let end = start + p.len as usize;
                out.extend([start, start + 4, at, (start + end) / 2, end - 1]);
            }
        }
        out
    };
    let mirrored_live = fx
        .base
        .names()
        .iter()
        .filter(|n| n.ends_with(".meta"))
        .map(|n| positions(n, 0).len() - 3)
        .sum::<usize>();
    assert!(
        mirrored_live >= live_nodes.len() * 5,
        "not every live node has a copy in a mirror"
    );
    for name in fx.base.names() {
        if name == format::LOCK_FILE {
            continue;
        }
        let len = fx.base.len(&name).unwrap() as usize;
        for pos in positions(&name, len) {
            let s = fx.base.reboot();
            s.with_file(&name, |d| d[pos] ^= 0x40).unwrap();
            flips += 1;
            // A read-only open repairs nothing: its fsck sees the damage as it is.
            let ro_errors = match Volume::open(
                Arc::new(s.clone()),
                &fx.env.kms,
                kmsfs::volume::OpenOptions {
                    read_only: true,
                    ..Default::default()
                },
            ) {
                Ok(v) => v.fsck().unwrap().errors,
                Err(e) => vec![e.to_string()],
            };
            let (opened, failed, fsck) = examine(&fx, s);
            if !ro_errors.is_empty() {
                detected += 1;
            } else if !opened || !failed.is_empty() {
                // Something was affected: fsck (or open) must say so.
                assert!(
                    !fsck.is_empty(),
                    "{name}@{pos}: reads failed but fsck is clean"
                );
                detected += 1;
            } else if !fsck.is_empty() {
                detected += 1;
            } else if std::env::var_os("KMSFS_DEBUG_TAMPER").is_some() {
                eprintln!("undetected: {name}@{pos} of {len}");
            }
        }
    }
    // Flips in dead space (e.g. old record versions) may affect nothing; nearly
    // every other byte is live here.
    // Every flip was checked for wrong plaintext above. A few may land in dead
    // records (superseded copies of tree nodes that no root references), which
    // affect nothing and so cannot be reported; everything else must be.
    assert!(
        detected * 100 >= flips * 98,
        "{detected} of {flips} flips detected"
    );
}

fn largest_segment(s: &MemStorage) -> String {
    s.names()
        .into_iter()
        .filter(|n| n.starts_with("seg/") && n.ends_with(".seg"))
        .max_by_key(|n| s.len(n).unwrap())
        .unwrap()
}

#[test]
fn truncated_segment_gives_eio_for_affected_files_only() {
    let fx = fixture();
    let s = fx.base.reboot();
    let segs: Vec<String> = s
        .names()
        .into_iter()
        .filter(|n| n.starts_with("seg/") && n.ends_with(".seg"))
        .collect();
    assert!(segs.len() >= 2, "{segs:?}");
    // Cut the segment holding most data in half.
    let seg = largest_segment(&s);
    s.with_file(&seg, |d| d.truncate(d.len() / 2)).unwrap();
    let (opened, failed, fsck) = examine(&fx, s);
    assert!(opened);
    assert!(!failed.is_empty(), "truncation went unnoticed");
    assert!(
        failed.len() < fx.files.len() + 1,
        "every file failed: {failed:?}"
    );
    assert!(fsck.iter().any(|e| e.contains("truncated")), "{fsck:?}");
    for f in failed.iter().filter(|f| f.starts_with('/')) {
        assert!(
            fsck.iter().any(|e| e.contains(f.as_str())),
            "fsck does not name {f}: {fsck:?}"
        );
    }
}

/// Sealed records of a segment: (offset, length, kind).
fn records(seg: &[u8]) -> Vec<(usize, usize, u8)> {
    let mut v = Vec::new();
    let mut off = format::SEGMENT_HEADER_LEN;
    while off + 5 <= seg.len() {
        let len = u32::from_le_bytes(seg[off..off + 4].try_into().unwrap()) as usize + 4;
        if off + len > seg.len() {
            break;
        }
        v.push((off, len, seg[off + 4]));
        off += len;
    }
    v
}

#[test]
fn swapped_blocks_are_detected() {
    let fx = fixture();
    let s = fx.base.reboot();
    let seg = largest_segment(&s);
    let swapped = s
        .with_file(&seg, |d| {
            let recs = records(d);
            // Two data blocks of the same length, so the layout stays parseable.
            for (i, a) in recs.iter().enumerate() {
                for b in &recs[i + 1..] {
                    if a.1 == b.1 && a.2 == 1 && b.2 == 1 {
                        let (x, y) = (d[a.0..a.0 + a.1].to_vec(), d[b.0..b.0 + b.1].to_vec());
                        d[a.0..a.0 + a.1].copy_from_slice(&y);
                        d[b.0..b.0 + b.1].copy_from_slice(&x);
                        return true;
                    }
                }
            }
            false
        })
        .unwrap();
    assert!(swapped);
    let (opened, failed, fsck) = examine(&fx, s);
    assert!(opened);
    assert!(!failed.is_empty());
    assert!(
        fsck.iter().any(|e| e.contains("not the expected block")),
        "{fsck:?}"
    );
}

#[test]
fn swapped_segments_are_detected() {
    let fx = fixture();
    let s = fx.base.reboot();
    let segs: Vec<String> = s
        .names()
        .into_iter()
        .filter(|n| n.starts_with("seg/") && n.ends_with(".seg"))
        .collect();
    s.rename(&segs[0], "seg/tmp").unwrap();
    s.rename(&segs[1], &segs[0]).unwrap();
    s.rename("seg/tmp", &segs[1]).unwrap();
    let (opened, failed, fsck) = examine(&fx, s);
    if opened {
        assert!(!failed.is_empty());
        assert!(
            fsck.iter().any(|e| e.contains("another volume or segment")),
            "{fsck:?}"
        );
    }
}

#[test]
fn header_from_another_volume_is_refused_or_recovered() {
    let fx = fixture();
    // Another volume under the same keystore.
    let other = MemStorage::new();
    Volume::init(Arc::new(other.clone()), &fx.env.kms, &small_opts()).unwrap();
    let foreign = other.read(format::HEADER_FILE).unwrap();

    // Only the primary replaced: the authenticated backup takes over and the
    // primary is repaired from it; a read-only open reports it in fsck.
    let s = fx.base.reboot();
    s.with_file(format::HEADER_FILE, |d| *d = foreign.clone())
        .unwrap();
    let ro = Volume::open(
        Arc::new(s.clone()),
        &fx.env.kms,
        kmsfs::volume::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let errs = ro.fsck().unwrap().errors;
    assert!(
        errs.iter().any(|e| e.contains("another volume")),
        "{errs:?}"
    );
    drop(ro);
    let (opened, failed, fsck) = examine(&fx, s.clone());
    assert!(
        opened && failed.is_empty() && fsck.is_empty(),
        "{failed:?} {fsck:?}"
    );
    assert_eq!(
        s.read(format::HEADER_FILE).unwrap(),
        s.read(format::HEADER_BACKUP_FILE).unwrap()
    );

    // Both replaced: a clear refusal naming the cause.
    let s = fx.base.reboot();
    s.with_file(format::HEADER_FILE, |d| *d = foreign.clone())
        .unwrap();
    s.with_file(format::HEADER_BACKUP_FILE, |d| *d = foreign.clone())
        .unwrap();
    let e = Volume::open(Arc::new(s), &fx.env.kms, Default::default())
        .err()
        .expect("opened a volume with a foreign header");
    assert_eq!(e.errno(), libc::EIO);
    assert!(
        e.to_string().contains("replaced with another volume"),
        "{e}"
    );
}

#[test]
fn newer_format_version_is_refused_clearly() {
    let fx = fixture();
    let s = fx.base.reboot();
    for f in [format::HEADER_FILE, format::HEADER_BACKUP_FILE] {
        s.with_file(f, |d| d[format::header_off::VERSION] = 9)
            .unwrap();
    }
    let e = Volume::open(Arc::new(s), &fx.env.kms, Default::default())
        .err()
        .unwrap();
    let m = e.to_string();
    assert!(
        m.contains("version 9") && m.contains("upgrade kmsfs"),
        "{m}"
    );
}

#[test]
fn no_plaintext_in_the_backing_directory() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FsStorage::new(dir.path()));
    let v = init(&env, storage.clone(), &CreateOptionsExt::default_small());
    let secrets: Vec<&[u8]> = vec![
        b"TOPSECRET-FILENAME-alpha",
        b"TOPSECRET-DIRNAME-beta",
        b"TOPSECRET-CONTENT-gamma-0123456789",
        b"user.TOPSECRET-XATTRNAME",
        b"TOPSECRET-XATTRVALUE-delta",
        b"TOPSECRET-SYMLINK-TARGET-eps",
    ];
    let d = v.mkdir(ROOT_INO, secrets[1], 0o755, 0, 0).unwrap();
    let f = v.create(d.ino, secrets[0], 0o644, 0, 0).unwrap();
    let mut body = Vec::new();
    for _ in 0..2000 {
        body.extend_from_slice(secrets[2]);
    }
    v.write(f.ino, 0, &body).unwrap();
    v.setxattr(f.ino, secrets[3], secrets[4], 0).unwrap();
    let big = secrets[4].repeat(200);
    v.setxattr(d.ino, secrets[3], &big, 0).unwrap();
    v.symlink(ROOT_INO, b"l", secrets[5], 0, 0).unwrap();
    v.close().unwrap();
    let mut scanned = 0;
    for e in walk(dir.path()) {
        let bytes = std::fs::read(&e).unwrap();
        scanned += bytes.len();
        for s in &secrets {
            assert!(
                !bytes.windows(s.len()).any(|w| w == *s),
                "{} contains {:?}",
                e.display(),
                String::from_utf8_lossy(s)
            );
        }
    }
    assert!(scanned > 60_000, "scanned only {scanned} bytes");
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap().path();
        if e.is_dir() {
            out.extend(walk(&e));
        } else {
            out.push(e);
        }
    }
    out
}

struct CreateOptionsExt;
impl CreateOptionsExt {
    fn default_small() -> kmsfs::volume::CreateOptions {
        small_opts()
    }
}

#[test]
fn rollback_to_an_older_state_is_detected_and_recoverable() {
    let fx = fixture();
    let live = fx.base.reboot();
    let old_copy = live.reboot(); // the attacker's (or an old backup's) copy
    let v = open(&fx.env, Arc::new(live.clone()));
    // As in the mount daemon: every commit raises the mark before it returns.
    v.set_generation_sink(Some(fx.env.kms_handle()));
    let f = v.create(ROOT_INO, b"new", 0o644, 0, 0).unwrap();
    v.write(f.ino, 0, b"newer data").unwrap();
    v.commit().unwrap();
    // No mark raised by hand: the commit did it.
    drop(v);
    // Put the old state back in place of the live one.
    let e = Volume::open(Arc::new(old_copy.clone()), &fx.env.kms, Default::default())
        .err()
        .expect("rollback went unnoticed");
    let m = e.to_string();
    assert!(
        m.contains("rolled back") && m.contains("--accept-rollback"),
        "{m}"
    );
    assert_eq!(e.errno(), libc::EIO);
    // Read-only opens are refused too (they would serve stale data silently).
    assert!(
        Volume::open(
            Arc::new(old_copy.clone()),
            &fx.env.kms,
            kmsfs::volume::OpenOptions {
                read_only: true,
                ..Default::default()
            }
        )
        .is_err()
    );
    // A deliberate restore is accepted once; afterwards it opens normally.
    let v = Volume::open(
        Arc::new(old_copy.clone()),
        &fx.env.kms,
        kmsfs::volume::OpenOptions {
            accept_rollback: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(dump(&v).unwrap(), fx.reference);
    drop(v);
    let v = open(&fx.env, Arc::new(old_copy));
    assert!(v.lookup(ROOT_INO, b"new").is_err());
}
