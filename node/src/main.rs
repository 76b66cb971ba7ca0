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
use weft_node::node::{AddFolder, NodeStatus};
use weft_node::store::FolderRecord;

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
        /// Listen address for peers (used from the sync release on).
        #[arg(long)]
        listen: Vec<String>,
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
enum FolderCommand {
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
    let cli = Cli::parse();
    match execute(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("weft: {error:#}");
            ExitCode::FAILURE
        }
    }
}

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
            listen: _,
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
    }
    println!("peers: {}", status.peers.len());
}
