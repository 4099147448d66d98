//! FUSE translation: kernel requests in, [`Volume`] calls out.
//!
//! This layer converts types (inode numbers, attributes, times, flags, errors)
//! and negotiates the kernel connection; every filesystem rule lives in
//! `volume`. Every error leaves through `Error::errno()`. No per-handle state is
//! kept here: the core counts opens per inode, so an unlinked file that is
//! still open lives until its last release.
//!
//! Two things besides translation live beside it (`committer.rs`, `acl.rs`):
//! - the periodic committer, whose lifetime is the session's (started in
//!   `init`, stopped in `destroy` before the final commit);
//! - the POSIX ACL duties the kernel leaves to a FUSE daemon (see [`acl`]):
//!   the mode follows an access ACL that is set, a chmod updates the ACL, and
//!   new nodes inherit default ACLs. The core stores ACLs as opaque xattrs;
//!   if it ever interprets them, this belongs there.
//!
//! Kernel caching is safe to turn on (write-back cache, kept page cache,
//! cached symlinks) because a volume has a single writer, enforced by the
//! volume lock: nothing changes the tree behind the kernel's back.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, Notifier,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL,
    TimeOrNow, WriteFlags,
};

pub mod acl;
mod committer;
mod fill;

use committer::Committer;
pub use committer::{CLEAN_INTERVAL, COMMIT_INTERVAL, IDLE_COMMIT};
use fill::Filler;

use crate::error::Error;
use crate::format::{FileKind, Timestamp};
use crate::volume::{self, Attr, SetAttr, TimeSet, Volume};

/// Attribute validity in the kernel (and entry validity where a reply carries
/// one time for both: CREATE, READDIRPLUS). Short, unlike names: the daemon
/// changes st_blocks behind the kernel (a WRITE of whole blocks, the commit's
/// write-back of buffered ones) and only fsync and fallocate tell the kernel.
/// A longer time needs those write-backs to invalidate the inodes they touch
/// (docs/PERFORMANCE.md; `allocation_shows_after_the_idle_commit_without_fsync`).
const ATTR_TTL: Duration = Duration::from_secs(1);
/// Validity of a name (positive or negative) in the kernel's dentry cache.
/// Long, because nothing changes the namespace of a mounted volume behind the
/// kernel: the mount is the volume's only writer (the volume lock or the
/// writer lease), `kmsfs snapshot restore` and `kmsfs receive` refuse a
/// mounted volume, and a read-only or snapshot mount shows a tree that does
/// not move. Every change of a name (create, unlink, rename, link, rmdir) goes
/// through the kernel, which updates its dentries itself. With 1 s, a name
/// looked up more than a second ago cost one more LOOKUP before an unlink,
/// an open or a stat (docs/PERFORMANCE.md).
const ENTRY_TTL: Duration = Duration::from_secs(3600);
/// Largest read and write per request, and the readahead window.
const MAX_IO: u32 = 1 << 20;
/// Requests the kernel may keep in flight in the background (readahead, write-back).
const MAX_BACKGROUND: u16 = 64;
/// Directory entries fetched from the core per readdir request.
const READDIR_BATCH: usize = 512;

/// How the volume is presented to the kernel.
#[derive(Clone, Debug, Default)]
pub struct MountSettings {
    /// Shown as the mount source (the volume directory).
    pub fsname: String,
    pub read_only: bool,
    pub allow_other: bool,
    pub default_permissions: bool,
    /// Generic kernel flags asked for on the command line (nodev, noexec, noatime…).
    pub flags: Vec<MountOption>,
    /// Request-handling threads (at least 2).
    pub threads: usize,
    /// Each request thread reads its own clone of the /dev/fuse descriptor
    /// (FUSE_DEV_IOC_CLONE), so replies are matched on per-descriptor lists
    /// instead of one shared one. Linux only.
    pub clone_fd: bool,
    /// Ask for FUSE over io_uring (FUSE_OVER_IO_URING) at INIT: requests then come
    /// over per-CPU rings instead of /dev/fuse reads (vendor/fuser/src/uring.rs). The
    /// kernel must offer it (`/sys/module/fuse/parameters/enable_uring`). Linux only.
    pub uring: bool,
    /// Block fill: the rest of a block that a small read opened goes to the
    /// kernel's page cache ([`fill`]). Linux only.
    pub block_fill: bool,
    /// Leader/follower reading of /dev/fuse with a spin of up to this many
    /// microseconds after each request (vendor/fuser/src/lead.rs; 0: no spin, the
    /// reader sleeps in poll at once). Linux, not over io_uring.
    pub spin_us: u32,
}

