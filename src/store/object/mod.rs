//! `ObjectStorage`: a volume on an S3-compatible object store (SeaweedFS, Ceph
//! RGW, MinIO, AWS S3), through the `object_store` crate.
//!
//! The layout, lease, fencing, cache and failure modes are specified in
//! `docs/OBJECT-STORE.md`. In short, under `s3://BUCKET/PREFIX/`:
//!
//! - a file replaced whole (header, root slots) is one object of the same
//!   name, replaced by a conditional PUT ([`Storage::replace_durably`]):
//!   `If-Match` on the ETag this process last saw, or `If-None-Match: *` for
//!   a name it saw absent, so two writers can never both commit;
//! - a file written by appends (a segment, a node mirror) is a folder of
//!   write-once part objects `NAME/OFFSET` (16 hex digits, the offset of the
//!   part's first byte in the file): appends are buffered in memory and each
//!   `sync` uploads the buffered tail as one new part (`If-None-Match: *`),
//!   so fsync returns when the data is in the store;
//! - reads fetch byte ranges of parts, through a bounded on-disk cache of
//!   ciphertext ([`cache::DiskCache`]);
//! - the writer holds a lease object ([`lease`]), readers publish pins with
//!   an expiry, renewed while they are open.
//!
//! `object_store` is asynchronous: a small tokio runtime lives inside the
//! backend and every call blocks on it, bounded by a stated timeout (request
//! timeout, retries with backoff, and an overall cap), after which the call
//! fails with an I/O error and the request that needed it gets EIO.

pub mod cache;
pub mod journal;
pub mod lease;
pub mod writeback;

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig, UpdateVersion,
};
use parking_lot::Mutex;

use super::{PinFile, ReplaceError, Storage};

/// Where a volume lives in an object store and how to reach it.
#[derive(Clone, Debug)]
pub struct ObjectConfig {
    pub bucket: String,
    /// Key prefix of the volume, without leading or trailing slash ("" = the bucket's top).
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// An AWS-style credentials file (`[default]`, `aws_access_key_id`, ...).
    pub credentials_file: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    pub cache_bytes: u64,
    /// Break a live lease of another writer at once.
    pub force_takeover: bool,
    /// Lease and pin lifetime; renewed every third of it.
    pub lease: Duration,
    /// One HTTP request's limit.
    pub request_timeout: Duration,
    /// Retries of a failed request (5xx, connection errors), with backoff.
    pub retries: usize,
    /// The longest any one storage call may take, retries included.
    pub call_timeout: Duration,
    /// `--writeback DIR`: fsync durable in a journal there (an absolute path).
    pub writeback: Option<PathBuf>,
    /// Bound of the journal's entries not yet uploaded (writes wait beyond it).
    pub writeback_bytes: u64,
}

/// Default bound of the write-back journal.
pub const DEFAULT_WRITEBACK_BYTES: u64 = 1 << 30;

/// Default size of the local segment cache.
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;

fn env_secs(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&n| n > 0)
        .map(Duration::from_secs)
}

impl ObjectConfig {
    /// Whether a volume argument names an object store.
    pub fn is_url(s: &str) -> bool {
        s.starts_with("s3://")
    }

    /// Parses `s3://BUCKET/PREFIX`. Credentials never belong in the URL.
    pub fn parse(url: &str) -> Result<ObjectConfig, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{url:?} is not an s3:// URL (s3://BUCKET/PREFIX)"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.contains('@') || bucket.contains(':') {
            return Err(
                "credentials or ports do not belong in an s3:// URL: give them with \
                 --credentials-file, the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) \
                 or ~/.aws/credentials, and the endpoint with --endpoint"
                    .into(),
            );
        }
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_bucket {
            return Err(format!(
                "{bucket:?} is not a valid bucket name (3 to 63 lower-case letters, digits, '-' \
                 and '.'); use s3://BUCKET/PREFIX"
            ));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if prefix
            .split('/')
            .any(|c| c == "." || c == ".." || (c.is_empty() && !prefix.is_empty()))
        {
            return Err(format!(
                "{prefix:?}: a volume prefix has no empty, '.' or '..' components"
            ));
        }
        Ok(ObjectConfig {
            bucket: bucket.to_string(),
            prefix,
            endpoint: None,
            region: None,
            credentials_file: None,
            cache_dir: None,
            cache_bytes: DEFAULT_CACHE_BYTES,
            force_takeover: false,
            lease: env_secs("KMSFS_S3_LEASE_SECS").unwrap_or(Duration::from_secs(30)),
            request_timeout: env_secs("KMSFS_S3_TIMEOUT_SECS").unwrap_or(Duration::from_secs(20)),
            retries: 3,
            call_timeout: Duration::from_secs(60),
            writeback: None,
            writeback_bytes: DEFAULT_WRITEBACK_BYTES,
        })
    }

    /// `s3://BUCKET/PREFIX`, for messages (never a credential).
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    /// The default cache directory of this volume: under `$XDG_CACHE_HOME`
    /// (or `~/.cache`), `kmsfs/s3/BUCKET/PREFIX` with '/' as '%'.
    pub fn default_cache_dir(&self) -> PathBuf {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir);
        let leaf = if self.prefix.is_empty() {
            "%".to_string()
        } else {
            self.prefix.replace('/', "%")
        };
        base.join("kmsfs").join("s3").join(&self.bucket).join(leaf)
    }
}

