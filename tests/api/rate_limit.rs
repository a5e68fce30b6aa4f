//! The per-client rate limit and the HTTP body limit, end to end: refusals are immediate and
//! say when to retry, buckets are per token or per peer address, refill, and never count
//! health checks or a Subscribe's events; a Subscribe's snapshot counts by the keys it covers.

use std::net::IpAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use kvstore::config::{RateLimitSettings, Settings};
use kvstore::pb::change_event::ChangeType;
use kvstore::pb::key_value_store_client::KeyValueStoreClient;
use kvstore::pb::{GetRequest, SubscribeRequest};
use kvstore::rate_limit::ENTRIES_PER_REQUEST;
use kvstore::token::BearerToken;
use tokio::time::{Instant, timeout};
use tonic::Code;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;

use crate::auth::{READER, WRITER, auth_settings, client_with};
use crate::helpers::{PATIENCE, TestServer, http_exchange, spawn_with, test_settings};

fn limited(mut settings: Settings, per_client: u32, burst: u32) -> Settings {
    settings.rate_limit = RateLimitSettings { per_client, burst };
    settings
}

fn get() -> GetRequest {
    GetRequest { key: "k".into() }
}

/// The wait a refusal names in its `grpc-retry-pushback-ms` trailer.
fn pushback(status: &tonic::Status) -> Duration {
    let ms = status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("a pushback trailer");
    Duration::from_millis(ms.to_str().unwrap().parse().unwrap())
}

#[tokio::test]
async fn a_client_past_its_rate_is_refused_at_once_while_another_is_not_and_then_refills() {
    let server = spawn_with(limited(auth_settings(), 1, 3)).await;
    let mut busy = client_with(&server, Some(WRITER)).await;
    for _ in 0..3 {
        busy.get(get()).await.unwrap();
    }
    let started = Instant::now();
    let status = busy.get(get()).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("rate limit of 1 requests/s per client exceeded (rate_limit.per_client)"),
        "{status:?}"
    );
    let wait = pushback(&status);
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(1),
        "{wait:?}"
    );
    assert!(
        took < wait,
        "refused at once ({took:?}), not queued for {wait:?}"
    );

    // Another token has its own bucket, even on the same address.
    client_with(&server, Some(READER))
        .await
        .get(get())
        .await
        .unwrap();

    // Waiting as long as the refusal said is enough; a loaded machine may need another try.
    let deadline = Instant::now() + PATIENCE;
    let mut wait = wait;
    loop {
        tokio::time::sleep(wait).await;
        match busy.get(get()).await {
            Ok(_) => break,
            Err(status)
                if status.code() == Code::ResourceExhausted && Instant::now() < deadline =>
            {
                wait = pushback(&status);
            }
            Err(status) => panic!("the bucket did not refill: {status:?}"),
        }
    }
    server.shutdown().await;
}

/// A client connecting from `source`, another loopback address than the default one.
async fn client_from(
    server: &TestServer,
    source: &str,
) -> KeyValueStoreClient<tonic::transport::Channel> {
    let channel = Endpoint::from_shared(server.grpc_url())
        .unwrap()
        .local_address(Some(source.parse::<IpAddr>().unwrap()))
        .connect()
        .await
        .unwrap();
    KeyValueStoreClient::new(channel)
}

