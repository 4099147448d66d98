//! `kmsfs systemd-unit VOLUME_DIR MOUNTPOINT [-o OPTIONS]`: a systemd `.mount` unit for a
//! volume, as systemd-fstab-generator would make it from the same fstab line, with the
//! ordering a kmsfs mount needs at boot and at shutdown:
//!
//! - a mount that needs the network (`_netdev`, a volume directory on NFS/SMB/Ceph, an
//!   external KMS) or the KMS daemon (`kms=unix:…`) is a late, "remote" mount: `_netdev`
//!   in `Options=`, ordered after `network-online.target` (and the daemon's units) and
//!   before `remote-fs.target`; systemd stops units in the reverse order, so it is
//!   unmounted, with its final commit, before the network or the daemon goes away;
//! - `x-systemd.before=UNIT` orders the services that use the mount after it, so they
//!   stop before it is unmounted;
//! - `RequiresMountsFor=` the volume directory, the keystore and the secret files;
//! - `nofail`: the boot does not wait for it or fail with it (`WantedBy=` instead of
//!   `RequiredBy=`); `noauto`: no `[Install]` section.

use super::*;

/// The socket of packaging/systemd/kmsfs-kms.socket.
const KMS_SOCKET: &str = "/run/kmsfs/kms.sock";

#[derive(Args, Debug)]
pub(super) struct SystemdUnitArgs {
    /// The volume directory
    volume_dir: PathBuf,
    /// Where to mount it (the unit is named after it)
    mountpoint: PathBuf,
    /// Options as in fstab: kmsfs's own (`kmsfs mount --help`; at boot one of
    /// passphrase_file=, keyfile= or kms= is needed), _netdev, nofail, noauto,
    /// x-systemd.before=UNIT, x-systemd.after=UNIT, x-systemd.requires=UNIT,
    /// x-systemd.wants=UNIT, x-systemd.requires-mounts-for=PATH, x-systemd.wanted-by=UNIT,
    /// x-systemd.required-by=UNIT, x-systemd.mount-timeout=SECS, x-systemd.automount,
    /// x-systemd.idle-timeout=SECS
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Filesystem type: kmsfs (mount(8) runs /sbin/mount.kmsfs) or fuse.kmsfs (mount.fuse3
    /// runs kmsfs)
    #[arg(long = "type", value_name = "TYPE", default_value = "kmsfs",
          value_parser = ["kmsfs", "fuse.kmsfs"])]
    fstype: String,
    /// Print only the unit's name (as `systemd-escape --path --suffix=mount MOUNTPOINT`)
    #[arg(long)]
    print_name: bool,
    /// Write NAME.mount (and NAME.automount with x-systemd.automount) into DIR, e.g.
    /// /etc/systemd/system, and print their paths
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// The generated units.
#[derive(Debug)]
pub(super) struct Units {
    /// The unit name without suffix (`srv-data`).
    pub(super) stem: String,
    pub(super) mount: String,
    pub(super) automount: Option<String>,
}

pub(super) fn run(a: SystemdUnitArgs) -> Result<()> {
    if a.print_name {
        let mountpoint = normal_path(&a.mountpoint, "the mount point")?;
        println!("{}.mount", escape_path(&mountpoint));
        return Ok(());
    }
    let units = generate(&a.volume_dir, &a.mountpoint, &a.options, &a.fstype)?;
    let Some(dir) = a.dir else {
        print!("{}", units.mount);
        if units.automount.is_some() {
            eprintln!(
                "kmsfs: x-systemd.automount: pass --dir DIR to also write {}.automount",
                units.stem
            );
        }
        return Ok(());
    };
    let mut files = vec![(format!("{}.mount", units.stem), &units.mount)];
    if let Some(auto) = &units.automount {
        files.push((format!("{}.automount", units.stem), auto));
    }
    for (name, text) in files {
        let path = dir.join(name);
        fs::write(&path, text)
            .map_err(|e| CliError::error(format!("cannot write {}: {e}", path.display())))?;
        println!("{}", path.display());
    }
    Ok(())
}