/// Access key, secret and optional session token.
struct Credentials {
    key: String,
    secret: zeroize::Zeroizing<String>,
    token: Option<zeroize::Zeroizing<String>>,
}

/// Reads an AWS-style credentials file: the section named by `AWS_PROFILE`
/// (or `default`), keys `aws_access_key_id`, `aws_secret_access_key`,
/// `aws_session_token`.
fn read_credentials_file(path: &std::path::Path) -> io::Result<Option<Credentials>> {
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path)?);
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let mut in_section = false;
    let (mut key, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let s = s.trim();
            in_section = s == profile || s == format!("profile {profile}");
            continue;
        }
        if !in_section {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_string();
            match k.trim() {
                "aws_access_key_id" => key = Some(v),
                "aws_secret_access_key" => secret = Some(zeroize::Zeroizing::new(v)),
                "aws_session_token" => token = Some(zeroize::Zeroizing::new(v)),
                _ => {}
            }
        }
    }
    Ok(match (key, secret) {
        (Some(key), Some(secret)) => Some(Credentials { key, secret, token }),
        _ => None,
    })
}

/// Appended bytes not yet uploaded: they start at `base` in the file.
struct Pending {
    base: u64,
    data: Vec<u8>,
}

#[derive(Default)]
struct State {
    /// Appended files: their uploaded parts (start, length), in order.
    parts: HashMap<String, Vec<(u64, u64)>>,
    pending: HashMap<String, Pending>,
    /// Objects replaced whole: the ETag last seen (None: seen absent).
    etags: HashMap<String, Option<String>>,
    /// ... and the SHA-256 of their contents then (write-back mode).
    hashes: HashMap<String, Option<[u8; 32]>>,
    /// Write-back mode: the SHA-256 of what each root slot holds once the
    /// journal is uploaded (the condition of the next commit to it).
    view: HashMap<String, Option<[u8; 32]>>,
    /// Write-back mode: parts in the journal, not uploaded yet (by part key).
    local: HashMap<String, journal::Entry>,
    /// Write-back mode: the newest root record of a slot while it is in the
    /// journal only (its entry's sequence number and bytes).
    local_whole: HashMap<String, (u64, Arc<Vec<u8>>)>,
}

/// Request counters, for figures and tests.
#[derive(Default)]
pub struct Counters {
    pub gets: AtomicU64,
    pub puts: AtomicU64,
    pub lists: AtomicU64,
    pub deletes: AtomicU64,
    pub heads: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub bytes_put: AtomicU64,
}

/// The connection: shared with the lease and pin renewal threads.
pub(crate) struct Remote {
    rt: Arc<tokio::runtime::Runtime>,
    store: Arc<AmazonS3>,
    prefix: String,
    call_timeout: Duration,
    pub(crate) counters: Arc<Counters>,
}

pub struct ObjectStorage {
    cfg: ObjectConfig,
    pub(crate) remote: Arc<Remote>,
    st: Arc<Mutex<State>>,
    cache: Option<Arc<cache::DiskCache>>,
    /// Set when this writer's lease was lost: nothing more may be committed.
    pub(crate) fenced: Arc<AtomicBool>,
    /// The lease this process holds as the writer (its owner token).
    lease_owner: Arc<Mutex<Option<String>>>,
    /// Set when this writer took the lease over from another (live or expired).
    pub(crate) took_over: AtomicBool,
    /// Appended files this process created (it may append to them again).
    written: Mutex<std::collections::HashSet<String>>,
    ra: Mutex<ReadAhead>,
    /// The write-back journal, once this process is the writer (`--writeback`).
    wb: OnceLock<Arc<writeback::Writeback>>,
}

/// The io::Error for an object store error, naming the cause and what to do.
fn to_io(what: &str, e: object_store::Error) -> io::Error {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => {
            io::Error::new(io::ErrorKind::NotFound, format!("{what}: no such object"))
        }
        E::AlreadyExists { .. } | E::Precondition { .. } => io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{what} was changed by another writer since this process read it: this mount \
                 is fenced and commits nothing more (what it reported durable before is kept); \
                 unmount, then check `kmsfs info` for who writes now"
            ),
        ),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{what}: access denied by the object store (403): check the credentials \
                 (--credentials-file, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/credentials) \
                 and the bucket policy"
            ),
        ),
        other => {
            let mut text = other.to_string();
            let mut src = std::error::Error::source(&other);
            while let Some(e) = src {
                text.push_str(&format!(": {e}"));
                src = e.source();
            }
            // The first line, bounded: enough to see the cause, not the XML.
            let short: String = text
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(300)
                .collect();
            if text.contains("403 Forbidden") || text.contains("status code: 403") {
                return io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{what}: access denied by the object store (403): check the credentials \
                         (--credentials-file, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
                         ~/.aws/credentials) and the bucket policy ({short})"
                    ),
                );
            }
            io::Error::other(format!(
                "{what}: object store request failed after retries ({short}); check that the \
                 store is reachable, then retry (kmsfs info shows the volume)"
            ))
        }
    }
}

