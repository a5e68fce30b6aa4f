//! From the loaded configuration to what the server runs with, built once at start-up: the
//! TLS acceptor, the keyring, the allowed hosts and the log filter, and the checks that need
//! the code's own bounds. Each error names the key and where its value came from, as the
//! configuration's own do (the binary exits with code 2).

use tokio_rustls::TlsAcceptor;
use tracing_subscriber::EnvFilter;

use crate::auth::Keyring;
use crate::browser::AllowedHosts;
use crate::config::{ConfigError, Loaded, Settings};
use crate::{grpc, request_body, telemetry, tls};

/// The settings, and the pieces built from the files and lists they name.
pub struct Startup {
    /// The effective settings.
    pub settings: Settings,
    /// The main listener's TLS, or `None` when `[tls]` is off.
    pub tls: Option<TlsAcceptor>,
    /// The tokens of `auth.tokens` and `auth.token_file`.
    pub keyring: Keyring,
    /// `server.allowed_hosts`, parsed.
    pub hosts: AllowedHosts,
    /// The log filter: `RUST_LOG` when set, else `log.level`.
    pub log_filter: EnvFilter,
    /// `KVSTORE_*` variables that name no setting, for a warning once logging is up.
    pub ignored_env: Vec<String>,
}

impl std::fmt::Debug for Startup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Startup")
            .field("settings", &self.settings)
            .field("tls", &self.tls.is_some())
            .field("tokens", &self.keyring.len())
            .finish_non_exhaustive()
    }
}

impl Startup {
    /// Reads the files `loaded` names and builds what the server needs from them.
    pub fn build(loaded: Loaded) -> Result<Self, ConfigError> {
        let Loaded {
            settings,
            sources,
            ignored_env,
        } = loaded;
        let largest = grpc::max_message_bytes(&settings.limits) + request_body::PREFIX_BYTES;
        if settings.server.max_request_bytes_in_flight < largest {
            return Err(sources.invalid(
                "server.max_request_bytes_in_flight",
                &format!(
                    "must be at least {largest}, the largest KeyValueStore request (from limits.max_key_bytes, \
                     limits.max_value_bytes and limits.max_batch_bytes), got {}",
                    settings.server.max_request_bytes_in_flight
                ),
            ));
        }
        let largest = grpc::max_answer_bytes(&settings.limits) + request_body::PREFIX_BYTES;
        if settings.server.max_answer_bytes_per_connection < largest {
            return Err(sources.invalid(
                "server.max_answer_bytes_per_connection",
                &format!(
                    "must be at least {largest}, the largest answer (limits.max_response_bytes and its \
                     framing), got {}",
                    settings.server.max_answer_bytes_per_connection
                ),
            ));
        }
        let tls =
            tls::acceptor(&settings.tls).map_err(|err| sources.invalid(err.key, &err.problem))?;
        let hosts = AllowedHosts::new(&settings.server.allowed_hosts)
            .map_err(|problem| sources.invalid("server.allowed_hosts", &problem))?;
        let level = telemetry::filter_directives(&settings.log.level)
            .map_err(|problem| sources.invalid("log.level", &problem))?;
        let log_filter = match std::env::var("RUST_LOG") {
            Ok(env) if !env.trim().is_empty() => telemetry::filter_directives(&env)
                .map_err(|problem| ConfigError::new(format!("RUST_LOG {env:?} {problem}")))?,
            _ => level,
        };
        let log_filter = EnvFilter::builder()
            .parse(&log_filter)
            .expect("filter_directives parsed it");
        let keyring =
            Keyring::load(&settings.auth).map_err(|err| sources.invalid(err.key, &err.problem))?;
        if settings.auth.enabled && keyring.is_empty() {
            return Err(sources.invalid(
                "auth.enabled",
                "is true but no token is configured; add auth.tokens or auth.token_file",
            ));
        }
        Ok(Self {
            settings,
            tls,
            keyring,
            hosts,
            log_filter,
            ignored_env,
        })
    }

    /// [`Startup::build`] for `settings` taken as the defaults: how tests and tools start a
    /// server.
    pub fn from_settings(settings: Settings) -> Result<Self, ConfigError> {
        Self::build(Loaded::from_settings(settings)?)
    }
}

#[cfg(test)]
mod tests;
