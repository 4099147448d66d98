//! uring-proto: a read-only FUSE file system (one large generated file) served over the
//! classic /dev/fuse transport or over FUSE-over-io_uring, to measure the difference
//! (kmsfs issue 12). Not part of kmsfs; see README.md and run.sh.
//!
//! Usage:
//!   uring-proto serve MNT classic|uring [--threads N] [--max-pages P] [--size-mib S]
//!                     [--depth D] [--aead]
//!   uring-proto pattern MIB          (the file's first MIB MiB on stdout, to check reads)
//!   uring-proto statlat FILE N       (N forced statx calls: µs per GETATTR round trip)

mod abi;
mod classic;
mod fs;
mod uring;

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// Opened once INIT has been answered (ring entries may only register after that).
pub struct Gate {
    state: Mutex<Option<bool>>,
    cv: Condvar,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            state: Mutex::new(None),
            cv: Condvar::new(),
        }
    }
    pub fn open(&self) {
        *self.state.lock().unwrap() = Some(true);
        self.cv.notify_all();
    }
    pub fn fail(&self, msg: String) {
        eprintln!("{msg}");
        *self.state.lock().unwrap() = Some(false);
        self.cv.notify_all();
    }
    /// True once INIT succeeded, false if it failed.
    pub fn wait(&self) -> bool {
        let mut s = self.state.lock().unwrap();
        while s.is_none() {
            s = self.cv.wait(s).unwrap();
        }
        s.unwrap_or(false)
    }
}

fn die(msg: &str) -> ! {
    eprintln!("uring-proto: {msg}");
    std::process::exit(2)
}

fn flag(args: &[String], name: &str, default: u64) -> u64 {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| die(&format!("{name} needs a number"))),
        None => default,
    }
}

fn possible_cpus() -> usize {
    // "0-1" or "0" or "0-3,5": the kernel makes one ring queue per possible CPU.
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let max = s
        .trim()
        .split(',')
        .filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok())
        .max();
    max.map(|m| m + 1).unwrap_or(1)
}

fn serve(args: &[String]) {
    let mnt = args.get(2).unwrap_or_else(|| die("serve needs MNT"));
    let mode = args.get(3).map(String::as_str).unwrap_or("classic");
    let use_uring = match mode {
        "classic" => false,
        "uring" => true,
        _ => die("transport is classic or uring"),
    };
    let threads = flag(args, "--threads", 2) as usize;
    let max_pages = flag(args, "--max-pages", 32) as u16;
    let size = flag(args, "--size-mib", 1024) << 20;
    let depth = flag(args, "--depth", 8) as usize;
    let aead = args.iter().any(|a| a == "--aead");

    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .unwrap_or_else(|e| die(&format!("open /dev/fuse: {e}")));
    let fd = dev.into_raw_fd();
    let data = format!(
        "fd={fd},rootmode=40000,user_id=0,group_id=0,max_read={},allow_other,default_permissions",
        max_pages as u32 * 4096
    );
    use nix::mount::{MsFlags, mount};
    mount(
        Some("uringproto"),
        mnt.as_str(),
        Some("fuse.uringproto"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY,
        Some(data.as_str()),
    )
    .unwrap_or_else(|e| die(&format!("mount {mnt}: {e}")));
    eprintln!(
        "mounted {mnt} transport={mode} max_pages={max_pages} aead={aead} pid={}",
        std::process::id()
    );

    let fs = Arc::new(fs::Fs::new(size, max_pages, use_uring, aead));
    let gate = Arc::new(Gate::new());
    let dev_threads = if use_uring { 1 } else { threads.max(1) };
    let mut handles = Vec::new();
    for _ in 0..dev_threads {
        let (fs, gate) = (fs.clone(), gate.clone());
        handles.push(std::thread::spawn(move || {
            if let Err(e) = classic::serve(&fs, fd, &gate) {
                eprintln!("/dev/fuse thread: {e}");
            }
        }));
    }
    if use_uring {
        let nq = possible_cpus();
        eprintln!("io_uring: {nq} queues x {depth} entries");
        for qid in 0..nq {
            let (fs, gate, mnt) = (fs.clone(), gate.clone(), mnt.clone());
            std::thread::spawn(move || {
                if let Err(e) = uring::serve_queue(&fs, fd, qid as u16, depth, &gate) {
                    // The kernel would fall back to /dev/fuse: end the run rather than
                    // measure classic FUSE under an io_uring label.
                    eprintln!("io_uring queue {qid} failed: {e}; unmounting");
                    let _ = nix::mount::umount2(mnt.as_str(), nix::mount::MntFlags::MNT_DETACH);
                    std::process::exit(3);
                }
            });
        }
    }
    for h in handles {
        let _ = h.join();
    }
    fs.print_counts("served");
    eprintln!(
        "transport {mode}: {} requests over /dev/fuse, {} over io_uring",
        classic::DEV_REQUESTS.load(std::sync::atomic::Ordering::Relaxed),
        uring::RING_REQUESTS.load(std::sync::atomic::Ordering::Relaxed)
    );
    std::process::exit(0);
}

fn statlat(args: &[String]) {
    let path = args.get(2).unwrap_or_else(|| die("statlat needs FILE"));
    let n = args
        .get(3)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(100_000);
    let f = std::fs::File::open(path).unwrap_or_else(|e| die(&format!("open {path}: {e}")));
    let empty = CString::new("").unwrap();
    let t = Instant::now();
    for _ in 0..n {
        // SAFETY: valid fd, NUL-terminated empty path, a zeroed statx out buffer.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::statx(
                f.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_EMPTY_PATH | libc::AT_STATX_FORCE_SYNC,
                libc::STATX_BASIC_STATS,
                &mut st,
            )
        };
        if r != 0 {
            die(&format!("statx: {}", std::io::Error::last_os_error()));
        }
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("{us:.2}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(&args),
        Some("statlat") => statlat(&args),
        Some("pattern") => {
            let mib = args
                .get(2)
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(1);
            let p = fs::pattern();
            let mut out = std::io::stdout().lock();
            for _ in 0..mib {
                out.write_all(&p)
                    .unwrap_or_else(|e| die(&format!("stdout: {e}")));
            }
        }
        _ => {
            die("usage: uring-proto serve MNT classic|uring [opts] | pattern MIB | statlat FILE N")
        }
    }
}
