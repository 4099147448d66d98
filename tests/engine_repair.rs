//! `Volume::repair` (`kmsfs fsck --repair`): damaged node copies are
//! rewritten, files with damaged data move to /lost+found with their old path
//! and the lost byte ranges recorded and holes where the damage was, snapshot
//! damage is reported with the way out, and the volume is clean afterwards
//! (also after a reopen); a clean volume is left as it was.

mod engine_common;

use std::collections::BTreeSet;
use std::sync::Arc;

use engine_common::*;
use kmsfs::format::{self, BlockKind};
use kmsfs::store::{MemStorage, Storage};
use kmsfs::volume::repair::{LOST_PATH_XATTR, LOST_RANGES_XATTR, RepairReport};
use kmsfs::volume::{ROOT_INO, Volume};

const MIB: usize = 1 << 20;
const BS: u64 = 4096;

/// (offset, length) of every record of `kind` in a segment file.
fn records(s: &MemStorage, seg: &str, kind: BlockKind) -> Vec<(usize, usize)> {
    let d = s.with_file(seg, |d| d.clone()).unwrap();
    let mut at = format::SEGMENT_HEADER_LEN;
    let mut out = Vec::new();
    while at + 5 <= d.len() {
        let len = u32::from_le_bytes(d[at..at + 4].try_into().unwrap()) as usize + 4;
        if d[at + 4] == kind as u8 {
            out.push((at, len));
        }
        at += len;
    }
    out
}

fn segments(s: &MemStorage) -> BTreeSet<String> {
    s.names()
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .collect()
}

/// Flips a byte in the middle of record `(off, len)` of `seg`.
fn flip(s: &MemStorage, seg: &str, (off, len): (usize, usize)) {
    s.with_file(seg, |d| d[off + len / 2] ^= 0x40).unwrap();
}

/// A volume with files in two directories and a hard link; returns the
/// storage, the volume (closed) and the files as (path, contents).
struct Fx {
    env: Env,
    base: MemStorage,
    files: Vec<(String, Vec<u8>)>,
}

fn fixture() -> Fx {
    let env = env();
    let base = MemStorage::new();
    let v = init(
        &env,
        Arc::new(base.clone()) as Arc<dyn Storage>,
        &small_opts(),
    );
    v.set_generation_sink(Some(env.kms_handle()));
    let mut files = Vec::new();
    let d = v.mkdir(ROOT_INO, b"dir", 0o755, 0, 0).unwrap();
    for i in 0..30u64 {
        let (parent, name) = if i % 3 == 0 {
            (d.ino, format!("nested-{i}"))
        } else {
            (ROOT_INO, format!("small-{i}"))
        };
        let a = v.create(parent, name.as_bytes(), 0o644, 0, 0).unwrap();
        let data = pattern(i, 3000 + i as usize * 700);
        v.write(a.ino, 0, &data).unwrap();
        v.setxattr(a.ino, b"user.tag", name.as_bytes(), 0).unwrap();
        let path = if parent == ROOT_INO {
            format!("/{name}")
        } else {
            format!("/dir/{name}")
        };
        files.push((path, data));
    }
    v.symlink(ROOT_INO, b"link", b"dir/nested-0", 0, 0).unwrap();
    v.commit().unwrap();
    drop(v);
    // A second session: new segments hold the big file and the tree.
    let v = open(&env, Arc::new(base.clone()));
    v.set_generation_sink(Some(env.kms_handle()));
    let a = v.create(ROOT_INO, b"big", 0o644, 0, 0).unwrap();
    let data = pattern(99, 3 * MIB);
    v.write(a.ino, 0, &data).unwrap();
    files.push(("/big".into(), data));
    v.commit().unwrap();
    let a = v.create(ROOT_INO, b"last", 0o644, 0, 0).unwrap();
    v.write(a.ino, 0, b"the last commit").unwrap();
    files.push(("/last".into(), b"the last commit".to_vec()));
    v.commit().unwrap();
    drop(v);
    Fx { env, base, files }
}

fn lookup_path(v: &Volume, path: &str) -> Option<u64> {
    let mut ino = ROOT_INO;
    for part in path.trim_start_matches('/').split('/') {
        ino = v.lookup(ino, part.as_bytes()).ok()?.ino;
    }
    Some(ino)
}

fn repair(v: &Volume) -> RepairReport {
    let r = v.repair().unwrap();
    assert!(r.is_clean(), "not clean after repair: {:?}", r.after.errors);
    assert!(r.live_clean());
    r
}

