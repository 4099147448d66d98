//! Shared helpers of the mount and CLI integration tests: a temporary keystore,
//! volume and mountpoint per test, the real `kmsfs` binary, and a mount guard
//! that always unmounts and waits for the daemon to exit.
//!
//! Mount tests need /dev/fuse and fusermount3; without them they fail, unless
//! KMSFS_SKIP_FUSE=1 is set (then they pass without doing anything). Nothing
//! here sleeps to synchronise: every wait polls a condition with a deadline.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_kmsfs");
pub const PASSPHRASE: &str = "correct horse battery staple";
/// Default wait for daemons and mount state.
pub const TIMEOUT: Duration = Duration::from_secs(60);

static SUBREAPER: Once = Once::new();

/// Makes this test process the reaper of the daemons its `kmsfs mount`
/// children leave behind, so their exit status can be collected.
fn become_subreaper() {
    SUBREAPER.call_once(|| {
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer argument only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    });
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// True when mount tests can run; false (skip) only with KMSFS_SKIP_FUSE=1.
pub fn fuse_available() -> bool {
    become_subreaper();
    if Path::new("/dev/fuse").exists() && on_path("fusermount3") {
        return true;
    }
    if std::env::var("KMSFS_SKIP_FUSE").as_deref() == Ok("1") {
        eprintln!("skipped: /dev/fuse or fusermount3 missing and KMSFS_SKIP_FUSE=1");
        return false;
    }
    panic!(
        "/dev/fuse or fusermount3 is missing: install fuse3 (apt-get install fuse3), \
         or set KMSFS_SKIP_FUSE=1 to skip the mount tests"
    );
}

#[macro_export]
macro_rules! require_fuse {
    () => {
        if !common::fuse_available() {
            return;
        }
    };
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Tests that need root (tmpfs mounts, other users) fail clearly without it.
pub fn require_root(what: &str) {
    assert!(is_root(), "{what} needs root (CI runs the suite as root)");
}

/// Polls `f` every few milliseconds until it is true or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    let mut delay = Duration::from_millis(2);
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

pub fn output_text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A keystore, a volume directory and a mountpoint in one temporary directory.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub keystore: PathBuf,
    pub pass: PathBuf,
    pub vol: PathBuf,
    pub mnt: PathBuf,
    pub log: PathBuf,
}

/// Where the mount of `vol` serves its control socket
/// (`kmsfs::control::socket_path`), with its directory made as a mount makes
/// it (for tests that put something at that name first).
pub fn control_socket(vol: &Path) -> PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    let sock = kmsfs::control::socket_path(vol);
    if let Some(dir) = sock.parent().filter(|d| *d != vol) {
        if let Some(runtime) = dir.parent() {
            let _ = fs::DirBuilder::new().mode(0o755).create(runtime);
        }
        let _ = fs::DirBuilder::new().mode(0o700).create(dir);
    }
    sock
}

/// A test's volume may end with its daemon killed (SIGKILL): its socket stays
/// in the runtime directory until the next mount of the volume, which never
/// comes. Removed here when nobody serves it.
impl Drop for Env {
    fn drop(&mut self) {
        use std::os::unix::fs::FileTypeExt;
        let sock = kmsfs::control::socket_path(&self.vol);
        if sock.parent() != Some(self.vol.as_path())
            && fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_socket())
            && std::os::unix::net::UnixStream::connect(&sock)
                .is_err_and(|e| e.raw_os_error() == Some(libc::ECONNREFUSED))
        {
            let _ = fs::remove_file(&sock);
        }
    }
}

impl Env {
    /// An environment with an initialised volume.
    pub fn new() -> Env {
        Self::with_init(&[])
    }

    /// An environment with a volume initialised with extra `init` arguments.
    pub fn with_init(args: &[&str]) -> Env {
        let e = Self::bare();
        let vol = e.vol.to_str().unwrap().to_string();
        let mut a = vec!["init", vol.as_str()];
        a.extend_from_slice(args);
        e.ok(&a);
        e
    }

