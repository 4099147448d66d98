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
        #[cfg(feature = "test-hooks")]
        if name == super::WAIT_XATTR || name == super::RELEASE_XATTR {
            drop(st);
            return hooks::wait_or_release(name == super::WAIT_XATTR);
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

/// The WAIT/RELEASE xattr pair (`test-hooks` only).
#[cfg(feature = "test-hooks")]
mod hooks {
    use std::sync::{Condvar, Mutex};
    use std::time::{Duration, Instant};

    use crate::error::{Error, Result};

    /// (a wait is under way, it was released)
    static STATE: Mutex<(bool, bool)> = Mutex::new((false, false));
    static CV: Condvar = Condvar::new();

    pub(super) fn wait_or_release(wait: bool) -> Result<Vec<u8>> {
        let mut g = STATE.lock().unwrap_or_else(|e| e.into_inner());
        if !wait {
            if !g.0 {
                return Err(Error::NoXattr);
            }
            g.1 = true;
            CV.notify_all();
            return Ok(b"released".to_vec());
        }
        *g = (true, false);
        let end = Instant::now() + Duration::from_secs(120);
        while !g.1 {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                *g = (false, false);
                return Err(Error::NoXattr);
            }
            g = CV
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *g = (false, false);
        Ok(b"released".to_vec())
    }
}
