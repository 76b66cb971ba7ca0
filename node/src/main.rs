//! `weft`: the Weft device node and its command line.
//!
//! `weft [--home DIR] COMMAND`. `run` starts the node; `id` prints this device's ID;
//! the other commands talk to the running node through its control API. The command
//! line and its `--json` output are a contract that scripts and the benchmark driver
//! rely on (`docs/cli.md`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use weft_node::client::Client;
use weft_node::daemon::{self, RunOptions};
use weft_node::folder::ScanResult;
use weft_node::home::Home;
use weft_node::node::{AcceptInvite, AddDevice, AddFolder, DeviceView, NodeStatus, ShareFolder};
use weft_node::store::FolderRecord;
use weft_protocol::wire::Role;

/// Weft: peer-to-peer folder sync.
#[derive(Parser, Debug)]
#[command(name = "weft", version, about)]
struct Cli {
    /// Folder holding this node's key, config and database.
    #[arg(long, env = "WEFT_HOME", global = true)]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the node in the foreground (Ctrl-C stops it).
    Run {
        /// Control API address (host:port; port 0 picks a free one).
        #[arg(long)]
        api: Option<String>,
        /// Listen address for peers (multiaddr, repeatable); default: all
        /// interfaces, QUIC and TCP, free ports.
        #[arg(long)]
        listen: Vec<String>,
        /// Do not discover peers on the LAN with mDNS.
        #[arg(long)]
        no_mdns: bool,
        /// Folder to create and share on first start.
        #[arg(long, conflicts_with = "no_default_folder")]
        default_folder: Option<PathBuf>,
        /// Do not create a default folder on first start.
        #[arg(long)]
        no_default_folder: bool,
    },
    /// Print this device's ID (works without a running node).
    Id,
    /// Show the node's state, folders and peers.
    Status {
        /// Machine-readable output (documented in docs/cli.md).
        #[arg(long)]
        json: bool,
    },
    /// Manage folders.
    #[command(subcommand)]
    Folder(FolderCommand),
    /// Manage devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Invites received: list them, or accept or decline one.
    Invites {
        #[command(subcommand)]
        command: Option<InviteCommand>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List the versions of a file.
    Versions {
        /// The file (a path inside a folder).
        path: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Restore a version of a file (it becomes the newest version).
    Restore {
        /// The file (a path inside a folder).
        path: PathBuf,
        /// Version index from `weft versions` (default: the previous content).
        #[arg(long)]
        version: Option<usize>,
        /// Write it to this path instead (inside the same folder).
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// List conflict copies and the files they conflict with.
    Conflicts {
        /// Folder ID; all folders if omitted.
        folder: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Rescan a folder (or all) now and wait for the result.
    Scan {
        /// Folder ID; all folders if omitted.
        folder: Option<String>,
        /// Only these paths inside the folder.
        #[arg(long = "path")]
        paths: Vec<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DeviceCommand {
    /// Accept a device (and dial it at the given addresses).
    Add {
        /// Its device ID.
        id: String,
        /// A name for it.
        #[arg(long)]
        name: Option<String>,
        /// A multiaddr to reach it at (repeatable).
        #[arg(long = "addr")]
        addresses: Vec<String>,
    },
    /// List devices.
    List {
        /// Devices that connected but are not accepted.
        #[arg(long)]
        pending: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Forget a device.
    Remove {
        /// Its device ID.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum InviteCommand {
    /// Accept an invite (also accepts the inviting device).
    Accept {
        /// Folder ID.
        folder: String,
        /// Where to put the folder (default ~/Weft/LABEL, which must be empty or
        /// absent). A directory named here that already holds files is shared as is.
        #[arg(long)]
        path: Option<PathBuf>,
        /// The inviting device, when several invite to the same folder.
        #[arg(long)]
        from: Option<String>,
    },
    /// Decline an invite.
    Decline {
        /// Folder ID.
        folder: String,
        /// The inviting device, when several invite to the same folder.
        #[arg(long)]
        from: Option<String>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum PermissionArg {
    /// Receives the folder, changes nothing.
    View,
    /// Also changes files.
    Edit,
    /// Also adds and removes view and edit members.
    Admin,
    /// Also makes and removes admins and owners.
    Owner,
}

#[derive(Subcommand, Debug)]
enum FolderCommand {
    /// Share a folder with a device (invites it).
    Share {
        /// Folder ID.
        folder: String,
        /// The device's ID.
        device: String,
        /// What it may do.
        #[arg(long, value_enum, default_value = "edit")]
        perm: PermissionArg,
    },
    /// Remove a device from a folder's access list: no member sends it anything more,
    /// its later changes are refused everywhere, and it is disconnected. It keeps what
    /// it already had.
    Unshare {
        /// Folder ID.
        folder: String,
        /// The device's ID.
        device: String,
    },
    /// Add a folder (created if missing).
    Add {
        /// Where the folder is.
        path: PathBuf,
        /// Folder ID (random if omitted).
        #[arg(long)]
        id: Option<String>,
        /// Label (the directory name if omitted).
        #[arg(long)]
        label: Option<String>,
    },
    /// List folders.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Forget a folder; its files are left on disk.
    Remove {
        /// Folder ID.
        id: String,
    },
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    match execute(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("weft: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// glibc gives each thread that allocates its own malloc arena, up to 8 per core, and
/// keeps what is freed in an arena for that arena. Block buffers (256 KiB-1 MiB) are
/// allocated on many blocking-pool threads, so a node serving an initial sync held
/// 110-120 MiB at its peak; with one arena per core, 50 MiB (same speed, measured on
/// the bench machine). Runs before any other thread exists.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    let arenas = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    let arenas = libc::c_int::try_from(arenas).unwrap_or(2);
    // SAFETY: `mallopt` only sets an allocator parameter; it is called first thing in
    // `main`, while this is the only thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn default_folder() -> Option<PathBuf> {
    directories::UserDirs::new().map(|dirs| dirs.home_dir().join("Weft"))
}

fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let home = Home::locate(cli.home)?;
    match cli.command {
        Command::Run {
            api,
            listen,
            no_mdns,
            default_folder: folder,
            no_default_folder,
        } => {
            init_logging();
            let options = RunOptions {
                api,
                default_folder: if no_default_folder {
                    None
                } else {
                    folder.or_else(default_folder)
                },
                listen,
                mdns: !no_mdns,
                invites_parent: default_folder(),
            };
            daemon::run(&home, options)?;
        }
        Command::Id => {
            let key = home
                .load_or_create_key()
                .context("loading the device key")?;
            println!("{}", key.device_id());
        }
        Command::Status { json } => {
            let client = Client::connect(home.root())?;
            let status: serde_json::Value = client.get("/v1/status")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                let status: NodeStatus = serde_json::from_value(status)?;
                print_status(&status);
            }
        }
        Command::Folder(FolderCommand::Add { path, id, label }) => {
            let client = Client::connect(home.root())?;
            let path = std::path::absolute(&path)
                .with_context(|| format!("resolving {}", path.display()))?;
            let record: FolderRecord = client.post(
                "/v1/folders",
                &AddFolder {
                    path: path.display().to_string(),
                    id,
                    label,
                },
            )?;
            println!("{}", record.id);
        }
        Command::Folder(FolderCommand::List { json }) => {
            let client = Client::connect(home.root())?;
            let folders: Vec<FolderRecord> = client.get("/v1/folders")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&folders)?);
            } else {
                for folder in folders {
                    println!("{}\t{}\t{}", folder.id, folder.label, folder.path);
                }
            }
        }
        Command::Folder(FolderCommand::Remove { id }) => {
            let client = Client::connect(home.root())?;
            client.delete(&format!("/v1/folders/{id}"))?;
            println!("removed folder {id} (its files are still on disk)");
        }
        Command::Folder(FolderCommand::Share {
            folder,
            device,
            perm,
        }) => {
            let client = Client::connect(home.root())?;
            let permission = match perm {
                PermissionArg::View => Role::View,
                PermissionArg::Edit => Role::Edit,
                PermissionArg::Admin => Role::Admin,
                PermissionArg::Owner => Role::Owner,
            };
            let _: FolderRecord = client.post(
                &format!("/v1/folders/{folder}/share"),
                &ShareFolder { device, permission },
            )?;
            println!("shared {folder}; the device sees the invite when it connects");
        }
        Command::Folder(FolderCommand::Unshare { folder, device }) => {
            let client = Client::connect(home.root())?;
            client.delete(&format!("/v1/folders/{folder}/share/{device}"))?;
            println!(
                "unshared {folder} with {device}: it gets nothing more from any member and its later changes are refused; it keeps what it already had"
            );
        }
        Command::Device(DeviceCommand::Add {
            id,
            name,
            addresses,
        }) => {
            let client = Client::connect(home.root())?;
            let _: serde_json::Value = client.post(
                "/v1/devices",
                &AddDevice {
                    id,
                    name,
                    addresses,
                },
            )?;
        }
        Command::Device(DeviceCommand::List { pending, json }) => {
            let client = Client::connect(home.root())?;
            if pending {
                let pending: serde_json::Value = client.get("/v1/devices/pending")?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&pending)?);
                } else {
                    for device in pending.as_array().into_iter().flatten() {
                        println!(
                            "{}\t{}",
                            device["id"].as_str().unwrap_or(""),
                            device["address"].as_str().unwrap_or("")
                        );
                    }
                }
            } else {
                let devices: Vec<DeviceView> = client.get("/v1/devices")?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&devices)?);
                } else {
                    for device in devices {
                        let state = match &device.connection {
                            Some(c) => format!(
                                "connected {} (in {} B, out {} B)",
                                c.address, c.bytes_in, c.bytes_out
                            ),
                            None => "not connected".into(),
                        };
                        match &device.refused {
                            Some(refused) => println!(
                                "{}\t{}\t{}\tFLAGGED: {refused}",
                                device.id, device.name, state
                            ),
                            None => println!("{}\t{}\t{}", device.id, device.name, state),
                        }
                    }
                }
            }
        }
        Command::Device(DeviceCommand::Remove { id }) => {
            let client = Client::connect(home.root())?;
            client.delete(&format!("/v1/devices/{id}"))?;
        }
        Command::Invites { command, json } => {
            let client = Client::connect(home.root())?;
            match command {
                None => {
                    let invites: Vec<weft_node::node::InviteView> = client.get("/v1/invites")?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&invites)?);
                    } else if invites.is_empty() {
                        println!("no pending invites");
                    } else {
                        println!("FOLDER\tLABEL\tROLE OFFERED\tFROM");
                        for invite in invites {
                            println!(
                                "{}\t{}\t{}\t{} ({})",
                                invite.invite.folder,
                                invite.invite.label,
                                invite.invite.role,
                                invite.from_name,
                                invite.from,
                            );
                            match (&invite.place_note, &invite.place) {
                                (Some(note), _) => println!("  {note}"),
                                (None, Some(place)) => {
                                    println!("  accepting without --path puts it at {place}")
                                }
                                (None, None) => {}
                            }
                        }
                    }
                }
                Some(InviteCommand::Accept { folder, path, from }) => {
                    // A directory that holds files is taken only when named: say so.
                    let shared_files = path.as_ref().is_some_and(|path| {
                        std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_some())
                    });
                    let path = match path {
                        Some(path) => Some(
                            std::path::absolute(&path)
                                .with_context(|| format!("resolving {}", path.display()))?
                                .display()
                                .to_string(),
                        ),
                        None => None,
                    };
                    let record: FolderRecord = client.post(
                        &format!("/v1/invites/{folder}/accept"),
                        &AcceptInvite { path, from },
                    )?;
                    println!("accepted {} at {}", record.id, record.path);
                    if shared_files {
                        println!(
                            "note: {} already held files; they are now shared with the folder's members",
                            record.path
                        );
                    }
                }
                Some(InviteCommand::Decline { folder, from }) => {
                    let _: serde_json::Value = client.post(
                        &format!("/v1/invites/{folder}/decline"),
                        &serde_json::json!({ "from": from }),
                    )?;
                }
            }
        }
        Command::Versions { path, json } => {
            let client = Client::connect(home.root())?;
            let (folder, relative) = locate(&client, &path)?;
            let versions: Vec<weft_node::folder::VersionInfo> = client.get(&format!(
                "/v1/folders/{folder}/versions?path={}",
                url_encode(&relative)
            ))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&versions)?);
            } else if versions.is_empty() {
                println!("no versions of {relative} in folder {folder}");
            } else {
                for version in versions {
                    println!(
                        "{}\t{}\t{} bytes\t{}\tby {}",
                        version.index,
                        format_time(version.mtime_ns),
                        version.size,
                        if version.deleted { "deleted" } else { "" },
                        version.author.get(..7).unwrap_or(&version.author)
                    );
                }
            }
        }
        Command::Restore { path, version, to } => {
            let client = Client::connect(home.root())?;
            let (folder, relative) = locate(&client, &path)?;
            let to = match to {
                Some(to) => {
                    let (to_folder, to_relative) = locate(&client, &to)?;
                    anyhow::ensure!(to_folder == folder, "--to must be in the same folder");
                    Some(to_relative)
                }
                None => None,
            };
            let written: serde_json::Value = client.post(
                &format!("/v1/folders/{folder}/restore"),
                &weft_node::api::RestoreRequest {
                    path: relative,
                    version,
                    to,
                },
            )?;
            println!("restored {}", written["path"].as_str().unwrap_or_default());
        }
        Command::Conflicts { folder, json } => {
            let client = Client::connect(home.root())?;
            let folders: Vec<FolderRecord> = client.get("/v1/folders")?;
            let mut found = Vec::new();
            for record in folders
                .iter()
                .filter(|f| folder.as_ref().is_none_or(|id| f.id.as_str() == id))
            {
                let files: Vec<weft_node::node::FileInfo> =
                    client.get(&format!("/v1/folders/{}/files", record.id))?;
                for file in files {
                    if let Some(original) = weft_node::engine::conflict_original(&file.path) {
                        found.push(serde_json::json!({
                            "folder": record.id.to_string(),
                            "copy": file.path,
                            "original": original,
                        }));
                    }
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else if found.is_empty() {
                println!("no conflicts");
            } else {
                for conflict in found {
                    println!(
                        "{}\t{}\tconflicts with {}",
                        conflict["folder"].as_str().unwrap_or_default(),
                        conflict["copy"].as_str().unwrap_or_default(),
                        conflict["original"].as_str().unwrap_or_default()
                    );
                }
            }
        }
        Command::Scan {
            folder,
            paths,
            json,
        } => {
            let client = Client::connect(home.root())?;
            let progress = (!json).then(|| spawn_scan_progress(&home));
            let request = weft_node::api::ScanRequest { folder, paths };
            let results: std::collections::BTreeMap<String, ScanResult> =
                client.post("/v1/scan", &request)?;
            if let Some(bar) = progress {
                bar.finish_and_clear();
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                let mut problems = 0;
                for (id, result) in &results {
                    println!(
                        "{id}: {} entries, {} changes, {} problems",
                        result.seen,
                        result.changes,
                        result.problems.len()
                    );
                    for problem in &result.problems {
                        println!("  {}: {}", problem.path, problem.error);
                    }
                    problems += result.problems.len();
                }
                if problems > 0 {
                    return Ok(ExitCode::from(3));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A progress bar fed by the node's scan progress events, on a background thread.
fn spawn_scan_progress(home: &Home) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("scanning");
    bar.enable_steady_tick(Duration::from_millis(200));
    let root = home.root().to_path_buf();
    let feed = bar.clone();
    std::thread::spawn(move || {
        if let Ok(client) = Client::connect(&root) {
            let _ = client.follow_events(|event| {
                if event["type"] == "scan_progress" {
                    feed.set_length(event["bytes_to_hash"].as_u64().unwrap_or(0));
                    feed.set_position(event["bytes_hashed"].as_u64().unwrap_or(0));
                }
                !feed.is_finished()
            });
        }
    });
    bar
}

/// The folder holding `path` and the path relative to it.
fn locate(client: &Client, path: &std::path::Path) -> anyhow::Result<(String, String)> {
    let absolute = std::path::absolute(path)?;
    // Folder paths are canonical; canonicalise the deepest existing ancestor.
    let mut existing = absolute.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        let name = existing
            .file_name()
            .map(|n| n.to_os_string())
            .ok_or_else(|| anyhow::anyhow!("{} is not inside a folder", path.display()))?;
        rest.push(name);
        existing.pop();
    }
    let mut resolved = existing.canonicalize()?;
    for name in rest.into_iter().rev() {
        resolved.push(name);
    }
    let folders: Vec<FolderRecord> = client.get("/v1/folders")?;
    for folder in folders {
        if let Ok(relative) = resolved.strip_prefix(&folder.path)
            && let Some(relative) = relative.to_str()
            && !relative.is_empty()
        {
            return Ok((folder.id.to_string(), relative.to_owned()));
        }
    }
    anyhow::bail!(
        "{} is not inside any folder (`weft folder list`)",
        path.display()
    )
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn format_time(mtime_ns: i64) -> String {
    let seconds = mtime_ns.div_euclid(1_000_000_000);
    format!("@{seconds}")
}

fn print_status(status: &NodeStatus) {
    println!("device {} ({})", status.device_id, status.device_name);
    if status.folders.is_empty() {
        println!("no folders; add one with `weft folder add PATH`");
    }
    for folder in &status.folders {
        println!(
            "folder {} ({}) at {}: {:?}, {} files, {} dirs, {} bytes, need {} files / {} bytes",
            folder.id,
            folder.label,
            folder.path,
            folder.state,
            folder.files,
            folder.directories,
            folder.bytes,
            folder.need_files,
            folder.need_bytes
        );
        if let Some(progress) = &folder.progress {
            println!(
                "  scanning: {}/{} files, {}/{} bytes",
                progress.files_hashed,
                progress.files_to_hash,
                progress.bytes_hashed,
                progress.bytes_to_hash
            );
        }
        for problem in &folder.problems {
            println!("  problem: {}: {}", problem.path, problem.error);
        }
        match &folder.role {
            Some(role) => println!("  this device's role: {role}"),
            None => println!(
                "  this device's role: none yet (waiting for the folder's access list, or removed)"
            ),
        }
        for path in &folder.local_only {
            println!("  local only (view-only folder, not sent): {path}");
        }
        for refused in &folder.refused {
            println!(
                "  FLAGGED device {}: {} change(s) refused, last: {}",
                refused.device, refused.count, refused.reason
            );
        }
    }
    println!("listening on: {}", status.listen.join(" "));
    for peer in &status.peers {
        println!(
            "peer {} ({}) at {}: in {} B, out {} B, bad blocks {}",
            peer.device_id, peer.name, peer.address, peer.bytes_in, peer.bytes_out, peer.bad_blocks
        );
    }
}
