//! Answers built and not yet taken by their clients (HTTP/2 flow control shut, a slow socket):
//! their bytes count against one budget for the whole server
//! (`server.max_answer_bytes_in_flight`) and a share per connection
//! (`server.max_answer_bytes_per_connection`), and an HTTP/2 stream whose answer makes no
//! progress for `server.send_timeout` is reset, which frees it. Owns the count, the refusals
//! and each stream's send deadline; `server` wires them to its connections.
//!
//! An answer's bytes count from when its body yields them (a unary answer: as soon as it is
//! built, before its headers go) until hyper and h2 have dropped them, that is, until they
//! are written to the socket or the stream is reset. They are handed on in slices of
//! [`SLICE_BYTES`], so h2 never holds more than a slice beyond what the window admits.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use axum::http::header::RETRY_AFTER;
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes};
use hyper::body::{Body as _, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tower::{Layer, Service};
use tracing::debug;

use crate::config::ServerSettings;
use crate::http::{grpc_error, is_grpc};
use crate::metrics::{LimitKey, Metrics};

/// The most bytes handed to hyper at once: one HTTP/2 DATA frame at the default frame size.
const SLICE_BYTES: usize = 16 * 1024;

/// Answers up to this size are always delivered once built, even past the budget: every
/// Set and Delete acknowledgement is smaller, and a small read costs about what the refusal
/// replacing it would. What they add is at most this much per open stream.
const ALWAYS_DELIVERED: usize = 1024;

/// Marks a response whose answer acknowledges applied changes (a Batch that wrote): it is
/// delivered whatever the budget, since replacing it would report a failure for changes
/// that were made.
#[derive(Debug, Clone, Copy)]
pub struct Committed;

/// The budget of the whole server, shared by every connection of every listener.
#[derive(Clone)]
pub struct Answers(Arc<Shared>);

struct Shared {
    /// Bytes of answers built and not yet taken, on every connection together.
    held: AtomicUsize,
    max: usize,
    per_connection: usize,
    /// The largest answer a call can build: a call starts only where one this large fits.
    largest: usize,
    send_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Answers {
    /// The budget of `settings`, for answers of at most `largest` bytes (encoded, framing
    /// included); refusals and resets are counted in `metrics`.
    pub fn new(settings: &ServerSettings, largest: usize, metrics: Arc<Metrics>) -> Self {
        Self(Arc::new(Shared {
            held: AtomicUsize::new(0),
            max: settings.max_answer_bytes_in_flight,
            per_connection: settings.max_answer_bytes_per_connection,
            largest,
            send_timeout: settings.send_timeout,
            metrics,
        }))
    }

    /// Bytes of answers built and not yet taken, on every connection together.
    pub fn held(&self) -> usize {
        self.0.held.load(Ordering::Relaxed)
    }

    /// The executor to give hyper's HTTP/2 builder: it runs each stream under its send
    /// deadline.
    pub fn executor(&self) -> StreamExecutor {
        StreamExecutor(self.clone())
    }

    /// The layer that counts one new connection's answers against its share.
    pub fn connection(&self) -> ConnectionAnswers {
        ConnectionAnswers(Arc::new(Connection {
            held: AtomicUsize::new(0),
            answers: self.clone(),
        }))
    }
}

/// One connection's answers.
struct Connection {
    held: AtomicUsize,
    answers: Answers,
}

/// Why a call is refused, or an answer replaced.
#[derive(Debug, Clone, Copy)]
enum Over {
    /// The connection's share is spent.
    Connection,
    /// The server's budget is spent.
    Server,
}

impl Connection {
    /// Whether a new call may start: only while the largest answer it could build still fits
    /// in this connection's share, and, if this connection holds any of the server's budget,
    /// in that budget too (one that has taken all its answers keeps being served). Checked
    /// before the call, not only once its answer is built: building answers that are then
    /// thrown away is the work a client that never reads would make the server do.
    fn admit(&self) -> Result<(), Over> {
        let shared = &self.answers.0;
        let held = self.held.load(Ordering::Relaxed);
        if held + shared.largest > shared.per_connection {
            return Err(Over::Connection);
        }
        if held > 0 && shared.held.load(Ordering::Relaxed) + shared.largest > shared.max {
            return Err(Over::Server);
        }
        Ok(())
    }

    /// Whether an answer of `bytes` fits in this connection's share and the server's budget.
    fn fits(&self, bytes: usize) -> Result<(), Over> {
        let shared = &self.answers.0;
        if self.held.load(Ordering::Relaxed) + bytes > shared.per_connection {
            return Err(Over::Connection);
        }
        if shared.held.load(Ordering::Relaxed) + bytes > shared.max {
            return Err(Over::Server);
        }
        Ok(())
    }

    /// What the client is told, naming the limit; counts the refusal.
    fn refusal(&self, over: Over, answer: Option<usize>, grpc: bool) -> Response {
        let shared = &self.answers.0;
        let what = match answer {
            Some(bytes) => format!("an answer of {bytes} bytes was built but does not fit: "),
            None => String::new(),
        };
        let message = match over {
            Over::Connection => {
                shared
                    .metrics
                    .refused(LimitKey::MaxAnswerBytesPerConnection);
                format!(
                    "{what}this connection has {} bytes of answers it has not taken, against \
                     server.max_answer_bytes_per_connection ({}); read them (or use another \
                     connection), then retry",
                    self.held.load(Ordering::Relaxed),
                    shared.per_connection
                )
            }
            Over::Server => {
                shared.metrics.refused(LimitKey::MaxAnswerBytesInFlight);
                format!(
                    "{what}server is busy: answers waiting for their clients hold {} bytes of \
                     server.max_answer_bytes_in_flight ({}); retry with backoff",
                    shared.held.load(Ordering::Relaxed),
                    shared.max
                )
            }
        };
        debug!(%message, "answer refused");
        if grpc {
            grpc_error(Status::resource_exhausted(message))
        } else {
            let body = Json(serde_json::json!({ "error": message }));
            (StatusCode::SERVICE_UNAVAILABLE, [(RETRY_AFTER, "1")], body).into_response()
        }
    }

    fn charge(&self, stream: &Stream, bytes: usize) {
        stream.held.fetch_add(bytes, Ordering::Relaxed);
        self.held.fetch_add(bytes, Ordering::Relaxed);
        self.answers.0.held.fetch_add(bytes, Ordering::Relaxed);
    }

    fn release(&self, stream: &Stream, bytes: usize) {
        stream.held.fetch_sub(bytes, Ordering::Relaxed);
        self.held.fetch_sub(bytes, Ordering::Relaxed);
        self.answers.0.held.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// One stream's answer, seen by its body (which charges and hands on its bytes) and by its
/// send deadline (which watches them).
#[derive(Default)]
struct Stream {
    /// Bytes of this stream's answer built and not yet taken.
    held: AtomicUsize,
    /// Slices handed on and bytes written so far: each step means the client took some.
    progress: AtomicU64,
}

tokio::task_local! {
    /// The stream whose task is being polled: set by [`StreamExecutor`] around each poll,
    /// so that the answer's body, built inside, reports to the deadline outside.
    static STREAM: Arc<Stream>;
}

/// The layer of one connection; its service charges the answers of the connection's calls.
#[derive(Clone)]
pub struct ConnectionAnswers(Arc<Connection>);

impl<S> Layer<S> for ConnectionAnswers {
    type Service = Answered<S>;

    fn layer(&self, inner: S) -> Answered<S> {
        Answered {
            connection: self.0.clone(),
            inner,
        }
    }
}

/// A connection's routes, refusing new calls while its answers fill its share.
#[derive(Clone)]
pub struct Answered<S> {
    connection: Arc<Connection>,
    inner: S,
}

impl<S, B> Service<http::Request<B>> for Answered<S>
where
    S: Service<http::Request<B>, Response = Response, Error = Infallible>,
{
    type Response = http::Response<AnswerBody>;
    type Error = Infallible;
    type Future = Answering<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let connection = self.connection.clone();
        if let Err(over) = connection.admit() {
            let refusal = connection.refusal(over, None, is_grpc(&request));
            return Answering {
                state: AnsweringState::Refused {
                    response: Some(refusal),
                    connection,
                },
            };
        }
        Answering {
            state: AnsweringState::Calling {
                call: self.inner.call(request),
                connection,
            },
        }
    }
}

pin_project! {
    /// A call on its way to its answer.
    pub struct Answering<F> {
        #[pin]
        state: AnsweringState<F>,
    }
}

pin_project! {
    #[project = AnsweringProj]
    enum AnsweringState<F> {
        Refused { response: Option<Response>, connection: Arc<Connection> },
        Calling { #[pin] call: F, connection: Arc<Connection> },
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for Answering<F> {
    type Output = Result<http::Response<AnswerBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (response, connection) = match self.project().state.project() {
            AnsweringProj::Refused {
                response,
                connection,
            } => {
                let response = response.take().expect("polled after completion");
                (response, connection.clone())
            }
            AnsweringProj::Calling { call, connection } => {
                let Ok(response) = ready!(call.poll(cx));
                (response, connection.clone())
            }
        };
        // Outside an HTTP/2 stream's task (HTTP/1.1) the answer has no deadline of its own.
        let stream = STREAM
            .try_with(Arc::clone)
            .unwrap_or_else(|_| Arc::default());
        let (parts, body) = response.into_parts();
        let mut body = AnswerBody {
            body,
            data: Bytes::new(),
            ahead: None,
            stream,
            connection,
        };
        // A unary answer is built by now: its body yields it whole at once, encoded. Taking
        // it here counts it before its headers go, and a large read that does not fit can
        // still be refused instead.
        if !body.read_ahead(cx)
            || body.data.len() <= ALWAYS_DELIVERED
            || parts.extensions.get::<Committed>().is_some()
            || !is_grpc_answer(&parts)
        {
            body.charge_read();
            return Poll::Ready(Ok(http::Response::from_parts(parts, body)));
        }
        let bytes = body.data.len();
        if !body.ends_after_data(cx) {
            // A stream (Subscribe): its messages are never refused; its queue bounds it.
            body.charge_read();
            return Poll::Ready(Ok(http::Response::from_parts(parts, body)));
        }
        if let Err(over) = body.connection.fits(bytes) {
            let refusal = body.connection.refusal(over, Some(bytes), true);
            let connection = body.connection.clone();
            let stream = body.stream.clone();
            // Never counted: dropped here, not released.
            body.data = Bytes::new();
            body.ahead = None;
            drop(body);
            let (parts, inner) = refusal.into_parts();
            let refused = AnswerBody {
                body: inner,
                data: Bytes::new(),
                ahead: None,
                stream,
                connection,
            };
            return Poll::Ready(Ok(http::Response::from_parts(parts, refused)));
        }
        body.charge_read();
        Poll::Ready(Ok(http::Response::from_parts(parts, body)))
    }
}

/// Whether `parts` answer a gRPC call: only those are replaced by a status.
fn is_grpc_answer(parts: &http::response::Parts) -> bool {
    parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// An answer's body: what it has built is counted until taken, and handed on in slices.
pub struct AnswerBody {
    body: axum::body::Body,
    /// Of the current data frame, the bytes not yet handed on; counted.
    data: Bytes,
    /// A frame read ahead of `data`; counted if it is data.
    ahead: Option<Result<Frame<Bytes>, axum::Error>>,
    stream: Arc<Stream>,
    connection: Arc<Connection>,
}

impl AnswerBody {
    /// Reads the first frame if it is ready; whether it was data.
    fn read_ahead(&mut self, cx: &mut Context<'_>) -> bool {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    self.data = data;
                    true
                }
                Err(frame) => {
                    self.ahead = Some(Ok(frame));
                    false
                }
            },
            Poll::Ready(Some(Err(err))) => {
                self.ahead = Some(Err(err));
                false
            }
            Poll::Ready(None) | Poll::Pending => false,
        }
    }

    /// Whether the answer ends after `data` (trailers or the end, ready now): a complete
    /// answer, not a stream.
    fn ends_after_data(&mut self, cx: &mut Context<'_>) -> bool {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(None) => true,
            Poll::Ready(Some(frame)) => {
                let trailers = frame.as_ref().is_ok_and(Frame::is_trailers);
                self.ahead = Some(frame);
                trailers
            }
            Poll::Pending => false,
        }
    }

    /// Counts what was read ahead.
    fn charge_read(&self) {
        let ahead = match &self.ahead {
            Some(Ok(frame)) => frame.data_ref().map_or(0, Bytes::len),
            _ => 0,
        };
        self.connection
            .charge(&self.stream, self.data.len() + ahead);
    }

    fn counted(&self) -> usize {
        let ahead = match &self.ahead {
            Some(Ok(frame)) => frame.data_ref().map_or(0, Bytes::len),
            _ => 0,
        };
        self.data.len() + ahead
    }
}

impl Drop for AnswerBody {
    fn drop(&mut self) {
        let counted = self.counted();
        if counted > 0 {
            self.connection.release(&self.stream, counted);
        }
    }
}

impl hyper::body::Body for AnswerBody {
    type Data = Charged;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Charged>, axum::Error>>> {
        let this = &mut *self;
        loop {
            if !this.data.is_empty() {
                let slice = this.data.split_to(this.data.len().min(SLICE_BYTES));
                this.stream.progress.fetch_add(1, Ordering::Relaxed);
                return Poll::Ready(Some(Ok(Frame::data(Charged {
                    bytes: slice,
                    stream: this.stream.clone(),
                    connection: this.connection.clone(),
                }))));
            }
            let frame = match this.ahead.take() {
                Some(frame) => frame,
                None => match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                    Some(frame) => {
                        if let Some(data) = frame.as_ref().ok().and_then(Frame::data_ref) {
                            this.connection.charge(&this.stream, data.len());
                        }
                        frame
                    }
                    None => return Poll::Ready(None),
                },
            };
            match frame.map(Frame::into_data) {
                Ok(Ok(data)) => this.data = data,
                Ok(Err(frame)) => {
                    let frame = frame.map_data(|_| unreachable!("not a data frame"));
                    return Poll::Ready(Some(Ok(frame)));
                }
                Err(err) => return Poll::Ready(Some(Err(err))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty() && self.ahead.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.body.size_hint();
        let extra = self.counted() as u64;
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + extra);
        }
        hint.set_lower(hint.lower() + extra);
        hint
    }
}

/// A slice of an answer, counted until hyper or h2 drops it: once written to the socket,
/// or when its stream is reset.
pub struct Charged {
    bytes: Bytes,
    stream: Arc<Stream>,
    connection: Arc<Connection>,
}

impl Drop for Charged {
    fn drop(&mut self) {
        self.connection.release(&self.stream, self.bytes.len());
    }
}

impl Buf for Charged {
    fn remaining(&self) -> usize {
        self.bytes.remaining()
    }

    fn chunk(&self) -> &[u8] {
        self.bytes.chunk()
    }

    fn advance(&mut self, cnt: usize) {
        // Written bytes are taken: they stop counting at once, not when the slice is dropped.
        self.connection
            .release(&self.stream, cnt.min(self.bytes.len()));
        self.bytes.advance(cnt);
    }
}

/// The executor hyper spawns each HTTP/2 stream with: the stream's future runs under its
/// send deadline. This is the one place that sees a stream whose body is no longer polled
/// because its window is shut.
#[derive(Clone)]
pub struct StreamExecutor(Answers);

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(Sending {
            inner: future,
            stream: Arc::default(),
            answers: self.0.clone(),
            watch: None,
        });
    }
}

