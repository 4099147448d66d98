//! POSIX behaviour through a real mount: links, symlinks, rename variants,
//! attributes with nanoseconds, truncate, sparse files, fallocate, xattrs,
//! statfs, fsync, long names, fifos, locks and unlinked-but-open files.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use common::{Env, errno_of, pattern};

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn check(r: libc::c_int, what: &str) {
    assert!(r == 0, "{what}: {}", std::io::Error::last_os_error());
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

fn renameat2(a: &Path, b: &Path, flags: libc::c_uint) -> Result<(), i32> {
    // SAFETY: valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c(a).as_ptr(),
            libc::AT_FDCWD,
            c(b).as_ptr(),
            flags,
        )
    };
    if r == 0 { Ok(()) } else { Err(last_errno()) }
}

fn xattr_get(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let n = CString::new(name).unwrap();
    // SAFETY: a size-0 probe with a null buffer, then a read into a buffer of that size.
    let len = unsafe { libc::getxattr(c(p).as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    if len < 0 {
        return Err(last_errno());
    }
    let mut buf = vec![0u8; len as usize];
    // SAFETY: buf has room for len bytes.
    let got = unsafe {
        libc::getxattr(
            c(p).as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if got < 0 {
        return Err(last_errno());
    }
    buf.truncate(got as usize);
    Ok(buf)
}

fn xattr_set(p: &Path, name: &str, v: &[u8], flags: i32) -> Result<(), i32> {
    let n = CString::new(name).unwrap();
    // SAFETY: valid path, name and value buffer.
    let r = unsafe { libc::setxattr(c(p).as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), flags) };
    if r == 0 { Ok(()) } else { Err(last_errno()) }
}

fn xattr_list(p: &Path) -> Vec<String> {
    // SAFETY: size probe, then a read into a buffer of that size.
    let len = unsafe { libc::listxattr(c(p).as_ptr(), std::ptr::null_mut(), 0) };
    assert!(len >= 0);
    let mut buf = vec![0u8; len as usize];
    // SAFETY: buf has room for len bytes.
    let got = unsafe { libc::listxattr(c(p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(got, len);
    let mut v: Vec<String> = buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn hard_links_and_link_counts() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    fs::write(m.p("a"), b"shared").unwrap();
    fs::hard_link(m.p("a"), m.p("b")).unwrap();
    fs::create_dir(m.p("d")).unwrap();
    fs::hard_link(m.p("a"), m.p("d/c")).unwrap();
    let md = fs::metadata(m.p("a")).unwrap();
    assert_eq!(md.nlink(), 3);
    assert_eq!(fs::metadata(m.p("d/c")).unwrap().ino(), md.ino());
    fs::write(m.p("b"), b"changed via b").unwrap();
    assert_eq!(fs::read(m.p("d/c")).unwrap(), b"changed via b");
    fs::remove_file(m.p("a")).unwrap();
    assert_eq!(fs::metadata(m.p("b")).unwrap().nlink(), 2);
    // Directories: "." and each subdirectory's ".." count.
    assert_eq!(fs::metadata(m.p("d")).unwrap().nlink(), 2);
    fs::create_dir(m.p("d/sub")).unwrap();
    assert_eq!(fs::metadata(m.p("d")).unwrap().nlink(), 3);
    assert_eq!(
        errno_of(&fs::hard_link(m.p("d"), m.p("dl")).unwrap_err()),
        libc::EPERM
    );
    m.unmount();
    let m = env.mount();
    assert_eq!(fs::metadata(m.p("b")).unwrap().nlink(), 2);
    assert_eq!(fs::read(m.p("d/c")).unwrap(), b"changed via b");
    m.unmount();
    env.assert_fsck_clean();
}

#[test]
fn symlinks() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    fs::create_dir(m.p("dir")).unwrap();
    fs::write(m.p("dir/file"), b"x").unwrap();
    std::os::unix::fs::symlink("dir", m.p("ln")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", m.p("dangling")).unwrap();
    let long = "t".repeat(4000);
    std::os::unix::fs::symlink(&long, m.p("long")).unwrap();
    assert_eq!(fs::read_link(m.p("ln")).unwrap(), Path::new("dir"));
    assert_eq!(fs::read_link(m.p("long")).unwrap(), Path::new(&long));
    assert!(
        fs::symlink_metadata(m.p("ln"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::symlink_metadata(m.p("ln")).unwrap().len(), 3);
    assert_eq!(fs::read(m.p("ln/file")).unwrap(), b"x");
    assert_eq!(
        errno_of(&fs::read(m.p("dangling")).unwrap_err()),
        libc::ENOENT
    );
    // lchown changes the link, not the target.
    check(
        unsafe { libc::lchown(c(&m.p("ln")).as_ptr(), 4321, 8765) },
        "lchown",
    );
    assert_eq!(fs::symlink_metadata(m.p("ln")).unwrap().uid(), 4321);
    assert_eq!(fs::metadata(m.p("ln")).unwrap().uid(), 0);
    m.unmount();
    let m = env.mount();
    assert_eq!(
        fs::read_link(m.p("dangling")).unwrap(),
        Path::new("/nonexistent/target")
    );
    assert_eq!(fs::read_link(m.p("long")).unwrap(), Path::new(&long));
    m.unmount();
}

#[test]
fn rename_variants() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    fs::write(m.p("a"), b"A").unwrap();
    fs::write(m.p("b"), b"B").unwrap();
    fs::create_dir_all(m.p("d1/inner")).unwrap();
    fs::create_dir(m.p("d2")).unwrap();
    fs::create_dir(m.p("empty")).unwrap();

    // Plain, and across directories.
    fs::rename(m.p("a"), m.p("a2")).unwrap();
    assert!(!m.p("a").exists());
    fs::rename(m.p("a2"), m.p("d2/a3")).unwrap();
    assert_eq!(fs::read(m.p("d2/a3")).unwrap(), b"A");
    // Over an existing file: the target's inode goes away.
    let b_ino = fs::metadata(m.p("b")).unwrap().ino();
    fs::write(m.p("c"), b"C").unwrap();
    fs::rename(m.p("c"), m.p("b")).unwrap();
    assert_eq!(fs::read(m.p("b")).unwrap(), b"C");
    assert_ne!(fs::metadata(m.p("b")).unwrap().ino(), b_ino);
    // Directory over an empty directory, and not over a non-empty one.
    fs::rename(m.p("empty"), m.p("d2/moved")).unwrap();
    let e = renameat2(&m.p("d2"), &m.p("d1"), 0).unwrap_err();
    assert!(e == libc::ENOTEMPTY || e == libc::EEXIST, "{e}");
    assert_eq!(
        renameat2(&m.p("d1"), &m.p("d1/inner/x"), 0).unwrap_err(),
        libc::EINVAL
    );
    // RENAME_NOREPLACE.
    fs::write(m.p("x"), b"X").unwrap();
    assert_eq!(
        renameat2(&m.p("x"), &m.p("b"), libc::RENAME_NOREPLACE).unwrap_err(),
        libc::EEXIST
    );
    renameat2(&m.p("x"), &m.p("y"), libc::RENAME_NOREPLACE).unwrap();
    // RENAME_EXCHANGE: files, and a file with a directory in another parent.
    renameat2(&m.p("y"), &m.p("b"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(m.p("y")).unwrap(), b"C");
    assert_eq!(fs::read(m.p("b")).unwrap(), b"X");
    renameat2(&m.p("y"), &m.p("d1/inner"), libc::RENAME_EXCHANGE).unwrap();
    assert!(m.p("y").is_dir());
    assert_eq!(fs::read(m.p("d1/inner")).unwrap(), b"C");
    assert_eq!(
        renameat2(&m.p("nope"), &m.p("b"), libc::RENAME_EXCHANGE).unwrap_err(),
        libc::ENOENT
    );
    // Link counts of parents after moving a directory between them.
    assert_eq!(fs::metadata(m.p("d2")).unwrap().nlink(), 3);
    assert_eq!(fs::metadata(m.p("d1")).unwrap().nlink(), 2);
    m.unmount();
    env.assert_fsck_clean();
}

/// Names stay valid in the kernel for long (ENTRY_TTL, an hour), missing names
/// included (negative entries): every change made through the mount must show
/// at once through the names the kernel has cached, positive and negative.
#[test]
fn cached_names_follow_every_change_at_once() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    let enoent = |p: &Path| errno_of(&fs::symlink_metadata(p).unwrap_err());
    // A missing name, asked twice (the second answer comes from the kernel's
    // negative entry), then created: it exists at once.
    assert_eq!(enoent(&m.p("n")), libc::ENOENT);
    assert_eq!(enoent(&m.p("n")), libc::ENOENT);
    fs::write(m.p("n"), b"N").unwrap();
    assert_eq!(fs::read(m.p("n")).unwrap(), b"N");
    // Rename of a cached name: the old name is gone, the new one is the inode.
    fs::write(m.p("a"), b"A").unwrap();
    let ino = fs::metadata(m.p("a")).unwrap().ino();
    assert_eq!(enoent(&m.p("b")), libc::ENOENT);
    fs::rename(m.p("a"), m.p("b")).unwrap();
    assert_eq!(enoent(&m.p("a")), libc::ENOENT);
    assert_eq!(fs::metadata(m.p("b")).unwrap().ino(), ino);
    // A chmod shows at once.
    fs::set_permissions(m.p("b"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(m.p("b")).unwrap().mode() & 0o7777, 0o640);
    // Hard links: both names and the link count.
    fs::hard_link(m.p("b"), m.p("c")).unwrap();
    assert_eq!(fs::metadata(m.p("b")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(m.p("c")).unwrap().ino(), ino);
    fs::remove_file(m.p("c")).unwrap();
    assert_eq!(enoent(&m.p("c")), libc::ENOENT);
    assert_eq!(fs::metadata(m.p("b")).unwrap().nlink(), 1);
    // Unlink, then a new file under the same name: a new inode.
    fs::remove_file(m.p("b")).unwrap();
    assert_eq!(enoent(&m.p("b")), libc::ENOENT);
    fs::write(m.p("b"), b"B2").unwrap();
    assert_ne!(fs::metadata(m.p("b")).unwrap().ino(), ino);
    assert_eq!(fs::read(m.p("b")).unwrap(), b"B2");
    // Exchange of two cached names.
    renameat2(&m.p("b"), &m.p("n"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(m.p("b")).unwrap(), b"N");
    assert_eq!(fs::read(m.p("n")).unwrap(), b"B2");
    // Directories: rmdir of a cached, then emptied directory; a new one under
    // the same name is empty.
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/f"), b"F").unwrap();
    assert!(m.p("d/f").exists());
    assert_eq!(
        errno_of(&fs::remove_dir(m.p("d")).unwrap_err()),
        libc::ENOTEMPTY
    );
    fs::remove_file(m.p("d/f")).unwrap();
    fs::remove_dir(m.p("d")).unwrap();
    assert_eq!(enoent(&m.p("d")), libc::ENOENT);
    assert_eq!(enoent(&m.p("d/f")), libc::ENOENT);
    fs::create_dir(m.p("d")).unwrap();
    assert_eq!(enoent(&m.p("d/f")), libc::ENOENT);
    assert_eq!(fs::read_dir(m.p("d")).unwrap().count(), 0);
    // A directory moved away: names under it follow it.
    fs::write(m.p("d/g"), b"G").unwrap();
    fs::rename(m.p("d"), m.p("e")).unwrap();
    assert_eq!(enoent(&m.p("d/g")), libc::ENOENT);
    assert_eq!(fs::read(m.p("e/g")).unwrap(), b"G");
    m.unmount();
    // The volume agrees with what the kernel showed.
    let m = env.mount();
    let mut names: Vec<String> = fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["b", "e", "n"]);
    assert_eq!(fs::read(m.p("e/g")).unwrap(), b"G");
    m.unmount();
    env.assert_fsck_clean();
}

/// st_blocks changes when the daemon's commit writes buffered data back, with
/// no request in between: the kernel's cached attributes must not hide it for
/// long (ATTR_TTL is short for this reason), so `du` sees the allocation soon
/// after the data is committed, fsync or not.
#[test]
fn allocation_shows_after_the_idle_commit_without_fsync() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    let p = m.p("f");
    fs::write(&p, pattern(200_000, 3)).unwrap();
    // The kernel caches the attributes of before the write-back now.
    let first = fs::metadata(&p).unwrap();
    assert_eq!(first.len(), 200_000);
    // The idle commit follows 0.5 s after the writes; wait up to 30 s for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let b = fs::metadata(&p).unwrap().blocks();
        if b >= 200_000 / 512 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "st_blocks still {b} 30 s after the write"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    m.unmount();
}

#[test]
fn attributes_with_nanoseconds_persist() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    let f = m.p("f");
    fs::write(&f, b"content").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o4751)).unwrap();
    std::os::unix::fs::chown(&f, Some(1234), Some(5678)).unwrap();
    let times = [
        libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 123_456_789,
        },
        libc::timespec {
            tv_sec: 1_600_000_000,
            tv_nsec: 987_654_321,
        },
    ];
    // SAFETY: valid path and a two-element timespec array.
    check(
        unsafe { libc::utimensat(libc::AT_FDCWD, c(&f).as_ptr(), times.as_ptr(), 0) },
        "utimensat",
    );
    let check_attrs = |p: &Path| {
        let md = fs::metadata(p).unwrap();
        // chown after chmod dropped set-uid, as local filesystems do.
        assert_eq!(md.mode() & 0o7777, 0o751);
        assert_eq!((md.uid(), md.gid()), (1234, 5678));
        assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_000, 123_456_789));
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_600_000_000, 987_654_321));
    };
    check_attrs(&f);
    fs::set_permissions(&f, fs::Permissions::from_mode(0o2644)).unwrap();
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o2644);
    fs::set_permissions(&f, fs::Permissions::from_mode(0o751)).unwrap();
    // UTIME_NOW for mtime only.
    let before = fs::metadata(&f).unwrap().ctime();
    let now = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
    ];
    fs::write(m.p("g"), b"").unwrap();
    // SAFETY: valid path and a two-element timespec array.
    check(
        unsafe { libc::utimensat(libc::AT_FDCWD, c(&m.p("g")).as_ptr(), now.as_ptr(), 0) },
        "utimensat now",
    );
    assert!(fs::metadata(m.p("g")).unwrap().mtime() >= before);
    // SAFETY: restore the exact times on f.
    check(
        unsafe { libc::utimensat(libc::AT_FDCWD, c(&f).as_ptr(), times.as_ptr(), 0) },
        "utimensat",
    );
    m.unmount();
    let m = env.mount();
    check_attrs(&m.p("f"));
    m.unmount();
}

