//! The KMS daemon (`kmsfs kms serve`): serves the [`Kms`] operations of one unlocked
//! keystore on a Unix socket, to the principals its [`Policy`] admits. The protocol is
//! [`super::wire`] (`docs/KMS-PROTOCOL.md`); the deployment is described in
//! `docs/KMS-DAEMON.md`.
//!
//! - Identity comes only from the kernel: the peer's uid, gid and pid (SO_PEERCRED) and
//!   supplementary groups (SO_PEERGROUPS), read once per connection. Every audit record
//!   of a request names that uid and pid (a per-request view of the keystore,
//!   [`LocalKeystore::with_caller`]).
//! - Every request is checked against the policy before it reaches the keys; a refusal
//!   goes back to the caller with the rule it missed and is audited (result refused).
//!   Data keys therefore only ever cross the socket to a peer allowed to have them.
//! - Requests are at most [`wire::MAX_REQUEST`] bytes; an oversized or malformed request,
//!   or an unknown protocol version, gets an error answer and closes that connection
//!   only. One thread per connection (small stacks), at most [`MAX_CONNECTIONS`] at once;
//!   idle connections are closed after [`IDLE_TIMEOUT`].

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::audit::{AuditOp, Caller};
use super::policy::{KeyName, Operation, Policy, Principal};
use super::wire::{self, Dec, Enc, Frame, Malformed, Op};
use super::{CreateKey, Kms, KmsError, LocalKeystore};

/// Connections served at once; more are answered "busy" and closed.
pub const MAX_CONNECTIONS: usize = 256;
/// An idle connection is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// A request (once its first byte arrived) must be complete within this, and an answer
/// accepted by the peer within this.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Stack of a connection thread.
const STACK: usize = 512 << 10;
/// How long `serve` waits for requests in progress when asked to stop.
const DRAIN: Duration = Duration::from_secs(20);

struct Shared {
    ks: LocalKeystore,
    policy: Policy,
    /// Connections open.
    conns: AtomicUsize,
    /// Requests being carried out.
    busy: AtomicUsize,
}

/// Serves `keystore` on `listener` until `stop` is set (checked at least every 200 ms),
/// then waits (up to 20 s) for the requests in progress and returns. The keystore is
/// already open: nothing here unlocks anything.
///
/// # Errors
/// A failing `poll` on the listener.
pub fn serve(
    keystore: LocalKeystore,
    listener: UnixListener,
    policy: Policy,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let shared = Arc::new(Shared {
        ks: keystore,
        policy,
        conns: AtomicUsize::new(0),
        busy: AtomicUsize::new(0),
    });
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&raw mut pfd, 1, 200) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            continue;
        }
        loop {
            match listener.accept() {
                Ok((c, _)) => admit(&shared, c),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and the like: say so, and let the loop breathe.
                    log::warn!("kms daemon: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
    }
    let start = Instant::now();
    while shared.busy.load(Ordering::SeqCst) > 0 && start.elapsed() < DRAIN {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn admit(shared: &Arc<Shared>, c: UnixStream) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_write_timeout(Some(IO_TIMEOUT));
    let who = match peer(&c) {
        Ok(w) => w,
        Err(e) => {
            log::warn!("kms daemon: cannot read a client's credentials ({e}); connection closed");
            let _ = send(
                &c,
                &wire::refusal("the daemon cannot read your credentials"),
            );
            return;
        }
    };
    if shared.conns.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        shared.conns.fetch_sub(1, Ordering::SeqCst);
        log::warn!(
            "kms daemon: {MAX_CONNECTIONS} connections already open; refused uid {} pid {}",
            who.0.uid,
            who.1.pid
        );
        let _ = send(
            &c,
            &wire::refusal(&format!(
                "the KMS daemon already serves {MAX_CONNECTIONS} connections; retry"
            )),
        );
        return;
    }
    let sh = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("kmsfs-kms-conn".into())
        .stack_size(STACK)
        .spawn(move || {
            connection(&sh, &c, &who.0, &who.1);
            sh.conns.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        shared.conns.fetch_sub(1, Ordering::SeqCst);
        log::warn!("kms daemon: cannot start a connection thread: {e}");
    }
}

/// The peer's identity from the kernel.
fn peer(c: &UnixStream) -> io::Result<(Principal, Caller)> {
    let cred = crate::sys::peer_cred(c)?;
    let (uid, gid) = (cred.uid, cred.gid);
    let pid = u32::try_from(cred.pid).unwrap_or(0);
    let who = Principal {
        uid,
        gid,
        groups: crate::sys::peer_groups(c),
    };
    Ok((who, Caller::of_process(uid, pid)))
}

fn send(c: &UnixStream, e: &Enc) -> io::Result<()> {
    super::client::send_frame(c, &e.0)
}

fn connection(sh: &Shared, c: &UnixStream, who: &Principal, caller: &Caller) {
    loop {
        let _ = c.set_read_timeout(Some(IDLE_TIMEOUT));
        let body = match wire::read_frame(&mut &*c, wire::MAX_REQUEST) {
            Ok(Frame::Body(b)) => b,
            Ok(Frame::Closed) => return,
            Err(e) => {
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    return;
                }
                log::warn!(
                    "kms daemon: closing the connection of uid {} pid {}: {e}",
                    who.uid,
                    caller.pid
                );
                let _ = send(c, &wire::refusal(&format!("request refused: {e}")));
                return;
            }
        };
        sh.busy.fetch_add(1, Ordering::SeqCst);
        let answer = request(sh, who, caller, &body);
        sh.busy.fetch_sub(1, Ordering::SeqCst);
        drop(body);
        match answer {
            Ok(resp) => {
                if send(c, &resp).is_err() {
                    return;
                }
            }
            Err(Malformed(why)) => {
                log::warn!(
                    "kms daemon: malformed request from uid {} pid {}: {why}; connection closed",
                    who.uid,
                    caller.pid
                );
                let _ = send(c, &wire::refusal(&format!("malformed request: {why}")));
                return;
            }
        }
    }
}

/// A request's answer; `Err` only for a malformed request (the connection then closes).
fn request(sh: &Shared, who: &Principal, caller: &Caller, body: &[u8]) -> Result<Enc, Malformed> {
    let mut d = Dec::new(body);
    let version = d.u8()?;
    if version != wire::VERSION {
        return Err(Malformed(format!(
            "protocol version {version}; this daemon speaks version {}",
            wire::VERSION
        )));
    }
    let code = d.u8()?;
    let op = Op::from_u8(code).ok_or_else(|| Malformed(format!("unknown operation {code}")))?;
    let ks = sh.ks.with_caller(caller.clone());
    let cx = Cx {
        sh,
        ks: &ks,
        who,
        caller,
    };
    Ok(match cx.run(op, &mut d) {
        Ok(Ok(enc)) => enc,
        Ok(Err(e)) => wire::error(&e),
        Err(m) => return Err(m),
    })
}

/// One request's context.
struct Cx<'a> {
    sh: &'a Shared,
    ks: &'a LocalKeystore,
    who: &'a Principal,
    caller: &'a Caller,
}

