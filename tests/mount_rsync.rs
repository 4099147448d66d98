//! rsync `-aHAXS --numeric-ids` of a generated tree into the mount (hard
//! links, symlinks, xattrs, POSIX ACLs, sparse files, fifos, varied modes,
//! owners and times), then proof that nothing differs: a checksum dry run
//! lists nothing, and a walk of both trees finds the same metadata and xattrs.

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::{Env, output_text, pattern, sh};

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn set_times(p: &Path, secs: i64, nanos: i64) {
    let t = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        },
    ];
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

/// All xattrs of a path (not following symlinks), including ACLs.
fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    // SAFETY: size probe, then reads into buffers of the probed size.
    unsafe {
        let len = libc::llistxattr(c(p).as_ptr(), std::ptr::null_mut(), 0);
        assert!(len >= 0);
        let mut names = vec![0u8; len as usize];
        libc::llistxattr(c(p).as_ptr(), names.as_mut_ptr().cast(), names.len());
        for n in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            let cn = CString::new(n).unwrap();
            let vl = libc::lgetxattr(c(p).as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0);
            assert!(vl >= 0);
            let mut v = vec![0u8; vl as usize];
            libc::lgetxattr(c(p).as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len());
            out.insert(String::from_utf8_lossy(n).into_owned(), v);
        }
    }
    out
}

#[derive(Debug, PartialEq)]
struct Node {
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    size: u64,
    mtime: (i64, i64),
    link: Option<std::path::PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn walk(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if md.is_dir() {
                stack.push(p.clone());
            }
            out.insert(
                rel,
                Node {
                    mode: md.mode(),
                    uid: md.uid(),
                    gid: md.gid(),
                    nlink: if md.is_dir() { 0 } else { md.nlink() },
                    size: if md.is_dir() { 0 } else { md.size() },
                    mtime: (md.mtime(), md.mtime_nsec()),
                    link: md
                        .file_type()
                        .is_symlink()
                        .then(|| fs::read_link(&p).unwrap()),
                    xattrs: xattrs(&p),
                },
            );
        }
    }
    out
}

