//! One connection's life: the TLS handshake, then HTTP/1.1 or HTTP/2 under its deadlines
//! (first request, partial requests, idle, shutdown), and the tracking of the requests open
//! on it, which those deadlines are measured from.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Extension;
use axum::extract::ConnectInfo;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::{Layer as _, Service};
use tracing::debug;

use crate::metrics::LimitKey;

use super::accept::Listener;
use super::partial;

/// One connection, from accept to close: the TLS handshake if the listener has TLS, then
/// HTTP. A failed handshake is the client's problem (plaintext to a TLS port, an unknown CA,
/// no client certificate), so it is logged at debug only.
pub(super) async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Listener>,
    stop: CancellationToken,
) {
    let accepted = Instant::now();
    // Small HTTP/2 frames must not wait for delayed ACKs (tonic does the same).
    if let Err(err) = stream.set_nodelay(true) {
        debug!(%peer, error = %err, "setting TCP_NODELAY failed");
    }
    let Some(tls) = &shared.tls else {
        return serve_http(stream, peer, accepted, &shared, stop).await;
    };
    let handshake =
        tokio::time::timeout_at(accepted + shared.handshake_timeout, tls.accept(stream));
    let stream = tokio::select! {
        result = handshake => match result {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                debug!(listener = shared.name, %peer, error = %err, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!(listener = shared.name, %peer, "TLS handshake took longer than server.handshake_timeout");
                shared.metrics.refused(LimitKey::HandshakeTimeout);
                return;
            }
        },
        () = stop.cancelled() => return,
    };
    serve_http(stream, peer, accepted, &shared, stop).await;
}

/// Serves HTTP/1.1 or HTTP/2 on `io` until the peer closes, or until the connection is
/// closed for sending no request within `server.handshake_timeout`, for a request or HTTP/2
/// frame partly received for as long (see [`partial`]), for HTTP/2 frames that do no work
/// past `server.max_control_frames` (see [`control`]), for having no open request for
/// `server.idle_timeout`, or for shutdown.
async fn serve_http<IO>(
    io: IO,
    peer: SocketAddr,
    accepted: Instant,
    shared: &Listener,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new(accepted));
    let io = TokioIo::new(partial::Partial::new(
        io,
        activity.clone(),
        shared.handshake_timeout,
        shared.max_control_frames,
    ));
    // Per-client rate limiting keys unauthenticated clients by their address.
    let service = TowerToHyperService::new(Tracked {
        inner: shared
            .answers
            .connection()
            .layer(Extension(ConnectInfo(peer)).layer(shared.app.clone())),
        activity: activity.clone(),
    });
    let connection = shared.http.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    let mut phase = Phase::Serving;
    let result = loop {
        let deadline = match (phase, activity.quiet()) {
            // Bounded by shutdown.drain_timeout, in `serve`.
            (Phase::ShuttingDown, _) => None,
            // A peer that never answers the GOAWAY (dead, with keepalive off) must not keep
            // the connection for ever; one that opened a stream meanwhile is served.
            (Phase::IdleClosing(_), Quiet::Busy) => Some(Instant::now() + shared.handshake_timeout),
            (Phase::IdleClosing(since), _) => Some(since + shared.handshake_timeout),
            // Nothing wakes us when a request starts or ends, so look again after at most
            // one idle_timeout: that is early enough for the idle deadline of a request
            // that ends in the meantime.
            (Phase::Serving, Quiet::NeverUsed) => {
                let first_request = accepted + shared.handshake_timeout;
                Some(match shared.idle_timeout {
                    Some(idle) => first_request.min(Instant::now() + idle),
                    None => first_request,
                })
            }
            (Phase::Serving, Quiet::Busy) => shared.idle_timeout.map(|idle| Instant::now() + idle),
            (Phase::Serving, Quiet::Since(at)) => shared.idle_timeout.map(|idle| at + idle),
        };
        tokio::select! {
            result = connection.as_mut() => break result,
            () = stop.cancelled(), if phase != Phase::ShuttingDown => {
                connection.as_mut().graceful_shutdown();
                phase = Phase::ShuttingDown;
            }
            () = tokio::time::sleep_until(deadline.unwrap_or(accepted)), if deadline.is_some() => {
                let now = Instant::now();
                match (phase, activity.quiet()) {
                    (Phase::Serving, Quiet::NeverUsed) if now >= accepted + shared.handshake_timeout => {
                        // Nothing was asked, so there is nothing to finish gracefully.
                        debug!(listener = shared.name, %peer, "no request within server.handshake_timeout, closing");
                        shared.metrics.refused(LimitKey::HandshakeTimeout);
                        return;
                    }
                    (Phase::Serving, Quiet::Since(at)) if shared.idle_timeout.is_some_and(|idle| now >= at + idle) => {
                        debug!(listener = shared.name, %peer, "idle for server.idle_timeout, closing");
                        connection.as_mut().graceful_shutdown();
                        phase = Phase::IdleClosing(now);
                    }
                    (Phase::IdleClosing(_), Quiet::NeverUsed | Quiet::Since(_)) => {
                        debug!(listener = shared.name, %peer, "no answer to the idle close, dropping the connection");
                        return;
                    }
                    _ => {}
                }
            }
        }
    };
    if activity.partial_timed_out.load(Ordering::Relaxed) {
        // Its reads failed: hyper has dropped the connection without a word.
        debug!(listener = shared.name, %peer, "a request or frame partly received for longer than server.handshake_timeout, closed");
        shared.metrics.refused(LimitKey::HandshakeTimeout);
    } else if activity.control_flood.load(Ordering::Relaxed) {
        // Closed with a GOAWAY (ENHANCE_YOUR_CALM) written by `partial`, if the socket took it.
        debug!(listener = shared.name, %peer, "HTTP/2 frames that do no work spent server.max_control_frames, closed");
        shared.metrics.refused(LimitKey::MaxControlFrames);
    } else if let Err(err) = result {
        debug!(listener = shared.name, %peer, error = %err, "connection closed with an error");
    }
}

