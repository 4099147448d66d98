//! The writer's lease and the readers' pins on an object store.
//!
//! There is no flock across hosts, so both are objects with an expiry that
//! their holder renews (every third of the lease time) while it is open:
//!
//! - `kmsfs.lease` (text, see `docs/OBJECT-STORE.md`): the one read-write
//!   opener. Taken with `If-None-Match: *` when absent, or `If-Match` on the
//!   ETag of an expired (or, with `--force-takeover`, a live) lease; renewed
//!   with `If-Match` on the ETag of its own last write. A renewal that fails
//!   its precondition means another writer took over: this writer is fenced
//!   (every later commit fails), and before each root commit the writer
//!   checks that the lease is still its own and not expired.
//! - reader pins `kmsfs.pin.*` (the bytes of FORMAT.md's pins): held while
//!   their object was written less than a lease time ago. A reader first
//!   publishes an empty placeholder pin (which the cleaner cannot decode, so
//!   it deletes nothing while one is fresh), reads the root, publishes its
//!   real pin and removes the placeholder: the cleaner never misses a reader
//!   that read an old root.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, bounded};
use object_store::{PutMode, UpdateVersion};

use super::{ObjectStorage, Remote};
use crate::store::{PIN_MAX_LEN, PIN_PREFIX, PinFile, Storage};

/// Name of the lease object.
pub const LEASE_FILE: &str = "kmsfs.lease";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A decoded lease.
#[derive(Debug, PartialEq, Eq)]
pub struct Lease {
    pub owner: String,
    pub host: String,
    pub pid: u32,
    pub expires: u64,
}

impl Lease {
    pub fn encode(&self) -> Vec<u8> {
        format!(
            "kmsfs lease 1\nowner {}\nhost {}\npid {}\nexpires {}\n",
            self.owner, self.host, self.pid, self.expires
        )
        .into_bytes()
    }

    /// Parses a lease; anything malformed is None (and treated as expired).
    pub fn decode(b: &[u8]) -> Option<Lease> {
        let t = std::str::from_utf8(b).ok()?;
        let mut lines = t.lines();
        if lines.next()? != "kmsfs lease 1" {
            return None;
        }
        let mut get = |k: &str| -> Option<String> {
            let l = lines.next()?;
            l.strip_prefix(k)?.strip_prefix(' ').map(str::to_string)
        };
        let owner = get("owner")?;
        let host = get("host")?;
        let pid = get("pid")?.parse().ok()?;
        let expires = get("expires")?.parse().ok()?;
        if owner.len() != 32 || host.len() > 255 {
            return None;
        }
        Some(Lease {
            owner,
            host,
            pid,
            expires,
        })
    }
}

pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = if r == 0 {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown".into()
    };
    name.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect()
}

