//! The client of the KMS daemon (`--kms unix:PATH`): a [`Kms`] whose every operation is a
//! request to `kmsfs kms serve` over its Unix socket ([`super::wire`],
//! `docs/KMS-PROTOCOL.md`). It never reads a keystore or a passphrase.
//!
//! One connection is kept and reused (requests are serialised on it); a connection the
//! daemon closed (restart, idle timeout) is replaced transparently: a request that could
//! not be sent is retried once on a new connection, and a request sent but not answered
//! is retried once when repeating it is harmless. Connecting waits up to
//! [`CONNECT_WAIT`] for a daemon that is (re)starting; every answer must come within
//! [`IO_TIMEOUT`]. The server must run as root or as this user (SO_PEERCRED), so a socket
//! planted by someone else cannot forge answers.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::import::{ImportParams, WrappingSpec};
use super::wire::{self, Dec, Enc, Frame, Op};
use super::{
    CreateKey, EncryptionContext, KeyChange, KeyInfo, Kms, KmsError, StoredRecord, VerifyReport,
    WrappedKey,
};
use crate::crypto::DataKey;

/// How long connecting keeps retrying a socket that is missing or refuses connections.
pub const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// Bound on sending a request and on waiting for its answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection to the KMS daemon.
pub struct DaemonClient {
    path: PathBuf,
    conn: Mutex<Option<UnixStream>>,
}

impl std::fmt::Debug for DaemonClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonClient")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What `Ping` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonInfo {
    /// The daemon's process id.
    pub pid: u32,
    /// Its kmsfs version.
    pub version: String,
    /// The uid it sees this client as.
    pub uid: u32,
    /// The gid it sees this client as.
    pub gid: u32,
}

/// Connects to the KMS daemon at `path`.
///
/// # Errors
/// [`KmsError::Refused`] naming the socket and how to start the daemon when it cannot be
/// reached within [`CONNECT_WAIT`], or when it is served by another user.
pub fn open(path: &Path) -> Result<Arc<dyn Kms>, KmsError> {
    Ok(Arc::new(DaemonClient::connect(path)?))
}

/// Writes with `MSG_NOSIGNAL`: a daemon that went away is an error, never a SIGPIPE.
struct NoSigPipe<'a>(&'a UnixStream);

impl Write for NoSigPipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends a frame without risking SIGPIPE (also used by the daemon).
pub(super) fn send_frame(c: &UnixStream, body: &[u8]) -> io::Result<()> {
    wire::write_frame(&mut NoSigPipe(c), body)
}

enum Failure {
    /// Nothing reached the daemon.
    NotSent(io::Error),
    /// Sent; the connection ended or failed before a complete answer.
    Unanswered(io::Error),
}

