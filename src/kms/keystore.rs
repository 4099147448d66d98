//! The embedded keystore: one file holding the CMKs, the volumes' generation marks and
//! bindings, and the audit chain's key and anchor, sealed by a key derived from a
//! passphrase (Argon2id) or a keyfile (HKDF). Every key operation is recorded in the audit
//! log `PATH.audit` ([`super::audit`]).
//!
//! The byte layout is specified in `docs/KEYSTORE-FORMAT.md`. In short (format 2):
//!
//! ```text
//! header (103 bytes): magic "KMSFSKS\0" | version u16 | unlock kind u8 | Argon2id m, t, p u32
//!                     | salt [16] | key check [32] = HMAC(check key, the 39 bytes before)
//!                     | checksum [32] = SHA-256(label, the 71 bytes before)
//! body:               AES-256-GCM-SIV(seal key, AAD = the header bytes, payload)
//! ```
//!
//! Files, all in the keystore's directory (created mode 0700):
//! - `PATH`: the keystore (mode 0600), replaced atomically (write `PATH.tmp`, fsync, rename,
//!   fsync the directory);
//! - `PATH.bak`: the previous version, replaced atomically before each key change;
//! - `PATH.lock`: `flock`ed around every operation, so concurrent processes neither lose
//!   each other's updates nor interleave audit records;
//! - `PATH.audit`: the audit log, append-only.
//!
//! Every operation re-reads the file, so a key disabled by another process is refused at
//! once. The unlock key is derived once per (salt, parameters) and cached in memory.

use core::fmt;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::audit::{AuditLog, AuditOp, AuditRecord, Caller, StoredRecord, VerifyReport};
use super::cmk::{self, Cmk, Touched};
use super::import::{ImportParams, WrappingSpec};
use super::payload::{Binding, MAX_PATH_LEN, State};
use super::{CreateKey, EncryptionContext, KeyChange, KeyInfo, KeyKind, Kms, KmsError, WrappedKey};
use crate::crypto::{self, CipherKind, DataKey, KdfParams, Passphrase, Sealer, SecretKey, labels};
use crate::time::now_unix;

pub use super::cmk::WRAP_AAD_PREFIX;

/// First 8 bytes of every keystore file.
pub const MAGIC: [u8; 8] = *b"KMSFSKS\0";
/// The format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u16 = 2;
/// Length of the fixed header of format 1 (everything before the sealed payload).
pub const HEADER_LEN_V1: usize = PREFIX_LEN + CHECK_LEN;
/// Length of the fixed header of format 2: format 1's plus a key-independent checksum.
pub const HEADER_LEN: usize = PREFIX_LEN + CHECK_LEN + CHECKSUM_LEN;
/// Smallest keyfile accepted.
pub const MIN_KEYFILE_LEN: u64 = 32;
/// Largest keyfile accepted.
pub const MAX_KEYFILE_LEN: u64 = 1 << 20;
/// Largest keystore file read.
pub const MAX_FILE_LEN: u64 = 64 << 20;
/// Alias of the service key.
pub const SERVICE_ALIAS: &str = "service";
/// Domain label of the header checksum.
const CHECKSUM_LABEL: &[u8] = b"kmsfs keystore header v2";

const UNLOCK_PASSPHRASE: u8 = 1;
const UNLOCK_KEYFILE: u8 = 2;
const SALT_LEN: usize = 16;
const CHECK_LEN: usize = 32;
const CHECKSUM_LEN: usize = 32;
/// magic, version, unlock kind, m, t, p, salt.
const PREFIX_LEN: usize = 8 + 2 + 1 + 4 + 4 + 4 + SALT_LEN;
const SEAL_CIPHER: CipherKind = CipherKind::Aes256GcmSiv;

/// How the keystore is unlocked.
#[derive(Debug)]
pub enum Unlock {
    /// Argon2id of a passphrase.
    Passphrase(Passphrase),
    /// HKDF of the contents of a file of at least 32 (random) bytes.
    Keyfile(PathBuf),
}

impl Unlock {
    fn kind(&self) -> u8 {
        match self {
            Self::Passphrase(_) => UNLOCK_PASSPHRASE,
            Self::Keyfile(_) => UNLOCK_KEYFILE,
        }
    }
}

fn unlock_name(kind: u8) -> &'static str {
    if kind == UNLOCK_KEYFILE {
        "keyfile"
    } else {
        "passphrase"
    }
}

/// The fixed header fields that select the unlock key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    unlock_kind: u8,
    /// Stored as zeros for a keyfile.
    params: KdfParams,
    salt: [u8; SALT_LEN],
}

impl Header {
    fn prefix(&self, version: u16) -> [u8; PREFIX_LEN] {
        let mut p = [0u8; PREFIX_LEN];
        p[0..8].copy_from_slice(&MAGIC);
        p[8..10].copy_from_slice(&version.to_le_bytes());
        p[10] = self.unlock_kind;
        p[11..15].copy_from_slice(&self.params.m_cost_kib.to_le_bytes());
        p[15..19].copy_from_slice(&self.params.t_cost.to_le_bytes());
        p[19..23].copy_from_slice(&self.params.p_cost.to_le_bytes());
        p[23..39].copy_from_slice(&self.salt);
        p
    }

    fn for_unlock(unlock: &Unlock, params: KdfParams) -> Result<Self, KmsError> {
        Ok(match unlock {
            Unlock::Passphrase(p) => {
                params.validate().map_err(KmsError::InvalidParams)?;
                if p.expose().is_empty() {
                    return Err(KmsError::InvalidParams(
                        "the passphrase is empty; give a non-empty passphrase".into(),
                    ));
                }
                Header {
                    unlock_kind: UNLOCK_PASSPHRASE,
                    params,
                    salt: crypto::random_array(),
                }
            }
            Unlock::Keyfile(_) => Header {
                unlock_kind: UNLOCK_KEYFILE,
                params: ZERO_PARAMS,
                salt: crypto::random_array(),
            },
        })
    }
}

/// SHA-256 over the label and the header bytes before the checksum.
fn header_checksum(header_bytes: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(CHECKSUM_LABEL);
    h.update(header_bytes);
    h.finalize().into()
}

struct CachedKey {
    header: Header,
    key: SecretKey,
}

/// A successfully decoded keystore file.
struct Loaded {
    header: Header,
    state: State,
    /// The verified file bytes (kept as the next backup).
    bytes: Vec<u8>,
    /// Decoded from `PATH.bak` because `PATH` was unreadable.
    from_backup: bool,
}

/// Why a keystore file could not be used.
struct DecodeError {
    error: KmsError,
    /// Worth trying the backup (corruption or a failed key check).
    fallback: bool,
    /// The key check passed: the passphrase/keyfile is right, the file is damaged.
    key_verified: bool,
}

/// What an audited operation reports about itself.
#[derive(Default)]
struct Audit {
    touched: Touched,
    volume: Option<[u8; 16]>,
}

/// What `keystore restore` found missing in the backup, compared with the keystore it
/// replaced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Keys (id, alias) the backup lacks entirely.
    pub missing_keys: Vec<(String, Option<String>)>,
    /// Versions (key id, version) the backup lacks: volumes wrapped under them no
    /// longer unwrap.
    pub missing_versions: Vec<(String, u32)>,
}

/// The embedded keystore. See the module documentation.
pub struct LocalKeystore {
    path: PathBuf,
    /// Shared with the views [`LocalKeystore::with_caller`] makes.
    unlock: Arc<Unlock>,
    /// Shared with the views [`LocalKeystore::with_caller`] makes.
    cache: Arc<Mutex<Option<CachedKey>>>,
    service_key_id: String,
    audit: AuditLog,
    caller: Caller,
}

impl fmt::Debug for LocalKeystore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalKeystore")
            .field("path", &self.path)
            .field("service_key_id", &self.service_key_id)
            .finish_non_exhaustive()
    }
}

/// Refuses a file that holds or protects key material when group or others may read or
/// write it, or when another user owns it (root may use root's files only).
///
/// # Errors
/// [`KmsError::UnsafePermissions`]; [`KmsError::Io`] if it cannot be examined.
pub fn check_private_file(path: &Path, what: &'static str) -> Result<(), KmsError> {
    let md = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path, e)),
    };
    let md = if md.file_type().is_symlink() {
        fs::metadata(path).map_err(|e| io_err(path, e))?
    } else {
        md
    };
    let mode = md.mode() & 0o7777;
    let euid = nix::unistd::geteuid().as_raw();
    let p = path.display().to_string();
    if md.uid() != euid {
        return Err(KmsError::UnsafePermissions {
            what,
            path: p.clone(),
            problem: format!("is owned by uid {}, not by you (uid {euid})", md.uid()),
            chown: format!(" and `chown {euid} {p}` (or run kmsfs as its owner)"),
        });
    }
    if mode & 0o077 != 0 {
        return Err(KmsError::UnsafePermissions {
            what,
            path: p,
            problem: format!("is accessible by group or others (mode {mode:04o})"),
            chown: String::new(),
        });
    }
    Ok(())
}

