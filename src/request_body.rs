//! gRPC request messages on their way in, on every gRPC route: each is held to a size, to a
//! time to arrive (`server.request_body_timeout`) and to a share of one budget of bytes still
//! arriving (`server.max_request_bytes_in_flight`). A call with one request message (every
//! KeyValueStore method, health) is read whole before its service is called, so the guard
//! gives it a place only once its message is here; a streaming request (reflection) is
//! checked message by message as its service reads it. The messages themselves are tonic's.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http::request::Parts;
use hyper::body::{Body as _, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tonic::Status;
use tower::{Layer, Service};

use crate::http::grpc_error;
use crate::metrics::{LimitKey, Metrics};

/// The bytes before each gRPC message: a compressed flag and a 4-byte length.
pub const PREFIX_BYTES: usize = 5;

/// The budget and timeout shared by every gRPC route; [`RequestBodies::whole`] and
/// [`RequestBodies::streaming`] make the layer for one route.
#[derive(Clone)]
pub struct RequestBodies(Arc<Shared>);

struct Shared {
    /// Bytes reserved by the messages still arriving, against `max_bytes`.
    reserved: AtomicUsize,
    max_bytes: usize,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl RequestBodies {
    /// Messages still arriving may reserve `max_bytes` together, and each must arrive within
    /// `timeout`. Refusals are counted in `metrics`.
    pub fn new(max_bytes: usize, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self(Arc::new(Shared {
            reserved: AtomicUsize::new(0),
            max_bytes,
            timeout,
            metrics,
        }))
    }

    /// The layer of a route whose calls carry exactly one request message of at most
    /// `max_message` bytes: the message is read whole before the service is called.
    pub fn whole(&self, max_message: usize) -> ReadWhole {
        ReadWhole {
            bodies: self.clone(),
            max_message,
        }
    }

    /// The layer of a route whose calls stream request messages of at most `max_message`
    /// bytes each: each is checked as the service reads it.
    pub fn streaming(&self, max_message: usize) -> CheckStreaming {
        CheckStreaming {
            bodies: self.clone(),
            max_message,
        }
    }

    /// Bytes reserved by messages still arriving.
    pub fn in_flight(&self) -> usize {
        self.0.reserved.load(Ordering::Relaxed)
    }

    /// Makes `reservation` cover `bytes`, or says why not.
    fn cover(&self, reservation: &mut Option<Reservation>, bytes: usize) -> Result<(), Status> {
        let held = reservation.as_ref().map_or(0, |r| r.bytes);
        if bytes <= held {
            return Ok(());
        }
        let more = bytes - held;
        let shared = &self.0;
        let taken = shared
            .reserved
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                n.checked_add(more).filter(|&n| n <= shared.max_bytes)
            });
        if taken.is_err() {
            shared.metrics.refused(LimitKey::MaxRequestBytesInFlight);
            return Err(Status::resource_exhausted(format!(
                "server is busy receiving other requests: a message of {bytes} bytes does not fit in \
                 the {} bytes of server.max_request_bytes_in_flight; retry with backoff",
                shared.max_bytes
            )));
        }
        reservation
            .get_or_insert_with(|| Reservation {
                bodies: self.clone(),
                bytes: 0,
            })
            .bytes = bytes;
        Ok(())
    }

    fn timed_out(&self) -> Status {
        self.0.metrics.refused(LimitKey::RequestBodyTimeout);
        Status::deadline_exceeded(format!(
            "the request message did not arrive within {} (server.request_body_timeout); \
             nothing was processed",
            humantime::format_duration(self.0.timeout)
        ))
    }

    fn deadline(&self) -> Pin<Box<Sleep>> {
        Box::pin(tokio::time::sleep(self.0.timeout))
    }
}

