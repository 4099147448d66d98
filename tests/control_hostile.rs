//! The control socket and `kmsfs clone` against a hostile backing directory:
//! others may write it (a share), and kmsfs often runs as root. Nothing
//! planted there may make the mount put its control socket somewhere else,
//! make a client believe a forged answer, or make a clone copy a host file.
//!
//! - Server: the socket is bound in a private staging directory made and
//!   opened relative to a descriptor of its directory (the runtime directory,
//!   or the volume directory without one: tested here in a directory others
//!   may write); a staging directory swapped for a link or another directory
//!   is refused, a planted `kmsfs.ctl` is replaced (never followed), and an
//!   unmount ends however the name was changed behind the mount's back.
//! - Client: an answer from a socket served by another user is refused, in
//!   the runtime directory as in the volume directory; a socket planted in
//!   the volume directory is not even consulted while the mount serves from
//!   its runtime directory.
//! - Clone: a segment replaced by a link (or a FIFO) fails the clone, and the
//!   clone never holds the link's target; the tree-node mirrors of the
//!   segments a clone brings come along.
//!
//! Nothing here opens a volume in this process (no flock): every volume is
//! used through the real `kmsfs` binary.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Env, output_text, pattern};
use kmsfs::control::{self, CONTROL_FILE, Request};

const STAGING: &str = ".kmsfs.ctl.test";
const NOBODY: u32 = 65534;

/// A file outside the volume that nothing may modify, with bytes easy to find.
struct Victim {
    path: PathBuf,
    content: Vec<u8>,
}

const NEEDLE: &[u8] = b"VICTIM-SECRET-0123456789";

impl Victim {
    fn new(dir: &Path, name: &str) -> Victim {
        let path = dir.join(name);
        let content = NEEDLE.repeat(4096);
        fs::write(&path, &content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        Victim { path, content }
    }

    #[track_caller]
    fn assert_intact(&self) {
        let md = fs::symlink_metadata(&self.path).unwrap();
        assert!(
            md.file_type().is_file(),
            "{} changed type",
            self.path.display()
        );
        assert_eq!(
            md.mode() & 0o7777,
            0o644,
            "{} changed mode",
            self.path.display()
        );
        assert_eq!(
            fs::read(&self.path).unwrap(),
            self.content,
            "{} was modified",
            self.path.display()
        );
    }
}

/// A directory outside the volume that must stay empty.
#[track_caller]
fn assert_empty_dir(p: &Path) {
    let md = fs::symlink_metadata(p).unwrap();
    assert!(md.is_dir(), "{} changed type", p.display());
    let names: Vec<_> = fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.is_empty(), "{} got {names:?}", p.display());
}

