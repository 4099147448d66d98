//! Byte-exact encoding of send streams (docs/STREAM-FORMAT.md): frames with a
//! length and a chained SHA-256 check each, and the payload of every frame type.
//!
//! No I/O here: the sender (`volume::send`) builds payloads with these encoders
//! and frames them with [`FrameWriter`]; the receiver (`volume::receive`) reads
//! frames with [`FrameReader`] and decodes payloads with the decoders, which
//! never trust a length they read.

use sha2::{Digest, Sha256};

use super::{BlockKind, BlockPtr, Dec, DecodeError, Enc, PTR_LEN, RECORD_HEADER_LEN, derr};

/// Magic at the start of every stream (the BEGIN payload) and in the check.
pub const STREAM_MAGIC: &[u8; 8] = b"KMSFSSTR";
/// Current stream format version.
pub const STREAM_VERSION: u16 = 1;
/// Frame prefix: type (1) and payload length (4).
pub const FRAME_PREFIX_LEN: usize = 5;
/// Length of the chained check that ends every frame.
pub const CHECK_LEN: usize = 32;
/// Largest payload a frame may announce (a root record with thousands of
/// snapshots fits; anything larger is refused before it is allocated).
pub const MAX_FRAME_PAYLOAD: usize = 64 << 20;
/// Length of a snapshot token (an opaque keyed identity).
pub const TOKEN_LEN: usize = 16;

/// Frame types.
pub mod frame {
    pub const BEGIN: u8 = 1;
    pub const HEADER: u8 = 2;
    pub const BLOCK: u8 = 3;
    pub const REF: u8 = 4;
    pub const ROOT: u8 = 5;
    pub const END: u8 = 6;
}

/// BEGIN flag: the stream is incremental (it needs its base in the target).
pub const FLAG_INCREMENTAL: u16 = 1;
/// BEGIN flag: a compact incremental: it carries only the records its base
/// lacks, so the target must hold the base with exactly `base_tree`.
pub const FLAG_COMPACT: u16 = 2;

