//! `kmsfs migrate` onto a real mount: a generated tree with every kind of
//! entry (files of many sizes, sparse and empty; directories; symlinks, one
//! dangling; hard links; a fifo, a socket, device nodes; user xattrs and ACLs;
//! odd modes and owners; nanosecond mtimes). The first run is interrupted
//! with SIGINT while rsync copies the large file, the second resumes it and
//! verifies; `--verify-only` then passes, and catches each of a changed byte,
//! a changed mode, a lost xattr, a lost ACL and a broken hard link, naming the
//! path. A destination that is not a kmsfs mount is refused without --force.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Env, TIMEOUT, output_text, pattern, sh, wait_until};

/// Last in rsync's order (files before subdirectories, by name).
const BIG_DIR: &str = "zz";
const BIG: &str = "big.bin";
const BIG_LEN: usize = 64 << 20;

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn set_times(p: &Path, secs: i64, nanos: i64) {
    let t = [libc::timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    }; 2];
    // SAFETY: valid path, two timespecs; do not follow symlinks.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c(p).as_ptr(),
            t.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

fn lchown(p: &Path, uid: u32, gid: u32) {
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::lchown(c(p).as_ptr(), uid, gid) }, 0);
}

fn setx(p: &Path, name: &str, v: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid path, name and value.
    let r = unsafe { libc::lsetxattr(c(p).as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    assert_eq!(r, 0, "setxattr {name} on {}", p.display());
}

fn getx(p: &Path, name: &str) -> Vec<u8> {
    let n = CString::new(name).unwrap();
    let mut v = vec![0u8; 65536];
    // SAFETY: valid path and name, buffer with its length.
    let r = unsafe { libc::lgetxattr(c(p).as_ptr(), n.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    assert!(r >= 0, "getxattr {name} on {}", p.display());
    v.truncate(r as usize);
    v
}

fn rmx(p: &Path, name: &str) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid path and name.
    let r = unsafe { libc::lremovexattr(c(p).as_ptr(), n.as_ptr()) };
    assert_eq!(r, 0, "removexattr {name} on {}", p.display());
}

fn mknod(p: &Path, mode: u32, major: u32, minor: u32) {
    // SAFETY: valid path; makedev only computes a number.
    let r = unsafe { libc::mknod(c(p).as_ptr(), mode, libc::makedev(major, minor)) };
    assert_eq!(r, 0, "mknod {}", p.display());
}

/// Every entry under `root`, the root first, deepest last (for set_times, reversed).
fn all_paths(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            let mut names: Vec<_> = fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            names.sort();
            out.extend(names);
        }
        i += 1;
    }
    out
}

/// The tree; returns the expected counts (files, directories, symlinks, hard
/// links, fifos, sockets, char devices, block devices) and regular bytes.
fn generate(src: &Path) -> ([u64; 8], u64) {
    for d in ["docs/deep/er", "private", "shared", "empty", BIG_DIR] {
        fs::create_dir_all(src.join(d)).unwrap();
    }
    let mut bytes = 0u64;
    // Many small files in four directories.
    for d in 0..4 {
        let dir = src.join(format!("many/{d}"));
        fs::create_dir_all(&dir).unwrap();
        for i in 0..50u64 {
            let len = ((i * 997 + d * 131) % 6000) as usize;
            fs::write(dir.join(format!("f{i:02}")), pattern(len, d * 100 + i)).unwrap();
            bytes += len as u64;
        }
    }
    let files: &[(&str, usize, u32, u32, u32)] = &[
        ("docs/readme.txt", 1200, 0o644, 0, 0),
        ("docs/notes.txt", 300, 0o644, 0, 0),
        ("docs/deep/er/data.bin", 300_000, 0o640, 1234, 5678),
        ("docs/deep/script.sh", 900, 0o755, 1000, 1000),
        ("private/secret", 70_000, 0o400, 0, 0),
        ("shared/setuid-tool", 5000, 0o4755, 0, 0),
        ("shared/group-file", 65537, 0o2664, 1000, 2000),
        ("empty-file", 0, 0o664, 1000, 1000),
        ("odd perms", 10, 0o707, 42, 43),
        ("one-byte", 1, 0o600, 0, 0),
        ("zz/big.bin", BIG_LEN, 0o644, 0, 0),
    ];
    for (i, (name, len, mode, uid, gid)) in files.iter().enumerate() {
        let p = src.join(name);
        fs::write(&p, pattern(*len, i as u64 + 7)).unwrap();
        lchown(&p, *uid, *gid);
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
        bytes += *len as u64;
    }
    // A sparse file: 16 MiB with three data islands.
    let mut f = File::create(src.join("sparse.img")).unwrap();
    f.set_len(16 << 20).unwrap();
    for off in [0u64, 5 << 20, (16 << 20) - 5000] {
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&pattern(5000, off)).unwrap();
    }
    drop(f);
    bytes += 16 << 20;
    // Hard links across directories: three names, one inode.
    fs::hard_link(src.join("docs/readme.txt"), src.join("shared/readme-link")).unwrap();
    fs::hard_link(
        src.join("docs/readme.txt"),
        src.join("docs/deep/readme-link2"),
    )
    .unwrap();
    // Symlinks: relative, absolute, dangling (with its own owner).
    std::os::unix::fs::symlink("../docs/readme.txt", src.join("shared/rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", src.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", src.join("dangling")).unwrap();
    lchown(&src.join("dangling"), 777, 888);
    // Special files.
    // SAFETY: valid path.
    assert_eq!(
        unsafe { libc::mkfifo(c(&src.join("fifo")).as_ptr(), 0o620) },
        0
    );
    drop(std::os::unix::net::UnixListener::bind(src.join("socket")).unwrap());
    mknod(&src.join("chardev"), libc::S_IFCHR | 0o640, 1, 3);
    mknod(&src.join("blockdev"), libc::S_IFBLK | 0o660, 7, 200);
    // Xattrs on files, a directory and the root.
    setx(&src.join("docs/readme.txt"), "user.comment", b"hello");
    setx(
        &src.join("docs/readme.txt"),
        "user.checksum",
        b"\x00\x01\x02binary",
    );
    setx(&src.join("docs/notes.txt"), "user.comment", b"notes");
    setx(&src.join("docs"), "user.dir-tag", b"d");
    setx(&src.join("private/secret"), "user.big", &pattern(3000, 77));
    setx(src, "user.root-tag", b"root");
    // POSIX ACLs: access ACLs and a default ACL.
    sh(&format!(
        "setfacl -m u:1234:rw-,g:5678:r--,m::rw- '{}'",
        src.join("docs/deep/er/data.bin").display()
    ));
    sh(&format!(
        "setfacl -d -m u:1234:rwx,g::r-x,o::- '{}'",
        src.join("shared").display()
    ));
    // Directory modes and owners, the root's too.
    fs::set_permissions(src.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(src.join("shared"), fs::Permissions::from_mode(0o3777)).unwrap();
    lchown(&src.join("shared"), 1000, 2000);
    fs::set_permissions(src, fs::Permissions::from_mode(0o751)).unwrap();
    // Nanosecond times, deepest first (changes above touch directory mtimes).
    for (i, p) in all_paths(src).iter().enumerate().rev() {
        set_times(
            p,
            1_500_000_000 + i as i64 * 86_401,
            (i as i64 * 123_456_789 + 1) % 1_000_000_000,
        );
    }
    // files: 200 + 11 named + sparse + 2 more names; dirs: docs, deep, er,
    // private, shared, empty, zz, many and its 4.
    ([214, 12, 3, 2, 1, 1, 1, 1], bytes)
}

fn counts(j: &serde_json::Value) -> [u64; 8] {
    let e = &j["entries"];
    [
        "files",
        "directories",
        "symlinks",
        "hard_links",
        "fifos",
        "sockets",
        "char_devices",
        "block_devices",
    ]
    .map(|k| e[k].as_u64().unwrap_or_else(|| panic!("no {k} in {j}")))
}

/// rsync processes still running on `src` (they must not outlive `kmsfs migrate`).
fn rsyncs_on(src: &Path) -> Vec<i32> {
    let want = src.as_os_str().as_bytes();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = fs::read(e.path().join("cmdline")).ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            let zombie = stat.rsplit(')').next()?.trim_start().starts_with('Z');
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            let is = args.first()?.ends_with(b"rsync")
                && args
                    .iter()
                    .any(|a| a.windows(want.len()).any(|w| w == want));
            (is && !zombie).then_some(pid)
        })
        .collect()
}

/// `kmsfs migrate --verify-only SRC MNT --json`: exit code and the report.
fn verify(env: &Env, src: &Path, mnt: &Path) -> (i32, serde_json::Value, String) {
    let o = env.run(&[
        "migrate".as_ref(),
        "--verify-only".as_ref(),
        "--json".as_ref(),
        src.as_os_str(),
        mnt.as_os_str(),
    ]);
    let text = output_text(&o);
    let j = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("verify report is not JSON ({e}): {text}"));
    (o.status.code().unwrap_or(-1), j, text)
}

