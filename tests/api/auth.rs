//! Bearer-token authentication, end to end: refusals over gRPC and HTTP, roles, open health
//! checks, reflection per its setting, the token file, the client's `--token`, and the
//! binary's start-up warning and logs.

use std::process::Stdio;

use http_body_util::Full;
use hyper::body::Bytes;
use kvstore::auth::hash_token;
use kvstore::config::{Role, Settings, TokenSpec};
use kvstore::pb::key_value_store_client::KeyValueStoreClient;
use kvstore::pb::{self, batch_op};
use kvstore::token::BearerToken;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::timeout;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::binaries::{running_line, server_command};
use crate::client::{kvstore_client, run};
use crate::helpers::{PATIENCE, TestServer, http_exchange, spawn_with, test_settings};

pub const READER: &str = "reader-0123456789abcdef";
pub const WRITER: &str = "writer-0123456789abcdef";

type Client = KeyValueStoreClient<InterceptedService<Channel, BearerToken>>;

/// Test settings with authentication on, a read token and a readwrite token.
pub fn auth_settings() -> Settings {
    let mut settings = test_settings();
    settings.auth.enabled = true;
    settings.auth.tokens = vec![
        spec(READER, Role::Read, "reader"),
        spec(WRITER, Role::ReadWrite, "writer"),
    ];
    settings
}

pub fn spec(token: &str, role: Role, name: &str) -> TokenSpec {
    TokenSpec {
        sha256: hash_token(token).unwrap(),
        role,
        name: name.into(),
    }
}

/// A KV client presenting `token` (none for `None`).
pub async fn client_with(server: &TestServer, token: Option<&str>) -> Client {
    let token = token.map_or_else(BearerToken::default, |t| BearerToken::parse(t).unwrap());
    KeyValueStoreClient::with_interceptor(server.channel().await, token)
}

fn get(key: &str) -> pb::GetRequest {
    pb::GetRequest { key: key.into() }
}

fn set(key: &str, value: &str) -> pb::SetRequest {
    pb::SetRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    }
}

fn batch(ops: Vec<batch_op::Op>) -> pb::BatchRequest {
    pb::BatchRequest {
        ops: ops
            .into_iter()
            .map(|op| pb::BatchOp { op: Some(op) })
            .collect(),
    }
}

/// A GET on the main listener with an optional `authorization` header.
async fn http_get(
    server: &TestServer,
    path: &str,
    authorization: Option<&str>,
) -> (http::response::Parts, String) {
    let mut request = http::Request::get(format!("{}{path}", server.grpc_url()));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    http_exchange(request.body(Full::new(Bytes::new())).unwrap()).await
}

#[tokio::test]
async fn calls_without_a_token_are_refused_but_health_checks_are_open() {
    let server = spawn_with(auth_settings()).await;
    let status = client_with(&server, None)
        .await
        .get(get("k"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("authorization: Bearer"),
        "{status:?}"
    );

    // Unknown paths (and /metrics, once it exists) need a token too.
    for path in ["/metrics", "/nope"] {
        let (head, body) = http_get(&server, path, None).await;
        assert_eq!(head.status, http::StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(
            head.headers["www-authenticate"],
            r#"Bearer realm="kvstore""#
        );
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("missing bearer token"),
            "{body}"
        );
    }

    for path in ["/health/live", "/health/ready"] {
        let (head, _) = http_get(&server, path, None).await;
        assert_eq!(head.status, http::StatusCode::OK, "{path}");
        let (status, _) =
            crate::helpers::http_get(&format!("{}{path}", server.health_url()), false).await;
        assert_eq!(
            status,
            http::StatusCode::OK,
            "{path} on the health listener"
        );
    }
    let health = server
        .health_client()
        .await
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);
    server.shutdown().await;
}

