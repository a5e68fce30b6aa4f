//! A subscription as a stream that resumes by itself: after a lost connection or a server's
//! drain it subscribes again from the first revision it has not delivered, so no change is
//! lost or repeated; what a resumption cannot hide (compacted history, and a lag unless the
//! caller opts in) ends the stream with an error.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use tonic::Streaming;

use super::retry::{Backoff, Failure};
use super::{Client, Error, Event};
use crate::client::error::last_revision;
use crate::pb;

/// What to subscribe to, and how to continue after a failure. The default: changes from now
/// on, no progress events, resumed after a lost connection or a drain, ended by a lag.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    start_revision: i64,
    initial: bool,
    progress_interval: Option<Duration>,
    resume: bool,
    resume_after_lag: bool,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            start_revision: 0,
            initial: false,
            progress_interval: None,
            resume: true,
            resume_after_lag: false,
        }
    }
}

impl SubscribeOptions {
    /// Changes from now on, resumed after a lost connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// First replay every retained change from `revision` on, then continue live with no gap
    /// and no duplicate. A revision the server no longer retains fails with
    /// [`Error::Compacted`]. Replaces [`SubscribeOptions::initial`].
    pub fn start_revision(mut self, revision: i64) -> Self {
        self.start_revision = revision;
        self.initial = false;
        self
    }

    /// First deliver the current value of every matching key at one revision R (changes with
    /// `initial` set, in key order), then [`Event::Progress`] at R, then live changes from
    /// R + 1. Replaces [`SubscribeOptions::start_revision`].
    pub fn initial(mut self) -> Self {
        self.initial = true;
        self.start_revision = 0;
        self
    }

    /// Have the server send [`Event::Progress`] when the stream has been quiet this long
    /// (whole milliseconds; the server refuses under 100 ms). Also keeps proxies from
    /// closing a quiet stream.
    pub fn progress_interval(mut self, interval: Duration) -> Self {
        self.progress_interval = Some(interval);
        self
    }

    /// Whether to resubscribe after a lost connection or a server's drain (UNAVAILABLE);
    /// on by default. Off, such an end is the stream's last item, an error.
    pub fn resume(mut self, resume: bool) -> Self {
        self.resume = resume;
        self
    }

    /// Whether to resubscribe also after a lag (the server ended the stream with
    /// RESOURCE_EXHAUSTED because the subscriber fell behind). Off by default: the stream
    /// ends with [`Error::Lagged`], so a consumer that cannot keep up learns it. On (with
    /// [`SubscribeOptions::resume`]), the lag is told as [`Event::Resuming`] and the stream
    /// replays what it missed from the server's history.
    pub fn resume_after_lag(mut self, resume: bool) -> Self {
        self.resume_after_lag = resume;
        self
    }
}

/// The changes to every key under a prefix, from [`Client::subscribe`]: a stream of
/// [`Event`]s in increasing revision order. It ends after its first error; it never ends
/// otherwise. Dropping it unsubscribes. Cancel-safe: a `next()` dropped half-way (in a
/// `select!`) loses nothing, the stream keeps its place.
pub struct Subscription {
    inner: Pin<Box<dyn Stream<Item = Result<Event, Error>> + Send>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Subscription")
    }
}

