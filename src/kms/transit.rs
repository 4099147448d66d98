//! OpenBao / HashiCorp Vault Transit as the KMS: `openbao+http(s)://HOST:PORT/KEY`
//! (`vault+…` is a synonym). The CMK is a Transit key; it never leaves the server.
//!
//! # URL parameters
//!
//! | parameter | meaning | default |
//! | --- | --- | --- |
//! | `mount=` | path of the Transit engine | `transit` |
//! | `token_file=PATH` | file holding the token (mode 0600, owned by you) | `BAO_TOKEN`, else `VAULT_TOKEN` |
//! | `ca_file=PATH` | PEM CA certificate(s) for `https` | the system's roots |
//! | `timeout=` | bound on each operation, seconds (`5`, `2.5`, `500ms`) | 5 s |
//! | `namespace=` | `X-Vault-Namespace` | none |
//! | `kv_mount=` | KV version 2 engine for the rollback marks | `secret` |
//! | `state_dir=PATH` | local fallback for the rollback marks | `/var/lib/kmsfs/state` (root), else `$XDG_STATE_HOME/kmsfs` |
//!
//! Tokens never come from the URL and never appear in a message or a log; the token is
//! held in zeroizing memory (the HTTP library copies it into each request's header).
//!
//! # Wrapping
//!
//! The DK is generated locally from the OS RNG and wrapped with Transit `encrypt`; the
//! volume's [`EncryptionContext`] (its canonical bytes) is sent both as
//! `associated_data` (AEAD keys: `aes128-gcm96`, `aes256-gcm96`, `chacha20-poly1305`) and
//! as `context` (used by keys created with `derived=true`, ignored by the others), so a
//! wrapped DK does not unwrap for another volume. `datakey/wrapped` and `rewrap` are not
//! used because OpenBao (2.7) ignores `associated_data` on them: `datakey` would return a
//! wrap without the binding and `rewrap` cannot open one with it. So re-wrapping
//! ([`Kms::re_encrypt`]) is `decrypt` + `encrypt` under the newest version of the same or
//! the destination key; the DK passes only through this process's zeroized memory and is
//! never returned. [`Kms::generate_data_key`] checks the new wrap: it must unwrap with the
//! volume's context and must not with another, so a server that ignores
//! `associated_data` (Vault before 1.12) is refused instead of silently not binding.
//!
//! [`WrappedKey`]: `cmk_id` = the Transit key name, `cmk_version` = the key version (the
//! `vault:vN:` prefix), `ciphertext` = the Transit ciphertext string's bytes.
//!
//! # Rollback marks
//!
//! A volume's generation high-water mark lives next to the key, in OpenBao's KV version
//! 2 engine (`kv_mount=`, default `secret`, which a dev server mounts) at
//! `kmsfs/marks/VOLUME_ID_HEX`, field `generation`. It only rises: read, compare, then a
//! check-and-set write. When the KV engine is missing or the token may not use it, the
//! marks go to a local state file instead, `STATE_DIR/marks/VOLUME_ID_HEX`, with a
//! warning (once per process); the mark read at mount is the higher of the two, so a
//! mark kept locally while the KV was out of reach still counts. Both are outside the
//! backing store, as the rollback check needs. After a failed KV write the marks go to
//! the state file for 30 s before the KV is tried again, so a server that went away does
//! not slow every commit of a mounted volume by the timeout.
//!
//! # Key lifecycle
//!
//! Rotation is Transit `rotate`; `describe_key`/`list_keys` show the Transit key's
//! versions. Transit has no "disable": the closest are `min_decryption_version` (older
//! versions refuse to decrypt), a policy that denies the token, and deleting the key
//! (`deletion_allowed=true`, then delete). Each gives a clear error here. Enabling,
//! disabling, deleting and importing keys are done with OpenBao's own commands.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use parking_lot::Mutex;
use serde_json::Value;
use zeroize::{Zeroize as _, Zeroizing};

use super::remote::KmsUrl;
use super::{
    EncryptionContext, KeyChange, KeyInfo, KeyKind, KeyOrigin, KeyState, Kms, KmsError,
    VersionInfo, WrappedKey, hex,
};
use crate::crypto::{DataKey, SecretKey};

/// Default bound on one operation (all its attempts).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts of a request whose connection failed.
const ATTEMPTS: u32 = 3;
/// Largest response body read.
const MAX_BODY: u64 = 1 << 20;
/// After a failed KV write, marks go to the state file this long.
const KV_BACKOFF: Duration = Duration::from_secs(30);
/// Transit key types that authenticate `associated_data`.
const AEAD_TYPES: [&str; 3] = ["aes128-gcm96", "aes256-gcm96", "chacha20-poly1305"];
/// Query parameters this backend reads.
const PARAMS: [&str; 7] = [
    "mount",
    "token_file",
    "ca_file",
    "timeout",
    "namespace",
    "kv_mount",
    "state_dir",
];

/// Connects to OpenBao / Vault Transit as the URL says. Does not contact the server: the
/// first operation does (and reports an unreachable server, a denied token or a missing
/// key then).
///
/// # Errors
/// [`KmsError::Refused`] for a bad parameter, a missing token or an unusable CA file;
/// [`KmsError::UnsafePermissions`] for a token file others can read.
pub fn open(url: &KmsUrl) -> Result<Arc<dyn Kms>, KmsError> {
    Ok(Arc::new(Transit::open(url)?))
}

