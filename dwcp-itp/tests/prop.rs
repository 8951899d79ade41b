//! The index against the full scan on random views and operation sequences; reservations never
//! overcommit.

use std::collections::HashMap;

use dwcp_itp::{NodeId, NodeView, Placer, VmRequest, Weights};
use proptest::prelude::*;

const U: u64 = 1 << 28; // 256 MiB units keep collisions (ties, exact fits) frequent

fn bw() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(1e8),
        Just(2e8),
        Just(5e8),
        Just(1e9),
        Just(f64::NAN),
        Just(-1.0),
        1e6..5e9f64,
    ]
}

fn group() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some("a".to_string())),
        1 => Just(Some("b".to_string())),
        1 => Just(Some("zz".to_string())),
    ]
}

fn node(id: NodeId) -> impl Strategy<Value = NodeView> {
    (
        prop::bool::weighted(0.9),
        prop::bool::weighted(0.1),
        1u64..16,
        0u64..18,
        prop_oneof![Just(0.0), Just(0.5), Just(1.0), 0.0..1.0f64, Just(f64::NAN)],
        0u32..8,
        0u32..6,
        prop::collection::vec("[ab]", 0..3),
        prop::collection::vec((0u64..14, bw()), 0..10),
    )
        .prop_map(
            move |(alive, cordoned, total, free, cpu_load, vcpus, vms, groups, links)| NodeView {
                id,
                name: format!("n{id}"),
                alive,
                cordoned,
                memory_total: total * U,
                memory_free: free * U, // may exceed total: clamped
                cpu_load,
                vcpus_free: vcpus,
                zone: String::new(),
                link_to: links,
                vms,
                anti_affinity_groups: groups,
            },
        )
}

fn request() -> impl Strategy<Value = VmRequest> {
    (
        0u64..10,
        0u32..5,
        prop_oneof![1 => Just(None), 3 => (0u64..14).prop_map(Some)],
        prop_oneof![Just(0.0), Just(1e8), Just(2e8), 0.0..2e9f64, Just(f64::NAN)],
        group(),
        prop::collection::vec(0u64..14, 0..3),
    )
        .prop_map(
            |(mem, vcpus, source, dirty_rate, anti_affinity, forbidden)| VmRequest {
                vm: "vm".into(),
                memory: mem * U,
                vcpus,
                source,
                dirty_rate,
                anti_affinity,
                forbidden,
            },
        )
}

#[derive(Debug, Clone)]
enum Op {
    Place(VmRequest),
    Batch(Vec<VmRequest>),
    Update(NodeView),
    Release(usize),
    Cordon(NodeId, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => request().prop_map(Op::Place),
        1 => prop::collection::vec(request(), 0..6).prop_map(Op::Batch),
        1 => (0u64..14).prop_flat_map(node).prop_map(Op::Update),
        1 => (0usize..100).prop_map(Op::Release),
        1 => (0u64..14, any::<bool>()).prop_map(|(n, c)| Op::Cordon(n, c)),
    ]
}

fn view() -> impl Strategy<Value = Vec<NodeView>> {
    (0usize..12).prop_flat_map(|n| (0..n as u64).map(node).collect::<Vec<_>>())
}

fn weights() -> impl Strategy<Value = Weights> {
    prop_oneof![
        3 => Just(Weights::default()),
        1 => (0.0..3.0f64, 0.0..3.0f64, 0.0..3.0f64, 0.0..3.0f64, 0.0..10.0f64, 0.1..100.0f64).prop_map(
            |(memory, cpu, migration, spread, non_convergence_penalty, reference_migration_secs)| Weights {
                memory, cpu, migration, spread, non_convergence_penalty, reference_migration_secs,
            }),
    ]
}

/// What the model expects per node: free memory and vCPUs.
type Model = HashMap<NodeId, (u64, u32)>;

fn model_of(p: &Placer) -> Model {
    p.nodes()
        .iter()
        .map(|n| (n.id, (n.memory_free, n.vcpus_free)))
        .collect()
}

fn reserve(model: &mut Model, p: &Placer, node: NodeId, r: &VmRequest, before: &NodeView) {
    let e = model.get_mut(&node).unwrap();
    e.0 = e.0.checked_sub(r.memory).expect("memory overcommitted");
    e.1 = e.1.checked_sub(r.vcpus).expect("vCPUs overcommitted");
    // The chosen node passed every filter before the reservation.
    assert!(before.alive && !before.cordoned);
    assert_ne!(Some(node), r.source);
    assert!(!r.forbidden.contains(&node));
    if let Some(g) = &r.anti_affinity {
        assert!(
            !before.anti_affinity_groups.contains(g),
            "anti-affinity violated"
        );
        assert!(p.node(node).unwrap().anti_affinity_groups.contains(g));
    }
}

