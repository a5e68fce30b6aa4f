//! The accept loop of one listener: admission under the connection caps (per listener, per
//! address, and the open-file cap), refusals told why at once, and the drain at shutdown.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::header::{CONNECTION, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::answers::{Answers, StreamExecutor};
use crate::caller::peer_key;
use crate::config::{Cidr, MIN_HEADER_BYTES, ServerSettings};
use crate::header_limit::HeaderLimited;
use crate::http;
use crate::metrics::{Connections, LimitKey, Metrics};
use crate::open_files;

use super::conn::connection;
use super::new_connections::NewConnections;

/// What every connection of one listener shares.
pub(super) struct Listener {
    pub(super) name: &'static str,
    pub(super) app: HeaderLimited<Router>,
    /// Counts this listener's open connections, for metrics.
    pub(super) open: Connections,
    /// Counts refused connections and connections cut by `server.handshake_timeout`.
    pub(super) metrics: Arc<Metrics>,
    /// Its HTTP/2 streams run under `server.send_timeout`.
    pub(super) http: auto::Builder<StreamExecutor>,
    /// Each connection's answers count against their share and the server's budget.
    pub(super) answers: Answers,
    pub(super) tls: Option<TlsAcceptor>,
    pub(super) max_connections: usize,
    /// This listener's connections by address, and the proxies exempt from their cap.
    per_address: PerAddress,
    new_connections: NewConnections,
    /// The cap the open-file limit puts on every listener's connections together, if it is
    /// below what `server.max_connections` asks.
    pub(super) files: Option<Arc<FileCap>>,
    pub(super) handshake_timeout: Duration,
    pub(super) idle_timeout: Option<Duration>,
    pub(super) max_control_frames: u32,
}

impl Listener {
    pub(super) fn new(
        name: &'static str,
        app: HeaderLimited<Router>,
        tls: Option<TlsAcceptor>,
        settings: &ServerSettings,
        metrics: &Arc<Metrics>,
        files: &Option<Arc<FileCap>>,
        answers: &Answers,
    ) -> Arc<Self> {
        let idle_timeout = Some(settings.idle_timeout).filter(|t| !t.is_zero());
        let ceiling = header_ceiling(settings.max_header_bytes);
        let mut http = auto::Builder::new(answers.executor());
        http.http1()
            .timer(TokioTimer::new())
            // A request's head must fit in the read buffer. It is never larger than the
            // header list counted as HTTP/2 does (each field line costs 4 bytes of syntax
            // against 32 counted), so a request within the ceiling always fits.
            .max_buf_size(ceiling.max(MIN_HEADER_BYTES))
            // Each field counts at least 33 bytes, so more fields than ceiling / 32 are
            // beyond the ceiling anyway; hyper's default of 100 would refuse smaller
            // requests with many short fields.
            .max_headers((ceiling / 32).min(MAX_HTTP1_FIELDS))
            // Headers of a request after the first on a kept-alive connection; the first is
            // bounded by handshake_timeout, in `serve_http`.
            .header_read_timeout(idle_timeout);
        http.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(settings.max_streams_per_connection)
            .max_header_list_size(u32::try_from(ceiling).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(settings.keepalive_interval).filter(|t| !t.is_zero()))
            .keep_alive_timeout(settings.keepalive_timeout);
        Arc::new(Self {
            name,
            app,
            open: metrics.connections(name),
            metrics: metrics.clone(),
            http,
            answers: answers.clone(),
            tls,
            max_connections: settings.max_connections,
            per_address: PerAddress {
                cap: settings.connections_per_address(),
                trusted: settings.trusted_proxies.clone(),
                open: Arc::default(),
            },
            new_connections: NewConnections::new(name, settings, metrics),
            files: files.clone(),
            handshake_timeout: settings.handshake_timeout,
            idle_timeout,
            max_control_frames: settings.max_control_frames,
        })
    }
}

/// The most header fields an HTTP/1.1 request may have, whatever `server.max_header_bytes`:
/// past hyper's default of 100, hyper allocates a parse slot (64 bytes) for every possible
/// field of every request, so this caps that at 64 KiB a request.
const MAX_HTTP1_FIELDS: usize = 1024;

/// What hyper and h2 hold request headers to, for `server.max_header_bytes` = `max`: twice
/// the limit. Between the limit and this ceiling, requests reach [`HeaderLimit`](crate::header_limit::HeaderLimit), which
/// refuses them naming the key; beyond it hyper (HTTP/1.1: 431, then close) and h2 (a 431 for
/// that stream, or a GOAWAY for a header block too large to buffer) refuse them without a
/// word of why, but without buffering more either. Twice: overshooting the limit by up to
/// as much again (the usual accident: a token or a cookie that grew, headers a proxy added)
/// is told what to change, while what one request can make the server hold only doubles.
fn header_ceiling(max: usize) -> usize {
    max.saturating_mul(2)
}

