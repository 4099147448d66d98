//! fsck: verifies every sealed block reachable from the live root and every
//! snapshot root, and the consistency of the metadata (entries, link counts,
//! parents, block maps). Reports problems by file path where it can.

use std::collections::{HashMap, HashSet};

use super::{ROOT_INO, Volume, tree::Tree};
use crate::error::Result;
use crate::format::{
    self, BlockKind, BlockPtr, DirEntry, FileKind, FragValue, Inode, XattrValue, split_key, tag,
};

#[derive(Clone, Debug, Default)]
pub struct FsckReport {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub inodes: u64,
    pub nodes_checked: u64,
    pub blocks_checked: u64,
    pub bytes_checked: u64,
    pub segments: u64,
    pub unreferenced_segments: u64,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

#[derive(Default)]
struct TreeFacts {
    inodes: HashMap<u64, Inode>,
    entries: Vec<(u64, Vec<u8>, DirEntry)>,
    cookies: HashMap<(u64, u64), Vec<u8>>,
    blocks: Vec<(u64, u64, BlockPtr)>,
    /// Fragments: inode, block, sequence, value.
    frags: Vec<(u64, u64, u32, FragValue)>,
    xattr_blocks: Vec<(u64, BlockPtr)>,
    symlinks: HashSet<u64>,
    orphans: HashSet<u64>,
}

impl Volume {
    /// Checks the whole volume; never modifies it.
    pub fn fsck(&self) -> Result<FsckReport> {
        let st = self.st.read();
        let mut r = FsckReport::default();
        let mut seen_blocks: HashSet<[u8; 16]> = HashSet::new();
        let mut referenced_segments: HashSet<u64> = HashSet::new();
        let mut trees: Vec<(String, Tree)> = vec![("live tree".to_string(), st.tree.clone())];
        for s in &st.snapshots {
            trees.push((format!("snapshot {}", s.name), Tree::from_ptr(s.tree)));
        }
        drop(st);
        for (label, t) in trees {
            let f = self.fsck_tree(
                &label,
                &t,
                &mut r,
                &mut seen_blocks,
                &mut referenced_segments,
            )?;
            if label == "live tree" {
                r.inodes = f.inodes.len() as u64;
            }
        }
        // Both header copies.
        let storage = &self.io.storage;
        for name in [format::HEADER_FILE, format::HEADER_BACKUP_FILE] {
            match storage.read(name) {
                Err(e) => r.errors.push(format!("volume header {name}: {e}")),
                Ok(b) => match format::Header::decode(&b) {
                    Err(e) => r.errors.push(format!("volume header {name}: {e}")),
                    Ok(h) if h.volume_id != self.header.volume_id => r
                        .errors
                        .push(format!("volume header {name} belongs to another volume")),
                    Ok(_) => {
                        let body = &b[..format::HEADER_LEN - format::HEADER_MAC_LEN];
                        let mac = crate::crypto::hmac_sha256(&self.header_mac_key, body);
                        if !crate::crypto::ct_eq(
                            &mac,
                            &b[format::HEADER_LEN - format::HEADER_MAC_LEN..],
                        ) {
                            r.errors.push(format!(
                                "volume header {name}: MAC does not verify (modified)"
                            ));
                        }
                    }
                },
            }
        }
        // Both root slots: the newest is in use; the other is the fallback.
        for name in super::ROOT_SLOTS {
            match storage.read(name) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => r.warnings.push(format!(
                    "root record {name} is missing: no fallback commit (a volume not written \
                     since it was created or last opened by an older kmsfs)"
                )),
                Err(e) => r.errors.push(format!("root record {name}: {e}")),
                Ok(b) => {
                    if let Err(e) = self.check_root_record(&b) {
                        r.errors.push(format!("root record {name}: {e}"));
                    }
                }
            }
        }
        // Segment files.
        let names = storage.list(format::SEGMENT_DIR).unwrap_or_default();
        let mut present = HashSet::new();
        for n in names {
            let Some(id) = format::parse_segment_file_name(&n) else {
                // A node mirror: its header must name this volume and segment.
                let mirror_id = n
                    .strip_suffix(".meta")
                    .and_then(|stem| format::parse_segment_file_name(&format!("{stem}.seg")));
                match mirror_id {
                    Some(id) => {
                        let name = super::blocks::mirror_file_name(id);
                        let mut h = [0u8; format::SEGMENT_HEADER_LEN];
                        let ok = storage.read_at(&name, 0, &mut h).is_ok()
                            && matches!(format::decode_segment_header(&h),
                                Ok((vid, sid)) if vid == self.header.key_domain && sid == id);
                        if !ok {
                            r.errors.push(format!(
                                "mirror {name}: damaged header, or it belongs to another volume \
                                 or segment"
                            ));
                        }
                    }
                    None => r
                        .warnings
                        .push(format!("unexpected file {}/{n}", format::SEGMENT_DIR)),
                }
                continue;
            };
            present.insert(id);
            r.segments += 1;
            let mut h = [0u8; format::SEGMENT_HEADER_LEN];
            let name = format::segment_file_name(id);
            match storage.read_at(&name, 0, &mut h) {
                Ok(()) => match format::decode_segment_header(&h) {
                    Ok((vid, sid)) if vid == self.header.key_domain && sid == id => {}
                    Ok(_) => r.errors.push(format!("segment {name}: header names another volume or segment (file swapped or copied in)")),
                    Err(e) => r.errors.push(format!("segment {name}: {e}")),
                },
                Err(e) => {
                    if referenced_segments.contains(&id) {
                        r.errors.push(format!("segment {name}: unreadable header: {e}"));
                    }
                }
            }
            if !referenced_segments.contains(&id) {
                r.unreferenced_segments += 1;
            }
        }
        for id in &referenced_segments {
            if !present.contains(id) {
                r.errors.push(format!(
                    "segment {} is missing but referenced",
                    format::segment_file_name(*id)
                ));
            }
        }
        r.errors.dedup();
        Ok(r)
    }

