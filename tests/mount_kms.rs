//! The key management service with real FUSE mounts (issue 9): mounts refused for a
//! disabled, pending-deletion and deleted key, each with its message; volumes wrapped
//! under old and new key versions; rewrap (newest version, another key, through the
//! mount) then mount, with snapshots and clones; BYOK end to end with openssl; the audit
//! records of a mount cycle (and the figures: KMS calls, records, mount time); a keystore
//! restored from before a rewrap; the golden format-1 volume after a keystore upgrade.
//!
//! Every mount is held by a guard that unmounts on failure too; without /dev/fuse the
//! tests fail unless KMSFS_SKIP_FUSE=1.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{Env, golden_env, is_mounted, output_text, pattern};
use serde_json::Value;

const CLOCK: &str = "KMSFS_TEST_CLOCK_OFFSET_SECS";

fn create_key(env: &Env, alias: &str) -> String {
    let k: Value =
        serde_json::from_str(&env.ok(&["key", "create", "--alias", alias, "--json"])).unwrap();
    k["id"].as_str().unwrap().to_string()
}

fn info(env: &Env, vol: &Path) -> Value {
    serde_json::from_str(&env.ok(&["info", vol.to_str().unwrap(), "--json"])).unwrap()
}

fn audit(env: &Env, filter: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit", "--json"];
    args.extend_from_slice(filter);
    env.ok(&args)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A mount attempt that must be refused with exit 4; returns its message.
fn refused(env: &Env) -> String {
    let o = env.try_mount("", &[]);
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(4), "mount must be refused: {text}");
    assert!(!is_mounted(&env.mnt), "refused, yet mounted");
    text
}

#[test]
fn mount_is_refused_for_disabled_pending_deletion_and_deleted_keys() {
    require_fuse!();
    let env = Env::bare();
    let id = create_key(&env, "k");
    env.ok(&["init", env.vol_str(), "--cmk", "k"]);
    let m = env.mount();
    fs::write(m.p("f"), b"kept").unwrap();
    m.kmsfs_umount(&env);

    env.ok(&["key", "disable", "k"]);
    let text = refused(&env);
    assert!(
        text.contains(&format!("key {id} is disabled"))
            && text.contains(&format!("kmsfs key enable {id}")),
        "{text}"
    );
    env.ok(&["key", "enable", "k"]);
    let m = env.mount();
    assert_eq!(fs::read(m.p("f")).unwrap(), b"kept");
    m.kmsfs_umount(&env);

    env.ok(&["key", "schedule-deletion", "k", "--days", "7", "--yes"]);
    let date = env.key_json("k")["deletion_date"]
        .as_str()
        .unwrap()
        .to_string();
    let text = refused(&env);
    assert!(
        text.contains("pending deletion")
            && text.contains(&date)
            && text.contains(&format!("kmsfs key cancel-deletion {id}")),
        "{text}"
    );

    // Eight days later (the KMS clock moved): the mount itself destroys the key.
    let o = env
        .cmd()
        .env(CLOCK, (8 * 86_400).to_string())
        .args([
            "mount",
            env.vol_str(),
            env.mnt_str(),
            "-o",
            &format!("log={}", env.log.display()),
        ])
        .output()
        .unwrap();
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(4), "{text}");
    assert!(!is_mounted(&env.mnt));
    assert!(
        text.contains("unrecoverable") && text.contains(&id),
        "{text}"
    );
    // And it stays so at the real time.
    assert_eq!(env.key_json("k")["state"], "Deleted");
    let text = refused(&env);
    assert!(
        text.contains("unrecoverable") && text.contains(&id),
        "{text}"
    );
    // Each refusal is audited with the reason.
    let recs = audit(&env, &["--op", "decrypt", "--key", &id]);
    let reasons: Vec<&str> = recs
        .iter()
        .filter(|r| r["result"] == "refused")
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("is disabled")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("pending deletion")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("unrecoverable")),
        "{reasons:?}"
    );
}

