//! The real `kvstore-server` binary: signals, exit codes, start-up logs and config errors.

use std::net::SocketAddr;
use std::process::Stdio;

use kvstore::config::Settings;
use kvstore::pb::key_value_store_client::KeyValueStoreClient;
use kvstore::pb::{SetRequest, SubscribeRequest};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::timeout;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::PATIENCE;

const SERVER: &str = env!("CARGO_BIN_EXE_kvstore-server");

/// The server binary with none of the caller's settings: every `KVSTORE_*` variable (CI's
/// `KVSTORE_REQUIRE_TOOLS` among them) and the legacy and logging ones are removed, so a
/// test sees exactly the environment it sets.
pub(crate) fn server_command() -> Command {
    let mut command = Command::new(SERVER);
    for var in ["RUST_LOG", "GRPC_PORT", "HTTP_PORT"] {
        command.env_remove(var);
    }
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("KVSTORE_") {
            command.env_remove(var);
        }
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// A running server binary and its JSON log lines.
pub(crate) struct Running {
    pub(crate) child: Child,
    pub(crate) logs: Lines<BufReader<ChildStdout>>,
    pub(crate) main: SocketAddr,
    /// The log lines up to the main listener's `listening`, that one included.
    pub(crate) startup: Vec<Value>,
}

impl Running {
    async fn start(command: &mut Command) -> Self {
        Self::start_on(command, "127.0.0.1:0").await
    }

    /// Starts the server with its main listener on `listen` (the health listener on a free
    /// port), and returns once it logs that the main listener is bound.
    pub(crate) async fn start_on(command: &mut Command, listen: &str) -> Self {
        let mut child = command
            .args(["--listen", listen, "--health-listen", "127.0.0.1:0"])
            .spawn()
            .unwrap();
        let mut logs = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut main = None;
        let mut startup = Vec::new();
        while main.is_none() {
            let line = running_line(&mut logs).await;
            if line["message"] == "listening" && line["listener"] == "main" {
                main = Some(line["addr"].as_str().unwrap().parse().unwrap());
            }
            startup.push(line);
        }
        Self {
            child,
            logs,
            main: main.unwrap(),
            startup,
        }
    }

    pub(crate) fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(self.child.id().expect("still running") as i32);
        kill(pid, signal).unwrap();
    }

    /// Reads log lines until one has this message, returning it.
    async fn wait_for_log(&mut self, message: &str) -> Value {
        loop {
            let line = running_line(&mut self.logs).await;
            if line["message"] == message {
                return line;
            }
        }
    }

    async fn exit_code(mut self) -> i32 {
        let status = timeout(PATIENCE, self.child.wait()).await.unwrap().unwrap();
        status.code().expect("exited, not killed")
    }

    /// A health Watch stream, which never ends by itself, so only the drain deadline or a
    /// second signal can end the process while it is open.
    async fn watch_health(&self) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", self.main))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut watch = HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        watch.next().await.unwrap().unwrap();
        watch
    }

    pub(crate) async fn client(&self) -> KeyValueStoreClient<tonic::transport::Channel> {
        KeyValueStoreClient::connect(format!("http://{}", self.main))
            .await
            .unwrap()
    }
}

pub(crate) async fn running_line(logs: &mut Lines<BufReader<ChildStdout>>) -> Value {
    let line = timeout(PATIENCE, logs.next_line())
        .await
        .expect("a log line in time")
        .unwrap()
        .expect("the server is still writing logs");
    serde_json::from_str(&line).unwrap_or_else(|err| panic!("not a JSON line ({err}): {line}"))
}