/// Bytes of the budget held by one message still arriving, given back when dropped.
struct Reservation {
    bodies: RequestBodies,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.bodies
            .0
            .reserved
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Where a request body is in gRPC's framing: each message is a [`PREFIX_BYTES`] prefix
/// giving its length, then that many bytes.
#[derive(Debug, Default)]
struct Framing {
    prefix: [u8; PREFIX_BYTES],
    /// Bytes of the current message's prefix seen; 0 between messages and in a payload.
    in_prefix: usize,
    /// Bytes of the current message's payload still to come.
    remaining: usize,
    /// The current message's size, prefix included, as far as it is known.
    size: usize,
    /// Messages begun.
    messages: usize,
}

impl Framing {
    /// Follows the framing through `chunk`; `Err` with the length of a message that declares
    /// more than `max` bytes, as soon as its prefix is seen.
    fn advance(&mut self, mut chunk: &[u8], max: usize) -> Result<(), usize> {
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(chunk.len());
                self.remaining -= n;
                chunk = &chunk[n..];
                continue;
            }
            if self.in_prefix == 0 {
                self.messages += 1;
                self.size = PREFIX_BYTES;
            }
            let n = (PREFIX_BYTES - self.in_prefix).min(chunk.len());
            self.prefix[self.in_prefix..self.in_prefix + n].copy_from_slice(&chunk[..n]);
            self.in_prefix += n;
            chunk = &chunk[n..];
            if self.in_prefix == PREFIX_BYTES {
                let [_, length @ ..] = self.prefix;
                let length = u32::from_be_bytes(length) as usize;
                if length > max {
                    return Err(length);
                }
                self.in_prefix = 0;
                self.remaining = length;
                self.size = PREFIX_BYTES + length;
            }
        }
        Ok(())
    }

    /// Whether a message has begun and not ended.
    fn partial(&self) -> bool {
        self.in_prefix > 0 || self.remaining > 0
    }
}

/// tonic's own words for a message over the decode limit, so that a client sees the same
/// answer whichever of the two refuses it.
fn too_large(length: usize, max: usize) -> Status {
    Status::out_of_range(format!(
        "decoded message length too large: found {length} bytes, the limit is: {max} bytes"
    ))
}

/// A body error (usually the client resetting the stream), as tonic would report it.
fn body_error(err: axum::Error) -> Status {
    Status::from_error(Box::new(err))
}

/// The layer of [`RequestBodies::whole`].
#[derive(Clone)]
pub struct ReadWhole {
    bodies: RequestBodies,
    max_message: usize,
}

impl<S> Layer<S> for ReadWhole {
    type Service = ReadingWhole<S>;

    fn layer(&self, inner: S) -> ReadingWhole<S> {
        ReadingWhole {
            layer: self.clone(),
            inner,
        }
    }
}

/// A service whose calls carry one request message, called once that message is here.
#[derive(Clone)]
pub struct ReadingWhole<S> {
    layer: ReadWhole,
    inner: S,
}

impl<S> Service<http::Request<Body>> for ReadingWhole<S>
where
    S: Service<http::Request<Buffered>, Response = Response, Error = Infallible> + Clone,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Reading<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The service that was made ready is the one called, once the message is here.
        let ready = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, ready);
        let (parts, body) = request.into_parts();
        Reading {
            state: ReadState::Reading {
                read: Some(Read {
                    service,
                    parts,
                    body,
                    first: None,
                    more: BytesMut::new(),
                    trailers: None,
                    framing: Framing::default(),
                    max: self.layer.max_message,
                    bodies: self.layer.bodies.clone(),
                    deadline: None,
                    reservation: None,
                }),
            },
        }
    }
}

/// One call's request, being read.
struct Read<S> {
    service: S,
    parts: Parts,
    body: Body,
    /// The body's first chunk as received; once a second arrives, both are in `more`.
    first: Option<Bytes>,
    more: BytesMut,
    trailers: Option<HeaderMap>,
    framing: Framing,
    max: usize,
    bodies: RequestBodies,
    /// Set only once the body has to be waited for: a Get's arrives with its headers, and a
    /// timer made and cancelled for each would cost it about 2% of its server CPU.
    deadline: Option<Pin<Box<Sleep>>>,
    reservation: Option<Reservation>,
}

