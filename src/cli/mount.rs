//! `kmsfs mount` and `mount.kmsfs`: mount options, the mount plan, the daemon
//! (fork, readiness, signals, log) and serving the FUSE session.

use super::*;

// ----- mount options --------------------------------------------------------------

/// What `-o` asked for.
#[derive(Clone, Debug, Default)]
pub(super) struct MountOpts {
    pub(super) read_only: Option<bool>,
    pub(super) allow_other: bool,
    pub(super) default_permissions: bool,
    pub(super) cache_size: Option<u64>,
    /// Kernel readahead window in KiB (`readahead=`); None: [`DEFAULT_READAHEAD_KB`].
    pub(super) readahead_kb: Option<u32>,
    /// One cloned /dev/fuse descriptor per request thread (`clone_fd`, Linux).
    pub(super) clone_fd: bool,
    /// FUSE over io_uring (`uring=auto|on|off`, Linux).
    pub(super) uring: UringMode,
    /// `noblockfill`: no block fill after small reads (on by default, Linux).
    pub(super) no_block_fill: bool,
    /// `spin=USEC`: the request reader's largest spin window (Linux, /dev/fuse);
    /// None: [`DEFAULT_SPIN_US`].
    pub(super) spin_us: Option<u32>,
    pub(super) keystore: Option<PathBuf>,
    pub(super) passphrase_file: Option<PathBuf>,
    pub(super) keyfile: Option<PathBuf>,
    pub(super) kms: Option<String>,
    pub(super) snapshot: Option<String>,
    pub(super) log: Option<PathBuf>,
    pub(super) flags: Vec<MountOption>,
}

/// The request reader's largest spin window in microseconds (`spin=`): after a
/// request, the thread that reads /dev/fuse polls for the next one this long before
/// it sleeps, so a caller's next request finds it awake (vendor/fuser/src/lead.rs).
/// The window adapts below it; docs/PERFORMANCE.md has the measurements.
pub const DEFAULT_SPIN_US: u32 = 50;
/// The largest `spin=`.
pub const MAX_SPIN_US: u32 = 1000;

/// `-o uring=`: whether requests come over io_uring (FUSE_OVER_IO_URING) or /dev/fuse.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum UringMode {
    /// When the kernel offers it (`enable_uring` is Y).
    #[default]
    Auto,
    /// Required: the mount fails when the kernel does not offer it.
    On,
    /// Classic /dev/fuse.
    Off,
}

/// The fuse module's switch for io_uring (kernel 6.14+; off by default).
pub(super) const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether the kernel offers FUSE over io_uring: `enable_uring` reads Y (or 1).
pub(super) fn kernel_offers_uring() -> bool {
    cfg!(target_os = "linux")
        && fs::read_to_string(ENABLE_URING)
            .map(|v| matches!(v.trim(), "Y" | "y" | "1"))
            .unwrap_or(false)
}

/// Resolves `uring=` against the kernel: Ok(true) to ask for the ring at INIT.
pub(super) fn resolve_uring(mode: UringMode, offered: bool) -> Result<bool> {
    match mode {
        UringMode::Off => Ok(false),
        UringMode::Auto => Ok(offered),
        UringMode::On if offered => Ok(true),
        UringMode::On if !cfg!(target_os = "linux") => Err(CliError::usage(
            "uring=on needs Linux's FUSE over io_uring; mount with uring=off",
        )),
        UringMode::On => Err(CliError::usage(format!(
            "uring=on: the kernel does not offer FUSE over io_uring ({ENABLE_URING} is not Y, \
             or missing before Linux 6.14); enable it with `echo Y > {ENABLE_URING}` (as root) \
             and mount again, or mount with uring=auto"
        ))),
    }
}

/// The readahead window a mount asks the kernel for: four requests of the
/// largest size FUSE takes (256 pages), so a cold sequential read reaches the
/// daemon as 1 MiB requests instead of the kernel's default 128 KiB, several
/// at once: large reads go to the segment files with O_DIRECT (no readahead
/// of the backing device), and requests in flight are what keeps the device
/// busy (docs/PERFORMANCE.md).
pub(super) const DEFAULT_READAHEAD_KB: u32 = 4096;
const MAX_READAHEAD_KB: u32 = 65536;

