//! Block fill: after a small READ the rest of each block it touched goes to
//! the kernel's page cache (FUSE_NOTIFY_STORE), from a thread of its own.
//!
//! kmsfs seals whole blocks (64 KiB by default), so a 4 KiB read from the
//! disk has opened the whole block anyway, and the block is in the daemon's
//! cache. Without the fill, the next 4 KiB read of the same block costs a
//! full FUSE round trip (random readers disable the kernel's readahead); with
//! it, a page-cache hit. Large reads (readahead, sequential readers) cover
//! whole blocks and fill nothing.
//!
//! A store overwrites whatever the page cache holds, dirty pages included.
//! With the write-back cache the kernel keeps writes that the daemon has not
//! seen yet, so a fill must never land while such pages can exist:
//! - only inodes with no writable handle are filled: pages are dirtied only
//!   through a writable descriptor or mapping, and the kernel writes every
//!   dirty page back before it sends the RELEASE of the last one;
//! - a writable open (OPEN, CREATE) or a size change (SETATTR) of an inode
//!   whose fill is under way is answered only once that fill has reached the
//!   kernel, so no write can start before it (and a truncation's page-cache
//!   cut follows the fill). The answer is handed to the fill thread, not
//!   waited for: a request thread never waits on a fill, and a fill that
//!   waits for a page locked by a READ always finds a thread to answer it.
//!
//! The filled bytes are what the daemon serves for that range at that moment
//! (read through [`Volume::read_into`], verified like every read) and stop at
//! the file's size, so a store never grows the kernel's idea of it.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use fuser::{INodeNo, Notifier};

use crate::volume::Volume;

/// Blocks waiting for a fill at most; more are dropped (a fill is an
/// optimisation: a dropped one costs a later READ, nothing else).
const QUEUE_MAX: usize = 64;
/// Largest block size filled: a bigger block costs more to copy than the
/// round trips it saves for a small reader.
pub const MAX_FILL_BLOCK: u32 = 256 << 10;

/// A reply (or other work) held back until the fill under way has reached
/// the kernel.
pub(super) type Deferred = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    /// (inode, block) to fill, oldest first.
    queue: VecDeque<(u64, u64)>,
    /// Writable handles per inode (OPEN/CREATE for writing, until RELEASE).
    writers: HashMap<u64, u32>,
    /// The inode whose fill is under way.
    busy: Option<u64>,
    /// Held back until `busy` clears.
    deferred: Vec<Deferred>,
    stop: bool,
}

struct Shared {
    st: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The fill thread and the writer accounting that keeps it safe.
pub(super) struct Filler {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl Filler {
    pub(super) fn start(vol: Arc<Volume>, notifier: Arc<OnceLock<Notifier>>) -> Self {
        let shared = Arc::new(Shared {
            st: Mutex::new(State::default()),
            cv: Condvar::new(),
        });
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("kmsfs-fill".into())
            .spawn(move || run(&vol, &notifier, &s))
            .map_err(|e| log::warn!("no block fill (cannot start its thread: {e})"))
            .ok();
        Filler { shared, handle }
    }

    /// A small read of `ino` touched blocks `first..=last`: fill them unless
    /// the inode has a writer (or the queue is full).
    pub(super) fn after_read(&self, ino: u64, first: u64, last: u64) {
        if self.handle.is_none() {
            return;
        }
        let mut st = self.shared.lock();
        if st.stop || st.writers.contains_key(&ino) {
            return;
        }
        for blk in first..=last {
            if st.queue.len() >= QUEUE_MAX {
                break;
            }
            if !st.queue.contains(&(ino, blk)) {
                st.queue.push_back((ino, blk));
            }
        }
        drop(st);
        self.shared.cv.notify_one();
    }

    /// A writable handle of `ino` was opened: no fill of `ino` starts from
    /// now on, and `reply` runs now, or once the fill under way for `ino`
    /// has reached the kernel.
    pub(super) fn writer_opened(&self, ino: u64, reply: Deferred) {
        let mut st = self.shared.lock();
        *st.writers.entry(ino).or_insert(0) += 1;
        st.queue.retain(|&(i, _)| i != ino);
        self.after_fill_locked(st, ino, reply);
    }

    /// A writable handle of `ino` was released.
    pub(super) fn writer_closed(&self, ino: u64) {
        let mut st = self.shared.lock();
        if let Some(n) = st.writers.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                st.writers.remove(&ino);
            }
        }
    }

    /// `reply` (of a request that changed `ino`'s size) runs now, or once the
    /// fill under way for `ino` has reached the kernel. Queued fills of `ino`
    /// are dropped: they would read the new size anyway, but need not run.
    pub(super) fn after_fill(&self, ino: u64, reply: Deferred) {
        let mut st = self.shared.lock();
        st.queue.retain(|&(i, _)| i != ino);
        self.after_fill_locked(st, ino, reply);
    }

    fn after_fill_locked(&self, mut st: MutexGuard<'_, State>, ino: u64, reply: Deferred) {
        if st.busy == Some(ino) {
            st.deferred.push(reply);
        } else {
            drop(st);
            reply();
        }
    }

    /// Ends the fill thread (at unmount); held-back replies run first.
    pub(super) fn stop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.cv.notify_all();
        if let Some(h) = self.handle.take()
            && h.join().is_err()
        {
            log::error!("the block fill thread panicked");
        }
        let rest = std::mem::take(&mut self.shared.lock().deferred);
        rest.into_iter().for_each(|f| f());
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(vol: &Volume, notifier: &OnceLock<Notifier>, s: &Shared) {
    let bs = vol.block_size() as u64;
    let mut buf = zeroize::Zeroizing::new(vec![0u8; bs as usize]);
    loop {
        let (ino, blk) = {
            let mut st = s.lock();
            loop {
                if st.stop {
                    return;
                }
                match st.queue.pop_front() {
                    Some((ino, _)) if st.writers.contains_key(&ino) => continue,
                    // Marked busy under the same lock that saw no writer:
                    // a writable open from now on waits for this fill.
                    Some(job) => {
                        st.busy = Some(job.0);
                        break job;
                    }
                    None => st = s.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                }
            }
        };
        // Whatever happens, the held-back replies must run.
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            fill(vol, notifier, &mut buf, ino, blk, bs)
        }));
        if r.is_err() {
            log::error!("block fill of inode {ino} block {blk} panicked");
        }
        let held = {
            let mut st = s.lock();
            st.busy = None;
            std::mem::take(&mut st.deferred)
        };
        held.into_iter().for_each(|f| f());
    }
}

/// Stores block `blk` of `ino`, as far as the file goes, in the page cache.
fn fill(vol: &Volume, notifier: &OnceLock<Notifier>, buf: &mut [u8], ino: u64, blk: u64, bs: u64) {
    let Some(n) = notifier.get() else { return };
    let Some(at) = blk.checked_mul(bs) else {
        return;
    };
    let len = match vol.read_into(ino, at, buf) {
        Ok(len) => len,
        Err(e) => {
            log::debug!("block fill of inode {ino} block {blk}: {e}");
            return;
        }
    };
    let Some(bytes) = buf.get(..len).filter(|b| !b.is_empty()) else {
        return;
    };
    if let Err(e) = n.store(INodeNo(ino), at, bytes) {
        log::debug!("block fill of inode {ino} block {blk}: {e}");
    }
}
