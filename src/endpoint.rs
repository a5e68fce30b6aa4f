//! The server address the command-line tools accept (`host:port` or `http://host:port`),
//! shared by `kvstore-client` and `kvstore-bench` so both refuse the same mistakes.

use std::time::Duration;

use tonic::transport::Endpoint;

/// How long a tool waits to connect before it reports the server unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses `host:port` or `http://host:port` into an endpoint with [`CONNECT_TIMEOUT`].
/// The port is required and a path is refused; `https` is refused since the tools have no
/// TLS. The error is a message for a person, for clap's `value_parser`.
pub fn parse(addr: &str) -> Result<Endpoint, String> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(url.clone()).map_err(|err| format!("{url}: {err}"))?;
    let uri = endpoint.uri();
    if uri.scheme_str() != Some("http") {
        // tonic is built without TLS, so https could never connect.
        return Err(format!("{url}: only http:// is supported"));
    }
    if uri.port().is_none() || !matches!(uri.path(), "" | "/") {
        return Err(format!("{url}: expected host:port or http://host:port"));
    }
    Ok(endpoint.connect_timeout(CONNECT_TIMEOUT))
}
