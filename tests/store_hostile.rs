//! The backing store is hostile: others may write the backing directory (a
//! share), and the daemon often runs as root. A symbolic link planted at any
//! name kmsfs uses must never make kmsfs write (or create) a file outside the
//! volume, and a FIFO, socket or device where a file is expected must never
//! hang it. Each case plants the thing, runs the operations that touch the
//! name, and checks that the victim outside the volume is untouched and that
//! the operation either failed with an error naming the file and what is
//! wrong, or did something harmless (replaced or removed the planted name).
//!
//! The engine-level cases run `Volume` on `FsStorage` over a real directory;
//! the mount-level cases run the real `kmsfs` binary (FUSE).

mod common;
mod engine_common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use kmsfs::format;
use kmsfs::store::{FsStorage, Storage};
use kmsfs::volume::{OpenOptions, ROOT_INO, Volume};

/// Generous: only a hang (a FIFO opened for blocking I/O) gets near it.
const DEADLINE: Duration = Duration::from_secs(120);

/// Engine tests take and release the volume lock (flock) in this process;
/// a child spawned by a mount test at that moment holds a copy of the
/// descriptor until it execs, and so the lock, for an instant. Engine tests
/// share this lock; mount tests (which spawn) take it alone.
static SPAWNING: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn engine_test() -> std::sync::RwLockReadGuard<'static, ()> {
    SPAWNING.read().unwrap_or_else(|e| e.into_inner())
}

fn mount_test() -> std::sync::RwLockWriteGuard<'static, ()> {
    SPAWNING.write().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on its own thread and returns its result; a hang fails the test
/// at the deadline instead of stalling the suite.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(v) => v,
        Err(RecvTimeoutError::Timeout) => {
            panic!("{what} did not return within {DEADLINE:?}: it blocked on a planted file")
        }
        Err(RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

/// A file outside the volume that nothing may modify.
struct Victim {
    path: PathBuf,
    content: Vec<u8>,
}

impl Victim {
    fn new(dir: &Path, name: &str) -> Victim {
        let path = dir.join(name);
        let content = format!("victim {name}: kmsfs must never write here\n").into_bytes();
        fs::write(&path, &content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        Victim { path, content }
    }

    #[track_caller]
    fn assert_intact(&self) {
        let md = fs::symlink_metadata(&self.path).unwrap();
        assert!(
            md.file_type().is_file(),
            "{} changed type",
            self.path.display()
        );
        assert_eq!(
            md.permissions().mode() & 0o7777,
            0o644,
            "{} changed mode",
            self.path.display()
        );
        assert_eq!(
            fs::read(&self.path).unwrap(),
            self.content,
            "{} was modified",
            self.path.display()
        );
    }
}

/// A path outside the volume that nothing may create.
#[track_caller]
fn assert_absent(p: &Path) {
    assert!(
        fs::symlink_metadata(p).is_err(),
        "{} was created through a planted link",
        p.display()
    );
}

/// Asserts an error names `name` and says what was found there.
#[track_caller]
fn assert_clear(msg: &str, name: &str, found: &str) {
    assert!(
        msg.contains(name) && msg.contains(found) && msg.contains("tampered"),
        "the error should name {name} and say it is {found}: {msg}"
    );
}

/// Replaces whatever is at `p` (file, link, FIFO, directory) by `f(p)`.
fn replace(p: &Path, f: impl FnOnce(&Path)) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).unwrap(),
        Ok(_) => fs::remove_file(p).unwrap(),
        Err(_) => {}
    }
    f(p);
}

fn plant_symlink(p: &Path, target: &Path) {
    replace(p, |p| std::os::unix::fs::symlink(target, p).unwrap());
}

fn plant_fifo(p: &Path) {
    replace(p, |p| {
        nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap()
    });
}

fn is_regular(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file())
}

/// A real volume on a real directory, closed, with one file in it; and a
/// directory outside the volume for victims.
struct Fx {
    env: Arc<engine_common::Env>,
    _tmp: tempfile::TempDir,
    vol: PathBuf,
    outside: PathBuf,
    data: Vec<u8>,
}

