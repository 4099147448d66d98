//! A KMIP server as the KMS: `kmip://HOST:5696/KEY-UID?cert=F&key=F&ca=F`.
//!
//! The customer master key is a symmetric AES-256 key that the KMIP server holds (its
//! unique identifier is the URL's path); it never leaves the server. kmsfs speaks KMIP 1.2
//! in TTLV over mutual TLS (TLS 1.2 or 1.3, rustls) and uses only the operations it needs:
//! Encrypt, Decrypt and Get Attributes (plus Create, Activate, Revoke and Destroy for
//! administration and tests). The TTLV encoder and decoder are in this module; every
//! length from the socket is checked before use and responses are bounded in size and
//! depth.
//!
//! # URL parameters
//!
//! | parameter | meaning |
//! | --- | --- |
//! | `cert=FILE` | client certificate (PEM, the chain may follow), required |
//! | `key=FILE` | its private key (PEM, PKCS#8, SEC1 or PKCS#1); must be yours and mode 0600, required |
//! | `ca=FILE` | the CA certificate(s) (PEM) that signed the server's certificate, required |
//! | `timeout=SECONDS` | connect and read timeout (default 10); connecting is retried up to 3 times within it |
//! | `state_dir=DIR` | where rollback marks live (default `/var/lib/kmsfs/state` for root, else `$XDG_STATE_HOME/kmsfs` or `~/.local/state/kmsfs`) |
//!
//! # Wrapping
//!
//! A KMIP server's cipher modes may be unauthenticated (AES-CBC is the one every server
//! offers), so the server only gives confidentiality and kmsfs authenticates locally:
//!
//! 1. a fresh random 32-byte key-encryption key (KEK) per wrap;
//! 2. KMIP Encrypt of the KEK under the server key, AES-256-CBC with PKCS#5 padding and an
//!    IV kmsfs picks (the result is decrypted back once to check the server before use);
//! 3. the DK sealed with AES-256-GCM-SIV under `HKDF-SHA256(KEK, info = "kmsfs v1 kmip
//!    wrap")`, with AAD = the blob's header (below) ‖ `u32 LE` length ‖ key UID ‖ the
//!    encryption context's canonical bytes (the volume id).
//!
//! [`WrappedKey`] = `{ cmk_id: KEY-UID, cmk_version: 1, ciphertext: blob }`, blob:
//!
//! ```text
//! "KMIP" | u8 format = 1 | u8 server mode = 1 (AES-256-CBC-PKCS5)
//! u8 IV length (1..=32) | IV | u16 BE KMIP ciphertext length (16..=256) | KMIP ciphertext
//! sealed DK: nonce (12) | ciphertext (32) | tag (16)
//! ```
//!
//! Unwrapping asks the server to Decrypt the KEK and opens the seal; any mismatch (another
//! volume's context, another key, a modified blob, a KEK the server decrypts to garbage) is
//! [`KmsError::UnwrapFailed`]. Re-encrypting unwraps and wraps again with a fresh KEK under
//! the same or another key UID.
//!
//! # Key state
//!
//! When the server refuses an operation, kmsfs reads the key's State attribute and says
//! which key on which server is not Active (Pre-Active, Deactivated = revoked, Compromised,
//! Destroyed) or does not exist ([`KmsError::RemoteKeyState`]); opening the KMS checks the
//! key at once, so a mount fails before touching the volume.
//!
//! # Rollback high-water marks
//!
//! KMIP 1.x has no portable mutable record next to a key: custom attributes are optional
//! (PyKMIP refuses them: "The x-… attribute is unsupported"), and managed objects are
//! immutable, so a mark kept as an object would cost a Register and a Destroy per commit.
//! The marks therefore live in a **local state file** per volume,
//! `STATE_DIR/kmip-VOLUMEID.mark` (decimal generation, mode 0600, replaced atomically under
//! a lock), and opening this KMS logs a warning saying so: rollback detection then covers
//! this machine only, and the state directory belongs in its backups.
//!
//! # Failure modes
//!
//! Unreachable server (connect refused or timed out after the retries), TLS verification
//! failure (server certificate not signed by `ca=`, or not naming HOST), client certificate
//! refused and non-KMIP answers are [`KmsError::Unavailable`] naming `HOST:PORT` and what
//! to check.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use zeroize::Zeroizing;

use super::remote::KmsUrl;
use super::{EncryptionContext, Kms, KmsError, WrappedKey};
use crate::crypto::{self, CipherKind, DataKey, Sealer, SecretKey};

/// HKDF label of the key that seals a DK under a KMIP-protected KEK.
const WRAP_LABEL: &[u8] = b"kmsfs v1 kmip wrap";
/// Blob magic.
const MAGIC: &[u8; 4] = b"KMIP";
/// Blob format version.
const FORMAT: u8 = 1;
/// Server-side mode: AES-256-CBC with PKCS#5 padding.
const MODE_CBC_PKCS5: u8 = 1;
/// The CMK version of every KMIP wrap (KMIP keys are rotated by using a new UID).
const CMK_VERSION: u32 = 1;
/// Default connect/read timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connection attempts within the timeout.
const CONNECT_ATTEMPTS: u32 = 3;
/// Largest response accepted.
const MAX_RESPONSE: usize = 1 << 20;
/// Bounds of the KMIP ciphertext of a KEK and of its IV in a blob.
const MAX_KMIP_CT: usize = 256;
const MAX_IV: usize = 32;
/// URL parameters understood here.
const PARAMS: [&str; 5] = ["cert", "key", "ca", "timeout", "state_dir"];

/// Opens the KMIP KMS a URL names: checks the files, connects, and checks that the key
/// exists and is Active.
///
/// # Errors
/// [`KmsError::Refused`] for a bad parameter, [`KmsError::UnsafePermissions`] for the
/// private key file, [`KmsError::Unavailable`], [`KmsError::RemoteKeyState`].
pub fn open(url: &KmsUrl) -> Result<Arc<dyn Kms>, KmsError> {
    let kms = KmipKms::connect(url)?;
    kms.check_key(&kms.key)?;
    log::warn!(
        "{}: rollback high-water marks are kept in the local state directory {}, not on the \
         server (KMIP has no portable record for them); rollback detection covers this \
         machine only, keep that directory in its backups",
        kms.name,
        kms.marks.dir.display()
    );
    Ok(Arc::new(kms))
}

/// A KMIP server holding the CMKs. One TLS connection is kept and reused (requests are
/// serialised over it); it is re-established when it breaks.
pub struct KmipKms {
    /// `host:port`.
    authority: String,
    /// "KMIP server host:port", for messages.
    name: String,
    /// The URL's key UID (the default CMK).
    key: String,
    host: String,
    tls: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    cert_path: String,
    ca_path: String,
    timeout: Duration,
    conn: Mutex<Option<Stream>>,
    marks: Marks,
}

