//! Bearer-token authentication: the tokens (SHA-256 digests from `auth.tokens` and
//! `auth.token_file`, compared in constant time), which path needs which role, and the
//! refusals in gRPC and HTTP form. Also the tools' side: adding the token to each call.
//! Rate limits are `rate_limit`'s; the per-op check of a Batch is `grpc`'s, with [`Caller`].

use std::path::Path;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;
use tracing::{debug, info, warn};

use crate::caller::Caller;
use crate::config::{AuthSettings, Role};
use crate::http::{grpc_error, grpc_method, is_grpc, is_health_check};
use crate::pb;
use crate::rate_limit::RateLimit;
use crate::token::check_token_text;

const KV_SERVICE: &str = pb::key_value_store_server::SERVICE_NAME;
const REFLECTION_SERVICES: [&str; 2] = [
    tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME,
    tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME,
];
const METRICS_PATH: &str = "/metrics";

/// The configured tokens, by digest.
#[derive(Debug, Default)]
pub struct Keyring {
    tokens: Vec<Token>,
}

#[derive(Debug)]
struct Token {
    digest: [u8; 32],
    role: Role,
    name: Arc<str>,
}

/// A token configuration that cannot be used: the key to name, and what is wrong. It never
/// quotes a token file's fields, since a misplaced token may be among them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} {problem}")]
pub struct KeyringError {
    /// `auth.tokens` or `auth.token_file`.
    pub key: &'static str,
    /// What is wrong, and where.
    pub problem: String,
}

impl Keyring {
    /// Reads `auth.tokens` and the file `auth.token_file` names, if any. Two entries with
    /// the same digest are refused: one token cannot have two roles.
    pub fn load(settings: &AuthSettings) -> Result<Self, KeyringError> {
        let mut keyring = Self::default();
        for (i, spec) in settings.tokens.iter().enumerate() {
            let fail = |problem: String| KeyringError {
                key: "auth.tokens",
                problem: format!("entry {}: {problem}", i + 1),
            };
            let digest = parse_digest(&spec.sha256)
                .ok_or_else(|| fail(format!("sha256 {}", NOT_A_DIGEST)))?;
            keyring.add(digest, spec.role, &spec.name).map_err(fail)?;
        }
        if !settings.token_file.as_os_str().is_empty() {
            keyring.load_file(&settings.token_file)?;
        }
        Ok(keyring)
    }

    /// Reads the token file at `path`.
    fn load_file(&mut self, path: &Path) -> Result<(), KeyringError> {
        let fail = |problem: String| KeyringError {
            key: "auth.token_file",
            problem,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|err| fail(format!("cannot read {}: {err}", path.display())))?;
        self.add_file_text(path, &text)
    }

    /// Adds the tokens of a token file's `text`, one `ROLE SHA256 [NAME]` a line, `#`
    /// starting a comment; `path` names the file in errors. An error names the line but
    /// never quotes its fields.
    pub fn add_file_text(&mut self, path: &Path, text: &str) -> Result<(), KeyringError> {
        let fail = |problem: String| KeyringError {
            key: "auth.token_file",
            problem,
        };
        for (n, line) in text.lines().enumerate() {
            let at = |problem: &str| fail(format!("{}:{}: {problem}", path.display(), n + 1));
            let content = line.split('#').next().unwrap_or_default();
            let fields: Vec<&str> = content.split_whitespace().collect();
            let (role, digest, name) = match fields.as_slice() {
                [] => continue,
                [role, digest] => (role, digest, ""),
                [role, digest, name] => (role, digest, *name),
                _ => {
                    return Err(at(&format!(
                        "expected `ROLE SHA256 [NAME]`, found {} fields",
                        fields.len()
                    )));
                }
            };
            let role = match *role {
                "read" => Role::Read,
                "readwrite" => Role::ReadWrite,
                _ => return Err(at("the role (first field) must be read or readwrite")),
            };
            let digest = parse_digest(digest)
                .ok_or_else(|| at(&format!("the second field {NOT_A_DIGEST}")))?;
            self.add(digest, role, name)
                .map_err(|problem| at(&problem))?;
        }
        Ok(())
    }

