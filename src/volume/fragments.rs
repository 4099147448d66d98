//! Small overwrites as sealed fragments (volume version 2, docs/FORMAT.md
//! "Fragments").
//!
//! A write of a few KiB into a stored block used to cost the whole block twice:
//! decrypt it to merge the new bytes, seal it again at the next write-back (a
//! 4 KiB write into a 64 KiB block: 32x the bytes through the cipher). Now such
//! a write is buffered as the bytes it wrote ([`DirtyBlock::written`]), and the
//! write-back seals only those bytes as a fragment record, keyed
//! `ino|FRAG|block|sequence` beside the block's map entry. Reads apply a block's
//! fragments over it in sequence order. A write-back drops the fragments its new
//! ones cover entirely, so page-sized rewrites keep one fragment per page and a
//! burst of them never decrypts the block. When a block would have more than
//! [`MAX_FRAGMENTS`] live fragments, or they would add up to more than the
//! block, the write-back merges them into a new whole block and drops them, so
//! a read costs at most a bounded number of records and the space they take
//! stays bounded.
//!
//! A fragmented block costs a cold read one record per fragment it overlaps, so
//! once the mount has been quiet for a while (no reads or writes), the idle merge
//! ([`Volume::merge_idle_fragments`], run by the daemon's committer) folds the
//! blocks it has seen with fragments into whole blocks, a batch at a time, through
//! the ordinary write-back and commit: the content does not change, so neither
//! does any time stamp, and a crash in between leaves the fragments as they were.
//!
//! Invariants: a fragment exists only over a stored block (dropping a block drops
//! its fragments, a whole-block write replaces both); a dirty block with written
//! ranges is never the full content of the block, only what was written since.

use super::*;

/// Most live fragments over one block (together at most the block size)
/// before the next write-back merges them: one per 4 KiB page of a 64 KiB block.
pub const MAX_FRAGMENTS: usize = 16;
/// A block whose next fragment would get this sequence number or more is
/// merged instead: sequence numbers restart at 0 after a merge, and a block
/// rewritten page by page for ever (dead fragments are dropped, so it need
/// never merge otherwise) must not run out of them.
pub const SEQ_LIMIT: u32 = u32::MAX - 1024;

impl Volume {
    /// Remembers that block `blk` of `ino` carries fragments (for the idle merge).
    pub(super) fn note_fragmented(&self, ino: u64, blk: u64) {
        self.frag_blocks.lock().insert((ino, blk));
    }

    /// Notes a data read, for [`Volume::quiet_for`].
    pub(super) fn note_access(&self) {
        self.last_access_ms
            .store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long since the last read or change started.
    pub fn quiet_for(&self) -> Duration {
        let last = self
            .last_access_ms
            .load(Ordering::Relaxed)
            .max(self.last_change_ms.load(Ordering::Relaxed));
        let now = self.opened.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(last))
    }

