//! `kmsfs salvage VOLUME DEST`: copies every file that still verifies out of a
//! (possibly damaged) volume into an ordinary directory.
//!
//! The volume is opened read-only (the live tree, or a snapshot with
//! `--snapshot`) and walked from the root through the public [`Volume`] API.
//! Under DEST it recreates directories, regular files, symlinks, hard links
//! (one inode, one file with several names), fifos and sockets, and device
//! nodes when run as root; with their modes, owners (as root), nanosecond
//! atimes and mtimes, and extended attributes (POSIX ACLs included).
//!
//! A file any of whose blocks fails to verify is not copied as it is: it is
//! skipped and listed, or with `--partial` copied with zeros where blocks
//! failed, as `NAME.partial`. A directory that cannot be (fully) listed is
//! reported and the walk goes on; nothing stops at the first problem.
//!
//! DEST is written only through descriptors: every name is created relative
//! to its directory's descriptor with `O_EXCL`/`O_NOFOLLOW` (or the `*at`
//! call that never follows a final symlink), directories are reopened one
//! component at a time with `O_NOFOLLOW`, and names from the volume that
//! contain `/` or NUL, or are `.` or `..`, are refused: a damaged or hostile
//! tree cannot make salvage write outside DEST. DEST itself becomes the copy
//! of the root directory (its mode, owner, times and xattrs).
//!
//! Exit codes: 0 when everything was copied; 3 when something in the volume
//! was damaged (skipped, or copied as `.partial`); 1 when something could not
//! be written to DEST (and nothing was damaged).

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::{CliError, KeyArgs, Result, exit, human, is_root};
use crate::error::Error;
use crate::format::{FileKind, Timestamp};
use crate::store::FsStorage;
use crate::volume::{Attr, DirItem, MAX_FILE_SIZE, NAME_MAX, OpenOptions, ROOT_INO, Volume};

/// File contents are read in pieces this large.
const CHUNK: u64 = 1 << 20;
/// All-zero pages of this size are left as holes in the copy.
const PAGE: usize = 4096;
/// Entries asked of `readdir` at a time.
const READDIR_BATCH: usize = 1024;

#[derive(Args, Debug)]
pub(super) struct SalvageArgs {
    /// The volume directory
    volume_dir: PathBuf,
    /// Where to copy the files (created if missing; must be empty)
    dest: PathBuf,
    /// Salvage this snapshot instead of the live tree
    #[arg(long, value_name = "NAME")]
    snapshot: Option<String>,
    /// Also copy damaged files: what verifies, zeros where blocks failed, named NAME.partial
    #[arg(long)]
    partial: bool,
    /// Machine-readable report on stdout
    #[arg(long)]
    json: bool,
}

/// Something of the volume that did not come out intact.
#[derive(Debug, Serialize)]
struct Damaged {
    /// Path in the volume ("/dir/file").
    path: String,
    /// "skipped", "partial", "listing incomplete", "xattr not copied".
    action: &'static str,
    detail: String,
    /// The `.partial` copy's path under DEST.
    #[serde(skip_serializing_if = "Option::is_none")]
    copied_as: Option<String>,
    /// Byte ranges `[start, end)` left as zeros in the `.partial` copy.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    zeroed: Vec<[u64; 2]>,
}

/// A path and what happened to it.
#[derive(Debug, Serialize)]
struct Problem {
    path: String,
    detail: String,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    volume: String,
    snapshot: Option<String>,
    dest: String,
    /// Everything was copied (no damage, no error).
    complete: bool,
    files: u64,
    directories: u64,
    symlinks: u64,
    /// Extra names of hard-linked inodes (made with link(2)).
    hard_links: u64,
    /// Fifos, sockets and device nodes.
    special: u64,
    /// File contents copied (sizes; holes included, hard links once).
    bytes: u64,
    /// Files copied as NAME.partial.
    partial_files: u64,
    /// Owners were kept (only root can).
    owners_kept: bool,
    /// Damage found in the volume.
    damaged: Vec<Damaged>,
    /// What could not be written to DEST.
    errors: Vec<Problem>,
    /// Left out on purpose (device nodes without root, xattrs DEST refuses).
    notes: Vec<Problem>,
}

/// The first copy of an inode with several names.
enum Linked {
    /// Copied under DEST at this relative path (possibly as NAME.partial).
    Copied {
        rel: PathBuf,
        partial: Option<(String, Vec<[u64; 2]>)>,
    },
    /// Damaged and skipped, with the reason.
    Skipped(String),
}

/// How one file's copy ended.
enum FileOutcome {
    Copied,
    Partial {
        name: Vec<u8>,
        detail: String,
        zeroed: Vec<[u64; 2]>,
    },
    /// Damaged and skipped (nothing left under DEST).
    Damaged(String),
    /// Could not be written (nothing left under DEST).
    DestError(String),
    /// A volume error that is not damage (permission, internal).
    VolumeError(String),
}

