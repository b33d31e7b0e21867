//! The node's register of customers with something to report or renew (unsent usage, a range in
//! flight, an open lease), in shared data. Every worker's tick syncs them, so nothing depends on
//! the one worker that served a customer: a worker whose instance was reset, or that no longer
//! sees that customer's calls, still gets its usage out and its lease renewed.

use std::collections::{BTreeMap, HashSet};

use rustc_hash::FxHashSet;

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

/// One shard as stored: its subjects kept as the text they are stored in, one per line, not
/// decoded into a set. Every tick reads all 16 and most are only looked through, so a set's
/// allocation per subject was most of a tick's register cost (`bench/profile.sh`, c-ticks).
struct Shard {
    key: String,
    /// Every subject followed by a newline.
    lines: String,
}

impl Keyed for Shard {
    fn key(&self) -> &str {
        &self.key
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SHARD_BYTES);
        for part in [MAGIC, "\n", &self.key, "\n", &self.lines] {
            out.extend_from_slice(part.as_bytes());
        }
        // Empty lines are no subjects.
        out.resize(out.len().max(SHARD_BYTES), b'\n');
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (key, lines) = text.strip_prefix(MAGIC)?.strip_prefix('\n')?.split_once('\n')?;
        let lines = lines.trim_end_matches('\n');
        let lines = if lines.is_empty() { String::new() } else { format!("{lines}\n") };
        Some(Shard { key: key.to_owned(), lines })
    }
}

impl Shard {
    fn subjects(&self) -> impl Iterator<Item = &str> {
        self.lines.split('\n').filter(|l| !l.is_empty())
    }

    /// How many subjects it holds (at most; empty lines are none).
    fn lines_held(&self) -> usize {
        self.lines.bytes().filter(|b| *b == b'\n').count()
    }

    fn contains(&self, subject: &str) -> bool {
        self.subjects().any(|s| s == subject)
    }

    /// Adds what fits of `subjects` to the shard's fixed length; whether any was added.
    fn add_what_fits(&mut self, subjects: &[&str]) -> bool {
        // The subject and its newline, after the header.
        let mut used = MAGIC.len() + self.key.len() + 2 + self.lines.len();
        // A full shard (the steady state of a node with more customers than the register
        // takes) is not looked through.
        if subjects.iter().all(|s| used + s.len() >= SHARD_BYTES) {
            return false;
        }
        // Sized at once and hashed with Fx: SipHash and regrowth were most of a tick's register
        // cost (`bench/profile.sh`, c-ticks). A shard bounds what one set can hold (hash flooding
        // by chosen subjects costs at most a few hundred of them).
        let mut known = subject_set(self.lines_held() + subjects.len());
        known.extend(self.subjects());
        let mut fresh = Vec::new();
        for s in subjects {
            if used + s.len() < SHARD_BYTES && known.insert(s) {
                used += s.len() + 1;
                fresh.push(*s);
            }
        }
        for s in &fresh {
            self.lines.push_str(s);
            self.lines.push('\n');
        }
        !fresh.is_empty()
    }

