//! Extended attributes (POSIX ACLs are stored as such, opaque).

use super::*;

impl Volume {
    // ----- xattrs ---------------------------------------------------------------

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        self.writable()?;
        #[cfg(feature = "test-hooks")]
        if name == FAULT_XATTR {
            // A bug in the middle of a change: state lock held, tree touched.
            let mut st = self.st.write();
            st.changed = true;
            panic!(
                "fault injection: setxattr {}",
                String::from_utf8_lossy(value)
            );
        }
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(if name.is_empty() {
                Error::Invalid("empty xattr name".into())
            } else {
                Error::NameTooLong
            });
        }
        if value.len() > format::XATTR_VALUE_MAX {
            return Err(Error::TooBig(format!(
                "xattr values are limited to {} bytes",
                format::XATTR_VALUE_MAX
            )));
        }
        let mut st = self.st.write();
        let mut i = self.get_inode(&st, ino)?;
        let k = key(ino, tag::XATTR, name);
        let exists = st.tree.get(self.nodes(), &k)?.is_some();
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(Error::Exists);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(Error::NoXattr);
        }
        let v = if value.len() > format::XATTR_INLINE_MAX {
            XattrValue::Block(self.io.write_block(BlockKind::Xattr, value)?)
        } else {
            XattrValue::Inline(value.to_vec())
        };
        st.tree.insert(self.nodes(), &k, v.encode())?;
        i.ctime = now();
        self.put_inode(&mut st, ino, &i)?;
        Ok(())
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        let st = self.st.read();
        #[cfg(feature = "test-hooks")]
        if name == FAULT_XATTR {
            panic!("fault injection: getxattr on inode {ino}");
        }
        self.get_inode(&st, ino)?;
        let v = st
            .tree
            .get(self.nodes(), &key(ino, tag::XATTR, name))?
            .ok_or(Error::NoXattr)?;
        match XattrValue::decode(&v)
            .map_err(|e| Error::integrity(format!("inode {ino} xattr"), e))?
        {
            XattrValue::Inline(v) => Ok(v),
            XattrValue::Block(p) => self.io.read_block(&p, BlockKind::Xattr),
        }
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>> {
        let st = self.st.read();
        self.get_inode(&st, ino)?;
        Ok(st
            .tree
            .collect(
                self.nodes(),
                &key(ino, tag::XATTR, &[]),
                &key(ino, tag::XATTR + 1, &[]),
                usize::MAX,
            )?
            .into_iter()
            .map(|(k, _)| k[9..].to_vec())
            .collect())
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        self.writable()?;
        let mut st = self.st.write();
        let mut i = self.get_inode(&st, ino)?;
        if st
            .tree
            .remove(self.nodes(), &key(ino, tag::XATTR, name))?
            .is_none()
        {
            return Err(Error::NoXattr);
        }
        i.ctime = now();
        self.put_inode(&mut st, ino, &i)?;
        Ok(())
    }

    /// Removes the file capabilities (`security.capability`) of `ino`, as the
    /// kernel does on every write to a file that has them; nothing to do (and
    /// no change) for the usual file without.
    pub fn drop_capability(&self, ino: u64) -> Result<()> {
        let k = key(ino, tag::XATTR, b"security.capability");
        if self.read_only || self.st.read().tree.get(self.nodes(), &k)?.is_none() {
            return Ok(());
        }
        match self.removexattr(ino, b"security.capability") {
            Ok(()) | Err(Error::NoXattr) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
