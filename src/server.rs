//! The listeners: binds them, builds the one router that serves gRPC and HTTP on the main
//! port (HTTP/1.1 and HTTP/2, over TLS or cleartext), serves the HTTP routes alone on the
//! legacy health port, and runs until shutdown, then drains within the deadline. Owns the
//! accept loop and every connection-level limit and timeout.

mod control;
mod partial;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{ConnectInfo, DefaultBodyLimit};
use axum::http::header::{CONNECTION, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tower::{Layer as _, Service, ServiceBuilder};
use tower_http::LatencyUnit;
use tower_http::trace::{DefaultOnEos, DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::{Level, debug, error, info, warn};

use crate::answers::{Answers, StreamExecutor};
use crate::auth::{self, Auth};
use crate::browser::{self, AllowedHosts, GrpcOnly};
use crate::config::{Cidr, MIN_HEADER_BYTES, ServerSettings, Settings};
use crate::grpc::{self, KvService};
use crate::health_watch::{self, HealthWatches};
use crate::http;
use crate::metrics::{self, Connections, Exporter, Limit, Metrics, Rpc, RpcLayer};
use crate::middleware::{Guard, HeaderLimit, HeaderLimited};
use crate::open_files;
use crate::pb;
use crate::pb::key_value_store_server::KeyValueStoreServer;
use crate::rate_limit::{self, RateLimit, peer_key};
use crate::request_body::RequestBodies;
use crate::share::Shares;
use crate::store::Store;
use crate::telemetry::Escaped;
use crate::tls;

/// A server whose listeners are bound (so their addresses are known, even for port 0) but
/// which serves nothing until [`Server::run`].
pub struct Server {
    settings: Settings,
    store: Store,
    main: TcpListener,
    health: Option<TcpListener>,
    tls: Option<TlsAcceptor>,
}

/// Loads the TLS files, if any, and binds the main listener and, unless it is turned off,
/// the legacy health listener.
pub async fn bind(settings: Settings) -> anyhow::Result<Server> {
    let tls = tls::acceptor(&settings.tls).context("configuring TLS")?;
    let main = TcpListener::bind(settings.server.listen)
        .await
        .with_context(|| format!("binding server.listen {}", settings.server.listen))?;
    let health = match settings.server.health_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding server.health_listen {addr}"))?,
        ),
        None => None,
    };
    let store = Store::new(settings.subscriptions.store, settings.history);
    Ok(Server {
        settings,
        store,
        main,
        health,
        tls,
    })
}

impl Server {
    /// The main listener's address (gRPC and HTTP).
    pub fn listen_addr(&self) -> SocketAddr {
        self.main
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The legacy health listener's address, if it is on.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health
            .as_ref()
            .map(|l| l.local_addr().expect("a bound listener has an address"))
    }

    /// The store this server serves.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Serves until `shutdown` completes, then shuts down gracefully:
    ///
    /// 1. `/health/ready` answers 503 and gRPC health says `NOT_SERVING`;
    /// 2. for `shutdown.drain_delay` everything keeps serving, so load balancers can react;
    /// 3. the listeners stop accepting, and KV calls arriving on open connections are
    ///    refused with `UNAVAILABLE`; calls in flight finish;
    /// 4. then open Subscribe streams deliver what is queued for them and end with
    ///    `UNAVAILABLE`: each has received every write that was acknowledged;
    /// 5. connections still open after `shutdown.drain_timeout` are closed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Server {
            settings,
            store,
            main,
            health,
            tls,
        } = self;
        let draining = CancellationToken::new();
        let stop = CancellationToken::new();
        let end_streams = CancellationToken::new();

        let (reporter, health_service) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<KeyValueStoreServer<KvService>>()
            .await;
        let metrics = Arc::new(Metrics::new());
        let guard = Guard::new(
            settings.server.max_in_flight,
            settings.server.request_timeout,
            metrics.clone(),
        );
        let exporter = Exporter::new(metrics.clone(), store.clone(), guard.clone());
        let layers = Layers {
            guard,
            bodies: RequestBodies::new(
                settings.server.max_request_bytes_in_flight,
                settings.server.request_body_timeout,
                metrics.clone(),
            ),
            exporter,
            access: Access::new(&settings, metrics.clone())?,
            hosts: AllowedHosts::new(&settings.server.allowed_hosts)
                .map_err(|problem| anyhow::anyhow!("server.allowed_hosts {problem}"))?,
        };
        let app = main_router(
            &settings,
            store.clone(),
            &draining,
            &end_streams,
            health_service,
            &layers,
        )?;
        let drain = settings.shutdown.drain_timeout;

        let tls_mode = match (&tls, settings.tls.client_ca.as_os_str().is_empty()) {
            (None, _) => "off",
            (Some(_), true) => "on",
            (Some(_), false) => "mutual",
        };
        let files = open_file_cap(&settings.server, 1 + usize::from(health.is_some()));
        let answers = Answers::new(&settings.server, metrics.clone());
        info!(listener = "main", addr = %main.local_addr()?, serves = "gRPC and HTTP", tls = tls_mode, "listening");
        let main_listener = Listener::new(
            "main",
            app,
            tls,
            &settings.server,
            &metrics,
            &files,
            &answers,
        );
        let health_task = match health {
            Some(listener) => {
                info!(listener = "health", addr = %listener.local_addr()?, serves = "HTTP", tls = "off", "listening");
                let routes = layers
                    .access
                    .guard(http_router(&draining, &settings, &layers));
                let routes = Listener::new(
                    "health",
                    routes,
                    None,
                    &settings.server,
                    &metrics,
                    &files,
                    &answers,
                );
                Some(serve(listener, routes, stop.clone(), drain))
            }
            None => None,
        };
        // Spawned: whatever drives `run` (the main thread, in kvstore-server) runs the accept
        // loops, and the store's sweeps and growth must never hold them up.
        let background = tokio::spawn({
            let (store, stop) = (store.clone(), stop.clone());
            async move { store.expire_until(stop.cancelled_owned()).await }
        });
        let servers = async {
            let health = async {
                if let Some(task) = health_task {
                    task.await;
                }
            };
            let background = async {
                if let Err(err) = background.await {
                    error!(error = %err, "the store's background task failed");
                }
            };
            tokio::join!(
                serve(main, main_listener, stop.clone(), drain),
                health,
                background,
            );
        };
        tokio::pin!(servers);

        tokio::select! {
            () = shutdown => {}
            () = &mut servers => return Ok(()),
        }
        info!("shutdown: reporting not ready");
        draining.cancel();
        reporter
            .set_not_serving::<KeyValueStoreServer<KvService>>()
            .await;
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;

        let delay = settings.shutdown.drain_delay;
        if !delay.is_zero() {
            info!(delay = %humantime::format_duration(delay), "shutdown: still serving while load balancers react");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = &mut servers => return Ok(()),
            }
        }
        info!("shutdown: closing listeners and ending subscriptions");
        stop.cancel();
        // A stream that ended before the last write was acknowledged would never see it.
        let end_streams = async {
            match tokio::time::timeout(drain, layers.guard.close()).await {
                Ok(()) => debug!("shutdown: calls answered, ending subscriptions"),
                Err(_) => warn!(
                    drain_timeout = %humantime::format_duration(drain),
                    "shutdown: calls still running at the drain deadline, ending subscriptions"
                ),
            }
            end_streams.cancel();
        };
        tokio::join!(servers, end_streams);
        info!("shutdown complete");
        Ok(())
    }
}