#[test]
fn truncate_and_sparse_files() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    let p = m.p("t");
    fs::write(&p, pattern(200_000, 3)).unwrap();
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(70_000).unwrap();
    f.set_len(300_000).unwrap();
    drop(f);
    let data = fs::read(&p).unwrap();
    assert_eq!(data.len(), 300_000);
    assert_eq!(&data[..70_000], &pattern(200_000, 3)[..70_000]);
    assert!(
        data[70_000..].iter().all(|b| *b == 0),
        "truncated tail must read as zeros"
    );
    // O_TRUNC.
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 0);

    // A 1 GiB sparse file costs almost nothing.
    let before: u64 = dir_bytes(&env.vol);
    let s = m.p("sparse");
    let mut f = File::create(&s).unwrap();
    f.set_len(1 << 30).unwrap();
    f.seek(SeekFrom::Start((1 << 30) - 4096)).unwrap();
    f.write_all(&[7u8; 4096]).unwrap();
    f.seek(SeekFrom::Start(512 << 20)).unwrap();
    f.write_all(b"middle").unwrap();
    f.sync_all().unwrap();
    drop(f);
    let md = fs::metadata(&s).unwrap();
    assert_eq!(md.len(), 1 << 30);
    // Two 64 KiB blocks hold the data; the rest is holes.
    assert_eq!(
        md.blocks() * 512,
        128 << 10,
        "sparse file allocates {} bytes",
        md.blocks() * 512
    );
    let grown = dir_bytes(&env.vol) - before;
    assert!(
        grown < 4 << 20,
        "the backing store grew by {grown} bytes for a sparse file"
    );
    let mut f = File::open(&s).unwrap();
    let mut buf = vec![1u8; 65536];
    f.seek(SeekFrom::Start(100 << 20)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0), "holes read as zeros");
    f.seek(SeekFrom::Start(512 << 20)).unwrap();
    let mut mid = [0u8; 6];
    f.read_exact(&mut mid).unwrap();
    assert_eq!(&mid, b"middle");
    f.seek(SeekFrom::Start((1 << 30) - 4096)).unwrap();
    f.read_exact(&mut buf[..4096]).unwrap();
    assert!(buf[..4096].iter().all(|b| *b == 7));
    drop(f);
    m.unmount();
    env.assert_fsck_clean();
}