#[test]
fn volumes_under_old_and_new_versions_both_mount() {
    require_fuse!();
    let env = Env::bare();
    create_key(&env, "k");
    env.ok(&["init", env.vol_str(), "--cmk", "k"]);
    env.ok(&["key", "rotate", "k"]);
    let vol_b = env.root().join("vol-b");
    env.ok(&["init", vol_b.to_str().unwrap(), "--cmk", "k"]);
    assert_eq!(info(&env, &env.vol)["cmk_version"], 1);
    assert_eq!(info(&env, &vol_b)["cmk_version"], 2);
    let human = env.ok(&["info", vol_b.to_str().unwrap()]);
    assert!(human.contains("(alias k), version 2"), "{human}");

    let a = env.mount();
    let b = env.mount_other(&vol_b, &env.root().join("mnt-b"), &[]);
    fs::write(a.p("a"), b"under version 1").unwrap();
    fs::write(b.p("b"), b"under version 2").unwrap();
    a.kmsfs_umount(&env);
    b.kmsfs_umount(&env);
    let a = env.mount();
    assert_eq!(fs::read(a.p("a")).unwrap(), b"under version 1");
    a.kmsfs_umount(&env);
    let b = env.mount_other(&vol_b, &env.root().join("mnt-b"), &[]);
    assert_eq!(fs::read(b.p("b")).unwrap(), b"under version 2");
    b.kmsfs_umount(&env);
    // Mounting does not move a volume to the new version: only rewrap does.
    assert_eq!(info(&env, &env.vol)["cmk_version"], 1);
}

#[test]
fn rewrap_then_mount_snapshots_clones_and_through_the_mount() {
    require_fuse!();
    let env = Env::bare();
    let a = create_key(&env, "a");
    let b = create_key(&env, "b");
    env.ok(&["init", env.vol_str(), "--cmk", "a"]);
    let data = pattern(300_000, 7);
    let m = env.mount();
    fs::write(m.p("data"), &data).unwrap();
    // A snapshot taken (through the mount) before any rewrap.
    env.ok(&["snapshot", "create", env.vol_str(), "before"]);
    m.kmsfs_umount(&env);

    // To the newest version of the same key.
    env.ok(&["key", "rotate", "a"]);
    let out = env.ok(&["rewrap", env.vol_str()]);
    assert!(
        out.contains(&format!("from {a} version 1 to {a} version 2")),
        "{out}"
    );
    let m = env.mount();
    assert_eq!(fs::read(m.p("data")).unwrap(), data);
    m.kmsfs_umount(&env);

    // To another key; then the old key disabled: the volume still mounts.
    env.ok(&["rewrap", env.vol_str(), "--cmk", "b"]);
    assert_eq!(info(&env, &env.vol)["cmk_id"], b.as_str());
    env.ok(&["key", "disable", "a"]);
    let m = env.mount();
    assert_eq!(fs::read(m.p("data")).unwrap(), data);
    fs::write(m.p("after"), b"written under b").unwrap();

    // The snapshot from before the rewrap mounts (read-only, alongside).
    let snap_mnt = env.root().join("snap");
    let s = env.mount_other(&env.vol, &snap_mnt, &["--snapshot", "before"]);
    assert_eq!(fs::read(s.p("data")).unwrap(), data);
    assert!(!s.p("after").exists());
    // (fusermount3 -u: `kmsfs umount` of a snapshot mount next to a read-write mount
    // waits for the read-write daemon.)
    assert_eq!(s.unmount(), Some(0));

    // Rewrap of the mounted volume goes through the mount.
    env.ok(&["key", "rotate", "b"]);
    let out = env.ok(&["rewrap", env.vol_str(), "--json"]);
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["through_mount"], true, "{r}");
    assert_eq!(r["to_cmk"], b.as_str());
    assert_eq!(r["to_version"], 2);
    let out = env.ok(&["rewrap", env.vol_str()]);
    assert!(out.contains("(through the mount)"), "{out}");
    // Rewrap to a disabled key is refused, through the mount too, naming the key.
    let c = create_key(&env, "c");
    env.ok(&["key", "disable", "c"]);
    let o = env.run(&["rewrap", env.vol_str(), "--cmk", "c"]);
    let text = output_text(&o);
    assert!(!o.status.success(), "{text}");
    assert!(
        text.contains(&format!("key {c} is disabled"))
            && text.contains(&format!("kmsfs key enable {c}")),
        "{text}"
    );
    assert_eq!(
        fs::read(m.p("data")).unwrap(),
        data,
        "the mount keeps serving"
    );
    m.kmsfs_umount(&env);
    let v = info(&env, &env.vol);
    assert_eq!(v["cmk_id"], b.as_str());
    assert_eq!(v["cmk_version"], 2);

    // A remount works, and a clone of the old snapshot shares blocks and mounts.
    let m = env.mount();
    assert_eq!(fs::read(m.p("after")).unwrap(), b"written under b");
    m.kmsfs_umount(&env);
    let clone = env.root().join("clone");
    let out = env.ok(&["clone", env.vol_str(), "before", clone.to_str().unwrap()]);
    assert!(
        out.contains("linked") && out.contains("nothing re-encrypted"),
        "{out}"
    );
    let cm = env.mount_other(&clone, &env.root().join("clone-mnt"), &[]);
    assert_eq!(fs::read(cm.p("data")).unwrap(), data);
    assert!(!cm.p("after").exists());
    cm.kmsfs_umount(&env);
    env.assert_fsck_clean();
}

