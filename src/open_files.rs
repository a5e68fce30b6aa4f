//! The process's open-file limit (`RLIMIT_NOFILE`): raised to the hard limit at start-up by
//! the binary, and read by the server, which caps connections below it (every connection is a
//! file descriptor; past the limit `accept` fails and clients wait unanswered in the backlog).

use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};

/// Descriptors kept for everything but connections: stdio and the log, the runtime's epoll
/// and event descriptors, the listeners, the files read at start-up (TLS, tokens), and
/// `/proc` reads. The server holds a few dozen of these; the rest is margin.
pub const RESERVED: usize = 64;

/// The open-file limit: the soft limit is the one enforced; an unprivileged process may raise
/// it up to the hard one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The enforced limit, `None` when unlimited.
    pub soft: Option<u64>,
    /// The ceiling of the soft limit, `None` when unlimited.
    pub hard: Option<u64>,
}

/// The current limit, or `None` if it cannot be read.
pub fn current() -> Option<OpenFiles> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let finite = |limit: u64| (limit != RLIM_INFINITY).then_some(limit);
    Some(OpenFiles {
        soft: finite(soft),
        hard: finite(hard),
    })
}

/// Raises the soft limit to the hard one, as nginx's `worker_rlimit_nofile` and Go's runtime
/// do: systemd and many shells start services at a soft 1,024, a tenth of the default
/// `server.max_connections`, while allowing far more. Returns the limit before and after, or
/// `None` when it was already as high as allowed.
pub fn raise_to_hard() -> nix::Result<Option<(OpenFiles, OpenFiles)>> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft == hard {
        return Ok(None);
    }
    let before = current().expect("read just now");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(Some((before, current().unwrap_or(before))))
}
