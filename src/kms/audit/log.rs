//! The audit log file: [`AuditLog`] appends (checking the tail against the keystore's anchor
//! and healing a record torn by a crash) and reads.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::record::{
    Forward, HEADER_LEN, MAC_LEN, MAGIC, MAX_FRAME_LEN, MIN_FRAME_LEN, ScanError, TRAILER_LEN,
    VERSION, chain_start, chain_unauthenticated, decode_frame, encode_frame, header_bytes,
    read_full, record_mac,
};
use super::verify::{bad_mac_detail, cut_off_detail, not_anchored_detail, sequence_detail};
use super::{Anchor, AuditError, AuditRecord, StoredRecord};
use crate::crypto::{SecretKey, ct_eq};

/// The audit log file. Appends assume the caller holds the keystore lock; each append also
/// takes an exclusive `flock` on the log (readers a shared one), so records never
/// interleave.
#[derive(Clone, Debug)]
pub struct AuditLog {
    path: PathBuf,
}

impl AuditLog {
    /// The log at `path` (usually the keystore path + `.audit`). Nothing is opened yet.
    #[must_use]
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// The log file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends an authenticated record chained from the log's current tail and returns the
    /// new anchor, which the caller stores in the keystore after this returns. The file is
    /// opened `O_APPEND | O_NOFOLLOW`, created with mode 0600 (only while `anchor` is empty),
    /// and fsync'ed (its directory too when the file was started).
    ///
    /// `anchor` is what the keystore holds now. The log may be ahead of it (a crash after
    /// an append but before the keystore stored its anchor, or unauthenticated records):
    /// those records are checked against the chain and covered. A log that is behind the
    /// anchor, or that diverges from it, is refused and nothing is appended. A record torn
    /// by a crash at the very end, after the anchored record, is removed first (logged as
    /// a warning). Cost: the anchored record, the one before it and those after it (read
    /// from the end of the file), not the whole log; [`AuditLog::verify`] checks the rest.
    ///
    /// # Errors
    /// [`AuditError::Tampered`] when behind or diverging, [`AuditError::Malformed`] for
    /// unreadable bytes that are not a torn tail, [`AuditError::Io`].
    pub fn append(
        &self,
        key: &SecretKey,
        anchor: &Anchor,
        rec: &AuditRecord,
    ) -> Result<Anchor, AuditError> {
        let Some(file) = self.open_append(anchor.count == 0)? else {
            return Err(self.tampered(
                1,
                format!(
                    "the file is missing, but the keystore anchors {} records",
                    anchor.count
                ),
            ));
        };
        let tail = self.prepare_tail(&file, Some((key, anchor)))?;
        let index = tail.next_index;
        let mut frame = encode_frame(rec, index, true);
        let mac_at = frame.len() - TRAILER_LEN - MAC_LEN;
        let mac = record_mac(key, &tail.chain_for(key), &frame[..mac_at]);
        frame[mac_at..mac_at + MAC_LEN].copy_from_slice(&mac);
        self.write_frame(&file, tail.len == 0, &frame)?;
        Ok(Anchor { count: index, mac })
    }

    /// Appends an unauthenticated record (no key available, e.g. a failed unlock). The next
    /// authenticated record's MAC covers it; until then [`AuditLog::verify`] reports it as
    /// not yet covered. Creates the file (mode 0600) if missing. A torn record at the very
    /// end is removed first.
    ///
    /// # Errors
    /// [`AuditError::Malformed`] when the tail does not parse, [`AuditError::Io`].
    pub fn append_unauthenticated(&self, rec: &AuditRecord) -> Result<(), AuditError> {
        let file = self
            .open_append(true)?
            .ok_or_else(|| self.io(io::Error::from(io::ErrorKind::NotFound)))?;
        let tail = self.prepare_tail(&file, None)?;
        let frame = encode_frame(rec, tail.next_index, false);
        self.write_frame(&file, tail.len == 0, &frame)
    }

