//! FUSE over io_uring (Linux 6.14+, `/sys/module/fuse/parameters/enable_uring`): a
//! transport added by kmsfs to this vendored fuser (see PATCHES.md).
//!
//! Protocol (the kernel's fs/fuse/dev_uring.c and include/uapi/linux/fuse.h):
//! - INIT is answered over /dev/fuse with `FUSE_OVER_IO_URING`; REGISTER before that
//!   reply fails with EAGAIN.
//! - The kernel keeps one queue per *possible* CPU and queues a request on the queue of
//!   the CPU the caller runs on. It switches to the ring once every queue has an entry;
//!   until then new requests wait. If a REGISTER fails, the kernel silently goes back to
//!   /dev/fuse for the whole connection, so the classic threads keep running.
//! - An entry is a pair of user buffers: a header (struct fuse_uring_req_header: in_out
//!   128 B, op_in 128 B, ring_ent_in_out 32 B) and a payload of at least
//!   max(8 KiB, max_write, max_pages * page size). It is registered with an
//!   IORING_OP_URING_CMD (128-byte SQE) `FUSE_IO_URING_CMD_REGISTER`, sqe.addr -> iovec[2]
//!   and sqe.len = 2. The SQE completes when a request is in the buffers: fuse_in_header in
//!   in_out, the op header in op_in (its length: in.len - 40 - payload_sz), the rest in the
//!   payload, payload_sz and commit_id in ring_ent_in_out.
//! - The reply: fuse_out_header in in_out, the body in the payload, its length in
//!   payload_sz; `FUSE_IO_URING_CMD_COMMIT_AND_FETCH` sends it and re-arms the entry.
//! - FORGET, BATCH_FORGET and INTERRUPT never come over the ring (a /dev/fuse thread takes
//!   them); notifications still go to /dev/fuse.
//! - Unmount or abort completes the entries with ENOTCONN (ECONNABORTED, ECANCELED,
//!   ENODEV): the ring threads end.
//!
//! Each ring thread owns one io_uring and one entry, pinned to its queue's CPU. A request
//! is rebuilt in place as the bytes fuser's parser reads from /dev/fuse: the in header and
//! the op header are copied just before the payload (the payload buffer has a page of
//! room in front of it). Replies go through [`UringSender`] into the entry; a reply may
//! come from another thread after `dispatch` returns, so the ring thread waits for it (or
//! for the last reply object to be dropped) before it commits.

use std::alloc::Layout;
use std::alloc::alloc_zeroed;
use std::alloc::dealloc;
use std::io;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::error;
use log::info;
use log::warn;
use parking_lot::Condvar;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::ReplyEmpty;
use crate::channel::ChannelSender;
use crate::ll::Operation;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;
/// struct fuse_in_header / fuse_out_header.
const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;
/// struct fuse_uring_req_header: in_out[128], op_in[128], fuse_uring_ent_in_out.
const OP_IN_OFF: usize = 128;
const OP_IN_LEN: usize = 128;
const ENT_IN_OUT_OFF: usize = 256;
const REQ_HEADER_LEN: usize = 288;
/// Room in front of the payload for the in header and the op header.
const FRONT: usize = 4096;

/// Requests served over the ring since the process started (all sessions).
pub(crate) static RING_REQUESTS: AtomicU64 = AtomicU64::new(0);
/// Requests read from /dev/fuse after INIT since the process started (all sessions).
pub(crate) static DEV_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// The size of the ring's payload buffers for a connection.
pub(crate) fn payload_len(max_write: u32, max_pages: u16) -> usize {
    (max_write as usize)
        .max(usize::from(max_pages) * page_size::get())
        .max(8192)
}

/// Queue ids: 0..=the highest possible CPU (the kernel's nr_cpu_ids).
pub(crate) fn queue_count() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| parse_cpu_list_max(s.trim()))
        .map(|m| m + 1)
        .unwrap_or_else(|| {
            // SAFETY: sysconf has no preconditions.
            let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
            usize::try_from(n).unwrap_or(1).max(1)
        })
}

