//! The gateway node's identity: chosen once by its first worker and kept in shared data, so every
//! worker of the node (and an instance that replaced a trapped one) reports usage under one id.

use std::hash::{BuildHasher, Hasher};

use credits::limits::MAX_NODE_LEN;

use crate::shared::{self, Keyed, SharedData, UpdateError};

/// The node's record in shared data.
struct NodeRecord {
    id: String,
}

const NODE_KEY: &str = "prepaid_credits/node";

impl Keyed for NodeRecord {
    fn key(&self) -> &str {
        NODE_KEY
    }

    fn encode(&self) -> Vec<u8> {
        format!("node1|{}|{NODE_KEY}", self.id).into_bytes()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let rest = text.strip_prefix("node1|")?;
        let (id, key) = rest.split_once('|')?;
        // Only an id the ledger takes (a corrupt one would have every sync refused, for good:
        // read as no record, it is replaced by a fresh one).
        let usable = !id.is_empty() && id.len() <= MAX_NODE_LEN && !id.contains('/');
        (key == NODE_KEY && usable).then(|| NodeRecord { id: id.to_owned() })
    }
}

/// A random 64-bit number: std's `RandomState` is seeded from the host's randomness (WASI
/// `random_get`); `salt` tells callers in one instant apart.
pub fn random_u64(salt: u64) -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(salt);
    h.finish()
}

/// The node's id, creating it if this is the node's first worker.
pub fn id(store: &dyn SharedData, salt: u64) -> String {
    let fresh = format!("{:016x}", random_u64(salt));
    shared::update::<NodeRecord, String>(store, NODE_KEY, |existing| match existing {
        Some(n) => (None, n.id),
        None => (Some(NodeRecord { id: fresh.clone() }), fresh.clone()),
    })
    .unwrap_or(fresh)
}

/// Writes the node's record back if the host evicted it (checked every tick), so a worker that
/// starts later joins this node's id instead of choosing another. Usage keys name entries'
/// origins, not the node, so even a node whose id changed books nothing twice.
pub fn keep(store: &dyn SharedData, id: &str) -> Result<(), UpdateError> {
    shared::update::<NodeRecord, ()>(store, NODE_KEY, |existing| match existing {
        Some(_) => (None, ()),
        None => (Some(NodeRecord { id: id.to_owned() }), ()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::fake::{FakeShared, Rules};

    /// A record whose id the ledger refuses (corrupt bytes) is read as no record and replaced by a
    /// fresh id: otherwise every sync of the node would be refused, for good.
    #[test]
    fn a_node_id_the_ledger_refuses_is_not_taken_from_shared_data() {
        for bad in ["", "a/b", &"x".repeat(MAX_NODE_LEN + 1)] {
            let store = FakeShared::new(Rules::Envoy);
            store.set(NODE_KEY, format!("node1|{bad}|{NODE_KEY}").as_bytes(), None).unwrap();
            let node = id(&store, 1);
            assert!(!node.is_empty() && node.len() <= MAX_NODE_LEN && !node.contains('/'), "node id {node:?}");
            assert_eq!(id(&store, 2), node, "and kept");
        }
    }

    #[test]
    fn every_worker_of_a_node_gets_the_first_workers_id() {
        for rules in [Rules::Envoy, Rules::Kong { hash: |k| k.len() as u32 }] {
            let store = FakeShared::new(rules);
            let first = id(&store, 1);
            assert_eq!(first.len(), 16);
            assert_eq!(id(&store, 2), first);
        }
    }

    #[test]
    fn an_evicted_node_record_is_written_back_with_the_same_id() {
        let store = FakeShared::new(Rules::Kong { hash: |k| k.len() as u32 });
        let first = id(&store, 1);
        store.remove(NODE_KEY);
        keep(&store, &first).unwrap();
        assert_eq!(id(&store, 2), first, "a worker starting later joins the node");
    }
}
