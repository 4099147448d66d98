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

mod copy;
mod verify;

use copy::*;
use verify::*;

/// Plain progress lines (no terminal) come this often.
pub(super) const PLAIN_INTERVAL: Duration = Duration::from_secs(5);
/// How long rsync gets to stop after SIGTERM before SIGKILL.
pub(super) const STOP_WAIT: Duration = Duration::from_secs(15);
/// Source entries changed this little before the run started still count as
/// changed during it: the kernel stamps ctime from a clock that lags by a tick.
pub(super) const CTIME_SLACK_NS: i128 = 20_000_000;

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

pub(super) const MIGRATE_NOTES: &str = "\
The copy is `rsync -aHAXS --numeric-ids -@-1 --partial SOURCE_DIR/ MOUNTPOINT/` (rsync must be
installed: apt-get install rsync); nothing is deleted from MOUNTPOINT. Interrupted (Ctrl-C,
kill), run the same command again: finished files are skipped. The verification reads every
file on both sides and compares kind, mode, owner, group, mtime (ns), xattrs, ACLs, symlink
targets, device numbers and hard links. Exit 0: identical; 3: differences (each named);
1: the copy failed, or entries changed in SOURCE_DIR during the run (listed; run again).";

// ----- the report ----------------------------------------------------------------

#[derive(Debug, Default, Serialize, Clone, Copy)]
pub(super) struct Counts {
    pub(super) files: u64,
    pub(super) directories: u64,
    pub(super) symlinks: u64,
    /// Names beyond the first of an inode (any kind).
    pub(super) hard_links: u64,
    pub(super) fifos: u64,
    pub(super) sockets: u64,
    pub(super) char_devices: u64,
    pub(super) block_devices: u64,
}

/// One difference: the path (relative to the roots), what differs, and how.
#[derive(Debug, Serialize, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Diff {
    pub(super) path: String,
    pub(super) what: &'static str,
    pub(super) detail: String,
}

#[derive(Debug, Serialize)]
pub(super) struct CopyReport {
    pub(super) seconds: f64,
    /// Files rsync (re)wrote in this run; the others were up to date.
    pub(super) files_copied: u64,
    pub(super) bytes_copied: u64,
    pub(super) rsync_exit: i32,
    /// rsync's own warnings and errors (its stderr), in order.
    pub(super) rsync_messages: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(super) struct Report {
    pub(super) source: String,
    pub(super) destination: String,
    pub(super) copy: Option<CopyReport>,
    pub(super) entries: Counts,
    /// Bytes of regular files in the source (each inode once).
    pub(super) bytes: u64,
    pub(super) verify_seconds: f64,
    /// True when nothing differs and nothing changed during the run.
    pub(super) identical: bool,
    pub(super) differences: Vec<Diff>,
    /// Differences of entries the source changed (or rsync saw vanish) after the run started.
    pub(super) changed_during_run: Vec<Diff>,
    /// Entries in MOUNTPOINT that the source does not have (migrate never deletes).
    pub(super) only_on_destination: Vec<String>,
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
pub(super) fn outcome(r: &Report, verify_only: bool) -> Result<()> {
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

pub(super) struct MountEntry {
    pub(super) fstype: String,
    pub(super) source: String,
    pub(super) target: String,
}

/// The mount holding `path` (statfs).
#[cfg(target_os = "macos")]
pub(super) fn mount_of(path: &Path) -> Option<MountEntry> {
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
pub(super) fn mount_of(path: &Path) -> Option<MountEntry> {
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
pub(super) fn check_destination(dst: &Path, force: bool) -> Result<()> {
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

// ----- output -------------------------------------------------------------------

pub(super) fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

pub(super) fn print_report(r: &Report, json: bool, verify_only: bool) {
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
mod tests;
