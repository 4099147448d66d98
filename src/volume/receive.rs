//! `receive`: turns a send stream into a volume, or extends one, without any
//! key (docs/STREAM-FORMAT.md, "Receiving").
//!
//! Records land at the (segment, offset) their pointers name. Until the
//! receive commits, every write goes to the staging directory
//! `kmsfs.recv/seg/`: a new segment as a whole file; for a segment the target
//! already has, a sparse file of the new records at their offsets, copied in
//! place by the commit (where the target has no record). Tree node records also go to the segment's mirror. The receiving
//! side tracks, in `kmsfs.received`, every record it holds (place, id, tag)
//! and the snapshots its root record lists, so an incremental is checked
//! against its base and its references are found without a key.
//!
//! Nothing becomes visible before the END frame checked out: then a commit
//! plan (`kmsfs.recv/commit`) is written, and applied (staged files renamed
//! into `seg/`, header, root slot, state); an interrupted apply is finished by
//! the next receive. A receive that stops midway keeps `kmsfs.recv/progress`
//! (checkpointed as it goes) for `--resume`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::sync::Arc;

use super::{ROOT_SLOTS, write_durably, write_durably_via};
use crate::error::{Error, Result};
use crate::format::stream::{
    Begin, BlockFrame, CommitPlan, End, FrameError, FrameReader, HELD_RECORD_LEN, HeldRecord,
    Progress, RECEIVED_FILE, RECV_COMMIT_FILE, RECV_DIR, RECV_PROGRESS_FILE, RECV_RECORDS_FILE,
    RECV_SEG_DIR, ReceivedState, RefFrame, RootFrame, frame, sha256,
};
use crate::format::{
    self, BlockKind, Header, SEGMENT_DIR, SEGMENT_HEADER_LEN, encode_segment_header,
    segment_file_name,
};
use crate::store::Storage;

/// The stream's volume header, kept for a resumed stream (which has none).
const RECV_HEADER_FILE: &str = "kmsfs.recv/header";
/// Records written between two checkpoints of the resume point, at most.
const CHECKPOINT_BYTES: u64 = 64 << 20;
/// ... or this many record frames.
const CHECKPOINT_FRAMES: u64 = 1024;
/// Largest record a stream may place (as the reader of blocks accepts).
const MAX_RECORD: u32 = (format::MAX_BLOCK_SIZE + 4096) * 2;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceiveOptions {
    /// Continue an interrupted receive of the same stream.
    pub resume: bool,
}

/// What a receive did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceiveStats {
    pub stream_bytes: u64,
    pub blocks: u64,
    pub block_bytes: u64,
    pub refs: u64,
    /// Referenced records the source had moved: copied within the target.
    pub copied: u64,
    pub incremental: bool,
    /// Snapshots the target's root record lists now.
    pub snapshots: usize,
    /// Frames that were already applied before an interruption.
    pub resumed_from: u64,
}

fn refuse(msg: impl Into<String>) -> Error {
    Error::Stream(msg.into())
}

/// The hint every refusal of a damaged stream ends with.
const UNCHANGED: &str = "the target is unchanged";

fn io(what: impl Into<String>, e: std::io::Error) -> Error {
    Error::io(what, e)
}

/// Where the receiving side keeps each record, by id and by place.
#[derive(Default)]
struct Held {
    by_id: HashMap<[u8; 16], HeldRecord>,
    by_place: BTreeMap<(u64, u32), (u32, [u8; 16])>,
}

impl Held {
    fn add(&mut self, r: HeldRecord) {
        self.by_id.insert(r.block_id, r);
        self.by_place
            .insert((r.segment, r.offset), (r.len, r.block_id));
    }
    /// Whether [offset, offset+len) of the segment is free, or already holds
    /// exactly this record (Some(true)); None when it overlaps another.
    fn place(&self, segment: u64, offset: u32, len: u32, id: &[u8; 16]) -> Option<bool> {
        if let Some((l, i)) = self.by_place.get(&(segment, offset)) {
            return (*l == len && i == id).then_some(true);
        }
        let end = offset as u64 + len as u64;
        if let Some((&(s, o), &(l, _))) = self.by_place.range(..(segment, offset)).next_back()
            && s == segment
            && o as u64 + l as u64 > offset as u64
        {
            return None;
        }
        if let Some((&(s, o), _)) = self.by_place.range((segment, offset)..).next()
            && s == segment
            && (o as u64) < end
        {
            return None;
        }
        Some(false)
    }
}

