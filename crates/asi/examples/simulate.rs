//! Replays VM-exit traces on the two SMT siblings of a core under each
//! mitigation strategy and prints the comparison table.
//!
//! ```text
//! cargo run --release -p memvisor-asi --example simulate [-- OPTIONS]
//!   --exits N          exits per sibling of each example workload (default 20000)
//!   --trace FILE       also replay FILE (text trace format, see memvisor_asi::sim::Trace::parse);
//!                      sibling 1 runs it rotated by half
//!   --dump WORKLOAD    print the generated trace of an example workload and exit
//! ```

use std::process::ExitCode;

use memvisor_asi::sim::{
    Costs, Strategy, Trace, Workload, WorkloadResult, directions, format_table, simulate, simulate_workloads,
};

struct Options {
    exits: usize,
    trace: Option<String>,
    dump: Option<String>,
}

fn options() -> Result<Options, String> {
    let mut o = Options { exits: 20_000, trace: None, dump: None };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--exits" => o.exits = value()?.parse().map_err(|e| format!("--exits: {e}"))?,
            "--trace" => o.trace = Some(value()?),
            "--dump" => o.dump = Some(value()?),
            "--help" | "-h" => {
                return Err(String::from("see the comment at the top of examples/simulate.rs"));
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.exits == 0 {
        return Err(String::from("--exits must be at least 1"));
    }
    Ok(o)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("simulate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let o = options()?;
    if let Some(name) = &o.dump {
        let w = Workload::ALL.iter().find(|w| w.name == name).ok_or(format!("no workload {name:?}"))?;
        print!("{}", w.generate(1, o.exits));
        return Ok(());
    }
    let costs = Costs::default();
    println!("ASI mitigation cost model: two SMT siblings, {} exits each, per workload.", o.exits);
    println!("Costs (assumptions, not measurements): {costs}.");
    println!();
    for w in Workload::ALL {
        println!("- {}: {}", w.name, w.assumptions);
    }
    println!();
    let mut results = simulate_workloads(&Workload::ALL, o.exits, &costs);
    if let Some(path) = &o.trace {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        let trace = Trace::parse(&text).map_err(|e| format!("{path}: {e}"))?;
        let other = trace.rotated(trace.events.len() / 2);
        let user = Workload { name: "user trace", assumptions: "", shape: Workload::COMPUTE.shape };
        let rows = Strategy::COMPARED.iter().map(|&s| simulate([&trace, &other], s, &costs)).collect();
        results.push(WorkloadResult { workload: user, results: rows });
    }
    print!("{}", format_table(&results));
    println!();
    println!("Published directions (reference/asi.md, seed 002):");
    let checks = directions(&results);
    for d in &checks {
        println!("  [{}] {}\n        model: {}", if d.holds { "ok" } else { "NO" }, d.claim, d.model);
    }
    if checks.iter().all(|d| d.holds) {
        Ok(())
    } else {
        Err(String::from("the model does not reproduce every published direction"))
    }
}
