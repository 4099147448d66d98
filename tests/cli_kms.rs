//! The key management service through the real binary, without FUSE (issue 9):
//! every `kmsfs key` command and state transition, the service key's refusals, the
//! usage rules (a disabled, pending-deletion or deleted key neither wraps nor unwraps),
//! BYOK with material wrapped by openssl exactly as a user would, rewrap of unmounted
//! volumes, the audit trail (filters, failed unlocks, tamper cases), keystore
//! passwd/backup/restore, the permission refusals, and a golden format-1 keystore.
//!
//! Time-dependent steps (a deletion date passing, an import token or imported material
//! expiring) move the KMS clock with KMSFS_TEST_CLOCK_OFFSET_SECS, a `test-hooks`-only
//! variable (tests/release_build.rs checks that a release build ignores it).

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Env, golden_env, output_text};
use serde_json::Value;

const DAY: i64 = 86_400;
const CLOCK: &str = "KMSFS_TEST_CLOCK_OFFSET_SECS";

/// `YYYY-MM-DDTHH:MM:SSZ`, and a time kmsfs itself reads back.
fn assert_iso(s: &str, what: &str) {
    let b = s.as_bytes();
    let shape = b.len() == 20
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b'T',
            13 | 16 => c == b':',
            19 => c == b'Z',
            _ => c.is_ascii_digit(),
        });
    assert!(
        shape && kmsfs::time::parse_time(s).is_ok(),
        "{what}: {s:?} is not ISO 8601 UTC"
    );
}

fn unix(iso: &str) -> u64 {
    kmsfs::time::parse_time(iso).unwrap()
}

/// No run of 64 or more hex digits (a 256-bit key in hex) anywhere in `text`.
fn assert_no_key_hex(text: &str) {
    let mut run = 0;
    for c in text.chars() {
        run = if c.is_ascii_hexdigit() { run + 1 } else { 0 };
        assert!(run < 64, "64 hex digits in the output:\n{text}");
    }
}

/// kmsfs with the KMS clock moved by `offset` seconds.
fn run_at(env: &Env, offset: i64, args: &[&str]) -> std::process::Output {
    env.cmd()
        .env(CLOCK, offset.to_string())
        .args(args)
        .output()
        .unwrap()
}

