//! `server.max_header_bytes` in front of every route: it names the key where hyper's own
//! refusal could not, and measures a request's headers as HTTP/2 does, whatever its protocol.
//! A plain tower layer, as the guard is, for the same reason (see `guard.rs`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use pin_project_lite::pin_project;
use tonic::Status;
use tower::{Layer, Service};
use tracing::debug;

use crate::http::{grpc_error, is_grpc};
use crate::metrics::{LimitKey, Metrics};

/// `server.max_header_bytes`, checked before routing: a request whose header list is larger
/// (see [`header_list_size`]) is refused with `RESOURCE_EXHAUSTED` if it is a gRPC call and
/// with 431 otherwise, both naming the key and the size seen. As a [`Layer`], it limits a
/// service.
///
/// hyper and h2 hold headers to a ceiling above this limit (see `server.rs`), so that what
/// they buffer stays bounded; between the two, this is what answers.
#[derive(Clone)]
pub struct HeaderLimit {
    max: usize,
    metrics: Arc<Metrics>,
}

impl HeaderLimit {
    /// Header lists up to `max` bytes pass. Refusals are counted in `metrics`.
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Self {
        Self { max, metrics }
    }
}

impl<S> Layer<S> for HeaderLimit {
    type Service = HeaderLimited<S>;

    fn layer(&self, inner: S) -> HeaderLimited<S> {
        HeaderLimited {
            limit: self.clone(),
            inner,
        }
    }
}

/// A service behind the header limit.
#[derive(Clone)]
pub struct HeaderLimited<S> {
    limit: HeaderLimit,
    inner: S,
}

impl<S, B> Service<http::Request<B>> for HeaderLimited<S>
where
    S: Service<http::Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Limiting<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let size = header_list_size(&request);
        let max = self.limit.max;
        if size <= max {
            return Limiting {
                state: Limited::Passed {
                    call: self.inner.call(request),
                },
            };
        }
        self.limit.metrics.refused(LimitKey::MaxHeaderBytes);
        debug!(
            size,
            max,
            path = request.uri().path(),
            "refused: request headers over server.max_header_bytes"
        );
        let message = format!(
            "request headers of {size} bytes are over the limit of {max} bytes \
             (server.max_header_bytes), counting each field's name and value plus 32 bytes, \
             as HTTP/2 does"
        );
        let response = if is_grpc(&request) {
            grpc_error(Status::resource_exhausted(message))
        } else {
            let body = Json(serde_json::json!({ "error": message }));
            (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, body).into_response()
        };
        Limiting {
            state: Limited::Refused {
                response: Some(response),
            },
        }
    }
}

/// The size of a request's header list as HTTP/2's `SETTINGS_MAX_HEADER_LIST_SIZE` counts it
/// (RFC 9113, section 6.5.2): for each field, the bytes of its name and of its value plus
/// 32, the pseudo-header fields (`:method`, `:scheme`, `:authority`, `:path`) included. An
/// HTTP/1.1 request is counted the same way from what it carries: its request line as
/// `:method` and `:path` (and `:scheme`, `:authority` for an absolute URI), and `host` as any
/// other field. So a request measures about the same over either protocol, and over HTTP/2
/// exactly what h2 measured.
pub fn header_list_size<B>(request: &http::Request<B>) -> usize {
    const OVERHEAD: usize = 32;
    let field = |name: &str, value: usize| name.len() + value + OVERHEAD;
    let uri = request.uri();
    let pseudo = [
        Some(field(":method", request.method().as_str().len())),
        uri.scheme_str().map(|s| field(":scheme", s.len())),
        uri.authority()
            .map(|a| field(":authority", a.as_str().len())),
        uri.path_and_query()
            .map(|p| field(":path", p.as_str().len())),
    ];
    let fields = request
        .headers()
        .iter()
        .map(|(name, value)| field(name.as_str(), value.len()));
    pseudo.into_iter().flatten().chain(fields).sum()
}

pin_project! {
    /// A request under the header limit, running; or its refusal, until it is returned.
    pub struct Limiting<F> {
        #[pin]
        state: Limited<F>,
    }
}

pin_project! {
    #[project = LimitedProj]
    enum Limited<F> {
        Passed { #[pin] call: F },
        Refused { response: Option<Response> },
    }
}

impl<F, E> Future for Limiting<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            LimitedProj::Passed { call } => call.poll(cx),
            LimitedProj::Refused { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::extract::Request;
    use tower::ServiceExt;

    fn grpc_status(response: &Response) -> Option<&str> {
        response.headers().get("grpc-status")?.to_str().ok()
    }

    #[test]
    fn header_lists_are_measured_as_http2_measures_them() {
        // As h2 hands a request over: the pseudo-header fields in the URI.
        let h2 = Request::get("http://test/health/live")
            .header("x-a", "b")
            .body(Body::empty())
            .unwrap();
        let expected = (7 + 3 + 32) // :method GET
            + (7 + 4 + 32) // :scheme http
            + (10 + 4 + 32) // :authority test
            + (5 + 12 + 32) // :path /health/live
            + (3 + 1 + 32); // x-a: b
        assert_eq!(header_list_size(&h2), expected);

        // HTTP/1.1 in origin form: the query is part of :path, host is a field.
        let h1 = Request::get("/health/live?x=1")
            .header("host", "test")
            .header("x-a", "b")
            .header("x-a", "c")
            .body(Body::empty())
            .unwrap();
        let expected = (7 + 3 + 32) + (5 + 16 + 32) + (4 + 4 + 32) + 2 * (3 + 1 + 32);
        assert_eq!(header_list_size(&h1), expected);
    }

    #[tokio::test]
    async fn requests_over_the_header_limit_are_refused_naming_it() {
        let metrics = Arc::new(Metrics::new());
        let request = |grpc: bool| {
            let builder = Request::get("/x").header("x-big", "y".repeat(200));
            let builder = if grpc {
                builder.header("content-type", "application/grpc")
            } else {
                builder
            };
            builder.body(Body::empty()).unwrap()
        };
        let size = header_list_size(&request(false));
        let app = |max| {
            Router::new()
                .route("/x", axum::routing::get(|| async { "ok" }))
                .layer(HeaderLimit::new(max, metrics.clone()))
        };
        let passed = app(size).oneshot(request(false)).await.unwrap();
        assert_eq!(passed.status(), StatusCode::OK, "exactly at the limit");

        // The content-type field takes the call over.
        let grpc = app(size).oneshot(request(true)).await.unwrap();
        assert_eq!(grpc_status(&grpc), Some("8"), "RESOURCE_EXHAUSTED");
        let message = grpc.headers()["grpc-message"].to_str().unwrap();
        assert!(message.contains("server.max_header_bytes"), "{message}");

        let http = app(size - 1).oneshot(request(false)).await.unwrap();
        assert_eq!(http.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let body = axum::body::to_bytes(http.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(
            error.starts_with(&format!("request headers of {size} bytes are over the limit of {} bytes (server.max_header_bytes)", size - 1)),
            "{error}"
        );
        assert_eq!(metrics.refusals(LimitKey::MaxHeaderBytes), 2);
    }
}