/// gRPC (the KV service, health, reflection v1 and v1alpha) and the HTTP routes on one
/// router. Only the KV service is guarded, so health checks and reflection answer while KV
/// calls are shed. Its metrics layer sits outside the guard, so calls the guard refuses are
/// counted (and logged) too; health and reflection calls are traced by tower-http. Every
/// gRPC service refuses what is not gRPC over HTTP/2 ([`GrpcOnly`]), so a web page cannot
/// call it. Authentication and the rate limit cover the whole router and decide by path.
fn main_router(
    settings: &Settings,
    store: Store,
    draining: &CancellationToken,
    end_streams: &CancellationToken,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    layers: &Layers,
) -> anyhow::Result<Router> {
    auth::warn_if_exposed(&settings.auth, settings.server.listen);
    let metrics = layers.exporter.metrics();
    let guard = layers.guard.clone();
    let shares = Shares::new(settings.subscriptions.per_client());
    let kv = KvService::new(
        store,
        settings.limits,
        shares,
        end_streams.clone(),
        metrics.clone(),
    )
    .into_server();
    // The layers go on the service, not on the router: each `Router::layer` boxes every
    // route again, and a box is an allocation and a clone per call. What is not gRPC is
    // refused before it counts as a call. The message is read before the guard, so a call
    // whose message never comes holds no place in it.
    let kv = ServiceBuilder::new()
        .layer(GrpcOnly)
        .layer(RpcLayer::new(metrics))
        .layer(
            layers
                .bodies
                .whole(grpc::max_message_bytes(&settings.limits)),
        )
        .layer(guard)
        .map_response(IntoResponse::into_response)
        .service(kv);
    // A route per method, and one for any other path of the service (answered UNIMPLEMENTED,
    // naming it). Not tonic's `Routes`: its route has a path parameter, which axum allocates
    // and decodes for every call, and it boxes every request body once more; together 1.7%
    // of a Get's instructions (callgrind).
    let service = pb::key_value_store_server::SERVICE_NAME;
    let kv = Rpc::methods()
        .fold(Router::new(), |router, rpc| {
            router.route_service(&format!("/{service}/{}", rpc.name()), kv.clone())
        })
        .route_service(&format!("/{service}/{{*method}}"), kv);

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Held to the same timeout and budget as the KV service, with their own message sizes.
    let watches = HealthWatches::new(
        settings.server.max_health_watches,
        layers.exporter.metrics(),
    );
    let health = ServiceBuilder::new()
        .layer(axum::middleware::from_fn_with_state(
            watches,
            health_watch::limit,
        ))
        .layer(layers.bodies.whole(HEALTH_MESSAGE_BYTES))
        .map_response(IntoResponse::into_response);
    let reflection_messages = layers.bodies.streaming(REFLECTION_MESSAGE_BYTES);
    let (v1, v1alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);
    let support = Router::new()
        .route_service(&grpc_path(&health_service), health.service(health_service))
        .route_service(&grpc_path(&v1), reflection_messages.layer(v1))
        .route_service(&grpc_path(&v1alpha), reflection_messages.layer(v1alpha))
        .layer(GrpcOnly);

    let grpc_trace = TraceLayer::new_for_grpc()
        .make_span_with(request_span)
        .on_response(
            DefaultOnResponse::new()
                .level(Level::DEBUG)
                .latency_unit(LatencyUnit::Micros),
        )
        .on_eos(DefaultOnEos::new().level(Level::DEBUG))
        .on_failure(DefaultOnFailure::new().level(Level::DEBUG));
    // The KV service logs each call from its metrics layer; a tower-http span per call
    // cost about 8% of a unary call's instructions.
    let grpc = kv.merge(support.layer(grpc_trace));
    let app = http_router(draining, settings, layers)
        .merge(grpc)
        .fallback(http::fallback);
    // Resolves the routes once, instead of for every request (axum's "note about
    // performance").
    Ok(layers.access.guard(app).with_state(()))
}

