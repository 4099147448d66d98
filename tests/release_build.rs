//! What a build without the `test-hooks` feature (a release) must not have:
//! the 1 MiB Argon2id test profile, from the environment or from disk, and the
//! KMS clock offset (KMSFS_TEST_CLOCK_OFFSET_SECS).
//! scripts/test.sh runs this file once without features; with the feature on
//! it checks the opposite, so each build is checked against its own promise.

mod common;

use std::process::Stdio;

use kmsfs::crypto::KdfParams;

/// The test profile, whatever `for_tests` means in this build.
const ONE_MIB: KdfParams = KdfParams {
    m_cost_kib: 1024,
    t_cost: 1,
    p_cost: 1,
};

#[test]
fn the_one_mib_kdf_profile_exists_only_with_test_hooks() {
    let accepted = ONE_MIB.validate().is_ok();
    assert_eq!(
        accepted,
        cfg!(feature = "test-hooks"),
        "1 MiB Argon2id accepted: {accepted}"
    );
}

#[test]
fn kmsfs_kdf_test_params_is_ignored_without_test_hooks() {
    let env = common::Env::bare();
    let o = env
        .cmd()
        .args(["init", env.vol_str()])
        .env("KMSFS_KDF_TEST_PARAMS", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::output_text(&o));
    // docs/KEYSTORE-FORMAT.md: the memory cost is the u32 LE at offset 11.
    let ks = std::fs::read(&env.keystore).unwrap();
    let m = u32::from_le_bytes(ks[11..15].try_into().unwrap());
    if cfg!(feature = "test-hooks") {
        assert_eq!(m, 1024, "test builds honour KMSFS_KDF_TEST_PARAMS");
    } else {
        assert_eq!(m, KdfParams::DEFAULT.m_cost_kib, "a release ignores it");
    }
}

/// The KMS clock offset (KMSFS_TEST_CLOCK_OFFSET_SECS) moves key deletion dates and
/// import expiry forward only in test builds: a release ignores it, so a key scheduled
/// for deletion in 7 days stays pending deletion however far the variable points.
#[test]
fn the_kms_clock_offset_exists_only_with_test_hooks() {
    let env = common::Env::bare();
    env.ok(&["key", "create", "--alias", "k"]);
    env.ok(&["key", "schedule-deletion", "k", "--days", "7", "--yes"]);
    let o = env
        .cmd()
        .args(["key", "describe", "k", "--json"])
        .env("KMSFS_TEST_CLOCK_OFFSET_SECS", (8 * 86_400).to_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::output_text(&o));
    let k: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let want = if cfg!(feature = "test-hooks") {
        "Deleted"
    } else {
        "PendingDeletion"
    };
    assert_eq!(k["state"], want, "{k}");
    // Nor does a release binary even name the variable.
    let bin = std::fs::read(common::BIN).unwrap();
    let named = bin
        .windows(b"KMSFS_TEST_CLOCK_OFFSET_SECS".len())
        .any(|w| w == b"KMSFS_TEST_CLOCK_OFFSET_SECS");
    assert_eq!(named, cfg!(feature = "test-hooks"));
}
