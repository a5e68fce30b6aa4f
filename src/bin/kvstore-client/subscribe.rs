//! `kvstore-client subscribe`: prints a subscription's events until Ctrl-C, the reader of
//! stdout going away, or the end of the stream; with `--resume`, the library's subscription
//! resumes after a lag or a lost connection, and each resumption is noted on stderr.

use std::process::ExitCode;

use anyhow::Context;
use futures_util::StreamExt;
use kvstore::client::{self, Client, Event, SubscribeOptions};

use crate::SubscribeArgs;
use crate::output::{Output, reader_gone, report};

pub async fn subscribe(
    client: &Client,
    args: SubscribeArgs,
    output: Output,
) -> anyhow::Result<ExitCode> {
    // `ctrl_c` installs its handler when first polled, and `biased` polls it before `follow`
    // announces the subscription: a Ctrl-C right after the announcement, or while resuming,
    // must end with exit 0, not kill us.
    tokio::select! {
        biased;
        signal = tokio::signal::ctrl_c() => {
            signal.context("listening for Ctrl-C")?;
            Ok(ExitCode::SUCCESS)
        }
        code = follow(client, args, output) => code,
    }
}

/// Prints the subscription's events until it fails.
async fn follow(client: &Client, args: SubscribeArgs, output: Output) -> anyhow::Result<ExitCode> {
    let mut options = SubscribeOptions::new()
        .resume(args.resume)
        .resume_after_lag(args.resume);
    if args.initial {
        options = options.initial();
    }
    if let Some(ms) = args.progress {
        options = options.progress_interval(std::time::Duration::from_millis(ms.unsigned_abs()));
    }
    match args.from_revision {
        Some(revision) => options = options.start_revision(revision),
        None if args.resume && !args.initial => {
            // The library would read it too; read here, a failure says what was being done.
            let revision = client
                .revision()
                .await
                .context("subscribe failed: reading the current revision")?;
            options = options.start_revision(revision + 1);
        }
        None => {}
    }
    let mut changes = match client.subscribe(args.pattern.clone(), options).await {
        Ok(changes) => changes,
        Err(err @ client::Error::Compacted { .. }) => return Err(compacted(err)),
        Err(err) => return Err(err).context("subscribe failed"),
    };
    // The server registers the subscription before it sends the response headers, so from here
    // on no write is missed; tests wait for this line before writing.
    report(format_args!(
        "subscribed to {:?} (Ctrl-C to stop)",
        args.pattern
    ));

    // Set by a resumption until the resumed stream delivers: an error meanwhile is the
    // resubscription's.
    let mut resuming = false;
    loop {
        let event = match changes.next().await {
            Some(Ok(event)) => event,
            Some(Err(err @ client::Error::Compacted { .. })) => return Err(compacted(err)),
            Some(Err(err @ client::Error::GaveUp { .. })) => return Err(err.into()),
            Some(Err(err)) if resuming => return Err(err).context("subscribe failed"),
            Some(Err(client::Error::EndedWithoutStatus)) | None => {
                anyhow::bail!("subscription ended by the server without a status")
            }
            Some(Err(err)) => return Err(err).context("subscription ended by the server"),
        };
        let printed = match event {
            Event::Change(change) => output.change(&change),
            Event::Progress { revision } => output.progress(revision),
            Event::Resuming {
                from_revision,
                reason,
            } => {
                resuming = true;
                match from_revision {
                    Some(revision) => report(format_args!(
                        "kvstore-client: resuming from revision {revision} after: {reason}"
                    )),
                    // A snapshot cut short: it starts again, and its keys are printed again.
                    None => report(format_args!(
                        "kvstore-client: subscribing again with --initial after: {reason}"
                    )),
                }
                continue;
            }
            _ => continue,
        };
        resuming = false;
        match printed {
            Ok(()) => {}
            // The reader went away (`| head`): like Ctrl-C, that is the user stopping us.
            Err(err) if reader_gone(&err) => return Ok(ExitCode::SUCCESS),
            Err(err) => return Err(err).context("writing to stdout"),
        }
    }
}

/// OUT_OF_RANGE: the history from the start revision on is no longer retained (compacted), so
/// the changes since cannot be replayed; only a fresh snapshot can continue.
fn compacted(err: client::Error) -> anyhow::Error {
    anyhow::anyhow!("{err}; re-run with --initial to start from the current values")
}
