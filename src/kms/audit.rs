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

use core::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::crypto::{SecretKey, ct_eq, hmac_sha256};

/// The first 8 bytes of an audit log.
pub const MAGIC: [u8; 8] = *b"KMSFSAU\0";
/// The format version this build writes and reads.
pub const VERSION: u16 = 1;
/// Length of the file header: magic, version, reserved.
pub const HEADER_LEN: usize = 12;
/// Longest key id stored (longer ids are truncated on a char boundary).
pub const MAX_KEY_ID_LEN: usize = 64;
/// Longest command stored.
pub const MAX_COMMAND_LEN: usize = 64;
/// Longest refusal reason stored.
pub const MAX_REASON_LEN: usize = 1024;

/// Fixed part of a record frame (length field up to and including the string lengths).
const FIXED_LEN: usize = 56;
const MAC_LEN: usize = 32;
const TRAILER_LEN: usize = 4;
/// Shortest frame: an unauthenticated record with empty strings.
const MIN_FRAME_LEN: usize = FIXED_LEN + TRAILER_LEN;
/// Longest frame: an authenticated record with every string at its bound (1244 bytes).
const MAX_FRAME_LEN: usize =
    FIXED_LEN + MAX_KEY_ID_LEN + MAX_COMMAND_LEN + MAX_REASON_LEN + MAC_LEN + TRAILER_LEN;

const KIND_AUTHENTICATED: u8 = 1;
const KIND_UNAUTHENTICATED: u8 = 2;

/// Domain-separation labels, one per kind of HMAC input (each ends with a NUL).
const LABEL_START: &[u8] = b"kmsfs-audit-v1-start\0";
const LABEL_UNAUTHENTICATED: &[u8] = b"kmsfs-audit-v1-unauthenticated\0";
const LABEL_RECORD: &[u8] = b"kmsfs-audit-v1-record\0";

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

/// Which records `kmsfs audit` shows. Every `Some` must match; bounds are inclusive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Key id (exact).
    pub key: Option<String>,
    /// Volume id.
    pub volume: Option<[u8; 16]>,
    /// Earliest time, unix milliseconds, inclusive.
    pub since_ms: Option<u64>,
    /// Latest time, unix milliseconds, inclusive.
    pub until_ms: Option<u64>,
    /// Operation.
    pub op: Option<AuditOp>,
}

impl AuditFilter {
    /// Whether `r` passes every filter that is set.
    #[must_use]
    pub fn matches(&self, r: &AuditRecord) -> bool {
        self.key.as_deref().is_none_or(|k| r.key_id == k)
            && self.volume.is_none_or(|v| r.volume_id == Some(v))
            && self.since_ms.is_none_or(|t| r.time_ms >= t)
            && self.until_ms.is_none_or(|t| r.time_ms <= t)
            && self.op.is_none_or(|op| r.op == op)
    }
}

/// A human table: `#`, TIME (ISO 8601 UTC with milliseconds), OP, KEY (`id:version`, `-`),
/// VOLUME (hex, `-`), UID, PID, COMMAND, RESULT (`ok` or `refused: reason`). Control
/// characters in strings are escaped, so a record cannot move the terminal's cursor.
#[must_use]
pub fn format_table(records: &[StoredRecord]) -> String {
    const HEAD: [&str; 9] = [
        "#", "TIME", "OP", "KEY", "VOLUME", "UID", "PID", "COMMAND", "RESULT",
    ];
    let rows: Vec<[String; 9]> = records
        .iter()
        .map(|s| {
            let r = &s.record;
            let key = match (r.key_id.as_str(), r.key_version) {
                ("", _) => "-".to_owned(),
                (id, 0) => printable(id),
                (id, v) => format!("{}:{v}", printable(id)),
            };
            let result = if r.ok {
                "ok".to_owned()
            } else if r.reason.is_empty() {
                "refused".to_owned()
            } else {
                format!("refused: {}", printable(&r.reason))
            };
            [
                s.index.to_string(),
                iso_utc_ms(r.time_ms),
                r.op.name().to_owned(),
                key,
                r.volume_id.map_or_else(|| "-".to_owned(), |v| hex(&v)),
                r.caller.uid.to_string(),
                r.caller.pid.to_string(),
                printable(&r.caller.command),
                result,
            ]
        })
        .collect();
    let mut width = HEAD.map(str::len);
    for row in &rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(cell);
                let pad = width[i] - cell.chars().count() + 2;
                l.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&HEAD);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells);
    }
    out
}

/// One record as JSON: `index`, `time` (ISO 8601 UTC with milliseconds), `op`, `key_id`,
/// `key_version`, `volume_id` (hex or null), `uid`, `pid`, `command`, `result` (`"ok"` or
/// `"refused"`), `reason`, `authenticated`.
#[must_use]
pub fn to_json(r: &StoredRecord) -> serde_json::Value {
    let rec = &r.record;
    serde_json::json!({
        "index": r.index,
        "time": iso_utc_ms(rec.time_ms),
        "op": rec.op.name(),
        "key_id": rec.key_id,
        "key_version": rec.key_version,
        "volume_id": rec.volume_id.map(|v| hex(&v)),
        "uid": rec.caller.uid,
        "pid": rec.caller.pid,
        "command": rec.caller.command,
        "result": if rec.ok { "ok" } else { "refused" },
        "reason": rec.reason,
        "authenticated": r.authenticated,
    })
}

/// The audit log file. Appends assume the caller holds the keystore lock; each append also
/// takes an exclusive `flock` on the log (readers a shared one), so records never
/// interleave.
#[derive(Clone, Debug)]
pub struct AuditLog {
    path: PathBuf,
}

impl AuditLog {
    /// The log at `path` (usually the keystore path + `.audit`). Nothing is opened yet.
    #[must_use]
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// The log file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends an authenticated record chained from the log's current tail and returns the
    /// new anchor, which the caller stores in the keystore after this returns. The file is
    /// opened `O_APPEND | O_NOFOLLOW`, created with mode 0600 (only while `anchor` is empty),
    /// and fsync'ed (its directory too when the file was started).
    ///
    /// `anchor` is what the keystore holds now. The log may be ahead of it (a crash after
    /// an append but before the keystore stored its anchor, or unauthenticated records):
    /// those records are checked against the chain and covered. A log that is behind the
    /// anchor, or that diverges from it, is refused and nothing is appended. A record torn
    /// by a crash at the very end, after the anchored record, is removed first (logged as
    /// a warning). Cost: the anchored record, the one before it and those after it (read
    /// from the end of the file), not the whole log; [`AuditLog::verify`] checks the rest.
    ///
    /// # Errors
    /// [`AuditError::Tampered`] when behind or diverging, [`AuditError::Malformed`] for
    /// unreadable bytes that are not a torn tail, [`AuditError::Io`].
    pub fn append(
        &self,
        key: &SecretKey,
        anchor: &Anchor,
        rec: &AuditRecord,
    ) -> Result<Anchor, AuditError> {
        let Some(file) = self.open_append(anchor.count == 0)? else {
            return Err(self.tampered(
                1,
                format!(
                    "the file is missing, but the keystore anchors {} records",
                    anchor.count
                ),
            ));
        };
        let tail = self.prepare_tail(&file, Some((key, anchor)))?;
        let index = tail.next_index;
        let mut frame = encode_frame(rec, index, true);
        let mac_at = frame.len() - TRAILER_LEN - MAC_LEN;
        let mac = record_mac(key, &tail.chain_for(key), &frame[..mac_at]);
        frame[mac_at..mac_at + MAC_LEN].copy_from_slice(&mac);
        self.write_frame(&file, tail.len == 0, &frame)?;
        Ok(Anchor { count: index, mac })
    }

    /// Appends an unauthenticated record (no key available, e.g. a failed unlock). The next
    /// authenticated record's MAC covers it; until then [`AuditLog::verify`] reports it as
    /// not yet covered. Creates the file (mode 0600) if missing. A torn record at the very
    /// end is removed first.
    ///
    /// # Errors
    /// [`AuditError::Malformed`] when the tail does not parse, [`AuditError::Io`].
    pub fn append_unauthenticated(&self, rec: &AuditRecord) -> Result<(), AuditError> {
        let file = self
            .open_append(true)?
            .ok_or_else(|| self.io(io::Error::from(io::ErrorKind::NotFound)))?;
        let tail = self.prepare_tail(&file, None)?;
        let frame = encode_frame(rec, tail.next_index, false);
        self.write_frame(&file, tail.len == 0, &frame)
    }

    /// Every record, strictly parsed. A missing or empty file has none.
    ///
    /// # Errors
    /// [`AuditError::Malformed`] at the offset of the first record that does not parse
    /// (also a record torn by a crash), [`AuditError::Tampered`] when sequence numbers are
    /// out of order (records removed, inserted or reordered), [`AuditError::Io`].
    pub fn read_all(&self) -> Result<Vec<StoredRecord>, AuditError> {
        let Some(file) = self.open_read()? else {
            return Ok(Vec::new());
        };
        let mut r = BufReader::new(ReadAt::new(&file, 0));
        if self.read_header(&mut r)?.is_none() {
            return Ok(Vec::new());
        }
        let mut fw = Forward::new(r);
        let mut out = Vec::new();
        while let Some(raw) = fw.next_frame().map_err(|e| self.scan_error(e, 0))? {
            out.push(StoredRecord {
                index: raw.frame.index,
                record: raw.frame.record,
                authenticated: raw.frame.mac.is_some(),
            });
        }
        Ok(out)
    }

