//! The store's index of records, kept twice: in key order in a B-tree, for listings,
//! prefixes and snapshots, and by key hash, for the point reads and writes that are nearly
//! every request. A B-tree lookup compares the key against a record at each of its twenty
//! or so steps, each through the record's pointer; a hash lookup compares it against one.
//! Both hold 8-byte pointers to the same records.

use std::collections::{BTreeSet, HashSet, hash_set};
use std::ops::Bound;

use crate::record::Record;

/// Records moved to a grown hash table per write. One would do (the new table has room for
/// the old one's records and one new key per write); more ends the move sooner, since until
/// then a read of a key not yet moved falls back to the B-tree. Tests move one at a time so
/// that moves interleave with every kind of write.
const MOVES_PER_WRITE: usize = if cfg!(test) { 1 } else { 32 };

/// Records by key, ordered and hashed. The hash is std's SipHash with a key drawn at random
/// per process, so clients cannot choose keys that collide (Redis hashes its keys the same
/// way); the faster unkeyed hashes are open to that.
///
/// The hash table grows as Redis grows its own, a few records at a time, by every write and
/// by the store's background task ([`Index::move_records`]), rather than all at once:
/// rehashing every key in one go holds the write lock for time proportional to the store
/// (docs/performance.md gives the figures). The B-tree, which always holds every record, answers for the records not
/// yet moved.
#[derive(Default)]
pub(crate) struct Index {
    ordered: BTreeSet<Record>,
    hashed: HashSet<Record>,
    /// While the hash table grows: the old table's records not yet moved.
    moving: Option<hash_set::IntoIter<Record>>,
    /// While it grows: the keys taken out, whose records in the old table must not be moved.
    taken: HashSet<Record>,
}

impl Index {
    /// Records held.
    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    /// Whether the hash table is growing, its records still being moved.
    pub fn is_growing(&self) -> bool {
        self.moving.is_some()
    }

    /// The record of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&Record> {
        match self.hashed.get(key) {
            None if self.is_growing() => self.ordered.get(key),
            found => found,
        }
    }

    /// Stores `record`, returning the record of the same key it replaces. May start the
    /// hash table growing (see [`Index::is_growing`]).
    pub fn replace(&mut self, record: Record) -> Option<Record> {
        self.move_records(MOVES_PER_WRITE);
        if !self.is_growing() && !self.has_room() {
            let grown = HashSet::with_capacity(2 * self.hashed.capacity().max(4));
            self.moving = Some(std::mem::replace(&mut self.hashed, grown).into_iter());
        }
        debug_assert!(self.has_room(), "a full table rehashes in one go");
        self.hashed.replace(record.clone());
        self.ordered.replace(record)
    }

    /// Removes and returns the record of `key`.
    pub fn take(&mut self, key: &[u8]) -> Option<Record> {
        self.move_records(MOVES_PER_WRITE);
        let record = self.ordered.take(key)?;
        self.hashed.remove(key);
        // The old table may hold an older record of the key even if the new one had it.
        if self.is_growing() {
            self.taken.insert(record.clone());
        }
        Some(record)
    }

    /// The records from `lower` on, in key order.
    pub fn from(&self, lower: Bound<&[u8]>) -> impl Iterator<Item = &Record> {
        self.ordered.range::<[u8], _>((lower, Bound::Unbounded))
    }

    /// Whether the hash table can take a record without growing: std's table grows, or
    /// rehashes in place, on any insert, even of a key it holds, once it has no room left.
    fn has_room(&self) -> bool {
        self.hashed.len() < self.hashed.capacity()
    }

    /// Moves up to `count` records to the grown hash table, if it is growing; returns
    /// whether it still is.
    pub fn move_records(&mut self, count: usize) -> bool {
        let Some(moving) = &mut self.moving else {
            return false;
        };
        for record in moving.by_ref().take(count) {
            // A record set again since is already in the new table, and `insert` keeps it.
            if !self.taken.contains(&record) {
                debug_assert!(
                    self.hashed.len() < self.hashed.capacity(),
                    "rehashes in one go"
                );
                self.hashed.insert(record);
            }
        }
        if moving.len() > 0 {
            return true;
        }
        self.moving = None;
        self.taken = HashSet::new();
        false
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::record::Meta;

    fn record(key: &str, value: &str) -> Record {
        Record::new(key, value, Meta::default())
    }

    fn keys(index: &Index, lower: Bound<&[u8]>) -> Vec<String> {
        index.from(lower).map(|r| r.key().to_owned()).collect()
    }

    #[test]
    fn both_orders_hold_the_same_records() {
        let mut index = Index::default();
        for key in ["b", "a", "c", "ab"] {
            assert!(index.replace(record(key, "1")).is_none());
        }
        let old = index.replace(record("a", "2")).expect("a was stored");
        assert_eq!(old.value(), "1");
        assert_eq!(index.get(b"a").map(Record::value), Some("2"));
        assert_eq!(
            index.from(Bound::Unbounded).next().map(Record::value),
            Some("2")
        );
        assert_eq!(
            index.take(b"b").map(|r| r.key().to_owned()),
            Some("b".into())
        );
        assert!(index.take(b"b").is_none());
        assert!(index.get(b"b").is_none());
        assert_eq!(index.len(), 3);
        assert_eq!(keys(&index, Bound::Unbounded), ["a", "ab", "c"]);
        assert_eq!(keys(&index, Bound::Excluded(b"a")), ["ab", "c"]);
    }

    proptest! {
        /// Sets and deletes on a small key space, the hash table growing through the sizes
        /// of 3 to 56 records as they go: after every write, each key reads as a map has it,
        /// whether its record has moved to the grown table yet or not.
        #[test]
        fn reads_follow_writes_while_the_hash_table_grows(
            writes in prop::collection::vec((0..48u8, prop::option::of(0..4u8)), 0..400),
        ) {
            let mut index = Index::default();
            let mut model = BTreeMap::new();
            for (key, value) in writes {
                let key = format!("k{key}");
                match value {
                    Some(value) => {
                        let value = value.to_string();
                        let old = index.replace(record(&key, &value));
                        prop_assert_eq!(
                            old.map(|r| r.value().to_owned()),
                            model.insert(key, value)
                        );
                    }
                    None => {
                        let old = index.take(key.as_bytes());
                        prop_assert_eq!(old.map(|r| r.value().to_owned()), model.remove(&key));
                    }
                }
                for key in (0..48).map(|k| format!("k{k}")) {
                    let read = index.get(key.as_bytes()).map(Record::value);
                    prop_assert_eq!(read, model.get(&key).map(String::as_str), "{}", key);
                }
                prop_assert_eq!(index.len(), model.len());
            }
            let listed: Vec<_> = keys(&index, Bound::Unbounded);
            prop_assert_eq!(listed, model.into_keys().collect::<Vec<_>>());
        }
    }
}
