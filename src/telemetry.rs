//! Logging: tracing to stdout as JSON lines or text, filtered by `log.level` or `RUST_LOG`.
//! Initialised once by the server binary; tests initialise it only when `TEST_LOG` is set.
//! Also what keeps clients from filling the log: [`Sampler`] for warnings they can cause,
//! and [`Escaped`] for the text they choose.

use std::fmt;
use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber, with the filter start-up built (`RUST_LOG`, when set,
/// wins over `log.level`).
///
/// Fails if a subscriber is already installed.
pub fn init(filter: EnvFilter, format: LogFormat) -> anyhow::Result<()> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let installed = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        // Colour codes are noise in a file or a collector, and a terminal's business only.
        LogFormat::Text => builder
            .with_ansi(std::io::stdout().is_terminal())
            .try_init(),
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

/// Lets one warning through per `every` for an event that clients can cause at will, and
/// counts the rest, so that the next warning can say how many it stands for. The events
/// themselves are still counted in the metrics, and can be logged at debug one by one.
#[derive(Debug)]
pub struct Sampler {
    every: Duration,
    epoch: Instant,
    /// Milliseconds from `epoch` before which no warning is let through.
    next_ms: AtomicU64,
    /// Events not warned about since the last warning.
    suppressed: AtomicU64,
}

impl Sampler {
    /// At most one warning per `every`; the first event warns at once.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            epoch: Instant::now(),
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// The window, for the warning's text.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// `Some(n)` if this event is to be warned about, `n` being the events let pass silently
    /// since the last warning; `None` if it is one of those. One atomic add when silent.
    pub fn sample(&self) -> Option<u64> {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        let until = now.saturating_add(u64::try_from(self.every.as_millis()).unwrap_or(u64::MAX));
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, until, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// The most characters of client-chosen text one log field holds.
pub const MAX_LOGGED_CHARS: usize = 128;

/// Client-chosen text (a path, a host name) as a log field: printable ASCII as it is,
/// anything else escaped as `\u{..}`, cut after [`MAX_LOGGED_CHARS`] characters with the
/// full length said. So a line in the text format cannot carry terminal escapes or forged
/// line breaks, and its size does not depend on the client.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        for (i, c) in self.0.chars().enumerate() {
            if i == MAX_LOGGED_CHARS {
                return write!(f, "... ({} bytes)", self.0.len());
            }
            match c {
                ' '..='~' if c != '\\' => f.write_char(c)?,
                _ => write!(f, "{}", c.escape_unicode())?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Escaped, MAX_LOGGED_CHARS, Sampler, filter_directives};

    #[test]
    fn a_sampler_warns_once_a_window_and_counts_the_rest() {
        let sampler = Sampler::new(Duration::from_secs(3600));
        assert_eq!(sampler.sample(), Some(0), "the first warns at once");
        for _ in 0..12_345 {
            assert_eq!(sampler.sample(), None);
        }
        let sampler = Sampler {
            next_ms: 0.into(),
            ..sampler
        };
        assert_eq!(
            sampler.sample(),
            Some(12_345),
            "the next says how many it stands for"
        );
        assert_eq!(sampler.sample(), None);
    }

    #[test]
    fn client_text_is_escaped_and_cut() {
        let path = "/a b\"\u{1b}[31m\nfake line\u{9b}\u{202e}\\";
        assert_eq!(
            Escaped(path).to_string(),
            "/a b\"\\u{1b}[31m\\u{a}fake line\\u{9b}\\u{202e}\\u{5c}"
        );
        let long = "x".repeat(10_000);
        let logged = Escaped(&long).to_string();
        assert!(logged.ends_with("... (10000 bytes)"), "{logged}");
        assert_eq!(logged.len(), MAX_LOGGED_CHARS + "... (10000 bytes)".len());
    }

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
