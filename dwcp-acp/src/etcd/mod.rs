//! The etcd backend: the registry as keys of an existing etcd cluster (v3 API, etcd 3.4 or newer).
//!
//! Layout under the configured prefix:
//!
//! - `{prefix}/vms/{vm}`: a VM's record, a JSON value with its owner and holding. Its fence is the
//!   key's `mod_revision`, the etcd revision of the transaction that last changed it. Every change
//!   is one transaction that compares that revision (and the exact value the command expects)
//!   with what the caller names, so a stale caller is refused atomically; the transaction's else
//!   branch reads the record, and the refusal carries it.
//! - `{prefix}/nodes/{id}`: a member's record ([`Registry::put_node`]), kept until replaced.
//! - `{prefix}/live/{id}`: a member's record attached to a lease that its agent keeps alive
//!   ([`EtcdRegistry::keep_node_alive`]); it disappears a TTL after the agent stops renewing.
//!
//! Ownership keys are never attached to a lease. A lease expires when its holder cannot reach
//! etcd for a TTL, which is also what a partitioned but running owner looks like: if expiry
//! deleted the ownership record, a second node could register the VM and start it while the
//! first still runs it, two writers on one disk. Ownership therefore changes only through fenced
//! handoffs; liveness is separate information for whoever decides to fail a VM over.
//!
//! Every operation is bounded by the timeout given to [`EtcdRegistry::connect`], and reads are
//! linearizable (etcd's default, through the leader), as [`Registry`] requires.

mod error;
mod lease;
mod record;
pub mod testing;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, KvClient, LeaseClient, Txn,
    TxnOp, TxnOpResponse,
};
use tracing::{debug, warn};

pub use lease::LeaseGuard;

use crate::{
    AcpError, Command, CommandOutcome, Fence, Holding, NodeRecord, Ownership, Registry,
    RegistryState, VmId,
};

/// A [`Registry`] kept in etcd. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Clone)]
pub struct EtcdRegistry {
    kv: KvClient,
    lease: LeaseClient,
    prefix: String,
    /// The endpoints, joined, for error messages.
    endpoints: String,
    timeout: Duration,
}

impl fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// What a command needs to find in the VM's record to apply.
enum Required {
    /// No record (a registration).
    Absent,
    /// Exactly this record, fence included.
    Record(Ownership),
    /// Not known from the command alone (an abort does not name the destination): read it.
    Unknown,
}

