//! The layers, read and merged (figment), and the one-line errors that name a key and the
//! layer its value came from.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};

use super::checks::validate;
use super::values::OptionalAddr;
use super::*;

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

pub(super) fn invalid(figment: &Figment, key: &str, problem: &str) -> ConfigError {
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
