//! Node-wide state in proxy-wasm shared data, written only by compare-and-swap.
//!
//! One loop that is correct under both hosts: Envoy overwrites on a set without CAS and inserts
//! on a CAS against a missing key; Kong refuses both. So: always read first; insert with no CAS
//! only when the key has never existed; otherwise write with the CAS just read; retry on a
//! mismatch. Kong compares keys by CRC32 only, so every value carries its own key and a value
//! that holds another key is treated as a collision: the next probe slot is used.
//!
//! Creating a key is atomic on both: Envoy inserts on any CAS against a missing key and refuses
//! it once the key exists, so two workers creating one entry at once cannot both win (a blind
//! insert would let the second overwrite the first, and with it the first's hold and the lease
//! it asked for under its entry's origin).

use std::borrow::Cow;

/// The host's shared data, as the filter needs it.
pub trait SharedData {
    /// The value and its CAS token. Envoy keeps removed keys as (None, Some(cas)).
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes `value` if `cas` still matches (`None`: the key must not exist yet).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch>;
    /// Removes the value if `cas` still matches (Envoy keeps the key with an empty value).
    fn delete(&self, key: &str, cas: Option<u32>) -> Result<(), CasMismatch>;
    /// A new entry's origin: random on a host, so that no two incarnations of an entry share one.
    fn fresh_origin(&self) -> u64;
    /// The CAS that creates a missing key only if no one else creates it first: `Some` under
    /// Envoy's rules (see the module's doc), `None` under Kong's (which refuse a CAS there).
    fn create_cas(&self) -> Option<u32>;
}

/// The CAS Envoy is asked to create a key with: any value no existing key's CAS holds (Envoy's
/// counter would have to stand at exactly this value when that key was last written).
pub const ENVOY_CREATE_CAS: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CasMismatch;

/// Bounded so a hot key can never stall a call: beyond it, the caller applies its failure mode.
pub const MAX_CAS_ATTEMPTS: usize = 16;
/// Alternative slots tried when a key's hash collides with another key's (Kong).
pub const PROBES: usize = 4;

/// A value stored under a key, which it names itself.
pub trait Keyed: Sized {
    fn key(&self) -> &str;
    fn encode(&self) -> Vec<u8>;
    fn decode(bytes: &[u8]) -> Option<Self>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateError {
    /// Other writers kept winning.
    Contended,
    /// Every probe slot holds another key.
    NoSlot,
}

fn slot(key: &str, probe: usize) -> Cow<'_, str> {
    if probe == 0 {
        Cow::Borrowed(key)
    } else {
        Cow::Owned(format!("{key}#{probe}"))
    }
}

/// Where `key` lives: its slot, what is there (if it is ours) and the CAS to write with. Every
/// probe is looked at before a free one is taken: Kong evicts values, so the key may live beyond
/// a slot that was emptied under it.
fn locate<'k, T: Keyed>(store: &dyn SharedData, key: &'k str) -> Option<(Cow<'k, str>, Option<T>, Option<u32>)> {
    let mut free = None;
    for probe in 0..PROBES {
        let name = slot(key, probe);
        let (bytes, cas) = store.get(&name);
        let readable = bytes.as_deref().filter(|b| !b.is_empty()).map(T::decode);
        match readable {
            Some(Some(v)) if v.key() == key => return Some((name, Some(v), cas)),
            Some(Some(_)) => continue,
            // Empty, or unreadable (another version of the filter): reclaimed.
            None | Some(None) => {
                if free.is_none() {
                    free = Some((name, None, cas));
                }
            }
        }
    }
    free
}

/// Reads the value stored for `key`.
pub fn read<T: Keyed>(store: &dyn SharedData, key: &str) -> Option<T> {
    locate(store, key).and_then(|(_, v, _)| v)
}

/// Applies `change` to the current value (or `None`) until the write wins. `change` returns the
/// value to write (`None`: write nothing) and a result; it may run several times, so it must
/// be pure.
pub fn update<T: Keyed, R>(
    store: &dyn SharedData,
    key: &str,
    mut change: impl FnMut(Option<T>) -> (Option<T>, R),
) -> Result<R, UpdateError> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (name, current, cas) = locate::<T>(store, key).ok_or(UpdateError::NoSlot)?;
        let (next, result) = change(current);
        let Some(next) = next else { return Ok(result) };
        if store.set(&name, &next.encode(), cas.or_else(|| store.create_cas())).is_ok() {
            return Ok(result);
        }
    }
    Err(UpdateError::Contended)
}

/// Removes the value stored for `key` if `pred` holds for it; returns what was removed.
pub fn remove_if<T: Keyed>(
    store: &dyn SharedData,
    key: &str,
    pred: impl Fn(&T) -> bool,
) -> Result<Option<T>, UpdateError> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (name, current, cas) = locate::<T>(store, key).ok_or(UpdateError::NoSlot)?;
        let Some(value) = current.filter(|v| pred(v)) else { return Ok(None) };
        if store.delete(&name, cas).is_ok() {
            return Ok(Some(value));
        }
    }
    Err(UpdateError::Contended)
}

