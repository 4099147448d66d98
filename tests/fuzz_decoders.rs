//! Bounded fuzzing of every decoder of bytes that come from disk or from a socket: each
//! one must answer `Ok` or `Err` for any input, never panic (proptest catches a panic as
//! a failure and shrinks the input).
//!
//! Targets: the volume header, the root record (file split and sealed payload), tree
//! nodes, block pointers, inodes, directory entries, xattr values, tree keys, segment
//! headers and segment records, the keystore file and its payload, control socket
//! requests and answers. Every target gets
//! - arbitrary bytes (empty, short, the exact expected length, large), and
//! - mutations of valid encodings (bit flips, byte sets, truncations, extensions,
//!   insertions, removals, copied ranges, length and count fields overwritten with
//!   extreme values), since random bytes rarely get past a magic check,
//!
//! plus exhaustive truncation and field-overwrite sweeps of one valid encoding each.
//! Sealed structures are also fuzzed through the full path with the real key: the
//! mutated plaintext is sealed again, so the bytes behind the AEAD reach the decoder and
//! everything that consumes its result (a keystore opened and used, a volume opened
//! read-only, read-write or at a snapshot and then walked, read, checked and written).
//!
//! Case counts: `KMSFS_FUZZ_CASES` (default 2000) cases per cheap target; the full-path
//! targets run a fixed fraction of it (see the divisor of each `fuzz` call). The RNG
//! seed is fixed per target, so a run is reproducible; `KMSFS_FUZZ_SEED=<u64>` picks
//! another seed and `KMSFS_FUZZ_SEED=random` a random one. A longer run:
//! `KMSFS_FUZZ_CASES=200000 KMSFS_FUZZ_SEED=random cargo test --release --test fuzz_decoders`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

use kmsfs::control::{self, ControlServer, Request, Response};
use kmsfs::crypto::{
    self, CipherKind, DataKey, KdfParams, Passphrase, Sealer, SecretKey, derive_subkey, labels,
};
use kmsfs::format::{
    self, BlockKind, BlockPtr, DirEntry, FileKind, Header, Inode, RootPayload, SnapshotRecord,
    Timestamp, XattrValue,
};
use kmsfs::kms::keystore::{self, LocalKeystore, Unlock};
use kmsfs::kms::{EncryptionContext, Kms, KmsError, WrappedKey};
use kmsfs::store::{FsStorage, MemStorage, Storage};
use kmsfs::volume::blocks::{BlockIo, mirror_file_name};
use kmsfs::volume::tree::{Child, Node, NodeStore, Tree};
use kmsfs::volume::{CreateOptions, OpenOptions, ROOT_INO, RenameFlags, SetAttr, Volume};

// ----- runner -----------------------------------------------------------------------

/// Cases per cheap target: `KMSFS_FUZZ_CASES`, by default 2000 (200 in a debug
/// build, which runs the full-path targets about ten times slower).
fn base_cases() -> u32 {
    match std::env::var("KMSFS_FUZZ_CASES") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("KMSFS_FUZZ_CASES={s:?} is not a number")),
        Err(_) if cfg!(debug_assertions) => 200,
        Err(_) => 2000,
    }
}

fn seed_for(name: &str) -> RngSeed {
    match std::env::var("KMSFS_FUZZ_SEED") {
        // A fresh seed, but a known one: failures print it, to be rerun with it.
        Ok(s) if s.trim() == "random" => {
            use std::hash::{BuildHasher, Hasher};
            RngSeed::Fixed(
                std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish(),
            )
        }
        Ok(s) => RngSeed::Fixed(
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("KMSFS_FUZZ_SEED={s:?} is not a number or `random`")),
        ),
        // FNV-1a of the target name: a fixed, different stream per target.
        Err(_) => RngSeed::Fixed(name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })),
    }
}

/// How long one case may run before it counts as a hang (seconds).
fn case_timeout() -> Duration {
    Duration::from_secs(
        std::env::var("KMSFS_FUZZ_CASE_TIMEOUT")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(120),
    )
}

/// The case being run, for the watchdog: when it started, and the input.
type Current = Arc<Mutex<Option<(Instant, Box<dyn Debug + Send>)>>>;

/// Runs `test` on `base_cases() / divisor` inputs drawn from `strategy`. A panic is a
/// failure (proptest shrinks the input and reports it); a case that runs longer than
/// `KMSFS_FUZZ_CASE_TIMEOUT` seconds (default 120) is a hang: its input is printed and
/// the process aborts, rather than the suite waiting forever.
fn fuzz<S>(
    name: &str,
    divisor: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug + Clone + Send + 'static,
{
    let seed = seed_for(name);
    let config = Config {
        cases: (base_cases() / divisor).max(1),
        failure_persistence: None,
        max_shrink_iters: 2048,
        rng_seed: seed,
        ..Config::default()
    };
    let current: Current = Arc::new(Mutex::new(None));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (current, done, name) = (current.clone(), done.clone(), name.to_string());
        let limit = case_timeout();
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::park_timeout(Duration::from_millis(200));
                let cur = current.lock().unwrap();
                if let Some((started, input)) = cur.as_ref()
                    && started.elapsed() > limit
                {
                    // Straight to stderr: the test harness's capture would be lost.
                    let _ = writeln!(
                        std::io::stderr(),
                        "{name} (seed {seed}): a case has run for more than {limit:?} (a hang?); input: {input:#?}"
                    );
                    std::process::abort();
                }
            }
        })
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |v| {
        *current.lock().unwrap() = Some((Instant::now(), Box::new(v.clone())));
        let r = test(v);
        *current.lock().unwrap() = None;
        r
    });
    done.store(true, Ordering::Relaxed);
    watchdog.thread().unpark();
    watchdog.join().unwrap();
    if let Err(e) = result {
        panic!("{name} (seed {seed}): {e}");
    }
}

// ----- inputs -------------------------------------------------------------------------

/// Deterministic filler for large inputs (generating them byte by byte is slow).
fn filler(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Arbitrary bytes: empty and short, medium, exactly `exact` long, large, and runs of
/// one byte value (zeros, 0xff).
fn arbitrary_bytes(exact: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => vec(any::<u8>(), 0..=64),
        3 => vec(any::<u8>(), 0..=1024),
        1 => (any::<u64>(), Just(exact)).prop_map(|(s, n)| filler(s, n)),
        1 => (any::<u64>(), 0..=(256usize << 10)).prop_map(|(s, n)| filler(s, n)),
        1 => (prop_oneof![Just(0u8), Just(0xff), any::<u8>()], 0..=8192usize)
            .prop_map(|(b, n)| vec![b; n]),
    ]
}

/// Arbitrary bytes behind a valid magic, so that decoding gets past the first check.
fn behind_magic(magic: &'static [u8], exact: usize) -> impl Strategy<Value = Vec<u8>> {
    arbitrary_bytes(exact.saturating_sub(magic.len())).prop_map(move |rest| {
        let mut b = magic.to_vec();
        b.extend_from_slice(&rest);
        b
    })
}

/// Values worth writing over length, count, size and version fields.
fn interesting() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => prop::sample::select(vec![
            0u64, 1, 2, 3, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0x8000, 0xffff, 0x1_0000, 4095,
            4096, 65535, 65536, 1 << 20, (1 << 20) + 1, 1 << 30, 999_999_999, 1_000_000_000,
            0x7fff_ffff, 0x8000_0000, 0xffff_fffe, 0xffff_ffff, 1 << 32, i64::MAX as u64,
            i64::MIN as u64, u64::MAX - 1, u64::MAX,
        ]),
        1 => 0u64..512,
        1 => any::<u64>(),
    ]
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip {
        at: Index,
        mask: u8,
    },
    Set {
        at: Index,
        byte: u8,
    },
    Truncate {
        at: Index,
    },
    Extend {
        bytes: Vec<u8>,
    },
    Insert {
        at: Index,
        bytes: Vec<u8>,
    },
    Remove {
        at: Index,
        n: usize,
    },
    /// Copies `n` bytes from `from` to be inserted at `to` (repeats a record or a field).
    Splice {
        from: Index,
        to: Index,
        n: usize,
    },
    /// Overwrites a 1, 2, 4 or 8 byte integer field.
    Word {
        at: Index,
        width: usize,
        value: u64,
        big_endian: bool,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 1..=255u8).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        2 => any::<Index>().prop_map(|at| Mutation::Truncate { at }),
        1 => vec(any::<u8>(), 1..64).prop_map(|bytes| Mutation::Extend { bytes }),
        1 => (any::<Index>(), vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<Index>(), 1..64usize).prop_map(|(at, n)| Mutation::Remove { at, n }),
        1 => (any::<Index>(), any::<Index>(), 1..200usize)
            .prop_map(|(from, to, n)| Mutation::Splice { from, to, n }),
        4 => (any::<Index>(), prop::sample::select(vec![1usize, 2, 4, 8]), interesting(), any::<bool>())
            .prop_map(|(at, width, value, big_endian)| Mutation::Word { at, width, value, big_endian }),
    ]
}

