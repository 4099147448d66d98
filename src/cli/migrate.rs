//! `kmsfs migrate SOURCE_DIR MOUNTPOINT`: moves a plaintext tree onto a
//! mounted volume with rsync, then proves the copy.
//!
//! The copy is `rsync -aHAXS --numeric-ids --modify-window=-1 --partial`, a child
//! in its own process group; its `--info=progress2` and `--out-format` lines
//! drive a progress bar (plain lines every few seconds when stderr is not a
//! terminal). Resuming needs no state of ours: a second run skips what the
//! first one finished (rsync's size and mtime check), and `--partial` keeps
//! the file that was being copied. SIGINT, SIGTERM and SIGHUP stop the rsync
//! group cleanly and exit 128+signal, saying to run the same command again;
//! rsync gets SIGTERM too if this process dies (PR_SET_PDEATHSIG).
//!
//! The verification walks the source and compares every entry with its copy
//! through the mount: kind, mode, owner, group, mtime to the nanosecond, size,
//! content (SHA-256 of both sides, read in parallel; the destination's cached
//! pages are dropped first so the mount serves the bytes), xattrs (POSIX ACLs
//! are the `system.posix_acl_*` xattrs), symlink targets, device numbers and
//! hard-link groups (the same partition of paths on both sides). An entry that
//! differs and whose source changed (ctime) after this run started, or that
//! rsync saw vanish, is reported as changed during the migration, apart from
//! real mismatches.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{CString, OsString};
use std::fs::{self, File, Metadata};
use std::io::{self, BufRead, BufReader, IsTerminal, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{CliError, Result, exit, human};

/// Plain progress lines (no terminal) come this often.
const PLAIN_INTERVAL: Duration = Duration::from_secs(5);
/// How long rsync gets to stop after SIGTERM before SIGKILL.
const STOP_WAIT: Duration = Duration::from_secs(15);
/// Source entries changed this little before the run started still count as
/// changed during it: the kernel stamps ctime from a clock that lags by a tick.
const CTIME_SLACK_NS: i128 = 20_000_000;

#[derive(Args, Debug)]
#[command(after_help = MIGRATE_NOTES)]
pub struct MigrateArgs {
    /// The plaintext tree to copy; its contents (not the directory itself) go into MOUNTPOINT
    source_dir: PathBuf,
    /// A mounted kmsfs volume, or a directory in one (made if missing)
    mountpoint: PathBuf,
    /// Only compare MOUNTPOINT with SOURCE_DIR (no copy); exit 3 on any difference
    #[arg(long)]
    verify_only: bool,
    /// Print the report as JSON on stdout
    #[arg(long)]
    json: bool,
    /// Copy even when MOUNTPOINT is not on a kmsfs mount
    #[arg(long)]
    force: bool,
    /// Limit the copy's bandwidth (rsync's --bwlimit, e.g. 20M for 20 MiB/s)
    #[arg(long, value_name = "RATE")]
    bwlimit: Option<String>,
}

const MIGRATE_NOTES: &str = "\
The copy is `rsync -aHAXS --numeric-ids -@-1 --partial SOURCE_DIR/ MOUNTPOINT/` (rsync must be
installed: apt-get install rsync); nothing is deleted from MOUNTPOINT. Interrupted (Ctrl-C,
kill), run the same command again: finished files are skipped. The verification reads every
file on both sides and compares kind, mode, owner, group, mtime (ns), xattrs, ACLs, symlink
targets, device numbers and hard links. Exit 0: identical; 3: differences (each named);
1: the copy failed, or entries changed in SOURCE_DIR during the run (listed; run again).";

// ----- the report ----------------------------------------------------------------

#[derive(Debug, Default, Serialize, Clone, Copy)]
struct Counts {
    files: u64,
    directories: u64,
    symlinks: u64,
    /// Names beyond the first of an inode (any kind).
    hard_links: u64,
    fifos: u64,
    sockets: u64,
    char_devices: u64,
    block_devices: u64,
}

/// One difference: the path (relative to the roots), what differs, and how.
#[derive(Debug, Serialize, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Diff {
    path: String,
    what: &'static str,
    detail: String,
}

#[derive(Debug, Serialize)]
struct CopyReport {
    seconds: f64,
    /// Files rsync (re)wrote in this run; the others were up to date.
    files_copied: u64,
    bytes_copied: u64,
    rsync_exit: i32,
    /// rsync's own warnings and errors (its stderr), in order.
    rsync_messages: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    source: String,
    destination: String,
    copy: Option<CopyReport>,
    entries: Counts,
    /// Bytes of regular files in the source (each inode once).
    bytes: u64,
    verify_seconds: f64,
    /// True when nothing differs and nothing changed during the run.
    identical: bool,
    differences: Vec<Diff>,
    /// Differences of entries the source changed (or rsync saw vanish) after the run started.
    changed_during_run: Vec<Diff>,
    /// Entries in MOUNTPOINT that the source does not have (migrate never deletes).
    only_on_destination: Vec<String>,
}

// ----- entry point --------------------------------------------------------------

