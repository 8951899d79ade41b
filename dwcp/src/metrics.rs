//! Prometheus metrics of migrations. Names are stable and documented in docs/architecture.md.

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use dwcp_core::error::Error;

/// Metrics a migration updates; register once per registry and share.
#[derive(Debug, Clone)]
pub struct MigrationMetrics {
    /// `dwcp_page_bytes_total{class}`: guest bytes sent, by page class (`zero`, `literal`).
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
        };
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

fn prom(e: prometheus::Error) -> Error {
    Error::Config(format!("registering metrics: {e}"))
}