type Answer = Result<Result<Enc, KmsError>, Malformed>;

fn ok() -> Enc {
    Enc::start(wire::STATUS_OK)
}

impl Cx<'_> {
    /// The id and alias of the key `name` names (`None`: the service key), as far as the
    /// policy needs them for `op`.
    fn key_name(&self, name: Option<&str>, op: Operation) -> Result<KeyName, KmsError> {
        let name = match name {
            Some(n) => n.to_owned(),
            None => self.ks.service_key_id(),
        };
        if !self.sh.policy.needs_key_names(self.who, op) {
            return Ok(KeyName {
                id: name,
                alias: None,
            });
        }
        Ok(self
            .ks
            .list_keys()?
            .into_iter()
            .find(|k| k.id == name || k.alias.as_deref() == Some(name.as_str()))
            .map_or(
                KeyName {
                    id: name,
                    alias: None,
                },
                |k| KeyName {
                    id: k.id,
                    alias: k.alias,
                },
            ))
    }

    /// Refuses (and audits) `what`.
    fn deny(
        &self,
        audit_op: AuditOp,
        key: &KeyName,
        volume: Option<[u8; 16]>,
        what: &str,
    ) -> KmsError {
        let msg = format!(
            "uid {} may not {what} {}",
            self.who.uid,
            self.sh.policy.describe()
        );
        log::warn!(
            "kms daemon: refused pid {} ({}): {msg}",
            self.caller.pid,
            self.caller.command
        );
        let key_id = if key.id.starts_with("cmk-") {
            key.id.as_str()
        } else {
            ""
        };
        if let Err(e) = self.ks.audit_refusal(audit_op, key_id, volume, &msg) {
            log::warn!("kms daemon: cannot audit the refusal: {e}");
        }
        KmsError::Refused(msg)
    }

    /// Checks `op` on the key `name`; `Err` is the (audited) refusal.
    fn check(
        &self,
        op: Operation,
        name: Option<&str>,
        audit_op: AuditOp,
        volume: Option<[u8; 16]>,
    ) -> Result<(), KmsError> {
        let key = self.key_name(name, op)?;
        if self.sh.policy.allows(self.who, op, &key) {
            return Ok(());
        }
        let shown = match (&key.alias, name) {
            (Some(a), _) => format!("{} ({a})", key.id),
            (None, Some(_)) => key.id.clone(),
            (None, None) => format!("{} (the service key)", key.id),
        };
        Err(self.deny(
            audit_op,
            &key,
            volume,
            &format!("{} with key {shown}", op.name()),
        ))
    }

    /// Generation marks and volume notes: for principals that may generate, decrypt or
    /// re-encrypt with the key the volume is bound to (any key, for a volume the
    /// keystore has not seen yet).
    fn check_books(
        &self,
        volume: &[u8; 16],
        cmk: Option<&str>,
        what: &str,
    ) -> Result<(), KmsError> {
        let p = &self.sh.policy;
        let ops = [
            Operation::Generate,
            Operation::Decrypt,
            Operation::ReEncrypt,
        ];
        if ops.iter().any(|o| p.allows_any_key(self.who, *o)) {
            return Ok(());
        }
        let denied = |key: &KeyName| {
            Err(self.deny(
                AuditOp::Describe,
                key,
                Some(*volume),
                &format!("{what} of volume {}", super::hex(volume)),
            ))
        };
        if !ops.iter().any(|o| p.allows_some_key(self.who, *o)) {
            return denied(&KeyName::default());
        }
        let keys = self.ks.list_keys()?;
        let bound = match cmk {
            Some(id) => keys.into_iter().find(|k| k.id == id),
            None => keys
                .into_iter()
                .find(|k| k.volumes.iter().any(|b| b.volume_id == *volume)),
        };
        let key = match bound {
            Some(k) => KeyName {
                id: k.id,
                alias: k.alias,
            },
            None => match cmk {
                Some(id) => KeyName {
                    id: id.to_owned(),
                    alias: None,
                },
                None => return Ok(()),
            },
        };
        if ops.iter().any(|o| p.allows(self.who, *o, &key)) {
            Ok(())
        } else {
            denied(&key)
        }
    }

    fn run(&self, op: Op, d: &mut Dec<'_>) -> Answer {
        let ks = self.ks;
        Ok(match op {
            Op::Ping => {
                d.end()?;
                let mut e = ok();
                e.u32(std::process::id())
                    .str(env!("CARGO_PKG_VERSION"))
                    .u32(self.who.uid)
                    .u32(self.who.gid);
                Ok(e)
            }
            Op::GenerateDataKey => {
                let cmk = d.opt_str()?;
                let ctx = d.ctx()?;
                d.end()?;
                let vol = volume_of(&ctx);
                (|| {
                    self.check(
                        Operation::Generate,
                        cmk.as_deref(),
                        AuditOp::GenerateDataKey,
                        vol,
                    )?;
                    let (dk, w) = ks.generate_data_key(cmk.as_deref(), &ctx)?;
                    let mut e = ok();
                    e.bytes(dk.expose()).wrapped(&w);
                    Ok(e)
                })()
            }
            Op::Decrypt => {
                let w = d.wrapped()?;
                let ctx = d.ctx()?;
                d.end()?;
                (|| {
                    self.check(
                        Operation::Decrypt,
                        Some(&w.cmk_id),
                        AuditOp::Decrypt,
                        volume_of(&ctx),
                    )?;
                    let dk = ks.decrypt(&w, &ctx)?;
                    let mut e = ok();
                    e.bytes(dk.expose());
                    Ok(e)
                })()
            }
            Op::ReEncrypt => {
                let w = d.wrapped()?;
                let ctx = d.ctx()?;
                let dest = d.opt_str()?;
                d.end()?;
                (|| {
                    let vol = volume_of(&ctx);
                    self.check(
                        Operation::ReEncrypt,
                        Some(&w.cmk_id),
                        AuditOp::ReEncrypt,
                        vol,
                    )?;
                    if let Some(dest) = &dest {
                        self.check(Operation::ReEncrypt, Some(dest), AuditOp::ReEncrypt, vol)?;
                    }
                    let nw = ks.re_encrypt(&w, &ctx, dest.as_deref())?;
                    let mut e = ok();
                    e.wrapped(&nw);
                    Ok(e)
                })()
            }
            Op::GenerationMark => {
                let v = d.id16()?;
                d.end()?;
                (|| {
                    self.check_books(&v, None, "read the generation mark")?;
                    let m = ks.generation_mark(&v)?;
                    let mut e = ok();
                    e.opt_u64(m);
                    Ok(e)
                })()
            }
            Op::RecordGeneration => {
                let v = d.id16()?;
                let g = d.u64()?;
                d.end()?;
                (|| {
                    self.check_books(&v, None, "record the generation")?;
                    ks.record_generation(&v, g)?;
                    Ok(ok())
                })()
            }
            Op::NoteVolume => {
                let v = d.id16()?;
                let cmk = d.str()?;
                let path = d.str()?;
                d.end()?;
                (|| {
                    self.check_books(&v, Some(&cmk), "note the key")?;
                    ks.note_volume(&v, &cmk, &path)?;
                    Ok(ok())
                })()
            }
            Op::ListKeys => {
                d.end()?;
                (|| {
                    let p = &self.sh.policy;
                    if !p.allows_some_key(self.who, Operation::Describe) {
                        return Err(self.deny(
                            AuditOp::List,
                            &KeyName::default(),
                            None,
                            "list keys",
                        ));
                    }
                    let keys: Vec<_> = ks
                        .list_keys()?
                        .into_iter()
                        .filter(|k| {
                            p.allows(
                                self.who,
                                Operation::Describe,
                                &KeyName {
                                    id: k.id.clone(),
                                    alias: k.alias.clone(),
                                },
                            )
                        })
                        .collect();
                    let mut e = ok();
                    e.count(keys.len());
                    for k in &keys {
                        e.key_info(k);
                    }
                    Ok(e)
                })()
            }
            Op::DescribeKey => {
                let name = d.str()?;
                d.end()?;
                (|| {
                    self.check(Operation::Describe, Some(&name), AuditOp::Describe, None)?;
                    let k = ks.describe_key(&name)?;
                    let mut e = ok();
                    e.key_info(&k);
                    Ok(e)
                })()
            }
            Op::CreateKey => {
                let alias = d.opt_str()?;
                let description = d.str()?;
                let external = d.u8()? != 0;
                d.end()?;
                (|| {
                    let p = &self.sh.policy;
                    let allowed = match &alias {
                        Some(a) => p.allows(
                            self.who,
                            Operation::Admin,
                            &KeyName {
                                id: String::new(),
                                alias: Some(a.clone()),
                            },
                        ),
                        None => p.allows_any_key(self.who, Operation::Admin),
                    };
                    if !allowed {
                        let what = match &alias {
                            Some(a) => format!("create a key with alias {a}"),
                            None => "create a key without an alias".into(),
                        };
                        return Err(self.deny(AuditOp::Create, &KeyName::default(), None, &what));
                    }
                    let k = ks.create_key(&CreateKey {
                        alias,
                        description,
                        external,
                    })?;
                    let mut e = ok();
                    e.key_info(&k);
                    Ok(e)
                })()
            }
            Op::ChangeKey => {
                let name = d.str()?;
                let code = d.u8()?;
                let days = d.u32()?;
                d.end()?;
                let change = wire::change_of(code, days)?;
                (|| {
                    self.check(Operation::Admin, Some(&name), change_op(change), None)?;
                    let k = ks.change_key(&name, change)?;
                    let mut e = ok();
                    e.key_info(&k);
                    Ok(e)
                })()
            }
            Op::ImportParams => {
                let name = d.str()?;
                let spec = wire::wrapping_of(d.u8()?)?;
                d.end()?;
                (|| {
                    self.check(Operation::Admin, Some(&name), AuditOp::ImportParams, None)?;
                    let p = ks.import_params(&name, spec)?;
                    let mut e = ok();
                    wire::import_params(&mut e, &p);
                    Ok(e)
                })()
            }
            Op::ImportMaterial => {
                let name = d.str()?;
                let token = d.bytes()?.to_vec();
                let material = zeroize::Zeroizing::new(d.bytes()?.to_vec());
                let expires = d.opt_u64()?;
                d.end()?;
                (|| {
                    self.check(Operation::Admin, Some(&name), AuditOp::Import, None)?;
                    let k = ks.import_material(&name, &token, &material, expires)?;
                    let mut e = ok();
                    e.key_info(&k);
                    Ok(e)
                })()
            }
            Op::AuditRecords => {
                d.end()?;
                (|| {
                    if !self.sh.policy.allows_any_key(self.who, Operation::Admin) {
                        return Err(self.deny(
                            AuditOp::List,
                            &KeyName::default(),
                            None,
                            "read the audit log (admin on keys \"*\" is needed)",
                        ));
                    }
                    let (report, records) = ks.audit_records()?;
                    let mut e = ok();
                    wire::audit(&mut e, &report, &records);
                    Ok(e)
                })()
            }
        })
    }
}

fn change_op(c: super::KeyChange) -> AuditOp {
    use super::KeyChange as K;
    match c {
        K::Enable => AuditOp::Enable,
        K::Disable => AuditOp::Disable,
        K::Rotate => AuditOp::Rotate,
        K::ScheduleDeletion { .. } => AuditOp::ScheduleDeletion,
        K::CancelDeletion => AuditOp::CancelDeletion,
        K::DeleteMaterial => AuditOp::DeleteMaterial,
    }
}

fn volume_of(ctx: &super::EncryptionContext) -> Option<[u8; 16]> {
    super::parse_hex16(ctx.get(super::EncryptionContext::VOLUME_ID)?)
}
