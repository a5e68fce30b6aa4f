//! The client's domain types and their conversion from and to the wire (`pb`): what callers
//! pass and get back instead of protobuf messages.

use std::time::Duration;

use crate::pb::{self, batch_op, batch_result, change_event::ChangeType};

/// A stored key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// Its value (may be empty).
    pub value: String,
    /// The revision that created the key.
    pub create_revision: i64,
    /// The revision that last set the key: what [`SetOptions::if_mod_revision`] compares.
    pub mod_revision: i64,
    /// How many times the key was set since it was created.
    pub version: i64,
    /// Time left until the key expires; `None` when it has no TTL. Milliseconds on the wire.
    pub ttl: Option<Duration>,
}

impl From<pb::KeyValue> for KeyValue {
    fn from(item: pb::KeyValue) -> Self {
        KeyValue {
            key: item.key,
            value: item.value,
            create_revision: item.create_revision,
            mod_revision: item.mod_revision,
            version: item.version,
            ttl: ttl(item.ttl_ms),
        }
    }
}

fn ttl(ms: i64) -> Option<Duration> {
    u64::try_from(ms)
        .ok()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

/// What [`Client::get`](super::Client::get) read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetResponse {
    /// The key and its value, or `None` when the key does not exist (or has expired).
    pub kv: Option<KeyValue>,
    /// The store revision the read was made at.
    pub revision: i64,
}

impl GetResponse {
    pub(crate) fn from_wire(key: String, response: pb::GetResponse) -> Self {
        let kv = response.found.then(|| KeyValue {
            key,
            value: response.value,
            create_revision: response.create_revision,
            mod_revision: response.mod_revision,
            version: response.version,
            ttl: ttl(response.ttl_ms),
        });
        GetResponse {
            kv,
            revision: response.revision,
        }
    }
}

/// How a set is guarded and how long its key lives. The default: unguarded, no TTL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetOptions {
    ttl: Option<Duration>,
    expected_mod_revision: Option<i64>,
}

impl SetOptions {
    /// Options for an unguarded set without TTL.
    pub fn new() -> Self {
        Self::default()
    }

    /// Remove the key after `ttl` (sent in whole milliseconds, rounded up; the server
    /// refuses more than ten years with INVALID_ARGUMENT). `Duration::ZERO` means no TTL.
    /// A set always replaces the key's previous TTL.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl).filter(|ttl| !ttl.is_zero());
        self
    }

    /// Compare-and-set: write only if the key's current `mod_revision` is `revision`,
    /// otherwise fail with [`Error::Conflict`](super::Error::Conflict) and change nothing.
    /// A revision of 0 is the same as [`SetOptions::if_absent`].
    pub fn if_mod_revision(mut self, revision: i64) -> Self {
        self.expected_mod_revision = Some(revision);
        self
    }

    /// Create-only: write only if the key does not exist, otherwise fail with
    /// [`Error::Conflict`](super::Error::Conflict). Replaces an earlier `if_mod_revision`.
    pub fn if_absent(self) -> Self {
        // The API spells "must not exist" as an expected revision of 0.
        self.if_mod_revision(0)
    }

    pub(crate) fn into_wire(self, key: String, value: String) -> pb::SetRequest {
        let ttl_ms = self.ttl.map_or(0, |ttl| {
            i64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(i64::MAX)
        });
        pb::SetRequest {
            key,
            value,
            expected_mod_revision: self.expected_mod_revision,
            ttl_ms,
        }
    }
}

/// What a set did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetResponse {
    /// The revision the set produced: the key's new `mod_revision`.
    pub revision: i64,
    /// The server's short confirmation for people (`stored at revision 7`).
    pub message: String,
}

/// How a delete is guarded. The default: unguarded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteOptions {
    expected_mod_revision: Option<i64>,
}

impl DeleteOptions {
    /// Options for an unguarded delete.
    pub fn new() -> Self {
        Self::default()
    }

    /// Compare-and-delete: remove the key only if its current `mod_revision` is `revision`,
    /// otherwise fail with [`Error::Conflict`](super::Error::Conflict).
    pub fn if_mod_revision(mut self, revision: i64) -> Self {
        self.expected_mod_revision = Some(revision);
        self
    }

