//! What a client can make the real `kvstore-server` binary write to its log: failures it
//! causes must cost a bounded number of bytes, whatever their number and whatever text the
//! client chooses, in both log formats.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::binaries::{Running, server_command};
use crate::helpers::PATIENCE;

/// Failing requests sent in all; each kind used to write a line of its own at WARN or ERROR.
const REQUESTS: usize = 5_000;

/// The most log bytes the whole flood may cause, shutdown lines included: a few lines, where
/// one line per request was 13 MB.
const MAX_LOG_BYTES: usize = 4 * 1024;

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    request: http::Request<Full<Bytes>>,
) -> http::StatusCode {
    let response = timeout(PATIENCE, client.request(request))
        .await
        .expect("an answer in time")
        .expect("an answer");
    let status = response.status();
    response.into_body().collect().await.expect("a whole body");
    status
}

#[tokio::test]
async fn five_thousand_failing_requests_write_a_few_kilobytes_of_log_at_most() {
    let mut command = server_command();
    // Long enough that /health/ready answers 503 throughout the last part of the flood.
    command.env("KVSTORE_SHUTDOWN__DRAIN_DELAY", "60s");
    let Running {
        mut child,
        mut logs,
        main,
        ..
    } = Running::start_on(&mut command, "127.0.0.1:0").await;
    let pid = Pid::from_raw(i32::try_from(child.id().expect("running")).unwrap());
    // Read at once, as a log collector would: a full pipe would stall the server.
    let (messages, mut seen) = mpsc::unbounded_channel();
    let stdout = tokio::spawn(async move {
        let (mut written, mut first) = (0, Vec::new());
        while let Some(line) = logs.next_line().await.unwrap() {
            written += line.len() + 1;
            let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
            let _ = messages.send(parsed["message"].as_str().unwrap_or_default().to_owned());
            if first.len() < 5 {
                first.push(line.chars().take(300).collect::<String>());
            }
        }
        (written, first)
    });
    let mut stderr = child.stderr.take().unwrap();
    let stderr = tokio::spawn(async move {
        let mut text = Vec::new();
        stderr.read_to_end(&mut text).await.unwrap();
        text
    });
    let base = format!("http://{main}");
    // Without TCP_NODELAY each small request waits out a delayed ACK (40 ms).
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector.clone());
    let h1 = Client::builder(TokioExecutor::new()).build(connector);
    let long = "A".repeat(4000);

    // Unknown methods of the health service, with a long client-chosen path: tower-http
    // logged each at WARN, the whole URI in the line.
    let grpc = |path: String, body: &'static [u8]| {
        http::Request::post(format!("{base}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(body)))
            .unwrap()
    };
    for _ in 0..2_000 {
        let path = format!("/grpc.health.v1.Health/{long}");
        assert_eq!(send(&h2, grpc(path, b"")).await, http::StatusCode::OK);
    }
    // Set messages that do not decode (a field of wire type 7): INTERNAL, logged at WARN.
    const UNDECODABLE: &[u8] = &[0, 0, 0, 0, 1, 0x0f];
    for _ in 0..2_000 {
        let path = "/kvstore.KeyValueStore/Set".to_owned();
        assert_eq!(
            send(&h2, grpc(path, UNDECODABLE)).await,
            http::StatusCode::OK
        );
    }

    // While draining, each /health/ready was an ERROR line carrying the client's URI.
    kill(pid, Signal::SIGTERM).unwrap();
    loop {
        let message = timeout(PATIENCE, seen.recv()).await.unwrap().unwrap();
        if message == "shutdown: still serving while load balancers react" {
            break;
        }
    }
    for _ in 0..REQUESTS - 4_000 {
        let ready = http::Request::get(format!("{base}/health/ready?{long}"))
            .body(Full::default())
            .unwrap();
        assert_eq!(
            send(&h1, ready).await,
            http::StatusCode::SERVICE_UNAVAILABLE
        );
    }

    // A second signal exits at once; every line written is then in the pipes.
    kill(pid, Signal::SIGTERM).unwrap();
    let (written, first) = timeout(PATIENCE, stdout).await.unwrap().unwrap();
    let stderr = timeout(PATIENCE, stderr).await.unwrap().unwrap();
    let written = written + stderr.len();
    assert!(
        written <= MAX_LOG_BYTES,
        "{REQUESTS} failing requests wrote {written} bytes of log; the first lines:\n{}",
        first.join("\n")
    );
}

#[tokio::test]
async fn the_text_log_has_no_colour_when_stdout_is_not_a_terminal() {
    let mut command = server_command();
    let mut child = command
        .args(["--listen", "127.0.0.1:0", "--health-listen", ""])
        .args(["--log-format", "text"])
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut text = Vec::new();
    // Up to the main listener's start-up line.
    while !String::from_utf8_lossy(&text).contains("listening") {
        let mut chunk = [0; 4096];
        let n = timeout(PATIENCE, stdout.read(&mut chunk))
            .await
            .expect("start-up logs in time")
            .unwrap();
        assert_ne!(
            n,
            0,
            "the server exited: {}",
            String::from_utf8_lossy(&text)
        );
        text.extend_from_slice(&chunk[..n]);
    }
    child.start_kill().unwrap();
    let text = String::from_utf8(text).unwrap();
    assert!(!text.contains('\u{1b}'), "ANSI escapes in a pipe: {text:?}");
}
