//! FUSE-over-io_uring transport (kernel fs/fuse/dev_uring.c, FUSE 7.42+).
//!
//! Protocol, as learned from the kernel, libfuse lib/fuse_uring.c and the uapi header:
//! - INIT is answered over /dev/fuse with FUSE_OVER_IO_URING in flags2 (needs
//!   FUSE_INIT_EXT); REGISTER before that reply fails with EAGAIN (fc not initialized).
//! - The kernel has one queue per *possible* CPU and sends a request to the queue of the
//!   CPU the calling task runs on; it only switches to the ring once every queue has at
//!   least one registered entry (until then requests wait, they do not fall back).
//! - Each ring entry is a pair of user buffers, registered by an IORING_OP_URING_CMD SQE
//!   (128-byte SQE ring) with cmd_op FUSE_IO_URING_CMD_REGISTER, sqe.addr -> iovec[2]
//!   {header (>= struct fuse_uring_req_header, 288 B), payload (>= max(8 KiB, max_write,
//!   max_pages * 4 KiB))}, sqe.len = 2, and struct fuse_uring_cmd_req {flags, commit_id,
//!   qid} in the 80-byte command area. The SQE completes (res 0) when a request is in the
//!   buffers: fuse_in_header in in_out, the per-op header in op_in, the rest in payload,
//!   commit_id/payload_sz in ring_ent_in_out.
//! - The reply: fuse_out_header in in_out, the body in payload, its size in
//!   ring_ent_in_out.payload_sz, then FUSE_IO_URING_CMD_COMMIT_AND_FETCH with the
//!   commit_id, which also re-arms the entry for the next request.
//! - If REGISTER fails the kernel silently drops back to /dev/fuse (fc->io_uring = 0), so a
//!   failure here must end the run, or "io_uring" figures would be classic ones.

use crate::Gate;
use crate::abi::{self, InHeader, put, u32_at, u64_at};
use crate::fs::{Fs, Reply};
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