type Stream = StreamOwned<ClientConnection, TcpStream>;

impl std::fmt::Debug for KmipKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmipKms")
            .field("server", &self.authority)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// The State attribute of a KMIP managed object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KmipState {
    /// Created, not yet usable.
    PreActive,
    /// Usable.
    Active,
    /// Revoked (or past its deactivation date).
    Deactivated,
    /// Revoked as compromised.
    Compromised,
    /// Material destroyed.
    Destroyed,
    /// Destroyed after being compromised.
    DestroyedCompromised,
    /// A value this client does not know.
    Other(u32),
}

impl KmipState {
    fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::PreActive,
            2 => Self::Active,
            3 => Self::Deactivated,
            4 => Self::Compromised,
            5 => Self::Destroyed,
            6 => Self::DestroyedCompromised,
            o => Self::Other(o),
        }
    }

    /// What it means for kmsfs, after "key UID on SERVER ".
    fn explain(self) -> String {
        match self {
            Self::Active => "is Active".into(),
            Self::PreActive => "is Pre-Active on the server: it cannot wrap or unwrap data keys until it is activated there (KMIP Activate)".into(),
            Self::Deactivated => "is Deactivated (revoked) on the server: it no longer wraps or unwraps data keys; the volumes wrapped under it cannot be opened unless the server's administrator restores the key".into(),
            Self::Compromised => "is Compromised (revoked as compromised) on the server: it no longer wraps or unwraps data keys".into(),
            Self::Destroyed | Self::DestroyedCompromised => format!("is {self:?} on the server: its material is gone, so the data keys wrapped under it and the volumes that depend on them are unrecoverable (unless the server is restored from a backup)"),
            Self::Other(v) => format!("is in KMIP state {v}, which is not Active: it cannot wrap or unwrap data keys"),
        }
    }
}

/// Why a request failed.
enum CallError {
    /// No usable answer (connection, TLS, timeout, not KMIP): the message says why.
    Transport(String),
    /// The server answered with a failure.
    Server { reason: u32, message: String },
}

fn param<'a>(params: &'a std::collections::BTreeMap<String, String>, k: &str) -> Option<&'a str> {
    params.get(k).map(String::as_str).filter(|v| !v.is_empty())
}

impl KmipKms {
    /// Connects to the server a `kmip://` URL names (no check of the key: see [`open`]).
    ///
    /// # Errors
    /// As [`open`].
    pub fn connect(url: &KmsUrl) -> Result<Self, KmsError> {
        let KmsUrl::Kmip {
            authority,
            key,
            params,
        } = url
        else {
            return Err(KmsError::Refused("not a kmip:// URL".into()));
        };
        let name = format!("KMIP server {authority}");
        let refuse = |why: String| KmsError::Refused(format!("the KMS URL for {name}: {why}"));
        if let Some(k) = params.keys().find(|k| !PARAMS.contains(&k.as_str())) {
            return Err(refuse(format!(
                "unknown parameter {k:?}; the parameters are {}",
                PARAMS.join(", ")
            )));
        }
        let need = |k: &str, what: &str| {
            param(params, k).map(str::to_owned).ok_or_else(|| {
                refuse(format!(
                    "{k}=FILE is missing: KMIP uses mutual TLS and needs the {what}"
                ))
            })
        };
        let cert_path = need("cert", "client certificate (PEM)")?;
        let key_path = need("key", "client certificate's private key (PEM, mode 0600)")?;
        let ca_path = need("ca", "CA certificate that signed the server's certificate")?;
        let timeout = match param(params, "timeout") {
            None => DEFAULT_TIMEOUT,
            Some(t) => match t.parse::<f64>() {
                Ok(s) if s > 0.0 && s <= 3600.0 => Duration::from_secs_f64(s),
                _ => {
                    return Err(refuse(format!(
                        "timeout={t:?} is not a number of seconds between 0 and 3600"
                    )));
                }
            },
        };
        let state_dir = match param(params, "state_dir") {
            Some(d) => PathBuf::from(d),
            None => default_state_dir()?,
        };
        let (host, _port) = authority
            .rsplit_once(':')
            .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            .ok_or_else(|| refuse(format!("{authority:?} is not HOST:PORT")))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| refuse(format!("{host:?} is not a valid host name or address")))?;

