//! The `kvstore-client` binary, run as a process against an in-process server: its output
//! formats, its exit codes, the original Go client's flags, and subscriptions.

use std::{
    ffi::OsStr,
    net::{SocketAddr, TcpListener},
    process::{ExitStatus, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use kvstore::pb::{self, key_value_store_client::KeyValueStoreClient};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader, Lines},
    process::{Child, ChildStderr, ChildStdout, Command},
    time::timeout,
};
use tonic::transport::Channel;

use crate::helpers::{PATIENCE, spawn_server};

fn kvstore_client<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(env!("CARGO_BIN_EXE_kvstore-client"));
    command
        .args(args)
        // The developer's own setting must not redirect the tests.
        .env_remove("KVSTORE_ENDPOINT")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

async fn run(mut command: Command) -> Finished {
    let output = timeout(PATIENCE, command.output())
        .await
        .expect("kvstore-client did not exit in time")
        .expect("running kvstore-client");
    Finished {
        status: output.status,
        stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    }
}

/// Runs the subcommand form against `addr`.
async fn run_client(addr: SocketAddr, args: &[&str]) -> Finished {
    let server = addr.to_string();
    run(kvstore_client(
        ["--server", server.as_str()].iter().chain(args),
    ))
    .await
}

/// A running `kvstore-client subscribe`, read line by line.
struct Subscriber {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Lines<BufReader<ChildStderr>>,
}

impl Subscriber {
    /// Starts the client and returns once it has announced the subscription: the server has
    /// registered it by then, so every later write must reach it.
    async fn start(mut command: Command, pattern: &str) -> Subscriber {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning kvstore-client subscribe");
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let stderr = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
        let mut subscriber = Subscriber {
            child,
            stdout,
            stderr,
        };
        let announced = next_line(&mut subscriber.stderr).await;
        assert_eq!(
            announced,
            format!("subscribed to {pattern:?} (Ctrl-C to stop)")
        );
        subscriber
    }

    async fn next_event(&mut self) -> String {
        next_line(&mut self.stdout).await
    }

    async fn exit_status(&mut self) -> ExitStatus {
        timeout(PATIENCE, self.child.wait())
            .await
            .expect("kvstore-client did not exit in time")
            .expect("waiting for kvstore-client")
    }

