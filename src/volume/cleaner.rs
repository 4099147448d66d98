//! The segment cleaner: what every tree (live, snapshots, the fallback root
//! slot) and every reader's pinned root references, deleting segments nothing
//! needs and moving live blocks out of mostly-dead ones.
//!
//! It holds the volume lock only for short, bounded steps:
//!
//! 1. (lock) two commits, so both root slots name the same trees `T0`; note
//!    the next segment id `B` and the open segment `O`. Every record written
//!    from now on lies in `O` or in a segment `>= B`, so only segments below
//!    `B` other than `O` are candidates, and those are never written again.
//! 2. (readers lock) the readers' pins: the roots read-only users hold.
//! 3. (no lock) walk the pinned roots, then `T0` (committed, so immutable):
//!    segments a pin needs are kept as they are; live bytes per candidate.
//!    Nothing written after step 1 can name a record that was dead in `T0`
//!    (trees only gain new records or keep old ones), so a candidate with no
//!    live bytes is unreferenced for good and is deleted at once.
//! 4. (no lock) relocate `T0`: live records of mostly-dead candidates are
//!    copied byte for byte, nodes above them rewritten, each node once for
//!    all trees (a memo by block id), so what the live tree and snapshots
//!    shared stays shared.
//! 5. (lock) apply the same memo to what changed since step 1 (dirty nodes,
//!    nodes written since, new snapshots): work bounded by those changes, not
//!    by the volume. Two commits; then no root slot names a victim, and the
//!    victims are deleted unless a reader that arrived meanwhile holds a root
//!    from before step 5 (the next clean deletes them then).

use std::collections::HashSet;
use std::time::Instant;

use super::tree::{Relocator, relocate_stored};
use super::*;
use crate::store::PIN_PREFIX;

/// Magic of a reader pin file (`kmsfs.pin.*`, see docs/FORMAT.md).
const PIN_MAGIC: &[u8; 8] = b"KMSFSPIN";
/// Most tree roots one pin names.
const PIN_MAX_ROOTS: usize = 1 << 16;
/// How long the cleaner waits for readers that are opening (they hold the
/// readers lock shared for that moment) before it leaves deletion for later.
const READERS_GATE_WAIT: Duration = Duration::from_secs(2);

/// What a reader pin says: the roots a read-only user of the volume holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Pin {
    pub volume_id: [u8; 16],
    pub generation: u64,
    pub trees: Vec<BlockPtr>,
}

pub(super) fn encode_pin(pin: &Pin) -> Vec<u8> {
    let mut e = format::Enc::with_capacity(40 + format::PTR_LEN * pin.trees.len());
    e.bytes(PIN_MAGIC)
        .u16(format::FORMAT_VERSION)
        .u16(0)
        .bytes(&pin.volume_id)
        .u64(pin.generation)
        .u32(pin.trees.len() as u32);
    for t in &pin.trees {
        t.encode(&mut e);
    }
    e.buf
}

pub(super) fn decode_pin(b: &[u8]) -> std::result::Result<Pin, format::DecodeError> {
    let bad = |m: &str| format::DecodeError(m.into());
    let mut d = format::Dec::new(b);
    if d.take(8)? != PIN_MAGIC {
        return Err(bad("not a reader pin"));
    }
    if d.u16()? != format::FORMAT_VERSION {
        return Err(bad("reader pin of another format version"));
    }
    d.u16()?;
    let volume_id = d.array()?;
    let generation = d.u64()?;
    let n = d.u32()? as usize;
    if n > PIN_MAX_ROOTS || n.saturating_mul(format::PTR_LEN) != d.remaining() {
        return Err(bad("reader pin length does not match its root count"));
    }
    let mut trees = Vec::with_capacity(n);
    for _ in 0..n {
        trees.push(BlockPtr::decode(&mut d)?);
    }
    d.finish()?;
    Ok(Pin {
        volume_id,
        generation,
        trees,
    })
}