/// A tree with everything rsync -aHAXS carries.
fn generate(src: &Path) {
    fs::create_dir_all(src.join("docs/deep/er")).unwrap();
    fs::create_dir_all(src.join("private")).unwrap();
    fs::create_dir_all(src.join("shared")).unwrap();
    fs::create_dir_all(src.join("empty")).unwrap();
    let files: &[(&str, usize, u32, u32, u32)] = &[
        ("docs/readme.txt", 1200, 0o644, 0, 0),
        ("docs/deep/er/data.bin", 300_000, 0o600, 1234, 5678),
        ("docs/deep/script.sh", 900, 0o755, 1000, 1000),
        ("private/secret", 70_000, 0o400, 0, 0),
        ("shared/setuid-tool", 5000, 0o4755, 0, 0),
        ("shared/group-file", 65536, 0o2664, 1000, 2000),
        ("empty-file", 0, 0o664, 1000, 1000),
        ("odd perms", 10, 0o707, 42, 43),
    ];
    for (i, (name, len, mode, uid, gid)) in files.iter().enumerate() {
        let p = src.join(name);
        fs::write(&p, pattern(*len, i as u64 + 1)).unwrap();
        lchown(&p, *uid, *gid);
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
    }
    // Hard links across directories.
    fs::hard_link(src.join("docs/readme.txt"), src.join("shared/readme-link")).unwrap();
    fs::hard_link(
        src.join("docs/readme.txt"),
        src.join("docs/deep/readme-link2"),
    )
    .unwrap();
    // Symlinks: relative, absolute, dangling, with their own owners.
    std::os::unix::fs::symlink("../docs/readme.txt", src.join("shared/rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", src.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", src.join("dangling")).unwrap();
    lchown(&src.join("dangling"), 777, 888);
    // A sparse file: 64 MiB with three data islands.
    let mut f = File::create(src.join("sparse.img")).unwrap();
    f.set_len(64 << 20).unwrap();
    for off in [0u64, 20 << 20, (64 << 20) - 5000] {
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&pattern(5000, off)).unwrap();
    }
    drop(f);
    // A fifo.
    // SAFETY: valid path.
    assert_eq!(
        unsafe { libc::mkfifo(c(&src.join("fifo")).as_ptr(), 0o620) },
        0
    );
    // Xattrs on files and directories (one large).
    setx(&src.join("docs/readme.txt"), "user.comment", b"hello");
    setx(
        &src.join("docs/readme.txt"),
        "user.checksum",
        b"\x00\x01\x02binary",
    );
    setx(&src.join("docs"), "user.dir-tag", b"d");
    setx(&src.join("private/secret"), "user.big", &pattern(3000, 77)); // ext4 limit: one block
    // POSIX ACLs: access ACLs and a default ACL.
    sh(&format!(
        "setfacl -m u:1234:rw-,g:5678:r--,m::rw- '{}'",
        src.join("docs/deep/er/data.bin").display()
    ));
    sh(&format!(
        "setfacl -m u:1000:r-x '{}'",
        src.join("private").display()
    ));
    sh(&format!(
        "setfacl -d -m u:1234:rwx,g::r-x,o::- '{}'",
        src.join("shared").display()
    ));
    // Directory modes and owners.
    fs::set_permissions(src.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(src.join("shared"), fs::Permissions::from_mode(0o3777)).unwrap();
    lchown(&src.join("shared"), 1000, 2000);
    // Times with nanoseconds, last (changes above touch directory mtimes).
    let mut all: Vec<_> = walk(src).into_keys().collect();
    all.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    for (i, rel) in all.iter().enumerate() {
        set_times(
            &src.join(rel),
            1_500_000_000 + i as i64 * 86_401,
            (i as i64 * 123_456_789) % 1_000_000_000,
        );
    }
}

#[test]
fn rsync_round_trip_preserves_everything() {
    require_fuse!();
    common::require_root("the rsync test (chown to other owners)");
    let env = Env::new();
    let src = env.root().join("src");
    fs::create_dir(&src).unwrap();
    generate(&src);
    let m = env.mount();
    let dst = m.p("dst");
    let rsync = |args: &[&str]| {
        let o = Command::new("rsync")
            .args(args)
            .arg(format!("{}/", src.display()))
            .arg(format!("{}/", dst.display()))
            .output()
            .unwrap();
        assert!(o.status.success(), "rsync {args:?}: {}", output_text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    rsync(&["-aHAXS", "--numeric-ids"]);
    // `committed`: everything is committed (after a remount), so st_blocks
    // counts every stored block; before, blocks still buffered are not counted.
    let check = |dst: &Path, committed: bool| {
        let diff = rsync(&["-n", "-aHAXS", "--checksum", "--numeric-ids", "-i"]);
        assert!(
            diff.trim().is_empty(),
            "rsync dry run found differences:\n{diff}"
        );
        let (a, b) = (walk(&src), walk(dst));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (k, na) in &a {
            assert_eq!(na, &b[k], "{k} differs");
        }
        assert_eq!(b["docs/readme.txt"].nlink, 3);
        assert!(b["shared"].xattrs.contains_key("system.posix_acl_default"));
        assert!(
            b["docs/deep/er/data.bin"]
                .xattrs
                .contains_key("system.posix_acl_access")
        );
        let sparse = fs::metadata(dst.join("sparse.img")).unwrap();
        assert!(
            sparse.blocks() * 512 < 4 << 20 && (!committed || sparse.blocks() > 0),
            "sparse file allocates {} bytes",
            sparse.blocks() * 512
        );
    };
    check(&dst, false);
    m.unmount();
    // Still identical after a remount, and fsck is clean.
    env.assert_fsck_clean();
    let m = env.mount();
    check(&m.p("dst"), true);
    m.unmount();
}
