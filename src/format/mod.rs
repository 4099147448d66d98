//! Byte-exact encoding and decoding of every on-disk structure (docs/FORMAT.md).
//!
//! No I/O here and no serde/bincode: every field is hand-encoded little-endian at
//! the offsets named by the constants below, so the format is defined by this file
//! and the spec, never by a serialization crate's choices. Decoders never trust a
//! length read from disk: every length is checked against the bytes available.

use std::fmt;

pub mod stream;

/// Version of the record layouts: segment header, sealed-block AAD, root record,
/// tree nodes. Bump it on any change to them (see docs/FORMAT.md).
pub const FORMAT_VERSION: u16 = 1;

/// Volume version in the header: what may be found in a volume's tree.
/// 1: block map entries only. 2: also fragment entries ([`tag::FRAG`]): small
/// overwrites stored as sealed fragments over a block. New volumes are version 2;
/// a version-1 volume stays version 1 (this kmsfs never writes fragments into
/// it), so an older kmsfs keeps opening it, and refuses a version-2 volume
/// instead of ignoring fragments it does not know.
pub const VOLUME_VERSION: u16 = 2;
/// The first volume version whose tree may hold fragment entries.
pub const FRAGMENTS_SINCE: u16 = 2;

/// Volume header file names (primary and backup copy).
pub const HEADER_FILE: &str = "kmsfs.header";
pub const HEADER_BACKUP_FILE: &str = "kmsfs.header.bak";
/// Root record file, replaced atomically (write tmp, fsync, rename, fsync dir).
pub const ROOT_FILE: &str = "kmsfs.root";
pub const ROOT_TMP_FILE: &str = "kmsfs.root.tmp";
/// Directory holding the segment files.
pub const SEGMENT_DIR: &str = "seg";
/// Lock file taken by a read-write opener.
pub const LOCK_FILE: &str = "kmsfs.lock";
/// Lock file read-only openers share; the cleaner deletes segments only when
/// it can take it exclusively.
pub const READERS_FILE: &str = "kmsfs.readers";

pub const HEADER_MAGIC: &[u8; 8] = b"KMSFSVOL";
pub const SEGMENT_MAGIC: &[u8; 8] = b"KMSFSSEG";
pub const ROOT_MAGIC: &[u8; 8] = b"KMSFSROT";
pub const BLOCK_AAD_MAGIC: &[u8; 8] = b"KMSFSBLK";

/// The header file is always exactly this long (zero padded), so it can be
/// rewritten in place of its backup without changing size.
pub const HEADER_LEN: usize = 4096;
pub const HEADER_MAC_LEN: usize = 32;
/// Largest CMK id we accept in a header.
pub const MAX_CMK_ID_LEN: usize = 256;
pub const MAX_WRAPPED_LEN: usize = 1024;

pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
pub const MIN_SEGMENT_SIZE: u32 = 1 << 20;
pub const MAX_SEGMENT_SIZE: u32 = 1 << 30;
pub const DEFAULT_SEGMENT_SIZE: u32 = 32 << 20;
/// Plaintext of data blocks is padded with zeros to a multiple of this, so the
/// backing store shows sizes only to this granularity.
pub const PAD_QUANTUM: usize = 4096;

/// Segment file header: magic(8) version(2) reserved(2) volume_id(16) segment_id(8) reserved(4).
pub const SEGMENT_HEADER_LEN: usize = 40;
/// Record header inside a segment: len(4, of kind+block_id+sealed) kind(1) block_id(16).
pub const RECORD_HEADER_LEN: usize = 21;
/// Encoded size of a block pointer.
pub const PTR_LEN: usize = 48;
/// Root record fixed prefix: magic(8) version(2) reserved(2) volume_id(16) generation(8) sealed_len(4).
pub const ROOT_PREFIX_LEN: usize = 40;

/// Kinds of sealed blocks. The kind is part of the AAD, so a block of one kind
/// can never be accepted where another is expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlockKind {
    Data = 1,
    Node = 2,
    Xattr = 3,
}

