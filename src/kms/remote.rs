//! Choosing a KMS by URL (`--kms URL`, `-o kms=URL`, `KMSFS_KMS`): the embedded keystore
//! is the default; these select a KMS elsewhere. Every configuration item is part of the
//! URL (query parameters), so one string works on the command line, in fstab and in a
//! systemd unit. Secrets never go in the URL: tokens come from the environment or a file.
//!
//! | URL | KMS |
//! | --- | --- |
//! | `unix:/run/kmsfs/kms.sock` | the kmsfs KMS daemon (`kmsfs kms serve`) |
//! | `openbao+http://127.0.0.1:8200/KEY?mount=transit&token_file=F&ca_file=F` | OpenBao / Vault Transit (`vault+…` is a synonym; `https` too) |
//! | `kmip://HOST:5696/KEY-UID?cert=F&key=F&ca=F` | a KMIP server, mutual TLS |

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::{Kms, KmsError};

/// A parsed KMS URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KmsUrl {
    /// The kmsfs KMS daemon's socket.
    Unix(PathBuf),
    /// OpenBao / Vault Transit.
    Transit {
        /// `http` or `https`.
        scheme: String,
        /// `host:port`.
        authority: String,
        /// The Transit key name.
        key: String,
        /// Query parameters (`mount`, `token_file`, `ca_file`, `timeout`, `kv_mount`).
        params: BTreeMap<String, String>,
    },
    /// KMIP.
    Kmip {
        /// `host:port` (port 5696 when omitted).
        authority: String,
        /// The unique identifier of the symmetric key on the server.
        key: String,
        /// Query parameters (`cert`, `key`, `ca`, `timeout`, `state_dir`).
        params: BTreeMap<String, String>,
    },
}

fn bad(url: &str, why: &str) -> KmsError {
    KmsError::Refused(format!(
        "the KMS URL {url:?} is not usable: {why}; use unix:/PATH, openbao+http(s)://HOST:PORT/KEY, vault+http(s)://HOST:PORT/KEY or kmip://HOST:PORT/KEY-UID"
    ))
}

fn split_query(rest: &str, url: &str) -> Result<(String, BTreeMap<String, String>), KmsError> {
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut params = BTreeMap::new();
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| bad(url, &format!("query item {kv:?} has no '='")))?;
        if k.contains("token") && !k.ends_with("_file") {
            return Err(bad(
                url,
                "secrets do not belong in a URL: pass the token in BAO_TOKEN / VAULT_TOKEN or token_file=PATH",
            ));
        }
        params.insert(k.to_owned(), v.to_owned());
    }
    Ok((path.to_owned(), params))
}

impl KmsUrl {
    /// Parses a KMS URL.
    ///
    /// # Errors
    /// [`KmsError::Refused`] naming what is wrong and the accepted forms.
    pub fn parse(url: &str) -> Result<Self, KmsError> {
        if let Some(p) = url.strip_prefix("unix:") {
            let p = p.strip_prefix("//").unwrap_or(p);
            if !p.starts_with('/') {
                return Err(bad(url, "the socket path must be absolute"));
            }
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        for (prefix, scheme) in [
            ("openbao+http://", "http"),
            ("openbao+https://", "https"),
            ("vault+http://", "http"),
            ("vault+https://", "https"),
        ] {
            if let Some(rest) = url.strip_prefix(prefix) {
                let (path, params) = split_query(rest, url)?;
                let (authority, key) = path
                    .split_once('/')
                    .ok_or_else(|| bad(url, "no key name after the host"))?;
                if authority.is_empty() || key.is_empty() || key.contains('/') {
                    return Err(bad(url, "expected HOST:PORT/KEYNAME"));
                }
                return Ok(Self::Transit {
                    scheme: scheme.to_owned(),
                    authority: authority.to_owned(),
                    key: key.to_owned(),
                    params,
                });
            }
        }
        if let Some(rest) = url.strip_prefix("kmip://") {
            let (path, params) = split_query(rest, url)?;
            let (authority, key) = path
                .split_once('/')
                .ok_or_else(|| bad(url, "no key unique identifier after the host"))?;
            if authority.is_empty() || key.is_empty() {
                return Err(bad(url, "expected HOST:PORT/KEY-UID"));
            }
            let authority = if authority.contains(':') {
                authority.to_owned()
            } else {
                format!("{authority}:5696")
            };
            return Ok(Self::Kmip {
                authority,
                key: key.to_owned(),
                params,
            });
        }
        Err(bad(url, "unknown scheme"))
    }
}

/// Connects to the KMS a URL names.
///
/// # Errors
/// [`KmsError::Refused`] for a bad URL; the backend's errors (unreachable, denied, TLS).
pub fn open(url: &str) -> Result<Arc<dyn Kms>, KmsError> {
    match KmsUrl::parse(url)? {
        KmsUrl::Unix(path) => super::client::open(&path),
        u @ KmsUrl::Transit { .. } => super::transit::open(&u),
        u @ KmsUrl::Kmip { .. } => super::kmip::open(&u),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_form() {
        assert_eq!(
            KmsUrl::parse("unix:/run/kmsfs/kms.sock").unwrap(),
            KmsUrl::Unix("/run/kmsfs/kms.sock".into())
        );
        match KmsUrl::parse("vault+https://bao:8200/vols?mount=t2&ca_file=/c.pem").unwrap() {
            KmsUrl::Transit {
                scheme,
                authority,
                key,
                params,
            } => {
                assert_eq!(
                    (scheme.as_str(), authority.as_str(), key.as_str()),
                    ("https", "bao:8200", "vols")
                );
                assert_eq!(params["mount"], "t2");
                assert_eq!(params["ca_file"], "/c.pem");
            }
            other => panic!("{other:?}"),
        }
        match KmsUrl::parse("kmip://kms.example/abc-1").unwrap() {
            KmsUrl::Kmip { authority, key, .. } => {
                assert_eq!(
                    (authority.as_str(), key.as_str()),
                    ("kms.example:5696", "abc-1")
                );
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "unix:relative",
            "openbao+http://host",
            "openbao+http:///key",
            "openbao+http://h:1/k?token=s3cret",
            "kmip://",
            "ftp://x/y",
            "openbao+http://h:1/k?novalue",
        ] {
            let e = KmsUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains("not usable"), "{bad}: {e}");
            assert!(!e.contains("s3cret") || bad.contains("s3cret"), "{e}");
        }
    }
}
