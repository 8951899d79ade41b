//! The node's disk: one redb file holding the raft log, the vote, the committed and purged log
//! ids and the latest snapshot; and the in-memory state machine ([`RegistryState`]) that openraft
//! rebuilds from that snapshot plus the log on restart.
//!
//! Durability: log appends, truncations, votes and snapshots commit with
//! `Durability::Immediate` (fsync) before openraft is told they are done, so an acknowledged
//! change is on disk on a quorum. The committed index and purges commit without a sync: losing
//! them in a crash only rolls the node back to an older, still consistent view, and the next
//! synced commit persists them.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend,
    RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};
use parking_lot::RwLock;
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::TypeConfig;
use super::wire::{Batch, BatchResponse, WireError};
use crate::{AcpError, Fence, NodeId, RegistryState};

/// Log entries by index, each a postcard-encoded `Entry<TypeConfig>`.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Everything else, postcard-encoded, under the keys below.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const KEY_NODE_ID: &str = "node_id";
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
const KEY_SNAPSHOT: &str = "snapshot";

/// The file in `data_dir` that holds a node's raft state.
pub(crate) const FILE_NAME: &str = "acp-raft.redb";

/// Most commands in one entry: the fence leaves 16 bits for the position in the batch.
pub(crate) const FENCE_SLOTS: usize = 1 << 16;

type StorageResult<T> = Result<T, StorageError<NodeId>>;

fn any<E: std::error::Error + 'static>(e: E) -> AnyError {
    AnyError::new(&e)
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(value)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// The open redb file. Dropping the last handle closes it and then says so on `closed`: redb's
/// close does I/O and releases the file lock only at its end, so a restart in the same process
/// must wait for that, not just for the last handle to go.
pub(crate) struct Db {
    db: Option<Database>,
    closed: Option<tokio::sync::oneshot::Sender<()>>,
}

impl std::ops::Deref for Db {
    type Target = Database;
    fn deref(&self) -> &Database {
        self.db
            .as_ref()
            .expect("the database is open until Db is dropped")
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        drop(self.db.take());
        if let Some(closed) = self.closed.take() {
            let _ = closed.send(());
        }
    }
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Db")
    }
}

/// Opens (or, when allowed, creates) the node's redb file; the receiver fires once it is
/// closed again.
///
/// The wiped-disk rule: a voter that lost its disk also lost the vote it cast in its last term;
/// coming back under the same id it could vote a second time in that term and help elect two
/// leaders. So a missing (or never completed) file is only created when `bootstrap` says this is
/// the first start of a new cluster; otherwise the node refuses to start and must rejoin under a
/// new id. A file written by another node id is refused too (swapped directories).
pub(crate) fn open(
    data_dir: &Path,
    id: NodeId,
    bootstrap: bool,
) -> Result<(Arc<Db>, tokio::sync::oneshot::Receiver<()>), AcpError> {
    let path = data_dir.join(FILE_NAME);
    let storage = |what: &str, e: &dyn std::fmt::Display| {
        AcpError::Storage(format!("{what} {}: {e}", path.display()))
    };
    let existed = path.exists();
    if !existed && !bootstrap {
        return Err(wiped(&path, id));
    }
    std::fs::create_dir_all(data_dir).map_err(|e| storage("creating the directory of", &e))?;
    let db = Database::create(&path).map_err(|e| storage("opening", &e))?;
    let stored: Option<NodeId> = {
        let txn = db.begin_read().map_err(|e| storage("reading", &e))?;
        match txn.open_table(META) {
            Ok(table) => match table.get(KEY_NODE_ID).map_err(|e| storage("reading", &e))? {
                Some(v) => {
                    Some(decode(v.value()).map_err(|e| storage("decoding the node id in", &e))?)
                }
                None => None,
            },
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(storage("reading", &e)),
        }
    };
    match stored {
        Some(stored) if stored == id => {}
        Some(stored) => {
            return Err(AcpError::Storage(format!(
                "{} belongs to node {stored}, not node {id}: each node needs its own data directory",
                path.display()
            )));
        }
        // A file without an id was never completed: it is as good as empty.
        None if !bootstrap => return Err(wiped(&path, id)),
        None => {
            let mut txn = db.begin_write().map_err(|e| storage("writing", &e))?;
            txn.set_durability(Durability::Immediate);
            {
                txn.open_table(LOG).map_err(|e| storage("writing", &e))?;
                let mut meta = txn.open_table(META).map_err(|e| storage("writing", &e))?;
                let bytes = encode(&id).map_err(|e| storage("encoding the node id for", &e))?;
                meta.insert(KEY_NODE_ID, bytes.as_slice())
                    .map_err(|e| storage("writing", &e))?;
            }
            txn.commit().map_err(|e| storage("writing", &e))?;
        }
    }
    let (closed, on_close) = tokio::sync::oneshot::channel();
    Ok((
        Arc::new(Db {
            db: Some(db),
            closed: Some(closed),
        }),
        on_close,
    ))
}

