//! `unary`: Get/Set calls from workers sharing a schedule, closed- or open-loop; its runs
//! are also the well-behaved client of `hostile`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use indicatif::ProgressBar;
use rand::rngs::SmallRng;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::connect::{
    Client, STREAMS_PER_CONNECTION, connect, drain, join_all, progress_bar, subscribe_all,
};
use crate::load_keys::preload_workload;
use crate::pacing::{Pacer, Schedule};
use crate::process::CpuWatch;
use crate::report::{
    CallReport, Latency, OpenLoopReport, Tally, WorkloadReport, by_name, counts_row,
};
use crate::workload::{Call, Workload};
use crate::{Load, Mix, Target, parse_rate};

#[derive(Debug, Args)]
pub struct UnaryArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub load: Load,
    #[command(flatten)]
    pub mix: Mix,

    /// Send this many calls per second in total, open-loop: latency counts from when each call
    /// was due, so a stalled server shows as latency rather than as calls never sent. Without
    /// it, each worker sends as soon as its previous call returns.
    #[arg(long, value_name = "CALLS_PER_S", value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// Set every key of the key space before the run, so gets find their keys.
    #[arg(long)]
    pub preload: bool,

    /// Subscriptions on prefixes no key of the run matches (`idle:N/`), open throughout it
    /// on connections of their own: what subscribers cost calls they never see.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub idle_subscribers: u32,
}

pub async fn unary(args: UnaryArgs) -> anyhow::Result<CallReport> {
    let workload = Arc::new(Workload::new(&args.mix)?);
    let clients = connect(&args.target, args.load.connections).await?;
    if args.preload {
        preload_workload(&args.target, args.load.connections, &workload).await?;
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
pub struct UnaryRun {
    pub tally: Tally,
    pub seconds: f64,
    /// Open loop only: calls that fell due but were never sent.
    pub behind_schedule: Option<u64>,
}

/// Runs `load` on `clients`, open-loop at `rate` calls/s if given.
pub async fn run_unary(
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

pub async fn unary_worker(
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
