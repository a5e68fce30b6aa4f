//! The guard in front of the KV service: a global in-flight limit that sheds load instead of
//! queueing, and a deadline on unary calls. Both answer with real gRPC statuses; tower's
//! own layers would answer with bare HTTP codes that clients misread as `UNAVAILABLE`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;
use tonic::Status;

use crate::metrics::{Limit, Metrics};

/// Shared by every request to the guarded routes.
#[derive(Clone)]
pub struct Guard {
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Guard {
    /// At most `max_in_flight` calls at once, each answered within `timeout` (or the
    /// client's shorter `grpc-timeout`). Refusals are counted in `metrics`.
    pub fn new(max_in_flight: usize, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            timeout,
            metrics,
        }
    }

    /// Calls holding a permit now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.permits.available_permits()
    }
}

/// The middleware function, for `axum::middleware::from_fn_with_state(guard, guard_grpc)`.
///
/// The permit and the deadline cover the call until its response headers. A unary call
/// answers with its headers, so it is covered whole; a Subscribe stream answers as soon as
/// it is registered, so a long-lived stream holds no permit and is never cut.
pub async fn guard_grpc(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let Ok(_permit) = guard.permits.clone().try_acquire_owned() else {
        guard.metrics.refused(Limit::MaxInFlight);
        return grpc_error(Status::resource_exhausted(format!(
            "server is busy: {} requests in flight (server.max_in_flight); retry with backoff",
            guard.max_in_flight
        )));
    };
    let client = client_timeout(&request);
    let timeout = client.map_or(guard.timeout, |t| t.min(guard.timeout));
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            // A client's own shorter deadline is its choice, not a refusal by the server.
            if client.is_none_or(|t| t >= guard.timeout) {
                guard.metrics.refused(Limit::RequestTimeout);
            }
            grpc_error(Status::deadline_exceeded(format!(
                "request took longer than {}",
                humantime::format_duration(timeout)
            )))
        }
    }
}

fn grpc_error(status: Status) -> Response {
    status.into_http::<axum::body::Body>().into_response()
}

/// The client's deadline from the `grpc-timeout` header: digits and a unit (H, M, S, m, u, n).
fn client_timeout(request: &Request) -> Option<Duration> {
    let value = request.headers().get("grpc-timeout")?.to_str().ok()?;
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
    use axum::routing::post;
    use std::sync::Arc;
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
            .layer(axum::middleware::from_fn_with_state(guard, guard_grpc))
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
        // Wait until the first call holds the permit: it is parked on `release`.
        while Arc::strong_count(&release) < 3 && !first.is_finished() {
            tokio::task::yield_now().await;
        }
        assert_eq!(guard.in_flight(), 1);
        let shed = app.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(grpc_status(&shed), Some("8"), "RESOURCE_EXHAUSTED");
        assert_eq!(metrics.refusals(Limit::MaxInFlight), 1);
        release.notify_one();
        let done = first.await.unwrap().unwrap();
        assert_eq!(grpc_status(&done), None);
        assert_eq!(guard.in_flight(), 0);
        // The permit is back.
        release.notify_one();
        let again = app.oneshot(request(None)).await.unwrap();
        assert_eq!(grpc_status(&again), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_its_deadline_gets_deadline_exceeded() {
        let release = Arc::new(Notify::new());
        let metrics = Arc::new(Metrics::new());
        let guard = Guard::new(4, Duration::from_secs(10), metrics.clone());
        let app = guarded(guard, release);
        let timed_out = app.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(grpc_status(&timed_out), Some("4"), "DEADLINE_EXCEEDED");
        assert_eq!(metrics.refusals(Limit::RequestTimeout), 1);
        let started = tokio::time::Instant::now();
        let shorter = app.oneshot(request(Some("50m"))).await.unwrap();
        assert_eq!(grpc_status(&shorter), Some("4"));
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(50),
            "the client's shorter deadline wins"
        );
        assert_eq!(
            metrics.refusals(Limit::RequestTimeout),
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
