//! The contract, checked exactly against a recorded [`Run`]: every answer names the revision
//! it was made at, so each is compared with the reference history's state at that revision
//! (no search over orderings). Only time is uncertain, and only for TTLs, where the call's
//! start and end bound it from both sides.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::time::Duration;

use super::record::{
    Answer, Call, End, Entry, Event, Item, Kind, Op, OpAnswer, Page, Request, Resume, Rev, Run,
    Start, Stream,
};

/// How much later than `set_end + ttl` a read may still see a TTL key, and how much later a
/// write may still find it alive. The memory backend reads the same monotonic clock as the
/// test (same process), so for it the bound is exact; 5 ms covers a backend that computes
/// deadlines on its own clock or rounds them to whole milliseconds (the disk backend's WAL,
/// etcd's leases), without letting a real late read through: TTLs here are 2 to 30 ms.
pub const SLACK: Duration = Duration::from_millis(5);

/// At most this many violations are kept: the first one is what a failure reports.
const MAX_VIOLATIONS: usize = 100;

#[derive(Debug, Default)]
pub struct Report {
    /// Individual comparisons made.
    pub checks: u64,
    pub violations: Vec<String>,
}

/// A TTL set, acknowledged: the key, its TTL and the call's window.
#[derive(Debug, Clone)]
struct Ttl {
    key: String,
    ttl: Duration,
    start: Duration,
    end: Duration,
}

impl Ttl {
    /// The earliest the deadline can be: the set cannot commit before its call started.
    fn earliest(&self) -> Duration {
        self.start + self.ttl
    }

    /// The latest the deadline can be, plus [`SLACK`].
    fn latest(&self) -> Duration {
        self.end + self.ttl + SLACK
    }
}

/// Whether a key a read might return could be hidden by its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Visibility {
    /// It must be returned: no TTL, or the read ended before the earliest deadline.
    Live,
    /// Either: the deadline may fall within the read's window.
    Either,
    /// It must not be returned: the read started after the latest deadline.
    Expired,
}

/// Checks `run` and returns what was compared and every violation found.
pub fn check(run: &Run) -> Report {
    let mut checker = Checker::new(run);
    checker.history();
    checker.acknowledged_writes();
    checker.calls();
    checker.expiries();
    for stream in &run.streams {
        checker.stream(stream);
    }
    for resume in &run.resumes {
        checker.resume(resume);
    }
    checker.batches_whole();
    checker.report
}

struct Checker<'a> {
    run: &'a Run,
    /// The history's events by revision (the first, if a revision repeats).
    at: HashMap<Rev, &'a Event>,
    /// Each key's states, in revision order: the revision a change made and what it left.
    timelines: BTreeMap<&'a str, Vec<(Rev, Option<Entry>)>>,
    /// Acknowledged TTL sets, by revision.
    ttls: HashMap<Rev, Ttl>,
    /// Acknowledged writes, by revision: the call that made each.
    writers: HashMap<Rev, &'a Call>,
    /// The revisions each call acted between, where its answer fixes them.
    spans: Vec<Option<(Rev, Rev)>>,
    /// The revisions snapshots were taken at.
    snapshots: Vec<Rev>,
    last: Rev,
    report: Report,
}

impl<'a> Checker<'a> {
    fn new(run: &'a Run) -> Self {
        Self {
            run,
            at: HashMap::new(),
            timelines: BTreeMap::new(),
            ttls: HashMap::new(),
            writers: HashMap::new(),
            spans: Vec::new(),
            snapshots: Vec::new(),
            last: run.history.last().map_or(0, |e| e.revision),
            report: Report::default(),
        }
    }

    fn expect(&mut self, ok: bool, violation: impl FnOnce() -> String) -> bool {
        self.report.checks += 1;
        if !ok && self.report.violations.len() < MAX_VIOLATIONS {
            self.report.violations.push(violation());
        }
        ok
    }

