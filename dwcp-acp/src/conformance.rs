//! The test suite every [`Registry`] backend must pass, so that the embedded raft cluster and
//! etcd mean the same thing by each operation. Backends' tests call [`check_registry`] on a live
//! cluster; VM names carry `prefix` so that several runs can share one cluster.

use std::sync::Arc;

use crate::{AcpError, Fence, Holding, NodeRecord, Registry, VmId};

/// Runs every semantic check against `registry`, whose configuration has at least nodes 1, 2
/// and 3. Panics, with the step that failed, on the first difference from the specification.
pub async fn check_registry(registry: Arc<dyn Registry>, prefix: &str) {
    let vm = |name: &str| VmId::new(format!("{prefix}-{name}")).unwrap();

    // Register, read back, refuse a second registration.
    let a = vm("a");
    assert_eq!(
        registry.ownership(&a).await.unwrap(),
        None,
        "unregistered VM read"
    );
    let first = registry.register(&a, 1).await.unwrap();
    assert_eq!((first.owner, first.holding), (1, Holding::Owned));
    assert_eq!(registry.ownership(&a).await.unwrap().as_ref(), Some(&first));
    match registry.register(&a, 2).await {
        Err(AcpError::AlreadyRegistered { current, .. }) => assert_eq!(current, first),
        other => panic!("second registration: {other:?}"),
    }

    // A handoff: wrong owner or stale fence refused, then begin and commit.
    assert!(matches!(
        registry.begin_handoff(&a, 2, first.fence, 3).await,
        Err(AcpError::Conflict { .. })
    ));
    assert!(matches!(
        registry
            .begin_handoff(&a, 1, Fence(first.fence.0 + 1), 3)
            .await,
        Err(AcpError::Conflict { .. })
    ));
    assert!(
        matches!(
            registry.commit_handoff(&a, 1, first.fence, 2).await,
            Err(AcpError::Conflict { .. })
        ),
        "commit without begin"
    );
    let begun = registry.begin_handoff(&a, 1, first.fence, 2).await.unwrap();
    assert_eq!(
        (begun.owner, begun.holding),
        (1, Holding::HandingOver { to: 2 })
    );
    assert!(
        begun.fence > first.fence,
        "fence must grow: {begun:?} after {first:?}"
    );
    // A second migration of the same VM cannot start.
    assert!(matches!(
        registry.begin_handoff(&a, 1, begun.fence, 3).await,
        Err(AcpError::Conflict { .. })
    ));
    // Commit must name the destination that was begun.
    assert!(matches!(
        registry.commit_handoff(&a, 1, begun.fence, 3).await,
        Err(AcpError::Conflict { .. })
    ));
    let moved = registry
        .commit_handoff(&a, 1, begun.fence, 2)
        .await
        .unwrap();
    assert_eq!((moved.owner, moved.holding), (2, Holding::Owned));
    assert!(moved.fence > begun.fence);
    assert_eq!(registry.ownership(&a).await.unwrap().as_ref(), Some(&moved));
    // The former owner is stale now: nothing it names is accepted.
    assert!(matches!(
        registry.abort_handoff(&a, 1, begun.fence).await,
        Err(AcpError::Conflict { .. })
    ));
    assert!(matches!(
        registry.commit_handoff(&a, 1, begun.fence, 2).await,
        Err(AcpError::Conflict { .. })
    ));
    assert!(matches!(
        registry.unregister(&a, 1, first.fence).await,
        Err(AcpError::Conflict { .. })
    ));

    // Abort gives the VM back to its owner.
    let b = vm("b");
    let b0 = registry.register(&b, 3).await.unwrap();
    let b1 = registry.begin_handoff(&b, 3, b0.fence, 1).await.unwrap();
    let b2 = registry.abort_handoff(&b, 3, b1.fence).await.unwrap();
    assert_eq!((b2.owner, b2.holding), (3, Holding::Owned));
    assert!(b2.fence > b1.fence);
    assert!(
        matches!(
            registry.commit_handoff(&b, 3, b1.fence, 1).await,
            Err(AcpError::Conflict { .. })
        ),
        "commit after abort"
    );

    // Unregister needs the current fence and no handoff in progress.
    let b3 = registry.begin_handoff(&b, 3, b2.fence, 2).await.unwrap();
    assert!(matches!(
        registry.unregister(&b, 3, b3.fence).await,
        Err(AcpError::Conflict { .. })
    ));
    let b4 = registry.abort_handoff(&b, 3, b3.fence).await.unwrap();
    registry.unregister(&b, 3, b4.fence).await.unwrap();
    assert_eq!(registry.ownership(&b).await.unwrap(), None);
    assert!(matches!(
        registry.begin_handoff(&b, 3, b4.fence, 2).await,
        Err(AcpError::NotRegistered { .. })
    ));

    // Node 0 and self-handoffs are refused.
    assert!(registry.register(&vm("zero"), 0).await.is_err());
    assert!(registry.begin_handoff(&a, 2, moved.fence, 2).await.is_err());

    // Listing is ordered and includes what this run registered.
    let c = vm("c");
    registry.register(&c, 1).await.unwrap();
    let listed: Vec<_> = registry
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|o| o.vm.as_str().starts_with(&format!("{prefix}-")))
        .collect();
    assert_eq!(
        listed.iter().map(|o| o.vm.clone()).collect::<Vec<_>>(),
        vec![a.clone(), c.clone()]
    );
    assert!(listed.windows(2).all(|w| w[0].vm < w[1].vm));

    // Members.
    let node = NodeRecord {
        id: 3,
        name: format!("{prefix}-host3"),
        migration_addr: "127.0.0.1:7003".into(),
        agent_addr: "127.0.0.1:8003".into(),
    };
    registry.put_node(node.clone()).await.unwrap();
    let nodes = registry.nodes().await.unwrap();
    assert!(nodes.contains(&node), "{nodes:?}");
    assert!(nodes.windows(2).all(|w| w[0].id < w[1].id));

    // Racing handoffs from one fence: exactly one wins, every other is refused.
    let d = vm("d");
    let d0 = registry.register(&d, 1).await.unwrap();
    let racers: Vec<_> = (0..16u64)
        .map(|i| {
            let registry = registry.clone();
            let d = d.clone();
            tokio::spawn(async move { registry.begin_handoff(&d, 1, d0.fence, 2 + i % 2).await })
        })
        .collect();
    let mut winners = 0;
    for racer in racers {
        match racer.await.unwrap() {
            Ok(_) => winners += 1,
            Err(AcpError::Conflict { .. }) => {}
            Err(e) => panic!("racing begin: {e}"),
        }
    }
    assert_eq!(winners, 1, "racing begin_handoff from one fence");
}
