//! The copy: rsync as a child, its progress, and stopping it cleanly.

use super::*;

// ----- progress -------------------------------------------------------------------

#[derive(Default)]
pub(super) struct Counters {
    pub(super) files_done: AtomicU64,
    pub(super) files_total: AtomicU64,
    pub(super) bytes_done: AtomicU64,
    pub(super) bytes_total: AtomicU64,
    /// Bytes really moved (copied or read), for the rate.
    pub(super) moved: AtomicU64,
}

/// Draws the progress of a phase: a bar on a terminal, else a line every
/// [`PLAIN_INTERVAL`]; stopped (and the bar cleared) on drop.
pub(super) struct Ticker {
    pub(super) stop: Arc<AtomicBool>,
    pub(super) handle: Option<std::thread::JoinHandle<()>>,
    pub(super) bar: Option<ProgressBar>,
}

impl Ticker {
    pub(super) fn start(phase: &'static str, c: Arc<Counters>, tty: bool) -> Ticker {
        let stop = Arc::new(AtomicBool::new(false));
        let bar = tty.then(|| {
            let b = ProgressBar::new(c.bytes_total.load(Ordering::Relaxed));
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>9} [{bar:30}] {binary_bytes}/{binary_total_bytes} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(phase);
            b
        });
        let (s, b) = (stop.clone(), bar.clone());
        let handle = std::thread::spawn(move || {
            let mut samples: VecDeque<(Instant, u64)> = VecDeque::new();
            let mut last_line = Instant::now();
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let now = Instant::now();
                let moved = c.moved.load(Ordering::Relaxed);
                samples.push_back((now, moved));
                while samples.len() > 2
                    && now.duration_since(samples[0].0) > Duration::from_secs(10)
                {
                    samples.pop_front();
                }
                let (t0, m0) = samples[0];
                let dt = now.duration_since(t0).as_secs_f64();
                let rate = if dt > 0.0 {
                    moved.saturating_sub(m0) as f64 / dt
                } else {
                    0.0
                };
                let total = c.bytes_total.load(Ordering::Relaxed);
                let done = c.bytes_done.load(Ordering::Relaxed).min(total);
                let left = if rate > 1.0 {
                    format!("{} left", eta((total - done) as f64 / rate))
                } else {
                    "time left unknown".into()
                };
                let files = format!(
                    "{}/{} files",
                    c.files_done.load(Ordering::Relaxed),
                    c.files_total.load(Ordering::Relaxed)
                );
                let rate = format!("{}/s", human(rate as u64));
                match &b {
                    Some(b) => {
                        b.set_length(total);
                        b.set_position(done);
                        b.set_message(format!("{files}, {rate}, {left}"));
                    }
                    None if now.duration_since(last_line) >= PLAIN_INTERVAL => {
                        last_line = now;
                        let pct = (done * 100).checked_div(total).unwrap_or(100);
                        eprintln!(
                            "kmsfs migrate: {phase}: {files}, {} of {} ({pct}%), {rate}, {left}",
                            human(done),
                            human(total)
                        );
                    }
                    None => {}
                }
            }
        });
        Ticker {
            stop,
            handle: Some(handle),
            bar,
        }
    }

    /// Prints a line without tearing the bar.
    pub(super) fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

pub(super) fn eta(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Totals of the source, for the progress: regular file names, their bytes
/// (per name, as rsync counts them) and per inode (as the verification reads).
#[derive(Default)]
pub(super) struct Totals {
    pub(super) files: u64,
    pub(super) bytes_names: u64,
    pub(super) bytes_inodes: u64,
}

pub(super) fn count_tree(root: &Path) -> Totals {
    let mut t = Totals::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                t.files += 1;
                t.bytes_names += md.size();
                if md.nlink() == 1 || seen.insert((md.dev(), md.ino())) {
                    t.bytes_inodes += md.size();
                }
            }
        }
    }
    t
}

// ----- the copy -----------------------------------------------------------------

pub(super) static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNALLED.store(sig, Ordering::SeqCst);
}

pub(super) const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Catches SIGINT/SIGTERM/SIGHUP while it lives (restoring the old actions after).
pub(super) struct SignalGuard {
    pub(super) old: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalGuard {
    fn install() -> SignalGuard {
        let mut old = Vec::new();
        for sig in STOP_SIGNALS {
            // SAFETY: sigaction with a zeroed struct, an async-signal-safe handler
            // (one atomic store) and an empty mask; the old action is kept.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                let mut prev: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &sa, &mut prev) == 0 {
                    old.push((sig, prev));
                }
            }
        }
        SignalGuard { old }
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for (sig, prev) in &self.old {
            // SAFETY: restores the action saved by install().
            unsafe { libc::sigaction(*sig, prev, std::ptr::null_mut()) };
        }
    }
}

