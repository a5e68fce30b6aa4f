//! What one client may hold open, so that it cannot take what the others share: its share of
//! the Subscribe streams (`subscriptions.max_per_client`), the PROGRESS events of its
//! streams (and of all clients' together), and the unauthenticated health Watch streams (`server.max_health_watches`).

use std::net::IpAddr;
use std::time::Duration;

use kvstore::pb::change_event::ChangeType;
use kvstore::pb::key_value_store_client::KeyValueStoreClient;
use kvstore::pb::{ChangeEvent, SubscribeRequest};
use tokio::time::{Instant, timeout};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};
use tonic_health::pb::HealthCheckRequest;

use crate::auth::{READER, WRITER, auth_settings, client_with};
use crate::helpers::{PATIENCE, TestServer, spawn_with, test_settings};
use crate::metrics::scrape;

const SHARE_REFUSAL: &str = "subscriptions.max_per_client";

fn everything() -> SubscribeRequest {
    SubscribeRequest::default()
}

/// A client whose connection comes from `source`, a loopback address.
async fn client_from(server: &TestServer, source: &str) -> KeyValueStoreClient<Channel> {
    let channel = Endpoint::from_shared(server.grpc_url())
        .unwrap()
        .local_address(Some(source.parse::<IpAddr>().unwrap()))
        .connect()
        .await
        .unwrap();
    KeyValueStoreClient::new(channel)
}

async fn open(client: &mut KeyValueStoreClient<Channel>) -> Streaming<ChangeEvent> {
    client
        .subscribe(everything())
        .await
        .expect("within the client's share")
        .into_inner()
}

#[tokio::test]
async fn a_client_at_its_share_is_refused_while_another_address_subscribes_until_one_ends() {
    let mut settings = test_settings();
    settings.subscriptions.max_per_client = 2;
    let server = spawn_with(settings).await;
    let mut hog = client_from(&server, "127.0.0.1").await;
    let first = open(&mut hog).await;
    let _second = open(&mut hog).await;

    let refused = hog.subscribe(everything()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains(SHARE_REFUSAL), "{refused:?}");

    // Another address has a share of its own, though the server's cap is far off.
    let mut other = client_from(&server, "127.0.0.2").await;
    let _others = open(&mut other).await;
    let _more = open(&mut other).await;

    let metrics = scrape(&server.health_url(), None).await;
    assert_eq!(metrics.refusals(SHARE_REFUSAL), 1.0);
    assert_eq!(metrics.refusals("subscriptions.max"), 0.0);

    // A stream that ends gives its place back.
    drop(first);
    server.wait_for_subscriptions(3).await;
    let _again = open(&mut hog).await;
    server.shutdown().await;
}

#[tokio::test]
async fn with_authentication_each_token_has_its_own_share_on_one_address() {
    let mut settings = auth_settings();
    settings.subscriptions.max_per_client = 1;
    let server = spawn_with(settings).await;
    let mut reader = client_with(&server, Some(READER)).await;
    let _held = reader.subscribe(everything()).await.unwrap().into_inner();
    let refused = reader.subscribe(everything()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains(SHARE_REFUSAL), "{refused:?}");

    let mut writer = client_with(&server, Some(WRITER)).await;
    writer
        .subscribe(everything())
        .await
        .expect("another token, the same address");
    server.shutdown().await;
}

/// The time between the first two PROGRESS events of `stream`.
async fn progress_interval(stream: &mut Streaming<ChangeEvent>) -> Duration {
    let mut next_progress = async || {
        let event = timeout(PATIENCE, stream.message())
            .await
            .expect("a PROGRESS event in time")
            .unwrap()
            .expect("the stream goes on");
        assert_eq!(event.change_type(), ChangeType::Progress, "{event:?}");
        Instant::now()
    };
    let first = next_progress().await;
    next_progress().await - first
}

#[tokio::test]
async fn a_client_with_many_streams_gets_each_ones_progress_less_often() {
    let server = spawn_with(test_settings()).await;
    let mut client = client_from(&server, "127.0.0.1").await;
    let every_100_ms = SubscribeRequest {
        progress_interval_ms: 100,
        ..SubscribeRequest::default()
    };
    // Up to ten streams get what they ask for (100 PROGRESS events a second in all); with
    // 30 open, each gets one every 300 ms.
    let mut streams = Vec::new();
    for _ in 0..30 {
        let stream = client.subscribe(every_100_ms.clone()).await.unwrap();
        streams.push(stream.into_inner());
    }
    let last = streams.last_mut().expect("30 streams");
    let crowded = progress_interval(last).await;
    // Below 300 ms by at most the first event's delay on the way; far above 100 ms.
    assert!(crowded >= Duration::from_millis(250), "{crowded:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn progress_of_every_client_together_is_bounded_too() {
    let server = spawn_with(test_settings()).await;
    let every_100_ms = SubscribeRequest {
        progress_interval_ms: 100,
        ..SubscribeRequest::default()
    };
    // 20 clients with 60 streams each: each client's own budget would give each of its
    // streams a PROGRESS event every 600 ms (2,000 a second in all); the server's, 1,000 a
    // second for the 1,200 streams, one every 1.2 s.
    let mut streams = Vec::new();
    for client in 1..=20 {
        let mut client = client_from(&server, &format!("127.0.0.{client}")).await;
        for _ in 0..60 {
            let stream = client.subscribe(every_100_ms.clone()).await.unwrap();
            streams.push(stream.into_inner());
        }
    }
    let last = streams.last_mut().expect("1,200 streams");
    let crowded = progress_interval(last).await;
    // Below 1.2 s by at most the first event's delay on the way; far above 600 ms.
    assert!(crowded >= Duration::from_millis(1100), "{crowded:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn health_watches_past_their_cap_are_refused_while_checks_answer() {
    let mut settings = test_settings();
    settings.server.max_health_watches = 2;
    let server = spawn_with(settings).await;
    let first = server.watch_health().await;
    let _second = server.watch_health().await;

    let mut health = server.health_client().await;
    let whole_server = || HealthCheckRequest {
        service: String::new(),
    };
    let refused = health.watch(whole_server()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("server.max_health_watches"),
        "{refused:?}"
    );
    health
        .check(whole_server())
        .await
        .expect("Check is not capped");
    let metrics = scrape(&server.health_url(), None).await;
    assert_eq!(metrics.refusals("server.max_health_watches"), 1.0);

    // The server learns of the cancelled stream in its own time; until then, refused.
    drop(first);
    let deadline = Instant::now() + PATIENCE;
    loop {
        match health.watch(whole_server()).await {
            Ok(_) => break,
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(Instant::now() < deadline, "the place was never given back");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    server.shutdown().await;
}