    /// Merges up to `max` of the blocks seen carrying fragments into whole
    /// blocks and commits; returns how many were merged. Meant for a quiet
    /// mount: it holds the volume lock while it reads those blocks.
    ///
    /// Each block's current content (stored block with its fragments laid
    /// over it) is handed to the write-back as a whole dirty block, which seals
    /// it as one record and drops the fragments. Blocks with buffered writes are
    /// left to their own write-back. Nothing else changes: not the data, not the
    /// file's times. On an error nothing buffered is lost; the blocks not yet
    /// handled are dropped from the list until a read or write names them again.
    ///
    /// # Errors
    /// A read-only or degraded volume, a full store, or a failing read or commit.
    pub fn merge_idle_fragments(&self, max: usize) -> Result<usize> {
        if self.read_only || !self.fragments_on() {
            return Ok(0);
        }
        let todo: Vec<(u64, u64)> = {
            let mut s = self.frag_blocks.lock();
            std::iter::from_fn(|| s.pop_first()).take(max).collect()
        };
        if todo.is_empty() {
            return Ok(0);
        }
        let bs = self.header.block_size as u64;
        let mut merged = 0;
        let mut st = self.st.write();
        let res = (|| -> Result<()> {
            // Not `writable()`: a merge is no change of the user's, and must not
            // hold off the next quiet period.
            self.healthy()?;
            for &(ino, blk) in &todo {
                if st.dirty.contains_key(&(ino, blk)) {
                    continue;
                }
                let i = match self.get_inode(&st, ino) {
                    Ok(i) => i,
                    Err(Error::NotFound) => continue,
                    Err(e) => return Err(e),
                };
                if i.kind != FileKind::File || blk.saturating_mul(bs) >= i.size {
                    continue;
                }
                if self.fragments(&st, ino, blk, blk + 1)?.is_empty() {
                    continue;
                }
                self.check_space(st.dirty_bytes as u64 + bs)?;
                let d = DirtyBlock::full(self.load_block_full(&st, ino, blk)?);
                st.dirty_bytes += d.mem();
                st.dirty.insert((ino, blk), Arc::new(d));
                merged += 1;
            }
            Ok(())
        })();
        drop(st);
        // On an error the blocks not handled are forgotten, not retried at once
        // (a full store would fail every tick): reads and writes name them again.
        res?;
        if merged > 0 {
            self.commit()?;
        }
        Ok(merged)
    }

    /// How many fragments block `blk` of `ino` carries (diagnostics and tests).
    ///
    /// # Errors
    /// A damaged fragment map.
    pub fn fragment_count(&self, ino: u64, blk: u64) -> Result<usize> {
        let st = self.st.read();
        Ok(self.fragments(&st, ino, blk, blk.saturating_add(1))?.len())
    }

    /// How many blocks of `ino` carry fragments (diagnostics and tests).
    ///
    /// # Errors
    /// A damaged fragment map.
    pub fn fragmented_blocks(&self, ino: u64) -> Result<usize> {
        let st = self.st.read();
        let mut blocks: Vec<u64> = self
            .fragments(&st, ino, 0, u64::MAX)?
            .iter()
            .map(|f| f.blk)
            .collect();
        blocks.dedup();
        Ok(blocks.len())
    }
}

/// A block waiting to be sealed (its buffers are wiped on drop). Cloned only
/// when a write changes a buffer that a write-back is sealing.
pub enum DirtyBlock {
    /// The block's whole content, full block size.
    Whole(Plain),
    /// A small write into a stored block or a hole: only the bytes written
    /// since, as pieces `(offset, bytes)`, sorted, disjoint and not touching;
    /// the rest comes from the stored block and its fragments (zeros for a
    /// hole). Only pieces over a stored block may become fragments.
    Pieces(Vec<(u32, Plain)>),
}

impl Clone for DirtyBlock {
    fn clone(&self) -> Self {
        match self {
            DirtyBlock::Whole(p) => DirtyBlock::Whole(Plain(p.0.clone())),
            DirtyBlock::Pieces(ps) => {
                DirtyBlock::Pieces(ps.iter().map(|(a, p)| (*a, Plain(p.0.clone()))).collect())
            }
        }
    }
}

impl DirtyBlock {
    pub fn full(data: Vec<u8>) -> Self {
        DirtyBlock::Whole(Plain(data))
    }

    pub fn piece(from: usize, src: &[u8]) -> Self {
        DirtyBlock::Pieces(vec![(from as u32, Plain(src.to_vec()))])
    }

    /// The whole content, when this is a whole block.
    pub fn whole(&self) -> Option<&Plain> {
        match self {
            DirtyBlock::Whole(p) => Some(p),
            DirtyBlock::Pieces(_) => None,
        }
    }

    /// Bytes of memory this entry holds (what the dirty limit counts).
    pub fn mem(&self) -> usize {
        match self {
            DirtyBlock::Whole(p) => p.0.len(),
            DirtyBlock::Pieces(ps) => ps.iter().map(|(_, p)| p.0.len()).sum(),
        }
    }