pub(super) fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// What rsync's stdout says, parsed by [`parse_rsync_line`].
#[derive(Debug, PartialEq)]
pub(super) enum RsyncLine {
    /// `--out-format` item: update type (`>` copied, `.` up to date, `h`
    /// hard link…), file type (`f`, `d`, `L`, `D`, `S`) and size.
    Item {
        update: u8,
        kind: u8,
        size: u64,
    },
    /// `--info=progress2`: bytes transferred so far in this run.
    Progress {
        bytes: u64,
    },
    Other,
}

pub(super) const ITEM_PREFIX: &str = "@@kmsfs ";

pub(super) fn parse_rsync_line(l: &str) -> RsyncLine {
    if let Some(rest) = l.strip_prefix(ITEM_PREFIX) {
        let mut it = rest.splitn(2, ' ');
        let size = it.next().and_then(|s| s.parse().ok());
        let item = it.next().map(str::as_bytes).unwrap_or_default();
        return match (size, item) {
            (Some(size), [update, kind, ..]) => RsyncLine::Item {
                update: *update,
                kind: *kind,
                size,
            },
            _ => RsyncLine::Other,
        };
    }
    let t = l.trim_start();
    if t.starts_with(|c: char| c.is_ascii_digit()) && t.contains('%') {
        let first = t.split_whitespace().next().unwrap_or("");
        let digits: String = first.chars().filter(char::is_ascii_digit).collect();
        if let Ok(bytes) = digits.parse() {
            return RsyncLine::Progress { bytes };
        }
    }
    RsyncLine::Other
}

/// Relative paths of rsync's `file has vanished: "PATH"` warnings.
pub(super) fn vanished_paths(messages: &[String], src: &Path) -> Vec<String> {
    let root = src.to_string_lossy();
    messages
        .iter()
        .filter_map(|m| {
            let i = m.find("file has vanished: \"")?;
            let rest = &m[i + "file has vanished: \"".len()..];
            let p = &rest[..rest.rfind('"')?];
            let rel = p.strip_prefix(root.as_ref()).unwrap_or(p);
            let rel = rel.trim_start_matches('/');
            Some(if rel.is_empty() {
                ".".into()
            } else {
                rel.into()
            })
        })
        .collect()
}

pub(super) fn rsync_missing() -> CliError {
    CliError::error(
        "rsync is not installed: install it (`apt-get install rsync`, or your system's rsync \
         package) and run the same command again",
    )
}

