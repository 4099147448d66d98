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

mod salvage;
mod umount;

use std::collections::HashSet;
use std::ffi::{CString, OsString};
use std::fs::{self, File, OpenOptions as FsOpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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
use crate::kms::{KmsError, LocalKeystore, Unlock};
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
const ENV_KDF_TEST: &str = "KMSFS_KDF_TEST_PARAMS";
/// Decrypted-block cache of a mount unless `cache_size=` says otherwise.
const DEFAULT_CACHE: u64 = 256 << 20;
/// Cache for `info` and `fsck`, which read each block about once.
const TOOL_CACHE: usize = 32 << 20;
/// Freed heap the daemon may keep for reuse (see `serve`).
const TRIM_THRESHOLD: usize = 16 << 20;

/// Peak memory (RSS) of a mount daemon with the decrypted-block cache
/// `cache_bytes` and `threads` request threads; docs/ARCHITECTURE.md explains
/// each term, tests/mount_memory.rs checks it.
pub fn memory_bound(cache_bytes: usize, threads: usize) -> usize {
    const BASE: usize = 32 << 20; // code, libraries, the keystore, small tables
    let node_cache = (cache_bytes / 4).max(1 << 20);
    // Buffered data, and its sealed copy while it is written back.
    let dirty = 2 * crate::volume::dirty_limit(cache_bytes);
    // Per request thread: the 1 MiB request buffer, a 1 MiB reply, and a
    // write's plaintext and sealed copies (1 MiB each).
    let per_thread = 4 << 20;
    BASE + cache_bytes + node_cache + dirty + threads * per_thread + TRIM_THRESHOLD
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
            Error::Integrity { .. } | Error::Rollback { .. } => exit::INTEGRITY,
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
    /// Copy every file that still verifies out of a (damaged) volume into DEST;
    /// exit 3 if anything was damaged
    Salvage(salvage::SalvageArgs),
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
    /// keystore=PATH, passphrase_file=PATH, keyfile=PATH, snapshot=NAME, log=PATH, and the
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
    "init", "mount", "umount", "info", "fsck", "snapshot", "clone", "clean", "salvage", "help",
];

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
        Command::Salvage(a) => salvage::run(&cli.keys, a),
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

// ----- keystore and unlock -----------------------------------------------------

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

fn xdg_dir(var: &str, fallback: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(v) if Path::new(&v).is_absolute() => PathBuf::from(v),
        _ => home().join(fallback),
    }
}

fn default_keystore() -> PathBuf {
    if is_root() {
        PathBuf::from("/var/lib/kmsfs/keystore")
    } else {
        xdg_dir("XDG_DATA_HOME", ".local/share").join("kmsfs/keystore")
    }
}

fn default_log_dir() -> PathBuf {
    if is_root() {
        PathBuf::from("/var/log/kmsfs")
    } else {
        xdg_dir("XDG_STATE_HOME", ".local/state").join("kmsfs")
    }
}

/// Where the keystore secret comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum UnlockSource {
    PassphraseFile(PathBuf),
    Keyfile(PathBuf),
    Prompt,
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Picks the keystore and unlock source: flags, then -o options, then the environment.
fn resolve_keys(k: &KeyArgs, o: &MountOpts) -> Result<(PathBuf, UnlockSource)> {
    let keystore = k
        .keystore
        .clone()
        .or_else(|| o.keystore.clone())
        .or_else(|| env_path(ENV_KEYSTORE))
        .unwrap_or_else(default_keystore);
    let levels = [
        (
            "--passphrase-file and --keyfile",
            k.passphrase_file.clone(),
            k.keyfile.clone(),
        ),
        (
            "passphrase_file= and keyfile=",
            o.passphrase_file.clone(),
            o.keyfile.clone(),
        ),
        (
            "KMSFS_PASSPHRASE_FILE and KMSFS_KEYFILE",
            env_path(ENV_PASSPHRASE_FILE),
            env_path(ENV_KEYFILE),
        ),
    ];
    let mut unlock = UnlockSource::Prompt;
    for (what, pass, key) in levels {
        match (pass, key) {
            (Some(_), Some(_)) => {
                return Err(CliError::usage(format!(
                    "{what} are both given; pass only one"
                )));
            }
            (Some(p), None) => unlock = UnlockSource::PassphraseFile(absolute(&p)?),
            (None, Some(f)) => unlock = UnlockSource::Keyfile(absolute(&f)?),
            (None, None) => continue,
        }
        break;
    }
    Ok((absolute(&keystore)?, unlock))
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| CliError::error(format!("{}: {e}", p.display())))
}

fn keystore_exists(path: &Path) -> bool {
    let mut bak = path.as_os_str().to_owned();
    bak.push(".bak");
    path.exists() || Path::new(&bak).exists()
}

/// Reads the secret (file or terminal prompt) in this process.
fn obtain_unlock(keystore: &Path, src: &UnlockSource, creating: bool) -> Result<Unlock> {
    match src {
        UnlockSource::Keyfile(p) => Ok(Unlock::Keyfile(p.clone())),
        UnlockSource::PassphraseFile(p) => {
            let mut f = File::open(p).map_err(|e| {
                CliError::key(format!(
                    "cannot read the passphrase file {}: {e}",
                    p.display()
                ))
            })?;
            let mut b = Vec::with_capacity(MAX_PASSPHRASE + 2);
            (&mut f)
                .take(MAX_PASSPHRASE as u64 + 2)
                .read_to_end(&mut b)
                .map_err(|e| {
                    CliError::key(format!(
                        "cannot read the passphrase file {}: {e}",
                        p.display()
                    ))
                })?;
            let p = Passphrase::from_file_contents(b);
            if p.expose().is_empty() {
                return Err(CliError::key("the passphrase file is empty"));
            }
            Ok(Unlock::Passphrase(p))
        }
        UnlockSource::Prompt => {
            let p =
                prompt_passphrase(&format!("Passphrase for keystore {}: ", keystore.display()))?;
            if creating {
                let again = prompt_passphrase("Repeat the new passphrase: ")?;
                if again.expose() != p.expose() {
                    return Err(CliError::key(
                        "the passphrases do not match; nothing was created",
                    ));
                }
            }
            Ok(Unlock::Passphrase(p))
        }
    }
}

/// Restores the terminal settings when the prompt ends, however it ends.
struct TermRestore(libc::termios);