    /// Every record, strictly parsed. A missing or empty file has none.
    ///
    /// # Errors
    /// [`AuditError::Malformed`] at the offset of the first record that does not parse
    /// (also a record torn by a crash), [`AuditError::Tampered`] when sequence numbers are
    /// out of order (records removed, inserted or reordered), [`AuditError::Io`].
    pub fn read_all(&self) -> Result<Vec<StoredRecord>, AuditError> {
        let Some(file) = self.open_read()? else {
            return Ok(Vec::new());
        };
        let mut r = BufReader::new(ReadAt::new(&file, 0));
        if self.read_header(&mut r)?.is_none() {
            return Ok(Vec::new());
        }
        let mut fw = Forward::new(r);
        let mut out = Vec::new();
        while let Some(raw) = fw.next_frame().map_err(|e| self.scan_error(e, 0))? {
            out.push(StoredRecord {
                index: raw.frame.index,
                record: raw.frame.record,
                authenticated: raw.frame.mac.is_some(),
            });
        }
        Ok(out)
    }

    /// Like [`AuditLog::read_all`], but keeps the records before the first problem: for
    /// listing a damaged log. Returns them and the error that stopped the reading, if any.
    #[must_use]
    pub fn read_prefix(&self) -> (Vec<StoredRecord>, Option<AuditError>) {
        let mut out = Vec::new();
        let file = match self.open_read() {
            Ok(Some(f)) => f,
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        };
        let mut r = BufReader::new(ReadAt::new(&file, 0));
        match self.read_header(&mut r) {
            Ok(Some(_)) => {}
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
        let mut fw = Forward::new(r);
        loop {
            match fw.next_frame() {
                Ok(Some(raw)) => out.push(StoredRecord {
                    index: raw.frame.index,
                    record: raw.frame.record,
                    authenticated: raw.frame.mac.is_some(),
                }),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(self.scan_error(e, 0))),
            }
        }
    }
    // ----- internals -----