impl Fx {
    fn new() -> Fx {
        let env = Arc::new(engine_common::env());
        let tmp = tempfile::tempdir().unwrap();
        let vol = tmp.path().join("vol");
        let outside = tmp.path().join("outside");
        fs::create_dir(&vol).unwrap();
        fs::create_dir(&outside).unwrap();
        let data = engine_common::pattern(7, 300_000);
        let v = engine_common::init(&env, storage(&vol), &engine_common::small_opts());
        let a = v.create(ROOT_INO, b"f", 0o644, 0, 0).unwrap();
        v.write(a.ino, 0, &data).unwrap();
        v.close().unwrap();
        Fx {
            env,
            _tmp: tmp,
            vol,
            outside,
            data,
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.vol.join(name)
    }

    fn victim(&self, name: &str) -> Victim {
        Victim::new(&self.outside, name)
    }

    fn open_rw(&self) -> kmsfs::error::Result<Volume> {
        Volume::open(storage(&self.vol), &self.env.kms, OpenOptions::default())
    }

    fn open_ro(&self) -> kmsfs::error::Result<Volume> {
        let o = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        Volume::open(storage(&self.vol), &self.env.kms, o)
    }

    /// Opens read-write on its own thread, bounded.
    fn open_rw_bounded(self: &Arc<Self>, what: &str) -> kmsfs::error::Result<Volume> {
        let fx = self.clone();
        bounded(what, move || fx.open_rw())
    }

    fn open_ro_bounded(self: &Arc<Self>, what: &str) -> kmsfs::error::Result<Volume> {
        let fx = self.clone();
        bounded(what, move || fx.open_ro())
    }

    /// The file's contents through the volume.
    fn read_f(&self, v: &Volume) -> kmsfs::error::Result<Vec<u8>> {
        let a = v.lookup(ROOT_INO, b"f")?;
        v.read(a.ino, 0, self.data.len() as u32)
    }

    fn segments(&self) -> Vec<String> {
        storage(&self.vol)
            .list(format::SEGMENT_DIR)
            .unwrap()
            .into_iter()
            .filter(|n| format::parse_segment_file_name(n).is_some())
            .map(|n| format!("{}/{n}", format::SEGMENT_DIR))
            .collect()
    }

    /// The segment a writer opened now would create next.
    fn next_segment(&self) -> String {
        let max = self
            .segments()
            .iter()
            .filter_map(|n| format::parse_segment_file_name(n.rsplit('/').next().unwrap()))
            .max()
            .unwrap_or(0);
        format::segment_file_name(max + 1)
    }
}

fn storage(dir: &Path) -> Arc<dyn Storage> {
    Arc::new(FsStorage::new(dir))
}

/// Writes a new file and commits: the path through root.tmp and a new segment.
fn write_and_commit(v: &Volume, name: &[u8]) -> kmsfs::error::Result<()> {
    let a = v.create(ROOT_INO, name, 0o644, 0, 0)?;
    v.write(a.ino, 0, &engine_common::pattern(3, 70_000))?;
    v.commit()
}

// ----- kmsfs.lock and kmsfs.readers ------------------------------------------------

#[test]
fn lock_file_symlink_is_refused() {
    let _serial = engine_test();
    let fx = Fx::new();
    let victim = fx.victim("shadow");
    plant_symlink(&fx.p(format::LOCK_FILE), &victim.path);
    let e = fx
        .open_rw()
        .err()
        .expect("a planted kmsfs.lock must be refused");
    assert_clear(&e.to_string(), "kmsfs.lock", "a symbolic link");
    victim.assert_intact();
    // Read-only users do not take the writer lock: unaffected, harmless.
    let v = fx.open_ro().unwrap();
    assert_eq!(fx.read_f(&v).unwrap(), fx.data);
    drop(v);
    victim.assert_intact();

    // A dangling link: O_CREAT must not create its target.
    let absent = fx.outside.join("created-by-kmsfs");
    plant_symlink(&fx.p(format::LOCK_FILE), &absent);
    let e = fx
        .open_rw()
        .err()
        .expect("a dangling kmsfs.lock link must be refused");
    assert_clear(&e.to_string(), "kmsfs.lock", "a symbolic link");
    assert_absent(&absent);

    // Removing it is the fix the message asks for.
    fs::remove_file(fx.p(format::LOCK_FILE)).unwrap();
    let v = fx.open_rw().unwrap();
    assert_eq!(fx.read_f(&v).unwrap(), fx.data);
    v.close().unwrap();
    assert!(is_regular(&fx.p(format::LOCK_FILE)));
}

#[test]
fn lock_file_hard_link_is_locked_but_never_truncated() {
    let _serial = engine_test();
    let fx = Fx::new();
    // A hard link needs the same filesystem: the victim sits beside the volume.
    let victim = fx.victim("linked");
    replace(&fx.p(format::LOCK_FILE), |p| {
        fs::hard_link(&victim.path, p).unwrap()
    });
    let v = fx.open_rw().unwrap();
    victim.assert_intact();
    write_and_commit(&v, b"g").unwrap();
    v.close().unwrap();
    victim.assert_intact();
}

#[test]
fn readers_file_symlink_is_refused() {
    let _serial = engine_test();
    let fx = Fx::new();
    let victim = fx.victim("readers-victim");
    plant_symlink(&fx.p(format::READERS_FILE), &victim.path);
    let e = fx
        .open_ro()
        .err()
        .expect("a planted kmsfs.readers must be refused");
    assert_clear(&e.to_string(), "kmsfs.readers", "a symbolic link");
    victim.assert_intact();
    // The writer opens fine; its cleaner needs the readers lock and says why not.
    let v = fx.open_rw().unwrap();
    write_and_commit(&v, b"g").unwrap();
    let e = v.clean(1.01).expect_err("clean needs kmsfs.readers");
    assert_clear(&e.to_string(), "kmsfs.readers", "a symbolic link");
    v.close().unwrap();
    victim.assert_intact();

    let absent = fx.outside.join("readers-created");
    plant_symlink(&fx.p(format::READERS_FILE), &absent);
    assert!(fx.open_ro().is_err());
    assert_absent(&absent);
}

// ----- kmsfs.root and kmsfs.root.tmp -----------------------------------------------

#[test]
fn root_tmp_symlink_fails_the_commit_and_spares_the_target() {
    let _serial = engine_test();
    let fx = Fx::new();
    let victim = fx.victim("root-tmp-victim");
    let absent = fx.outside.join("root-tmp-created");
    let v = fx.open_rw().unwrap();
    for target in [&victim.path, &absent] {
        plant_symlink(&fx.p(format::ROOT_TMP_FILE), target);
        let e = write_and_commit(&v, target.file_name().unwrap().as_encoded_bytes())
            .expect_err("a commit through a planted kmsfs.root.tmp must fail");
        assert_clear(&e.to_string(), "kmsfs.root.tmp", "a symbolic link");
        victim.assert_intact();
        assert_absent(&absent);
    }
    // Once the planted link is gone, the next commit goes through.
    fs::remove_file(fx.p(format::ROOT_TMP_FILE)).unwrap();
    v.commit().unwrap();
    v.close().unwrap();
    let v = fx.open_rw().unwrap();
    assert_eq!(fx.read_f(&v).unwrap(), fx.data);
    v.lookup(ROOT_INO, b"root-tmp-victim").unwrap();
    v.lookup(ROOT_INO, b"root-tmp-created").unwrap();
    v.close().unwrap();
    victim.assert_intact();
    assert_absent(&absent);
}

#[test]
fn root_tmp_hard_link_is_replaced_not_written_through() {
    let _serial = engine_test();
    let fx = Fx::new();
    let victim = fx.victim("root-tmp-linked");
    replace(&fx.p(format::ROOT_TMP_FILE), |p| {
        fs::hard_link(&victim.path, p).unwrap()
    });
    let v = fx.open_rw().unwrap();
    write_and_commit(&v, b"g").unwrap();
    v.close().unwrap();
    victim.assert_intact();
    assert_eq!(fs::metadata(&victim.path).unwrap().nlink(), 1);
}

#[test]
fn root_symlink_is_refused_on_open_and_replaced_by_a_commit() {
    let _serial = engine_test();
    let fx = Fx::new();
    let victim = fx.victim("root-victim");
    // Even a link to a genuine copy of the root record is refused: kmsfs
    // never follows a link in the backing directory.
    let copy = fx.outside.join("root-copy");
    fs::copy(fx.p(format::ROOT_FILE), &copy).unwrap();
    let genuine = fs::read(&copy).unwrap();
    for target in [&victim.path, &copy] {
        plant_symlink(&fx.p(format::ROOT_FILE), target);
        for e in [fx.open_rw().err(), fx.open_ro().err()] {
            let e = e.expect("a planted kmsfs.root must be refused");
            assert_clear(&e.to_string(), "kmsfs.root", "a symbolic link");
        }
    }
    victim.assert_intact();
    // Put the real one back; plant a link while the volume is open: the
    // commit renames its new root over the link, never writes through it.
    replace(&fx.p(format::ROOT_FILE), |p| {
        fs::write(p, &genuine).unwrap()
    });
    let v = fx.open_rw().unwrap();
    plant_symlink(&fx.p(format::ROOT_FILE), &victim.path);
    // Commits alternate between the two root slots: the second replaces it.
    write_and_commit(&v, b"g").unwrap();
    write_and_commit(&v, b"h").unwrap();
    v.close().unwrap();
    victim.assert_intact();
    assert!(is_regular(&fx.p(format::ROOT_FILE)));
    assert_eq!(fs::read(&copy).unwrap(), genuine);
    let v = fx.open_rw().unwrap();
    v.lookup(ROOT_INO, b"g").unwrap();
    v.close().unwrap();
}

// ----- kmsfs.header, kmsfs.header.bak and their .tmp -------------------------------

#[test]
fn header_symlinks_are_repaired_from_the_other_copy() {
    let _serial = engine_test();
    for (planted, other) in [
        (format::HEADER_FILE, format::HEADER_BACKUP_FILE),
        (format::HEADER_BACKUP_FILE, format::HEADER_FILE),
    ] {
        let fx = Fx::new();
        let victim = fx.victim("header-victim");
        plant_symlink(&fx.p(planted), &victim.path);
        // A reader just uses the intact copy.
        let v = fx.open_ro().unwrap();
        assert_eq!(fx.read_f(&v).unwrap(), fx.data);
        drop(v);
        victim.assert_intact();
        // A writer rewrites the damaged copy: a new file renamed over the link.
        let v = fx.open_rw().unwrap();
        assert_eq!(fx.read_f(&v).unwrap(), fx.data);
        v.close().unwrap();
        victim.assert_intact();
        assert!(is_regular(&fx.p(planted)), "{planted} was not repaired");
        assert_eq!(
            fs::read(fx.p(planted)).unwrap(),
            fs::read(fx.p(other)).unwrap()
        );
    }
}

#[test]
fn both_header_symlinks_are_refused() {
    let _serial = engine_test();
    let fx = Fx::new();
    let victim = fx.victim("header-victim");
    plant_symlink(&fx.p(format::HEADER_FILE), &victim.path);
    plant_symlink(&fx.p(format::HEADER_BACKUP_FILE), &victim.path);
    for e in [fx.open_rw().err(), fx.open_ro().err()] {
        let e = e.expect("no intact header: the open must fail");
        assert_clear(&e.to_string(), "kmsfs.header", "a symbolic link");
    }
    victim.assert_intact();
}

#[test]
fn header_tmp_symlink_stops_the_repair() {
    let _serial = engine_test();
    let fx = Fx::new();
    let victim = fx.victim("bak-victim");
    let tmp_victim = fx.victim("bak-tmp-victim");
    plant_symlink(&fx.p(format::HEADER_BACKUP_FILE), &victim.path);
    let tmp = format!("{}.tmp", format::HEADER_BACKUP_FILE);
    plant_symlink(&fx.p(&tmp), &tmp_victim.path);
    let e = fx
        .open_rw()
        .err()
        .expect("the repair must not write through the link");
    assert_clear(&e.to_string(), &tmp, "a symbolic link");
    victim.assert_intact();
    tmp_victim.assert_intact();
}

#[test]
fn init_refuses_planted_names() {
    let _serial = engine_test();
    let env = engine_common::env();
    let tmp = tempfile::tempdir().unwrap();
    let victim = Victim::new(tmp.path(), "init-victim");
    let vdir = tmp.path().join("victim-dir");
    fs::create_dir(&vdir).unwrap();
    // seg as a link to a directory elsewhere.
    let vol = tmp.path().join("vol1");
    fs::create_dir(&vol).unwrap();
    std::os::unix::fs::symlink(&vdir, vol.join(format::SEGMENT_DIR)).unwrap();
    let e = Volume::init(storage(&vol), &env.kms, &engine_common::small_opts())
        .expect_err("a planted seg link must be refused");
    assert_clear(&e.to_string(), "seg", "a symbolic link");
    assert_eq!(fs::read_dir(&vdir).unwrap().count(), 0);
    // A header link makes the directory "not empty", never a target.
    let vol = tmp.path().join("vol2");
    fs::create_dir(&vol).unwrap();
    std::os::unix::fs::symlink(&victim.path, vol.join(format::HEADER_FILE)).unwrap();
    Volume::init(storage(&vol), &env.kms, &engine_common::small_opts())
        .expect_err("init over a planted header must fail");
    let md = fs::symlink_metadata(vol.join(format::HEADER_FILE)).unwrap();
    assert!(md.file_type().is_symlink());
    assert_eq!(
        fs::read_dir(&vol).unwrap().count(),
        1,
        "init wrote beside the link"
    );
    // Links at the temporary names init writes through.
    for name in [
        format!("{}.tmp", format::HEADER_BACKUP_FILE),
        format!("{}.tmp", format::HEADER_FILE),
    ] {
        let vol = tmp.path().join(format!("vol-{name}"));
        fs::create_dir(&vol).unwrap();
        std::os::unix::fs::symlink(&victim.path, vol.join(&name)).unwrap();
        let e = Volume::init(storage(&vol), &env.kms, &engine_common::small_opts())
            .expect_err("init through a planted link must fail");
        assert_clear(&e.to_string(), &name, "a symbolic link");
    }
    victim.assert_intact();
}

// ----- segments and the seg directory ---------------------------------------------

#[test]
fn segment_symlink_is_refused_on_read() {
    let _serial = engine_test();
    let fx = Fx::new();
    let victim = fx.victim("seg-victim");
    let segs = fx.segments();
    assert!(!segs.is_empty());
    // A link to a genuine copy (a redirect) and to an unrelated file.
    for (i, seg) in segs.iter().enumerate() {
        let copy = fx.outside.join(format!("seg-copy-{i}"));
        fs::copy(fx.p(seg), &copy).unwrap();
        plant_symlink(&fx.p(seg), &copy);
    }
    let msg = match fx.open_rw() {
        Err(e) => e.to_string(),
        Ok(v) => {
            let e = fx
                .read_f(&v)
                .expect_err("data behind a planted link must not be read");
            drop(v);
            e.to_string()
        }
    };
    assert_clear(&msg, "seg/", "a symbolic link");
    plant_symlink(&fx.p(&segs[0]), &victim.path);
    if let Ok(v) = fx.open_rw() {
        assert!(fx.read_f(&v).is_err());
        drop(v);
    }
    victim.assert_intact();
}

#[test]
fn next_segment_symlink_fails_the_write_and_spares_the_target() {
    let _serial = engine_test();
    let fx = Fx::new();
    let victim = fx.victim("next-seg-victim");
    let absent = fx.outside.join("next-seg-created");
    for target in [&victim.path, &absent] {
        let v = fx.open_rw().unwrap();
        // Planted after the open, at the name the writer creates next.
        let next = fx.next_segment();
        plant_symlink(&fx.p(&next), target);
        let e = write_and_commit(&v, b"g")
            .expect_err("appending through a planted segment link must fail");
        assert_clear(&e.to_string(), &next, "a symbolic link");
        drop(v);
        victim.assert_intact();
        assert_absent(&absent);
        fs::remove_file(fx.p(&next)).unwrap();
    }
    // Without the links the volume is intact.
    let v = fx.open_rw().unwrap();
    assert_eq!(fx.read_f(&v).unwrap(), fx.data);
    v.close().unwrap();
}

#[test]
fn cleaner_removes_a_stray_segment_link_not_its_target() {
    let _serial = engine_test();
    let fx = Fx::new();
    let victim = fx.victim("stray-victim");
    // A name the root references nothing in: the cleaner deletes such files.
    let stray = format::segment_file_name(900);
    plant_symlink(&fx.p(&stray), &victim.path);
    let v = fx.open_rw().unwrap();
    v.clean(1.01).unwrap();
    v.close().unwrap();
    victim.assert_intact();
    assert!(
        fs::symlink_metadata(fx.p(&stray)).is_err(),
        "the stray link is left"
    );
}

#[test]
fn seg_dir_symlink_is_refused() {
    let _serial = engine_test();
    let fx = Fx::new();
    // The attacker moves the real segments out and links seg to them: kmsfs
    // must not read or write through the link.
    let moved = fx.outside.join("moved-seg");
    fs::rename(fx.p(format::SEGMENT_DIR), &moved).unwrap();
    std::os::unix::fs::symlink(&moved, fx.p(format::SEGMENT_DIR)).unwrap();
    let before = listing(&moved);
    let msg = match fx.open_rw() {
        Err(e) => e.to_string(),
        Ok(v) => {
            let e = fx
                .read_f(&v)
                .expect_err("segments behind a seg link must not be read");
            let w = write_and_commit(&v, b"g").expect_err("no write through a seg link");
            assert_clear(&w.to_string(), "seg", "a symbolic link");
            drop(v);
            e.to_string()
        }
    };
    assert_clear(&msg, "seg", "a symbolic link");
    assert_eq!(listing(&moved), before, "the linked directory was changed");
    // Put it back: all is well.
    fs::remove_file(fx.p(format::SEGMENT_DIR)).unwrap();
    fs::rename(&moved, fx.p(format::SEGMENT_DIR)).unwrap();
    let v = fx.open_rw().unwrap();
    assert_eq!(fx.read_f(&v).unwrap(), fx.data);
    v.close().unwrap();
}

/// Names, sizes and modification times of a directory's entries.
fn listing(dir: &Path) -> Vec<(String, u64, i64, i64)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
            )
        })
        .collect();
    v.sort();
    v
}

