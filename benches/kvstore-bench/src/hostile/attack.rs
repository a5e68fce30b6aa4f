//! Runs one kind of hostile client on a thread of its own, with a single-threaded runtime,
//! so that its CPU is read apart from the well-behaved client's; and the first three kinds
//! (never-reading subscribers, silent connections, a flooder).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use hdrhistogram::Histogram;
use kvstore::pb::key_value_store_client::KeyValueStoreClient;
use kvstore::pb::{ChangeEvent, GetRequest, SubscribeRequest};
use kvstore::token::BearerToken;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::service::Interceptor;
use tonic::transport::Endpoint;
use tonic::{Code, Streaming};

use super::{Hostile, HostileArgs, h2, raw, streams};
use crate::connect::{Client, join_all};
use crate::process::thread_cpu;
use crate::report::{Latency, Tally, by_name, counts_row, nanos, new_histogram, record};
use crate::workload::KEY_PREFIX;

/// Subscribers on one connection of never-reading subscribers.
const NEVER_READING_PER_CONNECTION: usize = 100;

/// After a hostile round, how long its never-reading subscribers may take to read what
/// they were sent and reach the end of their streams.
const NEVER_READING_DRAIN: Duration = Duration::from_secs(30);

/// What every kind needs to reach the server as the hostile address does; owned, for the
/// hostile thread.
pub struct Plan {
    pub args: HostileArgs,
    /// The server's address, for attackers writing TCP or HTTP/2 themselves.
    pub server: SocketAddr,
    /// The server's endpoint, connecting from the hostile address.
    pub endpoint: Endpoint,
    pub token: BearerToken,
    /// The `authorization` header of --token, for attackers writing HTTP/2 themselves.
    pub authorization: Option<http::HeaderValue>,
}

impl Plan {
    pub async fn new(args: &HostileArgs) -> anyhow::Result<Self> {
        let token = args.target.token.clone().unwrap_or_default();
        let authorization = token
            .clone()
            .call(tonic::Request::new(()))
            .ok()
            .and_then(|request| {
                let value = request.metadata().get("authorization")?.to_str().ok()?;
                http::HeaderValue::from_str(value).ok()
            });
        Ok(Self {
            server: resolve(&args.target.server).await?,
            endpoint: args
                .target
                .server
                .clone()
                .local_address(Some(args.hostile_source)),
            token,
            authorization,
            args: args.clone(),
        })
    }

    /// A tonic client from the hostile address, on a connection of its own.
    pub async fn client(&self, endpoint: Endpoint) -> anyhow::Result<Client> {
        let channel = endpoint
            .connect()
            .await
            .context("connecting a hostile client")?;
        Ok(KeyValueStoreClient::with_interceptor(
            channel,
            self.token.clone(),
        ))
    }
}

/// The server's address, for the attackers that are plain TCP.
async fn resolve(endpoint: &Endpoint) -> anyhow::Result<SocketAddr> {
    let authority = endpoint
        .uri()
        .authority()
        .context("the server address has no host:port")?
        .as_str()
        .to_owned();
    tokio::net::lookup_host(&authority)
        .await
        .with_context(|| format!("resolving {authority}"))?
        .next()
        .with_context(|| format!("{authority} resolves to no address"))
}

/// A TCP connection to `server` from `source`.
pub async fn connect_from(server: SocketAddr, source: IpAddr) -> std::io::Result<TcpStream> {
    let socket = match server {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(server).await
}

/// Named counts the attackers' tasks add to as things happen to them.
#[derive(Clone, Default)]
pub struct Counts(Arc<Mutex<BTreeMap<String, u64>>>);

impl Counts {
    pub fn add(&self, name: impl Into<String>) {
        let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *counts.entry(name.into()).or_default() += 1;
    }

    fn take(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// One kind of hostile client, running on its own thread until [`Attack::stop`].
pub struct Attack {
    stop: CancellationToken,
    outcome: oneshot::Receiver<anyhow::Result<HostileOutcome>>,
    thread: thread::JoinHandle<()>,
}

impl Attack {
    /// Starts the hostile clients of `kind`; returns once they are in place: connected,
    /// subscribed, flooding.
    pub async fn start(plan: Arc<Plan>, kind: Hostile) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let (ready, in_place) = oneshot::channel::<anyhow::Result<()>>();
        let (done, outcome) = oneshot::channel();
        let thread = thread::Builder::new()
            .name("hostile".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(err) => {
                            let _ = ready.send(Err(err.into()));
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let running = match Running::start(&plan, kind, &stop).await {
                            Ok(running) => running,
                            Err(err) => {
                                let _ = ready.send(Err(err));
                                return;
                            }
                        };
                        let result = async {
                            let (before, started) = (thread_cpu()?, Instant::now());
                            let _ = ready.send(Ok(()));
                            stop.cancelled().await;
                            let cores = (thread_cpu()? - before).as_secs_f64()
                                / started.elapsed().as_secs_f64();
                            let mut outcome = running.finish(started).await?;
                            outcome.attacker_cores = cores;
                            Ok(outcome)
                        };
                        let _ = done.send(result.await);
                    });
                }
            })
            .context("starting the hostile thread")?;
        in_place
            .await
            .map_err(|_| anyhow!("the hostile thread ended before its clients were in place"))??;
        Ok(Self {
            stop,
            outcome,
            thread,
        })
    }

    /// Stops them, and says how the server treated them and what they cost.
    pub async fn stop(self) -> anyhow::Result<HostileOutcome> {
        self.stop.cancel();
        let outcome = self
            .outcome
            .await
            .map_err(|_| anyhow!("the hostile thread ended without an outcome"))?;
        // It has sent its outcome: what is left is dropping its runtime.
        tokio::task::spawn_blocking(move || self.thread.join())
            .await?
            .map_err(|_| anyhow!("the hostile thread panicked"))?;
        outcome
    }
}

