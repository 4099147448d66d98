//! `kmsfs salvage VOLUME DEST`: a full tree comes out identical (contents,
//! modes, owners, nanosecond times, xattrs and ACLs, hard links, symlinks,
//! special files, sparse files staying sparse); a damaged file is skipped and
//! listed (exit 3) or copied as NAME.partial with --partial while every other
//! file comes out intact; a non-empty DEST is refused; snapshots salvage too.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::{Env, output_text, pattern, sh};

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn check(r: libc::c_int, what: &str) {
    assert!(r == 0, "{what}: {}", std::io::Error::last_os_error());
}

fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) {
    let ts = |(s, n): (i64, i64)| libc::timespec {
        tv_sec: s,
        tv_nsec: n,
    };
    let t = [ts(atime), ts(mtime)];
    // SAFETY: a valid path and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c(p).as_ptr(),
            t.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(r, &format!("utimensat {}", p.display()));
}

fn lxattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let cp = c(p);
    // SAFETY: size probe, then a read into a buffer of that size.
    let len = unsafe { libc::llistxattr(cp.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(len >= 0, "llistxattr {}", p.display());
    let mut buf = vec![0u8; len as usize];
    // SAFETY: buf has room for len bytes.
    let got = unsafe { libc::llistxattr(cp.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(got >= 0);
    buf.truncate(got as usize);
    let mut out = BTreeMap::new();
    for name in buf.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).unwrap();
        // SAFETY: as above.
        let vlen = unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) };
        assert!(vlen >= 0, "lgetxattr {}", p.display());
        let mut v = vec![0u8; vlen as usize];
        // SAFETY: v has room for vlen bytes.
        let g =
            unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(g >= 0);
        v.truncate(g as usize);
        out.insert(name.to_vec(), v);
    }
    out
}

fn lsetxattr(p: &Path, name: &str, v: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid path, name and value buffer.
    let r = unsafe { libc::lsetxattr(c(p).as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    check(r, &format!("lsetxattr {name} on {}", p.display()));
}

/// What salvage must keep of one node (st_ino and ctime are new in a copy;
/// directory sizes and link counts are the file system's own).
#[derive(Debug, PartialEq, Eq)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: Option<u64>,
    size: Option<u64>,
    atime: (i64, i64),
    mtime: (i64, i64),
    rdev: u64,
    target: Option<PathBuf>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Index of the first path with the same inode (hard links).
    same_as: Option<PathBuf>,
}

/// Every node under `root` (root itself as ""), stat'ed before its
/// directory is listed so that listing does not move the atime first.
fn describe(root: &Path) -> BTreeMap<PathBuf, Meta> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    let meta = |rel: &Path, inodes: &mut BTreeMap<u64, PathBuf>| {
        let p = root.join(rel);
        let m = fs::symlink_metadata(&p).unwrap();
        let dir = m.is_dir();
        let same_as = if dir {
            None
        } else {
            let first = inodes.entry(m.ino()).or_insert_with(|| rel.to_path_buf());
            (first != rel).then(|| first.clone())
        };
        Meta {
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            nlink: (!dir).then_some(m.nlink()),
            size: (!dir).then_some(m.size()),
            atime: (m.atime(), m.atime_nsec()),
            mtime: (m.mtime(), m.mtime_nsec()),
            rdev: m.rdev(),
            target: m
                .file_type()
                .is_symlink()
                .then(|| fs::read_link(&p).unwrap()),
            xattrs: lxattrs(&p),
            same_as,
        }
    };
    out.insert(PathBuf::new(), meta(Path::new(""), &mut inodes));
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(root.join(&rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(n);
            let m = meta(&r, &mut inodes);
            if m.mode & libc::S_IFMT == libc::S_IFDIR {
                stack.push(r.clone());
            }
            out.insert(r, m);
        }
    }
    out
}