fn plant_symlink(p: &Path, target: &Path) {
    let _ = fs::remove_file(p);
    std::os::unix::fs::symlink(target, p).unwrap();
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn is_socket(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

// ----- server: the staging directory, through descriptors ---------------------------

/// A volume directory (only its descriptor matters here) and a directory
/// outside it for victims.
struct Dirs {
    tmp: tempfile::TempDir,
    vol: PathBuf,
    outside: PathBuf,
    fd: OwnedFd,
}

impl Dirs {
    fn new() -> Dirs {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let vol = tmp.path().join("vol");
        let outside = tmp.path().join("outside");
        fs::create_dir(&vol).unwrap();
        fs::create_dir(&outside).unwrap();
        // Others may write the volume directory.
        fs::set_permissions(&vol, fs::Permissions::from_mode(0o777)).unwrap();
        let fd = fs::File::open(&vol).unwrap().into();
        Dirs {
            tmp,
            vol,
            outside,
            fd,
        }
    }

    fn bind(&self, after_mkdir: &dyn Fn()) -> std::io::Result<UnixListener> {
        control::bind_control_socket(
            self.fd.as_fd(),
            &self.vol,
            STAGING,
            CONTROL_FILE,
            after_mkdir,
        )
        .map(|(l, _)| l)
    }

    fn ctl(&self) -> PathBuf {
        self.vol.join(CONTROL_FILE)
    }

    fn staging(&self) -> PathBuf {
        self.vol.join(STAGING)
    }

    /// A private, empty directory outside the volume: it passes every check
    /// of a staging directory, so only not following a link keeps it clean.
    fn victim_dir(&self, name: &str) -> PathBuf {
        let d = self.outside.join(name);
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        d
    }

    /// The socket at kmsfs.ctl answers through `l`.
    #[track_caller]
    fn assert_serves(&self, l: &UnixListener) {
        assert!(is_socket(&self.ctl()), "kmsfs.ctl is not a socket");
        assert_eq!(mode_of(&self.ctl()), 0o600);
        let mut c = UnixStream::connect(self.ctl()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"hello\n").unwrap();
        let mut line = String::new();
        BufReader::new(&mut c).read_line(&mut line).unwrap();
        assert_eq!(line, "hello\n");
    }
}

#[test]
fn socket_replaces_a_planted_name_and_a_stale_staging_link() {
    let d = Dirs::new();
    let victim = Victim::new(&d.outside, "ctl-victim");
    let victim_dir = d.victim_dir("staging-victim");
    plant_symlink(&d.ctl(), &victim.path);
    plant_symlink(&d.staging(), &victim_dir);
    let l = d.bind(&|| {}).expect("the planted names are replaced");
    d.assert_serves(&l);
    victim.assert_intact();
    assert_empty_dir(&victim_dir);
    assert!(
        fs::symlink_metadata(d.staging()).is_err(),
        "the staging directory is left behind"
    );
}

#[test]
fn a_stale_staging_directory_is_cleared_only_when_it_is_ours() {
    let d = Dirs::new();
    // Ours, left by a process that died after binding.
    fs::create_dir(d.staging()).unwrap();
    fs::set_permissions(d.staging(), fs::Permissions::from_mode(0o700)).unwrap();
    drop(UnixListener::bind(d.staging().join("ctl")).unwrap());
    let l = d
        .bind(&|| {})
        .expect("a stale staging directory of ours is cleared");
    d.assert_serves(&l);
    assert!(fs::symlink_metadata(d.staging()).is_err());
    drop(l);
    fs::remove_file(d.ctl()).unwrap();

    // Someone else's, with their file: refused, and left alone.
    fs::create_dir(d.staging()).unwrap();
    fs::write(d.staging().join("theirs"), b"theirs").unwrap();
    std::os::unix::fs::chown(d.staging(), Some(NOBODY), Some(NOBODY)).unwrap();
    let e = d
        .bind(&|| {})
        .expect_err("another user's directory is not cleared");
    let msg = e.to_string();
    assert!(msg.contains(STAGING) && msg.contains("tampered"), "{msg}");
    assert_eq!(fs::read(d.staging().join("theirs")).unwrap(), b"theirs");
    assert!(
        fs::symlink_metadata(d.ctl()).is_err(),
        "a socket was placed"
    );
}

type Plant<'a> = Box<dyn Fn(&Path) + 'a>;

#[test]
fn a_swapped_staging_directory_is_refused() {
    let d = Dirs::new();
    let victim_dir = d.victim_dir("swapped-victim");
    let moved = d.outside.join("moved");
    // (what is planted, how, what the error says)
    let cases: Vec<(&str, Plant, &str)> = vec![
        (
            "a link to a private directory elsewhere",
            Box::new(|p| std::os::unix::fs::symlink(&victim_dir, p).unwrap()),
            "without following links",
        ),
        (
            "another user's directory",
            Box::new(|p| {
                fs::create_dir(p).unwrap();
                fs::set_permissions(p, fs::Permissions::from_mode(0o700)).unwrap();
                std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
            }),
            "uid 65534",
        ),
        (
            "a directory others may enter",
            Box::new(|p| {
                fs::create_dir(p).unwrap();
                fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
            }),
            "mode 755",
        ),
        (
            "a directory that is not empty",
            Box::new(|p| {
                fs::create_dir(p).unwrap();
                fs::set_permissions(p, fs::Permissions::from_mode(0o700)).unwrap();
                fs::write(p.join("ctl"), b"x").unwrap();
            }),
            "not empty",
        ),
    ];
    for (what, plant, says) in &cases {
        // Between mkdirat and the open, someone renames the staging
        // directory away and puts something else at its name.
        let hook = || {
            let _ = fs::remove_dir_all(&moved);
            fs::rename(d.staging(), &moved).unwrap();
            plant(&d.staging());
        };
        let e = d
            .bind(&hook)
            .expect_err(&format!("a staging directory swapped for {what} is used"));
        let msg = e.to_string();
        assert!(
            msg.contains(STAGING) && msg.contains(says) && msg.contains("tampered"),
            "{what}: {msg}"
        );
        assert!(
            fs::symlink_metadata(d.ctl()).is_err(),
            "{what}: a socket was placed"
        );
        assert_empty_dir(&victim_dir);
        // What was planted stays; clear it for the next case.
        let st = d.staging();
        match fs::symlink_metadata(&st) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&st).unwrap(),
            Ok(_) => fs::remove_file(&st).unwrap(),
            Err(e) => panic!("{what}: the planted thing was removed: {e}"),
        }
    }
    // Undisturbed, the same directory works.
    let l = d.bind(&|| {}).unwrap();
    d.assert_serves(&l);
}

