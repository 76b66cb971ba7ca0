//! `weft run`: starts the node, serves the control API, and shuts down cleanly on
//! Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use crate::api::{API_FILE, ApiEndpoint};
use crate::config::Config;
use crate::home::Home;
use crate::node::{AddFolder, NetOptions, Node};

/// Options of `weft run`.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Control API address, overriding the config.
    pub api: Option<String>,
    /// The default folder to create on first start (`None`: no default folder).
    pub default_folder: Option<PathBuf>,
    /// Peer listen addresses (multiaddrs); empty: all interfaces, QUIC and TCP.
    pub listen: Vec<String>,
    /// LAN discovery with mDNS.
    pub mdns: bool,
    /// Where accepted invites go by default.
    pub invites_parent: Option<PathBuf>,
}

/// Listen addresses when none are given: every interface, QUIC and TCP, free ports.
pub const DEFAULT_LISTEN: [&str; 2] = ["/ip4/0.0.0.0/udp/0/quic-v1", "/ip4/0.0.0.0/tcp/0"];

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// Setup failed.
    #[error("{0}")]
    Setup(String),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> DaemonError + '_ {
    move |error| DaemonError::Setup(format!("{what}: {error}"))
}

/// Runs the node until Ctrl-C or SIGTERM.
pub fn run(home: &Home, options: RunOptions) -> Result<(), DaemonError> {
    let first_start = !home.root().join(crate::config::CONFIG_FILE).exists();
    let key = home.load_or_create_key().map_err(setup("device key"))?;
    let config = Config::load_or_create(home.root()).map_err(setup("config"))?;
    let api_address = options
        .api
        .clone()
        .unwrap_or_else(|| config.api_address.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("weft-io")
        .build()
        .map_err(setup("starting the runtime"))?;
    let listen_text: Vec<String> = if options.listen.is_empty() {
        DEFAULT_LISTEN.iter().map(|a| (*a).to_owned()).collect()
    } else {
        options.listen.clone()
    };
    let mut listen = Vec::new();
    for address in &listen_text {
        listen.push(
            address.parse::<libp2p::Multiaddr>().map_err(|error| {
                DaemonError::Setup(format!("listen address {address:?}: {error}"))
            })?,
        );
    }
    let net = NetOptions {
        listen,
        mdns: options.mdns,
        default_parent: options.invites_parent.clone(),
    };
    let (node, events) = {
        let _context = runtime.enter();
        Node::open(home.root(), key, config, Some(net)).map_err(setup("starting the node"))?
    };
    let node = Arc::new(node);
    if let Some(events) = events {
        runtime.spawn(node.clone().route(events));
    }
    if first_start && let Some(path) = &options.default_folder {
        let request = AddFolder {
            path: path.display().to_string(),
            // A random ID: two devices' default folders are different folders, and
            // one can be shared with the other.
            id: None,
            label: Some("Weft".into()),
        };
        match node.add_folder(request) {
            Ok(record) => println!("default folder: {} ({})", record.path, record.id),
            Err(error) => eprintln!("weft: could not create the default folder: {error}"),
        }
    }
    let result = runtime.block_on(serve(home, node.clone(), &api_address));
    node.shutdown();
    let _ = std::fs::remove_file(home.root().join(API_FILE));
    tracing::info!("stopped");
    result
}

async fn serve(home: &Home, node: Arc<Node>, api_address: &str) -> Result<(), DaemonError> {
    let listener = tokio::net::TcpListener::bind(api_address)
        .await
        .map_err(setup(
            "binding the control API (is another node using this address?)",
        ))?;
    let address = listener
        .local_addr()
        .map_err(setup("control API address"))?;
    let endpoint = ApiEndpoint {
        address: address.to_string(),
        pid: std::process::id(),
    };
    let endpoint_json = serde_json::to_string(&endpoint).map_err(setup("api.json"))?;
    crate::home::write_private_atomically(&home.root().join(API_FILE), endpoint_json.as_bytes())
        .map_err(setup("writing api.json"))?;
    println!("device ID: {}", node.device_id());
    for folder in node.folder_records() {
        println!("folder {}: {} ({})", folder.id, folder.path, folder.label);
    }
    println!("control API: http://{address}");
    tracing::info!(%address, device = %node.device_id(), "node running");
    axum::serve(listener, crate::api::router(node))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(setup("control API"))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}