    /// Like [`AuditLog::read_all`], but keeps the records before the first problem: for
    /// listing a damaged log. Returns them and the error that stopped the reading, if any.
    #[must_use]
    pub fn read_prefix(&self) -> (Vec<StoredRecord>, Option<AuditError>) {
        let mut out = Vec::new();
        let file = match self.open_read() {
            Ok(Some(f)) => f,
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        };
        let mut r = BufReader::new(ReadAt::new(&file, 0));
        match self.read_header(&mut r) {
            Ok(Some(_)) => {}
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
        let mut fw = Forward::new(r);
        loop {
            match fw.next_frame() {
                Ok(Some(raw)) => out.push(StoredRecord {
                    index: raw.frame.index,
                    record: raw.frame.record,
                    authenticated: raw.frame.mac.is_some(),
                }),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(self.scan_error(e, 0))),
            }
        }
    }

    /// Checks the whole chain under `key`, the sequence numbers, and the anchor (record
    /// `#anchor.count` exists, is authenticated and its MAC is `anchor.mac`). A missing
    /// file with an empty anchor is a valid empty log.
    ///
    /// # Errors
    /// [`AuditError::Tampered`] naming the first bad record (a changed, removed, inserted
    /// or reordered record, a cut-off tail, another keystore's log),
    /// [`AuditError::Malformed`] for unreadable bytes after the anchor (e.g. a torn last
    /// record), [`AuditError::UnsupportedVersion`], [`AuditError::Io`].
    pub fn verify(&self, key: &SecretKey, anchor: &Anchor) -> Result<VerifyReport, AuditError> {
        let missing = |what: &str| {
            if anchor.count == 0 {
                Ok(VerifyReport::default())
            } else {
                Err(self.tampered(
                    1,
                    format!(
                        "the file {what}, but the keystore anchors {} records",
                        anchor.count
                    ),
                ))
            }
        };
        let Some(file) = self.open_read()? else {
            return missing("is missing");
        };
        let mut r = BufReader::new(ReadAt::new(&file, 0));
        let Some(header) = self.read_header(&mut r)? else {
            return missing("is empty");
        };
        let mut chain = chain_start(key, &header);
        let mut fw = Forward::new(r);
        let mut report = VerifyReport::default();
        let mut anchored = anchor.count == 0;
        let mut uncovered_from: Option<u64> = None;
        let mut last: Option<AuditRecord> = None;
        while let Some(raw) = fw
            .next_frame()
            .map_err(|e| self.scan_error(e, anchor.count))?
        {
            let i = raw.frame.index;
            report.records += 1;
            if let Some(mac) = raw.frame.mac {
                let prefix = &raw.bytes[..raw.bytes.len() - TRAILER_LEN - MAC_LEN];
                if !ct_eq(&record_mac(key, &chain, prefix), &mac) {
                    return Err(
                        self.tampered(i, bad_mac_detail(i, &raw.frame.record, uncovered_from))
                    );
                }
                chain = mac;
                report.authenticated += 1;
                report.tail_anchor = Anchor { count: i, mac };
                uncovered_from = None;
                if i == anchor.count {
                    if !ct_eq(&mac, &anchor.mac) {
                        return Err(self.tampered(i, not_anchored_detail(i, &raw.frame.record)));
                    }
                    anchored = true;
                }
            } else {
                if i == anchor.count {
                    return Err(self.tampered(
                        i,
                        format!(
                            "record #{i} ({}) is the one the keystore anchors but carries no MAC",
                            raw.frame.record.describe()
                        ),
                    ));
                }
                chain = chain_unauthenticated(key, &chain, &raw.bytes);
                uncovered_from.get_or_insert(i);
            }
            last = Some(raw.frame.record);
        }
        if !anchored {
            return Err(self.tampered(
                report.records + 1,
                cut_off_detail(report.records, last.as_ref(), anchor.count),
            ));
        }
        report.unanchored_tail = report.records - anchor.count;
        report.uncovered_tail = uncovered_from.map_or(0, |f| report.records + 1 - f);
        Ok(report)
    }

    // ----- internals -----