pin_project! {
    /// One HTTP/2 stream's future, dropped (h2 then resets the stream with CANCEL and drops
    /// what it queued) once its answer has made no progress for `server.send_timeout`.
    struct Sending<F> {
        #[pin]
        inner: F,
        stream: Arc<Stream>,
        answers: Answers,
        watch: Option<Watch>,
    }
}

/// The deadline of an answer that waits for its client.
struct Watch {
    /// [`Stream::progress`] when the deadline was set; `None` while nothing waits.
    seen: Option<u64>,
    deadline: Pin<Box<Sleep>>,
}

impl<F: Future> Future for Sending<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let stream = this.stream.clone();
        if STREAM
            .sync_scope(stream, || this.inner.as_mut().poll(cx))
            .is_ready()
        {
            return Poll::Ready(());
        }
        // Nothing built waits: the stream waits for its request or its next event, which is
        // not the client's doing.
        if this.stream.held.load(Ordering::Relaxed) == 0 {
            if let Some(watch) = this.watch {
                watch.seen = None;
            }
            return Poll::Pending;
        }
        let timeout = this.answers.0.send_timeout;
        let progress = this.stream.progress.load(Ordering::Relaxed);
        let watch = this.watch.get_or_insert_with(|| Watch {
            seen: None,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        });
        if watch.seen != Some(progress) {
            watch.seen = Some(progress);
            watch.deadline.as_mut().reset(Instant::now() + timeout);
        }
        if watch.deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.answers.0.metrics.refused(LimitKey::SendTimeout);
        debug!(
            held = this.stream.held.load(Ordering::Relaxed),
            send_timeout = %humantime::format_duration(timeout),
            "an answer made no progress for server.send_timeout; resetting its stream"
        );
        Poll::Ready(())
    }
}
