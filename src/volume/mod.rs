//! The filesystem core: a POSIX tree in sealed blocks. Knows nothing of FUSE.
//!
//! State lives in one copy-on-write tree (see `tree`) keyed by inode number and
//! a tag (`format::tag`): inodes, directory entries (by name and by readdir
//! cookie), file block maps, xattrs and symlink targets. Writes go to an
//! in-memory dirty-block map; `commit` seals dirty data, writes dirty tree nodes,
//! syncs the segments and then replaces the root record atomically. Until the
//! root record is replaced, a crash leaves the previous commit in force.
//!
//! Concurrency: one `RwLock` over the mutable state. Readers (lookup, getattr,
//! read, readdir) share it; the block and node caches they consult are sharded,
//! so reads of cached blocks run in parallel.
//!
//! Files: this one opens volumes (header, root slots, rollback mark) and holds
//! the helpers every operation shares (inode and entry access, destroy);
//! `namespace` (lookup, create, links, unlink, rename, readdir, setattr);
//! `file_data` reads and writes file contents, with `fragments` (small
//! overwrites); `xattr`; `commit` (root slots, marks, idleness); `cleaner`;
//! `snapshot`; `send` and `receive` (raw streams); `fsck` and `repair`;
//! `blocks` (sealed records, segments, node mirrors) and `tree` (the
//! copy-on-write B+tree) below them.

pub mod blocks;
mod cleaner;
mod commit;
mod file_data;
mod fragments;
pub mod fsck;
mod header;
mod namespace;
pub mod receive;
pub mod repair;
pub mod send;
pub mod snapshot;
pub mod tree;
mod xattr;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::cache::{CacheStats, Plain};
use crate::crypto::{self, CipherKind, Sealer, SecretKey, derive_subkey, labels};
use crate::error::{Error, Result};
use crate::format::{
    self, BlockKind, BlockPtr, DirEntry, FileKind, FragValue, Header, Inode, RootPayload,
    SnapshotRecord, Timestamp, XattrValue, key, tag,
};
use crate::kms::{EncryptionContext, Kms, WrappedKey};
use crate::store::Storage;
use blocks::BlockIo;
use tree::{NodeStore, Tree};

pub use header::RewrapReport;

pub const ROOT_INO: u64 = 1;
/// With the `test-hooks` feature (tests only, never in a release
/// build), getting or setting this xattr panics inside the core, so tests can
/// check that a bug fails one request and loses nothing.
#[cfg(feature = "test-hooks")]
pub const FAULT_XATTR: &[u8] = b"user.kmsfs-test-hooks";
/// With `test-hooks`: a get of this xattr waits (up to two minutes) until a get of
/// [`RELEASE_XATTR`] arrives, then returns `released`; tests use the pair to hold
/// a request thread inside a request that only another request can end.
#[cfg(feature = "test-hooks")]
pub const WAIT_XATTR: &[u8] = b"user.kmsfs-test-wait";
/// With `test-hooks`: ends a [`WAIT_XATTR`] get under way (returns `released`);
/// with none under way there is no such xattr.
#[cfg(feature = "test-hooks")]
pub const RELEASE_XATTR: &[u8] = b"user.kmsfs-test-release";
pub const NAME_MAX: usize = 255;
pub const SYMLINK_MAX: usize = 4095;
/// Largest file: 16 TiB, ext4's limit with 4 KiB blocks, so that anything
/// copied off ext4 fits and a typo (`truncate -s 999999999999999`) fails at
/// once with EFBIG instead of creating a sparse monster. Enforced the same way
/// by truncate, write, fallocate and copy_file_range (which arrives as writes).
pub const MAX_FILE_SIZE: u64 = 16 << 40;
/// Reads at least this large decrypt whole blocks straight into the reply.
const DIRECT_READ_MIN: usize = 128 << 10;
/// Buffered (dirty) data beyond this is sealed and appended (not committed)
/// to bound memory: the cache budget, within [4 MiB, 64 MiB].
pub fn dirty_limit(cache_bytes: usize) -> usize {
    cache_bytes.clamp(4 << 20, 64 << 20)
}
/// Free space kept back from file data, so that metadata commits and the
/// cleaner can still run on a full backing store (a log-structured store needs
/// room to write before it can free): room to move one mostly-dead segment's
/// live data, but never more than 1/64 of the backing store (at least 1 MiB),
/// so a small store does not lose tens of MiB; plus 1 MiB for metadata.
pub fn reserve_bytes(segment_size: u32, total_bytes: u64) -> u64 {
    let cleaner = (segment_size as u64)
        .min(16 << 20)
        .min((total_bytes / 64).max(1 << 20));
    cleaner + (1 << 20)
}

#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub cipher: CipherKind,
    pub block_size: u32,
    pub segment_size: u32,
    /// CMK id or alias; None = the keystore's service key.
    pub cmk: Option<String>,
}

