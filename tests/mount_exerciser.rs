//! A random-operation exerciser through a real mount, checked against an
//! in-memory model (one `Vec<u8>` per file).
//!
//! A handful of files take random pwrite/pread (past EOF, across block
//! boundaries, 1 byte to 1 MiB), mmap reads and mmap writes with msync(MS_SYNC),
//! ftruncate up and down, every fallocate mode (and the ones Linux refuses),
//! copy_file_range between and within files, O_DIRECT reads and writes,
//! fsync/fdatasync, close and reopen (also with O_TRUNC), page-cache drops
//! (fsync + posix_fadvise DONTNEED on the file, never the machine-wide
//! drop_caches) and full unmount + remount, after which every file is verified
//! in full. Any difference, unexpected errno (EIO, ENOTCONN, ...) or SIGBUS
//! fails with the seed, the op number, the tail of the op log and the differing
//! byte range.
//!
//! The default suite runs a few fixed seeds (64 KiB, 16 KiB and 4 KiB blocks).
//! A longer run, or a replay of a reported failure:
//!
//! ```sh
//! KMSFS_EXERCISER_SEED=0x1234 KMSFS_EXERCISER_OPS=100000 KMSFS_EXERCISER_BLOCK_SIZE=16K \
//!     cargo test --release --test mount_exerciser exerciser_from_env -- --nocapture
//! ```
//!
//! The op sequence depends only on the seed, the op count and the block size.

mod common;

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use common::{Env, Mount, output_text, pattern};

const PAGE: usize = 4096;
/// Files under test.
const NFILES: usize = 4;
/// No operation makes a file larger than this (deliberately not block-aligned).
const MAX_SIZE: u64 = (1 << 20) + 12_345;
/// The largest single read, write or copy.
const MAX_IO: u64 = 1 << 20;
/// Ops shown in a failure report.
const LOG_TAIL: usize = 40;

// ----- a small deterministic PRNG (splitmix64) -------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when n is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn pct(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

// ----- operations ---------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Falloc {
    /// 0: allocate, extends the size.
    Alloc,
    KeepSize,
    PunchKeep,
    /// ZERO_RANGE without KEEP_SIZE: zeroes and extends the size.
    Zero,
    ZeroKeep,
    /// PUNCH_HOLE without KEEP_SIZE: Linux refuses it (EOPNOTSUPP).
    PunchNoKeep,
    /// PUNCH_HOLE | ZERO_RANGE | KEEP_SIZE: Linux refuses it (EOPNOTSUPP).
    PunchZero,
    /// COLLAPSE_RANGE: FUSE refuses it (EOPNOTSUPP).
    Collapse,
    /// UNSHARE_RANGE: FUSE refuses it (EOPNOTSUPP).
    Unshare,
}

impl Falloc {
    fn mode(self) -> i32 {
        use libc::{
            FALLOC_FL_COLLAPSE_RANGE as COLLAPSE, FALLOC_FL_KEEP_SIZE as KEEP,
            FALLOC_FL_PUNCH_HOLE as PUNCH, FALLOC_FL_UNSHARE_RANGE as UNSHARE,
            FALLOC_FL_ZERO_RANGE as ZERO,
        };
        match self {
            Falloc::Alloc => 0,
            Falloc::KeepSize => KEEP,
            Falloc::PunchKeep => PUNCH | KEEP,
            Falloc::Zero => ZERO,
            Falloc::ZeroKeep => ZERO | KEEP,
            Falloc::PunchNoKeep => PUNCH,
            Falloc::PunchZero => PUNCH | ZERO | KEEP,
            Falloc::Collapse => COLLAPSE,
            Falloc::Unshare => UNSHARE,
        }
    }

    /// The errno Linux answers for this mode, if it refuses it.
    fn refused(self) -> Option<i32> {
        match self {
            Falloc::PunchNoKeep | Falloc::PunchZero | Falloc::Collapse | Falloc::Unshare => {
                Some(libc::EOPNOTSUPP)
            }
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        f: usize,
        off: u64,
        len: u64,
    },
    Read {
        f: usize,
        off: u64,
        len: u64,
    },
    DirectWrite {
        f: usize,
        off: u64,
        len: u64,
    },
    DirectRead {
        f: usize,
        off: u64,
        len: u64,
    },
    MmapRead {
        f: usize,
        off: u64,
        len: u64,
    },
    MmapWrite {
        f: usize,
        off: u64,
        len: u64,
    },
    Truncate {
        f: usize,
        size: u64,
    },
    Fallocate {
        f: usize,
        mode: Falloc,
        off: u64,
        len: u64,
    },
    Copy {
        src: usize,
        dst: usize,
        src_off: u64,
        dst_off: u64,
        len: u64,
    },
    /// copy_file_range within one file with overlapping ranges: EINVAL.
    CopyOverlap {
        f: usize,
        src_off: u64,
        dst_off: u64,
        len: u64,
    },
    Fsync {
        f: usize,
        data_only: bool,
    },
    Reopen {
        f: usize,
        trunc: bool,
    },
    DropCache {
        f: usize,
    },
    Verify {
        f: usize,
    },
    Remount,
}

// ----- helpers over raw descriptors -------------------------------------------------

fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EIO) => format!("EIO ({e})"),
        Some(libc::ENOTCONN) => format!("ENOTCONN ({e}): the mount is dead"),
        _ => e.to_string(),
    }
}

