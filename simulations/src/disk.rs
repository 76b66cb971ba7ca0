//! A virtual disk: one device's synced folder as a map from path to node.
//!
//! It behaves like the POSIX calls the node's shell makes (`lstat`, write, rename,
//! `mkdir -p`, `unlink`, `rmdir`, `symlink`) with their failure modes: a missing
//! parent, a non-empty directory, an injected I/O error, a full disk. A kill -9 keeps
//! everything here (the node fsyncs a file before it renames it); what it loses is the
//! device's memory, modelled in [`crate::device`].
//!
//! A power loss loses more: a new name, a rename or an unlink is a change to its
//! directory, and it is durable only once that directory is synced (ext4 without a
//! journal, or with `fast_commit`, and btrfs do not write it with the next `fsync` of
//! another file). The disk keeps the node's directory changes since its last
//! [`Disk::sync_dirs`] and [`Disk::lose_unsynced`] undoes them, newest first. A user's
//! own operation makes the paths it touches durable (an editor syncs what it saves),
//! so that a power loss never takes back a user's write, which the checker would
//! count as lost.
//!
//! With `coarse_timestamps` the disk keeps mtimes the way FAT does, in even seconds:
//! two writes of the same size within two seconds leave size, mtime and inode as they
//! were, and only the bytes tell them apart (the scanner's racily clean files).
//!
//! Safety is checked here, where it cannot be missed: an operation whose path runs
//! through a symlink would, on a real disk, write outside the folder. The disk refuses
//! it and records an escape, which the simulation reports as a violation.

use std::collections::BTreeMap;

use weft_core::engine::LocalEntry;
use weft_protocol::document::EntryKind;
use weft_protocol::path::TEMP_PREFIX;

/// What a path holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    /// A regular file.
    File {
        /// Its bytes.
        data: Vec<u8>,
        /// Permission bits.
        mode: u32,
        /// Modification time, ns.
        mtime_ns: i64,
        /// Inode number.
        inode: u64,
    },
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink {
        /// The target, as text (never followed).
        target: String,
        /// Inode number.
        inode: u64,
    },
}

/// Why a disk operation failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskError {
    /// The path or its parent does not exist.
    NotFound,
    /// The target exists (or is not what the call needs).
    Exists,
    /// A directory still holds entries.
    NotEmpty,
    /// The path runs through a symlink or file.
    NotADirectory,
    /// An injected I/O error.
    Io,
    /// No space left.
    Full,
}

/// One device's folder.
#[derive(Clone, Debug, Default)]
pub struct Disk {
    nodes: BTreeMap<String, Node>,
    next_inode: u64,
    /// Percent of sync writes that fail with an I/O error.
    pub fail_percent: u64,
    /// No space left: every write fails.
    pub full: bool,
    /// Operations that would have gone through a symlink (outside the folder).
    pub escapes: Vec<String>,
    /// Mtimes are kept in even seconds (FAT), see the module doc.
    pub coarse_timestamps: bool,
    /// The node's directory changes not yet synced, oldest first: each path with what
    /// it held before (`None`: nothing).
    unsynced: Vec<(String, Option<Node>)>,
}

/// FAT's timestamp granularity.
const FAT_GRANULARITY_NS: i64 = 2_000_000_000;

/// What `lstat` says of every directory here (the scanner records mtime 0 and no inode
/// for directories).
pub fn directory_entry() -> LocalEntry {
    LocalEntry {
        kind: EntryKind::Directory,
        size: 0,
        mtime_ns: 0,
        mode: 0o755,
        inode: 0,
        manifest: None,
        symlink_target: None,
    }
}

/// The parent of a path (`None` at the top).
pub fn parent(path: &str) -> Option<&str> {
    path.rsplit_once('/').map(|(parent, _)| parent)
}

/// True if a path's file name marks a node's temp file.
pub fn is_temp(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|name| name.starts_with(TEMP_PREFIX))
}

impl Disk {
    /// An empty folder whose inode numbers start at `first_inode`.
    pub fn new(first_inode: u64) -> Self {
        Self {
            next_inode: first_inode,
            ..Self::default()
        }
    }

    /// Notes a change to `path`'s directory entry: the node's (`sync`) is undone by a
    /// power loss until [`Disk::sync_dirs`]; a user's makes the path durable.
    fn entry_changes(&mut self, path: &str, sync: bool) {
        if sync {
            let old = self.nodes.get(path).cloned();
            self.unsynced.push((path.to_owned(), old));
        } else {
            let under = format!("{path}/");
            self.unsynced.retain(|(changed, _)| {
                !(changed == path
                    || changed.starts_with(&under)
                    || path.starts_with(&format!("{changed}/")))
            });
        }
    }