impl CreateOptions {
    /// Checks the sizes (the same rules `init` applies).
    pub fn check(&self) -> Result<()> {
        if !(format::MIN_BLOCK_SIZE..=format::MAX_BLOCK_SIZE).contains(&self.block_size)
            || !self.block_size.is_power_of_two()
        {
            return Err(Error::Invalid(format!(
                "block size {} must be a power of two from 4 KiB to 1 MiB (4K, 8K, ... 1M)",
                self.block_size
            )));
        }
        if !(format::MIN_SEGMENT_SIZE..=format::MAX_SEGMENT_SIZE).contains(&self.segment_size)
            || self.segment_size < self.block_size.saturating_mul(2)
        {
            return Err(Error::Invalid(format!(
                "segment size {} must be 1 MiB to 1 GiB and at least two blocks",
                self.segment_size
            )));
        }
        Ok(())
    }
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            cipher: CipherKind::Aes256GcmSiv,
            block_size: format::DEFAULT_BLOCK_SIZE,
            segment_size: format::DEFAULT_SEGMENT_SIZE,
            cmk: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub read_only: bool,
    pub cache_bytes: usize,
    /// Open this snapshot (read-only) instead of the live tree.
    pub snapshot: Option<String>,
    /// Open even if the volume is older than the generation the KMS recorded
    /// (a deliberate restore from backup); the next commit moves it past the mark.
    pub accept_rollback: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            cache_bytes: 256 << 20,
            snapshot: None,
            accept_rollback: false,
        }
    }
}

/// Attributes of an inode as the mount reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub inode: Inode,
    pub block_size: u32,
}

impl Attr {
    /// Allocated 512-byte sectors, as `du` counts them: stored blocks, but no
    /// more than the size rounded up to 4 KiB, because the last block of a
    /// file is stored only as far as the file reaches (a 100-byte file costs
    /// 4 KiB, not a whole 64 KiB block). Holes cost nothing.
    pub fn sectors(&self) -> u64 {
        let stored = self.inode.blocks.saturating_mul(self.block_size as u64);
        let reach = self.inode.size.div_ceil(4096).saturating_mul(4096);
        stored.min(reach) / 512
    }
    pub fn mode(&self) -> u32 {
        self.inode.kind.mode_bits() | self.inode.perm
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(Timestamp),
}

#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<Timestamp>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirItem {
    pub ino: u64,
    /// Offset to resume after this entry.
    pub offset: u64,
    pub kind: FileKind,
    pub name: Vec<u8>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatFs {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub stored_bytes: u64,
    pub block_size: u32,
    pub files: u64,
    pub name_max: u32,
}

/// Where a clean stands (see [`Volume::clean_with_progress`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CleanProgress {
    Scanning { done: u64, total: u64 },
    Moving { done: u64, total: u64 },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CleanStats {
    pub segments_removed: u64,
    pub blocks_moved: u64,
    pub bytes_moved: u64,
    pub bytes_freed: u64,
}

/// See `Volume::set_write_hook`.
pub type WriteHook = Arc<dyn Fn() + Send + Sync>;
/// See `Volume::set_clean_hook`.
pub type CleanHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Blocks waiting to be sealed (see [`fragments::DirtyBlock`]).
/// Shared with a write-back that seals them outside the volume lock.
type DirtyMap = BTreeMap<(u64, u64), Arc<fragments::DirtyBlock>>;

struct State {
    tree: Tree,
    next_ino: u64,
    generation: u64,
    snapshots: Vec<SnapshotRecord>,
    dirty: DirtyMap,
    dirty_bytes: usize,
    /// Open handles per inode (unlinked inodes live until the last close).
    open: HashMap<u64, u32>,
    changed: bool,
    /// Which root slot ([`ROOT_SLOTS`]) holds the newest commit; the next
    /// commit goes to the other one.
    newest_slot: usize,
    /// The trees of the commit in the other slot (the previous one): the
    /// fallback if the newest slot is damaged, so the cleaner keeps them.
    previous: Vec<BlockPtr>,
    /// The trees of the newest commit (they become `previous` at the next).
    committed: Vec<BlockPtr>,
}

pub struct Volume {
    io: Arc<BlockIo>,
    st: RwLock<State>,
    header: Header,
    root_sealer: Sealer,
    /// Authenticates the header copies (fsck re-checks both).
    header_mac_key: SecretKey,
    read_only: bool,
    snapshot: Option<String>,
    poisoned: AtomicBool,
    /// Set when an operation that changes the volume panicked (a bug): the
    /// in-memory state may be half-updated, so no further changes are taken.
    degraded: parking_lot::Mutex<Option<String>>,
    /// See [`dirty_limit`].
    dirty_max: usize,
    /// Where each commit's generation is recorded (the rollback high-water
    /// mark), before the commit returns: a commit reported durable is covered.
    mark_sink: parking_lot::Mutex<Option<Arc<dyn Kms>>>,
    /// The header after a rewrap (its wrap fields changed); `header` keeps the rest.
    rewrapped: parking_lot::Mutex<Option<Header>>,
    /// The last mark could not be recorded (logged once per failure streak).
    mark_failing: AtomicBool,
    /// When the last changing operation started (ms since `opened`), for the
    /// committer's idle detection.
    last_change_ms: AtomicU64,
    opened: Instant,
    /// A write was refused for lack of space since the last clean.
    space_pressure: AtomicBool,
    /// When the last data read started (ms since `opened`): with
    /// `last_change_ms`, how long the volume has been quiet (the idle merge).
    last_access_ms: AtomicU64,
    /// Blocks seen carrying fragments (written this session or read), for the
    /// idle merge ([`Volume::merge_idle_fragments`]).
    frag_blocks: parking_lot::Mutex<std::collections::BTreeSet<(u64, u64)>>,
    /// Blocks were dropped (deletes, truncates, punches) since the last clean.
    freed_since_clean: AtomicBool,
    /// Held shared by a write from appending its whole blocks until they are
    /// in the tree, and exclusively by the cleaner: records appended but not
    /// yet referenced must not look dead to it.
    append_gate: parking_lot::RwLock<()>,
    /// Test hook: runs in `write` between appending whole blocks and recording
    /// them, so tests can make other operations happen exactly there.
    write_hook: parking_lot::Mutex<Option<WriteHook>>,
    /// Test hook: runs in `write_back` between sealing a batch (without the
    /// volume lock) and recording it.
    write_back_hook: parking_lot::Mutex<Option<WriteHook>>,
    /// One cleaner (or repair) at a time; see `cleaner`.
    clean_lock: parking_lot::Mutex<()>,
    /// One write-back ([`Volume::write_back`]) at a time, and a commit
    /// waits for it rather than sealing the same buffers again.
    flush_lock: parking_lot::Mutex<()>,
    clean_hook: parking_lot::Mutex<Option<CleanHook>>,
    /// The writer lock, or a reader's pin.
    _lock: Option<Box<dyn std::any::Any + Send + Sync>>,
}

/// The time stamped on changes: the kernel's coarse clock (the current tick),
/// which is what the kernel itself stamps (`current_time()`) on local file
/// systems and, under FUSE's write-back cache, on the files of this mount. A
/// new file's times then equal the kernel's clock when the first write(2)
/// follows within the same tick, so the kernel does not mark the inode dirty
/// for a time update and sends no SETATTR of mtime and ctime when it writes
/// the file back: one round trip fewer per small file an untar creates
/// (docs/PERFORMANCE.md). Where there is no coarse clock: the precise one.
fn now() -> Timestamp {
    match crate::sys::coarse_realtime() {
        Some((secs, nanos)) => Timestamp { secs, nanos },
        None => Timestamp::now(),
    }
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Error::Invalid("bad file name".into()));
    }
    if name.len() > NAME_MAX {
        return Err(Error::NameTooLong);
    }
    Ok(())
}