/// The highest CPU number in a list such as "0-3,8,10-11".
fn parse_cpu_list_max(s: &str) -> Option<usize> {
    let mut max = None;
    for part in s.split(',') {
        let last = part.rsplit('-').next()?;
        let n: usize = last.trim().parse().ok()?;
        max = Some(max.map_or(n, |m: usize| m.max(n)));
    }
    max
}

/// A zeroed, page-aligned buffer the kernel reads and writes while an SQE for it is
/// pending (never while user space holds the entry).
struct PageBuf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: a plain heap allocation; access is coordinated by `Slot::state`.
unsafe impl Send for PageBuf {}
// SAFETY: as above.
unsafe impl Sync for PageBuf {}

impl PageBuf {
    fn new(len: usize) -> io::Result<PageBuf> {
        let len = len.next_multiple_of(4096);
        let layout = Layout::from_size_align(len, 4096).map_err(io::Error::other)?;
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(PageBuf { ptr, layout })
    }

    fn len(&self) -> usize {
        self.layout.size()
    }

    /// SAFETY (caller): `off + len <= self.len()`, and nobody (kernel or thread) writes
    /// those bytes while the slice lives.
    unsafe fn get(&self, off: usize, len: usize) -> &[u8] {
        debug_assert!(off + len <= self.len());
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) }
    }

    /// SAFETY (caller): `off + len <= self.len()`, and nobody else reads or writes those
    /// bytes while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get_mut(&self, off: usize, len: usize) -> &mut [u8] {
        debug_assert!(off + len <= self.len());
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The kernel owns the buffers (an SQE is pending), or the ring thread is between
    /// requests: replies are refused.
    Closed,
    /// A request is being served; its reply is awaited. `direct`: the reply body may go
    /// straight into the payload buffer (the request has no payload there).
    Awaiting { unique: u64, direct: bool },
    /// The reply is in: out header in `State::out`, body in the payload or `side`.
    Replied,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// The request being served (or last served).
    unique: u64,
    /// Live reply objects for that request.
    senders: usize,
    out: [u8; OUT_HEADER_LEN],
    body_len: usize,
    /// The reply body when it cannot go into the payload yet (the request's own payload
    /// is still borrowed there while `dispatch` runs).
    side: Vec<u8>,
}

/// One ring entry: its buffers and the hand-over of the reply.
pub(crate) struct Slot {
    hdr: PageBuf,
    /// FRONT bytes, then the payload buffer registered with the kernel.
    area: PageBuf,
    payload_len: usize,
    state: Mutex<State>,
    cond: Condvar,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("payload_len", &self.payload_len)
            .finish_non_exhaustive()
    }
}

impl Slot {
    fn new(payload_len: usize) -> io::Result<Slot> {
        let area = PageBuf::new(FRONT + payload_len)?;
        Ok(Slot {
            hdr: PageBuf::new(REQ_HEADER_LEN)?,
            payload_len: area.len() - FRONT,
            area,
            state: Mutex::new(State {
                phase: Phase::Closed,
                unique: 0,
                senders: 0,
                out: [0; OUT_HEADER_LEN],
                body_len: 0,
                side: Vec::new(),
            }),
            cond: Condvar::new(),
        })
    }
}

/// The reply path of a request that came over the ring (a `ReplySender` variant).
#[derive(Debug)]
pub(crate) struct UringSender {
    slot: Arc<Slot>,
    unique: u64,
    /// /dev/fuse, for the passthrough ioctls.
    pub(crate) ch: ChannelSender,
}

impl UringSender {
    pub(crate) fn new(slot: Arc<Slot>, unique: u64, ch: ChannelSender) -> UringSender {
        {
            let mut st = slot.state.lock();
            if st.unique == unique {
                st.senders += 1;
            }
        }
        UringSender { slot, unique, ch }
    }

