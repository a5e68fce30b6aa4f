//! Prometheus metrics: the counters the server bumps as it works (one atomic add each, on
//! handles resolved once). They only observe; `exporter.rs` reads them, with the store's and
//! the guard's state, at scrape time. The hooks stay where things happen:
//! [`RpcLayer`] around the KV service, [`Connections`] in the accept loop, [`Metrics::refused`]
//! at each limit.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, Uri};
use axum::response::Response;
use hyper::body::{Bytes, Frame, SizeHint};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tower::{Layer, Service};

use crate::http::GRPC_STATUS;
use crate::pb::key_value_store_server::SERVICE_NAME;
use crate::telemetry::Sampler;

/// The gRPC status codes by number, named as in the gRPC spec; these are the `code` labels.
pub(crate) const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
const CANCELLED: u8 = 1;
const UNKNOWN: u8 = 2;
const PERMISSION_DENIED: u8 = 7;
const UNIMPLEMENTED: u8 = 12;
const INTERNAL: u8 = 13;
const UNAVAILABLE: u8 = 14;
const DATA_LOSS: u8 = 15;
const UNAUTHENTICATED: u8 = 16;

/// Upper bounds of the latency buckets in nanoseconds: 10 µs to 10 s in 1-2.5-5 steps. A Get
/// takes tens of microseconds; `server.request_timeout` (10 s by default) cuts the slowest.
const BUCKETS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// The KV service's RPCs, as the `method` label names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    /// `Get`.
    Get,
    /// `Set`.
    Set,
    /// `Delete`.
    Delete,
    /// `List`.
    List,
    /// `Batch`.
    Batch,
    /// `Subscribe`: counted when its stream ends, and not timed.
    Subscribe,
    /// A method the service does not have (answered `UNIMPLEMENTED`); one label for all,
    /// so a client cannot grow the number of series.
    Unknown,
}

impl Rpc {
    pub(crate) const ALL: [Self; 7] = [
        Self::Get,
        Self::Set,
        Self::Delete,
        Self::List,
        Self::Batch,
        Self::Subscribe,
        Self::Unknown,
    ];

    /// Every method of the KV service.
    pub fn methods() -> impl Iterator<Item = Self> {
        Self::ALL.into_iter().filter(|rpc| *rpc != Self::Unknown)
    }

    /// The RPC a request path names: `/kvstore.KeyValueStore/Get` is [`Rpc::Get`].
    pub fn from_path(path: &str) -> Self {
        let method = path
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(SERVICE_NAME))
            .and_then(|p| p.strip_prefix('/'));
        match method {
            Some("Get") => Self::Get,
            Some("Set") => Self::Set,
            Some("Delete") => Self::Delete,
            Some("List") => Self::List,
            Some("Batch") => Self::Batch,
            Some("Subscribe") => Self::Subscribe,
            _ => Self::Unknown,
        }
    }

    /// The `method` label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Get => "Get",
            Self::Set => "Set",
            Self::Delete => "Delete",
            Self::List => "List",
            Self::Batch => "Batch",
            Self::Subscribe => "Subscribe",
            Self::Unknown => "unknown",
        }
    }
}