impl Remote {
    /// The object path of a volume name.
    pub(crate) fn path(&self, name: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(name)
        } else {
            ObjPath::from(format!("{}/{name}", self.prefix))
        }
    }

    /// Runs a request on the runtime, bounded by the call timeout.
    pub(crate) fn block<T>(
        &self,
        what: &str,
        fut: impl Future<Output = object_store::Result<T>>,
    ) -> io::Result<T> {
        let limit = self.call_timeout;
        match self
            .rt
            .block_on(async { tokio::time::timeout(limit, fut).await })
        {
            Ok(r) => r.map_err(|e| to_io(what, e)),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{what}: the object store did not answer within {} s; check that it is \
                     reachable, then retry",
                    limit.as_secs()
                ),
            )),
        }
    }

    pub(crate) fn get_whole(&self, name: &str) -> io::Result<(Vec<u8>, Option<String>)> {
        let p = self.path(name);
        let store = self.store.clone();
        let r = self.block(name, async move {
            let r = store.get_opts(&p, GetOptions::default()).await?;
            let etag = r.meta.e_tag.clone();
            let b = r.bytes().await?;
            Ok((b.to_vec(), etag))
        });
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        if let Ok((b, _)) = &r {
            self.counters
                .bytes_fetched
                .fetch_add(b.len() as u64, Ordering::Relaxed);
        }
        r
    }

    fn get_range(&self, key: &str, start: u64, len: u64) -> io::Result<Vec<u8>> {
        let p = self.path(key);
        let store = self.store.clone();
        let r = self.block(key, async move {
            let opts = GetOptions {
                range: Some(GetRange::Bounded(start..start + len)),
                ..Default::default()
            };
            store.get_opts(&p, opts).await?.bytes().await
        })?;
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_fetched
            .fetch_add(r.len() as u64, Ordering::Relaxed);
        if r.len() as u64 != len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(r.to_vec())
    }

    pub(crate) fn put(
        &self,
        name: &str,
        data: Vec<u8>,
        mode: PutMode,
    ) -> io::Result<Option<String>> {
        let p = self.path(name);
        let store = self.store.clone();
        let n = data.len() as u64;
        let r = self.block(name, async move {
            let opts = PutOptions {
                mode,
                ..Default::default()
            };
            store
                .put_opts(&p, PutPayload::from(data), opts)
                .await
                .map(|r| r.e_tag)
        });
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_put.fetch_add(n, Ordering::Relaxed);
        r
    }

    pub(crate) fn delete(&self, name: &str) -> io::Result<()> {
        let p = self.path(name);
        let store = self.store.clone();
        self.counters.deletes.fetch_add(1, Ordering::Relaxed);
        match self.block(name, async move { store.delete(&p).await }) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    /// Objects directly in `dir` (names) and sub-folders (names), with sizes
    /// and modification times of the objects.
    #[allow(clippy::type_complexity)]
    pub(crate) fn list_dir(&self, dir: &str) -> io::Result<(Vec<(String, u64, i64)>, Vec<String>)> {
        let p = if dir.is_empty() {
            if self.prefix.is_empty() {
                None
            } else {
                Some(ObjPath::from(self.prefix.as_str()))
            }
        } else {
            Some(self.path(dir))
        };
        let store = self.store.clone();
        let r = self.block(if dir.is_empty() { "volume" } else { dir }, async move {
            store.list_with_delimiter(p.as_ref()).await
        })?;
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        let objs = r
            .objects
            .into_iter()
            .filter_map(|m| {
                let leaf = m.location.filename()?.to_string();
                Some((leaf, m.size, m.last_modified.timestamp()))
            })
            .collect();
        let dirs = r
            .common_prefixes
            .into_iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        Ok((objs, dirs))
    }

    /// Every object below `dir` (recursively): paths relative to `dir` and sizes.
    pub(crate) fn list_below(&self, dir: &str) -> io::Result<Vec<(String, u64)>> {
        use futures_util::TryStreamExt;
        let p = self.path(dir);
        let base = format!("{}/", p.as_ref());
        let store = self.store.clone();
        let metas: Vec<object_store::ObjectMeta> =
            self.block(dir, async move { store.list(Some(&p)).try_collect().await })?;
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let rel = m.location.as_ref().strip_prefix(&base)?.to_string();
                Some((rel, m.size))
            })
            .collect())
    }
}

/// Bytes fetched at once by a read that continues the previous one.
const READ_AHEAD: u64 = 4 << 20;
/// Read-ahead chunks kept in memory (per mount).
const READ_AHEAD_CHUNKS: usize = 4;

