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

mod ops;
mod subscription;

pub use ops::{
    Conflict, Deleted, KeyValue, Op, OpResult, Page, SetOptions, Start, SubscribeError, TooLarge,
};
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
mod tests;
