//! `MemStorage`: an in-memory backend with an exact durability model and crash injection.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{PinFile, Storage};

/// One recorded mutating call, for crash-injection tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Write(String),
    Append(String, usize),
    Sync(String),
    Rename(String, String),
    Remove(String),
    SyncDir(String),
    CreateDir(String),
}

#[derive(Default, Clone)]
struct MemFile {
    data: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Default)]
struct MemState {
    /// Contents by file id.
    files: HashMap<u64, MemFile>,
    /// The namespace as the running system sees it.
    names: HashMap<String, u64>,
    /// The namespace as it would be found after a crash.
    durable_names: HashMap<String, u64>,
    dirs: Vec<String>,
    next_id: u64,
    ops: Vec<Op>,
    /// Mutating calls allowed before the simulated crash; None = no crash.
    crash_after: Option<usize>,
    crashed: bool,
    /// Bytes the "disk" holds at most (ENOSPC past it).
    capacity: Option<u64>,
    /// On crash, keep this many bytes of each unsynced append tail (torn writes).
    torn_keep: usize,
    /// Reader pins: contents, and a handle that lives as long as the reader
    /// holds the pin. Not part of the durable state (readers die in a crash).
    pins: HashMap<String, (Vec<u8>, std::sync::Weak<()>)>,
}

/// A pin published on a [`MemStorage`]; removed on drop.
struct MemPin {
    st: Arc<Mutex<MemState>>,
    name: String,
    _alive: Arc<()>,
}

impl Drop for MemPin {
    fn drop(&mut self) {
        self.st.lock().pins.remove(&self.name);
    }
}

/// An in-memory backend with an exact durability model and crash injection.
#[derive(Clone, Default)]
pub struct MemStorage {
    st: Arc<Mutex<MemState>>,
}

fn dir_of(name: &str) -> &str {
    match name.rfind('/') {
        Some(i) => &name[..i],
        None => "",
    }
}

fn crash_err() -> io::Error {
    io::Error::other("simulated crash: the storage is gone")
}

impl MemStorage {
    pub fn new() -> Self {
        let s = MemStorage::default();
        s.st.lock().dirs.push(String::new());
        s
    }

    /// The next `n` mutating calls succeed; every call after that fails as if
    /// the machine lost power.
    pub fn crash_after(&self, n: usize) {
        let mut st = self.st.lock();
        st.crash_after = Some(st.ops.len() + n);
    }

    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.st.lock().capacity = bytes;
    }

    /// On crash, unsynced data beyond the durable length keeps this many bytes
    /// (a torn write) instead of vanishing.
    pub fn set_torn_keep(&self, n: usize) {
        self.st.lock().torn_keep = n;
    }

    pub fn ops(&self) -> Vec<Op> {
        self.st.lock().ops.clone()
    }

    pub fn op_count(&self) -> usize {
        self.st.lock().ops.len()
    }

    pub fn used_bytes(&self) -> u64 {
        let st = self.st.lock();
        st.files.values().map(|f| f.data.len() as u64).sum()
    }

    /// Returns the storage as found after power comes back: only what was made
    /// durable survives (plus torn tails when configured).
    pub fn reboot(&self) -> MemStorage {
        let st = self.st.lock();
        let mut files = HashMap::new();
        for id in st.durable_names.values() {
            let f = &st.files[id];
            let mut data = f.durable.clone();
            if st.torn_keep > 0 && f.data.len() > data.len() && f.data.starts_with(&data) {
                let keep = st.torn_keep.min(f.data.len() - data.len());
                data.extend_from_slice(&f.data[f.durable.len()..f.durable.len() + keep]);
            }
            files.insert(
                *id,
                MemFile {
                    durable: data.clone(),
                    data,
                },
            );
        }
        let new = MemState {
            files,
            names: st.durable_names.clone(),
            durable_names: st.durable_names.clone(),
            dirs: st.dirs.clone(),
            next_id: st.next_id,
            ..Default::default()
        };
        MemStorage {
            st: Arc::new(Mutex::new(new)),
        }
    }

    /// Direct access for tamper tests.
    pub fn with_file<R>(&self, name: &str, f: impl FnOnce(&mut Vec<u8>) -> R) -> Option<R> {
        let mut st = self.st.lock();
        let id = *st.names.get(name)?;
        let file = st.files.get_mut(&id)?;
        let r = f(&mut file.data);
        file.durable = file.data.clone();
        Some(r)
    }

    /// Leaves a pin as a reader that died would: present, held by nobody.
    pub fn plant_stale_pin(&self, name: &str, data: &[u8]) {
        self.st
            .lock()
            .pins
            .insert(name.to_string(), (data.to_vec(), std::sync::Weak::new()));
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.st.lock().names.keys().cloned().collect();
        v.sort();
        v
    }

    fn mutate<R>(&self, op: Op, f: impl FnOnce(&mut MemState) -> io::Result<R>) -> io::Result<R> {
        let mut st = self.st.lock();
        if st.crashed {
            return Err(crash_err());
        }
        if let Some(limit) = st.crash_after
            && st.ops.len() >= limit
        {
            st.crashed = true;
            return Err(crash_err());
        }
        st.ops.push(op);
        f(&mut st)
    }
}

