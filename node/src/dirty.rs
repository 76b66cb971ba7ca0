//! The folder's dirty paths, and when each is rescanned.
//!
//! The watcher only says where something happened and whether the event says the
//! change is complete ([`Change::Settled`]: a file closed after writing, a rename, a
//! delete, a new directory) or may still be going on ([`Change::Open`]: data written to
//! a file that is still open, a new file, anything else). A path whose last event was
//! settled is rescanned after [`SETTLED_QUIET`] (a burst, such as a checkout, still
//! becomes one scan): an editor's atomic save or a closed file reaches peers without
//! waiting out the debounce. A path still open waits for `debounce` without events,
//! as before. Either kind waits at most [`MAX_DEBOUNCE_FACTOR`] debounce periods after
//! its first event, so that a file written without pause is still scanned now and then.
//!
//! The two kinds are kept apart so that a file being written for minutes does not hold
//! back a document saved beside it. Invariant: a path is in at most one of the two
//! sets (its latest event decides). A lost-events signal (or too many dirty paths)
//! becomes one full scan, timed like an open change.
//!
//! Pure: the caller passes `now`, which keeps the rules testable without sleeping.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use weft_protocol::RelPath;

/// Quiet time after a settled event before its paths are scanned (at most the
/// debounce): enough to gather a burst of saves into one scan.
pub const SETTLED_QUIET: Duration = Duration::from_millis(20);
/// A burst of events delays its scan by at most this many debounce periods.
pub const MAX_DEBOUNCE_FACTOR: u32 = 5;
/// Dirty paths beyond which a full scan is cheaper than a scan of each path.
pub const MAX_DIRTY_PATHS: usize = 10_000;

/// What a watcher event says about the change it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The change is complete (close after write, rename, delete, new directory).
    Settled,
    /// The change may go on (data written to an open file, a new file, other events).
    Open,
}

/// What is due for a rescan.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    /// Everything (events were lost, or too many paths are dirty).
    Full,
    /// These paths (in order; nested ones not collapsed).
    Paths(BTreeSet<RelPath>),
}

/// Paths of one kind and the times of their first and latest events.
#[derive(Debug, Default)]
struct Batch {
    paths: BTreeSet<RelPath>,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Batch {
    fn touch(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    fn deadline(&self, quiet: Duration, cap: Duration) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        Some((last + quiet).min(first + cap))
    }

    fn clear(&mut self) {
        *self = Batch::default();
    }
}

/// The dirty paths of one folder (see the module doc).
#[derive(Debug)]
pub struct DirtyPaths {
    debounce: Duration,
    settled: Batch,
    /// Paths still open; its times also time a pending full scan.
    open: Batch,
    full: bool,
}

impl DirtyPaths {
    /// No dirty paths; open changes wait `debounce`.
    pub fn new(debounce: Duration) -> Self {
        DirtyPaths {
            debounce,
            settled: Batch::default(),
            open: Batch::default(),
            full: false,
        }
    }

    /// Records an event of kind `change` on `path` at `now`.
    pub fn mark(&mut self, path: RelPath, change: Change, now: Instant) {
        if self.full {
            self.open.touch(now);
            return;
        }
        // The latest event decides which batch the path is in.
        let (to, from) = match change {
            Change::Settled => (&mut self.settled, &mut self.open),
            Change::Open => (&mut self.open, &mut self.settled),
        };
        from.paths.remove(&path);
        if from.paths.is_empty() {
            from.clear();
        }
        to.paths.insert(path);
        to.touch(now);
        if self.settled.paths.len() + self.open.paths.len() > MAX_DIRTY_PATHS {
            self.mark_full(now);
        }
    }

    /// Events were lost (or the folder root changed): a full scan, timed like an open
    /// change.
    pub fn mark_full(&mut self, now: Instant) {
        self.full = true;
        self.settled.clear();
        self.open.paths.clear();
        self.open.touch(now);
    }

    fn settled_deadline(&self) -> Option<Instant> {
        self.settled.deadline(
            SETTLED_QUIET.min(self.debounce),
            self.debounce * MAX_DEBOUNCE_FACTOR,
        )
    }

    fn open_deadline(&self) -> Option<Instant> {
        self.open
            .deadline(self.debounce, self.debounce * MAX_DEBOUNCE_FACTOR)
    }

