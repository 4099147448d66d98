//! Namespace reads the mount builds its replies from: `readdir_plus` (the
//! listing with every entry's attributes, under one lock) must say exactly what
//! `readdir` and `getattr` say, across batches and after changes; `lookup`
//! tells a missing name from a parent that is not a directory.

mod engine_common;

use std::sync::Arc;

use engine_common::*;
use kmsfs::error::Error;
use kmsfs::store::{MemStorage, Storage};
use kmsfs::volume::{ROOT_INO, RenameFlags, SetAttr, Volume};

/// The whole listing of `dir` through `readdir_plus` in batches of `batch`,
/// checking every attribute against `getattr`.
fn list_plus(v: &Volume, dir: u64, batch: usize) -> Vec<(Vec<u8>, u64, u64)> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let items = v.readdir_plus(dir, offset, batch).unwrap();
        if items.is_empty() {
            return out;
        }
        // `max` is a soft bound: "." and ".." come on top, and a batch holds
        // at least one name.
        assert!(items.len() <= batch + 2);
        for (it, a) in items {
            assert_eq!(a.ino, it.ino);
            assert_eq!(a, v.getattr(it.ino).unwrap(), "entry {:?}", it.name);
            assert_eq!(a.inode.kind, it.kind);
            offset = it.offset;
            out.push((it.name, it.ino, it.offset));
        }
    }
}

fn list(v: &Volume, dir: u64) -> Vec<(Vec<u8>, u64, u64)> {
    v.readdir(dir, 0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|it| (it.name, it.ino, it.offset))
        .collect()
}

#[test]
fn readdir_plus_matches_readdir_and_getattr_across_batches_and_changes() {
    let env = env();
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let v = init(&env, storage.clone(), &small_opts());
    let d = v.mkdir(ROOT_INO, b"d", 0o755, 0, 0).unwrap().ino;
    let other = v.mkdir(ROOT_INO, b"other", 0o755, 0, 0).unwrap().ino;
    let mut files = Vec::new();
    for i in 0..60u32 {
        let name = format!("f{i:03}");
        files.push(v.create(d, name.as_bytes(), 0o644, i, i).unwrap().ino);
    }
    v.symlink(d, b"link", b"f000", 0, 0).unwrap();
    v.mkdir(d, b"sub", 0o700, 0, 0).unwrap();
    for batch in [1, 7, 512] {
        assert_eq!(list_plus(&v, d, batch), list(&v, d), "batch {batch}");
    }
    // 62 entries, then "." and "..".
    assert_eq!(list(&v, d).len(), 64);

    // Changes show in the next listing, attributes included.
    for (i, ino) in files.iter().enumerate().step_by(5) {
        let s = SetAttr {
            mode: Some(0o600),
            uid: Some(1000 + i as u32),
            ..SetAttr::default()
        };
        v.setattr(*ino, &s).unwrap();
    }
    v.write(files[1], 0, b"hello").unwrap();
    v.unlink(d, b"f002").unwrap();
    v.rename(d, b"f003", other, b"moved", RenameFlags::default())
        .unwrap();
    v.rename(d, b"f004", d, b"f004-renamed", RenameFlags::default())
        .unwrap();
    for batch in [3, 512] {
        let l = list_plus(&v, d, batch);
        assert_eq!(l, list(&v, d), "batch {batch}");
        let names: Vec<_> = l.iter().map(|e| e.0.clone()).collect();
        assert!(!names.contains(&b"f002".to_vec()) && !names.contains(&b"f003".to_vec()));
        assert!(names.contains(&b"f004-renamed".to_vec()));
    }
    let (_, a) = v
        .readdir_plus(d, 0, 512)
        .unwrap()
        .into_iter()
        .find(|(it, _)| it.name == b"f005")
        .unwrap();
    assert_eq!((a.inode.perm, a.inode.uid), (0o600, 1005));
    assert_eq!(list_plus(&v, other, 2), list(&v, other));

    // The same after a commit and a reopen (nodes read back from the store).
    v.commit().unwrap();
    let before = list(&v, d);
    drop(v);
    let v = open(&env, storage);
    assert_eq!(list_plus(&v, d, 5), before);

    // Not a directory, and no such inode.
    assert!(matches!(
        v.readdir_plus(files[0], 0, 10),
        Err(Error::NotDir)
    ));
    assert!(matches!(
        v.readdir_plus(999_999, 0, 10),
        Err(Error::NotFound)
    ));
}

#[test]
fn lookup_tells_missing_names_from_parents_that_are_not_directories() {
    let env = env();
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let v = init(&env, storage, &small_opts());
    let d = v.mkdir(ROOT_INO, b"d", 0o755, 0, 0).unwrap().ino;
    let f = v.create(d, b"f", 0o644, 0, 0).unwrap().ino;
    let a = v.lookup(d, b"f").unwrap();
    assert_eq!(a, v.getattr(f).unwrap());
    assert!(matches!(v.lookup(d, b"g"), Err(Error::NotFound)));
    assert!(matches!(v.lookup(f, b"g"), Err(Error::NotDir)));
    assert!(matches!(v.lookup(999_999, b"g"), Err(Error::NotFound)));
    assert!(matches!(v.lookup(d, &[b'x'; 256]), Err(Error::NameTooLong)));
    // A removed directory's names are gone with it.
    v.unlink(d, b"f").unwrap();
    v.rmdir(ROOT_INO, b"d").unwrap();
    assert!(matches!(v.lookup(d, b"f"), Err(Error::NotFound)));
}