impl DaemonClient {
    /// Connects (see [`open`]).
    ///
    /// # Errors
    /// As [`open`].
    pub fn connect(path: &Path) -> Result<Self, KmsError> {
        let c = Self {
            path: path.to_path_buf(),
            conn: Mutex::new(None),
        };
        let s = c.dial()?;
        *c.lock() = Some(s);
        Ok(c)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<UnixStream>> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn url(&self) -> String {
        format!("unix:{}", self.path.display())
    }

    fn unreachable(&self, e: &io::Error, waited: bool) -> KmsError {
        let p = self.path.display();
        let after = if waited {
            format!(" (retried for {} s)", CONNECT_WAIT.as_secs())
        } else {
            String::new()
        };
        if e.kind() == io::ErrorKind::PermissionDenied {
            return KmsError::Refused(format!(
                "cannot connect to the kmsfs KMS daemon at {}: {e}; the socket's owner, group and mode do not admit uid {} (ask the administrator to add you to the daemon's policy and the socket's group)",
                self.url(),
                nix::unistd::getuid()
            ));
        }
        KmsError::Refused(format!(
            "the kmsfs KMS daemon at {} is not reachable: {e}{after}; start it with `kmsfs kms serve --socket {p}` or `systemctl start kmsfs-kms.socket kmsfs-kms.service`",
            self.url()
        ))
    }

    /// A new connection, waiting up to [`CONNECT_WAIT`] for a daemon that is starting.
    fn dial(&self) -> Result<UnixStream, KmsError> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(10);
        let s = loop {
            match UnixStream::connect(&self.path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT | libc::ECONNREFUSED | libc::EAGAIN)
                    ) =>
                {
                    if start.elapsed() >= CONNECT_WAIT {
                        return Err(self.unreachable(&e, true));
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(250));
                }
                Err(e) => return Err(self.unreachable(&e, false)),
            }
        };
        self.check_server(&s)?;
        let io = |e: io::Error| self.unreachable(&e, false);
        s.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        s.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        Ok(s)
    }

    /// The daemon must run as root or as this user.
    fn check_server(&self, s: &UnixStream) -> Result<(), KmsError> {
        let cred = crate::sys::peer_cred(s).map_err(|e| self.unreachable(&e, false))?;
        let server = cred.uid;
        let (uid, euid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::geteuid().as_raw(),
        );
        if server == 0 || server == uid || server == euid {
            Ok(())
        } else {
            Err(KmsError::Refused(format!(
                "the socket {} is served by uid {server}, neither root nor you (uid {uid}); it is not a kmsfs KMS daemon you can trust with keys",
                self.url()
            )))
        }
    }

    fn exchange(c: &UnixStream, body: &[u8]) -> Result<Zeroizing<Vec<u8>>, Failure> {
        send_frame(c, body).map_err(Failure::NotSent)?;
        match wire::read_frame(&mut &*c, wire::MAX_RESPONSE) {
            Ok(Frame::Body(b)) => Ok(b),
            Ok(Frame::Closed) => Err(Failure::Unanswered(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection without answering",
            ))),
            Err(e) => Err(Failure::Unanswered(e)),
        }
    }

    /// Sends a request and returns the answer's fields after the status (`Ok`) or the
    /// daemon's error. `repeatable`: the request may be sent again if it was sent but not
    /// answered on a reused connection.
    fn call(&self, req: &Enc, repeatable: bool) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let mut guard = self.lock();
        let mut retried = false;
        let body = loop {
            let reused = guard.is_some();
            let conn = match guard.take() {
                Some(c) => c,
                None => self.dial()?,
            };
            match Self::exchange(&conn, &req.0) {
                Ok(b) => {
                    *guard = Some(conn);
                    break b;
                }
                Err(Failure::NotSent(_)) if reused && !retried => retried = true,
                Err(Failure::Unanswered(e))
                    if reused
                        && !retried
                        && repeatable
                        && e.kind() == io::ErrorKind::UnexpectedEof =>
                {
                    retried = true;
                }
                Err(Failure::NotSent(e) | Failure::Unanswered(e)) => {
                    let timed_out = matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    );
                    return Err(KmsError::Refused(if timed_out {
                        format!(
                            "the kmsfs KMS daemon at {} did not answer within {} s; check it (`systemctl status kmsfs-kms`)",
                            self.url(),
                            IO_TIMEOUT.as_secs()
                        )
                    } else {
                        format!(
                            "the connection to the kmsfs KMS daemon at {} failed: {e}; check that it runs (`systemctl status kmsfs-kms`)",
                            self.url()
                        )
                    }));
                }
            }
        };
        drop(guard);
        let mut d = Dec::new(&body);
        let bad = |m: wire::Malformed| {
            KmsError::Refused(format!(
                "the kmsfs KMS daemon at {} sent a malformed answer: {m}",
                self.url()
            ))
        };
        let version = d.u8().map_err(bad)?;
        if version != wire::VERSION {
            return Err(KmsError::Refused(format!(
                "the kmsfs KMS daemon at {} speaks protocol version {version}, this kmsfs version {}; use the same kmsfs version on both sides",
                self.url(),
                wire::VERSION
            )));
        }
        match d.u8().map_err(bad)? {
            wire::STATUS_OK => Ok(Zeroizing::new(body[2..].to_vec())),
            wire::STATUS_ERR => Err(wire::read_error(&mut d).map_err(bad)?),
            s => Err(bad(wire::Malformed(format!("status {s}")))),
        }
    }

    /// Runs `f` on the fields of the answer to `req`, requiring that it reads them all.
    fn ask<T>(
        &self,
        req: &Enc,
        repeatable: bool,
        f: impl FnOnce(&mut Dec<'_>) -> Result<T, wire::Malformed>,
    ) -> Result<T, KmsError> {
        let fields = self.call(req, repeatable)?;
        let mut d = Dec::new(&fields);
        let v = f(&mut d).and_then(|v| d.end().map(|()| v)).map_err(|m| {
            KmsError::Refused(format!(
                "the kmsfs KMS daemon at {} sent a malformed answer: {m}",
                self.url()
            ))
        })?;
        Ok(v)
    }

    /// Who the daemon is and who it sees this client as.
    ///
    /// # Errors
    /// Connection errors.
    pub fn ping(&self) -> Result<DaemonInfo, KmsError> {
        self.ask(&Enc::start(Op::Ping as u8), true, |d| {
            Ok(DaemonInfo {
                pid: d.u32()?,
                version: d.str()?,
                uid: d.u32()?,
                gid: d.u32()?,
            })
        })
    }
}

