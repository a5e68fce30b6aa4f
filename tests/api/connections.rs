//! Connection-level limits, seen from the client's side of the socket: too many connections,
//! connections that send nothing or go idle, the HTTP/2 stream limit, oversized headers, and
//! keepalive PINGs that drop a peer that stopped answering.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Bytes;
use kvstore::config::Settings;
use kvstore::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

use crate::helpers::{PATIENCE, TestServer, field_size, spawn_with, test_settings};

/// Short enough for a test to wait out, long enough to tell apart from "at once".
const SHORT: Duration = Duration::from_millis(300);

fn single_port(settings: impl FnOnce(&mut Settings)) -> Settings {
    let mut s = test_settings();
    s.server.health_listen = None;
    settings(&mut s);
    s
}

/// Reads until the server closes the connection, returning everything it sent. A reset counts
/// as closed too: either way the server is done with us.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let _ = timeout(PATIENCE, stream.read_to_end(&mut received))
        .await
        .expect("the server closes the connection in time");
    received
}

/// One HTTP/1.1 request on a fresh connection, raw: the status line, or `None` if the
/// server closed the connection without answering.
async fn raw_get(addr: SocketAddr, path: &str, extra_headers: &str) -> Option<String> {
    let response = raw_response(addr, path, extra_headers).await;
    response.lines().next().map(str::to_owned)
}

/// The whole answer to an HTTP/1.1 GET of `path` with the fields `host: test`,
/// `extra_headers` (each line ending in CRLF) and `connection: close`, read until the server
/// closes.
async fn raw_response(addr: SocketAddr, path: &str, extra_headers: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n{extra_headers}Connection: close\r\n\r\n");
    // The server may have closed already (a refused connection); that shows in the read.
    let _ = stream.write_all(request.as_bytes()).await;
    String::from_utf8_lossy(&read_until_closed(&mut stream).await).into_owned()
}

