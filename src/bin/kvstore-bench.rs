//! `kvstore-bench`: the load tool. It drives a running server over gRPC (unary Get/Set,
//! subscription fan-out, Batch, bulk loading) and reports throughput, hdrhistogram latencies and
//! CPU use as a table or one JSON object; `bare-server` serves the constant-answer fixture that is
//! the ceiling of any store built on this gRPC stack. Progress goes to stderr, results to stdout.

// The same allocator as kvstore-server, so the bare fixture is the ceiling of this stack as
// kvstore runs it, not a server handicapped by glibc malloc; the load tool gains too.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures_core::stream::BoxStream;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use kvstore::auth::BearerToken;
use kvstore::grpc::batch::{BatchReply, EncodedBatch};
use kvstore::pb::key_value_store_client::KeyValueStoreClient;
use kvstore::pb::key_value_store_server::{KeyValueStore, KeyValueStoreServer};
use kvstore::pb::{
    BatchOp, BatchRequest, ChangeEvent, DeleteRequest, DeleteResponse, GetRequest, GetResponse,
    ListRequest, ListResponse, SetRequest, SetResponse, SubscribeRequest, batch_op,
};
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::time::{TimeVal, TimeValLike};
use nix::unistd::{SysconfVar, sysconf};
use prost::bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{self, DecodeContext, WireType};
use rand::RngExt;
use rand::rngs::SmallRng;
use rand_distr::{Distribution, Zipf};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Request, Response, Status, Streaming};

/// Every call carries the `--token`, if one was given.
type Client = KeyValueStoreClient<InterceptedService<Channel, BearerToken>>;

/// Far above the server's batch limit (4 MiB by default), so a large batch's response is
/// limited by the server's settings, not by this client's decoder.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The zipf exponent: close to 1, as in YCSB, so a few keys take most of the load.
const ZIPF_EXPONENT: f64 = 0.99;

/// Keys start with this, then zero-padded digits up to `--key-size`.
const KEY_PREFIX: &str = "key:";

/// Keys per Batch call when `--preload` fills the key space.
const PRELOAD_BATCH: u64 = 1000;

/// The pacer never sleeps for less, to bound its wake-ups: above 20,000 calls/s it releases
/// several calls per wake-up, up to this much late.
const MIN_PACER_SLEEP: Duration = Duration::from_micros(50);

/// How long all subscriptions of a run may take to get their response headers.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Subscribe calls opening at once. The server sheds calls past `server.max_in_flight` (1024
/// by default) until they have their response headers, so 10,000 opened at once would fail.
const SUBSCRIBE_AT_ONCE: usize = 256;

/// Subscription streams per connection, by default: half the server's limit per connection
/// (200 by default).
const STREAMS_PER_CONNECTION: u32 = 100;

/// How often the fan-out run checks whether every subscriber has caught up.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// How often the server's memory is read while subscribers are held.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Subscribers on one connection of never-reading subscribers.
const NEVER_READING_PER_CONNECTION: usize = 100;

/// After a hostile round, how long its never-reading subscribers may take to read what
/// they were sent and reach the end of their streams.
const NEVER_READING_DRAIN: Duration = Duration::from_secs(30);

/// Load generator for a kvstore server, and the bare tonic server it is compared with.
#[derive(Debug, Parser)]
#[command(name = "kvstore-bench", version)]
struct Cli {
    /// Print the results as one JSON object instead of a table.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Unary Get/Set calls: throughput, latency percentiles and errors by status code.
    Unary(UnaryArgs),
    /// Subscribers on prefixes and paced writers: delivery rate and latency, gaps, reorders.
    Fanout(FanoutArgs),
    /// Batch calls of gets and sets: key operations per second and call latency.
    Batch(BatchArgs),
    /// Serve the bench fixture: kvstore.KeyValueStore answering constants, nothing behind it.
    BareServer(BareServerArgs),
    /// Set keys `key:000000000000`... through Batch, e.g. to compare memory use.
    LoadKeys(LoadKeysArgs),
    /// Hold many Subscribe streams open, optionally with writes, then close them: the
    /// server's memory per subscriber and after they leave (--server-pid).
    Subscribers(SubscribersArgs),
    /// Unary load from a well-behaved client in rounds without and with hostile clients
    /// (never-reading subscribers, silent connections, a flooder past its rate limit),
    /// alternating: its throughput and latency with over without, side by side.
    Hostile(HostileArgs),
}

#[derive(Debug, Args)]
struct Target {
    /// Server address: host:port or http://host:port.
    #[arg(long, value_parser = kvstore::endpoint::parse)]
    server: Endpoint,

    /// The server's process ID, to report its CPU time per operation (read from /proc).
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,

    /// Bearer token for a server with authentication on.
    #[arg(long, env = "KVSTORE_TOKEN", hide_env_values = true, value_parser = BearerToken::parse)]
    token: Option<BearerToken>,

    /// Local address of this run's connections, so that a server limiting by address counts
    /// it apart from other runs (on Linux every 127.x.y.z is loopback).
    #[arg(long, value_name = "IP")]
    source: Option<IpAddr>,
}

#[derive(Debug, Args)]
struct Load {
    /// Connections to open, one tonic Channel (one HTTP/2 connection) each.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,

    /// Calls in flight per connection.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,

    /// How long to run: 10s, 1m.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,

    /// Stop after this many calls instead of after --duration.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,
}

impl Load {
    /// When the run ends, by time or by count, counted from now.
    fn bounds(&self) -> (Option<Instant>, Option<u64>) {
        match self.requests {
            Some(count) => (None, Some(count)),
            None => (Some(Instant::now() + self.duration), None),
        }
    }
}

#[derive(Debug, Args)]
struct KeyArgs {
    /// Keys in the key space: key:000000000000 to key:N-1.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,

    /// Bytes per key: `key:` and zero-padded digits.
    #[arg(long, default_value_t = 16)]
    key_size: usize,

    /// Bytes per value written.
    #[arg(long, default_value_t = 64)]
    value_size: usize,
}

#[derive(Debug, Args)]
struct Mix {
    /// Fraction of operations that are gets; the rest are sets.
    #[arg(long, default_value_t = 0.9, value_parser = parse_ratio)]
    get_ratio: f64,

    /// How keys are picked.
    #[arg(long, value_enum, default_value_t = KeyDistribution::Uniform)]
    distribution: KeyDistribution,

    #[command(flatten)]
    keys: KeyArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum KeyDistribution {
    /// Every key equally likely.
    Uniform,
    /// Zipf with s = 0.99: key:000000000000 is the hottest.
    Zipf,
}

#[derive(Debug, Args)]
struct UnaryArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    load: Load,
    #[command(flatten)]
    mix: Mix,

    /// Send this many calls per second in total, open-loop: latency counts from when each call
    /// was due, so a stalled server shows as latency rather than as calls never sent. Without
    /// it, each worker sends as soon as its previous call returns.
    #[arg(long, value_name = "CALLS_PER_S", value_parser = parse_rate)]
    rate: Option<f64>,

    /// Set every key of the key space before the run, so gets find their keys.
    #[arg(long)]
    preload: bool,

    /// Subscriptions on prefixes no key of the run matches (`idle:N/`), open throughout it
    /// on connections of their own: what subscribers cost calls they never see.
    #[arg(long, default_value_t = 0, value_name = "N")]
    idle_subscribers: u32,
}

#[derive(Debug, Args)]
struct BatchArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    load: Load,
    #[command(flatten)]
    mix: Mix,

    /// Operations per Batch call.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,

    /// Set every key of the key space before the run, so gets find their keys.
    #[arg(long)]
    preload: bool,
}

#[derive(Debug, Args)]
struct FanoutArgs {
    #[command(flatten)]
    target: Target,

    /// Subscriptions to open, spread evenly over the prefixes.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    subscribers: u32,

    /// Distinct prefixes subscribed to; the writes go to them in turn.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    prefixes: u32,

    /// Writers, each with its own connection and one Set in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    writers: u32,

    /// Writes per second, all writers together.
    #[arg(long, default_value_t = 100.0, value_name = "WRITES_PER_S", value_parser = parse_rate)]
    rate: f64,

    /// How long to write: 10s, 1m.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,

    /// Bytes per value; each value is the send instant in nanoseconds, zero-padded to this.
    #[arg(long, default_value_t = 20)]
    value_size: usize,

    /// Subscription streams per connection (the server allows 200 by default).
    #[arg(long, default_value_t = STREAMS_PER_CONNECTION, value_parser = clap::value_parser!(u32).range(1..))]
    streams_per_connection: u32,

    /// After the last write, how long to wait for subscribers to receive every event.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain: Duration,
}

#[derive(Debug, Args)]
struct BareServerArgs {
    /// Address to listen on; port 0 picks a free port, printed on stdout.
    #[arg(long)]
    listen: SocketAddr,

    /// Bytes of the constant value that every Get answers, to match the real server's reply.
    #[arg(long, default_value_t = 64)]
    value_size: usize,
}

#[derive(Debug, Args)]
struct LoadKeysArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    keys: KeyArgs,

    /// Keys per Batch call.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,

    /// Connections to open.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,

    /// Batch calls in flight per connection.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,
}

#[derive(Debug, Args)]
struct SubscribersArgs {
    #[command(flatten)]
    target: Target,

    /// Subscriptions to hold open, spread evenly over the prefixes.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    subscribers: u32,

    /// Distinct prefixes subscribed to; the writes go to them in turn.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    prefixes: u32,

    /// Subscription streams per connection (the server allows 200 by default).
    #[arg(long, default_value_t = STREAMS_PER_CONNECTION, value_parser = clap::value_parser!(u32).range(1..))]
    streams_per_connection: u32,

    /// How long to hold them idle, once all are open, before any write.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    hold: Duration,

    /// Then write this many times per second, all writers together, for --duration; without
    /// it, nothing is written.
    #[arg(long, value_name = "WRITES_PER_S", value_parser = parse_rate)]
    rate: Option<f64>,

    /// Writers, each with its own connection and one Set in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    writers: u32,

    /// How long to write: 10s, 1m.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,

    /// Bytes per value; each value is the send instant in nanoseconds, zero-padded to this.
    #[arg(long, default_value_t = 20)]
    value_size: usize,

    /// After the last write, how long to wait for subscribers to receive every event.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    drain: Duration,

    /// After every subscriber has disconnected, how long to wait before reading the server's
    /// memory again: it frees theirs in its own tasks, and the allocator returns pages later.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    settle: Duration,
}

/// A kind of hostile client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Hostile {
    /// Subscribers to every key whose application never reads: once their HTTP/2 window and
    /// their queue on the server (subscriptions.buffer) are full, they lag.
    NeverReading,
    /// TCP connections that never send a byte, each reopened as soon as the server closes
    /// it (server.handshake_timeout).
    Silent,
    /// Clients calling Get as fast as they can, past the server's rate_limit.per_client.
    Flood,
    /// All three at once.
    All,
}

impl Hostile {
    fn includes(self, kind: Hostile) -> bool {
        self == kind || self == Hostile::All
    }
}

#[derive(Debug, Args)]
struct HostileArgs {
    #[command(flatten)]
    target: Target,
    /// The well-behaved client's load, in each round (--duration is per round).
    #[command(flatten)]
    load: Load,
    #[command(flatten)]
    mix: Mix,

    /// The well-behaved client's calls per second, open-loop; without it, as fast as the
    /// server answers. It is one client: keep it under the server's rate_limit.per_client.
    #[arg(long, value_name = "CALLS_PER_S", value_parser = parse_rate)]
    rate: Option<f64>,

