//! `Volume::rewrap`: the DK is re-wrapped under the newest version of its CMK or under
//! another CMK, both header copies change, no data changes, and a crash at every write or
//! sync point leaves a volume whose header unwraps (old or new).

mod engine_common;

use std::sync::Arc;

use engine_common::*;
use kmsfs::format;
use kmsfs::kms::{CreateKey, KeyChange, Kms};
use kmsfs::store::{MemStorage, Storage};
use kmsfs::volume::{OpenOptions, ROOT_INO, Volume};

fn user_key(env: &Env, alias: &str) -> String {
    env.kms
        .create_key(&CreateKey {
            alias: Some(alias.into()),
            description: String::new(),
            external: false,
        })
        .unwrap()
        .id
}

fn header_of(s: &MemStorage, name: &str) -> format::Header {
    format::Header::decode(&s.read(name).unwrap()).unwrap()
}

/// Segment files and their bytes: what "no data touched" compares.
fn data_files(s: &MemStorage) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = s
        .names()
        .into_iter()
        .filter(|n| n.starts_with(format::SEGMENT_DIR))
        .map(|n| {
            let b = s.read(&n).unwrap();
            (n, b)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn rewrap_to_newest_version_and_to_another_key_touches_no_data() {
    let env = env();
    let storage = MemStorage::new();
    let service = user_key(&env, "first");
    let opts = kmsfs::volume::CreateOptions {
        cmk: Some("first".into()),
        ..small_opts()
    };
    let v = init(&env, Arc::new(storage.clone()), &opts);
    let f = v.create(ROOT_INO, b"f", 0o644, 0, 0).unwrap();
    v.write(f.ino, 0, &vec![7u8; 100_000]).unwrap();
    v.commit().unwrap();
    v.snapshot_create("before").unwrap();
    let h0 = v.header();
    assert_eq!((h0.cmk_id.as_str(), h0.cmk_version), (service.as_str(), 1));

    // Newest version of the same key.
    env.kms.change_key(&service, KeyChange::Rotate).unwrap();
    let data = data_files(&storage);
    let r = v.rewrap(&env.kms, None).unwrap();
    assert_eq!(r.from, (service.clone(), 1));
    assert_eq!(r.to, (service.clone(), 2));
    for name in [format::HEADER_FILE, format::HEADER_BACKUP_FILE] {
        let h = header_of(&storage, name);
        assert_eq!(
            (h.cmk_id.as_str(), h.cmk_version),
            (service.as_str(), 2),
            "{name}"
        );
        assert_ne!(h.wrapped_dk, h0.wrapped_dk);
    }
    assert_eq!(data_files(&storage), data, "a rewrap changed a data file");

    // Another key.
    let other = user_key(&env, "other");
    let r = v.rewrap(&env.kms, Some("other")).unwrap();
    assert_eq!(r.to, (other.clone(), 1));
    assert_eq!(v.header().cmk_id, other);
    assert_eq!(data_files(&storage), data);
    v.close().unwrap();

    // The old key can go: the volume and its snapshot open under the new one.
    env.kms.change_key("first", KeyChange::Disable).unwrap();
    let v = open(&env, Arc::new(storage.clone()));
    assert_eq!(v.read(f.ino, 0, 10).unwrap(), vec![7u8; 10]);
    drop(v);
    let snap = Volume::open(
        Arc::new(storage.clone()),
        &env.kms,
        OpenOptions {
            snapshot: Some("before".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(snap.read(f.ino, 0, 10).unwrap(), vec![7u8; 10]);
    drop(snap);

    // Disabling the new key stops the volume; enabling it again lets it open.
    env.kms.change_key("other", KeyChange::Disable).unwrap();
    let err = Volume::open(Arc::new(storage.clone()), &env.kms, OpenOptions::default())
        .err()
        .expect("a disabled key must refuse");
    assert!(err.to_string().contains("kmsfs key enable"), "{err}");
    env.kms.change_key("other", KeyChange::Enable).unwrap();
    drop(open(&env, Arc::new(storage.clone())));
}

#[test]
fn rewrap_refusals_change_nothing() {
    let env = env();
    let storage = MemStorage::new();
    let v = init(&env, Arc::new(storage.clone()), &small_opts());
    let before = (
        storage.read(format::HEADER_FILE).unwrap(),
        storage.read(format::HEADER_BACKUP_FILE).unwrap(),
    );
    user_key(&env, "off");
    env.kms.change_key("off", KeyChange::Disable).unwrap();
    let e = v.rewrap(&env.kms, Some("off")).unwrap_err();
    assert!(e.to_string().contains("disabled"), "{e}");
    let e = v.rewrap(&env.kms, Some("no-such-key")).unwrap_err();
    assert!(e.to_string().contains("no-such-key"), "{e}");
    assert_eq!(
        (
            storage.read(format::HEADER_FILE).unwrap(),
            storage.read(format::HEADER_BACKUP_FILE).unwrap()
        ),
        before
    );
    drop(v);
    // A read-only open refuses to rewrap.
    let ro = Volume::open(
        Arc::new(storage.clone()),
        &env.kms,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(ro.rewrap(&env.kms, None).is_err());
}

#[test]
fn crash_at_every_point_of_a_rewrap_leaves_a_header_that_unwraps() {
    let env = env();
    user_key(&env, "dest");
    // How many mutating calls a rewrap makes.
    let total = {
        let storage = MemStorage::new();
        let v = init(&env, Arc::new(storage.clone()), &small_opts());
        let start = storage.op_count();
        v.rewrap(&env.kms, Some("dest")).unwrap();
        storage.op_count() - start
    };
    assert!(
        total >= 8,
        "a rewrap of two copies makes at least 8 calls, saw {total}"
    );
    let dest = env.kms.describe_key("dest").unwrap().id;
    let service = env.kms.service_key_id();
    let mut saw_new = false;
    let mut saw_old = false;
    for n in 0..=total {
        let storage = MemStorage::new();
        let v = init(&env, Arc::new(storage.clone()), &small_opts());
        let f = v.create(ROOT_INO, b"f", 0o644, 0, 0).unwrap();
        v.write(f.ino, 0, b"kept").unwrap();
        v.commit().unwrap();
        storage.crash_after(n);
        let r = v.rewrap(&env.kms, Some("dest"));
        assert_eq!(r.is_ok(), n == total, "crash point {n}: {r:?}");
        drop(v);
        let after = storage.reboot();
        // Each surviving copy is intact and names the old or the new key.
        for name in [format::HEADER_FILE, format::HEADER_BACKUP_FILE] {
            let h = format::Header::decode(&after.read(name).unwrap())
                .unwrap_or_else(|e| panic!("crash point {n}: {name} damaged: {e}"));
            assert!(h.cmk_id == dest || h.cmk_id == service, "crash point {n}");
            saw_new |= h.cmk_id == dest;
            saw_old |= h.cmk_id == service;
        }
        let v = Volume::open(Arc::new(after.clone()), &env.kms, OpenOptions::default())
            .unwrap_or_else(|e| panic!("crash point {n}: volume does not open: {e}"));
        assert_eq!(v.read(f.ino, 0, 10).unwrap(), b"kept", "crash point {n}");
        assert!(v.fsck().unwrap().is_clean(), "crash point {n}");
        // Opening read-write made both copies equal again.
        assert_eq!(
            after.read(format::HEADER_FILE).unwrap(),
            after.read(format::HEADER_BACKUP_FILE).unwrap(),
            "crash point {n}"
        );
        // And a rewrap completes now.
        v.rewrap(&env.kms, Some("dest")).unwrap();
    }
    assert!(saw_new && saw_old);
}
