//! The guard in front of the KV service: a global in-flight limit that sheds load instead of
//! queueing, a deadline on unary calls, and the gate that shutdown closes. All answer with
//! real gRPC statuses; tower's own layers would answer with bare HTTP codes that clients
//! misread as `UNAVAILABLE`.
//!
//! A plain tower layer rather than axum `from_fn`s, which would box every call's
//! future and clone the inner route per call, a measurable share of the unary fast path
//! (docs/performance.md, "Why the code is shaped so").

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::HeaderName;
use axum::response::Response;
use pin_project_lite::pin_project;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tower::{Layer, Service};

use crate::http::grpc_error;
use crate::metrics::{LimitKey, Metrics};

/// The gRPC deadline header; a constant, so looking it up parses no header name.
static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Shared by every request to the guarded routes; as a [`Layer`], it guards a service.
///
/// One `Arc` and one atomic for the limit and for shutdown alike: every call clones the
/// guard and counts itself in and out, and each shared atomic touched is a cache line the
/// cores pass between them. With a separate counter, a task tracker and three `Arc`s, those
/// were about 1% of a Set's server CPU.
#[derive(Clone)]
pub struct Guard(Arc<Shared>);

struct Shared {
    /// The calls admitted and not yet answered, against `max_in_flight`, plus [`CLOSED`] once
    /// shutdown began. A call that finds no room is shed, never queued, so a counter does all
    /// a semaphore would, and admitting a call checks the limit and shutdown in one step.
    calls: AtomicUsize,
    /// Notified when the last call answers after [`CLOSED`] was set.
    drained: Notify,
    max_in_flight: usize,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

/// The bit of [`Shared::calls`] that shutdown sets; no limit comes near it.
const CLOSED: usize = 1 << (usize::BITS - 1);

impl Guard {
    /// At most `max_in_flight` calls at once, each answered within `timeout` (or the
    /// client's shorter `grpc-timeout`). Refusals are counted in `metrics`.
    pub fn new(max_in_flight: usize, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self(Arc::new(Shared {
            calls: AtomicUsize::new(0),
            drained: Notify::new(),
            max_in_flight,
            timeout,
            metrics,
        }))
    }

    /// Calls admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.0.calls.load(Ordering::Relaxed) & !CLOSED
    }

    /// Refuses every later call with `UNAVAILABLE`, and returns once every call admitted
    /// before has answered (a Subscribe: once it is registered). From then on no write can
    /// be acknowledged, so every acknowledged one has been queued to its subscribers.
    pub async fn close(&self) {
        self.0.calls.fetch_or(CLOSED, Ordering::AcqRel);
        loop {
            // Registered before the check, so the last call's notification cannot fall
            // between the two.
            let mut drained = std::pin::pin!(self.0.drained.notified());
            drained.as_mut().enable();
            if self.0.calls.load(Ordering::Acquire) == CLOSED {
                return;
            }
            drained.await;
        }
    }

    /// Admits a call, or says why not.
    fn enter(&self) -> Result<Admitted, Shed> {
        let max = self.0.max_in_flight;
        self.0
            .calls
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| {
                (n & CLOSED == 0 && n < max).then_some(n + 1)
            })
            .map(|_| Admitted(self.clone()))
            .map_err(|n| {
                if n & CLOSED != 0 {
                    Shed::Closed
                } else {
                    Shed::Full
                }
            })
    }
}

enum Shed {
    /// Shutdown has begun.
    Closed,
    /// `server.max_in_flight` calls are running.
    Full,
}

/// One admitted call's place in the guard, given back when dropped.
struct Admitted(Guard);

impl Drop for Admitted {
    fn drop(&mut self) {
        let shared = &self.0.0;
        if shared.calls.fetch_sub(1, Ordering::Release) == CLOSED | 1 {
            shared.drained.notify_waiters();
        }
    }
}

impl<S> Layer<S> for Guard {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Guarded<S> {
        Guarded {
            guard: self.clone(),
            inner,
        }
    }
}

