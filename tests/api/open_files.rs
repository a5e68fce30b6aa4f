//! The real `kvstore-server` binary under a low open-file limit (`RLIMIT_NOFILE`), set for the
//! child alone before it starts: the soft limit is raised to the hard one, and when that is
//! still too low for `server.max_connections`, connections are capped below it and refused
//! past the cap like those past `server.max_connections`.

use std::io;
use std::time::Duration;

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::{Instant, timeout};

use crate::binaries::{Running, server_command};
use crate::helpers::PATIENCE;

/// The server binary, to be started with this open-file limit.
fn limited(soft: u64, hard: u64) -> Command {
    let mut command = server_command();
    set_open_files(&mut command, soft, hard);
    command
}

#[allow(unsafe_code)]
fn set_open_files(command: &mut Command, soft: u64, hard: u64) {
    // SAFETY: runs in the forked child before exec; setrlimit is a single system call, safe
    // there (async-signal-safe), and it neither allocates nor takes a lock.
    unsafe {
        command.pre_exec(move || {
            setrlimit(Resource::RLIMIT_NOFILE, soft, hard).map_err(io::Error::from)
        });
    }
}

/// The soft and hard "Max open files" of a running process, from `/proc/PID/limits`.
fn open_files_of(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("{limits}"));
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

/// The start-up line with this message (its start), if the server logged one.
fn startup_line<'a>(server: &'a Running, message: &str) -> Option<&'a Value> {
    server.startup.iter().find(|line| {
        line["message"]
            .as_str()
            .is_some_and(|text| text.starts_with(message))
    })
}

#[tokio::test]
async fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    // A child may lower its hard limit, never raise it above this process's.
    let (_, allowed) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let hard = allowed.min(4096);
    assert!(
        hard > 256,
        "this test needs a hard open-file limit above 256, not {hard}"
    );
    let server = Running::start_on(&mut limited(256, hard), "127.0.0.1:0").await;
    let pid = server.child.id().expect("still running");
    assert_eq!(open_files_of(pid), (hard, hard));
    let raised = startup_line(&server, "raised the open-file limit")
        .unwrap_or_else(|| panic!("{:?}", server.startup));
    assert_eq!(
        (raised["from"].as_u64(), raised["to"].as_u64()),
        (Some(256), Some(hard))
    );
}

/// More idle connections than the open-file limit has room for.
const IDLE: usize = 300;

#[tokio::test]
async fn short_of_file_descriptors_connections_are_capped_and_refused_past_the_cap() {
    let mut command = limited(256, 256);
    // The idle connections must stay open for the whole test.
    command.env("KVSTORE_SERVER__HANDSHAKE_TIMEOUT", "60s");
    let mut server = Running::start_on(&mut command, "127.0.0.1:0").await;

    // The start-up line gives the numbers and the setting to change.
    let capped = startup_line(&server, "the open-file limit (RLIMIT_NOFILE) is below")
        .unwrap_or_else(|| panic!("no warning about the open-file limit: {:?}", server.startup));
    assert_eq!(capped["level"], "WARN");
    assert_eq!(capped["open_files"], 256);
    assert_eq!(capped["max_connections"], 10000);
    let cap = capped["connection_cap"].as_u64().unwrap();
    assert!((1..256).contains(&cap), "{capped}");
    assert!(
        capped["message"]
            .as_str()
            .unwrap()
            .contains("server.max_connections"),
        "{capped}"
    );

    // Without the cap, accept() would fail with EMFILE from about 250 connections on, and
    // every later client would wait unanswered in the backlog.
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(server.main).await.unwrap());
    }

    // The next client is told why. Refusals are answered 64 at a time, for up to a second
    // each, and the idle connections past the cap took those places: until they are done, a
    // refused client may be closed without a word, so ask again for a bounded time.
    let asked = Instant::now();
    let answer = loop {
        let answer = http_get(server.main).await;
        if !answer.is_empty() || asked.elapsed() > PATIENCE {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n")
            && answer.contains("retry-after: 1")
            && answer.contains("server.max_connections"),
        "the client past the cap is told why: {answer}"
    );

    // Once the idle connections are gone, clients are served again, and the refusals were
    // counted under the setting that was lowered.
    drop(idle);
    let freed = Instant::now();
    let metrics = loop {
        let answer = http_get_path(server.main, "/metrics").await;
        if answer.starts_with("HTTP/1.1 200 OK") || freed.elapsed() > PATIENCE {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let refused = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("kvstore_limit_refusals_total{limit=\"server.max_connections\"} ")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(
        refused.parse::<f64>().unwrap() >= (IDLE as u64 - cap) as f64,
        "{refused}"
    );

    // The log says so once a while, not on every connection or accept.
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let mut warnings = Vec::new();
    timeout(PATIENCE, async {
        while let Some(line) = server.logs.next_line().await.unwrap() {
            let line: Value = serde_json::from_str(&line).unwrap();
            if line["level"] == "WARN" {
                warnings.push(line);
            }
        }
    })
    .await
    .expect("the server exits in time");
    assert!(
        warnings
            .iter()
            .all(|line| line["message"] != "accepting connections failed; retrying every 100 ms"),
        "{warnings:?}"
    );
    assert!(warnings.len() <= 2, "{warnings:?}");
    let status = timeout(PATIENCE, server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// GET `/health/live` over HTTP/1.1 on a new connection; everything the server sent before
/// closing (empty if it closed without a word).
async fn http_get(addr: std::net::SocketAddr) -> String {
    http_get_path(addr, "/health/live").await
}

async fn http_get_path(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    // A refused connection may be closed before the request is written; the read shows it.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut received = Vec::new();
    let _ = timeout(PATIENCE, stream.read_to_end(&mut received))
        .await
        .expect("the server answers or closes in time, not leaving the client waiting");
    String::from_utf8_lossy(&received).into_owned()
}
