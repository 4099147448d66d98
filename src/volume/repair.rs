//! fsck --repair: rebuilds what the redundancy allows and leaves a clean live
//! tree.
//!
//! All under the volume's write lock and the append gate (like the cleaner):
//! 1. every tree node (live tree and snapshots) with a damaged or missing copy
//!    (in its segment or in the segment's mirror) is rewritten, from the copy
//!    that verifies, to the current segment and its mirror; its parents are
//!    rewritten with it (`Tree::relocate`);
//! 2. in the live tree, broken metadata is fixed where that is safe (dangling
//!    entries dropped, wrong entry types, readdir records, link counts,
//!    parents and block counts corrected, records of missing inodes removed,
//!    inodes in no directory linked into `/lost+found`), and every file with a
//!    data or xattr block that fails to verify loses those blocks (holes read
//!    as zeros, lost xattrs are removed) and moves to `/lost+found`, its
//!    original path in `user.kmsfs.lost-path` and the lost byte ranges in
//!    `user.kmsfs.lost-ranges`;
//! 3. snapshots are immutable: their damaged files are only reported, with
//!    the way out (salvage, then delete the snapshot);
//! 4. two commits (both root slots then hold the repaired state), then fsck.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::fsck::FsckReport;
use super::tree::{Relocator, Tree, relocate_stored};
use super::{NAME_MAX, ROOT_INO, State, Volume, now, value_ptr};
use crate::error::{Error, Result};
use crate::format::{
    self, BlockKind, BlockPtr, DirEntry, FileKind, FragValue, Inode, XattrValue, key, split_key,
    tag,
};

/// Where repaired files go, in the root directory.
pub const LOST_FOUND: &[u8] = b"lost+found";
/// The path(s) a file had before repair moved it (one per line for a file
/// with several links).
pub const LOST_PATH_XATTR: &[u8] = b"user.kmsfs.lost-path";
/// The byte ranges that read as zeros since repair, `first-last,...`.
pub const LOST_RANGES_XATTR: &[u8] = b"user.kmsfs.lost-ranges";
/// The extended attributes repair removed (damaged), one per line.
pub const LOST_XATTRS_XATTR: &[u8] = b"user.kmsfs.lost-xattrs";

/// A file repair moved to `/lost+found`.
#[derive(Clone, Debug, Default)]
pub struct LostFile {
    pub ino: u64,
    /// Where it was (every link).
    pub paths: Vec<String>,
    /// Its names in `/lost+found` (one per former link).
    pub names: Vec<String>,
    /// Byte ranges (first, last, inclusive) that read as zeros now.
    pub lost_ranges: Vec<(u64, u64)>,
    /// Extended attributes removed because their block was damaged.
    pub lost_xattrs: Vec<String>,
}

impl LostFile {
    /// The ranges as written to `user.kmsfs.lost-ranges`.
    pub fn ranges_text(&self) -> String {
        ranges_text(&self.lost_ranges)
    }
}

/// A damaged file (or tree node) of a snapshot: snapshots never change, so
/// repair only reports it.
#[derive(Clone, Debug)]
pub struct SnapshotDamage {
    pub snapshot: String,
    pub path: String,
    pub detail: String,
    /// What to do (VOLUME and DEST stand for the volume and a destination).
    pub advice: String,
}

#[derive(Clone, Debug, Default)]
pub struct RepairReport {
    /// Tree nodes rewritten to both places (segment and mirror).
    pub nodes_rewritten: u64,
    pub lost_files: Vec<LostFile>,
    /// Metadata fixes, one line each.
    pub entries_fixed: Vec<String>,
    pub snapshot_damage: Vec<SnapshotDamage>,
    /// Damage to the live volume that repair could not fix.
    pub unrepaired: Vec<String>,
    /// fsck of the volume after repair (snapshot damage stays in it).
    pub after: FsckReport,
}

impl RepairReport {
    /// Nothing is damaged any more, snapshots included.
    pub fn is_clean(&self) -> bool {
        self.after.is_clean()
    }

    /// The live tree is clean; damage may remain in snapshots only.
    pub fn live_clean(&self) -> bool {
        self.unrepaired.is_empty()
    }

    /// Repair changed something visible (nodes rewritten, files moved,
    /// metadata fixed).
    pub fn changed(&self) -> bool {
        self.nodes_rewritten > 0 || !self.lost_files.is_empty() || !self.entries_fixed.is_empty()
    }

    /// The snapshots with damage, each once, in order.
    pub fn damaged_snapshots(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for d in &self.snapshot_damage {
            if !out.contains(&d.snapshot) {
                out.push(d.snapshot.clone());
            }
        }
        out
    }
}