impl Drop for TermRestore {
    fn drop(&mut self) {
        // SAFETY: fd 0 is the terminal the settings were read from; the struct is valid.
        unsafe { libc::tcsetattr(0, libc::TCSAFLUSH, &self.0) };
    }
}

/// Reads a passphrase from the terminal on stdin without echo. Never blocks
/// on a non-terminal: without one it fails with a message naming the options.
fn prompt_passphrase(prompt: &str) -> Result<Passphrase> {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(0) } != 1 {
        return Err(CliError::key(
            "no passphrase given and no terminal to ask on: pass --passphrase-file FILE or --keyfile FILE \
             (or -o passphrase_file=FILE, or set KMSFS_PASSPHRASE_FILE / KMSFS_KEYFILE)",
        ));
    }
    // SAFETY: termios is plain data; zeroed is a valid value that tcgetattr overwrites.
    let mut old: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd 0 is open and `old` is a valid out-pointer.
    if unsafe { libc::tcgetattr(0, &mut old) } != 0 {
        return Err(CliError::key(format!(
            "cannot configure the terminal: {}",
            std::io::Error::last_os_error()
        )));
    }
    let mut quiet = old;
    quiet.c_lflag &= !libc::ECHO;
    quiet.c_lflag |= libc::ECHONL;
    let _restore = TermRestore(old);
    // SAFETY: fd 0 is a terminal and `quiet` a valid termios.
    unsafe { libc::tcsetattr(0, libc::TCSAFLUSH, &quiet) };
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    // Read byte by byte with read(2): no userspace buffer keeps a copy.
    let mut buf = Vec::with_capacity(MAX_PASSPHRASE + 1);
    loop {
        let mut c = 0u8;
        // SAFETY: reads one byte into a valid one-byte buffer.
        let n = unsafe { libc::read(0, (&mut c as *mut u8).cast(), 1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(CliError::key(format!("cannot read the passphrase: {e}")));
        }
        if n == 0 || c == b'\n' {
            break;
        }
        if buf.len() >= MAX_PASSPHRASE {
            return Err(CliError::key("the passphrase is too long"));
        }
        buf.push(c);
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    if buf.is_empty() {
        return Err(CliError::key("empty passphrase"));
    }
    Ok(Passphrase::from_bytes(buf))
}

fn open_keystore(path: &Path, unlock: Unlock) -> Result<LocalKeystore> {
    let params =
        if cfg!(feature = "test-hooks") && std::env::var(ENV_KDF_TEST).as_deref() == Ok("1") {
            KdfParams::for_tests()
        } else {
            KdfParams::DEFAULT
        };
    Ok(LocalKeystore::open_or_create_with_params(
        path, unlock, params,
    )?)
}

/// Opens an existing keystore (only `init` creates one).
fn unlock_existing(keys: &KeyArgs, opts: &MountOpts) -> Result<(PathBuf, Unlock)> {
    let (ks, src) = resolve_keys(keys, opts)?;
    if !keystore_exists(&ks) {
        return Err(CliError::key(format!(
            "keystore {} does not exist; pass the keystore the volume was created with (--keystore PATH or KMSFS_KEYSTORE)",
            ks.display()
        )));
    }
    let unlock = obtain_unlock(&ks, &src, false)?;
    Ok((ks, unlock))
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

fn open_read_only(keys: &KeyArgs, dir: &Path) -> Result<(Volume, LocalKeystore, PathBuf)> {
    let dir = check_volume(dir)?;
    wait_for_finishing_daemon(&dir);
    let (ks, unlock) = unlock_existing(keys, &MountOpts::default())?;
    let kms = open_keystore(&ks, unlock)?;
    let opts = OpenOptions {
        read_only: true,
        cache_bytes: TOOL_CACHE,
        snapshot: None,
        ..Default::default()
    };
    let vol = Volume::open(Arc::new(FsStorage::new(&dir)), &kms, opts)?;
    Ok((vol, kms, dir))
}

fn open_writable(
    keys: &KeyArgs,
    dir: &Path,
    accept_rollback: bool,
) -> Result<(Volume, LocalKeystore, PathBuf)> {
    let dir = check_volume(dir)?;
    wait_for_finishing_daemon(&dir);
    let (ks, unlock) = unlock_existing(keys, &MountOpts::default())?;
    let kms = open_keystore(&ks, unlock)?;
    let opts = OpenOptions {
        cache_bytes: TOOL_CACHE,
        accept_rollback,
        ..Default::default()
    };
    let vol = Volume::open(Arc::new(FsStorage::new(&dir)), &kms, opts)?;
    Ok((vol, kms, dir))
}

// ----- snapshots and clones -------------------------------------------------------

#[derive(Serialize)]
struct SnapshotJson {
    name: String,
    created: i64,
    generation: u64,
    exclusive_bytes: u64,
    shared_bytes: u64,
}

fn time_text(secs: i64) -> String {
    // UTC, ISO 8601, without a date crate: days since the epoch to a civil date.
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Runs a change on the volume: directly when it is not mounted, through the
/// running mount's control socket when it is.
fn with_volume_or_mount(
    keys: &KeyArgs,
    dir: &Path,
    req: crate::control::Request,
    direct: impl FnOnce(&Volume) -> std::result::Result<serde_json::Value, Error>,
) -> Result<serde_json::Value> {
    let canon = check_volume(dir)?;
    wait_for_finishing_daemon(&canon);
    let (ks, unlock) = unlock_existing(keys, &MountOpts::default())?;
    let kms = open_keystore(&ks, unlock)?;
    let opts = OpenOptions {
        cache_bytes: TOOL_CACHE,
        ..Default::default()
    };
    match Volume::open(Arc::new(FsStorage::new(&canon)), &kms, opts) {
        Ok(vol) => {
            let r = direct(&vol)?;
            vol.close()?;
            Ok(r)
        }
        Err(Error::Locked(_)) => Ok(crate::control::request(&canon, &req)?),
        Err(e) => Err(e.into()),
    }
}

/// Segments whose live share is below this are compacted by `kmsfs clean`.
const CLEAN_MAX_LIVE: f64 = 0.5;

fn cmd_clean(keys: &KeyArgs, volume_dir: &Path, json: bool) -> Result<()> {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    use std::io::IsTerminal;
    let bar = ProgressBar::new(0);
    if json || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {bytes}/{total_bytes} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("cleaning");
    bar.enable_steady_tick(Duration::from_millis(200));
    let t = Instant::now();
    let r = with_volume_or_mount(keys, volume_dir, crate::control::Request::Clean, |v| {
        let s = v.clean_with_progress(CLEAN_MAX_LIVE, &|p| match p {
            crate::volume::CleanProgress::Scanning { done, total } => {
                bar.set_message("scanning");
                bar.set_length(total);
                bar.set_position(done);
            }
            crate::volume::CleanProgress::Moving { done, total } => {
                bar.set_message("moving");
                bar.set_length(total);
                bar.set_position(done);
            }
        })?;
        Ok(serde_json::json!({"segments_removed": s.segments_removed,
            "bytes_moved": s.bytes_moved, "bytes_freed": s.bytes_freed}))
    });
    bar.finish_and_clear();
    let r = r?;
    if json {
        println!("{r}");
    } else {
        println!(
            "cleaned {}: freed {} ({} segments removed, {} copied) in {:.1} s",
            volume_dir.display(),
            human(r["bytes_freed"].as_u64().unwrap_or(0)),
            r["segments_removed"].as_u64().unwrap_or(0),
            human(r["bytes_moved"].as_u64().unwrap_or(0)),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn cmd_snapshot(keys: &KeyArgs, c: SnapshotCmd) -> Result<()> {
    use crate::control::Request;
    match c {
        SnapshotCmd::Create { volume_dir, name } => {
            let t = Instant::now();
            let r = with_volume_or_mount(
                keys,
                &volume_dir,
                Request::SnapshotCreate { name: name.clone() },
                |v| {
                    let r = v.snapshot_create(&name)?;
                    Ok(serde_json::json!({"generation": r.generation}))
                },
            )?;
            println!(
                "snapshot {name} created (generation {}) in {:.1} ms",
                r["generation"],
                t.elapsed().as_secs_f64() * 1000.0
            );
            Ok(())
        }
        SnapshotCmd::Delete { volume_dir, name } => {
            with_volume_or_mount(
                keys,
                &volume_dir,
                Request::SnapshotDelete { name: name.clone() },
                |v| {
                    v.snapshot_delete(&name)?;
                    Ok(serde_json::Value::Null)
                },
            )?;
            println!("snapshot {name} deleted; its space is reclaimed");
            Ok(())
        }
        SnapshotCmd::List { volume_dir, json } => {
            let (vol, _kms, _dir) = open_read_only(keys, &volume_dir)?;
            let list: Vec<SnapshotJson> = vol
                .snapshot_list()?
                .into_iter()
                .map(|s| SnapshotJson {
                    name: s.name,
                    created: s.created,
                    generation: s.generation,
                    exclusive_bytes: s.exclusive_bytes,
                    shared_bytes: s.shared_bytes,
                })
                .collect();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).expect("list serializes")
                );
            } else {
                println!(
                    "{:<24} {:<20} {:>10} {:>12} {:>12}",
                    "NAME", "CREATED", "GENERATION", "EXCLUSIVE", "SHARED"
                );
                for s in list {
                    println!(
                        "{:<24} {:<20} {:>10} {:>12} {:>12}",
                        s.name,
                        time_text(s.created),
                        s.generation,
                        human(s.exclusive_bytes),
                        human(s.shared_bytes)
                    );
                }
            }
            Ok(())
        }
        SnapshotCmd::Restore {
            volume_dir,
            name,
            yes,
        } => {
            if !yes {
                return Err(CliError::usage(format!(
                    "restoring replaces the live tree of {} with snapshot {name}; pass --yes to confirm",
                    volume_dir.display()
                )));
            }
            let (vol, _kms, dir) = match open_writable(keys, &volume_dir, false) {
                Err(e) if e.code == exit::BUSY => {
                    return Err(CliError::new(
                        exit::BUSY,
                        format!(
                            "{} is mounted; unmount it before restoring a snapshot",
                            volume_dir.display()
                        ),
                    ));
                }
                r => r?,
            };
            vol.snapshot_restore(&name)?;
            vol.close()?;
            println!("{}: live tree restored from snapshot {name}", dir.display());
            Ok(())
        }
    }
}

fn cmd_clone(keys: &KeyArgs, a: CloneArgs) -> Result<()> {
    let (vol, _kms, src) = open_read_only(keys, &a.volume_dir)?;
    let dst = &a.new_volume_dir;
    if dst.exists() {
        let empty = fs::read_dir(dst)
            .map_err(|e| CliError::error(format!("{}: {e}", dst.display())))?
            .next()
            .is_none();
        if !empty {
            return Err(CliError::error(format!(
                "{} is not empty; clone into a new or empty directory",
                dst.display()
            )));
        }
    } else {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dst)
            .map_err(|e| CliError::error(format!("{}: {e}", dst.display())))?;
    }
    let dst =
        fs::canonicalize(dst).map_err(|e| CliError::error(format!("{}: {e}", dst.display())))?;
    let open_dir = |p: &Path| {
        nix::fcntl::open(
            p,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| CliError::error(format!("{}: {e}", p.display())))
    };
    let (src_fd, dst_fd) = (open_dir(&src)?, open_dir(&dst)?);
    let linked = std::sync::atomic::AtomicU64::new(0);
    let copied = std::sync::atomic::AtomicU64::new(0);
    // Segments never change once written, so the clone can share them by hard link.
    let bring = |name: &str| -> std::io::Result<()> {
        let n = if bring_file(&src_fd, &dst_fd, &src, name)? {
            &linked
        } else {
            &copied
        };
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    };
    let id = vol.clone_snapshot(&a.snapshot, Arc::new(FsStorage::new(&dst)), &bring)?;
    println!(
        "{}: new volume {} from snapshot {} of {} ({} segment files linked, {} copied, nothing re-encrypted)",
        dst.display(),
        format::hex(&id),
        a.snapshot,
        src.display(),
        linked.into_inner(),
        copied.into_inner()
    );
    Ok(())
}

/// Brings the backing file `name` (`seg/…`) of the volume in `src` (`src_dir`
/// names it in messages) into the clone in `dst` under the same name; true
/// when hard-linked, false when copied.
///
/// Others may write the source's backing directory, so a name there is
/// never followed: each component is opened relative to the directory's
/// descriptor with `O_NOFOLLOW` (a planted link, FIFO or device is refused,
/// and opening it never blocks), only a regular file is used, and what is
/// linked or copied is that very open file (linked through
/// `/proc/self/fd/N`, never by a name that could be swapped since, so a
/// symbolic link itself is never linked into the clone either).
fn bring_file(src: &OwnedFd, dst: &OwnedFd, src_dir: &Path, name: &str) -> std::io::Result<bool> {
    use nix::errno::Errno;
    use nix::fcntl::{AtFlags, OFlag, openat};
    use nix::sys::stat::{Mode, SFlag, fstat, fstatat};
    let kind =
        |st: &nix::sys::stat::FileStat| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    let kind_text = |k: SFlag| match k {
        SFlag::S_IFLNK => "a symbolic link",
        SFlag::S_IFIFO => "a FIFO (named pipe)",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFCHR | SFlag::S_IFBLK => "a device",
        SFlag::S_IFDIR => "a directory",
        _ => "not a regular file",
    };
    let planted = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} is {what}, where kmsfs keeps a regular file; kmsfs never makes one there, so \
                 the backing directory may have been tampered with. Inspect it, remove it, then \
                 retry",
                src_dir.join(name).display()
            ),
        )
    };
    let comps: Vec<&str> = name.split('/').collect();
    if comps
        .iter()
        .any(|c| c.is_empty() || *c == "." || *c == "..")
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain relative name"),
        ));
    }
    let (leaf, parents) = comps.split_last().expect("split yields one part at least");
    let open_parent = |top: &OwnedFd| -> std::io::Result<OwnedFd> {
        let mut cur = nix::unistd::dup(top)?;
        for c in parents {
            cur = openat(
                &cur,
                *c,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
        }
        Ok(cur)
    };
    let (sdir, ddir) = (open_parent(src)?, open_parent(dst)?);
    // O_NONBLOCK: a planted FIFO is refused at once instead of blocking.
    let file = openat(
        &sdir,
        *leaf,
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(
        |e| match fstatat(&sdir, *leaf, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if kind(&st) != SFlag::S_IFREG => planted(kind_text(kind(&st))),
            _ => std::io::Error::from(e),
        },
    )?;
    let st = fstat(&file)?;
    if kind(&st) != SFlag::S_IFREG {
        return Err(planted(kind_text(kind(&st))));
    }
    // Link the file just checked, by its descriptor.
    let by_fd = format!("/proc/self/fd/{}", file.as_raw_fd());
    match nix::unistd::linkat(
        &sdir,
        by_fd.as_str(),
        &ddir,
        *leaf,
        AtFlags::AT_SYMLINK_FOLLOW,
    ) {
        Ok(()) => return Ok(true),
        // Another filesystem, links not allowed (protected_hardlinks, a
        // filesystem without them), too many links, or no /proc: copy.
        Err(Errno::EXDEV | Errno::EPERM | Errno::EMLINK | Errno::ENOENT | Errno::EOPNOTSUPP) => {}
        Err(e) => return Err(e.into()),
    }
    let out = openat(
        &ddir,
        *leaf,
        OFlag::O_WRONLY
            | OFlag::O_CREAT
            | OFlag::O_EXCL
            | OFlag::O_NOFOLLOW
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC,
        Mode::S_IRUSR | Mode::S_IWUSR,
    )?;
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))?;
    std::io::copy(&mut File::from(file), &mut File::from(out))?;
    Ok(false)
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
    let result = (|| -> Result<([u8; 16], LocalKeystore)> {
        let (ks, src) = resolve_keys(keys, &MountOpts::default())?;
        let creating = !keystore_exists(&ks);
        let unlock = obtain_unlock(&ks, &src, creating)?;
        let kms = open_keystore(&ks, unlock)?;
        let id = Volume::init(Arc::new(FsStorage::new(dir)), &kms, &opts)?;
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
    let cmk = describe_cmk(&kms, opts.cmk.as_deref().unwrap_or(&kms.service_key_id()));
    println!(
        "created volume {} in {} ({}, {} blocks, CMK {cmk}); keystore {}",
        format::hex(&id),
        dir.display(),
        cipher.name(),
        human(opts.block_size as u64),
        kms.path().display()
    );
    Ok(())
}

/// "cmk-… (alias x)" for a key id or alias, as far as the keystore knows it.
fn describe_cmk(kms: &LocalKeystore, id_or_alias: &str) -> String {
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
    id: String,
    format_version: u16,
    cipher: String,
    block_size: u32,
    segment_size: u32,
    cmk_id: String,
    cmk_alias: Option<String>,
    cmk_version: u32,
    created: i64,
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
        generation: vol.generation(),
        snapshots: vol.snapshots().len(),
        stored_bytes: vol.stored_bytes()?,
        usage: usage(&vol)?,
        mount_cache: if volume_is_mounted(&dir) {
            crate::control::request(&dir, &crate::control::Request::Stats).ok()
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
    println!("created:        {} (unix time)", r.created);
    println!("generation:     {}", r.generation);
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

// ----- fsck ---------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct FsckJson<'a> {
    volume: String,
    clean: bool,
    errors: &'a [String],
    warnings: &'a [String],
    inodes: u64,
    nodes_checked: u64,
    blocks_checked: u64,
    bytes_checked: u64,
    segments: u64,
    unreferenced_segments: u64,
}

#[derive(Debug, Serialize)]
struct LostFileJson {
    paths: Vec<String>,
    names: Vec<String>,
    lost_ranges: String,
    lost_xattrs: Vec<String>,
}

#[derive(Debug, Serialize)]
struct SnapshotDamageJson {
    snapshot: String,
    path: String,
    detail: String,
    advice: String,
}

#[derive(Debug, Serialize)]
struct RepairJson<'a> {
    volume: String,
    /// Nothing damaged remains, snapshots included.
    clean: bool,
    /// The live tree is clean (damage may remain in snapshots).
    live_clean: bool,
    nodes_rewritten: u64,
    lost_files: Vec<LostFileJson>,
    entries_fixed: &'a [String],
    snapshot_damage: Vec<SnapshotDamageJson>,
    unrepaired: &'a [String],
    errors: &'a [String],
    warnings: &'a [String],
}

/// `kmsfs fsck --repair`: the volume must not be mounted (opening it
/// read-write takes the volume lock).
fn cmd_fsck_repair(keys: &KeyArgs, a: &FsckArgs) -> Result<()> {
    let (vol, _kms, dir) = match open_writable(keys, &a.volume_dir, a.accept_rollback) {
        Err(e) if e.code == exit::BUSY => {
            return Err(CliError::new(
                exit::BUSY,
                format!(
                    "{} is mounted read-write; unmount it first (`kmsfs umount MOUNTPOINT`), \
                     then run `kmsfs fsck --repair` again",
                    a.volume_dir.display()
                ),
            ));
        }
        r => r?,
    };
    let r = vol.repair()?;
    vol.close()?;
    let shown = dir.display().to_string();
    let advice = |snapshot: &str| crate::volume::repair::snapshot_advice(&shown, snapshot);
    if a.json {
        let j = RepairJson {
            volume: shown.clone(),
            clean: r.is_clean(),
            live_clean: r.live_clean(),
            nodes_rewritten: r.nodes_rewritten,
            lost_files: r
                .lost_files
                .iter()
                .map(|l| LostFileJson {
                    paths: l.paths.clone(),
                    names: l.names.clone(),
                    lost_ranges: l.ranges_text(),
                    lost_xattrs: l.lost_xattrs.clone(),
                })
                .collect(),
            entries_fixed: &r.entries_fixed,
            snapshot_damage: r
                .snapshot_damage
                .iter()
                .map(|d| SnapshotDamageJson {
                    snapshot: d.snapshot.clone(),
                    path: d.path.clone(),
                    detail: d.detail.clone(),
                    advice: advice(&d.snapshot),
                })
                .collect(),
            unrepaired: &r.unrepaired,
            errors: &r.after.errors,
            warnings: &r.after.warnings,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&j).expect("report serializes")
        );
    } else {
        if r.nodes_rewritten > 0 {
            println!(
                "rewrote {} tree node(s) with a damaged or missing copy (both copies intact again)",
                r.nodes_rewritten
            );
        }
        for l in &r.lost_files {
            let mut what = Vec::new();
            if !l.lost_ranges.is_empty() {
                what.push(format!("bytes {} lost, now zeros", l.ranges_text()));
            }
            if !l.lost_xattrs.is_empty() {
                what.push(format!(
                    "extended attribute(s) {} lost",
                    l.lost_xattrs.join(", ")
                ));
            }
            println!(
                "moved {} -> {} ({})",
                l.paths.join(", "),
                l.names.join(", "),
                what.join("; ")
            );
        }
        for f in &r.entries_fixed {
            println!("fixed: {f}");
        }
        for d in &r.snapshot_damage {
            if d.path.is_empty() {
                println!("snapshot damage: snapshot {}: {}", d.snapshot, d.detail);
            } else {
                println!(
                    "snapshot damage: snapshot {}: {}: {}",
                    d.snapshot, d.path, d.detail
                );
            }
        }
        for s in r.damaged_snapshots() {
            println!("snapshot {s} cannot be changed: {}", advice(&s));
        }
        for e in &r.unrepaired {
            println!("error: {e}");
        }
        for w in &r.after.warnings {
            println!("warning: {w}");
        }
        println!(
            "{}: {}",
            shown,
            if r.is_clean() {
                if r.changed() {
                    "repaired; clean"
                } else {
                    "clean; nothing to repair"
                }
            } else if r.live_clean() {
                "repaired; the live tree is clean, damage remains in snapshots"
            } else {
                "DAMAGED: repair could not fix everything"
            }
        );
    }
    if r.is_clean() {
        Ok(())
    } else if r.live_clean() {
        Err(CliError::new(
            exit::INTEGRITY,
            format!(
                "damage remains in snapshot(s) {} of {}: salvage what verifies, then delete them (see above)",
                r.damaged_snapshots().join(", "),
                shown
            ),
        ))
    } else {
        Err(CliError::new(
            exit::INTEGRITY,
            format!(
                "{} problem(s) remain in {} that repair could not fix; restore the files named above from a backup or snapshot",
                r.unrepaired.len(),
                shown
            ),
        ))
    }
}

