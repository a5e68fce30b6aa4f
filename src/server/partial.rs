//! Follows a connection's HTTP/2 frames (after TLS), parsing only their 9-byte headers, both
//! ways. It holds a request partly received to `server.handshake_timeout`, whatever the
//! connection did before: for HTTP/1.1 it notes bytes arriving while no request is open, and
//! it fails the read once a frame or request has been incomplete for that long. And it
//! charges frames that do no work to the connection's [`ControlBudget`]. Only the clock and
//! the budget are here; `serve_http` decides everything else about the connection's life.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::conn::{Activity, Quiet};
use super::control::{ControlBudget, FrameHeader};

/// The client's first bytes on an HTTP/2 connection (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The size of an HTTP/2 frame header: length (24 bits), type, flags, stream id.
const FRAME_HEADER: usize = 9;

/// Where the bytes received so far stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes of the HTTP/2 preface have matched; the protocol is not known yet.
    Preface(usize),
    /// HTTP/1.1: requests have no framing this follows; see [`Partial::partial_since`].
    /// This assumes every byte belongs to a request: no route answers 101, so no connection
    /// is ever upgraded to another protocol (one that was would be cut by this clock).
    Http1,
    /// HTTP/2: `header` bytes of a frame header are in, or `payload` bytes of the current
    /// frame's payload are still to come.
    Http2 {
        header: [u8; FRAME_HEADER],
        have: usize,
        payload: u32,
    },
}

impl Framing {
    /// Where the server's own bytes start: it sends no preface.
    fn http2() -> Self {
        Self::Http2 {
            header: [0; FRAME_HEADER],
            have: 0,
            payload: 0,
        }
    }

    /// Follows `bytes`, handing each complete frame header to `frame`; returns whether a
    /// frame (or the preface) ended among them.
    fn consume(&mut self, mut bytes: &[u8], frame: &mut impl FnMut(FrameHeader)) -> bool {
        let mut ended = false;
        while !bytes.is_empty() {
            match self {
                Self::Preface(matched) => {
                    let take = (PREFACE.len() - *matched).min(bytes.len());
                    if bytes[..take] != PREFACE[*matched..*matched + take] {
                        *self = Self::Http1;
                        return ended;
                    }
                    *matched += take;
                    bytes = &bytes[take..];
                    if *matched == PREFACE.len() {
                        ended = true;
                        *self = Self::http2();
                    }
                }
                Self::Http1 => return ended,
                Self::Http2 {
                    header,
                    have,
                    payload,
                } => {
                    if *payload > 0 {
                        let take = (*payload as usize).min(bytes.len());
                        *payload -= take as u32;
                        bytes = &bytes[take..];
                        ended |= *payload == 0;
                        continue;
                    }
                    let take = (FRAME_HEADER - *have).min(bytes.len());
                    header[*have..*have + take].copy_from_slice(&bytes[..take]);
                    *have += take;
                    bytes = &bytes[take..];
                    if *have == FRAME_HEADER {
                        *have = 0;
                        let header = FrameHeader::parse(header);
                        *payload = header.len;
                        ended |= *payload == 0;
                        frame(header);
                    }
                }
            }
        }
        ended
    }

    /// Whether the bytes so far end inside the preface or a frame; `None` for HTTP/1.1.
    fn mid_frame(&self) -> Option<bool> {
        match *self {
            Self::Preface(matched) => Some(matched > 0),
            Self::Http1 => None,
            Self::Http2 { have, payload, .. } => Some(have > 0 || payload > 0),
        }
    }
}

/// A connection's byte stream, whose reads fail with `TimedOut` once a request or frame has
/// been partly received for longer than `timeout`, and fail for good once the client's
/// frames that do no work have spent its budget. Writes pass through, followed on HTTP/2 to
/// credit the budget, until then.
pub(super) struct Partial<S> {
    inner: S,
    framing: Framing,
    /// The server's frames, once the client's preface says HTTP/2.
    sent: Option<Framing>,
    budget: ControlBudget,
    /// Set once the budget is spent: the connection is being closed.
    flooded: bool,
    /// When the incomplete frame or request began arriving.
    since: Option<Instant>,
    timeout: Duration,
    /// Made the first time a read waits on a partial request, then reset: most connections
    /// never need one.
    sleep: Option<Pin<Box<Sleep>>>,
    activity: Arc<Activity>,
}

impl<S> Partial<S> {
    pub(super) fn new(
        inner: S,
        activity: Arc<Activity>,
        timeout: Duration,
        max_control_frames: u32,
    ) -> Self {
        Self {
            inner,
            framing: Framing::Preface(0),
            sent: None,
            budget: ControlBudget::new(max_control_frames),
            flooded: false,
            since: None,
            timeout,
            sleep: None,
            activity,
        }
    }

