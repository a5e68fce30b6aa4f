//! `hostile`: a well-behaved client in rounds without and with one kind of hostile client,
//! alternating, side by side in one run: its throughput and p99, the server's CPU, peak RSS
//! and log bytes in each round, what the server did to the attackers and what they cost
//! (`attack` runs them on a thread of their own). The kinds live in `hostile/`: tonic
//! clients in `streams`, HTTP/2 by the `h2` crate in `h2`, frames by hand in `raw`.

mod attack;
mod h2;
mod raw;
mod streams;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use kvstore::pb::{BatchRequest, SetRequest, SubscribeRequest};
use serde::Serialize;

use crate::connect::{Client, connect};
use crate::load_keys::preload_workload;
use crate::process::{process_cpu, with_peak_rss};
use crate::report::{Latency, Summary, WorkloadReport, by_name, counts_row, range_of};
use crate::subscribers::mib;
use crate::unary::run_unary;
use crate::workload::Workload;
use crate::{Load, Mix, Target, parse_rate};
pub use attack::HostileOutcome;
use attack::{Attack, Plan};

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
    /// The first three at once.
    All,
    /// Unary calls that send their headers and never their message, --body-less-rate a
    /// second, up to --body-less open at once.
    BodyLess,
    /// Connections announcing a zero HTTP/2 window that never read, each with List calls
    /// of large answers open.
    ZeroWindow,
    /// Subscribe with `initial` on a prefix of --snapshot-keys keys, each cancelled after
    /// its first message.
    SnapshotChurn,
    /// Control frames that do no work (--control-frame) in a loop, as fast as the socket
    /// takes them, reconnecting when closed.
    ControlFlood,
    /// gRPC health Check calls holding a partial message of --partial-health-bytes.
    PartialHealth,
    /// Many connections from one address, each sending one complete request and then a
    /// frame a byte a second.
    OneSource,
    /// Failing health calls without a token, their long `:path` indexed by HPACK so each
    /// costs a few bytes: what the server logs for them.
    LogFlood,
    /// Many subscriptions from one address, each asking for progress events often.
    SubscriptionHog,
    /// Subscribe from the oldest retained revision on a prefix matching nothing, cancelled
    /// once open.
    ReplayChurn,
    /// Idle subscriptions at every prefix length `a`, `aa`, ... up to --prefix-lengths.
    PrefixLengths,
    /// --big-answers-connections clients, each calling in a loop a Batch of 500 Gets of
    /// 1 MiB values and a List of those values with a limit of 10,000: answers of hundreds
    /// of megabytes without the server's limits.max_response_bytes. They read every answer.
    BigAnswers,
}

impl Hostile {
    pub fn includes(self, kind: Hostile) -> bool {
        self == kind
            || self == Hostile::All
                && matches!(
                    kind,
                    Hostile::NeverReading | Hostile::Silent | Hostile::Flood
                )
    }
}

/// The frame of a control-flood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlFrame {
    /// Connection-level WINDOW_UPDATE of 1.
    WindowUpdate,
    /// SETTINGS of 2,730 parameters.
    Settings,
    /// PING.
    Ping,
}

/// Prefixes of the data the kinds set up before the rounds.
const SNAPSHOT_PREFIX: &str = "hostile/snapshot/";
const ZERO_WINDOW_PREFIX: &str = "hostile/zero-window/";
const REPLAY_PREFIX: &str = "hostile/replay/";
const BIG_PREFIX: &str = "hostile/big/";

/// big-answers: the large values under [`BIG_PREFIX`], and their size (the server's default
/// limits.max_value_bytes).
const BIG_VALUES: usize = 8;
const BIG_VALUE_BYTES: usize = 1 << 20;

