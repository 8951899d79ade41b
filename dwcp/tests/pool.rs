//! The connection pool over real loopback sockets: a second migration to the same destination reuses
//! the first one's authenticated streams, and replaces streams that died while parked.

mod common;

use std::time::Duration;

use common::*;
use dwcp::{ConnectionPool, Listener, Migration, MigrationConfig};
use dwcp_core::memory::GuestRam;
use dwcp_core::sim::ContentMix;

/// A destination that receives `sessions` migrations in turn and returns their reports.
fn receive_sessions(
    sessions: usize,
) -> (
    std::net::SocketAddr,
    std::thread::JoinHandle<Vec<dwcp::ReceiveReport>>,
) {
    let listener =
        Listener::bind("127.0.0.1:0".parse().unwrap(), psk(4), receiver_config()).unwrap();
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        (0..sessions)
            .map(|_| {
                let incoming = listener.accept().unwrap();
                let ram = GuestRam::anonymous(incoming.layout().clone()).unwrap();
                incoming.receive_into(&ram).unwrap()
            })
            .collect()
    });
    (addr, t)
}

fn migrate(addr: std::net::SocketAddr, pool: &ConnectionPool, seed: u64) -> dwcp::MigrationReport {
    let g = guest(8 << 20, ContentMix::IDLE_GUEST, seed);
    g.start_workload(2 << 20, seed);
    Migration::new(addr, psk(4))
        .connection_pool(pool.clone())
        .config(MigrationConfig {
            streams: 3,
            max_streams: 3,
            ..source_config()
        })
        .run(&*g, &mut g.dirty_log(), &mut g.control())
        .unwrap()
}

#[test]
fn a_second_migration_reuses_the_parked_streams() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("dwcp=debug")
        .with_test_writer()
        .try_init();
    let (addr, rx) = receive_sessions(3);
    let relay = CuttingProxy::start(addr);
    let pool = ConnectionPool::new(Duration::from_secs(30));
    let first = migrate(relay.addr(), &pool, 1);
    assert_eq!(relay.accepted(), 3, "three streams connected");
    assert_eq!(pool.idle_streams(), 3, "and were parked");
    let second = migrate(relay.addr(), &pool, 2);
    assert_eq!(
        relay.accepted(),
        3,
        "no new connection: the parked streams were reused"
    );
    assert_eq!(pool.idle_streams(), 3);
    assert_ne!(
        first.session_id, second.session_id,
        "a new session on the same streams"
    );
    // Streams that die while parked fail their health check and are replaced by new connections.
    relay.cut_all();
    let third = migrate(relay.addr(), &pool, 3);
    assert_eq!(
        relay.accepted(),
        6,
        "three new connections replaced the dead ones"
    );
    let reports = rx.join().unwrap();
    let ids: Vec<&str> = reports.iter().map(|r| r.session_id.as_str()).collect();
    assert_eq!(
        ids,
        [&first.session_id, &second.session_id, &third.session_id]
    );
    assert!(reports.iter().all(|r| r.digest_match && r.streams == 3));
}
