//! Settings and how they are layered, later winning: built-in defaults < the TOML file named
//! by `--config`/`KVSTORE_CONFIG` < `KVSTORE_*` environment variables < the legacy
//! `GRPC_PORT`/`HTTP_PORT` < command-line flags. `config/kvstore.toml` documents every key.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
    #[serde(with = "optional_addr")]
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
    /// together; see [`crate::answers`].
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
    /// Peers exempt from `max_connections_per_address`: proxies whose connections carry many
    /// clients.
    pub trusted_proxies: Vec<Cidr>,
    /// HTTP/2 streams open at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams_per_connection: u32,
    /// HTTP/2 frames that do no work (WINDOW_UPDATE, SETTINGS parameters, PING, empty DATA,
    /// ...) one connection may send beyond what its work earns; past it the connection gets
    /// a GOAWAY (ENHANCE_YOUR_CALM) and is closed.
    pub max_control_frames: u32,
    /// The most bytes of a request's header list, counted as HTTP/2 counts it over both
    /// protocols (see `middleware::header_list_size`); hyper and h2 refuse at twice this.
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
    #[serde(deserialize_with = "names")]
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

/// An IPv4 or IPv6 address range in CIDR notation (`10.0.0.0/8`, `fd00::/8`); a bare address
/// is a range of one. Bits past the prefix are ignored, as nginx's `set_real_ip_from` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the range. An IPv4 peer seen on an IPv6 listener (`::ffff:a.b.c.d`)
    /// is matched as the IPv4 address it is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR range"))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {bits}"))?,
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Settings {
    /// The effective settings as TOML, as `--print-config` prints them.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("settings are plain tables of strings and numbers")
    }
}

/// Command-line flags, each overriding one setting. Values are parsed like every other
/// layer, so a bad flag gets the same one-line error naming the flag.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `--config PATH`.
    pub config: Option<PathBuf>,
    /// `--listen ADDR`.
    pub listen: Option<String>,
    /// `--health-listen ADDR`; empty turns the legacy listener off.
    pub health_listen: Option<String>,
    /// `--log-level LEVEL`.
    pub log_level: Option<String>,
    /// `--log-format json|text`.
    pub log_format: Option<String>,
}

/// Settings that were loaded, and the environment variables that were not used.
#[derive(Debug)]
pub struct Loaded {
    /// The effective settings.
    pub settings: Settings,
    /// `KVSTORE_*` variables that name no setting, for a warning once logging is up.
    pub ignored_env: Vec<String>,
}

/// Configuration that cannot be used, as one line naming the key and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(String);

impl From<figment::Error> for ConfigError {
    fn from(err: figment::Error) -> Self {
        let all: Vec<String> = err.into_iter().map(|e| describe(&e)).collect();
        Self(all.join("; "))
    }
}

/// `server.listen: invalid socket address syntax (from KVSTORE_SERVER__LISTEN)`.
fn describe(err: &figment::Error) -> String {
    let kind = one_line(&err.kind.to_string());
    // figment prefixes file keys with the profile; kvstore has no profiles.
    let path: Vec<&str> = match err.path.split_first() {
        Some((first, rest)) if first == "default" => rest.iter().map(String::as_str).collect(),
        _ => err.path.iter().map(String::as_str).collect(),
    };
    let from = err
        .metadata
        .as_ref()
        .map(|md| format!(" ({})", origin(md, &path)))
        .unwrap_or_default();
    if path.is_empty() {
        format!("{kind}{from}")
    } else {
        format!("{}: {kind}{from}", path.join("."))
    }
}

/// Where a value came from, as an operator would look for it.
fn origin(md: &Metadata, path: &[&str]) -> String {
    if let Some(source) = &md.source {
        return format!("in {source}");
    }
    if md.name.contains(ENV_PREFIX) {
        // A list's entries (`trusted_proxies.0`) come from the one variable of the list.
        let variable: Vec<&str> = path
            .iter()
            .copied()
            .take_while(|segment| segment.parse::<usize>().is_err())
            .collect();
        return format!(
            "from environment variable {ENV_PREFIX}{}",
            variable.join("__").to_ascii_uppercase()
        );
    }
    format!(
        "from {} {}",
        md.name,
        md.interpolate(&Profile::Default, path)
    )
}

/// Loads the settings from every layer, reading the process environment.
pub fn load(flags: &Flags) -> Result<Loaded, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Settings::default()));

    let path = flags
        .config
        .clone()
        .or_else(|| std::env::var_os("KVSTORE_CONFIG").map(PathBuf::from));
    if let Some(path) = path {
        // figment treats a missing file as empty; a file the operator named must exist.
        std::fs::read_to_string(&path).map_err(|err| {
            ConfigError(format!("cannot read config file {}: {err}", path.display()))
        })?;
        figment = figment.merge(Toml::file_exact(path));
    }

    let keys = setting_keys();
    let env_keys = keys.clone();
    figment = figment.merge(
        Env::prefixed(ENV_PREFIX)
            .split("__")
            .filter(move |key| env_keys.contains(&env_key(key.as_str()))),
    );
    figment = merge_legacy_ports(figment)?;
    figment = figment.merge(flag_layer(flags));

    Ok(Loaded {
        settings: extract(&figment)?,
        ignored_env: ignored_env(&keys),
    })
}