/// Sequential-read detection and the read-ahead chunks.
#[derive(Default)]
struct ReadAhead {
    /// Where the last read of each recently read part ended, and how many
    /// reads in a row continued the one before.
    last_end: HashMap<String, (u64, u32)>,
    /// (part key, offset, bytes), most recent last.
    chunks: Vec<(String, u64, Vec<u8>)>,
}

impl ReadAhead {
    /// Copies the range from a chunk that holds it; false when none does.
    fn lookup(&mut self, key: &str, within: u64, buf: &mut [u8]) -> bool {
        let end = within + buf.len() as u64;
        let Some((_, off, data)) = self
            .chunks
            .iter()
            .find(|(k, off, d)| k == key && within >= *off && end <= off + d.len() as u64)
        else {
            return false;
        };
        let from = (within - off) as usize;
        buf.copy_from_slice(&data[from..from + buf.len()]);
        self.note(key, within, end);
        true
    }

    /// Whether reads of `key` run in order: the last two each continued the
    /// one before (a record or two apart at most). Two tree nodes that
    /// happen to lie side by side do not start a read-ahead.
    fn sequential(&self, key: &str, within: u64) -> bool {
        self.last_end
            .get(key)
            .is_some_and(|&(e, streak)| streak >= 1 && within >= e && within <= e + (128 << 10))
    }

    fn note(&mut self, key: &str, within: u64, end: u64) {
        if self.last_end.len() >= 64 {
            self.last_end.clear();
        }
        let streak = match self.last_end.get(key) {
            Some(&(e, s)) if within >= e && within <= e + (128 << 10) => s + 1,
            _ => 0,
        };
        self.last_end.insert(key.to_string(), (end, streak));
    }

    fn keep(&mut self, key: String, off: u64, data: Vec<u8>) {
        if self.chunks.len() >= READ_AHEAD_CHUNKS {
            self.chunks.remove(0);
        }
        self.chunks.push((key, off, data));
    }
}

/// Part key of an appended file: `NAME/OFFSET`.
fn part_name(name: &str, start: u64) -> String {
    format!("{name}/{start:016x}")
}

