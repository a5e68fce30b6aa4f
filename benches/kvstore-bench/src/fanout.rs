//! `fanout`: subscribers on prefixes of their own and paced writers; every event checked
//! against the acknowledged writes for gaps and reorders. `subscribers` shares its audience.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use kvstore::pb::{ChangeEvent, SetRequest};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Streaming};

use crate::connect::{
    Client, STREAMS_PER_CONNECTION, connect, join_all, progress_bar, subscribe_all,
};
use crate::pacing::Schedule;
use crate::process::{CpuReport, CpuWatch};
use crate::report::{Latency, Summary, by_name, counts_row, nanos, new_histogram, record};
use crate::{Target, parse_rate};

/// How often the fan-out run checks whether every subscriber has caught up.
pub const DRAIN_POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub target: Target,

    /// Subscriptions to open, spread evenly over the prefixes.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub subscribers: u32,

    /// Distinct prefixes subscribed to; the writes go to them in turn.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub prefixes: u32,

    /// Writers, each with its own connection and one Set in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub writers: u32,

    /// Writes per second, all writers together.
    #[arg(long, default_value_t = 100.0, value_name = "WRITES_PER_S", value_parser = parse_rate)]
    pub rate: f64,

    /// How long to write: 10s, 1m.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Bytes per value; each value is the send instant in nanoseconds, zero-padded to this.
    #[arg(long, default_value_t = 20)]
    pub value_size: usize,

    /// Subscription streams per connection (the server allows 200 by default).
    #[arg(long, default_value_t = STREAMS_PER_CONNECTION, value_parser = clap::value_parser!(u32).range(1..))]
    pub streams_per_connection: u32,

    /// After the last write, how long to wait for subscribers to receive every event.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain: Duration,
}

pub async fn fanout(args: FanoutArgs) -> anyhow::Result<FanoutReport> {
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

/// The results of a fan-out run.
#[derive(Debug, Serialize)]
pub struct FanoutReport {
    pub mode: &'static str,
    pub server: String,
    pub subscribers: u32,
    pub prefixes: u32,
    pub subscriber_connections: usize,
    pub writers: u32,
    pub target_rate: f64,
    pub write_seconds: f64,
    /// Acknowledged writes.
    pub writes: u64,
    pub writes_per_s: f64,
    /// Writes that fell due but were never sent, every writer being busy.
    pub behind_schedule: u64,
    pub write_errors: BTreeMap<String, u64>,
    /// Events the subscribers should have received: each one's acknowledged writes.
    pub events_expected: u64,
    pub events_delivered: u64,
    /// Events delivered per second, from the first write until every subscriber caught up.
    pub events_per_s: f64,
    pub missing: u64,
    pub reordered: u64,
    pub unacknowledged: u64,
    /// Subscription streams that ended before the run stopped them, by status.
    pub streams_ended: BTreeMap<String, u64>,
    /// Send instant (before the Set) to receive instant.
    pub delivery_latency_us: Latency,
    pub cpu: CpuReport,
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

/// Subscribers on the prefixes of one run, each read by a task of its own until
/// [`Audience::finish`]: what `fanout` and `subscribers` share.
pub struct Audience {
    /// Send and receive instants are both nanoseconds since this one instant, so a delivery
    /// latency is a difference of two readings of one monotonic clock.
    pub epoch: Instant,
    pub prefixes: Arc<[String]>,
    /// Each subscriber's index in `prefixes`.
    pub prefix_of: Vec<usize>,
    /// They keep the subscribers' connections open.
    pub clients: Vec<Client>,
    pub states: Vec<Arc<Delivery>>,
    pub readers: JoinSet<Received>,
    pub stop: CancellationToken,
    pub bar: ProgressBar,
}

/// The acknowledged writes of a run.
pub struct Writes {
    /// Revisions of the acknowledged writes, per prefix, ascending.
    pub expected: Vec<Vec<u64>>,
    pub errors: HashMap<Code, u64>,
    /// Writes that fell due but were never sent, every writer being busy.
    pub behind_schedule: u64,
    pub started: Instant,
    pub seconds: f64,
}

impl Writes {
    pub fn count(&self) -> u64 {
        self.expected.iter().map(|r| r.len() as u64).sum()
    }
}

/// What the subscribers of a run received, checked against the acknowledged writes.
pub struct Deliveries {
    pub latency: Histogram<u64>,
    pub check: SequenceCheck,
    /// Streams that ended before the run stopped them, by status.
    pub ended: HashMap<Code, u64>,
    pub expected: u64,
    pub delivered: u64,
}

impl Audience {
    /// Opens `subscribers` subscriptions, `per_connection` to a connection, on `prefixes`
    /// prefixes of this run alone (so no other writes reach them and every event must match
    /// an acknowledged write of this run), and starts reading them.
    pub async fn open(
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
    pub async fn write(
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
    pub async fn wait_caught_up(&self, expected: &[Vec<u64>], drain: Duration) {
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
    pub async fn finish(self, expected: &[Vec<u64>]) -> anyhow::Result<Deliveries> {
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

/// What a subscriber has received so far, for deciding when the run has drained.
#[derive(Default)]
pub struct Delivery {
    pub last_revision: AtomicU64,
    /// The stream ended on its own (an error status, or the server closed it).
    pub ended: AtomicBool,
}

/// Everything one subscriber received, kept in full so that gaps and reorders are checked
/// exactly against the acknowledged writes once they are all known.
pub struct Received {
    pub index: usize,
    pub revisions: Vec<u64>,
    pub latencies: Vec<u64>,
    /// How the stream ended, if it ended before the run stopped it.
    pub ended: Option<Code>,
}

pub async fn receive(
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
pub struct Written {
    pub acked: Vec<(usize, u64)>,
    pub errors: HashMap<Code, u64>,
}

pub async fn write(
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
pub struct SequenceCheck {
    /// Events whose revision was not above the one before.
    pub reordered: u64,
    /// Acknowledged writes to the prefix that never arrived.
    pub missing: u64,
    /// Revisions received that no acknowledged write produced (a write that failed on the
    /// client after the server applied it, e.g. a deadline).
    pub unacknowledged: u64,
}

impl SequenceCheck {
    pub fn add(&mut self, other: Self) {
        self.reordered += other.reordered;
        self.missing += other.missing;
        self.unacknowledged += other.unacknowledged;
    }
}

/// Checks the revisions a subscriber `seen`, in arrival order, against the `expected`
/// revisions (ascending) of the acknowledged writes to its prefix.
pub fn check_sequence(seen: &[u64], expected: &[u64]) -> SequenceCheck {
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

pub fn nanos_since(epoch: Instant) -> u64 {
    nanos(epoch.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