impl MountSettings {
    /// The name Finder shows (macOS): the volume directory's last component,
    /// without the commas that would split the mount options.
    #[cfg(target_os = "macos")]
    fn volname(&self) -> String {
        let name = std::path::Path::new(&self.fsname)
            .file_name()
            .map(|n| n.to_string_lossy().replace(',', "_"))
            .unwrap_or_default();
        if name.is_empty() {
            "kmsfs".into()
        } else {
            name
        }
    }

    /// The fuser session configuration for these settings.
    pub fn config(&self) -> Config {
        let mut opts = vec![
            MountOption::FSName(self.fsname.clone()),
            // As a kernel option (fuser passes Subtype only to fusermount3):
            // the mount shows as `fuse.kmsfs`, so umount(8) runs our helper.
            #[cfg(target_os = "linux")]
            MountOption::CUSTOM("subtype=kmsfs".into()),
            // macFUSE has no subtype. Finder would store resource forks and
            // metadata of every file as `._NAME` files (noappledouble keeps
            // them out), and names the volume after the volume directory.
            #[cfg(target_os = "macos")]
            MountOption::CUSTOM("noappledouble".into()),
            #[cfg(target_os = "macos")]
            MountOption::CUSTOM(format!("volname={}", self.volname())),
            if self.read_only {
                MountOption::RO
            } else {
                MountOption::RW
            },
        ];
        if self.default_permissions {
            opts.push(MountOption::DefaultPermissions);
        }
        opts.extend(self.flags.iter().cloned());
        let mut c = Config::default();
        c.mount_options = opts;
        c.acl = if self.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        c.n_threads = Some(self.threads.max(2));
        #[cfg(target_os = "linux")]
        {
            c.clone_fd = self.clone_fd;
            c.io_uring = self.uring;
            c.spin_us = Some(self.spin_us);
        }
        c
    }
}

/// A job for the first request after INIT ([`KmsFs::after_init_slot`]).
pub type AfterInit = Box<dyn FnOnce() + Send>;

/// The outcome of the final commit in `destroy`, for the daemon's exit status.
pub type Outcome = Arc<Mutex<Option<Result<(), String>>>>;

/// The filesystem handed to fuser.
pub struct KmsFs {
    vol: Arc<Volume>,
    settings: MountSettings,
    /// FUSE_POSIX_ACL was negotiated: the kernel enforces ACLs and no longer
    /// applies the umask, so creations apply it (or the parent's default ACL).
    posix_acl: bool,
    /// FUSE_HANDLE_KILLPRIV_V2 was negotiated: kmsfs, not the kernel, clears
    /// set-user-ID, set-group-ID and `security.capability` on write, chown and
    /// truncate. The kernel then marks inodes S_NOSEC and stops asking for
    /// `security.capability` before every write(2): one synchronous round
    /// trip per write call (a 4 KiB random write was a GETXATTR plus a WRITE).
    killpriv: bool,
    committer: Option<Committer>,
    /// Started in `init` when [`MountSettings::block_fill`] is set.
    filler: Option<Filler>,
    outcome: Outcome,
    /// Set once the session exists (see [`KmsFs::notifier_slot`]).
    notifier: Arc<OnceLock<Notifier>>,
    /// Run once by the first request after INIT (see [`KmsFs::after_init_slot`]).
    after_init: Arc<Mutex<Option<AfterInit>>>,
    after_init_done: std::sync::atomic::AtomicBool,
}

