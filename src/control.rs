//! The control socket of a running mount.
//!
//! A read-write mount owns the volume (lock). Commands that change the volume
//! while it is mounted (snapshot create/delete, clean) are sent to the mount
//! process over a Unix socket in the volume directory (`kmsfs.ctl`, mode 0600,
//! so only the volume's owner can use it), and the mount performs them at a
//! consistent point while it keeps serving. One JSON object per line each way.
//!
//! Others may write the volume directory (a share), so each side checks the
//! other by its kernel credentials (SO_PEERCRED): the mount serves only the
//! user who mounted it and root, and a client accepts answers only from a
//! server running as itself or as root. The socket is put in place relative
//! to a descriptor of the volume directory, never through a path a planted
//! link could redirect (see [`bind_control_socket`]).

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

pub const CONTROL_FILE: &str = "kmsfs.ctl";

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

pub fn socket_path(volume_dir: &Path) -> PathBuf {
    volume_dir.join(CONTROL_FILE)
}

/// Serves requests for a mounted volume until dropped.
pub struct ControlServer {
    /// The volume directory: the socket is put in place and removed
    /// relative to this descriptor, never through a path.
    dir: OwnedFd,
    /// (device, inode) of the socket put at `kmsfs.ctl`: only that is removed.
    socket: (u64, u64),
    /// A second descriptor of the listening socket; shutting it down ends the
    /// accept loop (a connect through the path could be redirected, or find
    /// the name gone, and leave the loop waiting forever).
    waker: UnixListener,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    pub fn start(vol: Arc<Volume>, volume_dir: &Path) -> std::io::Result<Self> {
        // The administrator names the volume directory, so it is opened as
        // given; everything inside is reached relative to this descriptor.
        let dir = nix::fcntl::open(
            volume_dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let staging = format!("{STAGING_PREFIX}{}", std::process::id());
        let (listener, socket) = bind_control_socket(dir.as_fd(), volume_dir, &staging, &|| {})?;
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
        if let Ok(st) = fstatat(&self.dir, CONTROL_FILE, AtFlags::AT_SYMLINK_NOFOLLOW)
            && identity(&st) == self.socket
        {
            let _ = unlinkat(&self.dir, CONTROL_FILE, UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// The staging directory is this followed by the process id.
const STAGING_PREFIX: &str = ".kmsfs.ctl.";
/// The socket's name inside the staging directory.
const STAGING_SOCKET: &str = "ctl";

fn identity(st: &FileStat) -> (u64, u64) {
    (crate::sys::dev_u64(st.st_dev), st.st_ino)
}

/// The error for a staging directory or socket name someone else has been at.
fn tampered(volume_dir: &Path, name: &str, what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "{}: {what}; the backing directory may have been tampered with. Inspect it, remove \
             it, then mount again",
            volume_dir.join(name).display()
        ),
    )
}

/// Binds the control socket and puts it at `kmsfs.ctl` in the volume
/// directory `dir` (`volume_dir` names it in messages); returns the listener
/// and the socket's (device, inode).
///
/// Others may write the volume directory, so nothing here goes through a
/// path they could redirect: the private (0700) staging directory `staging`
/// is made with `mkdirat` relative to `dir`, opened with `O_NOFOLLOW` and
/// checked (a directory of ours, private, empty) before use; the socket is
/// bound inside it through `/proc/self/fd/N`, restricted to 0600, and moved
/// into place with `renameat`, which replaces whatever was planted at
/// `kmsfs.ctl` (the name itself, never a link's target). The socket is never
/// reachable with looser permissions. `after_mkdir` runs between making and
/// opening the staging directory (tests swap it there; pass a no-op).
#[doc(hidden)]
pub fn bind_control_socket(
    dir: BorrowedFd<'_>,
    volume_dir: &Path,
    staging: &str,
    after_mkdir: &dyn Fn(),
) -> std::io::Result<(UnixListener, (u64, u64))> {
    match mkdirat(dir, staging, Mode::S_IRWXU) {
        // Left by a process with the same id that died (or planted): clear
        // it without following anything, then try once more.
        Err(Errno::EEXIST) => {
            remove_stale_staging(dir, staging);
            mkdirat(dir, staging, Mode::S_IRWXU).map_err(|e| {
                tampered(
                    volume_dir,
                    staging,
                    format_args!("cannot make the private staging directory of the control socket ({e}); something that is not a stale one of ours is there"),
                )
            })?;
        }
        r => r?,
    }
    after_mkdir();
    let st = open_staging(dir, volume_dir, staging)?;
    let placed = place_socket(dir, &st, volume_dir);
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
fn open_staging(dir: BorrowedFd<'_>, volume_dir: &Path, staging: &str) -> std::io::Result<OwnedFd> {
    let fd = openat(
        dir,
        staging,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        tampered(
            volume_dir,
            staging,
            format_args!("the staging directory of the control socket, made just now, cannot be opened as a directory without following links ({e})"),
        )
    })?;
    let st = fstat(&fd)?;
    let euid = nix::unistd::geteuid().as_raw();
    if st.st_uid != euid || st.st_mode & 0o077 != 0 {
        return Err(tampered(
            volume_dir,
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
            volume_dir,
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
/// it to `kmsfs.ctl` in `dir`.
fn place_socket(
    dir: BorrowedFd<'_>,
    st: &OwnedFd,
    volume_dir: &Path,
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
            volume_dir,
            STAGING_SOCKET,
            "the control socket just bound is not a socket",
        ));
    }
    renameat(st, STAGING_SOCKET, dir, CONTROL_FILE).map_err(|e| {
        tampered(
            volume_dir,
            CONTROL_FILE,
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
    let path = socket_path(volume_dir);
    let c = UnixStream::connect(&path).map_err(|e| {
        Error::io(
            format!(
                "control socket {} (is the volume mounted by a running kmsfs?)",
                path.display()
            ),
            e,
        )
    })?;
    check_server(&c, volume_dir)?;
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

/// Who may answer: a mount runs as the user who mounted it (or as root, for
/// fstab mounts), so the server must be root or this user, by the kernel's
/// credentials of the process listening (SO_PEERCRED). A socket planted at
/// `kmsfs.ctl` by another user of a shared backing directory could otherwise
/// forge answers.
fn check_server(c: &UnixStream, volume_dir: &Path) -> Result<()> {
    let cred = crate::sys::peer_cred(c).map_err(|e| {
        Error::io(
            format!(
                "credentials of the server of the control socket {CONTROL_FILE} of {}",
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
    if server == 0 || server == uid || server == euid || (euid == 0 && owner() == Some(server)) {
        Ok(())
    } else {
        Err(Error::Format(format!(
            "the control socket {CONTROL_FILE} of {} is served by uid {server}, not by a kmsfs \
             mount of this user; the backing directory may have been tampered with",
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
