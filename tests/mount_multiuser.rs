//! `allow_other` + `default_permissions`: another user gets exactly what the
//! modes and POSIX ACLs allow. Needs root (creates the user `kmsfs-test`).

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Output};

use common::{Env, output_text, sh};

const USER: &str = "kmsfs-test";

/// Creates the test user if missing; returns its uid and gid.
fn ensure_user() -> (u32, u32) {
    let ids = || -> (u32, u32) {
        let id = |f: &str| sh(&format!("id {f} {USER}")).trim().parse().unwrap();
        (id("-u"), id("-g"))
    };
    if Command::new("id")
        .arg("-u")
        .arg(USER)
        .output()
        .unwrap()
        .status
        .success()
    {
        return ids();
    }
    let o = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            USER,
        ])
        .output()
        .unwrap();
    // 9: created meanwhile by a concurrent run.
    assert!(
        o.status.success() || o.status.code() == Some(9),
        "useradd: {}",
        output_text(&o)
    );
    ids()
}

/// Runs a shell command as the test user, without supplementary groups.
fn as_user(cmd: &str) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid",
            USER,
            "--regid",
            USER,
            "--clear-groups",
            "--",
            "sh",
            "-c",
            cmd,
        ])
        .output()
        .unwrap()
}

fn user_ok(cmd: &str) -> String {
    let o = as_user(cmd);
    assert!(
        o.status.success(),
        "as {USER}: `{cmd}` failed: {}",
        output_text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn user_denied(cmd: &str) {
    let o = as_user(cmd);
    assert!(
        !o.status.success(),
        "as {USER}: `{cmd}` should have been denied"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    // EACCES for access, EPERM for owner-only operations such as chmod.
    assert!(
        err.contains("Permission denied") || err.contains("Operation not permitted"),
        "as {USER}: `{cmd}`: {err}"
    );
}

#[test]
fn other_users_get_exactly_what_modes_and_acls_allow() {
    require_fuse!();
    common::require_root("the multi-user test");
    let (uid, gid) = ensure_user();
    let env = Env::new();
    let m = env.mount_with("allow_other,default_permissions", &[]);
    let q = |rel: &str| m.p(rel).display().to_string();
    fs::set_permissions(&m.path, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(m.p("pub"), b"public\n").unwrap();
    fs::set_permissions(m.p("pub"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(m.p("priv"), b"private\n").unwrap();
    fs::set_permissions(m.p("priv"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(m.p("userdir")).unwrap();
    std::os::unix::fs::chown(m.p("userdir"), Some(uid), Some(gid)).unwrap();
    fs::create_dir(m.p("rootdir")).unwrap();

    assert_eq!(user_ok(&format!("cat {}", q("pub"))), "public\n");
    user_denied(&format!("cat {}", q("priv")));
    user_denied(&format!("echo x >> {}", q("pub")));
    user_denied(&format!("touch {}", q("rootdir/x")));
    user_denied(&format!("chmod 666 {}", q("pub")));
    user_ok(&format!("echo hi > {0} && cat {0}", q("userdir/new")));
    let md = fs::metadata(m.p("userdir/new")).unwrap();
    assert_eq!(
        (md.uid(), md.gid()),
        (uid, gid),
        "new files belong to the caller"
    );
    user_ok(&format!(
        "mkdir {0}/sub && chmod 700 {0}/sub && ls {0}",
        q("userdir")
    ));

    // An access ACL grants the user what the mode alone does not.
    sh(&format!("setfacl -m u:{USER}:r {}", q("priv")));
    assert_eq!(user_ok(&format!("cat {}", q("priv"))), "private\n");
    assert_eq!(
        fs::metadata(m.p("priv")).unwrap().mode() & 0o777,
        0o640,
        "the mask shows as group bits"
    );
    user_denied(&format!("echo x >> {}", q("priv")));
    // chmod narrows the mask, and with it the user's access.
    fs::set_permissions(m.p("priv"), fs::Permissions::from_mode(0o600)).unwrap();
    user_denied(&format!("cat {}", q("priv")));

    // Default ACLs are inherited by new files and directories.
    fs::create_dir(m.p("acld")).unwrap();
    sh(&format!("setfacl -d -m u:{USER}:rwx {}", q("acld")));
    sh(&format!(
        "umask 077; echo data > {}; mkdir {}",
        q("acld/f"),
        q("acld/sub")
    ));
    user_ok(&format!("echo more >> {}", q("acld/f")));
    let acl = sh(&format!("getfacl -p {}", q("acld/sub")));
    assert!(acl.contains(&format!("default:user:{USER}:rwx")), "{acl}");
    // A write by another user drops set-user-id and set-group-id (group-executable).
    fs::write(m.p("suid"), b"a\n").unwrap();
    fs::set_permissions(m.p("suid"), fs::Permissions::from_mode(0o6777)).unwrap();
    user_ok(&format!("echo b >> {}", q("suid")));
    assert_eq!(fs::metadata(m.p("suid")).unwrap().mode() & 0o7777, 0o777);
    // Without a default ACL the umask applies.
    sh(&format!("umask 027; echo x > {}", q("masked")));
    assert_eq!(fs::metadata(m.p("masked")).unwrap().mode() & 0o777, 0o640);
    m.unmount();
    env.assert_fsck_clean();
}

/// Set-user-ID and set-group-ID bits and file capabilities are cleared as the
/// kernel clears them on a local file system: by a write or a truncate of
/// another user, by any chown; a directory's set-group-ID survives chown.
/// (The mount asks the kernel to leave this to kmsfs: FUSE_HANDLE_KILLPRIV_V2.)
#[test]
fn set_id_bits_and_capabilities_are_cleared_like_a_local_file_system() {
    require_fuse!();
    common::require_root("the multi-user test");
    let (uid, gid) = ensure_user();
    let env = Env::new();
    let m = env.mount_with("allow_other,default_permissions", &[]);
    let q = |rel: &str| m.p(rel).display().to_string();
    fs::set_permissions(&m.path, fs::Permissions::from_mode(0o755)).unwrap();
    let mode_of = |rel: &str| fs::metadata(m.p(rel)).unwrap().mode() & 0o7777;
    let setid = |rel: &str, mode: u32| {
        fs::write(m.p(rel), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(m.p(rel), fs::Permissions::from_mode(mode)).unwrap();
        assert_eq!(mode_of(rel), mode, "{rel} set up");
    };

    // Written by another user: both bits go (set-group-ID with group execute).
    setid("w", 0o6777);
    user_ok(&format!("echo more >> {}", q("w")));
    assert_eq!(mode_of("w"), 0o777, "after another user's write");
    // Written by root (CAP_FSETID): they stay.
    setid("wr", 0o6777);
    fs::OpenOptions::new()
        .append(true)
        .open(m.p("wr"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"x"))
        .unwrap();
    assert_eq!(mode_of("wr"), 0o6777, "after root's write");
    // Truncated by another user.
    setid("t", 0o6777);
    user_ok(&format!("truncate -s 1 {}", q("t")));
    assert_eq!(mode_of("t"), 0o777, "after another user's truncate");
    // Opened with O_TRUNC by another user.
    setid("o", 0o4777);
    user_ok(&format!(": > {}", q("o")));
    assert_eq!(mode_of("o"), 0o777, "after another user's O_TRUNC");
    // Any chown of a file clears them; set-group-ID without group execute stays.
    setid("c", 0o6755);
    std::os::unix::fs::chown(m.p("c"), Some(uid), Some(gid)).unwrap();
    assert_eq!(mode_of("c"), 0o755, "after chown");
    setid("c2", 0o2745);
    std::os::unix::fs::chown(m.p("c2"), Some(uid), None).unwrap();
    assert_eq!(
        mode_of("c2"),
        0o2745,
        "sgid without group execute after chown"
    );
    // A directory's set-group-ID survives chown.
    fs::create_dir(m.p("d")).unwrap();
    fs::set_permissions(m.p("d"), fs::Permissions::from_mode(0o2775)).unwrap();
    std::os::unix::fs::chown(m.p("d"), Some(uid), Some(gid)).unwrap();
    assert_eq!(mode_of("d"), 0o2775, "directory after chown");
    // File capabilities go on another user's write.
    setid("cap", 0o777);
    sh(&format!("setcap cap_net_raw+ep {}", q("cap")));
    assert!(sh(&format!("getcap {}", q("cap"))).contains("cap_net_raw"));
    user_ok(&format!("echo more >> {}", q("cap")));
    assert!(
        !sh(&format!("getcap {}", q("cap"))).contains("cap_net_raw"),
        "capability kept after a write"
    );
    m.kmsfs_umount(&env);
    env.assert_fsck_clean();
}
