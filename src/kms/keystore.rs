//! The embedded keystore: one file holding the CMKs and the volumes' generation marks,
//! sealed by a key derived from a passphrase (Argon2id) or a keyfile (HKDF).
//!
//! The byte layout is specified in `docs/KEYSTORE-FORMAT.md`. In short:
//!
//! ```text
//! header (71 bytes): magic "KMSFSKS\0" | version u16 | unlock kind u8 | Argon2id m, t, p u32
//!                    | salt [16] | key check [32] = HMAC(check key, the 39 bytes before)
//! body:              AES-256-GCM-SIV(seal key, AAD = the 71 header bytes, payload)
//! ```
//!
//! Files, all in the keystore's directory (created mode 0700):
//! - `PATH`: the keystore (mode 0600), replaced atomically (write `PATH.tmp`, fsync, rename,
//!   fsync the directory);
//! - `PATH.bak`: the previous version, replaced atomically before each update;
//! - `PATH.lock`: `flock`ed around every read-modify-write, so concurrent processes do not
//!   lose each other's updates (the file is re-read under the lock before modifying).
//!
//! Every operation re-reads the file, so a key disabled by another process is refused at
//! once. The unlock key is derived once per (salt, parameters) and cached in memory.

use core::fmt;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use zeroize::{Zeroize, Zeroizing};

use super::{
    EncryptionContext, KeyInfo, KeyKind, KeyOrigin, KeyState, Kms, KmsError, WrappedKey, hex,
};
use crate::crypto::{
    self, CipherKind, DataKey, KEY_LEN, KdfParams, Passphrase, Sealer, SecretKey, labels,
};

/// First 8 bytes of every keystore file.
pub const MAGIC: [u8; 8] = *b"KMSFSKS\0";
/// The format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u16 = 1;
/// Length of the fixed header (everything before the sealed payload).
pub const HEADER_LEN: usize = PREFIX_LEN + CHECK_LEN;
/// Smallest keyfile accepted.
pub const MIN_KEYFILE_LEN: u64 = 32;
/// Largest keyfile accepted.
pub const MAX_KEYFILE_LEN: u64 = 1 << 20;
/// Largest keystore file read.
pub const MAX_FILE_LEN: u64 = 64 << 20;
/// Alias of the service key.
pub const SERVICE_ALIAS: &str = "service";
/// Prefix of the AAD of every DK wrap.
pub const WRAP_AAD_PREFIX: &[u8] = b"kmsfs-wrap-v1";

const UNLOCK_PASSPHRASE: u8 = 1;
const UNLOCK_KEYFILE: u8 = 2;
const SALT_LEN: usize = 16;
const CHECK_LEN: usize = 32;
/// magic, version, unlock kind, m, t, p, salt.
const PREFIX_LEN: usize = 8 + 2 + 1 + 4 + 4 + 4 + SALT_LEN;
const SEAL_CIPHER: CipherKind = CipherKind::Aes256GcmSiv;
const WRAP_CIPHER: CipherKind = CipherKind::Aes256GcmSiv;
/// Sealed DK: nonce, 32 key bytes, tag.
const WRAPPED_LEN: usize = 12 + KEY_LEN + crypto::TAG_LEN;
const MAX_ID_LEN: usize = 64;
const MAX_ALIAS_LEN: usize = 64;
const MAX_DESCRIPTION_LEN: usize = 1024;
/// Encoded size of one CMK version: version u32, created u64, material.
const VERSION_RECORD_LEN: usize = 4 + 8 + KEY_LEN;
/// Encoded size of one generation mark: volume id, generation u64.
const MARK_RECORD_LEN: usize = 16 + 8;
/// Smallest encoded CMK record (empty strings, one version).
const MIN_CMK_RECORD_LEN: usize = 1 + 1 + 2 + 8 + 1 + 1 + 1 + 8 + 4 + VERSION_RECORD_LEN;

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
    fn prefix(&self) -> [u8; PREFIX_LEN] {
        let mut p = [0u8; PREFIX_LEN];
        p[0..8].copy_from_slice(&MAGIC);
        p[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        p[10] = self.unlock_kind;
        p[11..15].copy_from_slice(&self.params.m_cost_kib.to_le_bytes());
        p[15..19].copy_from_slice(&self.params.t_cost.to_le_bytes());
        p[19..23].copy_from_slice(&self.params.p_cost.to_le_bytes());
        p[23..39].copy_from_slice(&self.salt);
        p
    }
}

