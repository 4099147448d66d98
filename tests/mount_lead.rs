//! The /dev/fuse reader (vendor/fuser/src/lead.rs): one leader thread reads
//! requests, spins a short adaptive window for the next one, serves metadata
//! itself and hands every other request to a follower; a watchdog
//! hands the reading on when the leader is stuck inside a request.
//!
//! The watchdog test holds the leader inside a request that only a later request
//! can end (the `test-hooks` WAIT/RELEASE xattr pair): without the watchdog no
//! thread would read the later request and the mount would hang.

#![cfg(target_os = "linux")]

mod common;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Env, TIMEOUT, pattern};
use fuser::lead_policy::{Arrival, INLINE_WRITE_BYTES, next_window, served_inline};

const WAIT: &str = "user.kmsfs-test-wait";
const RELEASE: &str = "user.kmsfs-test-release";

/// getxattr(2) into a 64-byte buffer: the value, or the errno.
fn getxattr(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let path = CString::new(p.as_os_str().as_bytes()).unwrap();
    let name = CString::new(name).unwrap();
    let mut buf = vec![0u8; 64];
    // SAFETY: valid C strings and a buffer of buf.len() bytes (nix has no xattr API).
    let got = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if got < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    buf.truncate(usize::try_from(got).unwrap());
    Ok(buf)
}

/// The counts the daemon logs at exit: (served by the leader, handed off, takeovers).
fn lead_counts(log: &str) -> Option<(u64, u64, u64)> {
    let line = log.lines().rev().find(|l| l.contains("fuse lead: "))?;
    let rest = &line[line.find("; ")? + 2..];
    let mut nums = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse::<u64>());
    Some((nums.next()?.ok()?, nums.next()?.ok()?, nums.next()?.ok()?))
}

