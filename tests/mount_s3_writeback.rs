//! `--writeback DIR` on an S3 volume through the command line and FUSE,
//! against a real SeaweedFS on loopback (tests/common_s3): fsync durable in
//! the local journal while the store is down, the daemon killed (-9) with
//! entries pending and the journal replayed by the next mount; a damaged
//! journal entry, a torn last entry and a journal of another volume; a
//! mount without the journal refused; fencing (another writer took over:
//! the replay refuses and keeps the journal); a clean unmount drains, and
//! one with the store away keeps the journal for the next mount.

mod common;
mod common_s3;
mod common_s3_mount;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use common_s3::Weed;
use common_s3_mount::{kcmd, run_any, s3_args};
use kmsfs::store::Storage;
use kmsfs::store::object::{journal, writeback};

fn ok(env: &Env, args: &[&str], s3: &[String]) -> String {
    let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    a.extend(s3.iter().cloned());
    let o = run_any(env, &a);
    assert!(o.status.success(), "kmsfs {args:?}: {}", output_text(&o));
    String::from_utf8(o.stdout).unwrap()
}

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

/// Mounts, waiting (bounded) while a dead writer's lease has not expired
/// yet (exit 5); any other failure is returned.
fn try_mount(
    env: &Env,
    url: &str,
    mnt: &Path,
    s3: &[String],
    extra: &[&str],
    vars: &[(&str, &str)],
) -> Result<Mount, String> {
    fs::create_dir_all(mnt).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut c = kcmd(env);
        c.args(mount_args(url, mnt, s3, extra));
        for (k, v) in vars {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        if o.status.success() {
            return Ok(Mount::adopt(mnt, &mnt.with_extension("log")));
        }
        let text = format!(
            "{}\nlog:\n{}",
            output_text(&o),
            fs::read_to_string(mnt.with_extension("log")).unwrap_or_default()
        );
        if o.status.code() == Some(5) && text.contains("writer lease") {
            assert!(
                Instant::now() < deadline,
                "the old lease never went: {text}"
            );
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        return Err(text);
    }
}

fn mount(env: &Env, url: &str, mnt: &Path, s3: &[String], extra: &[&str]) -> Mount {
    try_mount(env, url, mnt, s3, extra, &[]).unwrap_or_else(|e| panic!("mount {url}: {e}"))
}

fn umount(env: &Env, m: Mount) {
    let o = run_any(env, &[std::ffi::OsStr::new("umount"), m.path.as_os_str()]);
    assert!(o.status.success(), "kmsfs umount: {}", output_text(&o));
    assert_eq!(wait_exit(m.pid, TIMEOUT), Some(0), "the daemon's exit");
    drop(m);
}

/// `kill -9` of the daemon once its start-up `readahead` thread has ended:
/// that thread's statfs of the mount, if in flight when the daemon dies,
/// waits uninterruptibly for an answer that never comes, and the dead daemon
/// cannot exit until the mount is aborted (a short-lived mount meets this).
fn kill9(m: Mount) {
    let tasks = format!("/proc/{}/task", m.pid);
    wait_until("the daemon's readahead thread to end", TIMEOUT, || {
        !fs::read_dir(&tasks).unwrap().any(|t| {
            fs::read_to_string(t.unwrap().path().join("comm"))
                .is_ok_and(|c| c.trim() == "readahead")
        })
    });
    m.kill9();
}

fn write_synced(m: &Mount, name: &str, data: &[u8]) {
    let mut f = fs::File::create(m.p(name)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn unique(env: &Env) -> String {
    env.root()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_lowercase()
}

/// Journal files of `dir` (name, bytes), without the lock file.
fn journal_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("journal-")
        })
        .map(|p| {
            let b = fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    v
}

fn restore(dir: &Path, files: &[(PathBuf, Vec<u8>)]) {
    for (p, _) in journal_files(dir) {
        fs::remove_file(p).unwrap();
    }
    for (p, b) in files {
        fs::write(p, b).unwrap();
    }
}

/// Starts the store again and waits until it serves this volume (right
/// after a restart SeaweedFS answers 500 for a moment).
fn restart(w: &mut Weed, url: &str, env: &Env) {
    assert!(w.spawn(), "SeaweedFS did not come back:\n{}", w.log());
    let raw = w.storage(url, &env.root().join("raw"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = raw.read("kmsfs.header") {
        assert!(Instant::now() < deadline, "the store never came back: {e}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The root slots as the store holds them.
fn roots(w: &Weed, url: &str, env: &Env) -> Vec<Vec<u8>> {
    let raw = w.storage(url, &env.root().join("raw"));
    ["kmsfs.root", "kmsfs.root.1"]
        .iter()
        .map(|n| raw.read(n).unwrap_or_default())
        .collect()
}

#[test]
fn writeback_kill9_with_the_store_down_then_replay_tamper_and_torn_tail() {
    require_fuse!();
    let mut w = Weed::start();
    w.bucket("nas");
    let env = Env::bare();
    let url = &format!("s3://nas/{}/wb", unique(&env));
    let a = s3_args(&w, &env.root().join("cache-a"));
    let jdir = env.root().join("journal");
    let jarg = jdir.to_str().unwrap();
    ok(&env, &["init", url], &a);
    let m = mount(&env, url, &env.mnt, &a, &["--writeback", jarg]);
    write_synced(&m, "before", b"uploaded while the store was up");

    // The store goes away: fsync still returns (the journal has it).
    w.kill();
    let files: Vec<Vec<u8>> = (0..3).map(|i| pattern(300_000, 40 + i)).collect();
    for (i, d) in files.iter().enumerate() {
        write_synced(&m, &format!("f{i}"), d);
    }
    // Reads see what is only in the journal.
    assert_eq!(fs::read(m.p("f1")).unwrap(), files[1]);
    kill9(m);
    let pending = writeback::pending_entries(&jdir).unwrap().unwrap();
    assert!(pending > 0, "nothing pending in the journal");
    let saved = journal_files(&jdir);
    assert!(!saved.is_empty());
    restart(&mut w, url, &env);
    let roots_before = roots(&w, url, &env);

    // A writer without the journal is refused, naming it.
    let e = try_mount(&env, url, &env.mnt, &a, &[], &[])
        .map(drop)
        .unwrap_err();
    assert!(e.contains("--writeback") && e.contains(jarg), "{e}");
    let info = ok(&env, &["info", url], &a);
    assert!(
        info.contains("write-back journal of host") && info.contains(jarg),
        "{info}"
    );

    // A journal entry damaged in the middle: an integrity error, nothing
    // uploaded, the journal left as it is.
    let mut bad = saved.clone();
    let i = journal::FILE_HEADER_LEN + 200;
    bad[0].1[i] ^= 0x10;
    restore(&jdir, &bad);
    let e = try_mount(&env, url, &env.mnt, &a, &["--writeback", jarg], &[])
        .map(drop)
        .unwrap_err();
    assert!(e.contains("damaged") && e.contains(jarg), "{e}");
    assert_eq!(roots(&w, url, &env), roots_before, "the store changed");
    assert_eq!(journal_files(&jdir), bad, "the journal changed");

    // A journal of another volume (its volume id changed in every file
    // header, checksums fixed): refused.
    let mut other = saved.clone();
    for (_, b) in &mut other {
        b[12] ^= 0xff;
        let h = journal::sha256(&b[..36]);
        b[36..68].copy_from_slice(&h);
    }
    restore(&jdir, &other);
    let e = try_mount(&env, url, &env.mnt, &a, &["--writeback", jarg], &[])
        .map(drop)
        .unwrap_err();
    assert!(e.contains("belongs to volume"), "{e}");
    assert_eq!(roots(&w, url, &env), roots_before, "the store changed");

    // The journal as the crash left it: replayed before the mount serves.
    restore(&jdir, &saved);
    let m = mount(&env, url, &env.mnt, &a, &["--writeback", jarg]);
    assert_eq!(
        fs::read(m.p("before")).unwrap(),
        b"uploaded while the store was up"
    );
    for (i, d) in files.iter().enumerate() {
        assert_eq!(&fs::read(m.p(&format!("f{i}"))).unwrap(), d, "f{i}");
    }
    assert!(
        journal_files(&jdir).is_empty(),
        "the replayed journal stays"
    );

    // Second crash, and the last entry torn (cut short): it is ignored, the
    // entries before it are replayed.
    write_synced(&m, "g0", b"first after the replay");
    w.kill();
    write_synced(&m, "g1", b"with the store down");
    write_synced(&m, "g2", b"the last one");
    kill9(m);
    let mut torn = journal_files(&jdir);
    let last = torn.last_mut().unwrap();
    let n = last.1.len();
    last.1.truncate(n - 7);
    restore(&jdir, &torn);
    restart(&mut w, url, &env);
    let m = mount(&env, url, &env.mnt, &a, &["--writeback", jarg]);
    assert_eq!(fs::read(m.p("g0")).unwrap(), b"first after the replay");
    assert_eq!(fs::read(m.p("g1")).unwrap(), b"with the store down");
    assert_eq!(&fs::read(m.p("f2")).unwrap(), &files[2]);
    let log = fs::read_to_string(env.mnt.with_extension("log")).unwrap();
    assert!(log.contains("torn last entry"), "{log}");
    umount(&env, m);
    assert!(journal_files(&jdir).is_empty(), "journal left after umount");
    // Drained and closed cleanly: a mount without the journal is welcome.
    let m = mount(&env, url, &env.mnt, &a, &[]);
    assert_eq!(fs::read(m.p("g0")).unwrap(), b"first after the replay");
    umount(&env, m);
    ok(&env, &["fsck", url], &a);
}

#[test]
fn writeback_fsync_returns_while_the_store_is_down_and_umount_drains() {
    require_fuse!();
    let mut w = Weed::start();
    w.bucket("nas");
    let env = Env::bare();
    let url = &format!("s3://nas/{}/down", unique(&env));
    let a = s3_args(&w, &env.root().join("cache-a"));
    let b = s3_args(&w, &env.root().join("cache-b"));
    let jdir = env.root().join("journal");
    let jarg = jdir.to_str().unwrap();
    ok(&env, &["init", url], &a);
    let m = mount(
        &env,
        url,
        &env.mnt,
        &a,
        &["--writeback", jarg, "--writeback-size", "4M"],
    );
    write_synced(&m, "up", b"store up");
    w.kill();
    // Store down: fsync returns (within the journal's bound of 4 MiB).
    let big = pattern(1 << 20, 9);
    write_synced(&m, "down", &big);
    write_synced(&m, "down2", b"second");
    assert_eq!(fs::read(m.p("down")).unwrap(), big);

    // The store comes back: the uploader's retries get everything there,
    // while the mount goes on (another host sees it without an unmount).
    restart(&mut w, url, &env);
    write_synced(&m, "after", b"store back");
    let rmnt = env.root().join("reader");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = mount(&env, url, &rmnt, &b, &["-o", "ro"]);
        let seen = fs::read(r.p("after")).ok();
        let down = fs::read(r.p("down")).ok();
        r.unmount();
        if seen.as_deref() == Some(b"store back") {
            assert_eq!(down.as_deref(), Some(&big[..]));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the journal never reached the store"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    write_synced(&m, "last", b"just before the unmount");
    umount(&env, m);
    let log = fs::read_to_string(env.mnt.with_extension("log")).unwrap();
    assert!(log.contains("drained"), "{log}");
    assert!(journal_files(&jdir).is_empty());
    // Everything is in the store: a mount elsewhere without a journal.
    let m = mount(&env, url, &env.mnt, &b, &[]);
    assert_eq!(fs::read(m.p("last")).unwrap(), b"just before the unmount");
    assert_eq!(fs::read(m.p("down2")).unwrap(), b"second");
    umount(&env, m);
}

#[test]
fn writeback_replay_refused_after_a_takeover_and_the_journal_kept() {
    require_fuse!();
    let w = Weed::start();
    w.bucket("nas");
    let env = Env::bare();
    let url = &format!("s3://nas/{}/fence", unique(&env));
    let a = s3_args(&w, &env.root().join("cache-a"));
    let b = s3_args(&w, &env.root().join("cache-b"));
    let jdir = env.root().join("journal");
    let jarg = jdir.to_str().unwrap();
    ok(&env, &["init", url], &a);
    // The uploader held back (test hook): the fsync'ed file stays in the journal.
    let m = try_mount(
        &env,
        url,
        &env.mnt,
        &a,
        &["--writeback", jarg],
        &[("KMSFS_TEST_WRITEBACK_PAUSE", "1")],
    )
    .unwrap();
    write_synced(&m, "journalled", b"only in the journal");
    kill9(m);
    let saved = journal_files(&jdir);
    assert!(!saved.is_empty());

    // Another host takes over at once (--force-takeover), and commits.
    let mnt2 = env.root().join("mnt2");
    let m2 = mount(&env, url, &mnt2, &b, &["--force-takeover"]);
    assert!(!m2.p("journalled").exists());
    write_synced(&m2, "from-b", b"B");
    umount(&env, m2);

    // The journal's replay would commit over B: refused, journal untouched.
    let e = try_mount(&env, url, &env.mnt, &a, &["--writeback", jarg], &[])
        .map(drop)
        .unwrap_err();
    assert!(e.contains("another writer has committed"), "{e}");
    assert_eq!(journal_files(&jdir), saved, "the journal changed");

    // The documented way on: move the journal aside, mount without it.
    fs::rename(&jdir, env.root().join("journal.fenced")).unwrap();
    let m = mount(&env, url, &env.mnt, &a, &["--writeback", jarg]);
    assert_eq!(fs::read(m.p("from-b")).unwrap(), b"B");
    assert!(!m.p("journalled").exists());
    umount(&env, m);
    ok(&env, &["fsck", url], &a);
}

#[test]
fn writeback_umount_with_the_store_down_keeps_the_journal_for_the_next_mount() {
    require_fuse!();
    let mut w = Weed::start();
    w.bucket("nas");
    let env = Env::bare();
    let url = &format!("s3://nas/{}/away", unique(&env));
    let a = s3_args(&w, &env.root().join("cache-a"));
    let jdir = env.root().join("journal");
    let jarg = jdir.to_str().unwrap();
    ok(&env, &["init", url], &a);
    let m = mount(&env, url, &env.mnt, &a, &["--writeback", jarg]);
    w.kill();
    write_synced(&m, "away", b"fsync'ed while the store was away");
    // The unmount cannot upload: it gives up (after the stated stall time),
    // says so, and leaves the journal.
    umount(&env, m);
    let log = fs::read_to_string(env.mnt.with_extension("log")).unwrap();
    assert!(
        log.contains("are not in the object store") && log.contains("next `kmsfs mount"),
        "{log}"
    );
    assert!(!journal_files(&jdir).is_empty(), "the journal is gone");
    restart(&mut w, url, &env);
    let m = mount(&env, url, &env.mnt, &a, &["--writeback", jarg]);
    assert_eq!(
        fs::read(m.p("away")).unwrap(),
        b"fsync'ed while the store was away"
    );
    umount(&env, m);
    assert!(journal_files(&jdir).is_empty());
}