/// pread until `buf` is full or EOF; returns the bytes read.
fn read_full_at(fd: i32, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the destination is the unread tail of `buf`.
        let r = unsafe {
            libc::pread(
                fd,
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (off + done as u64) as libc::off_t,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            break;
        }
        done += r as usize;
    }
    Ok(done)
}

/// pwrite all of `buf` at `off`.
fn write_full_at(fd: i32, buf: &[u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the source is the unwritten tail of `buf`.
        let r = unsafe {
            libc::pwrite(
                fd,
                buf[done..].as_ptr().cast(),
                buf.len() - done,
                (off + done as u64) as libc::off_t,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "pwrite wrote 0"));
        }
        done += r as usize;
    }
    Ok(())
}

/// close(2) with its error checked (dropping a `File` ignores it).
fn close_checked(f: File) -> io::Result<()> {
    let fd = f.into_raw_fd();
    // SAFETY: `fd` was just released by its owner and is closed exactly once.
    if unsafe { libc::close(fd) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A zeroed, page-aligned buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    len: usize,
    layout: Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = Layout::from_size_align(len.max(PAGE), PAGE).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Aligned { ptr, len, layout }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr holds at least len initialised bytes, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

// ----- mmap with SIGBUS containment ---------------------------------------------------
//
// A fault on a file mapping whose daemon died (or whose file is shorter than it
// should be) raises SIGBUS, which would kill the test process and leave the
// mount behind. The handler below replaces the faulting page of a registered
// mapping with an anonymous page, notes the fault, and returns; the test then
// fails normally and its guards unmount. Faults elsewhere keep the default action.

struct Slot {
    used: AtomicBool,
    start: AtomicUsize,
    len: AtomicUsize,
    hit: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    used: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    hit: AtomicBool::new(false),
};
static SLOTS: [Slot; 16] = [FREE; 16];
static SIGBUS_HANDLER: Once = Once::new();

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in &SLOTS {
        let (start, len) = (s.start.load(Ordering::SeqCst), s.len.load(Ordering::SeqCst));
        if len != 0 && addr >= start && addr < start + len {
            s.hit.store(true, Ordering::SeqCst);
            let page = addr & !(PAGE - 1);
            // SAFETY: replaces one page inside a mapping this test owns.
            let r = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                return;
            }
        }
    }
    // Not ours: the default action on return, when the access faults again.
    // SAFETY: signal(2) is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

fn install_sigbus_handler() {
    SIGBUS_HANDLER.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid SA_SIGINFO handler.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()), 0);
        }
    });
}

/// A shared file mapping, registered for SIGBUS containment, unmapped on drop.
struct Map {
    ptr: *mut u8,
    len: usize,
    slot: usize,
}

impl Map {
    fn new(fd: i32, off: u64, len: usize, write: bool) -> io::Result<Map> {
        install_sigbus_handler();
        assert_eq!(off % PAGE as u64, 0);
        let prot = libc::PROT_READ | if write { libc::PROT_WRITE } else { 0 };
        // SAFETY: a fresh shared mapping of an open descriptor.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                off as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let slot = loop {
            if let Some(i) = SLOTS.iter().position(|s| {
                s.used
                    .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            }) {
                break i;
            }
            std::thread::yield_now();
        };
        let s = &SLOTS[slot];
        s.hit.store(false, Ordering::SeqCst);
        s.start.store(p as usize, Ordering::SeqCst);
        s.len.store(len, Ordering::SeqCst);
        Ok(Map {
            ptr: p.cast(),
            len,
            slot,
        })
    }

    /// Whether an access faulted (SIGBUS) since the mapping was made.
    fn faulted(&self) -> bool {
        SLOTS[self.slot].hit.load(Ordering::SeqCst)
    }

    fn read(&self, from: usize, out: &mut [u8]) {
        assert!(from + out.len() <= self.len);
        // SAFETY: in bounds of the live mapping; faults are contained above.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(from), out.as_mut_ptr(), out.len()) };
    }

    fn write(&self, from: usize, data: &[u8]) {
        assert!(from + data.len() <= self.len);
        // SAFETY: in bounds of the live, writable mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(from), data.len()) };
    }

    fn msync(&self) -> io::Result<()> {
        // SAFETY: the whole live mapping.
        if unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
        let s = &SLOTS[self.slot];
        s.len.store(0, Ordering::SeqCst);
        s.start.store(0, Ordering::SeqCst);
        s.used.store(false, Ordering::SeqCst);
    }
}

// ----- the run --------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Config {
    seed: u64,
    ops: usize,
    /// Volume block size in bytes; 64 KiB is the `init` default.
    block_size: u64,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Where `got` and `want` (both at file offset `off`) differ.
