//! The KMS daemon's access policy: which principals (uid, gid, user or group names) may
//! use which keys (ids or aliases, `*`, prefix wildcards `backup-*`) for which operations.
//! The format is documented with an example in `docs/KMS-DAEMON.md` and
//! `packaging/kms-policy.example.toml`.
//!
//! Rules only grant: a request is allowed when any rule grants it (the union of the
//! rules; their order does not matter), and refused otherwise. Without a policy file
//! only root (uid 0) may do anything.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// An operation class a rule grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operation {
    /// GenerateDataKey (volume init).
    Generate,
    /// Decrypt (mount).
    Decrypt,
    /// ReEncrypt (rewrap).
    ReEncrypt,
    /// Key metadata (`key list`, `key describe`).
    Describe,
    /// Key administration: create, enable/disable/rotate/deletion, BYOK import, and
    /// reading the audit log.
    Admin,
}

impl Operation {
    const ALL: [Operation; 5] = [
        Self::Generate,
        Self::Decrypt,
        Self::ReEncrypt,
        Self::Describe,
        Self::Admin,
    ];

    /// The name in a policy file and in messages.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Generate => "generate",
            Self::Decrypt => "decrypt",
            Self::ReEncrypt => "re-encrypt",
            Self::Describe => "describe",
            Self::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Vec<Self>> {
        if s == "*" || s == "all" {
            return Some(Self::ALL.to_vec());
        }
        Self::ALL
            .iter()
            .copied()
            .find(|o| o.name() == s)
            .map(|o| vec![o])
    }
}

/// Who asks, as the kernel says (SO_PEERCRED, SO_PEERGROUPS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Supplementary groups (empty when the kernel cannot say).
    pub groups: Vec<u32>,
}

/// A key as a rule sees it: its id and alias (a pattern matches either).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyName {
    /// `cmk-…`, or the name as the request gave it when the key is unknown.
    pub id: String,
    /// The alias, if any.
    pub alias: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(Self::Any);
        }
        if let Some(p) = s.strip_suffix('*') {
            if p.contains('*') {
                return Err(format!("key pattern {s:?}: only a trailing `*` is allowed"));
            }
            return Ok(Self::Prefix(p.to_owned()));
        }
        if s.is_empty() || s.contains('*') {
            return Err(format!(
                "key pattern {s:?}: give an id, an alias, `*` or a prefix ending in `*`"
            ));
        }
        Ok(Self::Exact(s.to_owned()))
    }

    fn matches_str(&self, s: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(e) => e == s,
            Self::Prefix(p) => s.starts_with(p.as_str()),
        }
    }

    fn matches(&self, k: &KeyName) -> bool {
        self.matches_str(&k.id) || k.alias.as_deref().is_some_and(|a| self.matches_str(a))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    uids: BTreeSet<u32>,
    gids: BTreeSet<u32>,
    keys: Vec<Pattern>,
    ops: BTreeSet<Operation>,
}

impl Rule {
    fn admits(&self, p: &Principal) -> bool {
        self.uids.contains(&p.uid)
            || self.gids.contains(&p.gid)
            || p.groups.iter().any(|g| self.gids.contains(g))
    }
}

/// Socket ownership the policy asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SocketSpec {
    /// Permission bits.
    pub mode: Option<u32>,
    /// Group owner.
    pub gid: Option<u32>,
}

/// A loaded policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
    /// The file it came from; `None` for the default (root only).
    pub source: Option<PathBuf>,
    /// `[socket]` settings.
    pub socket: SocketSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileForm {
    version: Option<u32>,
    socket: Option<SocketForm>,
    #[serde(default)]
    rule: Vec<RuleForm>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SocketForm {
    mode: Option<String>,
    group: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleForm {
    #[serde(default)]
    description: String,
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    gids: Vec<u32>,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    keys: Vec<String>,
    operations: Vec<String>,
}

fn resolve_group(v: &str) -> Result<u32, String> {
    if let Ok(n) = v.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(v) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!("no group named {v:?} on this system")),
        Err(e) => Err(format!("cannot look up group {v:?}: {e}")),
    }
}

fn resolve_user(v: &str) -> Result<u32, String> {
    if let Ok(n) = v.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::User::from_name(v) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(format!("no user named {v:?} on this system")),
        Err(e) => Err(format!("cannot look up user {v:?}: {e}")),
    }
}

impl Policy {
    /// Without `--policy`: root may do everything, nobody else anything.
    #[must_use]
    pub fn root_only() -> Self {
        Self {
            rules: vec![Rule {
                uids: [0].into(),
                gids: BTreeSet::new(),
                keys: vec![Pattern::Any],
                ops: Operation::ALL.into_iter().collect(),
            }],
            source: None,
            socket: SocketSpec::default(),
        }
    }

