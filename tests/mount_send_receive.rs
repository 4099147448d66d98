//! `kmsfs send` and `kmsfs receive` end to end, on real mounts: snapshots of
//! a mounted volume sent (full, then two incrementals through a pipe),
//! received where no key is, mounted read-only and compared file by file with
//! the snapshot mounts of the source, fsck, a writable clone; a mount without
//! the CMK fails clearly; a receive killed midway resumes with a token.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{BIN, Env, TIMEOUT, output_text, pattern, wait_until};

/// Compares two trees file by file: kinds, modes, sizes, contents, links.
fn compare(a: &Path, b: &Path) -> usize {
    let mut n = 0;
    let names = |p: &Path| {
        let mut v: Vec<_> = fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let (na, nb) = (names(a), names(b));
    assert_eq!(na, nb, "entries of {} and {}", a.display(), b.display());
    for name in na {
        let (pa, pb) = (a.join(&name), b.join(&name));
        let (ma, mb) = (
            fs::symlink_metadata(&pa).unwrap(),
            fs::symlink_metadata(&pb).unwrap(),
        );
        assert_eq!(ma.file_type(), mb.file_type(), "{}", pa.display());
        assert_eq!(ma.mode(), mb.mode(), "{}", pa.display());
        assert_eq!(ma.len(), mb.len(), "{}", pa.display());
        n += 1;
        if ma.is_dir() {
            n += compare(&pa, &pb);
        } else if ma.file_type().is_symlink() {
            assert_eq!(fs::read_link(&pa).unwrap(), fs::read_link(&pb).unwrap());
        } else {
            assert!(
                fs::read(&pa).unwrap() == fs::read(&pb).unwrap(),
                "contents of {} differ",
                pa.display()
            );
        }
    }
    n
}

/// kmsfs with no key material at all: a keystore path that does not exist.
fn keyless(env: &Env) -> Command {
    let mut c = Command::new(BIN);
    c.env("KMSFS_KEYSTORE", env.root().join("no-keystore-here"))
        .env_remove("KMSFS_PASSPHRASE_FILE")
        .env_remove("KMSFS_KEYFILE")
        .env_remove("KMSFS_KMS")
        .env_remove("RUST_LOG");
    c
}

fn keyless_ok(env: &Env, args: &[&str]) -> String {
    let o = keyless(env)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "kmsfs {args:?}: {}", output_text(&o));
    String::from_utf8(o.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn full_and_incrementals_received_without_a_key_mount_equal_to_their_snapshots() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    fs::create_dir(m.p("docs")).unwrap();
    fs::write(m.p("docs/big.bin"), pattern(3 << 20, 1)).unwrap();
    fs::write(m.p("small.txt"), b"hello").unwrap();
    fs::write(m.p("private"), b"mode 600").unwrap();
    fs::set_permissions(m.p("private"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("docs/big.bin", m.p("link")).unwrap();
    env.ok(&["snapshot", "create", env.vol_str(), "s1"]);

    // Sent while mounted; received with no keystore anywhere.
    let full = env.root().join("full.stream");
    let o = env.run(&["send", env.vol_str(), "s1", "-o", s(&full), "--json"]);
    assert!(o.status.success(), "{}", output_text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stderr).unwrap();
    assert!(j["blocks"].as_u64().unwrap() > 40, "{j}");
    let target = env.root().join("backup");
    let out = keyless_ok(&env, &["receive", s(&target), "-i", s(&full), "--json"]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["incremental"], false);
    assert_eq!(j["snapshots"], 1);
    assert!(j["stream_bytes"].as_u64().unwrap() > 3 << 20, "{j}");

    // Another keystore (without the source's CMK) cannot mount it.
    let other = Env::new();
    let tmnt = env.root().join("tmnt");
    fs::create_dir(&tmnt).unwrap();
    let msg = other.fails(4, &["mount", s(&target), s(&tmnt), "--read-only"]);
    assert!(msg.to_lowercase().contains("key"), "{msg}");
    // Read-write is refused; read-only with the key works.
    let msg = env.fails(1, &["mount", s(&target), s(&tmnt)]);
    assert!(msg.contains("read-only"), "{msg}");

    let check = |snap: &str| {
        let t = env.mount_other(&target, &tmnt, &["--read-only"]);
        let smnt = env.root().join(format!("snap-{snap}"));
        let sm = env.mount_other(&env.vol, &smnt, &["--snapshot", snap]);
        let n = compare(&sm.path, &t.path);
        assert!(n >= 5, "{n} entries compared");
        // The same snapshot by name in the target.
        let tsnap = env.root().join(format!("tsnap-{snap}"));
        let ts = env.mount_other(&target, &tsnap, &["--snapshot", snap]);
        compare(&sm.path, &ts.path);
        assert_eq!(ts.unmount(), Some(0));
        assert_eq!(sm.unmount(), Some(0));
        assert_eq!(t.unmount(), Some(0));
        let o = env.run(&["fsck", s(&target)]);
        assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    };
    check("s1");

    // Two incrementals through a pipe, as `send | ssh host kmsfs receive`.
    for (snap, base, seed) in [("s2", "s1", 2u64), ("s3", "s2", 3)] {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(m.p("docs/big.bin"))
            .unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&pattern(70_000, seed), 1 << 20).unwrap();
        drop(f);
        fs::write(m.p(&format!("new-{snap}")), pattern(10_000, seed)).unwrap();
        let _ = fs::remove_file(m.p("small.txt"));
        env.ok(&["snapshot", "create", env.vol_str(), snap]);
        let mut send = env
            .cmd()
            .args(["send", env.vol_str(), snap, "--from", base])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let recv = keyless(&env)
            .args(["receive", s(&target), "--json"])
            .stdin(send.stdout.take().unwrap())
            .output()
            .unwrap();
        assert!(send.wait().unwrap().success());
        assert!(recv.status.success(), "{}", output_text(&recv));
        let j: serde_json::Value = serde_json::from_slice(&recv.stdout).unwrap();
        assert_eq!(j["incremental"], true);
        assert!(
            j["stream_bytes"].as_u64().unwrap() < 1 << 20,
            "an incremental carries the change only: {j}"
        );
        check(snap);
    }
    assert_eq!(m.unmount(), Some(0));

    // A writable clone of the received volume.
    let clone = env.root().join("clone");
    env.ok(&["clone", s(&target), "s3", s(&clone)]);
    let cm = env.root().join("cmnt");
    let c = env.mount_other(&clone, &cm, &[]);
    fs::write(c.p("written-in-clone"), b"yes").unwrap();
    assert_eq!(fs::read(c.p("new-s3")).unwrap(), pattern(10_000, 3));
    assert_eq!(c.unmount(), Some(0));
}

#[test]
fn a_receive_killed_midway_resumes_with_its_token() {
    require_fuse!();
    let env = Env::with_init(&["--block-size", "4K", "--segment-size", "1M"]);
    let m = env.mount();
    fs::write(m.p("data"), pattern(16 << 20, 9)).unwrap();
    assert_eq!(m.unmount(), Some(0));
    env.ok(&["snapshot", "create", env.vol_str(), "s1"]);
    let full = env.root().join("full.stream");
    env.ok(&["send", env.vol_str(), "s1", "-o", s(&full)]);
    let stream = fs::read(&full).unwrap();

    let target = env.root().join("backup");
    let mut child = keyless(&env)
        .args(["receive", s(&target)])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&stream[..stream.len() * 2 / 3]).unwrap();
    stdin.flush().unwrap();
    // Killed once it has checkpointed (the pipe stays open: it is mid-read).
    wait_until("a receive checkpoint", TIMEOUT, || {
        target.join("kmsfs.recv/progress").exists()
    });
    // SAFETY: kill of our own child by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    drop(stdin);
    assert!(!target.join("kmsfs.root").exists(), "nothing is visible");

    // Without --resume the receive is refused (it would lose the work).
    let o = keyless(&env)
        .args(["receive", s(&target), "-i", s(&full)])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", output_text(&o));
    assert!(output_text(&o).contains("--resume"), "{}", output_text(&o));

    let token = keyless_ok(&env, &["receive", "--token", s(&target)]);
    let rest = env.root().join("rest.stream");
    env.ok(&[
        "send",
        env.vol_str(),
        "s1",
        "--resume",
        token.trim(),
        "-o",
        s(&rest),
    ]);
    assert!(fs::metadata(&rest).unwrap().len() < stream.len() as u64);
    let out = keyless_ok(
        &env,
        &["receive", "--resume", s(&target), "-i", s(&rest), "--json"],
    );
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(j["resumed_from"].as_u64().unwrap() > 1000, "{j}");

    let tmnt = env.root().join("tmnt");
    let t = env.mount_other(&target, &tmnt, &["--read-only"]);
    assert!(fs::read(t.p("data")).unwrap() == pattern(16 << 20, 9));
    assert_eq!(t.unmount(), Some(0));
    let o = env.run(&["fsck", s(&target)]);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
}

#[test]
fn damaged_streams_and_wrong_bases_are_refused_by_the_command() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    fs::write(m.p("f"), pattern(200_000, 1)).unwrap();
    assert_eq!(m.unmount(), Some(0));
    env.ok(&["snapshot", "create", env.vol_str(), "s1"]);
    env.ok(&["snapshot", "create", env.vol_str(), "s2"]);
    let full = env.root().join("full.stream");
    env.ok(&["send", env.vol_str(), "s1", "-o", s(&full)]);
    let target = env.root().join("backup");
    let mut b = fs::read(&full).unwrap();
    let n = b.len();
    b[n / 2] ^= 1;
    let bad = env.root().join("bad.stream");
    fs::write(&bad, &b).unwrap();
    let o = keyless(&env)
        .args(["receive", s(&target), "-i", s(&bad)])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", output_text(&o));
    assert!(output_text(&o).contains("damaged"), "{}", output_text(&o));
    keyless_ok(&env, &["receive", "--abort", s(&target)]);
    keyless_ok(&env, &["receive", s(&target), "-i", s(&full)]);
    // s3 from s2: the target holds s1 only.
    env.ok(&["snapshot", "create", env.vol_str(), "s3"]);
    let inc = env.root().join("inc.stream");
    env.ok(&["send", env.vol_str(), "s3", "--from", "s2", "-o", s(&inc)]);
    let o = keyless(&env)
        .args(["receive", s(&target), "-i", s(&inc)])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("does not hold the stream's base"),
        "{}",
        output_text(&o)
    );
}
