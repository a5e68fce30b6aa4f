//! The server address the command-line tools accept (`host:port`, `http://host:port`, and for
//! `kvstore-client` `https://host:port`), shared by `kvstore-client` and `kvstore-bench` so
//! both refuse the same mistakes; and the client side of TLS for `kvstore-client`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use http::Uri;
use http::uri::Scheme;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

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

/// Like [`parse`], but also accepts `https://host:port`, which [`with_tls`] must then
/// configure: tonic speaks TLS to an `https` address only with a TLS configuration.
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

/// What the client trusts and presents over TLS.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// PEM CA certificates to trust, instead of the built-in public roots.
    pub ca_cert: Option<PathBuf>,
    /// A PEM certificate and its private key to present, for servers that verify clients.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// `endpoint` over TLS: an `http://` address becomes `https://`, the server's certificate
/// must chain to `ca_cert` alone if it is given, otherwise to Mozilla's public roots (built
/// in: the client runs in container images without a system trust store), and must name the
/// address's host. Files that cannot be read or hold no PEM are errors naming the flag.
pub fn with_tls(endpoint: Endpoint, tls: &ClientTls) -> anyhow::Result<Endpoint> {
    let mut parts = endpoint.uri().clone().into_parts();
    parts.scheme = Some(Scheme::HTTPS);
    let uri = Uri::from_parts(parts).context("building the https:// address")?;

    let config = ClientTlsConfig::new();
    let config = match &tls.ca_cert {
        Some(path) => {
            let pem = read_pem("--ca-cert", path)?;
            if CertificateDer::pem_slice_iter(&pem).next().is_none() {
                anyhow::bail!(
                    "--ca-cert {}: no certificate in it (expected a PEM \"BEGIN CERTIFICATE\" block)",
                    path.display()
                );
            }
            config.ca_certificate(Certificate::from_pem(pem))
        }
        None => config.with_webpki_roots(),
    };
    let config = match &tls.identity {
        Some((cert, key)) => config.identity(Identity::from_pem(
            read_pem("--client-cert", cert)?,
            read_pem("--client-key", key)?,
        )),
        None => config,
    };
    Endpoint::from(uri)
        .connect_timeout(CONNECT_TIMEOUT)
        .tls_config(config)
        .map_err(|err| {
            let cause = std::error::Error::source(&err).map_or(err.to_string(), |e| e.to_string());
            anyhow::anyhow!("TLS settings cannot be used: {cause}")
        })
}

fn read_pem(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}: cannot read", path.display()))
}
