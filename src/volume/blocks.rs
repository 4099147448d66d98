//! Sealed blocks in append-only segments.
//!
//! A record is `len(4) kind(1) block_id(16) nonce||ciphertext||tag`. Records are
//! appended to the current segment until it reaches the segment size; a new
//! session always starts a new segment, so a torn tail left by a crash is never
//! written after. Nothing here overwrites a byte that was written before.
//!
//! Tree nodes are written twice ("ditto blocks"): each node record also goes
//! to the segment's mirror file `seg/N.meta` (same segment header, then the
//! node records only, appended in the same order). A record is position
//! independent (its AAD binds its id and kind, not where it lies), so when a
//! node cannot be read or verified in `seg/N.seg` (the file is missing,
//! truncated or damaged), the copy with the same block id and tag in
//! `seg/N.meta` serves instead: losing one backing file loses at most the
//! data blocks it held, never the tree.

use std::collections::BTreeSet;
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;

use super::tree::{Node, NodeStore};
use crate::cache::{BlockCache, Plain};
use crate::crypto::{Sealer, random_array, random_bytes};
use crate::error::{Error, Result};
use crate::format::{
    self, BlockKind, BlockPtr, RECORD_HEADER_LEN, SEGMENT_DIR, SEGMENT_HEADER_LEN, block_aad,
    segment_file_name,
};
use crate::store::Storage;

/// Appended bytes after which the device is asked to start writing them.
const WRITEBACK_STEP: u64 = 8 << 20;
/// Room reserved ahead of the append point of the current segment
/// (`Storage::preallocate`): between one and two steps of this. At most that
/// much stays reserved past the end of a segment a crash left behind, until
/// the next mount gives it back (`BlockIo::release_tail`).
const PREALLOC_STEP: u64 = 8 << 20;

struct Writer {
    /// (segment id, current length) of the segment being appended to.
    current: Option<(u64, u64)>,
    /// Offset in the current segment up to which writeback was started.
    written_back: u64,
    /// Offset in the current segment up to which room is reserved.
    reserved: u64,
    next_segment: u64,
    unsynced: BTreeSet<u64>,
    /// Segments whose mirror file exists (written this session).
    mirrored: BTreeSet<u64>,
    unsynced_mirrors: BTreeSet<u64>,
    new_files: bool,
}

/// The mirror file of segment `id` (see the module comment).
pub fn mirror_file_name(id: u64) -> String {
    format!("{SEGMENT_DIR}/{id:016x}.meta")
}

/// A sealed record ready to append: (record bytes, block id, tag).
pub type Sealed = (Vec<u8>, [u8; 16], [u8; 16]);

/// Data records sealed back to back: the bytes (the first `len` of `buf`),
/// and each record's (length, block id, tag) in order. Hand it back with
/// [`BlockIo::recycle`] once appended, so the next run reuses the buffer.
pub struct SealedRun {
    buf: Vec<u8>,
    len: usize,
    recs: Vec<(usize, [u8; 16], [u8; 16])>,
}

impl SealedRun {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Run buffers kept for reuse, and the largest one kept: a fresh buffer of a
/// request's size per WRITE cost page faults and zeroing (docs/PERFORMANCE.md).
/// They only ever hold records (ciphertext), never plaintext.
const RUN_POOL: usize = 8;
const RUN_POOL_MAX_BYTES: usize = 4 << 20;

const NODE_CACHE_SHARDS: usize = 16;
/// Tree nodes are zero-padded to a multiple of this before sealing.
const NODE_PAD: usize = 512;

pub struct BlockIo {
    pub storage: Arc<dyn Storage>,
    sealer: Sealer,
    /// The key domain (see `Header::key_domain`): bound in every block's AAD.
    pub volume_id: [u8; 16],
    segment_size: u64,
    writer: Mutex<Writer>,
    pub data_cache: BlockCache,
    nodes: Vec<Mutex<NodeShard>>,
    node_shard_bytes: usize,
    /// Where each node record lies in a mirror file, built on the first
    /// fallback to that mirror: segment id -> block id -> (offset, length).
    mirror_index: Mutex<std::collections::HashMap<u64, Arc<MirrorIndex>>>,
    /// Run buffers for reuse (see [`RUN_POOL`]).
    run_pool: Mutex<Vec<Vec<u8>>>,
}

type MirrorIndex = std::collections::HashMap<[u8; 16], (u64, usize)>;

/// Decoded tree nodes, bounded by their encoded size.
struct NodeShard {
    lru: LruCache<u128, (Arc<Node>, usize)>,
    bytes: usize,
}

impl BlockIo {
    pub fn new(
        storage: Arc<dyn Storage>,
        sealer: Sealer,
        volume_id: [u8; 16],
        segment_size: u32,
        next_segment: u64,
        cache_bytes: usize,
    ) -> Self {
        BlockIo {
            storage,
            sealer,
            volume_id,
            segment_size: segment_size as u64,
            writer: Mutex::new(Writer {
                current: None,
                written_back: 0,
                reserved: 0,
                next_segment,
                unsynced: BTreeSet::new(),
                mirrored: BTreeSet::new(),
                unsynced_mirrors: BTreeSet::new(),
                new_files: false,
            }),
            mirror_index: Mutex::new(std::collections::HashMap::new()),
            run_pool: Mutex::new(Vec::new()),
            data_cache: BlockCache::new(cache_bytes),
            nodes: (0..NODE_CACHE_SHARDS)
                .map(|_| {
                    Mutex::new(NodeShard {
                        lru: LruCache::unbounded(),
                        bytes: 0,
                    })
                })
                .collect(),
            // Metadata gets a quarter of the cache budget, at least 1 MiB.
            node_shard_bytes: (cache_bytes / 4).max(1 << 20) / NODE_CACHE_SHARDS,
        }
    }

