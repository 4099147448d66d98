//! Where keys come from: the keystore path and its unlock secret (flags, then `-o`
//! options, then the environment; a prompt on a terminal), or a KMS named by URL.

use super::*;

// ----- keystore and unlock -----------------------------------------------------

pub(super) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub(super) fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

pub(super) fn xdg_dir(var: &str, fallback: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(v) if Path::new(&v).is_absolute() => PathBuf::from(v),
        _ => home().join(fallback),
    }
}

pub(super) fn default_keystore() -> PathBuf {
    if is_root() {
        PathBuf::from("/var/lib/kmsfs/keystore")
    } else {
        xdg_dir("XDG_DATA_HOME", ".local/share").join("kmsfs/keystore")
    }
}

pub(super) fn default_log_dir() -> PathBuf {
    if is_root() {
        PathBuf::from("/var/log/kmsfs")
    } else {
        xdg_dir("XDG_STATE_HOME", ".local/state").join("kmsfs")
    }
}

/// Where the keystore secret comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum UnlockSource {
    PassphraseFile(PathBuf),
    Keyfile(PathBuf),
    Prompt,
}

pub(super) fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Picks the keystore and unlock source: flags, then -o options, then the environment.
pub(super) fn resolve_keys(k: &KeyArgs, o: &MountOpts) -> Result<(PathBuf, UnlockSource)> {
    let keystore = k
        .keystore
        .clone()
        .or_else(|| o.keystore.clone())
        .or_else(|| env_path(ENV_KEYSTORE))
        .unwrap_or_else(default_keystore);
    let levels = [
        (
            "--passphrase-file and --keyfile",
            k.passphrase_file.clone(),
            k.keyfile.clone(),
        ),
        (
            "passphrase_file= and keyfile=",
            o.passphrase_file.clone(),
            o.keyfile.clone(),
        ),
        (
            "KMSFS_PASSPHRASE_FILE and KMSFS_KEYFILE",
            env_path(ENV_PASSPHRASE_FILE),
            env_path(ENV_KEYFILE),
        ),
    ];
    let mut unlock = UnlockSource::Prompt;
    for (what, pass, key) in levels {
        match (pass, key) {
            (Some(_), Some(_)) => {
                return Err(CliError::usage(format!(
                    "{what} are both given; pass only one"
                )));
            }
            (Some(p), None) => unlock = UnlockSource::PassphraseFile(absolute(&p)?),
            (None, Some(f)) => unlock = UnlockSource::Keyfile(absolute(&f)?),
            (None, None) => continue,
        }
        break;
    }
    Ok((absolute(&keystore)?, unlock))
}

pub(super) fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| CliError::error(format!("{}: {e}", p.display())))
}

pub(super) fn keystore_exists(path: &Path) -> bool {
    let mut bak = path.as_os_str().to_owned();
    bak.push(".bak");
    path.exists() || Path::new(&bak).exists()
}

/// Reads the secret (file or terminal prompt) in this process.
pub(super) fn obtain_unlock(keystore: &Path, src: &UnlockSource, creating: bool) -> Result<Unlock> {
    match src {
        UnlockSource::Keyfile(p) => Ok(Unlock::Keyfile(p.clone())),
        UnlockSource::PassphraseFile(p) => {
            crate::kms::keystore::check_private_file(p, "passphrase file")?;
            let mut f = File::open(p).map_err(|e| {
                CliError::key(format!(
                    "cannot read the passphrase file {}: {e}",
                    p.display()
                ))
            })?;
            let mut b = Vec::with_capacity(MAX_PASSPHRASE + 2);
            (&mut f)
                .take(MAX_PASSPHRASE as u64 + 2)
                .read_to_end(&mut b)
                .map_err(|e| {
                    CliError::key(format!(
                        "cannot read the passphrase file {}: {e}",
                        p.display()
                    ))
                })?;
            let p = Passphrase::from_file_contents(b);
            if p.expose().is_empty() {
                return Err(CliError::key("the passphrase file is empty"));
            }
            Ok(Unlock::Passphrase(p))
        }
        UnlockSource::Prompt => {
            let p =
                prompt_passphrase(&format!("Passphrase for keystore {}: ", keystore.display()))?;
            if creating {
                let again = prompt_passphrase("Repeat the new passphrase: ")?;
                if again.expose() != p.expose() {
                    return Err(CliError::key(
                        "the passphrases do not match; nothing was created",
                    ));
                }
            }
            Ok(Unlock::Passphrase(p))
        }
    }
}

/// Restores the terminal settings when the prompt ends, however it ends.
pub(super) struct TermRestore(libc::termios);

impl Drop for TermRestore {
    fn drop(&mut self) {
        // SAFETY: fd 0 is the terminal the settings were read from; the struct is valid.
        unsafe { libc::tcsetattr(0, libc::TCSAFLUSH, &self.0) };
    }
}

