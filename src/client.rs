//! The Rust client of the kvstore gRPC API: connecting (endpoints tried in order, TLS, a
//! bearer token, timeouts), retrying what is safe to repeat, and typed calls (get, set,
//! delete, list as a stream of pages, batch, subscribe as a stream that resumes by itself).
//! Of the rest of the crate it uses only the wire contract (`pb`, its `pb::trailers`),
//! `token::BearerToken` and `endpoint`; never the server, the store or pubsub.
//!
//! ```
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let mut settings = kvstore::config::Settings::default();
//! # settings.server.listen = "127.0.0.1:0".parse()?;
//! # settings.server.health_listen = None;
//! # let startup = kvstore::startup::Startup::from_settings(settings)?;
//! # let server = kvstore::server::bind(startup).await?;
//! # let endpoint = format!("http://{}", server.listen_addr());
//! # let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! # let running = tokio::spawn(server.run(async { let _ = stopped.await; }));
//! use futures_util::StreamExt;
//! use kvstore::client::{Client, Error, Event, ListOptions, SetOptions, SubscribeOptions};
//!
//! // `endpoint` is "http://127.0.0.1:50051" or the like; more than one is tried in order.
//! let client = Client::builder([endpoint]).connect().await?;
//!
//! // Every change under "user:" from now on; the server has registered it on return.
//! let mut changes = client.subscribe("user:", SubscribeOptions::new()).await?;
//!
//! let stored = client.set("user:1", "Alice").await?;
//! let read = client.get("user:1").await?;
//! assert_eq!(read.kv.map(|kv| kv.value).as_deref(), Some("Alice"));
//!
//! // Compare-and-set: only over the revision we read.
//! let options = SetOptions::new().if_mod_revision(stored.revision);
//! client.set_with("user:1", "Alicia", options.clone()).await?;
//! let stale = client.set_with("user:1", "Alex", options).await;
//! assert!(matches!(stale, Err(Error::Conflict { .. })));
//!
//! // Every key under a prefix, a page at a time.
//! let mut pages = client.list("user:", ListOptions::new().page_size(100));
//! while let Some(page) = pages.next().await {
//!     for kv in page?.items {
//!         println!("{} = {}", kv.key, kv.value);
//!     }
//! }
//!
//! if let Some(Ok(Event::Change(change))) = changes.next().await {
//!     assert_eq!((change.key.as_str(), change.revision), ("user:1", stored.revision));
//! }
//! # drop((changes, client));
//! # let _ = stop.send(());
//! # running.await??;
//! # Ok(())
//! # }
//! ```

mod error;
mod retry;
mod subscribe;
mod types;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use http::Uri;
use http::uri::Scheme;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

pub use self::error::Error;
use self::retry::Failure;
pub use self::retry::RetryPolicy;
pub use self::subscribe::{SubscribeOptions, Subscription};
pub use self::types::{
    BatchOp, BatchResponse, BatchResult, Change, ChangeKind, DeleteOptions, DeleteResponse, Event,
    GetResponse, KeyValue, ListOptions, Page, SetOptions, SetResponse,
};
use crate::pb::{self, key_value_store_client::KeyValueStoreClient};
use crate::token::BearerToken;

/// The generated client, with the token on every call.
type Grpc = KeyValueStoreClient<InterceptedService<Channel, BearerToken>>;

/// Far above the server's value limit (1 MiB by default), so that limit is the one that
/// applies and is reported with its setting's name, rather than a client-side decoding error.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// TLS to the server. Without a CA, the server's certificate must chain to Mozilla's public
/// roots (built in, so a container image needs no system trust store); it must name the
/// endpoint's host, or [`Tls::server_name`].
#[derive(Debug, Clone, Default)]
pub struct Tls {
    ca: Option<Certificate>,
    identity: Option<Identity>,
    server_name: Option<String>,
}

impl Tls {
    /// TLS trusting the public roots.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trust only the CA certificates in `pem` (a private CA). Fails with [`Error::Config`]
    /// when it holds no PEM certificate.
    pub fn ca_certificate(mut self, pem: impl AsRef<[u8]>) -> Result<Self, Error> {
        let pem = pem.as_ref();
        if CertificateDer::pem_slice_iter(pem).next().is_none() {
            return Err(Error::Config(
                "no certificate in it (expected a PEM \"BEGIN CERTIFICATE\" block)".into(),
            ));
        }
        self.ca = Some(Certificate::from_pem(pem));
        Ok(self)
    }

