//! What a web page can do to a local kvstore with authentication off (the default): the
//! requests a browser can send cross-site without a preflight (HTTP/1.1 cleartext, a
//! `text/plain`, form or multipart body), and DNS rebinding (a foreign `Host`). None may
//! store or read a key, or read `/metrics`; real gRPC clients and local scrapers still work.

use std::net::SocketAddr;

use http::{StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kvstore::pb::{GetRequest, SetRequest};
use prost::Message;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::helpers::{PATIENCE, spawn_server, spawn_with, test_settings};
use crate::metrics::scrape;

/// What a page can put in a `no-cors` POST without a preflight.
const SIMPLE_CONTENT_TYPES: [&str; 3] = [
    "text/plain;charset=UTF-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=----kvstore",
];

/// `message` as a gRPC length-prefixed frame: what the page sends as its body.
fn frame(message: &impl Message) -> Bytes {
    let encoded = message.encode_to_vec();
    let mut framed = vec![0];
    framed.extend_from_slice(&u32::try_from(encoded.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&encoded);
    framed.into()
}

/// One request on a fresh connection to `addr`, over HTTP/1.1 (the `Host` header is the
/// request's `host` field) or HTTP/2 with prior knowledge (`:authority` is the URI's): the
/// status, the content type and the body as text.
async fn exchange(
    addr: SocketAddr,
    version: Version,
    request: http::Request<Full<Bytes>>,
) -> (StatusCode, String, String) {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let response = async {
        if version == Version::HTTP_2 {
            let (mut send, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            send.send_request(request).await
        } else {
            let (mut send, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(connection);
            send.send_request(request).await
        }
    };
    let response = timeout(PATIENCE, response)
        .await
        .expect("an answer in time")
        .expect("an answer");
    let status = response.status();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// A request as a page would send it: `host` names the server (a rebinding page's own name,
/// or the address the page was loaded from).
fn request(
    version: Version,
    method: http::Method,
    host: &str,
    path: &str,
    content_type: Option<&str>,
    body: Bytes,
) -> http::Request<Full<Bytes>> {
    let builder = if version == Version::HTTP_2 {
        http::Request::builder().uri(format!("http://{host}{path}"))
    } else {
        http::Request::builder().uri(path).header("host", host)
    };
    let builder = match content_type {
        Some(content_type) => builder.header("content-type", content_type),
        None => builder,
    };
    builder
        .method(method)
        .version(version)
        .body(Full::new(body))
        .unwrap()
}

fn set(key: &str) -> Bytes {
    frame(&SetRequest {
        key: key.into(),
        value: "from a web page".into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn a_cross_site_post_over_http1_stores_nothing_and_is_told_to_use_http2() {
    let server = spawn_server().await;
    let host = server.grpc_addr.to_string();
    for (i, content_type) in SIMPLE_CONTENT_TYPES.into_iter().enumerate() {
        let key = format!("page:{i}");
        let post = request(
            Version::HTTP_11,
            http::Method::POST,
            &host,
            "/kvstore.KeyValueStore/Set",
            Some(content_type),
            set(&key),
        );
        let (status, type_, body) = exchange(server.grpc_addr, Version::HTTP_11, post).await;
        assert_eq!(
            status,
            StatusCode::UPGRADE_REQUIRED,
            "{content_type}: {body}"
        );
        assert!(type_.starts_with("text/plain"), "{type_}");
        assert!(body.contains("HTTP/2"), "{body}");

        let got = server.client().await.get(GetRequest { key }).await.unwrap();
        assert!(!got.into_inner().found, "{content_type}: stored");
    }
    // Even with gRPC's own content type: a browser cannot send it cross-site without a
    // preflight, but HTTP/1.1 is never gRPC here.
    let post = request(
        Version::HTTP_11,
        http::Method::POST,
        &host,
        "/kvstore.KeyValueStore/Set",
        Some("application/grpc"),
        set("page:grpc"),
    );
    let (status, _, _) = exchange(server.grpc_addr, Version::HTTP_11, post).await;
    assert_eq!(status, StatusCode::UPGRADE_REQUIRED);

    // A real gRPC client is served as before.
    let mut client = server.client().await;
    client
        .set(SetRequest {
            key: "k".into(),
            value: "v".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let got = client.get(GetRequest { key: "k".into() }).await.unwrap();
    assert_eq!(got.into_inner().value, "v");
    server.shutdown().await;
}

#[tokio::test]
async fn over_http2_only_a_grpc_content_type_reaches_the_kv_methods() {
    let server = spawn_server().await;
    let host = server.grpc_addr.to_string();
    for content_type in SIMPLE_CONTENT_TYPES.into_iter().map(Some).chain([
        Some("application/grpc-web"),
        Some("application/grpcx"),
        None,
    ]) {
        let post = request(
            Version::HTTP_2,
            http::Method::POST,
            &host,
            "/kvstore.KeyValueStore/Set",
            content_type,
            set("page"),
        );
        let (status, type_, body) = exchange(server.grpc_addr, Version::HTTP_2, post).await;
        assert_eq!(
            status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}: {body}"
        );
        assert!(type_.starts_with("text/plain"), "{type_}");
        assert!(body.contains("application/grpc"), "{body}");
    }
    let got = server
        .client()
        .await
        .get(GetRequest { key: "page".into() })
        .await
        .unwrap();
    assert!(!got.into_inner().found, "stored");

    // gRPC's content types, with a codec suffix or a parameter, are served.
    for content_type in [
        "application/grpc",
        "application/grpc+proto",
        "Application/GRPC",
    ] {
        let post = http::Request::post(format!("http://{host}/kvstore.KeyValueStore/Set"))
            .header("content-type", content_type)
            .header("te", "trailers")
            .body(Full::new(set("grpc")))
            .unwrap();
        let (status, type_, _) = exchange(server.grpc_addr, Version::HTTP_2, post).await;
        assert_eq!(status, StatusCode::OK, "{content_type}");
        assert!(type_.starts_with("application/grpc"), "{type_}");
    }
    let got = server
        .client()
        .await
        .get(GetRequest { key: "grpc".into() })
        .await;
    assert_eq!(got.unwrap().into_inner().value, "from a web page");
    server.shutdown().await;
}

#[tokio::test]
async fn a_dns_rebinding_page_reads_neither_keys_nor_metrics() {
    let server = spawn_server().await;
    server
        .client()
        .await
        .set(SetRequest {
            key: "secret".into(),
            value: "s3cret-value".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let get = frame(&GetRequest {
        key: "secret".into(),
    });
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let read = request(
            version,
            http::Method::POST,
            "rebind.example:50051",
            "/kvstore.KeyValueStore/Get",
            Some("text/plain;charset=UTF-8"),
            get.clone(),
        );
        let (status, _, body) = exchange(server.grpc_addr, version, read).await;
        assert!(status.is_client_error(), "{version:?}: {status} {body}");
        assert!(!body.contains("s3cret-value"), "{version:?}: {body}");

        for addr in [server.grpc_addr, server.health_addr.unwrap()] {
            let metrics = request(
                version,
                http::Method::GET,
                "rebind.example",
                "/metrics",
                None,
                Bytes::new(),
            );
            let (status, _, body) = exchange(addr, version, metrics).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{version:?} {addr}: {body}");
            assert!(body.contains("server.allowed_hosts"), "{body}");
            assert!(!body.contains("kvstore_keys"), "{body}");

            // Health checks answer whatever the Host: load balancers use all sorts.
            let live = request(
                version,
                http::Method::GET,
                "rebind.example",
                "/health/live",
                None,
                Bytes::new(),
            );
            let (status, _, _) = exchange(addr, version, live).await;
            assert_eq!(status, StatusCode::OK, "{version:?} {addr}");
        }
    }
    let metrics = scrape(&format!("http://{}", server.grpc_addr), None).await;
    assert_eq!(
        metrics.get("kvstore_limit_refusals_total{limit=\"server.allowed_hosts\"}"),
        4.0
    );
    server.shutdown().await;
}

#[tokio::test]
async fn metrics_answers_ip_addresses_loopback_names_and_the_allowed_hosts_only() {
    let mut settings = test_settings();
    settings.server.allowed_hosts = vec!["kvstore-1".into(), ".example.org".into()];
    let server = spawn_with(settings).await;
    let passing = [
        "127.0.0.1",
        "127.0.0.1:50051",
        "10.1.2.3:8080",
        "[::1]",
        "[::1]:8080",
        "localhost",
        "localhost:8080",
        "LOCALHOST.",
        "app.localhost:3000",
        "kvstore-1",
        "KVSTORE-1:8080",
        "example.org",
        "metrics.example.org:9090",
    ];
    let refused = [
        "rebind.example",
        "kvstore-2:8080",
        "kvstore-1.attacker.example",
        "localhost.attacker.example",
        "notexample.org",
        "127.0.0.1.nip.io",
        "[::1",
        "",
    ];
    let metrics = |version, host| async move {
        let get = request(
            version,
            http::Method::GET,
            host,
            "/metrics",
            None,
            Bytes::new(),
        );
        let (status, _, body) = exchange(server.grpc_addr, version, get).await;
        (status, body)
    };
    for version in [Version::HTTP_11, Version::HTTP_2] {
        for host in passing {
            let (status, body) = metrics(version, host).await;
            assert_eq!(status, StatusCode::OK, "{version:?} {host:?}: {body}");
        }
        for host in refused {
            // An empty or malformed :authority is not a request h2 will send.
            if version == Version::HTTP_2 && (host.is_empty() || host.starts_with('[')) {
                continue;
            }
            let (status, body) = metrics(version, host).await;
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{version:?} {host:?}: {body}"
            );
        }
    }
    server.shutdown().await;
}
