//! Folder-relative paths as every device spells them.
//!
//! A [`RelPath`] is the one name of a file inside a folder: UTF-8, Unicode NFC (so a
//! name typed on macOS, which stores NFD, and on Linux is the same key), components
//! joined by `/`. Paths arrive from peers, so the checks here are the first line of
//! defence against writes outside the folder.
//!
//! Invariants: not empty; at most [`MAX_PATH_LEN`] bytes; every component non-empty,
//! not `.` or `..`, without `/`, `\` or NUL, at most [`MAX_COMPONENT_LEN`] bytes; the
//! first component is not `.weft` (the node's own metadata folder) and no component
//! starts with `.weft.tmp.` (the node's temp files). Platform rules (names Windows
//! forbids, case-insensitive collisions) are the node's to check where they apply.

use std::fmt;

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

/// Longest path, in bytes: Linux's PATH_MAX.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest path component, in bytes: the common filesystem limit (NAME_MAX).
pub const MAX_COMPONENT_LEN: usize = 255;
/// The node's own metadata folder in each synced folder; never synced.
pub const METADATA_DIR: &str = ".weft";
/// Prefix of the node's temp files; never synced.
pub const TEMP_PREFIX: &str = ".weft.tmp.";

/// Why a path was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// Empty path or empty component (`a//b`, leading or trailing `/`).
    #[error("empty path component in {0:?}")]
    Empty(String),
    /// Too long overall or in one component.
    #[error("path too long: {0:?}")]
    TooLong(String),
    /// `.` or `..` component.
    #[error("path {0:?} has a '.' or '..' component")]
    Dots(String),
    /// NUL or backslash.
    #[error("path {0:?} contains NUL or a backslash")]
    Character(String),
    /// Reserved for the node (`.weft/`, temp files).
    #[error("path {0:?} is reserved for Weft's own files")]
    Reserved(String),
}

/// A validated, normalised folder-relative path. See the module doc for invariants.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RelPath(String);

impl RelPath {
    /// Validates and normalises (NFC) `text`.
    pub fn new(text: &str) -> Result<Self, PathError> {
        let normalised: String = text.nfc().collect();
        if normalised.is_empty() {
            return Err(PathError::Empty(normalised));
        }
        if normalised.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong(normalised));
        }
        for (index, component) in normalised.split('/').enumerate() {
            if component.is_empty() {
                return Err(PathError::Empty(normalised));
            }
            if component == "." || component == ".." {
                return Err(PathError::Dots(normalised));
            }
            if component.len() > MAX_COMPONENT_LEN {
                return Err(PathError::TooLong(normalised));
            }
            if component.contains(['\0', '\\']) {
                return Err(PathError::Character(normalised));
            }
            if (index == 0 && component == METADATA_DIR) || component.starts_with(TEMP_PREFIX) {
                return Err(PathError::Reserved(normalised));
            }
        }
        Ok(Self(normalised))
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components, outermost first.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The parent path, or `None` at the top level.
    pub fn parent(&self) -> Option<RelPath> {
        self.0
            .rsplit_once('/')
            .map(|(parent, _)| RelPath(parent.to_owned()))
    }

    /// Appends one component (validated).
    pub fn join(&self, component: &str) -> Result<RelPath, PathError> {
        RelPath::new(&format!("{}/{component}", self.0))
    }

    /// True if `self` is `other` or lies inside it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0 == other.0
            || (self.0.starts_with(&other.0) && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl TryFrom<String> for RelPath {
    type Error = PathError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        Self::new(&text)
    }
}

impl From<RelPath> for String {
    fn from(path: RelPath) -> Self {
        path.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hostile_paths_are_rejected() {
        for bad in [
            "",
            "/etc/passwd",
            "a/../../b",
            "..",
            ".",
            "a/./b",
            "a//b",
            "a/",
            "a\0b",
            "a\\..\\b",
            ".weft/db",
            ".weft",
            "x/.weft.tmp.123",
        ] {
            assert!(RelPath::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(RelPath::new(&"a".repeat(256)).is_err());
        assert!(RelPath::new(&"a/".repeat(3000)).is_err());
    }

    #[test]
    fn ordinary_paths_are_kept_and_normalised() {
        for good in [
            "a",
            "dir/file.txt",
            ".hidden",
            "x/.weft",
            "name with spaces",
            "日本/語",
        ] {
            assert_eq!(RelPath::new(good).unwrap().as_str(), good);
        }
        // NFD "é" (e + combining acute) becomes NFC.
        let nfd = "caf\u{0065}\u{0301}";
        assert_eq!(RelPath::new(nfd).unwrap().as_str(), "caf\u{00e9}");
    }

    #[test]
    fn navigation() {
        let path = RelPath::new("a/b/c.txt").unwrap();
        assert_eq!(path.file_name(), "c.txt");
        assert_eq!(path.parent().unwrap().as_str(), "a/b");
        assert!(RelPath::new("top").unwrap().parent().is_none());
        assert!(path.starts_with(&RelPath::new("a/b").unwrap()));
        assert!(!path.starts_with(&RelPath::new("a/bc").unwrap()));
        assert!(
            RelPath::new("ab/c")
                .unwrap()
                .starts_with(&RelPath::new("ab").unwrap())
        );
        assert!(
            !RelPath::new("abc")
                .unwrap()
                .starts_with(&RelPath::new("ab").unwrap())
        );
    }

    proptest! {
        #[test]
        fn accepted_paths_never_escape(text in "[a./\\\\\0-]{0,12}") {
            if let Ok(path) = RelPath::new(&text) {
                prop_assert!(!path.as_str().starts_with('/'));
                prop_assert!(path.components().all(|c| c != ".." && c != "." && !c.is_empty()));
            }
        }
    }
}
