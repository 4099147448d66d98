//! The KMS audit log: one tamper-evident record per key operation (`PATH.audit` next to the
//! keystore `PATH`). The byte layout is specified in `docs/AUDIT-FORMAT.md`.
//!
//! - A record holds the time, the [`AuditOp`], the key id and version, the volume id, the
//!   [`Caller`] (uid, pid, command) and the result. Never file names, never key material.
//! - Records are chained with HMAC-SHA256 under the 32-byte audit key kept inside the sealed
//!   keystore. An *authenticated* record carries a MAC over the chain value of the previous
//!   authenticated record, every record written since it (the *unauthenticated* ones, e.g. a
//!   failed unlock, when no key was available) and its own bytes, including its sequence
//!   number. The keystore holds the [`Anchor`]: the sequence number and MAC of the last
//!   authenticated record it knows of.
//! - [`AuditLog::verify`] checks the whole chain and the anchor and names the first bad
//!   record. [`AuditLog::append`] checks only the tail against the anchor (cheap: it reads
//!   the file from its end, each record ends with its length), refuses a log that is behind
//!   or diverges from it, and heals a record torn by a crash after the anchored one.
//! - The log may legitimately be *ahead* of the anchor: a crash after an append but before
//!   the keystore stored the new anchor, or unauthenticated records.
//!
//! Layout: this file holds the public types; `record` the byte encoding (header, records,
//! MAC chain inputs, the forward frame scan); `log` the file ([`AuditLog`]: append, the
//! tail check and torn-tail repair, reading); `verify` the whole-chain check and the
//! messages naming a bad record; `view` the filter and the human and JSON views.

use core::fmt;
use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

mod log;
mod record;
mod verify;
mod view;

pub use self::log::AuditLog;
pub use record::{HEADER_LEN, MAGIC, MAX_COMMAND_LEN, MAX_KEY_ID_LEN, MAX_REASON_LEN, VERSION};
pub use view::{AuditFilter, format_table, iso_utc_ms, to_json};

use record::truncate_utf8;

/// A KMS operation. The numeric value is stored in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AuditOp {
    /// A CMK was created.
    Create = 1,
    /// A CMK was enabled.
    Enable,
    /// A CMK was disabled.
    Disable,
    /// A CMK got a new version.
    Rotate,
    /// A CMK was scheduled for deletion.
    ScheduleDeletion,
    /// A scheduled deletion was cancelled.
    CancelDeletion,
    /// A CMK was destroyed (its deletion date passed).
    Destroy,
    /// Import parameters (wrapping public key) were handed out.
    ImportParams,
    /// Key material was imported (BYOK).
    Import,
    /// Imported key material was deleted.
    DeleteMaterial,
    /// GenerateDataKey: a new DK wrapped under a CMK.
    GenerateDataKey,
    /// Decrypt: a wrapped DK was unwrapped.
    Decrypt,
    /// ReEncrypt: a wrapped DK was re-wrapped.
    ReEncrypt,
    /// The keystore was unlocked (or an unlock failed).
    Unlock,
    /// The keystore passphrase or keyfile was changed.
    Passwd,
    /// The keystore was restored from a backup.
    Restore,
    /// A CMK's metadata was read.
    Describe,
    /// The CMKs were listed.
    List,
}

impl AuditOp {
    /// Every operation, in numeric order.
    pub const ALL: &'static [AuditOp] = &[
        Self::Create,
        Self::Enable,
        Self::Disable,
        Self::Rotate,
        Self::ScheduleDeletion,
        Self::CancelDeletion,
        Self::Destroy,
        Self::ImportParams,
        Self::Import,
        Self::DeleteMaterial,
        Self::GenerateDataKey,
        Self::Decrypt,
        Self::ReEncrypt,
        Self::Unlock,
        Self::Passwd,
        Self::Restore,
        Self::Describe,
        Self::List,
    ];

    /// The user-facing name, kebab-case (`generate-data-key`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Enable => "enable",
            Self::Disable => "disable",
            Self::Rotate => "rotate",
            Self::ScheduleDeletion => "schedule-deletion",
            Self::CancelDeletion => "cancel-deletion",
            Self::Destroy => "destroy",
            Self::ImportParams => "import-params",
            Self::Import => "import",
            Self::DeleteMaterial => "delete-material",
            Self::GenerateDataKey => "generate-data-key",
            Self::Decrypt => "decrypt",
            Self::ReEncrypt => "re-encrypt",
            Self::Unlock => "unlock",
            Self::Passwd => "passwd",
            Self::Restore => "restore",
            Self::Describe => "describe",
            Self::List => "list",
        }
    }

    /// Parses a name as printed by [`AuditOp::name`] (ASCII case-insensitive, surrounding
    /// whitespace ignored).
    #[must_use]
    pub fn from_name(s: &str) -> Option<Self> {
        let s = s.trim();
        Self::ALL
            .iter()
            .copied()
            .find(|op| op.name().eq_ignore_ascii_case(s))
    }

    /// The operation stored as `v`, if known.
    #[must_use]
    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.iter().copied().find(|op| *op as u8 == v)
    }
}

