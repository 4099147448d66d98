//! `kmsfs keystore passwd | backup | restore`.

use std::path::PathBuf;

use clap::Subcommand;

use super::{
    KeyArgs, MountOpts, Result, UnlockSource, absolute, kdf_params, obtain_unlock, open_keystore,
    unlock_existing,
};
use crate::kms::Unlock;

#[derive(Subcommand, Debug)]
pub(super) enum KeystoreCmd {
    /// Re-seal the keystore under a new passphrase or keyfile (no CMK changes)
    Passwd {
        /// File holding the new passphrase
        #[arg(long, value_name = "FILE", conflicts_with = "new_keyfile")]
        new_passphrase_file: Option<PathBuf>,
        /// New keyfile (at least 32 random bytes)
        #[arg(long, value_name = "FILE")]
        new_keyfile: Option<PathBuf>,
    },
    /// Write a sealed copy of the keystore to FILE (same passphrase or keyfile)
    Backup { file: PathBuf },
    /// Put a backup back; says which keys and versions it lacks compared with the current keystore
    Restore { file: PathBuf },
}

pub(super) fn cmd_keystore(keys: &KeyArgs, c: KeystoreCmd) -> Result<()> {
    let (ks_path, unlock) = unlock_existing(keys, &MountOpts::default())?;
    let kms = open_keystore(&ks_path, unlock)?;
    match c {
        KeystoreCmd::Passwd {
            new_passphrase_file,
            new_keyfile,
        } => {
            let new = match (new_passphrase_file, new_keyfile) {
                (Some(p), None) => obtain_unlock(
                    &ks_path,
                    &UnlockSource::PassphraseFile(absolute(&p)?),
                    false,
                )?,
                (None, Some(k)) => Unlock::Keyfile(absolute(&k)?),
                _ => obtain_unlock(&ks_path, &UnlockSource::Prompt, true)?,
            };
            let what = match &new {
                Unlock::Passphrase(_) => "passphrase",
                Unlock::Keyfile(_) => "keyfile",
            };
            kms.change_unlock(new, kdf_params())?;
            println!(
                "keystore {} (and its backup) re-sealed under the new {what}; every key is unchanged",
                ks_path.display()
            );
        }
        KeystoreCmd::Backup { file } => {
            kms.backup_to(&file)?;
            println!(
                "wrote a sealed copy of {} to {} (it opens with the current passphrase or keyfile)",
                ks_path.display(),
                file.display()
            );
        }
        KeystoreCmd::Restore { file } => {
            let r = kms.restore_from(&file)?;
            println!("restored {} from {}", ks_path.display(), file.display());
            for (id, alias) in &r.missing_keys {
                println!(
                    "  lacks key {id}{}: volumes wrapped under it no longer mount",
                    alias
                        .as_ref()
                        .map(|a| format!(" (alias {a})"))
                        .unwrap_or_default()
                );
            }
            for (id, v) in &r.missing_versions {
                println!(
                    "  lacks version {v} of key {id}: volumes wrapped under that version (re-wrapped since the backup) no longer mount"
                );
            }
            if r.missing_keys.is_empty() && r.missing_versions.is_empty() {
                println!("  the backup holds every key and version of the keystore it replaced");
            }
        }
    }
    Ok(())
}
