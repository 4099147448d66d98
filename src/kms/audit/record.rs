//! The byte encoding of the audit log (`docs/AUDIT-FORMAT.md`): the file header, record
//! frames, the HMAC chain inputs, and the forward scan of frames with their sequence
//! numbers. No file handling (see `log`).

use std::io::{self, Read};

use super::{AuditOp, AuditRecord, Caller};
use crate::crypto::{SecretKey, hmac_sha256};

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
pub(super) const FIXED_LEN: usize = 56;
pub(super) const MAC_LEN: usize = 32;
pub(super) const TRAILER_LEN: usize = 4;
/// Shortest frame: an unauthenticated record with empty strings.
pub(super) const MIN_FRAME_LEN: usize = FIXED_LEN + TRAILER_LEN;
/// Longest frame: an authenticated record with every string at its bound (1244 bytes).
pub(super) const MAX_FRAME_LEN: usize =
    FIXED_LEN + MAX_KEY_ID_LEN + MAX_COMMAND_LEN + MAX_REASON_LEN + MAC_LEN + TRAILER_LEN;

const KIND_AUTHENTICATED: u8 = 1;
const KIND_UNAUTHENTICATED: u8 = 2;

/// Domain-separation labels, one per kind of HMAC input (each ends with a NUL).
const LABEL_START: &[u8] = b"kmsfs-audit-v1-start\0";
const LABEL_UNAUTHENTICATED: &[u8] = b"kmsfs-audit-v1-unauthenticated\0";
const LABEL_RECORD: &[u8] = b"kmsfs-audit-v1-record\0";

pub(super) fn header_bytes() -> [u8; HEADER_LEN] {
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
pub(super) fn chain_start(key: &SecretKey, header: &[u8; HEADER_LEN]) -> [u8; 32] {
    labeled_mac(key, LABEL_START, &[], header)
}

/// Folds an unauthenticated frame (all its bytes) into the chain value.
pub(super) fn chain_unauthenticated(key: &SecretKey, chain: &[u8; 32], frame: &[u8]) -> [u8; 32] {
    labeled_mac(key, LABEL_UNAUTHENTICATED, chain, frame)
}

/// The MAC of an authenticated record: over the chain value and its frame up to the MAC.
pub(super) fn record_mac(key: &SecretKey, chain: &[u8; 32], frame_prefix: &[u8]) -> [u8; 32] {
    labeled_mac(key, LABEL_RECORD, chain, frame_prefix)
}

// ----- encoding -----

/// One record as stored; the MAC field (authenticated records) is zero, to be filled in.
pub(super) fn encode_frame(rec: &AuditRecord, index: u64, authenticated: bool) -> Vec<u8> {
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

pub(super) struct Frame {
    pub(super) index: u64,
    pub(super) record: AuditRecord,
    pub(super) mac: Option<[u8; 32]>,
}

/// Strictly decodes one whole frame. Never panics.
pub(super) fn decode_frame(b: &[u8]) -> Result<Frame, String> {
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

pub(super) enum ScanError {
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

pub(super) struct RawFrame {
    pub(super) bytes: Vec<u8>,
    pub(super) frame: Frame,
}

/// Reads frames one by one from just after the header, checking sequence numbers.
pub(super) struct Forward<R> {
    r: R,
    offset: u64,
    next_index: u64,
}

impl<R: Read> Forward<R> {
    pub(super) fn new(r: R) -> Self {
        Self {
            r,
            offset: HEADER_LEN as u64,
            next_index: 1,
        }
    }

    pub(super) fn next_frame(&mut self) -> Result<Option<RawFrame>, ScanError> {
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

/// Reads until `buf` is full or end of file; returns the bytes read.
pub(super) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
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

/// The longest prefix of `s` of at most `max` bytes ending on a char boundary.
pub(super) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
