//! `memvisor`: the reference VMM of the memvisor memory-virtualization stack.
//!
//! Today the command runs the built-in demo of the translation engine (what
//! `cargo run --release` runs); the KVM-backed `run` command and the demo VM
//! arrive with the guest-memory, VT-d and reference-VMM issues.

mod demo;

use clap::{Parser, Subcommand};

/// memvisor: how a VM's addresses become host memory, kept correct and isolated.
#[derive(Debug, Parser)]
#[command(name = "memvisor", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a guest's page tables nested over a stage-2 table, translate
    /// through both, change the mappings and show that invalidated caches
    /// never return a stale translation (the default command).
    Demo {
        /// Number of guest pages to map and check.
        #[arg(long, default_value_t = 4096)]
        pages: u64,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Demo { pages: 4096 }) {
        Command::Demo { pages } => demo::run(pages),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memvisor: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
