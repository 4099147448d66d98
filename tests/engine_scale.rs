//! Scale: 100,000 small files in a real backing directory. The store packs them
//! into a few hundred files at most, and the engine's memory stays bounded
//! (the peak resident size is printed and checked against a fixed ceiling).

mod engine_common;

use std::sync::Arc;

use engine_common::*;
use kmsfs::store::{FsStorage, Storage};
use kmsfs::volume::{CreateOptions, OpenOptions, ROOT_INO, Volume};

fn rss_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn hundred_thousand_small_files() {
    const FILES: u64 = 100_000;
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FsStorage::new(dir.path()));
    Volume::init(storage.clone(), &env.kms, &CreateOptions::default()).unwrap();
    let v = Volume::open(
        storage.clone(),
        &env.kms,
        OpenOptions {
            cache_bytes: 32 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let before = rss_kib("VmRSS:");
    let mut half = 0;
    let mut dirs = Vec::new();
    for d in 0..100 {
        dirs.push(
            v.mkdir(ROOT_INO, format!("d{d:03}").as_bytes(), 0o755, 0, 0)
                .unwrap()
                .ino,
        );
    }
    for i in 0..FILES {
        let d = dirs[(i % 100) as usize];
        let a = v
            .create(d, format!("file-{i:06}.txt").as_bytes(), 0o644, 0, 0)
            .unwrap();
        let body = format!("file {i} {}", "x".repeat((i % 200) as usize));
        v.write(a.ino, 0, body.as_bytes()).unwrap();
        if i % 10_000 == 9_999 {
            v.commit().unwrap();
        }
        if i == FILES / 2 {
            half = rss_kib("VmHWM:");
        }
    }
    v.commit().unwrap();
    let peak = rss_kib("VmHWM:");
    drop(v);
    let files = walk_count(dir.path());
    eprintln!(
        "scale: {FILES} files -> {files} backing files; RSS before {before} KiB, peak at 50k files {half} KiB, at 100k files {peak} KiB"
    );
    assert!(files <= 300, "{files} backing files");
    // The engine's own memory: dirty data is flushed at 64 MiB, the block cache
    // is 32 MiB here, tree nodes are cached by count. 100k files' metadata is far
    // below the ceiling, and the ceiling does not grow with the data size.
    assert!(peak < 256 * 1024, "peak RSS {peak} KiB");
    // Doubling the file count must not double the memory.
    assert!(
        peak < half + half / 4 + 16 * 1024,
        "peak {peak} KiB vs {half} KiB at half"
    );

    // Reopen and check a sample.
    let v = Volume::open(storage, &env.kms, OpenOptions::default()).unwrap();
    for i in (0..FILES).step_by(9973) {
        let d = dirs[(i % 100) as usize];
        let a = v.lookup(d, format!("file-{i:06}.txt").as_bytes()).unwrap();
        let body = format!("file {i} {}", "x".repeat((i % 200) as usize));
        assert_eq!(v.read(a.ino, 0, 4096).unwrap(), body.as_bytes());
    }
    let n = v.readdir(dirs[7], 0, usize::MAX).unwrap().len();
    assert_eq!(n, 1000 + 2);
}

fn walk_count(p: &std::path::Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap().path();
        if e.is_dir() {
            n += walk_count(&e);
        } else {
            n += 1;
        }
    }
    n
}