fn dir_bytes(p: &Path) -> u64 {
    let mut n = 0;
    for e in fs::read_dir(p).unwrap().flatten() {
        let md = e.metadata().unwrap();
        n += if md.is_dir() {
            dir_bytes(&e.path())
        } else {
            md.blocks() * 512
        };
    }
    n
}

#[test]
fn fallocate_modes() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    let p = m.p("fa");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    let fd = f.as_raw_fd();
    // SAFETY: fallocate on an open descriptor.
    check(unsafe { libc::fallocate(fd, 0, 0, 1 << 20) }, "fallocate");
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    // SAFETY: as above.
    check(
        unsafe { libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, 0, 4 << 20) },
        "keep size",
    );
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    let data = pattern(1 << 20, 9);
    (&f).write_all(&data).unwrap();
    f.sync_all().unwrap();
    // fsync makes the daemon drop the kernel's cached attributes: st_blocks
    // is exact at once (1 MiB of data in 64 KiB blocks).
    let blocks_before = f.metadata().unwrap().blocks();
    assert_eq!(blocks_before * 512, 1 << 20, "st_blocks right after fsync");
    // Punch 256 KiB out of the middle (block-aligned for the default 64 KiB blocks).
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: as above.
    check(
        unsafe { libc::fallocate(fd, mode, 256 << 10, 256 << 10) },
        "punch hole",
    );
    // And an unaligned zero range.
    // SAFETY: as above.
    check(
        unsafe { libc::fallocate(fd, libc::FALLOC_FL_ZERO_RANGE, 1000, 3000) },
        "zero range",
    );
    f.sync_all().unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    // The punched 256 KiB are free at once (the zeroed range lies inside a
    // block that stays), seen through both the descriptor and the path.
    assert_eq!(f.metadata().unwrap().blocks() * 512, 768 << 10);
    assert_eq!(fs::metadata(&p).unwrap().blocks() * 512, 768 << 10);
    drop(f);
    let got = fs::read(&p).unwrap();
    let mut want = data.clone();
    want[256 << 10..512 << 10].fill(0);
    want[1000..4000].fill(0);
    assert!(got == want, "content after punch hole / zero range differs");
    m.unmount();
    env.assert_fsck_clean();
}

