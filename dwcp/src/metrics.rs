//! Prometheus metrics of migrations. Names are stable and documented in docs/architecture.md.

use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

use dwcp_core::error::Error;
use dwcp_core::latency::{LatencyOp, LatencyRecorder};

use crate::report::{MigrationPhase, Progress};

/// Metrics a migration updates; register once per registry and share.
#[derive(Debug, Clone)]
pub struct MigrationMetrics {
    /// `dwcp_page_bytes_total{class}`: guest bytes sent, by page class (`zero`, `literal`, `dup`,
    /// `delta`).
    pub page_bytes: IntCounterVec,
    /// `dwcp_wire_bytes_total`: bytes written to the sockets.
    pub wire_bytes: IntCounter,
    /// `dwcp_iterations_total`: pre-copy passes made.
    pub iterations: IntCounter,
    /// `dwcp_throughput_bytes_per_second`: logical send rate of the current pass.
    pub throughput: Gauge,
    /// `dwcp_downtime_seconds`: downtime of the last completed migration.
    pub downtime: Gauge,
    /// `dwcp_migrations_total{result}`: migrations ended, by result (`ok`, `failed`).
    pub migrations: IntCounterVec,
    /// `dwcp_pool_in_use_bytes`: buffer pool bytes handed out.
    pub pool_in_use: IntGauge,
    /// `dwcp_pool_acquisitions_total{result}`: buffer pool acquisitions, by result (`hit`: an idle buffer
    /// was reused, `miss`: one was allocated, `wait`: the budget was exhausted and the encoder waited).
    pub pool_acquisitions: IntCounterVec,
    /// `dwcp_streams`: streams open now.
    pub streams: IntGauge,
    /// `dwcp_stream_events_total{event}`: `lost` streams, `reconnect`s after every stream failed, and
    /// `resent` chunks.
    pub stream_events: IntCounterVec,
    /// `dwcp_stream_tcp{stream, field}`: the last `TCP_INFO` sample of each open stream; fields
    /// `rtt_seconds`, `min_rtt_seconds`, `delivery_rate_bytes_per_second`, `retransmits_total`,
    /// `cwnd_segments`, `unsent_bytes`.
    pub stream_tcp: GaugeVec,
    /// `dwcp_migration_progress_percent`: completion of the running migration, never decreasing
    /// (see [`crate::Progress::percent`]).
    pub progress_percent: Gauge,
    /// `dwcp_migration_progress{field}`: the running migration's last progress figures; fields
    /// `remaining_bytes`, `done_bytes`, `dirty_rate_bytes_per_second`, `eta_seconds` (NaN while
    /// pre-copy does not converge on its own), `predicted_downtime_seconds`, `pass`.
    pub progress: GaugeVec,
    /// `dwcp_migration_phase{phase}`: 1 for the phase the last migration is in (or ended in),
    /// 0 for the others.
    pub phase: IntGaugeVec,
    /// `dwcp_migration_failures_total{reason}`: migrations that ended without a handover, by
    /// [`crate::FailureReason`].
    pub failures: IntCounterVec,
    /// `dwcp_latency_seconds{op}`: latency of each step of the source's migrations
    /// (`stream_setup`, `encode`, `send`, `ack`, `digest`), added when a migration completes.
    pub latency: HistogramVec,
}

impl MigrationMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, Error> {
        let m = Self {
            page_bytes: IntCounterVec::new(
                Opts::new("dwcp_page_bytes_total", "Guest bytes sent, by page class"),
                &["class"],
            )
            .map_err(prom)?,
            wire_bytes: IntCounter::new("dwcp_wire_bytes_total", "Bytes written to the sockets")
                .map_err(prom)?,
            iterations: IntCounter::new("dwcp_iterations_total", "Pre-copy passes made")
                .map_err(prom)?,
            throughput: Gauge::new(
                "dwcp_throughput_bytes_per_second",
                "Logical send rate of the current pass",
            )
            .map_err(prom)?,
            downtime: Gauge::new(
                "dwcp_downtime_seconds",
                "Downtime of the last completed migration",
            )
            .map_err(prom)?,
            migrations: IntCounterVec::new(
                Opts::new("dwcp_migrations_total", "Migrations ended, by result"),
                &["result"],
            )
            .map_err(prom)?,
            pool_in_use: IntGauge::new("dwcp_pool_in_use_bytes", "Buffer pool bytes handed out")
                .map_err(prom)?,
            pool_acquisitions: IntCounterVec::new(
                Opts::new(
                    "dwcp_pool_acquisitions_total",
                    "Buffer pool acquisitions, by result",
                ),
                &["result"],
            )
            .map_err(prom)?,
            streams: IntGauge::new("dwcp_streams", "Streams open now").map_err(prom)?,
            stream_events: IntCounterVec::new(
                Opts::new(
                    "dwcp_stream_events_total",
                    "Streams lost, reconnections, chunks re-sent",
                ),
                &["event"],
            )
            .map_err(prom)?,
            stream_tcp: GaugeVec::new(
                Opts::new(
                    "dwcp_stream_tcp",
                    "Last TCP_INFO sample of each open stream",
                ),
                &["stream", "field"],
            )
            .map_err(prom)?,
            progress_percent: Gauge::new(
                "dwcp_migration_progress_percent",
                "Completion of the running migration, never decreasing",
            )
            .map_err(prom)?,
            progress: GaugeVec::new(
                Opts::new(
                    "dwcp_migration_progress",
                    "The running migration's last progress figures",
                ),
                &["field"],
            )
            .map_err(prom)?,
            phase: IntGaugeVec::new(
                Opts::new(
                    "dwcp_migration_phase",
                    "1 for the phase the last migration is in or ended in",
                ),
                &["phase"],
            )
            .map_err(prom)?,
            latency: HistogramVec::new(
                HistogramOpts::new(
                    "dwcp_latency_seconds",
                    "Latency of each step of a migration, by operation",
                )
                // 10 us .. about 84 s, doubling.
                .buckets(prometheus::exponential_buckets(10e-6, 2.0, 24).map_err(prom)?),
                &["op"],
            )
            .map_err(prom)?,
            failures: IntCounterVec::new(
                Opts::new(
                    "dwcp_migration_failures_total",
                    "Migrations ended without a handover, by reason",
                ),
                &["reason"],
            )
            .map_err(prom)?,
        };
        for c in [
            Box::new(m.latency.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.progress_percent.clone()),
            Box::new(m.progress.clone()),
            Box::new(m.phase.clone()),
            Box::new(m.failures.clone()),
            Box::new(m.streams.clone()),
            Box::new(m.stream_events.clone()),
            Box::new(m.stream_tcp.clone()),
        ] {
            registry.register(c).map_err(prom)?;
        }
        registry
            .register(Box::new(m.page_bytes.clone()))
            .map_err(prom)?;
        registry
            .register(Box::new(m.wire_bytes.clone()))
            .map_err(prom)?;
        registry
            .register(Box::new(m.iterations.clone()))
            .map_err(prom)?;
        registry
            .register(Box::new(m.throughput.clone()))
            .map_err(prom)?;
        registry
            .register(Box::new(m.downtime.clone()))
            .map_err(prom)?;
        registry
            .register(Box::new(m.migrations.clone()))
            .map_err(prom)?;
        registry
            .register(Box::new(m.pool_in_use.clone()))
            .map_err(prom)?;
        registry
            .register(Box::new(m.pool_acquisitions.clone()))
            .map_err(prom)?;
        Ok(m)
    }
}

