//! What keeps a web page away from the data, with or without authentication: gRPC is served
//! only over HTTP/2 with a gRPC content type ([`GrpcOnly`], which a page cannot send
//! cross-site), and the HTTP routes that read data check the `Host` a request names against
//! DNS rebinding ([`AllowedHosts`], `server.allowed_hosts`). Health checks are exempt.

use std::convert::Infallible;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use axum::http::{HeaderValue, StatusCode, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use pin_project_lite::pin_project;
use serde_json::json;
use tower::{Layer, Service};
use tracing::debug;

use crate::metrics::{LimitKey, Metrics};
use crate::telemetry::Escaped;

/// The host names `server.allowed_hosts` lets through, besides IP addresses and loopback
/// names, which always pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    /// `*`: every name passes, the check is off.
    any: bool,
    /// Exact names, lowercase, without a trailing dot.
    names: Vec<String>,
    /// Domains given as `.example.org` (or `*.example.org`): the name and every name under it.
    domains: Vec<String>,
}

impl AllowedHosts {
    /// Parses `server.allowed_hosts`; the error says which entry is wrong and why.
    pub fn new(entries: &[String]) -> Result<Self, String> {
        let mut hosts = Self::default();
        for entry in entries {
            let lower = entry.trim().to_ascii_lowercase();
            if lower == "*" {
                hosts.any = true;
                continue;
            }
            let (domain, name) = match lower.strip_prefix("*.").or(lower.strip_prefix('.')) {
                Some(name) => (true, name),
                None => (false, lower.as_str()),
            };
            let name = name.strip_suffix('.').unwrap_or(name);
            let valid = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !valid {
                return Err(format!(
                    "entry {entry:?} must be a host name (\"kvstore-1\"), a domain and the names \
                     under it (\".example.org\"), or \"*\"; without a port, since a request's \
                     port is not checked"
                ));
            }
            if domain {
                hosts.domains.push(name.to_owned());
            } else {
                hosts.names.push(name.to_owned());
            }
        }
        Ok(hosts)
    }

    /// Whether a request naming `host` (a `Host` value or an HTTP/2 `:authority`, with or
    /// without a port) may read data: an IP address, `localhost` or a name under
    /// `.localhost` always may (a page naming one was loaded from it, not rebound to it), an
    /// allowed name may, nothing else.
    pub fn allows(&self, host: &str) -> bool {
        let Some(name) = host_name(host) else {
            return false;
        };
        if let Some(ipv6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
            return ipv6.parse::<Ipv6Addr>().is_ok();
        }
        if self.any || name.parse::<Ipv4Addr>().is_ok() {
            return true;
        }
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        let under = |domain: &str| {
            name == domain
                || name
                    .strip_suffix(domain)
                    .is_some_and(|rest| rest.ends_with('.'))
        };
        under("localhost")
            || self.names.contains(&name)
            || self.domains.iter().any(|domain| under(domain))
    }
}

/// The host part of a `Host` value: without its port, an IPv6 address keeping its brackets;
/// `None` if it is empty or its port is not a number.
fn host_name(host: &str) -> Option<&str> {
    let end = match host.strip_prefix('[') {
        Some(rest) => rest.find(']')? + 2,
        None => host.find(':').unwrap_or(host.len()),
    };
    let (name, port) = host.split_at(end);
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    (port_ok && !name.is_empty()).then_some(name)
}

/// What the host check needs: the allowed names, and where to count refusals.
#[derive(Clone)]
struct HostCheck {
    allowed: Arc<AllowedHosts>,
    metrics: Arc<Metrics>,
}

/// `routes` with every request checked against DNS rebinding: one whose `Host` (and, over
/// HTTP/2 or in absolute form, its URI's authority) is not allowed gets 403 naming
/// `server.allowed_hosts`, counted in the metrics. A request naming no host at all (HTTP/1.0)
/// passes: every browser names one.
pub fn check_host(routes: Router, allowed: AllowedHosts, metrics: Arc<Metrics>) -> Router {
    let check = HostCheck {
        allowed: Arc::new(allowed),
        metrics,
    };
    routes.layer(axum::middleware::from_fn_with_state(check, host_checked))
}

async fn host_checked(State(check): State<HostCheck>, request: Request, next: Next) -> Response {
    let authority = request.uri().authority().map(|a| a.as_str().as_bytes());
    let hosts = request
        .headers()
        .get_all(HOST)
        .iter()
        .map(HeaderValue::as_bytes);
    let refused = authority
        .into_iter()
        .chain(hosts)
        .find(|host| !std::str::from_utf8(host).is_ok_and(|host| check.allowed.allows(host)));
    let Some(refused) = refused else {
        return next.run(request).await;
    };
    check.metrics.refused(LimitKey::AllowedHosts);
    let host = String::from_utf8_lossy(refused);
    debug!(host = %Escaped(&host), path = %Escaped(request.uri().path()), "refused: Host not in server.allowed_hosts");
    let message = format!(
        "Host {:?} is not allowed to read data here: only IP addresses, localhost and the names \
         in server.allowed_hosts are (a guard against DNS rebinding)",
        host.chars().take(253).collect::<String>()
    );
    (
        StatusCode::FORBIDDEN,
        axum::Json(json!({ "error": message })),
    )
        .into_response()
}

/// Whether `value` is a gRPC content type: `application/grpc`, alone or followed by a codec
/// (`+proto`) or parameters (`;...`), in any case. `application/grpc-web` is not: this server
/// does not speak it.
fn is_grpc_content_type(value: &[u8]) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    value.len() >= GRPC.len()
        && value[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(value.get(GRPC.len()), None | Some(b'+' | b';'))
}

