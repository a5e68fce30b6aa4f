//! The HTTP routes on both listeners, gRPC health, and reflection (grpcurl needs no proto).

use http::{Method, StatusCode};
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_reflection::pb::{v1, v1alpha};

use crate::helpers::{
    http_get, http_request, require_tool, spawn_server, spawn_with, test_settings,
};

#[tokio::test]
async fn health_routes_answer_on_both_listeners_over_http1_and_http2() {
    let server = spawn_server().await;
    let main = server.grpc_url();
    let legacy = server.health_url();
    for base in [&main, &legacy] {
        for http2 in [false, true] {
            let (status, body) = http_get(&format!("{base}/health/live"), http2).await;
            assert_eq!(
                (status, body.as_str()),
                (StatusCode::OK, r#"{"status":"alive"}"#)
            );
            let (status, body) = http_get(&format!("{base}/health/ready"), http2).await;
            assert_eq!(
                (status, body.as_str()),
                (StatusCode::OK, r#"{"status":"ready"}"#)
            );
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405() {
    let server = spawn_server().await;
    for base in [server.grpc_url(), server.health_url()] {
        let (status, body) = http_get(&format!("{base}/nope"), false).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("no route for GET /nope"), "{body}");
        let (status, _) = http_request(Method::POST, &format!("{base}/health/live"), false).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn the_legacy_listener_can_be_turned_off() {
    let mut settings = test_settings();
    settings.server.health_listen = None;
    let server = spawn_with(settings).await;
    assert_eq!(server.health_addr, None);
    let (status, _) = http_get(&format!("{}/health/ready", server.grpc_url()), false).await;
    assert_eq!(status, StatusCode::OK);
    server.shutdown().await;
}

#[tokio::test]
async fn grpc_health_reports_serving_for_the_server_and_the_kv_service() {
    let server = spawn_server().await;
    let mut health = server.health_client().await;
    for service in ["", "kvstore.KeyValueStore"] {
        let reply = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    server.shutdown().await;
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_the_services() {
    let server = spawn_server().await;
    let channel = server.channel().await;

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("expected a service list, got {reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"kvstore.KeyValueStore".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );

    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "kvstore.KeyValueStore".into(),
            ),
        ),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    assert!(
        matches!(
            reply.message_response,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "{reply:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn grpcurl_works_with_no_proto_file() {
    let Some(grpcurl) = require_tool("grpcurl") else {
        return;
    };
    let server = spawn_server().await;
    let addr = server.grpc_addr.to_string();
    let run = |args: Vec<String>| {
        let grpcurl = grpcurl.clone();
        async move {
            let out = tokio::process::Command::new(grpcurl)
                .args(args)
                .kill_on_drop(true)
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "grpcurl failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }
    };
    let list = run(vec!["-plaintext".into(), addr.clone(), "list".into()]).await;
    assert!(list.contains("kvstore.KeyValueStore"), "{list}");
    let set = run(vec![
        "-plaintext".into(),
        "-d".into(),
        r#"{"key":"a","value":"b"}"#.into(),
        addr.clone(),
        "kvstore.KeyValueStore/Set".into(),
    ])
    .await;
    assert!(set.contains(r#""success": true"#), "{set}");
    let get = run(vec![
        "-plaintext".into(),
        "-d".into(),
        r#"{"key":"a"}"#.into(),
        addr,
        "kvstore.KeyValueStore/Get".into(),
    ])
    .await;
    assert!(get.contains(r#""value": "b""#), "{get}");
    server.shutdown().await;
}
