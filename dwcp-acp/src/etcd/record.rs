//! How a VM's record is stored as an etcd value, and read back.
//!
//! The value holds only what a change sets (owner and holding): the VM is the key, and the
//! fence is the key's `mod_revision`, which etcd assigns when the change commits. Transactions
//! compare values byte for byte, so this module is the only writer and its encoding is
//! canonical: the same record always encodes to the same bytes.

use serde::{Deserialize, Serialize};

use crate::{AcpError, Fence, Holding, NodeId, NodeRecord, Ownership, VmId};

/// The stored part of a record. Field order is the encoding: do not reorder.
#[derive(Serialize, Deserialize)]
struct Stored {
    owner: NodeId,
    holding: Holding,
}

/// The value to store for a record in this state (its fence is not stored).
pub(crate) fn encode(owner: NodeId, holding: Holding) -> Vec<u8> {
    serde_json::to_vec(&Stored { owner, holding }).expect("a record always serialises")
}

/// The record of `vm` from its stored value and the revision that last modified it.
pub(crate) fn decode(vm: &VmId, value: &[u8], mod_revision: i64) -> Result<Ownership, AcpError> {
    let stored: Stored = serde_json::from_slice(value).map_err(|e| {
        AcpError::Backend(format!(
            "the etcd value of VM {vm} is not a DWCP record ({e}); is another program writing \
             under this prefix?"
        ))
    })?;
    Ok(Ownership {
        vm: vm.clone(),
        owner: stored.owner,
        holding: stored.holding,
        fence: fence_of(mod_revision)?,
    })
}

/// A revision as a fence; etcd revisions start at 1, so anything else is a broken answer.
pub(crate) fn fence_of(revision: i64) -> Result<Fence, AcpError> {
    u64::try_from(revision)
        .ok()
        .filter(|r| *r > 0)
        .map(Fence)
        .ok_or_else(|| AcpError::Backend(format!("etcd answered with revision {revision}")))
}

/// A member's record as stored under `nodes/` and `live/`.
pub(crate) fn encode_node(node: &NodeRecord) -> Vec<u8> {
    serde_json::to_vec(node).expect("a node record always serialises")
}

/// A member's record from its stored value.
pub(crate) fn decode_node(key: &[u8], value: &[u8]) -> Result<NodeRecord, AcpError> {
    serde_json::from_slice(value).map_err(|e| {
        AcpError::Backend(format!(
            "the etcd value of {} is not a DWCP node record ({e}); is another program writing \
             under this prefix?",
            String::from_utf8_lossy(key)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoding_is_canonical_and_round_trips() {
        // Transactions compare these exact bytes: a change here breaks every stored record.
        assert_eq!(
            encode(1, Holding::Owned),
            br#"{"owner":1,"holding":"Owned"}"#
        );
        assert_eq!(
            encode(1, Holding::HandingOver { to: 2 }),
            br#"{"owner":1,"holding":{"HandingOver":{"to":2}}}"#
        );
        let vm = VmId::new("vm-1").unwrap();
        let r = decode(&vm, &encode(7, Holding::HandingOver { to: 3 }), 42).unwrap();
        assert_eq!(
            (r.owner, r.holding, r.fence),
            (7, Holding::HandingOver { to: 3 }, Fence(42))
        );
        assert!(matches!(decode(&vm, b"{}", 42), Err(AcpError::Backend(_))));
        assert!(fence_of(0).is_err());
    }
}