        let file_err = |what: &str, path: &str, e: String| {
            KmsError::Refused(format!("{name}: the {what} {path} cannot be used: {e}"))
        };
        super::keystore::check_private_file(Path::new(&key_path), "TLS client key")?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
            .and_then(Iterator::collect)
            .map_err(|e| file_err("client certificate", &cert_path, e.to_string()))?;
        if certs.is_empty() {
            return Err(file_err(
                "client certificate",
                &cert_path,
                "no PEM certificate in it".into(),
            ));
        }
        let client_key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| file_err("client key", &key_path, e.to_string()))?;
        let mut roots = RootCertStore::empty();
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca_path)
            .and_then(Iterator::collect)
            .map_err(|e| file_err("CA file", &ca_path, e.to_string()))?;
        for ca in cas {
            roots
                .add(ca)
                .map_err(|e| file_err("CA file", &ca_path, e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(file_err(
                "CA file",
                &ca_path,
                "no PEM certificate in it".into(),
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| refuse(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, client_key)
            .map_err(|e| {
                file_err(
                    "client certificate and key",
                    &format!("{cert_path} / {key_path}"),
                    e.to_string(),
                )
            })?;
        Ok(Self {
            authority: authority.clone(),
            name,
            key: key.clone(),
            host,
            tls: Arc::new(tls),
            server_name,
            cert_path,
            ca_path,
            timeout,
            conn: Mutex::new(None),
            marks: Marks::new(state_dir),
        })
    }

    /// The URL's key UID.
    #[must_use]
    pub fn key_uid(&self) -> &str {
        &self.key
    }

    /// Where the rollback marks live.
    #[must_use]
    pub fn state_dir(&self) -> &Path {
        &self.marks.dir
    }

    fn unavailable(&self, detail: String) -> KmsError {
        KmsError::Unavailable {
            kms: self.name.clone(),
            detail,
        }
    }

    fn key_error(&self, uid: &str, what: String) -> KmsError {
        KmsError::RemoteKeyState {
            kms: self.name.clone(),
            key: uid.to_owned(),
            what,
        }
    }

    // ---- administration (tests, and operators without other KMIP tools) ----

    /// Creates an AES-256 key with the Encrypt and Decrypt usages and activates it;
    /// returns its unique identifier.
    ///
    /// # Errors
    /// [`KmsError::Unavailable`], [`KmsError::Refused`] when the server refuses.
    pub fn create_aes256_key(&self) -> Result<String, KmsError> {
        let mut p = Enc::default();
        p.enumeration(tag::OBJECT_TYPE, 2); // Symmetric Key
        p.structure(tag::TEMPLATE_ATTRIBUTE, |t| {
            t.structure(tag::ATTRIBUTE, |a| {
                a.text(tag::ATTRIBUTE_NAME, "Cryptographic Algorithm");
                a.enumeration(tag::ATTRIBUTE_VALUE, ALG_AES);
            });
            t.structure(tag::ATTRIBUTE, |a| {
                a.text(tag::ATTRIBUTE_NAME, "Cryptographic Length");
                a.int(tag::ATTRIBUTE_VALUE, 256);
            });
            t.structure(tag::ATTRIBUTE, |a| {
                a.text(tag::ATTRIBUTE_NAME, "Cryptographic Usage Mask");
                a.int(tag::ATTRIBUTE_VALUE, USAGE_ENCRYPT | USAGE_DECRYPT);
            });
        });
        let uid = self
            .request(Op::Create, &p.0, |items| {
                text_of(items, tag::UNIQUE_IDENTIFIER).map(str::to_owned)
            })
            .map_err(|e| self.admin_error("Create", None, e))?;
        self.admin(Op::Activate, &uid, |_| {})?;
        Ok(uid)
    }

    /// Revokes a key (reason: cessation of operation): it becomes Deactivated.
    ///
    /// # Errors
    /// As [`KmipKms::create_aes256_key`].
    pub fn revoke(&self, uid: &str) -> Result<(), KmsError> {
        self.admin(Op::Revoke, uid, |p| {
            p.structure(tag::REVOCATION_REASON, |r| {
                r.enumeration(tag::REVOCATION_REASON_CODE, 6);
            });
        })
    }

    /// Destroys a key (it must not be Active: revoke it first).
    ///
    /// # Errors
    /// As [`KmipKms::create_aes256_key`].
    pub fn destroy(&self, uid: &str) -> Result<(), KmsError> {
        self.admin(Op::Destroy, uid, |_| {})
    }

    /// The State attribute of a key; `None` if the server does not know the key.
    ///
    /// # Errors
    /// [`KmsError::Unavailable`], [`KmsError::Refused`].
    pub fn key_state(&self, uid: &str) -> Result<Option<KmipState>, KmsError> {
        let mut p = Enc::default();
        p.text(tag::UNIQUE_IDENTIFIER, uid);
        p.text(tag::ATTRIBUTE_NAME, "State");
        let r = self.request(Op::GetAttributes, &p.0, |items| {
            for a in items.iter().filter(|i| i.tag == tag::ATTRIBUTE) {
                let fields = a.children().ok_or("an Attribute is not a structure")?;
                if text_of(fields, tag::ATTRIBUTE_NAME)? == "State" {
                    return enum_of(fields, tag::ATTRIBUTE_VALUE).map(Some);
                }
            }
            Ok(None)
        });
        match r {
            Ok(Some(v)) => Ok(Some(KmipState::from_u32(v))),
            Ok(None) => Err(self.unavailable(format!(
                "its Get Attributes answer for key {uid} has no State attribute"
            ))),
            Err(CallError::Server { reason, .. }) if reason == REASON_ITEM_NOT_FOUND => Ok(None),
            Err(e) => Err(self.admin_error("Get Attributes", Some(uid), e)),
        }
    }

    /// Checks that a key exists and is Active.
    fn check_key(&self, uid: &str) -> Result<(), KmsError> {
        match self.key_state(uid)? {
            Some(KmipState::Active) => Ok(()),
            Some(s) => Err(self.key_error(uid, s.explain())),
            None => Err(self.key_error(uid, not_found_text())),
        }
    }

    fn admin(&self, op: Op, uid: &str, extra: impl FnOnce(&mut Enc)) -> Result<(), KmsError> {
        let mut p = Enc::default();
        p.text(tag::UNIQUE_IDENTIFIER, uid);
        extra(&mut p);
        self.request(op, &p.0, |_| Ok(()))
            .map_err(|e| self.admin_error(op.name(), Some(uid), e))
    }

    fn admin_error(&self, op: &str, uid: Option<&str>, e: CallError) -> KmsError {
        match e {
            CallError::Transport(d) => self.unavailable(d),
            CallError::Server { reason, message } => KmsError::Refused(format!(
                "{} refused {op}{}: {}{}",
                self.name,
                uid.map(|u| format!(" on key {u}")).unwrap_or_default(),
                reason_name(reason),
                if message.is_empty() {
                    String::new()
                } else {
                    format!(" ({message})")
                }
            )),
        }
    }

    /// A failed Encrypt or Decrypt with key `uid`: says why, from the key's state.
    fn use_error(&self, op: Op, uid: &str, e: CallError) -> KmsError {
        let (reason, message) = match e {
            CallError::Transport(d) => return self.unavailable(d),
            CallError::Server { reason, message } => (reason, message),
        };
        match self.key_state(uid) {
            Err(e) => e,
            Ok(None) => self.key_error(uid, not_found_text()),
            Ok(Some(s)) if s != KmipState::Active => self.key_error(uid, s.explain()),
            // The key is usable: the ciphertext is not its, or was modified.
            Ok(Some(_))
                if op == Op::Decrypt
                    && reason != REASON_PERMISSION_DENIED
                    && reason != REASON_OPERATION_NOT_SUPPORTED =>
            {
                KmsError::UnwrapFailed
            }
            Ok(Some(_)) => KmsError::Refused(format!(
                "{} refused {} with key {uid}: {}{}; the key must be an AES-256 key with the Encrypt and Decrypt usages, and the server must offer AES-CBC with PKCS#5 padding",
                self.name,
                op.name(),
                reason_name(reason),
                if message.is_empty() {
                    String::new()
                } else {
                    format!(" ({message})")
                }
            )),
        }
    }

    // ---- wrap / unwrap ----

    fn cipher(
        &self,
        op: Op,
        uid: &str,
        data: &[u8],
        iv: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        // Sized up front so that the buffer holding the KEK is never reallocated.
        let mut p = Enc(Vec::with_capacity(128 + uid.len() + data.len() + iv.len()));
        p.text(tag::UNIQUE_IDENTIFIER, uid);
        p.structure(tag::CRYPTOGRAPHIC_PARAMETERS, |c| {
            c.enumeration(tag::BLOCK_CIPHER_MODE, 1); // CBC
            c.enumeration(tag::PADDING_METHOD, 3); // PKCS5
            c.enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, ALG_AES);
        });
        p.bytes(tag::DATA, data);
        p.bytes(tag::IV_COUNTER_NONCE, iv);
        let req = Zeroizing::new(p.0);
        self.request(op, &req, |items| {
            let data = bytes_of(items, tag::DATA)?;
            Ok(Zeroizing::new(data.to_vec()))
        })
        .map_err(|e| self.use_error(op, uid, e))
    }

    fn wrap(
        &self,
        uid: &str,
        dk: &DataKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        let kek = SecretKey::random();
        let iv: [u8; 16] = crypto::random_array();
        let ct = self.cipher(Op::Encrypt, uid, kek.expose(), &iv)?;
        if ct.len() < 16 || ct.len() > MAX_KMIP_CT {
            return Err(self.unavailable(format!(
                "its Encrypt answer has a ciphertext of {} bytes for a 32-byte key; expected AES-CBC output",
                ct.len()
            )));
        }
        // Check the server before a volume depends on it.
        let back = self.cipher(Op::Decrypt, uid, &ct, &iv)?;
        if !crypto::ct_eq(&back, kek.expose()) {
            return Err(self.unavailable(format!(
                "key {uid}: what it encrypted does not decrypt back to the same bytes; it does not do AES-CBC with PKCS#5 padding as asked"
            )));
        }
        let mut blob = Vec::with_capacity(8 + iv.len() + ct.len() + 60);
        blob.extend_from_slice(MAGIC);
        blob.push(FORMAT);
        blob.push(MODE_CBC_PKCS5);
        blob.push(u8::try_from(iv.len()).unwrap_or(u8::MAX));
        blob.extend_from_slice(&iv);
        blob.extend_from_slice(&u16::try_from(ct.len()).unwrap_or(u16::MAX).to_be_bytes());
        blob.extend_from_slice(&ct);
        let aad = wrap_aad(&blob, uid, ctx);
        let sealer = Sealer::new(
            CipherKind::Aes256GcmSiv,
            &crypto::derive_subkey(&kek, WRAP_LABEL),
        );
        sealer.seal_into(&aad, dk.expose(), &mut blob);
        Ok(WrappedKey {
            cmk_id: uid.to_owned(),
            cmk_version: CMK_VERSION,
            ciphertext: blob,
        })
    }

    fn unwrap(&self, wrapped: &WrappedKey, ctx: &EncryptionContext) -> Result<DataKey, KmsError> {
        let uid = wrapped.cmk_id.as_str();
        if wrapped.cmk_version != CMK_VERSION {
            return Err(KmsError::UnwrapFailed);
        }
        let blob = parse_blob(&wrapped.ciphertext).ok_or(KmsError::UnwrapFailed)?;
        let kek = self.cipher(Op::Decrypt, uid, blob.kmip_ct, blob.iv)?;
        let kek = SecretKey::from_slice(&kek).ok_or(KmsError::UnwrapFailed)?;
        let aad = wrap_aad(blob.header, uid, ctx);
        let sealer = Sealer::new(
            CipherKind::Aes256GcmSiv,
            &crypto::derive_subkey(&kek, WRAP_LABEL),
        );
        let dk = Zeroizing::new(
            sealer
                .open(&aad, blob.sealed)
                .map_err(|_| KmsError::UnwrapFailed)?,
        );
        SecretKey::from_slice(&dk).ok_or(KmsError::UnwrapFailed)
    }

    // ---- transport ----

    /// One request; `extract` reads the response payload's fields.
    fn request<T>(
        &self,
        op: Op,
        payload: &[u8],
        extract: impl FnOnce(&[Item<'_>]) -> Result<T, &'static str>,
    ) -> Result<T, CallError> {
        let req = encode_request(op, payload);
        let body = self.roundtrip(op, &req)?;
        let protocol = |what: &str| {
            CallError::Transport(format!(
                "its answer to {} is not a valid KMIP response ({what}); is {} a KMIP server?",
                op.name(),
                self.authority
            ))
        };
        let top = ttlv::parse(&body).map_err(protocol)?;
        let [msg] = top.as_slice() else {
            return Err(protocol("more than one top-level item"));
        };
        if msg.tag != tag::RESPONSE_MESSAGE {
            return Err(protocol("not a Response Message"));
        }
        let fields = msg.children().ok_or_else(|| protocol("not a structure"))?;
        let mut batch = fields.iter().filter(|i| i.tag == tag::BATCH_ITEM);
        let (Some(item), None) = (batch.next(), batch.next()) else {
            return Err(protocol("not exactly one batch item"));
        };
        let item = item.children().ok_or_else(|| protocol("batch item"))?;
        let status = enum_of(item, tag::RESULT_STATUS).map_err(protocol)?;
        if status != 0 {
            let reason = enum_of(item, tag::RESULT_REASON).unwrap_or(0x100);
            let message = text_of(item, tag::RESULT_MESSAGE).unwrap_or("");
            let message: String = message
                .chars()
                .filter(|c| !c.is_control())
                .take(300)
                .collect();
            return Err(CallError::Server { reason, message });
        }
        let empty: &[Item<'_>] = &[];
        let payload = match find(item, tag::RESPONSE_PAYLOAD) {
            Some(p) => p
                .children()
                .ok_or_else(|| protocol("payload is not a structure"))?,
            None => empty,
        };
        extract(payload).map_err(protocol)
    }

    /// Sends a request and reads the response frame, over the kept connection when there is
    /// one (re-established once for a retry-safe operation when it broke meanwhile).
    fn roundtrip(&self, op: Op, req: &[u8]) -> Result<Zeroizing<Vec<u8>>, CallError> {
        let mut guard = self.conn.lock();
        if let Some(mut s) = guard.take() {
            match exchange(&mut s, req) {
                Ok(body) => {
                    *guard = Some(s);
                    return Ok(body);
                }
                Err(e) if !op.retry_safe() => return Err(CallError::Transport(self.io_text(&e))),
                Err(e) => log::debug!("{}: reconnecting after: {e}", self.name),
            }
        }
        let mut s = self.dial().map_err(CallError::Transport)?;
        let body = exchange(&mut s, req).map_err(|e| CallError::Transport(self.io_text(&e)))?;
        *guard = Some(s);
        Ok(body)
    }

    /// A new TLS connection, handshake done; retried (refused, timed out) within the
    /// timeout, never for a TLS verification failure.
    fn dial(&self) -> Result<Stream, String> {
        let deadline = Instant::now() + self.timeout;
        let mut last = String::new();
        let mut attempts = 0;
        while attempts < CONNECT_ATTEMPTS {
            if attempts > 0 {
                let pause = Duration::from_millis(200 << attempts);
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::sleep(pause.min(left));
            }
            attempts += 1;
            match self.connect_once(deadline) {
                Ok(s) => return Ok(s),
                Err((retry, msg)) => {
                    last = msg;
                    if !retry {
                        return Err(last);
                    }
                }
            }
        }
        Err(format!(
            "{last} ({attempts} attempt{} within {:.1} s; is the server running and the address right?)",
            if attempts == 1 { "" } else { "s" },
            self.timeout.as_secs_f64()
        ))
    }

    fn connect_once(&self, deadline: Instant) -> Result<Stream, (bool, String)> {
        let addrs: Vec<SocketAddr> = self
            .authority
            .to_socket_addrs()
            .map_err(|e| (true, format!("cannot resolve {}: {e}", self.authority)))?
            .collect();
        let mut last = format!("{} resolves to no address", self.authority);
        let mut tcp = None;
        for a in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                last = format!("cannot connect to {}: timed out", self.authority);
                break;
            }
            match TcpStream::connect_timeout(&a, left) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) if a.to_string() == self.authority => {
                    last = format!("cannot connect to {a}: {e}");
                }
                Err(e) => last = format!("cannot connect to {} ({a}): {e}", self.authority),
            }
        }
        let mut tcp = tcp.ok_or((true, last))?;
        let setup = |e: io::Error| (true, format!("socket setup for {}: {e}", self.authority));
        tcp.set_read_timeout(Some(self.timeout)).map_err(setup)?;
        tcp.set_write_timeout(Some(self.timeout)).map_err(setup)?;
        tcp.set_nodelay(true).map_err(setup)?;
        let mut conn = ClientConnection::new(self.tls.clone(), self.server_name.clone())
            .map_err(|e| (false, format!("TLS setup: {e}")))?;
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut tcp) {
                let timed_out = matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                );
                return Err((timed_out, self.io_text(&e)));
            }
        }
        Ok(StreamOwned::new(conn, tcp))
    }

    /// What an I/O error on the connection means, for a person.
    fn io_text(&self, e: &io::Error) -> String {
        if let Some(t) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return match t {
                rustls::Error::InvalidCertificate(c) => format!(
                    "TLS verification of the server's certificate failed ({c}): check that ca={} is the CA that signed the certificate of {} and that the certificate names {}",
                    self.ca_path, self.authority, self.host
                ),
                rustls::Error::AlertReceived(
                    d @ (AlertDescription::BadCertificate
                    | AlertDescription::UnknownCA
                    | AlertDescription::CertificateUnknown
                    | AlertDescription::CertificateRequired
                    | AlertDescription::CertificateRevoked
                    | AlertDescription::CertificateExpired
                    | AlertDescription::UnsupportedCertificate
                    | AlertDescription::AccessDenied),
                ) => format!(
                    "the server refused the client certificate cert={} (TLS alert {d:?}): check that it is signed by a CA the server trusts and is still valid",
                    self.cert_path
                ),
                other => format!("TLS error with {}: {other}", self.authority),
            };
        }
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                "no answer from {} within {:.1} s",
                self.authority,
                self.timeout.as_secs_f64()
            ),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => format!(
                "{} closed the connection (during the TLS handshake this means it refused the client certificate cert={}, or it does not speak TLS on this port): {e}",
                self.authority, self.cert_path
            ),
            _ => format!("connection to {} failed: {e}", self.authority),
        }
    }
}