fn apply(b: &mut Vec<u8>, m: &Mutation) {
    let len = b.len();
    match m {
        Mutation::Flip { at, mask } if len > 0 => b[at.index(len)] ^= mask,
        Mutation::Set { at, byte } if len > 0 => b[at.index(len)] = *byte,
        Mutation::Truncate { at } => b.truncate(at.index(len + 1)),
        Mutation::Extend { bytes } => b.extend_from_slice(bytes),
        Mutation::Insert { at, bytes } => {
            let i = at.index(len + 1);
            b.splice(i..i, bytes.iter().copied());
        }
        Mutation::Remove { at, n } if len > 0 => {
            let i = at.index(len);
            b.drain(i..(i + n).min(len));
        }
        Mutation::Splice { from, to, n } if len > 0 => {
            let i = from.index(len);
            let chunk = b[i..(i + n).min(len)].to_vec();
            let j = to.index(len + 1);
            b.splice(j..j, chunk);
        }
        Mutation::Word {
            at,
            width,
            value,
            big_endian,
        } if len >= *width => {
            let i = at.index(len - width + 1);
            let bytes = if *big_endian {
                value.to_be_bytes()[8 - width..].to_vec()
            } else {
                value.to_le_bytes()[..*width].to_vec()
            };
            b[i..i + width].copy_from_slice(&bytes);
        }
        _ => {}
    }
}

/// One to four mutations of a valid encoding drawn from `base`.
fn mutated<S: Strategy<Value = Vec<u8>>>(base: S) -> impl Strategy<Value = Vec<u8>> {
    (base, vec(mutation(), 1..=4)).prop_map(|(mut b, ms)| {
        for m in &ms {
            apply(&mut b, m);
        }
        b
    })
}

/// Exhaustive sweeps over one valid encoding: every truncation, and every offset
/// overwritten with extreme 1, 2, 4 and 8 byte values (both byte orders).
fn sweep(valid: &[u8], check: impl Fn(&[u8])) {
    for n in 0..=valid.len() {
        check(&valid[..n]);
    }
    let mut b = valid.to_vec();
    b.push(0);
    check(&b);
    b.extend_from_slice(&[0xff; 64]);
    check(&b);
    for width in [1usize, 2, 4, 8] {
        for at in 0..=valid.len().saturating_sub(width) {
            if valid.len() < width {
                break;
            }
            for value in [0u64, 1, 0x7f, 0xff, 0x8000, 0xffff, 0xffff_ffff, u64::MAX] {
                for be in [false, true] {
                    let mut b = valid.to_vec();
                    let bytes = if be {
                        value.to_be_bytes()[8 - width..].to_vec()
                    } else {
                        value.to_le_bytes()[..width].to_vec()
                    };
                    b[at..at + width].copy_from_slice(&bytes);
                    check(&b);
                }
            }
        }
    }
}

// ----- valid values -------------------------------------------------------------------

fn ptr_strategy() -> impl Strategy<Value = BlockPtr> {
    (
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<[u8; 16]>(),
        any::<[u8; 16]>(),
    )
        .prop_map(|(segment, offset, len, block_id, tag)| BlockPtr {
            segment,
            offset,
            len,
            block_id,
            tag,
        })
}

fn header_strategy() -> impl Strategy<Value = Header> {
    (
        any::<[u8; 16]>(),
        any::<bool>(),
        1..=2u8,
        12..=20u32,
        prop_oneof![Just(format::DEFAULT_SEGMENT_SIZE), format::MIN_SEGMENT_SIZE..=format::MAX_SEGMENT_SIZE],
        any::<i64>(),
        prop_oneof![3 => "cmk-[0-9a-f]{16}", 1 => ".{0,80}"],
        any::<u32>(),
        prop_oneof![3 => vec(any::<u8>(), 60..=60), 1 => vec(any::<u8>(), 0..=format::MAX_WRAPPED_LEN)],
    )
        .prop_map(|(vid, clone, cipher, bs_log, segment_size, created, cmk_id, cmk_version, wrapped)| {
            Header {
                version: format::FORMAT_VERSION,
                volume_id: vid,
                key_domain: if clone { [7; 16] } else { vid },
                cipher,
                block_size: 1 << bs_log,
                segment_size,
                created,
                cmk_id,
                cmk_version,
                wrapped_dk: wrapped,
            }
        })
}

fn payload_strategy() -> impl Strategy<Value = RootPayload> {
    (
        ptr_strategy(),
        any::<u64>(),
        any::<u64>(),
        any::<i64>(),
        vec(
            (
                ".{0,40}",
                any::<i64>(),
                any::<u64>(),
                ptr_strategy(),
                any::<u64>(),
            ),
            0..5,
        ),
    )
        .prop_map(
            |(tree, next_ino, next_segment, committed, snaps)| RootPayload {
                tree,
                next_ino,
                next_segment,
                committed,
                snapshots: snaps
                    .into_iter()
                    .map(
                        |(name, created, generation, tree, next_ino)| SnapshotRecord {
                            name,
                            created,
                            generation,
                            tree,
                            next_ino,
                        },
                    )
                    .collect(),
            },
        )
}

fn leaf(entries: BTreeMap<Vec<u8>, Vec<u8>>) -> Node {
    let mut n = Node::empty_leaf();
    for (k, v) in entries {
        n.keys.push(k);
        n.vals.push(v);
    }
    n
}

fn internal(entries: BTreeMap<Vec<u8>, BlockPtr>) -> Node {
    let mut n = Node::empty_leaf();
    n.leaf = false;
    for (k, p) in entries {
        n.keys.push(k);
        n.kids.push(Child::Clean(p));
    }
    n
}

fn node_strategy() -> impl Strategy<Value = Node> {
    prop_oneof![
        btree_map(vec(any::<u8>(), 0..24), vec(any::<u8>(), 0..160), 0..20).prop_map(leaf),
        btree_map(vec(any::<u8>(), 0..24), ptr_strategy(), 1..12).prop_map(internal),
    ]
}

/// A node as stored: encoded, then zero padded.
fn node_bytes() -> impl Strategy<Value = Vec<u8>> {
    (node_strategy(), 0..600usize).prop_map(|(n, pad)| {
        let mut b = n.encode();
        b.resize(b.len() + pad, 0);
        b
    })
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    (any::<i64>(), 0..1_000_000_000u32).prop_map(|(secs, nanos)| Timestamp { secs, nanos })
}

fn file_kind() -> impl Strategy<Value = FileKind> {
    (1..=7u8).prop_map(|k| FileKind::from_u8(k).unwrap())
}

fn inode_strategy() -> impl Strategy<Value = Inode> {
    (
        (
            file_kind(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
        ),
        (timestamp(), timestamp(), timestamp(), timestamp()),
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<u64>()),
    )
        .prop_map(
            |(
                (kind, perm, uid, gid, nlink, size, rdev),
                (atime, mtime, ctime, crtime),
                (parent, next_cookie, flags, blocks),
            )| Inode {
                kind,
                perm,
                uid,
                gid,
                nlink,
                size,
                rdev,
                atime,
                mtime,
                ctime,
                crtime,
                parent,
                next_cookie,
                flags,
                blocks,
            },
        )
}

fn dirent_strategy() -> impl Strategy<Value = DirEntry> {
    (any::<u64>(), file_kind(), any::<u64>()).prop_map(|(ino, kind, cookie)| DirEntry {
        ino,
        kind,
        cookie,
    })
}

fn xattr_strategy() -> impl Strategy<Value = XattrValue> {
    prop_oneof![
        vec(any::<u8>(), 0..=format::XATTR_INLINE_MAX).prop_map(XattrValue::Inline),
        ptr_strategy().prop_map(XattrValue::Block),
    ]
}

fn sample_ptr(n: u8) -> BlockPtr {
    BlockPtr {
        segment: u64::from(n) + 1,
        offset: 40 + u32::from(n) * 100,
        len: 100,
        block_id: [n; 16],
        tag: [n ^ 0x5a; 16],
    }
}

fn sample_header() -> Header {
    Header {
        version: format::FORMAT_VERSION,
        volume_id: [1; 16],
        key_domain: [2; 16],
        cipher: 1,
        block_size: 65536,
        segment_size: format::DEFAULT_SEGMENT_SIZE,
        created: 1_700_000_000,
        cmk_id: "cmk-0123456789abcdef".into(),
        cmk_version: 3,
        wrapped_dk: vec![9; 60],
    }
}

fn sample_payload() -> RootPayload {
    RootPayload {
        tree: sample_ptr(1),
        next_ino: 100,
        next_segment: 7,
        committed: 1_700_000_000,
        snapshots: vec![
            SnapshotRecord {
                name: "before-upgrade".into(),
                created: 5,
                generation: 9,
                tree: sample_ptr(2),
                next_ino: 50,
            },
            SnapshotRecord {
                name: "é".into(),
                created: -1,
                generation: 10,
                tree: sample_ptr(3),
                next_ino: 60,
            },
        ],
    }
}

fn sample_leaf() -> Node {
    leaf(
        [
            (format::key(1, format::tag::INODE, &[]), vec![1; 113]),
            (format::key(1, format::tag::DIRENT, b"a"), vec![2; 17]),
            (
                format::key(1, format::tag::DIRCOOKIE, &3u64.to_be_bytes()),
                b"a".to_vec(),
            ),
            (
                format::key(2, format::tag::BLOCK, &0u64.to_be_bytes()),
                vec![3; 48],
            ),
        ]
        .into_iter()
        .collect(),
    )
}

fn sample_internal() -> Node {
    internal(
        [
            (Vec::new(), sample_ptr(1)),
            (format::key(5, 1, &[]), sample_ptr(2)),
            (format::key(9, 1, &[]), sample_ptr(3)),
        ]
        .into_iter()
        .collect(),
    )
}

