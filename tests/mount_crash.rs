//! `kill -9` of the mount daemon during writes: after `fusermount3 -u` and a
//! remount, everything fsync'ed before the kill is intact and fsck is clean.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Env, pattern, wait_until};

fn size_of(i: u64) -> usize {
    20_000 + (i as usize * 37_813) % 150_000
}

#[test]
fn kill_9_during_writes_keeps_everything_fsynced() {
    require_fuse!();
    let env = Env::new();
    let m = env.mount();
    let root = m.path.clone();
    let durable: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));

    // Writer 1: whole files, each fsync'ed; recorded only once fsync returned.
    let w1 = {
        let (durable, stop, root) = (durable.clone(), stop.clone(), root.clone());
        std::thread::spawn(move || {
            for i in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let r = (|| -> std::io::Result<()> {
                    let mut f = File::create(root.join(format!("durable-{i}")))?;
                    f.write_all(&pattern(size_of(i), i))?;
                    f.sync_all()
                })();
                match r {
                    Ok(()) => durable.lock().unwrap().push(i),
                    Err(_) => return, // the daemon is gone
                }
            }
        })
    };
    // Writer 2: a file rewritten in place without fsync, and renames, so the
    // kill lands among uncommitted changes too.
    let w2 = {
        let (stop, root) = (stop.clone(), root.clone());
        std::thread::spawn(move || {
            let chunk = pattern(64 << 10, 99);
            for i in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let r = (|| -> std::io::Result<()> {
                    let mut f = OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(root.join("churn"))?;
                    f.write_all(&chunk)?;
                    fs::write(root.join(format!("tmp-{}", i % 8)), &chunk[..1000])?;
                    fs::rename(
                        root.join(format!("tmp-{}", i % 8)),
                        root.join(format!("renamed-{}", i % 8)),
                    )
                })();
                if r.is_err() {
                    return;
                }
            }
        })
    };
    wait_until("25 durable files", Duration::from_secs(120), || {
        durable.lock().unwrap().len() >= 25
    });
    m.kill9();
    stop.store(true, Ordering::Relaxed);
    w1.join().unwrap();
    w2.join().unwrap();
    let durable = durable.lock().unwrap().clone();

    env.assert_fsck_clean();
    let m = env.mount();
    for i in &durable {
        let p: PathBuf = m.p(&format!("durable-{i}"));
        let got = fs::read(&p).unwrap_or_else(|e| panic!("durable-{i} lost after kill -9: {e}"));
        assert!(
            got == pattern(size_of(*i), *i),
            "durable-{i} differs after kill -9"
        );
    }
    // The volume is writable again and stays consistent.
    fs::write(m.p("after"), b"ok").unwrap();
    assert_eq!(m.unmount(), Some(0));
    env.assert_fsck_clean();
}
