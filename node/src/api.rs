//! The control API: HTTP + JSON on 127.0.0.1, used by the CLI and the GUI.
//!
//! Every request carries the API key from `config.toml` in the `X-API-Key` header;
//! without it the answer is 401 and nothing else. Endpoints (documented in
//! `docs/api.md`):
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/v1/status` | node and folder status |
//! | GET | `/v1/folders` | folder records |
//! | POST | `/v1/folders` | add a folder: `{"path", "id"?, "label"?}` |
//! | DELETE | `/v1/folders/{id}` | forget a folder (files stay) |
//! | GET | `/v1/folders/{id}/files` | the folder's local tree as last scanned |
//! | GET | `/v1/manifests/{hash}` | a stored manifest |
//! | POST | `/v1/folders/{id}/share` | share with a device: `{"device", "permission"}` (`View`, `Edit`, `Admin`, `Owner`) |
//! | DELETE | `/v1/folders/{id}/share/{device}` | unshare: remove the device from the folder's access list |
//! | GET | `/v1/folders/{id}/versions?path=P` | versions of a file, oldest first |
//! | POST | `/v1/folders/{id}/restore` | restore one: `{"path", "version"?, "to"?}` |
//! | GET, POST | `/v1/devices` | accepted devices; accept one: `{"id", "name"?, "addresses"?}` |
//! | GET | `/v1/devices/pending` | devices that connected without being accepted |
//! | DELETE | `/v1/devices/{id}` | forget a device and unshare every folder with it |
//! | GET | `/v1/invites` | invites received |
//! | POST | `/v1/invites/{folder}/accept`, `.../decline` | answer an invite: `{"path"?}` |
//! | POST | `/v1/scan` | scan and wait: `{"folder"?, "paths"?}` |
//! | GET | `/v1/events` | server-sent events ([`crate::events::Event`] as JSON) |
//!
//! Errors are `{"error": "..."}` with a 4xx/5xx status; the text says what to do.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::node::{AcceptInvite, AddDevice, AddFolder, Node, NodeError, ShareFolder};

/// Header that carries the API key.
pub const API_KEY_HEADER: &str = "x-api-key";
/// File in the node home that tells clients where the API listens.
pub const API_FILE: &str = "api.json";

/// Contents of [`API_FILE`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiEndpoint {
    /// `host:port` of the API.
    pub address: String,
    /// Process ID of the node.
    pub pid: u32,
}

/// A scan request.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScanRequest {
    /// One folder, or all.
    pub folder: Option<String>,
    /// Paths inside the folder; all if empty.
    #[serde(default)]
    pub paths: Vec<String>,
}

/// An API error response.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(error: NodeError) -> Self {
        let status = match &error {
            NodeError::UnknownFolder(_) => StatusCode::NOT_FOUND,
            NodeError::Invalid(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, error.to_string())
    }
}

/// Constant-time comparison, so the key cannot be guessed byte by byte from timing.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn authorise(node: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(API_KEY_HEADER)
        .map(|value| value.as_bytes())
        .unwrap_or_default();
    if same_secret(given, node.config().api_key.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API key (X-API-Key header; the key is in config.toml)".into(),
        ))
    }
}

/// Runs a blocking node call off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(error) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            error.to_string(),
        )),
    }
}

async fn status(State(node): State<Arc<Node>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    Ok(Json(node.status()).into_response())
}

async fn list_folders(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    Ok(Json(node.folder_records()).into_response())
}

async fn add_folder(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Json(request): Json<AddFolder>,
) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    let record = blocking(move || node.add_folder(request)).await?;
    Ok((StatusCode::CREATED, Json(record)).into_response())
}

async fn remove_folder(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    blocking(move || node.remove_folder(&id)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn files(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    let files = blocking(move || node.files(&id)).await?;
    Ok(Json(files).into_response())
}

async fn manifest(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    let manifest = blocking(move || node.manifest(&hash)).await?;
    Ok(Json(manifest).into_response())
}

async fn devices(State(node): State<Arc<Node>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    let devices = blocking(move || node.devices()).await?;
    Ok(Json(devices).into_response())
}

async fn pending_devices(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    let pending: Vec<serde_json::Value> = node
        .pending_devices()
        .into_iter()
        .map(|(id, address)| serde_json::json!({ "id": id, "address": address }))
        .collect();
    Ok(Json(pending).into_response())
}

async fn add_device(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Json(request): Json<AddDevice>,
) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    let record = blocking(move || node.add_device(request)).await?;
    Ok((StatusCode::CREATED, Json(record)).into_response())
}

async fn remove_device(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    blocking(move || node.remove_device(&id)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn share_folder(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(request): Json<ShareFolder>,
) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    let record = blocking(move || node.share_folder(&id, request)).await?;
    Ok(Json(record).into_response())
}

async fn unshare_folder(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path((id, device)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    blocking(move || node.unshare_folder(&id, &device)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn invites(State(node): State<Arc<Node>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    let invites = blocking(move || node.invites()).await?;
    Ok(Json(invites).into_response())
}

async fn accept_invite(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(folder): Path<String>,
    Json(request): Json<AcceptInvite>,
) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    let record = blocking(move || node.accept_invite(&folder, request)).await?;
    Ok(Json(record).into_response())
}

/// Which inviting device an answer is for (when several invite to one folder).
#[derive(Deserialize, Default)]
struct InviteFrom {
    #[serde(default)]
    from: Option<String>,
}

async fn decline_invite(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(folder): Path<String>,
    request: Option<Json<InviteFrom>>,
) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    let from = request.map(|Json(r)| r).unwrap_or_default().from;
    blocking(move || node.decline_invite(&folder, from.as_deref())).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct VersionsQuery {
    path: String,
}

async fn versions(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    axum::extract::Query(query): axum::extract::Query<VersionsQuery>,
) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    let versions = blocking(move || node.versions(&id, &query.path)).await?;
    Ok(Json(versions).into_response())
}

/// A restore request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreRequest {
    /// The path whose history to use.
    pub path: String,
    /// Version index (default: the previous content).
    pub version: Option<usize>,
    /// Write it here instead.
    pub to: Option<String>,
}

async fn restore(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(request): Json<RestoreRequest>,
) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    let written =
        blocking(move || node.restore(&id, &request.path, request.version, request.to.as_deref()))
            .await?;
    Ok(Json(serde_json::json!({ "path": written })).into_response())
}

async fn scan(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Json(request): Json<ScanRequest>,
) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    let results = blocking(move || node.scan(request.folder.as_deref(), &request.paths)).await?;
    let results: serde_json::Map<String, serde_json::Value> = results
        .into_iter()
        .map(|(id, result)| (id, serde_json::to_value(result).unwrap_or_default()))
        .collect();
    Ok(Json(results).into_response())
}

async fn events(State(node): State<Arc<Node>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorise(&node, &headers)?;
    let receiver = node.events().subscribe();
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let data = match receiver.recv().await {
            Ok(event) => serde_json::to_string(&event).unwrap_or_default(),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                serde_json::json!({ "type": "lagged", "missed": missed }).to_string()
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((
            Ok::<_, Infallible>(SseEvent::default().data(data)),
            receiver,
        ))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The API's routes.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/folders", get(list_folders).post(add_folder))
        .route("/v1/folders/{id}", delete(remove_folder))
        .route("/v1/folders/{id}/files", get(files))
        .route("/v1/manifests/{hash}", get(manifest))
        .route("/v1/folders/{id}/share", post(share_folder))
        .route("/v1/folders/{id}/share/{device}", delete(unshare_folder))
        .route("/v1/folders/{id}/versions", get(versions))
        .route("/v1/folders/{id}/restore", post(restore))
        .route("/v1/devices", get(devices).post(add_device))
        .route("/v1/devices/pending", get(pending_devices))
        .route("/v1/devices/{id}", delete(remove_device))
        .route("/v1/invites", get(invites))
        .route("/v1/invites/{folder}/accept", post(accept_invite))
        .route("/v1/invites/{folder}/decline", post(decline_invite))
        .route("/v1/scan", post(scan))
        .route("/v1/events", get(events))
        .with_state(node)
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secret_comparison() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"", b"abc"));
    }
}