    fn io(&self, source: io::Error) -> AuditError {
        let source = if source.raw_os_error() == Some(libc::ELOOP) {
            io::Error::new(
                source.kind(),
                "it is a symbolic link, which kmsfs does not follow for its audit log",
            )
        } else {
            source
        };
        AuditError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    pub(super) fn tampered(&self, index: u64, detail: String) -> AuditError {
        AuditError::Tampered {
            path: self.path.display().to_string(),
            index,
            detail,
        }
    }

    fn malformed(&self, index: u64, offset: u64, detail: String) -> AuditError {
        AuditError::Malformed {
            path: self.path.display().to_string(),
            index,
            offset,
            detail,
        }
    }

    /// A scan error as reported; `anchored`: records up to this sequence number were
    /// complete when written, so a record there that does not parse was changed.
    pub(super) fn scan_error(&self, e: ScanError, anchored: u64) -> AuditError {
        match e {
            ScanError::Io(e) => self.io(e),
            ScanError::Malformed {
                offset,
                index,
                detail,
            } if index <= anchored => self.tampered(
                index,
                format!(
                    "record #{index} at byte offset {offset} cannot be read ({detail}), but the keystore anchors {anchored} records, so it was complete when written"
                ),
            ),
            ScanError::Malformed {
                offset,
                index,
                detail,
            } => self.malformed(index, offset, detail),
            ScanError::Sequence {
                index,
                found,
                record,
                ..
            } => self.tampered(index, sequence_detail(index, found, &record)),
        }
    }

    fn check_regular(&self, f: File) -> Result<File, AuditError> {
        let meta = f.metadata().map_err(|e| self.io(e))?;
        if meta.is_file() {
            Ok(f)
        } else {
            Err(self.io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )))
        }
    }

    /// Opens for reading under a shared lock; `None` if missing.
    pub(super) fn open_read(&self) -> Result<Option<File>, AuditError> {
        let f = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&self.path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        let f = self.check_regular(f)?;
        f.lock_shared().map_err(|e| self.io(e))?;
        Ok(Some(f))
    }

    /// Opens for appending under an exclusive lock; `None` if missing and not `create`.
    fn open_append(&self, create: bool) -> Result<Option<File>, AuditError> {
        let f = match OpenOptions::new()
            .read(true)
            .append(true)
            .create(create)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&self.path)
        {
            Ok(f) => f,
            Err(e) if !create && e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        let f = self.check_regular(f)?;
        f.lock().map_err(|e| self.io(e))?;
        Ok(Some(f))
    }

    /// Reads and checks the header; `None` for an empty file.
    pub(super) fn read_header(
        &self,
        r: &mut impl Read,
    ) -> Result<Option<[u8; HEADER_LEN]>, AuditError> {
        let mut h = [0u8; HEADER_LEN];
        match read_full(r, &mut h).map_err(|e| self.io(e))? {
            0 => Ok(None),
            HEADER_LEN => self.check_header(&h).map(Some),
            n => Err(self.malformed(
                0,
                0,
                format!("the file ends {n} bytes into its {HEADER_LEN}-byte header"),
            )),
        }
    }

    fn check_header(&self, h: &[u8; HEADER_LEN]) -> Result<[u8; HEADER_LEN], AuditError> {
        if h[..8] != MAGIC {
            return Err(self.malformed(
                0,
                0,
                "it does not start with the kmsfs audit log magic \"KMSFSAU\\0\"".to_owned(),
            ));
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version > VERSION {
            return Err(AuditError::UnsupportedVersion {
                path: self.path.display().to_string(),
                found: version,
                supported: VERSION,
            });
        }
        if version != VERSION {
            return Err(self.malformed(0, 0, format!("format version {version} is not valid")));
        }
        if h[10..] != [0, 0] {
            return Err(self.malformed(0, 0, "the reserved header bytes are not zero".to_owned()));
        }
        Ok(*h)
    }

    /// Where the next record goes, after checking the tail against `auth`'s anchor (and the
    /// chain from it). Heals a torn tail and retries once.
    fn prepare_tail(
        &self,
        file: &File,
        auth: Option<(&SecretKey, &Anchor)>,
    ) -> Result<Tail, AuditError> {
        let anchor_count = auth.map(|(_, a)| a.count);
        let mut healed = false;
        loop {
            let len = file.metadata().map_err(|e| self.io(e))?.len();
            if len == 0 {
                if let Some(count) = anchor_count.filter(|c| *c > 0) {
                    return Err(self.tampered(
                        1,
                        format!("the file is empty, but the keystore anchors {count} records"),
                    ));
                }
                return Ok(Tail {
                    len: 0,
                    next_index: 1,
                    chain: None,
                });
            }
            let attempt = self
                .header_at(file, len)
                .and_then(|()| self.walk_tail(file, len, auth));
            match attempt {
                Ok(tail) => return Ok(tail),
                Err(e @ (AuditError::Malformed { .. } | AuditError::UnsupportedVersion { .. }))
                    if !healed =>
                {
                    if !self.heal_torn_tail(file, len, anchor_count)? {
                        return Err(e);
                    }
                    healed = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn header_at(&self, file: &File, len: u64) -> Result<(), AuditError> {
        if len < HEADER_LEN as u64 {
            return Err(self.malformed(
                0,
                0,
                format!("the file ends {len} bytes into its {HEADER_LEN}-byte header"),
            ));
        }
        let mut h = [0u8; HEADER_LEN];
        file.read_exact_at(&mut h, 0).map_err(|e| self.io(e))?;
        self.check_header(&h).map(|_| ())
    }

    /// Walks back from the end of a file with a valid header. With a key and anchor: back to
    /// the anchored record (or the start for an empty anchor), then forward checking the
    /// anchor and every MAC after it. Without: the last record only.
    fn walk_tail(
        &self,
        file: &File,
        len: u64,
        auth: Option<(&SecretKey, &Anchor)>,
    ) -> Result<Tail, AuditError> {
        let stop = auth.map(|(_, a)| a.count);
        // (offset, frame length, sequence number), from the end backwards.
        let mut frames: Vec<(u64, usize, u64)> = Vec::new();
        let mut pos = len;
        while pos > HEADER_LEN as u64 {
            let (offset, frame) = self.frame_ending_at(file, pos)?;
            let i = frame.index;
            match frames.last() {
                None => {
                    if let Some(a) = stop.filter(|a| i < *a) {
                        return Err(self.tampered(
                            i.saturating_add(1),
                            cut_off_detail(i, Some(&frame.record), a),
                        ));
                    }
                }
                Some(&(_, _, after)) if after.checked_sub(1) != Some(i) => {
                    let position = after.saturating_sub(1);
                    return Err(
                        self.tampered(position, sequence_detail(position, i, &frame.record))
                    );
                }
                Some(_) => {}
            }
            if (i == 1) != (offset == HEADER_LEN as u64) {
                return Err(self.tampered(
                    1,
                    if i == 1 {
                        format!(
                            "record #1 ({}) is not at the start of the file (byte offset {offset})",
                            frame.record.describe()
                        )
                    } else {
                        format!(
                            "the file starts with record #{i} ({}): records were removed before it",
                            frame.record.describe()
                        )
                    },
                ));
            }
            frames.push((offset, frame.bytes_len, i));
            pos = offset;
            match stop {
                None => break,
                Some(a) if a > 0 && i == a => {
                    // One more: the anchored record must follow #a-1 (a copy of the
                    // anchored record appended after it carries the anchored MAC too).
                    if offset > HEADER_LEN as u64 {
                        let (_, before) = self.frame_ending_at(file, offset)?;
                        if before.index != a - 1 {
                            return Err(self.tampered(
                                a,
                                format!(
                                    "record #{a} ({}) follows a record with sequence number {} ({}): records were removed, inserted or reordered",
                                    frame.record.describe(),
                                    before.index,
                                    before.record.describe()
                                ),
                            ));
                        }
                    }
                    break;
                }
                _ => {}
            }
        }
        let Some(&(_, _, last)) = frames.first() else {
            // Only the header: an empty log.
            if let Some(a) = stop.filter(|a| *a > 0) {
                return Err(self.tampered(1, cut_off_detail(0, None, a)));
            }
            return Ok(Tail {
                len,
                next_index: 1,
                chain: auth.map(|(key, _)| chain_start(key, &header_bytes())),
            });
        };
        let next_index = last.checked_add(1).ok_or_else(|| {
            self.tampered(
                last,
                "the sequence number cannot grow any further".to_owned(),
            )
        })?;
        let Some((key, anchor)) = auth else {
            return Ok(Tail {
                len,
                next_index,
                chain: None,
            });
        };
        // Forward from the anchored record (or the start).
        let mut chain = chain_start(key, &header_bytes());
        for (n, &(offset, flen, i)) in frames.iter().rev().enumerate() {
            let mut bytes = vec![0u8; flen];
            file.read_exact_at(&mut bytes, offset)
                .map_err(|e| self.io(e))?;
            let frame = decode_frame(&bytes).map_err(|d| self.malformed(i, offset, d))?;
            if n == 0 && anchor.count > 0 {
                match frame.mac {
                    Some(mac) if ct_eq(&mac, &anchor.mac) => chain = mac,
                    _ => return Err(self.tampered(i, not_anchored_detail(i, &frame.record))),
                }
                continue;
            }
            if let Some(mac) = frame.mac {
                if !ct_eq(
                    &record_mac(key, &chain, &bytes[..flen - TRAILER_LEN - MAC_LEN]),
                    &mac,
                ) {
                    return Err(self.tampered(i, bad_mac_detail(i, &frame.record, None)));
                }
                chain = mac;
            } else {
                chain = chain_unauthenticated(key, &chain, &bytes);
            }
        }
        Ok(Tail {
            len,
            next_index,
            chain: Some(chain),
        })
    }

    /// Reads and decodes the frame that ends at `pos` (from its trailing length).
    fn frame_ending_at(&self, file: &File, pos: u64) -> Result<(u64, Decoded), AuditError> {
        let bad = |d: String| self.malformed(0, pos, format!("reading back from the end: {d}"));
        let room = pos - HEADER_LEN as u64;
        if room < MIN_FRAME_LEN as u64 {
            return Err(bad(format!("{room} bytes are too short for a record")));
        }
        let mut t = [0u8; 4];
        file.read_exact_at(&mut t, pos - 4)
            .map_err(|e| self.io(e))?;
        let flen = u32::from_le_bytes(t) as usize;
        if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&flen) || flen as u64 > room {
            return Err(bad(format!("trailing record length {flen} is not valid")));
        }
        let offset = pos - flen as u64;
        let mut bytes = vec![0u8; flen];
        file.read_exact_at(&mut bytes, offset)
            .map_err(|e| self.io(e))?;
        let frame = decode_frame(&bytes).map_err(bad)?;
        Ok((
            offset,
            Decoded {
                index: frame.index,
                record: frame.record,
                bytes_len: flen,
            },
        ))
    }

    /// After the tail failed to parse: scans forward; if the bytes after the last complete
    /// record are shorter than a record (a write torn by a crash), and that record is at or
    /// after `anchor_count`, truncates them. Returns whether it did; `Err` explains a damage
    /// that is not a torn tail.
    fn heal_torn_tail(
        &self,
        file: &File,
        len: u64,
        anchor_count: Option<u64>,
    ) -> Result<bool, AuditError> {
        let anchored = anchor_count.unwrap_or(0);
        let mut h = [0u8; HEADER_LEN];
        let n = read_full(&mut ReadAt::new(file, 0), &mut h).map_err(|e| self.io(e))?;
        let header_ok = n == HEADER_LEN && self.check_header(&h).is_ok();
        let (cut, what) = if header_ok {
            let mut fw = Forward::new(BufReader::new(ReadAt::new(file, HEADER_LEN as u64)));
            loop {
                match fw.next_frame() {
                    Ok(Some(_)) => {}
                    // Every record parses: the failure was not a torn tail.
                    Ok(None) => return Ok(false),
                    Err(e @ ScanError::Malformed { offset, index, .. }) => {
                        if len - offset > MAX_FRAME_LEN as u64 || index <= anchored {
                            return Err(self.scan_error(e, anchored));
                        }
                        break (offset, format!("a torn record #{index}"));
                    }
                    Err(e) => return Err(self.scan_error(e, anchored)),
                }
            }
        } else {
            // A torn first write (header and first record in one write): a header prefix
            // or zeros, no longer than that write.
            let mut all = vec![
                0u8;
                usize::try_from(len)
                    .unwrap_or(usize::MAX)
                    .min(HEADER_LEN + MAX_FRAME_LEN + 1)
            ];
            let n = read_full(&mut ReadAt::new(file, 0), &mut all).map_err(|e| self.io(e))?;
            let all = &all[..n];
            let head = &all[..n.min(HEADER_LEN)];
            let torn = len <= (HEADER_LEN + MAX_FRAME_LEN) as u64
                && anchored == 0
                && (head == &header_bytes()[..head.len()] || head.iter().all(|b| *b == 0))
                && (n < HEADER_LEN || all.iter().all(|b| *b == 0));
            if !torn {
                return Ok(false);
            }
            (0, "a torn first write".to_owned())
        };
        log::warn!(
            "audit log {}: removing {} bytes at offset {cut}, {what} left by a crash during an append",
            self.path.display(),
            len - cut
        );
        file.set_len(cut).map_err(|e| self.io(e))?;
        file.sync_all().map_err(|e| self.io(e))?;
        Ok(true)
    }

    /// Writes `frame` (after the header when `new_file`) in one write, fsyncs the file, and
    /// the directory when the file was started.
    fn write_frame(&self, mut file: &File, new_file: bool, frame: &[u8]) -> Result<(), AuditError> {
        let mut buf = Vec::with_capacity(HEADER_LEN + frame.len());
        if new_file {
            buf.extend_from_slice(&header_bytes());
        }
        buf.extend_from_slice(frame);
        file.write_all(&buf).map_err(|e| self.io(e))?;
        file.sync_all().map_err(|e| self.io(e))?;
        if new_file {
            let dir = match self.path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| self.io(e))?;
        }
        Ok(())
    }
}

/// Where the next record goes.
struct Tail {
    /// File length when it was examined (0: write the header first).
    len: u64,
    next_index: u64,
    /// The chain value the next authenticated record's MAC starts from (`None` without a
    /// key, or for a file not started yet).
    chain: Option<[u8; 32]>,
}

impl Tail {
    fn chain_for(&self, key: &SecretKey) -> [u8; 32] {
        self.chain
            .unwrap_or_else(|| chain_start(key, &header_bytes()))
    }
}

struct Decoded {
    index: u64,
    record: AuditRecord,
    bytes_len: usize,
}

/// Sequential reads of a file by offset (no shared file position).
pub(super) struct ReadAt<'a> {
    f: &'a File,
    pos: u64,
}

impl<'a> ReadAt<'a> {
    pub(super) fn new(f: &'a File, pos: u64) -> Self {
        Self { f, pos }
    }
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.f.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}
