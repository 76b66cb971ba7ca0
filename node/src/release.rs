//! Freeing replaced and deleted large files off the folder actor's thread.
//!
//! When a rename replaces a file, or an unlink removes one, whose inode has no other
//! name, the kernel frees its blocks and drops its cached pages inside that call
//! unless the file is still open somewhere. For a 256 MiB file that is ~60 ms on the
//! bench machine (ext4), during which the folder actor can neither put the next
//! downloads into place nor answer its peers. Holding the old file open across the
//! rename or unlink moves that work to the last `close`, which [`release_later`] makes
//! on a thread of its own. The new name is visible, and the old content unreachable
//! by path, the moment the rename or unlink returns either way.

use std::fs::File;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

/// Files from this size on are held open and released on the release thread; smaller
/// ones are freed in place (the open would cost about what it saves).
pub const RELEASE_LATER_MIN: u64 = 8 * 1024 * 1024;

/// Opens the file at `path` if it is a large regular file, so that replacing or
/// removing it leaves the freeing of its content to [`release_later`].
pub fn hold_if_large(path: &Path, size: u64) -> Option<File> {
    if size < RELEASE_LATER_MIN {
        return None;
    }
    let file = File::open(path).ok()?;
    file.metadata()
        .is_ok_and(|metadata| metadata.is_file())
        .then_some(file)
}

/// Closes `file` on the release thread (in place if that thread cannot be started).
pub fn release_later(file: File) {
    static SENDER: OnceLock<Option<Mutex<mpsc::Sender<File>>>> = OnceLock::new();
    let sender = SENDER.get_or_init(|| {
        let (sender, receiver) = mpsc::channel::<File>();
        std::thread::Builder::new()
            .name("weft-release".into())
            .spawn(move || {
                for file in receiver {
                    drop(file);
                }
            })
            .ok()
            .map(|_| Mutex::new(sender))
    });
    if let Some(sender) = sender {
        let sender = sender.lock().unwrap_or_else(|p| p.into_inner());
        // A send fails only if the thread is gone: the file is then closed here.
        let _ = sender.send(file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_file_outlives_its_name_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        let file = File::create(&big).unwrap();
        file.set_len(RELEASE_LATER_MIN).unwrap();
        drop(file);
        let small = dir.path().join("small");
        std::fs::write(&small, b"x").unwrap();
        assert!(
            hold_if_large(&small, 1).is_none(),
            "small files are not held"
        );
        assert!(hold_if_large(&dir.path().join("gone"), RELEASE_LATER_MIN).is_none());
        assert!(
            hold_if_large(dir.path(), RELEASE_LATER_MIN).is_none(),
            "not a directory"
        );
        let held = hold_if_large(&big, RELEASE_LATER_MIN).expect("a large file is held");
        std::fs::remove_file(&big).unwrap();
        assert!(!big.exists(), "the name is gone at once");
        // Still readable through the held handle until it is released.
        assert_eq!(held.metadata().unwrap().len(), RELEASE_LATER_MIN);
        release_later(held);
    }
}
