//! Graceful shutdown: readiness goes first, streams end with UNAVAILABLE, and the drain
//! deadline bounds what is left.

use std::time::Duration;

use http::StatusCode;
use kvstore::pb::{SetRequest, SubscribeRequest};
use tokio::time::timeout;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::{PATIENCE, http_get, spawn_server, spawn_with, test_settings};

#[tokio::test]
async fn readiness_and_grpc_health_flip_first_while_requests_are_still_served() {
    let mut settings = test_settings();
    // Long enough to observe; the test ends it by checking, then waiting it out.
    settings.shutdown.drain_delay = Duration::from_secs(1);
    let mut server = spawn_with(settings).await;
    let mut client = server.client().await;
    let mut watch = server.watch_health().await;

    server.begin_shutdown();
    let update = timeout(PATIENCE, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(update.status(), ServingStatus::NotServing);
    for base in [server.grpc_url(), server.health_url()] {
        let (status, body) = http_get(&format!("{base}/health/ready"), false).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, r#"{"status":"draining"}"#);
        let (status, _) = http_get(&format!("{base}/health/live"), true).await;
        assert_eq!(status, StatusCode::OK);
    }
    // Still serving during the delay, on the open connection and on a new one.
    client
        .set(SetRequest {
            key: "k".into(),
            value: "v".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut fresh = server.client().await;
    fresh
        .set(SetRequest {
            key: "k".into(),
            value: "w".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    drop(watch);
    server.stopped().await;
}

#[tokio::test]
async fn shutdown_ends_open_subscriptions_with_unavailable() {
    let mut server = spawn_server().await;
    let mut client = server.client().await;
    let mut streams = Vec::new();
    for pattern in ["", "a", "b"] {
        let stream = client
            .subscribe(SubscribeRequest {
                key_pattern: pattern.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        streams.push(stream);
    }
    server.begin_shutdown();
    for stream in &mut streams {
        let status = timeout(PATIENCE, stream.message())
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("shutting down"),
            "{}",
            status.message()
        );
    }
    let took = server.stopped().await;
    assert!(
        took < Duration::from_secs(5),
        "drained in {took:?}, before the deadline"
    );
}

#[tokio::test]
async fn the_drain_deadline_closes_connections_that_never_finish() {
    let mut settings = test_settings();
    settings.shutdown.drain_timeout = Duration::from_millis(300);
    let server = spawn_with(settings).await;
    // A health Watch stream never ends by itself, so only the deadline can close it.
    let mut watch = server.watch_health().await;
    let took = server.shutdown().await;
    assert!(
        took >= Duration::from_millis(300),
        "waited for the deadline: {took:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "but not much longer: {took:?}"
    );
    // The stream was cut: the client sees it end rather than hang.
    let end = timeout(PATIENCE, async {
        while let Some(Ok(_)) = watch.next().await {}
    })
    .await;
    assert!(end.is_ok());
}

#[tokio::test]
async fn after_shutdown_the_ports_are_closed() {
    let server = spawn_server().await;
    let addr = server.grpc_addr;
    server.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// A call is in flight once its message has arrived (`server.request_body_timeout`): one
/// still sending it when shutdown begins is refused, unprocessed, so its client can retry
/// elsewhere at once rather than hold the drain.
#[tokio::test]
async fn a_unary_call_still_sending_its_message_when_shutdown_begins_is_refused_unprocessed() {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::{Bytes, Frame};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use prost::Message;

    let mut server = spawn_server().await;
    let request = SetRequest {
        key: "in-flight".into(),
        value: "done".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut frame = vec![0];
    frame.extend_from_slice(&u32::try_from(request.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&request);

    // The body arrives in two halves; shutdown begins between them.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(2);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let call = http::Request::post(format!("{}/kvstore.KeyValueStore/Set", server.grpc_url()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let (first, second) = frame.split_at(frame.len() / 2);
    tx.send(Ok(Frame::data(Bytes::copy_from_slice(first))))
        .await
        .unwrap();
    let response = tokio::spawn(client.request(call));

    let mut watch = server.watch_health().await;
    server.begin_shutdown();
    let update = timeout(PATIENCE, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        update.status(),
        ServingStatus::NotServing,
        "shutdown has begun"
    );
    // And the listener has closed: the drain is under way while the call is half sent.
    timeout(PATIENCE, async {
        while tokio::net::TcpStream::connect(server.grpc_addr)
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the listener closes");

    tx.send(Ok(Frame::data(Bytes::copy_from_slice(second))))
        .await
        .unwrap();
    drop(tx);
    let response = timeout(PATIENCE, response).await.unwrap().unwrap().unwrap();
    // A refusal is trailers-only: its status is in the headers.
    let mut grpc_status = response.headers().get("grpc-status").cloned();
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        if let Ok(trailers) = frame.unwrap().into_trailers() {
            grpc_status = trailers.get("grpc-status").cloned();
        }
    }
    assert_eq!(grpc_status.unwrap(), "14", "UNAVAILABLE");
    let (stored, _) = server.store.get("in-flight");
    assert!(stored.is_none(), "the call was not processed");
    drop(watch);
    server.stopped().await;
}
