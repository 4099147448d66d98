//! Block fill (src/fuse/fill.rs): after a read smaller than a block, the rest
//! of the block reaches the kernel's page cache, with the bytes the file
//! holds; `noblockfill` turns it off. And the fill never costs a write: a
//! writer racing small readers, with truncations, loses nothing (checked
//! right after every close, through a dropped page cache and after a remount).

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Env, pattern, wait_until};
use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};

const BLOCK: u64 = 64 << 10;

/// Bytes of `path` in the page cache (util-linux `fincore`).
fn resident(path: &Path) -> u64 {
    let o = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .expect("fincore (util-linux) runs");
    assert!(o.status.success(), "fincore: {}", common::output_text(&o));
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("fincore's output: {:?}", o.stdout))
}

/// Drops the file's clean pages from the page cache.
fn drop_pages(path: &Path) {
    let f = File::open(path).unwrap();
    posix_fadvise(f.as_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED).unwrap();
}

/// A reader without kernel readahead (as fio's random readers are).
fn random_reader(path: &Path) -> File {
    let f = File::open(path).unwrap();
    posix_fadvise(f.as_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_RANDOM).unwrap();
    f
}

fn read_all(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap()
}

#[test]
fn a_small_read_fills_its_block_with_the_files_bytes() {
    require_fuse!();
    let env = Env::new();
    let data = pattern(16 * BLOCK as usize + 5000, 7);
    {
        // Over /dev/fuse: a mount over io_uring (`uring=auto` on a kernel with
        // enable_uring=Y) has no block fill.
        let m = env.mount_with("uring=off", &[]);
        let f = m.p("f");
        fs::write(&f, &data).unwrap();
        File::open(&f).unwrap().sync_all().unwrap();
        drop_pages(&f);
        assert_eq!(resident(&f), 0, "the page cache starts empty");

        // 4 KiB inside block 3, and 100 bytes of the short last block.
        let r = random_reader(&f);
        let mut b = vec![0u8; 4096];
        r.read_exact_at(&mut b, 3 * BLOCK + 8192).unwrap();
        assert_eq!(b[..], data[(3 * BLOCK + 8192) as usize..][..4096]);
        let mut tail = vec![0u8; 100];
        r.read_exact_at(&mut tail, 16 * BLOCK + 100).unwrap();
        assert_eq!(tail[..], data[(16 * BLOCK + 100) as usize..][..100]);
        // Block 3 (64 KiB) and the last block's 5000 bytes (two pages).
        wait_until(
            "the blocks in the page cache",
            Duration::from_secs(30),
            || resident(&f) >= BLOCK + 8192,
        );
        assert!(
            resident(&f) <= 2 * BLOCK + 8192,
            "only the blocks read are filled ({} bytes resident)",
            resident(&f)
        );
        // What the page cache now serves is the file's bytes, to the byte.
        let mut blk = vec![0u8; BLOCK as usize];
        r.read_exact_at(&mut blk, 3 * BLOCK).unwrap();
        assert!(
            blk[..] == data[3 * BLOCK as usize..][..BLOCK as usize],
            "filled block 3 differs from the file"
        );
        assert_eq!(read_all(&f), data, "the whole file reads back");
        // The fill did not move the end of the file.
        assert_eq!(fs::metadata(&f).unwrap().len(), data.len() as u64);
        drop(r);
        m.unmount();
    }

    // Off: the page cache keeps what was read and nothing more.
    let m = env.mount_with("noblockfill", &[]);
    let f = m.p("f");
    drop_pages(&f);
    let r = random_reader(&f);
    let mut b = vec![0u8; 4096];
    r.read_exact_at(&mut b, 5 * BLOCK + 4096).unwrap();
    assert_eq!(b[..], data[(5 * BLOCK + 4096) as usize..][..4096]);
    assert!(
        resident(&f) < BLOCK,
        "noblockfill: {} bytes resident after a 4 KiB read",
        resident(&f)
    );
    drop(r);
    m.unmount();
}

/// A small xorshift, so the race is the same every run (the timing is not).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn writes_and_truncations_racing_block_fills_lose_nothing() {
    require_fuse!();
    let env = Env::new();
    // Over /dev/fuse, where the block fill runs (see above).
    let m = env.mount_with("uring=off", &[]);
    let f = m.p("f");
    let mut model = pattern(64 * BLOCK as usize, 11);
    fs::write(&f, &model).unwrap();

    // Two readers keep filling blocks with small random reads.
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2u64)
        .map(|k| {
            let (stop, f) = (stop.clone(), f.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x5eed + k);
                let mut b = vec![0u8; 4096];
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let r = random_reader(&f);
                    let len = r.metadata().unwrap().len();
                    for _ in 0..32 {
                        if len > 4096 {
                            // Short reads at the end are fine: sizes change.
                            let _ = r.read_at(&mut b, rng.below(len - 4096));
                            reads += 1;
                        }
                    }
                    // Now and then the pages go, so fills keep landing.
                    if rng.below(4) == 0 {
                        drop_pages(&f);
                    }
                }
                reads
            })
        })
        .collect();

    let mut rng = Rng(0xfeed);
    for round in 0..400u32 {
        if round % 25 == 24 {
            // A truncation by path (no writable handle), down or up.
            let len = BLOCK * (16 + rng.below(64)) + rng.below(BLOCK);
            nix::unistd::truncate(&f, len as i64).unwrap();
            model.resize(len as usize, 0);
        } else {
            let w = OpenOptions::new().read(true).write(true).open(&f).unwrap();
            let at = rng.below(model.len() as u64 + 4096);
            let len = 1 + rng.below(3 * 4096) as usize;
            let bytes = pattern(len, 1000 + u64::from(round));
            w.write_all_at(&bytes, at).unwrap();
            let end = at as usize + len;
            if end > model.len() {
                model.resize(end, 0);
            }
            model[at as usize..end].copy_from_slice(&bytes);
            drop(w);
            // Right after the close, through the page cache.
            let mut back = vec![0u8; len];
            File::open(&f)
                .unwrap()
                .read_exact_at(&mut back, at)
                .unwrap();
            assert!(
                back == bytes,
                "round {round}: a write at {at} (+{len}) was lost"
            );
        }
        assert_eq!(
            fs::metadata(&f).unwrap().len(),
            model.len() as u64,
            "round {round}: the size"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(reads > 0, "the readers read");

    assert!(read_all(&f) == model, "the file through the page cache");
    drop_pages(&f);
    assert!(read_all(&f) == model, "the file from the daemon");
    m.unmount();
    let m = env.mount();
    assert!(read_all(&m.p("f")) == model, "the file after a remount");
    m.unmount();
    env.assert_fsck_clean();
}