pub(super) fn run(keys: &KeyArgs, a: SalvageArgs) -> Result<()> {
    let t = Instant::now();
    let dir = super::check_volume(&a.volume_dir)?;
    // DEST is checked before the volume is opened and created after: a bad
    // DEST is refused without asking for a secret, and a failed open leaves
    // no directory behind.
    let dest_existed = check_dest(&a.dest, &dir)?;
    super::wait_for_finishing_daemon(&dir);
    let kms = super::open_kms(keys, false)?;
    let opts = OpenOptions {
        read_only: true,
        cache_bytes: super::TOOL_CACHE,
        snapshot: a.snapshot.clone(),
        ..Default::default()
    };
    let vol = Volume::open(Arc::new(FsStorage::new(&dir)), &*kms, opts)?;
    if !dest_existed {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&a.dest)
            .map_err(|e| CliError::error(format!("cannot create {}: {e}", a.dest.display())))?;
    }
    let dest = fs::canonicalize(&a.dest)
        .map_err(|e| CliError::error(format!("{}: {e}", a.dest.display())))?;
    let root =
        open_path_dir(&dest).map_err(|e| CliError::error(format!("{}: {e}", dest.display())))?;

    let bar = ProgressBar::new(0);
    {
        use std::io::IsTerminal;
        if a.json || !std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
    }
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {bytes}/{total_bytes} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    if !bar.is_hidden() {
        bar.set_message("scanning");
        bar.enable_steady_tick(Duration::from_millis(200));
        bar.set_length(total_bytes(&vol));
    }
    bar.set_message("copying");

    let mut s = Salvager {
        vol: &vol,
        root,
        dest: dest.clone(),
        partial: a.partial,
        as_root: is_root(),
        block: u64::from(vol.block_size()).max(PAGE as u64),
        report: Report {
            volume: dir.display().to_string(),
            snapshot: a.snapshot.clone(),
            dest: dest.display().to_string(),
            owners_kept: is_root(),
            ..Report::default()
        },
        links: HashMap::new(),
        dirs_seen: HashSet::new(),
        dir_attrs: Vec::new(),
        bar: bar.clone(),
    };
    s.walk();
    bar.finish_and_clear();
    let mut r = s.report;
    r.complete = r.damaged.is_empty() && r.errors.is_empty();

    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("report serializes")
        );
    } else {
        print_summary(&r, &a.volume_dir, t.elapsed());
    }
    if !r.damaged.is_empty() {
        return Err(CliError::new(
            exit::INTEGRITY,
            format!(
                "{} damaged item(s) in {} were not copied intact (listed {}); restore them from a backup or snapshot{}",
                r.damaged.len(),
                dir.display(),
                if a.json { "in the report" } else { "above" },
                if a.partial {
                    ""
                } else {
                    ", or rerun with --partial to copy what still verifies"
                }
            ),
        ));
    }
    if !r.errors.is_empty() {
        return Err(CliError::error(format!(
            "{} item(s) could not be written to {} (listed {})",
            r.errors.len(),
            dest.display(),
            if a.json { "in the report" } else { "above" },
        )));
    }
    Ok(())
}

fn print_summary(r: &Report, volume: &Path, took: Duration) {
    println!(
        "salvaged {}{} into {}: {} files ({}), {} directories, {} symlinks, {} hard links, {} special files in {:.1} s",
        volume.display(),
        r.snapshot
            .as_ref()
            .map(|s| format!(" (snapshot {s})"))
            .unwrap_or_default(),
        r.dest,
        r.files,
        human(r.bytes),
        r.directories,
        r.symlinks,
        r.hard_links,
        r.special,
        took.as_secs_f64()
    );
    for d in &r.damaged {
        match &d.copied_as {
            Some(c) => println!(
                "damaged: {}: copied as {c}, {} byte(s) in {} range(s) left as zeros ({})",
                d.path,
                d.zeroed.iter().map(|z| z[1] - z[0]).sum::<u64>(),
                d.zeroed.len(),
                d.detail
            ),
            None => println!("damaged: {}: {} ({})", d.path, d.action, d.detail),
        }
    }
    for e in &r.errors {
        println!("error: {}: {}", e.path, e.detail);
    }
    for n in &r.notes {
        println!("note: {}: {}", n.path, n.detail);
    }
    if !r.owners_kept {
        println!("note: owners were not kept (only root can set them)");
    }
}

