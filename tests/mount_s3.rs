//! kmsfs on an S3-compatible object store through the command line and FUSE,
//! against a real SeaweedFS on loopback (tests/common_s3): init, mount, write,
//! read, rename, snapshot (through the mount), a read-only snapshot mount on
//! another "host" while the writer writes, info, fsck, clone, tampering; a
//! second writer refused, taken over after the first is killed, and an old
//! writer fenced by --force-takeover.

mod common;
mod common_s3;
mod common_s3_mount;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use common_s3::Weed;
use common_s3_mount::{run_any, s3_args};
use kmsfs::store::Storage;

fn run(env: &Env, args: &[&str], s3: &[String]) -> std::process::Output {
    let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    a.extend(s3.iter().cloned());
    run_any(env, &a)
}

fn ok(env: &Env, args: &[&str], s3: &[String]) -> String {
    let o = run(env, args, s3);
    assert!(o.status.success(), "kmsfs {args:?}: {}", output_text(&o));
    String::from_utf8(o.stdout).unwrap()
}

/// The `kmsfs mount` arguments of an s3:// volume (log next to the mount point).
fn mount_args(url: &str, mnt: &Path, s3: &[String], extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "mount".into(),
        url.into(),
        mnt.display().to_string(),
        "-o".into(),
        format!("log={}", mnt.with_extension("log").display()),
    ];
    a.extend(s3.iter().cloned());
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn mount(env: &Env, url: &str, mnt: &Path, s3: &[String], extra: &[&str]) -> Mount {
    fs::create_dir_all(mnt).unwrap();
    let o = run_any(env, &mount_args(url, mnt, s3, extra));
    assert!(
        o.status.success(),
        "mount of {url} failed: {}\nlog:\n{}",
        output_text(&o),
        fs::read_to_string(mnt.with_extension("log")).unwrap_or_default()
    );
    Mount::adopt(mnt, &mnt.with_extension("log"))
}

/// `kmsfs umount MNT`: returns once the daemon's final commit is done.
fn umount(env: &Env, m: Mount) {
    let o = run_any(env, &[std::ffi::OsStr::new("umount"), m.path.as_os_str()]);
    assert!(o.status.success(), "kmsfs umount: {}", output_text(&o));
    assert_eq!(wait_exit(m.pid, TIMEOUT), Some(0), "the daemon's exit");
    drop(m);
}