#[tokio::test]
async fn a_wrong_token_is_refused_without_being_echoed() {
    let server = spawn_with(auth_settings()).await;
    let wrong = "wrong-token-that-must-not-be-echoed";
    let status = client_with(&server, Some(wrong))
        .await
        .get(get("k"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(!format!("{status:?}").contains(wrong), "{status:?}");

    let (head, body) = http_get(&server, "/nope", Some(&format!("Bearer {wrong}"))).await;
    assert_eq!(head.status, http::StatusCode::UNAUTHORIZED);
    assert_eq!(
        head.headers["www-authenticate"],
        r#"Bearer realm="kvstore", error="invalid_token""#
    );
    assert!(
        !body.contains(wrong) && !format!("{head:?}").contains(wrong),
        "{body}"
    );

    let (head, body) = http_get(&server, "/nope", Some(&format!("Basic {wrong}"))).await;
    assert_eq!(head.status, http::StatusCode::UNAUTHORIZED);
    assert!(body.contains("must be `Bearer <token>`"), "{body}");
    assert!(!body.contains(wrong), "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_read_token_reads_and_subscribes_but_cannot_write() {
    let server = spawn_with(auth_settings()).await;
    let mut writer = client_with(&server, Some(WRITER)).await;
    writer.set(set("a", "1")).await.unwrap();
    let mut reader = client_with(&server, Some(READER)).await;

    assert_eq!(reader.get(get("a")).await.unwrap().into_inner().value, "1");
    let list = pb::ListRequest {
        prefix: "a".into(),
        ..Default::default()
    };
    assert_eq!(reader.list(list).await.unwrap().into_inner().items.len(), 1);
    let gets = batch(vec![batch_op::Op::Get(get("a"))]);
    assert_eq!(
        reader.batch(gets).await.unwrap().into_inner().results.len(),
        1
    );
    let mut events = reader
        .subscribe(pb::SubscribeRequest {
            key_pattern: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    writer.set(set("a", "2")).await.unwrap();
    let event = timeout(PATIENCE, events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.value, "2");

    let refused = [
        reader.set(set("a", "3")).await.unwrap_err(),
        reader
            .delete(pb::DeleteRequest {
                key: "a".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        reader
            .batch(batch(vec![
                batch_op::Op::Get(get("a")),
                batch_op::Op::Set(set("a", "4")),
            ]))
            .await
            .unwrap_err(),
    ];
    for status in refused {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("\"reader\" has role read"),
            "{status:?}"
        );
        assert!(status.message().contains("needs readwrite"), "{status:?}");
    }
    let delete = pb::DeleteRequest {
        key: "a".into(),
        ..Default::default()
    };
    let ops = vec![batch_op::Op::Get(get("a")), batch_op::Op::Delete(delete)];
    let status = reader.batch(batch(ops)).await.unwrap_err();
    assert!(
        status.message().contains("a Batch that writes (op 1)"),
        "{status:?}"
    );
    assert_eq!(
        reader.get(get("a")).await.unwrap().into_inner().value,
        "2",
        "nothing written"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_readwrite_token_may_do_everything() {
    let server = spawn_with(auth_settings()).await;
    let mut writer = client_with(&server, Some(WRITER)).await;
    writer.set(set("b", "1")).await.unwrap();
    let ops = vec![
        batch_op::Op::Set(set("c", "2")),
        batch_op::Op::Get(get("b")),
    ];
    writer.batch(batch(ops)).await.unwrap();
    let deleted = writer
        .delete(pb::DeleteRequest {
            key: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted);
    assert_eq!(writer.get(get("c")).await.unwrap().into_inner().value, "2");
    server.shutdown().await;
}

/// Lists the services through reflection v1, with `token` if any.
async fn list_services(
    server: &TestServer,
    token: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let token = token.map_or_else(BearerToken::default, |t| BearerToken::parse(t).unwrap());
    let mut client = ServerReflectionClient::with_interceptor(server.channel().await, token);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await?
        .into_inner();
    let response = responses.message().await?.expect("a reflection response");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("not a service list: {other:?}"),
    }
}

#[tokio::test]
async fn reflection_and_metrics_need_a_token_unless_configured_open() {
    let server = spawn_with(auth_settings()).await;
    let status = list_services(&server, None).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let services = list_services(&server, Some(READER)).await.unwrap();
    assert!(
        services.contains(&"kvstore.KeyValueStore".to_owned()),
        "{services:?}"
    );
    let (head, _) = http_get(&server, "/metrics", Some(&format!("Bearer {READER}"))).await;
    assert_ne!(head.status, http::StatusCode::UNAUTHORIZED);
    server.shutdown().await;

    let mut settings = auth_settings();
    settings.auth.protect_reflection = false;
    settings.auth.protect_metrics = false;
    let server = spawn_with(settings).await;
    let services = list_services(&server, None).await.unwrap();
    assert!(
        services.contains(&"kvstore.KeyValueStore".to_owned()),
        "{services:?}"
    );
    let (head, _) = http_get(&server, "/metrics", None).await;
    assert_ne!(head.status, http::StatusCode::UNAUTHORIZED);
    // Still closed: the KV service.
    let status = client_with(&server, None)
        .await
        .get(get("k"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    server.shutdown().await;
}

#[tokio::test]
async fn tokens_from_a_token_file_authenticate_with_their_roles() {
    let dir = std::env::temp_dir().join(format!("kvstore-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokens.txt");
    let reader = "file-reader-token";
    let writer = "file-writer-token";
    let file = format!(
        "# kvstore tokens\nread {} dashboard\n\nreadwrite {}  # ci\n",
        hash_token(reader).unwrap(),
        hash_token(writer).unwrap()
    );
    std::fs::write(&path, file).unwrap();
    let mut settings = test_settings();
    settings.auth.enabled = true;
    settings.auth.token_file = path;
    let server = spawn_with(settings).await;

    client_with(&server, Some(writer))
        .await
        .set(set("f", "1"))
        .await
        .unwrap();
    let mut read = client_with(&server, Some(reader)).await;
    assert_eq!(read.get(get("f")).await.unwrap().into_inner().value, "1");
    let status = read.set(set("f", "2")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("\"dashboard\""), "{status:?}");
    server.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn kvstore_client_sends_its_token() {
    let server = spawn_with(auth_settings()).await;
    let addr = server.grpc_addr.to_string();

    let finished = run(kvstore_client([
        "--server", &addr, "--token", WRITER, "set", "t", "v",
    ]))
    .await;
    assert!(finished.status.success(), "{}", finished.stderr);
    let mut command = kvstore_client(["--server", &addr, "get", "t"]);
    command
        .env("KVSTORE_TOKEN", READER)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let finished = run(command).await;
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(finished.stdout.starts_with("t = v"), "{}", finished.stdout);

    let finished = run(kvstore_client(["--server", &addr, "get", "t"])).await;
    assert_eq!(finished.status.code(), Some(3));
    assert!(
        finished.stderr.contains("UNAUTHENTICATED"),
        "{}",
        finished.stderr
    );
    let finished = run(kvstore_client([
        "--server", &addr, "--token", READER, "set", "t", "w",
    ]))
    .await;
    assert_eq!(finished.status.code(), Some(3));
    assert!(
        finished.stderr.contains("PERMISSION_DENIED"),
        "{}",
        finished.stderr
    );
    assert!(!finished.stderr.contains(READER), "{}", finished.stderr);
    // The original flag form takes it too.
    let finished = run(kvstore_client([
        &format!("-server={addr}"),
        &format!("-token={WRITER}"),
        "-op=get",
        "-key=t",
    ]))
    .await;
    assert!(finished.status.success(), "{}", finished.stderr);
    server.shutdown().await;
}

/// Reads the binary's log lines up to its "listening" line for the main listener, returning
/// the warnings seen before it.
async fn warnings_before_listening(listen: &str) -> Vec<serde_json::Value> {
    let mut child = server_command()
        .args(["--listen", listen, "--health-listen", ""])
        .spawn()
        .unwrap();
    let mut logs = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut warnings = Vec::new();
    loop {
        let line = running_line(&mut logs).await;
        if line["message"] == "listening" && line["listener"] == "main" {
            break;
        }
        if line["level"] == "WARN" {
            warnings.push(line);
        }
    }
    child.start_kill().unwrap();
    warnings
}

#[tokio::test]
async fn without_auth_a_listener_beyond_loopback_is_warned_about_loudly() {
    // Bound on every interface, but only for as long as its start-up log takes; nothing
    // connects to it.
    let warnings = warnings_before_listening("0.0.0.0:0").await;
    assert!(
        warnings.iter().any(|w| w["message"]
            .as_str()
            .unwrap()
            .starts_with("AUTHENTICATION IS OFF")),
        "{warnings:?}"
    );
    let warnings = warnings_before_listening("127.0.0.1:0").await;
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[tokio::test]
async fn tokens_never_reach_the_logs_or_the_printed_config() {
    let tokens = format!(
        "[{{sha256=\"{}\", role=\"readwrite\", name=\"ci\"}}]",
        hash_token(WRITER).unwrap()
    );
    let mut command = server_command();
    command
        .env("KVSTORE_AUTH__ENABLED", "true")
        .env("KVSTORE_AUTH__TOKENS", &tokens)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--health-listen",
            "",
            "--log-level",
            "debug",
        ]);
    let mut child = command.spawn().unwrap();
    let mut logs = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let addr: std::net::SocketAddr = loop {
        let line = running_line(&mut logs).await;
        seen.push(line.to_string());
        if line["message"] == "listening" && line["listener"] == "main" {
            break line["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    let url = format!("http://{addr}");
    let channel = Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let wrong = "wrong-secret-0123456789";
    for token in [WRITER, wrong] {
        let mut client = KeyValueStoreClient::with_interceptor(
            channel.clone(),
            BearerToken::parse(token).unwrap(),
        );
        let _ = client.set(set("k", "v")).await;
    }
    let request = http::Request::get(format!("{url}/nope"))
        .header("authorization", format!("Bearer {wrong}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (head, _) = http_exchange(request).await;
    assert_eq!(head.status, http::StatusCode::UNAUTHORIZED);

    kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    while let Ok(Some(line)) = timeout(PATIENCE, logs.next_line())
        .await
        .expect("logs until exit")
    {
        seen.push(line);
    }
    assert!(
        timeout(PATIENCE, child.wait())
            .await
            .unwrap()
            .unwrap()
            .success()
    );
    let logs = seen.join("\n");
    assert!(
        logs.contains("/kvstore.KeyValueStore/Set"),
        "debug logs trace each refusal: {logs}"
    );
    let finished = seen
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .any(|line| {
            line["message"] == "call finished" && line["method"] == "Set" && line["code"] == "OK"
        });
    assert!(finished, "debug logs each call with its code: {logs}");
    for secret in [WRITER, wrong] {
        assert!(!logs.contains(secret), "{secret} in the logs: {logs}");
    }

    let printed = server_command()
        .env("KVSTORE_AUTH__ENABLED", "true")
        .env("KVSTORE_AUTH__TOKENS", &tokens)
        .arg("--print-config")
        .output()
        .await
        .unwrap();
    assert!(printed.status.success());
    let printed = String::from_utf8(printed.stdout).unwrap();
    assert!(printed.contains(&hash_token(WRITER).unwrap()), "{printed}");
    assert!(!printed.contains(WRITER), "{printed}");
}
