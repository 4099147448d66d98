//! Errors a person can act on: each wrong input or state gets an exit code
//! from docs/EXIT-CODES.md and a message that names the cause and a next
//! step that exists.

mod common;

use std::fs;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;

use common::{Env, output_text};

/// `kmsfs info VOL | head -1`, made deterministic: stdout is a pipe whose
/// reader is already gone, so the first write fails with EPIPE.
#[test]
fn a_closed_stdout_ends_info_quietly() {
    let env = Env::new();
    let mut fds = [0; 2];
    // SAFETY: pipe() fills two descriptors we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just created and are owned here.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    let o = env
        .cmd()
        .args(["info", env.vol_str()])
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "info panicked: {err}");
    assert!(
        o.status.signal() == Some(libc::SIGPIPE) || o.status.success(),
        "info on a closed pipe: {:?} {err}",
        o.status
    );
}

#[test]
fn bad_block_size_is_a_usage_error() {
    let env = Env::bare();
    let o = env.run(&["init", env.vol_str(), "--block-size", "3K"]);
    assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
    let text = output_text(&o);
    assert!(text.contains("power of two"), "{text}");
    assert!(!env.vol.join("kmsfs.header").exists(), "nothing is created");
}

#[test]
fn duplicate_snapshot_names_the_way_out() {
    let env = Env::new();
    env.ok(&["snapshot", "create", env.vol_str(), "s1"]);
    let o = env.run(&["snapshot", "create", env.vol_str(), "s1"]);
    assert!(!o.status.success());
    let text = output_text(&o);
    assert!(
        text.contains("snapshot named s1 already exists") && text.contains("snapshot delete"),
        "{text}"
    );
    assert!(!text.contains("file exists"), "{text}");
}

#[test]
fn duplicate_snapshot_through_the_mount_names_the_way_out() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    env.ok(&["snapshot", "create", env.vol_str(), "s1"]);
    let o = env.run(&["snapshot", "create", env.vol_str(), "s1"]);
    assert!(!o.status.success());
    let text = output_text(&o);
    assert!(
        text.contains("already exists") && text.contains("snapshot delete"),
        "{text}"
    );
    m.unmount();
}

#[test]
fn a_volume_from_another_keystore_says_so() {
    let env = Env::new();
    // Another machine's keystore: it exists and unlocks, but never saw this volume.
    let other = Env::new();
    let o = other.run(&["info", env.vol_str()]);
    assert!(!o.status.success());
    let text = output_text(&o);
    assert!(text.contains("another keystore"), "{text}");
    assert!(
        !text.contains("key list"),
        "suggests a command that does not exist: {text}"
    );
}

#[test]
fn a_dead_mount_is_named_with_the_way_to_clear_it() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    // SAFETY: kill on the daemon this test started.
    unsafe { libc::kill(m.pid, libc::SIGKILL) };
    common::wait_exit(m.pid, common::TIMEOUT);
    let o = env.try_mount("", &[]);
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(5), "{text}");
    assert!(
        text.contains("dead FUSE mount") && text.contains("fusermount3 -u"),
        "{text}"
    );
    // Clears the dead mount.
    m.kill9();
    // And then it mounts again.
    let m = env.mount();
    m.unmount();
}

#[test]
fn a_mount_point_in_use_is_refused() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    let second = env.root().join("vol2");
    env.ok(&["init", second.to_str().unwrap()]);
    let o = env.run(&[
        "mount",
        second.to_str().unwrap(),
        env.mnt_str(),
        "-o",
        &format!("log={}", env.root().join("second.log").display()),
    ]);
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(5), "{text}");
    assert!(text.contains("already a mount point"), "{text}");
    // The first mount is untouched and still serves.
    fs::write(m.p("still-here"), b"yes").unwrap();
    assert_eq!(fs::read(m.p("still-here")).unwrap(), b"yes");
    m.unmount();
}

/// A user who may not read the volume directory is told exactly that (not
/// "not a kmsfs volume", not "damaged, restore from backup").
#[test]
fn permission_denied_on_the_backing_store_is_said_as_such() {
    common::require_root("the permission test (runs a command as nobody)");
    let env = Env::new();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&env.vol, fs::Permissions::from_mode(0o700)).unwrap();
    let o = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .arg(common::BIN)
        .args(["info", env.vol_str()])
        .env("KMSFS_KEYSTORE", &env.keystore)
        .env("KMSFS_PASSPHRASE_FILE", &env.pass)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("permission denied"), "{text}");
    for wrong in ["not a kmsfs volume", "restore", "damaged", "kmsfs init"] {
        assert!(!text.contains(wrong), "says {wrong:?}: {text}");
    }
}
