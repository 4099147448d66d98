//! A real PyKMIP server on loopback for tests, with its own test PKI (made with openssl):
//! started per test, SIGKILLed by process group when dropped.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kmsfs::kms::kmip::KmipKms;
use kmsfs::kms::{Kms, KmsUrl};

pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An EC P-256 key and a certificate signed by `ca` (self-signed when `ca` is None).
pub fn make_cert(dir: &Path, name: &str, subject: &str, ca: Option<&str>, ext: &str) {
    let key = dir.join(format!("{name}.key"));
    let pem = dir.join(format!("{name}.pem"));
    run(Command::new("openssl")
        .args(["genpkey", "-algorithm", "EC", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-out", key.to_str().unwrap()]));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ext_file = dir.join(format!("{name}.ext"));
    std::fs::write(&ext_file, ext).unwrap();
    match ca {
        None => run(Command::new("openssl")
            .args(["req", "-x509", "-new", "-key"])
            .args([
                key.to_str().unwrap(),
                "-out",
                pem.to_str().unwrap(),
                "-days",
                "2",
                "-subj",
                subject,
                "-extensions",
                "v3_ca",
            ])),
        Some(ca) => {
            let csr = dir.join(format!("{name}.csr"));
            run(Command::new("openssl").args(["req", "-new", "-key"]).args([
                key.to_str().unwrap(),
                "-out",
                csr.to_str().unwrap(),
                "-subj",
                subject,
            ]));
            run(Command::new("openssl").args(["x509", "-req", "-in"]).args([
                csr.to_str().unwrap(),
                "-CA",
                dir.join(format!("{ca}.pem")).to_str().unwrap(),
                "-CAkey",
                dir.join(format!("{ca}.key")).to_str().unwrap(),
                "-CAcreateserial",
                "-out",
                pem.to_str().unwrap(),
                "-days",
                "2",
                "-extfile",
                ext_file.to_str().unwrap(),
            ]));
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Certificates in a temp dir: `ca` signs `server` and `client`; `other_ca` signs
/// `stranger` (a client the server does not trust).
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        make_cert(d, "ca", "/CN=kmsfs test CA", None, "");
        make_cert(
            d,
            "server",
            "/CN=127.0.0.1",
            Some("ca"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        );
        make_cert(
            d,
            "client",
            "/CN=kmsfs-client",
            Some("ca"),
            "extendedKeyUsage=clientAuth\n",
        );
        make_cert(d, "other_ca", "/CN=another CA", None, "");
        make_cert(
            d,
            "stranger",
            "/CN=kmsfs-client",
            Some("other_ca"),
            "extendedKeyUsage=clientAuth\n",
        );
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A KMIP URL for `port` and `key`, as client `client` trusting `ca`.
    pub fn url(&self, port: u16, key: &str, client: &str, ca: &str, extra: &str) -> KmsUrl {
        KmsUrl::parse(&self.url_string(port, key, client, ca, extra)).unwrap()
    }

    /// [`Pki::url`] as the string a user passes to `--kms` or `-o kms=`.
    pub fn url_string(&self, port: u16, key: &str, client: &str, ca: &str, extra: &str) -> String {
        let state = self.path("state");
        format!(
            "kmip://127.0.0.1:{port}/{key}?cert={}&key={}&ca={}&state_dir={}&timeout=5{extra}",
            self.path(&format!("{client}.pem")).display(),
            self.path(&format!("{client}.key")).display(),
            self.path(&format!("{ca}.pem")).display(),
            state.display(),
        )
    }
}

/// A running pykmip-server; SIGKILLed by PID on drop.
pub struct Server {
    child: Child,
    pub port: u16,
    pub pki: Pki,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn pykmip_server_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("pykmip-server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "pykmip-server is not installed: run `pip install pykmip` (scripts/setup.sh does it) to run the KMIP tests"
            )
        })
}

pub fn spawn(bin: &Path, d: &Path, conf: &Path) -> Child {
    let log = std::fs::File::create(d.join("server.out")).unwrap();
    Command::new(bin)
        .arg("-f")
        .arg(conf)
        .arg("-l")
        .arg(d.join("server.log"))
        .arg("-o")
        .arg(d.join("policies"))
        // Python's multiprocessing makes its pymp-* directories here, removed
        // with the test's temporary directory (in /tmp they stayed behind).
        .env("TMPDIR", d)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start pykmip-server")
}

impl Server {
    pub fn start() -> Server {
        let bin = pykmip_server_binary();
        let pki = Pki::new();
        let d = pki.dir.path();
        let port = free_port();
        let conf = d.join("server.conf");
        std::fs::create_dir_all(d.join("policies")).unwrap();
        std::fs::write(
            &conf,
            format!(
                "[server]\nhostname=127.0.0.1\nport={port}\ncertificate_path={}\nkey_path={}\n\
                 ca_path={}\nauth_suite=TLS1.2\nenable_tls_client_auth=True\n\
                 logging_level=INFO\ndatabase_path={}\n",
                d.join("server.pem").display(),
                d.join("server.key").display(),
                d.join("ca.pem").display(),
                d.join("pykmip.db").display(),
            ),
        )
        .unwrap();
        let child = spawn(&bin, d, &conf);
        let server = Server { child, port, pki };
        server.wait_ready();
        server
    }

    /// PyKMIP ignores SIGTERM, and forks helpers (a multiprocessing manager, the policy
    /// monitor): SIGKILL its process group, led by its PID.
    pub fn kill(&mut self) {
        let pid = i32::try_from(self.child.id()).unwrap();
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }

    /// Kills the server and starts it again on the same port and database.
    pub fn restart(&mut self) {
        self.kill();
        let d = self.pki.dir.path();
        self.child = spawn(&pykmip_server_binary(), d, &d.join("server.conf"));
        self.wait_ready();
    }

    /// Waits until the port accepts TLS and answers KMIP.
    pub fn wait_ready(&self) {
        let t0 = Instant::now();
        let admin = loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                let url = self.url("none");
                if let Ok(k) = KmipKms::connect(&url)
                    && k.key_state("none").is_ok()
                {
                    break k;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "pykmip-server did not come up on port {} within 60 s; its output: {}\n{}",
                self.port,
                std::fs::read_to_string(self.pki.path("server.out")).unwrap_or_default(),
                std::fs::read_to_string(self.pki.path("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        drop(admin);
    }

    pub fn url(&self, key: &str) -> KmsUrl {
        self.pki.url(self.port, key, "client", "ca", "")
    }

    /// An administrative client.
    pub fn admin(&self) -> KmipKms {
        KmipKms::connect(&self.url("none")).unwrap()
    }

    /// A fresh Active AES-256 key's UID.
    pub fn new_key(&self) -> String {
        self.admin().create_aes256_key().unwrap()
    }

    pub fn kms(&self, key: &str) -> Arc<dyn Kms> {
        kmsfs::kms::kmip::open(&self.url(key)).unwrap()
    }
}