/// The layer in front of the gRPC services: a request over HTTP/1.x gets 426 (gRPC needs
/// HTTP/2; a browser speaks cleartext only as HTTP/1.1), an HTTP/2 request without a gRPC
/// content type 415 (a page cannot send one cross-site without a CORS preflight, which this
/// server never grants). Both in plain text naming the reason, before the request is
/// counted as a call or its body read. As a [`Layer`], it guards a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcOnly;

impl<S> Layer<S> for GrpcOnly {
    type Service = GrpcOnlyService<S>;

    fn layer(&self, inner: S) -> GrpcOnlyService<S> {
        GrpcOnlyService { inner }
    }
}

/// A gRPC service behind [`GrpcOnly`].
#[derive(Debug, Clone)]
pub struct GrpcOnlyService<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for GrpcOnlyService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>, Error = Infallible>,
    RB: From<Body>,
{
    type Response = http::Response<RB>;
    type Error = Infallible;
    type Future = GrpcOnlyFuture<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let refusal = if request.version() < Version::HTTP_2 {
            Some(needs_http2())
        } else if !request
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|v| is_grpc_content_type(v.as_bytes()))
        {
            Some(needs_grpc_content_type())
        } else {
            None
        };
        match refusal {
            None => GrpcOnlyFuture {
                state: Gate::Passed {
                    call: self.inner.call(request),
                },
            },
            Some(response) => {
                debug!(version = ?request.version(), path = %Escaped(request.uri().path()), status = response.status().as_u16(), "refused: not a gRPC request");
                GrpcOnlyFuture {
                    state: Gate::Refused {
                        response: Some(response.map(RB::from)),
                    },
                }
            }
        }
    }
}

fn needs_http2() -> http::Response<Body> {
    let message = "gRPC needs HTTP/2: use a gRPC client (HTTP/2 with prior knowledge on a \
                   cleartext port, ALPN h2 over TLS). HTTP/1.1 is refused here because it is \
                   all a web browser speaks in cleartext.\n";
    let mut response = (StatusCode::UPGRADE_REQUIRED, message).into_response();
    let headers = response.headers_mut();
    // RFC 9110 §15.5.22: a 426 names the protocol to upgrade to, and Upgrade is listed in
    // Connection.
    headers.insert(UPGRADE, HeaderValue::from_static("HTTP/2.0"));
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    response
}

fn needs_grpc_content_type() -> http::Response<Body> {
    let message = "gRPC requests need content-type application/grpc (or application/grpc+proto): \
                   other content types are refused here because a web page can send them \
                   cross-site.\n";
    (StatusCode::UNSUPPORTED_MEDIA_TYPE, message).into_response()
}

pin_project! {
    /// The response future of [`GrpcOnlyService`].
    pub struct GrpcOnlyFuture<F, RB> {
        #[pin]
        state: Gate<F, RB>,
    }
}

pin_project! {
    #[project = GateProj]
    enum Gate<F, RB> {
        // Refused; the answer, until it is returned.
        Refused { response: Option<http::Response<RB>> },
        // A gRPC request, being served.
        Passed {
            #[pin]
            call: F,
        },
    }
}

impl<F, RB> Future for GrpcOnlyFuture<F, RB>
where
    F: Future<Output = Result<http::Response<RB>, Infallible>>,
{
    type Output = Result<http::Response<RB>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            GateProj::Refused { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            GateProj::Passed { call } => call.poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types_are_told_from_the_rest() {
        for yes in [
            "application/grpc",
            "application/grpc+proto",
            "APPLICATION/GRPC",
            "application/grpc; charset=utf-8",
        ] {
            assert!(is_grpc_content_type(yes.as_bytes()), "{yes}");
        }
        for no in [
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/grpcx",
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "",
        ] {
            assert!(!is_grpc_content_type(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn host_names_are_parsed_with_and_without_ports() {
        assert_eq!(host_name("a"), Some("a"));
        assert_eq!(host_name("a:80"), Some("a"));
        assert_eq!(host_name("[::1]"), Some("[::1]"));
        assert_eq!(host_name("[::1]:80"), Some("[::1]"));
        for bad in ["a:", "a:x", "a:1:2", "::1", "[::1", "[::1]x", "[::1]:", ""] {
            assert_eq!(host_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn entries_are_names_domains_or_a_star() {
        let hosts = AllowedHosts::new(&[
            "Kvstore-1".into(),
            "*.svc.cluster.local".into(),
            ".example.org.".into(),
        ])
        .unwrap();
        assert_eq!(hosts.names, ["kvstore-1"]);
        assert_eq!(hosts.domains, ["svc.cluster.local", "example.org"]);
        assert!(hosts.allows("kvstore.default.svc.cluster.local:50051"));
        assert!(!hosts.allows("evilsvc.cluster.local"));
        assert!(!hosts.allows("rebind.example"));
        assert!(
            AllowedHosts::new(&["*".into()])
                .unwrap()
                .allows("rebind.example")
        );
        assert!(!AllowedHosts::default().allows("[::1]x"));
        assert!(!AllowedHosts::default().allows("[kvstore]"));
        for bad in [
            "kvstore-1:8080",
            "",
            ".",
            "a..b",
            "http://a",
            "a b",
            "[::1]",
        ] {
            let err = AllowedHosts::new(&[bad.into()]).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }
}
