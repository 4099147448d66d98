//! Mounts through the KMS daemon (`--kms unix:PATH`, `-o kms=unix:PATH`), end to end
//! with FUSE: init and mount never read the keystore or a passphrase; the daemon is
//! restarted while the volume stays mounted (the DK is in memory; commits record the
//! generation through the restarted daemon); the volume mounts again afterwards; a
//! mount while the daemon is down fails clearly within the bounded wait; the mount time
//! through the daemon (and with the keystore) for the closing note.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Env, output_text, require_root, wait_until};

/// A running `kmsfs kms serve`, killed by PID when dropped.
struct Daemon(Option<Child>);

impl Daemon {
    fn start(env: &Env, sock: &Path) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(env.root().join("kms-daemon.log"))
            .unwrap();
        let child = env
            .cmd()
            .args(["kms", "serve", "--socket"])
            .arg(sock)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Daemon(Some(child));
        wait_until("the KMS daemon's socket", common::TIMEOUT, || {
            UnixStream::connect(sock).is_ok()
        });
        d
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: kill with our own child's pid.
            unsafe { libc::kill(i32::try_from(c.id()).unwrap(), libc::SIGTERM) };
            let st = c.wait().unwrap();
            assert!(st.success(), "{st:?}");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// kmsfs through the daemon only: the keystore variables point nowhere.
fn via_daemon(env: &Env, url: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--kms")
        .arg(url)
        .args(args)
        .env("KMSFS_KEYSTORE", "/nonexistent/keystore")
        .env_remove("KMSFS_PASSPHRASE_FILE")
        .env_remove("KMSFS_KEYFILE")
        .env_remove("KMSFS_KMS")
        .current_dir(env.root())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn mount_via(env: &Env, url: &str) -> (Output, Duration) {
    let opts = format!("log={},kms={url}", env.log.display());
    let t = Instant::now();
    let o = Command::new(BIN)
        .args(["mount", env.vol_str(), env.mnt_str(), "-o", &opts])
        .env("KMSFS_KEYSTORE", "/nonexistent/keystore")
        .env_remove("KMSFS_PASSPHRASE_FILE")
        .env_remove("KMSFS_KMS")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (o, t.elapsed())
}

#[test]
fn mount_through_the_daemon_survives_a_daemon_restart() {
    require_fuse!();
    require_root("mounting through the KMS daemon");
    let env = Env::bare();
    env.ok(&["key", "create", "--alias", "vols"]);
    let run: PathBuf = env.root().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = run.join("kms.sock");
    let url = format!("unix:{}", sock.display());
    let mut d = Daemon::start(&env, &sock);

    let o = via_daemon(&env, &url, &["init", env.vol_str(), "--cmk", "vols"]);
    assert!(o.status.success(), "init: {}", output_text(&o));
    let (o, took) = mount_via(&env, &url);
    assert!(
        o.status.success(),
        "mount: {}\nlog:\n{}",
        output_text(&o),
        env.log_text()
    );
    eprintln!("mount time through the KMS daemon: {took:?}");
    let m = env.guard();
    std::fs::write(m.p("before"), b"written before the restart").unwrap();

    // Restart the daemon under the mounted volume.
    d.stop();
    assert!(!sock.exists());
    std::fs::write(m.p("while-down"), b"the DK is in memory").unwrap();
    let d2 = Daemon::start(&env, &sock);
    std::fs::write(m.p("after"), b"written after the restart").unwrap();
    let f = std::fs::File::open(m.p("after")).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(
        std::fs::read(m.p("before")).unwrap(),
        b"written before the restart"
    );
    assert!(m.p("while-down").exists());
    m.kmsfs_umount(&env);

    // Mounts again through the restarted daemon, everything there.
    let (o, _) = mount_via(&env, &url);
    assert!(
        o.status.success(),
        "second mount: {}\nlog:\n{}",
        output_text(&o),
        env.log_text()
    );
    let m = env.guard();
    for (f, want) in [
        ("before", &b"written before the restart"[..]),
        ("while-down", b"the DK is in memory"),
        ("after", b"written after the restart"),
    ] {
        assert_eq!(std::fs::read(m.p(f)).unwrap(), want, "{f}");
    }
    m.kmsfs_umount(&env);

    // The keystore's audit names the mount processes (uid 0), never the daemon.
    let audit = env.ok(&["audit", "--json"]);
    assert!(audit.contains("decrypt"), "{audit}");

    // The keystore for comparison.
    let t = Instant::now();
    let m = env.mount();
    eprintln!("mount time with the keystore: {:?}", t.elapsed());
    m.kmsfs_umount(&env);

    // Daemon down: the mount fails clearly, within the bounded wait.
    drop(d2);
    let (o, took) = mount_via(&env, &url);
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(4), "{text}");
    assert!(
        text.contains("kmsfs kms serve") && text.contains(&url),
        "{text}"
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert!(!common::is_mounted(&env.mnt));
}
