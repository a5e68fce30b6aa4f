//! The three runs of the suite against one backend's server: concurrent clients with
//! streams beside them, subscribers that lag, and resumes against a small history. Each
//! returns its recording for the checker.

use std::collections::HashMap;

use kvstore::config::Settings;
use tokio::time::Instant;
use tonic::Code;

use super::record::{Answer, Call, Kind, Op, OpAnswer, Request, Resume, Rev, Run, Start};
use super::workload::{self, Clock, PREFIXES, Reader, call, subscribe};
use crate::helpers::{PATIENCE, TestServer, spawn_with};

/// Concurrent clients, and the connections they share.
const CLIENTS: usize = 6;
const CONNECTIONS: usize = 3;

/// A client id for the calls the driver makes itself.
const DRIVER: usize = CLIENTS;

/// Every acknowledged write, by revision.
fn writes(calls: &[Call]) -> Vec<(Rev, &Op)> {
    let mut writes = Vec::new();
    for call in calls {
        let pairs: Vec<_> = match (&call.request, &call.answer) {
            (Request::One(op), Answer::One(answer)) => vec![(op, answer)],
            (Request::Batch(ops), Answer::Batch { results, .. }) => {
                ops.iter().zip(results).collect()
            }
            _ => continue,
        };
        for (op, answer) in pairs {
            match answer {
                OpAnswer::Set { revision }
                | OpAnswer::Delete {
                    revision,
                    prev_mod_revision: Some(_),
                } => {
                    writes.push((*revision, op));
                }
                _ => {}
            }
        }
    }
    writes.sort_by_key(|(r, _)| *r);
    writes
}

/// The keys whose last acknowledged write gave them a TTL, with that write's revision:
/// each must expire.
fn expiring(calls: &[Call]) -> Vec<(String, Rev)> {
    let mut last = HashMap::new();
    for (revision, op) in writes(calls) {
        last.insert(op.key(), (revision, op));
    }
    last.into_iter()
        .filter_map(|(key, (revision, op))| match op {
            Op::Set { ttl_ms, .. } if *ttl_ms > 0 => Some((key.to_owned(), revision)),
            _ => None,
        })
        .collect()
}

/// The highest revision a stream under `prefix` must reach: its prefix's last write.
fn goal(calls: &[Call], prefix: &str) -> Rev {
    writes(calls)
        .iter()
        .filter(|(_, op)| op.key().starts_with(prefix))
        .map(|(r, _)| *r)
        .max()
        .unwrap_or(0)
}

/// Sets one key under each prefix in one Batch, so every stream has a last change to wait
/// for, then reads the store's revision; both calls are recorded.
async fn finish_writes(server: &TestServer, clock: Clock, calls: &mut Vec<Call>) -> Rev {
    let mut kv = server.client().await;
    let sentinels = PREFIXES
        .iter()
        .map(|p| Op::Set {
            key: format!("{p}~"),
            value: "end".into(),
            guard: None,
            ttl_ms: 0,
        })
        .collect();
    calls.push(call(&mut kv, clock, DRIVER, Request::Batch(sentinels)).await);
    let last = call(
        &mut kv,
        clock,
        DRIVER,
        Request::One(Op::Get { key: "a/~".into() }),
    )
    .await;
    let revision = match &last.answer {
        Answer::One(OpAnswer::Get { revision, .. }) => *revision,
        _ => 0,
    };
    calls.push(last);
    revision
}

