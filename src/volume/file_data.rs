//! File data: opening and releasing files, reads (holes, short stored
//! blocks, large direct reads), writes (whole blocks sealed outside the
//! volume lock, partial ones buffered), truncate, fallocate, and the
//! write-back of buffered blocks.

use super::fragments::{Cover, DirtyBlock, MAX_FRAGMENTS, SEQ_LIMIT};
use super::*;

/// The write-back plans, seals and records buffered blocks in batches of about
/// this many bytes: a batch's merged copies and sealed records are what it
/// holds beyond the buffered data itself (docs/ARCHITECTURE.md, memory bound).
const FLUSH_BATCH: usize = 4 << 20;

impl Volume {
    // ----- file data ------------------------------------------------------------

    pub fn open_file(&self, ino: u64) -> Result<Attr> {
        let mut st = self.st.write();
        let i = self.get_inode(&st, ino)?;
        *st.open.entry(ino).or_insert(0) += 1;
        Ok(self.attr(ino, i))
    }

    pub fn release(&self, ino: u64) -> Result<()> {
        let mut st = self.st.write();
        let left = match st.open.get_mut(&ino) {
            Some(n) => {
                *n -= 1;
                *n
            }
            None => return Ok(()),
        };
        if left == 0 {
            st.open.remove(&ino);
            if !self.read_only
                && let Ok(i) = self.get_inode(&st, ino)
                && i.nlink == 0
            {
                self.destroy_inode(&mut st, ino)?;
            }
        }
        Ok(())
    }

    pub(super) fn block_key(ino: u64, blk: u64) -> Vec<u8> {
        key(ino, tag::BLOCK, &blk.to_be_bytes())
    }

    pub(super) fn block_ptr(&self, st: &State, ino: u64, blk: u64) -> Result<Option<BlockPtr>> {
        match st.tree.get(self.nodes(), &Self::block_key(ino, blk))? {
            Some(v) => {
                Ok(Some(BlockPtr::from_bytes(&v).map_err(|e| {
                    Error::integrity(format!("inode {ino} block map"), e)
                })?))
            }
            None => Ok(None),
        }
    }