fn check_model(model: &Model, p: &Placer) {
    for n in p.nodes() {
        assert!(n.memory_free <= n.memory_total);
        assert_eq!((n.memory_free, n.vcpus_free), model[&n.id], "node {}", n.id);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn index_matches_scan_and_never_overcommits(
        nodes in view(),
        w in weights(),
        small_lru in any::<bool>(),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let mut p = Placer::new(nodes, w);
        if small_lru {
            p.set_source_index_limit(2);
        }
        let mut model = model_of(&p);
        let mut placed: Vec<(NodeId, VmRequest)> = Vec::new();
        for op in ops {
            match op {
                Op::Place(r) => {
                    let scan = p.best_by_scan(&r);
                    let peek = p.best(&r);
                    let before = p.clone();
                    let got = p.place(&r);
                    match (&scan, &got) {
                        (Ok(s), Ok(g)) => {
                            prop_assert_eq!(s.score, g.score, "scan {:?} index {:?}", s, g);
                            prop_assert_eq!(peek.as_ref().unwrap(), g);
                            reserve(&mut model, &p, g.node, &r, before.node(g.node).unwrap());
                            placed.push((g.node, r.clone()));
                        }
                        (Err(s), Err(g)) => {
                            prop_assert_eq!(s, g);
                            prop_assert_eq!(peek.as_ref().unwrap_err(), g);
                        }
                        _ => prop_assert!(false, "scan {:?} index {:?}", scan, got),
                    }
                }
                Op::Batch(rs) => {
                    let out = p.place_batch(&rs);
                    prop_assert_eq!(out.len(), rs.len());
                    for (r, o) in rs.iter().zip(&out) {
                        if let Ok(pl) = o {
                            let e = model.get_mut(&pl.node).unwrap();
                            e.0 = e.0.checked_sub(r.memory).expect("memory overcommitted");
                            e.1 = e.1.checked_sub(r.vcpus).expect("vCPUs overcommitted");
                            placed.push((pl.node, r.clone()));
                        }
                    }
                }
                Op::Update(v) => {
                    let id = v.id;
                    p.update_node(v);
                    let n = p.node(id).unwrap();
                    model.insert(id, (n.memory_free, n.vcpus_free));
                    placed.retain(|(n, _)| *n != id);
                }
                Op::Release(i) => {
                    if !placed.is_empty() {
                        let (node, r) = placed.swap_remove(i % placed.len());
                        p.release(node, &r).unwrap();
                        let n = p.node(node).unwrap();
                        model.insert(node, (n.memory_free, n.vcpus_free));
                    }
                }
                Op::Cordon(id, c) => {
                    let known = p.node(id).is_some();
                    prop_assert_eq!(p.set_cordoned(id, c).is_ok(), known);
                }
            }
            check_model(&model, &p);
        }
    }

    #[test]
    fn evacuation_moves_nothing_onto_the_source(
        nodes in view(),
        vms in prop::collection::vec(request(), 0..10),
    ) {
        let Some(src) = nodes.first().map(|n| n.id) else { return Ok(()) };
        let mut p = Placer::new(nodes, Weights::default());
        let mut model = model_of(&p);
        let out = p.evacuate(src, &vms).unwrap();
        prop_assert!(p.node(src).unwrap().cordoned);
        for (r, o) in vms.iter().zip(&out) {
            if let Ok(pl) = o {
                prop_assert_ne!(pl.node, src);
                let e = model.get_mut(&pl.node).unwrap();
                e.0 = e.0.checked_sub(r.memory).expect("memory overcommitted");
                e.1 = e.1.checked_sub(r.vcpus).expect("vCPUs overcommitted");
            }
        }
        check_model(&model, &p);
    }
}

/// A larger random view (deeper trees than `view()`), from a seed: bandwidths from a few zones
/// so near-ties between bandwidth and static key are common, units that make ties and exact fits
/// frequent.
fn big_view(seed: u64, n: usize) -> Vec<NodeView> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..n as u64)
        .map(|id| {
            let total = rng.random_range(1u64..16) * U;
            NodeView {
                id,
                name: format!("n{id}"),
                alive: rng.random_bool(0.95),
                cordoned: rng.random_bool(0.05),
                memory_total: total,
                memory_free: rng.random_range(0..=total / U) * U,
                cpu_load: match rng.random_range(0..3) {
                    0 => 0.0,
                    1 => 0.5,
                    _ => rng.random_range(0.0..1.0),
                },
                vcpus_free: rng.random_range(0..16),
                zone: String::new(),
                link_to: (0..n as u64)
                    .filter_map(|j| {
                        let keep = j != id && rng.random_bool(0.9);
                        let b = if j % 4 == id % 4 { 1e9 } else { 2e8 };
                        let jitter = rng.random_range(0.5..1.5);
                        keep.then(|| (j, if rng.random_bool(0.5) { b } else { b * jitter }))
                    })
                    .collect(),
                vms: rng.random_range(0..6),
                anti_affinity_groups: if rng.random_bool(0.3) {
                    vec![["a", "b"][rng.random_range(0..2)].to_string()]
                } else {
                    vec![]
                },
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn index_matches_scan_on_larger_views(
        seed in any::<u64>(),
        n in 17usize..160,
        reqs in prop::collection::vec(request(), 1..120),
        sources in prop::collection::vec(0u64..160, 120),
    ) {
        let mut p = Placer::new(big_view(seed, n), Weights::default());
        let mut model = model_of(&p);
        for (k, mut r) in reqs.into_iter().enumerate() {
            // Sources over the whole view, a few of them (so their trees see many reservations).
            r.source = r.source.map(|_| sources[k % 4] % n as u64);
            r.forbidden.iter_mut().for_each(|f| *f = (*f * 11) % n as u64);
            let scan = p.best_by_scan(&r);
            let before = p.clone();
            let got = p.place(&r);
            match (&scan, &got) {
                (Ok(s), Ok(g)) => {
                    prop_assert_eq!(s.score, g.score, "scan {:?} index {:?}", s, g);
                    reserve(&mut model, &p, g.node, &r, before.node(g.node).unwrap());
                }
                (Err(s), Err(g)) => prop_assert_eq!(s, g),
                _ => prop_assert!(false, "scan {:?} index {:?}", scan, got),
            }
            check_model(&model, &p);
        }
    }
}
