//! `FsStorage`: a volume in a directory of a local or network filesystem.

use std::collections::HashMap;
use std::fs::{File, TryLockError};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, FcntlArg, OFlag, fcntl, openat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};
use nix::sys::statvfs::fstatvfs;
use nix::unistd::{UnlinkatFlags, fsync, unlinkat};
use parking_lot::Mutex;

use super::{PIN_MAX_LEN, PIN_PREFIX, PinFile, Storage, direct_buf};

/// A published pin of [`FsStorage`]: the locked file, removed on drop.
struct FsPin {
    _file: File,
    dir: OwnedFd,
    leaf: String,
}

impl Drop for FsPin {
    fn drop(&mut self) {
        // Unlinked while still locked: the cleaner never sees it unheld.
        let _ = unlinkat(&self.dir, self.leaf.as_str(), UnlinkatFlags::NoRemoveDir);
    }
}

/// A directory on a local or network filesystem.
///
/// The backing directory may sit on a share that others can write, so nothing
/// planted in it may turn the daemon (often root) against its own host. Every
/// name is a plain relative path (no absolute path, no `..`), resolved one
/// component at a time relative to a descriptor of the volume directory
/// without following symbolic links (`openat` with `O_NOFOLLOW`,
/// `AT_SYMLINK_NOFOLLOW`), and only regular files and real directories are
/// used: a symbolic link, FIFO, socket or device where kmsfs keeps a file is
/// refused with an error that names it, and opening one never blocks. Files
/// replaced whole (`write_file`) are created afresh, so a planted hard link is
/// unlinked, never written through, and a lock file with other names is never
/// truncated.
pub struct FsStorage {
    root: PathBuf,
    /// The volume directory, opened on first use (`init` and `clone` make the
    /// storage before the directory exists).
    dir: OnceLock<OwnedFd>,
    /// Subdirectories (`seg`), opened without following links and kept, so a
    /// cold segment open costs no more path walking than before.
    subdirs: Mutex<HashMap<String, Arc<OwnedFd>>>,
    /// Open handles, so reads of segments are a pread and appends need no open.
    handles: Mutex<HashMap<String, Arc<File>>>,
    /// Read handles opened with O_DIRECT, for [`Storage::read_at_once`].
    direct: Mutex<HashMap<String, Arc<File>>>,
    /// Set when the backing file system refuses O_DIRECT: buffered reads from then on.
    no_direct: std::sync::atomic::AtomicBool,
}

/// Alignment of O_DIRECT reads (offset, length and memory): the page size,
/// which covers every logical block size up to 4 KiB.
const DIRECT_ALIGN: usize = 4096;

/// The directory a last path component is resolved in.
enum At<'a> {
    Top(BorrowedFd<'a>),
    Sub(Arc<OwnedFd>),
}

impl AsFd for At<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            At::Top(fd) => fd.as_fd(),
            At::Sub(fd) => fd.as_fd(),
        }
    }
}

/// How a backing file is opened.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Reading an existing file.
    Read,
    /// Reading and appending, created when missing (segments).
    Append,
    /// Reading and writing, created when missing, never truncated (lock files).
    Lock,
    /// Reading and writing an existing file.
    Write,
}

/// Checks that `name` is a plain relative path inside the volume directory
/// (`""` is the directory itself) and returns its components.
fn components(name: &str) -> io::Result<Vec<&str>> {
    if name.is_empty() {
        return Ok(Vec::new());
    }
    if name.contains('\0')
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{name:?} is not a plain relative name inside the volume directory \
                 (absolute paths, \"..\", \".\" and empty components are refused)"
            ),
        ));
    }
    Ok(name.split('/').collect())
}

/// Splits a file name into its directory (`""` is the top) and last component.
fn split_name(name: &str) -> io::Result<(&str, &str)> {
    if components(name)?.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an empty name does not name a file",
        ));
    }
    Ok(match name.rfind('/') {
        Some(i) => (&name[..i], &name[i + 1..]),
        None => ("", name),
    })
}

/// The file type bits of a stat result.
fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