    pub fn next_segment(&self) -> u64 {
        let w = self.writer.lock();
        w.next_segment
    }

    pub fn current_segment(&self) -> Option<u64> {
        self.writer.lock().current.map(|c| c.0)
    }

    /// Seals a block (no I/O): returns the record bytes, block id and tag.
    pub fn seal(&self, kind: BlockKind, plaintext: &[u8]) -> Sealed {
        let mut rec =
            Vec::with_capacity(RECORD_HEADER_LEN + self.sealer.sealed_len(plaintext.len()));
        let (block_id, tag) = self.seal_onto(kind, plaintext, &mut rec);
        (rec, block_id, tag)
    }

    /// Seals several blocks of one kind (no I/O), each into its own record,
    /// encrypting straight from `plaintexts` (no copy) and drawing their ids
    /// and nonces from the OS RNG with one call each.
    pub fn seal_many(&self, kind: BlockKind, plaintexts: &[&[u8]]) -> Vec<Sealed> {
        let mut ids = vec![0u8; 16 * plaintexts.len()];
        random_bytes(&mut ids);
        let ids: Vec<[u8; 16]> = ids
            .chunks_exact(16)
            .map(|c| c.try_into().expect("16-byte chunk"))
            .collect();
        let mut recs: Vec<Vec<u8>> = plaintexts
            .iter()
            .zip(&ids)
            .map(|(p, id)| {
                let sealed_len = self.sealer.sealed_len(p.len());
                // Every byte is written below (header here, the rest by the seal).
                let mut rec = vec![0u8; RECORD_HEADER_LEN + sealed_len];
                rec[..4].copy_from_slice(&((1 + 16 + sealed_len) as u32).to_le_bytes());
                rec[4] = kind as u8;
                rec[5..21].copy_from_slice(id);
                rec
            })
            .collect();
        let aads: Vec<[u8; 43]> = ids
            .iter()
            .map(|id| block_aad(&self.volume_id, id, kind))
            .collect();
        let mut jobs: Vec<(&[u8], &[u8], &mut [u8])> = aads
            .iter()
            .zip(plaintexts)
            .zip(recs.iter_mut())
            .map(|((a, p), r)| (&a[..], *p, &mut r[RECORD_HEADER_LEN..]))
            .collect();
        let tags = self.sealer.seal_many_to(&mut jobs);
        drop(jobs);
        recs.into_iter()
            .zip(ids)
            .zip(tags)
            .map(|((r, id), tag)| (r, id, tag))
            .collect()
    }

    /// Appends the record of `plaintext` to `buf`; returns its block id and tag.
    fn seal_onto(
        &self,
        kind: BlockKind,
        plaintext: &[u8],
        buf: &mut Vec<u8>,
    ) -> ([u8; 16], [u8; 16]) {
        let block_id: [u8; 16] = random_array();
        let sealed_len = self.sealer.sealed_len(plaintext.len());
        buf.reserve(RECORD_HEADER_LEN + sealed_len);
        buf.extend_from_slice(&((1 + 16 + sealed_len) as u32).to_le_bytes());
        buf.push(kind as u8);
        buf.extend_from_slice(&block_id);
        let aad = block_aad(&self.volume_id, &block_id, kind);
        self.sealer.seal_into(&aad, plaintext, buf);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&buf[buf.len() - 16..]);
        (block_id, tag)
    }

    /// Seals data blocks back to back into one buffer, for [`BlockIo::append_run`].
    /// Each block is encrypted straight from `chunks` into its record (no copy
    /// of the plaintext), in a buffer reused from earlier runs.
    pub fn seal_data_run(&self, chunks: &[&[u8]]) -> SealedRun {
        let total: usize = chunks
            .iter()
            .map(|c| RECORD_HEADER_LEN + self.sealer.sealed_len(c.len()))
            .sum();
        let mut buf = self.run_pool.lock().pop().unwrap_or_default();
        if buf.len() < total {
            // Every byte up to `total` is written below; only growth is zeroed.
            buf.resize(total, 0);
        }
        // All block ids with one call to the OS RNG, and all nonces with one more.
        let mut ids = vec![0u8; 16 * chunks.len()];
        random_bytes(&mut ids);
        let mut aads = Vec::with_capacity(chunks.len());
        let mut items: Vec<(&[u8], &mut [u8])> = Vec::with_capacity(chunks.len());
        let mut rest = &mut buf[..total];
        for (c, id) in chunks.iter().zip(ids.chunks_exact(16)) {
            let sealed_len = self.sealer.sealed_len(c.len());
            let (rec, tail) =
                std::mem::take(&mut rest).split_at_mut(RECORD_HEADER_LEN + sealed_len);
            rest = tail;
            let block_id: [u8; 16] = id.try_into().expect("16-byte chunk");
            let (head, body) = rec.split_at_mut(RECORD_HEADER_LEN);
            head[..4].copy_from_slice(&((1 + 16 + sealed_len) as u32).to_le_bytes());
            head[4] = BlockKind::Data as u8;
            head[5..21].copy_from_slice(&block_id);
            aads.push(block_aad(&self.volume_id, &block_id, BlockKind::Data));
            items.push((c, body));
        }
        let mut jobs: Vec<(&[u8], &[u8], &mut [u8])> = aads
            .iter()
            .zip(items)
            .map(|(a, (c, body))| (&a[..], c, body))
            .collect();
        let tags = self.sealer.seal_many_to(&mut jobs);
        drop(jobs);
        let recs = chunks
            .iter()
            .zip(ids.chunks_exact(16))
            .zip(tags)
            .map(|((c, id), tag)| {
                let block_id: [u8; 16] = id.try_into().expect("16-byte chunk");
                (
                    RECORD_HEADER_LEN + self.sealer.sealed_len(c.len()),
                    block_id,
                    tag,
                )
            })
            .collect();
        SealedRun {
            buf,
            len: total,
            recs,
        }
    }

