//! The crate error: one variant family per area, one tested errno table.
//!
//! Messages say what happened and what to do next; they never contain key
//! material or file contents.

use std::io;

use crate::format::DecodeError;
use crate::kms::KmsError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    /// Something named already exists (a snapshot, a volume): the message
    /// names it and the way out.
    #[error("{0}")]
    AlreadyExists(String),
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("name too long (255 bytes at most)")]
    NameTooLong,
    #[error("no such extended attribute")]
    NoXattr,
    #[error("value too large: {0}")]
    TooBig(String),
    #[error("file too large")]
    FileTooBig,
    #[error("too many links")]
    TooManyLinks,
    #[error("read-only: {0}")]
    ReadOnly(String),
    #[error("operation not supported: {0}")]
    NotSupported(String),
    #[error("permission denied: {0}")]
    Permission(String),
    #[error(
        "the backing store is full ({0}): the change was refused, so a file being written may be incomplete; free space on the backing store (files deleted on the volume are reclaimed by `kmsfs clean`), then write it again"
    )]
    NoSpace(String),
    #[error(
        "integrity error: {what}: {detail}; the backing data was modified or damaged. Run `kmsfs fsck` and restore the affected files from a backup or snapshot"
    )]
    Integrity { what: String, detail: String },
    #[error("{0}")]
    Format(String),
    /// A send stream was refused (damaged, truncated, or not for this
    /// target); the message says what and what to do.
    #[error("{0}")]
    Stream(String),
    #[error("the volume is locked by another process ({0}); unmount it first")]
    Locked(String),
    #[error(
        "the volume was rolled back: it is at generation {found}, but the keystore recorded generation {mark}. Someone restored an older copy of the backing store, or it was tampered with. If you restored it on purpose, open it once with `kmsfs fsck --accept-rollback`"
    )]
    Rollback { found: u64, mark: u64 },
    #[error(
        "internal error in {0}: a bug in kmsfs; the request failed and nothing acknowledged was lost. Please report it with the mount log"
    )]
    Internal(String),
    #[error(transparent)]
    Kms(#[from] KmsError),
    #[error("I/O error on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.raw_os_error() == Some(libc::EDQUOT)
        {
            return Error::NoSpace(what.into());
        }
        if source.raw_os_error() == Some(libc::EACCES) {
            return Error::Permission(format!(
                "{} in the backing store; run kmsfs as a user that may read and write the volume \
                 directory (its owner, or root), or fix its permissions",
                what.into()
            ));
        }
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub fn integrity(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Error::Integrity {
            what: what.into(),
            detail: detail.to_string(),
        }
    }

    pub fn decode(what: impl Into<String>, e: DecodeError) -> Self {
        Error::integrity(what, e)
    }

    /// The errno a FUSE reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound => libc::ENOENT,
            Error::Exists | Error::AlreadyExists(_) => libc::EEXIST,
            Error::NotDir => libc::ENOTDIR,
            Error::IsDir => libc::EISDIR,
            Error::NotEmpty => libc::ENOTEMPTY,
            Error::Invalid(_) => libc::EINVAL,
            Error::NameTooLong => libc::ENAMETOOLONG,
            Error::NoXattr => crate::sys::ENOATTR,
            Error::TooBig(_) => libc::E2BIG,
            Error::FileTooBig => libc::EFBIG,
            Error::TooManyLinks => libc::EMLINK,
            Error::ReadOnly(_) => libc::EROFS,
            Error::NotSupported(_) => libc::EOPNOTSUPP,
            Error::Permission(_) => libc::EACCES,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::Integrity { .. } => libc::EIO,
            Error::Format(_) => libc::EIO,
            Error::Stream(_) => libc::EIO,
            Error::Locked(_) => libc::EBUSY,
            Error::Rollback { .. } => libc::EIO,
            Error::Internal(_) => libc::EIO,
            Error::Kms(_) => libc::EACCES,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_table() {
        let cases: Vec<(Error, i32)> = vec![
            (Error::NotFound, libc::ENOENT),
            (Error::integrity("x", "y"), libc::EIO),
            (Error::ReadOnly("snapshot".into()), libc::EROFS),
            (
                Error::io("seg", io::Error::from_raw_os_error(libc::ENOSPC)),
                libc::ENOSPC,
            ),
            (Error::Kms(KmsError::UnwrapFailed), libc::EACCES),
            (Error::NotEmpty, libc::ENOTEMPTY),
            (Error::Internal("read".into()), libc::EIO),
            (
                Error::io("kmsfs.root", io::Error::from_raw_os_error(libc::EACCES)),
                libc::EACCES,
            ),
            (Error::NoXattr, libc::ENODATA),
            (Error::Locked("pid 1".into()), libc::EBUSY),
            (
                Error::io("x", io::Error::from_raw_os_error(libc::EPERM)),
                libc::EPERM,
            ),
        ];
        for (e, n) in cases {
            assert_eq!(e.errno(), n, "{e}");
        }
    }

    #[test]
    fn messages_name_next_step() {
        let e = Error::integrity("file /a block 3", "bad tag");
        assert!(e.to_string().contains("fsck"));
        let e = Error::io("seg", io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(e.to_string().contains("free space"));
    }
}
