//! The store: an ordered in-memory map with etcd's revision model, TTLs and a bounded change
//! history, behind one reader-writer lock. Every change gets the next revision and is
//! published to the matching subscribers ([`crate::pubsub`]) before the write lock is released.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::ops::Bound;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use crate::config::{HistorySettings, SubscriptionSettings};
use crate::index::Index;
use crate::pubsub::{Change, ChangeKind, Hub, HubStats, Key, PreImages, TooManySubscriptions};
use crate::record::{ANSWER_OVERHEAD, Meta, Record, Value, answer_bytes};

mod subscription;

use subscription::Before;
pub use subscription::{Ended, Subscription};

/// While the index's hash table grows, the background task moves this many records every
/// [`TICK`]: a small share of each millisecond under the write lock, and a million records
/// in about a second (docs/performance.md has the figures).
const MOVES_PER_TICK: usize = 1024;

/// How often the background task takes the write lock while it has work queued.
const TICK: Duration = Duration::from_millis(1);

/// Expired keys the background task removes each [`TICK`] while more are due, so that a
/// million keys expiring at once never hold the write lock for long: the last expiry events
/// of a million come about four seconds after their deadline. Reads hide the keys at once.
pub const EXPIRED_PER_SWEEP: usize = 256;

/// Expired keys a write removes before its own work: writes share the sweeping, as Redis's
/// do, at a small and fixed cost each.
const EXPIRED_PER_WRITE: usize = 4;

/// A handle to the shared store; clones share the same data.
///
/// One lock guards the map, the revision counter, the history and the expiry index. A
/// write holds it for the map operation and the non-blocking queueing of its change, never
/// across an `.await`, so revisions, history order and delivery order are one and the same.
#[derive(Clone)]
pub struct Store {
    state: Arc<RwLock<State>>,
    hub: Hub,
    /// Wakes the background task ([`Store::expire_until`]) when a key gets a deadline
    /// earlier than any before, or the index's hash table begins to grow.
    wake: Arc<Notify>,
    clock: Clock,
}

struct State {
    /// The records, by key.
    map: Index,
    revision: u64,
    history: History,
    /// Keys with a TTL, by deadline, so expiry never scans the map.
    expiry: BTreeSet<(Instant, Key)>,
    /// Records keep their deadline as nanoseconds after this instant, in one word.
    epoch: Instant,
    /// The lengths of every key and value in the map, kept as they change so that
    /// reading it never walks the map.
    bytes: usize,
}

/// The size of the store and what its subscribers have seen, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Keys in the map, counting expired keys not yet removed.
    pub keys: usize,
    /// The lengths of those keys and their values, in bytes.
    pub bytes: usize,
    /// Subscriptions and the changes published to them.
    pub subscribers: HubStats,
}

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

impl Store {
    /// An empty store at revision 0.
    pub fn new(subscriptions: SubscriptionSettings, history: HistorySettings) -> Self {
        Self::with_clock(subscriptions, history, Clock::System)
    }

    fn with_clock(
        subscriptions: SubscriptionSettings,
        history: HistorySettings,
        clock: Clock,
    ) -> Self {
        let state = State {
            map: Index::default(),
            revision: 0,
            history: History::new(history),
            expiry: BTreeSet::new(),
            epoch: clock.now(),
            bytes: 0,
        };
        Self {
            state: Arc::new(RwLock::new(state)),
            hub: Hub::new(subscriptions.buffer, subscriptions.max),
            wake: Arc::default(),
            clock,
        }
    }

    /// The value of `key` and the revision it was read at. An expired key is absent, even
    /// before its expiry has been processed.
    pub fn get(&self, key: &str) -> (Option<KeyValue>, u64) {
        let state = self.read();
        let now = state.since_epoch(self.clock.now());
        (state.get(key, now), state.revision)
    }

    /// Sets `key` to `value` and returns the revision of the change. Subscribers whose
    /// prefix matches receive it before this returns.
    pub fn set(&self, key: String, value: String, options: SetOptions) -> Result<u64, Conflict> {
        let (mut state, now) = self.write_now();
        state.set(&key, &value, options, now, self.writer())
    }

    /// Deletes `key`, if present (and, when guarded, at the expected `mod_revision`).
    pub fn delete(
        &self,
        key: &str,
        expected_mod_revision: Option<u64>,
    ) -> Result<Deleted, Conflict> {
        let (mut state, now) = self.write_now();
        state.delete(key, expected_mod_revision, now, &self.hub)
    }

    /// Applies `ops` in order under one lock, so no other write interleaves with them; each
    /// is exactly what it would be alone (its own revision and event, and a get reports the
    /// revision it read at). Returns one result per op and the revision after the last.
    ///
    /// The answer is counted before anything is applied ([`answer_bytes`](crate::record::answer_bytes) per result): one
    /// that would pass `max_answer` bytes fails with [`TooLarge`], and the batch changes
    /// nothing.
    pub fn batch(
        &self,
        ops: Vec<Op<'_>>,
        max_answer: usize,
    ) -> Result<(Vec<OpResult>, u64), TooLarge> {
        let mut results = Vec::with_capacity(ops.len());
        if ops.iter().all(|op| matches!(op, Op::Get(_))) {
            let state = self.read();
            let now = state.since_epoch(self.clock.now());
            let mut answer = 0;
            for (i, op) in ops.into_iter().enumerate() {
                if let Op::Get(key) = op {
                    let found = state.get(key, now);
                    answer += answer_bytes(key, found.as_ref().map_or(0, |kv| kv.value.len()));
                    if answer > max_answer {
                        return Err(TooLarge {
                            op: i,
                            max: max_answer,
                        });
                    }
                    results.push(OpResult::Get(found, state.revision));
                }
            }
            return Ok((results, state.revision));
        }
        let (mut state, now) = self.write_now();
        state.check_answer(&ops, now, max_answer)?;
        let at = state.since_epoch(now);
        for op in ops {
            results.push(match op {
                Op::Get(key) => OpResult::Get(state.get(key, at), state.revision),
                Op::Set {
                    key,
                    value,
                    options,
                } => match state.set(key, value, options, now, self.writer()) {
                    Ok(revision) => OpResult::Set(revision),
                    Err(conflict) => OpResult::Conflict(conflict),
                },
                Op::Delete {
                    key,
                    expected_mod_revision,
                } => match state.delete(key, expected_mod_revision, now, &self.hub) {
                    Ok(deleted) => OpResult::Delete(deleted),
                    Err(conflict) => OpResult::Conflict(conflict),
                },
            });
        }
        Ok((results, state.revision))
    }

    /// Up to `limit` keys that start with `prefix`, after `start_after` (exclusive; "" for
    /// the beginning), in lexicographic order. Only the keys under the prefix are visited.
    /// The page ends early, with `more`, before the item that would take its answer past
    /// `max_answer` bytes ([`answer_bytes`](crate::record::answer_bytes) per item); it always holds at least one item.
    pub fn list(&self, prefix: &str, start_after: &str, limit: usize, max_answer: usize) -> Page {
        let state = self.read();
        let now = state.since_epoch(self.clock.now());
        let lower = if !start_after.is_empty() && start_after >= prefix {
            Bound::Excluded(start_after)
        } else {
            Bound::Included(prefix)
        };
        let mut live = state
            .under(prefix, lower)
            .filter(|record| is_live(record, now))
            .peekable();
        let mut items = Vec::new();
        let mut answer = 0;
        while let Some(record) = live.next_if(|record| {
            answer += answer_bytes(record.key(), record.value().len());
            items.is_empty() || answer <= max_answer
        }) {
            items.push(state.to_key_value(record, now));
            if items.len() == limit {
                break;
            }
        }
        Page {
            items,
            more: live.peek().is_some(),
            revision: state.revision,
        }
    }

