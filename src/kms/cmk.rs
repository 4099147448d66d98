//! A customer master key: its versions, its state, what it may do in each state, and
//! its lifecycle changes. Everything here works on the decrypted keystore [`State`]; the
//! keystore file and the audit trail are `keystore`'s job.

use zeroize::Zeroize;

use super::import::{self, PendingImport};
use super::payload::{Binding, MAX_DESCRIPTION_LEN, State, validate_alias};
use super::{
    CreateKey, EncryptionContext, KeyChange, KeyInfo, KeyKind, KeyOrigin, KeyState, KmsError,
    VersionInfo, VolumeBinding, WrappedKey,
};
use crate::crypto::{self, CipherKind, DataKey, KEY_LEN, Sealer, SecretKey, labels};

/// Prefix of the AAD of every DK wrap.
pub const WRAP_AAD_PREFIX: &[u8] = b"kmsfs-wrap-v1";
const WRAP_CIPHER: CipherKind = CipherKind::Aes256GcmSiv;
/// Sealed DK: nonce, 32 key bytes, tag.
pub(super) const WRAPPED_LEN: usize = 12 + KEY_LEN + crypto::TAG_LEN;
/// Shortest and longest waiting period of a scheduled deletion, days.
pub const DELETION_DAYS: std::ops::RangeInclusive<u32> = 7..=366;
const DAY: u64 = 86_400;

pub(super) struct CmkVersion {
    pub version: u32,
    pub created: u64,
    /// `None` once destroyed (deleted key) or not imported (external key).
    pub material: Option<SecretKey>,
}

pub(super) struct Cmk {
    pub id: String,
    pub alias: Option<String>,
    pub description: String,
    pub created: u64,
    pub kind: KeyKind,
    pub origin: KeyOrigin,
    pub state: KeyState,
    /// Unix seconds; 0 = none. Kept after deletion as the deletion time.
    pub deletion_date: u64,
    /// Imported material is deleted at this time (unix seconds); 0 = never.
    pub material_expires: u64,
    /// Of the imported material, so that only the same material is imported again.
    pub fingerprint: Option<[u8; 32]>,
    /// Outstanding import parameters (the RSA private key among them).
    pub pending_import: Option<PendingImport>,
    /// Oldest first, strictly increasing version numbers.
    pub versions: Vec<CmkVersion>,
}

/// What a change did, for the audit record: the key and version it concerned.
#[derive(Clone, Debug, Default)]
pub(super) struct Touched {
    pub key_id: String,
    pub version: u32,
}

impl Cmk {
    pub fn generate(
        id: String,
        alias: Option<String>,
        description: String,
        kind: KeyKind,
        now: u64,
    ) -> Self {
        Self {
            id,
            alias,
            description,
            created: now,
            kind,
            origin: KeyOrigin::Generated,
            state: KeyState::Enabled,
            deletion_date: 0,
            material_expires: 0,
            fingerprint: None,
            pending_import: None,
            versions: vec![CmkVersion {
                version: 1,
                created: now,
                material: Some(SecretKey::random()),
            }],
        }
    }

    fn external(id: String, alias: Option<String>, description: String, now: u64) -> Self {
        Self {
            id,
            alias,
            description,
            created: now,
            kind: KeyKind::User,
            origin: KeyOrigin::Imported,
            state: KeyState::PendingImport,
            deletion_date: 0,
            material_expires: 0,
            fingerprint: None,
            pending_import: None,
            versions: Vec::new(),
        }
    }

    fn has_material(&self) -> bool {
        self.versions.iter().any(|v| v.material.is_some())
    }

    /// The version new wraps use.
    pub fn primary(&self) -> Option<&CmkVersion> {
        self.versions.last().filter(|v| v.material.is_some())
    }

    pub fn info(&self, volumes: &std::collections::BTreeMap<[u8; 16], Binding>) -> KeyInfo {
        KeyInfo {
            id: self.id.clone(),
            alias: self.alias.clone(),
            description: self.description.clone(),
            created: self.created,
            state: self.state,
            deletion_date: (self.deletion_date != 0).then_some(self.deletion_date),
            kind: self.kind,
            origin: self.origin,
            versions: self
                .versions
                .iter()
                .map(|v| VersionInfo {
                    version: v.version,
                    created: v.created,
                    has_material: v.material.is_some(),
                })
                .collect(),
            primary_version: self.primary().map(|v| v.version),
            material_expires: (self.material_expires != 0).then_some(self.material_expires),
            import_params_expire: self.pending_import.as_ref().map(|p| p.expires),
            volumes: volumes
                .iter()
                .filter(|(_, b)| b.cmk_id == self.id)
                .map(|(id, b)| VolumeBinding {
                    volume_id: *id,
                    cmk_id: b.cmk_id.clone(),
                    path: b.path.clone(),
                    updated: b.updated,
                })
                .collect(),
        }
    }