    fn expect_eq<T: PartialEq + Debug>(&mut self, got: &T, expected: &T, what: &str) -> bool {
        self.expect(got == expected, || {
            format!("{what}: got {got:?}, expected {expected:?}")
        })
    }

    /// Revisions 1..=N, dense and unique, no PROGRESS or snapshot event; each SET's
    /// create_revision and version follow from the key's previous state.
    fn history(&mut self) {
        for (i, event) in self.run.history.iter().enumerate() {
            let dense = i as Rev + 1;
            self.expect(event.revision == dense, || {
                format!(
                    "revisions dense and unique: the history's event {i} has revision {}, expected {dense}: {event:?}",
                    event.revision
                )
            });
            self.expect(event.kind != Kind::Progress && !event.initial, || {
                format!("the reference history holds only changes: {event:?}")
            });
            self.at.entry(event.revision).or_insert(event);
            let timeline = self.timelines.entry(&event.key).or_default();
            let before = timeline.last().and_then(|(_, state)| state.clone());
            let after = match event.kind {
                Kind::Set => Some(Entry {
                    value: event.value.clone(),
                    create_revision: before
                        .as_ref()
                        .map_or(event.revision, |b| b.create_revision),
                    mod_revision: event.revision,
                    version: before.as_ref().map_or(1, |b| b.version + 1),
                }),
                _ => None,
            };
            timeline.push((event.revision, after.clone()));
            match (event.kind, after) {
                (Kind::Set, Some(after)) => {
                    let got = (event.create_revision, event.version);
                    let expected = (after.create_revision, after.version);
                    self.expect_eq(
                        &got,
                        &expected,
                        &format!(
                            "SET {} at {}: (create_revision, version)",
                            event.key, event.revision
                        ),
                    );
                }
                (Kind::Delete | Kind::Expire, _) => {
                    self.expect(before.is_some(), || {
                        format!(
                            "a {:?} of {} at {}, which was absent",
                            event.kind, event.key, event.revision
                        )
                    });
                }
                _ => {}
            }
        }
    }

    /// Every acknowledged write is in the history at its revision, as written, once; every
    /// SET and DELETE in the history was acknowledged.
    fn acknowledged_writes(&mut self) {
        let run = self.run;
        for call in &run.calls {
            let pairs: Vec<(&Op, &OpAnswer)> = match (&call.request, &call.answer) {
                (Request::One(op), Answer::One(answer)) => vec![(op, answer)],
                (Request::Batch(ops), Answer::Batch { results, .. }) => {
                    ops.iter().zip(results).collect()
                }
                _ => continue,
            };
            for (op, answer) in pairs {
                let (revision, kind, value) = match (op, answer) {
                    (
                        Op::Set {
                            value, ttl_ms, key, ..
                        },
                        OpAnswer::Set { revision },
                    ) => {
                        if *ttl_ms > 0 {
                            let ttl = Ttl {
                                key: key.clone(),
                                ttl: Duration::from_millis(*ttl_ms),
                                start: call.start,
                                end: call.end,
                            };
                            self.ttls.insert(*revision, ttl);
                        }
                        (*revision, Kind::Set, value.as_str())
                    }
                    (
                        Op::Delete { .. },
                        OpAnswer::Delete {
                            prev_mod_revision: Some(_),
                            revision,
                        },
                    ) => (*revision, Kind::Delete, ""),
                    _ => continue,
                };
                let again = self.writers.insert(revision, call).is_some();
                self.expect(!again, || {
                    format!("revision {revision} acknowledged twice, again by {call:?}")
                });
                let found = self
                    .at
                    .get(&revision)
                    .map(|e| (e.kind, e.key.as_str(), e.value.as_str()));
                self.expect_eq(
                    &found,
                    &Some((kind, op.key(), value)),
                    &format!("the history at acknowledged revision {revision} of {call:?}"),
                );
            }
        }
        for event in &run.history {
            if matches!(event.kind, Kind::Set | Kind::Delete) {
                let acknowledged = self.writers.contains_key(&event.revision);
                self.expect(acknowledged, || {
                    format!("a change nobody acknowledged: {event:?}")
                });
            }
        }
    }

