//! Many migrations leaving one host at once, over real loopback sockets: one destination listener
//! receives them all concurrently, the sources share one connection pool, one buffer pool (smaller
//! than all their batches together) and one uplink cap. Every guest arrives byte-identical, and no
//! source's stream is routed into another's session.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use dwcp::{ConnectionPool, HostUplink, Listener, Migration, MigrationConfig};
use dwcp_core::memory::{GuestRam, MemorySource};
use dwcp_core::pool::BufferPool;
use dwcp_core::sim::ContentMix;

const MIGRATIONS: usize = 8;

#[test]
fn concurrent_migrations_through_one_listener_and_shared_pools_all_arrive_intact() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("dwcp=info")
        .with_test_writer()
        .try_init();
    let guests: Vec<_> = (0..MIGRATIONS)
        .map(|i| {
            let mix = if i % 2 == 0 {
                ContentMix::IDLE_GUEST
            } else {
                ContentMix::RANDOM
            };
            guest(4 << 20, mix, 100 + i as u64)
        })
        .collect();
    let dests: Vec<GuestRam> = guests
        .iter()
        .map(|g| GuestRam::anonymous(g.layout().clone()).unwrap())
        .collect();
    let listener =
        Listener::bind("127.0.0.1:0".parse().unwrap(), psk(9), receiver_config()).unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = ConnectionPool::new(Duration::from_secs(30));
    // 32 MiB for eight migrations whose batches (16 MiB each) would take four times that: they must
    // take turns, and a
    // migration waiting for buffers must not hold some of them while it waits.
    let buffers = BufferPool::new(32 << 20).unwrap();
    let uplink = HostUplink::new(2_000_000_000).unwrap();
    for g in &guests {
        g.start_workload(1 << 20, 7);
    }

    let (sent, received) = std::thread::scope(|s| {
        let (dests, listener) = (&dests, &listener);
        let receiver = s.spawn(move || {
            std::thread::scope(|r| {
                let handles: Vec<_> = dests
                    .iter()
                    .enumerate()
                    .map(|(slot, dest)| {
                        let incoming = listener.accept_source().unwrap();
                        (slot, r.spawn(move || incoming.receive_into(dest).unwrap()))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|(slot, h)| (slot, h.join().unwrap()))
                    .collect::<Vec<_>>()
            })
        });
        let senders: Vec<_> = guests
            .iter()
            .map(|g| {
                let migration = Migration::new(addr, psk(9))
                    .connection_pool(connections.clone())
                    .config(MigrationConfig {
                        buffer_pool: Some(buffers.clone()),
                        streams: 2,
                        max_streams: 2,
                        ..source_config()
                    });
                let share = uplink.join(&migration, 1.0, None).unwrap();
                s.spawn(move || {
                    let report = migration.run(&**g, &mut g.dirty_log(), &mut g.control());
                    drop(share);
                    report
                })
            })
            .collect();
        let sent: Vec<_> = senders
            .into_iter()
            .map(|h| h.join().unwrap().expect("every migration completes"))
            .collect();
        (sent, receiver.join().unwrap())
    });

    assert_eq!(listener.running_sessions(), 0, "every session ended");
    assert!(
        uplink.shares().is_empty(),
        "every migration left the uplink"
    );
    let by_session: HashMap<_, _> = received
        .into_iter()
        .map(|(slot, r)| (r.session_id.clone(), (slot, r)))
        .collect();
    assert_eq!(by_session.len(), MIGRATIONS, "distinct sessions");
    for (g, report) in guests.iter().zip(&sent) {
        let (slot, recv) = &by_session[&report.session_id];
        assert_eq!(recv.digest, report.digest);
        g.stop();
        assert_same_memory(&**g, &dests[*slot]);
    }
    let stats = buffers.stats();
    assert!(stats.peak_in_use_bytes <= stats.budget_bytes);
    assert_eq!(stats.in_use_bytes, 0, "every buffer went back");
}
