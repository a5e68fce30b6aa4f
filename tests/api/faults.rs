//! Faults, against the real `kvstore-server` binary: a subscriber process killed mid-stream,
//! SIGTERM under full write load (every acknowledged write reaches every matching subscriber
//! before its stream ends with UNAVAILABLE), and SIGKILL under load followed by a restart on
//! the same port. A peer whose connection goes silent without a FIN is dropped by keepalive:
//! `connections::a_peer_that_stops_answering_pings_is_dropped_with_its_streams`.

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt as _;
use std::time::Duration;

use kvstore::pb::key_value_store_client::KeyValueStoreClient;
use kvstore::pb::{
    BatchOp, BatchRequest, ChangeEvent, GetRequest, SetRequest, SubscribeRequest, batch_op,
    batch_result,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{BufReader, Lines};
use tokio::process::{Child, ChildStdout};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::binaries::{Running, server_command};
use crate::client::{Subscriber, kvstore_client};
use crate::helpers::{PATIENCE, http_get};
use crate::metrics::scrape;

/// Upper bound on the calls of one writer, so no loop is unbounded even if the server never
/// stops it.
const MAX_CALLS: usize = 1_000_000;

/// Every fifth call of a writer is a Batch of this many sets.
const BATCH_SETS: usize = 4;

/// One change as a writer saw it acknowledged, or a subscriber saw it arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Change {
    revision: i64,
    key: String,
    value: String,
}

impl From<ChangeEvent> for Change {
    fn from(event: ChangeEvent) -> Self {
        Self {
            revision: event.revision,
            key: event.key,
            value: event.value,
        }
    }
}

async fn connect(addr: SocketAddr) -> KeyValueStoreClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connecting to the server");
    KeyValueStoreClient::new(channel)
}

/// A server binary whose log lines are read to the end by a task of their own, so a server
/// logging under load never blocks on a full pipe.
struct Server {
    child: Child,
    addr: SocketAddr,
    logs: JoinHandle<Vec<Value>>,
}

impl Server {
    async fn start(env: &[(&str, &str)], listen: &str) -> Self {
        let mut command = server_command();
        command.envs(env.iter().copied());
        let Running {
            child, logs, main, ..
        } = Running::start_on(&mut command, listen).await;
        Self {
            child,
            addr: main,
            logs: tokio::spawn(read_logs(logs)),
        }
    }

    fn signal(&self, signal: Signal) {
        let pid = self.child.id().expect("the server is running");
        kill(Pid::from_raw(pid.try_into().unwrap()), signal).unwrap();
    }

    /// Waits for the process to end; returns how it ended and its log lines.
    async fn exited(mut self) -> (std::process::ExitStatus, Vec<Value>) {
        let status = timeout(PATIENCE, self.child.wait())
            .await
            .expect("the server exits in time")
            .unwrap();
        let logs = timeout(PATIENCE, self.logs)
            .await
            .expect("the log pipe closes with the process")
            .unwrap();
        (status, logs)
    }
}

async fn read_logs(mut logs: Lines<BufReader<ChildStdout>>) -> Vec<Value> {
    let mut lines = Vec::new();
    while let Ok(Some(line)) = logs.next_line().await {
        lines.push(serde_json::from_str(&line).unwrap_or(Value::String(line)));
    }
    lines
}

fn logged(logs: &[Value], message: &str) -> bool {
    logs.iter().any(|line| line["message"] == message)
}

/// Subscribes on a connection of its own, then reads the stream to its end in a task: the
/// changes received, and the status that ended it.
async fn subscriber(addr: SocketAddr, pattern: &str) -> JoinHandle<(Vec<Change>, Status)> {
    let stream = connect(addr)
        .await
        .subscribe(SubscribeRequest {
            key_pattern: pattern.into(),
            ..Default::default()
        })
        .await
        .expect("subscribing")
        .into_inner();
    tokio::spawn(read_to_end(stream))
}

async fn read_to_end(mut stream: Streaming<ChangeEvent>) -> (Vec<Change>, Status) {
    let mut changes = Vec::new();
    loop {
        let next = timeout(PATIENCE, stream.message())
            .await
            .expect("a change or the end of the stream in time");
        match next {
            Ok(Some(event)) => changes.push(Change::from(event)),
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => return (changes, status),
        }
    }
}

/// What one writer did: every write the server acknowledged, and the status of the call
/// that failed, if one did.
struct Run {
    acked: Vec<Change>,
    failed: Option<Status>,
    client: KeyValueStoreClient<Channel>,
}