// ----- BYOK -----------------------------------------------------------------------------

fn openssl_wrap(pem: &Path, material: &Path, out: &Path) {
    let o = Command::new("openssl")
        .args(["pkeyutl", "-encrypt", "-pubin", "-inkey"])
        .arg(pem)
        .args([
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha256",
            "-pkeyopt",
            "rsa_mgf1_md:sha256",
            "-in",
        ])
        .arg(material)
        .arg("-out")
        .arg(out)
        .output()
        .expect("openssl is needed for the BYOK tests (apt-get install openssl)");
    assert!(o.status.success(), "openssl: {}", output_text(&o));
}

/// import-params, wrap `material` with openssl, import; returns the import's output.
fn import(env: &Env, key: &str, material: &Path, n: u32) -> std::process::Output {
    let pem = env.root().join(format!("wrap{n}.pem"));
    let tok = env.root().join(format!("token{n}"));
    env.ok(&[
        "key",
        "import-params",
        key,
        "--public-key",
        pem.to_str().unwrap(),
        "--token",
        tok.to_str().unwrap(),
    ]);
    let wrapped = env.root().join(format!("wrapped{n}"));
    openssl_wrap(&pem, material, &wrapped);
    env.run(&[
        "key",
        "import",
        key,
        "--material",
        wrapped.to_str().unwrap(),
        "--token",
        tok.to_str().unwrap(),
    ])
}

fn random_file(path: &Path, len: usize) -> PathBuf {
    let mut b = vec![0u8; len];
    getrandom::fill(&mut b).unwrap();
    fs::write(path, b).unwrap();
    path.to_path_buf()
}