    /// Set every key of the key space before the rounds, so gets find their keys.
    #[arg(long)]
    preload: bool,

    /// Which hostile clients to measure, each in rounds of its own, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "never-reading,silent,flood,all"
    )]
    hostile: Vec<Hostile>,

    /// Pairs of rounds (without, with) per hostile kind; their order alternates, so that a
    /// drift of the machine's speed does not favour either side.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,

    /// Never-reading subscribers.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    never_reading: u32,

    /// The never-reading subscribers' HTTP/2 stream window, in bytes: what the server can
    /// send one before its queue starts to fill.
    #[arg(long, default_value_t = 16 * 1024)]
    never_reading_window: u32,

    /// Silent connections held open at once.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    silent: u32,

    /// Flooder connections.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    flood_connections: u32,

    /// Get calls in flight per flooder connection.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    flood_concurrency: u32,

    /// Local address of every hostile connection, so that a server limiting by address
    /// counts them apart from the well-behaved client (on Linux every 127.x.y.z is loopback).
    #[arg(long, default_value = "127.0.0.2")]
    hostile_source: IpAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Unary(args) => print(&unary(args).await?, cli.json),
        Command::Fanout(args) => print(&fanout(args).await?, cli.json),
        Command::Batch(args) => print(&batch(args).await?, cli.json),
        Command::LoadKeys(args) => print(&load_keys(args).await?, cli.json),
        Command::Subscribers(args) => print(&subscribers(args).await?, cli.json),
        Command::Hostile(args) => print(&hostile(args).await?, cli.json),
        Command::BareServer(args) => bare_server(args).await,
    }
}

// ---------------------------------------------------------------------------------------------
// unary

async fn unary(args: UnaryArgs) -> anyhow::Result<CallReport> {
    let workload = Arc::new(Workload::new(&args.mix)?);
    let clients = connect(&args.target, args.load.connections).await?;
    if args.preload {
        preload(&clients, workload.keys, &workload.value, PRELOAD_BATCH, 2).await?;
    }
    // Every one is open (has its response headers) before the measured load starts.
    let idle_patterns = (0..args.idle_subscribers)
        .map(|i| format!("idle:{i}/"))
        .collect();
    let (_idle_clients, idle_streams) =
        subscribe_all(&args.target, idle_patterns, STREAMS_PER_CONNECTION as usize).await?;
    let stop_idle = CancellationToken::new();
    let mut idle = JoinSet::new();
    for (_, stream) in idle_streams {
        idle.spawn(drain(stream, stop_idle.clone()));
    }
    let cpu = CpuWatch::start(args.target.server_pid)?;
    let UnaryRun {
        tally,
        seconds,
        behind_schedule,
    } = run_unary(&clients, &workload, &args.load, args.rate).await?;
    // Before the idle subscriptions close, so that closing them is not counted.
    let cpu = cpu.stop(tally.ops)?;
    stop_idle.cancel();
    let mut idle_ended = HashMap::new();
    for code in join_all(idle).await?.into_iter().flatten() {
        *idle_ended.entry(code).or_default() += 1;
    }
    if !idle_ended.is_empty() {
        // The run measured fewer subscribers than it claims.
        anyhow::bail!(
            "idle subscriptions ended during the run: {}",
            counts_row(&by_name(&idle_ended))
        );
    }
    let open_loop = match (args.rate, behind_schedule) {
        (Some(rate), Some(behind_schedule)) => Some(OpenLoopReport {
            rate,
            behind_schedule,
            send_lag_us: Latency::of(&tally.lag),
        }),
        _ => None,
    };
    Ok(CallReport {
        mode: "unary",
        server: args.target.server.uri().to_string(),
        connections: args.load.connections,
        concurrency: args.load.concurrency,
        workload: WorkloadReport::from(&args.mix),
        idle_subscribers: Some(args.idle_subscribers),
        batch_size: None,
        open_loop,
        seconds,
        calls: tally.calls,
        calls_per_s: tally.calls as f64 / seconds,
        ops_per_s: tally.ops as f64 / seconds,
        errors: by_name(&tally.errors),
        latency_us: Latency::of(&tally.latency),
        cpu,
    })
}

/// One stretch of unary calls, measured.
struct UnaryRun {
    tally: Tally,
    seconds: f64,
    /// Open loop only: calls that fell due but were never sent.
    behind_schedule: Option<u64>,
}

/// Runs `load` on `clients`, open-loop at `rate` calls/s if given.
async fn run_unary(
    clients: &[Client],
    workload: &Arc<Workload>,
    load: &Load,
    rate: Option<f64>,
) -> anyhow::Result<UnaryRun> {
    let (end, limit) = load.bounds();
    let (schedule, pacer) = match rate {
        Some(rate) => {
            let (schedule, pacer) = Schedule::open(rate, end, limit);
            (schedule, Some(pacer))
        }
        None => (Schedule::closed(end, limit), None),
    };
    let bar = progress_bar(limit, "calls");
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for client in clients {
        for _ in 0..load.concurrency {
            workers.spawn(unary_worker(
                client.clone(),
                schedule.clone(),
                workload.clone(),
                bar.clone(),
            ));
        }
    }
    let tally = Tally::merge_all(join_all(workers).await?);
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let behind_schedule = pacer.map(Pacer::behind_schedule).transpose()?;
    Ok(UnaryRun {
        tally,
        seconds,
        behind_schedule,
    })
}

async fn unary_worker(
    mut client: Client,
    schedule: Arc<Schedule>,
    workload: Arc<Workload>,
    bar: ProgressBar,
) -> Tally {
    let mut rng: SmallRng = rand::make_rng();
    let mut tally = Tally::new();
    while let Some(ticket) = schedule.next().await {
        let call = workload.call(&mut rng);
        let sent = Instant::now();
        let result = match call {
            Call::Get(request) => client.get(request).await.map(drop),
            Call::Set(request) => client.set(request).await.map(drop),
        };
        tally.record(ticket.due, sent, result.map(|()| 1));
        bar.inc(1);
    }
    tally
}

// ---------------------------------------------------------------------------------------------
// batch