fn enospc(st: &MemState, extra: usize) -> io::Result<()> {
    if let Some(cap) = st.capacity {
        let used: u64 = st.files.values().map(|f| f.data.len() as u64).sum();
        if used + extra as u64 > cap {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
    }
    Ok(())
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{name}: no such file"))
}

impl Storage for MemStorage {
    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let st = self.st.lock();
        let id = st.names.get(name).ok_or_else(|| not_found(name))?;
        Ok(st.files[id].data.clone())
    }

    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let st = self.st.lock();
        let id = st.names.get(name).ok_or_else(|| not_found(name))?;
        let d = &st.files[id].data;
        let off = offset as usize;
        if off.checked_add(buf.len()).is_none_or(|end| end > d.len()) {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&d[off..off + buf.len()]);
        Ok(())
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        let st = self.st.lock();
        let id = st.names.get(name).ok_or_else(|| not_found(name))?;
        Ok(st.files[id].data.len() as u64)
    }

    fn write_file(&self, name: &str, data: &[u8]) -> io::Result<()> {
        self.mutate(Op::Write(name.into()), |st| {
            let old = st
                .names
                .get(name)
                .map(|id| st.files[id].data.len())
                .unwrap_or(0);
            enospc(st, data.len().saturating_sub(old))?;
            let id = match st.names.get(name) {
                Some(id) => *id,
                None => {
                    st.next_id += 1;
                    let id = st.next_id;
                    st.names.insert(name.into(), id);
                    st.files.insert(id, MemFile::default());
                    id
                }
            };
            st.files.get_mut(&id).unwrap().data = data.to_vec();
            Ok(())
        })
    }

    fn append(&self, name: &str, data: &[u8]) -> io::Result<()> {
        self.mutate(Op::Append(name.into(), data.len()), |st| {
            enospc(st, data.len())?;
            let id = match st.names.get(name) {
                Some(id) => *id,
                None => {
                    st.next_id += 1;
                    let id = st.next_id;
                    st.names.insert(name.into(), id);
                    st.files.insert(id, MemFile::default());
                    id
                }
            };
            st.files.get_mut(&id).unwrap().data.extend_from_slice(data);
            Ok(())
        })
    }

    fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        self.mutate(Op::Append(name.into(), data.len()), |st| {
            enospc(st, data.len())?;
            let id = match st.names.get(name) {
                Some(id) => *id,
                None => {
                    st.next_id += 1;
                    let id = st.next_id;
                    st.names.insert(name.into(), id);
                    st.files.insert(id, MemFile::default());
                    id
                }
            };
            let f = &mut st.files.get_mut(&id).unwrap().data;
            let start = usize::try_from(offset)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            let end = start + data.len();
            if f.len() < end {
                f.resize(end, 0);
            }
            f[start..end].copy_from_slice(data);
            Ok(())
        })
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        self.mutate(Op::Sync(name.into()), |st| {
            let id = *st.names.get(name).ok_or_else(|| not_found(name))?;
            let f = st.files.get_mut(&id).unwrap();
            f.durable = f.data.clone();
            Ok(())
        })
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.mutate(Op::Rename(from.into(), to.into()), |st| {
            let id = st.names.remove(from).ok_or_else(|| not_found(from))?;
            st.names.insert(to.into(), id);
            Ok(())
        })
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.mutate(Op::Remove(name.into()), |st| {
            st.names.remove(name).ok_or_else(|| not_found(name))?;
            Ok(())
        })
    }

    fn sync_dir(&self, dir: &str) -> io::Result<()> {
        self.mutate(Op::SyncDir(dir.into()), |st| {
            st.durable_names.retain(|n, _| dir_of(n) != dir);
            let entries: Vec<(String, u64)> = st
                .names
                .iter()
                .filter(|(n, _)| dir_of(n) == dir)
                .map(|(n, id)| (n.clone(), *id))
                .collect();
            st.durable_names.extend(entries);
            // Drop contents nobody can reach any more.
            let live: std::collections::HashSet<u64> = st
                .names
                .values()
                .chain(st.durable_names.values())
                .copied()
                .collect();
            st.files.retain(|id, _| live.contains(id));
            Ok(())
        })
    }

    fn create_dir(&self, dir: &str) -> io::Result<()> {
        self.mutate(Op::CreateDir(dir.into()), |st| {
            if !st.dirs.iter().any(|d| d == dir) {
                st.dirs.push(dir.into());
            }
            Ok(())
        })
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let st = self.st.lock();
        let mut v: Vec<String> = st
            .names
            .keys()
            .filter(|n| dir_of(n) == dir)
            .map(|n| n.rsplit('/').next().unwrap().to_string())
            .collect();
        v.sort();
        Ok(v)
    }

    fn space(&self) -> io::Result<(u64, u64)> {
        let st = self.st.lock();
        let used: u64 = st.files.values().map(|f| f.data.len() as u64).sum();
        let cap = st.capacity.unwrap_or(1 << 40);
        Ok((cap, cap.saturating_sub(used)))
    }

    fn describe(&self) -> String {
        "memory".into()
    }

    fn create_pin(
        &self,
        name: &str,
        data: &[u8],
    ) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        let mut st = self.st.lock();
        if st.pins.contains_key(name) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        let alive = Arc::new(());
        st.pins
            .insert(name.to_string(), (data.to_vec(), Arc::downgrade(&alive)));
        Ok(Box::new(MemPin {
            st: self.st.clone(),
            name: name.to_string(),
            _alive: alive,
        }))
    }

    fn list_pins(&self) -> io::Result<Vec<PinFile>> {
        let st = self.st.lock();
        let mut v: Vec<PinFile> = st
            .pins
            .iter()
            .map(|(name, (data, alive))| PinFile {
                name: name.clone(),
                data: data.clone(),
                held: alive.strong_count() > 0,
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    fn remove_pin(&self, name: &str) -> io::Result<()> {
        self.st
            .lock()
            .pins
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| not_found(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_durability_model() {
        let s = MemStorage::new();
        s.append("seg/a", b"hello").unwrap();
        s.sync("seg/a").unwrap();
        // Content synced but the name not yet: lost on crash.
        assert!(!s.reboot().exists("seg/a"));
        s.sync_dir("seg").unwrap();
        s.append("seg/a", b" world").unwrap();
        let r = s.reboot();
        assert_eq!(r.read("seg/a").unwrap(), b"hello");
        s.write_file("x.tmp", b"new").unwrap();
        s.sync("x.tmp").unwrap();
        s.rename("x.tmp", "x").unwrap();
        assert!(!s.reboot().exists("x"));
        s.sync_dir("").unwrap();
        assert_eq!(s.reboot().read("x").unwrap(), b"new");
    }

    #[test]
    fn mem_crash_after() {
        let s = MemStorage::new();
        s.crash_after(1);
        s.append("a", b"1").unwrap();
        assert!(s.append("a", b"2").is_err());
        assert!(s.sync("a").is_err());
    }

    #[test]
    fn mem_capacity() {
        let s = MemStorage::new();
        s.set_capacity(Some(10));
        s.append("a", b"12345").unwrap();
        let e = s.append("a", b"123456").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    }
}