#[test]
fn extended_attributes() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    let p = m.p("x");
    fs::write(&p, b"").unwrap();
    fs::create_dir(m.p("dir")).unwrap();
    xattr_set(&p, "user.small", b"v1", 0).unwrap();
    let big = pattern(60_000, 4);
    xattr_set(&p, "user.big", &big, 0).unwrap();
    xattr_set(&m.p("dir"), "user.ondir", b"d", 0).unwrap();
    assert_eq!(xattr_get(&p, "user.small").unwrap(), b"v1");
    assert_eq!(xattr_get(&p, "user.big").unwrap(), big);
    assert_eq!(
        xattr_set(&p, "user.small", b"v2", libc::XATTR_CREATE).unwrap_err(),
        libc::EEXIST
    );
    assert_eq!(
        xattr_set(&p, "user.none", b"v", libc::XATTR_REPLACE).unwrap_err(),
        libc::ENODATA
    );
    xattr_set(&p, "user.small", b"v2", libc::XATTR_REPLACE).unwrap();
    assert_eq!(xattr_get(&p, "user.missing").unwrap_err(), libc::ENODATA);
    assert_eq!(xattr_list(&p), vec!["user.big", "user.small"]);
    // A too-small buffer is ERANGE.
    let n = CString::new("user.small").unwrap();
    let mut one = [0u8; 1];
    // SAFETY: a one-byte buffer, size 1.
    let r = unsafe { libc::getxattr(c(&p).as_ptr(), n.as_ptr(), one.as_mut_ptr().cast(), 1) };
    assert_eq!((r, last_errno()), (-1, libc::ERANGE));
    // SAFETY: valid path and name.
    check(
        unsafe { libc::removexattr(c(&p).as_ptr(), n.as_ptr()) },
        "removexattr",
    );
    assert_eq!(xattr_list(&p), vec!["user.big"]);
    m.unmount();
    let m = env.mount();
    assert_eq!(xattr_get(&m.p("x"), "user.big").unwrap(), big);
    assert_eq!(xattr_get(&m.p("dir"), "user.ondir").unwrap(), b"d");
    m.unmount();
}