// ----- FIFOs, sockets and devices where a file is expected --------------------------

/// Plants a FIFO at `name` and runs a read-write open, a write and commit, a
/// close and a read-only open, all bounded; returns the messages of what failed.
fn exercise_with_fifo(name: &str) -> Vec<String> {
    let fx = Arc::new(Fx::new());
    plant_fifo(&fx.p(name));
    let mut failures = Vec::new();
    match fx.open_rw_bounded(&format!("a read-write open with a FIFO at {name}")) {
        Ok(v) => {
            let v = Arc::new(v);
            let v2 = v.clone();
            let r = bounded(&format!("a commit with a FIFO at {name}"), move || {
                write_and_commit(&v2, b"g").map_err(|e| e.to_string())
            });
            if let Err(e) = r {
                failures.push(e);
            }
            drop(v);
        }
        Err(e) => failures.push(e.to_string()),
    }
    match fx.open_ro_bounded(&format!("a read-only open with a FIFO at {name}")) {
        Ok(v) => {
            let fx2 = fx.clone();
            let r = bounded(&format!("a read with a FIFO at {name}"), move || {
                fx2.read_f(&v).map_err(|e| e.to_string())
            });
            if let Err(e) = r {
                failures.push(e);
            }
        }
        Err(e) => failures.push(e.to_string()),
    }
    failures
}