fn not_found_text() -> String {
    "does not exist on the server (it was destroyed, or never created there, or belongs to another client identity): the data keys wrapped under it cannot be unwrapped".into()
}

/// Writes a request frame and reads the response frame.
fn exchange(s: &mut Stream, req: &[u8]) -> io::Result<Zeroizing<Vec<u8>>> {
    s.write_all(req)?;
    s.flush()?;
    let mut head = [0u8; 8];
    s.read_exact(&mut head)?;
    let [t0, t1, t2, typ, l0, l1, l2, l3] = head;
    let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
    if u32::from_be_bytes([0, t0, t1, t2]) != tag::RESPONSE_MESSAGE
        || typ != ttlv::STRUCTURE
        || len > MAX_RESPONSE
        || !len.is_multiple_of(8)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the answer is not a KMIP Response Message (wrong header or larger than 1 MiB)",
        ));
    }
    let mut frame = Zeroizing::new(vec![0u8; 8 + len]);
    let (h, body) = frame.split_at_mut(8);
    h.copy_from_slice(&head);
    s.read_exact(body)?;
    Ok(frame)
}

/// The request frame around `payload`, written into one buffer of the right size (the
/// payload may hold a KEK: no intermediate copies are left behind unzeroised).
fn encode_request(op: Op, payload: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut header = Enc::default();
    header.structure(tag::REQUEST_HEADER, |h| {
        h.structure(tag::PROTOCOL_VERSION, |v| {
            v.int(tag::PROTOCOL_VERSION_MAJOR, 1);
            v.int(tag::PROTOCOL_VERSION_MINOR, 2);
        });
        h.int(tag::BATCH_COUNT, 1);
    });
    let mut operation = Enc::default();
    operation.enumeration(tag::OPERATION, op as u32);
    let batch_len = operation.0.len() + 8 + payload.len();
    let message_len = header.0.len() + 8 + batch_len;
    let mut e = Enc(Vec::with_capacity(8 + message_len));
    e.head(tag::REQUEST_MESSAGE, ttlv::STRUCTURE, message_len);
    e.0.extend_from_slice(&header.0);
    e.head(tag::BATCH_ITEM, ttlv::STRUCTURE, batch_len);
    e.0.extend_from_slice(&operation.0);
    e.raw_structure(tag::REQUEST_PAYLOAD, payload);
    Zeroizing::new(e.0)
}

