//! The client's one error type: what failed, with the gRPC status (and its code) where the
//! server or the transport gave one, shown as `CODE: message` like other gRPC tools.

use std::error::Error as _;
use std::fmt;
use std::time::Duration;

use tonic::{Code, Status};

use crate::pb::trailers::{LAST_REVISION_TRAILER, MOD_REVISION_TRAILER, OLDEST_REVISION_TRAILER};

/// Why a call of [`Client`](super::Client) failed. [`Error::code`] gives the gRPC code of
/// every variant, so a caller can match on codes like with any gRPC client; the variants name
/// the failures that call for something other than a retry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting cannot be used: an endpoint that is not `host:port` or
    /// `http(s)://host:port`, a CA file with no certificate in it, a client identity that
    /// TLS refuses. Nothing was sent. Code: INVALID_ARGUMENT.
    #[error("{0}")]
    Config(String),
    /// No endpoint accepted a connection (each tried once, in order). Nothing was sent.
    /// Code: UNAVAILABLE.
    #[error("{}", ConnectFailures(.0))]
    Connect(Vec<(String, tonic::transport::Error)>),
    /// The server, or the transport on its behalf, answered with this status.
    #[error("{}", StatusDisplay(.0))]
    Status(Status),
    /// A compare-and-set guard did not match (FAILED_PRECONDITION): nothing changed.
    #[error("{}", StatusDisplay(.status))]
    Conflict {
        /// The key's `mod_revision` when the guard was checked; 0 when it did not exist.
        /// `None` from a server that does not send the `kvstore-mod-revision` trailer.
        current_mod_revision: Option<i64>,
        /// The server's status, whose message says the same for people.
        status: Status,
    },
    /// A subscription fell more than the server's buffer behind (RESOURCE_EXHAUSTED) and was
    /// ended by the server. Nothing was skipped: resubscribing from `last_revision + 1`
    /// continues without a gap, which a [`Subscription`](super::Subscription) does itself
    /// when asked with [`SubscribeOptions::resume_after_lag`](super::SubscribeOptions::resume_after_lag).
    #[error("{}", StatusDisplay(.status))]
    Lagged {
        /// The last revision the server sent before it gave up (`None` if it did not say).
        last_revision: Option<i64>,
        /// The server's status, which says how far behind the subscriber was.
        status: Status,
    },
    /// A subscription asked to replay history from a revision the server no longer retains
    /// (OUT_OF_RANGE). Changes since then cannot be replayed: re-read the current values
    /// (a subscription with [`initial`](super::SubscribeOptions::initial), or a list) and
    /// continue from there.
    #[error("cannot subscribe from revision {start_revision}: {}", StatusDisplay(.status))]
    Compacted {
        /// The revision the subscription asked to start from.
        start_revision: i64,
        /// The oldest revision the server can still replay, from its trailer.
        oldest_revision: Option<i64>,
        /// The server's status.
        status: Status,
    },
    /// A server that answers `success = false` instead of a status (the original Go server
    /// did): the write was refused with this message. Code: UNKNOWN.
    #[error("{0}")]
    Refused(String),
    /// A resuming subscription failed to resubscribe for longer than
    /// [`RetryPolicy::resume_for`](super::RetryPolicy::resume_for) without a break.
    #[error("gave up resuming after {}: {reason}", humantime::format_duration(*.after))]
    GaveUp {
        /// How long it kept trying.
        after: Duration,
        /// The last reason resubscribing failed.
        reason: Box<Error>,
    },
    /// A subscription stream ended without a status, which a server never does: the
    /// connection broke in a way the transport did not report. Code: UNAVAILABLE.
    #[error("the stream ended without a status")]
    EndedWithoutStatus,
    /// The server answered something this client cannot follow, such as a list page that
    /// does not move forward. Code: INTERNAL.
    #[error("{0}")]
    Protocol(String),
}