impl EtcdRegistry {
    /// A registry at `endpoints` (`http://host:port`, any members of one cluster), its keys under
    /// `prefix` (for example `/dwcp`), every operation bounded by `timeout`.
    ///
    /// Does not contact etcd: an unreachable cluster shows on the first operation, as
    /// [`AcpError::Unavailable`] or [`AcpError::Timeout`], so an agent may start before etcd.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, AcpError> {
        if endpoints.is_empty() {
            return Err(AcpError::Invalid("no etcd endpoint given".into()));
        }
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return Err(AcpError::Invalid(
                "empty etcd key prefix: give one such as /dwcp so that DWCP's keys stay apart \
                 from other users of the cluster"
                    .into(),
            ));
        }
        if timeout.is_zero() {
            return Err(AcpError::Invalid("etcd operation timeout of zero".into()));
        }
        let joined = endpoints.join(",");
        let options = ConnectOptions::new()
            // The per-request deadline is also sent to the server (grpc-timeout), so etcd gives
            // up on work nobody waits for; the tokio timeout in `call` bounds the rest.
            .with_timeout(timeout)
            .with_connect_timeout(timeout)
            // A member cut off from the leader answers "no leader" at once instead of holding
            // the request until the deadline.
            .with_require_leader(true)
            // Pings find a dead connection (a host gone without FIN) on long-lived agents. etcd
            // sends GOAWAY to clients that ping more often than every 5 s or with no stream
            // open, hence the interval and no pings while idle.
            .with_keep_alive(Duration::from_secs(10), timeout.max(Duration::from_secs(1)))
            .with_keep_alive_while_idle(false);
        let client = tokio::time::timeout(timeout, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| AcpError::Timeout(timeout))?
            .map_err(|e| error::map(e, &joined, timeout))?;
        debug!(endpoints = %joined, prefix, "etcd registry configured");
        Ok(Self {
            kv: client.kv_client(),
            lease: client.lease_client(),
            prefix: prefix.to_owned(),
            endpoints: joined,
            timeout,
        })
    }

    /// The key prefix, without a trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The bound of every operation.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Announces `node` as alive under `{prefix}/live/{id}` with a lease of `ttl` (rounded up to
    /// whole seconds; etcd may raise it to its minimum, see [`LeaseGuard::ttl`]) and keeps the
    /// lease alive from a background task. Dropping the guard, or the process dying, lets the
    /// record expire a TTL later; [`LeaseGuard::revoke`] removes it at once. If etcd is
    /// unreachable for longer than the TTL the record expires, and the task announces it again
    /// once etcd is back.
    pub async fn keep_node_alive(
        &self,
        node: NodeRecord,
        ttl: Duration,
    ) -> Result<LeaseGuard, AcpError> {
        if node.id == 0 {
            return Err(AcpError::UnknownNode(0));
        }
        let key = format!("{}/live/{}", self.prefix, node.id);
        self.bounded(lease::start(self.clone(), key, node, ttl))
            .await
    }

    /// The members whose agents keep their liveness record alive, ordered by id.
    pub async fn live_nodes(&self) -> Result<Vec<NodeRecord>, AcpError> {
        self.node_records("live").await
    }

    fn vm_key(&self, vm: &VmId) -> String {
        format!("{}/vms/{}", self.prefix, vm)
    }

    /// Runs one etcd call within the timeout, mapping its errors.
    async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, AcpError> {
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => error::map(e, &self.endpoints, self.timeout),
            Err(_) => AcpError::Timeout(self.timeout),
        };
        warn!(what, endpoints = %self.endpoints, error = %result, "etcd call failed");
        Err(result)
    }

    /// The record of `vm`, read linearizably.
    async fn read(&self, vm: &VmId) -> Result<Option<Ownership>, AcpError> {
        let mut kv = self.kv.clone();
        let key = self.vm_key(vm);
        let response = self.call("get", kv.get(key, None)).await?;
        response
            .kvs()
            .first()
            .map(|kv| decode_vm(vm, kv))
            .transpose()
    }

    /// Bounds a whole operation, several calls included, by the timeout.
    async fn bounded<T>(
        &self,
        op: impl Future<Output = Result<T, AcpError>>,
    ) -> Result<T, AcpError> {
        tokio::time::timeout(self.timeout, op)
            .await
            .unwrap_or(Err(AcpError::Timeout(self.timeout)))
    }

    /// Orders a change of one VM's record as an etcd transaction, with the meaning that
    /// [`RegistryState::apply`] gives it, within the timeout (an abort or a refused
    /// self-handoff takes a read and a transaction).
    async fn change(&self, vm: &VmId, command: Command) -> Result<CommandOutcome, AcpError> {
        self.bounded(self.change_unbounded(vm, command)).await
    }

    async fn change_unbounded(
        &self,
        vm: &VmId,
        command: Command,
    ) -> Result<CommandOutcome, AcpError> {
        let required = match required(&command) {
            Required::Absent => None,
            Required::Record(record) => Some(record),
            Required::Unknown => {
                // The read is linearizable, so a refusal computed from it is a correct answer
                // as of the read; an acceptance is rechecked by the transaction's compare.
                let current = self.read(vm).await?;
                state_with(current.clone()).apply(&command, Fence(u64::MAX))?;
                current
            }
        };
        // What the command makes of the record it requires. Its fence is a placeholder: the
        // real one is the revision etcd gives the transaction.
        let outcome = match state_with(required.clone()).apply(&command, Fence(u64::MAX)) {
            Ok(outcome) => outcome,
            // Node 0 is refused whatever the record; a self-handoff only if the record is what
            // it names (otherwise the conflict is the answer): read the record to tell.
            Err(AcpError::UnknownNode(id)) => return Err(AcpError::UnknownNode(id)),
            Err(_) => return Err(self.refusal(&command, self.read(vm).await?)),
        };
        let key = self.vm_key(vm);
        let guard = match &required {
            None => vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)],
            Some(record) => vec![
                // No revision reaches i64::MAX, so a larger fence simply never matches.
                Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    i64::try_from(record.fence.0).unwrap_or(i64::MAX),
                ),
                // The revision alone identifies the value, but not that it is the value the
                // command assumes (owner, holding); comparing both makes the guard exact.
                Compare::value(
                    key.clone(),
                    CompareOp::Equal,
                    record::encode(record.owner, record.holding),
                ),
            ],
        };
        let write = match &outcome {
            CommandOutcome::Changed(new) => vec![
                TxnOp::put(key.clone(), record::encode(new.owner, new.holding), None),
                TxnOp::get(key.clone(), None),
            ],
            CommandOutcome::Removed => vec![TxnOp::delete(key.clone(), None)],
            CommandOutcome::NodeStored => unreachable!("a VM command stores no member"),
        };
        let txn = Txn::new()
            .when(guard)
            .and_then(write)
            .or_else(vec![TxnOp::get(key, None)]);
        let mut kv = self.kv.clone();
        let response = self.call("txn", kv.txn(txn)).await?;
        let responses = response.op_responses();
        if response.succeeded() {
            return match outcome {
                CommandOutcome::Changed(expected) => {
                    let Some(TxnOpResponse::Get(get)) = responses.get(1) else {
                        return Err(AcpError::Backend(
                            "etcd answered a transaction without its read".into(),
                        ));
                    };
                    let Some(stored) = get.kvs().first() else {
                        return Err(AcpError::Backend(format!(
                            "etcd lost {vm} within the transaction that wrote it"
                        )));
                    };
                    let record = decode_vm(vm, stored)?;
                    debug_assert_eq!(
                        (record.owner, record.holding),
                        (expected.owner, expected.holding)
                    );
                    debug!(%record, "etcd registry changed");
                    Ok(CommandOutcome::Changed(record))
                }
                removed => {
                    debug!(%vm, "etcd registry removed");
                    Ok(removed)
                }
            };
        }
        let current = match responses.first() {
            Some(TxnOpResponse::Get(get)) => {
                get.kvs().first().map(|kv| decode_vm(vm, kv)).transpose()?
            }
            _ => {
                return Err(AcpError::Backend(
                    "etcd answered a failed transaction without its read".into(),
                ));
            }
        };
        Err(self.refusal(&command, current))
    }

    /// Why `command` cannot apply to `current` (read in the same transaction or linearizably).
    fn refusal(&self, command: &Command, current: Option<Ownership>) -> AcpError {
        match state_with(current.clone()).apply(command, Fence(u64::MAX)) {
            Err(refusal) => {
                debug!(?command, %refusal, "etcd registry refused");
                refusal
            }
            // The compare failed although the decoded record allows the change: its bytes are
            // not the canonical encoding, so something else wrote them.
            Ok(_) => AcpError::Backend(format!(
                "the etcd record {current:?} is not in DWCP's encoding; is another program \
                 writing under {}?",
                self.prefix
            )),
        }
    }

    async fn node_records(&self, dir: &str) -> Result<Vec<NodeRecord>, AcpError> {
        let mut kv = self.kv.clone();
        let key = format!("{}/{dir}/", self.prefix);
        let response = self
            .call("get", kv.get(key, Some(GetOptions::new().with_prefix())))
            .await?;
        // Keys order ids as text ("10" before "2"): order them as numbers.
        let mut nodes = BTreeMap::new();
        for kv in response.kvs() {
            let node = record::decode_node(kv.key(), kv.value())?;
            nodes.insert(node.id, node);
        }
        Ok(nodes.into_values().collect())
    }
}