pub(super) fn run(a: MigrateArgs) -> Result<()> {
    let start = SystemTime::now();
    let src = fs::canonicalize(&a.source_dir)
        .map_err(|e| CliError::usage(format!("source {}: {e}", a.source_dir.display())))?;
    if !src.is_dir() {
        return Err(CliError::usage(format!(
            "source {} is not a directory",
            src.display()
        )));
    }
    if !a.mountpoint.exists() && !a.verify_only {
        let parent = a
            .mountpoint
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        check_destination(parent, a.force)?;
        fs::create_dir(&a.mountpoint).map_err(|e| {
            CliError::error(format!("cannot create {}: {e}", a.mountpoint.display()))
        })?;
    }
    let dst = fs::canonicalize(&a.mountpoint)
        .map_err(|e| CliError::usage(format!("destination {}: {e}", a.mountpoint.display())))?;
    if !dst.is_dir() {
        return Err(CliError::usage(format!(
            "destination {} is not a directory",
            dst.display()
        )));
    }
    if dst.starts_with(&src) || src.starts_with(&dst) {
        return Err(CliError::usage(format!(
            "{} and {} overlap: the destination must not be inside the source, nor the source inside it",
            src.display(),
            dst.display()
        )));
    }
    check_destination(&dst, a.force)?;
    let tty = std::io::stderr().is_terminal();
    let totals = count_tree(&src);
    let copy = if a.verify_only {
        None
    } else {
        Some(copy(&a, &src, &dst, &totals, tty)?)
    };
    let t = Instant::now();
    let mut v = verify(&src, &dst, &totals, tty);
    let verify_seconds = t.elapsed().as_secs_f64();
    let vanished: Vec<String> = copy
        .as_ref()
        .map(|c| vanished_paths(&c.rsync_messages, &src))
        .unwrap_or_default();
    let (differences, mut changed, extras) = classify(&src, start, &mut v, &vanished);
    changed.extend(vanished.into_iter().map(|p| Diff {
        path: p,
        what: "vanished",
        detail: "removed from the source while rsync copied it".into(),
    }));
    changed.sort();
    changed.dedup();
    let report = Report {
        source: src.display().to_string(),
        destination: dst.display().to_string(),
        entries: v.counts,
        bytes: v.bytes,
        verify_seconds,
        identical: differences.is_empty() && changed.is_empty(),
        differences,
        changed_during_run: changed,
        only_on_destination: extras,
        copy,
    };
    print_report(&report, a.json, a.verify_only);
    outcome(&report, a.verify_only)
}

/// The exit status the report calls for (docs/EXIT-CODES.md).
fn outcome(r: &Report, verify_only: bool) -> Result<()> {
    let when = if verify_only {
        "the verification"
    } else {
        "the migration"
    };
    if !r.differences.is_empty() || (verify_only && !r.changed_during_run.is_empty()) {
        let n = r.differences.len() + r.changed_during_run.len();
        return Err(CliError::new(
            exit::INTEGRITY,
            format!(
                "{n} difference(s) between {} and {} (listed above){}",
                r.source,
                r.destination,
                if verify_only {
                    "; run `kmsfs migrate` without --verify-only to copy again what differs"
                } else {
                    "; the copy does not match its source"
                }
            ),
        ));
    }
    if !r.changed_during_run.is_empty() {
        return Err(CliError::error(format!(
            "{} entr{} changed in {} during {when} (listed above); run the same command again, \
             with the source quiet, to copy their current state",
            r.changed_during_run.len(),
            if r.changed_during_run.len() == 1 {
                "y"
            } else {
                "ies"
            },
            r.source
        )));
    }
    if let Some(c) = &r.copy
        && c.rsync_exit != 0
        && c.rsync_exit != 24
    {
        return Err(CliError::error(format!(
            "rsync reported errors (exit {}, above), though the verification found no difference",
            c.rsync_exit
        )));
    }
    Ok(())
}

// ----- the destination ------------------------------------------------------------

struct MountEntry {
    fstype: String,
    source: String,
    target: String,
}

/// The mount holding `path` (statfs).
#[cfg(target_os = "macos")]
fn mount_of(path: &Path) -> Option<MountEntry> {
    let m = crate::sys::mount_of(path)?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Some(MountEntry {
        fstype: m.fstype,
        source: text(&m.source),
        target: text(&m.target),
    })
}

/// The mount holding `path`, matched by its device number in /proc/self/mountinfo.
#[cfg(target_os = "linux")]
fn mount_of(path: &Path) -> Option<MountEntry> {
    let dev = fs::metadata(path).ok()?.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let want = format!("{major}:{minor}");
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let unescape =
        |s: &str| String::from_utf8_lossy(&super::mount::unescape_mountinfo(s)).into_owned();
    info.lines().rev().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let f: Vec<&str> = left.split(' ').collect();
        if f.get(2) != Some(&want.as_str()) {
            return None;
        }
        let mut r = right.split(' ');
        Some(MountEntry {
            fstype: r.next()?.to_string(),
            source: unescape(r.next()?),
            target: unescape(f.get(4)?),
        })
    })
}

/// Refuses a destination that is not on a kmsfs mount, unless `force`.
fn check_destination(dst: &Path, force: bool) -> Result<()> {
    let m = mount_of(dst);
    let is_kmsfs = m.as_ref().is_some_and(|m| {
        m.fstype == "fuse.kmsfs"
            || (m.fstype.starts_with("fuse")
                && Path::new(&m.source)
                    .join(crate::format::HEADER_FILE)
                    .is_file())
    });
    if is_kmsfs {
        return Ok(());
    }
    let what = match &m {
        Some(m) => format!(
            "it is on {} ({}, mounted at {})",
            m.fstype, m.source, m.target
        ),
        None => "its mount is not in /proc/self/mountinfo".into(),
    };
    if force {
        eprintln!(
            "kmsfs migrate: {} is not on a kmsfs mount ({what}); copying anyway (--force)",
            dst.display()
        );
        return Ok(());
    }
    Err(CliError::usage(format!(
        "{} is not on a kmsfs mount ({what}): mount the volume first (`kmsfs mount VOLUME_DIR {}`), \
         or pass --force to copy into it anyway",
        dst.display(),
        dst.display()
    )))
}

// ----- progress -------------------------------------------------------------------

#[derive(Default)]
struct Counters {
    files_done: AtomicU64,
    files_total: AtomicU64,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    /// Bytes really moved (copied or read), for the rate.
    moved: AtomicU64,
}

/// Draws the progress of a phase: a bar on a terminal, else a line every
/// [`PLAIN_INTERVAL`]; stopped (and the bar cleared) on drop.
struct Ticker {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
    bar: Option<ProgressBar>,
}