fn sample_inode() -> Inode {
    Inode {
        kind: FileKind::File,
        perm: 0o644,
        uid: 1000,
        gid: 1000,
        nlink: 1,
        size: 12345,
        rdev: 0,
        atime: Timestamp { secs: 1, nanos: 2 },
        mtime: Timestamp { secs: 3, nanos: 4 },
        ctime: Timestamp { secs: 5, nanos: 6 },
        crtime: Timestamp { secs: 7, nanos: 8 },
        parent: 1,
        next_cookie: 3,
        flags: 0,
        blocks: 1,
    }
}

// ----- checks of the plain decoders -----------------------------------------------------
//
// Each decodes and, when the bytes are accepted, checks that the value encodes back to
// what was read (or at least decodes again to the same value): an accepted input is one
// the rest of kmsfs can use.

fn check_header(b: &[u8]) {
    let _ = Header::peek_version(b);
    if let Ok(h) = Header::decode(b) {
        let again = h.encode_unsigned();
        assert_eq!(again.len(), format::HEADER_LEN);
        assert_eq!(Header::decode(&again).as_ref(), Ok(&h));
    }
}

fn check_payload(b: &[u8]) {
    if let Ok(p) = RootPayload::decode(b) {
        assert_eq!(p.encode(), b, "a root payload re-encodes to its bytes");
    }
}

fn check_split_root(b: &[u8]) {
    if let Ok((_, _, prefix, sealed)) = format::split_root(b) {
        assert_eq!(prefix.len(), format::ROOT_PREFIX_LEN);
        assert_eq!([prefix, sealed].concat(), b);
    }
}

fn check_node(b: &[u8]) {
    if let Ok(n) = Node::decode(b) {
        let e = n.encode();
        assert!(b.starts_with(&e) && b[e.len()..].iter().all(|&x| x == 0));
        assert_eq!(
            n.keys.len(),
            if n.leaf { n.vals.len() } else { n.kids.len() }
        );
        let _ = n.encoded_len();
    }
}

fn check_ptr(b: &[u8]) {
    if let Ok(p) = BlockPtr::from_bytes(b) {
        assert_eq!(p.to_bytes(), b);
    }
}

fn check_inode(b: &[u8]) {
    if let Ok(i) = Inode::decode(b) {
        assert_eq!(i.encode(), b);
    }
}

fn check_dirent(b: &[u8]) {
    if let Ok(e) = DirEntry::decode(b) {
        assert_eq!(e.encode(), b);
    }
}

fn check_xattr(b: &[u8]) {
    if let Ok(x) = XattrValue::decode(b) {
        assert_eq!(x.encode(), b);
    }
}

fn check_frag(b: &[u8]) {
    // Checked decode: what it accepts lies inside a 64 KiB block and re-encodes
    // to the same bytes; the unchecked decode accepts a superset.
    if let Ok(f) = format::FragValue::from_bytes(b, 65536) {
        assert!(f.len > 0 && f.offset as u64 + f.len as u64 <= 65536);
        assert_eq!(f.to_bytes(), b);
        assert!(format::FragValue::from_bytes_unchecked(b).is_ok());
    }
    if let Ok(f) = format::FragValue::from_bytes_unchecked(b) {
        assert_eq!(f.to_bytes(), b);
    }
}

fn check_key(b: &[u8]) {
    if let Some((ino, tag, suffix)) = format::split_key(b) {
        assert_eq!(format::key(ino, tag, suffix), b);
    }
}

fn check_segment_header(b: &[u8]) {
    if let Ok((vid, sid)) = format::decode_segment_header(b) {
        let e = format::encode_segment_header(&vid, sid);
        assert_eq!(e[..8], b[..8]);
    }
}

fn check_names(s: &str) {
    if let Some(id) = format::parse_segment_file_name(s) {
        assert_eq!(
            format::segment_file_name(id),
            format!("{}/{s}", format::SEGMENT_DIR)
        );
    }
    if let Some(b) = format::unhex(s) {
        assert_eq!(format::hex(&b), s.to_ascii_lowercase());
    }
}

fn check_keystore_payload(b: &[u8]) {
    let _ = keystore::decode_payload(b, 1);
    let _ = keystore::decode_payload(b, 2);
}

fn check_request(b: &[u8]) {
    if let Ok(r) = control::parse_request(b) {
        let again = serde_json::to_vec(&r).unwrap();
        assert_eq!(control::parse_request(&again).unwrap(), r);
    }
}

