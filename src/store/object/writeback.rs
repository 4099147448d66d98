//! `--writeback DIR`: fsync durable in a local journal ([`super::journal`]),
//! uploaded to the object store in the background, replayed after a crash.
//!
//! - When a writer takes the lease with a journal directory, it first
//!   replays what the journal holds (a crash left it), with the lease held:
//!   segment parts as they are (a part already there with the same bytes
//!   counts as done), root records only where the slot still holds what the
//!   journal expects. A slot that holds anything else means another writer
//!   committed meanwhile (a takeover): the replay stops, the journal is kept
//!   untouched, and the open fails saying so.
//! - It then records itself in the store (`kmsfs.writeback`: host and
//!   directory), so that no writer mounts the volume without that journal
//!   (unless `--force-takeover`), and starts the uploader: one thread that
//!   uploads entries in order, retrying with backoff while the store is
//!   unreachable, and forgets each only once the store has acknowledged it.
//! - Closing (the writer's lock dropped: unmount, SIGTERM) drains the
//!   journal first, for as long as uploads make progress (giving up after a
//!   call-timeout without any); then the marker is removed if the journal is
//!   empty, and the lease released.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use object_store::{PutMode, UpdateVersion};
use parking_lot::Mutex;

use super::journal::{self, Entry, Journal, Kind, sha256};
use super::{ObjectStorage, Remote, State, cache::DiskCache, lease, part_name};

/// The object that names the host and directory of a write-back journal.
pub const MARKER_FILE: &str = "kmsfs.writeback";

/// Whether `name` is a root slot (`kmsfs.root`, `kmsfs.root.N`): the names
/// whose replacement is a commit, journalled in write-back mode.
pub fn is_root_slot(name: &str) -> bool {
    let root = crate::format::ROOT_FILE;
    name == root
        || name.strip_prefix(root).is_some_and(|r| {
            r.len() > 1 && r.starts_with('.') && r[1..].bytes().all(|b| b.is_ascii_digit())
        })
}

/// The marker: which host and directory hold the journal.
#[derive(Debug, PartialEq, Eq)]
pub struct Marker {
    pub host: String,
    pub dir: String,
}

impl Marker {
    pub fn encode(&self) -> Vec<u8> {
        format!("kmsfs writeback 1\nhost {}\ndir {}\n", self.host, self.dir).into_bytes()
    }

    pub fn decode(b: &[u8]) -> Option<Marker> {
        let t = std::str::from_utf8(b).ok()?;
        let mut l = t.lines();
        if l.next()? != "kmsfs writeback 1" {
            return None;
        }
        let host = l.next()?.strip_prefix("host ")?.to_string();
        let dir = l.next()?.strip_prefix("dir ")?.to_string();
        Some(Marker { host, dir })
    }
}

/// What the uploader needs of the storage (shared with its thread).
#[derive(Clone)]
struct Ctx {
    remote: Arc<Remote>,
    st: Arc<Mutex<State>>,
    cache: Option<Arc<DiskCache>>,
    fenced: Arc<AtomicBool>,
    owner: Arc<Mutex<Option<String>>>,
    url: String,
    dir: PathBuf,
    /// Told the generation of each root record the store took.
    listener: Arc<Mutex<Option<crate::store::CommitListener>>>,
}

/// Why an upload did not happen.
enum Failure {
    /// The store is unreachable or failing: try again.
    Transient(io::Error),
    /// Never going to work (fenced, a conflict): stop, keep the journal.
    Fatal(String),
}

fn transient(e: io::Error) -> Failure {
    Failure::Transient(e)
}

impl Ctx {
    fn conflict(&self, name: &str) -> Failure {
        self.fenced.store(true, Ordering::SeqCst);
        Failure::Fatal(self.conflict_msg(name))
    }

