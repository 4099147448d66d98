//! `kmsfs umount DIR`: an unmount that returns only when the volume is complete.
//!
//! The kernel does not wait for a FUSE daemon when a `fuse` (not `fuseblk`)
//! filesystem is unmounted: no DESTROY is sent, and umount(2) returns while
//! the daemon may still hold changes of the last [`crate::fuse::IDLE_COMMIT`]
//! (its final commit follows within milliseconds). util-linux's umount(8)
//! finds FUSE mounts by statfs and runs no `umount.<type>` helper for them,
//! so this command is the unmount to use before copying or snapshotting the
//! backing directory: it asks the daemon to commit and for its pid, unmounts,
//! and returns once the daemon has made its final commit and exited.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{CliError, exit};
use crate::control::{self, Request};

/// How long to wait for the daemon's final commit before giving up waiting
/// (the unmount itself has happened by then).
const DAEMON_WAIT: Duration = Duration::from_secs(600);

/// Commits, unmounts `target`, and waits for the daemon's final commit.
pub fn unmount(target: &Path, lazy: bool, verbose: bool) -> Result<(), CliError> {
    // The daemon of this mount, found through the volume named as the mount
    // source. A dead daemon (no answer) leaves nothing to wait for.
    let want = std::path::absolute(target).ok();
    let pid = mount_source(target).and_then(|vol| {
        match control::request(&super::object::control_dir(&vol), &Request::Commit) {
            // The control socket belongs to the volume's read-write mount; a read-only or
            // snapshot mount of the same volume beside it has no final commit to wait for.
            Ok(v) if v["mountpoint"].as_str().map(PathBuf::from) != want => {
                if verbose {
                    eprintln!(
                        "kmsfs umount: {} is not the read-write mount of {}; nothing to wait for",
                        target.display(),
                        vol.display()
                    );
                }
                None
            }
            Ok(v) => v["pid"].as_i64().and_then(|p| i32::try_from(p).ok()),
            Err(e) => {
                if verbose {
                    eprintln!(
                        "kmsfs umount: no answer from the daemon of {}: {e}",
                        vol.display()
                    );
                }
                None
            }
        }
    });
    // Hold the daemon by a pidfd before unmounting: waiting on it cannot
    // mistake a new process that reuses the pid for ours.
    let pidfd = pid.and_then(pidfd_open);
    let c = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| CliError::new(exit::USAGE, "the mount point contains a NUL byte"))?;
    // umount2(MNT_DETACH when lazy); macOS: unmount(MNT_FORCE when lazy).
    // EBUSY right after the last file under the mount was closed is transient (the
    // kernel's final release of FUSE files is asynchronous, and an indexer or `du` may be
    // passing through): retry for a moment before reporting files that stay open.
    let mut result = crate::sys::unmount(&c, lazy);
    for _ in 0..20 {
        match &result {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(100));
                result = crate::sys::unmount(&c, lazy);
            }
            _ => break,
        }
    }
    if let Err(e) = result {
        let next = if e.raw_os_error() == Some(libc::EBUSY) {
            "; close the files open under it (`fuser -vm DIR` lists them), then retry"
        } else {
            ""
        };
        return Err(CliError::new(
            exit::ERROR,
            format!("cannot unmount {}: {e}{next}", target.display()),
        ));
    }
    if let Some(fd) = pidfd {
        if verbose {
            eprintln!("kmsfs umount: waiting for the daemon's final commit");
        }
        if !wait_readable(&fd, DAEMON_WAIT) {
            eprintln!(
                "kmsfs umount: {} is unmounted, but its daemon is still committing after {} s; \
                 its log says when it is done",
                target.display(),
                DAEMON_WAIT.as_secs()
            );
        }
    }
    Ok(())
}

/// The source (volume directory) of the FUSE mount at `target`.
fn mount_source(target: &Path) -> Option<PathBuf> {
    mounted_at(target)
        .filter(|(fstype, _)| fstype.starts_with("fuse"))
        .map(|(_, source)| PathBuf::from(source))
}

/// The filesystem type and source of the mount whose mount point is exactly
/// `target` (the top one, if several are stacked), from the mount table
/// (macOS: getfsstat; a macFUSE mount's type reads `fuse`).
#[cfg(target_os = "macos")]
pub fn mounted_at(target: &Path) -> Option<(String, String)> {
    let want = std::path::absolute(target).ok()?;
    crate::sys::mounts().ok()?.into_iter().rev().find_map(|m| {
        (Path::new(std::ffi::OsStr::from_bytes(&m.target)) == want)
            .then(|| (m.fstype, String::from_utf8_lossy(&m.source).into_owned()))
    })
}

/// The filesystem type and source of the mount whose mount point is exactly
/// `target` (the top one, if several are stacked), from /proc/self/mountinfo.
#[cfg(target_os = "linux")]
pub fn mounted_at(target: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = std::path::absolute(target).ok()?;
    // The last matching line is the top mount at that point.
    info.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mountpoint = unescape(left.split(' ').nth(4)?);
        let mut r = right.split(' ');
        let fstype = r.next()?;
        let source = unescape(r.next()?);
        (Path::new(&mountpoint) == want).then(|| (fstype.to_string(), source))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
#[cfg(target_os = "linux")]
fn unescape(s: &str) -> String {
    String::from_utf8_lossy(&super::mount::unescape_mountinfo(s)).into_owned()
}

/// macOS has no pidfd: the daemon's pid, polled with kill(pid, 0) until it is
/// gone. (The daemon is not our child; a pid reused within the wait would
/// only make the wait last longer.)
#[cfg(target_os = "macos")]
struct Pid(i32);

#[cfg(target_os = "macos")]
fn pidfd_open(pid: i32) -> Option<Pid> {
    Some(Pid(pid))
}

/// Waits until the process has exited.
#[cfg(target_os = "macos")]
fn wait_readable(p: &Pid, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // SAFETY: kill with signal 0 only checks that the process exists.
        if unsafe { libc::kill(p.0, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(target_os = "linux")]
fn pidfd_open(pid: i32) -> Option<std::os::fd::OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the kernel just returned this descriptor to us; we own it.
    Some(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Waits until the process behind a pidfd has exited (the pidfd turns readable).
#[cfg(target_os = "linux")]
fn wait_readable(fd: &std::os::fd::OwnedFd, timeout: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        // SAFETY: poll on one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if r > 0 {
            return true;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/srv/my\040vault"), "/srv/my vault");
        assert_eq!(unescape(r"a\134b"), r"a\b");
        assert_eq!(unescape(r"trailing\04"), r"trailing\04");
        assert_eq!(unescape("plain"), "plain");
    }
}