    fn add(&mut self, digest: [u8; 32], role: Role, name: &str) -> Result<(), String> {
        if let Some(other) = self.tokens.iter().find(|t| t.digest == digest) {
            return Err(format!(
                "repeats the digest of token \"{}\"; each token has one role",
                other.name
            ));
        }
        let name = if name.is_empty() {
            format!("sha256:{}", &hex(&digest)[..8])
        } else {
            name.to_owned()
        };
        self.tokens.push(Token {
            digest,
            role,
            name: name.into(),
        });
        Ok(())
    }

    /// The number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no token is configured.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The caller a presented token belongs to. Every configured digest is compared, in
    /// constant time, whether or not an earlier one matched.
    fn identify(&self, presented: &str) -> Option<Caller> {
        let digest = Sha256::digest(presented.as_bytes());
        let mut found = None;
        for (index, token) in self.tokens.iter().enumerate() {
            if bool::from(token.digest[..].ct_eq(&digest[..])) {
                found = Some(index);
            }
        }
        found.map(|index| {
            let token = &self.tokens[index];
            Caller {
                index,
                name: token.name.clone(),
                role: token.role,
            }
        })
    }
}

const NOT_A_DIGEST: &str = "must be a SHA-256 digest (64 hex digits), not the token itself: \
                            `kvstore-server hash-token` prints it";

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let text = text.as_bytes();
    if text.len() != 64 {
        return None;
    }
    let mut digest = [0; 32];
    for (byte, pair) in digest.iter_mut().zip(text.chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(digest)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of a token as `auth.tokens` and `auth.token_file` want it, or why the text
/// cannot be a bearer token (empty, or not printable ASCII without spaces).
pub fn hash_token(token: &str) -> Result<String, String> {
    check_token_text(token)?;
    Ok(hex(&Sha256::digest(token.as_bytes())))
}

/// The authentication layer's state: the keyring, and which optional services it guards.
#[derive(Clone)]
pub struct Auth(Arc<AuthInner>);

struct AuthInner {
    keyring: Keyring,
    protect_reflection: bool,
    protect_metrics: bool,
    /// Charged for each request refused for its token, by address: the rate limit layer,
    /// inside this one, sees only the requests let through.
    rate_limit: Option<RateLimit>,
}

impl Auth {
    /// Authentication with `keyring`, or `None` when `auth.enabled` is false. Requests
    /// refused for their token (none, or an unknown one) take from their address's bucket of
    /// `rate_limit`, so past its rate a flood of bad tokens gets the rate limit's refusal
    /// instead.
    pub fn new(
        settings: &AuthSettings,
        keyring: Keyring,
        rate_limit: Option<RateLimit>,
    ) -> Option<Self> {
        if !settings.enabled {
            if !keyring.is_empty() {
                warn!(
                    tokens = keyring.len(),
                    "authentication is off (auth.enabled = false) although tokens are configured"
                );
            }
            return None;
        }
        info!(
            tokens = keyring.len(),
            protect_reflection = settings.protect_reflection,
            protect_metrics = settings.protect_metrics,
            "authentication on: calls need a bearer token"
        );
        Some(Self(Arc::new(AuthInner {
            keyring,
            protect_reflection: settings.protect_reflection,
            protect_metrics: settings.protect_metrics,
            rate_limit,
        })))
    }

    /// The role `path` needs, or `None` if it is open. Unknown paths need a token too, so a
    /// route added later is closed until it is listed here.
    fn needs(&self, path: &str) -> Option<Role> {
        if is_health_check(path) {
            return None;
        }
        if let Some(method) = grpc_method(path, KV_SERVICE) {
            return Some(match method {
                // A Batch that writes is refused by the service, which sees its ops.
                "Get" | "List" | "Subscribe" | "Batch" => Role::Read,
                _ => Role::ReadWrite,
            });
        }
        let open = if REFLECTION_SERVICES
            .iter()
            .any(|service| grpc_method(path, service).is_some())
        {
            !self.0.protect_reflection
        } else if path == METRICS_PATH {
            !self.0.protect_metrics
        } else {
            false
        };
        (!open).then_some(Role::Read)
    }
}

/// Logs, loudly, that anyone who can reach a non-loopback listener can read and write.
pub fn warn_if_exposed(settings: &AuthSettings, listen: std::net::SocketAddr) {
    if !settings.enabled && !listen.ip().is_loopback() {
        warn!(
            listen = %listen,
            "AUTHENTICATION IS OFF (auth.enabled = false) and the main listener is not on \
             loopback: anyone who can reach it can read and change every key"
        );
    }
}

/// The middleware function, for `axum::middleware::from_fn_with_state(auth, authenticate)`
/// on the whole router. The `authorization` header is removed before anything else sees
/// the request, so no trace, handler or error can log it.
pub async fn authenticate(State(auth): State<Auth>, mut request: Request, next: Next) -> Response {
    let presented = request.headers_mut().remove(header::AUTHORIZATION);
    let Some(needed) = auth.needs(request.uri().path()) else {
        return next.run(request).await;
    };
    let caller = match bearer(presented.as_ref()) {
        Ok(token) => auth
            .0
            .keyring
            .identify(token)
            .ok_or(TokenRefusal::UnknownToken),
        Err(refusal) => Err(refusal),
    };
    let caller = match caller {
        Ok(caller) => caller,
        Err(refusal) => {
            debug!(
                path = request.uri().path(),
                reason = refusal.message(),
                "refused: unauthenticated"
            );
            if let Some(limit) = &auth.0.rate_limit
                && let Some(over_rate) = limit.over_rate_unauthenticated(&request)
            {
                return over_rate;
            }
            return refusal.respond(is_grpc(&request));
        }
    };
    let path = request.uri().path();
    if let Err(status) = caller.require(needed, path) {
        debug!(path, caller = %caller.name, "refused: permission denied");
        return forbidden(status, is_grpc(&request));
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// The token of an `authorization: Bearer <token>` header. The scheme is case-insensitive
/// (RFC 9110); the token is not.
fn bearer(header: Option<&HeaderValue>) -> Result<&str, TokenRefusal> {
    let header = header.ok_or(TokenRefusal::Missing)?;
    let value = header.to_str().map_err(|_| TokenRefusal::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(TokenRefusal::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenRefusal::Malformed);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(TokenRefusal::Malformed);
    }
    Ok(token)
}

/// Why a request is unauthenticated. The messages never quote what was presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenRefusal {
    Missing,
    Malformed,
    UnknownToken,
}

impl TokenRefusal {
    fn message(self) -> &'static str {
        match self {
            Self::Missing => {
                "missing bearer token: send the header `authorization: Bearer <token>` (auth.enabled is true)"
            }
            Self::Malformed => {
                "the authorization header must be `Bearer <token>` (auth.enabled is true)"
            }
            Self::UnknownToken => "the bearer token is not one of auth.tokens or auth.token_file",
        }
    }

    fn respond(self, grpc: bool) -> Response {
        if grpc {
            return grpc_error(Status::unauthenticated(self.message()));
        }
        // RFC 6750: a missing token gets the bare challenge, a bad one says so.
        let challenge = match self {
            Self::Missing => r#"Bearer realm="kvstore""#,
            Self::Malformed => r#"Bearer realm="kvstore", error="invalid_request""#,
            Self::UnknownToken => r#"Bearer realm="kvstore", error="invalid_token""#,
        };
        let body = Json(json!({ "error": self.message() }));
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, challenge)],
            body,
        )
            .into_response()
    }
}

