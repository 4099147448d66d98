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
mod tests;