fn diff_report(off: u64, got: &[u8], want: &[u8], bs: u64) -> Option<String> {
    let n = got.len().min(want.len());
    let first = (0..n).find(|&i| got[i] != want[i]);
    let Some(first) = first else {
        return (got.len() != want.len()).then(|| {
            format!(
                "length differs: got {} bytes, want {} (the common {n} bytes agree)",
                got.len(),
                want.len()
            )
        });
    };
    let last = (0..n).rev().find(|&i| got[i] != want[i]).unwrap();
    let count = (first..=last).filter(|&i| got[i] != want[i]).count();
    let (a, b) = (off + first as u64, off + last as u64);
    let show = |v: &[u8]| hex(&v[first..(first + 16).min(v.len())]);
    let zeros = got[first..=last].iter().all(|&x| x == 0);
    let mut s = format!(
        "bytes differ in file range [{a}, {b}] ({count} bytes differ; blocks {}..={} of {bs} bytes; \
         got is {}all zero there); at {a}: want {} got {}",
        a / bs,
        b / bs,
        if zeros { "" } else { "not " },
        show(want),
        show(got)
    );
    if got.len() != want.len() {
        s += &format!("; also length: got {} want {}", got.len(), want.len());
    }
    Some(s)
}

struct Run<'e> {
    // Declared before `mount`: open files close before the guard unmounts.
    files: Vec<Option<File>>,
    mount: Option<Mount>,
    env: &'e Env,
    cfg: Config,
    model: Vec<Vec<u8>>,
    log: VecDeque<String>,
    op_no: usize,
    remounts: usize,
}