fn forbidden(status: Status, grpc: bool) -> Response {
    if grpc {
        return grpc_error(status);
    }
    let body = Json(json!({ "error": status.message() }));
    (StatusCode::FORBIDDEN, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Settings, TokenSpec};

    fn settings(tokens: &[(&str, Role, &str)]) -> AuthSettings {
        let mut settings = Settings::default().auth;
        settings.enabled = true;
        settings.tokens = tokens
            .iter()
            .map(|(token, role, name)| TokenSpec {
                sha256: hash_token(token).unwrap(),
                role: *role,
                name: (*name).into(),
            })
            .collect();
        settings
    }

    #[test]
    fn a_token_is_known_by_its_sha256() {
        // The digest `printf %s hunter2 | sha256sum` prints.
        assert_eq!(
            hash_token("hunter2").unwrap(),
            "f52fbd32b2b3b86ff88ef6c490628285f482af15ddcb29541f94bcf526a3f6c7"
        );
        assert!(hash_token("").is_err());
        assert!(hash_token("two words").is_err());
        assert!(hash_token("caf\u{e9}").is_err());
    }

    #[test]
    fn presented_tokens_find_their_own_entry_and_role() {
        let keyring = Keyring::load(&settings(&[
            ("r-token", Role::Read, "reader"),
            ("w-token", Role::ReadWrite, ""),
        ]))
        .unwrap();
        let reader = keyring.identify("r-token").unwrap();
        assert_eq!(
            (reader.index, &*reader.name, reader.role),
            (0, "reader", Role::Read)
        );
        let writer = keyring.identify("w-token").unwrap();
        assert_eq!(writer.role, Role::ReadWrite);
        let digest = hash_token("w-token").unwrap();
        assert_eq!(*writer.name, format!("sha256:{}", &digest[..8]));
        assert_eq!(keyring.identify("r-token "), None);
        assert_eq!(keyring.identify("R-TOKEN"), None);
    }

    #[test]
    fn uppercase_digests_are_accepted_and_repeats_refused() {
        let mut s = settings(&[("a", Role::Read, "")]);
        s.tokens[0].sha256 = s.tokens[0].sha256.to_uppercase();
        assert!(Keyring::load(&s).unwrap().identify("a").is_some());
        let mut twice = settings(&[("a", Role::Read, "one"), ("a", Role::ReadWrite, "two")]);
        let err = Keyring::load(&twice).unwrap_err();
        assert_eq!(err.key, "auth.tokens");
        assert!(err.problem.contains("entry 2"), "{err}");
        twice.tokens[1].sha256 = "hunter2".into();
        let err = Keyring::load(&twice).unwrap_err();
        assert!(err.problem.contains("64 hex digits"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn each_path_needs_its_role() {
        let one = settings(&[("a", Role::Read, "")]);
        let auth = Auth::new(&one, Keyring::load(&one).unwrap(), None).unwrap();
        let cases = [
            ("/kvstore.KeyValueStore/Get", Some(Role::Read)),
            ("/kvstore.KeyValueStore/List", Some(Role::Read)),
            ("/kvstore.KeyValueStore/Subscribe", Some(Role::Read)),
            ("/kvstore.KeyValueStore/Batch", Some(Role::Read)),
            ("/kvstore.KeyValueStore/Set", Some(Role::ReadWrite)),
            ("/kvstore.KeyValueStore/Delete", Some(Role::ReadWrite)),
            ("/kvstore.KeyValueStore/Compact", Some(Role::ReadWrite)),
            ("/grpc.health.v1.Health/Check", None),
            ("/grpc.health.v1.Health/Watch", None),
            ("/health/live", None),
            ("/health/ready", None),
            ("/health/liveness", Some(Role::Read)),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Some(Role::Read),
            ),
            (
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                Some(Role::Read),
            ),
            ("/metrics", Some(Role::Read)),
            ("/nope", Some(Role::Read)),
            ("/kvstore.KeyValueStoreX/Get", Some(Role::Read)),
        ];
        for (path, needed) in cases {
            assert_eq!(auth.needs(path), needed, "{path}");
        }
        let mut open = settings(&[("a", Role::Read, "")]);
        open.protect_reflection = false;
        open.protect_metrics = false;
        let auth = Auth::new(&open, Keyring::load(&open).unwrap(), None).unwrap();
        assert_eq!(auth.needs("/metrics"), None);
        assert_eq!(
            auth.needs("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            None
        );
    }

    #[test]
    fn only_a_bearer_header_carries_a_token() {
        let value = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(bearer(Some(&value("Bearer abc"))), Ok("abc"));
        assert_eq!(bearer(Some(&value("bearer  abc "))), Ok("abc"));
        assert_eq!(bearer(None), Err(TokenRefusal::Missing));
        for bad in ["Basic abc", "Bearer", "Bearer ", "abc"] {
            assert_eq!(
                bearer(Some(&value(bad))),
                Err(TokenRefusal::Malformed),
                "{bad}"
            );
        }
    }
}