impl KmsFs {
    pub fn new(vol: Arc<Volume>, settings: MountSettings) -> Self {
        KmsFs {
            vol,
            settings,
            posix_acl: false,
            killpriv: false,
            committer: None,
            filler: None,
            outcome: Arc::new(Mutex::new(None)),
            notifier: Arc::new(OnceLock::new()),
            after_init: Arc::new(Mutex::new(None)),
            after_init_done: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Where the caller puts a job to run once the kernel has applied FUSE
    /// INIT's reply: the kernel sends no other request before, so the first
    /// request runs it (before its own handler). Work that must follow INIT
    /// without asking the mount itself (a request from inside the daemon to
    /// its own mount cannot end if the daemon is killed meanwhile).
    pub fn after_init_slot(&self) -> Arc<Mutex<Option<AfterInit>>> {
        self.after_init.clone()
    }

    /// Where the caller puts the session's notifier once the session exists.
    pub fn notifier_slot(&self) -> Arc<OnceLock<Notifier>> {
        self.notifier.clone()
    }

    /// Drops the kernel's cached attributes of `ino`, so that the next stat
    /// asks the daemon. Needed where the allocation (st_blocks) changes
    /// without a request that carries attributes back: the kernel keeps the
    /// attributes of before the write-back for up to [`ATTR_TTL`] otherwise. A
    /// negative offset invalidates the attributes only, not the page cache,
    /// and takes no inode lock in the kernel, so this is safe from a handler.
    fn invalidate_attr(&self, ino: u64) {
        match self
            .notifier
            .get()
            .map(|n| n.inval_inode(INodeNo(ino), -1, 0))
        {
            None => log::debug!("no notifier yet for inode {ino}"),
            Some(Ok(())) => log::debug!("invalidated attributes of inode {ino}"),
            Some(Err(e)) => log::debug!("attribute invalidation of inode {ino}: {e}"),
        }
    }

    /// Filled in by `destroy` with the result of the final commit.
    pub fn outcome(&self) -> Outcome {
        self.outcome.clone()
    }

    /// Runs one request's handler so that a panic in it (a bug) fails that
    /// request alone: the reply, dropped unsent while unwinding, answers EIO,
    /// and the volume decides whether it can go on writing (see
    /// [`Volume::contain_panic`]). Without this, the panic would end the
    /// session thread and with it the mount.
    fn contain(&self, op: &'static str, mutating: bool, handler: impl FnOnce()) {
        if !self
            .after_init_done
            .load(std::sync::atomic::Ordering::Relaxed)
            && !self
                .after_init_done
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            let job = self
                .after_init
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(job) = job {
                job();
            }
        }
        if mutating {
            CHANGING.with(|c| *c.borrow_mut() = Some((self.vol.clone(), op)));
        }
        let r = std::panic::catch_unwind(AssertUnwindSafe(handler));
        if mutating {
            CHANGING.with(|c| *c.borrow_mut() = None);
        }
        if let Err(p) = r {
            self.vol
                .contain_panic(op, mutating, &volume::panic_message(&*p));
        }
    }

    /// Mode and ACLs of a new node under `parent`; see [`acl::inherit`].
    fn new_mode(&self, parent: u64, mode: u32, umask: u32) -> (u32, acl::Inherited) {
        if !self.posix_acl {
            // The kernel has already applied the umask.
            return (mode, acl::Inherited::default());
        }
        // A parent whose default ACL cannot be read falls back to the umask;
        // the read error itself is logged by the next request that meets it.
        let default = self.vol.getxattr(parent, acl::DEFAULT_XATTR).ok();
        acl::inherit(default.as_deref(), mode, umask)
    }

    /// Stores inherited ACLs on a new node. The node exists already; a failure
    /// here is reported, but the node stays (as on a local filesystem whose
    /// xattr write fails after the create).
    fn apply_acl(&self, ino: u64, inh: &acl::Inherited) -> Result<(), Error> {
        if let Some(a) = &inh.access {
            self.vol.setxattr(ino, acl::ACCESS_XATTR, a, 0)?;
        }
        if let Some(d) = &inh.default {
            self.vol.setxattr(ino, acl::DEFAULT_XATTR, d, 0)?;
        }
        Ok(())
    }

    /// Sets an access ACL the way a local filesystem does: the mode's
    /// permission bits follow the ACL, and an ACL that says no more than the
    /// mode is not stored at all.
    fn set_access_acl(&self, ino: u64, value: &[u8], flags: i32) -> Result<(), Error> {
        let (bits, equivalent) =
            acl::mode_bits(value).ok_or_else(|| Error::Invalid("malformed POSIX ACL".into()))?;
        let a = self.vol.getattr(ino)?;
        if equivalent {
            match self.vol.removexattr(ino, acl::ACCESS_XATTR) {
                Ok(()) | Err(Error::NoXattr) => {}
                Err(e) => return Err(e),
            }
        } else {
            self.vol.setxattr(ino, acl::ACCESS_XATTR, value, flags)?;
        }
        let perm = (a.inode.perm & !0o777) | bits;
        if perm != a.inode.perm {
            let s = SetAttr {
                mode: Some(perm),
                ..SetAttr::default()
            };
            self.vol.setattr(ino, &s)?;
            // The SETXATTR reply carries no attributes, and a kernel that
            // leaves ACLs to the daemon keeps its cached mode otherwise: a
            // stat right after `setfacl` (or rsync -A) showed the old mode
            // for up to ATTR_TTL.
            self.invalidate_attr(ino);
        }
        Ok(())
    }

    /// Keeps an access ACL in step with a chmod.
    fn chmod_access_acl(&self, ino: u64, mode: u32) -> Result<(), Error> {
        let old = match self.vol.getxattr(ino, acl::ACCESS_XATTR) {
            Ok(v) => v,
            Err(Error::NoXattr) => return Ok(()),
            Err(e) => return Err(e),
        };
        match acl::chmod(&old, mode) {
            Some(new) if new != old => self.vol.setxattr(ino, acl::ACCESS_XATTR, &new, 0),
            _ => Ok(()),
        }
    }

    /// Creates a node with inherited ACLs and returns its attributes.
    fn make(
        &self,
        parent: u64,
        mode: u32,
        umask: u32,
        create: impl FnOnce(u32) -> Result<Attr, Error>,
    ) -> Result<Attr, Error> {
        let is_dir = mode & crate::sys::S_IFMT == crate::sys::S_IFDIR;
        let (mode, mut inh) = self.new_mode(parent, mode, umask);
        if !is_dir {
            inh.default = None;
        }
        let a = create(mode)?;
        if inh.access.is_some() || inh.default.is_some() {
            self.apply_acl(a.ino, &inh)?;
            return self.vol.getattr(a.ino);
        }
        Ok(a)
    }
}

thread_local! {
    /// The reply buffer of this request thread's READs, reused from one
    /// request to the next: a fresh buffer per request was allocated and
    /// zeroed (a `memset` of up to 1 MiB) only to be overwritten by the
    /// decryption. It holds the last reply's plaintext until the next one
    /// (like the decrypted-block cache) and is wiped when the thread ends
    /// (`AlignedBuf` with `wipe`).
    static READ_BUF: std::cell::RefCell<Option<crate::store::AlignedBuf>> =
        const { std::cell::RefCell::new(None) };
    /// The volume and operation of the changing request this thread runs, for
    /// the panic hook.
    static CHANGING: std::cell::RefCell<Option<(Arc<Volume>, &'static str)>> =
        const { std::cell::RefCell::new(None) };
}

/// Installs (once per process) a panic hook that makes the volume read-only
/// the moment a changing request panics: the hook runs before unwinding drops
/// the request's reply (which answers EIO), so no later request of that
/// caller can slip a change in between. The previous hook (the message and
/// backtrace in the log) still runs.
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = CHANGING.try_with(|c| {
                if let Ok(c) = c.try_borrow()
                    && let Some((vol, op)) = &*c
                {
                    vol.mark_degraded(op);
                }
            });
            prev(info);
        }));
    });
}