/// A service behind the guard.
///
/// The call's place in the guard and its deadline cover it from when its request message
/// has arrived (`request_body` reads it first) until its response headers. A
/// unary call answers with its headers, so it is covered whole; a Subscribe stream answers
/// as soon as it is registered, so a long-lived stream holds no place and is never cut.
#[derive(Clone)]
pub struct Guarded<S> {
    guard: Guard,
    inner: S,
}

impl<S, B> Service<http::Request<B>> for Guarded<S>
where
    S: Service<http::Request<B>, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Guarding<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let shared = &self.guard.0;
        let admitted = match self.guard.enter() {
            Ok(admitted) => admitted,
            Err(Shed::Closed) => {
                return Guarding::refused(Status::unavailable(
                    "server is shutting down; reconnect to another instance",
                ));
            }
            Err(Shed::Full) => {
                shared.metrics.refused(LimitKey::MaxInFlight);
                return Guarding::refused(Status::resource_exhausted(format!(
                    "server is busy: {} requests in flight (server.max_in_flight); retry with backoff",
                    shared.max_in_flight
                )));
            }
        };
        let client = client_timeout(&request);
        let timeout = client.map_or(shared.timeout, |t| t.min(shared.timeout));
        Guarding {
            state: Stage::Running {
                call: self.inner.call(request),
                started: Instant::now(),
                deadline: None,
                timeout,
                // A client's own shorter deadline is its choice, not a refusal by the server.
                server_deadline: client.is_none_or(|t| t >= shared.timeout),
                admitted,
            },
        }
    }
}

pin_project! {
    /// A guarded call: refused at once, or running against its deadline with its place.
    pub struct Guarding<F> {
        #[pin]
        state: Stage<F>,
    }
}

impl<F> Guarding<F> {
    fn refused(status: Status) -> Self {
        Self {
            state: Stage::Refused {
                response: Some(grpc_error(status)),
            },
        }
    }
}

pin_project! {
    #[project = StageProj]
    enum Stage<F> {
        // Shed before it started; the refusal, until it is returned.
        Refused { response: Option<Response> },
        // Running; its place is given back when the call answers or runs out of time.
        Running {
            #[pin]
            call: F,
            started: Instant,
            // Set only once the call has to wait: a Get or a Set answers on its first poll,
            // and a timer made and cancelled for each was 2% of its server CPU.
            deadline: Option<Pin<Box<Sleep>>>,
            timeout: Duration,
            // Whether the deadline is the server's (`server.request_timeout`).
            server_deadline: bool,
            admitted: Admitted,
        },
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for Guarding<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StageProj::Refused { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            StageProj::Running {
                call,
                started,
                deadline,
                timeout,
                server_deadline,
                admitted,
            } => {
                if let Poll::Ready(response) = call.poll(cx) {
                    return Poll::Ready(response);
                }
                let deadline = deadline.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep(
                        timeout.saturating_sub(started.elapsed()),
                    ))
                });
                if deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if *server_deadline {
                    admitted.0.0.metrics.refused(LimitKey::RequestTimeout);
                }
                Poll::Ready(Ok(grpc_error(Status::deadline_exceeded(format!(
                    "request took longer than {}",
                    humantime::format_duration(*timeout)
                )))))
            }
        }
    }
}

/// The client's deadline from the `grpc-timeout` header: digits and a unit (H, M, S, m, u, n).
fn client_timeout<B>(request: &http::Request<B>) -> Option<Duration> {
    let value = request.headers().get(&GRPC_TIMEOUT)?.to_str().ok()?;
    parse_grpc_timeout(value)
}