    /// Subscribes to changes of keys that start with `prefix` ("" matches all), beginning
    /// where `start` says, with no gap and no duplicate between replayed and live changes.
    /// A replay or snapshot is read a page at a time as the subscription is read (see
    /// [`Subscription`]).
    pub fn subscribe(&self, prefix: String, start: Start) -> Result<Subscription, SubscribeError> {
        // The read lock holds off writers, so nothing is published between fixing where the
        // live changes begin and registering the subscriber.
        let state = self.read();
        let (before, live, after) = match start {
            Start::Now => (
                Before::Nothing,
                self.hub.subscribe(prefix, 0, None)?,
                state.revision,
            ),
            Start::Revision(from) => {
                let compacted = state.history.compacted;
                if from <= compacted {
                    return Err(SubscribeError::Compacted {
                        requested: from,
                        oldest: compacted + 1,
                    });
                }
                let replay = Before::Replay {
                    next: from,
                    until: state.revision,
                };
                let live = self.hub.subscribe(prefix, from, None)?;
                (replay, live, from - 1)
            }
            Start::Snapshot => {
                let revision = state.revision;
                let pre_images = Arc::new(PreImages::new(revision));
                let snapshot = Before::Snapshot {
                    pre_images: pre_images.clone(),
                    revision,
                    at: state.since_epoch(self.clock.now()),
                };
                let live = self.hub.subscribe(prefix, 0, Some(pre_images))?;
                // Until the snapshot's end marker arrives, the subscriber knows nothing.
                (snapshot, live, 0)
            }
        };
        drop(state);
        Ok(Subscription::new(live, before, self.state.clone(), after))
    }

    /// The current store revision.
    pub fn revision(&self) -> u64 {
        self.read().revision
    }

    /// The number of open subscriptions.
    pub fn subscriptions(&self) -> usize {
        self.hub.len()
    }

    /// Sizes and subscriber counters, under a short read lock.
    pub fn stats(&self) -> Stats {
        let state = self.read();
        Stats {
            keys: state.map.len(),
            bytes: state.bytes,
            subscribers: self.hub.stats(),
        }
    }

    /// The number of keys stored, counting expired keys not yet removed.
    pub fn len(&self) -> usize {
        self.read().map.len()
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes up to [`EXPIRED_PER_SWEEP`] keys whose TTL has run out, publishing an expiry
    /// for each, and returns the next deadline: one already past means more keys are due.
    /// Reads already hide expired keys; this makes their expiry visible to subscribers and
    /// frees them.
    pub fn expire(&self) -> Option<Instant> {
        let mut state = self.write();
        let now = self.clock.now();
        state.expire_due(now, EXPIRED_PER_SWEEP, &self.hub);
        state.expiry.first().map(|(at, _)| *at)
    }

    /// Runs [`Store::expire`] at each deadline, and moves records into the index's grown hash
    /// table while it grows (as Redis finishes its rehashing in its cron, so that it ends
    /// even when no write comes), until `stop` completes.
    pub async fn expire_until(&self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let next = self.expire();
            let growing = self.write().map.move_records(MOVES_PER_TICK);
            // More keys due, or records to move: go on at the next tick. Not at once: the
            // lock is not fair, and a writer woken as it is released loses it again to a
            // sweep that takes it straight back, and waits for many sweeps.
            let busy = growing || next.is_some_and(|at| at <= self.clock.now());
            let wait = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let tick = async {
                if busy {
                    tokio::time::sleep(TICK).await;
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                () = &mut stop => return,
                () = wait => {}
                () = tick => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// Holds the write lock, as a long write would, until the guard drops.
    #[cfg(test)]
    pub(crate) fn hold_write_lock(&self) -> impl Sized + '_ {
        self.write()
    }

    fn writer(&self) -> Writer<'_> {
        Writer {
            hub: &self.hub,
            wake: &self.wake,
        }
    }

    // A writer that panicked mid-operation leaves the collections valid (their operations
    // are panic-safe), so poisoning is ignored rather than taking the whole server down.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The write lock and the time a write acts at, read under the lock so that writes and
    /// reads take their expiry decisions in the order they take the lock: a read that found
    /// a key expired is never followed by a write that finds it alive. Sweeps a few expired
    /// keys on the way, so writes share the background task's work.
    fn write_now(&self) -> (RwLockWriteGuard<'_, State>, Instant) {
        let mut state = self.write();
        let now = self.clock.now();
        state.expire_due(now, EXPIRED_PER_WRITE, &self.hub);
        (state, now)
    }
}

fn check(expected: Option<u64>, actual: Option<u64>) -> Result<(), Conflict> {
    match expected {
        Some(expected) if expected != actual.unwrap_or(0) => Err(Conflict {
            expected,
            actual: actual.unwrap_or(0),
        }),
        _ => Ok(()),
    }
}

/// What a write needs besides the state: whom to publish to, and whom to wake for a new
/// earliest deadline.
#[derive(Clone, Copy)]
struct Writer<'a> {
    hub: &'a Hub,
    wake: &'a Notify,
}

impl State {
    /// `now` is in nanoseconds after the epoch.
    fn get(&self, key: &str, now: u64) -> Option<KeyValue> {
        self.map
            .get(key.as_bytes())
            .filter(|record| is_live(record, now))
            .map(|record| self.to_key_value(record, now))
    }

    /// The records from `lower` on whose keys start with `prefix`.
    fn under<'a>(
        &'a self,
        prefix: &'a str,
        lower: Bound<&'a str>,
    ) -> impl Iterator<Item = &'a Record> + 'a {
        self.map
            .from(lower.map(str::as_bytes))
            .take_while(move |record| record.key().starts_with(prefix))
    }

    fn to_key_value(&self, record: &Record, now: u64) -> KeyValue {
        let meta = record.meta();
        KeyValue {
            value: Value::of(record),
            create_revision: meta.create_revision,
            mod_revision: meta.mod_revision,
            version: meta.version,
            ttl: (meta.deadline != 0)
                .then(|| Duration::from_nanos(meta.deadline.saturating_sub(now))),
        }
    }