/// A thread that rewrites an object every third of `ttl` until stopped.
struct Renewer {
    stop: Option<Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Renewer {
    fn spawn(ttl: Duration, mut each: impl FnMut() -> bool + Send + 'static) -> Renewer {
        let (tx, rx): (Sender<()>, Receiver<()>) = bounded(1);
        let step = (ttl / 3).max(Duration::from_millis(200));
        let thread = std::thread::Builder::new()
            .name("kmsfs-lease".into())
            .spawn(move || {
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = rx.recv_timeout(step)
                {
                    if !each() {
                        break;
                    }
                }
            })
            .ok();
        Renewer {
            stop: Some(tx),
            thread,
        }
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writer's hold on the lease; releases it (deletes the object if it is
/// still this writer's) when dropped.
struct LeaseGuard {
    _renewer: Renewer,
    remote: Arc<Remote>,
    owner: String,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        // Stop renewing first (the renewer is dropped after this body: stop it now).
        let r = std::mem::replace(
            &mut self._renewer,
            Renewer {
                stop: None,
                thread: None,
            },
        );
        drop(r);
        if let Ok((b, _)) = self.remote.get_whole(LEASE_FILE)
            && Lease::decode(&b).is_some_and(|l| l.owner == self.owner)
        {
            let _ = self.remote.delete(LEASE_FILE);
        }
    }
}

/// Takes the writer lease (see the module doc).
pub fn acquire(s: &ObjectStorage) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
    let ttl = s.cfg.lease;
    let owner = crate::format::hex(&crate::crypto::random_array::<16>());
    let mine = |expires| Lease {
        owner: owner.clone(),
        host: hostname(),
        pid: std::process::id(),
        expires,
    };
    let mut attempts = 0;
    let etag = loop {
        attempts += 1;
        let mode = match s.remote.get_whole(LEASE_FILE) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => PutMode::Create,
            Err(e) => return Err(e),
            Ok((b, etag)) => {
                let held = Lease::decode(&b);
                if let Some(l) = &held
                    && l.expires > now()
                {
                    if !s.cfg.force_takeover {
                        return Err(io::Error::new(
                            io::ErrorKind::WouldBlock,
                            format!(
                                "the writer lease is held by host {} pid {} for {} s more; \
                                 mount read-only (-o ro), wait for it to expire, or take it \
                                 over at once with --force-takeover if that writer is gone",
                                l.host,
                                l.pid,
                                l.expires - now()
                            ),
                        ));
                    }
                    log::warn!(
                        "{}: taking over the live writer lease of host {} pid {} \
                         (--force-takeover): that writer can no longer commit",
                        s.describe(),
                        l.host,
                        l.pid
                    );
                } else if let Some(l) = &held {
                    log::warn!(
                        "{}: the writer lease of host {} pid {} expired; taking it over",
                        s.describe(),
                        l.host,
                        l.pid
                    );
                }
                s.took_over.store(true, Ordering::SeqCst);
                PutMode::Update(UpdateVersion {
                    e_tag: etag,
                    version: None,
                })
            }
        };
        let lease = mine(now() + ttl.as_secs().max(1));
        match s.remote.put(LEASE_FILE, lease.encode(), mode) {
            Ok(etag) => break etag,
            // Another opener got there first: look again (once or twice).
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 3 => continue,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "another writer took the lease at the same moment; retry",
                ));
            }
            Err(e) => return Err(e),
        }
    };
    s.set_lease_owner(Some(owner.clone()));
    let remote = s.remote.clone();
    let fenced = s.fenced.clone();
    let url = s.describe();
    let host = hostname();
    let own = owner.clone();
    let mut etag = etag;
    let renewer = Renewer::spawn(ttl, move || {
        let lease = Lease {
            owner: own.clone(),
            host: host.clone(),
            pid: std::process::id(),
            expires: now() + ttl.as_secs().max(1),
        };
        let mode = PutMode::Update(UpdateVersion {
            e_tag: etag.clone(),
            version: None,
        });
        match remote.put(LEASE_FILE, lease.encode(), mode) {
            Ok(e) => {
                etag = e;
                true
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fenced.store(true, Ordering::SeqCst);
                log::error!(
                    "{url}: another mount took over the writer lease; this mount is fenced and \
                     commits nothing more (what it reported durable before is kept). Unmount it."
                );
                false
            }
            Err(e) => {
                log::warn!("{url}: could not renew the writer lease (will retry): {e}");
                true
            }
        }
    });
    Ok(Box::new(LeaseGuard {
        _renewer: renewer,
        remote: s.remote.clone(),
        owner,
    }))
}

