//! `GET /metrics`: the counters of [`Metrics`](crate::metrics::Metrics), and the state of
//! the store and the guard read at each scrape, encoded by `prometheus-client` in the
//! Prometheus text format or OpenMetrics. It reads what the others keep; nothing imports it
//! but the server that mounts its route.

use std::fmt;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, prometheus_text, text};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::guard::Guard;
use crate::metrics::{CODES, LimitKey, Metrics, Rpc};
use crate::store::Store;

/// The `Content-Type` of the OpenMetrics text format, served to scrapers that ask for it.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What `GET /metrics` serves: the counters of [`Metrics`], and the state of the store and
/// the guard read at each scrape.
#[derive(Clone)]
pub struct Exporter {
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
}

impl Exporter {
    /// Exports `metrics`, and reads `store` and `guard` at each scrape.
    pub fn new(metrics: Arc<Metrics>, store: Store, guard: Guard) -> Self {
        let mut registry = Registry::with_prefix("kvstore");
        registry.register_collector(Box::new(Scrape {
            metrics: metrics.clone(),
            store,
            guard,
        }));
        Self {
            metrics,
            registry: Arc::new(registry),
        }
    }

    /// The counters this exports.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The text exposition: OpenMetrics if `openmetrics`, else Prometheus' 0.0.4 format.
    /// Returns the content type and the body.
    pub fn encode(&self, openmetrics: bool) -> Result<(&'static str, String), fmt::Error> {
        let mut body = String::with_capacity(16 * 1024);
        if openmetrics {
            text::encode(&mut body, &self.registry)?;
            Ok((OPENMETRICS_CONTENT_TYPE, body))
        } else {
            prometheus_text::encode(&mut body, &self.registry)?;
            Ok((prometheus_text::CONTENT_TYPE, body))
        }
    }
}

/// `GET /metrics`, served on the main listener and on the legacy health listener.
pub fn router(exporter: Exporter) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(exporter)
}

/// Prometheus asks for OpenMetrics in its `Accept` header; everyone else gets the classic
/// text format, which every Prometheus-compatible scraper reads.
async fn scrape(State(exporter): State<Exporter>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    match exporter.encode(openmetrics) {
        Ok((content_type, body)) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(err) => {
            tracing::error!(error = %err, "encoding metrics failed");
            let message = "encoding the metrics failed; see the server log";
            (StatusCode::INTERNAL_SERVER_ERROR, message).into_response()
        }
    }
}

/// The collector behind `/metrics`: encodes each metric in the order docs/operations.md lists them.
struct Scrape {
    metrics: Arc<Metrics>,
    store: Store,
    guard: Guard,
}

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrape").finish_non_exhaustive()
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let m = &self.metrics;
        let build = encoder.encode_descriptor(
            "build",
            "The version of kvstore serving",
            None,
            MetricType::Info,
        )?;
        Info::new([("version", env!("CARGO_PKG_VERSION"))]).encode(build)?;

        let mut calls = encoder.encode_descriptor(
            "grpc_requests",
            "KV service calls that ended, by method and gRPC status code (Subscribe when its stream ends)",
            None,
            MetricType::Counter,
        )?;
        for rpc in Rpc::ALL {
            for (code, name) in CODES.iter().enumerate() {
                let count = m.calls[rpc as usize][code].get();
                if rpc == Rpc::Unknown && count == 0 {
                    continue;
                }
                let labels = [("method", rpc.name()), ("code", *name)];
                ConstCounter::new(count).encode(calls.encode_family(&labels)?)?;
            }
        }

        let mut latency = encoder.encode_descriptor(
            "grpc_request_duration",
            "Latency of unary KV service calls, from request to the end of the response",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for rpc in Rpc::ALL {
            if matches!(rpc, Rpc::Subscribe | Rpc::Unknown) {
                continue;
            }
            let labels = [("method", rpc.name())];
            m.latency[rpc as usize].encode(latency.encode_family(&labels)?)?;
        }

        gauge(
            &mut encoder,
            "grpc_requests_in_flight",
            "KV service calls being handled now (the ones server.max_in_flight counts)",
            self.guard.in_flight(),
        )?;
        let connections = encoder.encode_descriptor(
            "connections_open",
            "TCP connections open, by listener",
            None,
            MetricType::Gauge,
        )?;
        m.connections.encode(connections)?;

        let stats = self.store.stats();
        let subscribers = stats.subscribers;
        gauge(
            &mut encoder,
            "subscriptions_open",
            "Subscribe streams open",
            subscribers.open,
        )?;
        counter(
            &mut encoder,
            "events_published",
            "Changes published to subscribers: one per write, delete or expiry",
            subscribers.published,
        )?;
        counter(
            &mut encoder,
            "events_delivered",
            "Change events sent to Subscribe clients (progress heartbeats not included)",
            m.events_delivered.get(),
        )?;
        counter(
            &mut encoder,
            "events_dropped",
            "Changes never sent to subscribers that fell behind",
            subscribers.dropped,
        )?;
        counter(
            &mut encoder,
            "subscribers_lagged",
            "Subscribe streams ended with RESOURCE_EXHAUSTED because they fell behind (subscriptions.buffer)",
            subscribers.lagged,
        )?;
        gauge(
            &mut encoder,
            "keys",
            "Keys stored, counting expired keys not yet removed",
            stats.keys,
        )?;
        gauge(
            &mut encoder,
            "stored_bytes",
            "Bytes of the keys and values stored",
            stats.bytes,
        )?;

        let mut refusals = encoder.encode_descriptor(
            "limit_refusals",
            "Requests refused by a configured limit, by its config key",
            None,
            MetricType::Counter,
        )?;
        for limit in LimitKey::ALL {
            let labels = [("limit", limit.key())];
            m.refusals[limit as usize].encode(refusals.encode_family(&labels)?)?;
        }

        let since_epoch = m.start_time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let start = encoder.encode_descriptor(
            "start_time",
            "When the server started, in seconds since the Unix epoch",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        ConstGauge::new(since_epoch.as_secs_f64()).encode(start)?;
        let uptime = encoder.encode_descriptor(
            "uptime",
            "Time since the server started",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        ConstGauge::new(m.started.elapsed().as_secs_f64()).encode(uptime)?;
        Ok(())
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: usize,
) -> Result<(), fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(metric)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}