    /// Copies block `blk` (from `from` for `out.len()` bytes) into `out`.
    pub(super) fn read_block_into(
        &self,
        st: &State,
        ino: u64,
        blk: u64,
        from: usize,
        out: &mut [u8],
    ) -> Result<()> {
        let dirty = st.dirty.get(&(ino, blk)).map(|d| &**d);
        if let Some(w) = dirty.and_then(DirtyBlock::whole) {
            copy_stored(&w.0, from, out);
            return Ok(());
        }
        match self.block_ptr(st, ino, blk)? {
            None => out.fill(0),
            Some(p) => {
                let plain = self.io.read_data(&p).map_err(|e| match e {
                    Error::Integrity { what, detail } => Error::Integrity {
                        what: format!("inode {ino} block {blk} ({what})"),
                        detail,
                    },
                    e => e,
                })?;
                copy_stored(&plain.0, from, out);
            }
        }
        for f in self.fragments(st, ino, blk, blk + 1)? {
            self.apply_fragment(ino, &f, from, out, true)?;
        }
        if let Some(d) = dirty {
            d.overlay(from, out);
        }
        Ok(())
    }

    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let mut out = vec![0u8; size as usize];
        let n = self.read_into(ino, offset, &mut out)?;
        out.truncate(n);
        Ok(out)
    }

    /// Reads up to `buf.len()` bytes at `offset` into `buf` and returns how
    /// many there were (fewer at the end of the file). Every returned byte is
    /// written (holes as zeros), so `buf` may hold anything before: the FUSE
    /// layer passes one reused buffer per request thread instead of zeroing a
    /// fresh one per request.
    pub fn read_into(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.note_access();
        let size = buf.len();
        let st = self.st.read();
        let i = self.get_inode(&st, ino)?;
        if i.kind == FileKind::Dir {
            return Err(Error::IsDir);
        }
        if offset >= i.size {
            return Ok(0);
        }
        let end = offset.saturating_add(size as u64).min(i.size);
        let bs = self.header.block_size as u64;
        let len = (end - offset) as usize;
        let out = &mut buf[..len];
        // Pieces: (block, offset in block, length, offset in out).
        let mut pieces = Vec::new();
        let mut pos = offset;
        while pos < end {
            let blk = pos / bs;
            let from = (pos % bs) as usize;
            let n = ((bs - from as u64).min(end - pos)) as usize;
            pieces.push((blk, from, n, (pos - offset) as usize));
            pos += n as u64;
        }
        // Whole dirty blocks and holes directly; stored blocks in one batch,
        // then their fragments, then what partly written dirty blocks hold.
        let mut stored: Vec<(usize, BlockPtr)> = Vec::new();
        let mut partial: Vec<usize> = Vec::new();
        for (k, &(blk, from, n, o)) in pieces.iter().enumerate() {
            let dirty = st.dirty.get(&(ino, blk)).map(|d| &**d);
            if let Some(w) = dirty.and_then(DirtyBlock::whole) {
                copy_stored(&w.0, from, &mut out[o..o + n]);
                continue;
            }
            if dirty.is_some() {
                partial.push(k);
            }
            match self.block_ptr(&st, ino, blk)? {
                Some(p) => stored.push((k, p)),
                // A hole (fragments and dirty pieces are laid over it below).
                None => out[o..o + n].fill(0),
            }
        }
        // Large reads of whole blocks: decrypt straight into the reply, no cache.
        if size >= DIRECT_READ_MIN && !stored.is_empty() {
            let direct: Vec<bool> = stored
                .iter()
                .map(|(k, p)| pieces[*k].1 == 0 && self.io.plain_len(p) == pieces[*k].2)
                .collect();
            let mut items: Vec<(BlockPtr, &mut [u8])> = Vec::new();
            let mut rest: &mut [u8] = &mut *out;
            let mut consumed = 0;
            for ((k, p), d) in stored.iter().zip(&direct) {
                if !*d {
                    continue;
                }
                let (_, _, n, o) = pieces[*k];
                let tail = std::mem::take(&mut rest);
                let (_, tail) = tail.split_at_mut(o - consumed);
                let (mine, tail) = tail.split_at_mut(n);
                items.push((*p, mine));
                rest = tail;
                consumed = o + n;
            }
            self.io.read_data_direct(&mut items).map_err(|e| match e {
                Error::Integrity { what, detail } => Error::Integrity {
                    what: format!("inode {ino} ({what})"),
                    detail,
                },
                e => e,
            })?;
            drop(items);
            let mut d = direct.into_iter();
            stored.retain(|_| !d.next().unwrap_or(false));
        }
        if !stored.is_empty() {
            let ptrs: Vec<BlockPtr> = stored.iter().map(|s| s.1).collect();
            let got = self.io.read_data_many(&ptrs);
            for ((k, _), r) in stored.iter().zip(got) {
                let (blk, from, n, o) = pieces[*k];
                let plain = r.map_err(|e| match e {
                    Error::Integrity { what, detail } => Error::Integrity {
                        what: format!("inode {ino} block {blk} ({what})"),
                        detail,
                    },
                    e => e,
                })?;
                copy_stored(&plain.0, from, &mut out[o..o + n]);
            }
        }
        if let (Some(first), Some(last)) = (pieces.first(), pieces.last()) {
            let frags = self.fragments(&st, ino, first.0, last.0 + 1)?;
            if !frags.is_empty() && !self.read_only {
                let mut s = self.frag_blocks.lock();
                s.extend(frags.iter().map(|f| (ino, f.blk)));
            }
            for f in &frags {
                // Pieces are in block order, one per block.
                let Some(&(blk, from, n, o)) = pieces.get((f.blk - first.0) as usize) else {
                    continue;
                };
                let whole_dirty = st
                    .dirty
                    .get(&(ino, blk))
                    .is_some_and(|d| d.whole().is_some());
                if blk == f.blk && !whole_dirty {
                    self.apply_fragment(ino, f, from, &mut out[o..o + n], true)?;
                }
            }
        }
        for k in partial {
            let (blk, from, n, o) = pieces[k];
            if let Some(d) = st.dirty.get(&(ino, blk)) {
                d.overlay(from, &mut out[o..o + n]);
            }
        }
        Ok(len)
    }

    /// Current plaintext of a block as a full-size buffer (for read-modify-write).
    pub(super) fn load_block_full(&self, st: &State, ino: u64, blk: u64) -> Result<Vec<u8>> {
        let mut b = vec![0u8; self.header.block_size as usize];
        self.read_block_into(st, ino, blk, 0, &mut b)?;
        Ok(b)
    }

    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let (n, buffered) = self.write_buffered(ino, offset, data)?;
        // Past the dirty limit the writer pays for a write-back, sealing
        // without the volume lock (other requests go on meanwhile), or waits
        // for the one under way: that bounds what is buffered.
        if buffered > self.dirty_max
            && let Err(e) = self.write_back()
        {
            // The write itself took effect; what could not be sealed stays
            // buffered and the next commit retries (and reports) it.
            log::warn!("write-back of buffered data failed, will retry: {e}");
        }
        Ok(n)
    }

    /// The write; returns its length and the bytes buffered after it.
    fn write_buffered(&self, ino: u64, offset: u64, data: &[u8]) -> Result<(u32, usize)> {
        self.writable()?;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(Error::FileTooBig)?;
        if end > MAX_FILE_SIZE {
            return Err(Error::FileTooBig);
        }
        let bs = self.header.block_size as u64;
        let not_file = |k: FileKind| {
            if k == FileKind::Dir {
                Error::IsDir
            } else {
                Error::Invalid("not a regular file".into())
            }
        };
        // Whole blocks are sealed and appended right away, outside the volume
        // lock, so several writers seal in parallel and streaming data is
        // copied once (no dirty buffer). Partial blocks go through the dirty map.
        let (full_from, full_to) = (offset.div_ceil(bs), end / bs);
        let _gate = self.append_gate.read();
        let mut direct: Vec<(u64, BlockPtr)> = Vec::new();
        if full_to > full_from {
            {
                let st = self.st.read();
                self.check_space(st.dirty_bytes as u64 + data.len() as u64)?;
                let i = self.get_inode(&st, ino)?;
                if i.kind != FileKind::File {
                    return Err(not_file(i.kind));
                }
            }
            let chunks: Vec<&[u8]> = (full_from..full_to)
                .map(|blk| {
                    let at = (blk * bs - offset) as usize;
                    &data[at..at + bs as usize]
                })
                .collect();
            let run = self.io.seal_data_run(&chunks);
            let appended = self.io.append_run(&run);
            self.io.recycle(run);
            let ptrs = appended?;
            direct.extend((full_from..full_to).zip(ptrs));
            let hook = self.write_hook.lock().clone();
            if let Some(h) = hook {
                h();
            }
        }
        {
            let mut st = self.st.write();
            if direct.is_empty() {
                self.check_space(st.dirty_bytes as u64 + data.len() as u64)?;
            }
            let mut i = self.get_inode(&st, ino)?;
            if i.kind != FileKind::File {
                return Err(not_file(i.kind));
            }
            for (blk, ptr) in &direct {
                let old = st.tree.insert(
                    self.nodes(),
                    &Self::block_key(ino, *blk),
                    ptr.to_bytes().to_vec(),
                )?;
                if old.is_none() {
                    i.blocks += 1;
                }
                // This whole-block write supersedes any older buffered data.
                if let Some(p) = st.dirty.remove(&(ino, *blk)) {
                    st.dirty_bytes -= p.mem();
                }
            }
            if !direct.is_empty() {
                self.drop_fragments(&mut st, ino, full_from, full_to)?;
            }
            let mut pos = offset;
            while pos < end {
                let blk = pos / bs;
                let from = (pos % bs) as usize;
                let n = ((bs - from as u64).min(end - pos)) as usize;
                if !direct.is_empty() && (full_from..full_to).contains(&blk) {
                    pos += n as u64;
                    continue;
                }
                let src = &data[(pos - offset) as usize..(pos - offset) as usize + n];
                if let Some(d) = st.dirty.get_mut(&(ino, blk)) {
                    let before = d.mem();
                    // A buffer a write-back is sealing right now is copied
                    // first: that write-back then leaves this block buffered.
                    Arc::make_mut(d).put(from, src, bs as usize);
                    let after = d.mem();
                    st.dirty_bytes = st.dirty_bytes + after - before;
                } else {
                    let d = if n == bs as usize {
                        // A whole block: no need to read or zero what is replaced.
                        DirtyBlock::full(src.to_vec())
                    } else {
                        let stored = self.block_ptr(&st, ino, blk)?.is_some();
                        if !stored || self.fragments_on() {
                            // A hole (a new small file): the rest is zeros. A small
                            // overwrite of a stored block: keep only what was
                            // written (no decryption now; see fragments.rs).
                            // Either way no block-sized buffer to zero and wipe.
                            DirtyBlock::piece(from, src)
                        } else {
                            let mut b = self.load_block_full(&st, ino, blk)?;
                            b[from..from + n].copy_from_slice(src);
                            DirtyBlock::full(b)
                        }
                    };
                    st.dirty_bytes += d.mem();
                    st.dirty.insert((ino, blk), Arc::new(d));
                }
                pos += n as u64;
            }
            if end > i.size {
                i.size = end;
            }
            let t = now();
            i.mtime = t;
            i.ctime = t;
            self.put_inode(&mut st, ino, &i)?;
            Ok((data.len() as u32, st.dirty_bytes))
        }
    }

    pub(super) fn truncate_locked(
        &self,
        st: &mut State,
        ino: u64,
        i: &mut Inode,
        size: u64,
    ) -> Result<()> {
        if size > MAX_FILE_SIZE {
            return Err(Error::FileTooBig);
        }
        let bs = self.header.block_size as u64;
        if size < i.size {
            let first_gone = size.div_ceil(bs);
            self.drop_blocks(st, ino, i, first_gone, u64::MAX)?;
            let blk = size / bs;
            let stored =
                st.dirty.contains_key(&(ino, blk)) || self.block_ptr(st, ino, blk)?.is_some();
            // A hole stays a hole: there is nothing to zero in it.
            if !size.is_multiple_of(bs) && stored {
                let mut b = self.load_block_full(st, ino, blk)?;
                b[(size % bs) as usize..].fill(0);
                if let Some(old) = st.dirty.insert((ino, blk), Arc::new(DirtyBlock::full(b))) {
                    st.dirty_bytes -= old.mem();
                }
                st.dirty_bytes += bs as usize;
            }
        }
        i.size = size;
        Ok(())
    }

    /// Removes blocks [from, to) from the block map and the dirty map.
    pub(super) fn drop_blocks(
        &self,
        st: &mut State,
        ino: u64,
        i: &mut Inode,
        from: u64,
        to: u64,
    ) -> Result<()> {
        let end = if to == u64::MAX {
            key(ino, tag::BLOCK + 1, &[])
        } else {
            Self::block_key(ino, to)
        };
        self.freed_since_clean.store(true, Ordering::Relaxed);
        let removed = self.remove_key_range(st, &Self::block_key(ino, from), &end)?;
        i.blocks = i.blocks.saturating_sub(removed);
        self.drop_fragments(st, ino, from, to)?;
        let dk: Vec<(u64, u64)> = st
            .dirty
            .range((ino, from)..(ino, to))
            .map(|(k, _)| *k)
            .collect();
        for k in dk {
            if let Some(p) = st.dirty.remove(&k) {
                st.dirty_bytes -= p.mem();
            }
        }
        st.changed = true;
        Ok(())
    }

    /// fallocate: mode 0 and KEEP_SIZE reserve (sizes only: a log-structured
    /// store allocates at write time); PUNCH_HOLE and ZERO_RANGE make holes.
    pub fn fallocate(&self, ino: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        self.writable()?;
        let end = offset.checked_add(len).ok_or(Error::FileTooBig)?;
        if end > MAX_FILE_SIZE {
            return Err(Error::FileTooBig);
        }
        let keep = mode & crate::sys::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & crate::sys::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & crate::sys::FALLOC_FL_ZERO_RANGE != 0;
        if mode
            & !(crate::sys::FALLOC_FL_KEEP_SIZE
                | crate::sys::FALLOC_FL_PUNCH_HOLE
                | crate::sys::FALLOC_FL_ZERO_RANGE)
            != 0
        {
            return Err(Error::NotSupported("this fallocate mode".into()));
        }
        if punch && !keep {
            return Err(Error::Invalid("PUNCH_HOLE needs KEEP_SIZE".into()));
        }
        let mut st = self.st.write();
        let mut i = self.get_inode(&st, ino)?;
        if i.kind != FileKind::File {
            return Err(Error::Invalid("not a regular file".into()));
        }
        if punch || zero {
            let bs = self.header.block_size as u64;
            let zend = end.min(i.size.max(if zero && !keep { end } else { 0 }));
            let first_full = offset.div_ceil(bs);
            let last_full = zend / bs;
            if first_full < last_full {
                self.drop_blocks(&mut st, ino, &mut i, first_full, last_full)?;
            }
            // Partial blocks at the edges: zero the bytes in place.
            let mut pos = offset;
            while pos < zend {
                let blk = pos / bs;
                let from = (pos % bs) as usize;
                let n = ((bs - from as u64).min(zend - pos)) as usize;
                let stored =
                    st.dirty.contains_key(&(ino, blk)) || self.block_ptr(&st, ino, blk)?.is_some();
                if n as u64 != bs && pos < i.size && stored {
                    let mut b = self.load_block_full(&st, ino, blk)?;
                    b[from..from + n].fill(0);
                    if let Some(old) = st.dirty.insert((ino, blk), Arc::new(DirtyBlock::full(b))) {
                        st.dirty_bytes -= old.mem();
                    }
                    st.dirty_bytes += bs as usize;
                }
                pos += n as u64;
            }
        }
        if !keep && end > i.size {
            i.size = end;
        }
        i.ctime = now();
        if punch || zero {
            i.mtime = i.ctime;
        }
        self.put_inode(&mut st, ino, &i)?;
        Ok(())
    }

    /// Fails with ENOSPC when writing `bytes` of file data would eat into the reserve.
    pub(super) fn check_space(&self, bytes: u64) -> Result<()> {
        let (total, free) = self
            .io
            .storage
            .space()
            .map_err(|e| Error::io("backing store", e))?;
        if free < bytes + reserve_bytes(self.header.segment_size, total) {
            self.space_pressure.store(true, Ordering::Relaxed);
            return Err(Error::NoSpace(format!(
                "{} has {} bytes free",
                self.io.storage.describe(),
                free
            )));
        }
        Ok(())
    }

    /// Seals all dirty blocks and records them in the block map (not a commit):
    /// whole blocks as block records, small overwrites of stored blocks as
    /// fragments (merged into a whole block once a block has too many). Holds
    /// the volume lock throughout (commits); [`Volume::write_back`] does the
    /// same with the sealing outside it.
    pub(super) fn flush_data(&self, st: &mut State) -> Result<()> {
        let mut after = None;
        loop {
            let batch = self.plan_batch(st, after, (u64::MAX, u64::MAX), false)?;
            let Some(last) = batch.last_key else {
                break;
            };
            after = Some(last);
            let placed = self.seal_batch(&batch.jobs)?;
            self.record_batch(st, batch, placed)?;
        }
        Ok(())
    }

    /// The write-back without holding the volume lock while sealing: one pass
    /// over the blocks buffered now, in (inode, block) order and batches of
    /// about [`FLUSH_BATCH`] bytes, each planned under the lock, sealed and
    /// appended without it (reads and writes go on meanwhile) and recorded
    /// under it. A block written again, truncated or flushed by a commit in
    /// the meantime no longer holds the buffer its batch sealed: that record
    /// is dropped (unreferenced space for the cleaner) and the block stays
    /// buffered. One write-back at a time; a commit waits for it.
    ///
    /// # Errors
    /// A damaged tree, a failing append or a full store: what was not
    /// recorded stays buffered, as with a commit.
    pub fn write_back(&self) -> Result<()> {
        self.write_back_pass(false)
    }

    /// [`Volume::write_back`] of new data only: blocks buffered whole, and
    /// new blocks written up to the end of their file (new files, appends).
    /// Small overwrites of stored blocks stay buffered: waiting lets more of
    /// a block's pages gather into one fragment or merge, and lets later
    /// writes replace them. The mount's committer runs this once a quarter
    /// of the dirty limit is buffered ([`Volume::write_back_due`]), so new
    /// data is sealed beside the writes that follow it, not left for the
    /// writer that reaches the limit or for the unmount.
    ///
    /// # Errors
    /// As [`Volume::write_back`].
    pub fn write_back_new_data(&self) -> Result<()> {
        self.write_back_pass(true)
    }

    fn write_back_pass(&self, new_only: bool) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.healthy()?;
        let _one = self.flush_lock.lock();
        // Records appended and not yet in the tree must not look dead to the
        // cleaner (it takes the gate exclusively; order: gate, then volume lock).
        let _gate = self.append_gate.read();
        // What is buffered now: blocks buffered later wait for the next pass,
        // so a steady stream of writes cannot keep this one going.
        let Some(upto) = self.st.read().dirty.keys().next_back().copied() else {
            return Ok(());
        };
        let mut after = None;
        loop {
            let batch = self.plan_batch(&self.st.read(), after, upto, new_only)?;
            let Some(last) = batch.last_key else {
                return Ok(());
            };
            after = Some(last);
            if batch.jobs.is_empty() && batch.gone.is_empty() {
                continue;
            }
            let placed = self.seal_batch(&batch.jobs)?;
            let hook = self.write_back_hook.lock().clone();
            if let Some(h) = hook {
                h();
            }
            let mut st = self.st.write();
            self.record_batch(&mut st, batch, placed)?;
        }
    }

    /// Bytes of file data buffered and not yet sealed.
    pub fn dirty_bytes(&self) -> usize {
        self.st.read().dirty_bytes
    }

    /// Whether enough is buffered for a background write-back of new data
    /// ([`Volume::write_back_new_data`]): a quarter of the dirty limit.
    pub fn write_back_due(&self) -> bool {
        self.dirty_bytes() >= self.dirty_max / 4
    }

    /// Plans the next batch of the write-back: the buffered blocks after
    /// `after` up to `upto`, about [`FLUSH_BATCH`] bytes of them (with
    /// `new_only`, only whole blocks and those written up to the end of their
    /// file). Blocks past the end of their file (truncated or destroyed
    /// meanwhile) are listed to be dropped.
    fn plan_batch(
        &self,
        st: &State,
        after: Option<(u64, u64)>,
        upto: (u64, u64),
        new_only: bool,
    ) -> Result<FlushBatch> {
        use std::ops::Bound;
        let bs = self.header.block_size as usize;
        let from = match after {
            Some(k) => Bound::Excluded(k),
            None => Bound::Unbounded,
        };
        let mut batch = FlushBatch {
            jobs: Vec::new(),
            gone: Vec::new(),
            last_key: None,
        };
        let mut size: Option<(u64, u64)> = None;
        let mut planned = 0;
        for (&key, d) in st.dirty.range((from, Bound::Included(upto))) {
            if planned >= FLUSH_BATCH {
                break;
            }
            batch.last_key = Some(key);
            let (ino, blk) = key;
            let file_size = match size {
                Some((i, s)) if i == ino => s,
                _ => {
                    let s = self.size_or_gone(st, ino)?;
                    size = Some((ino, s));
                    s
                }
            };
            if blk.saturating_mul(bs as u64) >= file_size {
                batch.gone.push((key, d.clone()));
                continue;
            }
            if new_only && d.whole().is_none() {
                let len = (file_size - blk * bs as u64).min(bs as u64) as usize;
                if !d.covers(len) {
                    continue;
                }
            }
            // Merging reads the stored block; an error there keeps this batch
            // and the rest buffered, so nothing is lost.
            let kind = self.plan_flush(st, key, d, file_size, bs)?;
            planned += bs.min(d.mem().max(1));
            batch.jobs.push(FlushJob {
                key,
                kind,
                src: d.clone(),
            });
        }
        Ok(batch)
    }

    /// A file's size for the write-back; 0 for a destroyed inode, whose
    /// buffered blocks are then dropped.
    fn size_or_gone(&self, st: &State, ino: u64) -> Result<u64> {
        match self.get_inode(st, ino) {
            Ok(i) => Ok(i.size),
            Err(Error::NotFound) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Seals a batch's records in parallel (AEAD is the cost) and appends
    /// each sealing thread's records with one write, in order; returns each
    /// job's records. Needs no volume lock: the jobs own what they seal. On
    /// an error nothing is recorded (what was appended is unreferenced space
    /// for the cleaner).
    fn seal_batch(&self, jobs: &[FlushJob]) -> Result<Vec<Vec<BlockPtr>>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let bs = self.header.block_size as usize;
        let chunk = jobs.len().div_ceil(sealing_threads()).max(1);
        let io = &self.io;
        let sealed: Option<Vec<(blocks::SealedRun, Vec<usize>)>> = std::thread::scope(|s| {
            let hs: Vec<_> = jobs
                .chunks(chunk)
                .map(|c| s.spawn(move || FlushJob::seal_all(c, io, bs)))
                .collect();
            hs.into_iter().map(|h| h.join().ok()).collect()
        });
        // A sealing thread that panicked (a bug) fails the write-back with
        // everything still buffered, instead of taking the mount down.
        let Some(sealed) = sealed else {
            return Err(Error::Invalid(
                "a sealing thread of the write-back failed; the data stays buffered".into(),
            ));
        };
        let mut placed_all = Vec::new();
        let mut counts = Vec::with_capacity(jobs.len());
        let mut failed = None;
        for (run, c) in sealed {
            if failed.is_none() {
                match self.io.append_run(&run) {
                    Ok(p) => placed_all.extend(p),
                    Err(e) => failed = Some(e),
                }
            }
            self.io.recycle(run);
            counts.extend(c);
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let mut ptrs = placed_all.into_iter();
        Ok(counts
            .into_iter()
            .map(|n| ptrs.by_ref().take(n).collect())
            .collect())
    }

    /// Records a sealed batch in the tree: each job whose block still holds
    /// the very buffer it sealed (nothing wrote, truncated or flushed it
    /// since); the others stay buffered and their records unreferenced.
    fn record_batch(
        &self,
        st: &mut State,
        batch: FlushBatch,
        placed: Vec<Vec<BlockPtr>>,
    ) -> Result<()> {
        let bs = self.header.block_size as u64;
        st.changed = true;
        let mut inode_updates: HashMap<u64, Inode> = HashMap::new();
        let mut failed = None;
        for (job, placed) in batch.jobs.into_iter().zip(placed) {
            let unchanged = st
                .dirty
                .get(&job.key)
                .is_some_and(|d| Arc::ptr_eq(d, &job.src));
            if !unchanged {
                continue;
            }
            let Some(d) = st.dirty.remove(&job.key) else {
                continue;
            };
            st.dirty_bytes -= d.mem();
            let key = job.key;
            if let Err((e, d)) = self.record_flush_job(st, job, d, placed, &mut inode_updates) {
                // Put the buffer back so nothing is lost; fragments recorded
                // before the error are rewritten by the retry, in sequence.
                if let Some(d) = d {
                    st.dirty_bytes += d.mem();
                    st.dirty.insert(key, d);
                }
                failed = Some(e);
                break;
            }
        }
        if failed.is_none() {
            for (key, d) in batch.gone {
                let (ino, blk) = key;
                let still = st.dirty.get(&key).is_some_and(|now| Arc::ptr_eq(now, &d));
                if still
                    && blk.saturating_mul(bs) >= self.size_or_gone(st, ino)?
                    && let Some(d) = st.dirty.remove(&key)
                {
                    st.dirty_bytes -= d.mem();
                }
            }
        }
        for (ino, i) in inode_updates {
            self.put_inode(st, ino, &i)?;
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// How one dirty block is written back: a whole block, a merge with the
    /// stored block, or fragments over it.
    fn plan_flush(
        &self,
        st: &State,
        (ino, blk): (u64, u64),
        d: &DirtyBlock,
        size: u64,
        bs: usize,
    ) -> Result<JobKind> {
        let start = blk * bs as u64;
        let len = (size.saturating_sub(start)).min(bs as u64) as usize;
        let stored = format::round_up(len, format::PAD_QUANTUM).min(bs);
        let kind = if d.whole().is_some() {
            JobKind::Whole { stored }
        } else if d.covers(len) {
            // Written up to the end of the file: nothing to merge, and
            // only the stored length to fill.
            let mut b = vec![0u8; stored];
            d.overlay(0, &mut b);
            JobKind::Merged {
                plain: Plain(b),
                stored,
            }
        } else {
            let frags = self.fragments(st, ino, blk, blk + 1)?;
            let based = self.block_ptr(st, ino, blk)?.is_some();
            let ranges: Vec<(u32, u32)> = d
                .pieces()
                .iter()
                .map(|(a, p)| (*a, (*a as usize + p.0.len()).min(len) as u32))
                .filter(|(a, b)| a < b)
                .collect();
            // A fragment that newer ones (and the new bytes) cover entirely
            // is dead: dropped, not counted, not read by a merge. Page-sized
            // overwrites then keep at most one fragment per page, and a burst
            // of them seldom pays for a merge (the idle merge folds the block
            // once the mount is quiet).
            let mut cover = Cover::default();
            for &(a, b) in &ranges {
                cover.add(a, b);
            }
            let (mut live, mut dead) = (Vec::new(), Vec::new());
            for f in frags.iter().rev() {
                let (a, b) = (f.v.offset, f.v.offset.saturating_add(f.v.len));
                if cover.contains(a, b) {
                    dead.push(f.seq);
                } else {
                    live.push(f);
                }
                cover.add(a, b);
            }
            live.reverse();
            let have: usize = live.iter().map(|f| f.v.len as usize).sum();
            let seq = frags.last().map(|f| f.seq.saturating_add(1)).unwrap_or(0);
            if based
                && live.len() + ranges.len() <= MAX_FRAGMENTS
                && have + d.mem() <= bs
                && seq < SEQ_LIMIT
            {
                JobKind::Frags { ranges, seq, dead }
            } else {
                // The stored block is read only where something shows through.
                let base = !cover.contains(0, len as u32);
                let mut b = self.merge_base(st, ino, blk, base, &live)?;
                d.overlay(0, &mut b);
                JobKind::Merged {
                    plain: Plain(b),
                    stored,
                }
            }
        };
        Ok(kind)
    }

    /// Appends a flush job's sealed records and records them in the tree. On
    /// error, returns the buffer (when it was not recorded) with the error.
    fn record_flush_job(
        &self,
        st: &mut State,
        job: FlushJob,
        d: Arc<DirtyBlock>,
        placed: Vec<BlockPtr>,
        inode_updates: &mut HashMap<u64, Inode>,
    ) -> std::result::Result<(), (Error, Option<Arc<DirtyBlock>>)> {
        let (ino, blk) = job.key;
        let FlushJob { kind, src, .. } = job;
        // The job's own reference: `d` is then the buffer's last one, and a
        // whole block's plaintext moves into the cache without a copy.
        drop(src);
        match &kind {
            JobKind::Whole { stored } | JobKind::Merged { stored, .. } => {
                let Some(&ptr) = placed.first() else {
                    return Err((Error::Invalid("nothing sealed".into()), Some(d)));
                };
                let recorded = (|| -> Result<()> {
                    let old = st.tree.insert(
                        self.nodes(),
                        &Self::block_key(ino, blk),
                        ptr.to_bytes().to_vec(),
                    )?;
                    if old.is_none() {
                        if let std::collections::hash_map::Entry::Vacant(e) =
                            inode_updates.entry(ino)
                        {
                            e.insert(self.get_inode(st, ino)?);
                        }
                        if let Some(i) = inode_updates.get_mut(&ino) {
                            i.blocks += 1;
                        }
                    }
                    // The new block holds everything its fragments held.
                    self.drop_fragments(st, ino, blk, blk + 1)?;
                    Ok(())
                })();
                if let Err(e) = recorded {
                    return Err((e, Some(d)));
                }
                // Cache exactly what was stored (a short copy frees the full
                // buffer). `d` is the buffer's last reference (the job's is
                // dropped above); were it shared, the cache just goes without.
                let plain = match (&kind, Arc::try_unwrap(d)) {
                    (JobKind::Merged { plain, .. }, _) => Plain(plain.0[..*stored].to_vec()),
                    (_, Ok(DirtyBlock::Whole(p))) if *stored < p.0.len() => {
                        Plain(p.0[..*stored].to_vec())
                    }
                    (_, Ok(DirtyBlock::Whole(p))) => p,
                    (_, Ok(DirtyBlock::Pieces(_)) | Err(_)) => return Ok(()),
                };
                self.io.data_cache.insert(ptr.id_u128(), Arc::new(plain));
                Ok(())
            }
            JobKind::Frags { ranges, seq, dead } => {
                if placed.len() != ranges.len() {
                    return Err((Error::Invalid("fragments not all sealed".into()), Some(d)));
                }
                for (k, ((a, b), ptr)) in ranges.iter().zip(placed).enumerate() {
                    let v = FragValue {
                        ptr,
                        offset: *a,
                        len: b - a,
                    };
                    let recorded = st.tree.insert(
                        self.nodes(),
                        &Self::frag_key(ino, blk, seq.saturating_add(k as u32)),
                        v.to_bytes(),
                    );
                    match recorded {
                        // Not cached: a fragment is read back only by a read
                        // of its block before the next merge.
                        Ok(_) => self.note_fragmented(ino, blk),
                        Err(e) => return Err((e, Some(d))),
                    }
                }
                // Only after the new fragments are in: a read between sees
                // the new bytes either way (higher sequence numbers win).
                if !dead.is_empty() {
                    self.freed_since_clean.store(true, Ordering::Relaxed);
                }
                for &q in dead {
                    if let Err(e) = st.tree.remove(self.nodes(), &Self::frag_key(ino, blk, q)) {
                        return Err((e, Some(d)));
                    }
                }
                Ok(())
            }
        }
    }
}

/// One dirty block's write-back, planned under the lock, sealed outside it.
struct FlushJob {
    key: (u64, u64),
    kind: JobKind,
    /// The buffer planned from: sealed without the volume lock, and recorded
    /// only if the block still holds this very buffer.
    src: Arc<DirtyBlock>,
}

/// One batch of the write-back: its jobs, the buffered blocks found past the
/// end of their file, and the last block looked at (where the next starts).
struct FlushBatch {
    jobs: Vec<FlushJob>,
    gone: Vec<((u64, u64), Arc<DirtyBlock>)>,
    last_key: Option<(u64, u64)>,
}

/// Threads that seal a write-back batch: the CPUs this process may use (read
/// once: finding out reads cgroup files), at most 4.
fn sealing_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4)
    })
}

