//! Node-wide state in proxy-wasm shared data, written only by compare-and-swap.
//!
//! One loop that is correct under both hosts: Envoy overwrites on a set without CAS and inserts
//! on a CAS against a missing key; Kong refuses both. So: always read first; insert with no CAS
//! only when the key has never existed; otherwise write with the CAS just read; retry on a
//! mismatch. Kong compares keys by CRC32 only, so every value carries its own key and a value
//! that holds another key is treated as a collision: the next probe slot is used.

/// The host's shared data, as the filter needs it.
pub trait SharedData {
    /// The value and its CAS token. Envoy keeps removed keys as (None, Some(cas)).
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes `value` if `cas` still matches (`None`: the key must not exist yet).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch>;
}

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

fn slot(key: &str, probe: usize) -> String {
    if probe == 0 {
        key.to_owned()
    } else {
        format!("{key}#{probe}")
    }
}

/// Where `key` lives: its slot, what is there (if it is ours) and the CAS to write with.
fn locate<T: Keyed>(store: &dyn SharedData, key: &str) -> Option<(String, Option<T>, Option<u32>)> {
    for probe in 0..PROBES {
        let name = slot(key, probe);
        let (bytes, cas) = store.get(&name);
        match bytes.as_deref().filter(|b| !b.is_empty()) {
            None => return Some((name, None, cas)),
            Some(b) => match T::decode(b) {
                Some(v) if v.key() == key => return Some((name, Some(v), cas)),
                // Unreadable values (another version of the filter) are reclaimed.
                None => return Some((name, None, cas)),
                Some(_) => continue,
            },
        }
    }
    None
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
        if store.set(&name, &next.encode(), cas).is_ok() {
            return Ok(result);
        }
    }
    Err(UpdateError::Contended)
}

#[cfg(test)]
pub mod fake {
    //! Shared data with either host's CAS rules, for native tests.
    use std::cell::RefCell;
    use std::collections::HashMap;

    use super::{CasMismatch, SharedData};

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
    }

    impl FakeShared {
        pub fn new(rules: Rules) -> Self {
            FakeShared { rules, entries: RefCell::default(), next_cas: RefCell::new(1), interfere: RefCell::new(0) }
        }

        fn identity(&self, key: &str) -> String {
            match self.rules {
                Rules::Envoy => key.to_owned(),
                Rules::Kong { hash } => format!("crc:{}", hash(key)),
            }
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
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            match self.entries.borrow().get(&self.identity(key)) {
                Some((v, cas)) => (v.clone(), Some(*cas)),
                None => (None, None),
            }
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
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