/// Accepts connections until `stop`, then waits up to `drain` for them to finish and closes
/// the rest. Each connection is its own task, TLS handshake included, so one slow peer never
/// holds up another. Past `server.max_connections`, the open-file cap or
/// `server.max_connections_per_address` a connection is refused as soon as it is accepted
/// (see [`refuse`]): the client learns at once, instead of waiting in the kernel's backlog.
pub(super) async fn serve(
    listener: TcpListener,
    shared: Arc<Listener>,
    stop: CancellationToken,
    drain: Duration,
) {
    let name = shared.name;
    let mut connections = JoinSet::new();
    let mut refusals = Refusals::default();
    let mut accept_errors = Throttled::default();
    // Refused connections being told why; bounded, so a flood costs at most this many tasks.
    let mut refusing = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                // Past its address's rate: closed before anything, TLS handshake included.
                Ok((stream, peer)) if !shared.new_connections.admit(peer.ip()) => drop(stream),
                Ok((stream, peer)) => {
                    // Finished connections may not have been reaped yet; they must not count.
                    while connections.try_join_next().is_some() {}
                    while refusing.try_join_next().is_some() {}
                    match shared.admit(connections.len(), peer.ip()) {
                        Ok(slots) => {
                            let connection = connection(stream, peer, shared.clone(), stop.clone());
                            connections.spawn(shared.open.track(async move {
                                connection.await;
                                drop(slots);
                            }));
                        }
                        Err(refusal) => {
                            refusals.record(name, peer, refusal, &shared);
                            shared.metrics.refused(refusal.limit());
                            // Past the bound the connection is just closed.
                            if refusing.len() < MAX_REFUSING {
                                refusing.spawn(refuse(stream, peer, refusal, shared.clone()));
                            }
                        }
                    }
                }
                Err(err) => {
                    // Usually out of file descriptors (the open-file cap leaves room for
                    // refusals, but other processes' descriptors count against the system's
                    // limit too): back off instead of spinning, and warn once per interval
                    // rather than on every try.
                    if let Some(failed) = accept_errors.due() {
                        warn!(listener = name, error = %err, failed, "accepting connections failed; retrying every 100 ms");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    if connections.is_empty() {
        return;
    }
    info!(
        listener = name,
        connections = connections.len(),
        "shutdown: waiting for open connections"
    );
    let drained = tokio::time::timeout(drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            listener = name,
            connections = connections.len(),
            drain_timeout = %humantime::format_duration(drain),
            "shutdown: drain deadline passed, closing the remaining connections"
        );
        connections.shutdown().await;
    }
}

/// Refused connections told why at once, at most; more are closed without a word. This is
/// also what bounds the TLS handshakes done for refusals.
const MAX_REFUSING: usize = 64;

/// How long a refused connection has to complete its TLS handshake (on a TLS listener), send
/// its first request and take the answer.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// How long the accept loop waits after `accept` fails before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why a connection was refused as soon as it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnectionRefusal {
    /// `server.max_connections` are open on this listener.
    MaxConnections,
    /// The open-file limit's cap on every listener's connections together is reached.
    OpenFiles,
    /// `server.max_connections_per_address` are open from the peer's address.
    PerAddress,
}

impl ConnectionRefusal {
    /// The limit it is counted under: the open-file cap is `server.max_connections`,
    /// lowered.
    fn limit(self) -> LimitKey {
        match self {
            Self::MaxConnections | Self::OpenFiles => LimitKey::MaxConnections,
            Self::PerAddress => LimitKey::MaxConnectionsPerAddress,
        }
    }

    /// What the client is told, naming the setting to change.
    fn reason(self, shared: &Listener) -> String {
        match (self, &shared.files) {
            (Self::OpenFiles, Some(files)) => format!(
                "{} connections are open, all that the server's open-file limit leaves room for (server.max_connections, {}, was lowered at start-up); retry with backoff",
                files.cap, shared.max_connections
            ),
            (Self::PerAddress, _) => format!(
                "server.max_connections_per_address ({}) connections are open from this address; retry with backoff",
                shared.per_address.cap
            ),
            (Self::MaxConnections | Self::OpenFiles, _) => format!(
                "server.max_connections ({}) connections are open; retry with backoff",
                shared.max_connections
            ),
        }
    }
}

/// What an admitted connection holds until it closes: its place under the open-file cap and
/// under its address's cap (neither when not capped).
struct Slots {
    _file: Option<FileSlot>,
    _address: Option<AddressSlot>,
}