struct CachedKey {
    header: Header,
    key: SecretKey,
}

struct CmkVersion {
    version: u32,
    created: u64,
    material: SecretKey,
}

struct Cmk {
    id: String,
    alias: Option<String>,
    description: String,
    created: u64,
    kind: KeyKind,
    origin: KeyOrigin,
    state: KeyState,
    /// Unix seconds; 0 = none.
    deletion_date: u64,
    /// Oldest first, strictly increasing version numbers, never empty.
    versions: Vec<CmkVersion>,
}

impl Cmk {
    fn generate(id: String, alias: Option<String>, description: String, kind: KeyKind) -> Self {
        let created = now();
        Self {
            id,
            alias,
            description,
            created,
            kind,
            origin: KeyOrigin::Generated,
            state: KeyState::Enabled,
            deletion_date: 0,
            versions: vec![CmkVersion {
                version: 1,
                created,
                material: SecretKey::random(),
            }],
        }
    }

    fn info(&self) -> KeyInfo {
        KeyInfo {
            id: self.id.clone(),
            alias: self.alias.clone(),
            description: self.description.clone(),
            created: self.created,
            state: self.state,
            deletion_date: (self.deletion_date != 0).then_some(self.deletion_date),
            kind: self.kind,
            origin: self.origin,
            versions: self.versions.iter().map(|v| v.version).collect(),
        }
    }

    fn check_usable(&self) -> Result<(), KmsError> {
        match self.state {
            KeyState::Enabled => Ok(()),
            KeyState::Disabled => Err(KmsError::KeyDisabled(self.id.clone())),
            KeyState::PendingDeletion => Err(KmsError::KeyPendingDeletion {
                id: self.id.clone(),
                deletion_date: self.deletion_date,
            }),
        }
    }

    fn newest(&self) -> &CmkVersion {
        self.versions
            .last()
            .expect("a CMK always has at least one version (checked when decoding)")
    }

    fn version(&self, version: u32) -> Result<&CmkVersion, KmsError> {
        self.versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| KmsError::KeyVersionNotFound {
                id: self.id.clone(),
                version,
            })
    }

    fn wrap(&self, dk: &DataKey, ctx: &EncryptionContext) -> WrappedKey {
        let v = self.newest();
        let sealer = Sealer::new(
            WRAP_CIPHER,
            &crypto::derive_subkey(&v.material, labels::CMK_WRAP),
        );
        WrappedKey {
            cmk_id: self.id.clone(),
            cmk_version: v.version,
            ciphertext: sealer.seal(&wrap_aad(&self.id, v.version, ctx), dk.expose()),
        }
    }

    fn unwrap(&self, wrapped: &WrappedKey, ctx: &EncryptionContext) -> Result<DataKey, KmsError> {
        let v = self.version(wrapped.cmk_version)?;
        if wrapped.ciphertext.len() != WRAPPED_LEN {
            return Err(KmsError::UnwrapFailed);
        }
        let sealer = Sealer::new(
            WRAP_CIPHER,
            &crypto::derive_subkey(&v.material, labels::CMK_WRAP),
        );
        let mut dk = [0u8; KEY_LEN];
        let res = sealer.open_into(
            &wrap_aad(&self.id, v.version, ctx),
            &wrapped.ciphertext,
            &mut dk,
        );
        let key = res.ok().and_then(|()| SecretKey::from_slice(&dk));
        dk.zeroize();
        key.ok_or(KmsError::UnwrapFailed)
    }
}

