//! What `memvisor demo` prints: a readable report, or one JSON object.

use std::fmt;

use serde::Serialize;

/// The VT-d unit: what the guest asked of it and what the binding did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VtdReport {
    /// Context-cache invalidations.
    pub context_cache: u64,
    /// IOTLB (second-stage) invalidations.
    pub iotlb: u64,
    /// PASID-cache invalidations.
    pub pasid_cache: u64,
    /// PASID-based IOTLB invalidations.
    pub piotlb: u64,
    /// Invalidation-wait descriptors.
    pub wait: u64,
    /// Times the queue stopped with FSTS.IQE.
    pub queue_errors: u64,
    /// Emulated translations (devices the unit translates itself).
    pub translations: u64,
    /// Of those, answered by the unit's IOTLB.
    pub iotlb_hits: u64,
    /// Guest-memory reads of the unit's table walks.
    pub table_reads: u64,
    /// Faults the unit recorded.
    pub faults_recorded: u64,
    /// Interrupt-entry-cache invalidations.
    pub iec: u64,
    /// Interrupts remapped through an IRTE.
    pub interrupts_remapped: u64,
    /// Interrupt-entry-cache hits.
    pub iec_hits: u64,
    /// Host binding: PASID entries bound (nested HWPT or parent).
    pub binds: u64,
    /// Host binding: bindings moved to a new HWPT.
    pub updates: u64,
    /// Host binding: bindings removed.
    pub unbinds: u64,
    /// Host binding: PASID-IOTLB invalidations forwarded to a nested HWPT.
    pub forwarded: u64,
    /// Host binding: refused entries and failed host operations.
    pub bind_errors: u64,
}

/// edu's MSIs through interrupt remapping.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InterruptReport {
    /// MSIs edu raised.
    pub raised: u64,
    /// Remapped to the vector the guest's IRTE holds.
    pub remapped_ok: u64,
    /// Remapped to another vector (a stale interrupt-entry cache).
    pub wrong_vector: u64,
    /// Blocked by a remapping fault.
    pub blocked: u64,
}

/// The guest's DMA jobs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobReport {
    /// Jobs whose data the guest checked and found right.
    pub checked_ok: u64,
    /// Jobs whose DMA faulted as it must (private memory).
    pub expected_faults: u64,
    /// Jobs where the guest read wrong data.
    pub data_errors: u64,
    /// Jobs that ended otherwise than expected (unexpected fault, missing fault).
    pub unexpected: u64,
}

/// Device DMA through the nested HWPT.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DmaReport {
    /// Pages translated.
    pub translated_pages: u64,
    /// Pages served from the IOTLB.
    pub iotlb_hits: u64,
    /// Pages that needed a (nested, two-dimensional) walk.
    pub iotlb_walks: u64,
    /// DMA translations that faulted.
    pub faults: u64,
    /// Distinct host pages the device wrote (the VMM's own dirty tracking:
    /// KVM's dirty log does not see device writes).
    pub device_written_pages: u64,
}

/// One kind of host event.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EventCount {
    /// Events performed.
    pub events: u64,
    /// Invalidations the host-memory notifier delivered for them.
    pub notifier_invalidations: u64,
    /// IOAS ranges unmapped for them (each drops its IOTLB entries).
    pub ioas_unmaps: u64,
}

impl fmt::Display for EventCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {})", self.events, self.notifier_invalidations, self.ioas_unmaps)
    }
}

/// Host events by source.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostEvents {
    /// Discards of anonymous guest RAM.
    pub host_discard: EventCount,
    /// Discards refused because the pages were pinned (EBUSY).
    pub discard_refused_pinned: u64,
    /// guest_memfd hole punches.
    pub hole_punch: EventCount,
    /// private ↔ shared conversions.
    pub conversion: EventCount,
    /// Memslot moves.
    pub slot_move: EventCount,
}

/// One phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseReport {
    /// What happened.
    pub name: String,
    /// Jobs the guest ran.
    pub jobs: u64,
    /// Jobs that ended as expected.
    pub ok: u64,
    /// Invalidations the guest queued (context, IOTLB, PASID cache,
    /// PASID-IOTLB, interrupt entry cache).
    pub guest_invalidations: u64,
    /// Pages in KVM's dirty logs (data and movable slots) after the phase.
    pub dirty_pages: u64,
    /// Pages the guest wrote that the dirty log missed.
    pub dirty_log_misses: u64,
}

