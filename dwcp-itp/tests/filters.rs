//! Every filter, the NoFit reasons, reservations, batches and evacuation.

use dwcp_itp::{ItpError, NoFitReasons, NodeId, NodeView, Placer, VmRequest, Weights};

const GIB: u64 = 1 << 30;

fn node(id: NodeId, free_gib: u64) -> NodeView {
    NodeView {
        id,
        name: format!("n{id}"),
        alive: true,
        cordoned: false,
        memory_total: 64 * GIB,
        memory_free: free_gib * GIB,
        cpu_load: 0.2,
        vcpus_free: 16,
        zone: "z".into(),
        link_to: vec![],
        vms: 0,
        anti_affinity_groups: vec![],
    }
}

fn vm(name: &str, gib: u64) -> VmRequest {
    VmRequest {
        vm: name.into(),
        memory: gib * GIB,
        vcpus: 2,
        ..VmRequest::default()
    }
}

fn reasons(e: ItpError) -> NoFitReasons {
    match e {
        ItpError::NoFit { reasons, .. } => *reasons,
        e => panic!("expected NoFit, got {e:?}"),
    }
}

/// Node 1 is the only good one; node 2 is altered by `bad`. The request must go to node 1 and,
/// with node 1 full, fail with node 2 counted under the expected reason.
fn filter_case(
    bad: impl Fn(&mut NodeView, &mut VmRequest),
    check: impl Fn(&NoFitReasons) -> usize,
) {
    let mut n2 = node(2, 60); // node 2 would score best
    let mut req = vm("v", 8);
    bad(&mut n2, &mut req);
    let mut p = Placer::new(vec![node(1, 40), n2.clone()], Weights::default());
    assert_eq!(p.place(&req).unwrap().node, 1);
    let mut p = Placer::new(vec![node(1, 0), n2], Weights::default());
    let r = reasons(p.place(&req).unwrap_err());
    assert!(r.memory >= 1, "node 1 lacks memory: {r:?}");
    assert_eq!(check(&r), 1, "{r:?}");
    assert_eq!(r.nodes, 2);
}

#[test]
fn dead_nodes_are_filtered() {
    filter_case(|n, _| n.alive = false, |r| r.dead);
}

#[test]
fn cordoned_nodes_are_filtered() {
    filter_case(|n, _| n.cordoned = true, |r| r.cordoned);
}

#[test]
fn the_source_is_filtered() {
    filter_case(|_, r| r.source = Some(2), |r| r.source);
}

#[test]
fn forbidden_nodes_are_filtered() {
    filter_case(|_, r| r.forbidden = vec![7, 2], |r| r.forbidden);
}

#[test]
fn memory_is_filtered() {
    filter_case(|n, r| n.memory_free = r.memory - 1, |r| r.memory - 1); // node 1 is short too
}

#[test]
fn vcpus_are_filtered() {
    filter_case(|n, r| n.vcpus_free = r.vcpus - 1, |r| r.vcpus);
}

#[test]
fn anti_affinity_is_filtered() {
    filter_case(
        |n, r| {
            n.anti_affinity_groups = vec!["db".into()];
            r.anti_affinity = Some("db".into());
        },
        |r| r.anti_affinity,
    );
}

#[test]
fn exact_fit_is_allowed() {
    let mut p = Placer::new(vec![node(1, 8)], Weights::default());
    let mut r = vm("v", 8);
    r.vcpus = 16;
    let pl = p.place(&r).unwrap();
    assert_eq!(pl.node, 1);
    assert_eq!(pl.parts.headroom, 0.0);
    assert_eq!(p.node(1).unwrap().memory_free, 0);
    assert_eq!(p.node(1).unwrap().vcpus_free, 0);
    assert!(p.place(&vm("w", 0)).is_err(), "no vCPUs left");
}