#[test]
fn fifos_never_block_and_are_named() {
    let _serial = engine_test();
    // (name, must something fail?) A FIFO at a name kmsfs replaces whole is
    // harmless: the rename of the new file removes it.
    let tmp = format::ROOT_TMP_FILE.to_string();
    let cases: Vec<(String, bool)> = vec![
        (format::LOCK_FILE.into(), true),
        (format::READERS_FILE.into(), true),
        (format::ROOT_FILE.into(), true),
        (tmp, true),
        (format::HEADER_FILE.into(), false),
        (format::HEADER_BACKUP_FILE.into(), false),
        (format::SEGMENT_DIR.into(), true),
    ];
    for (name, must_fail) in cases {
        let failures = exercise_with_fifo(&name);
        assert!(
            !must_fail || !failures.is_empty(),
            "a FIFO at {name} went unnoticed"
        );
        for m in &failures {
            assert_clear(m, &name, "a FIFO");
        }
    }
    // FIFOs at the segments the data lives in, and at the next segment's name.
    let fx = Arc::new(Fx::new());
    for seg in fx.segments() {
        plant_fifo(&fx.p(&seg));
    }
    let r = match fx.open_rw_bounded("an open with a FIFO segment") {
        Ok(v) => bounded("a read of a FIFO segment", {
            let fx = fx.clone();
            move || fx.read_f(&v).map(|_| ()).map_err(|e| e.to_string())
        }),
        Err(e) => Err(e.to_string()),
    };
    assert_clear(&r.unwrap_err(), "seg/", "a FIFO");
    let fx = Arc::new(Fx::new());
    let v = Arc::new(fx.open_rw().unwrap());
    let next = fx.next_segment();
    plant_fifo(&fx.p(&next));
    let v2 = v.clone();
    let e = bounded("an append to a FIFO segment", move || {
        write_and_commit(&v2, b"g").map_err(|e| e.to_string())
    })
    .unwrap_err();
    assert_clear(&e, &next, "a FIFO");
}

