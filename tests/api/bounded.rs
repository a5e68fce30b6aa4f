//! No request costs the server more than its limits: answers within
//! `limits.max_response_bytes`, and a Batch's gets at the revision each read at.

use std::time::{Duration, Instant};

use kvstore::pb::batch_op::Op;
use kvstore::pb::batch_result::Result as R;
use kvstore::pb::key_value_store_client::KeyValueStoreClient;
use kvstore::pb::{BatchOp, BatchRequest, GetRequest, ListRequest, SetRequest, SubscribeRequest};
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{spawn_server, spawn_with, test_settings};

const MIB: usize = 1024 * 1024;

fn set(key: &str, value: &str) -> Op {
    Op::Set(SetRequest {
        key: key.into(),
        value: value.into(),
        ..SetRequest::default()
    })
}

fn get(key: &str) -> Op {
    Op::Get(GetRequest { key: key.into() })
}

fn batch(ops: Vec<Op>) -> BatchRequest {
    BatchRequest {
        ops: ops.into_iter().map(|op| BatchOp { op: Some(op) }).collect(),
    }
}

/// A client that takes the Get's answer and subscribes from `revision + 1` must see every
/// later change of the key, so a Get inside a Batch reports the revision it read at.
#[tokio::test]
async fn a_get_inside_a_batch_reports_the_revision_it_read_at() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    client
        .set(SetRequest {
            key: "bk".into(),
            value: "v1".into(),
            ..SetRequest::default()
        })
        .await
        .unwrap();
    let reply = client
        .batch(batch(vec![get("bk"), set("bk", "v2"), get("bk")]))
        .await
        .unwrap()
        .into_inner();
    let results: Vec<R> = reply
        .results
        .into_iter()
        .map(|r| r.result.unwrap())
        .collect();
    let R::Get(before) = &results[0] else {
        panic!("{results:?}")
    };
    assert_eq!(
        (before.value.as_str(), before.mod_revision, before.revision),
        ("v1", 1, 1)
    );
    let R::Get(after) = &results[2] else {
        panic!("{results:?}")
    };
    assert_eq!(
        (after.value.as_str(), after.mod_revision, after.revision),
        ("v2", 2, 2)
    );
    assert_eq!(reply.revision, 2);
    server.shutdown().await;
}

