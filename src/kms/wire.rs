//! The KMS daemon's wire protocol (`kmsfs kms serve` ⇄ `--kms unix:PATH`), version 1.
//! Every byte is specified in `docs/KMS-PROTOCOL.md`; this module is the one codec both
//! sides use.
//!
//! A frame is `u32 LE length` + body. Requests are at most [`MAX_REQUEST`] bytes,
//! responses at most [`MAX_RESPONSE`]. Integers are little-endian; a `str`/`bytes` is a
//! `u32 LE` length then the bytes; an `opt<T>` is a byte 0 (absent) or 1 then `T`.

use std::io::{self, Read, Write};

use zeroize::Zeroizing;

use super::audit::{Anchor, AuditOp, AuditRecord, Caller, StoredRecord, VerifyReport};
use super::import::{ImportParams, WrappingSpec};
use super::{
    EncryptionContext, KeyChange, KeyInfo, KeyKind, KeyOrigin, KeyState, KmsError, VersionInfo,
    VolumeBinding, WrappedKey,
};

/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Largest request body, bytes.
pub const MAX_REQUEST: usize = 64 << 10;
/// Largest response body, bytes (an audit log listing can be long).
pub const MAX_RESPONSE: usize = 64 << 20;

/// Response status: success.
pub const STATUS_OK: u8 = 0;
/// Response status: error.
pub const STATUS_ERR: u8 = 1;

/// Request operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Who the daemon is and who it sees.
    Ping = 1,
    /// `Kms::generate_data_key`.
    GenerateDataKey = 2,
    /// `Kms::decrypt`.
    Decrypt = 3,
    /// `Kms::re_encrypt`.
    ReEncrypt = 4,
    /// `Kms::generation_mark`.
    GenerationMark = 5,
    /// `Kms::record_generation`.
    RecordGeneration = 6,
    /// `Kms::note_volume`.
    NoteVolume = 7,
    /// `Kms::list_keys`.
    ListKeys = 8,
    /// `Kms::describe_key`.
    DescribeKey = 9,
    /// `Kms::create_key`.
    CreateKey = 10,
    /// `Kms::change_key`.
    ChangeKey = 11,
    /// `Kms::import_params`.
    ImportParams = 12,
    /// `Kms::import_material`.
    ImportMaterial = 13,
    /// `Kms::audit_records`.
    AuditRecords = 14,
}

impl Op {
    /// The operation numbered `v`.
    #[must_use]
    pub fn from_u8(v: u8) -> Option<Self> {
        use Op::*;
        [
            Ping,
            GenerateDataKey,
            Decrypt,
            ReEncrypt,
            GenerationMark,
            RecordGeneration,
            NoteVolume,
            ListKeys,
            DescribeKey,
            CreateKey,
            ChangeKey,
            ImportParams,
            ImportMaterial,
            AuditRecords,
        ]
        .into_iter()
        .find(|o| *o as u8 == v)
    }
}

/// A malformed frame or field.
#[derive(Debug)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

// ----- frames -----------------------------------------------------------------------

/// Writes one frame.
///
/// # Errors
/// I/O errors.
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("frame too long"))?;
    let mut out = Zeroizing::new(Vec::with_capacity(4 + body.len()));
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(body);
    w.write_all(&out)?;
    w.flush()
}

/// What [`read_frame`] found.
pub enum Frame {
    /// A body.
    Body(Zeroizing<Vec<u8>>),
    /// The peer closed the connection before the first byte of a frame.
    Closed,
}

/// Reads one frame of at most `max` bytes. A length over `max` is an
/// [`io::ErrorKind::InvalidData`] error before anything more is read.
///
/// # Errors
/// I/O errors, a cut-off frame (`UnexpectedEof`), an oversized one (`InvalidData`).
pub fn read_frame(r: &mut impl Read, max: usize) -> io::Result<Frame> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(Frame::Closed),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes, more than the {max} allowed"),
        ));
    }
    let mut body = Zeroizing::new(vec![0u8; len]);
    r.read_exact(&mut body)?;
    Ok(Frame::Body(body))
}

// ----- fields -----------------------------------------------------------------------

/// Builds a body. Zeroized on drop (bodies may hold data keys).
#[derive(Default)]
pub struct Enc(pub Zeroizing<Vec<u8>>);

