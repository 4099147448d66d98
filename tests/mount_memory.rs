//! Memory is bounded by settings: the daemon states its bound at mount time
//! (`kmsfs::cli::memory_bound`, from `cache_size` and its request threads),
//! and its peak resident memory (VmHWM) under a streaming write, a read-back
//! and thousands of small files stays below it, for a tiny, a small and a
//! larger cache. The bound is not loose: a hot set read again and again
//! fills the larger cache (the daemon reports what its cache holds) while the
//! peak stays below the bound.

mod common;

use std::fs;
use std::io::{Read, Write};

use std::os::fd::AsFd;

use common::{Env, pattern};
use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};

/// The daemon's peak resident memory, in bytes.
fn peak_rss(pid: i32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb * 1024
}

/// The bound the daemon logged: "memory: at most about N MiB".
fn stated_bound(log: &str) -> u64 {
    let at = log
        .find("at most about ")
        .expect("the mount states its memory bound");
    let n: u64 = log[at + 14..]
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a number of MiB");
    n << 20
}

fn workload(m: &common::Mount) {
    // 192 MiB streamed in 1 MiB writes, then read back.
    let chunk = pattern(1 << 20, 3);
    let mut f = fs::File::create(m.p("stream")).unwrap();
    for _ in 0..192 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let mut buf = vec![0u8; 1 << 20];
    let mut f = fs::File::open(m.p("stream")).unwrap();
    while f.read(&mut buf).unwrap() > 0 {}
    // 8,000 small files (each a partial block buffered until write-back).
    fs::create_dir(m.p("many")).unwrap();
    for i in 0..8000usize {
        fs::write(m.p(&format!("many/f{i}")), &chunk[..(i * 37) % 5000]).unwrap();
    }
    // A 40 MiB hot set read four times. Before each pass its pages are dropped
    // from the kernel's page cache, so every pass reaches the daemon; the
    // decrypted-block cache admits blocks that are asked for again (a one-pass
    // stream, like the read-back above, is not kept), so a cache larger than
    // the hot set ends up holding most of it.
    let mut f = fs::File::create(m.p("hot")).unwrap();
    for _ in 0..40 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    for _ in 0..4 {
        let mut f = fs::File::open(m.p("hot")).unwrap();
        posix_fadvise(f.as_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED).unwrap();
        let mut n = 0usize;
        loop {
            let got = f.read(&mut buf).unwrap();
            if got == 0 {
                break;
            }
            n += got;
        }
        assert_eq!(n, 40 << 20, "the hot file reads back whole");
    }
}

#[test]
fn peak_memory_stays_within_the_stated_bound() {
    require_fuse!();
    let mut held_by = Vec::new();
    for cache in ["1K", "8M", "64M"] {
        let env = Env::new();
        let m = env.mount_with(&format!("cache_size={cache}"), &[]);
        workload(&m);
        let peak = peak_rss(m.pid);
        let stats = env.info_json()["mount_cache"].clone();
        let held = stats["cache_bytes"]
            .as_u64()
            .expect("the mount reports its cache");
        let capacity = stats["cache_capacity"].as_u64().expect("and its capacity");
        assert!(held <= capacity, "cache_size={cache}: {stats}");
        let bound = stated_bound(&env.log_text());
        assert!(
            peak <= bound,
            "cache_size={cache}: peak RSS {} MiB over the stated bound {} MiB",
            peak >> 20,
            bound >> 20
        );
        eprintln!(
            "cache_size={cache}: peak RSS {} MiB, bound {} MiB, cache holds {} KiB",
            peak >> 20,
            bound >> 20,
            held >> 10
        );
        held_by.push(held);
        m.unmount();
    }
    // The bound held while the caches were in use: the 64M cache holds most of
    // the 40 MiB hot set (so its memory was inside the peak), the 1K cache
    // nothing of it.
    assert!(held_by[2] >= 24 << 20, "64M cache holds {held_by:?}");
    assert!(held_by[0] <= 1024, "1K cache holds {held_by:?}");
}
