//! Hostile kinds that are plain gRPC clients (tonic) from the hostile address: subscriptions
//! in bulk, snapshots and replays cancelled as soon as they start, unary calls asking for
//! answers far over the server's limit.

use std::sync::Arc;
use std::time::Duration;

use kvstore::grpc::OLDEST_REVISION_TRAILER;
use kvstore::pb::{BatchOp, BatchRequest, GetRequest, ListRequest, SubscribeRequest, batch_op};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use super::attack::{Counts, Plan};
use super::{BIG_PREFIX, BIG_VALUES, REPLAY_PREFIX, SNAPSHOT_PREFIX};
use crate::connect::{Client, MAX_MESSAGE_BYTES, STREAMS_PER_CONNECTION, SUBSCRIBE_AT_ONCE};

/// How long a churned Subscribe may take to open and send its first message.
const CHURN_TIMEOUT: Duration = Duration::from_secs(10);

/// Subscribe calls of a churning kind in flight at once.
const CHURN_IN_FLIGHT: usize = 256;

/// big-answers: Gets in each Batch, cycling over the large values (500 of 1 MiB: about
/// 500 MB of answer).
const BIG_BATCH_GETS: usize = 500;

/// big-answers: the `limit` of each List, the server's default `limits.max_page`.
const BIG_LIST_LIMIT: u32 = 10_000;

fn code_name(status: &Status) -> String {
    format!("{:?}", status.code())
}

/// Opens one subscription per request, [`STREAMS_PER_CONNECTION`] to a connection, and
/// reads each in a task of `tasks` until `stop`, throwing its events away; counts how many
/// opened, how many were refused and why, and how many the server ended.
async fn hold_subscriptions(
    plan: &Arc<Plan>,
    requests: Vec<SubscribeRequest>,
    tasks: &mut JoinSet<()>,
    counts: &Counts,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let per_connection = STREAMS_PER_CONNECTION as usize;
    let mut clients = Vec::new();
    for _ in 0..requests.len().div_ceil(per_connection) {
        clients.push(plan.client(plan.endpoint.clone()).await?);
    }
    let at_once = Arc::new(Semaphore::new(SUBSCRIBE_AT_ONCE));
    let mut opening = JoinSet::new();
    for (i, request) in requests.into_iter().enumerate() {
        let (mut client, at_once) = (clients[i / per_connection].clone(), at_once.clone());
        opening.spawn(async move {
            let _opening = at_once.acquire().await.expect("never closed");
            client.subscribe(request).await.map(|r| r.into_inner())
        });
    }
    while let Some(opened) = opening.join_next().await {
        let mut stream = match opened? {
            Ok(stream) => stream,
            Err(status) => {
                counts.add(format!("refused: {}", code_name(&status)));
                continue;
            }
        };
        counts.add("subscriptions open");
        let (counts, stop) = (counts.clone(), stop.clone());
        tasks.spawn(async move {
            loop {
                let message = tokio::select! {
                    () = stop.cancelled() => return,
                    message = stream.message() => message,
                };
                match message {
                    Ok(Some(_)) => {}
                    Ok(None) => return counts.add("ended by the server: Ok"),
                    Err(status) => {
                        return counts.add(format!("ended by the server: {}", code_name(&status)));
                    }
                }
            }
        });
    }
    // The streams keep their connections open; the clients are no longer needed.
    drop(clients);
    Ok(())
}

/// subscription-hog: as many subscriptions as --subscription-hog from the one address, each
/// asking for progress every --subscription-hog-progress.
pub async fn subscription_hog(
    plan: &Arc<Plan>,
    tasks: &mut JoinSet<()>,
    counts: &Counts,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let progress_interval_ms =
        i64::try_from(plan.args.subscription_hog_progress.as_millis()).unwrap_or(i64::MAX);
    let requests = (0..plan.args.subscription_hog)
        .map(|i| SubscribeRequest {
            key_pattern: format!("hostile/hog/{i}/"),
            progress_interval_ms,
            ..SubscribeRequest::default()
        })
        .collect();
    hold_subscriptions(plan, requests, tasks, counts, stop).await
}

/// prefix-lengths: idle subscriptions at `a`, `aa`, ..., matching no key.
pub async fn prefix_lengths(
    plan: &Arc<Plan>,
    tasks: &mut JoinSet<()>,
    counts: &Counts,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let requests = (1..=plan.args.prefix_lengths as usize)
        .map(|len| SubscribeRequest {
            key_pattern: "a".repeat(len),
            ..SubscribeRequest::default()
        })
        .collect();
    hold_subscriptions(plan, requests, tasks, counts, stop).await
}