/// A `grpc-timeout` header's value: 1 to 8 ASCII digits and a unit (`H`, `M`, `S`, `m`, `u`,
/// `n`), per gRPC over HTTP/2; `None` for anything else.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    // Bytes, not chars: the unit is one ASCII byte, and `u64::from_str` would take a `+`.
    let (unit, digits) = value.as_bytes().split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount = digits
        .iter()
        .fold(0, |n, digit| n * 10 + u64::from(digit - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::extract::Request;
    use axum::routing::post;
    use std::sync::Arc;
    use std::task::Poll;
    use tokio::sync::Notify;
    use tower::ServiceExt;

    /// A route whose handler waits until `release` is notified.
    fn guarded(guard: Guard, release: Arc<Notify>) -> Router {
        Router::new()
            .route(
                "/slow",
                post(move || async move {
                    release.notified().await;
                    "done"
                }),
            )
            .layer(guard)
    }

    fn grpc_status(response: &Response) -> Option<&str> {
        response.headers().get("grpc-status")?.to_str().ok()
    }

    fn request(grpc_timeout: Option<&str>) -> Request {
        let mut builder = Request::post("/slow");
        if let Some(t) = grpc_timeout {
            builder = builder.header("grpc-timeout", t);
        }
        builder.body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn calls_past_the_in_flight_limit_are_shed_at_once() {
        let release = Arc::new(Notify::new());
        let metrics = Arc::new(Metrics::new());
        let guard = Guard::new(1, Duration::from_secs(60), metrics.clone());
        let app = guarded(guard.clone(), release.clone());
        let first = tokio::spawn(app.clone().oneshot(request(None)));
        // Wait until the first call holds its place: it is parked on `release`.
        while Arc::strong_count(&release) < 3 && !first.is_finished() {
            tokio::task::yield_now().await;
        }
        assert_eq!(guard.in_flight(), 1);
        let shed = app.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(grpc_status(&shed), Some("8"), "RESOURCE_EXHAUSTED");
        assert_eq!(metrics.refusals(LimitKey::MaxInFlight), 1);
        release.notify_one();
        let done = first.await.unwrap().unwrap();
        assert_eq!(grpc_status(&done), None);
        assert_eq!(guard.in_flight(), 0);
        // Its place is back.
        release.notify_one();
        let again = app.oneshot(request(None)).await.unwrap();
        assert_eq!(grpc_status(&again), None);
    }

    #[tokio::test]
    async fn once_closed_calls_are_refused_and_close_waits_for_the_running_ones() {
        let release = Arc::new(Notify::new());
        let guard = Guard::new(4, Duration::from_secs(60), Arc::new(Metrics::new()));
        let app = guarded(guard.clone(), release.clone());
        let running = tokio::spawn(app.clone().oneshot(request(None)));
        for _ in 0..1000 {
            if guard.in_flight() == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(guard.in_flight(), 1);

        let mut close = std::pin::pin!(guard.close());
        let first = std::future::poll_fn(|cx| Poll::Ready(close.as_mut().poll(cx))).await;
        assert!(first.is_pending(), "a call is still running");
        let refused = app.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(grpc_status(&refused), Some("14"), "UNAVAILABLE");

        release.notify_one();
        let done = running.await.unwrap().unwrap();
        assert_eq!(grpc_status(&done), None);
        tokio::time::timeout(Duration::from_secs(10), close)
            .await
            .expect("close returns once the running call has answered");
        let refused = app.oneshot(request(None)).await.unwrap();
        assert_eq!(grpc_status(&refused), Some("14"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_its_deadline_gets_deadline_exceeded() {
        let release = Arc::new(Notify::new());
        let metrics = Arc::new(Metrics::new());
        let guard = Guard::new(4, Duration::from_secs(10), metrics.clone());
        let app = guarded(guard, release);
        let timed_out = app.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(grpc_status(&timed_out), Some("4"), "DEADLINE_EXCEEDED");
        assert_eq!(metrics.refusals(LimitKey::RequestTimeout), 1);
        let started = tokio::time::Instant::now();
        let shorter = app.oneshot(request(Some("50m"))).await.unwrap();
        assert_eq!(grpc_status(&shorter), Some("4"));
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(50),
            "the client's shorter deadline wins"
        );
        assert_eq!(
            metrics.refusals(LimitKey::RequestTimeout),
            1,
            "the client's own deadline is not a refusal"
        );
    }

    #[test]
    fn grpc_timeout_headers_parse_per_the_spec() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("10n"), Some(Duration::from_nanos(10)));
        for bad in [
            "",
            "S",
            "5",
            "5s",
            "-5S",
            "+5S",
            "123456789S",
            "5 S",
            "1\u{63d}",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
