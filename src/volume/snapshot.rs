//! Snapshots and clones.
//!
//! A snapshot is a name, a time, a generation and the pointer of a committed
//! tree root, kept in the root record. Taking one costs a commit and a few
//! bytes, whatever the volume's size: the tree it names is immutable (every
//! change copies paths), so the snapshot shares every block with the live tree
//! until the live tree changes it. Block AADs never name a snapshot, so nothing
//! is re-encrypted. A clone is a new volume (own id, own root record, own
//! rollback mark) whose key domain, DK and blocks are its origin's.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Tree, Volume, sign_header_with, value_ptr, write_durably};
use crate::error::{Error, Result};
use crate::format::{self, BlockPtr, Header, RootPayload, SnapshotRecord, Timestamp};
use crate::store::Storage;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    pub created: i64,
    pub generation: u64,
    /// Bytes of sealed blocks only this snapshot references (freed by deleting it).
    pub exclusive_bytes: u64,
    /// Bytes it shares with the live tree or other snapshots.
    pub shared_bytes: u64,
}

fn check_snapshot_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 255 || name.contains(['/', '\0', '\n']) {
        return Err(Error::Invalid(format!(
            "snapshot name {name:?}: use 1 to 255 bytes without '/' or line breaks"
        )));
    }
    Ok(())
}

impl Volume {
    /// Every block a tree references: its nodes, and the data and xattr blocks
    /// its leaves point to. Fails on the first node that cannot be read.
    fn tree_blocks(&self, t: &Tree) -> Result<Vec<BlockPtr>> {
        let ids = std::cell::RefCell::new(Vec::new());
        let mut err = None;
        t.walk(
            self.nodes(),
            &mut |p| {
                ids.borrow_mut().push(*p);
                true
            },
            &mut |k, v| {
                if let Some(p) = value_ptr(k, v) {
                    ids.borrow_mut().push(p);
                }
                Ok(())
            },
            &mut |_, e| {
                err.get_or_insert(e);
            },
        )?;
        match err {
            Some(e) => Err(e),
            None => Ok(ids.into_inner()),
        }
    }

    /// Takes a snapshot of the live tree at a consistent point (after a commit).
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotRecord> {
        self.writable()?;
        check_snapshot_name(name)?;
        let mut st = self.st.write();
        if st.snapshots.iter().any(|s| s.name == name) {
            return Err(Error::AlreadyExists(format!(
                "a snapshot named {name} already exists; choose another name, or delete the old \
                 one first with `kmsfs snapshot delete VOLUME {name}`"
            )));
        }
        self.commit_locked(&mut st)?;
        let tree = st.tree.flush(self.nodes())?;
        let rec = SnapshotRecord {
            name: name.to_string(),
            created: Timestamp::now().secs,
            generation: st.generation,
            tree,
            next_ino: st.next_ino,
        };
        st.snapshots.push(rec.clone());
        st.changed = true;
        if let Err(e) = self.commit_locked(&mut st) {
            st.snapshots.pop();
            return Err(e);
        }
        Ok(rec)
    }