fn ctx_for(volume_id: &[u8; 16]) -> EncryptionContext {
    EncryptionContext::for_volume(volume_id)
}

/// Reads and authenticates a header copy; returns it with the unwrapped DK.
fn read_header(storage: &dyn Storage, kms: &dyn Kms, name: &str) -> Result<(Header, SecretKey)> {
    let b = storage.read(name).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Format(format!(
                "{} is not a kmsfs volume ({name} is missing); create one with `kmsfs init`",
                storage.describe()
            ))
        } else {
            Error::io(name, e)
        }
    })?;
    if let Ok(v) = Header::peek_version(&b)
        && v > format::VOLUME_VERSION
    {
        return Err(Error::Format(format!(
            "volume format version {v} is newer than this kmsfs supports (version {}); upgrade kmsfs to open it",
            format::VOLUME_VERSION
        )));
    }
    let h = Header::decode(&b).map_err(|e| Error::integrity(format!("volume header {name}"), e))?;
    let wrapped = WrappedKey {
        cmk_id: h.cmk_id.clone(),
        cmk_version: h.cmk_version,
        ciphertext: h.wrapped_dk.clone(),
    };
    let dk = kms.decrypt(&wrapped, &ctx_for(&h.key_domain))?;
    let mac_key = derive_subkey(&dk, labels::HEADER_MAC);
    let body = &b[..format::HEADER_LEN - format::HEADER_MAC_LEN];
    let mac = crypto::hmac_sha256(&mac_key, body);
    if !crypto::ct_eq(&mac, &b[format::HEADER_LEN - format::HEADER_MAC_LEN..]) {
        return Err(Error::integrity(
            format!("volume header {name}"),
            "header MAC does not verify",
        ));
    }
    Ok((h, dk))
}

fn sign_header(h: &Header, dk: &SecretKey) -> Vec<u8> {
    sign_header_with(h, &derive_subkey(dk, labels::HEADER_MAC))
}

/// The header's bytes with its MAC under the `kmsfs v1 header mac` subkey.
fn sign_header_with(h: &Header, mac_key: &SecretKey) -> Vec<u8> {
    let mut b = h.encode_unsigned();
    let mac = crypto::hmac_sha256(mac_key, &b[..format::HEADER_LEN - format::HEADER_MAC_LEN]);
    let n = b.len();
    b[n - format::HEADER_MAC_LEN..].copy_from_slice(&mac);
    b
}

/// The two root record slots. A commit replaces the slot that does not hold
/// the newest commit, so the newest stays intact while the other is being
/// written, and one damaged or lost root file costs at most the last commit.
pub const ROOT_SLOTS: [&str; 2] = [format::ROOT_FILE, "kmsfs.root.1"];

/// One root slot as read from the backing store (not yet authenticated).
struct RootSlot {
    index: usize,
    bytes: Vec<u8>,
    /// Volume id and generation from the plaintext prefix (None: unparsable).
    vid: Option<[u8; 16]>,
    generation: u64,
}