impl BlockKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(BlockKind::Data),
            2 => Some(BlockKind::Node),
            3 => Some(BlockKind::Xattr),
            _ => None,
        }
    }
}

/// A decoding failure: what was malformed. Shown to users inside integrity errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DecodeError {}

fn derr<T>(msg: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(msg.into()))
}

/// Little-endian writer.
#[derive(Default)]
pub struct Enc {
    pub buf: Vec<u8>,
}

impl Enc {
    pub fn new() -> Self {
        Self { buf: Vec::new() }
    }
    pub fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }
    /// u16 length prefix then bytes.
    pub fn bytes16(&mut self, v: &[u8]) -> &mut Self {
        debug_assert!(v.len() <= u16::MAX as usize);
        self.u16(v.len() as u16).bytes(v)
    }
    /// u32 length prefix then bytes.
    pub fn bytes32(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32).bytes(v)
    }
}

/// Little-endian reader that never reads past its slice.
pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    pub fn pos(&self) -> usize {
        self.pos
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return derr(format!(
                "truncated: needed {n} bytes at offset {}, {} left",
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N)?.try_into().unwrap())
    }
    pub fn bytes16(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    pub fn bytes32(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return derr(format!("{} trailing bytes", self.remaining()));
        }
        Ok(())
    }
}

/// Where a sealed block lives and what it must authenticate as.
///
/// A pointer carries the block's random id (bound in the AAD) and its AEAD tag,
/// so a parent authenticates its children: a MAC tree up to the root record.
/// The location (segment, offset) is not in the AAD, which lets the cleaner move
/// a block by copying its bytes, without re-encryption.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockPtr {
    pub segment: u64,
    pub offset: u32,
    /// Length of the whole record (header + sealed bytes).
    pub len: u32,
    pub block_id: [u8; 16],
    pub tag: [u8; 16],
}

impl fmt::Debug for BlockPtr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "block {} in segment {:016x} at offset {}",
            hex(&self.block_id[..6]),
            self.segment,
            self.offset
        )
    }
}

impl BlockPtr {
    pub fn encode(&self, e: &mut Enc) {
        e.u64(self.segment)
            .u32(self.offset)
            .u32(self.len)
            .bytes(&self.block_id)
            .bytes(&self.tag);
    }
    pub fn to_bytes(&self) -> [u8; PTR_LEN] {
        let mut e = Enc::with_capacity(PTR_LEN);
        self.encode(&mut e);
        e.buf.try_into().unwrap()
    }
    pub fn decode(d: &mut Dec) -> Result<Self, DecodeError> {
        Ok(BlockPtr {
            segment: d.u64()?,
            offset: d.u32()?,
            len: d.u32()?,
            block_id: d.array()?,
            tag: d.array()?,
        })
    }
    pub fn from_bytes(b: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Dec::new(b);
        let p = Self::decode(&mut d)?;
        d.finish()?;
        Ok(p)
    }
    pub fn id_u128(&self) -> u128 {
        u128::from_le_bytes(self.block_id)
    }
}

/// AAD of a sealed block: magic, format version, volume id, block id, kind.
pub fn block_aad(volume_id: &[u8; 16], block_id: &[u8; 16], kind: BlockKind) -> [u8; 43] {
    let mut a = [0u8; 43];
    a[0..8].copy_from_slice(BLOCK_AAD_MAGIC);
    a[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    a[10..26].copy_from_slice(volume_id);
    a[26..42].copy_from_slice(block_id);
    a[42] = kind as u8;
    a
}

pub fn segment_file_name(id: u64) -> String {
    format!("{SEGMENT_DIR}/{id:016x}.seg")
}

/// The id of a segment file name as `segment_file_name` writes it (16 lowercase hex
/// digits). Ids past `i64::MAX` are never written (ids count up from 1), so such a name
/// is not taken for a segment: the next id after it would overflow.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".seg")?;
    if stem.len() != 16 || !stem.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(stem, 16)
        .ok()
        .filter(|&id| id <= i64::MAX as u64)
}

