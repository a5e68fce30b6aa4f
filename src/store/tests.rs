//! The store's behaviour, scenario by scenario; `model.rs` checks it against a model.

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

mod model;
