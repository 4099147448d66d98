//! The KMIP KMS against a real PyKMIP server on loopback (`pip install pykmip`, see
//! scripts/setup.sh). Each test makes its own CA, server and client certificates with
//! openssl, starts `pykmip-server` on a free port and kills it with SIGKILL by PID when it
//! ends (PyKMIP ignores SIGTERM; its whole process group, since it forks helpers), also
//! when the test panics.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kmsfs::kms::kmip::KmipState;
use kmsfs::kms::{EncryptionContext, KmsError};
use kmsfs::store::MemStorage;
use kmsfs::volume::{CreateOptions, OpenOptions, ROOT_INO, Volume};

mod common_kmip;

use common_kmip::*;

fn ctx(n: u8) -> EncryptionContext {
    EncryptionContext::for_volume(&[n; 16])
}

#[test]
fn kmip_generate_and_decrypt_round_trip_binds_the_volume() {
    let srv = Server::start();
    let key = srv.new_key();
    assert_eq!(
        srv.admin().key_state(&key).unwrap(),
        Some(KmipState::Active)
    );
    let kms = srv.kms(&key);
    let (dk, wrapped) = kms.generate_data_key(None, &ctx(1)).unwrap();
    assert_eq!(wrapped.cmk_id, key);
    assert_eq!(wrapped.cmk_version, 1);
    assert_eq!(&wrapped.ciphertext[..4], b"KMIP");
    let back = kms.decrypt(&wrapped, &ctx(1)).unwrap();
    assert_eq!(back.expose(), dk.expose());
    // A second handle (a new connection) unwraps it too.
    assert_eq!(
        srv.kms(&key).decrypt(&wrapped, &ctx(1)).unwrap().expose(),
        dk.expose()
    );
    // Two wraps of fresh DKs differ.
    let (dk2, w2) = kms.generate_data_key(None, &ctx(1)).unwrap();
    assert_ne!(dk2.expose(), dk.expose());
    assert_ne!(w2.ciphertext, wrapped.ciphertext);

    // Another volume's context.
    assert!(matches!(
        kms.decrypt(&wrapped, &ctx(2)),
        Err(KmsError::UnwrapFailed)
    ));
    // Every byte of the blob is authenticated: IV, server ciphertext, seal, header.
    for i in [0, 5, 8, 20, 26, 40, 80, wrapped.ciphertext.len() - 1] {
        let mut t = wrapped.clone();
        t.ciphertext[i] ^= 0x01;
        let e = kms.decrypt(&t, &ctx(1)).unwrap_err();
        assert!(matches!(e, KmsError::UnwrapFailed), "byte {i}: {e}");
    }
    // Truncated, and the wrong version.
    let mut t = wrapped.clone();
    t.ciphertext.truncate(30);
    assert!(matches!(
        kms.decrypt(&t, &ctx(1)),
        Err(KmsError::UnwrapFailed)
    ));
    let mut t = wrapped.clone();
    t.cmk_version = 2;
    assert!(matches!(
        kms.decrypt(&t, &ctx(1)),
        Err(KmsError::UnwrapFailed)
    ));
    // Named as another (Active) key: the server decrypts to garbage or refuses.
    let other = srv.new_key();
    let mut t = wrapped.clone();
    t.cmk_id = other;
    assert!(matches!(
        kms.decrypt(&t, &ctx(1)),
        Err(KmsError::UnwrapFailed)
    ));
}

#[test]
fn kmip_re_encrypt_to_the_same_and_another_key() {
    let srv = Server::start();
    let k1 = srv.new_key();
    let k2 = srv.new_key();
    let kms = srv.kms(&k1);
    let (dk, w1) = kms.generate_data_key(None, &ctx(3)).unwrap();
    let same = kms.re_encrypt(&w1, &ctx(3), None).unwrap();
    assert_eq!(same.cmk_id, k1);
    assert_ne!(same.ciphertext, w1.ciphertext);
    assert_eq!(kms.decrypt(&same, &ctx(3)).unwrap().expose(), dk.expose());
    let moved = kms.re_encrypt(&w1, &ctx(3), Some(&k2)).unwrap();
    assert_eq!(moved.cmk_id, k2);
    assert_eq!(kms.decrypt(&moved, &ctx(3)).unwrap().expose(), dk.expose());
    // The moved wrap no longer needs k1.
    let admin = srv.admin();
    admin.revoke(&k1).unwrap();
    assert_eq!(kms.decrypt(&moved, &ctx(3)).unwrap().expose(), dk.expose());
    // Re-encrypt checks the context of the source.
    assert!(matches!(
        kms.re_encrypt(&moved, &ctx(4), None),
        Err(KmsError::UnwrapFailed)
    ));
    // generate_data_key with an explicit key UID.
    let (_, w) = kms.generate_data_key(Some(&k2), &ctx(5)).unwrap();
    assert_eq!(w.cmk_id, k2);
}