fn wiped(path: &Path, id: NodeId) -> AcpError {
    AcpError::Storage(format!(
        "{} is missing or empty and this is not a bootstrap of a new cluster: node {id} may have \
         voted before its disk was lost, and a voter that forgot its vote can help elect two \
         leaders in one term. Restore the directory, or rejoin this host as a new node id (start it \
         with `join` under a fresh id, then add it with `add_voter` on the leader)",
        path.display()
    ))
}

// openraft's `StorageError` is large, but it is what the storage traits must return.
#[allow(clippy::result_large_err)]
fn read_meta<T: DeserializeOwned>(db: &Database, key: &str) -> StorageResult<Option<T>> {
    let txn = db.begin_read().map_err(|e| StorageIOError::read(any(e)))?;
    let table = txn
        .open_table(META)
        .map_err(|e| StorageIOError::read(any(e)))?;
    let Some(v) = table.get(key).map_err(|e| StorageIOError::read(any(e)))? else {
        return Ok(None);
    };
    decode(v.value())
        .map(Some)
        .map_err(|e| StorageIOError::read(any(e)).into())
}

/// Runs a write transaction off the async threads (a synced commit blocks for an fsync).
async fn write_txn<F>(db: &Arc<Db>, durability: Durability, f: F) -> Result<(), AnyError>
where
    F: FnOnce(&redb::WriteTransaction) -> Result<(), AnyError> + Send + 'static,
{
    let db = db.clone();
    tokio::task::spawn_blocking(move || {
        let mut txn = db.begin_write().map_err(any)?;
        txn.set_durability(durability);
        f(&txn)?;
        txn.commit().map_err(any)
    })
    .await
    .map_err(any)?
}

fn put_meta(txn: &redb::WriteTransaction, key: &str, bytes: &[u8]) -> Result<(), AnyError> {
    let mut table = txn.open_table(META).map_err(any)?;
    table.insert(key, bytes).map_err(any)?;
    Ok(())
}

/// The raft log, vote and purge/commit marks (openraft's `RaftLogStorage`). Cloned as its own
/// log reader: redb serves concurrent read transactions.
#[derive(Clone, Debug)]
pub(crate) struct LogStore {
    db: Arc<Db>,
}

