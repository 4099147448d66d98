//! `kmsfs kms serve`: the KMS daemon (see `docs/KMS-DAEMON.md`), and `kmsfs kms ping`.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Args, Subcommand};

use super::{CliError, KeyArgs, MountOpts, Result, open_keystore, unlock_existing};
use crate::kms::policy::Policy;

/// Where the daemon listens by default (and where `kmsfs-kms.socket` puts it).
pub(super) const DEFAULT_SOCKET: &str = "/run/kmsfs/kms.sock";

#[derive(Subcommand, Debug)]
pub(super) enum KmsCmd {
    /// Serve the keystore's keys on a Unix socket (the KMS daemon): mounts and key
    /// commands then use `--kms unix:PATH` and never read the keystore or a passphrase
    #[command(after_help = SERVE_NOTES)]
    Serve(ServeArgs),
    /// Ask a KMS daemon who it is and who it sees you as (uid, gid)
    Ping {
        /// The daemon's socket
        #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

const SERVE_NOTES: &str = "The keystore is opened once, with the usual --keystore, \
--passphrase-file / --keyfile (or KMSFS_KEYSTORE, KMSFS_PASSPHRASE_FILE, KMSFS_KEYFILE). Without \
--policy only root may use the daemon. The socket is made 0600 when the policy names only root, \
0660 with the group when it names its non-root principals by one group, else 0666 (every request \
is still checked against the policy with the caller's kernel credentials); a [socket] table in \
the policy sets mode and group explicitly. Under systemd socket activation (LISTEN_FDS) the \
socket comes from systemd and --socket is ignored; with NOTIFY_SOCKET set, READY=1 is sent once \
serving. SIGTERM or SIGINT stop the daemon after the requests in progress, removing the socket \
it made.";

#[derive(Args, Debug)]
pub(super) struct ServeArgs {
    /// Socket to listen on [default: /run/kmsfs/kms.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Access policy (TOML: which uids/gids may use which keys for what); without it
    /// only root may use the daemon
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
}

pub(super) fn cmd_kms(keys: &KeyArgs, c: KmsCmd) -> Result<()> {
    match c {
        KmsCmd::Serve(a) => serve(keys, a),
        KmsCmd::Ping { socket } => {
            let c = crate::kms::client::DaemonClient::connect(&socket)?;
            let i = c.ping()?;
            println!(
                "KMS daemon unix:{}: pid {}, kmsfs {}; it sees you as uid {} gid {}",
                socket.display(),
                i.pid,
                i.version,
                i.uid,
                i.gid
            );
            Ok(())
        }
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn serve(keys: &KeyArgs, a: ServeArgs) -> Result<()> {
    super::init_logger();
    if keys.kms.is_some() {
        return Err(CliError::usage(
            "`kms serve` serves a keystore: give --keystore (and its passphrase file or keyfile), not --kms",
        ));
    }
    // Nothing of this process may end up in a core dump or be read by ptrace of
    // another user's process.
    if let Err(e) = crate::sys::set_not_dumpable() {
        log::warn!("cannot make the daemon non-dumpable: {e}");
    }
    let policy = match &a.policy {
        Some(p) => Policy::load(p).map_err(CliError::usage)?,
        None => {
            let mut p = Policy::root_only();
            let euid = nix::unistd::geteuid().as_raw();
            if euid != 0 {
                p = Policy::parse(&format!(
                    "[[rule]]\nuids = [0, {euid}]\nkeys = [\"*\"]\noperations = [\"*\"]\n"
                ))
                .map_err(CliError::error)?;
            }
            p
        }
    };
    let activated = listen_fds();
    // The keystore first: a wrong passphrase leaves no socket behind.
    let (ks_path, unlock) = unlock_existing(keys, &MountOpts::default())?;
    let ks = open_keystore(&ks_path, unlock)?;
    let (listener, made) = match activated {
        Some(l) => {
            log::info!("serving on the socket systemd passed (socket activation)");
            (l, None)
        }
        None => {
            let path = a.socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
            let (l, id) = bind(&path, &policy)?;
            (l, Some((path, id)))
        }
    };
    lock_memory();
    // SAFETY: installing async-signal-safe handlers (an atomic store) and SIG_IGN.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_stop as *const () as usize;
        libc::sigemptyset(&raw mut sa.sa_mask);
        libc::sigaction(libc::SIGTERM, &raw const sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGINT, &raw const sa, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    // Relays the signal flag to the server (which polls `stop`).
    let relay = std::thread::spawn(move || {
        while !STOP.load(Ordering::SeqCst) && !stop2.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        stop2.store(true, Ordering::SeqCst);
    });
    log::info!(
        "KMS daemon serving keystore {} {} (pid {})",
        ks_path.display(),
        policy.describe(),
        std::process::id()
    );
    sd_notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS=serving keystore {}",
        std::process::id(),
        ks_path.display()
    ));
    let res = crate::kms::server::serve(ks, listener, policy, Arc::clone(&stop));
    stop.store(true, Ordering::SeqCst);
    let _ = relay.join();
    sd_notify("STOPPING=1");
    if let Some((path, id)) = made {
        // Remove our socket only (not whatever may have replaced it).
        if let Ok(m) = std::fs::symlink_metadata(&path)
            && (m.dev(), m.ino()) == id
        {
            let _ = std::fs::remove_file(&path);
        }
    }
    log::info!("KMS daemon stopped");
    res.map_err(|e| CliError::error(format!("the KMS daemon failed: {e}")))
}

/// The listening socket systemd passed (LISTEN_PID = this process, LISTEN_FDS >= 1: fd 3).
fn listen_fds() -> Option<UnixListener> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let n: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || n < 1 {
        return None;
    }
    const FIRST: RawFd = 3;
    // SAFETY: systemd hands this process fd 3 (and closes nothing of it later); we take
    // ownership once. The variables are removed so no child inherits the claim.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
        libc::fcntl(FIRST, libc::F_SETFD, libc::FD_CLOEXEC);
        Some(UnixListener::from(OwnedFd::from_raw_fd(FIRST)))
    }
}

/// Binds the socket at `path` (created 0600, then given the mode and group the policy
/// calls for); returns it and its (device, inode).
fn bind(path: &Path, policy: &Policy) -> Result<(UnixListener, (u64, u64))> {
    let io = |what: &str, e: std::io::Error| {
        CliError::error(format!("socket {}: {what}: {e}", path.display()))
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(dir)
            .map_err(|e| io("cannot create its directory", e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(CliError::error(format!(
                    "another process already serves the socket {}; stop it first (`systemctl stop kmsfs-kms`), or choose another --socket",
                    path.display()
                )));
            }
            std::fs::remove_file(path).map_err(|e| io("cannot remove the stale socket", e))?;
        }
        Ok(_) => {
            return Err(CliError::error(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            )));
        }
        Err(_) => {}
    }
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = bound.map_err(|e| io("cannot bind", e))?;
    let (mode, gid) = socket_access(policy);
    if let Some(g) = gid {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(g)))
            .map_err(|e| io("cannot set its group", e.into()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io("cannot set its mode", e))?;
    let m = std::fs::symlink_metadata(path).map_err(|e| io("cannot stat", e))?;
    log::info!(
        "listening on {} (mode {mode:04o}, group {})",
        path.display(),
        m.gid()
    );
    Ok((l, (m.dev(), m.ino())))
}