/// The settings a config file with this text gives over the defaults, extracted and checked
/// as [`load`] does, with no environment or flags: what `--config` would give in an empty
/// environment. The files it names (TLS, token file) are read, relative to the working
/// directory.
pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
    extract(&Figment::from(Serialized::defaults(Settings::default())).merge(Toml::string(text)))
}

fn extract(figment: &Figment) -> Result<Settings, ConfigError> {
    let settings: Settings = figment.extract()?;
    validate(&settings, figment)?;
    Ok(settings)
}

/// `GRPC_PORT` and `HTTP_PORT`, from the original service: each replaces only the port of
/// its listener and keeps the host. `HTTP_PORT` turns a disabled health listener back on,
/// on the main listener's host, since the variable asks for the two-port layout.
fn merge_legacy_ports(figment: Figment) -> Result<Figment, ConfigError> {
    let mut layer = Vec::new();
    for (var, key) in [
        ("GRPC_PORT", "server.listen"),
        ("HTTP_PORT", "server.health_listen"),
    ] {
        let Some(port) = legacy_port(var)? else {
            continue;
        };
        let listen: SocketAddr = figment.extract_inner("server.listen")?;
        let current: Option<SocketAddr> = match key {
            "server.listen" => Some(listen),
            _ => {
                figment
                    .extract_inner::<OptionalAddr>("server.health_listen")?
                    .0
            }
        };
        let mut addr = current.unwrap_or(listen);
        addr.set_port(port);
        layer.push((key, addr.to_string()));
    }
    Ok(figment.merge(Named::new(
        "legacy environment variable",
        layer,
        |key| match key {
            "server.listen" => "GRPC_PORT",
            _ => "HTTP_PORT",
        },
    )))
}

fn legacy_port(var: &str) -> Result<Option<u16>, ConfigError> {
    match std::env::var(var) {
        Ok(value) if value.is_empty() => Ok(None),
        Ok(value) => value.trim().parse().map(Some).map_err(|_| {
            ConfigError(format!(
                "{var} must be a port number from 0 to 65535, got {value:?} (from legacy environment variable {var})"
            ))
        }),
        Err(_) => Ok(None),
    }
}

fn flag_layer(flags: &Flags) -> Named {
    let mut layer = Vec::new();
    for (key, value) in [
        ("server.listen", &flags.listen),
        ("server.health_listen", &flags.health_listen),
        ("log.level", &flags.log_level),
        ("log.format", &flags.log_format),
    ] {
        if let Some(value) = value {
            layer.push((key, value.clone()));
        }
    }
    Named::new("command-line flag", layer, |key| match key {
        "server.listen" => "--listen",
        "server.health_listen" => "--health-listen",
        "log.level" => "--log-level",
        _ => "--log-format",
    })
}

