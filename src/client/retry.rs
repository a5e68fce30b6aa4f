//! When a failed call is tried again: the policy a client is built with, the pacing between
//! attempts, and which failures are safe to repeat for a read and for a write.

use std::error::Error as _;
use std::time::Duration;

use tokio::time::Instant;
use tonic::{Code, Status};

use super::Error;

/// How a [`Client`](super::Client) retries. Reads (get, list pages, batches of gets, health,
/// opening a subscription) are retried after any failure of the connection or an
/// UNAVAILABLE answer; writes only after a failure that proves they were never sent (the
/// connection could not be made), because a write cut off in flight may have been applied,
/// and repeating it would apply it twice (as etcd's Go client does for Put). Every retry
/// after a connection failure goes to the next endpoint. Statuses the server chose
/// (INVALID_ARGUMENT, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, ...) and a call's own
/// deadline are never retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    attempts: u32,
    first_delay: Duration,
    max_delay: Duration,
    resume_for: Duration,
}

impl Default for RetryPolicy {
    /// Three attempts per call; 100 ms before the first retry, doubling up to 5 s; a
    /// subscription keeps trying to resume for 30 s.
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            resume_for: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Tries per call, the first included; 1 turns retries of calls off (at least 1). A
    /// subscription's resumption is governed by [`RetryPolicy::resume_for`] instead.
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// The wait before the first retry; each further one doubles it, up to `max`.
    pub fn delays(mut self, first: Duration, max: Duration) -> Self {
        self.first_delay = first;
        self.max_delay = max.max(first);
        self
    }

    /// How long a subscription keeps failing to resubscribe, with no subscription accepted
    /// in between, before it ends with [`Error::GaveUp`].
    pub fn resume_for(mut self, window: Duration) -> Self {
        self.resume_for = window;
        self
    }

    pub(crate) fn max_attempts(&self) -> u32 {
        self.attempts
    }

    pub(crate) fn backoff(&self) -> Backoff {
        Backoff {
            policy: self.clone(),
            delay: Duration::ZERO,
            failing_since: None,
        }
    }
}

/// Paces attempts: the first retry waits nothing (it goes to the next endpoint, and a lag or
/// a drain is resumed at once), then each failure doubles the delay from the policy's first
/// to its max, so a server that accepts and at once drops us is not hammered.
#[derive(Debug)]
pub(crate) struct Backoff {
    policy: RetryPolicy,
    delay: Duration,
    failing_since: Option<Instant>,
}

impl Backoff {
    /// A subscription delivered an event: the next resumption starts without a wait.
    pub(crate) fn delivered(&mut self) {
        self.delay = Duration::ZERO;
    }

    /// A subscription was accepted: the give-up window starts again.
    pub(crate) fn accepted(&mut self) {
        self.failing_since = None;
    }

    /// [`Error::GaveUp`] once resubscribing has failed for [`RetryPolicy::resume_for`]
    /// without a break; `reason` is the last failure.
    pub(crate) fn gave_up(&self, reason: Error) -> Option<Error> {
        let since = self.failing_since?;
        (since.elapsed() >= self.policy.resume_for).then(|| Error::GaveUp {
            after: self.policy.resume_for,
            reason: Box::new(reason),
        })
    }

    /// Sleeps the current delay and doubles the next.
    pub(crate) async fn wait(&mut self) {
        self.failing_since.get_or_insert_with(Instant::now);
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).clamp(self.policy.first_delay, self.policy.max_delay);
    }
}

/// What a failed attempt tells about the request, for deciding whether to repeat it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The connection could not be made: nothing was sent, any call may be repeated.
    NotSent,
    /// The connection broke, or a server refused with UNAVAILABLE (draining): a read may be
    /// repeated, elsewhere; a write may have been applied.
    Lost,
    /// An answer to respect, not to repeat.
    Final,
}

impl Failure {
    pub(crate) fn of(err: &Error) -> Failure {
        match err {
            Error::Connect(_) => Failure::NotSent,
            Error::Status(status) => Failure::of_status(status),
            _ => Failure::Final,
        }
    }

    /// tonic keeps the transport's error as the status's source (the server's own statuses
    /// have none) and marks a failure to connect with a `ConnectError` in that chain.
    pub(crate) fn of_status(status: &Status) -> Failure {
        let chain = std::iter::successors(status.source(), |&err| err.source());
        let mut timed_out = false;
        for err in chain {
            if err.is::<tonic::ConnectError>() {
                return Failure::NotSent;
            }
            timed_out |= err.is::<tonic::TimeoutExpired>();
        }
        match status.code() {
            _ if timed_out => Failure::Final,
            Code::Unavailable => Failure::Lost,
            Code::Unknown | Code::Internal | Code::Cancelled if status.source().is_some() => {
                Failure::Lost
            }
            _ => Failure::Final,
        }
    }

    /// Whether the failure says the connection it happened on is no longer worth using.
    pub(crate) fn drops_connection(self) -> bool {
        self != Failure::Final
    }

    /// Whether the call may be repeated: a read after any but a final failure, a write only
    /// when it was never sent.
    pub(crate) fn retryable(self, write: bool) -> bool {
        match self {
            Failure::NotSent => true,
            Failure::Lost => !write,
            Failure::Final => false,
        }
    }
}
