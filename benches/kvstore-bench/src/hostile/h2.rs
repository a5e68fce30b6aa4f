//! Hostile kinds that speak HTTP/2 through the `h2` crate, with no gRPC library: calls whose
//! message never comes, windows that never open, partial health messages, and failing calls
//! whose long `:path` HPACK indexes once.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use http::HeaderValue;
use kvstore::pb::ListRequest;
use prost::Message;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::ZERO_WINDOW_PREFIX;
use super::attack::{Counts, Plan, connect_from};

/// After the server refuses or resets a call, how long a slot waits before opening the next,
/// so that an attacker the server turns away at once does not spin.
const REOPEN_PAUSE: Duration = Duration::from_millis(10);

/// One HTTP/2 connection from the hostile address; its driver runs in `tasks`.
async fn connect(
    plan: &Plan,
    builder: &h2::client::Builder,
    tasks: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> anyhow::Result<SendRequest<Bytes>> {
    let tcp = connect_from(plan.server, plan.args.hostile_source)
        .await
        .context("connecting a hostile HTTP/2 client")?;
    let (send, connection) = builder
        .handshake(tcp)
        .await
        .context("the HTTP/2 handshake of a hostile client")?;
    let stop = stop.clone();
    tasks.spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            _ = connection => {}
        }
    });
    Ok(send)
}

/// A gRPC call's request headers: POST to `path`, with --token's header if there is one.
fn grpc_request(path: &str, authorization: Option<&HeaderValue>) -> http::Request<()> {
    let mut request = http::Request::post(format!("http://kvstore{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    request.body(()).expect("a valid request")
}

/// The 5-byte gRPC message prefix declaring a message of `len` bytes.
fn message_prefix(len: usize) -> Bytes {
    let mut prefix = vec![0];
    prefix.extend(u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    Bytes::from(prefix)
}

/// Opens a call on `send`: headers, then `body` unless `None`, ending the stream if `end`.
async fn open_call(
    send: &SendRequest<Bytes>,
    request: http::Request<()>,
    body: &[Bytes],
    end: bool,
) -> Result<(ResponseFuture, h2::SendStream<Bytes>), h2::Error> {
    let mut send = send.clone().ready().await?;
    let (response, mut stream) = send.send_request(request, end && body.is_empty())?;
    for (i, chunk) in body.iter().enumerate() {
        stream.send_data(chunk.clone(), end && i + 1 == body.len())?;
    }
    Ok((response, stream))
}

/// How the server answered a call: `grpc-status` from its headers or trailers, or the
/// reset that ended it; the answer's DATA is read and thrown away.
async fn answer(response: ResponseFuture) -> String {
    let response = match response.await {
        Ok(response) => response,
        Err(err) => return reset_name(&err),
    };
    let (parts, mut body) = response.into_parts();
    if let Some(status) = parts.headers.get("grpc-status") {
        return status_name(status);
    }
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(chunk) => {
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            Err(err) => return reset_name(&err),
        }
    }
    match body.trailers().await {
        Ok(Some(trailers)) => trailers
            .get("grpc-status")
            .map_or_else(|| "no grpc-status".into(), status_name),
        Ok(None) => "no trailers".into(),
        Err(err) => reset_name(&err),
    }
}

fn status_name(status: &HeaderValue) -> String {
    format!("{:?}", tonic::Code::from_bytes(status.as_bytes()))
}

fn reset_name(err: &h2::Error) -> String {
    match err.reason() {
        Some(reason) if err.is_go_away() => format!("goaway {reason:?}"),
        Some(reason) => format!("reset {reason:?}"),
        None => "connection lost".into(),
    }
}

/// Opens calls to `path` at `rate` a second over the connections in turn, with `body` sent
/// and the stream left open, at most `open` at a time; each slot waits for the server's
/// answer, counts it, and frees its place. A connection the server closed is opened anew.
#[allow(clippy::too_many_arguments)]
fn open_calls_at_rate(
    plan: &Arc<Plan>,
    mut sends: Vec<SendRequest<Bytes>>,
    builder: h2::client::Builder,
    path: &'static str,
    body: Vec<Bytes>,
    rate: f64,
    open: usize,
    tasks: &mut JoinSet<()>,
    counts: &Counts,
    stop: &CancellationToken,
) {
    let (plan, counts, stop) = (plan.clone(), counts.clone(), stop.clone());
    tasks.spawn(async move {
        let places = Arc::new(Semaphore::new(open));
        let mut calls = JoinSet::new();
        let mut drivers = JoinSet::new();
        let mut every = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next = 0;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = every.tick() => {}
            }
            let Ok(place) = places.clone().try_acquire_owned() else {
                continue;
            };
            let i = next % sends.len();
            next += 1;
            let request = grpc_request(path, plan.authorization.as_ref());
            let opened = match open_call(&sends[i], request, &body, false).await {
                Ok(opened) => opened,
                Err(err) => {
                    counts.add(format!("not sent: {}", reset_name(&err)));
                    if let Ok(send) = connect(&plan, &builder, &mut drivers, &stop).await {
                        counts.add("connections reopened");
                        sends[i] = send;
                    }
                    continue;
                }
            };
            counts.add("calls opened");
            let (counts, stop) = (counts.clone(), stop.clone());
            calls.spawn(async move {
                let (response, _request_stream) = opened;
                tokio::select! {
                    () = stop.cancelled() => {}
                    answer = answer(response) => counts.add(answer),
                }
                drop(place);
            });
        }
        while calls.join_next().await.is_some() {}
        drivers.shutdown().await;
    });
}

