//! The write-back journal of an object store volume (`--writeback DIR`).
//!
//! Each `sync` of a segment (its new bytes) and each root commit is first an
//! entry appended to a journal file in DIR and made durable there (written,
//! `fdatasync`; a new journal file also syncs DIR); a background uploader
//! (`super::writeback`) then puts the entries into the store in order and
//! deletes journal files once every entry in them is acknowledged. The
//! journal holds what the store would hold: sealed segment bytes and sealed
//! root records, never plaintext or key material.
//!
//! The layout is specified byte by byte in docs/OBJECT-STORE.md
//! ("Write-back journal"): files `journal-NNNNNNNNNNNNNNNN` (16 hex digits),
//! each a 68-byte header (magic, version, volume id, file number, SHA-256)
//! followed by entries, each with its length and a SHA-256 of its bytes. A
//! damaged last entry of the last file is a write torn by a crash (never
//! acknowledged): it is ignored and cut off. Any other damage is an
//! integrity error, and nothing is uploaded.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 8] = b"KMSFSWBJ";
pub const VERSION: u32 = 1;
/// magic(8) version(4) volume_id(16) file_number(8) sha256(32).
pub const FILE_HEADER_LEN: usize = 68;
/// length(4) seq(8) kind(1) flags(1) name_len(2) ... offset(8) expect(32) ... sha256(32).
const ENTRY_FIXED: usize = 4 + 8 + 1 + 1 + 2 + 8 + 32 + 32;
/// Longest name an entry carries.
const MAX_NAME: usize = 1024;
/// A journal file is closed and a new one started past this size.
pub const FILE_TARGET: u64 = 64 << 20;
/// Name of the lock file in DIR (flock: one process per journal).
pub const LOCK_NAME: &str = "lock";
const FILE_PREFIX: &str = "journal-";

pub fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// What an entry does once uploaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The part object `NAME/OFFSET` of an appended file.
    Part { offset: u64 },
    /// The whole object NAME (a root slot), put with a condition: the store
    /// must hold the bytes with this SHA-256 (None: no object) before.
    Root { expect: Option<[u8; 32]> },
}

/// One entry as it lies in a journal file.
#[derive(Clone, Debug)]
pub struct Entry {
    pub seq: u64,
    pub kind: Kind,
    pub name: String,
    pub file: u64,
    /// Offset of the payload in the file, and its length.
    pub at: u64,
    pub len: u64,
    /// Length of the whole entry.
    pub size: u64,
}

fn file_name(n: u64) -> String {
    format!("{FILE_PREFIX}{n:016x}")
}

fn parse_file_name(s: &str) -> Option<u64> {
    let h = s.strip_prefix(FILE_PREFIX)?;
    (h.len() == 16).then(|| u64::from_str_radix(h, 16).ok())?
}

fn encode_file_header(volume_id: &[u8; 16], n: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(FILE_HEADER_LEN);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(volume_id);
    b.extend_from_slice(&n.to_le_bytes());
    let h = sha256(&b);
    b.extend_from_slice(&h);
    b
}

/// Encodes an entry (see the module doc and docs/OBJECT-STORE.md).
pub fn encode_entry(seq: u64, kind: &Kind, name: &str, payload: &[u8]) -> io::Result<Vec<u8>> {
    if name.len() > MAX_NAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name}: name too long for the write-back journal"),
        ));
    }
    let size = ENTRY_FIXED + name.len() + payload.len();
    let size32 = u32::try_from(size).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name}: {size} bytes is too large for one write-back journal entry"),
        )
    })?;
    let mut b = Vec::with_capacity(size);
    b.extend_from_slice(&size32.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    let (k, flags, off, expect) = match kind {
        Kind::Part { offset } => (1u8, 0u8, *offset, [0u8; 32]),
        Kind::Root { expect } => (2, expect.is_some() as u8, 0, expect.unwrap_or([0; 32])),
    };
    b.push(k);
    b.push(flags);
    b.extend_from_slice(&(name.len() as u16).to_le_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&off.to_le_bytes());
    b.extend_from_slice(&expect);
    b.extend_from_slice(payload);
    let h = sha256(&b);
    b.extend_from_slice(&h);
    Ok(b)
}