/// One receive in progress.
struct Receiver<'a> {
    st: &'a dyn Storage,
    /// Segments (and mirrors) the target had before this receive: written in place.
    existing_segs: BTreeSet<u64>,
    existing_mirrors: BTreeSet<u64>,
    /// Files written since the last checkpoint (synced before it).
    touched: BTreeSet<String>,
    /// Staged segments and mirrors (created by this receive).
    staged_segs: BTreeSet<u64>,
    staged_mirrors: BTreeSet<u64>,
    held: Held,
    /// Records this receive wrote, in order; the first `journaled` are in
    /// the journal `kmsfs.recv/records`.
    written: Vec<HeldRecord>,
    journaled: usize,
    /// Places written by this receive (in staged files).
    fresh: std::collections::HashSet<(u64, u32)>,
    progress: Progress,
    since_checkpoint: u64,
    frames_since_checkpoint: u64,
    key_domain: [u8; 16],
}

fn staged_seg(id: u64) -> String {
    format!("{RECV_SEG_DIR}/{id:016x}.seg")
}
fn staged_mirror(id: u64) -> String {
    format!("{RECV_SEG_DIR}/{id:016x}.meta")
}

impl Receiver<'_> {
    /// The staged file of segment `id`: the whole new segment, or for a
    /// segment the target has, a sparse file of the new records only.
    fn seg_file(&mut self, id: u64) -> Result<String> {
        let name = staged_seg(id);
        if self.staged_segs.insert(id) && !self.st.exists(&name) {
            self.st
                .write_at(&name, 0, &encode_segment_header(&self.key_domain, id))
                .map_err(|e| io(&name, e))?;
        }
        Ok(name)
    }

    /// Appends a node record to the segment's mirror (staged: a copy of the
    /// target's mirror, if it has one, plus the new records).
    fn mirror(&mut self, id: u64, rec: &[u8]) -> Result<()> {
        let name = staged_mirror(id);
        if self.staged_mirrors.insert(id) && !self.st.exists(&name) {
            let start = if self.existing_mirrors.contains(&id) {
                let m = super::blocks::mirror_file_name(id);
                self.st.read(&m).map_err(|e| io(&m, e))?
            } else {
                encode_segment_header(&self.key_domain, id)
            };
            self.st
                .write_file(&name, &start)
                .map_err(|e| io(&name, e))?;
        }
        self.st.append(&name, rec).map_err(|e| io(&name, e))?;
        self.touched.insert(name);
        Ok(())
    }

    /// Puts a record at its place (checked free, or holding it already).
    fn put(&mut self, segment: u64, offset: u32, rec: &[u8], r: HeldRecord) -> Result<bool> {
        if (offset as usize) < SEGMENT_HEADER_LEN || r.len > MAX_RECORD {
            return Err(refuse(format!(
                "the stream places a record at offset {offset} of segment {segment:016x}, \
                 where none can be: the stream is damaged or forged; {UNCHANGED}"
            )));
        }
        match self.held.place(segment, offset, r.len, &r.block_id) {
            Some(true) => return Ok(false),
            Some(false) => {}
            None => {
                return Err(refuse(format!(
                    "the stream's record at offset {offset} of segment {segment:016x} overlaps \
                     one the target holds: the target is not the volume this stream extends \
                     (it was changed, or the base differs); {UNCHANGED}. Receive a full stream \
                     into a new directory"
                )));
            }
        }
        let name = self.seg_file(segment)?;
        self.st
            .write_at(&name, offset as u64, rec)
            .map_err(|e| io(&name, e))?;
        self.touched.insert(name);
        if r.kind == BlockKind::Node {
            self.mirror(segment, rec)?;
        }
        self.held.add(r);
        self.fresh.insert((r.segment, r.offset));
        self.written.push(r);
        self.since_checkpoint += rec.len() as u64;
        Ok(true)
    }

    fn read_held(&self, r: &HeldRecord) -> Result<Vec<u8>> {
        if r.len > MAX_RECORD {
            return Err(refuse(format!(
                "{RECEIVED_FILE} names a record of {} bytes, more than any record: it is damaged; receive a full stream into a new directory",
                r.len
            )));
        }
        let name = if self.existing_segs.contains(&r.segment)
            && !self.fresh.contains(&(r.segment, r.offset))
        {
            segment_file_name(r.segment)
        } else {
            staged_seg(r.segment)
        };
        let rec = self
            .st
            .read_at_vec(&name, r.offset as u64, r.len as usize)
            .map_err(|e| io(&name, e))?;
        let facts = format::stream::record_facts(&rec);
        match facts {
            Ok(f) if f.block_id == r.block_id && f.tag == r.tag && f.kind == r.kind => Ok(rec),
            _ => Err(refuse(format!(
                "the record the base should hold at offset {} of {name} is not there (the \
                 target's files were modified); {UNCHANGED}. Check it with `kmsfs fsck`, or \
                 receive a full stream into a new directory",
                r.offset
            ))),
        }
    }

    fn checkpoint(&mut self, force: bool) -> Result<()> {
        self.frames_since_checkpoint += 1;
        if !force
            && self.since_checkpoint < CHECKPOINT_BYTES
            && self.frames_since_checkpoint < CHECKPOINT_FRAMES
        {
            return Ok(());
        }
        for name in std::mem::take(&mut self.touched) {
            self.st.sync(&name).map_err(|e| io(&name, e))?;
        }
        if !self.staged_segs.is_empty() || !self.staged_mirrors.is_empty() {
            self.st
                .sync_dir(RECV_SEG_DIR)
                .map_err(|e| io(RECV_SEG_DIR, e))?;
        }
        if self.journaled < self.written.len() {
            let mut b = Vec::with_capacity((self.written.len() - self.journaled) * HELD_RECORD_LEN);
            for r in &self.written[self.journaled..] {
                b.extend_from_slice(&r.to_bytes());
            }
            self.st
                .append(RECV_RECORDS_FILE, &b)
                .map_err(|e| io(RECV_RECORDS_FILE, e))?;
            self.journaled = self.written.len();
        }
        if self.journaled > 0 {
            self.st
                .sync(RECV_RECORDS_FILE)
                .map_err(|e| io(RECV_RECORDS_FILE, e))?;
        }
        self.progress.records = self.journaled as u64;
        write_staged(self.st, RECV_PROGRESS_FILE, &self.progress.encode())?;
        self.since_checkpoint = 0;
        self.frames_since_checkpoint = 0;
        Ok(())
    }
}

