//! `kmsfs fsck --repair VOLUME` on a real volume directory: a file with a
//! damaged block moves to /lost+found (exit 0 once nothing else is damaged),
//! snapshot damage is reported with the way out (exit 3), `--json` says the
//! same, and after the snapshot is deleted the volume is clean.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{Env, PASSPHRASE, output_text, pattern};
use kmsfs::crypto::{KdfParams, Passphrase};
use kmsfs::format;
use kmsfs::kms::{LocalKeystore, Unlock};
use kmsfs::store::FsStorage;
use kmsfs::volume::repair::{LOST_PATH_XATTR, LOST_RANGES_XATTR};
use kmsfs::volume::{OpenOptions, ROOT_INO, Volume};

fn kms(env: &Env) -> LocalKeystore {
    LocalKeystore::open_or_create_with_params(
        &env.keystore,
        Unlock::Passphrase(Passphrase::new(PASSPHRASE.into())),
        KdfParams::for_tests(),
    )
    .unwrap()
}

/// Runs `f` on the volume in one session; returns the segment files it added.
fn session(env: &Env, f: impl FnOnce(&Volume)) -> Vec<PathBuf> {
    let before = segs(&env.vol);
    let k = kms(env);
    let v = Volume::open(
        Arc::new(FsStorage::new(&env.vol)),
        &k,
        OpenOptions::default(),
    )
    .unwrap();
    f(&v);
    v.close().unwrap();
    segs(&env.vol).difference(&before).cloned().collect()
}

fn segs(vol: &Path) -> BTreeSet<PathBuf> {
    fs::read_dir(vol.join("seg"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect()
}

/// Flips a byte in the middle of the `n`th data record of a segment file.
fn flip_data(seg: &Path, n: usize) {
    let d = fs::read(seg).unwrap();
    let mut at = format::SEGMENT_HEADER_LEN;
    let mut seen = 0;
    while at + 5 <= d.len() {
        let len = u32::from_le_bytes(d[at..at + 4].try_into().unwrap()) as usize + 4;
        if d[at + 4] == format::BlockKind::Data as u8 {
            if seen == n {
                let f = fs::OpenOptions::new().write(true).open(seg).unwrap();
                f.write_all_at(&[d[at + len / 2] ^ 0x40], (at + len / 2) as u64)
                    .unwrap();
                return;
            }
            seen += 1;
        }
        at += len;
    }
    panic!("{}: no data record {n}", seg.display());
}

#[test]
fn fsck_repair_moves_damaged_files_and_reports_snapshot_damage() {
    let env = Env::with_init(&["--block-size", "4K", "--segment-size", "1M"]);
    let old = pattern(3 * 4096, 1);
    let snap_segs = session(&env, |v| {
        let a = v.create(ROOT_INO, b"doc", 0o644, 0, 0).unwrap();
        v.write(a.ino, 0, &old).unwrap();
        v.snapshot_create("monday").unwrap();
    });
    session(&env, |v| {
        let a = v.lookup(ROOT_INO, b"doc").unwrap();
        v.write(a.ino, 0, &pattern(3 * 4096, 2)).unwrap();
        let k = v.create(ROOT_INO, b"keep", 0o644, 0, 0).unwrap();
        v.write(k.ino, 0, b"keep me").unwrap();
    });
    let victim = pattern(4 * 4096, 3);
    let victim_segs = session(&env, |v| {
        let d = v.mkdir(ROOT_INO, b"d", 0o755, 0, 0).unwrap();
        let a = v.create(d.ino, b"victim", 0o644, 0, 0).unwrap();
        v.write(a.ino, 0, &victim).unwrap();
    });
    env.assert_fsck_clean();
    flip_data(&snap_segs[0], 0);
    flip_data(&victim_segs[0], 1);
    assert_eq!(env.fsck().status.code(), Some(3));

    let o = env.run(&["fsck", "--repair", env.vol_str()]);
    let out = output_text(&o);
    assert_eq!(o.status.code(), Some(3), "{out}");
    assert!(
        out.contains("moved /d/victim -> /lost+found/d#victim (bytes 4096-8191 lost, now zeros)"),
        "{out}"
    );
    assert!(
        out.contains("snapshot damage: snapshot monday: /doc"),
        "{out}"
    );
    let vol = fs::canonicalize(&env.vol).unwrap();
    let advice = format!(
        "`kmsfs salvage {0} DEST --snapshot monday --partial` copies out what verifies, then `kmsfs snapshot delete {0} monday`",
        vol.display()
    );
    assert!(out.contains(&advice), "{out}");
    assert!(
        out.contains("damage remains in snapshot(s) monday"),
        "{out}"
    );

    // Again, as JSON: nothing left to move, the snapshot still damaged.
    let o = env.run(&["fsck", "--repair", "--json", env.vol_str()]);
    assert_eq!(o.status.code(), Some(3), "{}", output_text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["clean"], false, "{j}");
    assert_eq!(j["live_clean"], true, "{j}");
    assert_eq!(j["lost_files"].as_array().unwrap().len(), 0, "{j}");
    assert_eq!(j["snapshot_damage"][0]["snapshot"], "monday", "{j}");
    assert_eq!(j["snapshot_damage"][0]["advice"], advice.as_str(), "{j}");

    session(&env, |v| {
        let lf = v.lookup(ROOT_INO, b"lost+found").unwrap();
        let a = v.lookup(lf.ino, b"d#victim").unwrap();
        assert_eq!(v.getxattr(a.ino, LOST_PATH_XATTR).unwrap(), b"/d/victim");
        assert_eq!(v.getxattr(a.ino, LOST_RANGES_XATTR).unwrap(), b"4096-8191");
        let got = v.read(a.ino, 0, victim.len() as u32).unwrap();
        assert_eq!(got[..4096], victim[..4096]);
        assert!(got[4096..8192].iter().all(|b| *b == 0));
        assert_eq!(got[8192..], victim[8192..]);
        let k = v.lookup(ROOT_INO, b"keep").unwrap();
        assert_eq!(v.read(k.ino, 0, 100).unwrap(), b"keep me");
    });

    // Without the damaged snapshot, repair has nothing left: exit 0.
    env.ok(&["snapshot", "delete", env.vol_str(), "monday"]);
    let o = env.run(&["fsck", "--repair", env.vol_str()]);
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("clean; nothing to repair"),
        "{}",
        output_text(&o)
    );
    env.assert_fsck_clean();
}