fn damaged(path: &Path, detail: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "write-back journal {}: {detail}; nothing was uploaded. The journal holds fsync'ed \
             data not yet in the object store: keep the directory, restore it from a backup if \
             you have one, or move it aside to mount without it (`kmsfs mount URL MNT \
             --writeback NEWDIR`), losing what it holds",
            path.display()
        ),
    )
}

/// What a journal directory holds.
#[derive(Debug, Default)]
pub struct Scan {
    pub volume_id: Option<[u8; 16]>,
    /// Every complete entry, in order.
    pub entries: Vec<Entry>,
    /// Journal files by number.
    pub files: Vec<(u64, PathBuf)>,
    /// A torn last entry: (file, offset where it starts).
    pub torn: Option<(u64, u64)>,
}

/// Reads and checks every journal file in `dir` (see the module doc).
pub fn scan(dir: &Path) -> io::Result<Scan> {
    let mut s = Scan::default();
    for e in fs::read_dir(dir)? {
        let e = e?;
        if let Some(n) = e.file_name().to_str().and_then(parse_file_name) {
            s.files.push((n, e.path()));
        }
    }
    s.files.sort();
    let last_file = s.files.last().map(|f| f.0);
    let mut prev_seq: Option<u64> = None;
    for (n, path) in s.files.clone() {
        let data = fs::read(&path)?;
        let last = Some(n) == last_file;
        if data.len() < FILE_HEADER_LEN {
            // A file created by a crash before its header was durable.
            if last {
                s.torn = Some((n, 0));
                continue;
            }
            return Err(damaged(&path, "the file header is cut short".into()));
        }
        let hdr = &data[..FILE_HEADER_LEN];
        if &hdr[..8] != MAGIC {
            return Err(damaged(
                &path,
                "not a kmsfs journal file (bad magic)".into(),
            ));
        }
        if sha256(&hdr[..36])[..] != hdr[36..68] {
            if last && data.len() == FILE_HEADER_LEN {
                s.torn = Some((n, 0));
                continue;
            }
            return Err(damaged(
                &path,
                "the file header's checksum does not match".into(),
            ));
        }
        let version = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        if version != VERSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "write-back journal {}: version {version}, this kmsfs reads version \
                     {VERSION}; replay it with the kmsfs that wrote it (`kmsfs mount ... \
                     --writeback DIR`, then `kmsfs umount`)",
                    path.display()
                ),
            ));
        }
        let mut vid = [0u8; 16];
        vid.copy_from_slice(&hdr[12..28]);
        let num = u64::from_le_bytes(hdr[28..36].try_into().unwrap_or([0; 8]));
        if num != n {
            return Err(damaged(
                &path,
                format!("the header names file {num:016x}, not {n:016x}"),
            ));
        }
        match s.volume_id {
            None => s.volume_id = Some(vid),
            Some(v) if v != vid => {
                return Err(damaged(
                    &path,
                    "its files belong to two different volumes".into(),
                ));
            }
            _ => {}
        }
        let mut pos = FILE_HEADER_LEN;
        while pos < data.len() {
            match parse_entry(&data[pos..]) {
                Ok((seq, kind, name, at, len, size)) => {
                    if let Some(p) = prev_seq
                        && seq != p + 1
                    {
                        return Err(damaged(
                            &path,
                            format!(
                                "entry {seq} at offset {pos} follows entry {p}: entries are \
                                 missing"
                            ),
                        ));
                    }
                    prev_seq = Some(seq);
                    s.entries.push(Entry {
                        seq,
                        kind,
                        name,
                        file: n,
                        at: (pos + at) as u64,
                        len: len as u64,
                        size: size as u64,
                    });
                    pos += size;
                }
                Err((why, end)) => {
                    // Torn: the last entry of the last file, running to (or
                    // past) the end of the file, or a tail of zeros.
                    let tail = &data[pos..];
                    let torn = last && (end >= tail.len() || tail.iter().all(|&b| b == 0));
                    if torn {
                        s.torn = Some((n, pos as u64));
                        break;
                    }
                    return Err(damaged(
                        &path,
                        format!("the entry at offset {pos} is damaged ({why}) and more follows it"),
                    ));
                }
            }
        }
    }
    Ok(s)
}