#[test]
fn no_fit_counts_every_reason_and_says_what_to_do() {
    let mut dead = node(1, 60);
    dead.alive = false;
    let mut cordoned = node(2, 60);
    cordoned.cordoned = true;
    let small = node(4, 4);
    let mut few_cpus = node(5, 60);
    few_cpus.vcpus_free = 1;
    let mut grouped = node(6, 60);
    grouped.anti_affinity_groups = vec!["web".into()];
    let nodes = vec![
        dead,
        cordoned,
        node(3, 60),
        small,
        few_cpus,
        grouped,
        node(7, 60),
    ];
    let mut p = Placer::new(nodes, Weights::default());
    let mut req = vm("web-3", 8);
    req.source = Some(3);
    req.forbidden = vec![7];
    req.anti_affinity = Some("web".into());
    let err = p.place(&req).unwrap_err();
    let msg = err.to_string();
    let r = reasons(err);
    assert_eq!(
        (
            r.dead,
            r.cordoned,
            r.source,
            r.forbidden,
            r.memory,
            r.vcpus,
            r.anti_affinity
        ),
        (1, 1, 1, 1, 1, 1, 1)
    );
    assert_eq!(r.nodes, 7);
    assert_eq!(r.largest_free_memory, 60 * GIB);
    assert!(msg.contains("web-3"), "{msg}");
    assert!(
        msg.contains("1 dead") && msg.contains("1 short of memory"),
        "{msg}"
    );

    // Memory is the main reason: the message gives sizes.
    let mut p = Placer::new(vec![node(1, 2), node(2, 3)], Weights::default());
    let msg = p.place(&vm("big", 8)).unwrap_err().to_string();
    assert!(
        msg.contains("needs 8.0 GiB") && msg.contains("largest free is 3.0 GiB"),
        "{msg}"
    );

    let mut p = Placer::new(vec![], Weights::default());
    let msg = p.place(&vm("x", 1)).unwrap_err().to_string();
    assert!(msg.contains("no nodes"), "{msg}");
}

#[test]
fn reservations_are_seen_by_the_next_decision() {
    let mut p = Placer::new(vec![node(1, 10), node(2, 9)], Weights::default());
    assert_eq!(p.place(&vm("a", 8)).unwrap().node, 1);
    assert_eq!(p.node(1).unwrap().memory_free, 2 * GIB);
    assert_eq!(p.node(1).unwrap().vms, 1);
    assert_eq!(p.place(&vm("b", 8)).unwrap().node, 2);
    assert!(p.place(&vm("c", 8)).is_err());
    // Release makes room again.
    p.release(1, &vm("a", 8)).unwrap();
    assert_eq!(p.place(&vm("c", 8)).unwrap().node, 1);
}

#[test]
fn anti_affinity_applies_to_reserved_vms() {
    let mut p = Placer::new(vec![node(1, 60), node(2, 60)], Weights::default());
    let mut r = vm("db-1", 1);
    r.anti_affinity = Some("db".into());
    let a = p.place(&r).unwrap().node;
    let b = p.place(&r).unwrap().node;
    assert_ne!(a, b);
    assert_eq!(reasons(p.place(&r).unwrap_err()).anti_affinity, 2);
    p.release(a, &r).unwrap();
    assert_eq!(p.place(&r).unwrap().node, a);
    assert!(
        p.node(a)
            .unwrap()
            .anti_affinity_groups
            .contains(&"db".to_string())
    );
}

#[test]
fn non_converging_migrations_lose_to_slow_converging_ones() {
    let mut fast = node(1, 60);
    fast.link_to = vec![(9, 100e6)]; // 100 MB/s < dirty rate
    let mut slow = node(2, 10);
    slow.cpu_load = 0.9;
    slow.link_to = vec![(9, 300e6)];
    let mut p = Placer::new(vec![fast, slow], Weights::default());
    let mut r = vm("v", 8);
    r.source = Some(9);
    r.dirty_rate = 200e6;
    let pl = p.best(&r).unwrap();
    assert_eq!(pl.node, 2);
    assert!(pl.parts.converges);
    let t = pl.parts.migration_secs.unwrap();
    assert!((t - 8.0 * GIB as f64 / 100e6).abs() < 1e-6, "{t}");
    // Only the non-converging node fits: still placed, flagged, penalised.
    r.memory = 20 * GIB;
    let pl = p.best(&r).unwrap();
    assert_eq!(pl.node, 1);
    assert!(!pl.parts.converges && pl.parts.migration_secs.is_none());
    assert_eq!(pl.parts.migration, -100.0);
}