/// Reads the root slots that exist, newest (claimed) generation first. An
/// unreadable or unparsable slot is kept (it sorts last) so that opening can
/// say what it skipped; no slot at all is an error.
fn read_root_slots(storage: &dyn Storage) -> Result<Vec<RootSlot>> {
    let mut slots = Vec::new();
    let mut missing = 0;
    for (index, name) in ROOT_SLOTS.iter().enumerate() {
        match storage.read(name) {
            Ok(bytes) => {
                let (vid, generation) = match format::split_root(&bytes) {
                    Ok((vid, g, _, _)) => (Some(vid), g),
                    Err(_) => (None, 0),
                };
                slots.push(RootSlot {
                    index,
                    bytes,
                    vid,
                    generation,
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing += 1,
            Err(e) => return Err(Error::io(*name, e)),
        }
    }
    if missing == ROOT_SLOTS.len() {
        return Err(Error::Format(format!(
            "{}: the root record ({}) is missing: the volume was never completely created, or the \
             files were deleted. Run `kmsfs fsck` for details",
            storage.describe(),
            ROOT_SLOTS.join(", ")
        )));
    }
    slots.sort_by_key(|s| {
        (
            std::cmp::Reverse(s.vid.is_some()),
            std::cmp::Reverse(s.generation),
        )
    });
    Ok(slots)
}

fn write_durably(storage: &dyn Storage, name: &str, data: &[u8]) -> Result<()> {
    write_durably_via(storage, &format!("{name}.tmp"), name, data)
}

/// As [`write_durably`], through the temporary file `tmp`.
fn write_durably_via(storage: &dyn Storage, tmp: &str, name: &str, data: &[u8]) -> Result<()> {
    storage
        .replace_durably(tmp, name, data)
        .map_err(|crate::store::ReplaceError(what, e)| Error::io(what, e))
}

impl Volume {
    /// Creates a new, empty volume in an empty backing store.
    pub fn init(
        storage: Arc<dyn Storage>,
        kms: &dyn Kms,
        opts: &CreateOptions,
    ) -> Result<[u8; 16]> {
        if storage.exists(format::HEADER_FILE) || ROOT_SLOTS.iter().any(|n| storage.exists(n)) {
            return Err(Error::AlreadyExists(format!(
                "{} already holds a kmsfs volume; choose an empty directory",
                storage.describe()
            )));
        }
        opts.check()?;
        let volume_id: [u8; 16] = crypto::random_array();
        let (dk, wrapped) = kms.generate_data_key(opts.cmk.as_deref(), &ctx_for(&volume_id))?;
        let header = Header {
            version: format::VOLUME_VERSION,
            volume_id,
            key_domain: volume_id,
            cipher: opts.cipher as u8,
            block_size: opts.block_size,
            segment_size: opts.segment_size,
            created: now().secs,
            cmk_id: wrapped.cmk_id.clone(),
            cmk_version: wrapped.cmk_version,
            wrapped_dk: wrapped.ciphertext.clone(),
        };
        let hb = sign_header(&header, &dk);
        storage
            .create_dir(format::SEGMENT_DIR)
            .map_err(|e| Error::io("segment directory", e))?;
        write_durably(&*storage, format::HEADER_BACKUP_FILE, &hb)?;
        write_durably(&*storage, format::HEADER_FILE, &hb)?;
        let vol = Volume::assemble(
            storage,
            header,
            dk,
            None,
            false,
            OpenOptions::default(),
            None,
        )?;
        {
            let mut st = vol.st.write();
            let t = now();
            let root = empty_dir(0o755, ROOT_INO, t);
            vol.put_inode(&mut st, ROOT_INO, &root)?;
            st.next_ino = ROOT_INO + 1;
        }
        vol.commit()?;
        if let Err(e) = kms.note_volume(&volume_id, &wrapped.cmk_id, &vol.io.storage.describe()) {
            log::warn!("the keystore could not record the new volume under its key: {e}");
        }
        Ok(volume_id)
    }

    /// Opens a volume: authenticates the header, unwraps the DK through the KMS,
    /// authenticates the root record.
    pub fn open(storage: Arc<dyn Storage>, kms: &dyn Kms, opts: OpenOptions) -> Result<Volume> {
        let read_only = opts.read_only || opts.snapshot.is_some();
        if !read_only && storage.exists(format::stream::RECEIVED_FILE) {
            return Err(Error::ReadOnly(format!(
                "{} was made by `kmsfs receive` and takes further streams, so it only opens read-only: mount it with --read-only, or make a writable volume of a snapshot with `kmsfs clone`",
                storage.describe()
            )));
        }
        // Writers lock out other writers. Readers hold the readers lock
        // shared from before they read the root until their pin (the roots
        // they hold) is published, so the cleaner never misses one.
        let lock = if read_only {
            storage
                .lock_readers_shared()
                .map_err(|e| Error::io(format::READERS_FILE, e))?
        } else {
            crate::store::lock_volume(&*storage)?
        };
        let primary = read_header(&*storage, kms, format::HEADER_FILE);
        let backup = || read_header(&*storage, kms, format::HEADER_BACKUP_FILE);
        let slots = read_root_slots(&*storage)?;
        let root_vid = slots.iter().find_map(|s| s.vid).ok_or_else(|| {
            Error::integrity(
                "root record",
                format!(
                    "every copy ({}) is damaged; run `kmsfs salvage` on a backup, or restore the \
                     volume directory from one",
                    ROOT_SLOTS.join(", ")
                ),
            )
        })?;
        // Use the primary header unless it is damaged or belongs to another volume.
        let (header, dk, repair) = match primary {
            Ok((h, dk)) if h.volume_id == root_vid => (h, dk, false),
            Ok((h, _)) => match backup() {
                Ok((b, dk)) if b.volume_id == root_vid => {
                    log::warn!(
                        "{}: primary header is from another volume; using the backup",
                        storage.describe()
                    );
                    (b, dk, true)
                }
                _ => {
                    return Err(Error::integrity(
                        "volume header",
                        format!(
                            "the header names volume {} but the root record belongs to volume {}: the header was replaced with another volume's. Restore {} from {}",
                            format::hex(&h.volume_id),
                            format::hex(&root_vid),
                            format::HEADER_FILE,
                            format::HEADER_BACKUP_FILE
                        ),
                    ));
                }
            },
            // The KMS refused the key itself (disabled, pending deletion, deleted, not
            // in this keystore): the backup copy names a key too, and must not be a way
            // around a refusal (after a crash mid-rewrap it may name the previous key).
            Err(e) if matches!(&e, Error::Kms(k) if !matches!(k, crate::kms::KmsError::UnwrapFailed)) =>
            {
                return Err(e);
            }
            Err(e) => match backup() {
                Ok((b, dk)) if b.volume_id == root_vid => {
                    log::warn!(
                        "{}: primary header damaged ({e}); using the backup",
                        storage.describe()
                    );
                    (b, dk, true)
                }
                _ => return Err(e),
            },
        };
        if !read_only {
            // Keep both copies identical and authentic: repair whichever is damaged.
            let hb = sign_header(&header, &dk);
            if repair {
                write_durably(&*storage, format::HEADER_FILE, &hb)?;
            }
            if storage.read(format::HEADER_BACKUP_FILE).ok().as_deref() != Some(&hb[..]) {
                log::warn!(
                    "{}: backup header damaged or missing; rewriting it",
                    storage.describe()
                );
                write_durably(&*storage, format::HEADER_BACKUP_FILE, &hb)?;
            }
        }
        let accept_rollback = opts.accept_rollback;
        // The newest intact commit: a root slot that unseals and whose tree
        // answers for the root directory. A damaged newer slot is skipped, and
        // said so.
        let mut skipped: Vec<(&'static str, u64, String)> = Vec::new();
        let mut chosen: Option<(Volume, usize)> = None;
        for s in &slots {
            let attempt = Volume::assemble(
                storage.clone(),
                header.clone(),
                dk.duplicate(),
                Some(&s.bytes),
                read_only,
                opts.clone(),
                None,
            )
            .and_then(|v| v.getattr(ROOT_INO).map(|_| v));
            match attempt {
                Ok(v) => {
                    chosen = Some((v, s.index));
                    break;
                }
                // Damage skips to the next slot; anything else (an unknown
                // snapshot name, an I/O error) is the answer as it is.
                Err(e @ Error::Integrity { .. }) => {
                    skipped.push((ROOT_SLOTS[s.index], s.generation, e.to_string()))
                }
                Err(e) => return Err(e),
            }
        }
        drop(dk);
        let Some((mut vol, slot)) = chosen else {
            let why: Vec<String> = skipped
                .iter()
                .map(|(name, _, e)| format!("{name}: {e}"))
                .collect();
            return Err(Error::integrity(
                "root record",
                format!(
                    "no intact commit: {}. Run `kmsfs salvage` on a backup, or restore the volume \
                     directory from one",
                    why.join("; ")
                ),
            ));
        };
        // A reader publishes the roots it holds (the cleaner keeps what they
        // need), then leaves the readers lock it held while it opened.
        vol._lock = Some(if read_only {
            let pin = vol.publish_pin()?;
            drop(lock);
            pin
        } else {
            lock
        });
        vol.st.write().newest_slot = slot;
        vol.load_previous_root(&slots, slot);
        let generation = vol.generation();
        for s in slots.iter().filter(|s| s.vid.is_none() && s.index != slot) {
            log::warn!(
                "{}: root record {} is damaged (unreadable); it is rewritten by the next commit",
                vol.io.storage.describe(),
                ROOT_SLOTS[s.index]
            );
        }
        for (name, g, why) in &skipped {
            log::warn!(
                "{}: skipped the commit in {name} (generation {g}): {why}; opened generation \
                 {generation}: the changes of the skipped commit are lost",
                vol.io.storage.describe()
            );
        }
        // Rollback: the KMS keeps the highest generation this volume reached.
        // Falling back over a damaged newest root is not a rollback, but it
        // only ever goes one commit back (an attacker who damages the newest
        // copy gains at most that).
        // A missing slot counts as damaged: every volume written since it was
        // created has both.
        let fell_back = !skipped.is_empty()
            || slots.len() < ROOT_SLOTS.len()
            || slots.iter().any(|s| s.vid.is_none());
        if let Some(mark) = kms.generation_mark(&vol.header.volume_id)?
            && generation < mark
        {
            if fell_back && generation + 1 == mark {
                log::warn!(
                    "{}: the newest commit (generation {mark}) is damaged; continuing from \
                     generation {generation}",
                    vol.io.storage.describe()
                );
                let mut st = vol.st.write();
                st.generation = mark;
                st.changed = true;
            } else if !accept_rollback {
                return Err(Error::Rollback {
                    found: generation,
                    mark,
                });
            } else {
                log::warn!(
                    "{}: accepting a rollback from generation {mark} to {generation}",
                    vol.io.storage.describe()
                );
                let mut st = vol.st.write();
                st.generation = mark;
                st.changed = true;
            }
        } else if fell_back && !read_only {
            // Rewrite the damaged slot at once (the next commit goes there).
            vol.st.write().changed = true;
        }
        if !read_only {
            vol.purge_orphans()?;
            vol.commit()?;
            vol.record_generation(kms)?;
            let h = &vol.header;
            if let Err(e) = kms.note_volume(&h.volume_id, &h.cmk_id, &vol.io.storage.describe()) {
                log::warn!("the keystore could not record where the volume is: {e}");
            }
        }
        Ok(vol)
    }

    fn assemble(
        storage: Arc<dyn Storage>,
        header: Header,
        dk: SecretKey,
        root_bytes: Option<&[u8]>,
        read_only: bool,
        opts: OpenOptions,
        lock: Option<Box<dyn std::any::Any + Send + Sync>>,
    ) -> Result<Volume> {
        let cipher = CipherKind::from_u8(header.cipher).ok_or_else(|| {
            Error::Format(format!(
                "unknown cipher id {} in the volume header",
                header.cipher
            ))
        })?;
        let sealer = Sealer::new(cipher, &derive_subkey(&dk, labels::BLOCK));
        let root_sealer = Sealer::new(cipher, &derive_subkey(&dk, labels::ROOT));
        let header_mac_key = derive_subkey(&dk, labels::HEADER_MAC);
        drop(dk);
        let (payload, generation) = match root_bytes {
            Some(b) => {
                let (vid, generation, prefix, sealed) =
                    format::split_root(b).map_err(|e| Error::integrity("root record", e))?;
                if vid != header.volume_id {
                    return Err(Error::integrity("root record", "belongs to another volume"));
                }
                let plain = root_sealer
                    .open(prefix, sealed)
                    .map_err(|e| Error::integrity("root record", e))?;
                (
                    Some(
                        RootPayload::decode(&plain)
                            .map_err(|e| Error::integrity("root record", e))?,
                    ),
                    generation,
                )
            }
            None => (None, 0),
        };
        // Never reuse a segment id: a crash may have left files the root does not know.
        let mut next_segment = payload.as_ref().map(|p| p.next_segment).unwrap_or(1);
        let mut last_found = None;
        if let Ok(names) = storage.list(format::SEGMENT_DIR) {
            for n in names {
                if let Some(id) = format::parse_segment_file_name(&n) {
                    next_segment = next_segment.max(id + 1);
                    last_found = last_found.max(Some(id));
                }
            }
        }
        next_segment = next_segment.saturating_add(storage.segment_id_gap());
        let io = Arc::new(BlockIo::new(
            storage,
            sealer,
            header.key_domain,
            header.segment_size,
            next_segment,
            opts.cache_bytes,
        ));
        // Room the last session reserved past its last segment's end, if it
        // ended without giving it back (a crash); see blocks.rs.
        if let (Some(id), false) = (last_found, read_only) {
            io.release_tail(id);
        }
        let (tree, next_ino, snapshots) = match &payload {
            None => (Tree::new_empty(), ROOT_INO + 1, Vec::new()),
            Some(p) => {
                let (tree, next_ino) = match &opts.snapshot {
                    None => (Tree::from_ptr(p.tree), p.next_ino),
                    Some(name) => {
                        let s = p.snapshots.iter().find(|s| &s.name == name).ok_or_else(|| {
                            Error::Invalid(format!(
                                "no snapshot named {name:?}; list them with `kmsfs snapshot list`"
                            ))
                        })?;
                        (Tree::from_ptr(s.tree), s.next_ino)
                    }
                };
                // A snapshot opener holds (pins) that snapshot's tree only, so
                // it reads no other: the cleaner may have freed theirs.
                let snapshots = match &opts.snapshot {
                    None => p.snapshots.clone(),
                    Some(_) => Vec::new(),
                };
                (tree, next_ino, snapshots)
            }
        };
        Ok(Volume {
            io,
            st: RwLock::new(State {
                tree,
                next_ino,
                generation,
                snapshots,
                dirty: BTreeMap::new(),
                dirty_bytes: 0,
                open: HashMap::new(),
                changed: false,
                // A new volume's first commit goes to slot 0.
                newest_slot: if payload.is_some() { 0 } else { 1 },
                previous: Vec::new(),
                committed: payload
                    .as_ref()
                    .map(|p| {
                        std::iter::once(p.tree)
                            .chain(p.snapshots.iter().map(|s| s.tree))
                            .collect()
                    })
                    .unwrap_or_default(),
            }),
            header,
            root_sealer,
            header_mac_key,
            read_only,
            snapshot: opts.snapshot,
            poisoned: AtomicBool::new(false),
            degraded: parking_lot::Mutex::new(None),
            dirty_max: dirty_limit(opts.cache_bytes),
            mark_sink: parking_lot::Mutex::new(None),
            rewrapped: parking_lot::Mutex::new(None),
            mark_failing: AtomicBool::new(false),
            last_change_ms: AtomicU64::new(0),
            opened: Instant::now(),
            space_pressure: AtomicBool::new(false),
            last_access_ms: AtomicU64::new(0),
            frag_blocks: parking_lot::Mutex::new(std::collections::BTreeSet::new()),
            freed_since_clean: AtomicBool::new(false),
            append_gate: parking_lot::RwLock::new(()),
            flush_lock: parking_lot::Mutex::new(()),
            write_hook: parking_lot::Mutex::new(None),
            write_back_hook: parking_lot::Mutex::new(None),
            clean_lock: parking_lot::Mutex::new(()),
            clean_hook: parking_lot::Mutex::new(None),
            _lock: lock,
        })
    }

    /// Installs a hook that `write` runs after appending whole blocks and
    /// before recording them (tests use it to race other operations there).
    #[doc(hidden)]
    pub fn set_write_hook(&self, hook: Option<WriteHook>) {
        *self.write_hook.lock() = hook;
    }

    /// Installs a hook that `write_back` runs after sealing and appending a
    /// batch without the volume lock, before recording it (tests use it to
    /// race reads, writes and truncates there).
    #[doc(hidden)]
    pub fn set_write_back_hook(&self, hook: Option<WriteHook>) {
        *self.write_back_hook.lock() = hook;
    }

    pub fn volume_id(&self) -> [u8; 16] {
        self.header.volume_id
    }
    pub fn block_size(&self) -> u32 {
        self.header.block_size
    }
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    pub fn generation(&self) -> u64 {
        self.st.read().generation
    }
    pub fn cache_stats(&self) -> CacheStats {
        self.io.data_cache.stats()
    }
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.io.storage
    }
    pub fn snapshots(&self) -> Vec<SnapshotRecord> {
        self.st.read().snapshots.clone()
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(match &self.snapshot {
                Some(s) => format!("snapshot {s} is read-only"),
                None => "the volume is mounted read-only".into(),
            }));
        }
        self.last_change_ms
            .store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.healthy()
    }

    /// Fails when a bug left the volume degraded or a failed write to the
    /// backing store poisoned it: no more changes then, not even background
    /// ones (which do not count as the user's changes, see `writable`).
    fn healthy(&self) -> Result<()> {
        if let Some(why) = &*self.degraded.lock() {
            return Err(Error::ReadOnly(why.clone()));
        }
        if self.poisoned.load(Ordering::Relaxed) {
            return Err(Error::Io {
                what: "volume".into(),
                source: std::io::Error::other(
                    "an earlier write to the backing store failed; unmount and mount again",
                ),
            });
        }
        Ok(())
    }

    /// What a panic (a bug) caught in operation `op` means for the volume.
    /// A panic in an operation that only reads changed nothing: the request
    /// failed and the volume goes on. One in an operation that changes the
    /// volume may have left the in-memory state half-updated: the volume takes
    /// no further changes (EROFS, with the reason), and commits what it holds,
    /// so that everything acknowledged before the panic is durable.
    pub fn contain_panic(&self, op: &str, mutating: bool, msg: &str) {
        log::error!("internal error (panic) in {op}: {msg}; that request failed with EIO");
        if !mutating || self.read_only {
            return;
        }
        self.mark_degraded(op);
        log::error!(
            "the mount is now read-only; committing what was acknowledged before the error"
        );
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.commit())) {
            Ok(Ok(())) => log::error!(
                "committed (generation {}); unmount, run `kmsfs fsck`, and mount again",
                self.generation()
            ),
            Ok(Err(e)) => log::error!("the commit after the internal error failed: {e}"),
            Err(p) => log::error!(
                "the commit after the internal error panicked too: {}",
                panic_message(&*p)
            ),
        }
    }

    /// Stops taking changes after a panic in changing operation `op`. Meant to
    /// run as early as possible, from a panic hook, before the failed
    /// request's reply goes out: a caller that sees the EIO must already find
    /// the volume read-only.
    pub fn mark_degraded(&self, op: &str) {
        if self.read_only {
            return;
        }
        let mut d = self.degraded.lock();
        if d.is_none() {
            *d = Some(format!(
                "an internal error in {op} made this mount read-only; everything written before \
                 it was committed. Unmount, run `kmsfs fsck VOLUME`, and mount again"
            ));
        }
    }

    /// True once a panic in a changing operation made the mount read-only.
    pub fn is_degraded(&self) -> bool {
        self.degraded.lock().is_some()
    }

    // ----- tree helpers -------------------------------------------------------

    fn nodes(&self) -> &dyn NodeStore {
        &*self.io
    }

    fn get_inode(&self, st: &State, ino: u64) -> Result<Inode> {
        match st.tree.get(self.nodes(), &key(ino, tag::INODE, &[]))? {
            Some(b) => Inode::decode(&b).map_err(|e| Error::integrity(format!("inode {ino}"), e)),
            None => Err(Error::NotFound),
        }
    }

    fn put_inode(&self, st: &mut State, ino: u64, i: &Inode) -> Result<()> {
        st.tree
            .insert(self.nodes(), &key(ino, tag::INODE, &[]), i.encode())?;
        st.changed = true;
        Ok(())
    }

    fn attr(&self, ino: u64, inode: Inode) -> Attr {
        Attr {
            ino,
            inode,
            block_size: self.header.block_size,
        }
    }

    fn get_entry(&self, st: &State, parent: u64, name: &[u8]) -> Result<Option<DirEntry>> {
        match st.tree.get(self.nodes(), &key(parent, tag::DIRENT, name))? {
            Some(b) => Ok(Some(DirEntry::decode(&b).map_err(|e| {
                Error::integrity(format!("directory {parent} entry"), e)
            })?)),
            None => Ok(None),
        }
    }

    fn dir_inode(&self, st: &State, ino: u64) -> Result<Inode> {
        let i = self.get_inode(st, ino)?;
        if i.kind != FileKind::Dir {
            return Err(Error::NotDir);
        }
        Ok(i)
    }

    fn add_entry(
        &self,
        st: &mut State,
        parent: u64,
        pi: &mut Inode,
        name: &[u8],
        ino: u64,
        kind: FileKind,
    ) -> Result<()> {
        let cookie = pi.next_cookie;
        pi.next_cookie += 1;
        let e = DirEntry { ino, kind, cookie };
        let n = self.nodes();
        st.tree
            .insert(n, &key(parent, tag::DIRENT, name), e.encode())?;
        st.tree.insert(
            n,
            &key(parent, tag::DIRCOOKIE, &cookie.to_be_bytes()),
            name.to_vec(),
        )?;
        st.changed = true;
        Ok(())
    }

    fn del_entry(&self, st: &mut State, parent: u64, name: &[u8], e: &DirEntry) -> Result<()> {
        let n = self.nodes();
        st.tree.remove(n, &key(parent, tag::DIRENT, name))?;
        st.tree
            .remove(n, &key(parent, tag::DIRCOOKIE, &e.cookie.to_be_bytes()))?;
        st.changed = true;
        Ok(())
    }

    fn dir_is_empty(&self, st: &State, ino: u64) -> Result<bool> {
        let mut empty = true;
        st.tree.range(
            self.nodes(),
            &key(ino, tag::DIRENT, &[]),
            &key(ino, tag::DIRENT + 1, &[]),
            &mut |_, _| {
                empty = false;
                Ok(false)
            },
        )?;
        Ok(empty)
    }

    /// Removes every tree key in [from, to); returns how many. In bounded
    /// batches: a huge file must not need memory for all its keys.
    fn remove_key_range(&self, st: &mut State, from: &[u8], to: &[u8]) -> Result<u64> {
        let n = self.nodes();
        let mut count = 0;
        loop {
            let keys = st.tree.collect(n, from, to, 4096)?;
            if keys.is_empty() {
                return Ok(count);
            }
            for (k, _) in keys {
                st.tree.remove(n, &k)?;
                count += 1;
            }
        }
    }

    /// Removes an inode and everything it owns (blocks, xattrs, target).
    fn destroy_inode(&self, st: &mut State, ino: u64) -> Result<()> {
        self.freed_since_clean.store(true, Ordering::Relaxed);
        let n = self.nodes();
        self.remove_key_range(st, &key(ino, 0, &[]), &key(ino.saturating_add(1), 0, &[]))?;
        st.tree
            .remove(n, &key(0, tag::ORPHAN, &ino.to_be_bytes()))?;
        let drop_keys: Vec<(u64, u64)> = st
            .dirty
            .range((ino, 0)..=(ino, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in drop_keys {
            if let Some(p) = st.dirty.remove(&k) {
                st.dirty_bytes -= p.mem();
            }
        }
        st.changed = true;
        Ok(())
    }

    /// After unlink: drop the inode now, or when its last handle closes.
    fn maybe_destroy(&self, st: &mut State, ino: u64, inode: &Inode) -> Result<()> {
        if inode.nlink > 0 {
            return Ok(());
        }
        if st.open.get(&ino).copied().unwrap_or(0) > 0 {
            st.tree.insert(
                self.nodes(),
                &key(0, tag::ORPHAN, &ino.to_be_bytes()),
                Vec::new(),
            )?;
            return Ok(());
        }
        self.destroy_inode(st, ino)
    }

    fn purge_orphans(&self) -> Result<()> {
        let mut st = self.st.write();
        let orphans = st.tree.collect(
            self.nodes(),
            &key(0, tag::ORPHAN, &[]),
            &key(0, tag::ORPHAN + 1, &[]),
            usize::MAX,
        )?;
        for (k, _) in orphans {
            let ino = key_u64(&k)
                .ok_or_else(|| Error::integrity("orphan list", "malformed orphan record key"))?;
            self.destroy_inode(&mut st, ino)?;
        }
        Ok(())
    }
}

/// The xattr that holds a file's capabilities (cleared with the set-ID bits).
const SECURITY_CAPABILITY: &[u8] = b"security.capability";

/// The u64 (big-endian) that follows ino and tag in a tree key (a readdir cookie,
/// an orphan's ino); None if the key is too short.
fn key_u64(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.get(9..17)?.try_into().ok()?))
}

