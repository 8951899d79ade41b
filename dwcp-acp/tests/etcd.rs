//! The etcd backend against real etcd processes (scripts/setup.sh installs etcd; without it these
//! tests fail on purpose): the conformance suite on one member and on three, liveness leases,
//! and the time bound on an etcd that does not answer.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dwcp_acp::etcd::EtcdRegistry;
use dwcp_acp::etcd::testing::EtcdCluster;
use dwcp_acp::{AcpError, Holding, NodeRecord, Registry, VmId, conformance};

const TIMEOUT: Duration = Duration::from_secs(5);

fn node(id: u64) -> NodeRecord {
    NodeRecord {
        id,
        name: format!("host{id}"),
        migration_addr: format!("127.0.0.1:{}", 7000 + id),
        agent_addr: format!("127.0.0.1:{}", 8000 + id),
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_a_single_member() {
    init_tracing();
    let cluster = EtcdCluster::start(1).unwrap();
    let registry = EtcdRegistry::connect(&cluster.endpoints(), "/conformance", TIMEOUT)
        .await
        .unwrap();
    conformance::check_registry(Arc::new(registry), "single").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_three_members() {
    init_tracing();
    let cluster = EtcdCluster::start(3).unwrap();
    let registry = EtcdRegistry::connect(&cluster.endpoints(), "/conformance", TIMEOUT)
        .await
        .unwrap();
    let registry: Arc<dyn Registry> = Arc::new(registry);
    conformance::check_registry(registry.clone(), "three").await;

    // A client of one member sees what was committed through the others (linearizable reads).
    for endpoint in cluster.endpoints() {
        let single = EtcdRegistry::connect(&[endpoint], "/conformance", TIMEOUT)
            .await
            .unwrap();
        let a = VmId::new("three-a").unwrap();
        assert_eq!(
            single.ownership(&a).await.unwrap(),
            registry.ownership(&a).await.unwrap()
        );
    }

    // A record survives losing a member, and the fence keeps growing on the new leader.
    let vm = VmId::new("survivor").unwrap();
    let first = registry.register(&vm, 1).await.unwrap();
    let leader = cluster.leader().expect("a leader");
    cluster.kill(leader).unwrap();
    let begun = retry(|| registry.begin_handoff(&vm, 1, first.fence, 2)).await;
    assert!(begun.fence > first.fence);
    assert_eq!(begun.holding, Holding::HandingOver { to: 2 });
    cluster.restart(leader).unwrap();
    cluster.wait_healthy(Duration::from_secs(30)).unwrap();
    let only_restarted = EtcdRegistry::connect(
        &[cluster.endpoint(leader).unwrap()],
        "/conformance",
        TIMEOUT,
    )
    .await
    .unwrap();
    assert_eq!(only_restarted.ownership(&vm).await.unwrap(), Some(begun));
}

/// Retries `op` while it fails indeterminately (a leader election), up to ten seconds. Only for
/// operations whose retry is refused if the first try committed: the test then fails loudly.
async fn retry<T, F, Fut>(mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, AcpError>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match op().await {
            Ok(value) => return value,
            Err(e) if e.is_indeterminate() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liveness_record_expires_after_its_guard_is_dropped() {
    init_tracing();
    let cluster = EtcdCluster::start(1).unwrap();
    let registry = EtcdRegistry::connect(&cluster.endpoints(), "/lease", TIMEOUT)
        .await
        .unwrap();
    // Membership records are not leased: they stay when liveness goes.
    registry.put_node(node(1)).await.unwrap();
    assert!(matches!(
        registry
            .keep_node_alive(NodeRecord { id: 0, ..node(1) }, Duration::from_secs(1))
            .await,
        Err(AcpError::UnknownNode(0))
    ));

    let one = registry
        .keep_node_alive(node(1), Duration::from_secs(1))
        .await
        .unwrap();
    let two = registry
        .keep_node_alive(node(2), Duration::from_secs(1))
        .await
        .unwrap();
    let ttl = one.ttl();
    assert!(ttl >= Duration::from_secs(1), "{one:?}");
    assert_eq!(registry.live_nodes().await.unwrap(), vec![node(1), node(2)]);

    // Renewals keep both alive well past the TTL.
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(registry.live_nodes().await.unwrap(), vec![node(1), node(2)]);

    // Revoking removes at once; dropping lets the lease run out.
    two.revoke().await.unwrap();
    assert_eq!(registry.live_nodes().await.unwrap(), vec![node(1)]);
    let dropped = Instant::now();
    drop(one);
    let gone = loop {
        if registry.live_nodes().await.unwrap().is_empty() {
            break dropped.elapsed();
        }
        assert!(
            dropped.elapsed() < ttl + Duration::from_secs(3),
            "record outlived its lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // It lived on until (about) the TTL since the last renewal, a third of a TTL before the drop.
    assert!(gone >= ttl / 2, "expired after {gone:?}, TTL {ttl:?}");
    assert_eq!(registry.nodes().await.unwrap(), vec![node(1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswering_etcd_times_out_within_the_bound() {
    init_tracing();
    let bound = Duration::from_millis(500);
    let slack = Duration::from_millis(400);
    let vm = VmId::new("vm-1").unwrap();

    // Nothing listens: refused connections, the request cannot be sent.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = EtcdRegistry::connect(&[format!("http://127.0.0.1:{port}")], "/dead", bound)
        .await
        .unwrap();
    let started = Instant::now();
    let error = dead.register(&vm, 1).await.unwrap_err();
    assert!(
        started.elapsed() < bound + slack,
        "took {:?}",
        started.elapsed()
    );
    // Refused at once: unavailable, naming the endpoint to check.
    assert!(
        matches!(&error, AcpError::Unavailable(m) if m.contains(&format!("127.0.0.1:{port}"))),
        "{error:?}"
    );
    assert!(error.is_indeterminate());

    // A member that accepts connections but answers nothing (stopped): a timeout.
    let cluster = EtcdCluster::start(1).unwrap();
    let registry = EtcdRegistry::connect(&cluster.endpoints(), "/paused", bound)
        .await
        .unwrap();
    registry.register(&vm, 1).await.unwrap();
    cluster.pause(0).unwrap();
    for _ in 0..2 {
        let started = Instant::now();
        let error = registry.ownership(&vm).await.unwrap_err();
        assert!(
            started.elapsed() < bound + slack,
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(error, AcpError::Timeout(bound));
    }
    cluster.resume(0).unwrap();
    assert_eq!(
        retry(|| registry.ownership(&vm)).await.map(|r| r.owner),
        Some(1)
    );
}

/// Throughput and handoff latency on three members with etcd's default timing. Not a
/// benchmark (see benches/): a quick figure. `cargo test -p dwcp-acp --test etcd -- --ignored
/// --nocapture measure`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn measure_throughput_and_handoff_latency() {
    let cluster = EtcdCluster::start(3).unwrap();
    let writers = 64;
    let run = Duration::from_secs(5);
    let registry: Arc<dyn Registry> = Arc::new(
        EtcdRegistry::connect(&cluster.endpoints(), "/measure", TIMEOUT)
            .await
            .unwrap(),
    );
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let registry = registry.clone();
            tokio::spawn(async move {
                let vm = VmId::new(format!("vm-{w}")).unwrap();
                let mut record = registry.register(&vm, 1).await.unwrap();
                let (mut ops, mut handoffs) = (1u64, Vec::new());
                while started.elapsed() < run {
                    let to = if record.owner == 1 { 2 } else { 1 };
                    let t = Instant::now();
                    let begun = registry
                        .begin_handoff(&vm, record.owner, record.fence, to)
                        .await
                        .unwrap();
                    record = registry
                        .commit_handoff(&vm, begun.owner, begun.fence, to)
                        .await
                        .unwrap();
                    handoffs.push(t.elapsed());
                    ops += 2;
                }
                (ops, handoffs)
            })
        })
        .collect();
    let (mut ops, mut handoffs) = (0, Vec::new());
    for task in tasks {
        let (o, h) = task.await.unwrap();
        ops += o;
        handoffs.extend(h);
    }
    let elapsed = started.elapsed();
    handoffs.sort();
    let pct = |p: f64| handoffs[((handoffs.len() - 1) as f64 * p) as usize];
    println!(
        "{writers} writers, 3 members: {:.0} changes/s; begin+commit handoff p50 {:?} p99 {:?} \
         ({} handoffs)",
        ops as f64 / elapsed.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        handoffs.len()
    );
    let single = Instant::now();
    let vm = VmId::new("solo").unwrap();
    let mut record = registry.register(&vm, 1).await.unwrap();
    let mut alone = Vec::new();
    for _ in 0..200 {
        let to = if record.owner == 1 { 2 } else { 1 };
        let t = Instant::now();
        let begun = registry
            .begin_handoff(&vm, record.owner, record.fence, to)
            .await
            .unwrap();
        record = registry
            .commit_handoff(&vm, begun.owner, begun.fence, to)
            .await
            .unwrap();
        alone.push(t.elapsed());
    }
    alone.sort();
    println!(
        "one writer: begin+commit handoff p50 {:?} p99 {:?} ({:?} for 200)",
        alone[100],
        alone[197],
        single.elapsed()
    );
}