    /// Notes changes to `path` and everything under it.
    fn tree_changes(&mut self, path: &str, sync: bool) {
        let under = format!("{path}/");
        let inside: Vec<String> = self
            .nodes
            .range(under.clone()..)
            .take_while(|(p, _)| p.starts_with(&under))
            .map(|(p, _)| p.clone())
            .collect();
        self.entry_changes(path, sync);
        for child in inside {
            self.entry_changes(&child, sync);
        }
    }

    /// The node synced every directory it changed (before a store commit).
    pub fn sync_dirs(&mut self) {
        self.unsynced.clear();
    }

    /// A power loss: the node's directory changes since the last sync are undone,
    /// newest first. Returns how many.
    pub fn lose_unsynced(&mut self) -> usize {
        let undone = self.unsynced.len();
        while let Some((path, old)) = self.unsynced.pop() {
            match old {
                Some(node) => {
                    self.nodes.insert(path, node);
                }
                None => {
                    self.nodes.remove(&path);
                }
            }
        }
        undone
    }

    fn inode(&mut self) -> u64 {
        self.next_inode += 1;
        self.next_inode
    }

    /// The mtime this disk keeps for `mtime_ns`.
    fn stamp(&self, mtime_ns: i64) -> i64 {
        if self.coarse_timestamps {
            mtime_ns - mtime_ns.rem_euclid(FAT_GRANULARITY_NS)
        } else {
            mtime_ns
        }
    }

    /// What `lstat` would say (no manifest).
    pub fn lstat(&self, path: &str) -> Option<LocalEntry> {
        let node = self.nodes.get(path)?;
        Some(match node {
            Node::File {
                data,
                mode,
                mtime_ns,
                inode,
            } => LocalEntry {
                kind: EntryKind::File,
                size: data.len() as u64,
                mtime_ns: *mtime_ns,
                mode: *mode,
                inode: *inode,
                manifest: None,
                symlink_target: None,
            },
            Node::Dir => directory_entry(),
            Node::Symlink { target, inode } => LocalEntry {
                kind: EntryKind::Symlink,
                size: 0,
                mtime_ns: 0,
                mode: 0o777,
                inode: *inode,
                manifest: None,
                symlink_target: Some(target.clone()),
            },
        })
    }

    /// The node at `path`.
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// A file's bytes.
    pub fn read(&self, path: &str) -> Option<&[u8]> {
        match self.nodes.get(path)? {
            Node::File { data, .. } => Some(data),
            _ => None,
        }
    }

    /// Every node, in path order.
    pub fn nodes(&self) -> impl Iterator<Item = (&String, &Node)> {
        self.nodes.iter()
    }

