//! The control API client that the CLI uses to talk to a running node.
//!
//! It finds the node through `api.json` in the node home and authenticates with the
//! API key from `config.toml`. When no node runs, the error says how to start one.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{API_FILE, API_KEY_HEADER, ApiEndpoint};
use crate::config::{CONFIG_FILE, Config};

/// Longest a control API call may take; a scan of a large folder can take minutes.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);

/// Why a control API call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No node is running for this home.
    #[error(
        "no weft node is running with home {0}; start one with `weft run` (or pass the right --home)"
    )]
    NotRunning(PathBuf),
    /// The node answered with an error.
    #[error("{message} (HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The node's message.
        message: String,
    },
    /// The home's files are unreadable.
    #[error("{0}")]
    Home(String),
    /// The connection failed mid-request.
    #[error("control API request failed: {0}")]
    Transport(String),
}

/// A client for one node's control API.
#[derive(Debug)]
pub struct Client {
    base: String,
    key: String,
    agent: ureq::Agent,
    home: PathBuf,
}

impl Client {
    /// Connects to the node of `home`.
    pub fn connect(home: &Path) -> Result<Self, ClientError> {
        let endpoint = std::fs::read_to_string(home.join(API_FILE))
            .map_err(|_| ClientError::NotRunning(home.to_path_buf()))?;
        let endpoint: ApiEndpoint = serde_json::from_str(&endpoint)
            .map_err(|error| ClientError::Home(format!("{API_FILE} is damaged: {error}")))?;
        let config_text = std::fs::read_to_string(home.join(CONFIG_FILE))
            .map_err(|error| ClientError::Home(format!("cannot read {CONFIG_FILE}: {error}")))?;
        let config: Config = toml::from_str(&config_text)
            .map_err(|error| ClientError::Home(format!("{CONFIG_FILE} is invalid: {error}")))?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        Ok(Self {
            base: format!("http://{}", endpoint.address),
            key: config.api_key,
            agent,
            home: home.to_path_buf(),
        })
    }

    fn finish<T: DeserializeOwned>(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ClientError> {
        let mut response = result.map_err(|error| match error {
            ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
                ClientError::NotRunning(self.home.clone())
            }
            other => ClientError::Transport(other.to_string()),
        })?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .map_err(|error| ClientError::Transport(error.to_string()))?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or(text);
            return Err(ClientError::Api { status, message });
        }
        let text = if text.is_empty() { "null" } else { &text };
        serde_json::from_str(text).map_err(|error| ClientError::Transport(error.to_string()))
    }

    /// `GET path`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let result = self
            .agent
            .get(format!("{}{path}", self.base))
            .header(API_KEY_HEADER, &self.key)
            .call();
        self.finish(result)
    }

    /// `POST path` with a JSON body.
    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_string(body)
            .map_err(|error| ClientError::Transport(error.to_string()))?;
        let result = self
            .agent
            .post(format!("{}{path}", self.base))
            .header(API_KEY_HEADER, &self.key)
            .header("content-type", "application/json")
            .send(body);
        self.finish(result)
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<(), ClientError> {
        let result = self
            .agent
            .delete(format!("{}{path}", self.base))
            .header(API_KEY_HEADER, &self.key)
            .call();
        self.finish::<serde_json::Value>(result).map(|_| ())
    }

    /// Follows the event stream, calling `each` with every event until it returns false
    /// or the stream ends.
    pub fn follow_events(
        &self,
        mut each: impl FnMut(serde_json::Value) -> bool,
    ) -> Result<(), ClientError> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .build()
            .into();
        let response = agent
            .get(format!("{}/v1/events", self.base))
            .header(API_KEY_HEADER, &self.key)
            .call()
            .map_err(|_| ClientError::NotRunning(self.home.clone()))?;
        let reader = BufReader::new(response.into_body().into_reader());
        for line in reader.lines() {
            let line = line.map_err(|error| ClientError::Transport(error.to_string()))?;
            if let Some(data) = line.strip_prefix("data:")
                && let Ok(event) = serde_json::from_str(data.trim())
                && !each(event)
            {
                break;
            }
        }
        Ok(())
    }
}
