//! fstab and boot, the way an operator does it: an fstab (a temporary file, read with
//! `mount -T FILE`) with both forms, type `kmsfs` (mount(8) runs /sbin/mount.kmsfs, this
//! binary by argv[0]) and type `fuse.kmsfs` (mount(8) runs mount.fuse3, which runs
//! `kmsfs VOLUME MOUNTPOINT -o OPTIONS`), with the generic options of mount(8) and
//! systemd; `mount -a`, `mount MOUNTPOINT`, reads and writes, plain `umount`, fsck.
//! Then the units of `kmsfs systemd-unit`: `systemd-analyze verify` of their ordering
//! at boot and shutdown, and a real start and stop where systemd is PID 1.
//!
//! mount(8) finds helpers only in /sbin, /sbin/fs.d and /sbin/fs, and runs them with a
//! sanitised environment without PATH (mount.fuse3's `sh -c kmsfs …` then searches the
//! shell's default PATH, /usr/local/sbin first). So, for the duration of a test, under
//! a lock shared by every test process on the machine, /sbin/mount.kmsfs and
//! /usr/local/sbin/kmsfs are symlinks to the binary under test; a file already there (an
//! installed package) is moved aside and put back, also when the test fails.

mod common;

use common::*;
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Serialises the tests (of every process) that put files into /sbin.
struct MachineLock(#[allow(dead_code)] File);

impl MachineLock {
    fn take() -> MachineLock {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/kmsfs-test-sbin.lock")
            .unwrap();
        // SAFETY: flock on a descriptor we own; the lock goes with the file.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
        MachineLock(f)
    }
}

/// A symlink `path` → `target` for the life of the guard; what was at `path` before is
/// moved aside and restored. A symlink left by a killed run of this test (it points
/// into a cargo target directory) is replaced, not kept.
struct TempSymlink {
    path: PathBuf,
    saved: Option<PathBuf>,
}

impl TempSymlink {
    fn new(path: &str, target: &str) -> TempSymlink {
        let path = PathBuf::from(path);
        let saved = path.with_extension("kmsfs-test-saved");
        let stale = fs::read_link(&path)
            .map(|t| t.to_string_lossy().contains("/target/"))
            .unwrap_or(false);
        let saved = if stale {
            fs::remove_file(&path).unwrap();
            None
        } else if fs::symlink_metadata(&path).is_ok() {
            fs::rename(&path, &saved).unwrap();
            Some(saved)
        } else {
            None
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).unwrap();
        }
        std::os::unix::fs::symlink(target, &path).unwrap();
        TempSymlink { path, saved }
    }
}

impl Drop for TempSymlink {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        if let Some(s) = &self.saved {
            let _ = fs::rename(s, &self.path);
        }
    }
}

/// A mount made by mount(8); dropping it unmounts (lazily if it must) and reaps the daemon.
struct Mounted {
    path: PathBuf,
    pid: i32,
    log: PathBuf,
    done: bool,
}

