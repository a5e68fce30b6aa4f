//! The store: an ordered in-memory map behind a reader-writer lock, which publishes every
//! write to the matching subscribers ([`crate::pubsub`]) before the write lock is released.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::pubsub::{Change, ChangeKind, Hub, Subscription, TooManySubscriptions};

/// A handle to the shared store; clones share the same data.
///
/// One lock guards the whole map. It is held for a map operation and the non-blocking
/// queueing of the change, never across an `.await`. A `BTreeMap` keeps keys ordered for
/// the prefix listing to come.
#[derive(Clone)]
pub struct Store {
    map: Arc<RwLock<BTreeMap<String, String>>>,
    hub: Hub,
}

impl Store {
    /// An empty store whose subscribers each queue `buffer` changes, at most `max` at once.
    pub fn new(buffer: usize, max: usize) -> Self {
        Self {
            map: Arc::default(),
            hub: Hub::new(buffer, max),
        }
    }

    /// The value of `key`, or `None` if it is absent.
    pub fn get(&self, key: &str) -> Option<String> {
        self.read().get(key).cloned()
    }

    /// Sets `key` to `value`. Subscribers whose prefix matches receive the change before
    /// this returns, in the same order as the writes to that key were applied.
    pub fn set(&self, key: String, value: String) {
        let mut map = self.write();
        // Publishing inside the write lock orders events per key exactly as the writes, and a
        // subscriber that reacts by calling `get` waits for this lock, so it reads this value.
        self.hub.publish(&key, || Change {
            kind: ChangeKind::Set,
            key: key.clone(),
            value: value.clone(),
            timestamp_ms: now_ms(),
        });
        map.insert(key, value);
    }

    /// Subscribes to every later change of a key that starts with `prefix` ("" matches all).
    pub fn subscribe(&self, prefix: String) -> Result<Subscription, TooManySubscriptions> {
        self.hub.subscribe(prefix)
    }

    /// The number of open subscriptions.
    pub fn subscriptions(&self) -> usize {
        self.hub.len()
    }

    /// The number of keys stored.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // A writer that panicked mid-insert leaves the BTreeMap valid (its operations are
    // panic-safe), so poisoning is ignored rather than taking the whole server down.
    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<String, String>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<String, String>> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_then_get_returns_the_value() {
        let store = Store::new(8, 8);
        assert_eq!(store.get("a"), None);
        store.set("a".into(), "1".into());
        store.set("a".into(), "2".into());
        store.set("b".into(), String::new());
        assert_eq!(store.get("a").as_deref(), Some("2"));
        assert_eq!(store.get("b").as_deref(), Some(""));
        assert_eq!(store.len(), 2);
    }

    #[tokio::test]
    async fn racing_writers_leave_subscribers_agreeing_with_get() {
        let store = Store::new(100_000, 8);
        let mut sub = store.subscribe("k".into()).unwrap();
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000 {
                        store.set(format!("k{}", i % 7), format!("{w}-{i}"));
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let mut last = BTreeMap::new();
        for _ in 0..8_000 {
            let change = sub.recv().await.unwrap().unwrap();
            last.insert(change.key.clone(), change.value.clone());
        }
        for (key, value) in last {
            assert_eq!(store.get(&key), Some(value), "last event for {key}");
        }
    }
}