    fn conflict_msg(&self, name: &str) -> String {
        format!(
            "{}: {name} in the object store no longer holds what the write-back journal in {} \
             expects: another writer has committed since (the writer lease was taken over). \
             Nothing of the journal is committed over it, and the journal is kept untouched; \
             the data it holds (fsync'ed after the last upload) is not in the volume. Mount \
             without it: move the directory aside (or delete it), then `kmsfs mount {} MNT` \
             (see docs/OBJECT-STORE.md, \"Fencing and the journal\")",
            self.url,
            self.dir.display(),
            self.url
        )
    }

    /// The SHA-256 and ETag of what the store holds under `name` now.
    fn fetch(&self, name: &str) -> Result<(Option<[u8; 32]>, Option<String>), Failure> {
        match self.remote.get_whole(name) {
            Ok((b, etag)) => Ok((Some(sha256(&b)), etag)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((None, None)),
            Err(e) => Err(transient(e)),
        }
    }

    fn record(&self, name: &str, hash: [u8; 32], etag: Option<String>) {
        let mut st = self.st.lock();
        st.hashes.insert(name.to_string(), Some(hash));
        st.etags.insert(name.to_string(), etag);
    }

    /// Puts a root record where the store holds `expect` (a SHA-256, or no
    /// object): conditional on the ETag of exactly that.
    fn put_root(&self, name: &str, expect: Option<[u8; 32]>, data: Vec<u8>) -> Result<(), Failure> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(self.conflict(name));
        }
        let owner = self.owner.lock().clone();
        if let Some(owner) = owner {
            lease::check_held_with(&self.remote, &self.url, &self.fenced, &owner).map_err(|e| {
                if e.kind() == io::ErrorKind::PermissionDenied {
                    Failure::Fatal(format!(
                        "{e}; the write-back journal in {} is kept (see docs/OBJECT-STORE.md, \
                         \"Fencing and the journal\")",
                        self.dir.display()
                    ))
                } else {
                    transient(e)
                }
            })?;
        }
        let mine = sha256(&data);
        let known = {
            let st = self.st.lock();
            match (st.hashes.get(name), st.etags.get(name)) {
                (Some(h), Some(e)) => Some((*h, e.clone())),
                _ => None,
            }
        };
        let (hash, etag) = match known {
            Some(k) if k.0 == expect => k,
            _ => self.fetch(name)?,
        };
        if hash == Some(mine) {
            self.record(name, mine, etag);
            return Ok(());
        }
        if hash != expect {
            return Err(self.conflict(name));
        }
        let mode = match hash {
            None => PutMode::Create,
            Some(_) => PutMode::Update(UpdateVersion {
                e_tag: etag,
                version: None,
            }),
        };
        match self.remote.put(name, data, mode) {
            Ok(etag) => {
                self.record(name, mine, etag);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Ours, if an earlier attempt landed; else another writer's.
                let (h, etag) = self.fetch(name)?;
                if h == Some(mine) {
                    self.record(name, mine, etag);
                    Ok(())
                } else {
                    Err(self.conflict(name))
                }
            }
            Err(e) => Err(transient(e)),
        }
    }

    /// Puts a segment part (written once); one already there with the same
    /// bytes was an earlier attempt of ours.
    fn put_part(&self, key: &str, data: &[u8]) -> Result<(), Failure> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(self.conflict(key));
        }
        match self.remote.put(key, data.to_vec(), PutMode::Create) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                match self.remote.get_whole(key) {
                    Ok((b, _)) if b == data => Ok(()),
                    Ok(_) => Err(Failure::Fatal(format!(
                        "{}: the segment part {key} exists in the object store with other \
                         contents than the write-back journal in {} holds: another writer wrote \
                         it. The journal is kept; see docs/OBJECT-STORE.md, \"Fencing and the \
                         journal\"",
                        self.url,
                        self.dir.display()
                    ))),
                    Err(e) => Err(transient(e)),
                }
            }
            Err(e) => Err(transient(e)),
        }
    }

    fn upload(&self, e: &Entry, data: Vec<u8>) -> Result<(), Failure> {
        match &e.kind {
            Kind::Part { offset } => {
                let key = part_name(&e.name, *offset);
                self.put_part(&key, &data)?;
                if let Some(c) = &self.cache {
                    c.put(&key, 0, &data);
                }
                let mut st = self.st.lock();
                if st.local.get(&key).is_some_and(|x| x.seq == e.seq) {
                    st.local.remove(&key);
                }
                Ok(())
            }
            Kind::Root { expect } => {
                let generation = crate::format::split_root(&data).ok().map(|r| r.1);
                self.put_root(&e.name, *expect, data)?;
                if let (Some(g), Some(f)) = (generation, self.listener.lock().as_ref()) {
                    f(g);
                }
                let mut st = self.st.lock();
                if st.local_whole.get(&e.name).is_some_and(|x| x.0 == e.seq) {
                    st.local_whole.remove(&e.name);
                }
                Ok(())
            }
        }
    }
}