/// The largest gRPC health request: a service name.
const HEALTH_MESSAGE_BYTES: usize = 1024;

/// The largest gRPC reflection request: a host, and a file or symbol name.
const REFLECTION_MESSAGE_BYTES: usize = 16 * 1024;

/// The route of every method of the gRPC service `service`, as tonic's `Routes` would add it.
fn grpc_path<S: NamedService>(_service: &S) -> String {
    format!("/{}/{{*method}}", S::NAME)
}

/// The span of a request to the health, reflection and HTTP routes. Everything they log is a
/// client's doing (an unknown method or service, a 503 while draining, a 404), so it is all
/// at debug: a client must not be able to fill the log at info. The path is the client's
/// text, escaped and cut (see [`Escaped`]); the query is left out.
fn request_span<B>(request: &::http::Request<B>) -> tracing::Span {
    tracing::debug_span!(
        "request",
        method = %request.method(),
        path = %Escaped(request.uri().path()),
        version = ?request.version(),
    )
}

/// What wraps the routes: the KV guard, the request bodies' budget, the metrics exporter,
/// access control, and the Host check of the HTTP routes that read data.
struct Layers {
    guard: Guard,
    bodies: RequestBodies,
    exporter: Exporter,
    access: Access,
    hosts: AllowedHosts,
}

/// Authentication and the per-client rate limit, each present only when configured.
struct Access {
    auth: Option<Auth>,
    rate_limit: Option<RateLimit>,
}

impl Access {
    fn new(settings: &Settings, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let rate_limit = RateLimit::new(settings.rate_limit, metrics);
        Ok(Self {
            auth: Auth::with_rate_limit(&settings.auth, rate_limit.clone())?,
            rate_limit,
        })
    }

    /// Authentication runs first, so the rate limit can key a client by its token.
    fn guard(&self, router: Router) -> Router {
        let router = match &self.rate_limit {
            Some(limit) => router.layer(axum::middleware::from_fn_with_state(
                limit.clone(),
                rate_limit::rate_limit,
            )),
            None => router,
        };
        match &self.auth {
            Some(auth) => router.layer(axum::middleware::from_fn_with_state(
                auth.clone(),
                auth::authenticate,
            )),
            None => router,
        }
    }
}

/// The plain HTTP routes, with their body limit (gRPC messages have tonic's), and
/// `/metrics`, which alone reads data and so checks the Host (health checks answer any).
fn http_router(draining: &CancellationToken, settings: &Settings, layers: &Layers) -> Router {
    let max_body = settings.limits.max_http_body_bytes;
    let trace = TraceLayer::new_for_http()
        .make_span_with(request_span)
        .on_response(
            DefaultOnResponse::new()
                .level(Level::DEBUG)
                .latency_unit(LatencyUnit::Micros),
        )
        .on_failure(DefaultOnFailure::new().level(Level::DEBUG));
    http::router(draining.clone())
        .merge(browser::check_host(
            metrics::router(layers.exporter.clone()),
            layers.hosts.clone(),
            layers.exporter.metrics(),
        ))
        .layer(trace)
        .fallback(http::fallback)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            max_body,
            http::limit_body,
        ))
}

/// What every connection of one listener shares.
struct Listener {
    name: &'static str,
    app: HeaderLimited<Router>,
    /// Counts this listener's open connections, for metrics.
    open: Connections,
    /// Counts refused connections and connections cut by `server.handshake_timeout`.
    metrics: Arc<Metrics>,
    /// Its HTTP/2 streams run under `server.send_timeout`.
    http: auto::Builder<StreamExecutor>,
    /// Each connection's answers count against their share and the server's budget.
    answers: Answers,
    tls: Option<TlsAcceptor>,
    max_connections: usize,
    /// This listener's connections by address, and the proxies exempt from their cap.
    per_address: PerAddress,
    /// The cap the open-file limit puts on every listener's connections together, if it is
    /// below what `server.max_connections` asks.
    files: Option<Arc<FileCap>>,
    handshake_timeout: Duration,
    idle_timeout: Option<Duration>,
    max_control_frames: u32,
}

