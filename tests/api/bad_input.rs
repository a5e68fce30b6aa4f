//! Bad input from the network: garbage bytes, truncated HTTP/2 prefaces, malformed and
//! oversized gRPC frames, bodies that are not protobuf or carry invalid UTF-8, huge metadata,
//! unknown services and paths. Each gets a precise answer or a closed connection, while a
//! well-behaved client on a connection of its own keeps setting and reading keys throughout.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Bytes;
use kvstore::config::Settings;
use kvstore::pb;
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::{PATIENCE, TestServer, field_size, http_request, spawn_with, test_settings};

/// Short enough for a test to wait out, long enough to tell apart from "at once".
const SHORT: Duration = Duration::from_millis(300);

fn settings() -> Settings {
    let mut s = test_settings();
    s.server.health_listen = None;
    s.server.handshake_timeout = SHORT;
    s
}

/// A well-behaved client on its own connection, setting and reading back keys in a loop
/// while the bad input arrives on other connections. Every one of its calls must succeed.
struct GoodClient {
    stop: oneshot::Sender<()>,
    task: JoinHandle<usize>,
}

/// More rounds than the bad input takes; the loop is bounded all the same.
const GOOD_ROUNDS: usize = 1_000_000;

impl GoodClient {
    /// Returns once its first round has succeeded.
    async fn start(server: &TestServer) -> GoodClient {
        let mut client = server.client().await;
        let (started, first) = oneshot::channel();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut started = Some(started);
            let mut rounds = 0;
            while rounds < GOOD_ROUNDS {
                good_round(&mut client, rounds).await;
                rounds += 1;
                if let Some(started) = started.take() {
                    let _ = started.send(());
                }
                if stopped.try_recv() != Err(oneshot::error::TryRecvError::Empty) {
                    break;
                }
            }
            rounds
        });
        timeout(PATIENCE, first)
            .await
            .expect("the good client's first round in time")
            .expect("the good client's first round succeeds");
        GoodClient { stop, task }
    }

    /// Stops the loop after its current round; fails the test if any call failed. Then the
    /// server must still report itself SERVING.
    async fn finish(self, server: &TestServer) {
        let _ = self.stop.send(());
        let rounds = timeout(PATIENCE, self.task)
            .await
            .expect("the good client stops in time")
            .expect("every call of the good client succeeded");
        assert!(
            rounds >= 2,
            "the good client ran alongside: {rounds} rounds"
        );
        let health = server
            .health_client()
            .await
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(health.status(), ServingStatus::Serving);
    }
}

async fn good_round(
    client: &mut pb::key_value_store_client::KeyValueStoreClient<tonic::transport::Channel>,
    n: usize,
) {
    let key = format!("good/{}", n % 64);
    let value = format!("value {n}");
    let call = async {
        client
            .set(pb::SetRequest {
                key: key.clone(),
                value: value.clone(),
                ..Default::default()
            })
            .await
            .expect("the good client's Set succeeds");
        client
            .get(pb::GetRequest { key: key.clone() })
            .await
            .expect("the good client's Get succeeds")
            .into_inner()
    };
    let got = timeout(PATIENCE, call)
        .await
        .expect("the good client's calls answer in time");
    assert_eq!(got.value, value);
}

/// Reads until the server closes the connection, returning everything it sent. A reset
/// counts as closed too.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut chunk = [0; 4096];
    let deadline = Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => panic!("the server did not close the connection in time"),
            Ok(Ok(0) | Err(_)) => return received,
            Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Deterministic noise (xorshift64), so a failure can be replayed.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Sends `bytes` on a fresh connection, half-closes it if `half_close`, and returns what the
/// server sent before it closed, and how long that took.
async fn send_raw(addr: SocketAddr, bytes: &[u8], half_close: bool) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may close before reading everything; that shows in the read.
    let _ = stream.write_all(bytes).await;
    if half_close {
        let _ = stream.shutdown().await;
    }
    let received = read_until_closed(&mut stream).await;
    (received, started.elapsed())
}

/// The HTTP/2 frames in `bytes` as (type, payload), after any text the server sent first.
fn h2_frames(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        let kind = rest[3];
        let Some(payload) = rest.get(9..9 + len) else {
            break;
        };
        frames.push((kind, payload.to_vec()));
        rest = &rest[9 + len..];
    }
    frames
}