fn kind_text(k: SFlag) -> &'static str {
    if k == SFlag::S_IFLNK {
        "a symbolic link"
    } else if k == SFlag::S_IFIFO {
        "a FIFO (named pipe)"
    } else if k == SFlag::S_IFSOCK {
        "a socket"
    } else if k == SFlag::S_IFCHR {
        "a character device"
    } else if k == SFlag::S_IFBLK {
        "a block device"
    } else if k == SFlag::S_IFDIR {
        "a directory"
    } else if k == SFlag::S_IFREG {
        "a regular file"
    } else {
        "a special file"
    }
}

/// Mode of the files kmsfs creates.
fn file_mode() -> Mode {
    Mode::S_IRUSR | Mode::S_IWUSR
}

impl FsStorage {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FsStorage {
            root: root.into(),
            dir: OnceLock::new(),
            subdirs: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            direct: Mutex::new(HashMap::new()),
            no_direct: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The error for something kmsfs never makes, found where it keeps a
    /// regular file or directory: the one sign of tampering this layer sees.
    fn planted(&self, name: &str, found: SFlag, expected: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is {}, where kmsfs keeps {expected}; kmsfs never makes one there, so the \
                 backing directory may have been tampered with. Inspect it, remove it, then retry",
                self.root.join(name).display(),
                kind_text(found)
            ),
        )
    }

    /// Turns a failed open of `leaf` (in `at`; `name` for messages) into a
    /// clear error when something other than the expected kind is there (a
    /// symbolic link refused by O_NOFOLLOW, a FIFO without a reader, ...).
    fn diagnose(
        &self,
        at: BorrowedFd<'_>,
        leaf: &str,
        name: &str,
        expected: SFlag,
        err: Errno,
    ) -> io::Error {
        match fstatat(at, leaf, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if kind(&st) != expected => self.planted(
                name,
                kind(&st),
                if expected == SFlag::S_IFDIR {
                    "a directory"
                } else {
                    "a regular file"
                },
            ),
            _ => err.into(),
        }
    }

    /// The volume directory. The administrator names it, so it is opened as
    /// given (a symbolic link to it is fine); everything inside is opened
    /// relative to this descriptor.
    fn top(&self) -> io::Result<BorrowedFd<'_>> {
        if let Some(fd) = self.dir.get() {
            return Ok(fd.as_fd());
        }
        let fd = nix::fcntl::open(
            &self.root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        // A concurrent first use may have won the race: the same directory.
        let _ = self.dir.set(fd);
        Ok(self.dir.get().expect("set just above").as_fd())
    }

    /// The directory `dir` ("" is the top), each component a real directory.
    fn dir(&self, dir: &str) -> io::Result<At<'_>> {
        let comps = components(dir)?;
        if comps.is_empty() {
            return Ok(At::Top(self.top()?));
        }
        if let Some(fd) = self.subdirs.lock().get(dir) {
            return Ok(At::Sub(fd.clone()));
        }
        let top = self.top()?;
        let mut cur: Option<OwnedFd> = None;
        for (i, c) in comps.iter().enumerate() {
            let at = cur.as_ref().map_or(top, |f| f.as_fd());
            // O_DIRECTORY fails before a FIFO could block the open.
            let fd = openat(
                at,
                *c,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| self.diagnose(at, c, &comps[..=i].join("/"), SFlag::S_IFDIR, e))?;
            cur = Some(fd);
        }
        let fd = Arc::new(cur.expect("at least one component"));
        let mut m = self.subdirs.lock();
        if m.len() >= 16 {
            m.clear();
        }
        m.insert(dir.to_string(), fd.clone());
        Ok(At::Sub(fd))
    }

    /// Opens a regular file of the volume, refusing anything else without
    /// blocking on it.
    fn open_file(&self, name: &str, access: Access) -> io::Result<File> {
        let (dir, leaf) = split_name(name)?;
        let at = self.dir(dir)?;
        let base = match access {
            Access::Read => OFlag::O_RDONLY,
            Access::Append => OFlag::O_RDWR | OFlag::O_APPEND | OFlag::O_CREAT,
            Access::Lock => OFlag::O_RDWR | OFlag::O_CREAT,
            Access::Write => OFlag::O_RDWR,
        };
        // O_NONBLOCK: opening a planted FIFO returns at once (and is then refused).
        let flags =
            base | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK;
        let fd = openat(&at, leaf, flags, file_mode())
            .map_err(|e| self.diagnose(at.as_fd(), leaf, name, SFlag::S_IFREG, e))?;
        let k = kind(&fstat(&fd)?);
        if k != SFlag::S_IFREG {
            return Err(self.planted(name, k, "a regular file"));
        }
        // Ordinary blocking I/O from here on.
        let keep = if access == Access::Append {
            OFlag::O_APPEND
        } else {
            OFlag::empty()
        };
        fcntl(&fd, FcntlArg::F_SETFL(keep))?;
        Ok(File::from(fd))
    }

    fn handle(&self, name: &str, create: bool) -> io::Result<Arc<File>> {
        let mut h = self.handles.lock();
        if let Some(f) = h.get(name) {
            return Ok(f.clone());
        }
        let f = self.open_file(name, if create { Access::Append } else { Access::Read })?;
        let f = Arc::new(f);
        // Bound the number of cached handles; segments are many but only a few are hot.
        if h.len() > 256 {
            h.clear();
        }
        h.insert(name.to_string(), f.clone());
        Ok(f)
    }

    fn forget(&self, name: &str) {
        self.handles.lock().remove(name);
        self.direct.lock().remove(name);
    }

    /// A read handle of `name` with O_DIRECT set (cached like [`Self::handle`]).
    /// Linux only: elsewhere it answers EINVAL, which reads buffered.
    fn direct_handle(&self, name: &str) -> io::Result<Arc<File>> {
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        }
        #[cfg(target_os = "linux")]
        {
            if let Some(f) = self.direct.lock().get(name) {
                return Ok(f.clone());
            }
            let f = self.open_file(name, Access::Read)?;
            fcntl(&f, FcntlArg::F_SETFL(OFlag::O_DIRECT))?;
            let f = Arc::new(f);
            let mut h = self.direct.lock();
            if h.len() > 256 {
                h.clear();
            }
            h.insert(name.to_string(), f.clone());
            Ok(f)
        }
    }

    /// [`Storage::read_at_once`] with O_DIRECT: the aligned span around
    /// `offset..offset + len` is read from the device straight into a
    /// reused, huge-page-backed buffer (`direct_buf`), without a copy out of
    /// (and without filling) the page cache of the segment file, and the
    /// bytes are handed to `f`. The kernel writes back dirty pages of the
    /// span first, so a read after a buffered append still sees the appended
    /// bytes. `false` (and `f` not called) when the file system refuses
    /// O_DIRECT.
    fn read_direct(
        &self,
        name: &str,
        offset: u64,
        len: usize,
        f: &mut dyn FnMut(&[u8]),
    ) -> io::Result<bool> {
        let file = match self.direct_handle(name) {
            Ok(file) => file,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
            Err(e) => return Err(e),
        };
        let start = offset & !(DIRECT_ALIGN as u64 - 1);
        let pre = (offset - start) as usize;
        let want = pre.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
        let span = want.next_multiple_of(DIRECT_ALIGN);
        direct_buf::with_buf(span, |buf| {
            let mut done = 0usize;
            while done < want {
                let n = match file.read_at(&mut buf[done..], start + done as u64) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) && done == 0 => {
                        return Ok(false);
                    }
                    Err(e) => return Err(e),
                };
                // A short read ends at the end of the file (or at an
                // unaligned point from which O_DIRECT cannot go on).
                if n == 0 || (!(done + n).is_multiple_of(DIRECT_ALIGN) && done + n < want) {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                done += n;
            }
            f(&buf[pre..want]);
            Ok(true)
        })
    }
}