impl Listener {
    fn new(
        name: &'static str,
        app: Router,
        tls: Option<TlsAcceptor>,
        settings: &ServerSettings,
        metrics: &Arc<Metrics>,
        files: &Option<Arc<FileCap>>,
        answers: &Answers,
    ) -> Arc<Self> {
        let idle_timeout = Some(settings.idle_timeout).filter(|t| !t.is_zero());
        let ceiling = header_ceiling(settings.max_header_bytes);
        let mut http = auto::Builder::new(answers.executor());
        http.http1()
            .timer(TokioTimer::new())
            // A request's head must fit in the read buffer. It is never larger than the
            // header list counted as HTTP/2 does (each field line costs 4 bytes of syntax
            // against 32 counted), so a request within the ceiling always fits.
            .max_buf_size(ceiling.max(MIN_HEADER_BYTES))
            // Each field counts at least 33 bytes, so more fields than ceiling / 32 are
            // beyond the ceiling anyway; hyper's default of 100 would refuse smaller
            // requests with many short fields.
            .max_headers((ceiling / 32).min(MAX_HTTP1_FIELDS))
            // Headers of a request after the first on a kept-alive connection; the first is
            // bounded by handshake_timeout, in `serve_http`.
            .header_read_timeout(idle_timeout);
        http.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(settings.max_streams_per_connection)
            .max_header_list_size(u32::try_from(ceiling).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(settings.keepalive_interval).filter(|t| !t.is_zero()))
            .keep_alive_timeout(settings.keepalive_timeout);
        Arc::new(Self {
            name,
            app: HeaderLimit::new(settings.max_header_bytes, metrics.clone()).layer(app),
            open: metrics.connections(name),
            metrics: metrics.clone(),
            http,
            answers: answers.clone(),
            tls,
            max_connections: settings.max_connections,
            per_address: PerAddress {
                cap: settings.connections_per_address(),
                trusted: settings.trusted_proxies.clone(),
                open: Arc::default(),
            },
            files: files.clone(),
            handshake_timeout: settings.handshake_timeout,
            idle_timeout,
            max_control_frames: settings.max_control_frames,
        })
    }
}

/// The most header fields an HTTP/1.1 request may have, whatever `server.max_header_bytes`:
/// past hyper's default of 100, hyper allocates a parse slot (64 bytes) for every possible
/// field of every request, so this caps that at 64 KiB a request.
const MAX_HTTP1_FIELDS: usize = 1024;

/// What hyper and h2 hold request headers to, for `server.max_header_bytes` = `max`: twice
/// the limit. Between the limit and this ceiling, requests reach [`HeaderLimit`], which
/// refuses them naming the key; beyond it hyper (HTTP/1.1: 431, then close) and h2 (a 431 for
/// that stream, or a GOAWAY for a header block too large to buffer) refuse them without a
/// word of why, but without buffering more either. Twice: overshooting the limit by up to
/// as much again (the usual accident: a token or a cookie that grew, headers a proxy added)
/// is told what to change, while what one request can make the server hold only doubles.
fn header_ceiling(max: usize) -> usize {
    max.saturating_mul(2)
}

/// Accepts connections until `stop`, then waits up to `drain` for them to finish and closes
/// the rest. Each connection is its own task, TLS handshake included, so one slow peer never
/// holds up another. Past `server.max_connections`, the open-file cap or
/// `server.max_connections_per_address` a connection is refused as soon as it is accepted
/// (see [`refuse`]): the client learns at once, instead of waiting in the kernel's backlog.
async fn serve(
    listener: TcpListener,
    shared: Arc<Listener>,
    stop: CancellationToken,
    drain: Duration,
) {
    let name = shared.name;
    let mut connections = JoinSet::new();
    let mut refusals = Refusals::default();
    let mut accept_errors = Throttled::default();
    // Refused connections being told why; bounded, so a flood costs at most this many tasks.
    let mut refusing = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Finished connections may not have been reaped yet; they must not count.
                    while connections.try_join_next().is_some() {}
                    while refusing.try_join_next().is_some() {}
                    match shared.admit(connections.len(), peer.ip()) {
                        Ok(slots) => {
                            let connection = connection(stream, peer, shared.clone(), stop.clone());
                            connections.spawn(shared.open.track(async move {
                                connection.await;
                                drop(slots);
                            }));
                        }
                        Err(refusal) => {
                            refusals.record(name, peer, refusal, &shared);
                            shared.metrics.refused(refusal.limit());
                            // Past the bound the connection is just closed.
                            if refusing.len() < MAX_REFUSING {
                                refusing.spawn(refuse(stream, peer, refusal, shared.clone()));
                            }
                        }
                    }
                }
                Err(err) => {
                    // Usually out of file descriptors (the open-file cap leaves room for
                    // refusals, but other processes' descriptors count against the system's
                    // limit too): back off instead of spinning, and warn once per interval
                    // rather than on every try.
                    if let Some(failed) = accept_errors.due() {
                        warn!(listener = name, error = %err, failed, "accepting connections failed; retrying every 100 ms");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    if connections.is_empty() {
        return;
    }
    info!(
        listener = name,
        connections = connections.len(),
        "shutdown: waiting for open connections"
    );
    let drained = tokio::time::timeout(drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            listener = name,
            connections = connections.len(),
            drain_timeout = %humantime::format_duration(drain),
            "shutdown: drain deadline passed, closing the remaining connections"
        );
        connections.shutdown().await;
    }
}

