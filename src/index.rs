//! The store's index of records, kept twice: in key order in a B-tree, for listings,
//! prefixes and snapshots, and by key hash, for the point reads and writes that are nearly
//! every request. A B-tree lookup compares the key against a record at each of its twenty
//! or so steps, each through the record's pointer; a hash lookup compares it against one.
//! Both hold 8-byte pointers to the same records.

use std::collections::{BTreeSet, HashSet};
use std::ops::Bound;

use crate::record::Record;

/// Records by key, ordered and hashed. The hash is std's SipHash with a key drawn at random
/// per process, so clients cannot choose keys that collide (Redis hashes its keys the same
/// way); the faster unkeyed hashes are open to that.
#[derive(Default)]
pub(crate) struct Index {
    ordered: BTreeSet<Record>,
    hashed: HashSet<Record>,
}

impl Index {
    /// Records held.
    pub fn len(&self) -> usize {
        self.hashed.len()
    }

    /// The record of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&Record> {
        self.hashed.get(key)
    }

    /// Stores `record`, returning the record of the same key it replaces.
    pub fn replace(&mut self, record: Record) -> Option<Record> {
        self.ordered.replace(record.clone());
        self.hashed.replace(record)
    }

    /// Removes and returns the record of `key`.
    pub fn take(&mut self, key: &[u8]) -> Option<Record> {
        self.ordered.remove(key);
        self.hashed.take(key)
    }

    /// The records from `lower` on, in key order.
    pub fn from(&self, lower: Bound<&[u8]>) -> impl Iterator<Item = &Record> {
        self.ordered.range::<[u8], _>((lower, Bound::Unbounded))
    }
}

#[cfg(test)]
mod tests {
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
}
