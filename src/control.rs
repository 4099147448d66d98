//! The control socket of a running mount.
//!
//! A read-write mount owns the volume (lock). Commands that change the volume
//! while it is mounted (snapshot create/delete, clean) are sent to the mount
//! process over a Unix socket (mode 0600, so only the mounting user can use
//! it), and the mount performs them at a consistent point while it keeps
//! serving. One JSON object per line each way.
//!
//! Where the socket lives: in a runtime directory of the mounting user, never
//! in the volume directory, so the backing directory holds no runtime state.
//! The kernel does not wait for a `fuse` daemon at unmount: after a plain
//! `umount DIR` the daemon is still exiting, and a socket it removed from the
//! volume directory would vanish under a `cp -a` or `rsync` started at once.
//! The runtime directory is `/run/kmsfs/ctl` for root (`/var/run/kmsfs/ctl`
//! on macOS; the KMS daemon's socket lives in `/run/kmsfs`, which others may
//! enter, so the control sockets get a private directory of their own), and
//! `$XDG_RUNTIME_DIR/kmsfs` for other users. The socket is named after the
//! identity (device, inode) of the volume's control directory
//! (`<device hex>-<inode>.ctl`, see [`socket_name`]). Without a usable runtime
//! directory (a user with no `XDG_RUNTIME_DIR`, a path too long for a socket
//! address, a runtime directory someone else owns), the socket goes where it
//! always went: `kmsfs.ctl` in the volume directory. Clients try every place
//! a mount may have used ([`socket_candidates`]).
//!
//! Others may write the volume directory (a share), so each side checks the
//! other by its kernel credentials (SO_PEERCRED): the mount serves only the
//! user who mounted it and root, and a client accepts answers only from a
//! server running as itself or as root. The socket is put in place relative
//! to a descriptor of its directory, never through a path a planted link
//! could redirect (see [`bind_control_socket`]); the runtime directory is
//! opened without following links and must belong to the mounting user with
//! no write access for anyone else.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, SFlag, fchmod, fchmodat, fstat, fstatat, mkdirat,
};
use nix::unistd::{UnlinkatFlags, unlinkat};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::volume::Volume;

/// The socket's name in the volume directory, where it goes when there is no
/// usable runtime directory (and where mounts of older versions put it).
pub const CONTROL_FILE: &str = "kmsfs.ctl";

/// Root's runtime directory (the KMS daemon's socket lives there too).
#[cfg(target_os = "macos")]
const ROOT_RUNTIME: &str = "/var/run/kmsfs";
#[cfg(not(target_os = "macos"))]
const ROOT_RUNTIME: &str = "/run/kmsfs";
/// The private directory of root's control sockets inside [`ROOT_RUNTIME`].
const ROOT_SOCKETS: &str = "ctl";
/// The private directory of a user's control sockets inside `$XDG_RUNTIME_DIR`.
const USER_SOCKETS: &str = "kmsfs";
/// A client connects by path, and a socket address holds at most 104 bytes
/// (macOS; 108 on Linux) with the final NUL: a longer path falls back to the
/// volume directory.
const MAX_SOCKET_PATH: usize = 103;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    SnapshotCreate {
        name: String,
    },
    SnapshotDelete {
        name: String,
    },
    SnapshotList,
    Clean,
    Stats,
    /// Commit now, and say which process serves the mount (the umount
    /// helper waits for it to exit: its final commit ends the unmount).
    Commit,
    /// Re-wrap the volume's DK (`kmsfs rewrap` on a mounted volume) with the
    /// mount's keystore: under the newest version of its CMK, or under `cmk`.
    Rewrap {
        #[serde(default)]
        cmk: Option<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub errno: i32,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

/// The mount point this process serves (set once by the mount daemon): `kmsfs umount`
/// waits for a daemon only when it serves the mount point being unmounted.
pub static MOUNTPOINT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The directory where this user's mounts put their control sockets: a
/// private directory `leaf` made in `parent`.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct RuntimeBase {
    parent: PathBuf,
    leaf: String,
    /// Root's: `parent` is made (0755, as the KMS daemon's socket unit
    /// does) when missing, and opened without following a link.
    system: bool,
}

impl RuntimeBase {
    /// The directory of the sockets.
    pub fn path(&self) -> PathBuf {
        self.parent.join(&self.leaf)
    }

    /// A runtime directory at `dir`, made in its existing parent (tests).
    #[doc(hidden)]
    pub fn at(dir: &Path) -> RuntimeBase {
        RuntimeBase {
            parent: dir.parent().unwrap_or(Path::new("/")).to_path_buf(),
            leaf: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            system: false,
        }
    }