    /// The key's state at `revision`.
    fn state(&self, key: &str, revision: Rev) -> Option<&Entry> {
        let timeline = self.timelines.get(key)?;
        let i = timeline.partition_point(|(r, _)| *r <= revision);
        i.checked_sub(1).and_then(|i| timeline[i].1.as_ref())
    }

    fn mod_revision(&self, key: &str, revision: Rev) -> Rev {
        self.state(key, revision).map_or(0, |e| e.mod_revision)
    }

    fn is_expiry_of(&self, revision: Rev, key: &str) -> bool {
        self.at
            .get(&revision)
            .is_some_and(|e| e.kind == Kind::Expire && e.key == key)
    }

    fn visibility(&self, entry: &Entry, start: Duration, end: Duration) -> Visibility {
        match self.ttls.get(&entry.mod_revision) {
            None => Visibility::Live,
            Some(ttl) if end < ttl.earliest() => Visibility::Live,
            Some(ttl) if start >= ttl.latest() => Visibility::Expired,
            Some(_) => Visibility::Either,
        }
    }

    /// A read of `key` at `revision` made within `start..end` found `found`.
    /// `ttl_ms` is `None` where the answer carries none (snapshot events).
    fn read(
        &mut self,
        what: &str,
        key: &str,
        revision: Rev,
        (start, end): (Duration, Duration),
        found: Option<&Entry>,
        ttl_ms: Option<u64>,
    ) {
        let expected = self.state(key, revision).cloned();
        match (&expected, found) {
            (Some(expected), Some(found)) => {
                self.expect_eq(
                    found,
                    expected,
                    &format!("{what}: {key} at revision {revision}"),
                );
                let visibility = self.visibility(expected, start, end);
                let ttl = self.ttls.get(&expected.mod_revision).cloned();
                self.expect(visibility != Visibility::Expired, || {
                    format!("{what}: {key} read after its deadline ({ttl:?}, read started at {start:?}): {found:?}")
                });
                let ttl = self
                    .ttls
                    .get(&expected.mod_revision)
                    .map_or(0, |t| t.ttl.as_millis() as u64);
                if let Some(ttl_ms) = ttl_ms {
                    self.expect(
                        (ttl == 0 && ttl_ms == 0) || (1..=ttl).contains(&ttl_ms),
                        || format!("{what}: {key} reports ttl_ms {ttl_ms} for a TTL of {ttl} ms"),
                    );
                }
            }
            (Some(expected), None) => {
                let hidden = self.visibility(expected, start, end) != Visibility::Live;
                self.expect(hidden, || {
                    format!("{what}: {key} missing at revision {revision}, where it is {expected:?}, before any deadline (read ended at {end:?})")
                });
            }
            (None, found) => {
                self.expect_eq(
                    &found,
                    &None,
                    &format!("{what}: {key} at revision {revision}"),
                );
            }
        }
    }

    fn calls(&mut self) {
        let run = self.run;
        for (i, call) in run.calls.iter().enumerate() {
            let what = format!(
                "call {i} (client {}, {:?}..{:?})",
                call.client, call.start, call.end
            );
            let span = match (&call.request, &call.answer) {
                (_, Answer::Error(error)) => {
                    self.expect(false, || format!("{what}: failed: {error}: {call:?}"));
                    None
                }
                (Request::One(op), Answer::One(answer)) => match answer {
                    OpAnswer::Conflict { .. } => None,
                    _ => self.ops(
                        &what,
                        call,
                        std::slice::from_ref(op),
                        std::slice::from_ref(answer),
                        None,
                    ),
                },
                (Request::Batch(ops), Answer::Batch { results, revision }) => {
                    self.ops(&what, call, ops, results, Some(*revision))
                }
                (
                    Request::List {
                        prefix,
                        start_after,
                        limit,
                    },
                    Answer::List(page),
                ) => {
                    self.page(
                        &what,
                        (call.start, call.end),
                        prefix,
                        start_after,
                        *limit,
                        page,
                    );
                    Some((page.revision, page.revision))
                }
                _ => {
                    self.expect(false, || {
                        format!("{what}: an answer of the wrong kind: {call:?}")
                    });
                    None
                }
            };
            self.spans.push(span);
        }
        self.real_time();
    }

