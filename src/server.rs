//! The server's phases and its request path: binds the listeners, assembles in [`app`] the
//! one chain of layers that serves gRPC and HTTP on the main port (and the HTTP routes alone
//! on the legacy health port), runs until shutdown, then drains within the deadline. The
//! accept loop and the connection limits are `accept.rs`'s; a connection's life, `conn.rs`'s.

mod accept;
mod conn;
mod control;
mod new_connections;
mod partial;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tower::{Layer as _, ServiceBuilder};
use tower_http::LatencyUnit;
use tower_http::trace::{DefaultOnEos, DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::{Level, debug, error, info, warn};

use crate::answers::Answers;
use crate::auth::{self, Auth, Keyring};
use crate::browser::{self, AllowedHosts, GrpcOnly};
use crate::config::Settings;
use crate::exporter::{self, Exporter};
use crate::grpc::{self, KvService};
use crate::guard::Guard;
use crate::header_limit::{HeaderLimit, HeaderLimited};
use crate::health_watch::{self, HealthWatches};
use crate::http;
use crate::metrics::{Metrics, Rpc, RpcLayer};
use crate::pb;
use crate::pb::key_value_store_server::KeyValueStoreServer;
use crate::rate_limit::{self, RateLimit};
use crate::request_body::{self, RequestBodies};
use crate::share::Shares;
use crate::startup::Startup;
use crate::store::Store;
use crate::telemetry::Escaped;

use accept::{Listener, open_file_cap, serve};

/// A server whose listeners are bound (so their addresses are known, even for port 0) but
/// which serves nothing until [`Server::run`].
pub struct Server {
    settings: Settings,
    store: Store,
    main: TcpListener,
    health: Option<TcpListener>,
    tls: Option<TlsAcceptor>,
    keyring: Keyring,
    hosts: AllowedHosts,
}

/// Binds the main listener and, unless it is turned off, the legacy health listener, for the
/// configuration [`Startup`] built.
pub async fn bind(startup: Startup) -> anyhow::Result<Server> {
    let Startup {
        settings,
        tls,
        keyring,
        hosts,
        ..
    } = startup;
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
        keyring,
        hosts,
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
            keyring,
            hosts,
        } = self;
        let draining = CancellationToken::new();
        let stop = CancellationToken::new();
        let end_streams = CancellationToken::new();

        let (reporter, health_service) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<KeyValueStoreServer<KvService>>()
            .await;
        let metrics = Arc::new(Metrics::new());
        let layers = Layers::new(&settings, keyring, hosts, &metrics, &store);
        let app = app(
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
        info!(listener = "main", addr = %main.local_addr()?, serves = "gRPC and HTTP", tls = tls_mode, "listening");
        let largest = grpc::max_answer_bytes(&settings.limits) + request_body::PREFIX_BYTES;
        let answers = Answers::new(&settings.server, largest, metrics.clone());
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
                let routes = health_app(&settings, &draining, &layers);
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

/// The request path of the main listener, from the socket in. Each step is one layer, in one
/// file:
///
/// 1. connection tracking (`server/conn.rs`): a request counts as open on its connection
///    until its response body is dropped, which the idle and first-request deadlines read;
/// 2. answers in flight (`answers.rs`): a connection whose answers not yet taken fill its
///    share, or the server's budget, gets no new work; every answer is counted until written;
/// 3. connect info: the peer's address, for the rate limit and the per-client shares;
/// 4. the header limit (`header_limit.rs`, `server.max_header_bytes`);
/// 5. authentication (`auth.rs`), then the per-client rate limit (`rate_limit.rs`), both by
///    path, so a route added later is closed and limited unless listed as open;
/// 6. the routes:
///    - HTTP: `/health/live`, `/health/ready` and the 404 fallback (`http.rs`), `/metrics`
///      (`exporter.rs`) behind the Host check (`browser.rs`), all under the HTTP body limit;
///    - gRPC, each service refusing what is not gRPC over HTTP/2 (`browser.rs`), so a web page
///      cannot call it: the KV service through its metrics (`metrics.rs`, which count and log
///      every call, refused ones included), its request message read whole
///      (`request_body.rs`), the guard (`guard.rs`: in-flight limit, deadline, drain gate) and
///      the service (`grpc.rs`); health through its Watch cap (`health_watch.rs`) and message
///      limit; reflection through its message limit. Health and reflection answer while KV
///      calls are shed.
///
/// Steps 1 to 3 belong to a connection and are added by `conn.rs` as it serves one (and
/// each HTTP/2 stream runs under `server.send_timeout`, through the executor of `answers.rs`);
/// this builds the rest, once.
fn app(
    settings: &Settings,
    store: Store,
    draining: &CancellationToken,
    end_streams: &CancellationToken,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    layers: &Layers,
) -> anyhow::Result<HeaderLimited<Router>> {
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
    let app = layers.access.guard(app).with_state(());
    Ok(layers.header_limit.clone().layer(app))
}

/// The request path of the legacy health listener: as [`app`]'s, with the HTTP routes alone.
fn health_app(
    settings: &Settings,
    draining: &CancellationToken,
    layers: &Layers,
) -> HeaderLimited<Router> {
    let routes = layers.access.guard(http_router(draining, settings, layers));
    layers.header_limit.clone().layer(routes)
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

/// What wraps the routes: the header limit, the KV guard, the request bodies' budget, the
/// metrics exporter, access control, and the Host check of the HTTP routes that read data.
struct Layers {
    header_limit: HeaderLimit,
    guard: Guard,
    bodies: RequestBodies,
    exporter: Exporter,
    access: Access,
    hosts: AllowedHosts,
}

impl Layers {
    fn new(
        settings: &Settings,
        keyring: Keyring,
        hosts: AllowedHosts,
        metrics: &Arc<Metrics>,
        store: &Store,
    ) -> Self {
        let guard = Guard::new(
            settings.server.max_in_flight,
            settings.server.request_timeout,
            metrics.clone(),
        );
        Self {
            header_limit: HeaderLimit::new(settings.server.max_header_bytes, metrics.clone()),
            exporter: Exporter::new(metrics.clone(), store.clone(), guard.clone()),
            guard,
            bodies: RequestBodies::new(
                settings.server.max_request_bytes_in_flight,
                settings.server.request_body_timeout,
                metrics.clone(),
            ),
            access: Access::new(settings, keyring, metrics.clone()),
            hosts,
        }
    }
}

/// Authentication and the per-client rate limit, each present only when configured.
struct Access {
    auth: Option<Auth>,
    rate_limit: Option<RateLimit>,
}

impl Access {
    fn new(settings: &Settings, keyring: Keyring, metrics: Arc<Metrics>) -> Self {
        let rate_limit = RateLimit::new(settings.rate_limit, metrics);
        Self {
            auth: Auth::new(&settings.auth, keyring, rate_limit.clone()),
            rate_limit,
        }
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
            exporter::router(layers.exporter.clone()),
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

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::time::Duration;

    use super::*;

    /// The request path driven without a socket (axum's `oneshot`): each layer answers what
    /// is its to answer, and a call that passes them all reaches the service.
    #[tokio::test]
    async fn the_request_path_answers_each_request_at_its_layer_without_a_socket() {
        use axum::body::Body;
        use axum::http::{Request, StatusCode, Version};
        use http_body_util::BodyExt as _;
        use prost::Message as _;
        use tower::ServiceExt as _;

        let startup = Startup::from_settings(Settings::default()).unwrap();
        let settings = &startup.settings;
        let store = Store::new(settings.subscriptions.store, settings.history);
        let metrics = Arc::new(Metrics::new());
        let layers = Layers::new(settings, startup.keyring, startup.hosts, &metrics, &store);
        let (_reporter, health) = tonic_health::server::health_reporter();
        let (draining, end_streams) = (CancellationToken::new(), CancellationToken::new());
        let app = app(
            settings,
            store.clone(),
            &draining,
            &end_streams,
            health,
            &layers,
        )
        .unwrap();
        let send = |request: Request<Body>| app.clone().oneshot(request);

        let live = send(Request::get("/health/live").body(Body::empty()).unwrap()).await;
        assert_eq!(live.unwrap().status(), StatusCode::OK, "the HTTP routes");

        let big = "x".repeat(settings.server.max_header_bytes);
        let request = Request::get("/health/live").header("x-big", big);
        let refused = send(request.body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(
            refused.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "the header limit"
        );

        let metrics_page = Request::get("/metrics").header("host", "attacker.example");
        let refused = send(metrics_page.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(
            refused.status(),
            StatusCode::FORBIDDEN,
            "the Host check of /metrics"
        );

        let set = pb::SetRequest {
            key: String::new(),
            value: "v".into(),
            ..Default::default()
        };
        let mut message = vec![0];
        message.extend_from_slice(&u32::try_from(set.encoded_len()).unwrap().to_be_bytes());
        set.encode(&mut message).unwrap();
        let call = |version| {
            Request::post("/kvstore.KeyValueStore/Set")
                .version(version)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Body::from(message.clone()))
                .unwrap()
        };
        let over_http1 = send(call(Version::HTTP_11)).await.unwrap();
        assert_eq!(
            over_http1.status(),
            StatusCode::UPGRADE_REQUIRED,
            "gRPC only over HTTP/2"
        );

        let answer = send(call(Version::HTTP_2)).await.unwrap();
        let (parts, body) = answer.into_parts();
        let trailers = body.collect().await.unwrap().trailers().cloned();
        let status = parts
            .headers
            .get("grpc-status")
            .or_else(|| trailers.as_ref().and_then(|t| t.get("grpc-status")))
            .cloned();
        assert_eq!(status.unwrap(), "3", "INVALID_ARGUMENT from the service");
        assert_eq!(store.revision(), 0, "nothing was written");
        let scrape = layers.exporter.encode(false).unwrap().1;
        assert!(
            scrape.contains(
                "kvstore_grpc_requests_total{method=\"Set\",code=\"INVALID_ARGUMENT\"} 1"
            ),
            "the call was counted by the metrics layer:\n{scrape}"
        );
    }

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
        let startup = Startup::from_settings(settings).unwrap();
        let server = runtime.block_on(bind(startup)).unwrap();
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
}