/// A configured limit that refused a request, as the `limit` label names it: its config key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKey {
    /// `server.max_in_flight`: the call was shed.
    MaxInFlight,
    /// `server.request_timeout`: the call ran past the server's deadline (a client's own
    /// shorter `grpc-timeout` is not a refusal by the server).
    RequestTimeout,
    /// `subscriptions.max`: the Subscribe was refused.
    SubscriptionsMax,
    /// `limits.max_key_bytes`: a key, prefix, pattern or `start_after` was too long.
    MaxKeyBytes,
    /// `limits.max_value_bytes`: a value was too long.
    MaxValueBytes,
    /// `limits.max_batch_ops`: a Batch carried too many ops.
    MaxBatchOps,
    /// `limits.max_response_bytes`: a Batch's answer would have been too large (a List page
    /// that ends early is not a refusal).
    MaxResponseBytes,
    /// `server.max_connections`: a connection was refused as soon as it was accepted, past
    /// that setting or past the lower cap the open-file limit set at start-up.
    MaxConnections,
    /// `server.max_connections_per_address`: a connection was refused as soon as it was
    /// accepted, its address having that many open.
    MaxConnectionsPerAddress,
    /// `server.handshake_timeout`: a connection was closed for taking longer than that over
    /// its first request, or over a request or HTTP/2 frame it had started sending.
    HandshakeTimeout,
    /// `server.max_header_bytes`: a request's headers were over the limit (those beyond
    /// hyper's ceiling, twice the limit, are refused by hyper and not counted).
    MaxHeaderBytes,
    /// `rate_limit.per_client`: a client was over its rate.
    RatePerClient,
    /// `server.request_body_timeout`: a gRPC request message did not arrive in time.
    RequestBodyTimeout,
    /// `server.max_request_bytes_in_flight`: a gRPC request message would have taken more
    /// than what was left of the budget of bytes still arriving.
    MaxRequestBytesInFlight,
    /// `server.allowed_hosts`: an HTTP route that reads data was asked for by a name that
    /// is not allowed (DNS rebinding).
    AllowedHosts,
    /// `subscriptions.max_per_client`: a client with its share of streams open subscribed.
    SubscriptionsMaxPerClient,
    /// `server.max_health_watches`: a gRPC health Watch was refused.
    MaxHealthWatches,
    /// `server.max_control_frames`: an HTTP/2 connection was closed for sending more frames
    /// that do no work (WINDOW_UPDATE, SETTINGS, PING, empty DATA, ...) than its work allows.
    MaxControlFrames,
    /// `server.new_connections_per_address`: a connection was closed as soon as it was
    /// accepted, its address opening them faster than that.
    NewConnectionsPerAddress,
    /// `server.max_answer_bytes_in_flight`: a call was refused, or a large answer replaced,
    /// because answers waiting for their clients held the server's budget.
    MaxAnswerBytesInFlight,
    /// `server.max_answer_bytes_per_connection`: a call was refused, or a large answer
    /// replaced, because the connection's answers not yet taken held its share.
    MaxAnswerBytesPerConnection,
    /// `server.send_timeout`: an HTTP/2 stream was reset, its answer having made no progress
    /// for that long.
    SendTimeout,
}

impl LimitKey {
    pub(crate) const ALL: [Self; 22] = [
        Self::MaxInFlight,
        Self::RequestTimeout,
        Self::SubscriptionsMax,
        Self::MaxKeyBytes,
        Self::MaxValueBytes,
        Self::MaxBatchOps,
        Self::MaxResponseBytes,
        Self::MaxConnections,
        Self::MaxConnectionsPerAddress,
        Self::HandshakeTimeout,
        Self::MaxHeaderBytes,
        Self::RatePerClient,
        Self::RequestBodyTimeout,
        Self::MaxRequestBytesInFlight,
        Self::AllowedHosts,
        Self::SubscriptionsMaxPerClient,
        Self::MaxHealthWatches,
        Self::MaxControlFrames,
        Self::NewConnectionsPerAddress,
        Self::MaxAnswerBytesInFlight,
        Self::MaxAnswerBytesPerConnection,
        Self::SendTimeout,
    ];

    /// The config key of the limit, which is also the `limit` label.
    pub fn key(self) -> &'static str {
        match self {
            Self::MaxInFlight => "server.max_in_flight",
            Self::RequestTimeout => "server.request_timeout",
            Self::SubscriptionsMax => "subscriptions.max",
            Self::MaxKeyBytes => "limits.max_key_bytes",
            Self::MaxValueBytes => "limits.max_value_bytes",
            Self::MaxBatchOps => "limits.max_batch_ops",
            Self::MaxResponseBytes => "limits.max_response_bytes",
            Self::MaxConnections => "server.max_connections",
            Self::MaxConnectionsPerAddress => "server.max_connections_per_address",
            Self::HandshakeTimeout => "server.handshake_timeout",
            Self::MaxHeaderBytes => "server.max_header_bytes",
            Self::RatePerClient => "rate_limit.per_client",
            Self::RequestBodyTimeout => "server.request_body_timeout",
            Self::MaxRequestBytesInFlight => "server.max_request_bytes_in_flight",
            Self::AllowedHosts => "server.allowed_hosts",
            Self::SubscriptionsMaxPerClient => "subscriptions.max_per_client",
            Self::MaxHealthWatches => "server.max_health_watches",
            Self::MaxControlFrames => "server.max_control_frames",
            Self::NewConnectionsPerAddress => "server.new_connections_per_address",
            Self::MaxAnswerBytesInFlight => "server.max_answer_bytes_in_flight",
            Self::MaxAnswerBytesPerConnection => "server.max_answer_bytes_per_connection",
            Self::SendTimeout => "server.send_timeout",
        }
    }
}