/// A node without an SELinux label answers EOPNOTSUPP for it (what a FUSE
/// mount answers under SELinux; `ls -l` then stops asking for every entry),
/// other missing names ENODATA; a label that is set is kept and read back.
#[test]
fn selinux_label_absent_is_unsupported_and_a_set_one_is_kept() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    let p = m.p("x");
    fs::write(&p, b"").unwrap();
    fs::create_dir(m.p("dir")).unwrap();
    for f in [&p, &m.p("dir"), &m.path] {
        assert_eq!(
            xattr_get(f, "security.selinux").unwrap_err(),
            libc::EOPNOTSUPP
        );
        assert_eq!(xattr_get(f, "security.other").unwrap_err(), libc::ENODATA);
        assert_eq!(xattr_get(f, "user.missing").unwrap_err(), libc::ENODATA);
    }
    // Other xattrs keep working (the kernel did not give up on xattrs).
    xattr_set(&p, "user.a", b"1", 0).unwrap();
    assert_eq!(xattr_get(&p, "user.a").unwrap(), b"1");
    let label = b"system_u:object_r:user_home_t:s0\0";
    xattr_set(&p, "security.selinux", label, 0).unwrap();
    assert_eq!(xattr_get(&p, "security.selinux").unwrap(), label);
    assert!(xattr_list(&p).contains(&"security.selinux".to_string()));
    m.unmount();
    let m = env.mount();
    assert_eq!(xattr_get(&m.p("x"), "security.selinux").unwrap(), label);
    assert_eq!(
        xattr_get(&m.p("dir"), "security.selinux").unwrap_err(),
        libc::EOPNOTSUPP
    );
    m.unmount();
}