/// Clients doing `ops` random calls, seeded, with a reference subscriber to every key from
/// revision 1, and resumed and snapshot subscribers opened mid-run.
pub async fn clients(
    mut settings: Settings,
    seed: u64,
    ops: usize,
    max_time: std::time::Duration,
) -> Run {
    // Large enough that neither the reference stream lags nor a mid-run resume is compacted.
    settings.subscriptions.buffer = 1 << 16;
    settings.history.max_events = 1 << 22;
    let server = spawn_with(settings).await;
    let clock = Clock::start();
    let mut kv = server.client().await;
    // The store is empty, so a stream from now covers every revision from 1.
    let (stream, _) = subscribe(&mut kv, clock, "", 0, false)
        .await
        .expect("subscribe");
    let mut reference = Reader::spawn("reference", "", Start::Revision(1), stream);

    let deadline = Instant::now() + max_time;
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(server.client().await);
    }
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let kv = channels[id % CONNECTIONS].clone();
            let count = ops / CLIENTS + usize::from(id < ops % CLIENTS);
            tokio::spawn(workload::client(id, kv, clock, seed, count, deadline))
        })
        .collect();

    // A third of the way in (about one write per two calls), open the extra streams.
    let target = (ops / 6).max(1) as Rev;
    reference
        .wait(|events| events.last().is_some_and(|e| e.revision >= target))
        .await;
    let now = reference.received();
    let mut extras = Vec::new();
    for (name, prefix, from, initial) in [
        ("resume a/ from half-way", "a/", (now / 2).max(1), false),
        ("resume everything at the live edge", "", now + 1, false),
        ("snapshot b/", "b/", 0, true),
        ("snapshot everything", "", 0, true),
    ] {
        let (stream, start) = subscribe(&mut kv, clock, prefix, from, initial)
            .await
            .expect("subscribe");
        extras.push(Reader::spawn(name, prefix, start, stream));
    }

    let mut calls = Vec::new();
    for task in tasks {
        calls.extend(task.await.expect("a client task does not panic"));
    }
    // The TTL waits: every key left with a TTL must expire, and the reference must see it.
    let pending = expiring(&calls);
    reference
        .wait(|events| {
            pending.iter().all(|(key, set)| {
                events
                    .iter()
                    .any(|e| e.kind == Kind::Expire && e.key == *key && e.revision > *set)
            })
        })
        .await;
    let last = finish_writes(&server, clock, &mut calls).await;
    let history = reference.finish(last).await.events;
    let mut streams = Vec::new();
    for extra in extras {
        let goal = goal(&calls, extra.prefix());
        streams.push(extra.finish(goal).await);
    }
    server.shutdown().await;
    Run {
        calls,
        history,
        streams,
        resumes: Vec::new(),
    }
}

/// Subscribers that read nothing while large values are written, on a tiny buffer: each
/// must end with RESOURCE_EXHAUSTED after a gap-free prefix, and resume from its trailer.
pub async fn lag(mut settings: Settings) -> Run {
    settings.subscriptions.buffer = 4;
    let server = spawn_with(settings).await;
    let clock = Clock::start();
    let mut kv = server.client().await;
    let small = (0..10)
        .map(|i| Op::Set {
            key: format!("a/{i}"),
            value: format!("v{i}"),
            guard: None,
            ttl_ms: 0,
        })
        .collect();
    let mut calls = vec![call(&mut kv, clock, DRIVER, Request::Batch(small)).await];

    // Each on its own connection, so each has its own flow-control window to fill.
    let mut lagging = Vec::new();
    for (name, prefix, from, initial) in [
        ("from now", "", 0, false),
        ("resume from 5", "", 5, false),
        ("snapshot", "a/", 0, true),
    ] {
        let mut kv = server.client().await;
        let (stream, start) = subscribe(&mut kv, clock, prefix, from, initial)
            .await
            .expect("subscribe");
        // The store is at 10 and nothing else writes: a stream from now begins at 11.
        let start = if from == 0 && !initial {
            Start::Revision(11)
        } else {
            start
        };
        lagging.push((name, prefix, stream, start, kv));
    }
    // Far more than HTTP/2 flow control and the buffer hold: 10 MB.
    let padding = "x".repeat(64 * 1024);
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let mut kv = kv.clone();
            let padding = padding.clone();
            tokio::spawn(async move {
                let mut calls = Vec::new();
                for b in 0..10 {
                    let ops = (0..8)
                        .map(|i| Op::Set {
                            key: format!("a/{i}"),
                            value: format!("{w}.{b}.{i}{padding}"),
                            guard: None,
                            ttl_ms: 0,
                        })
                        .collect();
                    calls.push(call(&mut kv, clock, w, Request::Batch(ops)).await);
                }
                calls
            })
        })
        .collect();
    for writer in writers {
        calls.extend(writer.await.expect("a writer does not panic"));
    }
    let last = goal(&calls, "");
    let mut streams = Vec::new();
    for (name, prefix, stream, start, mut kv) in lagging {
        let lagged = Reader::spawn(name, prefix, start, stream)
            .finish(last)
            .await;
        let super::record::End::Status {
            code: Code::ResourceExhausted,
            last_revision: Some(received),
            ..
        } = lagged.end
        else {
            panic!(
                "{name}: expected to lag behind 10 MB with a buffer of 4, ended {:?}",
                lagged.end
            );
        };
        // Resume where the trailer says; a snapshot cut short starts over.
        let (from, initial) = if received == 0 {
            (0, true)
        } else {
            (received + 1, false)
        };
        let (stream, start) = subscribe(&mut kv, clock, prefix, from, initial)
            .await
            .expect("resume");
        streams.push(lagged);
        streams.push(
            Reader::spawn(&format!("{name}, resumed"), prefix, start, stream)
                .finish(last)
                .await,
        );
    }
    // Nothing is written any more: a replay of the whole history cannot lag.
    let (stream, start) = subscribe(&mut kv, clock, "", 1, false)
        .await
        .expect("replay");
    let history = Reader::spawn("reference", "", start, stream)
        .finish(last)
        .await
        .events;
    server.shutdown().await;
    Run {
        calls,
        history,
        streams,
        resumes: Vec::new(),
    }
}