/// The (path, what) of each difference in a report.
fn diffs(j: &serde_json::Value) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = j["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["path"].as_str().unwrap().to_string(),
                d["what"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Runs `--verify-only` expecting exit 3 with exactly `want` (path, what)
/// differences, each also named in the text output's stderr line.
fn expect_diffs(env: &Env, src: &Path, mnt: &Path, want: &[(&str, &str)], detail: &str) {
    let (code, j, text) = verify(env, src, mnt);
    assert_eq!(code, 3, "--verify-only must exit 3: {text}");
    let mut want: Vec<(String, String)> = want
        .iter()
        .map(|(p, w)| (p.to_string(), w.to_string()))
        .collect();
    want.sort();
    assert_eq!(diffs(&j), want, "{text}");
    assert!(text.contains(detail), "{detail:?} not in: {text}");
    assert!(
        j["changed_during_run"].as_array().unwrap().is_empty(),
        "{text}"
    );
    // The text report names the path and what differs, one line each.
    let o = env.run(&[
        "migrate".as_ref(),
        "--verify-only".as_ref(),
        src.as_os_str(),
        mnt.as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", output_text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for (p, w) in &want {
        assert!(
            out.contains(&format!("differs: {p}: {w}: ")),
            "no line for {p} {w}: {out}"
        );
    }
}

#[test]
fn migrate_interrupt_resume_verify() {
    require_fuse!();
    common::require_root("the migrate test (owners, device nodes)");
    let t0 = Instant::now();
    let env = Env::new();
    let src = env.root().join("src");
    fs::create_dir(&src).unwrap();
    let (want_counts, want_bytes) = generate(&src);
    let m = env.mount();
    let mnt = m.path.clone();

    // A first run, interrupted (SIGINT, as Ctrl-C) while rsync copies the
    // large file: it stops rsync and says how to resume.
    let mut child = env
        .cmd()
        .args(["migrate".as_ref(), src.as_os_str(), mnt.as_os_str()])
        .arg("--bwlimit=20M")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let partial_of_big = || {
        fs::read_dir(mnt.join(BIG_DIR)).is_ok_and(|mut rd| {
            rd.any(|e| {
                e.is_ok_and(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!(".{BIG}."))
                        && e.metadata().is_ok_and(|m| m.len() >= 2 << 20)
                })
            })
        })
    };
    wait_until("rsync to be copying the large file", TIMEOUT, || {
        assert!(
            child.try_wait().unwrap().is_none(),
            "kmsfs migrate ended before it was interrupted"
        );
        partial_of_big()
    });
    // SAFETY: kill on the pid of our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let o = child.wait_with_output().unwrap();
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(130), "{text}");
    assert!(
        text.contains("interrupted by SIGINT") && text.contains("the same command again to resume"),
        "{text}"
    );
    assert_eq!(
        rsyncs_on(&src),
        Vec::<i32>::new(),
        "rsync outlived kmsfs migrate"
    );
    assert!(!partial_of_big(), "rsync's temporary file was left behind");
    // What was finished before the interruption is there.
    assert_eq!(
        fs::read(mnt.join("many/3/f49")).unwrap(),
        fs::read(src.join("many/3/f49")).unwrap()
    );

    // The same command again resumes: only the large file is copied.
    let o = env.run(&[
        "migrate".as_ref(),
        src.as_os_str(),
        mnt.as_os_str(),
        "--json".as_ref(),
    ]);
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(0), "{text}");
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["identical"], true, "{text}");
    assert_eq!(j["copy"]["files_copied"], 1, "{text}");
    assert_eq!(j["copy"]["bytes_copied"], BIG_LEN as u64, "{text}");
    assert_eq!(j["copy"]["rsync_exit"], 0, "{text}");
    assert_eq!(counts(&j), want_counts, "{text}");
    assert_eq!(j["bytes"], want_bytes, "{text}");
    assert!(j["differences"].as_array().unwrap().is_empty(), "{text}");
    assert!(
        j["only_on_destination"].as_array().unwrap().is_empty(),
        "{text}"
    );

    // --verify-only: identical, exit 0; the text report has the counts.
    let (code, j, text) = verify(&env, &src, &mnt);
    assert_eq!(code, 0, "{text}");
    assert_eq!(j["identical"], true, "{text}");
    assert!(j["copy"].is_null());
    let o = env.run(&[
        "migrate".as_ref(),
        "--verify-only".as_ref(),
        src.as_os_str(),
        mnt.as_os_str(),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(
        out.contains("214 files, 12 directories, 3 symlinks, 2 hard links, 1 fifo, 1 socket")
            && out.contains("result:   identical"),
        "{out}"
    );

    // Each change on the mount, alone, fails the verification, naming it.
    // 1. One byte of a file (its mtime put back).
    let data = mnt.join("docs/deep/er/data.bin");
    let md = fs::metadata(&data).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&data)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 1000).unwrap();
    f.write_all_at(&[b[0] ^ 1], 1000).unwrap();
    f.sync_all().unwrap();
    drop(f);
    set_times(&data, md.mtime(), md.mtime_nsec());
    expect_diffs(
        &env,
        &src,
        &mnt,
        &[("docs/deep/er/data.bin", "content")],
        "content differs",
    );
    let f = OpenOptions::new().write(true).open(&data).unwrap();
    f.write_all_at(&b, 1000).unwrap();
    drop(f);
    set_times(&data, md.mtime(), md.mtime_nsec());

    // 2. A mode.
    let secret = mnt.join("private/secret");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o440)).unwrap();
    expect_diffs(
        &env,
        &src,
        &mnt,
        &[("private/secret", "mode")],
        "0400 on the source, 0440 on the destination",
    );
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o400)).unwrap();

    // 3. An xattr lost.
    let notes = mnt.join("docs/notes.txt");
    rmx(&notes, "user.comment");
    expect_diffs(
        &env,
        &src,
        &mnt,
        &[("docs/notes.txt", "xattr")],
        "extended attribute user.comment missing on the destination",
    );
    setx(&notes, "user.comment", b"notes");

    // 4. An ACL lost (the default ACL of a directory).
    let shared = mnt.join("shared");
    let acl = getx(&shared, "system.posix_acl_default");
    rmx(&shared, "system.posix_acl_default");
    expect_diffs(
        &env,
        &src,
        &mnt,
        &[("shared", "acl")],
        "ACL (system.posix_acl_default) missing on the destination",
    );
    setx(&shared, "system.posix_acl_default", &acl);

    // 5. A hard link broken: an identical copy (cp -a) replaces one name.
    let link = mnt.join("shared/readme-link");
    let sm = fs::metadata(&shared).unwrap();
    let tmp = mnt.join("shared/readme-link.tmp");
    sh(&format!(
        "cp -a '{}' '{}' && mv '{}' '{}'",
        link.display(),
        tmp.display(),
        tmp.display(),
        link.display()
    ));
    set_times(&shared, sm.mtime(), sm.mtime_nsec()); // the directory's mtime put back
    expect_diffs(
        &env,
        &src,
        &mnt,
        &[
            ("docs/deep/readme-link2", "hard links"),
            ("docs/readme.txt", "hard links"),
            ("shared/readme-link", "hard links"),
        ],
        "linked with docs/deep/readme-link2, docs/readme.txt on the source, with no other name on the destination",
    );
    fs::remove_file(&link).unwrap();
    fs::hard_link(mnt.join("docs/readme.txt"), &link).unwrap();
    set_times(&shared, sm.mtime(), sm.mtime_nsec());

    // Everything put back: identical again.
    let (code, _, text) = verify(&env, &src, &mnt);
    assert_eq!(code, 0, "{text}");

    // A destination that is not a kmsfs mount is refused without --force.
    let small = env.root().join("small");
    fs::create_dir(&small).unwrap();
    fs::write(small.join("a"), b"plain").unwrap();
    let plain = env.root().join("plain-dest");
    fs::create_dir(&plain).unwrap();
    let text = env.fails(
        2,
        &["migrate".as_ref(), small.as_os_str(), plain.as_os_str()],
    );
    assert!(
        text.contains("is not on a kmsfs mount") && text.contains("--force"),
        "{text}"
    );
    assert!(!plain.join("a").exists());
    env.ok(&[
        "migrate".as_ref(),
        "--force".as_ref(),
        small.as_os_str(),
        plain.as_os_str(),
    ]);
    assert_eq!(fs::read(plain.join("a")).unwrap(), b"plain");

    m.kmsfs_umount(&env);
    env.assert_fsck_clean();
    eprintln!("migrate test took {:.1} s", t0.elapsed().as_secs_f64());
    assert!(t0.elapsed() < Duration::from_secs(120));
}
