//! `memvisor`: the reference VMM of the memvisor memory-virtualization stack.
//!
//! Today it prints its help and version; the `run`, `demo` and `bench`
//! subcommands arrive with the guest-memory, VT-d and reference-VMM issues.

fn main() {}
