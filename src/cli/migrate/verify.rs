//! The verification of every entry through the mount against the source.

use super::*;

// ----- the verification ---------------------------------------------------------------

pub(super) type Key = (u64, u64);
pub(super) type Hash = std::result::Result<[u8; 32], String>;

pub(super) fn key(m: &Metadata) -> Key {
    (m.dev(), m.ino())
}

/// A regular file to read on both sides; a side whose inode another job reads is skipped.
pub(super) struct Job {
    pub(super) rel: PathBuf,
    pub(super) src: Key,
    pub(super) dst: Key,
    pub(super) hash_src: bool,
    pub(super) hash_dst: bool,
    /// Hard-linked on either side: compared after all jobs, through the hash maps.
    pub(super) shared: bool,
}

#[derive(Default)]
pub(super) struct Verified {
    pub(super) counts: Counts,
    pub(super) bytes: u64,
    pub(super) diffs: Vec<Diff>,
    /// Names in the destination that the source lacks, with their source parent.
    pub(super) extras: Vec<(String, PathBuf)>,
}

pub(super) struct Walker<'a> {
    pub(super) src: &'a Path,
    pub(super) dst: &'a Path,
    pub(super) out: Verified,
    pub(super) seen_src: HashSet<Key>,
    pub(super) seen_dst: HashSet<Key>,
    pub(super) hashed_src: HashSet<Key>,
    pub(super) src_links: HashMap<Key, Vec<String>>,
    pub(super) dst_links: HashMap<Key, Vec<String>>,
    pub(super) link_paths: Vec<(String, Key, Key)>,
    /// Closed (None) once the walk is done, which ends the readers.
    pub(super) jobs: Option<crossbeam_channel::Sender<Job>>,
}

pub(super) fn show(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".into()
    } else {
        rel.to_string_lossy().into_owned()
    }
}

pub(super) fn kind_name(mode: u32) -> &'static str {
    match mode & crate::sys::S_IFMT {
        crate::sys::S_IFREG => "regular file",
        crate::sys::S_IFDIR => "directory",
        crate::sys::S_IFLNK => "symlink",
        crate::sys::S_IFIFO => "fifo",
        crate::sys::S_IFSOCK => "socket",
        crate::sys::S_IFCHR => "character device",
        crate::sys::S_IFBLK => "block device",
        _ => "unknown",
    }
}

