//! `subscribers`: many Subscribe streams held open, optionally written to, then closed: the
//! server's memory per subscriber and after they leave.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::connect::{STREAMS_PER_CONNECTION, connect};
use crate::fanout::Audience;
use crate::process::{process_rss, with_peak_rss};
use crate::report::{Latency, Summary, by_name, counts_row};
use crate::{Target, parse_rate};

#[derive(Debug, Args)]
pub struct SubscribersArgs {
    #[command(flatten)]
    pub target: Target,

    /// Subscriptions to hold open, spread evenly over the prefixes.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub subscribers: u32,

    /// Distinct prefixes subscribed to; the writes go to them in turn.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub prefixes: u32,

    /// Subscription streams per connection (the server allows 200 by default).
    #[arg(long, default_value_t = STREAMS_PER_CONNECTION, value_parser = clap::value_parser!(u32).range(1..))]
    pub streams_per_connection: u32,

    /// How long to hold them idle, once all are open, before any write.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub hold: Duration,

    /// Then write this many times per second, all writers together, for --duration; without
    /// it, nothing is written.
    #[arg(long, value_name = "WRITES_PER_S", value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// Writers, each with its own connection and one Set in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub writers: u32,

    /// How long to write: 10s, 1m.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Bytes per value; each value is the send instant in nanoseconds, zero-padded to this.
    #[arg(long, default_value_t = 20)]
    pub value_size: usize,

    /// After the last write, how long to wait for subscribers to receive every event.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain: Duration,

    /// After every subscriber has disconnected, how long to wait before reading the server's
    /// memory again: it frees theirs in its own tasks, and the allocator returns pages later.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
}

pub async fn subscribers(args: SubscribersArgs) -> anyhow::Result<SubscribersReport> {
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

/// The results of a subscribers run.
#[derive(Debug, Serialize)]
pub struct SubscribersReport {
    pub mode: &'static str,
    pub server: String,
    pub subscribers: u32,
    pub prefixes: u32,
    pub subscriber_connections: usize,
    /// From the first Subscribe call until every one had its response headers.
    pub open_seconds: f64,
    /// The server's memory, given its PID.
    pub memory: Option<MemoryReport>,
    /// Acknowledged writes.
    pub writes: u64,
    pub writes_per_s: f64,
    pub write_errors: BTreeMap<String, u64>,
    pub events_expected: u64,
    pub events_delivered: u64,
    pub missing: u64,
    pub reordered: u64,
    /// Subscription streams that ended before the run closed them, by status.
    pub streams_ended: BTreeMap<String, u64>,
    pub delivery_latency_us: Latency,
}

/// The server's resident memory (RSS) in a subscribers run, in bytes.
#[derive(Debug, Serialize)]
pub struct MemoryReport {
    /// Before the first subscription.
    pub baseline_bytes: u64,
    /// Once every subscription was open, before any event.
    pub open_bytes: u64,
    /// The highest reading while they were held, idle and during the writes.
    pub peak_bytes: u64,
    /// After they disconnected and --settle passed.
    pub after_bytes: u64,
    pub idle_bytes_per_subscriber: f64,
    pub peak_bytes_per_subscriber: f64,
    /// `after_bytes - baseline_bytes`: what the allocator kept, or what leaked.
    pub retained_bytes: i64,
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

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}
