//! Property tests over random sequences of allocations, frees, instance
//! creation and destruction, enters, exits and accesses: the checker always
//! passes, no page ever holds two sensitivities, every space maps exactly
//! what its owner may see, and no CPU ever uses a stale translation (every
//! access agrees with the page tables as they are now, whatever its TLB
//! cached before).

use memvisor_asi::{
    Allocation, Asi, AsiConfig, ClassConfig, ClassId, CpuId, CpuMode, Error, ExitReason, InstanceId,
    NoMitigations, OwnerId, Sensitivity, SpaceId,
};
use memvisor_paging::Access;
use memvisor_types::{Address, Hpa, Hva};
use proptest::prelude::*;

const FRAME: u64 = 4096;
const CPUS: u32 = 2;

#[derive(Debug, Clone)]
enum Op {
    Alloc { kind: u8, size: u64 },
    Free { pick: usize },
    Create { owner: u32, kpti: bool },
    Destroy { pick: usize },
    Touch { cpu: u32, instance: usize, pick: usize, freed: bool, write: bool },
    Exit { cpu: u32 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, prop_oneof![1u64..=2048, 2049u64..=3 * FRAME]).prop_map(|(kind, size)| Op::Alloc { kind, size }),
        2 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => (1u32..=3, any::<bool>()).prop_map(|(owner, kpti)| Op::Create { owner, kpti }),
        1 => any::<usize>().prop_map(|pick| Op::Destroy { pick }),
        4 => (0..CPUS, any::<usize>(), any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(cpu, instance, pick, freed, write)| Op::Touch { cpu, instance, pick, freed, write }),
        1 => (0..CPUS).prop_map(|cpu| Op::Exit { cpu }),
    ]
}

fn sensitivity(kind: u8) -> Sensitivity {
    match kind {
        0 => Sensitivity::Sensitive,
        1 => Sensitivity::GlobalNonSensitive,
        k => Sensitivity::LocalNonSensitive(OwnerId(u32::from(k) - 1)),
    }
}

struct Model {
    asi: Asi,
    classes: [ClassId; 2],
    live: Vec<Allocation>,
    freed: Vec<Allocation>,
    instances: Vec<InstanceId>,
}

fn model() -> Model {
    let config = AsiConfig {
        table_frames: 128,
        data_frames: 24,
        cpus: CPUS,
        tlb_entries: 16,
        psc_entries: 4,
        ..AsiConfig::default()
    };
    let mut asi = Asi::new(config).expect("a configuration that fits");
    let kvm = asi.register_class(ClassConfig::kvm(Box::new(NoMitigations))).unwrap();
    let kpti = asi.register_class(ClassConfig::kpti()).unwrap();
    Model { asi, classes: [kvm, kpti], live: Vec::new(), freed: Vec::new(), instances: Vec::new() }
}

fn mapped(asi: &Asi, space: SpaceId, va: Hva) -> Option<Hpa> {
    asi.lookup(space, va).expect("a live space").ok().map(|t| t.addr)
}