/// The counters of one server, shared by every part that counts something. Each series has
/// its handle from the start, so counting never looks up or allocates a label set.
#[derive(Debug)]
pub struct Metrics {
    /// Calls that ended, by [`Rpc`] and then by status code.
    pub(crate) calls: [[Counter; CODES.len()]; Rpc::ALL.len()],
    /// Call latency by [`Rpc`] (Subscribe's and Unknown's stay empty).
    pub(crate) latency: [Latency; Rpc::ALL.len()],
    pub(crate) refusals: [Counter; LimitKey::ALL.len()],
    pub(crate) events_delivered: Counter,
    pub(crate) connections: Family<[(&'static str, &'static str); 1], Gauge>,
    pub(crate) started: Instant,
    pub(crate) start_time: SystemTime,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every counter at zero, and the start time now.
    pub fn new() -> Self {
        let connections = Family::default();
        // Both listeners are listed from the first scrape, at 0.
        for listener in ["main", "health"] {
            connections.get_or_create_owned(&[("listener", listener)]);
        }
        Self {
            calls: Default::default(),
            latency: Default::default(),
            refusals: Default::default(),
            events_delivered: Counter::default(),
            connections,
            started: Instant::now(),
            start_time: SystemTime::now(),
        }
    }

    /// Counts one request refused by `limit`.
    pub fn refused(&self, limit: LimitKey) {
        self.refusals[limit as usize].inc();
    }

    /// Requests refused by `limit` so far.
    #[cfg(test)]
    pub(crate) fn refusals(&self, limit: LimitKey) -> u64 {
        self.refusals[limit as usize].get()
    }

    /// The counter of change events sent to Subscribe clients.
    pub fn events_delivered(&self) -> Counter {
        self.events_delivered.clone()
    }

    /// The open-connection gauge of the listener called `listener` (`main`, `health`).
    pub fn connections(&self, listener: &'static str) -> Connections {
        Connections(
            self.connections
                .get_or_create_owned(&[("listener", listener)]),
        )
    }

    fn record(&self, rpc: Rpc, code: u8, elapsed: Duration) {
        self.calls[rpc as usize][usize::from(code)].inc();
        // A stream's lifetime says nothing about the server's speed, so it is not timed;
        // nor are calls to methods that do not exist.
        if !matches!(rpc, Rpc::Subscribe | Rpc::Unknown) {
            self.latency[rpc as usize].observe(elapsed);
        }
    }
}