#[test]
fn faster_links_win_for_migrations() {
    let mut a = node(1, 40);
    a.link_to = vec![(9, 1e9)];
    let mut b = node(2, 40);
    b.link_to = vec![(9, 5e9)];
    let mut p = Placer::new(vec![a, b], Weights::default());
    let mut r = vm("v", 16);
    r.source = Some(9);
    assert_eq!(p.best(&r).unwrap().node, 2);
    r.source = None; // a new VM: bandwidth does not matter, tie broken by the index
    assert_eq!(p.best(&r).unwrap().score, p.best_by_scan(&r).unwrap().score);
}

#[test]
fn batch_places_the_largest_first() {
    // Holes of 8 and 4 GiB; input order small-first would put the 4 GiB VM into the 8 GiB hole.
    let mut p = Placer::new(vec![node(1, 8), node(2, 4)], Weights::default());
    let out = p.place_batch(&[vm("small", 4), vm("big", 8)]);
    assert_eq!(out[0].as_ref().unwrap().node, 2);
    assert_eq!(out[1].as_ref().unwrap().node, 1);

    let mut p = Placer::new(vec![node(1, 8), node(2, 4)], Weights::default());
    assert_eq!(p.place(&vm("small", 4)).unwrap().node, 1);
    assert!(p.place(&vm("big", 8)).is_err(), "why the batch sorts");
}

#[test]
fn evacuate_cordons_and_moves_everything_elsewhere() {
    let mut src = node(1, 0);
    src.vms = 3;
    let mut p = Placer::new(vec![src, node(2, 20), node(3, 20)], Weights::default());
    let vms: Vec<_> = (0..3).map(|i| vm(&format!("v{i}"), 8)).collect();
    let out = p.evacuate(1, &vms).unwrap();
    assert!(p.node(1).unwrap().cordoned);
    let dest: Vec<_> = out.iter().map(|r| r.as_ref().unwrap().node).collect();
    assert!(dest.iter().all(|&d| d != 1), "{dest:?}");
    let free: u64 = [2, 3].iter().map(|&n| p.node(n).unwrap().memory_free).sum();
    assert_eq!(free, 40 * GIB - 24 * GIB);
    assert!(matches!(
        p.evacuate(42, &vms),
        Err(ItpError::UnknownNode(42))
    ));
}

#[test]
fn update_node_replaces_the_view() {
    let mut p = Placer::new(vec![node(1, 10), node(2, 5)], Weights::default());
    assert_eq!(p.best(&vm("v", 4)).unwrap().node, 1);
    let mut n1 = node(1, 10);
    n1.alive = false;
    p.update_node(n1);
    assert_eq!(p.best(&vm("v", 4)).unwrap().node, 2);
    // A new, bigger node: M changes, every index rebuilds.
    let mut n3 = node(3, 100);
    n3.memory_total = 128 * GIB;
    p.update_node(n3);
    assert_eq!(p.len(), 3);
    let b = p.best(&vm("v", 4)).unwrap();
    assert_eq!(b.node, 3);
    assert_eq!(b.score, p.best_by_scan(&vm("v", 4)).unwrap().score);
    assert!(p.set_cordoned(3, true).is_ok());
    assert_eq!(p.best(&vm("v", 4)).unwrap().node, 2);
    assert!(matches!(
        p.set_cordoned(9, true),
        Err(ItpError::UnknownNode(9))
    ));
}
