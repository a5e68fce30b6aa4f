//! Change events and the subscriber registry. Subscribers are indexed by prefix so a write
//! looks up only the prefixes of its own key; each subscriber has a bounded queue that a
//! writer never waits on. The store decides *when* to publish and what to replay first;
//! this module decides *to whom*, and keeps for a snapshot in progress the records as they
//! stood at its revision ([`PreImages`]).

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::mpsc;

use crate::record::{Meta, Record};

/// A key as a change carries it: inline up to 24 bytes, so copying one costs no allocation.
pub type Key = compact_str::CompactString;

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The key was set to a value.
    Set,
    /// The key was deleted.
    Delete,
    /// The key's time to live ran out.
    Expire,
}

/// One applied change. It holds the key as the change left it, so a set shares the very
/// record the map holds: the history and every subscriber get it without a copy.
#[derive(Debug, Clone)]
pub struct Change {
    /// What happened.
    pub kind: ChangeKind,
    /// The key after the change, with the change's revision as its `mod_revision`. A
    /// delete or an expiry leaves an empty value, create revision 0 and version 0.
    pub record: Record,
    /// When the change was applied, in Unix milliseconds.
    pub timestamp_ms: i64,
}

impl Change {
    /// A delete or an expiry of `key` at `revision`.
    pub fn removal(kind: ChangeKind, key: &str, revision: u64, timestamp_ms: i64) -> Self {
        let meta = Meta {
            mod_revision: revision,
            ..Meta::default()
        };
        Self {
            kind,
            record: Record::new(key, "", meta),
            timestamp_ms,
        }
    }

    /// The key that changed.
    pub fn key(&self) -> &str {
        self.record.key()
    }

    /// The new value; empty for a delete or an expiry.
    pub fn value(&self) -> &str {
        self.record.value()
    }

    /// The store revision of this change.
    pub fn revision(&self) -> u64 {
        self.record.meta().mod_revision
    }

    /// The key's create revision after the change; 0 once it is gone.
    pub fn create_revision(&self) -> u64 {
        self.record.meta().create_revision
    }

    /// The key's version after the change; 0 once it is gone.
    pub fn version(&self) -> u64 {
        self.record.meta().version
    }

    /// Roughly the memory this change holds, for bounding the history by bytes.
    pub fn weight(&self) -> usize {
        std::mem::size_of::<Self>() + 48 + self.record.size()
    }
}

// Records compare by key alone; two changes are equal when everything about them is.
impl PartialEq for Change {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.key() == other.key()
            && self.value() == other.value()
            && self.record.meta() == other.record.meta()
            && self.timestamp_ms == other.timestamp_ms
    }
}

impl Eq for Change {}

/// What a subscription delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A change, replayed from history or live.
    Change(Change),
    /// A key's current value, part of the snapshot a subscription asked to begin with.
    Initial(Change),
    /// The snapshot is complete: it was read at this revision, and live changes follow.
    SnapshotEnd(u64),
}

/// The subscription limit was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the server is at its limit of {max} open subscriptions (subscriptions.max)")]
pub struct TooManySubscriptions {
    /// The configured limit.
    pub max: usize,
}

/// A subscriber fell behind: its queue was full when a change arrived, so its stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "subscriber fell behind by {behind} changes (its buffer holds {buffer}, subscriptions.buffer); \
     re-read the keys you need and subscribe again"
)]
pub struct Lagged {
    /// Changes that were published to this subscriber but never delivered: those still queued
    /// plus those that found the queue full.
    pub behind: u64,
    /// The queue capacity.
    pub buffer: usize,
}

/// The registry of live subscribers, shared by the store and every [`Subscription`].
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    registry: Mutex<Registry>,
    /// Mirrors the registry's size so writers skip the lock when nobody listens.
    active: AtomicUsize,
    /// The revision of the last change offered to every subscriber. A subscription whose
    /// queue is empty after reading this has received every matching change up to it.
    published: AtomicU64,
    /// Subscriptions ended because they fell behind.
    lagged: AtomicU64,
    /// Changes offered to lagging subscribers that they never received.
    dropped: AtomicU64,
    buffer: usize,
    max: usize,
}

/// What the hub has done so far, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Subscriptions open now.
    pub open: usize,
    /// Changes published. Every change is published once, in revision order, so this is
    /// also the revision of the last one.
    pub published: u64,
    /// Subscriptions ended because they fell behind.
    pub lagged: u64,
    /// Changes that subscribers which fell behind never received: those that found their
    /// queue full, and those still queued when the subscription ended.
    pub dropped: u64,
}

