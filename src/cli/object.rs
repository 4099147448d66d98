//! `s3://BUCKET/PREFIX` volume arguments: the object store options shared by
//! every command (global flags), and the storage, control socket directory
//! and clone copy for such a volume. See docs/OBJECT-STORE.md.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use std::os::unix::fs::DirBuilderExt;

use clap::Args;

use super::{CliError, Result, parse_size};
use crate::store::{FsStorage, ObjectConfig, ObjectStorage, Storage};

#[derive(Args, Debug, Default, Clone)]
pub(super) struct S3Args {
    /// S3 endpoint of s3:// volumes (e.g. http://127.0.0.1:8333 for SeaweedFS or MinIO);
    /// AWS S3 when not given [env: AWS_ENDPOINT]
    #[arg(long, global = true, value_name = "URL")]
    endpoint: Option<String>,
    /// Region of s3:// volumes [env: AWS_REGION] [default: us-east-1]
    #[arg(long, global = true, value_name = "REGION")]
    region: Option<String>,
    /// AWS-style credentials file for s3:// volumes ([default] or $AWS_PROFILE section);
    /// else AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, else ~/.aws/credentials
    #[arg(long, global = true, value_name = "FILE")]
    credentials_file: Option<PathBuf>,
    /// Local cache of segment ciphertext for s3:// volumes
    /// [default: ~/.cache/kmsfs/s3/BUCKET/PREFIX]
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Bound of that cache (0 disables it) [default: 1G]
    #[arg(long, global = true, value_name = "SIZE")]
    cache_size: Option<String>,
    /// Take the writer lease of an s3:// volume at once, even while another writer
    /// holds it (that writer is fenced: it can no longer commit)
    #[arg(long, global = true)]
    force_takeover: bool,
    /// Lifetime of the writer lease and reader pins of s3:// volumes, renewed every
    /// third of it; a writer that dies is taken over after it [default: 30]
    #[arg(long, global = true, value_name = "SECS")]
    lease_time: Option<u64>,
    /// Write-back mode of an s3:// mount: fsync returns once the data is durable in a
    /// local journal in DIR (ciphertext only), uploaded to the store in the background
    /// and replayed by the next mount with the same DIR after a crash. Without it
    /// (the default: a journal on one host is lost with that host) fsync returns once
    /// the data is in the object store
    #[arg(long, global = true, value_name = "DIR")]
    writeback: Option<PathBuf>,
    /// Bound of the write-back journal's data not yet uploaded; writes wait for the
    /// uploader beyond it [default: 1G]
    #[arg(long, global = true, value_name = "SIZE")]
    writeback_size: Option<String>,
}

static ARGS: OnceLock<S3Args> = OnceLock::new();

pub(super) fn set_args(a: S3Args) -> Result<()> {
    let _ = ARGS.set(a);
    Ok(())
}

/// Whether `--writeback` was given.
pub(super) fn writeback_given() -> bool {
    ARGS.get().is_some_and(|a| a.writeback.is_some())
}

/// Whether a volume argument is an object store URL.
pub(super) fn is_url(p: &Path) -> bool {
    p.to_str().is_some_and(ObjectConfig::is_url)
}

