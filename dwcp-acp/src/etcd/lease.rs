//! Liveness records: a member's record on a lease that a background task keeps alive.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::PutOptions;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{EtcdRegistry, record};
use crate::{AcpError, NodeId, NodeRecord};

/// Keeps a member's liveness record alive while it exists (see
/// [`EtcdRegistry::keep_node_alive`]). Dropping it stops the renewals: the record expires one TTL
/// later, as it would if the process died.
pub struct LeaseGuard {
    node: NodeId,
    key: String,
    ttl: Duration,
    /// The current lease: the task replaces it if etcd let it expire.
    lease: Arc<AtomicI64>,
    task: JoinHandle<()>,
    registry: EtcdRegistry,
}

impl fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("node", &self.node)
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .field("lease", &self.lease_id())
            .finish()
    }
}

impl LeaseGuard {
    /// The etcd lease currently carrying the record.
    pub fn lease_id(&self) -> i64 {
        self.lease.load(Ordering::Relaxed)
    }

    /// The TTL etcd granted (at least the one asked for; etcd raises it to its minimum, about
    /// 1.5 election timeouts).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Stops the renewals and revokes the lease, so that the record disappears now rather than
    /// a TTL later (a clean shutdown of the agent).
    pub async fn revoke(self) -> Result<(), AcpError> {
        self.task.abort();
        let mut lease = self.registry.lease.clone();
        let id = self.lease_id();
        self.registry.call("lease revoke", lease.revoke(id)).await?;
        info!(node = self.node, "liveness record revoked");
        Ok(())
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Grants a lease, stores `node` at `key` on it and starts the renewals.
pub(super) async fn start(
    registry: EtcdRegistry,
    key: String,
    node: NodeRecord,
    ttl: Duration,
) -> Result<LeaseGuard, AcpError> {
    // etcd's TTLs are whole seconds; round up so that the record lives at least `ttl`.
    let asked = i64::try_from(ttl.as_millis().div_ceil(1000))
        .unwrap_or(i64::MAX)
        .max(1);
    let value = record::encode_node(&node);
    let (id, granted) = announce(&registry, &key, &value, asked).await?;
    let lease = Arc::new(AtomicI64::new(id));
    let granted = Duration::from_secs(granted);
    let task = tokio::spawn(renew(
        registry.clone(),
        key.clone(),
        value,
        asked,
        granted,
        lease.clone(),
    ));
    info!(
        node = node.id,
        lease = id,
        ?granted,
        "liveness record announced"
    );
    Ok(LeaseGuard {
        node: node.id,
        key,
        ttl: granted,
        lease,
        task,
        registry,
    })
}

/// Grants a lease of `ttl` seconds and puts the record on it; returns the lease and the TTL
/// granted.
async fn announce(
    registry: &EtcdRegistry,
    key: &str,
    value: &[u8],
    ttl: i64,
) -> Result<(i64, u64), AcpError> {
    let mut lease = registry.lease.clone();
    let grant = registry.call("lease grant", lease.grant(ttl, None)).await?;
    let mut kv = registry.kv.clone();
    let put = kv.put(key, value, Some(PutOptions::new().with_lease(grant.id())));
    if let Err(e) = registry.call("put", put).await {
        // Do not leave an empty lease behind until its TTL.
        let _ = registry
            .call("lease revoke", lease.revoke(grant.id()))
            .await;
        return Err(e);
    }
    Ok((grant.id(), u64::try_from(grant.ttl()).unwrap_or(1).max(1)))
}

/// Renews the lease every third of its TTL, so that one lost round does not let it expire; if
/// etcd let it expire anyway (unreachable for a TTL), announces the record again on a new lease.
/// Runs until aborted.
async fn renew(
    registry: EtcdRegistry,
    key: String,
    value: Vec<u8>,
    asked: i64,
    ttl: Duration,
    current: Arc<AtomicI64>,
) {
    let period = ttl / 3;
    loop {
        let id = current.load(Ordering::Relaxed);
        let mut lease = registry.lease.clone();
        let stream = registry
            .call("lease keep-alive", lease.keep_alive(id))
            .await;
        let (mut keeper, mut responses) = match stream {
            Ok(stream) => stream,
            Err(AcpError::Unavailable(message)) if message.contains("lease not found") => {
                reannounce(&registry, &key, &value, asked, &current).await;
                continue;
            }
            Err(e) => {
                debug!(%key, error = %e, "lease keep-alive stream not open; retrying");
                tokio::time::sleep(period).await;
                continue;
            }
        };
        loop {
            tokio::time::sleep(period).await;
            let round = async {
                keeper.keep_alive().await?;
                responses.message().await
            };
            match registry.call("lease keep-alive", round).await {
                Ok(Some(response)) if response.ttl() > 0 => continue,
                Ok(Some(_)) => {
                    reannounce(&registry, &key, &value, asked, &current).await;
                    break;
                }
                // The stream ended or failed (a member died): open a new one.
                Ok(None) | Err(_) => break,
            }
        }
    }
}

async fn reannounce(
    registry: &EtcdRegistry,
    key: &str,
    value: &[u8],
    asked: i64,
    current: &AtomicI64,
) {
    warn!(%key, "liveness lease expired (etcd unreachable for a TTL?); announcing again");
    match announce(registry, key, value, asked).await {
        Ok((id, _)) => current.store(id, Ordering::Relaxed),
        Err(e) => {
            warn!(%key, error = %e, "cannot announce liveness again; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