pub(super) fn copy(
    a: &MigrateArgs,
    src: &Path,
    dst: &Path,
    totals: &Totals,
    tty: bool,
) -> Result<CopyReport> {
    let signals = SignalGuard::install();
    let c = Arc::new(Counters::default());
    c.files_total.store(totals.files, Ordering::Relaxed);
    c.bytes_total.store(totals.bytes_names, Ordering::Relaxed);
    let mut cmd = Command::new("rsync");
    // --modify-window=-1: times compare (and are set) to the nanosecond;
    // otherwise rsync leaves a directory, symlink or special file with the
    // creation time of its copy when both fall in the same second.
    cmd.args(["-aHAXS", "--numeric-ids", "--modify-window=-1", "--partial"])
        .arg("--no-inc-recursive")
        .arg("--info=progress2,name2")
        .arg(format!("--out-format={ITEM_PREFIX}%l %i %n"));
    if let Some(bw) = &a.bwlimit {
        cmd.arg(format!("--bwlimit={bw}"));
    }
    let mut s: OsString = src.as_os_str().to_owned();
    s.push("/");
    let mut d: OsString = dst.as_os_str().to_owned();
    d.push("/");
    cmd.arg(s)
        .arg(d)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; rsync gets SIGTERM if we die.
    #[cfg(target_os = "linux")]
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
            Ok(())
        });
    }
    // rsync's processes are reaped here, also those whose parent exits first,
    // so the run ends only when none of them is left writing.
    // (Linux only: macOS has neither; there the signal handler stops rsync.)
    // SAFETY: prctl with integer arguments.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    };
    if SIGNALLED.load(Ordering::SeqCst) != 0 {
        return Err(interrupted(a, SIGNALLED.load(Ordering::SeqCst)));
    }
    let t = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(ch) => ch,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(rsync_missing()),
        Err(e) => return Err(CliError::error(format!("cannot run rsync: {e}"))),
    };
    let pgid = child.id() as i32;
    let ticker = Arc::new(Ticker::start("copying", c.clone(), tty && !a.json));
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let files_copied = Arc::new(AtomicU64::new(0));
    let out_thread = {
        let (c, copied) = (c.clone(), files_copied.clone());
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut skipped = 0u64;
            let mut line = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                let n = match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                for &b in &buf[..n] {
                    if b != b'\n' && b != b'\r' {
                        line.push(b);
                        continue;
                    }
                    match parse_rsync_line(&String::from_utf8_lossy(&line)) {
                        RsyncLine::Item {
                            update,
                            kind: b'f',
                            size,
                        } => {
                            c.files_done.fetch_add(1, Ordering::Relaxed);
                            if update == b'>' || update == b'<' {
                                copied.fetch_add(1, Ordering::Relaxed);
                            } else {
                                skipped += size;
                            }
                        }
                        RsyncLine::Progress { bytes } => {
                            c.moved.store(bytes, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                    c.bytes_done
                        .store(skipped + c.moved.load(Ordering::Relaxed), Ordering::Relaxed);
                    line.clear();
                }
            }
        })
    };
    let err_thread = {
        let ticker = ticker.clone();
        std::thread::spawn(move || {
            let mut msgs = Vec::new();
            for l in BufReader::new(stderr).lines() {
                let Ok(l) = l else { break };
                if l.trim().is_empty() {
                    continue;
                }
                ticker.println(&l);
                msgs.push(l);
            }
            msgs
        })
    };
    drop(child); // reaped below, with the rest of its process group
    let mut status = None;
    let mut stopping: Option<Instant> = None;
    let mut killed = false;
    loop {
        let mut st = 0;
        // SAFETY: waitpid on our children of rsync's process group.
        let r = unsafe { libc::waitpid(-pgid, &mut st, libc::WNOHANG) };
        if r == pgid {
            status = Some(st);
            continue;
        }
        if r > 0 {
            continue;
        }
        if r < 0 {
            break; // ECHILD: none of rsync's processes is left
        }
        let sig = SIGNALLED.load(Ordering::SeqCst);
        match stopping {
            None if sig != 0 => {
                // SAFETY: kill on rsync's own process group.
                unsafe { libc::kill(-pgid, libc::SIGTERM) };
                stopping = Some(Instant::now());
            }
            Some(t0) if !killed && t0.elapsed() > STOP_WAIT => {
                // SAFETY: as above.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                killed = true;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = out_thread.join();
    let messages = err_thread.join().unwrap_or_default();
    drop(ticker);
    drop(signals);
    let sig = SIGNALLED.load(Ordering::SeqCst);
    if sig != 0 {
        return Err(interrupted(a, sig));
    }
    let st = status.unwrap_or(0);
    let code = if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else {
        128 + libc::WTERMSIG(st)
    };
    match code {
        // 23: some files or attributes not copied; 24: files vanished. The
        // verification names what differs.
        0 | 23 | 24 => {}
        127 => return Err(rsync_missing()),
        _ => {
            let last = messages.last().cloned().unwrap_or_default();
            let hint = if code == 1 {
                " (rsync 3.1 or newer is needed)"
            } else {
                ""
            };
            return Err(CliError::error(format!(
                "rsync failed with exit code {code}{hint}: {last}; run the same command again to resume"
            )));
        }
    }
    Ok(CopyReport {
        seconds: t.elapsed().as_secs_f64(),
        files_copied: files_copied.load(Ordering::Relaxed),
        bytes_copied: c.moved.load(Ordering::Relaxed),
        rsync_exit: code,
        rsync_messages: messages,
    })
}

pub(super) fn interrupted(a: &MigrateArgs, sig: i32) -> CliError {
    CliError::new(
        128 + sig,
        format!(
            "interrupted by {}: rsync stopped; what it copied stays in {}. Run the same command \
             again to resume (finished files are skipped): kmsfs migrate {} {}",
            signal_name(sig),
            a.mountpoint.display(),
            a.source_dir.display(),
            a.mountpoint.display()
        ),
    )
}