impl Enc {
    /// A body starting with the protocol version and `first` (op or status).
    #[must_use]
    pub fn start(first: u8) -> Self {
        let mut e = Self::default();
        e.u8(VERSION);
        e.u8(first);
        e
    }
    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    /// `u16 LE`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// `u32 LE`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// `u64 LE`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Fixed-length bytes, no prefix.
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// `u32 LE` length, bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.raw(b)
    }
    /// A string as bytes.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }
    /// `opt<str>`.
    pub fn opt_str(&mut self, s: Option<&str>) -> &mut Self {
        match s {
            None => self.u8(0),
            Some(s) => self.u8(1).str(s),
        }
    }
    /// `opt<u64>`.
    pub fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(v) => self.u8(1).u64(v),
        }
    }
    /// `opt<u32>`.
    pub fn opt_u32(&mut self, v: Option<u32>) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(v) => self.u8(1).u32(v),
        }
    }
    /// A count of items (`u32 LE`).
    pub fn count(&mut self, n: usize) -> &mut Self {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX))
    }
    /// `context`: count, then (key str, value str) in key order.
    pub fn ctx(&mut self, c: &EncryptionContext) -> &mut Self {
        self.count(c.iter().count());
        for (k, v) in c.iter() {
            self.str(k).str(v);
        }
        self
    }
    /// `wrapped`: cmk id str, version u32, ciphertext bytes.
    pub fn wrapped(&mut self, w: &WrappedKey) -> &mut Self {
        self.str(&w.cmk_id).u32(w.cmk_version).bytes(&w.ciphertext)
    }
    /// `keyinfo` (see the protocol document).
    pub fn key_info(&mut self, k: &KeyInfo) -> &mut Self {
        self.str(&k.id)
            .opt_str(k.alias.as_deref())
            .str(&k.description)
            .u64(k.created)
            .u8(k.state as u8)
            .opt_u64(k.deletion_date)
            .u8(k.kind as u8)
            .u8(k.origin as u8)
            .count(k.versions.len());
        for v in &k.versions {
            self.u32(v.version)
                .u64(v.created)
                .u8(u8::from(v.has_material));
        }
        self.opt_u32(k.primary_version)
            .opt_u64(k.material_expires)
            .opt_u64(k.import_params_expire)
            .count(k.volumes.len());
        for b in &k.volumes {
            self.raw(&b.volume_id)
                .str(&b.cmk_id)
                .str(&b.path)
                .u64(b.updated);
        }
        self
    }
    /// `record` (a stored audit record).
    pub fn record(&mut self, s: &StoredRecord) -> &mut Self {
        let r = &s.record;
        self.u64(s.index)
            .u8(u8::from(s.authenticated))
            .u64(r.time_ms)
            .u8(r.op as u8)
            .str(&r.key_id)
            .u32(r.key_version);
        match &r.volume_id {
            None => self.u8(0),
            Some(v) => self.u8(1).raw(v),
        };
        self.u32(r.caller.uid)
            .u32(r.caller.pid)
            .str(&r.caller.command)
            .u8(u8::from(r.ok))
            .str(&r.reason)
    }
}

/// Reads a body.
pub struct Dec<'a> {
    b: &'a [u8],
    pos: usize,
}

type R<T> = Result<T, Malformed>;

