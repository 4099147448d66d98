//! Backward compatibility: a golden volume written by format version 1 and
//! self-describing test vectors (valid and invalid), committed under tests/.
//!
//! Regenerate (only together with a format version bump, never to make a test
//! pass): `KMSFS_WRITE_GOLDEN=1 cargo test --release --test golden -- --ignored`.

mod engine_common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use engine_common::*;
use kmsfs::crypto::{CipherKind, KdfParams, Passphrase, Sealer, SecretKey, derive_subkey, labels};
use kmsfs::format::{self, BlockKind, block_aad, hex, unhex};
use kmsfs::kms::keystore::{LocalKeystore, Unlock};
use kmsfs::store::FsStorage;
use kmsfs::volume::{CreateOptions, OpenOptions, ROOT_INO, Volume};

const GOLDEN_PASSPHRASE: &str = "golden volume v1";

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/v1")
}

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// The golden tree's contents, also written to MANIFEST for humans.
fn golden_contents() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("/hello.txt", b"hello from kmsfs format v1\n".to_vec()),
        ("/docs/big.bin", pattern(42, 200_000)),
        ("/docs/sparse", {
            let mut v = vec![0u8; 300_000];
            v[299_990..].copy_from_slice(b"end-marker");
            v
        }),
    ]
}

#[test]
#[ignore]
fn write_golden_volume() {
    if std::env::var("KMSFS_WRITE_GOLDEN").is_err() {
        return;
    }
    write_golden_at(&golden_dir());
    write_vectors();
}

/// The second golden volume: the same tree, written by a build with two root
/// slots and node mirrors (`KMSFS_WRITE_GOLDEN_SLOTS=1 cargo test --release
/// --features test-hooks --test golden -- --ignored`).
#[test]
#[ignore]
fn write_golden_slots_volume() {
    if std::env::var("KMSFS_WRITE_GOLDEN_SLOTS").is_err() {
        return;
    }
    write_golden_at(&golden_slots_dir());
}

fn golden_slots_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/v1-slots")
}

fn write_golden_at(root: &Path) {
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root.join("volume")).unwrap();
    let kms = LocalKeystore::open_or_create_with_params(
        &root.join("keystore"),
        Unlock::Passphrase(Passphrase::new(GOLDEN_PASSPHRASE.into())),
        KdfParams::for_tests(),
    )
    .unwrap();
    let storage = Arc::new(FsStorage::new(root.join("volume")));
    let opts = CreateOptions {
        block_size: 16384,
        segment_size: 1 << 20,
        ..Default::default()
    };
    Volume::init(storage.clone(), &kms, &opts).unwrap();
    let v = Volume::open(storage, &kms, OpenOptions::default()).unwrap();
    let docs = v.mkdir(ROOT_INO, b"docs", 0o750, 1000, 1000).unwrap();
    for (path, data) in golden_contents() {
        let (parent, name) = match path.rsplit_once('/').unwrap() {
            ("", n) => (ROOT_INO, n),
            (_, n) => (docs.ino, n),
        };
        let f = v
            .create(parent, name.as_bytes(), 0o644, 1000, 1000)
            .unwrap();
        if name == "sparse" {
            v.write(f.ino, 299_990, &data[299_990..]).unwrap();
        } else {
            v.write(f.ino, 0, &data).unwrap();
        }
    }
    let h = v.lookup(ROOT_INO, b"hello.txt").unwrap();
    v.setxattr(h.ino, b"user.golden", b"yes", 0).unwrap();
    v.symlink(ROOT_INO, b"link", b"docs/big.bin", 0, 0).unwrap();
    v.link(h.ino, docs.ino, b"hello-link").unwrap();
    v.close().unwrap();
    let _ = std::fs::remove_file(root.join("volume").join(format::LOCK_FILE));
    let mut manifest = String::from("# golden volume, format v1; passphrase in tests/golden.rs\n");
    for (p, d) in golden_contents() {
        manifest.push_str(&format!("{p} {}\n", digest(&d)));
    }
    std::fs::write(root.join("MANIFEST"), manifest).unwrap();
}

#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "the golden keystore uses the 1 MiB test KDF profile: needs --features test-hooks (scripts/test.sh sets it)"
)]
fn golden_v1_volume_opens_and_reads() {
    check_golden(&golden_dir());
}