// ----- server: a mount whose socket name is changed behind its back ---------------

#[test]
fn unmount_ends_however_the_socket_name_was_changed() {
    require_fuse!();
    let env = Env::new();
    let ctl = control::socket_path(&env.vol);
    for change in 0..2 {
        let m = env.mount();
        assert!(is_socket(&ctl));
        fs::remove_file(&ctl).unwrap();
        if change == 1 {
            fs::write(&ctl, b"someone else's").unwrap();
        }
        // The accept loop is not woken through the name: the daemon exits.
        assert_eq!(m.unmount(), Some(0), "{}", env.log_text());
        if change == 1 {
            assert_eq!(fs::read(&ctl).unwrap(), b"someone else's");
            fs::remove_file(&ctl).unwrap();
        }
    }
}

/// A mount killed with SIGKILL leaves its socket in the runtime directory:
/// a client finds nobody listening there, and the next mount of the volume
/// puts its own socket at the name.
#[test]
fn the_next_mount_replaces_the_socket_of_a_killed_mount() {
    require_fuse!();
    let env = Env::new();
    let ctl = control::socket_path(&env.vol);
    let m = env.mount();
    let first = fs::symlink_metadata(&ctl).unwrap().ino();
    m.kill9();
    assert!(is_socket(&ctl), "the killed mount's socket is gone");
    let e = control::request(&env.vol, &Request::Stats).expect_err("a dead mount answered");
    let msg = e.to_string();
    assert!(
        msg.contains(&ctl.display().to_string()) && msg.contains("is the volume mounted"),
        "{msg}"
    );
    let m = env.mount();
    assert_ne!(fs::symlink_metadata(&ctl).unwrap().ino(), first);
    control::request(&env.vol, &Request::Stats).expect("the new mount answers");
    assert_eq!(m.unmount(), Some(0), "{}", env.log_text());
    assert!(
        fs::symlink_metadata(&ctl).is_err(),
        "{} left behind",
        ctl.display()
    );
}

// ----- client: answers only from a server of this user or root --------------------

