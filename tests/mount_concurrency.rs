//! Several threads reading and writing different files and the same file
//! through one mount, with every byte verified.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Env, pattern};

const CHUNK: usize = 48 << 10; // not block-aligned on purpose
const CHUNKS: usize = 24;

#[test]
fn threads_on_different_and_same_files() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    let root: PathBuf = m.path.clone();
    let shared = root.join("shared");
    File::create(&shared).unwrap();
    let reads = Arc::new(AtomicUsize::new(0));

    let mut handles = Vec::new();
    // Own files: write at scattered offsets, read back, rewrite, verify.
    for t in 0..3u64 {
        let root = root.clone();
        let reads = reads.clone();
        handles.push(std::thread::spawn(move || {
            let p = root.join(format!("own-{t}"));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)
                .unwrap();
            let order: Vec<usize> = (0..CHUNKS).map(|i| (i * 7 + t as usize) % CHUNKS).collect();
            for round in 0..2u64 {
                for &i in &order {
                    let data = pattern(CHUNK, t * 1000 + round * 100 + i as u64);
                    f.write_all_at(&data, (i * CHUNK) as u64).unwrap();
                    let mut back = vec![0u8; CHUNK];
                    f.read_exact_at(&mut back, (i * CHUNK) as u64).unwrap();
                    assert!(back == data, "thread {t}: chunk {i} read back wrong");
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }
            f.sync_all().unwrap();
            let all = fs::read(&p).unwrap();
            for i in 0..CHUNKS {
                assert!(
                    all[i * CHUNK..(i + 1) * CHUNK] == pattern(CHUNK, t * 1000 + 100 + i as u64)
                );
            }
        }));
    }
    // The same file: two writers own interleaved stripes, a reader checks
    // that every stripe is either not yet written (zeros) or complete.
    for t in 0..2usize {
        let shared = shared.clone();
        handles.push(std::thread::spawn(move || {
            let f = OpenOptions::new().write(true).open(&shared).unwrap();
            for i in (t..CHUNKS * 2).step_by(2) {
                f.write_all_at(&pattern(CHUNK, 50_000 + i as u64), (i * CHUNK) as u64)
                    .unwrap();
            }
            f.sync_data().unwrap();
        }));
    }
    {
        let shared = shared.clone();
        let reads = reads.clone();
        handles.push(std::thread::spawn(move || {
            let f = File::open(&shared).unwrap();
            for _ in 0..4 {
                for i in 0..CHUNKS * 2 {
                    let mut buf = vec![0u8; CHUNK];
                    let n = f.read_at(&mut buf, (i * CHUNK) as u64).unwrap();
                    if n == 0 {
                        continue;
                    }
                    // Mid-write, a stripe may be partly there: every byte is
                    // either not yet written (zero) or the expected one.
                    let want = pattern(CHUNK, 50_000 + i as u64);
                    let foreign = buf[..n]
                        .iter()
                        .zip(&want)
                        .position(|(g, w)| *g != 0 && g != w);
                    assert!(
                        foreign.is_none(),
                        "stripe {i} holds a foreign byte at {foreign:?}"
                    );
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    let all = fs::read(&shared).unwrap();
    assert_eq!(all.len(), CHUNKS * 2 * CHUNK);
    for i in 0..CHUNKS * 2 {
        assert!(
            all[i * CHUNK..(i + 1) * CHUNK] == pattern(CHUNK, 50_000 + i as u64),
            "shared stripe {i}"
        );
    }
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert_eq!(m.unmount(), Some(0));

    // And the same after a remount (cold caches).
    let m = env.mount();
    let all = fs::read(m.p("shared")).unwrap();
    for i in 0..CHUNKS * 2 {
        assert!(all[i * CHUNK..(i + 1) * CHUNK] == pattern(CHUNK, 50_000 + i as u64));
    }
    for t in 0..3u64 {
        let all = fs::read(m.p(&format!("own-{t}"))).unwrap();
        for i in 0..CHUNKS {
            assert!(all[i * CHUNK..(i + 1) * CHUNK] == pattern(CHUNK, t * 1000 + 100 + i as u64));
        }
    }
    m.unmount();
    env.assert_fsck_clean();
}