pub(super) fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Calls a list/get xattr function twice: size, then the value (retrying if it grew).
pub(super) fn xattr_buf(
    mut f: impl FnMut(*mut libc::c_char, usize) -> isize,
) -> io::Result<Vec<u8>> {
    loop {
        let n = f(std::ptr::null_mut(), 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; n as usize];
        let m = f(buf.as_mut_ptr().cast(), buf.len());
        if m >= 0 {
            buf.truncate(m as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
}

/// Every xattr of `p` (not following a symlink), POSIX ACLs included, sorted by name.
pub(super) fn xattrs(p: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = cstr(p)?;
    // SAFETY: c is a valid C string; buffers are passed with their lengths.
    let names = match xattr_buf(|b, n| unsafe { crate::sys::llistxattr(&c, b, n) }) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).expect("no NUL inside a split name");
        // SAFETY: as above.
        match xattr_buf(|b, n| unsafe { crate::sys::lgetxattr(&c, &cn, b.cast(), n) }) {
            Ok(v) => out.push((name.to_vec(), v)),
            Err(e) if e.raw_os_error() == Some(crate::sys::ENOATTR) => {} // removed meanwhile
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

impl Walker<'_> {
    fn diff(&mut self, rel: &Path, what: &'static str, detail: String) {
        self.out.diffs.push(Diff {
            path: show(rel),
            what,
            detail,
        });
    }

    fn walk(&mut self) {
        let root = PathBuf::new();
        match (
            fs::symlink_metadata(self.src),
            fs::symlink_metadata(self.dst),
        ) {
            (Ok(s), Ok(d)) => self.entry(&root, &s, &d),
            (Err(e), _) => self.diff(&root, "unreadable", format!("source: {e}")),
            (_, Err(e)) => self.diff(&root, "unreadable", format!("destination: {e}")),
        }
        let mut stack = vec![root];
        while let Some(rel) = stack.pop() {
            let mut names: Vec<OsString> = match fs::read_dir(self.src.join(&rel)) {
                Ok(rd) => rd.flatten().map(|e| e.file_name()).collect(),
                Err(e) => {
                    self.diff(
                        &rel,
                        "unreadable",
                        format!("cannot list on the source: {e}"),
                    );
                    continue;
                }
            };
            names.sort();
            let dst_names: HashSet<OsString> = match fs::read_dir(self.dst.join(&rel)) {
                Ok(rd) => rd.flatten().map(|e| e.file_name()).collect(),
                Err(e) => {
                    self.diff(
                        &rel,
                        "unreadable",
                        format!("cannot list on the destination: {e}"),
                    );
                    continue;
                }
            };
            let src_names: HashSet<&OsString> = names.iter().collect();
            let mut extras: Vec<&OsString> = dst_names
                .iter()
                .filter(|n| !src_names.contains(n))
                .collect();
            extras.sort();
            for n in extras {
                self.out.extras.push((show(&rel.join(n)), rel.clone()));
            }
            let mut subdirs = Vec::new();
            for name in &names {
                let r = rel.join(name);
                let s = match fs::symlink_metadata(self.src.join(&r)) {
                    Ok(s) => s,
                    Err(e) => {
                        self.diff(&r, "missing", format!("gone from the source: {e}"));
                        continue;
                    }
                };
                self.count(&s);
                if !dst_names.contains(name) {
                    self.diff(&r, "missing", "missing on the destination".into());
                    continue;
                }
                let d = match fs::symlink_metadata(self.dst.join(&r)) {
                    Ok(d) => d,
                    Err(e) => {
                        self.diff(&r, "missing", format!("on the destination: {e}"));
                        continue;
                    }
                };
                self.entry(&r, &s, &d);
                if s.is_dir() && d.is_dir() {
                    subdirs.push(r);
                }
            }
            stack.extend(subdirs.into_iter().rev());
        }
    }

    fn count(&mut self, s: &Metadata) {
        let c = &mut self.out.counts;
        let ft = s.mode() & crate::sys::S_IFMT;
        if ft != crate::sys::S_IFDIR && s.nlink() > 1 && !self.seen_src.insert(key(s)) {
            c.hard_links += 1;
            if ft == crate::sys::S_IFREG {
                c.files += 1;
            }
            return;
        }
        match ft {
            crate::sys::S_IFREG => {
                c.files += 1;
                self.out.bytes += s.size();
            }
            crate::sys::S_IFDIR => c.directories += 1,
            crate::sys::S_IFLNK => c.symlinks += 1,
            crate::sys::S_IFIFO => c.fifos += 1,
            crate::sys::S_IFSOCK => c.sockets += 1,
            crate::sys::S_IFCHR => c.char_devices += 1,
            crate::sys::S_IFBLK => c.block_devices += 1,
            _ => {}
        }
    }

    /// Compares one entry present on both sides.
    fn entry(&mut self, rel: &Path, s: &Metadata, d: &Metadata) {
        let (sk, dk) = (s.mode() & crate::sys::S_IFMT, d.mode() & crate::sys::S_IFMT);
        if sk != dk {
            self.diff(
                rel,
                "kind",
                format!(
                    "{} on the source, {} on the destination",
                    kind_name(sk),
                    kind_name(dk)
                ),
            );
            return;
        }
        if s.mode() & 0o7777 != d.mode() & 0o7777 {
            self.diff(
                rel,
                "mode",
                format!(
                    "{:04o} on the source, {:04o} on the destination",
                    s.mode() & 0o7777,
                    d.mode() & 0o7777
                ),
            );
        }
        if s.uid() != d.uid() {
            self.diff(
                rel,
                "owner",
                format!(
                    "uid {} on the source, {} on the destination",
                    s.uid(),
                    d.uid()
                ),
            );
        }
        if s.gid() != d.gid() {
            self.diff(
                rel,
                "group",
                format!(
                    "gid {} on the source, {} on the destination",
                    s.gid(),
                    d.gid()
                ),
            );
        }
        if (s.mtime(), s.mtime_nsec()) != (d.mtime(), d.mtime_nsec()) {
            self.diff(
                rel,
                "mtime",
                format!(
                    "{}.{:09} on the source, {}.{:09} on the destination",
                    s.mtime(),
                    s.mtime_nsec(),
                    d.mtime(),
                    d.mtime_nsec()
                ),
            );
        }
        match sk {
            crate::sys::S_IFREG => self.file(rel, s, d),
            crate::sys::S_IFLNK => {
                let (a, b) = (
                    fs::read_link(self.src.join(rel)),
                    fs::read_link(self.dst.join(rel)),
                );
                match (a, b) {
                    (Ok(a), Ok(b)) if a == b => {}
                    (Ok(a), Ok(b)) => self.diff(
                        rel,
                        "symlink",
                        format!(
                            "points to {:?} on the source, {:?} on the destination",
                            a, b
                        ),
                    ),
                    (a, b) => self.diff(
                        rel,
                        "unreadable",
                        format!("readlink: source {a:?}, destination {b:?}"),
                    ),
                }
            }
            crate::sys::S_IFCHR | crate::sys::S_IFBLK if s.rdev() != d.rdev() => {
                let mm = |r: u64| {
                    format!(
                        "{}:{}",
                        ((r >> 8) & 0xfff) | ((r >> 32) & !0xfff),
                        (r & 0xff) | ((r >> 12) & !0xff)
                    )
                };
                self.diff(
                    rel,
                    "device",
                    format!(
                        "device {} on the source, {} on the destination",
                        mm(s.rdev()),
                        mm(d.rdev())
                    ),
                );
            }
            _ => {}
        }
        if sk != crate::sys::S_IFDIR && (s.nlink() > 1 || d.nlink() > 1) {
            let p = show(rel);
            self.src_links.entry(key(s)).or_default().push(p.clone());
            self.dst_links.entry(key(d)).or_default().push(p.clone());
            self.link_paths.push((p, key(s), key(d)));
        }
        self.xattrs(rel);
    }

    fn file(&mut self, rel: &Path, s: &Metadata, d: &Metadata) {
        if s.size() != d.size() {
            self.diff(
                rel,
                "content",
                format!(
                    "size {} on the source, {} on the destination",
                    s.size(),
                    d.size()
                ),
            );
            return;
        }
        let shared = s.nlink() > 1 || d.nlink() > 1;
        let job = Job {
            rel: rel.to_path_buf(),
            src: key(s),
            dst: key(d),
            hash_src: !shared || self.hashed_src.insert(key(s)),
            hash_dst: !shared || self.seen_dst.insert(key(d)),
            shared,
        };
        if let Some(tx) = &self.jobs {
            let _ = tx.send(job);
        }
    }

    fn xattrs(&mut self, rel: &Path) {
        let (a, b) = (xattrs(&self.src.join(rel)), xattrs(&self.dst.join(rel)));
        let (a, b) = match (a, b) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) => {
                return self.diff(rel, "xattr", format!("cannot list on the source: {e}"));
            }
            (_, Err(e)) => {
                return self.diff(rel, "xattr", format!("cannot list on the destination: {e}"));
            }
        };
        if a == b {
            return;
        }
        let what = |n: &[u8]| {
            let s = String::from_utf8_lossy(n).into_owned();
            if s.starts_with("system.posix_acl_") {
                ("acl", format!("ACL ({s})"))
            } else {
                ("xattr", format!("extended attribute {s}"))
            }
        };
        let bm: HashMap<&[u8], &[u8]> = b.iter().map(|(n, v)| (&n[..], &v[..])).collect();
        let am: HashMap<&[u8], &[u8]> = a.iter().map(|(n, v)| (&n[..], &v[..])).collect();
        let mut found = Vec::new();
        for (n, v) in &a {
            let (w, name) = what(n);
            match bm.get(&n[..]) {
                None => found.push((w, format!("{name} missing on the destination"))),
                Some(bv) if bv != v => found.push((
                    w,
                    format!(
                        "{name} differs ({} bytes on the source, {} on the destination)",
                        v.len(),
                        bv.len()
                    ),
                )),
                _ => {}
            }
        }
        for (n, _) in &b {
            if !am.contains_key(&n[..]) {
                let (w, name) = what(n);
                found.push((w, format!("{name} only on the destination")));
            }
        }
        for (w, detail) in found {
            self.diff(rel, w, detail);
        }
    }
}

/// SHA-256 of a file; `drop_cache` asks the kernel to forget its cached pages
/// first, so a FUSE mount serves every byte.
pub(super) fn hash_file(p: &Path, drop_cache: bool, counted: Option<&AtomicU64>) -> Hash {
    let mut f = File::open(p).map_err(|e| e.to_string())?;
    if drop_cache {
        crate::sys::drop_cache(&f);
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        };
        h.update(&buf[..n]);
        if let Some(c) = counted {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    Ok(h.finalize().into())
}

pub(super) fn verify(src: &Path, dst: &Path, totals: &Totals, tty: bool) -> Verified {
    let c = Arc::new(Counters::default());
    c.bytes_total.store(totals.bytes_inodes, Ordering::Relaxed);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8);
    let (tx, rx) = crossbeam_channel::bounded::<Job>(1024);
    let src_hashes: Mutex<HashMap<Key, Hash>> = Mutex::new(HashMap::new());
    let dst_hashes: Mutex<HashMap<Key, Hash>> = Mutex::new(HashMap::new());
    let diffs: Mutex<Vec<Diff>> = Mutex::new(Vec::new());
    let deferred: Mutex<Vec<(String, Key, Key)>> = Mutex::new(Vec::new());
    let ticker = Ticker::start("verifying", c.clone(), tty);
    let mut w = Walker {
        src,
        dst,
        out: Verified::default(),
        seen_src: HashSet::new(),
        seen_dst: HashSet::new(),
        hashed_src: HashSet::new(),
        src_links: HashMap::new(),
        dst_links: HashMap::new(),
        link_paths: Vec::new(),
        jobs: Some(tx),
    };
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let rx = rx.clone();
            let (c, src_hashes, dst_hashes, diffs, deferred) =
                (&c, &src_hashes, &dst_hashes, &diffs, &deferred);
            scope.spawn(move || {
                for j in rx {
                    let hs = j.hash_src.then(|| {
                        let h = hash_file(&src.join(&j.rel), false, Some(&c.moved));
                        c.bytes_done
                            .store(c.moved.load(Ordering::Relaxed), Ordering::Relaxed);
                        c.files_done.fetch_add(1, Ordering::Relaxed);
                        h
                    });
                    let hd = j.hash_dst.then(|| hash_file(&dst.join(&j.rel), true, None));
                    let path = show(&j.rel);
                    if !j.shared {
                        if let Some(d) = content_diff(&path, hs.as_ref(), hd.as_ref()) {
                            diffs.lock().expect("not poisoned").push(d);
                        }
                        continue;
                    }
                    if let Some(h) = hs {
                        src_hashes.lock().expect("not poisoned").insert(j.src, h);
                    }
                    if let Some(h) = hd {
                        dst_hashes.lock().expect("not poisoned").insert(j.dst, h);
                    }
                    deferred
                        .lock()
                        .expect("not poisoned")
                        .push((path, j.src, j.dst));
                }
            });
        }
        drop(rx);
        c.files_total.store(totals.files, Ordering::Relaxed);
        w.walk();
        // Closing the channel ends the workers; the scope joins them.
        w.jobs = None;
    });
    drop(ticker);
    let mut out = std::mem::take(&mut w.out);
    out.diffs.extend(diffs.into_inner().expect("not poisoned"));
    // Hard-linked files: compare once per pair of inodes.
    let (sh, dh) = (
        src_hashes.into_inner().expect("not poisoned"),
        dst_hashes.into_inner().expect("not poisoned"),
    );
    let mut pairs = HashSet::new();
    let mut deferred = deferred.into_inner().expect("not poisoned");
    deferred.sort();
    for (path, s, d) in deferred {
        if pairs.insert((s, d))
            && let Some(diff) = content_diff(&path, sh.get(&s), dh.get(&d))
        {
            out.diffs.push(diff);
        }
    }
    // Hard-link groups: each path has the same peers on both sides.
    for (path, s, d) in &w.link_paths {
        let mut a = w.src_links[s].clone();
        let mut b = w.dst_links[d].clone();
        a.sort();
        b.sort();
        if a == b {
            continue;
        }
        let peers = |v: &[String]| {
            let o: Vec<&str> = v
                .iter()
                .filter(|p| *p != path)
                .map(String::as_str)
                .collect();
            if o.is_empty() {
                "no other name".to_string()
            } else {
                o.join(", ")
            }
        };
        out.diffs.push(Diff {
            path: path.clone(),
            what: "hard links",
            detail: format!(
                "linked with {} on the source, with {} on the destination",
                peers(&a),
                peers(&b)
            ),
        });
    }
    out
}