fn same_content(a: &Path, b: &Path) {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        assert_eq!(
            na,
            nb,
            "{} and {} differ in length",
            a.display(),
            b.display()
        );
        assert!(
            ba[..na] == bb[..nb],
            "{} and {} differ in the MiB at {off}",
            a.display(),
            b.display()
        );
        if na == 0 {
            return;
        }
        off += na as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

fn salvage(env: &Env, dest: &Path, extra: &[&str]) -> std::process::Output {
    let mut args: Vec<&OsStr> = vec![OsStr::new("salvage"), env.vol.as_os_str(), dest.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    env.run(&args)
}

fn json_of(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", output_text(o)))
}

const GIB: u64 = 1 << 30;

#[test]
fn salvage_copies_a_whole_tree_faithfully() {
    require_fuse!();
    common::require_root("salvage keeps owners and device nodes");
    let env = Env::new();
    // allow_other turns on POSIX ACLs in the kernel (mode and mask agree).
    let m = env.mount_with("allow_other", &[]);
    let p = |r: &str| m.p(r);
    fs::create_dir_all(p("a/b/c")).unwrap();
    fs::create_dir(p("emptydir")).unwrap();
    fs::write(p("top.txt"), b"hello\n").unwrap();
    fs::write(p("empty"), b"").unwrap();
    let big = pattern(5 << 20, 1);
    fs::write(p("a/b/c/big"), &big).unwrap();
    // Sparse: 1 GiB with data at three places.
    let sparse = File::create(p("a/b/sparse")).unwrap();
    sparse.set_len(GIB).unwrap();
    sparse.write_all_at(&pattern(100_000, 2), 0).unwrap();
    sparse
        .write_all_at(&pattern(70_000, 3), (500 << 20) + 12_345)
        .unwrap();
    sparse
        .write_all_at(&pattern(50_000, 4), GIB - 50_000)
        .unwrap();
    sparse.sync_all().unwrap();
    drop(sparse);
    fs::write(p("a/h1"), b"linked twice").unwrap();
    fs::hard_link(p("a/h1"), p("h2")).unwrap();
    std::os::unix::fs::symlink("big", p("a/b/c/link_rel")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", p("abs_link")).unwrap();
    std::os::unix::fs::symlink("b", p("a/dirlink")).unwrap();
    let odd = OsStr::from_bytes(b"odd name \xff\xfe\n\xc3\xbc");
    fs::write(m.path.join(odd), b"odd").unwrap();
    // SAFETY: valid paths.
    unsafe {
        check(libc::mkfifo(c(&p("fifo")).as_ptr(), 0o640), "mkfifo");
        check(
            libc::mknod(
                c(&p("a/null")).as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(1, 3),
            ),
            "mknod",
        );
    }
    // Owners, then modes (chown clears set-id bits), then ACLs and xattrs.
    std::os::unix::fs::chown(p("a/b/c/big"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(p("abs_link"), Some(42), Some(43)).unwrap();
    std::os::unix::fs::chown(p("a/b"), Some(7), Some(8)).unwrap();
    std::os::unix::fs::chown(p("fifo"), Some(99), Some(98)).unwrap();
    fs::write(p("a/suid"), b"#!/bin/sh\n").unwrap();
    std::os::unix::fs::chown(p("a/suid"), Some(1000), Some(1000)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let chmod =
        |r: &str, mode: u32| fs::set_permissions(p(r), fs::Permissions::from_mode(mode)).unwrap();
    chmod("a/suid", 0o4755);
    chmod("a/b/c/big", 0o640);
    chmod("top.txt", 0o600);
    chmod("a", 0o751);
    chmod("emptydir", 0o1777);
    chmod("a/b/c", 0o2750);
    sh(&format!(
        "setfacl -m u:1234:rwx,g:77:r {}",
        p("a/b/c/big").display()
    ));
    sh(&format!("setfacl -d -m u:1234:rx {}", p("a/b").display()));
    lsetxattr(&p("top.txt"), "user.one", b"1");
    lsetxattr(&p("top.txt"), "trusted.secret", b"t");
    lsetxattr(&p("a/b/c/big"), "user.big", &pattern(3000, 5));
    lsetxattr(&p("a"), "user.dir", b"directory attribute");
    lsetxattr(&p("abs_link"), "trusted.link", b"on a symlink");
    // Times last, deepest first, each distinct, with nanoseconds.
    let all = describe(&m.path);
    for (i, rel) in all.keys().rev().enumerate() {
        let i = i as i64;
        set_times(
            &m.path.join(rel),
            (1_500_000_000 + i, 900_000_000 - i * 3),
            (1_600_000_000 + i, 100_000_000 + i * 7 + 1),
        );
    }
    assert_eq!(m.unmount(), Some(0));

    let dest = env.root().join("out");
    let o = salvage(&env, &dest, &["--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    let r = json_of(&o);
    assert_eq!(r["complete"], true, "{r}");
    // top.txt empty big sparse h1 suid odd: 7 files, h2 a hard link.
    assert_eq!(r["files"], 7, "{r}");
    assert_eq!(r["hard_links"], 1, "{r}");
    assert_eq!(r["symlinks"], 3, "{r}");
    assert_eq!(r["special"], 2, "{r}");
    assert_eq!(r["directories"], 4, "{r}");
    assert_eq!(
        r["bytes"].as_u64().unwrap(),
        6 + 5 * (1 << 20) + GIB + 12 + 10 + 3,
        "{r}"
    );
    assert!(r["damaged"].as_array().unwrap().is_empty(), "{r}");
    assert!(r["notes"].as_array().unwrap().is_empty(), "{r}");

    let m = env.mount_with("ro", &[]);
    let want = describe(&m.path);
    let got = describe(&dest);
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    for (rel, w) in &want {
        assert_eq!(w, &got[rel], "{}", rel.display());
    }
    // Spot checks against what was set, not only against the mount.
    let g = |r: &str| &got[Path::new(r)];
    assert_eq!((g("a/b/c/big").uid, g("a/b/c/big").gid), (1234, 5678));
    assert_eq!(g("a/suid").mode & 0o7777, 0o4755);
    assert_eq!(g("emptydir").mode & 0o7777, 0o1777);
    assert_eq!(g("a/h1").nlink, Some(2));
    let ino = |r: &str| fs::symlink_metadata(dest.join(r)).unwrap().ino();
    assert_eq!(ino("h2"), ino("a/h1"), "hard links stay linked");
    assert!(
        g("a/b/c/big")
            .xattrs
            .contains_key(&b"system.posix_acl_access"[..])
    );
    assert!(
        g("a/b")
            .xattrs
            .contains_key(&b"system.posix_acl_default"[..])
    );
    assert_eq!(g("abs_link").xattrs[&b"trusted.link"[..]], b"on a symlink");
    assert_eq!(g("a/null").rdev, libc::makedev(1, 3));
    assert!(g("a/b/c/big").mtime.1 % 1000 != 0, "nanoseconds are kept");
    let acl = sh(&format!("getfacl -cp {}", dest.join("a/b/c/big").display()));
    assert!(acl.contains("user:1234:rwx"), "{acl}");
    // Contents, and the sparse file stays sparse.
    for (rel, w) in &want {
        if w.mode & libc::S_IFMT == libc::S_IFREG {
            same_content(&m.path.join(rel), &dest.join(rel));
        }
    }
    assert_eq!(fs::read(dest.join("a/b/c/big")).unwrap(), big);
    let sp = fs::metadata(dest.join("a/b/sparse")).unwrap();
    assert_eq!(sp.len(), GIB);
    assert!(
        sp.blocks() * 512 < 1 << 20,
        "the sparse copy allocates {} bytes",
        sp.blocks() * 512
    );
    assert_eq!(m.unmount(), Some(0));

    // The text summary, and a second run refusing the now full DEST.
    let dest2 = env.root().join("out2");
    let o = salvage(&env, &dest2, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("7 files") && out.contains("1 hard links") && !out.contains("damaged"),
        "{out}"
    );
    let o = salvage(&env, &dest2, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
}

/// 1 MiB segments; the victim written alone fills segments of its own.
fn damaged_volume() -> (Env, Vec<u8>) {
    let env = Env::with_init(&["--segment-size", "1M"]);
    let segs = |env: &Env| -> BTreeSet<PathBuf> {
        fs::read_dir(env.vol.join("seg"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    };
    let before = segs(&env);
    let m = env.mount();
    let victim = pattern(3 << 20, 11);
    fs::write(m.p("victim"), &victim).unwrap();
    File::open(m.p("victim")).unwrap().sync_all().unwrap();
    assert_eq!(m.unmount(), Some(0));
    let victim_segs: Vec<PathBuf> = segs(&env).difference(&before).cloned().collect();
    assert!(victim_segs.len() >= 3, "{victim_segs:?}");

    let m = env.mount();
    fs::write(m.p("bystander"), pattern(500_000, 12)).unwrap();
    fs::create_dir(m.p("dir")).unwrap();
    fs::write(m.p("dir/other"), b"other file").unwrap();
    fs::hard_link(m.p("victim"), m.p("dir/victim-link")).unwrap();
    fs::write(m.p("dir/victim-link.partial"), b"a name already taken").unwrap();
    assert_eq!(m.unmount(), Some(0));
    env.assert_fsck_clean();

    // One flipped byte in the middle of the victim's first segment: its data.
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&victim_segs[0])
        .unwrap();
    let off = f.metadata().unwrap().len() / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, off).unwrap();
    (env, victim)
}

fn check_bystanders(dest: &Path) {
    assert_eq!(
        fs::read(dest.join("bystander")).unwrap(),
        pattern(500_000, 12)
    );
    assert_eq!(fs::read(dest.join("dir/other")).unwrap(), b"other file");
    assert_eq!(
        fs::read(dest.join("dir/victim-link.partial")).unwrap(),
        b"a name already taken"
    );
}

#[test]
fn damaged_file_is_skipped_or_copied_partially() {
    require_fuse!();
    let (env, victim) = damaged_volume();

    // Default: skipped and listed, exit 3, everything else intact.
    let dest = env.root().join("out");
    let o = salvage(&env, &dest, &[]);
    assert_eq!(o.status.code(), Some(3), "{}", output_text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("damaged: /victim: skipped"), "{out}");
    assert!(out.contains("damaged: /dir/victim-link: skipped"), "{out}");
    assert!(!out.contains("bystander"), "{out}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("kmsfs: ") && err.contains("--partial") && err.lines().count() == 1,
        "{err}"
    );
    check_bystanders(&dest);
    assert!(!dest.join("victim").exists());
    assert!(!dest.join("dir/victim-link").exists());
    let names: BTreeSet<_> = fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let want: BTreeSet<std::ffi::OsString> = ["bystander", "dir"].map(Into::into).into();
    assert_eq!(names, want);

    // --partial: what verifies, zeros elsewhere, as NAME.partial (both names).
    let dest = env.root().join("out-partial");
    let o = salvage(&env, &dest, &["--partial", "--json"]);
    assert_eq!(o.status.code(), Some(3), "{}", output_text(&o));
    let r = json_of(&o);
    assert_eq!(r["complete"], false);
    assert_eq!(r["partial_files"], 1, "{r}");
    let damaged = r["damaged"].as_array().unwrap();
    assert_eq!(damaged.len(), 2, "{r}");
    let d = damaged.iter().find(|d| d["path"] == "/victim").unwrap();
    assert_eq!(d["action"], "partial");
    assert_eq!(d["copied_as"], "/victim.partial");
    let l = damaged
        .iter()
        .find(|d| d["path"] == "/dir/victim-link")
        .unwrap();
    // The directory already has victim-link.partial: the next free name.
    assert_eq!(l["copied_as"], "/dir/victim-link.partial.2", "{r}");
    let zeroed: Vec<(u64, u64)> = d["zeroed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|z| (z[0].as_u64().unwrap(), z[1].as_u64().unwrap()))
        .collect();
    let lost: u64 = zeroed.iter().map(|(a, b)| b - a).sum();
    assert!(lost > 0 && lost <= 128 << 10, "{zeroed:?}");
    let copy = fs::read(dest.join("victim.partial")).unwrap();
    assert_eq!(copy.len(), victim.len());
    let mut pos = 0usize;
    for &(a, b) in &zeroed {
        let (a, b) = (a as usize, b as usize);
        assert!(
            copy[pos..a] == victim[pos..a],
            "good blocks before {a} intact"
        );
        assert!(copy[a..b].iter().all(|&x| x == 0), "zeros in {a}..{b}");
        pos = b;
    }
    assert!(copy[pos..] == victim[pos..]);
    let (m1, m2) = (
        fs::metadata(dest.join("victim.partial")).unwrap(),
        fs::metadata(dest.join("dir/victim-link.partial.2")).unwrap(),
    );
    assert_eq!(m1.ino(), m2.ino(), "hard links stay linked");
    assert_eq!(m1.nlink(), 2);
    assert!(!dest.join("victim").exists());
    check_bystanders(&dest);
}

#[test]
fn salvage_refuses_a_dest_that_is_not_new_or_empty() {
    let env = Env::new();
    let dest = env.root().join("full");
    fs::create_dir(&dest).unwrap();
    fs::write(dest.join("keep"), b"mine").unwrap();
    let o = salvage(&env, &dest, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("is not empty") && err.lines().count() == 1,
        "{err}"
    );
    let names: Vec<_> = fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["keep"]);
    assert_eq!(fs::read(dest.join("keep")).unwrap(), b"mine");

    // A file, a path whose parent is missing, a place inside the volume.
    let file = env.root().join("file");
    fs::write(&file, b"x").unwrap();
    for (d, msg) in [
        (file.clone(), "not a directory"),
        (
            env.root().join("no/such/dir"),
            "parent directory does not exist",
        ),
        (env.vol.join("inside"), "inside the volume directory"),
    ] {
        let o = salvage(&env, &d, &[]);
        assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(msg),
            "{}",
            output_text(&o)
        );
    }
    assert_eq!(fs::read(&file).unwrap(), b"x");
    assert!(!env.vol.join("inside").exists());

    // An empty DEST is fine; an unknown snapshot creates nothing.
    let empty = env.root().join("empty");
    fs::create_dir(&empty).unwrap();
    let o = salvage(&env, &empty, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    let new = env.root().join("new");
    let o = salvage(&env, &new, &["--snapshot", "nope"]);
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no snapshot named"),
        "{}",
        output_text(&o)
    );
    assert!(!new.exists());
}

#[test]
fn salvage_of_a_snapshot_and_of_a_mounted_volume() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    fs::write(m.p("a"), b"v1").unwrap();
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/kept"), pattern(200_000, 7)).unwrap();
    File::open(m.p("a")).unwrap().sync_all().unwrap();
    assert_eq!(m.unmount(), Some(0));
    env.ok(&["snapshot", "create", env.vol_str(), "s1"]);

    let m = env.mount();
    fs::write(m.p("a"), b"v2, after the snapshot").unwrap();
    fs::write(m.p("b"), b"new").unwrap();
    fs::remove_file(m.p("d/kept")).unwrap();
    File::open(m.p("b")).unwrap().sync_all().unwrap();
    File::open(m.p("a")).unwrap().sync_all().unwrap();

    // While mounted read-write: the snapshot, and the live tree as committed.
    let snap = env.root().join("snap");
    let o = salvage(&env, &snap, &["--snapshot", "s1"]);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("(snapshot s1)"));
    assert_eq!(fs::read(snap.join("a")).unwrap(), b"v1");
    assert_eq!(fs::read(snap.join("d/kept")).unwrap(), pattern(200_000, 7));
    assert!(!snap.join("b").exists());

    let live = env.root().join("live");
    let o = salvage(&env, &live, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    assert_eq!(fs::read(live.join("a")).unwrap(), b"v2, after the snapshot");
    assert_eq!(fs::read(live.join("b")).unwrap(), b"new");
    assert!(!live.join("d/kept").exists() && live.join("d").is_dir());
    assert_eq!(m.unmount(), Some(0));
}
