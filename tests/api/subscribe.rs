//! Subscribe over gRPC: prefix matching, race-free registration, per-key order, lag, the
//! subscription cap and release on disconnect.

use std::collections::HashMap;
use std::time::Duration;

use kvstore::pb::change_event::ChangeType;
use kvstore::pb::key_value_store_client::KeyValueStoreClient;
use kvstore::pb::{ChangeEvent, GetRequest, SetRequest, SubscribeRequest};
use kvstore::store::SetOptions;
use tokio::time::timeout;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

use crate::helpers::{PATIENCE, spawn_server, spawn_with, test_settings};

async fn subscribe(
    client: &mut KeyValueStoreClient<Channel>,
    pattern: &str,
) -> Streaming<ChangeEvent> {
    client
        .subscribe(SubscribeRequest {
            key_pattern: pattern.into(),
            ..SubscribeRequest::default()
        })
        .await
        .expect("subscribe is accepted")
        .into_inner()
}

async fn set(client: &mut KeyValueStoreClient<Channel>, key: &str, value: &str) {
    client
        .set(SetRequest {
            key: key.into(),
            value: value.into(),
            ..SetRequest::default()
        })
        .await
        .expect("set succeeds");
}

async fn next(stream: &mut Streaming<ChangeEvent>) -> Result<ChangeEvent, Status> {
    timeout(PATIENCE, stream.message())
        .await
        .expect("an event or status in time")
        .map(|event| event.expect("the stream is still open"))
}