fn cmd_fsck(keys: &KeyArgs, a: FsckArgs) -> Result<()> {
    if a.repair {
        return cmd_fsck_repair(keys, &a);
    }
    if a.accept_rollback {
        let (vol, _kms, dir) = open_writable(keys, &a.volume_dir, true)?;
        eprintln!(
            "kmsfs: {}: accepted its current state (generation {}) as the newest",
            dir.display(),
            vol.generation()
        );
        vol.close()?;
    }
    let (vol, _kms, dir) = open_read_only(keys, &a.volume_dir)?;
    let r = vol.fsck()?;
    if a.json {
        let j = FsckJson {
            volume: dir.display().to_string(),
            clean: r.is_clean(),
            errors: &r.errors,
            warnings: &r.warnings,
            inodes: r.inodes,
            nodes_checked: r.nodes_checked,
            blocks_checked: r.blocks_checked,
            bytes_checked: r.bytes_checked,
            segments: r.segments,
            unreferenced_segments: r.unreferenced_segments,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&j).expect("report serializes")
        );
    } else {
        for e in &r.errors {
            println!("error: {e}");
        }
        for w in &r.warnings {
            println!("warning: {w}");
        }
        println!(
            "{}: {} ({} inodes, {} tree nodes, {} data blocks / {} checked, {} segments, {} unreferenced)",
            dir.display(),
            if r.is_clean() { "clean" } else { "DAMAGED" },
            r.inodes,
            r.nodes_checked,
            r.blocks_checked,
            human(r.bytes_checked),
            r.segments,
            r.unreferenced_segments
        );
    }
    if r.is_clean() {
        Ok(())
    } else {
        Err(CliError::new(
            exit::INTEGRITY,
            format!(
                "{} problem(s) found in {}; restore the files named above from a backup or snapshot",
                r.errors.len(),
                dir.display()
            ),
        ))
    }
}