    /// Whether the entry gives every byte of `[0, len)`.
    pub fn covers(&self, len: usize) -> bool {
        match self {
            DirtyBlock::Whole(_) => true,
            DirtyBlock::Pieces(ps) => {
                len == 0 || ps.first().is_some_and(|(a, p)| *a == 0 && p.0.len() >= len)
            }
        }
    }

    /// Copies `src` in at block offset `from`; pieces that come to cover the
    /// whole block (`bs` bytes) turn into a whole block.
    pub fn put(&mut self, from: usize, src: &[u8], bs: usize) {
        let ps = match self {
            DirtyBlock::Whole(p) => {
                p.0[from..from + src.len()].copy_from_slice(src);
                return;
            }
            DirtyBlock::Pieces(ps) => ps,
        };
        let (mut lo, mut hi) = (from, from + src.len());
        // Pieces that overlap or touch the new bytes merge with them.
        let mut keep = Vec::with_capacity(ps.len() + 1);
        let mut merged = Vec::new();
        for (a, p) in ps.drain(..) {
            let (pa, pb) = (a as usize, a as usize + p.0.len());
            if pb < lo || pa > hi {
                keep.push((a, p));
            } else {
                lo = lo.min(pa);
                hi = hi.max(pb);
                merged.push((a, p));
            }
        }
        let mut buf = vec![0u8; hi - lo];
        for (a, p) in &merged {
            let at = *a as usize - lo;
            buf[at..at + p.0.len()].copy_from_slice(&p.0);
        }
        buf[from - lo..from - lo + src.len()].copy_from_slice(src);
        drop(merged);
        let at = keep.partition_point(|(a, _)| (*a as usize) < lo);
        keep.insert(at, (lo as u32, Plain(buf)));
        if keep.len() == 1 && lo == 0 && hi >= bs {
            if let Some((_, p)) = keep.pop() {
                *self = DirtyBlock::Whole(p);
            }
            return;
        }
        *ps = keep;
    }

    /// Lays what this entry holds over `out`, which holds block bytes
    /// `[from, from + out.len())` as stored.
    pub fn overlay(&self, from: usize, out: &mut [u8]) {
        match self {
            DirtyBlock::Whole(p) => copy_stored(&p.0, from, out),
            DirtyBlock::Pieces(ps) => {
                for (a, p) in ps {
                    let a = *a as usize;
                    let lo = a.max(from);
                    let hi = (a + p.0.len()).min(from + out.len());
                    if lo < hi {
                        out[lo - from..hi - from].copy_from_slice(&p.0[lo - a..hi - a]);
                    }
                }
            }
        }
    }

    pub fn pieces(&self) -> &[(u32, Plain)] {
        match self {
            DirtyBlock::Whole(_) => &[],
            DirtyBlock::Pieces(ps) => ps,
        }
    }
}

/// A fragment as found in the tree.
#[derive(Clone, Copy, Debug)]
pub struct Fragment {
    pub blk: u64,
    pub seq: u32,
    pub v: FragValue,
}

impl Volume {
    /// Whether this volume's tree may hold fragments (and new ones may be written).
    pub(super) fn fragments_on(&self) -> bool {
        self.header.version >= format::FRAGMENTS_SINCE
    }

    pub(super) fn frag_key(ino: u64, blk: u64, seq: u32) -> Vec<u8> {
        let mut s = [0u8; 12];
        s[..8].copy_from_slice(&blk.to_be_bytes());
        s[8..].copy_from_slice(&seq.to_be_bytes());
        key(ino, tag::FRAG, &s)
    }

    fn frag_range_key(ino: u64, blk: u64) -> Vec<u8> {
        key(ino, tag::FRAG, &blk.to_be_bytes())
    }

    /// The end of fragment keys for blocks below `to` (u64::MAX: all of them).
    fn frag_range_end(ino: u64, to: u64) -> Vec<u8> {
        if to == u64::MAX {
            key(ino, tag::FRAG + 1, &[])
        } else {
            Self::frag_range_key(ino, to)
        }
    }