    /// The revision just before the op ran, from its own answer. An expiry of its key just
    /// before counts as before it: the op's outcome is the same whichever made it.
    fn before(answer: &OpAnswer) -> Option<Rev> {
        match answer {
            OpAnswer::Get { revision, .. }
            | OpAnswer::Delete {
                prev_mod_revision: None,
                revision,
            } => Some(*revision),
            OpAnswer::Set { revision }
            | OpAnswer::Delete {
                prev_mod_revision: Some(_),
                revision,
            } => Some(revision.saturating_sub(1)),
            OpAnswer::Conflict { .. } => None,
        }
    }

    /// What a write must answer when it acts at `current`, and the revision after it.
    fn write(&self, op: &Op, current: Rev) -> (OpAnswer, Rev) {
        let at = self.mod_revision(op.key(), current);
        match op {
            Op::Set { guard, .. } if guard.is_none_or(|g| g == at) => (
                OpAnswer::Set {
                    revision: current + 1,
                },
                current + 1,
            ),
            Op::Set { .. } => (OpAnswer::Conflict { mod_revision: at }, current),
            Op::Delete { guard: Some(g), .. } if *g != at => {
                (OpAnswer::Conflict { mod_revision: at }, current)
            }
            Op::Delete { .. } if at == 0 => (
                OpAnswer::Delete {
                    prev_mod_revision: None,
                    revision: current,
                },
                current,
            ),
            Op::Delete { .. } => (
                OpAnswer::Delete {
                    prev_mod_revision: Some(at),
                    revision: current + 1,
                },
                current + 1,
            ),
            Op::Get { .. } => unreachable!("a get is not a write"),
        }
    }

    /// Replays ops (one call's, in order, under one lock) against the history from the
    /// revision before the first, and compares each answer with what it must be there: a
    /// get reads at the revision after the ops before it, a write takes the next revision,
    /// a guard succeeds exactly when it matches the key's mod_revision, and nothing else
    /// changes in between but the expiry of a key an op writes. Returns the revisions the
    /// call acted between.
    fn ops(
        &mut self,
        what: &str,
        call: &Call,
        ops: &[Op],
        answers: &[OpAnswer],
        revision: Option<Rev>,
    ) -> Option<(Rev, Rev)> {
        if !self.expect_eq(&answers.len(), &ops.len(), &format!("{what}: results")) {
            return None;
        }
        // The first op whose answer names a revision fixes where the call began; before
        // it are only failed guards, which change nothing.
        let mut current = match answers.iter().find_map(Self::before) {
            Some(first) => first,
            None => revision?,
        };
        let first = current;
        for (i, (op, answer)) in ops.iter().zip(answers).enumerate() {
            let key = op.key();
            let what = format!("{what} op {i} ({op:?}) at revision {current}");
            if let Op::Get { .. } = op {
                let OpAnswer::Get {
                    found,
                    ttl_ms,
                    revision,
                } = answer
                else {
                    self.expect(false, || format!("{what}: answered {answer:?}"));
                    return None;
                };
                if !self.expect_eq(revision, &current, &format!("{what}: the get's revision")) {
                    return None;
                }
                self.read(
                    &what,
                    key,
                    current,
                    (call.start, call.end),
                    found.as_ref(),
                    Some(*ttl_ms),
                );
                continue;
            }
            let (mut expected, mut after) = self.write(op, current);
            // A write that finds its key expired expires it first, at the revision before
            // its own (contract 3); the answer tells whether this one did.
            if &expected != answer && self.is_expiry_of(current + 1, key) {
                let (expired, then) = self.write(op, current + 1);
                if &expired == answer {
                    (expected, after) = (expired, then);
                } else if let Some(entry) = self.state(key, current).cloned() {
                    // It found the key alive: it must have acted before the deadline.
                    let visibility = self.visibility(&entry, call.start, call.end);
                    self.expect(visibility != Visibility::Expired, || {
                        format!("{what}: found {key} alive after its deadline: {entry:?}")
                    });
                }
            }
            if !self.expect_eq(answer, &expected, &what) {
                return None;
            }
            current = after;
        }
        if let Some(revision) = revision {
            let what = format!("{what}: the batch's revision after its last op");
            if !self.expect_eq(&revision, &current, &what) {
                return None;
            }
        }
        Some((first, current))
    }

