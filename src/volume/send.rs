//! `send`: a snapshot's sealed records, exactly as stored, as a self-checking
//! stream (docs/STREAM-FORMAT.md) that a keyless receiver turns into a volume.
//!
//! The sender holds the key (it walks the snapshot's tree to find its records),
//! so it also seals what the receiver cannot: the target's volume header (a
//! clone's: own volume id, the source's key domain and wrapped DK) and its root
//! records. Records are never decrypted or re-encrypted: each goes out as its
//! segment bytes with the (segment, offset) its pointer names, so the tree
//! nodes, whose pointers name those places, stay valid in the target.
//!
//! An incremental stream is compact when the base's tree is the one this
//! volume last sent (noted in `kmsfs.sent`): the target holds all of it at
//! its places, so only the records the base's tree lacks go. Otherwise it is
//! robust: it sends the data and xattr records the base already
//! references as REF frames (block id and tag only): block ids survive the
//! cleaner's moves, so the receiver finds them wherever it holds them and
//! copies them locally if the source moved them. Tree nodes are always sent
//! in full (the cleaner gives a node it rewrites a new id, which the target
//! cannot have): those of the snapshot and of the base as it is now, so the
//! target lists both; they are about 0.1% of the data.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;

use super::{Tree, Volume, sign_header_with, value_ptr};
use crate::error::{Error, Result};
use crate::format::stream::{
    Begin, BlockFrame, End, FLAG_COMPACT, FLAG_INCREMENTAL, FrameWriter, RefFrame, RootFrame,
    SnapRef, TOKEN_LEN, frame,
};
use crate::format::{self, BlockKind, BlockPtr, Header, RootPayload, SnapshotRecord, tag};

/// What a send wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SendStats {
    /// Bytes written to the output.
    pub stream_bytes: u64,
    /// Records sent in full, and their bytes.
    pub blocks: u64,
    pub block_bytes: u64,
    /// Records the target already holds (sent as references).
    pub refs: u64,
    pub frames: u64,
    /// Frames skipped because the receiver already has them (resume).
    pub skipped_frames: u64,
    /// An incremental that sent only what the base lacks (see [`SendOptions`]).
    pub compact: bool,
}

/// How to send.
#[derive(Clone, Debug, Default)]
pub struct SendOptions {
    /// Leave out the frames an interrupted receive already has.
    pub resume: Option<ResumePoint>,
    /// Send an incremental that fits its base however the source's cleaner
    /// moved it since it was sent (references for every block, every node).
    /// Without it, an incremental whose base this volume sent with the tree
    /// it has now is compact: only the records the base lacks.
    pub robust: bool,
}

/// The file in which a volume notes what it sent (see [`Volume::send`]).
pub const SENT_FILE: &str = "kmsfs.sent";
const SENT_ENTRY: usize = TOKEN_LEN + format::PTR_LEN;

/// Where an interrupted receive stopped (`kmsfs receive --token` prints it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumePoint {
    pub stream_id: [u8; 32],
    pub next_index: u64,
    pub check: [u8; 32],
}

impl Volume {
    /// The opaque identity of a snapshot in streams: keyed, so that it shows
    /// nothing of the name, and stable when the cleaner moves its blocks.
    fn snapshot_token(&self, s: &SnapshotRecord) -> [u8; TOKEN_LEN] {
        let mut m = b"kmsfs send v1 snapshot".to_vec();
        m.extend_from_slice(&self.header.volume_id);
        m.extend_from_slice(&s.generation.to_le_bytes());
        m.extend_from_slice(&s.created.to_le_bytes());
        m.extend_from_slice(s.name.as_bytes());
        let mac = crate::crypto::hmac_sha256(&self.header_mac_key, &m);
        mac[..TOKEN_LEN].try_into().expect("16 bytes")
    }

    /// The volume id every stream of this volume gives its target: fixed per
    /// source, so that incrementals extend the volume a full stream created.
    fn send_target_id(&self) -> [u8; 16] {
        let mut m = b"kmsfs send v1 target".to_vec();
        m.extend_from_slice(&self.header.volume_id);
        let mac = crate::crypto::hmac_sha256(&self.header_mac_key, &m);
        mac[..16].try_into().expect("16 bytes")
    }