    /// Keystore passphrase file and directories, no volume yet.
    pub fn bare() -> Env {
        become_subreaper();
        let tmp = tempfile::Builder::new()
            .prefix("kmsfs-test-")
            .tempdir()
            .unwrap();
        // Other users (the multi-user test) must be able to reach the mountpoint.
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let root = tmp.path().to_path_buf();
        let pass = root.join("passphrase");
        fs::write(&pass, format!("{PASSPHRASE}\n")).unwrap();
        fs::set_permissions(&pass, fs::Permissions::from_mode(0o600)).unwrap();
        let mnt = root.join("mnt");
        fs::create_dir(&mnt).unwrap();
        Env {
            keystore: root.join("keystore"),
            pass,
            vol: root.join("vol"),
            mnt,
            log: root.join("daemon.log"),
            tmp,
        }
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// The kmsfs binary with this environment's keystore and passphrase.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("KMSFS_KDF_TEST_PARAMS", "1")
            .env("KMSFS_KEYSTORE", &self.keystore)
            .env("KMSFS_PASSPHRASE_FILE", &self.pass)
            .env_remove("KMSFS_KEYFILE")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        c
    }

    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs kmsfs and asserts success; returns stdout.
    pub fn ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "kmsfs {:?} failed: {}",
            args.iter()
                .map(|a| a.as_ref().to_owned())
                .collect::<Vec<_>>(),
            output_text(&o)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Runs kmsfs and asserts it exits with `code`; returns stdout and stderr as one text.
    pub fn fails<S: AsRef<OsStr>>(&self, code: i32, args: &[S]) -> String {
        let o = self.run(args);
        let text = output_text(&o);
        assert_eq!(
            o.status.code(),
            Some(code),
            "kmsfs {:?}: expected exit {code}: {text}",
            args.iter()
                .map(|a| a.as_ref().to_owned())
                .collect::<Vec<_>>()
        );
        text
    }