/// Options mount(8), mount.fuse3 and systemd pass that mean nothing to kmsfs.
pub(super) const IGNORED_OPTIONS: &[&str] = &[
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
pub(super) const IGNORED_VALUE_OPTIONS: &[&str] = &["comment", "fsname", "subtype"];

pub(super) fn parse_mount_options(groups: &[String], sloppy: bool) -> Result<MountOpts> {
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
            ("readahead", v) => {
                let s = need(v)?;
                o.readahead_kb = Some(
                    s.parse::<u32>()
                        .ok()
                        .filter(|kb| *kb <= MAX_READAHEAD_KB)
                        .ok_or_else(|| {
                            CliError::usage(format!(
                                "readahead={s}: give the window in KiB, 0 to {MAX_READAHEAD_KB} (0: the kernel's default)"
                            ))
                        })?,
                );
            }
            ("clone_fd", None) => {
                if !cfg!(target_os = "linux") {
                    return Err(CliError::usage(
                        "clone_fd needs Linux's FUSE_DEV_IOC_CLONE; mount without it",
                    ));
                }
                o.clone_fd = true;
            }
            ("noclone_fd", None) => o.clone_fd = false,
            ("uring", v) => {
                o.uring = match need(v)?.as_str() {
                    "auto" => UringMode::Auto,
                    "on" => UringMode::On,
                    "off" => UringMode::Off,
                    other => {
                        return Err(CliError::usage(format!(
                            "uring={other}: give auto, on or off"
                        )));
                    }
                }
            }
            ("spin", v) => {
                let s = need(v)?;
                o.spin_us = Some(s.parse::<u32>().ok().filter(|us| *us <= MAX_SPIN_US).ok_or_else(
                    || {
                        CliError::usage(format!(
                            "spin={s}: give the request reader's spin in microseconds, 0 to {MAX_SPIN_US} (0: sleep at once)"
                        ))
                    },
                )?);
            }
            ("blockfill", None) => o.no_block_fill = false,
            ("noblockfill", None) => o.no_block_fill = true,
            ("keystore", v) => o.keystore = Some(need(v)?.into()),
            ("passphrase_file", v) => o.passphrase_file = Some(need(v)?.into()),
            ("keyfile", v) => o.keyfile = Some(need(v)?.into()),
            ("kms", v) => o.kms = Some(need(v)?),
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
pub(super) struct MountPlan {
    pub(super) volume: PathBuf,
    pub(super) mountpoint: PathBuf,
    pub(super) keys: KeyArgs,
    pub(super) opts: MountOpts,
    pub(super) open: OpenOptions,
    pub(super) settings: MountSettings,
    /// None: stderr (foreground without log=).
    pub(super) log: Option<PathBuf>,
    pub(super) foreground: bool,
    pub(super) fake: bool,
}

/// How to clear a dead FUSE mount at `p`.
fn clear_dead_mount(p: &Path) -> String {
    #[cfg(target_os = "linux")]
    let hint = format!("`fusermount3 -u {0}` (or `umount -l {0}`)", p.display());
    #[cfg(not(target_os = "linux"))]
    let hint = format!(
        "`umount -f {0}` (or `diskutil unmount force {0}`)",
        p.display()
    );
    hint
}

/// The mount point, absolute, checked: an existing directory that nothing is
/// mounted on. A dead FUSE mount (its daemon killed) and a directory already
/// in use get messages that say so and how to clear them.
pub(super) fn check_mountpoint(given: &Path) -> Result<PathBuf> {
    let dead = |p: &Path| {
        CliError::new(
            exit::BUSY,
            format!(
                "mount point {0} is a dead FUSE mount (the process that served it is gone); \
                 clear it with {1}, then mount again",
                p.display(),
                clear_dead_mount(p)
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
        // The kernel answers stat from attributes it cached while the daemon
        // lived (for up to the attribute timeout): statfs always asks the
        // daemon, so a dead FUSE mount shows here as ENOTCONN.
        if fstype.starts_with("fuse")
            && nix::sys::statfs::statfs(&mountpoint).err() == Some(nix::errno::Errno::ENOTCONN)
        {
            return Err(dead(&mountpoint));
        }
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

pub(super) fn plan_mount(keys: &KeyArgs, a: MountArgs, sloppy: bool) -> Result<MountPlan> {
    let opts = parse_mount_options(&a.options, sloppy)?;
    let s3 = super::object::is_url(&a.volume_dir);
    if !s3 && super::object::writeback_given() {
        return Err(CliError::usage(format!(
            "--writeback is for s3:// volumes; {} is a directory, where fsync is local already: \
             leave the option out",
            a.volume_dir.display()
        )));
    }
    let volume = if s3 {
        // Checked by the daemon when it opens the store (options are parsed now).
        super::object::config(&a.volume_dir)?;
        a.volume_dir.clone()
    } else {
        check_volume(&a.volume_dir)?
    };
    let mountpoint = check_mountpoint(&a.mountpoint)?;
    // The daemon reads the volume by path: through its own mount it would deadlock.
    if !s3 && (volume.starts_with(&mountpoint) || mountpoint.starts_with(&volume)) {
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
    let uring = resolve_uring(opts.uring, kernel_offers_uring())?;
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
        clone_fd: opts.clone_fd,
        uring,
        // Not over io_uring: the block fill defers the reply to a writable OPEN until
        // its fill reached the kernel, and a ring entry stays taken until its reply
        // (a queue's entries all waiting on fills that wait on a READ queued behind them
        // would deadlock). /dev/fuse threads do not wait for deferred replies.
        block_fill: !opts.no_block_fill && !uring,
        spin_us: opts.spin_us.unwrap_or(DEFAULT_SPIN_US),
    };
    let log = match &opts.log {
        Some(p) => Some(absolute(p)?),
        None if a.foreground => None,
        None => {
            let id = if s3 {
                volume.display().to_string().replace(['/', ':'], "_")
            } else {
                peek_volume_id(&volume).unwrap_or_else(|| "volume".into())
            };
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

pub(super) fn cmd_mount(plan: MountPlan) -> Result<()> {
    let src = kms_source(&plan.keys, &plan.opts, false)?;
    if let KmsSource::Url(u) = &src
        && u.starts_with("kmip://")
    {
        eprintln!(
            "kmsfs: note: with KMIP the volume's rollback mark is kept in a local state file \
             on this host (state_dir=, default /var/lib/kmsfs/state); keep it in this host's backups"
        );
    }
    if plan.fake {
        return Ok(());
    }
    if plan.foreground {
        let mut ready = Ready(None);
        return serve(&plan, src, &mut ready);
    }
    let (rd, wr) = crate::sys::pipe_cloexec().map_err(|e| CliError::error(format!("pipe: {e}")))?;
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
        let code = match daemon_main(&plan, src, &mut ready) {
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
    drop(src);
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
pub(super) struct Ready(Option<File>);

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
pub(super) fn daemon_main(plan: &MountPlan, src: KmsSource, ready: &mut Ready) -> Result<()> {
    // SAFETY: setsid has no memory-safety preconditions; failure (already a
    // group leader) is harmless.
    unsafe { libc::setsid() };
    let _ = std::env::set_current_dir("/");
    serve(plan, src, ready)
}

pub(super) fn open_log(path: &Path) -> Result<File> {
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

pub(super) fn init_logger() {
    // fuser's session warns when its own second unmount finds nothing mounted.
    let env = env_logger::Env::default().default_filter_or("info,fuser::session=error");
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .try_init();
}

/// Where the signal thread stands with respect to the session.
pub(super) enum Phase {
    Starting,
    Mounted(SessionUnmounter),
    Stopping,
}

pub(super) fn block_signals() -> libc::sigset_t {
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
pub(super) fn spawn_signal_thread(
    set: libc::sigset_t,
    phase: Arc<Mutex<Phase>>,
    mountpoint: PathBuf,
) {
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

#[cfg(target_os = "linux")]
pub(super) fn lazy_unmount(mountpoint: &Path) {
    if is_root()
        && let Ok(c) = CString::new(mountpoint.as_os_str().as_bytes())
        && crate::sys::unmount(&c, true).is_ok()
    {
        return;
    }
    let _ = std::process::Command::new("fusermount3")
        .args(["-u", "-z", "-q", "--"])
        .arg(mountpoint)
        .status();
}

/// macOS has no lazy unmount and no fusermount3: a forced unmount(2) (the
/// user who mounted a macFUSE volume may unmount it), else `diskutil unmount force`.
#[cfg(target_os = "macos")]
pub(super) fn lazy_unmount(mountpoint: &Path) {
    if let Ok(c) = CString::new(mountpoint.as_os_str().as_bytes())
        && crate::sys::unmount(&c, true).is_ok()
    {
        return;
    }
    let _ = std::process::Command::new("diskutil")
        .args(["unmount", "force"])
        .arg(mountpoint)
        .stdout(std::process::Stdio::null())
        .status();
}

/// Decodes the octal escapes of /proc/self/mountinfo fields (`\040` is a space).
#[cfg(target_os = "linux")]
pub(super) fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            // The kernel writes \000 to \377; a larger value keeps its low byte
            // instead of overflowing.
            Some(d) => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push((v & 0xff) as u8);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// True when a kmsfs mount of `volume` is visible (macOS: in getfsstat's table).
#[cfg(target_os = "macos")]
pub(super) fn volume_is_mounted(volume: &Path) -> bool {
    let Ok(mounts) = crate::sys::mounts() else {
        return true; // unknown: assume the lock is a live mount
    };
    mounts
        .iter()
        .any(|m| m.fstype == "fuse" && m.source == volume.as_os_str().as_bytes())
}

/// True when a kmsfs mount of `volume` is visible in this mount namespace.
#[cfg(target_os = "linux")]
pub(super) fn volume_is_mounted(volume: &Path) -> bool {
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
pub(super) fn open_volume(plan: &MountPlan, kms: &dyn crate::kms::Kms) -> Result<Volume> {
    let start = Instant::now();
    loop {
        let storage = super::object::existing(&plan.volume)?;
        match Volume::open(storage, kms, plan.open.clone()) {
            Err(Error::Locked(m)) if super::object::is_url(&plan.volume) => {
                return Err(CliError::new(
                    exit::BUSY,
                    format!(
                        "{} has a writer elsewhere ({m}); mount it read-only with -o ro",
                        plan.volume.display()
                    ),
                ));
            }
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
pub(super) fn serve(plan: &MountPlan, src: KmsSource, ready: &mut Ready) -> Result<()> {
    if let Some(path) = &plan.log {
        let f = open_log(path)?;
        // SAFETY: dup2 onto stderr from a descriptor we own: logs and panics go to the file.
        unsafe { libc::dup2(f.as_raw_fd(), 2) };
    }
    init_logger();
    // The daemon holds the volume's keys: no core dumps, no ptrace by peers.
    let _ = crate::sys::set_not_dumpable();
    // Block buffers are allocated and freed at a high rate; keep them in the
    // heap instead of mapping and unmapping (each new page is a fault, which
    // showed as 13% of a streaming-write profile). Freed memory above
    // TRIM_THRESHOLD (per arena) still goes back to the system.
    // One heap arena per request thread would each keep its own freed memory:
    // a few shared arenas (sys::MALLOC_ARENAS) bound what the daemon holds.
    crate::sys::tune_malloc(TRIM_THRESHOLD as i32);
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
    let t0 = Instant::now();
    let kms = connect_kms(src)?;
    let t_unlock = t0.elapsed();
    let t1 = Instant::now();
    let timed = TimedKms::new(&*kms);
    let vol = Arc::new(open_volume(plan, &timed)?);
    let (t_kms, kms_calls) = timed.spent();
    let t_open = t1.elapsed().saturating_sub(t_kms);
    // Rollback protection: the keystore keeps the newest generation this
    // volume reached; every commit raises it before it returns.
    if !plan.open.read_only {
        // With a write-back journal, commits reach the store later: the mark
        // follows the store (raised as each root record is uploaded).
        let (k, vid) = (kms.clone(), vol.volume_id());
        let deferred = vol
            .storage()
            .set_commit_listener(Box::new(move |generation| {
                if let Err(e) = k.record_generation(&vid, generation) {
                    log::warn!("could not record generation {generation} in the keystore: {e}");
                }
            }));
        if !deferred {
            vol.set_generation_sink(Some(kms.clone()));
        }
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
    let after_init = fs.after_init_slot();
    let mut session = Session::new(fs, &plan.mountpoint, &plan.settings.config()).map_err(|e| {
        CliError::error(format!(
            "cannot mount on {}: {e}",
            plan.mountpoint.display()
        ))
    })?;
    if plan.opts.uring == UringMode::On && !session.io_uring() {
        return Err(CliError::error(format!(
            "uring=on: the kernel did not accept FUSE over io_uring at INIT although {ENABLE_URING} \
             is Y; mount with uring=off (or uring=auto)"
        )));
    }
    log::info!(
        "FUSE transport: {}",
        if session.io_uring() {
            "io_uring (FUSE_OVER_IO_URING), /dev/fuse for FORGET and INTERRUPT; no block fill"
        } else {
            "/dev/fuse"
        }
    );
    let _ = notifier.set(session.notifier());
    let ra = plan.opts.readahead_kb.unwrap_or(DEFAULT_READAHEAD_KB);
    if ra > 0 {
        // After FUSE INIT (the kernel resets the window when it applies INIT's
        // reply): the first request runs it. The mount's device number comes
        // from /proc/self/mountinfo now, not from a stat of the mount, which
        // the daemon would have to answer itself.
        let mp = plan.mountpoint.clone();
        *after_init.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Box::new(move || raise_readahead(&mp, ra)));
    }
    *phase.lock().unwrap_or_else(|e| e.into_inner()) = Phase::Mounted(session.unmount_callable());
    // Read-write mounts take snapshot/clean commands over the control socket.
    let control = if plan.open.read_only {
        None
    } else {
        let _ = crate::control::MOUNTPOINT.set(plan.mountpoint.clone());
        ControlServer::start(vol.clone(), &super::object::control_dir(&plan.volume))
            .inspect_err(|e| {
                log::warn!("no control socket ({e}); snapshot commands need an unmounted volume")
            })
            .ok()
    };
    // Over io_uring, the ring threads run handlers too, and hold their entries' buffers.
    let (ring_threads, ring_bytes) = session.io_uring_footprint();
    let threads = plan.settings.threads.max(2) + ring_threads;
    let bound = memory_bound(plan.open.cache_bytes, threads) + ring_bytes;
    log::info!(
        "mounted; serving requests (memory: at most about {} MiB with cache_size {} and {} \
         request threads)",
        bound >> 20,
        human(plan.open.cache_bytes as u64),
        threads
    );
    log::info!(
        "ready in {:.1} ms: {} opened in {:.1} ms (keystore: Argon2id unlock), {kms_calls} KMS calls (unwrap) {:.1} ms, volume open {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3,
        kms.describe(),
        t_unlock.as_secs_f64() * 1e3,
        t_kms.as_secs_f64() * 1e3,
        t_open.as_secs_f64() * 1e3
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

/// Times the KMS calls a volume open makes (the unwrap, the generation mark), for the
/// daemon's "ready in" log line.
struct TimedKms<'a> {
    inner: &'a dyn crate::kms::Kms,
    spent: Mutex<(Duration, u32)>,
}

impl<'a> TimedKms<'a> {
    fn new(inner: &'a dyn crate::kms::Kms) -> Self {
        Self {
            inner,
            spent: Mutex::new((Duration::ZERO, 0)),
        }
    }

    fn timed<R>(&self, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        let mut s = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        s.0 += t.elapsed();
        s.1 += 1;
        r
    }

    fn spent(&self) -> (Duration, u32) {
        *self.spent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl crate::kms::Kms for TimedKms<'_> {
    fn generate_data_key(
        &self,
        cmk: Option<&str>,
        ctx: &crate::kms::EncryptionContext,
    ) -> std::result::Result<(crate::crypto::DataKey, crate::kms::WrappedKey), KmsError> {
        self.timed(|| self.inner.generate_data_key(cmk, ctx))
    }

    fn decrypt(
        &self,
        wrapped: &crate::kms::WrappedKey,
        ctx: &crate::kms::EncryptionContext,
    ) -> std::result::Result<crate::crypto::DataKey, KmsError> {
        self.timed(|| self.inner.decrypt(wrapped, ctx))
    }

    fn re_encrypt(
        &self,
        wrapped: &crate::kms::WrappedKey,
        ctx: &crate::kms::EncryptionContext,
        dest_cmk: Option<&str>,
    ) -> std::result::Result<crate::kms::WrappedKey, KmsError> {
        self.timed(|| self.inner.re_encrypt(wrapped, ctx, dest_cmk))
    }

    fn generation_mark(&self, volume_id: &[u8; 16]) -> std::result::Result<Option<u64>, KmsError> {
        self.timed(|| self.inner.generation_mark(volume_id))
    }

    fn record_generation(
        &self,
        volume_id: &[u8; 16],
        generation: u64,
    ) -> std::result::Result<(), KmsError> {
        self.timed(|| self.inner.record_generation(volume_id, generation))
    }

    fn note_volume(
        &self,
        volume_id: &[u8; 16],
        cmk_id: &str,
        path: &str,
    ) -> std::result::Result<(), KmsError> {
        self.timed(|| self.inner.note_volume(volume_id, cmk_id, path))
    }
}

/// See [`crate::sys::raise_readahead`]; where it cannot (not root, no sysfs),
/// the mount keeps the kernel's window and says so once.
fn raise_readahead(mountpoint: &Path, kb: u32) {
    #[cfg(target_os = "linux")]
    match crate::sys::raise_readahead(mountpoint, kb) {
        Ok(old) if old != kb => log::info!("readahead window {old} KiB -> {kb} KiB"),
        Ok(_) => {}
        Err(e) => {
            log::info!("readahead window left at the kernel's default ({e}); raising it needs root")
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (mountpoint, kb);
}