pub fn encode_segment_header(volume_id: &[u8; 16], segment_id: u64) -> Vec<u8> {
    let mut e = Enc::with_capacity(SEGMENT_HEADER_LEN);
    e.bytes(SEGMENT_MAGIC)
        .u16(FORMAT_VERSION)
        .u16(0)
        .bytes(volume_id)
        .u64(segment_id)
        .u32(0);
    e.buf
}

pub fn decode_segment_header(b: &[u8]) -> Result<([u8; 16], u64), DecodeError> {
    let mut d = Dec::new(b);
    if d.take(8)? != SEGMENT_MAGIC {
        return derr("not a kmsfs segment (bad magic)");
    }
    let v = d.u16()?;
    if v != FORMAT_VERSION {
        return derr(format!("segment format version {v} is not supported"));
    }
    d.u16()?;
    let vid = d.array()?;
    let sid = d.u64()?;
    Ok((vid, sid))
}

/// The volume header: identity, parameters and the wrapped DK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub volume_id: [u8; 16],
    /// Key domain: the id of the volume whose DK this is. Equal to `volume_id`
    /// except in clones, which share the DK and every sealed block with their
    /// origin. Bound in every block's AAD and in the KMS encryption context.
    pub key_domain: [u8; 16],
    pub cipher: u8,
    pub block_size: u32,
    pub segment_size: u32,
    pub created: i64,
    pub cmk_id: String,
    pub cmk_version: u32,
    pub wrapped_dk: Vec<u8>,
}

/// Offsets of the fixed fields of the header (docs/FORMAT.md, "Volume header").
pub mod header_off {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const VOLUME_ID: usize = 10;
    pub const KEY_DOMAIN: usize = 26;
    pub const CIPHER: usize = 42;
    pub const BLOCK_SIZE: usize = 43;
    pub const SEGMENT_SIZE: usize = 47;
    pub const CREATED: usize = 51;
    pub const CMK_VERSION: usize = 59;
    /// u16 length + CMK id, then u16 length + wrapped DK, then zero padding; the
    /// HMAC-SHA256 occupies the last 32 bytes of the 4096-byte header.
    pub const CMK_ID_LEN: usize = 63;
}

impl Header {
    /// Encodes the header without its MAC (the MAC slot is zero).
    pub fn encode_unsigned(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(HEADER_LEN);
        e.bytes(HEADER_MAGIC)
            .u16(self.version)
            .bytes(&self.volume_id)
            .bytes(&self.key_domain)
            .u8(self.cipher)
            .u32(self.block_size)
            .u32(self.segment_size)
            .i64(self.created)
            .u32(self.cmk_version)
            .bytes16(self.cmk_id.as_bytes())
            .bytes16(&self.wrapped_dk);
        assert!(e.buf.len() <= HEADER_LEN - HEADER_MAC_LEN);
        e.buf.resize(HEADER_LEN, 0);
        e.buf
    }

    /// Reads the version only (to refuse newer formats before anything else).
    pub fn peek_version(b: &[u8]) -> Result<u16, DecodeError> {
        if b.len() < 10 || &b[0..8] != HEADER_MAGIC {
            return derr("not a kmsfs volume header (bad magic)");
        }
        Ok(u16::from_le_bytes([b[8], b[9]]))
    }