/// The check of a frame: SHA-256 over the magic, the previous frame's check,
/// the frame's index in the stream, its type, length and payload. Chaining
/// makes a dropped, repeated, reordered or altered frame fail its check.
pub fn frame_check(prev: &[u8; 32], index: u64, ftype: u8, payload: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(STREAM_MAGIC);
    h.update(prev);
    h.update(index.to_le_bytes());
    h.update([ftype]);
    h.update((payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.finalize().into()
}

/// SHA-256 of `b` (state file checksums, stream ids).
pub fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// Writes frames: the chain state of a stream being produced.
pub struct FrameWriter {
    pub index: u64,
    pub prev: [u8; 32],
}

impl Default for FrameWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameWriter {
    pub fn new() -> Self {
        FrameWriter {
            index: 0,
            prev: [0; 32],
        }
    }
    /// The bytes of the next frame (and advances the chain).
    pub fn frame(&mut self, ftype: u8, payload: &[u8]) -> Vec<u8> {
        let check = frame_check(&self.prev, self.index, ftype, payload);
        let mut out = Vec::with_capacity(FRAME_PREFIX_LEN + payload.len() + CHECK_LEN);
        out.push(ftype);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(payload);
        out.extend_from_slice(&check);
        self.prev = check;
        self.index += 1;
        out
    }
}

/// The fixed part of a BEGIN frame. The fields up to `total_bytes` are the
/// stream's identity: `stream_id` is their SHA-256, so a resumed stream can be
/// matched with the interrupted one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    pub flags: u16,
    pub source_volume: [u8; 16],
    pub key_domain: [u8; 16],
    pub target_volume: [u8; 16],
    pub block_size: u32,
    pub segment_size: u32,
    pub snapshot_token: [u8; TOKEN_LEN],
    pub snapshot_generation: u64,
    pub snapshot_tree: BlockPtr,
    /// Zero for a full stream.
    pub base_token: [u8; TOKEN_LEN],
    pub base_tree: Option<BlockPtr>,
    /// Frames of the whole stream, BEGIN and END included.
    pub total_frames: u64,
    /// Bytes of the BLOCK records (segment records) the stream carries.
    pub total_bytes: u64,
    /// Index of the frame that follows BEGIN (0 = a stream from the start,
    /// whose next frame is 1); a resumed stream continues at this index.
    pub resume_index: u64,
    /// The check of frame `resume_index - 1` of the original stream.
    pub resume_check: [u8; 32],
}

/// Length of the BEGIN payload.
pub const BEGIN_LEN: usize = 8 + 2 + 2 + 16 * 3 + 4 + 4 + 16 + 8 + PTR_LEN + 16 + PTR_LEN + 8 + 8;
/// Bytes of the BEGIN payload covered by the stream id.
const BEGIN_ID_LEN: usize = BEGIN_LEN;
/// Full BEGIN payload: identity, stream id, resume point.
pub const BEGIN_FULL_LEN: usize = BEGIN_ID_LEN + 32 + 8 + 32;

impl Begin {
    fn identity(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(BEGIN_ID_LEN);
        e.bytes(STREAM_MAGIC)
            .u16(STREAM_VERSION)
            .u16(self.flags)
            .bytes(&self.source_volume)
            .bytes(&self.key_domain)
            .bytes(&self.target_volume)
            .u32(self.block_size)
            .u32(self.segment_size)
            .bytes(&self.snapshot_token)
            .u64(self.snapshot_generation);
        self.snapshot_tree.encode(&mut e);
        e.bytes(&self.base_token);
        match &self.base_tree {
            Some(p) => p.encode(&mut e),
            None => {
                e.bytes(&[0; PTR_LEN]);
            }
        }
        e.u64(self.total_frames).u64(self.total_bytes);
        e.buf
    }
    /// The stream's identity: equal for every run of the same send.
    pub fn stream_id(&self) -> [u8; 32] {
        sha256(&self.identity())
    }
    pub fn is_incremental(&self) -> bool {
        self.flags & FLAG_INCREMENTAL != 0
    }
    pub fn is_compact(&self) -> bool {
        self.flags & FLAG_COMPACT != 0
    }
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.identity();
        b.extend_from_slice(&self.stream_id());
        b.extend_from_slice(&self.resume_index.to_le_bytes());
        b.extend_from_slice(&self.resume_check);
        b
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Dec::new(b);
        if d.take(8)? != STREAM_MAGIC {
            return derr("not a kmsfs send stream (bad magic)");
        }
        let v = d.u16()?;
        if v != STREAM_VERSION {
            return derr(format!(
                "stream format version {v} is not supported by this kmsfs (version {STREAM_VERSION}); use the same kmsfs version to send and receive"
            ));
        }
        let flags = d.u16()?;
        if flags & !(FLAG_INCREMENTAL | FLAG_COMPACT) != 0
            || (flags & FLAG_COMPACT != 0 && flags & FLAG_INCREMENTAL == 0)
        {
            return derr(format!("unknown stream flags {flags:#x}"));
        }
        let source_volume = d.array()?;
        let key_domain = d.array()?;
        let target_volume = d.array()?;
        let block_size = d.u32()?;
        let segment_size = d.u32()?;
        let snapshot_token = d.array()?;
        let snapshot_generation = d.u64()?;
        let snapshot_tree = BlockPtr::decode(&mut d)?;
        let base_token = d.array()?;
        let base_raw: [u8; PTR_LEN] = d.array()?;
        let base_tree = if flags & FLAG_INCREMENTAL != 0 {
            Some(BlockPtr::from_bytes(&base_raw)?)
        } else {
            if base_raw != [0; PTR_LEN] || base_token != [0; TOKEN_LEN] {
                return derr("a full stream names a base");
            }
            None
        };
        let total_frames = d.u64()?;
        let total_bytes = d.u64()?;
        let id: [u8; 32] = d.array()?;
        let resume_index = d.u64()?;
        let resume_check = d.array()?;
        d.finish()?;
        let begin = Begin {
            flags,
            source_volume,
            key_domain,
            target_volume,
            block_size,
            segment_size,
            snapshot_token,
            snapshot_generation,
            snapshot_tree,
            base_token,
            base_tree,
            total_frames,
            total_bytes,
            resume_index,
            resume_check,
        };
        if begin.stream_id() != id {
            return derr("the stream id does not match the stream's fields");
        }
        if total_frames < 4 {
            return derr("the stream announces fewer frames than any stream has");
        }
        if resume_index == 1 || resume_index >= total_frames {
            return derr("the resume point is outside the stream");
        }
        Ok(begin)
    }
}

