//! The subscriber registry (`pubsub::Hub`) against a naive model: subscribers with random
//! prefixes come and go, random keys are published, and each subscriber must receive exactly
//! the changes whose key starts with its prefix, in order, until its queue overflows; then
//! one `Lagged` saying how far behind it is, and nothing more. Keys mix one- to four-byte
//! characters, so a prefix length can fall inside a character.

#![no_main]

use std::collections::VecDeque;
use std::task::{Context, Poll, Waker};

use arbitrary::Arbitrary;
use kvstore::pubsub::{Change, ChangeKind, Hub, Lagged, Subscription};
use kvstore::record::{Meta, Record};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    buffer: u8,
    ops: Vec<Op>,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Subscribe(Vec<Letter>),
    Unsubscribe(u8),
    Publish(Vec<Letter>),
    Drain(u8),
}

/// A small alphabet, so prefixes and keys share starts often; `e` and `é`, `ü` and the
/// emoji share no bytes with each other but do with their own multi-byte sequences.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Letter {
    A,
    B,
    E,
    EAcute,
    UUmlaut,
    Euro,
    Emoji,
}

fn text(letters: &[Letter]) -> String {
    letters
        .iter()
        .take(8)
        .map(|letter| match letter {
            Letter::A => 'a',
            Letter::B => 'b',
            Letter::E => 'e',
            Letter::EAcute => 'é',
            Letter::UUmlaut => 'ü',
            Letter::Euro => '€',
            Letter::Emoji => '😀',
        })
        .collect()
}

/// What one subscriber should have: its queue, and what it missed once the queue was full.
struct Model {
    prefix: String,
    queue: VecDeque<(String, u64)>,
    missed: u64,
    ended: bool,
}

const MAX_SUBSCRIBERS: usize = 32;

fuzz_target!(|input: Input| {
    let buffer = usize::from(input.buffer % 8) + 1;
    let hub = Hub::new(buffer, MAX_SUBSCRIBERS);
    let mut subscribers: Vec<(Subscription, Model)> = Vec::new();
    let mut revision = 0;
    let mut lagged = 0;
    let mut dropped = 0;
    for op in input.ops.iter().take(512) {
        match op {
            Op::Subscribe(letters) => {
                let prefix = text(letters);
                let subscribed = hub.subscribe(prefix.clone(), 0, None);
                if subscribers.len() == MAX_SUBSCRIBERS {
                    assert!(subscribed.is_err());
                    continue;
                }
                let model = Model {
                    prefix,
                    queue: VecDeque::new(),
                    missed: 0,
                    ended: false,
                };
                subscribers.push((subscribed.expect("under the limit"), model));
            }
            Op::Unsubscribe(i) => {
                if subscribers.is_empty() {
                    continue;
                }
                let (subscription, model) = subscribers.remove(usize::from(*i) % subscribers.len());
                drop(subscription);
                if model.missed > 0 {
                    dropped += model.missed + model.queue.len() as u64;
                }
            }
            Op::Publish(letters) => {
                let key = text(letters);
                revision += 1;
                hub.publish(&change(&key, revision), None);
                for (_, model) in &mut subscribers {
                    if !key.starts_with(&model.prefix) {
                        continue;
                    }
                    if model.missed > 0 || model.queue.len() == buffer {
                        model.missed += 1;
                    } else {
                        model.queue.push_back((key.clone(), revision));
                    }
                }
            }
            Op::Drain(i) => {
                if subscribers.is_empty() {
                    continue;
                }
                let at = usize::from(*i) % subscribers.len();
                let (subscription, model) = &mut subscribers[at];
                if model.missed > 0 && !model.ended {
                    let behind = model.missed + model.queue.len() as u64;
                    assert_eq!(
                        poll(subscription),
                        Poll::Ready(Some(Err(Lagged { behind, buffer })))
                    );
                    model.ended = true;
                    lagged += 1;
                }
                if model.ended {
                    assert_eq!(poll(subscription), Poll::Ready(None));
                    continue;
                }
                while let Some((key, revision)) = model.queue.pop_front() {
                    match poll(subscription) {
                        Poll::Ready(Some(Ok(change))) => {
                            assert_eq!((change.key(), change.revision()), (&*key, revision));
                        }
                        other => panic!("expected {key:?} at {revision}, got {other:?}"),
                    }
                }
                assert_eq!(poll(subscription), Poll::Pending, "{:?}", model.prefix);
            }
        }
        let stats = hub.stats();
        assert_eq!(stats.open, subscribers.len());
        assert_eq!(stats.published, revision);
        assert_eq!((stats.lagged, stats.dropped), (lagged, dropped));
    }
    drop(subscribers);
    assert!(hub.is_empty());
});

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

fn poll(subscription: &mut Subscription) -> Poll<Option<Result<Change, Lagged>>> {
    subscription.poll_recv(&mut Context::from_waker(Waker::noop()))
}
