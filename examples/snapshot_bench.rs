//! Snapshot figures (engine, real directory): time to take a snapshot of a
//! small and of a large volume, and the store size through the space scenario
//! (write, snapshot, overwrite 10%, delete the snapshot, clean).
//!
//! Run: `cargo run --release --example snapshot_bench`
//! Environment: `KMSFS_BENCH_SMALL_MB` (default 10), `KMSFS_BENCH_LARGE_MB` (10240),
//! `KMSFS_BENCH_SPACE_MB` (1024), `KMSFS_BENCH_DIR` (default: $TMPDIR).

use std::sync::Arc;
use std::time::Instant;

use kmsfs::crypto::{KdfParams, Passphrase};
use kmsfs::kms::keystore::{LocalKeystore, Unlock};
use kmsfs::store::{FsStorage, Storage};
use kmsfs::volume::{CreateOptions, OpenOptions, ROOT_INO, Volume};

const MIB: u64 = 1 << 20;

fn env_mb(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn chunk(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..MIB as usize)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn fresh(base: &std::path::Path, kms: &LocalKeystore, name: &str) -> (Volume, Arc<dyn Storage>) {
    let dir = base.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let s: Arc<dyn Storage> = Arc::new(FsStorage::new(&dir));
    Volume::init(s.clone(), kms, &CreateOptions::default()).unwrap();
    let v = Volume::open(s.clone(), kms, OpenOptions::default()).unwrap();
    (v, s)
}

fn fill(v: &Volume, mb: u64, seed: u64) -> u64 {
    let f = v.create(ROOT_INO, b"data", 0o644, 0, 0).unwrap();
    let c = chunk(seed);
    for i in 0..mb {
        // Vary each MiB cheaply so no two blocks are alike.
        let mut b = c.clone();
        b[..8].copy_from_slice(&i.to_le_bytes());
        v.write(f.ino, i * MIB, &b).unwrap();
    }
    v.commit().unwrap();
    f.ino
}

fn main() {
    let base = match std::env::var_os("KMSFS_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let kms = LocalKeystore::open_or_create_with_params(
        &base.path().join("keystore"),
        Unlock::Passphrase(Passphrase::new("bench".into())),
        KdfParams::for_tests(),
    )
    .unwrap();
    println!("| volume | data written | snapshot create (median of 5) |");
    println!("|---|---:|---:|");
    for (name, mb) in [
        ("small", env_mb("KMSFS_BENCH_SMALL_MB", 10)),
        ("large", env_mb("KMSFS_BENCH_LARGE_MB", 10240)),
    ] {
        let (v, _) = fresh(base.path(), &kms, name);
        fill(&v, mb, 1);
        let mut times = Vec::new();
        for i in 0..5 {
            let t = Instant::now();
            v.snapshot_create(&format!("s{i}")).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("| {name} | {mb} MiB | {:.2} ms |", times[2]);
        drop(v);
        std::fs::remove_dir_all(base.path().join(name)).unwrap();
    }
    let mb = env_mb("KMSFS_BENCH_SPACE_MB", 1024);
    let (v, _) = fresh(base.path(), &kms, "space");
    let ino = fill(&v, mb, 2);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let s0 = v.stored_bytes().unwrap();
    v.snapshot_create("before").unwrap();
    let c = chunk(3);
    for i in 0..mb / 10 {
        v.write(ino, i * MIB, &c).unwrap();
    }
    v.commit().unwrap();
    v.clean(0.5).unwrap();
    let s1 = v.stored_bytes().unwrap();
    let info = v.snapshot_list().unwrap();
    v.snapshot_delete("before").unwrap();
    let s2 = v.stored_bytes().unwrap();
    println!();
    println!("space scenario, {mb} MiB file, 10% overwritten:");
    println!("| step | store size |");
    println!("|---|---:|");
    println!("| written, committed | {:.3} GiB |", gib(s0));
    println!(
        "| snapshot + 10% overwritten | {:.3} GiB (snapshot holds {:.3} GiB alone, shares {:.3} GiB) |",
        gib(s1),
        gib(info[0].exclusive_bytes),
        gib(info[0].shared_bytes)
    );
    println!("| snapshot deleted, cleaned | {:.3} GiB |", gib(s2));
}
