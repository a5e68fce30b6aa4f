//! The cap on gRPC health `Watch` streams (`server.max_health_watches`): health checks need
//! no token, so open-ended Watch streams get a small cap of their own, all clients together.
//! A place is held by the response body, and given back when the stream ends.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use hyper::body::{Bytes, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tracing::debug;

use crate::http::grpc_error;
use crate::metrics::{LimitKey, Metrics};

const WATCH_PATH: &str = "/grpc.health.v1.Health/Watch";

/// The places for Watch streams, shared by every connection.
#[derive(Clone)]
pub struct HealthWatches {
    places: Arc<Semaphore>,
    max: usize,
    metrics: Arc<Metrics>,
}

impl HealthWatches {
    /// Room for `max` Watch streams at once; refusals are counted in `metrics`.
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            places: Arc::new(Semaphore::new(max)),
            max,
            metrics,
        }
    }
}

/// The middleware function, for `axum::middleware::from_fn_with_state(watches, limit)`
/// around the health service: a Watch past the cap gets `RESOURCE_EXHAUSTED` at once; a
/// Check is never refused.
pub async fn limit(State(watches): State<HealthWatches>, request: Request, next: Next) -> Response {
    if request.uri().path() != WATCH_PATH {
        return next.run(request).await;
    }
    let Ok(place) = watches.places.clone().try_acquire_owned() else {
        debug!("refused: server.max_health_watches");
        watches.metrics.refused(LimitKey::MaxHealthWatches);
        return grpc_error(Status::resource_exhausted(format!(
            "{} health Watch streams are open, all that server.max_health_watches allows; \
             use Check, or retry later",
            watches.max
        )));
    };
    next.run(request).await.map(|body| {
        Body::new(Holding {
            body,
            _place: place,
        })
    })
}

/// A response body that holds a Watch place until it is dropped.
struct Holding {
    body: Body,
    _place: OwnedSemaphorePermit,
}

impl hyper::body::Body for Holding {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
