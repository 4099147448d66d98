//! A modified byte in a backing segment surfaces as EIO for the file whose
//! block it was, through the mount, while other files still read; fsck exits 3
//! and names the damaged file.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use common::{Env, errno_of, output_text, pattern};

fn segments(env: &Env) -> BTreeSet<PathBuf> {
    fs::read_dir(env.vol.join("seg"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

#[test]
fn tampered_segment_gives_eio_for_that_file_only() {
    require_fuse!();
    // 1 MiB segments: the victim's data fills whole segments of its own.
    let env = Env::with_init(&["--segment-size", "1M"]);
    let before = segments(&env);
    let m = env.mount();
    let victim = pattern(3 << 20, 11);
    fs::write(m.p("victim"), &victim).unwrap();
    File::open(m.p("victim")).unwrap().sync_all().unwrap();
    assert_eq!(m.unmount(), Some(0));
    let victim_segs: Vec<PathBuf> = segments(&env).difference(&before).cloned().collect();
    assert!(
        victim_segs.len() >= 3,
        "expected the victim in new segments: {victim_segs:?}"
    );

    let m = env.mount();
    fs::write(m.p("bystander"), pattern(500_000, 12)).unwrap();
    fs::create_dir(m.p("dir")).unwrap();
    fs::write(m.p("dir/other"), b"other file").unwrap();
    assert_eq!(m.unmount(), Some(0));
    env.assert_fsck_clean();

    // Flip one byte in the middle of the victim's first segment (pure data).
    let seg = &victim_segs[0];
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(seg)
        .unwrap();
    let off = f.metadata().unwrap().len() / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, off).unwrap();
    drop(f);

    let m = env.mount();
    let mut f = File::open(m.p("victim")).unwrap();
    let mut buf = Vec::new();
    let e = f.read_to_end(&mut buf).unwrap_err();
    assert_eq!(errno_of(&e), libc::EIO, "{e}");
    drop(f);
    // Blocks of the victim in other segments still read.
    let f = File::open(m.p("victim")).unwrap();
    let mut tail = vec![0u8; 65536];
    f.read_exact_at(&mut tail, (3 << 20) - 65536).unwrap();
    assert!(tail == victim[(3 << 20) - 65536..]);
    drop(f);
    assert_eq!(fs::read(m.p("bystander")).unwrap(), pattern(500_000, 12));
    assert_eq!(fs::read(m.p("dir/other")).unwrap(), b"other file");
    assert!(
        env.log_text().contains("inode"),
        "integrity errors are logged with the inode"
    );
    assert_eq!(m.unmount(), Some(0));

    let o = env.fsck();
    assert_eq!(o.status.code(), Some(3), "{}", output_text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("victim"),
        "fsck must name the damaged file:\n{out}"
    );
    assert!(!out.contains("bystander"), "{out}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("kmsfs: ") && err.contains("problem"),
        "{err}"
    );
}
