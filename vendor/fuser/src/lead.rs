//! kmsfs patch: leader/follower reading of /dev/fuse with an adaptive spin.
//!
//! Every request on /dev/fuse used to cost two sleeps and two wake-ups: the caller
//! sleeps until the reply while a daemon thread sleeps in read(2) until the next
//! request. On a machine whose idle CPUs halt, each wake-up is an inter-processor
//! interrupt and, on a VM, an exit of the halted vCPU; for a single-threaded caller
//! such as tar those wake-ups are most of the time per request.
//!
//! Here one thread at a time, the leader, reads requests. After each request it
//! spins on non-blocking reads for a short window before it sleeps in poll(2), so a
//! caller that sends its next request within the window finds a thread awake and no
//! sleeping reader is woken. The other threads wait on a condition variable, not on
//! /dev/fuse: a sleeping reader in the kernel's queue would be woken by every request.
//!
//! - Requests answered from memory (`served_inline`: metadata, and WRITEs of at most
//!   `INLINE_WRITE_BYTES`, which kmsfs buffers) are served by the leader itself. For
//!   every other request the leader first hands the role to a follower, so a slow
//!   READ, large WRITE or fsync never holds up the requests behind it.
//! - The window adapts, much as Linux's guest halt-polling does: it is kept while
//!   requests arrive inside it, goes back to the largest window when a request
//!   arrives soon after the leader went to sleep, and shrinks by an eighth when the
//!   wait was longer than the largest window. A steady trickle of requests slower
//!   than the largest window therefore ends the spinning.
//! - A watchdog gives the role to a follower when the leader has been inside one
//!   inline request for `STALL` with no request read meanwhile: an inline request
//!   that waits on something only another request can bring (a lock held by a thread
//!   that waits for the kernel, which waits for a reply) cannot stop the session.
//! - The spin yields the CPU at every turn (sched_yield) instead of pausing: a
//!   spinning leader never keeps a runnable thread (the caller it waits for, a
//!   request thread, anything else on the machine) off its CPU, and spins only on
//!   CPU time nobody else wants. On 2 CPUs, with pauses the spin cost more than it
//!   saved where each file ends in a WRITE served beside it (an untar of 5,000
//!   small files: 0.65-0.73 s, against 0.62-0.65 s with no spin); with yields the
//!   same untar takes 0.59-0.61 s, and one of 20,000 real files 2.32-2.42 s at
//!   1.8-1.9 daemon CPU-s, against 2.65-2.76 s at 2.3-2.5 with pauses.
//! - With the spin at 0 the leader sleeps in poll(2) at once; `Config::spin_us`
//!   unset keeps fuser's loop (every thread blocks in read(2)).

use std::io;
use std::os::fd::AsFd;
use std::sync::Condvar;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use log::info;
use nix::errno::Errno;
use nix::fcntl::FcntlArg;
use nix::fcntl::OFlag;
use nix::fcntl::fcntl;
use nix::poll::PollFd;
use nix::poll::PollFlags;
use nix::poll::PollTimeout;
use nix::poll::poll;

use crate::channel::Channel;

/// How long the leader may stay inside one inline request, with no request read
/// meanwhile, before the watchdog hands the reading to a follower.
pub(crate) const STALL: Duration = Duration::from_millis(10);

#[derive(Debug, Default)]
struct State {
    /// A thread holds the reader role.
    taken: bool,
    /// Bumped whenever the role is taken away from a leader (watchdog).
    generation: u64,
    /// The leader is not asleep in poll(2): the watchdog ticks. True at the
    /// start (the first leader reads before it ever sleeps).
    active: bool,
    /// The session ended: the watchdog returns.
    done: bool,
}

/// Counters, logged when the session ends.
#[derive(Debug, Default)]
struct Counts {
    spin_hits: AtomicU64,
    poll_wakes: AtomicU64,
    inline: AtomicU64,
    handoffs: AtomicU64,
    takeovers: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Lead {
    state: Mutex<State>,
    followers: Condvar,
    watch: Condvar,
    max_spin_ns: u64,
    /// The leader's current spin window (only the leader writes it).
    window_ns: AtomicU64,
    /// Requests read so far (the watchdog's sign of progress).
    read: AtomicU64,
    /// When the leader began its current inline request, in ns since `epoch` + 1;
    /// 0 while it is not inside one.
    inline_since: AtomicU64,
    epoch: Instant,
    counts: Counts,
}

/// How a request reached the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Read within the spin window.
    Spun,
    /// Read after sleeping in poll(2).
    Slept {
        /// Nanoseconds from the start of the leader's wait to the request.
        waited_ns: u64,
    },
}