impl<'a> Dec<'a> {
    /// Reads `b` from the start.
    #[must_use]
    pub fn new(b: &'a [u8]) -> Self {
        Self { b, pos: 0 }
    }
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| {
                Malformed(format!(
                    "the body ends at byte {} but a field of {n} bytes starts at byte {}",
                    self.b.len(),
                    self.pos
                ))
            })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    /// One byte.
    pub fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    /// `u16 LE`.
    pub fn u16(&mut self) -> R<u16> {
        let mut a = [0u8; 2];
        a.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(a))
    }
    /// `u32 LE`.
    pub fn u32(&mut self) -> R<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    /// `u64 LE`.
    pub fn u64(&mut self) -> R<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    /// 16 bytes (a volume id).
    pub fn id16(&mut self) -> R<[u8; 16]> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(a)
    }
    /// `u32 LE` length, bytes.
    pub fn bytes(&mut self) -> R<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// A UTF-8 string.
    pub fn str(&mut self) -> R<String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| Malformed("a string is not UTF-8".into()))
    }
    fn flag(&mut self) -> R<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(Malformed(format!("an option flag is {v}, not 0 or 1"))),
        }
    }
    /// `opt<str>`.
    pub fn opt_str(&mut self) -> R<Option<String>> {
        if self.flag()? {
            Ok(Some(self.str()?))
        } else {
            Ok(None)
        }
    }
    /// `opt<u64>`.
    pub fn opt_u64(&mut self) -> R<Option<u64>> {
        if self.flag()? {
            Ok(Some(self.u64()?))
        } else {
            Ok(None)
        }
    }
    /// `opt<u32>`.
    pub fn opt_u32(&mut self) -> R<Option<u32>> {
        if self.flag()? {
            Ok(Some(self.u32()?))
        } else {
            Ok(None)
        }
    }
    /// A count of items, each at least `min_item` bytes long (so a forged count cannot
    /// make the reader reserve more than the body holds).
    pub fn count(&mut self, min_item: usize) -> R<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item.max(1)) > self.b.len() - self.pos {
            return Err(Malformed(format!(
                "a count of {n} items does not fit in the body"
            )));
        }
        Ok(n)
    }
    /// `context`.
    pub fn ctx(&mut self) -> R<EncryptionContext> {
        let n = self.count(8)?;
        let mut c = EncryptionContext::new();
        for _ in 0..n {
            let k = self.str()?;
            let v = self.str()?;
            c = c.with(&k, &v);
        }
        Ok(c)
    }
    /// `wrapped`.
    pub fn wrapped(&mut self) -> R<WrappedKey> {
        Ok(WrappedKey {
            cmk_id: self.str()?,
            cmk_version: self.u32()?,
            ciphertext: self.bytes()?.to_vec(),
        })
    }
    /// `keyinfo`.
    pub fn key_info(&mut self) -> R<KeyInfo> {
        let id = self.str()?;
        let alias = self.opt_str()?;
        let description = self.str()?;
        let created = self.u64()?;
        let state = KeyState::from_u8(self.u8()?).ok_or_else(|| Malformed("key state".into()))?;
        let deletion_date = self.opt_u64()?;
        let kind = KeyKind::from_u8(self.u8()?).ok_or_else(|| Malformed("key kind".into()))?;
        let origin =
            KeyOrigin::from_u8(self.u8()?).ok_or_else(|| Malformed("key origin".into()))?;
        let n = self.count(13)?;
        let mut versions = Vec::with_capacity(n);
        for _ in 0..n {
            versions.push(VersionInfo {
                version: self.u32()?,
                created: self.u64()?,
                has_material: self.flag()?,
            });
        }
        let primary_version = self.opt_u32()?;
        let material_expires = self.opt_u64()?;
        let import_params_expire = self.opt_u64()?;
        let n = self.count(32)?;
        let mut volumes = Vec::with_capacity(n);
        for _ in 0..n {
            volumes.push(VolumeBinding {
                volume_id: self.id16()?,
                cmk_id: self.str()?,
                path: self.str()?,
                updated: self.u64()?,
            });
        }
        Ok(KeyInfo {
            id,
            alias,
            description,
            created,
            state,
            deletion_date,
            kind,
            origin,
            versions,
            primary_version,
            material_expires,
            import_params_expire,
            volumes,
        })
    }
    /// `record`.
    pub fn record(&mut self) -> R<StoredRecord> {
        let index = self.u64()?;
        let authenticated = self.flag()?;
        let time_ms = self.u64()?;
        let op = AuditOp::from_u8(self.u8()?).ok_or_else(|| Malformed("audit op".into()))?;
        let key_id = self.str()?;
        let key_version = self.u32()?;
        let volume_id = if self.flag()? {
            Some(self.id16()?)
        } else {
            None
        };
        let uid = self.u32()?;
        let pid = self.u32()?;
        let command = self.str()?;
        let ok = self.flag()?;
        let reason = self.str()?;
        let mut record = AuditRecord::new(
            op,
            &key_id,
            key_version,
            volume_id,
            &Caller::new(uid, pid, &command),
            if ok { Ok(()) } else { Err(reason) },
        );
        record.time_ms = time_ms;
        Ok(StoredRecord {
            index,
            record,
            authenticated,
        })
    }
    /// Fails unless every byte was read.
    pub fn end(&self) -> R<()> {
        if self.pos == self.b.len() {
            Ok(())
        } else {
            Err(Malformed(format!(
                "{} bytes after the last field",
                self.b.len() - self.pos
            )))
        }
    }
}

