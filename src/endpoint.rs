//! The server address the command-line tools and the client library accept (`host:port`,
//! `http://host:port`, and where TLS is possible `https://host:port`), shared so all refuse
//! the same mistakes.

use std::time::Duration;

use http::uri::Scheme;
use tonic::transport::Endpoint;

/// How long a tool waits to connect before it reports the server unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses `host:port` or `http://host:port` into a cleartext endpoint with
/// [`CONNECT_TIMEOUT`], for tools without TLS options. The port is required and a path is
/// refused. The error is a message for a person, for clap's `value_parser`.
pub fn parse(addr: &str) -> Result<Endpoint, String> {
    let endpoint = parse_url(addr)?;
    if endpoint.uri().scheme() == Some(&Scheme::HTTPS) {
        return Err(format!(
            "{addr}: only http:// is supported (this tool has no TLS options)"
        ));
    }
    Ok(endpoint)
}

/// Like [`parse`], but also accepts `https://host:port`, which must then be given a TLS
/// configuration (as [`crate::client`] does): tonic speaks TLS to it only with one.
pub fn parse_url(addr: &str) -> Result<Endpoint, String> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(url.clone()).map_err(|err| format!("{url}: {err}"))?;
    let uri = endpoint.uri();
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("{url}: only http:// and https:// are supported"));
    }
    if uri.port().is_none() || !matches!(uri.path(), "" | "/") {
        return Err(format!("{url}: expected host:port or http(s)://host:port"));
    }
    Ok(endpoint.connect_timeout(CONNECT_TIMEOUT))
}
