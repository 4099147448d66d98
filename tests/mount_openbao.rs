//! OpenBao / Vault Transit end to end through the command line and a real FUSE mount:
//! init, mount (`-o kms=URL`), rotate, rewrap, a retired key version refused, and the
//! KMS down at mount time, against a real OpenBao dev server on loopback (started by the
//! test, killed by PID when it ends).

mod common;
mod common_bao;

use std::fs;
use std::time::Instant;

use common::{Env, output_text};
use common_bao::Bao;
use serde_json::json;

#[test]
fn openbao_end_to_end_init_mount_rotate_rewrap_and_refusals() {
    if !common::fuse_available() {
        return;
    }
    let bao = Bao::start();
    let env = Env::bare();
    let url = bao.url("vols", "&timeout=2");
    // The keystore is never used: point its variables nowhere.
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
        String::from_utf8_lossy(&o.stdout).contains("OpenBao"),
        "{}",
        output_text(&o)
    );
    assert!(!env.root().join("no-keystore").exists());

    // Mount with the URL as a mount option (as in fstab), write, unmount.
    let m = env.mount_with(&format!("kms={url}"), &[]);
    fs::write(m.p("doc"), b"kept by transit").unwrap();
    m.kmsfs_umount(&env);
    let info = kms(&["info", "--json", env.vol_str()]);
    assert!(info.status.success(), "{}", output_text(&info));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["cmk_id"], "vols");
    assert_eq!(v["cmk_version"], 1);

    // Rotate in OpenBao (through kmsfs), rewrap onto version 2, mount again.
    let o = kms(&["key", "rotate", "vols"]);
    assert!(o.status.success(), "{}", output_text(&o));
    let o = kms(&["rewrap", env.vol_str()]);
    assert!(o.status.success(), "{}", output_text(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&kms(&["info", "--json", env.vol_str()]).stdout).unwrap();
    assert_eq!(v["cmk_version"], 2);
    let m = env.mount_with(&format!("kms={url}"), &[]);
    assert_eq!(fs::read(m.p("doc")).unwrap(), b"kept by transit");
    m.kmsfs_umount(&env);

    // Retire version 2 (the closest OpenBao has to disabling a key): refused, clearly.
    let o = kms(&["key", "rotate", "vols"]);
    assert!(o.status.success(), "{}", output_text(&o));
    let (s, body) = bao.api(
        "POST",
        "transit/keys/vols/config",
        Some(json!({"min_decryption_version": 3})),
    );
    assert!(s == 200 || s == 204, "{s} {body}");
    let o = env.try_mount(&format!("kms={url}"), &[]);
    assert_eq!(o.status.code(), Some(4), "{}", output_text(&o));
    let text = output_text(&o);
    assert!(text.contains("min_decryption_version"), "{text}");
    assert!(!common::is_mounted(&env.mnt));
    let (s, body) = bao.api(
        "POST",
        "transit/keys/vols/config",
        Some(json!({"min_decryption_version": 1})),
    );
    assert!(s == 200 || s == 204, "{s} {body}");
    let m = env.mount_with(&format!("kms={url}"), &[]);
    // A KMS that goes away after the mount does not disturb it (the DK is in memory).
    drop(bao);
    fs::write(m.p("after"), b"still served").unwrap();
    assert_eq!(fs::read(m.p("doc")).unwrap(), b"kept by transit");
    m.kmsfs_umount(&env);

    // The KMS down at mount time: a clear error naming the URL, within the timeout.
    let t = Instant::now();
    let o = env.try_mount(&format!("kms={url}"), &[]);
    let took = t.elapsed();
    assert_eq!(o.status.code(), Some(4), "{}", output_text(&o));
    let text = output_text(&o);
    assert!(text.contains("127.0.0.1"), "{text}");
    assert!(!common::is_mounted(&env.mnt));
    eprintln!("mount with OpenBao down failed after {took:?}: {text}");
}
