//! Answers built and not yet taken: a client that announces a zero HTTP/2 window and never
//! reads gets no more than its connection's share of the server's memory, the server as a
//! whole keeps within `server.max_answer_bytes_in_flight`, a stream that makes no progress is
//! reset after `server.send_timeout`, and a quiet Subscribe stream is not.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Bytes;
use kvstore::config::Settings;
use kvstore::pb::{GetRequest, ListRequest, SetRequest, SubscribeRequest};
use prost::Message as _;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tonic::Code;

use crate::bounded::{MEASURING_RSS, rss};
use crate::helpers::{PATIENCE, TestServer, spawn_with, test_settings};
use crate::metrics::scrape;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const LIST: &str = "/kvstore.KeyValueStore/List";

/// Answers of about 768 KiB: a List of `big/` is three values of 256 KiB (a fourth would
/// pass `limits.max_response_bytes`, 1 MiB).
fn settings() -> Settings {
    let mut s = test_settings();
    s.limits.max_value_bytes = 256 * KIB;
    s.limits.max_response_bytes = MIB;
    s.server.max_answer_bytes_per_connection = 4 * MIB;
    s.server.max_answer_bytes_in_flight = 8 * MIB;
    s
}

async fn store_big_values(server: &TestServer) {
    let mut client = server.client().await;
    for i in 0..4 {
        client
            .set(SetRequest {
                key: format!("big/{i}"),
                value: "x".repeat(256 * KIB),
                ..SetRequest::default()
            })
            .await
            .unwrap();
    }
}

/// A connection that announces a zero window for every stream and never opens it.
struct Attacker {
    send: h2::client::SendRequest<Bytes>,
    _connection: JoinHandle<Result<(), h2::Error>>,
}

impl Attacker {
    async fn connect(addr: SocketAddr) -> Attacker {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(0)
            .handshake(tcp)
            .await
            .unwrap();
        Attacker {
            send,
            _connection: tokio::spawn(connection),
        }
    }

