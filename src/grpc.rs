//! The `kvstore.KeyValueStore` gRPC service: validates requests at the edge, converts
//! between protobuf and the store's types, and turns a subscription into a response stream
//! that always ends with a status saying why.

pub mod batch;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use futures_core::Stream;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::caller::{Caller, client_key_of};
use crate::config::{Limits, Role};
use crate::metrics::{LimitKey, Metrics};
use crate::pb::change_event::ChangeType;
use crate::pb::key_value_store_server::{KeyValueStore, KeyValueStoreServer};
use crate::pb::{
    ChangeEvent, DeleteRequest, DeleteResponse, GetRequest, GetResponse, KeyValue, ListRequest,
    ListResponse, SetRequest, SetResponse, SubscribeRequest,
};
use crate::pubsub::{Change, ChangeKind, Event};
use crate::rate_limit::{ScanCharge, ScanPayer};
use crate::share::{Share, Shares};
use crate::store::{self, Ended, Op, SetOptions, Start, Store, SubscribeError, Subscription};
use batch::{BatchReply, EncodedBatch, Unread, WireOp};

/// Room for protobuf framing on top of the largest key and value.
const MESSAGE_OVERHEAD: usize = 1024;

/// The page size of a List that asks for 0.
const DEFAULT_PAGE: usize = 1000;

/// The longest TTL accepted: ten years, far from `Instant` overflow.
const MAX_TTL_MS: i64 = 10 * 365 * 24 * 3600 * 1000;

/// The shortest progress interval: more often would be a stream of heartbeats.
const MIN_PROGRESS_MS: i64 = 100;

pub use crate::pb::trailers::{
    LAST_REVISION_TRAILER, MOD_REVISION_TRAILER, OLDEST_REVISION_TRAILER,
};

/// The gRPC face of the [`Store`].
#[derive(Clone)]
pub struct KvService {
    store: Store,
    limits: Limits,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    shares: Shares,
}

impl KvService {
    /// A service over `store`, refusing keys and values over `limits`, and a Subscribe from
    /// a client with its share of `shares` open. Cancelling `shutdown` ends every open
    /// Subscribe stream with `UNAVAILABLE`, once it has sent what is already queued for it.
    /// Refusals and delivered events are counted in `metrics`.
    pub fn new(
        store: Store,
        limits: Limits,
        shares: Shares,
        shutdown: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            limits,
            shutdown,
            metrics,
            shares,
        }
    }

    /// The generated server, with a decode limit that fits the largest valid request (one
    /// set, or a batch), so a value just over the limit gets `INVALID_ARGUMENT` naming the
    /// limit, and a far larger message gets tonic's `OUT_OF_RANGE` rather than a dropped
    /// connection.
    pub fn into_server(self) -> KeyValueStoreServer<Self> {
        let max = max_message_bytes(&self.limits);
        // A backstop: the store already keeps every answer within max_response_bytes.
        let max_answer = max_answer_bytes(&self.limits);
        KeyValueStoreServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max_answer)
    }

    fn check_key(&self, key: &str) -> Result<(), Status> {
        if key.is_empty() {
            return Err(Status::invalid_argument("key must not be empty"));
        }
        self.check_key_size("key", key)
    }

    fn check_key_size(&self, what: &str, key: &str) -> Result<(), Status> {
        self.check_size(what, key, self.limits.max_key_bytes, LimitKey::MaxKeyBytes)
    }

    fn check_size(&self, what: &str, s: &str, max: usize, limit: LimitKey) -> Result<(), Status> {
        if s.len() > max {
            self.metrics.refused(limit);
            return Err(Status::invalid_argument(format!(
                "{what} is {} bytes, over the limit of {max} bytes ({})",
                s.len(),
                limit.key()
            )));
        }
        Ok(())
    }
}

/// The largest request message the service decodes, under `limits`: one set, or a batch.
pub fn max_message_bytes(limits: &Limits) -> usize {
    let one_set = limits.max_key_bytes + limits.max_value_bytes + MESSAGE_OVERHEAD;
    one_set.max(limits.max_batch_bytes)
}