impl Run<'_> {
    fn path(&self, f: usize) -> PathBuf {
        self.mount.as_ref().unwrap().p(&format!("f{f}"))
    }

    fn fail(&self, msg: impl AsRef<str>) -> ! {
        let c = self.cfg;
        let sizes: Vec<usize> = self.model.iter().map(Vec::len).collect();
        let tail: Vec<&str> = self.log.iter().map(String::as_str).collect();
        // Panics in the daemon (its stderr goes to the log): the likely cause of an EIO.
        let log = self.env.log_text();
        let lines: Vec<&str> = log.lines().collect();
        let mut panics: Vec<String> = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            if l.contains("panicked at") {
                let p = format!("{l} {}", lines.get(i + 1).unwrap_or(&""));
                if !panics.contains(&p) {
                    panics.push(p);
                }
            }
        }
        let panics = if panics.is_empty() {
            String::new()
        } else {
            format!("daemon panics:\n  {}\n", panics.join("\n  "))
        };
        panic!(
            "\n=== kmsfs exerciser failure ===\n\
             seed {:#x}, block size {}, op #{} (of {}), {} remounts so far\n\
             {}\n\
             {panics}\
             model sizes: {sizes:?}\n\
             replay: KMSFS_EXERCISER_SEED={:#x} KMSFS_EXERCISER_OPS={} KMSFS_EXERCISER_BLOCK_SIZE={} \
             cargo test --release --test mount_exerciser exerciser_from_env -- --nocapture\n\
             last {} ops (newest last):\n  {}\n",
            c.seed,
            c.block_size,
            self.op_no,
            c.ops,
            self.remounts,
            msg.as_ref(),
            c.seed,
            self.op_no + 1,
            c.block_size,
            tail.len(),
            tail.join("\n  ")
        );
    }

    fn ok<T>(&self, r: io::Result<T>, what: &str) -> T {
        r.unwrap_or_else(|e| self.fail(format!("{what}: {}", errno_name(&e))))
    }

    fn fd(&self, f: usize) -> i32 {
        self.files[f].as_ref().unwrap().as_raw_fd()
    }

    fn open(&self, f: usize, trunc: bool) -> File {
        let r = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(trunc)
            .open(self.path(f));
        self.ok(r, &format!("open f{f}"))
    }

    fn open_direct(&self, f: usize) -> File {
        let r = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(self.path(f));
        self.ok(r, &format!("open f{f} O_DIRECT"))
    }

    fn compare(&self, what: &str, off: u64, got: &[u8], want: &[u8]) {
        if let Some(d) = diff_report(off, got, want, self.cfg.block_size) {
            self.fail(format!("{what}: {d}"));
        }
    }

    fn check_size(&self, f: usize) {
        let md = self.ok(self.files[f].as_ref().unwrap().metadata(), "fstat");
        let want = self.model[f].len() as u64;
        if md.len() != want {
            self.fail(format!(
                "f{f}: fstat size {} but the model says {want}",
                md.len()
            ));
        }
    }

    /// The expected bytes of `f` in `[off, off + len)`, clipped at EOF.
    fn expect(&self, f: usize, off: u64, len: u64) -> &[u8] {
        let m = &self.model[f];
        let a = (off as usize).min(m.len());
        let b = ((off + len) as usize).min(m.len());
        &m[a..b]
    }

    fn model_write(&mut self, f: usize, off: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let m = &mut self.model[f];
        let end = off as usize + data.len();
        if m.len() < end {
            m.resize(end, 0);
        }
        m[off as usize..end].copy_from_slice(data);
    }

    fn model_zero(&mut self, f: usize, off: u64, end: u64) {
        let m = &mut self.model[f];
        let end = (end as usize).min(m.len());
        if (off as usize) < end {
            m[off as usize..end].fill(0);
        }
    }

    fn verify(&self, f: usize, why: &str) {
        self.check_size(f);
        let mut buf = vec![0u8; self.model[f].len() + PAGE];
        let n = self.ok(read_full_at(self.fd(f), &mut buf, 0), "verify read");
        self.compare(
            &format!("{why}: full read of f{f}"),
            0,
            &buf[..n],
            &self.model[f],
        );
    }

    /// A panic, a warning or an error in the daemon's log is a bug even when
    /// every request succeeded (a contained panic, a retried write-back or
    /// commit). Not counted: fuser's notes on requests kmsfs does not
    /// implement, and a reply the kernel no longer waits for (ENOENT: the
    /// unmount ends the connection while a background request such as a
    /// release is still being answered; libfuse ignores that errno too).
    fn check_log(&self) {
        let log = self.env.log_text();
        let bad = log.lines().find(|l| {
            let head = l.split(']').next().unwrap_or("");
            l.contains("panicked")
                || (l.starts_with('[')
                    && (head.contains(" WARN") || head.contains(" ERROR"))
                    && !l.contains("[Not Implemented]")
                    && !l.contains("Failed to send FUSE reply: No such file or directory"))
        });
        if let Some(l) = bad {
            self.fail(format!("the daemon log reports: {l}\ndaemon log:\n{log}"));
        }
    }

    fn mount(&mut self) {
        let o = self.env.try_mount("", &[]);
        if !o.status.success() {
            self.fail(format!(
                "mount failed: {}\ndaemon log:\n{}",
                output_text(&o),
                self.env.log_text()
            ));
        }
        self.mount = Some(self.env.guard());
        for f in 0..NFILES {
            self.files[f] = Some(self.open(f, false));
        }
    }

    fn remount(&mut self) {
        for f in 0..NFILES {
            if let Some(file) = self.files[f].take() {
                self.ok(close_checked(file), &format!("close f{f}"));
            }
        }
        let code = self.mount.take().unwrap().unmount();
        if code != Some(0) {
            self.fail(format!(
                "the daemon exited with {code:?} on unmount\ndaemon log:\n{}",
                self.env.log_text()
            ));
        }
        self.remounts += 1;
        self.check_log();
        self.mount();
        for f in 0..NFILES {
            self.verify(f, "after remount");
        }
    }

    fn data(&self, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        Rng(self.cfg.seed ^ (self.op_no as u64).wrapping_mul(0xD134_2543_DE82_EF95)).fill(&mut v);
        v
    }

    // ----- generation ------------------------------------------------------------

    fn gen_offset(&self, rng: &mut Rng, f: usize) -> u64 {
        let bs = self.cfg.block_size;
        let size = self.model[f].len() as u64;
        let off = match rng.below(100) {
            0..30 => rng.below(MAX_SIZE),
            // Around a block boundary.
            30..60 => {
                let k = rng.below(MAX_SIZE / bs + 1) * bs;
                match rng.below(4) {
                    0 => k,
                    1 => k.saturating_sub(rng.range(1, 16)),
                    2 => k + rng.range(1, 16),
                    _ => k.saturating_sub(rng.below(PAGE as u64 * 2)),
                }
            }
            // Around the current end of the file.
            60..85 => {
                let d = rng.below(2 * bs);
                if rng.pct(50) {
                    size.saturating_sub(d)
                } else {
                    size + d
                }
            }
            _ => rng.below(8192),
        };
        off.min(MAX_SIZE - 1)
    }

    fn gen_len(&self, rng: &mut Rng) -> u64 {
        let bs = self.cfg.block_size;
        match rng.below(100) {
            0..25 => rng.range(1, 16),
            25..55 => rng.range(1, PAGE as u64),
            55..85 => rng.range(1, 2 * bs + 1),
            _ => rng.range(1, MAX_IO),
        }
    }

    /// An offset and length with `off + len <= MAX_SIZE`, len >= 1.
    fn gen_extent(&self, rng: &mut Rng, f: usize) -> (u64, u64) {
        let off = self.gen_offset(rng, f);
        let len = self.gen_len(rng).min(MAX_SIZE - off);
        (off, len)
    }

    /// An extent for O_DIRECT: mostly page-aligned; sometimes not (FUSE
    /// allows it), which hands the daemon writes at any offset, unrounded by
    /// the page cache. The buffer is always page-aligned.
    fn gen_direct(&self, rng: &mut Rng, f: usize) -> (u64, u64) {
        if rng.pct(25) {
            return self.gen_extent(rng, f);
        }
        let p = PAGE as u64;
        let off = self.gen_offset(rng, f) / p * p;
        let len = self.gen_len(rng).div_ceil(p) * p;
        let len = len.min((MAX_SIZE - off) / p * p).max(p);
        (off, len)
    }

    /// An extent inside the file (`size > 0`), for mmap.
    fn gen_inside(&self, rng: &mut Rng, f: usize) -> (u64, u64) {
        let size = self.model[f].len() as u64;
        let off = match rng.below(3) {
            0 => rng.below(size),
            1 => self.gen_offset(rng, f).min(size - 1),
            _ => size - rng.range(1, size.min(2 * PAGE as u64)),
        };
        let len = self.gen_len(rng).min(size - off);
        (off, len)
    }

    fn gen_size(&self, rng: &mut Rng, f: usize) -> u64 {
        let bs = self.cfg.block_size;
        let size = self.model[f].len() as u64;
        let s = match rng.below(100) {
            0..40 => {
                let k = rng.below(MAX_SIZE / bs + 1) * bs;
                match rng.below(3) {
                    0 => k,
                    1 => k.saturating_sub(rng.range(1, 300)),
                    _ => k + rng.range(1, 300),
                }
            }
            40..70 => rng.below(MAX_SIZE + 1),
            70..90 => {
                let d = rng.below(bs);
                if rng.pct(50) {
                    size.saturating_sub(d)
                } else {
                    size + d
                }
            }
            _ => rng.below(200),
        };
        s.min(MAX_SIZE)
    }

    fn next_op(&self, rng: &mut Rng) -> Op {
        let f = rng.below(NFILES as u64) as usize;
        let size = self.model[f].len() as u64;
        match rng.below(1000) {
            0..200 => {
                let (off, len) = self.gen_extent(rng, f);
                Op::Write { f, off, len }
            }
            200..330 => {
                let (off, len) = self.gen_extent(rng, f);
                Op::Read { f, off, len }
            }
            330..390 => {
                let (off, len) = self.gen_direct(rng, f);
                Op::DirectWrite { f, off, len }
            }
            390..450 => {
                let (off, len) = self.gen_direct(rng, f);
                Op::DirectRead { f, off, len }
            }
            450..510 if size > 0 => {
                let (off, len) = self.gen_inside(rng, f);
                Op::MmapRead { f, off, len }
            }
            510..570 if size > 0 => {
                let (off, len) = self.gen_inside(rng, f);
                Op::MmapWrite { f, off, len }
            }
            450..650 => Op::Truncate {
                f,
                size: self.gen_size(rng, f),
            },
            650..760 => {
                let mode = match rng.below(100) {
                    0..20 => Falloc::Alloc,
                    20..35 => Falloc::KeepSize,
                    35..60 => Falloc::PunchKeep,
                    60..77 => Falloc::Zero,
                    77..94 => Falloc::ZeroKeep,
                    94..96 => Falloc::PunchNoKeep,
                    96 => Falloc::PunchZero,
                    97..99 => Falloc::Collapse,
                    _ => Falloc::Unshare,
                };
                let (off, len) = self.gen_extent(rng, f);
                Op::Fallocate { f, mode, off, len }
            }
            760..830 => {
                let src = rng.below(NFILES as u64) as usize;
                let (src_off, len) = self.gen_extent(rng, src);
                let dst = rng.below(NFILES as u64) as usize;
                let (mut dst_off, _) = self.gen_extent(rng, dst);
                if src == dst && dst_off < src_off + len && src_off < dst_off + len {
                    // Move the target past the source range (or before it).
                    dst_off = if src_off + len + len <= MAX_SIZE {
                        src_off + len
                    } else {
                        src_off.saturating_sub(len)
                    };
                }
                let len = len.min(MAX_SIZE - dst_off);
                if src == dst && dst_off < src_off + len && src_off < dst_off + len {
                    Op::Read {
                        f: src,
                        off: src_off,
                        len,
                    }
                } else {
                    Op::Copy {
                        src,
                        dst,
                        src_off,
                        dst_off,
                        len,
                    }
                }
            }
            830..840 if size > 1 => {
                let src_off = rng.below(size - 1);
                let len = rng.range(2, (size - src_off).min(2 * self.cfg.block_size).max(2));
                let dst_off = src_off + rng.range(1, len - 1);
                Op::CopyOverlap {
                    f,
                    src_off,
                    dst_off,
                    len,
                }
            }
            830..880 => Op::Fsync {
                f,
                data_only: rng.pct(50),
            },
            880..920 => Op::Reopen {
                f,
                trunc: rng.pct(8),
            },
            920..950 => Op::DropCache { f },
            950..997 => Op::Verify { f },
            _ => Op::Remount,
        }
    }

    // ----- execution -------------------------------------------------------------

    fn exec(&mut self, op: &Op) {
        match *op {
            Op::Write { f, off, len } => {
                let data = self.data(len);
                self.ok(write_full_at(self.fd(f), &data, off), "pwrite");
                self.model_write(f, off, &data);
                self.check_size(f);
            }
            Op::Read { f, off, len } => {
                let mut buf = vec![0u8; len as usize];
                let n = self.ok(read_full_at(self.fd(f), &mut buf, off), "pread");
                self.compare("pread", off, &buf[..n], self.expect(f, off, len));
            }
            Op::DirectWrite { f, off, len } => {
                let data = self.data(len);
                let mut buf = Aligned::new(len as usize);
                buf.as_mut_slice().copy_from_slice(&data);
                let d = self.open_direct(f);
                self.ok(
                    write_full_at(d.as_raw_fd(), buf.as_slice(), off),
                    "O_DIRECT pwrite",
                );
                self.ok(close_checked(d), "close O_DIRECT");
                self.model_write(f, off, &data);
                self.check_size(f);
            }
            Op::DirectRead { f, off, len } => {
                let mut buf = Aligned::new(len as usize);
                let d = self.open_direct(f);
                let n = self.ok(
                    read_full_at(d.as_raw_fd(), buf.as_mut_slice(), off),
                    "O_DIRECT pread",
                );
                self.ok(close_checked(d), "close O_DIRECT");
                self.compare(
                    "O_DIRECT pread",
                    off,
                    &buf.as_slice()[..n],
                    self.expect(f, off, len),
                );
            }
            Op::MmapRead { f, off, len } => {
                let size = self.model[f].len();
                let start = off as usize / PAGE * PAGE;
                // Up to the end of the page holding the last byte: past EOF in
                // that page must read as zeros.
                let map_end = ((off + len) as usize).div_ceil(PAGE) * PAGE;
                let map = self.ok(
                    Map::new(self.fd(f), start as u64, map_end - start, false),
                    "mmap",
                );
                let mut got = vec![0u8; map_end - start];
                map.read(0, &mut got);
                if map.faulted() {
                    self.fail(format!(
                        "SIGBUS reading the mapping of f{f} at [{start}, {map_end})"
                    ));
                }
                drop(map);
                let have = map_end.min(size) - start;
                let mut want = self.model[f][start..start + have].to_vec();
                want.resize(map_end - start, 0);
                self.compare(
                    "mmap read (incl. zeros past EOF in the last page)",
                    start as u64,
                    &got,
                    &want,
                );
            }
            Op::MmapWrite { f, off, len } => {
                let data = self.data(len);
                let start = off as usize / PAGE * PAGE;
                let end = (off + len) as usize;
                let map = self.ok(
                    Map::new(self.fd(f), start as u64, end - start, true),
                    "mmap",
                );
                map.write(off as usize - start, &data);
                let r = map.msync();
                if map.faulted() {
                    self.fail(format!(
                        "SIGBUS writing the mapping of f{f} at [{start}, {end})"
                    ));
                }
                self.ok(r, "msync(MS_SYNC)");
                drop(map);
                self.model_write(f, off, &data);
                self.check_size(f);
            }
            Op::Truncate { f, size } => {
                self.ok(self.files[f].as_ref().unwrap().set_len(size), "ftruncate");
                self.model[f].resize(size as usize, 0);
                self.check_size(f);
            }
            Op::Fallocate { f, mode, off, len } => {
                // SAFETY: fallocate on an open descriptor.
                let r = unsafe {
                    libc::fallocate(
                        self.fd(f),
                        mode.mode(),
                        off as libc::off_t,
                        len as libc::off_t,
                    )
                };
                let err = (r != 0).then(io::Error::last_os_error);
                match (mode.refused(), err) {
                    (None, Some(e)) => self.fail(format!("fallocate: {}", errno_name(&e))),
                    (Some(want), None) => self.fail(format!(
                        "fallocate {mode:?} succeeded; Linux refuses it with errno {want}"
                    )),
                    (Some(want), Some(e)) if e.raw_os_error() != Some(want) => self.fail(format!(
                        "fallocate {mode:?}: {} where Linux says errno {want}",
                        errno_name(&e)
                    )),
                    _ => {}
                }
                let end = off + len;
                let size = self.model[f].len() as u64;
                match mode {
                    Falloc::Alloc => {
                        if end > size {
                            self.model[f].resize(end as usize, 0);
                        }
                    }
                    Falloc::PunchKeep | Falloc::ZeroKeep => self.model_zero(f, off, end),
                    Falloc::Zero => {
                        if end > size {
                            self.model[f].resize(end as usize, 0);
                        }
                        self.model_zero(f, off, end);
                    }
                    Falloc::KeepSize
                    | Falloc::PunchNoKeep
                    | Falloc::PunchZero
                    | Falloc::Collapse
                    | Falloc::Unshare => {}
                }
                self.check_size(f);
            }
            Op::Copy {
                src,
                dst,
                src_off,
                dst_off,
                len,
            } => {
                let (fi, fo) = (self.fd(src), self.fd(dst));
                let (mut oi, mut oo) = (src_off as libc::off_t, dst_off as libc::off_t);
                // One call: a loop would read back what it wrote when src == dst.
                // SAFETY: two open descriptors and valid offset pointers.
                let r = unsafe { libc::copy_file_range(fi, &mut oi, fo, &mut oo, len as usize, 0) };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    self.fail(format!("copy_file_range: {}", errno_name(&e)));
                }
                // It copies up to EOF of the source; fewer is allowed, none is not.
                let avail = self.expect(src, src_off, len).len() as u64;
                let r = r as u64;
                if r > avail || (r == 0 && avail > 0) {
                    self.fail(format!(
                        "copy_file_range copied {r} bytes; the source has {avail} in range"
                    ));
                }
                if (oi as u64, oo as u64) != (src_off + r, dst_off + r) {
                    self.fail(format!(
                        "copy_file_range copied {r} bytes but moved the offsets to {oi} and {oo}"
                    ));
                }
                let want = self.expect(src, src_off, r).to_vec();
                self.model_write(dst, dst_off, &want);
                self.check_size(dst);
            }
            Op::CopyOverlap {
                f,
                src_off,
                dst_off,
                len,
            } => {
                let fd = self.fd(f);
                let (mut oi, mut oo) = (src_off as libc::off_t, dst_off as libc::off_t);
                // SAFETY: as above.
                let r = unsafe { libc::copy_file_range(fd, &mut oi, fd, &mut oo, len as usize, 0) };
                let e = io::Error::last_os_error();
                if r >= 0 || e.raw_os_error() != Some(libc::EINVAL) {
                    self.fail(format!(
                        "overlapping copy_file_range within f{f} returned {r} ({}); Linux refuses it with EINVAL",
                        if r < 0 { errno_name(&e) } else { "no error".into() }
                    ));
                }
                self.check_size(f);
            }
            Op::Fsync { f, data_only } => {
                let file = self.files[f].as_ref().unwrap();
                if data_only {
                    self.ok(file.sync_data(), "fdatasync");
                } else {
                    self.ok(file.sync_all(), "fsync");
                }
            }
            Op::Reopen { f, trunc } => {
                let file = self.files[f].take().unwrap();
                self.ok(close_checked(file), "close");
                self.files[f] = Some(self.open(f, trunc));
                if trunc {
                    self.model[f].clear();
                }
                self.check_size(f);
            }
            Op::DropCache { f } => {
                self.ok(
                    self.files[f].as_ref().unwrap().sync_all(),
                    "fsync before fadvise",
                );
                // SAFETY: posix_fadvise on an open descriptor.
                let r = unsafe { libc::posix_fadvise(self.fd(f), 0, 0, libc::POSIX_FADV_DONTNEED) };
                if r != 0 {
                    self.fail(format!(
                        "posix_fadvise(DONTNEED): {}",
                        errno_name(&io::Error::from_raw_os_error(r))
                    ));
                }
            }
            Op::Verify { f } => self.verify(f, "verify"),
            Op::Remount => self.remount(),
        }
    }
}