#[derive(Default)]
struct Registry {
    /// The prefixes with subscribers, by their [`PrefixHash`]; a list, for the rare prefixes
    /// whose hashes collide.
    by_hash: HashMap<u64, Vec<Prefix>, BuildHasherDefault<Prehashed>>,
    /// How many distinct prefixes of each byte length exist. A write looks up only these
    /// lengths, hashing its key once, so matching costs the key's length plus one lookup
    /// per distinct length, not one hash of a prefix per length.
    lengths: BTreeMap<usize, usize>,
    hash: PrefixHash,
    count: usize,
}

/// The subscribers of one prefix.
struct Prefix {
    prefix: String,
    subscribers: Vec<Subscriber>,
}

impl Registry {
    /// The subscribers of `prefix`, if it has any.
    fn subscribers_mut(&mut self, prefix: &str) -> Option<&mut Vec<Subscriber>> {
        let hash = self.hash.of(prefix.as_bytes());
        let prefixes = self.by_hash.get_mut(&hash)?;
        let found = prefixes.iter_mut().find(|p| p.prefix == prefix)?;
        Some(&mut found.subscribers)
    }

    /// The subscribers of `prefix`, an empty list for a prefix that had none.
    fn subscribers_entry(&mut self, prefix: &str) -> &mut Vec<Subscriber> {
        let hash = self.hash.of(prefix.as_bytes());
        let prefixes = self.by_hash.entry(hash).or_default();
        let found = match prefixes.iter().position(|p| p.prefix == prefix) {
            Some(found) => found,
            None => {
                prefixes.push(Prefix {
                    prefix: prefix.to_owned(),
                    subscribers: Vec::new(),
                });
                *self.lengths.entry(prefix.len()).or_default() += 1;
                prefixes.len() - 1
            }
        };
        &mut prefixes[found].subscribers
    }

    /// Removes a prefix that has just lost its last subscriber.
    fn remove_prefix(&mut self, prefix: &str) {
        let hash = self.hash.of(prefix.as_bytes());
        if let Some(prefixes) = self.by_hash.get_mut(&hash) {
            prefixes.retain(|p| p.prefix != prefix);
            if prefixes.is_empty() {
                self.by_hash.remove(&hash);
            }
        }
        if let Some(n) = self.lengths.get_mut(&prefix.len()) {
            *n -= 1;
            if *n == 0 {
                self.lengths.remove(&prefix.len());
            }
        }
    }

    /// Calls `each` for every subscriber whose prefix `key` starts with.
    fn matching(&self, key: &[u8], mut each: impl FnMut(&Subscriber)) {
        let mut hash = PrefixHash::EMPTY;
        let mut hashed = 0;
        for &len in self.lengths.keys() {
            if len > key.len() {
                break;
            }
            hash = self.hash.extend(hash, &key[hashed..len]);
            hashed = len;
            let Some(prefixes) = self.by_hash.get(&hash) else {
                continue;
            };
            for prefix in prefixes {
                if prefix.prefix.len() == len && key.starts_with(prefix.prefix.as_bytes()) {
                    prefix.subscribers.iter().for_each(&mut each);
                }
            }
        }
    }
}

/// A polynomial hash of byte strings modulo the prime 2^61 - 1, at a point drawn at random
/// for each hub (Karp and Rabin's fingerprint). A key's prefixes of every length are hashed
/// in one pass over it, so a write costs the key's length whatever the number of distinct
/// subscribed lengths (before, each length hashed its prefix anew: 4,096 lengths made a
/// write of a 4 KiB key hash 8 MiB). Clients never see the point, so they cannot choose
/// prefixes or keys that collide: two different strings of length n collide with
/// probability at most n / 2^61.
struct PrefixHash {
    point: u64,
}

impl Default for PrefixHash {
    fn default() -> Self {
        Self {
            point: rand::random_range(256..Self::PRIME),
        }
    }
}

impl PrefixHash {
    const PRIME: u64 = (1 << 61) - 1;
    /// The hash of the empty string.
    const EMPTY: u64 = 0;

    /// The hash of `bytes`.
    fn of(&self, bytes: &[u8]) -> u64 {
        self.extend(Self::EMPTY, bytes)
    }

    /// The hash of a string whose hash is `hash`, followed by `more`.
    fn extend(&self, mut hash: u64, more: &[u8]) -> u64 {
        for &byte in more {
            // Each byte counts as 1..=256, so that no string hashes as its extension by zeros.
            hash = Self::reduce(u128::from(hash) * u128::from(self.point) + u128::from(byte) + 1);
        }
        hash
    }

    /// `x` modulo 2^61 - 1, for `x` below 2^122 + 2^62.
    fn reduce(x: u128) -> u64 {
        let folded = (x & u128::from(Self::PRIME)) + (x >> 61);
        let folded = (folded & u128::from(Self::PRIME)) + (folded >> 61);
        let folded = folded as u64;
        if folded >= Self::PRIME {
            folded - Self::PRIME
        } else {
            folded
        }
    }
}

