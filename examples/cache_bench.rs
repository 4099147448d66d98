//! The decrypted-block cache: the sharded LRU kmsfs had (16 `lru::LruCache`
//! shards behind mutexes, kept below as `ShardedLru`) measured against
//! `kmsfs::cache::BlockCache`, which is now a `quick_cache` weighted by bytes (the
//! same `Arc<Plain>` values, so plaintext is wiped on the last drop in both), with
//! 1 and 2 threads, under:
//! - `hit`: uniform random reads of a working set that fits (half the capacity);
//! - `scan`: one sequential pass over 4x the capacity, every key new (all misses:
//!   the cost of a miss + insert + eviction);
//! - `scan-resist`: a hot set (a quarter of the capacity) read 4 times, then a
//!   one-pass scan of 2x the capacity, then the hot set once more: the hit ratio of
//!   that last pass says whether the hot set survived the scan;
//! - `mixed`: 80% of reads from a hot set of half the capacity, 20% from a stream
//!   of keys never seen before.
//!
//! A miss allocates a block-sized buffer (what a decrypt would fill) and inserts it.
//! Figures: operations per second (all threads together) and the hit ratio, the
//! median of `KMSFS_BENCH_REPS` runs (default 3), caches alternated within each run.
//!
//! Run: `cargo run --release --example cache_bench`.
//! Environment: `KMSFS_BENCH_CACHE` capacity (default `256M`, the mount's default),
//! `KMSFS_BENCH_BLOCK` block size (default `64K`), `KMSFS_BENCH_OPS` reads per thread
//! per workload (default 200000), `KMSFS_BENCH_REPS` (default 3).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use kmsfs::cache::{BlockCache, Plain};
use parking_lot::Mutex;

/// The operations the workloads need, for both caches.
trait Cache: Sync {
    fn get(&self, id: u128) -> Option<Arc<Plain>>;
    fn insert(&self, id: u128, v: Arc<Plain>);
    fn bytes(&self) -> u64;
}

/// The block cache kmsfs had before (up to commit f27ab1c): 16 shards, each an
/// `lru::LruCache` behind a mutex, bounded in bytes; evicted entries drop inside
/// the shard lock. Kept here as the reference.
struct ShardedLru {
    shards: Vec<Mutex<LruShard>>,
    shard_cap: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

struct LruShard {
    lru: lru::LruCache<u128, Arc<Plain>>,
    bytes: usize,
}

impl ShardedLru {
    const SHARDS: usize = 16;

    fn new(capacity: usize) -> Self {
        ShardedLru {
            shards: (0..Self::SHARDS)
                .map(|_| {
                    Mutex::new(LruShard {
                        lru: lru::LruCache::unbounded(),
                        bytes: 0,
                    })
                })
                .collect(),
            shard_cap: capacity / Self::SHARDS,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: u128) -> &Mutex<LruShard> {
        &self.shards[(id as usize) % Self::SHARDS]
    }
}

impl Cache for ShardedLru {
    fn get(&self, id: u128) -> Option<Arc<Plain>> {
        let r = self.shard(id).lock().lru.get(&id).cloned();
        match &r {
            Some(_) => self.hits.fetch_add(1, Ordering::Relaxed),
            None => self.misses.fetch_add(1, Ordering::Relaxed),
        };
        r
    }
    fn insert(&self, id: u128, value: Arc<Plain>) {
        let len = value.0.len();
        if len > self.shard_cap {
            return;
        }
        let mut s = self.shard(id).lock();
        if let Some(old) = s.lru.put(id, value) {
            s.bytes -= old.0.len();
        }
        s.bytes += len;
        while s.bytes > self.shard_cap {
            match s.lru.pop_lru() {
                Some((_, v)) => {
                    s.bytes -= v.0.len();
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
                None => break,
            }
        }
    }
    fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.lock().bytes as u64).sum()
    }
}

/// kmsfs's cache today (`quick_cache` inside).
impl Cache for BlockCache {
    fn get(&self, id: u128) -> Option<Arc<Plain>> {
        BlockCache::get(self, id)
    }
    fn insert(&self, id: u128, v: Arc<Plain>) {
        BlockCache::insert(self, id, v)
    }
    fn bytes(&self) -> u64 {
        self.stats().bytes
    }
}

/// A random-looking 128-bit id for key number `n` (block ids are random).
fn key(n: u64) -> u128 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    ((z as u128) << 64) | (n as u128)
}

/// xorshift64*: the workloads' random choices.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One read through the cache: a hit, or a fresh buffer inserted. Returns hit.
fn read(c: &dyn Cache, id: u128, block: usize) -> bool {
    if let Some(v) = c.get(id) {
        std::hint::black_box(v.0.first());
        return true;
    }
    let v = Arc::new(Plain(vec![1u8; block]));
    c.insert(id, v);
    false
}

#[derive(Clone, Copy)]
enum Workload {
    Hit,
    Scan,
    ScanResist,
    Mixed,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Hit => "hit (working set 50% of capacity)",
            Workload::Scan => "scan (4x capacity, one pass)",
            Workload::ScanResist => "hot set after a 2x scan",
            Workload::Mixed => "mixed (80% hot 50%, 20% new)",
        }
    }
}

struct Params {
    capacity: usize,
    block: usize,
    ops: u64,
}