impl Ticker {
    fn start(phase: &'static str, c: Arc<Counters>, tty: bool) -> Ticker {
        let stop = Arc::new(AtomicBool::new(false));
        let bar = tty.then(|| {
            let b = ProgressBar::new(c.bytes_total.load(Ordering::Relaxed));
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>9} [{bar:30}] {binary_bytes}/{binary_total_bytes} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(phase);
            b
        });
        let (s, b) = (stop.clone(), bar.clone());
        let handle = std::thread::spawn(move || {
            let mut samples: VecDeque<(Instant, u64)> = VecDeque::new();
            let mut last_line = Instant::now();
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let now = Instant::now();
                let moved = c.moved.load(Ordering::Relaxed);
                samples.push_back((now, moved));
                while samples.len() > 2
                    && now.duration_since(samples[0].0) > Duration::from_secs(10)
                {
                    samples.pop_front();
                }
                let (t0, m0) = samples[0];
                let dt = now.duration_since(t0).as_secs_f64();
                let rate = if dt > 0.0 {
                    moved.saturating_sub(m0) as f64 / dt
                } else {
                    0.0
                };
                let total = c.bytes_total.load(Ordering::Relaxed);
                let done = c.bytes_done.load(Ordering::Relaxed).min(total);
                let left = if rate > 1.0 {
                    format!("{} left", eta((total - done) as f64 / rate))
                } else {
                    "time left unknown".into()
                };
                let files = format!(
                    "{}/{} files",
                    c.files_done.load(Ordering::Relaxed),
                    c.files_total.load(Ordering::Relaxed)
                );
                let rate = format!("{}/s", human(rate as u64));
                match &b {
                    Some(b) => {
                        b.set_length(total);
                        b.set_position(done);
                        b.set_message(format!("{files}, {rate}, {left}"));
                    }
                    None if now.duration_since(last_line) >= PLAIN_INTERVAL => {
                        last_line = now;
                        let pct = (done * 100).checked_div(total).unwrap_or(100);
                        eprintln!(
                            "kmsfs migrate: {phase}: {files}, {} of {} ({pct}%), {rate}, {left}",
                            human(done),
                            human(total)
                        );
                    }
                    None => {}
                }
            }
        });
        Ticker {
            stop,
            handle: Some(handle),
            bar,
        }
    }

    /// Prints a line without tearing the bar.
    fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn eta(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Totals of the source, for the progress: regular file names, their bytes
/// (per name, as rsync counts them) and per inode (as the verification reads).
#[derive(Default)]
struct Totals {
    files: u64,
    bytes_names: u64,
    bytes_inodes: u64,
}

fn count_tree(root: &Path) -> Totals {
    let mut t = Totals::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                t.files += 1;
                t.bytes_names += md.size();
                if md.nlink() == 1 || seen.insert((md.dev(), md.ino())) {
                    t.bytes_inodes += md.size();
                }
            }
        }
    }
    t
}

// ----- the copy -----------------------------------------------------------------