fn check_response(b: &[u8]) {
    if let Ok(r) = control::parse_response(b) {
        // (Floats in `data` need not survive a round trip exactly.)
        let again = control::parse_response(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(
            (again.ok, again.errno, again.error),
            (r.ok, r.errno, r.error)
        );
    }
}

fn ok(f: impl Fn(&[u8])) -> impl Fn(Vec<u8>) -> Result<(), TestCaseError> {
    move |b| {
        f(&b);
        Ok(())
    }
}

#[test]
fn header() {
    fuzz(
        "header arbitrary",
        1,
        arbitrary_bytes(format::HEADER_LEN),
        ok(check_header),
    );
    fuzz(
        "header behind magic",
        1,
        behind_magic(format::HEADER_MAGIC, format::HEADER_LEN),
        ok(check_header),
    );
    fuzz(
        "header mutated",
        1,
        mutated(header_strategy().prop_map(|h| h.encode_unsigned())),
        ok(check_header),
    );
    // Field sweeps over the part before the zero padding (the rest is ignored).
    let valid = sample_header().encode_unsigned();
    assert!(Header::decode(&valid).is_ok());
    for n in 0..=valid.len() {
        check_header(&valid[..n]);
    }
    let used = format::header_off::CMK_ID_LEN + 2 + 20 + 2 + 60 + 8;
    for width in [1usize, 2, 4, 8] {
        for at in 0..used {
            for value in [0u64, 1, 0xff, 0xffff, 0xffff_ffff, u64::MAX] {
                let mut b = valid.clone();
                b[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
                check_header(&b);
            }
        }
    }
}

#[test]
fn root_record() {
    fuzz(
        "root payload arbitrary",
        1,
        arbitrary_bytes(200),
        ok(check_payload),
    );
    fuzz(
        "root payload mutated",
        1,
        mutated(payload_strategy().prop_map(|p| p.encode())),
        ok(check_payload),
    );
    sweep(&sample_payload().encode(), check_payload);

    fuzz(
        "root file arbitrary",
        1,
        arbitrary_bytes(200),
        ok(check_split_root),
    );
    fuzz(
        "root file behind magic",
        1,
        behind_magic(format::ROOT_MAGIC, 200),
        ok(check_split_root),
    );
    let root_file = (any::<[u8; 16]>(), any::<u64>(), vec(any::<u8>(), 0..300)).prop_map(
        |(vid, generation, sealed)| {
            let mut b = format::root_prefix(&vid, generation, sealed.len() as u32);
            b.extend_from_slice(&sealed);
            b
        },
    );
    fuzz(
        "root file mutated",
        1,
        mutated(root_file),
        ok(check_split_root),
    );
    let mut valid = format::root_prefix(&[3; 16], 42, 100);
    valid.extend_from_slice(&[0xab; 100]);
    sweep(&valid, check_split_root);
}

#[test]
fn tree_node() {
    fuzz(
        "tree node arbitrary",
        1,
        arbitrary_bytes(512),
        ok(check_node),
    );
    fuzz(
        "tree node mutated",
        1,
        mutated(node_bytes()),
        ok(check_node),
    );
    sweep(&sample_leaf().encode(), check_node);
    sweep(&sample_internal().encode(), check_node);
}

#[test]
fn tree_values_and_keys() {
    fuzz(
        "block pointer arbitrary",
        1,
        arbitrary_bytes(format::PTR_LEN),
        ok(check_ptr),
    );
    fuzz(
        "block pointer mutated",
        1,
        mutated(ptr_strategy().prop_map(|p| p.to_bytes().to_vec())),
        ok(check_ptr),
    );
    sweep(&sample_ptr(4).to_bytes(), check_ptr);

    fuzz(
        "inode arbitrary",
        1,
        arbitrary_bytes(format::INODE_LEN),
        ok(check_inode),
    );
    fuzz(
        "inode mutated",
        1,
        mutated(inode_strategy().prop_map(|i| i.encode())),
        ok(check_inode),
    );
    sweep(&sample_inode().encode(), check_inode);

    fuzz("dirent arbitrary", 1, arbitrary_bytes(17), ok(check_dirent));
    fuzz(
        "dirent mutated",
        1,
        mutated(dirent_strategy().prop_map(|e| e.encode())),
        ok(check_dirent),
    );
    sweep(
        &DirEntry {
            ino: 5,
            kind: FileKind::Dir,
            cookie: 9,
        }
        .encode(),
        check_dirent,
    );

    fuzz("xattr arbitrary", 1, arbitrary_bytes(49), ok(check_xattr));
    fuzz(
        "xattr mutated",
        1,
        mutated(xattr_strategy().prop_map(|x| x.encode())),
        ok(check_xattr),
    );
    sweep(&XattrValue::Block(sample_ptr(5)).encode(), check_xattr);
    sweep(&XattrValue::Inline(b"value".to_vec()).encode(), check_xattr);

    fuzz(
        "fragment arbitrary",
        1,
        arbitrary_bytes(format::FRAG_VALUE_LEN),
        ok(check_frag),
    );
    fuzz(
        "fragment mutated",
        1,
        mutated(
            (ptr_strategy(), 0u32..70_000, 0u32..70_000)
                .prop_map(|(ptr, offset, len)| format::FragValue { ptr, offset, len }.to_bytes()),
        ),
        ok(check_frag),
    );
    sweep(
        &format::FragValue {
            ptr: sample_ptr(6),
            offset: 4096,
            len: 300,
        }
        .to_bytes(),
        check_frag,
    );

    fuzz("tree key arbitrary", 1, arbitrary_bytes(17), ok(check_key));
    sweep(
        &format::key(7, format::tag::DIRCOOKIE, &9u64.to_be_bytes()),
        check_key,
    );
}

#[test]
fn segment_header_and_names() {
    fuzz(
        "segment header arbitrary",
        1,
        arbitrary_bytes(format::SEGMENT_HEADER_LEN),
        ok(check_segment_header),
    );
    fuzz(
        "segment header mutated",
        1,
        mutated(
            (any::<[u8; 16]>(), any::<u64>())
                .prop_map(|(v, s)| format::encode_segment_header(&v, s)),
        ),
        ok(check_segment_header),
    );
    sweep(
        &format::encode_segment_header(&[1; 16], 77),
        check_segment_header,
    );
    let names = prop_oneof![
        ".{0,40}",
        "[0-9a-fA-F+_-]{14,18}(\\.seg)?",
        any::<u64>().prop_map(|id| format!("{id:016x}.seg")),
    ];
    fuzz("file names and hex", 1, names, |s: String| {
        check_names(&s);
        Ok(())
    });
}

// ----- keystore payload (plaintext) ---------------------------------------------------

/// A CMK record as `docs/KEYSTORE-FORMAT.md` lays it out.
#[derive(Clone, Debug)]
struct TestCmk {
    alias: bool,
    description: String,
    created: u64,
    origin: u8,
    state: u8,
    deletion: u64,
    /// (version step, created, material)
    versions: Vec<(u32, u64, [u8; 32])>,
}

fn test_cmk() -> impl Strategy<Value = TestCmk> {
    (
        any::<bool>(),
        ".{0,30}",
        any::<u64>(),
        1..=2u8,
        1..=3u8,
        1..u64::MAX,
        vec((1..100u32, any::<u64>(), any::<[u8; 32]>()), 1..4),
    )
        .prop_map(
            |(alias, description, created, origin, state, deletion, versions)| TestCmk {
                alias,
                description,
                created,
                origin,
                state,
                deletion: if state == 3 { deletion } else { 0 },
                versions,
            },
        )
}

fn encode_keystore_payload(
    cmks: &[TestCmk],
    service_at: usize,
    marks: &BTreeMap<[u8; 16], u64>,
) -> Vec<u8> {
    let mut o = Vec::new();
    o.extend_from_slice(&(cmks.len() as u32 + 1).to_le_bytes());
    let service = TestCmk {
        alias: true,
        description: "service".into(),
        created: 1,
        origin: 1,
        state: 1,
        deletion: 0,
        versions: vec![(1, 1, [7; 32])],
    };
    let mut all: Vec<(usize, &TestCmk, u8)> =
        cmks.iter().enumerate().map(|(i, c)| (i, c, 2)).collect();
    all.insert(service_at.min(all.len()), (usize::MAX, &service, 1));
    for (i, c, kind) in all {
        let id = format!("cmk-{:016x}", i as u64);
        let alias = match (kind, c.alias) {
            (1, _) => "service".to_string(),
            (_, true) => format!("alias-{i}"),
            _ => String::new(),
        };
        o.push(id.len() as u8);
        o.extend_from_slice(id.as_bytes());
        o.push(alias.len() as u8);
        o.extend_from_slice(alias.as_bytes());
        o.extend_from_slice(&(c.description.len() as u16).to_le_bytes());
        o.extend_from_slice(c.description.as_bytes());
        o.extend_from_slice(&c.created.to_le_bytes());
        o.push(kind);
        o.push(c.origin);
        o.push(c.state);
        o.extend_from_slice(&c.deletion.to_le_bytes());
        o.extend_from_slice(&(c.versions.len() as u32).to_le_bytes());
        let mut version = 0u32;
        for (step, created, material) in &c.versions {
            version += step;
            o.extend_from_slice(&version.to_le_bytes());
            o.extend_from_slice(&created.to_le_bytes());
            o.extend_from_slice(material);
        }
    }
    o.extend_from_slice(&(marks.len() as u32).to_le_bytes());
    for (id, generation) in marks {
        o.extend_from_slice(id);
        o.extend_from_slice(&generation.to_le_bytes());
    }
    o
}

fn keystore_payload_strategy() -> impl Strategy<Value = Vec<u8>> {
    (
        vec(test_cmk(), 0..4),
        0..5usize,
        btree_map(any::<[u8; 16]>(), any::<u64>(), 0..5),
    )
        .prop_map(|(cmks, at, marks)| encode_keystore_payload(&cmks, at, &marks))
}

#[test]
fn keystore_payload() {
    // The generator really produces valid payloads (so the mutations start from one).
    fuzz(
        "keystore payload valid",
        10,
        keystore_payload_strategy(),
        |b| {
            prop_assert_eq!(keystore::decode_payload(&b, 1), Ok(()));
            Ok(())
        },
    );
    fuzz(
        "keystore payload arbitrary",
        1,
        arbitrary_bytes(200),
        ok(check_keystore_payload),
    );
    fuzz(
        "keystore payload mutated",
        1,
        mutated(keystore_payload_strategy()),
        ok(check_keystore_payload),
    );
    let cmk = TestCmk {
        alias: true,
        description: "d".into(),
        created: 2,
        origin: 2,
        state: 3,
        deletion: 99,
        versions: vec![(1, 2, [1; 32]), (2, 3, [2; 32])],
    };
    let valid = encode_keystore_payload(&[cmk], 1, &[([5; 16], 8)].into_iter().collect());
    assert_eq!(keystore::decode_payload(&valid, 1), Ok(()));
    sweep(&valid, check_keystore_payload);
}

// ----- control socket (plain decoders) ------------------------------------------------

fn request_strategy() -> impl Strategy<Value = Request> {
    prop_oneof![
        ".{0,40}".prop_map(|name| Request::SnapshotCreate { name }),
        ".{0,40}".prop_map(|name| Request::SnapshotDelete { name }),
        Just(Request::SnapshotList),
        Just(Request::Clean),
        Just(Request::Stats),
    ]
}

fn json_strategy() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        ".{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn response_strategy() -> impl Strategy<Value = Response> {
    (any::<bool>(), any::<i32>(), ".{0,40}", json_strategy()).prop_map(
        |(ok, errno, error, data)| Response {
            ok,
            errno,
            error,
            data,
        },
    )
}

fn line(v: &impl serde::Serialize) -> Vec<u8> {
    let mut b = serde_json::to_vec(v).unwrap();
    b.push(b'\n');
    b
}

#[test]
fn control_messages() {
    fuzz(
        "control request arbitrary",
        1,
        arbitrary_bytes(64),
        ok(check_request),
    );
    fuzz(
        "control request mutated",
        1,
        mutated(request_strategy().prop_map(|r| line(&r))),
        ok(check_request),
    );
    fuzz(
        "control response arbitrary",
        1,
        arbitrary_bytes(64),
        ok(check_response),
    );
    fuzz(
        "control response mutated",
        1,
        mutated(response_strategy().prop_map(|r| line(&r))),
        ok(check_response),
    );
    sweep(
        &line(&Request::SnapshotCreate { name: "s1".into() }),
        check_request,
    );
    // Deep nesting is refused, not a stack overflow.
    for deep in [
        "[".repeat(100_000),
        "{\"a\":".repeat(100_000),
        format!("{{\"ok\":true,\"data\":{}}}", "[".repeat(100_000)),
    ] {
        check_request(deep.as_bytes());
        assert!(control::parse_response(deep.as_bytes()).is_err());
    }
}

// ----- keystore file, full path -------------------------------------------------------

const KS_HEADER_LEN: usize = keystore::HEADER_LEN;

struct KsFixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    keyfile: PathBuf,
    file: Vec<u8>,
    payload: Vec<u8>,
    seal_key: SecretKey,
    wrapped: WrappedKey,
    ctx: EncryptionContext,
}