/// Converts a core error into the errno for the reply, logging what an
/// administrator should see (integrity failures with the inode, I/O errors).
fn errno(e: Error, op: &str, ino: u64) -> Errno {
    let n = e.errno();
    match &e {
        Error::Integrity { .. } => log::warn!("{op} on inode {ino}: {e}"),
        // A full store fails every write until space is freed: one line per
        // NOSPACE_LOG_EVERY, with the count of the refusals in between.
        Error::NoSpace(_) => {
            if let Some(skipped) = NOSPACE_LOG.admit() {
                let more = if skipped > 0 {
                    format!(" ({skipped} more refused since the last report)")
                } else {
                    String::new()
                };
                log::warn!("{op} on inode {ino}: {e}{more}");
            }
        }
        Error::Io { .. } | Error::Format(_) => log::warn!("{op} on inode {ino}: {e}"),
        _ => log::debug!("{op} on inode {ino}: {e}"),
    }
    Errno::from_i32(n)
}

const NOSPACE_LOG_EVERY: Duration = Duration::from_secs(10);
static NOSPACE_LOG: RateLimit = RateLimit::new();

/// Lets one event through per [`NOSPACE_LOG_EVERY`] and counts the others.
struct RateLimit {
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimit {
    const fn new() -> Self {
        RateLimit {
            state: Mutex::new((None, 0)),
        }
    }

    /// Some(number suppressed since the last admitted event), or None.
    fn admit(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < NOSPACE_LOG_EVERY => {
                s.1 += 1;
                None
            }
            _ => {
                let skipped = s.1;
                *s = (Some(now), 0);
                Some(skipped)
            }
        }
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

fn to_system_time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            + Duration::from_nanos(t.nanos as u64)
    }
}

fn to_timestamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            // Before 1970: floor to whole seconds, nanoseconds stay positive.
            let d = e.duration();
            let (secs, nanos) = if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            };
            Timestamp { secs, nanos }
        }
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(to_timestamp(t)),
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let i = &a.inode;
    FileAttr {
        ino: INodeNo(a.ino),
        size: i.size,
        blocks: a.sectors(),
        atime: to_system_time(i.atime),
        mtime: to_system_time(i.mtime),
        ctime: to_system_time(i.ctime),
        crtime: to_system_time(i.crtime),
        kind: file_type(i.kind),
        perm: (i.perm & 0o7777) as u16,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        blksize: a.block_size,
        flags: 0,
    }
}

/// The attributes of a negative entry: inode 0 tells the kernel that the name
/// does not exist (it keeps the dentry as negative); nothing else is read.
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

/// renameat2's flags as the kernel sends them: Linux's RENAME_NOREPLACE and
/// RENAME_EXCHANGE; macFUSE's are renamex_np's RENAME_EXCL and RENAME_SWAP.
#[cfg(target_os = "linux")]
const RENAME_NOREPLACE: RenameFlags = RenameFlags::RENAME_NOREPLACE;
#[cfg(target_os = "linux")]
const RENAME_EXCHANGE: RenameFlags = RenameFlags::RENAME_EXCHANGE;
#[cfg(target_os = "macos")]
const RENAME_NOREPLACE: RenameFlags = RenameFlags::from_bits_retain(libc::RENAME_EXCL);
#[cfg(target_os = "macos")]
const RENAME_EXCHANGE: RenameFlags = RenameFlags::from_bits_retain(libc::RENAME_SWAP);

