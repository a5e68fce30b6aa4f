//! Hostile clients that hold what the server reserves for a request without doing their part:
//! calls whose message never comes, partial messages pinning memory (health and reflection
//! included), and a single-message call that carries two. The attacker writes HTTP/2 with
//! the `h2` crate, so it costs one frame where the server could pay a slot or megabytes.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Bytes;
use kvstore::config::Settings;
use kvstore::pb;
use prost::Message as _;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tonic::Code;

use crate::helpers::{PATIENCE, spawn_with, test_settings};
use crate::metrics::scrape;

/// The body timeout of these tests: short enough to wait out.
const BODY_TIMEOUT: Duration = Duration::from_millis(500);

fn settings() -> Settings {
    let mut s = test_settings();
    s.server.request_body_timeout = BODY_TIMEOUT;
    s
}

/// A gRPC length-prefixed message declaring `declared` bytes, of which `payload` is sent.
fn frame(declared: usize, payload: &[u8]) -> Bytes {
    let mut bytes = vec![0];
    bytes.extend(u32::try_from(declared).unwrap().to_be_bytes());
    bytes.extend_from_slice(payload);
    Bytes::from(bytes)
}

fn message(payload: &[u8]) -> Bytes {
    frame(payload.len(), payload)
}

/// One HTTP/2 connection of the attacker.
struct Attacker {
    send: h2::client::SendRequest<Bytes>,
    ping: h2::PingPong,
    _connection: JoinHandle<Result<(), h2::Error>>,
}

/// A call the attacker opened: its answer, and its request stream, kept open.
struct Opened {
    response: h2::client::ResponseFuture,
    _stream: h2::SendStream<Bytes>,
}