    /// `kmsfs key describe KEY --json`.
    pub fn key_json(&self, key: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["key", "describe", key, "--json"])).unwrap()
    }

    pub fn vol_str(&self) -> &str {
        self.vol.to_str().unwrap()
    }

    pub fn mnt_str(&self) -> &str {
        self.mnt.to_str().unwrap()
    }

    /// `kmsfs mount VOL MNT -o log=…[,opts] [extra…]` without asserting success.
    pub fn try_mount(&self, opts: &str, extra: &[&str]) -> Output {
        let o = if opts.is_empty() {
            format!("log={}", self.log.display())
        } else {
            format!("log={},{opts}", self.log.display())
        };
        let mut args = vec!["mount", self.vol_str(), self.mnt_str(), "-o", o.as_str()];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// Mounts read-write and returns the guard.
    pub fn mount(&self) -> Mount {
        self.mount_with("", &[])
    }

    pub fn mount_with(&self, opts: &str, extra: &[&str]) -> Mount {
        let o = self.try_mount(opts, extra);
        assert!(
            o.status.success(),
            "mount failed: {}\nlog:\n{}",
            output_text(&o),
            self.log_text()
        );
        self.guard()
    }

    /// Mounts another volume or at another mountpoint (made if missing), with
    /// its own log file; `extra` are more `kmsfs mount` arguments.
    pub fn mount_other(&self, vol: &Path, mnt: &Path, extra: &[&str]) -> Mount {
        fs::create_dir_all(mnt).unwrap();
        let log = mnt.with_extension("log");
        let o = format!("log={}", log.display());
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("mount"),
            vol.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("-o"),
            OsStr::new(&o),
        ];
        args.extend(extra.iter().map(OsStr::new));
        let out = self.run(&args);
        assert!(
            out.status.success(),
            "mount of {} failed: {}\nlog:\n{}",
            vol.display(),
            output_text(&out),
            fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(is_mounted(mnt), "{} is not mounted", mnt.display());
        Mount {
            path: mnt.to_path_buf(),
            pid: daemon_pid(mnt),
            log,
            done: false,
        }
    }

    /// The guard of a mount made by other means (mount.kmsfs, mount.fuse3).
    pub fn guard(&self) -> Mount {
        assert!(
            is_mounted(&self.mnt),
            "{} is not mounted",
            self.mnt.display()
        );
        let pid = daemon_pid(&self.mnt);
        Mount {
            path: self.mnt.clone(),
            pid,
            log: self.log.clone(),
            done: false,
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn info_json(&self) -> serde_json::Value {
        let out = self.ok(&["info", self.vol_str(), "--json"]);
        serde_json::from_str(&out).unwrap()
    }

    /// Runs fsck and returns its output.
    pub fn fsck(&self) -> Output {
        self.run(&["fsck", self.vol_str()])
    }

    pub fn assert_fsck_clean(&self) {
        let o = self.fsck();
        assert_eq!(
            o.status.code(),
            Some(0),
            "fsck not clean: {}",
            output_text(&o)
        );
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

/// True when `path` is a mountpoint of a FUSE filesystem (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.as_os_str().as_bytes();
    info.lines().any(|l| {
        let mut f = l.split(' ');
        let target = f.nth(4).unwrap_or("");
        unescape(target) == want && l.split(" - ").nth(1).is_some_and(|p| p.starts_with("fuse"))
    })
}

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let o = |c: u8| (c - b'0') as u32;
            out.push((o(b[i + 1]) * 64 + o(b[i + 2]) * 8 + o(b[i + 3])) as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The pid of the daemon serving `mnt`: the live process whose arguments name it.
pub fn daemon_pid(mnt: &Path) -> i32 {
    let want = mnt.as_os_str().as_bytes();
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_kmsfs = args.first().is_some_and(|a| a.ends_with(b"kmsfs"));
        if is_kmsfs && args.contains(&want) {
            found.push(pid);
        }
    }
    assert_eq!(
        found.len(),
        1,
        "expected one daemon for {}, found {found:?}",
        mnt.display()
    );
    found[0]
}

/// Waits for `pid` to exit; returns its exit code when it was our child (or
/// re-parented to us), None when it exited elsewhere. Panics after `timeout`.
pub fn wait_exit(pid: i32, timeout: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(code) = try_reap(pid) {
            return code;
        }
        assert!(
            start.elapsed() < timeout,
            "daemon {pid} did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Some(exit code if known) once `pid` has exited; None while it runs.
fn try_reap(pid: i32) -> Option<Option<i32>> {
    let mut status = 0;
    // SAFETY: waitpid on a specific pid with a valid status pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r == pid {
        return Some(Some(if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        }));
    }
    if r < 0 {
        // Not our child: gone, or a zombie of another parent, counts as exited.
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        if stat.is_empty() || state == Some("Z") {
            return Some(None);
        }
    }
    None
}

pub fn fusermount_u(path: &Path, lazy: bool) -> bool {
    let mut c = Command::new("fusermount3");
    c.arg(if lazy { "-uz" } else { "-u" }).arg(path);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    c.status().map(|s| s.success()).unwrap_or(false)
}

/// A live mount. Dropping it always unmounts (lazily if it must) and waits for
/// the daemon; `unmount` does the same and returns the daemon's exit code.
pub struct Mount {
    pub path: PathBuf,
    pub pid: i32,
    log: PathBuf,
    done: bool,
}

impl Mount {
    /// The guard of a live mount at `mnt` (its daemon found by its arguments).
    pub fn adopt(mnt: &Path, log: &Path) -> Mount {
        assert!(is_mounted(mnt), "{} is not mounted", mnt.display());
        Mount {
            path: mnt.to_path_buf(),
            pid: daemon_pid(mnt),
            log: log.to_path_buf(),
            done: false,
        }
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Clean unmount with `fusermount3 -u`; returns the daemon's exit code.
    /// A failure panics with `done` unset, so `Drop` still detaches and reaps.
    pub fn unmount(mut self) -> Option<i32> {
        let start = Instant::now();
        // EBUSY can linger for a moment after the last close; poll with a deadline.
        while !fusermount_u(&self.path, false) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "fusermount3 -u {} keeps failing (a file still open?)",
                self.path.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.done = true;
        wait_exit(self.pid, TIMEOUT)
    }

    /// `kmsfs umount MNT`, which returns only after the daemon's final
    /// commit; asserts success and reaps the daemon.
    pub fn kmsfs_umount(mut self, env: &Env) {
        let o = env.run(&[OsStr::new("umount"), self.path.as_os_str()]);
        assert!(o.status.success(), "kmsfs umount: {}", output_text(&o));
        self.done = true;
        // The daemon has exited already (kmsfs umount waited for it).
        assert!(
            try_reap(self.pid).is_some(),
            "kmsfs umount returned before the daemon {} exited",
            self.pid
        );
    }

    /// A plain `umount DIR` (util-linux), without waiting for the daemon;
    /// returns its pid (reap it with [`wait_exit`]).
    pub fn umount_plain(mut self) -> i32 {
        let o = Command::new("umount").arg(&self.path).output().unwrap();
        assert!(o.status.success(), "umount: {}", output_text(&o));
        self.done = true;
        self.pid
    }

    /// `fusermount3 -u` without waiting for the daemon; returns its pid.
    pub fn unmount_no_wait(mut self) -> i32 {
        assert!(
            fusermount_u(&self.path, false),
            "fusermount3 -u {}",
            self.path.display()
        );
        self.done = true;
        self.pid
    }

    /// SIGKILL to the daemon, then clears the dead mount.
    pub fn kill9(mut self) {
        // SAFETY: kill on a pid this test started.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        wait_exit(self.pid, TIMEOUT);
        assert!(fusermount_u(&self.path, false) || fusermount_u(&self.path, true));
        self.done = true;
    }

    /// Sends `sig` to the daemon and waits for it to exit; returns the exit code.
    pub fn signal(mut self, sig: i32) -> Option<i32> {
        // SAFETY: kill on a pid this test started.
        unsafe { libc::kill(self.pid, sig) };
        let code = wait_exit(self.pid, TIMEOUT);
        wait_until("the mount to disappear", TIMEOUT, || {
            !is_mounted(&self.path)
        });
        self.done = true;
        code
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "--- daemon log {} ---\n{}",
                self.log.display(),
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        if !fusermount_u(&self.path, false) {
            fusermount_u(&self.path, true);
        }
        let start = Instant::now();
        while try_reap(self.pid).is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                // SAFETY: kill on a pid this test started.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                wait_exit(self.pid, TIMEOUT);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Writes a file with a deterministic pattern derived from `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Runs a shell command; asserts success; returns stdout.
pub fn sh(cmd: &str) -> String {
    let o = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(o.status.success(), "`{cmd}` failed: {}", output_text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The passphrase of tests/golden/v1 (tests/golden.rs).
pub const GOLDEN_PASSPHRASE: &str = "golden volume v1";

/// tests/golden/v1 copied to a temporary directory, files made private (git keeps 0644).
pub fn golden_env() -> Env {
    let env = Env::bare();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/v1");
    sh(&format!(
        "cp -r {}/keystore {}/keystore.bak {} && cp -r {}/volume {}",
        src.display(),
        src.display(),
        env.root().display(),
        src.display(),
        env.vol.display()
    ));
    for f in ["keystore", "keystore.bak"] {
        fs::set_permissions(env.root().join(f), fs::Permissions::from_mode(0o600)).unwrap();
    }
    fs::write(&env.pass, GOLDEN_PASSPHRASE).unwrap();
    env
}