fn run(cfg: Config) {
    let env = if cfg.block_size == 64 << 10 {
        Env::new()
    } else {
        Env::with_init(&["--block-size", &cfg.block_size.to_string()])
    };
    let started = Instant::now();
    let mut r = Run {
        files: (0..NFILES).map(|_| None).collect(),
        mount: None,
        env: &env,
        cfg,
        model: vec![Vec::new(); NFILES],
        log: VecDeque::new(),
        op_no: 0,
        remounts: 0,
    };
    r.mount();
    let mut rng = Rng(cfg.seed);
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for i in 0..cfg.ops {
        r.op_no = i;
        let op = r.next_op(&mut rng);
        let name = format!("{op:?}");
        *counts
            .entry(match op {
                Op::Write { .. } => "write",
                Op::Read { .. } => "read",
                Op::DirectWrite { .. } => "direct write",
                Op::DirectRead { .. } => "direct read",
                Op::MmapRead { .. } => "mmap read",
                Op::MmapWrite { .. } => "mmap write",
                Op::Truncate { .. } => "truncate",
                Op::Fallocate { .. } => "fallocate",
                Op::Copy { .. } => "copy",
                Op::CopyOverlap { .. } => "overlapping copy",
                Op::Fsync { .. } => "fsync",
                Op::Reopen { .. } => "reopen",
                Op::DropCache { .. } => "drop cache",
                Op::Verify { .. } => "verify",
                Op::Remount => "remount",
            })
            .or_default() += 1;
        if r.log.len() == LOG_TAIL {
            r.log.pop_front();
        }
        r.log.push_back(format!("#{i}: {name}"));
        r.exec(&op);
    }
    r.op_no = cfg.ops;
    for f in 0..NFILES {
        r.verify(f, "at the end");
    }
    r.remount();
    for f in 0..NFILES {
        let file = r.files[f].take().unwrap();
        r.ok(close_checked(file), "close");
    }
    let code = r.mount.take().unwrap().unmount();
    assert_eq!(code, Some(0), "daemon exit code at the end");
    r.check_log();
    env.assert_fsck_clean();
    eprintln!(
        "exerciser seed {:#x}, block size {}: {} ops, {} remounts, {:.1?}; {counts:?}",
        cfg.seed,
        cfg.block_size,
        cfg.ops,
        r.remounts,
        started.elapsed()
    );
}