#[test]
fn statfs_fsync_names_fifos_locks() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    // statfs.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    check(
        unsafe { libc::statvfs(c(&m.path).as_ptr(), &mut s) },
        "statvfs",
    );
    assert_eq!(s.f_bsize, 65536);
    assert_eq!(s.f_namemax, 255);
    assert!(s.f_blocks > 0 && s.f_bfree > 0 && s.f_bfree <= s.f_blocks);

    // fsync / fdatasync / syncfs-free paths.
    let mut f = File::create(m.p("synced")).unwrap();
    f.write_all(b"abc").unwrap();
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    let d = File::open(&m.path).unwrap();
    d.sync_all().unwrap();

    // 255-byte names work, 256 fail.
    let n255 = "n".repeat(255);
    fs::write(m.p(&n255), b"ok").unwrap();
    assert_eq!(fs::read(m.p(&n255)).unwrap(), b"ok");
    assert!(
        fs::read_dir(&m.path)
            .unwrap()
            .any(|e| e.unwrap().file_name().len() == 255)
    );
    let n256 = "n".repeat(256);
    assert_eq!(
        errno_of(&fs::write(m.p(&n256), b"x").unwrap_err()),
        libc::ENAMETOOLONG
    );

    // mknod: a fifo.
    // SAFETY: valid path.
    check(
        unsafe { libc::mkfifo(c(&m.p("fifo")).as_ptr(), 0o640) },
        "mkfifo",
    );
    let md = fs::symlink_metadata(m.p("fifo")).unwrap();
    assert!(md.file_type().is_fifo());
    assert_eq!(md.mode() & 0o777, 0o640);

    // flock and fcntl locks are enforced between open files.
    let a = File::open(m.p("synced")).unwrap();
    let b = File::open(m.p("synced")).unwrap();
    // SAFETY: flock on open descriptors.
    check(
        unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        "flock a",
    );
    // SAFETY: as above.
    let r = unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!((r, last_errno()), (-1, libc::EWOULDBLOCK));
    // SAFETY: as above.
    check(
        unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_UN) },
        "unlock",
    );
    let w = OpenOptions::new().write(true).open(m.p("synced")).unwrap();
    let lk = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: 0,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: fcntl F_SETLK with a valid flock struct.
    check(
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETLK, &lk) },
        "fcntl lock",
    );
    drop((a, b, w, f, d));
    m.unmount();
}

