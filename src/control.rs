//! The control socket of a running mount.
//!
//! A read-write mount owns the volume (lock). Commands that change the volume
//! while it is mounted (snapshot create/delete, clean) are sent to the mount
//! process over a Unix socket in the volume directory (`kmsfs.ctl`, mode 0600,
//! so only the volume's owner can use it), and the mount performs them at a
//! consistent point while it keeps serving. One JSON object per line each way.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

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

pub fn socket_path(volume_dir: &Path) -> PathBuf {
    volume_dir.join(CONTROL_FILE)
}

/// Serves requests for a mounted volume until dropped.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    pub fn start(vol: Arc<Volume>, volume_dir: &Path) -> std::io::Result<Self> {
        let path = socket_path(volume_dir);
        let _ = std::fs::remove_file(&path);
        // Bind inside a private (0700) directory, restrict the socket, then
        // move it into place: it is never reachable with looser permissions.
        let staging = volume_dir.join(format!(".kmsfs.ctl.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
        let tmp = staging.join("ctl");
        let bound = UnixListener::bind(&tmp).and_then(|l| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&tmp, &path)?;
            Ok(l)
        });
        let _ = std::fs::remove_dir_all(&staging);
        let listener = bound?;
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
            path,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
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
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(c, PeerCredentials).map_err(|e| {
        Response::failure(
            libc::EACCES,
            format!("cannot read the client's credentials ({e}); request refused"),
        )
    })?;
    let uid = cred.uid();
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
        Request::Commit => {
            vol.commit()?;
            serde_json::json!({"pid": std::process::id(), "generation": vol.generation()})
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

fn remote_error(errno: i32, msg: String) -> Error {
    match errno {
        libc::EEXIST => Error::AlreadyExists(msg),
        libc::EROFS => Error::ReadOnly(msg),
        libc::ENOSPC => Error::NoSpace(msg),
        libc::EIO => Error::integrity("the mounted volume", msg),
        _ => Error::Invalid(msg),
    }
}
