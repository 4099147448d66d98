//! Engine-level benchmark (no FUSE): the volume core on a real directory, for each
//! block size, so that the default block size is chosen by measurement.
//!
//! For each block size it creates a fresh volume in a temporary directory and measures:
//! - sequential write of a file in 1 MiB writes, then `commit` (which syncs);
//! - sequential read of it in 1 MiB reads after reopening the volume (and dropping
//!   the OS page cache when running as root), i.e. every block decrypted once;
//! - cache-hit reads of a 64 MiB region already in the decrypted-block cache, with
//!   1 and 2 threads;
//! - 4 KiB random writes (aligned, inside the file) for a bounded time, then `commit`;
//! - 4 KiB random reads after reopening (cold block cache).
//!
//! Run: `cargo run --release --example engine_bench` (or `bench/engine.sh`).
//! Environment:
//! - `KMSFS_BENCH_SIZE`: file size, default `1G` (suffixes K, M, G);
//! - `KMSFS_BENCH_BLOCK_SIZES`: default `4K,16K,64K,128K,1M`;
//! - `KMSFS_BENCH_CIPHER`: `aes-256-gcm-siv` (default) or `xchacha20-poly1305`;
//! - `KMSFS_BENCH_RANDOM_SECS`: time bound of each random phase, default `10`;
//! - `KMSFS_BENCH_RANDOM_OPS`: op bound of each random phase, default `100000`;
//! - `KMSFS_BENCH_DIR`: where the temporary volumes go (default: `$TMPDIR`).

use std::error::Error;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kmsfs::crypto::{CipherKind, KdfParams, Passphrase};
use kmsfs::kms::keystore::{LocalKeystore, Unlock};
use kmsfs::store::{FsStorage, Storage};
use kmsfs::volume::{CreateOptions, OpenOptions, Volume};

type BoxResult<T> = Result<T, Box<dyn Error>>;

const CHUNK: usize = 1 << 20;
const SMALL: usize = 4096;
const CACHE_REGION: u64 = 64 << 20;
const CACHE_PASSES: usize = 8;
const CACHE_READ: usize = 64 << 10;

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok().map(|n| n * mult)
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{}G", bytes >> 30)
    } else if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{}M", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{}K", bytes >> 10)
    } else {
        format!("{bytes}")
    }
}

/// Small deterministic PRNG (xorshift64*), enough for offsets and filler bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Drops the OS page cache when allowed (root); returns whether it did.
fn drop_caches() -> bool {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", b"3\n").is_ok()
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

struct Row {
    block: u32,
    write: f64,
    read: f64,
    hit1: f64,
    hit2: f64,
    rand_write: f64,
    rand_read: f64,
    overhead: f64,
}

fn open(storage: &Arc<dyn Storage>, ks: &LocalKeystore) -> BoxResult<Volume> {
    Ok(Volume::open(storage.clone(), ks, OpenOptions::default())?)
}

fn bench_block_size(
    dir: &Path,
    ks: &LocalKeystore,
    cipher: CipherKind,
    block: u32,
    size: u64,
    rand_secs: Duration,
    rand_ops: u64,
) -> BoxResult<Row> {
    let vol_dir = dir.join(format!("vol-{}", human(block as u64)));
    std::fs::create_dir_all(&vol_dir)?;
    let storage: Arc<dyn Storage> = Arc::new(FsStorage::new(&vol_dir));
    let opts = CreateOptions {
        cipher,
        block_size: block,
        ..CreateOptions::default()
    };
    Volume::init(storage.clone(), ks, &opts)?;

    let mut rng = Rng(0x0123_4567_89AB_CDEF ^ block as u64);
    let mut chunk = vec![0u8; CHUNK];
    rng.fill(&mut chunk);

    // Sequential write + commit.
    let vol = open(&storage, ks)?;
    let ino = vol.create(1, b"big", 0o644, 0, 0)?.ino;
    let t = Instant::now();
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(CHUNK as u64) as usize;
        vol.write(ino, off, &chunk[..n])?;
        off += n as u64;
    }
    vol.commit()?;
    let write = mbps(size, t.elapsed());
    let overhead = vol.stored_bytes()? as f64 / size as f64;
    drop(vol);

    // Sequential read, cold.
    drop_caches();
    let vol = open(&storage, ks)?;
    let t = Instant::now();
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(CHUNK as u64) as u32;
        let got = vol.read(ino, off, n)?;
        if got.len() != n as usize || got[..] != chunk[..n as usize] {
            return Err(format!("block size {block}: wrong data read back at offset {off}").into());
        }
        off += n as u64;
    }
    let read = mbps(size, t.elapsed());

    // Cache hits: warm a region, then read it again with 1 and 2 threads.
    // 64 KiB reads: reads of 128 KiB and more decrypt whole blocks straight
    // into the caller's buffer and bypass the cache by design.
    let region = size.min(CACHE_REGION);
    let read_region = |vol: &Volume| -> BoxResult<()> {
        let mut off = 0u64;
        while off < region {
            let n = (region - off).min(CACHE_READ as u64) as u32;
            std::hint::black_box(vol.read(ino, off, n)?);
            off += n as u64;
        }
        Ok(())
    };
    read_region(&vol)?;
    let t = Instant::now();
    for _ in 0..CACHE_PASSES {
        read_region(&vol)?;
    }
    let hit1 = mbps(region * CACHE_PASSES as u64, t.elapsed());
    let t = Instant::now();
    std::thread::scope(|s| -> BoxResult<()> {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| -> Result<(), String> {
                    for _ in 0..CACHE_PASSES {
                        read_region(&vol).map_err(|e| e.to_string())?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "reader thread panicked")??;
        }
        Ok(())
    })?;
    let hit2 = mbps(2 * region * CACHE_PASSES as u64, t.elapsed());
    drop(vol);

    // Random 4 KiB writes, then one commit (counted in the time).
    let slots = (size / SMALL as u64).max(1);
    let vol = open(&storage, ks)?;
    let mut small = vec![0u8; SMALL];
    let t = Instant::now();
    let mut ops = 0u64;
    while ops < rand_ops && (!ops.is_multiple_of(64) || t.elapsed() < rand_secs) {
        rng.fill(&mut small[..16]);
        let off = (rng.next() % slots) * SMALL as u64;
        vol.write(ino, off, &small)?;
        ops += 1;
    }
    vol.commit()?;
    let rand_write = ops as f64 / t.elapsed().as_secs_f64();
    drop(vol);

    // Random 4 KiB reads, cold block cache.
    drop_caches();
    let vol = open(&storage, ks)?;
    let t = Instant::now();
    let mut ops = 0u64;
    while ops < rand_ops && (!ops.is_multiple_of(64) || t.elapsed() < rand_secs) {
        let off = (rng.next() % slots) * SMALL as u64;
        std::hint::black_box(vol.read(ino, off, SMALL as u32)?);
        ops += 1;
    }
    let rand_read = ops as f64 / t.elapsed().as_secs_f64();
    drop(vol);

    std::fs::remove_dir_all(&vol_dir)?;
    Ok(Row {
        block,
        write,
        read,
        hit1,
        hit2,
        rand_write,
        rand_read,
        overhead,
    })
}

