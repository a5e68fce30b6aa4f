//! Hostile clients that hold what the server reserves for a request without doing their part:
//! calls whose message never comes, partial messages pinning memory (health and reflection
//! included), a single-message call that carries two, and floods of frames that do no work.
//! The attacker writes HTTP/2 with the `h2` crate or by hand, so it costs one frame where the
//! server could pay a slot, megabytes or CPU.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Bytes;
use kvstore::config::Settings;
use kvstore::pb;
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
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

/// An HTTP/2 frame written by hand: its 9-byte header, then `payload`.
fn raw_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = u32::try_from(payload.len()).unwrap().to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const END_HEADERS: u8 = 0x4;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The HEADERS of a Get on stream 1 that does not end the stream, HPACK-encoded by hand:
/// static-table names, literal values, no Huffman coding.
fn get_headers() -> Vec<u8> {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    for (index, value) in [(4u8, GET), (1, "test")] {
        // :path, :authority: a literal value under an indexed name, not indexed.
        block.push(index);
        block.push(u8::try_from(value.len()).unwrap());
        block.extend_from_slice(value.as_bytes());
    }
    // content-type (static index 31, past the 4-bit prefix), then te as a new name.
    block.extend([0x0f, 31 - 15, 16]);
    block.extend_from_slice(b"application/grpc");
    block.extend([0x00, 2]);
    block.extend_from_slice(b"te");
    block.push(8);
    block.extend_from_slice(b"trailers");
    raw_frame(HEADERS, END_HEADERS, 1, &block)
}

/// Opens a connection with a valid preface and an empty SETTINGS frame, sends `opening`, then
/// `frame` up to `count` times (fewer if the server closes first), and returns the frames
/// the server sent until it closed (or until [`PATIENCE`] ran out).
async fn flood(addr: SocketAddr, opening: &[u8], frame: &[u8], count: usize) -> Vec<(u8, Vec<u8>)> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = tcp.into_split();
    // Read all along, so that the server's answers (PING and SETTINGS ACKs) never block it.
    let reader = tokio::spawn(async move {
        let mut received = Vec::new();
        let _ = timeout(PATIENCE, async {
            let mut chunk = [0u8; 16 * 1024];
            while let Ok(n @ 1..) = read.read(&mut chunk).await {
                received.extend_from_slice(&chunk[..n]);
            }
        })
        .await;
        received
    });
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend(raw_frame(SETTINGS, 0, 0, &[]));
    start.extend_from_slice(opening);
    write.write_all(&start).await.unwrap();
    let batch = frame.repeat(100);
    for _ in 0..count.div_ceil(100) {
        // The server closing mid-flood is what is expected.
        if write.write_all(&batch).await.is_err() {
            break;
        }
    }
    let received = reader.await.unwrap();
    let mut frames = Vec::new();
    let mut rest = &received[..];
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        if rest.len() < 9 + len {
            break;
        }
        frames.push((rest[3], rest[9..9 + len].to_vec()));
        rest = &rest[9 + len..];
    }
    frames
}

/// Floods the server with `frame`, `count` times after `opening`, and checks that the
/// connection was closed with a GOAWAY saying ENHANCE_YOUR_CALM and naming `cut_by` in its
/// debug data, while a well-behaved client on another connection keeps working. Returns the
/// frames the flooding connection received.
async fn flood_is_cut(
    opening: &[u8],
    frame: &[u8],
    count: usize,
    cut_by: &str,
) -> Vec<(u8, Vec<u8>)> {
    let server = spawn_with(settings()).await;
    let mut client = server.client().await;
    let frames = flood(server.grpc_addr, opening, frame, count).await;
    let (_, goaway) = frames
        .iter()
        .find(|(kind, _)| *kind == GOAWAY)
        .expect("the flood is answered with a GOAWAY");
    let code = u32::from_be_bytes(goaway[4..8].try_into().unwrap());
    assert_eq!(code, ENHANCE_YOUR_CALM);
    let debug = String::from_utf8_lossy(&goaway[8..]);
    assert!(debug.contains(cut_by), "{debug}");

    for i in 0..10 {
        client
            .set(pb::SetRequest {
                key: format!("k{i}"),
                value: "v".into(),
                ..Default::default()
            })
            .await
            .expect("a well-behaved client is served beside the flood");
    }
    let m = scrape(&server.health_url(), None).await;
    let ours = f64::from(u8::from(cut_by == "server.max_control_frames"));
    assert_eq!(m.refusals("server.max_control_frames"), ours);
    server.shutdown().await;
    frames
}