/// A keyfile keystore with a service key, two user keys and two generation marks.
fn keyfile_keystore() -> KsFixture {
    let dir = tempfile::tempdir().unwrap();
    let keyfile = dir.path().join("keyfile");
    let material = filler(0x1234_5678, 64);
    std::fs::write(&keyfile, &material).unwrap();
    std::fs::set_permissions(
        &keyfile,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let path = dir.path().join("ks").join("keystore");
    let ks = LocalKeystore::open_or_create(&path, Unlock::Keyfile(keyfile.clone())).unwrap();
    ks.create_key(&kmsfs::kms::CreateKey {
        alias: Some("backups".into()),
        description: "for the backup volumes".into(),
        external: false,
    })
    .unwrap();
    ks.create_key(&kmsfs::kms::CreateKey::default()).unwrap();
    let ctx = EncryptionContext::for_volume(&[4; 16]);
    let (_, wrapped) = ks.generate_data_key(Some("backups"), &ctx).unwrap();
    ks.record_generation(&[4; 16], 5).unwrap();
    ks.record_generation(&[1; 16], 9).unwrap();
    drop(ks);
    let file = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(path.with_extension("bak"));
    let master = crypto::derive_from_material(&material, &file[23..39], labels::KEYSTORE_KEYFILE);
    let seal_key = derive_subkey(&master, labels::KEYSTORE_SEAL);
    let payload = Sealer::new(CipherKind::Aes256GcmSiv, &seal_key)
        .open(&file[..KS_HEADER_LEN], &file[KS_HEADER_LEN..])
        .unwrap();
    assert_eq!(keystore::decode_payload(&payload, 2), Ok(()));
    KsFixture {
        _dir: dir,
        path,
        keyfile,
        file,
        payload,
        seal_key,
        wrapped,
        ctx,
    }
}

/// Opens the keystore file `bytes` (with `backup` as `PATH.bak`, if any) and, if it
/// opens, uses what was decoded.
fn open_keystore(
    path: &Path,
    unlock: Unlock,
    bytes: &[u8],
    backup: Option<&[u8]>,
    use_it: &dyn Fn(&LocalKeystore),
) {
    std::fs::write(path, bytes).unwrap();
    let bak = PathBuf::from(format!("{}.bak", path.display()));
    match backup {
        Some(b) => std::fs::write(&bak, b).unwrap(),
        None => {
            let _ = std::fs::remove_file(&bak);
        }
    }
    if let Ok(ks) = LocalKeystore::open_or_create(path, unlock) {
        use_it(&ks);
    }
}

fn use_keystore(f: &KsFixture) -> impl Fn(&LocalKeystore) + '_ {
    move |ks| {
        let _ = ks.service_key_id();
        let _ = ks.list_keys();
        let _ = ks.decrypt(&f.wrapped, &f.ctx);
        let _ = ks.generate_data_key(None, &f.ctx);
        let _ = ks.re_encrypt(&f.wrapped, &f.ctx, Some("backups"));
        let _ = ks.generation_mark(&[4; 16]);
    }
}

#[test]
fn keystore_file_full_path() {
    let f = keyfile_keystore();
    let use_it = use_keystore(&f);
    // The whole file: header, key check, nonce, sealed body; with no backup, a valid
    // backup, or a damaged one.
    let cases = (
        prop_oneof![
            1 => behind_magic(&keystore::MAGIC, 200),
            4 => mutated(Just(f.file.clone())),
        ],
        0..3u8,
        mutated(Just(f.file.clone())),
    );
    fuzz(
        "keystore file mutated",
        1,
        cases,
        |(bytes, bak, bad_bak)| {
            let backup = match bak {
                0 => None,
                1 => Some(f.file.as_slice()),
                _ => Some(bad_bak.as_slice()),
            };
            open_keystore(
                &f.path,
                Unlock::Keyfile(f.keyfile.clone()),
                &bytes,
                backup,
                &use_it,
            );
            Ok(())
        },
    );
    // The payload behind the AEAD: sealed again with the real key.
    let payloads = prop_oneof![
        1 => arbitrary_bytes(200),
        4 => mutated(Just(f.payload.clone())),
        2 => mutated(keystore_payload_strategy()),
    ];
    let sealer = Sealer::new(CipherKind::Aes256GcmSiv, &f.seal_key);
    fuzz("keystore payload sealed", 1, payloads, |payload| {
        let aad = &f.file[..KS_HEADER_LEN];
        let mut bytes = aad.to_vec();
        sealer.seal_into(aad, &payload, &mut bytes);
        open_keystore(
            &f.path,
            Unlock::Keyfile(f.keyfile.clone()),
            &bytes,
            None,
            &use_it,
        );
        Ok(())
    });
    // The unmodified file still opens (the fixture is what the fuzzing started from).
    open_keystore(
        &f.path,
        Unlock::Keyfile(f.keyfile.clone()),
        &f.file,
        None,
        &use_it,
    );
    LocalKeystore::open_or_create(&f.path, Unlock::Keyfile(f.keyfile.clone())).unwrap();
}

#[test]
fn passphrase_keystore_file_full_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keystore");
    let pass = || Unlock::Passphrase(Passphrase::new("fuzz passphrase".into()));
    LocalKeystore::open_or_create_with_params(&path, pass(), KdfParams::for_tests()).unwrap();
    let file = std::fs::read(&path).unwrap();
    // Argon2id runs for every file whose header passes the checks: keep the mutated
    // parameters to the cheap test profile (the bounds themselves are checked before
    // any derivation, which the keyfile target covers for every value).
    fuzz(
        "passphrase keystore mutated",
        4,
        mutated(Just(file.clone())),
        |bytes| {
            if bytes.len() >= 23 && bytes[10] == 1 {
                let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
                let params = KdfParams {
                    m_cost_kib: u32_at(11),
                    t_cost: u32_at(15),
                    p_cost: u32_at(19),
                };
                prop_assume!(params.validate().is_err() || params == KdfParams::for_tests());
            }
            open_keystore(&path, pass(), &bytes, None, &|ks| {
                let _ = ks.list_keys();
            });
            // The other kind of secret is refused before any key derivation.
            let keyfile = dir.path().join("no-such-keyfile");
            open_keystore(&path, Unlock::Keyfile(keyfile), &bytes, None, &|_| {});
            Ok(())
        },
    );
}

// ----- segment records, full path -----------------------------------------------------

fn mem_io(
    storage: &MemStorage,
    key: &SecretKey,
    cipher: CipherKind,
    domain: [u8; 16],
    next_segment: u64,
) -> BlockIo {
    BlockIo::new(
        Arc::new(storage.clone()),
        Sealer::new(cipher, key),
        domain,
        1 << 20,
        next_segment,
        1 << 20,
    )
}

struct SegFixture {
    key: SecretKey,
    domain: [u8; 16],
    /// The segment file: its header, then the records.
    header: Vec<u8>,
    records: Vec<Vec<u8>>,
    ptrs: Vec<(BlockPtr, BlockKind)>,
    /// The segment's mirror file (a second copy of its tree nodes).
    mirror: Vec<u8>,
}

fn segment_fixture() -> SegFixture {
    let storage = MemStorage::new();
    storage.create_dir(format::SEGMENT_DIR).unwrap();
    let key = SecretKey::random();
    let domain = [6; 16];
    let io = mem_io(&storage, &key, CipherKind::Aes256GcmSiv, domain, 1);
    let mut ptrs = Vec::new();
    for (kind, plain) in [
        (BlockKind::Data, vec![1u8; 4096]),
        (BlockKind::Data, vec![2u8; 4096]),
        (BlockKind::Node, {
            let mut b = sample_leaf().encode();
            b.resize(512, 0);
            b
        }),
        (BlockKind::Data, vec![3u8; 100]),
        (BlockKind::Xattr, vec![4u8; 3000]),
        (BlockKind::Data, Vec::new()),
    ] {
        ptrs.push((io.write_block(kind, &plain).unwrap(), kind));
    }
    io.sync().unwrap();
    let seg = storage.read(&format::segment_file_name(1)).unwrap();
    let mut records = Vec::new();
    for (p, _) in &ptrs {
        assert_eq!(p.segment, 1);
        records.push(seg[p.offset as usize..(p.offset + p.len) as usize].to_vec());
    }
    SegFixture {
        key,
        domain,
        header: seg[..format::SEGMENT_HEADER_LEN].to_vec(),
        records,
        ptrs,
        mirror: storage.read(&mirror_file_name(1)).unwrap(),
    }
}

#[derive(Clone, Debug)]
enum SegCase {
    /// Mutations of one record (its length field, kind, id, sealed bytes).
    Record(Index, Vec<Mutation>),
    /// Mutations anywhere in the file.
    File(Vec<Mutation>),
}

#[derive(Clone, Debug)]
enum MirrorCase {
    Intact,
    Missing,
    Damaged(Vec<Mutation>),
}

fn read_everything(io: &BlockIo, ptrs: &[(BlockPtr, BlockKind)]) -> Vec<bool> {
    let mut oks = Vec::new();
    for (p, kind) in ptrs {
        let _ = io.read_raw(p, *kind);
        oks.push(io.read_block(p, *kind).is_ok());
        match kind {
            BlockKind::Data => {
                let _ = io.read_data(p);
            }
            BlockKind::Node => {
                let _ = io.load(p);
                let _ = io.check_node_copies(p);
            }
            BlockKind::Xattr => {}
        }
        // Every kind is refused where another is expected.
        for other in [BlockKind::Data, BlockKind::Node, BlockKind::Xattr] {
            if other != *kind {
                assert!(io.read_block(p, other).is_err());
            }
        }
        let _ = io.copy(p, *kind);
    }
    io.forget_caches();
    let data: Vec<BlockPtr> = ptrs
        .iter()
        .filter(|(_, k)| *k == BlockKind::Data)
        .map(|(p, _)| *p)
        .collect();
    let _ = io.read_data_many(&data);
    io.forget_caches();
    let mut bufs: Vec<Vec<u8>> = data.iter().map(|p| vec![0u8; io.plain_len(p)]).collect();
    let mut items: Vec<(BlockPtr, &mut [u8])> = data
        .iter()
        .zip(bufs.iter_mut())
        .map(|(p, b)| (*p, b.as_mut_slice()))
        .collect();
    let _ = io.read_data_direct(&mut items);
    oks
}

