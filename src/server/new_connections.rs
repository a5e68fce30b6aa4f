//! The rate of new connections from one address (`server.new_connections_per_address` and
//! `server.new_connections_burst`): a token bucket per address (IPv6: per /64) on each
//! listener, taken as a connection is accepted. A connection past it is closed at once,
//! before its TLS handshake and without a word: an answer, and the handshake a TLS listener
//! needs to give one, is the very work a flood of connections wants the server to do.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tracing::{debug, warn};

use crate::caller::peer_key;
use crate::config::{Cidr, ServerSettings};
use crate::metrics::{LimitKey, Metrics};

/// How often addresses whose bucket has refilled are forgotten: a full bucket is the same as
/// none, so this bounds the memory to the addresses seen in about the last interval.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// How often, at most, closing connections for their rate is logged at warn.
const WARNING_EVERY: Duration = Duration::from_secs(10);

/// One listener's buckets of new connections by address.
pub(super) struct NewConnections {
    /// `None` with the limit off.
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    listener: &'static str,
    per_second: u32,
    /// `server.trusted_proxies`: exempt, since one of their connections carries many clients.
    trusted: Vec<Cidr>,
    metrics: Arc<Metrics>,
    chores: Mutex<Chores>,
}

/// When the buckets were last pruned, and the refusals not yet logged.
struct Chores {
    pruned: Instant,
    warned: Option<Instant>,
    closed_since_warning: u64,
}

impl NewConnections {
    pub(super) fn new(
        listener: &'static str,
        settings: &ServerSettings,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let limiter = NonZeroU32::new(settings.new_connections_per_address).map(|rate| {
            let burst = NonZeroU32::new(settings.new_connections_burst).unwrap_or(rate);
            RateLimiter::dashmap(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            limiter,
            listener,
            per_second: settings.new_connections_per_address,
            trusted: settings.trusted_proxies.clone(),
            metrics: metrics.clone(),
            chores: Mutex::new(Chores {
                pruned: Instant::now(),
                warned: None,
                closed_since_warning: 0,
            }),
        }
    }

    /// Whether a connection just accepted from `ip` is within its address's rate. One that
    /// is not is counted in the metrics; the caller closes it.
    pub(super) fn admit(&self, ip: IpAddr) -> bool {
        let Some(limiter) = &self.limiter else {
            return true;
        };
        if self.trusted.iter().any(|net| net.contains(ip)) {
            return true;
        }
        let key = peer_key(ip);
        let admitted = limiter.check_key(&key).is_ok();
        let mut chores = self.chores.lock().unwrap_or_else(PoisonError::into_inner);
        if chores.pruned.elapsed() >= PRUNE_EVERY {
            chores.pruned = Instant::now();
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if admitted {
            return true;
        }
        self.metrics.refused(LimitKey::NewConnectionsPerAddress);
        debug!(listener = self.listener, address = %key, "closed a connection: server.new_connections_per_address");
        chores.closed_since_warning += 1;
        if chores.warned.is_none_or(|at| at.elapsed() >= WARNING_EVERY) {
            chores.warned = Some(Instant::now());
            warn!(
                listener = self.listener,
                new_connections_per_address = self.per_second,
                closed = std::mem::take(&mut chores.closed_since_warning),
                address = %key,
                "closing connections: an address opens them faster than server.new_connections_per_address"
            );
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn with(per_second: u32, burst: u32, trusted: &str) -> NewConnections {
        let mut server = Settings::default().server;
        server.new_connections_per_address = per_second;
        server.new_connections_burst = burst;
        server.trusted_proxies = trusted
            .split_whitespace()
            .map(|net| net.parse().unwrap())
            .collect();
        NewConnections::new("main", &server, &Arc::new(Metrics::new()))
    }

    #[test]
    fn an_address_past_its_burst_is_refused_while_others_and_trusted_proxies_are_not() {
        let rate = with(1, 3, "192.0.2.9");
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!((0..3).all(|_| rate.admit(a)));
        assert!(!rate.admit(a));
        assert_eq!(rate.metrics.refusals(LimitKey::NewConnectionsPerAddress), 1);
        assert!(rate.admit("192.0.2.2".parse().unwrap()), "another address");
        let proxy: IpAddr = "192.0.2.9".parse().unwrap();
        assert!((0..10).all(|_| rate.admit(proxy)), "a trusted proxy");
    }

    #[test]
    fn off_admits_everything() {
        let rate = with(0, 3, "");
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!((0..100).all(|_| rate.admit(a)));
    }
}
