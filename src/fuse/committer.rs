//! The daemon's background thread (commits, the idle merge, the cleaner);
//! its lifetime is the session's: started in `init`, stopped in `destroy`.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::volume::{self, Volume};

/// Pending changes are committed once no changing request has started for
/// this long: `sync` and `syncfs` send the daemon nothing but the dirty pages,
/// so this bounds how long after them data stays volatile.
pub const IDLE_COMMIT: Duration = Duration::from_millis(500);
/// Under a steady stream of changes, a commit at least this often (ext4's
/// default journal commit interval).
pub const COMMIT_INTERVAL: Duration = Duration::from_secs(5);
/// How often the committer looks at the volume.
const COMMITTER_TICK: Duration = Duration::from_millis(100);
/// How long a mount must see no reads or writes before fragmented blocks are
/// merged, and how many blocks a committer tick merges.
const IDLE_MERGE: Duration = Duration::from_secs(2);
const MERGE_BATCH: usize = 256;
/// How long the committer waits after a failed background write-back
/// before it tries again (commits and writers past the limit still do).
const WRITE_BACK_RETRY: Duration = Duration::from_secs(1);
/// How often the committer runs the segment cleaner.
pub const CLEAN_INTERVAL: Duration = Duration::from_secs(300);
/// Segments whose live share is below this are compacted by the cleaner.
const CLEAN_MAX_LIVE: f64 = 0.5;

/// The daemon's background thread: commits pending changes once they have
/// been idle for [`IDLE_COMMIT`] (or after [`COMMIT_INTERVAL`] of steady
/// changes), and runs the cleaner every [`CLEAN_INTERVAL`].
pub(super) struct Committer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: JoinHandle<()>,
}

impl Committer {
    pub(super) fn start(vol: Arc<Volume>) -> Self {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s = stop.clone();
        let handle = std::thread::Builder::new()
            .name("kmsfs-commit".into())
            .spawn(move || Self::run(&vol, &s))
            .expect("spawning the commit thread");
        Committer { stop, handle }
    }

    fn run(vol: &Volume, stop: &(Mutex<bool>, Condvar)) {
        let mut last_clean = Instant::now();
        // When the committer first saw the changes now pending.
        let mut pending_since: Option<Instant> = None;
        // A background write-back that failed (a full store, say) waits.
        let mut wb_retry = Retry::default();
        let mut stopped = stop.0.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if !*stopped {
                stopped = stop
                    .1
                    .wait_timeout(stopped, COMMITTER_TICK)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if *stopped {
                return;
            }
            drop(stopped);
            match vol.idle_for() {
                None => pending_since = None,
                Some(idle) => {
                    let since = *pending_since.get_or_insert_with(Instant::now);
                    if idle >= IDLE_COMMIT || since.elapsed() >= COMMIT_INTERVAL {
                        pending_since = None;
                        Self::contained(vol, "periodic commit", || match vol.commit() {
                            Ok(()) => {}
                            Err(e) => log::warn!("periodic commit failed (will retry): {e}"),
                        });
                    }
                }
            }
            // New data is sealed beside the writes that keep coming,
            // without the volume lock while it is sealed.
            if wb_retry.due(Instant::now()) && vol.write_back_due() {
                Self::contained(vol, "write-back", || match vol.write_back_new_data() {
                    Ok(()) => wb_retry.succeeded(),
                    Err(e) => {
                        if wb_retry.failed(Instant::now(), WRITE_BACK_RETRY) {
                            log::warn!(
                                "background write-back failed (the data stays buffered; \
                                 retrying every {} s): {e}",
                                WRITE_BACK_RETRY.as_secs()
                            );
                        }
                    }
                });
            }
            // A quiet mount folds fragmented blocks into whole ones, a batch
            // per tick, so later cold reads cost one record per block.
            if vol.idle_for().is_none() && vol.quiet_for() >= IDLE_MERGE {
                Self::contained(vol, "fragment merge", || {
                    match vol.merge_idle_fragments(MERGE_BATCH) {
                        Ok(0) => {}
                        Ok(n) => {
                            log::info!("idle merge: {n} fragmented blocks merged into whole blocks")
                        }
                        Err(e) => log::warn!("merging fragmented blocks failed (will retry): {e}"),
                    }
                });
            }
            // A full store with space freed since: clean now (at most once
            // per COMMITTER_TICK * 10), so writes work again within seconds.
            let pressed = vol.wants_clean() && last_clean.elapsed() >= COMMITTER_TICK * 10;
            if pressed || last_clean.elapsed() >= CLEAN_INTERVAL {
                last_clean = Instant::now();
                Self::contained(vol, "cleaner", || match vol.clean(CLEAN_MAX_LIVE) {
                    Ok(s) if s.segments_removed > 0 => log::info!(
                        "cleaner: removed {} segments, moved {} blocks ({} bytes), freed {} bytes",
                        s.segments_removed,
                        s.blocks_moved,
                        s.bytes_moved,
                        s.bytes_freed
                    ),
                    Ok(_) => {}
                    Err(e) => log::warn!("cleaner failed (will retry): {e}"),
                });
            }
            stopped = stop.0.lock().unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Runs background work so that a panic in it is contained like a
    /// request's (see [`KmsFs::contain`]) instead of ending the committer.
    fn contained(vol: &Volume, what: &str, f: impl FnOnce()) {
        if let Err(p) = std::panic::catch_unwind(AssertUnwindSafe(f)) {
            vol.contain_panic(what, true, &volume::panic_message(&*p));
        }
    }

    pub(super) fn stop(self) {
        *self.stop.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.stop.1.notify_all();
        if self.handle.join().is_err() {
            log::error!("the commit thread panicked");
        }
    }
}

/// When a background job that failed may run again: a while after its last
/// failure, and the failure is worth a log line only as the first of a streak.
#[derive(Debug, Default)]
struct Retry {
    at: Option<Instant>,
}

impl Retry {
    /// Whether the job may run at `now`.
    fn due(&self, now: Instant) -> bool {
        self.at.is_none_or(|t| now >= t)
    }

    /// A failure at `now`: the next try waits `wait`. True for the first
    /// failure since the last success (the one to log).
    fn failed(&mut self, now: Instant, wait: Duration) -> bool {
        let first = self.at.is_none();
        self.at = Some(now + wait);
        first
    }

    fn succeeded(&mut self) {
        self.at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_job_waits_before_it_runs_again_and_is_logged_once_per_streak() {
        let t0 = Instant::now();
        let wait = Duration::from_secs(1);
        let mut r = Retry::default();
        assert!(r.due(t0), "a job that never failed runs at once");
        assert!(r.failed(t0, wait), "the first failure is logged");
        assert!(!r.due(t0), "not again at once");
        assert!(!r.due(t0 + wait / 2), "nor before the wait is over");
        assert!(r.due(t0 + wait), "again once it is over");
        assert!(
            !r.failed(t0 + wait, wait),
            "a failure in the same streak is not logged again"
        );
        assert!(
            !r.due(t0 + wait + wait / 2),
            "each failure restarts the wait"
        );
        assert!(r.due(t0 + 2 * wait));
        r.succeeded();
        assert!(
            r.due(t0 + 2 * wait),
            "after a success it runs at every tick"
        );
        assert!(
            r.failed(t0 + 3 * wait, wait),
            "the first failure after a success starts a new streak, logged"
        );
    }
}
