//! Racily clean files: when a file's metadata cannot be trusted to show a write.
//!
//! A file hashed while its mtime is within the filesystem's timestamp granularity of
//! the hash ([`racy_window`]) is *racy*: a write of the same size right after the hash
//! can get the very same mtime (FAT keeps even seconds, HFS+ and ext3 whole seconds,
//! ext4 before Linux 6.13 one clock tick), and then size, mtime and inode all say
//! "unchanged". Git calls these entries "racily clean". The folder marks their rows in
//! the store, hashes them again once the window has passed, and checks their bytes
//! before replacing or deleting them (`folder::plan`).

use std::time::Duration;

/// Timestamp granularity assumed for an mtime with a fraction of a second: above the
/// longest Linux clock tick (10 ms), exFAT's 10 ms, and what NTFS and APFS keep.
pub const FINE_RACY_WINDOW: Duration = Duration::from_millis(100);
/// Timestamp granularity assumed for an mtime of whole seconds: FAT's two seconds
/// (HFS+ and ext3 keep one).
pub const COARSE_RACY_WINDOW: Duration = Duration::from_secs(2);

/// Earliest a racy file is hashed again after the scan that found it racy: well past
/// the transfers that scan started (at 1 s, the second hash of a just-edited 256 MiB
/// file competed with the peer's rebuild of it in the delta benchmark), and soon
/// enough for a write that only its bytes show.
pub const RACY_RECHECK_AFTER: Duration = Duration::from_secs(5);

/// How long after `mtime_ns` a write of the same size could still get the same mtime:
/// [`COARSE_RACY_WINDOW`] for whole seconds, else [`FINE_RACY_WINDOW`].
pub fn racy_window(mtime_ns: i64) -> Duration {
    if mtime_ns % 1_000_000_000 == 0 {
        COARSE_RACY_WINDOW
    } else {
        FINE_RACY_WINDOW
    }
}

/// Whether a file with `mtime_ns`, hashed from `hashed_at_ns` on, is racy: its mtime is
/// within its [`racy_window`] of the hash, on either side (a filesystem's clock may run
/// a little ahead of ours; an mtime further ahead is no sign of a recent write).
pub fn is_racy(mtime_ns: i64, hashed_at_ns: i64) -> bool {
    let window = i64::try_from(racy_window(mtime_ns).as_nanos()).unwrap_or(i64::MAX);
    mtime_ns.abs_diff(hashed_at_ns) < window.unsigned_abs()
}

/// How long after it was found a racy file is hashed again: once its `window` (the
/// timestamp granularity) has passed, at the earliest after [`RACY_RECHECK_AFTER`], and
/// no sooner than the scan that found it `took` (a file written without pause then
/// costs at most one more hash per scan).
pub fn racy_recheck_delay(window: Duration, took: Duration) -> Duration {
    window.max(RACY_RECHECK_AFTER).max(took)
}

/// A duration in ns, as the folder's clock counts (saturating).
pub fn nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_seconds_get_the_coarse_window() {
        assert_eq!(racy_window(3_000_000_000), COARSE_RACY_WINDOW);
        assert_eq!(racy_window(3_000_000_001), FINE_RACY_WINDOW);
    }

    #[test]
    fn racy_is_within_the_window_on_either_side() {
        let mtime = 10_000_000_001;
        assert!(is_racy(mtime, mtime + 50_000_000));
        assert!(is_racy(mtime, mtime - 50_000_000));
        assert!(!is_racy(mtime, mtime + 200_000_000));
        assert!(is_racy(10_000_000_000, 11_500_000_000));
        assert!(!is_racy(10_000_000_000, 12_500_000_000));
    }

    #[test]
    fn a_recheck_waits_for_the_window_the_minimum_and_the_scan() {
        let long = Duration::from_secs(9);
        assert_eq!(
            racy_recheck_delay(COARSE_RACY_WINDOW, Duration::ZERO),
            RACY_RECHECK_AFTER
        );
        assert_eq!(racy_recheck_delay(COARSE_RACY_WINDOW, long), long);
    }
}