fn validate(settings: &Settings, figment: &Figment) -> Result<(), ConfigError> {
    let at_least_one = [
        ("server.max_in_flight", settings.server.max_in_flight),
        ("server.max_connections", settings.server.max_connections),
        (
            "server.max_streams_per_connection",
            settings.server.max_streams_per_connection as usize,
        ),
        ("limits.max_key_bytes", settings.limits.max_key_bytes),
        ("limits.max_page", settings.limits.max_page),
        ("limits.max_batch_ops", settings.limits.max_batch_ops),
        ("subscriptions.buffer", settings.subscriptions.buffer),
        ("subscriptions.max", settings.subscriptions.max),
        (
            "server.max_health_watches",
            settings.server.max_health_watches,
        ),
    ];
    for (key, value) in at_least_one {
        if value == 0 {
            return Err(invalid(figment, key, "must be at least 1, got 0"));
        }
    }
    if settings.server.max_connections_per_address > settings.server.max_connections {
        return Err(invalid(
            figment,
            "server.max_connections_per_address",
            &format!(
                "must be at most server.max_connections ({}), got {}; 0 means a tenth of it",
                settings.server.max_connections, settings.server.max_connections_per_address
            ),
        ));
    }
    if settings.subscriptions.max_per_client > settings.subscriptions.max {
        return Err(invalid(
            figment,
            "subscriptions.max_per_client",
            &format!(
                "must be at most subscriptions.max ({}), got {}; 0 means a tenth of it",
                settings.subscriptions.max, settings.subscriptions.max_per_client
            ),
        ));
    }
    if settings.limits.max_key_bytes > crate::record::MAX_KEY_BYTES {
        return Err(invalid(
            figment,
            "limits.max_key_bytes",
            &format!(
                "must be at most {} (64 KiB), got {}",
                crate::record::MAX_KEY_BYTES,
                settings.limits.max_key_bytes
            ),
        ));
    }
    let one_item = settings.limits.max_key_bytes
        + settings.limits.max_value_bytes
        + crate::record::ANSWER_OVERHEAD;
    if settings.limits.max_response_bytes < one_item {
        return Err(invalid(
            figment,
            "limits.max_response_bytes",
            &format!(
                "must hold one key and value at their limits (limits.max_key_bytes + \
                 limits.max_value_bytes + {} bytes of framing = {one_item}), got {}",
                crate::record::ANSWER_OVERHEAD,
                settings.limits.max_response_bytes
            ),
        ));
    }
    if settings.server.max_control_frames < MIN_CONTROL_FRAMES {
        return Err(invalid(
            figment,
            "server.max_control_frames",
            &format!(
                "must be at least {MIN_CONTROL_FRAMES}, so that a client's opening frames fit, got {}",
                settings.server.max_control_frames
            ),
        ));
    }
    if settings.server.max_header_bytes < MIN_HEADER_BYTES {
        return Err(invalid(
            figment,
            "server.max_header_bytes",
            &format!(
                "must be at least {MIN_HEADER_BYTES} (HTTP/1.1's smallest read buffer), got {}",
                settings.server.max_header_bytes
            ),
        ));
    }
    if u32::try_from(settings.server.max_header_bytes).is_err() {
        return Err(invalid(
            figment,
            "server.max_header_bytes",
            &format!(
                "must be at most {} (HTTP/2's limit), got {}",
                u32::MAX,
                settings.server.max_header_bytes
            ),
        ));
    }
    let largest =
        crate::grpc::max_message_bytes(&settings.limits) + crate::request_body::PREFIX_BYTES;
    if settings.server.max_request_bytes_in_flight < largest {
        return Err(invalid(
            figment,
            "server.max_request_bytes_in_flight",
            &format!(
                "must be at least {largest}, the largest KeyValueStore request (from limits.max_key_bytes, \
                 limits.max_value_bytes and limits.max_batch_bytes), got {}",
                settings.server.max_request_bytes_in_flight
            ),
        ));
    }
    let largest =
        crate::grpc::max_answer_bytes(&settings.limits) + crate::request_body::PREFIX_BYTES;
    if settings.server.max_answer_bytes_per_connection < largest {
        return Err(invalid(
            figment,
            "server.max_answer_bytes_per_connection",
            &format!(
                "must be at least {largest}, the largest answer (limits.max_response_bytes and its \
                 framing), got {}",
                settings.server.max_answer_bytes_per_connection
            ),
        ));
    }
    if settings.server.max_answer_bytes_in_flight < settings.server.max_answer_bytes_per_connection
    {
        return Err(invalid(
            figment,
            "server.max_answer_bytes_in_flight",
            &format!(
                "must be at least server.max_answer_bytes_per_connection ({}), got {}",
                settings.server.max_answer_bytes_per_connection,
                settings.server.max_answer_bytes_in_flight
            ),
        ));
    }
    let positive = [
        ("server.send_timeout", settings.server.send_timeout),
        (
            "server.request_body_timeout",
            settings.server.request_body_timeout,
        ),
        (
            "server.handshake_timeout",
            settings.server.handshake_timeout,
        ),
        (
            "server.keepalive_timeout",
            settings.server.keepalive_timeout,
        ),
    ];
    for (key, value) in positive {
        if value.is_zero() {
            return Err(invalid(figment, key, "must be longer than 0s"));
        }
    }
    if let Err(err) = crate::tls::acceptor(&settings.tls) {
        return Err(invalid(figment, err.key, &err.problem));
    }
    if settings.server.health_listen == Some(settings.server.listen)
        && settings.server.listen.port() != 0
    {
        return Err(invalid(
            figment,
            "server.health_listen",
            &format!(
                "must differ from server.listen ({}); set it to \"\" to serve everything on one port",
                settings.server.listen
            ),
        ));
    }
    if let Err(problem) = crate::browser::AllowedHosts::new(&settings.server.allowed_hosts) {
        return Err(invalid(figment, "server.allowed_hosts", &problem));
    }
    if let Err(err) = crate::telemetry::filter_directives(&settings.log.level) {
        return Err(invalid(figment, "log.level", &err));
    }
    // Read here too, not only when serving, so a bad token file is a configuration error.
    let keyring = crate::auth::Keyring::load(&settings.auth)
        .map_err(|err| invalid(figment, err.key, &err.problem))?;
    if settings.auth.enabled && keyring.is_empty() {
        return Err(invalid(
            figment,
            "auth.enabled",
            "is true but no token is configured; add auth.tokens or auth.token_file",
        ));
    }
    Ok(())
}

fn invalid(figment: &Figment, key: &str, problem: &str) -> ConfigError {
    let path: Vec<&str> = key.split('.').collect();
    let from = figment
        .find_metadata(key)
        .map(|md| format!(" ({})", origin(md, &path)))
        .unwrap_or_default();
    ConfigError(format!("{key} {problem}{from}"))
}

/// Every setting's dotted key (`server.listen`, ...), from the defaults so it cannot drift.
fn setting_keys() -> BTreeSet<String> {
    fn walk(prefix: &str, table: &toml::Table, keys: &mut BTreeSet<String>) {
        for (name, value) in table {
            let key = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            match value {
                toml::Value::Table(inner) => walk(&key, inner, keys),
                _ => {
                    keys.insert(key);
                }
            }
        }
    }
    let defaults = toml::Table::try_from(Settings::default())
        .expect("settings are plain tables of strings and numbers");
    let mut keys = BTreeSet::new();
    walk("", &defaults, &mut keys);
    keys
}