static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNALLED.store(sig, Ordering::SeqCst);
}

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Catches SIGINT/SIGTERM/SIGHUP while it lives (restoring the old actions after).
struct SignalGuard {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalGuard {
    fn install() -> SignalGuard {
        let mut old = Vec::new();
        for sig in STOP_SIGNALS {
            // SAFETY: sigaction with a zeroed struct, an async-signal-safe handler
            // (one atomic store) and an empty mask; the old action is kept.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                let mut prev: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &sa, &mut prev) == 0 {
                    old.push((sig, prev));
                }
            }
        }
        SignalGuard { old }
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for (sig, prev) in &self.old {
            // SAFETY: restores the action saved by install().
            unsafe { libc::sigaction(*sig, prev, std::ptr::null_mut()) };
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// What rsync's stdout says, parsed by [`parse_rsync_line`].
#[derive(Debug, PartialEq)]
enum RsyncLine {
    /// `--out-format` item: update type (`>` copied, `.` up to date, `h`
    /// hard link…), file type (`f`, `d`, `L`, `D`, `S`) and size.
    Item {
        update: u8,
        kind: u8,
        size: u64,
    },
    /// `--info=progress2`: bytes transferred so far in this run.
    Progress {
        bytes: u64,
    },
    Other,
}

const ITEM_PREFIX: &str = "@@kmsfs ";

fn parse_rsync_line(l: &str) -> RsyncLine {
    if let Some(rest) = l.strip_prefix(ITEM_PREFIX) {
        let mut it = rest.splitn(2, ' ');
        let size = it.next().and_then(|s| s.parse().ok());
        let item = it.next().map(str::as_bytes).unwrap_or_default();
        return match (size, item) {
            (Some(size), [update, kind, ..]) => RsyncLine::Item {
                update: *update,
                kind: *kind,
                size,
            },
            _ => RsyncLine::Other,
        };
    }
    let t = l.trim_start();
    if t.starts_with(|c: char| c.is_ascii_digit()) && t.contains('%') {
        let first = t.split_whitespace().next().unwrap_or("");
        let digits: String = first.chars().filter(char::is_ascii_digit).collect();
        if let Ok(bytes) = digits.parse() {
            return RsyncLine::Progress { bytes };
        }
    }
    RsyncLine::Other
}

/// Relative paths of rsync's `file has vanished: "PATH"` warnings.
fn vanished_paths(messages: &[String], src: &Path) -> Vec<String> {
    let root = src.to_string_lossy();
    messages
        .iter()
        .filter_map(|m| {
            let i = m.find("file has vanished: \"")?;
            let rest = &m[i + "file has vanished: \"".len()..];
            let p = &rest[..rest.rfind('"')?];
            let rel = p.strip_prefix(root.as_ref()).unwrap_or(p);
            let rel = rel.trim_start_matches('/');
            Some(if rel.is_empty() {
                ".".into()
            } else {
                rel.into()
            })
        })
        .collect()
}

fn rsync_missing() -> CliError {
    CliError::error(
        "rsync is not installed: install it (`apt-get install rsync`, or your system's rsync \
         package) and run the same command again",
    )
}

fn copy(a: &MigrateArgs, src: &Path, dst: &Path, totals: &Totals, tty: bool) -> Result<CopyReport> {
    let signals = SignalGuard::install();
    let c = Arc::new(Counters::default());
    c.files_total.store(totals.files, Ordering::Relaxed);
    c.bytes_total.store(totals.bytes_names, Ordering::Relaxed);
    let mut cmd = Command::new("rsync");
    // --modify-window=-1: times compare (and are set) to the nanosecond;
    // otherwise rsync leaves a directory, symlink or special file with the
    // creation time of its copy when both fall in the same second.
    cmd.args(["-aHAXS", "--numeric-ids", "--modify-window=-1", "--partial"])
        .arg("--no-inc-recursive")
        .arg("--info=progress2,name2")
        .arg(format!("--out-format={ITEM_PREFIX}%l %i %n"));
    if let Some(bw) = &a.bwlimit {
        cmd.arg(format!("--bwlimit={bw}"));
    }
    let mut s: OsString = src.as_os_str().to_owned();
    s.push("/");
    let mut d: OsString = dst.as_os_str().to_owned();
    d.push("/");
    cmd.arg(s)
        .arg(d)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; rsync gets SIGTERM if we die.
    #[cfg(target_os = "linux")]
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
            Ok(())
        });
    }
    // rsync's processes are reaped here, also those whose parent exits first,
    // so the run ends only when none of them is left writing.
    // (Linux only: macOS has neither; there the signal handler stops rsync.)
    // SAFETY: prctl with integer arguments.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    };
    if SIGNALLED.load(Ordering::SeqCst) != 0 {
        return Err(interrupted(a, SIGNALLED.load(Ordering::SeqCst)));
    }
    let t = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(ch) => ch,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(rsync_missing()),
        Err(e) => return Err(CliError::error(format!("cannot run rsync: {e}"))),
    };
    let pgid = child.id() as i32;
    let ticker = Arc::new(Ticker::start("copying", c.clone(), tty && !a.json));
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let files_copied = Arc::new(AtomicU64::new(0));
    let out_thread = {
        let (c, copied) = (c.clone(), files_copied.clone());
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut skipped = 0u64;
            let mut line = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                let n = match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                for &b in &buf[..n] {
                    if b != b'\n' && b != b'\r' {
                        line.push(b);
                        continue;
                    }
                    match parse_rsync_line(&String::from_utf8_lossy(&line)) {
                        RsyncLine::Item {
                            update,
                            kind: b'f',
                            size,
                        } => {
                            c.files_done.fetch_add(1, Ordering::Relaxed);
                            if update == b'>' || update == b'<' {
                                copied.fetch_add(1, Ordering::Relaxed);
                            } else {
                                skipped += size;
                            }
                        }
                        RsyncLine::Progress { bytes } => {
                            c.moved.store(bytes, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                    c.bytes_done
                        .store(skipped + c.moved.load(Ordering::Relaxed), Ordering::Relaxed);
                    line.clear();
                }
            }
        })
    };
    let err_thread = {
        let ticker = ticker.clone();
        std::thread::spawn(move || {
            let mut msgs = Vec::new();
            for l in BufReader::new(stderr).lines() {
                let Ok(l) = l else { break };
                if l.trim().is_empty() {
                    continue;
                }
                ticker.println(&l);
                msgs.push(l);
            }
            msgs
        })
    };
    drop(child); // reaped below, with the rest of its process group
    let mut status = None;
    let mut stopping: Option<Instant> = None;
    let mut killed = false;
    loop {
        let mut st = 0;
        // SAFETY: waitpid on our children of rsync's process group.
        let r = unsafe { libc::waitpid(-pgid, &mut st, libc::WNOHANG) };
        if r == pgid {
            status = Some(st);
            continue;
        }
        if r > 0 {
            continue;
        }
        if r < 0 {
            break; // ECHILD: none of rsync's processes is left
        }
        let sig = SIGNALLED.load(Ordering::SeqCst);
        match stopping {
            None if sig != 0 => {
                // SAFETY: kill on rsync's own process group.
                unsafe { libc::kill(-pgid, libc::SIGTERM) };
                stopping = Some(Instant::now());
            }
            Some(t0) if !killed && t0.elapsed() > STOP_WAIT => {
                // SAFETY: as above.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                killed = true;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = out_thread.join();
    let messages = err_thread.join().unwrap_or_default();
    drop(ticker);
    drop(signals);
    let sig = SIGNALLED.load(Ordering::SeqCst);
    if sig != 0 {
        return Err(interrupted(a, sig));
    }
    let st = status.unwrap_or(0);
    let code = if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else {
        128 + libc::WTERMSIG(st)
    };
    match code {
        // 23: some files or attributes not copied; 24: files vanished. The
        // verification names what differs.
        0 | 23 | 24 => {}
        127 => return Err(rsync_missing()),
        _ => {
            let last = messages.last().cloned().unwrap_or_default();
            let hint = if code == 1 {
                " (rsync 3.1 or newer is needed)"
            } else {
                ""
            };
            return Err(CliError::error(format!(
                "rsync failed with exit code {code}{hint}: {last}; run the same command again to resume"
            )));
        }
    }
    Ok(CopyReport {
        seconds: t.elapsed().as_secs_f64(),
        files_copied: files_copied.load(Ordering::Relaxed),
        bytes_copied: c.moved.load(Ordering::Relaxed),
        rsync_exit: code,
        rsync_messages: messages,
    })
}

fn interrupted(a: &MigrateArgs, sig: i32) -> CliError {
    CliError::new(
        128 + sig,
        format!(
            "interrupted by {}: rsync stopped; what it copied stays in {}. Run the same command \
             again to resume (finished files are skipped): kmsfs migrate {} {}",
            signal_name(sig),
            a.mountpoint.display(),
            a.source_dir.display(),
            a.mountpoint.display()
        ),
    )
}

// ----- the verification ---------------------------------------------------------------

type Key = (u64, u64);
type Hash = std::result::Result<[u8; 32], String>;

fn key(m: &Metadata) -> Key {
    (m.dev(), m.ino())
}

/// A regular file to read on both sides; a side whose inode another job reads is skipped.
struct Job {
    rel: PathBuf,
    src: Key,
    dst: Key,
    hash_src: bool,
    hash_dst: bool,
    /// Hard-linked on either side: compared after all jobs, through the hash maps.
    shared: bool,
}

#[derive(Default)]
struct Verified {
    counts: Counts,
    bytes: u64,
    diffs: Vec<Diff>,
    /// Names in the destination that the source lacks, with their source parent.
    extras: Vec<(String, PathBuf)>,
}

struct Walker<'a> {
    src: &'a Path,
    dst: &'a Path,
    out: Verified,
    seen_src: HashSet<Key>,
    seen_dst: HashSet<Key>,
    hashed_src: HashSet<Key>,
    src_links: HashMap<Key, Vec<String>>,
    dst_links: HashMap<Key, Vec<String>>,
    link_paths: Vec<(String, Key, Key)>,
    /// Closed (None) once the walk is done, which ends the readers.
    jobs: Option<crossbeam_channel::Sender<Job>>,
}

fn show(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".into()
    } else {
        rel.to_string_lossy().into_owned()
    }
}