    /// A List page is the prefix's live keys after `start_after` at its revision, in key
    /// order, with `more` iff a live key follows (contract 4).
    fn page(
        &mut self,
        what: &str,
        window: (Duration, Duration),
        prefix: &str,
        start_after: &str,
        limit: u32,
        page: &Page,
    ) {
        let limit = if limit == 0 { 1000 } else { limit as usize };
        let candidates: Vec<(String, Entry)> = self
            .timelines
            .keys()
            .filter(|k| k.starts_with(prefix) && **k > start_after)
            .filter_map(|k| Some((k.to_string(), self.state(k, page.revision)?.clone())))
            .collect();
        let what = format!(
            "{what} List {prefix:?} after {start_after:?} at revision {}",
            page.revision
        );
        self.expect(page.items.len() <= limit, || {
            format!("{what}: {} items over the limit {limit}", page.items.len())
        });
        let mut next = candidates.iter().peekable();
        for item in &page.items {
            while let Some((key, entry)) = next.next_if(|(key, _)| *key < item.key) {
                let visibility = self.visibility(entry, window.0, window.1);
                self.expect(visibility != Visibility::Live, || {
                    format!("{what}: skipped live key {key}: {entry:?}")
                });
            }
            let Some((key, _)) = next.next() else {
                self.expect(false, || {
                    format!("{what}: {} is absent, or out of order", item.key)
                });
                return;
            };
            if !self.expect_eq(&item.key, key, &format!("{what}: the next key")) {
                return;
            }
            self.read(
                &what,
                key,
                page.revision,
                window,
                Some(&item.entry),
                item.ttl_ms,
            );
        }
        let following: Vec<Visibility> = next
            .map(|(_, entry)| self.visibility(entry, window.0, window.1))
            .collect();
        if page.items.len() < limit {
            let ended = !following.contains(&Visibility::Live) && !page.more;
            self.expect(ended, || {
                format!(
                    "{what}: a short page must be the last: more {} with {following:?} following",
                    page.more
                )
            });
        } else if following.contains(&Visibility::Live) {
            self.expect(page.more, || {
                format!("{what}: more false with a live key following")
            });
        } else if !following.contains(&Visibility::Either) {
            self.expect(!page.more, || {
                format!("{what}: more true with no live key following")
            });
        }
        let next_start_after = match (page.more, page.items.last()) {
            (true, Some(last)) => last.key.clone(),
            _ => String::new(),
        };
        self.expect_eq(
            &page.next_start_after,
            &next_start_after,
            &format!("{what}: next_start_after"),
        );
    }