impl LocalKeystore {
    /// Opens the keystore at `path`, creating it (with [`KdfParams::DEFAULT`] and a service
    /// key) if neither it nor its backup exists.
    ///
    /// # Errors
    /// [`KmsError::WrongPassphrase`], [`KmsError::Corrupt`], [`KmsError::UnsupportedVersion`],
    /// [`KmsError::UnlockMismatch`], [`KmsError::Keyfile`], [`KmsError::Io`],
    /// [`KmsError::UnsafePermissions`].
    pub fn open_or_create(path: &Path, unlock: Unlock) -> Result<Self, KmsError> {
        Self::open_or_create_with_params(path, unlock, KdfParams::DEFAULT)
    }

    /// As [`LocalKeystore::open_or_create`], with the Argon2id parameters used if the
    /// keystore is created (an existing keystore keeps its own, read from its header).
    ///
    /// # Errors
    /// As [`LocalKeystore::open_or_create`]; [`KmsError::InvalidParams`] if `params` are out
    /// of bounds or the passphrase is empty when creating.
    pub fn open_or_create_with_params(
        path: &Path,
        unlock: Unlock,
        params: KdfParams,
    ) -> Result<Self, KmsError> {
        let mut ks = Self::unopened(path, unlock);
        let dir = parent_dir(path);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_err(dir, e))?;
        let _lock = ks.lock()?;
        ks.check_files()?;
        let id = match ks.load()? {
            Some(loaded) => loaded.state.service().id.clone(),
            None => ks.create(params)?,
        };
        ks.service_key_id = id;
        Ok(ks)
    }

    /// Opens an existing keystore only (never creates one).
    ///
    /// # Errors
    /// As [`LocalKeystore::open_or_create`]; [`KmsError::Io`] (not found) when neither the
    /// file nor its backup exists.
    pub fn open_existing(path: &Path, unlock: Unlock) -> Result<Self, KmsError> {
        let mut ks = Self::unopened(path, unlock);
        let _lock = ks.lock()?;
        ks.check_files()?;
        let loaded = ks.load_existing()?;
        ks.service_key_id = loaded.state.service().id.clone();
        Ok(ks)
    }

    fn unopened(path: &Path, unlock: Unlock) -> Self {
        Self {
            path: path.to_path_buf(),
            unlock: Arc::new(unlock),
            cache: Arc::new(Mutex::new(None)),
            service_key_id: String::new(),
            audit: AuditLog::new(with_suffix(path, ".audit")),
            caller: Caller::current(),
        }
    }

    /// The keystore, its backup, and the keyfile must be private to their owner.
    fn check_files(&self) -> Result<(), KmsError> {
        check_private_file(&self.path, "keystore")?;
        check_private_file(&self.backup_path(), "keystore backup")?;
        if let Unlock::Keyfile(kf) = &*self.unlock {
            check_private_file(kf, "keyfile")?;
        }
        Ok(())
    }

    /// The caller recorded in audit records (default: this process). A KMS daemon sets
    /// the peer's identity here.
    pub fn set_caller(&mut self, caller: Caller) {
        self.caller = caller;
    }

    /// The same keystore, recording `caller` in its audit records: a cheap view (the
    /// unlock secret and the cached unlock key are shared, nothing is re-derived) that a
    /// KMS daemon makes per request, so concurrent requests of different peers each
    /// record their own identity.
    #[must_use]
    pub fn with_caller(&self, caller: Caller) -> Self {
        Self {
            path: self.path.clone(),
            unlock: Arc::clone(&self.unlock),
            cache: Arc::clone(&self.cache),
            service_key_id: self.service_key_id.clone(),
            audit: AuditLog::new(self.audit.path().to_path_buf()),
            caller,
        }
    }

    /// Records a request refused before it reached the keys (a KMS daemon's access
    /// policy): one audit record of `op` on `key_id` (an id, or `""`) for `volume`, with
    /// this keystore's caller and the result refused with `reason`.
    ///
    /// # Errors
    /// Keystore and audit errors.
    pub fn audit_refusal(
        &self,
        op: AuditOp,
        key_id: &str,
        volume: Option<[u8; 16]>,
        reason: &str,
    ) -> Result<(), KmsError> {
        let res: Result<(), KmsError> = self.run(Some(op), false, |_, audit| {
            audit.touched.key_id = key_id.to_owned();
            audit.volume = volume;
            Err(KmsError::Refused(reason.to_owned()))
        });
        match res {
            Err(KmsError::Refused(r)) if r == reason => Ok(()),
            Err(e) => Err(e),
            Ok(()) => Ok(()),
        }
    }

    /// The keystore file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The audit log file.
    #[must_use]
    pub fn audit_path(&self) -> &Path {
        self.audit.path()
    }

    /// The id of the service key (alias `service`), used when no CMK is named.
    #[must_use]
    pub fn service_key_id(&self) -> String {
        self.service_key_id.clone()
    }

    fn create(&self, params: KdfParams) -> Result<String, KmsError> {
        let header = Header::for_unlock(&self.unlock, params)?;
        let mut state = State::new();
        let now = now_unix();
        let service = Cmk::generate(
            state.new_id(),
            Some(SERVICE_ALIAS.to_owned()),
            "kmsfs service key (created automatically)".to_owned(),
            KeyKind::Service,
            now,
        );
        let id = service.id.clone();
        state.cmks.push(service);
        // A keystore made where an old audit log lies would chain onto a log it cannot
        // verify: move the old log aside.
        if self.audit.path().exists() {
            let aside = with_suffix(self.audit.path(), &format!(".old-{now}"));
            fs::rename(self.audit.path(), &aside).map_err(|e| io_err(self.audit.path(), e))?;
            log::warn!(
                "moved the audit log of an earlier keystore aside to {}",
                aside.display()
            );
        }
        let rec = AuditRecord::new(AuditOp::Create, &id, 1, None, &self.caller, Ok(()));
        state.anchor = self.audit.append(&state.audit_key, &state.anchor, &rec)?;
        let bytes = self.encode_file(&header, &state)?;
        write_atomic(&self.path, &bytes)?;
        log::info!(
            "created keystore {} with service key {id}",
            self.path.display()
        );
        Ok(id)
    }

    fn path_str(&self) -> String {
        self.path.display().to_string()
    }

    fn backup_path(&self) -> PathBuf {
        with_suffix(&self.path, ".bak")
    }

    /// Exclusive `flock` on `PATH.lock`, released when the returned file is dropped.
    fn lock(&self) -> Result<File, KmsError> {
        let lock_path = with_suffix(&self.path, ".lock");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(|e| io_err(&lock_path, e))?;
        f.lock().map_err(|e| io_err(&lock_path, e))?;
        Ok(f)
    }

    fn load_existing(&self) -> Result<Loaded, KmsError> {
        self.load()?.ok_or_else(|| {
            io_err(
                &self.path,
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "the keystore file and its backup are missing",
                ),
            )
        })
    }

    /// Runs `f` on the current state under the lock, carrying out what the clock made due
    /// first, and appends one audit record for `op` (ok, or the refusal) plus one per
    /// expiry. Writes the keystore when anything changed (the audit anchor always does
    /// when `op` is audited). `backup`: keep the previous version as `PATH.bak`.
    fn run<R>(
        &self,
        op: Option<AuditOp>,
        backup: bool,
        f: impl FnOnce(&mut State, &mut Audit) -> Result<(R, bool), KmsError>,
    ) -> Result<R, KmsError> {
        let _lock = self.lock()?;
        let mut loaded = self.load_existing()?;
        let state = &mut loaded.state;
        let now = now_unix();
        let expired = cmk::expire(state, now);
        let mut changed = !expired.is_empty();
        let mut key_change = changed;
        for e in &expired {
            let op = if e.what == "destroy" {
                AuditOp::Destroy
            } else {
                AuditOp::DeleteMaterial
            };
            let rec = AuditRecord::new(op, &e.key_id, 0, None, &self.caller, Ok(()));
            state.anchor = self.audit.append(&state.audit_key, &state.anchor, &rec)?;
        }
        let mut audit = Audit::default();
        let res = f(state, &mut audit);
        if let Ok((_, c)) = &res {
            changed |= *c;
            key_change |= *c;
        }
        if let Some(op) = op {
            let outcome = match &res {
                Ok(_) => Ok(()),
                Err(e) => Err(e.to_string()),
            };
            let rec = AuditRecord::new(
                op,
                &audit.touched.key_id,
                audit.touched.version,
                audit.volume,
                &self.caller,
                outcome,
            );
            state.anchor = self.audit.append(&state.audit_key, &state.anchor, &rec)?;
            changed = true;
        }
        if changed {
            let bytes = self.encode_file(&loaded.header, &loaded.state)?;
            // Keep the previous, verified version as the backup when a key changed. If it
            // was itself read from the backup (the main file is damaged), the backup stays
            // as it is. A backup is always made when there is none yet.
            let no_backup = !self.backup_path().exists();
            if ((backup && key_change) || no_backup) && !loaded.from_backup {
                write_atomic(&self.backup_path(), &loaded.bytes)?;
            }
            write_atomic(&self.path, &bytes)?;
        }
        res.map(|(r, _)| r)
    }

    /// Reads `PATH`, falling back to `PATH.bak` if `PATH` is missing, corrupt or fails the
    /// key check while the backup opens. `None` if neither file exists. A failed unlock is
    /// recorded in the audit log (unauthenticated: the audit key is sealed).
    fn load(&self) -> Result<Option<Loaded>, KmsError> {
        let res = self.load_inner();
        if let Err(e @ KmsError::WrongPassphrase { .. }) = &res {
            let rec = AuditRecord::new(
                AuditOp::Unlock,
                "",
                0,
                None,
                &self.caller,
                Err(e.to_string()),
            );
            if let Err(ae) = self.audit.append_unauthenticated(&rec) {
                log::warn!("cannot record the failed unlock: {ae}");
            }
        }
        res
    }

    fn load_inner(&self) -> Result<Option<Loaded>, KmsError> {
        let main_err = match read_file(&self.path)? {
            Some(bytes) => match self.decode_file(bytes) {
                Ok(l) => return Ok(Some(l)),
                Err(e) if e.fallback => Some(e),
                Err(e) => return Err(e.error),
            },
            None => None,
        };
        let bak = self.backup_path();
        let Some(bak_bytes) = read_file(&bak)? else {
            return match main_err {
                Some(e) => Err(e.error),
                None => Ok(None),
            };
        };
        match (self.decode_file(bak_bytes), main_err) {
            (Ok(mut l), main_err) => {
                let why = main_err
                    .map_or_else(|| "the file is missing".to_owned(), |e| e.error.to_string());
                log::warn!(
                    "keystore {}: {why}; opened the backup {} instead (the main file is rewritten on the next update)",
                    self.path.display(),
                    bak.display()
                );
                l.from_backup = true;
                Ok(Some(l))
            }
            (Err(bak_err), None) => Err(bak_err.error),
            // The main file was damaged before its key check could run, and the backup
            // says the passphrase is wrong: that is the more useful answer.
            (Err(bak_err), Some(main_err))
                if !main_err.key_verified
                    && matches!(bak_err.error, KmsError::WrongPassphrase { .. }) =>
            {
                Err(bak_err.error)
            }
            (Err(bak_err), Some(main_err)) => Err(match main_err.error {
                KmsError::Corrupt { path, detail } => KmsError::Corrupt {
                    path,
                    detail: format!("{detail} (the backup is unusable too: {})", bak_err.error),
                },
                e => e,
            }),
        }
    }

    fn corrupt(&self, detail: impl Into<String>) -> KmsError {
        KmsError::Corrupt {
            path: self.path_str(),
            detail: detail.into(),
        }
    }

    fn decode_file(&self, bytes: Vec<u8>) -> Result<Loaded, DecodeError> {
        let mut key_verified = false;
        match self.decode_inner(&bytes, &mut key_verified) {
            Ok((header, state)) => Ok(Loaded {
                header,
                state,
                bytes,
                from_backup: false,
            }),
            Err(error) => Err(DecodeError {
                fallback: matches!(
                    error,
                    KmsError::Corrupt { .. } | KmsError::WrongPassphrase { .. }
                ),
                key_verified,
                error,
            }),
        }
    }

    /// Decodes and authenticates a keystore file; sets `key_verified` once the key check
    /// has passed (later failures are corruption, not a wrong passphrase).
    fn decode_inner(
        &self,
        bytes: &[u8],
        key_verified: &mut bool,
    ) -> Result<(Header, State), KmsError> {
        if bytes.len() < 10 || bytes[0..8] != MAGIC {
            return Err(self.corrupt(if bytes.len() < 8 {
                "the file is truncated".to_owned()
            } else if bytes[0..8] == MAGIC {
                "the file is truncated inside the header".to_owned()
            } else {
                "not a kmsfs keystore (bad magic)".to_owned()
            }));
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version > FORMAT_VERSION {
            return Err(KmsError::UnsupportedVersion {
                path: self.path_str(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if version == 0 {
            return Err(self.corrupt("format version 0"));
        }
        let header_len = if version == 1 {
            HEADER_LEN_V1
        } else {
            HEADER_LEN
        };
        if bytes.len() < header_len + SEAL_CIPHER.overhead() {
            return Err(self.corrupt(format!("the file is truncated ({} bytes)", bytes.len())));
        }
        // Format 2: a damaged header (salt, parameters, key check) is told apart from a
        // wrong passphrase before any key is derived.
        if version >= 2
            && !crypto::ct_eq(
                &header_checksum(&bytes[..HEADER_LEN_V1]),
                &bytes[HEADER_LEN_V1..HEADER_LEN],
            )
        {
            return Err(self.corrupt(
                "its header is damaged (the checksum over the salt, key derivation parameters and key check does not match)",
            ));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let unlock_kind = bytes[10];
        let params = KdfParams {
            m_cost_kib: u32_at(11),
            t_cost: u32_at(15),
            p_cost: u32_at(19),
        };
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&bytes[23..39]);
        match unlock_kind {
            UNLOCK_PASSPHRASE => params.validate().map_err(|e| self.corrupt(e))?,
            UNLOCK_KEYFILE if params == ZERO_PARAMS => {}
            UNLOCK_KEYFILE => {
                return Err(self.corrupt("a keyfile keystore has non-zero Argon2id parameters"));
            }
            k => return Err(self.corrupt(format!("unknown unlock kind {k}"))),
        }
        if unlock_kind != self.unlock.kind() {
            return Err(KmsError::UnlockMismatch {
                path: self.path_str(),
                expected: unlock_name(unlock_kind),
                given: unlock_name(self.unlock.kind()),
            });
        }
        let header = Header {
            unlock_kind,
            params,
            salt,
        };
        let (seal_key, check_key) = self.keys_for(&header)?;
        let check = crypto::hmac_sha256(&check_key, &bytes[..PREFIX_LEN]);
        if !crypto::ct_eq(&check, &bytes[PREFIX_LEN..HEADER_LEN_V1]) {
            return Err(KmsError::WrongPassphrase {
                path: self.path_str(),
            });
        }
        *key_verified = true;
        let payload = Sealer::new(SEAL_CIPHER, &seal_key)
            .open(&bytes[..header_len], &bytes[header_len..])
            .map(Zeroizing::new)
            .map_err(|_| {
                self.corrupt("the sealed contents failed authentication (modified or truncated)")
            })?;
        let state = State::decode(&payload, version).map_err(|e| self.corrupt(e))?;
        Ok((header, state))
    }

    /// A format-2 file of `state` under `header`.
    fn encode_file(&self, header: &Header, state: &State) -> Result<Vec<u8>, KmsError> {
        let (seal_key, check_key) = self.keys_for(header)?;
        let payload = state.encode();
        let prefix = header.prefix(FORMAT_VERSION);
        let mut out = Vec::with_capacity(HEADER_LEN + SEAL_CIPHER.overhead() + payload.len());
        out.extend_from_slice(&prefix);
        out.extend_from_slice(&crypto::hmac_sha256(&check_key, &prefix));
        let checksum = header_checksum(&out);
        out.extend_from_slice(&checksum);
        let sealer = Sealer::new(SEAL_CIPHER, &seal_key);
        let aad = out.clone();
        sealer.seal_into(&aad, &payload, &mut out);
        Ok(out)
    }

    /// (seal key, check key) for a header, deriving the unlock key if it is not cached.
    fn keys_for(&self, header: &Header) -> Result<(SecretKey, SecretKey), KmsError> {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !matches!(cache.as_ref(), Some(c) if c.header == *header) {
            let key = self.derive_unlock_key(header)?;
            *cache = Some(CachedKey {
                header: *header,
                key,
            });
        }
        let Some(cached) = cache.as_ref().map(|c| &c.key) else {
            unreachable!("the cache was just filled")
        };
        Ok((
            crypto::derive_subkey(cached, labels::KEYSTORE_SEAL),
            crypto::derive_subkey(cached, labels::KEYSTORE_CHECK),
        ))
    }

    fn derive_unlock_key(&self, header: &Header) -> Result<SecretKey, KmsError> {
        derive_unlock_key(&self.unlock, header)
    }

    // ----- keystore administration ---------------------------------------------------

    /// Re-seals the keystore under a new passphrase or keyfile (new salt; every CMK stays
    /// as it is). Both `PATH` and `PATH.bak` are replaced, so the old secret opens neither.
    ///
    /// # Errors
    /// Keystore errors; [`KmsError::InvalidParams`] for an empty passphrase or bad
    /// parameters.
    pub fn change_unlock(&self, new: Unlock, params: KdfParams) -> Result<(), KmsError> {
        if let Unlock::Keyfile(kf) = &new {
            check_private_file(kf, "keyfile")?;
            read_keyfile(kf)?;
        }
        let params = match new {
            Unlock::Passphrase(_) => params,
            Unlock::Keyfile(_) => ZERO_PARAMS,
        };
        let header = Header::for_unlock(&new, params)?;
        let new_key = derive_unlock_key(&new, &header)?;
        let _lock = self.lock()?;
        let mut loaded = self.load_existing()?;
        let rec = AuditRecord::new(AuditOp::Passwd, "", 0, None, &self.caller, Ok(()));
        loaded.state.anchor =
            self.audit
                .append(&loaded.state.audit_key, &loaded.state.anchor, &rec)?;
        let bytes = {
            let mut cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *cache = Some(CachedKey {
                header,
                key: new_key,
            });
            drop(cache);
            self.encode_file(&header, &loaded.state)?
        };
        // The backup first: a crash in between leaves the new main file's secret opening
        // the backup too, or the old main file with a new backup (which `load` falls back
        // to only with the new secret).
        write_atomic(&self.backup_path(), &bytes)?;
        write_atomic(&self.path, &bytes)?;
        log::info!(
            "keystore {} re-sealed under a new {}",
            self.path.display(),
            unlock_name(header.unlock_kind)
        );
        Ok(())
    }

    /// Writes a sealed copy of the keystore (the current file, as authenticated now) to
    /// `dest` (mode 0600, atomically).
    ///
    /// # Errors
    /// Keystore errors.
    pub fn backup_to(&self, dest: &Path) -> Result<(), KmsError> {
        let _lock = self.lock()?;
        let loaded = self.load_existing()?;
        write_atomic(dest, &loaded.bytes)
    }

    /// Replaces the keystore with the backup `src` (sealed under the same secret), keeping
    /// the current audit chain and the higher generation marks. Reports what the backup
    /// lacks compared with the keystore it replaces.
    ///
    /// # Errors
    /// Keystore errors for either file.
    pub fn restore_from(&self, src: &Path) -> Result<RestoreReport, KmsError> {
        let bytes = read_file(src)?.ok_or_else(|| {
            io_err(
                src,
                io::Error::new(io::ErrorKind::NotFound, "no such keystore backup"),
            )
        })?;
        let _lock = self.lock()?;
        let mut restored = self.decode_file(bytes).map_err(|e| match e.error {
            KmsError::Corrupt { detail, .. } => KmsError::Corrupt {
                path: src.display().to_string(),
                detail,
            },
            KmsError::WrongPassphrase { .. } => KmsError::WrongPassphrase {
                path: src.display().to_string(),
            },
            other => other,
        })?;
        let current = self.load()?;
        let mut report = RestoreReport::default();
        if let Some(cur) = &current {
            for c in &cur.state.cmks {
                match restored.state.cmks.iter().find(|r| r.id == c.id) {
                    None => report.missing_keys.push((c.id.clone(), c.alias.clone())),
                    Some(r) => {
                        for v in &c.versions {
                            let has = r
                                .versions
                                .iter()
                                .any(|rv| rv.version == v.version && rv.material.is_some());
                            if v.material.is_some() && !has {
                                report.missing_versions.push((c.id.clone(), v.version));
                            }
                        }
                    }
                }
            }
            // Keep the audit chain verifiable and the rollback marks as high as known.
            restored.state.audit_key = cur.state.audit_key.duplicate();
            restored.state.anchor = cur.state.anchor;
            for (id, g) in &cur.state.marks {
                let m = restored.state.marks.entry(*id).or_insert(0);
                *m = (*m).max(*g);
            }
            for (id, b) in &cur.state.volumes {
                restored
                    .state
                    .volumes
                    .entry(*id)
                    .or_insert_with(|| b.clone());
            }
        }
        let outcome = if report.missing_keys.is_empty() && report.missing_versions.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the backup lacks {} keys and {} versions",
                report.missing_keys.len(),
                report.missing_versions.len()
            ))
        };
        // Recorded as done (ok); the reason field tells what the backup lacked.
        let mut rec = AuditRecord::new(AuditOp::Restore, "", 0, None, &self.caller, Ok(()));
        if let Err(why) = outcome {
            rec.reason = why;
        }
        restored.state.anchor =
            self.audit
                .append(&restored.state.audit_key, &restored.state.anchor, &rec)?;
        let out = self.encode_file(&restored.header, &restored.state)?;
        if let Some(cur) = &current
            && !cur.from_backup
        {
            write_atomic(&self.backup_path(), &cur.bytes)?;
        }
        write_atomic(&self.path, &out)?;
        Ok(report)
    }

    /// Moves the audit log aside (to `PATH.audit.reset-TIME`) and starts a new chain whose
    /// first record says so. For a log that fails verification: until then every key
    /// operation is refused. Returns where the old log went.
    ///
    /// # Errors
    /// Keystore and audit errors.
    pub fn audit_reset(&self) -> Result<Option<PathBuf>, KmsError> {
        let _lock = self.lock()?;
        let mut loaded = self.load_existing()?;
        let log = self.audit.path().to_path_buf();
        let aside = with_suffix(&log, &format!(".reset-{}", now_unix()));
        let moved = match fs::rename(&log, &aside) {
            Ok(()) => Some(aside),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&log, e)),
        };
        loaded.state.anchor = super::audit::Anchor::default();
        let mut rec = AuditRecord::new(AuditOp::Restore, "", 0, None, &self.caller, Ok(()));
        rec.reason = match &moved {
            Some(p) => format!(
                "audit log reset; the previous log was moved to {}",
                p.display()
            ),
            None => "audit log reset; there was no previous log".into(),
        };
        loaded.state.anchor =
            self.audit
                .append(&loaded.state.audit_key, &loaded.state.anchor, &rec)?;
        let bytes = self.encode_file(&loaded.header, &loaded.state)?;
        write_atomic(&self.path, &bytes)?;
        Ok(moved)
    }

    /// Checks the audit log against the keystore's anchor.
    ///
    /// # Errors
    /// [`KmsError::Audit`] naming the first bad record; keystore errors.
    pub fn audit_verify(&self) -> Result<VerifyReport, KmsError> {
        let _lock = self.lock()?;
        let loaded = self.load_existing()?;
        Ok(self
            .audit
            .verify(&loaded.state.audit_key, &loaded.state.anchor)?)
    }
}

