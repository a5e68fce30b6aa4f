//! `GET /metrics`: scraped over HTTP from the real server after known traffic, every counter
//! has exactly the value that traffic implies.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kvstore::pb::key_value_store_client::KeyValueStoreClient;
use kvstore::pb::{
    BatchOp, BatchRequest, GetRequest, GetResponse, SetRequest, SubscribeRequest, batch_op,
};
use kvstore::store::SetOptions;
use tokio::time::timeout;
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{PATIENCE, spawn_server, spawn_with, test_settings};

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// What Prometheus itself sends.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// One scrape: its content type, its text, and each sample by its series as printed
/// (`name{label="value",...}`).
pub(crate) struct Scrape {
    content_type: String,
    text: String,
    samples: HashMap<String, f64>,
}

impl Scrape {
    pub(crate) fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no sample {series} in:\n{}", self.text))
    }

    fn calls(&self, method: &str, code: &str) -> f64 {
        self.get(&format!(
            "kvstore_grpc_requests_total{{method=\"{method}\",code=\"{code}\"}}"
        ))
    }

    pub(crate) fn refusals(&self, limit: &str) -> f64 {
        self.get(&format!(
            "kvstore_limit_refusals_total{{limit=\"{limit}\"}}"
        ))
    }

    fn connections(&self, listener: &str) -> f64 {
        self.get(&format!(
            "kvstore_connections_open{{listener=\"{listener}\"}}"
        ))
    }

    /// The sum of every sample of `name` (all its label sets).
    fn total(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(series, _)| series.split('{').next() == Some(name))
            .map(|(_, v)| v)
            .sum()
    }
}

pub(crate) async fn scrape(base: &str, accept: Option<&str>) -> Scrape {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut request = http::Request::get(format!("{base}/metrics"));
    if let Some(accept) = accept {
        request = request.header(http::header::ACCEPT, accept);
    }
    let response = timeout(
        PATIENCE,
        client.request(request.body(Empty::new()).unwrap()),
    )
    .await
    .expect("a scrape answered in time")
    .expect("a scrape answered");
    assert_eq!(response.status(), http::StatusCode::OK);
    let content_type = response.headers()[http::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let samples = text
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
            (series.to_owned(), value)
        })
        .collect();
    Scrape {
        content_type,
        text,
        samples,
    }
}

async fn set(
    client: &mut KeyValueStoreClient<Channel>,
    key: &str,
    value: &str,
    expected_mod_revision: Option<i64>,
) -> Result<(), tonic::Status> {
    let request = SetRequest {
        key: key.into(),
        value: value.into(),
        expected_mod_revision,
        ..SetRequest::default()
    };
    client.set(request).await.map(|_| ())
}

async fn get(client: &mut KeyValueStoreClient<Channel>, key: &str) -> Result<(), tonic::Status> {
    client.get(GetRequest { key: key.into() }).await.map(|_| ())
}

fn subscribe_to(pattern: &str) -> SubscribeRequest {
    SubscribeRequest {
        key_pattern: pattern.into(),
        ..SubscribeRequest::default()
    }
}

