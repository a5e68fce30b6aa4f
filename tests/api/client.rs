//! The `kvstore-client` binary, run as a process against an in-process server: its output
//! formats, its exit codes, the original Go client's flags, guarded writes, listing, and
//! subscriptions (replayed, with a snapshot, and resumed after a lag or a lost connection).

use std::{
    ffi::OsStr,
    net::{SocketAddr, TcpListener},
    ops::RangeInclusive,
    process::{ExitStatus, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use kvstore::{
    pb::{self, key_value_store_client::KeyValueStoreClient},
    store::SetOptions,
};
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

use crate::helpers::{PATIENCE, Proxy, TestServer, spawn_server, spawn_with, test_settings};

pub(crate) fn kvstore_client<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(env!("CARGO_BIN_EXE_kvstore-client"));
    command
        .args(args)
        // The developer's own setting must not redirect the tests.
        .env_remove("KVSTORE_ENDPOINT")
        .env_remove("KVSTORE_TOKEN")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

pub(crate) struct Finished {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

pub(crate) async fn run(mut command: Command) -> Finished {
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
pub(crate) struct Subscriber {
    pub(crate) child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Lines<BufReader<ChildStderr>>,
}

impl Subscriber {
    /// Starts the client and returns once it has announced the subscription: the server has
    /// registered it by then, so every later write must reach it.
    pub(crate) async fn start(mut command: Command, pattern: &str) -> Subscriber {
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

    /// The next line on stderr: progress, or a note about resuming.
    async fn next_note(&mut self) -> String {
        next_line(&mut self.stderr).await
    }

    /// The next event line without its time, which `split_time` checks.
    pub(crate) async fn next_change(&mut self) -> String {
        split_time(self.next_event().await).1
    }

    /// Proves no further event arrives.
    async fn assert_no_more_events(&mut self) {
        let next = timeout(Duration::from_millis(200), self.stdout.next_line()).await;
        assert!(next.is_err(), "unexpected output: {next:?}");
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

/// `#12 SET user:1 = Alice` -> (12, `SET user:1 = Alice`).
fn split_revision(change: &str) -> (i64, &str) {
    let (revision, rest) = change
        .strip_prefix('#')
        .and_then(|change| change.split_once(' '))
        .unwrap_or_else(|| panic!("a change starts with #revision: {change:?}"));
    (revision.parse().expect("the revision is a number"), rest)
}

/// Sets through the gRPC client and returns the revision it produced.
async fn set(client: &mut KeyValueStoreClient<Channel>, key: &str, value: &str) -> i64 {
    client
        .set(pb::SetRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
        .await
        .expect("set through the gRPC client")
        .into_inner()
        .revision
}

async fn delete(client: &mut KeyValueStoreClient<Channel>, key: &str) {
    client
        .delete(pb::DeleteRequest {
            key: key.into(),
            ..Default::default()
        })
        .await
        .expect("delete through the gRPC client");
}

/// Writes `key:{i:04} = {i}` for each `i` straight into the store; on a fresh server, each at
/// revision `i`. A test runs on one thread, so the server forwards none of these changes
/// before the burst ends: a subscriber with a small buffer lags.
fn burst(server: &TestServer, revisions: RangeInclusive<i64>) {
    for i in revisions {
        server
            .store
            .set(format!("key:{i:04}"), i.to_string(), SetOptions::default())
            .expect("an unguarded set");
    }
}

fn json_line(stdout: &str) -> Value {
    let mut lines = stdout.lines();
    let line = lines.next().expect("one line of JSON");
    assert_eq!(lines.next(), None, "exactly one line: {stdout:?}");
    serde_json::from_str(line).expect("the line is JSON")
}

#[tokio::test]
async fn set_then_get_prints_the_value_and_its_revisions() {
    let server = spawn_server().await;

    let set = run_client(server.grpc_addr, &["set", "user:1", "Alice"]).await;
    assert!(set.status.success(), "{}", set.stderr);
    assert_eq!(set.stdout, "OK: stored at revision 1\n");
    let set = run_client(server.grpc_addr, &["set", "user:1", "Alicia"]).await;
    assert_eq!(set.stdout, "OK: stored at revision 2\n");

    let get = run_client(server.grpc_addr, &["get", "user:1"]).await;
    assert!(get.status.success(), "{}", get.stderr);
    assert_eq!(get.stdout, "user:1 = Alicia  (revision 2, version 2)\n");
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
    assert_eq!(
        json_line(&set.stdout),
        json!({"key": "user:1", "success": true, "message": "stored at revision 1", "revision": 1})
    );

    let get = run_client(server.grpc_addr, &["get", "user:1", "--output=json"]).await;
    assert!(get.status.success(), "{}", get.stderr);
    assert_eq!(
        get.stdout,
        "{\"key\":\"user:1\",\"value\":\"Alice\",\"found\":true,\"create_revision\":1,\
         \"mod_revision\":1,\"version\":1,\"ttl_ms\":0,\"revision\":1}\n"
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
        json!({
            "key": "user:404", "value": "", "found": false, "create_revision": 0,
            "mod_revision": 0, "version": 0, "ttl_ms": 0, "revision": 0
        })
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
        &["--server", "ftp://localhost:50051", "health"],
        &["--client-cert", "client.pem", "health"],
        &["-op=delete", "-key=user:1"],
        &["-op=get"],
        &[
            "set",
            "user:1",
            "Alice",
            "--if-revision",
            "1",
            "--if-absent",
        ],
        &["set", "user:1", "Alice", "--if-revision", "-1"],
        &["set", "user:1", "Alice", "--ttl", "0s"],
        &["set", "user:1", "Alice", "--ttl", "soon"],
        &["delete"],
        &["list", "--limit", "0"],
        &["subscribe", "user:", "--initial", "--from-revision", "1"],
        &["subscribe", "user:", "--from-revision", "0"],
        &["subscribe", "user:", "--progress", "0ms"],
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
    assert_eq!(get.stdout, "user:1 = Alice  (revision 1, version 1)\n");

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

    assert_eq!(subscriber.next_change().await, "#1 SET user:1 = Alice");

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
    delete(&mut client, "user:1").await;

    let (time, event) = split_time(subscriber.next_event().await);
    assert_eq!(event, "#2 SET user:1 = Alice");
    // Millisecond precision: allow the truncation.
    assert!(
        time + Duration::from_millis(1) >= before,
        "{time:?} < {before:?}"
    );
    assert_eq!(subscriber.next_change().await, "#3 SET user:1 = ");
    assert_eq!(subscriber.next_change().await, "#4 DELETE user:1");

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
    assert_eq!(event["revision"], 1);
    assert_eq!(event["expired"], false);
    assert_eq!(event["initial"], false);
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

#[tokio::test]
async fn the_help_lists_every_exit_code() {
    let help = run(kvstore_client(["--help"])).await;
    assert!(help.status.success(), "{}", help.stderr);
    for code in [
        "0  success",
        "1  get, delete",
        "2  usage",
        "3  the server",
        "4  set, delete",
    ] {
        assert!(help.stdout.contains(code), "{code:?} in {}", help.stdout);
    }
}

#[tokio::test]
async fn delete_removes_the_key_and_prints_its_last_revision() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    set(&mut client, "user:1", "Alice").await;
    set(&mut client, "user:1", "Alicia").await;
    set(&mut client, "user:2", "Bob").await;

    let text = run_client(server.grpc_addr, &["delete", "user:1"]).await;
    assert!(text.status.success(), "{}", text.stderr);
    assert_eq!(text.stdout, "deleted user:1 (was at revision 2)\n");
    assert_eq!(text.stderr, "");
    let get = run_client(server.grpc_addr, &["get", "user:1"]).await;
    assert_eq!(get.status.code(), Some(1));

    let json = run_client(server.grpc_addr, &["--output", "json", "delete", "user:2"]).await;
    assert!(json.status.success(), "{}", json.stderr);
    assert_eq!(
        json_line(&json.stdout),
        json!({"key": "user:2", "deleted": true, "prev_mod_revision": 3, "revision": 5})
    );

    server.shutdown().await;
}

#[tokio::test]
async fn delete_of_a_missing_key_exits_1() {
    let server = spawn_server().await;

    let text = run_client(server.grpc_addr, &["delete", "user:404"]).await;
    assert_eq!(text.status.code(), Some(1));
    assert_eq!(text.stdout, "");
    assert_eq!(text.stderr, "kvstore-client: key \"user:404\" not found\n");

    let json = run_client(
        server.grpc_addr,
        &["delete", "user:404", "--output", "json"],
    )
    .await;
    assert_eq!(json.status.code(), Some(1));
    assert_eq!(
        json_line(&json.stdout),
        json!({"key": "user:404", "deleted": false, "prev_mod_revision": 0, "revision": 0})
    );

    server.shutdown().await;
}

#[tokio::test]
async fn a_delete_guarded_by_another_revision_exits_4_and_keeps_the_key() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let revision = set(&mut client, "user:1", "Alice").await;

    let stale = (revision + 1).to_string();
    let refused = run_client(
        server.grpc_addr,
        &["delete", "user:1", "--if-revision", &stale],
    )
    .await;
    assert_eq!(refused.status.code(), Some(4), "{}", refused.stderr);
    assert_eq!(refused.stdout, "");
    assert_eq!(refused.stderr.lines().count(), 1, "{:?}", refused.stderr);
    assert!(
        refused
            .stderr
            .starts_with("kvstore-client: delete failed: FAILED_PRECONDITION: "),
        "{:?}",
        refused.stderr
    );
    let get = run_client(server.grpc_addr, &["get", "user:1"]).await;
    assert!(get.status.success(), "{}", get.stderr);

    let current = revision.to_string();
    let deleted = run_client(
        server.grpc_addr,
        &["delete", "user:1", "--if-revision", &current],
    )
    .await;
    assert!(deleted.status.success(), "{}", deleted.stderr);
    assert_eq!(deleted.stdout, "deleted user:1 (was at revision 1)\n");

    server.shutdown().await;
}

#[tokio::test]
async fn set_if_absent_stores_only_the_first_time() {
    let server = spawn_server().await;

    let first = run_client(server.grpc_addr, &["set", "lock", "me", "--if-absent"]).await;
    assert!(first.status.success(), "{}", first.stderr);
    assert_eq!(first.stdout, "OK: stored at revision 1\n");

    let second = run_client(server.grpc_addr, &["set", "lock", "you", "--if-absent"]).await;
    assert_eq!(second.status.code(), Some(4), "{}", second.stderr);
    assert_eq!(second.stdout, "");
    assert_eq!(second.stderr.lines().count(), 1, "{:?}", second.stderr);
    assert!(
        second
            .stderr
            .starts_with("kvstore-client: set failed: FAILED_PRECONDITION: "),
        "{:?}",
        second.stderr
    );

    let get = run_client(server.grpc_addr, &["get", "lock"]).await;
    assert_eq!(get.stdout, "lock = me  (revision 1, version 1)\n");

    server.shutdown().await;
}

#[tokio::test]
async fn set_if_revision_stores_only_over_that_revision() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    set(&mut client, "counter", "1").await;
    set(&mut client, "other", "x").await;

    let stale = run_client(
        server.grpc_addr,
        &["set", "counter", "2", "--if-revision", "2"],
    )
    .await;
    assert_eq!(stale.status.code(), Some(4), "{}", stale.stderr);
    // The server's message names the key's current revision, so the user can retry.
    assert!(stale.stderr.contains('1'), "{:?}", stale.stderr);

    let current = run_client(
        server.grpc_addr,
        &[
            "--output",
            "json",
            "set",
            "counter",
            "2",
            "--if-revision",
            "1",
        ],
    )
    .await;
    assert!(current.status.success(), "{}", current.stderr);
    assert_eq!(json_line(&current.stdout)["revision"], 3);

    let get = run_client(server.grpc_addr, &["get", "counter"]).await;
    assert_eq!(get.stdout, "counter = 2  (revision 3, version 2)\n");

    server.shutdown().await;
}

#[tokio::test]
async fn get_shows_when_a_key_set_with_a_ttl_expires() {
    let server = spawn_server().await;

    let set = run_client(
        server.grpc_addr,
        &["set", "session:1", "token", "--ttl", "1h"],
    )
    .await;
    assert!(set.status.success(), "{}", set.stderr);

    let text = run_client(server.grpc_addr, &["get", "session:1"]).await;
    assert_eq!(
        text.stdout,
        "session:1 = token  (revision 1, version 1, expires in 1h)\n"
    );
    let json = run_client(server.grpc_addr, &["get", "session:1", "--output", "json"]).await;
    let ttl_ms = json_line(&json.stdout)["ttl_ms"]
        .as_i64()
        .expect("ttl_ms is a number");
    assert!((3_590_000..=3_600_000).contains(&ttl_ms), "{ttl_ms}");

    server.shutdown().await;
}

#[tokio::test]
async fn a_key_set_with_a_short_ttl_expires_with_a_delete_event() {
    let server = spawn_server().await;
    let addr = server.grpc_addr.to_string();
    let command = kvstore_client(["--server", &addr, "subscribe", "session:"]);
    let mut subscriber = Subscriber::start(command, "session:").await;

    let set = run_client(
        server.grpc_addr,
        &["set", "session:1", "token", "--ttl", "200ms"],
    )
    .await;
    assert!(set.status.success(), "{}", set.stderr);

    assert_eq!(subscriber.next_change().await, "#1 SET session:1 = token");
    assert_eq!(
        subscriber.next_change().await,
        "#2 DELETE session:1 (expired)"
    );
    let get = run_client(server.grpc_addr, &["get", "session:1"]).await;
    assert_eq!(get.status.code(), Some(1));

    drop(subscriber);
    server.shutdown().await;
}

#[tokio::test]
async fn list_prints_the_keys_under_a_prefix_in_key_order() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    for (key, value) in [
        ("user:2", "Bob"),
        ("user:10", "Ten"),
        ("users", "not under user:"),
        ("user:1", "Alice"),
        ("other", "x"),
    ] {
        set(&mut client, key, value).await;
    }

    let users = run_client(server.grpc_addr, &["list", "user:"]).await;
    assert!(users.status.success(), "{}", users.stderr);
    assert_eq!(
        users.stdout,
        "user:1 = Alice\nuser:10 = Ten\nuser:2 = Bob\n"
    );
    assert_eq!(users.stderr, "");

    let all = run_client(server.grpc_addr, &["list", ""]).await;
    let keys: Vec<&str> = all
        .stdout
        .lines()
        .map(|line| line.split_once(" = ").expect("key = value").0)
        .collect();
    assert_eq!(keys, ["other", "user:1", "user:10", "user:2", "users"]);
    let default = run_client(server.grpc_addr, &["list"]).await;
    assert_eq!(default.stdout, all.stdout, "no prefix lists every key");

    let json = run_client(
        server.grpc_addr,
        &["--output", "json", "list", "user:", "--limit", "1"],
    )
    .await;
    assert!(json.status.success(), "{}", json.stderr);
    assert_eq!(
        json_line(&json.stdout),
        json!({
            "key": "user:1", "value": "Alice", "create_revision": 4, "mod_revision": 4,
            "version": 1, "ttl_ms": 0
        })
    );

    let none = run_client(server.grpc_addr, &["list", "nobody:"]).await;
    assert!(none.status.success(), "{}", none.stderr);
    assert_eq!(none.stdout, "");

    server.shutdown().await;
}

#[tokio::test]
async fn list_pages_through_every_key_or_stops_at_the_limit() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    // Two and a half of the client's 1000-key pages, plus a key outside the prefix.
    const KEYS: usize = 2500;
    for i in 0..KEYS {
        set(&mut client, &format!("key:{i:04}"), &i.to_string()).await;
    }
    set(&mut client, "other", "x").await;
    let expected: Vec<String> = (0..KEYS).map(|i| format!("key:{i:04} = {i}")).collect();

    let all = run_client(server.grpc_addr, &["list", "key:"]).await;
    assert!(all.status.success(), "{}", all.stderr);
    assert_eq!(all.stdout.lines().collect::<Vec<_>>(), expected);

    let limited = run_client(server.grpc_addr, &["list", "key:", "--limit", "1500"]).await;
    assert!(limited.status.success(), "{}", limited.stderr);
    assert_eq!(limited.stdout.lines().collect::<Vec<_>>(), expected[..1500]);

    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_from_a_revision_replays_the_changes_since_then_continues_live() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    set(&mut client, "user:1", "Alice").await;
    set(&mut client, "user:2", "Bob").await;
    delete(&mut client, "user:1").await;
    set(&mut client, "other", "x").await;

    let addr = server.grpc_addr.to_string();
    let command = kvstore_client([
        "--server",
        &addr,
        "subscribe",
        "user:",
        "--from-revision",
        "2",
    ]);
    let mut subscriber = Subscriber::start(command, "user:").await;
    assert_eq!(subscriber.next_change().await, "#2 SET user:2 = Bob");
    assert_eq!(subscriber.next_change().await, "#3 DELETE user:1");

    set(&mut client, "user:3", "Carol").await;
    assert_eq!(subscriber.next_change().await, "#5 SET user:3 = Carol");

    drop(subscriber);
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_initial_prints_the_current_values_then_live_changes() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    set(&mut client, "user:1", "Alice").await;
    set(&mut client, "other", "x").await;
    set(&mut client, "user:2", "Bob").await;
    set(&mut client, "user:1", "Alicia").await;

    let addr = server.grpc_addr.to_string();
    let command = kvstore_client(["--server", &addr, "subscribe", "user:", "--initial"]);
    let mut subscriber = Subscriber::start(command, "user:").await;
    // In key order, each key once with its current value.
    assert_eq!(
        subscriber.next_change().await,
        "#4 SET user:1 = Alicia (initial)"
    );
    assert_eq!(
        subscriber.next_change().await,
        "#3 SET user:2 = Bob (initial)"
    );
    // The snapshot's end, on stderr with the other notes.
    assert_eq!(subscriber.next_note().await, "at revision 4");

    set(&mut client, "user:3", "Carol").await;
    assert_eq!(subscriber.next_change().await, "#5 SET user:3 = Carol");

    drop(subscriber);
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_with_json_output_prints_the_snapshot_and_progress_as_objects() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    set(&mut client, "user:1", "Alice").await;

    let addr = server.grpc_addr.to_string();
    let command = kvstore_client([
        "--server",
        &addr,
        "--output",
        "json",
        "subscribe",
        "user:",
        "--initial",
    ]);
    let mut subscriber = Subscriber::start(command, "user:").await;
    let initial: Value =
        serde_json::from_str(&subscriber.next_event().await).expect("the event is JSON");
    assert_eq!(initial["type"], "SET");
    assert_eq!(initial["key"], "user:1");
    assert_eq!(initial["revision"], 1);
    assert_eq!(initial["initial"], true);
    assert_eq!(initial["expired"], false);
    let progress: Value =
        serde_json::from_str(&subscriber.next_event().await).expect("the event is JSON");
    assert_eq!(progress, json!({"type": "PROGRESS", "revision": 1}));

    drop(subscriber);
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_with_progress_reports_the_revision_when_the_stream_is_idle() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    set(&mut client, "user:1", "Alice").await;
    set(&mut client, "other", "x").await;

    let addr = server.grpc_addr.to_string();
    let command = kvstore_client([
        "--server",
        &addr,
        "subscribe",
        "user:",
        "--progress",
        "100ms",
    ]);
    let mut subscriber = Subscriber::start(command, "user:").await;
    // Every change up to the store's revision has been delivered: none matched.
    assert_eq!(subscriber.next_note().await, "at revision 2");

    set(&mut client, "user:2", "Bob").await;
    assert_eq!(subscriber.next_change().await, "#3 SET user:2 = Bob");
    assert_eq!(subscriber.next_note().await, "at revision 3");

    drop(subscriber);
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_without_resume_exits_3_when_it_falls_behind() {
    let mut settings = test_settings();
    settings.subscriptions.buffer = 1;
    let server = spawn_with(settings).await;
    let addr = server.grpc_addr.to_string();
    let command = kvstore_client(["--server", &addr, "subscribe", "key:"]);
    let mut subscriber = Subscriber::start(command, "key:").await;

    burst(&server, 1..=100);

    assert_eq!(subscriber.exit_status().await.code(), Some(3));
    let stderr = subscriber.rest_of_stderr().await;
    assert!(
        stderr
            .starts_with("kvstore-client: subscription ended by the server: RESOURCE_EXHAUSTED: "),
        "{stderr:?}"
    );
    assert!(stderr.contains("fell behind"), "{stderr:?}");
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_resume_continues_after_a_lag_with_every_revision_once() {
    let mut settings = test_settings();
    settings.subscriptions.buffer = 1;
    let server = spawn_with(settings).await;
    let addr = server.grpc_addr.to_string();
    let command = kvstore_client(["--server", &addr, "subscribe", "key:", "--resume"]);
    let mut subscriber = Subscriber::start(command, "key:").await;

    // The first change is delivered, so the client knows where it stands before it lags.
    burst(&server, 1..=1);
    assert_eq!(subscriber.next_change().await, "#1 SET key:0001 = 1");
    const WRITES: i64 = 500;
    burst(&server, 2..=WRITES);

    let mut revisions = vec![1];
    while revisions.len() < WRITES as usize {
        let change = subscriber.next_change().await;
        let (revision, event) = split_revision(&change);
        assert_eq!(event, format!("SET key:{revision:04} = {revision}"));
        revisions.push(revision);
    }
    assert_eq!(
        revisions,
        (1..=WRITES).collect::<Vec<_>>(),
        "every revision exactly once, in order"
    );
    subscriber.assert_no_more_events().await;
    let note = subscriber.next_note().await;
    assert!(
        note.starts_with("kvstore-client: resuming from revision 2 after: RESOURCE_EXHAUSTED: "),
        "{note:?}"
    );

    drop(subscriber);
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_resume_continues_after_a_lost_connection() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let proxy = Proxy::start(server.grpc_addr).await;
    let command = kvstore_client([
        "--server",
        &proxy.addr.to_string(),
        "subscribe",
        "user:",
        "--resume",
    ]);
    let mut subscriber = Subscriber::start(command, "user:").await;
    set(&mut client, "user:1", "Alice").await;
    assert_eq!(subscriber.next_change().await, "#1 SET user:1 = Alice");

    proxy.cut().await;
    // Made while the client is disconnected: it must be replayed.
    set(&mut client, "user:2", "Bob").await;

    let note = subscriber.next_note().await;
    assert!(
        note.starts_with("kvstore-client: resuming from revision 2 after: "),
        "{note:?}"
    );
    assert_eq!(subscriber.next_change().await, "#2 SET user:2 = Bob");
    set(&mut client, "user:3", "Carol").await;
    assert_eq!(subscriber.next_change().await, "#3 SET user:3 = Carol");

    drop(subscriber);
    drop(proxy);
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_resume_exits_3_when_the_history_it_needs_is_compacted() {
    let mut settings = test_settings();
    settings.subscriptions.buffer = 1;
    settings.history.max_events = 10;
    let server = spawn_with(settings).await;
    let addr = server.grpc_addr.to_string();
    let command = kvstore_client(["--server", &addr, "subscribe", "key:", "--resume"]);
    let mut subscriber = Subscriber::start(command, "key:").await;

    burst(&server, 1..=100);

    assert_eq!(subscriber.exit_status().await.code(), Some(3));
    let stderr = subscriber.rest_of_stderr().await;
    let mut notes = stderr.lines();
    let resuming = notes.next().expect("a note about resuming");
    assert!(
        resuming.starts_with("kvstore-client: resuming from revision "),
        "{stderr:?}"
    );
    let failed = notes.next().expect("the reason resuming failed");
    assert!(
        failed.starts_with("kvstore-client: cannot subscribe from revision ")
            && failed.contains(": OUT_OF_RANGE: ")
            && failed.ends_with("re-run with --initial to start from the current values"),
        "{stderr:?}"
    );
    assert_eq!(notes.next(), None, "{stderr:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_from_a_compacted_revision_exits_3_and_suggests_initial() {
    let mut settings = test_settings();
    settings.history.max_events = 10;
    let server = spawn_with(settings).await;
    burst(&server, 1..=100);

    let out = run_client(
        server.grpc_addr,
        &["subscribe", "key:", "--from-revision", "1"],
    )
    .await;
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(out.stdout, "");
    assert_eq!(out.stderr.lines().count(), 1, "{:?}", out.stderr);
    assert!(
        out.stderr
            .starts_with("kvstore-client: cannot subscribe from revision 1: OUT_OF_RANGE: "),
        "{:?}",
        out.stderr
    );
    assert!(out.stderr.contains("--initial"), "{:?}", out.stderr);
    server.shutdown().await;
}