    /// If call A ended before call B started, A's revisions are at most B's; a failed
    /// single CAS reports the key's mod_revision at some revision within its window.
    fn real_time(&mut self) {
        let calls = &self.run.calls;
        let mut by_start: Vec<usize> = (0..calls.len()).collect();
        by_start.sort_by_key(|&i| calls[i].start);
        let mut by_end = by_start.clone();
        by_end.sort_by_key(|&i| calls[i].end);
        // The latest revision reached by a call that ended before each call began, and that call.
        let mut floor = vec![(0, None); calls.len()];
        let (mut ended, mut latest) = (by_end.iter().peekable(), (0, None));
        for &b in &by_start {
            while let Some(&a) = ended.next_if(|&&a| calls[a].end < calls[b].start) {
                if let Some((_, hi)) = self.spans[a]
                    && hi > latest.0
                {
                    latest = (hi, Some(a));
                }
            }
            floor[b] = latest;
        }
        // The earliest revision acted at by a call that began after each call ended.
        let mut ceiling = vec![self.last; calls.len()];
        let (mut began, mut earliest) = (by_start.iter().rev().peekable(), self.last);
        for &b in by_end.iter().rev() {
            while let Some(&a) = began.next_if(|&&a| calls[a].start > calls[b].end) {
                if let Some((lo, _)) = self.spans[a] {
                    earliest = earliest.min(lo);
                }
            }
            ceiling[b] = earliest;
        }
        for (b, call) in calls.iter().enumerate() {
            let (floor, by) = floor[b];
            if let Some((lo, _)) = self.spans[b] {
                self.expect(floor <= lo, || {
                    format!(
                        "real-time order: call {by:?} reached revision {floor} and ended before call {b} began, which acted at {lo}: {:?} then {call:?}",
                        by.map(|a| &calls[a])
                    )
                });
            }
            if let (Request::One(op), Answer::One(OpAnswer::Conflict { mod_revision })) =
                (&call.request, &call.answer)
            {
                let guard = match op {
                    Op::Set { guard, .. } | Op::Delete { guard, .. } => *guard,
                    Op::Get { .. } => None,
                };
                self.expect(guard.is_some_and(|g| g != *mod_revision), || {
                    format!("call {b}: a conflict, but its guard {guard:?} matched {mod_revision}: {call:?}")
                });
                let window = (floor, ceiling[b].max(floor));
                let had = self.mod_revisions(op.key(), window);
                self.expect(had.contains(mod_revision), || {
                    format!(
                        "call {b}: a failed CAS reported mod_revision {mod_revision}, but within revisions {window:?} the key had only {had:?}: {call:?}"
                    )
                });
            }
        }
    }

    /// The mod_revisions `key` had at revisions `lo..=hi` (0: absent).
    fn mod_revisions(&self, key: &str, (lo, hi): (Rev, Rev)) -> Vec<Rev> {
        let mut had = vec![self.mod_revision(key, lo)];
        if let Some(timeline) = self.timelines.get(key) {
            let after = timeline.partition_point(|(r, _)| *r <= lo);
            had.extend(
                timeline[after..]
                    .iter()
                    .take_while(|(r, _)| *r <= hi)
                    .map(|(_, state)| state.as_ref().map_or(0, |e| e.mod_revision)),
            );
        }
        had
    }

    /// Each TTL key's next change: an expiry no earlier than its deadline, or a write made
    /// while it still lived (a write after the deadline must find it expired).
    fn expiries(&mut self) {
        // The earliest end of any call that acted at or after each revision.
        let mut ends: Vec<(Rev, Duration)> = self
            .run
            .calls
            .iter()
            .zip(&self.spans)
            .filter_map(|(call, span)| span.map(|(_, hi)| (hi, call.end)))
            .collect();
        ends.sort();
        let mut suffix_min = ends.iter().map(|(_, end)| *end).collect::<Vec<_>>();
        for i in (0..suffix_min.len().saturating_sub(1)).rev() {
            suffix_min[i] = suffix_min[i].min(suffix_min[i + 1]);
        }
        let mut ttls: Vec<(Rev, Ttl)> = self.ttls.iter().map(|(r, t)| (*r, t.clone())).collect();
        ttls.sort_by_key(|(r, _)| *r);
        for (revision, ttl) in ttls {
            let timeline = &self.timelines[ttl.key.as_str()];
            let i = timeline.partition_point(|(r, _)| *r <= revision);
            let Some(&(next, _)) = timeline.get(i) else {
                self.expect(false, || {
                    format!(
                        "no expiry event for {} set at {revision} with {ttl:?}",
                        ttl.key
                    )
                });
                continue;
            };
            if self.is_expiry_of(next, &ttl.key) {
                let j = ends.partition_point(|(r, _)| *r < next);
                let earliest_end = suffix_min.get(j).copied().unwrap_or(Duration::MAX);
                self.expect(earliest_end >= ttl.earliest(), || {
                    format!("{} expired at revision {next} before its deadline: a call acting at or after it ended at {earliest_end:?}, set with {ttl:?}", ttl.key)
                });
            } else if let Some(writer) = self.writers.get(&next) {
                let started = writer.start;
                self.expect(started < ttl.latest(), || {
                    format!("{} written at revision {next} by a call started at {started:?}, after its deadline, without expiring first: set at {revision} with {ttl:?}", ttl.key)
                });
            }
        }
    }

