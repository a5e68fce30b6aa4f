//! The store against a model: random steps (proptest), and writers and readers at once.

use super::*;

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
