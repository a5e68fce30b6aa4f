//! Starting and stopping a real server for a test, and the clients that talk to it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kvstore::config::Settings;
use kvstore::pb::key_value_store_client::KeyValueStoreClient;
use kvstore::startup::Startup;
use kvstore::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Streaming;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// How long any one wait in a test may take before the test fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(10);

static TRACING: LazyLock<()> = LazyLock::new(|| {
    if std::env::var_os("TEST_LOG").is_some() {
        let mut settings = Settings::default();
        settings.log.level = "debug".into();
        let startup = Startup::from_settings(settings).expect("debug is a level");
        kvstore::telemetry::init(startup.log_filter, kvstore::config::LogFormat::Text)
            .expect("the first and only subscriber");
    }
});

/// A server running in this process on loopback ports chosen by the OS.
pub struct TestServer {
    pub grpc_addr: SocketAddr,
    pub health_addr: Option<SocketAddr>,
    pub store: Store,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// Settings for tests: both listeners on 127.0.0.1:0 and a short drain.
pub fn test_settings() -> Settings {
    let mut settings = Settings::default();
    settings.server.listen = "127.0.0.1:0".parse().unwrap();
    settings.server.health_listen = Some("127.0.0.1:0".parse().unwrap());
    settings.shutdown.drain_timeout = Duration::from_secs(5);
    settings
}

pub async fn spawn_server() -> TestServer {
    spawn_with(test_settings()).await
}

/// Binds with the same `bind`/`run` as the binary; the listeners accept before this returns.
pub async fn spawn_with(settings: Settings) -> TestServer {
    LazyLock::force(&TRACING);
    let startup = Startup::from_settings(settings).expect("test settings are valid");
    let server = kvstore::server::bind(startup)
        .await
        .expect("binding on 127.0.0.1:0");
    let grpc_addr = server.listen_addr();
    let health_addr = server.health_addr();
    let store = server.store().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    TestServer {
        grpc_addr,
        health_addr,
        store,
        stop: Some(stop),
        task,
    }
}

impl TestServer {
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// The legacy health listener's base URL.
    pub fn health_url(&self) -> String {
        format!(
            "http://{}",
            self.health_addr.expect("the health listener is on")
        )
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.grpc_url())
            .unwrap()
            .connect()
            .await
            .expect("connecting to the test server")
    }

    pub async fn client(&self) -> KeyValueStoreClient<Channel> {
        KeyValueStoreClient::new(self.channel().await)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    pub async fn health_client(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel().await)
    }

    /// A gRPC health Watch of the whole server, after its first update, which must say
    /// SERVING. The stream reports each later change, and never ends by itself.
    pub async fn watch_health(&self) -> Streaming<HealthCheckResponse> {
        let mut watch = self
            .health_client()
            .await
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("the health service answers Watch")
            .into_inner();
        let first = watch.message().await.unwrap().expect("a first update");
        assert_eq!(first.status(), ServingStatus::Serving);
        watch
    }

    /// Sends the shutdown signal; the server starts draining.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits for `run` to return, failing the test if it takes longer than [`PATIENCE`].
    /// Returns how long that took.
    pub async fn stopped(self) -> Duration {
        let started = tokio::time::Instant::now();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the server stops within the drain deadline")
            .expect("the server task does not panic")
            .expect("run ends with Ok");
        started.elapsed()
    }

    /// Graceful shutdown, as on SIGTERM, awaited.
    pub async fn shutdown(mut self) -> Duration {
        self.begin_shutdown();
        self.stopped().await
    }

