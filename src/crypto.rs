//! Cryptographic primitives: the only module that touches cipher crates.
//!
//! Everything else in kmsfs seals, opens, derives and compares through this module, so the
//! choice of algorithms, nonce handling and secret hygiene live in one place:
//!
//! - [`SecretKey`]: a 256-bit secret that is zeroized on drop and never printed.
//! - [`Sealer`]: AEAD (AES-256-GCM-SIV by default, or XChaCha20-Poly1305) with a fresh random
//!   nonce from the OS RNG for every seal. Sealed layout: `nonce || ciphertext || tag`.
//! - [`derive_subkey`]: HKDF-SHA256 subkeys, one per purpose, with the named [`labels`].
//! - [`derive_from_passphrase`]: Argon2id with bounded [`KdfParams`].
//! - [`hmac_sha256`], [`ct_eq`], [`random_bytes`].
//!
//! Nonces are never counters: a restored snapshot or a cloned volume would repeat them.
//!
//! Secret hygiene: the key copies this module owns ([`SecretKey`], [`Passphrase`], the Argon2
//! working memory) are zeroized. AES-256-GCM-SIV runs in AWS-LC (`aws-lc-rs`), which
//! cleanses its key schedule when the context is freed; the state of the Rust cipher crates
//! (the `XChaCha20` key, the HKDF/HMAC state) is zeroized only if their optional `zeroize`
//! features are enabled in `Cargo.toml`.

use core::fmt;

use aws_lc_rs::aead::{AES_256_GCM_SIV, Aad, LessSafeKey, Nonce, UnboundKey};
use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::inout::InOutBuf;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroize;

/// Length in bytes of every symmetric key (256 bits).
pub const KEY_LEN: usize = 32;
/// Length in bytes of an AEAD authentication tag.
pub const TAG_LEN: usize = 16;

/// A 256-bit secret. Zeroized on drop; `Debug` prints `SecretKey(<redacted>)`.
///
/// Deliberately neither `Clone`, `Copy` nor `Display`: copies are explicit
/// ([`SecretKey::duplicate`]). The bytes live in a heap box so that moving a `SecretKey`
/// does not leave stray copies of the key on the stack.
pub struct SecretKey(Box<[u8; KEY_LEN]>);

impl SecretKey {
    /// A fresh key from the OS RNG.
    #[must_use]
    pub fn random() -> Self {
        let mut key = Self(Box::new([0u8; KEY_LEN]));
        random_bytes(&mut key.0[..]);
        key
    }

    /// Takes the key bytes; the argument copy is zeroized.
    #[must_use]
    pub fn from_bytes(mut b: [u8; KEY_LEN]) -> Self {
        let key = Self(Box::new(b));
        b.zeroize();
        key
    }

    /// The key from a slice; `None` unless it is exactly [`KEY_LEN`] bytes.
    #[must_use]
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        if b.len() != KEY_LEN {
            return None;
        }
        let mut key = Self(Box::new([0u8; KEY_LEN]));
        key.0.copy_from_slice(b);
        Some(key)
    }

    /// The raw key bytes. Do not copy them anywhere that is not zeroized.
    #[must_use]
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// An explicit copy (there is no `Clone` on purpose).
    #[must_use]
    pub fn duplicate(&self) -> SecretKey {
        let mut key = Self(Box::new([0u8; KEY_LEN]));
        key.0.copy_from_slice(&self.0[..]);
        key
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// A volume data key (DK): the secret from which a volume's subkeys are derived.
pub type DataKey = SecretKey;

/// The AEAD algorithm of a [`Sealer`]. The numeric value is stored on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum CipherKind {
    /// AES-256-GCM-SIV (RFC 8452), 96-bit nonce. The default: nonce-misuse resistant and
    /// hardware-accelerated on most CPUs.
    #[default]
    Aes256GcmSiv = 1,
    /// XChaCha20-Poly1305, 192-bit nonce. For CPUs without AES instructions.
    XChaCha20Poly1305 = 2,
}

impl CipherKind {
    /// The kind stored on disk as `v`, if known.
    #[must_use]
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Aes256GcmSiv),
            2 => Some(Self::XChaCha20Poly1305),
            _ => None,
        }
    }

    /// The user-facing name: `aes-256-gcm-siv` or `xchacha20-poly1305`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Aes256GcmSiv => "aes-256-gcm-siv",
            Self::XChaCha20Poly1305 => "xchacha20-poly1305",
        }
    }

    /// Parses a name as printed by [`CipherKind::name`] (ASCII case-insensitive).
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Aes256GcmSiv, Self::XChaCha20Poly1305]
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Nonce length in bytes: 12 or 24.
    #[must_use]
    pub fn nonce_len(self) -> usize {
        match self {
            Self::Aes256GcmSiv => 12,
            Self::XChaCha20Poly1305 => 24,
        }
    }

    /// Bytes a seal adds to the plaintext: nonce plus tag.
    #[must_use]
    pub fn overhead(self) -> usize {
        self.nonce_len() + TAG_LEN
    }
}