/// The block pointer held in a leaf value, if the entry holds one.
/// A new, empty directory owned by root (`.` and its entry in `parent`).
fn empty_dir(perm: u32, parent: u64, t: Timestamp) -> Inode {
    Inode {
        kind: FileKind::Dir,
        perm,
        uid: 0,
        gid: 0,
        nlink: 2,
        size: 0,
        rdev: 0,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        parent,
        next_cookie: 3,
        flags: 0,
        blocks: 0,
    }
}

/// The message of a caught panic.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// Copies a stored block's plaintext from offset `from` into `out`. A stored
/// block may be shorter than the block size (the last block of a file is
/// stored only as far as the file reached when it was sealed, and the file may
/// have grown since): what lies past its end reads as zeros.
fn copy_stored(plain: &[u8], from: usize, out: &mut [u8]) {
    let src = plain.get(from..).unwrap_or(&[]);
    let have = src.len().min(out.len());
    out[..have].copy_from_slice(&src[..have]);
    out[have..].fill(0);
}

pub(crate) fn value_ptr(k: &[u8], v: &[u8]) -> Option<BlockPtr> {
    match k.get(8) {
        Some(&tag::BLOCK) => BlockPtr::from_bytes(v).ok(),
        Some(&tag::FRAG) => FragValue::from_bytes_unchecked(v).ok().map(|f| f.ptr),
        Some(&tag::XATTR) => match XattrValue::decode(v) {
            Ok(XattrValue::Block(p)) => Some(p),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod reserve_tests {
    use super::reserve_bytes;
    const MIB: u64 = 1 << 20;

    #[test]
    fn the_reserve_scales_with_small_stores() {
        // 32 MiB segments on a 100 MiB store: 1/64 of it, not 17 MiB.
        assert_eq!(reserve_bytes(32 << 20, 100 * MIB), 100 * MIB / 64 + MIB);
        // A tiny store keeps at least 2 MiB.
        assert_eq!(reserve_bytes(32 << 20, 10 * MIB), 2 * MIB);
        // A large store: one segment's worth, at most 16 MiB, plus 1 MiB.
        assert_eq!(reserve_bytes(32 << 20, 1 << 40), 17 * MIB);
        assert_eq!(reserve_bytes(1 << 20, 1 << 40), 2 * MIB);
    }
}