/// The hostile clients of one round, on the hostile thread.
struct Running {
    /// Never-reading subscriptions, and the clients that keep their connections open.
    never_reading: Vec<Streaming<ChangeEvent>>,
    _never_reading_clients: Vec<Client>,
    silent: JoinSet<SilentTally>,
    flood: JoinSet<Tally>,
    /// The other kinds' tasks, each ending soon after `stop`.
    tasks: JoinSet<()>,
    counts: Counts,
}

/// What one silent connection slot saw: connections the server closed, and after how long.
pub struct SilentTally {
    pub closed_after: Histogram<u64>,
    pub connect_errors: u64,
}

impl Running {
    async fn start(
        plan: &Arc<Plan>,
        kind: Hostile,
        stop: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let args = &plan.args;
        let mut running = Self {
            never_reading: Vec::new(),
            _never_reading_clients: Vec::new(),
            silent: JoinSet::new(),
            flood: JoinSet::new(),
            tasks: JoinSet::new(),
            counts: Counts::default(),
        };
        if kind.includes(Hostile::NeverReading) {
            let count = args.never_reading as usize;
            for _ in 0..count.div_ceil(NEVER_READING_PER_CONNECTION) {
                let endpoint = plan
                    .endpoint
                    .clone()
                    .initial_stream_window_size(args.never_reading_window);
                running
                    ._never_reading_clients
                    .push(plan.client(endpoint).await?);
            }
            for i in 0..count {
                let mut client =
                    running._never_reading_clients[i / NEVER_READING_PER_CONNECTION].clone();
                let stream = client
                    .subscribe(SubscribeRequest::default())
                    .await
                    .context("subscribing a never-reading subscriber")?
                    .into_inner();
                running.never_reading.push(stream);
            }
        }
        if kind.includes(Hostile::Silent) {
            for _ in 0..args.silent {
                running.silent.spawn(silent_connection(
                    plan.server,
                    args.hostile_source,
                    stop.clone(),
                ));
            }
        }
        if kind.includes(Hostile::Flood) {
            for _ in 0..args.flood_connections {
                let client = plan.client(plan.endpoint.clone()).await?;
                for _ in 0..args.flood_concurrency {
                    running
                        .flood
                        .spawn(flood_worker(client.clone(), stop.clone()));
                }
            }
        }
        let (tasks, counts) = (&mut running.tasks, &running.counts);
        match kind {
            Hostile::NeverReading | Hostile::Silent | Hostile::Flood | Hostile::All => {}
            Hostile::BodyLess => h2::body_less(plan, tasks, counts, stop).await?,
            Hostile::ZeroWindow => h2::zero_window(plan, tasks, counts, stop).await?,
            Hostile::PartialHealth => h2::partial_health(plan, tasks, counts, stop).await?,
            Hostile::LogFlood => h2::log_flood(plan, tasks, counts, stop).await?,
            Hostile::ControlFlood => raw::control_flood(plan, tasks, counts, stop),
            Hostile::OneSource => raw::one_source(plan, tasks, counts, stop),
            Hostile::SnapshotChurn => streams::snapshot_churn(plan, tasks, counts, stop).await?,
            Hostile::SubscriptionHog => {
                streams::subscription_hog(plan, tasks, counts, stop).await?
            }
            Hostile::ReplayChurn => streams::replay_churn(plan, tasks, counts, stop).await?,
            Hostile::PrefixLengths => streams::prefix_lengths(plan, tasks, counts, stop).await?,
            Hostile::BigAnswers => streams::big_answers(plan, tasks, counts, stop).await?,
        }
        Ok(running)
    }