#[test]
fn sockets_devices_and_directories_are_refused() {
    let _serial = engine_test();
    // A socket with a listener behind it at the root record.
    let fx = Arc::new(Fx::new());
    let root = fx.p(format::ROOT_FILE);
    replace(&root, |_| {});
    let _l = std::os::unix::net::UnixListener::bind(&root).unwrap();
    let e = fx
        .open_ro_bounded("an open with a socket root")
        .err()
        .unwrap();
    assert_clear(&e.to_string(), "kmsfs.root", "a socket");

    // A character device (the null device) at the lock file, as root can make one.
    let fx = Arc::new(Fx::new());
    let dev = fx.p(format::LOCK_FILE);
    replace(&dev, |_| {});
    match nix::sys::stat::mknod(
        &dev,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    ) {
        Ok(()) => {
            let e = fx
                .open_rw_bounded("an open with a device lock")
                .err()
                .unwrap();
            assert_clear(&e.to_string(), "kmsfs.lock", "a character device");
            assert!(
                fs::symlink_metadata(&dev)
                    .unwrap()
                    .file_type()
                    .is_char_device()
            );
        }
        Err(e) => eprintln!("mknod not permitted here ({e}); device case skipped"),
    }

    // A directory where a file is expected.
    let fx = Fx::new();
    replace(&fx.p(format::ROOT_TMP_FILE), |p| fs::create_dir(p).unwrap());
    let v = fx.open_rw().unwrap();
    let e = write_and_commit(&v, b"g").err().unwrap();
    assert_clear(&e.to_string(), "kmsfs.root.tmp", "a directory");
}