    /// Waits until the store has `n` open subscriptions. Subscriptions are released by the
    /// server's tasks, so this polls, bounded by [`PATIENCE`].
    pub async fn wait_for_subscriptions(&self, n: usize) {
        let store = self.store.clone();
        tokio::time::timeout(PATIENCE, async move {
            while store.subscriptions() != n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("expected {n} open subscriptions"));
    }
}

/// A plain HTTP GET over HTTP/1.1 or HTTP/2 (prior knowledge): status and body.
pub async fn http_get(url: &str, http2: bool) -> (http::StatusCode, String) {
    http_request(http::Method::GET, url, http2).await
}

pub async fn http_request(
    method: http::Method,
    url: &str,
    http2: bool,
) -> (http::StatusCode, String) {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build_http::<Empty<Bytes>>();
    let request = http::Request::builder()
        .method(method)
        .uri(url)
        .body(Empty::new())
        .unwrap();
    let response = tokio::time::timeout(PATIENCE, client.request(request))
        .await
        .expect("an HTTP answer in time")
        .expect("an HTTP answer");
    let status = response.status();
    let expected = if http2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    assert_eq!(response.version(), expected);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// Any HTTP/1.1 request: the response's head and its body as text.
pub async fn http_exchange(request: http::Request<Full<Bytes>>) -> (http::response::Parts, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = tokio::time::timeout(PATIENCE, client.request(request))
        .await
        .expect("an HTTP answer in time")
        .expect("an HTTP answer");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts, String::from_utf8(body.to_vec()).unwrap())
}

/// What one header field counts toward `server.max_header_bytes`: its name and value plus
/// 32 bytes, as HTTP/2's SETTINGS_MAX_HEADER_LIST_SIZE counts it (pseudo-header fields such
/// as `:path` included).
pub fn field_size(name: &str, value: &str) -> usize {
    name.len() + value.len() + 32
}

/// Whether tests that need an outside tool must fail (CI) rather than skip when it is absent.
pub fn tools_required() -> bool {
    std::env::var("KVSTORE_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// Finds `tool` on PATH, or says loudly that the test is skipped (failing under
/// `KVSTORE_REQUIRE_TOOLS=1`).
pub fn require_tool(tool: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|path| path.is_file())
    });
    if found.is_none() {
        assert!(
            !tools_required(),
            "{tool} is not installed and KVSTORE_REQUIRE_TOOLS=1"
        );
        eprintln!("SKIPPED: {tool} is not installed; install it to run this test");
    }
    found
}

/// A TCP proxy to a server whose open connections a test can cut, as a network failure would,
/// while new connections still get through. It can also swallow the server's replies, so a
/// request reaches the server but its answer never comes back.
pub struct Proxy {
    pub addr: SocketAddr,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    swallow: Arc<AtomicBool>,
    /// Bytes the client sent while replies were swallowed.
    sent: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a free port");
        let addr = listener.local_addr().expect("the port's address");
        let connections = Arc::new(Mutex::new(Vec::new()));
        let swallow = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn({
            let connections = Arc::clone(&connections);
            let swallow = Arc::clone(&swallow);
            let sent = Arc::clone(&sent);
            async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    let (swallow, sent) = (Arc::clone(&swallow), Arc::clone(&sent));
                    let copy = tokio::spawn(async move {
                        let outbound = TcpStream::connect(target)
                            .await
                            .expect("connecting to the server");
                        let (from_client, to_client) = inbound.into_split();
                        let (from_server, to_server) = outbound.into_split();
                        tokio::select! {
                            _ = forward(from_client, to_server, None, (&swallow, &sent)) => {}
                            _ = forward(from_server, to_client, Some(&swallow), (&swallow, &sent)) => {}
                        }
                    });
                    connections.lock().unwrap().push(copy);
                }
            }
        });
        Proxy {
            addr,
            connections,
            swallow,
            sent,
            accept,
        }
    }

    /// From now on, what the server sends is dropped instead of forwarded.
    pub fn swallow_replies(&self) {
        self.sent.store(0, Ordering::SeqCst);
        self.swallow.store(true, Ordering::SeqCst);
    }

    /// How many bytes the client sent since [`Proxy::swallow_replies`].
    pub fn sent_while_swallowing(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// Closes every open connection, and returns once they are closed. Replies are
    /// forwarded again on new connections.
    pub async fn cut(&self) {
        let connections: Vec<_> = self.connections.lock().unwrap().drain(..).collect();
        for connection in connections {
            connection.abort();
            let _ = connection.await;
        }
        self.swallow.store(false, Ordering::SeqCst);
    }
}

/// Copies one direction until either side closes. Bytes are dropped while `drop_while` is
/// set; bytes sent from the client while replies are swallowed are counted.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    drop_while: Option<&AtomicBool>,
    (swallowing, sent): (&AtomicBool, &AtomicUsize),
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if drop_while.is_some_and(|flag| flag.load(Ordering::SeqCst)) {
            continue;
        }
        if drop_while.is_none() && swallowing.load(Ordering::SeqCst) {
            sent.fetch_add(n, Ordering::SeqCst);
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}
