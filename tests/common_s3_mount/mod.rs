//! Helpers shared by the FUSE tests of s3:// volumes (`mount_s3`,
//! `mount_s3_writeback`): a "host"'s object-store options and the kmsfs
//! command with the test's own per-user cache.
#![allow(dead_code)]

use std::path::Path;

use crate::common::Env;
use crate::common_s3::Weed;

/// The object store options of one "host" (its own cache directory).
pub fn s3_args(w: &Weed, cache: &Path) -> Vec<String> {
    vec![
        "--endpoint".into(),
        w.endpoint(),
        "--credentials-file".into(),
        w.credentials_file().display().to_string(),
        "--cache-dir".into(),
        cache.display().to_string(),
        "--lease-time".into(),
        "3".into(),
    ]
}

/// kmsfs with this environment's keystore, and the per-user cache (where the
/// control socket of an s3:// mount lives) inside the test's directory.
pub fn kcmd(env: &Env) -> std::process::Command {
    let mut c = env.cmd();
    c.env("XDG_CACHE_HOME", env.root().join("xdg-cache"));
    c
}

/// Runs kmsfs with [`kcmd`]'s environment, whatever its exit status.
pub fn run_any<S: AsRef<std::ffi::OsStr>>(env: &Env, args: &[S]) -> std::process::Output {
    kcmd(env).args(args).output().unwrap()
}