// ----- the running mount: lock, root.tmp and the control socket ---------------------

#[test]
fn mount_refuses_a_planted_lock_link() {
    require_fuse!();
    let _serial = mount_test();
    let env = common::Env::new();
    let victim = Victim::new(env.root(), "mount-lock-victim");
    plant_symlink(&env.vol.join(format::LOCK_FILE), &victim.path);
    let o = env.try_mount("", &[]);
    assert!(!o.status.success(), "{}", common::output_text(&o));
    assert!(!common::is_mounted(&env.mnt));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_clear(&err, "kmsfs.lock", "a symbolic link");
    victim.assert_intact();
    // `kmsfs info` (a reader) with a planted readers link says so too.
    plant_symlink(&env.vol.join(format::READERS_FILE), &victim.path);
    let o = env.run(&["info", env.vol_str()]);
    assert!(!o.status.success(), "{}", common::output_text(&o));
    assert_clear(
        &String::from_utf8_lossy(&o.stderr),
        "kmsfs.readers",
        "a symbolic link",
    );
    victim.assert_intact();
}

#[test]
fn mount_with_a_planted_root_tmp_link_fails_fsync_and_spares_the_target() {
    require_fuse!();
    let _serial = mount_test();
    let env = common::Env::new();
    let victim = Victim::new(env.root(), "mount-root-tmp-victim");
    let m = env.mount();
    plant_symlink(&env.vol.join(format::ROOT_TMP_FILE), &victim.path);
    let f = m.p("file");
    fs::write(&f, common::pattern(100_000, 5)).unwrap();
    let e = fs::File::open(&f)
        .unwrap()
        .sync_all()
        .expect_err("fsync needs a commit, which must fail");
    assert_eq!(common::errno_of(&e), libc::EIO, "{e}");
    victim.assert_intact();
    common::wait_until("the log to name the link", common::TIMEOUT, || {
        let log = env.log_text();
        log.contains("kmsfs.root.tmp") && log.contains("symbolic link")
    });
    // Without the link, the next fsync commits.
    fs::remove_file(env.vol.join(format::ROOT_TMP_FILE)).unwrap();
    fs::File::open(&f).unwrap().sync_all().unwrap();
    m.unmount();
    victim.assert_intact();
    let m = env.mount();
    assert_eq!(fs::read(m.p("file")).unwrap(), common::pattern(100_000, 5));
    m.unmount();
}