#[tokio::test]
async fn connections_past_max_connections_are_told_why_at_once_until_one_closes() {
    let server = spawn_with(single_port(|s| {
        s.server.max_connections = 2;
        // Every client here is 127.0.0.1; the per-address cap is tested on its own.
        s.server.max_connections_per_address = 2;
    }))
    .await;
    let mut kv = server.client().await;
    let mut kv2 = server.client().await;
    // A call on each proves both connections are being served, so both count.
    for client in [&mut kv, &mut kv2] {
        client
            .get(pb::GetRequest { key: "a".into() })
            .await
            .unwrap();
    }

    let started = Instant::now();
    let refused = raw_response(server.grpc_addr, "/health/live", "").await;
    assert!(
        started.elapsed() < SHORT,
        "refused at once, not after a timeout: {:?}",
        started.elapsed()
    );
    assert!(
        refused.starts_with("HTTP/1.1 503 Service Unavailable\r\n")
            && refused.contains("retry-after: 1")
            && refused.contains("server.max_connections (2)"),
        "an HTTP/1.1 client is told why: {refused}"
    );
    // HTTP/2: the same answer, then a GOAWAY ends the connection.
    let mut h2 = RawH2::connect(server.grpc_addr).await;
    let (status, body) = h2.request("/health/live", http::HeaderMap::new()).await;
    assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("server.max_connections (2)"), "{body}");
    timeout(PATIENCE, h2.closed)
        .await
        .expect("the refused connection is closed in time")
        .unwrap()
        .expect("closed cleanly with GOAWAY");
    // gRPC: UNAVAILABLE (nothing was processed, so retrying elsewhere is safe).
    let status = server
        .client()
        .await
        .get(pb::GetRequest { key: "a".into() })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("server.max_connections (2)"),
        "{status:?}"
    );
    // The open connections are unaffected.
    kv.get(pb::GetRequest { key: "a".into() }).await.unwrap();

    drop(kv);
    // The server frees the slot a moment after the peer's close reaches it; nothing tells a
    // client that moment, so try a bounded number of times.
    let mut answer = None;
    for _ in 0..100 {
        answer = raw_get(server.grpc_addr, "/health/live", "").await;
        if answer.as_deref() == Some("HTTP/1.1 200 OK") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(answer.as_deref(), Some("HTTP/1.1 200 OK"));
    let metrics = crate::metrics::scrape(&format!("http://{}", server.grpc_addr), None).await;
    let refused = metrics.get("kvstore_limit_refusals_total{limit=\"server.max_connections\"}");
    assert!(refused >= 1.0, "each refusal is counted: {refused}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_handshake_timeout() {
    let server = spawn_with(single_port(|s| s.server.handshake_timeout = SHORT)).await;

    let started = Instant::now();
    let mut silent = TcpStream::connect(server.grpc_addr).await.unwrap();
    assert!(read_until_closed(&mut silent).await.is_empty());
    assert!(started.elapsed() >= SHORT, "{:?}", started.elapsed());

    // Headers that never finish (slowloris) count as nothing sent.
    let started = Instant::now();
    let mut slow = TcpStream::connect(server.grpc_addr).await.unwrap();
    slow.write_all(b"GET /health/live HTTP/1.1\r\nHost: test\r\n")
        .await
        .unwrap();
    assert!(read_until_closed(&mut slow).await.is_empty());
    assert!(started.elapsed() >= SHORT, "{:?}", started.elapsed());

    // A prompt client is not affected.
    assert_eq!(
        raw_get(server.grpc_addr, "/health/live", "")
            .await
            .as_deref(),
        Some("HTTP/1.1 200 OK")
    );
    server.shutdown().await;
}

/// An HTTP/2 connection made with the `h2` crate, so a test sees the frames' effects that
/// hyper's and tonic's clients hide: the server's SETTINGS, and when the server ends the
/// connection. `closed` resolves then.
struct RawH2 {
    send: h2::client::SendRequest<Bytes>,
    closed: JoinHandle<Result<(), h2::Error>>,
}

impl RawH2 {
    async fn connect(addr: SocketAddr) -> RawH2 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, connection) = h2::client::handshake(tcp).await.unwrap();
        RawH2 {
            send,
            closed: tokio::spawn(connection),
        }
    }

    /// GET `path` and read the whole response; returns its status.
    async fn get(&mut self, path: &str) -> http::StatusCode {
        self.get_with(path, http::HeaderMap::new()).await
    }

    async fn get_with(&mut self, path: &str, headers: http::HeaderMap) -> http::StatusCode {
        self.request(path, headers).await.0
    }

    /// GET `path` with `headers`: the status and the body.
    async fn request(
        &mut self,
        path: &str,
        headers: http::HeaderMap,
    ) -> (http::StatusCode, String) {
        let mut request = http::Request::get(format!("http://test{path}"))
            .body(())
            .unwrap();
        *request.headers_mut() = headers;
        let send = self.send.clone().ready().await.unwrap();
        let (response, _) = send.clone().send_request(request, true).unwrap();
        let response = timeout(PATIENCE, response)
            .await
            .expect("a response in time")
            .unwrap();
        let status = response.status();
        let mut body = response.into_body();
        let mut text = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            text.extend_from_slice(&chunk);
        }
        (status, String::from_utf8(text).unwrap())
    }
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_idle_timeout() {
    let server = spawn_with(single_port(|s| s.server.idle_timeout = SHORT)).await;

    let mut h2 = RawH2::connect(server.grpc_addr).await;
    assert_eq!(h2.get("/health/live").await, http::StatusCode::OK);
    let idle_from = Instant::now();
    // A graceful close: GOAWAY, then the server ends the connection.
    timeout(PATIENCE, &mut h2.closed)
        .await
        .expect("the idle connection is closed in time")
        .unwrap()
        .expect("closed cleanly with GOAWAY");
    assert!(idle_from.elapsed() >= SHORT, "{:?}", idle_from.elapsed());

    // HTTP/1.1 keep-alive connections too.
    let mut h1 = TcpStream::connect(server.grpc_addr).await.unwrap();
    h1.write_all(b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let idle_from = Instant::now();
    let received = read_until_closed(&mut h1).await;
    assert!(received.starts_with(b"HTTP/1.1 200 OK"));
    assert!(idle_from.elapsed() >= SHORT, "{:?}", idle_from.elapsed());
    server.shutdown().await;
}

#[tokio::test]
async fn an_open_subscribe_stream_keeps_its_connection_however_quiet() {
    let server = spawn_with(single_port(|s| {
        s.server.idle_timeout = SHORT;
        s.server.handshake_timeout = SHORT;
    }))
    .await;
    let mut client = server.client().await;
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            key_pattern: "quiet/".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    // Several idle timeouts pass without a message: the stream stays open...
    let quiet = timeout(SHORT * 3, stream.message()).await;
    assert!(quiet.is_err(), "no message and no end: {quiet:?}");
    // ...and still delivers.
    client
        .set(pb::SetRequest {
            key: "quiet/a".into(),
            value: "1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let event = timeout(PATIENCE, stream.message())
        .await
        .expect("the event in time")
        .unwrap()
        .expect("the stream is still open");
    assert_eq!(event.key, "quiet/a");
    drop(stream);
    server.shutdown().await;
}

#[tokio::test]
async fn the_stream_limit_is_announced_and_a_client_queues_past_it() {
    let server = spawn_with(single_port(|s| s.server.max_streams_per_connection = 2)).await;

    let mut h2 = RawH2::connect(server.grpc_addr).await;
    // After a whole response, the server's SETTINGS have been applied.
    assert_eq!(h2.get("/health/live").await, http::StatusCode::OK);
    assert_eq!(h2.send.current_max_send_streams(), 2);

    // tonic, on one connection: two Subscribe streams open, the third waits in the client
    // until one of them ends.
    let mut client = server.client().await;
    fn request(n: usize) -> pb::SubscribeRequest {
        pb::SubscribeRequest {
            key_pattern: format!("limit/{n}/"),
            ..Default::default()
        }
    }
    let first = client.subscribe(request(1)).await.unwrap();
    let _second = client.subscribe(request(2)).await.unwrap();
    let mut third_client = client.clone();
    let mut third = tokio::spawn(async move { third_client.subscribe(request(3)).await });
    assert!(
        timeout(SHORT, &mut third).await.is_err(),
        "the third stream waits"
    );
    server.wait_for_subscriptions(2).await;

    drop(first);
    let third = timeout(PATIENCE, third)
        .await
        .expect("the third stream opens once the first ends")
        .unwrap();
    assert!(third.is_ok(), "{third:?}");
    server.wait_for_subscriptions(2).await;
    server.shutdown().await;
}

/// `server.max_header_bytes` in the header tests: hyper's ceiling is twice this.
const MAX_HEADER_BYTES: usize = 8192;

/// The JSON error of an HTTP answer's body.
fn json_error(body: &str) -> String {
    let body: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{body}"));
    body["error"].as_str().expect("an error message").to_owned()
}

#[tokio::test]
async fn headers_over_max_header_bytes_get_431_naming_it_and_up_to_it_are_served() {
    let server = spawn_with(single_port(|s| {
        s.server.max_header_bytes = MAX_HEADER_BYTES
    }))
    .await;
    let over_by_one = format!(
        "request headers of {} bytes are over the limit of {MAX_HEADER_BYTES} bytes (server.max_header_bytes)",
        MAX_HEADER_BYTES + 1
    );

    // HTTP/1.1: the request line counts as :method and :path, then host, x-big, connection.
    let h1_rest = [
        (":method", "GET"),
        (":path", "/health/live"),
        ("host", "test"),
        ("x-big", ""),
        ("connection", "close"),
    ];
    let pad = MAX_HEADER_BYTES - h1_rest.iter().map(|(n, v)| field_size(n, v)).sum::<usize>();
    let at_limit = "x".repeat(pad);
    let answer = raw_response(
        server.grpc_addr,
        "/health/live",
        &format!("x-big: {at_limit}\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    let answer = raw_response(
        server.grpc_addr,
        "/health/live",
        &format!("x-big: {at_limit}x\r\n"),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{answer}"
    );
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(json_error(body).starts_with(&over_by_one), "{body}");

    // HTTP/2 (the h2 crate sends exactly these fields): the same, and the connection goes on.
    let h2_rest = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "test"),
        (":path", "/health/live"),
        ("x-big", ""),
    ];
    let pad = MAX_HEADER_BYTES - h2_rest.iter().map(|(n, v)| field_size(n, v)).sum::<usize>();
    let at_limit = "x".repeat(pad);
    let mut h2 = RawH2::connect(server.grpc_addr).await;
    let big = |value: &str| {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-big", value.parse().unwrap());
        headers
    };
    let (status, _) = h2.request("/health/live", big(&at_limit)).await;
    assert_eq!(status, http::StatusCode::OK);
    let (status, body) = h2
        .request("/health/live", big(&format!("{at_limit}x")))
        .await;
    assert_eq!(status, http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert!(json_error(&body).starts_with(&over_by_one), "{body}");
    assert_eq!(h2.get("/health/live").await, http::StatusCode::OK);

    // gRPC: metadata counts as headers; the same channel goes on.
    let mut client = server.client().await;
    let mut request = tonic::Request::new(pb::GetRequest { key: "a".into() });
    request
        .metadata_mut()
        .insert("x-big", "x".repeat(MAX_HEADER_BYTES).parse().unwrap());
    let status = client.get(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("over the limit of 8192 bytes (server.max_header_bytes)"),
        "the client is told why: {status:?}"
    );
    client
        .get(pb::GetRequest { key: "a".into() })
        .await
        .unwrap();

    let metrics = crate::metrics::scrape(&format!("http://{}", server.grpc_addr), None).await;
    let refused = metrics.get("kvstore_limit_refusals_total{limit=\"server.max_header_bytes\"}");
    assert_eq!(refused, 3.0, "each refusal is counted");
    server.shutdown().await;
}

#[tokio::test]
async fn headers_beyond_twice_max_header_bytes_get_hypers_bare_431() {
    let server = spawn_with(single_port(|s| {
        s.server.max_header_bytes = MAX_HEADER_BYTES
    }))
    .await;
    let huge = "x".repeat(2 * MAX_HEADER_BYTES);

    // HTTP/1.1: hyper stops reading at its buffer's end, answers 431 and closes.
    let answer = raw_response(
        server.grpc_addr,
        "/health/live",
        &format!("x-big: {huge}\r\n"),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{answer}"
    );
    assert!(!answer.contains("server.max_header_bytes"), "{answer}");

    // HTTP/2, in one HEADERS frame (a field repeated is sent as an index into the HPACK
    // table): h2 refuses that stream with 431, and the connection goes on.
    let mut h2 = RawH2::connect(server.grpc_addr).await;
    let value: http::HeaderValue = "x".repeat(1000).parse().unwrap();
    let mut headers = http::HeaderMap::new();
    for _ in 0..(2 * MAX_HEADER_BYTES / 1000 + 1) {
        headers.append("x-big", value.clone());
    }
    let (status, body) = h2.request("/health/live", headers).await;
    assert_eq!(status, http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert!(body.is_empty(), "{body}");
    assert_eq!(h2.get("/health/live").await, http::StatusCode::OK);

    // gRPC: tonic maps the bare 431 to UNKNOWN; the same channel goes on.
    let mut client = server.client().await;
    let mut request = tonic::Request::new(pb::GetRequest { key: "a".into() });
    request
        .metadata_mut()
        .insert("x-big", huge.parse().unwrap());
    let status = client.get(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unknown, "{status:?}");
    assert!(status.message().contains("431"), "{status:?}");
    client
        .get(pb::GetRequest { key: "a".into() })
        .await
        .unwrap();

    // hyper's refusals are not counted: kvstore never sees them.
    let metrics = crate::metrics::scrape(&format!("http://{}", server.grpc_addr), None).await;
    let refused = metrics.get("kvstore_limit_refusals_total{limit=\"server.max_header_bytes\"}");
    assert_eq!(refused, 0.0);
    server.shutdown().await;
}

#[tokio::test]
async fn many_short_headers_within_max_header_bytes_are_served_over_http1() {
    let server = spawn_with(single_port(|s| {
        s.server.max_header_bytes = MAX_HEADER_BYTES
    }))
    .await;
    // More than hyper's default of 100 fields, each short: well within the limit.
    let fields: String = (0..150).map(|i| format!("x-{i}: y\r\n")).collect();
    assert_eq!(
        raw_get(server.grpc_addr, "/health/live", &fields)
            .await
            .as_deref(),
        Some("HTTP/1.1 200 OK")
    );
    server.shutdown().await;
}

/// A TCP proxy for one connection that can be frozen: it then stops forwarding in both
/// directions but keeps both sockets open, as a peer behind a dead network path would.
/// `upstream_closed` resolves when the server closes its side.
struct FreezableProxy {
    addr: SocketAddr,
    freeze: Option<oneshot::Sender<()>>,
    upstream_closed: JoinHandle<()>,
}

impl FreezableProxy {
    async fn start(upstream: SocketAddr) -> FreezableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (freeze, frozen) = oneshot::channel::<()>();
        let upstream_closed = tokio::spawn(async move {
            let (mut client, _) = listener.accept().await.unwrap();
            let mut server = TcpStream::connect(upstream).await.unwrap();
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {
                    panic!("the connection ended before the proxy froze");
                }
                _ = frozen => {}
            }
            // Read what the server still sends (its PINGs), answer nothing, until it closes.
            let mut sink = Vec::new();
            let _ = server.read_to_end(&mut sink).await;
            drop(client);
        });
        FreezableProxy {
            addr,
            freeze: Some(freeze),
            upstream_closed,
        }
    }

    fn freeze(&mut self) {
        let _ = self.freeze.take().expect("frozen once").send(());
    }
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_dropped_with_its_streams() {
    let server: TestServer = spawn_with(single_port(|s| {
        s.server.keepalive_interval = Duration::from_millis(100);
        s.server.keepalive_timeout = Duration::from_millis(100);
    }))
    .await;
    let mut proxy = FreezableProxy::start(server.grpc_addr).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::key_value_store_client::KeyValueStoreClient::new(channel);
    let _stream = client
        .subscribe(pb::SubscribeRequest {
            key_pattern: "dead/".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    server.wait_for_subscriptions(1).await;

    proxy.freeze();
    timeout(PATIENCE, &mut proxy.upstream_closed)
        .await
        .expect("the server drops the silent peer in time")
        .unwrap();
    // The stream the dead peer held is released with the connection.
    server.wait_for_subscriptions(0).await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_idle_peer_that_never_answers_the_goaway_is_dropped() {
    let server = spawn_with(single_port(|s| {
        s.server.keepalive_interval = Duration::ZERO;
        s.server.idle_timeout = Duration::from_millis(200);
        s.server.handshake_timeout = SHORT;
    }))
    .await;
    let mut proxy = FreezableProxy::start(server.grpc_addr).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::key_value_store_client::KeyValueStoreClient::new(channel);
    client
        .get(pb::GetRequest { key: "a".into() })
        .await
        .unwrap();

    proxy.freeze();
    let frozen = Instant::now();
    timeout(PATIENCE, &mut proxy.upstream_closed)
        .await
        .expect("the server drops the silent peer in time")
        .unwrap();
    // The graceful close had handshake_timeout to complete first.
    assert!(frozen.elapsed() >= SHORT, "{:?}", frozen.elapsed());
    server.shutdown().await;
}

/// A TCP connection to `addr` from the loopback address `source` (Linux routes all of
/// 127.0.0.0/8 to the loopback interface), so the server sees another client address.
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(addr).await.unwrap()
}

/// The whole answer to `GET path` over HTTP/1.1 with `connection: close` from `source`, read
/// until the server closes.
async fn raw_response_from(source: &str, addr: SocketAddr, path: &str) -> String {
    let mut stream = connect_from(source, addr).await;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let _ = stream.write_all(request.as_bytes()).await;
    String::from_utf8_lossy(&read_until_closed(&mut stream).await).into_owned()
}

/// An HTTP/2 connection (the `h2` crate) from `source`, with one request answered, so it is
/// open and counted.
async fn h2_from(source: &str, addr: SocketAddr) -> RawH2 {
    let tcp = connect_from(source, addr).await;
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    let mut h2 = RawH2 {
        send,
        closed: tokio::spawn(connection),
    };
    assert_eq!(h2.get("/health/live").await, http::StatusCode::OK);
    h2
}

/// The value of one sample in a `/metrics` answer.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in {metrics}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn one_address_past_max_connections_per_address_is_refused_while_another_connects() {
    let server = spawn_with(single_port(|s| s.server.max_connections_per_address = 2)).await;
    let _first = h2_from("127.0.0.1", server.grpc_addr).await;
    let mut second = h2_from("127.0.0.1", server.grpc_addr).await;

    // The third from the same address is told why, in its own protocol.
    let reason = "server.max_connections_per_address (2) connections are open from this address";
    let refused = raw_response_from("127.0.0.1", server.grpc_addr, "/health/live").await;
    assert!(
        refused.starts_with("HTTP/1.1 503 Service Unavailable\r\n")
            && refused.contains("retry-after: 1")
            && refused.contains(reason),
        "{refused}"
    );
    let status = server
        .client()
        .await
        .get(pb::GetRequest { key: "a".into() })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains(reason), "{status:?}");

    // Another address is not affected, nor are the open connections.
    let other = raw_response_from("127.0.0.2", server.grpc_addr, "/metrics").await;
    assert!(other.starts_with("HTTP/1.1 200 OK"), "{other}");
    let series = "kvstore_limit_refusals_total{limit=\"server.max_connections_per_address\"}";
    assert_eq!(sample(&other, series), 2.0, "each refusal is counted");
    assert_eq!(second.get("/health/live").await, http::StatusCode::OK);
    server.shutdown().await;
}

#[tokio::test]
async fn a_trusted_proxy_is_exempt_from_the_per_address_cap() {
    let server = spawn_with(single_port(|s| {
        s.server.max_connections_per_address = 1;
        s.server.trusted_proxies = vec!["127.0.0.2/32".parse().unwrap()];
    }))
    .await;
    let mut proxied = Vec::new();
    for _ in 0..3 {
        proxied.push(h2_from("127.0.0.2", server.grpc_addr).await);
    }
    // The cap holds for everyone else.
    let _own = h2_from("127.0.0.1", server.grpc_addr).await;
    let refused = raw_response_from("127.0.0.1", server.grpc_addr, "/health/live").await;
    assert!(
        refused.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{refused}"
    );
    for h2 in &mut proxied {
        assert_eq!(h2.get("/health/live").await, http::StatusCode::OK);
    }
    server.shutdown().await;
}

/// An HTTP/2 frame header: payload length, type, flags, stream id.
fn frame_header(len: u32, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
    let mut header = len.to_be_bytes()[1..].to_vec();
    header.extend([kind, flags]);
    header.extend(stream.to_be_bytes());
    header
}

const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

/// Speaks HTTP/2 by hand on `stream`: the preface, then a GET of `/health/live` on stream 1,
/// read until its answer ends (acknowledging the server's SETTINGS). Every frame is whole.
async fn one_request_by_hand(stream: &mut TcpStream) {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame_header(0, SETTINGS, 0, 0));
    // HPACK: :method GET, :scheme http (static table), :path and :authority as literals.
    let mut block = vec![0x82, 0x86, 0x04, 12];
    block.extend(b"/health/live");
    block.extend([0x01, 4]);
    block.extend(b"test");
    out.extend(frame_header(
        block.len() as u32,
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
    ));
    out.extend(block);
    stream.write_all(&out).await.unwrap();
    timeout(PATIENCE, async {
        loop {
            let mut header = [0u8; 9];
            stream.read_exact(&mut header).await.unwrap();
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let mut payload = vec![0; len];
            stream.read_exact(&mut payload).await.unwrap();
            let (kind, flags) = (header[3], header[4]);
            let id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
            if kind == SETTINGS && flags & ACK == 0 {
                stream
                    .write_all(&frame_header(0, SETTINGS, ACK, 0))
                    .await
                    .unwrap();
            }
            // DATA or HEADERS ending stream 1: the answer is complete.
            if id == 1 && kind <= HEADERS && flags & END_STREAM != 0 {
                return;
            }
        }
    })
    .await
    .expect("the request is answered in time");
}

/// Sends `bytes` one at a time, `every` apart, until they run out or the server closes.
/// The tests give it more than they can wait for, so only the server ends it.
fn dribble(mut writer: tokio::net::tcp::OwnedWriteHalf, bytes: Vec<u8>, every: Duration) {
    tokio::spawn(async move {
        for byte in bytes {
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
}

#[tokio::test]
async fn a_partial_frame_after_a_request_is_cut_after_the_handshake_timeout() {
    // The idle timeout is far longer than the test: only the handshake clock can close it.
    let server = spawn_with(single_port(|s| s.server.handshake_timeout = SHORT)).await;
    let mut stream = TcpStream::connect(server.grpc_addr).await.unwrap();
    one_request_by_hand(&mut stream).await;

    // The next request's HEADERS frame a byte every SHORT / 6: it would take a minute.
    let started = Instant::now();
    let mut partial = frame_header(1200, HEADERS, END_STREAM | END_HEADERS, 3);
    partial.extend([0; 1200]);
    let (mut reader, writer) = stream.into_split();
    dribble(writer, partial, SHORT / 6);
    let mut sink = Vec::new();
    // A reset counts as closed too: either way the server is done with it.
    let _ = timeout(PATIENCE, reader.read_to_end(&mut sink))
        .await
        .expect("the server closes the connection in time");
    let took = started.elapsed();
    assert!(took >= SHORT && took < SHORT * 4, "{took:?}");

    let metrics = crate::metrics::scrape(&server.grpc_url(), None).await;
    let cut = metrics.get("kvstore_limit_refusals_total{limit=\"server.handshake_timeout\"}");
    assert_eq!(cut, 1.0, "the cut is counted");
    server.shutdown().await;
}

#[tokio::test]
async fn a_partial_http1_request_after_a_request_is_cut_after_the_handshake_timeout() {
    let server = spawn_with(single_port(|s| s.server.handshake_timeout = SHORT)).await;
    let mut stream = TcpStream::connect(server.grpc_addr).await.unwrap();
    stream
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    // The answer is small: it ends with its body, `{"status":"..."}` or similar JSON.
    let mut answer = Vec::new();
    timeout(PATIENCE, async {
        while !answer.ends_with(b"}") {
            let mut byte = [0u8; 256];
            let n = stream.read(&mut byte).await.unwrap();
            assert!(n > 0, "closed before answering");
            answer.extend_from_slice(&byte[..n]);
        }
    })
    .await
    .expect("answered in time");
    assert!(answer.starts_with(b"HTTP/1.1 200 OK"));

    let started = Instant::now();
    let (mut reader, writer) = stream.into_split();
    // The next request's head, with a field that would take a minute to arrive.
    let mut head = b"GET /health/live HTTP/1.1\r\nHost: test\r\nx-slow: ".to_vec();
    head.extend([b'x'; 1200]);
    dribble(writer, head, SHORT / 6);
    let mut rest = Vec::new();
    let _ = timeout(PATIENCE, reader.read_to_end(&mut rest))
        .await
        .expect("the server closes the connection in time");
    let took = started.elapsed();
    assert!(took >= SHORT && took < SHORT * 4, "{took:?}");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    server.shutdown().await;
}

#[tokio::test]
async fn an_address_opening_connections_past_its_rate_is_closed_unanswered_while_others_connect() {
    let server = spawn_with(single_port(|s| {
        s.server.new_connections_per_address = 1;
        s.server.new_connections_burst = 3;
        s.server.trusted_proxies = vec!["127.0.0.3/32".parse().unwrap()];
    }))
    .await;
    let mut within = Vec::new();
    for _ in 0..3 {
        within.push(h2_from("127.0.0.2", server.grpc_addr).await);
    }
    // The fourth within the second is closed before anything is read from it: no answer,
    // not even the refusal that the connection caps give.
    let closed = raw_response_from("127.0.0.2", server.grpc_addr, "/health/live").await;
    assert_eq!(closed, "", "closed without an answer");

    // The connections within the rate go on; another address, and a trusted proxy whatever
    // its rate, connect.
    for h2 in &mut within {
        assert_eq!(h2.get("/health/live").await, http::StatusCode::OK);
    }
    let mut proxied = Vec::new();
    for _ in 0..5 {
        proxied.push(h2_from("127.0.0.3", server.grpc_addr).await);
    }
    let other = raw_response_from("127.0.0.1", server.grpc_addr, "/metrics").await;
    assert!(other.starts_with("HTTP/1.1 200 OK"), "{other}");
    let series = "kvstore_limit_refusals_total{limit=\"server.new_connections_per_address\"}";
    assert_eq!(
        sample(&other, series),
        1.0,
        "the closed connection is counted"
    );
    server.shutdown().await;
}
