//! What a scan is asked and what it reports: the scope, the changes it finds, and
//! the racily clean files among them. The scanner itself (walk, hash) is I/O and lives
//! in the executors; the folder decides what to scan and records what was found.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use weft_protocol::{Manifest, RelPath};

use crate::engine::LocalEntry;

/// Which part of a folder to scan.
#[derive(Clone, Debug)]
pub enum Scope {
    /// Everything.
    Full,
    /// These paths and, for directories, everything inside them.
    Paths(Vec<RelPath>),
}

impl Scope {
    /// Whether `path` is in this scope (a scoped directory covers what is inside it).
    pub fn covers(&self, path: &RelPath) -> bool {
        match self {
            Scope::Full => true,
            Scope::Paths(paths) => paths.iter().any(|scoped| path.starts_with(scoped)),
        }
    }

    /// The scope of `paths`, keeping the outermost of nested ones ([`collapse`]).
    pub fn of(paths: BTreeSet<RelPath>) -> Self {
        Scope::Paths(collapse(paths))
    }
}

/// One row change of a scan batch.
#[derive(Clone, Debug)]
pub enum LocalChange {
    /// The path exists with this entry (and manifest, for files).
    Upsert {
        /// The path.
        path: RelPath,
        /// What the scanner saw.
        entry: LocalEntry,
        /// The file's manifest.
        manifest: Option<Manifest>,
    },
    /// The path no longer exists.
    Remove {
        /// The path.
        path: RelPath,
    },
}

impl LocalChange {
    /// The path the change is about.
    pub fn path(&self) -> &RelPath {
        match self {
            LocalChange::Upsert { path, .. } | LocalChange::Remove { path } => path,
        }
    }
}

/// What the folder asks a scanner to do.
#[derive(Clone, Copy, Debug)]
pub struct ScanRequest<'a> {
    /// What to scan.
    pub scope: &'a Scope,
    /// The stored local rows in scope (what the last scans recorded).
    pub previous: &'a BTreeMap<RelPath, LocalEntry>,
    /// Racily clean files in scope to hash again whatever their metadata says.
    pub rehash: &'a BTreeSet<RelPath>,
}

/// What a finished scan reports to the folder (the changes went to the sink).
#[derive(Clone, Debug, Default)]
pub struct ScanOutcome {
    /// Files hashed so soon after their last write that another write of the same size
    /// could have the same mtime, with their timestamp granularity
    /// ([`crate::racy::racy_window`]): to hash again once it has passed.
    pub racy: Vec<(RelPath, Duration)>,
}

/// Keeps the outermost of nested paths (`a` covers `a/b`).
pub fn collapse(paths: BTreeSet<RelPath>) -> Vec<RelPath> {
    let covered = |path: &RelPath| {
        let mut parent = path.parent();
        while let Some(dir) = parent {
            if paths.contains(&dir) {
                return true;
            }
            parent = dir.parent();
        }
        false
    };
    paths
        .iter()
        .filter(|path| !covered(path))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse_keeps_outermost_paths() {
        let paths: BTreeSet<RelPath> = ["a/b", "a", "a b", "c/d", "c/d/e", "c/e"]
            .iter()
            .map(|p| RelPath::new(p).unwrap())
            .collect();
        let kept: Vec<String> = collapse(paths).iter().map(|p| p.to_string()).collect();
        assert_eq!(kept, vec!["a", "a b", "c/d", "c/e"]);
    }

    #[test]
    fn a_scoped_directory_covers_its_contents_only() {
        let scope = Scope::Paths(vec![RelPath::new("a").unwrap()]);
        assert!(scope.covers(&RelPath::new("a/b").unwrap()));
        assert!(!scope.covers(&RelPath::new("a b").unwrap()));
        assert!(Scope::Full.covers(&RelPath::new("x").unwrap()));
    }
}