/// Applies one operation, checking what it returns against the page tables.
fn apply(m: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    match *op {
        Op::Alloc { kind, size } => match m.asi.alloc(sensitivity(kind), size) {
            Ok(a) => {
                prop_assert!(a.len >= size);
                m.live.push(a);
            }
            Err(Error::OutOfMemory { .. }) => {}
            Err(e) => return Err(TestCaseError::fail(format!("alloc: {e}"))),
        },
        Op::Free { pick } if !m.live.is_empty() => {
            let a = m.live.swap_remove(pick % m.live.len());
            m.asi.free(a.va).map_err(|e| TestCaseError::fail(format!("free: {e}")))?;
            m.freed.push(a);
        }
        Op::Create { owner, kpti } => {
            let id = m.asi.create_instance(m.classes[usize::from(kpti)], OwnerId(owner)).unwrap();
            m.instances.push(id);
        }
        Op::Destroy { pick } if !m.instances.is_empty() => {
            let id = m.instances[pick % m.instances.len()];
            for cpu in 0..CPUS {
                if m.asi.cpu_mode(CpuId(cpu)).unwrap() == CpuMode::Restricted(id) {
                    m.asi.exit(CpuId(cpu), ExitReason::ContextSwitch).unwrap();
                }
            }
            m.asi.destroy_instance(id).unwrap();
            m.instances.retain(|&i| i != id);
        }
        Op::Touch { cpu, instance, pick, freed, write } => {
            let list = if freed { &m.freed } else { &m.live };
            if list.is_empty() {
                return Ok(());
            }
            let target = list[pick % list.len()];
            let cpu = CpuId(cpu);
            if let Some(&id) = m.instances.get(instance % m.instances.len().max(1)) {
                if let CpuMode::Restricted(current) = m.asi.cpu_mode(cpu).unwrap()
                    && current != id
                {
                    m.asi.exit(cpu, ExitReason::ContextSwitch).unwrap();
                }
                m.asi.enter(cpu, id).unwrap();
            }
            let space = match m.asi.cpu_mode(cpu).unwrap() {
                CpuMode::Full => SpaceId::Full,
                CpuMode::Restricted(id) => SpaceId::Restricted(id),
            };
            let in_space = mapped(&m.asi, space, target.va);
            let in_full = mapped(&m.asi, SpaceId::Full, target.va);
            let access = if write { Access::write() } else { Access::read() };
            match m.asi.access(cpu, target.va, access) {
                Ok(outcome) => {
                    prop_assert_eq!(
                        Some(outcome.pa),
                        in_full,
                        "the access must reach what the full space maps now"
                    );
                    prop_assert_eq!(outcome.exited, in_space.is_none(), "exit iff the space does not map it");
                }
                Err(Error::Fault { .. }) => {
                    prop_assert_eq!(in_full, None, "a fault only where nothing maps it")
                }
                Err(e) => return Err(TestCaseError::fail(format!("access: {e}"))),
            }
        }
        Op::Exit { cpu } => {
            m.asi.exit(CpuId(cpu), ExitReason::Explicit).unwrap();
        }
        Op::Free { .. } | Op::Destroy { .. } => {}
    }
    Ok(())
}

/// The invariants that hold after any sequence.
fn check(m: &Model) -> Result<(), TestCaseError> {
    let report = m.asi.check();
    prop_assert!(report.is_ok(), "{:?}", report.violations);
    prop_assert!(report.missing.is_empty(), "{:?}", report.missing);
    let mut spans: Vec<(u64, u64)> = m.live.iter().map(|a| (a.pa.raw(), a.pa.raw() + a.len)).collect();
    spans.sort_unstable();
    for pair in spans.windows(2) {
        prop_assert!(pair[0].1 <= pair[1].0, "allocations overlap: {pair:x?}");
    }
    for a in &m.live {
        // Every page an allocation touches holds only its sensitivity.
        let first = a.pa.raw() & !(FRAME - 1);
        for page in (first..a.pa.raw() + a.len).step_by(4096) {
            prop_assert_eq!(m.asi.frame_sensitivity(Hpa::new(page)), a.sensitivity);
        }
        prop_assert_eq!(mapped(&m.asi, SpaceId::Full, a.va), Some(a.pa));
        for &id in &m.instances {
            let owner = m.asi.owner(id).unwrap();
            let expected = a.sensitivity.visible_to(owner).then_some(a.pa);
            prop_assert_eq!(mapped(&m.asi, SpaceId::Restricted(id), a.va), expected, "{:?} in {}", a, id);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn random_operations_keep_every_isolation_invariant(ops in prop::collection::vec(op(), 1..48)) {
        let mut m = model();
        for op in &ops {
            apply(&mut m, op)?;
        }
        check(&m)?;
    }
}
