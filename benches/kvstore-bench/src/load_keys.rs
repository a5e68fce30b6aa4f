//! `load-keys`, and the `--preload` of the other subcommands: every key of a key space set
//! through Batch calls, made with the client library (`kvstore::client`) as any program
//! writing its data would. The measured calls of the other subcommands use raw connections
//! of their own (`connect.rs`): N distinct HTTP/2 connections from a chosen source address,
//! with the least client work, which the library's failover client hides by design.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use kvstore::client::{BatchOp, Client};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::connect::{join_all, progress_bar};
use crate::process::{CpuReport, CpuWatch};
use crate::report::Summary;
use crate::workload::{KeySpace, PRELOAD_BATCH, Workload};
use crate::{KeyArgs, Target};

#[derive(Debug, Args)]
pub struct LoadKeysArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub keys: KeyArgs,

    /// Keys per Batch call.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,

    /// Connections to open.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,

    /// Batch calls in flight per connection.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
}

pub async fn load_keys(args: LoadKeysArgs) -> anyhow::Result<LoadReport> {
    let keys = KeySpace::new(&args.keys)?;
    let value: Arc<str> = "x".repeat(args.keys.value_size).into();
    let cpu = CpuWatch::start(args.target.server_pid)?;
    let started = Instant::now();
    preload(
        &args.target,
        args.connections,
        keys,
        &value,
        args.batch_size,
        args.concurrency,
    )
    .await?;
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

/// The `--preload` of the subcommands that run a workload: every key of its key space, over
/// `connections` clients with two Batch calls in flight on each.
pub async fn preload_workload(
    target: &Target,
    connections: u32,
    workload: &Workload,
) -> anyhow::Result<()> {
    preload(
        target,
        connections,
        workload.keys,
        &workload.value,
        PRELOAD_BATCH,
        2,
    )
    .await
}

/// Sets every key of `keys` to `value`, `batch_size` keys per Batch call, over `connections`
/// clients of the library with `per_connection` calls in flight on each.
pub async fn preload(
    target: &Target,
    connections: u32,
    keys: KeySpace,
    value: &Arc<str>,
    batch_size: u64,
    per_connection: u32,
) -> anyhow::Result<()> {
    let mut clients = Vec::new();
    for _ in 0..connections {
        let mut builder = Client::builder([target.server.uri().to_string()]);
        if let Some(token) = &target.token {
            builder = builder.token(token.clone());
        }
        clients.push(
            builder
                .connect()
                .await
                .context("connecting to preload the keys")?,
        );
    }
    let count = keys.count;
    let chunks = count.div_ceil(batch_size);
    let next_chunk = Arc::new(AtomicU64::new(0));
    let bar = progress_bar(Some(count), "keys loaded");
    let mut workers = JoinSet::new();
    for client in &clients {
        for _ in 0..per_connection {
            let (client, value, next_chunk, bar) = (
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
                        .map(|index| BatchOp::set(keys.key(index), value.to_string()));
                    client
                        .batch(ops)
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

/// The results of a load-keys run.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub mode: &'static str,
    pub server: String,
    pub keys: u64,
    pub key_size: usize,
    pub value_size: usize,
    pub batch_size: u64,
    pub seconds: f64,
    pub keys_per_s: f64,
    pub cpu: CpuReport,
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
