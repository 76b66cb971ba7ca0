//! The version store: blocks of file versions that remote changes replaced or deleted.
//!
//! Before the node overwrites or deletes a local file because a peer changed it, the
//! file's blocks are copied here, content-addressed (`versions/ab/abcdef...`), so a
//! block kept twice is stored once. `weft restore` and downloads read blocks back from
//! here (verified, like any block). Old blocks are pruned after the retention period
//! (30 days by default); the file's mtime is when it was (last) kept.
//!
//! The document's history says which versions existed; this store (plus every local
//! file and every peer) is where their bytes may still be found.

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use weft_protocol::{BlockHash, Manifest};

/// Directory of the version store inside the node home.
pub const VERSIONS_DIR: &str = "versions";
/// Default retention of kept blocks.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// A content-addressed store of old blocks.
#[derive(Clone, Debug)]
pub struct VersionStore {
    dir: PathBuf,
}

impl VersionStore {
    /// The store in `home`.
    pub fn new(home: &Path) -> Self {
        Self {
            dir: home.join(VERSIONS_DIR),
        }
    }

    fn block_path(&self, hash: &BlockHash) -> PathBuf {
        let hex = hash.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Keeps the blocks of `file` (whose content is `manifest`) that verify, except
    /// those in `still_present` (the new version has them); returns the bytes newly
    /// stored. A block that no longer matches (the file changed) is skipped: only
    /// content that was really there is kept. Blocks are not fsynced one by one: a
    /// crash may lose a kept version, never a current file (and a block a power loss
    /// cut short is written again the next time it is kept).
    pub fn keep_file(
        &self,
        file: &Path,
        manifest: &Manifest,
        still_present: &std::collections::HashSet<BlockHash>,
    ) -> std::io::Result<u64> {
        let source = fs::File::open(file)?;
        let mut stored = 0;
        let mut buffer = Vec::new();
        for (offset, block) in manifest.blocks_with_offsets() {
            if still_present.contains(&block.hash) {
                continue;
            }
            let target = self.block_path(&block.hash);
            // A block of the wrong length (cut short by a power loss: kept blocks are not
            // fsynced) is written again rather than trusted by its name.
            if fs::metadata(&target).is_ok_and(|m| m.len() == u64::from(block.len)) {
                // Refresh its age: it was just kept again.
                let _ = fs::File::options()
                    .write(true)
                    .open(&target)
                    .and_then(|f| f.set_modified(SystemTime::now()));
                continue;
            }
            buffer.resize(block.len as usize, 0);
            if source.read_exact_at(&mut buffer, offset).is_err()
                || BlockHash::of(&buffer) != block.hash
            {
                continue;
            }
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)?;
            }
            let temp = target.with_extension("tmp");
            let mut out = fs::File::create(&temp)?;
            out.write_all(&buffer)?;
            fs::rename(&temp, &target)?;
            stored += u64::from(block.len);
        }
        Ok(stored)
    }

    /// Whether a block is kept (unverified: [`VersionStore::block`] checks it).
    pub fn contains(&self, hash: &BlockHash) -> bool {
        self.block_path(hash).is_file()
    }

    /// A kept block, verified.
    pub fn block(&self, hash: &BlockHash) -> Option<Vec<u8>> {
        let data = fs::read(self.block_path(hash)).ok()?;
        (BlockHash::of(&data) == *hash).then_some(data)
    }

    /// Deletes blocks kept longer ago than `retention`; returns how many.
    pub fn prune(&self, retention: Duration) -> usize {
        let Some(cutoff) = SystemTime::now().checked_sub(retention) else {
            return 0;
        };
        let mut removed = 0;
        let Ok(shards) = fs::read_dir(&self.dir) else {
            return 0;
        };
        for shard in shards.flatten() {
            let Ok(blocks) = fs::read_dir(shard.path()) else {
                continue;
            };
            for block in blocks.flatten() {
                let old = block
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|modified| modified < cutoff);
                if old && fs::remove_file(block.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_protocol::BlockRef;

    #[test]
    fn keeps_verified_blocks_once_and_prunes_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = VersionStore::new(dir.path());
        let file = dir.path().join("f");
        fs::write(&file, b"hello world").unwrap();
        let manifest = Manifest::from_blocks(vec![
            BlockRef {
                hash: BlockHash::of(b"hello "),
                len: 6,
            },
            BlockRef {
                hash: BlockHash::of(b"world"),
                len: 5,
            },
        ])
        .unwrap();
        let none = std::collections::HashSet::new();
        let present: std::collections::HashSet<_> =
            [BlockHash::of(b"hello ")].into_iter().collect();
        assert_eq!(
            store.keep_file(&file, &manifest, &present).unwrap(),
            5,
            "blocks the new version still has are not kept"
        );
        assert_eq!(store.keep_file(&file, &manifest, &none).unwrap(), 6);
        assert_eq!(
            store.keep_file(&file, &manifest, &none).unwrap(),
            0,
            "deduplicated"
        );
        assert_eq!(store.block(&BlockHash::of(b"world")).unwrap(), b"world");
        assert!(store.contains(&BlockHash::of(b"world")));
        // A kept block left empty (a power loss before its data was written) is kept
        // again, not skipped by its name.
        fs::write(store.block_path(&BlockHash::of(b"world")), b"").unwrap();
        assert!(store.block(&BlockHash::of(b"world")).is_none());
        assert_eq!(store.keep_file(&file, &manifest, &none).unwrap(), 5);
        assert_eq!(store.block(&BlockHash::of(b"world")).unwrap(), b"world");
        assert!(!store.contains(&BlockHash::of(b"other")));
        // A block that no longer matches the file is not kept.
        let stale = Manifest::from_blocks(vec![BlockRef {
            hash: BlockHash::of(b"other"),
            len: 5,
        }])
        .unwrap();
        assert_eq!(store.keep_file(&file, &stale, &none).unwrap(), 0);
        assert!(store.block(&BlockHash::of(b"other")).is_none());
        assert_eq!(store.prune(Duration::from_secs(3600)), 0);
        assert_eq!(store.prune(Duration::ZERO), 2);
        assert!(store.block(&BlockHash::of(b"world")).is_none());
    }
}
