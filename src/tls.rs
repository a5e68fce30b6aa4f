//! TLS for the main listener: turns the `[tls]` files into a rustls acceptor (ring provider,
//! ALPN `h2` then `http/1.1`, optional client-certificate verification). Each failure names
//! the key and the file. The handshakes themselves run in `server.rs`, one per connection task.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

use crate::config::TlsSettings;

/// Offered in this order: gRPC clients pick `h2`, HTTP/1.1-only clients (curl without
/// `--http2`, load balancer probes) still share the port.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A `[tls]` setting that cannot be used: which key, and what is wrong with its file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} {problem}")]
pub struct TlsError {
    /// The dotted key, such as `tls.cert`.
    pub key: &'static str,
    /// What is wrong, naming the file.
    pub problem: String,
}

impl TlsError {
    fn new(key: &'static str, problem: impl Into<String>) -> Self {
        Self {
            key,
            problem: problem.into(),
        }
    }
}

/// The acceptor for `settings`, or `None` when TLS is off (`tls.cert` and `tls.key` empty).
/// With `tls.client_ca` set, every client must present a certificate issued by one of its
/// CAs; the handshake fails otherwise.
pub fn acceptor(settings: &TlsSettings) -> Result<Option<TlsAcceptor>, TlsError> {
    let [cert, key, client_ca] = [&settings.cert, &settings.key, &settings.client_ca]
        .map(|path| Some(path.as_path()).filter(|p| !p.as_os_str().is_empty()));
    let (cert, key) = match (cert, key) {
        (None, None) => {
            return match client_ca {
                Some(_) => Err(TlsError::new(
                    "tls.client_ca",
                    "needs tls.cert and tls.key: client certificates are checked only over TLS",
                )),
                None => Ok(None),
            };
        }
        (Some(cert), Some(key)) => (cert, key),
        // Name the key that is set: its origin is what the operator has to look at.
        (Some(_), None) => {
            return Err(TlsError::new(
                "tls.cert",
                "needs tls.key too (the certificate's private key)",
            ));
        }
        (None, Some(_)) => {
            return Err(TlsError::new(
                "tls.key",
                "needs tls.cert too (the certificate of this key)",
            ));
        }
    };

    let provider = Arc::new(ring::default_provider());
    let chain = certificates("tls.cert", cert)?;
    let private_key = private_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions");
    let builder = match client_ca {
        Some(path) => builder.with_client_cert_verifier(client_verifier(path, provider)?),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, private_key)
        .map_err(|err| match err {
            rustls::Error::InconsistentKeys(_) => TlsError::new(
                "tls.key",
                format!(
                    "{} does not match the certificate in tls.cert ({})",
                    key.display(),
                    cert.display()
                ),
            ),
            err => TlsError::new(
                "tls.cert",
                format!("{}: unusable certificate: {err}", cert.display()),
            ),
        })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path)
        .map_err(|err| TlsError::new(key, format!("cannot read {}: {err}", path.display())))
}

/// Every certificate in the PEM file, in order (leaf first for a chain).
fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| bad_pem(key, path, &err))?;
    if certs.is_empty() {
        return Err(TlsError::new(
            key,
            format!(
                "{}: no certificate in it (expected a PEM \"BEGIN CERTIFICATE\" block)",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("tls.key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|err| match err {
        pem::Error::NoItemsFound => TlsError::new(
            "tls.key",
            format!(
                "{}: no private key in it (expected a PEM PKCS#8, PKCS#1 or SEC1 key)",
                path.display()
            ),
        ),
        err => bad_pem("tls.key", path, &err),
    })
}

fn client_verifier(
    path: &Path,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates("tls.client_ca", path)? {
        roots.add(cert).map_err(|err| {
            TlsError::new(
                "tls.client_ca",
                format!("{}: unusable CA certificate: {err}", path.display()),
            )
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|err| {
            TlsError::new(
                "tls.client_ca",
                format!("{}: unusable CA bundle: {err}", path.display()),
            )
        })
}

fn bad_pem(key: &'static str, path: &Path, err: &pem::Error) -> TlsError {
    TlsError::new(key, format!("{}: not valid PEM: {err}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use rcgen::{CertificateParams, KeyPair};

    use super::*;

    /// A directory of PEM files for one test, removed on drop.
    struct Files(PathBuf);

    impl Files {
        fn new(test: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("kvstore-tls-unit-{}-{test}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let pair = |name: &str| {
                let key = KeyPair::generate().unwrap();
                let cert = CertificateParams::new(vec!["localhost".to_owned()])
                    .unwrap()
                    .self_signed(&key)
                    .unwrap();
                std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
                std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
            };
            pair("server");
            pair("other");
            std::fs::write(dir.join("empty.pem"), "").unwrap();
            Self(dir)
        }

        fn settings(&self, cert: &str, key: &str, client_ca: &str) -> TlsSettings {
            let path = |name: &str| match name {
                "" => PathBuf::new(),
                name => self.0.join(name),
            };
            TlsSettings {
                cert: path(cert),
                key: path(key),
                client_ca: path(client_ca),
            }
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn tls_is_off_without_files_and_on_with_a_matching_pair() {
        let files = Files::new("on");
        assert!(acceptor(&files.settings("", "", "")).unwrap().is_none());
        assert!(
            acceptor(&files.settings("server.pem", "server.key", ""))
                .unwrap()
                .is_some()
        );
        assert!(
            acceptor(&files.settings("server.pem", "server.key", "other.pem"))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn each_unusable_setting_is_named_with_its_file() {
        let files = Files::new("errors");
        let cases = [
            (("", "server.key", ""), "tls.key", "needs tls.cert"),
            (("server.pem", "", ""), "tls.cert", "needs tls.key"),
            (("", "", "other.pem"), "tls.client_ca", "needs tls.cert"),
            (
                ("missing.pem", "server.key", ""),
                "tls.cert",
                "missing.pem: ",
            ),
            (
                ("server.key", "server.key", ""),
                "tls.cert",
                "no certificate",
            ),
            (
                ("empty.pem", "server.key", ""),
                "tls.cert",
                "no certificate",
            ),
            (
                ("server.pem", "server.pem", ""),
                "tls.key",
                "no private key",
            ),
            (("server.pem", "other.key", ""), "tls.key", "does not match"),
            (
                ("server.pem", "server.key", "empty.pem"),
                "tls.client_ca",
                "no certificate",
            ),
        ];
        for ((cert, key, ca), named, problem) in cases {
            let Err(err) = acceptor(&files.settings(cert, key, ca)) else {
                panic!("{cert:?} {key:?} {ca:?} must be refused");
            };
            assert_eq!(err.key, named, "{err}");
            assert!(err.problem.contains(problem), "{err}");
            assert!(!err.to_string().contains('\n'), "{err}");
            let file = [cert, key, ca]
                .into_iter()
                .find(|f| err.problem.contains(*f) && !f.is_empty());
            assert!(
                file.is_some() || problem.starts_with("needs"),
                "names the file: {err}"
            );
        }
    }
}