impl Error {
    /// The gRPC code: the status's own for the variants that carry one, else the code a gRPC
    /// client would report for the same failure.
    pub fn code(&self) -> Code {
        match self {
            Error::Config(_) => Code::InvalidArgument,
            Error::Connect(_) | Error::EndedWithoutStatus => Code::Unavailable,
            Error::Status(status)
            | Error::Conflict { status, .. }
            | Error::Lagged { status, .. }
            | Error::Compacted { status, .. } => status.code(),
            Error::Refused(_) => Code::Unknown,
            Error::GaveUp { reason, .. } => reason.code(),
            Error::Protocol(_) => Code::Internal,
        }
    }

    /// The status the server or the transport answered with, if this error came from one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Error::Status(status)
            | Error::Conflict { status, .. }
            | Error::Lagged { status, .. }
            | Error::Compacted { status, .. } => Some(status),
            Error::GaveUp { reason, .. } => reason.status(),
            _ => None,
        }
    }

    /// A failed call's status as the variant that names it: FAILED_PRECONDITION is a
    /// [`Error::Conflict`], OUT_OF_RANGE from Subscribe a [`Error::Compacted`].
    pub(crate) fn from_status(status: Status) -> Error {
        match status.code() {
            Code::FailedPrecondition => Error::Conflict {
                current_mod_revision: trailer(&status, MOD_REVISION_TRAILER),
                status,
            },
            _ => Error::Status(status),
        }
    }

    /// A subscription's status, where OUT_OF_RANGE means compacted history.
    pub(crate) fn from_subscribe_status(status: Status, start_revision: i64) -> Error {
        match status.code() {
            Code::OutOfRange => Error::Compacted {
                start_revision,
                oldest_revision: trailer(&status, OLDEST_REVISION_TRAILER),
                status,
            },
            _ => Error::from_status(status),
        }
    }

    /// The status that ended an established subscription, where RESOURCE_EXHAUSTED is a lag.
    pub(crate) fn from_stream_end(status: Status) -> Error {
        match status.code() {
            Code::ResourceExhausted => Error::Lagged {
                last_revision: last_revision(&status),
                status,
            },
            _ => Error::from_status(status),
        }
    }
}

/// The last revision a subscription was sent, from the trailer of its end (a lag or a drain).
pub(crate) fn last_revision(status: &Status) -> Option<i64> {
    trailer(status, LAST_REVISION_TRAILER).filter(|last| *last > 0)
}

fn trailer(status: &Status, name: &str) -> Option<i64> {
    status.metadata().get(name)?.to_str().ok()?.parse().ok()
}

/// `cannot reach server at URL: cause`, one per endpoint tried.
struct ConnectFailures<'a>(&'a [(String, tonic::transport::Error)]);

impl fmt::Display for ConnectFailures<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (url, err)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "cannot reach server at {url}: {}", causes(err))?;
        }
        Ok(())
    }
}

/// A status as `INVALID_ARGUMENT: message`, the names the proto and other gRPC tools use,
/// instead of tonic's Display (`code: 'Client specified an invalid argument'`).
struct StatusDisplay<'a>(&'a Status);

impl fmt::Display for StatusDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let message = self.0.message();
        f.write_str(code_name(self.0.code()))?;
        if !message.is_empty() {
            write!(f, ": {message}")?;
        }
        // A status tonic made from a broken connection keeps the transport error as its
        // source, and only that says why: `tcp connect error: Connection refused`.
        if let Some(source) = self.0.source() {
            let causes = causes(source);
            let untold = causes
                .strip_prefix(message)
                .map_or(causes.as_str(), |rest| rest.trim_start_matches(": "));
            if !untold.is_empty() {
                write!(f, ": {untold}")?;
            }
        }
        Ok(())
    }
}

/// The causes of an error, outermost first, skipping the bare "transport error" that tonic
/// puts on top and the repeats hyper adds ("tcp connect error: tcp connect error: ...").
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut last = String::new();
    for cause in std::iter::successors(err.source().or(Some(err)), |&err| err.source()) {
        let text = cause.to_string();
        if text != last {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        last = text;
    }
    line
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
