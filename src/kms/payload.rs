//! The keystore's decrypted contents ([`State`]) and their hand-encoded payload, format
//! versions 1 and 2 (`docs/KEYSTORE-FORMAT.md`). Decoding is strict: every count is
//! bounded by the bytes that remain, unknown values and trailing bytes are refused, and no
//! input panics.

use std::collections::BTreeMap;

use zeroize::Zeroizing;

use super::audit::Anchor;
use super::cmk::{Cmk, CmkVersion};
use super::import::PendingImport;
use super::{KeyKind, KeyOrigin, KeyState, KmsError, hex};
use crate::crypto::{self, KEY_LEN, SecretKey};

pub(super) const MAX_ID_LEN: usize = 64;
pub(super) const MAX_ALIAS_LEN: usize = 64;
pub(super) const MAX_DESCRIPTION_LEN: usize = 1024;
/// Longest volume path recorded for `key describe`.
pub(super) const MAX_PATH_LEN: usize = 4096;
/// Encoded size of one v1 CMK version: version u32, created u64, material.
const V1_VERSION_LEN: usize = 4 + 8 + KEY_LEN;
/// Smallest encoded v2 CMK version: version u32, created u64, has-material u8.
const V2_MIN_VERSION_LEN: usize = 4 + 8 + 1;
/// Encoded size of one generation mark: volume id, generation u64.
const MARK_RECORD_LEN: usize = 16 + 8;
/// Smallest v1 CMK record (empty strings, one version).
const V1_MIN_CMK_LEN: usize = 1 + 1 + 2 + 8 + 1 + 1 + 1 + 8 + 4 + V1_VERSION_LEN;
/// Smallest v2 CMK record (empty strings, no version, nothing optional).
const V2_MIN_CMK_LEN: usize = 1 + 1 + 2 + 8 + 1 + 1 + 1 + 8 + 8 + 1 + 1 + 4;
/// Smallest volume binding: id, id length, path length, updated.
const MIN_BINDING_LEN: usize = 16 + 1 + 2 + 8;

/// Where a volume was last seen, and under which key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Binding {
    pub cmk_id: String,
    pub path: String,
    pub updated: u64,
}

/// The decrypted contents of the keystore.
pub(super) struct State {
    pub cmks: Vec<Cmk>,
    pub marks: BTreeMap<[u8; 16], u64>,
    pub volumes: BTreeMap<[u8; 16], Binding>,
    /// HMAC key of the audit chain (random, made with the keystore).
    pub audit_key: SecretKey,
    /// Count and MAC of the last authenticated audit record.
    pub anchor: Anchor,
}

impl State {
    /// An empty state with a fresh audit key.
    pub fn new() -> Self {
        Self {
            cmks: Vec::new(),
            marks: BTreeMap::new(),
            volumes: BTreeMap::new(),
            audit_key: SecretKey::random(),
            anchor: Anchor::default(),
        }
    }

    pub fn service(&self) -> &Cmk {
        self.cmks
            .iter()
            .find(|c| c.kind == KeyKind::Service)
            .expect("a keystore always has a service key (checked when decoding)")
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.cmks
            .iter()
            .position(|c| c.id == name || c.alias.as_deref() == Some(name))
    }

    /// By id or alias; `None` = the service key.
    pub fn resolve(&self, name: Option<&str>) -> Result<&Cmk, KmsError> {
        match name {
            None => Ok(self.service()),
            Some(n) => self
                .position(n)
                .map(|i| &self.cmks[i])
                .ok_or_else(|| KmsError::KeyNotFound(n.to_owned())),
        }
    }

    /// By id or alias, for a change.
    pub fn resolve_mut(&mut self, name: &str) -> Result<&mut Cmk, KmsError> {
        match self.position(name) {
            Some(i) => Ok(&mut self.cmks[i]),
            None => Err(KmsError::KeyNotFound(name.to_owned())),
        }
    }

    pub fn by_id(&self, id: &str) -> Result<&Cmk, KmsError> {
        self.cmks
            .iter()
            .find(|c| c.id == id)
            .ok_or_else(|| KmsError::KeyNotFound(id.to_owned()))
    }

    pub fn new_id(&self) -> String {
        loop {
            let id = format!("cmk-{}", hex(&crypto::random_array::<8>()));
            if !self.cmks.iter().any(|c| c.id == id) {
                return id;
            }
        }
    }

