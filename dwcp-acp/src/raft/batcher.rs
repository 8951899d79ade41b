//! Group commit: proposals from any number of callers (local or forwarded by followers) queue on
//! one channel; a task drains up to `max_batch` of them (and at most [`MAX_BATCH_BYTES`]) into one
//! raft entry, so one log append and one fsync serve them all. A few entries may be in flight at
//! once; while they are, the queue fills, which is what makes batches big under load and single
//! commands cheap when idle.

use std::sync::Arc;

use openraft::Raft;
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::TypeConfig;
use super::wire::{Batch, WireError};
use crate::{AcpError, Command, CommandOutcome, NodeId};

/// Largest encoded command accepted (a VM id is at most 128 bytes; a node record's strings are
/// the only unbounded part).
pub(crate) const MAX_COMMAND_BYTES: usize = 4096;
/// Largest sum of encoded commands in one entry: with openraft's `max_payload_entries` this bounds
/// an AppendEntries message well under the RPC frame limit.
pub(crate) const MAX_BATCH_BYTES: usize = 256 << 10;
/// Raft entries proposed but not yet applied, at most.
const PIPELINE_DEPTH: usize = 8;
/// Proposals waiting for a batch, at most (callers wait beyond that).
const QUEUE: usize = 16 << 10;

/// How a proposal ended.
#[derive(Debug)]
pub(crate) enum Submitted {
    /// Applied at its fence; the state machine's answer.
    Applied(Result<CommandOutcome, WireError>),
    /// Not in the log: this node is not the leader (the hint, if any, is).
    NotLeader(Option<NodeId>),
    /// In the log, but whether it commits is unknown (leadership lost, shutting down).
    Indeterminate(String),
    /// Refused before proposing (too large).
    Refused(AcpError),
}

struct Proposal {
    command: Command,
    bytes: usize,
    reply: oneshot::Sender<Submitted>,
}

/// The handle callers submit through.
#[derive(Debug, Clone)]
pub(crate) struct Batcher {
    tx: mpsc::Sender<Proposal>,
}

impl std::fmt::Debug for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proposal")
            .field("command", &self.command)
            .finish()
    }
}

impl Batcher {
    pub(crate) fn spawn(
        raft: Raft<TypeConfig>,
        max_batch: usize,
        stop: watch::Receiver<bool>,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(
            raft,
            rx,
            max_batch.clamp(1, super::storage::FENCE_SLOTS - 1),
            stop,
        ));
        (Self { tx }, task)
    }

    /// Proposes `command` and waits for its own result. The caller bounds the wait.
    pub(crate) async fn submit(&self, command: Command) -> Submitted {
        let bytes = match postcard::to_allocvec(&command) {
            Ok(b) => b.len(),
            Err(e) => {
                return Submitted::Refused(AcpError::Invalid(format!("encoding the command: {e}")));
            }
        };
        if bytes > MAX_COMMAND_BYTES {
            return Submitted::Refused(AcpError::Invalid(format!(
                "a command of {bytes} bytes (at most {MAX_COMMAND_BYTES}): shorten the node record"
            )));
        }
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Proposal {
                command,
                bytes,
                reply,
            })
            .await
            .is_err()
        {
            return Submitted::NotLeader(None);
        }
        rx.await.unwrap_or_else(|_| {
            Submitted::Indeterminate("the node stopped before the answer".into())
        })
    }
}

async fn run(
    raft: Raft<TypeConfig>,
    mut rx: mpsc::Receiver<Proposal>,
    max_batch: usize,
    mut stop: watch::Receiver<bool>,
) {
    let pipeline = Arc::new(Semaphore::new(PIPELINE_DEPTH));
    let mut carried: Option<Proposal> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => tokio::select! {
                p = rx.recv() => match p { Some(p) => p, None => return },
                _ = super::rpc::until_stopped(&mut stop) => return,
            },
        };
        // Wait for a pipeline slot before draining: proposals arriving meanwhile join this batch.
        let permit = tokio::select! {
            p = pipeline.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = super::rpc::until_stopped(&mut stop) => return,
        };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(p) if bytes + p.bytes > MAX_BATCH_BYTES => {
                    carried = Some(p);
                    break;
                }
                Ok(p) => {
                    bytes += p.bytes;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (commands, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.command, p.reply)).unzip();
            let n = commands.len();
            match raft.client_write(Batch(commands)).await {
                Ok(written) if written.data.0.len() == n => {
                    for (reply, result) in replies.into_iter().zip(written.data.0) {
                        let _ = reply.send(Submitted::Applied(result));
                    }
                }
                Ok(written) => {
                    let why = format!(
                        "entry {} answered {} of {n} commands",
                        written.log_id,
                        written.data.0.len()
                    );
                    tracing::error!("{why}");
                    for reply in replies {
                        let _ = reply.send(Submitted::Indeterminate(why.clone()));
                    }
                }
                // Either refused before appending or truncated away: not committed, ever.
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    for reply in replies {
                        let _ = reply.send(Submitted::NotLeader(f.leader_id));
                    }
                }
                Err(e) => {
                    let why = format!("raft: {e}");
                    for reply in replies {
                        let _ = reply.send(Submitted::Indeterminate(why.clone()));
                    }
                }
            }
        });
    }
}