/// HKDF labels (the `info` input), one per purpose. Never use inline strings.
pub mod labels {
    /// Subkey of the DK that seals volume blocks.
    pub const BLOCK: &[u8] = b"kmsfs v1 block";
    /// Subkey of the DK that seals/authenticates volume roots.
    pub const ROOT: &[u8] = b"kmsfs v1 root";
    /// Subkey of the DK that MACs the volume header.
    pub const HEADER_MAC: &[u8] = b"kmsfs v1 header mac";
    /// Subkey of a CMK version's material that wraps data keys.
    pub const CMK_WRAP: &[u8] = b"kmsfs v1 cmk wrap";
    /// Keystore unlock key derived from a keyfile (HKDF with the keystore salt).
    pub const KEYSTORE_KEYFILE: &[u8] = b"kmsfs v1 keystore keyfile";
    /// Subkey of the keystore unlock key that seals the keystore payload.
    pub const KEYSTORE_SEAL: &[u8] = b"kmsfs v1 keystore seal";
    /// Subkey of the keystore unlock key that computes the keystore key check value.
    pub const KEYSTORE_CHECK: &[u8] = b"kmsfs v1 keystore check";
}

/// HKDF-SHA256 with `ikm = key`, no salt, `info = label`; returns 32 bytes.
#[must_use]
pub fn derive_subkey(key: &SecretKey, label: &[u8]) -> SecretKey {
    hkdf_sha256(key.expose(), None, label)
}

/// HKDF-SHA256 of arbitrary key material (e.g. a keyfile's bytes) with a salt:
/// `ikm = material`, `salt = salt`, `info = label`; returns 32 bytes.
#[must_use]
pub fn derive_from_material(material: &[u8], salt: &[u8], label: &[u8]) -> SecretKey {
    hkdf_sha256(material, Some(salt), label)
}