/// The hash bit of a segment in a subtree's segment mask.
fn seg_bit(segment: u64) -> u128 {
    1u128 << (segment % 128)
}

/// The walk of step 3: live bytes per segment, the segments pinned roots
/// need, and for each node the mask of the segments its subtree references
/// (so relocation skips subtrees with nothing to move).
struct Scan<'a> {
    nodes: &'a dyn NodeStore,
    masks: HashMap<[u8; 16], u128>,
    data_seen: HashSet<[u8; 16]>,
    live: HashMap<u64, u64>,
    /// Walking a pinned root: its segments are kept, not counted.
    pinning: bool,
    pinned: HashSet<u64>,
}

impl Scan<'_> {
    fn note(&mut self, p: &BlockPtr) {
        if self.pinning {
            self.pinned.insert(p.segment);
        } else {
            *self.live.entry(p.segment).or_default() += p.len as u64;
        }
    }

    /// Walks the subtree under node `p` once (shared subtrees are skipped the
    /// second time: pinned roots are walked first, so whatever a pin reaches
    /// is marked pinned) and returns its segment mask.
    fn node(&mut self, p: &BlockPtr) -> Result<u128> {
        if let Some(m) = self.masks.get(&p.block_id) {
            return Ok(*m);
        }
        self.note(p);
        let mut mask = seg_bit(p.segment);
        let n = match self.nodes.load(p) {
            Ok(n) => n,
            // A reader cannot get past a node that fails to verify either:
            // nothing below it can be needed by that reader.
            Err(e @ Error::Integrity { .. }) if self.pinning => {
                log::warn!("cleaner: a reader's pinned tree is damaged ({e})");
                self.masks.insert(p.block_id, mask);
                return Ok(mask);
            }
            Err(e) => return Err(e),
        };
        if n.leaf {
            for (k, v) in n.keys.iter().zip(&n.vals) {
                if let Some(vp) = value_ptr(k, v) {
                    mask |= seg_bit(vp.segment);
                    if self.data_seen.insert(vp.block_id) {
                        self.note(&vp);
                    }
                }
            }
        } else {
            for kid in &n.kids {
                if let tree::Child::Clean(cp) = kid {
                    mask |= self.node(cp)?;
                }
            }
        }
        self.masks.insert(p.block_id, mask);
        Ok(mask)
    }
}

/// Relocation out of the victim segments (steps 4 and 5), one memo for
/// every tree.
struct Reloc<'a> {
    io: &'a BlockIo,
    masks: &'a HashMap<[u8; 16], u128>,
    victims: &'a HashSet<u64>,
    victim_mask: u128,
    /// Node id -> where it went (itself when nothing changed).
    nodes_done: HashMap<[u8; 16], BlockPtr>,
    /// Data and xattr block id -> its copy.
    moved: HashMap<[u8; 16], BlockPtr>,
    blocks_moved: u64,
    bytes_moved: u64,
    to_move: u64,
    progress: &'a dyn Fn(CleanProgress),
}

impl Reloc<'_> {
    fn copy(&mut self, p: &BlockPtr, kind: BlockKind) -> Result<Option<BlockPtr>> {
        if !self.victims.contains(&p.segment) {
            return Ok(None);
        }
        if let Some(np) = self.moved.get(&p.block_id) {
            return Ok(Some(*np));
        }
        let np = self.io.copy(p, kind)?;
        self.blocks_moved += 1;
        self.bytes_moved += p.len as u64;
        (self.progress)(CleanProgress::Moving {
            done: self.bytes_moved,
            total: self.to_move.max(self.bytes_moved),
        });
        self.moved.insert(p.block_id, np);
        Ok(Some(np))
    }
}