/// Binds a listening socket at `path` from a thread running as uid/gid 65534
/// (nobody): raw setresuid affects the calling thread alone, and the kernel
/// records the listener's credentials at listen() for SO_PEERCRED. `path`'s
/// directory must be writable by nobody.
fn listen_as_nobody(path: &Path) -> UnixListener {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        // SAFETY: raw setresgid/setresuid on this thread only; it never
        // returns to root and ends right after binding.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY),
                0
            );
            assert_eq!(
                libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY),
                0
            );
        }
        UnixListener::bind(path).unwrap()
    })
    .join()
    .unwrap()
}

/// Puts a socket served by nobody at `at` (bound in a directory of `scratch`
/// nobody may write, then moved into place) and answers every request with a
/// forged success.
fn plant_forger(scratch: &Path, at: &Path) -> std::thread::JoinHandle<()> {
    let dir = scratch.join("nobody");
    fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let bound = dir.join("forged.ctl");
    let l = listen_as_nobody(&bound);
    fs::rename(&bound, at).unwrap();
    fs::remove_dir(&dir).unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let _ = c.write_all(
                b"{\"ok\":true,\"errno\":0,\"error\":\"\",\"data\":{\"forged\":true}}\n",
            );
        }
    })
}

/// A directory others may enter beside root's runtime directory of sockets
/// (the socket planted there is moved in by rename: the same file system),
/// removed when it drops.
fn runtime_scratch(socket: &Path) -> tempfile::TempDir {
    let dir = socket.parent().unwrap();
    let runtime = dir.parent().unwrap();
    let _ = fs::DirBuilder::new().mode(0o755).create(runtime);
    let _ = fs::DirBuilder::new().mode(0o700).create(dir);
    let t = tempfile::tempdir_in(runtime).unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    t
}

/// Removes `p` when it drops (a socket a test put in the runtime directory).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[track_caller]
fn assert_refused(msg: &str, socket: &Path, vol: &Path) {
    let place = if socket.parent() == Some(vol) {
        "the backing directory".to_string()
    } else {
        socket.parent().unwrap().display().to_string()
    };
    let want = format!(
        "the control socket {} of {} is served by uid 65534, not by a kmsfs mount of this \
         user; {place} may have been tampered with",
        socket.display(),
        vol.display()
    );
    assert!(msg.contains(&want), "want {want:?} in: {msg}");
}

#[test]
fn a_client_refuses_a_socket_served_by_another_user() {
    common::require_root("the forged control socket test (listens as another user)");
    let d = Dirs::new();
    let runtime = control::socket_path(&d.vol);
    assert_ne!(runtime, d.ctl(), "root has a runtime directory");
    // In the volume directory (no mount serves the runtime name).
    let forger = plant_forger(d.tmp.path(), &d.ctl());
    let e = control::request(&d.vol, &Request::Stats).expect_err("a forged answer was taken");
    assert_refused(&e.to_string(), &d.ctl(), &d.vol);
    // The same forged answer from a socket of this user (root) is taken: it
    // is the server's credentials that are refused, nothing else.
    fs::remove_file(d.ctl()).unwrap();
    let l = UnixListener::bind(d.ctl()).unwrap();
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&mut c).read_line(&mut line).unwrap();
        c.write_all(b"{\"ok\":true,\"data\":{\"forged\":true}}\n")
            .unwrap();
        line
    });
    let v = control::request(&d.vol, &Request::Stats).unwrap();
    assert_eq!(v["forged"], true);
    assert_eq!(t.join().unwrap().trim(), r#"{"op":"stats"}"#);
    drop(forger);
    // At the runtime name: refused too, and the volume directory's socket
    // (this user's) is not tried instead.
    fs::remove_file(d.ctl()).unwrap();
    let _l = UnixListener::bind(d.ctl()).unwrap();
    let scratch = runtime_scratch(&runtime);
    let _forger = plant_forger(scratch.path(), &runtime);
    let _clean = RemoveOnDrop(runtime.clone());
    let e = control::request(&d.vol, &Request::Stats).expect_err("a forged answer was taken");
    assert_refused(&e.to_string(), &runtime, &d.vol);
}

