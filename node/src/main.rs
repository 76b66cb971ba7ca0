//! `weft`: the Weft device node and its command line.
//!
//! `weft [--home DIR] COMMAND`. `run` starts the node; `id` prints this device's ID.
//! The command line is a contract that scripts and the benchmark driver rely on.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use weft_node::home::Home;

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
    /// Start the node (for now: create the identity and print the device ID).
    Run,
    /// Print this device's ID.
    Id,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("weft: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> anyhow::Result<()> {
    let home = Home::locate(cli.home)?;
    match cli.command {
        Command::Id => {
            let key = home
                .load_or_create_key()
                .context("loading the device key")?;
            println!("{}", key.device_id());
        }
        Command::Run => {
            let key = home
                .load_or_create_key()
                .context("loading the device key")?;
            println!("device ID: {}", key.device_id());
            println!("home: {}", home.root().display());
        }
    }
    Ok(())
}
