//! The HTTP routes, served on the main listener beside gRPC and alone on the legacy health
//! listener: `/health/live`, `/health/ready`, and a fallback that answers 404 in JSON, or
//! `UNIMPLEMENTED` to a gRPC call for an unknown service (and the message of an unknown
//! method of a known one); and the body limit of these routes.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The HTTP routes. `/health/ready` answers 503 once `draining` is cancelled.
pub fn router(draining: CancellationToken) -> Router {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .with_state(draining)
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

async fn ready(State(draining): State<CancellationToken>) -> Response {
    if draining.is_cancelled() {
        let body = json!({ "status": "draining" });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    } else {
        Json(json!({ "status": "ready" })).into_response()
    }
}

/// Answers every path no route claims. One fallback serves both protocols because tonic's
/// would answer plain HTTP with a gRPC reply, and axum allows only one per merged router.
pub async fn fallback(request: Request) -> Response {
    let path = request.uri().path();
    if is_grpc(&request) {
        return grpc_error(unknown_method(path));
    }
    let body = json!({ "error": format!("no route for {} {path}", request.method()) });
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

/// Whether the request is a gRPC call, to be answered with a gRPC status.
pub(crate) fn is_grpc<B>(request: &axum::http::Request<B>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// `status` as a trailers-only gRPC response.
pub(crate) fn grpc_error(status: tonic::Status) -> Response {
    status.into_http::<axum::body::Body>().into_response()
}

fn unknown_method(path: &str) -> tonic::Status {
    tonic::Status::unimplemented(format!("unknown service or method {path}"))
}

/// Gives a bare `UNIMPLEMENTED` in `headers` the message naming `path`, as the fallback's.
pub(crate) fn name_unimplemented(headers: &mut HeaderMap, path: &str) {
    let unimplemented = headers
        .get(&GRPC_STATUS)
        .is_some_and(|code| code.as_bytes() == b"12");
    if unimplemented && !headers.contains_key(&GRPC_MESSAGE) {
        // Only fails for a message that cannot be encoded, which a path is not.
        let _ = unknown_method(path).add_header(headers);
    }
}

/// The gRPC status header; a constant, so looking it up parses no header name.
pub(crate) static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The middleware function, for `axum::middleware::from_fn_with_state(max, limit_body)` on
/// the HTTP routes: a body declared longer than `limits.max_http_body_bytes` gets 413 at
/// once. A body without a length is cut at the same size by `DefaultBodyLimit` when a
/// handler reads it.
pub async fn limit_body(State(max): State<usize>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > max as u64 => {
            let body = json!({
                "error": format!(
                    "request body of {length} bytes is over the limit of {max} bytes (limits.max_http_body_bytes)"
                )
            });
            (StatusCode::PAYLOAD_TOO_LARGE, Json(body)).into_response()
        }
        _ => next.run(request).await,
    }
}

/// The health service's gRPC name.
const HEALTH_SERVICE: &str = tonic_health::pb::health_server::SERVICE_NAME;
/// The HTTP health routes, which nobody refuses.
const HTTP_HEALTH_PATHS: [&str; 2] = ["/health/live", "/health/ready"];

/// Whether `path` is a health check (HTTP or gRPC), which is never refused.
pub(crate) fn is_health_check(path: &str) -> bool {
    HTTP_HEALTH_PATHS.contains(&path) || grpc_method(path, HEALTH_SERVICE).is_some()
}

/// `Method` of the path `/service/Method`.
pub(crate) fn grpc_method<'a>(path: &'a str, service: &str) -> Option<&'a str> {
    path.strip_prefix('/')?
        .strip_prefix(service)?
        .strip_prefix('/')
}
