//! The KMS daemon (`kmsfs kms serve`, the real binary as a child process) and its client
//! (`--kms unix:PATH`, `kmsfs::kms::client`): data keys through the socket, the key
//! lifecycle and audit through it, the access policy (a second uid refused and audited),
//! 50 concurrent clients, malformed and oversized requests (only that connection
//! closes), a daemon restart under a connected client, the daemon-down error, the
//! systemd units, and the unwrap latency (median, p99) for the closing note.
//!
//! The second uid is 65534 (nobody): the test binary re-runs itself as that uid
//! (`Command::uid`) for the client side, so no user has to be created.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{BIN, Env, output_text, require_root, wait_until};
use kmsfs::kms::{AuditOp, EncryptionContext, KeyChange, Kms, KmsError, WrappedKey, client};

const NOBODY: u32 = 65534;
const CHILD_ENV: &str = "KMSFS_DAEMON_TEST_CHILD";

/// A running `kmsfs kms serve`, killed by PID when dropped.
struct Daemon {
    child: Option<Child>,
    _socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(env: &Env, socket: &Path, policy: Option<&Path>) -> Daemon {
        let log = env.root().join("kms-daemon.log");
        let mut c = env.cmd();
        c.args(["kms", "serve", "--socket"]).arg(socket);
        if let Some(p) = policy {
            c.arg("--policy").arg(p);
        }
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = c
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        let d = Daemon {
            child: Some(child),
            _socket: socket.to_path_buf(),
            log,
        };
        wait_until("the KMS daemon's socket", common::TIMEOUT, || {
            UnixStream::connect(socket).is_ok()
        });
        d
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.as_ref().unwrap().id()).unwrap()
    }

    /// SIGTERM, and the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        // SAFETY: kill with the pid of our own child.
        unsafe { libc::kill(i32::try_from(c.id()).unwrap(), libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the daemon ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A keystore with keys `backup-a` and `prod`, and a directory others may enter for the
/// socket.
fn setup() -> (Env, PathBuf) {
    let env = Env::bare();
    env.ok(&["key", "create", "--alias", "backup-a"]);
    env.ok(&["key", "create", "--alias", "prod"]);
    let dir = env.root().join("run");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.join("kms.sock");
    (env, sock)
}

fn ctx(v: u8) -> EncryptionContext {
    EncryptionContext::for_volume(&[v; 16])
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn latency(what: &str, kms: &dyn Kms, w: &WrappedKey, c: &EncryptionContext) {
    let mut t: Vec<Duration> = (0..200)
        .map(|_| {
            let s = Instant::now();
            kms.decrypt(w, c).unwrap();
            s.elapsed()
        })
        .collect();
    t.sort();
    eprintln!(
        "unwrap latency {what}: median {:?}, p99 {:?} (200 decrypts)",
        percentile(&t, 0.5),
        percentile(&t, 0.99)
    );
}

#[test]
fn data_keys_lifecycle_and_audit_through_the_socket() {
    require_root("the KMS daemon tests");
    let (env, sock) = setup();
    let d = Daemon::start(&env, &sock, None);
    // Root only by default: a private socket.
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let kms = client::open(&sock).unwrap();
    assert!(kms.describe().contains(&sock.display().to_string()));
    let (dk, w) = kms.generate_data_key(Some("backup-a"), &ctx(1)).unwrap();
    assert!(w.cmk_id.starts_with("cmk-"));
    assert_eq!(kms.decrypt(&w, &ctx(1)).unwrap().expose(), dk.expose());
    // The service key when none is named.
    let (dk2, w2) = kms.generate_data_key(None, &ctx(2)).unwrap();
    assert_eq!(kms.decrypt(&w2, &ctx(2)).unwrap().expose(), dk2.expose());
    // Errors come back as their variants.
    assert!(matches!(
        kms.decrypt(&w, &ctx(9)),
        Err(KmsError::UnwrapFailed)
    ));
    assert!(matches!(
        kms.generate_data_key(Some("nope"), &ctx(1)),
        Err(KmsError::KeyNotFound(_))
    ));
    let rewrapped = kms.re_encrypt(&w, &ctx(1), Some("prod")).unwrap();
    assert_ne!(rewrapped.cmk_id, w.cmk_id);
    assert_eq!(
        kms.decrypt(&rewrapped, &ctx(1)).unwrap().expose(),
        dk.expose()
    );
    // Lifecycle through the daemon.
    let info = kms.change_key("backup-a", KeyChange::Disable).unwrap();
    assert_eq!(info.alias.as_deref(), Some("backup-a"));
    let e = kms.decrypt(&w, &ctx(1)).unwrap_err();
    assert!(matches!(e, KmsError::KeyDisabled(_)), "{e:?}");
    assert!(e.to_string().contains("kmsfs key enable"), "{e}");
    kms.change_key("backup-a", KeyChange::Enable).unwrap();
    kms.change_key("backup-a", KeyChange::ScheduleDeletion { days: 7 })
        .unwrap();
    assert!(matches!(
        kms.decrypt(&w, &ctx(1)),
        Err(KmsError::KeyPendingDeletion { .. })
    ));
    kms.change_key("backup-a", KeyChange::CancelDeletion)
        .unwrap();
    kms.change_key("backup-a", KeyChange::Enable).unwrap();
    let ext = kms
        .create_key(&kmsfs::kms::CreateKey {
            alias: Some("byok".into()),
            description: "external".into(),
            external: true,
        })
        .unwrap();
    assert!(matches!(
        kms.generate_data_key(Some(&ext.id), &ctx(3)),
        Err(KmsError::KeyPendingImport(_))
    ));
    let keys = kms.list_keys().unwrap();
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert_eq!(
        kms.describe_key("prod").unwrap().alias.as_deref(),
        Some("prod")
    );
    // Generation marks and volume notes.
    assert_eq!(kms.generation_mark(&[1; 16]).unwrap(), None);
    kms.record_generation(&[1; 16], 7).unwrap();
    kms.record_generation(&[1; 16], 3).unwrap();
    assert_eq!(kms.generation_mark(&[1; 16]).unwrap(), Some(7));
    kms.note_volume(&[1; 16], &w.cmk_id, "/srv/vol1").unwrap();
    let b = kms.describe_key("backup-a").unwrap();
    assert_eq!(b.volumes.len(), 1);
    assert_eq!(b.volumes[0].path, "/srv/vol1");
    // The audit names this process (the daemon's peer), not the daemon.
    let (report, records) = kms.audit_records().unwrap();
    report.unwrap();
    let me = std::process::id();
    let dec = records
        .iter()
        .rfind(|r| r.record.op == AuditOp::Decrypt && r.record.ok)
        .unwrap();
    assert_eq!((dec.record.caller.uid, dec.record.caller.pid), (0, me));
    assert!(
        !records
            .iter()
            .any(|r| r.record.caller.pid == d.pid() as u32)
    );
    // The CLI through the daemon: no keystore, no passphrase.
    let url = format!("unix:{}", sock.display());
    let o = Command::new(BIN)
        .args(["--kms", &url, "key", "list"])
        .env_remove("KMSFS_KEYSTORE")
        .env_remove("KMSFS_PASSPHRASE_FILE")
        .env("KMSFS_KEYSTORE", "/nonexistent/keystore")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("backup-a") && out.contains("prod"), "{out}");
    let o = Command::new(BIN)
        .args(["--kms", &url, "kms", "ping", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    // Latency through the daemon, and of the keystore itself for comparison.
    latency("through the KMS daemon", &*kms, &w, &ctx(1));
    let ks = kmsfs::kms::LocalKeystore::open_existing(
        &env.keystore,
        kmsfs::kms::Unlock::Passphrase(kmsfs::crypto::Passphrase::new(common::PASSPHRASE.into())),
    )
    .unwrap();
    latency("of the keystore in process", &ks, &w, &ctx(1));
    drop(kms);
    drop(d);
}

/// Runs as uid 65534 when re-executed by `policy_refuses_a_second_uid_and_audits_it`:
/// decrypts the wrapped keys given in the environment and prints one line per attempt.
#[test]
fn child_client() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut it = spec.split(' ');
    let sock = PathBuf::from(it.next().unwrap());
    let kms = client::open(&sock).unwrap();
    for item in it {
        let mut f = item.split(',');
        let (id, version, ct) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
        let w = WrappedKey {
            cmk_id: id.into(),
            cmk_version: version.parse().unwrap(),
            ciphertext: (0..ct.len() / 2)
                .map(|i| u8::from_str_radix(&ct[2 * i..2 * i + 2], 16).unwrap())
                .collect(),
        };
        match kms.decrypt(&w, &ctx(5)) {
            Ok(_) => println!("RESULT ok"),
            Err(e) => println!("RESULT err {e}"),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn policy_refuses_a_second_uid_and_audits_it() {
    require_root("the KMS daemon policy test (runs a client as uid 65534)");
    let (env, sock) = setup();
    let policy = env.root().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "version = 1\n[[rule]]\nuids = [0]\nkeys = [\"*\"]\noperations = [\"*\"]\n\n\
             [[rule]]\ndescription = \"nobody mounts backups\"\nuids = [{NOBODY}]\n\
             keys = [\"backup-*\"]\noperations = [\"decrypt\", \"describe\"]\n"
        ),
    )
    .unwrap();
    let _d = Daemon::start(&env, &sock, Some(&policy));
    // Non-root principals named by uid: the socket is open to all, the policy decides.
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666);
    let root = client::open(&sock).unwrap();
    let (_, wb) = root.generate_data_key(Some("backup-a"), &ctx(5)).unwrap();
    let (_, wp) = root.generate_data_key(Some("prod"), &ctx(5)).unwrap();
    // The test binary, re-run as nobody (copied where nobody may execute it).
    let exe = env.root().join("client-test-bin");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let spec = format!(
        "{} {},{},{} {},{},{}",
        sock.display(),
        wb.cmk_id,
        wb.cmk_version,
        hex(&wb.ciphertext),
        wp.cmk_id,
        wp.cmk_version,
        hex(&wp.ciphertext)
    );
    let child = Command::new(&exe)
        .args(["--exact", "child_client", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &spec)
        .current_dir("/")
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let child_pid = child.id();
    let o = child.wait_with_output().unwrap();
    let text = output_text(&o);
    assert!(o.status.success(), "{text}");
    let results: Vec<&str> = std::str::from_utf8(&o.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .collect();
    assert_eq!(results.len(), 2, "{text}");
    assert_eq!(results[0], "ok", "backup-* is granted: {text}");
    let denial = results[1];
    assert!(
        denial.contains(&format!(
            "uid {NOBODY} may not decrypt with key {} (prod)",
            wp.cmk_id
        )) && denial.contains(&format!("under policy {}", policy.display())),
        "{denial}"
    );
    // Audited with the caller's uid and pid, result refused.
    let (_, records) = root.audit_records().unwrap();
    let refused = records
        .iter()
        .find(|r| !r.record.ok && r.record.caller.uid == NOBODY)
        .expect("no refused record for uid 65534");
    assert_eq!(refused.record.op, AuditOp::Decrypt);
    assert_eq!(refused.record.key_id, wp.cmk_id);
    assert_eq!(refused.record.caller.pid, child_pid);
    assert_eq!(refused.record.volume_id, Some([5; 16]));
    assert!(refused.record.reason.contains("may not decrypt"));
    // The allowed unwrap is audited with nobody's uid too.
    assert!(
        records.iter().any(|r| r.record.ok
            && r.record.op == AuditOp::Decrypt
            && r.record.caller.uid == NOBODY)
    );
    // The CLI as nobody: `key list` shows only what nobody may describe; administration
    // and the audit log are refused with exit 4 and the policy named.
    let url = format!("unix:{}", sock.display());
    // The CLI copied where nobody may execute it (the checkout may sit in a
    // directory only root can enter).
    let cli = env.root().join("kmsfs-cli-bin");
    std::fs::copy(BIN, &cli).unwrap();
    std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new(&cli)
            .arg("--kms")
            .arg(&url)
            .args(args)
            .current_dir("/")
            .env("HOME", "/nonexistent")
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .unwrap()
    };
    let o = as_nobody(&["key", "list"]);
    assert!(o.status.success(), "{}", output_text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("backup-a") && !out.contains("prod"), "{out}");
    for args in [
        &["key", "disable", "backup-a"][..],
        &["key", "describe", "prod"],
        &["audit"],
    ] {
        let o = as_nobody(args);
        let t = output_text(&o);
        assert_eq!(o.status.code(), Some(4), "{args:?}: {t}");
        assert!(
            t.contains("uid 65534 may not") && t.contains("under policy"),
            "{t}"
        );
    }
}

#[test]
fn fifty_concurrent_clients() {
    require_root("the KMS daemon tests");
    let (env, sock) = setup();
    let _d = Daemon::start(&env, &sock, None);
    let root = client::open(&sock).unwrap();
    let (dk, w) = root.generate_data_key(Some("backup-a"), &ctx(7)).unwrap();
    let want = *dk.expose();
    let w = Arc::new(w);
    let start = Instant::now();
    let threads: Vec<_> = (0..50)
        .map(|_| {
            let (sock, w) = (sock.clone(), Arc::clone(&w));
            std::thread::spawn(move || {
                let kms = client::open(&sock).unwrap();
                for _ in 0..4 {
                    assert_eq!(*kms.decrypt(&w, &ctx(7)).unwrap().expose(), want);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    eprintln!(
        "50 concurrent clients x 4 decrypts through the daemon: {:?}",
        start.elapsed()
    );
    let (report, records) = root.audit_records().unwrap();
    report.unwrap();
    let decrypts = records
        .iter()
        .filter(|r| r.record.op == AuditOp::Decrypt && r.record.ok)
        .count();
    assert_eq!(decrypts, 200);
}

/// Sends raw bytes and reads until the daemon closes the connection.
fn raw(sock: &Path, bytes: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = u32::try_from(body.len()).unwrap().to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

#[test]
fn malformed_and_oversized_requests_close_only_that_connection() {
    require_root("the KMS daemon tests");
    let (env, sock) = setup();
    let d = Daemon::start(&env, &sock, None);
    let kms = client::open(&sock).unwrap();
    let (dk, w) = kms.generate_data_key(Some("prod"), &ctx(4)).unwrap();
    // A connection held open and idle across the bad ones.
    let mut idle = UnixStream::connect(&sock).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("oversized length", (1u32 << 30).to_le_bytes().to_vec()),
        ("64 KiB + 1", {
            let mut f = frame(&vec![1u8; 64 * 1024 + 1]);
            f.truncate(4 + 1000);
            f
        }),
        ("unknown version", frame(&[9, 3])),
        ("unknown operation", frame(&[1, 200])),
        ("truncated fields", frame(&[1, 3, 5, 0, 0, 0, b'c'])),
        ("trailing bytes", frame(&[1, 1, 0])),
        ("forged count", frame(&[1, 2, 0, 0xff, 0xff, 0xff, 0xff])),
        ("empty body", frame(&[])),
        ("cut-off frame", vec![10, 0, 0, 0, 1, 2]),
        ("garbage", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
    ];
    for (what, bytes) in &cases {
        let answer = raw(&sock, bytes);
        // An error answer (version 1, status 1) or nothing; then the connection closed.
        if !answer.is_empty() {
            assert!(answer.len() > 6, "{what}: {answer:?}");
            assert_eq!(&answer[4..6], &[1, 1], "{what}: {answer:?}");
        }
        // Others keep working.
        assert_eq!(
            kms.decrypt(&w, &ctx(4)).unwrap().expose(),
            dk.expose(),
            "{what}"
        );
    }
    // The idle connection still gets answers: a ping.
    idle.write_all(&frame(&[1, 1])).unwrap();
    let mut len = [0u8; 4];
    idle.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    idle.read_exact(&mut body).unwrap();
    assert_eq!(&body[..2], &[1, 0]);
    // A complete, well-formed request of exactly the bound is read (and refused for
    // what it says, not for its size), and the connection stays usable.
    let mut c = client::DaemonClient::connect(&sock).unwrap();
    let big = "x".repeat(64 * 1024 - 20);
    let e = c.describe_key(&big).unwrap_err();
    assert!(matches!(e, KmsError::KeyNotFound(_)), "{e:?}");
    assert!(c.ping().is_ok());
    c = client::DaemonClient::connect(&sock).unwrap();
    assert!(c.ping().is_ok());
    assert!(
        d.log_text().contains("more than the 65536 allowed"),
        "{}",
        d.log_text()
    );
}

#[test]
fn daemon_restart_while_a_client_reconnects() {
    require_root("the KMS daemon tests");
    let (env, sock) = setup();
    let mut d = Daemon::start(&env, &sock, None);
    let kms = client::open(&sock).unwrap();
    let (dk, w) = kms.generate_data_key(Some("prod"), &ctx(6)).unwrap();
    assert_eq!(kms.decrypt(&w, &ctx(6)).unwrap().expose(), dk.expose());
    // SIGTERM: a clean exit that removes the socket.
    let st = d.stop();
    assert!(st.success(), "{st:?}: {}", d.log_text());
    assert!(!sock.exists(), "the socket was left behind");
    // Restarted half a second later; the client's next call waits for it.
    let env2 = Arc::new(env);
    let (e2, s2) = (Arc::clone(&env2), sock.clone());
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        Daemon::start(&e2, &s2, None)
    });
    let t = Instant::now();
    assert_eq!(kms.decrypt(&w, &ctx(6)).unwrap().expose(), dk.expose());
    eprintln!("a call across a daemon restart took {:?}", t.elapsed());
    let mut d2 = restarter.join().unwrap();
    // Killed hard (SIGKILL): the stale socket stays; a new daemon replaces it.
    // SAFETY: kill with our child's pid.
    unsafe { libc::kill(d2.pid(), libc::SIGKILL) };
    let _ = d2.child.take().unwrap().wait();
    assert!(sock.exists());
    let d3 = Daemon::start(&env2, &sock, None);
    assert_eq!(kms.decrypt(&w, &ctx(6)).unwrap().expose(), dk.expose());
    drop(d3);
    // Down for good: a clear error within the bounded wait.
    let t = Instant::now();
    let e = kms.decrypt(&w, &ctx(6)).unwrap_err().to_string();
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert!(
        e.contains(&format!("unix:{}", sock.display()))
            && e.contains("kmsfs kms serve")
            && e.contains("systemctl"),
        "{e}"
    );
    // And through the CLI: exit 4, the same message.
    let o = Command::new(BIN)
        .args(["--kms", &format!("unix:{}", sock.display()), "key", "list"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", output_text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("kmsfs kms serve"));
    // A second daemon on a live socket is refused.
    let d4 = Daemon::start(&env2, &sock, None);
    let o = env2
        .cmd()
        .args(["kms", "serve", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already serves"));
    drop(d4);
}

#[test]
fn systemd_units_verify() {
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .iter()
        .find(|p| Path::new(p).exists())
    else {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd");
    let tmp = tempfile::tempdir().unwrap();
    // ExecStart must name an existing binary: point it at the one under test.
    for unit in ["kmsfs-kms.service", "kmsfs-kms.socket"] {
        let text = std::fs::read_to_string(root.join(unit)).unwrap();
        std::fs::write(tmp.path().join(unit), text.replace("/usr/bin/kmsfs", BIN)).unwrap();
    }
    let o = Command::new(analyze)
        .arg("verify")
        .arg(tmp.path().join("kmsfs-kms.socket"))
        .arg(tmp.path().join("kmsfs-kms.service"))
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .unwrap();
    let text = output_text(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("kmsfs-kms"),
        "warnings about the units: {text}"
    );
    let service = std::fs::read_to_string(root.join("kmsfs-kms.service")).unwrap();
    for needed in [
        "Type=notify",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "MemoryDenyWriteExecute=yes",
        "LimitMEMLOCK=infinity",
        "RestrictAddressFamilies=AF_UNIX",
    ] {
        assert!(service.contains(needed), "{needed}");
    }
}

#[test]
fn sd_notify_and_socket_activation() {
    require_root("the KMS daemon tests");
    let (env, sock) = setup();
    let std_listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let notify = env.root().join("notify.sock");
    let n = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    n.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&std_listener);
    // LISTEN_PID must be the daemon's own pid: `sh -c 'LISTEN_PID=$$ exec kmsfs ...'`.
    let mut sh = Command::new("/bin/sh");
    sh.args([
        "-c",
        "LISTEN_PID=$$ exec \"$0\" \"$@\"",
        BIN,
        "kms",
        "serve",
    ])
    .env("KMSFS_KDF_TEST_PARAMS", "1")
    .env("KMSFS_KEYSTORE", &env.keystore)
    .env("KMSFS_PASSPHRASE_FILE", &env.pass)
    .env("NOTIFY_SOCKET", &notify)
    .env("LISTEN_FDS", "1")
    .stdin(Stdio::null());
    // SAFETY: between fork and exec, only async-signal-safe calls: the listener becomes
    // fd 3, inheritable.
    unsafe {
        sh.pre_exec(move || {
            if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0);
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = sh
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Daemon {
        child: Some(child),
        _socket: sock.clone(),
        log: env.root().join("none"),
    };
    let mut buf = [0u8; 512];
    let len = n.recv(&mut buf).unwrap();
    let msg = String::from_utf8_lossy(&buf[..len]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    assert!(msg.contains(&format!("MAINPID={}", guard.pid())), "{msg}");
    drop(std_listener);
    let kms = client::open(&sock).unwrap();
    let (dk, w) = kms.generate_data_key(None, &ctx(8)).unwrap();
    assert_eq!(kms.decrypt(&w, &ctx(8)).unwrap().expose(), dk.expose());
    let st = guard.stop();
    assert!(st.success());
    let len = n.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..len]).contains("STOPPING=1"));
    // A socket systemd owns is left in place.
    assert!(sock.exists());
}