#[test]
fn the_cli_refuses_a_forged_socket_of_a_mounted_volume() {
    require_fuse!();
    common::require_root("the forged control socket test (listens as another user)");
    let env = Env::new();
    let m = env.mount();
    let runtime = control::socket_path(&env.vol);
    assert!(is_socket(&runtime));
    // Another user of the share plants a socket in the volume directory: the
    // mount serves from its runtime directory, so the CLI never asks it.
    let legacy = env.vol.join(CONTROL_FILE);
    let _forger = plant_forger(env.root(), &legacy);
    env.ok(&["snapshot", "create", env.vol_str(), "through-the-mount"]);
    let list = env.ok(&["snapshot", "list", env.vol_str()]);
    assert!(list.contains("through-the-mount"), "{list}");
    // The mount's socket itself replaced by another user's (only root could
    // do that to a private runtime directory): refused.
    let scratch = runtime_scratch(&runtime);
    let _forger2 = plant_forger(scratch.path(), &runtime);
    let _clean = RemoveOnDrop(runtime.clone());
    let o = env.run(&["snapshot", "create", env.vol_str(), "x"]);
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    assert_refused(&String::from_utf8_lossy(&o.stderr), &runtime, &env.vol);
    // The mount ends cleanly, and leaves the sockets that are not its own.
    assert_eq!(m.unmount(), Some(0), "{}", env.log_text());
    assert!(is_socket(&runtime));
    assert!(is_socket(&legacy));
    fs::remove_file(&runtime).unwrap();
    fs::remove_file(&legacy).unwrap();
    // Nothing was created through the forged socket: the name is free.
    env.ok(&["snapshot", "create", env.vol_str(), "x"]);
}

// ----- clone: segments through descriptors, mirrors included -----------------------

/// A volume with a few segments of data and a snapshot `s` of them.
fn volume_with_snapshot() -> Env {
    let env = Env::with_init(&["--segment-size", "1M"]);
    let m = env.mount();
    for i in 0..3 {
        fs::write(m.p(&format!("f{i}")), pattern(700_000, i)).unwrap();
    }
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/small"), b"small").unwrap();
    assert_eq!(m.unmount(), Some(0));
    env.ok(&["snapshot", "create", env.vol_str(), "s"]);
    env
}

fn seg_names(vol: &Path, ext: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(vol.join("seg"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(ext))
        .collect();
    v.sort();
    v
}

/// Every file under `dir`: none is a link, none holds the victim's bytes.
#[track_caller]
fn assert_no_victim_bytes(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd {
        let p = e.unwrap().path();
        let md = fs::symlink_metadata(&p).unwrap();
        assert!(!md.file_type().is_symlink(), "{} is a link", p.display());
        if md.is_dir() {
            assert_no_victim_bytes(&p);
        } else if md.is_file() {
            let b = fs::read(&p).unwrap();
            assert!(
                !b.windows(NEEDLE.len()).any(|w| w == NEEDLE),
                "{} holds the victim's bytes",
                p.display()
            );
        }
    }
}

/// A clone destination on the same filesystem as the volume (hard links),
/// and one on another (/dev/shm, copies) where there is one.
fn clone_targets(env: &Env, tag: &str) -> Vec<(PathBuf, Option<tempfile::TempDir>)> {
    let mut v = vec![(env.root().join(format!("clone-{tag}")), None)];
    let shm = Path::new("/dev/shm");
    if fs::metadata(shm).is_ok_and(|m| m.dev() != fs::metadata(env.root()).unwrap().dev()) {
        let t = tempfile::tempdir_in(shm).unwrap();
        v.push((t.path().join("clone"), Some(t)));
    }
    v
}

fn run_bounded(env: &Env, args: &[&str]) -> std::process::Output {
    let mut c = env.cmd();
    c.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            // SAFETY: kill on the pid of the child this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("kmsfs {args:?} blocked on a planted file");
        }
    }
}

