//! The hub's behaviour: prefix matching, bounded queues and lag, pre-images, counters.

use super::*;

fn change(key: &str, revision: u64) -> Change {
    let meta = Meta {
        create_revision: revision,
        mod_revision: revision,
        version: 1,
        deadline: 0,
    };
    Change {
        kind: ChangeKind::Set,
        record: Record::new(key, "v", meta),
        timestamp_ms: 0,
    }
}

fn subscribe(hub: &Hub, prefix: &str) -> Subscription {
    hub.subscribe(prefix.into(), 0, None).unwrap()
}

fn publish_all(hub: &Hub, keys: &[&str]) {
    for (i, key) in keys.iter().enumerate() {
        hub.publish(&change(key, i as u64 + 1), None);
    }
}

fn pending(sub: &mut Subscription) -> Vec<String> {
    let mut keys = Vec::new();
    while let Ok(c) = sub.rx.try_recv() {
        keys.push(c.key().to_string());
    }
    keys
}

#[test]
fn a_prefix_matches_keys_that_start_with_it() {
    let hub = Hub::new(16, 16);
    let mut user = subscribe(&hub, "user:");
    let mut all = subscribe(&hub, "");
    let mut exact = subscribe(&hub, "user:1");
    publish_all(
        &hub,
        &["user:1", "users", "user:", "use", "user:10", "other"],
    );
    assert_eq!(pending(&mut user), ["user:1", "user:", "user:10"]);
    assert_eq!(
        pending(&mut all),
        ["user:1", "users", "user:", "use", "user:10", "other"]
    );
    assert_eq!(pending(&mut exact), ["user:1", "user:10"]);
    assert_eq!(user.published_revision(), 6);
}

/// A subscriber at every length from 1 to 300 of one letter: a key of that letter
/// reaches each, a key of another letter none, and a key's prefixes are hashed in one
/// pass whatever the number of lengths.
#[test]
fn prefixes_of_many_lengths_match_as_prefixes() {
    let hub = Hub::new(4, 1000);
    let mut subs: Vec<_> = (1..=300).map(|n| subscribe(&hub, &"a".repeat(n))).collect();
    hub.publish(&change(&"a".repeat(150), 1), None);
    hub.publish(&change(&"b".repeat(300), 2), None);
    for (n, sub) in (1..=300).zip(&mut subs) {
        let expected: &[&str] = if n <= 150 { &["a"] } else { &[] };
        let got: Vec<String> = pending(sub).iter().map(|k| k[..1].to_string()).collect();
        assert_eq!(got, expected, "the subscriber of {n} a's");
    }
}

#[test]
fn a_prefix_hash_extends_the_hash_of_its_start() {
    let hash = PrefixHash::default();
    let whole = hash.of(b"user:1/name");
    assert_eq!(hash.extend(hash.of(b"user:"), b"1/name"), whole);
    assert_ne!(hash.of(b"user:1/nam"), whole);
    assert_ne!(hash.of(b""), hash.of(b"\0"), "a zero byte still counts");
    assert!(whole < PrefixHash::PRIME);
}

#[test]
fn matching_respects_utf8_boundaries() {
    let hub = Hub::new(16, 16);
    let mut sub = subscribe(&hub, "é");
    publish_all(&hub, &["éa", "e", "ü"]);
    assert_eq!(pending(&mut sub), ["éa"]);
}

/// Prefixes come and go; every one with subscribers gets its changes, and one that is
/// gone gets nothing.
#[test]
fn every_prefix_with_subscribers_gets_its_changes_as_prefixes_come_and_go() {
    let hub = Hub::new(4, 2000);
    let mut subs: Vec<_> = (0..1000)
        .map(|i| subscribe(&hub, &format!("p/{i}/")))
        .collect();
    let mut kept = subs.split_off(900);
    drop(subs);
    assert_eq!(hub.lock().by_hash.len(), 100);
    kept.extend((1000..1050).map(|i| subscribe(&hub, &format!("p/{i}/"))));
    let keys: Vec<String> = (900..1050).map(|i| format!("p/{i}/k")).collect();
    for (sub, key) in kept.iter_mut().zip(&keys) {
        hub.publish(&change(key, 1), None);
        assert_eq!(pending(sub), [key.as_str()]);
    }
    // A key under a prefix that is gone, or never was, reaches no one.
    publish_all(&hub, &["p/5/k", "q/1/k"]);
    assert!(kept.iter_mut().all(|sub| pending(sub).is_empty()));
}

