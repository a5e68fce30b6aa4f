//! Logging: tracing to stdout as JSON lines or text, filtered by `log.level` or `RUST_LOG`.
//! Initialised once by the server binary; tests initialise it only when `TEST_LOG` is set.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `log.level`.
///
/// Fails if a filter does not parse or a subscriber is already installed.
pub fn init(settings: &LogSettings) -> anyhow::Result<()> {
    let directives = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => env,
        _ => settings.level.clone(),
    };
    let directives = filter_directives(&directives)
        .map_err(|err| anyhow::anyhow!("log filter {directives:?} {err}"))?;
    let filter = EnvFilter::builder().parse(&directives)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let installed = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    installed.map_err(|err| anyhow::anyhow!("installing the log subscriber: {err}"))
}

/// The filter for a `log.level` value: a bare level applies to kvstore and its request
/// traces while the HTTP/2 stack stays at `warn` (h2 logs every frame at debug); anything
/// else is taken as a full `EnvFilter` directive list.
pub fn filter_directives(level: &str) -> Result<String, String> {
    let level = level.trim();
    let directives = match level.to_ascii_lowercase().as_str() {
        "trace" | "debug" | "info" | "warn" | "error" | "off" => {
            format!("warn,kvstore={level},kvstore_server={level},tower_http={level}")
        }
        _ => level.to_owned(),
    };
    EnvFilter::builder()
        .parse(&directives)
        .map(|_| directives)
        .map_err(|err| format!("is not a valid log level or filter ({err})"))
}

#[cfg(test)]
mod tests {
    use super::filter_directives;

    #[test]
    fn a_bare_level_keeps_the_http2_stack_quiet() {
        let directives = filter_directives("debug").unwrap();
        assert!(directives.starts_with("warn,"), "{directives}");
        assert!(directives.contains("kvstore=debug"), "{directives}");
    }

    #[test]
    fn full_directives_pass_through_and_bad_ones_are_refused() {
        assert_eq!(filter_directives("kvstore=trace").unwrap(), "kvstore=trace");
        assert!(filter_directives("kvstore=loud").is_err());
    }
}