/// Decodes a keystore payload of format `version` (the plaintext inside the sealed body)
/// and drops it: the entry point the decoder fuzz tests use. Never panics, whatever the
/// bytes.
///
/// # Errors
/// What is malformed, as in [`KmsError::Corrupt`] details.
#[doc(hidden)]
pub fn decode_payload(payload: &[u8], version: u16) -> Result<(), String> {
    State::decode(payload, version).map(drop)
}

fn derive_unlock_key(unlock: &Unlock, header: &Header) -> Result<SecretKey, KmsError> {
    match unlock {
        Unlock::Passphrase(p) => crypto::derive_from_passphrase(p, &header.salt, header.params)
            .map_err(KmsError::InvalidParams),
        Unlock::Keyfile(kf) => {
            let material = read_keyfile(kf)?;
            Ok(crypto::derive_from_material(
                &material,
                &header.salt,
                labels::KEYSTORE_KEYFILE,
            ))
        }
    }
}

const ZERO_PARAMS: KdfParams = KdfParams {
    m_cost_kib: 0,
    t_cost: 0,
    p_cost: 0,
};

fn volume_of(ctx: &EncryptionContext) -> Option<[u8; 16]> {
    let h = ctx.get(EncryptionContext::VOLUME_ID)?;
    super::parse_hex16(h)
}

