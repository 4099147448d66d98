//! Classic transport: threads that read(2) requests from /dev/fuse and write(2) replies
//! (one shared fd, as fuser does by default). In io_uring mode one such thread still runs:
//! it answers INIT (which always comes over /dev/fuse) and takes FORGET/INTERRUPT.

use crate::Gate;
use crate::abi::{self, InHeader};
use crate::fs::{Fs, Reply};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

pub static DEV_REQUESTS: AtomicU64 = AtomicU64::new(0);

fn write_all(fd: RawFd, b: &[u8]) -> io::Result<()> {
    // SAFETY: b is a valid slice; /dev/fuse takes one whole reply per write.
    let n = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        // ENOENT: the request was interrupted and is gone; not an error for us.
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Serves until the file system is unmounted (read returns ENODEV).
pub fn serve(fs: &Fs, fd: RawFd, gate: &Gate) -> io::Result<()> {
    let body = fs.max_pages as usize * 4096;
    let mut buf = vec![0u8; body + 4096];
    let mut out = vec![0u8; abi::OUT_HEADER_LEN + body];
    loop {
        // SAFETY: buf is a valid, writable buffer of buf.len() bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ENOENT) => continue,
                Some(libc::ENODEV) => return Ok(()),
                _ => return Err(e),
            }
        }
        let req = &buf[..n as usize];
        let Some(h) = InHeader::parse(req) else {
            return Err(io::Error::other(format!("short FUSE request ({n} bytes)")));
        };
        if h.len as usize != req.len() {
            return Err(io::Error::other(format!(
                "FUSE request len {} != read {n}",
                h.len
            )));
        }
        let arg = &req[abi::IN_HEADER_LEN..];
        DEV_REQUESTS.fetch_add(1, Ordering::Relaxed);
        if h.opcode == abi::INIT {
            match fs.init(arg, &mut out[abi::OUT_HEADER_LEN..]) {
                Ok(len) => {
                    let total = abi::OUT_HEADER_LEN + len;
                    abi::out_header(&mut out, total as u32, 0, h.unique);
                    write_all(fd, &out[..total])?;
                    gate.open();
                }
                Err(msg) => {
                    abi::out_header(&mut out, 16, -libc::EPROTO, h.unique);
                    let _ = write_all(fd, &out[..16]);
                    gate.fail(msg.clone());
                    return Err(io::Error::other(msg));
                }
            }
            continue;
        }
        let (op_in, payload): (&[u8], &[u8]) = if h.opcode == abi::LOOKUP {
            (&[], arg)
        } else {
            (arg, &[])
        };
        let total = match fs.handle(&h, op_in, payload, &mut out[abi::OUT_HEADER_LEN..]) {
            Reply::None => continue,
            Reply::Ok(len) => {
                let total = abi::OUT_HEADER_LEN + len;
                abi::out_header(&mut out, total as u32, 0, h.unique);
                total
            }
            Reply::Err(e) => {
                abi::out_header(&mut out, 16, -e, h.unique);
                16
            }
        };
        write_all(fd, &out[..total])?;
    }
}