// ----- mount options --------------------------------------------------------------

/// What `-o` asked for.
#[derive(Clone, Debug, Default)]
struct MountOpts {
    read_only: Option<bool>,
    allow_other: bool,
    default_permissions: bool,
    cache_size: Option<u64>,
    keystore: Option<PathBuf>,
    passphrase_file: Option<PathBuf>,
    keyfile: Option<PathBuf>,
    snapshot: Option<String>,
    log: Option<PathBuf>,
    flags: Vec<MountOption>,
}

/// Options mount(8), mount.fuse3 and systemd pass that mean nothing to kmsfs.
const IGNORED_OPTIONS: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "lazytime",
    "nolazytime",
    "diratime",
    "nodiratime",
    "iversion",
    "noiversion",
    "silent",
    "loud",
    "nonempty",
];
/// Options with a value that mean nothing to kmsfs.
const IGNORED_VALUE_OPTIONS: &[&str] = &["comment", "fsname", "subtype"];

fn parse_mount_options(groups: &[String], sloppy: bool) -> Result<MountOpts> {
    let mut o = MountOpts::default();
    for opt in groups.iter().flat_map(|g| g.split(',')) {
        let opt = opt.trim();
        if opt.is_empty() {
            continue;
        }
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let need = |v: Option<&str>| -> Result<String> {
            match v {
                Some(v) if !v.is_empty() => Ok(v.to_string()),
                _ => Err(CliError::usage(format!(
                    "mount option {k} needs a value ({k}=…)"
                ))),
            }
        };
        let flag = match k {
            "dev" => Some(MountOption::Dev),
            "nodev" => Some(MountOption::NoDev),
            "suid" => Some(MountOption::Suid),
            "nosuid" => Some(MountOption::NoSuid),
            "exec" => Some(MountOption::Exec),
            "noexec" => Some(MountOption::NoExec),
            "atime" => Some(MountOption::Atime),
            "noatime" => Some(MountOption::NoAtime),
            "sync" => Some(MountOption::Sync),
            "async" => Some(MountOption::Async),
            "dirsync" => Some(MountOption::DirSync),
            _ => None,
        };
        if let Some(f) = flag
            && v.is_none()
        {
            // The last of two opposite flags wins, as with mount(8).
            let opposite = |a: &MountOption| {
                matches!(
                    (a, &f),
                    (MountOption::Dev, MountOption::NoDev)
                        | (MountOption::NoDev, MountOption::Dev)
                        | (MountOption::Suid, MountOption::NoSuid)
                        | (MountOption::NoSuid, MountOption::Suid)
                        | (MountOption::Exec, MountOption::NoExec)
                        | (MountOption::NoExec, MountOption::Exec)
                        | (MountOption::Atime, MountOption::NoAtime)
                        | (MountOption::NoAtime, MountOption::Atime)
                        | (MountOption::Sync, MountOption::Async)
                        | (MountOption::Async, MountOption::Sync)
                )
            };
            o.flags.retain(|a| !opposite(a) && *a != f);
            o.flags.push(f);
            continue;
        }
        match (k, v) {
            ("ro", None) => o.read_only = Some(true),
            ("rw", None) => o.read_only = Some(false),
            ("allow_other", None) => o.allow_other = true,
            ("default_permissions", None) => o.default_permissions = true,
            ("cache_size", v) => {
                let s = need(v)?;
                o.cache_size =
                    Some(parse_size(&s).map_err(|e| CliError::usage(format!("cache_size: {e}")))?);
            }
            ("keystore", v) => o.keystore = Some(need(v)?.into()),
            ("passphrase_file", v) => o.passphrase_file = Some(need(v)?.into()),
            ("keyfile", v) => o.keyfile = Some(need(v)?.into()),
            ("snapshot", v) => o.snapshot = Some(need(v)?),
            ("log", v) => o.log = Some(need(v)?.into()),
            (k, None) if IGNORED_OPTIONS.contains(&k) => {}
            (k, Some(_)) if IGNORED_VALUE_OPTIONS.contains(&k) => {}
            (k, _) if k.starts_with("x-") => {}
            _ if sloppy => {}
            _ => {
                return Err(CliError::usage(format!(
                    "unknown mount option {opt:?}; see `kmsfs mount --help` for the options kmsfs accepts"
                )));
            }
        }
    }
    Ok(o)
}

