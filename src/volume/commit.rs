//! Commits: the durable, atomic switch to a new state through the two root
//! slots, the rollback mark raised by each commit, and what the committer
//! needs to know (pending changes, idleness).

use super::*;

impl Volume {
    // ----- durability -------------------------------------------------------------

    /// Makes everything written so far durable, atomically.
    pub fn commit(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // After a write-back under way, not beside it (it would seal the same
        // buffers again).
        let _one = self.flush_lock.lock();
        let mut st = self.st.write();
        self.commit_locked(&mut st)
    }

    pub(super) fn commit_locked(&self, st: &mut State) -> Result<()> {
        if !st.changed && st.dirty.is_empty() && !st.tree.is_dirty() {
            return Ok(());
        }
        self.flush_data(st)?;
        let tree = st.tree.flush(self.nodes())?;
        if let Err(e) = self.io.sync() {
            // A failed fsync may have dropped the dirty pages: never commit a
            // root over records that might not be on disk.
            self.poisoned.store(true, Ordering::Relaxed);
            return Err(e);
        }
        let payload = RootPayload {
            tree,
            next_ino: st.next_ino,
            next_segment: self.io.next_segment(),
            committed: now().secs,
            snapshots: st.snapshots.clone(),
        };
        let generation = st.generation + 1;
        let rec = self.seal_root(&self.header.volume_id, generation, &payload);
        // Into the slot that does not hold the newest commit: that one stays
        // intact whatever happens to this write.
        let slot = 1 - st.newest_slot;
        // Both slots go through the one kmsfs.root.tmp (commits are serial).
        write_durably_via(
            &*self.io.storage,
            format::ROOT_TMP_FILE,
            ROOT_SLOTS[slot],
            &rec,
        )?;
        st.newest_slot = slot;
        st.previous = std::mem::replace(
            &mut st.committed,
            std::iter::once(payload.tree)
                .chain(payload.snapshots.iter().map(|s| s.tree))
                .collect(),
        );
        st.generation = generation;
        st.changed = false;
        self.raise_mark(generation);
        Ok(())
    }

    /// Records `generation` as the volume's rollback mark in the sink, if any.
    /// Called with the new root durable and the state lock held, so marks are
    /// raised in commit order and never ahead of the volume. A failure leaves
    /// the data durable (the commit stands) but the rollback protection
    /// behind: it is logged, and the next commit tries again.
    pub(super) fn raise_mark(&self, generation: u64) {
        let Some(kms) = self.mark_sink.lock().clone() else {
            return;
        };
        match kms.record_generation(&self.header.volume_id, generation) {
            Ok(()) => {
                if self.mark_failing.swap(false, Ordering::Relaxed) {
                    log::info!("the keystore records this volume's generation again");
                }
            }
            Err(e) => {
                if !self.mark_failing.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "could not record generation {generation} in the keystore ({e}); the data \
                         is committed, but a rollback to it would go unnoticed until a later \
                         commit records its generation"
                    );
                }
            }
        }
    }

    /// The bytes of a root record: plaintext prefix, then the payload sealed
    /// with the root subkey and the prefix as AAD.
    pub(super) fn seal_root(
        &self,
        volume_id: &[u8; 16],
        generation: u64,
        payload: &RootPayload,
    ) -> Vec<u8> {
        let plain = payload.encode();
        let sealed_len = self.root_sealer.sealed_len(plain.len()) as u32;
        let prefix = format::root_prefix(volume_id, generation, sealed_len);
        let mut rec = prefix.clone();
        self.root_sealer.seal_into(&prefix, &plain, &mut rec);
        rec
    }

    /// Raises the KMS's high-water mark to the last committed generation, so a
    /// later open detects a rollback of the backing store to an older state.
    pub fn record_generation(&self, kms: &dyn Kms) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let g = self.st.read().generation;
        kms.record_generation(&self.header.volume_id, g)?;
        Ok(())
    }

    /// fsync of one file: a commit of the volume (cheap when nothing changed).
    pub fn fsync(&self, _ino: u64) -> Result<()> {
        self.commit()
    }

    /// Records every later commit's generation in `kms` (the rollback mark)
    /// before the commit returns. Without a sink, marks are the caller's job.
    pub fn set_generation_sink(&self, kms: Option<Arc<dyn Kms>>) {
        *self.mark_sink.lock() = kms;
    }

    /// How long ago the last changing operation started, when there are
    /// uncommitted changes; None when everything is committed.
    pub fn idle_for(&self) -> Option<Duration> {
        if !self.has_changes() {
            return None;
        }
        let last = self.last_change_ms.load(Ordering::Relaxed);
        let now = self.opened.elapsed().as_millis() as u64;
        Some(Duration::from_millis(now.saturating_sub(last)))
    }

    pub fn has_changes(&self) -> bool {
        let st = self.st.read();
        st.changed || !st.dirty.is_empty() || st.tree.is_dirty()
    }

    pub fn statfs(&self) -> Result<StatFs> {
        let (total, free) = self
            .io
            .storage
            .space()
            .map_err(|e| Error::io("backing store", e))?;
        let stored = self.stored_bytes()?;
        Ok(StatFs {
            total_bytes: total,
            free_bytes: free.saturating_sub(reserve_bytes(self.header.segment_size, total)),
            stored_bytes: stored,
            block_size: self.header.block_size,
            files: self.st.read().next_ino,
            name_max: NAME_MAX as u32,
        })
    }

    /// Bytes held by segment files.
    pub fn stored_bytes(&self) -> Result<u64> {
        let s = &self.io.storage;
        let mut n = 0;
        for f in s
            .list(format::SEGMENT_DIR)
            .map_err(|e| Error::io("segment directory", e))?
        {
            n += s.len(&format!("{}/{f}", format::SEGMENT_DIR)).unwrap_or(0);
        }
        Ok(n)
    }

    /// Commits and releases the volume.
    pub fn close(self) -> Result<()> {
        self.commit()
    }

    /// fsck: whether a root record belongs to this volume and unseals.
    pub(crate) fn check_root_record(&self, b: &[u8]) -> Result<()> {
        let (vid, _, prefix, sealed) =
            format::split_root(b).map_err(|e| Error::integrity("root record", e))?;
        if vid != self.header.volume_id {
            return Err(Error::integrity("root record", "belongs to another volume"));
        }
        let plain = self
            .root_sealer
            .open(prefix, sealed)
            .map_err(|e| Error::integrity("root record", e))?;
        RootPayload::decode(&plain).map_err(|e| Error::integrity("root record", e))?;
        Ok(())
    }

    /// Notes the trees of the commit in the other root slot (if it is intact
    /// and older), which the cleaner must keep as the fallback.
    pub(super) fn load_previous_root(&self, slots: &[RootSlot], newest: usize) {
        let Some(other) = slots.iter().find(|s| s.index != newest) else {
            return;
        };
        let Ok((vid, _, prefix, sealed)) = format::split_root(&other.bytes) else {
            return;
        };
        if vid != self.header.volume_id {
            return;
        }
        let Ok(plain) = self.root_sealer.open(prefix, sealed) else {
            return;
        };
        if let Ok(p) = RootPayload::decode(&plain) {
            self.st.write().previous = std::iter::once(p.tree)
                .chain(p.snapshots.iter().map(|s| s.tree))
                .collect();
        }
    }
}