impl ObjectStorage {
    /// Connects (no request is made yet). Fails on a bad endpoint or an
    /// unusable cache directory.
    pub fn open(cfg: ObjectConfig) -> io::Result<ObjectStorage> {
        // reqwest without a built-in provider: use ring, as the rest of kmsfs.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&cfg.bucket)
            .with_region(cfg.region.clone().unwrap_or_else(|| {
                std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into())
            }));
        let creds = match &cfg.credentials_file {
            Some(p) => Some(read_credentials_file(p)?.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{}: no aws_access_key_id and aws_secret_access_key in its [{}] section",
                        p.display(),
                        std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into())
                    ),
                )
            })?),
            None if std::env::var_os("AWS_ACCESS_KEY_ID").is_some() => None,
            None => std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".aws/credentials"))
                .filter(|p| p.exists())
                .and_then(|p| read_credentials_file(&p).ok().flatten()),
        };
        if let Some(c) = creds {
            b = b
                .with_access_key_id(c.key)
                .with_secret_access_key(c.secret.as_str());
            if let Some(t) = c.token {
                b = b.with_token(t.as_str());
            }
        }
        if let Some(ep) = &cfg.endpoint {
            b = b.with_endpoint(ep).with_virtual_hosted_style_request(false);
        }
        let retry = RetryConfig {
            max_retries: cfg.retries,
            retry_timeout: cfg.call_timeout,
            ..Default::default()
        };
        b = b.with_retry(retry).with_client_options(
            ClientOptions::new()
                .with_timeout(cfg.request_timeout)
                .with_connect_timeout(Duration::from_secs(5))
                .with_allow_http(
                    cfg.endpoint
                        .as_ref()
                        .is_some_and(|e| e.starts_with("http://")),
                ),
        );
        let store = b.build().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: {e}; check --endpoint and --region", cfg.url()),
            )
        })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kmsfs-s3")
            .enable_all()
            .build()?;
        let cache = if cfg.cache_bytes > 0 {
            let dir = cfg
                .cache_dir
                .clone()
                .unwrap_or_else(|| cfg.default_cache_dir());
            Some(Arc::new(
                cache::DiskCache::open(&dir, cfg.cache_bytes).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "segment cache {}: {e}; choose another with --cache-dir",
                            dir.display()
                        ),
                    )
                })?,
            ))
        } else {
            None
        };
        Ok(ObjectStorage {
            remote: Arc::new(Remote {
                rt: Arc::new(rt),
                store: Arc::new(store),
                prefix: cfg.prefix.clone(),
                call_timeout: cfg.call_timeout,
                counters: Arc::new(Counters::default()),
            }),
            cfg,
            st: Arc::new(Mutex::new(State::default())),
            cache,
            fenced: Arc::new(AtomicBool::new(false)),
            lease_owner: Arc::new(Mutex::new(None)),
            took_over: AtomicBool::new(false),
            written: Mutex::new(Default::default()),
            ra: Mutex::new(ReadAhead::default()),
            wb: OnceLock::new(),
        })
    }

    pub fn config(&self) -> &ObjectConfig {
        &self.cfg
    }

    /// Request and byte counters of this connection.
    pub fn remote_counters(&self) -> Arc<Counters> {
        self.remote.counters.clone()
    }

    pub fn cache(&self) -> Option<&cache::DiskCache> {
        self.cache.as_deref()
    }

    /// The write-back journal's entries not uploaded yet, and the most
    /// there have been at once (bytes); None without `--writeback`.
    pub fn writeback_pending(&self) -> Option<(usize, u64, u64)> {
        let wb = self.wb.get()?;
        let q = wb.journal.queue();
        Some((q.entries.len(), q.pending, q.peak))
    }

    /// The uploaded parts of an appended file (listed once, then tracked).
    fn parts(&self, name: &str) -> io::Result<Vec<(u64, u64)>> {
        if let Some(p) = self.st.lock().parts.get(name) {
            return Ok(p.clone());
        }
        let (objs, _) = self.remote.list_dir(name)?;
        let mut v: Vec<(u64, u64)> = objs
            .into_iter()
            .filter_map(|(leaf, size, _)| {
                (leaf.len() == 16)
                    .then(|| u64::from_str_radix(&leaf, 16).ok())
                    .flatten()
                    .map(|s| (s, size))
            })
            .collect();
        v.sort();
        // Only a contiguous run from 0 is the file; a gap (a lost part) ends it.
        let mut end = 0u64;
        let mut good = Vec::new();
        for (s, l) in v {
            if s != end {
                break;
            }
            good.push((s, l));
            end = s.saturating_add(l);
        }
        if !good.is_empty() {
            self.st.lock().parts.insert(name.to_string(), good.clone());
        }
        Ok(good)
    }

    /// Reads `buf.len()` bytes at `offset` of the part starting at `start`
    /// (`plen` bytes), from the cache or the store.
    fn read_part(
        &self,
        name: &str,
        start: u64,
        plen: u64,
        within: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let key = part_name(name, start);
        let len = buf.len() as u64;
        // A part still in the write-back journal (if it was uploaded and
        // its journal file deleted meanwhile, the store has it).
        let local = self.st.lock().local.get(&key).cloned();
        if let (Some(e), Some(wb)) = (local, self.wb.get()) {
            match wb.journal.read(&e, within, buf) {
                Ok(()) => return Ok(()),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        if let Some(c) = &self.cache {
            if c.get(&key, within, len, 0, buf) {
                return Ok(());
            }
            if c.get(&key, 0, plen, within, buf) {
                return Ok(());
            }
        }
        // Read-ahead: a read that continues the last one of this part (a
        // file read in order) fetches READ_AHEAD bytes at once, kept in
        // memory for the reads that follow; a random read fetches its range.
        let hit = self.ra.lock().lookup(&key, within, buf);
        if hit {
            if let Some(c) = &self.cache {
                c.put(&key, within, buf);
            }
            return Ok(());
        }
        let sequential = self.ra.lock().sequential(&key, within);
        let fetch = if sequential {
            READ_AHEAD.max(len).min(plen.saturating_sub(within))
        } else {
            len
        };
        let data = self.remote.get_range(&key, within, fetch)?;
        buf.copy_from_slice(&data[..buf.len()]);
        if let Some(c) = &self.cache {
            c.put(&key, within, &data[..buf.len()]);
        }
        let mut ra = self.ra.lock();
        ra.note(&key, within, within + len);
        if fetch > len {
            ra.keep(key, within, data);
        }
        Ok(())
    }

    /// Marks this process as the writer holding lease `owner`.
    pub(crate) fn set_lease_owner(&self, owner: Option<String>) {
        *self.lease_owner.lock() = owner;
    }

    fn check_not_fenced(&self) -> io::Result<()> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{}: this writer's lease was taken over by another mount: it is fenced and \
                     commits nothing more (what it reported durable before is kept); unmount it",
                    self.cfg.url()
                ),
            ));
        }
        Ok(())
    }
}