    /// Every record a tree references, by place: nodes, data and xattr blocks.
    fn tree_records(&self, tree: BlockPtr) -> Result<BTreeMap<(u64, u32), (BlockPtr, BlockKind)>> {
        let out = std::cell::RefCell::new(BTreeMap::new());
        let mut err = None;
        Tree::from_ptr(tree).walk(
            self.nodes(),
            &mut |p| {
                out.borrow_mut()
                    .insert((p.segment, p.offset), (*p, BlockKind::Node));
                true
            },
            &mut |k, v| {
                if let Some(p) = value_ptr(k, v) {
                    let kind = if k.get(8) == Some(&tag::XATTR) {
                        BlockKind::Xattr
                    } else {
                        BlockKind::Data
                    };
                    out.borrow_mut().insert((p.segment, p.offset), (p, kind));
                }
                Ok(())
            },
            &mut |_, e| {
                err.get_or_insert(e);
            },
        )?;
        match err {
            Some(e) => Err(e),
            None => Ok(out.into_inner()),
        }
    }

    fn find_snapshot(&self, name: &str) -> Result<SnapshotRecord> {
        self.st
            .read()
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "no snapshot named {name:?}; list them with `kmsfs snapshot list`"
                ))
            })
    }

    /// Writes the stream of snapshot `name` (incremental from `base` if
    /// given) to `out`. With `resume`, the frames the receiver already holds
    /// are checked (the source must be unchanged since) and left out.
    /// `progress(done, total)` counts record bytes.
    /// The tree each snapshot had when this volume last sent it (a hint:
    /// the receiver checks what a compact stream assumes).
    fn sent_trees(&self) -> std::collections::HashMap<[u8; TOKEN_LEN], BlockPtr> {
        let b = self.io.storage.read(SENT_FILE).unwrap_or_default();
        b.chunks_exact(SENT_ENTRY)
            .filter_map(|c| {
                let token: [u8; TOKEN_LEN] = c[..TOKEN_LEN].try_into().ok()?;
                Some((token, BlockPtr::from_bytes(&c[TOKEN_LEN..]).ok()?))
            })
            .collect()
    }

    pub fn send(
        &self,
        name: &str,
        base: Option<&str>,
        opts: &SendOptions,
        out: &mut dyn Write,
        progress: &dyn Fn(u64, u64),
    ) -> Result<SendStats> {
        let resume = opts.resume.as_ref();
        if self.snapshot.is_some() {
            return Err(Error::Invalid(
                "send needs the volume opened on its live tree, not a snapshot".into(),
            ));
        }
        let snap = self.find_snapshot(name)?;
        let base = base.map(|b| self.find_snapshot(b)).transpose()?;
        if let Some(b) = &base
            && b.generation >= snap.generation
        {
            return Err(Error::Invalid(format!(
                "base snapshot {} is not older than {}: an incremental goes from an older \
                 snapshot to a newer one; swap them",
                b.name, snap.name
            )));
        }
        let mut records = self.tree_records(snap.tree)?;
        // Compact: the base is as this volume sent it, so the target holds
        // every record of its tree at its place; only the others go.
        let compact = !opts.robust
            && base
                .as_ref()
                .is_some_and(|b| self.sent_trees().get(&self.snapshot_token(b)) == Some(&b.tree));
        // Data and xattr blocks the base references: the target holds them.
        // Robust: the base's tree goes along too (its nodes as they are now,
        // its blocks as references), so that the target lists it whatever
        // the cleaner did to it since it was sent.
        let held: HashSet<[u8; 16]> = match &base {
            None => HashSet::new(),
            Some(b) if compact => {
                let base_records = self.tree_records(b.tree)?;
                records.retain(|place, (p, _)| {
                    base_records
                        .get(place)
                        .is_none_or(|(q, _)| q.block_id != p.block_id)
                });
                HashSet::new()
            }
            Some(b) => {
                let base_records = self.tree_records(b.tree)?;
                let held = base_records
                    .values()
                    .filter(|(_, k)| *k != BlockKind::Node)
                    .map(|(p, _)| p.block_id)
                    .collect();
                records.extend(base_records);
                held
            }
        };
        let sent = |p: &BlockPtr, k: BlockKind| k == BlockKind::Node || !held.contains(&p.block_id);
        let total_bytes: u64 = records
            .values()
            .filter(|(p, k)| sent(p, *k))
            .map(|(p, _)| p.len as u64)
            .sum();
        let target_id = self.send_target_id();
        let header = Header {
            volume_id: target_id,
            created: snap.created,
            ..self.header()
        };
        let header_bytes = sign_header_with(&header, &self.header_mac_key);
        let roots = self.root_candidates(&snap, base.as_ref(), target_id)?;
        let begin = Begin {
            flags: match (&base, compact) {
                (None, _) => 0,
                (Some(_), false) => FLAG_INCREMENTAL,
                (Some(_), true) => FLAG_INCREMENTAL | FLAG_COMPACT,
            },
            source_volume: self.header.volume_id,
            key_domain: self.header.key_domain,
            target_volume: target_id,
            block_size: self.header.block_size,
            segment_size: self.header.segment_size,
            snapshot_token: self.snapshot_token(&snap),
            snapshot_generation: snap.generation,
            snapshot_tree: snap.tree,
            base_token: base
                .as_ref()
                .map(|b| self.snapshot_token(b))
                .unwrap_or([0; TOKEN_LEN]),
            base_tree: base.as_ref().map(|b| b.tree),
            total_frames: 2 + records.len() as u64 + roots.len() as u64 + 1,
            total_bytes,
            resume_index: 0,
            resume_check: [0; 32],
        };
        if let Some(r) = resume
            && (r.stream_id != begin.stream_id()
                || r.next_index < 2
                || r.next_index >= begin.total_frames)
        {
            return Err(Error::Invalid(
                "the resume token is for another stream, or the source changed since (its \
                 snapshot was cleaned or repaired): discard the partial receive with `kmsfs \
                 receive --abort TARGET` and send again without --resume"
                    .into(),
            ));
        }
        let skip_to = resume.map(|r| r.next_index).unwrap_or(0);
        let mut w = FrameWriter::new();
        let mut stats = SendStats::default();
        let mut emit = |w: &mut FrameWriter, ftype: u8, payload: &[u8], stats: &mut SendStats| {
            let index = w.index;
            let f = w.frame(ftype, payload);
            stats.frames += 1;
            if index < skip_to && index > 0 {
                stats.skipped_frames += 1;
                return Ok(());
            }
            if index == skip_to && skip_to > 0 {
                // The receiver's chain must be ours: else the source changed.
                let r = resume.expect("skip_to comes from resume");
                let mut b = begin.clone();
                b.resume_index = skip_to;
                b.resume_check = r.check;
                let mut first = FrameWriter::new();
                let bf = first.frame(frame::BEGIN, &b.encode());
                out.write_all(&bf).map_err(|e| Error::io("the output", e))?;
                stats.stream_bytes += bf.len() as u64;
                // `w.prev` is now this frame's check; the one before it must match.
            }
            if index == 0 && skip_to > 0 {
                return Ok(());
            }
            out.write_all(&f).map_err(|e| Error::io("the output", e))?;
            stats.stream_bytes += f.len() as u64;
            Ok::<(), Error>(())
        };
        emit(&mut w, frame::BEGIN, &begin.encode(), &mut stats)?;
        emit(&mut w, frame::HEADER, &header_bytes, &mut stats)?;
        let mut done = 0u64;
        for (p, kind) in records.values() {
            if skip_to > 0 && w.index == skip_to {
                let r = resume.expect("resume");
                if w.prev != r.check {
                    return Err(Error::Invalid(
                        "the source changed since the interrupted send (its snapshot was \
                         cleaned or repaired): discard the partial receive with `kmsfs receive \
                         --abort TARGET` and send again without --resume"
                            .into(),
                    ));
                }
            }
            if sent(p, *kind) {
                let rec = self.io.read_raw(p, *kind)?;
                let payload = BlockFrame::encode(p.segment, p.offset, &rec);
                emit(&mut w, frame::BLOCK, &payload, &mut stats)?;
                stats.blocks += 1;
                stats.block_bytes += rec.len() as u64;
                done += rec.len() as u64;
                progress(done, total_bytes);
            } else {
                let r = RefFrame {
                    segment: p.segment,
                    offset: p.offset,
                    len: p.len,
                    kind: *kind,
                    block_id: p.block_id,
                    tag: p.tag,
                };
                emit(&mut w, frame::REF, &r.encode(), &mut stats)?;
                stats.refs += 1;
            }
        }
        for r in &roots {
            if skip_to > 0 && w.index == skip_to {
                let rp = resume.expect("resume");
                if w.prev != rp.check {
                    return Err(Error::Invalid(
                        "the source changed since the interrupted send: send again without \
                         --resume after `kmsfs receive --abort TARGET`"
                            .into(),
                    ));
                }
            }
            emit(&mut w, frame::ROOT, &r.encode(), &mut stats)?;
        }
        let end = End {
            frames: begin.total_frames,
            blocks: stats.blocks,
            refs: stats.refs,
            block_bytes: stats.block_bytes,
        };
        emit(&mut w, frame::END, &end.encode(), &mut stats)?;
        out.flush().map_err(|e| Error::io("the output", e))?;
        // Note the tree sent, so that an incremental from it can be compact.
        let mut entry = self.snapshot_token(&snap).to_vec();
        entry.extend_from_slice(&snap.tree.to_bytes());
        if let Err(e) = self.io.storage.append(SENT_FILE, &entry) {
            log::warn!(
                "could not note the sent snapshot in {SENT_FILE} ({e}); an incremental from it \
                 will be a robust one"
            );
        }
        stats.compact = compact;
        Ok(stats)
    }

    /// The root records the target may take, most complete first: the
    /// snapshots older than the base, the base and the new one (if the target
    /// holds the older ones unchanged); the base and the new one; for a full
    /// stream, the new one alone.
    fn root_candidates(
        &self,
        snap: &SnapshotRecord,
        base: Option<&SnapshotRecord>,
        target_id: [u8; 16],
    ) -> Result<Vec<RootFrame>> {
        let sref = |s: &SnapshotRecord| SnapRef {
            token: self.snapshot_token(s),
            tree: s.tree,
        };
        // (snapshots required unchanged, snapshots carried by this stream)
        let mut sets: Vec<(Vec<SnapshotRecord>, Vec<SnapshotRecord>)> = Vec::new();
        match base {
            Some(b) => {
                let mut older: Vec<SnapshotRecord> = self
                    .st
                    .read()
                    .snapshots
                    .iter()
                    .filter(|s| s.generation < b.generation)
                    .cloned()
                    .collect();
                older.sort_by_key(|s| s.generation);
                if !older.is_empty() {
                    sets.push((older, vec![b.clone(), snap.clone()]));
                }
                sets.push((Vec::new(), vec![b.clone(), snap.clone()]));
            }
            None => sets.push((Vec::new(), vec![snap.clone()])),
        }
        let next_segment = self.io.next_segment();
        Ok(sets
            .into_iter()
            .map(|(requires, carried)| {
                let mut listed = requires.clone();
                listed.extend(carried);
                let payload = RootPayload {
                    tree: snap.tree,
                    next_ino: snap.next_ino,
                    next_segment,
                    committed: snap.created,
                    snapshots: listed.clone(),
                };
                RootFrame {
                    requires: requires.iter().map(sref).collect(),
                    lists: listed.iter().map(sref).collect(),
                    generation: snap.generation,
                    record: self.seal_root(&target_id, snap.generation, &payload),
                }
            })
            .collect())
    }
}

/// A resume token as `kmsfs receive --token` prints it.
pub fn parse_resume_token(s: &str) -> Result<ResumePoint> {
    let (stream_id, next_index, check) = format::stream::parse_token(s).map_err(|e| {
        Error::Invalid(format!(
            "bad resume token ({e}); print it with `kmsfs receive --token TARGET`"
        ))
    })?;
    Ok(ResumePoint {
        stream_id,
        next_index,
        check,
    })
}