/// Writes as fast as one connection allows until a call fails or `stop`: Sets, and every
/// fifth call a Batch of sets, to keys under `prefixes` in turn. `acked` counts the writes
/// acknowledged so far. No call may hang.
fn writer(
    mut client: KeyValueStoreClient<Channel>,
    id: usize,
    prefixes: &'static [&'static str],
    acked: watch::Sender<usize>,
    stop: CancellationToken,
) -> JoinHandle<Run> {
    tokio::spawn(async move {
        let mut run = Vec::new();
        for call in 0..MAX_CALLS {
            if stop.is_cancelled() {
                break;
            }
            let prefix = prefixes[(call + id) % prefixes.len()];
            let sets: Vec<SetRequest> = (0..if call % 5 == 4 { BATCH_SETS } else { 1 })
                .map(|op| SetRequest {
                    key: format!("{prefix}{id}/{call}.{op}"),
                    value: format!("writer {id} call {call} op {op}"),
                    ..Default::default()
                })
                .collect();
            let revisions = match sets.as_slice() {
                [set] => timeout(PATIENCE, client.set(set.clone()))
                    .await
                    .expect("a Set never hangs")
                    .map(|r| vec![r.into_inner().revision]),
                _ => {
                    let ops = sets
                        .iter()
                        .map(|set| BatchOp {
                            op: Some(batch_op::Op::Set(set.clone())),
                        })
                        .collect();
                    timeout(PATIENCE, client.batch(BatchRequest { ops }))
                        .await
                        .expect("a Batch never hangs")
                        .map(|r| {
                            r.into_inner()
                                .results
                                .into_iter()
                                .map(|result| match result.result {
                                    Some(batch_result::Result::Set(set)) => set.revision,
                                    other => panic!("a set's result: {other:?}"),
                                })
                                .collect()
                        })
                }
            };
            match revisions {
                Ok(revisions) => {
                    run.extend(
                        sets.into_iter()
                            .zip(revisions)
                            .map(|(set, revision)| Change {
                                revision,
                                key: set.key,
                                value: set.value,
                            }),
                    );
                    acked.send_replace(run.len());
                }
                Err(status) => {
                    return Run {
                        acked: run,
                        failed: Some(status),
                        client,
                    };
                }
            }
        }
        Run {
            acked: run,
            failed: None,
            client,
        }
    })
}

/// Starts `n` writers, each on a connection of its own, and returns once each has had
/// `warm_up` writes acknowledged.
async fn writers(
    addr: SocketAddr,
    n: usize,
    prefixes: &'static [&'static str],
    warm_up: usize,
    stop: &CancellationToken,
) -> Vec<JoinHandle<Run>> {
    let mut tasks = Vec::new();
    let mut progress = Vec::new();
    for id in 0..n {
        let (acked, seen) = watch::channel(0);
        tasks.push(writer(
            connect(addr).await,
            id,
            prefixes,
            acked,
            stop.clone(),
        ));
        progress.push(seen);
    }
    for seen in &mut progress {
        timeout(PATIENCE, seen.wait_for(|&n| n >= warm_up))
            .await
            .expect("the writers get going in time")
            .expect("a writer stopped early");
    }
    tasks
}

/// Scrapes `GET /metrics` until `series` has `value`, a bounded number of times.
async fn wait_for_metric(addr: SocketAddr, series: &str, value: f64) {
    let base = format!("http://{addr}");
    let deadline = Instant::now() + PATIENCE;
    for _ in 0..10_000 {
        if scrape(&base, None).await.get(series) == value {
            return;
        }
        assert!(Instant::now() < deadline, "{series} never became {value}");
    }
    panic!("{series} never became {value}");
}

/// Sockets of the kernel's TCP table (IPv4) still bound to local `port` but not listening:
/// what a killed server leaves behind in FIN_WAIT or TIME_WAIT, and what makes a bind without
/// SO_REUSEADDR fail. `None` where there is no /proc.
fn lingering_sockets(port: u16) -> Option<usize> {
    const LISTEN: &str = "0A";
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port = format!(":{port:04X}");
    Some(
        table
            .lines()
            .skip(1)
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.len() > 3 && fields[1].ends_with(&port) && fields[3] != LISTEN
            })
            .count(),
    )
}

