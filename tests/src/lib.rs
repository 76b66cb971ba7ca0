//! `weft-tests`: black-box tests that run the real `weft` and `weft-relay` binaries.
//!
//! The tests live in `tests/tests.rs` (one test binary, as in ripgrep); this library
//! holds what they share: finding the built binaries, running nodes in temp homes,
//! generating trees, and waiting for conditions with a deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use weft_node::client::Client;
use weft_node::node::{FileInfo, NodeStatus};

/// API key written into test homes.
pub const TEST_API_KEY: &str = "weft-test-api-key-0123456789";

/// Path of a binary built from this workspace (`weft`, `weft-relay`), next to the
/// test executable's `deps/` directory. `scripts/test` builds the binaries first.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// Runs `weft --home HOME ARGS...` to completion.
pub fn weft(home: &Path, args: &[&str]) -> Output {
    Command::new(binary("weft"))
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .expect("running weft")
}

/// Polls `condition` every 20 ms until it is true or `limit` passes; returns the time
/// it took, or `None` on timeout.
pub fn wait_for(limit: Duration, mut condition: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if condition() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Settings of a test node's `config.toml`.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Watch the filesystem.
    pub watch: bool,
    /// Debounce in milliseconds.
    pub debounce_ms: u64,
    /// Full rescan interval in seconds (large: only the watcher or a requested scan
    /// finds changes).
    pub full_rescan_interval_s: u64,
    /// Seconds after which a scan removes one of the node's unchanged temp files.
    pub temp_file_expiry_s: u64,
    /// The user's home directory the node sees (`HOME`; where `~/Weft` is).
    pub user_home: Option<PathBuf>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            watch: true,
            debounce_ms: 100,
            full_rescan_interval_s: 86_400,
            temp_file_expiry_s: 86_400,
            user_home: None,
        }
    }
}

/// A running `weft run` process with its home; killed when dropped.
pub struct TestNode {
    /// The node home.
    pub home: PathBuf,
    child: Option<Child>,
}

impl TestNode {
    /// Writes `config.toml` (if absent) and starts `weft run` in `home`, waiting until its
    /// control API answers.
    pub fn start(home: &Path, config: &NodeConfig) -> TestNode {
        Self::start_with(home, config, &[])
    }