/// An absolute path without `.`, `..` or repeated slashes (systemd wants Where= so).
fn normal_path(p: &Path, what: &str) -> Result<PathBuf> {
    let abs = absolute(p)?;
    let mut out = PathBuf::from("/");
    for c in abs.components() {
        match c {
            std::path::Component::Normal(s) => out.push(s),
            std::path::Component::ParentDir => {
                return Err(CliError::usage(format!(
                    "{what} {} contains `..`: give the path without it",
                    p.display()
                )));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// systemd's path escaping (`systemd-escape --path`): `/` becomes `-`, bytes other than
/// ASCII letters, digits, `:`, `_` and `.` (and a leading `.`) become `\xNN`.
pub(super) fn escape_path(p: &Path) -> String {
    let b = p.as_os_str().as_bytes();
    let parts: Vec<&[u8]> = b.split(|&c| c == b'/').filter(|s| !s.is_empty()).collect();
    if parts.is_empty() {
        return "-".into();
    }
    let mut out = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        for (j, &c) in part.iter().enumerate() {
            let plain = c.is_ascii_alphanumeric() || c == b':' || c == b'_' || c == b'.';
            if plain && !(i == 0 && j == 0 && c == b'.') {
                out.push(c as char);
            } else {
                out.push_str(&format!("\\x{c:02x}"));
            }
        }
    }
    out
}

/// A value for a unit file: `%` is a specifier there, written `%%`.
fn unit_value(s: &str) -> String {
    s.replace('%', "%%")
}

fn path_value(p: &Path) -> String {
    unit_value(&p.to_string_lossy())
}

/// True when `p` (or its nearest existing ancestor) is on a network file system.
fn on_network_fs(p: &Path) -> bool {
    const NETWORK: &[i64] = &[
        0x6969,      // NFS
        0xFF53_4D42, // CIFS
        0xFE53_4D42, // SMB2
        0x517B,      // SMB
        0x00C3_6400, // Ceph
        0x0102_1997, // 9p (v9fs)
        0x4750_4653, // GPFS
        0x0BD0_0BD0, // Lustre
    ];
    let mut cur = Some(p);
    while let Some(d) = cur {
        if let Ok(c) = CString::new(d.as_os_str().as_bytes()) {
            // SAFETY: statfs fills the zeroed struct for a valid NUL-terminated path.
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 {
                #[allow(clippy::unnecessary_cast)]
                return NETWORK.contains(&(st.f_type as i64));
            }
        }
        cur = d.parent();
    }
    false
}

/// Builds the units for one volume, mount point and option list.
pub(super) fn generate(
    volume: &Path,
    mountpoint: &Path,
    options: &[String],
    fstype: &str,
) -> Result<Units> {
    let volume = normal_path(volume, "the volume directory")?;
    let mountpoint = normal_path(mountpoint, "the mount point")?;
    if mountpoint == Path::new("/") {
        return Err(CliError::usage("kmsfs cannot be mounted on /"));
    }
    let mut kept: Vec<String> = Vec::new();
    let (mut before, mut after, mut requires, mut wants) = (vec![], vec![], vec![], vec![]);
    let (mut wanted_by, mut required_by, mut mounts_for) = (vec![], vec![], vec![]);
    let (mut netdev, mut nofail, mut noauto, mut automount) = (false, false, false, false);
    let (mut timeout, mut idle) = (None, None);
    for opt in options.iter().flat_map(|g| g.split(',')) {
        let opt = opt.trim();
        if opt.is_empty() {
            continue;
        }
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let need = || -> Result<String> {
            match v {
                Some(v) if !v.is_empty() => Ok(unit_value(v)),
                _ => Err(CliError::usage(format!(
                    "mount option {k} needs a value ({k}=…)"
                ))),
            }
        };
        match k {
            "x-systemd.before" => before.push(need()?),
            "x-systemd.after" => after.push(need()?),
            "x-systemd.requires" => {
                requires.push(need()?);
                after.push(need()?);
            }
            "x-systemd.wants" => {
                wants.push(need()?);
                after.push(need()?);
            }
            "x-systemd.wanted-by" => wanted_by.push(need()?),
            "x-systemd.required-by" => required_by.push(need()?),
            "x-systemd.requires-mounts-for" => mounts_for.push(need()?),
            "x-systemd.mount-timeout" => timeout = Some(need()?),
            "x-systemd.idle-timeout" => idle = Some(need()?),
            "x-systemd.automount" => automount = true,
            // Other x-systemd.* (device-timeout, makefs…) mean nothing here; x-* are
            // userspace notes, comment= too.
            _ if k.starts_with("x-") || k == "comment" => {}
            "defaults" | "auto" | "user" | "users" | "nouser" => {}
            "noauto" => noauto = true,
            "_netdev" => netdev = true,
            "nofail" => {
                nofail = true;
                kept.push(opt.into());
            }
            _ => kept.push(opt.into()),
        }
    }
    // Every option mount.kmsfs would refuse is refused now, naming it.
    let o = parse_mount_options(&[kept.join(",")], false)?;
    if o.passphrase_file.is_none() && o.keyfile.is_none() && o.kms.is_none() {
        return Err(CliError::usage(
            "at boot no one can type a passphrase: add passphrase_file=PATH, keyfile=PATH or kms=URL",
        ));
    }
    let kms_unix = o.kms.as_deref().and_then(|k| k.strip_prefix("unix:"));
    let kms_remote = o.kms.is_some() && kms_unix.is_none();
    let network = netdev || kms_remote || on_network_fs(&volume);
    // A late mount: after the network, or after the KMS daemon's socket, which comes
    // after sysinit.target and so cannot be ordered before local-fs.target.
    let late = network || kms_unix.is_some();
    if late {
        kept.push("_netdev".into());
    }

    let mut unit = String::new();
    let w = &mut unit;
    let line = |w: &mut String, k: &str, v: &str| {
        w.push_str(k);
        w.push('=');
        w.push_str(v);
        w.push('\n');
    };
    w.push_str(&format!(
        "# Generated by `kmsfs systemd-unit`: install as /etc/systemd/system/{}.mount\n",
        escape_path(&mountpoint)
    ));
    w.push_str("[Unit]\n");
    line(
        w,
        "Description",
        &format!(
            "kmsfs volume {} on {}",
            path_value(&volume),
            path_value(&mountpoint)
        ),
    );
    line(w, "Documentation", "man:mount.kmsfs(8) man:kmsfs-mount(1)");
    if network {
        w.push_str(
            "# Mounted once the network is up; unmounted (final commit included) before it goes down.\n",
        );
        line(w, "Wants", "network-online.target");
        line(w, "After", "network-online.target");
    }
    if let Some(sock) = kms_unix {
        if sock == KMS_SOCKET {
            w.push_str(
                "# The KMS daemon serves the data key, and each commit's rollback mark: it\n",
            );
            w.push_str("# starts before this mount and stops after it.\n");
            line(w, "Requires", "kmsfs-kms.socket");
            line(w, "After", "kmsfs-kms.socket kmsfs-kms.service");
        } else {
            w.push_str(&format!(
                "# kms=unix:{sock} is not the packaged kmsfs-kms.socket: order this mount after\n\
                 # the unit serving it with x-systemd.requires=UNIT.\n"
            ));
        }
    }
    let mut paths: Vec<String> = vec![path_value(&volume)];
    for p in [&o.keystore, &o.passphrase_file, &o.keyfile, &o.log]
        .into_iter()
        .flatten()
    {
        let p = normal_path(p, "the path")?;
        if !p.starts_with(&mountpoint) {
            paths.push(path_value(&p));
        }
    }
    if o.keystore.is_none() && o.kms.is_none() {
        paths.push("/var/lib/kmsfs/keystore".into());
    }
    paths.extend(mounts_for);
    line(w, "RequiresMountsFor", &paths.join(" "));
    for (k, list) in [
        ("Requires", &requires),
        ("Wants", &wants),
        ("After", &after),
    ] {
        if !list.is_empty() {
            line(w, k, &list.join(" "));
        }
    }
    if !before.is_empty() {
        w.push_str("# These use the mount: they start after it and stop before it is unmounted.\n");
        line(w, "Before", &before.join(" "));
    }
    w.push_str("\n[Mount]\n");
    line(w, "What", &path_value(&volume));
    line(w, "Where", &path_value(&mountpoint));
    line(w, "Type", fstype);
    line(w, "Options", &unit_value(&kept.join(",")));
    if let Some(t) = &timeout {
        line(w, "TimeoutSec", t);
    }
    let target = if late {
        "remote-fs.target"
    } else {
        "local-fs.target"
    };
    let mut install = |w: &mut String| {
        w.push_str("\n[Install]\n");
        if nofail {
            wanted_by.push(target.to_string());
        } else {
            required_by.push(target.to_string());
        }
        if !wanted_by.is_empty() {
            line(w, "WantedBy", &wanted_by.join(" "));
        }
        if !required_by.is_empty() {
            line(w, "RequiredBy", &required_by.join(" "));
        }
    };
    let automount = if automount {
        let mut a = String::new();
        a.push_str(&format!(
            "# Generated by `kmsfs systemd-unit`: install as /etc/systemd/system/{}.automount\n",
            escape_path(&mountpoint)
        ));
        a.push_str("[Unit]\n");
        line(
            &mut a,
            "Description",
            &format!(
                "Automount of the kmsfs volume on {}",
                path_value(&mountpoint)
            ),
        );
        line(&mut a, "Documentation", "man:mount.kmsfs(8)");
        if late {
            line(&mut a, "Before", "remote-fs.target");
        }
        a.push_str("\n[Automount]\n");
        line(&mut a, "Where", &path_value(&mountpoint));
        if let Some(t) = &idle {
            line(&mut a, "TimeoutIdleSec", t);
        }
        if !noauto {
            install(&mut a);
        }
        Some(a)
    } else {
        if !noauto {
            install(w);
        }
        None
    };
    Ok(Units {
        stem: escape_path(&mountpoint),
        mount: unit,
        automount,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen_(opts: &str) -> Result<Units> {
        generate(
            Path::new("/srv/vault"),
            Path::new("/srv/my data"),
            &[opts.to_string()],
            "kmsfs",
        )
    }

    #[test]
    fn escapes_like_systemd() {
        assert_eq!(escape_path(Path::new("/")), "-");
        assert_eq!(escape_path(Path::new("/srv/data")), "srv-data");
        assert_eq!(
            escape_path(Path::new("/tmp/kmsfs-test-x/.m n")),
            "tmp-kmsfs\\x2dtest\\x2dx-.m\\x20n"
        );
        assert_eq!(
            escape_path(Path::new("/.hidden/a:b_c")),
            "\\x2ehidden-a:b_c"
        );
    }

    #[test]
    fn orders_and_refuses() {
        let u = gen_("passphrase_file=/root/p,x-systemd.before=smbd.service,nofail").unwrap();
        assert_eq!(u.stem, "srv-my\\x20data");
        assert!(u.mount.contains("Before=smbd.service\n"), "{}", u.mount);
        assert!(u.mount.contains("WantedBy=local-fs.target\n"));
        assert!(!u.mount.contains("network-online"));
        assert!(u.mount.contains("Options=passphrase_file=/root/p,nofail\n"));
        let u = gen_("kms=unix:/run/kmsfs/kms.sock").unwrap();
        assert!(u.mount.contains("Requires=kmsfs-kms.socket\n"));
        assert!(
            u.mount
                .contains("After=kmsfs-kms.socket kmsfs-kms.service\n")
        );
        assert!(
            u.mount
                .contains("Options=kms=unix:/run/kmsfs/kms.sock,_netdev\n")
        );
        assert!(u.mount.contains("RequiredBy=remote-fs.target\n"));
        let u = gen_("keyfile=/k,_netdev,noauto,comment=x,x-systemd.mount-timeout=5min").unwrap();
        assert!(u.mount.contains("After=network-online.target\n"));
        assert!(u.mount.contains("TimeoutSec=5min\n"));
        assert!(!u.mount.contains("[Install]"));
        let u = gen_("keyfile=/k,x-systemd.automount,x-systemd.idle-timeout=60").unwrap();
        let a = u.automount.unwrap();
        assert!(a.contains("TimeoutIdleSec=60\n") && a.contains("[Install]"));
        assert!(!u.mount.contains("[Install]"));
        let e = gen_("keyfile=/k,bogus").unwrap_err();
        assert!(e.msg.contains("bogus"), "{}", e.msg);
        let e = gen_("ro").unwrap_err();
        assert!(e.msg.contains("passphrase_file="), "{}", e.msg);
    }
}