    async fn rest_of_stderr(&mut self) -> String {
        let mut rest = String::new();
        while let Some(line) = timeout(PATIENCE, self.stderr.next_line())
            .await
            .expect("stderr did not close in time")
            .expect("reading stderr")
        {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    }
}

async fn next_line<R: AsyncRead + Unpin>(lines: &mut Lines<BufReader<R>>) -> String {
    timeout(PATIENCE, lines.next_line())
        .await
        .expect("no line from kvstore-client in time")
        .expect("reading kvstore-client's output")
        .expect("kvstore-client closed its output early")
}

/// Splits `<RFC 3339 time> <rest>` and checks the time is a real one.
fn split_time(line: String) -> (SystemTime, String) {
    let (time, rest) = line
        .split_once(' ')
        .expect("an event line starts with its time");
    // UTC, with milliseconds.
    assert!(
        time.ends_with('Z') && time.len() == "2025-01-01T00:00:00.000Z".len(),
        "{line:?}"
    );
    let time = humantime::parse_rfc3339(time).expect("the time is RFC 3339");
    (time, rest.to_owned())
}

async fn set(client: &mut KeyValueStoreClient<Channel>, key: &str, value: &str) {
    client
        .set(pb::SetRequest {
            key: key.into(),
            value: value.into(),
        })
        .await
        .expect("set through the gRPC client");
}

fn json_line(stdout: &str) -> Value {
    let mut lines = stdout.lines();
    let line = lines.next().expect("one line of JSON");
    assert_eq!(lines.next(), None, "exactly one line: {stdout:?}");
    serde_json::from_str(line).expect("the line is JSON")
}

#[tokio::test]
async fn set_then_get_prints_the_value() {
    let server = spawn_server().await;

    let set = run_client(server.grpc_addr, &["set", "user:1", "Alice"]).await;
    assert!(set.status.success(), "{}", set.stderr);
    assert!(set.stdout.starts_with("OK"), "{:?}", set.stdout);
    assert_eq!(set.stdout.lines().count(), 1);

    let get = run_client(server.grpc_addr, &["get", "user:1"]).await;
    assert!(get.status.success(), "{}", get.stderr);
    assert_eq!(get.stdout, "user:1 = Alice\n");
    assert_eq!(get.stderr, "");

    server.shutdown().await;
}

#[tokio::test]
async fn set_then_get_with_json_output_prints_one_object_per_line() {
    let server = spawn_server().await;

    let set = run_client(
        server.grpc_addr,
        &["--output", "json", "set", "user:1", "Alice"],
    )
    .await;
    assert!(set.status.success(), "{}", set.stderr);
    let set = json_line(&set.stdout);
    assert_eq!(set["key"], "user:1");
    assert_eq!(set["success"], true);
    assert!(set["message"].is_string());

    let get = run_client(server.grpc_addr, &["get", "user:1", "--output=json"]).await;
    assert!(get.status.success(), "{}", get.stderr);
    assert_eq!(
        get.stdout,
        "{\"key\":\"user:1\",\"value\":\"Alice\",\"found\":true}\n"
    );

    server.shutdown().await;
}

#[tokio::test]
async fn get_of_a_missing_key_exits_1() {
    let server = spawn_server().await;

    let text = run_client(server.grpc_addr, &["get", "user:404"]).await;
    assert_eq!(text.status.code(), Some(1));
    assert_eq!(text.stdout, "");
    assert_eq!(text.stderr, "kvstore-client: key \"user:404\" not found\n");

    let json = run_client(server.grpc_addr, &["--output", "json", "get", "user:404"]).await;
    assert_eq!(json.status.code(), Some(1));
    assert_eq!(
        json_line(&json.stdout),
        json!({"key": "user:404", "value": "", "found": false})
    );

    server.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_server_exits_3_with_one_line_on_stderr() {
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
        listener.local_addr().expect("the port's address")
    };

    let get = run_client(addr, &["get", "user:1"]).await;

    assert_eq!(get.status.code(), Some(3));
    assert_eq!(get.stdout, "");
    assert_eq!(get.stderr.lines().count(), 1, "{:?}", get.stderr);
    assert!(
        get.stderr.starts_with(&format!(
            "kvstore-client: cannot reach server at http://{addr}: "
        )),
        "{:?}",
        get.stderr
    );
}

#[tokio::test]
async fn an_empty_key_exits_3_with_the_status_code() {
    let server = spawn_server().await;

    for args in [["set", "", "Alice"].as_slice(), ["get", ""].as_slice()] {
        let out = run_client(server.grpc_addr, args).await;
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        assert_eq!(out.stdout, "");
        assert_eq!(out.stderr.lines().count(), 1, "{:?}", out.stderr);
        let failed = format!("kvstore-client: {} failed: INVALID_ARGUMENT", args[0]);
        assert!(out.stderr.starts_with(&failed), "{:?}", out.stderr);
    }

    server.shutdown().await;
}

#[tokio::test]
async fn a_usage_error_exits_2() {
    for args in [
        &["get"][..],
        &["set", "user:1"],
        &["frobnicate"],
        &["--output", "yaml", "health"],
        &["--server", "https://localhost:50051", "health"],
        &["-op=delete", "-key=user:1"],
        &["-op=get"],
    ] {
        let out = run(kvstore_client(args)).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.stderr);
        assert_eq!(out.stdout, "", "{args:?}");
    }
}

#[tokio::test]
async fn the_go_client_flags_set_and_get() {
    let server = spawn_server().await;
    let addr = server.grpc_addr.to_string();

    let set = run(kvstore_client([
        &format!("-server={addr}"),
        "-op=set",
        "-key=user:1",
        "-value=Alice",
    ]))
    .await;
    assert!(set.status.success(), "{}", set.stderr);
    assert!(set.stdout.starts_with("OK"), "{:?}", set.stdout);

    // Go's flag package also takes `-flag value` and `--flag=value`.
    let get = run(kvstore_client([
        "-op",
        "get",
        "--key=user:1",
        "-server",
        &addr,
    ]))
    .await;
    assert!(get.status.success(), "{}", get.stderr);
    assert_eq!(get.stdout, "user:1 = Alice\n");

    let missing = run(kvstore_client([
        &format!("--server={addr}"),
        "--op=get",
        "-key=user:404",
    ]))
    .await;
    assert_eq!(missing.status.code(), Some(1));

    server.shutdown().await;
}

