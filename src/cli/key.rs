//! `kmsfs key …` (CMK lifecycle and BYOK) and `kmsfs rewrap`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};

use super::{
    CliError, KeyArgs, Result, TOOL_CACHE, check_volume, exit, volume_is_mounted,
    wait_for_finishing_daemon,
};
use crate::error::Error;
use crate::format;
use crate::kms::{CreateKey, KeyChange, KeyInfo, KeyState, Kms, WrappingSpec};
use crate::store::FsStorage;
use crate::time::{iso_utc, now_unix, parse_time};
use crate::volume::{OpenOptions, Volume};

#[derive(Subcommand, Debug)]
pub(super) enum KeyCmd {
    /// Create a customer master key; prints its id
    Create {
        /// Unique alias, usable wherever a key id is (letters, digits, - _ . /)
        #[arg(long)]
        alias: Option<String>,
        /// Free text
        #[arg(long, default_value = "")]
        description: String,
        /// kms: kmsfs generates the material; external: you import it (BYOK)
        #[arg(long, default_value = "kms", value_parser = ["kms", "external"])]
        origin: String,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// List every key: id, alias, state, origin, versions, volumes (never key bytes)
    List {
        #[arg(long)]
        json: bool,
    },
    /// Everything about one key (never key bytes)
    Describe {
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// Enable a disabled key
    Enable { key: String },
    /// Disable a key: it neither wraps nor unwraps (its volumes do not mount) until enabled
    Disable { key: String },
    /// Make a new version primary; older versions still unwrap
    Rotate { key: String },
    /// Destroy the key after a waiting period (7 to 366 days); its volumes then never mount again
    ScheduleDeletion {
        key: String,
        #[arg(long, default_value_t = 30)]
        days: u32,
        /// Do not ask for confirmation (needed without a terminal)
        #[arg(long)]
        yes: bool,
    },
    /// Cancel a scheduled deletion (the key comes back disabled)
    CancelDeletion { key: String },
    /// BYOK: write a fresh RSA public key and an import token (valid 24 hours)
    ImportParams {
        key: String,
        /// RSA key size of the wrapping key
        #[arg(long, default_value = "rsa-3072", value_parser = ["rsa-3072", "rsa-4096"])]
        wrapping: String,
        /// Where to write the public key (PEM) [default: KEY.wrapping-key.pem]
        #[arg(long, value_name = "FILE")]
        public_key: Option<PathBuf>,
        /// Where to write the import token [default: KEY.import-token]
        #[arg(long, value_name = "FILE")]
        token: Option<PathBuf>,
    },
    /// BYOK: import 32 bytes of key material wrapped with RSAES-OAEP-SHA-256
    Import {
        key: String,
        /// The wrapped material
        #[arg(long, value_name = "FILE")]
        material: PathBuf,
        /// The import token from `key import-params`
        #[arg(long, value_name = "FILE")]
        token: PathBuf,
        /// The material expires (and is deleted) then: ISO 8601 UTC, a date, or +30d
        #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
        expires: Option<String>,
    },
    /// BYOK: delete imported material now (the same material may be imported again)
    DeleteMaterial { key: String },
}

#[derive(Args, Debug)]
pub(super) struct RewrapArgs {
    /// The volume directory
    volume_dir: PathBuf,
    /// Re-wrap under this key (id or alias) [default: the newest version of the current key]
    #[arg(long, value_name = "ID|ALIAS")]
    cmk: Option<String>,
    /// Machine-readable output
    #[arg(long)]
    json: bool,
}

/// The KMS for key administration (the keystore, or `--kms URL`); `create` may create
/// the keystore.
fn keystore(keys: &KeyArgs, create: bool) -> Result<Arc<dyn Kms>> {
    super::open_kms(keys, create)
}

fn state_text(k: &KeyInfo) -> String {
    match (k.state, k.deletion_date) {
        (KeyState::PendingDeletion, Some(d)) => {
            format!("PendingDeletion (destroyed at {})", iso_utc(d))
        }
        (KeyState::Deleted, Some(d)) => format!("Deleted (at {})", iso_utc(d)),
        (s, _) => s.name().to_string(),
    }
}

/// A key as JSON (never key material).
pub(super) fn key_json(k: &KeyInfo) -> serde_json::Value {
    serde_json::json!({
        "id": k.id,
        "alias": k.alias,
        "description": k.description,
        "kind": match k.kind { crate::kms::KeyKind::Service => "service", crate::kms::KeyKind::User => "user" },
        "origin": k.origin.name(),
        "state": k.state.name(),
        "deletion_date": k.deletion_date.map(iso_utc),
        "created": iso_utc(k.created),
        "primary_version": k.primary_version,
        "versions": k.versions.iter().map(|v| serde_json::json!({
            "version": v.version, "created": iso_utc(v.created), "has_material": v.has_material,
        })).collect::<Vec<_>>(),
        "material_expires": k.material_expires.map(iso_utc),
        "import_params_expire": k.import_params_expire.map(iso_utc),
        "volumes": k.volumes.iter().map(|b| serde_json::json!({
            "volume_id": format::hex(&b.volume_id), "path": b.path, "last_seen": iso_utc(b.updated),
        })).collect::<Vec<_>>(),
    })
}

fn print_key(k: &KeyInfo) {
    println!("id:          {}", k.id);
    println!("alias:       {}", k.alias.as_deref().unwrap_or("-"));
    if !k.description.is_empty() {
        println!("description: {}", k.description);
    }
    let kind = match k.kind {
        crate::kms::KeyKind::Service => " (service key: cannot be disabled or deleted)",
        crate::kms::KeyKind::User => "",
    };
    println!("origin:      {}{kind}", k.origin.name());
    println!("state:       {}", state_text(k));
    println!("created:     {}", iso_utc(k.created));
    match k.primary_version {
        Some(p) => println!("primary:     version {p}"),
        None => println!("primary:     none (no key material)"),
    }
    for v in &k.versions {
        println!(
            "  version {:<4} created {}{}",
            v.version,
            iso_utc(v.created),
            if v.has_material {
                ""
            } else {
                "  (material destroyed or not imported)"
            }
        );
    }
    if let Some(t) = k.material_expires {
        println!("material expires: {}", iso_utc(t));
    }
    if let Some(t) = k.import_params_expire {
        println!("import parameters valid until: {}", iso_utc(t));
    }
    if k.volumes.is_empty() {
        println!("volumes:     none recorded");
    } else {
        println!("volumes:");
        for b in &k.volumes {
            println!(
                "  {}  {}  (last seen {})",
                format::hex(&b.volume_id),
                b.path,
                iso_utc(b.updated)
            );
        }
    }
}

fn confirm(question: &str) -> Result<()> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::usage(format!(
            "{question} There is no terminal to confirm on: pass --yes to proceed"
        )));
    }
    eprint!("{question} Type 'yes' to proceed: ");
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| CliError::error(format!("cannot read the answer: {e}")))?;
    if line.trim() == "yes" {
        Ok(())
    } else {
        Err(CliError::error("not confirmed; nothing was changed"))
    }
}

