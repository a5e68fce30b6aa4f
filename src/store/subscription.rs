//! A subscription as the store hands it out: what comes before its live changes (a snapshot
//! of the keys under its prefix, or a replay of the history) is read a page at a time, as
//! the client takes it, and then the live changes of [`crate::pubsub`] follow. Nothing is
//! copied up front, so a snapshot or replay that is never read, or is cancelled, costs a
//! page, not the prefix.

use std::collections::VecDeque;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::task::{Context, Poll};

use futures_core::Stream;

use super::{State, is_live, now_ms};
use crate::pubsub::{self, Change, ChangeKind, Event, Key, Lagged, PreImages};

/// The most events one page holds: what a subscription keeps beyond its queue while it
/// replays or sends its snapshot.
pub(crate) const PAGE: usize = 128;

/// The most entries (changes of the history, or keys under the prefix) one page visits,
/// however few of them it sends: this bounds how long a page holds the store's read lock.
pub(crate) const SCAN: usize = 1024;

/// Why a subscription's stream ended before the client left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Ended {
    /// It fell behind the live changes.
    #[error(transparent)]
    Lagged(#[from] Lagged),
    /// The history dropped changes its replay had not read yet.
    #[error(
        "the history dropped revision {requested} before this replay reached it (history.max_events, \
         history.max_bytes); the oldest revision still available is {oldest}: re-list, then \
         subscribe from the list's revision + 1"
    )]
    Compacted {
        /// The next revision the replay would have sent.
        requested: u64,
        /// The oldest revision still retained.
        oldest: u64,
    },
}

/// A stream of the changes to keys under a prefix, beginning where it was asked to.
///
/// It yields what comes before the live changes (the retained history from the start
/// revision, or a snapshot of every matching key in key order then
/// [`Event::SnapshotEnd`]), then live changes in revision order, with no gap or duplicate
/// between the two; then, if it fell behind, one error and nothing more. Dropping it
/// unregisters it at once.
pub struct Subscription {
    live: pubsub::Subscription,
    pub(super) before: Before,
    pub(super) page: VecDeque<Event>,
    state: Arc<RwLock<State>>,
    after: u64,
    ended: bool,
    /// Entries the snapshot or replay has visited so far.
    visited: u64,
}

/// What is still to be read before the live changes.
pub(super) enum Before {
    Nothing,
    /// The history's changes from `next` to `until`, the revision the live changes follow.
    Replay {
        next: u64,
        until: u64,
    },
    /// The keys under the prefix as they stood at `revision`, read at `at` (nanoseconds
    /// after the store's epoch, for expiry), after the last key sent.
    Snapshot {
        pre_images: Arc<PreImages>,
        revision: u64,
        at: u64,
    },
}

impl Subscription {
    pub(super) fn new(
        live: pubsub::Subscription,
        before: Before,
        state: Arc<RwLock<State>>,
        after: u64,
    ) -> Self {
        Self {
            live,
            before,
            page: VecDeque::new(),
            state,
            after,
            ended: false,
            visited: 0,
        }
    }

    /// The prefix this subscription matches.
    pub fn prefix(&self) -> &str {
        self.live.prefix()
    }

    /// The revision before the first change this subscription delivers: a client that
    /// receives nothing can still resume from the next one without a gap.
    pub fn after(&self) -> u64 {
        self.after
    }

    /// The revision up to which every matching change has been offered to the live stream.
    /// Read it *before* finding the subscription empty to know it is current up to that
    /// revision; it says nothing while [`Subscription::is_live`] is false.
    pub fn published_revision(&self) -> u64 {
        self.live.published_revision()
    }

    /// Whether everything before the live changes has been read: from here on, an empty
    /// subscription is current.
    pub fn is_live(&self) -> bool {
        matches!(self.before, Before::Nothing)
    }

    /// Whether a snapshot is still being read: the client has not had its end marker.
    pub fn in_snapshot(&self) -> bool {
        matches!(self.before, Before::Snapshot { .. })
    }

    /// Whether the next poll reads a page of the snapshot or replay: nothing is left of the
    /// last one.
    pub fn reads_a_page_next(&self) -> bool {
        self.page.is_empty() && !self.is_live() && !self.ended
    }

    /// Entries (keys under the prefix, or changes of the history) the snapshot or replay has
    /// visited so far, whether it sent them or not: the work it has cost. At most [`SCAN`]
    /// more each time a page is read.
    pub fn visited(&self) -> u64 {
        self.visited
    }

    /// Whether no event is waiting: nothing is left to read before the live changes and no
    /// change is queued.
    pub fn is_empty(&self) -> bool {
        self.page.is_empty() && self.is_live() && self.live.is_empty()
    }