/// A BLOCK frame: a segment record to place at (segment, offset).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockFrame<'a> {
    pub segment: u64,
    pub offset: u32,
    pub record: &'a [u8],
}

/// What a segment record's plaintext header says, and its tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordFacts {
    pub kind: BlockKind,
    pub block_id: [u8; 16],
    pub tag: [u8; 16],
}

/// Checks a segment record's framing (its length field, kind) and returns its
/// plaintext facts. Nothing here needs a key.
pub fn record_facts(rec: &[u8]) -> Result<RecordFacts, DecodeError> {
    if rec.len() < RECORD_HEADER_LEN + 16 {
        return derr(format!(
            "segment record of {} bytes is too short",
            rec.len()
        ));
    }
    let mut d = Dec::new(rec);
    let n = d.u32()? as usize;
    if n + 4 != rec.len() {
        return derr(format!(
            "segment record says {} bytes but has {}",
            n + 4,
            rec.len()
        ));
    }
    let kind = BlockKind::from_u8(d.u8()?)
        .ok_or_else(|| DecodeError("segment record of an unknown kind".into()))?;
    let block_id = d.array()?;
    let tag = rec[rec.len() - 16..].try_into().expect("16 bytes");
    Ok(RecordFacts {
        kind,
        block_id,
        tag,
    })
}

impl<'a> BlockFrame<'a> {
    pub fn encode(segment: u64, offset: u32, record: &[u8]) -> Vec<u8> {
        let mut e = Enc::with_capacity(12 + record.len());
        e.u64(segment).u32(offset).bytes(record);
        e.buf
    }
    pub fn decode(b: &'a [u8]) -> Result<(Self, RecordFacts), DecodeError> {
        let mut d = Dec::new(b);
        let segment = d.u64()?;
        let offset = d.u32()?;
        let record = d.take(d.remaining())?;
        let facts = record_facts(record)?;
        Ok((
            BlockFrame {
                segment,
                offset,
                record,
            },
            facts,
        ))
    }
}

/// A REF frame: a record the target already holds (by block id and tag),
/// to be at (segment, offset) with this length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefFrame {
    pub segment: u64,
    pub offset: u32,
    pub len: u32,
    pub kind: BlockKind,
    pub block_id: [u8; 16],
    pub tag: [u8; 16],
}

pub const REF_LEN: usize = 8 + 4 + 4 + 1 + 16 + 16;

impl RefFrame {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(REF_LEN);
        e.u64(self.segment)
            .u32(self.offset)
            .u32(self.len)
            .u8(self.kind as u8)
            .bytes(&self.block_id)
            .bytes(&self.tag);
        e.buf
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Dec::new(b);
        let r = RefFrame {
            segment: d.u64()?,
            offset: d.u32()?,
            len: d.u32()?,
            kind: BlockKind::from_u8(d.u8()?)
                .ok_or_else(|| DecodeError("REF of an unknown block kind".into()))?,
            block_id: d.array()?,
            tag: d.array()?,
        };
        d.finish()?;
        Ok(r)
    }
}

/// A snapshot as the receiver tracks it: its opaque token and tree pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapRef {
    pub token: [u8; TOKEN_LEN],
    pub tree: BlockPtr,
}

const SNAPREF_LEN: usize = TOKEN_LEN + PTR_LEN;

fn encode_snaprefs(e: &mut Enc, v: &[SnapRef]) {
    e.u32(v.len() as u32);
    for s in v {
        e.bytes(&s.token);
        s.tree.encode(e);
    }
}

fn decode_snaprefs(d: &mut Dec) -> Result<Vec<SnapRef>, DecodeError> {
    let n = d.u32()? as usize;
    if n > d.remaining() / SNAPREF_LEN {
        return derr("snapshot count larger than the frame");
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(SnapRef {
            token: d.array()?,
            tree: BlockPtr::decode(d)?,
        });
    }
    Ok(v)
}