impl Storage for ObjectStorage {
    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        // A root record still in the write-back journal.
        if let Some((_, b)) = self.st.lock().local_whole.get(name) {
            return Ok(b.to_vec());
        }
        match self.remote.get_whole(name) {
            Ok((b, etag)) => {
                let h = journal::sha256(&b);
                let mut st = self.st.lock();
                st.etags.insert(name.to_string(), etag);
                st.hashes.insert(name.to_string(), Some(h));
                st.view.insert(name.to_string(), Some(h));
                Ok(b)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let parts = self.parts(name)?;
                if parts.is_empty() {
                    let mut st = self.st.lock();
                    st.etags.insert(name.to_string(), None);
                    st.hashes.insert(name.to_string(), None);
                    st.view.insert(name.to_string(), None);
                    return Err(e);
                }
                let len = self.len(name)?;
                let mut v = vec![0u8; len as usize];
                self.read_at(name, 0, &mut v)?;
                Ok(v)
            }
            Err(e) => Err(e),
        }
    }

    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        // Bytes not uploaded yet come from memory.
        let pending_base = {
            let st = self.st.lock();
            match st.pending.get(name) {
                Some(p) if end > p.base => {
                    let from = offset.max(p.base);
                    let pend_end = p.base + p.data.len() as u64;
                    if end > pend_end {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    let dst = (from - offset) as usize;
                    let src = (from - p.base) as usize;
                    buf[dst..].copy_from_slice(&p.data[src..src + (end - from) as usize]);
                    Some(p.base)
                }
                _ => None,
            }
        };
        let upto = pending_base.map_or(end, |b| b.min(end));
        if offset >= upto {
            return Ok(());
        }
        let parts = self.parts(name)?;
        if parts.is_empty() {
            // A whole object read at an offset (a header, say).
            let data = self
                .remote
                .get_range(name, offset, upto - offset)
                .map_err(|e| {
                    if e.kind() == io::ErrorKind::NotFound {
                        io::Error::new(io::ErrorKind::NotFound, format!("{name}: no such object"))
                    } else {
                        e
                    }
                })?;
            buf[..data.len()].copy_from_slice(&data);
            return Ok(());
        }
        let mut pos = offset;
        for (s, l) in parts {
            if pos >= upto {
                break;
            }
            let pend = s + l;
            if pend <= pos {
                continue;
            }
            let take_end = pend.min(upto);
            let dst = (pos - offset) as usize;
            let n = (take_end - pos) as usize;
            self.read_part(name, s, l, pos - s, &mut buf[dst..dst + n])?;
            pos = take_end;
        }
        if pos < upto {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        {
            let st = self.st.lock();
            if let Some(p) = st.pending.get(name) {
                return Ok(p.base + p.data.len() as u64);
            }
            if let Some((_, b)) = st.local_whole.get(name) {
                return Ok(b.len() as u64);
            }
        }
        let parts = self.parts(name)?;
        if let Some((s, l)) = parts.last() {
            return Ok(s + l);
        }
        let p = self.remote.path(name);
        let store = self.remote.store.clone();
        self.remote.counters.heads.fetch_add(1, Ordering::Relaxed);
        self.remote
            .block(name, async move { store.head(&p).await })
            .map(|m| m.size)
    }

    fn write_file(&self, name: &str, data: &[u8]) -> io::Result<()> {
        self.check_not_fenced()?;
        let etag = self.remote.put(name, data.to_vec(), PutMode::Overwrite)?;
        self.st.lock().etags.insert(name.to_string(), etag);
        Ok(())
    }

    /// Appends start a new file in this process (the engine never appends
    /// to a segment of another session): a name that already has parts in
    /// the store was written by another writer, and is refused.
    fn append(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let known = self.st.lock().pending.contains_key(name);
        if !known {
            let base = match self.parts(name) {
                Ok(p) => p.last().map_or(0, |(s, l)| s + l),
                // Write-back mode goes on while the store is unreachable: a
                // new segment starts at 0 (were the name taken in the store
                // after all, its first part's conditional upload would find
                // it: a conflict that stops the uploader, never a mix).
                Err(e) if self.wb.get().is_some() && e.kind() != io::ErrorKind::NotFound => {
                    log::debug!("{name}: store not reachable ({e}); a new file in the journal");
                    0
                }
                Err(e) => return Err(e),
            };
            let mine =
                self.st.lock().parts.contains_key(name) && self.written.lock().contains(name);
            if base > 0 && !mine {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{name} already exists in the object store, written by another writer; \
                         this mount starts a new segment (if this repeats, unmount and check \
                         `kmsfs info` for the writer lease)"
                    ),
                ));
            }
            self.st
                .lock()
                .pending
                .entry(name.to_string())
                .or_insert(Pending {
                    base,
                    data: Vec::new(),
                });
        }
        self.written.lock().insert(name.to_string());
        let mut st = self.st.lock();
        let p = st.pending.get_mut(name).expect("inserted above");
        p.data.extend_from_slice(data);
        Ok(())
    }

    /// Uploads the appended bytes not yet in the store as one new part.
    fn write_at(&self, name: &str, _offset: u64, _data: &[u8]) -> io::Result<()> {
        // Objects are written once, whole: `kmsfs receive` targets a directory.
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{}: writing inside {name} is not possible on an object store; receive into a \
                 directory (`kmsfs receive DIR`), then clone it onto the store if needed",
                self.describe()
            ),
        ))
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        let (base, data) = {
            let st = self.st.lock();
            match st.pending.get(name) {
                Some(p) if !p.data.is_empty() => (p.base, p.data.clone()),
                _ => return Ok(()),
            }
        };
        self.check_not_fenced()?;
        let key = part_name(name, base);
        let n = data.len() as u64;
        if let Some(wb) = self.wb.get() {
            // Durable in the journal; the uploader puts it in the store.
            let e = wb
                .journal
                .append(journal::Kind::Part { offset: base }, name, &data)?;
            let mut st = self.st.lock();
            st.local.insert(key, e);
            st.parts
                .entry(name.to_string())
                .or_default()
                .push((base, n));
            if let Some(p) = st.pending.get_mut(name) {
                p.data.drain(..n as usize);
                p.base = base + n;
            }
            return Ok(());
        }
        let cached = data.clone();
        self.remote.put(&key, data, PutMode::Create)?;
        if let Some(c) = &self.cache {
            c.put(&key, 0, &cached);
        }
        let mut st = self.st.lock();
        st.parts
            .entry(name.to_string())
            .or_default()
            .push((base, n));
        if let Some(p) = st.pending.get_mut(name) {
            // Appends made while uploading stay pending.
            p.data.drain(..n as usize);
            p.base = base + n;
        }
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (data, _) = self.remote.get_whole(from)?;
        self.write_file(to, &data)?;
        self.remote.delete(from)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        // What the journal holds for it goes to the store first (in order).
        if let Some(wb) = self.wb.get() {
            wb.settle(name)?;
        }
        self.st.lock().pending.remove(name);
        let parts = self.parts(name)?;
        if parts.is_empty() {
            let p = self.remote.path(name);
            let store = self.remote.store.clone();
            self.remote.counters.deletes.fetch_add(1, Ordering::Relaxed);
            return self
                .remote
                .block(name, async move { store.delete(&p).await });
        }
        for (s, _) in parts {
            self.remote.delete(&part_name(name, s))?;
        }
        self.st.lock().parts.remove(name);
        Ok(())
    }

    /// Objects are visible once PUT: nothing to do.
    fn sync_dir(&self, _dir: &str) -> io::Result<()> {
        Ok(())
    }

    fn create_dir(&self, _dir: &str) -> io::Result<()> {
        Ok(())
    }

    /// Names in `dir`: objects directly in it, and appended files (folders
    /// of parts). A recursive listing, so folders left empty by deleted
    /// parts (some stores keep them) are never taken for files; the parts
    /// seen are remembered.
    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let mut v: Vec<String> = Vec::new();
        if dir.is_empty() {
            let (objs, _) = self.remote.list_dir(dir)?;
            v.extend(objs.into_iter().map(|o| o.0).filter(|n| !n.is_empty()));
        } else {
            let mut found: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
            for (rel, size) in self.remote.list_below(dir)? {
                match rel.split_once('/') {
                    None => v.push(rel),
                    Some((file, part)) => {
                        if let Some(start) = (part.len() == 16)
                            .then(|| u64::from_str_radix(part, 16).ok())
                            .flatten()
                        {
                            found
                                .entry(file.to_string())
                                .or_default()
                                .push((start, size));
                        }
                    }
                }
            }
            let mut st = self.st.lock();
            for (file, mut parts) in found {
                parts.sort();
                let mut end = 0;
                let good: Vec<(u64, u64)> = parts
                    .into_iter()
                    .take_while(|&(s, l)| {
                        let ok = s == end;
                        end = s.saturating_add(l);
                        ok
                    })
                    .collect();
                if good.is_empty() {
                    continue;
                }
                let name = format!("{dir}/{file}");
                st.parts.entry(name).or_insert(good);
                v.push(file);
            }
        }
        let st = self.st.lock();
        let journalled = st
            .local
            .values()
            .map(|e| &e.name)
            .chain(st.local_whole.keys());
        for n in st.pending.keys().chain(journalled) {
            if let Some(leaf) = n.strip_prefix(dir).and_then(|r| {
                if dir.is_empty() {
                    Some(r)
                } else {
                    r.strip_prefix('/')
                }
            }) && !leaf.contains('/')
            {
                v.push(leaf.to_string());
            }
        }
        drop(st);
        v.sort();
        v.dedup();
        Ok(v)
    }

    /// An object store has no fixed capacity: report a large one.
    fn space(&self) -> io::Result<(u64, u64)> {
        Ok((1 << 50, 1 << 50))
    }

    fn describe(&self) -> String {
        self.cfg.url()
    }

    /// The writer lease; with `--writeback DIR`, also the journal there
    /// (locked first, replayed with the lease held, then live until the
    /// guard drops, which drains it before the lease goes).
    fn lock_exclusive(&self) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        let dir = self.cfg.writeback.clone();
        let dir_lock = dir.as_deref().map(journal::lock_dir).transpose()?;
        let lease = lease::acquire(self)?;
        writeback::check_marker(self, dir.as_deref())?;
        let (Some(dir), Some(dir_lock)) = (dir, dir_lock) else {
            return Ok(lease);
        };
        let wb = Arc::new(writeback::start(self, &dir, dir_lock)?);
        let _ = self.wb.set(wb.clone());
        Ok(Box::new(writeback::WritebackGuard {
            wb,
            lease: Some(lease),
        }))
    }

    /// In write-back mode the cleaner may delete segments only once the
    /// store holds the commits the engine made (a reader on another host
    /// opens what the store holds): the journal must be empty first. While
    /// it is not (within a few seconds), report readers present, so the
    /// cleaner defers its deletions.
    fn try_lock_readers_exclusive(
        &self,
    ) -> io::Result<Option<Box<dyn std::any::Any + Send + Sync>>> {
        match self.wb.get() {
            Some(wb) if !wb.drained_within(Duration::from_secs(5)) => Ok(None),
            _ => Ok(Some(Box::new(()))),
        }
    }

    /// After a takeover the fenced writer may still upload a segment or two
    /// before it learns it is fenced: start far past anything it could
    /// reach, by a random amount (2^20 to 2^36 ids), so that two writers that
    /// took over from the same state (each after the other) never meet.
    fn segment_id_gap(&self) -> u64 {
        if self.took_over.load(Ordering::SeqCst) {
            let r = u64::from_le_bytes(crate::crypto::random_array::<8>());
            (1 << 20) + r % (1 << 36)
        } else {
            0
        }
    }

    fn lock_readers_shared(&self) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        lease::reader_placeholder(self)
    }

    fn create_pin(
        &self,
        name: &str,
        data: &[u8],
    ) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        lease::publish_pin(self, name, data)
    }

    fn list_pins(&self) -> io::Result<Vec<PinFile>> {
        lease::list_pins(self)
    }

    fn remove_pin(&self, name: &str) -> io::Result<()> {
        self.remote.delete(name)
    }

    fn set_commit_listener(&self, f: super::CommitListener) -> bool {
        match self.wb.get() {
            Some(wb) => {
                *wb.listener.lock() = Some(f);
                true
            }
            None => false,
        }
    }

    /// A conditional PUT of the whole object: If-Match the ETag this process
    /// last saw, or If-None-Match for a name it saw absent (or never read).
    /// A writer first checks that it still holds the lease.
    fn replace_durably(&self, _tmp: &str, name: &str, data: &[u8]) -> Result<(), ReplaceError> {
        let err = |e| ReplaceError(name.to_string(), e);
        self.check_not_fenced().map_err(err)?;
        if let Some(wb) = self.wb.get()
            && writeback::is_root_slot(name)
        {
            // A commit: durable in the journal, conditional on what the slot
            // holds once everything before it is uploaded.
            let expect = self.st.lock().view.get(name).copied().flatten();
            let e = wb
                .journal
                .append(journal::Kind::Root { expect }, name, data)
                .map_err(err)?;
            let mut st = self.st.lock();
            st.view
                .insert(name.to_string(), Some(journal::sha256(data)));
            st.local_whole
                .insert(name.to_string(), (e.seq, Arc::new(data.to_vec())));
            return Ok(());
        }
        let owner = self.lease_owner.lock().clone();
        if let Some(owner) = owner {
            lease::check_held(self, &owner).map_err(err)?;
        }
        let known = self.st.lock().etags.get(name).cloned();
        let mode = match known {
            Some(Some(e)) => PutMode::Update(UpdateVersion {
                e_tag: Some(e),
                version: None,
            }),
            _ => PutMode::Create,
        };
        match self.remote.put(name, data.to_vec(), mode) {
            Ok(etag) => {
                self.st.lock().etags.insert(name.to_string(), etag);
                Ok(())
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::AlreadyExists && owner_is_some(&self.lease_owner) {
                    self.fenced.store(true, Ordering::SeqCst);
                }
                Err(err(e))
            }
        }
    }
}