/// Refuses a DEST that is not a new or empty directory, or lies inside the
/// volume directory. Returns whether it exists.
fn check_dest(dest: &Path, volume: &Path) -> Result<bool> {
    let existed = match fs::metadata(dest) {
        Ok(m) if !m.is_dir() => {
            return Err(CliError::error(format!(
                "{} exists and is not a directory; salvage into a new or empty directory",
                dest.display()
            )));
        }
        Ok(_) => {
            let mut entries = fs::read_dir(dest)
                .map_err(|e| CliError::error(format!("{}: {e}", dest.display())))?;
            if entries.next().is_some() {
                return Err(CliError::error(format!(
                    "{} is not empty; salvage into a new or empty directory (nothing was written)",
                    dest.display()
                )));
            }
            true
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(CliError::error(format!("{}: {e}", dest.display()))),
    };
    // Where DEST will be: itself, or its parent's canonical path plus its name.
    let canon = if existed {
        fs::canonicalize(dest).ok()
    } else {
        let abs = std::path::absolute(dest).ok();
        abs.and_then(|p| {
            let name = p.file_name()?.to_owned();
            let parent = fs::canonicalize(p.parent()?).ok()?;
            Some(parent.join(name))
        })
    };
    let Some(canon) = canon else {
        return Err(CliError::error(format!(
            "cannot create {}: its parent directory does not exist",
            dest.display()
        )));
    };
    if canon.starts_with(volume) {
        return Err(CliError::error(format!(
            "{} is inside the volume directory {}; salvage to another place",
            dest.display(),
            volume.display()
        )));
    }
    Ok(existed)
}

/// Sum of file sizes (hard links once), for the progress bar; errors are
/// left for the copy to report.
fn total_bytes(vol: &Volume) -> u64 {
    let mut total = 0u64;
    let mut seen = HashSet::new();
    let mut dirs = HashSet::from([ROOT_INO]);
    let mut stack = vec![ROOT_INO];
    while let Some(d) = stack.pop() {
        let (items, _) = list_dir(vol, d);
        for it in items {
            match it.kind {
                FileKind::Dir if dirs.insert(it.ino) => stack.push(it.ino),
                FileKind::File if seen.insert(it.ino) => {
                    if let Ok(a) = vol.getattr(it.ino) {
                        total = total.saturating_add(a.inode.size);
                    }
                }
                _ => {}
            }
        }
    }
    total
}

/// Every entry of a directory but "." and "..", as far as it can be listed,
/// and the error that stopped the listing.
fn list_dir(vol: &Volume, ino: u64) -> (Vec<DirItem>, Option<Error>) {
    let mut out = Vec::new();
    let mut offset = 0u64;
    loop {
        let items = match vol.readdir(ino, offset, READDIR_BATCH) {
            Ok(i) => i,
            Err(e) => return (out, Some(e)),
        };
        let Some(last) = items.last() else {
            return (out, None);
        };
        if last.offset <= offset {
            return (
                out,
                Some(Error::integrity(
                    format!("directory {ino}"),
                    "readdir offsets do not advance",
                )),
            );
        }
        offset = last.offset;
        out.extend(
            items
                .into_iter()
                .filter(|i| i.name != b"." && i.name != b".."),
        );
    }
}

/// A name that can only ever mean one entry inside its directory.
fn safe_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX
        && name != b"."
        && name != b".."
        && !name.contains(&b'/')
        && !name.contains(&0)
}

/// Volume errors that mean damage (anything but a permission problem or a bug).
fn is_damage(e: &Error) -> bool {
    !matches!(e, Error::Permission(_) | Error::Internal(_) | Error::Kms(_))
}

/// A short description of a volume error for the report.
fn describe(e: &Error) -> String {
    match e {
        Error::Integrity { what, detail } => format!("{what}: {detail}"),
        e => e.to_string(),
    }
}

fn show(rel: &Path) -> String {
    format!("/{}", String::from_utf8_lossy(rel.as_os_str().as_bytes()))
}

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn openat(
    dir: &OwnedFd,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    // SAFETY: a valid directory descriptor and NUL-terminated name; the
    // returned descriptor is new and owned by the OwnedFd alone.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            libc::c_uint::from(mode),
        )
    })?;
    // SAFETY: `fd` was just returned by openat and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_dir_at(dir: &OwnedFd, name: &CStr) -> io::Result<OwnedFd> {
    openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