#[cfg(test)]
pub mod fake {
    //! Shared data with either host's CAS rules, for native tests.
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    use std::sync::atomic::{AtomicU64, Ordering};

    use super::{CasMismatch, SharedData};

    /// Origins a store gives come from a block of this many bits.
    pub const ORIGIN_BLOCK_BITS: u32 = 32;

    #[derive(Clone, Copy, Debug)]
    pub enum Rules {
        Envoy,
        /// Kong's engine; keys are compared by this function's hash, so tests can force collisions.
        Kong {
            hash: fn(&str) -> u32,
        },
    }

    /// A stored value (None once removed under Envoy's rules) and its CAS.
    type Slot = (Option<Vec<u8>>, u32);

    pub struct FakeShared {
        pub rules: Rules,
        entries: RefCell<HashMap<String, Slot>>,
        next_cas: RefCell<u32>,
        /// Makes the next n sets fail as if another worker had written first.
        pub interfere: RefCell<usize>,
        next_origin: RefCell<u64>,
        /// Reads and writes so far (each a host call on a real engine).
        pub gets: Cell<u64>,
        pub sets: Cell<u64>,
    }

    impl FakeShared {
        /// A store whose origins no other store of the process gives (as random ones would not).
        pub fn new(rules: Rules) -> Self {
            static STORES: AtomicU64 = AtomicU64::new(1 << 8);
            Self::with_origins(rules, STORES.fetch_add(1, Ordering::Relaxed) << ORIGIN_BLOCK_BITS)
        }

        /// A store whose entries' origins count up from `first` (deterministic, for the simulator).
        pub fn with_origins(rules: Rules, first: u64) -> Self {
            FakeShared {
                rules,
                entries: RefCell::default(),
                next_cas: RefCell::new(1),
                interfere: RefCell::new(0),
                next_origin: RefCell::new(first),
                gets: Cell::new(0),
                sets: Cell::new(0),
            }
        }

        fn identity(&self, key: &str) -> String {
            match self.rules {
                Rules::Envoy => key.to_owned(),
                Rules::Kong { hash } => format!("crc:{}", hash(key)),
            }
        }

        /// Evicts the `n`th stored value that `evictable` accepts (in a fixed order, modulo how
        /// many there are), as Kong does when its zone is full; returns what was there.
        pub fn evict_nth(&self, n: usize, evictable: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
            let mut entries = self.entries.borrow_mut();
            let mut ids: Vec<&String> =
                entries.iter().filter(|(_, (v, _))| v.as_deref().is_some_and(&evictable)).map(|(id, _)| id).collect();
            if ids.is_empty() {
                return None;
            }
            ids.sort();
            let id = ids[n % ids.len()].clone();
            entries.remove(&id).and_then(|(v, _)| v)
        }

        pub fn remove(&self, key: &str) {
            let id = self.identity(key);
            let mut entries = self.entries.borrow_mut();
            match self.rules {
                // Envoy keeps the key with an empty value.
                Rules::Envoy => {
                    if let Some(e) = entries.get_mut(&id) {
                        e.0 = None;
                    }
                }
                Rules::Kong { .. } => {
                    entries.remove(&id);
                }
            }
        }
    }

    impl SharedData for FakeShared {
        fn fresh_origin(&self) -> u64 {
            let mut next = self.next_origin.borrow_mut();
            *next += 1;
            *next
        }

        fn create_cas(&self) -> Option<u32> {
            match self.rules {
                Rules::Envoy => Some(super::ENVOY_CREATE_CAS),
                Rules::Kong { .. } => None,
            }
        }