#[test]
fn a_leader_stuck_in_a_request_is_relieved_by_the_watchdog() {
    let env = Env::new();
    let m = env.mount();
    let f = env.mnt.join("f");
    fs::write(&f, b"x").unwrap();
    let waiter = {
        let f = f.clone();
        std::thread::spawn(move || getxattr(&f, WAIT))
    };
    // The leader serves GETXATTR itself: the WAIT request holds it. Each RELEASE
    // attempt is read only once the watchdog gave the reading to a follower.
    let start = Instant::now();
    let mut released = false;
    while start.elapsed() < TIMEOUT {
        match getxattr(&f, RELEASE) {
            Ok(v) => {
                assert_eq!(v, b"released");
                released = true;
                break;
            }
            Err(e) => assert_eq!(e, libc::ENODATA, "RELEASE before the WAIT began"),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        released,
        "no RELEASE was served while the leader waited: log:\n{}",
        env.log_text()
    );
    assert_eq!(waiter.join().unwrap(), Ok(b"released".to_vec()));
    // The session goes on: data and metadata, through the page cache and not.
    for i in 0..20u64 {
        let p = env.mnt.join(format!("g{i}"));
        let data = pattern(70_000 + i as usize * 999, i);
        fs::write(&p, &data).unwrap();
        assert_eq!(fs::read(&p).unwrap(), data);
        assert_eq!(fs::metadata(&p).unwrap().len(), data.len() as u64);
    }
    assert_eq!(m.unmount(), Some(0), "log:\n{}", env.log_text());
    let log = env.log_text();
    let (inline, handed, takeovers) = lead_counts(&log).unwrap_or_else(|| panic!("log:\n{log}"));
    assert!(takeovers >= 1, "log:\n{log}");
    assert!(inline >= 20 && handed >= 1, "log:\n{log}");
}

/// The spin's bounds (0: the reader sleeps at once; 1000 µs, the largest) serve
/// mixed work correctly, and a bad value is refused with its range.
#[test]
fn file_work_is_right_at_any_spin() {
    let env = Env::new();
    for spin in ["spin=0", "spin=1000"] {
        let m = env.mount_with(spin, &[]);
        let dir = env.mnt.join(spin.replace('=', "-"));
        fs::create_dir(&dir).unwrap();
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    for i in 0..50u64 {
                        let p = dir.join(format!("t{t}-{i}"));
                        let data = pattern((i as usize * 4099) % 300_000 + 1, t * 1000 + i);
                        fs::write(&p, &data).unwrap();
                        assert_eq!(fs::read(&p).unwrap(), data);
                        if i % 3 == 0 {
                            fs::remove_file(&p).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 4 * 33);
        assert_eq!(m.unmount(), Some(0), "log:\n{}", env.log_text());
        let log = env.log_text();
        let (inline, handed, _) = lead_counts(&log).unwrap_or_else(|| panic!("log:\n{log}"));
        assert!(inline > 0 && handed > 0, "{spin}: log:\n{log}");
    }
    let o = env.try_mount("spin=5000", &[]);
    assert!(!o.status.success());
    assert!(
        common::output_text(&o).contains("spin=5000"),
        "{}",
        common::output_text(&o)
    );
}

fn header(op: u32) -> Vec<u8> {
    request(op, 40)
}

/// A request of `len` bytes in all (header, arguments, data).
fn request(op: u32, len: u32) -> Vec<u8> {
    let mut h = vec![0u8; len as usize];
    h[0..4].copy_from_slice(&len.to_ne_bytes());
    h[4..8].copy_from_slice(&op.to_ne_bytes());
    h
}

#[test]
fn metadata_is_served_inline_and_the_rest_handed_off() {
    for op in [1, 3, 4, 14, 18, 22, 35, 45] {
        assert!(served_inline(&header(op)), "op {op}");
    }
    // READ, FSYNC, FLUSH, READDIR, SETLKW, DESTROY, READDIRPLUS, unknown
    for op in [15, 20, 25, 28, 33, 38, 44, 7, 9999] {
        assert!(!served_inline(&header(op)), "op {op}");
    }
    assert!(!served_inline(&[1, 0, 0]));
    assert!(!served_inline(&[40, 0, 0, 0, 1, 0, 0]));
    // A small WRITE (header 40 and arguments 40 bytes, then the data) is
    // served by the leader; a larger one goes to a follower.
    let small = 80 + INLINE_WRITE_BYTES as u32;
    assert!(served_inline(&request(16, 80 + 4096)));
    assert!(served_inline(&request(16, small)));
    assert!(!served_inline(&request(16, small + 1)));
    assert!(!served_inline(&request(16, 80 + (1 << 20))));
}

#[test]
fn the_spin_window_keeps_grows_and_shrinks() {
    let max = 50_000;
    assert_eq!(next_window(50_000, max, Arrival::Spun), 50_000);
    // A request soon after the leader slept: back to the whole window.
    assert_eq!(
        next_window(0, max, Arrival::Slept { waited_ns: 20_000 }),
        max
    );
    assert_eq!(
        next_window(20_000, max, Arrival::Slept { waited_ns: 50_000 }),
        max
    );
    // A long gap: an eighth less, and below 1 µs no spin at all.
    assert_eq!(
        next_window(
            40_000,
            max,
            Arrival::Slept {
                waited_ns: 1_000_000
            }
        ),
        35_000
    );
    assert_eq!(
        next_window(
            1_100,
            max,
            Arrival::Slept {
                waited_ns: 1_000_000
            }
        ),
        0
    );
    // A steady trickle just slower than the largest window ends the spinning...
    let mut w = max;
    for _ in 0..40 {
        w = next_window(w, max, Arrival::Slept { waited_ns: 60_000 });
    }
    assert_eq!(w, 0);
    // ...while a few long gaps among quick requests keep most of it.
    let mut w = max;
    for _ in 0..3 {
        w = next_window(
            w,
            max,
            Arrival::Slept {
                waited_ns: 1_000_000,
            },
        );
        w = next_window(w, max, Arrival::Spun);
    }
    assert!(w > max / 2, "{w}");
}