    pub(crate) fn into_wire(self, key: String) -> pb::DeleteRequest {
        pb::DeleteRequest {
            key,
            expected_mod_revision: self.expected_mod_revision,
        }
    }
}

/// What a delete did. Deleting a missing key is not an error: `deleted` is false.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteResponse {
    /// Whether the key existed and was removed.
    pub deleted: bool,
    /// The removed key's last `mod_revision` (0 when nothing was deleted).
    pub prev_mod_revision: i64,
    /// The revision of this delete, or the current store revision when nothing was deleted.
    pub revision: i64,
}

impl From<pb::DeleteResponse> for DeleteResponse {
    fn from(response: pb::DeleteResponse) -> Self {
        DeleteResponse {
            deleted: response.deleted,
            prev_mod_revision: response.prev_mod_revision,
            revision: response.revision,
        }
    }
}

/// How [`Client::list`](super::Client::list) pages. The default: every key, 1000 per page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOptions {
    pub(crate) page_size: u32,
    pub(crate) limit: Option<u64>,
    pub(crate) start_after: String,
}

impl Default for ListOptions {
    fn default() -> Self {
        ListOptions {
            page_size: 1000,
            limit: None,
            start_after: String::new(),
        }
    }
}

impl ListOptions {
    /// Every key under the prefix, 1000 per page.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keys per page (at least 1); the server caps it at its `limits.max_page`.
    pub fn page_size(mut self, keys: u32) -> Self {
        self.page_size = keys.max(1);
        self
    }

    /// Stop after this many keys in all, asking for no more than that.
    pub fn limit(mut self, keys: u64) -> Self {
        self.limit = Some(keys);
        self
    }

    /// Start after this key (exclusive), as a listing cut short continues.
    pub fn start_after(mut self, key: impl Into<String>) -> Self {
        self.start_after = key.into();
        self
    }
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The keys, in byte order, after the previous page's.
    pub items: Vec<KeyValue>,
    /// The store revision this page was read at. Pages of one listing may be read at
    /// different revisions; a subscription with `initial` is the consistent snapshot.
    pub revision: i64,
}

/// One op of a [`Client::batch`](super::Client::batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    /// Read a key, as [`Client::get`](super::Client::get).
    Get {
        /// The key.
        key: String,
    },
    /// Write a key, as [`Client::set_with`](super::Client::set_with).
    Set {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Its guard and TTL.
        options: SetOptions,
    },
    /// Remove a key, as [`Client::delete_with`](super::Client::delete_with).
    Delete {
        /// The key.
        key: String,
        /// Its guard.
        options: DeleteOptions,
    },
}

impl BatchOp {
    /// A get of `key`.
    pub fn get(key: impl Into<String>) -> Self {
        BatchOp::Get { key: key.into() }
    }

    /// An unguarded set of `key` without TTL.
    pub fn set(key: impl Into<String>, value: impl Into<String>) -> Self {
        BatchOp::Set {
            key: key.into(),
            value: value.into(),
            options: SetOptions::default(),
        }
    }

    /// An unguarded delete of `key`.
    pub fn delete(key: impl Into<String>) -> Self {
        BatchOp::Delete {
            key: key.into(),
            options: DeleteOptions::default(),
        }
    }

    pub(crate) fn is_write(&self) -> bool {
        !matches!(self, BatchOp::Get { .. })
    }

    pub(crate) fn key(&self) -> &str {
        match self {
            BatchOp::Get { key } | BatchOp::Set { key, .. } | BatchOp::Delete { key, .. } => key,
        }
    }

    pub(crate) fn into_wire(self) -> pb::BatchOp {
        let op = match self {
            BatchOp::Get { key } => batch_op::Op::Get(pb::GetRequest { key }),
            BatchOp::Set {
                key,
                value,
                options,
            } => batch_op::Op::Set(options.into_wire(key, value)),
            BatchOp::Delete { key, options } => batch_op::Op::Delete(options.into_wire(key)),
        };
        pb::BatchOp { op: Some(op) }
    }
}

