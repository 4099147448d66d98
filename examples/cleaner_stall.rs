//! Cleaner stall (engine, real directory): the cleaner holds the volume's
//! write lock for its whole run today, so the longest time a FUSE request can
//! wait behind it is the duration of one clean. This measures that duration
//! with N small files and S snapshots, the files changed between snapshots so
//! that each snapshot holds its own metadata, half of them deleted before the
//! clean, and a probe thread that calls `getattr` in a loop and records its
//! longest wait.
//!
//! Run: `cargo run --release --example cleaner_stall`
//! Environment: `KMSFS_BENCH_FILES` (default 200000), `KMSFS_BENCH_SNAPSHOTS`
//! (5), `KMSFS_BENCH_DIR` (default: $TMPDIR).

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
    // The probe: one getattr after another, the longest wait recorded.
    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let (v, stop, ino) = (v.clone(), stop.clone(), inos[1]);
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                v.getattr(ino).unwrap();
                worst = worst.max(t.elapsed());
            }
            worst
        })
    };
    let t = Instant::now();
    let stats = v.clean(0.5).unwrap();
    let clean = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let worst = probe.join().unwrap();
    println!(
        "{files} files, {snaps} snapshots (setup {:.1} s): clean took {:.2} s \
         ({} segments removed, {} blocks moved); longest getattr wait {:.2} s",
        setup.as_secs_f64(),
        clean.as_secs_f64(),
        stats.segments_removed,
        stats.blocks_moved,
        worst.as_secs_f64()
    );
}