// ----- values used by both sides ----------------------------------------------------

/// `change` kinds on the wire (`u8`, then `u32 days`, 0 unless scheduling a deletion).
#[must_use]
pub fn change_code(c: KeyChange) -> (u8, u32) {
    match c {
        KeyChange::Enable => (1, 0),
        KeyChange::Disable => (2, 0),
        KeyChange::Rotate => (3, 0),
        KeyChange::ScheduleDeletion { days } => (4, days),
        KeyChange::CancelDeletion => (5, 0),
        KeyChange::DeleteMaterial => (6, 0),
    }
}

/// The inverse of [`change_code`].
///
/// # Errors
/// An unknown kind.
pub fn change_of(code: u8, days: u32) -> R<KeyChange> {
    Ok(match code {
        1 => KeyChange::Enable,
        2 => KeyChange::Disable,
        3 => KeyChange::Rotate,
        4 => KeyChange::ScheduleDeletion { days },
        5 => KeyChange::CancelDeletion,
        6 => KeyChange::DeleteMaterial,
        v => return Err(Malformed(format!("unknown key change {v}"))),
    })
}

/// `WrappingSpec` on the wire.
///
/// # Errors
/// An unknown spec.
pub fn wrapping_of(code: u8) -> R<WrappingSpec> {
    match code {
        1 => Ok(WrappingSpec::Rsa3072),
        2 => Ok(WrappingSpec::Rsa4096),
        v => Err(Malformed(format!("unknown wrapping spec {v}"))),
    }
}

/// Encodes `ImportParams`: pem str, token bytes, expires u64.
pub fn import_params(e: &mut Enc, p: &ImportParams) {
    e.str(&p.public_key_pem).bytes(&p.token).u64(p.expires);
}

/// Decodes what [`import_params`] wrote.
///
/// # Errors
/// Malformed fields.
pub fn read_import_params(d: &mut Dec<'_>) -> R<ImportParams> {
    Ok(ImportParams {
        public_key_pem: d.str()?,
        token: d.bytes()?.to_vec(),
        expires: d.u64()?,
    })
}

/// Encodes the result of `audit_records`.
pub fn audit(e: &mut Enc, report: &Result<VerifyReport, String>, records: &[StoredRecord]) {
    match report {
        Ok(r) => {
            e.u8(1)
                .u64(r.records)
                .u64(r.authenticated)
                .u64(r.unanchored_tail)
                .u64(r.uncovered_tail)
                .u64(r.tail_anchor.count)
                .raw(&r.tail_anchor.mac);
        }
        Err(msg) => {
            e.u8(0).str(msg);
        }
    }
    e.count(records.len());
    for r in records {
        e.record(r);
    }
}

/// Audit records and the verification result, as `Kms::audit_records` returns them.
pub type AuditListing = (Result<VerifyReport, String>, Vec<StoredRecord>);

/// Decodes what [`audit`] wrote.
///
/// # Errors
/// Malformed fields.
pub fn read_audit(d: &mut Dec<'_>) -> R<AuditListing> {
    let report = if d.flag()? {
        let records = d.u64()?;
        let authenticated = d.u64()?;
        let unanchored_tail = d.u64()?;
        let uncovered_tail = d.u64()?;
        let count = d.u64()?;
        let mut mac = [0u8; 32];
        mac.copy_from_slice(d.take(32)?);
        Ok(VerifyReport {
            records,
            authenticated,
            unanchored_tail,
            uncovered_tail,
            tail_anchor: Anchor { count, mac },
        })
    } else {
        Err(d.str()?)
    };
    let n = d.count(40)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(d.record()?);
    }
    Ok((report, out))
}

// ----- errors -----------------------------------------------------------------------

