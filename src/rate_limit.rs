//! The per-client request rate limit: a token bucket (GCRA, with `governor`) per client,
//! keyed by its token when `auth` accepted one, else by its address. Refusals are immediate
//! `RESOURCE_EXHAUSTED` (429 over HTTP) saying when to retry; nothing waits in a queue.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::json;
use tonic::Status;
use tonic::metadata::MetadataValue;
use tracing::{debug, info};

use crate::caller::{Caller, ClientKey, client_key_of};
use crate::config::RateLimitSettings;
use crate::http::{grpc_error, is_grpc, is_health_check};
use crate::metrics::{Limit, Metrics};

/// How often buckets that have refilled are dropped. A full bucket is the same as no bucket,
/// so dropping it forgets nothing; this is what bounds the memory to the clients seen in
/// about the last interval (plus those still refilling).
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// The gRPC retry pushback trailer (gRFC A6): clients with a retry policy wait this long.
const PUSHBACK_TRAILER: &str = "grpc-retry-pushback-ms";

/// The rate limit layer's state, shared by every connection.
#[derive(Clone)]
pub struct RateLimit(Arc<Inner>);

struct Inner {
    limiter: DefaultKeyedRateLimiter<ClientKey>,
    metrics: Arc<Metrics>,
    per_client: u32,
    epoch: Instant,
    /// Nanoseconds after `epoch` when the next prune is due.
    next_prune: AtomicU64,
}

impl RateLimit {
    /// `None` when `rate_limit.per_client` is 0 (off).
    /// Refusals are counted in `metrics`.
    pub fn new(settings: RateLimitSettings, metrics: Arc<Metrics>) -> Option<Self> {
        let per_client = NonZeroU32::new(settings.per_client)?;
        let burst = NonZeroU32::new(settings.burst).unwrap_or(per_client);
        info!(
            per_client = per_client.get(),
            burst = burst.get(),
            "rate limit on: requests per second per client"
        );
        let quota = Quota::per_second(per_client).allow_burst(burst);
        Some(Self(Arc::new(Inner {
            limiter: RateLimiter::dashmap(quota),
            metrics,
            per_client: per_client.get(),
            epoch: Instant::now(),
            next_prune: AtomicU64::new(nanos(PRUNE_EVERY)),
        })))
    }

    /// Takes one request from `key`'s bucket, or says how long until one is available.
    fn check(&self, key: &ClientKey) -> Result<(), Duration> {
        self.prune_if_due();
        let limiter = &self.0.limiter;
        limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }

    /// Whichever request first finds the prune due does it, without a task of its own.
    fn prune_if_due(&self) {
        let now = nanos(self.0.epoch.elapsed());
        let due = self.0.next_prune.load(Ordering::Relaxed);
        if now < due {
            return;
        }
        let next = now + nanos(PRUNE_EVERY);
        if self
            .0
            .next_prune
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.0.limiter.retain_recent();
            self.0.limiter.shrink_to_fit();
        }
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The middleware function, for `axum::middleware::from_fn_with_state(limit, rate_limit)`,
/// inside the authentication layer (so it sees the [`Caller`]). Health checks are never
/// limited. A Subscribe counts once, when it is opened.
pub async fn rate_limit(State(limit): State<RateLimit>, request: Request, next: Next) -> Response {
    if is_health_check(request.uri().path()) {
        return next.run(request).await;
    }
    let key = client_key(&request);
    match limit.check(&key) {
        Ok(()) => next.run(request).await,
        Err(wait) => limit.refuse(&key, &request, wait),
    }
}

impl RateLimit {
    /// Takes one request from the bucket of the address of `request`, which authentication
    /// is refusing (no token, or an unknown one), so that a flood of bad tokens is throttled
    /// like any other client's calls. The rate limit's refusal, to send instead of
    /// authentication's, if the address is over its rate.
    pub(crate) fn over_rate_unauthenticated(&self, request: &Request) -> Option<Response> {
        let key = client_key_of(None, peer(request));
        let wait = self.check(&key).err()?;
        Some(self.refuse(&key, request, wait))
    }

    fn refuse(&self, key: &ClientKey, request: &Request, wait: Duration) -> Response {
        debug!(client = ?key, path = request.uri().path(), "refused: rate limit");
        self.0.metrics.refused(Limit::RatePerClient);
        refuse(self.0.per_client, wait, is_grpc(request))
    }
}

fn peer(request: &Request) -> Option<SocketAddr> {
    let ConnectInfo(peer) = request.extensions().get::<ConnectInfo<SocketAddr>>()?;
    Some(*peer)
}

fn client_key(request: &Request) -> ClientKey {
    client_key_of(request.extensions().get::<Caller>(), peer(request))
}

fn refuse(per_client: u32, wait: Duration, grpc: bool) -> Response {
    // Rounded up, so a client that waits exactly this long is let through.
    let wait_ms = wait.as_nanos().div_ceil(1_000_000).max(1);
    let message = format!(
        "rate limit of {per_client} requests/s per client exceeded (rate_limit.per_client); retry after {wait_ms} ms"
    );
    if grpc {
        let mut status = Status::resource_exhausted(message);
        let pushback = MetadataValue::from(u64::try_from(wait_ms).unwrap_or(u64::MAX));
        status.metadata_mut().insert(PUSHBACK_TRAILER, pushback);
        return grpc_error(status);
    }
    let retry_after = wait_ms.div_ceil(1000).to_string();
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, retry_after)],
        Json(json!({ "error": message })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refusal_is_a_429_and_is_counted() {
        use axum::Router;
        use axum::body::Body;
        use axum::routing::get;
        use tower::ServiceExt;

        let metrics = Arc::new(Metrics::new());
        let settings = RateLimitSettings {
            per_client: 1,
            burst: 1,
        };
        let limit = RateLimit::new(settings, metrics.clone()).unwrap();
        let app = Router::new()
            .route("/metrics", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(limit, rate_limit));
        let request = || {
            let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
            let mut request = Request::get("/metrics").body(Body::empty()).unwrap();
            request.extensions_mut().insert(ConnectInfo(peer));
            request
        };
        let first = app.clone().oneshot(request()).await.unwrap();
        assert_eq!(first.status(), StatusCode::OK);
        let refused = app.oneshot(request()).await.unwrap();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(refused.headers().contains_key(header::RETRY_AFTER));
        assert_eq!(metrics.refusals(Limit::RatePerClient), 1);
    }

    #[test]
    fn a_bucket_empties_after_its_burst_and_names_the_wait() {
        let limit = RateLimit::new(
            RateLimitSettings {
                per_client: 1,
                burst: 2,
            },
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let a = ClientKey::Token(0);
        assert_eq!(limit.check(&a), Ok(()));
        assert_eq!(limit.check(&a), Ok(()));
        let wait = limit.check(&a).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(limit.check(&ClientKey::Token(1)), Ok(()), "another client");
        assert!(
            RateLimit::new(
                RateLimitSettings {
                    per_client: 0,
                    burst: 5
                },
                Arc::new(Metrics::new()),
            )
            .is_none()
        );
    }

    #[test]
    fn pruning_drops_only_full_buckets() {
        let limit = RateLimit::new(
            RateLimitSettings {
                per_client: 1,
                burst: 1,
            },
            Arc::new(Metrics::new()),
        )
        .unwrap();
        limit.check(&ClientKey::Token(0)).unwrap();
        limit.0.next_prune.store(0, Ordering::Relaxed);
        limit.prune_if_due();
        assert_eq!(limit.0.limiter.len(), 1, "still refilling: kept");
        assert!(limit.check(&ClientKey::Token(0)).is_err());
    }
}
