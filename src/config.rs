//! Settings and how they are layered, later winning: built-in defaults < the TOML file named
//! by `--config`/`KVSTORE_CONFIG` < `KVSTORE_*` environment variables < the legacy
//! `GRPC_PORT`/`HTTP_PORT` < command-line flags. `config/kvstore.toml` documents every key.
//!
//! Configuration is data: this parses, layers and range-checks, and builds nothing. What the
//! server runs with (TLS, tokens, allowed hosts, the log filter) is built from it once, by
//! `startup`, which reports its errors the same way ([`Sources::invalid`]).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

mod checks;
mod load;
mod values;

pub use load::{ConfigError, Flags, Loaded, Sources, from_toml, load};
pub use values::Cidr;

/// The prefix of the server's environment variables; `__` separates nested keys.
pub const ENV_PREFIX: &str = "KVSTORE_";

/// hyper refuses a smaller HTTP/1.1 read buffer, which is what bounds HTTP/1.1 headers.
pub const MIN_HEADER_BYTES: usize = 8192;

/// The least `server.max_control_frames`: room for a client's opening SETTINGS, its
/// WINDOW_UPDATEs and a burst of cancelled calls' RST_STREAMs before any answer earns more.
const MIN_CONTROL_FRAMES: u32 = 100;

/// Variables with [`ENV_PREFIX`] that are not settings but are expected: the config file
/// path, and the client's endpoint, token and TLS files (the two binaries often share an
/// environment).
const ENV_NOT_SETTINGS: [&str; 6] = [
    "KVSTORE_CONFIG",
    "KVSTORE_ENDPOINT",
    "KVSTORE_TOKEN",
    "KVSTORE_CA_CERT",
    "KVSTORE_CLIENT_CERT",
    "KVSTORE_CLIENT_KEY",
];

/// Everything the server can be configured with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Listeners and request handling.
    pub server: ServerSettings,
    /// Size limits of keys and values.
    pub limits: Limits,
    /// Bearer-token authentication.
    pub auth: AuthSettings,
    /// The per-client request rate limit.
    pub rate_limit: RateLimitSettings,
    /// Subscriber buffers and caps.
    pub subscriptions: Subscriptions,
    /// The retained change history that subscriptions resume from.
    pub history: HistorySettings,
    /// Graceful shutdown timing.
    pub shutdown: ShutdownSettings,
    /// Logging.
    pub log: LogSettings,
    /// TLS on the main listener.
    pub tls: TlsSettings,
}

/// `[server]`: listeners and request handling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// The main listener: gRPC and HTTP on one port.
    pub listen: SocketAddr,
    /// The legacy second listener, HTTP routes only; `None` (an empty string) turns it off.
    #[serde(with = "values::optional_addr")]
    pub health_listen: Option<SocketAddr>,
    /// The longest a unary gRPC call may take; streams are not cut by it.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Unary gRPC calls handled at once; more are refused with `RESOURCE_EXHAUSTED`. A call
    /// counts from when its request message has arrived.
    pub max_in_flight: usize,
    /// The longest a gRPC request message may take to arrive, from the call's headers (for
    /// a streaming request, from each message's first byte); a call whose message is late is
    /// answered `DEADLINE_EXCEEDED`.
    #[serde(with = "humantime_serde")]
    pub request_body_timeout: Duration,
    /// Bytes of gRPC request messages still arriving, on every connection together; a call
    /// whose message would take more is refused with `RESOURCE_EXHAUSTED`.
    pub max_request_bytes_in_flight: usize,
    /// Bytes of answers built and not yet taken by their clients, on every connection
    /// together; see `answers`.
    pub max_answer_bytes_in_flight: usize,
    /// Each connection's share of `max_answer_bytes_in_flight`: past it, the connection's new
    /// calls are refused with `RESOURCE_EXHAUSTED` until it takes its answers.
    pub max_answer_bytes_per_connection: usize,
    /// How long an HTTP/2 stream's answer may wait for its client without progress before
    /// the stream is reset.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Connections open at once on each listener; more are accepted, told why and closed at
    /// once.
    pub max_connections: usize,
    /// Connections open at once on each listener from one address (IPv6: one /64), told why
    /// and closed like those past `max_connections`; 0 means a tenth of `max_connections`.
    /// See [`ServerSettings::connections_per_address`].
    pub max_connections_per_address: usize,
    /// Peers exempt from `max_connections_per_address` and `new_connections_per_address`:
    /// proxies whose connections carry many clients.
    pub trusted_proxies: Vec<Cidr>,
    /// New connections per second each listener accepts from one address (IPv6: one /64), on
    /// average; past it a connection is closed as soon as it is accepted, before any TLS
    /// handshake. 0 turns the limit off.
    pub new_connections_per_address: u32,
    /// New connections one address may open at once after a pause: the bucket's size for
    /// `new_connections_per_address`; 0 means one second's worth.
    pub new_connections_burst: u32,
    /// HTTP/2 streams open at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams_per_connection: u32,
    /// HTTP/2 frames that do no work (WINDOW_UPDATE, SETTINGS parameters, PING, empty DATA,
    /// ...) one connection may send beyond what its work earns; past it the connection gets
    /// a GOAWAY (ENHANCE_YOUR_CALM) and is closed.
    pub max_control_frames: u32,
    /// The most bytes of a request's header list, counted as HTTP/2 counts it over both
    /// protocols (see `header_limit::header_list_size`); hyper and h2 refuse at twice this.
    pub max_header_bytes: usize,
    /// From accept until the first request's headers, including the TLS handshake;
    /// a connection that takes longer is closed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A connection with no open request or stream for this long is closed; zero never.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How often an HTTP/2 connection that has been quiet is PINGed; zero never.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Host names the HTTP routes that read data (`/metrics`) answer to, besides IP
    /// addresses and loopback names: `kvstore-1`, `.example.org` for a domain and the names
    /// under it, or `*` for any. Any other `Host` gets 403 (against DNS rebinding). A list,
    /// or one comma-separated string (handy in an environment variable).
    #[serde(deserialize_with = "values::names")]
    pub allowed_hosts: Vec<String>,
    /// gRPC health `Watch` streams open at once, from all clients together; more are
    /// refused with `RESOURCE_EXHAUSTED`. They need no token, so they get a cap of their own.
    pub max_health_watches: usize,
}

