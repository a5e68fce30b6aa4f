//! Who is calling: the [`Caller`] a token identifies (put in the request's extensions by
//! `auth`), and the [`ClientKey`] that the rate limit, the subscription share and the
//! per-address caps count a client by: its token when it has one, else its address.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tonic::Status;

use crate::config::Role;

/// Who made a request: put in the request's extensions once its token is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's position in the keyring, which keys its rate limit.
    pub index: usize,
    /// The token's configured name.
    pub name: Arc<str>,
    /// What the token may do.
    pub role: Role,
}

impl Caller {
    /// `PERMISSION_DENIED` unless this caller may make a call that needs `needed`, named
    /// `what` in the refusal.
    pub fn require(&self, needed: Role, what: &str) -> Result<(), Status> {
        if self.role >= needed {
            return Ok(());
        }
        Err(Status::permission_denied(self.refusal(needed, what)))
    }

    fn refusal(&self, needed: Role, what: &str) -> String {
        format!(
            "token \"{}\" has role {}, and {what} needs {needed} (the token's role in auth.tokens or auth.token_file)",
            self.name, self.role
        )
    }
}

/// Who a client is, for its bucket here and its share of subscriptions (`share`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum ClientKey {
    /// A token's position in the keyring: every connection using it shares one bucket.
    Token(usize),
    /// The peer's address; IPv6 by its /64, which one host usually has whole.
    Peer(IpAddr),
    /// No token and no address known: one shared bucket.
    Unknown,
}

/// The client a call is from: its token when authentication accepted one (`caller`), else
/// its address (`peer`).
pub(crate) fn client_key_of(caller: Option<&Caller>, peer: Option<SocketAddr>) -> ClientKey {
    match (caller, peer) {
        (Some(caller), _) => ClientKey::Token(caller.index),
        (None, Some(peer)) => ClientKey::Peer(peer_key(peer.ip())),
        (None, None) => ClientKey::Unknown,
    }
}

/// The address a client is known by: IPv4 as it is (also when seen as `::ffff:a.b.c.d`),
/// IPv6 by its /64, which one host usually has whole. The per-address connection cap keys
/// clients the same way.
pub(crate) fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_peers_share_their_64_and_mapped_ipv4_is_ipv4() {
        let key = |s: &str| peer_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::2"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.1"), key("192.0.2.1"));
        assert_ne!(key("192.0.2.1"), key("192.0.2.2"));
    }
}