    /// The format-2 payload, in a buffer zeroized on drop.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(4096));
        let o = &mut *out;
        o.extend_from_slice(&count_u32(self.cmks.len()).to_le_bytes());
        for c in &self.cmks {
            encode_cmk(c, o);
        }
        o.extend_from_slice(&count_u32(self.marks.len()).to_le_bytes());
        for (id, generation) in &self.marks {
            o.extend_from_slice(id);
            o.extend_from_slice(&generation.to_le_bytes());
        }
        o.extend_from_slice(&count_u32(self.volumes.len()).to_le_bytes());
        for (id, b) in &self.volumes {
            o.extend_from_slice(id);
            o.push(len8(&b.cmk_id));
            o.extend_from_slice(b.cmk_id.as_bytes());
            let path_len = u16::try_from(b.path.len()).expect("paths are at most 4096 bytes");
            o.extend_from_slice(&path_len.to_le_bytes());
            o.extend_from_slice(b.path.as_bytes());
            o.extend_from_slice(&b.updated.to_le_bytes());
        }
        o.extend_from_slice(self.audit_key.expose());
        o.extend_from_slice(&self.anchor.count.to_le_bytes());
        o.extend_from_slice(&self.anchor.mac);
        out
    }

    /// Decodes a payload of keystore format `version` (1 or 2).
    pub fn decode(payload: &[u8], version: u16) -> Result<Self, String> {
        let mut r = Reader {
            buf: payload,
            pos: 0,
        };
        let min = if version == 1 {
            V1_MIN_CMK_LEN
        } else {
            V2_MIN_CMK_LEN
        };
        let cmk_count = r.count("CMK count", min)?;
        let mut state = State::new();
        for i in 0..cmk_count {
            let cmk = if version == 1 {
                decode_cmk_v1(&mut r)
            } else {
                decode_cmk_v2(&mut r)
            }
            .map_err(|e| format!("CMK record {i}: {e}"))?;
            if state.cmks.iter().any(|c| c.id == cmk.id) {
                return Err(format!("CMK id {} appears twice", cmk.id));
            }
            if let Some(a) = &cmk.alias
                && state.cmks.iter().any(|c| c.alias.as_ref() == Some(a))
            {
                return Err(format!("alias {a} appears twice"));
            }
            state.cmks.push(cmk);
        }
        let services: Vec<&Cmk> = state
            .cmks
            .iter()
            .filter(|c| c.kind == KeyKind::Service)
            .collect();
        match services.as_slice() {
            [s] if s.state == KeyState::Enabled && s.origin == KeyOrigin::Generated => {}
            [s] => {
                return Err(format!(
                    "the service key {} is not an enabled, generated key",
                    s.id
                ));
            }
            _ => {
                return Err(format!(
                    "{} service keys instead of exactly one",
                    services.len()
                ));
            }
        }
        let mark_count = r.count("generation mark count", MARK_RECORD_LEN)?;
        for _ in 0..mark_count {
            let id: [u8; 16] = r.array("volume id")?;
            let generation = r.u64("generation")?;
            if let Some((last, _)) = state.marks.last_key_value()
                && *last >= id
            {
                return Err("generation marks are not sorted by volume id".into());
            }
            state.marks.insert(id, generation);
        }
        if version >= 2 {
            let n = r.count("volume binding count", MIN_BINDING_LEN)?;
            for _ in 0..n {
                let id: [u8; 16] = r.array("bound volume id")?;
                let id_len = usize::from(r.u8("bound key id length")?);
                let cmk_id = r.string(id_len, "bound key id")?;
                validate_id(&cmk_id)?;
                let path_len = usize::from(r.u16("volume path length")?);
                if path_len > MAX_PATH_LEN {
                    return Err(format!("volume path of {path_len} bytes is too long"));
                }
                let path = r.string(path_len, "volume path")?;
                let updated = r.u64("volume binding time")?;
                if let Some((last, _)) = state.volumes.last_key_value()
                    && *last >= id
                {
                    return Err("volume bindings are not sorted by volume id".into());
                }
                state.volumes.insert(
                    id,
                    Binding {
                        cmk_id,
                        path,
                        updated,
                    },
                );
            }
            state.audit_key = SecretKey::from_bytes(r.array("audit key")?);
            state.anchor = Anchor {
                count: r.u64("audit record count")?,
                mac: r.array("audit anchor MAC")?,
            };
        }
        if r.pos != payload.len() {
            return Err(format!(
                "{} unexpected bytes after the payload",
                payload.len() - r.pos
            ));
        }
        Ok(state)
    }
}

