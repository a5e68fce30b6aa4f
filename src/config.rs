//! Settings and how they are layered, later winning: built-in defaults < the TOML file named
//! by `--config`/`KVSTORE_CONFIG` < `KVSTORE_*` environment variables < the legacy
//! `GRPC_PORT`/`HTTP_PORT` < command-line flags. `config/kvstore.toml` documents every key.
//!
//! Configuration is data: this parses, layers and range-checks, and builds nothing. What the
//! server runs with (TLS, tokens, allowed hosts, the log filter) is built from it once, by
//! `startup`, which reports its errors the same way ([`Sources::invalid`]).

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

/// Settings that were loaded, the environment variables that were not used, and where each
/// value came from.
#[derive(Debug)]
pub struct Loaded {
    /// The effective settings.
    pub settings: Settings,
    /// `KVSTORE_*` variables that name no setting, for a warning once logging is up.
    pub ignored_env: Vec<String>,
    /// Where each setting came from, for errors found later, at start-up.
    pub sources: Sources,
}

impl Loaded {
    /// `settings` as if they were the defaults: what tests and tools start a server with.
    /// They are checked as a config file would be.
    pub fn from_settings(settings: Settings) -> Result<Self, ConfigError> {
        let figment = Figment::from(Serialized::defaults(settings));
        Ok(Self {
            settings: extract(&figment)?,
            ignored_env: Vec::new(),
            sources: Sources(figment),
        })
    }
}

/// Where each setting's value came from (a default, the file, a variable, a flag).
#[derive(Debug)]
pub struct Sources(Figment);

impl Sources {
    /// The error for `key`, whose value has `problem`, naming where that value came from:
    /// `tls.cert cannot read nowhere.pem (from TOML file kvstore.toml)`.
    pub fn invalid(&self, key: &str, problem: &str) -> ConfigError {
        invalid(&self.0, key, problem)
    }
}

/// Configuration that cannot be used, as one line naming the key and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    /// An error about configuration that is not a setting (such as `RUST_LOG`).
    pub fn new(message: String) -> Self {
        Self(message)
    }
}

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
        sources: Sources(figment),
    })
}

/// The settings a config file with this text gives over the defaults, extracted and checked
/// as [`load`] does, with no environment or flags: what `--config` would give in an empty
/// environment. The files it names (TLS, token file) are not read: that is start-up's work.
pub fn from_toml(text: &str) -> Result<Loaded, ConfigError> {
    let figment =
        Figment::from(Serialized::defaults(Settings::default())).merge(Toml::string(text));
    Ok(Loaded {
        settings: extract(&figment)?,
        ignored_env: Vec::new(),
        sources: Sources(figment),
    })
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

/// The range checks: each value on its own, and against the others.
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
    let positive = [
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