    /// The fragments of blocks `[from, to)` of `ino`, by block then sequence.
    pub(super) fn fragments(
        &self,
        st: &State,
        ino: u64,
        from: u64,
        to: u64,
    ) -> Result<Vec<Fragment>> {
        if !self.fragments_on() || from >= to {
            return Ok(Vec::new());
        }
        let bs = self.header.block_size;
        let mut out = Vec::new();
        let mut bad = None;
        st.tree.range(
            self.nodes(),
            &Self::frag_range_key(ino, from),
            &Self::frag_range_end(ino, to),
            &mut |k, v| {
                let parsed = k
                    .get(9..21)
                    .filter(|_| k.len() == 21)
                    .and_then(|s| {
                        let blk = u64::from_be_bytes(s[..8].try_into().ok()?);
                        let seq = u32::from_be_bytes(s[8..].try_into().ok()?);
                        Some((blk, seq))
                    })
                    .ok_or_else(|| "malformed fragment key".to_string())
                    .and_then(|(blk, seq)| {
                        FragValue::from_bytes(v, bs)
                            .map(|v| Fragment { blk, seq, v })
                            .map_err(|e| e.to_string())
                    });
                match parsed {
                    Ok(f) => {
                        out.push(f);
                        Ok(true)
                    }
                    Err(e) => {
                        bad = Some(e);
                        Ok(false)
                    }
                }
            },
        )?;
        if let Some(e) = bad {
            return Err(Error::Integrity {
                what: format!("inode {ino} fragment map"),
                detail: e,
            });
        }
        Ok(out)
    }

    /// Lays fragment `f` over `out`, which holds `[from, from + out.len())` of its block.
    pub(super) fn apply_fragment(
        &self,
        ino: u64,
        f: &Fragment,
        from: usize,
        out: &mut [u8],
        cache: bool,
    ) -> Result<()> {
        let (a, b) = (f.v.offset as usize, (f.v.offset + f.v.len) as usize);
        if b <= from || a >= from + out.len() {
            return Ok(());
        }
        let plain = if cache {
            self.io.read_data(&f.v.ptr)
        } else {
            self.io.read_data_once(&f.v.ptr)
        };
        let plain = plain.map_err(|e| match e {
            Error::Integrity { what, detail } => Error::Integrity {
                what: format!("inode {ino} block {} fragment {} ({what})", f.blk, f.seq),
                detail,
            },
            e => e,
        })?;
        let Some(bytes) = plain.0.get(..f.v.len as usize) else {
            return Err(Error::Integrity {
                what: format!("inode {ino} block {} fragment {}", f.blk, f.seq),
                detail: format!(
                    "the record holds {} bytes, the fragment names {}",
                    plain.0.len(),
                    f.v.len
                ),
            });
        };
        let lo = a.max(from);
        let hi = b.min(from + out.len());
        out[lo - from..hi - from].copy_from_slice(&bytes[lo - a..hi - a]);
        Ok(())
    }

    /// Removes the fragments of blocks `[from, to)`; returns how many there were.
    pub(super) fn drop_fragments(
        &self,
        st: &mut State,
        ino: u64,
        from: u64,
        to: u64,
    ) -> Result<u64> {
        if !self.fragments_on() || from >= to {
            return Ok(0);
        }
        self.remove_key_range(
            st,
            &Self::frag_range_key(ino, from),
            &Self::frag_range_end(ino, to),
        )
    }