async fn batch(args: BatchArgs) -> anyhow::Result<CallReport> {
    let workload = Arc::new(Workload::new(&args.mix)?);
    let channels = connect_channels(&args.target, args.load.connections).await?;
    if args.preload {
        let clients: Vec<_> = channels.iter().cloned().map(client).collect();
        preload(&clients, workload.keys, &workload.value, PRELOAD_BATCH, 2).await?;
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

async fn batch_worker(
    mut client: BatchClient,
    schedule: Arc<Schedule>,
    workload: Arc<Workload>,
    batch_size: u64,
    bar: ProgressBar,
) -> Tally {
    let mut rng: SmallRng = rand::make_rng();
    let mut tally = Tally::new();
    let mut request = BytesMut::new();
    let mut key = Vec::new();
    while let Some(ticket) = schedule.next().await {
        let mut expected = BatchSummary::default();
        for _ in 0..batch_size {
            let (index, get) = workload.pick(&mut rng);
            workload.keys.write_key(index, &mut key);
            if get {
                expected.gets += 1;
                put_batch_op(&mut request, &key, None);
            } else {
                expected.sets += 1;
                put_batch_op(&mut request, &key, Some(workload.value.as_bytes()));
            }
        }
        let sent = Instant::now();
        let result = client
            .batch(request.split().freeze())
            .await
            .and_then(|summary| {
                if summary == expected {
                    Ok(batch_size)
                } else {
                    Err(Status::data_loss(format!(
                        "the Batch response has {summary:?} for a request of {expected:?}"
                    )))
                }
            });
        tally.record(ticket.due, sent, result);
        bar.inc(batch_size);
    }
    tally
}

/// Appends one `BatchOp` to an encoded `BatchRequest` (field 1, `ops`): a get of `key`, or a
/// set of `key` to `value`. Written straight into the request, so an op costs no message,
/// no string and no allocation of its own.
fn put_batch_op(request: &mut BytesMut, key: &[u8], value: Option<&[u8]>) {
    // Every field here is length-delimited with a tag under 16: a one-byte field key.
    let field_len = |len: usize| 1 + encoding::encoded_len_varint(len as u64) + len;
    let put_field = |request: &mut BytesMut, tag: u32, len: usize| {
        encoding::encode_key(tag, WireType::LengthDelimited, request);
        encoding::encode_varint(len as u64, request);
    };
    // GetRequest { key = 1 } or SetRequest { key = 1, value = 2 }, as BatchOp's get = 1 or
    // set = 2.
    let (op, inner) = match value {
        None => (1, field_len(key.len())),
        Some(value) => (2, field_len(key.len()) + field_len(value.len())),
    };
    put_field(request, 1, field_len(inner));
    put_field(request, op, inner);
    put_field(request, 1, key.len());
    request.put_slice(key);
    if let Some(value) = value {
        put_field(request, 2, value.len());
        request.put_slice(value);
    }
}

/// The Batch calls of `kvstore-bench batch`. The request comes encoded (see
/// [`put_batch_op`]), and the response is only walked: its results are counted by kind, and
/// their values are neither copied nor checked as UTF-8. Decoding 100 `GetResponse`s took a
/// third of this tool's CPU, which on a machine shared with the server is taken from the
/// server; building 100 `BatchOp`s and their strings took a fifth of what was left.
#[derive(Clone)]
struct BatchClient(tonic::client::Grpc<InterceptedService<Channel, BearerToken>>);

impl BatchClient {
    fn new(channel: InterceptedService<Channel, BearerToken>) -> Self {
        Self(
            tonic::client::Grpc::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    async fn batch(&mut self, request: Bytes) -> Result<BatchSummary, Status> {
        self.0
            .ready()
            .await
            .map_err(|err| Status::unavailable(format!("the connection is not ready: {err}")))?;
        let path = PathAndQuery::from_static("/kvstore.KeyValueStore/Batch");
        let response = self
            .0
            .unary(Request::new(request), path, BatchCodec)
            .await?;
        Ok(response.into_inner())
    }
}

/// What a Batch response holds, by kind of result.
#[derive(Debug, Default, PartialEq, Eq)]
struct BatchSummary {
    gets: u64,
    sets: u64,
    /// Deletes, conflicts and results of no kind this tool knows: none of its ops should get one.
    others: u64,
}

impl BatchSummary {
    /// Walks an encoded `BatchResponse`, counting its results (field 1) by the field number
    /// of the one field each holds: the `BatchResult.result` oneof.
    fn walk(buf: &mut impl Buf) -> Result<Self, String> {
        let invalid = |err: prost::DecodeError| err.to_string();
        let mut summary = Self::default();
        while buf.has_remaining() {
            let (tag, wire_type) = encoding::decode_key(buf).map_err(invalid)?;
            if (tag, wire_type) != (1, WireType::LengthDelimited) {
                encoding::skip_field(wire_type, tag, buf, DecodeContext::default())
                    .map_err(invalid)?;
                continue;
            }
            let len = usize::try_from(encoding::decode_varint(buf).map_err(invalid)?)
                .unwrap_or(usize::MAX);
            if len > buf.remaining() {
                return Err(format!(
                    "a result of {len} bytes, but only {} are left",
                    buf.remaining()
                ));
            }
            let mut result = buf.take(len);
            let kind = if result.has_remaining() {
                encoding::decode_key(&mut result).map_err(invalid)?.0
            } else {
                0
            };
            match kind {
                1 => summary.gets += 1,
                2 => summary.sets += 1,
                _ => summary.others += 1,
            }
            result.advance(result.remaining());
        }
        Ok(summary)
    }
}

/// The request as [`put_batch_op`] encoded it; [`BatchSummary::walk`] for the response.
#[derive(Clone, Copy)]
struct BatchCodec;

impl Codec for BatchCodec {
    type Encode = Bytes;
    type Decode = BatchSummary;
    type Encoder = BatchCodec;
    type Decoder = BatchCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for BatchCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, request: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put(request);
        Ok(())
    }
}

impl Decoder for BatchCodec {
    type Item = BatchSummary;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<BatchSummary>, Status> {
        BatchSummary::walk(buf)
            .map(Some)
            .map_err(|err| Status::internal(format!("decoding a Batch response: {err}")))
    }
}

// ---------------------------------------------------------------------------------------------
// load-keys

async fn load_keys(args: LoadKeysArgs) -> anyhow::Result<LoadReport> {
    let keys = KeySpace::new(&args.keys)?;
    let value: Arc<str> = "x".repeat(args.keys.value_size).into();
    let clients = connect(&args.target, args.connections).await?;
    let cpu = CpuWatch::start(args.target.server_pid)?;
    let started = Instant::now();
    preload(&clients, keys, &value, args.batch_size, args.concurrency).await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(LoadReport {
        mode: "load-keys",
        server: args.target.server.uri().to_string(),
        keys: keys.count,
        key_size: args.keys.key_size,
        value_size: args.keys.value_size,
        batch_size: args.batch_size,
        seconds,
        keys_per_s: keys.count as f64 / seconds,
        cpu: cpu.stop(keys.count)?,
    })
}

/// Sets every key of `keys` to `value`, `batch_size` keys per Batch call, with
/// `per_connection` calls in flight on each client.
async fn preload(
    clients: &[Client],
    keys: KeySpace,
    value: &Arc<str>,
    batch_size: u64,
    per_connection: u32,
) -> anyhow::Result<()> {
    let count = keys.count;
    let chunks = count.div_ceil(batch_size);
    let next_chunk = Arc::new(AtomicU64::new(0));
    let bar = progress_bar(Some(count), "keys loaded");
    let mut workers = JoinSet::new();
    for client in clients {
        for _ in 0..per_connection {
            let (mut client, value, next_chunk, bar) = (
                client.clone(),
                value.clone(),
                next_chunk.clone(),
                bar.clone(),
            );
            workers.spawn(async move {
                loop {
                    let chunk = next_chunk.fetch_add(1, Ordering::Relaxed);
                    if chunk >= chunks {
                        return anyhow::Ok(());
                    }
                    let range = chunk * batch_size..((chunk + 1) * batch_size).min(count);
                    let ops = range
                        .clone()
                        .map(|index| {
                            Call::Set(SetRequest {
                                key: keys.key(index),
                                value: value.to_string(),
                                ..SetRequest::default()
                            })
                            .into()
                        })
                        .collect();
                    client
                        .batch(BatchRequest { ops })
                        .await
                        .with_context(|| format!("setting keys {range:?}"))?;
                    bar.inc(range.end - range.start);
                }
            });
        }
    }
    for result in join_all(workers).await? {
        result?;
    }
    bar.finish_and_clear();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// fanout

async fn fanout(args: FanoutArgs) -> anyhow::Result<FanoutReport> {
    let audience = Audience::open(
        &args.target,
        args.subscribers as usize,
        args.prefixes,
        args.streams_per_connection as usize,
    )
    .await?;
    let writer_clients = connect(&args.target, args.writers).await?;
    let cpu = CpuWatch::start(args.target.server_pid)?;
    let writes = audience
        .write(writer_clients, args.rate, args.duration, args.value_size)
        .await?;
    audience.wait_caught_up(&writes.expected, args.drain).await;
    let delivery_seconds = writes.started.elapsed().as_secs_f64();
    let subscriber_connections = audience.clients.len();
    let deliveries = audience.finish(&writes.expected).await?;
    let count = writes.count();
    Ok(FanoutReport {
        mode: "fanout",
        server: args.target.server.uri().to_string(),
        subscribers: args.subscribers,
        prefixes: args.prefixes,
        subscriber_connections,
        writers: args.writers,
        target_rate: args.rate,
        write_seconds: writes.seconds,
        writes: count,
        writes_per_s: count as f64 / writes.seconds,
        behind_schedule: writes.behind_schedule,
        write_errors: by_name(&writes.errors),
        events_expected: deliveries.expected,
        events_delivered: deliveries.delivered,
        events_per_s: deliveries.delivered as f64 / delivery_seconds,
        missing: deliveries.check.missing,
        reordered: deliveries.check.reordered,
        unacknowledged: deliveries.check.unacknowledged,
        streams_ended: by_name(&deliveries.ended),
        delivery_latency_us: Latency::of(&deliveries.latency),
        cpu: cpu.stop(deliveries.delivered)?,
    })
}

/// Subscribers on the prefixes of one run, each read by a task of its own until
/// [`Audience::finish`]: what `fanout` and `subscribers` share.
struct Audience {
    /// Send and receive instants are both nanoseconds since this one instant, so a delivery
    /// latency is a difference of two readings of one monotonic clock.
    epoch: Instant,
    prefixes: Arc<[String]>,
    /// Each subscriber's index in `prefixes`.
    prefix_of: Vec<usize>,
    /// They keep the subscribers' connections open.
    clients: Vec<Client>,
    states: Vec<Arc<Delivery>>,
    readers: JoinSet<Received>,
    stop: CancellationToken,
    bar: ProgressBar,
}

/// The acknowledged writes of a run.
struct Writes {
    /// Revisions of the acknowledged writes, per prefix, ascending.
    expected: Vec<Vec<u64>>,
    errors: HashMap<Code, u64>,
    /// Writes that fell due but were never sent, every writer being busy.
    behind_schedule: u64,
    started: Instant,
    seconds: f64,
}

impl Writes {
    fn count(&self) -> u64 {
        self.expected.iter().map(|r| r.len() as u64).sum()
    }
}

/// What the subscribers of a run received, checked against the acknowledged writes.
struct Deliveries {
    latency: Histogram<u64>,
    check: SequenceCheck,
    /// Streams that ended before the run stopped them, by status.
    ended: HashMap<Code, u64>,
    expected: u64,
    delivered: u64,
}

impl Audience {
    /// Opens `subscribers` subscriptions, `per_connection` to a connection, on `prefixes`
    /// prefixes of this run alone (so no other writes reach them and every event must match
    /// an acknowledged write of this run), and starts reading them.
    async fn open(
        target: &Target,
        subscribers: usize,
        prefixes: u32,
        per_connection: usize,
    ) -> anyhow::Result<Self> {
        let epoch = Instant::now();
        let run = format!(
            "bench/{}-{}/",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis()
        );
        let prefixes: Arc<[String]> = (0..prefixes).map(|p| format!("{run}{p}/")).collect();
        // Contiguous blocks of subscribers share a prefix, and so mostly a connection too.
        let prefix_of: Vec<usize> = (0..subscribers)
            .map(|subscriber| subscriber * prefixes.len() / subscribers)
            .collect();
        let patterns = prefix_of.iter().map(|&p| prefixes[p].clone()).collect();
        let (clients, opened) = subscribe_all(target, patterns, per_connection).await?;

        let stop = CancellationToken::new();
        let bar = progress_bar(None, "events");
        let states: Vec<Arc<Delivery>> = (0..subscribers).map(|_| Arc::default()).collect();
        let mut readers = JoinSet::new();
        for (subscriber, stream) in opened {
            readers.spawn(receive(
                subscriber,
                stream,
                states[subscriber].clone(),
                stop.clone(),
                epoch,
                bar.clone(),
            ));
        }
        Ok(Self {
            epoch,
            prefixes,
            prefix_of,
            clients,
            states,
            readers,
            stop,
            bar,
        })
    }

    /// Writes to the prefixes in turn at `rate` writes/s for `duration`, one Set in flight
    /// per writer client.
    async fn write(
        &self,
        writer_clients: Vec<Client>,
        rate: f64,
        duration: Duration,
        value_size: usize,
    ) -> anyhow::Result<Writes> {
        let started = Instant::now();
        let (schedule, pacer) = Schedule::open(rate, Some(started + duration), None);
        let mut writers = JoinSet::new();
        for (writer, client) in writer_clients.into_iter().enumerate() {
            writers.spawn(write(
                client,
                writer,
                schedule.clone(),
                self.prefixes.clone(),
                self.epoch,
                value_size,
            ));
        }
        let written = join_all(writers).await?;
        let seconds = started.elapsed().as_secs_f64();
        let behind_schedule = pacer.behind_schedule()?;

        let mut expected = vec![Vec::new(); self.prefixes.len()];
        let mut errors = HashMap::new();
        for writer in &written {
            for &(prefix, revision) in &writer.acked {
                expected[prefix].push(revision);
            }
            for (&code, &count) in &writer.errors {
                *errors.entry(code).or_default() += count;
            }
        }
        for revisions in &mut expected {
            revisions.sort_unstable();
        }
        Ok(Writes {
            expected,
            errors,
            behind_schedule,
            started,
            seconds,
        })
    }

    /// Waits, at most `drain`, until every subscriber has received the last acknowledged
    /// write to its prefix or has ended.
    async fn wait_caught_up(&self, expected: &[Vec<u64>], drain: Duration) {
        let caught_up = || {
            self.states.iter().enumerate().all(|(subscriber, state)| {
                state.ended.load(Ordering::Acquire)
                    || expected[self.prefix_of[subscriber]]
                        .last()
                        .is_none_or(|&last| state.last_revision.load(Ordering::Acquire) >= last)
            })
        };
        let drain_until = Instant::now() + drain;
        while !caught_up() && Instant::now() < drain_until {
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Stops reading, closes every subscription and its connection, and checks what each
    /// subscriber received against `expected`.
    async fn finish(self, expected: &[Vec<u64>]) -> anyhow::Result<Deliveries> {
        self.stop.cancel();
        let received = join_all(self.readers).await?;
        drop(self.clients);
        self.bar.finish_and_clear();

        let mut deliveries = Deliveries {
            latency: new_histogram(),
            check: SequenceCheck::default(),
            ended: HashMap::new(),
            expected: 0,
            delivered: 0,
        };
        for subscriber in &received {
            for &nanos in &subscriber.latencies {
                record(&mut deliveries.latency, nanos);
            }
            let expected = &expected[self.prefix_of[subscriber.index]];
            deliveries.expected += expected.len() as u64;
            deliveries.delivered += subscriber.revisions.len() as u64;
            deliveries
                .check
                .add(check_sequence(&subscriber.revisions, expected));
            if let Some(code) = subscriber.ended {
                *deliveries.ended.entry(code).or_default() += 1;
            }
        }
        Ok(deliveries)
    }
}

// ---------------------------------------------------------------------------------------------
// subscribers

async fn subscribers(args: SubscribersArgs) -> anyhow::Result<SubscribersReport> {
    let pid = args.target.server_pid;
    let rss = || pid.map(process_rss).transpose();
    let baseline = rss()?;
    let opening = Instant::now();
    let audience = Audience::open(
        &args.target,
        args.subscribers as usize,
        args.prefixes,
        args.streams_per_connection as usize,
    )
    .await?;
    let open_seconds = opening.elapsed().as_secs_f64();
    let open = rss()?;
    let ((), idle_peak) = with_peak_rss(pid, tokio::time::sleep(args.hold)).await?;

    let (writes, write_peak) = match args.rate {
        Some(rate) => {
            let writer_clients = connect(&args.target, args.writers).await?;
            let (writes, peak) = with_peak_rss(pid, async {
                let writes = audience
                    .write(writer_clients, rate, args.duration, args.value_size)
                    .await?;
                audience.wait_caught_up(&writes.expected, args.drain).await;
                anyhow::Ok(writes)
            })
            .await?;
            (Some(writes?), peak)
        }
        None => (None, None),
    };
    let subscriber_connections = audience.clients.len();
    let no_writes = vec![Vec::new(); args.prefixes as usize];
    let expected = writes.as_ref().map_or(&no_writes, |w| &w.expected);
    let deliveries = audience.finish(expected).await?;
    tokio::time::sleep(args.settle).await;
    let after = rss()?;

    let memory = match (baseline, open, after) {
        (Some(baseline), Some(open), Some(after)) => {
            let peak = [idle_peak, write_peak, Some(open)]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(open);
            let per_subscriber =
                |bytes: u64| bytes.saturating_sub(baseline) as f64 / f64::from(args.subscribers);
            Some(MemoryReport {
                baseline_bytes: baseline,
                open_bytes: open,
                peak_bytes: peak,
                after_bytes: after,
                idle_bytes_per_subscriber: per_subscriber(open),
                peak_bytes_per_subscriber: per_subscriber(peak),
                retained_bytes: after as i64 - baseline as i64,
            })
        }
        _ => None,
    };
    let (count, write_seconds, write_errors) =
        writes.as_ref().map_or((0, 0.0, HashMap::new()), |w| {
            (w.count(), w.seconds, w.errors.clone())
        });
    Ok(SubscribersReport {
        mode: "subscribers",
        server: args.target.server.uri().to_string(),
        subscribers: args.subscribers,
        prefixes: args.prefixes,
        subscriber_connections,
        open_seconds,
        memory,
        writes: count,
        writes_per_s: if write_seconds > 0.0 {
            count as f64 / write_seconds
        } else {
            0.0
        },
        write_errors: by_name(&write_errors),
        events_expected: deliveries.expected,
        events_delivered: deliveries.delivered,
        missing: deliveries.check.missing,
        reordered: deliveries.check.reordered,
        streams_ended: by_name(&deliveries.ended),
        delivery_latency_us: Latency::of(&deliveries.latency),
    })
}

/// The server's resident memory, in bytes, from `/proc/PID/status`.
fn process_rss(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status_rss(&status).with_context(|| format!("no VmRSS line in {path}"))
}

/// The `VmRSS:   1234 kB` line of `/proc/PID/status`, in bytes.
fn status_rss(status: &str) -> Option<u64> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// Runs `work`, reading the server's memory every [`RSS_SAMPLE_EVERY`] meanwhile: its output
/// and the highest reading (none without a PID).
async fn with_peak_rss<T>(
    pid: Option<u32>,
    work: impl Future<Output = T>,
) -> anyhow::Result<(T, Option<u64>)> {
    let Some(pid) = pid else {
        return Ok((work.await, None));
    };
    tokio::pin!(work);
    let mut peak = process_rss(pid)?;
    let mut every = tokio::time::interval(RSS_SAMPLE_EVERY);
    loop {
        tokio::select! {
            output = &mut work => return Ok((output, Some(peak.max(process_rss(pid)?)))),
            _ = every.tick() => peak = peak.max(process_rss(pid)?),
        }
    }
}

/// Opens one subscription per key pattern, `per_connection` to each connection it opens, and
/// returns once every one has its response headers: from then on the server delivers every
/// later write to the prefix (the Subscribe contract). The streams come with their indices in
/// `patterns`, and with the clients, which keep the connections open.
async fn subscribe_all(
    target: &Target,
    patterns: Vec<String>,
    per_connection: usize,
) -> anyhow::Result<(Vec<Client>, Vec<(usize, Streaming<ChangeEvent>)>)> {
    let clients = connect(target, patterns.len().div_ceil(per_connection) as u32).await?;
    let mut opening = JoinSet::new();
    let at_once = Arc::new(Semaphore::new(SUBSCRIBE_AT_ONCE));
    for (index, key_pattern) in patterns.into_iter().enumerate() {
        let mut client = clients[index / per_connection].clone();
        let at_once = at_once.clone();
        opening.spawn(async move {
            let _opening = at_once
                .acquire()
                .await
                .expect("the semaphore is never closed");
            let request = SubscribeRequest {
                key_pattern,
                ..SubscribeRequest::default()
            };
            // The call returns once the response headers arrive.
            let stream = client.subscribe(request).await?.into_inner();
            Ok::<_, Status>((index, stream))
        });
    }
    let opened = tokio::time::timeout(SUBSCRIBE_TIMEOUT, join_all(opening))
        .await
        .with_context(|| {
            format!("subscriptions not open after {SUBSCRIBE_TIMEOUT:?}: too many streams per connection?")
        })??
        .into_iter()
        .collect::<Result<Vec<_>, Status>>()
        .context("subscribing")?;
    Ok((clients, opened))
}

/// Reads a subscription that expects no events until `stop`, so that anything the server
/// does send is taken off the connection; returns how the stream ended if it ended first.
async fn drain(mut stream: Streaming<ChangeEvent>, stop: CancellationToken) -> Option<Code> {
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return None,
            message = stream.message() => message,
        };
        match message {
            Ok(Some(_)) => {}
            Ok(None) => return Some(Code::Ok),
            Err(status) => return Some(status.code()),
        }
    }
}

/// What a subscriber has received so far, for deciding when the run has drained.
#[derive(Default)]
struct Delivery {
    last_revision: AtomicU64,
    /// The stream ended on its own (an error status, or the server closed it).
    ended: AtomicBool,
}

/// Everything one subscriber received, kept in full so that gaps and reorders are checked
/// exactly against the acknowledged writes once they are all known.
struct Received {
    index: usize,
    revisions: Vec<u64>,
    latencies: Vec<u64>,
    /// How the stream ended, if it ended before the run stopped it.
    ended: Option<Code>,
}

async fn receive(
    index: usize,
    mut stream: Streaming<ChangeEvent>,
    state: Arc<Delivery>,
    stop: CancellationToken,
    epoch: Instant,
    bar: ProgressBar,
) -> Received {
    let mut received = Received {
        index,
        revisions: Vec::new(),
        latencies: Vec::new(),
        ended: None,
    };
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => break,
            message = stream.message() => message,
        };
        match message {
            Ok(Some(event)) => {
                let now = nanos_since(epoch);
                if let Ok(sent) = event.value.parse::<u64>() {
                    received.latencies.push(now.saturating_sub(sent));
                }
                let revision = u64::try_from(event.revision).unwrap_or_default();
                received.revisions.push(revision);
                state.last_revision.fetch_max(revision, Ordering::Release);
                bar.inc(1);
            }
            Ok(None) => {
                received.ended = Some(Code::Ok);
                break;
            }
            Err(status) => {
                received.ended = Some(status.code());
                break;
            }
        }
    }
    if received.ended.is_some() {
        state.ended.store(true, Ordering::Release);
    }
    received
}

/// One writer's acknowledged writes, as (prefix index, revision), and its failures.
#[derive(Default)]
struct Written {
    acked: Vec<(usize, u64)>,
    errors: HashMap<Code, u64>,
}

async fn write(
    mut client: Client,
    writer: usize,
    schedule: Arc<Schedule>,
    prefixes: Arc<[String]>,
    epoch: Instant,
    value_size: usize,
) -> Written {
    let mut written = Written::default();
    while let Some(ticket) = schedule.next().await {
        // Round-robin, so every prefix gets the same share of the writes.
        let prefix = (ticket.index % prefixes.len() as u64) as usize;
        let request = SetRequest {
            key: format!("{}w{writer}", prefixes[prefix]),
            value: format!("{:0>value_size$}", nanos_since(epoch)),
            ..SetRequest::default()
        };
        match client.set(request).await {
            Ok(response) => {
                let revision = u64::try_from(response.into_inner().revision).unwrap_or_default();
                written.acked.push((prefix, revision));
            }
            Err(status) => *written.errors.entry(status.code()).or_default() += 1,
        }
    }
    written
}

/// Delivery faults one subscriber showed, or several added up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SequenceCheck {
    /// Events whose revision was not above the one before.
    reordered: u64,
    /// Acknowledged writes to the prefix that never arrived.
    missing: u64,
    /// Revisions received that no acknowledged write produced (a write that failed on the
    /// client after the server applied it, e.g. a deadline).
    unacknowledged: u64,
}

impl SequenceCheck {
    fn add(&mut self, other: Self) {
        self.reordered += other.reordered;
        self.missing += other.missing;
        self.unacknowledged += other.unacknowledged;
    }
}

/// Checks the revisions a subscriber `seen`, in arrival order, against the `expected`
/// revisions (ascending) of the acknowledged writes to its prefix.
fn check_sequence(seen: &[u64], expected: &[u64]) -> SequenceCheck {
    let reordered = seen.windows(2).filter(|pair| pair[1] <= pair[0]).count() as u64;
    let mut distinct = seen.to_vec();
    if reordered > 0 {
        distinct.sort_unstable();
        distinct.dedup();
    }
    let (mut i, mut j, mut matched) = (0, 0, 0u64);
    while i < distinct.len() && j < expected.len() {
        match distinct[i].cmp(&expected[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                matched += 1;
                i += 1;
                j += 1;
            }
        }
    }
    SequenceCheck {
        reordered,
        missing: expected.len() as u64 - matched,
        unacknowledged: distinct.len() as u64 - matched,
    }
}

fn nanos_since(epoch: Instant) -> u64 {
    nanos(epoch.elapsed())
}

// ---------------------------------------------------------------------------------------------
// hostile

async fn hostile(args: HostileArgs) -> anyhow::Result<HostileReport> {
    let workload = Arc::new(Workload::new(&args.mix)?);
    let clients = connect(&args.target, args.load.connections).await?;
    if args.preload {
        preload(&clients, workload.keys, &workload.value, PRELOAD_BATCH, 2).await?;
    }
    let server_addr = resolve(&args.target.server).await?;
    let mut rounds = Vec::new();
    for pair in 0..args.repeat {
        for &kind in &args.hostile {
            // Without first in even pairs, with first in odd ones.
            let order = if pair % 2 == 0 {
                [None, Some(kind)]
            } else {
                [Some(kind), None]
            };
            for hostile in order {
                let label = hostile.map_or("without", |_| "with");
                eprintln!("pair {pair}, {kind:?}: {label}");
                let active = match hostile {
                    Some(kind) => Some(Hostiles::start(&args, kind, server_addr).await?),
                    None => None,
                };
                let run = run_unary(&clients, &workload, &args.load, args.rate).await?;
                let outcome = match active {
                    Some(active) => Some(active.stop().await?),
                    None => None,
                };
                rounds.push(RoundReport {
                    pair,
                    kind,
                    hostile: hostile.is_some(),
                    calls_per_s: run.tally.calls as f64 / run.seconds,
                    errors: by_name(&run.tally.errors),
                    latency_us: Latency::of(&run.tally.latency),
                    behind_schedule: run.behind_schedule,
                    outcome,
                });
            }
        }
    }
    let summary = args
        .hostile
        .iter()
        .map(|&kind| KindSummary::of(kind, &rounds))
        .collect();
    Ok(HostileReport {
        mode: "hostile",
        server: args.target.server.uri().to_string(),
        connections: args.load.connections,
        concurrency: args.load.concurrency,
        rate: args.rate,
        workload: WorkloadReport::from(&args.mix),
        round_seconds: args.load.duration.as_secs_f64(),
        summary,
        rounds,
    })
}

/// The server's address, for the silent connections, which are plain TCP.
async fn resolve(endpoint: &Endpoint) -> anyhow::Result<SocketAddr> {
    let authority = endpoint
        .uri()
        .authority()
        .context("the server address has no host:port")?
        .as_str()
        .to_owned();
    tokio::net::lookup_host(&authority)
        .await
        .with_context(|| format!("resolving {authority}"))?
        .next()
        .with_context(|| format!("{authority} resolves to no address"))
}

/// Hostile clients running during one round.
struct Hostiles {
    stop: CancellationToken,
    /// Never-reading subscriptions, and the clients that keep their connections open.
    never_reading: Vec<Streaming<ChangeEvent>>,
    _never_reading_clients: Vec<Client>,
    silent: JoinSet<SilentTally>,
    flood: JoinSet<Tally>,
    started: Instant,
}

/// What one silent connection slot saw: connections the server closed, and after how long.
struct SilentTally {
    closed_after: Histogram<u64>,
    connect_errors: u64,
}

impl Hostiles {
    /// Starts the hostile clients of `kind`; returns once they are in place: subscribed,
    /// connected, flooding.
    async fn start(args: &HostileArgs, kind: Hostile, server: SocketAddr) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let token = args.target.token.clone().unwrap_or_default();
        let endpoint = args
            .target
            .server
            .clone()
            .local_address(Some(args.hostile_source));

        let mut never_reading = Vec::new();
        let mut never_reading_clients = Vec::new();
        if kind.includes(Hostile::NeverReading) {
            let count = args.never_reading as usize;
            for _ in 0..count.div_ceil(NEVER_READING_PER_CONNECTION) {
                let channel = endpoint
                    .clone()
                    .initial_stream_window_size(args.never_reading_window)
                    .connect()
                    .await
                    .context("connecting a never-reading subscriber")?;
                never_reading_clients.push(KeyValueStoreClient::with_interceptor(
                    channel,
                    token.clone(),
                ));
            }
            for i in 0..count {
                let mut client = never_reading_clients[i / NEVER_READING_PER_CONNECTION].clone();
                let stream = client
                    .subscribe(SubscribeRequest::default())
                    .await
                    .context("subscribing a never-reading subscriber")?
                    .into_inner();
                never_reading.push(stream);
            }
        }

        let mut silent = JoinSet::new();
        if kind.includes(Hostile::Silent) {
            for _ in 0..args.silent {
                silent.spawn(silent_connection(server, args.hostile_source, stop.clone()));
            }
        }

        let mut flood = JoinSet::new();
        if kind.includes(Hostile::Flood) {
            for _ in 0..args.flood_connections {
                let channel = endpoint.connect().await.context("connecting a flooder")?;
                let client = KeyValueStoreClient::with_interceptor(channel, token.clone());
                for _ in 0..args.flood_concurrency {
                    flood.spawn(flood_worker(client.clone(), stop.clone()));
                }
            }
        }
        Ok(Self {
            stop,
            never_reading,
            _never_reading_clients: never_reading_clients,
            silent,
            flood,
            started: Instant::now(),
        })
    }

    /// Stops them, reads the never-reading subscriptions to their end, and says how the
    /// server treated each.
    async fn stop(self) -> anyhow::Result<HostileOutcome> {
        let seconds = self.started.elapsed().as_secs_f64();
        self.stop.cancel();
        let flood = Tally::merge_all(join_all(self.flood).await?);
        let mut closed_after = new_histogram();
        let mut connect_errors = 0;
        for slot in join_all(self.silent).await? {
            closed_after
                .add(&slot.closed_after)
                .expect("auto-resizing histograms accept any value");
            connect_errors += slot.connect_errors;
        }
        let mut reading = JoinSet::new();
        for stream in self.never_reading {
            reading.spawn(read_to_end(stream));
        }
        let mut never_reading_ended: BTreeMap<String, u64> = BTreeMap::new();
        for ended in join_all(reading).await? {
            let name = ended.map_or_else(|| "still open".into(), |code| format!("{code:?}"));
            *never_reading_ended.entry(name).or_default() += 1;
        }
        Ok(HostileOutcome {
            never_reading_ended,
            silent_closed: closed_after.len(),
            silent_closed_after_ms: (!closed_after.is_empty())
                .then(|| Latency::of(&closed_after).scaled(1e-3)),
            silent_connect_errors: connect_errors,
            flood_ok_per_s: flood.calls as f64 / seconds,
            flood_errors: by_name(&flood.errors),
        })
    }
}