/// Where a connection is in its life, for the deadlines of `serve_http`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Idle since `serve_http` asked it to close gracefully at this instant.
    IdleClosing(Instant),
    ShuttingDown,
}

/// The requests open on one connection, and when the last one ended: what the idle and
/// first-request deadlines are measured from. Written by every request, read by the
/// connection's own task when a deadline passes.
pub(super) struct Activity {
    open: AtomicUsize,
    /// Nanoseconds from `epoch` to the end of the latest request; [`NEVER`] before any.
    last_end: AtomicU64,
    epoch: Instant,
    /// Set when [`partial::Partial`] failed a read for a partial request out of time.
    pub(super) partial_timed_out: AtomicBool,
    /// Set when [`partial::Partial`] closed the connection for spending its budget of
    /// frames that do no work.
    pub(super) control_flood: AtomicBool,
}

const NEVER: u64 = u64::MAX;

pub(super) enum Quiet {
    Busy,
    NeverUsed,
    Since(Instant),
}

impl Activity {
    fn new(epoch: Instant) -> Self {
        Self {
            open: AtomicUsize::new(0),
            last_end: AtomicU64::new(NEVER),
            epoch,
            partial_timed_out: AtomicBool::new(false),
            control_flood: AtomicBool::new(false),
        }
    }

    pub(super) fn quiet(&self) -> Quiet {
        // Acquire pairs with the Release in `OpenRequest::drop`: a request seen ended has its
        // end time stored.
        if self.open.load(Ordering::Acquire) > 0 {
            return Quiet::Busy;
        }
        match self.last_end.load(Ordering::Relaxed) {
            NEVER => Quiet::NeverUsed,
            nanos => Quiet::Since(self.epoch + Duration::from_nanos(nanos)),
        }
    }
}

/// One open request: from the service call until its response body is dropped, so a
/// Subscribe stream counts for as long as it is open.
struct OpenRequest(Arc<Activity>);

impl OpenRequest {
    fn new(activity: Arc<Activity>) -> Self {
        activity.open.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        let activity = &self.0;
        let nanos = u64::try_from(activity.epoch.elapsed().as_nanos()).unwrap_or(NEVER - 1);
        activity.last_end.store(nanos, Ordering::Relaxed);
        activity.open.fetch_sub(1, Ordering::Release);
    }
}

/// The router, counting each request in its connection's [`Activity`]. No allocation per
/// request: the future and the body are wrapped in place.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, Req, B> Service<Req> for Tracked<S>
where
    S: Service<Req, Response = ::http::Response<B>>,
{
    type Response = ::http::Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        TrackedFuture {
            open: Some(OpenRequest::new(self.activity.clone())),
            future: self.inner.call(request),
        }
    }
}

pin_project! {
    /// The response future; hands its [`OpenRequest`] on to the body.
    struct TrackedFuture<F> {
        #[pin]
        future: F,
        open: Option<OpenRequest>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<::http::Response<B>, E>>,
{
    type Output = Result<::http::Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.future.poll(cx))?;
        let open = this.open.take();
        Poll::Ready(Ok(response.map(|body| TrackedBody { body, _open: open })))
    }
}

pin_project! {
    /// The response body, unchanged; the request counts as open until it is dropped.
    struct TrackedBody<B> {
        #[pin]
        body: B,
        _open: Option<OpenRequest>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