/// A ROOT frame: one candidate root record for the target. The receiver
/// uses the first candidate whose `requires` it holds unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootFrame {
    /// Snapshots (token and tree) the target must hold for this record.
    pub requires: Vec<SnapRef>,
    /// The snapshots the record lists (the target's state after it).
    pub lists: Vec<SnapRef>,
    /// Generation of the root record (also in its prefix).
    pub generation: u64,
    /// The sealed root record, as it goes into a root slot.
    pub record: Vec<u8>,
}

impl RootFrame {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        encode_snaprefs(&mut e, &self.requires);
        encode_snaprefs(&mut e, &self.lists);
        e.u64(self.generation).bytes32(&self.record);
        e.buf
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Dec::new(b);
        let requires = decode_snaprefs(&mut d)?;
        let lists = decode_snaprefs(&mut d)?;
        let generation = d.u64()?;
        let record = d.bytes32()?.to_vec();
        d.finish()?;
        let (vid_gen, _) = match super::split_root(&record) {
            Ok((_, g, _, _)) => (g, ()),
            Err(e) => return derr(format!("root record in the stream: {e}")),
        };
        if vid_gen != generation {
            return derr("the root record's generation differs from its frame's");
        }
        Ok(RootFrame {
            requires,
            lists,
            generation,
            record,
        })
    }
}

/// The END frame: what the stream held, checked against what was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct End {
    pub frames: u64,
    pub blocks: u64,
    pub refs: u64,
    pub block_bytes: u64,
}

impl End {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(32);
        e.u64(self.frames)
            .u64(self.blocks)
            .u64(self.refs)
            .u64(self.block_bytes);
        e.buf
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Dec::new(b);
        let r = End {
            frames: d.u64()?,
            blocks: d.u64()?,
            refs: d.u64()?,
            block_bytes: d.u64()?,
        };
        d.finish()?;
        Ok(r)
    }
}

/// A record the receiving side holds: where, and what it authenticates as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldRecord {
    pub segment: u64,
    pub offset: u32,
    pub len: u32,
    pub kind: BlockKind,
    pub block_id: [u8; 16],
    pub tag: [u8; 16],
}

const HELD_LEN: usize = REF_LEN;

impl HeldRecord {
    fn encode(&self, e: &mut Enc) {
        e.u64(self.segment)
            .u32(self.offset)
            .u32(self.len)
            .u8(self.kind as u8)
            .bytes(&self.block_id)
            .bytes(&self.tag);
    }
    fn decode(d: &mut Dec) -> Result<Self, DecodeError> {
        Ok(HeldRecord {
            segment: d.u64()?,
            offset: d.u32()?,
            len: d.u32()?,
            kind: BlockKind::from_u8(d.u8()?)
                .ok_or_else(|| DecodeError("held record of an unknown kind".into()))?,
            block_id: d.array()?,
            tag: d.array()?,
        })
    }
}

/// Length of an encoded held record.
pub const HELD_RECORD_LEN: usize = HELD_LEN;

impl HeldRecord {
    /// The 49 bytes of one held record (an entry of `kmsfs.recv/records`).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(HELD_LEN);
        self.encode(&mut e);
        e.buf
    }
    /// The first `count` records of a journal of held records.
    pub fn decode_journal(b: &[u8], count: u64) -> Result<Vec<Self>, DecodeError> {
        if count > (b.len() / HELD_LEN) as u64 {
            return derr(format!(
                "{RECV_RECORDS_FILE} holds fewer records than {RECV_PROGRESS_FILE} counts"
            ));
        }
        let mut d = Dec::new(b);
        (0..count).map(|_| HeldRecord::decode(&mut d)).collect()
    }
}

fn encode_held(e: &mut Enc, v: &[HeldRecord]) {
    e.u64(v.len() as u64);
    for h in v {
        h.encode(e);
    }
}

fn decode_held(d: &mut Dec) -> Result<Vec<HeldRecord>, DecodeError> {
    let n = d.u64()?;
    if n > (d.remaining() / HELD_LEN) as u64 {
        return derr("record count larger than the file");
    }
    (0..n).map(|_| HeldRecord::decode(d)).collect()
}