#[tokio::test]
async fn a_subscriber_sees_later_sets_under_its_prefix_only() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let mut users = subscribe(&mut client, "user:").await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for (key, value) in [
        ("user:1", "Alice"),
        ("users", "no"),
        ("order:1", "no"),
        ("user:2", "Bob"),
    ] {
        set(&mut client, key, value).await;
    }
    let first = next(&mut users).await.unwrap();
    assert_eq!(first.change_type(), ChangeType::Set);
    assert_eq!(
        (first.key.as_str(), first.value.as_str()),
        ("user:1", "Alice")
    );
    assert!(
        first.timestamp >= before && first.timestamp < before + 60_000,
        "{}",
        first.timestamp
    );
    let second = next(&mut users).await.unwrap();
    assert_eq!(
        (second.key.as_str(), second.value.as_str()),
        ("user:2", "Bob")
    );
    // Nothing else arrives: the non-matching keys were never sent.
    assert!(
        timeout(Duration::from_millis(200), users.message())
            .await
            .is_err()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn an_empty_pattern_matches_every_key() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let mut all = subscribe(&mut client, "").await;
    for key in ["a", "user:1", "zz"] {
        set(&mut client, key, "v").await;
    }
    for key in ["a", "user:1", "zz"] {
        assert_eq!(next(&mut all).await.unwrap().key, key);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_set_made_right_after_subscribe_returns_is_never_missed() {
    let server = spawn_server().await;
    let mut subscriber = server.client().await;
    let mut writer = server.client().await;
    for i in 0..20 {
        let key = format!("race:{i}");
        let mut stream = subscribe(&mut subscriber, &key).await;
        set(&mut writer, &key, "v").await;
        assert_eq!(next(&mut stream).await.unwrap().key, key);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn racing_writers_leave_every_subscriber_agreeing_with_get() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let mut streams = Vec::new();
    for pattern in ["", "hot", "hot:1"] {
        streams.push(subscribe(&mut client, pattern).await);
    }
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let mut client = client.clone();
            tokio::spawn(async move {
                for i in 0..150 {
                    set(&mut client, &format!("hot:{}", i % 3), &format!("{w}:{i}")).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let expected_counts = [600, 600, 200];
    for (stream, expected) in streams.iter_mut().zip(expected_counts) {
        let mut last = HashMap::new();
        let mut per_writer: HashMap<(String, String), i64> = HashMap::new();
        let mut last_revision = 0;
        for _ in 0..expected {
            let event = next(stream).await.unwrap();
            assert!(
                event.revision > last_revision,
                "revisions strictly increase"
            );
            last_revision = event.revision;
            // Each writer's own writes to a key arrive in the order it made them.
            let (w, i) = event.value.split_once(':').unwrap();
            let i: i64 = i.parse().unwrap();
            let seen = per_writer
                .entry((event.key.clone(), w.to_owned()))
                .or_insert(-1);
            assert!(
                i > *seen,
                "writer {w} went back from {seen} to {i} on {}",
                event.key
            );
            *seen = i;
            last.insert(event.key, event.value);
        }
        for (key, value) in last {
            let got = client
                .get(GetRequest { key: key.clone() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                got.value, value,
                "the last event for {key} carries the stored value"
            );
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_is_ended_with_resource_exhausted_and_no_gap() {
    let mut settings = test_settings();
    settings.subscriptions.buffer = 4;
    let server = spawn_with(settings).await;
    let mut client = server.client().await;
    let mut slow = subscribe(&mut client, "lag:").await;
    // The subscriber reads nothing while far more than HTTP/2 flow control and its buffer
    // can hold is written, so it must lag.
    let value = "x".repeat(64 * 1024);
    for i in 0..400 {
        let value = format!("{i:04}{value}");
        let key = format!("lag:{i:04}");
        server.store.set(key, value, SetOptions::default()).unwrap();
    }
    let mut received = 0;
    let status = loop {
        match next(&mut slow).await {
            Ok(event) => {
                assert_eq!(
                    event.key,
                    format!("lag:{received:04}"),
                    "events arrive without a gap"
                );
                received += 1;
            }
            Err(status) => break status,
        }
    };
    assert!(received < 400);
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("fell behind by"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("subscriptions.buffer"),
        "{}",
        status.message()
    );
    assert!(
        timeout(PATIENCE, slow.message())
            .await
            .unwrap()
            .unwrap()
            .is_none()
    );
    server.wait_for_subscriptions(0).await;
    server.shutdown().await;
}

#[tokio::test]
async fn subscriptions_past_the_cap_are_refused_until_one_closes() {
    let mut settings = test_settings();
    settings.subscriptions.max = 2;
    settings.subscriptions.max_per_client = 2;
    let server = spawn_with(settings).await;
    let mut client = server.client().await;
    let first = subscribe(&mut client, "a").await;
    let _second = subscribe(&mut client, "b").await;
    // From another address, so that it is the server's cap that refuses, not a share.
    let another = Endpoint::from_shared(server.grpc_url())
        .unwrap()
        .local_address(Some([127, 0, 0, 2].into()))
        .connect()
        .await
        .unwrap();
    let mut another = KeyValueStoreClient::new(another);
    let status = another
        .subscribe(SubscribeRequest {
            key_pattern: "c".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("(subscriptions.max)"),
        "{}",
        status.message()
    );
    drop(first);
    server.wait_for_subscriptions(1).await;
    let _third = subscribe(&mut another, "c").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_goes_away_frees_its_subscription() {
    let server = spawn_server().await;
    {
        let mut client = server.client().await;
        let _stream = subscribe(&mut client, "p").await;
        let _other = subscribe(&mut client, "").await;
        server.wait_for_subscriptions(2).await;
    }
    server.wait_for_subscriptions(0).await;
    // Writes after the disconnect have nobody to deliver to and still succeed.
    set(&mut server.client().await, "p1", "v").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_long_stream_outlives_the_unary_request_timeout() {
    let mut settings = test_settings();
    settings.server.request_timeout = Duration::from_millis(100);
    let server = spawn_with(settings).await;
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, "t").await;
    // Deliberately longer than the request timeout: the stream must survive it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    set(&mut client, "t1", "v").await;
    assert_eq!(next(&mut stream).await.unwrap().key, "t1");
    server.shutdown().await;
}

#[tokio::test]
async fn an_oversize_pattern_is_refused() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let status = client
        .subscribe(SubscribeRequest {
            key_pattern: "p".repeat(5000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    server.shutdown().await;
}

fn from(pattern: &str, start_revision: i64) -> SubscribeRequest {
    SubscribeRequest {
        key_pattern: pattern.into(),
        start_revision,
        ..SubscribeRequest::default()
    }
}

async fn open(
    client: &mut KeyValueStoreClient<Channel>,
    request: SubscribeRequest,
) -> Result<Streaming<ChangeEvent>, Status> {
    client.subscribe(request).await.map(|r| r.into_inner())
}

#[tokio::test]
async fn resuming_from_a_revision_replays_then_continues_live_without_gap_or_duplicate() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    for i in 1..=5 {
        set(&mut client, &format!("r{}", i % 2), &i.to_string()).await;
    }
    let mut stream = open(&mut client, from("r", 3)).await.unwrap();
    let mut odd = open(&mut client, from("r1", 2)).await.unwrap();
    set(&mut client, "r1", "6").await;
    for expected in 3..=6 {
        assert_eq!(next(&mut stream).await.unwrap().revision, expected);
    }
    for expected in [3, 5, 6] {
        assert_eq!(next(&mut odd).await.unwrap().revision, expected);
    }
    // A future revision waits for it.
    let mut future = open(&mut client, from("", 8)).await.unwrap();
    set(&mut client, "x", "7").await;
    set(&mut client, "x", "8").await;
    let event = next(&mut future).await.unwrap();
    assert_eq!((event.revision, event.value.as_str()), (8, "8"));
    server.shutdown().await;
}

#[tokio::test]
async fn a_revision_older_than_the_history_is_out_of_range_naming_the_oldest_kept() {
    let mut settings = test_settings();
    settings.history.max_events = 2;
    let server = spawn_with(settings).await;
    let mut client = server.client().await;
    for i in 0..5 {
        set(&mut client, "h", &i.to_string()).await;
    }
    let status = open(&mut client, from("", 2)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(
        status
            .message()
            .contains("oldest revision still available is 4"),
        "{}",
        status.message()
    );
    assert_eq!(
        status.metadata().get("kvstore-oldest-revision").unwrap(),
        "4"
    );
    let mut kept = open(&mut client, from("", 4)).await.unwrap();
    assert_eq!(next(&mut kept).await.unwrap().revision, 4);
    let status = open(&mut client, from("", -1)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    server.shutdown().await;
}

#[tokio::test]
async fn initial_sends_a_snapshot_then_a_progress_marker_then_live_changes() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    set(&mut client, "s/b", "1").await;
    set(&mut client, "s/a", "2").await;
    set(&mut client, "other", "3").await;
    set(&mut client, "s/b", "4").await;
    let request = SubscribeRequest {
        key_pattern: "s/".into(),
        initial: true,
        ..Default::default()
    };
    let mut stream = open(&mut client, request).await.unwrap();
    set(&mut client, "s/c", "5").await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let e = next(&mut stream).await.unwrap();
        seen.push((e.change_type(), e.key, e.value, e.revision, e.initial));
    }
    assert_eq!(
        seen,
        [
            (ChangeType::Set, "s/a".to_owned(), "2".to_owned(), 2, true),
            (ChangeType::Set, "s/b".to_owned(), "4".to_owned(), 4, true),
            (ChangeType::Progress, String::new(), String::new(), 4, false),
            (ChangeType::Set, "s/c".to_owned(), "5".to_owned(), 5, false),
        ]
    );
    let both = SubscribeRequest {
        initial: true,
        start_revision: 1,
        ..Default::default()
    };
    assert_eq!(
        open(&mut client, both).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    server.shutdown().await;
}

#[tokio::test]
async fn an_idle_stream_that_asked_for_progress_gets_the_current_revision() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    set(&mut client, "elsewhere", "1").await;
    let request = SubscribeRequest {
        key_pattern: "quiet".into(),
        progress_interval_ms: 100,
        ..Default::default()
    };
    let mut stream = open(&mut client, request).await.unwrap();
    let progress = next(&mut stream).await.unwrap();
    assert_eq!(
        (progress.change_type(), progress.revision),
        (ChangeType::Progress, 1)
    );
    set(&mut client, "elsewhere", "2").await;
    set(&mut client, "quiet", "3").await;
    let change = next(&mut stream).await.unwrap();
    assert_eq!(
        (change.change_type(), change.revision),
        (ChangeType::Set, 3)
    );
    let progress = next(&mut stream).await.unwrap();
    assert_eq!(
        (progress.change_type(), progress.revision),
        (ChangeType::Progress, 3)
    );
    for bad in [-1, 10] {
        let request = SubscribeRequest {
            progress_interval_ms: bad,
            ..Default::default()
        };
        assert_eq!(
            open(&mut client, request).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_lagged_subscriber_resumes_from_the_revision_in_its_status_without_a_gap() {
    let mut settings = test_settings();
    settings.subscriptions.buffer = 2;
    let server = spawn_with(settings).await;
    let mut client = server.client().await;
    // Written before subscribing: even a subscriber that lags before receiving anything is
    // told it is current to revision 3, not 0.
    for i in 1..=3 {
        set(&mut client, "before", &i.to_string()).await;
    }
    let mut slow = subscribe(&mut client, "").await;
    let value = "x".repeat(64 * 1024);
    for i in 4..=303 {
        server
            .store
            .set(
                format!("k{}", i % 10),
                format!("{i}{value}"),
                SetOptions::default(),
            )
            .unwrap();
    }
    let mut revisions = Vec::new();
    let status = loop {
        match next(&mut slow).await {
            Ok(event) => revisions.push(event.revision),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted);
    let last: i64 = status
        .metadata()
        .get("kvstore-last-revision")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(last, revisions.last().copied().unwrap_or(3));
    assert!(
        status
            .message()
            .contains(&format!("resume with start_revision {}", last + 1)),
        "{}",
        status.message()
    );
    let mut resumed = open(&mut client, from("", last + 1)).await.unwrap();
    while revisions.len() < 300 {
        revisions.push(next(&mut resumed).await.unwrap().revision);
    }
    assert_eq!(
        revisions,
        (4..=303).collect::<Vec<i64>>(),
        "every revision exactly once"
    );
    server.shutdown().await;
}