/// The golden volume with root slots and node mirrors: both slots and the
/// mirrors are there, and each slot alone still opens.
#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "the golden keystore uses the 1 MiB test KDF profile: needs --features test-hooks (scripts/test.sh sets it)"
)]
fn golden_v1_slots_volume_opens_and_reads() {
    let dir = golden_slots_dir();
    for slot in kmsfs::volume::ROOT_SLOTS {
        assert!(dir.join("volume").join(slot).is_file(), "{slot} missing");
    }
    let mirrors = std::fs::read_dir(dir.join("volume/seg"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("meta".as_ref()))
        .count();
    assert!(mirrors > 0, "no node mirror in the golden volume");
    check_golden(&dir);
}

fn check_golden(dir: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    copy_tree(dir, tmp.path());
    // Git keeps no file modes but the executable bit: the keystore is checked out 0644,
    // which kmsfs refuses (as it would any keystore others can read).
    for k in ["keystore", "keystore.bak"] {
        std::fs::set_permissions(
            tmp.path().join(k),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
    }
    let kms = LocalKeystore::open_or_create_with_params(
        &tmp.path().join("keystore"),
        Unlock::Passphrase(Passphrase::new(GOLDEN_PASSPHRASE.into())),
        KdfParams::for_tests(),
    )
    .unwrap();
    let storage = Arc::new(FsStorage::new(tmp.path().join("volume")));
    let v = Volume::open(storage, &kms, OpenOptions::default()).unwrap();
    assert_eq!(v.header().version, 1);
    assert_eq!(v.block_size(), 16384);
    let docs = v.lookup(ROOT_INO, b"docs").unwrap();
    assert_eq!(docs.inode.perm, 0o750);
    assert_eq!(docs.inode.uid, 1000);
    for (path, data) in golden_contents() {
        let (parent, name) = match path.rsplit_once('/').unwrap() {
            ("", n) => (ROOT_INO, n),
            (_, n) => (docs.ino, n),
        };
        let a = v.lookup(parent, name.as_bytes()).unwrap();
        assert_eq!(v.read(a.ino, 0, 1 << 20).unwrap(), data, "{path}");
    }
    let h = v.lookup(ROOT_INO, b"hello.txt").unwrap();
    assert_eq!(h.inode.nlink, 2);
    assert_eq!(v.getxattr(h.ino, b"user.golden").unwrap(), b"yes");
    let l = v.lookup(ROOT_INO, b"link").unwrap();
    assert_eq!(v.readlink(l.ino).unwrap(), b"docs/big.bin");
    let r = v.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
    // And it stays writable by this version, as a version-1 volume: small
    // overwrites of stored blocks rewrite the block (no fragments, which an
    // older kmsfs would not know), and the header keeps version 1.
    let f = v.create(ROOT_INO, b"new", 0o644, 0, 0).unwrap();
    v.write(f.ino, 0, b"x").unwrap();
    v.commit().unwrap();
    let big = v.lookup(docs.ino, b"big.bin").unwrap();
    let mut want = v.read(big.ino, 0, 1 << 20).unwrap();
    for (i, off) in [100usize, 16_500, 40_000].into_iter().enumerate() {
        if off + 300 <= want.len() {
            let bytes = vec![0xA0 + i as u8; 300];
            v.write(big.ino, off as u64, &bytes).unwrap();
            want[off..off + 300].copy_from_slice(&bytes);
        }
    }
    v.commit().unwrap();
    assert_eq!(v.read(big.ino, 0, 1 << 20).unwrap(), want);
    let r = v.fsck().unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
    let storage = v.storage().clone();
    drop(v);
    let v = Volume::open(storage, &kms, OpenOptions::default()).unwrap();
    assert_eq!(v.header().version, 1);
    assert_eq!(v.read(big.ino, 0, 1 << 20).unwrap(), want);
}

// ----- test vectors ---------------------------------------------------------

/// Writes tests/vectors/blocks.txt and headers.txt (with the golden volume).
fn write_vectors() {
    let dir = vectors_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let mut out = String::from(
        "# Sealed-block vectors, format v1. One per line, fields separated by spaces:\n\
         # name cipher dk volume_id block_id kind sealed expect\n\
         # dk: the volume data key; the block key is HKDF-SHA256(dk, \"kmsfs v1 block\").\n\
         # AAD = \"KMSFSBLK\" || version(2 LE) || key domain || block_id || kind.\n\
         # sealed = nonce || ciphertext || tag. expect: plaintext hex, or `fail`.\n",
    );
    let dk = SecretKey::from_bytes([7u8; 32]);
    let vid = [0x11u8; 16];
    let bid = [0x22u8; 16];
    for kind in [CipherKind::Aes256GcmSiv, CipherKind::XChaCha20Poly1305] {
        let s = Sealer::new(kind, &derive_subkey(&dk, labels::BLOCK));
        let plain = b"kmsfs test vector plaintext".to_vec();
        let aad = block_aad(&vid, &bid, BlockKind::Data);
        let sealed = s.seal(&aad, &plain);
        let line = |name: &str, vid: &[u8], bid: &[u8], k: u8, sealed: &[u8], expect: &str| {
            format!(
                "{name} {} {} {} {} {k} {} {expect}\n",
                kind.name(),
                hex(dk.expose()),
                hex(vid),
                hex(bid),
                hex(sealed)
            )
        };
        out += &line("valid", &vid, &bid, 1, &sealed, &hex(&plain));
        let mut flipped = sealed.clone();
        let n = flipped.len();
        flipped[n - 1] ^= 1;
        out += &line("bad-tag", &vid, &bid, 1, &flipped, "fail");
        let mut ct = sealed.clone();
        ct[kind.nonce_len()] ^= 0x80;
        out += &line("bad-ciphertext", &vid, &bid, 1, &ct, "fail");
        out += &line("wrong-kind", &vid, &bid, 2, &sealed, "fail");
        out += &line("other-volume", &[0x12u8; 16], &bid, 1, &sealed, "fail");
        out += &line("other-block-id", &vid, &[0x23u8; 16], 1, &sealed, "fail");
        out += &line(
            "truncated",
            &vid,
            &bid,
            1,
            &sealed[..sealed.len() - 17],
            "fail",
        );
    }
    std::fs::write(dir.join("blocks.txt"), out).unwrap();

    // Header vectors: the golden header as is, and broken variants.
    let golden = std::fs::read(golden_dir().join("volume").join(format::HEADER_FILE)).unwrap();
    let mut out = String::from(
        "# Volume header vectors, format v1: name expect header-hex\n\
         # expect: `ok`, or `refuse:<text the error must contain>`\n",
    );
    out += &format!("golden ok {}\n", hex(&golden));
    let mut newer = golden.clone();
    newer[format::header_off::VERSION] = (format::VOLUME_VERSION + 1) as u8;
    out += &format!("newer-version refuse:newer {}\n", hex(&newer));
    let mut magic = golden.clone();
    magic[0] = b'X';
    out += &format!("bad-magic refuse:magic {}\n", hex(&magic));
    let mut bs = golden.clone();
    bs[format::header_off::BLOCK_SIZE..format::header_off::BLOCK_SIZE + 4]
        .copy_from_slice(&3000u32.to_le_bytes());
    out += &format!("bad-block-size refuse:block size {}\n", hex(&bs));
    out += &format!("short refuse:bytes {}\n", hex(&golden[..100]));
    std::fs::write(dir.join("headers.txt"), out).unwrap();
}

#[test]
fn block_vectors() {
    let text = std::fs::read_to_string(vectors_dir().join("blocks.txt")).unwrap();
    let mut n = 0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let f: Vec<&str> = line.split(' ').collect();
        let (name, cipher, dk, vid, bid, kind, sealed, expect) =
            (f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]);
        let kind_c = CipherKind::parse(cipher).unwrap();
        let dk = SecretKey::from_slice(&unhex(dk).unwrap()).unwrap();
        let s = Sealer::new(kind_c, &derive_subkey(&dk, labels::BLOCK));
        let vid: [u8; 16] = unhex(vid).unwrap().try_into().unwrap();
        let bid: [u8; 16] = unhex(bid).unwrap().try_into().unwrap();
        let kind = BlockKind::from_u8(kind.parse().unwrap()).unwrap();
        let r = s.open(&block_aad(&vid, &bid, kind), &unhex(sealed).unwrap());
        match expect {
            "fail" => assert!(r.is_err(), "{name} ({cipher}) opened"),
            hexp => assert_eq!(r.unwrap(), unhex(hexp).unwrap(), "{name} ({cipher})"),
        }
        n += 1;
    }
    assert_eq!(n, 14);
}

#[test]
fn header_vectors() {
    let text = std::fs::read_to_string(vectors_dir().join("headers.txt")).unwrap();
    let mut n = 0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, rest) = line.split_once(' ').unwrap();
        let (expect, hexed) = rest.rsplit_once(' ').unwrap();
        let bytes = unhex(hexed).unwrap();
        let r = format::Header::decode(&bytes);
        match expect.strip_prefix("refuse:") {
            None => {
                let h = r.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(h.version, 1);
                assert_eq!(h.block_size, 16384);
            }
            Some(want) => {
                let e = r.err().unwrap_or_else(|| panic!("{name} decoded"));
                assert!(e.0.contains(want), "{name}: {e}");
            }
        }
        n += 1;
    }
    assert_eq!(n, 5);
}