/// `[limits]`: size limits of keys and values, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The longest key accepted.
    pub max_key_bytes: usize,
    /// The longest value accepted.
    pub max_value_bytes: usize,
    /// The most items one List page returns, whatever the request asks.
    pub max_page: usize,
    /// The most ops one Batch call carries.
    pub max_batch_ops: usize,
    /// The largest Batch message, in bytes (a single set may always be as large as the key
    /// and value limits allow).
    pub max_batch_bytes: usize,
    /// The largest answer to one unary call, in bytes: a List page ends before it, a Batch
    /// that would pass it is refused and applies nothing.
    pub max_response_bytes: usize,
    /// The largest request body of a plain HTTP route, in bytes (gRPC messages have their
    /// own limits above).
    pub max_http_body_bytes: usize,
}

/// `[auth]`: bearer tokens, known by their SHA-256 digests, each with a role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Whether calls need a token. Health checks never do.
    pub enabled: bool,
    /// Tokens given inline.
    pub tokens: Vec<TokenSpec>,
    /// A file of more tokens, one `ROLE SHA256 [NAME]` a line; empty for none.
    pub token_file: PathBuf,
    /// Whether gRPC reflection needs a token (any role).
    pub protect_reflection: bool,
    /// Whether `GET /metrics` needs a token (any role).
    pub protect_metrics: bool,
}

/// One token of `auth.tokens`. The token itself is never configured, only its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSpec {
    /// The SHA-256 of the token's text, as 64 hex digits.
    pub sha256: String,
    /// What the token may do.
    pub role: Role,
    /// A name for logs and refusals; empty names it by the start of its digest.
    #[serde(default)]
    pub name: String,
}

/// What a token may do. `ReadWrite` may do everything `Read` may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Get, List, Subscribe, and Batch calls of only gets.
    Read,
    /// Every call, including Set, Delete and Batch calls that write.
    ReadWrite,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::ReadWrite => "readwrite",
        })
    }
}

/// `[rate_limit]`: a token bucket per client, keyed by its token (or by its address when it
/// presents none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Requests per second each client may make on average; 0 turns the limit off.
    pub per_client: u32,
    /// Requests a client may make at once after a pause (the bucket's size); 0 means
    /// `per_client`.
    pub burst: u32,
}

/// `[subscriptions]`: buffers and caps of change streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSettings {
    /// Events queued per subscriber before it counts as lagging and its stream ends.
    pub buffer: usize,
    /// Subscriptions open at once; more are refused with `RESOURCE_EXHAUSTED`.
    pub max: usize,
}

/// `[subscriptions]`: the store's part ([`SubscriptionSettings`], which it is built with)
/// and each client's share, which the gRPC service enforces. Derefs to the store's part, so
/// `settings.subscriptions.max` reads as the file does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscriptions {
    /// Buffers and the global cap.
    #[serde(flatten)]
    pub store: SubscriptionSettings,
    /// Subscriptions open at once from one client (its token, else its address, as the
    /// rate limit keys clients); 0 means a tenth of `max`. See [`Subscriptions::per_client`].
    pub max_per_client: usize,
}

