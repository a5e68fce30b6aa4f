//! The `authorization` header through the real authentication middleware
//! (`auth::authenticate`): exactly `Bearer <token>` (scheme in any case, blanks around the
//! token) of a configured token is let in, with its role; anything else gets 401 or
//! UNAUTHENTICATED with a fixed message; health checks are always open; the header never
//! reaches the handler.

#![no_main]

use std::sync::LazyLock;

use arbitrary::Arbitrary;
use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use kvstore::auth::{Auth, Keyring, authenticate, hash_token};
use kvstore::config::{Role, Settings, TokenSpec};
use libfuzzer_sys::{Corpus, fuzz_target};
use tower::ServiceExt;

#[derive(Debug, Arbitrary)]
struct Input {
    header: Option<Vec<u8>>,
    path: Path,
    grpc: bool,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Path {
    Get,
    Set,
    HealthCheck,
    HealthLive,
    Metrics,
    Other,
}

impl Path {
    fn as_str(self) -> &'static str {
        match self {
            Path::Get => "/kvstore.KeyValueStore/Get",
            Path::Set => "/kvstore.KeyValueStore/Set",
            Path::HealthCheck => "/grpc.health.v1.Health/Check",
            Path::HealthLive => "/health/live",
            Path::Metrics => "/metrics",
            Path::Other => "/other",
        }
    }
}

const TOKENS: [(&str, Role); 2] = [
    ("reader-token", Role::Read),
    ("writer-token", Role::ReadWrite),
];

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
});

static APP: LazyLock<Router> = LazyLock::new(|| {
    let mut settings = Settings::default().auth;
    settings.enabled = true;
    settings.tokens = TOKENS
        .iter()
        .map(|(token, role)| TokenSpec {
            sha256: hash_token(token).unwrap(),
            role: *role,
            name: String::new(),
        })
        .collect();
    let keyring = Keyring::load(&settings).unwrap();
    let auth = Auth::new(&settings, keyring, None).expect("auth is enabled");
    Router::new()
        .fallback(|request: Request| async move {
            assert!(request.headers().get(header::AUTHORIZATION).is_none());
            "served"
        })
        .layer(axum::middleware::from_fn_with_state(auth, authenticate))
});

const MESSAGES: [&str; 3] = [
    "missing bearer token: send the header `authorization: Bearer <token>` (auth.enabled is true)",
    "the authorization header must be `Bearer <token>` (auth.enabled is true)",
    "the bearer token is not one of auth.tokens or auth.token_file",
];

fuzz_target!(|input: Input| -> Corpus {
    let mut request = Request::post(input.path.as_str());
    if input.grpc {
        request = request.header(header::CONTENT_TYPE, "application/grpc");
    }
    if let Some(bytes) = &input.header {
        let Ok(value) = HeaderValue::from_bytes(bytes) else {
            return Corpus::Reject;
        };
        request = request.header(header::AUTHORIZATION, value);
    }
    let request = request.body(Body::empty()).unwrap();
    let response = RUNTIME.block_on(APP.clone().oneshot(request)).unwrap();
    let status = response.status();
    let grpc_status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = RUNTIME
        .block_on(axum::body::to_bytes(response.into_body(), 1 << 16))
        .unwrap();

    let open = matches!(input.path, Path::HealthCheck | Path::HealthLive);
    let role = input.header.as_deref().and_then(model_token);
    let expected = match (open, role) {
        (true, _) => Outcome::Served,
        (false, Some(Role::Read)) if matches!(input.path, Path::Set) => Outcome::Forbidden,
        (false, Some(_)) => Outcome::Served,
        (false, None) => Outcome::Unauthenticated,
    };
    match (expected, input.grpc) {
        (Outcome::Served, _) => {
            assert_eq!((status, &body[..]), (StatusCode::OK, &b"served"[..]));
        }
        (Outcome::Forbidden, true) => assert_eq!(grpc_status.as_deref(), Some("7")),
        (Outcome::Forbidden, false) => assert_eq!(status, StatusCode::FORBIDDEN),
        (Outcome::Unauthenticated, true) => {
            assert_eq!(grpc_status.as_deref(), Some("16"));
        }
        (Outcome::Unauthenticated, false) => {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let message = body["error"].as_str().unwrap();
            assert!(MESSAGES.contains(&message), "{message:?}");
        }
    }
    Corpus::Keep
});

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Served,
    Forbidden,
    Unauthenticated,
}

/// The role of the header's token, stated as a grammar: `bearer` in any case, one space,
/// then a configured token with only blanks around it.
fn model_token(header: &[u8]) -> Option<Role> {
    let text = std::str::from_utf8(header).ok()?;
    if !text
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return None;
    }
    let scheme = text.get(..7)?;
    if !scheme.eq_ignore_ascii_case("bearer ") {
        return None;
    }
    let token = text[7..].trim_matches([' ', '\t']);
    TOKENS
        .iter()
        .find(|(known, _)| *known == token)
        .map(|(_, role)| *role)
}