/// The largest answer message the service encodes, under `limits`.
pub fn max_answer_bytes(limits: &Limits) -> usize {
    limits.max_response_bytes + MESSAGE_OVERHEAD
}

impl KvService {
    /// Checks a set's key and value; its guard and TTL as the store takes them.
    fn set_options(
        &self,
        key: &str,
        value: &str,
        expected_mod_revision: Option<i64>,
        ttl_ms: i64,
    ) -> Result<SetOptions, Status> {
        self.check_key(key)?;
        self.check_size(
            "value",
            value,
            self.limits.max_value_bytes,
            LimitKey::MaxValueBytes,
        )?;
        let expected_mod_revision = expected_mod_revision
            .map(|r| revision_arg("expected_mod_revision", r))
            .transpose()?;
        let ttl = match ttl_ms {
            0 => None,
            1..=MAX_TTL_MS => Some(Duration::from_millis(ttl_ms.unsigned_abs())),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "ttl_ms must be from 0 (no expiry) to {MAX_TTL_MS} (ten years), got {ttl_ms}"
                )));
            }
        };
        Ok(SetOptions {
            expected_mod_revision,
            ttl,
        })
    }

    /// Checks a delete's key; its guard as the store takes it.
    fn delete_guard(
        &self,
        key: &str,
        expected_mod_revision: Option<i64>,
    ) -> Result<Option<u64>, Status> {
        self.check_key(key)?;
        expected_mod_revision
            .map(|r| revision_arg("expected_mod_revision", r))
            .transpose()
    }

    fn batch_op<'a>(&self, op: WireOp<'a>) -> Result<Op<'a>, Status> {
        match op {
            WireOp::Get { key } => {
                self.check_key(key)?;
                Ok(Op::Get(key))
            }
            WireOp::Set {
                key,
                value,
                expected_mod_revision,
                ttl_ms,
            } => Ok(Op::Set {
                key,
                value,
                options: self.set_options(key, value, expected_mod_revision, ttl_ms)?,
            }),
            WireOp::Delete {
                key,
                expected_mod_revision,
            } => Ok(Op::Delete {
                key,
                expected_mod_revision: self.delete_guard(key, expected_mod_revision)?,
            }),
            WireOp::Empty => Err(Status::invalid_argument(
                "the op is empty: set get, set or delete",
            )),
        }
    }
}

fn get_response(found: Option<store::KeyValue>, revision: u64) -> GetResponse {
    match found {
        Some(kv) => GetResponse {
            value: String::from(&*kv.value),
            found: true,
            create_revision: wire(kv.create_revision),
            mod_revision: wire(kv.mod_revision),
            version: wire(kv.version),
            ttl_ms: ttl_ms(kv.ttl),
            revision: wire(revision),
        },
        None => GetResponse {
            revision: wire(revision),
            ..GetResponse::default()
        },
    }
}

fn delete_response(deleted: store::Deleted) -> DeleteResponse {
    DeleteResponse {
        deleted: deleted.prev_mod_revision.is_some(),
        prev_mod_revision: wire(deleted.prev_mod_revision.unwrap_or(0)),
        revision: wire(deleted.revision),
    }
}

/// A revision from the wire: never negative.
fn revision_arg(what: &str, value: i64) -> Result<u64, Status> {
    u64::try_from(value)
        .map_err(|_| Status::invalid_argument(format!("{what} must not be negative, got {value}")))
}

/// The Go service's Set message. Built without `format!`, whose machinery is a measurable
/// share of a Set (docs/performance.md, "Why the code is shaped so").
fn stored_at(revision: u64) -> String {
    const PREFIX: &str = "stored at revision ";
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(revision);
    let mut message = String::with_capacity(PREFIX.len() + digits.len());
    message.push_str(PREFIX);
    message.push_str(digits);
    message
}

/// A revision or duration to the wire; revisions never get near `i64::MAX`.
fn wire(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn ttl_ms(ttl: Option<Duration>) -> i64 {
    // A key with a TTL reports at least 1 ms while it lives, since 0 means "no TTL".
    ttl.map_or(0, |t| {
        wire(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)).max(1)
    })
}