fn kind_name(mode: u32) -> &'static str {
    match mode & crate::sys::S_IFMT {
        crate::sys::S_IFREG => "regular file",
        crate::sys::S_IFDIR => "directory",
        crate::sys::S_IFLNK => "symlink",
        crate::sys::S_IFIFO => "fifo",
        crate::sys::S_IFSOCK => "socket",
        crate::sys::S_IFCHR => "character device",
        crate::sys::S_IFBLK => "block device",
        _ => "unknown",
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Calls a list/get xattr function twice: size, then the value (retrying if it grew).
fn xattr_buf(mut f: impl FnMut(*mut libc::c_char, usize) -> isize) -> io::Result<Vec<u8>> {
    loop {
        let n = f(std::ptr::null_mut(), 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; n as usize];
        let m = f(buf.as_mut_ptr().cast(), buf.len());
        if m >= 0 {
            buf.truncate(m as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
}

/// Every xattr of `p` (not following a symlink), POSIX ACLs included, sorted by name.
fn xattrs(p: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = cstr(p)?;
    // SAFETY: c is a valid C string; buffers are passed with their lengths.
    let names = match xattr_buf(|b, n| unsafe { crate::sys::llistxattr(&c, b, n) }) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).expect("no NUL inside a split name");
        // SAFETY: as above.
        match xattr_buf(|b, n| unsafe { crate::sys::lgetxattr(&c, &cn, b.cast(), n) }) {
            Ok(v) => out.push((name.to_vec(), v)),
            Err(e) if e.raw_os_error() == Some(crate::sys::ENOATTR) => {} // removed meanwhile
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

impl Walker<'_> {
    fn diff(&mut self, rel: &Path, what: &'static str, detail: String) {
        self.out.diffs.push(Diff {
            path: show(rel),
            what,
            detail,
        });
    }

    fn walk(&mut self) {
        let root = PathBuf::new();
        match (
            fs::symlink_metadata(self.src),
            fs::symlink_metadata(self.dst),
        ) {
            (Ok(s), Ok(d)) => self.entry(&root, &s, &d),
            (Err(e), _) => self.diff(&root, "unreadable", format!("source: {e}")),
            (_, Err(e)) => self.diff(&root, "unreadable", format!("destination: {e}")),
        }
        let mut stack = vec![root];
        while let Some(rel) = stack.pop() {
            let mut names: Vec<OsString> = match fs::read_dir(self.src.join(&rel)) {
                Ok(rd) => rd.flatten().map(|e| e.file_name()).collect(),
                Err(e) => {
                    self.diff(
                        &rel,
                        "unreadable",
                        format!("cannot list on the source: {e}"),
                    );
                    continue;
                }
            };
            names.sort();
            let dst_names: HashSet<OsString> = match fs::read_dir(self.dst.join(&rel)) {
                Ok(rd) => rd.flatten().map(|e| e.file_name()).collect(),
                Err(e) => {
                    self.diff(
                        &rel,
                        "unreadable",
                        format!("cannot list on the destination: {e}"),
                    );
                    continue;
                }
            };
            let src_names: HashSet<&OsString> = names.iter().collect();
            let mut extras: Vec<&OsString> = dst_names
                .iter()
                .filter(|n| !src_names.contains(n))
                .collect();
            extras.sort();
            for n in extras {
                self.out.extras.push((show(&rel.join(n)), rel.clone()));
            }
            let mut subdirs = Vec::new();
            for name in &names {
                let r = rel.join(name);
                let s = match fs::symlink_metadata(self.src.join(&r)) {
                    Ok(s) => s,
                    Err(e) => {
                        self.diff(&r, "missing", format!("gone from the source: {e}"));
                        continue;
                    }
                };
                self.count(&s);
                if !dst_names.contains(name) {
                    self.diff(&r, "missing", "missing on the destination".into());
                    continue;
                }
                let d = match fs::symlink_metadata(self.dst.join(&r)) {
                    Ok(d) => d,
                    Err(e) => {
                        self.diff(&r, "missing", format!("on the destination: {e}"));
                        continue;
                    }
                };
                self.entry(&r, &s, &d);
                if s.is_dir() && d.is_dir() {
                    subdirs.push(r);
                }
            }
            stack.extend(subdirs.into_iter().rev());
        }
    }

    fn count(&mut self, s: &Metadata) {
        let c = &mut self.out.counts;
        let ft = s.mode() & crate::sys::S_IFMT;
        if ft != crate::sys::S_IFDIR && s.nlink() > 1 && !self.seen_src.insert(key(s)) {
            c.hard_links += 1;
            if ft == crate::sys::S_IFREG {
                c.files += 1;
            }
            return;
        }
        match ft {
            crate::sys::S_IFREG => {
                c.files += 1;
                self.out.bytes += s.size();
            }
            crate::sys::S_IFDIR => c.directories += 1,
            crate::sys::S_IFLNK => c.symlinks += 1,
            crate::sys::S_IFIFO => c.fifos += 1,
            crate::sys::S_IFSOCK => c.sockets += 1,
            crate::sys::S_IFCHR => c.char_devices += 1,
            crate::sys::S_IFBLK => c.block_devices += 1,
            _ => {}
        }
    }

    /// Compares one entry present on both sides.
    fn entry(&mut self, rel: &Path, s: &Metadata, d: &Metadata) {
        let (sk, dk) = (s.mode() & crate::sys::S_IFMT, d.mode() & crate::sys::S_IFMT);
        if sk != dk {
            self.diff(
                rel,
                "kind",
                format!(
                    "{} on the source, {} on the destination",
                    kind_name(sk),
                    kind_name(dk)
                ),
            );
            return;
        }
        if s.mode() & 0o7777 != d.mode() & 0o7777 {
            self.diff(
                rel,
                "mode",
                format!(
                    "{:04o} on the source, {:04o} on the destination",
                    s.mode() & 0o7777,
                    d.mode() & 0o7777
                ),
            );
        }
        if s.uid() != d.uid() {
            self.diff(
                rel,
                "owner",
                format!(
                    "uid {} on the source, {} on the destination",
                    s.uid(),
                    d.uid()
                ),
            );
        }
        if s.gid() != d.gid() {
            self.diff(
                rel,
                "group",
                format!(
                    "gid {} on the source, {} on the destination",
                    s.gid(),
                    d.gid()
                ),
            );
        }
        if (s.mtime(), s.mtime_nsec()) != (d.mtime(), d.mtime_nsec()) {
            self.diff(
                rel,
                "mtime",
                format!(
                    "{}.{:09} on the source, {}.{:09} on the destination",
                    s.mtime(),
                    s.mtime_nsec(),
                    d.mtime(),
                    d.mtime_nsec()
                ),
            );
        }
        match sk {
            crate::sys::S_IFREG => self.file(rel, s, d),
            crate::sys::S_IFLNK => {
                let (a, b) = (
                    fs::read_link(self.src.join(rel)),
                    fs::read_link(self.dst.join(rel)),
                );
                match (a, b) {
                    (Ok(a), Ok(b)) if a == b => {}
                    (Ok(a), Ok(b)) => self.diff(
                        rel,
                        "symlink",
                        format!(
                            "points to {:?} on the source, {:?} on the destination",
                            a, b
                        ),
                    ),
                    (a, b) => self.diff(
                        rel,
                        "unreadable",
                        format!("readlink: source {a:?}, destination {b:?}"),
                    ),
                }
            }
            crate::sys::S_IFCHR | crate::sys::S_IFBLK if s.rdev() != d.rdev() => {
                let mm = |r: u64| {
                    format!(
                        "{}:{}",
                        ((r >> 8) & 0xfff) | ((r >> 32) & !0xfff),
                        (r & 0xff) | ((r >> 12) & !0xff)
                    )
                };
                self.diff(
                    rel,
                    "device",
                    format!(
                        "device {} on the source, {} on the destination",
                        mm(s.rdev()),
                        mm(d.rdev())
                    ),
                );
            }
            _ => {}
        }
        if sk != crate::sys::S_IFDIR && (s.nlink() > 1 || d.nlink() > 1) {
            let p = show(rel);
            self.src_links.entry(key(s)).or_default().push(p.clone());
            self.dst_links.entry(key(d)).or_default().push(p.clone());
            self.link_paths.push((p, key(s), key(d)));
        }
        self.xattrs(rel);
    }

    fn file(&mut self, rel: &Path, s: &Metadata, d: &Metadata) {
        if s.size() != d.size() {
            self.diff(
                rel,
                "content",
                format!(
                    "size {} on the source, {} on the destination",
                    s.size(),
                    d.size()
                ),
            );
            return;
        }
        let shared = s.nlink() > 1 || d.nlink() > 1;
        let job = Job {
            rel: rel.to_path_buf(),
            src: key(s),
            dst: key(d),
            hash_src: !shared || self.hashed_src.insert(key(s)),
            hash_dst: !shared || self.seen_dst.insert(key(d)),
            shared,
        };
        if let Some(tx) = &self.jobs {
            let _ = tx.send(job);
        }
    }

    fn xattrs(&mut self, rel: &Path) {
        let (a, b) = (xattrs(&self.src.join(rel)), xattrs(&self.dst.join(rel)));
        let (a, b) = match (a, b) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) => {
                return self.diff(rel, "xattr", format!("cannot list on the source: {e}"));
            }
            (_, Err(e)) => {
                return self.diff(rel, "xattr", format!("cannot list on the destination: {e}"));
            }
        };
        if a == b {
            return;
        }
        let what = |n: &[u8]| {
            let s = String::from_utf8_lossy(n).into_owned();
            if s.starts_with("system.posix_acl_") {
                ("acl", format!("ACL ({s})"))
            } else {
                ("xattr", format!("extended attribute {s}"))
            }
        };
        let bm: HashMap<&[u8], &[u8]> = b.iter().map(|(n, v)| (&n[..], &v[..])).collect();
        let am: HashMap<&[u8], &[u8]> = a.iter().map(|(n, v)| (&n[..], &v[..])).collect();
        let mut found = Vec::new();
        for (n, v) in &a {
            let (w, name) = what(n);
            match bm.get(&n[..]) {
                None => found.push((w, format!("{name} missing on the destination"))),
                Some(bv) if bv != v => found.push((
                    w,
                    format!(
                        "{name} differs ({} bytes on the source, {} on the destination)",
                        v.len(),
                        bv.len()
                    ),
                )),
                _ => {}
            }
        }
        for (n, _) in &b {
            if !am.contains_key(&n[..]) {
                let (w, name) = what(n);
                found.push((w, format!("{name} only on the destination")));
            }
        }
        for (w, detail) in found {
            self.diff(rel, w, detail);
        }
    }
}

/// SHA-256 of a file; `drop_cache` asks the kernel to forget its cached pages
/// first, so a FUSE mount serves every byte.
fn hash_file(p: &Path, drop_cache: bool, counted: Option<&AtomicU64>) -> Hash {
    let mut f = File::open(p).map_err(|e| e.to_string())?;
    if drop_cache {
        crate::sys::drop_cache(&f);
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        };
        h.update(&buf[..n]);
        if let Some(c) = counted {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    Ok(h.finalize().into())
}

fn verify(src: &Path, dst: &Path, totals: &Totals, tty: bool) -> Verified {
    let c = Arc::new(Counters::default());
    c.bytes_total.store(totals.bytes_inodes, Ordering::Relaxed);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8);
    let (tx, rx) = crossbeam_channel::bounded::<Job>(1024);
    let src_hashes: Mutex<HashMap<Key, Hash>> = Mutex::new(HashMap::new());
    let dst_hashes: Mutex<HashMap<Key, Hash>> = Mutex::new(HashMap::new());
    let diffs: Mutex<Vec<Diff>> = Mutex::new(Vec::new());
    let deferred: Mutex<Vec<(String, Key, Key)>> = Mutex::new(Vec::new());
    let ticker = Ticker::start("verifying", c.clone(), tty);
    let mut w = Walker {
        src,
        dst,
        out: Verified::default(),
        seen_src: HashSet::new(),
        seen_dst: HashSet::new(),
        hashed_src: HashSet::new(),
        src_links: HashMap::new(),
        dst_links: HashMap::new(),
        link_paths: Vec::new(),
        jobs: Some(tx),
    };
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let rx = rx.clone();
            let (c, src_hashes, dst_hashes, diffs, deferred) =
                (&c, &src_hashes, &dst_hashes, &diffs, &deferred);
            scope.spawn(move || {
                for j in rx {
                    let hs = j.hash_src.then(|| {
                        let h = hash_file(&src.join(&j.rel), false, Some(&c.moved));
                        c.bytes_done
                            .store(c.moved.load(Ordering::Relaxed), Ordering::Relaxed);
                        c.files_done.fetch_add(1, Ordering::Relaxed);
                        h
                    });
                    let hd = j.hash_dst.then(|| hash_file(&dst.join(&j.rel), true, None));
                    let path = show(&j.rel);
                    if !j.shared {
                        if let Some(d) = content_diff(&path, hs.as_ref(), hd.as_ref()) {
                            diffs.lock().expect("not poisoned").push(d);
                        }
                        continue;
                    }
                    if let Some(h) = hs {
                        src_hashes.lock().expect("not poisoned").insert(j.src, h);
                    }
                    if let Some(h) = hd {
                        dst_hashes.lock().expect("not poisoned").insert(j.dst, h);
                    }
                    deferred
                        .lock()
                        .expect("not poisoned")
                        .push((path, j.src, j.dst));
                }
            });
        }
        drop(rx);
        c.files_total.store(totals.files, Ordering::Relaxed);
        w.walk();
        // Closing the channel ends the workers; the scope joins them.
        w.jobs = None;
    });
    drop(ticker);
    let mut out = std::mem::take(&mut w.out);
    out.diffs.extend(diffs.into_inner().expect("not poisoned"));
    // Hard-linked files: compare once per pair of inodes.
    let (sh, dh) = (
        src_hashes.into_inner().expect("not poisoned"),
        dst_hashes.into_inner().expect("not poisoned"),
    );
    let mut pairs = HashSet::new();
    let mut deferred = deferred.into_inner().expect("not poisoned");
    deferred.sort();
    for (path, s, d) in deferred {
        if pairs.insert((s, d))
            && let Some(diff) = content_diff(&path, sh.get(&s), dh.get(&d))
        {
            out.diffs.push(diff);
        }
    }
    // Hard-link groups: each path has the same peers on both sides.
    for (path, s, d) in &w.link_paths {
        let mut a = w.src_links[s].clone();
        let mut b = w.dst_links[d].clone();
        a.sort();
        b.sort();
        if a == b {
            continue;
        }
        let peers = |v: &[String]| {
            let o: Vec<&str> = v
                .iter()
                .filter(|p| *p != path)
                .map(String::as_str)
                .collect();
            if o.is_empty() {
                "no other name".to_string()
            } else {
                o.join(", ")
            }
        };
        out.diffs.push(Diff {
            path: path.clone(),
            what: "hard links",
            detail: format!(
                "linked with {} on the source, with {} on the destination",
                peers(&a),
                peers(&b)
            ),
        });
    }
    out
}