/// The object store configuration of `s3://…` with the command's options.
pub(super) fn config(p: &Path) -> Result<ObjectConfig> {
    let url = p.to_str().unwrap_or_default();
    let mut c = ObjectConfig::parse(url).map_err(CliError::usage)?;
    let a = ARGS.get().cloned().unwrap_or_default();
    c.endpoint = a.endpoint.or_else(|| std::env::var("AWS_ENDPOINT").ok());
    c.region = a.region;
    c.credentials_file = a.credentials_file;
    c.cache_dir = a.cache_dir;
    if let Some(s) = &a.cache_size {
        c.cache_bytes = parse_size(s).map_err(|e| CliError::usage(format!("--cache-size: {e}")))?;
    }
    c.force_takeover = a.force_takeover;
    if let Some(d) = &a.writeback {
        let abs = std::path::absolute(d)
            .map_err(|e| CliError::usage(format!("--writeback {}: {e}", d.display())))?;
        // One spelling of the directory (the store's marker names it).
        c.writeback = Some(abs.canonicalize().unwrap_or(abs));
    }
    if let Some(s) = &a.writeback_size {
        c.writeback_bytes =
            parse_size(s).map_err(|e| CliError::usage(format!("--writeback-size: {e}")))?;
        if c.writeback_bytes == 0 {
            return Err(CliError::usage(
                "--writeback-size must be more than 0 (leave --writeback out for no journal)",
            ));
        }
    }
    if let Some(t) = a.lease_time {
        if t == 0 {
            return Err(CliError::usage("--lease-time must be at least 1 second"));
        }
        c.lease = std::time::Duration::from_secs(t);
    }
    Ok(c)
}

/// The storage of a volume argument: the object store for `s3://…`, else
/// the directory.
pub(super) fn storage(p: &Path) -> Result<Arc<dyn Storage>> {
    if !is_url(p) {
        if ARGS.get().is_some_and(|a| a.writeback.is_some()) {
            return Err(CliError::usage(format!(
                "--writeback is for s3:// volumes; {} is a directory, where fsync is local \
                 already: leave the option out",
                p.display()
            )));
        }
        return Ok(Arc::new(FsStorage::new(p)));
    }
    let c = config(p)?;
    let url = c.url();
    Ok(Arc::new(
        ObjectStorage::open(c).map_err(|e| CliError::error(format!("{url}: {e}")))?,
    ))
}

/// The storage of an existing volume: for `s3://…`, the header must be
/// there (a clear "not a volume" instead of a missing root record).
pub(super) fn existing(p: &Path) -> Result<Arc<dyn Storage>> {
    let s = storage(p)?;
    if is_url(p) {
        let header = s.len(crate::format::HEADER_FILE);
        if let Err(e) = &header
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(CliError::error(format!("{}: {e}", p.display())));
        }
        if header.is_err() && !s.exists(crate::format::HEADER_BACKUP_FILE) {
            return Err(CliError::error(format!(
                "{} is not a kmsfs volume (no {}); create one with `kmsfs init {}`",
                p.display(),
                crate::format::HEADER_FILE,
                p.display()
            )));
        }
    }
    Ok(s)
}

/// The directory that names the control socket of a mount of this volume
/// (its device and inode name the socket in the runtime directory; without
/// one the socket is `kmsfs.ctl` in it, see [`crate::control`]): the volume
/// directory, or for `s3://…` the folder `ctl` in the volume's default cache
/// directory on this host (found from the URL alone, so `kmsfs umount`,
/// which knows only the mount source, reaches it).
pub(super) fn control_dir(p: &Path) -> PathBuf {
    if !is_url(p) {
        return p.to_path_buf();
    }
    match ObjectConfig::parse(p.to_str().unwrap_or_default()) {
        Ok(c) => {
            let d = c.default_cache_dir().join("ctl");
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d);
            d
        }
        Err(_) => p.to_path_buf(),
    }
}

/// Who holds the writer lease of an `s3://…` volume now, for `kmsfs info`.
pub(super) fn writer(p: &Path) -> Option<String> {
    let s = ObjectStorage::open(config(p).ok()?).ok()?;
    let journal = crate::store::object::writeback::marker(&s)
        .ok()
        .flatten()
        .map(|m| {
            format!(
                "; write-back journal of host {} in {} (may hold data not in the store yet)",
                m.host, m.dir
            )
        })
        .unwrap_or_default();
    let lease = match crate::store::object::lease::holder(&s) {
        Ok(Some(l)) => format!("host {} pid {} (lease valid {} s more)", l.host, l.pid, {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            l.expires.saturating_sub(now)
        }),
        Ok(None) => "none (no live writer lease)".to_string(),
        Err(e) => format!("unknown ({e})"),
    };
    Some(lease + &journal)
}