/// `"kmsfs-wrap-v1" || u16 LE id length || id || u32 LE version || ctx.canonical_bytes()`.
fn wrap_aad(cmk_id: &str, version: u32, ctx: &EncryptionContext) -> Vec<u8> {
    let id_len = u16::try_from(cmk_id.len()).expect("CMK ids are at most 64 bytes");
    let mut aad = Vec::new();
    aad.extend_from_slice(WRAP_AAD_PREFIX);
    aad.extend_from_slice(&id_len.to_le_bytes());
    aad.extend_from_slice(cmk_id.as_bytes());
    aad.extend_from_slice(&version.to_le_bytes());
    aad.extend_from_slice(&ctx.canonical_bytes());
    aad
}

/// The decrypted contents of the keystore.
#[derive(Default)]
struct State {
    cmks: Vec<Cmk>,
    marks: BTreeMap<[u8; 16], u64>,
}

impl State {
    fn service(&self) -> &Cmk {
        self.cmks
            .iter()
            .find(|c| c.kind == KeyKind::Service)
            .expect("a keystore always has a service key (checked when decoding)")
    }

    /// By id or alias; `None` = the service key.
    fn resolve(&self, name: Option<&str>) -> Result<&Cmk, KmsError> {
        match name {
            None => Ok(self.service()),
            Some(n) => self
                .cmks
                .iter()
                .find(|c| c.id == n || c.alias.as_deref() == Some(n))
                .ok_or_else(|| KmsError::KeyNotFound(n.to_owned())),
        }
    }

    fn by_id(&self, id: &str) -> Result<&Cmk, KmsError> {
        self.cmks
            .iter()
            .find(|c| c.id == id)
            .ok_or_else(|| KmsError::KeyNotFound(id.to_owned()))
    }

    fn new_id(&self) -> String {
        loop {
            let id = format!("cmk-{}", hex(&crypto::random_array::<8>()));
            if !self.cmks.iter().any(|c| c.id == id) {
                return id;
            }
        }
    }

    fn encoded_len(&self) -> usize {
        let cmks: usize = self
            .cmks
            .iter()
            .map(|c| {
                MIN_CMK_RECORD_LEN - VERSION_RECORD_LEN
                    + c.id.len()
                    + c.alias.as_ref().map_or(0, String::len)
                    + c.description.len()
                    + c.versions.len() * VERSION_RECORD_LEN
            })
            .sum();
        4 + cmks + 4 + self.marks.len() * MARK_RECORD_LEN
    }

    /// The payload, in a buffer zeroized on drop (allocated once at its final size).
    fn encode(&self) -> Zeroizing<Vec<u8>> {
        fn len8(s: &str) -> u8 {
            u8::try_from(s.len()).expect("ids and aliases are at most 64 bytes")
        }
        let mut out = Zeroizing::new(Vec::with_capacity(self.encoded_len()));
        let o = &mut *out;
        o.extend_from_slice(&count_u32(self.cmks.len()).to_le_bytes());
        for c in &self.cmks {
            o.push(len8(&c.id));
            o.extend_from_slice(c.id.as_bytes());
            let alias = c.alias.as_deref().unwrap_or("");
            o.push(len8(alias));
            o.extend_from_slice(alias.as_bytes());
            let desc_len =
                u16::try_from(c.description.len()).expect("descriptions are at most 1024 bytes");
            o.extend_from_slice(&desc_len.to_le_bytes());
            o.extend_from_slice(c.description.as_bytes());
            o.extend_from_slice(&c.created.to_le_bytes());
            o.push(c.kind as u8);
            o.push(c.origin as u8);
            o.push(c.state as u8);
            o.extend_from_slice(&c.deletion_date.to_le_bytes());
            o.extend_from_slice(&count_u32(c.versions.len()).to_le_bytes());
            for v in &c.versions {
                o.extend_from_slice(&v.version.to_le_bytes());
                o.extend_from_slice(&v.created.to_le_bytes());
                o.extend_from_slice(v.material.expose());
            }
        }
        o.extend_from_slice(&count_u32(self.marks.len()).to_le_bytes());
        for (id, generation) in &self.marks {
            o.extend_from_slice(id);
            o.extend_from_slice(&generation.to_le_bytes());
        }
        debug_assert_eq!(o.len(), self.encoded_len());
        out
    }