    /// Takes back a run's buffer for the next [`BlockIo::seal_data_run`].
    pub fn recycle(&self, run: SealedRun) {
        if run.buf.len() <= RUN_POOL_MAX_BYTES {
            let mut pool = self.run_pool.lock();
            if pool.len() < RUN_POOL {
                pool.push(run.buf);
            }
        }
    }

    /// Appends a run of sealed data records so that they lie back to back in
    /// one segment (unless the run crosses a segment's end), with one write
    /// when it fits the current segment. Concurrent writers' blocks no longer
    /// interleave, so a later sequential read fetches a request's blocks with
    /// one read. Returns each record's place, in order.
    pub fn append_run(&self, run: &SealedRun) -> Result<Vec<BlockPtr>> {
        let mut w = self.writer.lock();
        let fits = match w.current {
            Some((_, len)) => len + run.len as u64 <= self.segment_size,
            None => false,
        };
        let mut out = Vec::with_capacity(run.recs.len());
        if !fits || run.recs.len() < 2 {
            let mut at = 0;
            for &(len, id, tag) in &run.recs {
                let rec = run
                    .bytes()
                    .get(at..at + len)
                    .ok_or_else(|| Error::Invalid("sealed run shorter than its records".into()))?;
                out.push(self.append_locked(&mut w, rec, id, tag)?);
                at += len;
            }
            return Ok(out);
        }
        let Some((seg, len)) = w.current else {
            return Err(Error::Invalid("no current segment".into()));
        };
        let name = segment_file_name(seg);
        if let Err(e) = self.storage.append(&name, run.bytes()) {
            // A partial append may have left a torn tail: never append after it.
            w.current = None;
            return Err(Error::io(format!("segment {name}"), e));
        }
        let end = len + run.len as u64;
        w.current = Some((seg, end));
        w.unsynced.insert(seg);
        self.reserve_ahead(&mut w, &name, end);
        if end - w.written_back >= WRITEBACK_STEP {
            self.storage
                .start_writeback(&name, w.written_back, end - w.written_back);
            w.written_back = end;
        }
        let mut at = len;
        for &(rlen, block_id, tag) in &run.recs {
            out.push(BlockPtr {
                segment: seg,
                offset: at as u32,
                len: rlen as u32,
                block_id,
                tag,
            });
            at += rlen as u64;
        }
        Ok(out)
    }

    /// Appends a sealed record; returns where it lives.
    pub fn append(&self, rec: &[u8], block_id: [u8; 16], tag: [u8; 16]) -> Result<BlockPtr> {
        let mut w = self.writer.lock();
        self.append_locked(&mut w, rec, block_id, tag)
    }

    fn append_locked(
        &self,
        w: &mut Writer,
        rec: &[u8],
        block_id: [u8; 16],
        tag: [u8; 16],
    ) -> Result<BlockPtr> {
        let need_new = match w.current {
            None => true,
            Some((_, len)) => {
                len + rec.len() as u64 > self.segment_size && len > SEGMENT_HEADER_LEN as u64
            }
        };
        if need_new {
            if let Some((old, len)) = w.current {
                let from = w.written_back;
                let name = segment_file_name(old);
                self.storage.start_writeback(&name, from, len - from);
                if w.reserved > len {
                    self.storage.release_tail(&name);
                }
            }
            w.written_back = 0;
            w.reserved = 0;
            let id = w.next_segment;
            w.next_segment += 1;
            let name = segment_file_name(id);
            self.storage
                .append(&name, &format::encode_segment_header(&self.volume_id, id))
                .map_err(|e| Error::io(format!("segment {name}"), e))?;
            w.current = Some((id, SEGMENT_HEADER_LEN as u64));
            w.new_files = true;
            w.unsynced.insert(id);
        }
        let (id, len) = w.current.unwrap();
        let name = segment_file_name(id);
        if let Err(e) = self.storage.append(&name, rec) {
            // A partial append may have left a torn tail: never append after it.
            w.current = None;
            return Err(Error::io(format!("segment {name}"), e));
        }
        let end = len + rec.len() as u64;
        w.current = Some((id, end));
        w.unsynced.insert(id);
        self.reserve_ahead(w, &name, end);
        if rec.get(4) == Some(&(BlockKind::Node as u8)) {
            let mirror = mirror_file_name(id);
            let r = if w.mirrored.contains(&id) {
                self.storage.append(&mirror, rec)
            } else {
                self.storage
                    .append(&mirror, &format::encode_segment_header(&self.volume_id, id))
                    .and_then(|()| self.storage.append(&mirror, rec))
            };
            if let Err(e) = r {
                // The node is in the segment but not mirrored: fail the
                // write like a failed append (the caller retries or reports),
                // and never append after a torn mirror tail.
                w.current = None;
                return Err(Error::io(format!("mirror {mirror}"), e));
            }
            if w.mirrored.insert(id) {
                w.new_files = true;
            }
            w.unsynced_mirrors.insert(id);
            // An index read before this record would not know it.
            self.forget_mirror(id);
        }
        // Keep the device busy while we write, instead of all at the next sync.
        if end - w.written_back >= WRITEBACK_STEP {
            self.storage
                .start_writeback(&name, w.written_back, end - w.written_back);
            w.written_back = end;
        }
        Ok(BlockPtr {
            segment: id,
            offset: len as u32,
            len: rec.len() as u32,
            block_id,
            tag,
        })
    }