impl Kms for LocalKeystore {
    fn describe(&self) -> String {
        format!("keystore {}", self.path.display())
    }

    fn generate_data_key(
        &self,
        cmk: Option<&str>,
        ctx: &EncryptionContext,
    ) -> Result<(DataKey, WrappedKey), KmsError> {
        self.run(Some(AuditOp::GenerateDataKey), false, |state, audit| {
            audit.volume = volume_of(ctx);
            let cmk = state.resolve(cmk)?;
            audit.touched.key_id.clone_from(&cmk.id);
            audit.touched.version = cmk.primary().map_or(0, |v| v.version);
            cmk.check_usable()?;
            let dk = SecretKey::random();
            let wrapped = cmk.wrap(&dk, ctx)?;
            Ok(((dk, wrapped), false))
        })
    }

    fn decrypt(&self, wrapped: &WrappedKey, ctx: &EncryptionContext) -> Result<DataKey, KmsError> {
        self.run(Some(AuditOp::Decrypt), false, |state, audit| {
            audit.volume = volume_of(ctx);
            audit.touched.key_id.clone_from(&wrapped.cmk_id);
            audit.touched.version = wrapped.cmk_version;
            let cmk = state.by_id(&wrapped.cmk_id)?;
            cmk.check_usable()?;
            Ok((cmk.unwrap(wrapped, ctx)?, false))
        })
    }

