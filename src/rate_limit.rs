//! The per-client request rate limit: a token bucket (GCRA, with `governor`) per client,
//! keyed by its token when `auth` accepted one, else by its address. Refusals are immediate
//! `RESOURCE_EXHAUSTED` (429 over HTTP) saying when to retry; nothing waits in a queue. A
//! Subscribe's snapshot or replay pays by the entries it visits, as it reads them
//! ([`ScanCharge`]): past the caller's rate, the stream waits for its bucket to refill.

use std::future::Future as _;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::json;
use tokio::time::Sleep;
use tonic::Status;
use tonic::metadata::MetadataValue;
use tracing::{debug, info};

use crate::caller::{Caller, ClientKey, client_key_of};
use crate::config::RateLimitSettings;
use crate::http::{grpc_error, is_grpc, is_health_check};
use crate::metrics::{LimitKey, Metrics};

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
/// limited. A Subscribe counts once when it is opened, then by what its snapshot or replay
/// visits: it gets a [`ScanCharge`] in its extensions.
pub async fn rate_limit(
    State(limit): State<RateLimit>,
    mut request: Request,
    next: Next,
) -> Response {
    if is_health_check(request.uri().path()) {
        return next.run(request).await;
    }
    let key = client_key(&request);
    if let Err(wait) = limit.check(&key) {
        return limit.refuse(&key, &request, wait);
    }
    if request.uri().path() == SUBSCRIBE_PATH {
        request.extensions_mut().insert(ScanCharge { limit, key });
    }
    next.run(request).await
}

const SUBSCRIBE_PATH: &str = "/kvstore.KeyValueStore/Subscribe";

/// Entries a Subscribe's snapshot or replay may visit (keys under its prefix, or changes of
/// the history, sent or not) for the price of one request: one full page's scan
/// (`store::subscription::SCAN`), which costs the server about what a small call does.
/// Opening the Subscribe pays for the first of them; a million keys cost about 977 requests.
pub const ENTRIES_PER_REQUEST: u64 = 1024;

/// Whose bucket a Subscribe's snapshot or replay pays into: the caller's, in the rate limit's
/// state. Each stream pays through its own [`ScanPayer`].
#[derive(Clone)]
pub struct ScanCharge {
    limit: RateLimit,
    key: ClientKey,
}

impl ScanCharge {
    /// The payer for one stream, which has visited nothing yet.
    pub fn payer(self) -> ScanPayer {
        ScanPayer {
            charge: self,
            paid: 0,
            wait: None,
        }
    }
}

/// What one Subscribe's snapshot or replay owes its caller's bucket, paid as it is read.
///
/// The stream pays for the pages read so far before it reads the next (so it is at most one
/// page ahead of its payments); when the bucket is empty it waits until it has refilled,
/// rather than failing: the client asked for work within its rights, only faster than its
/// rate, and a snapshot larger than the burst must still be able to finish. Each wait is
/// counted as a refusal of `rate_limit.per_client` in the metrics. The client's other calls
/// meanwhile find the same bucket empty, as if it had made them.
pub struct ScanPayer {
    charge: ScanCharge,
    /// Entries paid for so far.
    paid: u64,
    /// Until the bucket has a request for the next payment.
    wait: Option<Pin<Box<Sleep>>>,
}

impl ScanPayer {
    /// Ready once the `visited` entries are paid for (up to less than one request's worth);
    /// pending while the caller's bucket refills, and woken when it has.
    pub fn poll_pay(&mut self, visited: u64, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Some(wait) = &mut self.wait {
                ready!(wait.as_mut().poll(cx));
                self.wait = None;
            }
            if visited.saturating_sub(self.paid) < ENTRIES_PER_REQUEST {
                return Poll::Ready(());
            }
            let ScanCharge { limit, key } = &self.charge;
            match limit.check(key) {
                Ok(()) => self.paid += ENTRIES_PER_REQUEST,
                Err(wait) => {
                    debug!(client = ?key, ?wait, "snapshot or replay waits: rate limit");
                    limit.0.metrics.refused(LimitKey::RatePerClient);
                    self.wait = Some(Box::pin(tokio::time::sleep(wait)));
                }
            }
        }
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
        self.0.metrics.refused(LimitKey::RatePerClient);
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
        assert_eq!(metrics.refusals(LimitKey::RatePerClient), 1);
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

    #[tokio::test]
    async fn a_scan_pays_a_request_per_page_of_entries_and_waits_for_the_bucket() {
        let metrics = Arc::new(Metrics::new());
        let settings = RateLimitSettings {
            per_client: 20,
            burst: 2,
        };
        let limit = RateLimit::new(settings, metrics.clone()).unwrap();
        let key = ClientKey::Token(0);
        let mut payer = ScanCharge { limit, key }.payer();
        async fn pay(payer: &mut ScanPayer, visited: u64) -> Poll<()> {
            std::future::poll_fn(|cx| Poll::Ready(payer.poll_pay(visited, cx))).await
        }
        assert!(
            pay(&mut payer, ENTRIES_PER_REQUEST - 1).await.is_ready(),
            "nothing owed yet"
        );
        assert!(
            pay(&mut payer, 2 * ENTRIES_PER_REQUEST).await.is_ready(),
            "the burst pays"
        );
        assert!(pay(&mut payer, 3 * ENTRIES_PER_REQUEST).await.is_pending());
        assert_eq!(metrics.refusals(LimitKey::RatePerClient), 1);
        // The bucket refills one request every 50 ms.
        let started = Instant::now();
        std::future::poll_fn(|cx| payer.poll_pay(3 * ENTRIES_PER_REQUEST, cx)).await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(25), "{waited:?}");
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