/// Refused connections told why at once, at most; more are closed without a word. This is
/// also what bounds the TLS handshakes done for refusals.
const MAX_REFUSING: usize = 64;

/// How long a refused connection has to complete its TLS handshake (on a TLS listener), send
/// its first request and take the answer.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// How long the accept loop waits after `accept` fails before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why a connection was refused as soon as it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// `server.max_connections` are open on this listener.
    MaxConnections,
    /// The open-file limit's cap on every listener's connections together is reached.
    OpenFiles,
    /// `server.max_connections_per_address` are open from the peer's address.
    PerAddress,
}

impl Refusal {
    /// The limit it is counted under: the open-file cap is `server.max_connections`,
    /// lowered.
    fn limit(self) -> Limit {
        match self {
            Self::MaxConnections | Self::OpenFiles => Limit::MaxConnections,
            Self::PerAddress => Limit::MaxConnectionsPerAddress,
        }
    }

    /// What the client is told, naming the setting to change.
    fn reason(self, shared: &Listener) -> String {
        match (self, &shared.files) {
            (Self::OpenFiles, Some(files)) => format!(
                "{} connections are open, all that the server's open-file limit leaves room for (server.max_connections, {}, was lowered at start-up); retry with backoff",
                files.cap, shared.max_connections
            ),
            (Self::PerAddress, _) => format!(
                "server.max_connections_per_address ({}) connections are open from this address; retry with backoff",
                shared.per_address.cap
            ),
            (Self::MaxConnections | Self::OpenFiles, _) => format!(
                "server.max_connections ({}) connections are open; retry with backoff",
                shared.max_connections
            ),
        }
    }
}

/// What an admitted connection holds until it closes: its place under the open-file cap and
/// under its address's cap (neither when not capped).
struct Slots {
    _file: Option<FileSlot>,
    _address: Option<AddressSlot>,
}

impl Listener {
    /// Admits a connection from `ip` with `open` connections on this listener already, or
    /// says which limit refuses it. The table-wide limits are checked first: when the table
    /// is full that is what the client should hear.
    fn admit(&self, open: usize, ip: IpAddr) -> Result<Slots, Refusal> {
        if open >= self.max_connections {
            return Err(Refusal::MaxConnections);
        }
        let file = match &self.files {
            Some(files) => Some(FileCap::take(files).ok_or(Refusal::OpenFiles)?),
            None => None,
        };
        let address = self.per_address.take(ip)?;
        Ok(Slots {
            _file: file,
            _address: address,
        })
    }
}

/// The cap on connections of every listener together that the open-file limit sets, when it
/// leaves room for fewer than `server.max_connections` on each listener.
struct FileCap {
    cap: usize,
    open: AtomicUsize,
}

impl FileCap {
    fn take(this: &Arc<Self>) -> Option<FileSlot> {
        this.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                (open < this.cap).then_some(open + 1)
            })
            .ok()?;
        Some(FileSlot(this.clone()))
    }
}

/// One connection under the [`FileCap`], until dropped.
struct FileSlot(Arc<FileCap>);

impl Drop for FileSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The open-file cap for `listeners` listeners of `settings`, if the limit is too low for
/// `server.max_connections` on each; says so at start-up, with the numbers and what to
/// change. Room is kept for the descriptors that are not connections
/// ([`open_files::RESERVED`]) and for the refusals each listener answers at once (and the
/// one it closes without a word), so that `accept` itself never runs out and a client past
/// the cap hears why.
fn open_file_cap(settings: &ServerSettings, listeners: usize) -> Option<Arc<FileCap>> {
    let limit = open_files::current()?;
    let soft = usize::try_from(limit.soft?).unwrap_or(usize::MAX);
    let reserved = open_files::RESERVED + listeners * (MAX_REFUSING + 1);
    let cap = soft.saturating_sub(reserved);
    if cap >= settings.max_connections.saturating_mul(listeners) {
        return None;
    }
    warn!(
        open_files = soft,
        open_files_hard = limit.hard,
        reserved,
        max_connections = settings.max_connections,
        listeners,
        connection_cap = cap,
        "the open-file limit (RLIMIT_NOFILE) is below what server.max_connections needs: \
         connections of all listeners together are capped at connection_cap, and refused past \
         it like those past server.max_connections; raise the hard limit (systemd \
         LimitNOFILE=, ulimit -Hn, podman/docker --ulimit nofile=) or lower server.max_connections"
    );
    Some(Arc::new(FileCap {
        cap,
        open: AtomicUsize::new(0),
    }))
}