// ----- mount ---------------------------------------------------------------------------

/// Everything a mount needs, resolved before forking.
#[derive(Debug)]
struct MountPlan {
    volume: PathBuf,
    mountpoint: PathBuf,
    keys: KeyArgs,
    opts: MountOpts,
    open: OpenOptions,
    settings: MountSettings,
    /// None: stderr (foreground without log=).
    log: Option<PathBuf>,
    foreground: bool,
    fake: bool,
}

/// The mount point, absolute, checked: an existing directory that nothing is
/// mounted on. A dead FUSE mount (its daemon killed) and a directory already
/// in use get messages that say so and how to clear them.
fn check_mountpoint(given: &Path) -> Result<PathBuf> {
    let dead = |p: &Path| {
        CliError::new(
            exit::BUSY,
            format!(
                "mount point {0} is a dead FUSE mount (the process that served it is gone); \
                 clear it with `fusermount3 -u {0}` (or `umount -l {0}`), then mount again",
                p.display()
            ),
        )
    };
    let abs = std::path::absolute(given)
        .map_err(|e| CliError::error(format!("mount point {}: {e}", given.display())))?;
    match fs::metadata(&abs) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => return Err(dead(&abs)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CliError::usage(format!(
                "mount point {} does not exist; create it with `mkdir -p {}`",
                abs.display(),
                abs.display()
            )));
        }
        Err(e) => {
            return Err(CliError::error(format!(
                "mount point {}: {e}",
                abs.display()
            )));
        }
        Ok(m) if !m.is_dir() => {
            return Err(CliError::usage(format!(
                "mount point {} is not a directory",
                abs.display()
            )));
        }
        Ok(_) => {}
    }
    let mountpoint = fs::canonicalize(&abs).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTCONN) => dead(&abs),
        _ => CliError::error(format!("mount point {}: {e}", abs.display())),
    })?;
    if let Some((fstype, source)) = umount::mounted_at(&mountpoint) {
        return Err(CliError::new(
            exit::BUSY,
            format!(
                "{} is already a mount point ({fstype} from {source}); unmount it first \
                 (`kmsfs umount {}`) or choose another directory",
                mountpoint.display(),
                mountpoint.display()
            ),
        ));
    }
    Ok(mountpoint)
}

