//! `kmsfs snapshot`, `clone` and `clean`: commands that act on a volume or, when it is
//! mounted read-write, through its mount's control socket.

use super::*;

// ----- snapshots and clones -------------------------------------------------------

#[derive(Serialize, serde::Deserialize)]
pub(super) struct SnapshotJson {
    pub(super) name: String,
    pub(super) created: i64,
    pub(super) generation: u64,
    pub(super) exclusive_bytes: u64,
    pub(super) shared_bytes: u64,
}

pub(super) fn time_text(secs: i64) -> String {
    crate::time::iso_utc(u64::try_from(secs).unwrap_or(0))
}

/// Runs a change on the volume: directly when it is not mounted, through the
/// running mount's control socket when it is.
pub(super) fn with_volume_or_mount(
    keys: &KeyArgs,
    dir: &Path,
    req: crate::control::Request,
    direct: impl FnOnce(&Volume) -> std::result::Result<serde_json::Value, Error>,
) -> Result<serde_json::Value> {
    let s3 = super::object::is_url(dir);
    let canon = if s3 {
        dir.to_path_buf()
    } else {
        check_volume(dir)?
    };
    let ctl = super::object::control_dir(&canon);
    // Mounted read-write: the mount does it. No key is needed for that (the mount holds
    // the volume's keys; the control socket admits only the mounting user and root), so
    // the keystore is not unlocked, which would cost an Argon2id derivation.
    if (s3 || writer_lock_held(&canon)) && volume_is_mounted(&canon) {
        return Ok(crate::control::request(&ctl, &req)?);
    }
    wait_for_finishing_daemon(&canon);
    let kms = open_kms(keys, false)?;
    let opts = OpenOptions {
        cache_bytes: TOOL_CACHE,
        ..Default::default()
    };
    match Volume::open(super::object::existing(&canon)?, &*kms, opts) {
        Ok(vol) => {
            let r = direct(&vol)?;
            vol.close()?;
            Ok(r)
        }
        Err(Error::Locked(_)) if !s3 => Ok(crate::control::request(&ctl, &req)?),
        Err(e) => Err(e.into()),
    }
}

/// Segments whose live share is below this are compacted by `kmsfs clean`.
pub(super) const CLEAN_MAX_LIVE: f64 = 0.5;

pub(super) fn cmd_clean(keys: &KeyArgs, volume_dir: &Path, json: bool) -> Result<()> {
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

pub(super) fn cmd_snapshot(keys: &KeyArgs, c: SnapshotCmd) -> Result<()> {
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
            let s3 = super::object::is_url(&volume_dir);
            let canon = if s3 {
                volume_dir.clone()
            } else {
                check_volume(&volume_dir)?
            };
            let list: Vec<SnapshotJson> =
                if !s3 && writer_lock_held(&canon) && volume_is_mounted(&canon) {
                    // Through the mount, without unlocking the keystore.
                    let v = crate::control::request(&canon, &Request::SnapshotList)?;
                    serde_json::from_value(v).map_err(|e| {
                        CliError::error(format!("bad snapshot list from the mount: {e}"))
                    })?
                } else {
                    let (vol, _kms, _dir) = open_read_only(keys, &volume_dir)?;
                    vol.snapshot_list()?
                        .into_iter()
                        .map(|s| SnapshotJson {
                            name: s.name,
                            created: s.created,
                            generation: s.generation,
                            exclusive_bytes: s.exclusive_bytes,
                            shared_bytes: s.shared_bytes,
                        })
                        .collect()
                };
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

pub(super) fn cmd_clone(keys: &KeyArgs, a: CloneArgs) -> Result<()> {
    let (vol, kms, src) = open_read_only(keys, &a.volume_dir)?;
    let dst = &a.new_volume_dir;
    if super::object::is_url(&src) || super::object::is_url(dst) {
        return clone_through_storage(&vol, &*kms, &src, dst, &a.snapshot);
    }
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
    // The clone shares the DK: the keystore lists it under the same key.
    if let Err(e) = kms.note_volume(&id, &vol.header().cmk_id, &dst.display().to_string()) {
        log::warn!("the keystore could not record the clone under its key: {e}");
    }
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
pub(super) fn bring_file(
    src: &OwnedFd,
    dst: &OwnedFd,
    src_dir: &Path,
    name: &str,
) -> std::io::Result<bool> {
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

/// Clones to or from an object store: segments are copied through the
/// storage interface (ciphertext as it is; nothing is re-encrypted).
fn clone_through_storage(
    vol: &Volume,
    kms: &dyn crate::kms::Kms,
    src: &Path,
    dst: &Path,
    snapshot: &str,
) -> Result<()> {
    if !super::object::is_url(dst) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dst)
            .map_err(|e| CliError::error(format!("{}: {e}", dst.display())))?;
        if fs::read_dir(dst)
            .map_err(|e| CliError::error(format!("{}: {e}", dst.display())))?
            .next()
            .is_some()
        {
            return Err(CliError::error(format!(
                "{} is not empty; clone into a new or empty directory",
                dst.display()
            )));
        }
    }
    let from = vol.storage().clone();
    let to = super::object::storage(dst)?;
    let copied = std::sync::atomic::AtomicU64::new(0);
    let t = to.clone();
    let bring = |name: &str| -> std::io::Result<()> {
        let data = from.read(name)?;
        t.append(name, &data)?;
        t.sync(name)?;
        copied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    };
    let id = vol.clone_snapshot(snapshot, to, &bring)?;
    if let Err(e) = kms.note_volume(&id, &vol.header().cmk_id, &dst.display().to_string()) {
        log::warn!("the keystore could not record the clone under its key: {e}");
    }
    println!(
        "{}: new volume {} from snapshot {snapshot} of {} ({} segment files copied, nothing \
         re-encrypted)",
        dst.display(),
        format::hex(&id),
        src.display(),
        copied.into_inner()
    );
    Ok(())
}
