//! The operating-system interfaces that differ between Linux and macOS.
//!
//! kmsfs is built and tested on Linux; on macOS it builds against macFUSE
//! (packaging/macos). Each function here keeps the Linux behaviour exactly
//! (the same system call the code made before) and gives macOS its nearest
//! equivalent, or degrades in the way its documentation says. Nothing else in
//! the crate should need a `cfg(target_os)` for these calls.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// File type and permission bits as `u32`, the type of `MetadataExt::mode()`,
/// of the FUSE protocol and of the volume format on every platform. The values
/// are POSIX's, the same on Linux and macOS (libc's are `u16` on macOS).
pub const S_IFMT: u32 = 0o170_000;
/// Socket.
pub const S_IFSOCK: u32 = 0o140_000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120_000;
/// Regular file.
pub const S_IFREG: u32 = 0o100_000;
/// Block device.
pub const S_IFBLK: u32 = 0o060_000;
/// Directory.
pub const S_IFDIR: u32 = 0o040_000;
/// Character device.
pub const S_IFCHR: u32 = 0o020_000;
/// FIFO.
pub const S_IFIFO: u32 = 0o010_000;
/// Set-user-id.
pub const S_ISUID: u32 = 0o4000;
/// Set-group-id.
pub const S_ISGID: u32 = 0o2000;

/// fallocate(2) mode bits as the FUSE protocol carries them (Linux's values;
/// macFUSE sends no fallocate requests).
#[cfg(target_os = "linux")]
pub use libc::{FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE};
/// Keep the file size.
#[cfg(not(target_os = "linux"))]
pub const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
/// Deallocate the range (a hole).
#[cfg(not(target_os = "linux"))]
pub const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
/// Zero the range.
#[cfg(not(target_os = "linux"))]
pub const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// The errno that marks a KMS refusal on the control socket (Linux's
/// EKEYREJECTED, 129; macOS has no such errno, and 129 is none of its own).
#[cfg(target_os = "linux")]
pub const EKEYREJECTED: i32 = libc::EKEYREJECTED;
/// The errno that marks a KMS refusal on the control socket.
#[cfg(not(target_os = "linux"))]
pub const EKEYREJECTED: i32 = 129;

/// "No such extended attribute": ENODATA on Linux, ENOATTR on macOS.
#[cfg(target_os = "linux")]
pub const ENOATTR: i32 = libc::ENODATA;
/// "No such extended attribute": ENODATA on Linux, ENOATTR on macOS.
#[cfg(not(target_os = "linux"))]
pub const ENOATTR: i32 = libc::ENOATTR;

/// mlockall's "lock pages only once they are touched" (Linux 4.4); 0 elsewhere.
#[cfg(target_os = "linux")]
pub const MCL_ONFAULT: i32 = libc::MCL_ONFAULT;
/// mlockall's "lock pages only once they are touched" (Linux 4.4); 0 elsewhere.
#[cfg(not(target_os = "linux"))]
pub const MCL_ONFAULT: i32 = 0;