/// One listener's connections by address (IPv6: by /64), for
/// `server.max_connections_per_address`. An entry lives while its address has a connection
/// open, so the map is never larger than the connection table.
struct PerAddress {
    cap: usize,
    /// `server.trusted_proxies`: exempt, since one of their connections carries many clients.
    trusted: Vec<Cidr>,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerAddress {
    /// A place for one more connection from `ip`; `None` for a trusted proxy, which takes
    /// none.
    fn take(&self, ip: IpAddr) -> Result<Option<AddressSlot>, Refusal> {
        if self.trusted.iter().any(|net| net.contains(ip)) {
            return Ok(None);
        }
        let key = peer_key(ip);
        let mut open = self
            .open
            .lock()
            .expect("never poisoned: no panic while held");
        let count = open.entry(key).or_insert(0);
        if *count >= self.cap {
            return Err(Refusal::PerAddress);
        }
        *count += 1;
        Ok(Some(AddressSlot {
            key,
            open: self.open.clone(),
        }))
    }
}

/// One connection under its address's cap, until dropped.
struct AddressSlot {
    key: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self
            .open
            .lock()
            .expect("never poisoned: no panic while held");
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Tells a connection refused for `refusal` why, in its own protocol: after the TLS handshake
/// on a TLS listener, it is served (HTTP/1.1 or HTTP/2, as for any connection) with
/// [`refusal`] as its only handler, and closed after the first answer (HTTP/2: with a
/// GOAWAY). A real answer, rather than a GOAWAY's debug data, is what reaches the caller:
/// tonic reports a GOAWAY as a bare "h2 protocol error". All of it is bounded by
/// [`REFUSAL_TIME`]; a client that asks nothing in time is closed without a word.
async fn refuse(stream: TcpStream, peer: SocketAddr, why: Refusal, shared: Arc<Listener>) {
    let answered = tokio::time::timeout(REFUSAL_TIME, async {
        match &shared.tls {
            None => answer_refusal(TokioIo::new(stream), why, &shared).await,
            Some(tls) => match tls.accept(stream).await {
                Ok(stream) => answer_refusal(TokioIo::new(stream), why, &shared).await,
                Err(err) => debug!(listener = shared.name, %peer, error = %err, "TLS handshake of a refused connection failed"),
            },
        }
    })
    .await;
    if answered.is_err() {
        debug!(listener = shared.name, %peer, "a refused connection was not done within 1s, closing");
    }
}

/// Serves `io` with [`refusal`] until it has answered once, then closes it gracefully.
async fn answer_refusal<IO>(io: IO, why: Refusal, shared: &Listener)
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let reason = why.reason(shared);
    let answered = Arc::new(Notify::new());
    let service = hyper::service::service_fn({
        let answered = answered.clone();
        move |request| {
            answered.notify_one();
            std::future::ready(Ok::<_, Infallible>(refusal(&request, &reason)))
        }
    });
    let connection = shared.http.serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = answered.notified() => {}
    }
    // One answer says it all: a client asking again would get the same.
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

/// The answer to every request on a refused connection: a gRPC call gets `UNAVAILABLE`
/// (retrying elsewhere is safe: nothing was processed), any other request a 503 with
/// `retry-after`; both give `reason`, which names the limit.
fn refusal<B>(request: &::http::Request<B>, reason: &str) -> Response {
    if http::is_grpc(request) {
        return http::grpc_error(tonic::Status::unavailable(reason));
    }
    let body = Json(serde_json::json!({ "error": reason }));
    let mut response =
        (StatusCode::SERVICE_UNAVAILABLE, [(RETRY_AFTER, "1")], body).into_response();
    if request.version() < Version::HTTP_2 {
        // HTTP/2 ends the connection with its GOAWAY; HTTP/1.1 says so in the answer.
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// How often, at most, a recurring problem of the accept loop (refused connections, failed
/// accepts) is logged at warn: a flood of them must not flood the log too.
const WARNING_EVERY: Duration = Duration::from_secs(10);

/// Occurrences of one recurring problem since its last warning.
#[derive(Default)]
struct Throttled {
    since_warning: u64,
    warned_at: Option<Instant>,
}

impl Throttled {
    /// Counts one occurrence; when a warning is due (the first, then at most one every
    /// [`WARNING_EVERY`]), returns how many it covers.
    fn due(&mut self) -> Option<u64> {
        self.since_warning += 1;
        if self
            .warned_at
            .is_some_and(|at| at.elapsed() < WARNING_EVERY)
        {
            return None;
        }
        self.warned_at = Some(Instant::now());
        Some(std::mem::take(&mut self.since_warning))
    }
}

/// Connections refused since the last warning, by [`Refusal`].
#[derive(Default)]
struct Refusals([Throttled; 3]);

impl Refusals {
    fn record(
        &mut self,
        listener: &'static str,
        peer: SocketAddr,
        why: Refusal,
        shared: &Listener,
    ) {
        let limit = why.limit().key();
        debug!(listener, %peer, limit, "refused a connection");
        let Some(refused) = self.0[why as usize].due() else {
            return;
        };
        match why {
            Refusal::MaxConnections => warn!(
                listener,
                max_connections = shared.max_connections,
                refused,
                "refusing connections: server.max_connections are open"
            ),
            Refusal::OpenFiles => warn!(
                listener,
                connection_cap = shared.files.as_ref().map(|files| files.cap),
                refused,
                "refusing connections: the open-file limit's connection cap is reached (see the start-up warning)"
            ),
            Refusal::PerAddress => warn!(
                listener,
                max_connections_per_address = shared.per_address.cap,
                refused,
                address = %peer_key(peer.ip()),
                "refusing connections: server.max_connections_per_address are open from one address"
            ),
        }
    }
}

/// One connection, from accept to close: the TLS handshake if the listener has TLS, then
/// HTTP. A failed handshake is the client's problem (plaintext to a TLS port, an unknown CA,
/// no client certificate), so it is logged at debug only.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Listener>,
    stop: CancellationToken,
) {
    let accepted = Instant::now();
    // Small HTTP/2 frames must not wait for delayed ACKs (tonic does the same).
    if let Err(err) = stream.set_nodelay(true) {
        debug!(%peer, error = %err, "setting TCP_NODELAY failed");
    }
    let Some(tls) = &shared.tls else {
        return serve_http(stream, peer, accepted, &shared, stop).await;
    };
    let handshake =
        tokio::time::timeout_at(accepted + shared.handshake_timeout, tls.accept(stream));
    let stream = tokio::select! {
        result = handshake => match result {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                debug!(listener = shared.name, %peer, error = %err, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!(listener = shared.name, %peer, "TLS handshake took longer than server.handshake_timeout");
                shared.metrics.refused(Limit::HandshakeTimeout);
                return;
            }
        },
        () = stop.cancelled() => return,
    };
    serve_http(stream, peer, accepted, &shared, stop).await;
}

/// Serves HTTP/1.1 or HTTP/2 on `io` until the peer closes, or until the connection is
/// closed for sending no request within `server.handshake_timeout`, for a request or HTTP/2
/// frame partly received for as long (see [`partial`]), for HTTP/2 frames that do no work
/// past `server.max_control_frames` (see [`control`]), for having no open request for
/// `server.idle_timeout`, or for shutdown.
async fn serve_http<IO>(
    io: IO,
    peer: SocketAddr,
    accepted: Instant,
    shared: &Listener,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new(accepted));
    let io = TokioIo::new(partial::Partial::new(
        io,
        activity.clone(),
        shared.handshake_timeout,
        shared.max_control_frames,
    ));
    // Per-client rate limiting keys unauthenticated clients by their address.
    let service = TowerToHyperService::new(Tracked {
        inner: shared
            .answers
            .connection()
            .layer(Extension(ConnectInfo(peer)).layer(shared.app.clone())),
        activity: activity.clone(),
    });
    let connection = shared.http.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    let mut phase = Phase::Serving;
    let result = loop {
        let deadline = match (phase, activity.quiet()) {
            // Bounded by shutdown.drain_timeout, in `serve`.
            (Phase::ShuttingDown, _) => None,
            // A peer that never answers the GOAWAY (dead, with keepalive off) must not keep
            // the connection for ever; one that opened a stream meanwhile is served.
            (Phase::IdleClosing(_), Quiet::Busy) => Some(Instant::now() + shared.handshake_timeout),
            (Phase::IdleClosing(since), _) => Some(since + shared.handshake_timeout),
            // Nothing wakes us when a request starts or ends, so look again after at most
            // one idle_timeout: that is early enough for the idle deadline of a request
            // that ends in the meantime.
            (Phase::Serving, Quiet::NeverUsed) => {
                let first_request = accepted + shared.handshake_timeout;
                Some(match shared.idle_timeout {
                    Some(idle) => first_request.min(Instant::now() + idle),
                    None => first_request,
                })
            }
            (Phase::Serving, Quiet::Busy) => shared.idle_timeout.map(|idle| Instant::now() + idle),
            (Phase::Serving, Quiet::Since(at)) => shared.idle_timeout.map(|idle| at + idle),
        };
        tokio::select! {
            result = connection.as_mut() => break result,
            () = stop.cancelled(), if phase != Phase::ShuttingDown => {
                connection.as_mut().graceful_shutdown();
                phase = Phase::ShuttingDown;
            }
            () = tokio::time::sleep_until(deadline.unwrap_or(accepted)), if deadline.is_some() => {
                let now = Instant::now();
                match (phase, activity.quiet()) {
                    (Phase::Serving, Quiet::NeverUsed) if now >= accepted + shared.handshake_timeout => {
                        // Nothing was asked, so there is nothing to finish gracefully.
                        debug!(listener = shared.name, %peer, "no request within server.handshake_timeout, closing");
                        shared.metrics.refused(Limit::HandshakeTimeout);
                        return;
                    }
                    (Phase::Serving, Quiet::Since(at)) if shared.idle_timeout.is_some_and(|idle| now >= at + idle) => {
                        debug!(listener = shared.name, %peer, "idle for server.idle_timeout, closing");
                        connection.as_mut().graceful_shutdown();
                        phase = Phase::IdleClosing(now);
                    }
                    (Phase::IdleClosing(_), Quiet::NeverUsed | Quiet::Since(_)) => {
                        debug!(listener = shared.name, %peer, "no answer to the idle close, dropping the connection");
                        return;
                    }
                    _ => {}
                }
            }
        }
    };
    if activity.partial_timed_out.load(Ordering::Relaxed) {
        // Its reads failed: hyper has dropped the connection without a word.
        debug!(listener = shared.name, %peer, "a request or frame partly received for longer than server.handshake_timeout, closed");
        shared.metrics.refused(Limit::HandshakeTimeout);
    } else if activity.control_flood.load(Ordering::Relaxed) {
        // Closed with a GOAWAY (ENHANCE_YOUR_CALM) written by `partial`, if the socket took it.
        debug!(listener = shared.name, %peer, "HTTP/2 frames that do no work spent server.max_control_frames, closed");
        shared.metrics.refused(Limit::MaxControlFrames);
    } else if let Err(err) = result {
        debug!(listener = shared.name, %peer, error = %err, "connection closed with an error");
    }
}

/// Where a connection is in its life, for the deadlines of `serve_http`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Idle since `serve_http` asked it to close gracefully at this instant.
    IdleClosing(Instant),
    ShuttingDown,
}

