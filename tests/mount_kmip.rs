//! KMIP end to end through the command line and a FUSE mount: init and mount with
//! `kmip://…` (mutual TLS), then a revoked and a destroyed key refused at mount, and the
//! server down at mount time, against a real PyKMIP server on loopback (started by the
//! test, killed by process group when it ends).

mod common;
mod common_kmip;

use std::fs;
use std::time::Instant;

use common::{Env, output_text};
use common_kmip::Server;

#[test]
fn kmip_end_to_end_init_mount_and_refusals() {
    if !common::fuse_available() {
        return;
    }
    let srv = Server::start();
    let key = srv.new_key();
    let url = srv.pki.url_string(srv.port, &key, "client", "ca", "");
    let env = Env::bare();
    let kms = |args: &[&str]| {
        let mut a = vec!["--kms", url.as_str()];
        a.extend_from_slice(args);
        env.cmd()
            .env("KMSFS_KEYSTORE", env.root().join("no-keystore"))
            .args(&a)
            .output()
            .unwrap()
    };
    let o = kms(&["init", env.vol_str()]);
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("KMIP"),
        "{}",
        output_text(&o)
    );
    let t = Instant::now();
    let m = env.mount_with(&format!("kms={url}"), &[]);
    eprintln!("mount through KMIP: {:?}", t.elapsed());
    fs::write(m.p("doc"), b"kept by kmip").unwrap();
    m.kmsfs_umount(&env);
    let m = env.mount_with(&format!("kms={url}"), &[]);
    assert_eq!(fs::read(m.p("doc")).unwrap(), b"kept by kmip");
    m.kmsfs_umount(&env);
    let f = env.run(&["--kms", url.as_str(), "fsck", env.vol_str()]);
    assert!(f.status.success(), "{}", output_text(&f));

    // Revoked: the mount is refused, naming the key, the server and the state.
    srv.admin().revoke(&key).unwrap();
    let o = env.try_mount(&format!("kms={url}"), &[]);
    assert_eq!(o.status.code(), Some(4), "{}", output_text(&o));
    let text = output_text(&o);
    assert!(
        text.contains(&key) && text.contains("Deactivated"),
        "{text}"
    );
    assert!(!common::is_mounted(&env.mnt));

    // Destroyed: a second volume under a second key.
    let key2 = srv.new_key();
    let url2 = srv.pki.url_string(srv.port, &key2, "client", "ca", "");
    let vol2 = env.root().join("vol2");
    let o = env
        .cmd()
        .args(["--kms", url2.as_str(), "init", vol2.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    srv.admin().revoke(&key2).unwrap();
    srv.admin().destroy(&key2).unwrap();
    let o = env
        .cmd()
        .args(["--kms", url2.as_str(), "info", vol2.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", output_text(&o));
    let text = output_text(&o);
    assert!(
        text.contains(&key2) && text.contains("does not exist"),
        "{text}"
    );

    // The server down at mount time: a clear error naming it.
    let port = srv.port;
    drop(srv);
    let o = env.try_mount(&format!("kms={url}"), &[]);
    assert_eq!(o.status.code(), Some(4), "{}", output_text(&o));
    let text = output_text(&o);
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(!common::is_mounted(&env.mnt));
}