/// A Transit key on an OpenBao / Vault server.
pub struct Transit {
    agent: ureq::Agent,
    /// `http://host:port`.
    base: String,
    key: String,
    mount: String,
    kv_mount: String,
    namespace: Option<String>,
    token: Zeroizing<String>,
    timeout: Duration,
    state_dir: PathBuf,
    marks: Mutex<Marks>,
    warned_local: AtomicBool,
}

#[derive(Default)]
struct Marks {
    /// The highest mark known to be recorded, per volume.
    recorded: HashMap<[u8; 16], u64>,
    /// KV writes are not tried before this time.
    kv_skip_until: Option<Instant>,
}

/// Why the KV engine could not keep a mark.
enum KvError {
    /// No KV version 2 engine there, or the token may not use it.
    Unusable(KmsError),
    /// The server is out of reach or failing.
    Down(KmsError),
}

/// An HTTP answer: status and body (zeroized on drop: it may hold a DK).
struct Reply {
    status: u16,
    body: Zeroizing<String>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// The server's `errors` joined, or the body's start.
    fn errors(&self) -> String {
        match self.json().get("errors").and_then(Value::as_array) {
            Some(a) if !a.is_empty() => a
                .iter()
                .map(|e| e.as_str().unwrap_or("?").to_owned())
                .collect::<Vec<_>>()
                .join("; "),
            _ => self.body.chars().take(200).collect(),
        }
    }
}

fn refused(msg: String) -> KmsError {
    KmsError::Refused(msg)
}

/// Transit key names and mount paths go into URL paths: a conservative character set.
fn check_name(what: &str, name: &str, url: &str) -> Result<(), KmsError> {
    let ok = !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(refused(format!(
            "the OpenBao {what} {name:?} (from {url}) is not usable: use letters, digits, '-', '_' and '.'"
        )))
    }
}

fn check_mount(what: &str, mount: &str, url: &str) -> Result<(), KmsError> {
    let m = mount.trim_matches('/');
    if m.is_empty() || m.split('/').any(|p| check_name(what, p, url).is_err()) {
        return Err(refused(format!(
            "the OpenBao {what} {mount:?} (from {url}) is not usable: use path segments of letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

/// `5`, `2.5`, `5s`, `500ms`.
fn parse_timeout(s: &str) -> Option<Duration> {
    let d = if let Some(ms) = s.strip_suffix("ms") {
        Duration::from_millis(ms.parse().ok()?)
    } else {
        let secs: f64 = s.strip_suffix('s').unwrap_or(s).parse().ok()?;
        if !secs.is_finite() || secs <= 0.0 {
            return None;
        }
        Duration::from_secs_f64(secs)
    };
    (Duration::from_millis(10)..=Duration::from_secs(600))
        .contains(&d)
        .then_some(d)
}

/// The token: `token_file=` if given, else `BAO_TOKEN`, else `VAULT_TOKEN`.
fn resolve_token(
    params: &BTreeMap<String, String>,
    env: impl Fn(&str) -> Option<String>,
    url: &str,
) -> Result<Zeroizing<String>, KmsError> {
    if let Some(path) = params.get("token_file") {
        let p = Path::new(path);
        super::keystore::check_private_file(p, "OpenBao token file")?;
        let raw = Zeroizing::new(std::fs::read(p).map_err(|e| {
            refused(format!(
                "the OpenBao token file {path} (token_file= in {url}) cannot be read: {e}"
            ))
        })?);
        let s = std::str::from_utf8(&raw)
            .map_err(|_| refused(format!("the OpenBao token file {path} is not text")))?;
        let t = Zeroizing::new(s.trim().to_owned());
        if t.is_empty() {
            return Err(refused(format!("the OpenBao token file {path} is empty")));
        }
        return Ok(t);
    }
    for var in ["BAO_TOKEN", "VAULT_TOKEN"] {
        if let Some(v) = env(var) {
            let t = Zeroizing::new(v.trim().to_owned());
            let mut v = v;
            v.zeroize();
            if !t.is_empty() {
                return Ok(t);
            }
        }
    }
    Err(refused(format!(
        "no OpenBao token for {url}: set BAO_TOKEN (or VAULT_TOKEN), or add token_file=PATH (a file of mode 0600) to the URL"
    )))
}

fn default_state_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/kmsfs/state");
    }
    match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x).join("kmsfs"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/".into()))
            .join(".local/state/kmsfs"),
    }
}

fn load_ca(path: &str, url: &str) -> Result<Vec<ureq::tls::Certificate<'static>>, KmsError> {
    let pem = std::fs::read(path).map_err(|e| {
        refused(format!(
            "the CA file {path} (ca_file= in {url}) cannot be read: {e}"
        ))
    })?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => {
                return Err(refused(format!(
                    "the CA file {path} (ca_file= in {url}) is not PEM: {e}"
                )));
            }
        }
    }
    if certs.is_empty() {
        return Err(refused(format!(
            "the CA file {path} (ca_file= in {url}) holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)"
        )));
    }
    Ok(certs)
}