    /// Keeps room reserved ahead of `end`, the append point of the current
    /// segment `name`, up to the segment's size.
    fn reserve_ahead(&self, w: &mut Writer, name: &str, end: u64) {
        if w.reserved >= end + PREALLOC_STEP || w.reserved >= self.segment_size {
            return;
        }
        let from = w.reserved.max(end);
        let to = (end + 2 * PREALLOC_STEP).min(self.segment_size);
        if to > from {
            self.storage.preallocate(name, from, to - from);
        }
        w.reserved = to;
    }

    /// Gives back room a crashed session reserved past the end of segment
    /// `id` (see [`PREALLOC_STEP`]); the segment's bytes do not change. For a
    /// segment no session appends to any more.
    pub fn release_tail(&self, id: u64) {
        let w = self.writer.lock();
        if w.current.map(|c| c.0) != Some(id) {
            self.storage.release_tail(&segment_file_name(id));
        }
    }

    pub fn write_block(&self, kind: BlockKind, plaintext: &[u8]) -> Result<BlockPtr> {
        let (rec, id, tag) = self.seal(kind, plaintext);
        self.append(&rec, id, tag)
    }

    /// Reads `len` bytes of a segment at `offset` into a new buffer, mapping a
    /// missing or short segment to an integrity error about `what`.
    fn fetch_vec(
        &self,
        segment: u64,
        offset: u64,
        len: usize,
        what: &dyn Fn() -> String,
    ) -> Result<Vec<u8>> {
        let name = segment_file_name(segment);
        self.storage
            .read_at_vec(&name, offset, len)
            .map_err(|e| Self::fetch_error(&name, e, what))
    }