    /// The usage rule: only an enabled key with material wraps or unwraps.
    pub fn check_usable(&self) -> Result<(), KmsError> {
        match self.state {
            KeyState::Enabled => Ok(()),
            KeyState::Disabled => Err(KmsError::KeyDisabled(self.id.clone())),
            KeyState::PendingDeletion => Err(KmsError::KeyPendingDeletion {
                id: self.id.clone(),
                deletion_date: self.deletion_date,
            }),
            KeyState::PendingImport => Err(KmsError::KeyPendingImport(self.id.clone())),
            KeyState::Deleted => Err(KmsError::KeyDeleted(self.id.clone())),
        }
    }

    fn version(&self, version: u32) -> Result<&SecretKey, KmsError> {
        let v = self
            .versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| KmsError::KeyVersionNotFound {
                id: self.id.clone(),
                version,
            })?;
        v.material.as_ref().ok_or_else(|| match self.origin {
            KeyOrigin::Imported => KmsError::KeyPendingImport(self.id.clone()),
            KeyOrigin::Generated => KmsError::KeyDeleted(self.id.clone()),
        })
    }

    /// Wraps under the primary version. The caller checked [`Cmk::check_usable`].
    pub fn wrap(&self, dk: &DataKey, ctx: &EncryptionContext) -> Result<WrappedKey, KmsError> {
        let v = self
            .primary()
            .ok_or_else(|| KmsError::KeyPendingImport(self.id.clone()))?;
        let material = v
            .material
            .as_ref()
            .ok_or_else(|| KmsError::KeyPendingImport(self.id.clone()))?;
        let sealer = Sealer::new(
            WRAP_CIPHER,
            &crypto::derive_subkey(material, labels::CMK_WRAP),
        );
        Ok(WrappedKey {
            cmk_id: self.id.clone(),
            cmk_version: v.version,
            ciphertext: sealer.seal(&wrap_aad(&self.id, v.version, ctx), dk.expose()),
        })
    }

    pub fn unwrap(
        &self,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<DataKey, KmsError> {
        let material = self.version(wrapped.cmk_version)?;
        if wrapped.ciphertext.len() != WRAPPED_LEN {
            return Err(KmsError::UnwrapFailed);
        }
        let sealer = Sealer::new(
            WRAP_CIPHER,
            &crypto::derive_subkey(material, labels::CMK_WRAP),
        );
        let mut dk = [0u8; KEY_LEN];
        let res = sealer.open_into(
            &wrap_aad(&self.id, wrapped.cmk_version, ctx),
            &wrapped.ciphertext,
            &mut dk,
        );
        let key = res.ok().and_then(|()| SecretKey::from_slice(&dk));
        dk.zeroize();
        key.ok_or(KmsError::UnwrapFailed)
    }

    fn destroy_material(&mut self) {
        for v in &mut self.versions {
            v.material = None;
        }
    }
}

/// `"kmsfs-wrap-v1" || u16 LE id length || id || u32 LE version || ctx.canonical_bytes()`.
pub(super) fn wrap_aad(cmk_id: &str, version: u32, ctx: &EncryptionContext) -> Vec<u8> {
    let id_len = u16::try_from(cmk_id.len()).expect("CMK ids are at most 64 bytes");
    let mut aad = Vec::new();
    aad.extend_from_slice(WRAP_AAD_PREFIX);
    aad.extend_from_slice(&id_len.to_le_bytes());
    aad.extend_from_slice(cmk_id.as_bytes());
    aad.extend_from_slice(&version.to_le_bytes());
    aad.extend_from_slice(&ctx.canonical_bytes());
    aad
}

/// Something the clock did on access: a scheduled deletion carried out, imported material
/// or import parameters expired. Each becomes an audit record.
pub(super) struct Expired {
    pub key_id: String,
    pub what: &'static str,
}