/// A live write-back journal and its uploader.
pub(crate) struct Writeback {
    pub journal: Arc<Journal>,
    pub listener: Arc<Mutex<Option<crate::store::CommitListener>>>,
    ctx: Ctx,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Drain gives up after this long without an upload.
    stall: Duration,
}

impl Writeback {
    /// Waits until no entry for `name` is pending (bounded by the stall time).
    pub fn settle(&self, name: &str) -> io::Result<()> {
        self.wait_until(|q| !q.entries.iter().any(|e| e.name == name), self.stall)
    }

    /// Waits until the journal is empty, at most `d`; false when it is not.
    pub fn drained_within(&self, d: Duration) -> bool {
        self.wait_until(|q| q.entries.is_empty(), d).is_ok()
    }

    fn wait_until(&self, ok: impl Fn(&journal::Queue) -> bool, d: Duration) -> io::Result<()> {
        let start = Instant::now();
        let mut q = self.journal.queue();
        loop {
            if ok(&q) {
                return Ok(());
            }
            if let Some(f) = &q.failed {
                return Err(io::Error::other(f.clone()));
            }
            let since = q.last_progress.map_or(start, |t| t.max(start));
            if since.elapsed() > d {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{}: the object store has taken no entry of the write-back journal {} \
                         for {} s; check that it is reachable (the journal keeps the data)",
                        self.ctx.url,
                        self.ctx.dir.display(),
                        d.as_secs()
                    ),
                ));
            }
            self.journal.wait(&mut q, Duration::from_millis(100));
        }
    }

    /// Drains the journal, stops the uploader, and removes the marker when
    /// the journal is empty. Returns the entries left.
    pub fn close(&self) -> usize {
        let pending = self.journal.queue().entries.len();
        if pending > 0 {
            log::info!(
                "{}: uploading the {} entries of the write-back journal {} before closing",
                self.ctx.url,
                pending,
                self.ctx.dir.display()
            );
        }
        let drained = self.drained_within(self.stall);
        let left = self.journal.close();
        self.stop.store(true, Ordering::SeqCst);
        self.journal.notify();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        if drained && left == 0 {
            if let Err(e) = self.ctx.remote.delete(MARKER_FILE) {
                log::warn!(
                    "{}: could not remove {MARKER_FILE} ({e}); a mount without --writeback {} \
                     is refused until a mount with it closes cleanly",
                    self.ctx.url,
                    self.ctx.dir.display()
                );
            }
            log::info!(
                "{}: write-back journal {} drained: everything is in the object store",
                self.ctx.url,
                self.ctx.dir.display()
            );
        } else {
            log::error!(
                "{}: {left} entries of the write-back journal {} are not in the object store \
                 ({}); they stay in the journal and are uploaded by the next `kmsfs mount {} MNT \
                 --writeback {}` (this host), before it serves",
                self.ctx.url,
                self.ctx.dir.display(),
                self.journal
                    .queue()
                    .failed
                    .clone()
                    .unwrap_or_else(|| "the store did not take them in time".into()),
                self.ctx.url,
                self.ctx.dir.display()
            );
        }
        left
    }
}