    fn io(&self, source: io::Error) -> AuditError {
        let source = if source.raw_os_error() == Some(libc::ELOOP) {
            io::Error::new(
                source.kind(),
                "it is a symbolic link, which kmsfs does not follow for its audit log",
            )
        } else {
            source
        };
        AuditError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn tampered(&self, index: u64, detail: String) -> AuditError {
        AuditError::Tampered {
            path: self.path.display().to_string(),
            index,
            detail,
        }
    }

    fn malformed(&self, index: u64, offset: u64, detail: String) -> AuditError {
        AuditError::Malformed {
            path: self.path.display().to_string(),
            index,
            offset,
            detail,
        }
    }

    /// A scan error as reported; `anchored`: records up to this sequence number were
    /// complete when written, so a record there that does not parse was changed.
    fn scan_error(&self, e: ScanError, anchored: u64) -> AuditError {
        match e {
            ScanError::Io(e) => self.io(e),
            ScanError::Malformed {
                offset,
                index,
                detail,
            } if index <= anchored => self.tampered(
                index,
                format!(
                    "record #{index} at byte offset {offset} cannot be read ({detail}), but the keystore anchors {anchored} records, so it was complete when written"
                ),
            ),
            ScanError::Malformed {
                offset,
                index,
                detail,
            } => self.malformed(index, offset, detail),
            ScanError::Sequence {
                index,
                found,
                record,
                ..
            } => self.tampered(index, sequence_detail(index, found, &record)),
        }
    }

    fn check_regular(&self, f: File) -> Result<File, AuditError> {
        let meta = f.metadata().map_err(|e| self.io(e))?;
        if meta.is_file() {
            Ok(f)
        } else {
            Err(self.io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )))
        }
    }

    /// Opens for reading under a shared lock; `None` if missing.
    fn open_read(&self) -> Result<Option<File>, AuditError> {
        let f = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&self.path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        let f = self.check_regular(f)?;
        f.lock_shared().map_err(|e| self.io(e))?;
        Ok(Some(f))
    }

    /// Opens for appending under an exclusive lock; `None` if missing and not `create`.
    fn open_append(&self, create: bool) -> Result<Option<File>, AuditError> {
        let f = match OpenOptions::new()
            .read(true)
            .append(true)
            .create(create)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&self.path)
        {
            Ok(f) => f,
            Err(e) if !create && e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        let f = self.check_regular(f)?;
        f.lock().map_err(|e| self.io(e))?;
        Ok(Some(f))
    }

    /// Reads and checks the header; `None` for an empty file.
    fn read_header(&self, r: &mut impl Read) -> Result<Option<[u8; HEADER_LEN]>, AuditError> {
        let mut h = [0u8; HEADER_LEN];
        match read_full(r, &mut h).map_err(|e| self.io(e))? {
            0 => Ok(None),
            HEADER_LEN => self.check_header(&h).map(Some),
            n => Err(self.malformed(
                0,
                0,
                format!("the file ends {n} bytes into its {HEADER_LEN}-byte header"),
            )),
        }
    }

    fn check_header(&self, h: &[u8; HEADER_LEN]) -> Result<[u8; HEADER_LEN], AuditError> {
        if h[..8] != MAGIC {
            return Err(self.malformed(
                0,
                0,
                "it does not start with the kmsfs audit log magic \"KMSFSAU\\0\"".to_owned(),
            ));
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version > VERSION {
            return Err(AuditError::UnsupportedVersion {
                path: self.path.display().to_string(),
                found: version,
                supported: VERSION,
            });
        }
        if version != VERSION {
            return Err(self.malformed(0, 0, format!("format version {version} is not valid")));
        }
        if h[10..] != [0, 0] {
            return Err(self.malformed(0, 0, "the reserved header bytes are not zero".to_owned()));
        }
        Ok(*h)
    }

    /// Where the next record goes, after checking the tail against `auth`'s anchor (and the
    /// chain from it). Heals a torn tail and retries once.
    fn prepare_tail(
        &self,
        file: &File,
        auth: Option<(&SecretKey, &Anchor)>,
    ) -> Result<Tail, AuditError> {
        let anchor_count = auth.map(|(_, a)| a.count);
        let mut healed = false;
        loop {
            let len = file.metadata().map_err(|e| self.io(e))?.len();
            if len == 0 {
                if let Some(count) = anchor_count.filter(|c| *c > 0) {
                    return Err(self.tampered(
                        1,
                        format!("the file is empty, but the keystore anchors {count} records"),
                    ));
                }
                return Ok(Tail {
                    len: 0,
                    next_index: 1,
                    chain: None,
                });
            }
            let attempt = self
                .header_at(file, len)
                .and_then(|()| self.walk_tail(file, len, auth));
            match attempt {
                Ok(tail) => return Ok(tail),
                Err(e @ (AuditError::Malformed { .. } | AuditError::UnsupportedVersion { .. }))
                    if !healed =>
                {
                    if !self.heal_torn_tail(file, len, anchor_count)? {
                        return Err(e);
                    }
                    healed = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn header_at(&self, file: &File, len: u64) -> Result<(), AuditError> {
        if len < HEADER_LEN as u64 {
            return Err(self.malformed(
                0,
                0,
                format!("the file ends {len} bytes into its {HEADER_LEN}-byte header"),
            ));
        }
        let mut h = [0u8; HEADER_LEN];
        file.read_exact_at(&mut h, 0).map_err(|e| self.io(e))?;
        self.check_header(&h).map(|_| ())
    }

    /// Walks back from the end of a file with a valid header. With a key and anchor: back to
    /// the anchored record (or the start for an empty anchor), then forward checking the
    /// anchor and every MAC after it. Without: the last record only.
    fn walk_tail(
        &self,
        file: &File,
        len: u64,
        auth: Option<(&SecretKey, &Anchor)>,
    ) -> Result<Tail, AuditError> {
        let stop = auth.map(|(_, a)| a.count);
        // (offset, frame length, sequence number), from the end backwards.
        let mut frames: Vec<(u64, usize, u64)> = Vec::new();
        let mut pos = len;
        while pos > HEADER_LEN as u64 {
            let (offset, frame) = self.frame_ending_at(file, pos)?;
            let i = frame.index;
            match frames.last() {
                None => {
                    if let Some(a) = stop.filter(|a| i < *a) {
                        return Err(self.tampered(
                            i.saturating_add(1),
                            cut_off_detail(i, Some(&frame.record), a),
                        ));
                    }
                }
                Some(&(_, _, after)) if after.checked_sub(1) != Some(i) => {
                    let position = after.saturating_sub(1);
                    return Err(
                        self.tampered(position, sequence_detail(position, i, &frame.record))
                    );
                }
                Some(_) => {}
            }
            if (i == 1) != (offset == HEADER_LEN as u64) {
                return Err(self.tampered(
                    1,
                    if i == 1 {
                        format!(
                            "record #1 ({}) is not at the start of the file (byte offset {offset})",
                            frame.record.describe()
                        )
                    } else {
                        format!(
                            "the file starts with record #{i} ({}): records were removed before it",
                            frame.record.describe()
                        )
                    },
                ));
            }
            frames.push((offset, frame.bytes_len, i));
            pos = offset;
            match stop {
                None => break,
                Some(a) if a > 0 && i == a => {
                    // One more: the anchored record must follow #a-1 (a copy of the
                    // anchored record appended after it carries the anchored MAC too).
                    if offset > HEADER_LEN as u64 {
                        let (_, before) = self.frame_ending_at(file, offset)?;
                        if before.index != a - 1 {
                            return Err(self.tampered(
                                a,
                                format!(
                                    "record #{a} ({}) follows a record with sequence number {} ({}): records were removed, inserted or reordered",
                                    frame.record.describe(),
                                    before.index,
                                    before.record.describe()
                                ),
                            ));
                        }
                    }
                    break;
                }
                _ => {}
            }
        }
        let Some(&(_, _, last)) = frames.first() else {
            // Only the header: an empty log.
            if let Some(a) = stop.filter(|a| *a > 0) {
                return Err(self.tampered(1, cut_off_detail(0, None, a)));
            }
            return Ok(Tail {
                len,
                next_index: 1,
                chain: auth.map(|(key, _)| chain_start(key, &header_bytes())),
            });
        };
        let next_index = last.checked_add(1).ok_or_else(|| {
            self.tampered(
                last,
                "the sequence number cannot grow any further".to_owned(),
            )
        })?;
        let Some((key, anchor)) = auth else {
            return Ok(Tail {
                len,
                next_index,
                chain: None,
            });
        };
        // Forward from the anchored record (or the start).
        let mut chain = chain_start(key, &header_bytes());
        for (n, &(offset, flen, i)) in frames.iter().rev().enumerate() {
            let mut bytes = vec![0u8; flen];
            file.read_exact_at(&mut bytes, offset)
                .map_err(|e| self.io(e))?;
            let frame = decode_frame(&bytes).map_err(|d| self.malformed(i, offset, d))?;
            if n == 0 && anchor.count > 0 {
                match frame.mac {
                    Some(mac) if ct_eq(&mac, &anchor.mac) => chain = mac,
                    _ => return Err(self.tampered(i, not_anchored_detail(i, &frame.record))),
                }
                continue;
            }
            if let Some(mac) = frame.mac {
                if !ct_eq(
                    &record_mac(key, &chain, &bytes[..flen - TRAILER_LEN - MAC_LEN]),
                    &mac,
                ) {
                    return Err(self.tampered(i, bad_mac_detail(i, &frame.record, None)));
                }
                chain = mac;
            } else {
                chain = chain_unauthenticated(key, &chain, &bytes);
            }
        }
        Ok(Tail {
            len,
            next_index,
            chain: Some(chain),
        })
    }

    /// Reads and decodes the frame that ends at `pos` (from its trailing length).
    fn frame_ending_at(&self, file: &File, pos: u64) -> Result<(u64, Decoded), AuditError> {
        let bad = |d: String| self.malformed(0, pos, format!("reading back from the end: {d}"));
        let room = pos - HEADER_LEN as u64;
        if room < MIN_FRAME_LEN as u64 {
            return Err(bad(format!("{room} bytes are too short for a record")));
        }
        let mut t = [0u8; 4];
        file.read_exact_at(&mut t, pos - 4)
            .map_err(|e| self.io(e))?;
        let flen = u32::from_le_bytes(t) as usize;
        if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&flen) || flen as u64 > room {
            return Err(bad(format!("trailing record length {flen} is not valid")));
        }
        let offset = pos - flen as u64;
        let mut bytes = vec![0u8; flen];
        file.read_exact_at(&mut bytes, offset)
            .map_err(|e| self.io(e))?;
        let frame = decode_frame(&bytes).map_err(bad)?;
        Ok((
            offset,
            Decoded {
                index: frame.index,
                record: frame.record,
                bytes_len: flen,
            },
        ))
    }

    /// After the tail failed to parse: scans forward; if the bytes after the last complete
    /// record are shorter than a record (a write torn by a crash), and that record is at or
    /// after `anchor_count`, truncates them. Returns whether it did; `Err` explains a damage
    /// that is not a torn tail.
    fn heal_torn_tail(
        &self,
        file: &File,
        len: u64,
        anchor_count: Option<u64>,
    ) -> Result<bool, AuditError> {
        let anchored = anchor_count.unwrap_or(0);
        let mut h = [0u8; HEADER_LEN];
        let n = read_full(&mut ReadAt::new(file, 0), &mut h).map_err(|e| self.io(e))?;
        let header_ok = n == HEADER_LEN && self.check_header(&h).is_ok();
        let (cut, what) = if header_ok {
            let mut fw = Forward::new(BufReader::new(ReadAt::new(file, HEADER_LEN as u64)));
            loop {
                match fw.next_frame() {
                    Ok(Some(_)) => {}
                    // Every record parses: the failure was not a torn tail.
                    Ok(None) => return Ok(false),
                    Err(e @ ScanError::Malformed { offset, index, .. }) => {
                        if len - offset > MAX_FRAME_LEN as u64 || index <= anchored {
                            return Err(self.scan_error(e, anchored));
                        }
                        break (offset, format!("a torn record #{index}"));
                    }
                    Err(e) => return Err(self.scan_error(e, anchored)),
                }
            }
        } else {
            // A torn first write (header and first record in one write): a header prefix
            // or zeros, no longer than that write.
            let mut all = vec![
                0u8;
                usize::try_from(len)
                    .unwrap_or(usize::MAX)
                    .min(HEADER_LEN + MAX_FRAME_LEN + 1)
            ];
            let n = read_full(&mut ReadAt::new(file, 0), &mut all).map_err(|e| self.io(e))?;
            let all = &all[..n];
            let head = &all[..n.min(HEADER_LEN)];
            let torn = len <= (HEADER_LEN + MAX_FRAME_LEN) as u64
                && anchored == 0
                && (head == &header_bytes()[..head.len()] || head.iter().all(|b| *b == 0))
                && (n < HEADER_LEN || all.iter().all(|b| *b == 0));
            if !torn {
                return Ok(false);
            }
            (0, "a torn first write".to_owned())
        };
        log::warn!(
            "audit log {}: removing {} bytes at offset {cut}, {what} left by a crash during an append",
            self.path.display(),
            len - cut
        );
        file.set_len(cut).map_err(|e| self.io(e))?;
        file.sync_all().map_err(|e| self.io(e))?;
        Ok(true)
    }

    /// Writes `frame` (after the header when `new_file`) in one write, fsyncs the file, and
    /// the directory when the file was started.
    fn write_frame(&self, mut file: &File, new_file: bool, frame: &[u8]) -> Result<(), AuditError> {
        let mut buf = Vec::with_capacity(HEADER_LEN + frame.len());
        if new_file {
            buf.extend_from_slice(&header_bytes());
        }
        buf.extend_from_slice(frame);
        file.write_all(&buf).map_err(|e| self.io(e))?;
        file.sync_all().map_err(|e| self.io(e))?;
        if new_file {
            let dir = match self.path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| self.io(e))?;
        }
        Ok(())
    }
}

/// Where the next record goes.
struct Tail {
    /// File length when it was examined (0: write the header first).
    len: u64,
    next_index: u64,
    /// The chain value the next authenticated record's MAC starts from (`None` without a
    /// key, or for a file not started yet).
    chain: Option<[u8; 32]>,
}

impl Tail {
    fn chain_for(&self, key: &SecretKey) -> [u8; 32] {
        self.chain
            .unwrap_or_else(|| chain_start(key, &header_bytes()))
    }
}

struct Decoded {
    index: u64,
    record: AuditRecord,
    bytes_len: usize,
}

fn header_bytes() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h
}

// ----- MAC chain -----

fn labeled_mac(key: &SecretKey, label: &[u8], chain: &[u8], data: &[u8]) -> [u8; 32] {
    let mut input = Vec::with_capacity(label.len() + chain.len() + data.len());
    input.extend_from_slice(label);
    input.extend_from_slice(chain);
    input.extend_from_slice(data);
    hmac_sha256(key, &input)
}

/// The chain value before the first record: binds the header.
fn chain_start(key: &SecretKey, header: &[u8; HEADER_LEN]) -> [u8; 32] {
    labeled_mac(key, LABEL_START, &[], header)
}

/// Folds an unauthenticated frame (all its bytes) into the chain value.
fn chain_unauthenticated(key: &SecretKey, chain: &[u8; 32], frame: &[u8]) -> [u8; 32] {
    labeled_mac(key, LABEL_UNAUTHENTICATED, chain, frame)
}

/// The MAC of an authenticated record: over the chain value and its frame up to the MAC.
fn record_mac(key: &SecretKey, chain: &[u8; 32], frame_prefix: &[u8]) -> [u8; 32] {
    labeled_mac(key, LABEL_RECORD, chain, frame_prefix)
}

// ----- error details -----

fn bad_mac_detail(i: u64, rec: &AuditRecord, uncovered_from: Option<u64>) -> String {
    let covers = match uncovered_from {
        Some(f) if f + 1 == i => format!(", or the unauthenticated record #{f} before it,"),
        Some(f) => format!(
            ", or one of the unauthenticated records #{f}-#{} before it,",
            i - 1
        ),
        None => String::new(),
    };
    format!(
        "the MAC of record #{i} ({}) does not match: it{covers} was changed, or the log was written under another keystore's audit key",
        rec.describe()
    )
}

fn not_anchored_detail(i: u64, rec: &AuditRecord) -> String {
    format!(
        "record #{i} ({}) is not the record the keystore anchored: the log was replaced or rewritten",
        rec.describe()
    )
}

fn sequence_detail(position: u64, found: u64, rec: &AuditRecord) -> String {
    format!(
        "the record at position #{position} ({}) carries sequence number {found}: records were removed, inserted or reordered",
        rec.describe()
    )
}

fn cut_off_detail(records: u64, last: Option<&AuditRecord>, anchored: u64) -> String {
    let ends = match last {
        Some(r) if records > 0 => format!("ends after record #{records} ({})", r.describe()),
        _ => "holds no records".to_owned(),
    };
    format!(
        "the log {ends}, but the keystore anchors {anchored} records: records #{}-#{anchored} were cut off",
        records + 1
    )
}

// ----- encoding -----

/// One record as stored; the MAC field (authenticated records) is zero, to be filled in.
fn encode_frame(rec: &AuditRecord, index: u64, authenticated: bool) -> Vec<u8> {
    let key_id = truncate_utf8(&rec.key_id, MAX_KEY_ID_LEN);
    let command = truncate_utf8(&rec.caller.command, MAX_COMMAND_LEN);
    let reason = truncate_utf8(&rec.reason, MAX_REASON_LEN);
    let mac_len = if authenticated { MAC_LEN } else { 0 };
    let len = FIXED_LEN + key_id.len() + command.len() + reason.len() + mac_len + TRAILER_LEN;
    // Bounded by MAX_FRAME_LEN, and the string lengths by their maxima.
    let len32 = (len as u32).to_le_bytes();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&len32);
    out.push(if authenticated {
        KIND_AUTHENTICATED
    } else {
        KIND_UNAUTHENTICATED
    });
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&rec.time_ms.to_le_bytes());
    out.push(rec.op as u8);
    out.push(u8::from(!rec.ok));
    out.extend_from_slice(&rec.key_version.to_le_bytes());
    out.push(u8::from(rec.volume_id.is_some()));
    out.extend_from_slice(&rec.volume_id.unwrap_or([0; 16]));
    out.extend_from_slice(&rec.caller.uid.to_le_bytes());
    out.extend_from_slice(&rec.caller.pid.to_le_bytes());
    out.push(key_id.len() as u8);
    out.push(command.len() as u8);
    out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    debug_assert_eq!(out.len(), FIXED_LEN);
    out.extend_from_slice(key_id.as_bytes());
    out.extend_from_slice(command.as_bytes());
    out.extend_from_slice(reason.as_bytes());
    out.resize(out.len() + mac_len, 0);
    out.extend_from_slice(&len32);
    debug_assert_eq!(out.len(), len);
    out
}

