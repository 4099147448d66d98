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
        let dirty = st.dirty.get(&(ino, blk));
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
            let dirty = st.dirty.get(&(ino, blk));
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
                    d.put(from, src, bs as usize);
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
                    st.dirty.insert((ino, blk), d);
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
            if st.dirty_bytes > self.dirty_max
                && let Err(e) = self.flush_data(&mut st)
            {
                // The write itself took effect; what could not be sealed stays
                // buffered and the next commit retries (and reports) it.
                log::warn!("write-back of buffered data failed, will retry: {e}");
            }
        }
        Ok(data.len() as u32)
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
                if let Some(old) = st.dirty.insert((ino, blk), DirtyBlock::full(b)) {
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
                    if let Some(old) = st.dirty.insert((ino, blk), DirtyBlock::full(b)) {
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
    /// fragments (merged into a whole block once a block has too many).
    pub(super) fn flush_data(&self, st: &mut State) -> Result<()> {
        if st.dirty.is_empty() {
            return Ok(());
        }
        let bs = self.header.block_size as usize;
        // Sizes first, before anything is taken out of the dirty map: an
        // error here must lose nothing.
        let mut sizes: HashMap<u64, u64> = HashMap::new();
        for (ino, _) in st.dirty.keys() {
            if !sizes.contains_key(ino) {
                let size = match self.get_inode(st, *ino) {
                    Ok(i) => i.size,
                    Err(Error::NotFound) => 0, // destroyed: its blocks go
                    Err(e) => return Err(e),
                };
                sizes.insert(*ino, size);
            }
        }
        // Block by block in (inode, block) order, in batches of about
        // FLUSH_BATCH bytes: the merged copies and sealed records of one batch
        // are alive at a time, not those of everything buffered, and a file's
        // blocks are appended in order.
        let mut keys: Vec<(u64, u64)> = st
            .dirty
            .keys()
            .filter(|(ino, blk)| blk * (bs as u64) < sizes.get(ino).copied().unwrap_or(0))
            .copied()
            .collect();
        keys.sort_unstable();
        let mut inode_updates: HashMap<u64, Inode> = HashMap::new();
        let mut failed = None;
        let mut next = 0;
        while next < keys.len() && failed.is_none() {
            // Plan: a whole block, or fragments over the stored one. Merging
            // reads the stored block; an error there keeps this batch and the
            // rest buffered, so nothing is lost.
            let mut jobs: Vec<FlushJob> = Vec::new();
            let mut planned = 0;
            {
                let st_ro: &State = st;
                while next < keys.len() && planned < FLUSH_BATCH {
                    let key = keys[next];
                    next += 1;
                    let Some(d) = st_ro.dirty.get(&key) else {
                        continue;
                    };
                    let size = sizes.get(&key.0).copied().unwrap_or(0);
                    match self.plan_flush(st_ro, key, d, size, bs) {
                        Ok(job) => {
                            planned += bs.min(d.mem().max(1));
                            jobs.push(job);
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
            }
            if failed.is_some() {
                break;
            }
            // Seal in parallel (AEAD is the cost), append in order.
            let threads = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(4);
            let chunk = jobs.len().div_ceil(threads).max(1);
            let io = &self.io;
            let dirty = &st.dirty;
            let sealed: Option<Vec<(blocks::SealedRun, Vec<usize>)>> = std::thread::scope(|s| {
                let hs: Vec<_> = jobs
                    .chunks(chunk)
                    .map(|c| s.spawn(move || FlushJob::seal_all(c, io, dirty, bs)))
                    .collect();
                hs.into_iter().map(|h| h.join().ok()).collect()
            });
            // A sealing thread that panicked (a bug) fails the write-back with
            // everything still buffered, instead of taking the mount down.
            let Some(sealed) = sealed else {
                failed = Some(Error::Invalid(
                    "a sealing thread of the write-back failed; the data stays buffered".into(),
                ));
                break;
            };
            // Each thread's records in one append; on an error nothing of the
            // batch is recorded and all of it stays buffered (what was
            // appended is unreferenced space for the cleaner).
            let mut placed_all = Vec::new();
            let mut counts = Vec::with_capacity(jobs.len());
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
            if failed.is_some() {
                break;
            }
            let mut ptrs = placed_all.into_iter();
            for (job, n) in jobs.into_iter().zip(counts) {
                let (ino, blk) = job.key;
                let placed: Vec<BlockPtr> = ptrs.by_ref().take(n).collect();
                if failed.is_some() {
                    // Keep what could not be recorded (it stays in the dirty map).
                    continue;
                }
                let Some(d) = st.dirty.remove(&job.key) else {
                    continue;
                };
                st.dirty_bytes -= d.mem();
                let recorded = self.record_flush_job(st, &job, d, placed, &mut inode_updates);
                if let Err((e, d)) = recorded {
                    // Put the buffer back so nothing is lost; fragments recorded
                    // before the error are rewritten by the retry, in sequence.
                    if let Some(d) = d {
                        st.dirty_bytes += d.mem();
                        st.dirty.insert((ino, blk), d);
                    }
                    failed = Some(e);
                }
            }
        }
        // Blocks past the end of their file (truncated or destroyed meanwhile).
        let gone: Vec<(u64, u64)> = st
            .dirty
            .keys()
            .filter(|(ino, blk)| blk * bs as u64 >= sizes.get(ino).copied().unwrap_or(0))
            .copied()
            .collect();
        if failed.is_none() {
            for k in gone {
                if let Some(d) = st.dirty.remove(&k) {
                    st.dirty_bytes -= d.mem();
                }
            }
        }
        for (ino, i) in inode_updates {
            self.put_inode(st, ino, &i)?;
        }
        st.changed = true;
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
    ) -> Result<FlushJob> {
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
        Ok(FlushJob {
            key: (ino, blk),
            kind,
        })
    }

    /// Appends a flush job's sealed records and records them in the tree. On
    /// error, returns the buffer (when it was not recorded) with the error.
    fn record_flush_job(
        &self,
        st: &mut State,
        job: &FlushJob,
        d: DirtyBlock,
        placed: Vec<BlockPtr>,
        inode_updates: &mut HashMap<u64, Inode>,
    ) -> std::result::Result<(), (Error, Option<DirtyBlock>)> {
        let (ino, blk) = job.key;
        match &job.kind {
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
                // Cache exactly what was stored (a short copy frees the full buffer).
                let plain = match (&job.kind, d) {
                    (JobKind::Merged { plain, .. }, _) => Plain(plain.0[..*stored].to_vec()),
                    (_, DirtyBlock::Whole(p)) if *stored < p.0.len() => {
                        Plain(p.0[..*stored].to_vec())
                    }
                    (_, DirtyBlock::Whole(p)) => p,
                    (_, DirtyBlock::Pieces(_)) => return Ok(()),
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
    fn seal_all(
        jobs: &[FlushJob],
        io: &BlockIo,
        dirty: &DirtyMap,
        bs: usize,
    ) -> (blocks::SealedRun, Vec<usize>) {
        let plains: Vec<Vec<ToSeal<'_>>> = jobs.iter().map(|j| j.plaintexts(dirty, bs)).collect();
        let flat: Vec<&[u8]> = plains.iter().flatten().map(ToSeal::bytes).collect();
        (
            io.seal_data_run(&flat),
            plains.iter().map(Vec::len).collect(),
        )
    }

    /// What this job seals, in order: one block, or its fragments.
    fn plaintexts<'a>(&'a self, dirty: &'a DirtyMap, bs: usize) -> Vec<ToSeal<'a>> {
        match &self.kind {
            JobKind::Merged { plain, stored } => vec![ToSeal::Borrowed(&plain.0[..*stored])],
            JobKind::Whole { stored } => match dirty.get(&self.key).and_then(DirtyBlock::whole) {
                Some(w) => vec![ToSeal::Borrowed(&w.0[..*stored])],
                None => Vec::new(),
            },
            JobKind::Frags { ranges, .. } => {
                let Some(d) = dirty.get(&self.key) else {
                    return Vec::new();
                };
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
