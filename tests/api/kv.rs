//! Get and Set over gRPC: found and not found, and every limit.

use kvstore::pb::{GetRequest, GetResponse, SetRequest};
use tonic::Code;

use crate::helpers::spawn_server;

fn set(key: &str, value: &str) -> SetRequest {
    SetRequest {
        key: key.into(),
        value: value.into(),
    }
}

fn get(key: &str) -> GetRequest {
    GetRequest { key: key.into() }
}

#[tokio::test]
async fn set_then_get_returns_the_value() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let reply = client
        .set(set("user:1", "Alice"))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.success);
    assert!(!reply.message.is_empty());
    client.set(set("user:1", "Bob")).await.unwrap();
    let got = client.get(get("user:1")).await.unwrap().into_inner();
    assert_eq!(
        got,
        GetResponse {
            value: "Bob".into(),
            found: true
        }
    );
    server.shutdown().await;
}

#[tokio::test]
async fn get_of_a_missing_key_is_not_found_and_empty() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let got = client.get(get("nobody")).await.unwrap().into_inner();
    assert_eq!(got, GetResponse::default());
    server.shutdown().await;
}

#[tokio::test]
async fn an_empty_value_is_a_value() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    client.set(set("empty", "")).await.unwrap();
    let got = client.get(get("empty")).await.unwrap().into_inner();
    assert!(got.found);
    assert_eq!(got.value, "");
    server.shutdown().await;
}

#[tokio::test]
async fn bad_keys_and_values_are_refused_with_the_limit_named_and_nothing_stored() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let long_key = "k".repeat(4097);
    let long_value = "v".repeat(1024 * 1024 + 1);
    let cases = [
        (set("", "v"), "empty"),
        (set(&long_key, "v"), "limits.max_key_bytes"),
        (set("big", &long_value), "limits.max_value_bytes"),
    ];
    for (request, says) in cases {
        let status = client.set(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(says), "{}", status.message());
    }
    assert!(server.store.is_empty());
    for key in ["", long_key.as_str()] {
        let status = client.get(get(key)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn keys_and_values_at_the_limits_are_stored() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let key = "k".repeat(4096);
    let value = "v".repeat(1024 * 1024);
    client.set(set(&key, &value)).await.unwrap();
    let got = client.get(get(&key)).await.unwrap().into_inner();
    assert_eq!(got.value.len(), value.len());
    server.shutdown().await;
}

#[tokio::test]
async fn a_message_far_over_the_limit_gets_a_status_and_the_connection_keeps_working() {
    let server = spawn_server().await;
    let mut client = server.client().await;
    let huge = "v".repeat(8 * 1024 * 1024);
    let status = client.set(set("huge", &huge)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // The same channel still serves.
    client.set(set("after", "ok")).await.unwrap();
    assert!(client.get(get("after")).await.unwrap().into_inner().found);
    assert!(!client.get(get("huge")).await.unwrap().into_inner().found);
    server.shutdown().await;
}

#[tokio::test]
async fn an_unknown_method_is_unimplemented() {
    let server = spawn_server().await;
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    for path in ["/kvstore.KeyValueStore/Nope", "/other.Service/Get"] {
        grpc.ready().await.unwrap();
        let status = grpc
            .unary::<GetRequest, GetResponse, _>(
                tonic::Request::new(get("a")),
                http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{path}");
    }
    server.shutdown().await;
}