/// The requests open on one connection, and when the last one ended: what the idle and
/// first-request deadlines are measured from. Written by every request, read by the
/// connection's own task when a deadline passes.
struct Activity {
    open: AtomicUsize,
    /// Nanoseconds from `epoch` to the end of the latest request; [`NEVER`] before any.
    last_end: AtomicU64,
    epoch: Instant,
    /// Set when [`partial::Partial`] failed a read for a partial request out of time.
    partial_timed_out: AtomicBool,
    /// Set when [`partial::Partial`] closed the connection for spending its budget of
    /// frames that do no work.
    control_flood: AtomicBool,
}

const NEVER: u64 = u64::MAX;

enum Quiet {
    Busy,
    NeverUsed,
    Since(Instant),
}

impl Activity {
    fn new(epoch: Instant) -> Self {
        Self {
            open: AtomicUsize::new(0),
            last_end: AtomicU64::new(NEVER),
            epoch,
            partial_timed_out: AtomicBool::new(false),
            control_flood: AtomicBool::new(false),
        }
    }

    fn quiet(&self) -> Quiet {
        // Acquire pairs with the Release in `Open::drop`: a request seen ended has its
        // end time stored.
        if self.open.load(Ordering::Acquire) > 0 {
            return Quiet::Busy;
        }
        match self.last_end.load(Ordering::Relaxed) {
            NEVER => Quiet::NeverUsed,
            nanos => Quiet::Since(self.epoch + Duration::from_nanos(nanos)),
        }
    }
}