    /// Reads `len` bytes of a segment through [`Storage::read_at_once`] and
    /// hands them to `f` (errors mapped as in [`Self::fetch_vec`]).
    fn fetch_once(
        &self,
        segment: u64,
        offset: u64,
        len: usize,
        what: &dyn Fn() -> String,
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<()> {
        let name = segment_file_name(segment);
        self.storage
            .read_at_once(&name, offset, len, f)
            .map_err(|e| Self::fetch_error(&name, e, what))
    }

    fn fetch_error(name: &str, e: std::io::Error, what: &dyn Fn() -> String) -> Error {
        match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::integrity(what(), format!("segment file {name} is missing"))
            }
            std::io::ErrorKind::UnexpectedEof => {
                Error::integrity(what(), format!("segment file {name} is truncated"))
            }
            _ => Error::io(name, e),
        }
    }

    fn check_len(p: &BlockPtr, kind: BlockKind) -> Result<()> {
        if (p.len as usize) < RECORD_HEADER_LEN + 16 || p.len > (format::MAX_BLOCK_SIZE + 4096) * 2
        {
            return Err(Error::integrity(
                format!("{kind:?} {p:?}"),
                "record length out of range",
            ));
        }
        Ok(())
    }

    /// Checks that `rec` is the record the pointer expects (length, kind, id, tag).
    fn check_record(rec: &[u8], p: &BlockPtr, kind: BlockKind) -> Result<()> {
        let len = u32::from_le_bytes(rec[0..4].try_into().unwrap()) as usize;
        if len + 4 != rec.len() || rec[4] != kind as u8 || rec[5..21] != p.block_id {
            return Err(Error::integrity(
                format!("{kind:?} {p:?}"),
                "the record at this place is not the expected block",
            ));
        }
        if rec[rec.len() - 16..] != p.tag {
            return Err(Error::integrity(
                format!("{kind:?} {p:?}"),
                "the block's tag does not match its parent",
            ));
        }
        Ok(())
    }

    /// Reads the raw record a pointer names and checks that it is the record
    /// the pointer expects (length, id, tag), without decrypting. A tree node
    /// that fails here is read from its mirror instead.
    pub fn read_raw(&self, p: &BlockPtr, kind: BlockKind) -> Result<Vec<u8>> {
        Self::check_len(p, kind)?;
        let primary = self
            .fetch_vec(p.segment, p.offset as u64, p.len as usize, &|| {
                format!("{kind:?} {p:?}")
            })
            .and_then(|rec| Self::check_record(&rec, p, kind).map(|()| rec));
        match primary {
            Err(e @ Error::Integrity { .. }) if kind == BlockKind::Node => {
                let rec = self.mirror_record(p).map_err(|_| e)?;
                self.warn_mirror_used(p);
                Ok(rec)
            }
            r => r,
        }
    }

    /// The copy of node `p` in its segment's mirror file, checked like the
    /// original (length, kind, id, tag).
    fn mirror_record(&self, p: &BlockPtr) -> Result<Vec<u8>> {
        let mut index = self.mirror_index_of(p.segment)?;
        if !index.contains_key(&p.block_id) {
            // The index may predate the record (the mirror of the open
            // segment grows): read it again once before giving up.
            self.forget_mirror(p.segment);
            index = self.mirror_index_of(p.segment)?;
        }
        let name = mirror_file_name(p.segment);
        let &(offset, len) = index.get(&p.block_id).ok_or_else(|| {
            Error::integrity(format!("Node {p:?}"), format!("no copy in mirror {name}"))
        })?;
        let rec = self
            .storage
            .read_at_vec(&name, offset, len)
            .map_err(|e| Error::io(&name, e))?;
        Self::check_record(&rec, p, BlockKind::Node)?;
        Ok(rec)
    }

    fn warn_mirror_used(&self, p: &BlockPtr) {
        log::warn!(
            "tree node {} in {} is damaged or missing; using its copy in {} \
             (run `kmsfs fsck` to see what else is damaged)",
            format::hex(&p.block_id),
            segment_file_name(p.segment),
            mirror_file_name(p.segment)
        );
    }

    /// For fsck: whether each copy of node `p` (in its segment, in the
    /// segment's mirror) reads and verifies, without falling back.
    pub fn check_node_copies(&self, p: &BlockPtr) -> (Result<()>, Result<()>) {
        let aad = block_aad(&self.volume_id, &p.block_id, BlockKind::Node);
        let open = |rec: Vec<u8>| -> Result<()> {
            self.sealer
                .open(&aad, &rec[RECORD_HEADER_LEN..])
                .map(|_| ())
                .map_err(|e| Error::integrity(format!("Node {p:?}"), e))
        };
        let primary = Self::check_len(p, BlockKind::Node)
            .and_then(|()| {
                self.fetch_vec(p.segment, p.offset as u64, p.len as usize, &|| {
                    format!("Node {p:?}")
                })
            })
            .and_then(|rec| Self::check_record(&rec, p, BlockKind::Node).map(|()| rec))
            .and_then(open);
        let mirror = self.mirror_record(p).and_then(open);
        (primary, mirror)
    }

    /// Where each record of a mirror file lies, read once per mirror.
    fn mirror_index_of(&self, segment: u64) -> Result<Arc<MirrorIndex>> {
        if let Some(i) = self.mirror_index.lock().get(&segment) {
            return Ok(i.clone());
        }
        let name = mirror_file_name(segment);
        let bytes = self.storage.read(&name).map_err(|e| Error::io(&name, e))?;
        let mut index = MirrorIndex::new();
        let mut at = SEGMENT_HEADER_LEN;
        // Records back to back; a torn or damaged tail ends the scan.
        while let Some(len) = bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        {
            let Some(rec) = bytes.get(at..at.saturating_add(4).saturating_add(len)) else {
                break;
            };
            if len < 1 + 16 + 16 {
                break;
            }
            if let Ok(id) = <[u8; 16]>::try_from(&rec[5..21]) {
                index.insert(id, (at as u64, rec.len()));
            }
            at += rec.len();
        }
        let index = Arc::new(index);
        self.mirror_index.lock().insert(segment, index.clone());
        Ok(index)
    }

    /// Forgets what is known of a mirror file (deleted or rewritten).
    pub fn forget_mirror(&self, segment: u64) {
        self.mirror_index.lock().remove(&segment);
    }

    fn open_record(&self, rec: &[u8], p: &BlockPtr, kind: BlockKind) -> Result<Vec<u8>> {
        Self::check_record(rec, p, kind)?;
        let aad = block_aad(&self.volume_id, &p.block_id, kind);
        self.sealer
            .open(&aad, &rec[RECORD_HEADER_LEN..])
            .map_err(|e| Error::integrity(format!("{kind:?} {p:?}"), e))
    }

    /// Plaintext length of the data record a pointer names.
    pub fn plain_len(&self, p: &BlockPtr) -> usize {
        (p.len as usize).saturating_sub(RECORD_HEADER_LEN + self.sealer.kind().overhead())
    }

    /// Reads and decrypts whole data blocks straight into the caller's buffers
    /// (each exactly `plain_len` long), without the cache: large sequential
    /// reads are kept by the kernel's page cache, and passing them through ours
    /// would only evict what small reads need. Records back to back on disk
    /// are fetched with one read.
    pub fn read_data_direct(&self, items: &mut [(BlockPtr, &mut [u8])]) -> Result<()> {
        let mut i = 0;
        while i < items.len() {
            let p0 = items[i].0;
            Self::check_len(&p0, BlockKind::Data)?;
            let mut j = i + 1;
            let mut bytes = p0.len as u64;
            while j < items.len() {
                let (prev, next) = (&items[j - 1].0, &items[j].0);
                if next.segment != p0.segment
                    || prev.offset as u64 + prev.len as u64 != next.offset as u64
                    || bytes >= (8 << 20)
                {
                    break;
                }
                Self::check_len(next, BlockKind::Data)?;
                bytes += next.len as u64;
                j += 1;
            }
            // Read once: around the segment file's page cache where the
            // storage can (FsStorage: O_DIRECT into a reused buffer),
            // saving the copy out of it.
            //
            // One thread per request: the kernel keeps several READs in
            // flight (a readahead window of four requests), and splitting a
            // request's blocks over scoped threads cost more CPU than it
            // saved in wall time (docs/PERFORMANCE.md).
            let mut opened = None;
            let run = &mut items[i..j];
            self.fetch_once(
                p0.segment,
                p0.offset as u64,
                bytes as usize,
                &|| format!("Data {p0:?}"),
                &mut |buf| opened = Some(self.open_run(buf, run)),
            )?;
            opened.unwrap_or_else(|| {
                Err(Error::integrity(
                    format!("Data {p0:?}"),
                    "the segment read handed back no bytes",
                ))
            })?;
            i = j;
        }
        Ok(())
    }

    /// Checks and decrypts the records of `run`, back to back in `buf`, each
    /// into its buffer.
    fn open_run(&self, buf: &[u8], run: &mut [(BlockPtr, &mut [u8])]) -> Result<()> {
        let mut at = 0usize;
        for (p, out) in run.iter_mut() {
            let rec = buf.get(at..at + p.len as usize).ok_or_else(|| {
                Error::integrity(format!("Data {p:?}"), "the segment read came back short")
            })?;
            at += p.len as usize;
            Self::check_record(rec, p, BlockKind::Data)?;
            let aad = block_aad(&self.volume_id, &p.block_id, BlockKind::Data);
            self.sealer
                .open_into(&aad, &rec[RECORD_HEADER_LEN..], out)
                .map_err(|e| Error::integrity(format!("Data {p:?}"), e))?;
        }
        Ok(())
    }

    /// Data blocks through the cache, for a run of pointers: misses that lie
    /// back to back in a segment are read with one call, and decrypted. One result per pointer, in order.
    pub fn read_data_many(&self, ptrs: &[BlockPtr]) -> Vec<Result<Arc<Plain>>> {
        let mut out: Vec<Option<Result<Arc<Plain>>>> = ptrs
            .iter()
            .map(|p| self.data_cache.get(p.id_u128()).map(Ok))
            .collect();
        // Runs of misses contiguous on disk: (first index, count, bytes).
        let mut runs: Vec<(usize, usize, u64)> = Vec::new();
        for (i, p) in ptrs.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            if let Err(e) = Self::check_len(p, BlockKind::Data) {
                out[i] = Some(Err(e));
                continue;
            }
            if let Some(r) = runs.last_mut() {
                let last = &ptrs[r.0 + r.1 - 1];
                if r.0 + r.1 == i
                    && last.segment == p.segment
                    && last.offset as u64 + last.len as u64 == p.offset as u64
                    && r.2 < (8 << 20)
                {
                    r.1 += 1;
                    r.2 += p.len as u64;
                    continue;
                }
            }
            runs.push((i, 1, p.len as u64));
        }
        // Fetch each run in one read; remember where each record sits.
        let mut fetched: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut recs: Vec<(usize, usize, usize)> = Vec::new(); // (index, buffer, start)
        for &(first, n, bytes) in &runs {
            let p0 = ptrs[first];
            let what = || format!("Data {p0:?}");
            match self.fetch_vec(p0.segment, p0.offset as u64, bytes as usize, &what) {
                Ok(buf) => {
                    let mut at = 0;
                    for (i, p) in ptrs.iter().enumerate().skip(first).take(n) {
                        recs.push((i, fetched.len(), at));
                        at += p.len as usize;
                    }
                    fetched.push((first, buf));
                }
                Err(_) => {
                    // Fall back to one read per record, for precise errors.
                    for (o, p) in out.iter_mut().zip(ptrs).skip(first).take(n) {
                        *o = Some(self.read_data(p));
                    }
                }
            }
        }
        let open = |&(i, b, at): &(usize, usize, usize)| -> (usize, Result<Arc<Plain>>) {
            let p = &ptrs[i];
            let rec = &fetched[b].1[at..at + p.len as usize];
            (
                i,
                self.open_record(rec, p, BlockKind::Data)
                    .map(|v| Arc::new(Plain(v))),
            )
        };
        // One thread: the mount already runs several requests at once, and a
        // thread per request cost more in switches than it saved.
        let opened: Vec<(usize, Result<Arc<Plain>>)> = recs.iter().map(open).collect();
        for (i, r) in opened {
            if let Ok(v) = &r {
                self.data_cache.insert(ptrs[i].id_u128(), v.clone());
            }
            out[i] = Some(r);
        }
        out.into_iter()
            .map(|o| o.expect("every pointer answered"))
            .collect()
    }

    /// Reads and decrypts a block (a tree node from its mirror when the
    /// original fails to read or to verify).
    pub fn read_block(&self, p: &BlockPtr, kind: BlockKind) -> Result<Vec<u8>> {
        let rec = self.read_raw(p, kind)?;
        let aad = block_aad(&self.volume_id, &p.block_id, kind);
        match self.sealer.open(&aad, &rec[RECORD_HEADER_LEN..]) {
            Ok(v) => Ok(v),
            Err(e) => {
                let e = Error::integrity(format!("{kind:?} {p:?}"), e);
                if kind != BlockKind::Node {
                    return Err(e);
                }
                let rec = self.mirror_record(p).map_err(|_| e)?;
                let v = self
                    .sealer
                    .open(&aad, &rec[RECORD_HEADER_LEN..])
                    .map_err(|e| Error::integrity(format!("{kind:?} {p:?} (mirror)"), e))?;
                self.warn_mirror_used(p);
                Ok(v)
            }
        }
    }

    /// Data block through the decrypted-block cache.
    pub fn read_data(&self, p: &BlockPtr) -> Result<Arc<Plain>> {
        let id = p.id_u128();
        if let Some(v) = self.data_cache.get(id) {
            return Ok(v);
        }
        let v = Arc::new(Plain(self.read_block(p, BlockKind::Data)?));
        self.data_cache.insert(id, v.clone());
        Ok(v)
    }

    /// Data block from the decrypted-block cache when it is there, else read
    /// and opened without adding it: for blocks about to be replaced (a merge
    /// of fragments), whose cache entry would only push out live ones.
    pub fn read_data_once(&self, p: &BlockPtr) -> Result<Arc<Plain>> {
        if let Some(v) = self.data_cache.get(p.id_u128()) {
            return Ok(v);
        }
        Ok(Arc::new(Plain(self.read_block(p, BlockKind::Data)?)))
    }

    /// Copies a record to the current segment unchanged (the cleaner's move).
    pub fn copy(&self, p: &BlockPtr, kind: BlockKind) -> Result<BlockPtr> {
        let rec = self.read_raw(p, kind)?;
        self.append(&rec, p.block_id, p.tag)
    }

    /// Makes every appended record durable.
    pub fn sync(&self) -> Result<()> {
        let mut w = self.writer.lock();
        let ids: Vec<u64> = w.unsynced.iter().copied().collect();
        for id in ids {
            let name = segment_file_name(id);
            self.storage
                .sync(&name)
                .map_err(|e| Error::io(format!("segment {name}"), e))?;
            w.unsynced.remove(&id);
        }
        let ids: Vec<u64> = w.unsynced_mirrors.iter().copied().collect();
        for id in ids {
            let name = mirror_file_name(id);
            self.storage
                .sync(&name)
                .map_err(|e| Error::io(format!("mirror {name}"), e))?;
            w.unsynced_mirrors.remove(&id);
        }
        if w.new_files {
            self.storage
                .sync_dir(SEGMENT_DIR)
                .map_err(|e| Error::io("segment directory", e))?;
            w.new_files = false;
        }
        Ok(())
    }

    fn cache_node(&self, id: u128, node: Arc<Node>) {
        let size = node.encoded_len() + 64;
        let mut sh = self.nodes[(id as usize) % NODE_CACHE_SHARDS].lock();
        if let Some((_, old)) = sh.lru.put(id, (node, size)) {
            sh.bytes -= old;
        }
        sh.bytes += size;
        while sh.bytes > self.node_shard_bytes {
            match sh.lru.pop_lru() {
                Some((_, (_, s))) => sh.bytes -= s,
                None => break,
            }
        }
    }

    fn cached_node(&self, id: u128) -> Option<Arc<Node>> {
        let mut sh = self.nodes[(id as usize) % NODE_CACHE_SHARDS].lock();
        sh.lru.get(&id).map(|(n, _)| n.clone())
    }

    pub fn forget_caches(&self) {
        for s in &self.nodes {
            let mut s = s.lock();
            s.lru.clear();
            s.bytes = 0;
        }
        self.data_cache.clear();
    }
}