/// A hasher for keys that are hashes already, random to clients: it passes them on.
#[derive(Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    // The hash is below 2^61; the multiplication spreads it into the top bits, which the
    // table reads too.
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

struct Subscriber {
    tx: mpsc::Sender<Change>,
    shared: Arc<Shared>,
}

/// What a subscriber's registry entry and its [`Subscription`] share.
struct Shared {
    /// Changes offered once the queue was full: while 0 the subscriber is keeping up.
    missed: AtomicU64,
    /// Its index in its prefix's list, kept by the registry, under its lock, as others
    /// leave: leaving swaps the last one in, so it never scans the list.
    slot: AtomicUsize,
    pre_images: Option<Arc<PreImages>>,
}

/// The records of a snapshot in progress as they stood at its revision, for the keys it
/// has not sent yet that have changed since. Each change a subscriber is offered hands it
/// the key's old record; only the first change after the revision keeps one, so a
/// subscriber keeps at most one record per change queued for it, which its queue bounds (a
/// subscriber whose queue is full has lagged and keeps nothing more).
pub struct PreImages {
    revision: u64,
    done: AtomicBool,
    state: Mutex<PreImageState>,
}

/// How far a snapshot has gone, and what changed ahead of it.
#[derive(Default)]
pub(crate) struct PreImageState {
    /// The last key sent, if any: changes at or before it are the live stream's alone.
    pub(crate) sent_up_to: Option<Key>,
    /// The old records of keys after `sent_up_to` that changed after the revision.
    pub(crate) before: BTreeMap<Key, Record>,
}

impl PreImages {
    /// Pre-images for a snapshot read at `revision`.
    pub fn new(revision: u64) -> Self {
        Self {
            revision,
            done: AtomicBool::new(false),
            state: Mutex::default(),
        }
    }

    /// The snapshot's position and the records kept for it. The caller holds off writers
    /// (the store's read lock) while it reads them and moves on.
    pub(crate) fn lock(&self) -> MutexGuard<'_, PreImageState> {
        // Each update is one insert, or a move of the position: consistent after a panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The snapshot is complete: keep nothing more.
    pub(crate) fn finish(&self) {
        self.done.store(true, Ordering::Release);
        self.lock().before.clear();
    }

    fn keep(&self, old: &Record) {
        if self.done.load(Ordering::Acquire) || old.meta().mod_revision > self.revision {
            return;
        }
        let mut state = self.lock();
        let key = old.key();
        if state.sent_up_to.as_deref().is_some_and(|sent| key <= sent) {
            return;
        }
        if !state.before.contains_key(key) {
            state.before.insert(Key::from(key), old.clone());
        }
    }
}

impl Hub {
    /// A hub whose subscribers each queue up to `buffer` changes, with at most `max` open at once.
    pub fn new(buffer: usize, max: usize) -> Self {
        Self {
            inner: Arc::new(HubInner {
                registry: Mutex::default(),
                active: AtomicUsize::new(0),
                published: AtomicU64::new(0),
                lagged: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                buffer: buffer.max(1),
                max,
            }),
        }
    }

    /// Registers a subscriber for every key that starts with `prefix` ("" matches all keys).
    /// It delivers every change published after this returns whose revision is at least
    /// `min_revision`. With `pre_images`, each change also hands them the key's old record
    /// (see [`PreImages`]).
    ///
    /// The caller must hold off publishers while it reads what comes before the live changes
    /// (a snapshot's revision, a replay's end) and calls this, so that nothing falls between.
    pub fn subscribe(
        &self,
        prefix: String,
        min_revision: u64,
        pre_images: Option<Arc<PreImages>>,
    ) -> Result<Subscription, TooManySubscriptions> {
        let (tx, rx) = mpsc::channel(self.inner.buffer);
        let mut registry = self.lock();
        if registry.count >= self.inner.max {
            return Err(TooManySubscriptions {
                max: self.inner.max,
            });
        }
        registry.count += 1;
        self.inner.active.store(registry.count, Ordering::Release);
        let subscribers = registry.subscribers_entry(&prefix);
        let shared = Arc::new(Shared {
            missed: AtomicU64::new(0),
            slot: AtomicUsize::new(subscribers.len()),
            pre_images,
        });
        subscribers.push(Subscriber {
            tx,
            shared: shared.clone(),
        });
        Ok(Subscription {
            rx,
            min_revision,
            shared,
            hub: self.clone(),
            prefix,
            ended: false,
        })
    }