/// Resumes against a history of 50 events: from further back always OUT_OF_RANGE; within
/// it gap-free, even for a replay that more writes overtake.
pub async fn compaction(mut settings: Settings) -> Run {
    const MAX_EVENTS: u64 = 50;
    settings.history.max_events = MAX_EVENTS as usize;
    let server = spawn_with(settings).await;
    let clock = Clock::start();
    let mut kv = server.client().await;
    let (stream, _) = subscribe(&mut kv, clock, "", 0, false)
        .await
        .expect("subscribe");
    let reference = Reader::spawn("reference", "", Start::Revision(1), stream);
    let mut calls = Vec::new();
    let mut resumes = Vec::new();
    let mut streams = Vec::new();
    let mut overtaken = None;
    for wave in 0..2 {
        for b in 0..3 {
            let ops = (0..40)
                .map(|i| Op::Set {
                    key: format!("{}{}", PREFIXES[i % 3], i % 4),
                    value: format!("{wave}.{b}.{i}"),
                    guard: None,
                    ttl_ms: 0,
                })
                .collect();
            calls.push(call(&mut kv, clock, DRIVER, Request::Batch(ops)).await);
        }
        let store = goal(&calls, "");
        let oldest = store - MAX_EVENTS + 1;
        for from in [1, store / 2, oldest - 1, oldest, store - 10] {
            let refused = match subscribe(&mut kv, clock, "", from, false).await {
                Ok((stream, start)) => {
                    if wave == 0 && from == oldest {
                        // Not read until the next wave has compacted what it replays.
                        overtaken = Some((stream, start));
                    } else {
                        streams.push(Reader::spawn(
                            &format!("resume from {from}"),
                            "",
                            start,
                            stream,
                        ));
                    }
                    None
                }
                Err(status) => Some((
                    status.code(),
                    workload::trailer(&status, kvstore::grpc::OLDEST_REVISION_TRAILER),
                )),
            };
            resumes.push(Resume {
                start_revision: from,
                store_revision: store,
                max_events: MAX_EVENTS,
                refused,
            });
        }
    }
    let last = goal(&calls, "");
    let mut finished = Vec::new();
    if let Some((stream, start)) = overtaken {
        finished.push(
            Reader::spawn("overtaken by compaction", "", start, stream)
                .finish(last)
                .await,
        );
    }
    for stream in streams {
        finished.push(stream.finish(last).await);
    }
    let history = reference.finish(last).await.events;
    server.shutdown().await;
    Run {
        calls,
        history,
        streams: finished,
        resumes,
    }
}

/// How long `ops` client calls may take at most: a bound against a hang, not a target
/// (a debug build makes about 700 calls a second on two cores).
pub fn max_time(ops: usize) -> std::time::Duration {
    (PATIENCE * 6).max(std::time::Duration::from_millis(10) * ops as u32)
}