const GOAWAY: u8 = 0x7;

/// The error code of the server's GOAWAY, if it sent one.
fn goaway_code(bytes: &[u8]) -> Option<u32> {
    h2_frames(bytes)
        .into_iter()
        .find(|(kind, _)| *kind == GOAWAY)
        .map(|(_, payload)| u32::from_be_bytes(payload[4..8].try_into().unwrap()))
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test]
async fn garbage_and_broken_prefaces_close_the_connection_while_others_are_served() {
    let server = spawn_with(settings()).await;
    let good = GoodClient::start(&server).await;
    let addr = server.grpc_addr;

    // Noise is not a request: HTTP/1.1 answers 400 and closes, however the peer goes on.
    for (seed, half_close) in [(1, true), (2, false), (3, true)] {
        let (received, took) = send_raw(addr, &garbage(seed, 4096), half_close).await;
        let text = String::from_utf8_lossy(&received);
        assert!(
            text.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "seed {seed}: {text:?}"
        );
        assert!(took < SHORT, "closed at once, not by a timeout: {took:?}");
    }

    // A request line followed by a header line that is not one.
    let (received, _) = send_raw(
        addr,
        b"GET /health/live HTTP/1.1\r\nHost: test\r\n\x01\x02: \xff\r\n\r\n",
        false,
    )
    .await;
    assert!(received.starts_with(b"HTTP/1.1 400 Bad Request\r\n"));

    // The preface cut short: the server cannot tell HTTP/2 from HTTP/1.1 yet. A peer that
    // closes is closed at once; one that stalls, after server.handshake_timeout.
    let cut = &PREFACE[..PREFACE.len() - 6];
    let (received, took) = send_raw(addr, cut, true).await;
    assert!(
        took < SHORT,
        "{took:?}: {:?}",
        String::from_utf8_lossy(&received)
    );
    let (received, took) = send_raw(addr, cut, false).await;
    assert!(received.is_empty(), "{received:?}");
    assert!(
        took >= SHORT,
        "closed by server.handshake_timeout: {took:?}"
    );

    // A whole preface, then noise where the SETTINGS frame belongs: a connection error.
    let mut bytes = PREFACE.to_vec();
    bytes.extend(garbage(4, 512));
    let (received, took) = send_raw(addr, &bytes, false).await;
    let code = goaway_code(&received);
    assert!(
        matches!(code, Some(0x1 | 0x6)),
        "GOAWAY with PROTOCOL_ERROR or FRAME_SIZE_ERROR, got {code:?} in {:?}",
        h2_frames(&received)
    );
    assert!(took < SHORT, "{took:?}");

    good.finish(&server).await;
    server.shutdown().await;
}

/// One HTTP/2 connection made with the `h2` crate, for requests whose body no gRPC client
/// would send.
struct RawH2 {
    send: h2::client::SendRequest<Bytes>,
    _connection: JoinHandle<Result<(), h2::Error>>,
}

/// What came back for one call: the HTTP status, and the gRPC status from the headers
/// (trailers-only) or from the trailers.
#[derive(Debug)]
struct Answer {
    http: http::StatusCode,
    code: Option<Code>,
    message: String,
    body: Vec<u8>,
}