    /// Decodes a header. The caller verifies the MAC (last 32 bytes) with the DK.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() != HEADER_LEN {
            return derr(format!(
                "volume header is {} bytes, expected {HEADER_LEN}",
                b.len()
            ));
        }
        let version = Self::peek_version(b)?;
        if version > VOLUME_VERSION {
            return derr(format!(
                "volume format version {version} is newer than this kmsfs supports ({VOLUME_VERSION}); upgrade kmsfs"
            ));
        }
        if version == 0 {
            return derr("volume format version 0 is invalid");
        }
        let mut d = Dec::new(&b[..HEADER_LEN - HEADER_MAC_LEN]);
        d.take(10)?;
        let volume_id = d.array()?;
        let key_domain = d.array()?;
        let cipher = d.u8()?;
        let block_size = d.u32()?;
        let segment_size = d.u32()?;
        let created = d.i64()?;
        let cmk_version = d.u32()?;
        let cmk = d.bytes16()?;
        if cmk.len() > MAX_CMK_ID_LEN {
            return derr("CMK id too long");
        }
        let cmk_id = String::from_utf8(cmk.to_vec())
            .map_err(|_| DecodeError("CMK id is not UTF-8".into()))?;
        let wrapped = d.bytes16()?;
        if wrapped.len() > MAX_WRAPPED_LEN {
            return derr("wrapped data key too long");
        }
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) || !block_size.is_power_of_two()
        {
            return derr(format!("block size {block_size} out of range"));
        }
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&segment_size) {
            return derr(format!("segment size {segment_size} out of range"));
        }
        Ok(Header {
            version,
            volume_id,
            key_domain,
            cipher,
            block_size,
            segment_size,
            created,
            cmk_id,
            cmk_version,
            wrapped_dk: wrapped.to_vec(),
        })
    }
}

/// Root record: everything needed to find the live tree and the snapshots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootPayload {
    pub tree: BlockPtr,
    pub next_ino: u64,
    pub next_segment: u64,
    pub committed: i64,
    pub snapshots: Vec<SnapshotRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub name: String,
    pub created: i64,
    pub generation: u64,
    pub tree: BlockPtr,
    pub next_ino: u64,
}

impl RootPayload {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        self.tree.encode(&mut e);
        e.u64(self.next_ino)
            .u64(self.next_segment)
            .i64(self.committed)
            .u32(self.snapshots.len() as u32);
        for s in &self.snapshots {
            e.bytes16(s.name.as_bytes())
                .i64(s.created)
                .u64(s.generation)
                .u64(s.next_ino);
            s.tree.encode(&mut e);
        }
        e.buf
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Dec::new(b);
        let tree = BlockPtr::decode(&mut d)?;
        let next_ino = d.u64()?;
        let next_segment = d.u64()?;
        let committed = d.i64()?;
        let n = d.u32()? as usize;
        if n > d.remaining() / (2 + 24 + PTR_LEN) {
            return derr("snapshot count larger than the record");
        }
        let mut snapshots = Vec::with_capacity(n);
        for _ in 0..n {
            let name = String::from_utf8(d.bytes16()?.to_vec())
                .map_err(|_| DecodeError("snapshot name is not UTF-8".into()))?;
            let created = d.i64()?;
            let generation = d.u64()?;
            let next_ino = d.u64()?;
            let tree = BlockPtr::decode(&mut d)?;
            snapshots.push(SnapshotRecord {
                name,
                created,
                generation,
                tree,
                next_ino,
            });
        }
        d.finish()?;
        Ok(RootPayload {
            tree,
            next_ino,
            next_segment,
            committed,
            snapshots,
        })
    }
}

/// The plaintext prefix of the root file, also its AAD.
pub fn root_prefix(volume_id: &[u8; 16], generation: u64, sealed_len: u32) -> Vec<u8> {
    let mut e = Enc::with_capacity(ROOT_PREFIX_LEN);
    e.bytes(ROOT_MAGIC)
        .u16(FORMAT_VERSION)
        .u16(0)
        .bytes(volume_id)
        .u64(generation)
        .u32(sealed_len);
    e.buf
}

/// The parts of a root file: volume id, generation, plaintext prefix (the AAD),
/// sealed payload.
pub type RootParts<'a> = ([u8; 16], u64, &'a [u8], &'a [u8]);