/// Runs a workload on a fresh cache with `threads` threads: (ops/s, hit ratio,
/// peak bytes seen over capacity).
fn run(c: &dyn Cache, w: Workload, threads: u64, p: &Params) -> (f64, f64, u64) {
    let blocks = (p.capacity / p.block) as u64;
    // Warm-up (not timed): the hot sets of the workloads that have one.
    let hot = match w {
        Workload::Hit | Workload::Mixed => blocks / 2,
        Workload::ScanResist => blocks / 4,
        Workload::Scan => 0,
    };
    for _ in 0..4 {
        for n in 0..hot {
            read(c, key(n), p.block);
        }
    }
    let over = std::sync::atomic::AtomicU64::new(0);
    let start = Instant::now();
    let results: Vec<(u64, u64)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let over = &over;
                s.spawn(move || {
                    let mut rng = Rng(0x1234_5678 + t * 0x9e37);
                    let (mut ops, mut hits) = (0u64, 0u64);
                    let mut fresh = 1u64 << 40 | t << 36;
                    let check = |ops: u64| {
                        if ops.is_multiple_of(4096) {
                            over.fetch_max(
                                c.bytes().saturating_sub(p.capacity as u64),
                                Ordering::Relaxed,
                            );
                        }
                    };
                    match w {
                        Workload::Hit => {
                            for _ in 0..p.ops {
                                hits += read(c, key(rng.next() % hot), p.block) as u64;
                                ops += 1;
                                check(ops);
                            }
                        }
                        Workload::Scan => {
                            // Each thread scans its share of 4x the capacity.
                            let n = 4 * blocks / threads;
                            for i in 0..n {
                                hits += read(c, key(fresh + i), p.block) as u64;
                                ops += 1;
                                check(ops);
                            }
                        }
                        Workload::ScanResist => {
                            let n = 2 * blocks / threads;
                            for i in 0..n {
                                read(c, key(fresh + i), p.block);
                                check(i);
                            }
                            // Only the pass over the hot set counts.
                            for i in (t..hot).step_by(threads as usize) {
                                hits += read(c, key(i), p.block) as u64;
                                ops += 1;
                            }
                        }
                        Workload::Mixed => {
                            for _ in 0..p.ops {
                                let r = rng.next();
                                let id = if r % 10 < 8 {
                                    key((r >> 8) % hot)
                                } else {
                                    fresh += 1;
                                    key(fresh)
                                };
                                hits += read(c, id, p.block) as u64;
                                ops += 1;
                                check(ops);
                            }
                        }
                    }
                    (ops, hits)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let ops: u64 = results.iter().map(|r| r.0).sum();
    let hits: u64 = results.iter().map(|r| r.1).sum();
    let ops_for_rate = match w {
        // The scan's reads are what took the time.
        Workload::ScanResist => 2 * blocks + ops,
        _ => ops,
    };
    (
        ops_for_rate as f64 / secs,
        hits as f64 / ops.max(1) as f64,
        over.load(Ordering::Relaxed),
    )
}

fn size_env(name: &str, default: usize) -> usize {
    let Ok(v) = std::env::var(name) else {
        return default;
    };
    let v = v.trim();
    let (num, mul) = match v.chars().last() {
        Some('K' | 'k') => (&v[..v.len() - 1], 1 << 10),
        Some('M' | 'm') => (&v[..v.len() - 1], 1 << 20),
        Some('G' | 'g') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    match num.parse::<usize>() {
        Ok(n) => n * mul,
        Err(_) => {
            eprintln!("{name}={v} is not a size (e.g. 64K, 256M); using {default}");
            default
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let p = Params {
        capacity: size_env("KMSFS_BENCH_CACHE", 256 << 20),
        block: size_env("KMSFS_BENCH_BLOCK", 64 << 10).max(1),
        ops: size_env("KMSFS_BENCH_OPS", 200_000) as u64,
    };
    let reps = size_env("KMSFS_BENCH_REPS", 3).max(1);
    println!(
        "capacity {} MiB, block {} KiB ({} blocks), {} reads per thread, median of {reps}",
        p.capacity >> 20,
        p.block >> 10,
        p.capacity / p.block,
        p.ops
    );
    println!();
    println!(
        "| workload | threads | sharded LRU ops/s | quick_cache ops/s | sharded LRU hit ratio | quick_cache hit ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for w in [
        Workload::Hit,
        Workload::Scan,
        Workload::ScanResist,
        Workload::Mixed,
    ] {
        for threads in [1u64, 2] {
            let mut f = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
            for r in 0..reps {
                for k in 0..2 {
                    // Alternate which cache goes first.
                    let which = (k + r) % 2;
                    let c: Box<dyn Cache> = if which == 0 {
                        Box::new(ShardedLru::new(p.capacity))
                    } else {
                        Box::new(BlockCache::new(p.capacity))
                    };
                    let (rate, ratio, over) = run(&*c, w, threads, &p);
                    assert!(
                        over <= p.block as u64,
                        "{} held {over} bytes over its capacity",
                        if which == 0 {
                            "sharded LRU"
                        } else {
                            "quick_cache"
                        }
                    );
                    f[which][0].push(rate);
                    f[which][1].push(ratio);
                }
            }
            println!(
                "| {} | {threads} | {:.0} | {:.0} | {:.3} | {:.3} |",
                w.name(),
                median(&mut f[0][0]),
                median(&mut f[1][0]),
                median(&mut f[0][1]),
                median(&mut f[1][1]),
            );
        }
    }
}