/// One open request: from the service call until its response body is dropped, so a
/// Subscribe stream counts for as long as it is open.
struct Open(Arc<Activity>);

impl Open {
    fn new(activity: Arc<Activity>) -> Self {
        activity.open.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let activity = &self.0;
        let nanos = u64::try_from(activity.epoch.elapsed().as_nanos()).unwrap_or(NEVER - 1);
        activity.last_end.store(nanos, Ordering::Relaxed);
        activity.open.fetch_sub(1, Ordering::Release);
    }
}

/// The router, counting each request in its connection's [`Activity`]. No allocation per
/// request: the future and the body are wrapped in place.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, Req, B> Service<Req> for Tracked<S>
where
    S: Service<Req, Response = ::http::Response<B>>,
{
    type Response = ::http::Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        TrackedFuture {
            open: Some(Open::new(self.activity.clone())),
            future: self.inner.call(request),
        }
    }
}

pin_project! {
    /// The response future; hands its [`Open`] on to the body.
    struct TrackedFuture<F> {
        #[pin]
        future: F,
        open: Option<Open>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<::http::Response<B>, E>>,
{
    type Output = Result<::http::Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.future.poll(cx))?;
        let open = this.open.take();
        Poll::Ready(Ok(response.map(|body| TrackedBody { body, _open: open })))
    }
}

pin_project! {
    /// The response body, unchanged; the request counts as open until it is dropped.
    struct TrackedBody<B> {
        #[pin]
        body: B,
        _open: Option<Open>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// kvstore-server drives `run` on its main thread, where the accept loops run; the
    /// store's background task, held up here by a write lock taken before `run` starts, must
    /// not stop them from answering.
    #[test]
    fn a_store_task_that_waits_does_not_hold_up_the_accept_loop() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut settings = Settings::default();
        settings.server.listen = "127.0.0.1:0".parse().unwrap();
        settings.server.health_listen = None;
        let server = runtime.block_on(bind(settings)).unwrap();
        let addr = server.listen_addr();
        let store = server.store().clone();
        let (held_tx, held) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _lock = store.hold_write_lock();
            held_tx.send(()).unwrap();
            let _ = released.recv();
        });
        held.recv().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let client = std::thread::spawn(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            stream
                .write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            let read = stream.read_to_string(&mut answer);
            // Answered or given up: let the store task and then the server go on.
            let _ = release.send(());
            let _ = stop.send(());
            (read.map_err(|err| err.kind()), answer)
        });
        runtime
            .block_on(server.run(async {
                let _ = stopped.await;
            }))
            .unwrap();
        holder.join().unwrap();
        let served = client.join().unwrap();
        assert!(
            served.0.is_ok() && served.1.starts_with("HTTP/1.1 200"),
            "{served:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_recurring_problem_warns_at_once_then_at_most_every_interval_with_its_count() {
        let mut accept_errors = Throttled::default();
        assert_eq!(accept_errors.due(), Some(1));
        // One failed accept every ACCEPT_BACKOFF, as when out of file descriptors.
        let mut warnings = Vec::new();
        for _ in 0..300 {
            tokio::time::advance(ACCEPT_BACKOFF).await;
            warnings.extend(accept_errors.due());
        }
        // 30 s: one warning per 10 s, each counting the failures since the last.
        assert_eq!(warnings, [100, 100, 100]);
    }
}
