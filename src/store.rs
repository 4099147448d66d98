//! Storage backends: the only place the engine touches the backing store.
//!
//! Names are relative paths inside a volume directory (`kmsfs.root`,
//! `seg/0000000000000001.seg`). The engine's durability contract is written in
//! terms of this trait: file contents are durable after `sync(name)`, and
//! creations, renames and removals inside a directory after `sync_dir(dir)`.
//! `MemStorage` implements exactly that contract (and nothing more), records
//! every mutating call, and can "crash" at any of them, so tests can prove the
//! engine is consistent after a power loss at every write or sync point.

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

pub trait Storage: Send + Sync {
    /// Reads a whole file.
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Reads exactly `buf.len()` bytes at `offset` (UnexpectedEof when short).
    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Reads exactly `len` bytes at `offset` into a new buffer.
    fn read_at_vec(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_at(name, offset, &mut v)?;
        Ok(v)
    }
    fn len(&self, name: &str) -> io::Result<u64>;
    fn exists(&self, name: &str) -> bool {
        self.len(name).is_ok()
    }
    /// Creates or replaces `name` with `data` (not durable until synced).
    fn write_file(&self, name: &str, data: &[u8]) -> io::Result<()>;
    /// Appends to `name`, creating it if needed.
    fn append(&self, name: &str, data: &[u8]) -> io::Result<()>;
    /// Writes `data` at `offset` of `name`, creating it if needed (a gap
    /// before `offset` reads as zeros). Only `kmsfs receive` uses it, to put
    /// records at the places their pointers name.
    fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()>;
    fn sync(&self, name: &str) -> io::Result<()>;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creations, renames and removals in `dir` ("" is the top) durable.
    fn sync_dir(&self, dir: &str) -> io::Result<()>;
    fn create_dir(&self, dir: &str) -> io::Result<()>;
    /// File names (not paths) in `dir`.
    fn list(&self, dir: &str) -> io::Result<Vec<String>>;
    /// (total bytes, free bytes) of the backing store.
    fn space(&self) -> io::Result<(u64, u64)>;
    /// Human-readable location, for messages.
    fn describe(&self) -> String;
    /// Takes the single-writer lock of the volume; the guard holds it until dropped.
    /// Fails with `WouldBlock` (and the holder's description) when another process has it.
    fn lock_exclusive(&self) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        Ok(Box::new(()))
    }
    /// Hint: start writing `len` bytes at `offset` of `name` to the device now,
    /// without waiting (so a later sync has little left to do). No durability
    /// promise; the default does nothing.
    fn start_writeback(&self, _name: &str, _offset: u64, _len: u64) {}
    /// Read-only openers (snapshot mounts, info, clone) hold this shared lock,
    /// taken before they read the root record.
    fn lock_readers_shared(&self) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        Ok(Box::new(()))
    }
    /// The cleaner deletes segments only while it holds this (no reader can be
    /// using an older root then); None when readers are present.
    fn try_lock_readers_exclusive(
        &self,
    ) -> io::Result<Option<Box<dyn std::any::Any + Send + Sync>>> {
        Ok(Some(Box::new(())))
    }
    /// Publishes a reader pin (see `docs/FORMAT.md`): creates `name` (a
    /// [`PIN_PREFIX`] name in the volume directory) holding `data`, and holds
    /// it (`FsStorage`: an exclusive flock on it) until the returned guard is
    /// dropped, which removes it. Readers call it under the shared readers
    /// lock, so the cleaner (under the exclusive one) never sees half a pin.
    fn create_pin(
        &self,
        _name: &str,
        _data: &[u8],
    ) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        Ok(Box::new(()))
    }
    /// Every reader pin in the volume directory, with whether its publisher
    /// still holds it (a pin nobody holds was left by a reader that died).
    fn list_pins(&self) -> io::Result<Vec<PinFile>> {
        Ok(Vec::new())
    }
    /// Removes a pin nobody holds any more.
    fn remove_pin(&self, name: &str) -> io::Result<()> {
        self.remove(name)
    }
}

/// Names of reader pin files start with this (then 32 hex digits).
pub const PIN_PREFIX: &str = "kmsfs.pin.";

/// A reader pin as found by [`Storage::list_pins`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinFile {
    pub name: String,
    /// Its contents (at most [`PIN_MAX_LEN`] bytes are read).
    pub data: Vec<u8>,
    /// Whether the reader that published it still holds it.
    pub held: bool,
}

/// Pins longer than this are not read further (a pin names a few roots).
pub const PIN_MAX_LEN: u64 = 1 << 20;

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

/// Takes the writer lock, turning contention into a clear error.
pub fn lock_volume(s: &dyn Storage) -> crate::error::Result<Box<dyn std::any::Any + Send + Sync>> {
    s.lock_exclusive().map_err(|e| {
        if e.kind() == io::ErrorKind::WouldBlock {
            crate::error::Error::Locked(format!("{}: {e}", s.describe()))
        } else {
            crate::error::Error::io(crate::format::LOCK_FILE, e)
        }
    })
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
}

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