pub(super) fn cmd_key(keys: &KeyArgs, c: KeyCmd) -> Result<()> {
    match c {
        KeyCmd::Create {
            alias,
            description,
            origin,
            json,
        } => {
            let ks = keystore(keys, true)?;
            let k = ks.create_key(&CreateKey {
                alias,
                description,
                external: origin == "external",
            })?;
            if json {
                println!("{}", key_json(&k));
            } else {
                println!("{}", k.id);
                if k.state == KeyState::PendingImport {
                    eprintln!(
                        "key {} is pending import: run `kmsfs key import-params {}` next",
                        k.id, k.id
                    );
                }
            }
        }
        KeyCmd::List { json } => {
            let ks = keystore(keys, false)?;
            let list = ks.list_keys()?;
            if json {
                let v: Vec<_> = list.iter().map(key_json).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(
                    "{:<20}  {:<16}  {:<8}  {:<40}  {:<8}  {:<20}  VOLUMES",
                    "ID", "ALIAS", "ORIGIN", "STATE", "VERSIONS", "CREATED"
                );
                for k in &list {
                    println!(
                        "{:<20}  {:<16}  {:<8}  {:<40}  {:<8}  {:<20}  {}",
                        k.id,
                        k.alias.as_deref().unwrap_or("-"),
                        k.origin.name(),
                        state_text(k),
                        format!(
                            "{}/{}",
                            k.primary_version.map_or("-".into(), |p| p.to_string()),
                            k.versions.len()
                        ),
                        iso_utc(k.created),
                        k.volumes.len()
                    );
                }
            }
        }
        KeyCmd::Describe { key, json } => {
            let ks = keystore(keys, false)?;
            let k = ks.describe_key(&key)?;
            if json {
                println!("{}", key_json(&k));
            } else {
                print_key(&k);
            }
        }
        KeyCmd::Enable { key } => change(keys, &key, KeyChange::Enable, "enabled")?,
        KeyCmd::Disable { key } => change(keys, &key, KeyChange::Disable, "disabled")?,
        KeyCmd::Rotate { key } => {
            let ks = keystore(keys, false)?;
            let k = ks.change_key(&key, KeyChange::Rotate)?;
            println!(
                "key {}: version {} is now primary; older versions still unwrap (re-wrap a volume onto it with `kmsfs rewrap VOLUME_DIR`)",
                k.id,
                k.primary_version.unwrap_or(0)
            );
        }
        KeyCmd::ScheduleDeletion { key, days, yes } => {
            let ks = keystore(keys, false)?;
            let k = ks.describe_key(&key)?;
            if !crate::kms::DELETION_DAYS.contains(&days) {
                return Err(CliError::usage(format!(
                    "--days must be 7 to 366, not {days}"
                )));
            }
            let vols: Vec<String> = k
                .volumes
                .iter()
                .map(|b| format!("{} ({})", format::hex(&b.volume_id), b.path))
                .collect();
            let warning = if vols.is_empty() {
                format!(
                    "Key {} will be destroyed in {days} days; no volume is recorded under it.",
                    k.id
                )
            } else {
                format!(
                    "Key {} will be destroyed in {days} days. These volumes will then NEVER mount again: {}.",
                    k.id,
                    vols.join(", ")
                )
            };
            if !yes {
                confirm(&warning)?;
            } else if !vols.is_empty() {
                eprintln!("warning: {warning}");
            }
            let k = ks.change_key(&key, KeyChange::ScheduleDeletion { days })?;
            println!(
                "key {} is pending deletion; its material is destroyed at {} unless `kmsfs key cancel-deletion {}` runs before",
                k.id,
                k.deletion_date.map_or_else(|| "?".into(), iso_utc),
                k.id
            );
        }
        KeyCmd::CancelDeletion { key } => {
            let ks = keystore(keys, false)?;
            let k = ks.change_key(&key, KeyChange::CancelDeletion)?;
            println!(
                "key {}: deletion cancelled; it is {} (enable it with `kmsfs key enable {}`)",
                k.id,
                k.state.name(),
                k.id
            );
        }
        KeyCmd::ImportParams {
            key,
            wrapping,
            public_key,
            token,
        } => {
            let spec =
                WrappingSpec::parse(&wrapping).map_err(|e| CliError::usage(e.to_string()))?;
            let ks = keystore(keys, false)?;
            let id = ks.describe_key(&key)?.id;
            let pub_path =
                public_key.unwrap_or_else(|| PathBuf::from(format!("{id}.wrapping-key.pem")));
            let token_path = token.unwrap_or_else(|| PathBuf::from(format!("{id}.import-token")));
            let p = ks.import_params(&key, spec)?;
            write_new(&pub_path, p.public_key_pem.as_bytes(), 0o644)?;
            write_new(&token_path, &p.token, 0o600)?;
            println!(
                "wrote the {} wrapping key {} and the import token {} (valid until {})",
                spec.name(),
                pub_path.display(),
                token_path.display(),
                iso_utc(p.expires)
            );
            println!(
                "wrap 32 bytes of key material with RSAES-OAEP-SHA-256, e.g.:\n  openssl pkeyutl -encrypt -pubin -inkey {} -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256 -in MATERIAL -out MATERIAL.wrapped\nthen: kmsfs key import {id} --material MATERIAL.wrapped --token {}",
                pub_path.display(),
                token_path.display()
            );
        }
        KeyCmd::Import {
            key,
            material,
            token,
            expires,
        } => {
            let expires = expires
                .map(|t| parse_time(&t).map_err(CliError::usage))
                .transpose()?;
            if let Some(t) = expires
                && t <= now_unix()
            {
                return Err(CliError::usage(format!(
                    "--expires {} is not in the future",
                    iso_utc(t)
                )));
            }
            let read = |p: &Path, what: &str| {
                super::read_bounded(p, 64 << 10).map_err(|e| {
                    CliError::error(format!("cannot read the {what} {}: {e}", p.display()))
                })
            };
            let wrapped = read(&material, "wrapped material")?;
            let token = read(&token, "import token")?;
            let ks = keystore(keys, false)?;
            let k = ks.import_material(&key, &token, &wrapped, expires)?;
            println!(
                "imported key material into {}: it is {}{}",
                k.id,
                k.state.name(),
                k.material_expires
                    .map(|t| format!("; the material expires at {}", iso_utc(t)))
                    .unwrap_or_default()
            );
        }
        KeyCmd::DeleteMaterial { key } => {
            let ks = keystore(keys, false)?;
            let k = ks.change_key(&key, KeyChange::DeleteMaterial)?;
            println!(
                "deleted the imported material of {}: it is {} (import the same material again with `kmsfs key import-params {}`)",
                k.id,
                k.state.name(),
                k.id
            );
        }
    }
    Ok(())
}