fn parse_u64(s: &str) -> u64 {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .unwrap_or_else(|_| panic!("not a number: {s:?}"))
}

fn parse_block_size(s: &str) -> u64 {
    let s = s.trim();
    let (num, mult) = match s.to_ascii_uppercase().strip_suffix('K') {
        Some(n) => (n.to_string(), 1024),
        None => (s.to_string(), 1),
    };
    parse_u64(&num) * mult
}

// ----- the suite ----------------------------------------------------------------------

/// Ops per seed in the default suite: the five seeds take about 30 s in
/// release mode on two cores.
const SUITE_OPS: usize = 4000;

fn suite_seed(seed: u64, block_size: u64) {
    run(Config {
        seed,
        ops: SUITE_OPS,
        block_size,
    });
}

#[test]
fn exerciser_seed_1_blocks_64k() {
    require_fuse!();
    suite_seed(0x5EED_0001, 64 << 10);
}

#[test]
fn exerciser_seed_2_blocks_64k() {
    require_fuse!();
    suite_seed(0x5EED_0002, 64 << 10);
}

#[test]
fn exerciser_seed_3_blocks_64k() {
    require_fuse!();
    suite_seed(0x5EED_0003, 64 << 10);
}

#[test]
fn exerciser_seed_4_blocks_16k() {
    require_fuse!();
    suite_seed(0x5EED_0004, 16 << 10);
}