/// Carries out what is due at `now`: destroys keys whose deletion date has passed,
/// deletes imported material past its expiry, drops expired import parameters.
pub(super) fn expire(state: &mut State, now: u64) -> Vec<Expired> {
    let mut done = Vec::new();
    for c in &mut state.cmks {
        if c.state == KeyState::PendingDeletion && c.deletion_date <= now {
            c.destroy_material();
            c.pending_import = None;
            c.state = KeyState::Deleted;
            done.push(Expired {
                key_id: c.id.clone(),
                what: "destroy",
            });
        }
        if c.origin == KeyOrigin::Imported
            && c.material_expires != 0
            && c.material_expires <= now
            && c.has_material()
        {
            c.destroy_material();
            c.material_expires = 0;
            if matches!(c.state, KeyState::Enabled | KeyState::Disabled) {
                c.state = KeyState::PendingImport;
            }
            done.push(Expired {
                key_id: c.id.clone(),
                what: "material-expired",
            });
        }
        if c.pending_import.as_ref().is_some_and(|p| p.expires <= now) {
            c.pending_import = None;
        }
    }
    done
}

/// Creates a user key.
pub(super) fn create(state: &mut State, spec: &CreateKey, now: u64) -> Result<KeyInfo, KmsError> {
    if let Some(a) = &spec.alias {
        validate_alias(a).map_err(KmsError::InvalidKeyName)?;
        if state.cmks.iter().any(|c| c.alias.as_ref() == Some(a)) {
            return Err(KmsError::AliasInUse(a.clone()));
        }
    }
    if spec.description.len() > MAX_DESCRIPTION_LEN {
        return Err(KmsError::InvalidKeyName(format!(
            "the description is longer than {MAX_DESCRIPTION_LEN} bytes"
        )));
    }
    let id = state.new_id();
    let cmk = if spec.external {
        Cmk::external(id, spec.alias.clone(), spec.description.clone(), now)
    } else {
        Cmk::generate(
            id,
            spec.alias.clone(),
            spec.description.clone(),
            KeyKind::User,
            now,
        )
    };
    let info = cmk.info(&state.volumes);
    state.cmks.push(cmk);
    Ok(info)
}

fn refuse(msg: String) -> KmsError {
    KmsError::Refused(msg)
}

/// Applies a lifecycle change to the key named `name`.
pub(super) fn change(
    state: &mut State,
    name: &str,
    change: KeyChange,
    now: u64,
    touched: &mut Touched,
) -> Result<KeyInfo, KmsError> {
    let c = state.resolve_mut(name)?;
    touched.key_id.clone_from(&c.id);
    touched.version = c.primary().map_or(0, |v| v.version);
    let id = c.id.clone();
    let service = c.kind == KeyKind::Service;
    let service_err = |what| KmsError::ServiceKey {
        id: id.clone(),
        what,
    };
    match change {
        KeyChange::Enable => match c.state {
            KeyState::Enabled => {}
            KeyState::Disabled => c.state = KeyState::Enabled,
            KeyState::PendingDeletion => {
                return Err(refuse(format!(
                    "key {id} is pending deletion; cancel it first with `kmsfs key cancel-deletion {id}`, then enable it"
                )));
            }
            _ => c.check_usable()?,
        },
        KeyChange::Disable => {
            if service {
                return Err(service_err("disabled"));
            }
            match c.state {
                KeyState::Disabled => {}
                KeyState::Enabled => c.state = KeyState::Disabled,
                _ => c.check_usable()?,
            }
        }
        KeyChange::Rotate => {
            if c.origin == KeyOrigin::Imported {
                return Err(refuse(format!(
                    "key {id} holds imported material, which kmsfs cannot rotate: create a new key (`kmsfs key create --origin external`), import new material into it, and move each volume with `kmsfs rewrap VOLUME_DIR --cmk NEW_KEY`"
                )));
            }
            c.check_usable()?;
            let version = c.versions.last().map_or(1, |v| v.version + 1);
            c.versions.push(CmkVersion {
                version,
                created: now,
                material: Some(SecretKey::random()),
            });
            touched.version = version;
        }
        KeyChange::ScheduleDeletion { days } => {
            if service {
                return Err(service_err("scheduled for deletion"));
            }
            if !DELETION_DAYS.contains(&days) {
                return Err(refuse(format!(
                    "the waiting period must be {} to {} days, not {days}",
                    DELETION_DAYS.start(),
                    DELETION_DAYS.end()
                )));
            }
            match c.state {
                KeyState::PendingDeletion => {
                    return Err(refuse(format!(
                        "key {id} is already pending deletion, at {}",
                        crate::time::iso_utc(c.deletion_date)
                    )));
                }
                KeyState::Deleted => return Err(KmsError::KeyDeleted(id)),
                _ => {
                    c.state = KeyState::PendingDeletion;
                    c.deletion_date = now + u64::from(days) * DAY;
                }
            }
        }
        KeyChange::CancelDeletion => match c.state {
            KeyState::PendingDeletion => {
                // As cloud KMSs do: the key comes back disabled; enabling it is a
                // separate, deliberate step.
                c.state = if c.has_material() {
                    KeyState::Disabled
                } else {
                    KeyState::PendingImport
                };
                c.deletion_date = 0;
            }
            KeyState::Deleted => return Err(KmsError::KeyDeleted(id)),
            s => {
                return Err(refuse(format!(
                    "key {id} is not pending deletion (it is {}); nothing to cancel",
                    s.name()
                )));
            }
        },
        KeyChange::DeleteMaterial => {
            if c.origin != KeyOrigin::Imported {
                return Err(refuse(format!(
                    "key {id} was generated by kmsfs (origin kms); only imported material can be deleted (use `kmsfs key schedule-deletion {id}` to delete the key)"
                )));
            }
            match c.state {
                KeyState::Deleted => return Err(KmsError::KeyDeleted(id)),
                KeyState::PendingImport => {}
                KeyState::PendingDeletion | KeyState::Enabled | KeyState::Disabled => {
                    c.destroy_material();
                    c.material_expires = 0;
                    if c.state != KeyState::PendingDeletion {
                        c.state = KeyState::PendingImport;
                    }
                }
            }
        }
    }
    let c = state.resolve(Some(name))?;
    Ok(c.info(&state.volumes))
}