    fn re_encrypt(
        &self,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
        dest_cmk: Option<&str>,
    ) -> Result<WrappedKey, KmsError> {
        self.run(Some(AuditOp::ReEncrypt), false, |state, audit| {
            audit.volume = volume_of(ctx);
            audit.touched.key_id.clone_from(&wrapped.cmk_id);
            audit.touched.version = wrapped.cmk_version;
            let src = state.by_id(&wrapped.cmk_id)?;
            src.check_usable()?;
            let dk = src.unwrap(wrapped, ctx)?;
            let dest = match dest_cmk {
                Some(name) => state.resolve(Some(name))?,
                None => src,
            };
            audit.touched.key_id.clone_from(&dest.id);
            audit.touched.version = dest.primary().map_or(0, |v| v.version);
            dest.check_usable()?;
            Ok((dest.wrap(&dk, ctx)?, false))
        })
    }

    fn generation_mark(&self, volume_id: &[u8; 16]) -> Result<Option<u64>, KmsError> {
        self.run(None, false, |state, _| {
            Ok((state.marks.get(volume_id).copied(), false))
        })
    }

    fn record_generation(&self, volume_id: &[u8; 16], generation: u64) -> Result<(), KmsError> {
        self.run(None, false, |state, _| match state.marks.get(volume_id) {
            Some(&mark) if mark >= generation => Ok(((), false)),
            _ => {
                state.marks.insert(*volume_id, generation);
                Ok(((), true))
            }
        })
    }

    fn note_volume(&self, volume_id: &[u8; 16], cmk_id: &str, path: &str) -> Result<(), KmsError> {
        let path = if path.len() > MAX_PATH_LEN {
            &path[..path.floor_char_boundary(MAX_PATH_LEN)]
        } else {
            path
        };
        self.run(None, false, |state, _| {
            if state
                .volumes
                .get(volume_id)
                .is_some_and(|b| b.cmk_id == cmk_id && b.path == path)
            {
                return Ok(((), false));
            }
            state.volumes.insert(
                *volume_id,
                Binding {
                    cmk_id: cmk_id.to_owned(),
                    path: path.to_owned(),
                    updated: now_unix(),
                },
            );
            Ok(((), true))
        })
    }

    fn list_keys(&self) -> Result<Vec<KeyInfo>, KmsError> {
        self.run(None, false, |state, _| {
            Ok((
                state.cmks.iter().map(|c| c.info(&state.volumes)).collect(),
                false,
            ))
        })
    }

    fn create_key(&self, spec: &CreateKey) -> Result<KeyInfo, KmsError> {
        self.run(Some(AuditOp::Create), true, |state, audit| {
            let info = cmk::create(state, spec, now_unix())?;
            audit.touched.key_id.clone_from(&info.id);
            audit.touched.version = info.primary_version.unwrap_or(0);
            Ok((info, true))
        })
    }

    fn change_key(&self, name: &str, change: KeyChange) -> Result<KeyInfo, KmsError> {
        let op = match change {
            KeyChange::Enable => AuditOp::Enable,
            KeyChange::Disable => AuditOp::Disable,
            KeyChange::Rotate => AuditOp::Rotate,
            KeyChange::ScheduleDeletion { .. } => AuditOp::ScheduleDeletion,
            KeyChange::CancelDeletion => AuditOp::CancelDeletion,
            KeyChange::DeleteMaterial => AuditOp::DeleteMaterial,
        };
        self.run(Some(op), true, |state, audit| {
            let info = cmk::change(state, name, change, now_unix(), &mut audit.touched)?;
            Ok((info, true))
        })
    }

    fn import_params(&self, name: &str, wrapping: WrappingSpec) -> Result<ImportParams, KmsError> {
        self.run(Some(AuditOp::ImportParams), true, |state, audit| {
            let p = cmk::import_params(state, name, wrapping, now_unix(), &mut audit.touched)?;
            Ok((p, true))
        })
    }

    fn import_material(
        &self,
        name: &str,
        token: &[u8],
        wrapped_material: &[u8],
        expires: Option<u64>,
    ) -> Result<KeyInfo, KmsError> {
        self.run(Some(AuditOp::Import), true, |state, audit| {
            let info = cmk::import_material(
                state,
                name,
                token,
                wrapped_material,
                expires,
                now_unix(),
                &mut audit.touched,
            )?;
            Ok((info, true))
        })
    }

    fn audit_records(&self) -> Result<(Result<VerifyReport, String>, Vec<StoredRecord>), KmsError> {
        let _lock = self.lock()?;
        let loaded = self.load_existing()?;
        let report = self
            .audit
            .verify(&loaded.state.audit_key, &loaded.state.anchor)
            .map_err(|e| e.to_string());
        // A damaged log still shows every record before the damage.
        let (records, _) = self.audit.read_prefix();
        Ok((report, records))
    }
}

