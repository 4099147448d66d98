//! The decrypted-block cache.
//!
//! Bounded in bytes, split into shards each behind its own short mutex, so
//! concurrent readers of different blocks never wait on one global lock. Keys are
//! the random ids of sealed blocks (unique per sealing), so an entry can never be
//! stale: a rewritten block gets a new id. Plaintext is zeroized when the last
//! reference to an evicted entry goes away.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lru::LruCache;
use parking_lot::Mutex;

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

struct Shard {
    lru: LruCache<u128, Arc<Plain>>,
    bytes: usize,
}

pub struct BlockCache {
    shards: Vec<Mutex<Shard>>,
    shard_cap: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

const SHARDS: usize = 16;

impl BlockCache {
    pub fn new(capacity_bytes: usize) -> Self {
        let shard_cap = capacity_bytes / SHARDS;
        BlockCache {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        lru: LruCache::unbounded(),
                        bytes: 0,
                    })
                })
                .collect(),
            shard_cap,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: u128) -> &Mutex<Shard> {
        // Block ids are random: any bits spread evenly.
        &self.shards[(id as usize) % SHARDS]
    }

    pub fn get(&self, id: u128) -> Option<Arc<Plain>> {
        let r = self.shard(id).lock().lru.get(&id).cloned();
        match &r {
            Some(_) => self.hits.fetch_add(1, Ordering::Relaxed),
            None => self.misses.fetch_add(1, Ordering::Relaxed),
        };
        r
    }

    pub fn insert(&self, id: u128, value: Arc<Plain>) {
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

    pub fn remove(&self, id: u128) {
        let mut s = self.shard(id).lock();
        if let Some(v) = s.lru.pop(&id) {
            s.bytes -= v.0.len();
        }
    }

    pub fn clear(&self) {
        for sh in &self.shards {
            let mut s = sh.lock();
            s.lru.clear();
            s.bytes = 0;
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            bytes: self.shards.iter().map(|s| s.lock().bytes as u64).sum(),
            capacity: (self.shard_cap * SHARDS) as u64,
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
        assert!(c.get(0).is_none());
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
}