        fn delete(&self, key: &str, cas: Option<u32>) -> Result<(), CasMismatch> {
            let id = self.identity(key);
            if self.entries.borrow().get(&id).map(|(_, c)| *c) != cas {
                return Err(CasMismatch);
            }
            self.remove(key);
            if let Some(e) = self.entries.borrow_mut().get_mut(&id) {
                let next = { *self.next_cas.borrow() };
                *self.next_cas.borrow_mut() += 1;
                e.1 = next;
            }
            Ok(())
        }

        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            self.gets.set(self.gets.get() + 1);
            match self.entries.borrow().get(&self.identity(key)) {
                Some((v, cas)) => (v.clone(), Some(*cas)),
                None => (None, None),
            }
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
            self.sets.set(self.sets.get() + 1);
            {
                let mut interfere = self.interfere.borrow_mut();
                if *interfere > 0 {
                    *interfere -= 1;
                    // Someone else wrote: bump the stored CAS.
                    let id = self.identity(key);
                    let next = { *self.next_cas.borrow() };
                    *self.next_cas.borrow_mut() += 1;
                    if let Some(e) = self.entries.borrow_mut().get_mut(&id) {
                        e.1 = next;
                    }
                    return Err(CasMismatch);
                }
            }
            let id = self.identity(key);
            let mut entries = self.entries.borrow_mut();
            let existing = entries.get(&id).map(|(_, c)| *c);
            let allowed = match (self.rules, existing, cas) {
                (Rules::Envoy, None, _) => true,
                (Rules::Envoy, Some(_), None) => true, // Envoy: a blind set overwrites
                (Rules::Envoy, Some(stored), Some(c)) => stored == c,
                (Rules::Kong { .. }, None, None) => true,
                (Rules::Kong { .. }, None, Some(_)) => false,
                (Rules::Kong { .. }, Some(_), None) => false, // Kong refuses a blind set
                (Rules::Kong { .. }, Some(stored), Some(c)) => stored == c,
            };
            if !allowed {
                return Err(CasMismatch);
            }
            let next = { *self.next_cas.borrow() };
            *self.next_cas.borrow_mut() += 1;
            entries.insert(id, (Some(value.to_vec()), next));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{FakeShared, Rules};
    use super::*;

    #[test]
    fn two_workers_creating_one_key_at_once_cannot_both_win() {
        for rules in [Rules::Envoy, Rules::Kong { hash: |k| k.len() as u32 }] {
            let store = FakeShared::new(rules);
            // Both read the key missing, then both create it.
            assert_eq!(store.get("k"), (None, None));
            assert!(store.set("k", b"first", store.create_cas()).is_ok());
            assert_eq!(store.set("k", b"second", store.create_cas()), Err(CasMismatch), "{rules:?}");
            assert_eq!(store.get("k").0.as_deref(), Some(&b"first"[..]));
        }
    }

    #[derive(Debug, PartialEq)]
    struct Counter {
        key: String,
        n: u32,
    }

    impl Keyed for Counter {
        fn key(&self) -> &str {
            &self.key
        }
        fn encode(&self) -> Vec<u8> {
            format!("{}|{}", self.n, self.key).into_bytes()
        }
        fn decode(bytes: &[u8]) -> Option<Self> {
            let text = std::str::from_utf8(bytes).ok()?;
            let (n, key) = text.split_once('|')?;
            Some(Counter { key: key.to_owned(), n: n.parse().ok()? })
        }
    }

    fn bump(store: &dyn SharedData, key: &str) -> Result<u32, UpdateError> {
        update::<Counter, u32>(store, key, |c| {
            let n = c.map_or(0, |c| c.n) + 1;
            (Some(Counter { key: key.to_owned(), n }), n)
        })
    }

    /// "alice" and "bob" collide; their probe slots do not.
    fn colliding(key: &str) -> u32 {
        if key == "alice" || key == "bob" {
            7
        } else {
            crc_like(key)
        }
    }

    fn crc_like(key: &str) -> u32 {
        key.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
    }

    #[test]
    fn increments_under_both_hosts_rules() {
        for rules in [Rules::Envoy, Rules::Kong { hash: crc_like }] {
            let store = FakeShared::new(rules);
            for expected in 1..=5 {
                assert_eq!(bump(&store, "k"), Ok(expected), "{rules:?}");
            }
        }
    }

    #[test]
    fn a_lost_race_is_retried_not_dropped() {
        for rules in [Rules::Envoy, Rules::Kong { hash: crc_like }] {
            let store = FakeShared::new(rules);
            bump(&store, "k").unwrap();
            *store.interfere.borrow_mut() = 3;
            assert_eq!(bump(&store, "k"), Ok(2));
        }
    }

    #[test]
    fn endless_contention_gives_up_instead_of_spinning() {
        let store = FakeShared::new(Rules::Kong { hash: crc_like });
        bump(&store, "k").unwrap();
        *store.interfere.borrow_mut() = MAX_CAS_ATTEMPTS;
        assert_eq!(bump(&store, "k"), Err(UpdateError::Contended));
    }

    #[test]
    fn colliding_keys_under_kong_keep_separate_values() {
        // The second key must neither see nor clobber the first key's value.
        let store = FakeShared::new(Rules::Kong { hash: colliding });
        assert_eq!(bump(&store, "alice"), Ok(1));
        assert_eq!(bump(&store, "bob"), Ok(1));
        assert_eq!(bump(&store, "alice"), Ok(2));
        assert_eq!(read::<Counter>(&store, "bob").map(|c| c.n), Some(1));
    }

    #[test]
    fn removed_keys_are_rewritten_under_both_hosts() {
        for rules in [Rules::Envoy, Rules::Kong { hash: crc_like }] {
            let store = FakeShared::new(rules);
            bump(&store, "k").unwrap();
            store.remove("k");
            assert_eq!(read::<Counter>(&store, "k"), None);
            assert_eq!(bump(&store, "k"), Ok(1), "{rules:?}");
        }
    }
}