#[test]
fn segment_records_full_path() {
    let f = segment_fixture();
    let n = f.records.len();
    let ptr_muts = vec((any::<Index>(), vec(mutation(), 1..=3)), 0..=2);
    let cases = (
        prop_oneof![
            3 => (any::<Index>(), vec(mutation(), 1..=4)).prop_map(|(i, m)| SegCase::Record(i, m)),
            1 => vec(mutation(), 1..=4).prop_map(SegCase::File),
        ],
        ptr_muts,
        prop_oneof![
            2 => Just(MirrorCase::Intact),
            1 => Just(MirrorCase::Missing),
            2 => vec(mutation(), 1..=4).prop_map(MirrorCase::Damaged),
        ],
    );
    fuzz("segment records", 1, cases, |(case, ptr_muts, mirror)| {
        let mut records = f.records.clone();
        let mut file;
        match &case {
            SegCase::Record(i, ms) => {
                let r = &mut records[i.index(n)];
                for m in ms {
                    apply(r, m);
                }
                file = f.header.clone();
                for r in &records {
                    file.extend_from_slice(r);
                }
            }
            SegCase::File(ms) => {
                file = f.header.clone();
                for r in &records {
                    file.extend_from_slice(r);
                }
                for m in ms {
                    apply(&mut file, m);
                }
            }
        }
        // Pointers as a parent would hold them, some of them damaged.
        let mut ptrs = f.ptrs.clone();
        for (i, ms) in &ptr_muts {
            let (p, _) = &mut ptrs[i.index(n)];
            let mut b = p.to_bytes().to_vec();
            for m in ms {
                apply(&mut b, m);
            }
            if let Ok(q) = BlockPtr::from_bytes(&b) {
                *p = q;
            }
        }
        let _ = format::decode_segment_header(&file);
        let storage = MemStorage::new();
        storage.create_dir(format::SEGMENT_DIR).unwrap();
        storage
            .write_file(&format::segment_file_name(1), &file)
            .unwrap();
        match &mirror {
            MirrorCase::Intact => storage.write_file(&mirror_file_name(1), &f.mirror).unwrap(),
            MirrorCase::Missing => {}
            MirrorCase::Damaged(ms) => {
                let mut b = f.mirror.clone();
                for m in ms {
                    apply(&mut b, m);
                }
                storage.write_file(&mirror_file_name(1), &b).unwrap();
            }
        }
        let io = mem_io(&storage, &f.key, CipherKind::Aes256GcmSiv, f.domain, 2);
        let oks = read_everything(&io, &ptrs);
        let unchanged = file == [f.header.clone(), f.records.concat()].concat() && ptrs == f.ptrs;
        prop_assert!(
            !unchanged || oks.iter().all(|&x| x),
            "the intact segment reads back"
        );
        // A tree node whose segment copy is damaged is read from the intact mirror.
        for ((p, kind), ok) in ptrs.iter().zip(&oks) {
            if *kind == BlockKind::Node
                && matches!(mirror, MirrorCase::Intact)
                && f.ptrs.contains(&(*p, *kind))
            {
                prop_assert!(*ok, "the node reads from its mirror");
            }
        }
        Ok(())
    });
}

// ----- tree operations on authenticated nodes -----------------------------------------

#[derive(Clone, Debug)]
enum TreeOp {
    Get(Vec<u8>),
    Range(Vec<u8>, Vec<u8>),
    Insert(Vec<u8>, Vec<u8>),
    Remove(Vec<u8>),
    Walk,
}

fn tree_op() -> impl Strategy<Value = TreeOp> {
    let k = || vec(any::<u8>(), 0..20);
    prop_oneof![
        k().prop_map(TreeOp::Get),
        (k(), k()).prop_map(|(a, b)| TreeOp::Range(a, b)),
        (k(), vec(any::<u8>(), 0..2000)).prop_map(|(a, b)| TreeOp::Insert(a, b)),
        k().prop_map(TreeOp::Remove),
        Just(TreeOp::Walk),
    ]
}

/// Runs tree operations on a tree whose root was decoded from authenticated bytes.
fn run_tree_ops(io: &BlockIo, root: BlockPtr, ops: &[TreeOp]) {
    let mut t = Tree::from_ptr(root);
    for op in ops {
        match op {
            TreeOp::Get(k) => {
                let _ = t.get(io, k);
            }
            TreeOp::Range(a, b) => {
                let _ = t.collect(io, a, b, 1000);
            }
            TreeOp::Insert(k, v) => {
                let _ = t.insert(io, k, v.clone());
            }
            TreeOp::Remove(k) => {
                let _ = t.remove(io, k);
            }
            TreeOp::Walk => {
                let mut nodes = 0;
                let _ = t.walk(
                    io,
                    &mut |_| {
                        nodes += 1;
                        nodes < 10_000
                    },
                    &mut |_, _| Ok(()),
                    &mut |_, _| {},
                );
            }
        }
    }
    if let Ok(p) = t.flush(io) {
        let _ = Tree::from_ptr(p).collect(io, b"", b"\xff\xff", 10_000);
    }
}

#[test]
fn tree_nodes_behind_the_aead() {
    let storage = MemStorage::new();
    storage.create_dir(format::SEGMENT_DIR).unwrap();
    let key = SecretKey::random();
    let io = mem_io(&storage, &key, CipherKind::XChaCha20Poly1305, [8; 16], 1);
    // Real leaves, so that internal nodes lead somewhere.
    let mut leaves = Vec::new();
    for i in 0..4u8 {
        let mut n = Node::empty_leaf();
        for j in 0..20u8 {
            n.keys.push(vec![i * 64 + j * 3]);
            n.vals.push(vec![j; usize::from(j) * 10]);
        }
        leaves.push(io.store(&n).unwrap());
    }
    let internal_bytes = (vec(0..4usize, 1..6), 0..600usize).prop_map({
        let leaves = leaves.clone();
        move |(kids, pad)| {
            let mut n = Node::empty_leaf();
            n.leaf = false;
            for (i, k) in kids.iter().enumerate() {
                n.keys.push(if i == 0 {
                    Vec::new()
                } else {
                    vec![i as u8 * 50]
                });
                n.kids.push(Child::Clean(leaves[*k]));
            }
            let mut b = n.encode();
            b.resize(b.len() + pad, 0);
            b
        }
    });
    let nodes = prop_oneof![
        1 => arbitrary_bytes(512),
        3 => mutated(node_bytes()),
        3 => mutated(internal_bytes.clone()),
        1 => internal_bytes,
    ];
    fuzz(
        "tree nodes sealed",
        1,
        (nodes, vec(tree_op(), 1..8)),
        |(plain, ops)| {
            let root = io.write_block(BlockKind::Node, &plain).unwrap();
            let _ = io.load(&root);
            run_tree_ops(&io, root, &ops);
            io.forget_caches();
            Ok(())
        },
    );
}

// ----- volumes, full path -------------------------------------------------------------

/// The real keystore for the data keys; generation marks in memory, so that opening
/// a volume thousands of times writes nothing and never reports a rollback.
struct FuzzKms(LocalKeystore);

impl Kms for FuzzKms {
    fn generate_data_key(
        &self,
        cmk: Option<&str>,
        ctx: &EncryptionContext,
    ) -> Result<(DataKey, WrappedKey), KmsError> {
        self.0.generate_data_key(cmk, ctx)
    }
    fn decrypt(&self, wrapped: &WrappedKey, ctx: &EncryptionContext) -> Result<DataKey, KmsError> {
        self.0.decrypt(wrapped, ctx)
    }
    fn re_encrypt(
        &self,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
        dest: Option<&str>,
    ) -> Result<WrappedKey, KmsError> {
        self.0.re_encrypt(wrapped, ctx, dest)
    }
    fn generation_mark(&self, _volume_id: &[u8; 16]) -> Result<Option<u64>, KmsError> {
        Ok(None)
    }
    fn record_generation(&self, _volume_id: &[u8; 16], _generation: u64) -> Result<(), KmsError> {
        Ok(())
    }
}

