//! The node's register of customers with something to report or renew (unsent usage, a range in
//! flight, an open lease), in shared data. Every worker's tick syncs them, so nothing depends on
//! the one worker that served a customer: a worker whose instance was reset, or that no longer
//! sees that customer's calls, still gets its usage out and its lease renewed.

use std::collections::BTreeSet;

use crate::config::FilterConfig;
use crate::shared::{self, Keyed, SharedData};

/// The register is split so one write stays small however many customers a node serves.
pub const SHARDS: u64 = 16;
/// Every shard is stored at this length (padded), so its value never changes size: Kong's
/// shm_kv moves a value that does, and a move under eviction pressure can evict the value being
/// moved (kong-config/README.md). One page of nginx's slab with its node and key. A shard holds
/// about 180 subjects of 20 bytes; beyond that, customers are synced by the workers that serve
/// them only.
pub const SHARD_BYTES: usize = 3_800;
/// What every shard's stored form starts with.
pub const MAGIC: &str = "reg1";

struct Shard {
    key: String,
    subjects: BTreeSet<String>,
}

impl Keyed for Shard {
    fn key(&self) -> &str {
        &self.key
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = self.unpadded().into_bytes();
        // Empty lines are no subjects.
        out.resize(out.len().max(SHARD_BYTES), b'\n');
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.split('\n');
        if lines.next()? != MAGIC {
            return None;
        }
        let key = lines.next()?.to_owned();
        Some(Shard { key, subjects: lines.filter(|l| !l.is_empty()).map(str::to_owned).collect() })
    }
}

impl Shard {
    fn unpadded(&self) -> String {
        let mut out = format!("{MAGIC}\n{}\n", self.key);
        for s in &self.subjects {
            out.push_str(s);
            out.push('\n');
        }
        out
    }

    /// Does `subject` still fit in the shard's fixed length?
    fn fits(&self, subject: &str) -> bool {
        // The subject and its newline.
        self.unpadded().len() + subject.len() < SHARD_BYTES
    }
}

fn shard_of(subject: &str) -> u64 {
    // FNV-1a: stable across workers and hosts.
    subject.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)) % SHARDS
}

/// One register per currency and set of scopes: configurations that price alike share it.
fn shard_key(config: &FilterConfig, shard: u64) -> String {
    let scopes: Vec<&str> =
        config.pricing.scopes.iter().map(|s| s.feature.as_ref().map_or("-", |f| f.as_str())).collect();
    format!("prepaid_credits/r/{}/{}/{shard}", config.currency, scopes.join(","))
}

/// Registers a customer; `false` if it could not be (shard full or contended).
pub fn add(store: &dyn SharedData, config: &FilterConfig, subject: &str) -> bool {
    let key = shard_key(config, shard_of(subject));
    if shared::read::<Shard>(store, &key).is_some_and(|s| s.subjects.contains(subject)) {
        return true;
    }
    let result = shared::update::<Shard, bool>(store, &key, |current| {
        let mut shard = current.unwrap_or_else(|| Shard { key: key.clone(), subjects: BTreeSet::new() });
        if shard.subjects.contains(subject) {
            return (None, true);
        }
        if !shard.fits(subject) {
            return (None, false);
        }
        shard.subjects.insert(subject.to_owned());
        (Some(shard), true)
    });
    result.unwrap_or(false)
}

/// Takes a customer off the register; `false` if the shard could not be written (contended).
pub fn remove(store: &dyn SharedData, config: &FilterConfig, subject: &str) -> bool {
    let key = shard_key(config, shard_of(subject));
    shared::update::<Shard, ()>(store, &key, |current| match current {
        Some(mut shard) => {
            let removed = shard.subjects.remove(subject);
            (removed.then_some(shard), ())
        }
        None => (None, ()),
    })
    .is_ok()
}

/// Every registered customer.
pub fn all(store: &dyn SharedData, config: &FilterConfig) -> Vec<String> {
    (0..SHARDS).filter_map(|i| shared::read::<Shard>(store, &shard_key(config, i))).flat_map(|s| s.subjects).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::fake::{FakeShared, Rules};

    #[test]
    fn customers_come_and_go_under_both_hosts() {
        let config =
            FilterConfig::parse(br#"{"ledger": {"upstream": "l", "token": "t"}, "price": "1", "currency": "USD"}"#)
                .unwrap();
        for rules in
            [Rules::Envoy, Rules::Kong { hash: |k| k.len() as u32 * 131 + u32::from(k.as_bytes()[k.len() - 1]) }]
        {
            let store = FakeShared::new(rules);
            assert!(add(&store, &config, "alice") && add(&store, &config, "bob") && add(&store, &config, "alice"));
            let mut everyone = all(&store, &config);
            everyone.sort();
            assert_eq!(everyone, ["alice", "bob"]);
            assert!(remove(&store, &config, "alice"));
            assert_eq!(all(&store, &config), ["bob"]);
        }
    }

    #[test]
    fn a_shard_keeps_one_length_and_refuses_what_does_not_fit() {
        let config =
            FilterConfig::parse(br#"{"ledger": {"upstream": "l", "token": "t"}, "price": "1", "currency": "USD"}"#)
                .unwrap();
        let store = FakeShared::new(Rules::Envoy);
        let key = shard_key(&config, 0);
        let length = || store.get(&key).0.map(|v| v.len());
        let mut added = 0;
        // Subjects of 200 bytes that all land in shard 0, until it is full.
        for i in 0.. {
            let subject = format!("{i:0>200}");
            if shard_of(&subject) != 0 {
                continue;
            }
            if !add(&store, &config, &subject) {
                break;
            }
            added += 1;
            assert_eq!(length(), Some(SHARD_BYTES), "after {added}");
        }
        assert!((15..=19).contains(&added), "{added} subjects of 200 bytes");
        assert_eq!(all(&store, &config).len(), added);
    }
}