/// AAD of the local seal: the blob header, the key UID, the encryption context.
fn wrap_aad(header: &[u8], uid: &str, ctx: &EncryptionContext) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + uid.len() + 64);
    aad.extend_from_slice(header);
    aad.extend_from_slice(&u32::try_from(uid.len()).unwrap_or(u32::MAX).to_le_bytes());
    aad.extend_from_slice(uid.as_bytes());
    aad.extend_from_slice(&ctx.canonical_bytes());
    aad
}

/// A parsed wrap blob (borrowed).
struct Blob<'a> {
    /// Everything before the sealed DK (bound as AAD).
    header: &'a [u8],
    iv: &'a [u8],
    kmip_ct: &'a [u8],
    sealed: &'a [u8],
}

fn parse_blob(b: &[u8]) -> Option<Blob<'_>> {
    let (magic, rest) = b.split_at_checked(4)?;
    let (&format, rest) = rest.split_first()?;
    let (&mode, rest) = rest.split_first()?;
    let (&iv_len, rest) = rest.split_first()?;
    if magic != MAGIC || format != FORMAT || mode != MODE_CBC_PKCS5 {
        return None;
    }
    let iv_len = usize::from(iv_len);
    if iv_len == 0 || iv_len > MAX_IV {
        return None;
    }
    let (iv, rest) = rest.split_at_checked(iv_len)?;
    let (ct_len, rest) = rest.split_first_chunk::<2>()?;
    let ct_len = usize::from(u16::from_be_bytes(*ct_len));
    if !(16..=MAX_KMIP_CT).contains(&ct_len) {
        return None;
    }
    let (kmip_ct, sealed) = rest.split_at_checked(ct_len)?;
    if sealed.len() != CipherKind::Aes256GcmSiv.overhead() + crypto::KEY_LEN {
        return None;
    }
    let header = b.get(..b.len() - sealed.len())?;
    Some(Blob {
        header,
        iv,
        kmip_ct,
        sealed,
    })
}