struct Frame {
    index: u64,
    record: AuditRecord,
    mac: Option<[u8; 32]>,
}

/// Strictly decodes one whole frame. Never panics.
fn decode_frame(b: &[u8]) -> Result<Frame, String> {
    if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&b.len()) {
        return Err(format!("a record of {} bytes is out of bounds", b.len()));
    }
    let mut c = Cursor { b, pos: 0 };
    let len = c.u32()? as usize;
    if len != b.len() {
        return Err(format!(
            "length field {len} does not match the record's {} bytes",
            b.len()
        ));
    }
    let authenticated = match c.u8()? {
        KIND_AUTHENTICATED => true,
        KIND_UNAUTHENTICATED => false,
        k => return Err(format!("unknown record kind {k}")),
    };
    let index = c.u64()?;
    if index == 0 {
        return Err("sequence number 0 is not valid".to_owned());
    }
    let time_ms = c.u64()?;
    let op_code = c.u8()?;
    let op =
        AuditOp::from_u8(op_code).ok_or_else(|| format!("unknown operation code {op_code}"))?;
    let ok = match c.u8()? {
        0 => true,
        1 => false,
        r => return Err(format!("unknown result code {r}")),
    };
    let key_version = c.u32()?;
    let has_volume = c.u8()?;
    let volume = c.array::<16>()?;
    let volume_id = match has_volume {
        1 => Some(volume),
        0 if volume == [0; 16] => None,
        0 => return Err("volume id bytes are set but the volume flag is not".to_owned()),
        f => return Err(format!("unknown volume flag {f}")),
    };
    let uid = c.u32()?;
    let pid = c.u32()?;
    let key_id_len = usize::from(c.u8()?);
    let command_len = usize::from(c.u8()?);
    let reason_len = usize::from(c.u16()?);
    if key_id_len > MAX_KEY_ID_LEN || command_len > MAX_COMMAND_LEN || reason_len > MAX_REASON_LEN {
        return Err(format!(
            "string lengths {key_id_len}/{command_len}/{reason_len} exceed {MAX_KEY_ID_LEN}/{MAX_COMMAND_LEN}/{MAX_REASON_LEN}"
        ));
    }
    let mac_len = if authenticated { MAC_LEN } else { 0 };
    let expect = FIXED_LEN + key_id_len + command_len + reason_len + mac_len + TRAILER_LEN;
    if expect != len {
        return Err(format!(
            "its fields add up to {expect} bytes, its length field says {len}"
        ));
    }
    let key_id = c.string(key_id_len, "key id")?;
    let command = c.string(command_len, "command")?;
    let reason = c.string(reason_len, "reason")?;
    let mac = if authenticated {
        Some(c.array::<32>()?)
    } else {
        None
    };
    let trailer = c.u32()? as usize;
    if trailer != len {
        return Err(format!(
            "trailing length {trailer} does not match the leading length {len}"
        ));
    }
    Ok(Frame {
        index,
        record: AuditRecord {
            time_ms,
            op,
            key_id,
            key_version,
            volume_id,
            caller: Caller { uid, pid, command },
            ok,
            reason,
        },
        mac,
    })
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| "the record ends early".to_owned())?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }
    fn string(&mut self, n: usize, what: &str) -> Result<String, String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("the {what} is not UTF-8"))
    }
}

// ----- forward scan -----

enum ScanError {
    Io(io::Error),
    /// Bytes that are not a whole, valid record (including a torn one at the end).
    Malformed {
        offset: u64,
        index: u64,
        detail: String,
    },
    /// A valid record at position `index` carrying sequence number `found`.
    Sequence {
        index: u64,
        found: u64,
        record: Box<AuditRecord>,
    },
}

struct RawFrame {
    bytes: Vec<u8>,
    frame: Frame,
}

/// Reads frames one by one from just after the header, checking sequence numbers.
struct Forward<R> {
    r: R,
    offset: u64,
    next_index: u64,
}

impl<R: Read> Forward<R> {
    fn new(r: R) -> Self {
        Self {
            r,
            offset: HEADER_LEN as u64,
            next_index: 1,
        }
    }