fn plan_mount(keys: &KeyArgs, a: MountArgs, sloppy: bool) -> Result<MountPlan> {
    let opts = parse_mount_options(&a.options, sloppy)?;
    let volume = check_volume(&a.volume_dir)?;
    let mountpoint = check_mountpoint(&a.mountpoint)?;
    // The daemon reads the volume by path: through its own mount it would deadlock.
    if volume.starts_with(&mountpoint) || mountpoint.starts_with(&volume) {
        return Err(CliError::usage(format!(
            "the mount point {} and the volume directory {} must not contain one another",
            mountpoint.display(),
            volume.display()
        )));
    }
    let snapshot = a.snapshot.or_else(|| opts.snapshot.clone());
    let read_only = a.read_only || opts.read_only == Some(true) || snapshot.is_some();
    let cache = opts.cache_size.unwrap_or(DEFAULT_CACHE);
    let cache_bytes =
        usize::try_from(cache).map_err(|_| CliError::usage("cache_size is too large"))?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let settings = MountSettings {
        fsname: volume.display().to_string(),
        read_only,
        allow_other: opts.allow_other,
        // Without it any user of an allow_other mount could read every file.
        default_permissions: opts.default_permissions || opts.allow_other,
        flags: opts.flags.clone(),
        threads: (threads * 2).clamp(4, 16),
    };
    let log = match &opts.log {
        Some(p) => Some(absolute(p)?),
        None if a.foreground => None,
        None => {
            let id = peek_volume_id(&volume).unwrap_or_else(|| "volume".into());
            Some(default_log_dir().join(format!("{id}.log")))
        }
    };
    Ok(MountPlan {
        volume,
        mountpoint,
        keys: keys.clone(),
        open: OpenOptions {
            read_only,
            cache_bytes,
            snapshot,
            ..Default::default()
        },
        opts,
        settings,
        log,
        foreground: a.foreground,
        fake: false,
    })
}

