//! TLS on the main listener, with certificates made at run time (rcgen): gRPC, HTTP/1.1 and
//! HTTP/2 sharing one TLS port through ALPN, plaintext clients refused cleanly, mutual TLS,
//! connections past `server.max_connections` told why over TLS, and `kvstore-client` over TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kvstore::config::Settings;
use kvstore::pb;
use kvstore::pb::key_value_store_client::KeyValueStoreClient;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::helpers::{PATIENCE, TestServer, spawn_with, test_settings};

/// A certificate (PEM) and its private key (PEM).
struct Pair {
    cert: String,
    key: String,
}

/// A throw-away PKI in its own directory: a CA, a server certificate for 127.0.0.1 and
/// localhost, a client certificate from the same CA, and one from a CA the server does not
/// trust. The directory is removed on drop.
pub(crate) struct Pki {
    dir: PathBuf,
    ca: String,
    ca_der: CertificateDer<'static>,
    server: Pair,
    client: Pair,
    stranger: Pair,
}

fn new_ca(name: &str) -> (CertificateParams, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name.push(DnType::CommonName, name);
    (params, KeyPair::generate().unwrap())
}

fn leaf(issuer: &Issuer<'_, KeyPair>, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Pair {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names).unwrap();
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

impl Pki {
    pub(crate) fn new(test: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("kvstore-tls-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();

        let (params, key) = new_ca("kvstore test CA");
        let ca = params.self_signed(&key).unwrap();
        let issuer = Issuer::new(params, key);
        let (other_params, other_key) = new_ca("some other CA");
        let other = Issuer::new(other_params, other_key);
        let pki = Pki {
            ca: ca.pem(),
            ca_der: ca.der().clone(),
            server: leaf(
                &issuer,
                &["localhost", "127.0.0.1"],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            client: leaf(&issuer, &["client"], ExtendedKeyUsagePurpose::ClientAuth),
            stranger: leaf(&other, &["stranger"], ExtendedKeyUsagePurpose::ClientAuth),
            dir,
        };
        for (name, pem) in [
            ("ca.pem", &pki.ca),
            ("server.pem", &pki.server.cert),
            ("server.key", &pki.server.key),
            ("client.pem", &pki.client.cert),
            ("client.key", &pki.client.key),
            ("stranger.pem", &pki.stranger.cert),
            ("stranger.key", &pki.stranger.key),
        ] {
            std::fs::write(pki.dir.join(name), pem).unwrap();
        }
        pki
    }

    pub(crate) fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }

    /// Test settings with TLS on the main listener, and client certificates required if
    /// `mutual`.
    pub(crate) fn settings(&self, mutual: bool) -> Settings {
        let mut settings = test_settings();
        settings.tls.cert = self.dir.join("server.pem");
        settings.tls.key = self.dir.join("server.key");
        if mutual {
            settings.tls.client_ca = self.dir.join("ca.pem");
        }
        settings
    }

    /// A gRPC client that trusts the test CA and presents `identity`, if any.
    async fn client(
        &self,
        addr: SocketAddr,
        identity: Option<&Pair>,
    ) -> Result<KeyValueStoreClient<Channel>, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca));
        if let Some(pair) = identity {
            tls = tls.identity(Identity::from_pem(&pair.cert, &pair.key));
        }
        let channel = Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)?
            .connect()
            .await?;
        Ok(KeyValueStoreClient::new(channel))
    }

    /// GET `path` over TLS with only `alpn` offered: the status, the HTTP version and body.
    async fn https_get(
        &self,
        addr: SocketAddr,
        path: &str,
        alpn: &[u8],
    ) -> (http::StatusCode, http::Version, String) {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("the TLS handshake succeeds");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));

        let io = TokioIo::new(tls);
        let request = http::Request::get(format!("https://localhost{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = if alpn == b"h2" {
            let (mut send, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            timeout(PATIENCE, send.send_request(request)).await
        } else {
            let (mut send, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(connection);
            timeout(PATIENCE, send.send_request(request)).await
        }
        .expect("an answer in time")
        .unwrap();
        let status = response.status();
        let version = response.version();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, version, String::from_utf8(body.to_vec()).unwrap())
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn set_then_get(client: &mut KeyValueStoreClient<Channel>, key: &str) {
    client
        .set(pb::SetRequest {
            key: key.into(),
            value: "over TLS".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let got = client
        .get(pb::GetRequest { key: key.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, "over TLS");
}

#[tokio::test]
async fn grpc_http1_and_h2_share_one_tls_port() {
    let pki = Pki::new("share");
    let server = spawn_with(pki.settings(false)).await;

    let mut client = pki.client(server.grpc_addr, None).await.unwrap();
    set_then_get(&mut client, "tls/a").await;

    for (alpn, version) in [
        (&b"http/1.1"[..], http::Version::HTTP_11),
        (b"h2", http::Version::HTTP_2),
    ] {
        let (status, got, body) = pki.https_get(server.grpc_addr, "/health/ready", alpn).await;
        assert_eq!(status, http::StatusCode::OK);
        assert_eq!(got, version);
        assert_eq!(body, r#"{"status":"ready"}"#);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn plaintext_to_the_tls_port_fails_cleanly_and_tls_clients_are_still_served() {
    let pki = Pki::new("plaintext");
    let server = spawn_with(pki.settings(false)).await;

    // gRPC over h2c: an error, not a hang.
    let h2c = timeout(PATIENCE, async {
        let channel = Channel::from_shared(format!("http://{}", server.grpc_addr))
            .unwrap()
            .connect()
            .await
            .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
        KeyValueStoreClient::new(channel)
            .get(pb::GetRequest { key: "a".into() })
            .await
    })
    .await
    .expect("the plaintext call ends in time");
    assert!(h2c.is_err(), "{h2c:?}");

    // HTTP/1.1 in cleartext: the server closes without an HTTP answer.
    let mut tcp = TcpStream::connect(server.grpc_addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET /health/live HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = timeout(PATIENCE, tcp.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection in time");
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");

    let mut client = pki.client(server.grpc_addr, None).await.unwrap();
    set_then_get(&mut client, "tls/b").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_connection_that_never_starts_the_handshake_is_closed_after_the_handshake_timeout() {
    let pki = Pki::new("silent");
    let mut settings = pki.settings(false);
    settings.server.handshake_timeout = Duration::from_millis(300);
    let server = spawn_with(settings).await;

    let started = Instant::now();
    let mut silent = TcpStream::connect(server.grpc_addr).await.unwrap();
    let mut received = Vec::new();
    let _ = timeout(PATIENCE, silent.read_to_end(&mut received))
        .await
        .expect("closed in time");
    assert!(received.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(300));
    server.shutdown().await;
}

/// Under mutual TLS a refused client may complete its side of the handshake (TLS 1.3 checks
/// the client's certificate after the client is done), so the refusal shows on the first call.
async fn refused(pki: &Pki, server: &TestServer, identity: Option<&Pair>) {
    let result = timeout(PATIENCE, async {
        let mut client = pki
            .client(server.grpc_addr, identity)
            .await
            .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
        client.get(pb::GetRequest { key: "a".into() }).await
    })
    .await
    .expect("the refusal comes in time");
    assert!(result.is_err(), "{result:?}");
}

#[tokio::test]
async fn mutual_tls_serves_only_clients_with_a_certificate_from_the_configured_ca() {
    let pki = Pki::new("mutual");
    let server = spawn_with(pki.settings(true)).await;

    refused(&pki, &server, None).await;
    refused(&pki, &server, Some(&pki.stranger)).await;

    let mut client = pki
        .client(server.grpc_addr, Some(&pki.client))
        .await
        .unwrap();
    set_then_get(&mut client, "tls/c").await;
    // The legacy health listener stays cleartext and open.
    let (status, _) =
        crate::helpers::http_get(&format!("{}/health/ready", server.health_url()), false).await;
    assert_eq!(status, http::StatusCode::OK);
    server.shutdown().await;
}

#[tokio::test]
async fn connections_past_max_connections_are_told_why_over_tls() {
    let pki = Pki::new("max-connections");
    let mut settings = pki.settings(false);
    settings.server.max_connections = 1;
    let server = spawn_with(settings).await;
    // A call proves the connection is being served, so it counts.
    let mut held = pki.client(server.grpc_addr, None).await.unwrap();
    set_then_get(&mut held, "tls/held").await;

    // gRPC: the handshake succeeds, then the GOAWAY names the limit.
    let call = timeout(PATIENCE, async {
        let mut client = pki
            .client(server.grpc_addr, None)
            .await
            .map_err(|err| tonic::Status::unknown(format!("connecting: {err}")))?;
        client.get(pb::GetRequest { key: "a".into() }).await
    })
    .await
    .expect("the refusal comes in time");
    let status = call.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("server.max_connections (1)"),
        "{status:?}"
    );

    // HTTP/1.1: a 503 naming the limit.
    let (status, version, body) = pki
        .https_get(server.grpc_addr, "/health/live", b"http/1.1")
        .await;
    assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(version, http::Version::HTTP_11);
    assert!(body.contains("server.max_connections (1)"), "{body}");

    // The held connection is unaffected, and the refusals are counted (the health
    // listener has its own connection count).
    set_then_get(&mut held, "tls/held").await;
    let metrics = crate::metrics::scrape(&server.health_url(), None).await;
    let refused = metrics.get("kvstore_limit_refusals_total{limit=\"server.max_connections\"}");
    assert!(refused >= 2.0, "each refusal is counted: {refused}");
    server.shutdown().await;
}

async fn kvstore_client(args: &[&str]) -> (Option<i32>, String, String) {
    let output = timeout(
        PATIENCE,
        Command::new(env!("CARGO_BIN_EXE_kvstore-client"))
            .args(args)
            .env_remove("KVSTORE_ENDPOINT")
            .env_remove("KVSTORE_CA_CERT")
            .env_remove("KVSTORE_CLIENT_CERT")
            .env_remove("KVSTORE_CLIENT_KEY")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("kvstore-client exits in time")
    .unwrap();
    (
        output.status.code(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[tokio::test]
async fn kvstore_client_speaks_tls_with_a_ca_file_and_a_client_certificate() {
    let pki = Pki::new("client");
    let server = spawn_with(pki.settings(true)).await;
    let addr = server.grpc_addr.to_string();
    let https = format!("https://{addr}");
    let ca = pki.path("ca.pem");
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    let identity = ["--client-cert", &cert, "--client-key", &key];

    let tls_flag = [
        &["--server", &addr, "--tls", "--ca-cert", &ca][..],
        &identity,
    ]
    .concat();
    let set = kvstore_client(&[&tls_flag[..], &["set", "tls/d", "Alice"]].concat()).await;
    assert_eq!(set.0, Some(0), "{}", set.2);

    let url = [&["--server", &https, "--ca-cert", &ca][..], &identity].concat();
    let get = kvstore_client(&[&url[..], &["get", "tls/d"]].concat()).await;
    assert_eq!(get.0, Some(0), "{}", get.2);
    assert!(get.1.starts_with("tls/d = Alice"), "{}", get.1);
    let health = kvstore_client(&[&url[..], &["health"]].concat()).await;
    assert_eq!((health.0, health.1.as_str()), (Some(0), "SERVING\n"));

    // No client certificate: refused by the server, exit 3.
    let anonymous = kvstore_client(&["--server", &https, "--ca-cert", &ca, "health"]).await;
    assert_eq!(anonymous.0, Some(3), "{}", anonymous.2);
    // The built-in public roots do not include the test CA.
    let public =
        kvstore_client(&[&["--server", &https][..], &identity, &["health"]].concat()).await;
    assert_eq!(public.0, Some(3), "{}", public.2);
    assert!(public.2.contains("certificate"), "{}", public.2);
    // Cleartext to the TLS port.
    let plain = kvstore_client(&["--server", &addr, "health"]).await;
    assert_eq!(plain.0, Some(3), "{}", plain.2);
    // A CA file that is not there: a usage error naming the flag.
    let missing =
        kvstore_client(&["--server", &addr, "--ca-cert", "/nonexistent.pem", "health"]).await;
    assert_eq!(missing.0, Some(2), "{}", missing.2);
    assert!(
        missing
            .2
            .starts_with("kvstore-client: --ca-cert /nonexistent.pem: cannot read"),
        "{}",
        missing.2
    );
    server.shutdown().await;
}