    /// A stream is the reference history under its prefix from where it began, gap-free
    /// and duplicate-free over what it covered; a snapshot is the state at its PROGRESS.
    fn stream(&mut self, stream: &Stream) {
        let what = format!("stream {:?} ({:?})", stream.name, stream.prefix);
        let mut events = stream.events.as_slice();
        let mut received = 0;
        let from = match stream.start {
            Start::Revision(from) => from,
            Start::Snapshot { start, end } => {
                let count = events.iter().take_while(|e| e.initial).count();
                let (snapshot, rest) = events.split_at(count);
                match rest.first() {
                    Some(progress) if progress.kind == Kind::Progress => {
                        self.snapshot(
                            &what,
                            &stream.prefix,
                            snapshot,
                            progress.revision,
                            (start, end),
                        );
                        self.snapshots.push(progress.revision);
                        received = progress.revision;
                        events = &rest[1..];
                        progress.revision + 1
                    }
                    _ => {
                        self.expect(rest.is_empty(), || {
                            format!(
                                "{what}: a snapshot not followed by its PROGRESS: {:?}",
                                rest.first()
                            )
                        });
                        events = rest;
                        // Ended inside the snapshot: it covered no revision.
                        1
                    }
                }
            }
        };
        let changes: Vec<&Event> = events.iter().filter(|e| e.kind != Kind::Progress).collect();
        self.expect(events.iter().all(|e| !e.initial), || {
            format!("{what}: an initial event after the snapshot")
        });
        received = events.iter().map(|e| e.revision).fold(received, Rev::max);
        let through = match &stream.end {
            End::Reached(goal) => {
                self.expect(received >= *goal, || {
                    format!("{what}: stopped at {received} before {goal}")
                });
                received
            }
            End::Status {
                code,
                last_revision,
                oldest_revision,
            } => {
                let lagged = *code == tonic::Code::ResourceExhausted;
                let compacted = *code == tonic::Code::OutOfRange;
                self.expect(lagged || compacted, || {
                    format!("{what}: ended with {code:?}")
                });
                self.expect(!compacted || oldest_revision.is_some(), || {
                    format!("{what}: OUT_OF_RANGE without kvstore-oldest-revision")
                });
                // Nothing received: a resume is current to the revision before its first, a
                // snapshot that never reached its PROGRESS to nothing (contract 8).
                let expected = if received > 0 {
                    received
                } else if matches!(stream.start, Start::Snapshot { .. }) {
                    0
                } else {
                    from - 1
                };
                self.expect_eq(
                    last_revision,
                    &Some(expected),
                    &format!("{what}: kvstore-last-revision"),
                );
                last_revision.unwrap_or(received)
            }
            End::Stalled(why) => {
                self.expect(false, || format!("{what}: {why}"));
                received
            }
        };
        let expected: Vec<&Event> = self
            .run
            .history
            .iter()
            .filter(|e| e.key.starts_with(&stream.prefix) && (from..=through).contains(&e.revision))
            .collect();
        let first_difference = changes.iter().zip(&expected).position(|(got, want)| {
            (got.revision, got.kind, &got.key, &got.value)
                != (want.revision, want.kind, &want.key, &want.value)
        });
        self.report.checks += expected.len() as u64;
        let same = first_difference.is_none() && changes.len() == expected.len();
        self.expect(same, || {
            let at = first_difference.unwrap_or(changes.len().min(expected.len()));
            format!(
                "{what}: not the history over revisions {from}..={through} (a gap, a duplicate or a wrong event): {} events for {} expected; first difference at {at}: got {:?}, expected {:?}",
                changes.len(),
                expected.len(),
                changes.get(at),
                expected.get(at)
            )
        });
    }