fn ignored_env(keys: &BTreeSet<String>) -> Vec<String> {
    let mut ignored: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| name.starts_with(ENV_PREFIX) && !ENV_NOT_SETTINGS.contains(&name.as_str()))
        .filter(|name| !keys.contains(&env_key(name)))
        .collect();
    ignored.sort();
    ignored
}

/// The setting an environment variable names: `KVSTORE_SERVER__LISTEN` -> `server.listen`.
/// Accepts the name with or without the prefix, as figment's filters see either.
fn env_key(name: &str) -> String {
    let name = name.to_ascii_lowercase();
    let prefix = ENV_PREFIX.to_ascii_lowercase();
    name.strip_prefix(&prefix)
        .unwrap_or(&name)
        .replace("__", ".")
}

/// Some library errors (TOML's) span several lines with a source excerpt; keep the first
/// line, which says where, and the last, which says what.
fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    match lines.as_slice() {
        [] => String::new(),
        [only] => (*only).to_owned(),
        [first, .., last] => format!("{first}: {last}"),
    }
}

/// A provider of `dotted.key -> value` pairs with its own name in error messages, and each
/// key shown as the flag or variable it came from.
struct Named {
    name: &'static str,
    layer: Dict,
    origin: fn(&str) -> &'static str,
}

impl Named {
    fn new(
        name: &'static str,
        pairs: Vec<(&str, String)>,
        origin: fn(&str) -> &'static str,
    ) -> Self {
        let mut layer = Dict::new();
        for (key, value) in pairs {
            nest(&mut layer, key, value.into());
        }
        Self {
            name,
            layer,
            origin,
        }
    }
}

fn nest(dict: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_owned(), value);
        }
        Some((table, rest)) => {
            let entry = dict
                .entry(table.to_owned())
                .or_insert_with(|| Dict::new().into());
            if let Value::Dict(_, inner) = entry {
                nest(inner, rest, value);
            }
        }
    }
}

impl Provider for Named {
    fn metadata(&self) -> Metadata {
        let origin = self.origin;
        Metadata::named(self.name)
            .interpolater(move |_: &Profile, keys: &[&str]| origin(&keys.join(".")).to_owned())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.layer.clone()))
    }
}

/// An address or an empty string, which means "off".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OptionalAddr(Option<SocketAddr>);

impl FromStr for OptionalAddr {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" => Ok(Self(None)),
            addr => addr.parse().map(|a| Self(Some(a))),
        }
    }
}

impl fmt::Display for OptionalAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => Ok(()),
        }
    }
}

impl<'de> Deserialize<'de> for OptionalAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(|_| {
            serde::de::Error::invalid_value(
                serde::de::Unexpected::Str(&s),
                &"an address such as \"0.0.0.0:8080\", or \"\" to turn it off",
            )
        })
    }
}

/// A list of names: a sequence, or one string of comma-separated names (an environment
/// variable's value; `""` is the empty list).
fn names<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(
        untagged,
        expecting = "a list of names, or one string of comma-separated names"
    )]
    enum Names {
        List(Vec<String>),
        Commas(String),
    }
    Ok(match Names::deserialize(deserializer)? {
        Names::List(names) => names,
        Names::Commas(names) => names
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

mod optional_addr {
    use super::*;

    pub fn serialize<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&OptionalAddr(*addr))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        OptionalAddr::deserialize(d).map(|a| a.0)
    }
}