impl Drop for BlockIo {
    /// The session's last segment keeps no reserved room past its end.
    fn drop(&mut self) {
        let w = self.writer.get_mut();
        if let Some((id, len)) = w.current
            && w.reserved > len
        {
            self.storage.release_tail(&segment_file_name(id));
        }
    }
}

impl NodeStore for BlockIo {
    fn load(&self, p: &BlockPtr) -> Result<Arc<Node>> {
        let id = p.id_u128();
        if let Some(n) = self.cached_node(id) {
            return Ok(n);
        }
        let b = self.read_block(p, BlockKind::Node)?;
        let n = Arc::new(
            Node::decode(&b).map_err(|e| Error::integrity(format!("tree node {p:?}"), e))?,
        );
        self.cache_node(id, n.clone());
        Ok(n)
    }

    fn store(&self, node: &Node) -> Result<BlockPtr> {
        let mut b = node.encode();
        b.resize(format::round_up(b.len(), NODE_PAD), 0);
        self.write_block(BlockKind::Node, &b)
    }

    fn remember(&self, p: &BlockPtr, node: Node) {
        self.cache_node(p.id_u128(), Arc::new(node));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{CipherKind, SecretKey};
    use crate::store::MemStorage;

    fn io(segment_size: u32) -> BlockIo {
        let sealer = Sealer::new(CipherKind::Aes256GcmSiv, &SecretKey::random());
        BlockIo::new(
            Arc::new(MemStorage::new()),
            sealer,
            [7u8; 16],
            segment_size,
            1,
            1 << 20,
        )
    }

    fn chunk(i: usize) -> Vec<u8> {
        (0..4096).map(|k| (k * 31 + i * 7) as u8).collect()
    }

    #[test]
    fn a_run_lies_back_to_back_and_reads_back() {
        let io = io(1 << 20);
        // Something in the segment first, so the run goes into a current one.
        io.write_block(BlockKind::Data, &chunk(99)).unwrap();
        let data: Vec<Vec<u8>> = (0..8).map(chunk).collect();
        let chunks: Vec<&[u8]> = data.iter().map(|c| &c[..]).collect();
        let run = io.seal_data_run(&chunks);
        let ptrs = io.append_run(&run).unwrap();
        io.recycle(run);
        assert_eq!(ptrs.len(), 8);
        for w in ptrs.windows(2) {
            assert_eq!(w[0].segment, w[1].segment);
            assert_eq!(w[0].offset + w[0].len, w[1].offset, "back to back");
        }
        for (p, c) in ptrs.iter().zip(&data) {
            assert_eq!(&io.read_data(p).unwrap().0, c);
        }
    }

    #[test]
    fn a_reused_run_buffer_leaves_nothing_stale_and_tampering_fails() {
        let mem = Arc::new(MemStorage::new());
        let sealer = Sealer::new(CipherKind::Aes256GcmSiv, &SecretKey::random());
        let io = BlockIo::new(mem.clone(), sealer, [7u8; 16], 1 << 20, 1, 1 << 20);
        io.write_block(BlockKind::Data, &chunk(99)).unwrap();
        // A large run first, then a smaller one in the same (recycled) buffer.
        let big: Vec<Vec<u8>> = (0..8).map(chunk).collect();
        let run = io.seal_data_run(&big.iter().map(|c| &c[..]).collect::<Vec<_>>());
        io.append_run(&run).unwrap();
        io.recycle(run);
        let small: Vec<Vec<u8>> = (20..23).map(|i| chunk(i)[..1000 + i].to_vec()).collect();
        let run = io.seal_data_run(&small.iter().map(|c| &c[..]).collect::<Vec<_>>());
        assert_eq!(
            run.bytes().len(),
            run.recs.iter().map(|r| r.0).sum::<usize>()
        );
        let ptrs = io.append_run(&run).unwrap();
        io.recycle(run);
        for (p, c) in ptrs.iter().zip(&small) {
            assert_eq!(&io.read_data(p).unwrap().0, c);
            assert_eq!(
                p.len as usize,
                RECORD_HEADER_LEN + io.sealer.sealed_len(c.len())
            );
        }
        // The segment ends with the small run's last record: nothing stale written.
        let last = ptrs.last().unwrap();
        let name = segment_file_name(last.segment);
        let seg_len = mem.with_file(&name, |f| f.len()).unwrap();
        assert_eq!(seg_len as u64, last.offset as u64 + last.len as u64);
        // Any flipped byte of a record in the run fails to read.
        io.forget_caches();
        let p = ptrs[1];
        for at in [0usize, 4, 5, 21, 40, p.len as usize - 1] {
            mem.with_file(&name, |f| f[p.offset as usize + at] ^= 1)
                .unwrap();
            assert!(io.read_data(&p).is_err(), "byte {at}");
            mem.with_file(&name, |f| f[p.offset as usize + at] ^= 1)
                .unwrap();
        }
        assert_eq!(&io.read_data(&p).unwrap().0, &small[1]);
    }

    #[test]
    fn sealed_together_each_record_reads_back_and_tampering_fails() {
        let mem = Arc::new(MemStorage::new());
        let sealer = Sealer::new(CipherKind::Aes256GcmSiv, &SecretKey::random());
        let io = BlockIo::new(mem.clone(), sealer, [7u8; 16], 1 << 20, 1, 1 << 20);
        let data: Vec<Vec<u8>> = vec![chunk(1), chunk(2)[..512].to_vec(), Vec::new()];
        let sealed = io.seal_many(
            BlockKind::Data,
            &data.iter().map(|c| &c[..]).collect::<Vec<_>>(),
        );
        assert_eq!(sealed.len(), 3);
        assert_ne!(sealed[0].1, sealed[1].1, "ids differ");
        let ptrs: Vec<BlockPtr> = sealed
            .into_iter()
            .map(|(rec, id, tag)| io.append(&rec, id, tag).unwrap())
            .collect();
        for (p, c) in ptrs.iter().zip(&data) {
            assert_eq!(&io.read_data(p).unwrap().0, c);
        }
        // Another kind's AAD does not open a data record.
        assert!(io.read_block(&ptrs[0], BlockKind::Node).is_err());
        io.forget_caches();
        let name = segment_file_name(ptrs[1].segment);
        let at = ptrs[1].offset as usize + RECORD_HEADER_LEN + 20;
        mem.with_file(&name, |f| f[at] ^= 0x80).unwrap();
        assert!(matches!(
            io.read_data(&ptrs[1]),
            Err(Error::Integrity { .. })
        ));
        assert_eq!(&io.read_data(&ptrs[0]).unwrap().0, &data[0]);
    }

    #[test]
    fn room_reserved_ahead_is_given_back_at_the_end_of_a_session() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let storage = Arc::new(crate::store::FsStorage::new(d.path()));
        storage.create_dir(format::SEGMENT_DIR).unwrap();
        let sealer = Sealer::new(CipherKind::Aes256GcmSiv, &SecretKey::random());
        let io = BlockIo::new(storage.clone(), sealer, [7u8; 16], 32 << 20, 1, 1 << 20);
        let data: Vec<Vec<u8>> = (0..16).map(chunk).collect();
        let run = io.seal_data_run(&data.iter().map(|c| &c[..]).collect::<Vec<_>>());
        io.write_block(BlockKind::Data, &chunk(99)).unwrap();
        let ptrs = io.append_run(&run).unwrap();
        io.recycle(run);
        io.sync().unwrap();
        let path = d.path().join(segment_file_name(ptrs[0].segment));
        let meta = || std::fs::metadata(&path).unwrap();
        let len = meta().len();
        let during = meta().blocks() * 512;
        for (p, c) in ptrs.iter().zip(&data) {
            assert_eq!(&io.read_data(p).unwrap().0, c);
        }
        drop(io);
        // The bytes are the same; reserved room (where the file system took
        // it: 8 MiB or more past the end) is given back.
        assert_eq!(meta().len(), len);
        if during >= len + (8 << 20) {
            assert!(
                meta().blocks() * 512 < len + (1 << 20),
                "{}",
                meta().blocks()
            );
        }
        // A crashed session's reservation: the next opener gives it back.
        let sealer = Sealer::new(CipherKind::Aes256GcmSiv, &SecretKey::random());
        let io = BlockIo::new(storage.clone(), sealer, [7u8; 16], 32 << 20, 9, 1 << 20);
        storage
            .append(&segment_file_name(ptrs[0].segment), b"")
            .unwrap();
        storage.preallocate(&segment_file_name(ptrs[0].segment), len, 8 << 20);
        let reserved = meta().blocks() * 512;
        io.release_tail(ptrs[0].segment);
        assert_eq!(meta().len(), len);
        if reserved >= len + (8 << 20) {
            assert!(
                meta().blocks() * 512 < len + (1 << 20),
                "{}",
                meta().blocks()
            );
        }
    }

    #[test]
    fn a_run_past_the_segment_end_continues_in_the_next() {
        // Room for about three records per segment.
        let io = io(3 * 4200 + SEGMENT_HEADER_LEN as u32);
        io.write_block(BlockKind::Data, &chunk(0)).unwrap();
        let data: Vec<Vec<u8>> = (1..8).map(chunk).collect();
        let chunks: Vec<&[u8]> = data.iter().map(|c| &c[..]).collect();
        let run = io.seal_data_run(&chunks);
        let ptrs = io.append_run(&run).unwrap();
        io.recycle(run);
        let segments: BTreeSet<u64> = ptrs.iter().map(|p| p.segment).collect();
        assert!(segments.len() >= 2, "{segments:?}");
        for (p, c) in ptrs.iter().zip(&data) {
            assert_eq!(&io.read_data(p).unwrap().0, c);
        }
    }
}