/// How long the well-behaved client's probe Subscribe may take to open.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Args)]
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

    /// The server's log file (its stdout), to report the bytes it wrote in each round.
    #[arg(long, value_name = "FILE")]
    pub server_log: Option<PathBuf>,

    /// body-less: calls held open at once, their headers sent and never their message.
    #[arg(long, default_value_t = 1200, value_parser = clap::value_parser!(u32).range(1..))]
    pub body_less: u32,

    /// body-less: new calls per second.
    #[arg(long, default_value_t = 100.0, value_parser = parse_rate)]
    pub body_less_rate: f64,

    /// body-less: connections they are spread over.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
    pub body_less_connections: u32,

    /// zero-window: connections announcing a zero stream window and never reading.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub zero_window_connections: u32,

    /// zero-window: List calls kept open on each.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub zero_window_streams: u32,

    /// zero-window: values under the listed prefix, set before the rounds.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub zero_window_values: u32,

    /// zero-window: bytes per value; each answer is about values x this (under the
    /// server's limits.max_response_bytes).
    #[arg(long, default_value_t = 1_000_000)]
    pub zero_window_value_bytes: usize,

    /// snapshot-churn: keys under the subscribed prefix, set before the rounds.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub snapshot_keys: u32,

    /// snapshot-churn: Subscribe calls with `initial` per second, each cancelled after its
    /// first message.
    #[arg(long, default_value_t = 80.0, value_parser = parse_rate)]
    pub snapshot_rate: f64,

    /// control-flood: the frame sent in a loop.
    #[arg(long, value_enum, default_value_t = ControlFrame::WindowUpdate)]
    pub control_frame: ControlFrame,

    /// control-flood: connections flooding at once, each reopened when the server closes it.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub control_flood_connections: u32,

    /// partial-health: health Check calls held open with a partial message.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub partial_health: u32,

    /// partial-health: bytes of each partial message (one byte short of what it declares).
    #[arg(long, default_value_t = 4 << 20)]
    pub partial_health_bytes: usize,

    /// one-source: connections from the one hostile address, each sending one complete
    /// request and then a frame a byte a second.
    #[arg(long, default_value_t = 1100, value_parser = clap::value_parser!(u32).range(1..))]
    pub one_source: u32,

    /// log-flood: failing health calls in flight, on one connection, without a token.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub log_flood_concurrency: u32,

    /// log-flood: bytes of the long `:path`, sent once and then indexed by HPACK.
    #[arg(long, default_value_t = 3900)]
    pub log_flood_path_bytes: usize,

    /// subscription-hog: subscriptions opened from the one hostile address.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub subscription_hog: u32,

    /// subscription-hog: the progress interval each asks for.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub subscription_hog_progress: Duration,

    /// replay-churn: Subscribe calls per second from the oldest retained revision, on a
    /// prefix that matches nothing, each cancelled once open.
    #[arg(long, default_value_t = 400.0, value_parser = parse_rate)]
    pub replay_rate: f64,

    /// replay-churn: changes written before the rounds, so the history is full
    /// (history.max_events).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub replay_history: u32,

    /// prefix-lengths: idle subscriptions, one at each prefix length `a`, `aa`, ...
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub prefix_lengths: u32,

    /// big-answers: connections, each with one Batch or List of a large answer in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub big_answers_connections: u32,
}

pub async fn hostile(args: HostileArgs) -> anyhow::Result<HostileReport> {
    let workload = Arc::new(Workload::new(&args.mix)?);
    let clients = connect(&args.target, args.load.connections).await?;
    if args.preload {
        preload_workload(&args.target, args.load.connections, &workload).await?;
    }
    prepare(&clients[0], &args).await?;
    let plan = Arc::new(Plan::new(&args).await?);
    let pid = args.target.server_pid;
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
                    Some(kind) => Some(Attack::start(plan.clone(), kind).await?),
                    None => None,
                };
                let probe = probe_subscribe(&clients[0]).await;
                let log_before = log_bytes(&args)?;
                let cpu_before = pid.map(process_cpu).transpose()?;
                let started = Instant::now();
                let (run, peak_rss) =
                    with_peak_rss(pid, run_unary(&clients, &workload, &args.load, args.rate))
                        .await?;
                let run = run?;
                let server_cores = match (pid, cpu_before) {
                    (Some(pid), Some(before)) => Some(
                        (process_cpu(pid)? - before).as_secs_f64()
                            / started.elapsed().as_secs_f64(),
                    ),
                    _ => None,
                };
                let server_log_bytes = log_bytes(&args)?
                    .zip(log_before)
                    .map(|(after, before)| after.saturating_sub(before));
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
                    server_cores,
                    server_peak_rss_bytes: peak_rss,
                    server_log_bytes,
                    probe_subscribe: probe,
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

/// Sets up the data the chosen kinds attack, from the well-behaved client's connection:
/// the snapshot's keys, the large values, a full history.
async fn prepare(client: &Client, args: &HostileArgs) -> anyhow::Result<()> {
    let chosen = |kind| args.hostile.contains(&kind);
    if chosen(Hostile::SnapshotChurn) {
        eprintln!(
            "setting {} keys under {SNAPSHOT_PREFIX}",
            args.snapshot_keys
        );
        let keys = (0..args.snapshot_keys).map(|i| format!("{SNAPSHOT_PREFIX}{i:08}"));
        set_all(client, keys, "s".repeat(64), 1000).await?;
    }
    if chosen(Hostile::ZeroWindow) {
        let keys = (0..args.zero_window_values).map(|i| format!("{ZERO_WINDOW_PREFIX}{i}"));
        set_all(client, keys, "z".repeat(args.zero_window_value_bytes), 1).await?;
    }
    if chosen(Hostile::ReplayChurn) {
        eprintln!(
            "writing {} changes under {REPLAY_PREFIX}",
            args.replay_history
        );
        let keys = (0..args.replay_history).map(|i| format!("{REPLAY_PREFIX}{}", i % 1000));
        set_all(client, keys, "r".repeat(16), 1000).await?;
    }
    if chosen(Hostile::BigAnswers) {
        let keys = (0..BIG_VALUES).map(|i| format!("{BIG_PREFIX}{i}"));
        set_all(client, keys, "b".repeat(BIG_VALUE_BYTES), 1).await?;
    }
    Ok(())
}

