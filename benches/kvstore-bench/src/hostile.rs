//! `hostile`: a well-behaved client in rounds without and with one kind of hostile client,
//! alternating, and what the server did to each attacker.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use kvstore::pb::key_value_store_client::KeyValueStoreClient;
use kvstore::pb::{ChangeEvent, GetRequest, SubscribeRequest};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tonic::{Code, Streaming};

use crate::connect::{Client, connect, join_all};
use crate::load_keys::preload;
use crate::report::{
    Latency, Summary, Tally, WorkloadReport, by_name, counts_row, nanos, new_histogram, range_of,
    record,
};
use crate::unary::run_unary;
use crate::workload::{KEY_PREFIX, PRELOAD_BATCH, Workload};
use crate::{Load, Mix, Target, parse_rate};

/// Subscribers on one connection of never-reading subscribers.
pub const NEVER_READING_PER_CONNECTION: usize = 100;

/// After a hostile round, how long its never-reading subscribers may take to read what
/// they were sent and reach the end of their streams.
pub const NEVER_READING_DRAIN: Duration = Duration::from_secs(30);

/// A kind of hostile client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hostile {
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
    pub fn includes(self, kind: Hostile) -> bool {
        self == kind || self == Hostile::All
    }
}

#[derive(Debug, Args)]
pub struct HostileArgs {
    #[command(flatten)]
    pub target: Target,
    /// The well-behaved client's load, in each round (--duration is per round).
    #[command(flatten)]
    pub load: Load,
    #[command(flatten)]
    pub mix: Mix,

    /// The well-behaved client's calls per second, open-loop; without it, as fast as the
    /// server answers. It is one client: keep it under the server's rate_limit.per_client.
    #[arg(long, value_name = "CALLS_PER_S", value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// Set every key of the key space before the rounds, so gets find their keys.
    #[arg(long)]
    pub preload: bool,

    /// Which hostile clients to measure, each in rounds of its own, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "never-reading,silent,flood,all"
    )]
    pub hostile: Vec<Hostile>,

    /// Pairs of rounds (without, with) per hostile kind; their order alternates, so that a
    /// drift of the machine's speed does not favour either side.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,

    /// Never-reading subscribers.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub never_reading: u32,

    /// The never-reading subscribers' HTTP/2 stream window, in bytes: what the server can
    /// send one before its queue starts to fill.
    #[arg(long, default_value_t = 16 * 1024)]
    pub never_reading_window: u32,

    /// Silent connections held open at once.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub silent: u32,

    /// Flooder connections.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub flood_connections: u32,

    /// Get calls in flight per flooder connection.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub flood_concurrency: u32,

    /// Local address of every hostile connection, so that a server limiting by address
    /// counts them apart from the well-behaved client (on Linux every 127.x.y.z is loopback).
    #[arg(long, default_value = "127.0.0.2")]
    pub hostile_source: IpAddr,
}

pub async fn hostile(args: HostileArgs) -> anyhow::Result<HostileReport> {
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
pub async fn resolve(endpoint: &Endpoint) -> anyhow::Result<SocketAddr> {
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
pub struct Hostiles {
    pub stop: CancellationToken,
    /// Never-reading subscriptions, and the clients that keep their connections open.
    pub never_reading: Vec<Streaming<ChangeEvent>>,
    pub _never_reading_clients: Vec<Client>,
    pub silent: JoinSet<SilentTally>,
    pub flood: JoinSet<Tally>,
    pub started: Instant,
}

/// What one silent connection slot saw: connections the server closed, and after how long.
pub struct SilentTally {
    pub closed_after: Histogram<u64>,
    pub connect_errors: u64,
}

impl Hostiles {
    /// Starts the hostile clients of `kind`; returns once they are in place: subscribed,
    /// connected, flooding.
    pub async fn start(
        args: &HostileArgs,
        kind: Hostile,
        server: SocketAddr,
    ) -> anyhow::Result<Self> {
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
    pub async fn stop(self) -> anyhow::Result<HostileOutcome> {
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
pub async fn read_to_end(mut stream: Streaming<ChangeEvent>) -> Option<Code> {
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
pub async fn silent_connection(
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
pub async fn flood_worker(mut client: Client, stop: CancellationToken) -> Tally {
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

/// The results of a hostile run.
#[derive(Debug, Serialize)]
pub struct HostileReport {
    pub mode: &'static str,
    pub server: String,
    pub connections: u32,
    pub concurrency: u32,
    /// The well-behaved client's open-loop rate, if any.
    pub rate: Option<f64>,
    pub workload: WorkloadReport,
    pub round_seconds: f64,
    pub summary: Vec<KindSummary>,
    pub rounds: Vec<RoundReport>,
}

/// One round of the well-behaved client, with or without one kind of hostile client.
#[derive(Debug, Serialize)]
pub struct RoundReport {
    pub pair: u32,
    pub kind: Hostile,
    /// Whether the hostile clients ran in this round.
    pub hostile: bool,
    pub calls_per_s: f64,
    pub errors: BTreeMap<String, u64>,
    pub latency_us: Latency,
    pub behind_schedule: Option<u64>,
    pub outcome: Option<HostileOutcome>,
}

/// How the server treated the hostile clients of one round.
#[derive(Debug, Serialize)]
pub struct HostileOutcome {
    /// How each never-reading subscription ended once read after the round: by status, or
    /// "still open".
    pub never_reading_ended: BTreeMap<String, u64>,
    /// Silent connections the server closed.
    pub silent_closed: u64,
    /// After how long, in milliseconds.
    pub silent_closed_after_ms: Option<Latency>,
    pub silent_connect_errors: u64,
    /// Flooder calls that succeeded, per second.
    pub flood_ok_per_s: f64,
    /// Flooder calls refused, by status.
    pub flood_errors: BTreeMap<String, u64>,
}

/// One kind's rounds side by side: the well-behaved client's figures with the hostile clients
/// over without, per pair of rounds.
#[derive(Debug, Serialize)]
pub struct KindSummary {
    pub kind: Hostile,
    pub throughput_ratios: Vec<f64>,
    pub p99_ratios: Vec<f64>,
    /// Errors of the well-behaved client in the rounds with hostile clients.
    pub errors_with: BTreeMap<String, u64>,
}

impl KindSummary {
    pub fn of(kind: Hostile, rounds: &[RoundReport]) -> Self {
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
    pub fn row(&self) -> String {
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