fn with_trailer(mut status: Status, name: &'static str, revision: u64) -> Status {
    let value: MetadataValue<_> = revision
        .to_string()
        .parse()
        .expect("decimal digits are valid metadata");
    status.metadata_mut().insert(name, value);
    status
}

fn conflict_status(conflict: store::Conflict) -> Status {
    with_trailer(
        Status::failed_precondition(conflict.to_string()),
        MOD_REVISION_TRAILER,
        conflict.actual,
    )
}

impl From<store::KeyValue> for KeyValue {
    fn from(kv: store::KeyValue) -> Self {
        Self {
            key: String::from(kv.key()),
            value: String::from(&*kv.value),
            create_revision: wire(kv.create_revision),
            mod_revision: wire(kv.mod_revision),
            version: wire(kv.version),
            ttl_ms: ttl_ms(kv.ttl),
        }
    }
}

#[tonic::async_trait]
impl KeyValueStore for KvService {
    /// A missing or expired key answers `found: false` with an empty value, not an error.
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let key = request.into_inner().key;
        self.check_key(&key)?;
        let (found, revision) = self.store.get(&key);
        Ok(Response::new(get_response(found, revision)))
    }

    /// Stores the value; nothing is stored when the request is refused or its guard fails.
    async fn set(&self, request: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        let SetRequest {
            key,
            value,
            expected_mod_revision,
            ttl_ms,
        } = request.into_inner();
        let options = self.set_options(&key, &value, expected_mod_revision, ttl_ms)?;
        let revision = self
            .store
            .set(key, value, options)
            .map_err(conflict_status)?;
        Ok(Response::new(SetResponse {
            success: true,
            message: stored_at(revision),
            revision: wire(revision),
        }))
    }

    /// Deleting a missing key answers `deleted: false`; a failed guard changes nothing.
    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let DeleteRequest {
            key,
            expected_mod_revision,
        } = request.into_inner();
        let expected = self.delete_guard(&key, expected_mod_revision)?;
        let deleted = self.store.delete(&key, expected).map_err(conflict_status)?;
        Ok(Response::new(delete_response(deleted)))
    }

    /// Validates every op first, then applies them all under one lock; an answer that would
    /// pass `limits.max_response_bytes` is `RESOURCE_EXHAUSTED`, and nothing is applied.
    async fn batch(&self, request: Request<EncodedBatch>) -> Result<Response<BatchReply>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let request = request.into_inner();
        let mut decoded = None;
        let ops = match request.ops(self.limits.max_batch_ops, &mut decoded) {
            Ok(ops) => ops,
            // INTERNAL, as tonic answers a message that does not decode in every other method.
            Err(Unread::Malformed(error)) => return Err(Status::internal(error.to_string())),
            Err(Unread::TooMany(count)) => {
                self.metrics.refused(LimitKey::MaxBatchOps);
                return Err(Status::invalid_argument(format!(
                    "batch has {count} ops, over the limit of {} (limits.max_batch_ops)",
                    self.limits.max_batch_ops
                )));
            }
        };
        if let Some(caller) = caller {
            // The edge let any token in; only now are the ops known.
            let write = ops
                .iter()
                .position(|op| !matches!(op, WireOp::Get { .. } | WireOp::Empty));
            if let Some(i) = write {
                caller.require(Role::ReadWrite, &format!("a Batch that writes (op {i})"))?;
            }
        }
        let writes = ops
            .iter()
            .any(|op| !matches!(op, WireOp::Get { .. } | WireOp::Empty));
        let ops = ops
            .into_iter()
            .enumerate()
            .map(|(i, op)| {
                self.batch_op(op).map_err(|status| {
                    Status::invalid_argument(format!("op {i}: {}", status.message()))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (results, revision) = self
            .store
            .batch(ops, self.limits.max_response_bytes)
            .map_err(|too_large| {
                self.metrics.refused(LimitKey::MaxResponseBytes);
                Status::resource_exhausted(too_large.to_string())
            })?;
        let mut response = Response::new(BatchReply { results, revision });
        if writes {
            // Its changes are made: the answer must reach the client whatever the budget.
            response.extensions_mut().insert(crate::answers::Committed);
        }
        Ok(response)
    }

    /// One page in key order; `limit` 0 means 1000, capped at `limits.max_page`. The page
    /// ends early, with `more`, where its answer would pass `limits.max_response_bytes`.
    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let ListRequest {
            prefix,
            limit,
            start_after,
        } = request.into_inner();
        self.check_key_size("prefix", &prefix)?;
        self.check_key_size("start_after", &start_after)?;
        let limit = match usize::try_from(limit).unwrap_or(usize::MAX) {
            0 => DEFAULT_PAGE,
            n => n,
        }
        .min(self.limits.max_page);
        let page = self
            .store
            .list(&prefix, &start_after, limit, self.limits.max_response_bytes);
        let next_start_after = match (page.more, page.items.last()) {
            (true, Some(last)) => last.key().to_string(),
            _ => String::new(),
        };
        Ok(Response::new(ListResponse {
            items: page.items.into_iter().map(KeyValue::from).collect(),
            more: page.more,
            next_start_after,
            revision: wire(page.revision),
        }))
    }

    type SubscribeStream = ChangeStream;

    /// Prefix match; an empty `key_pattern` matches every key. The subscription is
    /// registered before this returns, so the client sees every write made after it has the
    /// response headers. A client (its token, else its address) with
    /// `subscriptions.max_per_client` streams open is refused with `RESOURCE_EXHAUSTED`; its
    /// PROGRESS events, all streams together, come at most `PROGRESS_PER_CLIENT` a second,
    /// and those of every client together at most `PROGRESS_PER_SERVER`.
    /// With the rate limit on, a snapshot or replay costs the caller one request per
    /// `ENTRIES_PER_REQUEST` entries it visits, and waits while the caller is over its rate.
    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let client = client_key_of(
            request.extensions().get::<Caller>(),
            request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(peer)| *peer),
        );
        let payer = request
            .extensions()
            .get::<ScanCharge>()
            .cloned()
            .map(ScanCharge::payer);
        let SubscribeRequest {
            key_pattern,
            start_revision,
            initial,
            progress_interval_ms,
        } = request.into_inner();
        self.check_key_size("key_pattern", &key_pattern)?;
        let start = match (revision_arg("start_revision", start_revision)?, initial) {
            (0, false) => Start::Now,
            (0, true) => Start::Snapshot,
            (from, false) => Start::Revision(from),
            (_, true) => {
                return Err(Status::invalid_argument(
                    "initial and start_revision exclude each other: a snapshot starts from now",
                ));
            }
        };
        let progress = match progress_interval_ms {
            0 => None,
            MIN_PROGRESS_MS.. => Some(Duration::from_millis(progress_interval_ms.unsigned_abs())),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "progress_interval_ms must be 0 (none) or at least {MIN_PROGRESS_MS}, got {progress_interval_ms}"
                )));
            }
        };
        // Taken before the store's place, and given back if that is refused.
        let share = self.shares.take(client).map_err(|at_share| {
            self.metrics.refused(LimitKey::SubscriptionsMaxPerClient);
            Status::resource_exhausted(at_share.to_string())
        })?;
        let subscription = self
            .store
            .subscribe(key_pattern, start)
            .map_err(|err| match err {
                SubscribeError::TooMany(_) => {
                    self.metrics.refused(LimitKey::SubscriptionsMax);
                    Status::resource_exhausted(err.to_string())
                }
                SubscribeError::Compacted { oldest, .. } => with_trailer(
                    Status::out_of_range(err.to_string()),
                    OLDEST_REVISION_TRAILER,
                    oldest,
                ),
            })?;
        Ok(Response::new(ChangeStream {
            last_revision: subscription.after(),
            subscription,
            shutdown: Box::pin(self.shutdown.clone().cancelled_owned()),
            progress: progress.map(|every| {
                let first = every.max(share.progress_floor());
                (every, Box::pin(tokio::time::sleep(first)))
            }),
            delivered: self.metrics.events_delivered(),
            ended: false,
            share,
            payer,
        }))
    }
}