/// The kernel's coarse wall clock (CLOCK_REALTIME_COARSE: the time of the
/// last tick, what the kernel stamps on inodes) as seconds and nanoseconds;
/// None where there is none.
pub fn coarse_realtime() -> Option<(i64, u32)> {
    #[cfg(target_os = "linux")]
    {
        use nix::time::{ClockId, clock_gettime};
        let ts = clock_gettime(ClockId::CLOCK_REALTIME_COARSE).ok()?;
        let nanos = u32::try_from(ts.tv_nsec())
            .ok()
            .filter(|n| *n < 1_000_000_000)?;
        Some((ts.tv_sec(), nanos))
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// A pipe whose two ends are close-on-exec: (read end, write end).
pub fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
    #[cfg(target_os = "linux")]
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    // SAFETY: `fds` is a valid two-element array for pipe to fill.
    #[cfg(not(target_os = "linux"))]
    let r = unsafe { libc::pipe(fds.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the call just returned these two descriptors; each is owned once.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    #[cfg(not(target_os = "linux"))]
    for fd in [&rd, &wr] {
        // No pipe2 on macOS: set FD_CLOEXEC at once (the callers are single-threaded).
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
    }
    Ok((rd, wr))
}

/// Keeps this process's memory out of core dumps and away from other users'
/// debuggers. Linux: `PR_SET_DUMPABLE` 0 (no core dump, no ptrace by peers).
/// macOS: the core size limit set to 0 (ptrace of another user's process
/// needs root there anyway).
pub fn set_not_dumpable() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    #[cfg(target_os = "linux")]
    let r = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    #[cfg(not(target_os = "linux"))]
    let r = {
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setrlimit reads a valid struct.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &raw const none) }
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Heap arenas the mount daemon's allocator may use ([`tune_malloc`]); each may
/// keep up to the trim threshold of freed memory.
pub const MALLOC_ARENAS: usize = 2;

/// Tunes glibc's allocator for the mount daemon (see `cli::mount`): blocks
/// stay in the heap below 8 MiB, freed memory above `trim_threshold` goes back
/// to the system (per arena), at most [`MALLOC_ARENAS`] arenas. macOS's
/// allocator has no such knobs: a no-op.
pub fn tune_malloc(trim_threshold: i32) {
    // SAFETY: mallopt takes integer arguments and only tunes the allocator.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim_threshold);
        // One heap arena per request thread would each keep its own freed
        // memory: a few shared arenas bound what the daemon holds.
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS as i32);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = trim_threshold;
}

/// Asks the kernel to start writing back a range of a file (Linux's
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`, a hint); a no-op on macOS, where
/// the commit's fsync does all of it.
pub fn start_writeback(fd: &impl AsRawFd, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    // SAFETY: sync_file_range on a descriptor the caller owns; integer arguments only.
    unsafe {
        libc::sync_file_range(
            fd.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    #[cfg(not(target_os = "linux"))]
    let _ = (fd.as_raw_fd(), offset, len);
}

/// Tells the kernel the file's cached pages will not be needed again
/// (`posix_fadvise(DONTNEED)`); a no-op on macOS.
pub fn drop_cache(fd: &impl AsRawFd) {
    // SAFETY: posix_fadvise on a descriptor the caller owns; integer arguments only.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::posix_fadvise(fd.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
    };
    #[cfg(not(target_os = "linux"))]
    let _ = fd.as_raw_fd();
}

/// The kernel's credentials of the peer of a Unix socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    /// 0 when the system cannot tell.
    pub pid: i32,
}

/// The peer's uid, gid and pid: SO_PEERCRED on Linux; getpeereid and
/// LOCAL_PEERPID on macOS.
pub fn peer_cred(s: &impl AsFd) -> io::Result<PeerCred> {
    #[cfg(target_os = "linux")]
    {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        let c = getsockopt(s, PeerCredentials)?;
        Ok(PeerCred {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        })
    }
    #[cfg(target_os = "macos")]
    {
        use nix::sys::socket::{getsockopt, sockopt::LocalPeerPid};
        let (uid, gid) = nix::unistd::getpeereid(s)?;
        let pid = getsockopt(s, LocalPeerPid).unwrap_or(0);
        Ok(PeerCred {
            uid: uid.as_raw(),
            gid: gid.as_raw(),
            pid,
        })
    }
}

/// The peer's supplementary groups; empty if unknown. Linux: SO_PEERGROUPS
/// (4.13). macOS: LOCAL_PEERCRED (at most 16 groups, the first being the
/// effective gid).
pub fn peer_groups(s: &impl AsFd) -> Vec<u32> {
    #[cfg(target_os = "linux")]
    {
        let mut buf: Vec<libc::gid_t> = vec![0; 64];
        for _ in 0..3 {
            let mut len = libc::socklen_t::try_from(buf.len() * size_of::<libc::gid_t>())
                .unwrap_or(libc::socklen_t::MAX);
            // SAFETY: `buf` has `len` writable bytes; the kernel writes at most that.
            let r = unsafe {
                libc::getsockopt(
                    s.as_fd().as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_PEERGROUPS,
                    buf.as_mut_ptr().cast(),
                    &raw mut len,
                )
            };
            let n = len as usize / size_of::<libc::gid_t>();
            if r == 0 {
                buf.truncate(n);
                return buf;
            }
            if io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) || n > 1 << 16 {
                return Vec::new();
            }
            buf = vec![0; n.max(buf.len() * 2)];
        }
        Vec::new()
    }
    #[cfg(target_os = "macos")]
    {
        use nix::sys::socket::{getsockopt, sockopt::LocalPeerCred};
        match getsockopt(s, LocalPeerCred) {
            Ok(x) => x.groups().to_vec(),
            Err(_) => Vec::new(),
        }
    }
}

/// The command name of process `pid`: `/proc/PID/comm` on Linux, proc_name
/// on macOS; None when it cannot be read.
pub fn process_name(pid: u32) -> Option<String> {
    #[cfg(target_os = "linux")]
    let name = std::fs::read(format!("/proc/{pid}/comm"))
        .ok()
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned());
    #[cfg(target_os = "macos")]
    let name = {
        let mut buf = [0u8; 256];
        let pid = i32::try_from(pid).ok()?;
        // SAFETY: proc_name writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::proc_name(pid, buf.as_mut_ptr().cast(), buf.len() as u32) };
        let n = usize::try_from(n).ok().filter(|n| *n > 0)?;
        Some(String::from_utf8_lossy(&buf[..n.min(buf.len())]).into_owned())
    };
    name.filter(|s| !s.is_empty())
}

/// Unmounts `path` (a NUL-terminated path). `detach`: lazily on Linux
/// (MNT_DETACH: open files keep the mount alive); forcibly on macOS
/// (MNT_FORCE: macOS has no lazy unmount).
pub fn unmount(path: &CStr, detach: bool) -> io::Result<()> {
    // SAFETY: umount2 with a valid C string and integer flags.
    #[cfg(target_os = "linux")]
    let r = unsafe { libc::umount2(path.as_ptr(), if detach { libc::MNT_DETACH } else { 0 }) };
    // SAFETY: unmount with a valid C string and integer flags.
    #[cfg(not(target_os = "linux"))]
    let r = unsafe { libc::unmount(path.as_ptr(), if detach { libc::MNT_FORCE } else { 0 }) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// renameat without replacing an existing `new` (EEXIST instead):
/// renameat2(RENAME_NOREPLACE) on Linux, renameatx_np(RENAME_EXCL) on macOS.
pub fn renameat_noreplace(
    olddir: &impl AsFd,
    old: &CStr,
    newdir: &impl AsFd,
    new: &CStr,
) -> io::Result<()> {
    // SAFETY: both names are valid C strings; the descriptors are open directories
    // the caller owns.
    #[cfg(target_os = "linux")]
    let r = unsafe {
        libc::renameat2(
            olddir.as_fd().as_raw_fd(),
            old.as_ptr(),
            newdir.as_fd().as_raw_fd(),
            new.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    // SAFETY: as above.
    #[cfg(target_os = "macos")]
    let r = unsafe {
        libc::renameatx_np(
            olddir.as_fd().as_raw_fd(),
            old.as_ptr(),
            newdir.as_fd().as_raw_fd(),
            new.as_ptr(),
            libc::RENAME_EXCL,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// fsetxattr(2): sets `name` on the open file `fd`.
///
/// # Safety
/// `value` must have `size` readable bytes.
pub unsafe fn fsetxattr(
    fd: &impl AsRawFd,
    name: &CStr,
    value: *const libc::c_void,
    size: usize,
    flags: i32,
) -> i32 {
    // SAFETY: the caller's contract; the string is valid.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), value, size, flags)
    }
    // SAFETY: as above.
    #[cfg(target_os = "macos")]
    unsafe {
        libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), value, size, 0, flags)
    }
}

/// A device number from its major and minor numbers.
#[must_use]
pub fn makedev(major: u32, minor: u32) -> libc::dev_t {
    #[cfg(target_os = "linux")]
    let dev = libc::makedev(major, minor);
    // macOS: 8 bits of major, 24 of minor, as i32.
    #[cfg(target_os = "macos")]
    let dev = libc::makedev((major & 0xff) as i32, (minor & 0xff_ffff) as i32);
    dev
}

/// A device number as the `u64` Linux gives it (macOS's `dev_t` is `i32`).
#[must_use]
#[allow(clippy::unnecessary_cast, clippy::cast_sign_loss)]
pub fn dev_u64(dev: libc::dev_t) -> u64 {
    dev as u64
}

/// lgetxattr(2): the value of `name` on `path` itself (a symlink is not followed).
///
/// # Safety
/// `buf` must have `size` writable bytes (or be null with `size` 0).
pub unsafe fn lgetxattr(path: &CStr, name: &CStr, buf: *mut libc::c_void, size: usize) -> isize {
    // SAFETY: the caller's contract; the strings are valid.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf, size)
    }
    // SAFETY: as above.
    #[cfg(target_os = "macos")]
    unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf,
            size,
            0,
            libc::XATTR_NOFOLLOW,
        )
    }
}

/// llistxattr(2): the NUL-separated names of `path`'s xattrs (no symlink followed).
///
/// # Safety
/// `buf` must have `size` writable bytes (or be null with `size` 0).
pub unsafe fn llistxattr(path: &CStr, buf: *mut libc::c_char, size: usize) -> isize {
    // SAFETY: the caller's contract; the string is valid.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::llistxattr(path.as_ptr(), buf, size)
    }
    // SAFETY: as above.
    #[cfg(target_os = "macos")]
    unsafe {
        libc::listxattr(path.as_ptr(), buf, size, libc::XATTR_NOFOLLOW)
    }
}

/// lsetxattr(2): sets `name` on `path` itself (no symlink followed).
///
/// # Safety
/// `value` must have `size` readable bytes.
pub unsafe fn lsetxattr(
    path: &CStr,
    name: &CStr,
    value: *const libc::c_void,
    size: usize,
    flags: i32,
) -> i32 {
    // SAFETY: the caller's contract; the strings are valid.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::lsetxattr(path.as_ptr(), name.as_ptr(), value, size, flags)
    }
    // SAFETY: as above.
    #[cfg(target_os = "macos")]
    unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value,
            size,
            0,
            flags | libc::XATTR_NOFOLLOW,
        )
    }
}

/// A mounted filesystem, from the system's mount table.
#[cfg(target_os = "macos")]
#[derive(Clone, Debug)]
pub struct MountEntry {
    /// The mount source (for kmsfs, the volume directory: macFUSE's `fsname`).
    pub source: Vec<u8>,
    /// The mount point.
    pub target: Vec<u8>,
    /// The filesystem type; macFUSE's (`macfuse`, `osxfuse`) are reported as
    /// `fuse`, as Linux's mount table names FUSE mounts.
    pub fstype: String,
}

/// Every mounted filesystem (getfsstat), in mount order. macOS has no
/// /proc/self/mountinfo; this is what the Linux code reads from it.
#[cfg(target_os = "macos")]
pub fn mounts() -> io::Result<Vec<MountEntry>> {
    for _ in 0..4 {
        // SAFETY: a null buffer asks for the count only.
        let n = unsafe { libc::getfsstat(std::ptr::null_mut(), 0, libc::MNT_NOWAIT) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        let mut v: Vec<libc::statfs> = Vec::with_capacity(n + 4);
        let bytes = libc::c_int::try_from(v.capacity() * size_of::<libc::statfs>())
            .map_err(|_| io::Error::other("too many mounts"))?;
        // SAFETY: the buffer has room for `capacity` entries, `bytes` bytes.
        let got = unsafe { libc::getfsstat(v.as_mut_ptr(), bytes, libc::MNT_NOWAIT) };
        let got = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
        if got == v.capacity() {
            continue; // the table grew meanwhile: ask again
        }
        // SAFETY: getfsstat initialised `got` entries.
        unsafe { v.set_len(got) };
        return Ok(v.iter().map(entry).collect());
    }
    Err(io::Error::other("the mount table keeps changing"))
}

/// The mount holding `path` (statfs), as [`mounts`] describes it.
#[cfg(target_os = "macos")]
pub fn mount_of(path: &std::path::Path) -> Option<MountEntry> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs fills a zeroed struct of the right type.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a valid struct to fill.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return None;
    }
    Some(entry(&st))
}

#[cfg(target_os = "macos")]
fn entry(s: &libc::statfs) -> MountEntry {
    let cstr = |b: &[libc::c_char]| -> Vec<u8> {
        b.iter().map(|c| *c as u8).take_while(|c| *c != 0).collect()
    };
    let t = String::from_utf8_lossy(&cstr(&s.f_fstypename)).into_owned();
    MountEntry {
        source: cstr(&s.f_mntfromname),
        target: cstr(&s.f_mntonname),
        fstype: if t == "macfuse" || t == "osxfuse" {
            "fuse".to_owned()
        } else {
            t
        },
    }
}

/// Raises the kernel's readahead window of the FUSE mount at `mountpoint` to
/// `kb` KiB (the bdi's `read_ahead_kb`; needs root), and returns the window it
/// had. FUSE caps the window at the kernel's default (128 KiB) when it applies
/// INIT's reply, whatever the daemon asks for, so cold sequential reads would
/// reach the daemon as 128 KiB requests. Call it after INIT (the daemon's first
/// request). It asks nothing of the mount itself: the device number comes from
/// `/proc/self/mountinfo`.
#[cfg(target_os = "linux")]
pub fn raise_readahead(mountpoint: &std::path::Path, kb: u32) -> io::Result<u32> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let (major, minor) = fuse_mount_dev(&info, mountpoint).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no FUSE mount on {} in /proc/self/mountinfo",
                mountpoint.display()
            ),
        )
    })?;
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    let old: u32 = std::fs::read_to_string(&path)?
        .trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: not a number")))?;
    if old != kb {
        std::fs::write(&path, kb.to_string())?;
    }
    Ok(old)
}

/// The device number (major, minor) of the newest FUSE mount on `mountpoint`
/// in a `/proc/PID/mountinfo` text (mount points there escape space, tab,
/// newline and backslash as `\ooo`).
pub fn fuse_mount_dev(mountinfo: &str, mountpoint: &std::path::Path) -> Option<(u32, u32)> {
    use std::os::unix::ffi::OsStrExt;
    let want = mountpoint.as_os_str().as_bytes();
    let mut found = None;
    for line in mountinfo.lines() {
        let Some((fields, rest)) = line.split_once(" - ") else {
            continue;
        };
        let f: Vec<&str> = fields.split(' ').collect();
        let (Some(dev), Some(mp)) = (f.get(2), f.get(4)) else {
            continue;
        };
        let fstype = rest.split(' ').next().unwrap_or("");
        if !(fstype == "fuse" || fstype.starts_with("fuse.")) {
            continue;
        }
        if unescape_mountinfo(mp) != want {
            continue;
        }
        if let Some((Ok(ma), Ok(mi))) = dev.split_once(':').map(|(a, b)| (a.parse(), b.parse())) {
            found = Some((ma, mi));
        }
    }
    found
}

/// Undoes mountinfo's `\ooo` octal escapes.
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(oct) = b.get(i + 1..i + 4)
            && (b'0'..=b'3').contains(&oct[0])
            && oct[1..].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push(((oct[0] - b'0') << 6) | ((oct[1] - b'0') << 3) | (oct[2] - b'0'));
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    /// The coarse clock is the time of the last tick: never ahead of the
    /// precise clock read after it, with valid nanoseconds.
    #[cfg(target_os = "linux")]
    #[test]
    fn coarse_realtime_is_a_valid_time_not_ahead_of_the_clock() {
        let (secs, nanos) = super::coarse_realtime().expect("Linux has a coarse clock");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        assert!(nanos < 1_000_000_000);
        assert!(
            (secs as u64, nanos) <= (now.as_secs(), now.subsec_nanos()),
            "coarse {secs}.{nanos:09} ahead of {now:?}"
        );
        assert!(secs > 1_600_000_000, "a wall clock, not a monotonic one");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn mode_bits_are_the_system_ones() {
        use super::*;
        assert_eq!(S_IFMT, libc::S_IFMT);
        assert_eq!(S_IFSOCK, libc::S_IFSOCK);
        assert_eq!(S_IFLNK, libc::S_IFLNK);
        assert_eq!(S_IFREG, libc::S_IFREG);
        assert_eq!(S_IFBLK, libc::S_IFBLK);
        assert_eq!(S_IFDIR, libc::S_IFDIR);
        assert_eq!(S_IFCHR, libc::S_IFCHR);
        assert_eq!(S_IFIFO, libc::S_IFIFO);
        assert_eq!(S_ISUID, libc::S_ISUID);
        assert_eq!(S_ISGID, libc::S_ISGID);
    }

    #[test]
    fn the_fuse_mount_is_found_in_mountinfo() {
        use std::path::Path;
        let info = "22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    40 22 0:41 / /mnt/a\\040b rw,nosuid shared:20 - fuse.kmsfs /srv/v rw,user_id=0\n\
                    41 22 0:42 / /mnt/plain rw shared:21 - ext4 /dev/vdb rw\n\
                    42 40 0:43 / /mnt/a\\040b rw shared:22 - fuse.kmsfs /srv/w rw\n\
                    43 22 0:44 / /mnt/x rw - fuse /srv/x rw\n";
        // The newest of two mounts on the same point, with an escaped space.
        assert_eq!(
            super::fuse_mount_dev(info, Path::new("/mnt/a b")),
            Some((0, 43))
        );
        assert_eq!(
            super::fuse_mount_dev(info, Path::new("/mnt/x")),
            Some((0, 44))
        );
        // Not FUSE, or not mounted.
        assert_eq!(super::fuse_mount_dev(info, Path::new("/mnt/plain")), None);
        assert_eq!(super::fuse_mount_dev(info, Path::new("/mnt/none")), None);
        // Malformed lines never panic.
        assert_eq!(super::unescape_mountinfo("a\\777b\\04"), b"a\\777b\\04");
        for bad in [
            "",
            "x",
            "1 2 3 - ",
            "1 2 0:x / /mnt/x - fuse a b",
            "1 2 0:1 / /mnt/x\\ - fuse",
        ] {
            let _ = super::fuse_mount_dev(bad, Path::new("/mnt/x"));
        }
    }

    #[test]
    fn pipe_is_cloexec() {
        let (r, w) = super::pipe_cloexec().unwrap();
        for fd in [&r, &w] {
            let fl = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(fl & libc::FD_CLOEXEC, 0);
        }
    }

    #[test]
    fn own_process_name() {
        let n = super::process_name(std::process::id()).unwrap();
        assert!(!n.is_empty());
    }
}
