//! `--metrics ADDR`: Prometheus metrics served over HTTP for the life of the process.

use anyhow::{Context, anyhow};
use dwcp::MigrationMetrics;
use prometheus::{Encoder, Registry, TextEncoder};
use tiny_http::{Header, Method, Request, Response, Server};

/// Serves metrics on `addr` when the user asked for it (`--metrics ADDR`).
pub fn serve_if_asked(addr: Option<&str>) -> anyhow::Result<Option<MigrationMetrics>> {
    addr.map(serve).transpose()
}

/// Registers the migration metrics in a new registry and serves `GET /metrics` on `addr` from a
/// background thread. The server is bound before this returns, so a bad address is reported at once.
pub fn serve(addr: &str) -> anyhow::Result<MigrationMetrics> {
    let registry = Registry::new();
    let metrics =
        MigrationMetrics::register(&registry).context("registering the migration metrics")?;
    let server =
        Server::http(addr).map_err(|e| anyhow!("binding the metrics server to {addr}: {e}"))?;
    tracing::info!(addr = %server.server_addr(), "serving Prometheus metrics at /metrics");
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                respond(&registry, request);
            }
        })
        .context("starting the metrics server thread")?;
    Ok(metrics)
}

/// Serves one request.
fn respond(registry: &Registry, request: Request) {
    let path = request.url().split('?').next().unwrap_or("");
    let response = match (request.method(), path) {
        (Method::Get | Method::Head, "/metrics") => {
            let encoder = TextEncoder::new();
            let mut body = Vec::new();
            match encoder.encode(&registry.gather(), &mut body) {
                Ok(()) => {
                    Response::from_data(body).with_header(content_type(encoder.format_type()))
                }
                Err(e) => {
                    Response::from_string(format!("encoding metrics: {e}\n")).with_status_code(500)
                }
            }
        }
        (Method::Get | Method::Head, "/") => Response::from_string("dwcp: metrics at /metrics\n")
            .with_header(content_type("text/plain")),
        (Method::Get | Method::Head, _) => {
            Response::from_string("not found\n").with_status_code(404)
        }
        _ => Response::from_string("method not allowed\n").with_status_code(405),
    };
    if let Err(e) = request.respond(response) {
        tracing::debug!(error = %e, "writing a metrics response");
    }
}

fn content_type(value: &str) -> Header {
    Header::from_bytes(&b"Content-Type"[..], value.as_bytes()).expect("a valid header")
}