    fn decode(payload: &[u8]) -> Result<Self, String> {
        let mut r = Reader {
            buf: payload,
            pos: 0,
        };
        let cmk_count = r.count("CMK count", MIN_CMK_RECORD_LEN)?;
        let mut state = State::default();
        for i in 0..cmk_count {
            let cmk = decode_cmk(&mut r).map_err(|e| format!("CMK record {i}: {e}"))?;
            if state.cmks.iter().any(|c| c.id == cmk.id) {
                return Err(format!("CMK id {} appears twice", cmk.id));
            }
            if let Some(a) = &cmk.alias
                && state.cmks.iter().any(|c| c.alias.as_ref() == Some(a))
            {
                return Err(format!("alias {a} appears twice"));
            }
            state.cmks.push(cmk);
        }
        let services: Vec<&Cmk> = state
            .cmks
            .iter()
            .filter(|c| c.kind == KeyKind::Service)
            .collect();
        match services.as_slice() {
            [s] if s.state == KeyState::Enabled => {}
            [s] => return Err(format!("the service key {} is not enabled", s.id)),
            _ => {
                return Err(format!(
                    "{} service keys instead of exactly one",
                    services.len()
                ));
            }
        }
        let mark_count = r.count("generation mark count", MARK_RECORD_LEN)?;
        for _ in 0..mark_count {
            let id: [u8; 16] = r.array("volume id")?;
            let generation = r.u64("generation")?;
            if let Some((last, _)) = state.marks.last_key_value()
                && *last >= id
            {
                return Err("generation marks are not sorted by volume id".into());
            }
            state.marks.insert(id, generation);
        }
        if r.pos != payload.len() {
            return Err(format!(
                "{} unexpected bytes after the payload",
                payload.len() - r.pos
            ));
        }
        Ok(state)
    }
}

/// Decodes a keystore payload (the plaintext inside the sealed body) and drops it:
/// the entry point the decoder fuzz tests use to reach [`State`] decoding without
/// sealing every input. Never panics, whatever the bytes.
///
/// # Errors
/// What is malformed, as in [`KmsError::Corrupt`] details.
#[doc(hidden)]
pub fn decode_payload(payload: &[u8]) -> Result<(), String> {
    State::decode(payload).map(drop)
}

fn decode_cmk(r: &mut Reader<'_>) -> Result<Cmk, String> {
    let id_len = usize::from(r.u8("id length")?);
    let id = r.string(id_len, "id")?;
    validate_id(&id)?;
    let alias_len = usize::from(r.u8("alias length")?);
    let alias = if alias_len == 0 {
        None
    } else {
        let a = r.string(alias_len, "alias")?;
        validate_alias(&a)?;
        Some(a)
    };
    let desc_len = usize::from(r.u16("description length")?);
    if desc_len > MAX_DESCRIPTION_LEN {
        return Err(format!("description of {desc_len} bytes is too long"));
    }
    let description = r.string(desc_len, "description")?;
    let created = r.u64("creation time")?;
    let kind = r.u8("kind")?;
    let kind = KeyKind::from_u8(kind).ok_or_else(|| format!("unknown kind {kind}"))?;
    let origin = r.u8("origin")?;
    let origin = KeyOrigin::from_u8(origin).ok_or_else(|| format!("unknown origin {origin}"))?;
    let state = r.u8("state")?;
    let state = KeyState::from_u8(state).ok_or_else(|| format!("unknown state {state}"))?;
    let deletion_date = r.u64("deletion date")?;
    if (state == KeyState::PendingDeletion) != (deletion_date != 0) {
        return Err(format!(
            "deletion date {deletion_date} does not match state {state:?}"
        ));
    }
    let version_count = r.count("version count", VERSION_RECORD_LEN)?;
    if version_count == 0 {
        return Err(format!("key {id} has no versions"));
    }
    let mut versions = Vec::with_capacity(version_count);
    for _ in 0..version_count {
        let version = r.u32("version")?;
        let created = r.u64("version creation time")?;
        let material = SecretKey::from_slice(r.take(KEY_LEN, "key material")?)
            .expect("took exactly KEY_LEN bytes");
        let last = versions.last().map_or(0, |v: &CmkVersion| v.version);
        if version <= last {
            return Err(format!(
                "key {id}: versions are not strictly increasing from 1"
            ));
        }
        versions.push(CmkVersion {
            version,
            created,
            material,
        });
    }
    Ok(Cmk {
        id,
        alias,
        description,
        created,
        kind,
        origin,
        state,
        deletion_date,
        versions,
    })
}

