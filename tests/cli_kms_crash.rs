//! A keystore update killed at any moment (SIGKILL) leaves the old or the new keystore,
//! and an audit log that verifies against it: the log is appended (and synced) before the
//! keystore is replaced, and records past the keystore's anchor are accepted as the crash
//! window. The kill points vary; the property must hold at every one.

mod common;

use std::time::Duration;

use common::{Env, output_text};

#[test]
fn killed_key_changes_leave_a_keystore_and_audit_log_that_verify() {
    let env = Env::bare();
    env.ok(&["key", "create", "--alias", "base"]);
    let mut created = 0;
    for i in 0..24u64 {
        let alias = format!("k{i}");
        let mut child = env
            .cmd()
            .args(["key", "create", "--alias", &alias])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill points spread over the command's life (start-up, unlock, the update).
        std::thread::sleep(Duration::from_micros(i * 2_500));
        // SAFETY: kill on the pid of a child this test started.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let status = child.wait().unwrap();
        // Whatever the moment, the keystore opens, and the key exists or does not.
        let list = env.run(&["key", "list", "--json"]);
        assert!(
            list.status.success(),
            "after kill {i}: {}",
            output_text(&list)
        );
        let keys: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
        let has = keys
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["alias"] == alias.as_str());
        if status.success() {
            assert!(has, "kill {i}: the command finished but its key is missing");
        }
        created += usize::from(has);
        let v = env.run(&["audit", "verify"]);
        assert!(v.status.success(), "after kill {i}: {}", output_text(&v));
    }
    // The chain still takes records after all that.
    env.ok(&["key", "create", "--alias", "after"]);
    let v = env.ok(&["audit", "verify"]);
    assert!(v.contains("chain intact"), "{v}");
    eprintln!("{created} of 24 killed creations had completed");
}
