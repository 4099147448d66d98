//! The whole-chain check of the audit log ([`AuditLog::verify`]) and the messages that
//! name a bad record (also used by the tail check of an append).

use std::io::BufReader;

use super::log::ReadAt;
use super::record::{
    Forward, MAC_LEN, TRAILER_LEN, chain_start, chain_unauthenticated, record_mac,
};
use super::{Anchor, AuditError, AuditLog, AuditRecord, VerifyReport};
use crate::crypto::{SecretKey, ct_eq};

impl AuditLog {
    /// Checks the whole chain under `key`, the sequence numbers, and the anchor (record
    /// `#anchor.count` exists, is authenticated and its MAC is `anchor.mac`). A missing
    /// file with an empty anchor is a valid empty log.
    ///
    /// # Errors
    /// [`AuditError::Tampered`] naming the first bad record (a changed, removed, inserted
    /// or reordered record, a cut-off tail, another keystore's log),
    /// [`AuditError::Malformed`] for unreadable bytes after the anchor (e.g. a torn last
    /// record), [`AuditError::UnsupportedVersion`], [`AuditError::Io`].
    pub fn verify(&self, key: &SecretKey, anchor: &Anchor) -> Result<VerifyReport, AuditError> {
        let missing = |what: &str| {
            if anchor.count == 0 {
                Ok(VerifyReport::default())
            } else {
                Err(self.tampered(
                    1,
                    format!(
                        "the file {what}, but the keystore anchors {} records",
                        anchor.count
                    ),
                ))
            }
        };
        let Some(file) = self.open_read()? else {
            return missing("is missing");
        };
        let mut r = BufReader::new(ReadAt::new(&file, 0));
        let Some(header) = self.read_header(&mut r)? else {
            return missing("is empty");
        };
        let mut chain = chain_start(key, &header);
        let mut fw = Forward::new(r);
        let mut report = VerifyReport::default();
        let mut anchored = anchor.count == 0;
        let mut uncovered_from: Option<u64> = None;
        let mut last: Option<AuditRecord> = None;
        while let Some(raw) = fw
            .next_frame()
            .map_err(|e| self.scan_error(e, anchor.count))?
        {
            let i = raw.frame.index;
            report.records += 1;
            if let Some(mac) = raw.frame.mac {
                let prefix = &raw.bytes[..raw.bytes.len() - TRAILER_LEN - MAC_LEN];
                if !ct_eq(&record_mac(key, &chain, prefix), &mac) {
                    return Err(
                        self.tampered(i, bad_mac_detail(i, &raw.frame.record, uncovered_from))
                    );
                }
                chain = mac;
                report.authenticated += 1;
                report.tail_anchor = Anchor { count: i, mac };
                uncovered_from = None;
                if i == anchor.count {
                    if !ct_eq(&mac, &anchor.mac) {
                        return Err(self.tampered(i, not_anchored_detail(i, &raw.frame.record)));
                    }
                    anchored = true;
                }
            } else {
                if i == anchor.count {
                    return Err(self.tampered(
                        i,
                        format!(
                            "record #{i} ({}) is the one the keystore anchors but carries no MAC",
                            raw.frame.record.describe()
                        ),
                    ));
                }
                chain = chain_unauthenticated(key, &chain, &raw.bytes);
                uncovered_from.get_or_insert(i);
            }
            last = Some(raw.frame.record);
        }
        if !anchored {
            return Err(self.tampered(
                report.records + 1,
                cut_off_detail(report.records, last.as_ref(), anchor.count),
            ));
        }
        report.unanchored_tail = report.records - anchor.count;
        report.uncovered_tail = uncovered_from.map_or(0, |f| report.records + 1 - f);
        Ok(report)
    }
}

// ----- error details -----

pub(super) fn bad_mac_detail(i: u64, rec: &AuditRecord, uncovered_from: Option<u64>) -> String {
    let covers = match uncovered_from {
        Some(f) if f + 1 == i => format!(", or the unauthenticated record #{f} before it,"),
        Some(f) => format!(
            ", or one of the unauthenticated records #{f}-#{} before it,",
            i - 1
        ),
        None => String::new(),
    };
    format!(
        "the MAC of record #{i} ({}) does not match: it{covers} was changed, or the log was written under another keystore's audit key",
        rec.describe()
    )
}

pub(super) fn not_anchored_detail(i: u64, rec: &AuditRecord) -> String {
    format!(
        "record #{i} ({}) is not the record the keystore anchored: the log was replaced or rewritten",
        rec.describe()
    )
}

pub(super) fn sequence_detail(position: u64, found: u64, rec: &AuditRecord) -> String {
    format!(
        "the record at position #{position} ({}) carries sequence number {found}: records were removed, inserted or reordered",
        rec.describe()
    )
}

pub(super) fn cut_off_detail(records: u64, last: Option<&AuditRecord>, anchored: u64) -> String {
    let ends = match last {
        Some(r) if records > 0 => format!("ends after record #{records} ({})", r.describe()),
        _ => "holds no records".to_owned(),
    };
    format!(
        "the log {ends}, but the keystore anchors {anchored} records: records #{}-#{anchored} were cut off",
        records + 1
    )
}