#[tokio::test]
async fn without_auth_each_peer_address_has_its_own_bucket() {
    let server = spawn_with(limited(test_settings(), 1, 1)).await;
    let mut first = client_from(&server, "127.0.0.1").await;
    first.get(get()).await.unwrap();
    let status = first.get(get()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    // A second connection from the same address shares the bucket.
    let status = client_from(&server, "127.0.0.1")
        .await
        .get(get())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    client_from(&server, "127.0.0.2")
        .await
        .get(get())
        .await
        .unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_and_missing_tokens_take_from_their_address_bucket() {
    let server = spawn_with(limited(auth_settings(), 1, 2)).await;
    let with_token = async |source: &str, token: &str| {
        let channel = Endpoint::from_shared(server.grpc_url())
            .unwrap()
            .local_address(Some(source.parse::<IpAddr>().unwrap()))
            .connect()
            .await
            .unwrap();
        KeyValueStoreClient::with_interceptor(channel, BearerToken::parse(token).unwrap())
    };
    let mut intruder = with_token("127.0.0.1", "not-a-configured-token").await;
    for _ in 0..2 {
        let status = intruder.get(get()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    let status = intruder.get(get()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("(rate_limit.per_client)"),
        "{status:?}"
    );
    // No token at all is the same address's bucket.
    let status = client_from(&server, "127.0.0.1")
        .await
        .get(get())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // Another address is not throttled, nor is a valid token on the flooding address.
    let status = with_token("127.0.0.2", "not-a-configured-token")
        .await
        .get(get())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    with_token("127.0.0.1", READER)
        .await
        .get(get())
        .await
        .expect("a token's own bucket");
    server.shutdown().await;
}

#[tokio::test]
async fn a_subscription_counts_once_and_health_checks_never() {
    let server = spawn_with(limited(test_settings(), 1, 1)).await;
    let mut client = server.client().await;
    let mut events = client
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let status = client.get(get()).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "the bucket is empty"
    );
    for i in 0..5 {
        server
            .store
            .set(format!("k{i}"), "v".into(), Default::default())
            .unwrap();
        let event = timeout(PATIENCE, events.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(event.key, format!("k{i}"));
    }

    let mut health = server.health_client().await;
    for _ in 0..5 {
        health.check(HealthCheckRequest::default()).await.unwrap();
        for path in ["/health/live", "/health/ready"] {
            let (status, _) =
                crate::helpers::http_get(&format!("{}{path}", server.grpc_url()), false).await;
            assert_eq!(status, http::StatusCode::OK);
        }
    }
    server.shutdown().await;
}

/// Keys under the prefix of the snapshot test: six requests' worth of work.
const SNAPSHOT_KEYS: u64 = 6 * ENTRIES_PER_REQUEST;

#[tokio::test]
async fn a_snapshot_pays_by_the_keys_it_covers_and_waits_while_another_client_is_served() {
    // 2 requests a second, 3 at once: the Subscribe takes one, the snapshot the two left
    // and four more, for which its stream waits about two seconds.
    let server = spawn_with(limited(test_settings(), 2, 3)).await;
    for i in 0..SNAPSHOT_KEYS {
        server
            .store
            .set(format!("snap/{i:05}"), "v".into(), Default::default())
            .unwrap();
    }
    let mut subscriber = client_from(&server, "127.0.0.1").await;
    let started = Instant::now();
    let request = SubscribeRequest {
        key_pattern: "snap/".into(),
        initial: true,
        ..SubscribeRequest::default()
    };
    let mut events = subscriber.subscribe(request).await.unwrap().into_inner();
    let mut initial = 0;
    loop {
        let event = timeout(PATIENCE, events.message())
            .await
            .expect("the snapshot goes on in time")
            .expect("past its rate the stream waits rather than fails")
            .expect("the stream stays open");
        if event.change_type() == ChangeType::Progress {
            break;
        }
        assert!(event.initial, "{event:?}");
        initial += 1;
    }
    let took = started.elapsed();
    assert_eq!(initial, SNAPSHOT_KEYS, "every key, then the end marker");
    assert!(
        took >= Duration::from_millis(1500),
        "four requests' worth past the burst at 2 a second, in {took:?}"
    );

    // The snapshot spent the subscriber's bucket, as calls of its own would have...
    let status = subscriber.get(get()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // ...and no one else's.
    client_from(&server, "127.0.0.2")
        .await
        .get(get())
        .await
        .expect("another client is not affected");
    server.shutdown().await;
}

#[tokio::test]
async fn http_refusals_are_429_with_retry_after() {
    let server = spawn_with(limited(test_settings(), 1, 1)).await;
    let url = format!("{}/nope", server.grpc_url());
    let (status, _) = crate::helpers::http_get(&url, false).await;
    assert_eq!(status, http::StatusCode::NOT_FOUND);
    let request = http::Request::get(&url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (head, body) = http_exchange(request).await;
    assert_eq!(head.status, http::StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(head.headers["retry-after"], "1");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("(rate_limit.per_client)"),
        "{body}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn an_http_body_over_the_limit_gets_413_naming_the_limit() {
    let mut settings = test_settings();
    settings.limits.max_http_body_bytes = 16;
    let server = spawn_with(settings).await;
    for base in [server.grpc_url(), server.health_url()] {
        let post = |body: &'static str| {
            http::Request::post(format!("{base}/health/live"))
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap()
        };
        let (head, body) = http_exchange(post("seventeen bytes!!")).await;
        assert_eq!(head.status, http::StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        assert!(
            body.contains("over the limit of 16 bytes (limits.max_http_body_bytes)"),
            "{body}"
        );
        let (head, _) = http_exchange(post("sixteen bytes!!!")).await;
        assert_eq!(
            head.status,
            http::StatusCode::METHOD_NOT_ALLOWED,
            "within the limit"
        );
    }
    server.shutdown().await;
}