impl Relocator for Reloc<'_> {
    fn done(&self, p: &BlockPtr) -> Option<BlockPtr> {
        self.nodes_done.get(&p.block_id).copied()
    }
    fn record(&mut self, old: &BlockPtr, new: BlockPtr) {
        self.nodes_done.insert(old.block_id, new);
    }
    fn visit(&self, p: &BlockPtr) -> bool {
        // Nodes the walk did not see were written since: look inside.
        self.masks
            .get(&p.block_id)
            .is_none_or(|m| m & self.victim_mask != 0)
    }
    fn move_node(&mut self, p: &BlockPtr) -> Result<Option<BlockPtr>> {
        self.copy(p, BlockKind::Node)
    }
    fn map_value(&mut self, k: &[u8], v: &[u8]) -> Result<Option<Vec<u8>>> {
        let Some(p) = value_ptr(k, v) else {
            return Ok(None);
        };
        let tg = k.get(8).copied();
        let kind = match tg {
            Some(tag::BLOCK) | Some(tag::FRAG) => BlockKind::Data,
            _ => BlockKind::Xattr,
        };
        let Some(np) = self.copy(&p, kind)? else {
            return Ok(None);
        };
        Ok(match tg {
            Some(tag::BLOCK) => Some(np.to_bytes().to_vec()),
            // The same fragment at its new place.
            Some(tag::FRAG) => FragValue::from_bytes_unchecked(v)
                .ok()
                .map(|f| FragValue { ptr: np, ..f }.to_bytes()),
            _ => Some(XattrValue::Block(np).encode()),
        })
    }
}

/// A reader's pin as the cleaner sees it: its file name and roots.
type LivePin = (String, Vec<BlockPtr>);

impl Volume {
    /// Removes the node mirror of a segment being deleted; returns its size.
    pub(super) fn remove_mirror(&self, id: u64) -> Result<u64> {
        let name = blocks::mirror_file_name(id);
        self.io.forget_mirror(id);
        match self.io.storage.len(&name) {
            Ok(n) => {
                self.io
                    .storage
                    .remove(&name)
                    .map_err(|e| Error::io(&name, e))?;
                Ok(n)
            }
            Err(_) => Ok(0),
        }
    }

    /// The pointers of every tree node reachable from the live tree and the
    /// snapshots (tests locate live records with it).
    #[doc(hidden)]
    pub fn node_pointers(&self) -> Result<Vec<BlockPtr>> {
        let trees = self.all_trees(&self.st.read());
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for t in trees {
            t.walk(
                self.nodes(),
                &mut |p| {
                    if seen.insert(p.block_id) {
                        out.push(*p);
                        true
                    } else {
                        false
                    }
                },
                &mut |_, _| Ok(()),
                &mut |_, _| {},
            )?;
        }
        Ok(out)
    }

    /// Every tree to keep alive: the live one and each snapshot's.
    pub(super) fn all_trees(&self, st: &State) -> Vec<Tree> {
        let mut v = vec![st.tree.clone()];
        for s in &st.snapshots {
            v.push(Tree::from_ptr(s.tree));
        }
        // The previous commit's trees (the fallback slot) stay readable too.
        v.extend(st.previous.iter().map(|p| Tree::from_ptr(*p)));
        v
    }

    /// Reclaims space: deletes segments nothing references and moves the live
    /// blocks out of segments that are mostly dead (live share below `max_live`).
    pub fn clean(&self, max_live: f64) -> Result<CleanStats> {
        self.clean_with_progress(max_live, &|_| {})
    }

    /// Something was freed (the cleaner can reclaim it).
    pub(crate) fn note_freed(&self) {
        self.freed_since_clean.store(true, Ordering::Relaxed);
    }

    /// True when a write was refused for lack of space and space has been
    /// freed in the volume since: the cleaner should run now rather than at
    /// its next period, so that writes work again within seconds.
    pub fn wants_clean(&self) -> bool {
        self.space_pressure.load(Ordering::Relaxed)
            && self.freed_since_clean.load(Ordering::Relaxed)
    }