impl Mounted {
    fn new(path: &Path, log: &Path) -> Mounted {
        assert!(is_mounted(path), "{} is not mounted", path.display());
        Mounted {
            path: path.to_path_buf(),
            pid: daemon_pid(path),
            log: log.to_path_buf(),
            done: false,
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Plain util-linux `umount DIR`, then waits for the daemon's exit (code 0).
    fn umount(mut self) {
        let o = Command::new("umount").arg(&self.path).output().unwrap();
        assert!(o.status.success(), "umount: {}", output_text(&o));
        self.done = true;
        let code = wait_exit(self.pid, TIMEOUT);
        assert!(matches!(code, Some(0) | None), "daemon exit {code:?}");
        assert!(!is_mounted(&self.path));
    }
}

impl Drop for Mounted {
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
        let pid = self.pid;
        let _ = std::panic::catch_unwind(move || wait_exit(pid, TIMEOUT));
    }
}

/// mount(8) with the test environment (no KMSFS_* variables: the fstab says it all).
fn mount_cmd(args: &[&str]) -> Output {
    Command::new("mount")
        .args(args)
        .env_remove("KMSFS_KEYSTORE")
        .env_remove("KMSFS_PASSPHRASE_FILE")
        .env_remove("KMSFS_KEYFILE")
        .env_remove("KMSFS_KMS")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn mount_ok(args: &[&str]) {
    let o = mount_cmd(args);
    assert!(o.status.success(), "mount {args:?}: {}", output_text(&o));
}

/// Every generic option of mount(8) and systemd that the issue names.
const GENERIC: &str = "defaults,auto,users,user,_netdev,nofail,x-systemd.requires=network-online.target,\
                       x-systemd.automount,x-systemd.device-timeout=10s,comment=kmsfs-fstab-test";

#[test]
fn fstab_both_forms_through_mount() {
    require_fuse!();
    require_root("mount(8) with an fstab");
    let env = Env::new();
    let _lock = MachineLock::take();
    let _helper = TempSymlink::new("/sbin/mount.kmsfs", BIN);
    let _prog = TempSymlink::new("/usr/local/sbin/kmsfs", BIN);

    let mnt: Vec<PathBuf> = (1..=5).map(|i| env.root().join(format!("m{i}"))).collect();
    for m in &mnt {
        fs::create_dir(m).unwrap();
    }
    let log = |i: usize| env.root().join(format!("m{i}.log"));
    let keys = format!(
        "keystore={},passphrase_file={}",
        env.keystore.display(),
        env.pass.display()
    );
    let fstab = env.root().join("fstab");
    let mut f = File::create(&fstab).unwrap();
    writeln!(f, "# kmsfs test fstab: both forms").unwrap();
    let line = |f: &mut File, i: usize, ty: &str, opts: &str| {
        writeln!(
            f,
            "{}  {}  {ty}  {keys},log={},{opts}  0 0",
            env.vol.display(),
            mnt[i - 1].display(),
            log(i).display()
        )
        .unwrap();
    };
    line(&mut f, 1, "kmsfs", &format!("{GENERIC},rw,noatime"));
    line(&mut f, 2, "fuse.kmsfs", &format!("{GENERIC},noauto,rw"));
    line(
        &mut f,
        3,
        "kmsfs",
        "noauto,ro,cache_size=16M,allow_other,default_permissions",
    );
    line(&mut f, 4, "kmsfs", "noauto,bogus_option=1");
    line(&mut f, 5, "fuse.kmsfs", "noauto,other_bogus");
    drop(f);
    let fstab_s = fstab.to_str().unwrap();
    let m = |i: usize| mnt[i - 1].to_str().unwrap().to_string();

    // mount -a: only the entry without noauto, through /sbin/mount.kmsfs.
    mount_ok(&["-T", fstab_s, "-a"]);
    let m1 = Mounted::new(&mnt[0], &log(1));
    for i in 2..=5 {
        assert!(!is_mounted(&mnt[i - 1]), "noauto entry {i} was mounted");
    }
    let a = pattern(300_000, 1);
    fs::write(m1.p("a"), &a).unwrap();
    File::open(m1.p("a")).unwrap().sync_all().unwrap();
    assert_eq!(fs::read(m1.p("a")).unwrap(), a);

    // A read-only mount beside it, by its mount point (type kmsfs, ro).
    mount_ok(&["-T", fstab_s, &m(3)]);
    let m3 = Mounted::new(&mnt[2], &log(3));
    assert_eq!(fs::read(m3.p("a")).unwrap(), a);
    let e = fs::write(m3.p("x"), b"no").unwrap_err();
    assert_eq!(errno_of(&e), libc::EROFS, "{e}");
    m3.umount();
    m1.umount();

    // The fuse.kmsfs form, by its mount point: mount.fuse3 runs `kmsfs VOL MNT -o …`.
    mount_ok(&["-T", fstab_s, &m(2)]);
    let m2 = Mounted::new(&mnt[1], &log(2));
    assert_eq!(fs::read(m2.p("a")).unwrap(), a);
    let b = pattern(70_000, 2);
    fs::write(m2.p("b"), &b).unwrap();
    fs::create_dir(m2.p("d")).unwrap();
    fs::rename(m2.p("b"), m2.p("d/b")).unwrap();
    m2.umount();

    // And the kmsfs form again by its mount point: everything is there.
    mount_ok(&["-T", fstab_s, &m(1)]);
    let m1 = Mounted::new(&mnt[0], &log(1));
    assert_eq!(fs::read(m1.p("d/b")).unwrap(), b);
    assert_eq!(fs::read(m1.p("a")).unwrap(), a);
    m1.umount();

    // An unknown option fails, naming it, in both forms; nothing is mounted.
    for (i, bad) in [(4, "bogus_option"), (5, "other_bogus")] {
        let o = mount_cmd(&["-T", fstab_s, &m(i)]);
        let text = output_text(&o);
        assert!(!o.status.success(), "entry {i} with {bad} mounted: {text}");
        assert!(text.contains(bad), "the error does not name {bad}: {text}");
        assert!(!is_mounted(&mnt[i - 1]));
    }
    env.assert_fsck_clean();
}

/// mount.kmsfs with mount(8)'s calling convention, each option of the issue alone, and
/// the combined short flags.
#[test]
fn helper_accepts_every_fstab_option() {
    require_fuse!();
    let env = Env::new();
    let dir = env.root().join("bin");
    fs::create_dir(&dir).unwrap();
    let helper = dir.join("mount.kmsfs");
    std::os::unix::fs::symlink(BIN, &helper).unwrap();
    let keys = format!(
        "keystore={},passphrase_file={}",
        env.keystore.display(),
        env.pass.display()
    );
    let run = |flags: &[&str], opts: &str| {
        Command::new(&helper)
            .arg(&env.vol)
            .arg(&env.mnt)
            .args(flags)
            .args(["-o", &format!("{keys},{opts}")])
            .env_remove("KMSFS_KEYSTORE")
            .env_remove("KMSFS_PASSPHRASE_FILE")
            .env("KMSFS_KDF_TEST_PARAMS", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let log = format!("log={}", env.log.display());
    for opt in [
        "users",
        "user",
        "defaults",
        "auto",
        "noauto",
        "_netdev",
        "nofail",
        "x-systemd.automount",
        "x-systemd.requires=a.service",
        "x-systemd.mount-timeout=30",
        "comment=anything",
        "ro",
        "rw",
        "allow_other",
        "default_permissions",
        "cache_size=64M",
        "snapshot=none-yet",
        log.as_str(),
        "nosuid,nodev,noexec,noatime",
    ] {
        // -f (fake): everything is checked (options, keystore, passphrase), nothing mounted.
        let o = run(&["-f"], opt);
        assert!(o.status.success(), "{opt}: {}", output_text(&o));
    }
    for flags in [&["-sfnv"][..], &["-s", "-f", "-n", "-v"], &["-fn"]] {
        let o = run(flags, "nofail");
        assert!(o.status.success(), "{flags:?}: {}", output_text(&o));
    }
    // An unknown option: exit 2, named; with -s (sloppy) it is ignored.
    let o = run(&["-f"], "no_such_option");
    assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no_such_option"));
    let o = run(&["-f", "-s"], "no_such_option");
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(!is_mounted(&env.mnt));
    // A passphrase file readable by others is refused at mount time, as everywhere.
    fs::set_permissions(&env.pass, fs::Permissions::from_mode(0o644)).unwrap();
    let o = run(&["-f"], "nofail");
    assert_eq!(o.status.code(), Some(4), "{}", output_text(&o));
}

fn systemd_analyze() -> Option<&'static str> {
    ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// `kmsfs systemd-unit … --dir DIR`; returns the unit's name.
fn gen_unit(vol: &Path, mnt: &Path, opts: &str, extra: &[&str], dir: &Path) -> String {
    let o = Command::new(BIN)
        .arg("systemd-unit")
        .arg(vol)
        .arg(mnt)
        .args(["-o", opts, "--dir"])
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "systemd-unit: {}", output_text(&o));
    let o = Command::new(BIN)
        .arg("systemd-unit")
        .arg(vol)
        .arg(mnt)
        .arg("--print-name")
        .output()
        .unwrap();
    let name = String::from_utf8(o.stdout).unwrap().trim().to_string();
    if let Ok(o) = Command::new("systemd-escape")
        .args(["--path", "--suffix=mount"])
        .arg(mnt)
        .output()
    {
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), name);
    }
    name
}

/// `systemd-analyze verify` of a boot transaction (local-fs, remote-fs, sockets,
/// multi-user and the mount, through a target that requires them all): Ok(output) when
/// valid and without ordering cycles, Err(output) otherwise.
fn verify_boot(dir: &Path, mount_unit: &str) -> Result<String, String> {
    let target = dir.join("kmsfs-boot-check.target");
    fs::write(
        &target,
        format!(
            "[Unit]\nDescription=boot check\nRequires={mount_unit} local-fs.target \
             remote-fs.target sockets.target multi-user.target kmsfs-test-user.service\n"
        ),
    )
    .unwrap();
    let o = Command::new(systemd_analyze().unwrap())
        .args(["verify", "--man=no"])
        .arg(dir.join(mount_unit))
        .arg(&target)
        .current_dir(dir)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .unwrap();
    let text = output_text(&o);
    let bad = !o.status.success()
        || text.contains("ordering cycle")
        || text.contains(mount_unit.trim_end_matches(".mount"))
        || text.contains("kmsfs-kms");
    if bad { Err(text) } else { Ok(text) }
}

#[test]
fn systemd_units_order_boot_and_shutdown() {
    let Some(_) = systemd_analyze() else {
        eprintln!("skipped: systemd-analyze is not installed (no systemd on this machine)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("units");
    fs::create_dir(&dir).unwrap();
    // The packaged KMS daemon units, ExecStart pointing at the binary under test.
    let pkg = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd");
    for unit in ["kmsfs-kms.service", "kmsfs-kms.socket"] {
        let text = fs::read_to_string(pkg.join(unit)).unwrap();
        fs::write(dir.join(unit), text.replace("/usr/bin/kmsfs", BIN)).unwrap();
    }
    // A service that uses the mount (x-systemd.before= names it).
    fs::write(
        dir.join("kmsfs-test-user.service"),
        format!("[Unit]\nDescription=uses the volume\n[Service]\nExecStart={BIN} --version\n"),
    )
    .unwrap();
    let vol = tmp.path().join("vol");
    let mnt = tmp.path().join("mnt-data dir");
    let unit = |name: &str| fs::read_to_string(dir.join(name)).unwrap();

    // Local volume, local keystore: part of local-fs.target; the service stops first.
    let name = gen_unit(
        &vol,
        &mnt,
        "passphrase_file=/etc/kmsfs/pass,x-systemd.before=kmsfs-test-user.service",
        &[],
        &dir,
    );
    assert!(name.ends_with("mnt\\x2ddata\\x20dir.mount"), "{name}");
    let u = unit(&name);
    for want in [
        "Before=kmsfs-test-user.service\n",
        "RequiredBy=local-fs.target\n",
        "Type=kmsfs\n",
        &format!("Where={}\n", mnt.display()),
        &format!("RequiresMountsFor={} /etc/kmsfs/pass", vol.display()),
    ] {
        assert!(u.contains(want), "{want:?} missing:\n{u}");
    }
    assert!(
        !u.contains("network-online") && !u.contains("_netdev"),
        "{u}"
    );
    verify_boot(&dir, &name).unwrap();

    // _netdev and nofail: after network-online.target (so unmounted before the network
    // goes down), part of remote-fs.target, and the boot does not wait for it.
    let name = gen_unit(
        &vol,
        &mnt,
        "keyfile=/etc/kmsfs/key,_netdev,nofail,x-systemd.before=kmsfs-test-user.service",
        &["--type", "fuse.kmsfs"],
        &dir,
    );
    let u = unit(&name);
    for want in [
        "After=network-online.target\n",
        "Wants=network-online.target\n",
        "WantedBy=remote-fs.target\n",
        "Type=fuse.kmsfs\n",
        "Options=keyfile=/etc/kmsfs/key,nofail,_netdev\n",
    ] {
        assert!(u.contains(want), "{want:?} missing:\n{u}");
    }
    verify_boot(&dir, &name).unwrap();

    // The KMS daemon: Requires= and After= its socket (and After= the service, which
    // the socket starts), so the daemon outlives the mount's final commit.
    let name = gen_unit(
        &vol,
        &mnt,
        "kms=unix:/run/kmsfs/kms.sock,x-systemd.before=kmsfs-test-user.service",
        &[],
        &dir,
    );
    let u = unit(&name);
    for want in [
        "Requires=kmsfs-kms.socket\n",
        "After=kmsfs-kms.socket kmsfs-kms.service\n",
        "Options=kms=unix:/run/kmsfs/kms.sock,_netdev\n",
        "RequiredBy=remote-fs.target\n",
    ] {
        assert!(u.contains(want), "{want:?} missing:\n{u}");
    }
    verify_boot(&dir, &name).unwrap();

    // The check is real: the same daemon dependency in a plain local mount (before
    // local-fs.target, while the socket comes after sysinit.target) is a cycle.
    let naive = u
        .replace(
            "Options=kms=unix:/run/kmsfs/kms.sock,_netdev",
            "Options=kms=unix:/run/kmsfs/kms.sock",
        )
        .replace("RequiredBy=remote-fs.target", "RequiredBy=local-fs.target");
    fs::write(dir.join(&name), naive).unwrap();
    let e = verify_boot(&dir, &name).unwrap_err();
    assert!(e.contains("ordering cycle"), "{e}");

    // An external KMS needs the network too; x-systemd.automount makes an .automount.
    let name = gen_unit(
        &vol,
        &mnt,
        "kms=openbao+https://bao.example:8200/k,x-systemd.automount,x-systemd.idle-timeout=300,x-systemd.mount-timeout=2min",
        &[],
        &dir,
    );
    let u = unit(&name);
    assert!(
        u.contains("After=network-online.target\n") && u.contains("TimeoutSec=2min\n"),
        "{u}"
    );
    assert!(!u.contains("[Install]"), "{u}");
    let auto = unit(&name.replace(".mount", ".automount"));
    assert!(
        auto.contains("TimeoutIdleSec=300\n") && auto.contains("RequiredBy=remote-fs.target\n")
    );
    verify_boot(&dir, &name).unwrap();

    // Refusals: an unknown option (named), and no way to unlock without a terminal.
    for (opts, needle) in [
        ("passphrase_file=/p,no_such_opt", "no_such_opt"),
        ("ro,nofail", "passphrase_file="),
    ] {
        let o = Command::new(BIN)
            .arg("systemd-unit")
            .arg(&vol)
            .arg(&mnt)
            .args(["-o", opts])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(needle),
            "{}",
            output_text(&o)
        );
    }

    mount_through_systemd();
}

/// Starts and stops a generated unit with systemctl, where systemd is PID 1.
fn mount_through_systemd() {
    let comm = fs::read_to_string("/proc/1/comm").unwrap_or_default();
    if comm.trim() != "systemd" || !Path::new("/run/systemd/system").is_dir() {
        eprintln!(
            "skipped: mounting through a systemd .mount unit needs systemd as PID 1 \
             (PID 1 here is {:?}, e.g. a container); the units were checked with systemd-analyze verify",
            comm.trim()
        );
        return;
    }
    if !fuse_available() {
        return;
    }
    require_root("systemctl start");
    let env = Env::new();
    let _lock = MachineLock::take();
    let _helper = TempSymlink::new("/sbin/mount.kmsfs", BIN);
    let opts = format!(
        "keystore={},passphrase_file={},log={},nofail",
        env.keystore.display(),
        env.pass.display(),
        env.log.display()
    );
    let dir = Path::new("/run/systemd/system");
    let name = gen_unit(&env.vol, &env.mnt, &opts, &[], dir);
    struct Unit(String);
    impl Drop for Unit {
        fn drop(&mut self) {
            let _ = Command::new("systemctl").args(["stop", &self.0]).status();
            let _ = fs::remove_file(Path::new("/run/systemd/system").join(&self.0));
            let _ = Command::new("systemctl").arg("daemon-reload").status();
        }
    }
    let unit = Unit(name.clone());
    let ctl = |args: &[&str]| {
        let o = Command::new("systemctl").args(args).output().unwrap();
        assert!(
            o.status.success(),
            "systemctl {args:?}: {}\nlog:\n{}",
            output_text(&o),
            env.log_text()
        );
    };
    ctl(&["daemon-reload"]);
    ctl(&["start", &name]);
    assert!(is_mounted(&env.mnt));
    let pid = daemon_pid(&env.mnt);
    let data = pattern(200_000, 3);
    fs::write(env.mnt.join("via-systemd"), &data).unwrap();
    assert_eq!(fs::read(env.mnt.join("via-systemd")).unwrap(), data);
    ctl(&["stop", &name]);
    assert!(!is_mounted(&env.mnt));
    let _ = wait_exit(pid, TIMEOUT);
    drop(unit);
    env.assert_fsck_clean();
    let m = env.mount();
    assert_eq!(fs::read(m.p("via-systemd")).unwrap(), data);
    m.unmount();
}