    /// What a merge starts from, full block size: the stored record (when
    /// `base`; else zeros, for a block whose fragments and new bytes cover it
    /// all) with the `live` fragments laid over it in order (the dead ones are
    /// covered by newer bytes). What it reads is about to be replaced, so it is
    /// not added to the block cache.
    pub(super) fn merge_base(
        &self,
        st: &State,
        ino: u64,
        blk: u64,
        base: bool,
        live: &[&Fragment],
    ) -> Result<Vec<u8>> {
        let mut b = vec![0u8; self.header.block_size as usize];
        if base && let Some(p) = self.block_ptr(st, ino, blk)? {
            let plain = self.io.read_data_once(&p).map_err(|e| match e {
                Error::Integrity { what, detail } => Error::Integrity {
                    what: format!("inode {ino} block {blk} ({what})"),
                    detail,
                },
                e => e,
            })?;
            copy_stored(&plain.0, 0, &mut b);
        }
        for f in live {
            self.apply_fragment(ino, f, 0, &mut b, false)?;
        }
        Ok(b)
    }
}

/// Byte ranges of a block, as sorted, disjoint, non-touching `[a, b)` spans.
#[derive(Default)]
pub struct Cover(Vec<(u32, u32)>);

impl Cover {
    pub fn add(&mut self, a: u32, b: u32) {
        if a >= b {
            return;
        }
        let (mut lo, mut hi) = (a, b);
        self.0.retain(|&(x, y)| {
            if y < lo || x > hi {
                true
            } else {
                lo = lo.min(x);
                hi = hi.max(y);
                false
            }
        });
        let at = self.0.partition_point(|&(x, _)| x < lo);
        self.0.insert(at, (lo, hi));
    }

    /// Whether every byte of `[a, b)` is covered (an empty span is).
    pub fn contains(&self, a: u32, b: u32) -> bool {
        a >= b || self.0.iter().any(|&(x, y)| x <= a && b <= y)
    }
}

#[cfg(test)]
mod tests {
    use super::{Cover, DirtyBlock};

    fn spans(d: &DirtyBlock) -> Vec<(u32, usize)> {
        d.pieces().iter().map(|(a, p)| (*a, p.0.len())).collect()
    }

    #[test]
    fn cover_joins_spans_and_answers_containment() {
        let mut c = Cover::default();
        assert!(c.contains(5, 5) && !c.contains(0, 1));
        c.add(10, 20);
        c.add(30, 40);
        assert!(c.contains(10, 20) && c.contains(12, 18));
        assert!(!c.contains(15, 35) && !c.contains(9, 11));
        c.add(20, 30); // touches both: one span
        assert!(c.contains(10, 40) && !c.contains(10, 41));
        c.add(0, 5);
        c.add(3, 12);
        assert!(c.contains(0, 40));
        c.add(7, 7); // empty: nothing
        assert_eq!(c.0, vec![(0, 40)]);
        c.add(50, 60);
        assert_eq!(c.0, vec![(0, 40), (50, 60)]);
        assert!(!c.contains(0, 60));
    }

    #[test]
    fn pieces_merge_and_become_whole() {
        let bs = 32;
        let mut d = DirtyBlock::piece(8, &[1; 4]);
        d.put(0, &[2; 4], bs);
        assert_eq!(spans(&d), vec![(0, 4), (8, 4)]);
        assert!(!d.covers(12));
        assert_eq!(d.mem(), 8);
        d.put(4, &[3; 4], bs); // touches both: one piece
        assert_eq!(spans(&d), vec![(0, 12)]);
        assert!(d.covers(12) && !d.covers(13));
        d.put(20, &[4; 4], bs);
        d.put(14, &[5; 8], bs); // overlaps the last piece: newest bytes win
        assert_eq!(spans(&d), vec![(0, 12), (14, 10)]);
        let mut out = vec![9u8; bs];
        d.overlay(0, &mut out);
        let mut want = vec![9u8; bs];
        want[..4].fill(2);
        want[4..8].fill(3);
        want[8..12].fill(1);
        want[14..22].fill(5);
        want[22..24].fill(4);
        assert_eq!(out, want);
        // A window of the block.
        let mut part = vec![0u8; 6];
        d.overlay(10, &mut part);
        assert_eq!(part, vec![1, 1, 0, 0, 5, 5]);
        d.put(0, &[6; 32], bs);
        assert!(d.whole().is_some());
        assert_eq!(d.mem(), bs);
    }
}