    /// Installs a hook the cleaner runs between its steps ("walked" after
    /// the walk, "relocated" after copying, both without the volume lock), so
    /// tests can change the volume exactly there.
    #[doc(hidden)]
    pub fn set_clean_hook(&self, hook: Option<CleanHook>) {
        *self.clean_hook.lock() = hook;
    }

    fn run_clean_hook(&self, stage: &str) {
        let hook = self.clean_hook.lock().clone();
        if let Some(h) = hook {
            h(stage);
        }
    }

    /// Publishes the roots this read-only opener holds as a reader pin: the
    /// snapshot it opened, or the live tree and every snapshot of the root
    /// record it read. The guard keeps the pin until the volume is dropped.
    pub(super) fn publish_pin(&self) -> Result<Box<dyn std::any::Any + Send + Sync>> {
        let pin = {
            let st = self.st.read();
            let mut trees = Vec::new();
            if let tree::Child::Clean(p) = &st.tree.root {
                trees.push(*p);
            }
            if self.snapshot.is_none() {
                trees.extend(st.snapshots.iter().map(|s| s.tree));
            }
            Pin {
                volume_id: self.header.volume_id,
                generation: st.generation,
                trees,
            }
        };
        let name = format!(
            "{PIN_PREFIX}{}",
            format::hex(&crate::crypto::random_array::<16>())
        );
        self.io
            .storage
            .create_pin(&name, &encode_pin(&pin))
            .map_err(|e| Error::io(&name, e))
    }

    /// The readers lock, exclusively: readers take it shared only while they
    /// open and publish their pin, so it comes within moments. None when it
    /// does not (a reader of an older kmsfs holds it for its whole life).
    fn readers_gate(&self) -> Result<Option<Box<dyn std::any::Any + Send + Sync>>> {
        let deadline = Instant::now() + READERS_GATE_WAIT;
        loop {
            if let Some(g) = self
                .io
                .storage
                .try_lock_readers_exclusive()
                .map_err(|e| Error::io(format::READERS_FILE, e))?
            {
                return Ok(Some(g));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The pins of the readers present (call under the readers gate); pins
    /// their reader left behind (it died) are removed. None when a pin that
    /// cannot be understood is held: what it needs is unknown.
    fn live_pins(&self) -> Result<Option<Vec<LivePin>>> {
        let storage = &self.io.storage;
        let mut out = Vec::new();
        for p in storage
            .list_pins()
            .map_err(|e| Error::io("reader pins", e))?
        {
            if !p.held {
                if let Err(e) = storage.remove_pin(&p.name) {
                    log::warn!(
                        "cleaner: could not remove {}, left by a reader that is gone: {e}",
                        p.name
                    );
                }
                continue;
            }
            match decode_pin(&p.data) {
                Ok(pin) if pin.volume_id == self.header.volume_id => out.push((p.name, pin.trees)),
                Ok(_) => {
                    log::warn!(
                        "cleaner: reader pin {} names another volume; nothing is deleted while \
                         it is held",
                        p.name
                    );
                    return Ok(None);
                }
                Err(e) => {
                    log::warn!(
                        "cleaner: reader pin {} cannot be read ({e}: another kmsfs version?); \
                         nothing is deleted while it is held",
                        p.name
                    );
                    return Ok(None);
                }
            }
        }
        Ok(Some(out))
    }

    /// The pins of the readers present, or None (see [`Self::live_pins`],
    /// [`Self::readers_gate`]).
    pub(super) fn reader_pins(&self) -> Result<Option<Vec<LivePin>>> {
        let Some(_gate) = self.readers_gate()? else {
            return Ok(None);
        };
        self.live_pins()
    }

    /// Deletes segments (and their mirrors); `freed` is what each deletion
    /// frees net of copies made of its live records.
    fn delete_segments(&self, segs: &[(u64, u64)], stats: &mut CleanStats) -> Result<()> {
        let storage = &self.io.storage;
        let mut removed = false;
        for &(id, freed) in segs {
            let name = format::segment_file_name(id);
            match storage.remove(&name) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&name, e)),
            }
            stats.bytes_freed += freed + self.remove_mirror(id)?;
            stats.segments_removed += 1;
            removed = true;
        }
        if removed {
            storage
                .sync_dir(format::SEGMENT_DIR)
                .map_err(|e| Error::io("segment directory", e))?;
        }
        Ok(())
    }