    /// When the next scan is due, if anything is dirty.
    pub fn deadline(&self) -> Option<Instant> {
        match (self.settled_deadline(), self.open_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Takes what is due at `now` (and forgets it), or `None`.
    pub fn take_due(&mut self, now: Instant) -> Option<Due> {
        let open_due = self.open_deadline().is_some_and(|d| d <= now);
        if self.full {
            if !open_due {
                return None;
            }
            self.full = false;
            self.open.clear();
            return Some(Due::Full);
        }
        let settled_due = self.settled_deadline().is_some_and(|d| d <= now);
        let mut paths = BTreeSet::new();
        if settled_due {
            paths.append(&mut self.settled.paths);
            self.settled.clear();
        }
        if open_due {
            paths.append(&mut self.open.paths);
            self.open.clear();
        }
        (!paths.is_empty()).then_some(Due::Paths(paths))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBOUNCE: Duration = Duration::from_millis(200);

    fn path(text: &str) -> RelPath {
        RelPath::new(text).expect("valid path")
    }

    fn paths(list: &[&str]) -> Due {
        Due::Paths(list.iter().map(|p| path(p)).collect())
    }

    #[test]
    fn a_settled_change_is_scanned_after_the_short_quiet() {
        let t0 = Instant::now();
        let mut dirty = DirtyPaths::new(DEBOUNCE);
        assert_eq!(dirty.deadline(), None);
        dirty.mark(path("saved.txt"), Change::Settled, t0);
        assert_eq!(dirty.deadline(), Some(t0 + SETTLED_QUIET));
        assert_eq!(dirty.take_due(t0 + SETTLED_QUIET / 2), None);
        assert_eq!(
            dirty.take_due(t0 + SETTLED_QUIET),
            Some(paths(&["saved.txt"]))
        );
        assert_eq!(dirty.deadline(), None, "taken paths are forgotten");
    }

    #[test]
    fn an_open_change_waits_for_the_debounce_and_is_settled_by_its_close() {
        let t0 = Instant::now();
        let mut dirty = DirtyPaths::new(DEBOUNCE);
        dirty.mark(path("big.bin"), Change::Open, t0);
        assert_eq!(dirty.deadline(), Some(t0 + DEBOUNCE));
        assert_eq!(dirty.take_due(t0 + SETTLED_QUIET), None);
        // The writer closes the file: its latest event decides.
        let t1 = t0 + Duration::from_millis(50);
        dirty.mark(path("big.bin"), Change::Settled, t1);
        assert_eq!(dirty.deadline(), Some(t1 + SETTLED_QUIET));
        assert_eq!(
            dirty.take_due(t1 + SETTLED_QUIET),
            Some(paths(&["big.bin"]))
        );
        // Written again after the close: open again.
        let t2 = t1 + Duration::from_millis(100);
        dirty.mark(path("big.bin"), Change::Settled, t2);
        dirty.mark(path("big.bin"), Change::Open, t2);
        assert_eq!(dirty.deadline(), Some(t2 + DEBOUNCE));
    }

    #[test]
    fn a_file_written_for_long_does_not_hold_back_a_save_beside_it() {
        let t0 = Instant::now();
        let mut dirty = DirtyPaths::new(DEBOUNCE);
        dirty.mark(path("download.iso"), Change::Open, t0);
        let t1 = t0 + Duration::from_millis(10);
        dirty.mark(path("notes.txt"), Change::Settled, t1);
        dirty.mark(path("download.iso"), Change::Open, t1);
        assert_eq!(
            dirty.take_due(t1 + SETTLED_QUIET),
            Some(paths(&["notes.txt"]))
        );
        // The download keeps writing every 100 ms: it is scanned at the cap.
        let mut now = t0;
        let mut scanned_at = None;
        while scanned_at.is_none() && now < t0 + DEBOUNCE * 10 {
            now += Duration::from_millis(100);
            if let Some(due) = dirty.take_due(now) {
                assert_eq!(due, paths(&["download.iso"]));
                scanned_at = Some(now);
            }
            dirty.mark(path("download.iso"), Change::Open, now);
        }
        assert_eq!(scanned_at, Some(t0 + DEBOUNCE * MAX_DEBOUNCE_FACTOR));
    }

    #[test]
    fn a_burst_of_saves_is_one_scan_capped_by_the_debounce_factor() {
        let t0 = Instant::now();
        let mut dirty = DirtyPaths::new(DEBOUNCE);
        let mut now = t0;
        let mut due = None;
        for index in 0..200 {
            dirty.mark(path(&format!("f{index}")), Change::Settled, now);
            now += SETTLED_QUIET / 2;
            if let Some(taken) = dirty.take_due(now) {
                due = Some((taken, now));
                break;
            }
        }
        let (taken, at) = match due {
            Some((Due::Paths(taken), at)) => (taken, at),
            other => panic!("the burst was not scanned as paths: {other:?}"),
        };
        assert_eq!(at, t0 + DEBOUNCE * MAX_DEBOUNCE_FACTOR);
        assert_eq!(taken.len(), 100, "every save before the cap, in one scan");
    }

    #[test]
    fn lost_events_become_one_full_scan_after_the_debounce() {
        let t0 = Instant::now();
        let mut dirty = DirtyPaths::new(DEBOUNCE);
        dirty.mark(path("a"), Change::Settled, t0);
        dirty.mark_full(t0);
        dirty.mark(path("b"), Change::Settled, t0);
        assert_eq!(dirty.take_due(t0 + SETTLED_QUIET), None);
        assert_eq!(dirty.take_due(t0 + DEBOUNCE), Some(Due::Full));
        assert_eq!(dirty.deadline(), None);
        // Too many dirty paths: a full scan too.
        for index in 0..=MAX_DIRTY_PATHS {
            dirty.mark(path(&format!("f{index}")), Change::Settled, t0);
        }
        assert_eq!(dirty.take_due(t0 + DEBOUNCE), Some(Due::Full));
    }

    #[test]
    fn a_zero_debounce_scans_at_once() {
        let t0 = Instant::now();
        let mut dirty = DirtyPaths::new(Duration::ZERO);
        dirty.mark(path("a"), Change::Settled, t0);
        dirty.mark(path("b"), Change::Open, t0);
        assert_eq!(dirty.take_due(t0), Some(paths(&["a", "b"])));
    }
}
