//! Folder IDs: the name every device uses for one shared folder.
//!
//! A folder ID is chosen when the folder is created (random by default, or given by
//! the user like Syncthing's folder IDs) and never changes. It is ASCII so that it can
//! be typed, appear in paths and logs, and compare byte for byte on every platform.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest folder ID accepted, in bytes: long enough for a readable name, short enough
/// to keep every message that names a folder small.
pub const MAX_FOLDER_ID_LEN: usize = 64;

/// Why a folder ID was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FolderIdError {
    /// Empty or longer than [`MAX_FOLDER_ID_LEN`].
    #[error("a folder ID has 1 to {MAX_FOLDER_ID_LEN} characters, this one has {len}")]
    Length {
        /// Length found.
        len: usize,
    },
    /// A character other than ASCII letters, digits, `-`, `_` and `.`.
    #[error("folder IDs use only letters, digits, '-', '_' and '.'; found {character:?}")]
    Character {
        /// The offending character.
        character: char,
    },
}

/// A validated folder ID. Invariant: 1..=64 bytes of `[A-Za-z0-9._-]`, not starting with `.`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FolderId(String);

impl FolderId {
    /// Validates `text` as a folder ID.
    pub fn new(text: &str) -> Result<Self, FolderIdError> {
        if text.is_empty() || text.len() > MAX_FOLDER_ID_LEN {
            return Err(FolderIdError::Length { len: text.len() });
        }
        for (index, character) in text.chars().enumerate() {
            let allowed = character.is_ascii_alphanumeric()
                || matches!(character, '-' | '_')
                || (character == '.' && index > 0);
            if !allowed {
                return Err(FolderIdError::Character { character });
            }
        }
        Ok(Self(text.to_owned()))
    }

    /// A fresh random folder ID, `xxxxx-xxxxx` in lowercase base32 (50 bits), from
    /// caller-supplied random bytes.
    pub fn random(random: [u8; 8]) -> Self {
        let text = data_encoding::BASE32_NOPAD.encode(&random).to_lowercase();
        Self(format!("{}-{}", &text[..5], &text[5..10]))
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FolderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for FolderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FolderId({})", self.0)
    }
}

impl FromStr for FolderId {
    type Err = FolderIdError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::new(text)
    }
}

impl TryFrom<String> for FolderId {
    type Error = FolderIdError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        Self::new(&text)
    }
}

impl From<FolderId> for String {
    fn from(id: FolderId) -> Self {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(FolderId::new("photos").is_ok());
        assert!(FolderId::new("a.b-c_D9").is_ok());
        assert_eq!(FolderId::new(""), Err(FolderIdError::Length { len: 0 }));
        assert!(FolderId::new(&"a".repeat(65)).is_err());
        assert!(FolderId::new(".hidden").is_err());
        assert!(FolderId::new("a/b").is_err());
        assert!(FolderId::new("..").is_err());
        assert!(FolderId::new("é").is_err());
    }

    #[test]
    fn random_ids_are_valid_and_decoding_revalidates() {
        let id = FolderId::random([1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(id.as_str().len(), 11);
        assert_eq!(FolderId::new(id.as_str()), Ok(id.clone()));
        let bytes = postcard::to_allocvec(&id).unwrap();
        assert_eq!(postcard::from_bytes::<FolderId>(&bytes).unwrap(), id);
        let evil = postcard::to_allocvec(&"../etc".to_string()).unwrap();
        assert!(postcard::from_bytes::<FolderId>(&evil).is_err());
    }
}
