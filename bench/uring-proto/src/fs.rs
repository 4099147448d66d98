//! The trivial read-only file system both transports serve: a root directory holding one
//! file, `file`, whose bytes are copied from a 1 MiB pattern (byte o = PATTERN[o % 1 MiB]),
//! so a READ costs what a real file system's "copy the plaintext into the reply" costs.
//! With `--aead` every 64 KiB block a READ touches is first decrypted and verified
//! (AES-256-GCM-SIV via aws-lc-rs, as kmsfs does) into a scratch buffer and copied from
//! there, which mimics kmsfs's cold read path.

use crate::abi::{self, InHeader, put, u32_at, u64_at};
use aws_lc_rs::aead::{AES_256_GCM_SIV, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

pub const BLOCK: usize = 64 << 10;
const TAG: usize = 16;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; BLOCK + TAG]);
}

/// The sealed blocks of the pattern (block b of the file is sealed[b % 16]).
pub struct Sealed {
    key: LessSafeKey,
    blocks: Vec<Vec<u8>>,
}

impl Sealed {
    fn new(pattern: &[u8]) -> Sealed {
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM_SIV, &[7u8; 32]).expect("key"));
        let blocks = pattern
            .chunks(BLOCK)
            .enumerate()
            .map(|(i, p)| {
                let mut b = p.to_vec();
                key.seal_in_place_append_tag(nonce(i), Aad::empty(), &mut b)
                    .expect("seal");
                b
            })
            .collect();
        Sealed { key, blocks }
    }
}

fn nonce(i: usize) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

pub const PATTERN_LEN: usize = 1 << 20;
const ROOT: u64 = 1;
const FILE: u64 = 2;
const ENOENT: i32 = libc::ENOENT;
const ENOSYS: i32 = libc::ENOSYS;
const EPROTO: i32 = libc::EPROTO;

/// What a handler did with a request.
pub enum Reply {
    /// No reply (FORGET, INTERRUPT).
    None,
    /// Success with this many bytes of reply body.
    Ok(usize),
    /// An errno (positive).
    Err(i32),
}

pub struct Fs {
    pub size: u64,
    pub pattern: Vec<u8>,
    pub max_pages: u16,
    pub want_uring: bool,
    pub sealed: Option<Sealed>,
    /// Requests seen per opcode (0..64), printed at exit as evidence of what ran where.
    pub counts: Vec<AtomicU64>,
}

