//! `kvstore-bench`: the load tool. It drives a running server over gRPC (unary Get/Set,
//! subscription fan-out, Batch, bulk loading, hostile clients beside a well-behaved one) and
//! reports throughput, hdrhistogram latencies and CPU use as a table or one JSON object;
//! `bare-server` serves the constant-answer fixture that is the ceiling of any store built on
//! this gRPC stack. Progress goes to stderr, results to stdout. One module per subcommand;
//! `connect`, `workload`, `pacing`, `process` and `report` are what they share.

// The same allocator as kvstore-server, so the bare fixture is the ceiling of this stack as
// kvstore runs it, not a server handicapped by glibc malloc; the load tool gains too.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod bare_server;
mod batch;
mod connect;
mod fanout;
mod hostile;
mod load_keys;
mod pacing;
mod process;
mod report;
mod subscribers;
mod unary;
mod workload;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use kvstore::token::BearerToken;
use serde::Serialize;
use tonic::transport::Endpoint;

use crate::bare_server::{BareServerArgs, bare_server};
use crate::batch::{BatchArgs, batch};
use crate::fanout::{FanoutArgs, fanout};
use crate::hostile::{HostileArgs, hostile};
use crate::load_keys::{LoadKeysArgs, load_keys};
use crate::report::print;
use crate::subscribers::{SubscribersArgs, subscribers};
use crate::unary::{UnaryArgs, unary};

/// Load generator for a kvstore server, and the bare tonic server it is compared with.
#[derive(Debug, Parser)]
#[command(name = "kvstore-bench", version)]
pub struct Cli {
    /// Print the results as one JSON object instead of a table.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
    /// of one kind at a time (--hostile), alternating: its throughput and latency with over
    /// without, side by side, with the server's CPU and memory and the attackers' CPU.
    // Boxed: it has a flag per kind, several times the size of the other variants.
    Hostile(Box<HostileArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Server address: host:port or http://host:port.
    #[arg(long, value_parser = kvstore::endpoint::parse)]
    pub server: Endpoint,

    /// The server's process ID, to report its CPU time per operation (read from /proc).
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,

    /// Bearer token for a server with authentication on.
    #[arg(long, env = "KVSTORE_TOKEN", hide_env_values = true, value_parser = BearerToken::parse)]
    pub token: Option<BearerToken>,

    /// Local address of this run's connections, so that a server limiting by address counts
    /// it apart from other runs (on Linux every 127.x.y.z is loopback).
    #[arg(long, value_name = "IP")]
    pub source: Option<IpAddr>,
}

#[derive(Debug, Clone, Args)]
pub struct Load {
    /// Connections to open, one tonic Channel (one HTTP/2 connection) each.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,

    /// Calls in flight per connection.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,

    /// How long to run: 10s, 1m.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Stop after this many calls instead of after --duration.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
}

impl Load {
    /// When the run ends, by time or by count, counted from now.
    pub fn bounds(&self) -> (Option<Instant>, Option<u64>) {
        match self.requests {
            Some(count) => (None, Some(count)),
            None => (Some(Instant::now() + self.duration), None),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct KeyArgs {
    /// Keys in the key space: key:000000000000 to key:N-1.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub keys: u64,

    /// Bytes per key: `key:` and zero-padded digits.
    #[arg(long, default_value_t = 16)]
    pub key_size: usize,

    /// Bytes per value written.
    #[arg(long, default_value_t = 64)]
    pub value_size: usize,
}

#[derive(Debug, Clone, Args)]
pub struct Mix {
    /// Fraction of operations that are gets; the rest are sets.
    #[arg(long, default_value_t = 0.9, value_parser = parse_ratio)]
    pub get_ratio: f64,

    /// How keys are picked.
    #[arg(long, value_enum, default_value_t = KeyDistribution::Uniform)]
    pub distribution: KeyDistribution,

    #[command(flatten)]
    pub keys: KeyArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyDistribution {
    /// Every key equally likely.
    Uniform,
    /// Zipf with s = 0.99: key:000000000000 is the hottest.
    Zipf,
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
        Command::Hostile(args) => print(&hostile(*args).await?, cli.json),
        Command::BareServer(args) => bare_server(args).await,
    }
}

pub fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err("expected a fraction from 0 to 1".into()),
    }
}

pub fn parse_rate(s: &str) -> Result<f64, String> {
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
}