impl Kms for KmipKms {
    fn describe(&self) -> String {
        format!("KMIP server kmip://{}/{}", self.authority, self.key)
    }

    fn generate_data_key(
        &self,
        cmk: Option<&str>,
        ctx: &EncryptionContext,
    ) -> Result<(DataKey, WrappedKey), KmsError> {
        let uid = cmk.unwrap_or(&self.key);
        let dk = DataKey::random();
        let wrapped = self.wrap(uid, &dk, ctx)?;
        Ok((dk, wrapped))
    }

    fn decrypt(&self, wrapped: &WrappedKey, ctx: &EncryptionContext) -> Result<DataKey, KmsError> {
        self.unwrap(wrapped, ctx)
    }

    fn re_encrypt(
        &self,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
        dest_cmk: Option<&str>,
    ) -> Result<WrappedKey, KmsError> {
        let dk = self.unwrap(wrapped, ctx)?;
        self.wrap(dest_cmk.unwrap_or(&wrapped.cmk_id), &dk, ctx)
    }

    fn generation_mark(&self, volume_id: &[u8; 16]) -> Result<Option<u64>, KmsError> {
        self.marks.get(volume_id)
    }

    fn record_generation(&self, volume_id: &[u8; 16], generation: u64) -> Result<(), KmsError> {
        self.marks.raise(volume_id, generation)
    }
}

// ---- rollback marks: local state files ----

fn default_state_dir() -> Result<PathBuf, KmsError> {
    if nix::unistd::geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/kmsfs/state"));
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("kmsfs"));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".local/state/kmsfs")),
        None => Err(KmsError::Refused(
            "no state directory for the KMIP rollback marks: set state_dir=DIR in the KMS URL (or HOME / XDG_STATE_HOME)".into(),
        )),
    }
}

/// Rollback marks, one file per volume.
struct Marks {
    dir: PathBuf,
    lock: Mutex<()>,
}

impl Marks {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            lock: Mutex::new(()),
        }
    }

    fn path(&self, vid: &[u8; 16]) -> PathBuf {
        self.dir.join(format!("kmip-{}.mark", super::hex(vid)))
    }

    fn io(path: &Path, e: io::Error) -> KmsError {
        KmsError::Io {
            path: path.display().to_string(),
            source: e,
        }
    }

    fn get(&self, vid: &[u8; 16]) -> Result<Option<u64>, KmsError> {
        let p = self.path(vid);
        let text = match fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Self::io(&p, e)),
        };
        let v = text.strip_suffix('\n').unwrap_or(&text);
        if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) {
            return Err(KmsError::Refused(format!(
                "the rollback mark file {} is damaged (it should hold one decimal number); restore it from a backup, or delete it to trust the volume's current generation",
                p.display()
            )));
        }
        v.parse().map(Some).map_err(|_| {
            KmsError::Refused(format!(
                "the rollback mark file {} holds a number out of range",
                p.display()
            ))
        })
    }

    fn raise(&self, vid: &[u8; 16], generation: u64) -> Result<(), KmsError> {
        let _g = self.lock.lock();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| Self::io(&self.dir, e))?;
        // Other processes (another mount, a CLI command) serialise on a lock file.
        let lock_path = self.dir.join("kmip-marks.lock");
        let lock_file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| Self::io(&lock_path, e))?;
        let _flock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| Self::io(&lock_path, io::Error::from(e)))?;
        if self.get(vid)?.is_some_and(|m| m >= generation) {
            return Ok(());
        }
        let p = self.path(vid);
        let tmp = p.with_extension("mark.tmp");
        let write = || -> io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(format!("{generation}\n").as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &p)?;
            fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| Self::io(&p, e))
    }
}

// ---- KMIP numbers ----

const ALG_AES: u32 = 3;
const USAGE_ENCRYPT: i32 = 0x4;
const USAGE_DECRYPT: i32 = 0x8;
const REASON_ITEM_NOT_FOUND: u32 = 1;
const REASON_OPERATION_NOT_SUPPORTED: u32 = 5;
const REASON_PERMISSION_DENIED: u32 = 12;

fn reason_name(r: u32) -> String {
    let n = match r {
        1 => "Item Not Found",
        2 => "Response Too Large",
        3 => "Authentication Not Successful",
        4 => "Invalid Message",
        5 => "Operation Not Supported",
        6 => "Missing Data",
        7 => "Invalid Field",
        8 => "Feature Not Supported",
        10 => "Cryptographic Failure",
        11 => "Illegal Operation",
        12 => "Permission Denied",
        0x100 => "General Failure",
        _ => return format!("result reason {r}"),
    };
    n.to_owned()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Op {
    Create = 0x01,
    GetAttributes = 0x0B,
    Activate = 0x12,
    Revoke = 0x13,
    Destroy = 0x14,
    Encrypt = 0x1F,
    Decrypt = 0x20,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Self::Create => "Create",
            Self::GetAttributes => "Get Attributes",
            Self::Activate => "Activate",
            Self::Revoke => "Revoke",
            Self::Destroy => "Destroy",
            Self::Encrypt => "Encrypt",
            Self::Decrypt => "Decrypt",
        }
    }

    /// Whether sending it twice is harmless (a broken kept connection is retried).
    fn retry_safe(self) -> bool {
        matches!(self, Self::GetAttributes | Self::Encrypt | Self::Decrypt)
    }
}

