//! Memory is bounded by settings: the daemon states its bound at mount time
//! (`kmsfs::cli::memory_bound`, from `cache_size` and its request threads),
//! and its peak resident memory (VmHWM) under a streaming write, a read-back
//! and thousands of small files stays below it, for a tiny, a small and a
//! larger cache. A smaller cache also gives a smaller peak.

mod common;

use std::fs;
use std::io::{Read, Write};

use common::{Env, pattern};

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
}

#[test]
fn peak_memory_stays_within_the_stated_bound() {
    require_fuse!();
    let mut peaks = Vec::new();
    for cache in ["1K", "8M", "64M"] {
        let env = Env::new();
        let m = env.mount_with(&format!("cache_size={cache}"), &[]);
        workload(&m);
        let peak = peak_rss(m.pid);
        let bound = stated_bound(&env.log_text());
        assert!(
            peak <= bound,
            "cache_size={cache}: peak RSS {} MiB over the stated bound {} MiB",
            peak >> 20,
            bound >> 20
        );
        eprintln!(
            "cache_size={cache}: peak RSS {} MiB, bound {} MiB",
            peak >> 20,
            bound >> 20
        );
        peaks.push(peak);
        m.unmount();
    }
    // The bound is not just loose: 64M of cache costs more than 1K does.
    assert!(peaks[2] > peaks[0], "{peaks:?}");
}