#[test]
fn unlinked_open_files_and_many_entries() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("tmp"))
        .unwrap();
    f.write_all(b"still here").unwrap();
    fs::remove_file(m.p("tmp")).unwrap();
    assert!(!m.p("tmp").exists());
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    f.write_all(b" and more").unwrap();
    f.sync_all().unwrap();
    drop(f);

    // Directory listings: every entry exactly once, across several readdir calls.
    fs::create_dir(m.p("many")).unwrap();
    for i in 0..1500 {
        File::create(m.p(&format!("many/file-with-a-longish-name-{i:05}"))).unwrap();
    }
    let mut names: Vec<String> = fs::read_dir(m.p("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 1500);
    assert_eq!(
        errno_of(&fs::remove_dir(m.p("many")).unwrap_err()),
        libc::ENOTEMPTY
    );

    // Appends and setgid directories.
    let mut a = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(m.p("log"))
        .unwrap();
    a.write_all(b"1").unwrap();
    a.write_all(b"2").unwrap();
    drop(a);
    assert_eq!(fs::read(m.p("log")).unwrap(), b"12");
    fs::create_dir(m.p("sg")).unwrap();
    std::os::unix::fs::chown(m.p("sg"), None, Some(777)).unwrap();
    fs::set_permissions(m.p("sg"), fs::Permissions::from_mode(0o2775)).unwrap();
    fs::write(m.p("sg/f"), b"").unwrap();
    fs::create_dir(m.p("sg/d")).unwrap();
    assert_eq!(fs::metadata(m.p("sg/f")).unwrap().gid(), 777);
    assert_eq!(fs::metadata(m.p("sg/d")).unwrap().mode() & 0o2000, 0o2000);
    m.unmount();
    env.assert_fsck_clean();
}

/// `du` on the mount counts what files really use: small files cost their
/// size rounded up to 4 KiB (the stored granularity), not a whole 64 KiB
/// block, and holes cost nothing.
#[test]
fn du_counts_what_files_use() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    fs::create_dir(m.p("d")).unwrap();
    let mut want = 0u64;
    for i in 0..300u64 {
        let len = 1 + (i * 7919) % 20_000;
        fs::write(m.p(&format!("d/f{i}")), pattern(len as usize, i)).unwrap();
        want += len.div_ceil(4096) * 4096;
    }
    // 1 MiB of data, then a hole to 64 MiB.
    let f = File::create(m.p("d/sparse")).unwrap();
    (&f).write_all(&pattern(1 << 20, 1)).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    want += 1 << 20;
    // After a remount everything is committed, so allocation is exact.
    m.unmount();
    let m = env.mount();
    let out = common::sh(&format!("du -s -B1 '{}'", m.p("d").display()));
    let got: u64 = out.split_whitespace().next().unwrap().parse().unwrap();
    // du also counts the directory itself (a few KiB at most).
    assert!(
        got >= want && got <= want + (64 << 10),
        "du says {got} bytes; the files use {want}"
    );
    m.unmount();
}