/// As `write_durably`, for a file in the staging directory: the rename is
/// made durable there (a rename is durable once its directory is synced).
fn write_staged(st: &dyn Storage, name: &str, data: &[u8]) -> Result<()> {
    write_durably_via(st, &format!("{name}.tmp"), name, data)?;
    st.sync_dir(RECV_DIR).map_err(|e| io(RECV_DIR, e))
}

/// Reads the state of a received volume (None for an empty directory).
fn load_state(st: &dyn Storage) -> Result<Option<(ReceivedState, Header)>> {
    let has_volume = st.exists(format::HEADER_FILE) || ROOT_SLOTS.iter().any(|n| st.exists(n));
    if !has_volume {
        return Ok(None);
    }
    let b = st.read(RECEIVED_FILE).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            refuse(format!(
                "{} holds a volume that was not made by `kmsfs receive`; receive into an empty \
                 directory",
                st.describe()
            ))
        } else {
            io(RECEIVED_FILE, e)
        }
    })?;
    let state = ReceivedState::decode(&b).map_err(|e| {
        refuse(format!(
            "{}: {e}; receive a full stream into a new directory",
            st.describe()
        ))
    })?;
    let hb = st
        .read(format::HEADER_FILE)
        .map_err(|e| io(format::HEADER_FILE, e))?;
    let header = Header::decode(&hb).map_err(|e| {
        refuse(format!(
            "{}: volume header: {e}; receive a full stream into a new directory",
            st.describe()
        ))
    })?;
    // The newest root must be the one the last receive wrote.
    let slot = ROOT_SLOTS[state.newest_slot as usize];
    let root = st.read(slot).map_err(|e| io(slot, e))?;
    let newest_other = ROOT_SLOTS
        .iter()
        .filter(|n| **n != slot)
        .filter_map(|n| st.read(n).ok())
        .filter_map(|b| format::split_root(&b).ok().map(|(_, g, _, _)| g))
        .any(|g| g > state.generation);
    if sha256(&root) != state.root_sha || newest_other {
        return Err(refuse(format!(
            "{} changed since its last receive (it was opened read-write, or its root record \
             was replaced); it cannot be extended. Receive a full stream into a new directory",
            st.describe()
        )));
    }
    Ok(Some((state, header)))
}