/// The response stream of one Subscribe: the subscription's events until the client goes
/// away (dropping it unsubscribes), the subscriber lags (`RESOURCE_EXHAUSTED`) or the server
/// shuts down (`UNAVAILABLE`, after the changes already queued). Both statuses carry the
/// last revision sent, so the client can resume from the next one.
pub struct ChangeStream {
    subscription: Subscription,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The idle interval after which a PROGRESS event is sent, and its timer.
    progress: Option<(Duration, Pin<Box<Sleep>>)>,
    /// The revision the client is current to: where it resumes from, plus one.
    last_revision: u64,
    /// Counts the change events sent, not the PROGRESS ones.
    delivered: Counter,
    ended: bool,
    /// This stream's place in its client's share, given back when the stream is dropped.
    share: Share,
    /// Pays the caller's rate limit for the snapshot or replay; `None` with the limit off.
    payer: Option<ScanPayer>,
}

impl ChangeStream {
    fn end(&mut self, status: Status) -> Poll<Option<Result<ChangeEvent, Status>>> {
        self.ended = true;
        let status = with_trailer(status, LAST_REVISION_TRAILER, self.last_revision);
        Poll::Ready(Some(Err(status)))
    }

    fn send(&mut self, event: ChangeEvent) -> Poll<Option<Result<ChangeEvent, Status>>> {
        if event.change_type() != ChangeType::Progress {
            self.delivered.inc();
        }
        // A snapshot's events carry their keys' revisions, in key order: the client is current
        // to nothing until the snapshot's end marker.
        if !event.initial {
            self.last_revision = self.last_revision.max(event.revision.unsigned_abs());
        }
        if let Some((every, timer)) = &mut self.progress {
            // Slower than asked when the client has many streams open: its progress events
            // together stay within the budget.
            let wait = (*every).max(self.share.progress_floor());
            timer.as_mut().reset(tokio::time::Instant::now() + wait);
        }
        Poll::Ready(Some(Ok(event)))
    }
}

