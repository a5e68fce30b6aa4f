//! Connections to the server under test: clients carrying the `--token`, Subscribe streams
//! opened in bulk, and the task plumbing the subcommands share.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use kvstore::pb::key_value_store_client::KeyValueStoreClient;
use kvstore::pb::{ChangeEvent, SubscribeRequest};
use kvstore::token::BearerToken;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::Target;

/// Every call carries the `--token`, if one was given.
pub type Client = KeyValueStoreClient<InterceptedService<Channel, BearerToken>>;

/// Far above the server's batch limit (4 MiB by default), so a large batch's response is
/// limited by the server's settings, not by this client's decoder.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How long all subscriptions of a run may take to get their response headers.
pub const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Subscribe calls opening at once. The server sheds calls past `server.max_in_flight` (1024
/// by default) until they have their response headers, so 10,000 opened at once would fail.
pub const SUBSCRIBE_AT_ONCE: usize = 256;

/// Subscription streams per connection, by default: half the server's limit per connection
/// (200 by default).
pub const STREAMS_PER_CONNECTION: u32 = 100;

/// Opens `count` connections: each `connect` of the endpoint is its own HTTP/2 connection.
pub async fn connect(target: &Target, count: u32) -> anyhow::Result<Vec<Client>> {
    Ok(connect_channels(target, count)
        .await?
        .into_iter()
        .map(client)
        .collect())
}

pub fn client(channel: InterceptedService<Channel, BearerToken>) -> Client {
    KeyValueStoreClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// `count` connections to the server, each carrying the `--token` if there is one.
pub async fn connect_channels(
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

pub async fn join_all<T: 'static>(mut tasks: JoinSet<T>) -> anyhow::Result<Vec<T>> {
    let mut results = Vec::with_capacity(tasks.len());
    while let Some(result) = tasks.join_next().await {
        results.push(result.context("a worker task failed")?);
    }
    Ok(results)
}

/// A progress bar on stderr, counting to `len` if the run has a known size.
pub fn progress_bar(len: Option<u64>, unit: &str) -> ProgressBar {
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

/// Opens one subscription per key pattern, `per_connection` to each connection it opens, and
/// returns once every one has its response headers: from then on the server delivers every
/// later write to the prefix (the Subscribe contract). The streams come with their indices in
/// `patterns`, and with the clients, which keep the connections open.
pub async fn subscribe_all(
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
pub async fn drain(mut stream: Streaming<ChangeEvent>, stop: CancellationToken) -> Option<Code> {
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