#[test]
fn byok_end_to_end_with_openssl() {
    require_fuse!();
    let env = Env::bare();
    let id = env
        .ok(&["key", "create", "--alias", "mine", "--origin", "external"])
        .trim()
        .to_string();
    assert_eq!(env.key_json("mine")["state"], "PendingImport");
    let material = random_file(&env.root().join("material"), 32);
    let o = import(&env, "mine", &material, 1);
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(env.key_json("mine")["state"], "Enabled");

    env.ok(&["init", env.vol_str(), "--cmk", "mine"]);
    let data = pattern(200_000, 3);
    let m = env.mount();
    fs::write(m.p("data"), &data).unwrap();
    m.kmsfs_umount(&env);

    // Material deleted: the volume does not mount, and the message says what to do.
    env.ok(&["key", "delete-material", "mine"]);
    let text = refused(&env);
    assert!(
        text.contains(&format!("key {id} is pending import"))
            && text.contains(&format!("kmsfs key import-params {id}")),
        "{text}"
    );

    // Different material is refused; the same material again brings the volume back.
    let other = random_file(&env.root().join("other"), 32);
    let o = import(&env, "mine", &other, 2);
    assert_eq!(o.status.code(), Some(4), "{}", output_text(&o));
    refused(&env);
    let o = import(&env, "mine", &material, 3);
    assert!(o.status.success(), "{}", output_text(&o));
    let m = env.mount();
    assert_eq!(fs::read(m.p("data")).unwrap(), data, "data intact");
    m.kmsfs_umount(&env);
    env.assert_fsck_clean();
}

// ----- audit of a mount cycle, and the figures ------------------------------------------

/// "ready in X ms: keystore unlock (Argon2id) U ms, N KMS calls (unwrap) K ms, volume open O ms"
fn ready_line(log: &str) -> String {
    log.lines()
        .rev()
        .find(|l| l.contains("ready in"))
        .unwrap_or_else(|| panic!("no 'ready in' line in the log:\n{log}"))
        .to_string()
}

