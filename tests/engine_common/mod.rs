//! Shared helpers for engine-level tests: a real keystore in a temp dir, volumes
//! on the in-memory crash-injecting storage or on a real directory, and a dump of
//! a volume's whole tree for comparisons.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use kmsfs::crypto::{KdfParams, Passphrase};
use kmsfs::format::FileKind;
use kmsfs::kms::keystore::{LocalKeystore, Unlock};
use kmsfs::store::Storage;
use kmsfs::volume::{CreateOptions, OpenOptions, ROOT_INO, Volume};

pub struct Env {
    pub dir: tempfile::TempDir,
    pub kms: LocalKeystore,
}

pub fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let kms = LocalKeystore::open_or_create_with_params(
        &dir.path().join("keystore"),
        Unlock::Passphrase(Passphrase::new("test passphrase".into())),
        KdfParams::for_tests(),
    )
    .unwrap();
    Env { dir, kms }
}

impl Env {
    /// A second handle on the same keystore file, shareable as a volume's
    /// generation sink (what the mount daemon gives its volume).
    pub fn kms_handle(&self) -> Arc<dyn kmsfs::kms::Kms> {
        Arc::new(
            LocalKeystore::open_or_create_with_params(
                &self.dir.path().join("keystore"),
                Unlock::Passphrase(Passphrase::new("test passphrase".into())),
                KdfParams::for_tests(),
            )
            .unwrap(),
        )
    }
}

pub fn small_opts() -> CreateOptions {
    CreateOptions {
        block_size: 4096,
        segment_size: 1 << 20,
        ..Default::default()
    }
}

pub fn init(env: &Env, storage: Arc<dyn Storage>, opts: &CreateOptions) -> Volume {
    Volume::init(storage.clone(), &env.kms, opts).unwrap();
    open(env, storage)
}

pub fn open(env: &Env, storage: Arc<dyn Storage>) -> Volume {
    Volume::open(storage, &env.kms, OpenOptions::default()).unwrap()
}

/// A file tree as plain values: path -> description.
pub type Dump = BTreeMap<String, String>;

/// Everything observable of a volume's tree, with contents hashed into the text.
pub fn dump(v: &Volume) -> Result<Dump, kmsfs::error::Error> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(ROOT_INO, String::new())];
    while let Some((ino, path)) = stack.pop() {
        let mut off = 0;
        loop {
            let items = v.readdir(ino, off, 100)?;
            if items.is_empty() {
                break;
            }
            for it in &items {
                off = it.offset;
                if it.name == b"." || it.name == b".." {
                    continue;
                }
                let p = format!("{path}/{}", String::from_utf8_lossy(&it.name));
                let a = v.getattr(it.ino)?;
                let mut xattrs = Vec::new();
                for n in v.listxattr(it.ino)? {
                    let val = v.getxattr(it.ino, &n)?;
                    xattrs.push(format!("{}={}", String::from_utf8_lossy(&n), digest(&val)));
                }
                let body = match it.kind {
                    FileKind::File => {
                        let data = v.read(it.ino, 0, a.inode.size as u32 + 1)?;
                        assert_eq!(data.len() as u64, a.inode.size);
                        format!("file size={} data={}", a.inode.size, digest(&data))
                    }
                    FileKind::Dir => {
                        stack.push((it.ino, p.clone()));
                        "dir".to_string()
                    }
                    FileKind::Symlink => {
                        format!("symlink {}", String::from_utf8_lossy(&v.readlink(it.ino)?))
                    }
                    k => format!("{k:?}"),
                };
                out.insert(
                    p,
                    format!(
                        "{body} mode={:o} nlink={} xattrs=[{}]",
                        a.inode.perm,
                        a.inode.nlink,
                        xattrs.join(",")
                    ),
                );
            }
        }
    }
    Ok(out)
}

/// FNV-1a, enough to compare contents in test dumps.
pub fn digest(b: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for x in b {
        h ^= *x as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{:016x}:{}", h, b.len())
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