impl fmt::Display for AuditOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Who asked for an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Real user id.
    pub uid: u32,
    /// Process id.
    pub pid: u32,
    /// Process name, at most [`MAX_COMMAND_LEN`] bytes (truncated on a char boundary).
    pub command: String,
}

impl Caller {
    /// A caller with `command` truncated to [`MAX_COMMAND_LEN`] bytes.
    #[must_use]
    pub fn new(uid: u32, pid: u32, command: &str) -> Self {
        Self {
            uid,
            pid,
            command: truncate_utf8(command, MAX_COMMAND_LEN).to_owned(),
        }
    }

    /// This process: `getuid()`, its pid, and its name from `/proc/self/comm` (else the
    /// base name of argv\[0\], else `?`).
    #[must_use]
    pub fn current() -> Self {
        let command = std::fs::read("/proc/self/comm")
            .ok()
            .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
            .filter(|s| !s.is_empty())
            .or_else(|| {
                std::env::args_os().next().and_then(|a| {
                    Path::new(&a)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                })
            })
            .unwrap_or_else(|| "?".to_owned());
        Self::new(nix::unistd::getuid().as_raw(), std::process::id(), &command)
    }

    /// Another process (e.g. the peer of a socket, from its credentials): its name is read
    /// from `/proc/PID/comm` (macOS: proc_name), `?` if that is not readable.
    #[must_use]
    pub fn of_process(uid: u32, pid: u32) -> Self {
        let command = crate::sys::process_name(pid).unwrap_or_else(|| "?".to_owned());
        Self::new(uid, pid, &command)
    }
}

/// One KMS operation as logged. Holds no file names and no key material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// When, unix milliseconds.
    pub time_ms: u64,
    /// What.
    pub op: AuditOp,
    /// The CMK id (never an alias); `""` when none (e.g. a failed unlock). At most
    /// [`MAX_KEY_ID_LEN`] bytes.
    pub key_id: String,
    /// The CMK version; 0 = none.
    pub key_version: u32,
    /// The volume the operation was for, if any.
    pub volume_id: Option<[u8; 16]>,
    /// Who.
    pub caller: Caller,
    /// Whether the operation succeeded.
    pub ok: bool,
    /// `""` when ok, else why it was refused (at most [`MAX_REASON_LEN`] bytes; never key
    /// material).
    pub reason: String,
}

impl AuditRecord {
    /// A record stamped now. `result`: `Err(reason)` for a refusal; strings longer than their
    /// bounds are truncated on a char boundary.
    #[must_use]
    pub fn new(
        op: AuditOp,
        key_id: &str,
        key_version: u32,
        volume_id: Option<[u8; 16]>,
        caller: &Caller,
        result: Result<(), String>,
    ) -> Self {
        let (ok, reason) = match result {
            Ok(()) => (true, String::new()),
            Err(r) => (false, truncate_utf8(&r, MAX_REASON_LEN).to_owned()),
        };
        Self {
            time_ms: now_ms(),
            op,
            key_id: truncate_utf8(key_id, MAX_KEY_ID_LEN).to_owned(),
            key_version,
            volume_id,
            caller: Caller::new(caller.uid, caller.pid, &caller.command),
            ok,
            reason,
        }
    }

    /// `TIME OP` (e.g. `2026-12-01T16:53:30.123Z decrypt`), how errors name a record.
    fn describe(&self) -> String {
        format!("{} {}", iso_utc_ms(self.time_ms), self.op.name())
    }
}