impl Stream for Subscription {
    type Item = Result<Event, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

enum Phase {
    Streaming(Streaming<pb::ChangeEvent>),
    /// Resubscribing, after this failure of the last attempt.
    Resubscribing(Option<Error>),
    Ended,
}

struct State {
    client: Client,
    request: pb::SubscribeRequest,
    options: SubscribeOptions,
    /// The first revision not yet delivered (0 until a snapshot is complete): where a
    /// resumed stream starts. Replay and live events come in increasing revision order, so
    /// every change below it was delivered. A snapshot's events come in key order and say
    /// nothing of the revisions between them; its closing PROGRESS counts for all of them.
    resume_from: i64,
    backoff: Backoff,
    phase: Phase,
}

pub(super) async fn subscribe(
    client: &Client,
    prefix: String,
    options: SubscribeOptions,
) -> Result<Subscription, Error> {
    let mut request = pb::SubscribeRequest {
        key_pattern: prefix,
        start_revision: options.start_revision,
        initial: options.initial,
        progress_interval_ms: options.progress_interval.map_or(0, |interval| {
            i64::try_from(interval.as_millis()).unwrap_or(i64::MAX)
        }),
    };
    if options.resume && request.start_revision == 0 && !request.initial {
        // "From now on" names no revision, and the server cannot say which one a stream
        // began after until it has sent something. Starting at a revision read first lets
        // even a stream lost before its first event resume without a gap.
        request.start_revision = client.revision().await? + 1;
    }
    let stream = client.open_subscription(&request, true).await?;
    let state = State {
        client: client.clone(),
        resume_from: request.start_revision,
        backoff: client.retry_policy().backoff(),
        request,
        options,
        phase: Phase::Streaming(stream),
    };
    let inner = futures_util::stream::unfold(state, |mut state| async move {
        let item = state.next().await?;
        Some((item, state))
    });
    Ok(Subscription {
        inner: Box::pin(inner),
    })
}

impl State {
    async fn next(&mut self) -> Option<Result<Event, Error>> {
        loop {
            match std::mem::replace(&mut self.phase, Phase::Ended) {
                Phase::Ended => return None,
                Phase::Streaming(mut stream) => {
                    let ended = match stream.message().await {
                        Ok(Some(event)) => {
                            self.phase = Phase::Streaming(stream);
                            return Some(Ok(self.deliver(event)));
                        }
                        Ok(None) => Error::EndedWithoutStatus,
                        Err(status) => {
                            // Events already in flight reach us before the trailer, so ours
                            // is usually the same; the higher one is still the safe start.
                            if let Some(last) = last_revision(&status) {
                                self.resume_from = self.resume_from.max(last + 1);
                            }
                            Error::from_stream_end(status)
                        }
                    };
                    if !self.resumable(&ended) {
                        return Some(Err(ended));
                    }
                    let from_revision = if self.resume_from > 0 {
                        self.request.start_revision = self.resume_from;
                        self.request.initial = false;
                        Some(self.resume_from)
                    } else {
                        None
                    };
                    self.phase = Phase::Resubscribing(None);
                    return Some(Ok(Event::Resuming {
                        from_revision,
                        reason: ended,
                    }));
                }
                Phase::Resubscribing(failed) => {
                    if let Some(reason) = failed
                        && let Some(gave_up) = self.backoff.gave_up(reason)
                    {
                        return Some(Err(gave_up));
                    }
                    self.backoff.wait().await;
                    match self.client.open_subscription(&self.request, false).await {
                        Ok(stream) => {
                            self.backoff.accepted();
                            self.phase = Phase::Streaming(stream);
                        }
                        Err(err) if retry_open(&err) => {
                            self.phase = Phase::Resubscribing(Some(err))
                        }
                        Err(err) => return Some(Err(err)),
                    }
                }
            }
        }
    }

    fn deliver(&mut self, event: pb::ChangeEvent) -> Event {
        // Revision 0 is an old server's: it knows no revisions.
        if event.revision > 0 && !event.initial {
            self.resume_from = self.resume_from.max(event.revision + 1);
        }
        self.backoff.delivered();
        Event::from_wire(event)
    }

    /// Whether an established stream that ended with `err` is subscribed again.
    fn resumable(&self, err: &Error) -> bool {
        if !self.options.resume {
            return false;
        }
        match err {
            Error::Lagged { .. } => self.options.resume_after_lag,
            Error::EndedWithoutStatus => true,
            err => Failure::of(err) != Failure::Final,
        }
    }
}

/// Whether a failed resubscription is tried again after the backoff. RESOURCE_EXHAUSTED
/// there is an overload (too many subscriptions, a rate limit), not this subscriber's own
/// slowness, and is waited out like an outage.
fn retry_open(err: &Error) -> bool {
    err.code() == tonic::Code::ResourceExhausted || Failure::of(err) != Failure::Final
}