fn uploader(j: Arc<Journal>, ctx: Ctx, stop: Arc<AtomicBool>) {
    let mut backoff = Duration::from_millis(500);
    let mut failures = 0u32;
    loop {
        let e = {
            let mut q = j.queue();
            loop {
                if q.failed.is_some() || stop.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(e) = q.entries.front() {
                    break e.clone();
                }
                if q.closed {
                    return;
                }
                j.wait(&mut q, Duration::from_secs(1));
            }
        };
        #[cfg(feature = "test-hooks")]
        if std::env::var_os("KMSFS_TEST_WRITEBACK_PAUSE").is_some() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let r = j
            .payload(&e)
            .map_err(|err| {
                Failure::Fatal(format!(
                    "write-back journal {}: cannot read entry {}: {err}",
                    ctx.dir.display(),
                    e.seq
                ))
            })
            .and_then(|data| ctx.upload(&e, data));
        match r {
            Ok(()) => {
                if failures > 0 {
                    log::info!(
                        "{}: the object store takes the write-back journal's entries again",
                        ctx.url
                    );
                }
                failures = 0;
                backoff = Duration::from_millis(500);
                j.done(e.seq);
            }
            Err(Failure::Transient(err)) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(10) {
                    log::warn!(
                        "{}: upload of write-back journal entry {} ({}) failed, retrying with \
                         backoff (fsync goes on into the journal): {err}",
                        ctx.url,
                        e.seq,
                        e.name
                    );
                }
                let until = Instant::now() + backoff;
                while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(Failure::Fatal(msg)) => {
                log::error!("{msg}");
                j.queue().failed = Some(msg);
                j.notify();
                return;
            }
        }
    }
}

/// The volume id in the store's header (plaintext bytes 10..26; the engine
/// authenticates the header afterwards).
fn volume_id(s: &ObjectStorage) -> io::Result<[u8; 16]> {
    let mut last = None;
    for name in [
        crate::format::HEADER_FILE,
        crate::format::HEADER_BACKUP_FILE,
    ] {
        match s.remote.get_whole(name) {
            Ok((b, _)) if crate::format::Header::peek_version(&b).is_ok() && b.len() >= 26 => {
                let mut v = [0u8; 16];
                v.copy_from_slice(&b[10..26]);
                return Ok(v);
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} is not a kmsfs volume (no readable {}); create one with `kmsfs init {}`",
                s.cfg.url(),
                crate::format::HEADER_FILE,
                s.cfg.url()
            ),
        )
    }))
}

/// The marker in the store, if any (for `kmsfs info`).
pub fn marker(s: &ObjectStorage) -> io::Result<Option<Marker>> {
    match s.remote.get_whole(MARKER_FILE) {
        Ok((b, _)) => Ok(Some(Marker::decode(&b).unwrap_or(Marker {
            host: "(unreadable marker)".into(),
            dir: "?".into(),
        }))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The marker check of every writer (with or without a journal): a marker
/// of another journal refuses the open unless `--force-takeover`.
pub(crate) fn check_marker(s: &ObjectStorage, dir: Option<&Path>) -> io::Result<()> {
    let Some(m) = marker(s)? else {
        return Ok(());
    };
    let here = lease::hostname();
    let ours = dir.is_some_and(|d| m.host == here && m.dir == d.display().to_string());
    if ours {
        return Ok(());
    }
    if s.cfg.force_takeover {
        log::warn!(
            "{}: the write-back journal {} of host {} may hold fsync'ed data not in the store; \
             taking over without it (--force-takeover): that data is not in the volume",
            s.cfg.url(),
            m.dir,
            m.host
        );
        if dir.is_none() {
            s.remote.delete(MARKER_FILE)?;
        }
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{}: the last writer (host {}) used the write-back journal {}, which may hold \
         fsync'ed data not in the object store yet: mount on host {} with `--writeback {}` to \
         upload it first (it is replayed before the mount serves), or give it up with \
         --force-takeover",
        s.cfg.url(),
        m.host,
        m.dir,
        m.host,
        m.dir
    )))
}

fn read_payload(scan: &journal::Scan, e: &Entry) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let path = scan
        .files
        .iter()
        .find(|f| f.0 == e.file)
        .map(|f| f.1.clone())
        .ok_or(io::ErrorKind::NotFound)?;
    let f = std::fs::File::open(path)?;
    let mut v = vec![0u8; e.len as usize];
    f.read_exact_at(&mut v, e.at)?;
    Ok(v)
}

