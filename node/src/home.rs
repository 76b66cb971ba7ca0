//! The node home: the folder that holds a node's identity key, config and store.
//!
//! Chosen by `--home DIR`, else `WEFT_HOME`, else the platform's config directory
//! (`directories`). The device key lives in `device.key`, created on first use with
//! file mode 0600 and written atomically (temp file + rename), so that a crash never
//! leaves a half-written key behind.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use weft_protocol::{DeviceKey, KeyFileError};

/// File name of the device key inside the home.
pub const KEY_FILE: &str = "device.key";

/// Why the home could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HomeError {
    /// No home given and the platform has no config directory.
    #[error("no home directory found: pass --home DIR or set WEFT_HOME")]
    NoDefault,
    /// A filesystem operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The key file exists but is damaged.
    #[error(
        "device key {path} is unreadable ({source}); restore it from a backup, or move it away to start as a new device"
    )]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        source: KeyFileError,
    },
    /// The OS random number generator failed.
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
}

/// A node home directory.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// The home at `explicit`, or the platform default.
    pub fn locate(explicit: Option<PathBuf>) -> Result<Self, HomeError> {
        let root = match explicit {
            Some(path) => path,
            None => directories::ProjectDirs::from("", "", "weft")
                .map(|dirs| dirs.config_dir().to_path_buf())
                .ok_or(HomeError::NoDefault)?,
        };
        Ok(Self { root })
    }

    /// The home's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Loads the device key, creating the home and a new key on first use.
    pub fn load_or_create_key(&self) -> Result<DeviceKey, HomeError> {
        let path = self.root.join(KEY_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => {
                DeviceKey::from_key_file(&text).map_err(|source| HomeError::Key { path, source })
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => self.create_key(&path),
            Err(source) => Err(HomeError::Io {
                action: "reading",
                path,
                source,
            }),
        }
    }

    fn create_key(&self, path: &Path) -> Result<DeviceKey, HomeError> {
        fs::create_dir_all(&self.root).map_err(|source| HomeError::Io {
            action: "creating",
            path: self.root.clone(),
            source,
        })?;
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|error| HomeError::Random(error.to_string()))?;
        let key = DeviceKey::from_secret_bytes(secret);
        write_private_atomically(path, key.to_key_file().as_bytes())?;
        Ok(key)
    }
}

/// Writes `bytes` to `path` through a temp file of mode 0600, fsync, rename, and fsync
/// of the directory.
pub(crate) fn write_private_atomically(path: &Path, bytes: &[u8]) -> Result<(), HomeError> {
    let temp = path.with_extension("tmp");
    let io = |action, source| HomeError::Io {
        action,
        path: temp.clone(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&temp).map_err(|e| io("creating", e))?;
    file.write_all(bytes).map_err(|e| io("writing", e))?;
    file.sync_all().map_err(|e| io("syncing", e))?;
    fs::rename(&temp, path).map_err(|source| HomeError::Io {
        action: "renaming into",
        path: path.to_path_buf(),
        source,
    })?;
    // The new name survives a power loss only once its directory is synced.
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    crate::dir_sync::sync_dir(parent).map_err(|source| HomeError::Io {
        action: "syncing",
        path: parent.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::locate(Some(dir.path().join("home"))).unwrap();
        let first = home.load_or_create_key().unwrap();
        let second = home.load_or_create_key().unwrap();
        assert_eq!(first.device_id(), second.device_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(home.root().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn damaged_key_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(KEY_FILE), "garbage").unwrap();
        let home = Home::locate(Some(dir.path().to_path_buf())).unwrap();
        let error = home.load_or_create_key().unwrap_err();
        assert!(matches!(error, HomeError::Key { .. }));
        assert_eq!(
            fs::read_to_string(dir.path().join(KEY_FILE)).unwrap(),
            "garbage"
        );
    }
}