fn content_diff(path: &str, s: Option<&Hash>, d: Option<&Hash>) -> Option<Diff> {
    let detail = match (s, d) {
        (Some(Err(e)), _) => format!("cannot read on the source: {e}"),
        (_, Some(Err(e))) => format!("cannot read on the destination: {e}"),
        (Some(Ok(a)), Some(Ok(b))) if a != b => {
            "content differs (SHA-256 of the source and of the destination)".into()
        }
        _ => return None,
    };
    Some(Diff {
        path: path.into(),
        what: "content",
        detail,
    })
}

/// ctime of `m` in nanoseconds since the epoch.
fn ctime_ns(m: &Metadata) -> i128 {
    m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128
}

/// Splits the differences into real mismatches and entries the source changed
/// after `start`; returns (mismatches, changed, extras).
fn classify(
    src: &Path,
    start: SystemTime,
    v: &mut Verified,
    vanished: &[String],
) -> (Vec<Diff>, Vec<Diff>, Vec<String>) {
    let start_ns = start
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
        - CTIME_SLACK_NS;
    let changed_after = |rel: &Path| match fs::symlink_metadata(src.join(rel)) {
        Ok(m) => ctime_ns(&m) >= start_ns,
        Err(_) => true, // gone from the source since the walk
    };
    let mut verdict: HashMap<String, bool> = HashMap::new();
    let (mut real, mut changed) = (Vec::new(), Vec::new());
    for d in std::mem::take(&mut v.diffs) {
        let rel = if d.path == "." {
            PathBuf::new()
        } else {
            PathBuf::from(&d.path)
        };
        let c = *verdict
            .entry(d.path.clone())
            .or_insert_with(|| changed_after(&rel) || vanished.contains(&d.path));
        if c {
            changed.push(d);
        } else {
            real.push(d);
        }
    }
    let mut extras = Vec::new();
    for (path, parent) in std::mem::take(&mut v.extras) {
        // A name removed from the source after the copy changed its parent directory.
        if changed_after(&parent) || vanished.contains(&path) {
            changed.push(Diff {
                path,
                what: "missing",
                detail: "removed from the source during the run (the copy keeps it)".into(),
            });
        } else {
            extras.push(path);
        }
    }
    real.sort();
    changed.sort();
    (real, changed, extras)
}