impl Attacker {
    async fn connect(addr: SocketAddr) -> Attacker {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, mut connection) = h2::client::handshake(tcp).await.unwrap();
        let ping = connection.ping_pong().expect("the first to ask");
        Attacker {
            send,
            ping,
            _connection: tokio::spawn(connection),
        }
    }

    /// Opens a gRPC call to `path` and sends `body` without ending the stream.
    async fn open(&mut self, path: &str, body: Option<Bytes>) -> Opened {
        self.call(path, body, false).await
    }

    /// Opens a gRPC call to `path` and sends `body`, ending the stream if `end`.
    async fn call(&mut self, path: &str, body: Option<Bytes>, end: bool) -> Opened {
        let request = http::Request::post(format!("http://test{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let mut send = self.send.clone().ready().await.unwrap();
        let (response, mut stream) = send.send_request(request, end && body.is_none()).unwrap();
        if let Some(body) = body {
            stream.send_data(body, end).unwrap();
        }
        Opened {
            response,
            _stream: stream,
        }
    }

    /// Returns once the server has read everything sent before: it answers a PING in order.
    async fn synced(&mut self) {
        timeout(PATIENCE, self.ping.ping(h2::Ping::opaque()))
            .await
            .expect("a PING answered in time")
            .unwrap();
    }
}

/// The gRPC status of a call's answer, from its headers (trailers-only) or its trailers.
async fn status(opened: Opened) -> (Code, String) {
    let response = timeout(PATIENCE, opened.response)
        .await
        .expect("an answer in time")
        .expect("an answer, not a reset");
    let (parts, mut body) = response.into_parts();
    let fields = if parts.headers.contains_key("grpc-status") {
        parts.headers
    } else {
        while let Some(chunk) = timeout(PATIENCE, body.data()).await.expect("the body") {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
        }
        timeout(PATIENCE, body.trailers())
            .await
            .expect("trailers in time")
            .unwrap()
            .expect("trailers")
    };
    let code = Code::from_bytes(fields["grpc-status"].as_bytes());
    let message = fields
        .get("grpc-message")
        .map(|v| v.to_str().unwrap().replace("%20", " "))
        .unwrap_or_default();
    (code, message)
}

const GET: &str = "/kvstore.KeyValueStore/Get";
const SET: &str = "/kvstore.KeyValueStore/Set";
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const REFLECTION: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";

#[tokio::test]
async fn calls_whose_message_never_comes_hold_no_in_flight_place_and_time_out() {
    let mut s = settings();
    s.server.max_in_flight = 8;
    let server = spawn_with(s).await;

    // Three times max_in_flight calls that send their headers and nothing more, over three
    // connections.
    let mut attackers = Vec::new();
    let mut opened = Vec::new();
    for _ in 0..3 {
        let mut attacker = Attacker::connect(server.grpc_addr).await;
        for _ in 0..8 {
            opened.push(attacker.open(GET, None).await);
        }
        attacker.synced().await;
        attackers.push(attacker);
    }
    let started = Instant::now();

    let mut client = server.client().await;
    for i in 0..20 {
        let key = format!("k{i}");
        client
            .set(pb::SetRequest {
                key: key.clone(),
                value: "v".into(),
                ..Default::default()
            })
            .await
            .expect("a well-behaved Set is served beside the body-less calls");
        let got = client
            .get(pb::GetRequest { key })
            .await
            .expect("a well-behaved Get is served beside the body-less calls");
        assert!(got.into_inner().found);
    }

    for call in opened {
        let (code, message) = status(call).await;
        assert_eq!(code, Code::DeadlineExceeded, "{message}");
        assert!(message.contains("server.request_body_timeout"), "{message}");
    }
    assert!(started.elapsed() < PATIENCE, "cut by the body timeout");
    let m = scrape(&server.health_url(), None).await;
    assert_eq!(m.refusals("server.request_body_timeout"), 24.0);
    assert_eq!(m.refusals("server.max_in_flight"), 0.0);
    server.shutdown().await;
}

#[tokio::test]
async fn partial_messages_are_held_to_the_budget_and_cut_by_the_body_timeout() {
    let mut s = settings();
    s.limits.max_key_bytes = 100;
    s.limits.max_value_bytes = 1000;
    s.limits.max_batch_bytes = 2000;
    // The least allowed: the largest KV message (100 + 1000 + 1 KiB of overhead) and its
    // prefix. No two of the partial messages below fit in it together.
    s.server.max_request_bytes_in_flight = 2129;
    let server = spawn_with(s).await;
    let mut attacker = Attacker::connect(server.grpc_addr).await;

    // A health check declaring 1000 bytes and a Set declaring 2000, each sending 10.
    let health = attacker
        .open(HEALTH_CHECK, Some(frame(1000, &[0; 10])))
        .await;
    let set = attacker.open(SET, Some(frame(2000, &[0; 10]))).await;
    let (health, set) = tokio::join!(status(health), status(set));
    let mut answers = [health, set];
    answers.sort_by_key(|(code, _)| *code as i32);
    let [(timed_out, timeout_message), (refused, refusal)] = answers;
    assert_eq!(timed_out, Code::DeadlineExceeded, "{timeout_message}");
    assert!(
        timeout_message.contains("server.request_body_timeout"),
        "{timeout_message}"
    );
    assert_eq!(refused, Code::ResourceExhausted, "{refusal}");
    assert!(
        refusal.contains("server.max_request_bytes_in_flight"),
        "{refusal}"
    );

    // Each partial health check alone is cut by the timeout.
    let started = Instant::now();
    let health = attacker
        .open(HEALTH_CHECK, Some(frame(1000, &[0; 10])))
        .await;
    let (code, message) = status(health).await;
    assert_eq!(code, Code::DeadlineExceeded, "{message}");
    assert!(started.elapsed() >= BODY_TIMEOUT);

    // A health message has a size of its own, far below the KV service's.
    let large = attacker
        .open(HEALTH_CHECK, Some(frame(2000, &[0; 10])))
        .await;
    let (code, message) = status(large).await;
    assert_eq!(code, Code::OutOfRange, "{message}");

    // A reflection message that never completes: its stream is ended.
    let reflection = attacker.open(REFLECTION, Some(frame(1000, &[0; 10]))).await;
    status(reflection).await;

    let m = scrape(&server.health_url(), None).await;
    assert_eq!(m.refusals("server.request_body_timeout"), 3.0);
    assert_eq!(m.refusals("server.max_request_bytes_in_flight"), 1.0);

    // What they held is back: the largest message fits again.
    let mut client = server.client().await;
    client
        .set(pb::SetRequest {
            key: "k".repeat(100),
            value: "v".repeat(1000),
            ..Default::default()
        })
        .await
        .expect("the budget is free again");
    server.shutdown().await;
}

#[tokio::test]
async fn a_single_message_call_carrying_two_fails_with_internal() {
    let server = spawn_with(settings()).await;
    let mut attacker = Attacker::connect(server.grpc_addr).await;
    let set = pb::SetRequest {
        key: "twice".into(),
        value: "v".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut body = message(&set).to_vec();
    body.extend_from_slice(&message(&set));
    let call = attacker.call(SET, Some(Bytes::from(body)), true).await;
    let (code, message) = status(call).await;
    assert_eq!(code, Code::Internal, "{message}");
    assert!(message.contains("one request message"), "{message}");

    let mut client = server.client().await;
    let got = client
        .get(pb::GetRequest {
            key: "twice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!got.found, "the call was not processed");
    server.shutdown().await;
}
