//! Results: latency histograms, per-worker tallies, and the reports printed as a table or
//! one JSON object.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::{Code, Status};

use crate::process::CpuReport;
use crate::{KeyDistribution, Mix};

/// An auto-resizing histogram of nanoseconds, precise to 3 significant figures.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant figures is within hdrhistogram's range")
}

pub fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

pub fn record(histogram: &mut Histogram<u64>, nanos: u64) {
    // Not `saturating_record`: it clamps to the current size instead of growing.
    histogram
        .record(nanos)
        .expect("an auto-resizing histogram grows to any latency under 146 years");
}

/// One worker's results. Each worker keeps its own and they are merged at the end, so workers
/// share nothing but the schedule while they run.
pub struct Tally {
    /// Nanoseconds per successful call.
    pub latency: Histogram<u64>,
    /// Open loop only: nanoseconds from when each call was due to when it was sent, whether
    /// late for want of a free worker or of a core for this process.
    pub lag: Histogram<u64>,
    pub calls: u64,
    /// Key operations in the successful calls.
    pub ops: u64,
    pub errors: HashMap<Code, u64>,
}

impl Tally {
    pub fn new() -> Self {
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
    pub fn record(&mut self, due: Option<Instant>, sent: Instant, result: Result<u64, Status>) {
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

    pub fn merge_all(tallies: Vec<Self>) -> Self {
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
pub struct Latency {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    pub fn of(histogram: &Histogram<u64>) -> Self {
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
    pub fn scaled(self, factor: f64) -> Self {
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

    pub fn row(&self) -> String {
        format!(
            "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (mean {:.1}, n={})",
            self.p50, self.p90, self.p99, self.p999, self.max, self.mean, self.count
        )
    }
}

pub fn by_name(counts: &HashMap<Code, u64>) -> BTreeMap<String, u64> {
    counts
        .iter()
        .map(|(code, count)| (format!("{code:?}"), *count))
        .collect()
}

pub fn counts_row(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    let parts: Vec<String> = counts
        .iter()
        .map(|(name, count)| format!("{name} {count}"))
        .collect();
    parts.join(", ")
}

#[derive(Debug, Serialize)]
pub struct WorkloadReport {
    pub get_ratio: f64,
    pub keys: u64,
    pub distribution: KeyDistribution,
    pub key_size: usize,
    pub value_size: usize,
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
pub struct CallReport {
    pub mode: &'static str,
    pub server: String,
    pub connections: u32,
    pub concurrency: u32,
    pub workload: WorkloadReport,
    /// Subscriptions open throughout a unary run on prefixes its keys never match.
    pub idle_subscribers: Option<u32>,
    pub batch_size: Option<u64>,
    pub open_loop: Option<OpenLoopReport>,
    pub seconds: f64,
    /// Successful calls.
    pub calls: u64,
    pub calls_per_s: f64,
    /// Key operations per second in successful calls (equal to calls_per_s for unary).
    pub ops_per_s: f64,
    pub errors: BTreeMap<String, u64>,
    /// Call latency, from when the call was due (open loop) or sent (closed loop).
    pub latency_us: Latency,
    pub cpu: CpuReport,
}

/// How well an open-loop run kept to its schedule.
#[derive(Debug, Serialize)]
pub struct OpenLoopReport {
    /// Calls per second asked for.
    pub rate: f64,
    /// Calls that fell due but were never sent, every worker being busy until the end.
    pub behind_schedule: u64,
    /// From when each call was due to when it was sent. Part of the latency; when it is large
    /// with workers to spare, this process was waiting for a core.
    pub send_lag_us: Latency,
}

/// A report: serialized as one JSON object, or printed as rows of a table.
pub trait Summary: Serialize {
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

/// `0.97–1.02`, or the one value.
pub fn range_of(values: &[f64]) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match values.len() {
        0 => "none".into(),
        1 => format!("{min:.2}"),
        _ => format!("{min:.2}–{max:.2}"),
    }
}

pub fn print(report: &impl Summary, json: bool) -> anyhow::Result<()> {
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