fn len8(s: &str) -> u8 {
    u8::try_from(s.len()).expect("ids and aliases are at most 64 bytes")
}

fn encode_cmk(c: &Cmk, o: &mut Vec<u8>) {
    o.push(len8(&c.id));
    o.extend_from_slice(c.id.as_bytes());
    let alias = c.alias.as_deref().unwrap_or("");
    o.push(len8(alias));
    o.extend_from_slice(alias.as_bytes());
    let desc_len = u16::try_from(c.description.len()).expect("descriptions are at most 1024 bytes");
    o.extend_from_slice(&desc_len.to_le_bytes());
    o.extend_from_slice(c.description.as_bytes());
    o.extend_from_slice(&c.created.to_le_bytes());
    o.push(c.kind as u8);
    o.push(c.origin as u8);
    o.push(c.state as u8);
    o.extend_from_slice(&c.deletion_date.to_le_bytes());
    o.extend_from_slice(&c.material_expires.to_le_bytes());
    match &c.fingerprint {
        Some(fp) => {
            o.push(1);
            o.extend_from_slice(fp);
        }
        None => o.push(0),
    }
    match &c.pending_import {
        Some(p) => {
            o.push(1);
            p.encode(o);
        }
        None => o.push(0),
    }
    o.extend_from_slice(&count_u32(c.versions.len()).to_le_bytes());
    for v in &c.versions {
        o.extend_from_slice(&v.version.to_le_bytes());
        o.extend_from_slice(&v.created.to_le_bytes());
        match &v.material {
            Some(m) => {
                o.push(1);
                o.extend_from_slice(m.expose());
            }
            None => o.push(0),
        }
    }
}

/// The fields both versions share, up to the deletion date.
struct Common {
    id: String,
    alias: Option<String>,
    description: String,
    created: u64,
    kind: KeyKind,
    origin: KeyOrigin,
    state: KeyState,
    deletion_date: u64,
}

fn decode_common(r: &mut Reader<'_>) -> Result<Common, String> {
    let id_len = usize::from(r.u8("id length")?);
    let id = r.string(id_len, "id")?;
    validate_id(&id)?;
    let alias_len = usize::from(r.u8("alias length")?);
    let alias = if alias_len == 0 {
        None
    } else {
        let a = r.string(alias_len, "alias")?;
        validate_alias(&a)?;
        Some(a)
    };
    let desc_len = usize::from(r.u16("description length")?);
    if desc_len > MAX_DESCRIPTION_LEN {
        return Err(format!("description of {desc_len} bytes is too long"));
    }
    let description = r.string(desc_len, "description")?;
    let created = r.u64("creation time")?;
    let kind = r.u8("kind")?;
    let kind = KeyKind::from_u8(kind).ok_or_else(|| format!("unknown kind {kind}"))?;
    let origin = r.u8("origin")?;
    let origin = KeyOrigin::from_u8(origin).ok_or_else(|| format!("unknown origin {origin}"))?;
    let state = r.u8("state")?;
    let state = KeyState::from_u8(state).ok_or_else(|| format!("unknown state {state}"))?;
    let deletion_date = r.u64("deletion date")?;
    Ok(Common {
        id,
        alias,
        description,
        created,
        kind,
        origin,
        state,
        deletion_date,
    })
}

fn decode_cmk_v1(r: &mut Reader<'_>) -> Result<Cmk, String> {
    let c = decode_common(r)?;
    if !matches!(
        c.state,
        KeyState::Enabled | KeyState::Disabled | KeyState::PendingDeletion
    ) {
        return Err(format!("unknown state {}", c.state as u8));
    }
    let version_count = r.count("version count", V1_VERSION_LEN)?;
    if version_count == 0 {
        return Err(format!("key {} has no versions", c.id));
    }
    let mut versions = Vec::with_capacity(version_count);
    for _ in 0..version_count {
        let version = r.u32("version")?;
        let created = r.u64("version creation time")?;
        let material = SecretKey::from_bytes(r.array("key material")?);
        versions.push(CmkVersion {
            version,
            created,
            material: Some(material),
        });
    }
    finish(c, 0, None, None, versions)
}

