//! What a conformance run records, free of tonic: the calls the clients made (request,
//! answer, start and end), the streams the subscribers read, and the refused resumes. The
//! checker reads only these, so its self-tests can build them by hand.

use std::time::Duration;

/// A store revision.
pub type Rev = u64;

/// What an event says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Set,
    Delete,
    /// A DELETE with `expired`.
    Expire,
    /// Not a change: every matching change up to its revision has been sent.
    Progress,
}

/// One event of a stream, as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub revision: Rev,
    pub kind: Kind,
    pub key: String,
    pub value: String,
    pub initial: bool,
    pub create_revision: Rev,
    pub version: u64,
}

/// A key as a read returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: String,
    pub create_revision: Rev,
    pub mod_revision: Rev,
    pub version: u64,
}

/// One get, set or delete, alone or inside a Batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Get {
        key: String,
    },
    Set {
        key: String,
        value: String,
        guard: Option<Rev>,
        ttl_ms: u64,
    },
    Delete {
        key: String,
        guard: Option<Rev>,
    },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Get { key } | Op::Set { key, .. } | Op::Delete { key, .. } => key,
        }
    }
}

/// What one op answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpAnswer {
    Get {
        found: Option<Entry>,
        ttl_ms: u64,
        revision: Rev,
    },
    Set {
        revision: Rev,
    },
    /// `prev_mod_revision` is `None` when nothing was deleted.
    Delete {
        prev_mod_revision: Option<Rev>,
        revision: Rev,
    },
    /// A failed guard: FAILED_PRECONDITION's `kvstore-mod-revision` trailer, or a Batch
    /// result's `conflict`.
    Conflict {
        mod_revision: Rev,
    },
}

/// One item of a List page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub key: String,
    pub entry: Entry,
    /// `None` where the answer carries no TTL (a snapshot's events).
    pub ttl_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<Item>,
    pub more: bool,
    pub next_start_after: String,
    pub revision: Rev,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    One(Op),
    Batch(Vec<Op>),
    List {
        prefix: String,
        start_after: String,
        limit: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    One(OpAnswer),
    Batch {
        results: Vec<OpAnswer>,
        revision: Rev,
    },
    List(Page),
    /// A status the contract does not allow for this call.
    Error(String),
}

/// One call: when it was sent and answered (since the run's origin), what it asked, what
/// it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub client: usize,
    pub start: Duration,
    pub end: Duration,
    pub request: Request,
    pub answer: Answer,
}

/// Where a stream begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Its first change is the one at this revision (a resume, or a stream from now on a
    /// store known to be at this revision minus one).
    Revision(Rev),
    /// `initial`: a snapshot, its PROGRESS, then live changes. The Subscribe call's window,
    /// within which the snapshot decided which keys had expired.
    Snapshot { start: Duration, end: Duration },
}

/// How a stream's reading stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Still open: the reader stopped once it had this revision (its prefix's last change).
    Reached(Rev),
    /// The server ended it with a status and its trailers.
    Status {
        code: tonic::Code,
        last_revision: Option<Rev>,
        oldest_revision: Option<Rev>,
    },
    /// The reader gave up waiting (a stall) or the stream closed without a status.
    Stalled(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    pub name: String,
    pub prefix: String,
    pub start: Start,
    pub events: Vec<Event>,
    pub end: End,
}

/// A resume asked for while nothing was written: the store was at `store_revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub start_revision: Rev,
    pub store_revision: Rev,
    pub max_events: u64,
    /// `Ok` when the stream opened, else the status code and its `kvstore-oldest-revision`.
    pub refused: Option<(tonic::Code, Option<Rev>)>,
}

/// Everything one run recorded, and the reference history: the events of a subscriber to
/// every key that covered every revision.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub calls: Vec<Call>,
    pub history: Vec<Event>,
    pub streams: Vec<Stream>,
    pub resumes: Vec<Resume>,
}