/// A histogram of latencies whose `observe` is two atomic adds. prometheus-client's own
/// histogram takes a mutex per observation, which every unary call would contend on.
#[derive(Debug, Default)]
pub(crate) struct Latency {
    /// Observations per bucket (not cumulative); the last is above every bound.
    buckets: [AtomicU64; BUCKETS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl Latency {
    fn observe(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        // Buckets are `le`: a bound includes the value equal to it.
        let bucket = BUCKETS_NS.partition_point(|&bound| bound < ns);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        let bounds = BUCKETS_NS
            .iter()
            .map(|&ns| seconds(ns))
            .chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds
            .zip(&self.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        // The count is the buckets' total, so it always agrees with the +Inf bucket.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = seconds(self.sum_ns.load(Ordering::Relaxed));
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn seconds(ns: u64) -> f64 {
    // Exact for the bucket bounds, and within a nanosecond for any sum below 104 days.
    ns as f64 / 1e9
}

/// One listener's open-connection gauge.
#[derive(Debug, Clone)]
pub struct Connections(Gauge);

impl Connections {
    /// Counts `connection` as open from now until it completes or is dropped.
    pub fn track<F: Future>(&self, connection: F) -> impl Future<Output = F::Output> + use<F> {
        let open = OpenConnection::new(&self.0);
        async move {
            let _open = open;
            connection.await
        }
    }
}

struct OpenConnection(Gauge);

impl OpenConnection {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A tower layer that counts every call to the service it wraps by method and final gRPC
/// status, and times unary calls until the end of their response body.
#[derive(Debug, Clone)]
pub struct RpcLayer {
    metrics: Arc<Metrics>,
}

impl RpcLayer {
    /// Counts into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service of [`RpcLayer`].
#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> Service<http::Request<B>> for RpcService<S>
where
    S: Service<http::Request<B>, Response = Response>,
{
    type Response = Response<RpcBody>;
    type Error = S::Error;
    type Future = RpcFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let rpc = Rpc::from_path(request.uri().path());
        let call = Call {
            metrics: self.metrics.clone(),
            rpc,
            started: Instant::now(),
            code: CANCELLED,
        };
        // Kept only for a method the service does not have, to name it in the answer.
        let unknown = (rpc == Rpc::Unknown).then(|| request.uri().clone());
        RpcFuture {
            inner: self.inner.call(request),
            call: Some(call),
            unknown,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RpcService`].
    pub struct RpcFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
        unknown: Option<Uri>,
    }
}

impl<F, E> Future for RpcFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response<RpcBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let call = this.call.take();
        Poll::Ready(result.map(|mut response| {
            if let Some(uri) = this.unknown.take() {
                crate::http::name_unimplemented(response.headers_mut(), uri.path());
            }
            // A status in the headers (a trailers-only response) or an HTTP error ends the
            // call now: its body carries nothing more.
            let call = match (call, status_in_headers(&response)) {
                (Some(call), Some(code)) => {
                    call.end(code);
                    None
                }
                (call, _) => call,
            };
            response.map(|inner| RpcBody { inner, call })
        }))
    }
}

/// The call being measured; it is recorded once, when dropped, with the last code set. A
/// call dropped before it ended (the client went away) counts as `CANCELLED`.
struct Call {
    metrics: Arc<Metrics>,
    rpc: Rpc,
    started: Instant,
    code: u8,
}

impl Call {
    fn end(mut self, code: u8) {
        self.code = code;
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        self.metrics.record(self.rpc, self.code, elapsed);
        log_call(self.rpc, self.code, elapsed);
    }
}

/// How often, at most, failed calls are logged at warn.
const FAILURE_WARNING_EVERY: Duration = Duration::from_secs(10);

/// Failed calls since the last warning, for the whole process.
static FAILURES: LazyLock<Sampler> = LazyLock::new(|| Sampler::new(FAILURE_WARNING_EVERY));

/// Logs a call's outcome. This replaces a per-request span, whose creation and fields are a
/// large share of a unary call's instructions (docs/performance.md), for context no handler
/// logs into.
/// Codes that can mean the server failed (`UNKNOWN`, `INTERNAL`, `DATA_LOSS`) warn, but a
/// client causes them too (a message that does not decode is `INTERNAL`), as often as it
/// likes: so at most one warning per [`FAILURE_WARNING_EVERY`], saying how many failed calls
/// it stands for; each is at debug, and all are counted in the metrics. The rest (a missing
/// key, a bad argument, a refused token, a shed call, a stream ended by shutdown) are a
/// client's business or are counted in the metrics, and are logged at debug.
fn log_call(rpc: Rpc, code: u8, elapsed: Duration) {
    let method = rpc.name();
    let code_name = CODES[usize::from(code)];
    let latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    if matches!(code, UNKNOWN | INTERNAL | DATA_LOSS)
        && let Some(more) = FAILURES.sample()
    {
        let every = humantime::format_duration(FAILURES.every());
        tracing::warn!(
            method,
            code = code_name,
            latency_us,
            more,
            "call failed (and {more} more failed calls, logged at debug, since the last such \
             warning; at most one every {every})"
        );
    } else {
        tracing::debug!(method, code = code_name, latency_us, "call finished");
    }
}

/// A response body that ends its call when the `grpc-status` trailer goes by.
pub struct RpcBody {
    // Dropped first: a cancelled Subscribe is counted before dropping the stream
    // unregisters its subscription, so whoever sees it gone sees it counted.
    call: Option<Call>,
    inner: Body,
}

/// A body that is no call's: an answer given before the service was reached.
impl From<Body> for RpcBody {
    fn from(inner: Body) -> Self {
        Self { call: None, inner }
    }
}

impl hyper::body::Body for RpcBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        let code = match &frame {
            Some(Ok(frame)) => frame
                .trailers_ref()
                .map(|trailers| grpc_code(trailers.get(&GRPC_STATUS))),
            // The stream is reset; gRPC clients report that as INTERNAL.
            Some(Err(_)) => Some(INTERNAL),
            None => Some(UNKNOWN),
        };
        if let Some(code) = code
            && let Some(call) = this.call.take()
        {
            call.end(code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The code a response settles in its headers: a trailers-only `grpc-status`, or an HTTP
/// error mapped as gRPC clients map it.
fn status_in_headers(response: &Response) -> Option<u8> {
    if let Some(status) = response.headers().get(&GRPC_STATUS) {
        return Some(grpc_code(Some(status)));
    }
    match response.status() {
        StatusCode::OK => None,
        StatusCode::BAD_REQUEST => Some(INTERNAL),
        StatusCode::UNAUTHORIZED => Some(UNAUTHENTICATED),
        StatusCode::FORBIDDEN => Some(PERMISSION_DENIED),
        StatusCode::NOT_FOUND => Some(UNIMPLEMENTED),
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Some(UNAVAILABLE),
        _ => Some(UNKNOWN),
    }
}

fn grpc_code(status: Option<&HeaderValue>) -> u8 {
    status
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u8>().ok())
        .filter(|&code| usize::from(code) < CODES.len())
        .unwrap_or(UNKNOWN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_rpc_and_anything_else_is_unknown() {
        assert_eq!(Rpc::from_path("/kvstore.KeyValueStore/Get"), Rpc::Get);
        assert_eq!(
            Rpc::from_path("/kvstore.KeyValueStore/Subscribe"),
            Rpc::Subscribe
        );
        for other in [
            "/kvstore.KeyValueStore/Nope",
            "/kvstore.KeyValueStore/",
            "/kvstore.KeyValueStoreX/Get",
            "/grpc.health.v1.Health/Check",
            "",
        ] {
            assert_eq!(Rpc::from_path(other), Rpc::Unknown, "{other:?}");
        }
    }

    #[test]
    fn grpc_status_values_map_to_codes_and_garbage_to_unknown() {
        let code = |v: &'static str| grpc_code(Some(&HeaderValue::from_static(v)));
        assert_eq!(code("0"), 0);
        assert_eq!(code("16"), 16);
        for bad in ["17", "-1", "", "OK", "255", "256"] {
            assert_eq!(code(bad), UNKNOWN, "{bad:?}");
        }
        assert_eq!(grpc_code(None), UNKNOWN);
    }

    #[test]
    fn a_latency_on_a_bucket_bound_falls_in_that_bucket() {
        let latency = Latency::default();
        latency.observe(Duration::from_micros(10));
        latency.observe(Duration::from_nanos(10_001));
        latency.observe(Duration::from_secs(60));
        let counts: Vec<u64> = latency
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        assert_eq!(&counts[..2], [1, 1]);
        assert_eq!(counts[BUCKETS_NS.len()], 1, "above every bound");
        assert_eq!(counts.iter().sum::<u64>(), 3);
        assert_eq!(
            latency.sum_ns.load(Ordering::Relaxed),
            10_000 + 10_001 + 60_000_000_000
        );
    }

    #[tokio::test]
    async fn a_connection_is_open_until_its_future_completes_or_is_dropped() {
        let metrics = Metrics::new();
        let main = metrics.connections("main");
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let first = main.track(finished);
        let second = main.track(std::future::pending::<()>());
        assert_eq!(main.0.get(), 2);
        done.send(()).unwrap();
        first.await.unwrap();
        assert_eq!(main.0.get(), 1);
        drop(second);
        assert_eq!(main.0.get(), 0);
        assert_eq!(metrics.connections("health").0.get(), 0);
    }
}