fn validate_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid key id {id:?}"))
    }
}

fn validate_alias(alias: &str) -> Result<(), String> {
    if alias.is_empty() || alias.len() > MAX_ALIAS_LEN {
        return Err(format!(
            "alias {alias:?} must be 1 to {MAX_ALIAS_LEN} bytes"
        ));
    }
    if !alias
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    {
        return Err(format!(
            "alias {alias:?} may only contain letters, digits, '-', '_', '.' and '/'"
        ));
    }
    if alias.starts_with("cmk-") {
        return Err(format!(
            "alias {alias:?} must not start with \"cmk-\" (reserved for key ids)"
        ));
    }
    Ok(())
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).expect("fewer than 2^32 records")
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.buf.len() - self.pos < n {
            return Err(format!("payload ends inside the {what}"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A record count, bounded by what the remaining bytes can hold.
    fn count(&mut self, what: &str, min_record_len: usize) -> Result<usize, String> {
        let n = usize::try_from(self.u32(what)?).map_err(|_| format!("{what} too large"))?;
        if n > (self.buf.len() - self.pos) / min_record_len {
            return Err(format!("{what} {n} exceeds the payload size"));
        }
        Ok(n)
    }

    fn string(&mut self, n: usize, what: &str) -> Result<String, String> {
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("the {what} is not UTF-8"))
    }
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

/// The embedded keystore. See the module documentation.
pub struct LocalKeystore {
    path: PathBuf,
    unlock: Unlock,
    cache: Mutex<Option<CachedKey>>,
    service_key_id: String,
}

impl fmt::Debug for LocalKeystore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalKeystore")
            .field("path", &self.path)
            .field("service_key_id", &self.service_key_id)
            .finish_non_exhaustive()
    }
}

