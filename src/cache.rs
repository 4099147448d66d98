//! The decrypted-block cache.
//!
//! Bounded in bytes, split into shards each behind its own read-write lock, so
//! concurrent readers never wait on one global lock and hits share their shard's
//! lock (see [`BlockCache`]). Keys are
//! the random ids of sealed blocks (unique per sealing), so an entry can never be
//! stale: a rewritten block gets a new id. Plaintext is zeroized when the last
//! reference to an evicted entry goes away.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Plaintext of one block; wiped on drop.
pub struct Plain(pub Vec<u8>);

impl Drop for Plain {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// Overwrites a buffer with zeros before it is freed.
///
/// `zeroize` writes byte by byte through volatile stores, which costs more
/// than sealing the block did (it showed as 11% of a streaming profile). A
/// plain `fill` runs at memset speed; `black_box` on the buffer afterwards
/// keeps the compiler from eliding the stores as dead, as zeroize's fence does.
pub fn wipe(buf: &mut Vec<u8>) {
    let cap = buf.capacity();
    // SAFETY: writes `cap` zero bytes into the allocation `buf` owns, through a
    // raw pointer (no reference to its uninitialised spare capacity is made).
    unsafe { std::ptr::write_bytes(buf.as_mut_ptr(), 0, cap) };
    std::hint::black_box(buf.as_mut_ptr());
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    buf.clear();
}

impl std::fmt::Debug for Plain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Plain({} bytes)", self.0.len())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub bytes: u64,
    pub capacity: u64,
}

/// An entry weighs its plaintext bytes (at least 1, so no entry is exempt
/// from eviction).
#[derive(Clone)]
struct Bytes;

impl quick_cache::Weighter<u128, Arc<Plain>> for Bytes {
    fn weight(&self, _: &u128, v: &Arc<Plain>) -> u64 {
        (v.0.len() as u64).max(1)
    }
}

/// Counts evictions and hands evicted entries to the caller's request state,
/// so their plaintext is wiped (a memset of a whole block) after the shard
/// lock is released, not while other threads wait on it.
#[derive(Clone)]
struct Evict(Arc<AtomicU64>);

impl quick_cache::Lifecycle<u128, Arc<Plain>> for Evict {
    type RequestState = Vec<Arc<Plain>>;

    fn on_evict(&self, state: &mut Self::RequestState, _: u128, v: Arc<Plain>) {
        self.0.fetch_add(1, Ordering::Relaxed);
        state.push(v);
    }
}

type Inner =
    quick_cache::sync::Cache<u128, Arc<Plain>, Bytes, quick_cache::DefaultHashBuilder, Evict>;

/// The expected size of an entry, for the cache's item-count estimate (its
/// initial hash table and the length of the ghost list that gives scan
/// resistance): the default block size. With smaller blocks the table grows
/// as needed and the ghost list remembers fewer evicted keys than entries.
const TYPICAL_ENTRY: usize = 64 * 1024;

/// Decrypted blocks, bounded by their plaintext bytes.
///
/// A `quick_cache` (S3-FIFO: a small probation queue, a main queue and a
/// ghost list of recently evicted keys, in shards behind read-write locks).
/// Against the sharded LRU it replaced it keeps a hot set through a one-pass
/// scan larger than the cache, and a hit takes only a read lock (see
/// docs/PERFORMANCE.md, "Cache and concurrent readers", and
/// `examples/cache_bench.rs`).
pub struct BlockCache {
    inner: Inner,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: Arc<AtomicU64>,
}