/// What the keystore remembers of the log: the sequence number (1-based) of the last
/// authenticated record it knows of, which is also the count of records (authenticated or
/// not) up to and including it, and that record's MAC. `Default` = an empty log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Anchor {
    /// Sequence number of the anchored record; 0 = none.
    pub count: u64,
    /// The anchored record's MAC (zeros when `count` is 0).
    pub mac: [u8; 32],
}

impl Anchor {
    /// Length of [`Anchor::to_bytes`].
    pub const ENCODED_LEN: usize = 40;

    /// `count` (u64 LE) then `mac`, for storing in the keystore.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[..8].copy_from_slice(&self.count.to_le_bytes());
        out[8..].copy_from_slice(&self.mac);
        out
    }

    /// The inverse of [`Anchor::to_bytes`].
    #[must_use]
    pub fn from_bytes(b: &[u8; Self::ENCODED_LEN]) -> Self {
        let mut count = [0u8; 8];
        count.copy_from_slice(&b[..8]);
        let mut mac = [0u8; 32];
        mac.copy_from_slice(&b[8..]);
        Self {
            count: u64::from_le_bytes(count),
            mac,
        }
    }
}

/// A record as read from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// Sequence number, 1-based (= position in the log).
    pub index: u64,
    /// The record.
    pub record: AuditRecord,
    /// Whether it carries a MAC (false: written without the key, e.g. a failed unlock).
    pub authenticated: bool,
}

/// What [`AuditLog::verify`] found (only returned when the log verified).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VerifyReport {
    /// Records in the log.
    pub records: u64,
    /// Of which authenticated.
    pub authenticated: u64,
    /// Records after the anchored one (an append whose anchor was not stored before a
    /// crash, or unauthenticated records), still chain-valid.
    pub unanchored_tail: u64,
    /// Unauthenticated records after the last authenticated one: not yet covered by a MAC
    /// (the next authenticated record covers them).
    pub uncovered_tail: u64,
    /// The anchor of the log's last authenticated record (the keystore may store it to
    /// catch up after a crash window).
    pub tail_anchor: Anchor,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} records verified ({} authenticated)",
            self.records, self.authenticated
        )?;
        if self.unanchored_tail > 0 {
            write!(
                f,
                "; the last {} are after the keystore's anchor (written just before a crash, or failed unlocks)",
                self.unanchored_tail
            )?;
        }
        if self.uncovered_tail > 0 {
            write!(
                f,
                "; the last {} are not yet covered by a MAC (the next KMS operation covers them)",
                self.uncovered_tail
            )?;
        }
        Ok(())
    }
}

/// Errors of the audit log. Messages name the file, the cause and the next step.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file system error.
    #[error(
        "audit log {path}: {source}; check that the file and its directory exist, are not links, and are writable by this user"
    )]
    Io {
        /// The log file.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Bytes that do not parse as a record (or header).
    #[error(
        "audit log {path} is malformed at byte offset {offset} ({}): {detail}; if this is the end of the file, a crash cut the last record short and the next KMS operation removes it, otherwise the file was damaged: restore it from a backup",
        name_position(*.index)
    )]
    Malformed {
        /// The log file.
        path: String,
        /// 1-based position of the record that does not parse (0: the header).
        index: u64,
        /// Byte offset where it starts.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// The log was changed after it was written, does not match the keystore's anchor, or
    /// was written under another audit key.
    #[error(
        "audit log {path} fails verification at record #{index}: {detail}; the log was changed after it was written (or is not the log of this keystore): keep the file as evidence and restore it from a backup, or start a new log with `kmsfs audit reset --yes` (which moves this one aside)"
    )]
    Tampered {
        /// The log file.
        path: String,
        /// 1-based position of the first bad (or first missing) record.
        index: u64,
        /// What is wrong, naming the record (time, operation) when readable.
        detail: String,
    },
    /// The log was written by a newer kmsfs.
    #[error(
        "audit log {path} has format version {found}, this kmsfs reads version {supported}; upgrade kmsfs"
    )]
    UnsupportedVersion {
        /// The log file.
        path: String,
        /// Version in the file.
        found: u16,
        /// Version this build reads.
        supported: u16,
    },
}

fn name_position(index: u64) -> String {
    if index == 0 {
        "the file header".to_owned()
    } else {
        format!("record #{index}")
    }
}

/// Now, unix milliseconds (0 before 1970).
#[must_use]
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