#[test]
fn exerciser_seed_5_blocks_4k() {
    require_fuse!();
    suite_seed(0x5EED_0005, 4 << 10);
}

/// A longer run, or a replay: does nothing unless KMSFS_EXERCISER_OPS or
/// KMSFS_EXERCISER_SEED is set (KMSFS_EXERCISER_BLOCK_SIZE: 4K to 1M, default 64K).
#[test]
fn exerciser_from_env() {
    let ops = std::env::var("KMSFS_EXERCISER_OPS").ok();
    let seed = std::env::var("KMSFS_EXERCISER_SEED").ok();
    if ops.is_none() && seed.is_none() {
        eprintln!("set KMSFS_EXERCISER_OPS and/or KMSFS_EXERCISER_SEED for a longer run");
        return;
    }
    require_fuse!();
    let block_size = std::env::var("KMSFS_EXERCISER_BLOCK_SIZE")
        .map(|s| parse_block_size(&s))
        .unwrap_or(64 << 10);
    run(Config {
        seed: seed.map(|s| parse_u64(&s)).unwrap_or(1),
        ops: ops.map(|s| parse_u64(&s) as usize).unwrap_or(100_000),
        block_size,
    });
}

// ----- deterministic regressions -------------------------------------------------------

/// Issue 7: 100 bytes, fsync, grow to 200000, fsync, O_DIRECT read of 4096 at
/// 32768 panicked the daemon (the stored last block was shorter than the
/// block) and killed the mount.
#[test]
fn direct_read_in_a_file_grown_past_a_short_last_block() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    let p = m.p("grown");
    let data = pattern(100, 7);
    let mut want = data.clone();
    want.resize(200_000, 0);
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        f.write_all_at(&data, 0).unwrap();
        f.sync_all().unwrap();
        f.set_len(200_000).unwrap();
        f.sync_all().unwrap();
        let d = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
            .unwrap();
        let mut buf = Aligned::new(4096);
        let n = read_full_at(d.as_raw_fd(), buf.as_mut_slice(), 32768)
            .unwrap_or_else(|e| panic!("O_DIRECT read at 32768: {}", errno_name(&e)));
        assert_eq!(n, 4096);
        assert!(
            buf.as_slice().iter().all(|&b| b == 0),
            "the grown range is not zero"
        );
    }
    // The mount still serves, and all of the file is right, before and after a remount.
    assert!(fs::read(&p).unwrap() == want, "content differs");
    assert_eq!(m.unmount(), Some(0));
    let m = env.mount();
    assert!(
        fs::read(m.p("grown")).unwrap() == want,
        "content differs after remount"
    );
    assert_eq!(m.unmount(), Some(0));
    env.assert_fsck_clean();
}