/// Parses `vault:vN:…`.
fn ciphertext_version(ct: &str) -> Option<u32> {
    let rest = ct.strip_prefix("vault:v")?;
    let (n, body) = rest.split_once(':')?;
    if body.is_empty() {
        return None;
    }
    n.parse().ok().filter(|v| *v > 0)
}

fn io_kind(e: &ureq::Error) -> Option<std::io::ErrorKind> {
    match e {
        ureq::Error::Io(io) => Some(io.kind()),
        _ => None,
    }
}

/// Whether an attempt may be repeated: the connection failed before the request
/// reached the server (any request), or broke afterwards (idempotent requests only).
fn retryable(e: &ureq::Error, idempotent: bool) -> bool {
    use std::io::ErrorKind as K;
    match e {
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => true,
        ureq::Error::Timeout(t) => matches!(t, ureq::Timeout::Connect | ureq::Timeout::Resolve),
        _ => match io_kind(e) {
            Some(K::ConnectionRefused | K::NotConnected | K::AddrNotAvailable) => true,
            Some(K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof) => {
                idempotent
            }
            _ => false,
        },
    }
}

fn describe_error(e: &ureq::Error) -> String {
    use std::io::ErrorKind as K;
    match e {
        ureq::Error::Timeout(_) => "no answer in time".into(),
        ureq::Error::HostNotFound => "host name not found".into(),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        _ => match io_kind(e) {
            Some(K::ConnectionRefused) => "connection refused".into(),
            Some(K::TimedOut) => "no answer in time".into(),
            _ => e.to_string(),
        },
    }
}

fn is_tls(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_)
    )
}

impl Transit {
    /// As [`open`], with the concrete type.
    ///
    /// # Errors
    /// As [`open`].
    pub fn open(url: &KmsUrl) -> Result<Self, KmsError> {
        Self::open_with_env(url, |v| std::env::var(v).ok())
    }