/// Whether a write failed without having been applied, in one of the ways a tonic client
/// reports it during a graceful shutdown: `UNAVAILABLE` from the server (a call that arrived
/// after the listeners closed) or from the closed port; or a call tonic never got to send
/// because the server's GOAWAY came first. tonic reports that as `CANCELLED` (queued as the
/// connection closed: hyper's `Canceled`), or as `INTERNAL` carrying the GOAWAY's `NO_ERROR`
/// (a stream above the GOAWAY's last stream id, which RFC 9113 §6.8 says the server never
/// processed; grpc-java maps that to `UNAVAILABLE`, tonic does not yet, see hyper#4052).
fn refused_cleanly(status: &Status) -> bool {
    let mut cause = std::error::Error::source(status);
    while let Some(err) = cause {
        if let Some(err) = err.downcast_ref::<hyper::Error>()
            && err.is_canceled()
        {
            return status.code() == Code::Cancelled;
        }
        if let Some(err) = err.downcast_ref::<h2::Error>()
            && err.is_go_away()
            && err.reason() == Some(h2::Reason::NO_ERROR)
        {
            return status.code() == Code::Internal;
        }
        cause = err.source();
    }
    status.code() == Code::Unavailable
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_process_killed_mid_stream_is_released_at_once_and_the_rest_carry_on() {
    // Keepalive off: only the dead process's closed socket can tell the server.
    let server = Server::start(
        &[("KVSTORE_SERVER__KEEPALIVE_INTERVAL", "0s")],
        "127.0.0.1:0",
    )
    .await;
    let addr = server.addr;
    let survivor = subscriber(addr, "watch/").await;
    let command = kvstore_client(["--server", &addr.to_string(), "subscribe", "watch/"]);
    let mut victim = Subscriber::start(command, "watch/").await;
    wait_for_metric(addr, "kvstore_subscriptions_open", 2.0).await;

    let stop = CancellationToken::new();
    let (acked, mut seen) = watch::channel(0);
    let writer = writer(connect(addr).await, 0, &["watch/"], acked, stop.clone());
    // The victim is receiving...
    for _ in 0..20 {
        victim.next_change().await;
    }
    // ...and dies while the writes keep coming.
    victim.child.start_kill().unwrap();
    let status = timeout(PATIENCE, victim.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    let at_kill = *seen.borrow();

    wait_for_metric(addr, "kvstore_subscriptions_open", 1.0).await;
    // Writing to the prefix the dead subscriber watched goes on as before.
    timeout(PATIENCE, seen.wait_for(|&n| n >= at_kill + 100))
        .await
        .unwrap()
        .unwrap();
    stop.cancel();
    let run = timeout(PATIENCE, writer).await.unwrap().unwrap();
    assert!(run.failed.is_none(), "{:?}", run.failed);
    let metrics = scrape(&format!("http://{addr}"), None).await;
    assert_eq!(metrics.get("kvstore_subscribers_lagged_total"), 0.0);
    assert_eq!(metrics.get("kvstore_events_dropped_total"), 0.0);

    server.signal(Signal::SIGTERM);
    let (status, _) = server.exited().await;
    assert_eq!(status.code(), Some(0));
    // The other subscriber got every write, in order, and was told of the shutdown.
    let (changes, end) = timeout(PATIENCE, survivor).await.unwrap().unwrap();
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert_eq!(changes, run.acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_full_load_delivers_every_acknowledged_write_then_tells_every_stream() {
    const PREFIXES: &[&str] = &["load/a/", "load/b/", "other/"];
    let drain = Duration::from_secs(5);
    let server = Server::start(
        &[
            ("KVSTORE_SHUTDOWN__DRAIN_TIMEOUT", "5s"),
            // No subscriber may fall behind: the only way a stream may end is the shutdown.
            ("KVSTORE_SUBSCRIPTIONS__BUFFER", "1000000"),
        ],
        "127.0.0.1:0",
    )
    .await;
    let addr = server.addr;
    let mut subscribers = Vec::new();
    for pattern in ["", "load/", "load/a/", "load/b/", "other/"] {
        subscribers.push((pattern, subscriber(addr, pattern).await));
    }
    let never = CancellationToken::new();
    let writers = writers(addr, 4, PREFIXES, 200, &never).await;

    server.signal(Signal::SIGTERM);
    let signalled = Instant::now();
    let (status, logs) = server.exited().await;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{logs:#?}");
    assert!(took < drain, "exited {took:?} after SIGTERM");
    assert!(logged(&logs, "shutdown complete"), "{logs:#?}");
    assert!(
        !logged(
            &logs,
            "shutdown: drain deadline passed, closing the remaining connections"
        ),
        "{logs:#?}"
    );

    // Each writer was stopped by a clean refusal, and is refused again now, at once.
    let mut acked = Vec::new();
    for task in writers {
        let mut run = timeout(PATIENCE, task).await.unwrap().unwrap();
        let failed = run.failed.expect("the shutdown stops every writer");
        assert!(refused_cleanly(&failed), "{failed:?}");
        let again = timeout(PATIENCE, run.client.get(GetRequest { key: "k".into() }))
            .await
            .expect("a call to a stopped server fails at once")
            .unwrap_err();
        assert!(refused_cleanly(&again), "{again:?}");
        acked.extend(run.acked);
    }
    acked.sort_by_key(|change| change.revision);

    let mut received = Vec::new();
    for (pattern, task) in subscribers {
        let (changes, end) = timeout(PATIENCE, task).await.unwrap().unwrap();
        assert_eq!(end.code(), Code::Unavailable, "{pattern:?}: {end:?}");
        assert!(end.message().contains("shutting down"), "{end:?}");
        let last = changes.last().map_or(0, |change| change.revision);
        let trailer = end.metadata().get("kvstore-last-revision").unwrap();
        assert_eq!(trailer.to_str().unwrap(), last.to_string(), "{pattern:?}");
        received.push((pattern, changes));
    }
    // The subscriber to everything saw every revision once, in order, with no gap...
    let (_, everything) = &received[0];
    let revisions: Vec<i64> = everything.iter().map(|change| change.revision).collect();
    let expected: Vec<i64> = (1..=i64::try_from(everything.len()).unwrap()).collect();
    assert_eq!(revisions, expected);
    // ...including every acknowledged write, as acknowledged...
    assert!(acked.len() > 800, "{} writes", acked.len());
    for change in &acked {
        let seen = usize::try_from(change.revision - 1)
            .ok()
            .and_then(|i| everything.get(i));
        assert_eq!(seen, Some(change), "acknowledged, then not delivered");
    }
    // ...and every other subscriber saw exactly the part of that under its prefix.
    for (pattern, changes) in &received[1..] {
        let matching: Vec<&Change> = everything
            .iter()
            .filter(|change| change.key.starts_with(pattern))
            .collect();
        assert_eq!(changes.iter().collect::<Vec<_>>(), matching, "{pattern:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_under_load_a_restart_on_the_same_port_starts_clean_and_clients_reconnect() {
    let first = Server::start(&[], "127.0.0.1:0").await;
    let addr = first.addr;
    // An idle connection: the killed server's end of it stays in the kernel (FIN_WAIT2,
    // then TIME_WAIT) on the port the restart must bind.
    let mut idle = connect(addr).await;
    idle.get(GetRequest { key: "k".into() }).await.unwrap();
    let watcher = subscriber(addr, "load/").await;
    let stop = CancellationToken::new();
    let writers = writers(addr, 2, &["load/"], 100, &stop).await;

    let Server { mut child, .. } = first;
    child.start_kill().unwrap();
    let status = timeout(PATIENCE, child.wait()).await.unwrap().unwrap();
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    if let Some(lingering) = lingering_sockets(addr.port()) {
        assert!(
            lingering > 0,
            "the killed server left no socket on its port"
        );
    }
    // Nothing hangs on the dead server: the stream and each writer fail, before anything
    // listens on the port again.
    let (_, end) = timeout(PATIENCE, watcher).await.unwrap().unwrap();
    assert_ne!(end.code(), Code::Ok);
    let mut runs = Vec::new();
    for task in writers {
        let run = timeout(PATIENCE, task).await.unwrap().unwrap();
        assert!(run.failed.is_some(), "the writer was stopped by the kill");
        runs.push(run);
    }

    let second = Server::start(&[], &addr.to_string()).await;
    assert_eq!(second.addr, addr);

    // A clean start: ready, serving, empty, at revision 0.
    let (ready, _) = http_get(&format!("http://{addr}/health/ready"), false).await;
    assert_eq!(ready, http::StatusCode::OK);
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);
    // The channels opened to the first server reconnect by themselves: at most one call on
    // each still sees the old connection fail.
    let acked = &runs[0].acked[0];
    let got = retry_once(|| {
        let mut idle = idle.clone();
        let key = acked.key.clone();
        async move { idle.get(GetRequest { key }).await }
    })
    .await;
    assert!(!got.found, "the restarted store is empty");
    assert_eq!(got.revision, 0);
    for (i, run) in runs.iter().enumerate() {
        let set = retry_once(|| {
            let mut client = run.client.clone();
            async move {
                client
                    .set(SetRequest {
                        key: format!("after/{i}"),
                        value: "v".into(),
                        ..Default::default()
                    })
                    .await
            }
        })
        .await;
        assert_eq!(set.revision, i64::try_from(i).unwrap() + 1);
    }

    second.signal(Signal::SIGTERM);
    let (status, _) = second.exited().await;
    assert_eq!(status.code(), Some(0));
}

/// Makes a call; if it fails (a channel still holding the dead server's connection), makes it
/// once more, which must succeed.
async fn retry_once<F, Fut, T>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    match timeout(PATIENCE, call()).await.expect("no call hangs") {
        Ok(response) => response.into_inner(),
        Err(status) => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            timeout(PATIENCE, call())
                .await
                .expect("no call hangs")
                .expect("the channel reconnected")
                .into_inner()
        }
    }
}
