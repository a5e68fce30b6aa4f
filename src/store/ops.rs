//! The store's vocabulary: what callers pass in ([`Op`], [`SetOptions`], [`Start`]) and get
//! back ([`KeyValue`], [`Page`], [`OpResult`], and the errors).

use super::*;

/// A key, its value and its revisions, as read.
#[derive(Clone)]
pub struct KeyValue {
    /// The value, which also knows its key.
    pub value: Value,
    /// The revision that created the key.
    pub create_revision: u64,
    /// The revision that last set the key.
    pub mod_revision: u64,
    /// Sets since the key was created (1 after the first).
    pub version: u64,
    /// Time left before the key expires, if it has a TTL.
    pub ttl: Option<Duration>,
}

impl KeyValue {
    /// The key.
    pub fn key(&self) -> &str {
        self.value.key()
    }
}

// By hand, because the key lives inside `value`, whose own `Eq` and `Debug` see only the value.
impl PartialEq for KeyValue {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
            && self.value == other.value
            && self.create_revision == other.create_revision
            && self.mod_revision == other.mod_revision
            && self.version == other.version
            && self.ttl == other.ttl
    }
}

impl Eq for KeyValue {}

impl fmt::Debug for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyValue")
            .field("key", &self.key())
            .field("value", &self.value)
            .field("create_revision", &self.create_revision)
            .field("mod_revision", &self.mod_revision)
            .field("version", &self.version)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// How a set is guarded and how long the key lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetOptions {
    /// Set only if the key's `mod_revision` equals this; 0 means only if it is absent.
    pub expected_mod_revision: Option<u64>,
    /// Expire the key after this long; `None` keeps it until it is deleted or set again.
    pub ttl: Option<Duration>,
}

/// A guarded write found the key at another revision; nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", conflict_message(*.expected, *.actual))]
pub struct Conflict {
    /// The `mod_revision` the write expected (0: absent).
    pub expected: u64,
    /// The key's `mod_revision` (0: absent).
    pub actual: u64,
}

fn conflict_message(expected: u64, actual: u64) -> String {
    match (expected, actual) {
        (0, actual) => format!("key exists at mod_revision {actual}, expected it to be absent"),
        (expected, 0) => format!("key does not exist, expected mod_revision {expected}"),
        (expected, actual) => {
            format!("key is at mod_revision {actual}, expected {expected}")
        }
    }
}

/// What a delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// The removed key's last `mod_revision`, or `None` if there was no key.
    pub prev_mod_revision: Option<u64>,
    /// The delete's revision, or the current revision when nothing was deleted.
    pub revision: u64,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Keys in lexicographic order.
    pub items: Vec<KeyValue>,
    /// Whether more keys under the prefix follow the last item.
    pub more: bool,
    /// The revision the page was read at.
    pub revision: u64,
}

/// One operation of a batch, borrowing its strings from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    /// Read a key.
    Get(&'a str),
    /// Set a key.
    Set {
        /// The key.
        key: &'a str,
        /// The value.
        value: &'a str,
        /// Guard and TTL.
        options: SetOptions,
    },
    /// Delete a key.
    Delete {
        /// The key.
        key: &'a str,
        /// Delete only at this `mod_revision` (0: only if absent).
        expected_mod_revision: Option<u64>,
    },
}

impl Op<'_> {
    /// The key the op reads or writes.
    pub fn key(&self) -> &str {
        match *self {
            Op::Get(key) | Op::Set { key, .. } | Op::Delete { key, .. } => key,
        }
    }
}

/// The outcome of one operation of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// What a get found, and the revision it read at.
    Get(Option<KeyValue>, u64),
    /// The revision a set produced.
    Set(u64),
    /// What a delete did.
    Delete(Deleted),
    /// A set or delete whose guard did not match; it changed nothing.
    Conflict(Conflict),
}

/// A batch's answer would have passed its limit; nothing was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the batch's answer would pass the limit of {max} bytes (limits.max_response_bytes) at op \
     {op}; nothing was applied: split the batch"
)]
pub struct TooLarge {
    /// The index of the op at which the answer passed the limit.
    pub op: usize,
    /// The limit, in bytes.
    pub max: usize,
}

/// Where a subscription begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With the next change.
    Now,
    /// With the change at this revision (at least 1): retained history first, then live.
    Revision(u64),
    /// With the current value of every matching key, then live changes.
    Snapshot,
}

/// Why a subscription could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// Too many subscriptions are open.
    #[error(transparent)]
    TooMany(#[from] TooManySubscriptions),
    /// The start revision is older than the retained history.
    #[error(
        "revision {requested} has been compacted; the oldest revision still available is \
         {oldest} (history.max_events, history.max_bytes): re-list, then subscribe from the \
         list's revision + 1"
    )]
    Compacted {
        /// The revision asked for.
        requested: u64,
        /// The oldest revision that can still be replayed.
        oldest: u64,
    },
}