/// The advice for a damaged snapshot; `volume` names the volume directory.
pub fn snapshot_advice(volume: &str, snapshot: &str) -> String {
    format!(
        "`kmsfs salvage {volume} DEST --snapshot {snapshot} --partial` copies out what \
         verifies, then `kmsfs snapshot delete {volume} {snapshot}`"
    )
}

fn ranges_text(r: &[(u64, u64)]) -> String {
    r.iter()
        .map(|(a, b)| format!("{a}-{b}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// (directory, name) of one link.
type Link = (u64, Vec<u8>);

/// What one walk of a tree finds.
#[derive(Default)]
struct Facts {
    inodes: BTreeMap<u64, Inode>,
    /// (directory, name, entry)
    entries: Vec<(u64, Vec<u8>, DirEntry)>,
    cookies: BTreeMap<(u64, u64), Vec<u8>>,
    /// (ino, block index, pointer)
    blocks: Vec<(u64, u64, BlockPtr)>,
    /// (ino, block index, pointer) of fragments
    frags: Vec<(u64, u64, BlockPtr)>,
    /// (ino, xattr name, pointer)
    xattr_blocks: Vec<(u64, Vec<u8>, BlockPtr)>,
    orphans: BTreeSet<u64>,
    /// Every inode number some key names (ORPHAN records live under 0).
    key_inos: BTreeSet<u64>,
    /// Nodes whose copies both fail (what lies below them is missing).
    lost_nodes: Vec<(BlockPtr, String)>,
}

impl Facts {
    /// ino -> every (directory, name) that names it.
    fn links(&self) -> HashMap<u64, Vec<(u64, Vec<u8>)>> {
        let mut m: HashMap<u64, Vec<(u64, Vec<u8>)>> = HashMap::new();
        for (p, name, e) in &self.entries {
            m.entry(e.ino).or_default().push((*p, name.clone()));
        }
        m
    }
}

/// The path of directory or file `ino` through its first link, or None when
/// it is in no directory (or the chain loops).
fn path_of(links: &HashMap<u64, Vec<(u64, Vec<u8>)>>, ino: u64) -> Option<Vec<u8>> {
    let mut parts: Vec<&[u8]> = Vec::new();
    let mut cur = ino;
    for _ in 0..4096 {
        if cur == ROOT_INO {
            let mut out = Vec::new();
            for p in parts.iter().rev() {
                out.push(b'/');
                out.extend_from_slice(p);
            }
            if out.is_empty() {
                out.push(b'/');
            }
            return Some(out);
        }
        let (p, name) = links.get(&cur)?.first()?;
        parts.push(name);
        cur = *p;
    }
    None
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = dir.to_vec();
    if out.last() != Some(&b'/') {
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn path_text(links: &HashMap<u64, Vec<(u64, Vec<u8>)>>, ino: u64) -> String {
    match path_of(links, ino) {
        Some(p) => text(&p),
        None => format!("inode {ino} (in no directory)"),
    }
}

/// Byte ranges of the damaged blocks of a file of `size` bytes.
fn lost_ranges(blocks: &BTreeSet<u64>, bs: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in blocks {
        let Some(start) = b.checked_mul(bs) else {
            continue;
        };
        if start >= size {
            continue;
        }
        let last = start.saturating_add(bs).min(size) - 1;
        match out.last_mut() {
            Some((_, l)) if l.checked_add(1) == Some(start) => *l = last,
            _ => out.push((start, last)),
        }
    }
    out
}

impl Volume {
    /// Repairs the volume (see the module comment). The volume must be open
    /// read-write and not be in use by anything else.
    pub fn repair(&self) -> Result<RepairReport> {
        self.writable()?;
        let _one_cleaner = self.clean_lock.lock();
        let mut rep = RepairReport::default();
        let live_segments = {
            let _gate = self.append_gate.write();
            let mut st = self.st.write();
            // Pending changes first: the tree then holds everything.
            self.commit_locked(&mut st)?;
            self.repair_nodes(&mut st, &mut rep)?;
            self.repair_metadata(&mut st, &mut rep)?;
            let mut verified: HashMap<[u8; 16], bool> = HashMap::new();
            self.repair_damaged_files(&mut st, &mut rep, &mut verified)?;
            self.repair_counts(&mut st, &mut rep)?;
            self.report_snapshots(&st, &mut rep, &mut verified)?;
            // Twice: both root slots then hold the repaired trees.
            for _ in 0..2 {
                st.changed = true;
                self.commit_locked(&mut st)?;
            }
            self.remove_stray_mirrors(&st)?;
            self.tree_segments(&st.tree)?
        };
        let after = self.fsck()?;
        // Snapshot damage fsck sees that the walks above did not list
        // (broken metadata of a snapshot).
        for s in self.snapshots() {
            let prefix = format!("snapshot {}: ", s.name);
            if rep.snapshot_damage.iter().any(|d| d.snapshot == s.name) {
                continue;
            }
            for e in after.errors.iter().filter(|e| e.starts_with(&prefix)) {
                rep.snapshot_damage.push(SnapshotDamage {
                    snapshot: s.name.clone(),
                    path: String::new(),
                    detail: e.get(prefix.len()..).unwrap_or(e).to_string(),
                    advice: snapshot_advice("VOLUME", &s.name),
                });
            }
        }
        for e in &after.errors {
            let snapshot_only = e.starts_with("snapshot ")
                || (e.starts_with("segment ")
                    && !live_segments
                        .iter()
                        .any(|id| e.contains(&format::segment_file_name(*id))));
            if !snapshot_only {
                rep.unrepaired.push(e.clone());
            }
        }
        rep.after = after;
        Ok(rep)
    }

    /// Walks a tree and gathers what repair needs.
    fn repair_facts(&self, t: &Tree) -> Result<Facts> {
        let mut f = Facts::default();
        let mut seen: HashSet<[u8; 16]> = HashSet::new();
        let mut lost = Vec::new();
        t.walk(
            self.nodes(),
            &mut |p| seen.insert(p.block_id),
            &mut |k, v| {
                let Some((ino, tg, suffix)) = split_key(k) else {
                    return Ok(());
                };
                f.key_inos.insert(ino);
                let suffix_u64 = <[u8; 8]>::try_from(suffix).ok().map(u64::from_be_bytes);
                match (tg, suffix_u64) {
                    (tag::INODE, _) => {
                        if let Ok(i) = Inode::decode(v) {
                            f.inodes.insert(ino, i);
                        }
                    }
                    (tag::DIRENT, _) => {
                        if let Ok(e) = DirEntry::decode(v) {
                            f.entries.push((ino, suffix.to_vec(), e));
                        }
                    }
                    (tag::DIRCOOKIE, Some(c)) => {
                        f.cookies.insert((ino, c), v.to_vec());
                    }
                    (tag::BLOCK, Some(b)) => {
                        if let Ok(p) = BlockPtr::from_bytes(v) {
                            f.blocks.push((ino, b, p));
                        }
                    }
                    (tag::FRAG, None) if suffix.len() == 12 => {
                        if let (Ok(b), Ok(fv)) = (
                            <[u8; 8]>::try_from(&suffix[..8]),
                            FragValue::from_bytes_unchecked(v),
                        ) {
                            f.frags.push((ino, u64::from_be_bytes(b), fv.ptr));
                        }
                    }
                    (tag::XATTR, _) => {
                        if let Ok(XattrValue::Block(p)) = XattrValue::decode(v) {
                            f.xattr_blocks.push((ino, suffix.to_vec(), p));
                        }
                    }
                    (tag::ORPHAN, Some(o)) => {
                        f.orphans.insert(o);
                    }
                    _ => {}
                }
                Ok(())
            },
            &mut |p, e| lost.push((*p, e.to_string())),
        )?;
        f.lost_nodes = lost;
        Ok(f)
    }

    /// Step 1: every node of the live tree and of the snapshots with a copy
    /// that fails is written again, from the copy that verifies, to both
    /// places; the trees are relocated onto the new copies.
    fn repair_nodes(&self, st: &mut State, rep: &mut RepairReport) -> Result<()> {
        let n = self.nodes();
        let mut trees: Vec<(String, Tree)> = vec![("live tree".into(), st.tree.clone())];
        for s in &st.snapshots {
            trees.push((s.name.clone(), Tree::from_ptr(s.tree)));
        }
        let mut seen: HashSet<[u8; 16]> = HashSet::new();
        let mut bad: HashSet<[u8; 16]> = HashSet::new();
        let mut lost: HashSet<[u8; 16]> = HashSet::new();
        for (label, t) in &trees {
            t.walk(
                n,
                &mut |p| {
                    if !seen.insert(p.block_id) {
                        return false;
                    }
                    match self.io.check_node_copies(p) {
                        (Ok(()), Ok(())) => true,
                        (Err(e), Err(_)) => {
                            lost.insert(p.block_id);
                            let what = format!(
                                "tree node in {} has no intact copy: what it held is missing \
                                 ({e})",
                                format::segment_file_name(p.segment)
                            );
                            if label != "live tree" {
                                rep.snapshot_damage.push(SnapshotDamage {
                                    snapshot: label.clone(),
                                    path: "(tree node)".into(),
                                    detail: what,
                                    advice: snapshot_advice("VOLUME", label),
                                });
                            }
                            false
                        }
                        _ => {
                            bad.insert(p.block_id);
                            true
                        }
                    }
                },
                &mut |_, _| Ok(()),
                &mut |_, _| {},
            )?;
        }
        if bad.is_empty() {
            return Ok(());
        }
        // One memo for every tree (as the cleaner does): a node shared by the live
        // tree and snapshots, or an ancestor of a rewritten node they share, is
        // written once and stays shared.
        let mut r = RepairReloc {
            io: &self.io,
            bad: &bad,
            lost: &lost,
            done: HashMap::new(),
            rewritten: 0,
        };
        let mut live = st.tree.clone();
        live.relocate_shared(n, &mut r)?;
        let mut snaps = st.snapshots.clone();
        for s in &mut snaps {
            s.tree = relocate_stored(&s.tree, n, &mut r)?;
        }
        st.tree = live;
        st.snapshots = snaps;
        st.changed = true;
        rep.nodes_rewritten = r.rewritten;
        Ok(())
    }

    /// Step 2a: records of missing inodes, dangling entries, wrong entry
    /// types, readdir records.
    fn repair_metadata(&self, st: &mut State, rep: &mut RepairReport) -> Result<()> {
        let n = self.nodes();
        let f = self.repair_facts(&st.tree)?;
        let links = f.links();
        // Records of inodes that do not exist (never the root: without it the
        // volume would not have opened).
        for ino in &f.key_inos {
            if *ino == 0 || f.inodes.contains_key(ino) {
                continue;
            }
            let count =
                self.remove_key_range(st, &key(*ino, 0, &[]), &key(ino.saturating_add(1), 0, &[]))?;
            st.changed = true;
            rep.entries_fixed.push(format!(
                "removed {count} record(s) of inode {ino}, which does not exist"
            ));
        }
        for o in &f.orphans {
            if !f.inodes.contains_key(o) {
                st.tree.remove(n, &key(0, tag::ORPHAN, &o.to_be_bytes()))?;
                st.changed = true;
                rep.entries_fixed
                    .push(format!("removed the orphan record of missing inode {o}"));
            }
        }
        // Entries: dangling ones go, wrong types are corrected, readdir
        // records are made to match.
        let mut claimed: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
        let mut dropped_cookies: HashSet<(u64, u64)> = HashSet::new();
        for (p, name, e) in &f.entries {
            if !f.inodes.contains_key(p) {
                continue; // removed above with its directory's records
            }
            let shown = text(&join(&path_of(&links, *p).unwrap_or_default(), name));
            let Some(i) = f.inodes.get(&e.ino) else {
                self.del_entry(st, *p, name, e)?;
                match f.cookies.get(&(*p, e.cookie)) {
                    // The readdir record belonged to another name: keep it.
                    Some(other) if other != name => {
                        st.tree.insert(
                            n,
                            &key(*p, tag::DIRCOOKIE, &e.cookie.to_be_bytes()),
                            other.clone(),
                        )?;
                    }
                    _ => {
                        dropped_cookies.insert((*p, e.cookie));
                    }
                }
                rep.entries_fixed.push(format!(
                    "removed entry {shown}: it named inode {}, which does not exist",
                    e.ino
                ));
                continue;
            };
            let mut e2 = e.clone();
            if i.kind != e.kind {
                e2.kind = i.kind;
                rep.entries_fixed.push(format!(
                    "entry {shown}: type corrected to {:?} (its inode's)",
                    i.kind
                ));
            }
            if claimed.contains_key(&(*p, e.cookie)) {
                // Two entries with one readdir cookie: a new one for this.
                let mut pi = self.get_inode(st, *p)?;
                e2.cookie = pi.next_cookie;
                pi.next_cookie += 1;
                self.put_inode(st, *p, &pi)?;
                rep.entries_fixed
                    .push(format!("entry {shown}: given its own readdir position"));
            } else if f.cookies.get(&(*p, e.cookie)) != Some(name) {
                rep.entries_fixed
                    .push(format!("entry {shown}: readdir record rewritten"));
            }
            if e2 != *e {
                st.tree
                    .insert(n, &key(*p, tag::DIRENT, name), e2.encode())?;
            }
            if e2 != *e || f.cookies.get(&(*p, e.cookie)) != Some(name) {
                st.tree.insert(
                    n,
                    &key(*p, tag::DIRCOOKIE, &e2.cookie.to_be_bytes()),
                    name.clone(),
                )?;
                st.changed = true;
            }
            claimed.insert((*p, e2.cookie), name.clone());
        }
        // Readdir records no entry claims.
        for ((p, c), name) in &f.cookies {
            if !f.inodes.contains_key(p)
                || claimed.contains_key(&(*p, *c))
                || dropped_cookies.contains(&(*p, *c))
            {
                continue;
            }
            st.tree
                .remove(n, &key(*p, tag::DIRCOOKIE, &c.to_be_bytes()))?;
            st.changed = true;
            rep.entries_fixed.push(format!(
                "removed a readdir record of {} for {}, which has no entry",
                path_text(&links, *p),
                text(name)
            ));
        }
        Ok(())
    }

    /// Step 2b: files with damaged blocks lose them and move to lost+found;
    /// inodes in no directory are linked there.
    fn repair_damaged_files(
        &self,
        st: &mut State,
        rep: &mut RepairReport,
        verified: &mut HashMap<[u8; 16], bool>,
    ) -> Result<()> {
        let n = self.nodes();
        let bs = self.header.block_size as u64;
        let f = self.repair_facts(&st.tree)?;
        let links = f.links();
        let mut bad_blocks: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        let mut bad_xattrs: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
        for (ino, blk, p) in f.blocks.iter().chain(&f.frags) {
            if !self.verify(p, BlockKind::Data, verified)? {
                bad_blocks.entry(*ino).or_default().insert(*blk);
            }
        }
        for (ino, name, p) in &f.xattr_blocks {
            if !self.verify(p, BlockKind::Xattr, verified)? {
                bad_xattrs.entry(*ino).or_default().push(name.clone());
            }
        }
        let damaged: BTreeSet<u64> = bad_blocks
            .keys()
            .chain(bad_xattrs.keys())
            .copied()
            .collect();
        let mut lf: Option<(u64, Vec<u8>)> = None;
        for ino in damaged {
            let Some(mut i) = f.inodes.get(&ino).cloned() else {
                continue;
            };
            let blocks = bad_blocks.remove(&ino).unwrap_or_default();
            let xattrs = bad_xattrs.remove(&ino).unwrap_or_default();
            let ranges = lost_ranges(&blocks, bs, i.size);
            for b in &blocks {
                self.drop_blocks(st, ino, &mut i, *b, b.saturating_add(1))?;
            }
            for x in &xattrs {
                st.tree.remove(n, &key(ino, tag::XATTR, x))?;
            }
            i.ctime = now();
            self.put_inode(st, ino, &i)?;
            // Every link, in path order.
            let mut own: Vec<(Vec<u8>, Link)> = links
                .get(&ino)
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|(p, name)| {
                    (
                        join(&path_of(&links, p).unwrap_or_default(), &name),
                        (p, name),
                    )
                })
                .collect();
            own.sort();
            let (paths, own): (Vec<Vec<u8>>, Vec<Link>) = own.into_iter().unzip();
            let lost_xattrs: Vec<String> = xattrs.iter().map(|x| text(x)).collect();
            if !xattrs.is_empty() {
                self.put_xattr(st, ino, LOST_XATTRS_XATTR, &xattrs.join(&b'\n'))?;
            }
            if i.kind == FileKind::Dir {
                // A directory stays where it is; only its xattrs were lost.
                rep.entries_fixed.push(format!(
                    "directory {}: removed damaged extended attribute(s) {}",
                    path_text(&links, ino),
                    lost_xattrs.join(", ")
                ));
                continue;
            }
            if !ranges.is_empty() {
                self.put_xattr(st, ino, LOST_RANGES_XATTR, ranges_text(&ranges).as_bytes())?;
            }
            if !paths.is_empty() {
                self.put_xattr(st, ino, LOST_PATH_XATTR, &paths.join(&b'\n'))?;
            }
            let (dir, dir_path) = match &lf {
                Some(d) => d.clone(),
                None => {
                    let d = self.lost_found(st, rep)?;
                    lf = Some(d.clone());
                    d
                }
            };
            let mut names = Vec::new();
            for ((p, name), path) in own.iter().zip(&paths) {
                if *p == dir {
                    names.push(text(&join(&dir_path, name)));
                    continue; // already there
                }
                let Some(e) = self.get_entry(st, *p, name)? else {
                    continue;
                };
                let new = self.lost_name(st, dir, path)?;
                self.del_entry(st, *p, name, &e)?;
                self.touch_dir(st, *p)?;
                self.link_into(st, dir, &new, ino, e.kind)?;
                names.push(text(&join(&dir_path, &new)));
            }
            rep.lost_files.push(LostFile {
                ino,
                paths: paths.iter().map(|p| text(p)).collect(),
                names,
                lost_ranges: ranges,
                lost_xattrs,
            });
        }
        // Inodes in no directory (and not waiting to be deleted).
        for (ino, i) in &f.inodes {
            if *ino == ROOT_INO || links.contains_key(ino) || f.orphans.contains(ino) {
                continue;
            }
            let (dir, dir_path) = match &lf {
                Some(d) => d.clone(),
                None => {
                    let d = self.lost_found(st, rep)?;
                    lf = Some(d.clone());
                    d
                }
            };
            let name = self.lost_name(st, dir, format!("inode-{ino}").as_bytes())?;
            self.link_into(st, dir, &name, *ino, i.kind)?;
            rep.entries_fixed.push(format!(
                "inode {ino} was in no directory: linked as {}",
                text(&join(&dir_path, &name))
            ));
        }
        Ok(())
    }

    /// Step 2c: link counts, directory parents, block counts, blocks past
    /// the end of a file.
    fn repair_counts(&self, st: &mut State, rep: &mut RepairReport) -> Result<()> {
        let bs = self.header.block_size as u64;
        let f = self.repair_facts(&st.tree)?;
        let links = f.links();
        let mut count: HashMap<u64, u32> = HashMap::new();
        let mut subdirs: HashMap<u64, u32> = HashMap::new();
        for (p, _, e) in &f.entries {
            *count.entry(e.ino).or_default() += 1;
            if e.kind == FileKind::Dir {
                *subdirs.entry(*p).or_default() += 1;
            }
        }
        let mut beyond: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        let mut stored: HashMap<u64, u64> = HashMap::new();
        for (ino, blk, _) in &f.blocks {
            match f.inodes.get(ino) {
                Some(i) if blk.checked_mul(bs).is_none_or(|at| at >= i.size) => {
                    beyond.entry(*ino).or_default().push(*blk)
                }
                _ => *stored.entry(*ino).or_default() += 1,
            }
        }
        // Fragments past the end, or with no block under them, go too.
        let based: HashSet<(u64, u64)> = f.blocks.iter().map(|(i, b, _)| (*i, *b)).collect();
        for (ino, blk, _) in &f.frags {
            let past = f
                .inodes
                .get(ino)
                .is_some_and(|i| blk.checked_mul(bs).is_none_or(|at| at >= i.size));
            if past || !based.contains(&(*ino, *blk)) {
                let bl = beyond.entry(*ino).or_default();
                if !bl.contains(blk) {
                    bl.push(*blk);
                }
            }
        }
        for (ino, old) in &f.inodes {
            let mut i = old.clone();
            let shown = path_text(&links, *ino);
            let mut what = Vec::new();
            if let Some(bl) = beyond.get(ino) {
                for b in bl {
                    self.drop_blocks(st, *ino, &mut i, *b, b.saturating_add(1))?;
                }
                what.push(format!("{} block(s) past its end removed", bl.len()));
            }
            let l = count.get(ino).copied().unwrap_or(0);
            if i.kind == FileKind::Dir {
                let want = 2 + subdirs.get(ino).copied().unwrap_or(0);
                if (*ino == ROOT_INO || l == 1) && i.nlink != want {
                    what.push(format!("link count {} corrected to {want}", i.nlink));
                    i.nlink = want;
                }
                if l == 1
                    && let Some((p, _, _)) = f.entries.iter().find(|(_, _, e)| e.ino == *ino)
                    && i.parent != *p
                {
                    what.push("parent corrected".into());
                    i.parent = *p;
                }
            } else {
                if l > 0 && i.nlink != l {
                    what.push(format!("link count {} corrected to {l}", i.nlink));
                    i.nlink = l;
                }
                let want = stored.get(ino).copied().unwrap_or(0);
                if i.blocks != want {
                    what.push(format!("block count {} corrected to {want}", i.blocks));
                    i.blocks = want;
                }
            }
            if !what.is_empty() {
                self.put_inode(st, *ino, &i)?;
                rep.entries_fixed
                    .push(format!("{shown}: {}", what.join(", ")));
            }
        }
        Ok(())
    }

    /// Step 3: damaged files of snapshots (reported only).
    fn report_snapshots(
        &self,
        st: &State,
        rep: &mut RepairReport,
        verified: &mut HashMap<[u8; 16], bool>,
    ) -> Result<()> {
        let bs = self.header.block_size as u64;
        for s in &st.snapshots {
            let f = self.repair_facts(&Tree::from_ptr(s.tree))?;
            let links = f.links();
            let mut bad: BTreeMap<u64, (BTreeSet<u64>, Vec<String>)> = BTreeMap::new();
            for (ino, blk, p) in f.blocks.iter().chain(&f.frags) {
                if !self.verify(p, BlockKind::Data, verified)? {
                    bad.entry(*ino).or_default().0.insert(*blk);
                }
            }
            for (ino, name, p) in &f.xattr_blocks {
                if !self.verify(p, BlockKind::Xattr, verified)? {
                    bad.entry(*ino).or_default().1.push(text(name));
                }
            }
            for (ino, (blocks, xattrs)) in bad {
                let size = f.inodes.get(&ino).map(|i| i.size).unwrap_or(0);
                let mut detail = Vec::new();
                if !blocks.is_empty() {
                    detail.push(format!(
                        "{} damaged block(s), bytes {}",
                        blocks.len(),
                        ranges_text(&lost_ranges(&blocks, bs, size))
                    ));
                }
                if !xattrs.is_empty() {
                    detail.push(format!(
                        "damaged extended attribute(s) {}",
                        xattrs.join(", ")
                    ));
                }
                rep.snapshot_damage.push(SnapshotDamage {
                    snapshot: s.name.clone(),
                    path: path_text(&links, ino),
                    detail: detail.join("; "),
                    advice: snapshot_advice("VOLUME", &s.name),
                });
            }
        }
        Ok(())
    }

    /// Whether a data or xattr block reads and verifies (remembered per
    /// block). Only damage counts: any other error stops the repair.
    fn verify(
        &self,
        p: &BlockPtr,
        kind: BlockKind,
        verified: &mut HashMap<[u8; 16], bool>,
    ) -> Result<bool> {
        if let Some(ok) = verified.get(&p.block_id) {
            return Ok(*ok);
        }
        let ok = match self.io.read_block(p, kind) {
            Ok(_) => true,
            Err(Error::Integrity { .. }) => false,
            Err(e) => return Err(e),
        };
        verified.insert(p.block_id, ok);
        Ok(ok)
    }

    /// The segments the live tree uses (nodes and blocks).
    fn tree_segments(&self, t: &Tree) -> Result<BTreeSet<u64>> {
        let mut segs = BTreeSet::new();
        let mut seen = HashSet::new();
        let mut vals = Vec::new();
        t.walk(
            self.nodes(),
            &mut |p| {
                segs.insert(p.segment);
                seen.insert(p.block_id)
            },
            &mut |k, v| {
                if let Some(p) = value_ptr(k, v) {
                    vals.push(p.segment);
                }
                Ok(())
            },
            &mut |_, _| {},
        )?;
        segs.extend(vals);
        Ok(segs)
    }

    /// Mirror files whose segment is gone and that no tree needs any more.
    fn remove_stray_mirrors(&self, st: &State) -> Result<()> {
        let storage = &self.io.storage;
        let Ok(names) = storage.list(format::SEGMENT_DIR) else {
            return Ok(());
        };
        let mut strays = Vec::new();
        for name in names {
            let Some(id) = name
                .strip_suffix(".meta")
                .and_then(|stem| format::parse_segment_file_name(&format!("{stem}.seg")))
            else {
                continue;
            };
            if !storage.exists(&format::segment_file_name(id)) {
                strays.push(id);
            }
        }
        if strays.is_empty() {
            return Ok(());
        }
        let mut used = BTreeSet::new();
        for t in self.all_trees(st) {
            used.extend(self.tree_segments(&t)?);
        }
        // A reader on an older root may still need it: then keep it.
        if !self.reader_pins()?.is_some_and(|p| p.is_empty()) {
            return Ok(());
        }
        for id in strays {
            if !used.contains(&id) {
                self.remove_mirror(id)?;
            }
        }
        Ok(())
    }

    /// Sets an xattr inside the repair (the state lock is held).
    fn put_xattr(&self, st: &mut State, ino: u64, name: &[u8], value: &[u8]) -> Result<()> {
        let value = value.get(..format::XATTR_VALUE_MAX).unwrap_or(value);
        let v = if value.len() > format::XATTR_INLINE_MAX {
            XattrValue::Block(self.io.write_block(BlockKind::Xattr, value)?)
        } else {
            XattrValue::Inline(value.to_vec())
        };
        st.tree
            .insert(self.nodes(), &key(ino, tag::XATTR, name), v.encode())?;
        st.changed = true;
        Ok(())
    }

    /// `/lost+found` (made, mode 0700, when missing; when the name is taken
    /// by something else, `lost+found.N`).
    fn lost_found(&self, st: &mut State, rep: &mut RepairReport) -> Result<(u64, Vec<u8>)> {
        for i in 0..1000u32 {
            let name = if i == 0 {
                LOST_FOUND.to_vec()
            } else {
                format!("lost+found.{i}").into_bytes()
            };
            match self.get_entry(st, ROOT_INO, &name)? {
                Some(e) if e.kind == FileKind::Dir => return Ok((e.ino, join(b"/", &name))),
                Some(_) => continue,
                None => {
                    let ino = self.make_dir(st, ROOT_INO, &name, 0o700)?;
                    rep.entries_fixed.push(format!("created /{}", text(&name)));
                    return Ok((ino, join(b"/", &name)));
                }
            }
        }
        Err(Error::Invalid(
            "no free name for a lost+found directory in /".into(),
        ))
    }

    fn make_dir(&self, st: &mut State, parent: u64, name: &[u8], perm: u32) -> Result<u64> {
        let mut pi = self.dir_inode(st, parent)?;
        let ino = st.next_ino;
        st.next_ino += 1;
        let t = now();
        let inode = super::empty_dir(perm, parent, t);
        self.put_inode(st, ino, &inode)?;
        self.add_entry(st, parent, &mut pi, name, ino, FileKind::Dir)?;
        pi.nlink += 1;
        pi.mtime = t;
        pi.ctime = t;
        self.put_inode(st, parent, &pi)?;
        Ok(ino)
    }

    /// Adds an entry for `ino` to directory `dir` (a moved directory gets
    /// its parent and the link counts updated).
    fn link_into(
        &self,
        st: &mut State,
        dir: u64,
        name: &[u8],
        ino: u64,
        kind: FileKind,
    ) -> Result<()> {
        let mut di = self.dir_inode(st, dir)?;
        self.add_entry(st, dir, &mut di, name, ino, kind)?;
        let t = now();
        if kind == FileKind::Dir {
            di.nlink += 1;
            let mut i = self.get_inode(st, ino)?;
            i.parent = dir;
            i.ctime = t;
            self.put_inode(st, ino, &i)?;
        }
        di.mtime = t;
        di.ctime = t;
        self.put_inode(st, dir, &di)
    }

    fn touch_dir(&self, st: &mut State, dir: u64) -> Result<()> {
        let mut i = self.get_inode(st, dir)?;
        let t = now();
        i.mtime = t;
        i.ctime = t;
        self.put_inode(st, dir, &i)
    }

    /// A free name in `dir` for something that was at `path`: the path with
    /// '/' as '#', at most 255 bytes (the end kept), `.N` added when taken.
    fn lost_name(&self, st: &State, dir: u64, path: &[u8]) -> Result<Vec<u8>> {
        let trimmed = path.strip_prefix(b"/").unwrap_or(path);
        let mut base: Vec<u8> = trimmed
            .iter()
            .map(|&b| if b == b'/' || b == 0 { b'#' } else { b })
            .collect();
        if base.is_empty() || base == b"." || base == b".." {
            base = b"unnamed".to_vec();
        }
        for i in 0..100_000u32 {
            let suffix = if i == 0 {
                Vec::new()
            } else {
                format!(".{i}").into_bytes()
            };
            let keep = NAME_MAX - suffix.len();
            let mut name = base
                .get(base.len().saturating_sub(keep)..)
                .unwrap_or(&base)
                .to_vec();
            name.extend_from_slice(&suffix);
            if self.get_entry(st, dir, &name)?.is_none() {
                return Ok(name);
            }
        }
        Err(Error::Invalid(format!(
            "no free name in lost+found for {}",
            text(path)
        )))
    }
}

/// Step 1's relocation: nodes with a failing copy are sealed again from the copy that
/// verifies (a new record, so their parents change too); nodes with no intact copy are
/// left where they are (what they held is repaired as missing by the later steps).
struct RepairReloc<'a> {
    io: &'a super::blocks::BlockIo,
    bad: &'a HashSet<[u8; 16]>,
    lost: &'a HashSet<[u8; 16]>,
    done: HashMap<[u8; 16], BlockPtr>,
    rewritten: u64,
}

impl Relocator for RepairReloc<'_> {
    fn done(&self, p: &BlockPtr) -> Option<BlockPtr> {
        self.done.get(&p.block_id).copied()
    }
    fn record(&mut self, old: &BlockPtr, new: BlockPtr) {
        self.done.insert(old.block_id, new);
    }
    fn visit(&self, p: &BlockPtr) -> bool {
        !self.lost.contains(&p.block_id)
    }
    fn move_node(&mut self, p: &BlockPtr) -> Result<Option<BlockPtr>> {
        if !self.bad.contains(&p.block_id) {
            return Ok(None);
        }
        let plain = self.io.read_block(p, BlockKind::Node)?;
        let np = self.io.write_block(BlockKind::Node, &plain)?;
        self.rewritten += 1;
        Ok(Some(np))
    }
    fn map_value(&mut self, _key: &[u8], _val: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }
}