mod tag {
    pub const ATTRIBUTE: u32 = 0x42_0008;
    pub const ATTRIBUTE_NAME: u32 = 0x42_000A;
    pub const ATTRIBUTE_VALUE: u32 = 0x42_000B;
    pub const BATCH_COUNT: u32 = 0x42_000D;
    pub const BATCH_ITEM: u32 = 0x42_000F;
    pub const BLOCK_CIPHER_MODE: u32 = 0x42_0011;
    pub const CRYPTOGRAPHIC_ALGORITHM: u32 = 0x42_0028;
    pub const CRYPTOGRAPHIC_PARAMETERS: u32 = 0x42_002B;
    pub const IV_COUNTER_NONCE: u32 = 0x42_003D;
    pub const OBJECT_TYPE: u32 = 0x42_0057;
    pub const OPERATION: u32 = 0x42_005C;
    pub const PADDING_METHOD: u32 = 0x42_005F;
    pub const PROTOCOL_VERSION: u32 = 0x42_0069;
    pub const PROTOCOL_VERSION_MAJOR: u32 = 0x42_006A;
    pub const PROTOCOL_VERSION_MINOR: u32 = 0x42_006B;
    pub const REQUEST_HEADER: u32 = 0x42_0077;
    pub const REQUEST_MESSAGE: u32 = 0x42_0078;
    pub const REQUEST_PAYLOAD: u32 = 0x42_0079;
    pub const RESPONSE_MESSAGE: u32 = 0x42_007B;
    pub const RESPONSE_PAYLOAD: u32 = 0x42_007C;
    pub const RESULT_MESSAGE: u32 = 0x42_007D;
    pub const RESULT_REASON: u32 = 0x42_007E;
    pub const RESULT_STATUS: u32 = 0x42_007F;
    pub const REVOCATION_REASON: u32 = 0x42_0081;
    pub const REVOCATION_REASON_CODE: u32 = 0x42_0082;
    pub const TEMPLATE_ATTRIBUTE: u32 = 0x42_0091;
    pub const UNIQUE_IDENTIFIER: u32 = 0x42_0094;
    pub const DATA: u32 = 0x42_00C2;
}

// ---- TTLV ----

/// TTLV encoder: appends items to a buffer.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn head(&mut self, tag: u32, typ: u8, len: usize) {
        self.0.extend_from_slice(&tag.to_be_bytes()[1..]);
        self.0.push(typ);
        let len = u32::try_from(len).expect("TTLV item under 4 GiB");
        self.0.extend_from_slice(&len.to_be_bytes());
    }

    fn pad(&mut self) {
        let n = self.0.len().next_multiple_of(8);
        self.0.resize(n, 0);
    }

    fn int(&mut self, tag: u32, v: i32) {
        self.head(tag, ttlv::INTEGER, 4);
        self.0.extend_from_slice(&v.to_be_bytes());
        self.pad();
    }

    fn enumeration(&mut self, tag: u32, v: u32) {
        self.head(tag, ttlv::ENUMERATION, 4);
        self.0.extend_from_slice(&v.to_be_bytes());
        self.pad();
    }

    fn text(&mut self, tag: u32, s: &str) {
        self.head(tag, ttlv::TEXT, s.len());
        self.0.extend_from_slice(s.as_bytes());
        self.pad();
    }

    fn bytes(&mut self, tag: u32, b: &[u8]) {
        self.head(tag, ttlv::BYTES, b.len());
        self.0.extend_from_slice(b);
        self.pad();
    }

    fn structure(&mut self, tag: u32, f: impl FnOnce(&mut Enc)) {
        let mut inner = Enc::default();
        f(&mut inner);
        self.raw_structure(tag, &inner.0);
    }

    /// A structure whose (already encoded, 8-aligned) contents are given.
    fn raw_structure(&mut self, tag: u32, contents: &[u8]) {
        self.head(tag, ttlv::STRUCTURE, contents.len());
        self.0.extend_from_slice(contents);
    }
}

/// A decoded TTLV item borrowing the frame.
struct Item<'a> {
    tag: u32,
    value: Value<'a>,
}

enum Value<'a> {
    Structure(Vec<Item<'a>>),
    Integer(i32),
    Enumeration(u32),
    Text(&'a str),
    Bytes(&'a [u8]),
    /// Long Integer, Big Integer, Boolean, Date-Time, Interval: not used here.
    Other,
}

impl<'a> Item<'a> {
    fn children(&self) -> Option<&[Item<'a>]> {
        match &self.value {
            Value::Structure(c) => Some(c),
            _ => None,
        }
    }
}

fn find<'b, 'a>(items: &'b [Item<'a>], tag: u32) -> Option<&'b Item<'a>> {
    items.iter().find(|i| i.tag == tag)
}

fn enum_of(items: &[Item<'_>], tag: u32) -> Result<u32, &'static str> {
    match find(items, tag).map(|i| &i.value) {
        Some(Value::Enumeration(v)) => Ok(*v),
        // Some servers send enumerations of attribute values as integers.
        Some(Value::Integer(v)) => u32::try_from(*v).map_err(|_| "a negative enumeration"),
        Some(_) => Err("a field has the wrong type"),
        None => Err("a required field is missing"),
    }
}

fn text_of<'a>(items: &[Item<'a>], tag: u32) -> Result<&'a str, &'static str> {
    match find(items, tag).map(|i| &i.value) {
        Some(Value::Text(s)) => Ok(s),
        Some(_) => Err("a field has the wrong type"),
        None => Err("a required field is missing"),
    }
}

fn bytes_of<'a>(items: &[Item<'a>], tag: u32) -> Result<&'a [u8], &'static str> {
    match find(items, tag).map(|i| &i.value) {
        Some(Value::Bytes(b)) => Ok(b),
        Some(_) => Err("a field has the wrong type"),
        None => Err("a required field is missing"),
    }
}

mod ttlv {
    //! Bounds-checked TTLV decoding: every length is checked against the bytes that are
    //! there before it is used; depth and item count are bounded.

    use super::{Item, Value};

    pub const STRUCTURE: u8 = 0x01;
    pub const INTEGER: u8 = 0x02;
    pub const LONG: u8 = 0x03;
    pub const BIG: u8 = 0x04;
    pub const ENUMERATION: u8 = 0x05;
    pub const BOOLEAN: u8 = 0x06;
    pub const TEXT: u8 = 0x07;
    pub const BYTES: u8 = 0x08;
    pub const DATETIME: u8 = 0x09;
    pub const INTERVAL: u8 = 0x0A;

    const MAX_DEPTH: u32 = 16;
    const MAX_ITEMS: usize = 4096;

    /// Parses a sequence of items filling `buf` exactly.
    pub fn parse(buf: &[u8]) -> Result<Vec<Item<'_>>, &'static str> {
        let mut count = 0;
        parse_seq(buf, 0, &mut count)
    }