#[tokio::test]
async fn the_go_client_flags_subscribe() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let command = kvstore_client([
        format!("-server={}", server.grpc_addr),
        "-op=subscribe".into(),
        "-pattern=user:".into(),
    ]);
    let mut subscriber = Subscriber::start(command, "user:").await;

    set(&mut client, "user:1", "Alice").await;

    let (_, event) = split_time(subscriber.next_event().await);
    assert_eq!(event, "SET user:1 = Alice");

    drop(subscriber);
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_prints_each_change_to_a_matching_key() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let addr = server.grpc_addr.to_string();
    let command = kvstore_client(["--server", &addr, "subscribe", "user:"]);
    let mut subscriber = Subscriber::start(command, "user:").await;

    let before = SystemTime::now();
    set(&mut client, "users", "not a match").await;
    set(&mut client, "user:1", "Alice").await;
    set(&mut client, "user:1", "").await;

    let (time, event) = split_time(subscriber.next_event().await);
    assert_eq!(event, "SET user:1 = Alice");
    // Millisecond precision: allow the truncation.
    assert!(
        time + Duration::from_millis(1) >= before,
        "{time:?} < {before:?}"
    );
    let (_, event) = split_time(subscriber.next_event().await);
    assert_eq!(event, "SET user:1 = ");

    drop(subscriber);
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_with_json_output_prints_one_object_per_event() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let addr = server.grpc_addr.to_string();
    let command = kvstore_client(["--server", &addr, "--output", "json", "subscribe", ""]);
    let mut subscriber = Subscriber::start(command, "").await;

    set(&mut client, "user:1", "Alice").await;

    let event: Value =
        serde_json::from_str(&subscriber.next_event().await).expect("the event is JSON");
    assert_eq!(event["type"], "SET");
    assert_eq!(event["key"], "user:1");
    assert_eq!(event["value"], "Alice");
    let timestamp = event["timestamp"].as_u64().expect("timestamp is Unix ms");
    let time = humantime::parse_rfc3339(event["time"].as_str().expect("time is a string"))
        .expect("time is RFC 3339");
    assert_eq!(
        time.duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis(),
        u128::from(timestamp)
    );

    drop(subscriber);
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_stopped_with_ctrl_c_exits_0() {
    let server = spawn_server().await;
    let addr = server.grpc_addr.to_string();
    let command = kvstore_client(["--server", &addr, "subscribe", "user:"]);
    let mut subscriber = Subscriber::start(command, "user:").await;

    let pid = subscriber.child.id().expect("the client is running");
    kill(
        Pid::from_raw(pid.try_into().expect("pid fits i32")),
        Signal::SIGINT,
    )
    .expect("sending SIGINT");

    assert_eq!(subscriber.exit_status().await.code(), Some(0));
    assert_eq!(subscriber.rest_of_stderr().await, "");
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_exits_3_with_the_reason_when_the_server_shuts_down() {
    let server = spawn_server().await;
    let addr = server.grpc_addr.to_string();
    let command = kvstore_client(["--server", &addr, "subscribe", "user:"]);
    let mut subscriber = Subscriber::start(command, "user:").await;

    server.shutdown().await;

    assert_eq!(subscriber.exit_status().await.code(), Some(3));
    let stderr = subscriber.rest_of_stderr().await;
    assert!(
        stderr.starts_with("kvstore-client: subscription ended by the server: UNAVAILABLE"),
        "{stderr:?}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
}

#[tokio::test]
async fn health_prints_serving() {
    let server = spawn_server().await;

    let text = run_client(server.grpc_addr, &["health"]).await;
    assert!(text.status.success(), "{}", text.stderr);
    assert_eq!(text.stdout, "SERVING\n");

    let json = run_client(server.grpc_addr, &["health", "--output", "json"]).await;
    assert!(json.status.success(), "{}", json.stderr);
    assert_eq!(json_line(&json.stdout), json!({"status": "SERVING"}));

    server.shutdown().await;
}

#[tokio::test]
async fn the_server_address_can_be_a_url_or_come_from_kvstore_endpoint() {
    let server = spawn_server().await;
    let url = format!("http://{}", server.grpc_addr);

    let flag = run(kvstore_client(["--server", url.as_str(), "health"])).await;
    assert!(flag.status.success(), "{}", flag.stderr);

    let mut command = kvstore_client(["health"]);
    command.env("KVSTORE_ENDPOINT", server.grpc_addr.to_string());
    let env = run(command).await;
    assert!(env.status.success(), "{}", env.stderr);
    assert_eq!(env.stdout, "SERVING\n");

    server.shutdown().await;
}