/// An error response: `code u8, message str, a str, b str, n u64` (see the protocol
/// document for what `a`, `b` and `n` hold per code). The message is the server's
/// [`KmsError`] text, so the client can always show it unchanged.
pub fn error(e: &KmsError) -> Enc {
    let (code, a, b, n): (u8, String, String, u64) = match e {
        KmsError::WrongPassphrase { path } => (1, path.clone(), String::new(), 0),
        KmsError::Corrupt { path, detail } => (2, path.clone(), detail.clone(), 0),
        KmsError::UnsupportedVersion {
            path,
            found,
            supported,
        } => (
            3,
            path.clone(),
            String::new(),
            u64::from(*found) << 16 | u64::from(*supported),
        ),
        KmsError::UnlockMismatch {
            path,
            expected,
            given: _,
        } => (4, path.clone(), (*expected).to_owned(), 0),
        KmsError::Keyfile { path, detail } => (5, path.clone(), detail.clone(), 0),
        KmsError::KeyNotFound(k) => (6, k.clone(), String::new(), 0),
        KmsError::KeyVersionNotFound { id, version } => {
            (7, id.clone(), String::new(), u64::from(*version))
        }
        KmsError::KeyDisabled(k) => (8, k.clone(), String::new(), 0),
        KmsError::KeyPendingDeletion { id, deletion_date } => {
            (9, id.clone(), String::new(), *deletion_date)
        }
        KmsError::KeyDeleted(k) => (10, k.clone(), String::new(), 0),
        KmsError::KeyPendingImport(k) => (11, k.clone(), String::new(), 0),
        KmsError::ServiceKey { id, what } => (12, id.clone(), (*what).to_owned(), 0),
        KmsError::Refused(_) => (13, String::new(), String::new(), 0),
        KmsError::Import(_) => (14, String::new(), String::new(), 0),
        KmsError::Audit(_) => (15, String::new(), String::new(), 0),
        KmsError::UnsafePermissions { path, .. } => (16, path.clone(), String::new(), 0),
        KmsError::Unsupported(_) => (17, String::new(), String::new(), 0),
        KmsError::UnwrapFailed => (18, String::new(), String::new(), 0),
        KmsError::AliasInUse(a) => (19, a.clone(), String::new(), 0),
        KmsError::InvalidKeyName(a) => (20, a.clone(), String::new(), 0),
        KmsError::Io { path, .. } => (21, path.clone(), String::new(), 0),
        KmsError::InvalidParams(m) => (22, m.clone(), String::new(), 0),
        // Kinds added later: their message, read back as `Refused`.
        #[allow(unreachable_patterns)]
        _ => (255, String::new(), String::new(), 0),
    };
    let mut enc = Enc::start(STATUS_ERR);
    enc.u8(code).str(&e.to_string()).str(&a).str(&b).u64(n);
    enc
}

/// The error response `code` with only a message (policy denials, malformed requests,
/// a busy daemon), read back as [`KmsError::Refused`].
#[must_use]
pub fn refusal(message: &str) -> Enc {
    let mut enc = Enc::start(STATUS_ERR);
    enc.u8(13).str(message).str("").str("").u64(0);
    enc
}