/// Appends the SHA-256 of everything before it.
fn seal_sum(mut b: Vec<u8>) -> Vec<u8> {
    let sum = sha256(&b);
    b.extend_from_slice(&sum);
    b
}

/// Checks and strips the trailing SHA-256 and the magic and version.
fn open_sum<'a>(b: &'a [u8], magic: &[u8; 8], what: &str) -> Result<Dec<'a>, DecodeError> {
    if b.len() < 12 + 32 {
        return derr(format!("{what} is truncated"));
    }
    let (body, sum) = b.split_at(b.len() - 32);
    if sha256(body) != sum {
        return derr(format!("{what} fails its checksum (damaged)"));
    }
    let mut d = Dec::new(body);
    if d.take(8)? != magic {
        return derr(format!("{what} has a bad magic"));
    }
    let v = d.u16()?;
    if v != STREAM_VERSION {
        return derr(format!("{what} version {v} is not supported"));
    }
    d.u16()?;
    Ok(d)
}

/// File names of the receiving side (docs/STREAM-FORMAT.md, "Receiving").
pub const RECEIVED_FILE: &str = "kmsfs.received";
pub const RECV_DIR: &str = "kmsfs.recv";
pub const RECV_PROGRESS_FILE: &str = "kmsfs.recv/progress";
/// Journal of the records an interrupted receive wrote (appended, 49 bytes each).
pub const RECV_RECORDS_FILE: &str = "kmsfs.recv/records";
pub const RECV_COMMIT_FILE: &str = "kmsfs.recv/commit";
pub const RECV_SEG_DIR: &str = "kmsfs.recv/seg";
pub const RECEIVED_MAGIC: &[u8; 8] = b"KMSFSRCV";
pub const PROGRESS_MAGIC: &[u8; 8] = b"KMSFSRPG";
pub const COMMIT_MAGIC: &[u8; 8] = b"KMSFSRCM";

/// `kmsfs.received`: what a received volume holds, so that the next
/// incremental can be checked against it without a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedState {
    pub target_volume: [u8; 16],
    pub key_domain: [u8; 16],
    /// The root slot (0 or 1) holding the newest root record, and its SHA-256.
    pub newest_slot: u8,
    pub root_sha: [u8; 32],
    pub generation: u64,
    pub snapshots: Vec<SnapRef>,
    pub records: Vec<HeldRecord>,
}

impl ReceivedState {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        e.bytes(RECEIVED_MAGIC)
            .u16(STREAM_VERSION)
            .u16(0)
            .bytes(&self.target_volume)
            .bytes(&self.key_domain)
            .u8(self.newest_slot)
            .bytes(&self.root_sha)
            .u64(self.generation);
        encode_snaprefs(&mut e, &self.snapshots);
        encode_held(&mut e, &self.records);
        seal_sum(e.buf)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut d = open_sum(b, RECEIVED_MAGIC, RECEIVED_FILE)?;
        let target_volume = d.array()?;
        let key_domain = d.array()?;
        let newest_slot = d.u8()?;
        if newest_slot > 1 {
            return derr("bad root slot number");
        }
        let root_sha = d.array()?;
        let generation = d.u64()?;
        let snapshots = decode_snaprefs(&mut d)?;
        let records = decode_held(&mut d)?;
        d.finish()?;
        Ok(ReceivedState {
            target_volume,
            key_domain,
            newest_slot,
            root_sha,
            generation,
            snapshots,
            records,
        })
    }
}

/// `kmsfs.recv/progress`: how far an interrupted receive got (its resume point).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub stream_id: [u8; 32],
    /// The next frame to apply, and the check of the frame before it.
    pub next_index: u64,
    pub check: [u8; 32],
    pub blocks: u64,
    pub refs: u64,
    pub block_bytes: u64,
    /// Records written by this receive so far: the first this many entries
    /// of `kmsfs.recv/records`.
    pub records: u64,
}