/// The socket's mode and group: as `[socket]` says, else 0600 for root-only policies,
/// 0660 with the group when the non-root principals are one group, else 0666 (the
/// policy is still enforced per request by the kernel's credentials).
fn socket_access(policy: &Policy) -> (u32, Option<u32>) {
    let euid = nix::unistd::geteuid().as_raw();
    let spec = &policy.socket;
    if spec.mode.is_some() || spec.gid.is_some() {
        return (spec.mode.unwrap_or(0o660), spec.gid);
    }
    if policy.root_only_principals() || (policy.source.is_none() && euid != 0) {
        return (0o600, None);
    }
    if let Some(g) = policy.single_group() {
        return (0o660, Some(g));
    }
    (0o666, None)
}

/// `mlockall` so key material is never swapped out: current and future pages when the
/// memory lock limit allows it (unlimited, or CAP_IPC_LOCK), else current pages only.
fn lock_memory() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut lim) };
    let future = lim.rlim_cur == libc::RLIM_INFINITY || has_cap_ipc_lock();
    let flags = if future {
        libc::MCL_CURRENT | libc::MCL_FUTURE | crate::sys::MCL_ONFAULT
    } else {
        libc::MCL_CURRENT | crate::sys::MCL_ONFAULT
    };
    // SAFETY: mlockall with flag constants.
    let mut r = unsafe { libc::mlockall(flags) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // Kernels before 4.4 have no MCL_ONFAULT.
        // SAFETY: as above.
        r = unsafe { libc::mlockall(flags & !crate::sys::MCL_ONFAULT) };
    }
    if r != 0 {
        log::warn!(
            "cannot lock the daemon's memory (mlockall: {}); key material may be swapped out. Raise the memory lock limit (LimitMEMLOCK=infinity in the unit) or run as root",
            std::io::Error::last_os_error()
        );
    } else if !future {
        log::warn!(
            "the memory lock limit is {} bytes: only the memory in use now is locked, not what the daemon allocates later; set LimitMEMLOCK=infinity",
            lim.rlim_cur
        );
    }
}

const CAP_IPC_LOCK: u32 = 14;

/// Whether CAP_IPC_LOCK is in the effective set (from /proc/self/status).
fn has_cap_ipc_lock() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Sends `state` to systemd when NOTIFY_SOCKET is set (path or `@abstract`).
fn sd_notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = target.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            Err(std::io::Error::other("abstract sockets are Linux-only"))
        }
    } else {
        sock.send_to(state.as_bytes(), Path::new(&target))
    };
    if let Err(e) = sent {
        log::warn!("cannot notify systemd ({e})");
    }
}