/// Sets every key of `keys` to `value`, `per_call` keys per Batch call.
async fn set_all(
    client: &Client,
    keys: impl Iterator<Item = String>,
    value: String,
    per_call: usize,
) -> anyhow::Result<()> {
    let mut client = client.clone();
    let mut keys = keys.peekable();
    while keys.peek().is_some() {
        let ops = keys
            .by_ref()
            .take(per_call)
            .map(|key| {
                crate::workload::Call::Set(SetRequest {
                    key,
                    value: value.clone(),
                    ..SetRequest::default()
                })
                .into()
            })
            .collect();
        client
            .batch(BatchRequest { ops })
            .await
            .context("setting up a hostile kind's data")?;
    }
    Ok(())
}

/// Whether the well-behaved client can still open a subscription: "ok", or the status.
async fn probe_subscribe(client: &Client) -> String {
    let mut client = client.clone();
    let request = SubscribeRequest {
        key_pattern: "hostile/probe/".into(),
        ..SubscribeRequest::default()
    };
    match tokio::time::timeout(PROBE_TIMEOUT, client.subscribe(request)).await {
        Ok(Ok(_)) => "ok".into(),
        Ok(Err(status)) => format!("{:?}", status.code()),
        Err(_) => "not open in time".into(),
    }
}

/// The size of the server's log file, given one.
fn log_bytes(args: &HostileArgs) -> anyhow::Result<Option<u64>> {
    args.server_log
        .as_ref()
        .map(|path| {
            std::fs::metadata(path)
                .map(|m| m.len())
                .with_context(|| format!("reading the size of {}", path.display()))
        })
        .transpose()
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
    /// The server's CPU over the round, in cores (given --server-pid).
    pub server_cores: Option<f64>,
    /// The server's highest resident memory in the round (given --server-pid).
    pub server_peak_rss_bytes: Option<u64>,
    /// Bytes the server's log grew by in the round (given --server-log).
    pub server_log_bytes: Option<u64>,
    /// Whether the well-behaved client could open a Subscribe at the start of the round:
    /// "ok", or the status it got.
    pub probe_subscribe: String,
    pub outcome: Option<HostileOutcome>,
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
    /// The server's CPU in cores, in the rounds without and with.
    pub server_cores_without: Vec<f64>,
    pub server_cores_with: Vec<f64>,
    /// The server's peak RSS in bytes, in the rounds without and with.
    pub server_peak_rss_without: Vec<u64>,
    pub server_peak_rss_with: Vec<u64>,
    /// The attackers' own CPU in cores, per round with them.
    pub attacker_cores: Vec<f64>,
}

impl KindSummary {
    pub fn of(kind: Hostile, rounds: &[RoundReport]) -> Self {
        let mut summary = Self {
            kind,
            throughput_ratios: Vec::new(),
            p99_ratios: Vec::new(),
            errors_with: BTreeMap::new(),
            server_cores_without: Vec::new(),
            server_cores_with: Vec::new(),
            server_peak_rss_without: Vec::new(),
            server_peak_rss_with: Vec::new(),
            attacker_cores: Vec::new(),
        };
        let of_kind: Vec<&RoundReport> = rounds.iter().filter(|r| r.kind == kind).collect();
        for round in &of_kind {
            let (cores, rss) = if round.hostile {
                (
                    &mut summary.server_cores_with,
                    &mut summary.server_peak_rss_with,
                )
            } else {
                (
                    &mut summary.server_cores_without,
                    &mut summary.server_peak_rss_without,
                )
            };
            cores.extend(round.server_cores);
            rss.extend(round.server_peak_rss_bytes);
            if let Some(outcome) = &round.outcome {
                summary.attacker_cores.push(outcome.attacker_cores);
            }
        }
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
            let mut server = Vec::new();
            if let Some(cores) = round.server_cores {
                server.push(format!("CPU {cores:.2} cores"));
            }
            if let Some(peak) = round.server_peak_rss_bytes {
                server.push(format!("peak RSS {}", mib(peak)));
            }
            if let Some(log) = round.server_log_bytes {
                server.push(format!("log +{log} bytes"));
            }
            server.push(format!("a new Subscribe: {}", round.probe_subscribe));
            rows.push(("  server".into(), server.join(", ")));
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
            let rss = |bytes: &[u64]| {
                let mib: Vec<f64> = bytes
                    .iter()
                    .map(|&b| b as f64 / f64::from(1 << 20))
                    .collect();
                range_of(&mib)
            };
            rows.push((
                "  server".into(),
                format!(
                    "CPU {} cores without, {} with; peak RSS {} MiB without, {} MiB with; attacker CPU {} cores",
                    range_of(&kind.server_cores_without),
                    range_of(&kind.server_cores_with),
                    rss(&kind.server_peak_rss_without),
                    rss(&kind.server_peak_rss_with),
                    range_of(&kind.attacker_cores),
                ),
            ));
        }
        rows
    }
}