/// The request figures of this connection go to the log when it closes
/// (bench/s3.sh reads them from a mount's log).
impl Drop for ObjectStorage {
    fn drop(&mut self) {
        let c = &self.remote.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        log::info!(
            "{}: object store requests: {} GET, {} PUT, {} LIST, {} HEAD, {} DELETE; {} bytes \
             fetched, {} bytes put; {} bytes read from the local cache",
            self.cfg.url(),
            n(&c.gets),
            n(&c.puts),
            n(&c.lists),
            n(&c.heads),
            n(&c.deletes),
            n(&c.bytes_fetched),
            n(&c.bytes_put),
            self.cache.as_ref().map_or(0, |c| n(&c.hits))
        );
    }
}

fn owner_is_some(m: &Mutex<Option<String>>) -> bool {
    m.lock().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = ObjectConfig::parse("s3://bkt-1/vols/a/").unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("bkt-1", "vols/a"));
        assert_eq!(c.url(), "s3://bkt-1/vols/a");
        assert_eq!(ObjectConfig::parse("s3://bkt").unwrap().prefix, "");
        for bad in [
            "s3://key:secret@bkt/x",
            "s3://Bkt/x",
            "s3://b/x",
            "s3://bkt/a//b",
            "s3://bkt/../x",
            "file:///x",
        ] {
            assert!(ObjectConfig::parse(bad).is_err(), "{bad}");
        }
        let e = ObjectConfig::parse("s3://key:secret@bkt/x").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn credentials_file_sections() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c");
        std::fs::write(
            &p,
            "[other]\naws_access_key_id = X\naws_secret_access_key = Y\n\
             [default]\naws_access_key_id = AK\naws_secret_access_key = SK\n",
        )
        .unwrap();
        let c = read_credentials_file(&p).unwrap().unwrap();
        assert_eq!((c.key.as_str(), c.secret.as_str()), ("AK", "SK"));
        std::fs::write(&p, "[default]\naws_access_key_id = AK\n").unwrap();
        assert!(read_credentials_file(&p).unwrap().is_none());
    }
}