fn open_path_dir(p: &Path) -> io::Result<OwnedFd> {
    let c = cstr(p.as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated path; the descriptor is owned below.
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just returned by open and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn timespec(t: Timestamp) -> libc::timespec {
    libc::timespec {
        tv_sec: t.secs as libc::time_t,
        tv_nsec: t.nanos.min(999_999_999) as libc::c_long,
    }
}

/// The mode type bits of a kind that mknod creates.
fn node_type(kind: FileKind) -> Option<libc::mode_t> {
    Some(match kind {
        FileKind::Fifo => libc::S_IFIFO,
        FileKind::Socket => libc::S_IFSOCK,
        FileKind::CharDev => libc::S_IFCHR,
        FileKind::BlockDev => libc::S_IFBLK,
        _ => return None,
    })
}

/// Writes `data` at `off`, leaving all-zero pages as holes.
fn write_sparse(f: &File, off: u64, data: &[u8]) -> io::Result<()> {
    let mut run: Option<usize> = None;
    let mut pos = 0usize;
    for page in data.chunks(PAGE) {
        let zero = page.iter().all(|&b| b == 0);
        match (zero, run) {
            (false, None) => run = Some(pos),
            (true, Some(s)) => {
                if let Some(piece) = data.get(s..pos) {
                    f.write_all_at(piece, off + s as u64)?;
                }
                run = None;
            }
            _ => {}
        }
        pos += page.len();
    }
    if let Some(s) = run
        && let Some(piece) = data.get(s..)
    {
        f.write_all_at(piece, off + s as u64)?;
    }
    Ok(())
}

/// Where a node's extended attributes are set.
enum XTarget<'a> {
    Fd(&'a OwnedFd),
    /// Symlinks and special files: by path, without following the last component.
    Path(&'a CStr),
}

struct Salvager<'a> {
    vol: &'a Volume,
    /// DEST, the copy of the root directory.
    root: OwnedFd,
    /// DEST's canonical path (for the xattrs of symlinks and special files,
    /// which have no descriptor to set them through).
    dest: PathBuf,
    partial: bool,
    as_root: bool,
    block: u64,
    report: Report,
    /// First copies of inodes with several names.
    links: HashMap<u64, Linked>,
    /// Directories walked (a damaged tree may loop).
    dirs_seen: HashSet<u64>,
    /// Directory attributes, set at the end (deepest first) so that writing
    /// their entries does not change their times and their modes or default
    /// ACLs do not get in the way of the copy.
    dir_attrs: Vec<(PathBuf, Attr)>,
    bar: ProgressBar,
}

impl Salvager<'_> {
    fn damaged(&mut self, rel: &Path, action: &'static str, detail: String) {
        self.report.damaged.push(Damaged {
            path: show(rel),
            action,
            detail,
            copied_as: None,
            zeroed: Vec::new(),
        });
    }

    fn error(&mut self, rel: &Path, detail: String) {
        self.report.errors.push(Problem {
            path: show(rel),
            detail,
        });
    }

    fn note(&mut self, rel: &Path, detail: String) {
        self.report.notes.push(Problem {
            path: show(rel),
            detail,
        });
    }

    /// A volume error about `rel`: damage or not.
    fn volume_problem(&mut self, rel: &Path, action: &'static str, e: &Error) {
        if is_damage(e) {
            self.damaged(rel, action, describe(e));
        } else {
            self.error(rel, format!("{action}: {}", describe(e)));
        }
    }

    /// Opens the copy of a directory, one component at a time, never following a symlink.
    fn open_dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        let mut fd = open_dir_at(&self.root, c".")?;
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            };
            fd = open_dir_at(&fd, &cstr(name.as_bytes())?)?;
        }
        Ok(fd)
    }

    fn walk(&mut self) {
        let root = PathBuf::new();
        match self.vol.getattr(ROOT_INO) {
            Ok(a) => self.dir_attrs.push((root.clone(), a)),
            Err(e) => self.volume_problem(&root, "attributes not copied", &e),
        }
        self.dirs_seen.insert(ROOT_INO);
        let mut stack = vec![(ROOT_INO, root)];
        while let Some((ino, rel)) = stack.pop() {
            let fd = match self.open_dir(&rel) {
                Ok(fd) => fd,
                Err(e) => {
                    self.error(&rel, format!("cannot open its copy: {e}"));
                    continue;
                }
            };
            let (items, err) = list_dir(self.vol, ino);
            if let Some(e) = err {
                let action = if items.is_empty() {
                    "not listed"
                } else {
                    "listing incomplete"
                };
                self.volume_problem(&rel, action, &e);
            }
            let names: HashSet<Vec<u8>> = items.iter().map(|i| i.name.clone()).collect();
            let mut dir = DirCtx {
                fd: &fd,
                rel: &rel,
                names: &names,
                used: HashSet::new(),
            };
            for it in &items {
                if let Some(sub) = self.entry(&mut dir, it) {
                    stack.push(sub);
                }
            }
        }
        self.finish_dirs();
    }

    /// Copies one entry; returns a subdirectory to walk.
    fn entry(&mut self, dir: &mut DirCtx<'_>, it: &DirItem) -> Option<(u64, PathBuf)> {
        let rel = dir.rel.join(OsStr::from_bytes(&it.name));
        if !safe_name(&it.name) {
            let shown = format!(
                "{}/{}",
                show(dir.rel).trim_end_matches('/'),
                String::from_utf8_lossy(&it.name).escape_debug()
            );
            self.report.damaged.push(Damaged {
                path: shown,
                action: "skipped",
                detail: "not a valid file name (empty, '.', '..', or containing '/' or NUL)".into(),
                copied_as: None,
                zeroed: Vec::new(),
            });
            return None;
        }
        let attr = match self.vol.getattr(it.ino) {
            Ok(a) => a,
            Err(e) => {
                self.volume_problem(&rel, "skipped", &e);
                return None;
            }
        };
        let name = cstr(&it.name).ok()?;
        let kind = attr.inode.kind;
        if kind == FileKind::Dir {
            if !self.dirs_seen.insert(it.ino) {
                self.damaged(
                    &rel,
                    "skipped",
                    format!(
                        "directory inode {} appears more than once in the tree",
                        it.ino
                    ),
                );
                return None;
            }
            // SAFETY: a valid directory descriptor and NUL-terminated name.
            if let Err(e) = cvt(unsafe { libc::mkdirat(dir.fd.as_raw_fd(), name.as_ptr(), 0o700) })
            {
                self.error(&rel, format!("cannot create the directory: {e}"));
                return None;
            }
            self.report.directories += 1;
            self.dir_attrs.push((rel.clone(), attr));
            return Some((it.ino, rel));
        }
        if attr.inode.nlink > 1
            && let Some(first) = self.links.get(&it.ino)
        {
            self.link(dir, &rel, &it.name, first_clone(first));
            return None;
        }
        let first = match kind {
            FileKind::File => self.file(dir, &rel, &name, &attr),
            FileKind::Symlink => self.symlink(dir, &rel, &name, &attr),
            _ => self.special(dir, &rel, &name, &attr),
        };
        if attr.inode.nlink > 1
            && let Some(first) = first
        {
            self.links.insert(it.ino, first);
        }
        None
    }

    /// Another name of an inode already handled.
    fn link(&mut self, dir: &mut DirCtx<'_>, rel: &Path, name: &[u8], first: Linked) {
        let (src, partial) = match first {
            Linked::Skipped(detail) => {
                self.damaged(
                    rel,
                    "skipped",
                    format!("another name of a damaged file: {detail}"),
                );
                return;
            }
            Linked::Copied { rel: src, partial } => (src, partial),
        };
        let new_name = match &partial {
            Some(_) => dir.partial_name(name),
            None => name.to_vec(),
        };
        let r = (|| -> io::Result<()> {
            let parent = src.parent().unwrap_or(Path::new(""));
            let pfd = self.open_dir(parent)?;
            let old = cstr(src.file_name().map(OsStr::as_bytes).unwrap_or_default())?;
            let new = cstr(&new_name)?;
            // SAFETY: valid descriptors and NUL-terminated names; flags 0
            // links the name itself, never what a symlink points to.
            cvt(unsafe {
                libc::linkat(
                    pfd.as_raw_fd(),
                    old.as_ptr(),
                    dir.fd.as_raw_fd(),
                    new.as_ptr(),
                    0,
                )
            })?;
            Ok(())
        })();
        if let Err(e) = r {
            self.error(rel, format!("cannot link it to {}: {e}", show(&src)));
            return;
        }
        self.report.hard_links += 1;
        if let Some((detail, zeroed)) = partial {
            dir.used.insert(new_name.clone());
            let copied_as = show(&dir.rel.join(OsStr::from_bytes(&new_name)));
            self.report.damaged.push(Damaged {
                path: show(rel),
                action: "partial",
                detail,
                copied_as: Some(copied_as),
                zeroed,
            });
        }
    }

    fn file(
        &mut self,
        dir: &mut DirCtx<'_>,
        rel: &Path,
        name: &CStr,
        attr: &Attr,
    ) -> Option<Linked> {
        match self.copy_file(dir, name, attr) {
            FileOutcome::Copied => {
                self.report.files += 1;
                self.report.bytes = self.report.bytes.saturating_add(attr.inode.size);
                Some(Linked::Copied {
                    rel: rel.to_path_buf(),
                    partial: None,
                })
            }
            FileOutcome::Partial {
                name: pname,
                detail,
                zeroed,
            } => {
                self.report.files += 1;
                self.report.partial_files += 1;
                self.report.bytes = self.report.bytes.saturating_add(attr.inode.size);
                let prel = dir.rel.join(OsStr::from_bytes(&pname));
                self.report.damaged.push(Damaged {
                    path: show(rel),
                    action: "partial",
                    detail: detail.clone(),
                    copied_as: Some(show(&prel)),
                    zeroed: zeroed.clone(),
                });
                Some(Linked::Copied {
                    rel: prel,
                    partial: Some((detail, zeroed)),
                })
            }
            FileOutcome::Damaged(detail) => {
                self.damaged(rel, "skipped", detail.clone());
                Some(Linked::Skipped(detail))
            }
            FileOutcome::DestError(detail) => {
                self.error(rel, detail);
                None
            }
            FileOutcome::VolumeError(detail) => {
                self.error(rel, detail);
                None
            }
        }
    }

    fn copy_file(&mut self, dir: &mut DirCtx<'_>, name: &CStr, attr: &Attr) -> FileOutcome {
        if attr.inode.size > MAX_FILE_SIZE {
            return FileOutcome::Damaged(format!(
                "inode {}: size {} is beyond the {} limit",
                attr.ino,
                attr.inode.size,
                human(MAX_FILE_SIZE)
            ));
        }
        let fd = match openat(
            dir.fd,
            name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o600,
        ) {
            Ok(fd) => fd,
            Err(e) => return FileOutcome::DestError(format!("cannot create the copy: {e}")),
        };
        let f = File::from(fd);
        let remove = |why: FileOutcome| {
            // SAFETY: a valid directory descriptor and NUL-terminated name.
            unsafe { libc::unlinkat(dir.fd.as_raw_fd(), name.as_ptr(), 0) };
            why
        };
        let ino = attr.ino;
        let size = attr.inode.size;
        let mut zeroed: Vec<[u64; 2]> = Vec::new();
        let mut first_bad: Option<String> = None;
        let mut off = 0u64;
        while off < size {
            let n = CHUNK.min(size - off);
            let end = off + n;
            match self.vol.read(ino, off, n as u32) {
                Ok(data) => {
                    if let Err(e) = write_sparse(&f, off, &data) {
                        return remove(FileOutcome::DestError(format!(
                            "cannot write the copy: {e}"
                        )));
                    }
                }
                Err(e) if !is_damage(&e) => {
                    return remove(FileOutcome::VolumeError(format!(
                        "skipped: {}",
                        describe(&e)
                    )));
                }
                Err(e) if !self.partial => return remove(FileOutcome::Damaged(describe(&e))),
                Err(_) => {
                    // Block by block: keep what verifies, zeros for the rest.
                    let mut b = off;
                    while b < end {
                        let bn = (self.block - b % self.block).min(end - b);
                        match self.vol.read(ino, b, bn as u32) {
                            Ok(data) => {
                                if let Err(e) = write_sparse(&f, b, &data) {
                                    return remove(FileOutcome::DestError(format!(
                                        "cannot write the copy: {e}"
                                    )));
                                }
                            }
                            Err(e) if !is_damage(&e) => {
                                return remove(FileOutcome::VolumeError(format!(
                                    "skipped: {}",
                                    describe(&e)
                                )));
                            }
                            Err(e) => {
                                first_bad.get_or_insert_with(|| describe(&e));
                                match zeroed.last_mut() {
                                    Some(last) if last[1] == b => last[1] = b + bn,
                                    _ => zeroed.push([b, b + bn]),
                                }
                            }
                        }
                        b += bn;
                    }
                }
            }
            self.bar.inc(n);
            off = end;
        }
        if let Err(e) = f.set_len(size) {
            return remove(FileOutcome::DestError(format!("cannot set the size: {e}")));
        }
        let fd = OwnedFd::from(f);
        let rel = dir.rel.join(OsStr::from_bytes(name.to_bytes()));
        self.set_owner_fd(&rel, &fd, attr);
        self.copy_xattrs(&rel, attr.ino, XTarget::Fd(&fd));
        self.set_mode_times_fd(&rel, &fd, attr);
        drop(fd);
        let Some(detail) = first_bad else {
            return FileOutcome::Copied;
        };
        // The copy is complete but for the zeroed ranges: give it its own name.
        let pname = dir.partial_name(name.to_bytes());
        let r = cstr(&pname).and_then(|new| {
            // SAFETY: a valid directory descriptor and NUL-terminated names.
            crate::sys::renameat_noreplace(&dir.fd, name, &dir.fd, &new)
        });
        if let Err(e) = r {
            return remove(FileOutcome::DestError(format!(
                "damaged ({detail}); cannot name its partial copy: {e}"
            )));
        }
        dir.used.insert(pname.clone());
        FileOutcome::Partial {
            name: pname,
            detail,
            zeroed,
        }
    }

    fn symlink(
        &mut self,
        dir: &mut DirCtx<'_>,
        rel: &Path,
        name: &CStr,
        attr: &Attr,
    ) -> Option<Linked> {
        let target = match self.vol.readlink(attr.ino) {
            Ok(t) => t,
            Err(e) => {
                self.volume_problem(rel, "skipped", &e);
                return if is_damage(&e) {
                    Some(Linked::Skipped(describe(&e)))
                } else {
                    None
                };
            }
        };
        let Ok(target) = CString::new(target) else {
            self.damaged(rel, "skipped", "symlink target contains a NUL byte".into());
            return Some(Linked::Skipped("symlink target contains a NUL byte".into()));
        };
        // SAFETY: valid NUL-terminated strings and directory descriptor.
        if let Err(e) =
            cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.fd.as_raw_fd(), name.as_ptr()) })
        {
            self.error(rel, format!("cannot create the symlink: {e}"));
            return None;
        }
        self.report.symlinks += 1;
        self.node_attrs(dir, rel, name, attr, false);
        Some(Linked::Copied {
            rel: rel.to_path_buf(),
            partial: None,
        })
    }

    fn special(
        &mut self,
        dir: &mut DirCtx<'_>,
        rel: &Path,
        name: &CStr,
        attr: &Attr,
    ) -> Option<Linked> {
        let Some(ty) = node_type(attr.inode.kind) else {
            self.damaged(rel, "skipped", "unknown file type".into());
            return None;
        };
        let device = matches!(attr.inode.kind, FileKind::CharDev | FileKind::BlockDev);
        if device && !self.as_root {
            self.note(
                rel,
                "device node not created: only root can make one".into(),
            );
            return None;
        }
        // The kernel's 32-bit device encoding, as the mount received it.
        let rdev = attr.inode.rdev;
        let major = (rdev >> 8) & 0xfff;
        let minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
        let dev = crate::sys::makedev(major, minor);
        // SAFETY: a valid directory descriptor and NUL-terminated name.
        if let Err(e) =
            cvt(unsafe { libc::mknodat(dir.fd.as_raw_fd(), name.as_ptr(), ty | 0o600, dev) })
        {
            self.error(rel, format!("cannot create the node: {e}"));
            return None;
        }
        self.report.special += 1;
        self.node_attrs(dir, rel, name, attr, true);
        Some(Linked::Copied {
            rel: rel.to_path_buf(),
            partial: None,
        })
    }

    /// Owner, xattrs, mode (not for symlinks) and times of a node that has
    /// no descriptor of its own (symlinks and special files).
    fn node_attrs(&mut self, dir: &DirCtx<'_>, rel: &Path, name: &CStr, attr: &Attr, chmod: bool) {
        let dfd = dir.fd.as_raw_fd();
        let i = &attr.inode;
        if self.as_root {
            // SAFETY: a valid directory descriptor and NUL-terminated name.
            if let Err(e) = cvt(unsafe {
                libc::fchownat(dfd, name.as_ptr(), i.uid, i.gid, libc::AT_SYMLINK_NOFOLLOW)
            }) {
                self.error(rel, format!("cannot set the owner: {e}"));
            }
        }
        let path = self.dest.join(rel);
        match cstr(path.as_os_str().as_bytes()) {
            Ok(p) => self.copy_xattrs(rel, attr.ino, XTarget::Path(&p)),
            Err(e) => self.error(rel, format!("cannot name it for its xattrs: {e}")),
        }
        if chmod {
            // SAFETY: as above; the node was just made by this process in a
            // directory only it writes.
            if let Err(e) = cvt(unsafe {
                libc::fchmodat(dfd, name.as_ptr(), (i.perm & 0o7777) as libc::mode_t, 0)
            }) {
                self.error(rel, format!("cannot set the mode: {e}"));
            }
        }
        let times = [timespec(i.atime), timespec(i.mtime)];
        // SAFETY: as above, and `times` holds two timespecs.
        if let Err(e) = cvt(unsafe {
            libc::utimensat(
                dfd,
                name.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        }) {
            self.error(rel, format!("cannot set the times: {e}"));
        }
    }

    fn set_owner_fd(&mut self, rel: &Path, fd: &OwnedFd, attr: &Attr) {
        if !self.as_root {
            return;
        }
        // SAFETY: fchown on a descriptor we own.
        if let Err(e) = cvt(unsafe { libc::fchown(fd.as_raw_fd(), attr.inode.uid, attr.inode.gid) })
        {
            self.error(rel, format!("cannot set the owner: {e}"));
        }
    }

    /// Mode after the owner (chown clears set-id bits) and after the xattrs
    /// (an ACL sets the group bits); times last.
    fn set_mode_times_fd(&mut self, rel: &Path, fd: &OwnedFd, attr: &Attr) {
        let i = &attr.inode;
        // SAFETY: fchmod on a descriptor we own.
        if let Err(e) =
            cvt(unsafe { libc::fchmod(fd.as_raw_fd(), (i.perm & 0o7777) as libc::mode_t) })
        {
            self.error(rel, format!("cannot set the mode: {e}"));
        }
        let times = [timespec(i.atime), timespec(i.mtime)];
        // SAFETY: futimens on a descriptor we own with two timespecs.
        if let Err(e) = cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }) {
            self.error(rel, format!("cannot set the times: {e}"));
        }
    }

    fn copy_xattrs(&mut self, rel: &Path, ino: u64, target: XTarget<'_>) {
        let names = match self.vol.listxattr(ino) {
            Ok(n) => n,
            Err(e) => {
                self.volume_problem(rel, "xattrs not copied", &e);
                return;
            }
        };
        for xname in names {
            let shown = String::from_utf8_lossy(&xname).escape_debug().to_string();
            let value = match self.vol.getxattr(ino, &xname) {
                Ok(v) => v,
                Err(e) => {
                    if is_damage(&e) {
                        self.damaged(
                            rel,
                            "xattr not copied",
                            format!("{shown}: {}", describe(&e)),
                        );
                    } else {
                        self.error(rel, format!("xattr {shown} not copied: {}", describe(&e)));
                    }
                    continue;
                }
            };
            let Ok(cname) = CString::new(xname) else {
                self.damaged(
                    rel,
                    "xattr not copied",
                    format!("{shown}: name contains a NUL byte"),
                );
                continue;
            };
            let r = match target {
                // SAFETY: a descriptor we own, a NUL-terminated name, and a
                // value pointer valid for its length.
                XTarget::Fd(fd) => cvt(unsafe {
                    crate::sys::fsetxattr(fd, &cname, value.as_ptr().cast(), value.len(), 0)
                }),
                // SAFETY: as above, with a NUL-terminated path.
                XTarget::Path(p) => cvt(unsafe {
                    crate::sys::lsetxattr(p, &cname, value.as_ptr().cast(), value.len(), 0)
                }),
            };
            if let Err(e) = r {
                match e.raw_os_error() {
                    Some(libc::EPERM) | Some(libc::ENOTSUP) => {
                        self.note(rel, format!("xattr {shown} not copied: {e}"))
                    }
                    _ => self.error(rel, format!("xattr {shown} not copied: {e}")),
                }
            }
        }
    }

    /// Owners, xattrs, modes and times of the directories, deepest first.
    fn finish_dirs(&mut self) {
        let dirs = std::mem::take(&mut self.dir_attrs);
        for (rel, attr) in dirs.iter().rev() {
            let fd = match self.open_dir(rel) {
                Ok(fd) => fd,
                Err(e) => {
                    self.error(
                        rel,
                        format!("cannot open its copy to set its attributes: {e}"),
                    );
                    continue;
                }
            };
            self.set_owner_fd(rel, &fd, attr);
            self.copy_xattrs(rel, attr.ino, XTarget::Fd(&fd));
            self.set_mode_times_fd(rel, &fd, attr);
        }
    }
}

