//! The listeners: binds them, builds the one router that serves gRPC and HTTP on the main
//! port (HTTP/1.1 and h2c), serves the HTTP routes alone on the legacy health port, and
//! runs until shutdown, then drains within the deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{ConnectInfo, DefaultBodyLimit};
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tower::Layer as _;
use tower_http::LatencyUnit;
use tower_http::trace::{
    DefaultMakeSpan, DefaultOnEos, DefaultOnFailure, DefaultOnResponse, TraceLayer,
};
use tracing::{Level, debug, info, warn};

use crate::auth::{self, Auth};
use crate::config::Settings;
use crate::grpc::KvService;
use crate::http;
use crate::metrics::{self, Connections, Exporter, Metrics, RpcLayer};
use crate::middleware::{Guard, guard_grpc};
use crate::pb;
use crate::pb::key_value_store_server::KeyValueStoreServer;
use crate::rate_limit::{self, RateLimit};
use crate::store::Store;

/// A server whose listeners are bound (so their addresses are known, even for port 0) but
/// which serves nothing until [`Server::run`].
pub struct Server {
    settings: Settings,
    store: Store,
    main: TcpListener,
    health: Option<TcpListener>,
}

/// Binds the main listener and, unless it is turned off, the legacy health listener.
pub async fn bind(settings: Settings) -> anyhow::Result<Server> {
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
    let store = Store::new(settings.subscriptions, settings.history);
    Ok(Server {
        settings,
        store,
        main,
        health,
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
    /// 3. the listeners stop accepting, open Subscribe streams end with `UNAVAILABLE`, and
    ///    in-flight calls finish;
    /// 4. connections still open after `shutdown.drain_timeout` are closed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Server {
            settings,
            store,
            main,
            health,
        } = self;
        let draining = CancellationToken::new();
        let stop = CancellationToken::new();

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
            exporter,
            access: Access::new(&settings)?,
        };
        let app = main_router(
            &settings,
            store.clone(),
            &draining,
            &stop,
            health_service,
            &layers,
        )?;
        let drain = settings.shutdown.drain_timeout;

        info!(listener = "main", addr = %main.local_addr()?, serves = "gRPC and HTTP", "listening");
        let health_task = match health {
            Some(listener) => {
                info!(listener = "health", addr = %listener.local_addr()?, serves = "HTTP", "listening");
                let routes =
                    layers
                        .access
                        .guard(http_router(&draining, &settings, &layers.exporter));
                let open = metrics.connections("health");
                Some(serve("health", listener, routes, stop.clone(), drain, open))
            }
            None => None,
        };
        let main_open = metrics.connections("main");
        let servers = async {
            let health = async {
                if let Some(task) = health_task {
                    task.await;
                }
            };
            tokio::join!(
                serve("main", main, app, stop.clone(), drain, main_open),
                health,
                store.expire_until(stop.cancelled()),
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
        servers.await;
        info!("shutdown complete");
        Ok(())
    }
}

/// gRPC (the KV service, health, reflection v1 and v1alpha) and the HTTP routes on one
/// router. Each part gets its own trace layer; only the KV service is guarded, so health
/// checks and reflection answer while KV calls are shed. Its metrics layer sits outside the
/// guard, so calls the guard refuses are counted too. Authentication and the rate limit
/// cover the whole router and decide by path.
fn main_router(
    settings: &Settings,
    store: Store,
    draining: &CancellationToken,
    stop: &CancellationToken,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    layers: &Layers,
) -> anyhow::Result<Router> {
    auth::warn_if_exposed(&settings.auth, settings.server.listen);
    let metrics = layers.exporter.metrics();
    let guard = layers.guard.clone();
    let kv = KvService::new(store, settings.limits, stop.clone(), metrics.clone()).into_server();
    let kv = Routes::new(kv)
        .into_axum_router()
        .reset_fallback()
        .layer(axum::middleware::from_fn_with_state(guard, guard_grpc))
        .layer(RpcLayer::new(metrics));

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let support = Routes::new(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .into_axum_router()
        .reset_fallback();

    let grpc_trace = TraceLayer::new_for_grpc()
        .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
        .on_response(
            DefaultOnResponse::new()
                .level(Level::DEBUG)
                .latency_unit(LatencyUnit::Micros),
        )
        .on_eos(DefaultOnEos::new().level(Level::DEBUG))
        .on_failure(DefaultOnFailure::new().level(Level::WARN));
    let grpc = kv.merge(support).layer(grpc_trace);
    let app = http_router(draining, settings, &layers.exporter)
        .merge(grpc)
        .fallback(http::fallback);
    Ok(layers.access.guard(app))
}

/// What wraps the routes: the KV guard, the metrics exporter, and access control.
struct Layers {
    guard: Guard,
    exporter: Exporter,
    access: Access,
}

/// Authentication and the per-client rate limit, each present only when configured.
struct Access {
    auth: Option<Auth>,
    rate_limit: Option<RateLimit>,
}

impl Access {
    fn new(settings: &Settings) -> anyhow::Result<Self> {
        Ok(Self {
            auth: Auth::new(&settings.auth)?,
            rate_limit: RateLimit::new(settings.rate_limit),
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
/// `/metrics`.
fn http_router(draining: &CancellationToken, settings: &Settings, exporter: &Exporter) -> Router {
    let max_body = settings.limits.max_http_body_bytes;
    let trace = TraceLayer::new_for_http()
        .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
        .on_response(
            DefaultOnResponse::new()
                .level(Level::DEBUG)
                .latency_unit(LatencyUnit::Micros),
        );
    http::router(draining.clone())
        .merge(metrics::router(exporter.clone()))
        .layer(trace)
        .fallback(http::fallback)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            max_body,
            http::limit_body,
        ))
}

/// Accepts connections until `stop`, then waits up to `drain` for them to finish and closes
/// the rest. Each connection is its own task, so one slow peer never holds up another.
async fn serve(
    name: &'static str,
    listener: TcpListener,
    app: Router,
    stop: CancellationToken,
    drain: Duration,
    open: Connections,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let connection = serve_connection(stream, peer, app.clone(), stop.clone());
                    connections.spawn(open.track(connection));
                }
                Err(err) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    warn!(listener = name, error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
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

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    stop: CancellationToken,
) {
    // Small HTTP/2 frames must not wait for delayed ACKs (tonic does the same).
    if let Err(err) = stream.set_nodelay(true) {
        debug!(%peer, error = %err, "setting TCP_NODELAY failed");
    }
    let app = Extension(ConnectInfo(peer)).layer(app);
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection =
        builder.serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(app));
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        debug!(%peer, error = %err, "connection closed with an error");
    }
}
