//! The trailers of the wire contract, which server and clients both read: what a failed
//! compare-and-set and an ended subscription tell the client beyond their status.

/// Trailer of a FAILED_PRECONDITION: the key's current `mod_revision` (0: absent).
pub const MOD_REVISION_TRAILER: &str = "kvstore-mod-revision";
/// Trailer of a Subscribe that ends: the last revision the client received.
pub const LAST_REVISION_TRAILER: &str = "kvstore-last-revision";
/// Trailer of an OUT_OF_RANGE Subscribe: the oldest revision that can still be replayed.
pub const OLDEST_REVISION_TRAILER: &str = "kvstore-oldest-revision";