fn decode_cmk_v2(r: &mut Reader<'_>) -> Result<Cmk, String> {
    let c = decode_common(r)?;
    let material_expires = r.u64("material expiry")?;
    let fingerprint = match r.u8("fingerprint flag")? {
        0 => None,
        1 => Some(r.array::<32>("material fingerprint")?),
        f => return Err(format!("fingerprint flag {f}")),
    };
    let pending = match r.u8("import flag")? {
        0 => None,
        1 => {
            let (p, used) =
                PendingImport::decode(r.rest()).map_err(|e| format!("pending import: {e}"))?;
            r.take(used, "pending import")?;
            Some(p)
        }
        f => return Err(format!("import flag {f}")),
    };
    let version_count = r.count("version count", V2_MIN_VERSION_LEN)?;
    let mut versions = Vec::with_capacity(version_count);
    for _ in 0..version_count {
        let version = r.u32("version")?;
        let created = r.u64("version creation time")?;
        let material = match r.u8("material flag")? {
            0 => None,
            1 => Some(SecretKey::from_bytes(r.array("key material")?)),
            f => return Err(format!("material flag {f}")),
        };
        versions.push(CmkVersion {
            version,
            created,
            material,
        });
    }
    finish(c, material_expires, fingerprint, pending, versions)
}

/// Checks the record's invariants (docs/KEYSTORE-FORMAT.md, "CMK record rules").
fn finish(
    c: Common,
    material_expires: u64,
    fingerprint: Option<[u8; 32]>,
    pending_import: Option<PendingImport>,
    versions: Vec<CmkVersion>,
) -> Result<Cmk, String> {
    let id = &c.id;
    let mut last = 0;
    for v in &versions {
        if v.version <= last {
            return Err(format!(
                "key {id}: versions are not strictly increasing from 1"
            ));
        }
        last = v.version;
    }
    let with_material = versions.iter().filter(|v| v.material.is_some()).count();
    let newest_has = versions.last().is_some_and(|v| v.material.is_some());
    let ok = match c.state {
        KeyState::Enabled | KeyState::Disabled => newest_has,
        KeyState::PendingDeletion => c.deletion_date != 0,
        KeyState::PendingImport => c.origin == KeyOrigin::Imported && with_material == 0,
        KeyState::Deleted => with_material == 0,
    };
    if !ok {
        return Err(format!(
            "key {id}: state {} does not match its {with_material} of {} versions with material",
            c.state.name(),
            versions.len()
        ));
    }
    if (c.state == KeyState::PendingDeletion) != (c.deletion_date != 0)
        && c.state != KeyState::Deleted
    {
        return Err(format!(
            "key {id}: deletion date {} does not match state {}",
            c.deletion_date,
            c.state.name()
        ));
    }
    if c.origin == KeyOrigin::Generated && (pending_import.is_some() || fingerprint.is_some()) {
        return Err(format!(
            "key {id}: import data on a key not of external origin"
        ));
    }
    Ok(Cmk {
        id: c.id,
        alias: c.alias,
        description: c.description,
        created: c.created,
        kind: c.kind,
        origin: c.origin,
        state: c.state,
        deletion_date: c.deletion_date,
        material_expires,
        fingerprint,
        pending_import,
        versions,
    })
}

pub(super) fn validate_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid key id {id:?}"))
    }
}

pub(super) fn validate_alias(alias: &str) -> Result<(), String> {
    if alias.is_empty() || alias.len() > MAX_ALIAS_LEN {
        return Err(format!(
            "alias {alias:?} must be 1 to {MAX_ALIAS_LEN} bytes"
        ));
    }
    if !alias
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    {
        return Err(format!(
            "alias {alias:?} may only contain letters, digits, '-', '_', '.' and '/'"
        ));
    }
    if alias.starts_with("cmk-") {
        return Err(format!(
            "alias {alias:?} must not start with \"cmk-\" (reserved for key ids)"
        ));
    }
    Ok(())
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).expect("fewer than 2^32 records")
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.buf.len() - self.pos < n {
            return Err(format!("payload ends inside the {what}"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A record count, bounded by what the remaining bytes can hold.
    fn count(&mut self, what: &str, min_record_len: usize) -> Result<usize, String> {
        let n = usize::try_from(self.u32(what)?).map_err(|_| format!("{what} too large"))?;
        if n > (self.buf.len() - self.pos) / min_record_len {
            return Err(format!("{what} {n} exceeds the payload size"));
        }
        Ok(n)
    }

    fn string(&mut self, n: usize, what: &str) -> Result<String, String> {
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("the {what} is not UTF-8"))
    }
}