impl<S> Read<S> {
    /// Reads until the end of the body, or a reason to refuse the call.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        loop {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => self.take(data)?,
                    Err(frame) => self.trailers = frame.into_trailers().ok(),
                },
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Err(body_error(err))),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return self.wait(cx),
            }
        }
    }

    fn take(&mut self, data: Bytes) -> Result<(), Status> {
        if data.is_empty() {
            return Ok(());
        }
        self.framing
            .advance(&data, self.max)
            .map_err(|length| too_large(length, self.max))?;
        if self.framing.messages > 1 {
            // What grpc-go and grpc-java answer; tonic would read on and drop the rest.
            return Err(Status::internal(
                "protocol violation: this method takes one request message and the call \
                 carried more",
            ));
        }
        match self.first.take() {
            None if self.more.is_empty() => self.first = Some(data),
            first => {
                // Held to one message, whose size the framing has checked.
                self.more
                    .reserve(self.framing.size.saturating_sub(self.more.len()));
                if let Some(first) = first {
                    self.more.extend_from_slice(&first);
                }
                self.more.extend_from_slice(&data);
            }
        }
        Ok(())
    }

    /// The body has more to come: the message's bytes are reserved, and the deadline runs.
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        let buffered = self.first.as_ref().map_or(self.more.len(), Bytes::len);
        self.bodies
            .cover(&mut self.reservation, self.framing.size.max(buffered))?;
        let bodies = &self.bodies;
        let deadline = self.deadline.get_or_insert_with(|| bodies.deadline());
        ready!(deadline.as_mut().poll(cx));
        Poll::Ready(Err(self.bodies.timed_out()))
    }

    /// The request, with its body as read, and the service to call with it.
    fn finish(self) -> (S, http::Request<Buffered>) {
        let data = match self.first {
            Some(first) => Some(first),
            None if self.more.is_empty() => None,
            None => Some(self.more.freeze()),
        };
        let body = Buffered {
            data,
            trailers: self.trailers,
        };
        (self.service, http::Request::from_parts(self.parts, body))
    }
}

pin_project! {
    /// A call whose request is being read; then the call itself.
    pub struct Reading<S: Service<http::Request<Buffered>>> {
        #[pin]
        state: ReadState<S, S::Future>,
    }
}

pin_project! {
    #[project = ReadStateProj]
    enum ReadState<S, F> {
        // `None` once answered with a refusal.
        Reading { read: Option<Read<S>> },
        Calling { #[pin] call: F },
    }
}

impl<S> Future for Reading<S>
where
    S: Service<http::Request<Buffered>, Response = Response, Error = Infallible>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        let (mut service, request) = match state.as_mut().project() {
            ReadStateProj::Calling { call } => return call.poll(cx),
            ReadStateProj::Reading { read } => {
                let reading = read.as_mut().expect("polled after completion");
                match ready!(reading.poll_read(cx)) {
                    Ok(()) => read.take().expect("just read").finish(),
                    Err(status) => {
                        // Drops the body and gives back the reservation now.
                        *read = None;
                        return Poll::Ready(Ok(grpc_error(status)));
                    }
                }
            }
        };
        state.set(ReadState::Calling {
            call: service.call(request),
        });
        match state.project() {
            ReadStateProj::Calling { call } => call.poll(cx),
            ReadStateProj::Reading { .. } => unreachable!("just set"),
        }
    }
}

/// A request body read whole: at most one message, and the trailers if the client sent any.
#[derive(Debug)]
pub struct Buffered {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl hyper::body::Body for Buffered {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let frame = match this.data.take() {
            Some(data) => Frame::data(data),
            None => match this.trailers.take() {
                Some(trailers) => Frame::trailers(trailers),
                None => return Poll::Ready(None),
            },
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// The layer of [`RequestBodies::streaming`].
#[derive(Clone)]
pub struct CheckStreaming {
    bodies: RequestBodies,
    max_message: usize,
}

impl<S> Layer<S> for CheckStreaming {
    type Service = CheckingStreaming<S>;