#[test]
fn s3_volume_through_fuse() {
    require_fuse!();
    let w = Weed::start();
    w.bucket("nas");
    let env = Env::bare();
    let unique = env
        .root()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_lowercase();
    let url = &format!("s3://nas/{unique}/vol1");
    let clone_url = format!("s3://nas/{unique}/vol1-clone");
    let host_a = env.root().join("cache-a");
    let host_b = env.root().join("cache-b");
    let a = s3_args(&w, &host_a);
    let b = s3_args(&w, &host_b);
    let out = ok(&env, &["init", url, "--segment-size", "4M"], &a);
    assert!(out.contains("created volume"), "{out}");
    // Nothing secret on the command line or in the output.
    assert!(!out.contains(common_s3::SECRET_KEY));
    let e = run(&env, &["init", url], &a);
    assert!(!e.status.success(), "init over an existing volume");
    // Wrong credentials (403) and an empty prefix (404) are said as such.
    let bad = env.root().join("bad-credentials");
    fs::write(
        &bad,
        "[default]\naws_access_key_id = kmsfsaccess\naws_secret_access_key = wrong\n",
    )
    .unwrap();
    let mut wrong = a.clone();
    let i = wrong
        .iter()
        .position(|x| x == "--credentials-file")
        .unwrap();
    wrong[i + 1] = bad.display().to_string();
    let o = run(&env, &["info", url], &wrong);
    assert!(!o.status.success());
    let text = output_text(&o);
    assert!(
        text.contains("credentials") && text.contains("403"),
        "{text}"
    );
    assert!(!text.contains("wrong"), "the secret is echoed: {text}");
    let o = run(&env, &["info", &format!("{url}-none")], &a);
    assert!(!o.status.success());
    let text = output_text(&o);
    assert!(text.contains("kmsfs init"), "{text}");

    let m = mount(&env, url, &env.mnt, &a, &[]);
    let big = pattern(5 << 20, 1);
    fs::create_dir(m.p("dir")).unwrap();
    fs::write(m.p("dir/big"), &big).unwrap();
    fs::write(m.p("small"), b"hello object store").unwrap();
    fs::rename(m.p("small"), m.p("dir/renamed")).unwrap();
    fs::File::open(m.p("dir/big")).unwrap().sync_all().unwrap();
    assert_eq!(fs::read(m.p("dir/big")).unwrap(), big);

    // A snapshot while mounted goes through the mount's control socket.
    ok(&env, &["snapshot", "create", url, "s1"], &a);
    fs::write(m.p("after-s1"), b"only live").unwrap();
    fs::File::open(m.p("after-s1")).unwrap().sync_all().unwrap();

    // Another host mounts the snapshot read-only while the writer writes.
    let rmnt = env.root().join("reader");
    let r = mount(&env, url, &rmnt, &b, &["--snapshot", "s1"]);
    for i in 0..3 {
        fs::write(m.p(&format!("w{i}")), pattern(300_000, 10 + i)).unwrap();
    }
    assert_eq!(fs::read(rmnt.join("dir/big")).unwrap(), big);
    assert_eq!(
        fs::read(rmnt.join("dir/renamed")).unwrap(),
        b"hello object store"
    );
    assert!(!rmnt.join("after-s1").exists());
    assert!(fs::write(rmnt.join("x"), b"no").is_err(), "read-only");
    r.unmount();
    umount(&env, m);

    let info = ok(&env, &["info", url, "--json"], &b);
    let j: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(j["snapshots"], 1);
    assert!(ok(&env, &["snapshot", "list", url], &b).contains("s1"));
    let f = ok(&env, &["fsck", url], &b);
    assert!(!f.is_empty());

    // Clone the snapshot into a local directory and into another prefix.
    let local = env.root().join("clone");
    ok(&env, &["clone", url, "s1", local.to_str().unwrap()], &b);
    ok(&env, &["fsck", local.to_str().unwrap()], &[]);
    ok(&env, &["clone", url, "s1", &clone_url], &b);
    ok(&env, &["fsck", &clone_url], &b);

    // A segment part tampered with in the store: fsck says so (exit 3).
    let raw = w.storage(url, &env.root().join("raw"));
    let mut flipped = 0;
    for seg in raw.list("seg").unwrap() {
        if !seg.ends_with(".seg") {
            continue;
        }
        for part in raw.list(&format!("seg/{seg}")).unwrap() {
            let name = format!("seg/{seg}/{part}");
            let mut d = raw.read(&name).unwrap();
            let i = d.len() / 2;
            d[i] ^= 1;
            raw.write_file(&name, &d).unwrap();
            flipped += 1;
        }
    }
    assert!(flipped > 0);
    let fresh = s3_args(&w, &env.root().join("cache-c"));
    let o = run(&env, &["fsck", url], &fresh);
    assert_eq!(o.status.code(), Some(3), "{}", output_text(&o));
}

#[test]
fn s3_two_writers_takeover_and_fencing() {
    require_fuse!();
    let w = Weed::start();
    w.bucket("nas");
    let env = Env::bare();
    let unique = env
        .root()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_lowercase();
    let url = &format!("s3://nas/{unique}/shared");
    let a = s3_args(&w, &env.root().join("cache-a"));
    let b = s3_args(&w, &env.root().join("cache-b"));
    ok(&env, &["init", url], &a);
    let m1 = mount(&env, url, &env.mnt, &a, &[]);
    let info = ok(&env, &["info", url], &b);
    assert!(
        info.contains("writer:         host") && info.contains(&format!("pid {}", m1.pid)),
        "{info}"
    );
    fs::write(m1.p("from-a"), b"A").unwrap();
    fs::File::open(m1.p("from-a")).unwrap().sync_all().unwrap();

    // A second read-write mount on another host is refused (busy, exit 5).
    let mnt2: PathBuf = env.root().join("mnt2");
    fs::create_dir_all(&mnt2).unwrap();
    let args = mount_args(url, &mnt2, &b, &[]);
    let o = run_any(&env, &args);
    assert_eq!(o.status.code(), Some(5), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("--force-takeover"),
        "{}",
        output_text(&o)
    );

    // The first writer dies: once its lease expires the second takes over.
    m1.kill9();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = run_any(&env, &args);
        if o.status.success() {
            break;
        }
        assert_eq!(o.status.code(), Some(5), "{}", output_text(&o));
        assert!(Instant::now() < deadline, "never taken over");
        std::thread::sleep(Duration::from_millis(500));
    }
    let m2 = Mount::adopt(&mnt2, &mnt2.with_extension("log"));
    assert_eq!(fs::read(m2.p("from-a")).unwrap(), b"A");

    // --force-takeover from a third host: the second writer is fenced and
    // its fsync fails (EIO) instead of committing over the new writer.
    let mnt3 = env.root().join("mnt3");
    let c = s3_args(&w, &env.root().join("cache-c"));
    let m3 = mount(&env, url, &mnt3, &c, &["--force-takeover"]);
    let mut f = fs::File::create(m2.p("late")).unwrap();
    f.write_all(b"after the takeover").unwrap();
    let e = f.sync_all().unwrap_err();
    assert_eq!(errno_of(&e), libc::EIO, "{e}");
    drop(f);
    fs::write(m3.p("from-c"), b"C").unwrap();
    fs::File::open(m3.p("from-c")).unwrap().sync_all().unwrap();
    drop(m2);
    umount(&env, m3);
    let m = mount(&env, url, &env.mnt, &a, &[]);
    assert_eq!(fs::read(m.p("from-a")).unwrap(), b"A");
    assert_eq!(fs::read(m.p("from-c")).unwrap(), b"C");
    assert!(!m.p("late").exists());
    umount(&env, m);
    ok(&env, &["fsck", url], &a);
}

