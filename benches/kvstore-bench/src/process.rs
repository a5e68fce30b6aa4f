//! The server process seen from outside: its CPU time and resident memory, read from
//! `/proc`, and this process's own CPU time.

use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::time::{TimeVal, TimeValLike};
use nix::unistd::{SysconfVar, sysconf};
use serde::Serialize;

/// How often the server's memory is read while subscribers are held.
pub const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The server's resident memory, in bytes, from `/proc/PID/status`.
pub fn process_rss(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status_rss(&status).with_context(|| format!("no VmRSS line in {path}"))
}

/// The `VmRSS:   1234 kB` line of `/proc/PID/status`, in bytes.
pub fn status_rss(status: &str) -> Option<u64> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// Runs `work`, reading the server's memory every [`RSS_SAMPLE_EVERY`] meanwhile: its output
/// and the highest reading (none without a PID).
pub async fn with_peak_rss<T>(
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

/// CPU time of this process and, given its PID, the server's, from the start of a run.
pub struct CpuWatch {
    pub started: Instant,
    pub client: Duration,
    pub server: Option<(u32, Duration)>,
}

impl CpuWatch {
    pub fn start(server_pid: Option<u32>) -> anyhow::Result<Self> {
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
    pub fn stop(self, ops: u64) -> anyhow::Result<CpuReport> {
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

pub fn own_cpu() -> anyhow::Result<Duration> {
    rusage_cpu(UsageWho::RUSAGE_SELF).context("reading this process's CPU time")
}

/// The CPU time of the calling thread: what the hostile clients, on a thread of their own,
/// cost this machine.
pub fn thread_cpu() -> anyhow::Result<Duration> {
    rusage_cpu(UsageWho::RUSAGE_THREAD).context("reading this thread's CPU time")
}

fn rusage_cpu(who: UsageWho) -> nix::Result<Duration> {
    let usage = getrusage(who)?;
    let micros = |tv: TimeVal| u64::try_from(tv.num_microseconds()).unwrap_or_default();
    Ok(Duration::from_micros(
        micros(usage.user_time()) + micros(usage.system_time()),
    ))
}

pub fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
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
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

#[derive(Debug, Serialize)]
pub struct CpuReport {
    /// This process's CPU time over the wall time: 1.0 is one core busy throughout.
    pub client_cores: f64,
    pub server_cores: Option<f64>,
    pub server_us_per_op: Option<f64>,
}

impl CpuReport {
    pub fn rows(&self, unit: &str) -> Vec<(String, String)> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