    /// The number of open subscriptions.
    pub fn len(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Whether no subscription is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Open subscriptions and lifetime counters, read without taking the registry lock.
    pub fn stats(&self) -> HubStats {
        let inner = &self.inner;
        HubStats {
            open: self.len(),
            published: inner.published.load(Ordering::Acquire),
            lagged: inner.lagged.load(Ordering::Relaxed),
            dropped: inner.dropped.load(Ordering::Relaxed),
        }
    }

    /// Queues a change for every subscriber whose prefix matches its key. Never waits: a
    /// subscriber whose queue is full is marked lagged and receives nothing more, so its
    /// stream ends instead of skipping a change.
    ///
    /// The caller holds the store's write lock, so changes are published one at a time in
    /// revision order. `old` is the key's record before the change, if it had one.
    pub fn publish(&self, change: &Change, old: Option<&Record>) {
        if !self.is_empty() {
            self.offer(change, old);
        }
        self.inner
            .published
            .store(change.revision(), Ordering::Release);
    }

    fn offer(&self, change: &Change, old: Option<&Record>) {
        let registry = self.lock();
        registry.matching(change.key().as_bytes(), |subscriber| {
            subscriber.offer(change, old);
        });
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding this lock leaves the registry consistent (every update is a
        // single push or remove, or a prefix's entry added or taken out), so a poisoned lock
        // is still safe to use.
        self.inner
            .registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn unsubscribe(&self, prefix: &str, shared: &Arc<Shared>) {
        let mut registry = self.lock();
        let Some(subscribers) = registry.subscribers_mut(prefix) else {
            return;
        };
        let slot = shared.slot.load(Ordering::Relaxed);
        debug_assert!(Arc::ptr_eq(&subscribers[slot].shared, shared));
        subscribers.swap_remove(slot);
        if let Some(moved) = subscribers.get(slot) {
            moved.shared.slot.store(slot, Ordering::Relaxed);
        }
        if subscribers.is_empty() {
            registry.remove_prefix(prefix);
        }
        registry.count -= 1;
        self.inner.active.store(registry.count, Ordering::Release);
    }
}

impl Subscriber {
    fn offer(&self, change: &Change, old: Option<&Record>) {
        let missed = &self.shared.missed;
        if missed.load(Ordering::Relaxed) > 0 {
            missed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self.tx.try_send(change.clone()) {
            Ok(()) => {
                if let (Some(pre_images), Some(old)) = (&self.shared.pre_images, old) {
                    pre_images.keep(old);
                }
            }
            // Lag policy: a change feed must not skip silently. Stop delivering; the
            // subscription sees `missed > 0` and ends its stream with how far behind it was.
            Err(mpsc::error::TrySendError::Full(_)) => {
                missed.fetch_add(1, Ordering::Release);
            }
            // The receiver is gone; its Drop is unregistering it.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// A live subscription: a stream of the changes to keys under its prefix.
///
/// It yields live changes in revision order, then, if it fell behind, one [`Lagged`] error
/// and nothing more. Dropping it unregisters it at once.
pub struct Subscription {
    rx: mpsc::Receiver<Change>,
    min_revision: u64,
    shared: Arc<Shared>,
    hub: Hub,
    prefix: String,
    ended: bool,
}

impl Subscription {
    /// The prefix this subscription matches.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The revision up to which every matching change has been offered to this
    /// subscription. Read it *before* finding the subscription empty to know it is current
    /// up to that revision.
    pub fn published_revision(&self) -> u64 {
        self.hub.inner.published.load(Ordering::Acquire)
    }

    /// Whether no change is queued.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Whether it has fallen behind: its next event is the [`Lagged`] error.
    pub fn lagged(&self) -> bool {
        !self.ended && self.shared.missed.load(Ordering::Acquire) > 0
    }

    /// Waits for the next event. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Result<Change, Lagged>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next change; see [`Subscription::recv`].
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Change, Lagged>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let missed = self.shared.missed.load(Ordering::Acquire);
        if missed > 0 {
            // Ends the stream at once: what was delivered is a gap-free prefix of the changes,
            // and the queued rest is worthless to a client that must resync anyway.
            self.ended = true;
            self.rx.close();
            self.hub.inner.lagged.fetch_add(1, Ordering::Relaxed);
            let behind = missed + self.rx.len() as u64;
            return Poll::Ready(Some(Err(Lagged {
                behind,
                buffer: self.hub.inner.buffer,
            })));
        }
        loop {
            match self.rx.poll_recv(cx) {
                // A subscription that starts at a future revision skips what comes before.
                Poll::Ready(Some(change)) if change.revision() < self.min_revision => {}
                other => return other.map(|next| next.map(Ok)),
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(&self.prefix, &self.shared);
        // Unregistered, so no writer offers it more: the count of what it missed is final.
        let missed = self.shared.missed.load(Ordering::Acquire);
        if missed > 0 {
            let dropped = missed + self.rx.len() as u64;
            self.hub.inner.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests;