fn hkdf_sha256(ikm: &[u8], salt: Option<&[u8]>, info: &[u8]) -> SecretKey {
    let mut okm = SecretKey(Box::new([0u8; KEY_LEN]));
    Hkdf::<Sha256>::new(salt, ikm)
        .expand(info, &mut okm.0[..])
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

/// The one opaque error for every AEAD failure (wrong key, modified data, short input).
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
#[error("authentication failed: the data was modified or belongs to another key")]
pub struct IntegrityError;

enum Cipher {
    /// AES-256-GCM-SIV from AWS-LC: its assembly seals 1.4x and opens 1.7x as fast as the
    /// pure-Rust `aes-gcm-siv` crate on this machine's AES-NI/VAES cores (64 KiB blocks,
    /// docs/PERFORMANCE.md "Cipher implementation"); the bytes are the same (RFC 8452).
    /// AWS-LC cleanses the key schedule when the context is freed.
    Aes(Box<LessSafeKey>),
    XChaCha(Box<XChaCha20Poly1305>),
}

/// AEAD with random nonces from the OS RNG.
///
/// Sealed layout: `nonce (12 or 24 bytes) || ciphertext (same length as the plaintext) ||
/// tag (16 bytes)`. The AAD is authenticated but not stored.
pub struct Sealer {
    kind: CipherKind,
    cipher: Cipher,
    /// Our own copy of the key, zeroized on drop (the cipher crates zeroize their state
    /// only with their `zeroize` features).
    _key: SecretKey,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer for `kind` keyed with `key`.
    #[must_use]
    pub fn new(kind: CipherKind, key: &SecretKey) -> Self {
        let cipher = match kind {
            CipherKind::Aes256GcmSiv => {
                let unbound = match UnboundKey::new(&AES_256_GCM_SIV, &key.expose()[..]) {
                    Ok(k) => k,
                    Err(_) => unreachable!("a SecretKey is 32 bytes, the AES-256 key length"),
                };
                Cipher::Aes(Box::new(LessSafeKey::new(unbound)))
            }
            CipherKind::XChaCha20Poly1305 => {
                Cipher::XChaCha(Box::new(XChaCha20Poly1305::new(&(*key.expose()).into())))
            }
        };
        Self {
            kind,
            cipher,
            _key: key.duplicate(),
        }
    }

    /// The AEAD algorithm.
    #[must_use]
    pub fn kind(&self) -> CipherKind {
        self.kind
    }

    /// Length of the sealed form of `plaintext_len` bytes.
    #[must_use]
    pub fn sealed_len(&self, plaintext_len: usize) -> usize {
        plaintext_len + self.kind.overhead()
    }

    /// Appends `nonce || ciphertext || tag` to `out`, encrypting in place inside `out`.
    pub fn seal_into(&self, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let mut nonce = [0u8; 24];
        let nonce = &mut nonce[..self.kind.nonce_len()];
        random_bytes(nonce);
        self.seal_with_nonce_into(nonce, aad, plaintext, out);
    }

    /// Seal with a caller-chosen nonce. Private: nonces always come from the OS RNG, except
    /// in known-answer tests.
    fn seal_with_nonce_into(&self, nonce: &[u8], aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        debug_assert_eq!(nonce.len(), self.kind.nonce_len());
        // Reserve first so the plaintext copy is never left behind by a reallocation.
        out.reserve(self.sealed_len(plaintext.len()));
        out.extend_from_slice(nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag: [u8; TAG_LEN] = match &self.cipher {
            Cipher::Aes(c) => {
                let tag = c
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(*nonce_ref::<[u8; 12]>(nonce)),
                        Aad::from(aad),
                        &mut out[start..],
                    )
                    .expect("AES-256-GCM-SIV input within limits");
                *nonce_ref::<[u8; TAG_LEN]>(tag.as_ref())
            }
            Cipher::XChaCha(c) => {
                let buf: InOutBuf<'_, '_, u8> = (&mut out[start..]).into();
                c.encrypt_inout_detached(nonce_ref(nonce), aad, buf)
                    .expect("XChaCha20-Poly1305 input within limits")
                    .into()
            }
        };
        out.extend_from_slice(&tag);
    }

    /// Seals `plaintext` into `out` (`nonce || ciphertext || tag`), which must be exactly
    /// [`Sealer::sealed_len`] bytes, encrypting out of place: the plaintext is read once by
    /// the cipher and never copied (a block sealed from a WRITE request goes straight from
    /// the request into its record). Returns the tag.
    ///
    /// # Panics
    /// If `out` has the wrong length (a caller's bug, never input from disk).
    pub fn seal_to(&self, aad: &[u8], plaintext: &[u8], out: &mut [u8]) -> [u8; TAG_LEN] {
        let mut nonce = [0u8; 24];
        let nonce = &mut nonce[..self.kind.nonce_len()];
        random_bytes(nonce);
        self.seal_with_nonce_to(nonce, aad, plaintext, out)
    }

    /// Seals several plaintexts, each `(aad, plaintext, out)` as [`Sealer::seal_to`]
    /// does, drawing all their nonces from the OS RNG with one call (a run of blocks
    /// costs one `getrandom` instead of one per block). Returns the tags in order.
    ///
    /// # Panics
    /// If an `out` has the wrong length (a caller's bug, never input from disk).
    pub fn seal_many_to(&self, items: &mut [(&[u8], &[u8], &mut [u8])]) -> Vec<[u8; TAG_LEN]> {
        let n = self.kind.nonce_len();
        let mut nonces = vec![0u8; n * items.len()];
        random_bytes(&mut nonces);
        items
            .iter_mut()
            .zip(nonces.chunks_exact(n))
            .map(|((aad, pt, out), nonce)| self.seal_with_nonce_to(nonce, aad, pt, out))
            .collect()
    }

    /// [`Sealer::seal_to`] with a caller-chosen nonce (known-answer tests only).
    fn seal_with_nonce_to(
        &self,
        nonce: &[u8],
        aad: &[u8],
        plaintext: &[u8],
        out: &mut [u8],
    ) -> [u8; TAG_LEN] {
        debug_assert_eq!(nonce.len(), self.kind.nonce_len());
        assert_eq!(
            out.len(),
            self.sealed_len(plaintext.len()),
            "seal_to: output is not the sealed length"
        );
        let (n, rest) = out.split_at_mut(nonce.len());
        n.copy_from_slice(nonce);
        let (ct, tag_out) = rest.split_at_mut(plaintext.len());
        let tag: [u8; TAG_LEN] = match &self.cipher {
            Cipher::Aes(c) => {
                c.seal_out_of_place_scatter(
                    Nonce::assume_unique_for_key(*nonce_ref::<[u8; 12]>(nonce)),
                    Aad::from(aad),
                    plaintext,
                    ct,
                    &[],
                    tag_out,
                )
                .expect("AES-256-GCM-SIV input within limits");
                *nonce_ref::<[u8; TAG_LEN]>(tag_out)
            }
            Cipher::XChaCha(c) => {
                let buf = match InOutBuf::new(plaintext, ct) {
                    Ok(b) => b,
                    Err(_) => unreachable!("ciphertext and plaintext lengths are equal"),
                };
                let tag: [u8; TAG_LEN] = c
                    .encrypt_inout_detached(nonce_ref(nonce), aad, buf)
                    .expect("XChaCha20-Poly1305 input within limits")
                    .into();
                tag_out.copy_from_slice(&tag);
                tag
            }
        };
        tag
    }

    /// Seals `plaintext` into a new vector (`nonce || ciphertext || tag`).
    #[must_use]
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.sealed_len(plaintext.len()));
        self.seal_into(aad, plaintext, &mut out);
        out
    }

    /// Opens a sealed buffer into a new vector.
    ///
    /// # Errors
    /// [`IntegrityError`] if the input is too short, was modified, or belongs to another key
    /// or AAD.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, IntegrityError> {
        let len = sealed
            .len()
            .checked_sub(self.kind.overhead())
            .ok_or(IntegrityError)?;
        let mut out = vec![0u8; len];
        self.open_into(aad, sealed, &mut out)?;
        Ok(out)
    }

    /// Opens `sealed` into `out`, which must be exactly `sealed.len() - overhead` bytes
    /// (any other length is reported as [`IntegrityError`]). On failure `out` is zeroed.
    ///
    /// # Errors
    /// [`IntegrityError`] if the input is too short, was modified, or belongs to another key
    /// or AAD, or if `out` has the wrong length.
    pub fn open_into(
        &self,
        aad: &[u8],
        sealed: &[u8],
        out: &mut [u8],
    ) -> Result<(), IntegrityError> {
        let nonce_len = self.kind.nonce_len();
        if sealed.len() < self.kind.overhead() || out.len() != sealed.len() - self.kind.overhead() {
            return Err(IntegrityError);
        }
        let (nonce, rest) = sealed.split_at(nonce_len);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let res = match &self.cipher {
            Cipher::Aes(c) => c
                .open_separate_gather(
                    Nonce::assume_unique_for_key(*nonce_ref::<[u8; 12]>(nonce)),
                    Aad::from(aad),
                    ct,
                    tag,
                    out,
                )
                .map_err(|_| ()),
            Cipher::XChaCha(c) => {
                let buf = InOutBuf::new(ct, out).map_err(|_| IntegrityError)?;
                c.decrypt_inout_detached(nonce_ref(nonce), aad, buf, tag_ref(tag))
                    .map_err(|_| ())
            }
        };
        if res.is_err() {
            // Never leave unauthenticated plaintext (or anything else) behind.
            out.zeroize();
            return Err(IntegrityError);
        }
        Ok(())
    }
}

