//! The control socket of a mount: several clients at once (an idle one
//! blocks nobody), and only the user who mounted, or root, may use it, by the
//! peer's kernel credentials, even when the socket's mode was loosened.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Env, is_mounted, wait_exit, wait_until};

fn ctl(env: &Env) -> PathBuf {
    kmsfs::control::socket_path(&env.vol)
}

/// Sends one request line on `c` and returns the answer line as JSON.
fn ask(c: &mut UnixStream, req: &str) -> serde_json::Value {
    // A refused client is answered at once and may find the socket closed
    // by the time it writes: the answer is what counts.
    let _ = c.write_all(format!("{req}\n").as_bytes());
    let mut line = String::new();
    BufReader::new(&*c).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("answer {line:?}: {e}"))
}

#[test]
fn an_idle_client_blocks_no_other() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    // A connects and says nothing.
    let mut a = UnixStream::connect(ctl(&env)).unwrap();
    // Meanwhile B, and the CLI, are served.
    let mut b = UnixStream::connect(ctl(&env)).unwrap();
    let r = ask(&mut b, r#"{"op":"stats"}"#);
    assert_eq!(r["ok"], true, "{r}");
    env.ok(&["snapshot", "create", env.vol_str(), "while-a-waits"]);
    // A, still connected (a server serving one client at a time would have
    // timed it out before it got to B), is answered too.
    let r = ask(&mut a, r#"{"op":"snapshot-list"}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["data"][0]["name"], "while-a-waits", "{r}");
    m.unmount();
}

/// Connects to `path` from a thread running as uid/gid 65534 (nobody). Only
/// that thread changes credentials (raw setresuid affects the calling thread
/// alone), and the kernel records them at connect time for SO_PEERCRED.
fn connect_as_nobody(path: &Path) -> std::io::Result<UnixStream> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        // SAFETY: raw setresgid/setresuid on this thread only; it never
        // returns to root and ends right after connecting.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534), 0);
        }
        UnixStream::connect(path)
    })
    .join()
    .unwrap()
}

#[test]
fn only_the_mounting_user_or_root_may_control() {
    require_fuse!();
    common::require_root("the control socket test (connects as another user)");
    let env = Env::new();
    let m = env.mount();
    // Say the socket were reachable by anyone: its mode loosened, and a link
    // to it in a directory others may enter (beside the private runtime
    // directory, on the same file system). Only the peer's credentials stop
    // another user then.
    let sock = ctl(&env);
    let open = tempfile::tempdir_in(sock.parent().unwrap().parent().unwrap()).unwrap();
    fs_mode(open.path(), 0o755);
    let link = open.path().join("ctl");
    fs::hard_link(&sock, &link).unwrap();
    fs_mode(&sock, 0o666);
    let mut c = connect_as_nobody(&link).expect("the loosened socket is reachable");
    let r = ask(&mut c, r#"{"op":"snapshot-create","name":"intruder"}"#);
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["errno"], libc::EACCES, "{r}");
    assert!(r["error"].as_str().unwrap().contains("uid 65534"), "{r}");
    // Nothing happened, and root is still served.
    let mut root = UnixStream::connect(ctl(&env)).unwrap();
    let r = ask(&mut root, r#"{"op":"snapshot-list"}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["data"].as_array().map(Vec::len), Some(0), "{r}");
    m.unmount();
}

fn fs_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `kmsfs umount` of a snapshot mount beside the volume's read-write mount unmounts the
/// snapshot and returns (it used to wait for the read-write daemon, which serves the
/// volume's control socket, for ten minutes); the read-write mount keeps serving.
#[test]
fn kmsfs_umount_of_a_snapshot_mount_beside_the_read_write_mount() {
    let env = Env::new();
    let rw = env.mount();
    fs::write(rw.p("f"), b"one").unwrap();
    env.ok(&["snapshot", "create", env.vol_str(), "s1"]);
    let snap_mnt = env.root().join("snap");
    let snap = env.mount_other(&env.vol, &snap_mnt, &["-o", "snapshot=s1"]);
    assert_eq!(fs::read(snap.p("f")).unwrap(), b"one");
    let mut child = env
        .cmd()
        .args([OsStr::new("umount"), snap_mnt.as_os_str()])
        .spawn()
        .unwrap();
    let mut status = None;
    wait_until(
        "kmsfs umount of the snapshot mount to return",
        Duration::from_secs(60),
        || {
            status = child.try_wait().unwrap();
            status.is_some()
        },
    );
    assert!(status.unwrap().success());
    assert!(!is_mounted(&snap_mnt));
    wait_exit(snap.pid, Duration::from_secs(30));
    std::mem::forget(snap);
    // The read-write mount is untouched, and its own kmsfs umount still waits for it.
    fs::write(rw.p("g"), b"two").unwrap();
    rw.kmsfs_umount(&env);
    env.assert_fsck_clean();
}