impl Listener {
    /// Admits a connection from `ip` with `open` connections on this listener already, or
    /// says which limit refuses it. The table-wide limits are checked first: when the table
    /// is full that is what the client should hear.
    fn admit(&self, open: usize, ip: IpAddr) -> Result<Slots, ConnectionRefusal> {
        if open >= self.max_connections {
            return Err(ConnectionRefusal::MaxConnections);
        }
        let file = match &self.files {
            Some(files) => Some(FileCap::take(files).ok_or(ConnectionRefusal::OpenFiles)?),
            None => None,
        };
        let address = self.per_address.take(ip)?;
        Ok(Slots {
            _file: file,
            _address: address,
        })
    }
}

/// The cap on connections of every listener together that the open-file limit sets, when it
/// leaves room for fewer than `server.max_connections` on each listener.
pub(super) struct FileCap {
    cap: usize,
    open: AtomicUsize,
}

impl FileCap {
    fn take(this: &Arc<Self>) -> Option<FileSlot> {
        this.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                (open < this.cap).then_some(open + 1)
            })
            .ok()?;
        Some(FileSlot(this.clone()))
    }
}

/// One connection under the [`FileCap`], until dropped.
struct FileSlot(Arc<FileCap>);

impl Drop for FileSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The open-file cap for `listeners` listeners of `settings`, if the limit is too low for
/// `server.max_connections` on each; says so at start-up, with the numbers and what to
/// change. Room is kept for the descriptors that are not connections
/// ([`open_files::RESERVED`]) and for the refusals each listener answers at once (and the
/// one it closes without a word), so that `accept` itself never runs out and a client past
/// the cap hears why.
pub(super) fn open_file_cap(settings: &ServerSettings, listeners: usize) -> Option<Arc<FileCap>> {
    let limit = open_files::current()?;
    let soft = usize::try_from(limit.soft?).unwrap_or(usize::MAX);
    let reserved = open_files::RESERVED + listeners * (MAX_REFUSING + 1);
    let cap = soft.saturating_sub(reserved);
    if cap >= settings.max_connections.saturating_mul(listeners) {
        return None;
    }
    warn!(
        open_files = soft,
        open_files_hard = limit.hard,
        reserved,
        max_connections = settings.max_connections,
        listeners,
        connection_cap = cap,
        "the open-file limit (RLIMIT_NOFILE) is below what server.max_connections needs: \
         connections of all listeners together are capped at connection_cap, and refused past \
         it like those past server.max_connections; raise the hard limit (systemd \
         LimitNOFILE=, ulimit -Hn, podman/docker --ulimit nofile=) or lower server.max_connections"
    );
    Some(Arc::new(FileCap {
        cap,
        open: AtomicUsize::new(0),
    }))
}

