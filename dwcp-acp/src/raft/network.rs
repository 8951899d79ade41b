//! openraft's network, on top of [`RpcClient`]: AppendEntries, Vote and InstallSnapshot chunks
//! become [`Request`]s on the peer's authenticated connection.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode, RPCTypes};

use super::TypeConfig;
use super::rpc::{CallError, RpcClient};
use super::wire::{Request, Response};
use crate::NodeId;

/// Makes one [`Network`] per replication target; they share the client's connections.
#[derive(Clone, Debug)]
pub(crate) struct NetworkFactory {
    pub client: Arc<RpcClient>,
    /// Pause after a peer is found unreachable (openraft's replication backs off by it).
    pub backoff: Duration,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Network {
        Network {
            client: self.client.clone(),
            target,
            backoff: self.backoff,
        }
    }
}

/// The connection to one peer, as openraft sees it.
#[derive(Debug)]
pub(crate) struct Network {
    client: Arc<RpcClient>,
    target: NodeId,
    backoff: Duration,
}

type Rpc<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

fn any(msg: impl ToString) -> AnyError {
    AnyError::error(msg)
}

impl Network {
    async fn call<E: std::error::Error>(
        &self,
        action: RPCTypes,
        request: Request,
        entries: usize,
        option: &RPCOption,
    ) -> Result<Response, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>> {
        let ttl = option.hard_ttl();
        match self.client.call(self.target, request, ttl).await {
            Ok(Response::NotReady(why)) => Err(Unreachable::new(&any(why)).into()),
            Ok(answer) => Ok(answer),
            // Unreachable makes openraft back off before the next try; a partition or a down
            // peer is exactly that.
            Err(CallError::NotSent(why)) => Err(Unreachable::new(&any(why)).into()),
            Err(e @ CallError::Lost(_)) => Err(NetworkError::new(&any(e)).into()),
            Err(CallError::Timeout(timeout)) => Err(Timeout {
                action,
                id: self.client.net().me,
                target: self.target,
                timeout,
            }
            .into()),
            Err(CallError::TooLarge(bytes)) => {
                let hint = (entries as u64 / 2).max(1);
                tracing::debug!(
                    target = self.target,
                    bytes,
                    hint,
                    "AppendEntries over the frame limit"
                );
                Err(PayloadTooLarge::new_entries_hint(hint).into())
            }
        }
    }

    fn unexpected<E: std::error::Error>(
        &self,
        answer: Response,
    ) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        NetworkError::new(&any(format!("node {} answered {answer:?}", self.target))).into()
    }

    fn remote<E: std::error::Error>(
        &self,
        e: RaftError<NodeId, E>,
    ) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        RemoteError::new(self.target, e).into()
    }
}

impl RaftNetwork<TypeConfig> for Network {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<AppendEntriesResponse<NodeId>> {
        let entries = rpc.entries.len();
        match self
            .call(
                RPCTypes::AppendEntries,
                Request::AppendEntries(rpc),
                entries,
                &option,
            )
            .await?
        {
            Response::AppendEntries(r) => r.map_err(|e| self.remote(e)),
            other => Err(self.unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self
            .call(
                RPCTypes::InstallSnapshot,
                Request::InstallSnapshot(rpc),
                0,
                &option,
            )
            .await?
        {
            Response::InstallSnapshot(r) => r.map_err(|e| self.remote(e)),
            other => Err(self.unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Rpc<VoteResponse<NodeId>> {
        match self
            .call(RPCTypes::Vote, Request::Vote(rpc), 0, &option)
            .await?
        {
            Response::Vote(r) => r.map_err(|e| self.remote(e)),
            other => Err(self.unexpected(other)),
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(self.backoff))
    }
}