/// Parses `first-last,...`.
fn parse_ranges(s: &[u8]) -> Vec<(u64, u64)> {
    std::str::from_utf8(s)
        .unwrap()
        .split(',')
        .map(|r| {
            let (a, b) = r.split_once('-').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect()
}

/// The file at `name` in /lost+found was `orig` before: zeros in the lost
/// ranges, the original bytes everywhere else; returns the ranges.
fn check_lost(v: &Volume, name: &str, orig: &[u8], paths: &[&str]) -> Vec<(u64, u64)> {
    let ino = lookup_path(v, &format!("/lost+found/{name}"))
        .unwrap_or_else(|| panic!("{name} not in lost+found: {:?}", dump(v)));
    let lost_path = v.getxattr(ino, LOST_PATH_XATTR).unwrap();
    let want: Vec<u8> = paths.join("\n").into_bytes();
    assert_eq!(
        String::from_utf8_lossy(&lost_path),
        String::from_utf8_lossy(&want)
    );
    let ranges = parse_ranges(&v.getxattr(ino, LOST_RANGES_XATTR).unwrap());
    let got = v.read(ino, 0, orig.len() as u32 + 1).unwrap();
    assert_eq!(got.len(), orig.len(), "{name}: size changed");
    for (i, (g, o)) in got.iter().zip(orig).enumerate() {
        let i = i as u64;
        if ranges.iter().any(|(a, b)| (*a..=*b).contains(&i)) {
            assert_eq!(*g, 0, "{name}: byte {i} in a lost range is not zero");
        } else {
            assert_eq!(g, o, "{name}: byte {i} outside the lost ranges changed");
        }
    }
    ranges
}

fn reopen_clean(env: &Env, s: &MemStorage) -> Volume {
    let v = open(env, Arc::new(s.reboot()));
    let r = v.fsck().unwrap();
    assert!(r.is_clean(), "after reopen: {:?}", r.errors);
    v
}

#[test]
fn a_flipped_data_byte_moves_the_file_to_lost_found() {
    let env = env();
    let s = MemStorage::new();
    let v = init(&env, Arc::new(s.clone()) as Arc<dyn Storage>, &small_opts());
    let d = v.mkdir(ROOT_INO, b"docs", 0o755, 0, 0).unwrap();
    let k = v.create(ROOT_INO, b"keep", 0o644, 0, 0).unwrap();
    v.write(k.ino, 0, &pattern(1, 50_000)).unwrap();
    v.commit().unwrap();
    drop(v);
    let before_segs = segments(&s);
    // The victim alone in a session: its segment holds only its data.
    let v = open(&env, Arc::new(s.clone()));
    let victim = pattern(7, 5 * BS as usize + 100);
    let a = v.create(d.ino, b"victim", 0o640, 0, 0).unwrap();
    v.write(a.ino, 0, &victim).unwrap();
    v.setxattr(a.ino, b"user.note", b"kept", 0).unwrap();
    v.link(a.ino, ROOT_INO, b"victim-link").unwrap();
    v.commit().unwrap();
    let before = dump(&v).unwrap();
    drop(v);
    let new: Vec<String> = segments(&s).difference(&before_segs).cloned().collect();
    assert_eq!(new.len(), 1, "{new:?}");
    let data = records(&s, &new[0], BlockKind::Data);
    assert_eq!(data.len(), 6, "the victim's six blocks");
    flip(&s, &new[0], data[2]);

    let v = open(&env, Arc::new(s.clone()));
    assert!(!v.fsck().unwrap().is_clean());
    let r = repair(&v);
    assert_eq!(r.lost_files.len(), 1, "{:?}", r.lost_files);
    let lf = &r.lost_files[0];
    assert_eq!(lf.paths, ["/docs/victim", "/victim-link"]);
    assert_eq!(
        lf.names,
        ["/lost+found/docs#victim", "/lost+found/victim-link"]
    );
    assert_eq!(r.nodes_rewritten, 0);
    let ranges = check_lost(
        &v,
        "docs#victim",
        &victim,
        &["/docs/victim", "/victim-link"],
    );
    assert_eq!(ranges.len(), 1);
    assert_eq!(ranges[0].1 - ranges[0].0 + 1, BS, "one block lost");
    assert_eq!(lf.lost_ranges, ranges);
    // Same inode under both names, its own xattr kept.
    let ino = lookup_path(&v, "/lost+found/victim-link").unwrap();
    assert_eq!(lookup_path(&v, "/lost+found/docs#victim"), Some(ino));
    assert_eq!(v.getxattr(ino, b"user.note").unwrap(), b"kept");
    assert_eq!(v.getattr(ino).unwrap().inode.nlink, 2);
    let lfa = v.getattr(lookup_path(&v, "/lost+found").unwrap()).unwrap();
    assert_eq!(lfa.inode.perm & 0o7777, 0o700);
    // Everything else as it was.
    let mut after = dump(&v).unwrap();
    after.retain(|p, _| !p.starts_with("/lost+found"));
    let mut want = before.clone();
    want.retain(|p, _| !p.contains("victim"));
    // The directory lost an entry: only its own line may differ.
    after.remove("/docs");
    want.remove("/docs");
    assert_eq!(after, want);
    drop(v);
    let v = reopen_clean(&env, &s);
    check_lost(
        &v,
        "docs#victim",
        &victim,
        &["/docs/victim", "/victim-link"],
    );
    // A second repair finds nothing to do.
    let r = repair(&v);
    assert!(!r.changed(), "{r:?}");
}

#[test]
fn a_lost_segment_of_nodes_and_data_is_repaired() {
    let fx = fixture();
    let newest = segments(&fx.base).into_iter().max().unwrap();
    let s = fx.base.reboot();
    assert!(!records(&s, &newest, BlockKind::Node).is_empty());
    assert!(!records(&s, &newest, BlockKind::Data).is_empty());
    s.remove(&newest).unwrap();
    let v = open(&fx.env, Arc::new(s.clone()));
    let r = repair(&v);
    assert!(r.nodes_rewritten > 0, "{r:?}");
    let moved: Vec<&str> = r.lost_files.iter().map(|l| l.paths[0].as_str()).collect();
    assert!(!moved.is_empty() && moved.contains(&"/big"), "{moved:?}");
    for (path, data) in &fx.files {
        if moved.contains(&path.as_str()) {
            assert!(lookup_path(&v, path).is_none(), "{path} still in place");
            let lost = r.lost_files.iter().find(|l| &l.paths[0] == path).unwrap();
            let name = lost.names[0].trim_start_matches("/lost+found/");
            check_lost(&v, name, data, &[path]);
        } else {
            let ino = lookup_path(&v, path).unwrap();
            assert_eq!(
                &v.read(ino, 0, data.len() as u32 + 1).unwrap(),
                data,
                "{path}"
            );
        }
    }
    assert!(r.after.warnings.is_empty(), "{:?}", r.after.warnings);
    drop(v);
    reopen_clean(&fx.env, &s);
}

#[test]
fn damaged_node_originals_are_rewritten() {
    let fx = fixture();
    let v = open(&fx.env, Arc::new(fx.base.reboot()));
    let nodes = v.node_pointers().unwrap();
    let before = dump(&v).unwrap();
    drop(v);
    let s = fx.base.reboot();
    for p in &nodes {
        let name = format::segment_file_name(p.segment);
        flip(&s, &name, (p.offset as usize, p.len as usize));
    }
    let v = open(&fx.env, Arc::new(s.clone()));
    assert!(!v.fsck().unwrap().is_clean());
    let r = repair(&v);
    assert!(r.nodes_rewritten > 0);
    assert!(r.lost_files.is_empty(), "{:?}", r.lost_files);
    assert!(r.entries_fixed.is_empty(), "{:?}", r.entries_fixed);
    assert_eq!(dump(&v).unwrap(), before);
    drop(v);
    let v = reopen_clean(&fx.env, &s);
    assert_eq!(dump(&v).unwrap(), before);
}

#[test]
fn a_deleted_mirror_is_rebuilt() {
    let fx = fixture();
    let v = open(&fx.env, Arc::new(fx.base.reboot()));
    let before = dump(&v).unwrap();
    let segs: BTreeSet<u64> = v
        .node_pointers()
        .unwrap()
        .iter()
        .map(|p| p.segment)
        .collect();
    drop(v);
    for seg in segs {
        let s = fx.base.reboot();
        let mirror = kmsfs::volume::blocks::mirror_file_name(seg);
        s.remove(&mirror).unwrap();
        let v = open(&fx.env, Arc::new(s.clone()));
        assert!(!v.fsck().unwrap().warnings.is_empty(), "{mirror}");
        let r = repair(&v);
        assert!(r.nodes_rewritten > 0, "{mirror}");
        assert!(r.lost_files.is_empty(), "{mirror}: {:?}", r.lost_files);
        assert!(
            r.after.warnings.is_empty(),
            "{mirror}: {:?}",
            r.after.warnings
        );
        assert_eq!(dump(&v).unwrap(), before, "{mirror}");
        drop(v);
        let v = reopen_clean(&fx.env, &s);
        assert!(v.fsck().unwrap().warnings.is_empty(), "{mirror}");
    }
}

#[test]
fn snapshot_damage_is_reported_not_repaired() {
    let env = env();
    let s = MemStorage::new();
    let v = init(&env, Arc::new(s.clone()) as Arc<dyn Storage>, &small_opts());
    v.commit().unwrap();
    drop(v);
    let first = segments(&s);
    let v = open(&env, Arc::new(s.clone()));
    let a = v.create(ROOT_INO, b"doc", 0o644, 0, 0).unwrap();
    v.write(a.ino, 0, &pattern(3, 3 * BS as usize)).unwrap();
    v.snapshot_create("monday").unwrap();
    drop(v);
    let snap_segs: Vec<String> = segments(&s).difference(&first).cloned().collect();
    // The live file is rewritten: the snapshot alone keeps the old blocks.
    let v = open(&env, Arc::new(s.clone()));
    v.write(a.ino, 0, &pattern(4, 3 * BS as usize)).unwrap();
    v.commit().unwrap();
    let before = dump(&v).unwrap();
    drop(v);
    let seg = snap_segs
        .iter()
        .find(|n| !records(&s, n, BlockKind::Data).is_empty())
        .unwrap();
    let data = records(&s, seg, BlockKind::Data);
    flip(&s, seg, data[1]);

    let v = open(&env, Arc::new(s.clone()));
    let r = v.repair().unwrap();
    assert!(r.live_clean(), "{:?}", r.unrepaired);
    assert!(!r.is_clean(), "the snapshot's damage is still there");
    assert!(r.lost_files.is_empty() && !r.changed(), "{r:?}");
    assert_eq!(r.snapshot_damage.len(), 1, "{:?}", r.snapshot_damage);
    let d = &r.snapshot_damage[0];
    assert_eq!((d.snapshot.as_str(), d.path.as_str()), ("monday", "/doc"));
    assert!(d.detail.contains("4096-8191"), "{}", d.detail);
    assert!(
        d.advice
            .contains("salvage VOLUME DEST --snapshot monday --partial")
            && d.advice.contains("snapshot delete VOLUME monday"),
        "{}",
        d.advice
    );
    assert_eq!(r.damaged_snapshots(), ["monday"]);
    assert_eq!(dump(&v).unwrap(), before);
    // Deleting the snapshot leaves a clean volume.
    v.snapshot_delete("monday").unwrap();
    assert!(v.fsck().unwrap().is_clean());
}

#[test]
fn repairing_a_clean_volume_changes_nothing() {
    let fx = fixture();
    let s = fx.base.reboot();
    let v = open(&fx.env, Arc::new(s.clone()));
    v.snapshot_create("s").unwrap();
    let before = dump(&v).unwrap();
    let r = repair(&v);
    assert!(!r.changed(), "{r:?}");
    assert!(r.snapshot_damage.is_empty());
    assert_eq!(dump(&v).unwrap(), before);
    assert!(lookup_path(&v, "/lost+found").is_none());
    drop(v);
    let v = reopen_clean(&fx.env, &s);
    assert_eq!(dump(&v).unwrap(), before);
}

/// A repair that rewrites tree nodes shared by the live tree and a snapshot writes each
/// once, ancestors included: the snapshot's exclusive bytes do not grow (each tree used
/// to get its own copies of the rewritten paths).
#[test]
fn repair_keeps_snapshot_metadata_shared() {
    let fx = fixture();
    let s0 = fx.base.reboot();
    let v = open(&fx.env, Arc::new(s0.clone()));
    v.snapshot_create("shared").unwrap();
    let excl = |v: &Volume| {
        v.snapshot_list()
            .unwrap()
            .into_iter()
            .find(|s| s.name == "shared")
            .unwrap()
            .exclusive_bytes
    };
    let before_excl = excl(&v);
    let nodes = v.node_pointers().unwrap();
    let before = dump(&v).unwrap();
    v.commit().unwrap();
    drop(v);
    let s = s0.reboot();
    for p in &nodes {
        let name = format::segment_file_name(p.segment);
        flip(&s, &name, (p.offset as usize, p.len as usize));
    }
    let v = open(&fx.env, Arc::new(s.clone()));
    let r = repair(&v);
    assert!(r.nodes_rewritten > 0);
    assert!(r.snapshot_damage.is_empty(), "{:?}", r.snapshot_damage);
    assert_eq!(dump(&v).unwrap(), before);
    let after_excl = excl(&v);
    eprintln!("snapshot exclusive bytes: {before_excl} before, {after_excl} after the repair");
    assert_eq!(
        after_excl, before_excl,
        "the repair un-shared snapshot metadata"
    );
    drop(v);
    let v = reopen_clean(&fx.env, &s);
    assert_eq!(dump(&v).unwrap(), before);
}