    /// Stores a reply (fuse_out_header, then the body) for the ring thread to commit.
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let total: usize = data.iter().map(|s| s.len()).sum();
        let mut st = self.slot.state.lock();
        let direct = match st.phase {
            Phase::Awaiting { unique, direct } if unique == self.unique => direct,
            _ => {
                return Err(io::Error::other(format!(
                    "reply to request {} after it was answered",
                    self.unique
                )));
            }
        };
        if total < OUT_HEADER_LEN {
            return Err(io::Error::other("reply shorter than a fuse_out_header"));
        }
        let body_len = total - OUT_HEADER_LEN;
        let mut out = [0u8; OUT_HEADER_LEN];
        if body_len > self.slot.payload_len {
            error!(
                "reply to request {} has {body_len} bytes, more than the ring's {}: answering EIO",
                self.unique, self.slot.payload_len
            );
            out[..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
            out[4..8].copy_from_slice(&(-libc::EIO).to_le_bytes());
            out[8..].copy_from_slice(&self.unique.to_le_bytes());
            st.out = out;
            st.body_len = 0;
        } else {
            // SAFETY: in range (checked above). With `direct`, the request's bytes end
            // where the payload begins, so nothing else reads or writes this range until
            // the ring thread commits, which it does only after this reply is in.
            let body: &mut [u8] = if direct {
                unsafe { self.slot.area.get_mut(FRONT, body_len) }
            } else {
                st.side.resize(body_len, 0);
                &mut st.side[..]
            };
            let (mut o, mut b) = (0usize, 0usize);
            for s in data {
                let mut s: &[u8] = s;
                if o < OUT_HEADER_LEN {
                    let n = s.len().min(OUT_HEADER_LEN - o);
                    out[o..o + n].copy_from_slice(&s[..n]);
                    o += n;
                    s = &s[n..];
                }
                body[b..b + s.len()].copy_from_slice(s);
                b += s.len();
            }
            st.out = out;
            st.body_len = body_len;
        }
        st.phase = Phase::Replied;
        drop(st);
        self.slot.cond.notify_all();
        Ok(())
    }
}

impl Drop for UringSender {
    fn drop(&mut self) {
        let mut st = self.slot.state.lock();
        // A reply object of an earlier request on this entry counts for nothing now.
        if st.unique != self.unique {
            return;
        }
        st.senders = st.senders.saturating_sub(1);
        if st.senders == 0 {
            drop(st);
            self.slot.cond.notify_all();
        }
    }
}