/// The whole demo.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Which variant ran.
    pub variant: String,
    /// What the variant exercises.
    pub mode: String,
    /// Every check passed.
    pub passed: bool,
    /// The guest's jobs.
    pub jobs: JobReport,
    /// edu transfers.
    pub edu_transfers: u64,
    /// DMA translation.
    pub dma: DmaReport,
    /// The VT-d unit: guest invalidations by type, host binding.
    pub vtd: VtdReport,
    /// Interrupt remapping (`null` unless the variant uses it).
    pub interrupts: Option<InterruptReport>,
    /// Host events.
    pub host: HostEvents,
    /// Dirty pages harvested from KVM's log (sum over harvests).
    pub dirty_pages_harvested: u64,
    /// Distinct dirty pages.
    pub dirty_pages_distinct: u64,
    /// Per phase.
    pub phases: Vec<PhaseReport>,
    /// What went wrong, if anything.
    pub failures: Vec<String>,
    /// Wall time in milliseconds.
    pub wall_ms: f64,
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        #[allow(clippy::cast_precision_loss, reason = "a percentage for display")]
        let r = 100.0 * part as f64 / whole as f64;
        r
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "memvisor demo ({}): {}", self.variant, self.mode)?;
        writeln!(f)?;
        writeln!(f, "phases")?;
        for (i, p) in self.phases.iter().enumerate() {
            writeln!(
                f,
                "  {i}. {:<58} jobs {:>3} ok {:>3}  guest inv {:>2}  dirty {:>3}",
                p.name, p.jobs, p.ok, p.guest_invalidations, p.dirty_pages
            )?;
        }
        let j = &self.jobs;
        writeln!(f)?;
        writeln!(
            f,
            "DMAs        {} edu transfers; jobs checked ok {}, faulted as expected {}, wrong data {}, unexpected {}",
            self.edu_transfers, j.checked_ok, j.expected_faults, j.data_errors, j.unexpected
        )?;
        let d = &self.dma;
        if d.iotlb_hits + d.iotlb_walks > 0 {
            writeln!(
                f,
                "ioas IOTLB  {} pages translated: {} hits ({:.1}%), {} nested walks",
                d.translated_pages,
                d.iotlb_hits,
                pct(d.iotlb_hits, d.translated_pages),
                d.iotlb_walks,
            )?;
        }
        writeln!(f, "faults      {} DMA translations faulted", d.faults)?;
        let v = &self.vtd;
        writeln!(
            f,
            "guest QI    PASID-cache {}, PASID-IOTLB {}, IOTLB {}, context {}, wait {}; queue errors {}",
            v.pasid_cache, v.piotlb, v.iotlb, v.context_cache, v.wait, v.queue_errors
        )?;
        writeln!(
            f,
            "binding     {} bind, {} update, {} unbind, {} PASID-IOTLB forwarded to the nested HWPT, {} errors",
            v.binds, v.updates, v.unbinds, v.forwarded, v.bind_errors
        )?;
        if v.translations > 0 {
            writeln!(
                f,
                "VT-d IOTLB  {} emulated translations: {} hits ({:.1}%), {} table reads, {} faults recorded",
                v.translations,
                v.iotlb_hits,
                pct(v.iotlb_hits, v.translations),
                v.table_reads,
                v.faults_recorded
            )?;
        }
        if let Some(i) = &self.interrupts {
            writeln!(
                f,
                "interrupts  {} edu MSIs remapped: {} to the IRTE's vector, {} stale, {} blocked; {} IEC invalidations, {} IEC hits",
                i.raised, i.remapped_ok, i.wrong_vector, i.blocked, v.iec, v.iec_hits
            )?;
        }
        let h = &self.host;
        writeln!(
            f,
            "host        events (notifier invalidations, IOAS unmaps): discard {}, hole punch {}, conversion {}, slot move {}",
            h.host_discard, h.hole_punch, h.conversion, h.slot_move
        )?;
        writeln!(f, "pins        {} discard(s) of pinned memory refused (EBUSY)", h.discard_refused_pinned)?;
        writeln!(
            f,
            "dirty       {} pages harvested from KVM's log ({} distinct); {} pages written by the device",
            self.dirty_pages_harvested, self.dirty_pages_distinct, d.device_written_pages
        )?;
        writeln!(f, "wall time   {:.1} ms", self.wall_ms)?;
        for failure in &self.failures {
            writeln!(f, "FAILED      {failure}")?;
        }
        write!(f, "{}", if self.passed { "result      every check passed" } else { "result      FAILED" })
    }
}