    fn layer(&self, inner: S) -> CheckingStreaming<S> {
        CheckingStreaming {
            layer: self.clone(),
            inner,
        }
    }
}

/// A service whose request messages are checked as it reads them.
#[derive(Clone)]
pub struct CheckingStreaming<S> {
    layer: CheckStreaming,
    inner: S,
}

impl<S> Service<http::Request<Body>> for CheckingStreaming<S>
where
    S: Service<http::Request<Checked>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> S::Future {
        self.inner.call(request.map(|body| Checked {
            body,
            framing: Framing::default(),
            max: self.layer.max_message,
            bodies: self.layer.bodies.clone(),
            deadline: None,
            reservation: None,
        }))
    }
}

/// A streaming request body whose messages are checked as they pass: one that is too large,
/// does not fit in the budget or does not arrive in time ends the body with that status,
/// which the service reads as the stream's error.
pub struct Checked {
    body: Body,
    framing: Framing,
    max: usize,
    bodies: RequestBodies,
    /// Runs while a message is partly here.
    deadline: Option<Pin<Box<Sleep>>>,
    reservation: Option<Reservation>,
}

impl Checked {
    fn check(&mut self, data: &Bytes) -> Result<(), Status> {
        self.framing
            .advance(data, self.max)
            .map_err(|length| too_large(length, self.max))?;
        if self.framing.partial() {
            self.bodies
                .cover(&mut self.reservation, self.framing.size)?;
            if self.deadline.is_none() {
                self.deadline = Some(self.bodies.deadline());
            }
        } else {
            // The message is whole and in the service's hands.
            self.reservation = None;
            self.deadline = None;
        }
        Ok(())
    }
}

impl hyper::body::Body for Checked {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(status) = this.check(data)
                {
                    this.reservation = None;
                    this.deadline = None;
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(body_error(err)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let Some(deadline) = &mut this.deadline else {
                    return Poll::Pending;
                };
                ready!(deadline.as_mut().poll(cx));
                this.deadline = None;
                this.reservation = None;
                Poll::Ready(Some(Err(this.bodies.timed_out())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn framing_follows_messages_split_anywhere() {
        let mut body = message(b"hello");
        body.extend(message(b""));
        body.extend(message(b"world!"));
        for split in 0..body.len() {
            let mut framing = Framing::default();
            let (a, b) = body.split_at(split);
            framing.advance(a, 100).unwrap();
            framing.advance(b, 100).unwrap();
            assert_eq!(framing.messages, 3, "split at {split}");
            assert!(!framing.partial());
            assert_eq!(framing.size, PREFIX_BYTES + 6);
        }
        let mut framing = Framing::default();
        framing.advance(&body[..3], 100).unwrap();
        assert!(framing.partial());
        assert_eq!(framing.size, PREFIX_BYTES, "only the prefix is known");
        framing.advance(&body[3..7], 100).unwrap();
        assert!(framing.partial());
        assert_eq!(framing.size, PREFIX_BYTES + 5);
    }

    #[test]
    fn a_message_over_the_limit_is_refused_at_its_prefix() {
        let mut framing = Framing::default();
        assert_eq!(framing.advance(&message(&[7; 11])[..5], 10), Err(11));
        let mut framing = Framing::default();
        framing.advance(&message(&[7; 10]), 10).unwrap();
    }

    #[tokio::test]
    async fn reservations_are_held_to_the_budget_and_given_back() {
        let metrics = Arc::new(Metrics::new());
        let bodies = RequestBodies::new(100, Duration::from_secs(1), metrics.clone());
        let mut a = None;
        bodies.cover(&mut a, 60).unwrap();
        bodies.cover(&mut a, 30).unwrap();
        assert_eq!(bodies.in_flight(), 60, "a reservation only grows");
        let mut b = None;
        let refused = bodies.cover(&mut b, 41).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("server.max_request_bytes_in_flight")
        );
        assert_eq!(metrics.refusals(LimitKey::MaxRequestBytesInFlight), 1);
        bodies.cover(&mut b, 40).unwrap();
        assert_eq!(bodies.in_flight(), 100);
        drop(a);
        drop(b);
        assert_eq!(bodies.in_flight(), 0);
    }
}