    /// Present this certificate and private key (PEM) to a server that verifies clients
    /// (mTLS). A pair TLS cannot use fails [`ClientBuilder::connect`] with [`Error::Config`].
    pub fn identity(mut self, cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> Self {
        self.identity = Some(Identity::from_pem(cert_pem, key_pem));
        self
    }

    /// Expect the server's certificate to name `name` rather than the endpoint's host (an
    /// endpoint given by IP address, a certificate issued for a service name).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// `endpoint` over TLS: an `http://` address becomes `https://`.
    fn apply(&self, endpoint: Endpoint) -> Result<Endpoint, Error> {
        let mut parts = endpoint.uri().clone().into_parts();
        parts.scheme = Some(Scheme::HTTPS);
        let uri = Uri::from_parts(parts)
            .map_err(|err| Error::Config(format!("building the https:// address: {err}")))?;
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => config.ca_certificate(ca.clone()),
            None => config.with_webpki_roots(),
        };
        if let Some(identity) = &self.identity {
            config = config.identity(identity.clone());
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Endpoint::from(uri).tls_config(config).map_err(|err| {
            let cause = std::error::Error::source(&err).map_or(err.to_string(), |e| e.to_string());
            Error::Config(format!("TLS settings cannot be used: {cause}"))
        })
    }
}

/// Settings for [`Client`], from [`Client::builder`]; [`ClientBuilder::connect`] makes it.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    tls: Option<Tls>,
    token: BearerToken,
    connect_timeout: Duration,
    request_timeout: Option<Duration>,
    retry: RetryPolicy,
}

impl ClientBuilder {
    /// Speak TLS to every endpoint. Without it, an `https://` endpoint still gets TLS with
    /// the public roots, and the others are cleartext (h2c).
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Send `authorization: Bearer <token>` with every call, for a server with
    /// authentication on (make one with [`BearerToken::parse`]).
    pub fn token(mut self, token: BearerToken) -> Self {
        self.token = token;
        self
    }

    /// How long one endpoint may take to accept a connection (and finish TLS) before the
    /// next is tried. Default: 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one attempt of a call may wait for its answer (for a subscription: until
    /// the server accepts it) before it fails with CANCELLED "Timeout expired", which is
    /// not retried. Default: none.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// What to retry, and how often; see [`RetryPolicy`].
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Checks the settings, then connects to the first endpoint that accepts, trying them
    /// in the order given. Fails with [`Error::Config`] for a setting that cannot be used
    /// (before any connection is tried), and [`Error::Connect`] when no endpoint accepts.
    pub async fn connect(self) -> Result<Client, Error> {
        if self.endpoints.is_empty() {
            return Err(Error::Config("no endpoint to connect to".into()));
        }
        let mut endpoints = Vec::with_capacity(self.endpoints.len());
        for addr in &self.endpoints {
            let mut endpoint = crate::endpoint::parse_url(addr).map_err(Error::Config)?;
            let https = endpoint.uri().scheme() == Some(&Scheme::HTTPS);
            match &self.tls {
                Some(tls) => endpoint = tls.apply(endpoint)?,
                None if https => endpoint = Tls::new().apply(endpoint)?,
                None => {}
            }
            endpoint = endpoint.connect_timeout(self.connect_timeout);
            if let Some(timeout) = self.request_timeout {
                endpoint = endpoint.timeout(timeout);
            }
            let url = endpoint.uri().to_string();
            endpoints.push((url.trim_end_matches('/').to_owned(), endpoint));
        }
        let client = Client {
            shared: Arc::new(Shared {
                endpoints,
                token: self.token,
                retry: self.retry,
                current: Mutex::default(),
            }),
        };
        client.channel().await?;
        Ok(client)
    }
}

/// A connection to a kvstore server, with failover between endpoints. Cheap to clone: the
/// clones share the connection, which carries any number of concurrent calls (HTTP/2).
///
/// Every call may be retried per the [`RetryPolicy`]: reads after a lost connection or an
/// UNAVAILABLE answer, writes only when they were never sent. A call that fails on a lost
/// connection drops it, and the next attempt (or call) connects to the next endpoint in
/// order, coming back round to the first.
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Each endpoint with its address as errors show it.
    endpoints: Vec<(String, Endpoint)>,
    token: BearerToken,
    retry: RetryPolicy,
    current: Mutex<Current>,
}