/// One file size limit (16 TiB, as ext4), enforced alike by truncate, write
/// and fallocate, with EFBIG at once.
#[test]
fn file_size_limit_is_enforced_everywhere() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    const LIMIT: u64 = 16 << 40;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("big"))
        .unwrap();
    let e = f.set_len(999_999_999_999_999).unwrap_err();
    assert_eq!(errno_of(&e), libc::EFBIG, "truncate: {e}");
    let e = f.set_len(LIMIT + 1).unwrap_err();
    assert_eq!(errno_of(&e), libc::EFBIG, "truncate past the limit: {e}");
    // Exactly the limit is fine (and sparse).
    f.set_len(LIMIT).unwrap();
    assert_eq!(f.metadata().unwrap().len(), LIMIT);
    // A write that would end past it.
    let fd = f.as_raw_fd();
    let buf = [7u8; 4096];
    // SAFETY: pwrite from a valid buffer on an open descriptor.
    let r = unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), (LIMIT - 100) as i64) };
    let e = std::io::Error::last_os_error();
    if r < 0 {
        assert_eq!(errno_of(&e), libc::EFBIG, "pwrite: {e}");
    } else {
        // The kernel's write-back cache took the write (FUSE lets no daemon
        // lower the kernel's file size limit): the refusal comes back at
        // write-back, and fsync reports it instead of claiming success.
        let e = f.sync_all().unwrap_err();
        assert!(
            [libc::EFBIG, libc::EIO].contains(&errno_of(&e)),
            "fsync after a write past the limit: {e}"
        );
    }
    // fallocate past it.
    // SAFETY: fallocate on an open descriptor.
    let r = unsafe { libc::fallocate(fd, 0, (LIMIT - 10) as i64, 4096) };
    let e = std::io::Error::last_os_error();
    assert_eq!((r, errno_of(&e)), (-1, libc::EFBIG), "fallocate: {e}");
    drop(f);
    m.unmount();
    env.assert_fsck_clean();
    // What is stored never passed the limit.
    let m = env.mount();
    assert_eq!(fs::metadata(m.p("big")).unwrap().len(), LIMIT);
    m.unmount();
}

/// An access ACL's mask is the group bits of the mode: a stat right after
/// `setfacl` shows it, whether the daemon keeps mode and ACL in step (the
/// default) or the kernel does (`default_permissions`). The daemon used to
/// leave the kernel's cached mode as it was for up to a second.
#[test]
fn a_new_access_acl_shows_in_the_mode_at_once() {
    require_fuse!();
    for opts in ["", "default_permissions"] {
        let env = Env::new();
        let m = env.mount_with(opts, &[]);
        let f = m.p("f");
        fs::write(&f, b"x").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        common::sh(&format!(
            "setfacl -m u:1234:rw-,g:5678:r--,m::rw-,o::r-- '{}'",
            f.display()
        ));
        let mode = fs::metadata(&f).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o664, "{opts:?}: mode {mode:o} right after setfacl");
        // And a chmod narrows the mask.
        fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
        let acl = common::sh(&format!("getfacl -n '{}'", f.display()));
        assert!(acl.contains("mask::r--"), "{opts:?}: {acl}");
        m.unmount();
    }
}