/// Calls `call` at `rate` a second on one connection, at most [`CHURN_IN_FLIGHT`] at once,
/// until `stop`, counting what each returns.
async fn churn<F, Fut>(
    plan: &Arc<Plan>,
    rate: f64,
    call: F,
    tasks: &mut JoinSet<()>,
    counts: &Counts,
    stop: &CancellationToken,
) -> anyhow::Result<()>
where
    F: Fn(Client) -> Fut + Send + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let client = plan.client(plan.endpoint.clone()).await?;
    let (counts, stop) = (counts.clone(), stop.clone());
    tasks.spawn(async move {
        let in_flight = Arc::new(Semaphore::new(CHURN_IN_FLIGHT));
        let mut calls = JoinSet::new();
        let mut every = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = every.tick() => {}
            }
            let Ok(place) = in_flight.clone().try_acquire_owned() else {
                counts.add("not sent: all in flight");
                continue;
            };
            let (call, counts, stop) = (call(client.clone()), counts.clone(), stop.clone());
            calls.spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    outcome = tokio::time::timeout(CHURN_TIMEOUT, call) => {
                        counts.add(outcome.unwrap_or_else(|_| "timed out".into()));
                    }
                }
                drop(place);
            });
        }
        while calls.join_next().await.is_some() {}
    });
    Ok(())
}

/// snapshot-churn: Subscribe with `initial` on the snapshot prefix, dropped after its first
/// message.
pub async fn snapshot_churn(
    plan: &Arc<Plan>,
    tasks: &mut JoinSet<()>,
    counts: &Counts,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let call = |mut client: Client| async move {
        let request = SubscribeRequest {
            key_pattern: SNAPSHOT_PREFIX.into(),
            initial: true,
            ..SubscribeRequest::default()
        };
        let mut stream = match client.subscribe(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return format!("refused: {}", code_name(&status)),
        };
        match stream.message().await {
            Ok(Some(_)) => "cancelled after the first message".into(),
            Ok(None) => "ended before a message".into(),
            Err(status) => format!("ended: {}", code_name(&status)),
        }
    };
    churn(plan, plan.args.snapshot_rate, call, tasks, counts, stop).await
}

/// replay-churn: Subscribe from the oldest retained revision on a prefix that matches
/// nothing, dropped once open. The oldest revision moves as others write: a call refused
/// as compacted says where it now is, and the next calls start there.
pub async fn replay_churn(
    plan: &Arc<Plan>,
    tasks: &mut JoinSet<()>,
    counts: &Counts,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let oldest = Arc::new(std::sync::atomic::AtomicI64::new(1));
    let call = move |mut client: Client| {
        let oldest = oldest.clone();
        async move {
            let request = SubscribeRequest {
                key_pattern: format!("{REPLAY_PREFIX}nothing/"),
                start_revision: oldest.load(std::sync::atomic::Ordering::Relaxed),
                ..SubscribeRequest::default()
            };
            match client.subscribe(request).await {
                Ok(_) => "cancelled once open".into(),
                Err(status) if status.code() == Code::OutOfRange => {
                    let now = status
                        .metadata()
                        .get(OLDEST_REVISION_TRAILER)
                        .and_then(|v| v.to_str().ok()?.parse().ok());
                    if let Some(now) = now {
                        oldest.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
                    }
                    "compacted: starting later".into()
                }
                Err(status) => format!("refused: {}", code_name(&status)),
            }
        }
    };
    churn(plan, plan.args.replay_rate, call, tasks, counts, stop).await
}

/// big-answers: --big-answers-connections connections, each calling in turn a Batch of
/// [`BIG_BATCH_GETS`] Gets of the large values and a List of their prefix with a limit of
/// [`BIG_LIST_LIMIT`], until `stop`, reading every answer; counts the Batches refused (and
/// whether for `limits.max_response_bytes`) and the List pages by their item count.
pub async fn big_answers(
    plan: &Arc<Plan>,
    tasks: &mut JoinSet<()>,
    counts: &Counts,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let ops: Vec<BatchOp> = (0..BIG_BATCH_GETS)
        .map(|i| BatchOp {
            op: Some(batch_op::Op::Get(GetRequest {
                key: format!("{BIG_PREFIX}{}", i % BIG_VALUES),
            })),
        })
        .collect();
    for _ in 0..plan.args.big_answers_connections {
        // Its decoder takes any answer the server sends: the server's limit is what is tried.
        let mut client = plan
            .client(plan.endpoint.clone())
            .await?
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (ops, counts, stop) = (ops.clone(), counts.clone(), stop.clone());
        tasks.spawn(async move {
            loop {
                let batch = client.batch(BatchRequest { ops: ops.clone() });
                let outcome = tokio::select! {
                    () = stop.cancelled() => return,
                    outcome = batch => outcome,
                };
                counts.add(match outcome {
                    Ok(answer) => {
                        format!("Batch answered: {} results", answer.get_ref().results.len())
                    }
                    Err(status)
                        if status.code() == Code::ResourceExhausted
                            && status.message().contains("limits.max_response_bytes") =>
                    {
                        "Batch refused: ResourceExhausted (limits.max_response_bytes)".into()
                    }
                    Err(status) => format!("Batch refused: {}", code_name(&status)),
                });
                let list = client.list(ListRequest {
                    prefix: BIG_PREFIX.into(),
                    limit: BIG_LIST_LIMIT,
                    ..ListRequest::default()
                });
                let outcome = tokio::select! {
                    () = stop.cancelled() => return,
                    outcome = list => outcome,
                };
                counts.add(match outcome {
                    Ok(page) => {
                        let page = page.into_inner();
                        let more = if page.more { ", more" } else { "" };
                        format!("List page: {} items{more}", page.items.len())
                    }
                    Err(status) => format!("List refused: {}", code_name(&status)),
                });
            }
        });
    }
    Ok(())
}