/// Reads a never-reading subscription as a client that finally reads would: how it ended,
/// or `None` if it was still open after [`NEVER_READING_DRAIN`].
async fn read_to_end(mut stream: Streaming<ChangeEvent>) -> Option<Code> {
    let read = async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return Code::Ok,
                Err(status) => return status.code(),
            }
        }
    };
    tokio::time::timeout(NEVER_READING_DRAIN, read).await.ok()
}

/// Holds one connection that sends nothing, from `source`, until `stop`; each time the server
/// closes it, records after how long and opens another.
async fn silent_connection(
    server: SocketAddr,
    source: IpAddr,
    stop: CancellationToken,
) -> SilentTally {
    let mut tally = SilentTally {
        closed_after: new_histogram(),
        connect_errors: 0,
    };
    while !stop.is_cancelled() {
        let opened = Instant::now();
        let socket = match server {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        };
        let connected = match socket.and_then(|s| s.bind(SocketAddr::new(source, 0)).map(|()| s)) {
            Ok(socket) => socket.connect(server).await,
            Err(err) => Err(err),
        };
        let mut stream = match connected {
            Ok(stream) => stream,
            Err(_) => {
                tally.connect_errors += 1;
                // Past the server's connection limit, or out of ports: do not spin.
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let mut buffer = [0u8; 64];
        let closed = tokio::select! {
            () = stop.cancelled() => false,
            // Anything read, or an end, or an error: the server is done with it.
            _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buffer) => true,
        };
        if closed {
            record(&mut tally.closed_after, nanos(opened.elapsed()));
        }
    }
    tally
}

/// Calls Get as fast as the server answers, until `stop`.
async fn flood_worker(mut client: Client, stop: CancellationToken) -> Tally {
    let mut tally = Tally::new();
    while !stop.is_cancelled() {
        let sent = Instant::now();
        let result = client
            .get(GetRequest {
                key: format!("{KEY_PREFIX}flood"),
            })
            .await;
        tally.record(None, sent, result.map(|_| 1));
    }
    tally
}

// ---------------------------------------------------------------------------------------------
// bare-server

/// The bench fixture: `kvstore.KeyValueStore` with no store, middleware or tracing behind it,
/// answering Get and Set with constants the size of the real server's replies.
struct Bare {
    get: GetResponse,
    set: SetResponse,
}

#[tonic::async_trait]
impl KeyValueStore for Bare {
    async fn get(&self, _: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        Ok(Response::new(self.get.clone()))
    }

    async fn set(&self, _: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        Ok(Response::new(self.set.clone()))
    }

    async fn delete(&self, _: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        Err(Status::unimplemented("the bare server answers Get and Set"))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Err(Status::unimplemented("the bare server answers Get and Set"))
    }

    async fn batch(&self, _: Request<EncodedBatch>) -> Result<Response<BatchReply>, Status> {
        Err(Status::unimplemented("the bare server answers Get and Set"))
    }

    type SubscribeStream = BoxStream<'static, Result<ChangeEvent, Status>>;

    async fn subscribe(
        &self,
        _: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::unimplemented("the bare server answers Get and Set"))
    }
}