    /// `at` as nanoseconds after the epoch.
    fn since_epoch(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX)
    }

    fn deadline(&self, meta: Meta) -> Option<Instant> {
        (meta.deadline != 0).then(|| self.epoch + Duration::from_nanos(meta.deadline))
    }

    fn set(
        &mut self,
        key: &str,
        value: &str,
        options: SetOptions,
        now: Instant,
        writer: Writer<'_>,
    ) -> Result<u64, Conflict> {
        let current = self.current(key, now, writer.hub);
        check(
            options.expected_mod_revision,
            current.map(|meta| meta.mod_revision),
        )?;

        let revision = self.revision + 1;
        let expires_at = options.ttl.map(|ttl| now + ttl);
        let (create_revision, version) = match current {
            Some(meta) => (meta.create_revision, meta.version + 1),
            None => (revision, 1),
        };
        if let Some(at) = current.and_then(|meta| self.deadline(meta)) {
            self.expiry.remove(&(at, Key::from(key)));
        }
        let record = Record::new(
            key,
            value,
            Meta {
                create_revision,
                mod_revision: revision,
                version,
                // At least 1: 0 means no deadline.
                deadline: expires_at.map_or(0, |at| self.since_epoch(at).max(1)),
            },
        );
        if let Some(at) = expires_at {
            // The index holds the instant the record's deadline stands for, so that removing
            // it later finds exactly this entry.
            let at = self.deadline(record.meta()).unwrap_or(at);
            if self.expiry.first().is_none_or(|(first, _)| at < *first) {
                writer.wake.notify_one();
            }
            self.expiry.insert((at, Key::from(key)));
        }
        self.bytes += record.size();
        let growing = self.map.is_growing();
        let old = self.map.replace(record.clone());
        if let Some(old) = &old {
            self.bytes -= old.size();
        }
        if !growing && self.map.is_growing() {
            writer.wake.notify_one();
        }
        self.apply(
            Change {
                kind: ChangeKind::Set,
                record,
                timestamp_ms: now_ms(),
            },
            old.as_ref(),
            writer.hub,
        );
        Ok(revision)
    }

    fn delete(
        &mut self,
        key: &str,
        expected: Option<u64>,
        now: Instant,
        hub: &Hub,
    ) -> Result<Deleted, Conflict> {
        let current = self.current(key, now, hub).map(|meta| meta.mod_revision);
        check(expected, current)?;
        let Some(record) = self.map.take(key.as_bytes()) else {
            return Ok(Deleted {
                prev_mod_revision: None,
                revision: self.revision,
            });
        };
        let revision = self.remove(&record, ChangeKind::Delete, hub);
        Ok(Deleted {
            prev_mod_revision: current,
            revision,
        })
    }

    /// Records a change: the new revision, the history, and the subscribers.
    fn apply(&mut self, change: Change, old: Option<&Record>, hub: &Hub) {
        self.revision = change.revision();
        hub.publish(&change, old);
        self.history.push(change);
    }

    fn remove(&mut self, record: &Record, kind: ChangeKind, hub: &Hub) -> u64 {
        self.bytes -= record.size();
        if let Some(at) = self.deadline(record.meta()) {
            self.expiry.remove(&(at, Key::from(record.key())));
        }
        let revision = self.revision + 1;
        let removal = Change::removal(kind, record.key(), revision, now_ms());
        self.apply(removal, Some(record), hub);
        revision
    }

    /// The metadata of `key`'s record, if it has one that has not expired at `now`. An
    /// expired one not yet swept is expired first, with its own revision, so a write never
    /// guards against or revives an expired key.
    fn current(&mut self, key: &str, now: Instant, hub: &Hub) -> Option<Meta> {
        let meta = self.map.get(key.as_bytes()).map(Record::meta)?;
        if self.deadline(meta).is_some_and(|at| at <= now) {
            if let Some(record) = self.map.take(key.as_bytes()) {
                self.remove(&record, ChangeKind::Expire, hub);
            }
            return None;
        }
        Some(meta)
    }

    /// Expires up to `budget` keys whose deadline has passed, earliest first, each with its
    /// own revision.
    fn expire_due(&mut self, now: Instant, budget: usize, hub: &Hub) {
        for _ in 0..budget {
            match self.expiry.first() {
                Some((at, _)) if *at <= now => {}
                _ => break,
            }
            let Some((_, key)) = self.expiry.pop_first() else {
                break;
            };
            if let Some(record) = self.map.take(key.as_bytes()) {
                self.remove(&record, ChangeKind::Expire, hub);
            }
        }
    }

    /// Counts the answer of a batch that writes as applying it would make it, changing
    /// nothing: each guard is checked against the key as the batch's earlier ops leave it.
    fn check_answer(&self, ops: &[Op<'_>], now: Instant, max: usize) -> Result<(), TooLarge> {
        let at = self.since_epoch(now);
        // A key as the batch's earlier ops left it: its mod_revision and value length.
        let mut written: HashMap<&str, Option<(u64, usize)>> = HashMap::new();
        let mut revision = self.revision;
        let mut answer = 0;
        for (i, op) in ops.iter().enumerate() {
            let key = op.key();
            let current = match written.get(key) {
                Some(entry) => *entry,
                None => match self.map.get(key.as_bytes()) {
                    Some(record) if is_live(record, at) => {
                        Some((record.meta().mod_revision, record.value().len()))
                    }
                    // A write expires it first, which takes a revision.
                    Some(_) if !matches!(op, Op::Get(_)) => {
                        revision += 1;
                        written.insert(key, None);
                        None
                    }
                    _ => None,
                },
            };
            let mod_revision = current.map(|(revision, _)| revision);
            answer += match *op {
                Op::Get(_) => answer_bytes(key, current.map_or(0, |(_, len)| len)),
                Op::Set { value, options, .. } => {
                    if check(options.expected_mod_revision, mod_revision).is_ok() {
                        revision += 1;
                        written.insert(key, Some((revision, value.len())));
                        ANSWER_OVERHEAD
                    } else {
                        2 * ANSWER_OVERHEAD
                    }
                }
                Op::Delete {
                    expected_mod_revision,
                    ..
                } => {
                    if check(expected_mod_revision, mod_revision).is_err() {
                        2 * ANSWER_OVERHEAD
                    } else {
                        if current.is_some() {
                            revision += 1;
                            written.insert(key, None);
                        }
                        ANSWER_OVERHEAD
                    }
                }
            };
            if answer > max {
                return Err(TooLarge { op: i, max });
            }
        }
        Ok(())
    }
}

/// Whether `record` has not expired at `now` (nanoseconds after the epoch).
fn is_live(record: &Record, now: u64) -> bool {
    let deadline = record.meta().deadline;
    deadline == 0 || deadline > now
}

/// The most recent changes, one per revision with no gaps, bounded by count and bytes.
struct History {
    changes: VecDeque<Change>,
    bytes: usize,
    limits: HistorySettings,
    /// The newest revision that has been dropped; 0 while nothing has been.
    compacted: u64,
}

impl History {
    fn new(limits: HistorySettings) -> Self {
        Self {
            changes: VecDeque::new(),
            bytes: 0,
            limits,
            compacted: 0,
        }
    }

    fn push(&mut self, change: Change) {
        self.bytes += change.weight();
        self.changes.push_back(change);
        while self.changes.len() > self.limits.max_events || self.bytes > self.limits.max_bytes {
            let Some(oldest) = self.changes.pop_front() else {
                break;
            };
            self.bytes -= oldest.weight();
            self.compacted = oldest.revision();
        }
    }
}

/// Where "now" comes from: the system's monotonic clock, or a hand-driven one in tests.
#[derive(Clone)]
enum Clock {
    System,
    #[cfg(test)]
    Manual(Arc<tests::ManualClock>),
}

