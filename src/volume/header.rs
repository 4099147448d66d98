//! The volume header after creation: re-wrapping the DK (`kmsfs rewrap`).
//!
//! A rewrap asks the KMS to re-encrypt the wrapped DK under the newest version of its CMK
//! or under another CMK (the DK itself never changes, so no data block, tree node, root
//! record, snapshot or clone changes either), then replaces both header copies: first
//! `kmsfs.header`, then `kmsfs.header.bak`, each written to a temporary file, synced and
//! renamed. A crash at any point leaves each copy either old or new, and both unwrap as
//! long as the old CMK version exists; opening read-write makes the backup equal to the
//! primary again.

use super::{Volume, ctx_for, sign_header_with, write_durably};
use crate::error::Result;
use crate::format::{self, Header};
use crate::kms::{Kms, WrappedKey};

/// What a rewrap changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RewrapReport {
    /// CMK id and version before.
    pub from: (String, u32),
    /// CMK id and version after.
    pub to: (String, u32),
}

impl Volume {
    /// The header as it is on disk now (a rewrap replaces the wrap fields).
    #[must_use]
    pub fn header(&self) -> Header {
        self.rewrapped
            .lock()
            .clone()
            .unwrap_or_else(|| self.header.clone())
    }

    /// Re-wraps the DK under the newest version of its CMK (`dest` = None) or under the
    /// CMK `dest` (id or alias), and replaces both header copies. Touches no data.
    ///
    /// # Errors
    /// The KMS's refusal (disabled source or destination key, …), I/O errors, read-only.
    pub fn rewrap(&self, kms: &dyn Kms, dest: Option<&str>) -> Result<RewrapReport> {
        self.writable()?;
        let mut guard = self.rewrapped.lock();
        let cur = guard.clone().unwrap_or_else(|| self.header.clone());
        let wrapped = WrappedKey {
            cmk_id: cur.cmk_id.clone(),
            cmk_version: cur.cmk_version,
            ciphertext: cur.wrapped_dk.clone(),
        };
        let new = kms.re_encrypt(&wrapped, &ctx_for(&cur.key_domain), dest)?;
        let next = Header {
            cmk_id: new.cmk_id.clone(),
            cmk_version: new.cmk_version,
            wrapped_dk: new.ciphertext,
            ..cur.clone()
        };
        let hb = sign_header_with(&next, &self.header_mac_key);
        let storage = &*self.io.storage;
        write_durably(storage, format::HEADER_FILE, &hb)?;
        write_durably(storage, format::HEADER_BACKUP_FILE, &hb)?;
        *guard = Some(next);
        drop(guard);
        let path = storage.describe();
        if let Err(e) = kms.note_volume(&cur.volume_id, &new.cmk_id, &path) {
            log::warn!("rewrap done, but the keystore could not record the volume's new key: {e}");
        }
        Ok(RewrapReport {
            from: (cur.cmk_id, cur.cmk_version),
            to: (new.cmk_id, new.cmk_version),
        })
    }

    /// [`Volume::rewrap`] with the KMS the mount records its generations in (the mount
    /// daemon's keystore), for a rewrap requested through the control socket.
    ///
    /// # Errors
    /// As [`Volume::rewrap`]; refused when no KMS is attached.
    pub fn rewrap_attached(&self, dest: Option<&str>) -> Result<RewrapReport> {
        let kms = self.mark_sink.lock().clone().ok_or_else(|| {
            crate::error::Error::Invalid(
                "this mount has no key management service attached; unmount and run `kmsfs rewrap` on the volume".into(),
            )
        })?;
        self.rewrap(&*kms, dest)
    }
}