#[test]
fn a_mount_cycle_is_audited_and_counted() {
    require_fuse!();
    let env = Env::bare();
    let k = create_key(&env, "k");
    env.ok(&["init", env.vol_str(), "--cmk", "k"]);
    let vid = info(&env, &env.vol)["id"].as_str().unwrap().to_string();
    let gdk = audit(&env, &["--op", "generate-data-key"]);
    assert_eq!(gdk.len(), 1);
    assert_eq!(gdk[0]["volume_id"], vid.as_str());
    assert_eq!(gdk[0]["key_id"], k.as_str());
    assert_eq!(gdk[0]["result"], "ok");

    // One mount/unmount cycle with writes and a snapshot through the mount.
    let before = audit(&env, &[]).len();
    let start = Instant::now();
    let m = env.mount();
    let mount_time = start.elapsed();
    let ready = ready_line(&env.log_text());
    fs::write(m.p("secret-file-name.txt"), pattern(100_000, 1)).unwrap();
    env.ok(&["snapshot", "create", env.vol_str(), "secret-snapshot-name"]);
    let daemon = m.pid;
    m.kmsfs_umount(&env);
    let cycle: Vec<Value> = audit(&env, &[])[before..].to_vec();
    eprintln!(
        "FIGURES: one mount/write/snapshot/unmount cycle: {} audit records ({:?}); \
         `kmsfs mount` took {:.1} ms from the outside; daemon: {}",
        cycle.len(),
        cycle
            .iter()
            .map(|r| r["op"].as_str().unwrap())
            .collect::<Vec<_>>(),
        mount_time.as_secs_f64() * 1000.0,
        ready.split("INFO").last().unwrap_or(&ready).trim()
    );
    let decrypts: Vec<&Value> = cycle.iter().filter(|r| r["op"] == "decrypt").collect();
    assert_eq!(decrypts.len(), 1, "one unwrap per mount: {cycle:?}");
    let d = decrypts[0];
    assert_eq!(d["volume_id"], vid.as_str());
    assert_eq!(d["key_id"], k.as_str());
    assert_eq!(d["key_version"], 1);
    assert_eq!(d["result"], "ok");
    assert_eq!(d["command"], "kmsfs");
    // SAFETY: geteuid cannot fail.
    assert_eq!(d["uid"], unsafe { libc::geteuid() });
    assert_eq!(d["pid"], daemon, "the daemon unwraps");

    // Tools that open the volume unmounted show up as their KMS calls too.
    let n = audit(&env, &[]).len();
    env.ok(&["snapshot", "create", env.vol_str(), "s2"]);
    env.ok(&[
        "snapshot",
        "restore",
        env.vol_str(),
        "secret-snapshot-name",
        "--yes",
    ]);
    let clone = env.root().join("clone");
    env.ok(&[
        "clone",
        env.vol_str(),
        "secret-snapshot-name",
        clone.to_str().unwrap(),
    ]);
    let tools = audit(&env, &[])[n..].to_vec();
    assert!(
        tools
            .iter()
            .filter(|r| r["op"] == "decrypt" && r["volume_id"] == vid.as_str())
            .count()
            >= 3,
        "snapshot create, restore and clone each unwrap: {tools:?}"
    );
    // A failed mount (wrong passphrase) is a failed unlock in the trail.
    let wrong = env.root().join("wrong");
    fs::write(&wrong, "wrong\n").unwrap();
    fs::set_permissions(&wrong, fs::Permissions::from_mode(0o600)).unwrap();
    let o = env
        .cmd()
        .env("KMSFS_PASSPHRASE_FILE", &wrong)
        .args(["mount", env.vol_str(), env.mnt_str()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", output_text(&o));
    assert!(!is_mounted(&env.mnt));
    let unlocks = audit(&env, &["--op", "unlock"]);
    assert_eq!(unlocks.len(), 1, "{unlocks:?}");
    assert_eq!(unlocks[0]["result"], "refused");
    let out = env.ok(&["audit", "verify"]);
    assert!(out.contains("chain intact"), "{out}");
    // The trail never holds file or snapshot names. (Names long enough that the
    // trail's random ids and MACs cannot contain them by chance: "s1" and "/f"
    // did, now and then, in its base64.)
    let log = fs::read(format!("{}.audit", env.keystore.display())).unwrap();
    for name in [&b"secret-snapshot-name"[..], b"secret-file-name"] {
        assert!(
            !log.windows(name.len()).any(|w| w == name),
            "the audit trail holds {}",
            String::from_utf8_lossy(name)
        );
    }
}

// ----- keystore restore, golden volume ----------------------------------------------------

#[test]
fn a_keystore_restored_from_before_a_rewrap_cannot_mount_the_rewrapped_volume() {
    require_fuse!();
    let env = Env::bare();
    let k = create_key(&env, "k");
    env.ok(&["init", env.vol_str(), "--cmk", "k"]);
    let backup = env.root().join("backup");
    env.ok(&["keystore", "backup", backup.to_str().unwrap()]);
    env.ok(&["key", "rotate", "k"]);
    env.ok(&["rewrap", env.vol_str()]);
    let m = env.mount();
    fs::write(m.p("f"), b"x").unwrap();
    m.kmsfs_umount(&env);

    let out = env.ok(&["keystore", "restore", backup.to_str().unwrap()]);
    assert!(
        out.contains(&format!("lacks version 2 of key {k}")),
        "{out}"
    );
    let text = refused(&env);
    assert!(
        text.contains(&format!("key {k} has no version 2")) && text.contains("older backup"),
        "{text}"
    );
}

#[test]
fn the_golden_volume_mounts_after_its_keystore_is_upgraded() {
    require_fuse!();
    let env = golden_env();
    env.ok(&["key", "create", "--alias", "new"]);
    let ks = fs::read(&env.keystore).unwrap();
    assert_eq!(
        u16::from_le_bytes([ks[8], ks[9]]),
        2,
        "format 2 after a change"
    );
    let m = env.mount();
    assert_eq!(
        fs::read(m.p("hello.txt")).unwrap(),
        b"hello from kmsfs format v1\n"
    );
    assert_eq!(fs::metadata(m.p("docs/big.bin")).unwrap().len(), 200_000);
    m.kmsfs_umount(&env);
    // The mount recorded the golden volume under the service key.
    let svc = env.key_json("service");
    assert_eq!(svc["volumes"].as_array().unwrap().len(), 1, "{svc}");
}
