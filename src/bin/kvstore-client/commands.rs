//! The one-call commands (get, set, delete, list, health): one library call each, its answer
//! printed, its outcome turned into the exit code.

use std::process::ExitCode;

use anyhow::Context;
use futures_util::StreamExt;
use kvstore::client::{self, Client, DeleteOptions, ListOptions, SetOptions};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::output::{Output, reader_gone, report};
use crate::{EXIT_FAILURE, EXIT_GUARD_MISMATCH, EXIT_NOT_FOUND};

/// Items per List call: the server's default page, well under its cap.
const LIST_PAGE: u32 = 1000;

pub async fn get(client: &Client, key: String, output: Output) -> anyhow::Result<ExitCode> {
    let response = client.get(key.clone()).await.context("get failed")?;
    output.get(&key, &response)?;
    Ok(if response.kv.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_FOUND)
    })
}

pub async fn set(
    client: &Client,
    key: String,
    value: String,
    options: SetOptions,
    output: Output,
) -> anyhow::Result<ExitCode> {
    match client.set_with(key.clone(), value, options).await {
        Ok(response) => output.set(&key, &response)?,
        Err(err) => return write_refused("set", err),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn delete(
    client: &Client,
    key: String,
    if_revision: Option<i64>,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let mut options = DeleteOptions::new();
    if let Some(revision) = if_revision {
        options = options.if_mod_revision(revision);
    }
    let response = match client.delete_with(key.clone(), options).await {
        Ok(response) => response,
        Err(err) => return write_refused("delete", err),
    };
    output.delete(&key, &response)?;
    Ok(if response.deleted {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_FOUND)
    })
}

/// A write's failure. A compare-and-set guard that did not match is an expected outcome, not an
/// error: it is reported with the server's message (which names the current revision) and exit
/// code 4.
fn write_refused(op: &str, err: client::Error) -> anyhow::Result<ExitCode> {
    let guard_mismatch = matches!(err, client::Error::Conflict { .. });
    let err = anyhow::Error::new(err).context(format!("{op} failed"));
    if !guard_mismatch {
        return Err(err);
    }
    report(format_args!("kvstore-client: {err:#}"));
    Ok(ExitCode::from(EXIT_GUARD_MISMATCH))
}

/// Prints each page as it arrives. Pages may be read at different revisions;
/// `subscribe --initial` is the consistent snapshot.
pub async fn list(
    client: &Client,
    prefix: String,
    limit: Option<u64>,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let mut options = ListOptions::new().page_size(LIST_PAGE);
    if let Some(limit) = limit {
        options = options.limit(limit);
    }
    let mut pages = client.list(prefix, options);
    while let Some(page) = pages.next().await {
        for item in &page.context("list failed")?.items {
            match output.item(item) {
                Ok(()) => {}
                Err(err) if reader_gone(&err) => return Ok(ExitCode::SUCCESS),
                Err(err) => return Err(err).context("writing to stdout"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn health(client: &Client, output: Output) -> anyhow::Result<ExitCode> {
    let status = client.health().await.context("health check failed")?;
    output.health(status.as_str_name())?;
    Ok(if status == ServingStatus::Serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    })
}