    /// The snapshot's SET events are exactly the prefix's live keys at `revision`, in key
    /// order, each at its key's mod_revision (contract 8), as a List without a limit.
    fn snapshot(
        &mut self,
        what: &str,
        prefix: &str,
        events: &[Event],
        revision: Rev,
        window: (Duration, Duration),
    ) {
        let what = format!("{what} snapshot at {revision}");
        self.expect(events.iter().all(|e| e.kind == Kind::Set), || {
            format!("{what}: a snapshot event that is not a SET")
        });
        let page = Page {
            items: events
                .iter()
                .map(|e| Item {
                    key: e.key.clone(),
                    entry: Entry {
                        value: e.value.clone(),
                        create_revision: e.create_revision,
                        mod_revision: e.revision,
                        version: e.version,
                    },
                    ttl_ms: None,
                })
                .collect(),
            more: false,
            next_start_after: String::new(),
            revision,
        };
        self.page(&what, window, prefix, "", u32::MAX, &page);
    }

    /// No reader (a Get, a List page, a read-only Batch, a snapshot) reports a revision
    /// strictly inside a Batch that writes: it sees all of its writes or none (contract 2).
    fn batches_whole(&mut self) {
        let run = self.run;
        let mut batches: Vec<(Rev, Rev, usize)> = run
            .calls
            .iter()
            .zip(&self.spans)
            .enumerate()
            .filter_map(|(i, (call, span))| match (&call.request, span) {
                (Request::Batch(_), Some((first, last))) if last - first > 1 => {
                    Some((*first, *last, i))
                }
                _ => None,
            })
            .collect();
        batches.sort();
        let reads = self
            .spans
            .iter()
            .enumerate()
            .filter_map(|(i, span)| match span {
                Some((lo, hi)) if lo == hi => Some((*lo, format!("call {i}: {:?}", run.calls[i]))),
                _ => None,
            });
        let snapshots = self
            .snapshots
            .iter()
            .map(|r| (*r, format!("a snapshot at {r}")));
        let reads: Vec<(Rev, String)> = reads.chain(snapshots).collect();
        for (revision, reader) in reads {
            let before = batches.partition_point(|(first, _, _)| *first < revision);
            if let Some(&(first, last, i)) = before.checked_sub(1).map(|b| &batches[b]) {
                self.expect(revision >= last, || {
                    format!("a read at revision {revision}, inside a Batch (revisions {first}..{last}, call {i}: {:?}): {reader}", run.calls[i])
                });
            }
        }
    }

    /// A resume from further back than `history.max_events` is refused with OUT_OF_RANGE
    /// naming an oldest revision past it (contract 7); one within it opens.
    fn resume(&mut self, resume: &Resume) {
        let oldest_kept = resume.store_revision.saturating_sub(resume.max_events) + 1;
        let what = format!(
            "a resume from {} with the store at {} and history.max_events {}",
            resume.start_revision, resume.store_revision, resume.max_events
        );
        if resume.start_revision < oldest_kept {
            let refused = resume.refused.is_some_and(|(code, oldest)| {
                code == tonic::Code::OutOfRange
                    && oldest.is_some_and(|o| o > resume.start_revision && o >= oldest_kept)
            });
            self.expect(refused, || format!("{what}: got {:?}, expected OUT_OF_RANGE with kvstore-oldest-revision >= {oldest_kept}", resume.refused));
        } else {
            self.expect(resume.refused.is_none(), || {
                format!("{what}: refused with {:?}", resume.refused)
            });
        }
    }
}