async fn bare_server(args: BareServerArgs) -> anyhow::Result<()> {
    let bare = Bare {
        get: GetResponse {
            value: "x".repeat(args.value_size),
            found: true,
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            ttl_ms: 0,
            revision: 1,
        },
        set: SetResponse {
            success: true,
            message: "stored at revision 1".into(),
            revision: 1,
        },
    };
    // `Server::tcp_nodelay` applies only when tonic binds the address itself; binding here
    // lets port 0 work and the address be printed, so nodelay is set on the listener instead.
    let incoming = TcpIncoming::bind(args.listen)
        .with_context(|| format!("binding {}", args.listen))?
        .with_nodelay(Some(true));
    let addr = incoming.local_addr().context("reading the bound address")?;
    println!("bare-server listening on {addr}");
    Server::builder()
        .add_service(KeyValueStoreServer::new(bare))
        .serve_with_incoming_shutdown(incoming, kvstore::shutdown::signal())
        .await
        .context("serving")
}

// ---------------------------------------------------------------------------------------------
// the workload: keys, operations, values

/// Keys `key:` + zero-padded index, all exactly `--key-size` bytes, so runs against the same
/// server find each other's keys.
#[derive(Debug, Clone, Copy)]
struct KeySpace {
    count: u64,
    digits: usize,
}

impl KeySpace {
    fn new(args: &KeyArgs) -> anyhow::Result<Self> {
        let needed = (args.keys - 1).to_string().len();
        let digits = args
            .key_size
            .checked_sub(KEY_PREFIX.len())
            .filter(|&digits| digits >= needed)
            .with_context(|| {
                format!(
                    "--key-size {} cannot name {} keys: it needs at least {} bytes",
                    args.key_size,
                    args.keys,
                    KEY_PREFIX.len() + needed
                )
            })?;
        Ok(Self {
            count: args.keys,
            digits,
        })
    }

    fn key(&self, index: u64) -> String {
        let mut key = Vec::new();
        self.write_key(index, &mut key);
        String::from_utf8(key).expect("keys are ASCII")
    }

    /// Replaces `key` with the key of `index`. Not `format!`: its padding machinery was 5% of
    /// this tool's CPU in a Batch run.
    fn write_key(&self, index: u64, key: &mut Vec<u8>) {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(index);
        key.clear();
        key.extend_from_slice(KEY_PREFIX.as_bytes());
        key.resize(key.len() + self.digits.saturating_sub(digits.len()), b'0');
        key.extend_from_slice(digits.as_bytes());
    }
}

enum Picker {
    Uniform(u64),
    Zipf(Zipf<f64>),
}

impl Picker {
    fn pick(&self, rng: &mut SmallRng) -> u64 {
        match self {
            Self::Uniform(count) => rng.random_range(0..*count),
            // Zipf samples are whole numbers from 1 to the key count.
            Self::Zipf(zipf) => zipf.sample(rng) as u64 - 1,
        }
    }
}

/// What the calls of a run do: which keys, how many gets, what value the sets write.
struct Workload {
    keys: KeySpace,
    picker: Picker,
    get_ratio: f64,
    value: Arc<str>,
}

/// One operation, sent alone (unary) or as part of a Batch.
enum Call {
    Get(GetRequest),
    Set(SetRequest),
}

impl From<Call> for BatchOp {
    fn from(call: Call) -> Self {
        let op = match call {
            Call::Get(request) => batch_op::Op::Get(request),
            Call::Set(request) => batch_op::Op::Set(request),
        };
        Self { op: Some(op) }
    }
}

impl Workload {
    fn new(mix: &Mix) -> anyhow::Result<Self> {
        let keys = KeySpace::new(&mix.keys)?;
        let picker = match mix.distribution {
            KeyDistribution::Uniform => Picker::Uniform(keys.count),
            KeyDistribution::Zipf => Picker::Zipf(
                Zipf::new(keys.count as f64, ZIPF_EXPONENT).context("zipf distribution")?,
            ),
        };
        Ok(Self {
            keys,
            picker,
            get_ratio: mix.get_ratio,
            value: "x".repeat(mix.keys.value_size).into(),
        })
    }