    /// The segments the tree this volume opened (the live tree, or the
    /// snapshot a read-only opener chose) references.
    #[doc(hidden)]
    pub fn open_tree_segments(&self) -> Result<std::collections::BTreeSet<u64>> {
        let st = self.st.read();
        let mut segs = std::collections::BTreeSet::new();
        let mut data = Vec::new();
        let mut seen = HashSet::new();
        let mut err = None;
        st.tree.walk(
            self.nodes(),
            &mut |p| {
                segs.insert(p.segment);
                seen.insert(p.block_id)
            },
            &mut |k, v| {
                if let Some(p) = value_ptr(k, v) {
                    data.push(p.segment);
                }
                Ok(())
            },
            &mut |_, e| {
                err.get_or_insert(e);
            },
        )?;
        segs.extend(data);
        match err {
            Some(e) => Err(e),
            None => Ok(segs),
        }
    }

    /// A commit even with nothing pending (the other root slot then names
    /// the same trees as the newest).
    fn force_commit(&self) -> Result<()> {
        let mut st = self.st.write();
        st.changed = true;
        self.commit_locked(&mut st)
    }

    /// [`Volume::clean`], reporting its progress: first the trees walked
    /// (done, total), then the live bytes copied out of the segments it
    /// empties (done, total). See the module comment for the steps.
    pub fn clean_with_progress(
        &self,
        max_live: f64,
        progress: &dyn Fn(CleanProgress),
    ) -> Result<CleanStats> {
        self.writable()?;
        let _one_cleaner = self.clean_lock.lock();
        self.space_pressure.store(false, Ordering::Relaxed);
        self.freed_since_clean.store(false, Ordering::Relaxed);
        let storage = self.io.storage.clone();
        let mut stats = CleanStats::default();
        // 1. Both slots on the same trees; writes in flight recorded first
        // (the append gate), so no record of theirs looks dead.
        // Each commit under its own short hold of the lock.
        self.force_commit()?;
        let (roots, boundary, open) = {
            let _gate = self.append_gate.write();
            let mut st = self.st.write();
            st.changed = true;
            self.commit_locked(&mut st)?;
            let mut roots = st.committed.clone();
            for p in &st.previous {
                if !roots.contains(p) {
                    roots.push(*p);
                }
            }
            (roots, self.io.next_segment(), self.io.current_segment())
        };
        // 2. What readers hold.
        let Some(pins) = self.reader_pins()? else {
            log::info!(
                "cleaner: a read-only user this kmsfs cannot account for (an older version, or \
                 a pin it cannot read) is present; not deleting segments now"
            );
            return Ok(stats);
        };
        // 3. The walk, without the volume lock.
        let mut scan = Scan {
            nodes: self.nodes(),
            masks: HashMap::new(),
            data_seen: HashSet::new(),
            live: HashMap::new(),
            pinning: true,
            pinned: HashSet::new(),
        };
        let pinned_roots: Vec<BlockPtr> = pins.iter().flat_map(|p| p.1.clone()).collect();
        let total = (pinned_roots.len() + roots.len()) as u64;
        for (i, p) in pinned_roots.iter().chain(&roots).enumerate() {
            scan.pinning = i < pinned_roots.len();
            progress(CleanProgress::Scanning {
                done: i as u64,
                total,
            });
            scan.node(p)?;
        }
        progress(CleanProgress::Scanning { done: total, total });
        self.run_clean_hook("walked");
        let mut victims = HashSet::new();
        let mut victim_freed = Vec::new();
        let mut empty = Vec::new();
        let mut to_move = 0u64;
        for f in storage
            .list(format::SEGMENT_DIR)
            .map_err(|e| Error::io("segment directory", e))?
        {
            let Some(id) = format::parse_segment_file_name(&f) else {
                continue;
            };
            if id >= boundary || Some(id) == open || scan.pinned.contains(&id) {
                continue;
            }
            let size = storage.len(&format::segment_file_name(id)).unwrap_or(0);
            let l = scan.live.get(&id).copied().unwrap_or(0);
            if l == 0 {
                empty.push((id, size));
            } else if (l as f64) < max_live * size as f64 {
                victims.insert(id);
                victim_freed.push((id, size.saturating_sub(l)));
                to_move += l;
            }
        }
        // Unreferenced since step 1, and never needed again: free the room
        // before anything is copied.
        self.delete_segments(&empty, &mut stats)?;
        if victims.is_empty() {
            return Ok(stats);
        }
        // 4. Copies and rewritten nodes, without the volume lock. They are
        // garbage until step 5 commits them.
        let victim_mask = victims.iter().fold(0u128, |m, id| m | seg_bit(*id));
        let mut rel = Reloc {
            io: &self.io,
            masks: &scan.masks,
            victims: &victims,
            victim_mask,
            nodes_done: HashMap::new(),
            moved: HashMap::new(),
            blocks_moved: 0,
            bytes_moved: 0,
            to_move,
            progress,
        };
        for p in &roots {
            relocate_stored(p, self.nodes(), &mut rel)?;
        }
        // What was committed meanwhile is immutable too: relocate it before
        // taking the lock, so that little is left to do under it, and make
        // the copies durable now rather than in the locked commit.
        let latest: Vec<BlockPtr> = self.st.read().committed.clone();
        for p in &latest {
            relocate_stored(p, self.nodes(), &mut rel)?;
        }
        self.io.sync()?;
        self.run_clean_hook("relocated");
        // 5. What changed since, under the lock, and a commit; then a
        // second commit (under a lock of its own): both slots then name the
        // new places.
        {
            let mut st = self.st.write();
            let mut tree = st.tree.clone();
            tree.relocate_shared(self.nodes(), &mut rel)?;
            let mut snaps = st.snapshots.clone();
            for s in &mut snaps {
                s.tree = relocate_stored(&s.tree, self.nodes(), &mut rel)?;
            }
            st.tree = tree;
            st.snapshots = snaps;
            st.changed = true;
            self.commit_locked(&mut st)?;
        }
        self.force_commit()?;
        let current: Vec<BlockPtr> = {
            let st = self.st.read();
            st.committed.iter().chain(&st.previous).copied().collect()
        };
        stats.blocks_moved = rel.blocks_moved;
        stats.bytes_moved = rel.bytes_moved;
        // A reader that opened since step 2 may hold a root from before
        // step 5, which still names the victims: then they wait for the next
        // clean (which finds them empty).
        let Some(_gate) = self.readers_gate()? else {
            log::info!(
                "cleaner: readers are opening the volume; the segments emptied are deleted by the next clean"
            );
            return Ok(stats);
        };
        let Some(now) = self.live_pins()? else {
            return Ok(stats);
        };
        let known: HashSet<&str> = pins.iter().map(|p| p.0.as_str()).collect();
        if now.iter().any(|(name, trees)| {
            !known.contains(name.as_str()) && trees.iter().any(|t| !current.contains(t))
        }) {
            log::info!(
                "cleaner: a reader opened the volume during the clean; the segments emptied are \
                 deleted by the next clean"
            );
            return Ok(stats);
        }
        self.delete_segments(&victim_freed, &mut stats)?;
        Ok(stats)
    }
}