    /// Paths of directories (for choosing where users work).
    pub fn directories(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, n)| matches!(n, Node::Dir))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Paths of visible regular files.
    pub fn files(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(p, n)| matches!(n, Node::File { .. }) && !is_temp(p))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Checks a write's path: every ancestor must be a directory that exists (or, with
    /// `create`, is missing and may be made). An ancestor symlink is an escape.
    fn check_parents(&mut self, path: &str, create: bool, sync: bool) -> Result<(), DiskError> {
        let mut missing = false;
        let mut at = parent(path);
        while let Some(dir) = at {
            match self.nodes.get(dir) {
                Some(Node::Dir) => {}
                Some(Node::Symlink { .. }) => {
                    // The node's operations only: a user may try anything.
                    if sync {
                        self.escapes.push(path.to_owned());
                    }
                    return Err(DiskError::NotADirectory);
                }
                Some(Node::File { .. }) => return Err(DiskError::NotADirectory),
                None => missing = true,
            }
            at = parent(dir);
        }
        if missing && !create {
            return Err(DiskError::NotFound);
        }
        Ok(())
    }

    fn writable(&mut self, sync: bool, rng_roll: u64) -> Result<(), DiskError> {
        if self.full {
            return Err(DiskError::Full);
        }
        if sync && rng_roll < self.fail_percent {
            return Err(DiskError::Io);
        }
        Ok(())
    }

    fn has_children(&self, path: &str) -> bool {
        let prefix = format!("{path}/");
        self.nodes
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(p, _)| p.starts_with(&prefix))
    }

    /// `mkdir -p`.
    pub fn create_dir_all(&mut self, path: &str, roll: u64, sync: bool) -> Result<(), DiskError> {
        self.check_parents(path, true, sync)?;
        match self.nodes.get(path) {
            Some(Node::Dir) => return Ok(()),
            Some(_) => return Err(DiskError::Exists),
            None => {}
        }
        self.writable(sync, roll)?;
        let mut made = Vec::new();
        let mut at = Some(path);
        while let Some(dir) = at {
            if !self.nodes.contains_key(dir) {
                made.push(dir.to_owned());
            }
            at = parent(dir);
        }
        for dir in made.into_iter().rev() {
            self.entry_changes(&dir, sync);
            self.nodes.insert(dir, Node::Dir);
        }
        Ok(())
    }

    /// Creates or truncates a file with `data` (a new inode when created). `sync`
    /// writes (the node's) are subject to injected I/O errors; a user's are not.
    pub fn write_file(
        &mut self,
        path: &str,
        data: Vec<u8>,
        mode: u32,
        mtime_ns: i64,
        roll: u64,
        sync: bool,
    ) -> Result<(), DiskError> {
        self.check_parents(path, false, sync)?;
        self.writable(sync, roll)?;
        let inode = match self.nodes.get(path) {
            Some(Node::File { inode, .. }) => *inode,
            Some(_) => return Err(DiskError::Exists),
            None => self.inode(),
        };
        let mtime_ns = self.stamp(mtime_ns);
        self.entry_changes(path, sync);
        self.nodes.insert(
            path.to_owned(),
            Node::File {
                data,
                mode,
                mtime_ns,
                inode,
            },
        );
        Ok(())
    }

    /// Writes `bytes` at `offset` of an existing file (the node's temp files).
    pub fn write_at(
        &mut self,
        path: &str,
        offset: usize,
        bytes: &[u8],
        roll: u64,
    ) -> Result<(), DiskError> {
        self.writable(true, roll)?;
        match self.nodes.get_mut(path) {
            Some(Node::File { data, .. }) => {
                if data.len() < offset + bytes.len() {
                    data.resize(offset + bytes.len(), 0);
                }
                data[offset..offset + bytes.len()].copy_from_slice(bytes);
                Ok(())
            }
            Some(_) => Err(DiskError::Exists),
            None => Err(DiskError::NotFound),
        }
    }

    /// Sets a file's mode and mtime (what `fetch` does before the rename).
    pub fn set_times(&mut self, path: &str, new_mode: u32, new_mtime: i64) {
        let new_mtime = self.stamp(new_mtime);
        if let Some(Node::File { mode, mtime_ns, .. }) = self.nodes.get_mut(path) {
            *mode = new_mode;
            *mtime_ns = new_mtime;
        }
    }

    /// `symlink(target, path)`.
    pub fn symlink(
        &mut self,
        target: &str,
        path: &str,
        roll: u64,
        sync: bool,
    ) -> Result<(), DiskError> {
        self.check_parents(path, false, sync)?;
        self.writable(sync, roll)?;
        if self.nodes.contains_key(path) {
            return Err(DiskError::Exists);
        }
        self.entry_changes(path, sync);
        let inode = self.inode();
        self.nodes.insert(
            path.to_owned(),
            Node::Symlink {
                target: target.to_owned(),
                inode,
            },
        );
        Ok(())
    }

    /// `rename(from, to)`: replaces a file or symlink at `to`, or an empty directory
    /// with a directory; moves a directory's whole subtree.
    pub fn rename(&mut self, from: &str, to: &str, roll: u64, sync: bool) -> Result<(), DiskError> {
        self.check_parents(from, false, sync)?;
        self.check_parents(to, false, sync)?;
        self.writable(sync, roll)?;
        let Some(node) = self.nodes.get(from).cloned() else {
            return Err(DiskError::NotFound);
        };
        if from == to {
            return Ok(());
        }
        if to.starts_with(&format!("{from}/")) {
            return Err(DiskError::Exists);
        }
        match (self.nodes.get(to), &node) {
            (None, _) => {}
            (Some(Node::Dir), Node::Dir) if !self.has_children(to) => {}
            (Some(Node::Dir), _) => return Err(DiskError::Exists),
            (Some(_), Node::Dir) => return Err(DiskError::NotADirectory),
            (Some(_), _) => {}
        }
        self.tree_changes(from, sync);
        self.tree_changes(to, sync);
        self.nodes.remove(from);
        if matches!(node, Node::Dir) {
            let prefix = format!("{from}/");
            let moved: Vec<String> = self
                .nodes
                .range(prefix.clone()..)
                .take_while(|(p, _)| p.starts_with(&prefix))
                .map(|(p, _)| p.clone())
                .collect();
            for old in moved {
                if let Some(child) = self.nodes.remove(&old) {
                    let new = format!("{to}/{}", &old[prefix.len()..]);
                    self.entry_changes(&new, sync);
                    self.nodes.insert(new, child);
                }
            }
        }
        self.nodes.insert(to.to_owned(), node);
        Ok(())
    }

    /// `unlink`.
    pub fn remove_file(&mut self, path: &str, roll: u64, sync: bool) -> Result<(), DiskError> {
        self.check_parents(path, false, sync)?;
        if sync && roll < self.fail_percent {
            return Err(DiskError::Io);
        }
        match self.nodes.get(path) {
            Some(Node::Dir) => Err(DiskError::Exists),
            Some(_) => {
                self.entry_changes(path, sync);
                self.nodes.remove(path);
                Ok(())
            }
            None => Err(DiskError::NotFound),
        }
    }

    /// `rmdir` (empty directories only).
    pub fn remove_dir(&mut self, path: &str, roll: u64, sync: bool) -> Result<(), DiskError> {
        self.check_parents(path, false, sync)?;
        if sync && roll < self.fail_percent {
            return Err(DiskError::Io);
        }
        match self.nodes.get(path) {
            Some(Node::Dir) if self.has_children(path) => Err(DiskError::NotEmpty),
            Some(Node::Dir) => {
                self.entry_changes(path, sync);
                self.nodes.remove(path);
                Ok(())
            }
            Some(_) => Err(DiskError::NotADirectory),
            None => Err(DiskError::NotFound),
        }
    }

    /// Removes the node's temp files directly inside `dir` (folder.rs does the same
    /// before removing a directory the remote deleted).
    pub fn remove_temp_files(&mut self, dir: &str) {
        let prefix = format!("{dir}/");
        let temps: Vec<String> = self
            .nodes
            .iter()
            .filter(|(path, node)| {
                matches!(node, Node::File { .. })
                    && path.starts_with(&prefix)
                    && !path[prefix.len()..].contains('/')
                    && is_temp(path)
            })
            .map(|(path, _)| path.clone())
            .collect();
        for temp in temps {
            self.entry_changes(&temp, true);
            self.nodes.remove(&temp);
        }
    }

    /// `rm -rf` (a user's): the paths of the files it removed, with their bytes.
    pub fn remove_tree(&mut self, path: &str) -> Vec<Vec<u8>> {
        let prefix = format!("{path}/");
        let doomed: Vec<String> = self
            .nodes
            .range(path.to_owned()..)
            .take_while(|(p, _)| p.starts_with(path))
            .filter(|(p, _)| *p == path || p.starts_with(&prefix))
            .map(|(p, _)| p.clone())
            .collect();
        self.tree_changes(path, false);
        let mut removed = Vec::new();
        for p in doomed {
            if let Some(Node::File { data, .. }) = self.nodes.remove(&p) {
                removed.push(data);
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posix_rules_and_escapes() {
        let mut disk = Disk::new(0);
        assert_eq!(
            disk.write_file("a/b", vec![1], 0o644, 1, 0, false),
            Err(DiskError::NotFound)
        );
        disk.create_dir_all("a/x", 0, false).unwrap();
        disk.write_file("a/x/f", vec![1, 2], 0o644, 1, 0, false)
            .unwrap();
        assert_eq!(disk.remove_dir("a/x", 0, false), Err(DiskError::NotEmpty));
        disk.rename("a/x", "b", 0, false).unwrap();
        assert_eq!(disk.read("b/f"), Some(&[1u8, 2][..]));
        assert!(disk.get("a/x/f").is_none());
        disk.symlink("/etc", "l", 0, false).unwrap();
        assert!(
            disk.write_file("l/passwd", vec![0], 0o644, 1, 0, true)
                .is_err()
        );
        assert_eq!(disk.escapes, vec!["l/passwd".to_owned()]);
        // "a b" sorts between "a" and "a/..." and must not count as a child.
        disk.create_dir_all("c", 0, false).unwrap();
        disk.write_file("c b", vec![], 0o644, 1, 0, false).unwrap();
        disk.remove_dir("c", 0, false).unwrap();
        assert!(is_temp("x/.weft.tmp.12") && !is_temp("x/weft.tmp"));
    }
}
