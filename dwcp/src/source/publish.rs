//! Prometheus counters of a running migration: what was sent since the last publication is added
//! to counters that may be shared with other migrations (cumulative), gauges are set.

use dwcp_core::memory::PAGE_SIZE;
use dwcp_core::pool::{BufferPool, PoolStats};
use dwcp_proto::ResilienceReport;
use dwcp_tcp::Lanes;

use crate::metrics::MigrationMetrics;
use crate::report::StreamTelemetry;

/// What this migration already added to the metrics.
pub(super) struct Published {
    encode: dwcp_hde::EncodeStats,
    wire: u64,
    pool: PoolStats,
    resilience: ResilienceReport,
}

impl Published {
    /// Nothing published yet; `pool`'s counters so far belong to earlier migrations sharing it.
    pub(super) fn new(pool: &BufferPool) -> Self {
        Self {
            encode: Default::default(),
            wire: 0,
            pool: pool.stats(),
            resilience: ResilienceReport::default(),
        }
    }

    /// Adds what was sent since the last call to the (possibly shared, cumulative) counters.
    pub(super) fn publish(
        &mut self,
        mt: &MigrationMetrics,
        encode: dwcp_hde::EncodeStats,
        lanes: &Lanes,
        pool: &BufferPool,
        resilience: ResilienceReport,
    ) {
        let wire = lanes.wire_bytes();
        let page = PAGE_SIZE as u64;
        let before = &self.encode;
        for (class, now, was) in [
            ("zero", encode.zero_pages, before.zero_pages),
            ("literal", encode.literal_pages, before.literal_pages),
            ("dup", encode.dup_pages, before.dup_pages),
            ("delta", encode.delta_pages, before.delta_pages),
        ] {
            mt.page_bytes
                .with_label_values(&[class])
                .inc_by(now.saturating_sub(was) * page);
        }
        mt.wire_bytes.inc_by(wire.saturating_sub(self.wire));
        let stats = pool.stats();
        for (result, now, was) in [
            ("hit", stats.hits, self.pool.hits),
            ("miss", stats.misses, self.pool.misses),
            ("wait", stats.waits, self.pool.waits),
        ] {
            mt.pool_acquisitions
                .with_label_values(&[result])
                .inc_by(now.saturating_sub(was));
        }
        let (r, p) = (resilience, self.resilience);
        for (event, now, was) in [
            ("lost", r.streams_lost, p.streams_lost),
            ("reconnect", r.reconnects, p.reconnects),
            ("resent", r.resent_chunks, p.resent_chunks),
        ] {
            mt.stream_events
                .with_label_values(&[event])
                .inc_by(now.saturating_sub(was));
        }
        mt.streams.set(lanes.live() as i64);
        self.encode = encode;
        self.wire = self.wire.max(wire);
        self.pool = stats;
        self.resilience = r;
    }
}

/// Samples `TCP_INFO` of every open stream (and publishes it when metrics are on).
pub(super) fn sample_streams(
    lanes: &Lanes,
    metrics: Option<&MigrationMetrics>,
) -> Vec<StreamTelemetry> {
    let mut out = Vec::new();
    for id in lanes.live_ids() {
        let sample = lanes
            .with_conn(id, |c| c.as_tcp().map(dwcp_tcp::telemetry::sample))
            .flatten();
        if let Some(Ok(tcp)) = sample {
            if let Some(mt) = metrics {
                mt.publish_tcp(id, &tcp);
            }
            out.push(StreamTelemetry { stream: id, tcp });
        }
    }
    out
}