impl LocalKeystore {
    /// Opens the keystore at `path`, creating it (with [`KdfParams::DEFAULT`] and a service
    /// key) if neither it nor its backup exists.
    ///
    /// # Errors
    /// [`KmsError::WrongPassphrase`], [`KmsError::Corrupt`], [`KmsError::UnsupportedVersion`],
    /// [`KmsError::UnlockMismatch`], [`KmsError::Keyfile`], [`KmsError::Io`].
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
        let mut ks = Self {
            path: path.to_path_buf(),
            unlock,
            cache: Mutex::new(None),
            service_key_id: String::new(),
        };
        let dir = parent_dir(path);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_err(dir, e))?;
        let _lock = ks.lock()?;
        let id = match ks.load()? {
            Some(loaded) => loaded.state.service().id.clone(),
            None => ks.create(params)?,
        };
        ks.service_key_id = id;
        Ok(ks)
    }

    /// The keystore file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id of the service key (alias `service`), used when no CMK is named.
    #[must_use]
    pub fn service_key_id(&self) -> String {
        self.service_key_id.clone()
    }

    /// Metadata of every CMK (no key material), in creation order.
    ///
    /// # Errors
    /// Keystore errors.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>, KmsError> {
        Ok(self.state()?.cmks.iter().map(Cmk::info).collect())
    }

    /// Creates a user CMK with generated material.
    ///
    /// # Errors
    /// [`KmsError::InvalidKeyName`] for a bad alias (1 to 64 of `A-Za-z0-9-_./`, not starting
    /// with `cmk-`) or a description over 1024 bytes, [`KmsError::AliasInUse`], keystore
    /// errors.
    pub fn create_key(&self, alias: Option<&str>, description: &str) -> Result<KeyInfo, KmsError> {
        if let Some(a) = alias {
            validate_alias(a).map_err(KmsError::InvalidKeyName)?;
        }
        if description.len() > MAX_DESCRIPTION_LEN {
            return Err(KmsError::InvalidKeyName(format!(
                "the description is longer than {MAX_DESCRIPTION_LEN} bytes"
            )));
        }
        self.update(|state| {
            if let Some(a) = alias
                && state.cmks.iter().any(|c| c.alias.as_deref() == Some(a))
            {
                return Err(KmsError::AliasInUse(a.to_owned()));
            }
            let cmk = Cmk::generate(
                state.new_id(),
                alias.map(str::to_owned),
                description.to_owned(),
                KeyKind::User,
            );
            let info = cmk.info();
            state.cmks.push(cmk);
            Ok((info, true))
        })
    }

    fn create(&self, params: KdfParams) -> Result<String, KmsError> {
        let header = match &self.unlock {
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
        };
        let mut state = State::default();
        let service = Cmk::generate(
            state.new_id(),
            Some(SERVICE_ALIAS.to_owned()),
            "kmsfs service key (created automatically)".to_owned(),
            KeyKind::Service,
        );
        let id = service.id.clone();
        state.cmks.push(service);
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

    /// The current contents (re-read from disk).
    fn state(&self) -> Result<State, KmsError> {
        Ok(self.load_existing()?.state)
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

    /// Read-modify-write under the lock. `f` returns its result and whether it changed
    /// the state (no write otherwise).
    fn update<R>(
        &self,
        f: impl FnOnce(&mut State) -> Result<(R, bool), KmsError>,
    ) -> Result<R, KmsError> {
        self.update_with(true, f)
    }

    /// [`Self::update`]; `backup`: also keep the previous version as `PATH.bak`.
    /// Generation marks skip that (a mark is raised by every commit of every
    /// mounted volume, and the backup's older mark only weakens the rollback
    /// check if the main file is lost, never loses a key).
    fn update_with<R>(
        &self,
        backup: bool,
        f: impl FnOnce(&mut State) -> Result<(R, bool), KmsError>,
    ) -> Result<R, KmsError> {
        let _lock = self.lock()?;
        let mut loaded = self.load_existing()?;
        let (r, changed) = f(&mut loaded.state)?;
        if changed {
            let bytes = self.encode_file(&loaded.header, &loaded.state)?;
            // Keep the previous, verified version as the backup. If it was itself read
            // from the backup (the main file is damaged), the backup stays as it is.
            // A backup is always made when there is none yet.
            let no_backup = !self.backup_path().exists();
            if (backup || no_backup) && !loaded.from_backup {
                write_atomic(&self.backup_path(), &loaded.bytes)?;
            }
            write_atomic(&self.path, &bytes)?;
        }
        Ok(r)
    }

    /// Reads `PATH`, falling back to `PATH.bak` if `PATH` is missing, corrupt or fails the
    /// key check while the backup opens. `None` if neither file exists.
    fn load(&self) -> Result<Option<Loaded>, KmsError> {
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
        if bytes.len() < HEADER_LEN + SEAL_CIPHER.overhead() {
            return Err(self.corrupt(format!("the file is truncated ({} bytes)", bytes.len())));
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
        if !crypto::ct_eq(&check, &bytes[PREFIX_LEN..HEADER_LEN]) {
            return Err(KmsError::WrongPassphrase {
                path: self.path_str(),
            });
        }
        *key_verified = true;
        let payload = Sealer::new(SEAL_CIPHER, &seal_key)
            .open(&bytes[..HEADER_LEN], &bytes[HEADER_LEN..])
            .map(Zeroizing::new)
            .map_err(|_| {
                self.corrupt("the sealed contents failed authentication (modified or truncated)")
            })?;
        let state = State::decode(&payload).map_err(|e| self.corrupt(e))?;
        Ok((header, state))
    }

    fn encode_file(&self, header: &Header, state: &State) -> Result<Vec<u8>, KmsError> {
        let (seal_key, check_key) = self.keys_for(header)?;
        let payload = state.encode();
        let prefix = header.prefix();
        let mut out = Vec::with_capacity(HEADER_LEN + SEAL_CIPHER.overhead() + payload.len());
        out.extend_from_slice(&prefix);
        out.extend_from_slice(&crypto::hmac_sha256(&check_key, &prefix));
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
        match &self.unlock {
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
}

const ZERO_PARAMS: KdfParams = KdfParams {
    m_cost_kib: 0,
    t_cost: 0,
    p_cost: 0,
};

impl Kms for LocalKeystore {
    fn generate_data_key(
        &self,
        cmk: Option<&str>,
        ctx: &EncryptionContext,
    ) -> Result<(DataKey, WrappedKey), KmsError> {
        let state = self.state()?;
        let cmk = state.resolve(cmk)?;
        cmk.check_usable()?;
        let dk = SecretKey::random();
        let wrapped = cmk.wrap(&dk, ctx);
        Ok((dk, wrapped))
    }

    fn decrypt(&self, wrapped: &WrappedKey, ctx: &EncryptionContext) -> Result<DataKey, KmsError> {
        let state = self.state()?;
        let cmk = state.by_id(&wrapped.cmk_id)?;
        cmk.check_usable()?;
        cmk.unwrap(wrapped, ctx)
    }

    fn re_encrypt(
        &self,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
        dest_cmk: Option<&str>,
    ) -> Result<WrappedKey, KmsError> {
        let state = self.state()?;
        let src = state.by_id(&wrapped.cmk_id)?;
        src.check_usable()?;
        let dk = src.unwrap(wrapped, ctx)?;
        let dest = match dest_cmk {
            Some(name) => state.resolve(Some(name))?,
            None => src,
        };
        dest.check_usable()?;
        Ok(dest.wrap(&dk, ctx))
    }

    fn generation_mark(&self, volume_id: &[u8; 16]) -> Result<Option<u64>, KmsError> {
        Ok(self.state()?.marks.get(volume_id).copied())
    }

    fn record_generation(&self, volume_id: &[u8; 16], generation: u64) -> Result<(), KmsError> {
        self.update_with(false, |state| match state.marks.get(volume_id) {
            Some(&mark) if mark >= generation => Ok(((), false)),
            _ => {
                state.marks.insert(*volume_id, generation);
                Ok(((), true))
            }
        })
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
    use std::time::Instant;

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
        assert_eq!(keys[0].versions, vec![1]);
    }

    #[test]
    fn header_layout_matches_docs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks");
        let ks = open(&path, "pw").unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(&bytes[0..8], b"KMSFSKS\0");
        assert_eq!(bytes[8..10], 1u16.to_le_bytes());
        assert_eq!(bytes[10], UNLOCK_PASSPHRASE);
        assert_eq!(bytes[11..15], 1024u32.to_le_bytes());
        assert_eq!(bytes[15..19], 1u32.to_le_bytes());
        assert_eq!(bytes[19..23], 1u32.to_le_bytes());
        assert_eq!(HEADER_LEN, 71);
        let payload_len = ks.state().unwrap().encode().len();
        assert_eq!(bytes.len(), 71 + 12 + payload_len + 16);
        // One service key with alias "service", description of 41 bytes, no marks.
        assert_eq!(
            payload_len,
            4 + (1 + 20 + 1 + 7 + 2 + 41 + 8 + 3 + 8 + 4 + 44) + 4
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
        fs::write(&kf, crypto::random_array::<64>()).unwrap();
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
        fs::write(&kf2, crypto::random_array::<32>()).unwrap();
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
        fs::write(&short, [1u8; 31]).unwrap();
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
        fs::write(&kf, [7u8; 32]).unwrap();
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

        // No backup yet: every single-byte change is refused.
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
        bytes[8..10].copy_from_slice(&2u16.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        match open(&path, "pw") {
            Err(
                e @ KmsError::UnsupportedVersion {
                    found: 2,
                    supported: 1,
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
        ks.create_key(Some("user-key"), "a user key").unwrap();
        let ctx = EncryptionContext::for_volume(&vol(1));
        let (dk, _) = ks.generate_data_key(None, &ctx).unwrap();
        let (dk2, _) = ks.generate_data_key(Some("user-key"), &ctx).unwrap();
        ks.record_generation(&vol(1), 1).unwrap();
        let state = ks.state().unwrap();
        let mut secrets: Vec<Vec<u8>> = vec![dk.expose().to_vec(), dk2.expose().to_vec()];
        for c in &state.cmks {
            for v in &c.versions {
                secrets.push(v.material.expose().to_vec());
                // Even a 16-byte window of the key must not appear.
                secrets.push(v.material.expose()[8..24].to_vec());
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

        let user = ks.create_key(Some("archive"), "for archives").unwrap();
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
            ks.create_key(Some("archive"), ""),
            Err(KmsError::AliasInUse(_))
        ));
        assert!(matches!(
            ks.create_key(Some("cmk-x"), ""),
            Err(KmsError::InvalidKeyName(_))
        ));
        assert!(matches!(
            ks.create_key(Some("has space"), ""),
            Err(KmsError::InvalidKeyName(_))
        ));
        let anon = ks.create_key(None, "no alias").unwrap();
        assert_eq!(anon.alias, None);
        assert_eq!(ks.list_keys().unwrap().len(), 3);
    }

    /// Sets a key's state directly in the file (the lifecycle commands come later).
    fn set_state(ks: &LocalKeystore, id: &str, state: KeyState, date: u64) {
        ks.update(|s| {
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
        let id = ks.create_key(Some("k"), "").unwrap().id;
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
        set_state(&ks, &id, KeyState::PendingDeletion, 1_900_000_000);
        assert!(matches!(
            ks.decrypt(&w, &ctx),
            Err(KmsError::KeyPendingDeletion {
                deletion_date: 1_900_000_000,
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
        ks.update(|s| {
            let c = s.cmks.iter_mut().find(|c| c.id == sid).unwrap();
            c.versions.push(CmkVersion {
                version: 2,
                created: now(),
                material: SecretKey::random(),
            });
            Ok(((), true))
        })
        .unwrap();
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
        let mut state = State::default();
        let mut c = Cmk::generate(
            "cmk-0011223344556677".into(),
            Some("service".into()),
            "déscription".into(),
            KeyKind::Service,
        );
        c.versions.push(CmkVersion {
            version: 3,
            created: 42,
            material: SecretKey::random(),
        });
        state.cmks.push(c);
        state.marks.insert(vol(1), 10);
        state.marks.insert(vol(2), 20);
        let bytes = state.encode();
        let back = State::decode(&bytes).unwrap();
        assert_eq!(back.encode()[..], bytes[..]);
        assert_eq!(back.cmks[0].versions.len(), 2);
        assert_eq!(back.marks.get(&vol(2)), Some(&20));
        // Trailing bytes and every truncation are refused.
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(State::decode(&longer).is_err());
        for cut in 0..bytes.len() {
            assert!(State::decode(&bytes[..cut]).is_err(), "cut {cut}");
        }
        // No service key.
        let mut none = State::default();
        none.cmks.push(Cmk::generate(
            "cmk-1".into(),
            None,
            String::new(),
            KeyKind::User,
        ));
        assert!(State::decode(&none.encode()).is_err());
        // Huge counts do not allocate.
        assert!(State::decode(&u32::MAX.to_le_bytes()).is_err());
    }

    #[test]
    fn wrap_aad_is_unambiguous() {
        let ctx = EncryptionContext::new();
        assert_ne!(wrap_aad("cmk-a", 1, &ctx), wrap_aad("cmk-a\x01", 0, &ctx));
        assert!(wrap_aad("cmk-a", 1, &ctx).starts_with(WRAP_AAD_PREFIX));
    }
}
