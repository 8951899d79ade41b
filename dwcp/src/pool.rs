//! The source's connection pool: authenticated streams kept after a migration so the next migration
//! to the same destination starts without connecting or authenticating again (on a long path that
//! saves several round trips per stream, and the kernel keeps each stream's congestion state).
//!
//! After a successful migration the source sends Park on every stream; the destination parks them
//! too and answers Park. A later migration with the same pool takes the streams parked for its peer
//! and key, checks each with Ping/Pong, opens the session on the first (SessionInit; SessionReady
//! carries the new session id) and joins the others with Join. Streams idle longer than the idle
//! time-out, or failing the check, are closed and replaced by new connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::session::{StreamReader, StreamWriter};

/// One parked, authenticated stream.
pub(crate) struct PooledStream {
    pub(crate) reader: StreamReader,
    pub(crate) writer: StreamWriter,
    /// Capabilities negotiated when the stream was authenticated.
    pub(crate) capabilities: u32,
    /// Session version negotiated then: it decides the form of the SessionInit sent on it.
    pub(crate) version: u8,
    parked_at: Instant,
}

impl PooledStream {
    pub(crate) fn new(
        reader: StreamReader,
        writer: StreamWriter,
        capabilities: u32,
        version: u8,
    ) -> Self {
        Self {
            reader,
            writer,
            capabilities,
            version,
            parked_at: Instant::now(),
        }
    }
}

/// Which streams may serve a migration: the same destination, authenticated with the same key.
pub(crate) type PoolKey = (SocketAddr, u64);

/// Authenticated streams kept between migrations, per destination and key. Cheap to clone: clones
/// share the streams. Give the same pool to every [`crate::Migration`] that should reuse them.
#[derive(Clone)]
pub struct ConnectionPool {
    idle: Arc<Mutex<HashMap<PoolKey, Vec<PooledStream>>>>,
    idle_timeout: Duration,
}

impl std::fmt::Debug for ConnectionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionPool")
            .field("idle_streams", &self.idle_streams())
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl ConnectionPool {
    /// A pool whose streams are closed after `idle_timeout` without use. Keep it below the
    /// destination's `ReceiverConfig::pool_idle_timeout`, or parked streams will fail their health
    /// check (they are then replaced, at the cost of the check's round trip).
    pub fn new(idle_timeout: Duration) -> Self {
        Self {
            idle: Arc::default(),
            idle_timeout,
        }
    }

    /// Streams parked now, over all destinations.
    pub fn idle_streams(&self) -> usize {
        self.idle.lock().values().map(Vec::len).sum()
    }

    /// Takes every stream parked for `key` that is not past its idle time-out (those are closed).
    pub(crate) fn take(&self, key: PoolKey) -> Vec<PooledStream> {
        let mut all = self.idle.lock().remove(&key).unwrap_or_default();
        all.retain(|s| s.parked_at.elapsed() < self.idle_timeout);
        all
    }

    /// Parks streams for `key`.
    pub(crate) fn put(&self, key: PoolKey, streams: Vec<PooledStream>) {
        if streams.is_empty() {
            return;
        }
        let mut idle = self.idle.lock();
        let list = idle.entry(key).or_default();
        list.extend(streams);
        list.retain(|s| s.parked_at.elapsed() < self.idle_timeout);
    }
}

impl Default for ConnectionPool {
    /// Streams stay parked for up to 50 s (the destination keeps them 60 s by default).
    fn default() -> Self {
        Self::new(Duration::from_secs(50))
    }
}