// figment::Jail's closures return figment::Error, which is large; that is its API.
#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in(jail: &Jail, flags: Flags) -> Result<Loaded, ConfigError> {
        let _ = jail;
        load(&flags)
    }

    fn error_in(jail: &Jail, flags: Flags) -> String {
        load_in(jail, flags).unwrap_err().to_string()
    }

    #[test]
    fn the_documented_config_file_states_exactly_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/kvstore.toml");
        let documented: Settings = Figment::from(Toml::file_exact(path)).extract().unwrap();
        assert_eq!(documented, Settings::default());
        // And it passes the checks, as any file kvstore-server accepts.
        let text = std::fs::read_to_string(path).unwrap();
        assert_eq!(from_toml(&text).unwrap(), Settings::default());
    }

    #[test]
    fn config_text_is_checked_like_a_config_file() {
        let printed = Settings::default().to_toml();
        assert_eq!(from_toml(&printed).unwrap(), Settings::default());
        let message = from_toml("[subscriptions]\nbuffer = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("configuration error: subscriptions.buffer must be at least 1"),
            "{message}"
        );
        let message = from_toml("[server\n").unwrap_err().to_string();
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn printed_config_parses_back_to_the_same_settings() {
        let mut settings = Settings::default();
        settings.server.health_listen = None;
        settings.shutdown.drain_delay = Duration::from_millis(250);
        settings.auth.tokens.push(TokenSpec {
            sha256: "ab".repeat(32),
            role: Role::ReadWrite,
            name: "ci".into(),
        });
        settings.auth.token_file = "tokens.txt".into();
        let parsed: Settings = Figment::from(Toml::string(&settings.to_toml()))
            .extract()
            .unwrap();
        assert_eq!(parsed, settings);
    }

    #[test]
    fn each_layer_overrides_the_one_before() {
        Jail::expect_with(|jail| {
            // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
            jail.clear_env();
            jail.create_file(
                "kv.toml",
                "[server]\nlisten = \"127.0.0.1:1000\"\nhealth_listen = \"127.0.0.1:2000\"\n\
                 [log]\nlevel = \"debug\"\nformat = \"text\"\n[subscriptions]\nbuffer = 7\n",
            )?;
            let file = Flags {
                config: Some("kv.toml".into()),
                ..Flags::default()
            };
            let s = load_in(jail, file.clone()).unwrap().settings;
            assert_eq!(s.server.listen, "127.0.0.1:1000".parse().unwrap());
            assert_eq!(s.subscriptions.buffer, 7);
            assert_eq!(s.log.format, LogFormat::Text);
            assert_eq!(s.limits, Settings::default().limits);

            jail.set_env("KVSTORE_SERVER__LISTEN", "127.0.0.1:1001");
            jail.set_env("KVSTORE_SUBSCRIPTIONS__BUFFER", "8");
            jail.set_env("KVSTORE_SUBSCRIPTIONS__MAX_PER_CLIENT", "5");
            jail.set_env("KVSTORE_SHUTDOWN__DRAIN_DELAY", "250ms");
            let s = load_in(jail, file.clone()).unwrap().settings;
            assert_eq!(s.server.listen, "127.0.0.1:1001".parse().unwrap());
            assert_eq!(s.subscriptions.buffer, 8);
            assert_eq!(s.subscriptions.per_client(), 5);
            assert_eq!(s.shutdown.drain_delay, Duration::from_millis(250));

            jail.set_env("GRPC_PORT", "1002");
            jail.set_env("HTTP_PORT", "2002");
            let s = load_in(jail, file.clone()).unwrap().settings;
            assert_eq!(s.server.listen, "127.0.0.1:1002".parse().unwrap());
            assert_eq!(
                s.server.health_listen,
                Some("127.0.0.1:2002".parse().unwrap())
            );

            let flags = Flags {
                listen: Some("127.0.0.1:1003".into()),
                health_listen: Some(String::new()),
                log_level: Some("warn".into()),
                log_format: Some("json".into()),
                ..file
            };
            let s = load_in(jail, flags).unwrap().settings;
            assert_eq!(s.server.listen, "127.0.0.1:1003".parse().unwrap());
            assert_eq!(s.server.health_listen, None);
            assert_eq!(s.log.level, "warn");
            assert_eq!(s.log.format, LogFormat::Json);
            Ok(())
        });
    }

    #[test]
    fn the_per_client_share_of_subscriptions_follows_max_unless_set() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let s = load_in(jail, Flags::default()).unwrap().settings;
            assert_eq!(s.subscriptions.per_client(), 1000);
            jail.set_env("KVSTORE_SUBSCRIPTIONS__MAX", "5");
            let loaded = load_in(jail, Flags::default()).unwrap();
            assert_eq!(
                loaded.settings.subscriptions.per_client(),
                1,
                "at least one"
            );
            jail.set_env("KVSTORE_SUBSCRIPTIONS__MAX_PER_CLIENT", "5");
            let loaded = load_in(jail, Flags::default()).unwrap();
            assert!(loaded.ignored_env.is_empty(), "{:?}", loaded.ignored_env);
            assert_eq!(loaded.settings.subscriptions.per_client(), 5);
            Ok(())
        });
    }

    #[test]
    fn the_per_address_cap_follows_max_connections_unless_set() {
        Jail::expect_with(|jail| {
            // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
            jail.clear_env();
            let s = load_in(jail, Flags::default()).unwrap().settings;
            assert_eq!(s.server.connections_per_address(), 1000);
            assert!(s.server.trusted_proxies.is_empty());
            jail.set_env("KVSTORE_SERVER__MAX_CONNECTIONS", "5");
            let s = load_in(jail, Flags::default()).unwrap().settings;
            assert_eq!(s.server.connections_per_address(), 1, "at least one");

            jail.set_env("KVSTORE_SERVER__MAX_CONNECTIONS_PER_ADDRESS", "4");
            jail.set_env(
                "KVSTORE_SERVER__TRUSTED_PROXIES",
                "[\"10.1.2.3/8\", \"fd00::1\"]",
            );
            let loaded = load_in(jail, Flags::default()).unwrap();
            assert!(loaded.ignored_env.is_empty(), "{:?}", loaded.ignored_env);
            let server = loaded.settings.server;
            assert_eq!(server.connections_per_address(), 4);
            let [net, one] = server.trusted_proxies[..] else {
                panic!("{:?}", server.trusted_proxies);
            };
            assert_eq!(net.to_string(), "10.1.2.3/8");
            for (ip, inside) in [
                ("10.200.0.1", true),
                ("::ffff:10.0.0.9", true),
                ("11.0.0.1", false),
                ("::a00:1", false),
            ] {
                assert_eq!(net.contains(ip.parse().unwrap()), inside, "{ip}");
            }
            assert!(one.contains("fd00::1".parse().unwrap()));
            assert!(!one.contains("fd00::2".parse().unwrap()));
            jail.set_env("KVSTORE_SERVER__TRUSTED_PROXIES", "[\"10.0.0.0/33\"]");
            let message = error_in(jail, Flags::default());
            assert!(
                message.contains("server.trusted_proxies")
                    && message.contains("the prefix length must be 0 to 32")
                    && message
                        .ends_with("(from environment variable KVSTORE_SERVER__TRUSTED_PROXIES)"),
                "{message}"
            );
            assert!(
                "0.0.0.0/0"
                    .parse::<Cidr>()
                    .unwrap()
                    .contains("192.0.2.1".parse().unwrap())
            );
            Ok(())
        });
    }

    #[test]
    fn the_config_file_can_be_named_by_environment() {
        Jail::expect_with(|jail| {
            // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
            jail.clear_env();
            jail.create_file("other.toml", "[limits]\nmax_key_bytes = 10\n")?;
            jail.set_env("KVSTORE_CONFIG", "other.toml");
            let s = load_in(jail, Flags::default()).unwrap().settings;
            assert_eq!(s.limits.max_key_bytes, 10);
            Ok(())
        });
    }

    #[test]
    fn legacy_ports_keep_the_configured_host() {
        Jail::expect_with(|jail| {
            // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
            jail.clear_env();
            jail.set_env("KVSTORE_SERVER__LISTEN", "[::1]:1");
            jail.set_env("KVSTORE_SERVER__HEALTH_LISTEN", "");
            jail.set_env("GRPC_PORT", "50052");
            let s = load_in(jail, Flags::default()).unwrap().settings;
            assert_eq!(s.server.listen, "[::1]:50052".parse().unwrap());
            assert_eq!(s.server.health_listen, None);
            jail.set_env("HTTP_PORT", "8081");
            let s = load_in(jail, Flags::default()).unwrap().settings;
            assert_eq!(s.server.health_listen, Some("[::1]:8081".parse().unwrap()));
            Ok(())
        });
    }

    #[test]
    fn without_a_config_file_the_defaults_apply() {
        Jail::expect_with(|jail| {
            // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
            jail.clear_env();
            // A kvstore.toml in the working directory is not read implicitly.
            jail.create_file("kvstore.toml", "[limits]\nmax_key_bytes = 10\n")?;
            let loaded = load_in(jail, Flags::default()).unwrap();
            assert_eq!(loaded.settings, Settings::default());
            assert!(loaded.ignored_env.is_empty());
            Ok(())
        });
    }

    #[test]
    fn unknown_environment_variables_are_ignored_and_named() {
        Jail::expect_with(|jail| {
            // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
            jail.clear_env();
            jail.set_env("KVSTORE_SERVER__LISTNE", "x");
            jail.set_env("KVSTORE_ENDPOINT", "localhost:1");
            jail.set_env("KVSTORE_SERVER", "x");
            let loaded = load_in(jail, Flags::default()).unwrap();
            assert_eq!(loaded.settings, Settings::default());
            assert_eq!(
                loaded.ignored_env,
                ["KVSTORE_SERVER", "KVSTORE_SERVER__LISTNE"]
            );
            Ok(())
        });
    }

    #[test]
    fn each_bad_input_is_one_line_naming_the_key_and_its_source() {
        Jail::expect_with(|jail| {
            // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
            jail.clear_env();
            let with_file = |body: &str| -> Result<String, figment::Error> {
                jail.create_file("bad.toml", body)?;
                Ok(error_in(
                    jail,
                    Flags {
                        config: Some("bad.toml".into()),
                        ..Flags::default()
                    },
                ))
            };
            let cases = [
                (
                    with_file("[server]\nlisten = \"nope\"\n")?,
                    "server.listen",
                    "bad.toml",
                ),
                (
                    with_file("[server]\nlisten = \"0.0.0.0:70000\"\n")?,
                    "server.listen",
                    "bad.toml",
                ),
                (
                    with_file("[server]\nlistne = \"x\"\n")?,
                    "listne",
                    "bad.toml",
                ),
                (
                    with_file("[limits]\nmax_key_bytes = \"big\"\n")?,
                    "limits.max_key_bytes",
                    "bad.toml",
                ),
                (
                    with_file("[limits]\nmax_key_bytes = 65536\n")?,
                    "limits.max_key_bytes must be at most 65535",
                    "bad.toml",
                ),
                (
                    with_file("[shutdown]\ndrain_timeout = \"10 parsecs\"\n")?,
                    "shutdown.drain_timeout",
                    "bad.toml",
                ),
                (
                    with_file("[subscriptions]\nbuffer = 0\n")?,
                    "subscriptions.buffer",
                    "bad.toml",
                ),
                (
                    with_file("[log]\nformat = \"xml\"\n")?,
                    "log.format",
                    "bad.toml",
                ),
                (
                    with_file("[server]\nmax_header_bytes = 100\n")?,
                    "server.max_header_bytes",
                    "bad.toml",
                ),
                (
                    with_file("[server]\nhandshake_timeout = \"0s\"\n")?,
                    "server.handshake_timeout",
                    "bad.toml",
                ),
                (
                    with_file("[server]\nrequest_body_timeout = \"0s\"\n")?,
                    "server.request_body_timeout must be longer than 0s",
                    "bad.toml",
                ),
                (
                    with_file("[server]\nmax_request_bytes_in_flight = 4194304\n")?,
                    "server.max_request_bytes_in_flight must be at least 4194309",
                    "bad.toml",
                ),
                (
                    with_file("[server]\nmax_answer_bytes_per_connection = 4194304\n")?,
                    "server.max_answer_bytes_per_connection must be at least 4195333",
                    "bad.toml",
                ),
                (
                    with_file("[server]\nmax_answer_bytes_in_flight = 8388608\n")?,
                    "server.max_answer_bytes_in_flight must be at least server.max_answer_bytes_per_connection (16777216)",
                    "bad.toml",
                ),
                (
                    with_file("[server]\nsend_timeout = \"0s\"\n")?,
                    "server.send_timeout must be longer than 0s",
                    "bad.toml",
                ),
                (
                    with_file("[server]\nmax_control_frames = 99\n")?,
                    "server.max_control_frames must be at least 100",
                    "bad.toml",
                ),
                (
                    with_file("[server]\nmax_connections = 0\n")?,
                    "server.max_connections",
                    "bad.toml",
                ),
                (
                    with_file("[server]\nallowed_hosts = 5\n")?,
                    "server.allowed_hosts: a list of names, or one string of comma-separated names",
                    "bad.toml",
                ),
                (
                    with_file("[server]\nallowed_hosts = [\"kvstore-1:8080\"]\n")?,
                    "server.allowed_hosts entry \"kvstore-1:8080\" must be a host name",
                    "bad.toml",
                ),
                (
                    with_file("[server]\nmax_connections_per_address = 10001\n")?,
                    "server.max_connections_per_address must be at most server.max_connections (10000)",
                    "bad.toml",
                ),
                (
                    with_file("[subscriptions]\nmax_per_client = 10001\n")?,
                    "subscriptions.max_per_client must be at most subscriptions.max (10000)",
                    "bad.toml",
                ),
                (
                    with_file("[subscriptions]\nmax_per_clients = 1\n")?,
                    "max_per_clients",
                    "bad.toml",
                ),
                (
                    with_file("[server]\nmax_health_watches = 0\n")?,
                    "server.max_health_watches must be at least 1",
                    "bad.toml",
                ),
                (
                    with_file("[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\n")?,
                    "server.trusted_proxies",
                    "bad.toml",
                ),
                (
                    with_file("[server]\ntrusted_proxies = [\"nginx\"]\n")?,
                    "is not an IP address or CIDR range",
                    "bad.toml",
                ),
                (
                    with_file("[tls]\ncert = \"nowhere.pem\"\nkey = \"nowhere.key\"\n")?,
                    "tls.cert cannot read nowhere.pem",
                    "bad.toml",
                ),
                (with_file("[server\n")?, "line 1", "bad.toml"),
                (
                    error_in(
                        jail,
                        Flags {
                            config: Some("missing.toml".into()),
                            ..Flags::default()
                        },
                    ),
                    "cannot read config file missing.toml",
                    "",
                ),
                (
                    error_in(
                        jail,
                        Flags {
                            listen: Some("localhost".into()),
                            ..Flags::default()
                        },
                    ),
                    "--listen",
                    "command-line flag",
                ),
                (
                    error_in(
                        jail,
                        Flags {
                            log_level: Some("kvstore=loud".into()),
                            ..Flags::default()
                        },
                    ),
                    "log.level",
                    "command-line flag",
                ),
            ];
            for (message, key, source) in cases {
                assert!(message.starts_with("configuration error: "), "{message}");
                assert!(!message.contains('\n'), "{message}");
                assert!(message.contains(key), "{message:?} names {key}");
                assert!(message.contains(source), "{message:?} names {source}");
            }

            jail.set_env("KVSTORE_LIMITS__MAX_VALUE_BYTES", "-1");
            let message = error_in(jail, Flags::default());
            assert!(
                message.contains("LIMITS.MAX_VALUE_BYTES")
                    || message.contains("limits.max_value_bytes"),
                "{message}"
            );
            assert!(message.contains("KVSTORE_"), "{message}");

            jail.set_env("KVSTORE_LIMITS__MAX_VALUE_BYTES", "1");
            jail.create_file("key.pem", "")?;
            jail.set_env("KVSTORE_TLS__CERT", "key.pem");
            jail.set_env("KVSTORE_TLS__KEY", "key.pem");
            let message = error_in(jail, Flags::default());
            assert!(
                message.contains("tls.cert key.pem: no certificate in it"),
                "{message}"
            );
            assert!(message.contains("KVSTORE_TLS__CERT"), "{message}");
            // Empty is off.
            jail.set_env("KVSTORE_TLS__CERT", "");
            jail.set_env("KVSTORE_TLS__KEY", "");

            jail.set_env("GRPC_PORT", "65536");
            let message = error_in(jail, Flags::default());
            assert!(message.contains("GRPC_PORT"), "{message}");
            Ok(())
        });
    }

    const DIGEST_A: &str = "f52fbd32b2b3b86ff88ef6c490628285f482af15ddcb29541f94bcf526a3f6c7";
    const DIGEST_B: &str = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b";

    #[test]
    fn tokens_come_from_the_file_inline_and_the_environment() {
        Jail::expect_with(|jail| {
            // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
            jail.clear_env();
            jail.create_file(
                "tokens.txt",
                &format!(
                    "# role digest name\n\nread {DIGEST_A} dashboard  # trailing comment\n  readwrite\t{}\n",
                    DIGEST_B.to_uppercase()
                ),
            )?;
            jail.create_file(
                "kv.toml",
                &format!(
                    "[auth]\nenabled = true\ntoken_file = \"tokens.txt\"\n\
                     tokens = [{{ sha256 = \"{}\", role = \"readwrite\", name = \"ci\" }}]\n",
                    "cd".repeat(32)
                ),
            )?;
            let file = Flags {
                config: Some("kv.toml".into()),
                ..Flags::default()
            };
            let s = load_in(jail, file).unwrap().settings;
            assert!(s.auth.enabled);
            assert_eq!(s.auth.tokens[0].role, Role::ReadWrite);
            assert_eq!(crate::auth::Keyring::load(&s.auth).unwrap().len(), 3);
            // The file's digests stay in the file: --print-config shows only its path.
            let printed = s.to_toml();
            assert!(printed.contains("tokens.txt"), "{printed}");
            assert!(!printed.contains(DIGEST_A), "{printed}");

            jail.set_env("KVSTORE_AUTH__ENABLED", "true");
            jail.set_env("KVSTORE_AUTH__TOKEN_FILE", "tokens.txt");
            jail.set_env(
                "KVSTORE_AUTH__TOKENS",
                format!("[{{sha256=\"{}\", role=\"read\"}}]", "ef".repeat(32)),
            );
            jail.set_env("KVSTORE_AUTH__PROTECT_REFLECTION", "false");
            jail.set_env("KVSTORE_RATE_LIMIT__PER_CLIENT", "50");
            jail.set_env("KVSTORE_SERVER__ALLOWED_HOSTS", "kvstore-1, .example.org");
            jail.set_env("KVSTORE_LIMITS__MAX_HTTP_BODY_BYTES", "10");
            let loaded = load_in(jail, Flags::default()).unwrap();
            assert!(loaded.ignored_env.is_empty(), "{:?}", loaded.ignored_env);
            let s = loaded.settings;
            assert!(s.auth.enabled && !s.auth.protect_reflection);
            assert_eq!(s.auth.tokens[0].role, Role::Read);
            assert_eq!(crate::auth::Keyring::load(&s.auth).unwrap().len(), 3);
            assert_eq!(s.rate_limit.per_client, 50);
            assert_eq!(s.server.allowed_hosts, ["kvstore-1", ".example.org"]);
            assert_eq!(s.limits.max_http_body_bytes, 10);
            Ok(())
        });
    }

    #[test]
    fn each_bad_token_entry_is_one_line_naming_its_place_but_not_its_content() {
        Jail::expect_with(|jail| {
            // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
            jail.clear_env();
            let with_tokens = |file: &str, toml: &str| -> Result<String, figment::Error> {
                jail.create_file("tokens.txt", file)?;
                jail.create_file("kv.toml", &format!("[auth]\n{toml}"))?;
                Ok(error_in(
                    jail,
                    Flags {
                        config: Some("kv.toml".into()),
                        ..Flags::default()
                    },
                ))
            };
            let file = "token_file = \"tokens.txt\"\n";
            let cases = [
                (
                    with_tokens(
                        &format!("# ok\nread {DIGEST_A}\nreadwrite s3cret-token\n"),
                        file,
                    )?,
                    "auth.token_file tokens.txt:3: the second field must be a SHA-256 digest",
                ),
                (
                    with_tokens(&format!("s3cret-token {DIGEST_A}\n"), file)?,
                    "auth.token_file tokens.txt:1: the role (first field) must be read or readwrite",
                ),
                (
                    with_tokens("s3cret-token\n", file)?,
                    "auth.token_file tokens.txt:1: expected `ROLE SHA256 [NAME]`, found 1 fields",
                ),
                (
                    with_tokens(
                        &format!("read {DIGEST_A} a\nreadwrite {DIGEST_A} b\n"),
                        file,
                    )?,
                    "auth.token_file tokens.txt:2: repeats the digest of token \"a\"",
                ),
                (
                    with_tokens("", "token_file = \"missing.txt\"\n")?,
                    "auth.token_file cannot read missing.txt",
                ),
                (
                    with_tokens(
                        "",
                        "tokens = [{ sha256 = \"s3cret-token\", role = \"read\" }]\n",
                    )?,
                    "auth.tokens entry 1: sha256 must be a SHA-256 digest",
                ),
                (
                    with_tokens(
                        "",
                        &format!("tokens = [{{ sha256 = \"{DIGEST_A}\", role = \"admin\" }}]\n"),
                    )?,
                    "auth.tokens",
                ),
                (
                    with_tokens("", "enabled = true\n")?,
                    "auth.enabled is true but no token is configured",
                ),
                (
                    with_tokens("", "protect_metrics = \"yes\"\n")?,
                    "auth.protect_metrics",
                ),
            ];
            for (message, expected) in cases {
                assert!(message.starts_with("configuration error: "), "{message}");
                assert!(!message.contains('\n'), "{message}");
                assert!(message.contains(expected), "{message:?} says {expected:?}");
                assert!(message.contains("kv.toml"), "{message:?} names the file");
                assert!(!message.contains("s3cret"), "{message:?} quotes a token");
            }
            Ok(())
        });
    }
}