// Each flood is twice the default budget of 1000 frames: the connection must be cut before
// its end (the server's own opening frames earn a few more, and time one every 100 ms).

#[tokio::test]
async fn a_window_update_flood_is_cut_with_enhance_your_calm() {
    let update = raw_frame(WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes());
    flood_is_cut(&[], &update, 2000, "server.max_control_frames").await;
}

#[tokio::test]
async fn a_flood_of_settings_frames_is_cut_by_their_parameter_count() {
    // 2,730 parameters (SETTINGS_ENABLE_PUSH = 0), the most a 16 KiB frame holds: each frame
    // costs 2,730 of the budget of 1000, so the first one is cut.
    let parameters = [0u8, 2, 0, 0, 0, 0].repeat(2730);
    let settings = raw_frame(SETTINGS, 0, 0, &parameters);
    flood_is_cut(&[], &settings, 2, "server.max_control_frames").await;
}

#[tokio::test]
async fn a_ping_flood_is_cut_with_enhance_your_calm() {
    let ping = raw_frame(PING, 0, 0, &[7; 8]);
    let frames = flood_is_cut(&[], &ping, 2000, "server.max_control_frames").await;
    // At most the PINGs read before the cut are answered: the budget and what the server's
    // opening frames and the clock earn (fewer if h2 had not written all its ACKs when the
    // connection was dropped).
    let acks = frames.iter().filter(|(kind, _)| *kind == PING).count();
    assert!(acks < 1100, "{acks} PINGs answered");
}

/// h2 (since 0.4.20) closes a connection after 100 empty DATA frames that do not end their
/// stream, before the budget does; this keeps that held.
#[tokio::test]
async fn a_flood_of_empty_data_frames_is_cut_with_enhance_your_calm() {
    let empty = raw_frame(DATA, 0, 1, &[]);
    flood_is_cut(&get_headers(), &empty, 2000, "too_many_data_frames").await;
}

/// Honest work never meets the budget, even at the least allowed: answers earn what their
/// clients send back (WINDOW_UPDATEs, BDP PINGs), requests earn their own.
#[tokio::test]
async fn honest_clients_never_meet_the_control_frame_budget() {
    let mut s = settings();
    s.server.max_control_frames = 100;
    let server = spawn_with(s).await;

    // A subscriber on its own connection, which only receives: 2,000 events.
    let mut watcher = server.client().await;
    let mut events = watcher
        .subscribe(pb::SubscribeRequest {
            key_pattern: "h/".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut client = server.client().await;
    for i in 0..2000 {
        client
            .set(pb::SetRequest {
                key: format!("h/{i}"),
                value: "v".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for _ in 0..2000 {
        timeout(PATIENCE, events.message())
            .await
            .expect("an event in time")
            .unwrap()
            .expect("the stream goes on");
    }
    for i in 0..2000 {
        let got = client
            .get(pb::GetRequest {
                key: format!("h/{i}"),
            })
            .await
            .unwrap();
        assert!(got.into_inner().found);
    }

    // A Batch and a List of about 4 MiB each.
    let value = "x".repeat(1_000_000);
    let ops = (0..4)
        .map(|i| pb::BatchOp {
            op: Some(pb::batch_op::Op::Set(pb::SetRequest {
                key: format!("big/{i}"),
                value: value.clone(),
                ..Default::default()
            })),
        })
        .collect();
    client.batch(pb::BatchRequest { ops }).await.unwrap();
    let page = client
        .list(pb::ListRequest {
            prefix: "big/".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.items.len(), 4);

    let m = scrape(&server.health_url(), None).await;
    assert_eq!(m.refusals("server.max_control_frames"), 0.0);
    server.shutdown().await;
}