fn change(keys: &KeyArgs, key: &str, ch: KeyChange, done: &str) -> Result<()> {
    let ks = keystore(keys, false)?;
    let k = ks.change_key(key, ch)?;
    println!("key {} {done}; it is {}", k.id, k.state.name());
    Ok(())
}

/// Creates `path` (refusing to replace an existing file) with `mode`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            CliError::error(format!(
                "cannot create {}: {e}{}",
                path.display(),
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    " (remove it or choose another file with --public-key / --token)"
                } else {
                    ""
                }
            ))
        })?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| CliError::error(format!("cannot write {}: {e}", path.display())))
}

pub(super) fn cmd_rewrap(keys: &KeyArgs, a: RewrapArgs) -> Result<()> {
    let canon = check_volume(&a.volume_dir)?;
    wait_for_finishing_daemon(&canon);
    let kms = super::open_kms(keys, false)?;
    let opts = OpenOptions {
        cache_bytes: TOOL_CACHE,
        ..Default::default()
    };
    let r = match Volume::open(Arc::new(FsStorage::new(&canon)), &*kms, opts) {
        Ok(vol) => {
            let r = vol.rewrap(&*kms, a.cmk.as_deref())?;
            vol.close()?;
            serde_json::json!({"from_cmk": r.from.0, "from_version": r.from.1,
                "to_cmk": r.to.0, "to_version": r.to.1, "through_mount": false})
        }
        Err(Error::Locked(_)) if volume_is_mounted(&canon) => {
            let mut r = crate::control::request(
                &canon,
                &crate::control::Request::Rewrap { cmk: a.cmk.clone() },
            )?;
            r["through_mount"] = serde_json::Value::Bool(true);
            r
        }
        Err(e) => return Err(e.into()),
    };
    if a.json {
        println!("{r}");
    } else {
        println!(
            "re-wrapped the data key of {} from {} version {} to {} version {}{}; no data was touched",
            canon.display(),
            r["from_cmk"].as_str().unwrap_or("?"),
            r["from_version"],
            r["to_cmk"].as_str().unwrap_or("?"),
            r["to_version"],
            if r["through_mount"] == true {
                " (through the mount)"
            } else {
                ""
            }
        );
    }
    let _ = exit::OK;
    Ok(())
}