    /// The next op's key index, and whether it is a get.
    fn pick(&self, rng: &mut SmallRng) -> (u64, bool) {
        (self.picker.pick(rng), rng.random_bool(self.get_ratio))
    }

    fn call(&self, rng: &mut SmallRng) -> Call {
        let (index, get) = self.pick(rng);
        if get {
            Call::Get(GetRequest {
                key: self.keys.key(index),
            })
        } else {
            Call::Set(SetRequest {
                key: self.keys.key(index),
                value: self.value.to_string(),
                ..SetRequest::default()
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// pacing

/// Hands calls out to the workers: when each is due, and when the run is over.
enum Schedule {
    /// Each worker calls again as soon as its previous call returns, so the server sets the
    /// pace, and latency counts from the actual send.
    Closed {
        end: Option<Instant>,
        limit: Option<u64>,
        taken: AtomicU64,
    },
    /// Calls fall due at a fixed rate, whatever the server does (`--rate`).
    Open(Arc<OpenLoop>),
}

/// A call handed out by a [`Schedule`]: its number in the run and, in an open loop, when it
/// was due.
struct Ticket {
    index: u64,
    due: Option<Instant>,
}

/// An open-loop schedule. A call is sent once it is due and a worker is free; its latency
/// counts from when it was due, so a server stall shows up as latency instead of as calls that
/// were silently never sent (coordinated omission).
struct OpenLoop {
    start: Instant,
    rate: f64,
    /// One permit per call that has fallen due and not yet been taken.
    due: Semaphore,
    taken: AtomicU64,
    limit: Option<u64>,
}

/// The thread that releases an open loop's calls.
struct Pacer {
    thread: thread::JoinHandle<u64>,
    open: Arc<OpenLoop>,
}

impl Pacer {
    /// Once the workers are done: how many calls fell due but were never sent.
    fn behind_schedule(self) -> anyhow::Result<u64> {
        let released = self
            .thread
            .join()
            .map_err(|_| anyhow!("the pacer thread panicked"))?;
        Ok(released - self.open.taken.load(Ordering::Relaxed))
    }
}

impl Schedule {
    fn closed(end: Option<Instant>, limit: Option<u64>) -> Arc<Self> {
        Arc::new(Self::Closed {
            end,
            limit,
            taken: AtomicU64::new(0),
        })
    }

    fn open(rate: f64, end: Option<Instant>, limit: Option<u64>) -> (Arc<Self>, Pacer) {
        let open = Arc::new(OpenLoop {
            start: Instant::now(),
            rate,
            due: Semaphore::new(0),
            taken: AtomicU64::new(0),
            limit,
        });
        let thread = {
            let open = open.clone();
            // A plain thread, not a tokio timer: tokio's timer ticks in whole milliseconds, so
            // calls would go out up to a millisecond late and that would count as latency.
            thread::spawn(move || {
                // Linux lets a sleep end up to 50 µs late by default (timer slack); this
                // thread's sleeps are the schedule, so it asks for none. Without it, pacing is
                // only later, not wrong, so a failure is ignored.
                #[cfg(target_os = "linux")]
                nix::sys::prctl::set_timerslack(1).ok();
                open.pace(end)
            })
        };
        (Arc::new(Self::Open(open.clone())), Pacer { thread, open })
    }

    /// The next call to make, or `None` once the run is over.
    async fn next(&self) -> Option<Ticket> {
        match self {
            Self::Closed { end, limit, taken } => {
                if end.is_some_and(|end| Instant::now() >= end) {
                    return None;
                }
                let index = taken.fetch_add(1, Ordering::Relaxed);
                if limit.is_some_and(|limit| index >= limit) {
                    return None;
                }
                Some(Ticket { index, due: None })
            }
            Self::Open(open) => {
                open.due.acquire().await.ok()?.forget();
                let index = open.taken.fetch_add(1, Ordering::Relaxed);
                if open.limit.is_some_and(|limit| index + 1 >= limit) {
                    // The last call: wake the idle workers so they finish.
                    open.due.close();
                }
                Some(Ticket {
                    index,
                    due: Some(open.due_at(index)),
                })
            }
        }
    }
}

impl OpenLoop {
    fn due_at(&self, index: u64) -> Instant {
        self.start + Duration::from_secs_f64(index as f64 / self.rate)
    }

    /// Releases each call when it falls due, until `end` or the limit; returns how many fell
    /// due. Calls due while every worker is busy wait as permits, and are sent late.
    fn pace(&self, end: Option<Instant>) -> u64 {
        let mut released = 0;
        loop {
            let now = Instant::now();
            if end.is_some_and(|end| now >= end) {
                self.due.close();
                return released;
            }
            // Call i is due at i / rate.
            let elapsed = now.duration_since(self.start).as_secs_f64();
            let mut due = (elapsed * self.rate) as u64 + 1;
            if let Some(limit) = self.limit {
                due = due.min(limit);
            }
            if due > released {
                self.due.add_permits((due - released) as usize);
                released = due;
            }
            if self.limit == Some(released) {
                return released;
            }
            let mut wake = self.due_at(released);
            if let Some(end) = end {
                wake = wake.min(end);
            }
            thread::sleep(
                wake.saturating_duration_since(Instant::now())
                    .max(MIN_PACER_SLEEP),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// results

/// An auto-resizing histogram of nanoseconds, precise to 3 significant figures.
fn new_histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant figures is within hdrhistogram's range")
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

fn record(histogram: &mut Histogram<u64>, nanos: u64) {
    // Not `saturating_record`: it clamps to the current size instead of growing.
    histogram
        .record(nanos)
        .expect("an auto-resizing histogram grows to any latency under 146 years");
}

/// One worker's results. Each worker keeps its own and they are merged at the end, so workers
/// share nothing but the schedule while they run.
struct Tally {
    /// Nanoseconds per successful call.
    latency: Histogram<u64>,
    /// Open loop only: nanoseconds from when each call was due to when it was sent, whether
    /// late for want of a free worker or of a core for this process.
    lag: Histogram<u64>,
    calls: u64,
    /// Key operations in the successful calls.
    ops: u64,
    errors: HashMap<Code, u64>,
}

impl Tally {
    fn new() -> Self {
        Self {
            latency: new_histogram(),
            lag: new_histogram(),
            calls: 0,
            ops: 0,
            errors: HashMap::new(),
        }
    }

    /// Records a call sent at `sent` (and due at `due`, in an open loop), and its count of key
    /// operations if it succeeded.
    fn record(&mut self, due: Option<Instant>, sent: Instant, result: Result<u64, Status>) {
        if let Some(due) = due {
            record(&mut self.lag, nanos(sent.duration_since(due)));
        }
        match result {
            Ok(ops) => {
                record(&mut self.latency, nanos(due.unwrap_or(sent).elapsed()));
                self.calls += 1;
                self.ops += ops;
            }
            Err(status) => *self.errors.entry(status.code()).or_default() += 1,
        }
    }

    fn merge_all(tallies: Vec<Self>) -> Self {
        let mut all = Self::new();
        for tally in tallies {
            for (all, one) in [
                (&mut all.latency, &tally.latency),
                (&mut all.lag, &tally.lag),
            ] {
                all.add(one)
                    .expect("auto-resizing histograms accept any value");
            }
            all.calls += tally.calls;
            all.ops += tally.ops;
            for (code, count) in tally.errors {
                *all.errors.entry(code).or_default() += count;
            }
        }
        all
    }
}

/// Percentiles of a histogram of nanoseconds, in microseconds.
#[derive(Debug, Serialize)]
struct Latency {
    count: u64,
    mean: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Latency {
    fn of(histogram: &Histogram<u64>) -> Self {
        let us = |nanos: u64| nanos as f64 / 1000.0;
        Self {
            count: histogram.len(),
            mean: histogram.mean() / 1000.0,
            p50: us(histogram.value_at_quantile(0.5)),
            p90: us(histogram.value_at_quantile(0.9)),
            p99: us(histogram.value_at_quantile(0.99)),
            p999: us(histogram.value_at_quantile(0.999)),
            max: us(histogram.max()),
        }
    }

    /// The same percentiles in another unit: `factor` times each.
    fn scaled(self, factor: f64) -> Self {
        Self {
            count: self.count,
            mean: self.mean * factor,
            p50: self.p50 * factor,
            p90: self.p90 * factor,
            p99: self.p99 * factor,
            p999: self.p999 * factor,
            max: self.max * factor,
        }
    }

    fn row(&self) -> String {
        format!(
            "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (mean {:.1}, n={})",
            self.p50, self.p90, self.p99, self.p999, self.max, self.mean, self.count
        )
    }
}

fn by_name(counts: &HashMap<Code, u64>) -> BTreeMap<String, u64> {
    counts
        .iter()
        .map(|(code, count)| (format!("{code:?}"), *count))
        .collect()
}

fn counts_row(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    let parts: Vec<String> = counts
        .iter()
        .map(|(name, count)| format!("{name} {count}"))
        .collect();
    parts.join(", ")
}

/// CPU time of this process and, given its PID, the server's, from the start of a run.
struct CpuWatch {
    started: Instant,
    client: Duration,
    server: Option<(u32, Duration)>,
}

impl CpuWatch {
    fn start(server_pid: Option<u32>) -> anyhow::Result<Self> {
        let server = server_pid
            .map(|pid| process_cpu(pid).map(|cpu| (pid, cpu)))
            .transpose()?;
        Ok(Self {
            started: Instant::now(),
            client: own_cpu()?,
            server,
        })
    }

    /// The CPU used since `start`, with the server's per operation when `ops` were done.
    fn stop(self, ops: u64) -> anyhow::Result<CpuReport> {
        let wall = self.started.elapsed().as_secs_f64();
        let client = (own_cpu()? - self.client).as_secs_f64();
        let server = match self.server {
            Some((pid, before)) => Some((process_cpu(pid)? - before).as_secs_f64()),
            None => None,
        };
        Ok(CpuReport {
            client_cores: client / wall,
            server_cores: server.map(|s| s / wall),
            server_us_per_op: server.filter(|_| ops > 0).map(|s| s * 1e6 / ops as f64),
        })
    }
}

fn own_cpu() -> anyhow::Result<Duration> {
    let usage = getrusage(UsageWho::RUSAGE_SELF).context("reading this process's CPU time")?;
    let micros = |tv: TimeVal| u64::try_from(tv.num_microseconds()).unwrap_or_default();
    Ok(Duration::from_micros(
        micros(usage.user_time()) + micros(usage.system_time()),
    ))
}

fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = stat_cpu_ticks(&stat).with_context(|| format!("unexpected {path}: {stat}"))?;
    let per_second = sysconf(SysconfVar::CLK_TCK)
        .context("reading the clock tick rate")?
        .context("the clock tick rate is unknown")?;
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// User plus system CPU time, in clock ticks, from the text of `/proc/PID/stat`: fields 14
/// and 15, counted after the command name, which is in parentheses and may hold spaces.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

#[derive(Debug, Serialize)]
struct CpuReport {
    /// This process's CPU time over the wall time: 1.0 is one core busy throughout.
    client_cores: f64,
    server_cores: Option<f64>,
    server_us_per_op: Option<f64>,
}

impl CpuReport {
    fn rows(&self, unit: &str) -> Vec<(String, String)> {
        let mut rows = vec![(
            "client CPU".into(),
            format!("{:.2} cores", self.client_cores),
        )];
        if let (Some(cores), Some(per_op)) = (self.server_cores, self.server_us_per_op) {
            rows.push((
                "server CPU".into(),
                format!("{cores:.2} cores, {per_op:.2} µs per {unit}"),
            ));
        }
        rows
    }
}

#[derive(Debug, Serialize)]
struct WorkloadReport {
    get_ratio: f64,
    keys: u64,
    distribution: KeyDistribution,
    key_size: usize,
    value_size: usize,
}

impl From<&Mix> for WorkloadReport {
    fn from(mix: &Mix) -> Self {
        Self {
            get_ratio: mix.get_ratio,
            keys: mix.keys.keys,
            distribution: mix.distribution,
            key_size: mix.keys.key_size,
            value_size: mix.keys.value_size,
        }
    }
}

/// The results of a unary or batch run.
#[derive(Debug, Serialize)]
struct CallReport {
    mode: &'static str,
    server: String,
    connections: u32,
    concurrency: u32,
    workload: WorkloadReport,
    /// Subscriptions open throughout a unary run on prefixes its keys never match.
    idle_subscribers: Option<u32>,
    batch_size: Option<u64>,
    open_loop: Option<OpenLoopReport>,
    seconds: f64,
    /// Successful calls.
    calls: u64,
    calls_per_s: f64,
    /// Key operations per second in successful calls (equal to calls_per_s for unary).
    ops_per_s: f64,
    errors: BTreeMap<String, u64>,
    /// Call latency, from when the call was due (open loop) or sent (closed loop).
    latency_us: Latency,
    cpu: CpuReport,
}

/// How well an open-loop run kept to its schedule.
#[derive(Debug, Serialize)]
struct OpenLoopReport {
    /// Calls per second asked for.
    rate: f64,
    /// Calls that fell due but were never sent, every worker being busy until the end.
    behind_schedule: u64,
    /// From when each call was due to when it was sent. Part of the latency; when it is large
    /// with workers to spare, this process was waiting for a core.
    send_lag_us: Latency,
}

/// The results of a fan-out run.
#[derive(Debug, Serialize)]
struct FanoutReport {
    mode: &'static str,
    server: String,
    subscribers: u32,
    prefixes: u32,
    subscriber_connections: usize,
    writers: u32,
    target_rate: f64,
    write_seconds: f64,
    /// Acknowledged writes.
    writes: u64,
    writes_per_s: f64,
    /// Writes that fell due but were never sent, every writer being busy.
    behind_schedule: u64,
    write_errors: BTreeMap<String, u64>,
    /// Events the subscribers should have received: each one's acknowledged writes.
    events_expected: u64,
    events_delivered: u64,
    /// Events delivered per second, from the first write until every subscriber caught up.
    events_per_s: f64,
    missing: u64,
    reordered: u64,
    unacknowledged: u64,
    /// Subscription streams that ended before the run stopped them, by status.
    streams_ended: BTreeMap<String, u64>,
    /// Send instant (before the Set) to receive instant.
    delivery_latency_us: Latency,
    cpu: CpuReport,
}

/// The results of a load-keys run.
#[derive(Debug, Serialize)]
struct LoadReport {
    mode: &'static str,
    server: String,
    keys: u64,
    key_size: usize,
    value_size: usize,
    batch_size: u64,
    seconds: f64,
    keys_per_s: f64,
    cpu: CpuReport,
}

/// A report: serialized as one JSON object, or printed as rows of a table.
trait Summary: Serialize {
    fn rows(&self) -> Vec<(String, String)>;
}

impl Summary for CallReport {
    fn rows(&self) -> Vec<(String, String)> {
        let w = &self.workload;
        let mut shape = format!(
            "{} connections x {} in flight",
            self.connections, self.concurrency
        );
        if let Some(open) = &self.open_loop {
            shape += &format!(", open loop at {:.0} calls/s", open.rate);
        }
        let mut workload = format!(
            "{:.0}% gets, {} keys ({:?}), {}-byte keys, {}-byte values",
            w.get_ratio * 100.0,
            w.keys,
            w.distribution,
            w.key_size,
            w.value_size
        );
        if let Some(idle) = self.idle_subscribers {
            workload += &format!(", {idle} idle subscribers");
        }
        let mut rows = vec![
            (
                "mode".into(),
                format!("{} against {}", self.mode, self.server),
            ),
            ("load".into(), shape),
            ("workload".into(), workload),
            ("duration".into(), format!("{:.2} s", self.seconds)),
            (
                "calls".into(),
                format!("{} ok, {:.0}/s", self.calls, self.calls_per_s),
            ),
        ];
        if let Some(batch_size) = self.batch_size {
            rows.push((
                "key ops".into(),
                format!("{:.0}/s ({batch_size} per call)", self.ops_per_s),
            ));
        }
        rows.push(("errors".into(), counts_row(&self.errors)));
        rows.push(("latency (µs)".into(), self.latency_us.row()));
        if let Some(open) = &self.open_loop {
            rows.push(("send lag (µs)".into(), open.send_lag_us.row()));
            rows.push((
                "behind schedule".into(),
                format!("{} calls never sent", open.behind_schedule),
            ));
        }
        let unit = if self.batch_size.is_some() {
            "key op"
        } else {
            "call"
        };
        rows.extend(self.cpu.rows(unit));
        rows
    }
}

impl Summary for FanoutReport {
    fn rows(&self) -> Vec<(String, String)> {
        let mut rows = vec![
            (
                "mode".into(),
                format!("{} against {}", self.mode, self.server),
            ),
            (
                "subscribers".into(),
                format!(
                    "{} on {} prefixes, over {} connections",
                    self.subscribers, self.prefixes, self.subscriber_connections
                ),
            ),
            (
                "writes".into(),
                format!(
                    "{} acked in {:.2} s: {:.0}/s of {:.0}/s asked, by {} writers",
                    self.writes,
                    self.write_seconds,
                    self.writes_per_s,
                    self.target_rate,
                    self.writers
                ),
            ),
        ];
        if self.behind_schedule > 0 {
            rows.push((
                "behind schedule".into(),
                format!("{} writes never sent", self.behind_schedule),
            ));
        }
        rows.extend([
            ("write errors".into(), counts_row(&self.write_errors)),
            (
                "events".into(),
                format!(
                    "{} of {} delivered, {:.0}/s",
                    self.events_delivered, self.events_expected, self.events_per_s
                ),
            ),
            (
                "gaps, reorders".into(),
                format!(
                    "{} missing, {} reordered, {} unacknowledged",
                    self.missing, self.reordered, self.unacknowledged
                ),
            ),
            ("streams ended".into(), counts_row(&self.streams_ended)),
            ("delivery (µs)".into(), self.delivery_latency_us.row()),
        ]);
        rows.extend(self.cpu.rows("event"));
        rows
    }
}

impl Summary for LoadReport {
    fn rows(&self) -> Vec<(String, String)> {
        let mut rows = vec![
            (
                "mode".into(),
                format!("{} against {}", self.mode, self.server),
            ),
            (
                "keys".into(),
                format!(
                    "{} of {} bytes, {}-byte values, {} per batch",
                    self.keys, self.key_size, self.value_size, self.batch_size
                ),
            ),
            (
                "duration".into(),
                format!("{:.2} s, {:.0} keys/s", self.seconds, self.keys_per_s),
            ),
        ];
        rows.extend(self.cpu.rows("key"));
        rows
    }
}

/// The results of a subscribers run.
#[derive(Debug, Serialize)]
struct SubscribersReport {
    mode: &'static str,
    server: String,
    subscribers: u32,
    prefixes: u32,
    subscriber_connections: usize,
    /// From the first Subscribe call until every one had its response headers.
    open_seconds: f64,
    /// The server's memory, given its PID.
    memory: Option<MemoryReport>,
    /// Acknowledged writes.
    writes: u64,
    writes_per_s: f64,
    write_errors: BTreeMap<String, u64>,
    events_expected: u64,
    events_delivered: u64,
    missing: u64,
    reordered: u64,
    /// Subscription streams that ended before the run closed them, by status.
    streams_ended: BTreeMap<String, u64>,
    delivery_latency_us: Latency,
}

/// The server's resident memory (RSS) in a subscribers run, in bytes.
#[derive(Debug, Serialize)]
struct MemoryReport {
    /// Before the first subscription.
    baseline_bytes: u64,
    /// Once every subscription was open, before any event.
    open_bytes: u64,
    /// The highest reading while they were held, idle and during the writes.
    peak_bytes: u64,
    /// After they disconnected and --settle passed.
    after_bytes: u64,
    idle_bytes_per_subscriber: f64,
    peak_bytes_per_subscriber: f64,
    /// `after_bytes - baseline_bytes`: what the allocator kept, or what leaked.
    retained_bytes: i64,
}

/// The results of a hostile run.
#[derive(Debug, Serialize)]
struct HostileReport {
    mode: &'static str,
    server: String,
    connections: u32,
    concurrency: u32,
    /// The well-behaved client's open-loop rate, if any.
    rate: Option<f64>,
    workload: WorkloadReport,
    round_seconds: f64,
    summary: Vec<KindSummary>,
    rounds: Vec<RoundReport>,
}

/// One round of the well-behaved client, with or without one kind of hostile client.
#[derive(Debug, Serialize)]
struct RoundReport {
    pair: u32,
    kind: Hostile,
    /// Whether the hostile clients ran in this round.
    hostile: bool,
    calls_per_s: f64,
    errors: BTreeMap<String, u64>,
    latency_us: Latency,
    behind_schedule: Option<u64>,
    outcome: Option<HostileOutcome>,
}

/// How the server treated the hostile clients of one round.
#[derive(Debug, Serialize)]
struct HostileOutcome {
    /// How each never-reading subscription ended once read after the round: by status, or
    /// "still open".
    never_reading_ended: BTreeMap<String, u64>,
    /// Silent connections the server closed.
    silent_closed: u64,
    /// After how long, in milliseconds.
    silent_closed_after_ms: Option<Latency>,
    silent_connect_errors: u64,
    /// Flooder calls that succeeded, per second.
    flood_ok_per_s: f64,
    /// Flooder calls refused, by status.
    flood_errors: BTreeMap<String, u64>,
}

/// One kind's rounds side by side: the well-behaved client's figures with the hostile clients
/// over without, per pair of rounds.
#[derive(Debug, Serialize)]
struct KindSummary {
    kind: Hostile,
    throughput_ratios: Vec<f64>,
    p99_ratios: Vec<f64>,
    /// Errors of the well-behaved client in the rounds with hostile clients.
    errors_with: BTreeMap<String, u64>,
}

impl KindSummary {
    fn of(kind: Hostile, rounds: &[RoundReport]) -> Self {
        let mut summary = Self {
            kind,
            throughput_ratios: Vec::new(),
            p99_ratios: Vec::new(),
            errors_with: BTreeMap::new(),
        };
        let of_kind: Vec<&RoundReport> = rounds.iter().filter(|r| r.kind == kind).collect();
        for with in of_kind.iter().filter(|r| r.hostile) {
            for (code, count) in &with.errors {
                *summary.errors_with.entry(code.clone()).or_default() += count;
            }
            let Some(without) = of_kind.iter().find(|r| !r.hostile && r.pair == with.pair) else {
                continue;
            };
            summary
                .throughput_ratios
                .push(with.calls_per_s / without.calls_per_s);
            summary
                .p99_ratios
                .push(with.latency_us.p99 / without.latency_us.p99);
        }
        summary
    }
}

/// `0.97–1.02`, or the one value.
fn range_of(values: &[f64]) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match values.len() {
        0 => "none".into(),
        1 => format!("{min:.2}"),
        _ => format!("{min:.2}–{max:.2}"),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

impl Summary for SubscribersReport {
    fn rows(&self) -> Vec<(String, String)> {
        let mut rows = vec![
            (
                "mode".into(),
                format!("{} against {}", self.mode, self.server),
            ),
            (
                "subscribers".into(),
                format!(
                    "{} on {} prefixes, over {} connections, open in {:.2} s",
                    self.subscribers, self.prefixes, self.subscriber_connections, self.open_seconds
                ),
            ),
        ];
        if let Some(m) = &self.memory {
            rows.extend([
                (
                    "server RSS".into(),
                    format!(
                        "baseline {}, all open {}, peak {}, after they left {}",
                        mib(m.baseline_bytes),
                        mib(m.open_bytes),
                        mib(m.peak_bytes),
                        mib(m.after_bytes)
                    ),
                ),
                (
                    "per subscriber".into(),
                    format!(
                        "{:.0} bytes idle, {:.0} bytes at the peak",
                        m.idle_bytes_per_subscriber, m.peak_bytes_per_subscriber
                    ),
                ),
                (
                    "retained".into(),
                    format!(
                        "{:+.1} MiB over the baseline after they left",
                        m.retained_bytes as f64 / f64::from(1 << 20)
                    ),
                ),
            ]);
        }
        rows.extend([
            (
                "writes".into(),
                format!(
                    "{} acked, {:.0}/s; errors: {}",
                    self.writes,
                    self.writes_per_s,
                    counts_row(&self.write_errors)
                ),
            ),
            (
                "events".into(),
                format!(
                    "{} of {} delivered, {} missing, {} reordered",
                    self.events_delivered, self.events_expected, self.missing, self.reordered
                ),
            ),
            ("streams ended".into(), counts_row(&self.streams_ended)),
            ("delivery (µs)".into(), self.delivery_latency_us.row()),
        ]);
        rows
    }
}

impl Summary for HostileReport {
    fn rows(&self) -> Vec<(String, String)> {
        let w = &self.workload;
        let pace = self.rate.map_or("closed loop".into(), |rate| {
            format!("open loop at {rate:.0} calls/s")
        });
        let mut rows = vec![
            (
                "mode".into(),
                format!("{} against {}", self.mode, self.server),
            ),
            (
                "well-behaved".into(),
                format!(
                    "{} connections x {} in flight, {pace}, {:.0}% gets, {:.0} s rounds",
                    self.connections,
                    self.concurrency,
                    w.get_ratio * 100.0,
                    self.round_seconds
                ),
            ),
        ];
        for round in &self.rounds {
            let side = if round.hostile { "with" } else { "without" };
            rows.push((
                format!("{:?} {side} #{}", round.kind, round.pair),
                format!(
                    "{:.0} calls/s, p50 {:.0} µs, p99 {:.0} µs, errors: {}",
                    round.calls_per_s,
                    round.latency_us.p50,
                    round.latency_us.p99,
                    counts_row(&round.errors)
                ),
            ));
            if let Some(outcome) = &round.outcome {
                rows.push(("  hostile".into(), outcome.row()));
            }
        }
        for kind in &self.summary {
            rows.push((
                format!("{:?}", kind.kind),
                format!(
                    "with/without: throughput {}, p99 latency {}; errors with: {}",
                    range_of(&kind.throughput_ratios),
                    range_of(&kind.p99_ratios),
                    counts_row(&kind.errors_with)
                ),
            ));
        }
        rows
    }
}

impl HostileOutcome {
    fn row(&self) -> String {
        let mut parts = Vec::new();
        if !self.never_reading_ended.is_empty() {
            parts.push(format!(
                "never-reading ended: {}",
                counts_row(&self.never_reading_ended)
            ));
        }
        if let Some(after) = &self.silent_closed_after_ms {
            parts.push(format!(
                "silent closed: {} after {:.0}–{:.0} ms",
                self.silent_closed, after.p50, after.max
            ));
        }
        if self.silent_connect_errors > 0 {
            parts.push(format!(
                "silent connects failed: {}",
                self.silent_connect_errors
            ));
        }
        if self.flood_ok_per_s > 0.0 || !self.flood_errors.is_empty() {
            parts.push(format!(
                "flood: {:.0} ok/s, refused: {}",
                self.flood_ok_per_s,
                counts_row(&self.flood_errors)
            ));
        }
        if parts.is_empty() {
            "nothing happened to them".into()
        } else {
            parts.join("; ")
        }
    }
}

fn print(report: &impl Summary, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    let rows = report.rows();
    let width = rows
        .iter()
        .map(|(name, _)| name.chars().count())
        .max()
        .unwrap_or(0);
    for (name, value) in rows {
        println!("{name:<width$}  {value}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// plumbing

/// Opens `count` connections: each `connect` of the endpoint is its own HTTP/2 connection.
async fn connect(target: &Target, count: u32) -> anyhow::Result<Vec<Client>> {
    Ok(connect_channels(target, count)
        .await?
        .into_iter()
        .map(client)
        .collect())
}

fn client(channel: InterceptedService<Channel, BearerToken>) -> Client {
    KeyValueStoreClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// `count` connections to the server, each carrying the `--token` if there is one.
async fn connect_channels(
    target: &Target,
    count: u32,
) -> anyhow::Result<Vec<InterceptedService<Channel, BearerToken>>> {
    let endpoint = target.server.clone().local_address(target.source);
    let token = target.token.clone().unwrap_or_default();
    let mut channels = Vec::new();
    for _ in 0..count {
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to {}", endpoint.uri()))?;
        channels.push(InterceptedService::new(channel, token.clone()));
    }
    Ok(channels)
}

async fn join_all<T: 'static>(mut tasks: JoinSet<T>) -> anyhow::Result<Vec<T>> {
    let mut results = Vec::with_capacity(tasks.len());
    while let Some(result) = tasks.join_next().await {
        results.push(result.context("a worker task failed")?);
    }
    Ok(results)
}

/// A progress bar on stderr, counting to `len` if the run has a known size.
fn progress_bar(len: Option<u64>, unit: &str) -> ProgressBar {
    let (bar, template) = match len {
        Some(len) => (
            ProgressBar::new(len),
            format!("{{bar:30}} {{human_pos}}/{{human_len}} {unit}, {{per_sec}}, {{elapsed}}"),
        ),
        None => (
            ProgressBar::no_length(),
            format!("{{spinner}} {{human_pos}} {unit}, {{per_sec}}, {{elapsed}}"),
        ),
    };
    bar.with_style(ProgressStyle::with_template(&template).expect("the template is valid"))
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err("expected a fraction from 0 to 1".into()),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err("expected a positive number per second".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn keys_have_exactly_the_key_size() {
        let keys = |count, key_size| {
            KeySpace::new(&KeyArgs {
                keys: count,
                key_size,
                value_size: 0,
            })
        };
        let space = keys(1_000_000, 16).unwrap();
        assert_eq!(space.key(7), "key:000000000007");
        assert_eq!(space.key(999_999), "key:000000999999");
        assert!(keys(1_000_000, 9).is_err(), "6 digits do not fit in 5");
        assert_eq!(keys(10, 5).unwrap().key(9), "key:9");
    }

    #[test]
    fn batch_ops_are_encoded_as_the_generated_code_decodes_them() {
        use prost::Message as _;

        let long_value = "v".repeat(200);
        let mut request = BytesMut::new();
        put_batch_op(&mut request, b"key:1", None);
        put_batch_op(&mut request, b"key:2", Some(long_value.as_bytes()));
        put_batch_op(&mut request, b"", Some(b""));
        let op = |op| BatchOp { op: Some(op) };
        let set = |key: &str, value: &str| {
            op(batch_op::Op::Set(SetRequest {
                key: key.into(),
                value: value.into(),
                ..SetRequest::default()
            }))
        };
        assert_eq!(
            BatchRequest::decode(request.freeze()).unwrap(),
            BatchRequest {
                ops: vec![
                    op(batch_op::Op::Get(GetRequest {
                        key: "key:1".into()
                    })),
                    set("key:2", &long_value),
                    set("", ""),
                ]
            }
        );
    }

    #[test]
    fn a_batch_response_is_counted_by_kind_of_result() {
        use kvstore::pb::{BatchResponse, BatchResult, batch_result};
        use prost::Message as _;

        let result = |result| BatchResult {
            result: Some(result),
        };
        let response = BatchResponse {
            results: vec![
                result(batch_result::Result::Get(GetResponse {
                    value: "v".repeat(300),
                    found: true,
                    ..GetResponse::default()
                })),
                result(batch_result::Result::Get(GetResponse::default())),
                result(batch_result::Result::Set(SetResponse::default())),
                result(batch_result::Result::Conflict(Default::default())),
                BatchResult { result: None },
            ],
            revision: 42,
        };
        let bytes = response.encode_to_vec();
        assert_eq!(
            BatchSummary::walk(&mut &bytes[..]).unwrap(),
            BatchSummary {
                gets: 2,
                sets: 1,
                others: 2
            }
        );
        assert_eq!(
            BatchSummary::walk(&mut &[][..]).unwrap(),
            BatchSummary::default()
        );
        assert!(
            BatchSummary::walk(&mut &bytes[..bytes.len() / 2]).is_err(),
            "a truncated response is an error"
        );
    }

    #[test]
    fn a_complete_ordered_delivery_has_no_faults() {
        assert_eq!(
            check_sequence(&[3, 5, 9], &[3, 5, 9]),
            SequenceCheck::default()
        );
    }

    #[test]
    fn a_skipped_revision_is_missing() {
        let check = check_sequence(&[3, 9], &[3, 5, 9]);
        assert_eq!((check.missing, check.reordered), (1, 0));
    }

    #[test]
    fn swapped_or_repeated_revisions_are_reorders_not_gaps() {
        let swapped = check_sequence(&[5, 3, 9], &[3, 5, 9]);
        assert_eq!((swapped.reordered, swapped.missing), (1, 0));
        let repeated = check_sequence(&[3, 5, 5, 9], &[3, 5, 9]);
        assert_eq!((repeated.reordered, repeated.missing), (1, 0));
    }

    #[test]
    fn a_revision_no_acknowledged_write_produced_is_counted_apart() {
        let check = check_sequence(&[3, 4, 5], &[3, 5]);
        assert_eq!(
            check,
            SequenceCheck {
                reordered: 0,
                missing: 0,
                unacknowledged: 1
            }
        );
    }

    #[test]
    fn cpu_ticks_are_read_after_a_command_name_with_spaces() {
        let stat = "4242 (kv server) S 1 4242 4242 0 -1 4194560 1009 0 0 0 250 31 0 0 20 0 \
                    5 0 123 456 789";
        assert_eq!(stat_cpu_ticks(stat), Some(281));
        assert_eq!(stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn rss_is_read_from_the_vmrss_line_in_bytes() {
        let status = "Name:\tkvstore-server\nVmPeak:\t  999 kB\nVmRSS:\t   31192 kB\nThreads:\t3\n";
        assert_eq!(status_rss(status), Some(31192 * 1024));
        assert_eq!(status_rss("Name:\tx\n"), None);
    }

    #[test]
    fn open_loop_calls_fall_due_at_the_rate() {
        let (schedule, pacer) = Schedule::open(1000.0, None, Some(3));
        let Schedule::Open(open) = &*schedule else {
            unreachable!("Schedule::open is open")
        };
        assert_eq!(open.due_at(500) - open.start, Duration::from_millis(500));
        assert_eq!(pacer.thread.join().unwrap(), 3);
    }
}