impl Stream for ChangeStream {
    type Item = Result<ChangeEvent, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        // Shutdown cancels this only once no more writes can be acknowledged, so the changes
        // still queued are the last ones: they are sent before the stream ends.
        let shutting_down = this.shutdown.as_mut().poll(cx).is_ready();
        // Read before polling: if the queue then turns out empty, every matching change up
        // to this revision has been sent, which is what a PROGRESS event promises.
        let published = this.subscription.published_revision();
        // What the snapshot or replay has read so far is paid for before it reads more.
        if this.subscription.reads_a_page_next()
            && let Some(payer) = &mut this.payer
            && payer.poll_pay(this.subscription.visited(), cx).is_pending()
        {
            if shutting_down {
                return this.end(Status::unavailable(
                    "server is shutting down; reconnect to another instance",
                ));
            }
            return Poll::Pending;
        }
        match Pin::new(&mut this.subscription).poll_next(cx) {
            Poll::Ready(Some(Ok(event))) => {
                let event = match event {
                    Event::Change(change) => to_event(&change, false),
                    Event::Initial(change) => to_event(&change, true),
                    Event::SnapshotEnd(revision) => progress_event(revision),
                };
                this.send(event)
            }
            // It sent part of a snapshot: the client must ask for one again.
            Poll::Ready(Some(Err(Ended::Lagged(lagged)))) if this.subscription.in_snapshot() => {
                this.end(Status::resource_exhausted(format!(
                    "{lagged}; the snapshot was cut short: subscribe again with initial"
                )))
            }
            Poll::Ready(Some(Err(Ended::Lagged(lagged)))) => {
                let last = this.last_revision;
                this.end(Status::resource_exhausted(format!(
                    "{lagged}; the last revision received was {last}: resume with start_revision {}",
                    last + 1
                )))
            }
            Poll::Ready(Some(Err(compacted @ Ended::Compacted { oldest, .. }))) => {
                let status = Status::out_of_range(compacted.to_string());
                this.end(with_trailer(status, OLDEST_REVISION_TRAILER, oldest))
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            // Pending with events still queued means the task's budget ran out: it is
            // woken again to send them.
            Poll::Pending if shutting_down && this.subscription.is_empty() => this.end(
                Status::unavailable("server is shutting down; reconnect to another instance"),
            ),
            Poll::Pending if shutting_down => Poll::Pending,
            Poll::Pending if !this.subscription.is_live() => Poll::Pending,
            Poll::Pending => {
                let idle = this
                    .progress
                    .as_mut()
                    .is_some_and(|(_, timer)| timer.as_mut().poll(cx).is_ready());
                if idle {
                    let revision = published.max(this.last_revision);
                    return this.send(progress_event(revision));
                }
                Poll::Pending
            }
        }
    }
}