    /// Takes `subject` out; whether it was there.
    fn remove(&mut self, subject: &str) -> bool {
        if !self.contains(subject) {
            return false;
        }
        self.lines = self.subjects().filter(|s| *s != subject).flat_map(|s| [s, "\n"]).collect();
        true
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

/// Registers customers, with at most one read and one write per shard; returns how many could
/// not be written for contention. A full shard is no failure: the register is bounded by design
/// (16 shards of 3,800 bytes, ≈ 2,900 subjects of 20 bytes), and the customers it cannot take are
/// synced by the workers that serve them.
pub fn add(store: &dyn SharedData, config: &FilterConfig, subjects: &[&str]) -> usize {
    let mut by_shard: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
    for s in subjects {
        by_shard.entry(shard_of(s)).or_default().push(s);
    }
    let mut contended = 0;
    for (shard, subjects) in by_shard {
        let key = shard_key(config, shard);
        // Most often each is there already, or the shard full: nothing to write.
        if shared::read::<Shard>(store, &key).is_some_and(|mut s| !s.add_what_fits(&subjects)) {
            continue;
        }
        let result = shared::update::<Shard, ()>(store, &key, |current| {
            let mut shard = current.unwrap_or_else(|| Shard { key: key.clone(), lines: String::new() });
            let added = shard.add_what_fits(&subjects);
            (added.then_some(shard), ())
        });
        if result.is_err() {
            contended += subjects.len();
        }
    }
    contended
}

/// Takes a customer off the register; `false` if the shard could not be written (contended).
pub fn remove(store: &dyn SharedData, config: &FilterConfig, subject: &str) -> bool {
    let key = shard_key(config, shard_of(subject));
    shared::update::<Shard, ()>(store, &key, |current| match current {
        Some(mut shard) => {
            let removed = shard.remove(subject);
            (removed.then_some(shard), ())
        }
        None => (None, ()),
    })
    .is_ok()
}

/// An empty set of subjects with room for `capacity`.
fn subject_set<'a>(capacity: usize) -> FxHashSet<&'a str> {
    FxHashSet::with_capacity_and_hasher(capacity, Default::default())
}

/// The register as read at one instant: its shards' text, whose subjects are borrowed, not
/// copied one by one (every tick reads the whole register).
pub struct Snapshot(Vec<Shard>);

impl Snapshot {
    pub fn subjects(&self) -> impl Iterator<Item = &str> {
        self.0.iter().flat_map(Shard::subjects)
    }

    /// Every registered subject, as a set to look up in. SipHash with random keys, not Fx: the
    /// whole register (up to 16 shards of short subjects, tens of thousands) goes in one set, too
    /// many for chosen colliding subjects to be harmless.
    pub fn to_set(&self) -> HashSet<&str> {
        let mut set = HashSet::with_capacity(self.0.iter().map(Shard::lines_held).sum());
        set.extend(self.subjects());
        set
    }
}

/// Every registered customer.
pub fn all(store: &dyn SharedData, config: &FilterConfig) -> Snapshot {
    Snapshot((0..SHARDS).filter_map(|i| shared::read::<Shard>(store, &shard_key(config, i))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::fake::{FakeShared, Rules};

    fn config() -> FilterConfig {
        FilterConfig::parse(br#"{"ledger": {"upstream": "l", "token": "t"}, "price": "1", "currency": "USD"}"#).unwrap()
    }

    #[test]
    fn customers_come_and_go_under_both_hosts() {
        let config = config();
        for rules in
            [Rules::Envoy, Rules::Kong { hash: |k| k.len() as u32 * 131 + u32::from(k.as_bytes()[k.len() - 1]) }]
        {
            let store = FakeShared::new(rules);
            assert_eq!(add(&store, &config, &["alice", "bob", "alice"]), 0);
            assert_eq!(add(&store, &config, &["alice"]), 0);
            let register = all(&store, &config);
            let mut everyone: Vec<&str> = register.subjects().collect();
            everyone.sort();
            assert_eq!(everyone, ["alice", "bob"]);
            assert_eq!(register.to_set(), ["alice", "bob"].into_iter().collect());
            assert!(remove(&store, &config, "alice"));
            assert_eq!(all(&store, &config).subjects().collect::<Vec<_>>(), ["bob"]);
        }
    }

    #[test]
    fn a_shard_reads_what_it_wrote_and_matches_whole_subjects_only() {
        let mut shard = Shard { key: "k".into(), lines: String::new() };
        assert!(shard.add_what_fits(&["alice2", "bob", "alice2"]));
        assert!(!shard.add_what_fits(&["bob"]), "there already");
        assert!(!shard.contains("alice") && !shard.contains("lice2") && shard.contains("alice2"));
        let stored = shard.encode();
        assert_eq!(stored.len(), SHARD_BYTES);
        assert!(stored.starts_with(b"reg1\nk\nalice2\nbob\n\n"));
        let mut read = Shard::decode(&stored).unwrap();
        assert_eq!(read.subjects().collect::<Vec<_>>(), ["alice2", "bob"]);
        assert!(!read.remove("alice") && read.remove("alice2") && !read.remove("alice2"));
        assert_eq!(Shard::decode(&read.encode()).unwrap().subjects().collect::<Vec<_>>(), ["bob"]);
        // Empty lines anywhere are no subjects; another version's value is no shard.
        let sparse = Shard::decode(b"reg1\nk\n\na\n\n\nb\n\n\n").unwrap();
        assert_eq!(sparse.subjects().collect::<Vec<_>>(), ["a", "b"]);
        for other in [&b"reg0\nk\na\n"[..], b"reg1", b"reg1\nk", b"\xffreg1\nk\n"] {
            assert!(Shard::decode(other).is_none(), "{other:?}");
        }
        assert!(Shard::decode(b"reg1\nk\n").unwrap().subjects().next().is_none());
    }

    #[test]
    fn a_shard_keeps_one_length_and_refuses_what_does_not_fit() {
        let config = config();
        let store = FakeShared::new(Rules::Envoy);
        let key = shard_key(&config, 0);
        let length = || store.get(&key).0.map(|v| v.len());
        // Subjects of 200 bytes that all land in shard 0, one at a time until it is full.
        let subjects: Vec<String> = (0..).map(|i| format!("{i:0>200}")).filter(|s| shard_of(s) == 0).take(30).collect();
        let mut added = 0;
        for subject in &subjects {
            assert_eq!(add(&store, &config, &[subject]), 0, "a full shard is no failure");
            if all(&store, &config).subjects().count() == added {
                break;
            }
            added += 1;
            assert_eq!(length(), Some(SHARD_BYTES), "after {added}");
        }
        assert!((15..=19).contains(&added), "{added} subjects of 200 bytes");
        // Full: asking again reads the shard and writes nothing.
        let writes = store.sets.get();
        assert_eq!(add(&store, &config, &[&subjects[added]]), 0);
        assert_eq!((store.sets.get(), all(&store, &config).subjects().count()), (writes, added));
    }

    #[test]
    fn many_customers_are_registered_with_one_read_and_one_write_per_shard() {
        let config = config();
        let store = FakeShared::new(Rules::Envoy);
        let subjects: Vec<String> = (0..10_000).map(|i| format!("customer-{i:08}")).collect();
        let subjects: Vec<&str> = subjects.iter().map(String::as_str).collect();
        assert_eq!(add(&store, &config, &subjects), 0);
        // Per shard, one write; a shard not created yet is looked for in every probe slot twice
        // (once to look, once in the write's compare-and-swap).
        let probes = crate::shared::PROBES as u64;
        assert_eq!(store.sets.get(), SHARDS);
        assert!(store.gets.get() <= 2 * probes * SHARDS, "{:?}", store.gets);
        let registered = all(&store, &config).subjects().count();
        assert!((2_000..10_000).contains(&registered), "as many as fit: {registered}");
        // Again: every shard is full or holds them already: one read per shard, nothing written.
        let (reads, writes) = (store.gets.get(), store.sets.get());
        assert_eq!(add(&store, &config, &subjects), 0);
        assert_eq!((store.gets.get() - reads, store.sets.get() - writes), (SHARDS, 0));
    }
}
