//! One damaged file never loses the volume: each kind of backing file is
//! deleted, truncated or corrupted in turn, and the volume still opens, serves
//! everything that file did not hold, and fsck says what is damaged.

mod engine_common;

use std::sync::Arc;

use engine_common::*;
use kmsfs::format;
use kmsfs::store::{MemStorage, Storage};
use kmsfs::volume::{ROOT_INO, ROOT_SLOTS, Volume};

const MIB: usize = 1 << 20;

/// A volume with two sessions of files: the first in early segments, the
/// second (a big file and many small ones) in later ones.
struct Fx {
    env: Env,
    base: MemStorage,
    /// (name, ino, contents)
    files: Vec<(String, u64, Vec<u8>)>,
    generation: u64,
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
    for i in 0..40u64 {
        let name = format!("small-{i}");
        let a = v.create(ROOT_INO, name.as_bytes(), 0o644, 0, 0).unwrap();
        let data = pattern(i, 3000 + i as usize * 11);
        v.write(a.ino, 0, &data).unwrap();
        files.push((name, a.ino, data));
    }
    v.commit().unwrap();
    drop(v);
    // A second session: a new segment.
    let v = open(&env, Arc::new(base.clone()));
    v.set_generation_sink(Some(env.kms_handle()));
    let a = v.create(ROOT_INO, b"big", 0o644, 0, 0).unwrap();
    let data = pattern(99, 3 * MIB);
    v.write(a.ino, 0, &data).unwrap();
    files.push(("big".into(), a.ino, data));
    v.commit().unwrap();
    // One more commit, so both root slots hold commits of this session.
    let a = v.create(ROOT_INO, b"last", 0o644, 0, 0).unwrap();
    v.write(a.ino, 0, b"the last commit").unwrap();
    files.push(("last".into(), a.ino, b"the last commit".to_vec()));
    v.commit().unwrap();
    let generation = v.generation();
    drop(v);
    Fx {
        env,
        base,
        files,
        generation,
    }
}