/// Splits a root file into its parts.
pub fn split_root(b: &[u8]) -> Result<RootParts<'_>, DecodeError> {
    let mut d = Dec::new(b);
    if d.take(8)? != ROOT_MAGIC {
        return derr("root record has a bad magic");
    }
    let v = d.u16()?;
    if v > FORMAT_VERSION {
        return derr(format!(
            "root record format version {v} is newer than this kmsfs supports ({FORMAT_VERSION}); upgrade kmsfs"
        ));
    }
    d.u16()?;
    let vid = d.array()?;
    let generation = d.u64()?;
    let n = d.u32()? as usize;
    let sealed = d.take(n)?;
    d.finish()?;
    Ok((vid, generation, &b[..ROOT_PREFIX_LEN], sealed))
}

/// File types as stored in inodes and directory entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FileKind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
    Socket = 5,
    CharDev = 6,
    BlockDev = 7,
}

impl FileKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => FileKind::File,
            2 => FileKind::Dir,
            3 => FileKind::Symlink,
            4 => FileKind::Fifo,
            5 => FileKind::Socket,
            6 => FileKind::CharDev,
            7 => FileKind::BlockDev,
            _ => return None,
        })
    }
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & crate::sys::S_IFMT {
            crate::sys::S_IFREG => FileKind::File,
            crate::sys::S_IFDIR => FileKind::Dir,
            crate::sys::S_IFLNK => FileKind::Symlink,
            crate::sys::S_IFIFO => FileKind::Fifo,
            crate::sys::S_IFSOCK => FileKind::Socket,
            crate::sys::S_IFCHR => FileKind::CharDev,
            crate::sys::S_IFBLK => FileKind::BlockDev,
            _ => return None,
        })
    }
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::File => crate::sys::S_IFREG,
            FileKind::Dir => crate::sys::S_IFDIR,
            FileKind::Symlink => crate::sys::S_IFLNK,
            FileKind::Fifo => crate::sys::S_IFIFO,
            FileKind::Socket => crate::sys::S_IFSOCK,
            FileKind::CharDev => crate::sys::S_IFCHR,
            FileKind::BlockDev => crate::sys::S_IFBLK,
        }
    }
}

/// A timestamp with nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        }
    }
}

/// Inode attributes (tree value under key ino|INODE).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub kind: FileKind,
    /// Permission bits and suid/sgid/sticky (no type bits).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub rdev: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    /// Directories: parent inode (for ".." and rename loop checks).
    pub parent: u64,
    /// Directories: next readdir cookie to hand out.
    pub next_cookie: u64,
    pub flags: u32,
    /// Number of data blocks stored for this file (holes excluded).
    pub blocks: u64,
}

pub const INODE_LEN: usize = 1 + 4 * 5 + 8 + 12 * 4 + 8 + 8 + 4 + 8;

impl Inode {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(INODE_LEN);
        e.u8(self.kind as u8)
            .u32(self.perm)
            .u32(self.uid)
            .u32(self.gid)
            .u32(self.nlink)
            .u32(self.rdev)
            .u64(self.size);
        for t in [self.atime, self.mtime, self.ctime, self.crtime] {
            e.i64(t.secs).u32(t.nanos);
        }
        e.u64(self.parent)
            .u64(self.next_cookie)
            .u32(self.flags)
            .u64(self.blocks);
        e.buf
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Dec::new(b);
        let kind = FileKind::from_u8(d.u8()?).ok_or_else(|| DecodeError("bad file kind".into()))?;
        let perm = d.u32()?;
        let uid = d.u32()?;
        let gid = d.u32()?;
        let nlink = d.u32()?;
        let rdev = d.u32()?;
        let size = d.u64()?;
        let mut ts = [Timestamp::default(); 4];
        for t in &mut ts {
            let secs = d.i64()?;
            let nanos = d.u32()?;
            if nanos >= 1_000_000_000 {
                return derr("bad nanoseconds");
            }
            *t = Timestamp { secs, nanos };
        }
        let parent = d.u64()?;
        let next_cookie = d.u64()?;
        let flags = d.u32()?;
        let blocks = d.u64()?;
        d.finish()?;
        Ok(Inode {
            kind,
            perm,
            uid,
            gid,
            nlink,
            size,
            rdev,
            atime: ts[0],
            mtime: ts[1],
            ctime: ts[2],
            crtime: ts[3],
            parent,
            next_cookie,
            flags,
            blocks,
        })
    }
}