#[test]
fn s3_urls_and_options_refused_clearly() {
    let env = Env::bare();
    // Credentials in the URL: a usage error that does not echo them.
    let out = env.fails(2, &["init", "s3://AKIAX:topsecretvalue@bucket/p"]);
    assert!(out.contains("--credentials-file"), "{out}");
    assert!(!out.contains("topsecretvalue"), "{out}");
    let out = env.fails(2, &["info", "s3://Bad_Bucket/p"]);
    assert!(out.contains("bucket name"), "{out}");
    // The write-back journal is for s3:// volumes, with a bound above 0.
    let out = env.fails(
        2,
        &[
            "mount",
            env.root().to_str().unwrap(),
            env.mnt_str(),
            "--writeback",
            env.root().to_str().unwrap(),
        ],
    );
    assert!(out.contains("--writeback is for s3://"), "{out}");
    let out = env.fails(
        2,
        &[
            "info",
            "s3://bucket/p",
            "--writeback",
            env.root().to_str().unwrap(),
            "--writeback-size",
            "0",
        ],
    );
    assert!(out.contains("--writeback-size"), "{out}");
    let out = env.fails(2, &["info", "s3://bucket/p", "--cache-size", "lots"]);
    assert!(out.contains("--cache-size"), "{out}");
}

#[test]
fn s3_store_stopped_mid_write_then_started_again() {
    require_fuse!();
    let mut w = Weed::start();
    w.bucket("nas");
    let env = Env::bare();
    let unique = env
        .root()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_lowercase();
    let url = &format!("s3://nas/{unique}/outage");
    let a = s3_args(&w, &env.root().join("cache-a"));
    ok(&env, &["init", url], &a);
    let m = mount(&env, url, &env.mnt, &a, &[]);
    let kept = pattern(3 << 20, 7);
    fs::write(m.p("kept"), &kept).unwrap();
    fs::File::open(m.p("kept")).unwrap().sync_all().unwrap();

    // The store goes away mid-write: the fsync fails (EIO), bounded by the
    // retry limits, instead of hanging or reporting durable.
    w.kill();
    let mut f = fs::File::create(m.p("during")).unwrap();
    f.write_all(&pattern(1 << 20, 8)).unwrap();
    let e = f.sync_all().unwrap_err();
    assert_eq!(errno_of(&e), libc::EIO, "{e}");
    drop(f);
    // Reads of what is cached still work.
    assert_eq!(fs::read(m.p("kept")).unwrap(), kept);

    // Back again: unmount the failed mount, mount again (once the old lease
    // is released or expired), and everything fsync'ed before is there.
    assert!(w.spawn(), "SeaweedFS did not come back:\n{}", w.log());
    let _ = m.unmount();
    let args = mount_args(url, &env.mnt, &a, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = run_any(&env, &args);
        if o.status.success() {
            break;
        }
        assert_eq!(o.status.code(), Some(5), "{}", output_text(&o));
        assert!(Instant::now() < deadline, "the old lease never went");
        std::thread::sleep(Duration::from_millis(500));
    }
    let m = Mount::adopt(&env.mnt, &env.mnt.with_extension("log"));
    assert_eq!(fs::read(m.p("kept")).unwrap(), kept);
    umount(&env, m);
    ok(&env, &["fsck", url], &a);
}
