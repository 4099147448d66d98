//! The namespace and attributes: lookup, creation of every kind of inode,
//! links, unlink and rmdir, rename (with its flags), readdir, setattr and the
//! clearing of set-ID bits. Every change happens under the volume lock, on the
//! tree; the helpers they share (inode and entry access, destroy) are in mod.rs.

use super::*;

impl Volume {
    // ----- namespace ----------------------------------------------------------

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let st = self.st.read();
        Ok(self.attr(ino, self.get_inode(&st, ino)?))
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        if name.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        let st = self.st.read();
        // Only a directory has entries: the parent's inode is read only when
        // the name is missing, to tell "no such entry" from "not a directory"
        // (a lookup is one tree search fewer this way).
        match self.get_entry(&st, parent, name)? {
            Some(e) => Ok(self.attr(e.ino, self.get_inode(&st, e.ino)?)),
            None => {
                self.dir_inode(&st, parent)?;
                Err(Error::NotFound)
            }
        }
    }

    /// Creates a file, directory, device node, fifo, socket or symlink.
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        symlink: Option<&[u8]>,
    ) -> Result<Attr> {
        self.writable()?;
        check_name(name)?;
        let kind = if symlink.is_some() {
            FileKind::Symlink
        } else {
            FileKind::from_mode(mode).unwrap_or(FileKind::File)
        };
        if let Some(t) = symlink
            && (t.is_empty() || t.len() > SYMLINK_MAX)
        {
            return Err(Error::NameTooLong);
        }
        let mut st = self.st.write();
        let mut pi = self.dir_inode(&st, parent)?;
        if pi.nlink == 0 {
            return Err(Error::NotFound);
        }
        if self.get_entry(&st, parent, name)?.is_some() {
            return Err(Error::Exists);
        }
        let mut perm = if kind == FileKind::Symlink {
            0o777
        } else {
            mode & 0o7777
        };
        let mut gid = gid;
        if pi.perm & crate::sys::S_ISGID != 0 {
            gid = pi.gid;
            if kind == FileKind::Dir {
                perm |= crate::sys::S_ISGID;
            }
        }
        let ino = st.next_ino;
        st.next_ino += 1;
        let t = now();
        let inode = Inode {
            kind,
            perm,
            uid,
            gid,
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            size: symlink.map(|s| s.len() as u64).unwrap_or(0),
            rdev: if matches!(kind, FileKind::CharDev | FileKind::BlockDev) {
                rdev
            } else {
                0
            },
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            parent: if kind == FileKind::Dir { parent } else { 0 },
            next_cookie: 3,
            flags: 0,
            blocks: 0,
        };
        self.put_inode(&mut st, ino, &inode)?;
        if let Some(target) = symlink {
            st.tree
                .insert(self.nodes(), &key(ino, tag::SYMLINK, &[]), target.to_vec())?;
        }
        self.add_entry(&mut st, parent, &mut pi, name, ino, kind)?;
        if kind == FileKind::Dir {
            pi.nlink += 1;
        }
        pi.mtime = t;
        pi.ctime = t;
        self.put_inode(&mut st, parent, &pi)?;
        Ok(self.attr(ino, inode))
    }

    pub fn mkdir(&self, parent: u64, name: &[u8], mode: u32, uid: u32, gid: u32) -> Result<Attr> {
        self.mknod(
            parent,
            name,
            crate::sys::S_IFDIR | (mode & 0o7777),
            uid,
            gid,
            0,
            None,
        )
    }

    pub fn create(&self, parent: u64, name: &[u8], mode: u32, uid: u32, gid: u32) -> Result<Attr> {
        self.mknod(
            parent,
            name,
            crate::sys::S_IFREG | (mode & 0o7777),
            uid,
            gid,
            0,
            None,
        )
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        self.mknod(
            parent,
            name,
            crate::sys::S_IFLNK | 0o777,
            uid,
            gid,
            0,
            Some(target),
        )
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let st = self.st.read();
        let i = self.get_inode(&st, ino)?;
        if i.kind != FileKind::Symlink {
            return Err(Error::Invalid("not a symlink".into()));
        }
        st.tree
            .get(self.nodes(), &key(ino, tag::SYMLINK, &[]))?
            .ok_or_else(|| Error::integrity(format!("symlink {ino}"), "target missing"))
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<Attr> {
        self.writable()?;
        check_name(newname)?;
        let mut st = self.st.write();
        let mut i = self.get_inode(&st, ino)?;
        if i.kind == FileKind::Dir {
            return Err(Error::Permission(
                "hard links to directories are not allowed".into(),
            ));
        }
        if i.nlink >= 65000 {
            return Err(Error::TooManyLinks);
        }
        let mut pi = self.dir_inode(&st, newparent)?;
        if self.get_entry(&st, newparent, newname)?.is_some() {
            return Err(Error::Exists);
        }
        let t = now();
        self.add_entry(&mut st, newparent, &mut pi, newname, ino, i.kind)?;
        pi.mtime = t;
        pi.ctime = t;
        self.put_inode(&mut st, newparent, &pi)?;
        i.nlink += 1;
        i.ctime = t;
        st.tree
            .remove(self.nodes(), &key(0, tag::ORPHAN, &ino.to_be_bytes()))?;
        self.put_inode(&mut st, ino, &i)?;
        Ok(self.attr(ino, i))
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.writable()?;
        let mut st = self.st.write();
        let mut pi = self.dir_inode(&st, parent)?;
        let e = self.get_entry(&st, parent, name)?.ok_or(Error::NotFound)?;
        if e.kind == FileKind::Dir {
            return Err(Error::IsDir);
        }
        let t = now();
        self.del_entry(&mut st, parent, name, &e)?;
        pi.mtime = t;
        pi.ctime = t;
        self.put_inode(&mut st, parent, &pi)?;
        let mut i = self.get_inode(&st, e.ino)?;
        i.nlink = i.nlink.saturating_sub(1);
        i.ctime = t;
        self.put_inode(&mut st, e.ino, &i)?;
        self.maybe_destroy(&mut st, e.ino, &i)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.writable()?;
        if name == b"." {
            return Err(Error::Invalid("cannot remove '.'".into()));
        }
        if name == b".." {
            return Err(Error::NotEmpty);
        }
        let mut st = self.st.write();
        let mut pi = self.dir_inode(&st, parent)?;
        let e = self.get_entry(&st, parent, name)?.ok_or(Error::NotFound)?;
        if e.kind != FileKind::Dir {
            return Err(Error::NotDir);
        }
        if !self.dir_is_empty(&st, e.ino)? {
            return Err(Error::NotEmpty);
        }
        let t = now();
        self.del_entry(&mut st, parent, name, &e)?;
        pi.nlink -= 1;
        pi.mtime = t;
        pi.ctime = t;
        self.put_inode(&mut st, parent, &pi)?;
        let mut i = self.get_inode(&st, e.ino)?;
        i.nlink = 0;
        self.put_inode(&mut st, e.ino, &i)?;
        self.maybe_destroy(&mut st, e.ino, &i)
    }

    /// True when `dir` is `anc` or lies below it.
    fn is_within(&self, st: &State, mut dir: u64, anc: u64) -> Result<bool> {
        for _ in 0..100_000 {
            if dir == anc {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            dir = self.get_inode(st, dir)?.parent;
        }
        Err(Error::integrity("directory tree", "parent chain loops"))
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: RenameFlags,
    ) -> Result<()> {
        self.writable()?;
        check_name(newname)?;
        if flags.noreplace && flags.exchange {
            return Err(Error::Invalid(
                "RENAME_NOREPLACE and RENAME_EXCHANGE together".into(),
            ));
        }
        let mut st = self.st.write();
        self.dir_inode(&st, parent)?;
        self.dir_inode(&st, newparent)?;
        let src = self.get_entry(&st, parent, name)?.ok_or(Error::NotFound)?;
        let dst = self.get_entry(&st, newparent, newname)?;
        let t = now();
        if flags.exchange {
            let dst = dst.ok_or(Error::NotFound)?;
            if src.kind == FileKind::Dir && self.is_within(&st, newparent, src.ino)? {
                return Err(Error::Invalid("cannot move a directory into itself".into()));
            }
            if dst.kind == FileKind::Dir && self.is_within(&st, parent, dst.ino)? {
                return Err(Error::Invalid("cannot move a directory into itself".into()));
            }
            let n = self.nodes();
            let a = DirEntry {
                ino: dst.ino,
                kind: dst.kind,
                cookie: src.cookie,
            };
            let b = DirEntry {
                ino: src.ino,
                kind: src.kind,
                cookie: dst.cookie,
            };
            st.tree
                .insert(n, &key(parent, tag::DIRENT, name), a.encode())?;
            st.tree
                .insert(n, &key(newparent, tag::DIRENT, newname), b.encode())?;
            if parent != newparent {
                let sd = (src.kind == FileKind::Dir) as i64 - (dst.kind == FileKind::Dir) as i64;
                for (ino, newp) in [(src.ino, newparent), (dst.ino, parent)] {
                    let mut i = self.get_inode(&st, ino)?;
                    if i.kind == FileKind::Dir {
                        i.parent = newp;
                    }
                    i.ctime = t;
                    self.put_inode(&mut st, ino, &i)?;
                }
                let mut p1 = self.get_inode(&st, parent)?;
                p1.nlink = (p1.nlink as i64 - sd) as u32;
                p1.mtime = t;
                p1.ctime = t;
                self.put_inode(&mut st, parent, &p1)?;
                let mut p2 = self.get_inode(&st, newparent)?;
                p2.nlink = (p2.nlink as i64 + sd) as u32;
                p2.mtime = t;
                p2.ctime = t;
                self.put_inode(&mut st, newparent, &p2)?;
            } else {
                for ino in [src.ino, dst.ino, parent] {
                    let mut i = self.get_inode(&st, ino)?;
                    i.ctime = t;
                    if ino == parent {
                        i.mtime = t;
                    }
                    self.put_inode(&mut st, ino, &i)?;
                }
            }
            st.changed = true;
            return Ok(());
        }
        if let Some(d) = &dst {
            if flags.noreplace {
                return Err(Error::Exists);
            }
            if d.ino == src.ino {
                return Ok(()); // same file: POSIX says do nothing
            }
            match (src.kind == FileKind::Dir, d.kind == FileKind::Dir) {
                (true, false) => return Err(Error::NotDir),
                (false, true) => return Err(Error::IsDir),
                (true, true) if !self.dir_is_empty(&st, d.ino)? => return Err(Error::NotEmpty),
                _ => {}
            }
        }
        if src.kind == FileKind::Dir && self.is_within(&st, newparent, src.ino)? {
            return Err(Error::Invalid("cannot move a directory into itself".into()));
        }
        // Remove the replaced entry.
        if let Some(d) = dst {
            self.del_entry(&mut st, newparent, newname, &d)?;
            let mut di = self.get_inode(&st, d.ino)?;
            if d.kind == FileKind::Dir {
                di.nlink = 0;
                let mut np = self.get_inode(&st, newparent)?;
                np.nlink -= 1;
                self.put_inode(&mut st, newparent, &np)?;
            } else {
                di.nlink = di.nlink.saturating_sub(1);
            }
            di.ctime = t;
            self.put_inode(&mut st, d.ino, &di)?;
            self.maybe_destroy(&mut st, d.ino, &di)?;
        }
        self.del_entry(&mut st, parent, name, &src)?;
        let mut np = self.get_inode(&st, newparent)?;
        self.add_entry(&mut st, newparent, &mut np, newname, src.ino, src.kind)?;
        if src.kind == FileKind::Dir && parent != newparent {
            np.nlink += 1;
            let mut op = self.get_inode(&st, parent)?;
            op.nlink -= 1;
            op.mtime = t;
            op.ctime = t;
            self.put_inode(&mut st, parent, &op)?;
        } else if parent != newparent {
            let mut op = self.get_inode(&st, parent)?;
            op.mtime = t;
            op.ctime = t;
            self.put_inode(&mut st, parent, &op)?;
        }
        np.mtime = t;
        np.ctime = t;
        self.put_inode(&mut st, newparent, &np)?;
        let mut si = self.get_inode(&st, src.ino)?;
        if si.kind == FileKind::Dir {
            si.parent = newparent;
        }
        si.ctime = t;
        self.put_inode(&mut st, src.ino, &si)?;
        Ok(())
    }

    /// Directory entries after `offset` ("." and ".." first), up to `max`.
    pub fn readdir(&self, ino: u64, offset: u64, max: usize) -> Result<Vec<DirItem>> {
        let st = self.st.read();
        self.readdir_locked(&st, ino, offset, max)
    }

    /// [`Volume::readdir`] with each entry's attributes, read under the same
    /// lock (one consistent listing, and no lock round trip per entry). An
    /// entry whose inode cannot be read is left out, as a concurrent unlink
    /// would have removed it.
    pub fn readdir_plus(&self, ino: u64, offset: u64, max: usize) -> Result<Vec<(DirItem, Attr)>> {
        let st = self.st.read();
        let items = self.readdir_locked(&st, ino, offset, max)?;
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            match self.get_inode(&st, it.ino) {
                Ok(i) => {
                    let a = self.attr(it.ino, i);
                    out.push((it, a));
                }
                Err(e) => log::debug!("readdir of directory {ino}: entry {}: {e}", it.ino),
            }
        }
        Ok(out)
    }

    fn readdir_locked(
        &self,
        st: &State,
        ino: u64,
        offset: u64,
        max: usize,
    ) -> Result<Vec<DirItem>> {
        let i = self.dir_inode(st, ino)?;
        let mut out = Vec::new();
        if offset < 1 {
            out.push(DirItem {
                ino,
                offset: 1,
                kind: FileKind::Dir,
                name: b".".to_vec(),
            });
        }
        if offset < 2 {
            out.push(DirItem {
                ino: i.parent.max(1),
                offset: 2,
                kind: FileKind::Dir,
                name: b"..".to_vec(),
            });
        }
        let start = offset.max(2) + 1;
        let n = self.nodes();
        let mut names = Vec::new();
        st.tree.range(
            n,
            &key(ino, tag::DIRCOOKIE, &start.to_be_bytes()),
            &key(ino, tag::DIRCOOKIE + 1, &[]),
            &mut |k, v| {
                let cookie = key_u64(k).ok_or_else(|| {
                    Error::integrity(format!("directory {ino}"), "malformed readdir record key")
                })?;
                names.push((cookie, v.to_vec()));
                Ok(names.len() + out.len() < max)
            },
        )?;
        for (cookie, name) in names {
            let e = self.get_entry(st, ino, &name)?.ok_or_else(|| {
                Error::integrity(format!("directory {ino}"), "cookie without entry")
            })?;
            out.push(DirItem {
                ino: e.ino,
                offset: cookie,
                kind: e.kind,
                name,
            });
        }
        Ok(out)
    }

    // ----- attributes ---------------------------------------------------------

    pub fn setattr(&self, ino: u64, s: &SetAttr) -> Result<Attr> {
        self.writable()?;
        let mut st = self.st.write();
        let mut i = self.get_inode(&st, ino)?;
        let t = now();
        if let Some(size) = s.size {
            if i.kind == FileKind::Dir {
                return Err(Error::IsDir);
            }
            if i.kind != FileKind::File {
                return Err(Error::Invalid("truncate of a special file".into()));
            }
            self.truncate_locked(&mut st, ino, &mut i, size)?;
            i.mtime = t;
        }
        if let Some(m) = s.mode {
            i.perm = m & 0o7777;
        }
        if s.uid.is_some() || s.gid.is_some() {
            if let Some(u) = s.uid {
                i.uid = u;
            }
            if let Some(g) = s.gid {
                i.gid = g;
            }
            // As local filesystems do: a change of owner drops set-id bits of files.
            if s.mode.is_none() && i.kind == FileKind::File {
                i.perm &= !crate::sys::S_ISUID;
                if i.perm & 0o010 != 0 {
                    i.perm &= !crate::sys::S_ISGID;
                }
            }
        }
        match s.atime {
            Some(TimeSet::Now) => i.atime = t,
            Some(TimeSet::At(x)) => i.atime = x,
            None => {}
        }
        match s.mtime {
            Some(TimeSet::Now) => i.mtime = t,
            Some(TimeSet::At(x)) => i.mtime = x,
            None => {}
        }
        i.ctime = s.ctime.unwrap_or(t);
        self.put_inode(&mut st, ino, &i)?;
        Ok(self.attr(ino, i))
    }

    /// Drops set-user-id (and group-executable set-group-id) after a write by a non-owner.
    pub fn kill_suid(&self, ino: u64) -> Result<()> {
        self.writable()?;
        let mut st = self.st.write();
        let mut i = self.get_inode(&st, ino)?;
        let before = i.perm;
        i.perm &= !crate::sys::S_ISUID;
        if i.perm & 0o010 != 0 {
            i.perm &= !crate::sys::S_ISGID;
        }
        // File capabilities go with the set-ID bits (the kernel's ATTR_KILL_PRIV).
        let caps = key(ino, tag::XATTR, SECURITY_CAPABILITY);
        let had_caps = st.tree.get(self.nodes(), &caps)?.is_some();
        if had_caps {
            st.tree.remove(self.nodes(), &caps)?;
            st.changed = true;
        }
        if i.perm != before || had_caps {
            i.ctime = now();
            self.put_inode(&mut st, ino, &i)?;
        }
        Ok(())
    }
}
