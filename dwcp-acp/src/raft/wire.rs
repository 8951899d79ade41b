//! What travels between the agents and into the log: the raft entry payload (a batch of
//! commands), the RPC requests and answers, and a serializable mirror of [`AcpError`].

use std::time::Duration;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::TypeConfig;
use crate::{AcpError, Command, CommandOutcome, NodeId, NodeRecord, Ownership, VmId};

/// One raft entry: the commands the batcher drained together. The k-th command of the entry at
/// log index i is applied at `Fence(i << 16 | k)`, so a batch holds at most
/// [`super::MAX_BATCH`] (65 535) commands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Batch(pub Vec<Command>);

/// What applying a [`Batch`] produced, one result per command, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BatchResponse(pub Vec<Result<CommandOutcome, WireError>>);

/// [`AcpError`] as it crosses the wire (the crate's error type is not serializable).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum WireError {
    NotRegistered {
        vm: VmId,
    },
    AlreadyRegistered {
        vm: VmId,
        current: Ownership,
    },
    Conflict {
        expected: String,
        current: Ownership,
    },
    UnknownNode(NodeId),
    Unavailable(String),
    Timeout(Duration),
    Invalid(String),
    Storage(String),
    Backend(String),
}

impl From<AcpError> for WireError {
    fn from(e: AcpError) -> Self {
        match e {
            AcpError::NotRegistered { vm } => Self::NotRegistered { vm },
            AcpError::AlreadyRegistered { vm, current } => Self::AlreadyRegistered { vm, current },
            AcpError::Conflict { expected, current } => Self::Conflict { expected, current },
            AcpError::UnknownNode(n) => Self::UnknownNode(n),
            AcpError::Unavailable(s) => Self::Unavailable(s),
            AcpError::Timeout(d) => Self::Timeout(d),
            AcpError::Invalid(s) => Self::Invalid(s),
            AcpError::Storage(s) => Self::Storage(s),
            AcpError::Backend(s) => Self::Backend(s),
        }
    }
}

impl From<WireError> for AcpError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::NotRegistered { vm } => Self::NotRegistered { vm },
            WireError::AlreadyRegistered { vm, current } => Self::AlreadyRegistered { vm, current },
            WireError::Conflict { expected, current } => Self::Conflict { expected, current },
            WireError::UnknownNode(n) => Self::UnknownNode(n),
            WireError::Unavailable(s) => Self::Unavailable(s),
            WireError::Timeout(d) => Self::Timeout(d),
            WireError::Invalid(s) => Self::Invalid(s),
            WireError::Storage(s) => Self::Storage(s),
            WireError::Backend(s) => Self::Backend(s),
        }
    }
}

/// A linearizable read, answered by the leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ReadRequest {
    Ownership(VmId),
    List,
    Nodes,
}

/// The answer to a [`ReadRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ReadAnswer {
    Ownership(Option<Ownership>),
    List(Vec<Ownership>),
    Nodes(Vec<NodeRecord>),
}

/// How a request forwarded to the leader ended. The split between `Retry` and `Indeterminate`
/// is what makes forwarding safe: only a change known not to have entered the log is retried,
/// so no command is ever applied twice on the caller's behalf.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Forwarded<T> {
    /// Applied (or refused by the state machine); final.
    Done(Result<T, WireError>),
    /// Not submitted (this node is not the leader, or it is starting): safe to retry,
    /// preferably at `leader`.
    Retry { leader: Option<NodeId>, why: String },
    /// Submitted but the outcome is unknown (leadership lost, timed out, shutting down).
    Indeterminate(String),
}

/// A request on an authenticated connection.
#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Request {
    /// RTT probe and liveness check.
    Ping,
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A follower forwarding a caller's change to the leader.
    Write {
        command: Command,
        timeout_ms: u64,
    },
    /// A follower forwarding a caller's read to the leader.
    Read {
        read: ReadRequest,
        timeout_ms: u64,
    },
}

/// The answer to a [`Request`] of the same kind.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Response {
    Pong,
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Write(Forwarded<CommandOutcome>),
    Read(Forwarded<ReadAnswer>),
    /// The request was not handled (the node is still starting or shutting down).
    NotReady(String),
}

/// A request or answer with the id that pairs them on a multiplexed connection.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Envelope<T> {
    pub id: u64,
    pub body: T,
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

    use super::*;

    /// openraft's messages derive serde for self-describing formats; postcard is not one, so
    /// check that what we send decodes to what was sent.
    #[test]
    fn raft_messages_round_trip_through_postcard() {
        let vm = VmId::new("vm-1").unwrap();
        let entry: Entry<TypeConfig> = Entry {
            log_id: LogId::new(CommittedLeaderId::new(3, 1), 42),
            payload: EntryPayload::Normal(Batch(vec![Command::Register { vm, owner: 1 }])),
        };
        let request = Request::AppendEntries(AppendEntriesRequest {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 41)),
            entries: vec![entry.clone()],
            leader_commit: None,
        });
        let bytes = postcard::to_allocvec(&Envelope {
            id: 7,
            body: request,
        })
        .unwrap();
        let back: Envelope<Request> = postcard::from_bytes(&bytes).unwrap();
        let Request::AppendEntries(r) = back.body else {
            panic!("{back:?}")
        };
        assert_eq!(
            (back.id, r.entries[0].log_id, r.entries[0].payload.clone()),
            (7, entry.log_id, entry.payload)
        );
        let answer = Response::Vote(Err(RaftError::Fatal(openraft::error::Fatal::Stopped)));
        let bytes = postcard::to_allocvec(&answer).unwrap();
        assert!(matches!(
            postcard::from_bytes::<Response>(&bytes).unwrap(),
            Response::Vote(Err(_))
        ));
    }
}