    fn next_frame(&mut self) -> Result<Option<RawFrame>, ScanError> {
        let (offset, index) = (self.offset, self.next_index);
        let malformed = |detail: String| ScanError::Malformed {
            offset,
            index,
            detail,
        };
        let mut lb = [0u8; 4];
        match read_full(&mut self.r, &mut lb).map_err(ScanError::Io)? {
            0 => return Ok(None),
            4 => {}
            n => {
                return Err(malformed(format!(
                    "the file ends {n} bytes into the record (torn write)"
                )));
            }
        }
        let len = u32::from_le_bytes(lb) as usize;
        if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len) {
            return Err(malformed(format!(
                "record length {len} is outside {MIN_FRAME_LEN}..={MAX_FRAME_LEN}"
            )));
        }
        let mut bytes = vec![0u8; len];
        bytes[..4].copy_from_slice(&lb);
        let n = read_full(&mut self.r, &mut bytes[4..]).map_err(ScanError::Io)?;
        if n < len - 4 {
            return Err(malformed(format!(
                "the file ends {} bytes into a record of {len} bytes (torn write)",
                n + 4
            )));
        }
        let frame = decode_frame(&bytes).map_err(malformed)?;
        if frame.index != self.next_index {
            return Err(ScanError::Sequence {
                index: self.next_index,
                found: frame.index,
                record: Box::new(frame.record),
            });
        }
        self.offset += len as u64;
        self.next_index = self.next_index.saturating_add(1);
        Ok(Some(RawFrame { bytes, frame }))
    }
}

/// Sequential reads of a file by offset (no shared file position).
struct ReadAt<'a> {
    f: &'a File,
    pos: u64,
}

impl<'a> ReadAt<'a> {
    fn new(f: &'a File, pos: u64) -> Self {
        Self { f, pos }
    }
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.f.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

// ----- small helpers -----

/// Now, unix milliseconds (0 before 1970).
#[must_use]
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Unix milliseconds as ISO 8601 UTC with milliseconds: `2026-12-01T16:53:30.123Z`.
#[must_use]
pub fn iso_utc_ms(ms: u64) -> String {
    let s = crate::time::iso_utc(ms / 1000);
    match s.strip_suffix('Z') {
        Some(base) => format!("{base}.{:03}Z", ms % 1000),
        None => s,
    }
}

/// The longest prefix of `s` of at most `max` bytes ending on a char boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `s` with control characters escaped (`\n`, `\u{1b}`).
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    use core::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: u64 = 1_796_131_565_123; // 2026-12-01T13:26:05.123Z

    fn key() -> SecretKey {
        SecretKey::from_bytes([7u8; 32])
    }

    fn caller() -> Caller {
        Caller::new(1000, 4242, "kmsfs")
    }

    fn rec(i: u64) -> AuditRecord {
        let op = AuditOp::ALL[(i as usize) % AuditOp::ALL.len()];
        AuditRecord {
            time_ms: T0 + i * 1000,
            op,
            key_id: format!("cmk-{i:016x}"),
            key_version: 1 + (i % 3) as u32,
            volume_id: i.is_multiple_of(2).then_some([i as u8; 16]),
            caller: caller(),
            ok: i % 4 != 3,
            reason: if i % 4 == 3 {
                "key cmk-x is disabled".into()
            } else {
                String::new()
            },
        }
    }

    fn failed_unlock(i: u64) -> AuditRecord {
        AuditRecord {
            time_ms: T0 + i * 1000,
            op: AuditOp::Unlock,
            key_id: String::new(),
            key_version: 0,
            volume_id: None,
            caller: caller(),
            ok: false,
            reason: "wrong passphrase or keyfile".into(),
        }
    }