fn first_clone(l: &Linked) -> Linked {
    match l {
        Linked::Copied { rel, partial } => Linked::Copied {
            rel: rel.clone(),
            partial: partial.clone(),
        },
        Linked::Skipped(d) => Linked::Skipped(d.clone()),
    }
}

/// The directory being copied.
struct DirCtx<'a> {
    fd: &'a OwnedFd,
    rel: &'a Path,
    /// Every name the volume has in it.
    names: &'a HashSet<Vec<u8>>,
    /// Names salvage made up in it (partial copies).
    used: HashSet<Vec<u8>>,
}

impl DirCtx<'_> {
    /// `NAME.partial`, or `NAME.partial.N` when the directory has that name already.
    fn partial_name(&self, name: &[u8]) -> Vec<u8> {
        let mut base = name.to_vec();
        base.extend_from_slice(b".partial");
        let mut candidate = base.clone();
        let mut n = 2u32;
        while self.names.contains(&candidate) || self.used.contains(&candidate) {
            candidate = base.clone();
            candidate.extend_from_slice(format!(".{n}").as_bytes());
            n += 1;
        }
        candidate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(safe_name(b"a"));
        assert!(safe_name(b"..."));
        assert!(safe_name(&[0xff, 0xfe]));
        for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b", &[b'x'; 256]] {
            assert!(!safe_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn partial_names() {
        let names: HashSet<Vec<u8>> = [b"f".to_vec(), b"f.partial".to_vec()].into();
        let mut d = DirCtx {
            fd: &open_path_dir(Path::new("/")).unwrap(),
            rel: Path::new(""),
            names: &names,
            used: HashSet::new(),
        };
        assert_eq!(d.partial_name(b"g"), b"g.partial");
        assert_eq!(d.partial_name(b"f"), b"f.partial.2");
        d.used.insert(b"f.partial.2".to_vec());
        assert_eq!(d.partial_name(b"f"), b"f.partial.3");
    }

    #[test]
    fn sparse_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        let f = File::create(&p).unwrap();
        let mut data = vec![0u8; 1 << 20];
        data[5000] = 1;
        data[(1 << 20) - 1] = 2;
        write_sparse(&f, 1 << 30, &data).unwrap();
        f.set_len((1 << 30) + (1 << 21)).unwrap();
        let back = fs::read(&p).unwrap();
        assert_eq!(back.len(), (1 << 30) + (1 << 21));
        assert_eq!(&back[1 << 30..(1 << 30) + (1 << 20)], &data[..]);
        assert!(back[..1 << 30].iter().all(|&b| b == 0));
        use std::os::unix::fs::MetadataExt;
        assert!(fs::metadata(&p).unwrap().blocks() * 512 < 64 << 10);
    }
}