/// Uploads what a journal left by a crash holds (see the module doc).
fn replay(ctx: &Ctx, scan: &journal::Scan, vid: &[u8; 16], call: Duration) -> io::Result<()> {
    if scan.entries.is_empty() {
        return Ok(());
    }
    // Root records belong to this volume.
    for e in &scan.entries {
        if matches!(e.kind, Kind::Root { .. }) {
            let b = read_payload(scan, e)?;
            match crate::format::split_root(&b) {
                Ok((v, ..)) if v == *vid => {}
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "write-back journal {}: entry {} is not a root record of {} \
                             (integrity error); nothing was uploaded. Keep the directory and \
                             check it; mount without it to go on (`kmsfs mount {} MNT`), losing \
                             what it holds",
                            ctx.dir.display(),
                            e.seq,
                            ctx.url,
                            ctx.url
                        ),
                    ));
                }
            }
        }
    }
    // Where the store is: the last root entry that a slot holds now (the
    // uploader goes in order, so everything before it is there too).
    let mut start = 0;
    let mut slots = std::collections::HashMap::new();
    for e in &scan.entries {
        if matches!(e.kind, Kind::Root { .. }) && !slots.contains_key(&e.name) {
            let (h, etag) = ctx.fetch(&e.name).map_err(|f| match f {
                Failure::Transient(e) => e,
                Failure::Fatal(m) => io::Error::other(m),
            })?;
            slots.insert(e.name.clone(), (h, etag));
        }
    }
    for (i, e) in scan.entries.iter().enumerate() {
        if matches!(e.kind, Kind::Root { .. }) {
            let h = sha256(&read_payload(scan, e)?);
            if slots.get(&e.name).is_some_and(|s| s.0 == Some(h)) {
                start = i + 1;
            }
        }
    }
    let todo = &scan.entries[start..];
    // The first commit to replay must find its slot as it expects: else
    // another writer has committed since, and nothing is uploaded at all.
    if let Some(e) = todo.iter().find(|e| matches!(e.kind, Kind::Root { .. }))
        && let Kind::Root { expect } = e.kind
        && slots.get(&e.name).map(|s| s.0) != Some(expect)
    {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            ctx.conflict_msg(&e.name),
        ));
    }
    for (name, (h, etag)) in slots {
        let mut st = ctx.st.lock();
        st.hashes.insert(name.clone(), h);
        st.etags.insert(name, etag);
    }
    log::info!(
        "{}: replaying the write-back journal {}: {} entries to upload ({} already in the store)",
        ctx.url,
        ctx.dir.display(),
        todo.len(),
        start
    );
    for e in todo {
        let data = read_payload(scan, e)?;
        let deadline = Instant::now() + call;
        let mut backoff = Duration::from_millis(500);
        loop {
            match ctx.upload(e, data.clone()) {
                Ok(()) => break,
                Err(Failure::Fatal(m)) => {
                    return Err(io::Error::new(io::ErrorKind::PermissionDenied, m));
                }
                Err(Failure::Transient(err)) if Instant::now() >= deadline => {
                    return Err(io::Error::new(
                        err.kind(),
                        format!(
                            "{}: could not upload the write-back journal {} ({err}); it is kept \
                             and uploaded by the next mount with --writeback {}",
                            ctx.url,
                            ctx.dir.display(),
                            ctx.dir.display()
                        ),
                    ));
                }
                Err(Failure::Transient(_)) => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
    Ok(())
}

/// Opens the journal of a writer that holds the lease: checks it belongs to
/// this volume, replays it, records the marker, starts the uploader.
pub(crate) fn start(s: &ObjectStorage, dir: &Path, lock: std::fs::File) -> io::Result<Writeback> {
    let vid = volume_id(s)?;
    let scan = journal::scan(dir)?;
    if let Some(j) = scan.volume_id
        && j != vid
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the write-back journal {} belongs to volume {}, not to {} (volume {}): give \
                 this volume its own directory (`kmsfs mount {} MNT --writeback NEWDIR`); mount \
                 the other volume with this one to upload what it holds",
                dir.display(),
                crate::format::hex(&j),
                s.cfg.url(),
                crate::format::hex(&vid),
                s.cfg.url()
            ),
        ));
    }
    if let Some((n, at)) = scan.torn {
        log::warn!(
            "{}: write-back journal {}: ignoring a torn last entry (file {n:016x}, offset {at}): \
             a write cut by a crash, never acknowledged",
            s.cfg.url(),
            dir.display()
        );
        journal::cut_torn(&scan)?;
    }
    let ctx = Ctx {
        remote: s.remote.clone(),
        st: s.st.clone(),
        cache: s.cache.clone(),
        fenced: s.fenced.clone(),
        owner: s.lease_owner.clone(),
        url: s.cfg.url(),
        dir: dir.to_path_buf(),
        listener: Arc::new(Mutex::new(None)),
    };
    replay(&ctx, &scan, &vid, s.cfg.call_timeout)?;
    let marker = Marker {
        host: lease::hostname(),
        dir: dir.display().to_string(),
    };
    s.remote
        .put(MARKER_FILE, marker.encode(), PutMode::Overwrite)?;
    let stall = s.cfg.call_timeout;
    let j = Arc::new(Journal::open(
        dir,
        lock,
        vid,
        s.cfg.writeback_bytes,
        stall,
        &scan,
    )?);
    let stop = Arc::new(AtomicBool::new(false));
    let (j2, c2, s2) = (j.clone(), ctx.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name("kmsfs-upload".into())
        .spawn(move || uploader(j2, c2, s2))?;
    Ok(Writeback {
        journal: j,
        listener: ctx.listener.clone(),
        ctx,
        stop,
        thread: Mutex::new(Some(thread)),
        stall,
    })
}

/// The writer's lock in write-back mode: drains the journal before the
/// lease goes.
pub(crate) struct WritebackGuard {
    pub wb: Arc<Writeback>,
    pub lease: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl Drop for WritebackGuard {
    fn drop(&mut self) {
        self.wb.close();
        drop(self.lease.take());
    }
}

/// Entries of the journal in `dir` not uploaded yet (for `kmsfs info` and
/// tests): None when there is no journal there.
pub fn pending_entries(dir: &Path) -> io::Result<Option<usize>> {
    if !dir.exists() {
        return Ok(None);
    }
    let s = journal::scan(dir)?;
    Ok(Some(s.entries.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_and_marker() {
        assert!(is_root_slot("kmsfs.root") && is_root_slot("kmsfs.root.1"));
        assert!(!is_root_slot("kmsfs.root.tmp") && !is_root_slot("kmsfs.header"));
        let m = Marker {
            host: "h".into(),
            dir: "/var/lib/j".into(),
        };
        assert_eq!(Marker::decode(&m.encode()), Some(m));
        assert!(Marker::decode(b"kmsfs writeback 2\n").is_none());
    }
}