fn volume_id(env: &Env, vol: &Path) -> String {
    let out = env.ok(&["info", vol.to_str().unwrap(), "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["id"].as_str().unwrap().to_string()
}

fn info_json(env: &Env, vol: &Path) -> Value {
    serde_json::from_str(&env.ok(&["info", vol.to_str().unwrap(), "--json"])).unwrap()
}

fn create_key(env: &Env, alias: &str) -> String {
    let out = env.ok(&["key", "create", "--alias", alias, "--json"]);
    let k: Value = serde_json::from_str(&out).unwrap();
    k["id"].as_str().unwrap().to_string()
}

fn init_with(env: &Env, vol: &Path, cmk: &str) {
    env.ok(&["init", vol.to_str().unwrap(), "--cmk", cmk]);
}

fn versions(k: &Value) -> Vec<u64> {
    k["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect()
}

// ----- keys -------------------------------------------------------------------------

#[test]
fn create_list_describe_show_everything_but_key_bytes() {
    let env = Env::bare();
    let out = env.ok(&[
        "key",
        "create",
        "--alias",
        "db",
        "--description",
        "database volumes",
    ]);
    let id = out.trim().to_string();
    assert!(id.starts_with("cmk-"), "create prints the id: {out}");

    // --json, and an external key starts PendingImport with the next step named.
    let o = env.run(&[
        "key", "create", "--alias", "ext", "--origin", "external", "--json",
    ]);
    assert!(o.status.success(), "{}", output_text(&o));
    let ext: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ext["state"], "PendingImport");
    assert_eq!(ext["origin"], "external");
    assert_eq!(ext["primary_version"], Value::Null);
    assert!(ext["versions"].as_array().unwrap().is_empty());
    let plain = env.run(&["key", "create", "--origin", "external"]);
    assert!(plain.status.success());
    let msg = String::from_utf8_lossy(&plain.stderr);
    assert!(
        msg.contains("pending import") && msg.contains("kmsfs key import-params"),
        "{msg}"
    );

    // Aliases are unique.
    let text = env.fails(4, &["key", "create", "--alias", "db"]);
    assert!(
        text.contains("alias db is already used") && text.contains("choose another alias"),
        "{text}"
    );

    // A volume under the key is recorded with its id and absolute path.
    let vol = env.root().join("vol");
    init_with(&env, &vol, "db");
    let vid = volume_id(&env, &vol);

    let k = env.key_json("db");
    assert_eq!(
        k,
        env.key_json(&id),
        "the alias and the id name the same key"
    );
    assert_eq!(k["id"], id.as_str());
    assert_eq!(k["alias"], "db");
    assert_eq!(k["description"], "database volumes");
    assert_eq!(k["origin"], "kms");
    assert_eq!(k["kind"], "user");
    assert_eq!(k["state"], "Enabled");
    assert_eq!(k["primary_version"], 1);
    assert_iso(k["created"].as_str().unwrap(), "created");
    assert_eq!(versions(&k), [1]);
    assert_iso(k["versions"][0]["created"].as_str().unwrap(), "version 1");
    let vols = k["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 1, "{k}");
    assert_eq!(vols[0]["volume_id"], vid.as_str());
    let canon = fs::canonicalize(&vol).unwrap();
    assert_eq!(
        vols[0]["path"],
        canon.to_str().unwrap(),
        "the recorded path is the volume's absolute path"
    );

    // The service key exists from the start and is marked as such.
    let svc = env.key_json("service");
    assert_eq!(svc["kind"], "service");
    assert_eq!(svc["state"], "Enabled");

    let list: Value = serde_json::from_str(&env.ok(&["key", "list", "--json"])).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 4, "service, db and two external keys");
    assert!(
        list.iter()
            .any(|k| k["id"] == id.as_str() && k["volumes"][0]["volume_id"] == vid.as_str())
    );

    // Human output: ISO times, versions with times, the primary, the volume.
    let human = env.ok(&["key", "describe", "db"]);
    for want in [
        id.as_str(),
        "database volumes",
        "Enabled",
        "primary:     version 1",
        "version 1",
        vid.as_str(),
        canon.to_str().unwrap(),
    ] {
        assert!(human.contains(want), "describe lacks {want:?}:\n{human}");
    }
    assert!(
        human.contains(&format!("created:     {}", k["created"].as_str().unwrap())),
        "{human}"
    );
    let table = env.ok(&["key", "list"]);
    for want in [id.as_str(), "db", "ext", "service", "PendingImport"] {
        assert!(table.contains(want), "list lacks {want:?}:\n{table}");
    }

    for text in [
        human,
        table,
        env.ok(&["key", "list", "--json"]),
        env.ok(&["key", "describe", "service"]),
        env.ok(&["key", "describe", "service", "--json"]),
    ] {
        assert_no_key_hex(&text);
    }

    let text = env.fails(4, &["key", "describe", "no-such-key"]);
    assert!(text.contains("no-such-key"), "{text}");
}

#[test]
fn enable_disable_rotate() {
    let env = Env::bare();
    let id = create_key(&env, "k");
    let vol = env.root().join("vol");
    init_with(&env, &vol, "k");

    let out = env.ok(&["key", "disable", "k"]);
    assert!(out.contains("Disabled"), "{out}");
    assert_eq!(env.key_json("k")["state"], "Disabled");
    // A disabled key neither wraps nor unwraps: the refusal names the way back.
    let text = env.fails(4, &["info", vol.to_str().unwrap()]);
    assert!(
        text.contains(&format!("key {id} is disabled"))
            && text.contains(&format!("kmsfs key enable {id}")),
        "{text}"
    );
    let text = env.fails(
        4,
        &[
            "init",
            env.root().join("v2").to_str().unwrap(),
            "--cmk",
            "k",
        ],
    );
    assert!(text.contains("disabled"), "{text}");
    let text = env.fails(4, &["key", "rotate", "k"]);
    assert!(text.contains("disabled"), "{text}");
    // Disabling twice is harmless.
    env.ok(&["key", "disable", "k"]);

    env.ok(&["key", "enable", "k"]);
    assert_eq!(env.key_json("k")["state"], "Enabled");
    env.ok(&["info", vol.to_str().unwrap()]);

    let out = env.ok(&["key", "rotate", "k"]);
    assert!(
        out.contains("version 2 is now primary") && out.contains("kmsfs rewrap"),
        "{out}"
    );
    let k = env.key_json("k");
    assert_eq!(versions(&k), [1, 2]);
    assert_eq!(k["primary_version"], 2);
    for v in k["versions"].as_array().unwrap() {
        assert_iso(v["created"].as_str().unwrap(), "version created");
        assert_eq!(v["has_material"], true);
    }
    let human = env.ok(&["key", "describe", "k"]);
    assert!(
        human.contains("version 1")
            && human.contains("version 2")
            && human.contains("primary:     version 2"),
        "{human}"
    );
}

#[test]
fn schedule_and_cancel_deletion() {
    let env = Env::bare();
    let id = create_key(&env, "doomed");
    let vol = env.root().join("vol");
    init_with(&env, &vol, "doomed");
    let vid = volume_id(&env, &vol);

    for days in ["6", "367"] {
        let text = env.fails(
            2,
            &[
                "key",
                "schedule-deletion",
                "doomed",
                "--days",
                days,
                "--yes",
            ],
        );
        assert!(text.contains("7 to 366"), "{text}");
    }
    // No terminal (stdin is null) and no --yes: refused, naming the volumes and --yes.
    let text = env.fails(2, &["key", "schedule-deletion", "doomed"]);
    assert!(
        text.contains(&vid) && text.contains("NEVER mount") && text.contains("--yes"),
        "{text}"
    );
    assert_eq!(
        env.key_json("doomed")["state"],
        "Enabled",
        "nothing changed"
    );

    let o = env.run(&["key", "schedule-deletion", "doomed", "--yes"]);
    assert!(o.status.success(), "{}", output_text(&o));
    let warning = String::from_utf8_lossy(&o.stderr);
    assert!(
        warning.contains("warning") && warning.contains(&vid),
        "{warning}"
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("kmsfs key cancel-deletion {id}")),
        "{out}"
    );
    let k = env.key_json("doomed");
    assert_eq!(k["state"], "PendingDeletion");
    let date = k["deletion_date"].as_str().unwrap();
    assert_iso(date, "deletion date");
    let now = kmsfs::time::now_unix();
    let d = unix(date);
    assert!(
        d >= now + 30 * 86_400 - 60 && d <= now + 30 * 86_400 + 60,
        "default 30 days: {date}"
    );
    assert!(out.contains(date), "the date is printed: {out}");

    // Pending deletion: no unwrap; the refusal names the date and the way back.
    let text = env.fails(4, &["info", vol.to_str().unwrap()]);
    assert!(
        text.contains("pending deletion")
            && text.contains(date)
            && text.contains(&format!("kmsfs key cancel-deletion {id}")),
        "{text}"
    );
    let text = env.fails(4, &["key", "schedule-deletion", "doomed", "--yes"]);
    assert!(text.contains("already pending deletion"), "{text}");
    let text = env.fails(4, &["key", "enable", "doomed"]);
    assert!(text.contains("cancel-deletion"), "{text}");

    let out = env.ok(&["key", "cancel-deletion", "doomed"]);
    assert!(
        out.contains("Disabled") && out.contains("kmsfs key enable"),
        "{out}"
    );
    let k = env.key_json("doomed");
    assert_eq!(k["state"], "Disabled");
    assert_eq!(k["deletion_date"], Value::Null);
    let text = env.fails(4, &["key", "cancel-deletion", "doomed"]);
    assert!(text.contains("not pending deletion"), "{text}");
    env.ok(&["key", "enable", "doomed"]);
    env.ok(&["info", vol.to_str().unwrap()]);
}

/// Once the date has passed the material is destroyed on the next keystore access, for
/// good: the volume's refusal says "unrecoverable", and nothing brings the key back.
#[test]
fn a_deletion_date_passed_destroys_the_key() {
    let env = Env::bare();
    let id = create_key(&env, "gone");
    let vol = env.root().join("vol");
    init_with(&env, &vol, "gone");
    env.ok(&["key", "schedule-deletion", "gone", "--days", "7", "--yes"]);

    // Six days on, still pending (and still cancellable).
    let o = run_at(&env, 6 * DAY, &["key", "describe", "gone", "--json"]);
    assert!(o.status.success(), "{}", output_text(&o));
    let k: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(k["state"], "PendingDeletion");

    // Eight days on: destroyed by this very access.
    let o = run_at(&env, 8 * DAY, &["key", "describe", "gone", "--json"]);
    assert!(o.status.success(), "{}", output_text(&o));
    let k: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(k["state"], "Deleted", "{k}");
    assert_eq!(k["primary_version"], Value::Null);
    assert!(
        k["versions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["has_material"] == false)
    );

    // Back at the real time it stays deleted: the material is gone from the keystore.
    let k = env.key_json("gone");
    assert_eq!(k["state"], "Deleted");
    let text = env.fails(4, &["info", vol.to_str().unwrap()]);
    assert!(
        text.contains("unrecoverable") && text.contains(&id),
        "{text}"
    );
    for args in [
        vec!["key", "cancel-deletion", "gone"],
        vec!["key", "enable", "gone"],
    ] {
        let text = env.fails(4, &args);
        assert!(text.contains("unrecoverable"), "{text}");
    }
    let human = env.ok(&["key", "describe", "gone"]);
    assert!(human.contains("Deleted"), "{human}");
    // The destruction is in the audit trail.
    let destroy = env.ok(&["audit", "--json", "--op", "destroy"]);
    assert!(destroy.contains(&id), "{destroy}");
}

#[test]
fn the_service_key_refuses_disable_deletion_and_import() {
    let env = Env::new();
    let svc = env.key_json("service");
    let id = svc["id"].as_str().unwrap();
    for (args, what) in [
        (vec!["key", "disable", "service"], "cannot be disabled"),
        (
            vec!["key", "schedule-deletion", "service", "--yes"],
            "cannot be scheduled for deletion",
        ),
        (
            vec!["key", "import-params", "service"],
            "cannot be given imported material",
        ),
    ] {
        let text = env.fails(4, &args);
        assert!(
            text.contains(&format!("service key {id}"))
                && text.contains(what)
                && text.contains("volumes created without --cmk depend on it")
                && text.contains("kmsfs key create"),
            "{args:?}: {text}"
        );
    }
    assert_eq!(env.key_json("service")["state"], "Enabled");
    // The volume made without --cmk is under it and still opens.
    assert_eq!(env.info_json()["cmk_alias"], "service");
    assert!(!env.root().join(format!("{id}.wrapping-key.pem")).exists());
}

// ----- BYOK ---------------------------------------------------------------------------

/// Wraps `material` under the PEM public key with RSAES-OAEP-SHA-256, as a user would.
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

/// A BYOK session: `import-params` into numbered files, wrapping with openssl.
pub struct Byok<'a> {
    env: &'a Env,
    key: String,
    n: usize,
}

impl<'a> Byok<'a> {
    fn new(env: &'a Env, key: &str) -> Self {
        Byok {
            env,
            key: key.to_string(),
            n: 0,
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.env.root().join(name)
    }

    /// `key import-params` (clock moved by `offset`); returns (public key, token).
    fn params(&mut self, offset: i64) -> (PathBuf, PathBuf) {
        self.n += 1;
        let pem = self.p(&format!("{}.wrap{}.pem", self.key, self.n));
        let tok = self.p(&format!("{}.token{}", self.key, self.n));
        let o = run_at(
            self.env,
            offset,
            &[
                "key",
                "import-params",
                &self.key,
                "--wrapping",
                "rsa-3072",
                "--public-key",
                pem.to_str().unwrap(),
                "--token",
                tok.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "import-params: {}", output_text(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.contains("rsa-3072") && out.contains("openssl pkeyutl"),
            "{out}"
        );
        let pem_text = fs::read_to_string(&pem).unwrap();
        assert!(
            pem_text.starts_with("-----BEGIN PUBLIC KEY-----"),
            "{pem_text}"
        );
        assert_eq!(
            fs::metadata(&tok).unwrap().permissions().mode() & 0o777,
            0o600
        );
        (pem, tok)
    }

    /// Material file of `len` random bytes.
    fn material(&self, name: &str, len: usize) -> PathBuf {
        let p = self.p(name);
        let mut b = vec![0u8; len];
        getrandom::fill(&mut b).unwrap();
        fs::write(&p, b).unwrap();
        p
    }

    fn wrap(&self, pem: &Path, material: &Path) -> PathBuf {
        let out = self.p(&format!(
            "{}.wrapped{}",
            material.file_name().unwrap().to_str().unwrap(),
            self.n
        ));
        let _ = fs::remove_file(&out);
        openssl_wrap(pem, material, &out);
        out
    }

    fn import(
        &self,
        offset: i64,
        wrapped: &Path,
        token: &Path,
        extra: &[&str],
    ) -> std::process::Output {
        let mut args = vec![
            "key",
            "import",
            &self.key,
            "--material",
            wrapped.to_str().unwrap(),
            "--token",
            token.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run_at(self.env, offset, &args)
    }
}

fn expect_code(o: &std::process::Output, code: i32) -> String {
    let text = output_text(o);
    assert_eq!(o.status.code(), Some(code), "{text}");
    text
}

#[test]
fn byok_import_reimport_and_refusals() {
    let env = Env::bare();
    let out = env.ok(&["key", "create", "--alias", "byok", "--origin", "external"]);
    let id = out.trim().to_string();
    let other = env.ok(&["key", "create", "--alias", "other", "--origin", "external"]);
    let other = other.trim().to_string();
    let mut b = Byok::new(&env, "byok");

    // No material yet: nothing wraps under it.
    let vol = env.root().join("vol");
    let text = env.fails(4, &["init", vol.to_str().unwrap(), "--cmk", "byok"]);
    assert!(
        text.contains("pending import") && text.contains("import-params"),
        "{text}"
    );

    let (pem, tok) = b.params(0);
    let k = env.key_json("byok");
    assert_iso(
        k["import_params_expire"].as_str().unwrap(),
        "import params expiry",
    );
    let mat = b.material("material", 32);
    let wrapped = b.wrap(&pem, &mat);

    // --expires in the past is refused.
    for past in ["2020-01-01", "-1h"] {
        let text = expect_code(&b.import(0, &wrapped, &tok, &["--expires", past]), 2);
        assert!(text.contains("not in the future"), "{past}: {text}");
    }
    // A token for another key is refused, naming both keys.
    let mut bo = Byok::new(&env, "other");
    let (_opem, otok) = bo.params(0);
    let text = expect_code(&b.import(0, &wrapped, &otok, &[]), 4);
    assert!(
        text.contains(&format!("import token is for key {other}, not key {id}")),
        "{text}"
    );
    // Material of the wrong length (16 bytes, properly wrapped) is refused.
    let short = b.material("short", 16);
    let wshort = b.wrap(&pem, &short);
    let text = expect_code(&b.import(0, &wshort, &tok, &[]), 4);
    assert!(
        text.contains("16 bytes") && text.contains("exactly 32"),
        "{text}"
    );
    // An expired token (the clock 25 hours on) is refused as expired.
    let text = expect_code(&b.import(25 * 3600, &wrapped, &tok, &[]), 4);
    assert!(
        text.contains("expired") && text.contains(&format!("kmsfs key import-params {id}")),
        "{text}"
    );
    assert_eq!(env.key_json("byok")["state"], "PendingImport");

    // The import itself, with fresh parameters.
    let (pem, tok) = b.params(0);
    let wrapped = b.wrap(&pem, &mat);
    let o = b.import(0, &wrapped, &tok, &[]);
    let text = expect_code(&o, 0);
    assert!(text.contains("Enabled"), "{text}");
    let k = env.key_json("byok");
    assert_eq!(k["state"], "Enabled");
    assert_eq!(k["origin"], "external");
    assert_eq!(k["primary_version"], 1);
    assert_eq!(
        k["import_params_expire"],
        Value::Null,
        "the parameters are used up"
    );
    // The token is spent.
    let text = expect_code(&b.import(0, &wrapped, &tok, &[]), 4);
    assert!(text.contains("no pending import"), "{text}");

    init_with(&env, &vol, "byok");
    assert_eq!(info_json(&env, &vol)["cmk_id"], id.as_str());

    // Rotation of imported material is refused (kmsfs cannot make new material).
    let text = env.fails(4, &["key", "rotate", "byok"]);
    assert!(text.contains("imported material"), "{text}");

    // Delete the material: the volume no longer opens, the message says to import.
    let out = env.ok(&["key", "delete-material", "byok"]);
    assert!(out.contains("PendingImport"), "{out}");
    let text = env.fails(4, &["info", vol.to_str().unwrap()]);
    assert!(
        text.contains(&format!("key {id} is pending import"))
            && text.contains("kmsfs key import-params"),
        "{text}"
    );

    // Different material is refused.
    let (pem, tok) = b.params(0);
    let mat2 = b.material("material2", 32);
    let wrapped2 = b.wrap(&pem, &mat2);
    let text = expect_code(&b.import(0, &wrapped2, &tok, &[]), 4);
    assert!(
        text.contains("not the material key") || text.contains("differs"),
        "{text}"
    );
    assert_eq!(env.key_json("byok")["state"], "PendingImport");

    // The same material again (fresh parameters): the volume opens again.
    let (pem, tok) = b.params(0);
    let wrapped = b.wrap(&pem, &mat);
    expect_code(&b.import(0, &wrapped, &tok, &["--expires", "+1h"]), 0);
    let k = env.key_json("byok");
    assert_eq!(k["state"], "Enabled");
    let exp = k["material_expires"].as_str().unwrap();
    assert_iso(exp, "material expiry");
    env.ok(&["info", vol.to_str().unwrap()]);

    // Two hours on, the material has expired: PendingImport, and the volume refused.
    let o = run_at(&env, 2 * 3600, &["key", "describe", "byok", "--json"]);
    assert!(o.status.success(), "{}", output_text(&o));
    let k: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(k["state"], "PendingImport", "{k}");
    assert_eq!(
        env.key_json("byok")["state"],
        "PendingImport",
        "deleted for good"
    );
    let text = env.fails(4, &["info", vol.to_str().unwrap()]);
    assert!(text.contains("pending import"), "{text}");

    // The audit trail has the imports and their refusals.
    let recs = audit_records(&env, &["--key", &id, "--op", "import"]);
    assert!(recs.iter().any(|r| r["result"] == "ok"), "{recs:?}");
    assert!(recs.iter().any(|r| r["result"] == "refused"), "{recs:?}");
}

// ----- rewrap (unmounted) -----------------------------------------------------------

/// The segment files of a volume, by inode.
fn segment_inodes(vol: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = fs::read_dir(vol.join("seg"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().ino())
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn rewrap_to_the_newest_version_and_to_another_key() {
    let env = Env::bare();
    let a = create_key(&env, "a");
    let b = create_key(&env, "b");
    let vol = env.root().join("vol");
    init_with(&env, &vol, "a");
    let vs = vol.to_str().unwrap();
    env.ok(&["snapshot", "create", vs, "before"]);
    assert_eq!(info_json(&env, &vol)["cmk_version"], 1);
    let data_before: Vec<(String, u64)> = fs::read_dir(vol.join("seg"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().mtime_nsec() as u64,
            )
        })
        .collect();

    env.ok(&["key", "rotate", "a"]);
    let out = env.ok(&["rewrap", vs, "--json"]);
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["from_cmk"], a.as_str());
    assert_eq!(r["from_version"], 1);
    assert_eq!(r["to_cmk"], a.as_str());
    assert_eq!(r["to_version"], 2);
    assert_eq!(r["through_mount"], false);
    let info = info_json(&env, &vol);
    assert_eq!(info["cmk_id"], a.as_str());
    assert_eq!(info["cmk_version"], 2);

    let out = env.ok(&["rewrap", vs, "--cmk", "b"]);
    assert!(
        out.contains(&format!("from {a} version 2 to {b} version 1"))
            && out.contains("no data was touched"),
        "{out}"
    );
    let info = info_json(&env, &vol);
    assert_eq!(info["cmk_id"], b.as_str());
    assert_eq!(info["cmk_alias"], "b");
    // The key the volume is under records it; the old one no longer does.
    let vid = info["id"].as_str().unwrap();
    assert_eq!(env.key_json("b")["volumes"][0]["volume_id"], vid);
    assert!(env.key_json("a")["volumes"].as_array().unwrap().is_empty());
    // No data block was rewritten: the segment files are the same ones.
    for (name, _) in &data_before {
        assert!(vol.join("seg").join(name).exists(), "{name} is gone");
    }

    // The old key disabled: the volume still opens, and so does the snapshot taken
    // before the rewrap (the data key is the same).
    env.ok(&["key", "disable", "a"]);
    env.ok(&["info", vs]);
    assert_eq!(env.run(&["fsck", vs]).status.code(), Some(0));
    let clone = env.root().join("clone");
    let out = env.ok(&["clone", vs, "before", clone.to_str().unwrap()]);
    assert!(out.contains("nothing re-encrypted"), "{out}");
    // The clone shares the origin's segment files (hard links: same inodes).
    let shared: Vec<u64> = segment_inodes(&clone)
        .into_iter()
        .filter(|i| segment_inodes(&vol).contains(i))
        .collect();
    assert!(
        !shared.is_empty(),
        "the clone shares no segment with its origin"
    );
    env.ok(&["info", clone.to_str().unwrap()]);

    // Rewrap to a disabled key is refused, naming it and the way back.
    let c = create_key(&env, "c");
    env.ok(&["key", "disable", "c"]);
    let text = env.fails(4, &["rewrap", vs, "--cmk", "c"]);
    assert!(
        text.contains(&format!("key {c} is disabled"))
            && text.contains(&format!("kmsfs key enable {c}")),
        "{text}"
    );
    assert_eq!(info_json(&env, &vol)["cmk_id"], b.as_str(), "unchanged");
    // The re-encryptions are audited.
    let recs = audit_records(&env, &["--op", "re-encrypt", "--volume", vid]);
    assert_eq!(
        recs.iter().filter(|r| r["result"] == "ok").count(),
        2,
        "{recs:?}"
    );
    assert!(
        recs.iter()
            .any(|r| r["result"] == "refused" && r["key_id"] == c.as_str())
    );
}

// ----- audit --------------------------------------------------------------------------

fn audit_records(env: &Env, filter: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit", "--json"];
    args.extend_from_slice(filter);
    env.ok(&args)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn record_second(r: &Value) -> u64 {
    let t = r["time"].as_str().unwrap();
    // 2026-12-01T17:11:07.305Z → drop the milliseconds.
    unix(&format!("{}Z", &t[..19]))
}

#[test]
fn audit_filters_and_failed_unlocks() {
    let env = Env::bare();
    let a = create_key(&env, "a");
    let va = env.root().join("va");
    init_with(&env, &va, "a");
    let vid_a = volume_id(&env, &va);
    let phase1 = audit_records(&env, &[]);
    let last1 = record_second(phase1.last().unwrap());
    // Phase 2 starts in a later second, so --since/--until can split the two exactly.
    common::wait_until("the next second", common::TIMEOUT, || {
        kmsfs::time::now_unix() > last1
    });
    let vb = env.root().join("vb");
    env.ok(&["init", vb.to_str().unwrap()]);
    let vid_b = volume_id(&env, &vb);
    env.ok(&["info", va.to_str().unwrap()]);

    let all = audit_records(&env, &[]);
    assert!(all.len() > phase1.len());
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r["index"], i + 1, "records are numbered from 1");
        assert_eq!(r["authenticated"], true);
        assert_eq!(r["uid"], unsafe { libc::geteuid() });
        assert_eq!(r["command"], "kmsfs");
        assert!(r["pid"].as_u64().unwrap() > 0);
        assert!(r["time"].as_str().unwrap().ends_with('Z'));
    }
    // init: generate-data-key with the volume id; info: decrypt.
    let gdk: Vec<_> = all
        .iter()
        .filter(|r| r["op"] == "generate-data-key")
        .collect();
    assert_eq!(gdk.len(), 2, "{all:?}");
    assert_eq!(gdk[0]["volume_id"], vid_a.as_str());
    assert_eq!(gdk[0]["key_id"], a.as_str());
    assert_eq!(gdk[0]["key_version"], 1);
    assert_eq!(gdk[1]["volume_id"], vid_b.as_str());

    let by_vol = audit_records(&env, &["--volume", &vid_a]);
    assert!(!by_vol.is_empty() && by_vol.iter().all(|r| r["volume_id"] == vid_a.as_str()));
    assert!(by_vol.iter().any(|r| r["op"] == "decrypt"));
    assert_eq!(
        by_vol.len(),
        all.iter()
            .filter(|r| r["volume_id"] == vid_a.as_str())
            .count()
    );
    let dec = audit_records(&env, &["--op", "decrypt"]);
    assert!(!dec.is_empty() && dec.iter().all(|r| r["op"] == "decrypt"));
    let by_key = audit_records(&env, &["--key", &a]);
    assert!(by_key.iter().all(|r| r["key_id"] == a.as_str()));
    assert!(by_key.iter().any(|r| r["op"] == "create"));
    let combined = audit_records(&env, &["--key", &a, "--op", "decrypt", "--volume", &vid_a]);
    assert_eq!(
        combined.len(),
        2,
        "two decrypts of va (volume_id + info): {combined:?}"
    );

    let until = audit_records(&env, &["--until", &format!("@{last1}")]);
    assert_eq!(until, phase1, "--until splits at the second");
    let since = audit_records(&env, &["--since", &format!("@{}", last1 + 1)]);
    assert_eq!(since.len() + phase1.len(), all.len());
    assert_eq!(since[0]["index"], phase1.len() + 1);
    assert!(audit_records(&env, &["--since", "+1d"]).is_empty());
    assert!(audit_records(&env, &["--until", "2000-01-01"]).is_empty());
    assert_eq!(audit_records(&env, &["--since", "-1d"]).len(), all.len());
    let text = env.fails(2, &["audit", "--since", "yesterday"]);
    assert!(text.contains("ISO 8601"), "{text}");

    // The human table names the same records.
    let table = env.ok(&["audit", "--volume", &vid_b]);
    assert!(
        table.contains("generate-data-key") && table.contains(&vid_b),
        "{table}"
    );
    assert_no_key_hex(&env.ok(&["audit"]));
    assert_no_key_hex(&env.ok(&["audit", "--json"]));

    // A wrong passphrase is recorded as a refused unlock, and the chain still verifies.
    let wrong = env.root().join("wrong");
    fs::write(&wrong, "not the passphrase\n").unwrap();
    fs::set_permissions(&wrong, fs::Permissions::from_mode(0o600)).unwrap();
    let o = env
        .cmd()
        .env("KMSFS_PASSPHRASE_FILE", &wrong)
        .args(["key", "list"])
        .output()
        .unwrap();
    let text = expect_code(&o, 4);
    assert!(text.contains("wrong passphrase"), "{text}");
    let unlocks = audit_records(&env, &["--op", "unlock"]);
    assert_eq!(unlocks.len(), 1, "{unlocks:?}");
    assert_eq!(unlocks[0]["result"], "refused");
    assert!(
        unlocks[0]["reason"]
            .as_str()
            .unwrap()
            .contains("wrong passphrase")
    );
    let out = env.ok(&["audit", "verify"]);
    assert!(out.contains("chain intact"), "{out}");
    env.ok(&["key", "list"]);
    let v: Value = serde_json::from_str(&env.ok(&["audit", "verify", "--json"])).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(
        v["records"],
        v["authenticated"].as_u64().unwrap() + 1,
        "{v}"
    );
}

/// (offset, length) of each record of an audit file (docs/AUDIT-FORMAT.md).
fn audit_layout(bytes: &[u8]) -> Vec<(usize, usize)> {
    assert_eq!(&bytes[..8], b"KMSFSAU\0");
    let mut out = Vec::new();
    let mut at = 12;
    while at < bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        assert!((60..=1244).contains(&len) && at + len <= bytes.len());
        assert_eq!(&bytes[at + len - 4..at + len], &bytes[at..at + 4]);
        out.push((at, len));
        at += len;
    }
    out
}

#[test]
fn audit_verify_detects_every_tamper_case() {
    let env = Env::bare();
    for i in 0..3 {
        create_key(&env, &format!("k{i}"));
    }
    let vol = env.root().join("vol");
    init_with(&env, &vol, "k0");
    env.ok(&["info", vol.to_str().unwrap()]);
    let out = env.ok(&["audit", "verify"]);
    assert!(out.contains("chain intact"), "{out}");

    let path = PathBuf::from(format!("{}.audit", env.keystore.display()));
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let orig = fs::read(&path).unwrap();
    let recs = audit_layout(&orig);
    let n = recs.len();
    assert!(n >= 6, "{n} records");
    let rec = |i: usize| &orig[recs[i - 1].0..recs[i - 1].0 + recs[i - 1].1];

    let mut cases: Vec<(&str, Vec<u8>, usize)> = Vec::new();
    // Edit one byte (the pid) of record #3.
    let mut edited = orig.clone();
    edited[recs[2].0 + 48] ^= 1;
    cases.push(("edit", edited, 3));
    // Delete record #3.
    let mut deleted = orig[..recs[2].0].to_vec();
    deleted.extend_from_slice(&orig[recs[3].0..]);
    cases.push(("delete", deleted, 3));
    // Swap #2 and #3.
    let mut swapped = orig[..recs[1].0].to_vec();
    swapped.extend_from_slice(rec(3));
    swapped.extend_from_slice(rec(2));
    swapped.extend_from_slice(&orig[recs[3].0..]);
    cases.push(("reorder", swapped, 2));
    // Insert a duplicate of #2 after it.
    let mut inserted = orig[..recs[2].0].to_vec();
    inserted.extend_from_slice(rec(2));
    inserted.extend_from_slice(&orig[recs[2].0..]);
    cases.push(("insert", inserted, 3));
    // Cut off the last two records.
    cases.push(("truncate", orig[..recs[n - 2].0].to_vec(), n - 1));
    // Cut in the middle of the last record.
    cases.push((
        "truncate mid-record",
        orig[..recs[n - 1].0 + 20].to_vec(),
        n,
    ));

    for (what, bytes, first_bad) in cases {
        fs::write(&path, &bytes).unwrap();
        let text = env.fails(3, &["audit", "verify"]);
        assert!(
            text.contains(&format!("#{first_bad}")),
            "{what}: the first bad record #{first_bad} is named: {text}"
        );
        let o = env.run(&["audit", "verify", "--json"]);
        assert_eq!(o.status.code(), Some(3), "{what}: {}", output_text(&o));
        fs::write(&path, &orig).unwrap();
        let out = env.ok(&["audit", "verify"]);
        assert!(out.contains("chain intact"), "{what}: restored: {out}");
    }
    // The whole log removed is detected too.
    fs::remove_file(&path).unwrap();
    let text = env.fails(3, &["audit", "verify"]);
    assert!(text.contains("#1"), "{text}");
    fs::write(&path, &orig).unwrap();
    env.ok(&["audit", "verify"]);
}

// ----- keystore -------------------------------------------------------------------------

fn private_file(env: &Env, name: &str, bytes: &[u8]) -> PathBuf {
    let p = env.root().join(name);
    fs::write(&p, bytes).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    p
}

#[test]
fn keystore_passwd_to_passphrase_keyfile_and_back() {
    let env = Env::new();
    let before = env.ok(&["key", "list", "--json"]);
    let bak = PathBuf::from(format!("{}.bak", env.keystore.display()));
    let newpass = private_file(&env, "newpass", b"a new passphrase\n");

    let out = env.ok(&[
        "keystore",
        "passwd",
        "--new-passphrase-file",
        newpass.to_str().unwrap(),
    ]);
    assert!(
        out.contains("re-sealed") && out.contains("unchanged"),
        "{out}"
    );
    // The old passphrase opens neither the keystore nor its backup.
    let text = env.fails(4, &["key", "list"]);
    assert!(text.contains("wrong passphrase"), "{text}");
    let bak_copy = env.root().join("bak-copy");
    fs::copy(&bak, &bak_copy).unwrap();
    fs::set_permissions(&bak_copy, fs::Permissions::from_mode(0o600)).unwrap();
    let o = env
        .cmd()
        .env("KMSFS_KEYSTORE", &bak_copy)
        .args(["key", "list"])
        .output()
        .unwrap();
    let text = expect_code(&o, 4);
    assert!(
        text.contains("wrong passphrase"),
        "the .bak with the old passphrase: {text}"
    );
    let new = |args: &[&str]| {
        env.cmd()
            .env("KMSFS_PASSPHRASE_FILE", &newpass)
            .args(args)
            .output()
            .unwrap()
    };
    let o = new(&["key", "list", "--json"]);
    expect_code(&o, 0);
    assert_eq!(String::from_utf8_lossy(&o.stdout), before, "no CMK changed");
    let o = env
        .cmd()
        .env("KMSFS_KEYSTORE", &bak_copy)
        .env("KMSFS_PASSPHRASE_FILE", &newpass)
        .args(["key", "list"])
        .output()
        .unwrap();
    expect_code(&o, 0);
    expect_code(&new(&["info", env.vol_str()]), 0);

    // To a keyfile …
    let mut kf = vec![0u8; 64];
    getrandom::fill(&mut kf).unwrap();
    let keyfile = private_file(&env, "keyfile", &kf);
    let o = new(&[
        "keystore",
        "passwd",
        "--new-keyfile",
        keyfile.to_str().unwrap(),
    ]);
    let text = expect_code(&o, 0);
    assert!(text.contains("keyfile"), "{text}");
    expect_code(&new(&["key", "list"]), 4);
    let with_kf = |args: &[&str]| {
        env.cmd()
            .env_remove("KMSFS_PASSPHRASE_FILE")
            .env("KMSFS_KEYFILE", &keyfile)
            .args(args)
            .output()
            .unwrap()
    };
    let o = with_kf(&["key", "list", "--json"]);
    expect_code(&o, 0);
    assert_eq!(String::from_utf8_lossy(&o.stdout), before);
    expect_code(&with_kf(&["info", env.vol_str()]), 0);
    // … and back to the original passphrase.
    let o = with_kf(&[
        "keystore",
        "passwd",
        "--new-passphrase-file",
        env.pass.to_str().unwrap(),
    ]);
    expect_code(&o, 0);
    expect_code(&with_kf(&["key", "list"]), 4);
    assert_eq!(env.ok(&["key", "list", "--json"]), before);
    env.ok(&["info", env.vol_str()]);
    // Re-sealing is audited, and the chain survived every re-seal.
    assert_eq!(audit_records(&env, &["--op", "passwd"]).len(), 3);
    env.ok(&["audit", "verify"]);
}

#[test]
fn keystore_backup_and_restore_name_what_is_missing() {
    let env = Env::bare();
    let k = create_key(&env, "k");
    let va = env.root().join("va");
    let vb = env.root().join("vb");
    init_with(&env, &va, "k");
    init_with(&env, &vb, "k");
    let backup = env.root().join("backup");
    let out = env.ok(&["keystore", "backup", backup.to_str().unwrap()]);
    assert!(out.contains("sealed copy"), "{out}");
    assert_eq!(
        fs::metadata(&backup).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Backups never overwrite silently? (whatever it does, it must not lose the keystore)
    env.ok(&["key", "rotate", "k"]);
    let later = create_key(&env, "later");
    env.ok(&["rewrap", vb.to_str().unwrap()]);
    assert_eq!(info_json(&env, &vb)["cmk_version"], 2);

    let o = env.run(&["keystore", "restore", backup.to_str().unwrap()]);
    let text = expect_code(&o, 0);
    assert!(
        text.contains(&format!("lacks version 2 of key {k}")),
        "restore names the missing version: {text}"
    );
    assert!(
        text.contains(&later),
        "restore names the missing key: {text}"
    );
    let kk = env.key_json("k");
    assert_eq!(versions(&kk), [1]);
    // va (wrapped under version 1) opens; vb (re-wrapped since) does not, clearly.
    env.ok(&["info", va.to_str().unwrap()]);
    let text = env.fails(4, &["info", vb.to_str().unwrap()]);
    assert!(
        text.contains(&format!("key {k} has no version 2")) && text.contains("older backup"),
        "{text}"
    );
    // A backup that is not a keystore is refused without touching the current one.
    let junk = private_file(&env, "junk", b"not a keystore");
    let o = env.run(&["keystore", "restore", junk.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", output_text(&o));
    env.ok(&["info", va.to_str().unwrap()]);
    env.ok(&["audit", "verify"]);
}

#[test]
fn group_readable_keystore_passphrase_and_keyfile_are_refused() {
    let env = Env::new();
    let cases: Vec<(&Path, &str)> =
        vec![(&env.keystore, "keystore"), (&env.pass, "passphrase file")];
    for (file, what) in cases {
        fs::set_permissions(file, fs::Permissions::from_mode(0o644)).unwrap();
        let text = env.fails(4, &["key", "list"]);
        let name = file.to_str().unwrap();
        assert!(
            text.contains(&format!("{what} {name}"))
                && text.contains("0644")
                && text.contains(&format!("chmod 600 {name}")),
            "{what}: {text}"
        );
        let text = env.fails(4, &["info", env.vol_str()]);
        assert!(text.contains("chmod 600"), "{text}");
        fs::set_permissions(file, fs::Permissions::from_mode(0o600)).unwrap();
        env.ok(&["key", "list"]);
    }
    // A keyfile, likewise.
    let mut kf = vec![0u8; 32];
    getrandom::fill(&mut kf).unwrap();
    let keyfile = private_file(&env, "keyfile", &kf);
    env.ok(&[
        "keystore",
        "passwd",
        "--new-keyfile",
        keyfile.to_str().unwrap(),
    ]);
    fs::set_permissions(&keyfile, fs::Permissions::from_mode(0o640)).unwrap();
    let o = env
        .cmd()
        .env_remove("KMSFS_PASSPHRASE_FILE")
        .env("KMSFS_KEYFILE", &keyfile)
        .args(["key", "list"])
        .output()
        .unwrap();
    let text = expect_code(&o, 4);
    let name = keyfile.to_str().unwrap();
    assert!(
        text.contains(&format!("keyfile {name}")) && text.contains(&format!("chmod 600 {name}")),
        "{text}"
    );
}

// ----- golden format-1 keystore -------------------------------------------------------

#[test]
fn a_golden_format_1_keystore_opens_and_is_rewritten_as_format_2() {
    let env = golden_env();
    let version = |p: &Path| {
        let b = fs::read(p).unwrap();
        u16::from_le_bytes([b[8], b[9]])
    };
    assert_eq!(version(&env.keystore), 1, "the golden keystore is format 1");
    let list: Value = serde_json::from_str(&env.ok(&["key", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["kind"], "service");
    let svc = env.key_json("service");
    assert_eq!(svc["state"], "Enabled");
    assert_eq!(versions(&svc), [1]);
    assert_iso(svc["created"].as_str().unwrap(), "created");
    assert!(
        env.ok(&["key", "describe", "service"])
            .contains("service key")
    );
    // The volume opens read-only without a change.
    assert_eq!(info_json(&env, &env.vol)["files"], 3);

    // A change rewrites it as format 2, and everything still opens.
    create_key(&env, "new");
    assert_eq!(version(&env.keystore), 2, "rewritten as format 2");
    let list: Value = serde_json::from_str(&env.ok(&["key", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(env.key_json("service")["id"], svc["id"]);
    assert_eq!(env.run(&["fsck", env.vol_str()]).status.code(), Some(0));
    env.ok(&["audit", "verify"]);
}