    /// Makes (0700) and opens the directory, without following a link at
    /// its name; it must be a directory of this user that nobody else may
    /// write. The error names the path and what to do.
    fn open(&self) -> std::io::Result<OwnedFd> {
        let euid = nix::unistd::geteuid().as_raw();
        if self.system {
            match nix::unistd::mkdir(&self.parent, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => {
                    return Err(runtime_error(
                        &self.parent,
                        false,
                        format_args!("cannot make it ({e})"),
                    ));
                }
            }
        }
        let mut flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        if self.system {
            flags |= OFlag::O_NOFOLLOW;
        }
        let parent = nix::fcntl::open(&self.parent, flags, Mode::empty()).map_err(|e| {
            runtime_error(
                &self.parent,
                false,
                format_args!("cannot open it as a directory ({e})"),
            )
        })?;
        check_runtime_dir(&parent, &self.parent, false, euid)?;
        let path = self.path();
        let made = match mkdirat(&parent, self.leaf.as_str(), Mode::S_IRWXU) {
            Ok(()) => true,
            Err(Errno::EEXIST) => false,
            Err(e) => {
                return Err(runtime_error(
                    &path,
                    true,
                    format_args!("cannot make it ({e})"),
                ));
            }
        };
        let fd = openat(
            &parent,
            self.leaf.as_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            runtime_error(
                &path,
                true,
                format_args!("cannot open it as a directory without following links ({e})"),
            )
        })?;
        let st = check_runtime_dir(&fd, &path, true, euid)?;
        // Private: a umask may have taken owner bits away from a new one.
        if made || st.st_mode & 0o777 != 0o700 {
            fchmod(&fd, Mode::S_IRWXU)?;
        }
        Ok(fd)
    }
}

/// A runtime directory must belong to this user, and nobody else may write it.
fn check_runtime_dir(
    fd: &OwnedFd,
    path: &Path,
    made: bool,
    euid: u32,
) -> std::io::Result<FileStat> {
    let st = fstat(fd)?;
    if st.st_uid != euid || st.st_mode & 0o022 != 0 {
        return Err(runtime_error(
            path,
            made,
            format_args!(
                "it belongs to uid {} with mode {:o}, not to uid {euid} with no write access for others",
                st.st_uid,
                st.st_mode & 0o7777
            ),
        ));
    }
    Ok(st)
}

/// What is wrong with the runtime directory `path` (`made`: kmsfs makes it,
/// so removing it is the fix; otherwise it is the directory it is made in).
fn runtime_error(path: &Path, made: bool, what: impl std::fmt::Display) -> std::io::Error {
    let fix = if made {
        format!(
            "remove it (`rm -r {}`) so that the next mount makes it again",
            path.display()
        )
    } else {
        format!(
            "make it a directory of uid {} that others may not write (`chown {} {}; chmod go-w {}`)",
            nix::unistd::geteuid(),
            nix::unistd::geteuid(),
            path.display(),
            path.display()
        )
    };
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!(
            "runtime directory {} for control sockets: {what}; {fix}",
            path.display()
        ),
    )
}

/// Where this user's mounts put their control sockets: root's `/run/kmsfs/ctl`,
/// or `$XDG_RUNTIME_DIR/kmsfs` when that is set to a directory of this user;
/// None: the volume directory.
#[doc(hidden)]
pub fn runtime_base() -> Option<RuntimeBase> {
    let euid = nix::unistd::geteuid().as_raw();
    if euid == 0 {
        return Some(RuntimeBase {
            parent: PathBuf::from(ROOT_RUNTIME),
            leaf: ROOT_SOCKETS.into(),
            system: true,
        });
    }
    let xdg = PathBuf::from(std::env::var_os("XDG_RUNTIME_DIR")?);
    let md = std::fs::metadata(&xdg).ok()?;
    (xdg.is_absolute() && md.is_dir() && std::os::unix::fs::MetadataExt::uid(&md) == euid).then(
        || RuntimeBase {
            parent: xdg,
            leaf: USER_SOCKETS.into(),
            system: false,
        },
    )
}

/// The name of the socket in a runtime directory, from the identity of the
/// volume's control directory (the volume directory, or for `s3://` the
/// `ctl` folder of its cache directory): `<device hex>-<inode>.ctl`.
pub fn socket_name(dev: u64, ino: u64) -> String {
    format!("{dev:x}-{ino}.ctl")
}

fn fits(p: &Path) -> bool {
    p.as_os_str().len() <= MAX_SOCKET_PATH
}

/// Where the mount of `volume_dir` (a control directory) puts its socket: in
/// this user's runtime directory, or `kmsfs.ctl` in `volume_dir` without one.
pub fn socket_path(volume_dir: &Path) -> PathBuf {
    socket_candidates(volume_dir)
        .into_iter()
        .next()
        .map(|c| c.path)
        .unwrap_or_else(|| volume_dir.join(CONTROL_FILE))
}

/// A place where the mount of a volume may serve its control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub path: PathBuf,
    /// Only a server of this uid may answer there: the runtime directory of
    /// another user, who controls what is at that path.
    pub served_by: Option<u32>,
}