fn cmd_sqe(
    fd: RawFd,
    cmd: u32,
    qid: u16,
    commit_id: u64,
    iov: *const libc::iovec,
) -> squeue::Entry128 {
    // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 padding[6]; }
    let mut req = [0u8; 80];
    req[8..16].copy_from_slice(&commit_id.to_le_bytes());
    req[16..18].copy_from_slice(&qid.to_le_bytes());
    let mut op = opcode::UringCmd80::new(types::Fd(fd), cmd).cmd(req);
    if cmd == FUSE_IO_URING_CMD_REGISTER {
        op = op.addr(Some(iov as u64));
    }
    let e = op.build();
    if cmd != FUSE_IO_URING_CMD_REGISTER {
        return e;
    }
    // REGISTER needs sqe.len = 2 (iovecs), which UringCmd80 has no setter for. Entry128 is
    // repr(C) (struct io_uring_sqe, then 64 command bytes); len is the u32 at byte 24.
    // SAFETY: both types are 128 bytes of plain data, valid for every bit pattern.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(e) };
    raw[24..28].copy_from_slice(&2u32.to_le_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET checks the index against the set's size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu < 8 * std::mem::size_of::<libc::cpu_set_t>() {
            libc::CPU_SET(cpu, &mut set);
            let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// How a ring thread ended.
pub(crate) enum RingEnd {
    /// The connection ended (unmount or abort).
    Unmounted,
    /// REGISTER was refused: the kernel serves this connection over /dev/fuse.
    Refused(io::Error),
}

/// Serves queue `qid` with one entry until the connection ends.
pub(crate) fn serve_queue<FS: Filesystem>(
    se: &SessionEventLoop<FS>,
    qid: u16,
    payload_len: usize,
) -> io::Result<RingEnd> {
    pin_to_cpu(usize::from(qid));
    let fd = se.ch.as_fd().as_raw_fd();
    let slot = Arc::new(Slot::new(payload_len)?);
    let iov = Box::new([
        libc::iovec {
            iov_base: slot.hdr.ptr.cast(),
            iov_len: slot.hdr.len(),
        },
        libc::iovec {
            // SAFETY: FRONT < area.len().
            iov_base: unsafe { slot.area.ptr.add(FRONT) }.cast(),
            iov_len: slot.payload_len,
        },
    ]);
    // Aligned copy of a request whose op header length is not a multiple of 8 (none
    // known; the in-place layout needs 8-byte alignment).
    let mut scratch: Vec<u64> = Vec::new();
    // Dropped before `slot` and `iov` (declared after them): closing the ring cancels
    // its pending command, so the kernel no longer writes into the buffers.
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> = IoUring::builder().build(4)?;
    let mut cmd = FUSE_IO_URING_CMD_REGISTER;
    let mut commit_id = 0u64;
    let started = Instant::now();
    loop {
        let sqe = cmd_sqe(fd, cmd, qid, commit_id, iov.as_ptr());
        // SAFETY: the buffers and iovecs outlive the ring (declared before it).
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        let res = loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            if let Some(c) = ring.completion().next() {
                break c.result();
            }
        };
        if res < 0 {
            match -res {
                libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV => {
                    return Ok(RingEnd::Unmounted);
                }
                libc::EAGAIN | libc::EINTR if started.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                e if cmd == FUSE_IO_URING_CMD_REGISTER => {
                    return Ok(RingEnd::Refused(io::Error::from_raw_os_error(e)));
                }
                e => {
                    return Err(io::Error::other(format!(
                        "io_uring queue {qid}: COMMIT_AND_FETCH failed: {}",
                        io::Error::from_raw_os_error(e)
                    )));
                }
            }
        }
        RING_REQUESTS.fetch_add(1, Ordering::Relaxed);
        commit_id = serve_one(se, &slot, &mut scratch);
        cmd = FUSE_IO_URING_CMD_COMMIT_AND_FETCH;
    }
}

/// Serves the request in `slot` and leaves its reply there; returns the commit id.
fn serve_one<FS: Filesystem>(
    se: &SessionEventLoop<FS>,
    slot: &Arc<Slot>,
    scratch: &mut Vec<u64>,
) -> u64 {
    // SAFETY: the kernel completed the entry's SQE; until the next one the buffers are
    // ours, and no reply object for this slot is alive (phase Closed).
    let hdr = unsafe { slot.hdr.get(0, REQ_HEADER_LEN) };
    let len = u32_at(hdr, 0).unwrap_or(0) as usize;
    let unique = u64_at(hdr, 8).unwrap_or(0);
    let commit_id = u64_at(hdr, ENT_IN_OUT_OFF + 8).unwrap_or(0);
    let psz = u32_at(hdr, ENT_IN_OUT_OFF + 16).unwrap_or(u32::MAX) as usize;
    let op_len = len
        .checked_sub(IN_HEADER_LEN)
        .and_then(|n| n.checked_sub(psz))
        .filter(|n| *n <= OP_IN_LEN && psz <= slot.payload_len);
    let Some(op_len) = op_len else {
        error!(
            "io_uring: request {unique} with bad lengths (len {len}, payload {psz}): answering EIO"
        );
        finish(slot, errno_reply(unique, libc::EIO), 0);
        return commit_id;
    };
    let in_place = op_len % 8 == 0;
    let start = FRONT - IN_HEADER_LEN - op_len;
    let mut head = [0u8; IN_HEADER_LEN + OP_IN_LEN];
    head[..IN_HEADER_LEN].copy_from_slice(&hdr[..IN_HEADER_LEN]);
    head[IN_HEADER_LEN..IN_HEADER_LEN + op_len]
        .copy_from_slice(&hdr[OP_IN_OFF..OP_IN_OFF + op_len]);
    let head = &head[..IN_HEADER_LEN + op_len];
    let direct = psz == 0 || !in_place;
    let bytes: &[u8] = if in_place {
        // SAFETY: start..FRONT + psz lies within the area (op_len <= 128, psz checked);
        // written only here, and read only by the request below: a direct reply writes
        // from FRONT on, which this request does not reach when `direct`.
        unsafe { slot.area.get_mut(start, head.len()) }.copy_from_slice(head);
        unsafe { slot.area.get(start, len) }
    } else {
        scratch.clear();
        scratch.resize(len.div_ceil(8), 0);
        // SAFETY: a u64 buffer of at least len bytes, seen as bytes.
        let s = unsafe { std::slice::from_raw_parts_mut(scratch.as_mut_ptr().cast::<u8>(), len) };
        s[..head.len()].copy_from_slice(head);
        // SAFETY: FRONT..FRONT + psz is within the area (psz checked).
        s[head.len()..].copy_from_slice(unsafe { slot.area.get(FRONT, psz) });
        s
    };
    {
        let mut st = slot.state.lock();
        st.phase = Phase::Awaiting { unique, direct };
        st.unique = unique;
        st.senders = 0;
    }
    match RequestWithSender::new_uring(se.ch.sender(), bytes, slot.clone()) {
        Some(req) => {
            if let Ok(Operation::Destroy(_)) = req.request.operation() {
                req.reply::<ReplyEmpty>().ok();
            } else {
                req.dispatch(se);
            }
        }
        None => {
            let mut st = slot.state.lock();
            if st.phase == (Phase::Awaiting { unique, direct }) {
                st.out = errno_reply(unique, libc::EIO);
                st.body_len = 0;
                st.phase = Phase::Replied;
            }
        }
    }
    // The request's bytes are no longer borrowed. Wait for the reply, or for the last
    // reply object to go (an operation without a reply: answered ENOSYS).
    let mut st = slot.state.lock();
    while matches!(st.phase, Phase::Awaiting { .. }) && st.senders > 0 {
        slot.cond.wait(&mut st);
    }
    if matches!(st.phase, Phase::Awaiting { .. }) {
        warn!("io_uring: request {unique} got no reply: answering ENOSYS");
        st.out = errno_reply(unique, libc::ENOSYS);
        st.body_len = 0;
    }
    st.phase = Phase::Closed;
    let (out, body_len) = (st.out, st.body_len);
    if !direct && body_len > 0 {
        // SAFETY: body_len <= payload_len (checked by the sender); the request no
        // longer borrows the payload.
        unsafe { slot.area.get_mut(FRONT, body_len) }.copy_from_slice(&st.side[..body_len]);
    }
    drop(st);
    finish(slot, out, body_len);
    commit_id
}

fn errno_reply(unique: u64, errno: i32) -> [u8; OUT_HEADER_LEN] {
    let mut out = [0u8; OUT_HEADER_LEN];
    out[..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
    out[4..8].copy_from_slice(&(-errno).to_le_bytes());
    out[8..].copy_from_slice(&unique.to_le_bytes());
    out
}

/// Writes the out header and the payload size into the entry's header buffer.
fn finish(slot: &Slot, out: [u8; OUT_HEADER_LEN], body_len: usize) {
    // SAFETY: the ring thread owns the header buffer between the CQE and the next SQE.
    let hdr = unsafe { slot.hdr.get_mut(0, REQ_HEADER_LEN) };
    hdr[..OUT_HEADER_LEN].copy_from_slice(&out);
    hdr[ENT_IN_OUT_OFF + 16..ENT_IN_OUT_OFF + 20].copy_from_slice(&(body_len as u32).to_le_bytes());
}

/// Logs the ring layout at the start of a session.
pub(crate) fn log_start(queues: usize, per_queue: usize, payload_len: usize) {
    info!(
        "FUSE over io_uring: {queues} queues x {per_queue} threads, {} KiB payload buffers",
        payload_len >> 10
    );
}

/// Logs how the ring threads ended (a refused REGISTER, a failed thread).
pub(crate) fn log_end(ends: &[io::Result<RingEnd>]) {
    let refused = ends.iter().find_map(|e| match e {
        Ok(RingEnd::Refused(err)) => Some(err),
        _ => None,
    });
    if let Some(err) = refused {
        warn!(
            "FUSE over io_uring: the kernel refused the ring ({err}); requests went over /dev/fuse"
        );
    }
    for e in ends {
        if let Err(e) = e {
            error!("FUSE over io_uring: a ring thread failed: {e}");
        }
    }
}

/// Logs the request counts of a session (the test suite reads this line).
pub(crate) fn log_counts() {
    info!(
        "FUSE over io_uring: {} requests over the ring, {} over /dev/fuse",
        RING_REQUESTS.load(Ordering::Relaxed),
        DEV_REQUESTS.load(Ordering::Relaxed)
    );
}