fn main() -> BoxResult<()> {
    let size = parse_size(&env_or("KMSFS_BENCH_SIZE", "1G")).ok_or("bad KMSFS_BENCH_SIZE")?;
    let blocks: Vec<u32> = env_or("KMSFS_BENCH_BLOCK_SIZES", "4K,16K,64K,128K,1M")
        .split(',')
        .map(|s| parse_size(s).and_then(|n| u32::try_from(n).ok()))
        .collect::<Option<_>>()
        .ok_or("bad KMSFS_BENCH_BLOCK_SIZES")?;
    let cipher_name = env_or("KMSFS_BENCH_CIPHER", "aes-256-gcm-siv");
    let cipher = CipherKind::parse(&cipher_name).ok_or("bad KMSFS_BENCH_CIPHER")?;
    let rand_secs = Duration::from_secs_f64(
        env_or("KMSFS_BENCH_RANDOM_SECS", "10")
            .parse()
            .map_err(|_| "bad KMSFS_BENCH_RANDOM_SECS")?,
    );
    let rand_ops: u64 = env_or("KMSFS_BENCH_RANDOM_OPS", "100000")
        .parse()
        .map_err(|_| "bad KMSFS_BENCH_RANDOM_OPS")?;
    let tmp = match std::env::var_os("KMSFS_BENCH_DIR") {
        Some(d) => tempfile::Builder::new()
            .prefix("kmsfs-engine-bench.")
            .tempdir_in(d)?,
        None => tempfile::Builder::new()
            .prefix("kmsfs-engine-bench.")
            .tempdir()?,
    };
    let ks = LocalKeystore::open_or_create_with_params(
        &tmp.path().join("keystore"),
        Unlock::Passphrase(Passphrase::new("engine bench".to_string())),
        KdfParams::for_tests(),
    )?;
    let cold = drop_caches();

    let mut out = String::new();
    writeln!(
        out,
        "kmsfs engine benchmark (no FUSE): {} file, {}, 1 MiB sequential I/O, random phases \
         bounded by {} s or {} ops, in {}{}",
        human(size),
        cipher.name(),
        rand_secs.as_secs_f64(),
        rand_ops,
        tmp.path().display(),
        if cold {
            ""
        } else {
            " (page cache NOT dropped: not root)"
        }
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| block | seq write MB/s | seq read MB/s | cache-hit read MB/s (1 thr) | cache-hit read MB/s (2 thr) | rand 4K write ops/s | rand 4K read ops/s | stored/logical |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    print!("{out}");
    for &b in &blocks {
        let r = bench_block_size(tmp.path(), &ks, cipher, b, size, rand_secs, rand_ops)?;
        let line = format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.3} |",
            human(r.block as u64),
            r.write,
            r.read,
            r.hit1,
            r.hit2,
            r.rand_write,
            r.rand_read,
            r.overhead
        );
        println!("{line}");
    }
    Ok(())
}