fn data_key(d: &mut Dec<'_>) -> Result<DataKey, wire::Malformed> {
    DataKey::from_slice(d.bytes()?)
        .ok_or_else(|| wire::Malformed("a data key that is not 32 bytes".into()))
}

fn key_list(d: &mut Dec<'_>) -> Result<Vec<KeyInfo>, wire::Malformed> {
    let n = d.count(30)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(d.key_info()?);
    }
    Ok(v)
}

impl Kms for DaemonClient {
    fn describe(&self) -> String {
        format!("KMS daemon {}", self.url())
    }

    fn generate_data_key(
        &self,
        cmk: Option<&str>,
        ctx: &EncryptionContext,
    ) -> Result<(DataKey, WrappedKey), KmsError> {
        let mut r = Enc::start(Op::GenerateDataKey as u8);
        r.opt_str(cmk).ctx(ctx);
        self.ask(&r, true, |d| Ok((data_key(d)?, d.wrapped()?)))
    }

    fn decrypt(&self, wrapped: &WrappedKey, ctx: &EncryptionContext) -> Result<DataKey, KmsError> {
        let mut r = Enc::start(Op::Decrypt as u8);
        r.wrapped(wrapped).ctx(ctx);
        self.ask(&r, true, data_key)
    }

    fn re_encrypt(
        &self,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
        dest_cmk: Option<&str>,
    ) -> Result<WrappedKey, KmsError> {
        let mut r = Enc::start(Op::ReEncrypt as u8);
        r.wrapped(wrapped).ctx(ctx).opt_str(dest_cmk);
        self.ask(&r, true, |d| d.wrapped())
    }

    fn generation_mark(&self, volume_id: &[u8; 16]) -> Result<Option<u64>, KmsError> {
        let mut r = Enc::start(Op::GenerationMark as u8);
        r.raw(volume_id);
        self.ask(&r, true, |d| d.opt_u64())
    }

    fn record_generation(&self, volume_id: &[u8; 16], generation: u64) -> Result<(), KmsError> {
        let mut r = Enc::start(Op::RecordGeneration as u8);
        r.raw(volume_id).u64(generation);
        self.ask(&r, true, |_| Ok(()))
    }

    fn note_volume(&self, volume_id: &[u8; 16], cmk_id: &str, path: &str) -> Result<(), KmsError> {
        let mut r = Enc::start(Op::NoteVolume as u8);
        r.raw(volume_id).str(cmk_id).str(path);
        self.ask(&r, true, |_| Ok(()))
    }

    fn list_keys(&self) -> Result<Vec<KeyInfo>, KmsError> {
        self.ask(&Enc::start(Op::ListKeys as u8), true, key_list)
    }

    fn describe_key(&self, name: &str) -> Result<KeyInfo, KmsError> {
        let mut r = Enc::start(Op::DescribeKey as u8);
        r.str(name);
        self.ask(&r, true, |d| d.key_info())
    }

    fn create_key(&self, spec: &CreateKey) -> Result<KeyInfo, KmsError> {
        let mut r = Enc::start(Op::CreateKey as u8);
        r.opt_str(spec.alias.as_deref())
            .str(&spec.description)
            .u8(u8::from(spec.external));
        self.ask(&r, false, |d| d.key_info())
    }

    fn change_key(&self, name: &str, change: KeyChange) -> Result<KeyInfo, KmsError> {
        let (code, days) = wire::change_code(change);
        let mut r = Enc::start(Op::ChangeKey as u8);
        r.str(name).u8(code).u32(days);
        self.ask(&r, false, |d| d.key_info())
    }

    fn import_params(&self, name: &str, wrapping: WrappingSpec) -> Result<ImportParams, KmsError> {
        let mut r = Enc::start(Op::ImportParams as u8);
        r.str(name).u8(wrapping as u8);
        self.ask(&r, false, wire::read_import_params)
    }

    fn import_material(
        &self,
        name: &str,
        token: &[u8],
        wrapped_material: &[u8],
        expires: Option<u64>,
    ) -> Result<KeyInfo, KmsError> {
        let mut r = Enc::start(Op::ImportMaterial as u8);
        r.str(name)
            .bytes(token)
            .bytes(wrapped_material)
            .opt_u64(expires);
        if r.0.len() > wire::MAX_REQUEST {
            return Err(KmsError::Refused(format!(
                "the import request is {} bytes, more than the {} the KMS daemon accepts",
                r.0.len(),
                wire::MAX_REQUEST
            )));
        }
        self.ask(&r, false, |d| d.key_info())
    }

    fn audit_records(&self) -> Result<(Result<VerifyReport, String>, Vec<StoredRecord>), KmsError> {
        self.ask(&Enc::start(Op::AuditRecords as u8), true, wire::read_audit)
    }
}