/// Whatever is planted at the control socket's name (in the runtime
/// directory) is replaced, never followed; whatever another user of the share
/// plants at the old name in the volume directory (`kmsfs.ctl`) is neither
/// followed nor used.
#[test]
fn control_socket_name_is_replaced_not_followed() {
    require_fuse!();
    let _serial = mount_test();
    let env = Arc::new(common::Env::new());
    let ctl = common::control_socket(&env.vol);
    let legacy = env.vol.join(kmsfs::control::CONTROL_FILE);
    let victim = Victim::new(env.root(), "ctl-victim");
    let absent = env.root().join("ctl-created");
    for plant in 0..3 {
        for at in [&ctl, &legacy] {
            match plant {
                0 => plant_symlink(at, &victim.path),
                1 => plant_symlink(at, &absent),
                _ => plant_fifo(at),
            }
        }
        let env2 = env.clone();
        let o = bounded("a mount with a planted control socket name", move || {
            env2.try_mount("", &[])
        });
        assert!(o.status.success(), "{}", common::output_text(&o));
        let m = env.guard();
        let md = fs::symlink_metadata(&ctl).unwrap();
        assert!(
            md.file_type().is_socket(),
            "{} is {:?}",
            ctl.display(),
            md.file_type()
        );
        victim.assert_intact();
        assert_absent(&absent);
        // The control socket works: a snapshot goes through the mount.
        env.ok(&["snapshot", "create", env.vol_str(), &format!("s{plant}")]);
        m.unmount();
        victim.assert_intact();
        assert_absent(&absent);
        assert!(
            fs::symlink_metadata(&ctl).is_err(),
            "{} left behind",
            ctl.display()
        );
        let md = fs::symlink_metadata(&legacy).unwrap();
        assert!(
            !md.file_type().is_socket(),
            "the mount used kmsfs.ctl in the volume directory"
        );
        fs::remove_file(&legacy).unwrap();
    }
}