#[tokio::test]
async fn after_known_traffic_every_counter_has_exactly_the_expected_value() {
    let mut settings = test_settings();
    settings.limits.max_value_bytes = 16;
    settings.limits.max_batch_ops = 2;
    settings.subscriptions.max = 2;
    settings.subscriptions.max_per_client = 1;
    let server = spawn_with(settings).await;
    let channel = server.channel().await;
    let mut client = KeyValueStoreClient::new(channel.clone());

    let mut users = client
        .subscribe(subscribe_to("user:"))
        .await
        .unwrap()
        .into_inner();
    set(&mut client, "user:1", "Alice", None).await.unwrap();
    set(&mut client, "user:2", "Bob", None).await.unwrap();
    set(&mut client, "other", "x", None).await.unwrap();
    for key in ["user:1", "user:2"] {
        let event = timeout(PATIENCE, users.message()).await.unwrap().unwrap();
        assert_eq!(event.unwrap().key, key);
    }
    for key in ["user:1", "user:1", "user:1", "missing"] {
        get(&mut client, key).await.unwrap();
    }
    for _ in 0..2 {
        let status = get(&mut client, "").await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    let too_long = "v".repeat(17);
    let status = set(&mut client, "k", &too_long, None).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = set(&mut client, "user:1", "A", Some(99)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let op = BatchOp {
        op: Some(batch_op::Op::Get(GetRequest { key: "a".into() })),
    };
    let batch = BatchRequest {
        ops: vec![op.clone(), op.clone(), op],
    };
    let status = client.batch(batch).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = client.subscribe(subscribe_to("")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    client
        .delete(kvstore::pb::DeleteRequest {
            key: "other".into(),
            expected_mod_revision: None,
        })
        .await
        .unwrap();
    let mut raw = tonic::client::Grpc::new(channel.clone());
    raw.ready().await.unwrap();
    let status = raw
        .unary(
            tonic::Request::new(GetRequest { key: "a".into() }),
            http::uri::PathAndQuery::from_static("/kvstore.KeyValueStore/Nope"),
            tonic_prost::ProstCodec::<GetRequest, GetResponse>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);

    // Scraped on the legacy listener, so the main one holds only the gRPC connection.
    let m = scrape(&server.health_url(), None).await;
    let calls = [
        ("Get", "OK", 4.0),
        ("Get", "INVALID_ARGUMENT", 2.0),
        ("Set", "OK", 3.0),
        ("Set", "INVALID_ARGUMENT", 1.0),
        ("Set", "FAILED_PRECONDITION", 1.0),
        ("Batch", "INVALID_ARGUMENT", 1.0),
        ("Subscribe", "RESOURCE_EXHAUSTED", 1.0),
        ("Delete", "OK", 1.0),
        ("unknown", "UNIMPLEMENTED", 1.0),
    ];
    for (method, code, n) in calls {
        assert_eq!(m.calls(method, code), n, "{method} {code}");
    }
    // Nothing else, in particular not the open Subscribe, nor health checks or reflection.
    let all: f64 = calls.iter().map(|c| c.2).sum();
    assert_eq!(m.total("kvstore_grpc_requests_total"), all);

    for (method, n) in [("Get", 6.0), ("Set", 5.0), ("Delete", 1.0), ("Batch", 1.0)] {
        let count = m.get(&format!(
            "kvstore_grpc_request_duration_seconds_count{{method=\"{method}\"}}"
        ));
        assert_eq!(count, n, "{method}");
        let inf = m.get(&format!(
            "kvstore_grpc_request_duration_seconds_bucket{{method=\"{method}\",le=\"+Inf\"}}"
        ));
        assert_eq!(inf, n, "{method}");
        let sum = m.get(&format!(
            "kvstore_grpc_request_duration_seconds_sum{{method=\"{method}\"}}"
        ));
        assert!(
            sum > 0.0 && sum < PATIENCE.as_secs_f64() * n,
            "{method}: {sum}"
        );
    }
    assert!(
        !m.text
            .contains("kvstore_grpc_request_duration_seconds_count{method=\"Subscribe\"}"),
        "streams are not timed"
    );

    assert_eq!(m.get("kvstore_grpc_requests_in_flight"), 0.0);
    assert_eq!(m.connections("main"), 1.0);
    assert_eq!(m.connections("health"), 1.0, "this scrape's own");
    assert_eq!(m.get("kvstore_subscriptions_open"), 1.0);
    assert_eq!(m.get("kvstore_events_published_total"), 4.0);
    assert_eq!(m.get("kvstore_events_delivered_total"), 2.0);
    assert_eq!(m.get("kvstore_events_dropped_total"), 0.0);
    assert_eq!(m.get("kvstore_subscribers_lagged_total"), 0.0);
    assert_eq!(m.get("kvstore_keys"), 2.0);
    let stored = "user:1Alice".len() + "user:2Bob".len();
    assert_eq!(m.get("kvstore_stored_bytes"), stored as f64);
    for (limit, n) in [
        ("limits.max_value_bytes", 1.0),
        ("limits.max_batch_ops", 1.0),
        ("subscriptions.max_per_client", 1.0),
        ("subscriptions.max", 0.0),
        ("limits.max_key_bytes", 0.0),
        ("server.max_in_flight", 0.0),
        ("server.request_timeout", 0.0),
        ("server.max_header_bytes", 0.0),
    ] {
        assert_eq!(m.refusals(limit), n, "{limit}");
    }
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        m.get(&format!("kvstore_build_info{{version=\"{version}\"}}")),
        1.0
    );
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let started = m.get("kvstore_start_time_seconds");
    assert!(started <= now.as_secs_f64() && started > now.as_secs_f64() - 60.0);
    let uptime = m.get("kvstore_uptime_seconds");
    assert!((0.0..60.0).contains(&uptime), "{uptime}");

    // A client that goes away ends its stream as CANCELLED.
    drop(users);
    server.wait_for_subscriptions(0).await;
    let m = scrape(&server.health_url(), None).await;
    assert_eq!(m.calls("Subscribe", "CANCELLED"), 1.0);
    assert_eq!(m.get("kvstore_subscriptions_open"), 0.0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_is_counted_with_every_change_it_missed() {
    let mut settings = test_settings();
    settings.subscriptions.buffer = 4;
    let server = spawn_with(settings).await;
    let mut client = server.client().await;
    let mut slow = client
        .subscribe(subscribe_to("lag:"))
        .await
        .unwrap()
        .into_inner();
    // As in subscribe.rs: far more than flow control and the buffer hold, unread, so the
    // subscriber must fall behind. Written to the store directly: no gRPC calls to count.
    let value = "x".repeat(64 * 1024);
    let mut stored = 0;
    for i in 0..400 {
        let (key, value) = (format!("lag:{i:04}"), format!("{i:04}{value}"));
        stored += key.len() + value.len();
        server.store.set(key, value, SetOptions::default()).unwrap();
    }
    let mut received = 0;
    let status = loop {
        match timeout(PATIENCE, slow.message()).await.unwrap() {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("the stream ends with a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(received < 400);
    // The hub counts what was dropped once the subscription is gone.
    server.wait_for_subscriptions(0).await;

    let m = scrape(&server.grpc_url(), None).await;
    assert_eq!(m.calls("Subscribe", "RESOURCE_EXHAUSTED"), 1.0);
    assert_eq!(m.get("kvstore_subscribers_lagged_total"), 1.0);
    assert_eq!(m.get("kvstore_events_published_total"), 400.0);
    assert_eq!(m.get("kvstore_events_delivered_total"), received as f64);
    assert_eq!(
        m.get("kvstore_events_dropped_total"),
        (400 - received) as f64,
        "every change published to it was either delivered or dropped"
    );
    assert_eq!(m.get("kvstore_keys"), 400.0);
    assert_eq!(m.get("kvstore_stored_bytes"), stored as f64);
    assert_eq!(m.get("kvstore_subscriptions_open"), 0.0);
    server.shutdown().await;
}

#[tokio::test]
async fn both_listeners_serve_the_text_format_and_openmetrics_to_who_asks_for_it() {
    let server = spawn_server().await;
    for base in [server.grpc_url(), server.health_url()] {
        let plain = scrape(&base, None).await;
        assert_eq!(plain.content_type, PROMETHEUS_TEXT);
        assert!(
            plain
                .text
                .contains("# TYPE kvstore_grpc_requests_total counter\n")
        );
        assert_eq!(plain.calls("Get", "OK"), 0.0);

        let open = scrape(&base, Some(PROMETHEUS_ACCEPT)).await;
        assert_eq!(open.content_type, OPENMETRICS_TEXT);
        assert!(open.text.ends_with("# EOF\n"), "{}", open.text);
        assert!(open.text.contains("# TYPE kvstore_build info\n"));
        assert!(
            open.text
                .contains("# UNIT kvstore_grpc_request_duration_seconds seconds\n")
        );
        assert_eq!(open.calls("Get", "OK"), 0.0);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_connection_counts_as_open_until_the_client_closes_it() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    get(&mut client, "a").await.unwrap();
    let m = scrape(&server.health_url(), None).await;
    assert_eq!(m.connections("main"), 1.0);
    drop(client);
    // The server learns of the close when it reads EOF: poll, bounded by PATIENCE.
    timeout(PATIENCE, async {
        while scrape(&server.health_url(), None).await.connections("main") != 0.0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the closed connection is no longer counted");
    server.shutdown().await;
}