impl Subscriptions {
    /// The per-client share in effect: `max_per_client`, or a tenth of `max` (at least 1)
    /// when that is 0, so that it follows `max` when that is resized.
    pub fn per_client(&self) -> usize {
        match self.max_per_client {
            0 => (self.store.max / 10).max(1),
            set => set,
        }
    }
}

impl std::ops::Deref for Subscriptions {
    type Target = SubscriptionSettings;

    fn deref(&self) -> &SubscriptionSettings {
        &self.store
    }
}

impl std::ops::DerefMut for Subscriptions {
    fn deref_mut(&mut self) -> &mut SubscriptionSettings {
        &mut self.store
    }
}

/// `[history]`: how many recent changes are kept for resuming subscriptions; the oldest go
/// first once either bound is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistorySettings {
    /// Changes kept; 0 keeps none, so subscriptions can only start from now.
    pub max_events: usize,
    /// Approximate bytes of keys and values kept.
    pub max_bytes: usize,
}

/// `[shutdown]`: graceful shutdown timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    /// After the signal, how long to keep serving while reporting not ready.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// How long open connections may take to finish before they are closed.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

/// `[log]`: logging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// A level (`info`) or a full filter (`kvstore=debug,tower_http=info`); `RUST_LOG` wins.
    pub level: String,
    /// `json` lines or human-readable `text`.
    pub format: LogFormat,
}

/// `[tls]`: TLS on the main listener (the legacy health listener stays cleartext). Paths
/// to PEM files; empty turns each off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// The server's certificate chain, leaf first; with `key`, turns TLS on.
    pub cert: PathBuf,
    /// The private key of the leaf certificate.
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to; set, every client must
    /// present one (mutual TLS).
    pub client_ca: PathBuf,
}

/// How log lines are written to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: ServerSettings {
                listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
                health_listen: Some(SocketAddr::from(([0, 0, 0, 0], 8080))),
                request_timeout: Duration::from_secs(10),
                max_in_flight: 1024,
                request_body_timeout: Duration::from_secs(5),
                max_request_bytes_in_flight: 64 * 1024 * 1024,
                max_answer_bytes_in_flight: 256 * 1024 * 1024,
                max_answer_bytes_per_connection: 16 * 1024 * 1024,
                send_timeout: Duration::from_secs(30),
                max_connections: 10_000,
                max_connections_per_address: 0,
                trusted_proxies: Vec::new(),
                new_connections_per_address: 50,
                new_connections_burst: 500,
                max_streams_per_connection: 200,
                max_control_frames: 1000,
                max_header_bytes: 16 * 1024,
                handshake_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(5 * 60),
                keepalive_interval: Duration::from_secs(30),
                keepalive_timeout: Duration::from_secs(20),
                allowed_hosts: Vec::new(),
                max_health_watches: 100,
            },
            limits: Limits {
                max_key_bytes: 4096,
                max_value_bytes: 1024 * 1024,
                max_page: 10_000,
                max_batch_ops: 10_000,
                max_batch_bytes: 4 * 1024 * 1024,
                max_response_bytes: 4 * 1024 * 1024,
                max_http_body_bytes: 2 * 1024 * 1024,
            },
            auth: AuthSettings {
                enabled: false,
                tokens: Vec::new(),
                token_file: PathBuf::new(),
                protect_reflection: true,
                protect_metrics: true,
            },
            rate_limit: RateLimitSettings {
                per_client: 0,
                burst: 0,
            },
            subscriptions: Subscriptions {
                store: SubscriptionSettings {
                    buffer: 1024,
                    max: 10_000,
                },
                max_per_client: 0,
            },
            history: HistorySettings {
                max_events: 100_000,
                max_bytes: 64 * 1024 * 1024,
            },
            shutdown: ShutdownSettings {
                drain_delay: Duration::ZERO,
                drain_timeout: Duration::from_secs(10),
            },
            log: LogSettings {
                level: "info".into(),
                format: LogFormat::Json,
            },
            tls: TlsSettings::default(),
        }
    }
}

impl ServerSettings {
    /// The per-address connection cap in effect: `max_connections_per_address`, or a tenth of
    /// `max_connections` (at least 1) when that is 0, so that it follows a table resized
    /// without being set again.
    pub fn connections_per_address(&self) -> usize {
        match self.max_connections_per_address {
            0 => (self.max_connections / 10).max(1),
            set => set,
        }
    }
}

impl Settings {
    /// The effective settings as TOML, as `--print-config` prints them.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("settings are plain tables of strings and numbers")
    }
}