    /// Follows what the client sent; false if its frames have spent the budget.
    fn received(&mut self, bytes: &[u8]) -> bool {
        let mut within = true;
        let budget = &mut self.budget;
        let ended = self
            .framing
            .consume(bytes, &mut |frame| within &= budget.received(frame));
        if self.sent.is_none() && matches!(self.framing, Framing::Http2 { .. }) {
            // hyper writes nothing before it has read the whole preface.
            self.sent = Some(Framing::http2());
        }
        // The clock is read only when a partial request begins: most reads end on a frame
        // boundary, or while a request is open.
        self.since = match self.framing.mid_frame() {
            // A new frame began after the last one ended: its own clock.
            Some(true) if ended => Some(Instant::now()),
            Some(true) => Some(self.since.unwrap_or_else(Instant::now)),
            Some(false) => None,
            // HTTP/1.1: bytes while no request is open begin a request (or trail one the
            // server answered early); bytes while one is open are its body.
            None => match self.activity.quiet() {
                Quiet::Busy => self.since,
                Quiet::NeverUsed | Quiet::Since(_) => Some(self.since.unwrap_or_else(Instant::now)),
            },
        };
        within
    }

    /// Follows what the server wrote: its frames the client answers credit the budget.
    fn wrote(&mut self, bytes: &[u8]) {
        if let Some(sent) = &mut self.sent {
            let budget = &mut self.budget;
            sent.consume(bytes, &mut |frame| budget.sent(frame));
        }
    }

    /// When the partial request or frame began, if there is one.
    fn partial_since(&mut self) -> Option<Instant> {
        let since = self.since?;
        if self.framing == Framing::Http1 {
            // A request that opened, or ended, since the bytes began arriving has taken them:
            // they were its head (and body), not a request still coming.
            match self.activity.quiet() {
                Quiet::Busy => self.since = None,
                Quiet::Since(end) if end >= since => self.since = None,
                Quiet::Since(_) | Quiet::NeverUsed => {}
            }
        }
        self.since
    }
}

impl<S: AsyncWrite + Unpin> Partial<S> {
    /// Ends a connection whose frames spent the budget: writes the GOAWAY itself, since
    /// hyper only drops a connection whose read failed, without a word. It is written only
    /// between two of the server's frames, and only as far as the socket takes it at once:
    /// a client that does not read gets no time bought by it.
    fn go_away(&mut self, cx: &mut Context<'_>) {
        self.flooded = true;
        self.activity.control_flood.store(true, Ordering::Relaxed);
        if self.sent.as_ref().and_then(Framing::mid_frame) != Some(false) {
            return;
        }
        let frame = self.budget.goaway();
        let mut written = 0;
        while written < frame.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &frame[written..]) {
                Poll::Ready(Ok(n)) if n > 0 => written += n,
                _ => return,
            }
        }
        // The connection is dropped next: a TLS stream must hand its record to the socket
        // now. Whether it could is not waited for.
        let _ = Pin::new(&mut self.inner).poll_flush(cx);
    }
}

fn flooded() -> io::Error {
    io::Error::other("frames that do no work spent server.max_control_frames")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Partial<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.flooded {
            return Poll::Ready(Err(flooded()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if !read.is_empty() && !this.received(read) {
                    this.go_away(cx);
                    return Poll::Ready(Err(flooded()));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                // The peer has sent nothing more for now: a partial request is held to its
                // clock, which wakes this read when it runs out.
                let Some(since) = this.partial_since() else {
                    return Poll::Pending;
                };
                let deadline = since + this.timeout;
                let sleep = match &mut this.sleep {
                    Some(sleep) => {
                        if sleep.deadline() != deadline {
                            sleep.as_mut().reset(deadline);
                        }
                        sleep
                    }
                    None => this
                        .sleep
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.activity
                    .partial_timed_out
                    .store(true, Ordering::Relaxed);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "a request was partly received for longer than server.handshake_timeout",
                )))
            }
            failed => failed,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Partial<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.flooded {
            return Poll::Ready(Err(flooded()));
        }
        let written = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.wrote(&buf[..written]);
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.flooded {
            return Poll::Ready(Err(flooded()));
        }
        let written = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        let mut left = written;
        for buf in bufs {
            if left == 0 {
                break;
            }
            let take = left.min(buf.len());
            this.wrote(&buf[..take]);
            left -= take;
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32) -> Vec<u8> {
        let mut frame = len.to_be_bytes()[1..].to_vec();
        frame.extend([0u8; 6]);
        frame.extend(std::iter::repeat_n(7u8, len as usize));
        frame
    }

    #[test]
    fn frames_are_followed_across_reads_of_any_size() {
        let mut bytes = PREFACE.to_vec();
        for len in [0, 5, 1, 300] {
            bytes.extend(frame(len));
        }
        let boundaries = [24, 33, 47, 57, 366];
        for chunk in [1, 2, 7, 9, 64, bytes.len()] {
            let mut framing = Framing::Preface(0);
            let mut at = 0;
            for piece in bytes.chunks(chunk) {
                framing.consume(piece, &mut |_| {});
                at += piece.len();
                assert_eq!(
                    framing.mid_frame(),
                    Some(!boundaries.contains(&at)),
                    "chunk {chunk}, at {at}"
                );
            }
        }
    }

    #[test]
    fn anything_but_the_preface_is_http1() {
        let mut framing = Framing::Preface(0);
        framing.consume(b"PRI * HTTP/1.1", &mut |_| {});
        assert_eq!(framing.mid_frame(), None);
        let mut framing = Framing::Preface(0);
        assert!(!framing.consume(b"P", &mut |_| {}));
        assert_eq!(framing.mid_frame(), Some(true));
        framing.consume(b"OST / HTTP/1.1\r\n", &mut |_| {});
        assert_eq!(framing, Framing::Http1);
    }
}