impl LogStore {
    pub(crate) fn new(db: Arc<Db>) -> Self {
        Self { db }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| StorageIOError::read_logs(any(e)))?;
        let table = txn
            .open_table(LOG)
            .map_err(|e| StorageIOError::read_logs(any(e)))?;
        let mut entries = Vec::new();
        for item in table
            .range(range)
            .map_err(|e| StorageIOError::read_logs(any(e)))?
        {
            let (index, bytes) = item.map_err(|e| StorageIOError::read_logs(any(e)))?;
            let entry: Entry<TypeConfig> = decode(bytes.value())
                .map_err(|e| StorageIOError::read_log_at_index(index.value(), any(e)))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> = read_meta(&self.db, KEY_PURGED)?;
        let last = {
            let txn = self
                .db
                .begin_read()
                .map_err(|e| StorageIOError::read_logs(any(e)))?;
            let table = txn
                .open_table(LOG)
                .map_err(|e| StorageIOError::read_logs(any(e)))?;
            match table
                .last()
                .map_err(|e| StorageIOError::read_logs(any(e)))?
            {
                Some((index, bytes)) => {
                    let entry: Entry<TypeConfig> = decode(bytes.value())
                        .map_err(|e| StorageIOError::read_log_at_index(index.value(), any(e)))?;
                    Some(entry.log_id)
                }
                None => None,
            }
        };
        Ok(LogState {
            last_log_id: last.or(last_purged),
            last_purged_log_id: last_purged,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        let bytes = encode(vote).map_err(|e| StorageIOError::write_vote(any(e)))?;
        write_txn(&self.db, Durability::Immediate, move |txn| {
            put_meta(txn, KEY_VOTE, &bytes)
        })
        .await
        .map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        read_meta(&self.db, KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        let bytes = encode(&committed).map_err(|e| StorageIOError::write(any(e)))?;
        write_txn(&self.db, Durability::None, move |txn| {
            put_meta(txn, KEY_COMMITTED, &bytes)
        })
        .await
        .map_err(|e| StorageIOError::write(e).into())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(read_meta::<Option<LogId<NodeId>>>(&self.db, KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes = encode(&entry)
                .map_err(|e| StorageIOError::write_log_entry(entry.log_id, any(e)))?;
            encoded.push((entry.log_id.index, bytes));
        }
        let result = write_txn(&self.db, Durability::Immediate, move |txn| {
            let mut table = txn.open_table(LOG).map_err(any)?;
            for (index, bytes) in &encoded {
                table.insert(*index, bytes.as_slice()).map_err(any)?;
            }
            Ok(())
        })
        .await;
        // Only now, synced, may openraft count these entries as stored.
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        write_txn(&self.db, Durability::Immediate, move |txn| {
            let mut table = txn.open_table(LOG).map_err(any)?;
            table.retain_in(log_id.index.., |_, _| false).map_err(any)?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let bytes = encode(&log_id).map_err(|e| StorageIOError::write_logs(any(e)))?;
        write_txn(&self.db, Durability::None, move |txn| {
            put_meta(txn, KEY_PURGED, &bytes)?;
            let mut table = txn.open_table(LOG).map_err(any)?;
            table
                .retain_in(..=log_id.index, |_, _| false)
                .map_err(any)?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(e).into())
    }
}

/// The applied state, shared between the state machine (which writes it) and the registry's
/// linearizable reads (which read it after `ensure_linearizable`).
#[derive(Debug, Default)]
pub(crate) struct Applied {
    pub state: RegistryState,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
}

/// A snapshot as stored: openraft's metadata and the postcard-encoded [`RegistryState`].
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// openraft's state machine (and snapshot builder): applies batches to the shared
/// [`Applied`] and writes snapshots into the redb file.
#[derive(Clone, Debug)]
pub(crate) struct StateMachine {
    db: Arc<Db>,
    applied: Arc<RwLock<Applied>>,
    /// Distinguishes snapshots built at the same log id (after a restart, say).
    snapshots_built: Arc<AtomicU64>,
    path: PathBuf,
}

impl StateMachine {
    /// Loads the latest snapshot, if any, as the starting state; openraft replays the log after
    /// it.
    pub(crate) fn open(db: Arc<Db>, path: PathBuf) -> Result<Self, AcpError> {
        let stored: Option<StoredSnapshot> = read_meta(&db, KEY_SNAPSHOT).map_err(|e| {
            AcpError::Storage(format!("reading the snapshot in {}: {e}", path.display()))
        })?;
        let mut applied = Applied::default();
        if let Some(s) = stored {
            applied.state = decode(&s.data).map_err(|e| {
                AcpError::Storage(format!("decoding the snapshot in {}: {e}", path.display()))
            })?;
            applied.last_applied = s.meta.last_log_id;
            applied.membership = s.meta.last_membership;
        }
        Ok(Self {
            db,
            applied: Arc::new(RwLock::new(applied)),
            snapshots_built: Arc::new(AtomicU64::new(0)),
            path,
        })
    }

    pub(crate) fn applied(&self) -> Arc<RwLock<Applied>> {
        self.applied.clone()
    }

    async fn store_snapshot(&self, stored: StoredSnapshot) -> StorageResult<()> {
        let signature = stored.meta.signature();
        let bytes = encode(&stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(signature.clone()), any(e)))?;
        write_txn(&self.db, Durability::Immediate, move |txn| {
            put_meta(txn, KEY_SNAPSHOT, &bytes)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(signature), e).into())
    }
}

/// Applies one batch at log index `index`: the k-th command at `Fence(index << 16 | k)`.
fn apply_batch(state: &mut RegistryState, index: u64, batch: &Batch) -> BatchResponse {
    if batch.0.len() > FENCE_SLOTS - 1 {
        // Deterministic, so every replica refuses it alike; the batcher never builds one.
        let why = format!(
            "a batch of {} commands (at most {})",
            batch.0.len(),
            FENCE_SLOTS - 1
        );
        return BatchResponse(vec![Err(WireError::Invalid(why)); batch.0.len()]);
    }
    let results = batch
        .0
        .iter()
        .enumerate()
        .map(|(k, command)| {
            let fence = Fence(index << 16 | k as u64);
            state.apply(command, fence).map_err(WireError::from)
        })
        .collect();
    BatchResponse(results)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        let applied = self.applied.read();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<BatchResponse>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut applied = self.applied.write();
        let mut responses = Vec::new();
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(BatchResponse::default()),
                EntryPayload::Normal(batch) => {
                    let index = entry.log_id.index;
                    responses.push(apply_batch(&mut applied.state, index, &batch));
                }
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    responses.push(BatchResponse::default());
                }
            }
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let state: RegistryState = decode(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), any(e)))?;
        self.store_snapshot(StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .await?;
        let mut applied = self.applied.write();
        applied.state = state;
        applied.last_applied = meta.last_log_id;
        applied.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let stored: Option<StoredSnapshot> = read_meta(&self.db, KEY_SNAPSHOT)?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        // Copy under the lock, encode outside it: applies are not held up by the encoding.
        let (state, last_applied, membership) = {
            let applied = self.applied.read();
            (
                applied.state.clone(),
                applied.last_applied,
                applied.membership.clone(),
            )
        };
        let data = encode(&state).map_err(|e| {
            StorageError::from_io_error(
                ErrorSubject::StateMachine,
                ErrorVerb::Read,
                std::io::Error::other(e.to_string()),
            )
        })?;
        let n = self.snapshots_built.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{n}", id.leader_id.term, id.index),
            None => format!("none-{n}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        tracing::debug!(path = %self.path.display(), %meta, bytes = data.len(), "built a snapshot");
        self.store_snapshot(StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        })
        .await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Command, CommandOutcome, VmId};

    #[test]
    fn fences_in_a_batch_are_index_shifted_and_increasing() {
        let mut state = RegistryState::default();
        let vm = |n: &str| VmId::new(n).unwrap();
        let batch = Batch(vec![
            Command::Register {
                vm: vm("a"),
                owner: 1,
            },
            Command::Register {
                vm: vm("b"),
                owner: 2,
            },
        ]);
        let r = apply_batch(&mut state, 7, &batch);
        let fences: Vec<_> =
            r.0.iter()
                .map(|o| match o {
                    Ok(CommandOutcome::Changed(o)) => o.fence,
                    other => panic!("{other:?}"),
                })
                .collect();
        assert_eq!(fences, vec![Fence(7 << 16), Fence(7 << 16 | 1)]);
        let next = apply_batch(
            &mut state,
            8,
            &Batch(vec![Command::Register {
                vm: vm("c"),
                owner: 1,
            }]),
        );
        assert!(matches!(&next.0[0], Ok(CommandOutcome::Changed(o)) if o.fence > fences[1]));
    }

    #[test]
    fn an_empty_dir_is_refused_unless_bootstrapping() {
        let dir = tempfile::tempdir().unwrap();
        let err = open(dir.path(), 2, false).unwrap_err();
        assert!(
            matches!(&err, AcpError::Storage(m) if m.contains("new node id")),
            "{err}"
        );
        drop(open(dir.path(), 2, true).unwrap().0);
        // Once created, the file opens without bootstrap, but only for the same id.
        drop(open(dir.path(), 2, false).unwrap().0);
        let err = open(dir.path(), 3, false).unwrap_err();
        assert!(
            matches!(&err, AcpError::Storage(m) if m.contains("belongs to node 2")),
            "{err}"
        );
    }
}