#[test]
fn dropping_a_subscription_unregisters_it() {
    let hub = Hub::new(16, 16);
    let a = subscribe(&hub, "p");
    let b = subscribe(&hub, "p");
    assert_eq!(hub.len(), 2);
    drop(a);
    assert_eq!(hub.len(), 1);
    drop(b);
    assert!(hub.is_empty());
    let registry = hub.lock();
    assert!(registry.by_hash.is_empty());
    assert!(registry.lengths.is_empty());
}

#[test]
fn the_subscription_limit_is_enforced_and_freed_on_drop() {
    let hub = Hub::new(16, 2);
    let a = subscribe(&hub, "x");
    let _b = subscribe(&hub, "y");
    assert_eq!(
        hub.subscribe("z".into(), 0, None).err(),
        Some(TooManySubscriptions { max: 2 })
    );
    drop(a);
    let _c = subscribe(&hub, "z");
}

#[tokio::test]
async fn a_start_revision_skips_earlier_changes() {
    let hub = Hub::new(16, 16);
    let mut sub = hub.subscribe(String::new(), 3, None).unwrap();
    publish_all(&hub, &["b", "c", "d"]);
    assert_eq!(sub.recv().await, Some(Ok(change("d", 3))));
}

/// Leaving swaps the last subscriber of the prefix into the leaver's place; whoever
/// leaves, in whatever order, the rest still get every change.
#[test]
fn subscribers_leaving_in_any_order_leave_the_rest_receiving() {
    let hub = Hub::new(64, 64);
    let mut subs: Vec<Option<Subscription>> = (0..32).map(|_| Some(subscribe(&hub, "p"))).collect();
    for leaving in [0, 31, 7, 8, 30, 1, 15] {
        subs[leaving] = None;
        hub.publish(&change("p/k", 1), None);
        for sub in subs.iter_mut().flatten() {
            assert_eq!(pending(sub), ["p/k"]);
        }
    }
    assert_eq!(hub.len(), 25);
    subs.clear();
    assert!(hub.is_empty() && hub.lock().by_hash.is_empty());
}

#[test]
fn pre_images_keep_the_first_old_record_of_keys_the_snapshot_has_not_reached() {
    let hub = Hub::new(16, 16);
    let pre_images = Arc::new(PreImages::new(2));
    let _sub = hub
        .subscribe(String::new(), 3, Some(pre_images.clone()))
        .unwrap();
    pre_images.lock().sent_up_to = Some("b".into());
    let (a, c, c3) = (change("a", 1), change("c", 2), change("c", 3));
    hub.publish(&change("a", 3), Some(&a.record));
    hub.publish(&c3, Some(&c.record));
    hub.publish(&change("c", 4), Some(&c3.record));
    let kept: Vec<(String, u64)> = pre_images
        .lock()
        .before
        .iter()
        .map(|(key, record)| (key.to_string(), record.meta().mod_revision))
        .collect();
    assert_eq!(
        kept,
        [("c".to_string(), 2)],
        "a was sent; c kept as at revision 2"
    );
    pre_images.finish();
    assert!(pre_images.lock().before.is_empty());
}

#[tokio::test]
async fn a_full_queue_ends_the_subscription_with_how_far_behind_it_is() {
    let hub = Hub::new(2, 16);
    let mut sub = subscribe(&hub, "");
    publish_all(&hub, &["k0", "k1", "k2", "k3", "k4"]);
    // Two queued and three that found the queue full.
    assert_eq!(
        sub.recv().await,
        Some(Err(Lagged {
            behind: 5,
            buffer: 2
        }))
    );
    assert_eq!(sub.recv().await, None);
    assert_eq!((hub.stats().lagged, hub.stats().dropped), (1, 0));
    // Changes offered after it ended are missed too, until it is dropped.
    hub.publish(&change("k5", 6), None);
    drop(sub);
    let stats = hub.stats();
    assert_eq!((stats.open, stats.published), (0, 6));
    assert_eq!((stats.lagged, stats.dropped), (1, 6));
}