pub(super) fn content_diff(path: &str, s: Option<&Hash>, d: Option<&Hash>) -> Option<Diff> {
    let detail = match (s, d) {
        (Some(Err(e)), _) => format!("cannot read on the source: {e}"),
        (_, Some(Err(e))) => format!("cannot read on the destination: {e}"),
        (Some(Ok(a)), Some(Ok(b))) if a != b => {
            "content differs (SHA-256 of the source and of the destination)".into()
        }
        _ => return None,
    };
    Some(Diff {
        path: path.into(),
        what: "content",
        detail,
    })
}

/// ctime of `m` in nanoseconds since the epoch.
pub(super) fn ctime_ns(m: &Metadata) -> i128 {
    m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128
}

/// Splits the differences into real mismatches and entries the source changed
/// after `start`; returns (mismatches, changed, extras).
pub(super) fn classify(
    src: &Path,
    start: SystemTime,
    v: &mut Verified,
    vanished: &[String],
) -> (Vec<Diff>, Vec<Diff>, Vec<String>) {
    let start_ns = start
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
        - CTIME_SLACK_NS;
    let changed_after = |rel: &Path| match fs::symlink_metadata(src.join(rel)) {
        Ok(m) => ctime_ns(&m) >= start_ns,
        Err(_) => true, // gone from the source since the walk
    };
    let mut verdict: HashMap<String, bool> = HashMap::new();
    let (mut real, mut changed) = (Vec::new(), Vec::new());
    for d in std::mem::take(&mut v.diffs) {
        let rel = if d.path == "." {
            PathBuf::new()
        } else {
            PathBuf::from(&d.path)
        };
        let c = *verdict
            .entry(d.path.clone())
            .or_insert_with(|| changed_after(&rel) || vanished.contains(&d.path));
        if c {
            changed.push(d);
        } else {
            real.push(d);
        }
    }
    let mut extras = Vec::new();
    for (path, parent) in std::mem::take(&mut v.extras) {
        // A name removed from the source after the copy changed its parent directory.
        if changed_after(&parent) || vanished.contains(&path) {
            changed.push(Diff {
                path,
                what: "missing",
                detail: "removed from the source during the run (the copy keeps it)".into(),
            });
        } else {
            extras.push(path);
        }
    }
    real.sort();
    changed.sort();
    (real, changed, extras)
}
