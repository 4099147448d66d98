//! Times as people read and write them: ISO 8601 in UTC (via `jiff`).
//!
//! Stored times are unix seconds (u64, little-endian on disk); everything a person reads
//! prints them with [`iso_utc`], and every option that takes a time parses it with
//! [`parse_time`].

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in unix seconds (0 if the clock is before 1970). This is the KMS's clock: key
/// deletion dates, imported material expiry and import token validity are measured
/// against it.
#[must_use]
pub fn now_unix() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    #[cfg(feature = "test-hooks")]
    let now = shifted(
        now,
        std::env::var("KMSFS_TEST_CLOCK_OFFSET_SECS")
            .ok()
            .as_deref(),
    );
    now
}

/// Test builds only: `KMSFS_TEST_CLOCK_OFFSET_SECS=N` (signed seconds) moves the clock
/// by N, so that tests can pass a key's deletion date or an import token's expiry
/// without waiting days. A release build has no such variable.
#[cfg(feature = "test-hooks")]
fn shifted(now: u64, offset: Option<&str>) -> u64 {
    match offset.and_then(|o| o.trim().parse::<i64>().ok()) {
        Some(off) => now.saturating_add_signed(off),
        None => now,
    }
}

/// `secs` (unix seconds) as ISO 8601 UTC, e.g. `2026-12-01T16:53:30Z`. A value beyond
/// the year 9999 prints as `unix time N`.
#[must_use]
pub fn iso_utc(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map_or_else(
            || format!("unix time {secs}"),
            |t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        )
}

/// Parses a time given by a person: ISO 8601 / RFC 3339 with an offset
/// (`2026-12-01T10:00:00Z`, `2026-12-01T11:00:00+01:00`), a date (`2026-12-01`, midnight
/// UTC), a civil date-time without offset (taken as UTC), `@SECONDS` (unix time), or a
/// span from now (`+30d`, `+12h`, `+90m`, `-1d`). Returns unix seconds.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let bad = || {
        format!(
            "cannot read the time {s:?}: give ISO 8601 UTC like 2026-12-01T10:00:00Z, a date like 2026-12-01, @UNIXSECONDS, or a span from now like +30d / +12h / -90m"
        )
    };
    if let Some(rest) = s.strip_prefix('@') {
        return rest.parse::<u64>().map_err(|_| bad());
    }
    if let Some(sign @ ('+' | '-')) = s.chars().next() {
        let body = &s[1..];
        let unit = body.chars().last().ok_or_else(bad)?;
        let n: u64 = body[..body.len() - unit.len_utf8()]
            .parse()
            .map_err(|_| bad())?;
        let mult = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(bad()),
        };
        let delta = n.checked_mul(mult).ok_or_else(bad)?;
        let now = now_unix();
        return if sign == '+' {
            now.checked_add(delta).ok_or_else(bad)
        } else {
            Ok(now.saturating_sub(delta))
        };
    }
    let secs = if let Ok(ts) = s.parse::<jiff::Timestamp>() {
        ts.as_second()
    } else if let Ok(dt) = s.parse::<jiff::civil::DateTime>() {
        jiff::tz::TimeZone::UTC
            .to_timestamp(dt)
            .map_err(|_| bad())?
            .as_second()
    } else if let Ok(d) = s.parse::<jiff::civil::Date>() {
        jiff::tz::TimeZone::UTC
            .to_timestamp(d.to_datetime(jiff::civil::Time::midnight()))
            .map_err(|_| bad())?
            .as_second()
    } else {
        return Err(bad());
    };
    u64::try_from(secs).map_err(|_| format!("the time {s:?} is before 1970"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_roundtrip() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_utc(1_796_131_565), "2026-12-01T13:26:05Z");
        assert_eq!(parse_time("2026-12-01T13:26:05Z"), Ok(1_796_131_565));
        assert_eq!(parse_time("2026-12-01T14:26:05+01:00"), Ok(1_796_131_565));
        assert_eq!(parse_time("2026-12-01T13:26:05"), Ok(1_796_131_565));
        assert_eq!(parse_time("2026-12-01"), Ok(1_796_083_200));
        assert_eq!(parse_time("@42"), Ok(42));
        assert!(iso_utc(u64::MAX).starts_with("unix time"));
    }

    #[test]
    fn spans_and_errors() {
        let now = now_unix();
        let t = parse_time("+1d").unwrap();
        assert!(t >= now + 86_400 && t <= now + 86_400 + 5);
        assert!(parse_time("-1h").unwrap() <= now - 3600 + 5);
        for bad in [
            "",
            "+",
            "+1y",
            "tomorrow",
            "1969-12-31",
            "2026-13-01",
            "+99999999999999999w",
        ] {
            let e = parse_time(bad).unwrap_err();
            assert!(
                e.contains("cannot read") || e.contains("before 1970"),
                "{bad}: {e}"
            );
        }
    }
}