/// body-less: unary Gets whose headers arrive and whose message never does.
pub async fn body_less(
    plan: &Arc<Plan>,
    tasks: &mut JoinSet<()>,
    counts: &Counts,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let args = &plan.args;
    let builder = h2::client::Builder::new();
    let mut sends = Vec::new();
    for _ in 0..args.body_less_connections {
        sends.push(connect(plan, &builder, tasks, stop).await?);
    }
    open_calls_at_rate(
        plan,
        sends,
        builder,
        "/kvstore.KeyValueStore/Get",
        Vec::new(),
        args.body_less_rate,
        args.body_less as usize,
        tasks,
        counts,
        stop,
    );
    Ok(())
}

/// partial-health: health Checks whose message declares one byte more than is sent.
pub async fn partial_health(
    plan: &Arc<Plan>,
    tasks: &mut JoinSet<()>,
    counts: &Counts,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let args = &plan.args;
    let builder = h2::client::Builder::new();
    let open = args.partial_health as usize;
    // The server allows 200 streams a connection by default: half that on each.
    let mut sends = Vec::new();
    for _ in 0..open.div_ceil(100) {
        sends.push(connect(plan, &builder, tasks, stop).await?);
    }
    let bytes = args.partial_health_bytes;
    // One buffer shared by every call: h2 sends slices of it.
    let body = vec![message_prefix(bytes + 1), Bytes::from(vec![0u8; bytes])];
    // Open them all within about a second, then keep them open.
    let rate = (open as f64).max(1.0);
    open_calls_at_rate(
        plan,
        sends,
        builder,
        "/grpc.health.v1.Health/Check",
        body,
        rate,
        open,
        tasks,
        counts,
        stop,
    );
    Ok(())
}

/// zero-window: connections whose stream window is 0 and never opens, each with List calls
/// of large answers kept open; a call the server ends is opened anew.
pub async fn zero_window(
    plan: &Arc<Plan>,
    tasks: &mut JoinSet<()>,
    counts: &Counts,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let args = &plan.args;
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(0);
    let list = ListRequest {
        prefix: ZERO_WINDOW_PREFIX.into(),
        ..ListRequest::default()
    }
    .encode_to_vec();
    let body = vec![message_prefix(list.len()), Bytes::from(list)];
    for _ in 0..args.zero_window_connections {
        let send = connect(plan, &builder, tasks, stop).await?;
        for _ in 0..args.zero_window_streams {
            let (plan, send, body, counts, stop) = (
                plan.clone(),
                send.clone(),
                body.clone(),
                counts.clone(),
                stop.clone(),
            );
            tasks.spawn(async move {
                while !stop.is_cancelled() {
                    let request =
                        grpc_request("/kvstore.KeyValueStore/List", plan.authorization.as_ref());
                    let ended = match open_call(&send, request, &body, true).await {
                        Ok((response, _request_stream)) => {
                            counts.add("calls opened");
                            // The answer's headers need no window; its DATA does, and the
                            // window stays shut: only an end or a reset comes.
                            tokio::select! {
                                () = stop.cancelled() => return,
                                answer = answer_unread(response) => answer,
                            }
                        }
                        Err(err) => format!("not sent: {}", reset_name(&err)),
                    };
                    counts.add(ended);
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(REOPEN_PAUSE) => {}
                    }
                }
            });
        }
    }
    Ok(())
}

/// How a call whose answer is never read ended: its status if it came without DATA, or
/// the reset.
async fn answer_unread(response: ResponseFuture) -> String {
    let response = match response.await {
        Ok(response) => response,
        Err(err) => return reset_name(&err),
    };
    let (parts, mut body) = response.into_parts();
    if let Some(status) = parts.headers.get("grpc-status") {
        return status_name(status);
    }
    // Waiting for DATA does not open the window: only capacity released does.
    match body.data().await {
        Some(Ok(_)) => "data past a shut window".into(),
        Some(Err(err)) => reset_name(&err),
        None => match body.trailers().await {
            Ok(Some(trailers)) => trailers
                .get("grpc-status")
                .map_or_else(|| "no grpc-status".into(), status_name),
            Ok(None) => "no trailers".into(),
            Err(err) => reset_name(&err),
        },
    }
}

/// log-flood: health calls to an unknown method under a long `:path`, without a token, as
/// fast as the server answers, on one connection.
pub async fn log_flood(
    plan: &Arc<Plan>,
    tasks: &mut JoinSet<()>,
    counts: &Counts,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let args = &plan.args;
    let send = connect(plan, &h2::client::Builder::new(), tasks, stop).await?;
    let path: Arc<str> = format!(
        "/grpc.health.v1.Health/{}",
        "x".repeat(args.log_flood_path_bytes)
    )
    .into();
    let body = vec![message_prefix(0)];
    for _ in 0..args.log_flood_concurrency {
        let (send, path, body, counts, stop) = (
            send.clone(),
            path.clone(),
            body.clone(),
            counts.clone(),
            stop.clone(),
        );
        tasks.spawn(async move {
            while !stop.is_cancelled() {
                let answer = match open_call(&send, grpc_request(&path, None), &body, true).await {
                    Ok((response, _request_stream)) => tokio::select! {
                        () = stop.cancelled() => return,
                        answer = answer(response) => answer,
                    },
                    Err(err) => {
                        counts.add(format!("not sent: {}", reset_name(&err)));
                        // The connection is gone: this worker is done.
                        return;
                    }
                };
                counts.add(answer);
            }
        });
    }
    Ok(())
}
