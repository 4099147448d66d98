//! `kmsfs fsck` and `kmsfs fsck --repair`.

use super::*;

// ----- fsck ---------------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub(super) struct FsckJson<'a> {
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
pub(super) struct LostFileJson {
    paths: Vec<String>,
    names: Vec<String>,
    lost_ranges: String,
    lost_xattrs: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(super) struct SnapshotDamageJson {
    snapshot: String,
    path: String,
    detail: String,
    advice: String,
}

#[derive(Debug, Serialize)]
pub(super) struct RepairJson<'a> {
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
pub(super) fn cmd_fsck_repair(keys: &KeyArgs, a: &FsckArgs) -> Result<()> {
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

pub(super) fn cmd_fsck(keys: &KeyArgs, a: FsckArgs) -> Result<()> {
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