    /// Once `stop` is cancelled: waits for every task, reads the never-reading subscriptions
    /// to their end, and says how the server treated each client.
    async fn finish(self, started: Instant) -> anyhow::Result<HostileOutcome> {
        let seconds = started.elapsed().as_secs_f64();
        join_all(self.tasks).await?;
        let flood = Tally::merge_all(join_all(self.flood).await?);
        let mut closed_after = new_histogram();
        let mut connect_errors = 0;
        for slot in join_all(self.silent).await? {
            closed_after
                .add(&slot.closed_after)
                .expect("auto-resizing histograms accept any value");
            connect_errors += slot.connect_errors;
        }
        let mut reading = JoinSet::new();
        for stream in self.never_reading {
            reading.spawn(read_to_end(stream));
        }
        let mut never_reading_ended: BTreeMap<String, u64> = BTreeMap::new();
        for ended in join_all(reading).await? {
            let name = ended.map_or_else(|| "still open".into(), |code| format!("{code:?}"));
            *never_reading_ended.entry(name).or_default() += 1;
        }
        Ok(HostileOutcome {
            never_reading_ended,
            silent_closed: closed_after.len(),
            silent_closed_after_ms: (!closed_after.is_empty())
                .then(|| Latency::of(&closed_after).scaled(1e-3)),
            silent_connect_errors: connect_errors,
            flood_ok_per_s: flood.calls as f64 / seconds,
            flood_errors: by_name(&flood.errors),
            counts: self.counts.take(),
            attacker_cores: 0.0,
        })
    }
}

/// Reads a never-reading subscription as a client that finally reads would: how it ended,
/// or `None` if it was still open after [`NEVER_READING_DRAIN`].
pub async fn read_to_end(mut stream: Streaming<ChangeEvent>) -> Option<Code> {
    let read = async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return Code::Ok,
                Err(status) => return status.code(),
            }
        }
    };
    tokio::time::timeout(NEVER_READING_DRAIN, read).await.ok()
}

/// Holds one connection that sends nothing, from `source`, until `stop`; each time the server
/// closes it, records after how long and opens another.
pub async fn silent_connection(
    server: SocketAddr,
    source: IpAddr,
    stop: CancellationToken,
) -> SilentTally {
    let mut tally = SilentTally {
        closed_after: new_histogram(),
        connect_errors: 0,
    };
    while !stop.is_cancelled() {
        let opened = Instant::now();
        let mut stream = match connect_from(server, source).await {
            Ok(stream) => stream,
            Err(_) => {
                tally.connect_errors += 1;
                // Past the server's connection limit, or out of ports: do not spin.
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let mut buffer = [0u8; 64];
        let closed = tokio::select! {
            () = stop.cancelled() => false,
            // Anything read, or an end, or an error: the server is done with it.
            _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buffer) => true,
        };
        if closed {
            record(&mut tally.closed_after, nanos(opened.elapsed()));
        }
    }
    tally
}

/// Calls Get as fast as the server answers, until `stop`.
pub async fn flood_worker(mut client: Client, stop: CancellationToken) -> Tally {
    let mut tally = Tally::new();
    while !stop.is_cancelled() {
        let sent = Instant::now();
        let result = client
            .get(GetRequest {
                key: format!("{KEY_PREFIX}flood"),
            })
            .await;
        tally.record(None, sent, result.map(|_| 1));
    }
    tally
}

/// How the server treated the hostile clients of one round.
#[derive(Debug, Default, Serialize)]
pub struct HostileOutcome {
    /// How each never-reading subscription ended once read after the round: by status, or
    /// "still open".
    pub never_reading_ended: BTreeMap<String, u64>,
    /// Silent connections the server closed.
    pub silent_closed: u64,
    /// After how long, in milliseconds.
    pub silent_closed_after_ms: Option<Latency>,
    pub silent_connect_errors: u64,
    /// Flooder calls that succeeded, per second.
    pub flood_ok_per_s: f64,
    /// Flooder calls refused, by status.
    pub flood_errors: BTreeMap<String, u64>,
    /// What the other kinds' attackers counted: calls opened, and how the server answered,
    /// reset or closed them.
    pub counts: BTreeMap<String, u64>,
    /// The CPU of the thread running the hostile clients, from when they were in place to
    /// when they were stopped, in cores.
    pub attacker_cores: f64,
}

impl HostileOutcome {
    pub fn row(&self) -> String {
        let mut parts = Vec::new();
        if !self.never_reading_ended.is_empty() {
            parts.push(format!(
                "never-reading ended: {}",
                counts_row(&self.never_reading_ended)
            ));
        }
        if let Some(after) = &self.silent_closed_after_ms {
            parts.push(format!(
                "silent closed: {} after {:.0}–{:.0} ms",
                self.silent_closed, after.p50, after.max
            ));
        }
        if self.silent_connect_errors > 0 {
            parts.push(format!(
                "silent connects failed: {}",
                self.silent_connect_errors
            ));
        }
        if self.flood_ok_per_s > 0.0 || !self.flood_errors.is_empty() {
            parts.push(format!(
                "flood: {:.0} ok/s, refused: {}",
                self.flood_ok_per_s,
                counts_row(&self.flood_errors)
            ));
        }
        if !self.counts.is_empty() {
            parts.push(counts_row(&self.counts));
        }
        if parts.is_empty() {
            parts.push("nothing happened to them".into());
        }
        parts.push(format!("attacker CPU {:.2} cores", self.attacker_cores));
        parts.join("; ")
    }
}
