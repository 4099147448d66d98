//! File data: opening and releasing files, reads (holes, short stored
//! blocks, large direct reads), writes (whole blocks sealed outside the
//! volume lock, partial ones buffered), truncate, fallocate, and the
//! write-back of buffered blocks.

use super::*;

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
        if let Some(p) = st.dirty.get(&(ino, blk)) {
            copy_stored(&p.0, from, out);
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
        Ok(())
    }

    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let st = self.st.read();
        let i = self.get_inode(&st, ino)?;
        if i.kind == FileKind::Dir {
            return Err(Error::IsDir);
        }
        if offset >= i.size {
            return Ok(Vec::new());
        }
        let end = (offset + size as u64).min(i.size);
        let bs = self.header.block_size as u64;
        let mut out = vec![0u8; (end - offset) as usize];
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
        // Dirty blocks and holes directly; stored blocks in one batch.
        let mut stored: Vec<(usize, BlockPtr)> = Vec::new();
        for (k, &(blk, from, n, o)) in pieces.iter().enumerate() {
            if let Some(p) = st.dirty.get(&(ino, blk)) {
                copy_stored(&p.0, from, &mut out[o..o + n]);
            } else if let Some(p) = self.block_ptr(&st, ino, blk)? {
                stored.push((k, p));
            }
        }
        // Large reads of whole blocks: decrypt straight into the reply, no cache.
        if size as usize >= DIRECT_READ_MIN && !stored.is_empty() {
            let direct: Vec<bool> = stored
                .iter()
                .map(|(k, p)| pieces[*k].1 == 0 && self.io.plain_len(p) == pieces[*k].2)
                .collect();
            let mut items: Vec<(BlockPtr, &mut [u8])> = Vec::new();
            let mut rest: &mut [u8] = &mut out;
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
        Ok(out)
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
            for blk in full_from..full_to {
                let at = (blk * bs - offset) as usize;
                let (rec, id, tag) = self.io.seal(BlockKind::Data, &data[at..at + bs as usize]);
                direct.push((blk, self.io.append(&rec, id, tag)?));
            }
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
                    st.dirty_bytes -= p.0.len();
                }
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
                if let Some(p) = st.dirty.get_mut(&(ino, blk)) {
                    p.0[from..from + n].copy_from_slice(src);
                } else {
                    let buf = if n == bs as usize {
                        // A whole block: no need to read or zero what is replaced.
                        src.to_vec()
                    } else {
                        let mut b = self.load_block_full(&st, ino, blk)?;
                        b[from..from + n].copy_from_slice(src);
                        b
                    };
                    st.dirty.insert((ino, blk), Plain(buf));
                    st.dirty_bytes += bs as usize;
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
                if st.dirty.insert((ino, blk), Plain(b)).is_none() {
                    st.dirty_bytes += bs as usize;
                }
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
        let dk: Vec<(u64, u64)> = st
            .dirty
            .range((ino, from)..(ino, to))
            .map(|(k, _)| *k)
            .collect();
        for k in dk {
            if let Some(p) = st.dirty.remove(&k) {
                st.dirty_bytes -= p.0.len();
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
                    if st.dirty.insert((ino, blk), Plain(b)).is_none() {
                        st.dirty_bytes += bs as usize;
                    }
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

    /// Seals all dirty blocks and records them in the block map (not a commit).
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
        let dirty = std::mem::take(&mut st.dirty);
        st.dirty_bytes = 0;
        // Group by inode so each inode's size is read once.
        let mut jobs: Vec<((u64, u64), Plain, usize)> = Vec::with_capacity(dirty.len());
        for ((ino, blk), p) in dirty {
            let size = sizes[&ino];
            let start = blk * bs as u64;
            if start >= size {
                continue;
            }
            let len = (size - start).min(bs as u64) as usize;
            let stored = format::round_up(len, format::PAD_QUANTUM).min(bs);
            jobs.push(((ino, blk), p, stored));
        }
        // Seal in parallel (AEAD is the cost), append in order.
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4);
        let chunk = jobs.len().div_ceil(threads).max(1);
        let io = &self.io;
        let sealed: Vec<Vec<blocks::Sealed>> = std::thread::scope(|s| {
            let hs: Vec<_> = jobs
                .chunks(chunk)
                .map(|c| {
                    s.spawn(move || {
                        c.iter()
                            .map(|(_, p, stored)| io.seal(BlockKind::Data, &p.0[..*stored]))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("sealing thread"))
                .collect()
        });
        let mut inode_updates: HashMap<u64, Inode> = HashMap::new();
        let mut failed = None;
        for (((ino, blk), p, stored), (rec, id, tag)) in
            jobs.into_iter().zip(sealed.into_iter().flatten())
        {
            if failed.is_some() {
                // Keep what could not be written, so nothing is lost.
                st.dirty_bytes += p.0.len();
                st.dirty.insert((ino, blk), p);
                continue;
            }
            let recorded = self.io.append(&rec, id, tag).and_then(|ptr| {
                let old = st.tree.insert(
                    self.nodes(),
                    &Self::block_key(ino, blk),
                    ptr.to_bytes().to_vec(),
                )?;
                if old.is_none() {
                    if let std::collections::hash_map::Entry::Vacant(e) = inode_updates.entry(ino) {
                        e.insert(self.get_inode(st, ino)?);
                    }
                    if let Some(i) = inode_updates.get_mut(&ino) {
                        i.blocks += 1;
                    }
                }
                Ok(ptr)
            });
            match recorded {
                Ok(ptr) => {
                    // Cache exactly what was stored (a short copy frees the full buffer).
                    let plain = if stored < p.0.len() {
                        Plain(p.0[..stored].to_vec())
                    } else {
                        p
                    };
                    self.io.data_cache.insert(ptr.id_u128(), Arc::new(plain));
                }
                Err(e) => {
                    st.dirty_bytes += p.0.len();
                    st.dirty.insert((ino, blk), p);
                    failed = Some(e);
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
}