/// Views a slice of the right length as a fixed-size array reference for the cipher crates.
fn nonce_ref<'a, T>(nonce: &'a [u8]) -> &'a T
where
    &'a T: TryFrom<&'a [u8]>,
{
    match <&T>::try_from(nonce) {
        Ok(n) => n,
        Err(_) => unreachable!("nonce length is checked against CipherKind::nonce_len"),
    }
}

fn tag_ref<'a, T>(tag: &'a [u8]) -> &'a T
where
    &'a T: TryFrom<&'a [u8]>,
{
    match <&T>::try_from(tag) {
        Ok(t) => t,
        Err(_) => unreachable!("tag length is TAG_LEN"),
    }
}

/// Fills `buf` from the OS RNG.
///
/// # Panics
/// If the OS RNG fails: kmsfs cannot work safely without it.
pub fn random_bytes(buf: &mut [u8]) {
    if let Err(e) = getrandom::fill(buf) {
        panic!("the operating system random number generator failed ({e}); refusing to continue");
    }
}

/// `N` random bytes from the OS RNG.
///
/// # Panics
/// If the OS RNG fails.
#[must_use]
pub fn random_array<const N: usize>() -> [u8; N] {
    let mut a = [0u8; N];
    random_bytes(&mut a);
    a
}

/// HMAC-SHA256 of `data` under `key`.
#[must_use]
pub fn hmac_sha256(key: &SecretKey, data: &[u8]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose()).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Equality in time independent of the contents (for equal lengths; different lengths
/// return `false` at once).
#[must_use]
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| core::hint::black_box(acc | (x ^ y)));
    core::hint::black_box(diff) == 0
}

/// A passphrase. Zeroized on drop, never printed.
pub struct Passphrase(Vec<u8>);

impl Passphrase {
    /// Takes ownership of the string's bytes.
    #[must_use]
    pub fn new(s: String) -> Self {
        Self(s.into_bytes())
    }

    /// Takes ownership of the bytes as they are.
    #[must_use]
    pub fn from_bytes(b: Vec<u8>) -> Self {
        Self(b)
    }

    /// The contents of a passphrase file: strips one trailing `"\n"` or `"\r\n"`.
    #[must_use]
    pub fn from_file_contents(mut b: Vec<u8>) -> Self {
        if b.last() == Some(&b'\n') {
            b.pop();
            if b.last() == Some(&b'\r') {
                b.pop();
            }
        }
        Self(b)
    }