/// One listener's connections by address (IPv6: by /64), for
/// `server.max_connections_per_address`. An entry lives while its address has a connection
/// open, so the map is never larger than the connection table.
struct PerAddress {
    cap: usize,
    /// `server.trusted_proxies`: exempt, since one of their connections carries many clients.
    trusted: Vec<Cidr>,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerAddress {
    /// A place for one more connection from `ip`; `None` for a trusted proxy, which takes
    /// none.
    fn take(&self, ip: IpAddr) -> Result<Option<AddressSlot>, ConnectionRefusal> {
        if self.trusted.iter().any(|net| net.contains(ip)) {
            return Ok(None);
        }
        let key = peer_key(ip);
        let mut open = self
            .open
            .lock()
            .expect("never poisoned: no panic while held");
        let count = open.entry(key).or_insert(0);
        if *count >= self.cap {
            return Err(ConnectionRefusal::PerAddress);
        }
        *count += 1;
        Ok(Some(AddressSlot {
            key,
            open: self.open.clone(),
        }))
    }
}

/// One connection under its address's cap, until dropped.
struct AddressSlot {
    key: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self
            .open
            .lock()
            .expect("never poisoned: no panic while held");
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Tells a connection refused for `refusal` why, in its own protocol: after the TLS handshake
/// on a TLS listener, it is served (HTTP/1.1 or HTTP/2, as for any connection) with
/// [`refusal`] as its only handler, and closed after the first answer (HTTP/2: with a
/// GOAWAY). A real answer, rather than a GOAWAY's debug data, is what reaches the caller:
/// tonic reports a GOAWAY as a bare "h2 protocol error". All of it is bounded by
/// [`REFUSAL_TIME`]; a client that asks nothing in time is closed without a word.
async fn refuse(
    stream: TcpStream,
    peer: SocketAddr,
    why: ConnectionRefusal,
    shared: Arc<Listener>,
) {
    let answered = tokio::time::timeout(REFUSAL_TIME, async {
        match &shared.tls {
            None => answer_refusal(TokioIo::new(stream), why, &shared).await,
            Some(tls) => match tls.accept(stream).await {
                Ok(stream) => answer_refusal(TokioIo::new(stream), why, &shared).await,
                Err(err) => debug!(listener = shared.name, %peer, error = %err, "TLS handshake of a refused connection failed"),
            },
        }
    })
    .await;
    if answered.is_err() {
        debug!(listener = shared.name, %peer, "a refused connection was not done within 1s, closing");
    }
}

/// Serves `io` with [`refusal`] until it has answered once, then closes it gracefully.
async fn answer_refusal<IO>(io: IO, why: ConnectionRefusal, shared: &Listener)
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let reason = why.reason(shared);
    let answered = Arc::new(Notify::new());
    let service = hyper::service::service_fn({
        let answered = answered.clone();
        move |request| {
            answered.notify_one();
            std::future::ready(Ok::<_, Infallible>(refusal(&request, &reason)))
        }
    });
    let connection = shared.http.serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = answered.notified() => {}
    }
    // One answer says it all: a client asking again would get the same.
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

/// The answer to every request on a refused connection: a gRPC call gets `UNAVAILABLE`
/// (retrying elsewhere is safe: nothing was processed), any other request a 503 with
/// `retry-after`; both give `reason`, which names the limit.
fn refusal<B>(request: &::http::Request<B>, reason: &str) -> Response {
    if http::is_grpc(request) {
        return http::grpc_error(tonic::Status::unavailable(reason));
    }
    let body = Json(serde_json::json!({ "error": reason }));
    let mut response =
        (StatusCode::SERVICE_UNAVAILABLE, [(RETRY_AFTER, "1")], body).into_response();
    if request.version() < Version::HTTP_2 {
        // HTTP/2 ends the connection with its GOAWAY; HTTP/1.1 says so in the answer.
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// How often, at most, a recurring problem of the accept loop (refused connections, failed
/// accepts) is logged at warn: a flood of them must not flood the log too.
const WARNING_EVERY: Duration = Duration::from_secs(10);

/// Occurrences of one recurring problem since its last warning.
#[derive(Default)]
struct Throttled {
    since_warning: u64,
    warned_at: Option<Instant>,
}

impl Throttled {
    /// Counts one occurrence; when a warning is due (the first, then at most one every
    /// [`WARNING_EVERY`]), returns how many it covers.
    fn due(&mut self) -> Option<u64> {
        self.since_warning += 1;
        if self
            .warned_at
            .is_some_and(|at| at.elapsed() < WARNING_EVERY)
        {
            return None;
        }
        self.warned_at = Some(Instant::now());
        Some(std::mem::take(&mut self.since_warning))
    }
}

/// Connections refused since the last warning, by [`ConnectionRefusal`].
#[derive(Default)]
struct Refusals([Throttled; 3]);

impl Refusals {
    fn record(
        &mut self,
        listener: &'static str,
        peer: SocketAddr,
        why: ConnectionRefusal,
        shared: &Listener,
    ) {
        let limit = why.limit().key();
        debug!(listener, %peer, limit, "refused a connection");
        let Some(refused) = self.0[why as usize].due() else {
            return;
        };
        match why {
            ConnectionRefusal::MaxConnections => warn!(
                listener,
                max_connections = shared.max_connections,
                refused,
                "refusing connections: server.max_connections are open"
            ),
            ConnectionRefusal::OpenFiles => warn!(
                listener,
                connection_cap = shared.files.as_ref().map(|files| files.cap),
                refused,
                "refusing connections: the open-file limit's connection cap is reached (see the start-up warning)"
            ),
            ConnectionRefusal::PerAddress => warn!(
                listener,
                max_connections_per_address = shared.per_address.cap,
                refused,
                address = %peer_key(peer.ip()),
                "refusing connections: server.max_connections_per_address are open from one address"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_recurring_problem_warns_at_once_then_at_most_every_interval_with_its_count() {
        let mut accept_errors = Throttled::default();
        assert_eq!(accept_errors.due(), Some(1));
        // One failed accept every ACCEPT_BACKOFF, as when out of file descriptors.
        let mut warnings = Vec::new();
        for _ in 0..300 {
            tokio::time::advance(ACCEPT_BACKOFF).await;
            warnings.extend(accept_errors.due());
        }
        // 30 s: one warning per 10 s, each counting the failures since the last.
        assert_eq!(warnings, [100, 100, 100]);
    }
}
