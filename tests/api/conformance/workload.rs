//! Drives a real server and records what it answered: seeded clients doing random
//! operations over a small key space, and stream readers. Converts tonic's types into the
//! checker's ([`super::record`]) and judges nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvstore::pb::batch_op::Op as PbOp;
use kvstore::pb::batch_result::Result as PbResult;
use kvstore::pb::change_event::ChangeType;
use kvstore::pb::key_value_store_client::KeyValueStoreClient;
use kvstore::pb::{
    BatchOp, BatchRequest, ChangeEvent, DeleteRequest, DeleteResponse, GetRequest, GetResponse,
    ListRequest, SetRequest, SubscribeRequest,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use super::record::{
    Answer, Call, End, Entry, Event, Item, Kind, Op, OpAnswer, Page, Request, Rev, Start, Stream,
};
use crate::helpers::PATIENCE;

pub type Client = KeyValueStoreClient<Channel>;

/// Three prefixes of four keys: few enough that clients collide on keys all the time.
pub const PREFIXES: [&str; 3] = ["a/", "b/", "c/"];
const KEYS_PER_PREFIX: usize = 4;

/// The run's time origin: every instant is recorded as the time since it.
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Self {
        Self(Instant::now())
    }

    pub fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

fn revision(wire: i64) -> Rev {
    // A negative revision becomes huge and then differs from every expected one.
    wire as Rev
}

fn entry(value: String, create: i64, modified: i64, version: i64) -> Entry {
    Entry {
        value,
        create_revision: revision(create),
        mod_revision: revision(modified),
        version: revision(version),
    }
}

fn get_answer(r: GetResponse) -> OpAnswer {
    OpAnswer::Get {
        found: r
            .found
            .then(|| entry(r.value, r.create_revision, r.mod_revision, r.version)),
        ttl_ms: revision(r.ttl_ms),
        revision: revision(r.revision),
    }
}

fn delete_answer(r: DeleteResponse) -> OpAnswer {
    OpAnswer::Delete {
        prev_mod_revision: r.deleted.then_some(revision(r.prev_mod_revision)),
        revision: revision(r.revision),
    }
}

/// A failed guard is FAILED_PRECONDITION with the key's mod_revision in its trailer; any
/// other status breaks the contract for these calls.
fn failed(status: Status) -> Answer {
    let trailer = status
        .metadata()
        .get(kvstore::grpc::MOD_REVISION_TRAILER)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    match (status.code(), trailer) {
        (Code::FailedPrecondition, Some(mod_revision)) => {
            Answer::One(OpAnswer::Conflict { mod_revision })
        }
        _ => Answer::Error(format!("{status:?}")),
    }
}

fn set_request(key: &str, value: &str, guard: Option<Rev>, ttl_ms: u64) -> SetRequest {
    SetRequest {
        key: key.into(),
        value: value.into(),
        expected_mod_revision: guard.map(|g| g as i64),
        ttl_ms: ttl_ms as i64,
    }
}

fn pb_op(op: &Op) -> BatchOp {
    let op = match op {
        Op::Get { key } => PbOp::Get(GetRequest { key: key.clone() }),
        Op::Set {
            key,
            value,
            guard,
            ttl_ms,
        } => PbOp::Set(set_request(key, value, *guard, *ttl_ms)),
        Op::Delete { key, guard } => PbOp::Delete(DeleteRequest {
            key: key.clone(),
            expected_mod_revision: guard.map(|g| g as i64),
        }),
    };
    BatchOp { op: Some(op) }
}

/// Makes one call and records it.
pub async fn call(kv: &mut Client, clock: Clock, client: usize, request: Request) -> Call {
    let start = clock.now();
    let answer = match &request {
        Request::One(Op::Get { key }) => match kv.get(GetRequest { key: key.clone() }).await {
            Ok(r) => Answer::One(get_answer(r.into_inner())),
            Err(status) => Answer::Error(format!("{status:?}")),
        },
        Request::One(Op::Set {
            key,
            value,
            guard,
            ttl_ms,
        }) => match kv.set(set_request(key, value, *guard, *ttl_ms)).await {
            Ok(r) => Answer::One(OpAnswer::Set {
                revision: revision(r.into_inner().revision),
            }),
            Err(status) => failed(status),
        },
        Request::One(Op::Delete { key, guard }) => {
            let request = DeleteRequest {
                key: key.clone(),
                expected_mod_revision: guard.map(|g| g as i64),
            };
            match kv.delete(request).await {
                Ok(r) => Answer::One(delete_answer(r.into_inner())),
                Err(status) => failed(status),
            }
        }
        Request::Batch(ops) => {
            let ops = ops.iter().map(pb_op).collect();
            match kv.batch(BatchRequest { ops }).await {
                Ok(r) => batch_answer(r.into_inner()),
                Err(status) => Answer::Error(format!("{status:?}")),
            }
        }
        Request::List {
            prefix,
            start_after,
            limit,
        } => {
            let request = ListRequest {
                prefix: prefix.clone(),
                limit: *limit,
                start_after: start_after.clone(),
            };
            match kv.list(request).await {
                Ok(r) => {
                    let r = r.into_inner();
                    let items = r.items.into_iter().map(|kv| Item {
                        key: kv.key,
                        entry: entry(kv.value, kv.create_revision, kv.mod_revision, kv.version),
                        ttl_ms: Some(revision(kv.ttl_ms)),
                    });
                    Answer::List(Page {
                        items: items.collect(),
                        more: r.more,
                        next_start_after: r.next_start_after,
                        revision: revision(r.revision),
                    })
                }
                Err(status) => Answer::Error(format!("{status:?}")),
            }
        }
    };
    Call {
        client,
        start,
        end: clock.now(),
        request,
        answer,
    }
}

fn batch_answer(reply: kvstore::pb::BatchResponse) -> Answer {
    let mut results = Vec::new();
    for result in reply.results {
        results.push(match result.result {
            Some(PbResult::Get(r)) => get_answer(r),
            Some(PbResult::Set(r)) => OpAnswer::Set {
                revision: revision(r.revision),
            },
            Some(PbResult::Delete(r)) => delete_answer(r),
            Some(PbResult::Conflict(c)) => OpAnswer::Conflict {
                mod_revision: revision(c.mod_revision),
            },
            None => return Answer::Error("a batch result without a result".into()),
        });
    }
    Answer::Batch {
        results,
        revision: revision(reply.revision),
    }
}

/// One client's random operations: its own seeded generator and what it last saw of each
/// key, so its guards are fresh or deliberately stale.
struct Actor {
    id: usize,
    rng: StdRng,
    seen: HashMap<String, Rev>,
    writes: usize,
}

impl Actor {
    fn key(&mut self) -> String {
        let prefix = PREFIXES[self.rng.random_range(0..PREFIXES.len())];
        format!("{prefix}{}", self.rng.random_range(0..KEYS_PER_PREFIX))
    }

    fn value(&mut self) -> String {
        self.writes += 1;
        // Unique, so an event names the write it came from.
        format!("c{}.{}", self.id, self.writes)
    }

    fn fresh(&self, key: &str) -> Rev {
        self.seen.get(key).copied().unwrap_or(0)
    }

    fn stale(&mut self, key: &str) -> Rev {
        let fresh = self.fresh(key);
        let back = self.rng.random_range(1..=3);
        if fresh > back {
            fresh - back
        } else {
            self.rng.random_range(1..=50)
        }
    }

    fn set(&mut self) -> Op {
        let key = self.key();
        let value = self.value();
        let (guard, ttl_ms) = match self.rng.random_range(0..100) {
            0..35 => (None, 0),
            35..55 => (None, self.rng.random_range(2..=30)),
            55..75 => (Some(self.fresh(&key)), 0),
            75..87 => (Some(self.stale(&key)), 0),
            _ => (Some(0), self.rng.random_range(0..=1) * 20),
        };
        Op::Set {
            key,
            value,
            guard,
            ttl_ms,
        }
    }

    fn delete(&mut self) -> Op {
        let key = self.key();
        let guard = match self.rng.random_range(0..4) {
            0 => Some(self.fresh(&key)),
            1 => Some(self.stale(&key)),
            _ => None,
        };
        Op::Delete { key, guard }
    }

    fn op(&mut self) -> Op {
        match self.rng.random_range(0..100) {
            0..40 => Op::Get { key: self.key() },
            40..80 => self.set(),
            _ => self.delete(),
        }
    }

    fn learn(&mut self, op: &Op, answer: &OpAnswer) {
        let seen = match answer {
            OpAnswer::Get { found, .. } => found.as_ref().map_or(0, |e| e.mod_revision),
            OpAnswer::Set { revision } => *revision,
            OpAnswer::Delete { .. } => 0,
            OpAnswer::Conflict { mod_revision } => *mod_revision,
        };
        self.seen.insert(op.key().to_owned(), seen);
    }
}

/// `count` random calls (a paged List counts once), or fewer if `deadline` passes first.
pub async fn client(
    id: usize,
    mut kv: Client,
    clock: Clock,
    seed: u64,
    count: usize,
    deadline: Instant,
) -> Vec<Call> {
    let mut actor = Actor {
        id,
        rng: StdRng::seed_from_u64(seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        seen: HashMap::new(),
        writes: 0,
    };
    let mut calls = Vec::new();
    for _ in 0..count {
        if Instant::now() >= deadline {
            break;
        }
        let request = match actor.rng.random_range(0..100) {
            0..70 => Request::One(actor.op()),
            70..85 => {
                let n = actor.rng.random_range(2..=5);
                Request::Batch((0..n).map(|_| actor.op()).collect())
            }
            _ => {
                let prefix = ["", "a/", "b/", "c/"][actor.rng.random_range(0..4)];
                let limit = actor.rng.random_range(1..=4);
                list(&mut kv, clock, id, prefix, limit, &mut calls).await;
                continue;
            }
        };
        let call = call(&mut kv, clock, id, request).await;
        match (&call.request, &call.answer) {
            (Request::One(op), Answer::One(answer)) => actor.learn(op, answer),
            (Request::Batch(ops), Answer::Batch { results, .. }) => {
                for (op, answer) in ops.iter().zip(results) {
                    actor.learn(op, answer);
                }
            }
            _ => {}
        }
        calls.push(call);
    }
    calls
}

/// Lists `prefix` a page at a time, following `next_start_after`; each page is a call.
async fn list(
    kv: &mut Client,
    clock: Clock,
    id: usize,
    prefix: &str,
    limit: u32,
    calls: &mut Vec<Call>,
) {
    let mut start_after = String::new();
    // Twelve keys at one a page at most, with room for keys set while paging.
    for _ in 0..32 {
        let request = Request::List {
            prefix: prefix.into(),
            start_after: start_after.clone(),
            limit,
        };
        let call = call(kv, clock, id, request).await;
        let next = match &call.answer {
            Answer::List(page) if page.more => Some(page.next_start_after.clone()),
            _ => None,
        };
        calls.push(call);
        match next {
            Some(next) => start_after = next,
            None => return,
        }
    }
}

fn event(e: ChangeEvent) -> Option<Event> {
    let kind = match (e.change_type(), e.expired) {
        (ChangeType::Set, _) => Kind::Set,
        (ChangeType::Delete, false) => Kind::Delete,
        (ChangeType::Delete, true) => Kind::Expire,
        (ChangeType::Progress, _) => Kind::Progress,
        (ChangeType::Unknown, _) => return None,
    };
    Some(Event {
        revision: revision(e.revision),
        kind,
        key: e.key,
        value: e.value,
        initial: e.initial,
        create_revision: revision(e.create_revision),
        version: revision(e.version),
    })
}

/// Opens a subscription; `Start::Snapshot`'s window is the call's.
pub async fn subscribe(
    kv: &mut Client,
    clock: Clock,
    prefix: &str,
    start_revision: Rev,
    initial: bool,
) -> Result<(Streaming<ChangeEvent>, Start), Status> {
    let start = clock.now();
    let request = SubscribeRequest {
        key_pattern: prefix.into(),
        start_revision: start_revision as i64,
        initial,
        ..SubscribeRequest::default()
    };
    let stream = kv.subscribe(request).await?.into_inner();
    let start = if initial {
        Start::Snapshot {
            start,
            end: clock.now(),
        }
    } else {
        Start::Revision(start_revision)
    };
    Ok((stream, start))
}

pub fn trailer(status: &Status, name: &str) -> Option<Rev> {
    status.metadata().get(name)?.to_str().ok()?.parse().ok()
}

#[derive(Default)]
struct Shared {
    events: Vec<Event>,
    end: Option<End>,
}

/// A stream read by its own task into memory as fast as the server sends.
pub struct Reader {
    name: String,
    prefix: String,
    start: Start,
    shared: Arc<Mutex<Shared>>,
    /// The highest revision received (snapshot events aside).
    received: watch::Receiver<Rev>,
    task: JoinHandle<()>,
}

impl Reader {
    pub fn spawn(
        name: &str,
        prefix: &str,
        start: Start,
        mut stream: Streaming<ChangeEvent>,
    ) -> Self {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (tell, received) = watch::channel(0);
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                let end = loop {
                    match stream.message().await {
                        Ok(Some(e)) => {
                            let Some(event) = event(e) else {
                                break End::Stalled("an event of unknown type".into());
                            };
                            if !event.initial {
                                tell.send_if_modified(|r| {
                                    let newer = event.revision > *r;
                                    *r = (*r).max(event.revision);
                                    newer
                                });
                            }
                            shared.lock().unwrap().events.push(event);
                        }
                        Ok(None) => break End::Stalled("closed without a status".into()),
                        Err(status) => {
                            break End::Status {
                                code: status.code(),
                                last_revision: trailer(
                                    &status,
                                    kvstore::grpc::LAST_REVISION_TRAILER,
                                ),
                                oldest_revision: trailer(
                                    &status,
                                    kvstore::grpc::OLDEST_REVISION_TRAILER,
                                ),
                            };
                        }
                    }
                };
                shared.lock().unwrap().end = Some(end);
            }
        });
        Self {
            name: name.into(),
            prefix: prefix.into(),
            start,
            shared,
            received,
            task,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn received(&self) -> Rev {
        *self.received.borrow()
    }

    /// Waits, within [`PATIENCE`], until `done` holds for the events received so far.
    pub async fn wait(&mut self, done: impl Fn(&[Event]) -> bool) -> bool {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if done(&self.shared.lock().unwrap().events) {
                return true;
            }
            let changed = tokio::time::timeout_at(deadline, self.received.changed()).await;
            if !matches!(changed, Ok(Ok(()))) {
                return done(&self.shared.lock().unwrap().events);
            }
        }
    }

    /// Stops reading once the stream has `goal` (or has ended) and returns what it read.
    pub async fn finish(mut self, goal: Rev) -> Stream {
        let reached = tokio::time::timeout(PATIENCE, self.received.wait_for(|&r| r >= goal))
            .await
            .is_ok_and(|r| r.is_ok());
        self.task.abort();
        let _ = self.task.await;
        let shared = std::mem::take(&mut *self.shared.lock().unwrap());
        let end = match shared.end {
            Some(end) => end,
            None if reached => End::Reached(goal),
            None => End::Stalled(format!("revision {goal} not received within {PATIENCE:?}")),
        };
        Stream {
            name: self.name,
            prefix: self.prefix,
            start: self.start,
            events: shared.events,
            end,
        }
    }
}