#[tokio::test]
async fn sigterm_ends_streams_with_unavailable_and_exits_0() {
    let mut command = server_command();
    command.env("KVSTORE_NOT_A_SETTING", "1");
    let mut server = Running::start(&mut command).await;
    let mut client = server.client().await;
    client
        .set(SetRequest {
            key: "k".into(),
            value: "v".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut stream = client
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();

    server.signal(Signal::SIGTERM);
    let status = timeout(PATIENCE, stream.message())
        .await
        .unwrap()
        .unwrap_err();
    if status.code() != Code::Unavailable {
        let mut rest = Vec::new();
        while let Ok(Ok(Some(line))) = timeout(PATIENCE, server.logs.next_line()).await {
            rest.push(line);
        }
        let code = server.child.wait().await;
        panic!("{status:?}\nexit: {code:?}\nlogs: {rest:#?}");
    }
    let first = server.wait_for_log("shutdown signal received").await;
    assert_eq!(first["signal"], "SIGTERM");
    server.wait_for_log("shutdown: reporting not ready").await;
    server
        .wait_for_log("shutdown: closing listeners and ending subscriptions")
        .await;
    server.wait_for_log("shutdown complete").await;
    assert_eq!(server.exit_code().await, 0);
}

#[tokio::test]
async fn unknown_environment_variables_are_named_in_one_start_up_warning() {
    let mut command = server_command();
    command
        .env("KVSTORE_SERVER__LISTNE", "x")
        .env("KVSTORE_ENDPOINT", "y");
    let mut child = command
        .args(["--listen", "127.0.0.1:0", "--health-listen", ""])
        .spawn()
        .unwrap();
    let mut logs = BufReader::new(child.stdout.take().unwrap()).lines();
    let warning = loop {
        let line = running_line(&mut logs).await;
        if line["level"] == "WARN" {
            break line;
        }
        assert_ne!(
            line["message"], "listening",
            "the warning comes before serving"
        );
    };
    let variables = warning["variables"].as_str().unwrap();
    assert!(variables.contains("KVSTORE_SERVER__LISTNE"), "{warning}");
    assert!(!variables.contains("KVSTORE_ENDPOINT"), "{warning}");
    child.start_kill().unwrap();
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let mut command = server_command();
    command.env("KVSTORE_SHUTDOWN__DRAIN_TIMEOUT", "60s");
    let mut server = Running::start(&mut command).await;
    let _watch = server.watch_health().await;

    server.signal(Signal::SIGINT);
    server
        .wait_for_log("shutdown: waiting for open connections")
        .await;
    server.signal(Signal::SIGINT);
    assert_eq!(server.exit_code().await, 130);
}

#[tokio::test]
async fn a_configuration_error_is_one_line_on_stderr_and_exit_2() {
    let cases: [&[&str]; 4] = [
        &["--listen", "nope"],
        &["--config", "/nonexistent/kvstore.toml"],
        &["--log-format", "xml"],
        &["--no-such-flag"],
    ];
    for args in cases {
        let out = server_command().args(args).output().await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(!stderr.trim().is_empty(), "{args:?}");
        if args[0] != "--no-such-flag" {
            assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
            assert!(
                stderr.starts_with("kvstore-server: configuration error: "),
                "{stderr}"
            );
        }
    }
    let out = server_command()
        .env("GRPC_PORT", "70000")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("GRPC_PORT"));
}

#[tokio::test]
async fn print_config_writes_the_effective_settings_as_pure_toml() {
    let out = server_command()
        .env("HTTP_PORT", "8081")
        .args(["--print-config", "--log-level", "debug"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let printed: Settings = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    let mut expected = Settings::default();
    expected.server.health_listen = Some("0.0.0.0:8081".parse().unwrap());
    expected.log.level = "debug".into();
    assert_eq!(printed, expected);
}

#[tokio::test]
async fn a_port_in_use_fails_start_up_with_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = server_command()
        .args(["--listen", &addr, "--health-listen", ""])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(&format!("binding server.listen {addr}")),
        "{stderr}"
    );
}

#[tokio::test]
async fn version_prints_the_package_version() {
    let out = server_command().arg("--version").output().await.unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains(env!("CARGO_PKG_VERSION")), "{stdout}");
}

#[tokio::test]
async fn the_exit_code_is_0_even_when_the_drain_deadline_forces_connections_closed() {
    let mut command = server_command();
    command.env("KVSTORE_SHUTDOWN__DRAIN_TIMEOUT", "200ms");
    let mut server = Running::start(&mut command).await;
    let _watch = server.watch_health().await;
    server.signal(Signal::SIGTERM);
    let forced = server
        .wait_for_log("shutdown: drain deadline passed, closing the remaining connections")
        .await;
    assert_eq!(forced["level"], "WARN");
    assert_eq!(server.exit_code().await, 0);
}
