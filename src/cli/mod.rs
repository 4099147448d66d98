//! The command line: `kmsfs init | mount | info | fsck`, and the same binary as
//! the mount(8) helper `mount.kmsfs` (chosen by argv[0]) and as the program
//! mount.fuse3 runs for `fuse.kmsfs` entries (`kmsfs VOLUME MOUNTPOINT -o …`).
//!
//! Arguments are parsed once into a resolved plan (keystore, unlock secret,
//! volume, mount settings), with this precedence: command-line flags, then
//! `-o` mount options, then environment variables, then defaults.
//!
//! `mount` without `-f` forks before anything else happens (the process is
//! still single-threaded). The child opens the keystore and the volume, mounts,
//! and reports readiness, or the error with its exit code, through a pipe; the
//! parent exits with that status, so `mount` returns once the filesystem is
//! usable. The daemon then logs to a file, commits every few seconds, and on
//! SIGTERM/SIGINT/SIGHUP unmounts, which ends the session with a final commit.
//!
//! Exit codes are in [`exit`] and docs/EXIT-CODES.md. Every error is printed as
//! one line `kmsfs: <message>`.
//!
//! Testing aid, only in builds with the `test-hooks` feature (never a release):
//! `KMSFS_KDF_TEST_PARAMS=1` creates new keystores with the cheap Argon2id
//! profile (`KdfParams::for_tests`). Other builds ignore the variable.

mod audit;
mod fsck;
mod key;
mod keystore;
mod kms;
mod migrate;
mod mount;
mod object;
mod salvage;
mod send;
mod snapshot;
mod systemd;
mod umount;
mod unlock;

use fsck::*;
use mount::*;
use snapshot::*;
use unlock::*;

use std::collections::HashSet;
use std::ffi::{CString, OsString};
use std::fs::{self, File, OpenOptions as FsOpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use fuser::{MountOption, Session, SessionUnmounter};
use serde::Serialize;

use crate::control::ControlServer;
use crate::crypto::{CipherKind, KdfParams, Passphrase};
use crate::error::Error;
use crate::format::{self, FileKind};
use crate::fuse::{KmsFs, MountSettings};
use crate::kms::{Kms, KmsError, LocalKeystore, Unlock};
use crate::store::FsStorage;
use crate::volume::{CreateOptions, OpenOptions, ROOT_INO, Volume};

/// Process exit codes (docs/EXIT-CODES.md).
pub mod exit {
    pub const OK: i32 = 0;
    /// Any other error (I/O, mount failure, bad volume directory…).
    pub const ERROR: i32 = 1;
    /// Bad command line or mount option.
    pub const USAGE: i32 = 2;
    /// fsck found damage, or an integrity error stopped the command.
    pub const INTEGRITY: i32 = 3;
    /// Key or keystore problem: wrong passphrase, disabled or missing key, no secret given.
    pub const KEY: i32 = 4;
    /// The volume is busy: locked by another read-write mount.
    pub const BUSY: i32 = 5;
}

const ENV_KEYSTORE: &str = "KMSFS_KEYSTORE";
const ENV_PASSPHRASE_FILE: &str = "KMSFS_PASSPHRASE_FILE";
const ENV_KEYFILE: &str = "KMSFS_KEYFILE";
const ENV_KMS: &str = "KMSFS_KMS";
const ENV_KDF_TEST: &str = "KMSFS_KDF_TEST_PARAMS";
/// Decrypted-block cache of a mount unless `cache_size=` says otherwise.
const DEFAULT_CACHE: u64 = 256 << 20;
/// Cache for `info` and `fsck`, which read each block about once.
const TOOL_CACHE: usize = 32 << 20;
/// Freed heap the daemon may keep for reuse, per allocator arena (see `serve`;
/// glibc trims every arena at this threshold, and there are
/// [`crate::sys::MALLOC_ARENAS`] of them).
const TRIM_THRESHOLD: usize = 8 << 20;

/// Peak memory (RSS) of a mount daemon with the decrypted-block cache
/// `cache_bytes` and `threads` request threads; docs/ARCHITECTURE.md explains
/// each term, tests/mount_memory.rs checks it.
pub fn memory_bound(cache_bytes: usize, threads: usize) -> usize {
    const BASE: usize = 32 << 20; // code, libraries, the keystore, small tables
    let node_cache = (cache_bytes / 4).max(1 << 20);
    // Buffered data, and its sealed copy while it is written back.
    let dirty = 2 * crate::volume::dirty_limit(cache_bytes);
    // Per request thread: the 1 MiB request buffer, a write's plaintext and
    // sealed copies (1 MiB each), and two 2 MiB buffers of reads (the reply,
    // and the sealed bytes read with O_DIRECT; each in a huge page where the
    // kernel gives one).
    let per_thread = 7 << 20;
    BASE + cache_bytes
        + node_cache
        + dirty
        + threads * per_thread
        + crate::sys::MALLOC_ARENAS * TRIM_THRESHOLD
}
/// How long a mount waits for the lock of a volume whose previous daemon is
/// finishing its final commit after an unmount.
const LOCK_WAIT: Duration = Duration::from_secs(60);
const MAX_PASSPHRASE: usize = 4096;

/// An error on its way out: exit code and the one-line message.
#[derive(Debug)]
pub struct CliError {
    pub code: i32,
    pub msg: String,
}

impl CliError {
    pub fn new(code: i32, msg: impl Into<String>) -> Self {
        CliError {
            code,
            msg: msg.into(),
        }
    }
    fn usage(msg: impl Into<String>) -> Self {
        Self::new(exit::USAGE, msg)
    }
    fn error(msg: impl Into<String>) -> Self {
        Self::new(exit::ERROR, msg)
    }
    fn key(msg: impl Into<String>) -> Self {
        Self::new(exit::KEY, msg)
    }
}

impl From<Error> for CliError {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::Integrity { .. } | Error::Rollback { .. } | Error::Stream(_) => exit::INTEGRITY,
            Error::Kms(_) => exit::KEY,
            Error::Locked(_) => exit::BUSY,
            _ => exit::ERROR,
        };
        CliError::new(code, e.to_string())
    }
}