fn fuzz_kms(dir: &Path) -> FuzzKms {
    let keyfile = dir.join("keyfile");
    std::fs::write(&keyfile, filler(99, 64)).unwrap();
    std::fs::set_permissions(
        &keyfile,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    FuzzKms(LocalKeystore::open_or_create(&dir.join("keystore"), Unlock::Keyfile(keyfile)).unwrap())
}

/// A stored tree node and where its pointer sits in its parent.
struct StoredNode {
    plain: Vec<u8>,
    parent: Option<(usize, usize)>,
}

struct VolFixture {
    _dir: tempfile::TempDir,
    kms: FuzzKms,
    /// The volume as committed (every file durable).
    pristine: MemStorage,
    header: Header,
    cipher: CipherKind,
    root_key: SecretKey,
    block_key: SecretKey,
    /// The root record files (`kmsfs.root` and any further slots), the newest first.
    root_slots: Vec<String>,
    /// The newest root record: its generation, payload and file.
    generation: u64,
    payload: RootPayload,
    root_file: Vec<u8>,
    header_file: Vec<u8>,
    /// Nodes of the live tree and of snapshot `s1`, pre-order.
    trees: [Vec<StoredNode>; 2],
}

fn populate(v: &Volume) {
    let d = v.mkdir(ROOT_INO, b"dir", 0o755, 1, 1).unwrap();
    let sub = v.mkdir(d.ino, b"sub", 0o700, 1, 1).unwrap();
    let big = v.create(sub.ino, b"big", 0o644, 1, 1).unwrap();
    v.write(big.ino, 0, &filler(1, 4096 * 5 + 100)).unwrap();
    let sparse = v.create(ROOT_INO, b"sparse", 0o600, 0, 0).unwrap();
    v.write(sparse.ino, 300_000, b"tail").unwrap();
    v.symlink(ROOT_INO, b"link", b"dir/sub/big", 0, 0).unwrap();
    v.setxattr(big.ino, b"user.small", b"value", 0).unwrap();
    v.setxattr(big.ino, b"user.large", &filler(2, 3000), 0)
        .unwrap();
    v.link(big.ino, ROOT_INO, b"hardlink").unwrap();
    v.snapshot_create("s1").unwrap();
    // Enough entries for a tree of more than one level.
    for i in 0..150u32 {
        let name = format!("file-{i:04}-{}", "x".repeat(40));
        let a = v.create(d.ino, name.as_bytes(), 0o644, i, i).unwrap();
        if i % 10 == 0 {
            v.write(a.ino, 0, &filler(u64::from(i) + 3, 5000)).unwrap();
        }
    }
    v.write(big.ino, 4096, b"changed after the snapshot")
        .unwrap();
    // A file unlinked while open: an orphan record, purged at the next read-write open.
    let o = v.create(ROOT_INO, b"orphan", 0o644, 0, 0).unwrap();
    v.write(o.ino, 0, b"open").unwrap();
    v.open_file(o.ino).unwrap();
    v.unlink(ROOT_INO, b"orphan").unwrap();
    v.commit().unwrap();
}

fn tree_nodes(io: &BlockIo, root: BlockPtr) -> Vec<StoredNode> {
    fn go(io: &BlockIo, p: BlockPtr, parent: Option<(usize, usize)>, out: &mut Vec<StoredNode>) {
        let plain = io.read_block(&p, BlockKind::Node).unwrap();
        let n = Node::decode(&plain).unwrap();
        let me = out.len();
        out.push(StoredNode { plain, parent });
        for (i, k) in n.kids.iter().enumerate() {
            if let Child::Clean(c) = k {
                go(io, *c, Some((me, i)), out);
            }
        }
    }
    let mut out = Vec::new();
    go(io, root, None, &mut out);
    out
}

fn next_segment(s: &MemStorage) -> u64 {
    s.list(format::SEGMENT_DIR)
        .unwrap()
        .iter()
        .filter_map(|n| format::parse_segment_file_name(n))
        .max()
        .unwrap_or(0)
        + 1
}

fn volume_fixture() -> &'static VolFixture {
    static F: OnceLock<VolFixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let kms = fuzz_kms(dir.path());
        let storage = MemStorage::new();
        let opts = CreateOptions {
            block_size: 4096,
            segment_size: 1 << 20,
            ..Default::default()
        };
        Volume::init(Arc::new(storage.clone()), &kms, &opts).unwrap();
        let v = Volume::open(Arc::new(storage.clone()), &kms, OpenOptions::default()).unwrap();
        populate(&v);
        drop(v);
        let pristine = storage.reboot();
        let header_file = pristine.read(format::HEADER_FILE).unwrap();
        let header = Header::decode(&header_file).unwrap();
        let wrapped = WrappedKey {
            cmk_id: header.cmk_id.clone(),
            cmk_version: header.cmk_version,
            ciphertext: header.wrapped_dk.clone(),
        };
        let dk = kms
            .decrypt(&wrapped, &EncryptionContext::for_volume(&header.key_domain))
            .unwrap();
        let cipher = CipherKind::from_u8(header.cipher).unwrap();
        let root_key = derive_subkey(&dk, labels::ROOT);
        let block_key = derive_subkey(&dk, labels::BLOCK);
        let root_slots = root_slots(&pristine);
        let root_file = pristine.read(&root_slots[0]).unwrap();
        let (_, generation, prefix, sealed) = format::split_root(&root_file).unwrap();
        let plain = Sealer::new(cipher, &root_key).open(prefix, sealed).unwrap();
        let payload = RootPayload::decode(&plain).unwrap();
        assert_eq!(payload.snapshots.len(), 1);
        let io = mem_io(
            &pristine,
            &block_key,
            cipher,
            header.key_domain,
            next_segment(&pristine),
        );
        let live = tree_nodes(&io, payload.tree);
        let snap = tree_nodes(&io, payload.snapshots[0].tree);
        assert!(live.len() > 2, "the live tree has more than one level");
        drop(io);
        let f = VolFixture {
            _dir: dir,
            kms,
            pristine,
            header,
            cipher,
            root_key,
            block_key,
            root_slots,
            generation,
            payload,
            root_file,
            header_file,
            trees: [live, snap],
        };
        // The fixture opens and checks clean in every mode the fuzzing uses.
        for mode in [Mode::ReadOnly, Mode::ReadWrite, Mode::Snapshot] {
            let v = open_volume(&f, f.pristine.reboot(), mode).unwrap();
            assert!(v.fsck().unwrap().is_clean());
        }
        f
    })
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    ReadOnly,
    ReadWrite,
    Snapshot,
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![
        Just(Mode::ReadOnly),
        Just(Mode::ReadWrite),
        Just(Mode::Snapshot)
    ]
}

fn open_volume(f: &VolFixture, storage: MemStorage, mode: Mode) -> kmsfs::error::Result<Volume> {
    let opts = OpenOptions {
        read_only: matches!(mode, Mode::ReadOnly),
        cache_bytes: 4 << 20,
        snapshot: matches!(mode, Mode::Snapshot).then(|| "s1".to_string()),
        accept_rollback: false,
    };
    Volume::open(Arc::new(storage), &f.kms, opts)
}

/// Uses an opened volume the way a mount, `fsck` and the control socket would, within
/// bounds (a damaged tree may describe cycles or huge files).
fn exercise(v: &Volume, writable: bool) {
    let _ = v.statfs();
    let _ = v.stored_bytes();
    let _ = v.snapshot_list();
    let _ = v.fsck();
    let mut stack = vec![(ROOT_INO, 0u32)];
    let mut seen = BTreeSet::new();
    let mut entries = Vec::new();
    while let Some((ino, depth)) = stack.pop() {
        if !seen.insert(ino) || seen.len() > 48 {
            continue;
        }
        if let Ok(a) = v.getattr(ino) {
            let size = a.inode.size;
            let _ = v.read(ino, 0, 70_000);
            let _ = v.read(ino, 0, 300 << 10);
            let _ = v.read(ino, size.saturating_sub(5000), 10_000);
            let _ = v.read(ino, size.saturating_sub(1), 200 << 10);
        }
        let _ = v.readlink(ino);
        if let Ok(names) = v.listxattr(ino) {
            for n in names.iter().take(8) {
                let _ = v.getxattr(ino, n);
            }
        }
        if let Ok(items) = v.readdir(ino, 0, 64) {
            for it in items {
                if it.name == b"." || it.name == b".." {
                    continue;
                }
                let _ = v.lookup(ino, &it.name);
                let _ = v.readdir(ino, it.offset, 3);
                entries.push((ino, it.name.clone(), it.ino));
                if depth < 4 {
                    stack.push((it.ino, depth + 1));
                }
            }
        }
    }
    if !writable {
        return;
    }
    if let Ok(a) = v.create(ROOT_INO, b"fuzz-new", 0o644, 0, 0) {
        let _ = v.write(a.ino, 0, &[7u8; 5000]);
    }
    let _ = v.mkdir(ROOT_INO, b"fuzz-dir", 0o755, 0, 0);
    for (parent, name, ino) in entries.iter().take(3) {
        let _ = v.write(*ino, 4000, b"written by the fuzz test");
        let _ = v.setattr(
            *ino,
            &SetAttr {
                size: Some(10),
                ..Default::default()
            },
        );
        let _ = v.setxattr(*ino, b"user.fuzz", b"v", 0);
        let _ = v.removexattr(*ino, b"user.small");
        let _ = v.fallocate(*ino, 0, 8192, 0);
        let _ = v.link(*ino, ROOT_INO, b"fuzz-link");
        let _ = v.rename(
            *parent,
            name,
            ROOT_INO,
            b"fuzz-renamed",
            RenameFlags::default(),
        );
        let _ = v.unlink(ROOT_INO, b"fuzz-renamed");
        let _ = v.rmdir(ROOT_INO, b"fuzz-renamed");
    }
    let _ = v.commit();
    let _ = v.snapshot_create("fuzz");
    let _ = v.snapshot_delete("s1");
    let _ = v.clean(0.5);
}

fn seal_root(f: &VolFixture, plain: &[u8]) -> Vec<u8> {
    let sealer = Sealer::new(f.cipher, &f.root_key);
    let sealed_len = sealer.sealed_len(plain.len());
    let mut b = format::root_prefix(&f.header.volume_id, f.generation, sealed_len as u32);
    let aad = b.clone();
    sealer.seal_into(&aad, plain, &mut b);
    b
}

fn with_file(s: &MemStorage, name: &str, bytes: Vec<u8>) {
    s.with_file(name, |d| *d = bytes).unwrap();
}