impl Progress {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        e.bytes(PROGRESS_MAGIC)
            .u16(STREAM_VERSION)
            .u16(0)
            .bytes(&self.stream_id)
            .u64(self.next_index)
            .bytes(&self.check)
            .u64(self.blocks)
            .u64(self.refs)
            .u64(self.block_bytes)
            .u64(self.records);
        seal_sum(e.buf)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut d = open_sum(b, PROGRESS_MAGIC, RECV_PROGRESS_FILE)?;
        let p = Progress {
            stream_id: d.array()?,
            next_index: d.u64()?,
            check: d.array()?,
            blocks: d.u64()?,
            refs: d.u64()?,
            block_bytes: d.u64()?,
            records: d.u64()?,
        };
        d.finish()?;
        Ok(p)
    }
    /// The resume token `kmsfs send --resume` takes: stream id, next frame, check.
    pub fn token(&self) -> String {
        let mut e = Enc::with_capacity(72);
        e.bytes(&self.stream_id)
            .u64(self.next_index)
            .bytes(&self.check);
        super::hex(&e.buf)
    }
}

/// A resume token, parsed: (stream id, next frame index, check before it).
pub fn parse_token(s: &str) -> Result<([u8; 32], u64, [u8; 32]), DecodeError> {
    let b = super::unhex(s.trim())
        .ok_or_else(|| DecodeError("a resume token is hexadecimal".into()))?;
    let mut d = Dec::new(&b);
    let r = (d.array()?, d.u64()?, d.array()?);
    d.finish()?;
    Ok(r)
}

/// `kmsfs.recv/commit`: a verified receive being made visible (rolled
/// forward by the next receive if it is interrupted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitPlan {
    pub slot: u8,
    /// The volume header to write (both copies), or empty to keep the target's.
    pub header: Vec<u8>,
    pub root: Vec<u8>,
    pub state: Vec<u8>,
    /// Records this receive put into segments the target already had: staged
    /// in `kmsfs.recv/seg/N.seg` at their offsets, copied in place by the commit.
    pub patches: Vec<HeldRecord>,
}

impl CommitPlan {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        e.bytes(COMMIT_MAGIC)
            .u16(STREAM_VERSION)
            .u16(0)
            .u8(self.slot)
            .bytes32(&self.header)
            .bytes32(&self.root)
            .bytes32(&self.state);
        encode_held(&mut e, &self.patches);
        seal_sum(e.buf)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut d = open_sum(b, COMMIT_MAGIC, RECV_COMMIT_FILE)?;
        let slot = d.u8()?;
        if slot > 1 {
            return derr("bad root slot number");
        }
        let c = CommitPlan {
            slot,
            header: d.bytes32()?.to_vec(),
            root: d.bytes32()?.to_vec(),
            state: d.bytes32()?.to_vec(),
            patches: decode_held(&mut d)?,
        };
        d.finish()?;
        Ok(c)
    }
}

/// One frame as read: type, payload and its index in the stream.
#[derive(Debug)]
pub struct Frame {
    pub index: u64,
    pub ftype: u8,
    pub payload: Vec<u8>,
}

/// Reads and checks frames from a byte source. The first frame must be a
/// BEGIN; a resumed stream's next frame continues the original chain.
pub struct FrameReader<R> {
    inner: R,
    pub index: u64,
    pub prev: [u8; 32],
    pub bytes_read: u64,
}

/// Why reading a frame failed: the stream ended early (resumable), or it is
/// damaged (altered, reordered, not a stream).
#[derive(Debug)]
pub enum FrameError {
    Truncated(String),
    Damaged(String),
    Io(std::io::Error),
}