/// Tree key tags: a key is ino (8, big-endian so a scan of one inode is a range)
/// then a tag byte then a tag-specific suffix.
pub mod tag {
    /// ino|1 -> Inode
    pub const INODE: u8 = 1;
    /// ino|2|name -> DirEntry (child ino, kind, cookie)
    pub const DIRENT: u8 = 2;
    /// ino|3|cookie(BE) -> name (readdir order with stable offsets)
    pub const DIRCOOKIE: u8 = 3;
    /// ino|4|block index(BE) -> BlockPtr (file data)
    pub const BLOCK: u8 = 4;
    /// ino|5|name -> XattrValue
    pub const XATTR: u8 = 5;
    /// ino|6 -> symlink target
    pub const SYMLINK: u8 = 6;
    /// 0|7|ino -> empty: inode unlinked while open, purged at next open
    pub const ORPHAN: u8 = 7;
    /// ino|8|block index(BE)|sequence(BE u32) -> FragValue: bytes written over
    /// part of a stored block, applied over it in sequence order (volume version 2)
    pub const FRAG: u8 = 8;
}

/// Length of a fragment entry's value: a BlockPtr, then offset and length (u32 LE).
pub const FRAG_VALUE_LEN: usize = PTR_LEN + 8;

/// A fragment: `len` bytes at `offset` in a block, stored as the first `len`
/// bytes of the data record `ptr` points to (its plaintext is padded to
/// [`PAD_QUANTUM`] like every short block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragValue {
    pub ptr: BlockPtr,
    pub offset: u32,
    pub len: u32,
}

impl FragValue {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(FRAG_VALUE_LEN);
        self.ptr.encode(&mut e);
        e.u32(self.offset).u32(self.len);
        e.buf
    }
    /// Decodes and checks the value against the block size: a fragment lies
    /// inside its block and is not empty.
    pub fn from_bytes(b: &[u8], block_size: u32) -> Result<Self, DecodeError> {
        let v = Self::from_bytes_unchecked(b)?;
        let end = v.offset as u64 + v.len as u64;
        if v.len == 0 || end > block_size as u64 {
            return derr(format!(
                "fragment of {} bytes at offset {} does not fit a {block_size}-byte block",
                v.len, v.offset
            ));
        }
        Ok(v)
    }
    /// Decodes without the block-size check (for walks that only need the pointer).
    pub fn from_bytes_unchecked(b: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Dec::new(b);
        let ptr = BlockPtr::decode(&mut d)?;
        let offset = d.u32()?;
        let len = d.u32()?;
        d.finish()?;
        Ok(FragValue { ptr, offset, len })
    }
}

pub fn key(ino: u64, tag: u8, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + suffix.len());
    k.extend_from_slice(&ino.to_be_bytes());
    k.push(tag);
    k.extend_from_slice(suffix);
    k
}

/// Splits a tree key into (ino, tag, suffix).
pub fn split_key(k: &[u8]) -> Option<(u64, u8, &[u8])> {
    if k.len() < 9 {
        return None;
    }
    Some((
        u64::from_be_bytes(k[..8].try_into().unwrap()),
        k[8],
        &k[9..],
    ))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: FileKind,
    pub cookie: u64,
}

impl DirEntry {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(17);
        e.u64(self.ino).u8(self.kind as u8).u64(self.cookie);
        e.buf
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Dec::new(b);
        let ino = d.u64()?;
        let kind =
            FileKind::from_u8(d.u8()?).ok_or_else(|| DecodeError("bad entry kind".into()))?;
        let cookie = d.u64()?;
        d.finish()?;
        Ok(DirEntry { ino, kind, cookie })
    }
}

/// Xattr values up to this size live inline in the tree; larger ones in a
/// sealed block of kind Xattr.
pub const XATTR_INLINE_MAX: usize = 2048;
pub const XATTR_VALUE_MAX: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XattrValue {
    Inline(Vec<u8>),
    Block(BlockPtr),
}