pub static RING_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// A zeroed, page-aligned heap buffer (the kernel pins/copies user pages of it).
struct PageBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl PageBuf {
    fn new(len: usize) -> PageBuf {
        let layout = Layout::from_size_align(len.next_multiple_of(4096), 4096).expect("layout");
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory allocating a ring buffer");
        PageBuf { ptr, layout }
    }
    fn len(&self) -> usize {
        self.layout.size()
    }
    /// SAFETY (caller): only while the entry is in user space (the kernel has completed its
    /// SQE and no new SQE for it is queued), so the kernel does not touch the memory.
    unsafe fn slice(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len()) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

struct Ent {
    hdr: PageBuf,
    payload: PageBuf,
    iov: Box<[libc::iovec; 2]>,
    last_cmd: u32,
    commit_id: u64,
}

fn cmd_req(qid: u16, commit_id: u64) -> [u8; 80] {
    let mut c = [0u8; 80];
    put(&mut c, 8, &commit_id.to_le_bytes());
    put(&mut c, 16, &qid.to_le_bytes());
    c
}

fn sqe(fd: RawFd, qid: u16, idx: usize, ent: &Ent) -> squeue::Entry128 {
    let mut op =
        opcode::UringCmd80::new(types::Fd(fd), ent.last_cmd).cmd(cmd_req(qid, ent.commit_id));
    if ent.last_cmd == abi::FUSE_IO_URING_CMD_REGISTER {
        op = op.addr(Some(ent.iov.as_ptr() as u64));
    }
    let e = op.build().user_data(idx as u64);
    if ent.last_cmd != abi::FUSE_IO_URING_CMD_REGISTER {
        return e;
    }
    // The io-uring crate's UringCmd80 has no setter for sqe.len, which REGISTER needs
    // (= 2 iovecs). Entry128 is repr(C) (io_uring_sqe, [u8; 64]); len is the u32 at
    // byte 24 of struct io_uring_sqe.
    // SAFETY: same size and both plain data; every bit pattern is valid for both.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(e) };
    raw[24..28].copy_from_slice(&2u32.to_le_bytes());
    unsafe { std::mem::transmute(raw) }
}

/// Runs queue `qid` (pinned to CPU `qid`) with `depth` entries until unmount.
pub fn serve_queue(fs: &Fs, fd: RawFd, qid: u16, depth: usize, gate: &Gate) -> io::Result<()> {
    let cpus = nix::sched::CpuSet::new();
    let mut cpus = cpus;
    if cpus.set(qid as usize).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus);
    }
    let payload_sz = (fs.max_pages as usize * 4096).max(8192);
    let mut ents: Vec<Ent> = (0..depth)
        .map(|_| {
            let hdr = PageBuf::new(abi::URING_REQ_HEADER_LEN);
            let payload = PageBuf::new(payload_sz);
            let iov = Box::new([
                libc::iovec {
                    iov_base: hdr.ptr.cast(),
                    iov_len: hdr.len(),
                },
                libc::iovec {
                    iov_base: payload.ptr.cast(),
                    iov_len: payload.len(),
                },
            ]);
            Ent {
                hdr,
                payload,
                iov,
                last_cmd: abi::FUSE_IO_URING_CMD_REGISTER,
                commit_id: 0,
            }
        })
        .collect();
    // Declared after ents so it is dropped (and its pending commands cancelled) first.
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> =
        IoUring::builder().build((depth as u32 * 2).next_power_of_two())?;
    if !gate.wait() {
        return Ok(());
    }
    for (i, e) in ents.iter().enumerate() {
        // SAFETY: the buffers outlive the ring (ents is dropped after it).
        unsafe { ring.submission().push(&sqe(fd, qid, i, e)) }
            .map_err(|_| io::Error::other("submission queue full"))?;
    }
    ring.submit()?;
    let mut done: Vec<(usize, i32)> = Vec::with_capacity(depth);
    let mut scratch = [0u8; 4096];
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        done.clear();
        done.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
        for &(idx, res) in &done {
            let Some(ent) = ents.get_mut(idx) else {
                return Err(io::Error::other(format!(
                    "CQE with unknown user_data {idx}"
                )));
            };
            if res < 0 {
                let cmd = if ent.last_cmd == abi::FUSE_IO_URING_CMD_REGISTER {
                    "REGISTER"
                } else {
                    "COMMIT_AND_FETCH"
                };
                match -res {
                    libc::EAGAIN | libc::EINTR => {
                        // SAFETY: as above.
                        unsafe { ring.submission().push(&sqe(fd, qid, idx, ent)) }
                            .map_err(|_| io::Error::other("submission queue full"))?;
                        continue;
                    }
                    libc::ENOTCONN | libc::ECANCELED | libc::ENODEV => {
                        return Ok(()); // unmounted
                    }
                    e => {
                        return Err(io::Error::other(format!(
                            "qid {qid}: {cmd} failed: {}",
                            io::Error::from_raw_os_error(e)
                        )));
                    }
                }
            }
            RING_REQUESTS.fetch_add(1, Ordering::Relaxed);
            // SAFETY: the kernel completed this entry's SQE; it is ours until we commit.
            let hdr = unsafe { ent.hdr.slice() };
            let payload = unsafe { ent.payload.slice() };
            let (Some(h), Some(commit_id), Some(psz)) = (
                InHeader::parse(&hdr[abi::URING_IN_OUT_OFF..]),
                u64_at(hdr, abi::URING_ENT_IN_OUT_OFF + 8),
                u32_at(hdr, abi::URING_ENT_IN_OUT_OFF + 16),
            ) else {
                return Err(io::Error::other("short ring header"));
            };
            let mut op_in = [0u8; abi::URING_OP_IN_LEN];
            op_in.copy_from_slice(
                &hdr[abi::URING_OP_IN_OFF..abi::URING_OP_IN_OFF + abi::URING_OP_IN_LEN],
            );
            // Request payload (e.g. LOOKUP's name) copied aside: the reply overwrites it.
            let pin = (psz as usize).min(scratch.len()).min(payload.len());
            scratch[..pin].copy_from_slice(&payload[..pin]);
            let (err, len) = match fs.handle(&h, &op_in, &scratch[..pin], payload) {
                Reply::Ok(len) => (0, len),
                Reply::Err(e) => (-e, 0),
                Reply::None => (-libc::ENOSYS, 0),
            };
            abi::out_header(
                &mut hdr[abi::URING_IN_OUT_OFF..],
                (16 + len) as u32,
                err,
                h.unique,
            );
            put(
                hdr,
                abi::URING_ENT_IN_OUT_OFF + 16,
                &(len as u32).to_le_bytes(),
            );
            ent.last_cmd = abi::FUSE_IO_URING_CMD_COMMIT_AND_FETCH;
            ent.commit_id = commit_id;
            // SAFETY: as above.
            unsafe { ring.submission().push(&sqe(fd, qid, idx, ent)) }
                .map_err(|_| io::Error::other("submission queue full"))?;
        }
    }
}