type Parsed = (u64, Kind, String, usize, usize, usize);

/// Parses one entry at the start of `b`: (seq, kind, name, payload offset,
/// payload length, entry size); on damage, why and where the entry claims
/// to end.
fn parse_entry(b: &[u8]) -> Result<Parsed, (String, usize)> {
    if b.len() < 4 {
        return Err(("cut short".into(), usize::MAX));
    }
    let size = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    if size < ENTRY_FIXED {
        return Err((format!("length {size} is too small"), size.max(1)));
    }
    if size > b.len() {
        return Err(("cut short".into(), size));
    }
    let e = &b[..size];
    if sha256(&e[..size - 32])[..] != e[size - 32..] {
        return Err(("checksum mismatch".into(), size));
    }
    let seq = u64::from_le_bytes(e[4..12].try_into().unwrap_or([0; 8]));
    let (k, flags) = (e[12], e[13]);
    let nlen = u16::from_le_bytes([e[14], e[15]]) as usize;
    if nlen > MAX_NAME || ENTRY_FIXED + nlen > size {
        return Err((format!("name length {nlen} is invalid"), size));
    }
    let name = std::str::from_utf8(&e[16..16 + nlen])
        .map_err(|_| ("name is not UTF-8".to_string(), size))?
        .to_string();
    let p = 16 + nlen;
    let off = u64::from_le_bytes(e[p..p + 8].try_into().unwrap_or([0; 8]));
    let mut expect = [0u8; 32];
    expect.copy_from_slice(&e[p + 8..p + 40]);
    let kind = match (k, flags) {
        (1, 0) => Kind::Part { offset: off },
        (2, 0) => Kind::Root { expect: None },
        (2, 1) => Kind::Root {
            expect: Some(expect),
        },
        _ => return Err((format!("unknown kind {k} flags {flags}"), size)),
    };
    let at = p + 40;
    Ok((seq, kind, name, at, size - 32 - at, size))
}

/// Takes DIR for this process: creates it (0700) if needed and holds an
/// exclusive flock on DIR/lock; a second process using it is refused.
pub fn lock_dir(dir: &Path) -> io::Result<File> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "write-back journal {}: cannot create it ({e}); choose another with \
                     --writeback DIR",
                    dir.display()
                ),
            )
        })?;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(LOCK_NAME))?;
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "the write-back journal {} is in use by another kmsfs process (a mount of this \
                 volume on this host); unmount it first (`kmsfs umount MNT`)",
                dir.display()
            ),
        ));
    }
    Ok(f)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The live journal of a writer: appends (with backpressure), the queue of
/// entries not yet acknowledged by the store, and the files they lie in.
pub struct Journal {
    dir: PathBuf,
    volume_id: [u8; 16],
    bound: u64,
    /// How long a writer waits for room without any upload progress.
    stall: Duration,
    _lock: File,
    /// Serialises appends (file I/O happens under it, not under `q`).
    writer: Mutex<Option<(u64, File, u64)>>,
    q: Mutex<Queue>,
    cv: Condvar,
}

#[derive(Default)]
pub struct Queue {
    pub entries: VecDeque<Entry>,
    /// Bytes of the entries in `entries`.
    pub pending: u64,
    /// Largest `pending` seen (for tests and figures).
    pub peak: u64,
    pub next_seq: u64,
    next_file: u64,
    active: Option<u64>,
    files: BTreeMap<u64, Arc<File>>,
    /// Set when the uploader stopped for good (fenced, a conflict): the reason.
    pub failed: Option<String>,
    pub closed: bool,
    pub last_progress: Option<Instant>,
    /// Entries uploaded since the journal opened.
    pub uploaded: u64,
}