/// Reads a passphrase from the terminal on stdin without echo. Never blocks
/// on a non-terminal: without one it fails with a message naming the options.
pub(super) fn prompt_passphrase(prompt: &str) -> Result<Passphrase> {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(0) } != 1 {
        return Err(CliError::key(
            "no passphrase given and no terminal to ask on: pass --passphrase-file FILE or --keyfile FILE \
             (or -o passphrase_file=FILE, or set KMSFS_PASSPHRASE_FILE / KMSFS_KEYFILE)",
        ));
    }
    // SAFETY: termios is plain data; zeroed is a valid value that tcgetattr overwrites.
    let mut old: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd 0 is open and `old` is a valid out-pointer.
    if unsafe { libc::tcgetattr(0, &mut old) } != 0 {
        return Err(CliError::key(format!(
            "cannot configure the terminal: {}",
            std::io::Error::last_os_error()
        )));
    }
    let mut quiet = old;
    quiet.c_lflag &= !libc::ECHO;
    quiet.c_lflag |= libc::ECHONL;
    let _restore = TermRestore(old);
    // SAFETY: fd 0 is a terminal and `quiet` a valid termios.
    unsafe { libc::tcsetattr(0, libc::TCSAFLUSH, &quiet) };
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    // Read byte by byte with read(2): no userspace buffer keeps a copy.
    let mut buf = Vec::with_capacity(MAX_PASSPHRASE + 1);
    loop {
        let mut c = 0u8;
        // SAFETY: reads one byte into a valid one-byte buffer.
        let n = unsafe { libc::read(0, (&mut c as *mut u8).cast(), 1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(CliError::key(format!("cannot read the passphrase: {e}")));
        }
        if n == 0 || c == b'\n' {
            break;
        }
        if buf.len() >= MAX_PASSPHRASE {
            return Err(CliError::key("the passphrase is too long"));
        }
        buf.push(c);
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    if buf.is_empty() {
        return Err(CliError::key("empty passphrase"));
    }
    Ok(Passphrase::from_bytes(buf))
}

/// Argon2id parameters for a new keystore or a new passphrase.
pub(super) fn kdf_params() -> KdfParams {
    if cfg!(feature = "test-hooks") && std::env::var(ENV_KDF_TEST).as_deref() == Ok("1") {
        KdfParams::for_tests()
    } else {
        KdfParams::DEFAULT
    }
}

pub(super) fn open_keystore(path: &Path, unlock: Unlock) -> Result<LocalKeystore> {
    Ok(LocalKeystore::open_or_create_with_params(
        path,
        unlock,
        kdf_params(),
    )?)
}

/// Reads a small file whole, refusing one larger than `max` bytes.
pub(super) fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let f = File::open(path)?;
    let mut b = Vec::new();
    f.take(max + 1).read_to_end(&mut b)?;
    if b.len() as u64 > max {
        return Err(std::io::Error::other(format!("larger than {max} bytes")));
    }
    Ok(b)
}

/// Where keys come from: the keystore (with its secret, read before any fork) or a KMS
/// named by URL.
pub(super) enum KmsSource {
    Keystore(PathBuf, Unlock),
    Url(String),
}

/// The KMS URL: `--kms`, then `-o kms=`, then `KMSFS_KMS`.
pub(super) fn kms_url(keys: &KeyArgs, opts: &MountOpts) -> Option<String> {
    keys.kms
        .clone()
        .or_else(|| opts.kms.clone())
        .or_else(|| std::env::var(ENV_KMS).ok().filter(|v| !v.is_empty()))
}

/// Resolves where keys come from; `create`: the keystore may be created (init, key create).
pub(super) fn kms_source(keys: &KeyArgs, opts: &MountOpts, create: bool) -> Result<KmsSource> {
    if let Some(u) = kms_url(keys, opts) {
        // Checked now, so a bad URL is a usage error before anything happens.
        crate::kms::KmsUrl::parse(&u).map_err(|e| CliError::usage(e.to_string()))?;
        return Ok(KmsSource::Url(u));
    }
    if create {
        let (ks, src) = resolve_keys(keys, opts)?;
        let creating = !keystore_exists(&ks);
        let unlock = obtain_unlock(&ks, &src, creating)?;
        return Ok(KmsSource::Keystore(ks, unlock));
    }
    let (ks, unlock) = unlock_existing(keys, opts)?;
    Ok(KmsSource::Keystore(ks, unlock))
}

/// Connects to (or opens) the KMS.
pub(super) fn connect_kms(src: KmsSource) -> Result<Arc<dyn Kms>> {
    Ok(match src {
        KmsSource::Keystore(ks, unlock) => Arc::new(open_keystore(&ks, unlock)?),
        KmsSource::Url(u) => crate::kms::remote::open(&u)?,
    })
}

/// The KMS of a command that does not mount.
pub(super) fn open_kms(keys: &KeyArgs, create: bool) -> Result<Arc<dyn Kms>> {
    connect_kms(kms_source(keys, &MountOpts::default(), create)?)
}

/// Opens an existing keystore (only `init` creates one).
pub(super) fn unlock_existing(keys: &KeyArgs, opts: &MountOpts) -> Result<(PathBuf, Unlock)> {
    let (ks, src) = resolve_keys(keys, opts)?;
    if !keystore_exists(&ks) {
        return Err(CliError::key(format!(
            "keystore {} does not exist; pass the keystore the volume was created with (--keystore PATH or KMSFS_KEYSTORE)",
            ks.display()
        )));
    }
    let unlock = obtain_unlock(&ks, &src, false)?;
    Ok((ks, unlock))
}