/// (slot name, claimed generation) of both root slots, newest first.
fn slots(s: &MemStorage) -> Vec<(&'static str, u64)> {
    let mut v: Vec<(&'static str, u64)> = ROOT_SLOTS
        .iter()
        .filter_map(|n| {
            let b = s.with_file(n, |d| d.clone())?;
            let (_, g, _, _) = format::split_root(&b).ok()?;
            Some((*n, g))
        })
        .collect();
    v.sort_by_key(|(_, g)| std::cmp::Reverse(*g));
    v
}

fn read_all(v: &Volume, fx: &Fx) -> Vec<String> {
    let mut bad = Vec::new();
    for (name, ino, data) in &fx.files {
        match v.read(*ino, 0, (data.len() + 1) as u32) {
            Ok(got) => assert!(&got == data, "{name}: wrong plaintext"),
            Err(e) => {
                assert_eq!(e.errno(), libc::EIO, "{name}: {e}");
                bad.push(name.clone());
            }
        }
    }
    bad
}

#[test]
fn both_root_slots_hold_the_last_two_commits() {
    let fx = fixture();
    let s = slots(&fx.base);
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!(s[0].1, fx.generation);
    assert_eq!(s[1].1, fx.generation - 1);
}

#[test]
fn a_lost_or_damaged_newest_root_falls_back_one_commit() {
    let fx = fixture();
    let newest = slots(&fx.base)[0].0;
    type Damage = Box<dyn Fn(&MemStorage)>;
    let damages: [(&str, Damage); 3] = [
        ("deleted", Box::new(move |s| s.remove(newest).unwrap())),
        (
            "flipped",
            Box::new(move |s| {
                s.with_file(newest, |d| {
                    let n = d.len();
                    d[n / 2] ^= 0x10;
                })
                .unwrap();
            }),
        ),
        (
            "truncated",
            Box::new(move |s| {
                s.with_file(newest, |d| d.truncate(20)).unwrap();
            }),
        ),
    ];
    // Each case starts from the same keystore (an open raises its mark).
    let ks = fx.env.dir.path().join("keystore");
    let saved: Vec<(std::path::PathBuf, Vec<u8>)> = [ks.clone(), ks.with_extension("bak")]
        .into_iter()
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect();
    for (what, damage) in damages {
        for (p, b) in &saved {
            std::fs::write(p, b).unwrap();
        }
        let s = fx.base.reboot();
        damage(&s);
        // The mark says generation N; the previous commit (N-1) is accepted
        // because the newest copy is damaged, not absent by rollback.
        let v = Volume::open(Arc::new(s.clone()), &fx.env.kms, Default::default())
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        // Everything but the last commit's file is there.
        assert!(
            v.lookup(ROOT_INO, b"last").is_err(),
            "{what}: the skipped commit's file is visible"
        );
        for (name, ino, data) in &fx.files {
            if name != "last" {
                assert_eq!(
                    &v.read(*ino, 0, data.len() as u32).unwrap(),
                    data,
                    "{what}: {name}"
                );
            }
        }
        // The open committed past the mark and rewrote the damaged slot.
        assert!(v.generation() > fx.generation, "{what}");
        let r = v.fsck().unwrap();
        assert!(r.is_clean(), "{what}: {:?}", r.errors);
        drop(v);
        assert_eq!(slots(&s).len(), 2, "{what}: both slots are whole again");
    }
}

#[test]
fn both_roots_damaged_is_refused_with_the_way_out() {
    let fx = fixture();
    let s = fx.base.reboot();
    for n in ROOT_SLOTS {
        s.with_file(n, |d| d[50] ^= 1).unwrap();
    }
    let e = Volume::open(Arc::new(s), &fx.env.kms, Default::default())
        .err()
        .expect("a volume without an intact root opened");
    assert_eq!(e.errno(), libc::EIO);
    let m = e.to_string();
    assert!(
        m.contains("no intact commit") && m.contains("salvage"),
        "{m}"
    );
}

#[test]
fn a_lost_segment_costs_only_the_data_it_held() {
    let fx = fixture();
    // The newest segment holds the big file's data and the tree's nodes.
    let segs: Vec<String> = fx
        .base
        .names()
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .collect();
    let newest = segs.iter().max().unwrap().clone();
    let mut lost_any = false;
    for victim in [newest.clone()] {
        let s = fx.base.reboot();
        s.remove(&victim).unwrap();
        let v = Volume::open(
            Arc::new(s.clone()),
            &fx.env.kms,
            kmsfs::volume::OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("without {victim}: {e}"));
        let bad = read_all(&v, &fx);
        // Only files with data in the lost segment fail; the tree survived.
        assert!(bad.len() < fx.files.len() / 2, "{victim}: {bad:?}");
        lost_any |= !bad.is_empty();
        assert!(
            !bad.iter().any(|n| n.starts_with("small-")),
            "first-session files lost with {victim}: {bad:?}"
        );
        let r = v.fsck().unwrap();
        assert!(!r.is_clean(), "fsck missed the lost {victim}");
        for b in &bad {
            assert!(
                r.errors.iter().any(|e| e.contains(b.as_str())),
                "fsck does not name {b}: {:?}",
                r.errors
            );
        }
    }
    assert!(lost_any, "the newest segment held no file data");
}

#[test]
fn a_lost_or_damaged_mirror_loses_nothing() {
    let fx = fixture();
    for m in fx.base.names().into_iter().filter(|n| n.ends_with(".meta")) {
        let s = fx.base.reboot();
        s.remove(&m).unwrap();
        let v = open(&fx.env, Arc::new(s.clone()));
        assert!(read_all(&v, &fx).is_empty(), "without {m}");
        let r = v.fsck().unwrap();
        assert!(r.is_clean(), "without {m}: {:?}", r.errors);
        drop(v);
    }
}

#[test]
fn damaged_nodes_are_served_from_the_mirror() {
    let fx = fixture();
    let v = open(&fx.env, Arc::new(fx.base.reboot()));
    let nodes = v.node_pointers().unwrap();
    drop(v);
    // Flip a byte inside every live node's record in its segment.
    let s = fx.base.reboot();
    for p in &nodes {
        let name = format::segment_file_name(p.segment);
        s.with_file(&name, |d| d[p.offset as usize + p.len as usize / 2] ^= 0x20)
            .unwrap();
    }
    let v = Volume::open(
        Arc::new(s),
        &fx.env.kms,
        kmsfs::volume::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(read_all(&v, &fx).is_empty(), "a node copy did not serve");
    let r = v.fsck().unwrap();
    assert!(
        r.errors.iter().any(|e| e.contains("intact and serves")),
        "fsck does not report the damaged originals: {:?}",
        r.errors
    );
}
