//! One stored key in one allocation: its revisions, its deadline, its key and its value,
//! behind a thin reference-counted pointer. The map, the history and every subscriber share
//! the same allocation, so a set allocates the entry once and a read copies nothing.
//!
//! This layout is what keeps a million small keys below Redis's footprint: the index holds
//! 8-byte pointers (twice: ordered and hashed), and the entry of a 16-byte key with a
//! 64-byte value fits a 128-byte allocator class.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

use triomphe::ThinArc;

/// Keys are at most this long, so their length fits beside the version in one word.
pub const MAX_KEY_BYTES: usize = u16::MAX as usize;

/// The bytes an answer is counted as holding for one key and value: their lengths and
/// [`ANSWER_OVERHEAD`], which covers the protobuf framing and revisions around them.
pub fn answer_bytes(key: &str, value_len: usize) -> usize {
    key.len() + value_len + ANSWER_OVERHEAD
}

/// Framing and fixed fields counted per item of an answer (see [`answer_bytes`]); more than
/// protobuf writes for a key-value's revisions, TTL and lengths, or for a set's or delete's
/// result.
pub const ANSWER_OVERHEAD: usize = 64;

const VERSION_BITS: u32 = 48;
const VERSION_MAX: u64 = (1 << VERSION_BITS) - 1;

#[derive(Clone, Copy, PartialEq, Eq)]
struct Header {
    create_revision: u64,
    mod_revision: u64,
    /// The version in the low 48 bits (2^48 sets of one key is centuries at any rate this
    /// server reaches), the key's length in the high 16.
    version_and_key_len: u64,
    /// Nanoseconds after the store's epoch at which the key expires; 0 for never.
    deadline: u64,
}

/// A key with its value and revisions, immutable once made. Ordered, compared and hashed by
/// key alone, and borrowable as the key's bytes, so a set of records is a map by key.
#[derive(Clone)]
pub struct Record(ThinArc<Header, u8>);

/// The revisions and deadline of a record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    /// The revision that created the key.
    pub create_revision: u64,
    /// The revision that last set the key.
    pub mod_revision: u64,
    /// Sets since the key was created (1 after the first).
    pub version: u64,
    /// Nanoseconds after the store's epoch at which the key expires; 0 for never.
    pub deadline: u64,
}

impl Record {
    /// A record of `key` set to `value`.
    ///
    /// # Panics
    ///
    /// If `key` is longer than [`MAX_KEY_BYTES`]; configuration caps `limits.max_key_bytes`
    /// below that, and requests are checked against it before they reach the store.
    pub fn new(key: &str, value: &str, meta: Meta) -> Self {
        let key_len = u16::try_from(key.len()).expect("keys are at most 64 KiB");
        let header = Header {
            create_revision: meta.create_revision,
            mod_revision: meta.mod_revision,
            version_and_key_len: meta.version.min(VERSION_MAX) | u64::from(key_len) << VERSION_BITS,
            deadline: meta.deadline,
        };
        // Copying through a scratch buffer is two memcpys; the single-allocation constructor
        // fed by an iterator copies byte by byte (docs/performance.md has its cost).
        let mut bytes = Vec::with_capacity(key.len() + value.len());
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(value.as_bytes());
        Self(ThinArc::from_header_and_slice(header, &bytes))
    }

    /// The key.
    pub fn key(&self) -> &str {
        std::str::from_utf8(self.key_bytes()).expect("a record is made from a str key")
    }

    /// The value.
    pub fn value(&self) -> &str {
        std::str::from_utf8(self.value_bytes()).expect("a record is made from a str value")
    }

    /// The value's bytes, without checking again that they are UTF-8.
    pub fn value_bytes(&self) -> &[u8] {
        &self.0.slice[self.key_len()..]
    }

    /// The revisions and deadline.
    pub fn meta(&self) -> Meta {
        let header = &self.0.header.header;
        Meta {
            create_revision: header.create_revision,
            mod_revision: header.mod_revision,
            version: header.version_and_key_len & VERSION_MAX,
            deadline: header.deadline,
        }
    }

    /// The bytes of key and value together.
    pub fn size(&self) -> usize {
        self.0.slice.len()
    }

    fn key_len(&self) -> usize {
        usize::from((self.0.header.header.version_and_key_len >> VERSION_BITS) as u16)
    }

    fn key_bytes(&self) -> &[u8] {
        &self.0.slice[..self.key_len()]
    }
}

impl Borrow<[u8]> for Record {
    fn borrow(&self) -> &[u8] {
        self.key_bytes()
    }
}

// Byte order is code point order for UTF-8, so records sort exactly as their keys as `str`.
impl Ord for Record {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key_bytes().cmp(other.key_bytes())
    }
}

impl PartialOrd for Record {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Record {
    fn eq(&self, other: &Self) -> bool {
        self.key_bytes() == other.key_bytes()
    }
}

impl Eq for Record {}

/// Hashed as its key's bytes are, so a hashed set of records is found by key.
impl Hash for Record {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key_bytes().hash(state);
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("key", &self.key())
            .field("value", &self.value())
            .field("meta", &self.meta())
            .finish()
    }
}

/// A value as read: a view of a record's value, sharing its allocation.
#[derive(Clone)]
pub struct Value(Record);

impl Value {
    /// The value of `record`, sharing its allocation.
    pub fn of(record: &Record) -> Self {
        Self(record.clone())
    }

    /// The key it is stored under.
    pub fn key(&self) -> &str {
        self.0.key()
    }

    /// Its bytes: what `deref` gives without checking again that they are UTF-8.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.value_bytes()
    }
}

impl Deref for Value {
    type Target = str;

    fn deref(&self) -> &str {
        self.0.value()
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Value {}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(version: u64) -> Meta {
        Meta {
            create_revision: 3,
            mod_revision: 7,
            version,
            deadline: 42,
        }
    }

    #[test]
    fn a_record_gives_back_its_key_value_and_meta() {
        let record = Record::new("héllo", "wörld", meta(5));
        assert_eq!(record.key(), "héllo");
        assert_eq!(record.value(), "wörld");
        assert_eq!(record.meta(), meta(5));
        assert_eq!(record.size(), "héllo".len() + "wörld".len());
    }

    #[test]
    fn empty_keys_and_values_and_the_longest_key_round_trip() {
        let empty = Record::new("", "", meta(1));
        assert_eq!((empty.key(), empty.value()), ("", ""));
        let long = "k".repeat(MAX_KEY_BYTES);
        let record = Record::new(&long, "v", meta(VERSION_MAX));
        assert_eq!(record.key(), long);
        assert_eq!(record.value(), "v");
        assert_eq!(record.meta().version, VERSION_MAX);
    }

    #[test]
    fn records_order_and_compare_by_key_alone() {
        let a = Record::new("a", "z", meta(1));
        let b = Record::new("b", "a", meta(1));
        let a2 = Record::new("a", "other", meta(9));
        assert!(a < b);
        assert_eq!(a, a2);
        let borrowed: &[u8] = b.borrow();
        assert_eq!(borrowed, b"b");
    }

    #[test]
    fn a_value_shares_its_record_and_reads_as_str() {
        let record = Record::new("k", "v", meta(1));
        let value = Value::of(&record);
        assert_eq!(&*value, "v");
        assert_eq!(value.to_string(), "v");
        assert_eq!(value, Value::of(&Record::new("other", "v", meta(2))));
    }
}