/// The record `command` must find to apply, as far as the command says.
fn required(command: &Command) -> Required {
    let record = |vm: &VmId, owner, holding, fence| {
        Required::Record(Ownership {
            vm: vm.clone(),
            owner,
            holding,
            fence,
        })
    };
    match command {
        Command::Register { .. } => Required::Absent,
        Command::BeginHandoff {
            vm, from, fence, ..
        } => record(vm, *from, Holding::Owned, *fence),
        Command::CommitHandoff {
            vm,
            from,
            fence,
            to,
        } => record(vm, *from, Holding::HandingOver { to: *to }, *fence),
        Command::AbortHandoff { .. } => Required::Unknown,
        Command::Unregister { vm, owner, fence } => record(vm, *owner, Holding::Owned, *fence),
        Command::PutNode(_) => unreachable!("a member's record is not a VM's"),
    }
}

/// A registry holding only `record`, to run [`RegistryState::apply`] on.
fn state_with(record: Option<Ownership>) -> RegistryState {
    let mut state = RegistryState::default();
    if let Some(record) = record {
        state.vms.insert(record.vm.clone(), record);
    }
    state
}

fn decode_vm(vm: &VmId, kv: &KeyValue) -> Result<Ownership, AcpError> {
    record::decode(vm, kv.value(), kv.mod_revision())
}

#[async_trait::async_trait]
impl Registry for EtcdRegistry {
    async fn execute(&self, command: Command) -> Result<CommandOutcome, AcpError> {
        match command {
            Command::PutNode(node) => self.put_node_record(node).await,
            command => {
                let vm = command
                    .vm()
                    .expect("every other command names a VM")
                    .clone();
                self.change(&vm, command).await
            }
        }
    }

    async fn ownership(&self, vm: &VmId) -> Result<Option<Ownership>, AcpError> {
        self.read(vm).await
    }

    async fn list(&self) -> Result<Vec<Ownership>, AcpError> {
        let mut kv = self.kv.clone();
        let dir = format!("{}/vms/", self.prefix);
        let response = self
            .call(
                "get",
                kv.get(dir.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        // etcd returns a range in key order, and the keys differ only by the VM id after a
        // common prefix, so this is VM id order.
        response
            .kvs()
            .iter()
            .map(|kv| {
                let name = String::from_utf8_lossy(&kv.key()[dir.len()..]).into_owned();
                let vm = VmId::new(name).map_err(|e| {
                    AcpError::Backend(format!("etcd key under {dir} is not a VM id: {e}"))
                })?;
                decode_vm(&vm, kv)
            })
            .collect()
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, AcpError> {
        self.node_records("nodes").await
    }
}

impl EtcdRegistry {
    /// Stores a member's record (a plain key, not a transaction: last writer wins, as in the
    /// reference).
    async fn put_node_record(&self, node: NodeRecord) -> Result<CommandOutcome, AcpError> {
        if node.id == 0 {
            return Err(AcpError::UnknownNode(0));
        }
        let mut kv = self.kv.clone();
        let key = format!("{}/nodes/{}", self.prefix, node.id);
        self.call("put", kv.put(key, record::encode_node(&node), None))
            .await?;
        Ok(CommandOutcome::NodeStored)
    }
}