fn assert_key_error(e: &KmsError, key: &str, port: u16, state: &str) {
    let msg = e.to_string();
    assert!(matches!(e, KmsError::RemoteKeyState { .. }), "{msg}");
    assert!(msg.contains(&format!("key {key} ")), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(msg.contains(state), "{msg}");
}

#[test]
fn kmip_revoked_key_is_refused_clearly() {
    let srv = Server::start();
    let key = srv.new_key();
    let kms = srv.kms(&key);
    let (_, wrapped) = kms.generate_data_key(None, &ctx(6)).unwrap();
    srv.admin().revoke(&key).unwrap();
    assert_eq!(
        srv.admin().key_state(&key).unwrap(),
        Some(KmipState::Deactivated)
    );
    let e = kms.decrypt(&wrapped, &ctx(6)).unwrap_err();
    assert_key_error(&e, &key, srv.port, "Deactivated (revoked)");
    eprintln!("revoked key: {e}");
    let e = kms.generate_data_key(None, &ctx(7)).err().unwrap();
    assert_key_error(&e, &key, srv.port, "Deactivated");
    // The next mount fails at open, before touching the volume.
    let e = kmsfs::kms::kmip::open(&srv.url(&key)).err().unwrap();
    assert_key_error(&e, &key, srv.port, "Deactivated");
}

#[test]
fn kmip_destroyed_key_is_refused_clearly() {
    let srv = Server::start();
    let key = srv.new_key();
    let kms = srv.kms(&key);
    let (_, wrapped) = kms.generate_data_key(None, &ctx(8)).unwrap();
    let admin = srv.admin();
    admin.revoke(&key).unwrap();
    admin.destroy(&key).unwrap();
    let e = kms.decrypt(&wrapped, &ctx(8)).unwrap_err();
    eprintln!("destroyed key: {e}");
    // PyKMIP forgets a destroyed object; other servers report it Destroyed.
    let msg = e.to_string();
    assert!(
        msg.contains("does not exist") || msg.contains("Destroyed"),
        "{msg}"
    );
    assert_key_error(&e, &key, srv.port, "");
    assert_key_error(
        &kmsfs::kms::kmip::open(&srv.url(&key)).err().unwrap(),
        &key,
        srv.port,
        "",
    );
    // A key that never existed.
    let e = kmsfs::kms::kmip::open(&srv.url("no-such-key"))
        .err()
        .unwrap();
    assert_key_error(&e, "no-such-key", srv.port, "does not exist");
}

#[test]
fn kmip_unreachable_server_fails_within_the_timeout() {
    let pki = Pki::new();
    let port = free_port(); // nothing listens there
    let url = pki.url(port, "1", "client", "ca", "&timeout=2");
    let t0 = Instant::now();
    let e = kmsfs::kms::kmip::open(&url).err().unwrap();
    let took = t0.elapsed();
    let msg = e.to_string();
    eprintln!("unreachable: {msg} ({took:?})");
    assert!(matches!(e, KmsError::Unavailable { .. }), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(msg.contains("attempts"), "{msg}");
    assert!(took < Duration::from_millis(2500), "{took:?}");

    // A port that accepts but never answers: the read timeout bounds it.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let sport = silent.local_addr().unwrap().port();
    let url = pki.url(sport, "1", "client", "ca", "&timeout=1");
    let t0 = Instant::now();
    let e = kmsfs::kms::kmip::open(&url).err().unwrap();
    let took = t0.elapsed();
    eprintln!("silent: {e} ({took:?})");
    assert!(matches!(e, KmsError::Unavailable { .. }), "{e}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{sport}")), "{e}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    drop(silent);
}

#[test]
fn kmip_tls_failures_are_named() {
    let srv = Server::start();
    // The server's certificate is not signed by the CA we trust.
    let url = srv.pki.url(srv.port, "1", "client", "other_ca", "");
    let t0 = Instant::now();
    let e = kmsfs::kms::kmip::open(&url).err().unwrap();
    let msg = e.to_string();
    eprintln!("wrong CA: {msg}");
    assert!(matches!(e, KmsError::Unavailable { .. }), "{msg}");
    assert!(msg.contains("TLS verification"), "{msg}");
    assert!(msg.contains("other_ca.pem"), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(3), "not retried");
    // The server does not trust our client certificate.
    let url = srv.pki.url(srv.port, "1", "stranger", "ca", "");
    let e = kmsfs::kms::kmip::open(&url).err().unwrap();
    let msg = e.to_string();
    eprintln!("client certificate refused: {msg}");
    assert!(matches!(e, KmsError::Unavailable { .. }), "{msg}");
    assert!(msg.contains("client certificate"), "{msg}");
    assert!(msg.contains("stranger.pem"), "{msg}");
}

#[test]
fn kmip_client_key_must_be_private() {
    let pki = Pki::new();
    let key = pki.path("client.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = kmsfs::kms::kmip::open(&pki.url(1, "1", "client", "ca", ""))
        .err()
        .unwrap();
    assert!(matches!(e, KmsError::UnsafePermissions { .. }), "{e}");
    assert!(e.to_string().contains("chmod 600"), "{e}");
}

#[test]
fn kmip_volume_init_reopen_rewrap_and_marks() {
    let srv = Server::start();
    let key = srv.new_key();
    let kms = srv.kms(&key);
    let storage = MemStorage::new();
    let opts = CreateOptions {
        block_size: 4096,
        segment_size: 1 << 20,
        ..Default::default()
    };
    let vid = Volume::init(Arc::new(storage.clone()), &*kms, &opts).unwrap();
    {
        let v = Volume::open(Arc::new(storage.clone()), &*kms, OpenOptions::default()).unwrap();
        assert_eq!(v.header().cmk_id, key);
        let f = v.create(ROOT_INO, b"hello", 0o644, 0, 0).unwrap();
        v.write(f.ino, 0, b"over KMIP").unwrap();
        v.commit().unwrap();
        v.record_generation(&*kms).unwrap();
    }
    // The mark lives in the state directory.
    let mark = kms.generation_mark(&vid).unwrap();
    assert!(mark.is_some_and(|m| m > 0), "{mark:?}");
    let mark_file = srv
        .pki
        .path("state")
        .join(format!("kmip-{}.mark", kmsfs::format::hex(&vid)));
    assert!(mark_file.exists(), "{}", mark_file.display());

    // Reopen with a new KMS handle (a new connection), as the next mount would.
    let kms2 = srv.kms(&key);
    let other = srv.new_key();
    {
        let v = Volume::open(Arc::new(storage.clone()), &*kms2, OpenOptions::default()).unwrap();
        let f = v.lookup(ROOT_INO, b"hello").unwrap();
        assert_eq!(v.read(f.ino, 0, 100).unwrap(), b"over KMIP");
        v.rewrap(&*kms2, Some(&other)).unwrap();
        assert_eq!(v.header().cmk_id, other);
    }
    // After the rewrap the old key can go.
    srv.admin().revoke(&key).unwrap();
    let kms3 = srv.kms(&other);
    let v = Volume::open(Arc::new(storage.clone()), &*kms3, OpenOptions::default()).unwrap();
    let f = v.lookup(ROOT_INO, b"hello").unwrap();
    assert_eq!(v.read(f.ino, 0, 100).unwrap(), b"over KMIP");
    drop(v);
    // Revoking the key it is wrapped under now stops the next open with a clear error.
    srv.admin().revoke(&other).unwrap();
    let e = Volume::open(Arc::new(storage.clone()), &*kms3, OpenOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(&other) && e.contains("Deactivated"), "{e}");
}

#[test]
fn kmip_unwrap_latency() {
    let srv = Server::start();
    let key = srv.new_key();
    let kms = srv.kms(&key);
    let (dk, wrapped) = kms.generate_data_key(None, &ctx(9)).unwrap();
    kms.decrypt(&wrapped, &ctx(9)).unwrap(); // warm connection
    let n = 200;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let back = kms.decrypt(&wrapped, &ctx(9)).unwrap();
        times.push(t0.elapsed());
        assert_eq!(back.expose(), dk.expose());
    }
    times.sort();
    let median = times[n / 2];
    let p99 = times[(n * 99) / 100 - 1];
    let t0 = Instant::now();
    let fresh = srv.kms(&key);
    fresh.decrypt(&wrapped, &ctx(9)).unwrap();
    let cold = t0.elapsed();
    eprintln!(
        "KMIP (PyKMIP on loopback) unwrap latency over {n} decrypts: median {:.2} ms, p99 {:.2} ms; open + first unwrap on a new connection {:.2} ms",
        median.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        cold.as_secs_f64() * 1e3
    );
}

#[test]
fn kmip_server_going_away_and_coming_back() {
    let mut srv = Server::start();
    let key = srv.new_key();
    let kms = srv.kms(&key);
    let (dk, wrapped) = kms.generate_data_key(None, &ctx(10)).unwrap();
    // The DK already unwrapped stays usable; the next unwrap names the server.
    srv.kill();
    let t0 = Instant::now();
    let e = kms.decrypt(&wrapped, &ctx(10)).unwrap_err();
    eprintln!("server gone: {e} ({:?})", t0.elapsed());
    assert!(matches!(e, KmsError::Unavailable { .. }), "{e}");
    assert!(
        e.to_string().contains(&format!("127.0.0.1:{}", srv.port)),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    // Back on the same port with the same database: the same handle reconnects.
    srv.restart();
    assert_eq!(
        kms.decrypt(&wrapped, &ctx(10)).unwrap().expose(),
        dk.expose()
    );
    // A restart under a kept connection: the broken connection is replaced silently.
    srv.restart();
    assert_eq!(
        kms.decrypt(&wrapped, &ctx(10)).unwrap().expose(),
        dk.expose()
    );
}
