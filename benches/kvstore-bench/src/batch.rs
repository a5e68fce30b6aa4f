//! `batch`: Batch calls of gets and sets. Requests are written op by op and responses counted
//! by kind of result with the library's Batch wire code (`kvstore::grpc::batch`).

use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use indicatif::ProgressBar;
use kvstore::grpc::batch::{CountingBatchCodec, ResultCounts, WireOp};
use kvstore::token::BearerToken;
use prost::bytes::{Bytes, BytesMut};
use rand::rngs::SmallRng;
use tokio::task::JoinSet;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::connect::{MAX_MESSAGE_BYTES, connect_channels, join_all, progress_bar};
use crate::load_keys::preload_workload;
use crate::pacing::Schedule;
use crate::process::CpuWatch;
use crate::report::{CallReport, Latency, Tally, WorkloadReport, by_name};
use crate::workload::Workload;
use crate::{Load, Mix, Target};

#[derive(Debug, Args)]
pub struct BatchArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub load: Load,
    #[command(flatten)]
    pub mix: Mix,

    /// Operations per Batch call.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,

    /// Set every key of the key space before the run, so gets find their keys.
    #[arg(long)]
    pub preload: bool,
}

pub async fn batch(args: BatchArgs) -> anyhow::Result<CallReport> {
    let workload = Arc::new(Workload::new(&args.mix)?);
    let channels = connect_channels(&args.target, args.load.connections).await?;
    if args.preload {
        preload_workload(&args.target, args.load.connections, &workload).await?;
    }
    let clients: Vec<_> = channels.into_iter().map(BatchClient::new).collect();
    let cpu = CpuWatch::start(args.target.server_pid)?;
    let (end, limit) = args.load.bounds();
    let schedule = Schedule::closed(end, limit);
    let bar = progress_bar(limit.map(|calls| calls * args.batch_size), "ops");
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for client in &clients {
        for _ in 0..args.load.concurrency {
            workers.spawn(batch_worker(
                client.clone(),
                schedule.clone(),
                workload.clone(),
                args.batch_size,
                bar.clone(),
            ));
        }
    }
    let tally = Tally::merge_all(join_all(workers).await?);
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok(CallReport {
        mode: "batch",
        server: args.target.server.uri().to_string(),
        connections: args.load.connections,
        concurrency: args.load.concurrency,
        workload: WorkloadReport::from(&args.mix),
        idle_subscribers: None,
        batch_size: Some(args.batch_size),
        open_loop: None,
        seconds,
        calls: tally.calls,
        calls_per_s: tally.calls as f64 / seconds,
        ops_per_s: tally.ops as f64 / seconds,
        errors: by_name(&tally.errors),
        latency_us: Latency::of(&tally.latency),
        cpu: cpu.stop(tally.ops)?,
    })
}

pub async fn batch_worker(
    mut client: BatchClient,
    schedule: Arc<Schedule>,
    workload: Arc<Workload>,
    batch_size: u64,
    bar: ProgressBar,
) -> Tally {
    let mut rng: SmallRng = rand::make_rng();
    let mut tally = Tally::new();
    let mut request = BytesMut::new();
    let mut key = String::new();
    while let Some(ticket) = schedule.next().await {
        let mut expected = ResultCounts::default();
        for _ in 0..batch_size {
            let (index, get) = workload.pick(&mut rng);
            workload.keys.write_key(index, &mut key);
            let op = if get {
                expected.gets += 1;
                WireOp::Get { key: &key }
            } else {
                expected.sets += 1;
                WireOp::Set {
                    key: &key,
                    value: &workload.value,
                    expected_mod_revision: None,
                    ttl_ms: 0,
                }
            };
            op.put(&mut request);
        }
        let sent = Instant::now();
        let result = client
            .batch(request.split().freeze())
            .await
            .and_then(|counts| {
                if counts == expected {
                    Ok(batch_size)
                } else {
                    Err(Status::data_loss(format!(
                        "the Batch response has {counts:?} for a request of {expected:?}"
                    )))
                }
            });
        tally.record(ticket.due, sent, result);
        bar.inc(batch_size);
    }
    tally
}

/// The Batch calls of `kvstore-bench batch`. The request comes encoded (see
/// [`WireOp::put`]), and the response is only walked: its results are counted by kind, and
/// their values are neither copied nor checked as UTF-8. Decoding 100 `GetResponse`s took a
/// third of this tool's CPU, which on a machine shared with the server is taken from the
/// server; building 100 `BatchOp`s and their strings took a fifth of what was left.
#[derive(Clone)]
pub struct BatchClient(tonic::client::Grpc<InterceptedService<Channel, BearerToken>>);

impl BatchClient {
    pub fn new(channel: InterceptedService<Channel, BearerToken>) -> Self {
        Self(
            tonic::client::Grpc::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    pub async fn batch(&mut self, request: Bytes) -> Result<ResultCounts, Status> {
        self.0
            .ready()
            .await
            .map_err(|err| Status::unavailable(format!("the connection is not ready: {err}")))?;
        let path = PathAndQuery::from_static("/kvstore.KeyValueStore/Batch");
        let response = self
            .0
            .unary(Request::new(request), path, CountingBatchCodec)
            .await?;
        Ok(response.into_inner())
    }
}