/// The root record files of a volume (`kmsfs.root`, and `kmsfs.root.N` where a
/// volume keeps more than one slot), the newest generation first.
fn root_slots(s: &MemStorage) -> Vec<String> {
    let mut slots: Vec<(u64, String)> = s
        .names()
        .into_iter()
        .filter(|n| {
            n == format::ROOT_FILE
                || n.strip_prefix(format::ROOT_FILE)
                    .and_then(|rest| rest.strip_prefix('.'))
                    .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|n| {
            let generation = format::split_root(&s.read(&n).unwrap()).unwrap().1;
            (generation, n)
        })
        .collect();
    slots.sort_by(|a, b| b.cmp(a));
    assert!(!slots.is_empty(), "the volume has a root record");
    slots.into_iter().map(|(_, n)| n).collect()
}

/// Replaces the newest root record, and with `all` every other slot too (so that
/// opening cannot fall back to an older, intact one).
fn write_root(f: &VolFixture, s: &MemStorage, bytes: &[u8], all: bool) {
    let n = if all { f.root_slots.len() } else { 1 };
    for name in &f.root_slots[..n] {
        with_file(s, name, bytes.to_vec());
    }
}

/// Opens and uses the volume; counts the opens that succeeded in `opened`.
fn open_and_exercise(f: &VolFixture, storage: MemStorage, mode: Mode, opened: &AtomicUsize) {
    if let Ok(v) = open_volume(f, storage, mode) {
        opened.fetch_add(1, Ordering::Relaxed);
        exercise(&v, matches!(mode, Mode::ReadWrite));
    }
}

/// The fuzzing reached past the decoders: some damaged volumes still opened.
fn assert_some_opened(name: &str, opened: &AtomicUsize) {
    let n = opened.load(Ordering::Relaxed);
    eprintln!("{name}: {n} damaged volumes opened and used");
    assert!(n > 0, "{name}: no case got past opening the volume");
}

#[test]
fn volume_header_full_path() {
    let f = volume_fixture();
    let opened = AtomicUsize::new(0);
    let cases = (mutated(Just(f.header_file.clone())), any::<bool>(), mode());
    fuzz("volume header", 1, cases, |(bytes, both, mode)| {
        let s = f.pristine.reboot();
        with_file(&s, format::HEADER_FILE, bytes.clone());
        if both {
            with_file(&s, format::HEADER_BACKUP_FILE, bytes);
        }
        open_and_exercise(f, s, mode, &opened);
        Ok(())
    });
    assert_some_opened("volume header", &opened);
}

#[test]
fn root_record_full_path() {
    let f = volume_fixture();
    let opened = AtomicUsize::new(0);
    // The root file as stored: prefix, then the sealed payload.
    let cases = (
        prop_oneof![1 => behind_magic(format::ROOT_MAGIC, 300), 4 => mutated(Just(f.root_file.clone()))],
        mode(),
        any::<bool>(),
    );
    fuzz("root file", 1, cases, |(bytes, mode, all)| {
        let s = f.pristine.reboot();
        write_root(f, &s, &bytes, all);
        open_and_exercise(f, s, mode, &AtomicUsize::new(0));
        Ok(())
    });
    // The payload behind the AEAD, sealed again with the volume's root key.
    let cases = (
        prop_oneof![1 => arbitrary_bytes(200), 4 => mutated(Just(f.payload.encode()))],
        mode(),
        prop::bool::weighted(0.8),
    );
    fuzz("root payload sealed", 1, cases, |(plain, mode, all)| {
        let s = f.pristine.reboot();
        write_root(f, &s, &seal_root(f, &plain), all);
        open_and_exercise(f, s, mode, &opened);
        Ok(())
    });
    assert_some_opened("root payload sealed", &opened);
}

#[derive(Clone, Debug)]
enum NodeEdit {
    /// Byte mutations of the node's plaintext.
    Bytes(Vec<Mutation>),
    /// Mutations of one entry's key or value; the node stays well formed, so the
    /// damage reaches what reads the entry (inodes, entries, block maps, xattrs).
    Entry {
        at: Index,
        key: bool,
        muts: Vec<Mutation>,
    },
}

fn node_edit() -> impl Strategy<Value = NodeEdit> {
    prop_oneof![
        1 => vec(mutation(), 1..=3).prop_map(NodeEdit::Bytes),
        2 => (any::<Index>(), any::<bool>(), vec(mutation(), 1..=3))
            .prop_map(|(at, key, muts)| NodeEdit::Entry { at, key, muts }),
    ]
}

fn edit_node(plain: &[u8], edit: &NodeEdit) -> Vec<u8> {
    match edit {
        NodeEdit::Bytes(ms) => {
            let mut b = plain.to_vec();
            for m in ms {
                apply(&mut b, m);
            }
            b
        }
        NodeEdit::Entry { at, key, muts } => {
            let mut n = Node::decode(plain).unwrap();
            if n.keys.is_empty() {
                return plain.to_vec();
            }
            let i = at.index(n.keys.len());
            if n.leaf && !key {
                for m in muts {
                    apply(&mut n.vals[i], m);
                }
            } else if !n.leaf && !key {
                if let Child::Clean(p) = &mut n.kids[i] {
                    let mut b = p.to_bytes().to_vec();
                    for m in muts {
                        apply(&mut b, m);
                    }
                    if let Ok(q) = BlockPtr::from_bytes(&b) {
                        *p = q;
                    }
                }
            } else {
                let mut k = n.keys[i].clone();
                for m in muts {
                    apply(&mut k, m);
                }
                k.truncate(u16::MAX as usize);
                // Keep the keys strictly ordered: drop an entry the new key collides
                // with or would pass.
                let lo = i.checked_sub(1).map(|j| n.keys[j].clone());
                let hi = n.keys.get(i + 1).cloned();
                if lo.is_none_or(|lo| lo < k) && hi.is_none_or(|hi| k < hi) {
                    n.keys[i] = k;
                }
            }
            let mut b = n.encode();
            b.resize(b.len().next_multiple_of(512), 0);
            b
        }
    }
}

#[test]
fn tree_node_full_path() {
    let f = volume_fixture();
    let opened = AtomicUsize::new(0);
    let cases = (
        prop::bool::weighted(0.25),
        any::<Index>(),
        node_edit(),
        mode(),
    );
    fuzz(
        "volume tree node",
        1,
        cases,
        |(snapshot, at, edit, mode)| {
            let nodes = &f.trees[usize::from(snapshot)];
            let target = at.index(nodes.len());
            let plain = edit_node(&nodes[target].plain, &edit);
            let s = f.pristine.reboot();
            let io = mem_io(
                &s,
                &f.block_key,
                f.cipher,
                f.header.key_domain,
                next_segment(&s),
            );
            // Store the node, then new copies of its ancestors up to the root.
            let mut ptr = io.write_block(BlockKind::Node, &plain).unwrap();
            let mut cur = target;
            while let Some((parent, kid)) = nodes[cur].parent {
                let mut n = Node::decode(&nodes[parent].plain).unwrap();
                n.kids[kid] = Child::Clean(ptr);
                let mut b = n.encode();
                b.resize(b.len().next_multiple_of(512), 0);
                ptr = io.write_block(BlockKind::Node, &b).unwrap();
                cur = parent;
            }
            io.sync().unwrap();
            let mut payload = f.payload.clone();
            if snapshot {
                payload.snapshots[0].tree = ptr;
            } else {
                payload.tree = ptr;
            }
            payload.next_segment = next_segment(&s);
            write_root(f, &s, &seal_root(f, &payload.encode()), true);
            let mode = if snapshot { Mode::Snapshot } else { mode };
            open_and_exercise(f, s, mode, &opened);
            Ok(())
        },
    );
    assert_some_opened("volume tree node", &opened);
}

// ----- control socket, full path ------------------------------------------------------

#[test]
fn control_socket_full_path() {
    let dir = tempfile::tempdir().unwrap();
    let kms = fuzz_kms(dir.path());
    let vdir = dir.path().join("vol");
    std::fs::create_dir(&vdir).unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FsStorage::new(&vdir));
    let opts = CreateOptions {
        block_size: 4096,
        segment_size: 1 << 20,
        ..Default::default()
    };
    Volume::init(storage.clone(), &kms, &opts).unwrap();
    let v = Volume::open(storage, &kms, OpenOptions::default()).unwrap();
    let a = v.create(ROOT_INO, b"f", 0o644, 0, 0).unwrap();
    v.write(a.ino, 0, b"data").unwrap();
    // The server holds the volume only while it serves a request: keep it here.
    let vol = Arc::new(v);
    let _server = ControlServer::start(vol.clone(), &vdir).unwrap();
    let sock = control::socket_path(&vdir);
    let send = |bytes: &[u8]| -> Vec<u8> {
        let mut c = UnixStream::connect(&sock).expect("the control server is still there");
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        c.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        let _ = c.write_all(bytes);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        out
    };
    let cases = prop_oneof![
        2 => arbitrary_bytes(64),
        // Names are kept short of NAME_MAX so snapshot creation is tried often.
        4 => mutated(request_strategy().prop_map(|r| line(&r))),
        1 => request_strategy().prop_map(|r| line(&r)),
    ];
    fuzz("control socket", 2, cases, |bytes| {
        let answer = send(&bytes);
        // Every request line gets one answer line (past 64 KiB the server stops
        // reading, and the client may see the connection reset).
        if !bytes.is_empty() && bytes.len() <= 60_000 {
            prop_assert_eq!(answer.iter().filter(|&&b| b == b'\n').count(), 1);
            prop_assert!(answer.ends_with(b"\n"));
            let r = control::parse_response(&answer);
            prop_assert!(
                r.is_ok(),
                "unparsable answer {:?}",
                String::from_utf8_lossy(&answer)
            );
        }
        Ok(())
    });
    // Still serving.
    control::request(&vdir, &Request::Stats).unwrap();
}
