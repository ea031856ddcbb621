//! Guest RAM for the host-binding tests: an anonymous mapping at GPA 0,
//! read and written as table memory through memvisor-vtd's vm-memory
//! adapter (`VmMemory` over memvisor-hostmem's `GuestRam`).
#![allow(dead_code)]

use std::sync::Arc;

use memvisor_hostmem::{GuestRam, Mapping, RamRegion};
use memvisor_types::Gpa;

/// `mapping` as guest RAM starting at GPA 0.
pub fn guest_ram(mapping: &Arc<Mapping>) -> GuestRam {
    let region = RamRegion::new(Gpa::new(0), mapping.clone()).expect("RAM region");
    GuestRam::new(vec![region]).expect("guest RAM")
}