/// Every phase, for the one-hot phase gauge.
const PHASES: [MigrationPhase; 6] = [
    MigrationPhase::Connecting,
    MigrationPhase::Precopy,
    MigrationPhase::StopAndCopy,
    MigrationPhase::Handover,
    MigrationPhase::Completed,
    MigrationPhase::Failed,
];

impl MigrationMetrics {
    /// Publishes a progress event.
    pub fn publish_progress(&self, p: &Progress) {
        self.progress_percent.set(p.percent);
        for (field, v) in [
            ("remaining_bytes", p.remaining_bytes as f64),
            ("done_bytes", p.logical_bytes as f64),
            ("dirty_rate_bytes_per_second", p.dirty_rate_bps),
            ("eta_seconds", p.eta_s.unwrap_or(f64::NAN)),
            ("predicted_downtime_seconds", p.predicted_downtime_ms / 1e3),
            ("pass", f64::from(p.iteration)),
        ] {
            self.progress.with_label_values(&[field]).set(v);
        }
    }

    /// Adds a finished migration's latency histograms to `dwcp_latency_seconds`.
    pub fn publish_latency(&self, recorder: &LatencyRecorder) {
        for op in LatencyOp::ALL {
            let h = self.latency.with_label_values(&[op.as_str()]);
            // At most one observe per distinct recorded value and per count: bounded by the
            // chunks of one migration.
            recorder.for_each_value(op, |secs, count| {
                for _ in 0..count {
                    h.observe(secs);
                }
            });
        }
    }

    /// Marks `phase` as the current one.
    pub fn set_phase(&self, phase: MigrationPhase) {
        for p in PHASES {
            self.phase
                .with_label_values(&[p.as_str()])
                .set(i64::from(p == phase));
        }
    }

    /// Publishes one stream's `TCP_INFO` sample.
    pub fn publish_tcp(&self, stream: u16, t: &dwcp_tcp::TcpSample) {
        let id = stream.to_string();
        for (field, v) in [
            ("rtt_seconds", t.rtt_s),
            ("min_rtt_seconds", t.min_rtt_s),
            ("delivery_rate_bytes_per_second", t.delivery_rate_bps),
            ("retransmits_total", t.total_retransmits as f64),
            ("cwnd_segments", f64::from(t.cwnd_segments)),
            ("unsent_bytes", t.unsent_bytes as f64),
        ] {
            self.stream_tcp
                .with_label_values(&[id.as_str(), field])
                .set(v);
        }
    }
}

fn prom(e: prometheus::Error) -> Error {
    Error::Config(format!("registering metrics: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grafana_dashboard_uses_only_metrics_that_exist() {
        let registry = Registry::new();
        let m = MigrationMetrics::register(&registry).unwrap();
        // Vectors appear in `gather` only once they have a child.
        m.publish_latency(&{
            let r = LatencyRecorder::new();
            r.record(LatencyOp::Ack, std::time::Duration::from_millis(1));
            r
        });
        m.set_phase(MigrationPhase::Precopy);
        m.failures.with_label_values(&["timeout"]).inc();
        m.migrations.with_label_values(&["ok"]).inc();
        m.stream_events.with_label_values(&["lost"]).inc();
        m.page_bytes.with_label_values(&["zero"]).inc();
        m.pool_acquisitions.with_label_values(&["hit"]).inc();
        m.progress.with_label_values(&["pass"]).set(1.0);
        m.stream_tcp
            .with_label_values(&["0", "rtt_seconds"])
            .set(1.0);
        let known: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/grafana-dashboard.json"
        );
        let dashboard = std::fs::read_to_string(path).unwrap();
        let mut used = 0;
        for (i, _) in dashboard.match_indices("dwcp_") {
            let name: String = dashboard[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = name.strip_suffix("_bucket").unwrap_or(&name);
            assert!(
                known.iter().any(|k| k == base),
                "{name} is not a metric: {known:?}"
            );
            used += 1;
        }
        assert!(used >= 9, "the dashboard queries {used} metrics");
    }
}