    /// Waits for the next event. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Result<Event, Ended>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Event, Ended>>> {
        loop {
            if self.ended {
                return Poll::Ready(None);
            }
            if let Some(event) = self.page.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            // A subscriber that has fallen behind stops reading its snapshot or replay: the
            // client must start again anyway.
            if self.is_live() || self.live.lagged() {
                break;
            }
            match self.read_page() {
                Ok(()) if self.page.is_empty() && !self.is_live() => {
                    // A page that visited its fill of entries and sent none: yield before the
                    // next, so that one subscription never holds its task's thread for long.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Ok(()) => {}
                Err(ended) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(ended)));
                }
            }
        }
        self.live
            .poll_recv(cx)
            .map(|next| next.map(|r| r.map(Event::Change).map_err(Ended::from)))
    }

    /// Reads the next page of what comes before the live changes, under the store's read
    /// lock, which holds off writers while the page is read.
    fn read_page(&mut self) -> Result<(), Ended> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let prefix = self.live.prefix();
        let (finished, visited) = match &mut self.before {
            Before::Nothing => (true, 0),
            Before::Replay { next, until } => {
                replay_page(&state, prefix, next, *until, &mut self.page)?
            }
            Before::Snapshot {
                pre_images,
                revision,
                at,
            } => snapshot_page(&state, prefix, pre_images, *revision, *at, &mut self.page),
        };
        self.visited += visited as u64;
        if finished {
            self.before = Before::Nothing;
        }
        Ok(())
    }
}

/// Reads the next page of a replay into `page`; whether the replay has reached `until`, and
/// how many changes it visited.
fn replay_page(
    state: &RwLockReadGuard<'_, State>,
    prefix: &str,
    next: &mut u64,
    until: u64,
    page: &mut VecDeque<Event>,
) -> Result<(bool, usize), Ended> {
    let history = &state.history;
    if *next > until {
        return Ok((true, 0));
    }
    if *next <= history.compacted {
        return Err(Ended::Compacted {
            requested: *next,
            oldest: history.compacted + 1,
        });
    }
    // Revisions are contiguous, so the start is found by arithmetic.
    let skip = usize::try_from(*next - history.compacted - 1).unwrap_or(usize::MAX);
    let skip = skip.min(history.changes.len());
    let mut visited = 0;
    for change in history.changes.range(skip..).take(SCAN) {
        if change.revision() > until {
            break;
        }
        visited += 1;
        *next = change.revision() + 1;
        if change.key().starts_with(prefix) {
            page.push_back(Event::Change(change.clone()));
            if page.len() == PAGE {
                break;
            }
        }
    }
    Ok((*next > until, visited))
}

/// Reads the next page of a snapshot into `page`, in key order; whether it is complete (its
/// end marker is then the page's last event), and how many keys it visited.
///
/// A key's record in the map is its value at the snapshot's revision unless it has changed
/// since; for those, the pre-images hold the record as it was (or nothing, if the key was
/// created since).
fn snapshot_page(
    state: &RwLockReadGuard<'_, State>,
    prefix: &str,
    pre_images: &PreImages,
    revision: u64,
    at: u64,
    page: &mut VecDeque<Event>,
) -> (bool, usize) {
    let mut kept = pre_images.lock();
    let sent = kept.sent_up_to.clone();
    let lower = match &sent {
        Some(key) => Bound::Excluded(key.as_str()),
        None => Bound::Included(prefix),
    };
    let mut records = state.under(prefix, lower).peekable();
    let mut before = kept
        .before
        .range::<str, _>((lower, Bound::Unbounded))
        .peekable();
    let timestamp_ms = now_ms();
    let mut last = None;
    let mut finished = false;
    let mut visited = 0;
    for _ in 0..SCAN {
        let in_map = records.peek().copied();
        let changed = before.peek().map(|&(key, record)| (key.as_str(), record));
        let (key, record) = match changed {
            // The key changed after the revision: what it was then, if anything.
            Some((key, record)) if in_map.is_none_or(|r| key <= r.key()) => {
                if in_map.is_some_and(|r| r.key() == key) {
                    records.next();
                }
                before.next();
                (key, Some(record))
            }
            _ => match in_map {
                Some(record) => {
                    records.next();
                    let unchanged = record.meta().mod_revision <= revision;
                    (record.key(), unchanged.then_some(record))
                }
                None => {
                    finished = true;
                    break;
                }
            },
        };
        visited += 1;
        last = Some(Key::from(key));
        if let Some(record) = record.filter(|record| is_live(record, at)) {
            page.push_back(Event::Initial(Change {
                kind: ChangeKind::Set,
                record: record.clone(),
                timestamp_ms,
            }));
            if page.len() == PAGE {
                break;
            }
        }
    }
    drop(before);
    if let Some(last) = last {
        // What is kept for keys now sent is no longer needed.
        let ahead = kept.before.split_off(last.as_str());
        kept.before = ahead;
        kept.before.remove(last.as_str());
        kept.sent_up_to = Some(last);
    }
    drop(kept);
    if finished {
        pre_images.finish();
        page.push_back(Event::SnapshotEnd(revision));
    }
    (finished, visited)
}

impl Stream for Subscription {
    type Item = Result<Event, Ended>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}