/// The connection in use. Held only to copy or swap the channel, never across a call.
#[derive(Debug, Default)]
struct Current {
    /// The endpoint to try first on the next connect.
    next: usize,
    /// The endpoint connected to, and its channel.
    connected: Option<(usize, Channel)>,
}

impl Client {
    /// Settings for a client of `endpoints` (`host:port`, `http://host:port`, or
    /// `https://host:port` for TLS), tried in this order.
    pub fn builder<I, S>(endpoints: I) -> ClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientBuilder {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: None,
            token: BearerToken::default(),
            connect_timeout: crate::endpoint::CONNECT_TIMEOUT,
            request_timeout: None,
            retry: RetryPolicy::default(),
        }
    }

    /// The value of `key` and its revisions; `kv` is `None` when the key does not exist
    /// (not an error). A read: retried.
    pub async fn get(&self, key: impl Into<String>) -> Result<GetResponse, Error> {
        let key = key.into();
        let request = pb::GetRequest { key: key.clone() };
        let response = self
            .call(false, |channel| {
                let (mut grpc, request) = (self.grpc(channel), request.clone());
                async move { grpc.get(request).await }
            })
            .await?;
        Ok(GetResponse::from_wire(key, response))
    }

    /// Stores `value` under `key`, replacing any value and TTL: [`Client::set_with`] with
    /// no guard and no TTL.
    pub async fn set(
        &self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<SetResponse, Error> {
        self.set_with(key, value, SetOptions::default()).await
    }

    /// Stores `value` under `key`, guarded and with a TTL as `options` say. A guard that
    /// does not match fails with [`Error::Conflict`] and changes nothing. A write: retried
    /// only when it was never sent.
    pub async fn set_with(
        &self,
        key: impl Into<String>,
        value: impl Into<String>,
        options: SetOptions,
    ) -> Result<SetResponse, Error> {
        let request = options.into_wire(key.into(), value.into());
        let response = self
            .call(true, |channel| {
                let (mut grpc, request) = (self.grpc(channel), request.clone());
                async move { grpc.set(request).await }
            })
            .await?;
        // This server reports failures as a status; the Go server it replaces answered
        // `success = false`, and a client may still talk to one.
        if !response.success {
            return Err(Error::Refused(response.message));
        }
        Ok(SetResponse {
            revision: response.revision,
            message: response.message,
        })
    }

    /// Removes `key`: [`Client::delete_with`] with no guard.
    pub async fn delete(&self, key: impl Into<String>) -> Result<DeleteResponse, Error> {
        self.delete_with(key, DeleteOptions::default()).await
    }

    /// Removes `key`, guarded as `options` say. Deleting a missing key is not an error:
    /// `deleted` is false. A guard that does not match fails with [`Error::Conflict`]. A
    /// write: retried only when it was never sent.
    pub async fn delete_with(
        &self,
        key: impl Into<String>,
        options: DeleteOptions,
    ) -> Result<DeleteResponse, Error> {
        let request = options.into_wire(key.into());
        let response = self
            .call(true, |channel| {
                let (mut grpc, request) = (self.grpc(channel), request.clone());
                async move { grpc.delete(request).await }
            })
            .await?;
        Ok(response.into())
    }

    /// The keys under `prefix` ("" for all) in byte order, as a stream of pages that asks
    /// for the next page only when the previous one has been taken. Each page is read
    /// atomically, but pages may be read at different revisions. Each page is a read:
    /// retried. The stream ends after the last page, or after its first error.
    pub fn list(&self, prefix: impl Into<String>, options: ListOptions) -> Pages {
        let state = Listing {
            client: self.clone(),
            prefix: prefix.into(),
            left: options.limit.unwrap_or(u64::MAX),
            page_size: options.page_size,
            start_after: options.start_after,
            done: false,
            failed: None,
        };
        let pages = futures_util::stream::unfold(state, |mut state| async move {
            let page = state.next().await?;
            Some((page, state))
        });
        Pages {
            inner: Box::pin(pages),
        }
    }

    /// Applies `ops` in order in one call, under one lock on the server: each op is exactly
    /// what it would be alone (not a transaction; a guard that does not match gives that op
    /// [`BatchResult::Conflict`] and the others still apply). An invalid op fails the whole
    /// call with INVALID_ARGUMENT and applies nothing. A batch of gets only is a read and
    /// retried; one with a set or delete, only when it was never sent.
    pub async fn batch(
        &self,
        ops: impl IntoIterator<Item = BatchOp>,
    ) -> Result<BatchResponse, Error> {
        let ops: Vec<BatchOp> = ops.into_iter().collect();
        let write = ops.iter().any(BatchOp::is_write);
        let keys: Vec<String> = ops.iter().map(|op| op.key().to_owned()).collect();
        let request = pb::BatchRequest {
            ops: ops.into_iter().map(BatchOp::into_wire).collect(),
        };
        let response = self
            .call(write, |channel| {
                let (mut grpc, request) = (self.grpc(channel), request.clone());
                async move { grpc.batch(request).await }
            })
            .await?;
        if response.results.len() != keys.len() {
            return Err(Error::Protocol(format!(
                "batch of {} ops answered with {} results",
                keys.len(),
                response.results.len()
            )));
        }
        let results = keys
            .into_iter()
            .zip(response.results)
            .enumerate()
            .map(|(i, (key, result))| {
                BatchResult::from_wire(key, result)
                    .ok_or_else(|| Error::Protocol(format!("batch result {i} is empty")))
            })
            .collect::<Result<_, _>>()?;
        Ok(BatchResponse {
            results,
            revision: response.revision,
        })
    }

    /// Subscribes to every change to a key under `prefix` ("" for all keys; bytes, no
    /// wildcards). Returns once the server has registered the subscription, so every write
    /// made after this returns is delivered. Opening it is a read: retried; an OUT_OF_RANGE
    /// start revision fails with [`Error::Compacted`].
    ///
    /// With [`SubscribeOptions::resume`] (the default), a subscription from now on first
    /// reads the store's revision, so that even a stream lost before its first event
    /// resumes without a gap; see [`Subscription`] and [`Event::Resuming`].
    pub async fn subscribe(
        &self,
        prefix: impl Into<String>,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        subscribe::subscribe(self, prefix.into(), options).await
    }

    /// The store's current revision: every change up to it has been applied. A read:
    /// retried.
    pub async fn revision(&self) -> Result<i64, Error> {
        let request = pb::ListRequest {
            prefix: String::new(),
            limit: 1,
            start_after: String::new(),
        };
        let page = self
            .call(false, |channel| {
                let (mut grpc, request) = (self.grpc(channel), request.clone());
                async move { grpc.list(request).await }
            })
            .await?;
        Ok(page.revision)
    }

    /// The server's gRPC health as a whole: SERVING, or NOT_SERVING once it drains. A read:
    /// retried (so an UNAVAILABLE server is asked again, at the next endpoint).
    pub async fn health(&self) -> Result<ServingStatus, Error> {
        // "" asks about the whole server rather than one service.
        let request = HealthCheckRequest {
            service: String::new(),
        };
        let response = self
            .call(false, |channel| {
                // Health needs no token (load balancers ask it), and sending none means a
                // stale token cannot fail a health check.
                let mut health = HealthClient::new(channel);
                let request = request.clone();
                async move { health.check(request).await }
            })
            .await?;
        Ok(response.status())
    }

    pub(crate) fn retry_policy(&self) -> &RetryPolicy {
        &self.shared.retry
    }

    /// Opens a subscription: one attempt, or the call's retries when `retry`.
    pub(crate) async fn open_subscription(
        &self,
        request: &pb::SubscribeRequest,
        retry: bool,
    ) -> Result<tonic::Streaming<pb::ChangeEvent>, Error> {
        let attempts = if retry {
            self.shared.retry.max_attempts()
        } else {
            1
        };
        self.call_with(false, attempts, |channel| {
            let (mut grpc, request) = (self.grpc(channel), request.clone());
            async move { grpc.subscribe(request).await }
        })
        .await
        .map_err(|err| match err {
            Error::Status(status) => Error::from_subscribe_status(status, request.start_revision),
            err => err,
        })
    }

    /// One call with the policy's retries; `write` says whether it may change the store.
    async fn call<T, F, Fut>(&self, write: bool, attempt: F) -> Result<T, Error>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_with(write, self.shared.retry.max_attempts(), attempt)
            .await
    }

    async fn call_with<T, F, Fut>(
        &self,
        write: bool,
        attempts: u32,
        mut attempt: F,
    ) -> Result<T, Error>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut backoff = self.shared.retry.backoff();
        let mut tried = 1;
        loop {
            let (err, failure) = match self.channel().await {
                Ok((at, channel)) => match attempt(channel).await {
                    Ok(response) => return Ok(response.into_inner()),
                    Err(status) => {
                        let failure = Failure::of_status(&status);
                        if failure.drops_connection() {
                            self.lost(at);
                        }
                        (Error::from_status(status), failure)
                    }
                },
                Err(err) => (err, Failure::NotSent),
            };
            if tried >= attempts || !failure.retryable(write) {
                return Err(err);
            }
            tracing::debug!(error = %err, "kvstore client: retrying");
            backoff.wait().await;
            tried += 1;
        }
    }

    fn grpc(&self, channel: Channel) -> Grpc {
        KeyValueStoreClient::with_interceptor(channel, self.shared.token.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The connection in use, or a new one: each endpoint is tried once, from the one after
    /// the endpoint last lost, until one accepts.
    async fn channel(&self) -> Result<(usize, Channel), Error> {
        let start = {
            let current = self.current();
            if let Some((at, channel)) = &current.connected {
                return Ok((*at, channel.clone()));
            }
            current.next
        };
        let endpoints = &self.shared.endpoints;
        let mut failures = Vec::new();
        for i in 0..endpoints.len() {
            let at = (start + i) % endpoints.len();
            let (url, endpoint) = &endpoints[at];
            match endpoint.connect().await {
                Ok(channel) => {
                    self.current().connected = Some((at, channel.clone()));
                    return Ok((at, channel));
                }
                Err(err) => {
                    tracing::debug!(endpoint = %url, error = %err, "kvstore client: cannot connect");
                    failures.push((url.clone(), err));
                }
            }
        }
        Err(Error::Connect(failures))
    }

    /// The connection to endpoint `at` failed: the next call connects afresh, starting with
    /// the endpoint after it. A connection made meanwhile by another call is kept.
    fn lost(&self, at: usize) {
        let mut current = self.current();
        if matches!(current.connected, Some((connected, _)) if connected == at) {
            current.connected = None;
            current.next = (at + 1) % self.shared.endpoints.len();
        }
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Current> {
        // The lock guards a plain swap that cannot panic half-way: a poisoned one is intact.
        self.shared
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The pages of a [`Client::list`], a stream of `Result<Page, Error>`. Cancel-safe.
pub struct Pages {
    inner: Pin<Box<dyn Stream<Item = Result<Page, Error>> + Send>>,
}

impl std::fmt::Debug for Pages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pages")
    }
}

impl Stream for Pages {
    type Item = Result<Page, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

struct Listing {
    client: Client,
    prefix: String,
    /// Keys still wanted.
    left: u64,
    page_size: u32,
    start_after: String,
    done: bool,
    /// An error found in the last page, told after its items.
    failed: Option<Error>,
}

impl Listing {
    async fn next(&mut self) -> Option<Result<Page, Error>> {
        if let Some(err) = self.failed.take() {
            return Some(Err(err));
        }
        if self.done || self.left == 0 {
            return None;
        }
        let limit =
            u32::try_from(self.left).map_or(self.page_size, |left| left.min(self.page_size));
        let request = pb::ListRequest {
            prefix: self.prefix.clone(),
            limit,
            start_after: self.start_after.clone(),
        };
        let response = self
            .client
            .call(false, |channel| {
                let (mut grpc, request) = (self.client.grpc(channel), request.clone());
                async move { grpc.list(request).await }
            })
            .await;
        let mut response = match response {
            Ok(response) => response,
            Err(err) => {
                self.done = true;
                return Some(Err(err));
            }
        };
        // Never more than asked for, even from a server that ignores the limit.
        response.items.truncate(limit as usize);
        self.left -= response.items.len() as u64;
        if !response.more {
            self.done = true;
        } else if response.next_start_after <= self.start_after {
            // A next page that does not move forward would repeat this one forever.
            self.done = true;
            self.failed = Some(Error::Protocol(format!(
                "the server's next page starts at {:?}, not after {:?}",
                response.next_start_after, self.start_after
            )));
        } else {
            self.start_after = response.next_start_after;
        }
        Some(Ok(Page {
            items: response.items.into_iter().map(KeyValue::from).collect(),
            revision: response.revision,
        }))
    }
}