/// Fresh import parameters for an external key.
pub(super) fn import_params(
    state: &mut State,
    name: &str,
    wrapping: import::WrappingSpec,
    now: u64,
    touched: &mut Touched,
) -> Result<import::ImportParams, KmsError> {
    let c = state.resolve_mut(name)?;
    touched.key_id.clone_from(&c.id);
    check_importable(c)?;
    let (pending, params) = PendingImport::generate(&c.id, wrapping, now)?;
    c.pending_import = Some(pending);
    Ok(params)
}

fn check_importable(c: &Cmk) -> Result<(), KmsError> {
    if c.kind == KeyKind::Service {
        return Err(KmsError::ServiceKey {
            id: c.id.clone(),
            what: "given imported material",
        });
    }
    if c.origin != KeyOrigin::Imported {
        return Err(refuse(format!(
            "key {} was created with origin kms (generated material); import material into a key created with `kmsfs key create --origin external`",
            c.id
        )));
    }
    match c.state {
        KeyState::Deleted => Err(KmsError::KeyDeleted(c.id.clone())),
        KeyState::PendingDeletion => Err(KmsError::KeyPendingDeletion {
            id: c.id.clone(),
            deletion_date: c.deletion_date,
        }),
        _ => Ok(()),
    }
}

/// Imports wrapped material into an external key.
pub(super) fn import_material(
    state: &mut State,
    name: &str,
    token: &[u8],
    wrapped_material: &[u8],
    expires: Option<u64>,
    now: u64,
    touched: &mut Touched,
) -> Result<KeyInfo, KmsError> {
    let c = state.resolve_mut(name)?;
    touched.key_id.clone_from(&c.id);
    check_importable(c)?;
    if let Some(t) = expires
        && t <= now
    {
        return Err(refuse(format!(
            "the expiry {} is not in the future",
            crate::time::iso_utc(t)
        )));
    }
    let Some(pending) = c.pending_import.as_ref() else {
        // Expired import parameters are dropped on access (`expire`), so an expired token
        // finds none: say that it expired (the token only decides the message).
        if let Ok(t) = import::ImportToken::parse(token)
            && t.key_id == c.id
            && t.expires <= now
        {
            return Err(import::ImportError::TokenExpired {
                key_id: c.id.clone(),
                expired: crate::time::iso_utc(t.expires),
            }
            .into());
        }
        return Err(import::ImportError::NoPendingImport(c.id.clone()).into());
    };
    let material = pending.unwrap_material(&c.id, token, wrapped_material, now)?;
    let fp = import::fingerprint(&c.id, &material);
    if let Some(old) = &c.fingerprint
        && !crypto::ct_eq(old, &fp)
    {
        return Err(refuse(format!(
            "this is not the material key {} was first given: a key only ever takes the same material again (volumes wrapped under it depend on it); for new material create a new key with `kmsfs key create --origin external`",
            c.id
        )));
    }
    c.fingerprint = Some(fp);
    if c.versions.is_empty() {
        c.versions.push(CmkVersion {
            version: 1,
            created: now,
            material: None,
        });
    }
    for v in &mut c.versions {
        v.material = Some(material.duplicate());
    }
    c.material_expires = expires.unwrap_or(0);
    c.pending_import = None;
    if c.state == KeyState::PendingImport {
        c.state = KeyState::Enabled;
    }
    touched.version = c.primary().map_or(0, |v| v.version);
    let c = state.resolve(Some(name))?;
    Ok(c.info(&state.volumes))
}