impl RawH2 {
    async fn connect(addr: SocketAddr) -> RawH2 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, connection) = h2::client::handshake(tcp).await.unwrap();
        RawH2 {
            send,
            _connection: tokio::spawn(connection),
        }
    }

    /// A gRPC call to `path` whose body is `body`, as is, ended with END_STREAM.
    async fn grpc(&mut self, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Answer {
        let mut request = http::Request::post(format!("http://test{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.call(request.body(()).unwrap(), body).await
    }

    async fn call(&mut self, request: http::Request<()>, body: Vec<u8>) -> Answer {
        let mut send = self.send.clone().ready().await.unwrap();
        let (response, mut stream) = send.send_request(request, body.is_empty()).unwrap();
        if !body.is_empty() {
            stream.send_data(Bytes::from(body), true).unwrap();
        }
        let response = timeout(PATIENCE, response)
            .await
            .expect("an answer in time")
            .expect("an answer, not a reset");
        let (parts, mut body) = response.into_parts();
        let mut data = Vec::new();
        while let Some(chunk) = timeout(PATIENCE, body.data())
            .await
            .expect("the body in time")
        {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            data.extend_from_slice(&chunk);
        }
        let trailers = if parts.headers.contains_key("grpc-status") {
            None
        } else {
            timeout(PATIENCE, body.trailers())
                .await
                .expect("trailers in time")
                .unwrap()
        };
        let fields = trailers.as_ref().unwrap_or(&parts.headers);
        let code = fields
            .get("grpc-status")
            .map(|v| Code::from_bytes(v.as_bytes()));
        let message = fields
            .get("grpc-message")
            .map(|v| percent_decode(v.to_str().expect("grpc-message is ASCII")))
            .unwrap_or_default();
        Answer {
            http: parts.status,
            code,
            message,
            body: data,
        }
    }
}

/// grpc-message is percent-encoded (gRPC over HTTP/2, "Responses").
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => {
                let hex = std::str::from_utf8(hex).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// A gRPC length-prefixed message: the compressed flag, the length, then `payload`.
fn frame(flag: u8, declared_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![flag];
    bytes.extend(declared_len.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

fn message(payload: &[u8]) -> Vec<u8> {
    frame(0, payload.len() as u32, payload)
}

/// The one message of a successful unary Get.
fn get_response(answer: &Answer) -> pb::GetResponse {
    let payload = answer.body.get(5..).expect("a length-prefixed message");
    pb::GetResponse::decode(payload).expect("a GetResponse")
}

/// A malformed call, and the status and words of its answer.
struct Case {
    what: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: Vec<u8>,
    code: Code,
    says: &'static str,
}

const SET: &str = "/kvstore.KeyValueStore/Set";
const GET: &str = "/kvstore.KeyValueStore/Get";
const SUBSCRIBE: &str = "/kvstore.KeyValueStore/Subscribe";
const BATCH: &str = "/kvstore.KeyValueStore/Batch";

#[tokio::test]
async fn malformed_grpc_messages_get_precise_statuses_on_a_connection_that_stays_usable() {
    let server = spawn_with(settings()).await;
    let good = GoodClient::start(&server).await;
    let mut h2 = RawH2::connect(server.grpc_addr).await;
    let valid = pb::SetRequest {
        key: "raw".into(),
        value: "v".into(),
        ..Default::default()
    }
    .encode_to_vec();
    // Field 1 (key), length-delimited, two bytes that are not UTF-8.
    let bad_utf8 = [0x0a, 0x02, 0xff, 0xfe];
    // A BatchRequest of one op, a get of that key (Batch reads its requests itself).
    let bad_batch = [0x0a, 0x06, 0x0a, 0x04, 0x0a, 0x02, 0xff, 0xfe];

    let cases = [
        Case {
            what: "the length prefix promises more than is sent",
            path: SET,
            headers: &[],
            body: frame(0, 100, &valid),
            code: Code::Internal,
            says: "Unexpected EOF",
        },
        Case {
            what: "only part of the length prefix",
            path: SET,
            headers: &[],
            body: vec![0, 0, 0],
            code: Code::Internal,
            says: "Unexpected EOF",
        },
        Case {
            what: "a length prefix far over the decode limit",
            path: SET,
            headers: &[],
            body: frame(0, u32::MAX, &valid),
            code: Code::OutOfRange,
            says: "message length too large: found 4294967295 bytes",
        },
        Case {
            what: "the compressed flag without grpc-encoding",
            path: SET,
            headers: &[],
            body: frame(1, valid.len() as u32, &valid),
            code: Code::Internal,
            says: "compressed-flag but no grpc-encoding",
        },
        Case {
            what: "an encoding the server does not support",
            path: SET,
            headers: &[("grpc-encoding", "gzip")],
            body: frame(1, valid.len() as u32, &valid),
            code: Code::Unimplemented,
            says: "gzip",
        },
        Case {
            what: "a compressed flag that is neither 0 nor 1",
            path: SET,
            headers: &[],
            body: frame(7, valid.len() as u32, &valid),
            code: Code::Internal,
            says: "invalid compression flag: 7",
        },
        Case {
            what: "no message at all",
            path: SET,
            headers: &[],
            body: Vec::new(),
            code: Code::Internal,
            says: "Missing request message",
        },
        Case {
            what: "a body that is not protobuf",
            path: SET,
            headers: &[],
            body: message(&garbage(5, 64)),
            code: Code::Internal,
            says: "failed to decode Protobuf message",
        },
        Case {
            what: "invalid UTF-8 in a string field of a unary call",
            path: GET,
            headers: &[],
            body: message(&bad_utf8),
            code: Code::Internal,
            says: "GetRequest.key: invalid string value: data is not UTF-8 encoded",
        },
        Case {
            what: "invalid UTF-8 in a string field of a stream's request",
            path: SUBSCRIBE,
            headers: &[],
            body: message(&bad_utf8),
            code: Code::Internal,
            says: "SubscribeRequest.key_pattern: invalid string value",
        },
        Case {
            what: "a Batch body that is not protobuf",
            path: BATCH,
            headers: &[],
            body: message(&garbage(5, 64)),
            code: Code::Internal,
            says: "failed to decode Protobuf message",
        },
        Case {
            what: "invalid UTF-8 in a key of a Batch op",
            path: BATCH,
            headers: &[],
            body: message(&bad_batch),
            code: Code::Internal,
            says: "GetRequest.key: BatchOp.op: BatchRequest.ops: invalid string value",
        },
    ];
    for Case {
        what,
        path,
        headers,
        body,
        code,
        says,
    } in cases
    {
        let answer = h2.grpc(path, headers, body).await;
        assert_eq!(answer.http, http::StatusCode::OK, "{what}: {answer:?}");
        assert_eq!(answer.code, Some(code), "{what}: {answer:?}");
        assert!(answer.message.contains(says), "{what}: {answer:?}");
        assert!(answer.body.is_empty(), "{what}: {answer:?}");
    }

    // Nothing was stored, and the same connection still serves well-formed calls.
    let get_raw = message(&pb::GetRequest { key: "raw".into() }.encode_to_vec());
    let answer = h2.grpc(GET, &[], get_raw.clone()).await;
    assert_eq!(answer.code, Some(Code::Ok), "{answer:?}");
    assert!(!get_response(&answer).found);
    let answer = h2.grpc(SET, &[], message(&valid)).await;
    assert_eq!(answer.code, Some(Code::Ok), "{answer:?}");
    let answer = h2.grpc(GET, &[], get_raw).await;
    assert_eq!(get_response(&answer).value, "v");

    good.finish(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn metadata_over_max_header_bytes_is_refused_naming_it_and_others_are_served() {
    let server = spawn_with(settings()).await;
    let good = GoodClient::start(&server).await;
    let mut h2 = RawH2::connect(server.grpc_addr).await;
    let get_a = message(&pb::GetRequest { key: "a".into() }.encode_to_vec());
    let max = Settings::default().server.max_header_bytes;

    // Exactly the fields `RawH2::grpc` sends, and metadata that brings them to the limit:
    // served; one byte more: RESOURCE_EXHAUSTED naming the key, and the connection goes on.
    let rest = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "test"),
        (":path", GET),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("x-meta", ""),
    ];
    let at_limit = "y".repeat(max - rest.iter().map(|(n, v)| field_size(n, v)).sum::<usize>());
    let answer = h2.grpc(GET, &[("x-meta", &at_limit)], get_a.clone()).await;
    assert_eq!(answer.code, Some(Code::Ok), "{answer:?}");
    let over = format!("{at_limit}y");
    let answer = h2.grpc(GET, &[("x-meta", &over)], get_a.clone()).await;
    assert_eq!(answer.code, Some(Code::ResourceExhausted), "{answer:?}");
    assert!(
        answer.message.starts_with(&format!(
            "request headers of {} bytes are over the limit of {max} bytes (server.max_header_bytes)",
            max + 1
        )),
        "{answer:?}"
    );
    let answer = h2.grpc(GET, &[], get_a.clone()).await;
    assert_eq!(answer.code, Some(Code::Ok), "{answer:?}");

    // Up to twice the limit, many entries compressed into one HEADERS frame, or one value
    // spanning CONTINUATION frames: the same.
    let entries = |count: usize, len: usize| -> Vec<(String, String)> {
        (0..count)
            .map(|i| (format!("x-meta-{i}"), "y".repeat(len)))
            .collect()
    };
    for block in [
        entries(40, 400),
        vec![("x-big".to_owned(), "x".repeat(3 * max / 2))],
    ] {
        let fields: Vec<(&str, &str)> = block
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let answer = h2.grpc(GET, &fields, get_a.clone()).await;
        assert_eq!(answer.code, Some(Code::ResourceExhausted), "{answer:?}");
        assert!(
            answer.message.contains("(server.max_header_bytes)"),
            "{answer:?}"
        );
        let answer = h2.grpc(GET, &[], get_a.clone()).await;
        assert_eq!(answer.code, Some(Code::Ok), "{answer:?}");
    }

    // Beyond twice the limit, h2 refuses the call itself, without a word of why: HTTP 431
    // for that stream while the block is small enough to decode...
    let beyond = "x".repeat(3 * max);
    let answer = h2.grpc(GET, &[("x-huge", &beyond)], get_a.clone()).await;
    assert_eq!(
        answer.http,
        http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "{answer:?}"
    );
    assert_eq!(
        answer.code, None,
        "an HTTP refusal, before gRPC: {answer:?}"
    );
    let answer = h2.grpc(GET, &[], get_a.clone()).await;
    assert_eq!(answer.code, Some(Code::Ok), "{answer:?}");

    // ...and a GOAWAY that ends the connection for a block needing more CONTINUATION frames
    // than it will buffer (its defence against CONTINUATION floods).
    let huge = vec![("x-huge".to_owned(), "x".repeat(8 * max))];
    for block in [huge, entries(max / 4, 48)] {
        let mut request = http::Request::post(format!("http://test{GET}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (name, value) in &block {
            request = request.header(name.as_str(), value.as_str());
        }
        let mut send = h2.send.clone().ready().await.unwrap();
        let (response, _) = send.send_request(request.body(()).unwrap(), true).unwrap();
        let err = timeout(PATIENCE, response)
            .await
            .expect("an answer in time")
            .expect_err("the connection is ended");
        assert!(
            matches!(
                err.reason(),
                Some(h2::Reason::COMPRESSION_ERROR | h2::Reason::ENHANCE_YOUR_CALM)
            ),
            "{err:?}"
        );
        assert!(err.is_go_away() && err.is_remote(), "{err:?}");
        h2 = RawH2::connect(server.grpc_addr).await;
    }

    // A fresh connection is served.
    let answer = h2.grpc(GET, &[], get_a).await;
    assert_eq!(answer.code, Some(Code::Ok), "{answer:?}");

    good.finish(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_services_methods_paths_and_http_methods_get_precise_answers() {
    let server = spawn_with(settings()).await;
    let good = GoodClient::start(&server).await;
    let mut h2 = RawH2::connect(server.grpc_addr).await;
    let body = message(&pb::GetRequest { key: "a".into() }.encode_to_vec());

    for path in [
        "/kvstore.KeyValueStore/Nope",
        "/kvstore.KeyValueStore/",
        "/no.Such/Service",
        "/",
        "/%ff%fe/..%2f",
    ] {
        let answer = h2.grpc(path, &[], body.clone()).await;
        assert_eq!(answer.http, http::StatusCode::OK, "{path}: {answer:?}");
        assert_eq!(answer.code, Some(Code::Unimplemented), "{path}: {answer:?}");
        assert!(
            answer.message.contains("unknown service or method"),
            "{path}: {answer:?}"
        );
    }

    let base = format!("http://{}", server.grpc_addr);
    for http2 in [false, true] {
        let (status, body) =
            http_request(http::Method::GET, &format!("{base}/nope/../x?y=%ff"), http2).await;
        assert_eq!(status, http::StatusCode::NOT_FOUND);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .starts_with("no route for GET /"),
            "{body}"
        );

        let (status, body) =
            http_request(http::Method::DELETE, &format!("{base}/health/live"), http2).await;
        assert_eq!(status, http::StatusCode::METHOD_NOT_ALLOWED, "{body}");
    }

    good.finish(&server).await;
    server.shutdown().await;
}