impl<R: std::io::Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            index: 0,
            prev: [0; 32],
            bytes_read: 0,
        }
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<bool, FrameError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => {
                    if got == 0 {
                        return Ok(false);
                    }
                    return Err(FrameError::Truncated(format!(
                        "the stream ends inside {what} of frame {}",
                        self.index
                    )));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FrameError::Io(e)),
            }
        }
        self.bytes_read += buf.len() as u64;
        Ok(true)
    }

    /// The next frame, checked; None at a clean end of input (between frames).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let mut prefix = [0u8; FRAME_PREFIX_LEN];
        if !self.fill(&mut prefix, "the prefix")? {
            return Ok(None);
        }
        let ftype = prefix[0];
        let len = u32::from_le_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if !(frame::BEGIN..=frame::END).contains(&ftype) {
            return Err(FrameError::Damaged(format!(
                "frame {} has an unknown type {ftype}",
                self.index
            )));
        }
        if len > MAX_FRAME_PAYLOAD {
            return Err(FrameError::Damaged(format!(
                "frame {} announces {len} bytes, more than any frame holds",
                self.index
            )));
        }
        let mut payload = vec![0u8; len];
        if !self.fill(&mut payload, "the payload")? && len > 0 {
            return Err(FrameError::Truncated(format!(
                "the stream ends inside the payload of frame {}",
                self.index
            )));
        }
        let mut check = [0u8; CHECK_LEN];
        if !self.fill(&mut check, "the check")? {
            return Err(FrameError::Truncated(format!(
                "the stream ends before the check of frame {}",
                self.index
            )));
        }
        if self.index == 0 && ftype != frame::BEGIN {
            return Err(FrameError::Damaged(
                "the stream does not start with a BEGIN frame (not a kmsfs send stream)".into(),
            ));
        }
        let want = frame_check(&self.prev, self.index, ftype, &payload);
        if want != check {
            return Err(FrameError::Damaged(format!(
                "frame {} fails its check: the stream was altered, reordered or cut and spliced",
                self.index
            )));
        }
        let f = Frame {
            index: self.index,
            ftype,
            payload,
        };
        self.prev = check;
        self.index += 1;
        Ok(Some(f))
    }

    /// After a BEGIN of a resumed stream: continue the original chain.
    pub fn continue_at(&mut self, index: u64, prev: [u8; 32]) {
        self.index = index;
        self.prev = prev;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ptr(n: u8) -> BlockPtr {
        BlockPtr {
            segment: n as u64,
            offset: 40,
            len: 100,
            block_id: [n; 16],
            tag: [n + 1; 16],
        }
    }

    fn begin() -> Begin {
        Begin {
            flags: FLAG_INCREMENTAL,
            source_volume: [1; 16],
            key_domain: [2; 16],
            target_volume: [3; 16],
            block_size: 65536,
            segment_size: 1 << 25,
            snapshot_token: [4; 16],
            snapshot_generation: 9,
            snapshot_tree: ptr(5),
            base_token: [6; 16],
            base_tree: Some(ptr(7)),
            total_frames: 10,
            total_bytes: 1000,
            resume_index: 0,
            resume_check: [0; 32],
        }
    }

    #[test]
    fn begin_roundtrip_and_every_truncation_refused() {
        let b = begin();
        let enc = b.encode();
        assert_eq!(enc.len(), BEGIN_FULL_LEN);
        assert_eq!(Begin::decode(&enc).unwrap(), b);
        for n in 0..enc.len() {
            assert!(Begin::decode(&enc[..n]).is_err());
        }
        let mut bad = enc.clone();
        bad[20] ^= 1;
        assert!(Begin::decode(&bad).unwrap_err().0.contains("stream id"));
    }

    #[test]
    fn frames_chain_and_refuse_reorder_and_alteration() {
        let mut w = FrameWriter::new();
        let mut s = w.frame(frame::BEGIN, &begin().encode());
        let f1 = w.frame(frame::HEADER, &[7; 4096]);
        let f2 = w.frame(frame::END, &End::default().encode());
        s.extend_from_slice(&f1);
        s.extend_from_slice(&f2);
        let mut r = FrameReader::new(&s[..]);
        let mut n = 0;
        while r.next_frame().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
        // Swap the two frames after BEGIN.
        let head = s.len() - f1.len() - f2.len();
        let mut swapped = s[..head].to_vec();
        swapped.extend_from_slice(&f2);
        swapped.extend_from_slice(&f1);
        let mut r = FrameReader::new(&swapped[..]);
        r.next_frame().unwrap();
        assert!(matches!(r.next_frame(), Err(FrameError::Damaged(_))));
        // Alter one byte anywhere: some frame fails.
        for i in (0..s.len()).step_by(97) {
            let mut a = s.clone();
            a[i] ^= 0x40;
            let mut r = FrameReader::new(&a[..]);
            let mut failed = false;
            loop {
                match r.next_frame() {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            assert!(failed, "altering byte {i} went unnoticed");
        }
        // Truncation inside a frame is Truncated.
        let mut r = FrameReader::new(&s[..s.len() - 3]);
        r.next_frame().unwrap();
        r.next_frame().unwrap();
        assert!(matches!(r.next_frame(), Err(FrameError::Truncated(_))));
    }

    /// Random and mutated inputs: every decoder returns an error or a value,
    /// never panics (they read files and streams from elsewhere).
    #[test]
    fn decoders_never_panic_on_hostile_input() {
        let mut x: u64 = 0x9E3779B97F4A7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let state = ReceivedState {
            target_volume: [1; 16],
            key_domain: [2; 16],
            newest_slot: 1,
            root_sha: [3; 32],
            generation: 4,
            snapshots: vec![SnapRef {
                token: [5; 16],
                tree: ptr(6),
            }],
            records: vec![HeldRecord {
                segment: 1,
                offset: 40,
                len: 100,
                kind: BlockKind::Node,
                block_id: [7; 16],
                tag: [8; 16],
            }],
        };
        let valid: Vec<Vec<u8>> = vec![
            begin().encode(),
            state.encode(),
            Progress {
                stream_id: [1; 32],
                next_index: 5,
                check: [2; 32],
                blocks: 1,
                refs: 2,
                block_bytes: 3,
                records: 1,
            }
            .encode(),
            CommitPlan {
                slot: 1,
                header: vec![1; 10],
                root: vec![2; 10],
                state: vec![3; 10],
                patches: state.records.clone(),
            }
            .encode(),
        ];
        for round in 0..3000 {
            let base = &valid[round % valid.len()];
            let mut b = base.clone();
            match next() % 3 {
                0 => {
                    let i = (next() as usize) % b.len();
                    b[i] ^= 1 << (next() % 8);
                }
                1 => b.truncate((next() as usize) % b.len()),
                _ => b = (0..(next() % 400)).map(|_| next() as u8).collect(),
            }
            let _ = Begin::decode(&b);
            let _ = ReceivedState::decode(&b);
            let _ = Progress::decode(&b);
            let _ = CommitPlan::decode(&b);
            let _ = RootFrame::decode(&b);
            let _ = RefFrame::decode(&b);
            let _ = BlockFrame::decode(&b);
            let _ = End::decode(&b);
            let _ = HeldRecord::decode_journal(&b, next() % 10);
            let _ = parse_token(&super::super::hex(&b));
            let mut r = FrameReader::new(&b[..]);
            while let Ok(Some(_)) = r.next_frame() {}
        }
    }

    #[test]
    fn payloads_roundtrip() {
        let rf = RefFrame {
            segment: 3,
            offset: 40,
            len: 200,
            kind: BlockKind::Data,
            block_id: [1; 16],
            tag: [2; 16],
        };
        assert_eq!(RefFrame::decode(&rf.encode()).unwrap(), rf);
        let e = End {
            frames: 5,
            blocks: 2,
            refs: 1,
            block_bytes: 400,
        };
        assert_eq!(End::decode(&e.encode()).unwrap(), e);
        let mut rec = Vec::new();
        rec.extend_from_slice(&((1 + 16 + 40) as u32).to_le_bytes());
        rec.push(1);
        rec.extend_from_slice(&[9; 16]);
        rec.extend_from_slice(&[8; 40]);
        let b = BlockFrame::encode(4, 40, &rec);
        let (f, facts) = BlockFrame::decode(&b).unwrap();
        assert_eq!((f.segment, f.offset, f.record), (4, 40, &rec[..]));
        assert_eq!(facts.block_id, [9; 16]);
        assert!(BlockFrame::decode(&b[..b.len() - 1]).is_err());
        let root = super::super::root_prefix(&[1; 16], 7, 0);
        let rf = RootFrame {
            requires: vec![SnapRef {
                token: [1; 16],
                tree: ptr(1),
            }],
            lists: vec![],
            generation: 7,
            record: root,
        };
        let enc = rf.encode();
        assert_eq!(RootFrame::decode(&enc).unwrap(), rf);
        for n in 0..enc.len() {
            assert!(RootFrame::decode(&enc[..n]).is_err());
        }
    }
}