/// The inverse of [`error`], as far as the variants allow: the key-state errors and
/// `UnwrapFailed` come back as themselves; the others whose fields cannot cross the
/// socket come back as [`KmsError::Refused`] holding the server's message unchanged.
///
/// # Errors
/// Malformed fields.
pub fn read_error(d: &mut Dec<'_>) -> R<KmsError> {
    let code = d.u8()?;
    let message = d.str()?;
    let a = d.str()?;
    let b = d.str()?;
    let n = d.u64()?;
    let statik = |s: &str, options: &[&'static str]| options.iter().copied().find(|o| *o == s);
    Ok(match code {
        1 => KmsError::WrongPassphrase { path: a },
        2 => KmsError::Corrupt { path: a, detail: b },
        3 => KmsError::UnsupportedVersion {
            path: a,
            found: u16::try_from(n >> 16 & 0xffff).unwrap_or(0),
            supported: u16::try_from(n & 0xffff).unwrap_or(0),
        },
        4 => match statik(&b, &["passphrase", "keyfile"]) {
            Some(expected) => KmsError::UnlockMismatch {
                path: a,
                expected,
                given: if expected == "passphrase" {
                    "keyfile"
                } else {
                    "passphrase"
                },
            },
            None => KmsError::Refused(message),
        },
        5 => KmsError::Keyfile { path: a, detail: b },
        6 => KmsError::KeyNotFound(a),
        7 => KmsError::KeyVersionNotFound {
            id: a,
            version: u32::try_from(n).unwrap_or(u32::MAX),
        },
        8 => KmsError::KeyDisabled(a),
        9 => KmsError::KeyPendingDeletion {
            id: a,
            deletion_date: n,
        },
        10 => KmsError::KeyDeleted(a),
        11 => KmsError::KeyPendingImport(a),
        18 => KmsError::UnwrapFailed,
        19 => KmsError::AliasInUse(a),
        20 => KmsError::InvalidKeyName(a),
        21 => KmsError::Io {
            path: a.clone(),
            source: io::Error::other(
                message
                    .strip_prefix(&format!("keystore I/O error on {a}: "))
                    .unwrap_or(&message)
                    .to_owned(),
            ),
        },
        22 => KmsError::InvalidParams(a),
        // Refused, Import, Audit, UnsafePermissions, Unsupported, ServiceKey and any code
        // of a newer server: the message as the server said it.
        _ => KmsError::Refused(message),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_round_trip_with_their_messages() {
        let cases = vec![
            KmsError::KeyDisabled("cmk-1".into()),
            KmsError::KeyPendingDeletion {
                id: "cmk-2".into(),
                deletion_date: 1_900_000_000,
            },
            KmsError::KeyDeleted("cmk-3".into()),
            KmsError::KeyPendingImport("cmk-4".into()),
            KmsError::KeyNotFound("nope".into()),
            KmsError::UnwrapFailed,
            KmsError::Refused("uid 1000 may not decrypt".into()),
            KmsError::KeyVersionNotFound {
                id: "cmk-5".into(),
                version: 7,
            },
            KmsError::AliasInUse("a".into()),
            KmsError::Unsupported("x"),
            KmsError::ServiceKey {
                id: "cmk-6".into(),
                what: "disabled",
            },
            KmsError::UnsupportedVersion {
                path: "/k".into(),
                found: 9,
                supported: 2,
            },
            KmsError::Io {
                path: "/k".into(),
                source: io::Error::other("boom"),
            },
        ];
        for e in cases {
            let enc = error(&e);
            let mut d = Dec::new(&enc.0);
            assert_eq!(d.u8().unwrap(), VERSION);
            assert_eq!(d.u8().unwrap(), STATUS_ERR);
            let back = read_error(&mut d).unwrap();
            d.end().unwrap();
            assert_eq!(back.to_string(), e.to_string());
            assert_eq!(
                std::mem::discriminant(&back) == std::mem::discriminant(&e),
                !matches!(e, KmsError::Unsupported(_) | KmsError::ServiceKey { .. }),
                "{e:?} -> {back:?}"
            );
        }
    }

    #[test]
    fn forged_counts_and_lengths_are_refused() {
        let mut e = Enc::default();
        e.u32(u32::MAX);
        assert!(Dec::new(&e.0).count(1).is_err());
        assert!(Dec::new(&e.0).bytes().is_err());
        assert!(Dec::new(&e.0).ctx().is_err());
        let mut r = &[0xffu8, 0xff, 0xff, 0x7f][..];
        assert!(read_frame(&mut r, MAX_REQUEST).is_err());
    }

    #[test]
    fn key_info_and_records_round_trip() {
        let k = KeyInfo {
            id: "cmk-0011223344556677".into(),
            alias: Some("backup-a".into()),
            description: "d".into(),
            created: 5,
            state: KeyState::PendingDeletion,
            deletion_date: Some(9),
            kind: KeyKind::User,
            origin: KeyOrigin::Imported,
            versions: vec![VersionInfo {
                version: 1,
                created: 5,
                has_material: true,
            }],
            primary_version: Some(1),
            material_expires: None,
            import_params_expire: Some(3),
            volumes: vec![VolumeBinding {
                volume_id: [7; 16],
                cmk_id: "cmk-0011223344556677".into(),
                path: "/v".into(),
                updated: 8,
            }],
        };
        let mut e = Enc::default();
        e.key_info(&k);
        let mut d = Dec::new(&e.0);
        assert_eq!(d.key_info().unwrap(), k);
        d.end().unwrap();
        let rec = StoredRecord {
            index: 3,
            record: AuditRecord::new(
                AuditOp::Decrypt,
                "cmk-1",
                2,
                Some([1; 16]),
                &Caller::new(65534, 42, "kmsfs"),
                Err("denied".into()),
            ),
            authenticated: true,
        };
        let mut e = Enc::default();
        audit(
            &mut e,
            &Err("bad record 2".into()),
            std::slice::from_ref(&rec),
        );
        let mut d = Dec::new(&e.0);
        let (rep, recs) = read_audit(&mut d).unwrap();
        assert_eq!(rep, Err("bad record 2".into()));
        assert_eq!(recs, vec![rec]);
    }
}