fn cmd_mount(plan: MountPlan) -> Result<()> {
    let (ks, unlock) = unlock_existing(&plan.keys, &plan.opts)?;
    if plan.fake {
        return Ok(());
    }
    if plan.foreground {
        let mut ready = Ready(None);
        return serve(&plan, &ks, unlock, &mut ready);
    }
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(CliError::error(format!(
            "pipe: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: pipe2 just returned these two descriptors; each is owned once.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded here (nothing has spawned a thread
    // yet), so the child may run arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(CliError::error(format!(
            "fork: {}",
            std::io::Error::last_os_error()
        )));
    }
    if pid == 0 {
        drop(rd);
        let mut ready = Ready(Some(File::from(wr)));
        let code = match daemon_main(&plan, &ks, unlock, &mut ready) {
            Ok(()) => exit::OK,
            Err(e) => {
                log::error!("{}", e.msg);
                let code = e.code;
                ready.fail(e);
                code
            }
        };
        std::process::exit(code);
    }
    drop(wr);
    drop(unlock);
    let mut msg = String::new();
    let _ = File::from(rd).read_to_string(&mut msg);
    let msg = msg.trim_end();
    if msg == "ok" {
        return Ok(());
    }
    if let Some(rest) = msg.strip_prefix("err ")
        && let Some((code, text)) = rest.split_once(' ')
    {
        return Err(CliError::new(code.parse().unwrap_or(exit::ERROR), text));
    }
    Err(CliError::error(format!(
        "the mount daemon exited before the mount was ready; see its log {}",
        plan.log
            .as_deref()
            .unwrap_or(Path::new("(stderr)"))
            .display()
    )))
}

/// The child's end of the readiness pipe (None in the foreground).
struct Ready(Option<File>);

impl Ready {
    /// Detaches from the caller's terminal and tells the parent to exit 0.
    fn ok(&mut self) {
        let Some(mut f) = self.0.take() else { return };
        if let Ok(null) = FsOpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            // SAFETY: dup2 onto the standard descriptors from a descriptor we own.
            unsafe {
                libc::dup2(null.as_raw_fd(), 0);
                libc::dup2(null.as_raw_fd(), 1);
            }
        }
        let _ = f.write_all(b"ok\n");
    }

    fn fail(&mut self, e: CliError) {
        if let Some(mut f) = self.0.take() {
            let msg = e.msg.replace('\n', " ");
            let _ = writeln!(f, "err {} {msg}", e.code);
        }
    }
}

/// The daemon child: detach, then serve.
fn daemon_main(plan: &MountPlan, ks: &Path, unlock: Unlock, ready: &mut Ready) -> Result<()> {
    // SAFETY: setsid has no memory-safety preconditions; failure (already a
    // group leader) is harmless.
    unsafe { libc::setsid() };
    let _ = std::env::set_current_dir("/");
    serve(plan, ks, unlock, ready)
}

fn open_log(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                CliError::error(format!(
                    "cannot create the log directory {}: {e}; pass -o log=PATH",
                    dir.display()
                ))
            })?;
    }
    FsOpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            CliError::error(format!(
                "cannot open the log file {}: {e}; pass -o log=PATH",
                path.display()
            ))
        })
}

fn init_logger() {
    // fuser's session warns when its own second unmount finds nothing mounted.
    let env = env_logger::Env::default().default_filter_or("info,fuser::session=error");
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .try_init();
}

/// Where the signal thread stands with respect to the session.
enum Phase {
    Starting,
    Mounted(SessionUnmounter),
    Stopping,
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use;
    // pthread_sigmask changes only this thread's mask, inherited by the
    // threads spawned afterwards, so the signal thread is the only receiver.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// SIGTERM/SIGINT/SIGHUP: unmount, which ends the session; `destroy` then
/// makes the final commit. Before the mount exists, just exit (nothing to save).
fn spawn_signal_thread(set: libc::sigset_t, phase: Arc<Mutex<Phase>>, mountpoint: PathBuf) {
    let _ = std::thread::Builder::new()
        .name("kmsfs-signals".into())
        .spawn(move || {
            loop {
                let mut sig = 0;
                // SAFETY: `set` is an initialised signal set and `sig` a valid out-pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                let mut p = phase.lock().unwrap_or_else(|e| e.into_inner());
                match std::mem::replace(&mut *p, Phase::Stopping) {
                    Phase::Starting => {
                        log::info!("signal {sig} before the mount was ready: exiting");
                        std::process::exit(exit::ERROR);
                    }
                    Phase::Mounted(mut u) => {
                        drop(p);
                        log::info!("signal {sig}: unmounting {}", mountpoint.display());
                        if let Err(e) = u.unmount() {
                            log::warn!("unmount failed ({e}); detaching the mount lazily");
                            lazy_unmount(&mountpoint);
                        }
                    }
                    Phase::Stopping => {
                        log::info!("signal {sig}: already unmounting; detaching lazily");
                        drop(p);
                        lazy_unmount(&mountpoint);
                    }
                }
            }
        });
}

fn lazy_unmount(mountpoint: &Path) {
    if is_root()
        && let Ok(c) = CString::new(mountpoint.as_os_str().as_bytes())
        // SAFETY: `c` is a valid NUL-terminated path.
        && unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0
    {
        return;
    }
    let _ = std::process::Command::new("fusermount3")
        .args(["-u", "-z", "-q", "--"])
        .arg(mountpoint)
        .status();
}

/// Decodes the octal escapes of /proc/self/mountinfo fields (`\040` is a space).
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// True when a kmsfs mount of `volume` is visible in this mount namespace.
fn volume_is_mounted(volume: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return true; // unknown: assume the lock is a live mount
    };
    info.lines().any(|l| {
        let Some((_, post)) = l.split_once(" - ") else {
            return false;
        };
        let mut f = post.split(' ');
        let (Some(fstype), Some(source)) = (f.next(), f.next()) else {
            return false;
        };
        // Direct mounts by root show as "fuse", fusermount3's as "fuse.kmsfs".
        fstype.starts_with("fuse") && unescape_mountinfo(source) == volume.as_os_str().as_bytes()
    })
}