impl From<KmsError> for CliError {
    fn from(e: KmsError) -> Self {
        CliError::key(e.to_string())
    }
}

type Result<T, E = CliError> = std::result::Result<T, E>;

// ----- command line ----------------------------------------------------------

#[derive(Parser, Debug)]
#[command(
    name = "kmsfs",
    version,
    about = "Encrypted FUSE filesystem with envelope key management",
    after_help = "Exit codes: 0 ok, 1 error, 2 usage, 3 integrity problem, 4 key/keystore problem, 5 volume busy.\n\
                  `kmsfs VOLUME_DIR MOUNTPOINT -o OPTIONS` (as mount.fuse3 calls it) is `kmsfs mount`."
)]
struct Cli {
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    s3: object::S3Args,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Default, Clone)]
struct KeyArgs {
    /// Keystore file [env: KMSFS_KEYSTORE] [default: /var/lib/kmsfs/keystore for root,
    /// else $XDG_DATA_HOME/kmsfs/keystore]
    #[arg(long, global = true, value_name = "PATH")]
    keystore: Option<PathBuf>,
    /// File holding the keystore passphrase [env: KMSFS_PASSPHRASE_FILE]
    #[arg(long, global = true, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// Keyfile unlocking the keystore instead of a passphrase [env: KMSFS_KEYFILE]
    #[arg(long, global = true, value_name = "FILE")]
    keyfile: Option<PathBuf>,
    /// Use a KMS elsewhere instead of the keystore: unix:/PATH (kmsfs kms serve),
    /// openbao+http(s)://HOST:PORT/KEY (or vault+…), kmip://HOST:PORT/KEY-UID
    /// [env: KMSFS_KMS]
    #[arg(long, global = true, value_name = "URL")]
    kms: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new volume in VOLUME_DIR (created if missing; must be empty)
    Init(InitArgs),
    /// Mount a volume; returns once the mount is ready, leaving a daemon
    #[command(after_help = MOUNT_NOTES)]
    Mount(MountArgs),
    /// Unmount, returning once the daemon's final commit is done (a plain
    /// umount returns before it): use it before copying the volume directory
    Umount {
        mountpoint: PathBuf,
        /// Lazy unmount: detach now, even if files are still open under it
        #[arg(short = 'l', long)]
        lazy: bool,
        /// Say what is waited for
        #[arg(short = 'v', long)]
        verbose: bool,
    },
    /// Show a volume's parameters and sizes (never a secret); works while mounted
    Info(InfoArgs),
    /// Verify every sealed block and the metadata; exit 3 if anything is damaged
    Fsck(FsckArgs),
    /// Copy-on-write snapshots: create, list, delete, restore
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Create a new, independent volume from a snapshot (shares the data key; nothing is re-encrypted)
    Clone(CloneArgs),
    /// Reclaim the space of deleted and overwritten data now (through the mount when mounted)
    Clean {
        volume_dir: PathBuf,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Write a snapshot's sealed blocks, as stored, as a stream (to a backup host
    /// without the key); --from BASE for an incremental
    Send(send::SendArgs),
    /// Make or extend a volume from a `kmsfs send` stream; needs no key
    Receive(send::ReceiveArgs),
    /// Copy every file that still verifies out of a (damaged) volume into DEST;
    /// exit 3 if anything was damaged
    Salvage(salvage::SalvageArgs),
    /// Customer master keys: create, list, describe, enable, disable, rotate, delete, import (BYOK)
    #[command(subcommand)]
    Key(key::KeyCmd),
    /// Re-wrap a volume's data key under the newest version of its key, or another key,
    /// without touching any data (through the mount when mounted)
    Rewrap(key::RewrapArgs),
    /// The KMS audit trail: every key use; `audit verify` checks its MAC chain
    Audit(audit::AuditArgs),
    /// The keystore itself: passwd, backup, restore
    #[command(subcommand)]
    Keystore(keystore::KeystoreCmd),
    /// The KMS daemon: serve the keystore's keys on a Unix socket (`kms serve`)
    #[command(subcommand)]
    Kms(kms::KmsCmd),
    /// Copy a plaintext tree onto a mounted volume with rsync (resumable), then verify
    /// every entry through the mount; --verify-only compares alone (exit 3 on a difference)
    Migrate(migrate::MigrateArgs),
    /// Print a systemd .mount unit for a volume (ordering for boot and shutdown, as from fstab)
    SystemdUnit(systemd::SystemdUnitArgs),
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Take a snapshot (also of a volume mounted read-write: the mount takes it and keeps serving)
    Create { volume_dir: PathBuf, name: String },
    /// List snapshots: name, creation time, generation, bytes only it holds, bytes shared
    List {
        volume_dir: PathBuf,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot; the blocks only it used are reclaimed
    Delete { volume_dir: PathBuf, name: String },
    /// Make the live tree the snapshot's (the volume must be unmounted; later snapshots stay)
    Restore {
        volume_dir: PathBuf,
        name: String,
        /// Confirm that the live tree is replaced
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args, Debug)]
struct CloneArgs {
    /// The origin volume
    volume_dir: PathBuf,
    /// The snapshot to clone
    snapshot: String,
    /// The new volume's directory (created if missing; must be empty)
    new_volume_dir: PathBuf,
}

#[derive(Args, Debug)]
struct InitArgs {
    /// Directory for the volume's encrypted storage
    volume_dir: PathBuf,
    /// CMK id or alias wrapping the volume's data key [default: the keystore's service key]
    #[arg(long, value_name = "ID|ALIAS")]
    cmk: Option<String>,
    /// Block cipher
    #[arg(long, default_value = "aes-256-gcm-siv", value_parser = ["aes-256-gcm-siv", "xchacha20-poly1305"])]
    cipher: String,
    /// Block size, a power of two from 4K to 1M (accepts 64K, 1M, 65536)
    #[arg(long, value_name = "SIZE", default_value = "64K")]
    block_size: String,
    /// Segment file size, 1M to 1G (accepts 32M, 33554432)
    #[arg(long, value_name = "SIZE", default_value = "32M")]
    segment_size: String,
}

#[derive(Args, Debug)]
struct MountArgs {
    /// The volume directory
    volume_dir: PathBuf,
    /// Where to mount it
    mountpoint: PathBuf,
    /// Comma-separated options: ro, rw, allow_other, default_permissions, cache_size=SIZE,
    /// readahead=KIB (kernel readahead window, default 4096; 0 keeps the kernel's), clone_fd (a /dev/fuse clone per request thread, Linux), noblockfill (no page-cache fill of the rest of a block after a small read), spin=USEC (after a request the /dev/fuse reader polls up to USEC microseconds for the next before it sleeps, default 50, 0 sleeps at once; Linux), uring=auto|on|off (FUSE over io_uring, Linux 6.14+: auto uses it when /sys/module/fuse/parameters/enable_uring is Y, on fails without it, off never), keystore=PATH, passphrase_file=PATH, keyfile=PATH, kms=URL, snapshot=NAME, log=PATH, and the
    /// generic options mount(8) passes (accepted; kernel flags such as nodev are applied)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Stay in the foreground (log to stderr unless log= is given)
    #[arg(short = 'f', long)]
    foreground: bool,
    /// Mount read-only
    #[arg(long)]
    read_only: bool,
    /// Mount this snapshot (read-only)
    #[arg(long, value_name = "NAME")]
    snapshot: Option<String>,
}

#[derive(Args, Debug)]
struct InfoArgs {
    volume_dir: PathBuf,
    /// Machine-readable output
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct FsckArgs {
    volume_dir: PathBuf,
    /// Machine-readable output
    #[arg(long)]
    json: bool,
    /// Accept that the volume is older than the keystore recorded (a deliberate
    /// restore from backup): opens it read-write once and moves it past the mark
    #[arg(long)]
    accept_rollback: bool,
    /// Repair (the volume must be unmounted): rewrite damaged tree node copies,
    /// fix broken entries and link counts, move files with damaged data to
    /// /lost+found (holes where the damage was, the old path in the xattr
    /// user.kmsfs.lost-path); exit 0 when clean afterwards, 3 when damage remains
    #[arg(long)]
    repair: bool,
}

/// `mount.kmsfs SPEC DIR [-sfnv] [-o OPTIONS] [-t TYPE]`, as mount(8) runs helpers.
#[derive(Parser, Debug)]
#[command(
    name = "mount.kmsfs",
    version,
    about = "mount(8) helper for kmsfs volumes"
)]
struct HelperCli {
    /// The volume directory
    volume_dir: PathBuf,
    /// Where to mount it
    mountpoint: PathBuf,
    /// Mount options (see `kmsfs mount --help`)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Do not write /etc/mtab (accepted; there is none to write)
    #[arg(short = 'n')]
    no_mtab: bool,
    /// Sloppy: ignore unknown mount options
    #[arg(short = 's')]
    sloppy: bool,
    /// Fake: check everything but do not mount
    #[arg(short = 'f')]
    fake: bool,
    /// Verbose
    #[arg(short = 'v')]
    verbose: bool,
    /// Filesystem type (accepted)
    #[arg(short = 't', value_name = "TYPE")]
    fstype: Option<String>,
    /// Mount namespace (not supported; accepted only when empty)
    #[arg(short = 'N', value_name = "NS")]
    namespace: Option<String>,
}

const MOUNT_NOTES: &str = "\
allow_other implies default_permissions: the kernel then enforces modes and POSIX ACLs.
The daemon logs to log=PATH (default /var/log/kmsfs/<volume-id>.log for root,
$XDG_STATE_HOME/kmsfs/<volume-id>.log otherwise). `umount MOUNTPOINT`,
`fusermount3 -u MOUNTPOINT` or SIGTERM to the daemon commit and end it (`kmsfs umount
MOUNTPOINT` also waits for that final commit); changes are also committed on fsync, 0.5 s
after writes go idle, and every 5 s under steady writes. A second read-write mount of the
volume is refused (exit 5); read-only and snapshot mounts may run alongside.";

const SUBCOMMANDS: &[&str] = &[
    "init",
    "mount",
    "umount",
    "info",
    "fsck",
    "snapshot",
    "clone",
    "send",
    "receive",
    "clean",
    "salvage",
    "key",
    "rewrap",
    "audit",
    "keystore",
    "kms",
    "migrate",
    "systemd-unit",
    "help",
];

/// The clap definitions of `kmsfs` and of `mount.kmsfs`, for the man pages and shell
/// completions (examples/gen_docs.rs).
pub fn clap_commands() -> (clap::Command, clap::Command) {
    use clap::CommandFactory;
    (Cli::command(), HelperCli::command())
}

/// Entry point of the binary; returns the process exit code.
pub fn main() -> i32 {
    let args: Vec<OsString> = std::env::args_os().collect();
    let prog = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let r = if prog.starts_with("mount.kmsfs") || prog.starts_with("mount.fuse.kmsfs") {
        run_helper(args)
    } else {
        run(args)
    };
    match r {
        Ok(()) => exit::OK,
        Err(e) => {
            if !e.msg.is_empty() {
                eprintln!("kmsfs: {}", e.msg);
            }
            e.code
        }
    }
}

/// Parses arguments; help and version print and exit 0, usage errors become
/// one line `kmsfs: <what is wrong>; see --help` with exit code 2.
fn parse_or_exit<P: Parser>(args: Vec<OsString>) -> Result<P> {
    P::try_parse_from(args).map_err(|e| {
        if !e.use_stderr() {
            let _ = e.print();
            return CliError::new(exit::OK, "");
        }
        // The message is the first paragraph of clap's text, on one line.
        let rendered = e.to_string();
        let para: Vec<&str> = rendered
            .lines()
            .take_while(|l| !l.trim().is_empty())
            .map(str::trim)
            .collect();
        let msg = para.join(" ");
        let msg = msg.trim_start_matches("error: ");
        CliError::usage(format!("{msg}; see --help"))
    })
}

fn run(mut args: Vec<OsString>) -> Result<()> {
    // mount.fuse3 runs `kmsfs VOLUME MOUNTPOINT -o OPTIONS`.
    if let Some(first) = args.get(1) {
        let s = first.to_string_lossy();
        if !s.starts_with('-') && !SUBCOMMANDS.contains(&s.as_ref()) && Path::new(first).is_dir() {
            args.insert(1, "mount".into());
        }
    }
    let cli: Cli = parse_or_exit(args)?;
    object::set_args(cli.s3.clone())?;
    if !matches!(cli.command, Command::Mount(_)) {
        // A reader that goes away (`kmsfs info VOL | head -1`) ends the
        // command quietly, as with any Unix tool, instead of a panic in
        // println!. Not for mount: its daemon must survive a client that
        // closes a socket early.
        // SAFETY: signal() with a valid signal number and SIG_DFL.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.command {
        Command::Init(a) => cmd_init(&cli.keys, a),
        Command::Mount(a) => {
            let plan = plan_mount(&cli.keys, a, false)?;
            cmd_mount(plan)
        }
        Command::Umount {
            mountpoint,
            lazy,
            verbose,
        } => umount::unmount(&mountpoint, lazy, verbose),
        Command::Info(a) => cmd_info(&cli.keys, a),
        Command::Fsck(a) => cmd_fsck(&cli.keys, a),
        Command::Snapshot(c) => cmd_snapshot(&cli.keys, c),
        Command::Clone(a) => cmd_clone(&cli.keys, a),
        Command::Clean { volume_dir, json } => cmd_clean(&cli.keys, &volume_dir, json),
        Command::Send(a) => send::cmd_send(&cli.keys, a),
        Command::Receive(a) => send::cmd_receive(a),
        Command::Salvage(a) => salvage::run(&cli.keys, a),
        Command::Key(c) => key::cmd_key(&cli.keys, c),
        Command::Rewrap(a) => key::cmd_rewrap(&cli.keys, a),
        Command::Audit(a) => audit::cmd_audit(&cli.keys, a),
        Command::Keystore(c) => keystore::cmd_keystore(&cli.keys, c),
        Command::Kms(c) => kms::cmd_kms(&cli.keys, c),
        Command::Migrate(a) => migrate::run(a),
        Command::SystemdUnit(a) => systemd::run(a),
    }
}

fn run_helper(args: Vec<OsString>) -> Result<()> {
    let h: HelperCli = parse_or_exit(args)?;
    if h.namespace.is_some() {
        return Err(CliError::usage(
            "mount.kmsfs does not support -N (mount namespaces)",
        ));
    }
    let _ = (h.no_mtab, h.verbose, h.fstype);
    let a = MountArgs {
        volume_dir: h.volume_dir,
        mountpoint: h.mountpoint,
        options: h.options,
        foreground: false,
        read_only: false,
        snapshot: None,
    };
    let mut plan = plan_mount(&KeyArgs::default(), a, h.sloppy)?;
    plan.fake = h.fake;
    cmd_mount(plan)
}

// ----- sizes -------------------------------------------------------------------

/// Parses `65536`, `64K`, `64KiB`, `1M`, `2G` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let bad = || {
        format!(
            "invalid size {s:?}: use a number with an optional K, M, G or T suffix (64K, 1M, 65536)"
        )
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

// ----- volume directories --------------------------------------------------------

fn is_volume(dir: &Path) -> bool {
    dir.join(format::HEADER_FILE).exists() || dir.join(format::HEADER_BACKUP_FILE).exists()
}

/// A permission problem on the volume directory, said as such (never as
/// "not a volume" or "damaged").
fn permission_error(dir: &Path, e: &std::io::Error) -> CliError {
    CliError::error(format!(
        "permission denied on the volume directory {} ({e}); run kmsfs as a user that may read \
         and write it (its owner, or root), or fix its permissions",
        dir.display()
    ))
}

fn check_volume(dir: &Path) -> Result<PathBuf> {
    let canon = fs::canonicalize(dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            permission_error(dir, &e)
        } else {
            CliError::error(format!("volume directory {}: {e}", dir.display()))
        }
    })?;
    if !canon.is_dir() {
        return Err(CliError::error(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    for f in [format::HEADER_FILE, format::HEADER_BACKUP_FILE] {
        if let Err(e) = fs::symlink_metadata(canon.join(f))
            && e.kind() == std::io::ErrorKind::PermissionDenied
        {
            return Err(permission_error(&canon, &e));
        }
    }
    if !is_volume(&canon) {
        return Err(CliError::error(format!(
            "{} is not a kmsfs volume (no {}); create one with `kmsfs init {}`",
            dir.display(),
            format::HEADER_FILE,
            dir.display()
        )));
    }
    Ok(canon)
}

/// The volume id from the (unauthenticated) header, only to name the log file.
fn peek_volume_id(dir: &Path) -> Option<String> {
    let b = fs::read(dir.join(format::HEADER_FILE)).ok()?;
    let h = format::Header::decode(&b).ok()?;
    Some(format::hex(&h.volume_id))
}

/// True while a read-write opener holds the volume lock (probed with a shared
/// lock, which only conflicts with a writer).
fn writer_lock_held(dir: &Path) -> bool {
    let Ok(f) = File::open(dir.join(format::LOCK_FILE)) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; dropping `f` releases the probe.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    r != 0
}

/// After `umount`, the daemon may still be writing its final commit: a held
/// lock with no visible mount means exactly that. Wait for it (bounded), so
/// `umount && kmsfs fsck` checks what was written.
fn wait_for_finishing_daemon(dir: &Path) {
    let start = Instant::now();
    while writer_lock_held(dir) && !volume_is_mounted(dir) && start.elapsed() < LOCK_WAIT {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn open_read_only(keys: &KeyArgs, dir: &Path) -> Result<(Volume, Arc<dyn Kms>, PathBuf)> {
    if object::is_url(dir) {
        let storage = object::existing(dir)?;
        let kms = open_kms(keys, false)?;
        let opts = OpenOptions {
            read_only: true,
            cache_bytes: TOOL_CACHE,
            ..Default::default()
        };
        let vol = Volume::open(storage, &*kms, opts)?;
        return Ok((vol, kms, dir.to_path_buf()));
    }
    let dir = check_volume(dir)?;
    wait_for_finishing_daemon(&dir);
    let kms = open_kms(keys, false)?;
    let opts = OpenOptions {
        read_only: true,
        cache_bytes: TOOL_CACHE,
        snapshot: None,
        ..Default::default()
    };
    let vol = Volume::open(Arc::new(FsStorage::new(&dir)), &*kms, opts)?;
    Ok((vol, kms, dir))
}

fn open_writable(
    keys: &KeyArgs,
    dir: &Path,
    accept_rollback: bool,
) -> Result<(Volume, Arc<dyn Kms>, PathBuf)> {
    if object::is_url(dir) {
        let storage = object::existing(dir)?;
        let kms = open_kms(keys, false)?;
        let opts = OpenOptions {
            cache_bytes: TOOL_CACHE,
            accept_rollback,
            ..Default::default()
        };
        let vol = Volume::open(storage, &*kms, opts)?;
        return Ok((vol, kms, dir.to_path_buf()));
    }
    let dir = check_volume(dir)?;
    wait_for_finishing_daemon(&dir);
    let kms = open_kms(keys, false)?;
    let opts = OpenOptions {
        cache_bytes: TOOL_CACHE,
        accept_rollback,
        ..Default::default()
    };
    let vol = Volume::open(Arc::new(FsStorage::new(&dir)), &*kms, opts)?;
    Ok((vol, kms, dir))
}

// ----- init ---------------------------------------------------------------------------

fn cmd_init(keys: &KeyArgs, a: InitArgs) -> Result<()> {
    let cipher = CipherKind::parse(&a.cipher)
        .ok_or_else(|| CliError::usage(format!("unknown cipher {:?}", a.cipher)))?;
    let size = |what: &str, s: &str| -> Result<u32> {
        let n = parse_size(s).map_err(|e| CliError::usage(format!("--{what}: {e}")))?;
        u32::try_from(n).map_err(|_| CliError::usage(format!("--{what} {s} is too large")))
    };
    let opts = CreateOptions {
        cipher,
        block_size: size("block-size", &a.block_size)?,
        segment_size: size("segment-size", &a.segment_size)?,
        cmk: a.cmk.clone(),
    };
    // Bad sizes are usage errors (exit 2), found before anything is created.
    opts.check().map_err(|e| CliError::usage(e.to_string()))?;
    let dir = &a.volume_dir;
    if object::is_url(dir) {
        let storage = object::storage(dir)?;
        let kms = open_kms(keys, true)?;
        let id = Volume::init(storage, &*kms, &opts)?;
        println!(
            "created volume {} in {} ({}, {} blocks); mount it with `kmsfs mount` and the \
             same --endpoint",
            format::hex(&id),
            dir.display(),
            cipher.name(),
            human(opts.block_size as u64),
        );
        return Ok(());
    }
    let created_dir = !dir.exists();
    if created_dir {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| CliError::error(format!("cannot create {}: {e}", dir.display())))?;
    } else {
        if !dir.is_dir() {
            return Err(CliError::error(format!(
                "{} exists and is not a directory",
                dir.display()
            )));
        }
        if is_volume(dir) {
            let id = peek_volume_id(dir)
                .map(|i| format!(" (id {i})"))
                .unwrap_or_default();
            return Err(CliError::error(format!(
                "{} is already a kmsfs volume{id}; nothing was changed",
                dir.display()
            )));
        }
        let mut entries =
            fs::read_dir(dir).map_err(|e| CliError::error(format!("{}: {e}", dir.display())))?;
        if entries.next().is_some() {
            return Err(CliError::error(format!(
                "{} is not empty and is not a kmsfs volume; choose a new or empty directory",
                dir.display()
            )));
        }
    }
    let result = (|| -> Result<([u8; 16], Arc<dyn Kms>)> {
        let kms = open_kms(keys, true)?;
        // The keystore records the volume's path: make it absolute, as later opens do.
        let canon = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let id = Volume::init(Arc::new(FsStorage::new(&canon)), &*kms, &opts)?;
        Ok((id, kms))
    })();
    let (id, kms) = match result {
        Ok(r) => r,
        Err(e) => {
            // Leave the directory as it was: absent, or empty.
            if created_dir {
                let _ = fs::remove_dir_all(dir);
            } else if let Ok(rd) = fs::read_dir(dir) {
                for entry in rd.flatten() {
                    let p = entry.path();
                    let _ = if p.is_dir() {
                        fs::remove_dir_all(&p)
                    } else {
                        fs::remove_file(&p)
                    };
                }
            }
            return Err(e);
        }
    };
    let cmk_id = fs::read(dir.join(format::HEADER_FILE))
        .ok()
        .and_then(|b| format::Header::decode(&b).ok())
        .map(|h| h.cmk_id)
        .unwrap_or_default();
    let cmk = describe_cmk(&*kms, &cmk_id);
    println!(
        "created volume {} in {} ({}, {} blocks, CMK {cmk}); {}",
        format::hex(&id),
        dir.display(),
        cipher.name(),
        human(opts.block_size as u64),
        kms.describe()
    );
    Ok(())
}

/// "cmk-… (alias x)" for a key id or alias, as far as the keystore knows it.
fn describe_cmk(kms: &dyn Kms, id_or_alias: &str) -> String {
    let keys = kms.list_keys().unwrap_or_default();
    match keys
        .iter()
        .find(|k| k.id == id_or_alias || k.alias.as_deref() == Some(id_or_alias))
    {
        Some(k) => match &k.alias {
            Some(a) => format!("{} (alias {a})", k.id),
            None => k.id.clone(),
        },
        None => id_or_alias.to_string(),
    }
}

// ----- info ---------------------------------------------------------------------------

/// What a walk of the live tree finds.
#[derive(Debug, Default, Serialize)]
pub struct Usage {
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub other: u64,
    /// Sum of file sizes (hard-linked files counted once).
    pub logical_bytes: u64,
}

/// Walks the tree from the root through `readdir`.
pub fn usage(vol: &Volume) -> Result<Usage, Error> {
    let mut u = Usage::default();
    let mut linked = HashSet::new();
    let mut stack = vec![ROOT_INO];
    while let Some(dir) = stack.pop() {
        u.directories += 1;
        let mut offset = 0;
        loop {
            let items = vol.readdir(dir, offset, 1024)?;
            let Some(last) = items.last() else { break };
            offset = last.offset;
            for it in items {
                if it.name == b"." || it.name == b".." {
                    continue;
                }
                match it.kind {
                    FileKind::Dir => stack.push(it.ino),
                    FileKind::File => {
                        let a = vol.getattr(it.ino)?;
                        if a.inode.nlink > 1 && !linked.insert(it.ino) {
                            continue;
                        }
                        u.files += 1;
                        u.logical_bytes += a.inode.size;
                    }
                    FileKind::Symlink => u.symlinks += 1,
                    _ => u.other += 1,
                }
            }
        }
    }
    Ok(u)
}

#[derive(Debug, Serialize)]
struct InfoReport {
    volume: String,
    /// s3:// volumes: who holds the writer lease now.
    #[serde(skip_serializing_if = "Option::is_none")]
    writer: Option<String>,
    id: String,
    format_version: u16,
    cipher: String,
    block_size: u32,
    segment_size: u32,
    cmk_id: String,
    cmk_alias: Option<String>,
    cmk_version: u32,
    created: i64,
    /// `created` as ISO 8601 UTC.
    created_utc: String,
    generation: u64,
    snapshots: usize,
    stored_bytes: u64,
    #[serde(flatten)]
    usage: Usage,
    /// Decrypted-block cache counters of the running mount, when mounted read-write.
    #[serde(skip_serializing_if = "Option::is_none")]
    mount_cache: Option<serde_json::Value>,
}

fn cmd_info(keys: &KeyArgs, a: InfoArgs) -> Result<()> {
    let (vol, kms, dir) = open_read_only(keys, &a.volume_dir)?;
    let h = vol.header().clone();
    let alias = kms
        .list_keys()
        .unwrap_or_default()
        .into_iter()
        .find(|k| k.id == h.cmk_id)
        .and_then(|k| k.alias);
    let r = InfoReport {
        writer: if object::is_url(&dir) {
            object::writer(&dir)
        } else {
            None
        },
        volume: dir.display().to_string(),
        id: format::hex(&h.volume_id),
        format_version: h.version,
        cipher: CipherKind::from_u8(h.cipher)
            .map(|c| c.name().to_string())
            .unwrap_or_else(|| format!("unknown ({})", h.cipher)),
        block_size: h.block_size,
        segment_size: h.segment_size,
        cmk_id: h.cmk_id.clone(),
        cmk_alias: alias,
        cmk_version: h.cmk_version,
        created: h.created,
        created_utc: crate::time::iso_utc(u64::try_from(h.created).unwrap_or(0)),
        generation: vol.generation(),
        snapshots: vol.snapshots().len(),
        stored_bytes: vol.stored_bytes()?,
        usage: usage(&vol)?,
        mount_cache: if volume_is_mounted(&dir) {
            crate::control::request(&object::control_dir(&dir), &crate::control::Request::Stats)
                .ok()
        } else {
            None
        },
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("info serializes")
        );
        return Ok(());
    }
    let cmk = match &r.cmk_alias {
        Some(al) => format!("{} (alias {al}), version {}", r.cmk_id, r.cmk_version),
        None => format!("{}, version {}", r.cmk_id, r.cmk_version),
    };
    let u = &r.usage;
    println!("volume:         {}", r.volume);
    println!("id:             {}", r.id);
    println!("format version: {}", r.format_version);
    println!("cipher:         {}", r.cipher);
    println!(
        "block size:     {} ({})",
        r.block_size,
        human(r.block_size as u64)
    );
    println!(
        "segment size:   {} ({})",
        r.segment_size,
        human(r.segment_size as u64)
    );
    println!("CMK:            {cmk}");
    println!(
        "created:        {}",
        crate::time::iso_utc(u64::try_from(r.created).unwrap_or(0))
    );
    println!("generation:     {}", r.generation);
    if let Some(w) = &r.writer {
        println!("writer:         {w}");
    }
    println!("snapshots:      {}", r.snapshots);
    println!(
        "contents:       {} files, {} directories, {} symlinks, {} other",
        u.files, u.directories, u.symlinks, u.other
    );
    println!(
        "logical bytes:  {} ({})",
        u.logical_bytes,
        human(u.logical_bytes)
    );
    println!(
        "stored bytes:   {} ({})",
        r.stored_bytes,
        human(r.stored_bytes)
    );
    if let Some(c) = &r.mount_cache {
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        println!(
            "mount cache:    {} hits, {} misses, {} evictions, {} of {} used",
            n("cache_hits"),
            n("cache_misses"),
            n("cache_evictions"),
            human(n("cache_bytes")),
            human(n("cache_capacity"))
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn mount_options() {
        let o = parse_mount_options(
            &[
                "ro,allow_other,cache_size=64M,keystore=/k,passphrase_file=/p,_netdev,nofail"
                    .into(),
                "x-systemd.automount,comment=foo,nodev,dev,noexec,defaults,log=/l".into(),
            ],
            false,
        )
        .unwrap();
        assert_eq!(o.read_only, Some(true));
        assert!(o.allow_other);
        assert_eq!(o.cache_size, Some(64 << 20));
        assert_eq!(o.keystore.as_deref(), Some(Path::new("/k")));
        assert_eq!(o.passphrase_file.as_deref(), Some(Path::new("/p")));
        assert_eq!(o.log.as_deref(), Some(Path::new("/l")));
        assert_eq!(o.flags, vec![MountOption::Dev, MountOption::NoExec]);
        let e = parse_mount_options(&["rw,bogus=1".into()], false).unwrap_err();
        assert_eq!(e.code, exit::USAGE);
        assert!(e.msg.contains("bogus=1"), "{}", e.msg);
        assert!(parse_mount_options(&["rw,bogus=1".into()], true).is_ok());
        assert!(parse_mount_options(&["keystore=".into()], false).is_err());
        // readahead= in KiB: bounded, and 0 keeps the kernel's window.
        let o = parse_mount_options(&["readahead=4096".into()], false).unwrap();
        assert_eq!(o.readahead_kb, Some(4096));
        let o = parse_mount_options(&["readahead=0".into()], false).unwrap();
        assert_eq!(o.readahead_kb, Some(0));
        for bad in [
            "readahead=1M",
            "readahead=-1",
            "readahead=999999",
            "readahead=",
        ] {
            let e = parse_mount_options(&[bad.into()], false).unwrap_err();
            assert_eq!(e.code, exit::USAGE, "{bad}");
            assert!(e.msg.contains("readahead"), "{bad}: {}", e.msg);
        }
        // clone_fd: off unless asked for; the last of clone_fd/noclone_fd wins.
        assert!(!parse_mount_options(&["rw".into()], false).unwrap().clone_fd);
        #[cfg(target_os = "linux")]
        {
            assert!(
                parse_mount_options(&["clone_fd".into()], false)
                    .unwrap()
                    .clone_fd
            );
            let o = parse_mount_options(&["clone_fd,noclone_fd".into()], false).unwrap();
            assert!(!o.clone_fd);
        }
        // spin= in microseconds: bounded, 0 allowed, a bad value names the range.
        assert_eq!(
            parse_mount_options(&["spin=0".into()], false)
                .unwrap()
                .spin_us,
            Some(0)
        );
        assert_eq!(
            parse_mount_options(&["spin=200".into()], false)
                .unwrap()
                .spin_us,
            Some(200)
        );
        assert_eq!(
            parse_mount_options(&["rw".into()], false).unwrap().spin_us,
            None
        );
        for bad in ["spin=", "spin=-1", "spin=5000", "spin=1ms", "spin"] {
            let e = parse_mount_options(&[bad.into()], false).unwrap_err();
            assert!(e.msg.contains("spin"), "{bad}: {}", e.msg);
        }
        // Block fill: on unless noblockfill; the last of the pair wins.
        assert!(
            !parse_mount_options(&["rw".into()], false)
                .unwrap()
                .no_block_fill
        );
        assert!(
            parse_mount_options(&["noblockfill".into()], false)
                .unwrap()
                .no_block_fill
        );
        assert!(
            !parse_mount_options(&["noblockfill,blockfill".into()], false)
                .unwrap()
                .no_block_fill
        );
        assert!(parse_mount_options(&["blockfill=1".into()], false).is_err());
        assert!(parse_mount_options(&["clone_fd=1".into()], false).is_err());
    }

    #[test]
    fn uring_option_parses_and_resolves_against_the_kernel() {
        use super::mount::{UringMode, resolve_uring};
        let mode = |s: &str| parse_mount_options(&[s.into()], false).map(|o| o.uring);
        assert_eq!(mode("rw").unwrap(), UringMode::Auto);
        assert_eq!(mode("uring=on").unwrap(), UringMode::On);
        assert_eq!(mode("uring=off").unwrap(), UringMode::Off);
        assert_eq!(mode("uring=on,uring=auto").unwrap(), UringMode::Auto);
        assert!(mode("uring=yes").is_err());
        assert!(mode("uring").is_err());
        assert!(!resolve_uring(UringMode::Off, true).unwrap());
        assert!(!resolve_uring(UringMode::Auto, false).unwrap());
        assert!(resolve_uring(UringMode::Auto, true).unwrap());
        let e = resolve_uring(UringMode::On, false).unwrap_err();
        if cfg!(target_os = "linux") {
            assert!(
                e.msg
                    .contains("echo Y > /sys/module/fuse/parameters/enable_uring"),
                "{}",
                e.msg
            );
        }
    }

    #[test]
    fn key_precedence() {
        let flags = KeyArgs {
            keystore: Some("/a".into()),
            passphrase_file: None,
            keyfile: Some("/kf".into()),
            kms: None,
        };
        let o = MountOpts {
            keystore: Some("/b".into()),
            passphrase_file: Some("/p".into()),
            ..MountOpts::default()
        };
        let (ks, src) = resolve_keys(&flags, &o).unwrap();
        assert_eq!(ks, PathBuf::from("/a"));
        assert_eq!(src, UnlockSource::Keyfile("/kf".into()));
        let (ks, src) = resolve_keys(&KeyArgs::default(), &o).unwrap();
        assert_eq!(ks, PathBuf::from("/b"));
        assert_eq!(src, UnlockSource::PassphraseFile("/p".into()));
        let both = KeyArgs {
            passphrase_file: Some("/p".into()),
            keyfile: Some("/k".into()),
            ..KeyArgs::default()
        };
        assert_eq!(resolve_keys(&both, &o).unwrap_err().code, exit::USAGE);
        // A KMS URL: --kms, then -o kms=; a bad one is a usage error.
        let url = KeyArgs {
            kms: Some("unix:/run/k.sock".into()),
            ..KeyArgs::default()
        };
        let ko = MountOpts {
            kms: Some("kmip://h/uid".into()),
            ..MountOpts::default()
        };
        assert_eq!(kms_url(&url, &ko).as_deref(), Some("unix:/run/k.sock"));
        assert_eq!(
            kms_url(&KeyArgs::default(), &ko).as_deref(),
            Some("kmip://h/uid")
        );
        let bad = KeyArgs {
            kms: Some("ftp://x".into()),
            ..KeyArgs::default()
        };
        assert!(matches!(
            kms_source(&bad, &MountOpts::default(), false),
            Err(e) if e.code == exit::USAGE
        ));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/srv/my\040vault"), b"/srv/my vault");
        assert_eq!(unescape_mountinfo(r"/a\\b"), br"/a\\b");
        assert_eq!(unescape_mountinfo(r"/x\04"), br"/x\04");
        // Out of the kernel's range: the low byte, no overflow panic.
        assert_eq!(unescape_mountinfo(r"\777"), vec![0xff]);
    }

    #[test]
    fn error_codes() {
        assert_eq!(CliError::from(Error::Locked("x".into())).code, exit::BUSY);
        assert_eq!(
            CliError::from(Error::integrity("a", "b")).code,
            exit::INTEGRITY
        );
        assert_eq!(
            CliError::from(Error::Kms(KmsError::UnwrapFailed)).code,
            exit::KEY
        );
        assert_eq!(CliError::from(Error::NotFound).code, exit::ERROR);
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        HelperCli::command().debug_assert();
    }
}