    /// Like [`TestNode::start`], running the node through `wrapper` (e.g. setpriv).
    pub fn start_with(home: &Path, config: &NodeConfig, wrapper: &[&str]) -> TestNode {
        std::fs::create_dir_all(home).expect("create home");
        let config_path = home.join("config.toml");
        if !config_path.exists() {
            std::fs::write(
                &config_path,
                format!(
                    "api_key = \"{TEST_API_KEY}\"\ndevice_name = \"test\"\nwatch = {}\ndebounce_ms = {}\nfull_rescan_interval_s = {}\ntemp_file_expiry_s = {}\n",
                    config.watch,
                    config.debounce_ms,
                    config.full_rescan_interval_s,
                    config.temp_file_expiry_s
                ),
            )
            .expect("write config");
        }
        let _ = std::fs::remove_file(home.join("api.json"));
        let log = std::fs::File::create(home.join("node.log")).expect("log file");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary("weft"));
                command
            }
            None => Command::new(binary("weft")),
        };
        if let Some(user_home) = &config.user_home {
            command.env("HOME", user_home);
        }
        let child = command
            .arg("--home")
            .arg(home)
            // Loopback only, no LAN discovery: tests never leave this machine.
            .args([
                "run",
                "--no-default-folder",
                "--no-mdns",
                "--listen",
                "/ip4/127.0.0.1/udp/0/quic-v1",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
            ])
            .env(
                "RUST_LOG",
                std::env::var("WEFT_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start weft run");
        let node = TestNode {
            home: home.to_path_buf(),
            child: Some(child),
        };
        let up = wait_for(Duration::from_secs(20), || {
            Client::connect(home)
                .and_then(|c| c.get::<serde_json::Value>("/v1/status"))
                .is_ok()
        });
        assert!(up.is_some(), "node did not start:\n{}", node.log());
        node
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("node.log")).unwrap_or_default()
    }

    /// A control API client.
    pub fn client(&self) -> Client {
        Client::connect(&self.home).expect("connect to node")
    }

    /// The node's status.
    pub fn status(&self) -> NodeStatus {
        self.client().get("/v1/status").expect("status")
    }

    /// Adds a folder and returns its ID.
    pub fn add_folder(&self, path: &Path, id: &str) -> String {
        let output = weft(
            &self.home,
            &["folder", "add", path.to_str().unwrap(), "--id", id],
        );
        assert!(output.status.success(), "folder add failed: {output:?}");
        id.to_owned()
    }

    /// Runs a full scan of `folder` and waits for it.
    pub fn scan(&self, folder: &str) -> serde_json::Value {
        self.client()
            .post("/v1/scan", &serde_json::json!({ "folder": folder }))
            .expect("scan")
    }

    /// The folder's local tree as the node recorded it.
    pub fn files(&self, folder: &str) -> Vec<FileInfo> {
        self.client()
            .get(&format!("/v1/folders/{folder}/files"))
            .expect("files")
    }

    /// Process ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `kill -9`: the node gets no chance to clean up.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait (up to 30 s) for a clean exit; returns its exit status success.
    pub fn stop(mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let exited = wait_for(Duration::from_secs(30), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if exited.is_none() {
            let _ = child.kill();
        }
        child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `count` files of `size` bytes under `root` in nested directories
/// (`d{i/100}/f{i}.bin`), each with different content.
pub fn write_tree(root: &Path, count: usize, size: usize, seed: u64) {
    for index in 0..count {
        let dir = root.join(format!("d{:03}", index / 100));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join(format!("f{index}.bin")),
            pseudo_random(size, seed + index as u64),
        )
        .expect("write");
    }
}

impl TestNode {
    /// This node's device ID.
    pub fn id(&self) -> String {
        self.status().device_id
    }

    /// The node's QUIC listen address on loopback.
    pub fn address(&self) -> String {
        let found = wait_for(Duration::from_secs(10), || {
            self.status().listen.iter().any(|a| a.contains("/quic-v1"))
        });
        assert!(found.is_some(), "node has no listen address");
        self.status()
            .listen
            .into_iter()
            .find(|a| a.contains("/quic-v1"))
            .unwrap_or_default()
    }

    /// Accepts `other` with its address, on this node only.
    pub fn add_device(&self, other: &TestNode) {
        let output = weft(
            &self.home,
            &["device", "add", &other.id(), "--addr", &other.address()],
        );
        assert!(output.status.success(), "device add failed: {output:?}");
    }

    /// True if `other` is connected to this node.
    pub fn connected_to(&self, other_id: &str) -> bool {
        self.status().peers.iter().any(|p| p.device_id == other_id)
    }

    /// Shares `folder` with `other` as an editor, which accepts it into `path`; both
    /// must already accept each other.
    pub fn share_with(&self, folder: &str, other: &TestNode, path: &Path) {
        self.share_as(folder, other, path, "edit");
    }

    /// Shares `folder` with `other` in `role` (`view`, `edit`, `admin`, `owner`),
    /// which accepts it into `path`.
    pub fn share_as(&self, folder: &str, other: &TestNode, path: &Path, role: &str) {
        let output = weft(
            &self.home,
            &["folder", "share", folder, &other.id(), "--perm", role],
        );
        assert!(output.status.success(), "share failed: {output:?}");
        let invited = wait_for(Duration::from_secs(30), || {
            let invites: serde_json::Value = other.client().get("/v1/invites").expect("invites");
            invites
                .as_array()
                .is_some_and(|list| list.iter().any(|i| i["invite"]["folder"] == folder))
        });
        assert!(invited.is_some(), "invite never arrived:\n{}", other.log());
        let output = weft(
            &other.home,
            &[
                "invites",
                "accept",
                folder,
                "--path",
                path.to_str().unwrap(),
            ],
        );
        assert!(output.status.success(), "accept failed: {output:?}");
    }

    /// Bytes received from connected peers so far (this process's counters).
    pub fn bytes_in(&self) -> u64 {
        self.status().peers.iter().map(|p| p.bytes_in).sum()
    }
}

/// Connects each node to the next (only neighbours know each other), adds `roots[0]`
/// on the first node as folder `label`, and shares it along the chain: node `i`
/// invites node `i + 1`, which accepts into `roots[i + 1]`. Every node that invites
/// the next one is an admin (only owners and admins share); the last is an editor.
pub fn share_along(nodes: &[&TestNode], roots: &[&Path], label: &str) {
    for pair in nodes.windows(2) {
        connect(pair[0], pair[1]);
    }
    nodes[0].add_folder(roots[0], label);
    for (index, pair) in nodes.windows(2).enumerate() {
        let role = if index + 2 < nodes.len() {
            "admin"
        } else {
            "edit"
        };
        pair[0].share_as(label, pair[1], roots[index + 1], role);
        if index + 2 < nodes.len() {
            // The next node shares only once its access list says it is an admin.
            let admin = wait_for(Duration::from_secs(30), || {
                pair[1]
                    .status()
                    .folders
                    .iter()
                    .any(|f| f.id == label && f.role.as_deref() == Some("admin"))
            });
            assert!(
                admin.is_some(),
                "the access list never reached {}:\n{}",
                pair[1].id(),
                pair[1].log()
            );
        }
    }
}

/// Connects two nodes both ways (each accepts the other with its address).
pub fn connect(a: &TestNode, b: &TestNode) {
    a.add_device(b);
    b.add_device(a);
    let b_id = b.id();
    let up = wait_for(Duration::from_secs(30), || a.connected_to(&b_id));
    assert!(
        up.is_some(),
        "nodes did not connect:\n{}\n{}",
        a.log(),
        b.log()
    );
}

/// What a folder holds: relative path -> kind and content hash. Weft's own `.weft*`
/// names are left out; conflict copies are included.
pub fn tree_digest(root: &Path) -> std::collections::BTreeMap<String, String> {
    let mut digest = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".weft") {
                continue;
            }
            let relative = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                digest.insert(relative, "dir".into());
                stack.push(path);
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).unwrap_or_default();
                digest.insert(relative, format!("link:{}", target.display()));
            } else if let Ok(bytes) = std::fs::read(&path) {
                digest.insert(relative, blake3::hash(&bytes).to_hex().to_string());
            }
        }
    }
    digest
}

/// Waits until every folder holds the same tree; returns it, or panics with the
/// difference and the nodes' logs.
pub fn wait_converged(
    roots: &[&Path],
    nodes: &[&TestNode],
    limit: Duration,
) -> std::collections::BTreeMap<String, String> {
    let mut last = Vec::new();
    let converged = wait_for(limit, || {
        last = roots.iter().map(|root| tree_digest(root)).collect();
        last.windows(2).all(|pair| pair[0] == pair[1])
    });
    if converged.is_none() {
        let logs: Vec<String> = nodes.iter().map(|n| n.log()).collect();
        panic!(
            "trees did not converge:\n{last:#?}\n\nlogs:\n{}",
            logs.join("\n-----\n")
        );
    }
    last.into_iter().next().unwrap_or_default()
}