    /// Reads a policy file.
    ///
    /// # Errors
    /// What is wrong, naming the file (and the rule).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("policy {}: {e}", path.display()))?;
        let mut p = Self::parse(&text).map_err(|e| format!("policy {}: {e}", path.display()))?;
        p.source = Some(path.to_path_buf());
        Ok(p)
    }

    /// Parses policy text (names are resolved now: a user or group that does not exist
    /// is an error, not a rule that silently never matches).
    ///
    /// # Errors
    /// What is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let f: FileForm = toml::from_str(text).map_err(|e| e.to_string().trim().to_owned())?;
        if let Some(v) = f.version
            && v != 1
        {
            return Err(format!(
                "version {v} is not supported; this kmsfs reads version 1"
            ));
        }
        let mut rules = Vec::new();
        for (i, r) in f.rule.iter().enumerate() {
            let at = |e: String| {
                if r.description.is_empty() {
                    format!("rule {}: {e}", i + 1)
                } else {
                    format!("rule {} ({}): {e}", i + 1, r.description)
                }
            };
            let mut uids: BTreeSet<u32> = r.uids.iter().copied().collect();
            for u in &r.users {
                uids.insert(resolve_user(u).map_err(at)?);
            }
            let mut gids: BTreeSet<u32> = r.gids.iter().copied().collect();
            for g in &r.groups {
                gids.insert(resolve_group(g).map_err(at)?);
            }
            if uids.is_empty() && gids.is_empty() {
                return Err(at("no principal: give uids, gids, users or groups".into()));
            }
            if r.keys.is_empty() {
                return Err(at(
                    "no keys: give ids, aliases, \"*\" or \"prefix-*\"".into()
                ));
            }
            let keys = r
                .keys
                .iter()
                .map(|k| Pattern::parse(k))
                .collect::<Result<Vec<_>, _>>()
                .map_err(at)?;
            let mut ops = BTreeSet::new();
            for o in &r.operations {
                ops.extend(Operation::parse(o).ok_or_else(|| {
                    at(format!(
                        "unknown operation {o:?}: use generate, decrypt, re-encrypt, describe, admin or \"*\""
                    ))
                })?);
            }
            if ops.is_empty() {
                return Err(at("no operations".into()));
            }
            rules.push(Rule {
                uids,
                gids,
                keys,
                ops,
            });
        }
        let mut socket = SocketSpec::default();
        if let Some(s) = f.socket {
            if let Some(m) = s.mode {
                let bits = u32::from_str_radix(m.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|b| *b <= 0o777)
                    .ok_or_else(|| {
                        format!("[socket] mode {m:?} is not an octal mode like \"0660\"")
                    })?;
                socket.mode = Some(bits);
            }
            if let Some(g) = s.group {
                socket.gid = Some(match g {
                    toml::Value::Integer(n) => {
                        u32::try_from(n).map_err(|_| format!("[socket] group {n} is not a gid"))?
                    }
                    toml::Value::String(s) => {
                        resolve_group(&s).map_err(|e| format!("[socket] {e}"))?
                    }
                    other => return Err(format!("[socket] group {other:?} is not a name or gid")),
                });
            }
        }
        Ok(Self {
            rules,
            source: None,
            socket,
        })
    }

    /// Whether `p` may do `op` on `key`.
    #[must_use]
    pub fn allows(&self, p: &Principal, op: Operation, key: &KeyName) -> bool {
        self.rules
            .iter()
            .any(|r| r.admits(p) && r.ops.contains(&op) && r.keys.iter().any(|k| k.matches(key)))
    }

    /// Whether `p` may do `op` on every key (a rule with the key pattern `*`): what
    /// reading the audit log and creating a key without an alias need.
    #[must_use]
    pub fn allows_any_key(&self, p: &Principal, op: Operation) -> bool {
        self.rules
            .iter()
            .any(|r| r.admits(p) && r.ops.contains(&op) && r.keys.contains(&Pattern::Any))
    }

    /// Whether `p` may do `op` on at least one key.
    #[must_use]
    pub fn allows_some_key(&self, p: &Principal, op: Operation) -> bool {
        self.rules
            .iter()
            .any(|r| r.admits(p) && r.ops.contains(&op))
    }

    /// Whether deciding `op` for `p` needs the key's id and alias (false when every rule
    /// that could grant it covers all keys, or none could).
    #[must_use]
    pub fn needs_key_names(&self, p: &Principal, op: Operation) -> bool {
        !self.allows_any_key(p, op) && self.allows_some_key(p, op)
    }

    /// Whether every principal of every rule is root (uid 0 only, no groups).
    #[must_use]
    pub fn root_only_principals(&self) -> bool {
        self.rules
            .iter()
            .all(|r| r.gids.is_empty() && r.uids.iter().all(|u| *u == 0))
    }

    /// The single group every non-root principal is named by, if that is how the policy
    /// names them (then the socket can be `0660` with that group).
    #[must_use]
    pub fn single_group(&self) -> Option<u32> {
        let mut group = None;
        for r in &self.rules {
            if r.uids.iter().any(|u| *u != 0) {
                return None;
            }
            for g in &r.gids {
                match group {
                    None => group = Some(*g),
                    Some(x) if x == *g => {}
                    Some(_) => return None,
                }
            }
        }
        group
    }

    /// `under policy FILE` or `under the default policy (root only)`, for messages.
    #[must_use]
    pub fn describe(&self) -> String {
        match &self.source {
            Some(p) => format!("under policy {}", p.display()),
            None => "under the default policy (root only; start the daemon with --policy FILE to allow others)".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(uid: u32, gid: u32) -> Principal {
        Principal {
            uid,
            gid,
            groups: vec![],
        }
    }

    fn key(id: &str, alias: Option<&str>) -> KeyName {
        KeyName {
            id: id.into(),
            alias: alias.map(str::to_owned),
        }
    }

    #[test]
    fn default_is_root_only() {
        let p = Policy::root_only();
        let k = key("cmk-1", None);
        assert!(p.allows(&who(0, 0), Operation::Admin, &k));
        assert!(!p.allows(&who(1000, 0), Operation::Decrypt, &k));
        assert!(p.root_only_principals());
    }

    #[test]
    fn rules_grant_by_uid_gid_key_pattern_and_operation() {
        let p = Policy::parse(
            r#"
version = 1
[[rule]]
uids = [0]
keys = ["*"]
operations = ["*"]

[[rule]]
description = "backups"
uids = [1000]
gids = [50]
keys = ["backup-*", "cmk-00000000000000aa"]
operations = ["generate", "decrypt", "describe"]
"#,
        )
        .unwrap();
        let b = key("cmk-1", Some("backup-db"));
        let other = key("cmk-2", Some("prod"));
        let by_id = key("cmk-00000000000000aa", None);
        assert!(p.allows(&who(1000, 1000), Operation::Decrypt, &b));
        assert!(p.allows(&who(1000, 1000), Operation::Decrypt, &by_id));
        assert!(!p.allows(&who(1000, 1000), Operation::Decrypt, &other));
        assert!(!p.allows(&who(1000, 1000), Operation::ReEncrypt, &b));
        assert!(!p.allows(&who(1000, 1000), Operation::Admin, &b));
        // By primary group, and by a supplementary group.
        assert!(p.allows(&who(7, 50), Operation::Generate, &b));
        let mut sup = who(7, 7);
        sup.groups = vec![3, 50];
        assert!(p.allows(&sup, Operation::Generate, &b));
        assert!(!p.allows(&who(7, 7), Operation::Generate, &b));
        assert!(p.needs_key_names(&who(1000, 1), Operation::Decrypt));
        assert!(!p.needs_key_names(&who(0, 0), Operation::Decrypt));
        assert!(!p.root_only_principals());
        assert_eq!(p.single_group(), None);
    }

    #[test]
    fn names_resolve_and_mistakes_are_named() {
        let p = Policy::parse(
            "[[rule]]\nusers = [\"root\"]\ngroups = [\"root\"]\nkeys = [\"*\"]\noperations = [\"admin\"]\n[socket]\nmode = \"0660\"\ngroup = \"root\"\n",
        )
        .unwrap();
        assert!(p.allows(&who(0, 0), Operation::Admin, &key("x", None)));
        assert_eq!(p.socket.mode, Some(0o660));
        assert_eq!(p.socket.gid, Some(0));
        for (bad, says) in [
            (
                "[[rule]]\nusers=[\"no-such-user-kmsfs\"]\nkeys=[\"*\"]\noperations=[\"*\"]",
                "no user named",
            ),
            (
                "[[rule]]\nuids=[1]\nkeys=[\"a*b*\"]\noperations=[\"*\"]",
                "trailing",
            ),
            (
                "[[rule]]\nuids=[1]\nkeys=[\"a*b\"]\noperations=[\"*\"]",
                "prefix ending in",
            ),
            (
                "[[rule]]\nuids=[1]\nkeys=[\"*\"]\noperations=[\"encrypt\"]",
                "unknown operation",
            ),
            ("[[rule]]\nkeys=[\"*\"]\noperations=[\"*\"]", "no principal"),
            (
                "[[rule]]\nuids=[1]\nkeys=[\"*\"]\noperations=[\"*\"]\nextra=1",
                "unknown field",
            ),
            ("version = 2", "version 2"),
        ] {
            let e = Policy::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