impl Journal {
    /// Opens the journal for writing after a replay: the files of `scan`
    /// (all uploaded now) are deleted; appends go to a new file.
    pub fn open(
        dir: &Path,
        lock: File,
        volume_id: [u8; 16],
        bound: u64,
        stall: Duration,
        scan: &Scan,
    ) -> io::Result<Journal> {
        for (_, p) in &scan.files {
            fs::remove_file(p)?;
        }
        if !scan.files.is_empty() {
            sync_dir(dir)?;
        }
        let next_file = scan.files.last().map_or(1, |f| f.0 + 1);
        let next_seq = scan.entries.last().map_or(1, |e| e.seq + 1);
        Ok(Journal {
            dir: dir.to_path_buf(),
            volume_id,
            bound: bound.max(1),
            stall,
            _lock: lock,
            writer: Mutex::new(None),
            q: Mutex::new(Queue {
                next_seq,
                next_file,
                ..Default::default()
            }),
            cv: Condvar::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn queue(&self) -> parking_lot::MutexGuard<'_, Queue> {
        self.q.lock()
    }

    pub fn notify(&self) {
        self.cv.notify_all();
    }

    /// Waits on the queue's condition (at most `d`).
    pub fn wait(&self, q: &mut parking_lot::MutexGuard<'_, Queue>, d: Duration) {
        self.cv.wait_for(q, d);
    }

    /// Appends an entry and makes it durable. Waits while the journal holds
    /// more than its bound of entries not yet uploaded (backpressure); fails
    /// when the uploader has stopped, or has made no progress for the stall
    /// time while the journal is full.
    pub fn append(&self, kind: Kind, name: &str, payload: &[u8]) -> io::Result<Entry> {
        let mut w = self.writer.lock();
        let size = (ENTRY_FIXED + name.len() + payload.len()) as u64;
        let seq = {
            let mut q = self.q.lock();
            let start = Instant::now();
            loop {
                if let Some(f) = &q.failed {
                    return Err(io::Error::other(f.clone()));
                }
                if q.closed {
                    return Err(io::Error::other(
                        "the write-back journal is closed (the volume is being unmounted)",
                    ));
                }
                if q.pending == 0 || q.pending + size <= self.bound {
                    break;
                }
                let since = q.last_progress.map_or(start, |t| t.max(start));
                if since.elapsed() > self.stall {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the write-back journal {} is full ({} bytes waiting, bound {}) and \
                             the object store has taken nothing for {} s: check that the store \
                             is reachable; what was fsync'ed before is safe in the journal",
                            self.dir.display(),
                            q.pending,
                            self.bound,
                            self.stall.as_secs()
                        ),
                    ));
                }
                self.cv.wait_for(&mut q, Duration::from_millis(200));
            }
            q.next_seq
        };
        let bytes = encode_entry(seq, &kind, name, payload)?;
        // A new file when there is none yet or the current one is full.
        if w.as_ref().is_none_or(|a| a.2 >= FILE_TARGET) {
            let n = self.q.lock().next_file;
            let path = self.dir.join(file_name(n));
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            let h = encode_file_header(&self.volume_id, n);
            f.write_all_at(&h, 0)?;
            f.sync_data()?;
            sync_dir(&self.dir)?;
            let reader = Arc::new(f.try_clone()?);
            *w = Some((n, f, h.len() as u64));
            let mut q = self.q.lock();
            q.next_file = n + 1;
            q.active = Some(n);
            q.files.insert(n, reader);
            self.gc(&mut q);
        }
        let Some((n, f, len)) = w.as_mut() else {
            return Err(io::Error::other("write-back journal: no open journal file"));
        };
        let at = *len;
        if let Err(e) = f.write_all_at(&bytes, at).and_then(|_| f.sync_data()) {
            // Never leave half an entry before the next one.
            let _ = f.set_len(at);
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "write-back journal {}: {e}; make room there (the journal needs up to its \
                     bound plus 64 MiB)",
                    self.dir.display()
                ),
            ));
        }
        *len += bytes.len() as u64;
        let p = 16 + name.len() + 40;
        let entry = Entry {
            seq,
            kind,
            name: name.to_string(),
            file: *n,
            at: at + p as u64,
            len: payload.len() as u64,
            size: bytes.len() as u64,
        };
        let mut q = self.q.lock();
        q.next_seq = seq + 1;
        q.pending += entry.size;
        q.peak = q.peak.max(q.pending);
        q.entries.push_back(entry.clone());
        drop(q);
        self.cv.notify_all();
        Ok(entry)
    }

    /// Reads `buf.len()` bytes at `within` of an entry's payload.
    pub fn read(&self, e: &Entry, within: u64, buf: &mut [u8]) -> io::Result<()> {
        let f = self.q.lock().files.get(&e.file).cloned();
        let Some(f) = f else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "write-back journal entry already uploaded",
            ));
        };
        if within + buf.len() as u64 > e.len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        f.read_exact_at(buf, e.at + within)
    }

    pub fn payload(&self, e: &Entry) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; e.len as usize];
        self.read(e, 0, &mut v)?;
        Ok(v)
    }

    /// The oldest entry not yet acknowledged.
    pub fn front(&self) -> Option<Entry> {
        self.q.lock().entries.front().cloned()
    }

    /// The store acknowledged the oldest entry: forget it, and delete the
    /// journal files that hold nothing pending any more.
    pub fn done(&self, seq: u64) {
        let mut q = self.q.lock();
        if q.entries.front().is_some_and(|e| e.seq == seq)
            && let Some(e) = q.entries.pop_front()
        {
            q.pending -= e.size;
            q.uploaded += 1;
            q.last_progress = Some(Instant::now());
            self.gc(&mut q);
        }
        drop(q);
        self.cv.notify_all();
    }

    /// Deletes files before the active one with nothing pending in them.
    fn gc(&self, q: &mut Queue) {
        let oldest_pending = q.entries.front().map(|e| e.file);
        let gone: Vec<u64> = q
            .files
            .keys()
            .copied()
            .filter(|&n| Some(n) != q.active && oldest_pending.is_none_or(|o| n < o))
            .collect();
        let mut removed = false;
        for n in gone {
            q.files.remove(&n);
            if fs::remove_file(self.dir.join(file_name(n))).is_ok() {
                removed = true;
            }
        }
        if removed {
            let _ = sync_dir(&self.dir);
        }
    }

    /// Marks the journal closed; when nothing is pending, deletes every file
    /// (the journal is empty then). Returns the number of entries pending.
    pub fn close(&self) -> usize {
        let mut w = self.writer.lock();
        let mut q = self.q.lock();
        q.closed = true;
        let left = q.entries.len();
        if left == 0 {
            *w = None;
            q.active = None;
            self.gc(&mut q);
        }
        drop(q);
        self.cv.notify_all();
        left
    }
}