// ----- output -------------------------------------------------------------------

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn print_report(r: &Report, json: bool, verify_only: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(r).expect("report serializes")
        );
        return;
    }
    let c = &r.entries;
    println!(
        "{} {} -> {}",
        if verify_only { "verified" } else { "migrated" },
        r.source,
        r.destination
    );
    if let Some(cp) = &r.copy {
        println!(
            "copy:     {} copied ({}) in {:.1} s, {}/s; the rest was up to date",
            plural(cp.files_copied, "file", "files"),
            human(cp.bytes_copied),
            cp.seconds,
            human((cp.bytes_copied as f64 / cp.seconds.max(1e-3)) as u64)
        );
    }
    println!(
        "entries:  {}, {}, {}, {}, {}, {}, {}, {} ({})",
        plural(c.files, "file", "files"),
        plural(c.directories, "directory", "directories"),
        plural(c.symlinks, "symlink", "symlinks"),
        plural(c.hard_links, "hard link", "hard links"),
        plural(c.fifos, "fifo", "fifos"),
        plural(c.sockets, "socket", "sockets"),
        plural(c.char_devices, "character device", "character devices"),
        plural(c.block_devices, "block device", "block devices"),
        human(r.bytes)
    );
    println!(
        "verify:   {} read on each side in {:.1} s, {}/s",
        human(r.bytes),
        r.verify_seconds,
        human((r.bytes as f64 / r.verify_seconds.max(1e-3)) as u64)
    );
    let when = if verify_only {
        "during the verification"
    } else {
        "during the migration"
    };
    for d in &r.differences {
        println!("differs: {}: {}: {}", d.path, d.what, d.detail);
    }
    for d in &r.changed_during_run {
        println!("changed {when}: {}: {}: {}", d.path, d.what, d.detail);
    }
    for p in &r.only_on_destination {
        println!("only on the destination: {p}");
    }
    println!(
        "result:   {}",
        if r.identical {
            "identical".to_string()
        } else {
            let mut parts = Vec::new();
            if !r.differences.is_empty() {
                parts.push(plural(
                    r.differences.len() as u64,
                    "difference",
                    "differences",
                ));
            }
            if !r.changed_during_run.is_empty() {
                parts.push(format!(
                    "{} changed {when}",
                    plural(r.changed_during_run.len() as u64, "entry", "entries")
                ));
            }
            parts.join(", ")
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsync_lines() {
        assert_eq!(
            parse_rsync_line("@@kmsfs 3000000 >f+++++++++ dir/a file"),
            RsyncLine::Item {
                update: b'>',
                kind: b'f',
                size: 3000000
            }
        );
        assert_eq!(
            parse_rsync_line("@@kmsfs 3000000 .f          f1"),
            RsyncLine::Item {
                update: b'.',
                kind: b'f',
                size: 3000000
            }
        );
        assert_eq!(
            parse_rsync_line("      3,000,000   4%  217.67MB/s    0:00:00 (xfr#1, to-chk=5/22)"),
            RsyncLine::Progress { bytes: 3_000_000 }
        );
        assert_eq!(
            parse_rsync_line("         32.768   0%    0,00kB/s    0:00:00"),
            RsyncLine::Progress { bytes: 32_768 }
        );
        assert_eq!(parse_rsync_line("created directory x"), RsyncLine::Other);
        assert_eq!(parse_rsync_line(""), RsyncLine::Other);
    }

    #[test]
    fn vanished() {
        let m = vec![
            "file has vanished: \"/src/a/b c\"".to_string(),
            "rsync warning: some files vanished before they could be transferred (code 24)"
                .to_string(),
        ];
        assert_eq!(vanished_paths(&m, Path::new("/src")), vec!["a/b c"]);
    }

    #[test]
    fn changes_of_the_source_are_apart() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("old"), b"x").unwrap();
        // ctimes come from a coarse clock: keep them well apart.
        std::thread::sleep(Duration::from_millis(100));
        fs::write(d.path().join("new"), b"y").unwrap();
        let new = fs::metadata(d.path().join("new")).unwrap();
        let start = UNIX_EPOCH + Duration::from_nanos(ctime_ns(&new) as u64);
        let diff = |p: &str| Diff {
            path: p.into(),
            what: "content",
            detail: String::new(),
        };
        let mut v = Verified {
            diffs: ["old", "new", "gone", "vanished"].map(diff).to_vec(),
            extras: vec![("extra".into(), PathBuf::new())],
            ..Verified::default()
        };
        let (real, changed, extras) = classify(d.path(), start, &mut v, &["vanished".into()]);
        let paths = |v: &[Diff]| v.iter().map(|d| d.path.clone()).collect::<Vec<_>>();
        assert_eq!(paths(&real), ["old"]);
        assert_eq!(paths(&changed), ["extra", "gone", "new", "vanished"]);
        assert!(extras.is_empty()); // the root's ctime changed with "new"
    }

    #[test]
    fn etas() {
        assert_eq!(eta(5.2), "5s");
        assert_eq!(eta(65.0), "1m05s");
        assert_eq!(eta(7260.0), "2h01m");
    }
}