    fn open_with_env(url: &KmsUrl, env: impl Fn(&str) -> Option<String>) -> Result<Self, KmsError> {
        let KmsUrl::Transit {
            scheme,
            authority,
            key,
            params,
        } = url
        else {
            return Err(refused(format!(
                "{url:?} is not an OpenBao / Vault Transit URL"
            )));
        };
        let base = format!("{scheme}://{authority}");
        let shown = format!("{base}/{key}");
        if let Some(k) = params.keys().find(|k| !PARAMS.contains(&k.as_str())) {
            return Err(refused(format!(
                "the OpenBao URL {shown} has an unknown parameter {k:?}; known: {}",
                PARAMS.join(", ")
            )));
        }
        check_name("key name", key, &shown)?;
        let mount = params
            .get("mount")
            .map_or("transit", String::as_str)
            .trim_matches('/')
            .to_owned();
        check_mount("mount", &mount, &shown)?;
        let kv_mount = params
            .get("kv_mount")
            .map_or("secret", String::as_str)
            .trim_matches('/')
            .to_owned();
        check_mount("kv_mount", &kv_mount, &shown)?;
        let namespace = params.get("namespace").cloned();
        if let Some(ns) = &namespace {
            check_mount("namespace", ns, &shown)?;
        }
        let timeout = match params.get("timeout") {
            None => DEFAULT_TIMEOUT,
            Some(t) => parse_timeout(t).ok_or_else(|| {
                refused(format!(
                    "timeout={t} in {shown} is not a duration between 10ms and 600s (write 5, 2.5 or 500ms)"
                ))
            })?,
        };
        let state_dir = params
            .get("state_dir")
            .map_or_else(default_state_dir, PathBuf::from);
        let token = resolve_token(params, env, &shown)?;
        if token.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
            return Err(refused(format!(
                "the OpenBao token for {shown} has characters a token cannot have (spaces or control characters)"
            )));
        }
        let root_certs = match (scheme.as_str(), params.get("ca_file")) {
            ("https", Some(ca)) => ureq::tls::RootCerts::new_with_certs(&load_ca(ca, &shown)?),
            ("https", None) => ureq::tls::RootCerts::PlatformVerifier,
            (_, Some(_)) => {
                return Err(refused(format!(
                    "ca_file= in {shown} is for https only; use openbao+https:// to verify the server"
                )));
            }
            _ => ureq::tls::RootCerts::WebPki,
        };
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("kmsfs/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(timeout))
            .timeout_global(Some(timeout))
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(root_certs)
                    .build(),
            )
            .build();
        Ok(Self {
            agent: config.into(),
            base,
            key: key.clone(),
            mount,
            kv_mount,
            namespace,
            token,
            timeout,
            state_dir,
            marks: Mutex::new(Marks::default()),
            warned_local: AtomicBool::new(false),
        })
    }

    /// The full URL of an API path, for messages.
    fn at(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.base)
    }

    /// One API request, with retries on connection failures, all within the timeout.
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        idempotent: bool,
    ) -> Result<Reply, KmsError> {
        let url = self.at(path);
        let start = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let left = self.timeout.saturating_sub(start.elapsed());
            let mut token = ureq::http::HeaderValue::from_str(&self.token)
                .map_err(|_| refused("the OpenBao token is not a valid header value".into()))?;
            token.set_sensitive(true);
            let res = match (method, body) {
                ("GET" | "LIST", _) => {
                    let mut r = self.agent.get(&url).header("X-Vault-Token", token);
                    if method == "LIST" {
                        r = r.query("list", "true");
                    }
                    if let Some(ns) = &self.namespace {
                        r = r.header("X-Vault-Namespace", ns);
                    }
                    r.config().timeout_global(Some(left)).build().call()
                }
                _ => {
                    let mut r = self
                        .agent
                        .post(&url)
                        .header("X-Vault-Token", token)
                        .content_type("application/json");
                    if let Some(ns) = &self.namespace {
                        r = r.header("X-Vault-Namespace", ns);
                    }
                    r.config()
                        .timeout_global(Some(left))
                        .build()
                        .send(body.unwrap_or(b"{}"))
                }
            };
            match res {
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    let body = resp
                        .body_mut()
                        .with_config()
                        .limit(MAX_BODY)
                        .read_to_string()
                        .map_err(|e| {
                            refused(format!(
                                "OpenBao at {url} answered {status} but the answer could not be read: {}",
                                describe_error(&e)
                            ))
                        })?;
                    return Ok(Reply {
                        status,
                        body: Zeroizing::new(body),
                    });
                }
                Err(e) if is_tls(&e) => {
                    return Err(refused(format!(
                        "TLS with OpenBao at {url} failed ({e}): check that ca_file= names the CA that signed the server's certificate and that the URL's host name is in that certificate"
                    )));
                }
                Err(e) => {
                    let pause = Duration::from_millis(100 << (attempt - 1));
                    let left = self.timeout.saturating_sub(start.elapsed());
                    if attempt < ATTEMPTS && retryable(&e, idempotent) && left > pause {
                        log::debug!(
                            "OpenBao at {url}: {} (attempt {attempt}); retrying",
                            describe_error(&e)
                        );
                        std::thread::sleep(pause);
                        continue;
                    }
                    return Err(refused(format!(
                        "OpenBao at {url} is unreachable ({}) after {attempt} attempt{} in {:.1} s: check that the server is running and the URL's host and port, or raise timeout= (now {:.1} s)",
                        describe_error(&e),
                        if attempt == 1 { "" } else { "s" },
                        start.elapsed().as_secs_f64(),
                        self.timeout.as_secs_f64()
                    )));
                }
            }
        }
    }

    /// The errors every endpoint shares (denied token, sealed server, missing engine,
    /// server errors); `None` for the endpoint to interpret.
    fn common_error(&self, path: &str, r: &Reply, engine: &str) -> Option<KmsError> {
        let url = self.at(path);
        let errs = r.errors();
        match r.status {
            403 => Some(refused(format!(
                "OpenBao denied the token (403 {errs}) for {url}: the token is wrong, expired or revoked, or its policy does not allow this path; check BAO_TOKEN / VAULT_TOKEN / token_file and the token's policy"
            ))),
            503 if errs.contains("sealed") || r.body.contains("sealed") => Some(refused(format!(
                "OpenBao at {url} is sealed (503): unseal it (`bao operator unseal`) and retry"
            ))),
            404 if errs.contains("no handler for route") => Some(refused(format!(
                "OpenBao has no {engine} engine at {url} ({errs}): enable it (`bao secrets enable -path={} {}`) or set {} in the URL to where it is mounted",
                path.split('/').next().unwrap_or(""),
                if engine == "Transit" {
                    "transit"
                } else {
                    "kv-v2"
                },
                if engine == "Transit" {
                    "mount="
                } else {
                    "kv_mount="
                },
            ))),
            s if s >= 500 => Some(refused(format!(
                "OpenBao at {url} failed ({s} {errs}); check the server's log and retry"
            ))),
            _ => None,
        }
    }

    /// A missing key. `path`: the request; the advice differs for a new wrap (create
    /// the key) and for an existing one (its key is gone).
    fn key_not_found(&self, name: &str, path: &str) -> KmsError {
        let key_url = self.at(&format!("{}/keys/{name}", self.mount));
        if path.contains("/decrypt/") {
            refused(format!(
                "the Transit key {name} does not exist at {key_url} (asked by {}): it was deleted, and then the data keys wrapped under it are unrecoverable (restore the key from an OpenBao backup), or the URL names another server or mount= than the one the volume was made with",
                self.at(path)
            ))
        } else {
            refused(format!(
                "the Transit key {name} does not exist at {key_url}: check the key name and mount= in the URL, or create it with `bao write -f {}/keys/{name} type=aes256-gcm96`",
                self.mount
            ))
        }
    }

    /// An error answer of a Transit endpoint, interpreted.
    fn transit_error(&self, path: &str, name: &str, version: Option<u32>, r: &Reply) -> KmsError {
        if let Some(e) = self.common_error(path, r, "Transit") {
            return e;
        }
        let errs = r.errors();
        let url = self.at(path);
        if errs.contains("encryption key not found") || errs.contains("key not found") {
            return self.key_not_found(name, path);
        }
        if errs.contains("message authentication failed") {
            return KmsError::UnwrapFailed;
        }
        if errs.contains("disallowed by policy") || errs.contains("too old") {
            let v = version.map_or_else(|| "its".into(), |v| format!("version {v}"));
            return refused(format!(
                "the Transit key {name} refuses to decrypt {v} ({errs}, {url}): its min_decryption_version is above the version this data key was wrapped under (the key is \"disabled\" for it) or the version was trimmed; if the version still exists, lower it with `bao write {}/keys/{name}/config min_decryption_version=N`",
                self.mount
            ));
        }
        if errs.contains("min_encryption_version") {
            return refused(format!(
                "the Transit key {name} refuses to encrypt ({errs}, {url}): check its min_encryption_version"
            ));
        }
        if errs.contains("associated_data") && errs.contains("non-AEAD") {
            return refused(format!(
                "the Transit key {name} cannot bind the volume id ({errs}): kmsfs needs an AEAD key (aes256-gcm96, aes128-gcm96 or chacha20-poly1305); create one with `bao write -f {}/keys/NAME type=aes256-gcm96`",
                self.mount
            ));
        }
        if errs.contains("invalid ciphertext") || errs.contains("invalid ciphertext version") {
            return KmsError::UnwrapFailed;
        }
        refused(format!("OpenBao refused {url} ({} {errs})", r.status))
    }

    fn ad_fields(ctx: &EncryptionContext) -> String {
        let ad = B64.encode(ctx.canonical_bytes());
        format!("\"associated_data\":\"{ad}\",\"context\":\"{ad}\"")
    }

    /// Transit `encrypt` of a DK under the newest version of `name`.
    fn wrap(
        &self,
        name: &str,
        dk: &DataKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        let path = format!("{}/encrypt/{name}", self.mount);
        let mut pt = Zeroizing::new(String::new());
        B64.encode_string(dk.expose(), &mut pt);
        let body = Zeroizing::new(format!(
            "{{\"plaintext\":\"{}\",{}}}",
            pt.as_str(),
            Self::ad_fields(ctx)
        ));
        let r = self.call("POST", &path, Some(body.as_bytes()), true)?;
        if r.status != 200 {
            return Err(self.transit_error(&path, name, None, &r));
        }
        let ct = r.json()["data"]["ciphertext"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| {
                refused(format!(
                    "OpenBao at {} answered without a ciphertext",
                    self.at(&path)
                ))
            })?;
        let version = ciphertext_version(&ct).ok_or_else(|| {
            refused(format!(
                "OpenBao at {} answered a ciphertext without a vault:vN: prefix",
                self.at(&path)
            ))
        })?;
        Ok(WrappedKey {
            cmk_id: name.to_owned(),
            cmk_version: version,
            ciphertext: ct.into_bytes(),
        })
    }

    /// Transit `decrypt`; the plaintext must be a 32-byte DK.
    fn unwrap(&self, wrapped: &WrappedKey, ctx: &EncryptionContext) -> Result<DataKey, KmsError> {
        let name = wrapped.cmk_id.as_str();
        check_name("key name", name, &self.base)?;
        let ct = std::str::from_utf8(&wrapped.ciphertext).map_err(|_| KmsError::UnwrapFailed)?;
        // The header names the version; the ciphertext must agree (and be printable).
        if ciphertext_version(ct) != Some(wrapped.cmk_version)
            || !ct
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'+' | b'/' | b'='))
        {
            return Err(KmsError::UnwrapFailed);
        }
        let path = format!("{}/decrypt/{name}", self.mount);
        let body = format!("{{\"ciphertext\":\"{ct}\",{}}}", Self::ad_fields(ctx));
        let r = self.call("POST", &path, Some(body.as_bytes()), true)?;
        if r.status != 200 {
            return Err(self.transit_error(&path, name, Some(wrapped.cmk_version), &r));
        }
        let mut v = r.json();
        let pt = match v["data"]["plaintext"].take() {
            Value::String(s) => Zeroizing::new(s),
            _ => {
                return Err(refused(format!(
                    "OpenBao at {} answered without a plaintext",
                    self.at(&path)
                )));
            }
        };
        let raw = Zeroizing::new(B64.decode(pt.as_bytes()).map_err(|_| {
            refused(format!(
                "OpenBao at {} answered a plaintext that is not base64",
                self.at(&path)
            ))
        })?);
        SecretKey::from_slice(&raw).ok_or_else(|| {
            refused(format!(
                "the Transit ciphertext unwrapped by {} holds {} bytes, not a 32-byte data key: it is not a kmsfs data key",
                self.at(&path),
                raw.len()
            ))
        })
    }

    /// The Transit key's configuration (`None` when the token may not read it).
    fn read_key(&self, name: &str) -> Result<Option<Value>, KmsError> {
        check_name("key name", name, &self.base)?;
        let path = format!("{}/keys/{name}", self.mount);
        let r = self.call("GET", &path, None, true)?;
        match r.status {
            200 => Ok(Some(r.json()["data"].clone())),
            403 => Ok(None),
            404 if !r.errors().contains("no handler") => Err(self.key_not_found(name, &path)),
            _ => Err(self.transit_error(&path, name, None, &r)),
        }
    }

    fn key_info(&self, name: &str, d: &Value) -> KeyInfo {
        let num = |v: &Value| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        };
        let min_dec = d["min_decryption_version"].as_u64().unwrap_or(1);
        let mut versions: Vec<VersionInfo> = d["keys"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, t)| {
                        let version: u32 = k.parse().ok()?;
                        Some(VersionInfo {
                            version,
                            created: num(t).unwrap_or(0),
                            has_material: u64::from(version) >= min_dec,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        versions.sort_by_key(|v| v.version);
        let latest = d["latest_version"]
            .as_u64()
            .and_then(|v| u32::try_from(v).ok());
        KeyInfo {
            id: name.to_owned(),
            alias: None,
            description: format!(
                "OpenBao Transit key ({}) at {}",
                d["type"].as_str().unwrap_or("?"),
                self.at(&format!("{}/keys/{name}", self.mount))
            ),
            created: versions.first().map_or(0, |v| v.created),
            state: if d["supports_decryption"].as_bool() == Some(false) {
                KeyState::Disabled
            } else {
                KeyState::Enabled
            },
            deletion_date: None,
            kind: KeyKind::User,
            origin: if d["imported_key"].as_bool() == Some(true) {
                KeyOrigin::Imported
            } else {
                KeyOrigin::Generated
            },
            versions,
            primary_version: latest,
            material_expires: None,
            import_params_expire: None,
            volumes: Vec::new(),
        }
    }

    fn kv_path(&self, volume_id: &[u8; 16]) -> String {
        format!("{}/data/kmsfs/marks/{}", self.kv_mount, hex(volume_id))
    }

    /// A failed KV answer: whether it means "no usable KV engine here" (fall back to
    /// the state file), and the error.
    fn kv_error(&self, path: &str, r: &Reply) -> KvError {
        let e = self.common_error(path, r, "KV").unwrap_or_else(|| {
            refused(format!(
                "OpenBao refused {} ({} {})",
                self.at(path),
                r.status,
                r.errors()
            ))
        });
        if r.status >= 500 {
            KvError::Down(e)
        } else {
            KvError::Unusable(e)
        }
    }

    /// The KV mark and the entry's version (0: none).
    fn kv_read(&self, volume_id: &[u8; 16]) -> Result<(Option<u64>, u64), KvError> {
        let path = self.kv_path(volume_id);
        let r = self.call("GET", &path, None, true).map_err(KvError::Down)?;
        let v = r.json();
        let version = v["data"]["metadata"]["version"].as_u64().unwrap_or(0);
        match r.status {
            200 => {
                let g = &v["data"]["data"]["generation"];
                let mark = g
                    .as_u64()
                    .or_else(|| g.as_str().and_then(|s| s.parse().ok()))
                    .ok_or_else(|| {
                        KvError::Down(refused(format!(
                            "the rollback mark at {} is not a number; restore it, or delete it (the rollback check then starts over)",
                            self.at(&path)
                        )))
                    })?;
                Ok((Some(mark), version))
            }
            // None yet, or its newest version deleted.
            404 if !r.errors().contains("no handler") => Ok((None, version)),
            _ => Err(self.kv_error(&path, &r)),
        }
    }

    /// Raises the KV mark to `generation` (check-and-set).
    fn kv_raise(&self, volume_id: &[u8; 16], generation: u64) -> Result<(), KvError> {
        let path = self.kv_path(volume_id);
        for _ in 0..5 {
            let (mark, version) = self.kv_read(volume_id)?;
            if mark.is_some_and(|m| m >= generation) {
                return Ok(());
            }
            let body = format!(
                "{{\"options\":{{\"cas\":{version}}},\"data\":{{\"generation\":\"{generation}\",\"volume_id\":\"{}\"}}}}",
                hex(volume_id)
            );
            let r = self
                .call("POST", &path, Some(body.as_bytes()), true)
                .map_err(KvError::Down)?;
            match r.status {
                200 | 204 => return Ok(()),
                400 if r.errors().contains("check-and-set") => {}
                _ => return Err(self.kv_error(&path, &r)),
            }
        }
        Err(KvError::Down(refused(format!(
            "the rollback mark at {} kept changing under check-and-set",
            self.at(&path)
        ))))
    }

    fn local_path(&self, volume_id: &[u8; 16]) -> PathBuf {
        self.state_dir.join("marks").join(hex(volume_id))
    }

    fn local_read(&self, volume_id: &[u8; 16]) -> Result<Option<u64>, KmsError> {
        let p = self.local_path(volume_id);
        match std::fs::read_to_string(&p) {
            Ok(s) => s.trim().parse().map(Some).map_err(|_| {
                refused(format!(
                    "the rollback mark file {} is damaged (not a number); restore it or delete it (the rollback check then starts over)",
                    p.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(KmsError::Io {
                path: p.display().to_string(),
                source: e,
            }),
        }
    }

    fn local_raise(&self, volume_id: &[u8; 16], generation: u64) -> Result<(), KmsError> {
        if self.local_read(volume_id)?.is_some_and(|m| m >= generation) {
            return Ok(());
        }
        let p = self.local_path(volume_id);
        let dir = p.parent().expect("marks dir");
        let io = |path: &Path, e: std::io::Error| KmsError::Io {
            path: path.display().to_string(),
            source: e,
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let _ = std::fs::set_permissions(&self.state_dir, std::fs::Permissions::from_mode(0o700));
        let tmp = dir.join(format!(".{}.tmp", hex(volume_id)));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io(&tmp, e))?;
        f.write_all(format!("{generation}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &p).map_err(|e| io(&p, e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(dir, e))?;
        Ok(())
    }

    fn warn_local(&self, e: &KmsError) {
        if !self.warned_local.swap(true, Ordering::Relaxed) {
            log::warn!(
                "rollback marks: OpenBao's KV engine at {} cannot be used ({e}); marks are kept in the local state directory {} instead, which protects only against rollbacks seen from this machine (enable a KV version 2 engine, kv_mount=, and allow the token to use {}/data/kmsfs/marks/*)",
                self.at(&self.kv_mount),
                self.state_dir.display(),
                self.kv_mount
            );
        }
    }
}

impl Kms for Transit {
    fn describe(&self) -> String {
        format!(
            "OpenBao {}",
            self.at(&format!("{}/keys/{}", self.mount, self.key))
        )
    }

    fn generate_data_key(
        &self,
        cmk: Option<&str>,
        ctx: &EncryptionContext,
    ) -> Result<(DataKey, WrappedKey), KmsError> {
        let name = cmk.unwrap_or(&self.key);
        // Transit's encrypt creates a missing key when the token may: refuse a
        // misspelt name instead, and a key type that cannot bind the context.
        if let Some(d) = self.read_key(name)? {
            let ty = d["type"].as_str().unwrap_or("?");
            if !AEAD_TYPES.contains(&ty) {
                return Err(refused(format!(
                    "the Transit key {name} is of type {ty}, which cannot bind the volume id as associated data; use an aes256-gcm96, aes128-gcm96 or chacha20-poly1305 key (`bao write -f {}/keys/NAME type=aes256-gcm96`)",
                    self.mount
                )));
            }
        }
        let dk = SecretKey::random();
        let wrapped = self.wrap(name, &dk, ctx)?;
        // The wrap must unwrap with this context and with no other.
        let back = self.unwrap(&wrapped, ctx)?;
        if !crate::crypto::ct_eq(back.expose(), dk.expose()) {
            return Err(refused(format!(
                "OpenBao at {} unwrapped a new data key to different bytes; refusing to use it",
                self.base
            )));
        }
        let other = ctx.clone().with("kmsfs-binding-check", "1");
        match self.unwrap(&wrapped, &other) {
            Err(KmsError::UnwrapFailed) => {}
            Ok(_) => {
                return Err(refused(format!(
                    "OpenBao at {} ignores associated_data (a server older than Vault 1.12?), so a wrapped data key would not be bound to its volume; upgrade the server",
                    self.base
                )));
            }
            Err(e) => return Err(e),
        }
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
        let dest = dest_cmk.unwrap_or(&wrapped.cmk_id).to_owned();
        check_name("key name", &dest, &self.base)?;
        if dest != wrapped.cmk_id
            && let Some(d) = self.read_key(&dest)?
        {
            let ty = d["type"].as_str().unwrap_or("?");
            if !AEAD_TYPES.contains(&ty) {
                return Err(refused(format!(
                    "the Transit key {dest} is of type {ty}, which cannot bind the volume id as associated data; use an aes256-gcm96 key"
                )));
            }
        }
        let dk = self.unwrap(wrapped, ctx)?;
        self.wrap(&dest, &dk, ctx)
    }

    fn generation_mark(&self, volume_id: &[u8; 16]) -> Result<Option<u64>, KmsError> {
        let kv = match self.kv_read(volume_id) {
            Ok((m, _)) => m,
            Err(KvError::Unusable(e)) => {
                self.warn_local(&e);
                None
            }
            // Out of reach: failing is safer than a rollback check without the mark.
            Err(KvError::Down(e)) => return Err(e),
        };
        let local = self.local_read(volume_id)?;
        let mark = kv.max(local);
        if let Some(m) = mark {
            let mut st = self.marks.lock();
            let r = st.recorded.entry(*volume_id).or_insert(0);
            *r = (*r).max(m);
        }
        Ok(mark)
    }

    fn record_generation(&self, volume_id: &[u8; 16], generation: u64) -> Result<(), KmsError> {
        let mut st = self.marks.lock();
        if st.recorded.get(volume_id).is_some_and(|m| *m >= generation) {
            return Ok(());
        }
        let skip = st.kv_skip_until.is_some_and(|t| Instant::now() < t);
        if !skip {
            match self.kv_raise(volume_id, generation) {
                Ok(()) => {
                    st.kv_skip_until = None;
                    st.recorded.insert(*volume_id, generation);
                    return Ok(());
                }
                Err(KvError::Unusable(e) | KvError::Down(e)) => {
                    self.warn_local(&e);
                    st.kv_skip_until = Some(Instant::now() + KV_BACKOFF);
                }
            }
        }
        self.local_raise(volume_id, generation)?;
        st.recorded.insert(*volume_id, generation);
        Ok(())
    }

    fn list_keys(&self) -> Result<Vec<KeyInfo>, KmsError> {
        let path = format!("{}/keys", self.mount);
        let r = self.call("LIST", &path, None, true)?;
        let names: Vec<String> = match r.status {
            200 => r.json()["data"]["keys"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|k| k.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            // No keys at all.
            404 if !r.errors().contains("no handler") => Vec::new(),
            // The token may not list: show the URL's key.
            403 => vec![self.key.clone()],
            _ => return Err(self.transit_error(&path, &self.key, None, &r)),
        };
        let mut out = Vec::new();
        for n in names {
            if check_name("key name", &n, &self.base).is_err() {
                continue;
            }
            if let Some(d) = self.read_key(&n)? {
                out.push(self.key_info(&n, &d));
            }
        }
        Ok(out)
    }

    fn describe_key(&self, name: &str) -> Result<KeyInfo, KmsError> {
        match self.read_key(name)? {
            Some(d) => Ok(self.key_info(name, &d)),
            None => Err(refused(format!(
                "OpenBao denied reading the Transit key {name} (403) at {}: allow the token `read` on {}/keys/{name}",
                self.at(&format!("{}/keys/{name}", self.mount)),
                self.mount
            ))),
        }
    }

    fn create_key(&self, _spec: &super::CreateKey) -> Result<KeyInfo, KmsError> {
        Err(KmsError::Unsupported(
            "creating keys from kmsfs: create an OpenBao Transit key with `bao write -f transit/keys/NAME type=aes256-gcm96` and name it in the URL",
        ))
    }

    fn change_key(&self, name: &str, change: KeyChange) -> Result<KeyInfo, KmsError> {
        if change != KeyChange::Rotate {
            return Err(KmsError::Unsupported(
                "this key change on an OpenBao Transit key: use OpenBao's own commands (`bao write transit/keys/KEY/config min_decryption_version=N` to retire old versions, `deletion_allowed=true` then `bao delete transit/keys/KEY` to delete it, policies to deny it)",
            ));
        }
        check_name("key name", name, &self.base)?;
        let path = format!("{}/keys/{name}/rotate", self.mount);
        let r = self.call("POST", &path, None, false)?;
        match r.status {
            200 | 204 => {}
            _ => return Err(self.transit_error(&path, name, None, &r)),
        }
        let v = r.json();
        if v["data"].is_object() {
            Ok(self.key_info(name, &v["data"]))
        } else {
            self.describe_key(name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(q: &str) -> KmsUrl {
        KmsUrl::parse(&format!("openbao+http://127.0.0.1:8200/vols{q}")).unwrap()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn token_sources_and_precedence() {
        let e = Transit::open_with_env(&url(""), no_env).err().unwrap();
        assert!(e.to_string().contains("BAO_TOKEN"), "{e}");
        let env = |v: &str| (v == "VAULT_TOKEN").then(|| "v-tok\n".to_owned());
        let t = Transit::open_with_env(&url(""), env).unwrap();
        assert_eq!(t.token.as_str(), "v-tok");
        let env = |v: &str| Some(format!("{v}-value"));
        let t = Transit::open_with_env(&url(""), env).unwrap();
        assert_eq!(t.token.as_str(), "BAO_TOKEN-value");

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tok");
        std::fs::write(&f, "file-tok\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let u = url(&format!("?token_file={}", f.display()));
        let e = Transit::open_with_env(&u, env).err().unwrap();
        assert!(matches!(e, KmsError::UnsafePermissions { .. }), "{e}");
        assert!(!e.to_string().contains("file-tok"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = Transit::open_with_env(&u, env).unwrap();
        assert_eq!(t.token.as_str(), "file-tok");
        let u = url(&format!(
            "?token_file={}",
            dir.path().join("none").display()
        ));
        let e = Transit::open_with_env(&u, env).err().unwrap();
        assert!(e.to_string().contains("cannot be read"), "{e}");
    }

    #[test]
    fn parameters_checked() {
        let env = |_: &str| Some("t".to_owned());
        for (q, want) in [
            ("?mount=a/../b", "mount"),
            ("?timeout=0", "timeout"),
            ("?timeout=abc", "timeout"),
            ("?colour=red", "unknown parameter"),
            ("?ca_file=/x.pem", "https only"),
        ] {
            let e = Transit::open_with_env(&url(q), env).err().unwrap();
            assert!(e.to_string().contains(want), "{q}: {e}");
        }
        let t = Transit::open_with_env(&url("?mount=/kv/transit2/&timeout=250ms"), env).unwrap();
        assert_eq!(t.mount, "kv/transit2");
        assert_eq!(t.timeout, Duration::from_millis(250));
        assert_eq!(t.kv_mount, "secret");
        let u = KmsUrl::parse("openbao+https://h:1/k?ca_file=/nonexistent/ca.pem").unwrap();
        let e = Transit::open_with_env(&u, env).err().unwrap();
        assert!(e.to_string().contains("ca.pem"), "{e}");
    }

    #[test]
    fn timeouts_and_versions_parse() {
        assert_eq!(parse_timeout("5"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("2.5s"), Some(Duration::from_millis(2500)));
        assert_eq!(parse_timeout("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_timeout("-1"), None);
        assert_eq!(parse_timeout("9999"), None);
        assert_eq!(ciphertext_version("vault:v12:abc"), Some(12));
        assert_eq!(ciphertext_version("vault:v0:abc"), None);
        assert_eq!(ciphertext_version("vault:v1:"), None);
        assert_eq!(ciphertext_version("vault:x1:abc"), None);
    }

    #[test]
    fn local_marks_only_rise() {
        let dir = tempfile::tempdir().unwrap();
        let env = |_: &str| Some("t".to_owned());
        let u = url(&format!("?state_dir={}", dir.path().display()));
        let t = Transit::open_with_env(&u, env).unwrap();
        let id = [7u8; 16];
        assert_eq!(t.local_read(&id).unwrap(), None);
        t.local_raise(&id, 5).unwrap();
        t.local_raise(&id, 3).unwrap();
        assert_eq!(t.local_read(&id).unwrap(), Some(5));
        let mode = std::fs::metadata(t.local_path(&id))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
