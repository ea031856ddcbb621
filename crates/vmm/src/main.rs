//! `memvisor`: the reference VMM of the memvisor memory-virtualization stack.
//!
//! Without a subcommand it runs `memvisor demo`, the built-in demo VM on KVM
//! (what `cargo run --release` runs; see [`stack_demo`]); `memvisor demo
//! --engine` is the translation-engine demo without KVM; `memvisor run
//! --kernel FILE` boots a multiboot kernel on KVM with the reference
//! platform (see [`run`]).

mod demo;
mod iommu;
mod machine;
mod run;
mod stack_demo;

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
    /// Run the built-in demo VM on KVM (the default command): a guest
    /// programs VT-d in scalable mode (first-stage nested over stage-2 via
    /// the host binding), issues edu DMAs at many IOVAs and checks the data
    /// while the host discards, punches holes, converts and moves memory;
    /// prints a report and exits 0 only if every check passed.
    Demo {
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Which demo VM to run.
        #[arg(long, value_enum, default_value_t = stack_demo::Variant::Nested)]
        variant: stack_demo::Variant,
        /// Run the translation-engine demo (no KVM) instead of the VM.
        #[arg(long)]
        engine: bool,
        /// Translation-engine demo: number of guest pages to map and check.
        #[arg(long, default_value_t = 4096)]
        pages: u64,
    },
    /// Boot a multiboot kernel (e.g. a kvm-unit-tests .flat) on KVM with the
    /// reference platform: serial on stdout, isa-debug-exit, fw_cfg, PCI with
    /// an optional edu device, an I/O APIC, an optional VT-d unit. Exits with
    /// the guest's isa-debug-exit status ((value << 1) | 1); 2 = setup error,
    /// 4 = guest crash, 124 = timeout.
    Run(run::RunArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default =
        Command::Demo { json: false, variant: stack_demo::Variant::Nested, engine: false, pages: 4096 };
    let result = match cli.command.unwrap_or(default) {
        Command::Demo { engine: true, pages, .. } => demo::run(pages),
        Command::Demo { json, variant, .. } => stack_demo::main(json, variant),
        Command::Run(args) => {
            return match run::run(&args) {
                Ok(status) => std::process::ExitCode::from(status),
                Err(failure) => {
                    eprintln!("memvisor: error: {:#}", failure.error);
                    std::process::ExitCode::from(failure.status)
                }
            };
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memvisor: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