/// Every place the mount of `volume_dir` may serve its control socket, in the
/// order a client tries them: this user's runtime directory; for root and a
/// volume directory of another user, that user's (`/run/user/UID/kmsfs`: the
/// user's own mount of their volume); then `kmsfs.ctl` in the volume
/// directory (no usable runtime directory, or a mount of an older version).
pub fn socket_candidates(volume_dir: &Path) -> Vec<Candidate> {
    let mut v = Vec::new();
    if let Ok(st) = nix::sys::stat::stat(volume_dir) {
        let (dev, ino) = identity(&st);
        let name = socket_name(dev, ino);
        if let Some(base) = runtime_base() {
            let path = base.path().join(&name);
            if fits(&path) {
                v.push(Candidate {
                    path,
                    served_by: None,
                });
            }
        }
        if nix::unistd::geteuid().is_root() && st.st_uid != 0 {
            let path = Path::new("/run/user")
                .join(st.st_uid.to_string())
                .join(USER_SOCKETS)
                .join(&name);
            if fits(&path) {
                v.push(Candidate {
                    path,
                    served_by: Some(st.st_uid),
                });
            }
        }
    }
    v.push(Candidate {
        path: volume_dir.join(CONTROL_FILE),
        served_by: None,
    });
    v
}

/// Serves requests for a mounted volume until dropped.
pub struct ControlServer {
    /// The directory of the socket (the runtime directory, or the volume
    /// directory): the socket is put in place and removed relative to this
    /// descriptor, never through a path.
    dir: OwnedFd,
    /// The socket's name in `dir`.
    name: String,
    /// (device, inode) of the socket put at `name`: only that is removed.
    socket: (u64, u64),
    /// A second descriptor of the listening socket; shutting it down ends the
    /// accept loop (a connect through the path could be redirected, or find
    /// the name gone, and leave the loop waiting forever).
    waker: UnixListener,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Tells apart the staging directories of servers in one process (they share
/// the runtime directory).
static SERVERS: AtomicUsize = AtomicUsize::new(0);

impl ControlServer {
    /// Serves the volume whose control directory is `volume_dir`, with the
    /// socket in this user's runtime directory ([`runtime_base`]), or in
    /// `volume_dir` without a usable one.
    pub fn start(vol: Arc<Volume>, volume_dir: &Path) -> std::io::Result<Self> {
        Self::start_in(vol, volume_dir, runtime_base().as_ref())
    }

    /// [`ControlServer::start`] with the runtime directory `base` (None: the
    /// volume directory), for tests.
    #[doc(hidden)]
    pub fn start_in(
        vol: Arc<Volume>,
        volume_dir: &Path,
        base: Option<&RuntimeBase>,
    ) -> std::io::Result<Self> {
        // The administrator names the volume directory, so it is opened as
        // given; everything inside is reached relative to this descriptor.
        let vdir = nix::fcntl::open(
            volume_dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let (dev, ino) = identity(&fstat(&vdir)?);
        let name = socket_name(dev, ino);
        let runtime = base.and_then(|b| {
            let path = b.path().join(&name);
            let fallback = |why: &dyn std::fmt::Display| {
                log::warn!(
                    "control socket: {why}; it goes into the volume directory instead ({}), \
                     where a copy of the backing directory made right after a plain umount \
                     may find it vanishing",
                    volume_dir.join(CONTROL_FILE).display()
                );
            };
            if !fits(&path) {
                fallback(&format_args!(
                    "{} is too long for a socket address",
                    path.display()
                ));
                return None;
            }
            b.open()
                .inspect_err(|e| fallback(e))
                .ok()
                .map(|fd| (fd, b.path()))
        });
        let staging = format!(
            "{STAGING_PREFIX}{}.{}",
            std::process::id(),
            SERVERS.fetch_add(1, Ordering::Relaxed)
        );
        let (dir, name, path, listener, socket) = match runtime {
            Some((fd, shown)) => {
                let (l, s) = bind_control_socket(fd.as_fd(), &shown, &staging, &name, &|| {})?;
                // A socket left in the volume directory by a mount of an older
                // version killed there: this mount holds the volume's lock, so
                // nothing serves it. Gone by its name, never followed.
                if fstatat(&vdir, CONTROL_FILE, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|st| {
                    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK
                }) {
                    let _ = unlinkat(&vdir, CONTROL_FILE, UnlinkatFlags::NoRemoveDir);
                }
                let path = shown.join(&name);
                (fd, name, path, l, s)
            }
            None => {
                let (l, s) =
                    bind_control_socket(vdir.as_fd(), volume_dir, &staging, CONTROL_FILE, &|| {})?;
                let path = volume_dir.join(CONTROL_FILE);
                (vdir, CONTROL_FILE.to_string(), path, l, s)
            }
        };
        log::info!("control socket: {}", path.display());
        let waker = listener.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        // Clients hold only a weak reference until their request is read: an
        // idle client never keeps the volume (and its lock) alive.
        let weak = Arc::downgrade(&vol);
        drop(vol);
        let owner = nix::unistd::getuid().as_raw();
        let active = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::Builder::new()
            .name("kmsfs-control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(c) = conn else { continue };
                    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                    let _ = c.set_write_timeout(Some(Duration::from_secs(30)));
                    if let Err(refusal) = admit(&c, owner) {
                        log::warn!("control socket: {}", refusal.error);
                        let _ = send(&c, &refusal);
                        continue;
                    }
                    if active.load(Ordering::SeqCst) >= MAX_CLIENTS {
                        let _ = send(
                            &c,
                            &Response::failure(
                                libc::EBUSY,
                                format!(
                                    "{MAX_CLIENTS} control requests are already running; retry"
                                ),
                            ),
                        );
                        continue;
                    }
                    active.fetch_add(1, Ordering::SeqCst);
                    let (weak, mine) = (weak.clone(), active.clone());
                    let spawned = std::thread::Builder::new()
                        .name("kmsfs-control-client".into())
                        .spawn(move || {
                            if let Err(e) = handle(&weak, c) {
                                log::warn!("control socket: {e}");
                            }
                            mine.fetch_sub(1, Ordering::SeqCst);
                        });
                    if spawned.is_err() {
                        active.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            })?;
        Ok(ControlServer {
            dir,
            name,
            socket,
            waker,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop: accept fails at once on a shut-down socket.
        let _ =
            nix::sys::socket::shutdown(self.waker.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Remove our socket; whatever else was put at its name stays.
        if let Ok(st) = fstatat(&self.dir, self.name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            && identity(&st) == self.socket
        {
            let _ = unlinkat(&self.dir, self.name.as_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// The staging directory is this followed by the process id and a number.
const STAGING_PREFIX: &str = ".kmsfs.ctl.";
/// The socket's name inside the staging directory.
const STAGING_SOCKET: &str = "ctl";

fn identity(st: &FileStat) -> (u64, u64) {
    (crate::sys::dev_u64(st.st_dev), st.st_ino)
}

/// The error for a staging directory or socket name someone else has been at.
fn tampered(dir_path: &Path, name: &str, what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "{}: {what}; the directory may have been tampered with. Inspect it, remove \
             it, then mount again",
            dir_path.join(name).display()
        ),
    )
}

/// Binds the control socket and puts it at `name` in the directory `dir`
/// (the runtime directory, or the volume directory; `dir_path` names it in
/// messages); returns the listener and the socket's (device, inode).
///
/// Others may write the volume directory, so nothing here goes through a
/// path they could redirect: the private (0700) staging directory `staging`
/// is made with `mkdirat` relative to `dir`, opened with `O_NOFOLLOW` and
/// checked (a directory of ours, private, empty) before use; the socket is
/// bound inside it through `/proc/self/fd/N`, restricted to 0600, and moved
/// into place with `renameat`, which replaces whatever was planted at
/// `name` (the name itself, never a link's target; a stale socket of a
/// killed mount goes the same way). The socket is never reachable with
/// looser permissions. `after_mkdir` runs between making and opening the
/// staging directory (tests swap it there; pass a no-op).
#[doc(hidden)]
pub fn bind_control_socket(
    dir: BorrowedFd<'_>,
    dir_path: &Path,
    staging: &str,
    name: &str,
    after_mkdir: &dyn Fn(),
) -> std::io::Result<(UnixListener, (u64, u64))> {
    match mkdirat(dir, staging, Mode::S_IRWXU) {
        // Left by a process with the same id that died (or planted): clear
        // it without following anything, then try once more.
        Err(Errno::EEXIST) => {
            remove_stale_staging(dir, staging);
            mkdirat(dir, staging, Mode::S_IRWXU).map_err(|e| {
                tampered(
                    dir_path,
                    staging,
                    format_args!("cannot make the private staging directory of the control socket ({e}); something that is not a stale one of ours is there"),
                )
            })?;
        }
        r => r?,
    }
    after_mkdir();
    let st = open_staging(dir, dir_path, staging)?;
    let placed = place_socket(dir, &st, dir_path, name);
    // Remove the staging directory, if its name still refers to it (someone
    // may have renamed it; anything else there stays).
    if placed.is_err() {
        let _ = unlinkat(&st, STAGING_SOCKET, UnlinkatFlags::NoRemoveDir);
    }
    if let (Ok(mine), Ok(there)) = (
        fstat(&st),
        fstatat(dir, staging, AtFlags::AT_SYMLINK_NOFOLLOW),
    ) && identity(&mine) == identity(&there)
    {
        let _ = unlinkat(dir, staging, UnlinkatFlags::RemoveDir);
    }
    placed
}

/// Clears a leftover staging name: a non-directory goes by its name (never
/// followed), a directory of ours is emptied of its socket and removed.
fn remove_stale_staging(dir: BorrowedFd<'_>, staging: &str) {
    let Ok(st) = fstatat(dir, staging, AtFlags::AT_SYMLINK_NOFOLLOW) else {
        return;
    };
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
        let _ = unlinkat(dir, staging, UnlinkatFlags::NoRemoveDir);
        return;
    }
    if let Ok(fd) = openat(
        dir,
        staging,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) && fstat(&fd).is_ok_and(|s| s.st_uid == nix::unistd::geteuid().as_raw())
    {
        let _ = unlinkat(&fd, STAGING_SOCKET, UnlinkatFlags::NoRemoveDir);
        let _ = unlinkat(dir, staging, UnlinkatFlags::RemoveDir);
    }
}

/// Opens the staging directory just made, refusing anything that is not a
/// private, empty directory of ours (it may have been swapped since).
fn open_staging(dir: BorrowedFd<'_>, dir_path: &Path, staging: &str) -> std::io::Result<OwnedFd> {
    let fd = openat(
        dir,
        staging,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        tampered(
            dir_path,
            staging,
            format_args!("the staging directory of the control socket, made just now, cannot be opened as a directory without following links ({e})"),
        )
    })?;
    let st = fstat(&fd)?;
    let euid = nix::unistd::geteuid().as_raw();
    if st.st_uid != euid || st.st_mode & 0o077 != 0 {
        return Err(tampered(
            dir_path,
            staging,
            format_args!(
                "the staging directory of the control socket was replaced: it belongs to uid {} with mode {:o}, not to uid {euid} with mode 700",
                st.st_uid,
                st.st_mode & 0o7777
            ),
        ));
    }
    let mut entries = nix::dir::Dir::openat(
        &fd,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let foreign = entries.iter().any(|e| {
        e.map_or(true, |e| {
            let n = e.file_name().to_bytes();
            n != b"." && n != b".."
        })
    });
    if foreign {
        return Err(tampered(
            dir_path,
            staging,
            "the staging directory of the control socket, made just now, is not empty",
        ));
    }
    // A umask may have taken owner bits away.
    if st.st_mode & 0o7777 != 0o700 {
        fchmod(&fd, Mode::S_IRWXU)?;
    }
    Ok(fd)
}

/// Binds the socket in the staging directory `st`, restricts it, and moves
/// it to `name` in `dir`.
fn place_socket(
    dir: BorrowedFd<'_>,
    st: &OwnedFd,
    dir_path: &Path,
    name: &str,
) -> std::io::Result<(UnixListener, (u64, u64))> {
    let listener = bind_inside(st)?;
    // The directory is private: the name holds the socket just bound.
    fchmodat(
        st,
        STAGING_SOCKET,
        Mode::S_IRUSR | Mode::S_IWUSR,
        FchmodatFlags::FollowSymlink,
    )?;
    let sock = fstatat(st, STAGING_SOCKET, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    if SFlag::from_bits_truncate(sock.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(tampered(
            dir_path,
            STAGING_SOCKET,
            "the control socket just bound is not a socket",
        ));
    }
    renameat(st, STAGING_SOCKET, dir, name).map_err(|e| {
        tampered(
            dir_path,
            name,
            format_args!("cannot put the control socket at this name ({e})"),
        )
    })?;
    Ok((listener, identity(&sock)))
}

/// Binds `ctl` inside the directory `st` by its descriptor: through
/// `/proc/self/fd/N` (no path anyone else can redirect), or, without /proc,
/// from a thread that changes to the directory by descriptor alone.
fn bind_inside(st: &OwnedFd) -> std::io::Result<UnixListener> {
    let through_proc = format!("/proc/self/fd/{}/{STAGING_SOCKET}", st.as_raw_fd());
    match UnixListener::bind(&through_proc) {
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound && !Path::new("/proc/self/fd").is_dir() =>
        {
            bind_from_inside(st)
        }
        r => r,
    }
}

/// Binds `ctl` relative to the directory `st` from a thread with its own
/// working directory (unshare(CLONE_FS); on macOS, which has no /proc,
/// pthread_fchdir_np), so the process's is untouched.
fn bind_from_inside(st: &OwnedFd) -> std::io::Result<UnixListener> {
    #[cfg(target_os = "macos")]
    unsafe extern "C" {
        /// This thread's own working directory (macOS 10.12); -1: the process's again.
        fn pthread_fchdir_np(fd: libc::c_int) -> libc::c_int;
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            #[cfg(target_os = "linux")]
            {
                // SAFETY: unshare with a flag constant; it affects this thread only.
                if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                nix::unistd::fchdir(st)?;
                UnixListener::bind(STAGING_SOCKET)
            }
            #[cfg(target_os = "macos")]
            {
                // SAFETY: changes this thread's working directory to an open directory.
                if unsafe { pthread_fchdir_np(st.as_raw_fd()) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let r = UnixListener::bind(STAGING_SOCKET);
                // SAFETY: back to the process's working directory.
                unsafe { pthread_fchdir_np(-1) };
                r
            }
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the bind thread panicked")))
    })
}

/// Decodes one request line (a JSON object, any trailing newline included).
pub fn parse_request(line: &[u8]) -> std::result::Result<Request, serde_json::Error> {
    serde_json::from_slice(line)
}

/// Decodes one answer line from a mount.
pub fn parse_response(line: &[u8]) -> std::result::Result<Response, serde_json::Error> {
    serde_json::from_slice(line)
}

/// Control requests served at once; more are refused with EBUSY.
const MAX_CLIENTS: usize = 8;

/// Who may control a mount: the user who mounted it, or root. The socket's
/// mode (0600) already says so; the peer's credentials (SO_PEERCRED, from the
/// kernel, not the client) are checked too, in case the socket's mode or
/// directory on a shared backing store were changed behind our back.
fn admit(c: &UnixStream, owner: u32) -> std::result::Result<(), Response> {
    let cred = crate::sys::peer_cred(c).map_err(|e| {
        Response::failure(
            libc::EACCES,
            format!("cannot read the client's credentials ({e}); request refused"),
        )
    })?;
    let uid = cred.uid;
    if uid == 0 || uid == owner {
        Ok(())
    } else {
        Err(Response::failure(
            libc::EACCES,
            format!(
                "uid {uid} may not control this mount: only uid {owner}, who mounted it, or root may"
            ),
        ))
    }
}

fn send(c: &UnixStream, resp: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_string(resp).unwrap_or_default();
    out.push('\n');
    (&*c).write_all(out.as_bytes())
}

impl Response {
    fn failure(errno: i32, error: String) -> Self {
        Response {
            ok: false,
            errno,
            error,
            data: serde_json::Value::Null,
        }
    }
}

fn handle(vol: &std::sync::Weak<Volume>, c: UnixStream) -> std::io::Result<()> {
    let mut line = Vec::new();
    // Requests are tiny; never buffer more than this from a client.
    BufReader::new((&c).take(64 << 10)).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Ok(());
    }
    let Some(vol) = vol.upgrade() else {
        return send(
            &c,
            &Response::failure(libc::ESHUTDOWN, "the mount is shutting down".into()),
        );
    };
    let vol = &*vol;
    let resp = match parse_request(&line) {
        Err(e) => Response::failure(libc::EINVAL, format!("bad request: {e}")),
        Ok(req) => match execute(vol, &req) {
            Ok(data) => Response {
                ok: true,
                errno: 0,
                error: String::new(),
                data,
            },
            // A KMS refusal keeps its kind across the socket (the client's exit code
            // is the key problem's, 4), by an errno no other error uses here.
            Err(e @ Error::Kms(_)) => Response::failure(crate::sys::EKEYREJECTED, e.to_string()),
            Err(e) => Response::failure(e.errno(), e.to_string()),
        },
    };
    send(&c, &resp)
}

fn execute(vol: &Volume, req: &Request) -> Result<serde_json::Value> {
    Ok(match req {
        Request::SnapshotCreate { name } => {
            let r = vol.snapshot_create(name)?;
            serde_json::json!({"name": r.name, "created": r.created, "generation": r.generation})
        }
        Request::SnapshotDelete { name } => {
            vol.snapshot_delete(name)?;
            serde_json::Value::Null
        }
        Request::SnapshotList => serde_json::to_value(
            vol.snapshot_list()?
                .into_iter()
                .map(|s| {
                    serde_json::json!({"name": s.name, "created": s.created, "generation": s.generation,
                    "exclusive_bytes": s.exclusive_bytes, "shared_bytes": s.shared_bytes})
                })
                .collect::<Vec<_>>(),
        )
        .unwrap_or_default(),
        Request::Clean => {
            let s = vol.clean(0.5)?;
            serde_json::json!({"segments_removed": s.segments_removed, "bytes_moved": s.bytes_moved,
                "bytes_freed": s.bytes_freed})
        }
        Request::Rewrap { cmk } => {
            let r = vol.rewrap_attached(cmk.as_deref())?;
            serde_json::json!({"from_cmk": r.from.0, "from_version": r.from.1,
                "to_cmk": r.to.0, "to_version": r.to.1})
        }
        Request::Commit => {
            vol.commit()?;
            serde_json::json!({"pid": std::process::id(), "generation": vol.generation(),
                "mountpoint": MOUNTPOINT.get().map(|p| p.display().to_string())})
        }
        Request::Stats => {
            let c = vol.cache_stats();
            serde_json::json!({"generation": vol.generation(),
                "pending_changes": vol.has_changes(), "cache_hits": c.hits,
                "cache_misses": c.misses, "cache_evictions": c.evictions, "cache_bytes": c.bytes,
                "cache_capacity": c.capacity, "stored_bytes": vol.stored_bytes()?})
        }
    })
}

/// Sends one request to the mount of `volume_dir`.
pub fn request(volume_dir: &Path, req: &Request) -> Result<serde_json::Value> {
    let c = connect(volume_dir)?;
    c.set_read_timeout(Some(Duration::from_secs(600)))
        .map_err(|e| Error::io("control socket", e))?;
    let mut line = serde_json::to_string(req).unwrap_or_default();
    line.push('\n');
    (&c).write_all(line.as_bytes())
        .map_err(|e| Error::io("control socket", e))?;
    let mut resp = Vec::new();
    BufReader::new(&c)
        .read_until(b'\n', &mut resp)
        .map_err(|e| Error::io("control socket", e))?;
    let r = parse_response(&resp)
        .map_err(|e| Error::Format(format!("bad answer from the mount: {e}")))?;
    if r.ok {
        Ok(r.data)
    } else {
        Err(remote_error(r.errno, r.error))
    }
}

/// Connects to the mount of `volume_dir` at the first of its
/// [`socket_candidates`] that answers: a name with nothing there (or a
/// directory on its path that is not one), or a socket nobody listens on
/// (left by a killed mount), means the next; the server that answers is then
/// checked by its credentials, and a refusal ends the search.
fn connect(volume_dir: &Path) -> Result<UnixStream> {
    let candidates = socket_candidates(volume_dir);
    let mut missing = Vec::new();
    for cand in &candidates {
        match UnixStream::connect(&cand.path) {
            Ok(c) => {
                check_server(&c, volume_dir, cand)?;
                return Ok(c);
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ENOTDIR | libc::ECONNREFUSED)
                ) =>
            {
                missing.push((cand.path.display().to_string(), e));
            }
            Err(e) => {
                return Err(Error::io(
                    format!(
                        "control socket {} (is the volume mounted by a running kmsfs?)",
                        cand.path.display()
                    ),
                    e,
                ));
            }
        }
    }
    let paths = missing
        .iter()
        .map(|(p, _)| p.as_str())
        .collect::<Vec<_>>()
        .join(" or ");
    let e = missing.pop().map_or_else(
        || std::io::Error::from_raw_os_error(libc::ENOENT),
        |(_, e)| e,
    );
    Err(Error::io(
        format!(
            "control socket {} (is the volume mounted by a running kmsfs?)",
            paths
        ),
        e,
    ))
}

/// Who may answer: a mount runs as the user who mounted it (or as root, for
/// fstab mounts), so the server must be root or this user, by the kernel's
/// credentials of the process listening (SO_PEERCRED). A socket planted at
/// `kmsfs.ctl` by another user of a shared backing directory could otherwise
/// forge answers. In another user's runtime directory, which that user
/// controls, only that user's own mount may answer.
fn check_server(c: &UnixStream, volume_dir: &Path, cand: &Candidate) -> Result<()> {
    let path = &cand.path;
    let cred = crate::sys::peer_cred(c).map_err(|e| {
        Error::io(
            format!(
                "credentials of the server of the control socket {} of {}",
                path.display(),
                volume_dir.display()
            ),
            e,
        )
    })?;
    let server = cred.uid;
    let (uid, euid) = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::geteuid().as_raw(),
    );
    // Root also talks to the mount of the volume directory's owner (a user's
    // own mount of their own volume): that user controls the volume anyway.
    let owner = || -> Option<u32> {
        let m = std::fs::symlink_metadata(volume_dir).ok()?;
        Some(std::os::unix::fs::MetadataExt::uid(&m))
    };
    let trusted =
        server == 0 || server == uid || server == euid || (euid == 0 && owner() == Some(server));
    if trusted && cand.served_by.is_none_or(|u| u == server) {
        Ok(())
    } else {
        let place = if path.parent() == Some(volume_dir) {
            "the backing directory".to_string()
        } else {
            path.parent().unwrap_or(path).display().to_string()
        };
        Err(Error::Format(format!(
            "the control socket {} of {} is served by uid {server}, not by a kmsfs mount of \
             this user; {place} may have been tampered with",
            path.display(),
            volume_dir.display()
        )))
    }
}

fn remote_error(errno: i32, msg: String) -> Error {
    match errno {
        libc::EEXIST => Error::AlreadyExists(msg),
        libc::EROFS => Error::ReadOnly(msg),
        libc::ENOSPC => Error::NoSpace(msg),
        libc::EIO => Error::integrity("the mounted volume", msg),
        crate::sys::EKEYREJECTED => Error::Kms(crate::kms::KmsError::Refused(msg)),
        _ => Error::Invalid(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn socket_names_are_short_and_tell_volumes_apart() {
        let longest = socket_name(u64::MAX, u64::MAX);
        assert_eq!(longest, "ffffffffffffffff-18446744073709551615.ctl");
        assert_ne!(socket_name(1, 2), socket_name(2, 1));
        // Root's runtime directory leaves ample room in a socket address.
        let p = Path::new(ROOT_RUNTIME).join(ROOT_SOCKETS).join(&longest);
        assert!(fits(&p) && p.as_os_str().len() < 64, "{}", p.display());
        assert!(!fits(&Path::new("/").join("x".repeat(MAX_SOCKET_PATH))));
    }

    /// The runtime directory is made private, and one that is not this
    /// user's alone (another owner, writable by others, a link) is refused
    /// with its path and what to do.
    #[test]
    fn a_runtime_directory_is_private_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("rt");
        let base = RuntimeBase::at(&dir);
        assert_eq!(base.path(), dir);
        drop(base.open().unwrap());
        let md = std::fs::symlink_metadata(&dir).unwrap();
        assert!(md.is_dir());
        assert_eq!(md.mode() & 0o7777, 0o700);
        assert_eq!(md.uid(), nix::unistd::geteuid().as_raw());
        // Opened again as it is.
        drop(base.open().unwrap());
        let refused = |what: &str, says: &str| {
            let e = base.open().expect_err(what).to_string();
            assert!(
                e.contains(&dir.display().to_string()) && e.contains(says) && e.contains("rm -r"),
                "{what}: {e}"
            );
        };
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        refused("a runtime directory others may write", "mode 777");
        std::fs::remove_dir(&dir).unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
        refused(
            "a link at the runtime directory's name",
            "without following links",
        );
        std::fs::remove_file(&dir).unwrap();
        if nix::unistd::geteuid().is_root() {
            std::fs::create_dir(&dir).unwrap();
            std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
            refused("another user's runtime directory", "uid 65534");
            std::fs::remove_dir(&dir).unwrap();
        }
        // The directory it is made in (the user's XDG_RUNTIME_DIR) is not
        // removed: its owner and mode are to be fixed.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = base
            .open()
            .expect_err("a parent others may write")
            .to_string();
        assert!(
            e.contains(&tmp.path().display().to_string())
                && e.contains("mode 777")
                && e.contains("chmod go-w")
                && !e.contains("rm -r"),
            "{e}"
        );
        assert!(
            std::fs::symlink_metadata(&dir).is_err(),
            "made in it anyway"
        );
    }

    /// Clients look in this user's runtime directory first, for root in the
    /// runtime directory of the volume directory's owner next, and in the
    /// volume directory last.
    #[test]
    fn clients_try_the_runtime_directories_then_the_volume_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let st = nix::sys::stat::stat(tmp.path()).unwrap();
        let (dev, ino) = identity(&st);
        let name = socket_name(dev, ino);
        let legacy = Candidate {
            path: tmp.path().join(CONTROL_FILE),
            served_by: None,
        };
        let c = socket_candidates(tmp.path());
        assert_eq!(c.last(), Some(&legacy));
        match runtime_base() {
            Some(b) => {
                assert_eq!(c[0].path, b.path().join(&name));
                assert_eq!(socket_path(tmp.path()), b.path().join(&name));
            }
            None => assert_eq!(socket_path(tmp.path()), legacy.path),
        }
        if nix::unistd::geteuid().is_root() {
            assert_eq!(c.len(), 2, "{c:?}");
            std::os::unix::fs::chown(tmp.path(), Some(65534), None).unwrap();
            let c = socket_candidates(tmp.path());
            assert_eq!(c.len(), 3, "{c:?}");
            assert_eq!(
                c[1],
                Candidate {
                    path: PathBuf::from(format!("/run/user/65534/kmsfs/{name}")),
                    served_by: Some(65534),
                }
            );
            assert_eq!(c[2], legacy);
        }
        // A volume directory that is gone: only the old place is left.
        let gone = tmp.path().join("gone");
        assert_eq!(
            socket_candidates(&gone),
            vec![Candidate {
                path: gone.join(CONTROL_FILE),
                served_by: None
            }]
        );
    }

    /// Without /proc, the socket is bound from a thread with its own working
    /// directory: it lands in the directory of the descriptor, and the
    /// process's working directory is untouched.
    #[test]
    fn bind_without_proc_lands_in_the_descriptors_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let cwd = std::env::current_dir().unwrap();
        let fd: OwnedFd = std::fs::File::open(tmp.path()).unwrap().into();
        let l = bind_from_inside(&fd).unwrap();
        assert_eq!(std::env::current_dir().unwrap(), cwd);
        let p = tmp.path().join(STAGING_SOCKET);
        let c = UnixStream::connect(&p).unwrap();
        let (s, _) = l.accept().unwrap();
        send(&s, &Response::failure(0, "hello".into())).unwrap();
        let mut line = Vec::new();
        BufReader::new(&c).read_until(b'\n', &mut line).unwrap();
        assert_eq!(parse_response(&line).unwrap().error, "hello");
    }
}