/// The result of one op of a batch, in the order of the ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchResult {
    /// A get's read.
    Get(GetResponse),
    /// A set's new revision.
    Set(SetResponse),
    /// A delete's outcome.
    Delete(DeleteResponse),
    /// The op's guard did not match; nothing changed for it (the other ops still applied).
    Conflict {
        /// The key's current `mod_revision` (0: absent).
        mod_revision: i64,
        /// What did not match, as FAILED_PRECONDITION would say it.
        message: String,
    },
}

impl BatchResult {
    pub(crate) fn from_wire(key: String, result: pb::BatchResult) -> Option<Self> {
        Some(match result.result? {
            batch_result::Result::Get(get) => BatchResult::Get(GetResponse::from_wire(key, get)),
            batch_result::Result::Set(set) => BatchResult::Set(SetResponse {
                revision: set.revision,
                message: set.message,
            }),
            batch_result::Result::Delete(delete) => BatchResult::Delete(delete.into()),
            batch_result::Result::Conflict(conflict) => BatchResult::Conflict {
                mod_revision: conflict.mod_revision,
                message: conflict.message,
            },
        })
    }
}

/// What a batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchResponse {
    /// One result per op, in the order of the ops.
    pub results: Vec<BatchResult>,
    /// The store revision after the batch.
    pub revision: i64,
}

/// What happened to a key, in a [`Change`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The key was set to the change's value.
    Set,
    /// The key was removed, or expired (see [`Change::expired`]).
    Delete,
    /// A kind this client does not know, from a newer server (or UNKNOWN, which no server
    /// sends): the wire number.
    Other(i32),
}

impl ChangeKind {
    /// The name the proto gives it: `SET`, `DELETE`, or `UNKNOWN` for any other.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Set => ChangeType::Set.as_str_name(),
            ChangeKind::Delete => ChangeType::Delete.as_str_name(),
            ChangeKind::Other(_) => ChangeType::Unknown.as_str_name(),
        }
    }
}

/// A change to a key, as a subscription delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Set or delete.
    pub kind: ChangeKind,
    /// The key that changed.
    pub key: String,
    /// The new value (empty for a delete).
    pub value: String,
    /// The store revision of this change; a subscription's changes come in increasing
    /// revision order (a snapshot's, in key order, each at its key's `mod_revision`).
    pub revision: i64,
    /// When the change was applied: Unix time in milliseconds.
    pub timestamp_ms: i64,
    /// For a delete: the key expired (its TTL ran out) rather than being deleted.
    pub expired: bool,
    /// One of a snapshot's current values, sent first when asked with
    /// [`SubscribeOptions::initial`](super::SubscribeOptions::initial).
    pub initial: bool,
    /// The key's `create_revision` after this change (0 for a delete).
    pub create_revision: i64,
    /// The key's version after this change (0 for a delete).
    pub version: i64,
}

/// One item of a [`Subscription`](super::Subscription).
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A key changed.
    Change(Change),
    /// Not a change: every matching change up to `revision` has been delivered. Sent at the
    /// end of a snapshot, and when a quiet stream asked for progress.
    Progress {
        /// The revision reached.
        revision: i64,
    },
    /// The stream was lost for `reason` and is being resubscribed (a notice: nothing is
    /// missed). From `from_revision` on, no change is lost or repeated; `None` means a
    /// snapshot was cut short and starts over, so its keys are delivered again.
    Resuming {
        /// The first revision the resumed stream delivers, or `None` for a new snapshot.
        from_revision: Option<i64>,
        /// Why the stream was lost.
        reason: super::Error,
    },
}

impl Event {
    pub(crate) fn from_wire(event: pb::ChangeEvent) -> Self {
        let kind = match event.change_type() {
            ChangeType::Progress => {
                return Event::Progress {
                    revision: event.revision,
                };
            }
            ChangeType::Set => ChangeKind::Set,
            ChangeType::Delete => ChangeKind::Delete,
            ChangeType::Unknown => ChangeKind::Other(event.change_type),
        };
        Event::Change(Change {
            kind,
            key: event.key,
            value: event.value,
            revision: event.revision,
            timestamp_ms: event.timestamp,
            expired: event.expired,
            initial: event.initial,
            create_revision: event.create_revision,
            version: event.version,
        })
    }
}
