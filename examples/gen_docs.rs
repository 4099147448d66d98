//! Writes the man pages and shell completions made from the command-line definitions
//! (clap_mangen, clap_complete), for packaging/debian/build.sh:
//!
//! ```sh
//! cargo run --release --example gen_docs -- OUT_DIR
//! ```
//!
//! OUT_DIR/man: kmsfs.1, one page per subcommand (kmsfs-mount.1, kmsfs-key-create.1, …)
//! and mount.kmsfs.8; OUT_DIR/completions: kmsfs.bash, _kmsfs (zsh), kmsfs.fish.

use std::fs;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// The fstab part of mount.kmsfs(8).
const FSTAB: &str = "\
mount(8) runs mount.kmsfs for fstab entries of type kmsfs, and mount.fuse3 runs `kmsfs \
VOLUME_DIR MOUNTPOINT -o OPTIONS` for entries of type fuse.kmsfs; both take the same options:

  /srv/vault  /srv/data  kmsfs       passphrase_file=/etc/kmsfs/vault.pass,nofail  0 0
  /srv/vault  /srv/data  fuse.kmsfs  keyfile=/etc/kmsfs/vault.key,_netdev,nofail   0 0

kmsfs options: keystore=PATH, passphrase_file=PATH, keyfile=PATH, kms=URL, cache_size=SIZE, \
snapshot=NAME, ro, rw, allow_other, default_permissions, log=PATH, and the kernel flags nodev, \
nosuid, noexec, noatime, sync, dirsync. The generic options of mount(8) and systemd (defaults, \
auto, noauto, user, users, _netdev, nofail, x-systemd.*, comment=) are accepted and ignored; \
any other option fails, naming it (with -s, sloppy, it is ignored). At boot there is no \
terminal to ask for a passphrase: give passphrase_file=, keyfile= or kms=.

`kmsfs systemd-unit VOLUME_DIR MOUNTPOINT -o OPTIONS` prints the equivalent systemd .mount \
unit, ordered after the network (_netdev) and the KMS daemon (kms=unix:), and before the \
services named by x-systemd.before=. Examples: /usr/share/doc/kmsfs/examples.";

fn main() {
    let out = PathBuf::from(std::env::args_os().nth(1).expect("usage: gen_docs OUT_DIR"));
    let man = out.join("man");
    let comp = out.join("completions");
    for d in [&man, &comp] {
        let _ = fs::remove_dir_all(d);
        fs::create_dir_all(d).unwrap();
    }
    let (kmsfs, helper) = kmsfs::cli::clap_commands();
    // kmsfs.1 and kmsfs-SUBCOMMAND[-SUBCOMMAND].1 for every subcommand.
    let kmsfs = kmsfs.version(env!("CARGO_PKG_VERSION"));
    clap_mangen::generate_to(kmsfs.clone(), &man).unwrap();
    let helper = helper
        .version(env!("CARGO_PKG_VERSION"))
        .after_long_help(FSTAB);
    let mut page = Vec::new();
    clap_mangen::Man::new(helper)
        .section("8")
        .render(&mut page)
        .unwrap();
    fs::write(man.join("mount.kmsfs.8"), page).unwrap();
    let mut cmd = kmsfs;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "kmsfs", &comp).unwrap();
    }
    let n = |d: &Path| fs::read_dir(d).unwrap().count();
    println!(
        "{}: {} man pages, {} completion files",
        out.display(),
        n(&man),
        n(&comp)
    );
}