#[test]
fn clone_refuses_a_segment_replaced_by_a_link() {
    require_fuse!();
    let env = volume_with_snapshot();
    let outside = env.root().join("outside");
    fs::create_dir(&outside).unwrap();
    let victim = Victim::new(&outside, "shadow");
    // The segments the snapshot needs, which the clone brings.
    let first = env.root().join("clone-first");
    env.ok(&["clone", env.vol_str(), "s", first.to_str().unwrap()]);
    let brought = seg_names(&first, ".seg");
    let segs = seg_names(&env.vol, ".seg");
    assert!(brought.len() >= 2, "{brought:?}");
    for (i, seg) in segs.iter().enumerate() {
        let needed = brought.contains(seg);
        for plant in ["link", "fifo"] {
            let p = env.vol.join("seg").join(seg);
            let aside = outside.join(seg);
            fs::rename(&p, &aside).unwrap();
            match plant {
                "link" => std::os::unix::fs::symlink(&victim.path, &p).unwrap(),
                _ => nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o666))
                    .unwrap(),
            }
            for (dst, _keep) in clone_targets(&env, &format!("{i}-{plant}")) {
                let o = run_bounded(&env, &["clone", env.vol_str(), "s", dst.to_str().unwrap()]);
                if needed {
                    assert!(
                        !o.status.success(),
                        "a clone with seg/{seg} a {plant} succeeded: {}",
                        output_text(&o)
                    );
                    let err = String::from_utf8_lossy(&o.stderr);
                    let says = if plant == "link" {
                        "a symbolic link"
                    } else {
                        "FIFO"
                    };
                    assert!(
                        err.contains(seg.as_str())
                            && err.contains(says)
                            && err.contains("tampered"),
                        "the error should name seg/{seg} and say it is {says}: {err}"
                    );
                } else {
                    // Not part of the snapshot: never touched.
                    assert!(o.status.success(), "{}", output_text(&o));
                    assert!(!dst.join("seg").join(seg).exists());
                }
                assert_no_victim_bytes(&dst);
                victim.assert_intact();
            }
            fs::remove_file(&p).unwrap();
            fs::rename(&aside, &p).unwrap();
        }
    }
    // Put back, the same clone works.
    for (dst, _keep) in clone_targets(&env, "ok") {
        env.ok(&["clone", env.vol_str(), "s", dst.to_str().unwrap()]);
        assert_no_victim_bytes(&dst);
    }
}

#[test]
fn clone_brings_the_tree_mirrors_of_its_segments() {
    require_fuse!();
    let env = volume_with_snapshot();
    let mirrors = seg_names(&env.vol, ".meta");
    assert!(!mirrors.is_empty(), "the volume has no tree mirrors");
    for (dst, keep) in clone_targets(&env, "mirrors") {
        let out = env.ok(&["clone", env.vol_str(), "s", dst.to_str().unwrap()]);
        let linked = keep.is_none();
        let want = if linked {
            " 0 copied"
        } else {
            "(0 segment files linked"
        };
        assert!(out.contains(want), "{out}");
        for seg in seg_names(&dst, ".seg") {
            let meta = seg.replace(".seg", ".meta");
            let (src, cl) = (env.vol.join("seg").join(&meta), dst.join("seg").join(&meta));
            if !src.exists() {
                continue;
            }
            assert!(cl.exists(), "the clone lacks the mirror seg/{meta}");
            assert_eq!(
                fs::read(&src).unwrap(),
                fs::read(&cl).unwrap(),
                "seg/{meta}"
            );
            let same = fs::metadata(&src).unwrap().ino() == fs::metadata(&cl).unwrap().ino();
            assert_eq!(same, linked, "seg/{meta} linked or copied");
            assert_eq!(mode_of(&cl), 0o600, "seg/{meta}");
        }
        assert!(
            !seg_names(&dst, ".meta").is_empty(),
            "the clone has no tree mirrors"
        );
        let o = env.run(&["fsck", dst.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    }
}
