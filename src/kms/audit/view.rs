//! What `kmsfs audit` shows: the record filter, the human table and the JSON view.

use super::{AuditOp, AuditRecord, StoredRecord};

/// Which records `kmsfs audit` shows. Every `Some` must match; bounds are inclusive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Key id (exact).
    pub key: Option<String>,
    /// Volume id.
    pub volume: Option<[u8; 16]>,
    /// Earliest time, unix milliseconds, inclusive.
    pub since_ms: Option<u64>,
    /// Latest time, unix milliseconds, inclusive.
    pub until_ms: Option<u64>,
    /// Operation.
    pub op: Option<AuditOp>,
}

impl AuditFilter {
    /// Whether `r` passes every filter that is set.
    #[must_use]
    pub fn matches(&self, r: &AuditRecord) -> bool {
        self.key.as_deref().is_none_or(|k| r.key_id == k)
            && self.volume.is_none_or(|v| r.volume_id == Some(v))
            && self.since_ms.is_none_or(|t| r.time_ms >= t)
            && self.until_ms.is_none_or(|t| r.time_ms <= t)
            && self.op.is_none_or(|op| r.op == op)
    }
}

/// A human table: `#`, TIME (ISO 8601 UTC with milliseconds), OP, KEY (`id:version`, `-`),
/// VOLUME (hex, `-`), UID, PID, COMMAND, RESULT (`ok` or `refused: reason`). Control
/// characters in strings are escaped, so a record cannot move the terminal's cursor.
#[must_use]
pub fn format_table(records: &[StoredRecord]) -> String {
    const HEAD: [&str; 9] = [
        "#", "TIME", "OP", "KEY", "VOLUME", "UID", "PID", "COMMAND", "RESULT",
    ];
    let rows: Vec<[String; 9]> = records
        .iter()
        .map(|s| {
            let r = &s.record;
            let key = match (r.key_id.as_str(), r.key_version) {
                ("", _) => "-".to_owned(),
                (id, 0) => printable(id),
                (id, v) => format!("{}:{v}", printable(id)),
            };
            let result = if r.ok {
                "ok".to_owned()
            } else if r.reason.is_empty() {
                "refused".to_owned()
            } else {
                format!("refused: {}", printable(&r.reason))
            };
            [
                s.index.to_string(),
                iso_utc_ms(r.time_ms),
                r.op.name().to_owned(),
                key,
                r.volume_id.map_or_else(|| "-".to_owned(), |v| hex(&v)),
                r.caller.uid.to_string(),
                r.caller.pid.to_string(),
                printable(&r.caller.command),
                result,
            ]
        })
        .collect();
    let mut width = HEAD.map(str::len);
    for row in &rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(cell);
                let pad = width[i] - cell.chars().count() + 2;
                l.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&HEAD);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells);
    }
    out
}

/// One record as JSON: `index`, `time` (ISO 8601 UTC with milliseconds), `op`, `key_id`,
/// `key_version`, `volume_id` (hex or null), `uid`, `pid`, `command`, `result` (`"ok"` or
/// `"refused"`), `reason`, `authenticated`.
#[must_use]
pub fn to_json(r: &StoredRecord) -> serde_json::Value {
    let rec = &r.record;
    serde_json::json!({
        "index": r.index,
        "time": iso_utc_ms(rec.time_ms),
        "op": rec.op.name(),
        "key_id": rec.key_id,
        "key_version": rec.key_version,
        "volume_id": rec.volume_id.map(|v| hex(&v)),
        "uid": rec.caller.uid,
        "pid": rec.caller.pid,
        "command": rec.caller.command,
        "result": if rec.ok { "ok" } else { "refused" },
        "reason": rec.reason,
        "authenticated": r.authenticated,
    })
}

/// Unix milliseconds as ISO 8601 UTC with milliseconds: `2026-12-01T16:53:30.123Z`.
#[must_use]
pub fn iso_utc_ms(ms: u64) -> String {
    let s = crate::time::iso_utc(ms / 1000);
    match s.strip_suffix('Z') {
        Some(base) => format!("{base}.{:03}Z", ms % 1000),
        None => s,
    }
}

/// `s` with control characters escaped (`\n`, `\u{1b}`).
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

pub(super) fn hex(bytes: &[u8]) -> String {
    use core::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