#[tokio::test]
async fn a_batch_whose_answer_would_pass_max_response_bytes_is_refused_and_applies_nothing() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let value = "x".repeat(MIB);
    client
        .set(SetRequest {
            key: "big".into(),
            value: value.clone(),
            ..SetRequest::default()
        })
        .await
        .unwrap();
    // Four reads of a 1 MiB value, with their framing, pass the default 4 MiB at the fourth.
    let mut ops = vec![set("other", "1")];
    ops.extend(std::iter::repeat_with(|| get("big")).take(500));
    let status = client.batch(batch(ops)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("limits.max_response_bytes") && status.message().contains("op 4"),
        "{}",
        status.message()
    );
    let other = client
        .get(GetRequest {
            key: "other".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!other.found, "nothing of the refused batch is applied");
    assert_eq!(other.revision, 1);
    // Three fit.
    let reply = client
        .batch(batch(vec![get("big"), get("big"), get("big")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.results.len(), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn a_list_page_ends_early_at_max_response_bytes_and_the_cursor_pages_on() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let value = "x".repeat(MIB);
    for i in 0..10 {
        client
            .set(SetRequest {
                key: format!("p/{i}"),
                value: value.clone(),
                ..SetRequest::default()
            })
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut start_after = String::new();
    for _ in 0..10 {
        let page = client
            .list(ListRequest {
                prefix: "p/".into(),
                limit: 100,
                start_after: start_after.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            (1..=3).contains(&page.items.len()),
            "4 MiB holds three 1 MiB values with their framing, got {}",
            page.items.len()
        );
        seen.extend(page.items.iter().map(|kv| kv.key.clone()));
        if !page.more {
            break;
        }
        start_after = page.next_start_after;
    }
    let expected: Vec<String> = (0..10).map(|i| format!("p/{i}")).collect();
    assert_eq!(seen, expected);
    server.shutdown().await;
}

/// Held by the tests that measure this process's RSS, so that neither counts the other's
/// memory (the tests of this binary run on parallel threads).
pub(crate) static MEASURING_RSS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The RSS of this process, which holds the server, in bytes.
pub(crate) fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| {
            kb.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<usize>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Sixteen connections asking for answers of about 500 MB each (Batch) or a page of 10,000
/// values of 1 MiB (List): every Batch is refused and every List page is short, and the
/// server never holds more than the answers in flight, each within the limit.
#[tokio::test]
async fn hostile_callers_asking_for_huge_answers_get_errors_or_short_pages_and_rss_stays_bounded() {
    if !cfg!(target_os = "linux") {
        eprintln!("SKIPPED: reads RSS from /proc");
        return;
    }
    let _measuring = MEASURING_RSS.lock().await;
    let mut settings = test_settings();
    settings.limits.max_batch_ops = 10_000;
    let server = spawn_with(settings).await;
    let mut client = server.client().await;
    let value = "x".repeat(MIB);
    for i in 0..64 {
        client
            .set(SetRequest {
                key: format!("big/{i:02}"),
                value: value.clone(),
                ..SetRequest::default()
            })
            .await
            .unwrap();
    }
    let baseline = rss();
    let seconds = std::env::var("KVSTORE_HOSTILE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut attackers = Vec::new();
    for a in 0..16 {
        let mut client = server.client().await;
        attackers.push(tokio::spawn(async move {
            let (mut refused, mut short) = (0, 0);
            for round in 0..100_000 {
                if Instant::now() >= until {
                    break;
                }
                if (a + round) % 2 == 0 {
                    let ops = (0..500)
                        .map(|i| get(&format!("big/{:02}", i % 64)))
                        .collect();
                    let status = client.batch(batch(ops)).await.unwrap_err();
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    refused += 1;
                } else {
                    let page = client
                        .list(ListRequest {
                            prefix: "big/".into(),
                            limit: 10_000,
                            start_after: String::new(),
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert!(page.more && page.items.len() <= 3, "{}", page.items.len());
                    short += 1;
                }
            }
            (refused, short)
        }));
    }
    let mut peak = baseline;
    let mut answered = (0, 0);
    for attacker in attackers {
        while !attacker.is_finished() {
            peak = peak.max(rss());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (refused, short) = attacker.await.unwrap();
        answered = (answered.0 + refused, answered.1 + short);
    }
    assert!(answered.0 > 0 && answered.1 > 0, "{answered:?}");
    // Sixteen answers of at most 4 MiB in flight, each held about three times (the page,
    // its encoding, the client's copy), plus the allocator's slack: far below the 500 MB a
    // single unbounded Batch took.
    let bound = 16 * 4 * MIB * 3 + 64 * MIB;
    assert!(
        peak - baseline < bound,
        "RSS grew by {} MiB, over the bound of {} MiB",
        (peak - baseline) / MIB,
        bound / MIB
    );
    eprintln!(
        "hostile answers: {} refused batches, {} short pages, RSS +{} MiB (bound {} MiB)",
        answered.0,
        answered.1,
        (peak - baseline) / MIB,
        bound / MIB
    );
    server.shutdown().await;
}

/// A client that reads slowly: HTTP/2 windows of 64 KiB (hyper's own are 2 MiB a stream).
async fn slow_reader(server: &crate::helpers::TestServer) -> KeyValueStoreClient<Channel> {
    let channel = Channel::from_shared(server.grpc_url())
        .unwrap()
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(64 * 1024 * 64)
        .connect()
        .await
        .unwrap();
    KeyValueStoreClient::new(channel)
}

/// Unread snapshots of 200,000 keys each hold a page and what HTTP/2 lets the server send
/// ahead (h2 buffers up to 400 KiB a stream), not a copy of the prefix: before they were
/// paged, each copied it (6.4 MB a stream at this size, 320 MB for the fifty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_snapshots_of_a_large_prefix_hold_a_page_each_not_the_prefix() {
    if !cfg!(target_os = "linux") {
        eprintln!("SKIPPED: reads RSS from /proc");
        return;
    }
    let _measuring = MEASURING_RSS.lock().await;
    let mut settings = test_settings();
    settings.subscriptions.max = 200;
    settings.subscriptions.max_per_client = 200;
    let server = spawn_with(settings).await;
    for i in 0..200_000 {
        server
            .store
            .set(
                format!("k/{i:06}"),
                "v".into(),
                kvstore::store::SetOptions::default(),
            )
            .unwrap();
    }
    let baseline = rss();
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut client = slow_reader(&server).await;
        for _ in 0..25 {
            let request = SubscribeRequest {
                key_pattern: "k/".into(),
                initial: true,
                ..SubscribeRequest::default()
            };
            let mut stream = client.subscribe(request).await.unwrap().into_inner();
            // One message read: the snapshot has begun, and the rest is left unread.
            let first = stream.message().await.unwrap().unwrap();
            assert!(first.initial && first.key == "k/000000", "{first:?}");
            streams.push(stream);
        }
    }
    let grown = rss().saturating_sub(baseline);
    eprintln!(
        "50 unread snapshots of 200,000 keys: RSS +{} MiB",
        grown / MIB
    );
    assert!(
        grown < 64 * MIB,
        "50 unread snapshots grew RSS by {} MiB",
        grown / MIB
    );
    drop(streams);
    server.shutdown().await;
}

/// A snapshot cut short by its queue filling up says so: the client asks for one again.
#[tokio::test]
async fn a_snapshot_cut_short_by_lag_says_to_subscribe_again_with_initial() {
    let mut settings = test_settings();
    settings.subscriptions.buffer = 4;
    let server = spawn_with(settings).await;
    let value = "v".repeat(1024);
    for i in 0..2_000 {
        server
            .store
            .set(
                format!("s/{i:04}"),
                value.clone(),
                kvstore::store::SetOptions::default(),
            )
            .unwrap();
    }
    let mut client = slow_reader(&server).await;
    let request = SubscribeRequest {
        key_pattern: "s/".into(),
        initial: true,
        ..SubscribeRequest::default()
    };
    let mut stream = client.subscribe(request).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().unwrap().initial);
    // The client's window and h2's send buffer hold the server back long before 2 MB of
    // snapshot, so these five changes find the four places of its queue full.
    for i in 0..5 {
        server
            .store
            .set(
                format!("s/{i:04}"),
                "new".into(),
                kvstore::store::SetOptions::default(),
            )
            .unwrap();
    }
    let mut initial = 1;
    let status = loop {
        match stream.message().await {
            Ok(Some(event)) => {
                assert!(event.initial, "no end marker after a lag: {event:?}");
                initial += 1;
                assert!(initial < 2_000, "the whole snapshot came through");
            }
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("subscribe again with initial"),
        "{}",
        status.message()
    );
    server.shutdown().await;
}