impl Clock {
    fn now(&self) -> Instant {
        match self {
            Self::System => Instant::now(),
            #[cfg(test)]
            Self::Manual(clock) => clock.read(),
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::mpsc as std_mpsc;

    use crate::pubsub::Event;

    use super::*;
    use proptest::prelude::*;

    fn settings(buffer: usize, history: usize) -> (SubscriptionSettings, HistorySettings) {
        (
            SubscriptionSettings { buffer, max: 100 },
            HistorySettings {
                max_events: history,
                max_bytes: usize::MAX,
            },
        )
    }

    /// A clock the test drives, which can also hold the next thread that reads it.
    pub(super) struct ManualClock {
        now: std::sync::Mutex<Instant>,
        /// Taken by the next reader: it says it has read the time, then waits to go on.
        hold: std::sync::Mutex<Option<(std_mpsc::Sender<()>, std_mpsc::Receiver<()>)>>,
    }

    impl Default for ManualClock {
        fn default() -> Self {
            Self {
                now: std::sync::Mutex::new(Instant::now()),
                hold: std::sync::Mutex::default(),
            }
        }
    }

    impl ManualClock {
        pub(super) fn read(&self) -> Instant {
            let now = *self.now.lock().unwrap();
            let hold = self.hold.lock().unwrap().take();
            if let Some((read, go_on)) = hold {
                read.send(()).unwrap();
                go_on.recv().unwrap();
            }
            now
        }

        fn advance(&self, by: Duration) {
            *self.now.lock().unwrap() += by;
        }

        fn set(&self, at: Instant) {
            *self.now.lock().unwrap() = at;
        }

        /// Holds the next reader once it has read the time: returns when it has, and the
        /// sender that lets it go on.
        fn hold_next_reader(&self) -> (std_mpsc::Receiver<()>, std_mpsc::Sender<()>) {
            let (read_tx, read_rx) = std_mpsc::channel();
            let (go_tx, go_rx) = std_mpsc::channel();
            *self.hold.lock().unwrap() = Some((read_tx, go_rx));
            (read_rx, go_tx)
        }
    }

    /// A store on a hand-driven clock, and the clock's hand.
    fn manual_store(history: usize) -> (Store, Arc<ManualClock>) {
        let now = Arc::new(ManualClock::default());
        let (subs, hist) = settings(1 << 20, history);
        (
            Store::with_clock(subs, hist, Clock::Manual(now.clone())),
            now,
        )
    }

    /// Records whether it was woken.
    struct Woken(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Everything the subscription has ready, without waiting: polled again while it wakes
    /// itself, as it does between pages that sent nothing.
    fn drain(sub: &mut Subscription) -> Vec<Event> {
        let woken = Arc::new(Woken(false.into()));
        let waker = std::task::Waker::from(woken.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let mut events = Vec::new();
        for _ in 0..1_000_000 {
            woken.0.store(false, std::sync::atomic::Ordering::Relaxed);
            match std::pin::pin!(sub.recv()).poll(&mut cx) {
                std::task::Poll::Ready(Some(Ok(event))) => events.push(event),
                std::task::Poll::Pending if woken.0.load(std::sync::atomic::Ordering::Relaxed) => {}
                _ => return events,
            }
        }
        panic!("the subscription never ran dry")
    }

    /// The next event or end, without waiting.
    fn pollster_next(sub: &mut Subscription) -> Option<Result<Event, Ended>> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::pin!(sub.recv()).poll(&mut cx) {
            std::task::Poll::Ready(next) => next,
            std::task::Poll::Pending => panic!("nothing ready"),
        }
    }

    fn changes(events: Vec<Event>) -> Vec<Change> {
        events
            .into_iter()
            .map(|e| match e {
                Event::Change(c) => c,
                other => panic!("expected a change, got {other:?}"),
            })
            .collect()
    }

    /// The write that starts the index's hash table growing wakes the background task, which
    /// then finishes the move with no further write.
    #[tokio::test(start_paused = true)]
    async fn the_background_task_finishes_growing_the_index() {
        let (subs, hist) = settings(16, 16);
        let store = Store::new(subs, hist);
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn({
            let (store, stop) = (store.clone(), stop.clone());
            async move { store.expire_until(stop.cancelled_owned()).await }
        });
        // Parked: no deadline, nothing growing.
        tokio::task::yield_now().await;
        let mut keys = 0;
        while keys < 1000 || !store.read().map.is_growing() {
            assert!(keys < 100_000, "the index never began to grow");
            store
                .set(format!("k{keys}"), "v".into(), SetOptions::default())
                .unwrap();
            keys += 1;
        }
        for tick in 0.. {
            if !store.read().map.is_growing() {
                break;
            }
            assert!(tick < 100, "still growing after {tick} ticks");
            tokio::time::sleep(TICK).await;
        }
        for key in 0..keys {
            assert!(store.get(&format!("k{key}")).0.is_some(), "k{key}");
        }
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn key_values_differ_by_key_alone() {
        let meta = Meta {
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            ..Meta::default()
        };
        let read = |key| KeyValue {
            value: Value::of(&Record::new(key, "v", meta)),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            ttl: None,
        };
        assert_eq!(read("a"), read("a"));
        assert_ne!(read("a"), read("b"));
        assert!(format!("{:?}", read("b")).contains(r#"key: "b""#));
    }

    #[test]
    fn revisions_follow_etcds_model() {
        let (store, _) = manual_store(100);
        assert_eq!(
            store.set("a".into(), "1".into(), SetOptions::default()),
            Ok(1)
        );
        assert_eq!(
            store.set("b".into(), "1".into(), SetOptions::default()),
            Ok(2)
        );
        assert_eq!(
            store.set("a".into(), "2".into(), SetOptions::default()),
            Ok(3)
        );
        let (a, revision) = store.get("a");
        let a = a.unwrap();
        assert_eq!(
            (a.create_revision, a.mod_revision, a.version, revision),
            (1, 3, 2, 3)
        );
        let deleted = store.delete("a", None).unwrap();
        assert_eq!(
            deleted,
            Deleted {
                prev_mod_revision: Some(3),
                revision: 4
            }
        );
        assert_eq!(
            store.delete("a", None).unwrap(),
            Deleted {
                prev_mod_revision: None,
                revision: 4
            }
        );
        assert_eq!(
            store.set("a".into(), "3".into(), SetOptions::default()),
            Ok(5)
        );
        let a = store.get("a").0.unwrap();
        assert_eq!(
            (a.create_revision, a.version),
            (5, 1),
            "a new key after a delete"
        );
    }

    #[test]
    fn guarded_writes_change_nothing_on_a_mismatch() {
        let (store, _) = manual_store(100);
        let absent = SetOptions {
            expected_mod_revision: Some(0),
            ttl: None,
        };
        assert_eq!(store.set("k".into(), "1".into(), absent), Ok(1));
        assert_eq!(
            store.set("k".into(), "2".into(), absent),
            Err(Conflict {
                expected: 0,
                actual: 1
            })
        );
        let at = |r| SetOptions {
            expected_mod_revision: Some(r),
            ttl: None,
        };
        assert_eq!(
            store.set("k".into(), "2".into(), at(7)),
            Err(Conflict {
                expected: 7,
                actual: 1
            })
        );
        assert_eq!(store.set("k".into(), "2".into(), at(1)), Ok(2));
        assert_eq!(
            store.delete("k", Some(1)),
            Err(Conflict {
                expected: 1,
                actual: 2
            })
        );
        assert_eq!(
            store.delete("nope", Some(3)),
            Err(Conflict {
                expected: 3,
                actual: 0
            })
        );
        assert_eq!(store.get("k").0.unwrap().value.to_string(), "2");
        assert_eq!(store.revision(), 2);
    }

    #[test]
    fn a_batch_applies_each_op_as_if_alone_and_only_a_failed_guard_fails() {
        let (store, _) = manual_store(100);
        let mut sub = store.subscribe(String::new(), Start::Now).unwrap();
        let set = |key: &'static str, expected: Option<u64>| Op::Set {
            key,
            value: key,
            options: SetOptions {
                expected_mod_revision: expected,
                ttl: None,
            },
        };
        let (results, revision) = store
            .batch(
                vec![
                    set("a", None),
                    set("b", Some(0)),
                    set("a", Some(5)),
                    Op::Get("a"),
                    Op::Delete {
                        key: "b",
                        expected_mod_revision: Some(2),
                    },
                    Op::Get("b"),
                ],
                usize::MAX,
            )
            .unwrap();
        assert_eq!(revision, 3);
        assert_eq!(results[0], OpResult::Set(1));
        assert_eq!(results[1], OpResult::Set(2));
        assert_eq!(
            results[2],
            OpResult::Conflict(Conflict {
                expected: 5,
                actual: 1
            })
        );
        // Each get reports the revision it read at, not the batch's last.
        assert!(matches!(&results[3], OpResult::Get(Some(kv), 2) if kv.mod_revision == 1));
        assert_eq!(
            results[4],
            OpResult::Delete(Deleted {
                prev_mod_revision: Some(2),
                revision: 3
            })
        );
        assert_eq!(results[5], OpResult::Get(None, 3));
        let revisions: Vec<u64> = changes(drain(&mut sub))
            .iter()
            .map(|c| c.revision())
            .collect();
        assert_eq!(revisions, [1, 2, 3]);
        let (reads, revision) = store
            .batch(vec![Op::Get("a"), Op::Get("zz")], usize::MAX)
            .unwrap();
        assert_eq!((reads.len(), revision), (2, 3));
    }

    #[test]
    fn an_expired_key_is_gone_before_any_sweep_and_its_expiry_is_published() {
        let (store, now) = manual_store(100);
        let mut sub = store.subscribe(String::new(), Start::Now).unwrap();
        let ttl = SetOptions {
            expected_mod_revision: None,
            ttl: Some(Duration::from_secs(10)),
        };
        store.set("t".into(), "v".into(), ttl).unwrap();
        assert_eq!(store.get("t").0.unwrap().ttl, Some(Duration::from_secs(10)));
        now.advance(Duration::from_secs(10));
        assert_eq!(store.get("t").0, None);
        assert!(store.list("", "", 10, usize::MAX).items.is_empty());
        assert_eq!(store.len(), 1, "not swept yet");
        assert_eq!(store.expire(), None);
        assert_eq!(store.len(), 0);
        let events = changes(drain(&mut sub));
        assert_eq!(events.len(), 2);
        assert_eq!(
            (events[1].kind, events[1].revision()),
            (ChangeKind::Expire, 2)
        );
    }

    /// A write that read the clock before a read, but took the lock after it, must not act
    /// on its earlier time: the read reported the key expired, so the write must not find
    /// it alive (a guard on its old revision succeeding would contradict the read).
    #[test]
    fn a_write_never_acts_on_a_time_before_a_read_that_saw_the_key_expire() {
        let (store, clock) = manual_store(100);
        let ttl = SetOptions {
            expected_mod_revision: None,
            ttl: Some(Duration::from_millis(10)),
        };
        assert_eq!(store.set("k".into(), "v1".into(), ttl), Ok(1));
        let (read_the_clock, go_on) = clock.hold_next_reader();
        let writer = std::thread::spawn({
            let store = store.clone();
            move || {
                let guarded = SetOptions {
                    expected_mod_revision: Some(1),
                    ttl: None,
                };
                store.set("k".into(), "v2".into(), guarded)
            }
        });
        read_the_clock.recv().unwrap();
        clock.advance(Duration::from_millis(20));
        let (read_tx, read_rx) = std_mpsc::channel();
        let reader = std::thread::spawn({
            let store = store.clone();
            move || read_tx.send(store.get("k")).unwrap()
        });
        // Before the fix the read finished here, while the writer waited with its old time;
        // now the writer holds the lock, and the read must wait for it.
        let early = read_rx.recv_timeout(Duration::from_millis(200)).ok();
        go_on.send(()).unwrap();
        let written = writer.join().unwrap();
        let (found, revision) = early.unwrap_or_else(|| read_rx.recv().unwrap());
        reader.join().unwrap();
        match written {
            // The write came first, at a time the key still lived: the read sees it.
            Ok(2) => assert_eq!(
                (found.map(|kv| kv.value.to_string()), revision),
                (Some("v2".into()), 2)
            ),
            other => assert!(
                other.is_err() && found.is_none(),
                "the read saw {found:?} at {revision}, the guarded write got {other:?}"
            ),
        }
    }

    #[test]
    fn a_batch_whose_answer_would_pass_its_limit_applies_nothing() {
        let (store, _) = manual_store(100);
        let mut sub = store.subscribe(String::new(), Start::Now).unwrap();
        let big = "x".repeat(1000);
        store
            .set("big".into(), big.clone(), SetOptions::default())
            .unwrap();
        let set = |key, value| Op::Set {
            key,
            value,
            options: SetOptions::default(),
        };
        let max = 3 * answer_bytes("big", 1000);
        // Three reads fit; the fourth, of a key the batch itself enlarged, does not.
        let ops = vec![
            set("small", "s"),
            Op::Get("big"),
            Op::Get("big"),
            set("small", &big),
            Op::Get("small"),
        ];
        assert_eq!(
            store.batch(ops.clone(), max),
            Err(TooLarge { op: 4, max }),
            "counted as applying it would make it"
        );
        assert_eq!(store.revision(), 1, "nothing applied");
        assert_eq!(store.get("small").0, None);
        assert_eq!(changes(drain(&mut sub)).len(), 1);
        let reads = vec![Op::Get("big"); 4];
        assert_eq!(
            store.batch(reads.clone(), max),
            Err(TooLarge { op: 3, max }),
            "three answers of the big key fit exactly; the fourth passes the limit"
        );
        assert!(store.batch(ops, usize::MAX).is_ok());
        assert_eq!(store.revision(), 3);
    }

    #[test]
    fn a_list_page_ends_before_the_item_that_would_pass_its_byte_limit() {
        let (store, _) = manual_store(100);
        for key in ["a", "b", "c"] {
            store
                .set(key.into(), "v".repeat(100), SetOptions::default())
                .unwrap();
        }
        let item = answer_bytes("a", 100);
        let keys = |page: &Page| {
            page.items
                .iter()
                .map(|kv| kv.key().to_string())
                .collect::<Vec<_>>()
        };
        let page = store.list("", "", 10, 2 * item);
        assert_eq!(
            (keys(&page), page.more),
            (vec!["a".into(), "b".into()], true)
        );
        let page = store.list("", "b", 10, 2 * item);
        assert_eq!((keys(&page), page.more), (vec!["c".into()], false));
        let page = store.list("", "", 10, 1);
        assert_eq!(
            (keys(&page), page.more),
            (vec!["a".into()], true),
            "a page always holds one item"
        );
    }

    #[test]
    fn a_mass_expiry_is_swept_a_bounded_number_of_keys_at_a_time_in_revision_order() {
        let (store, clock) = manual_store(100_000);
        let ttl = SetOptions {
            expected_mod_revision: None,
            ttl: Some(Duration::from_secs(1)),
        };
        let keys = 3 * EXPIRED_PER_SWEEP + 10;
        for i in 0..keys {
            store.set(format!("k{i:05}"), "v".into(), ttl).unwrap();
        }
        let mut sub = store.subscribe(String::new(), Start::Now).unwrap();
        clock.advance(Duration::from_secs(1));
        assert!(store.list("", "", usize::MAX, usize::MAX).items.is_empty());
        for left in [keys - EXPIRED_PER_SWEEP, keys - 2 * EXPIRED_PER_SWEEP, 10] {
            let next = store.expire();
            assert!(next.is_some_and(|at| at <= clock.read()), "more are due");
            assert_eq!(store.len(), left, "{EXPIRED_PER_SWEEP} keys a sweep");
        }
        // A write sweeps a few on its way, then expires its own key first if it is due.
        let swept = keys as u64 + 3 * EXPIRED_PER_SWEEP as u64 + EXPIRED_PER_WRITE as u64;
        assert_eq!(
            store.set("k00777".into(), "w".into(), SetOptions::default()),
            Ok(swept + 2)
        );
        assert_eq!(store.len(), 10 - EXPIRED_PER_WRITE);
        let events = changes(drain(&mut sub));
        let revisions: Vec<u64> = events.iter().map(Change::revision).collect();
        assert_eq!(
            revisions,
            ((keys as u64 + 1)..=store.revision()).collect::<Vec<_>>()
        );
        assert!(
            events[..events.len() - 1]
                .iter()
                .all(|c| c.kind == ChangeKind::Expire)
        );
    }

    #[test]
    fn setting_a_key_again_replaces_its_ttl() {
        let (store, now) = manual_store(100);
        let ttl = SetOptions {
            expected_mod_revision: None,
            ttl: Some(Duration::from_secs(1)),
        };
        store.set("t".into(), "v".into(), ttl).unwrap();
        store
            .set("t".into(), "w".into(), SetOptions::default())
            .unwrap();
        now.advance(Duration::from_secs(5));
        assert_eq!(store.expire(), None);
        assert_eq!(store.get("t").0.unwrap().value.to_string(), "w");
    }

    #[test]
    fn listing_visits_only_the_prefix_and_pages_in_order() {
        let (store, _) = manual_store(0);
        for key in ["a", "b/1", "b/2", "b/3", "c"] {
            store
                .set(key.into(), key.into(), SetOptions::default())
                .unwrap();
        }
        let keys = |page: &Page| {
            page.items
                .iter()
                .map(|kv| kv.key().to_string())
                .collect::<Vec<_>>()
        };
        let first = store.list("b/", "", 2, usize::MAX);
        assert_eq!(
            (keys(&first), first.more, first.revision),
            (vec!["b/1".into(), "b/2".into()], true, 5)
        );
        let second = store.list("b/", "b/2", 2, usize::MAX);
        assert_eq!(
            (keys(&second), second.more),
            (vec!["b/3".to_string()], false)
        );
        assert_eq!(keys(&store.list("", "b/3", 10, usize::MAX)), ["c"]);
        assert!(
            store.list("b/1", "b/1", 10, usize::MAX).items.is_empty(),
            "start_after equal to the prefix"
        );
        assert!(store.list("z", "", 10, usize::MAX).items.is_empty());
    }

    #[test]
    fn resuming_replays_retained_history_and_refuses_compacted_revisions() {
        let (store, _) = manual_store(3);
        for i in 1..=5 {
            store
                .set(format!("k{}", i % 2), i.to_string(), SetOptions::default())
                .unwrap();
        }
        // Revisions 3, 4 and 5 are retained.
        assert_eq!(
            store.subscribe(String::new(), Start::Revision(2)).err(),
            Some(SubscribeError::Compacted {
                requested: 2,
                oldest: 3
            })
        );
        let mut sub = store.subscribe("k1".into(), Start::Revision(3)).unwrap();
        let mut overtaken = store.subscribe("k".into(), Start::Revision(3)).unwrap();
        let revisions = |sub: &mut Subscription| -> Vec<u64> {
            changes(drain(sub)).iter().map(|c| c.revision()).collect()
        };
        assert_eq!(revisions(&mut sub), [3, 5]);
        store
            .set("k1".into(), "6".into(), SetOptions::default())
            .unwrap();
        assert_eq!(revisions(&mut sub), [6]);
        // A replay is read as the subscriber reads it: one whose next change was dropped
        // from the history before it got there ends saying so.
        assert_eq!(
            pollster_next(&mut overtaken),
            Some(Err(Ended::Compacted {
                requested: 3,
                oldest: 4
            }))
        );
        let mut future = store.subscribe(String::new(), Start::Revision(8)).unwrap();
        store
            .set("a".into(), "7".into(), SetOptions::default())
            .unwrap();
        store
            .set("a".into(), "8".into(), SetOptions::default())
            .unwrap();
        let revisions: Vec<u64> = changes(drain(&mut future))
            .iter()
            .map(|c| c.revision())
            .collect();
        assert_eq!(revisions, [8]);
    }

    #[test]
    fn a_snapshot_lists_current_values_in_revision_order_then_marks_its_revision() {
        let (store, _) = manual_store(0);
        store
            .set("p/b".into(), "1".into(), SetOptions::default())
            .unwrap();
        store
            .set("p/a".into(), "2".into(), SetOptions::default())
            .unwrap();
        store
            .set("q".into(), "3".into(), SetOptions::default())
            .unwrap();
        store
            .set("p/b".into(), "4".into(), SetOptions::default())
            .unwrap();
        let mut sub = store.subscribe("p/".into(), Start::Snapshot).unwrap();
        store
            .set("p/c".into(), "5".into(), SetOptions::default())
            .unwrap();
        let events = drain(&mut sub);
        let summary: Vec<String> = events
            .iter()
            .map(|e| match e {
                Event::Initial(c) => format!("initial {}={}@{}", c.key(), c.value(), c.revision()),
                Event::SnapshotEnd(r) => format!("end@{r}"),
                Event::Change(c) => format!("live {}={}@{}", c.key(), c.value(), c.revision()),
            })
            .collect();
        assert_eq!(
            summary,
            [
                "initial p/a=2@2",
                "initial p/b=4@4",
                "end@4",
                "live p/c=5@5"
            ]
        );
    }

    /// A small seeded generator, so that a failing interleaving can be run again.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// Snapshots read a page at a time while keys ahead of and behind the cursor are set,
    /// deleted, created and expired: each is exactly the state at its revision, in key
    /// order, and the live changes follow it with no gap or duplicate.
    #[test]
    fn a_snapshot_read_in_pages_is_the_state_at_its_revision_whatever_changes_meanwhile() {
        for seed in 1..=8u64 {
            let (store, clock) = manual_store(1 << 20);
            let mut rng = Lcg(seed);
            let key = |i: u64| format!("p/{i:04}");
            let keys = 3 * subscription::PAGE as u64 + 17;
            for i in 0..keys {
                let ttl = (i % 7 == 0).then(|| Duration::from_millis(1 + rng.below(50)));
                let options = SetOptions {
                    expected_mod_revision: None,
                    ttl,
                };
                store.set(key(i), format!("v{i}"), options).unwrap();
            }
            store
                .set("q".into(), "outside".into(), SetOptions::default())
                .unwrap();
            clock.advance(Duration::from_millis(10));
            let expected = store.list("p/", "", usize::MAX, usize::MAX);
            let mut snapshot = store.subscribe("p/".into(), Start::Snapshot).unwrap();
            let mut everything = store.subscribe(String::new(), Start::Now).unwrap();
            let mut events = Vec::new();
            for _ in 0..100_000 {
                match pollster_next(&mut snapshot) {
                    Some(Ok(Event::SnapshotEnd(revision))) => {
                        events.push(Event::SnapshotEnd(revision));
                        break;
                    }
                    Some(Ok(event)) => events.push(event),
                    other => panic!("seed {seed}: {other:?}"),
                }
                for _ in 0..rng.below(3) {
                    let i = rng.below(keys + 20);
                    match rng.below(4) {
                        0 => assert!(store.delete(&key(i), None).is_ok()),
                        1 => clock.advance(Duration::from_millis(rng.below(5))),
                        _ => {
                            store
                                .set(key(i), format!("w{i}"), SetOptions::default())
                                .unwrap();
                        }
                    }
                }
            }
            let initial: Vec<(String, String, u64)> = events
                .iter()
                .filter_map(|e| match e {
                    Event::Initial(c) => Some((c.key().into(), c.value().into(), c.revision())),
                    _ => None,
                })
                .collect();
            let at_revision: Vec<(String, String, u64)> = expected
                .items
                .iter()
                .map(|kv| (kv.key().into(), kv.value.to_string(), kv.mod_revision))
                .collect();
            assert_eq!(initial, at_revision, "seed {seed}");
            assert_eq!(events.last(), Some(&Event::SnapshotEnd(expected.revision)));
            // Then every change under the prefix after the revision, once, in order.
            let live: Vec<u64> = changes(drain(&mut snapshot))
                .iter()
                .map(Change::revision)
                .collect();
            let all: Vec<u64> = changes(drain(&mut everything))
                .iter()
                .filter(|c| c.key().starts_with("p/"))
                .map(Change::revision)
                .collect();
            assert_eq!(live, all, "seed {seed}");
        }
    }

    /// A snapshot that is never read holds no copy of the prefix: what it keeps for keys
    /// that change ahead of it grows only with its queue, and ends when the queue is full.
    #[test]
    fn an_unread_snapshot_keeps_at_most_its_queue_and_then_lags() {
        let (subs, hist) = settings(8, 1000);
        let store = Store::new(subs, hist);
        for i in 0..1000 {
            store
                .set(format!("k{i:04}"), "v".into(), SetOptions::default())
                .unwrap();
        }
        let mut snapshot = store.subscribe(String::new(), Start::Snapshot).unwrap();
        for i in 0..20 {
            store
                .set(format!("k{i:04}"), "w".into(), SetOptions::default())
                .unwrap();
        }
        assert_eq!(snapshot.page.len(), 0, "nothing read yet");
        let Before::Snapshot { pre_images, .. } = &snapshot.before else {
            panic!("a snapshot")
        };
        assert_eq!(pre_images.lock().before.len(), 8, "one per queued change");
        assert!(matches!(
            pollster_next(&mut snapshot),
            Some(Err(Ended::Lagged(_)))
        ));
    }

    /// One step of the model-based test.
    #[derive(Debug, Clone)]
    enum Step {
        Set {
            key: &'static str,
            value: u8,
            guard: Option<u64>,
            ttl: Option<u64>,
        },
        Delete {
            key: &'static str,
            guard: Option<u64>,
        },
        Get {
            key: &'static str,
        },
        List {
            prefix: &'static str,
            start_after: &'static str,
            limit: usize,
        },
        Advance {
            seconds: u64,
        },
        Expire,
    }

    const KEYS: [&str; 5] = ["a", "ab", "b", "ba", "c"];

    fn step() -> impl Strategy<Value = Step> {
        let key = proptest::sample::select(&KEYS[..]);
        let guard = proptest::option::weighted(0.3, 0..8u64);
        prop_oneof![
            4 => (key.clone(), any::<u8>(), guard.clone(), proptest::option::weighted(0.3, 1..4u64))
                .prop_map(|(key, value, guard, ttl)| Step::Set { key, value, guard, ttl }),
            2 => (key.clone(), guard).prop_map(|(key, guard)| Step::Delete { key, guard }),
            2 => key.prop_map(|key| Step::Get { key }),
            2 => (
                proptest::sample::select(&["", "a", "b", "c", "x"][..]),
                proptest::sample::select(&["", "a", "ab", "b"][..]),
                1..4usize,
            )
                .prop_map(|(prefix, start_after, limit)| Step::List { prefix, start_after, limit }),
            1 => (1..3u64).prop_map(|seconds| Step::Advance { seconds }),
            1 => Just(Step::Expire),
        ]
    }

    #[derive(Debug, Clone, PartialEq)]
    struct ModelEntry {
        value: String,
        create: u64,
        modified: u64,
        version: u64,
        deadline: Option<u64>,
    }

    /// The specification: a BTreeMap, a revision counter and the list of changes.
    #[derive(Default)]
    struct Model {
        map: BTreeMap<String, ModelEntry>,
        revision: u64,
        now: u64,
        log: Vec<(ChangeKind, String, String, u64)>,
    }

    impl Model {
        fn expire(&mut self) {
            let mut due: Vec<(u64, String)> = self
                .map
                .iter()
                .filter_map(|(k, e)| {
                    e.deadline
                        .filter(|d| *d <= self.now)
                        .map(|d| (d, k.clone()))
                })
                .collect();
            due.sort();
            for (_, key) in due {
                self.map.remove(&key);
                self.revision += 1;
                self.log
                    .push((ChangeKind::Expire, key, String::new(), self.revision));
            }
        }

        fn live(&self) -> impl Iterator<Item = (&String, &ModelEntry)> {
            self.map
                .iter()
                .filter(|(_, e)| e.deadline.is_none_or(|d| d > self.now))
        }
    }

    fn check_kv(kv: &KeyValue, key: &str, entry: &ModelEntry, now: u64) {
        assert_eq!(kv.key(), key);
        assert_eq!(&*kv.value, entry.value);
        assert_eq!(
            (kv.create_revision, kv.mod_revision, kv.version),
            (entry.create, entry.modified, entry.version)
        );
        assert_eq!(kv.ttl, entry.deadline.map(|d| Duration::from_secs(d - now)));
    }

    proptest! {
        // Failures are shrunk and printed; regressions become unit tests, not seed files.
        // 256 cases by default; PROPTEST_CASES=N runs more.
        #![proptest_config(ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn the_store_behaves_like_a_sorted_map_with_revisions(ops in proptest::collection::vec(step(), 1..60)) {
            let (store, clock) = manual_store(1000);
            let start = clock.read();
            let mut everything = store.subscribe(String::new(), Start::Now).unwrap();
            let mut model = Model::default();
            for op in ops {
                match op {
                    Step::Set { key, value, guard, ttl } => {
                        model.expire();
                        let options = SetOptions { expected_mod_revision: guard, ttl: ttl.map(Duration::from_secs) };
                        let got = store.set(key.into(), value.to_string(), options);
                        let current = model.map.get(key).map_or(0, |e| e.modified);
                        match guard {
                            Some(g) if g != current => prop_assert_eq!(got, Err(Conflict { expected: g, actual: current })),
                            _ => {
                                model.revision += 1;
                                let previous = model.map.get(key).cloned();
                                let entry = ModelEntry {
                                    value: value.to_string(),
                                    create: previous.as_ref().map_or(model.revision, |p| p.create),
                                    modified: model.revision,
                                    version: previous.map_or(1, |p| p.version + 1),
                                    deadline: ttl.map(|t| model.now + t),
                                };
                                model.map.insert(key.into(), entry);
                                model.log.push((ChangeKind::Set, key.into(), value.to_string(), model.revision));
                                prop_assert_eq!(got, Ok(model.revision));
                            }
                        }
                    }
                    Step::Delete { key, guard } => {
                        model.expire();
                        let got = store.delete(key, guard);
                        let current = model.map.get(key).map(|e| e.modified);
                        match guard {
                            Some(g) if g != current.unwrap_or(0) => {
                                prop_assert_eq!(got, Err(Conflict { expected: g, actual: current.unwrap_or(0) }));
                            }
                            _ if current.is_none() => {
                                prop_assert_eq!(got, Ok(Deleted { prev_mod_revision: None, revision: model.revision }));
                            }
                            _ => {
                                model.map.remove(key);
                                model.revision += 1;
                                model.log.push((ChangeKind::Delete, key.into(), String::new(), model.revision));
                                prop_assert_eq!(got, Ok(Deleted { prev_mod_revision: current, revision: model.revision }));
                            }
                        }
                    }
                    Step::Get { key } => {
                        let (got, _) = store.get(key);
                        let expected = model.live().find(|(k, _)| k.as_str() == key).map(|(_, e)| e.clone());
                        prop_assert_eq!(got.is_some(), expected.is_some());
                        if let (Some(kv), Some(entry)) = (got, expected) {
                            check_kv(&kv, key, &entry, model.now);
                        }
                    }
                    Step::List { prefix, start_after, limit } => {
                        let page = store.list(prefix, start_after, limit, usize::MAX);
                        let expected: Vec<_> = model
                            .live()
                            .filter(|(k, _)| k.starts_with(prefix) && k.as_str() > start_after)
                            .collect();
                        prop_assert_eq!(page.items.len(), expected.len().min(limit));
                        prop_assert_eq!(page.more, expected.len() > limit);
                        for (kv, (key, entry)) in page.items.iter().zip(&expected) {
                            check_kv(kv, key, entry, model.now);
                        }
                    }
                    Step::Advance { seconds } => {
                        model.now += seconds;
                        clock.set(start + Duration::from_secs(model.now));
                    }
                    Step::Expire => {
                        model.expire();
                        store.expire();
                    }
                }
                prop_assert_eq!(store.revision(), model.revision);
                // Both still hold expired keys until a write or a sweep removes them.
                let stats = store.stats();
                let bytes: usize = model.map.iter().map(|(k, e)| k.len() + e.value.len()).sum();
                prop_assert_eq!((stats.keys, stats.bytes), (model.map.len(), bytes));
                prop_assert_eq!(stats.subscribers.published, model.revision);
            }
            // Every change reached the subscriber, exactly as the model logged it.
            let seen: Vec<_> = changes(drain(&mut everything))
                .iter()
                .map(|c| (c.kind, c.key().to_string(), c.value().to_string(), c.revision()))
                .collect();
            prop_assert_eq!(&seen, &model.log);
            // And the history replays the same from any revision.
            for from in 1..=model.revision {
                let mut resumed = store.subscribe(String::new(), Start::Revision(from)).unwrap();
                let replayed: Vec<u64> = changes(drain(&mut resumed)).iter().map(|c| c.revision()).collect();
                prop_assert_eq!(replayed, (from..=model.revision).collect::<Vec<_>>());
            }
        }
    }

    /// Asserts two revision lists are equal, reporting the first difference, not all of them.
    fn assert_same_revisions(seen: &[u64], expected: &[u64], what: &str) {
        let first_difference = seen.iter().zip(expected).position(|(a, b)| a != b);
        assert!(
            seen.len() == expected.len() && first_difference.is_none(),
            "{what}: saw {} revisions, expected {}; first difference at index {first_difference:?}",
            seen.len(),
            expected.len()
        );
    }

    // A plain test: the subscriptions are drained outside any runtime, so tokio's
    // cooperative budget never makes a ready queue look empty.
    #[test]
    fn concurrent_writers_and_readers_agree_on_one_gap_free_history() {
        let (subs, hist) = settings(1 << 20, 1 << 20);
        let store = Store::new(subs, hist);
        let mut everything = store.subscribe(String::new(), Start::Now).unwrap();
        let mut k1 = store.subscribe("k1".into(), Start::Now).unwrap();
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000u32 {
                        let key = format!("k{}", (i * 7 + w) % 13);
                        if i % 5 == 0 {
                            store.delete(&key, None).unwrap();
                        } else {
                            store
                                .set(key, format!("{w}-{i}"), SetOptions::default())
                                .unwrap();
                        }
                    }
                })
            })
            .collect();
        // A subscriber that joins half-way resumes from the revision it joined at.
        let mut late = loop {
            let revision = store.revision();
            if revision >= 1_000 {
                break (
                    store
                        .subscribe("k".into(), Start::Revision(revision / 2))
                        .unwrap(),
                    revision / 2,
                );
            }
            std::thread::yield_now();
        };
        for writer in writers {
            writer.join().unwrap();
        }
        let last = store.revision();
        let all = changes(drain(&mut everything));
        let revisions: Vec<u64> = all.iter().map(|c| c.revision()).collect();
        assert_same_revisions(
            &revisions,
            &(1..=last).collect::<Vec<_>>(),
            "every revision once, in order",
        );

        let k1_expected: Vec<u64> = all
            .iter()
            .filter(|c| c.key().starts_with("k1"))
            .map(|c| c.revision())
            .collect();
        let k1_seen: Vec<u64> = changes(drain(&mut k1))
            .iter()
            .map(|c| c.revision())
            .collect();
        assert_same_revisions(&k1_seen, &k1_expected, "the k1 subscriber");

        let late_seen: Vec<u64> = changes(drain(&mut late.0))
            .iter()
            .map(|c| c.revision())
            .collect();
        assert_same_revisions(
            &late_seen,
            &(late.1..=last).collect::<Vec<_>>(),
            "replay then live, no gap or duplicate",
        );

        // Replaying the history reproduces the final state.
        let mut replayed = BTreeMap::new();
        for change in &all {
            match change.kind {
                ChangeKind::Set => {
                    replayed.insert(change.key().to_string(), change.value().to_string())
                }
                _ => replayed.remove(change.key()),
            };
        }
        let listed: BTreeMap<String, String> = store
            .list("", "", usize::MAX, usize::MAX)
            .items
            .into_iter()
            .map(|kv| (kv.key().to_string(), kv.value.to_string()))
            .collect();
        assert_eq!(listed, replayed);
    }
}