    fn fsck_tree(
        &self,
        label: &str,
        t: &Tree,
        r: &mut FsckReport,
        seen_blocks: &mut HashSet<[u8; 16]>,
        segs: &mut HashSet<u64>,
    ) -> Result<TreeFacts> {
        let n = self.nodes();
        let mut f = TreeFacts::default();
        let mut errors = Vec::new();
        let mut node_count = 0u64;
        let mut node_ptrs: Vec<BlockPtr> = Vec::new();
        let mut checked_nodes: HashSet<[u8; 16]> = HashSet::new();
        {
            let mut on_node = |p: &BlockPtr| {
                segs.insert(p.segment);
                node_count += 1;
                node_ptrs.push(*p);
                true
            };
            let mut on_entry = |k: &[u8], v: &[u8]| -> Result<()> {
                let Some((ino, tg, suffix)) = split_key(k) else {
                    errors.push(format!("{label}: malformed key"));
                    return Ok(());
                };
                match tg {
                    tag::INODE => match Inode::decode(v) {
                        Ok(i) => {
                            f.inodes.insert(ino, i);
                        }
                        Err(e) => errors.push(format!("{label}: inode {ino}: {e}")),
                    },
                    tag::DIRENT => match DirEntry::decode(v) {
                        Ok(e) => f.entries.push((ino, suffix.to_vec(), e)),
                        Err(e) => errors.push(format!("{label}: directory {ino}: {e}")),
                    },
                    tag::DIRCOOKIE if suffix.len() == 8 => {
                        f.cookies.insert(
                            (ino, u64::from_be_bytes(suffix.try_into().unwrap())),
                            v.to_vec(),
                        );
                    }
                    tag::BLOCK if suffix.len() == 8 => match BlockPtr::from_bytes(v) {
                        Ok(p) => {
                            f.blocks
                                .push((ino, u64::from_be_bytes(suffix.try_into().unwrap()), p))
                        }
                        Err(e) => errors.push(format!("{label}: inode {ino} block map: {e}")),
                    },
                    tag::FRAG if suffix.len() == 12 => {
                        match FragValue::from_bytes(v, self.header.block_size) {
                            Ok(fv) => f.frags.push((
                                ino,
                                u64::from_be_bytes(suffix[..8].try_into().unwrap()),
                                u32::from_be_bytes(suffix[8..].try_into().unwrap()),
                                fv,
                            )),
                            Err(e) => errors.push(format!("{label}: inode {ino} fragment: {e}")),
                        }
                    }
                    tag::XATTR => match XattrValue::decode(v) {
                        Ok(XattrValue::Block(p)) => f.xattr_blocks.push((ino, p)),
                        Ok(_) => {}
                        Err(e) => errors.push(format!("{label}: inode {ino} xattr: {e}")),
                    },
                    tag::SYMLINK => {
                        f.symlinks.insert(ino);
                    }
                    tag::ORPHAN if suffix.len() == 8 => {
                        f.orphans
                            .insert(u64::from_be_bytes(suffix.try_into().unwrap()));
                    }
                    _ => errors.push(format!("{label}: unknown key tag {tg} for inode {ino}")),
                }
                Ok(())
            };
            let mut node_errors = Vec::new();
            t.walk(n, &mut on_node, &mut on_entry, &mut |p, e| {
                node_errors.push(format!("{label}: tree node {p:?}: {e}"))
            })?;
            errors.extend(node_errors);
        }
        // Both copies of every node: the walk above reads through the mirror
        // when a segment copy fails, so damage to either is found only here.
        for p in &node_ptrs {
            if !checked_nodes.insert(p.block_id) {
                continue;
            }
            let (primary, mirror) = self.io.check_node_copies(p);
            let seg = format::segment_file_name(p.segment);
            let mirror_name = super::blocks::mirror_file_name(p.segment);
            match (&primary, &mirror) {
                (Ok(()), Ok(())) => {}
                (Err(e), Ok(())) => errors.push(format!(
                    "{label}: tree node in {seg} is damaged ({e}); its copy in {mirror_name} \
                     is intact and serves instead"
                )),
                (Ok(()), Err(e)) if !self.io.storage.exists(&mirror_name) => {
                    let _ = e;
                    r.warnings.push(format!(
                        "{label}: {mirror_name} is missing: tree nodes of {seg} have no second \
                         copy (written by an older kmsfs, or the file was deleted)"
                    ));
                }
                (Ok(()), Err(e)) => errors.push(format!(
                    "{label}: the copy of a tree node in {mirror_name} is damaged ({e}); the \
                     original in {seg} is intact"
                )),
                (Err(e), Err(_)) => errors.push(format!(
                    "{label}: tree node in {seg} is damaged ({e}) and has no intact copy"
                )),
            }
        }
        r.nodes_checked += node_count;
        // Paths for messages.
        let mut parent_of: HashMap<u64, (u64, Vec<u8>)> = HashMap::new();
        for (p, name, e) in &f.entries {
            parent_of.entry(e.ino).or_insert((*p, name.clone()));
        }
        let path = |ino: u64| -> String {
            let mut parts = Vec::new();
            let mut cur = ino;
            for _ in 0..4096 {
                if cur == ROOT_INO {
                    break;
                }
                match parent_of.get(&cur) {
                    Some((p, name)) => {
                        parts.push(String::from_utf8_lossy(name).into_owned());
                        cur = *p;
                    }
                    None => return format!("inode {ino} (unlinked)"),
                }
            }
            parts.reverse();
            format!("/{}", parts.join("/"))
        };
        // Data and large xattr blocks: decrypt every one.
        let bs = self.header.block_size as u64;
        for (ino, blk, p) in &f.blocks {
            segs.insert(p.segment);
            if let Some(i) = f.inodes.get(ino)
                && blk.checked_mul(bs).is_none_or(|at| at >= i.size)
            {
                errors.push(format!(
                    "{label}: {} : block {blk} lies beyond the file size",
                    path(*ino)
                ));
            }
            if !seen_blocks.insert(p.block_id) {
                continue;
            }
            match self.io.read_block(p, BlockKind::Data) {
                Ok(b) => {
                    r.blocks_checked += 1;
                    r.bytes_checked += b.len() as u64;
                }
                Err(e) => errors.push(format!("{label}: file {} block {blk}: {e}", path(*ino))),
            }
        }
        if !f.frags.is_empty() && !self.fragments_on() {
            errors.push(format!(
                "{label}: fragments in a version {} volume (they need version {})",
                self.header.version,
                format::FRAGMENTS_SINCE
            ));
        }
        let based: HashSet<(u64, u64)> = f.blocks.iter().map(|(i, b, _)| (*i, *b)).collect();
        for (ino, blk, seq, fv) in &f.frags {
            let p = &fv.ptr;
            segs.insert(p.segment);
            if let Some(i) = f.inodes.get(ino)
                && blk.checked_mul(bs).is_none_or(|at| at >= i.size)
            {
                errors.push(format!(
                    "{label}: {} : fragment {seq} of block {blk} lies beyond the file size",
                    path(*ino)
                ));
            }
            if !based.contains(&(*ino, *blk)) {
                errors.push(format!(
                    "{label}: {} : fragment {seq} of block {blk} has no block under it",
                    path(*ino)
                ));
            }
            if !seen_blocks.insert(p.block_id) {
                continue;
            }
            match self.io.read_block(p, BlockKind::Data) {
                Ok(b) if b.len() >= fv.len as usize => {
                    r.blocks_checked += 1;
                    r.bytes_checked += b.len() as u64;
                }
                Ok(b) => errors.push(format!(
                    "{label}: file {} block {blk} fragment {seq}: the record holds {} bytes, the fragment names {}",
                    path(*ino),
                    b.len(),
                    fv.len
                )),
                Err(e) => errors.push(format!(
                    "{label}: file {} block {blk} fragment {seq}: {e}",
                    path(*ino)
                )),
            }
        }
        for (ino, p) in &f.xattr_blocks {
            segs.insert(p.segment);
            if !seen_blocks.insert(p.block_id) {
                continue;
            }
            if let Err(e) = self.io.read_block(p, BlockKind::Xattr) {
                errors.push(format!(
                    "{label}: file {} extended attribute: {e}",
                    path(*ino)
                ));
            } else {
                r.blocks_checked += 1;
            }
        }
        // Metadata consistency.
        let mut links: HashMap<u64, u32> = HashMap::new();
        let mut subdirs: HashMap<u64, u32> = HashMap::new();
        for (p, name, e) in &f.entries {
            match f.inodes.get(&e.ino) {
                None => errors.push(format!(
                    "{label}: entry {} points to missing inode {}",
                    path(*p) + "/" + &String::from_utf8_lossy(name),
                    e.ino
                )),
                Some(i) if i.kind != e.kind => errors.push(format!(
                    "{label}: entry for {} has the wrong type",
                    path(e.ino)
                )),
                Some(i) => {
                    *links.entry(e.ino).or_default() += 1;
                    if i.kind == FileKind::Dir {
                        *subdirs.entry(*p).or_default() += 1;
                        if i.parent != *p {
                            errors.push(format!(
                                "{label}: directory {} has a wrong parent",
                                path(e.ino)
                            ));
                        }
                    }
                }
            }
            if f.cookies.get(&(*p, e.cookie)) != Some(name) {
                errors.push(format!(
                    "{label}: directory {} lacks the readdir record of {}",
                    path(*p),
                    String::from_utf8_lossy(name)
                ));
            }
        }
        if f.cookies.len() != f.entries.len() {
            errors.push(format!(
                "{label}: {} readdir records for {} entries",
                f.cookies.len(),
                f.entries.len()
            ));
        }
        if !f.inodes.contains_key(&ROOT_INO) {
            errors.push(format!("{label}: the root directory is missing"));
        }
        for (ino, i) in &f.inodes {
            let l = links.get(ino).copied().unwrap_or(0);
            match i.kind {
                FileKind::Dir => {
                    let want = 2 + subdirs.get(ino).copied().unwrap_or(0);
                    if *ino != ROOT_INO && l != 1 {
                        if !(l == 0 && f.orphans.contains(ino)) {
                            errors.push(format!("{label}: directory inode {ino} has {l} entries"));
                        }
                    } else if i.nlink != want {
                        errors.push(format!(
                            "{label}: directory {} has link count {}, expected {want}",
                            path(*ino),
                            i.nlink
                        ));
                    }
                }
                _ => {
                    if l == 0 && !f.orphans.contains(ino) {
                        errors.push(format!("{label}: inode {ino} is not in any directory"));
                    } else if i.nlink != l {
                        errors.push(format!(
                            "{label}: {} has link count {}, expected {l}",
                            path(*ino),
                            i.nlink
                        ));
                    }
                }
            }
            if i.kind == FileKind::Symlink && !f.symlinks.contains(ino) {
                errors.push(format!("{label}: symlink {} has no target", path(*ino)));
            }
        }
        let mut counted: HashMap<u64, u64> = HashMap::new();
        for (ino, _, _) in &f.blocks {
            *counted.entry(*ino).or_default() += 1;
        }
        for (ino, c) in counted {
            match f.inodes.get(&ino) {
                Some(i) if i.blocks != c => errors.push(format!(
                    "{label}: {} counts {} blocks, has {c}",
                    path(ino),
                    i.blocks
                )),
                None => errors.push(format!("{label}: blocks of missing inode {ino}")),
                _ => {}
            }
        }
        r.errors.extend(errors);
        Ok(f)
    }
}
