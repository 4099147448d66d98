//! Cleaner stall (engine, real directory): the longest time a request waits
//! behind a clean. N small files and S snapshots, the files changed between
//! snapshots so that each snapshot holds its own metadata, half of them
//! deleted before the clean; while it runs, one probe thread calls `getattr`
//! in a loop and records its longest wait. With `KMSFS_BENCH_WRITER=1`
//! another changes files meanwhile (write, create, unlink; a commit every 200
//! changes, as the committer would) and records its longest change; those
//! commits make the getattr probe wait too (see the baseline below).
//! The cleaner holds the volume lock only for its commits and to apply its
//! relocation to what changed meanwhile, so both waits stay far below the
//! duration of the clean.
//!
//! Run: `cargo run --release --example cleaner_stall`
//! Environment: `KMSFS_BENCH_FILES` (default 200000), `KMSFS_BENCH_SNAPSHOTS`
//! (5), `KMSFS_BENCH_DIR` (default: $TMPDIR), `KMSFS_BENCH_MAX_LIVE` (the
//! cleaner's threshold, default 0.5), `KMSFS_BENCH_BASELINE_SECS` (run the
//! probes this long without a clean instead: the waits their own commits
//! cause).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kmsfs::crypto::{KdfParams, Passphrase};
use kmsfs::kms::keystore::{LocalKeystore, Unlock};
use kmsfs::store::{FsStorage, Storage};
use kmsfs::volume::{CreateOptions, OpenOptions, ROOT_INO, Volume};

fn env_n(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let files = env_n("KMSFS_BENCH_FILES", 200_000);
    let snaps = env_n("KMSFS_BENCH_SNAPSHOTS", 5);
    let base = std::env::var_os("KMSFS_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("kmsfs-stall-")
        .tempdir_in(base)
        .unwrap();
    let kms = LocalKeystore::open_or_create_with_params(
        &dir.path().join("keystore"),
        Unlock::Passphrase(Passphrase::new("bench".into())),
        KdfParams::for_tests(),
    )
    .unwrap();
    let vd = dir.path().join("vol");
    std::fs::create_dir_all(&vd).unwrap();
    let s: Arc<dyn Storage> = Arc::new(FsStorage::new(&vd));
    Volume::init(s.clone(), &kms, &CreateOptions::default()).unwrap();
    let v = Arc::new(Volume::open(s, &kms, OpenOptions::default()).unwrap());
    let t = Instant::now();
    let mut inos = Vec::with_capacity(files as usize);
    for i in 0..files {
        let a = v
            .create(ROOT_INO, format!("f{i}").as_bytes(), 0o644, 0, 0)
            .unwrap();
        v.write(a.ino, 0, &i.to_le_bytes()).unwrap();
        inos.push(a.ino);
    }
    v.commit().unwrap();
    for s in 0..snaps {
        v.snapshot_create(&format!("s{s}")).unwrap();
        // Change a spread of files so each snapshot has metadata of its own.
        for (k, ino) in inos.iter().enumerate().skip(s as usize).step_by(97) {
            v.write(*ino, 0, &(k as u64 + s).to_le_bytes()).unwrap();
        }
        v.commit().unwrap();
    }
    for i in (0..files).step_by(2) {
        v.unlink(ROOT_INO, format!("f{i}").as_bytes()).unwrap();
    }
    v.commit().unwrap();
    let setup = t.elapsed();
    // The probes: one getattr after another; one change after another.
    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let (v, stop, ino) = (v.clone(), stop.clone(), inos[1]);
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                v.getattr(ino).unwrap();
                worst = worst.max(t.elapsed());
                n += 1;
            }
            (worst, n)
        })
    };
    let with_writer = std::env::var("KMSFS_BENCH_WRITER").is_ok_and(|v| v == "1");
    let writer = {
        let (v, stop, inos) = (v.clone(), stop.clone(), inos.clone());
        std::thread::spawn(move || {
            if !with_writer {
                return (Duration::ZERO, 0);
            }
            let mut worst = Duration::ZERO;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                // Odd indices: the files the setup did not delete.
                let ino = inos[((n as usize * 7919) % (inos.len() / 2)) * 2 + 1];
                v.write(ino, 0, &n.to_le_bytes()).unwrap();
                let name = format!("new{n}");
                let a = v.create(ROOT_INO, name.as_bytes(), 0o644, 0, 0).unwrap();
                v.write(a.ino, 0, b"x").unwrap();
                if n % 2 == 1 {
                    v.unlink(ROOT_INO, format!("new{}", n - 1).as_bytes())
                        .unwrap();
                }
                if n % 200 == 199 {
                    v.commit().unwrap();
                }
                worst = worst.max(t.elapsed());
                n += 1;
            }
            (worst, n)
        })
    };
    let max_live = std::env::var("KMSFS_BENCH_MAX_LIVE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.5);
    let t = Instant::now();
    // The same probes without a clean, for comparison: how long the probes'
    // own commits make them wait.
    let stats = match std::env::var("KMSFS_BENCH_BASELINE_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        Some(secs) => {
            std::thread::sleep(Duration::from_secs_f64(secs));
            println!("baseline: no clean, the probes alone");
            Default::default()
        }
        None => v.clean(max_live).unwrap(),
    };
    let clean = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (worst, reads) = probe.join().unwrap();
    let (worst_change, changes) = writer.join().unwrap();
    let fsck = v.fsck().unwrap();
    assert!(fsck.is_clean(), "{:?}", fsck.errors);
    println!(
        "{files} files, {snaps} snapshots (setup {:.1} s): clean took {:.2} s \
         ({} segments removed, {} blocks moved, {:.1} MB freed); longest getattr wait \
         {:.3} s ({reads} getattrs), longest change {:.3} s ({changes} changes, a commit \
         every 200)",
        setup.as_secs_f64(),
        clean.as_secs_f64(),
        stats.segments_removed,
        stats.blocks_moved,
        stats.bytes_freed as f64 / 1e6,
        worst.as_secs_f64(),
        worst_change.as_secs_f64(),
    );
}
