//! The FUSE kernel ABI subset this prototype speaks (include/uapi/linux/fuse.h, 7.45).
//! Every layout is hand-encoded little-endian at fixed offsets; nothing is transmuted.

pub const FUSE_KERNEL_VERSION: u32 = 7;
pub const FUSE_KERNEL_MINOR_VERSION: u32 = 45;

// Opcodes.
pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const ACCESS: u32 = 34;
pub const INTERRUPT: u32 = 36;
pub const DESTROY: u32 = 38;
pub const BATCH_FORGET: u32 = 42;

// INIT flags (fuse_init_in/out.flags; bits 32.. live in flags2).
pub const FUSE_ASYNC_READ: u64 = 1 << 0;
pub const FUSE_PARALLEL_DIROPS: u64 = 1 << 18;
pub const FUSE_MAX_PAGES: u64 = 1 << 22;
pub const FUSE_INIT_EXT: u64 = 1 << 30;
pub const FUSE_OVER_IO_URING: u64 = 1 << 41;

/// struct fuse_in_header: 40 bytes.
pub const IN_HEADER_LEN: usize = 40;
/// struct fuse_out_header: 16 bytes.
pub const OUT_HEADER_LEN: usize = 16;

// io_uring transport (FUSE_IO_URING_*).
pub const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
pub const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;
/// struct fuse_uring_req_header: in_out[128], op_in[128], fuse_uring_ent_in_out (32 bytes).
pub const URING_IN_OUT_OFF: usize = 0;
pub const URING_OP_IN_OFF: usize = 128;
pub const URING_OP_IN_LEN: usize = 128;
pub const URING_ENT_IN_OUT_OFF: usize = 256;
pub const URING_REQ_HEADER_LEN: usize = 288;

pub fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
pub fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Writes `v` at `off`; the caller sizes `b` (replies are built into buffers it owns).
pub fn put(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

/// The fields of struct fuse_in_header this prototype uses.
#[derive(Clone, Copy, Debug)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> Option<InHeader> {
        Some(InHeader {
            len: u32_at(b, 0)?,
            opcode: u32_at(b, 4)?,
            unique: u64_at(b, 8)?,
            nodeid: u64_at(b, 16)?,
        })
    }
}

/// struct fuse_out_header into `b[..16]`.
pub fn out_header(b: &mut [u8], len: u32, error: i32, unique: u64) {
    put(b, 0, &len.to_le_bytes());
    put(b, 4, &error.to_le_bytes());
    put(b, 8, &unique.to_le_bytes());
}