    /// A log of `n` authenticated records and its anchor.
    fn fixture(n: u64) -> (tempfile::TempDir, AuditLog, Anchor) {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path().join("ks.audit"));
        let mut anchor = Anchor::default();
        for i in 1..=n {
            anchor = log.append(&key(), &anchor, &rec(i)).unwrap();
            assert_eq!(anchor.count, i);
        }
        (dir, log, anchor)
    }

    fn bytes(log: &AuditLog) -> Vec<u8> {
        std::fs::read(log.path()).unwrap()
    }

    fn put(log: &AuditLog, b: &[u8]) {
        std::fs::write(log.path(), b).unwrap();
    }

    /// Byte ranges of the records (from their leading lengths).
    fn frames(b: &[u8]) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let mut pos = HEADER_LEN;
        while pos < b.len() {
            let len = u32::from_le_bytes(b[pos..pos + 4].try_into().unwrap()) as usize;
            out.push(pos..pos + len);
            pos += len;
        }
        out
    }

    /// The record an error names (0 = the header).
    fn named(e: &AuditError) -> u64 {
        match e {
            AuditError::Tampered { index, .. } | AuditError::Malformed { index, .. } => *index,
            AuditError::UnsupportedVersion { .. } => 0,
            AuditError::Io { .. } => panic!("unexpected {e}"),
        }
    }

    /// The bytes follow docs/AUDIT-FORMAT.md, built here independently of the encoder.
    #[test]
    fn layout_matches_the_format_doc() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path().join("ks.audit"));
        let r1 = AuditRecord {
            time_ms: T0,
            op: AuditOp::GenerateDataKey,
            key_id: "cmk-00".into(),
            key_version: 3,
            volume_id: Some([0xab; 16]),
            caller: Caller::new(7, 9, "mnt"),
            ok: true,
            reason: String::new(),
        };
        let a1 = log.append(&key(), &Anchor::default(), &r1).unwrap();
        log.append_unauthenticated(&failed_unlock(2)).unwrap();
        let a3 = log.append(&key(), &a1, &rec(3)).unwrap();
        let b = bytes(&log);

        let mut want = b"KMSFSAU\0".to_vec();
        want.extend_from_slice(&[1, 0, 0, 0]);
        let record = |r: &AuditRecord, seq: u64, auth: bool| {
            let strs = [
                r.key_id.as_bytes(),
                r.caller.command.as_bytes(),
                r.reason.as_bytes(),
            ];
            let len =
                56 + strs.iter().map(|s| s.len()).sum::<usize>() + if auth { 32 } else { 0 } + 4;
            let mut v = (len as u32).to_le_bytes().to_vec();
            v.push(if auth { 1 } else { 2 });
            v.extend_from_slice(&seq.to_le_bytes());
            v.extend_from_slice(&r.time_ms.to_le_bytes());
            v.push(r.op as u8);
            v.push(if r.ok { 0 } else { 1 });
            v.extend_from_slice(&r.key_version.to_le_bytes());
            v.push(u8::from(r.volume_id.is_some()));
            v.extend_from_slice(&r.volume_id.unwrap_or_default());
            v.extend_from_slice(&r.caller.uid.to_le_bytes());
            v.extend_from_slice(&r.caller.pid.to_le_bytes());
            v.push(strs[0].len() as u8);
            v.push(strs[1].len() as u8);
            v.extend_from_slice(&(strs[2].len() as u16).to_le_bytes());
            assert_eq!(v.len(), 56);
            for s in strs {
                v.extend_from_slice(s);
            }
            v
        };
        let finish = |mut v: Vec<u8>, mac: Option<[u8; 32]>| {
            if let Some(m) = mac {
                v.extend_from_slice(&m);
            }
            let len = v[..4].to_vec();
            v.extend_from_slice(&len);
            v
        };
        let c0 = hmac_sha256(&key(), &[&b"kmsfs-audit-v1-start\0"[..], &want].concat());
        let p1 = record(&r1, 1, true);
        let m1 = hmac_sha256(
            &key(),
            &[&b"kmsfs-audit-v1-record\0"[..], &c0, &p1].concat(),
        );
        let f2 = finish(record(&failed_unlock(2), 2, false), None);
        let c2 = hmac_sha256(
            &key(),
            &[&b"kmsfs-audit-v1-unauthenticated\0"[..], &m1, &f2].concat(),
        );
        let p3 = record(&rec(3), 3, true);
        let m3 = hmac_sha256(
            &key(),
            &[&b"kmsfs-audit-v1-record\0"[..], &c2, &p3].concat(),
        );
        want.extend_from_slice(&finish(p1, Some(m1)));
        want.extend_from_slice(&f2);
        want.extend_from_slice(&finish(p3, Some(m3)));
        assert_eq!(b, want);
        assert_eq!(a1, Anchor { count: 1, mac: m1 });
        assert_eq!(a3, Anchor { count: 3, mac: m3 });
        assert_eq!(&b[12..16], &(56u32 + 6 + 3 + 32 + 4).to_le_bytes());
    }

    #[test]
    fn op_names_and_codes() {
        assert_eq!(AuditOp::ALL.len(), 18);
        for (n, op) in AuditOp::ALL.iter().enumerate() {
            assert_eq!(*op as u8 as usize, n + 1);
            assert_eq!(AuditOp::from_u8(*op as u8), Some(*op));
            assert_eq!(AuditOp::from_name(op.name()), Some(*op));
            assert!(
                op.name()
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '-')
            );
        }
        assert_eq!(AuditOp::GenerateDataKey.name(), "generate-data-key");
        assert_eq!(AuditOp::from_name(" Re-Encrypt "), Some(AuditOp::ReEncrypt));
        assert_eq!(AuditOp::from_u8(0), None);
        assert_eq!(AuditOp::from_u8(19), None);
        assert_eq!(AuditOp::from_name("generate_data_key"), None);
    }

    #[test]
    fn frame_roundtrip_and_bounds() {
        for i in 0..8 {
            for auth in [true, false] {
                let r = rec(i);
                let f = encode_frame(&r, i + 1, auth);
                let d = decode_frame(&f).unwrap();
                assert_eq!(d.record, r);
                assert_eq!(d.index, i + 1);
                assert_eq!(d.mac.is_some(), auth);
            }
        }
        // Long strings are truncated on a char boundary, to the longest frame.
        let mut r = rec(3);
        r.key_id = "é".repeat(100);
        r.caller.command = "ü".repeat(100);
        r.reason = "€".repeat(1000);
        let f = encode_frame(&r, 1, true);
        assert_eq!(f.len(), MAX_FRAME_LEN - 1); // 341 three-byte chars = 1023
        let d = decode_frame(&f).unwrap().record;
        assert_eq!(d.key_id, "é".repeat(32));
        assert_eq!(d.caller.command, "ü".repeat(32));
        assert_eq!(d.reason, "€".repeat(341));
        let c = Caller::new(1, 2, &"ab€".repeat(30));
        assert!(c.command.len() <= MAX_COMMAND_LEN && c.command.ends_with('b'));
        let r = AuditRecord::new(
            AuditOp::Decrypt,
            &"k".repeat(70),
            2,
            None,
            &caller(),
            Err("x".repeat(2000)),
        );
        assert_eq!((r.key_id.len(), r.reason.len(), r.ok), (64, 1024, false));
        assert!(r.time_ms > T0 - 100_000_000_000);
        let ok = AuditRecord::new(AuditOp::List, "", 0, None, &caller(), Ok(()));
        assert!(ok.ok && ok.reason.is_empty());
        // Unknown values are refused.
        let good = encode_frame(&rec(1), 1, false);
        for (at, v, what) in [
            (4, 3, "kind"),
            (13, 0, "sequence"),
            (21, 0, "operation"),
            (21, 19, "operation"),
            (22, 2, "result"),
            (27, 2, "volume flag"),
        ] {
            let mut b = good.clone();
            if what == "sequence" {
                b[5..13].fill(0);
            } else {
                b[at] = v;
            }
            assert!(decode_frame(&b).is_err(), "{what}");
        }
        assert!(decode_frame(&good[..good.len() - 1]).is_err());
        assert!(decode_frame(&[]).is_err());
        let d = AuditRecord {
            key_id: "\u{1b}[2J".into(),
            ..rec(1)
        };
        let f = encode_frame(&d, 1, true);
        assert_eq!(decode_frame(&f).unwrap().record.key_id, "\u{1b}[2J");
    }

    #[test]
    fn caller_current() {
        let c = Caller::current();
        assert_eq!(c.pid, std::process::id());
        assert_eq!(c.uid, nix::unistd::getuid().as_raw());
        assert!(!c.command.is_empty() && c.command.len() <= MAX_COMMAND_LEN);
        assert_eq!(Caller::of_process(c.uid, c.pid).command, c.command);
        let a = Anchor {
            count: 0x0102,
            mac: [9; 32],
        };
        assert_eq!(Anchor::from_bytes(&a.to_bytes()), a);
    }

    #[test]
    fn append_then_verify() {
        let (_d, log, anchor) = fixture(10);
        let rep = log.verify(&key(), &anchor).unwrap();
        assert_eq!(
            (
                rep.records,
                rep.authenticated,
                rep.unanchored_tail,
                rep.uncovered_tail
            ),
            (10, 10, 0, 0)
        );
        assert_eq!(rep.tail_anchor, anchor);
        let all = log.read_all().unwrap();
        assert_eq!(all.len(), 10);
        let (prefix, e) = log.read_prefix();
        assert!(e.is_none());
        assert_eq!(prefix, all);
        for (n, s) in all.iter().enumerate() {
            assert_eq!(s.index, n as u64 + 1);
            assert_eq!(s.record, rec(n as u64 + 1));
            assert!(s.authenticated);
        }
        let b = bytes(&log);
        assert_eq!(&b[..HEADER_LEN], b"KMSFSAU\0\x01\x00\x00\x00");
        assert_eq!(frames(&b).len(), 10);
    }

    #[test]
    fn every_flipped_byte_is_detected_and_named() {
        let (_d, log, anchor) = fixture(5);
        let good = bytes(&log);
        let ranges = frames(&good);
        for pos in 0..good.len() {
            let k = ranges
                .iter()
                .position(|r| r.contains(&pos))
                .map_or(0, |n| n as u64 + 1);
            for x in [0x01u8, 0x80] {
                let mut b = good.clone();
                b[pos] ^= x;
                put(&log, &b);
                let e = log.verify(&key(), &anchor).unwrap_err();
                assert_eq!(named(&e), k, "byte {pos} ^ {x:#x}: {e}");
                if k > 0 {
                    assert!(matches!(e, AuditError::Tampered { .. }), "byte {pos}: {e}");
                }
            }
        }
    }

    #[test]
    fn removed_records_are_detected() {
        for k in 1..=5u64 {
            let (_d, log, anchor) = fixture(5);
            let mut b = bytes(&log);
            let r = frames(&b)[k as usize - 1].clone();
            b.drain(r);
            put(&log, &b);
            let e = log.verify(&key(), &anchor).unwrap_err();
            assert_eq!(named(&e), k, "{e}");
            assert!(matches!(e, AuditError::Tampered { .. }), "{e}");
            let msg = e.to_string();
            if k == 5 {
                assert!(msg.contains("cut off"), "{msg}");
            } else {
                assert!(msg.contains("removed, inserted or reordered"), "{msg}");
                // The record found there is named by its time and operation.
                assert!(msg.contains(&rec(k + 1).describe()), "{msg}");
            }
        }
    }

    #[test]
    fn swapped_records_are_detected() {
        for k in 1..5usize {
            let (_d, log, anchor) = fixture(5);
            let b = bytes(&log);
            let f = frames(&b);
            let mut out = b[..f[k - 1].start].to_vec();
            out.extend_from_slice(&b[f[k].clone()]);
            out.extend_from_slice(&b[f[k - 1].clone()]);
            out.extend_from_slice(&b[f[k].end..]);
            put(&log, &out);
            let e = log.verify(&key(), &anchor).unwrap_err();
            assert_eq!(named(&e), k as u64, "{e}");
            assert!(matches!(e, AuditError::Tampered { .. }));
            assert!(matches!(log.read_all(), Err(AuditError::Tampered { .. })));
            let (before, e) = log.read_prefix();
            assert_eq!(before.len(), k - 1);
            assert!(matches!(e, Some(AuditError::Tampered { .. })));
        }
    }

    #[test]
    fn inserted_copies_are_detected() {
        for (copy, at) in [(1usize, 2usize), (4, 3), (2, 5), (5, 6)] {
            let (_d, log, anchor) = fixture(5);
            let b = bytes(&log);
            let f = frames(&b);
            let at_byte = if at > 5 { b.len() } else { f[at - 1].start };
            let mut out = b[..at_byte].to_vec();
            out.extend_from_slice(&b[f[copy - 1].clone()]);
            out.extend_from_slice(&b[at_byte..]);
            put(&log, &out);
            let e = log.verify(&key(), &anchor).unwrap_err();
            assert_eq!(named(&e), at as u64, "copy of #{copy} at #{at}: {e}");
            // append checks the anchored record, the one before it and all after it: it
            // refuses a copy there; one further back is verify's job.
            if at >= 5 {
                let before = bytes(&log);
                assert!(log.append(&key(), &anchor, &rec(9)).is_err());
                assert_eq!(bytes(&log), before);
            } else {
                log.append(&key(), &anchor, &rec(9)).unwrap();
                assert_eq!(named(&log.verify(&key(), &anchor).unwrap_err()), at as u64);
            }
        }
    }

    #[test]
    fn cut_off_tail_is_named() {
        let (_d, log, anchor) = fixture(4);
        let b = bytes(&log);
        let f = frames(&b);
        put(&log, &b[..f[3].start]);
        let e = log.verify(&key(), &anchor).unwrap_err();
        assert_eq!(named(&e), 4);
        let msg = e.to_string();
        assert!(msg.contains("ends after record #3"), "{msg}");
        assert!(msg.contains(&rec(3).describe()), "{msg}");
        assert!(msg.contains("#4-#4 were cut off"), "{msg}");
        assert!(msg.contains(&log.path().display().to_string()), "{msg}");
        // Only the header left, an empty file, no file.
        put(&log, &b[..HEADER_LEN]);
        assert_eq!(named(&log.verify(&key(), &anchor).unwrap_err()), 1);
        put(&log, &[]);
        assert_eq!(named(&log.verify(&key(), &anchor).unwrap_err()), 1);
        std::fs::remove_file(log.path()).unwrap();
        let e = log.verify(&key(), &anchor).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        // append refuses and does not create the file.
        assert!(matches!(
            log.append(&key(), &anchor, &rec(5)),
            Err(AuditError::Tampered { index: 1, .. })
        ));
        assert!(!log.path().exists());
    }

    #[test]
    fn torn_anchored_record_is_tampering() {
        let (_d, log, anchor) = fixture(4);
        let b = bytes(&log);
        let f = frames(&b);
        for cut in [f[3].start + 1, f[3].start + 30, f[3].end - 1] {
            put(&log, &b[..cut]);
            let e = log.verify(&key(), &anchor).unwrap_err();
            assert!(
                matches!(e, AuditError::Tampered { index: 4, .. }),
                "cut at {cut}: {e}"
            );
            let e = log.read_all().unwrap_err();
            assert!(
                matches!(e, AuditError::Malformed { index: 4, offset, .. } if offset == f[3].start as u64),
                "{e}"
            );
            // append does not "heal" an anchored record away.
            assert!(matches!(
                log.append(&key(), &anchor, &rec(5)),
                Err(AuditError::Tampered { index: 4, .. })
            ));
            assert_eq!(bytes(&log), &b[..cut]);
        }
    }

    #[test]
    fn torn_unanchored_record_is_healed_by_the_next_append() {
        let (_d, log, anchor) = fixture(3);
        let anchored_len = bytes(&log).len();
        // A crash during the 4th append: part of it on disk, no new anchor.
        let _lost = log.append(&key(), &anchor, &rec(4)).unwrap();
        let b = bytes(&log);
        for cut in [
            anchored_len + 1,
            anchored_len + 3,
            anchored_len + 40,
            b.len() - 1,
        ] {
            put(&log, &b[..cut]);
            let e = log.verify(&key(), &anchor).unwrap_err();
            assert!(
                matches!(e, AuditError::Malformed { index: 4, offset, .. } if offset == anchored_len as u64),
                "{e}"
            );
            assert!(e.to_string().contains("crash"), "{e}");
        }
        // A torn record that is all zeros (a file extended without its data).
        let mut z = b[..anchored_len].to_vec();
        z.resize(b.len(), 0);
        put(&log, &z);
        assert!(log.verify(&key(), &anchor).is_err());
        let a4 = log.append(&key(), &anchor, &rec(5)).unwrap();
        assert_eq!(a4.count, 4);
        let rep = log.verify(&key(), &a4).unwrap();
        assert_eq!((rep.records, rep.unanchored_tail), (4, 0));
        assert_eq!(log.read_all().unwrap()[3].record, rec(5));
        // An unauthenticated append heals too.
        let b = bytes(&log);
        put(&log, &[&b[..], &b[b.len() - 50..b.len() - 10]].concat());
        log.append_unauthenticated(&failed_unlock(6)).unwrap();
        let rep = log.verify(&key(), &a4).unwrap();
        assert_eq!((rep.records, rep.uncovered_tail), (5, 1));
        // Garbage longer than a record is not a torn write: refused.
        let b = bytes(&log);
        put(&log, &[&b[..], &[0xAAu8; MAX_FRAME_LEN + 1][..]].concat());
        assert!(matches!(
            log.append(&key(), &a4, &rec(7)),
            Err(AuditError::Malformed { index: 6, .. })
        ));
    }

    #[test]
    fn torn_first_write_is_healed() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path().join("a.audit"));
        let full = [&header_bytes()[..], &encode_frame(&rec(1), 1, true)].concat();
        for torn in [
            &full[..3],
            &full[..HEADER_LEN],
            &full[..HEADER_LEN + 7],
            &[0u8; 40][..],
        ] {
            put(&log, torn);
            let a = log.append(&key(), &Anchor::default(), &rec(1)).unwrap();
            assert_eq!(a.count, 1);
            assert_eq!(log.verify(&key(), &a).unwrap().records, 1);
            std::fs::remove_file(log.path()).unwrap();
        }
        // Not a kmsfs audit log: refused, untouched.
        put(&log, b"hello, this is not an audit log at all");
        let e = log.append(&key(), &Anchor::default(), &rec(1)).unwrap_err();
        assert!(matches!(e, AuditError::Malformed { index: 0, .. }), "{e}");
        assert!(e.to_string().contains("the file header"), "{e}");
        assert_eq!(bytes(&log), b"hello, this is not an audit log at all");
        // A newer version.
        let mut h = header_bytes();
        h[8] = 2;
        put(&log, &h);
        let e = log.read_all().unwrap_err();
        assert!(e.to_string().contains("upgrade kmsfs"), "{e}");
        assert!(log.append(&key(), &Anchor::default(), &rec(1)).is_err());
    }

    #[test]
    fn unauthenticated_records_are_covered_by_the_next_mac() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path().join("ks.audit"));
        let a1 = log.append(&key(), &Anchor::default(), &rec(1)).unwrap();
        log.append_unauthenticated(&failed_unlock(2)).unwrap();
        log.append_unauthenticated(&failed_unlock(3)).unwrap();
        let a4 = log.append(&key(), &a1, &rec(4)).unwrap();
        assert_eq!(a4.count, 4);
        let rep = log.verify(&key(), &a4).unwrap();
        assert_eq!(
            (
                rep.records,
                rep.authenticated,
                rep.unanchored_tail,
                rep.uncovered_tail
            ),
            (4, 2, 0, 0)
        );
        let all = log.read_all().unwrap();
        assert_eq!(
            all.iter().map(|s| s.authenticated).collect::<Vec<_>>(),
            [true, false, false, true]
        );
        assert_eq!(all[1].record, failed_unlock(2));
        let good = bytes(&log);
        let f = frames(&good);
        // Removed.
        let mut b = good.clone();
        b.drain(f[1].clone());
        put(&log, &b);
        assert_eq!(named(&log.verify(&key(), &a4).unwrap_err()), 2);
        // Removed and the later records renumbered: the MAC of #3 (was #4) fails.
        let mut b = good.clone();
        b.drain(f[2].clone());
        let r = f[2].start..f[2].start + (f[3].end - f[3].start);
        b[r.start + 5..r.start + 13].copy_from_slice(&3u64.to_le_bytes());
        put(&log, &b);
        let e = log.verify(&key(), &a4).unwrap_err();
        assert_eq!(named(&e), 3, "{e}");
        // Edited (its reason): the covering MAC of #4 fails and names the span.
        let mut b = good.clone();
        b[f[2].end - 6] ^= 0x01;
        put(&log, &b);
        let e = log.verify(&key(), &a4).unwrap_err();
        assert_eq!(named(&e), 4, "{e}");
        assert!(e.to_string().contains("#2-#3"), "{e}");
    }

    #[test]
    fn unauthenticated_tail_is_unanchored_but_valid() {
        let (_d, log, anchor) = fixture(2);
        log.append_unauthenticated(&failed_unlock(3)).unwrap();
        log.append_unauthenticated(&failed_unlock(4)).unwrap();
        let rep = log.verify(&key(), &anchor).unwrap();
        assert_eq!(
            (
                rep.records,
                rep.authenticated,
                rep.unanchored_tail,
                rep.uncovered_tail
            ),
            (4, 2, 2, 2)
        );
        assert_eq!(rep.tail_anchor, anchor);
        assert!(
            rep.to_string().contains("not yet covered by a MAC"),
            "{rep}"
        );
        // Not yet covered: removing the last one is not detectable (documented).
        let b = bytes(&log);
        let f = frames(&b);
        put(&log, &b[..f[3].start]);
        assert_eq!(log.verify(&key(), &anchor).unwrap().records, 3);
        // A sequence gap inside the tail is.
        let mut out = b[..f[2].start].to_vec();
        out.extend_from_slice(&b[f[3].clone()]);
        put(&log, &out);
        assert_eq!(named(&log.verify(&key(), &anchor).unwrap_err()), 3);
        // Reading without the key works too (e.g. before a failed unlock is retried).
        put(&log, &b);
        assert_eq!(log.read_all().unwrap().len(), 4);
        // A log of only failed unlocks, then the first authenticated record.
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path().join("x.audit"));
        log.append_unauthenticated(&failed_unlock(1)).unwrap();
        assert_eq!(
            log.verify(&key(), &Anchor::default())
                .unwrap()
                .uncovered_tail,
            1
        );
        let a = log.append(&key(), &Anchor::default(), &rec(2)).unwrap();
        assert_eq!(a.count, 2);
        assert_eq!(log.verify(&key(), &a).unwrap().authenticated, 1);
    }

    #[test]
    fn append_refuses_a_log_behind_or_diverging() {
        let (_d, log, anchor) = fixture(3);
        let good = bytes(&log);
        let f = frames(&good);
        // Behind: the anchored record was cut off.
        put(&log, &good[..f[2].start]);
        let e = log.append(&key(), &anchor, &rec(4)).unwrap_err();
        assert!(matches!(e, AuditError::Tampered { index: 3, .. }), "{e}");
        assert!(e.to_string().contains("cut off"), "{e}");
        assert_eq!(bytes(&log), &good[..f[2].start]);
        // Diverging: another MAC, a count beyond the log, another key.
        put(&log, &good);
        for (k, a) in [
            (
                key(),
                Anchor {
                    mac: [1; 32],
                    ..anchor
                },
            ),
            (key(), Anchor { count: 2, ..anchor }),
            (key(), Anchor { count: 9, ..anchor }),
            (SecretKey::from_bytes([8; 32]), Anchor::default()),
        ] {
            let e = log.append(&k, &a, &rec(4)).unwrap_err();
            assert!(matches!(e, AuditError::Tampered { .. }), "{e}");
            assert!(log.verify(&k, &a).is_err());
            assert_eq!(bytes(&log), good);
        }
        // A forged record after the anchor (made with another key).
        let other = AuditLog::new(log.path().with_extension("other"));
        let mut oa = Anchor::default();
        for i in 1..=4 {
            oa = other
                .append(&SecretKey::from_bytes([8; 32]), &oa, &rec(i))
                .unwrap();
        }
        let ob = bytes(&other);
        let forged = [&good[..], &ob[frames(&ob)[3].clone()]].concat();
        put(&log, &forged);
        let e = log.append(&key(), &anchor, &rec(5)).unwrap_err();
        assert!(matches!(e, AuditError::Tampered { index: 4, .. }), "{e}");
        assert_eq!(named(&log.verify(&key(), &anchor).unwrap_err()), 4);
        assert_eq!(bytes(&log), forged);
        // A whole log of another keystore, anchored with ours: refused.
        put(&log, &ob);
        assert!(log.append(&key(), &anchor, &rec(5)).is_err());
        assert!(log.verify(&key(), &anchor).is_err());
    }

    #[test]
    fn crash_window_keeps_the_old_anchor_valid() {
        let (_d, log, a3) = fixture(3);
        // Appended, but the keystore kept a3.
        let a4 = log.append(&key(), &a3, &rec(4)).unwrap();
        let rep = log.verify(&key(), &a3).unwrap();
        assert_eq!((rep.records, rep.unanchored_tail), (4, 1));
        assert_eq!(rep.tail_anchor, a4);
        // The next append with the old anchor chains after #4.
        let a5 = log.append(&key(), &a3, &rec(5)).unwrap();
        assert_eq!(a5.count, 5);
        let rep = log.verify(&key(), &a5).unwrap();
        assert_eq!((rep.records, rep.unanchored_tail), (5, 0));
        assert!(log.verify(&key(), &a4).is_ok());
        // An empty anchor (first append's anchor never stored) also chains.
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path().join("y.audit"));
        log.append(&key(), &Anchor::default(), &rec(1)).unwrap();
        let a2 = log.append(&key(), &Anchor::default(), &rec(2)).unwrap();
        assert_eq!(a2.count, 2);
        assert_eq!(
            log.verify(&key(), &Anchor::default())
                .unwrap()
                .unanchored_tail,
            2
        );
        assert_eq!(log.verify(&key(), &a2).unwrap().unanchored_tail, 0);
    }

    #[test]
    fn missing_or_empty_log_with_empty_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path().join("none.audit"));
        assert_eq!(
            log.verify(&key(), &Anchor::default()).unwrap(),
            VerifyReport::default()
        );
        assert!(log.read_all().unwrap().is_empty());
        put(&log, &[]);
        assert_eq!(log.verify(&key(), &Anchor::default()).unwrap().records, 0);
        let a = log.append(&key(), &Anchor::default(), &rec(1)).unwrap();
        assert_eq!(log.verify(&key(), &a).unwrap().records, 1);
        // A wrong key: record #1 is named, with the other-keystore hint.
        let e = log.verify(&SecretKey::from_bytes([1; 32]), &a).unwrap_err();
        assert_eq!(named(&e), 1);
        assert!(e.to_string().contains("another keystore"), "{e}");
        assert!(e.to_string().contains(&rec(1).describe()), "{e}");
    }

    #[test]
    fn file_is_0600_and_links_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let (d, log, anchor) = fixture(1);
        let mode = std::fs::metadata(log.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let link = AuditLog::new(d.path().join("link.audit"));
        std::os::unix::fs::symlink(log.path(), link.path()).unwrap();
        for e in [
            link.append(&key(), &anchor, &rec(2)).unwrap_err(),
            link.append_unauthenticated(&failed_unlock(2)).unwrap_err(),
            link.read_all().unwrap_err(),
            link.verify(&key(), &anchor).unwrap_err(),
        ] {
            assert!(matches!(e, AuditError::Io { .. }), "{e}");
            assert!(e.to_string().contains("symbolic link"), "{e}");
        }
        let dir_log = AuditLog::new(d.path().to_path_buf());
        assert!(matches!(dir_log.read_all(), Err(AuditError::Io { .. })));
        assert_eq!(log.read_all().unwrap().len(), 1);
    }

    #[test]
    fn filter_table_and_json() {
        let recs: Vec<StoredRecord> = (1..=4)
            .map(|i| StoredRecord {
                index: i,
                record: rec(i),
                authenticated: i != 2,
            })
            .collect();
        let f = AuditFilter {
            op: Some(rec(3).op),
            ..AuditFilter::default()
        };
        assert_eq!(recs.iter().filter(|s| f.matches(&s.record)).count(), 1);
        let f = AuditFilter {
            since_ms: Some(T0 + 2000),
            until_ms: Some(T0 + 3000),
            ..AuditFilter::default()
        };
        let hits: Vec<u64> = recs
            .iter()
            .filter(|s| f.matches(&s.record))
            .map(|s| s.index)
            .collect();
        assert_eq!(hits, [2, 3]);
        let f = AuditFilter {
            key: Some(rec(4).key_id),
            volume: Some([4; 16]),
            ..AuditFilter::default()
        };
        assert_eq!(recs.iter().filter(|s| f.matches(&s.record)).count(), 1);
        assert!(AuditFilter::default().matches(&rec(1)));

        let mut evil = recs.clone();
        evil[0].record.caller.command = "x\u{1b}[2J\ny".into();
        let t = format_table(&evil);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert!(lines[0].starts_with("#  TIME"), "{t}");
        for h in ["OP", "KEY", "VOLUME", "UID", "PID", "COMMAND", "RESULT"] {
            assert!(lines[0].contains(h));
        }
        assert!(lines[1].contains("2026-12-01T13:26:06.123Z"), "{t}");
        assert!(lines[1].contains("x\\u{1b}[2J\\ny"), "{t}");
        assert!(lines[3].contains("refused: key cmk-x is disabled"), "{t}");
        assert!(lines[2].contains(&hex(&[2; 16])), "{t}");
        assert!(lines[1].contains(&format!("{}:2", rec(1).key_id)), "{t}");
        assert!(!t.contains('\u{1b}'));
        assert_eq!(format_table(&[]).lines().count(), 1);

        let j = to_json(&recs[2]);
        assert_eq!(j["index"], 3);
        assert_eq!(j["time"], "2026-12-01T13:26:08.123Z");
        assert_eq!(j["op"], rec(3).op.name());
        assert_eq!(j["result"], "refused");
        assert_eq!(j["reason"], "key cmk-x is disabled");
        assert_eq!(j["volume_id"], serde_json::Value::Null);
        assert_eq!(j["uid"], 1000);
        assert_eq!(j["pid"], 4242);
        assert_eq!(j["command"], "kmsfs");
        assert_eq!(j["key_version"], 1);
        assert_eq!(to_json(&recs[1])["authenticated"], false);
        assert_eq!(to_json(&recs[1])["volume_id"], hex(&[2; 16]));
        assert_eq!(iso_utc_ms(0), "1970-01-01T00:00:00.000Z");
        assert!(iso_utc_ms(u64::MAX).starts_with("unix time"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Any bytes, with or without a valid header in front: errors, never panics.
        #[test]
        fn garbage_never_panics(
            body in proptest::collection::vec(any::<u8>(), 0..3000),
            with_header in any::<bool>(),
            count in 0u64..4,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let log = AuditLog::new(dir.path().join("g.audit"));
            let b = if with_header { [&header_bytes()[..], &body].concat() } else { body };
            put(&log, &b);
            let anchor = Anchor { count, mac: [3; 32] };
            let _ = log.read_all();
            let _ = log.verify(&key(), &anchor);
            let _ = log.verify(&key(), &Anchor::default());
            let _ = log.append(&key(), &anchor, &rec(1));
            let _ = log.append(&key(), &Anchor::default(), &rec(1));
            let _ = log.append_unauthenticated(&failed_unlock(1));
            let _ = decode_frame(&b);
        }

        /// Any change to an anchored log (a byte changed, a cut, a byte inserted) is found,
        /// also inside unauthenticated records covered by a later MAC.
        #[test]
        fn any_change_to_an_anchored_log_is_detected(
            pos in any::<prop::sample::Index>(),
            x in 1u8..=255,
            kind in 0u8..3,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let log = AuditLog::new(dir.path().join("c.audit"));
            let mut a = Anchor::default();
            for i in 1..=6 {
                if i % 3 == 2 {
                    log.append_unauthenticated(&failed_unlock(i)).unwrap();
                } else {
                    a = log.append(&key(), &a, &rec(i)).unwrap();
                }
            }
            prop_assert_eq!(a.count, 6);
            let mut b = bytes(&log);
            let p = pos.index(b.len());
            match kind {
                0 => b[p] ^= x,
                1 => b.truncate(p),
                _ => b.insert(p, x),
            }
            put(&log, &b);
            prop_assert!(log.verify(&key(), &a).is_err());
            // A cut always reaches the tail, which append checks (other changes before
            // the anchored record are verify's job: append reads only the tail).
            if kind == 1 {
                let before = bytes(&log);
                prop_assert!(log.append(&key(), &a, &rec(7)).is_err());
                prop_assert_eq!(bytes(&log), before);
            }
        }
    }
}
