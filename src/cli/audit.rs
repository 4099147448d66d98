//! `kmsfs audit` (read the KMS audit trail) and `kmsfs audit verify`.

use clap::{Args, Subcommand};

use super::{CliError, KeyArgs, MountOpts, Result, exit, open_keystore, unlock_existing};
use crate::kms::{AuditFilter, AuditOp, audit};
use crate::time::parse_time;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub(super) struct AuditArgs {
    #[command(subcommand)]
    sub: Option<AuditSub>,
    /// Machine-readable output (one JSON object per line)
    #[arg(long)]
    json: bool,
    /// Only records about this key id
    #[arg(long, value_name = "ID")]
    key: Option<String>,
    /// Only records about this volume id (32 hex digits)
    #[arg(long, value_name = "ID")]
    volume: Option<String>,
    /// From this time on (ISO 8601 UTC, a date, @UNIX, or -1d)
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    since: Option<String>,
    /// Up to this time
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    until: Option<String>,
    /// Only this operation (create, enable, disable, rotate, schedule-deletion,
    /// cancel-deletion, destroy, import-params, import, delete-material,
    /// generate-data-key, decrypt, re-encrypt, unlock, passwd, restore)
    #[arg(long, value_name = "OP")]
    op: Option<String>,
}

#[derive(Subcommand, Debug)]
enum AuditSub {
    /// Check the MAC chain and the keystore's anchor; names the first bad record (exit 3)
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// Move a damaged log aside and start a new chain (key operations are refused until
    /// the log verifies again or is reset)
    Reset {
        /// Confirm
        #[arg(long)]
        yes: bool,
    },
}

pub(super) fn cmd_audit(keys: &KeyArgs, a: AuditArgs) -> Result<()> {
    if let Some(AuditSub::Reset { yes }) = a.sub {
        if !yes {
            return Err(CliError::usage(
                "`kmsfs audit reset` moves the audit log aside and starts a new one: pass --yes",
            ));
        }
        if super::kms_url(keys, &MountOpts::default()).is_some() {
            return Err(CliError::usage(
                "`kmsfs audit reset` works on the keystore file itself: run it where the keystore is, without --kms",
            ));
        }
        let (ks, unlock) = unlock_existing(keys, &MountOpts::default())?;
        let kms = open_keystore(&ks, unlock)?;
        let moved = kms.audit_reset()?;
        match moved {
            Some(p) => println!(
                "started a new audit log {}; the previous one is kept as {}",
                kms.audit_path().display(),
                p.display()
            ),
            None => println!("started a new audit log {}", kms.audit_path().display()),
        }
        return Ok(());
    }
    let kms = super::open_kms(keys, false)?;
    if let Some(AuditSub::Verify { json }) = a.sub {
        let r = kms.audit_records().map_err(CliError::from)?.0;
        return match r {
            Ok(rep) => {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"ok": true, "records": rep.records,
                            "authenticated": rep.authenticated, "unanchored_tail": rep.unanchored_tail,
                            "kms": kms.describe()})
                    );
                } else {
                    println!(
                        "audit log of the {}: {} records, chain intact{}",
                        kms.describe(),
                        rep.records,
                        if rep.unanchored_tail > 0 {
                            format!(
                                "; the last {} not yet covered by a MAC (failed unlocks, or a crash before the keystore recorded them)",
                                rep.unanchored_tail
                            )
                        } else {
                            String::new()
                        }
                    );
                }
                Ok(())
            }
            Err(e) => {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"ok": false, "error": e.to_string()})
                    );
                }
                Err(CliError::new(exit::INTEGRITY, e))
            }
        };
    }
    let op =
        a.op.as_deref()
            .map(|o| {
                AuditOp::from_name(o).ok_or_else(|| {
                    CliError::usage(format!(
                        "unknown operation {o:?}; one of: {}",
                        AuditOp::ALL
                            .iter()
                            .map(|o| o.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })
            })
            .transpose()?;
    let volume = a
        .volume
        .as_deref()
        .map(|v| {
            crate::kms::parse_hex16(v)
                .ok_or_else(|| CliError::usage(format!("--volume {v:?} is not 32 hex digits")))
        })
        .transpose()?;
    let ms = |t: &Option<String>| -> Result<Option<u64>> {
        t.as_deref()
            .map(|s| {
                parse_time(s)
                    .map(|v| v.saturating_mul(1000))
                    .map_err(CliError::usage)
            })
            .transpose()
    };
    let filter = AuditFilter {
        key: a.key.clone(),
        volume,
        since_ms: ms(&a.since)?,
        until_ms: ms(&a.until)?.map(|u| u + 999),
        op,
    };
    let (verified, records) = kms.audit_records()?;
    if let Err(e) = &verified {
        eprintln!("warning: {e}");
    }
    let shown: Vec<_> = records
        .into_iter()
        .filter(|r| filter.matches(&r.record))
        .collect();
    if a.json {
        for r in &shown {
            println!("{}", audit::to_json(r));
        }
    } else {
        print!("{}", audit::format_table(&shown));
    }
    Ok(())
}