fn to_event(change: &Change, initial: bool) -> ChangeEvent {
    let change_type = match change.kind {
        ChangeKind::Set => ChangeType::Set,
        ChangeKind::Delete | ChangeKind::Expire => ChangeType::Delete,
    };
    ChangeEvent {
        change_type: change_type.into(),
        key: change.key().to_string(),
        value: change.value().to_string(),
        timestamp: change.timestamp_ms,
        revision: wire(change.revision()),
        expired: change.kind == ChangeKind::Expire,
        initial,
        create_revision: wire(change.create_revision()),
        version: wire(change.version()),
    }
}

fn progress_event(revision: u64) -> ChangeEvent {
    ChangeEvent {
        change_type: ChangeType::Progress.into(),
        revision: wire(revision),
        ..ChangeEvent::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn service() -> KvService {
        let limits = Limits {
            max_key_bytes: 8,
            max_value_bytes: 16,
            max_page: 10,
            max_batch_ops: 4,
            max_batch_bytes: 1024,
            max_response_bytes: 4096,
            max_http_body_bytes: 1024,
        };
        let defaults = crate::config::Settings::default();
        let store = Store::new(defaults.subscriptions.store, defaults.history);
        let metrics = Arc::new(Metrics::new());
        let shares = Shares::new(defaults.subscriptions.per_client());
        KvService::new(store, limits, shares, CancellationToken::new(), metrics)
    }

    fn set(key: &str, value: &str) -> Request<SetRequest> {
        Request::new(SetRequest {
            key: key.into(),
            value: value.into(),
            ..SetRequest::default()
        })
    }

    #[tokio::test]
    async fn bad_keys_and_values_are_refused_and_nothing_is_stored() {
        let svc = service();
        for (key, value, says) in [
            ("", "v", "key must not be empty"),
            ("123456789", "v", "limits.max_key_bytes"),
            ("k", "12345678901234567", "limits.max_value_bytes"),
        ] {
            let status = svc.set(set(key, value)).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(status.message().contains(says), "{}", status.message());
        }
        assert!(svc.store.is_empty());
        // An empty key is invalid, not over a limit.
        assert_eq!(svc.metrics.refusals(LimitKey::MaxKeyBytes), 1);
        assert_eq!(svc.metrics.refusals(LimitKey::MaxValueBytes), 1);
        let get = Request::new(GetRequest { key: String::new() });
        assert_eq!(
            svc.get(get).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn on_shutdown_a_stream_sends_what_is_queued_then_ends_with_unavailable() {
        use tokio_stream::StreamExt;

        let shutdown = CancellationToken::new();
        let svc = KvService {
            shutdown: shutdown.clone(),
            ..service()
        };
        let request = Request::new(SubscribeRequest::default());
        let mut stream = svc.subscribe(request).await.unwrap().into_inner();
        for value in ["1", "2", "3"] {
            svc.set(set("k", value)).await.unwrap();
        }
        shutdown.cancel();
        for revision in 1..=3 {
            let event = stream.next().await.unwrap().unwrap();
            assert_eq!(event.revision, revision);
        }
        let status = stream.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.metadata().get(LAST_REVISION_TRAILER).unwrap(), "3");
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn values_at_the_limits_are_accepted() {
        let svc = service();
        svc.set(set("12345678", "1234567890123456")).await.unwrap();
        svc.set(set("e", "")).await.unwrap();
        let got = svc
            .get(Request::new(GetRequest { key: "e".into() }))
            .await
            .unwrap()
            .into_inner();
        assert!(got.found);
        assert_eq!(got.value, "");
        assert_eq!((got.mod_revision, got.version, got.revision), (2, 1, 2));
    }
}