    /// The passphrase bytes.
    #[must_use]
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Passphrase {
    fn drop(&mut self) {
        // Vec::zeroize also clears the spare capacity (e.g. a stripped newline).
        self.0.zeroize();
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// Argon2id cost parameters. Bounded, including when read from disk, so that a modified
/// file cannot make kmsfs allocate unbounded memory or spin for hours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Parallelism (lanes).
    pub p_cost: u32,
}

/// Test-only hooks compiled in (see the `test-hooks` feature).
const TEST_HOOKS: bool = cfg!(any(test, feature = "test-hooks"));

impl KdfParams {
    /// 64 MiB, 3 iterations, 1 lane.
    pub const DEFAULT: Self = Self {
        m_cost_kib: 64 * 1024,
        t_cost: 3,
        p_cost: 1,
    };
    /// Smallest memory cost accepted (8 MiB), except for the exact [`KdfParams::for_tests`]
    /// profile.
    pub const MIN_M_KIB: u32 = 8 * 1024;
    /// Largest memory cost accepted (1 GiB).
    pub const MAX_M_KIB: u32 = 1 << 20;
    /// Largest iteration count accepted.
    pub const MAX_T: u32 = 16;
    /// Largest parallelism accepted.
    pub const MAX_P: u32 = 8;
    const TEST_M_KIB: u32 = 1024;

    /// The cheap profile for tests. With the `test-hooks` feature (or in unit
    /// tests): 1 MiB, 1 iteration, 1 lane, which [`KdfParams::validate`] then
    /// accepts below [`KdfParams::MIN_M_KIB`]. In every other build it is the
    /// cheapest profile a release accepts (8 MiB, 1 iteration), so nothing
    /// weaker can be created or read from disk there.
    #[must_use]
    pub const fn for_tests() -> Self {
        Self {
            m_cost_kib: if TEST_HOOKS {
                Self::TEST_M_KIB
            } else {
                Self::MIN_M_KIB
            },
            t_cost: 1,
            p_cost: 1,
        }
    }

    /// Checks the bounds.
    ///
    /// # Errors
    /// A message naming the parameter out of bounds and the accepted range.
    pub fn validate(&self) -> Result<(), String> {
        let m_ok = (Self::MIN_M_KIB..=Self::MAX_M_KIB).contains(&self.m_cost_kib)
            || (TEST_HOOKS && *self == Self::for_tests());
        if !m_ok {
            return Err(format!(
                "Argon2id memory cost {} KiB is out of bounds ({}..={} KiB)",
                self.m_cost_kib,
                Self::MIN_M_KIB,
                Self::MAX_M_KIB
            ));
        }
        if !(1..=Self::MAX_T).contains(&self.t_cost) {
            return Err(format!(
                "Argon2id iteration count {} is out of bounds (1..={})",
                self.t_cost,
                Self::MAX_T
            ));
        }
        if !(1..=Self::MAX_P).contains(&self.p_cost) {
            return Err(format!(
                "Argon2id parallelism {} is out of bounds (1..={})",
                self.p_cost,
                Self::MAX_P
            ));
        }
        Ok(())
    }
}

impl Default for KdfParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Smallest salt accepted by [`derive_from_passphrase`].
pub const MIN_SALT_LEN: usize = 16;

/// Argon2id(passphrase, salt, params) -> 32-byte key. Validates `params` first (so bad
/// parameters never start the computation); the working memory is zeroized afterwards.
///
/// # Errors
/// A message if the parameters are out of bounds or the salt is shorter than 16 bytes.
pub fn derive_from_passphrase(
    p: &Passphrase,
    salt: &[u8],
    params: KdfParams,
) -> Result<SecretKey, String> {
    params.validate()?;
    if salt.len() < MIN_SALT_LEN {
        return Err(format!(
            "salt of {} bytes is too short (at least {MIN_SALT_LEN})",
            salt.len()
        ));
    }
    let argon_params = argon2::Params::new(
        params.m_cost_kib,
        params.t_cost,
        params.p_cost,
        Some(KEY_LEN),
    )
    .map_err(|e| format!("invalid Argon2id parameters: {e}"))?;
    let block_count = argon_params.block_count();
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon_params,
    );
    let mut memory = vec![argon2::Block::new(); block_count];
    let mut key = SecretKey(Box::new([0u8; KEY_LEN]));
    let res = argon.hash_password_into_with_memory(p.expose(), salt, &mut key.0[..], &mut memory);
    for block in &mut memory {
        AsMut::<[u64]>::as_mut(block).zeroize();
    }
    res.map_err(|e| format!("Argon2id failed: {e}"))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    const KINDS: [CipherKind; 2] = [CipherKind::Aes256GcmSiv, CipherKind::XChaCha20Poly1305];

    #[test]
    fn seal_open_roundtrip_both_ciphers() {
        for kind in KINDS {
            let key = SecretKey::random();
            let s = Sealer::new(kind, &key);
            assert_eq!(s.kind(), kind);
            for len in [0usize, 1, 15, 16, 17, 4096, 65_537] {
                let pt: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
                let sealed = s.seal(b"aad", &pt);
                assert_eq!(sealed.len(), s.sealed_len(len));
                assert_eq!(sealed.len(), len + kind.overhead());
                if len >= 16 {
                    assert_ne!(&sealed[kind.nonce_len()..kind.nonce_len() + len], &pt[..]);
                }
                assert_eq!(s.open(b"aad", &sealed).unwrap(), pt);
                let mut out = vec![0u8; len];
                s.open_into(b"aad", &sealed, &mut out).unwrap();
                assert_eq!(out, pt);
                // A second sealer from the same key opens it too.
                let s2 = Sealer::new(kind, &key.duplicate());
                assert_eq!(s2.open(b"aad", &sealed).unwrap(), pt);
            }
        }
    }

    #[test]
    fn seal_into_appends() {
        let s = Sealer::new(CipherKind::Aes256GcmSiv, &SecretKey::random());
        let mut out = b"header".to_vec();
        s.seal_into(b"", b"payload", &mut out);
        assert_eq!(&out[..6], b"header");
        assert_eq!(s.open(b"", &out[6..]).unwrap(), b"payload");
    }

    #[test]
    fn seal_to_is_seal_into_out_of_place() {
        for kind in KINDS {
            let s = Sealer::new(kind, &SecretKey::random());
            let nonce = vec![0x5au8; kind.nonce_len()];
            for len in [0usize, 1, 16, 4096, 65_536, 65_537] {
                let pt: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
                // The same nonce: the same bytes as the in-place path.
                let mut old = Vec::new();
                s.seal_with_nonce_into(&nonce, b"aad", &pt, &mut old);
                let mut new = vec![0xEEu8; s.sealed_len(len)];
                let tag = s.seal_with_nonce_to(&nonce, b"aad", &pt, &mut new);
                assert_eq!(new, old, "{kind:?} {len}");
                assert_eq!(tag[..], new[new.len() - TAG_LEN..]);
                // A random nonce: opens, and any flipped bit fails.
                let mut out = vec![0u8; s.sealed_len(len)];
                let tag = s.seal_to(b"aad", &pt, &mut out);
                assert_eq!(tag[..], out[out.len() - TAG_LEN..]);
                assert_eq!(s.open(b"aad", &out).unwrap(), pt);
                for i in [0, out.len() / 2, out.len() - 1] {
                    let mut bad = out.clone();
                    bad[i] ^= 0x01;
                    assert_eq!(s.open(b"aad", &bad), Err(IntegrityError), "byte {i}");
                }
                assert_eq!(s.open(b"aaD", &out), Err(IntegrityError));
            }
            // Several at once: each opens with its own AAD, and the nonces differ.
            let pts: Vec<Vec<u8>> = (0..3).map(|i| vec![i as u8; 100 + i]).collect();
            let mut outs: Vec<Vec<u8>> =
                pts.iter().map(|p| vec![0; s.sealed_len(p.len())]).collect();
            let aads: [&[u8]; 3] = [b"a", b"b", b"c"];
            let mut items: Vec<(&[u8], &[u8], &mut [u8])> = aads
                .iter()
                .zip(&pts)
                .zip(outs.iter_mut())
                .map(|((a, p), o)| (*a, &p[..], &mut o[..]))
                .collect();
            let tags = s.seal_many_to(&mut items);
            for (((o, p), a), t) in outs.iter().zip(&pts).zip(aads).zip(&tags) {
                assert_eq!(&s.open(a, o).unwrap(), p);
                assert_eq!(t[..], o[o.len() - TAG_LEN..]);
            }
            assert_ne!(outs[0][..kind.nonce_len()], outs[1][..kind.nonce_len()]);
            assert_eq!(s.open(b"b", &outs[0]), Err(IntegrityError));
        }
    }

    #[test]
    fn every_bit_flip_fails() {
        for kind in KINDS {
            let s = Sealer::new(kind, &SecretKey::random());
            let sealed = s.seal(b"context", b"sixteen byte msg + a bit more");
            for i in 0..sealed.len() * 8 {
                let mut bad = sealed.clone();
                bad[i / 8] ^= 1 << (i % 8);
                assert_eq!(s.open(b"context", &bad), Err(IntegrityError), "bit {i}");
                let mut out = vec![0xAAu8; sealed.len() - kind.overhead()];
                assert_eq!(s.open_into(b"context", &bad, &mut out), Err(IntegrityError));
                assert!(out.iter().all(|&b| b == 0), "out zeroed on failure");
            }
        }
    }

    #[test]
    fn wrong_aad_key_truncation_fail() {
        for kind in KINDS {
            let key = SecretKey::random();
            let s = Sealer::new(kind, &key);
            let sealed = s.seal(b"volume-a", b"secret data");
            assert_eq!(s.open(b"volume-b", &sealed), Err(IntegrityError));
            assert_eq!(s.open(b"", &sealed), Err(IntegrityError));
            let other = Sealer::new(kind, &SecretKey::random());
            assert_eq!(other.open(b"volume-a", &sealed), Err(IntegrityError));
            for cut in 0..sealed.len() {
                assert_eq!(s.open(b"volume-a", &sealed[..cut]), Err(IntegrityError));
            }
            let mut longer = sealed.clone();
            longer.push(0);
            assert_eq!(s.open(b"volume-a", &longer), Err(IntegrityError));
            // Wrong output length is refused, not a panic.
            let mut out = vec![0u8; 3];
            assert_eq!(
                s.open_into(b"volume-a", &sealed, &mut out),
                Err(IntegrityError)
            );
        }
        // The other cipher with the same key cannot open it either.
        let key = SecretKey::random();
        let a = Sealer::new(CipherKind::Aes256GcmSiv, &key);
        let x = Sealer::new(CipherKind::XChaCha20Poly1305, &key);
        assert_eq!(x.open(b"", &a.seal(b"", b"data")), Err(IntegrityError));
    }

    #[test]
    fn nonces_are_random() {
        for kind in KINDS {
            let s = Sealer::new(kind, &SecretKey::random());
            let a = s.seal(b"", b"same plaintext");
            let b = s.seal(b"", b"same plaintext");
            assert_ne!(a, b);
            assert_ne!(a[..kind.nonce_len()], b[..kind.nonce_len()]);
        }
    }

    #[test]
    fn aes_gcm_siv_rfc8452_known_answer() {
        // RFC 8452 Appendix C.2, first AEAD_AES_256_GCM_SIV vector.
        let key = SecretKey::from_slice(&hex(
            "0100000000000000000000000000000000000000000000000000000000000000",
        ))
        .unwrap();
        let s = Sealer::new(CipherKind::Aes256GcmSiv, &key);
        let nonce = hex("030000000000000000000000");
        let mut out = Vec::new();
        s.seal_with_nonce_into(&nonce, b"", b"", &mut out);
        assert_eq!(out[..12], nonce[..]);
        assert_eq!(out[12..], hex("07f5f4169bbf55a8400cd47ea6fd400f")[..]);
        assert_eq!(s.open(b"", &out).unwrap(), b"");

        // Same appendix: 8-byte plaintext 0100000000000000.
        let mut out = Vec::new();
        s.seal_with_nonce_into(&nonce, b"", &hex("0100000000000000"), &mut out);
        assert_eq!(
            out[12..],
            hex("c2ef328e5c71c83b843122130f7364b761e0b97427e3df28")[..]
        );
    }

    #[test]
    fn xchacha_known_answer() {
        // draft-irtf-cfrg-xchacha-03, Appendix A.3.1.
        let key = SecretKey::from_slice(&hex(
            "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f",
        ))
        .unwrap();
        let s = Sealer::new(CipherKind::XChaCha20Poly1305, &key);
        let nonce = hex("404142434445464748494a4b4c4d4e4f5051525354555657");
        let aad = hex("50515253c0c1c2c3c4c5c6c7");
        let pt = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let mut out = Vec::new();
        s.seal_with_nonce_into(&nonce, &aad, pt, &mut out);
        let ct = &out[24..out.len() - 16];
        let tag = &out[out.len() - 16..];
        assert_eq!(ct[..16], hex("bd6d179d3e83d43b9576579493c0e939")[..]);
        assert_eq!(tag, &hex("c0875924c1c7987947deafd8780acf49")[..]);
        assert_eq!(s.open(&aad, &out).unwrap(), pt);
    }

    #[test]
    fn derive_subkey_known_answer_and_labels_differ() {
        let key = SecretKey::from_bytes([0x0b; 32]);
        // HKDF-SHA256(ikm = 0x0b * 32, salt = none, info = label), computed independently
        // (RFC 5869 construction in Python hmac/hashlib).
        assert_eq!(
            derive_subkey(&key, labels::BLOCK).expose()[..],
            hex("3799e53c3914a5f46a24cc8987fd946d845c5e7047874eb2f3ba2266ef4c5328")[..]
        );
        let all = [
            labels::BLOCK,
            labels::ROOT,
            labels::HEADER_MAC,
            labels::CMK_WRAP,
            labels::KEYSTORE_KEYFILE,
            labels::KEYSTORE_SEAL,
            labels::KEYSTORE_CHECK,
        ];
        let derived: Vec<[u8; 32]> = all
            .iter()
            .map(|l| *derive_subkey(&key, l).expose())
            .collect();
        for i in 0..derived.len() {
            assert_ne!(derived[i], *key.expose());
            for j in i + 1..derived.len() {
                assert_ne!(derived[i], derived[j], "labels {i} and {j}");
            }
        }
        // Deterministic, and depends on the key.
        assert_eq!(
            derive_subkey(&key, labels::ROOT).expose(),
            derive_subkey(&key.duplicate(), labels::ROOT).expose()
        );
        assert_ne!(
            derive_subkey(&key, labels::ROOT).expose(),
            derive_subkey(&SecretKey::from_bytes([0x0c; 32]), labels::ROOT).expose()
        );
        // Salted derivation differs by salt.
        assert_ne!(
            derive_from_material(b"keyfile", b"salt-a", labels::KEYSTORE_KEYFILE).expose(),
            derive_from_material(b"keyfile", b"salt-b", labels::KEYSTORE_KEYFILE).expose()
        );
    }

    #[test]
    fn hmac_known_answer_and_ct_eq() {
        // RFC 4231 test case 1 with a 32-byte key instead of 20 bytes; expected value
        // computed independently (Python hmac/hashlib).
        let key = SecretKey::from_bytes([0x0b; 32]);
        assert_eq!(
            hmac_sha256(&key, b"Hi There")[..],
            hex("198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7")[..]
        );
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn debug_redacts_secrets() {
        let key = SecretKey::from_bytes([0x42; 32]);
        let d = format!("{key:?} {:?}", Sealer::new(CipherKind::Aes256GcmSiv, &key));
        assert!(d.contains("SecretKey(<redacted>)"));
        assert!(!d.contains("42") && !d.contains("66"), "{d}");
        let p = Passphrase::new("hunter2-correct-horse".to_string());
        let d = format!("{p:?}");
        assert_eq!(d, "Passphrase(<redacted>)");
        assert!(!d.contains("hunter2"));
    }

    #[test]
    fn secret_key_constructors() {
        assert!(SecretKey::from_slice(&[1; 31]).is_none());
        assert!(SecretKey::from_slice(&[1; 33]).is_none());
        assert_eq!(SecretKey::from_slice(&[1; 32]).unwrap().expose(), &[1; 32]);
        let a = SecretKey::random();
        assert_eq!(a.duplicate().expose(), a.expose());
        assert_ne!(SecretKey::random().expose(), a.expose());
        let r: [u8; 32] = random_array();
        assert_ne!(r, [0u8; 32]);
    }

    #[test]
    fn cipher_kind_names() {
        for kind in KINDS {
            assert_eq!(CipherKind::parse(kind.name()), Some(kind));
            assert_eq!(CipherKind::from_u8(kind as u8), Some(kind));
        }
        assert_eq!(
            CipherKind::parse("AES-256-GCM-SIV"),
            Some(CipherKind::Aes256GcmSiv)
        );
        assert_eq!(CipherKind::parse("aes"), None);
        assert_eq!(CipherKind::from_u8(0), None);
        assert_eq!(CipherKind::from_u8(3), None);
        assert_eq!(CipherKind::default(), CipherKind::Aes256GcmSiv);
        assert_eq!(CipherKind::Aes256GcmSiv.overhead(), 28);
        assert_eq!(CipherKind::XChaCha20Poly1305.overhead(), 40);
    }

    #[test]
    fn passphrase_file_contents() {
        assert_eq!(
            Passphrase::from_file_contents(b"pw\n".to_vec()).expose(),
            b"pw"
        );
        assert_eq!(
            Passphrase::from_file_contents(b"pw\r\n".to_vec()).expose(),
            b"pw"
        );
        assert_eq!(
            Passphrase::from_file_contents(b"pw\n\n".to_vec()).expose(),
            b"pw\n"
        );
        assert_eq!(
            Passphrase::from_file_contents(b"pw".to_vec()).expose(),
            b"pw"
        );
        assert_eq!(
            Passphrase::from_file_contents(b"pw\r".to_vec()).expose(),
            b"pw\r"
        );
        assert_eq!(Passphrase::from_bytes(b"x\n".to_vec()).expose(), b"x\n");
    }

    #[test]
    fn kdf_params_bounds() {
        assert!(KdfParams::DEFAULT.validate().is_ok());
        assert!(KdfParams::for_tests().validate().is_ok());
        assert_eq!(KdfParams::default(), KdfParams::DEFAULT);
        let ok = |m, t, p| {
            KdfParams {
                m_cost_kib: m,
                t_cost: t,
                p_cost: p,
            }
            .validate()
            .is_ok()
        };
        assert!(ok(KdfParams::MIN_M_KIB, 1, 1));
        assert!(ok(KdfParams::MAX_M_KIB, KdfParams::MAX_T, KdfParams::MAX_P));
        assert!(!ok(KdfParams::MAX_M_KIB + 1, 1, 1));
        assert!(!ok(4 << 20, 3, 1)); // 4 GiB
        assert!(!ok(u32::MAX, 3, 1));
        assert!(!ok(KdfParams::MIN_M_KIB - 1, 3, 1));
        assert!(!ok(1024, 2, 1)); // only the exact test profile may go below the minimum
        assert!(!ok(0, 1, 1));
        assert!(!ok(65536, 0, 1));
        assert!(!ok(65536, KdfParams::MAX_T + 1, 1));
        assert!(!ok(65536, 3, 0));
        assert!(!ok(65536, 3, KdfParams::MAX_P + 1));
    }

    #[test]
    fn argon2id_derivation() {
        let p = Passphrase::new("correct horse".into());
        let salt = [7u8; 16];
        let params = KdfParams::for_tests();
        let a = derive_from_passphrase(&p, &salt, params).unwrap();
        let b = derive_from_passphrase(&p, &salt, params).unwrap();
        assert_eq!(a.expose(), b.expose());
        let c = derive_from_passphrase(&Passphrase::new("correct horsf".into()), &salt, params)
            .unwrap();
        assert_ne!(a.expose(), c.expose());
        let d = derive_from_passphrase(&p, &[8u8; 16], params).unwrap();
        assert_ne!(a.expose(), d.expose());
        assert!(derive_from_passphrase(&p, &[7u8; 15], params).is_err());
        let huge = KdfParams {
            m_cost_kib: 4 << 20,
            t_cost: 3,
            p_cost: 1,
        };
        assert!(derive_from_passphrase(&p, &salt, huge).is_err());
    }

    #[test]
    fn argon2id_known_answer() {
        // Computed independently with the reference C implementation (libargon2,
        // `argon2id_hash_raw`):
        // Argon2id v1.3, m=1024 KiB, t=1, p=1, password "password", salt "somesaltsomesalt".
        let key = derive_from_passphrase(
            &Passphrase::new("password".into()),
            b"somesaltsomesalt",
            KdfParams::for_tests(),
        )
        .unwrap();
        assert_eq!(key.expose()[..], hex(ARGON2_KAT)[..]);
    }

    const ARGON2_KAT: &str = "16253e23a29b20d7c7a0c05f9150e74baaa6cf1832edc838d484fc250a02bef9";

    #[test]
    fn sealer_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Sealer>();
        assert_send_sync::<SecretKey>();
    }
}