/// The SELinux label. A node without one answers EOPNOTSUPP rather than
/// ENODATA: what a FUSE mount answers under SELinux (which labels FUSE mounts
/// by policy, genfscon, and never asks the daemon), and what tells `ls -l`
/// (coreutils caches the answer per device) and other label readers that this
/// file system has no labels, so they stop asking. Without it, `ls -lR` cost
/// one more round trip per entry: 27,000 of the 59,000 requests of the
/// benchmark's cold `ls -lR` (docs/PERFORMANCE.md). A label that was set is
/// stored and read back like any other xattr.
const SELINUX_XATTR: &[u8] = b"security.selinux";

/// Open flags for files: the page cache stays valid across opens (single writer).
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE;

impl Filesystem for KmsFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_IO) {
            let _ = config.set_max_write(max);
        }
        if let Err(max) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let mut wanted = vec![
            ("atomic O_TRUNC", InitFlags::FUSE_ATOMIC_O_TRUNC),
            (
                "parallel directory operations",
                InitFlags::FUSE_PARALLEL_DIROPS,
            ),
            ("readdirplus", InitFlags::FUSE_DO_READDIRPLUS),
            ("adaptive readdirplus", InitFlags::FUSE_READDIRPLUS_AUTO),
            ("symlink cache", InitFlags::FUSE_CACHE_SYMLINKS),
        ];
        if !self.settings.read_only {
            wanted.push(("write-back cache", InitFlags::FUSE_WRITEBACK_CACHE));
            self.killpriv = config
                .add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2)
                .is_ok();
        }
        for (what, flag) in wanted {
            if config.add_capabilities(flag).is_err() {
                log::info!("the kernel does not offer {what}; continuing without it");
            }
        }
        // POSIX ACLs need the unmasked mode (the umask comes separately):
        // a default ACL replaces the umask. Both flags, or neither.
        let acl = InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK;
        if self.settings.default_permissions {
            self.posix_acl = config.add_capabilities(acl).is_ok();
            if !self.posix_acl {
                log::info!("the kernel does not offer POSIX ACLs; continuing without them");
            }
        }
        if !self.settings.read_only {
            self.committer = Some(Committer::start(self.vol.clone()));
        }
        if self.settings.block_fill && cfg!(target_os = "linux") {
            if self.vol.block_size() <= fill::MAX_FILL_BLOCK {
                self.filler = Some(Filler::start(self.vol.clone(), self.notifier.clone()));
            } else {
                log::info!(
                    "no block fill: blocks of {} bytes are larger than {}",
                    self.vol.block_size(),
                    fill::MAX_FILL_BLOCK
                );
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        if let Some(mut f) = self.filler.take() {
            f.stop();
        }
        if let Some(c) = self.committer.take() {
            c.stop();
        }
        let r = self.vol.commit().map_err(|e| e.to_string());
        match &r {
            Ok(()) => log::info!("final commit done; volume closed"),
            Err(e) => log::error!("final commit failed: {e}"),
        }
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.contain("lookup", false, || {
            match self.vol.lookup(parent.0, name.as_bytes()) {
                Ok(a) => {
                    reply.entry_with_ttls(&ATTR_TTL, &ENTRY_TTL, &file_attr(&a), Generation(0))
                }
                // A negative entry (inode 0) that the kernel keeps for
                // ENTRY_TTL: a name that does not exist cannot appear except
                // through this kernel, which then replaces the negative
                // dentry. Repeated lookups of a missing name (a build's
                // include search, a shell's PATH walk) stop reaching us.
                Err(Error::NotFound) => reply.entry_with_ttls(
                    &Duration::ZERO,
                    &ENTRY_TTL,
                    &negative_attr(),
                    Generation(0),
                ),
                Err(e) => reply.error(errno(e, "lookup", parent.0)),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.contain("getattr", false, || match self.vol.getattr(ino.0) {
            Ok(a) => reply.attr(&ATTR_TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(e, "getattr", ino.0)),
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.contain("setattr", true, || {
            let s = SetAttr {
                mode,
                uid,
                gid,
                size,
                atime: atime.map(time_set),
                mtime: mtime.map(time_set),
                ctime: ctime.map(to_timestamp),
            };
            // With KILLPRIV_V2 the kernel leaves the set-ID bits to kmsfs: a
            // chown always clears them (as the kernel's chown does), a
            // truncate when the caller is not root (the kernel's rule is "lacks
            // CAP_FSETID", which fuser does not pass on).
            let kill = self.killpriv
                && mode.is_none()
                && (uid.is_some() || gid.is_some() || (size.is_some() && req.uid() != 0));
            let r = self
                .vol
                .setattr(ino.0, &s)
                .and_then(|a| {
                    if kill && a.inode.kind != FileKind::Dir {
                        self.vol.kill_suid(ino.0)?;
                        self.vol.getattr(ino.0)
                    } else {
                        Ok(a)
                    }
                })
                .and_then(|a| match mode {
                    Some(m) => self.chmod_access_acl(ino.0, m).map(|()| a),
                    None => Ok(a),
                });
            match r {
                // A size change follows any block fill under way, so the
                // kernel's cut of its page cache comes after the fill.
                Ok(a) => match &self.filler {
                    Some(f) if size.is_some() => f.after_fill(
                        ino.0,
                        Box::new(move || reply.attr(&ATTR_TTL, &file_attr(&a))),
                    ),
                    _ => reply.attr(&ATTR_TTL, &file_attr(&a)),
                },
                Err(e) => reply.error(errno(e, "setattr", ino.0)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.contain("readlink", false, || match self.vol.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e, "readlink", ino.0)),
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.contain("mknod", true, || {
            let r = self.make(parent.0, mode, umask, |m| {
                self.vol.mknod(
                    parent.0,
                    name.as_bytes(),
                    m,
                    req.uid(),
                    req.gid(),
                    rdev,
                    None,
                )
            });
            match r {
                Ok(a) => {
                    reply.entry_with_ttls(&ATTR_TTL, &ENTRY_TTL, &file_attr(&a), Generation(0))
                }
                Err(e) => reply.error(errno(e, "mknod", parent.0)),
            }
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.contain("mkdir", true, || {
            let mode = crate::sys::S_IFDIR | (mode & 0o7777);
            let r = self.make(parent.0, mode, umask, |m| {
                self.vol
                    .mkdir(parent.0, name.as_bytes(), m, req.uid(), req.gid())
            });
            match r {
                Ok(a) => {
                    reply.entry_with_ttls(&ATTR_TTL, &ENTRY_TTL, &file_attr(&a), Generation(0))
                }
                Err(e) => reply.error(errno(e, "mkdir", parent.0)),
            }
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.contain("unlink", true, || {
            match self.vol.unlink(parent.0, name.as_bytes()) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e, "unlink", parent.0)),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.contain("rmdir", true, || {
            match self.vol.rmdir(parent.0, name.as_bytes()) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e, "rmdir", parent.0)),
            }
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.contain("symlink", true, || {
            let target = target.as_os_str().as_bytes();
            match self
                .vol
                .symlink(parent.0, link_name.as_bytes(), target, req.uid(), req.gid())
            {
                Ok(a) => {
                    reply.entry_with_ttls(&ATTR_TTL, &ENTRY_TTL, &file_attr(&a), Generation(0))
                }
                Err(e) => reply.error(errno(e, "symlink", parent.0)),
            }
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.contain("rename", true, || {
            let (noreplace, exchange) = (RENAME_NOREPLACE, RENAME_EXCHANGE);
            if !(noreplace | exchange).contains(flags) {
                // RENAME_WHITEOUT is for overlay filesystems' upper layers.
                reply.error(Errno::EINVAL);
                return;
            }
            let f = volume::RenameFlags {
                noreplace: flags.contains(noreplace),
                exchange: flags.contains(exchange),
            };
            match self.vol.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                f,
            ) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e, "rename", parent.0)),
            }
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.contain("link", true, || {
            match self.vol.link(ino.0, newparent.0, newname.as_bytes()) {
                Ok(a) => {
                    reply.entry_with_ttls(&ATTR_TTL, &ENTRY_TTL, &file_attr(&a), Generation(0))
                }
                Err(e) => reply.error(errno(e, "link", ino.0)),
            }
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.contain("open", true, || {
            // With FUSE_ATOMIC_O_TRUNC the truncation arrives with the open
            // (and, with KILLPRIV_V2, clearing the set-ID bits is ours).
            if flags.0 & libc::O_TRUNC != 0 && flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
                let s = SetAttr {
                    size: Some(0),
                    ..SetAttr::default()
                };
                let r = self.vol.setattr(ino.0, &s).and_then(|_| {
                    if self.killpriv && req.uid() != 0 {
                        self.vol.kill_suid(ino.0)
                    } else {
                        Ok(())
                    }
                });
                if let Err(e) = r {
                    reply.error(errno(e, "open", ino.0));
                    return;
                }
            }
            match self.vol.open_file(ino.0) {
                Ok(_) => match &self.filler {
                    Some(f) if writable(flags.0) => f.writer_opened(
                        ino.0,
                        Box::new(move || reply.opened(FileHandle(0), OPEN_FLAGS)),
                    ),
                    _ => reply.opened(FileHandle(0), OPEN_FLAGS),
                },
                Err(e) => reply.error(errno(e, "open", ino.0)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.contain("read", false, || {
            let n = READ_BUF.with_borrow_mut(|slot| {
                let size = size as usize;
                if slot.as_ref().is_some_and(|b| b.len() < size) {
                    // The old buffer is wiped as it drops.
                    *slot = None;
                }
                // Once per thread: the largest request (MAX_IO), in a huge
                // page where the kernel gives one (the kernel pins the reply
                // page by page to copy it: 11% of a cold read's daemon CPU
                // in 4 KiB pages).
                let buf = slot
                    .get_or_insert_with(|| {
                        crate::store::AlignedBuf::new(size.max(MAX_IO as usize), true)
                    })
                    .as_mut_slice();
                match self.vol.read_into(ino.0, offset, &mut buf[..size]) {
                    Ok(n) => {
                        reply.data(&buf[..n]);
                        n
                    }
                    Err(e) => {
                        reply.error(errno(e, "read", ino.0));
                        0
                    }
                }
            });
            // A read smaller than a block opened whole blocks: the rest of
            // them goes to the page cache (not for O_DIRECT readers, who
            // bypass it).
            let bs = u64::from(self.vol.block_size());
            if let Some(f) = &self.filler
                && n > 0
                && (size as u64) < bs
                && !direct(flags.0)
            {
                let last = offset.saturating_add(n as u64 - 1);
                f.after_read(ino.0, offset / bs, last / bs);
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.contain("write", true, || {
            let killed = if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
                self.vol.kill_suid(ino.0)
            } else if self.killpriv {
                self.vol.drop_capability(ino.0)
            } else {
                Ok(())
            };
            if let Err(e) = killed {
                reply.error(errno(e, "write", ino.0));
                return;
            }
            match self.vol.write(ino.0, offset, data) {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(e, "write", ino.0)),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.contain("flush", true, || {
            // Durability comes from fsync and the periodic commit, not from
            // close, and kmsfs keeps no locks: ENOSYS makes the kernel stop
            // sending FLUSH (one round trip per close saved). It still writes
            // back a file's dirty pages at close and reports their errors.
            reply.error(Errno::from_i32(libc::ENOSYS));
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.contain("release", true, || {
            if let Some(f) = &self.filler
                && writable(flags.0)
            {
                f.writer_closed(ino.0);
            }
            if let Err(e) = self.vol.release(ino.0) {
                // The kernel ignores release errors; the log is the only witness.
                errno(e, "release", ino.0);
            }
            reply.ok();
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.contain("fsync", true, || match self.vol.fsync(ino.0) {
            Ok(()) => {
                // The write-back before the fsync changed the allocation.
                self.invalidate_attr(ino.0);
                reply.ok()
            }
            Err(e) => reply.error(errno(e, "fsync", ino.0)),
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.contain("readdir", false, || {
            match self.vol.readdir(ino.0, offset, READDIR_BATCH) {
                Ok(items) => {
                    for it in items {
                        let name = OsStr::from_bytes(&it.name);
                        if reply.add(INodeNo(it.ino), it.offset, file_type(it.kind), name) {
                            break;
                        }
                    }
                    reply.ok();
                }
                Err(e) => reply.error(errno(e, "readdir", ino.0)),
            }
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.contain("readdirplus", false, || {
            match self.vol.readdir_plus(ino.0, offset, READDIR_BATCH) {
                Ok(items) => {
                    for (it, a) in items {
                        let name = OsStr::from_bytes(&it.name);
                        if reply.add(
                            INodeNo(it.ino),
                            it.offset,
                            name,
                            &ATTR_TTL,
                            &file_attr(&a),
                            Generation(0),
                        ) {
                            break;
                        }
                    }
                    reply.ok();
                }
                Err(e) => reply.error(errno(e, "readdirplus", ino.0)),
            }
        });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.contain("fsyncdir", true, || match self.vol.fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e, "fsyncdir", ino.0)),
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.contain("statfs", true, || {
            // statfs is synchronous, and umount(8) sends one for its target
            // right before unmounting (the kernel then ends the session
            // without waiting for the daemon): pending changes are committed
            // here, so a plain `umount` leaves a complete volume, and `df`
            // describes a committed state. Nothing pending costs nothing.
            if self.vol.has_changes()
                && let Err(e) = self.vol.commit()
            {
                log::warn!("commit on statfs failed (will retry): {e}");
            }
            match self.vol.statfs() {
                Ok(s) => {
                    let bs = s.block_size.max(1) as u64;
                    let blocks = s.total_bytes / bs;
                    let free = s.free_bytes / bs;
                    // Inodes cost no fixed space: report as many free as free blocks.
                    reply.statfs(
                        blocks,
                        free,
                        free,
                        s.files.saturating_add(free),
                        free,
                        bs as u32,
                        s.name_max,
                        bs as u32,
                    )
                }
                Err(e) => reply.error(errno(e, "statfs", 1)),
            }
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.contain("setxattr", true, || {
            let r = if name.as_bytes() == acl::ACCESS_XATTR {
                self.set_access_acl(ino.0, value, flags)
            } else {
                self.vol.setxattr(ino.0, name.as_bytes(), value, flags)
            };
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e, "setxattr", ino.0)),
            }
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.contain("getxattr", false, || {
            match self.vol.getxattr(ino.0, name.as_bytes()) {
                Ok(v) if size == 0 => reply.size(v.len() as u32),
                Ok(v) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
                Ok(v) => reply.data(&v),
                Err(Error::NoXattr) if name.as_bytes() == SELINUX_XATTR => {
                    reply.error(Errno::from_i32(libc::EOPNOTSUPP))
                }
                Err(e) => reply.error(errno(e, "getxattr", ino.0)),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.contain("listxattr", false, || match self.vol.listxattr(ino.0) {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(&n);
                    buf.push(0);
                }
                if size == 0 {
                    reply.size(buf.len() as u32);
                } else if buf.len() > size as usize {
                    reply.error(Errno::from_i32(libc::ERANGE));
                } else {
                    reply.data(&buf);
                }
            }
            Err(e) => reply.error(errno(e, "listxattr", ino.0)),
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.contain("removexattr", true, || {
            match self.vol.removexattr(ino.0, name.as_bytes()) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e, "removexattr", ino.0)),
            }
        });
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        self.contain("access", false, || {
            // Permission checks are the kernel's (default_permissions); this only
            // answers whether the inode exists.
            match self.vol.getattr(ino.0) {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(errno(e, "access", ino.0)),
            }
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.contain("create", true, || {
            let mode = crate::sys::S_IFREG | (mode & 0o7777);
            let r = self
                .make(parent.0, mode, umask, |m| {
                    self.vol
                        .create(parent.0, name.as_bytes(), m, req.uid(), req.gid())
                })
                .and_then(|a| self.vol.open_file(a.ino).map(|_| a));
            match r {
                Ok(a) => {
                    let ino = a.ino;
                    let done = move || {
                        reply.created(
                            &ATTR_TTL,
                            &file_attr(&a),
                            Generation(0),
                            FileHandle(0),
                            OPEN_FLAGS,
                        )
                    };
                    match &self.filler {
                        Some(f) if writable(flags) => f.writer_opened(ino, Box::new(done)),
                        _ => done(),
                    }
                }
                Err(e) => reply.error(errno(e, "create", parent.0)),
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.contain("fallocate", true, || {
            match self.vol.fallocate(ino.0, offset, length, mode) {
                Ok(()) => {
                    // Punching and zeroing free blocks: st_blocks changes.
                    self.invalidate_attr(ino.0);
                    reply.ok()
                }
                Err(e) => reply.error(errno(e, "fallocate", ino.0)),
            }
        });
    }
}

/// Open flags that give a writable handle.
fn writable(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY
}

/// Open flags of a reader that bypasses the page cache.
fn direct(flags: i32) -> bool {
    #[cfg(target_os = "linux")]
    {
        flags & libc::O_DIRECT != 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = flags;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_with_nanoseconds() {
        for t in [
            Timestamp { secs: 0, nanos: 0 },
            Timestamp {
                secs: 1_700_000_000,
                nanos: 123_456_789,
            },
            Timestamp {
                secs: -1,
                nanos: 500_000_000,
            },
            Timestamp {
                secs: -86_400,
                nanos: 0,
            },
        ] {
            assert_eq!(to_timestamp(to_system_time(t)), t);
        }
    }

    #[test]
    fn config_has_threads_and_flags() {
        let s = MountSettings {
            fsname: "/srv/vault".into(),
            read_only: true,
            allow_other: true,
            default_permissions: true,
            flags: vec![MountOption::NoExec],
            threads: 1,
            clone_fd: true,
            uring: true,
            block_fill: true,
            spin_us: 30,
        };
        let c = s.config();
        assert_eq!(c.n_threads, Some(2));
        #[cfg(target_os = "linux")]
        assert!(c.clone_fd && c.io_uring && c.spin_us == Some(30));
        assert_eq!(c.acl, SessionACL::All);
        assert!(c.mount_options.contains(&MountOption::RO));
        assert!(c.mount_options.contains(&MountOption::DefaultPermissions));
        assert!(c.mount_options.contains(&MountOption::NoExec));
        assert!(
            c.mount_options
                .contains(&MountOption::CUSTOM("subtype=kmsfs".into()))
        );
    }
}