/// Opens the volume; a lock held while no mount of the volume is visible
/// belongs to a daemon finishing its final commit after an unmount, so wait
/// for it (bounded) instead of failing `umount && mount`.
fn open_volume(plan: &MountPlan, kms: &LocalKeystore) -> Result<Volume> {
    let start = Instant::now();
    loop {
        let storage = Arc::new(FsStorage::new(&plan.volume));
        match Volume::open(storage, kms, plan.open.clone()) {
            Err(Error::Locked(m))
                if !volume_is_mounted(&plan.volume) && start.elapsed() < LOCK_WAIT =>
            {
                log::info!("volume locked ({m}) by a daemon that is shutting down; waiting");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(Error::Locked(m)) => {
                return Err(CliError::new(
                    exit::BUSY,
                    format!(
                        "{} is already mounted read-write (lock {m}); unmount it first, or mount it read-only with -o ro",
                        plan.volume.display()
                    ),
                ));
            }
            r => return Ok(r?),
        }
    }
}

/// Opens the keystore and the volume, mounts, reports readiness, and serves
/// until the filesystem is unmounted.
fn serve(plan: &MountPlan, ks: &Path, unlock: Unlock, ready: &mut Ready) -> Result<()> {
    if let Some(path) = &plan.log {
        let f = open_log(path)?;
        // SAFETY: dup2 onto stderr from a descriptor we own: logs and panics go to the file.
        unsafe { libc::dup2(f.as_raw_fd(), 2) };
    }
    init_logger();
    // The daemon holds the volume's keys: no core dumps, no ptrace by peers.
    // SAFETY: prctl(PR_SET_DUMPABLE) takes integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // Block buffers are allocated and freed at a high rate; keep them in the
    // heap instead of mapping and unmapping (each new page is a fault, which
    // showed as 13% of a streaming-write profile). Freed memory above
    // TRIM_THRESHOLD still goes back to the system.
    // SAFETY: mallopt takes integer arguments and only tunes the allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as i32);
        // One heap arena per request thread would each keep its own freed
        // memory: a few shared arenas bound what the daemon holds.
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let set = block_signals();
    let phase = Arc::new(Mutex::new(Phase::Starting));
    spawn_signal_thread(set, phase.clone(), plan.mountpoint.clone());
    log::info!(
        "kmsfs {} (pid {}) mounting {} on {}{}",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        plan.volume.display(),
        plan.mountpoint.display(),
        if plan.open.read_only {
            " read-only"
        } else {
            ""
        }
    );
    let kms = Arc::new(open_keystore(ks, unlock)?);
    let vol = Arc::new(open_volume(plan, &kms)?);
    // Rollback protection: the keystore keeps the newest generation this
    // volume reached; every commit raises it before it returns.
    if !plan.open.read_only {
        vol.set_generation_sink(Some(kms.clone()));
        if let Err(e) = vol.record_generation(&*kms) {
            log::warn!("could not record the volume generation in the keystore: {e}");
        }
    }
    // This handle keeps the volume lock until after the session has dropped
    // its mount handle (fuser unmounts the mountpoint again at the end of
    // `run`): a new mount, which waits for the lock, cannot be hit by that.
    crate::fuse::install_panic_hook();
    let fs = KmsFs::new(vol.clone(), plan.settings.clone());
    let outcome = fs.outcome();
    let notifier = fs.notifier_slot();
    let mut session = Session::new(fs, &plan.mountpoint, &plan.settings.config()).map_err(|e| {
        CliError::error(format!(
            "cannot mount on {}: {e}",
            plan.mountpoint.display()
        ))
    })?;
    let _ = notifier.set(session.notifier());
    *phase.lock().unwrap_or_else(|e| e.into_inner()) = Phase::Mounted(session.unmount_callable());
    // Read-write mounts take snapshot/clean commands over the control socket.
    let control = if plan.open.read_only {
        None
    } else {
        ControlServer::start(vol.clone(), &plan.volume)
            .inspect_err(|e| {
                log::warn!("no control socket ({e}); snapshot commands need an unmounted volume")
            })
            .ok()
    };
    let bound = memory_bound(plan.open.cache_bytes, plan.settings.threads.max(2));
    log::info!(
        "mounted; serving requests (memory: at most about {} MiB with cache_size {} and {} \
         request threads)",
        bound >> 20,
        human(plan.open.cache_bytes as u64),
        plan.settings.threads.max(2)
    );
    ready.ok();
    let r = session.run();
    drop(control);
    vol.set_generation_sink(None);
    drop(vol);
    log::info!("session ended");
    if let Err(e) = r {
        return Err(CliError::error(format!("the FUSE session failed: {e}")));
    }
    match outcome.lock().unwrap_or_else(|e| e.into_inner()).take() {
        Some(Err(e)) => Err(CliError::error(format!(
            "the final commit failed: {e}; changes since the last commit are lost, the volume is consistent"
        ))),
        _ => Ok(()),
    }
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
    }

    #[test]
    fn key_precedence() {
        let flags = KeyArgs {
            keystore: Some("/a".into()),
            passphrase_file: None,
            keyfile: Some("/kf".into()),
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
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/srv/my\040vault"), b"/srv/my vault");
        assert_eq!(unescape_mountinfo(r"/a\\b"), br"/a\\b");
        assert_eq!(unescape_mountinfo(r"/x\04"), br"/x\04");
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
