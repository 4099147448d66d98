//! The segment cleaner: what every tree (live, snapshots, the fallback root
//! slot) references, deleting segments nothing needs and moving live blocks
//! out of mostly-dead ones.

use super::*;

impl Volume {
    /// Applies `relocate` to the live tree and to every snapshot's tree, and
    /// stores the snapshots' new root pointers (the live tree is flushed by
    /// the next commit). Nothing changes in `st` if any tree fails.
    pub(super) fn relocate_all(
        &self,
        st: &mut State,
        relocate: &dyn Fn(&mut Tree) -> Result<()>,
    ) -> Result<()> {
        let mut live = st.tree.clone();
        relocate(&mut live)?;
        let mut snaps = st.snapshots.clone();
        for s in &mut snaps {
            let mut t = Tree::from_ptr(s.tree);
            relocate(&mut t)?;
            s.tree = t.flush(self.nodes())?;
        }
        st.tree = live;
        st.snapshots = snaps;
        Ok(())
    }

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

    /// [`Volume::clean`], reporting its progress: first the trees walked
    /// (done, total), then the live bytes copied out of the segments it
    /// empties (done, total).
    pub fn clean_with_progress(
        &self,
        max_live: f64,
        progress: &dyn Fn(CleanProgress),
    ) -> Result<CleanStats> {
        self.writable()?;
        self.space_pressure.store(false, Ordering::Relaxed);
        self.freed_since_clean.store(false, Ordering::Relaxed);
        let _gate = self.append_gate.write();
        let mut st = self.st.write();
        // Two commits, even with nothing pending: afterwards the fallback slot
        // holds the same trees as the live one, so what the last changes freed
        // is reclaimable now rather than one commit later.
        for _ in 0..2 {
            st.changed = true;
            self.commit_locked(&mut st)?;
        }
        let n = self.nodes();
        let storage = &self.io.storage;
        // Live bytes per segment, by walking every root once (shared blocks count once).
        let mut live: HashMap<u64, u64> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        let trees = self.all_trees(&st);
        let n_trees = trees.len() as u64;
        for (i, t) in trees.into_iter().enumerate() {
            progress(CleanProgress::Scanning {
                done: i as u64,
                total: n_trees,
            });
            let mut err = None;
            let mut data_live = Vec::new();
            t.walk(
                n,
                &mut |p| {
                    if seen.insert(p.block_id) {
                        *live.entry(p.segment).or_default() += p.len as u64;
                        true
                    } else {
                        false
                    }
                },
                &mut |k, v| {
                    if let Some(p) = value_ptr(k, v) {
                        data_live.push(p);
                    }
                    Ok(())
                },
                &mut |p, e| {
                    err.get_or_insert((*p, e));
                },
            )?;
            if let Some((_, e)) = err {
                return Err(e);
            }
            for p in data_live {
                if seen.insert(p.block_id) {
                    *live.entry(p.segment).or_default() += p.len as u64;
                }
            }
        }
        let current = self.io.current_segment();
        let mut stats = CleanStats::default();
        let mut victims = std::collections::HashSet::new();
        let mut empty = Vec::new();
        let mut to_move = 0u64;
        for f in storage
            .list(format::SEGMENT_DIR)
            .map_err(|e| Error::io("segment directory", e))?
        {
            let Some(id) = format::parse_segment_file_name(&f) else {
                continue;
            };
            if Some(id) == current {
                continue;
            }
            let size = storage.len(&format::segment_file_name(id)).unwrap_or(0);
            let l = live.get(&id).copied().unwrap_or(0);
            if l == 0 {
                empty.push((id, size));
            } else if (l as f64) < max_live * size as f64 {
                victims.insert(id);
                stats.bytes_freed += size - l;
                to_move += l;
            }
        }
        progress(CleanProgress::Scanning {
            done: n_trees,
            total: n_trees,
        });
        // Readers on an older root (a snapshot mount, a clone in progress) may
        // still need any segment: while they are there, delete nothing.
        let Some(_readers) = storage
            .try_lock_readers_exclusive()
            .map_err(|e| Error::io(format::READERS_FILE, e))?
        else {
            log::info!("cleaner: read-only users present; not deleting segments now");
            return Ok(stats);
        };
        // Segments nothing references can go at once: the committed root does
        // not need them. That frees room before anything is copied.
        let mut removed = false;
        for (id, size) in &empty {
            let name = format::segment_file_name(*id);
            storage.remove(&name).map_err(|e| Error::io(&name, e))?;
            stats.bytes_freed += size + self.remove_mirror(*id)?;
            stats.segments_removed += 1;
            removed = true;
        }
        if removed {
            storage
                .sync_dir(format::SEGMENT_DIR)
                .map_err(|e| Error::io("segment directory", e))?;
        }
        if !victims.is_empty() {
            let io = self.io.clone();
            let moved: std::cell::RefCell<(HashMap<[u8; 16], BlockPtr>, CleanStats)> =
                std::cell::RefCell::new((HashMap::new(), CleanStats::default()));
            let move_block = |p: &BlockPtr, kind: BlockKind| -> Result<Option<BlockPtr>> {
                if !victims.contains(&p.segment) {
                    return Ok(None);
                }
                let mut m = moved.borrow_mut();
                if let Some(np) = m.0.get(&p.block_id) {
                    return Ok(Some(*np));
                }
                let np = io.copy(p, kind)?;
                m.1.blocks_moved += 1;
                m.1.bytes_moved += p.len as u64;
                progress(CleanProgress::Moving {
                    done: m.1.bytes_moved,
                    total: to_move,
                });
                m.0.insert(p.block_id, np);
                Ok(Some(np))
            };
            let relocate_tree = |t: &mut Tree| -> Result<()> {
                t.relocate(
                    n,
                    &mut |p| move_block(p, BlockKind::Node),
                    &mut |_| true,
                    &mut |k, v| {
                        let Some(p) = value_ptr(k, v) else {
                            return Ok(None);
                        };
                        let data = k[8] == tag::BLOCK;
                        let kind = if data {
                            BlockKind::Data
                        } else {
                            BlockKind::Xattr
                        };
                        Ok(move_block(&p, kind)?.map(|np| {
                            if data {
                                np.to_bytes().to_vec()
                            } else {
                                XattrValue::Block(np).encode()
                            }
                        }))
                    },
                )
            };
            self.relocate_all(&mut st, &relocate_tree)?;
            let m = moved.borrow();
            stats.blocks_moved = m.1.blocks_moved;
            stats.bytes_moved = m.1.bytes_moved;
            st.changed = true;
            self.commit_locked(&mut st)?;
            // Twice: the other root slot (the fallback) still names the old
            // places; after a second commit both slots name the new ones.
            st.changed = true;
            self.commit_locked(&mut st)?;
        }
        // Only now, with a root that no longer needs them on disk, delete.
        let mut removed = false;
        for id in victims.iter().copied() {
            let name = format::segment_file_name(id);
            if storage.len(&name).is_ok() {
                storage.remove(&name).map_err(|e| Error::io(&name, e))?;
                stats.bytes_freed += self.remove_mirror(id)?;
                stats.segments_removed += 1;
                removed = true;
            }
        }
        if removed {
            storage
                .sync_dir(format::SEGMENT_DIR)
                .map_err(|e| Error::io("segment directory", e))?;
        }
        Ok(stats)
    }
}