    /// Snapshots with their space figures (walks every root).
    pub fn snapshot_list(&self) -> Result<Vec<SnapshotInfo>> {
        let st = self.st.read();
        let mut roots: Vec<Tree> = vec![st.tree.clone()];
        roots.extend(st.snapshots.iter().map(|s| Tree::from_ptr(s.tree)));
        // block id -> (bytes, number of roots referencing it, last root seen)
        let mut refs: HashMap<[u8; 16], (u64, u32, usize)> = HashMap::new();
        let mut note = |p: &BlockPtr, root: usize| {
            let e = refs
                .entry(p.block_id)
                .or_insert((p.len as u64, 0, usize::MAX));
            if e.2 != root {
                e.1 += 1;
                e.2 = root;
            }
        };
        let mut owner: Vec<Vec<[u8; 16]>> = vec![Vec::new(); roots.len()];
        for (i, t) in roots.iter().enumerate() {
            let ids = self.tree_blocks(t)?;
            for p in &ids {
                note(p, i);
            }
            owner[i] = ids.iter().map(|p| p.block_id).collect();
        }
        Ok(st
            .snapshots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (mut excl, mut shared) = (0, 0);
                let mut seen = std::collections::HashSet::new();
                for id in &owner[i + 1] {
                    if !seen.insert(*id) {
                        continue;
                    }
                    let (len, n, _) = refs[id];
                    if n == 1 {
                        excl += len;
                    } else {
                        shared += len;
                    }
                }
                SnapshotInfo {
                    name: s.name.clone(),
                    created: s.created,
                    generation: s.generation,
                    exclusive_bytes: excl,
                    shared_bytes: shared,
                }
            })
            .collect())
    }

    /// Deletes a snapshot; the cleaner then frees the blocks only it used.
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.writable()?;
        self.note_freed();
        {
            let mut st = self.st.write();
            let i = st
                .snapshots
                .iter()
                .position(|s| s.name == name)
                .ok_or_else(|| no_snapshot(name))?;
            let removed = st.snapshots.remove(i);
            st.changed = true;
            if let Err(e) = self.commit_locked(&mut st) {
                st.snapshots.insert(i, removed);
                return Err(e);
            }
        }
        self.clean(0.5)?;
        Ok(())
    }

    /// Makes the live tree the snapshot's tree (later snapshots stay).
    pub fn snapshot_restore(&self, name: &str) -> Result<()> {
        self.writable()?;
        let mut st = self.st.write();
        let s = st
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| no_snapshot(name))?;
        if !st.open.is_empty() {
            return Err(Error::Locked(
                "files are open; unmount the volume first".into(),
            ));
        }
        self.commit_locked(&mut st)?;
        st.tree = Tree::from_ptr(s.tree);
        // Inode numbers only grow, so no number is ever reused for another file.
        st.next_ino = st.next_ino.max(s.next_ino);
        st.changed = true;
        self.commit_locked(&mut st)
    }

    /// Creates a new volume in `dest` from a snapshot. `bring_segment` makes the
    /// named segment file (or tree-node mirror `seg/N.meta`) of this volume
    /// available in `dest` under the same name (a hard link where possible,
    /// else a copy). Nothing is re-encrypted.
    pub fn clone_snapshot(
        &self,
        name: &str,
        dest: Arc<dyn Storage>,
        bring_segment: &dyn Fn(&str) -> std::io::Result<()>,
    ) -> Result<[u8; 16]> {
        if dest.exists(format::HEADER_FILE) || dest.exists(format::ROOT_FILE) {
            return Err(Error::AlreadyExists(format!(
                "{} already holds a kmsfs volume; clone into an empty directory",
                dest.describe()
            )));
        }
        // The segments are brought after the state lock is let go: no clean
        // of this volume may delete one meanwhile (a read-only opener's pin
        // keeps them from the cleaners of other processes).
        let _no_cleaner = self.clean_lock.lock();
        let st = self.st.read();
        let s = st
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| no_snapshot(name))?;
        let tree = Tree::from_ptr(s.tree);
        // A snapshot that cannot be read in full is not cloned.
        let segs: std::collections::BTreeSet<u64> =
            self.tree_blocks(&tree)?.iter().map(|p| p.segment).collect();
        drop(st);
        dest.create_dir(format::SEGMENT_DIR)
            .map_err(|e| Error::io("segment directory of the clone", e))?;
        for id in &segs {
            // The segment, and the mirror of its tree nodes where there is one.
            let mirror = super::blocks::mirror_file_name(*id);
            let mirrored = self.io.storage.exists(&mirror);
            for n in
                std::iter::once(format::segment_file_name(*id)).chain(mirrored.then_some(mirror))
            {
                bring_segment(&n).map_err(|e| Error::io(format!("copying {n}"), e))?;
                dest.sync(&n).map_err(|e| Error::io(&n, e))?;
            }
        }
        dest.sync_dir(format::SEGMENT_DIR)
            .map_err(|e| Error::io("segment directory of the clone", e))?;
        let volume_id: [u8; 16] = crate::crypto::random_array();
        let header = Header {
            volume_id,
            created: Timestamp::now().secs,
            ..self.header()
        };
        let hb = sign_header_with(&header, &self.header_mac_key);
        let payload = RootPayload {
            tree: s.tree,
            next_ino: s.next_ino,
            next_segment: segs.iter().max().map(|m| m + 1).unwrap_or(1),
            committed: Timestamp::now().secs,
            snapshots: Vec::new(),
        };
        let rec = self.seal_root(&volume_id, 1, &payload);
        write_durably(&*dest, format::HEADER_BACKUP_FILE, &hb)?;
        write_durably(&*dest, format::HEADER_FILE, &hb)?;
        write_durably(&*dest, format::ROOT_FILE, &rec)?;
        Ok(volume_id)
    }
}

fn no_snapshot(name: &str) -> Error {
    Error::Invalid(format!(
        "no snapshot named {name:?}; list them with `kmsfs snapshot list`"
    ))
}
