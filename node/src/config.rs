//! The node's config file: `config.toml` in the node home.
//!
//! Created with defaults on first start; a person may edit it while the node is
//! stopped. Unknown keys are an error (a typo should not be silently ignored).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// File name of the config inside the home.
pub const CONFIG_FILE: &str = "config.toml";

/// Node settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This device's name, shown to peers.
    pub device_name: String,
    /// Secret that every control API request must carry (`X-API-Key`).
    pub api_key: String,
    /// Where the control API listens; port 0 picks a free port.
    pub api_address: String,
    /// Quiet time after the last file event before the changed paths are rescanned.
    pub debounce_ms: u64,
    /// Interval between full rescans (the watcher is only a hint); jittered by 10%.
    pub full_rescan_interval_s: u64,
    /// Whether filesystem watching is on (off: changes are found by rescans only).
    pub watch: bool,
    /// Days that versions replaced or deleted by remote changes are kept.
    pub version_retention_days: u64,
    /// Seconds after its last change (write, chmod, mtime) at which one of the node's
    /// temp files counts as abandoned and a scan removes it.
    pub temp_file_expiry_s: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            device_name: default_device_name(),
            api_key: String::new(),
            api_address: "127.0.0.1:0".into(),
            debounce_ms: 200,
            full_rescan_interval_s: 3600,
            watch: true,
            version_retention_days: 30,
            temp_file_expiry_s: 24 * 3600,
        }
    }
}

fn default_device_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "weft-device".into())
}

/// Why the config could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this config.
    #[error("{path} is invalid: {detail}; fix it or move it away to start from defaults")]
    Invalid {
        /// The file.
        path: String,
        /// The parser's message.
        detail: String,
    },
    /// No randomness for the API key.
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
}

impl Config {
    /// Loads `home/config.toml`, creating it (with a fresh API key) if it is missing.
    pub fn load_or_create(home: &Path) -> Result<Self, ConfigError> {
        let path = home.join(CONFIG_FILE);
        let display = path.display().to_string();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let config: Config =
                    toml::from_str(&text).map_err(|error| ConfigError::Invalid {
                        path: display.clone(),
                        detail: error.to_string(),
                    })?;
                if config.api_key.len() < 16 {
                    return Err(ConfigError::Invalid {
                        path: display,
                        detail: "api_key must have at least 16 characters".into(),
                    });
                }
                Ok(config)
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let mut secret = [0u8; 24];
                getrandom::fill(&mut secret).map_err(|e| ConfigError::Random(e.to_string()))?;
                let config = Config {
                    api_key: data_encoding::BASE32_NOPAD.encode(&secret).to_lowercase(),
                    ..Config::default()
                };
                let text = toml::to_string(&config).map_err(|error| ConfigError::Invalid {
                    path: display.clone(),
                    detail: error.to_string(),
                })?;
                crate::home::write_private_atomically(&path, text.as_bytes()).map_err(|error| {
                    ConfigError::Io {
                        path: display,
                        source: std::io::Error::other(error.to_string()),
                    }
                })?;
                Ok(config)
            }
            Err(source) => Err(ConfigError::Io {
                path: display,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reloaded_and_typos_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let first = Config::load_or_create(dir.path()).unwrap();
        assert!(first.api_key.len() >= 16);
        let second = Config::load_or_create(dir.path()).unwrap();
        assert_eq!(first, second);
        std::fs::write(dir.path().join(CONFIG_FILE), "debounce_msec = 5\n").unwrap();
        let error = Config::load_or_create(dir.path()).unwrap_err();
        assert!(error.to_string().contains("debounce_msec"), "{error}");
    }
}
