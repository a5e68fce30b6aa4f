//! Each client's share of the open Subscribe streams (`subscriptions.max_per_client`): a
//! count per client, keyed as the rate limit keys it (its token, else its address), taken
//! when a stream opens and given back when the stream is dropped; and the budgets of PROGRESS
//! events that bound what one client's idle streams cost, and all clients' together. The
//! global cap on streams is the store's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::caller::ClientKey;

/// PROGRESS events per second one client's streams may get, all together. Each costs the
/// server a wake-up, an encode and a write (docs/data-model.md, "Progress", has the cost), so
/// one client's idle streams cost a small fixed share of a core, however many it opens. A client with ten streams still gets progress every 100 ms on each.
pub const PROGRESS_PER_CLIENT: u32 = 100;

/// PROGRESS events per second all streams of all clients may get together: a small fixed
/// share of a core, however many clients there are. With the default `subscriptions.max`
/// (10,000) all open, each stream still gets one at least every 10 s, within the idle
/// timeouts of the usual proxies (60 s and more).
pub const PROGRESS_PER_SERVER: u32 = 1000;

/// The open streams of every client that has one.
#[derive(Clone)]
pub struct Shares(Arc<Inner>);

struct Inner {
    per_client: usize,
    /// Changed only under the lock, so a count and its removal at zero cannot race a take;
    /// read without it (an atomic load) by the progress timers.
    open: Mutex<HashMap<ClientKey, Arc<AtomicUsize>>>,
    /// Streams open from all clients, changed with the counts above.
    total: AtomicUsize,
}

/// A client is at its share: `subscriptions.max_per_client` streams are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "this client has {0} subscriptions open, its share of the server's \
     (subscriptions.max_per_client): close one first"
)]
pub struct AtShare(pub usize);

impl Shares {
    /// Up to `per_client` streams for each client.
    pub fn new(per_client: usize) -> Self {
        Self(Arc::new(Inner {
            per_client,
            open: Mutex::new(HashMap::new()),
            total: AtomicUsize::new(0),
        }))
    }

    /// One more stream for `client`, held until the [`Share`] is dropped.
    pub(crate) fn take(&self, client: ClientKey) -> Result<Share, AtShare> {
        let mut open = self.0.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(client.clone()).or_default().clone();
        if count.load(Ordering::Relaxed) >= self.0.per_client {
            return Err(AtShare(self.0.per_client));
        }
        count.fetch_add(1, Ordering::Relaxed);
        self.0.total.fetch_add(1, Ordering::Relaxed);
        Ok(Share {
            shares: self.0.clone(),
            client,
            count,
        })
    }
}

/// One open stream's place in its client's share; dropping it gives the place back.
pub struct Share {
    shares: Arc<Inner>,
    client: ClientKey,
    count: Arc<AtomicUsize>,
}

impl Share {
    /// The shortest wait between two PROGRESS events on one of this client's streams that
    /// keeps all of them within [`PROGRESS_PER_CLIENT`] a second, and every stream of every
    /// client within [`PROGRESS_PER_SERVER`], with the streams open now. Read at each reset
    /// of a stream's timer, so it follows the counts.
    pub fn progress_floor(&self) -> Duration {
        let count =
            |open: &AtomicUsize| u32::try_from(open.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
        let client = Duration::from_secs(1) * count(&self.count) / PROGRESS_PER_CLIENT;
        let server = Duration::from_secs(1) * count(&self.shares.total) / PROGRESS_PER_SERVER;
        client.max(server)
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut open = self
            .shares
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.shares.total.fetch_sub(1, Ordering::Relaxed);
        // A client with nothing open takes no memory.
        if self.count.fetch_sub(1, Ordering::Relaxed) == 1 {
            open.remove(&self.client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_past_its_share_is_refused_until_one_of_its_streams_ends() {
        let shares = Shares::new(2);
        let a = ClientKey::Token(0);
        let first = shares.take(a.clone()).unwrap();
        let _second = shares.take(a.clone()).unwrap();
        assert_eq!(shares.take(a.clone()).err(), Some(AtShare(2)));
        let _other = shares.take(ClientKey::Token(1)).expect("another client");
        drop(first);
        let _third = shares.take(a).expect("a place was given back");
    }

    #[test]
    fn a_client_with_nothing_open_is_forgotten() {
        let shares = Shares::new(1);
        drop(shares.take(ClientKey::Token(0)).unwrap());
        assert!(shares.0.open.lock().unwrap().is_empty());
    }

    #[test]
    fn the_progress_floor_grows_with_the_streams_open() {
        let shares = Shares::new(1000);
        let held: Vec<Share> = (0..10)
            .map(|_| shares.take(ClientKey::Unknown).unwrap())
            .collect();
        assert_eq!(held[0].progress_floor(), Duration::from_millis(100));
        let more: Vec<Share> = (0..990)
            .map(|_| shares.take(ClientKey::Unknown).unwrap())
            .collect();
        assert_eq!(more[0].progress_floor(), Duration::from_secs(10));
    }

    #[test]
    fn the_progress_floor_grows_with_the_streams_of_every_client() {
        let shares = Shares::new(1);
        let held: Vec<Share> = (0..2000)
            .map(|client| shares.take(ClientKey::Token(client)).unwrap())
            .collect();
        // One stream each: the client's own budget allows one every 10 ms.
        assert_eq!(held[0].progress_floor(), Duration::from_secs(2));
        drop(held);
        assert_eq!(shares.0.total.load(Ordering::Relaxed), 0);
    }
}
