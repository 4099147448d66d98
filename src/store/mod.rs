//! Storage backends: the only place the engine touches the backing store.
//!
//! Names are relative paths inside a volume directory (`kmsfs.root`,
//! `seg/0000000000000001.seg`). The engine's durability contract is written in
//! terms of this trait: file contents are durable after `sync(name)`, and
//! creations, renames and removals inside a directory after `sync_dir(dir)`.
//! `MemStorage` implements exactly that contract (and nothing more), records
//! every mutating call, and can "crash" at any of them, so tests can prove the
//! engine is consistent after a power loss at every write or sync point.

use std::io;

mod direct_buf;
mod fs;
mod mem;
pub mod object;

pub use direct_buf::AlignedBuf;
pub use fs::FsStorage;
pub use mem::{MemStorage, Op};
pub use object::{ObjectConfig, ObjectStorage};

pub trait Storage: Send + Sync {
    /// Reads a whole file.
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Reads exactly `buf.len()` bytes at `offset` (UnexpectedEof when short).
    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Reads exactly `len` bytes at `offset` into a new buffer.
    fn read_at_vec(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_at(name, offset, &mut v)?;
        Ok(v)
    }
    /// Reads exactly `len` bytes at `offset` that the caller reads once and
    /// does not expect to read again soon (a large streaming read whose
    /// plaintext the kernel's page cache keeps), and hands them to `f`: a
    /// backend may go around its own cache and lend a buffer of its own (the
    /// bytes are valid only during the call).
    fn read_at_once(
        &self,
        name: &str,
        offset: u64,
        len: usize,
        f: &mut dyn FnMut(&[u8]),
    ) -> io::Result<()> {
        f(&self.read_at_vec(name, offset, len)?);
        Ok(())
    }
    fn len(&self, name: &str) -> io::Result<u64>;
    fn exists(&self, name: &str) -> bool {
        self.len(name).is_ok()
    }
    /// Creates or replaces `name` with `data` (not durable until synced).
    fn write_file(&self, name: &str, data: &[u8]) -> io::Result<()>;
    /// Appends to `name`, creating it if needed.
    fn append(&self, name: &str, data: &[u8]) -> io::Result<()>;
    /// Writes `data` at `offset` of `name`, creating it if needed (a gap
    /// before `offset` reads as zeros). Only `kmsfs receive` uses it, to put
    /// records at the places their pointers name.
    fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()>;
    fn sync(&self, name: &str) -> io::Result<()>;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creations, renames and removals in `dir` ("" is the top) durable.
    fn sync_dir(&self, dir: &str) -> io::Result<()>;
    fn create_dir(&self, dir: &str) -> io::Result<()>;
    /// File names (not paths) in `dir`.
    fn list(&self, dir: &str) -> io::Result<Vec<String>>;
    /// (total bytes, free bytes) of the backing store.
    fn space(&self) -> io::Result<(u64, u64)>;
    /// Human-readable location, for messages.
    fn describe(&self) -> String;
    /// Takes the single-writer lock of the volume; the guard holds it until dropped.
    /// Fails with `WouldBlock` (and the holder's description) when another process has it.
    fn lock_exclusive(&self) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        Ok(Box::new(()))
    }
    /// Hint: start writing `len` bytes at `offset` of `name` to the device now,
    /// without waiting (so a later sync has little left to do). No durability
    /// promise; the default does nothing.
    fn start_writeback(&self, _name: &str, _offset: u64, _len: u64) {}
    /// Hint: reserve room for `len` bytes of `name` from `offset` without
    /// changing its length, so appends there cost the file system less (ext4
    /// then skips its delayed allocation of every block). The default does
    /// nothing; nothing may depend on it.
    fn preallocate(&self, _name: &str, _offset: u64, _len: u64) {}
    /// Hint: give back room reserved past the end of `name` by
    /// [`Storage::preallocate`] (the file's length and bytes do not change).
    fn release_tail(&self, _name: &str) {}
    /// Read-only openers (snapshot mounts, info, clone) hold this shared lock,
    /// taken before they read the root record.
    fn lock_readers_shared(&self) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        Ok(Box::new(()))
    }
    /// The cleaner deletes segments only while it holds this (no reader can be
    /// using an older root then); None when readers are present.
    fn try_lock_readers_exclusive(
        &self,
    ) -> io::Result<Option<Box<dyn std::any::Any + Send + Sync>>> {
        Ok(Some(Box::new(())))
    }
    /// Publishes a reader pin (see `docs/FORMAT.md`): creates `name` (a
    /// [`PIN_PREFIX`] name in the volume directory) holding `data`, and holds
    /// it (`FsStorage`: an exclusive flock on it) until the returned guard is
    /// dropped, which removes it. Readers call it under the shared readers
    /// lock, so the cleaner (under the exclusive one) never sees half a pin.
    fn create_pin(
        &self,
        _name: &str,
        _data: &[u8],
    ) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        Ok(Box::new(()))
    }
    /// Every reader pin in the volume directory, with whether its publisher
    /// still holds it (a pin nobody holds was left by a reader that died).
    fn list_pins(&self) -> io::Result<Vec<PinFile>> {
        Ok(Vec::new())
    }
    /// Replaces `name` with `data` durably and atomically, through the
    /// temporary name `tmp`: after a crash either the old or the new contents
    /// are there. The default is the file-system sequence (write `tmp`, sync
    /// it, rename it over `name`, sync the directory); an object store puts
    /// the object with a condition instead (the version it last saw, or "does
    /// not exist yet"), so a writer that lost its place can never replace what
    /// another writer committed (`ErrorKind::AlreadyExists` or
    /// `ErrorKind::PermissionDenied` then, with the reason).
    fn replace_durably(&self, tmp: &str, name: &str, data: &[u8]) -> Result<(), ReplaceError> {
        self.write_file(tmp, data)
            .map_err(|e| ReplaceError(tmp.to_string(), e))?;
        self.sync(tmp)
            .map_err(|e| ReplaceError(tmp.to_string(), e))?;
        self.rename(tmp, name)
            .map_err(|e| ReplaceError(name.to_string(), e))?;
        self.sync_dir("")
            .map_err(|e| ReplaceError("volume directory".to_string(), e))
    }
    /// How many segment ids a writer that has just opened must skip past the
    /// highest it sees: 0, except where the previous writer may still be
    /// running unseen (an object store whose writer lease was taken over: the
    /// fenced writer may upload the segment it had open, or a next one, until
    /// it learns it is fenced). Never reusing an id keeps its stray writes
    /// apart from the new writer's.
    fn segment_id_gap(&self) -> u64 {
        0
    }
    /// For a storage whose commits reach the backing store after
    /// [`Storage::replace_durably`] returns (an object store with a
    /// write-back journal): calls `f` with the generation of each root record
    /// once the store holds it, and returns true. The caller then raises the
    /// volume's rollback mark from `f` rather than after each commit, so the
    /// mark never runs ahead of what the store holds. False (the default):
    /// commits are in the backing store when they return.
    fn set_commit_listener(&self, _f: CommitListener) -> bool {
        false
    }
    /// Removes a pin nobody holds any more.
    fn remove_pin(&self, name: &str) -> io::Result<()> {
        self.remove(name)
    }
}