/// Finishes a commit whose plan is written (idempotent).
fn apply_commit(st: &dyn Storage, plan: &CommitPlan) -> Result<()> {
    st.create_dir(SEGMENT_DIR).map_err(|e| io(SEGMENT_DIR, e))?;
    // Records for segments the target had: copied into place from the staged
    // patch files (a patch file already removed was applied before).
    let mut patched = BTreeSet::new();
    for r in &plan.patches {
        if r.len > MAX_RECORD {
            return Err(refuse(format!(
                "{RECV_COMMIT_FILE} names a record of {} bytes: it is damaged; remove {RECV_DIR}                  and receive again",
                r.len
            )));
        }
        let from = staged_seg(r.segment);
        let rec = match st.read_at_vec(&from, r.offset as u64, r.len as usize) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&from, e)),
        };
        let to = segment_file_name(r.segment);
        st.write_at(&to, r.offset as u64, &rec)
            .map_err(|e| io(&to, e))?;
        patched.insert(r.segment);
    }
    for id in &patched {
        let to = segment_file_name(*id);
        st.sync(&to).map_err(|e| io(&to, e))?;
    }
    let patch_segs: BTreeSet<u64> = plan.patches.iter().map(|r| r.segment).collect();
    for id in &patch_segs {
        match st.remove(&staged_seg(*id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(staged_seg(*id), e)),
        }
    }
    // New segments and the mirrors (whole files) are renamed into place.
    let staged = st.list(RECV_SEG_DIR).unwrap_or_default();
    for n in &staged {
        let from = format!("{RECV_SEG_DIR}/{n}");
        let to = format!("{SEGMENT_DIR}/{n}");
        st.sync(&from).map_err(|e| io(&from, e))?;
        st.rename(&from, &to).map_err(|e| io(&to, e))?;
    }
    st.sync_dir(SEGMENT_DIR).map_err(|e| io(SEGMENT_DIR, e))?;
    if !plan.header.is_empty() {
        write_durably(st, format::HEADER_BACKUP_FILE, &plan.header)?;
        write_durably(st, format::HEADER_FILE, &plan.header)?;
    }
    write_durably_via(
        st,
        format::ROOT_TMP_FILE,
        ROOT_SLOTS[plan.slot as usize],
        &plan.root,
    )?;
    write_durably(st, RECEIVED_FILE, &plan.state)?;
    clear_staging(st)
}

/// Empties the staging directory; the commit plan goes last, so that an
/// interruption leaves either a plan to finish or nothing.
fn clear_staging(st: &dyn Storage) -> Result<()> {
    let Ok(top) = st.list(RECV_DIR) else {
        return Ok(());
    };
    for n in st.list(RECV_SEG_DIR).unwrap_or_default() {
        let p = format!("{RECV_SEG_DIR}/{n}");
        st.remove(&p).map_err(|e| io(&p, e))?;
    }
    st.sync_dir(RECV_SEG_DIR).map_err(|e| io(RECV_SEG_DIR, e))?;
    for n in &top {
        let p = format!("{RECV_DIR}/{n}");
        if p != RECV_SEG_DIR && p != RECV_COMMIT_FILE {
            st.remove(&p).map_err(|e| io(&p, e))?;
        }
    }
    st.sync_dir(RECV_DIR).map_err(|e| io(RECV_DIR, e))?;
    if top
        .iter()
        .any(|n| format!("{RECV_DIR}/{n}") == RECV_COMMIT_FILE)
    {
        st.remove(RECV_COMMIT_FILE)
            .map_err(|e| io(RECV_COMMIT_FILE, e))?;
        st.sync_dir(RECV_DIR).map_err(|e| io(RECV_DIR, e))?;
    }
    // The (now empty) directories stay for the next receive.
    Ok(())
}

/// Discards an interrupted receive (the target stays as it was).
pub fn abort_receive(st: &dyn Storage) -> Result<bool> {
    if st.exists(RECV_COMMIT_FILE) {
        return Err(refuse(format!(
            "{}: the interrupted receive had already been verified and is being made visible; \
             finish it with `kmsfs receive --resume` (any stream) instead",
            st.describe()
        )));
    }
    let had =
        st.exists(RECV_PROGRESS_FILE) || !st.list(RECV_SEG_DIR).unwrap_or_default().is_empty();
    clear_staging(st)?;
    Ok(had)
}