impl XattrValue {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        match self {
            XattrValue::Inline(v) => {
                e.u8(1).bytes(v);
            }
            XattrValue::Block(p) => {
                e.u8(2);
                p.encode(&mut e);
            }
        }
        e.buf
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        match b.first() {
            Some(1) => Ok(XattrValue::Inline(b[1..].to_vec())),
            Some(2) => Ok(XattrValue::Block(BlockPtr::from_bytes(&b[1..])?)),
            _ => derr("bad xattr value"),
        }
    }
}

/// Tree node encoding: level(1) count(2) then per entry: key (u16 len) and either
/// a value (u32 len, leaves) or a child pointer (internal nodes).
pub const NODE_LEAF: u8 = 0;

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

pub fn round_up(n: usize, q: usize) -> usize {
    n.div_ceil(q) * q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ptr() -> BlockPtr {
        BlockPtr {
            segment: 7,
            offset: 40,
            len: 100,
            block_id: [3; 16],
            tag: [9; 16],
        }
    }

    #[test]
    fn ptr_roundtrip() {
        let p = ptr();
        assert_eq!(BlockPtr::from_bytes(&p.to_bytes()).unwrap(), p);
        assert!(BlockPtr::from_bytes(&p.to_bytes()[..47]).is_err());
    }

    #[test]
    fn header_roundtrip_and_refusals() {
        let h = Header {
            version: FORMAT_VERSION,
            volume_id: [1; 16],
            key_domain: [1; 16],
            cipher: 1,
            block_size: 65536,
            segment_size: DEFAULT_SEGMENT_SIZE,
            created: 5,
            cmk_id: "cmk-1".into(),
            cmk_version: 1,
            wrapped_dk: vec![4; 60],
        };
        let b = h.encode_unsigned();
        assert_eq!(b.len(), HEADER_LEN);
        assert_eq!(Header::decode(&b).unwrap(), h);
        // Version 2 (fragments) opens; the next one is refused.
        let mut v2 = b.clone();
        v2[header_off::VERSION] = 2;
        assert_eq!(Header::decode(&v2).unwrap().version, 2);
        let mut newer = b.clone();
        newer[header_off::VERSION] = (VOLUME_VERSION + 1) as u8;
        let e = Header::decode(&newer).unwrap_err();
        assert!(e.0.contains("newer"), "{e}");
        let mut bad = b.clone();
        bad[0] = b'X';
        assert!(Header::decode(&bad).is_err());
        let mut bs = b;
        bs[header_off::BLOCK_SIZE..header_off::BLOCK_SIZE + 4].copy_from_slice(&3u32.to_le_bytes());
        assert!(Header::decode(&bs).is_err());
    }

    #[test]
    fn inode_and_root_roundtrip() {
        let i = Inode {
            kind: FileKind::Dir,
            perm: 0o755,
            uid: 1,
            gid: 2,
            nlink: 2,
            size: 0,
            rdev: 0,
            atime: Timestamp { secs: -1, nanos: 5 },
            mtime: Timestamp::now(),
            ctime: Timestamp::now(),
            crtime: Timestamp::now(),
            parent: 1,
            next_cookie: 3,
            flags: 0,
            blocks: 0,
        };
        assert_eq!(i.encode().len(), INODE_LEN);
        assert_eq!(Inode::decode(&i.encode()).unwrap(), i);
        let r = RootPayload {
            tree: ptr(),
            next_ino: 10,
            next_segment: 3,
            committed: 9,
            snapshots: vec![SnapshotRecord {
                name: "s1".into(),
                created: 1,
                generation: 2,
                tree: ptr(),
                next_ino: 4,
            }],
        };
        assert_eq!(RootPayload::decode(&r.encode()).unwrap(), r);
        let enc = r.encode();
        for n in 0..enc.len() {
            assert!(RootPayload::decode(&enc[..n]).is_err());
        }
    }
}
