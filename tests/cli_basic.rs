//! The command line without mounts: help and version, `init` rules, unlock
//! sources and their errors, `info`/`fsck` output, and the documented exit codes.

mod common;

use std::fs;
use std::process::Command;

use common::{BIN, Env, output_text};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_and_version() {
    for args in [
        vec!["--help"],
        vec!["init", "--help"],
        vec!["mount", "--help"],
        vec!["info", "--help"],
        vec!["fsck", "--help"],
    ] {
        let o = Command::new(BIN).args(&args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", output_text(&o));
        assert!(!o.stdout.is_empty());
    }
    let help = String::from_utf8(
        Command::new(BIN)
            .arg("mount")
            .arg("--help")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for word in [
        "--foreground",
        "--read-only",
        "--snapshot",
        "allow_other",
        "cache_size",
        "--keystore",
    ] {
        assert!(help.contains(word), "mount --help lacks {word}:\n{help}");
    }
    let o = Command::new(BIN).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("kmsfs {}", env!("CARGO_PKG_VERSION"))
    );
    // Usage errors exit 2.
    let o = Command::new(BIN).arg("frobnicate").output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = Command::new(BIN).args(["init"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    // The mount helper by argv[0].
    let tmp = tempfile::tempdir().unwrap();
    let helper = tmp.path().join("mount.kmsfs");
    std::os::unix::fs::symlink(BIN, &helper).unwrap();
    let o = Command::new(&helper).arg("--help").output().unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("mount.kmsfs"));
}

#[test]
fn init_creates_and_refuses() {
    let env = Env::bare();
    let vol = env.root().join("a/b/vol");
    let out = env.ok(&[
        "init",
        vol.to_str().unwrap(),
        "--cipher",
        "xchacha20-poly1305",
        "--block-size",
        "16K",
        "--segment-size",
        "2M",
    ]);
    assert!(out.contains("created volume"), "{out}");
    assert!(vol.join("kmsfs.header").exists());
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["info", vol.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(info["cipher"], "xchacha20-poly1305");
    assert_eq!(info["block_size"], 16384);
    assert_eq!(info["segment_size"], 2 << 20);
    assert_eq!(info["files"], 0);
    assert_eq!(info["logical_bytes"], 0);
    for secretish in ["wrapped", "passphrase", "dk"] {
        assert!(info.get(secretish).is_none());
    }

    // Again: refused, unchanged.
    let before = fs::read(vol.join("kmsfs.header")).unwrap();
    let o = env.run(&["init", vol.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("already a kmsfs volume"),
        "{}",
        stderr(&o)
    );
    assert_eq!(fs::read(vol.join("kmsfs.header")).unwrap(), before);

    // A non-empty directory that is not a volume: refused, untouched.
    let busy = env.root().join("busy");
    fs::create_dir(&busy).unwrap();
    fs::write(busy.join("precious"), b"keep me").unwrap();
    let o = env.run(&["init", busy.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.starts_with("kmsfs: ") && e.contains("not empty"), "{e}");
    assert_eq!(fs::read_dir(&busy).unwrap().count(), 1);

    // Bad sizes and ciphers are usage errors; impossible sizes are refused.
    assert_eq!(
        env.run(&[
            "init",
            env.root().join("x").to_str().unwrap(),
            "--block-size",
            "lots"
        ])
        .status
        .code(),
        Some(2)
    );
    assert_eq!(
        env.run(&[
            "init",
            env.root().join("x").to_str().unwrap(),
            "--cipher",
            "rot13"
        ])
        .status
        .code(),
        Some(2)
    );
    let o = env.run(&[
        "init",
        env.root().join("y").to_str().unwrap(),
        "--block-size",
        "3K",
    ]);
    // A bad size is a usage error (docs/EXIT-CODES.md).
    assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
    assert!(
        !env.root().join("y").exists(),
        "a failed init leaves no directory behind"
    );
}

#[test]
fn unlock_sources_and_key_errors() {
    let env = Env::new();
    let vol = env.vol_str().to_string();

    // No file and no terminal: a clear error, never a blocking read.
    let o = env
        .cmd()
        .env_remove("KMSFS_PASSPHRASE_FILE")
        .args(["info", &vol])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", output_text(&o));
    assert!(stderr(&o).contains("--passphrase-file"), "{}", stderr(&o));

    // Wrong passphrase.
    let wrong = env.root().join("wrong");
    fs::write(&wrong, "nope\n").unwrap();
    // A passphrase file others can read is refused before it is read.
    let o = env
        .cmd()
        .env("KMSFS_PASSPHRASE_FILE", &wrong)
        .args(["info", &vol])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
    fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let o = env
        .cmd()
        .env("KMSFS_PASSPHRASE_FILE", &wrong)
        .args(["info", &vol])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains("wrong passphrase"));
    assert_eq!(stderr(&o).lines().count(), 1);
    // The flag wins over the environment.
    let o = env
        .cmd()
        .env("KMSFS_PASSPHRASE_FILE", &wrong)
        .args([
            "--passphrase-file",
            env.pass.to_str().unwrap(),
            "info",
            &vol,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    // Both kinds of secret at one level is a usage error.
    let o = env.run(&["--passphrase-file", "/a", "--keyfile", "/b", "info", &vol]);
    assert_eq!(o.status.code(), Some(2));

    // A missing keystore is a key problem, and is not created by info.
    let o = env
        .cmd()
        .env("KMSFS_KEYSTORE", env.root().join("nokeys"))
        .args(["info", &vol])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", output_text(&o));
    assert!(!env.root().join("nokeys").exists());

    // A keyfile-protected keystore, created on first use by init.
    let keyfile = env.root().join("keyfile");
    fs::write(&keyfile, common::pattern(64, 1)).unwrap();
    fs::set_permissions(
        &keyfile,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let ks2 = env.root().join("ks2");
    let vol2 = env.root().join("vol2");
    let run2 = |args: &[&str]| {
        env.cmd()
            .env_remove("KMSFS_PASSPHRASE_FILE")
            .env("KMSFS_KEYFILE", &keyfile)
            .arg("--keystore")
            .arg(&ks2)
            .args(args)
            .output()
            .unwrap()
    };
    let o = run2(&["init", vol2.to_str().unwrap()]);
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(run2(&["info", vol2.to_str().unwrap()]).status.success());
    // The volume's key is not in the other keystore.
    let o = env.run(&["info", vol2.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(4), "{}", output_text(&o));
}

#[test]
fn fsck_and_info_on_a_fresh_volume() {
    let env = Env::new();
    let o = env.fsck();
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("clean"));
    let info = env.ok(&["info", env.vol_str()]);
    for field in [
        "id:",
        "format version:",
        "cipher:",
        "block size:",
        "segment size:",
        "CMK:",
        "generation:",
        "snapshots:",
        "logical bytes:",
        "stored bytes:",
    ] {
        assert!(info.contains(field), "info lacks {field}:\n{info}");
    }
    // Not a volume.
    let o = env.run(&["fsck", env.root().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("kmsfs init"));
}

#[test]
fn exit_codes_are_documented() {
    let doc =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/EXIT-CODES.md")).unwrap();
    for code in ["| 0 ", "| 1 ", "| 2 ", "| 3 ", "| 4 ", "| 5 "] {
        assert!(doc.contains(code), "docs/EXIT-CODES.md lacks {code}");
    }
}
