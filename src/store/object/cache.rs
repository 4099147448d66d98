//! The bounded on-disk cache of object bytes (ciphertext only).
//!
//! Objects of a volume are written once (segment parts) or replaced whole
//! under a condition (root slots, header), so a byte range of a part object
//! never changes: it is cached under the object key and the range. The cache
//! holds exactly the bytes the store returned, which are sealed records and
//! segment headers: never plaintext, never key material. Entries are files
//! named by a SHA-256 of (key, offset, length), written through a temporary
//! name and renamed, so a crash leaves either a whole entry or none; the
//! total size is bounded, least recently used entries going first. Entries
//! are not trusted: every record read from one is checked by the engine like
//! one read from the store (its parent's tag and its AEAD).

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

/// One cached range.
struct Entry {
    size: u64,
    tick: u64,
}

struct Index {
    entries: HashMap<String, Entry>,
    total: u64,
    tick: u64,
}

pub struct DiskCache {
    dir: PathBuf,
    limit: u64,
    idx: Mutex<Index>,
    /// Bytes served from the cache and fetched into it (for figures and tests).
    pub hits: std::sync::atomic::AtomicU64,
}

fn entry_name(key: &str, offset: u64, len: u64) -> String {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.update(b"\0");
    h.update(offset.to_le_bytes());
    h.update(len.to_le_bytes());
    let d = h.finalize();
    d.iter().take(20).map(|b| format!("{b:02x}")).collect()
}

impl DiskCache {
    /// Opens (creating, mode 0700) the cache in `dir`, bounded to `limit`
    /// bytes; entries left by an earlier run are kept, oldest first to go.
    pub fn open(dir: &Path, limit: u64) -> io::Result<DiskCache> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mut found: Vec<(String, u64, std::time::SystemTime)> = Vec::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(md) = e.metadata() else { continue };
            if !md.is_file() {
                continue;
            }
            if name.ends_with(".tmp") || name.len() != 40 {
                let _ = fs::remove_file(e.path());
                continue;
            }
            found.push((
                name,
                md.len(),
                md.modified().unwrap_or(std::time::UNIX_EPOCH),
            ));
        }
        found.sort_by_key(|f| f.2);
        let mut idx = Index {
            entries: HashMap::new(),
            total: 0,
            tick: 0,
        };
        for (name, size, _) in found {
            idx.tick += 1;
            idx.total += size;
            idx.entries.insert(
                name,
                Entry {
                    size,
                    tick: idx.tick,
                },
            );
        }
        let c = DiskCache {
            dir: dir.to_path_buf(),
            limit,
            idx: Mutex::new(idx),
            hits: 0.into(),
        };
        c.evict(0);
        Ok(c)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Total bytes held now.
    pub fn used(&self) -> u64 {
        self.idx.lock().total
    }

    /// Reads `buf.len()` bytes at `within` of the entry for (key, offset, len).
    pub fn get(&self, key: &str, offset: u64, len: u64, within: u64, buf: &mut [u8]) -> bool {
        let name = entry_name(key, offset, len);
        {
            let mut idx = self.idx.lock();
            idx.tick += 1;
            let t = idx.tick;
            match idx.entries.get_mut(&name) {
                Some(e) if e.size == len => e.tick = t,
                _ => return false,
            }
        }
        let ok = fs::File::open(self.dir.join(&name))
            .and_then(|f| f.read_exact_at(buf, within))
            .is_ok();
        if ok {
            self.hits
                .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.forget(&name);
        }
        ok
    }

    fn forget(&self, name: &str) {
        let mut idx = self.idx.lock();
        if let Some(e) = idx.entries.remove(name) {
            idx.total -= e.size;
        }
        let _ = fs::remove_file(self.dir.join(name));
    }

    /// Stores `data` as the entry for (key, offset, data.len()). Failures
    /// (a full disk) only cost a later refetch.
    pub fn put(&self, key: &str, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if len > self.limit / 4 {
            return;
        }
        let name = entry_name(key, offset, len);
        if self.idx.lock().entries.contains_key(&name) {
            return;
        }
        self.evict(len);
        let tmp = self.dir.join(format!("{name}.{}.tmp", std::process::id()));
        let r = (|| -> io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(data)?;
            fs::rename(&tmp, self.dir.join(&name))
        })();
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
            return;
        }
        let mut idx = self.idx.lock();
        idx.tick += 1;
        let t = idx.tick;
        if idx
            .entries
            .insert(name, Entry { size: len, tick: t })
            .is_none()
        {
            idx.total += len;
        }
    }

    /// Drops least recently used entries until `extra` more bytes fit.
    fn evict(&self, extra: u64) {
        let mut idx = self.idx.lock();
        if idx.total + extra <= self.limit {
            return;
        }
        let mut order: Vec<(u64, String)> = idx
            .entries
            .iter()
            .map(|(n, e)| (e.tick, n.clone()))
            .collect();
        order.sort();
        for (_, n) in order {
            if idx.total + extra <= self.limit {
                break;
            }
            if let Some(e) = idx.entries.remove(&n) {
                idx.total -= e.size;
                let _ = fs::remove_file(self.dir.join(&n));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_reopened() {
        let d = tempfile::tempdir().unwrap();
        let c = DiskCache::open(d.path(), 4096).unwrap();
        for i in 0..10u64 {
            c.put("seg/a", i * 1000, &[i as u8; 1000]);
            assert!(c.used() <= 4096);
        }
        let mut b = [0u8; 10];
        assert!(c.get("seg/a", 9000, 1000, 5, &mut b));
        assert_eq!(b, [9u8; 10]);
        assert!(!c.get("seg/a", 0, 1000, 0, &mut b), "evicted");
        // A damaged (short) entry is a miss, never a panic.
        let c2 = DiskCache::open(d.path(), 4096).unwrap();
        assert!(c2.used() <= 4096 && c2.used() > 0);
        for e in fs::read_dir(d.path()).unwrap() {
            fs::write(e.unwrap().path(), b"x").unwrap();
        }
        assert!(!c2.get("seg/a", 9000, 1000, 5, &mut b));
    }
}