/// The resume token of an interrupted receive, if there is one.
pub fn resume_token(st: &dyn Storage) -> Result<Option<String>> {
    match st.read(RECV_PROGRESS_FILE) {
        Ok(b) => Ok(Some(
            Progress::decode(&b)
                .map_err(|e| {
                    refuse(format!(
                        "{e}; discard the interrupted receive with `kmsfs receive --abort`"
                    ))
                })?
                .token(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(RECV_PROGRESS_FILE, e)),
    }
}

fn frame_err(e: FrameError, resumable: bool) -> Error {
    match e {
        FrameError::Truncated(m) => refuse(format!(
            "the stream is incomplete: {m}; {UNCHANGED}{}",
            if resumable {
                ". Continue with `kmsfs receive --resume` (`kmsfs receive --token TARGET` prints \
                 the token for `kmsfs send --resume`), or discard it with `kmsfs receive --abort`"
            } else {
                ""
            }
        )),
        FrameError::Damaged(m) => refuse(format!(
            "the stream is damaged: {m}; {UNCHANGED}. Send it again{}",
            if resumable {
                " (`kmsfs receive --resume` continues from the last good frame)"
            } else {
                ""
            }
        )),
        FrameError::Io(e) => io("the input stream", e),
    }
}

/// Receives a stream into the volume directory `st` (empty, or a volume an
/// earlier receive made). Needs no key. `progress(done, total)` counts
/// record bytes.
pub fn receive(
    st: Arc<dyn Storage>,
    input: &mut dyn Read,
    opts: &ReceiveOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<ReceiveStats> {
    let st: &dyn Storage = &*st;
    let _lock = crate::store::lock_volume(st)?;
    // A verified receive interrupted while it was made visible: finish it.
    let mut rolled_forward = false;
    if let Ok(b) = st.read(RECV_COMMIT_FILE) {
        let plan = CommitPlan::decode(&b).map_err(|e| {
            refuse(format!(
                "{e}; the interrupted receive cannot be finished: remove {RECV_DIR} in {}",
                st.describe()
            ))
        })?;
        apply_commit(st, &plan)?;
        rolled_forward = true;
        log::warn!(
            "{}: finished the receive that was interrupted while it was made visible",
            st.describe()
        );
    }
    let existing = load_state(st)?;
    let pending = match st.read(RECV_PROGRESS_FILE) {
        Ok(b) => Some(Progress::decode(&b).map_err(|e| {
            refuse(format!(
                "{e}; discard the interrupted receive with `kmsfs receive --abort`"
            ))
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(RECV_PROGRESS_FILE, e)),
    };
    if pending.is_some() && !opts.resume {
        return Err(refuse(format!(
            "{} has an interrupted receive; continue it with `kmsfs receive --resume` (the same \
             stream, or `kmsfs send --resume TOKEN` with the token of `kmsfs receive --token`), \
             or discard it with `kmsfs receive --abort`",
            st.describe()
        )));
    }
    if pending.is_none() && opts.resume && !rolled_forward {
        return Err(refuse(format!(
            "{} has no interrupted receive to resume; receive without --resume",
            st.describe()
        )));
    }
    if pending.is_none() {
        // Leftovers of a receive that never checkpointed.
        clear_staging(st)?;
    }

    let mut reader = FrameReader::new(input);
    let resumable = pending.is_some();
    let first = reader
        .next_frame()
        .map_err(|e| frame_err(e, false))?
        .ok_or_else(|| refuse(format!("the stream is empty; {UNCHANGED}")))?;
    let begin = Begin::decode(&first.payload)
        .map_err(|e| refuse(format!("the stream's BEGIN frame: {e}; {UNCHANGED}")))?;
    let mut stats = ReceiveStats {
        incremental: begin.is_incremental(),
        ..Default::default()
    };
    // Where this stream may go.
    match (&existing, begin.is_incremental()) {
        (Some(_), false) => {
            return Err(refuse(format!(
                "{} already holds a received volume, and this is a full stream; receive it into \
                 a new, empty directory (or send an incremental with `kmsfs send --from BASE`)",
                st.describe()
            )));
        }
        (None, true) => {
            return Err(refuse(format!(
                "this is an incremental stream, and {} holds no volume: receive the full stream \
                 of its base snapshot first",
                st.describe()
            )));
        }
        (Some((s, h)), true) => {
            if s.target_volume != begin.target_volume || h.key_domain != begin.key_domain {
                return Err(refuse(format!(
                    "the stream is from another volume than the one {} received before; \
                     {UNCHANGED}",
                    st.describe()
                )));
            }
            let Some(base) = s.snapshots.iter().find(|r| r.token == begin.base_token) else {
                return Err(refuse(format!(
                    "{} does not hold the stream's base snapshot (it holds {} other snapshot(s)); \
                     send an incremental from a snapshot the target holds, or a full stream into \
                     a new directory; {UNCHANGED}",
                    st.describe(),
                    s.snapshots.len()
                )));
            };
            // The base's root node must still be where it was received.
            let root = s
                .records
                .iter()
                .find(|r| r.block_id == base.tree.block_id)
                .copied();
            let intact = root.is_some_and(|r| {
                r.segment == base.tree.segment
                    && r.offset == base.tree.offset
                    && r.tag == base.tree.tag
            });
            if begin.is_compact() && Some(base.tree) != begin.base_tree {
                return Err(refuse(format!(
                    "this compact incremental assumes the base snapshot as the source has it \
                     now, but the source's cleaner has moved it since {} received it; {UNCHANGED}. \
                     Send again with `kmsfs send VOLUME SNAPSHOT --from BASE --robust`",
                    st.describe()
                )));
            }
            if !intact {
                return Err(refuse(format!(
                    "the base snapshot in {} is not as it was received (its records changed); \
                     {UNCHANGED}. Receive a full stream into a new directory",
                    st.describe()
                )));
            }
            if s.snapshots.iter().any(|r| r.token == begin.snapshot_token) {
                return Err(refuse(format!(
                    "{} already holds this stream's snapshot; nothing to do",
                    st.describe()
                )));
            }
            if begin.snapshot_generation <= s.generation {
                return Err(refuse(format!(
                    "{} already holds a newer state than this stream (generation {} >= {}); \
                     {UNCHANGED}",
                    st.describe(),
                    s.generation,
                    begin.snapshot_generation
                )));
            }
        }
        (None, false) => {}
    }
    let mut held = Held::default();
    if let Some((s, _)) = &existing {
        for r in &s.records {
            held.add(*r);
        }
    }
    // Resume: the same stream (its id), from the start or from the saved point.
    let mut skip_below = 0u64;
    let mut progress_state = Progress {
        stream_id: begin.stream_id(),
        next_index: 1,
        check: reader.prev,
        blocks: 0,
        refs: 0,
        block_bytes: 0,
        records: 0,
    };
    let mut written = Vec::new();
    if let Some(p) = &pending {
        if p.stream_id != begin.stream_id() {
            return Err(refuse(format!(
                "this stream is not the one whose receive was interrupted in {}; send that one \
                 again, or discard the interrupted receive with `kmsfs receive --abort`",
                st.describe()
            )));
        }
        let journal = match st.read(RECV_RECORDS_FILE) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(RECV_RECORDS_FILE, e)),
        };
        written = HeldRecord::decode_journal(&journal, p.records).map_err(|e| {
            refuse(format!(
                "{e}; discard the interrupted receive with `kmsfs receive --abort`"
            ))
        })?;
        // Entries past the count (written after the last checkpoint) go.
        if journal.len() > written.len() * HELD_RECORD_LEN {
            st.write_file(
                RECV_RECORDS_FILE,
                &journal[..written.len() * HELD_RECORD_LEN],
            )
            .map_err(|e| io(RECV_RECORDS_FILE, e))?;
            st.sync(RECV_RECORDS_FILE)
                .map_err(|e| io(RECV_RECORDS_FILE, e))?;
        }
        for r in &written {
            held.add(*r);
        }
        if begin.resume_index == 0 {
            skip_below = p.next_index;
        } else if begin.resume_index == p.next_index && begin.resume_check == p.check {
            reader.continue_at(p.next_index, p.check);
        } else {
            return Err(refuse(format!(
                "the resumed stream starts at frame {}, but {} stopped at frame {}: use the \
                 token `kmsfs receive --token` prints now",
                begin.resume_index,
                st.describe(),
                p.next_index
            )));
        }
        stats.resumed_from = p.next_index;
        progress_state = p.clone();
    } else if begin.resume_index != 0 {
        return Err(refuse(format!(
            "this is a resumed stream (`kmsfs send --resume`), but {} has no interrupted receive; \
             send the whole stream",
            st.describe()
        )));
    }
    st.create_dir(RECV_DIR).map_err(|e| io(RECV_DIR, e))?;
    st.create_dir(RECV_SEG_DIR)
        .map_err(|e| io(RECV_SEG_DIR, e))?;
    st.sync_dir(RECV_DIR).map_err(|e| io(RECV_DIR, e))?;
    st.sync_dir("").map_err(|e| io("volume directory", e))?;
    let list_ids = |dir: &str, suffix: &str| -> BTreeSet<u64> {
        st.list(dir)
            .unwrap_or_default()
            .iter()
            .filter_map(|n| {
                let stem = n.strip_suffix(suffix)?;
                format::parse_segment_file_name(&format!("{stem}.seg"))
            })
            .collect()
    };
    let mut rx = Receiver {
        st,
        existing_segs: list_ids(SEGMENT_DIR, ".seg"),
        existing_mirrors: list_ids(SEGMENT_DIR, ".meta"),
        touched: BTreeSet::new(),
        staged_segs: list_ids(RECV_SEG_DIR, ".seg"),
        staged_mirrors: list_ids(RECV_SEG_DIR, ".meta"),
        fresh: written.iter().map(|r| (r.segment, r.offset)).collect(),
        journaled: written.len(),
        written,
        held,
        progress: progress_state,
        since_checkpoint: 0,
        frames_since_checkpoint: 0,
        key_domain: begin.key_domain,
    };

    let mut header_bytes: Option<Vec<u8>> = None;
    let mut roots: Vec<RootFrame> = Vec::new();
    let mut end: Option<End> = None;
    let mut last_place: Option<(u64, u64)> = None;
    let mut done = 0u64;
    // Counts from before an interruption, then this run's.
    let (mut blocks, mut refs, mut block_bytes) = (
        rx.progress.blocks,
        rx.progress.refs,
        rx.progress.block_bytes,
    );
    loop {
        let f = match reader.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) if end.is_some() => break,
            Ok(None) => {
                // Keep what is applied for --resume.
                if rx.progress.next_index > 1 {
                    rx.checkpoint(true)?;
                }
                return Err(frame_err(
                    FrameError::Truncated(format!(
                        "it ends after frame {} of {}",
                        reader.index.saturating_sub(1),
                        begin.total_frames
                    )),
                    rx.progress.next_index > 1,
                ));
            }
            Err(e) => {
                if rx.progress.next_index > 1 {
                    rx.checkpoint(true)?;
                }
                return Err(frame_err(e, rx.progress.next_index > 1 || resumable));
            }
        };
        if end.is_some() {
            return Err(refuse(format!(
                "the stream goes on after its END frame; {UNCHANGED}"
            )));
        }
        let idx = f.index;
        let order_err = |what: &str| {
            refuse(format!(
                "frame {idx}: {what} is out of place: the stream is damaged or forged; \
                 {UNCHANGED}"
            ))
        };
        match f.ftype {
            frame::BEGIN => return Err(order_err("a second BEGIN")),
            frame::HEADER => {
                if idx != 1 {
                    return Err(order_err("HEADER"));
                }
                let h = Header::decode(&f.payload)
                    .map_err(|e| refuse(format!("the stream's volume header: {e}; {UNCHANGED}")))?;
                if h.volume_id != begin.target_volume
                    || h.key_domain != begin.key_domain
                    || h.block_size != begin.block_size
                    || h.segment_size != begin.segment_size
                {
                    return Err(refuse(format!(
                        "the stream's volume header does not match its BEGIN frame; {UNCHANGED}"
                    )));
                }
                if let Some((_, old)) = &existing
                    && (old.volume_id != h.volume_id
                        || old.key_domain != h.key_domain
                        || old.cipher != h.cipher
                        || old.block_size != h.block_size
                        || old.segment_size != h.segment_size)
                {
                    return Err(refuse(format!(
                        "the stream's volume header names another volume than {}; {UNCHANGED}",
                        st.describe()
                    )));
                }
                if !st.exists(RECV_HEADER_FILE) {
                    write_staged(st, RECV_HEADER_FILE, &f.payload)?;
                }
                header_bytes = Some(f.payload);
            }
            frame::BLOCK | frame::REF => {
                if !roots.is_empty() || (idx < 2) {
                    return Err(order_err("a record"));
                }
                let damaged = |e| {
                    refuse(format!(
                        "frame {idx}: {e}: the stream is damaged; {UNCHANGED}"
                    ))
                };
                // Decoded once: the checks below and the apply use the same value.
                let placed = if f.ftype == frame::BLOCK {
                    Placed::Block(BlockFrame::decode(&f.payload).map_err(damaged)?)
                } else {
                    Placed::Ref(RefFrame::decode(&f.payload).map_err(damaged)?)
                };
                let (segment, offset, len) = match &placed {
                    Placed::Block((b, _)) => (b.segment, b.offset, b.record.len() as u64),
                    Placed::Ref(r) => (r.segment, r.offset, r.len as u64),
                };
                // Records come in place order, never overlapping.
                if let Some((s, e)) = last_place
                    && (segment < s || (segment == s && (offset as u64) < e))
                {
                    return Err(order_err("a record (places must increase)"));
                }
                last_place = Some((segment, offset as u64 + len));
                if idx < skip_below {
                    // Applied before the interruption.
                } else if let Placed::Block((b, facts)) = placed {
                    let r = HeldRecord {
                        segment: b.segment,
                        offset: b.offset,
                        len: b.record.len() as u32,
                        kind: facts.kind,
                        block_id: facts.block_id,
                        tag: facts.tag,
                    };
                    rx.put(b.segment, b.offset, b.record, r)?;
                    blocks += 1;
                    block_bytes += b.record.len() as u64;
                    stats.blocks += 1;
                    stats.block_bytes += b.record.len() as u64;
                    done += b.record.len() as u64;
                    progress(done, begin.total_bytes);
                } else if let Placed::Ref(r) = placed {
                    let have = rx.held.by_id.get(&r.block_id).copied();
                    let Some(have) =
                        have.filter(|h| h.tag == r.tag && h.len == r.len && h.kind == r.kind)
                    else {
                        return Err(refuse(format!(
                            "frame {idx}: the stream refers to a block the target should hold \
                             from its base, and it does not: the target is not the base as \
                             sent; {UNCHANGED}. Receive a full stream into a new directory"
                        )));
                    };
                    if (have.segment, have.offset) != (r.segment, r.offset) {
                        // The source's cleaner moved it: copy it here too.
                        let rec = rx.read_held(&have)?;
                        let moved = HeldRecord {
                            segment: r.segment,
                            offset: r.offset,
                            ..have
                        };
                        if rx.put(r.segment, r.offset, &rec, moved)? {
                            stats.copied += 1;
                        }
                    }
                    refs += 1;
                    stats.refs += 1;
                }
                if idx >= skip_below {
                    rx.progress.next_index = idx + 1;
                    rx.progress.check = reader.prev;
                    rx.progress.blocks = blocks;
                    rx.progress.refs = refs;
                    rx.progress.block_bytes = block_bytes;
                    rx.checkpoint(false)?;
                }
            }
            frame::ROOT => {
                if idx < 2 {
                    return Err(order_err("ROOT"));
                }
                let r = RootFrame::decode(&f.payload)
                    .map_err(|e| refuse(format!("frame {idx}: {e}; {UNCHANGED}")))?;
                let (vid, generation, _, _) =
                    format::split_root(&r.record).map_err(|e| refuse(e.to_string()))?;
                if vid != begin.target_volume || generation != begin.snapshot_generation {
                    return Err(refuse(format!(
                        "frame {idx}: the root record is not for this target; {UNCHANGED}"
                    )));
                }
                roots.push(r);
            }
            frame::END => {
                let e = End::decode(&f.payload)
                    .map_err(|e| refuse(format!("the END frame: {e}; {UNCHANGED}")))?;
                if e.frames != begin.total_frames
                    || idx + 1 != begin.total_frames
                    || e.blocks != blocks
                    || e.refs != refs
                    || e.block_bytes != block_bytes
                    || roots.is_empty()
                {
                    return Err(refuse(format!(
                        "the stream's END frame does not match what it carried (frames, records \
                         or bytes missing); {UNCHANGED}"
                    )));
                }
                end = Some(e);
            }
            other => return Err(refuse(format!("frame {idx}: unknown type {other}"))),
        }
    }
    let header = match header_bytes {
        Some(h) => h,
        None => st.read(RECV_HEADER_FILE).map_err(|e| {
            refuse(format!(
                "the volume header of the interrupted receive is gone ({e}); discard it with `kmsfs receive --abort` and send the whole stream again"
            ))
        })?,
    };
    // The most complete root record whose snapshots the target holds unchanged.
    let old_snaps = existing
        .as_ref()
        .map(|(s, _)| s.snapshots.clone())
        .unwrap_or_default();
    let chosen = roots
        .into_iter()
        .find(|r| r.requires.iter().all(|q| old_snaps.contains(q)))
        .ok_or_else(|| {
            refuse(format!(
                "none of the stream's root records fits {}: it does not hold the base snapshot unchanged; {UNCHANGED}",
                st.describe()
            ))
        })?;
    if !chosen
        .lists
        .iter()
        .any(|r| r.token == begin.snapshot_token && r.tree == begin.snapshot_tree)
    {
        return Err(refuse(format!(
            "the stream's root record does not list the snapshot it carries; {UNCHANGED}"
        )));
    }
    let (slot, mut records, old_header) = match existing {
        Some((s, _)) => (
            1 - s.newest_slot,
            s.records,
            st.read(format::HEADER_FILE).ok(),
        ),
        None => (0, Vec::new(), None),
    };
    records.extend_from_slice(&rx.written);
    let state = ReceivedState {
        target_volume: begin.target_volume,
        key_domain: begin.key_domain,
        newest_slot: slot,
        root_sha: sha256(&chosen.record),
        generation: chosen.generation,
        snapshots: chosen.lists.clone(),
        records,
    };
    let plan = CommitPlan {
        slot,
        // A rewrapped source sends its new wrap: the target follows it.
        header: if old_header.as_deref() == Some(&header[..]) {
            Vec::new()
        } else {
            header
        },
        root: chosen.record,
        state: state.encode(),
        patches: rx
            .written
            .iter()
            .filter(|r| rx.existing_segs.contains(&r.segment))
            .copied()
            .collect(),
    };
    rx.checkpoint(true)?;
    write_staged(st, RECV_COMMIT_FILE, &plan.encode())?;
    apply_commit(st, &plan)?;
    stats.snapshots = chosen.lists.len();
    stats.stream_bytes = reader.bytes_read;
    Ok(stats)
}

/// A record frame of a stream, decoded once.
enum Placed<'a> {
    Block((BlockFrame<'a>, crate::format::stream::RecordFacts)),
    Ref(RefFrame),
}