    /// A List of `big/`, sent whole (a 90-byte request).
    async fn list(&mut self) -> h2::client::ResponseFuture {
        let message = ListRequest {
            prefix: "big/".into(),
            limit: 100,
            start_after: String::new(),
        }
        .encode_to_vec();
        let mut body = vec![0];
        body.extend(u32::try_from(message.len()).unwrap().to_be_bytes());
        body.extend(message);
        let request = http::Request::post(format!("http://test{LIST}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let mut send = self.send.clone().ready().await.unwrap();
        let (response, mut stream) = send.send_request(request, false).unwrap();
        stream.send_data(Bytes::from(body), true).unwrap();
        response
    }
}

/// What a call's headers say: refused (trailers-only, with its status and message), or an
/// answer on its way, whose body the attacker leaves unread.
enum Answer {
    Refused(Code, String),
    Coming(h2::RecvStream),
}

async fn headers(response: h2::client::ResponseFuture) -> Answer {
    let response = timeout(PATIENCE, response)
        .await
        .expect("headers in time")
        .expect("headers, not a reset");
    let (parts, body) = response.into_parts();
    match parts.headers.get("grpc-status") {
        Some(code) => Answer::Refused(
            Code::from_bytes(code.as_bytes()),
            parts
                .headers
                .get("grpc-message")
                .map(|v| v.to_str().unwrap().replace("%20", " "))
                .unwrap_or_default(),
        ),
        None => Answer::Coming(body),
    }
}

/// Three connections × 100 Lists of 768 KiB answers, none of them read: before the budget,
/// every answer stayed buffered (about 230 MB here). Now each connection holds at most its
/// share (4 MiB), the server at most its budget (8 MiB), the rest are refused naming the
/// limit, and a client on another connection is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_answers_are_held_to_the_connection_share_and_the_server_budget() {
    if !cfg!(target_os = "linux") {
        eprintln!("SKIPPED: reads RSS from /proc");
        return;
    }
    let _measuring = MEASURING_RSS.lock().await;
    let server = spawn_with(settings()).await;
    store_big_values(&server).await;
    let mut honest = server.client().await;
    let baseline = rss();

    let mut attackers = Vec::new();
    let mut coming = Vec::new();
    let (mut per_connection, mut in_flight) = (0, 0);
    for _ in 0..3 {
        let mut attacker = Attacker::connect(server.grpc_addr).await;
        let mut responses = Vec::new();
        for _ in 0..100 {
            responses.push(attacker.list().await);
        }
        for response in responses {
            match headers(response).await {
                Answer::Coming(body) => coming.push(body),
                Answer::Refused(code, message) => {
                    assert_eq!(code, Code::ResourceExhausted, "{message}");
                    if message.contains("server.max_answer_bytes_per_connection") {
                        per_connection += 1;
                    } else {
                        assert!(
                            message.contains("server.max_answer_bytes_in_flight"),
                            "{message}"
                        );
                        in_flight += 1;
                    }
                }
            }
        }
        attackers.push(attacker);
    }
    let grown = rss().saturating_sub(baseline);
    eprintln!(
        "300 unread answers of 768 KiB: {} coming, {per_connection} refused for the connection's \
         share, {in_flight} for the server's budget; RSS +{} MiB",
        coming.len(),
        grown / MIB
    );
    // Five answers fit in a connection's 4 MiB, and ten in the server's 8 MiB: two
    // connections' worth; the third's do not fit.
    assert_eq!(coming.len(), 10);
    assert!(per_connection > 0 && in_flight > 0);
    assert!(
        grown < 8 * MIB + 32 * MIB,
        "RSS grew by {} MiB, over the 8 MiB budget and 32 MiB of slack",
        grown / MIB
    );

    // A client that reads its answers is served on its own connection, small answers and
    // large reads alike once it asks for what fits.
    for _ in 0..10 {
        let got = honest
            .get(GetRequest {
                key: "big/0".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.value.len(), 256 * KIB);
    }

    let metrics = scrape(&server.health_url(), None).await;
    assert_eq!(
        metrics.refusals("server.max_answer_bytes_per_connection"),
        f64::from(per_connection)
    );
    assert_eq!(
        metrics.refusals("server.max_answer_bytes_in_flight"),
        f64::from(in_flight)
    );
    drop((coming, attackers));
    server.shutdown().await;
}

/// A stream whose answer waits on a shut window is reset once `server.send_timeout` passes
/// without progress, which gives its connection's share back: the same connection's next
/// calls are answered, not refused.
#[tokio::test]
async fn a_stream_whose_window_stays_shut_is_reset_after_the_send_timeout() {
    let mut settings = settings();
    settings.server.send_timeout = Duration::from_millis(500);
    let server = spawn_with(settings).await;
    store_big_values(&server).await;
    let mut attacker = Attacker::connect(server.grpc_addr).await;
    let mut bodies = Vec::new();
    // A call starts only where the largest answer (1 MiB and its framing) still fits in the
    // 4 MiB share: after three answers of 768 KiB, a fourth; after four, none.
    for _ in 0..4 {
        let response = attacker.list().await;
        let Answer::Coming(body) = headers(response).await else {
            panic!("four answers fit in the connection's share");
        };
        bodies.push(body);
    }
    // The share has no room for another: the fifth is refused before it is built.
    let Answer::Refused(code, _) = headers(attacker.list().await).await else {
        panic!("a fifth answer does not fit");
    };
    assert_eq!(code, Code::ResourceExhausted);
    for mut body in bodies {
        let reset = timeout(PATIENCE, body.data())
            .await
            .expect("the stream is reset in time")
            .expect("a reset, not the end")
            .expect_err("no data: the window is shut");
        assert_eq!(reset.reason(), Some(h2::Reason::CANCEL), "{reset}");
    }
    let metrics = scrape(&server.health_url(), None).await;
    assert_eq!(metrics.refusals("server.send_timeout"), 4.0);
    // Their memory is given back: the connection gets work again.
    let Answer::Coming(_body) = headers(attacker.list().await).await else {
        panic!("the share is free again after the resets");
    };
    server.shutdown().await;
}

/// A Subscribe stream with nothing to send is waiting for events, not for its client: a
/// quiet stream outlives the send timeout and still delivers.
#[tokio::test]
async fn a_quiet_subscribe_stream_is_not_cut_by_the_send_timeout() {
    let mut settings = settings();
    settings.server.send_timeout = Duration::from_millis(300);
    let server = spawn_with(settings).await;
    let mut client = server.client().await;
    let mut stream = client
        .subscribe(SubscribeRequest {
            key_pattern: "quiet/".into(),
            ..SubscribeRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    timeout(Duration::from_millis(900), stream.message())
        .await
        .expect_err("no event yet");
    client
        .set(SetRequest {
            key: "quiet/1".into(),
            value: "v".into(),
            ..SetRequest::default()
        })
        .await
        .unwrap();
    let event = timeout(PATIENCE, stream.message())
        .await
        .expect("the event in time")
        .unwrap()
        .expect("an event");
    assert_eq!(event.key, "quiet/1");
    let metrics = scrape(&server.health_url(), None).await;
    assert_eq!(metrics.refusals("server.send_timeout"), 0.0);
    server.shutdown().await;
}