enum JobKind {
    /// The dirty buffer is the whole block: seal its first `stored` bytes.
    Whole { stored: usize },
    /// Stored block, fragments and buffered writes merged into `plain`.
    Merged { plain: Plain, stored: usize },
    /// Seal these ranges of the dirty buffer as fragments `seq`, `seq + 1`,
    /// ..., and remove fragments `dead`, which they cover entirely.
    Frags {
        ranges: Vec<(u32, u32)>,
        seq: u32,
        dead: Vec<u32>,
    },
}

/// A plaintext to seal: borrowed from a buffer, or a padded copy (wiped on drop).
enum ToSeal<'a> {
    Borrowed(&'a [u8]),
    Padded(Plain),
}

impl ToSeal<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            ToSeal::Borrowed(b) => b,
            ToSeal::Padded(p) => &p.0,
        }
    }
}

impl FlushJob {
    /// Seals the records of several jobs, in order, back to back into one
    /// pooled buffer (see [`BlockIo::seal_data_run`]: one draw from the OS RNG
    /// for all their ids and one for all their nonces, no zeroed buffer per
    /// record); returns it with the number of records of each job.
    fn seal_all(jobs: &[FlushJob], io: &BlockIo, bs: usize) -> (blocks::SealedRun, Vec<usize>) {
        let plains: Vec<Vec<ToSeal<'_>>> = jobs.iter().map(|j| j.plaintexts(bs)).collect();
        let flat: Vec<&[u8]> = plains.iter().flatten().map(ToSeal::bytes).collect();
        (
            io.seal_data_run(&flat),
            plains.iter().map(Vec::len).collect(),
        )
    }

    /// What this job seals, in order: one block, or its fragments.
    fn plaintexts(&self, bs: usize) -> Vec<ToSeal<'_>> {
        match &self.kind {
            JobKind::Merged { plain, stored } => vec![ToSeal::Borrowed(&plain.0[..*stored])],
            JobKind::Whole { stored } => match self.src.whole() {
                Some(w) => vec![ToSeal::Borrowed(&w.0[..*stored])],
                None => Vec::new(),
            },
            JobKind::Frags { ranges, .. } => {
                let d = &self.src;
                // Ranges are the pieces, in order, clipped to the file's end.
                ranges
                    .iter()
                    .zip(d.pieces())
                    .map(|(&(a, b), (_, piece))| {
                        let len = (b - a) as usize;
                        let padded = format::round_up(len, format::PAD_QUANTUM).min(bs);
                        if padded == len {
                            return ToSeal::Borrowed(&piece.0[..len]);
                        }
                        let mut p = Plain(vec![0u8; padded]);
                        p.0[..len].copy_from_slice(&piece.0[..len]);
                        ToSeal::Padded(p)
                    })
                    .collect()
            }
        }
    }
}
