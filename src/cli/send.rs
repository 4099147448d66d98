//! `kmsfs send` and `kmsfs receive`: raw (still encrypted) snapshot streams
//! for backups to hosts that never hold the key (docs/STREAM-FORMAT.md).

use super::*;
use crate::volume::receive::{self, ReceiveOptions};
use crate::volume::send::{SendOptions, parse_resume_token};

#[derive(Args, Debug)]
pub(super) struct SendArgs {
    /// The volume (it may be mounted: send reads it as a read-only opener)
    volume_dir: PathBuf,
    /// The snapshot to send
    snapshot: String,
    /// Send only what snapshot BASE (already received by the target) lacks
    #[arg(long, value_name = "BASE")]
    from: Option<String>,
    /// Write the stream to FILE instead of standard output
    #[arg(short = 'o', long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Continue an interrupted receive: TOKEN is what `kmsfs receive --token TARGET` prints
    #[arg(long, value_name = "TOKEN")]
    resume: Option<String>,
    /// With --from: an incremental that fits the base however this volume's cleaner
    /// moved it since it was sent (larger: references every block, resends the tree)
    #[arg(long, requires = "from")]
    robust: bool,
    /// Print a JSON summary (bytes, blocks, seconds) on standard error
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub(super) struct ReceiveArgs {
    /// The target volume directory (created if missing): empty for a full stream,
    /// or a volume an earlier receive made, for an incremental
    target_dir: PathBuf,
    /// Read the stream from FILE instead of standard input
    #[arg(short = 'i', long, value_name = "FILE")]
    input: Option<PathBuf>,
    /// Continue an interrupted receive (the same stream again, or `kmsfs send --resume TOKEN`)
    #[arg(long)]
    resume: bool,
    /// Print the resume token of an interrupted receive (for `kmsfs send --resume`) and exit
    #[arg(long, conflicts_with_all = ["resume", "abort", "input"])]
    token: bool,
    /// Discard an interrupted receive; the target stays as it was
    #[arg(long, conflicts_with_all = ["resume", "token", "input"])]
    abort: bool,
    /// Print a JSON summary (bytes, blocks, seconds)
    #[arg(long)]
    json: bool,
}

fn progress_bar(json: bool, what: &str) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    use std::io::IsTerminal;
    let bar = ProgressBar::new(0);
    if json || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

pub(super) fn cmd_send(keys: &KeyArgs, a: SendArgs) -> Result<()> {
    use std::io::IsTerminal;
    let resume = a
        .resume
        .as_deref()
        .map(parse_resume_token)
        .transpose()
        .map_err(|e| CliError::usage(e.to_string()))?;
    if a.output.is_none() && std::io::stdout().is_terminal() {
        return Err(CliError::usage(
            "refusing to write a binary stream to a terminal: pipe it (`kmsfs send VOLUME SNAP | \
             kmsfs receive TARGET`) or give -o FILE",
        ));
    }
    let (vol, _kms, dir) = open_read_only(keys, &a.volume_dir)?;
    let mut out: Box<dyn Write> = match &a.output {
        Some(p) => Box::new(
            FsOpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(p)
                .map_err(|e| CliError::error(format!("{}: {e}", p.display())))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut out);
    let bar = progress_bar(a.json, "sending");
    let t = Instant::now();
    let r = vol.send(
        &a.snapshot,
        a.from.as_deref(),
        &SendOptions {
            resume,
            robust: a.robust,
        },
        &mut out,
        &|done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    );
    bar.finish_and_clear();
    let s = r?;
    drop(out);
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        eprintln!(
            "{}",
            serde_json::json!({
                "volume": dir.display().to_string(),
                "snapshot": a.snapshot,
                "base": a.from,
                "stream_bytes": s.stream_bytes,
                "blocks": s.blocks,
                "block_bytes": s.block_bytes,
                "refs": s.refs,
                "frames": s.frames,
                "skipped_frames": s.skipped_frames,
                "compact": s.compact,
                "seconds": secs,
            })
        );
    } else {
        eprintln!(
            "sent snapshot {}{} of {}: {} in {} records ({} referenced from the base) in {:.1} s",
            a.snapshot,
            a.from
                .as_deref()
                .map(|b| format!(" (from {b})"))
                .unwrap_or_default(),
            dir.display(),
            human(s.stream_bytes),
            s.blocks,
            s.refs,
            secs
        );
    }
    Ok(())
}

pub(super) fn cmd_receive(a: ReceiveArgs) -> Result<()> {
    let dir = &a.target_dir;
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| CliError::error(format!("{}: {e}", dir.display())))?;
    }
    // Not check_volume: an empty directory is a fine target.
    let dir = fs::canonicalize(dir)
        .map_err(|e| CliError::error(format!("target directory {}: {e}", dir.display())))?;
    if !dir.is_dir() {
        return Err(CliError::error(format!(
            "{} is not a directory; give a directory for the received volume",
            dir.display()
        )));
    }
    let storage = Arc::new(FsStorage::new(&dir));
    if a.token {
        return match receive::resume_token(&*storage)? {
            Some(t) => {
                println!("{t}");
                Ok(())
            }
            None => Err(CliError::error(format!(
                "{} has no interrupted receive",
                dir.display()
            ))),
        };
    }
    if a.abort {
        let had = receive::abort_receive(&*storage)?;
        println!(
            "{}: {}",
            dir.display(),
            if had {
                "interrupted receive discarded; the volume is as it was"
            } else {
                "no interrupted receive"
            }
        );
        return Ok(());
    }
    let mut input: Box<dyn Read> = match &a.input {
        Some(p) => {
            Box::new(File::open(p).map_err(|e| CliError::error(format!("{}: {e}", p.display())))?)
        }
        None => Box::new(std::io::stdin().lock()),
    };
    let mut input = std::io::BufReader::with_capacity(1 << 20, &mut input);
    let bar = progress_bar(a.json, "receiving");
    let t = Instant::now();
    let r = receive::receive(
        storage,
        &mut input,
        &ReceiveOptions { resume: a.resume },
        &|done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    );
    bar.finish_and_clear();
    let s = r?;
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "target": dir.display().to_string(),
                "incremental": s.incremental,
                "stream_bytes": s.stream_bytes,
                "blocks": s.blocks,
                "block_bytes": s.block_bytes,
                "refs": s.refs,
                "copied": s.copied,
                "snapshots": s.snapshots,
                "resumed_from": s.resumed_from,
                "seconds": secs,
            })
        );
    } else {
        println!(
            "received {} stream into {}: {} in {} records ({} from the base, {} moved) in {:.1} s; \
             it holds {} snapshot(s); mount it with `kmsfs mount --read-only`",
            if s.incremental {
                "an incremental"
            } else {
                "a full"
            },
            dir.display(),
            human(s.stream_bytes),
            s.blocks,
            s.refs,
            s.copied,
            secs,
            s.snapshots
        );
    }
    Ok(())
}