/// The next spin window after a request arrived as `arrival`, with the window
/// `window_ns` and the largest window `max_ns`.
pub fn next_window(window_ns: u64, max_ns: u64, arrival: Arrival) -> u64 {
    match arrival {
        Arrival::Spun => window_ns,
        // Slept, but the request came soon: the whole window would have caught it.
        Arrival::Slept { waited_ns } if waited_ns <= max_ns => max_ns,
        // A long gap: spinning only burnt the CPU. Shrink by an eighth, so that a
        // few long gaps among quick requests (a write handed off, a caller's own
        // work) keep the window, and a steady trickle ends the spinning.
        Arrival::Slept { .. } => {
            let w = window_ns - window_ns / 8;
            if w < 1_000 { 0 } else { w }
        }
    }
}

impl Lead {
    /// Sets every channel's reads non-blocking (the leader sleeps in poll(2)).
    pub(crate) fn new(channels: &[Channel], max_spin: Duration) -> io::Result<Self> {
        for ch in channels {
            let flags = fcntl(ch.as_fd(), FcntlArg::F_GETFL)?;
            let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
            fcntl(ch.as_fd(), FcntlArg::F_SETFL(flags))?;
        }
        let max_spin_ns = u64::try_from(max_spin.as_nanos()).unwrap_or(u64::MAX);
        Ok(Self {
            // The first leader starts awake, before it ever polls: the watchdog
            // must tick from the start (a leader stuck in an inline request before
            // its first poll(2) once hung a mount).
            state: Mutex::new(State {
                active: true,
                ..State::default()
            }),
            followers: Condvar::new(),
            watch: Condvar::new(),
            max_spin_ns,
            window_ns: AtomicU64::new(max_spin_ns),
            read: AtomicU64::new(0),
            inline_since: AtomicU64::new(0),
            epoch: Instant::now(),
            counts: Counts::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the reader role is free and takes it; returns its generation.
    pub(crate) fn acquire(&self) -> u64 {
        let mut g = self.lock();
        while g.taken {
            g = self.followers.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.taken = true;
        g.generation
    }

    /// Gives the reader role up (if `generation` still holds it) and wakes a follower.
    pub(crate) fn release(&self, generation: u64) {
        let mut g = self.lock();
        if g.taken && g.generation == generation {
            g.taken = false;
            drop(g);
            self.followers.notify_one();
        }
    }

    /// The leader that holds `generation` still holds the role.
    pub(crate) fn still_leader(&self, generation: u64) -> bool {
        let g = self.lock();
        g.taken && g.generation == generation
    }

    pub(crate) fn hand_off(&self, generation: u64) {
        self.counts.handoffs.fetch_add(1, Ordering::Relaxed);
        self.release(generation);
    }

    fn set_active(&self, active: bool) {
        let mut g = self.lock();
        if g.active != active {
            g.active = active;
            drop(g);
            if active {
                self.watch.notify_one();
            }
        }
    }

    /// Reads one request: non-blocking reads for the spin window, then poll(2).
    pub(crate) fn receive(&self, ch: &Channel, buf: &mut [u8]) -> nix::Result<usize> {
        let start = Instant::now();
        let window = Duration::from_nanos(self.window_ns.load(Ordering::Relaxed));
        let mut slept = false;
        loop {
            match nix::unistd::read(ch, buf) {
                Ok(n) => {
                    let arrival = if slept {
                        self.counts.poll_wakes.fetch_add(1, Ordering::Relaxed);
                        let waited_ns =
                            u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        Arrival::Slept { waited_ns }
                    } else {
                        self.counts.spin_hits.fetch_add(1, Ordering::Relaxed);
                        Arrival::Spun
                    };
                    let w = self.window_ns.load(Ordering::Relaxed);
                    self.window_ns
                        .store(next_window(w, self.max_spin_ns, arrival), Ordering::Relaxed);
                    self.read.fetch_add(1, Ordering::Relaxed);
                    return Ok(n);
                }
                Err(Errno::EAGAIN) => {
                    if !slept && start.elapsed() < window {
                        // sched_yield, not a pause: the spin takes only CPU time no
                        // other thread wants (see the module docs).
                        std::thread::yield_now();
                        continue;
                    }
                    if !slept {
                        slept = true;
                        self.set_active(false);
                    }
                    let mut fds = [PollFd::new(ch.as_fd(), PollFlags::POLLIN)];
                    let polled = poll(&mut fds, PollTimeout::NONE);
                    self.set_active(true);
                    match polled {
                        Ok(_) | Err(Errno::EINTR) => continue,
                        Err(e) => return Err(e),
                    }
                }
                Err(Errno::ENOENT | Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The leader begins (`true`) or ends an inline request.
    pub(crate) fn inline(&self, begin: bool) {
        if begin {
            self.counts.inline.fetch_add(1, Ordering::Relaxed);
            let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
            self.inline_since.store(now + 1, Ordering::Relaxed);
        } else {
            self.inline_since.store(0, Ordering::Relaxed);
        }
    }

    /// The watchdog: while the leader is awake, every `STALL` it checks that the
    /// leader is not stuck inside one inline request; if it is, a follower reads.
    pub(crate) fn watchdog(&self) {
        let mut g = self.lock();
        loop {
            while !g.active && !g.done {
                g = self.watch.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            if g.done {
                return;
            }
            let read = self.read.load(Ordering::Relaxed);
            let since = self.inline_since.load(Ordering::Relaxed);
            let generation = g.generation;
            drop(g);
            std::thread::sleep(STALL);
            g = self.lock();
            let stuck = since != 0
                && self.inline_since.load(Ordering::Relaxed) == since
                && self.read.load(Ordering::Relaxed) == read;
            if stuck && g.taken && g.generation == generation && !g.done {
                g.taken = false;
                g.generation = g.generation.wrapping_add(1);
                self.counts.takeovers.fetch_add(1, Ordering::Relaxed);
                self.followers.notify_one();
            }
        }
    }

    /// Ends the watchdog.
    pub(crate) fn finish(&self) {
        let mut g = self.lock();
        g.done = true;
        drop(g);
        self.watch.notify_all();
        self.followers.notify_all();
    }

    /// Logs the counters (kmsfs's mount log).
    pub(crate) fn log_counts(&self) {
        let c = &self.counts;
        info!(
            "fuse lead: {} requests read while spinning, {} after sleeping; {} served by the leader, {} handed off, {} watchdog takeovers",
            c.spin_hits.load(Ordering::Relaxed),
            c.poll_wakes.load(Ordering::Relaxed),
            c.inline.load(Ordering::Relaxed),
            c.handoffs.load(Ordering::Relaxed),
            c.takeovers.load(Ordering::Relaxed),
        );
    }
}

/// WRITEs of at most this many bytes are served by the leader: kmsfs buffers a
/// write smaller than a block in memory, and a small file's only WRITE (sent at
/// close from the write-back cache) then costs no hand-off. An untar of 20,000
/// real files took 1.98-2.04 s against 2.20-2.44 s with every WRITE handed off,
/// at half the daemon's context switches (docs/PERFORMANCE.md).
pub const INLINE_WRITE_BYTES: usize = 16 * 1024;

/// Requests the leader serves itself: kmsfs answers them from memory and never
/// waits in them on another request, and WRITEs of at most [`INLINE_WRITE_BYTES`]
/// (buffered in memory; one that fills the dirty limit starts a write-back inside
/// the request, and the watchdog hands the reading on while it runs). Everything else (READ, larger
/// WRITEs, fsync, directory reads, locks, DESTROY, ...) is handed to a follower
/// first.
pub fn served_inline(request: &[u8]) -> bool {
    let Some(&[a, b, c, d]) = request.get(4..8) else {
        return false;
    };
    use crate::ll::fuse_abi::fuse_opcode as op;
    let Ok(opcode) = op::try_from(u32::from_ne_bytes([a, b, c, d])) else {
        return false;
    };
    if matches!(opcode, op::FUSE_WRITE) {
        let overhead = std::mem::size_of::<crate::ll::fuse_abi::fuse_in_header>()
            + std::mem::size_of::<crate::ll::fuse_abi::fuse_write_in>();
        return request.len() <= overhead + INLINE_WRITE_BYTES;
    }
    matches!(
        opcode,
        op::FUSE_LOOKUP
            | op::FUSE_FORGET
            | op::FUSE_BATCH_FORGET
            | op::FUSE_GETATTR
            | op::FUSE_SETATTR
            | op::FUSE_READLINK
            | op::FUSE_SYMLINK
            | op::FUSE_MKNOD
            | op::FUSE_MKDIR
            | op::FUSE_UNLINK
            | op::FUSE_RMDIR
            | op::FUSE_RENAME
            | op::FUSE_RENAME2
            | op::FUSE_LINK
            | op::FUSE_OPEN
            | op::FUSE_CREATE
            | op::FUSE_RELEASE
            | op::FUSE_OPENDIR
            | op::FUSE_RELEASEDIR
            | op::FUSE_STATFS
            | op::FUSE_ACCESS
            | op::FUSE_SETXATTR
            | op::FUSE_GETXATTR
            | op::FUSE_LISTXATTR
            | op::FUSE_REMOVEXATTR
    )
}