/// The writer lease as it is now: None when no writer holds one (absent,
/// unreadable or expired).
pub fn holder(s: &ObjectStorage) -> io::Result<Option<Lease>> {
    match s.remote.get_whole(LEASE_FILE) {
        Ok((b, _)) => Ok(Lease::decode(&b).filter(|l| l.expires > now())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Checks, before a commit, that the lease is still `owner`'s and unexpired;
/// fences the writer otherwise.
pub fn check_held(s: &ObjectStorage, owner: &str) -> io::Result<()> {
    check_held_with(&s.remote, &s.describe(), &s.fenced, owner)
}

/// [`check_held`] with the parts of the storage it needs (for the
/// write-back uploader's thread).
pub(crate) fn check_held_with(
    remote: &Remote,
    url: &str,
    fenced: &AtomicBool,
    owner: &str,
) -> io::Result<()> {
    let (b, _) = remote.get_whole(LEASE_FILE).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{url}: the writer lease object is gone"),
            )
        } else {
            e
        }
    })?;
    match Lease::decode(&b) {
        Some(l) if l.owner == owner && l.expires > now() => Ok(()),
        Some(l) if l.owner == owner => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "{url}: this writer's lease expired (it could not be renewed in time), so another \
                 mount may write now: nothing is committed; check the store, then remount"
            ),
        )),
        other => {
            fenced.store(true, Ordering::SeqCst);
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{url}: the writer lease was taken over{}: this mount is fenced and commits \
                     nothing more (what it reported durable before is kept); unmount it",
                    other
                        .map(|l| format!(" by host {} pid {}", l.host, l.pid))
                        .unwrap_or_default()
                ),
            ))
        }
    }
}

/// A pin object kept fresh until dropped, then deleted.
struct PinGuard {
    _renewer: Renewer,
    remote: Arc<Remote>,
    name: String,
    live: Arc<AtomicBool>,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        self.live.store(false, Ordering::SeqCst);
        let r = std::mem::replace(
            &mut self._renewer,
            Renewer {
                stop: None,
                thread: None,
            },
        );
        drop(r);
        let _ = self.remote.delete(&self.name);
    }
}

/// Publishes `name` with `data` and keeps it fresh while the guard lives.
pub fn publish_pin(
    s: &ObjectStorage,
    name: &str,
    data: &[u8],
) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
    s.remote.put(name, data.to_vec(), PutMode::Create)?;
    let remote = s.remote.clone();
    let live = Arc::new(AtomicBool::new(true));
    let (n, d, l) = (name.to_string(), data.to_vec(), live.clone());
    let renewer = Renewer::spawn(s.cfg.lease, move || {
        if l.load(Ordering::SeqCst) {
            let _ = remote.put(&n, d.clone(), PutMode::Overwrite);
        }
        true
    });
    Ok(Box::new(PinGuard {
        _renewer: renewer,
        remote: s.remote.clone(),
        name: name.to_string(),
        live,
    }))
}

/// The placeholder a reader holds while it reads the root (see the module doc).
pub fn reader_placeholder(s: &ObjectStorage) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
    let name = format!(
        "{PIN_PREFIX}{}",
        crate::format::hex(&crate::crypto::random_array::<16>())
    );
    publish_pin(s, &name, &[])
}

/// Every pin, held while written less than a lease time ago.
pub fn list_pins(s: &ObjectStorage) -> io::Result<Vec<PinFile>> {
    let (objs, _) = s.remote.list_dir("")?;
    let ttl = s.cfg.lease.as_secs().max(1) as i64;
    let now = now() as i64;
    let mut out = Vec::new();
    for (name, size, modified) in objs {
        if !name.starts_with(PIN_PREFIX) {
            continue;
        }
        let held = now - modified < ttl;
        let data = if size > PIN_MAX_LEN {
            Vec::new()
        } else {
            match s.remote.get_whole(&name) {
                Ok((b, _)) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        };
        out.push(PinFile { name, data, held });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_text_roundtrip_and_bad_input() {
        let l = Lease {
            owner: "0".repeat(32),
            host: "h".into(),
            pid: 7,
            expires: 99,
        };
        assert_eq!(Lease::decode(&l.encode()), Some(l));
        for bad in [
            &b""[..],
            b"kmsfs lease 2\n",
            b"kmsfs lease 1\nowner x\nhost h\npid 1\nexpires 1\n",
            b"kmsfs lease 1\nowner 00000000000000000000000000000000\nhost h\npid -1\nexpires 1\n",
            b"\xff\xfe",
        ] {
            assert!(Lease::decode(bad).is_none());
        }
    }
}