impl BlockCache {
    pub fn new(capacity_bytes: usize) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        BlockCache {
            inner: Inner::with(
                (capacity_bytes / TYPICAL_ENTRY).max(1),
                capacity_bytes as u64,
                Bytes,
                quick_cache::DefaultHashBuilder::default(),
                Evict(evictions.clone()),
            ),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions,
        }
    }

    pub fn get(&self, id: u128) -> Option<Arc<Plain>> {
        let r = self.inner.get(&id);
        match &r {
            Some(_) => self.hits.fetch_add(1, Ordering::Relaxed),
            None => self.misses.fetch_add(1, Ordering::Relaxed),
        };
        r
    }

    /// Inserts (or replaces) an entry. An entry larger than a shard's share of
    /// the capacity is not kept (and counts as evicted).
    pub fn insert(&self, id: u128, value: Arc<Plain>) {
        let mut evicted = Vec::new();
        self.inner.insert_with_lifecycle(id, value, &mut evicted);
        // `evicted` drops here, outside the shard lock.
    }

    pub fn remove(&self, id: u128) {
        // The removed entry drops after the shard lock is released.
        let _ = self.inner.remove(&id);
    }

    pub fn clear(&self) {
        self.inner.clear();
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            bytes: self.inner.weight(),
            capacity: self.inner.capacity(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_counted() {
        let c = BlockCache::new(16 * 4096);
        for i in 0..100u128 {
            c.insert(i * 16, Arc::new(Plain(vec![1; 4096])));
        }
        let s = c.stats();
        assert!(s.bytes <= 16 * 4096, "{s:?}");
        assert!(s.evictions >= 84, "{s:?}");
        assert!(c.get(99 * 16).is_some());
        // Never inserted. (Which old entries went is the eviction policy's
        // choice: S3-FIFO keeps the first ones, admitted while the cache filled.)
        assert!(c.get(5).is_none());
        let s = c.stats();
        assert_eq!((s.hits, s.misses), (1, 1));
    }

    #[test]
    fn wipe_clears_the_whole_allocation() {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&[7u8; 40]);
        v.truncate(10);
        let p = v.as_ptr();
        wipe(&mut v);
        assert!(v.is_empty());
        // SAFETY: the allocation is still owned by `v` (capacity 64).
        let all = unsafe { std::slice::from_raw_parts(p, 64) };
        assert!(all[..40].iter().all(|&b| b == 0));
    }

    #[test]
    fn concurrent_readers() {
        let c = Arc::new(BlockCache::new(1 << 20));
        for i in 0..64u128 {
            c.insert(i, Arc::new(Plain(vec![i as u8; 1024])));
        }
        std::thread::scope(|s| {
            for _ in 0..4 {
                let c = c.clone();
                s.spawn(move || {
                    for n in 0..10_000u128 {
                        let i = n % 64;
                        assert_eq!(c.get(i).unwrap().0[0], i as u8);
                    }
                });
            }
        });
        assert_eq!(c.stats().hits, 40_000);
    }

    #[test]
    fn bounded_in_bytes_under_concurrent_inserts() {
        // Entries of mixed sizes from two threads; the bound holds throughout.
        let cap = 64 * 4096;
        let c = BlockCache::new(cap);
        std::thread::scope(|s| {
            for t in 0..2u128 {
                let c = &c;
                s.spawn(move || {
                    for i in 0..2_000u128 {
                        let len = 512 + ((i * 7 + t) % 8) as usize * 1024;
                        c.insert((t << 64) | i, Arc::new(Plain(vec![1; len])));
                        assert!(c.stats().bytes <= cap as u64, "{:?}", c.stats());
                    }
                });
            }
        });
        let s = c.stats();
        assert!(s.bytes <= cap as u64 && s.bytes > 0, "{s:?}");
        assert!(s.evictions > 0, "{s:?}");
        assert_eq!(s.capacity, cap as u64);
    }

    #[test]
    fn stats_count_hits_misses_and_evictions() {
        let c = BlockCache::new(8 * 1024);
        assert_eq!(
            c.stats(),
            CacheStats {
                capacity: 8 * 1024,
                ..Default::default()
            }
        );
        c.insert(1, Arc::new(Plain(vec![1; 1024])));
        assert!(c.get(1).is_some());
        assert!(c.get(2).is_none());
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.evictions, s.bytes), (1, 1, 0, 1024));
        c.remove(1);
        assert!(c.get(1).is_none());
        assert_eq!(c.stats().bytes, 0);
        // An entry larger than the cache is not kept.
        c.insert(3, Arc::new(Plain(vec![1; 16 * 1024])));
        assert!(c.get(3).is_none());
        assert_eq!(c.stats().bytes, 0);
        for i in 0..4 {
            c.insert(10 + i, Arc::new(Plain(vec![1; 1024])));
        }
        c.clear();
        assert_eq!(c.stats().bytes, 0);
        assert!(c.get(10).is_none());
    }

    #[test]
    fn a_hot_set_survives_a_one_pass_scan() {
        // 64 entries of capacity; 16 hot ones read twice, then 256 new ones once.
        let c = BlockCache::new(64 * 1024);
        for _ in 0..2 {
            for i in 0..16u128 {
                if c.get(i).is_none() {
                    c.insert(i, Arc::new(Plain(vec![1; 1024])));
                }
            }
        }
        for i in 1000..1256u128 {
            if c.get(i).is_none() {
                c.insert(i, Arc::new(Plain(vec![1; 1024])));
            }
        }
        let kept = (0..16u128).filter(|&i| c.get(i).is_some()).count();
        assert_eq!(kept, 16, "{:?}", c.stats());
    }

    #[test]
    fn evicted_plaintext_is_dropped_by_the_cache() {
        // The cache holds the only references: an evicted entry is dropped
        // (and its Drop wipes it, see `wipe_clears_the_whole_allocation`), so
        // exactly the entries still cached are alive.
        let c = BlockCache::new(4 * 1024);
        let watch: Vec<_> = (0..64u128)
            .map(|i| {
                let v = Arc::new(Plain(vec![9; 1024]));
                let w = Arc::downgrade(&v);
                c.insert(i, v);
                w
            })
            .collect();
        let s = c.stats();
        assert!(s.evictions >= 60, "{s:?}");
        let alive: Vec<u128> = (0..64u128)
            .filter(|&i| watch[i as usize].upgrade().is_some())
            .collect();
        assert!(alive.len() <= 4, "{alive:?} alive, {s:?}");
        for i in 0..64u128 {
            assert_eq!(c.get(i).is_some(), alive.contains(&i), "entry {i}");
        }
        c.clear();
        assert!(
            watch.iter().all(|w| w.upgrade().is_none()),
            "clear kept an entry alive"
        );
    }
}