    fn parse_seq<'a>(
        mut buf: &'a [u8],
        depth: u32,
        count: &mut usize,
    ) -> Result<Vec<Item<'a>>, &'static str> {
        if depth > MAX_DEPTH {
            return Err("nested too deeply");
        }
        let mut out = Vec::new();
        while !buf.is_empty() {
            *count += 1;
            if *count > MAX_ITEMS {
                return Err("too many items");
            }
            let (head, rest) = buf
                .split_first_chunk::<8>()
                .ok_or("truncated item header")?;
            let [t0, t1, t2, typ, l0, l1, l2, l3] = *head;
            let tag = u32::from_be_bytes([0, t0, t1, t2]);
            let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
            let fixed = match typ {
                INTEGER | ENUMERATION | INTERVAL => Some(4),
                LONG | BOOLEAN | DATETIME => Some(8),
                STRUCTURE | TEXT | BYTES | BIG => None,
                _ => return Err("unknown item type"),
            };
            if fixed.is_some_and(|f| f != len) || (typ == BIG && !len.is_multiple_of(8)) {
                return Err("item length does not match its type");
            }
            if typ == STRUCTURE && !len.is_multiple_of(8) {
                return Err("structure length not a multiple of 8");
            }
            let padded = len.checked_next_multiple_of(8).ok_or("item too long")?;
            let (body, after) = rest.split_at_checked(padded).ok_or("truncated item")?;
            let (value, _padding) = body.split_at_checked(len).ok_or("truncated item")?;
            let value = match typ {
                STRUCTURE => Value::Structure(parse_seq(value, depth + 1, count)?),
                INTEGER => Value::Integer(i32::from_be_bytes(
                    value.try_into().map_err(|_| "bad integer")?,
                )),
                ENUMERATION => Value::Enumeration(u32::from_be_bytes(
                    value.try_into().map_err(|_| "bad enumeration")?,
                )),
                TEXT => Value::Text(std::str::from_utf8(value).map_err(|_| "text not UTF-8")?),
                BYTES => Value::Bytes(value),
                _ => Value::Other,
            };
            out.push(Item { tag, value });
            buf = after;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_a_request_like_the_spec() {
        // KMIP 1.2 test vector shape: an Activate of UID "1".
        let mut p = Enc::default();
        p.text(tag::UNIQUE_IDENTIFIER, "1");
        let req = encode_request(Op::Activate, &p.0);
        let items = ttlv::parse(&req).unwrap();
        let [msg] = items.as_slice() else { panic!() };
        assert_eq!(msg.tag, tag::REQUEST_MESSAGE);
        assert_eq!(req.len() % 8, 0);
        assert_eq!(&req[..4], &[0x42, 0x00, 0x78, 0x01]);
        let batch = find(msg.children().unwrap(), tag::BATCH_ITEM).unwrap();
        let b = batch.children().unwrap();
        assert_eq!(enum_of(b, tag::OPERATION).unwrap(), 0x12);
        let payload = find(b, tag::REQUEST_PAYLOAD).unwrap().children().unwrap();
        assert_eq!(text_of(payload, tag::UNIQUE_IDENTIFIER).unwrap(), "1");
        // The text item: 8-byte header, "1", 7 bytes of padding.
        let mut t = Enc::default();
        t.text(tag::UNIQUE_IDENTIFIER, "1");
        assert_eq!(
            t.0,
            [
                0x42, 0x00, 0x94, 0x07, 0, 0, 0, 1, b'1', 0, 0, 0, 0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn decoder_refuses_malformed_input() {
        let mut e = Enc::default();
        e.structure(tag::RESPONSE_MESSAGE, |m| {
            m.int(tag::BATCH_COUNT, 1);
            m.bytes(tag::DATA, b"abc");
        });
        let good = e.0;
        assert!(ttlv::parse(&good).is_ok());
        // Every truncation fails cleanly.
        for n in 0..good.len() {
            assert!(ttlv::parse(&good[..n]).is_err() || n == 0, "len {n}");
        }
        // Every single-byte change either parses or fails, never panics.
        for i in 0..good.len() {
            for v in [0u8, 0x01, 0x07, 0x7f, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                let _ = ttlv::parse(&b);
            }
        }
        // A length that runs past the end.
        let mut b = good.clone();
        b[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(ttlv::parse(&b).is_err());
        // Deep nesting.
        let mut deep = Vec::new();
        for _ in 0..40 {
            let mut e = Enc::default();
            e.raw_structure(tag::BATCH_ITEM, &deep);
            deep = e.0;
        }
        assert_eq!(ttlv::parse(&deep).err(), Some("nested too deeply"));
    }

    #[test]
    fn blob_parser_is_strict() {
        let mut blob = Vec::new();
        blob.extend_from_slice(MAGIC);
        blob.extend_from_slice(&[FORMAT, MODE_CBC_PKCS5, 16]);
        blob.extend_from_slice(&[7u8; 16]);
        blob.extend_from_slice(&48u16.to_be_bytes());
        blob.extend_from_slice(&[9u8; 48]);
        let header_len = blob.len();
        blob.extend_from_slice(&[1u8; 60]);
        let b = parse_blob(&blob).unwrap();
        assert_eq!(b.header.len(), header_len);
        assert_eq!(b.iv, &[7u8; 16]);
        assert_eq!(b.kmip_ct.len(), 48);
        assert_eq!(b.sealed.len(), 60);
        for n in 0..blob.len() {
            assert!(parse_blob(&blob[..n]).is_none());
        }
        let mut longer = blob.clone();
        longer.push(0);
        assert!(parse_blob(&longer).is_none());
        let mut bad = blob.clone();
        bad[5] = 2;
        assert!(parse_blob(&bad).is_none());
    }

    #[test]
    fn url_parameters_are_checked() {
        let url = |q: &str| KmsUrl::parse(&format!("kmip://127.0.0.1:1/k?{q}")).unwrap();
        let e = KmipKms::connect(&url("cert=/a&key=/b"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca=FILE is missing"), "{e}");
        let e = KmipKms::connect(&url("cert=/a&key=/b&ca=/c&colour=red"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown parameter \"colour\""), "{e}");
        let e = KmipKms::connect(&url("cert=/a&key=/b&ca=/c&timeout=soon"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("timeout"), "{e}");
        let e = KmipKms::connect(&url("cert=/nonexistent/c.pem&key=/nonexistent/k.pem&ca=/c"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/c.pem"), "{e}");
    }

    #[test]
    fn marks_only_go_up() {
        let dir = tempfile::tempdir().unwrap();
        let m = Marks::new(dir.path().join("state"));
        let v = [3u8; 16];
        assert_eq!(m.get(&v).unwrap(), None);
        m.raise(&v, 5).unwrap();
        m.raise(&v, 3).unwrap();
        assert_eq!(m.get(&v).unwrap(), Some(5));
        m.raise(&v, 9).unwrap();
        assert_eq!(m.get(&v).unwrap(), Some(9));
        fs::write(m.path(&v), "nine\n").unwrap();
        assert!(m.get(&v).unwrap_err().to_string().contains("damaged"));
    }
}