/// Cuts a torn tail off (so that the next file's entries never follow it).
pub fn cut_torn(scan: &Scan) -> io::Result<()> {
    if let Some((n, at)) = scan.torn
        && let Some((_, p)) = scan.files.iter().find(|f| f.0 == n)
    {
        let f = fs::OpenOptions::new().write(true).open(p)?;
        f.set_len(at)?;
        f.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_journal(dir: &Path, vid: [u8; 16], entries: &[(Kind, &str, &[u8])]) -> PathBuf {
        let lock = lock_dir(dir).unwrap();
        let j = Journal::open(
            dir,
            lock,
            vid,
            1 << 30,
            Duration::from_secs(1),
            &Scan::default(),
        )
        .unwrap();
        for (k, n, p) in entries {
            j.append(k.clone(), n, p).unwrap();
        }
        dir.join(file_name(1))
    }

    #[test]
    fn roundtrip_torn_tail_and_damage() {
        let d = tempfile::tempdir().unwrap();
        let vid = [7u8; 16];
        let f = write_journal(
            d.path(),
            vid,
            &[
                (Kind::Part { offset: 0 }, "seg/a.seg", b"one"),
                (Kind::Root { expect: None }, "kmsfs.root", b"root1"),
                (
                    Kind::Root {
                        expect: Some([1; 32]),
                    },
                    "kmsfs.root.1",
                    b"root2",
                ),
            ],
        );
        let s = scan(d.path()).unwrap();
        assert_eq!(s.volume_id, Some(vid));
        assert_eq!(s.entries.len(), 3);
        assert_eq!(
            s.entries[2].kind,
            Kind::Root {
                expect: Some([1; 32])
            }
        );
        assert!(s.torn.is_none());
        let full = fs::read(&f).unwrap();
        // A torn last entry (cut anywhere inside it) is ignored.
        let last = s.entries[2].clone();
        let start = (last.at - 16 - "kmsfs.root.1".len() as u64 - 40) as usize;
        for cut in [start + 1, start + 10, full.len() - 1] {
            fs::write(&f, &full[..cut]).unwrap();
            let s = scan(d.path()).unwrap();
            assert_eq!(s.entries.len(), 2, "cut at {cut}");
            assert_eq!(s.torn, Some((1, start as u64)));
        }
        // Zeros where the last entry should be: torn too.
        let mut z = full[..start].to_vec();
        z.extend_from_slice(&[0u8; 100]);
        fs::write(&f, &z).unwrap();
        assert_eq!(scan(d.path()).unwrap().entries.len(), 2);
        // A damaged entry with entries after it: an integrity error.
        let mut bad = full.clone();
        bad[FILE_HEADER_LEN + 20] ^= 1;
        fs::write(&f, &bad).unwrap();
        let e = scan(d.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("damaged"), "{e}");
        // A bad header.
        let mut bad = full.clone();
        bad[13] ^= 1;
        fs::write(&f, &bad).unwrap();
        assert!(scan(d.path()).is_err());
        // Garbage never panics.
        for n in 0..200 {
            let mut g = full.clone();
            let i = (n * 7919) % g.len();
            g[i] = g[i].wrapping_add(n as u8 + 1);
            fs::write(&f, &g[..g.len() - (n % 50)]).unwrap();
            let _ = scan(d.path());
        }
    }

    #[test]
    fn one_process_per_journal_and_backpressure_fails_when_stalled() {
        let d = tempfile::tempdir().unwrap();
        let lock = lock_dir(d.path()).unwrap();
        assert_eq!(
            lock_dir(d.path()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let j = Journal::open(
            d.path(),
            lock,
            [1; 16],
            1000,
            Duration::from_millis(300),
            &Scan::default(),
        )
        .unwrap();
        j.append(Kind::Part { offset: 0 }, "s", &[1u8; 600])
            .unwrap();
        // Full, and nobody uploads: the append fails after the stall time.
        let e = j
            .append(Kind::Part { offset: 600 }, "s", &[2u8; 600])
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // Once the entry is acknowledged there is room again.
        let seq = j.front().unwrap().seq;
        assert_eq!(j.payload(&j.front().unwrap()).unwrap(), vec![1u8; 600]);
        j.done(seq);
        j.append(Kind::Part { offset: 600 }, "s", &[2u8; 600])
            .unwrap();
        assert!(j.queue().peak <= 1000);
        let seq = j.front().unwrap().seq;
        j.done(seq);
        assert_eq!(j.close(), 0);
        let s = scan(d.path()).unwrap();
        assert!(s.files.is_empty(), "{:?}", s.files);
    }
}