/// Called with the generation of each root record the store took
/// ([`Storage::set_commit_listener`]).
pub type CommitListener = Box<dyn Fn(u64) + Send + Sync>;

/// A failed [`Storage::replace_durably`]: what failed (a name, for
/// messages) and why.
#[derive(Debug)]
pub struct ReplaceError(pub String, pub io::Error);

/// Names of reader pin files start with this (then 32 hex digits).
pub const PIN_PREFIX: &str = "kmsfs.pin.";

/// A reader pin as found by [`Storage::list_pins`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinFile {
    pub name: String,
    /// Its contents (at most [`PIN_MAX_LEN`] bytes are read).
    pub data: Vec<u8>,
    /// Whether the reader that published it still holds it.
    pub held: bool,
}

/// Pins longer than this are not read further (a pin names a few roots).
pub const PIN_MAX_LEN: u64 = 1 << 20;

/// Takes the writer lock, turning contention into a clear error.
pub fn lock_volume(s: &dyn Storage) -> crate::error::Result<Box<dyn std::any::Any + Send + Sync>> {
    s.lock_exclusive().map_err(|e| {
        if e.kind() == io::ErrorKind::WouldBlock {
            crate::error::Error::Locked(format!("{}: {e}", s.describe()))
        } else if e.kind() == io::ErrorKind::InvalidData {
            // A damaged write-back journal (object stores).
            crate::error::Error::integrity(s.describe(), e)
        } else {
            crate::error::Error::io(crate::format::LOCK_FILE, e)
        }
    })
}