/// The same through the page cache: a partial-page write into the grown range
/// reads the page around it first.
#[test]
fn partial_page_write_in_a_file_grown_past_a_short_last_block() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    let p = m.p("grown");
    let data = pattern(100, 8);
    let mut want = data.clone();
    want.resize(200_000, 0);
    want[32768 + 5..32768 + 15].copy_from_slice(b"0123456789");
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        f.write_all_at(&data, 0).unwrap();
        f.sync_all().unwrap();
        f.set_len(200_000).unwrap();
        f.sync_all().unwrap();
        // SAFETY: posix_fadvise on an open descriptor.
        assert_eq!(
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) },
            0
        );
        f.write_all_at(b"0123456789", 32768 + 5)
            .unwrap_or_else(|e| panic!("partial-page write: {}", errno_name(&e)));
        f.sync_all()
            .unwrap_or_else(|e| panic!("fsync: {}", errno_name(&e)));
    }
    assert!(fs::read(&p).unwrap() == want, "content differs");
    assert_eq!(m.unmount(), Some(0));
    let m = env.mount();
    assert!(
        fs::read(m.p("grown")).unwrap() == want,
        "content differs after remount"
    );
    assert_eq!(m.unmount(), Some(0));
    env.assert_fsck_clean();
}

/// The harness itself: a fault on a registered mapping is contained (the
/// faulting access reads zeros and is noted) rather than killing the test
/// process, which would leave its mounts behind.
#[test]
fn sigbus_on_a_mapping_is_contained() {
    let dir = tempfile::tempdir().unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("m"))
        .unwrap();
    f.write_all_at(&[7u8; 2 * PAGE], 0).unwrap();
    let map = Map::new(f.as_raw_fd(), 0, 2 * PAGE, false).unwrap();
    let mut b = [0u8; 4];
    map.read(PAGE, &mut b);
    assert!(!map.faulted());
    assert_eq!(b, [7; 4]);
    f.set_len(0).unwrap();
    map.read(PAGE, &mut b);
    assert!(
        map.faulted(),
        "reading past EOF of a mapping raised no SIGBUS"
    );
    assert_eq!(b, [0; 4]);
}