impl Storage for FsStorage {
    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        self.open_file(name, Access::Read)?.read_to_end(&mut v)?;
        Ok(v)
    }

    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let f = self.handle(name, false)?;
        f.read_exact_at(buf, offset)
    }

    /// Reads into fresh, uninitialised memory: zeroing a buffer the kernel is
    /// about to fill cost as much as a tenth of a streaming read.
    fn read_at_vec(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let f = self.handle(name, false)?;
        let mut v: Vec<u8> = Vec::with_capacity(len);
        let mut done = 0usize;
        while done < len {
            // SAFETY: the kernel writes at most `len - done` bytes into the
            // spare capacity starting at `done`; no reference to uninitialised
            // memory is created, and `set_len` below covers only written bytes.
            let n = unsafe {
                libc::pread(
                    f.as_raw_fd(),
                    v.as_mut_ptr().add(done).cast(),
                    len - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += n as usize;
        }
        // SAFETY: all `len` bytes were written by pread above.
        unsafe { v.set_len(len) };
        Ok(v)
    }

    fn read_at_once(
        &self,
        name: &str,
        offset: u64,
        len: usize,
        f: &mut dyn FnMut(&[u8]),
    ) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        if !self.no_direct.load(Ordering::Relaxed) {
            if self.read_direct(name, offset, len, f)? {
                return Ok(());
            }
            log::info!(
                "the backing file system refuses O_DIRECT; large reads go through its page cache"
            );
            self.no_direct.store(true, Ordering::Relaxed);
        }
        f(&self.read_at_vec(name, offset, len)?);
        Ok(())
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        let (dir, leaf) = split_name(name)?;
        let at = self.dir(dir)?;
        let st = fstatat(&at, leaf, AtFlags::AT_SYMLINK_NOFOLLOW)?;
        if kind(&st) != SFlag::S_IFREG {
            return Err(self.planted(name, kind(&st), "a regular file"));
        }
        Ok(st.st_size as u64)
    }

    /// Anything at the name counts, a planted link included (`init` must
    /// not take such a directory for empty).
    fn exists(&self, name: &str) -> bool {
        let Ok((dir, leaf)) = split_name(name) else {
            return false;
        };
        self.dir(dir)
            .is_ok_and(|at| fstatat(&at, leaf, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok())
    }

    /// Replaces `name` by a new file: an old regular file there is unlinked
    /// first (a hard link planted there to a file elsewhere is never written
    /// through), anything else is refused.
    fn write_file(&self, name: &str, data: &[u8]) -> io::Result<()> {
        self.forget(name);
        let (dir, leaf) = split_name(name)?;
        let at = self.dir(dir)?;
        match fstatat(&at, leaf, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if kind(&st) == SFlag::S_IFREG => {
                match unlinkat(&at, leaf, UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(st) => return Err(self.planted(name, kind(&st), "a regular file")),
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = openat(
            &at,
            leaf,
            OFlag::O_WRONLY
                | OFlag::O_CREAT
                | OFlag::O_EXCL
                | OFlag::O_NOFOLLOW
                | OFlag::O_CLOEXEC
                | OFlag::O_NOCTTY,
            file_mode(),
        )
        .map_err(|e| self.diagnose(at.as_fd(), leaf, name, SFlag::S_IFREG, e))?;
        File::from(fd).write_all(data)
    }

    fn append(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let f = self.handle(name, true)?;
        // Handles opened for reading only cannot append; reopen in append mode.
        let mut r = (&*f).write_all(data);
        if let Err(e) = &r
            && e.raw_os_error() == Some(libc::EBADF)
        {
            self.forget(name);
            let f = self.handle(name, true)?;
            r = (&*f).write_all(data);
        }
        r
    }

    fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        // Its own descriptor, without O_APPEND (which would ignore the offset).
        self.open_file(name, Access::Lock)?
            .write_all_at(data, offset)
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        let cached = self.handles.lock().get(name).cloned();
        let f = match cached {
            Some(f) => f,
            None => Arc::new(self.open_file(name, Access::Read)?),
        };
        f.sync_data()
    }

    /// Moves only a regular file into place (never a link planted at `from`).
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.forget(from);
        self.forget(to);
        let (fdir, fleaf) = split_name(from)?;
        let (tdir, tleaf) = split_name(to)?;
        let fat = self.dir(fdir)?;
        let tat = self.dir(tdir)?;
        let st = fstatat(&fat, fleaf, AtFlags::AT_SYMLINK_NOFOLLOW)?;
        if kind(&st) != SFlag::S_IFREG {
            return Err(self.planted(from, kind(&st), "a regular file"));
        }
        renameat(&fat, fleaf, &tat, tleaf)
            .map_err(|e| self.diagnose(tat.as_fd(), tleaf, to, SFlag::S_IFREG, e))
    }

    /// Unlinks the name itself: a planted link goes, never its target.
    fn remove(&self, name: &str) -> io::Result<()> {
        self.forget(name);
        let (dir, leaf) = split_name(name)?;
        let at = self.dir(dir)?;
        unlinkat(&at, leaf, UnlinkatFlags::NoRemoveDir)
            .map_err(|e| self.diagnose(at.as_fd(), leaf, name, SFlag::S_IFREG, e))
    }

    fn sync_dir(&self, dir: &str) -> io::Result<()> {
        Ok(fsync(self.dir(dir)?)?)
    }

    fn create_dir(&self, dir: &str) -> io::Result<()> {
        let (parent, leaf) = split_name(dir)?;
        let at = self.dir(parent)?;
        match mkdirat(&at, leaf, Mode::from_bits_truncate(0o777)) {
            Ok(()) => Ok(()),
            Err(Errno::EEXIST) => {
                let st = fstatat(&at, leaf, AtFlags::AT_SYMLINK_NOFOLLOW)?;
                if kind(&st) == SFlag::S_IFDIR {
                    Ok(())
                } else {
                    Err(self.planted(dir, kind(&st), "a directory"))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let at = self.dir(dir)?;
        // A descriptor of its own: reading a directory moves its offset.
        let fd = openat(
            &at,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let mut d = Dir::from_fd(fd)?;
        let mut v = Vec::new();
        for e in d.iter() {
            let e = e?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                v.push(String::from_utf8_lossy(n).into_owned());
            }
        }
        v.sort();
        Ok(v)
    }

    fn space(&self) -> io::Result<(u64, u64)> {
        let s = fstatvfs(self.top()?)?;
        let frsize = s.fragment_size() as u64;
        Ok((
            s.blocks() as u64 * frsize,
            s.blocks_available() as u64 * frsize,
        ))
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn start_writeback(&self, name: &str, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        let Some(f) = self.handles.lock().get(name).cloned() else {
            return;
        };
        // sync_file_range(SYNC_FILE_RANGE_WRITE) on Linux (nix has none).
        crate::sys::start_writeback(&f.as_raw_fd(), offset, len);
    }

    /// `fallocate(FALLOC_FL_KEEP_SIZE)` on Linux: on ext4 an append into
    /// reserved (unwritten) extents skips the per-block delayed-allocation
    /// work (`ext4_da_get_block_prep`: 6.7% of the daemon's samples in a
    /// streaming write before, 1.2% after). A file system without it says no,
    /// and nothing changes.
    fn preallocate(&self, name: &str, offset: u64, len: u64) {
        #[cfg(target_os = "linux")]
        {
            use nix::fcntl::{FallocateFlags, fallocate};
            let Some(f) = self.handles.lock().get(name).cloned() else {
                return;
            };
            let (Ok(at), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
            else {
                return;
            };
            // Best effort: where the file system cannot reserve (full, or no
            // fallocate), appends allocate as they go, as before.
            if let Err(e) = fallocate(&*f, FallocateFlags::FALLOC_FL_KEEP_SIZE, at, n) {
                log::debug!("reserving room ahead in {name}: {e}");
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (name, offset, len);
    }

    /// A truncate to the file's own length: ext4 (and XFS) then free the
    /// blocks reserved past the end; the length and bytes stay as they are.
    fn release_tail(&self, name: &str) {
        // Its own descriptor: a cached one may be open for reading only.
        // (Where nothing was reserved, the same length changes nothing.)
        let r = self
            .open_file(name, Access::Write)
            .and_then(|f| f.set_len(f.metadata()?.len()));
        if let Err(e) = r {
            log::debug!("releasing the space reserved past the end of {name}: {e}");
        }
    }

    fn lock_readers_shared(&self) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        let f = self.open_file(crate::format::READERS_FILE, Access::Lock)?;
        f.lock_shared()?;
        Ok(Box::new(f))
    }

    fn try_lock_readers_exclusive(
        &self,
    ) -> io::Result<Option<Box<dyn std::any::Any + Send + Sync>>> {
        let f = self.open_file(crate::format::READERS_FILE, Access::Lock)?;
        match f.try_lock() {
            Ok(()) => Ok(Some(Box::new(f))),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }

    fn create_pin(
        &self,
        name: &str,
        data: &[u8],
    ) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        let (dir, leaf) = split_name(name)?;
        let at = self.dir(dir)?;
        let fd = openat(
            &at,
            leaf,
            OFlag::O_RDWR
                | OFlag::O_CREAT
                | OFlag::O_EXCL
                | OFlag::O_NOFOLLOW
                | OFlag::O_CLOEXEC
                | OFlag::O_NOCTTY,
            file_mode(),
        )
        .map_err(|e| self.diagnose(at.as_fd(), leaf, name, SFlag::S_IFREG, e))?;
        let f = File::from(fd);
        let pin = FsPin {
            dir: at.as_fd().try_clone_to_owned()?,
            leaf: leaf.to_string(),
            _file: f,
        };
        // Dropping `pin` on an error below removes the file again.
        pin._file.lock()?;
        (&pin._file).write_all(data)?;
        Ok(Box::new(pin))
    }

    fn list_pins(&self) -> io::Result<Vec<PinFile>> {
        let mut out = Vec::new();
        for name in self.list("")? {
            if !name.starts_with(PIN_PREFIX) {
                continue;
            }
            let f = match self.open_file(&name, Access::Read) {
                Ok(f) => f,
                // Its reader left between the listing and now.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let held = match f.try_lock_shared() {
                Ok(()) => false,
                Err(TryLockError::WouldBlock) => true,
                Err(TryLockError::Error(e)) => return Err(e),
            };
            let mut data = Vec::new();
            (&f).take(PIN_MAX_LEN).read_to_end(&mut data)?;
            out.push(PinFile { name, data, held });
        }
        Ok(out)
    }

    fn lock_exclusive(&self) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        use std::io::Seek;
        use std::os::unix::fs::MetadataExt;
        let mut f = self.open_file(crate::format::LOCK_FILE, Access::Lock)?;
        match f.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = f.read_to_string(&mut holder);
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("held by {}", holder.trim()),
                ));
            }
            Err(TryLockError::Error(e)) => return Err(e),
        }
        // The holder's pid is a courtesy for messages: a lock file with other
        // names (a hard link to a file elsewhere) is locked but never truncated.
        let links = f.metadata()?.nlink();
        if links == 1 {
            f.set_len(0)?;
            f.seek(io::SeekFrom::Start(0))?;
            writeln!(f, "pid {}", std::process::id())?;
        } else {
            log::warn!(
                "{} has {links} names (hard links); kmsfs locks it but does not write to it",
                self.root.join(crate::format::LOCK_FILE).display()
            );
        }
        Ok(Box::new(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names_stay_inside_the_volume() {
        for bad in [
            "../x",
            "/etc/passwd",
            "seg/../../x",
            "seg/..",
            "./kmsfs.root",
            "seg//a",
            "seg/",
            "/",
            "a\0b",
        ] {
            let e = components(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
            assert!(e.to_string().contains("plain relative name"), "{e}");
        }
        assert_eq!(components("").unwrap(), Vec::<&str>::new());
        assert_eq!(components("seg/0001.seg").unwrap(), vec!["seg", "0001.seg"]);
        assert_eq!(split_name("kmsfs.root").unwrap(), ("", "kmsfs.root"));
        assert_eq!(split_name("seg/a").unwrap(), ("seg", "a"));
        assert!(split_name("").is_err());

        // Every operation refuses them before touching anything.
        let d = tempfile::tempdir().unwrap();
        let inner = d.path().join("vol");
        std::fs::create_dir(&inner).unwrap();
        std::fs::write(d.path().join("x"), b"victim").unwrap();
        let s = FsStorage::new(&inner);
        for bad in ["../x", "/etc/passwd", "seg/../../x"] {
            let kind = io::ErrorKind::InvalidInput;
            assert_eq!(s.read(bad).unwrap_err().kind(), kind);
            assert_eq!(s.len(bad).unwrap_err().kind(), kind);
            assert_eq!(s.write_file(bad, b"x").unwrap_err().kind(), kind);
            assert_eq!(s.append(bad, b"x").unwrap_err().kind(), kind);
            assert_eq!(s.remove(bad).unwrap_err().kind(), kind);
            assert_eq!(s.rename(bad, "y").unwrap_err().kind(), kind);
            assert_eq!(s.rename("y", bad).unwrap_err().kind(), kind);
            assert_eq!(s.sync_dir(bad).unwrap_err().kind(), kind);
            assert_eq!(s.create_dir(bad).unwrap_err().kind(), kind);
            assert_eq!(s.list(bad).unwrap_err().kind(), kind);
            assert!(!s.exists(bad));
        }
        assert_eq!(std::fs::read(d.path().join("x")).unwrap(), b"victim");
    }

    #[test]
    fn preallocated_room_is_given_back_and_bytes_stay() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let s = FsStorage::new(d.path());
        s.create_dir("seg").unwrap();
        s.append("seg/a", b"0123456789").unwrap();
        let blocks = || std::fs::metadata(d.path().join("seg/a")).unwrap().blocks();
        let before = blocks();
        s.preallocate("seg/a", 10, 4 << 20);
        let reserved = blocks();
        // The length never changes, and appends land after the old end.
        assert_eq!(s.len("seg/a").unwrap(), 10);
        s.append("seg/a", b"abc").unwrap();
        assert_eq!(s.read("seg/a").unwrap(), b"0123456789abc");
        s.release_tail("seg/a");
        assert_eq!(s.read("seg/a").unwrap(), b"0123456789abc");
        // Where the file system took the reservation, it is given back.
        if reserved > before + 1024 {
            assert!(
                blocks() < reserved / 2,
                "{} of {reserved} blocks kept",
                blocks()
            );
        }
        // A missing file is not created by either hint.
        s.release_tail("seg/missing");
        s.preallocate("seg/missing", 0, 4096);
        assert!(!s.exists("seg/missing"));
    }

    #[test]
    fn read_at_once_matches_buffered_reads_at_any_alignment() {
        let d = tempfile::tempdir().unwrap();
        let s = FsStorage::new(d.path());
        s.create_dir("seg").unwrap();
        let data: Vec<u8> = (0..3 * 4096 + 1000)
            .map(|i| (i * 7 + i / 13) as u8)
            .collect();
        s.append("seg/a", &data[..5000]).unwrap();
        // Not yet synced: O_DIRECT sees the buffered bytes (the kernel writes
        // the span back first).
        for synced in [false, true] {
            if synced {
                s.append("seg/a", &data[5000..]).unwrap();
                s.sync("seg/a").unwrap();
            }
            let len = if synced { data.len() } else { 5000 };
            for off in [0, 1, 100, 4095, 4096, 4097, 4999] {
                for n in [1, 100, 4096, 4097, 8191, 8192, len - off] {
                    if off + n > len {
                        continue;
                    }
                    let mut got = Vec::new();
                    s.read_at_once("seg/a", off as u64, n, &mut |b| got = b.to_vec())
                        .unwrap();
                    assert_eq!(got, &data[off..off + n], "{off}+{n}");
                }
            }
            let e = s
                .read_at_once("seg/a", len as u64 - 10, 11, &mut |_| panic!("short"))
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        }
        // A removed file is forgotten by the O_DIRECT handles too.
        s.remove("seg/a").unwrap();
        let e = s.read_at_once("seg/a", 0, 1, &mut |_| ()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn fs_storage_roundtrip() {
        let d = tempfile::tempdir().unwrap();
        let s = FsStorage::new(d.path());
        s.create_dir("seg").unwrap();
        s.append("seg/a", b"abc").unwrap();
        s.append("seg/a", b"def").unwrap();
        s.sync("seg/a").unwrap();
        let mut b = [0u8; 3];
        s.read_at("seg/a", 2, &mut b).unwrap();
        assert_eq!(&b, b"cde");
        assert_eq!(s.read_at_vec("seg/a", 1, 5).unwrap(), b"bcdef");
        let e = s.read_at_vec("seg/a", 4, 5).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(s.list("seg").unwrap(), vec!["a".to_string()]);
        s.write_file("t", b"x").unwrap();
        s.rename("t", "u").unwrap();
        s.sync_dir("").unwrap();
        assert_eq!(s.read("u").unwrap(), b"x");
        assert!(s.space().unwrap().1 > 0);
    }
}