pub fn pattern() -> Vec<u8> {
    let mut p = Vec::with_capacity(PATTERN_LEN);
    for w in 0..(PATTERN_LEN / 8) as u64 {
        p.extend_from_slice(&w.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    }
    p
}

impl Fs {
    pub fn new(size: u64, max_pages: u16, want_uring: bool, aead: bool) -> Fs {
        let pattern = pattern();
        Fs {
            size,
            sealed: aead.then(|| Sealed::new(&pattern)),
            pattern,
            max_pages,
            want_uring,
            counts: (0..64).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Handles one request. `op_in` is the per-opcode header, `payload` what follows it
    /// (the io_uring transport hands them over separately; the classic one splits them).
    /// The reply body goes to `out`, which holds at least max_pages * 4 KiB.
    pub fn handle(&self, h: &InHeader, op_in: &[u8], payload: &[u8], out: &mut [u8]) -> Reply {
        if let Some(c) = self.counts.get(h.opcode as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        match h.opcode {
            abi::LOOKUP => {
                let name = payload.split(|&b| b == 0).next().unwrap_or(&[]);
                if h.nodeid == ROOT && name == b"file" {
                    self.entry_out(out, FILE)
                } else {
                    Reply::Err(ENOENT)
                }
            }
            abi::GETATTR => match h.nodeid {
                ROOT | FILE => {
                    put(out, 0, &0u64.to_le_bytes()); // attr_valid: 0 s, so stat reaches us
                    put(out, 8, &0u64.to_le_bytes()); // attr_valid_nsec + dummy
                    self.attr(&mut out[16..], h.nodeid);
                    Reply::Ok(16 + 88)
                }
                _ => Reply::Err(ENOENT),
            },
            abi::OPEN | abi::OPENDIR => {
                put(out, 0, &[0u8; 16]); // fh 0, open_flags 0 (page cache, no keep_cache)
                Reply::Ok(16)
            }
            abi::READ => {
                let (Some(off), Some(size)) = (u64_at(op_in, 8), u32_at(op_in, 16)) else {
                    return Reply::Err(EPROTO);
                };
                if h.nodeid != FILE {
                    return Reply::Err(libc::EISDIR);
                }
                let n = (size as u64).min(self.size.saturating_sub(off)) as usize;
                let n = n.min(out.len());
                match &self.sealed {
                    None => self.fill(&mut out[..n], off),
                    Some(s) => {
                        if let Err(e) = self.fill_aead(s, &mut out[..n], off) {
                            return Reply::Err(e);
                        }
                    }
                }
                Reply::Ok(n)
            }
            abi::READDIR => Reply::Ok(0),
            abi::RELEASE | abi::RELEASEDIR | abi::FLUSH | abi::ACCESS => Reply::Ok(0),
            abi::STATFS => {
                let mut s = [0u8; 80];
                put(&mut s, 0, &(self.size / 4096).to_le_bytes()); // blocks
                put(&mut s, 24, &2u64.to_le_bytes()); // files
                put(&mut s, 40, &4096u32.to_le_bytes()); // bsize
                put(&mut s, 44, &255u32.to_le_bytes()); // namelen
                put(&mut s, 48, &4096u32.to_le_bytes()); // frsize
                put(out, 0, &s);
                Reply::Ok(80)
            }
            abi::FORGET | abi::BATCH_FORGET | abi::INTERRUPT => Reply::None,
            abi::DESTROY => Reply::Ok(0),
            _ => Reply::Err(ENOSYS),
        }
    }

    /// INIT: returns the fuse_init_out body length, or an error naming the cause.
    pub fn init(&self, op_in: &[u8], out: &mut [u8]) -> Result<usize, String> {
        let major = u32_at(op_in, 0).ok_or("INIT: short fuse_init_in")?;
        let minor = u32_at(op_in, 4).ok_or("INIT: short fuse_init_in")?;
        let max_readahead = u32_at(op_in, 8).ok_or("INIT: short fuse_init_in")?;
        let flags = u32_at(op_in, 12).ok_or("INIT: short fuse_init_in")? as u64;
        let flags2 = u32_at(op_in, 16).unwrap_or(0) as u64;
        if major != abi::FUSE_KERNEL_VERSION {
            return Err(format!("INIT: kernel FUSE major {major}, expected 7"));
        }
        let offered = flags | (flags2 << 32);
        let mut want = abi::FUSE_ASYNC_READ
            | abi::FUSE_PARALLEL_DIROPS
            | abi::FUSE_MAX_PAGES
            | abi::FUSE_INIT_EXT;
        if self.want_uring {
            if offered & abi::FUSE_OVER_IO_URING == 0 {
                return Err(format!(
                    "INIT: the kernel (7.{minor}) did not offer FUSE_OVER_IO_URING: \
                     is /sys/module/fuse/parameters/enable_uring Y?"
                ));
            }
            want |= abi::FUSE_OVER_IO_URING;
        }
        let got = offered & want;
        eprintln!(
            "INIT: kernel 7.{minor} flags {offered:#x}, reply flags {got:#x}, max_pages {}",
            self.max_pages
        );
        let mut o = [0u8; 64];
        put(&mut o, 0, &abi::FUSE_KERNEL_VERSION.to_le_bytes());
        put(
            &mut o,
            4,
            &minor.min(abi::FUSE_KERNEL_MINOR_VERSION).to_le_bytes(),
        );
        put(&mut o, 8, &max_readahead.to_le_bytes());
        put(&mut o, 12, &(got as u32).to_le_bytes());
        put(&mut o, 16, &64u16.to_le_bytes()); // max_background
        put(&mut o, 18, &48u16.to_le_bytes()); // congestion_threshold
        put(&mut o, 20, &(self.max_pages as u32 * 4096).to_le_bytes()); // max_write
        put(&mut o, 24, &1u32.to_le_bytes()); // time_gran
        put(&mut o, 28, &self.max_pages.to_le_bytes());
        put(&mut o, 32, &((got >> 32) as u32).to_le_bytes()); // flags2
        put(out, 0, &o);
        Ok(64)
    }

    fn attr(&self, b: &mut [u8], ino: u64) {
        let (size, mode, nlink) = if ino == ROOT {
            (0, libc::S_IFDIR | 0o555, 2u32)
        } else {
            (self.size, libc::S_IFREG | 0o444, 1)
        };
        let mut a = [0u8; 88];
        put(&mut a, 0, &ino.to_le_bytes());
        put(&mut a, 8, &size.to_le_bytes());
        put(&mut a, 16, &size.div_ceil(512).to_le_bytes());
        put(&mut a, 60, &mode.to_le_bytes());
        put(&mut a, 64, &nlink.to_le_bytes());
        put(&mut a, 80, &4096u32.to_le_bytes()); // blksize
        put(b, 0, &a);
    }

    fn entry_out(&self, out: &mut [u8], ino: u64) -> Reply {
        put(out, 0, &ino.to_le_bytes());
        put(out, 8, &0u64.to_le_bytes()); // generation
        put(out, 16, &1u64.to_le_bytes()); // entry_valid 1 s
        put(out, 24, &0u64.to_le_bytes()); // attr_valid 0 s
        put(out, 32, &0u64.to_le_bytes()); // both nsec fields
        self.attr(&mut out[40..], ino);
        Reply::Ok(128)
    }

    /// Copies file bytes [off, off + dst.len()) from the pattern.
    pub fn fill(&self, dst: &mut [u8], off: u64) {
        let mut done = 0;
        while done < dst.len() {
            let p = ((off + done as u64) % PATTERN_LEN as u64) as usize;
            let n = (PATTERN_LEN - p).min(dst.len() - done);
            dst[done..done + n].copy_from_slice(&self.pattern[p..p + n]);
            done += n;
        }
    }

    /// Like fill(), but every 64 KiB block touched is decrypted and verified first.
    fn fill_aead(&self, s: &Sealed, dst: &mut [u8], off: u64) -> Result<(), i32> {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut done = 0;
            while done < dst.len() {
                let pos = off + done as u64;
                let b = (pos / BLOCK as u64) as usize % s.blocks.len();
                let in_block = (pos % BLOCK as u64) as usize;
                let n = (BLOCK - in_block).min(dst.len() - done);
                let sealed = &s.blocks[b];
                scratch[..sealed.len()].copy_from_slice(sealed);
                let plain = s
                    .key
                    .open_in_place(nonce(b), Aad::empty(), &mut scratch[..sealed.len()])
                    .map_err(|_| libc::EIO)?;
                dst[done..done + n].copy_from_slice(&plain[in_block..in_block + n]);
                done += n;
            }
            Ok(())
        })
    }

    pub fn print_counts(&self, who: &str) {
        let names = [
            (abi::LOOKUP, "LOOKUP"),
            (abi::GETATTR, "GETATTR"),
            (abi::OPEN, "OPEN"),
            (abi::READ, "READ"),
            (abi::STATFS, "STATFS"),
            (abi::RELEASE, "RELEASE"),
            (abi::FLUSH, "FLUSH"),
            (abi::FORGET, "FORGET"),
        ];
        let s: Vec<String> = names
            .iter()
            .map(|(op, n)| format!("{n}={}", self.counts[*op as usize].load(Ordering::Relaxed)))
            .collect();
        eprintln!("{who} requests: {}", s.join(" "));
    }
}