fn io_err(path: &Path, source: io::Error) -> KmsError {
    KmsError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `path` with `suffix` appended to its file name (`ks` -> `ks.bak`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}
/// The file's bytes, `None` if it does not exist.
fn read_file(path: &Path) -> Result<Option<Vec<u8>>, KmsError> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, e)),
    };
    let len = f.metadata().map_err(|e| io_err(path, e))?.len();
    if len > MAX_FILE_LEN {
        return Err(KmsError::Corrupt {
            path: path.display().to_string(),
            detail: format!("the file is {len} bytes, more than the {MAX_FILE_LEN} allowed"),
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_err(path, e))?;
    Ok(Some(bytes))
}

fn read_keyfile(path: &Path) -> Result<Zeroizing<Vec<u8>>, KmsError> {
    let keyfile_err = |detail: String| KmsError::Keyfile {
        path: path.display().to_string(),
        detail,
    };
    let f = File::open(path).map_err(|e| keyfile_err(e.to_string()))?;
    let mut material = Zeroizing::new(Vec::new());
    f.take(MAX_KEYFILE_LEN + 1)
        .read_to_end(&mut material)
        .map_err(|e| keyfile_err(e.to_string()))?;
    let len = material.len() as u64;
    if len < MIN_KEYFILE_LEN {
        return Err(keyfile_err(format!(
            "it has {len} bytes, at least {MIN_KEYFILE_LEN} random bytes are needed (e.g. `head -c 64 /dev/urandom > FILE`)"
        )));
    }
    if len > MAX_KEYFILE_LEN {
        return Err(keyfile_err(format!(
            "it is larger than {MAX_KEYFILE_LEN} bytes"
        )));
    }
    Ok(material)
}

/// Writes `target` atomically: `target.tmp` (mode 0600), fsync, rename, fsync the directory.
fn write_atomic(target: &Path, bytes: &[u8]) -> Result<(), KmsError> {
    let tmp = with_suffix(target, ".tmp");
    let res = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        // In case a stale temporary file had other permissions.
        f.set_permissions(Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, target)?;
        File::open(parent_dir(target))?.sync_all()
    })();
    res.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(target, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::cmk::{CmkVersion, WRAPPED_LEN, wrap_aad};
    use crate::kms::{KeyOrigin, KeyState};
    use std::time::Instant;

    impl LocalKeystore {
        fn state(&self) -> Result<State, KmsError> {
            Ok(self.load_existing()?.state)
        }
    }

    fn write_private(path: &Path, bytes: &[u8]) {
        fs::write(path, bytes).unwrap();
        fs::set_permissions(path, Permissions::from_mode(0o600)).unwrap();
    }

    fn user_key(
        ks: &LocalKeystore,
        alias: Option<&str>,
        description: &str,
    ) -> Result<KeyInfo, KmsError> {
        ks.create_key(&CreateKey {
            alias: alias.map(str::to_owned),
            description: description.to_owned(),
            external: false,
        })
    }

    fn pass(s: &str) -> Unlock {
        Unlock::Passphrase(Passphrase::new(s.to_owned()))
    }

    fn open(path: &Path, s: &str) -> Result<LocalKeystore, KmsError> {
        LocalKeystore::open_or_create_with_params(path, pass(s), KdfParams::for_tests())
    }

    fn vol(n: u8) -> [u8; 16] {
        [n; 16]
    }

    fn find(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn create_reopen_unwraps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/keystore.kms");
        let ks = open(&path, "pw").unwrap();
        let sid = ks.service_key_id();
        assert!(sid.starts_with("cmk-") && sid.len() == 20, "{sid}");
        assert_eq!(ks.path(), path);
        let ctx = EncryptionContext::for_volume(&vol(1));
        let (dk, wrapped) = ks.generate_data_key(None, &ctx).unwrap();
        assert_eq!(wrapped.cmk_id, sid);
        assert_eq!(wrapped.cmk_version, 1);
        assert_eq!(wrapped.ciphertext.len(), WRAPPED_LEN);
        assert_eq!(ks.decrypt(&wrapped, &ctx).unwrap().expose(), dk.expose());
        drop(ks);

        let ks = open(&path, "pw").unwrap();
        assert_eq!(ks.service_key_id(), sid);
        assert_eq!(ks.decrypt(&wrapped, &ctx).unwrap().expose(), dk.expose());
        // By alias too.
        let (_, w2) = ks.generate_data_key(Some("service"), &ctx).unwrap();
        assert_eq!(w2.cmk_id, sid);
        let (_, w3) = ks.generate_data_key(Some(&sid), &ctx).unwrap();
        assert_eq!(w3.cmk_id, sid);
        // Two DKs differ.
        let (dk2, _) = ks.generate_data_key(None, &ctx).unwrap();
        assert_ne!(dk2.expose(), dk.expose());
        let keys = ks.list_keys().unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kind, KeyKind::Service);
        assert_eq!(keys[0].alias.as_deref(), Some("service"));
        assert_eq!(
            keys[0]
                .versions
                .iter()
                .map(|v| v.version)
                .collect::<Vec<_>>(),
            vec![1]
        );
    }

    #[test]
    fn header_layout_matches_docs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks");
        let ks = open(&path, "pw").unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(&bytes[0..8], b"KMSFSKS\0");
        assert_eq!(bytes[8..10], 2u16.to_le_bytes());
        assert_eq!(bytes[10], UNLOCK_PASSPHRASE);
        assert_eq!(bytes[11..15], 1024u32.to_le_bytes());
        assert_eq!(bytes[15..19], 1u32.to_le_bytes());
        assert_eq!(bytes[19..23], 1u32.to_le_bytes());
        assert_eq!(HEADER_LEN, 103);
        assert_eq!(bytes[71..103], header_checksum(&bytes[..71]));
        let payload_len = ks.state().unwrap().encode().len();
        assert_eq!(bytes.len(), 103 + 12 + payload_len + 16);
        // One service key with alias "service", description of 41 bytes, no marks,
        // no volumes, the audit key and anchor.
        assert_eq!(
            payload_len,
            4 + (1 + 20 + 1 + 7 + 2 + 41 + 8 + 3 + 8 + 8 + 1 + 1 + 4 + 45) + 4 + 4 + 32 + 8 + 32
        );
    }

    #[test]
    fn wrong_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks");
        let ks = open(&path, "right").unwrap();
        // With a backup present too.
        ks.record_generation(&vol(1), 1).unwrap();
        drop(ks);
        match open(&path, "wrong") {
            Err(KmsError::WrongPassphrase { path: p }) => assert_eq!(p, path.display().to_string()),
            other => panic!("expected WrongPassphrase, got {other:?}"),
        }
        assert!(open(&path, "right").is_ok());
    }

    #[test]
    fn keyfile_unlock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks");
        let kf = dir.path().join("keyfile");
        write_private(&kf, &crypto::random_array::<64>());
        let ks = LocalKeystore::open_or_create(&path, Unlock::Keyfile(kf.clone())).unwrap();
        let ctx = EncryptionContext::for_volume(&vol(3));
        let (dk, w) = ks.generate_data_key(None, &ctx).unwrap();
        drop(ks);
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes[10], UNLOCK_KEYFILE);
        assert_eq!(bytes[11..23], [0u8; 12]);
        let ks = LocalKeystore::open_or_create(&path, Unlock::Keyfile(kf.clone())).unwrap();
        assert_eq!(ks.decrypt(&w, &ctx).unwrap().expose(), dk.expose());

        // Another keyfile is a wrong "passphrase".
        let kf2 = dir.path().join("keyfile2");
        write_private(&kf2, &crypto::random_array::<32>());
        assert!(matches!(
            LocalKeystore::open_or_create(&path, Unlock::Keyfile(kf2)),
            Err(KmsError::WrongPassphrase { .. })
        ));
        // A passphrase cannot open a keyfile keystore.
        assert!(matches!(
            open(&path, "pw"),
            Err(KmsError::UnlockMismatch {
                expected: "keyfile",
                given: "passphrase",
                ..
            })
        ));
        // Short and missing keyfiles are refused.
        let short = dir.path().join("short");
        write_private(&short, &[1u8; 31]);
        assert!(matches!(
            LocalKeystore::open_or_create(&dir.path().join("ks2"), Unlock::Keyfile(short)),
            Err(KmsError::Keyfile { .. })
        ));
        assert!(matches!(
            LocalKeystore::open_or_create(&path, Unlock::Keyfile(dir.path().join("nope"))),
            Err(KmsError::Keyfile { .. })
        ));
    }

    #[test]
    fn passphrase_keystore_refuses_keyfile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks");
        open(&path, "pw").unwrap();
        let kf = dir.path().join("keyfile");
        write_private(&kf, &[7u8; 32]);
        assert!(matches!(
            LocalKeystore::open_or_create(&path, Unlock::Keyfile(kf)),
            Err(KmsError::UnlockMismatch {
                expected: "passphrase",
                ..
            })
        ));
    }

    #[test]
    fn wrong_context_fails() {
        let dir = tempfile::tempdir().unwrap();
        let ks = open(&dir.path().join("ks"), "pw").unwrap();
        let ctx = EncryptionContext::for_volume(&vol(1));
        let (_, w) = ks.generate_data_key(None, &ctx).unwrap();
        let other = EncryptionContext::for_volume(&vol(2));
        assert!(matches!(
            ks.decrypt(&w, &other),
            Err(KmsError::UnwrapFailed)
        ));
        assert!(matches!(
            ks.decrypt(&w, &ctx.clone().with("extra", "x")),
            Err(KmsError::UnwrapFailed)
        ));
        assert!(matches!(
            ks.re_encrypt(&w, &other, None),
            Err(KmsError::UnwrapFailed)
        ));
        let mut bad = w.clone();
        bad.ciphertext[20] ^= 1;
        assert!(matches!(
            ks.decrypt(&bad, &ctx),
            Err(KmsError::UnwrapFailed)
        ));
        let mut bad = w.clone();
        bad.ciphertext.pop();
        assert!(matches!(
            ks.decrypt(&bad, &ctx),
            Err(KmsError::UnwrapFailed)
        ));
        let mut bad = w.clone();
        bad.cmk_version = 2;
        assert!(matches!(
            ks.decrypt(&bad, &ctx),
            Err(KmsError::KeyVersionNotFound { version: 2, .. })
        ));
        let mut bad = w.clone();
        bad.cmk_id = "cmk-0000000000000000".into();
        assert!(matches!(
            ks.decrypt(&bad, &ctx),
            Err(KmsError::KeyNotFound(_))
        ));
        assert!(matches!(
            ks.generate_data_key(Some("nope"), &ctx),
            Err(KmsError::KeyNotFound(_))
        ));
        // A wrap from another keystore (same ids impossible, but same context) fails.
        let ks2 = open(&dir.path().join("ks2"), "pw").unwrap();
        let mut foreign = ks2.generate_data_key(None, &ctx).unwrap().1;
        foreign.cmk_id = ks.service_key_id();
        assert!(matches!(
            ks.decrypt(&foreign, &ctx),
            Err(KmsError::UnwrapFailed)
        ));
    }

    #[test]
    fn tampered_keystore_falls_back_to_backup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks");
        let ks = open(&path, "pw").unwrap();
        let ctx = EncryptionContext::for_volume(&vol(1));
        let (dk, w) = ks.generate_data_key(None, &ctx).unwrap();
        drop(ks);
        let original = fs::read(&path).unwrap();
        fs::remove_file(with_suffix(&path, ".bak")).unwrap();

        // No backup: every single-byte change is refused.
        for pos in [0, 9, 10, 12, 30, 50, HEADER_LEN + 3, original.len() - 1] {
            let mut bad = original.clone();
            bad[pos] ^= 0x04;
            fs::write(&path, &bad).unwrap();
            let err = open(&path, "pw").unwrap_err();
            assert!(
                matches!(
                    err,
                    KmsError::Corrupt { .. }
                        | KmsError::WrongPassphrase { .. }
                        | KmsError::UnsupportedVersion { .. }
                ),
                "byte {pos}: {err:?}"
            );
            // Payload damage is reported as corruption, not as a wrong passphrase.
            if pos >= HEADER_LEN {
                assert!(matches!(err, KmsError::Corrupt { .. }), "{err:?}");
            }
        }
        fs::write(&path, &original[..original.len() - 5]).unwrap();
        assert!(matches!(open(&path, "pw"), Err(KmsError::Corrupt { .. })));
        fs::write(&path, &original).unwrap();

        // An update keeps the previous version as the backup.
        let ks = open(&path, "pw").unwrap();
        ks.record_generation(&vol(9), 5).unwrap();
        drop(ks);
        assert_eq!(fs::read(with_suffix(&path, ".bak")).unwrap(), original);

        // Damaged payload, header, or truncation: opens from the backup.
        let current = fs::read(&path).unwrap();
        let mut cases = Vec::new();
        let mut bad = current.clone();
        bad[HEADER_LEN + 10] ^= 0x80;
        cases.push(bad);
        let mut bad = current.clone();
        bad[30] ^= 0x01; // salt
        cases.push(bad);
        cases.push(current[..current.len() / 2].to_vec());
        cases.push(Vec::new());
        for bad in cases {
            fs::write(&path, &bad).unwrap();
            let ks = open(&path, "pw").unwrap();
            assert_eq!(ks.decrypt(&w, &ctx).unwrap().expose(), dk.expose());
            // The backup predates the mark.
            assert_eq!(ks.generation_mark(&vol(9)).unwrap(), None);
            // The wrong passphrase is still refused as such.
            assert!(matches!(
                open(&path, "nope"),
                Err(KmsError::WrongPassphrase { .. })
            ));
        }
        // Main file missing: the backup is used as well.
        fs::remove_file(&path).unwrap();
        let ks = open(&path, "pw").unwrap();
        assert_eq!(ks.decrypt(&w, &ctx).unwrap().expose(), dk.expose());

        // The next update rewrites the main file from the backup, and keeps the backup.
        ks.record_generation(&vol(9), 6).unwrap();
        assert_eq!(fs::read(with_suffix(&path, ".bak")).unwrap(), original);
        drop(ks);
        let ks = open(&path, "pw").unwrap();
        assert_eq!(ks.generation_mark(&vol(9)).unwrap(), Some(6));
        drop(ks);

        // Both damaged: corruption is reported.
        fs::write(&path, b"garbage").unwrap();
        fs::write(with_suffix(&path, ".bak"), b"garbage").unwrap();
        assert!(matches!(open(&path, "pw"), Err(KmsError::Corrupt { .. })));
    }

    #[test]
    fn kdf_params_out_of_bounds_refused_before_argon2() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks");
        drop(open(&path, "pw").unwrap());
        let original = fs::read(&path).unwrap();
        let cases: [(usize, u32); 5] = [
            (11, 4 << 20),   // m = 4 GiB
            (11, u32::MAX),  // m = 4 TiB
            (11, 16),        // m too small
            (15, 1_000_000), // t
            (19, 1000),      // p
        ];
        for (offset, value) in cases {
            let mut bad = original.clone();
            bad[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
            // Whoever edits the file can recompute the keyless checksum too.
            let sum = header_checksum(&bad[..HEADER_LEN_V1]);
            bad[HEADER_LEN_V1..HEADER_LEN].copy_from_slice(&sum);
            fs::write(&path, &bad).unwrap();
            let start = Instant::now();
            match open(&path, "pw") {
                Err(KmsError::Corrupt { detail, .. }) => {
                    assert!(detail.contains("out of bounds"), "{detail}");
                }
                other => panic!("expected Corrupt, got {other:?}"),
            }
            assert!(start.elapsed().as_secs() < 5, "Argon2 must not run");
        }
        // Creating with out-of-bounds parameters is refused too.
        let huge = KdfParams {
            m_cost_kib: 4 << 20,
            t_cost: 3,
            p_cost: 1,
        };
        assert!(matches!(
            LocalKeystore::open_or_create_with_params(&dir.path().join("new"), pass("pw"), huge),
            Err(KmsError::InvalidParams(_))
        ));
        assert!(matches!(
            LocalKeystore::open_or_create_with_params(
                &dir.path().join("empty"),
                pass(""),
                KdfParams::for_tests()
            ),
            Err(KmsError::InvalidParams(_))
        ));
    }

    #[test]
    fn unknown_version_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks");
        drop(open(&path, "pw").unwrap());
        let mut bytes = fs::read(&path).unwrap();
        bytes[8..10].copy_from_slice(&3u16.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        let _ = fs::remove_file(with_suffix(&path, ".bak"));
        match open(&path, "pw") {
            Err(
                e @ KmsError::UnsupportedVersion {
                    found: 3,
                    supported: 2,
                    ..
                },
            ) => assert!(e.to_string().contains("upgrade kmsfs")),
            other => panic!("expected UnsupportedVersion, got {other:?}"),
        }
    }

    #[test]
    fn file_modes() {
        let dir = tempfile::tempdir().unwrap();
        let kdir = dir.path().join("keys");
        let path = kdir.join("ks");
        let ks = open(&path, "pw").unwrap();
        ks.record_generation(&vol(1), 1).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&with_suffix(&path, ".bak")), 0o600);
        assert_eq!(mode(&with_suffix(&path, ".lock")), 0o600);
        assert_eq!(mode(&kdir), 0o700);
        assert!(!with_suffix(&path, ".tmp").exists());
        assert!(!with_suffix(&path, ".bak.tmp").exists());
    }

    #[test]
    fn no_plaintext_keys_in_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks");
        let ks = open(&path, "pw").unwrap();
        user_key(&ks, Some("user-key"), "a user key").unwrap();
        let ctx = EncryptionContext::for_volume(&vol(1));
        let (dk, _) = ks.generate_data_key(None, &ctx).unwrap();
        let (dk2, _) = ks.generate_data_key(Some("user-key"), &ctx).unwrap();
        ks.record_generation(&vol(1), 1).unwrap();
        let state = ks.state().unwrap();
        let mut secrets: Vec<Vec<u8>> = vec![dk.expose().to_vec(), dk2.expose().to_vec()];
        for c in &state.cmks {
            for v in &c.versions {
                secrets.push(v.material.as_ref().unwrap().expose().to_vec());
                // Even a 16-byte window of the key must not appear.
                secrets.push(v.material.as_ref().unwrap().expose()[8..24].to_vec());
            }
        }
        assert_eq!(secrets.len(), 2 + 2 * 2);
        for file in [path.clone(), with_suffix(&path, ".bak")] {
            let bytes = fs::read(&file).unwrap();
            for s in &secrets {
                assert!(!find(&bytes, s), "secret bytes found in {}", file.display());
            }
            assert!(!find(&bytes, b"user-key"), "metadata is sealed too");
        }
    }

    #[test]
    fn generation_marks_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks");
        let ks = open(&path, "pw").unwrap();
        assert_eq!(ks.generation_mark(&vol(1)).unwrap(), None);
        ks.record_generation(&vol(1), 0).unwrap();
        assert_eq!(ks.generation_mark(&vol(1)).unwrap(), Some(0));
        ks.record_generation(&vol(1), 7).unwrap();
        ks.record_generation(&vol(2), 3).unwrap();
        // The mark never goes down.
        ks.record_generation(&vol(1), 5).unwrap();
        assert_eq!(ks.generation_mark(&vol(1)).unwrap(), Some(7));
        drop(ks);
        let ks = open(&path, "pw").unwrap();
        assert_eq!(ks.generation_mark(&vol(1)).unwrap(), Some(7));
        assert_eq!(ks.generation_mark(&vol(2)).unwrap(), Some(3));
        assert_eq!(ks.generation_mark(&vol(3)).unwrap(), None);
        ks.record_generation(&vol(1), u64::MAX).unwrap();
        assert_eq!(ks.generation_mark(&vol(1)).unwrap(), Some(u64::MAX));
    }

    #[test]
    fn re_encrypt_same_and_other_key() {
        let dir = tempfile::tempdir().unwrap();
        let ks = open(&dir.path().join("ks"), "pw").unwrap();
        let ctx = EncryptionContext::for_volume(&vol(4));
        let (dk, w) = ks.generate_data_key(None, &ctx).unwrap();
        let w2 = ks.re_encrypt(&w, &ctx, None).unwrap();
        assert_eq!(w2.cmk_id, w.cmk_id);
        assert_ne!(w2.ciphertext, w.ciphertext);
        assert_eq!(ks.decrypt(&w2, &ctx).unwrap().expose(), dk.expose());

        let user = user_key(&ks, Some("archive"), "for archives").unwrap();
        assert_eq!(user.kind, KeyKind::User);
        assert_eq!(user.origin, KeyOrigin::Generated);
        assert_eq!(user.state, KeyState::Enabled);
        let w3 = ks.re_encrypt(&w, &ctx, Some("archive")).unwrap();
        assert_eq!(w3.cmk_id, user.id);
        assert_eq!(ks.decrypt(&w3, &ctx).unwrap().expose(), dk.expose());
        let w4 = ks
            .re_encrypt(&w3, &ctx, Some(&ks.service_key_id()))
            .unwrap();
        assert_eq!(ks.decrypt(&w4, &ctx).unwrap().expose(), dk.expose());
        assert!(matches!(
            user_key(&ks, Some("archive"), ""),
            Err(KmsError::AliasInUse(_))
        ));
        assert!(matches!(
            user_key(&ks, Some("cmk-x"), ""),
            Err(KmsError::InvalidKeyName(_))
        ));
        assert!(matches!(
            user_key(&ks, Some("has space"), ""),
            Err(KmsError::InvalidKeyName(_))
        ));
        let anon = user_key(&ks, None, "no alias").unwrap();
        assert_eq!(anon.alias, None);
        assert_eq!(ks.list_keys().unwrap().len(), 3);
    }

    /// Sets a key's state directly in the file.
    fn set_state(ks: &LocalKeystore, id: &str, state: KeyState, date: u64) {
        ks.run(None, true, |s, _| {
            let c = s.cmks.iter_mut().find(|c| c.id == id).unwrap();
            c.state = state;
            c.deletion_date = date;
            Ok(((), true))
        })
        .unwrap();
    }

    #[test]
    fn disabled_key_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks");
        let ks = open(&path, "pw").unwrap();
        let id = user_key(&ks, Some("k"), "").unwrap().id;
        let ctx = EncryptionContext::for_volume(&vol(1));
        let (_, w) = ks.generate_data_key(Some("k"), &ctx).unwrap();
        set_state(&ks, &id, KeyState::Disabled, 0);
        // Another instance (another process) sees the change.
        let other = open(&path, "pw").unwrap();
        for k in [&ks, &other] {
            match k.decrypt(&w, &ctx) {
                Err(e @ KmsError::KeyDisabled(_)) => {
                    assert!(e.to_string().contains(&format!("kmsfs key enable {id}")));
                }
                r => panic!("expected KeyDisabled, got {r:?}"),
            }
            assert!(matches!(
                k.generate_data_key(Some("k"), &ctx),
                Err(KmsError::KeyDisabled(_))
            ));
            assert!(matches!(
                k.re_encrypt(&w, &ctx, None),
                Err(KmsError::KeyDisabled(_))
            ));
        }
        set_state(&ks, &id, KeyState::PendingDeletion, 4_000_000_000);
        assert!(matches!(
            ks.decrypt(&w, &ctx),
            Err(KmsError::KeyPendingDeletion {
                deletion_date: 4_000_000_000,
                ..
            })
        ));
        set_state(&ks, &id, KeyState::Enabled, 0);
        assert!(ks.decrypt(&w, &ctx).is_ok());
    }

    #[test]
    fn rotation_old_versions_still_unwrap() {
        let dir = tempfile::tempdir().unwrap();
        let ks = open(&dir.path().join("ks"), "pw").unwrap();
        let ctx = EncryptionContext::for_volume(&vol(1));
        let (dk, w1) = ks.generate_data_key(None, &ctx).unwrap();
        let sid = ks.service_key_id();
        let k = ks.change_key(&sid, KeyChange::Rotate).unwrap();
        assert_eq!(k.primary_version, Some(2));
        let (_, w2) = ks.generate_data_key(None, &ctx).unwrap();
        assert_eq!(w2.cmk_version, 2);
        assert_eq!(ks.decrypt(&w1, &ctx).unwrap().expose(), dk.expose());
        let rw = ks.re_encrypt(&w1, &ctx, None).unwrap();
        assert_eq!(rw.cmk_version, 2);
        assert_eq!(ks.decrypt(&rw, &ctx).unwrap().expose(), dk.expose());
        // A wrap claiming the other version fails.
        let mut wrong = w1.clone();
        wrong.cmk_version = 2;
        assert!(matches!(
            ks.decrypt(&wrong, &ctx),
            Err(KmsError::UnwrapFailed)
        ));
    }

    #[test]
    fn concurrent_updates_are_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks");
        drop(open(&path, "pw").unwrap());
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let path = &path;
                s.spawn(move || {
                    // Separate instances, as separate processes would have.
                    let ks = open(path, "pw").unwrap();
                    for g in 1..=5u64 {
                        ks.record_generation(&vol(t), g).unwrap();
                    }
                });
            }
        });
        let ks = open(&path, "pw").unwrap();
        for t in 0..4u8 {
            assert_eq!(ks.generation_mark(&vol(t)).unwrap(), Some(5));
        }
    }

    #[test]
    fn payload_roundtrip_and_strict_decoding() {
        let mut state = State::new();
        let mut c = Cmk::generate(
            "cmk-0011223344556677".into(),
            Some("service".into()),
            "déscription".into(),
            KeyKind::Service,
            7,
        );
        c.versions.push(CmkVersion {
            version: 3,
            created: 42,
            material: Some(SecretKey::random()),
        });
        state.cmks.push(c);
        state.marks.insert(vol(1), 10);
        state.marks.insert(vol(2), 20);
        let bytes = state.encode();
        let back = State::decode(&bytes, 2).unwrap();
        assert_eq!(back.encode()[..], bytes[..]);
        assert_eq!(back.cmks[0].versions.len(), 2);
        assert_eq!(back.marks.get(&vol(2)), Some(&20));
        // Trailing bytes and every truncation are refused.
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(State::decode(&longer, 2).is_err());
        for cut in 0..bytes.len() {
            assert!(State::decode(&bytes[..cut], 2).is_err(), "cut {cut}");
        }
        // No service key.
        let mut none = State::new();
        none.cmks.push(Cmk::generate(
            "cmk-1".into(),
            None,
            String::new(),
            KeyKind::User,
            7,
        ));
        assert!(State::decode(&none.encode(), 2).is_err());
        // Huge counts do not allocate.
        assert!(State::decode(&u32::MAX.to_le_bytes(), 2).is_err());
        assert!(State::decode(&u32::MAX.to_le_bytes(), 1).is_err());
        let _ = KeyOrigin::Generated;
    }

    #[test]
    fn wrap_aad_is_unambiguous() {
        let ctx = EncryptionContext::new();
        assert_ne!(wrap_aad("cmk-a", 1, &ctx), wrap_aad("cmk-a\x01", 0, &ctx));
        assert!(wrap_aad("cmk-a", 1, &ctx).starts_with(WRAP_AAD_PREFIX));
    }

    /// Issue 8: a damaged salt, parameter or key check is a damaged keystore, never a
    /// wrong passphrase (format 2 checks a key-independent checksum first).
    #[test]
    fn damaged_header_is_corrupt_not_wrong_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks");
        drop(open(&path, "pw").unwrap());
        let original = fs::read(&path).unwrap();
        for pos in (10..HEADER_LEN).step_by(3) {
            let mut bad = original.clone();
            bad[pos] ^= 0x10;
            fs::write(&path, &bad).unwrap();
            match open(&path, "pw") {
                Err(e @ KmsError::Corrupt { .. }) => {
                    let m = e.to_string();
                    assert!(m.contains("damaged"), "byte {pos}: {m}");
                    assert!(!m.contains("wrong passphrase"), "byte {pos}: {m}");
                }
                other => panic!("byte {pos}: expected Corrupt, got {other:?}"),
            }
        }
        // The wrong passphrase on an intact file is still said as such.
        fs::write(&path, &original).unwrap();
        assert!(matches!(
            open(&path, "nope"),
            Err(KmsError::WrongPassphrase { .. })
        ));
    }

    /// A damaged audit log stops every key operation (fail closed) until it is reset;
    /// the reset keeps the old log aside and starts a chain that verifies.
    #[test]
    fn damaged_audit_log_fails_closed_until_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks");
        let ks = open(&path, "pw").unwrap();
        let ctx = EncryptionContext::for_volume(&vol(1));
        let (_, w) = ks.generate_data_key(None, &ctx).unwrap();
        ks.decrypt(&w, &ctx).unwrap();
        assert_eq!(ks.audit_verify().unwrap().records, 3);
        let log = with_suffix(&path, ".audit");
        let mut bytes = fs::read(&log).unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 1; // the last record's MAC
        fs::write(&log, &bytes).unwrap();
        let e = ks.decrypt(&w, &ctx).unwrap_err();
        assert!(e.to_string().contains("kmsfs audit reset"), "{e}");
        assert!(ks.audit_verify().is_err());
        let moved = ks.audit_reset().unwrap().unwrap();
        assert_eq!(fs::read(&moved).unwrap(), bytes);
        ks.decrypt(&w, &ctx).unwrap();
        let r = ks.audit_verify().unwrap();
        assert_eq!(r.records, 2);
        let (_, recs) = ks.audit_records().unwrap();
        assert_eq!(recs[0].record.op, AuditOp::Restore);
        assert!(recs[0].record.reason.contains("reset"));
        assert_eq!(recs[1].record.op, AuditOp::Decrypt);
    }
}
