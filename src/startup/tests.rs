//! The configuration from its layers to what the server runs with: each layer, each check,
//! and each error, one line naming the key and where its value came from.
// figment::Jail's closures return figment::Error, which is large; that is its API.
#![allow(clippy::result_large_err)]

use super::*;
use crate::config::*;
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::{Figment, Jail};

/// The configuration as the binary takes it: loaded, then built.
fn load_in(jail: &Jail, flags: Flags) -> Result<Startup, ConfigError> {
    let _ = jail;
    load(&flags).and_then(Startup::build)
}

fn error_in(jail: &Jail, flags: Flags) -> String {
    load_in(jail, flags).unwrap_err().to_string()
}

#[test]
fn the_documented_config_file_states_exactly_the_defaults() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/kvstore.toml");
    let documented: Settings = Figment::from(Toml::file_exact(path)).extract().unwrap();
    assert_eq!(documented, Settings::default());
    // And it passes the checks, as any file kvstore-server accepts.
    let text = std::fs::read_to_string(path).unwrap();
    assert_eq!(from_toml(&text).unwrap().settings, Settings::default());
}

#[test]
fn config_text_is_checked_like_a_config_file() {
    let printed = Settings::default().to_toml();
    assert_eq!(from_toml(&printed).unwrap().settings, Settings::default());
    let message = from_toml("[subscriptions]\nbuffer = 0\n")
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with("configuration error: subscriptions.buffer must be at least 1"),
        "{message}"
    );
    let message = from_toml("[server\n").unwrap_err().to_string();
    assert!(!message.contains('\n'), "{message}");
}

#[test]
fn printed_config_parses_back_to_the_same_settings() {
    let mut settings = Settings::default();
    settings.server.health_listen = None;
    settings.shutdown.drain_delay = Duration::from_millis(250);
    settings.auth.tokens.push(TokenSpec {
        sha256: "ab".repeat(32),
        role: Role::ReadWrite,
        name: "ci".into(),
    });
    settings.auth.token_file = "tokens.txt".into();
    let parsed: Settings = Figment::from(Toml::string(&settings.to_toml()))
        .extract()
        .unwrap();
    assert_eq!(parsed, settings);
}

#[test]
fn each_layer_overrides_the_one_before() {
    Jail::expect_with(|jail| {
        // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
        jail.clear_env();
        jail.create_file(
            "kv.toml",
            "[server]\nlisten = \"127.0.0.1:1000\"\nhealth_listen = \"127.0.0.1:2000\"\n\
             [log]\nlevel = \"debug\"\nformat = \"text\"\n[subscriptions]\nbuffer = 7\n",
        )?;
        let file = Flags {
            config: Some("kv.toml".into()),
            ..Flags::default()
        };
        let s = load_in(jail, file.clone()).unwrap().settings;
        assert_eq!(s.server.listen, "127.0.0.1:1000".parse().unwrap());
        assert_eq!(s.subscriptions.buffer, 7);
        assert_eq!(s.log.format, LogFormat::Text);
        assert_eq!(s.limits, Settings::default().limits);

        jail.set_env("KVSTORE_SERVER__LISTEN", "127.0.0.1:1001");
        jail.set_env("KVSTORE_SUBSCRIPTIONS__BUFFER", "8");
        jail.set_env("KVSTORE_SUBSCRIPTIONS__MAX_PER_CLIENT", "5");
        jail.set_env("KVSTORE_SHUTDOWN__DRAIN_DELAY", "250ms");
        let s = load_in(jail, file.clone()).unwrap().settings;
        assert_eq!(s.server.listen, "127.0.0.1:1001".parse().unwrap());
        assert_eq!(s.subscriptions.buffer, 8);
        assert_eq!(s.subscriptions.per_client(), 5);
        assert_eq!(s.shutdown.drain_delay, Duration::from_millis(250));

        jail.set_env("GRPC_PORT", "1002");
        jail.set_env("HTTP_PORT", "2002");
        let s = load_in(jail, file.clone()).unwrap().settings;
        assert_eq!(s.server.listen, "127.0.0.1:1002".parse().unwrap());
        assert_eq!(
            s.server.health_listen,
            Some("127.0.0.1:2002".parse().unwrap())
        );

        let flags = Flags {
            listen: Some("127.0.0.1:1003".into()),
            health_listen: Some(String::new()),
            log_level: Some("warn".into()),
            log_format: Some("json".into()),
            ..file
        };
        let s = load_in(jail, flags).unwrap().settings;
        assert_eq!(s.server.listen, "127.0.0.1:1003".parse().unwrap());
        assert_eq!(s.server.health_listen, None);
        assert_eq!(s.log.level, "warn");
        assert_eq!(s.log.format, LogFormat::Json);
        Ok(())
    });
}

#[test]
fn the_per_client_share_of_subscriptions_follows_max_unless_set() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        let s = load_in(jail, Flags::default()).unwrap().settings;
        assert_eq!(s.subscriptions.per_client(), 1000);
        jail.set_env("KVSTORE_SUBSCRIPTIONS__MAX", "5");
        let loaded = load_in(jail, Flags::default()).unwrap();
        assert_eq!(
            loaded.settings.subscriptions.per_client(),
            1,
            "at least one"
        );
        jail.set_env("KVSTORE_SUBSCRIPTIONS__MAX_PER_CLIENT", "5");
        let loaded = load_in(jail, Flags::default()).unwrap();
        assert!(loaded.ignored_env.is_empty(), "{:?}", loaded.ignored_env);
        assert_eq!(loaded.settings.subscriptions.per_client(), 5);
        Ok(())
    });
}

#[test]
fn the_per_address_cap_follows_max_connections_unless_set() {
    Jail::expect_with(|jail| {
        // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
        jail.clear_env();
        let s = load_in(jail, Flags::default()).unwrap().settings;
        assert_eq!(s.server.connections_per_address(), 1000);
        assert!(s.server.trusted_proxies.is_empty());
        jail.set_env("KVSTORE_SERVER__MAX_CONNECTIONS", "5");
        let s = load_in(jail, Flags::default()).unwrap().settings;
        assert_eq!(s.server.connections_per_address(), 1, "at least one");

        jail.set_env("KVSTORE_SERVER__MAX_CONNECTIONS_PER_ADDRESS", "4");
        jail.set_env(
            "KVSTORE_SERVER__TRUSTED_PROXIES",
            "[\"10.1.2.3/8\", \"fd00::1\"]",
        );
        let loaded = load_in(jail, Flags::default()).unwrap();
        assert!(loaded.ignored_env.is_empty(), "{:?}", loaded.ignored_env);
        let server = loaded.settings.server;
        assert_eq!(server.connections_per_address(), 4);
        let [net, one] = server.trusted_proxies[..] else {
            panic!("{:?}", server.trusted_proxies);
        };
        assert_eq!(net.to_string(), "10.1.2.3/8");
        for (ip, inside) in [
            ("10.200.0.1", true),
            ("::ffff:10.0.0.9", true),
            ("11.0.0.1", false),
            ("::a00:1", false),
        ] {
            assert_eq!(net.contains(ip.parse().unwrap()), inside, "{ip}");
        }
        assert!(one.contains("fd00::1".parse().unwrap()));
        assert!(!one.contains("fd00::2".parse().unwrap()));
        jail.set_env("KVSTORE_SERVER__TRUSTED_PROXIES", "[\"10.0.0.0/33\"]");
        let message = error_in(jail, Flags::default());
        assert!(
            message.contains("server.trusted_proxies")
                && message.contains("the prefix length must be 0 to 32")
                && message.ends_with("(from environment variable KVSTORE_SERVER__TRUSTED_PROXIES)"),
            "{message}"
        );
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .unwrap()
                .contains("192.0.2.1".parse().unwrap())
        );
        Ok(())
    });
}

#[test]
fn the_config_file_can_be_named_by_environment() {
    Jail::expect_with(|jail| {
        // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
        jail.clear_env();
        jail.create_file("other.toml", "[limits]\nmax_key_bytes = 10\n")?;
        jail.set_env("KVSTORE_CONFIG", "other.toml");
        let s = load_in(jail, Flags::default()).unwrap().settings;
        assert_eq!(s.limits.max_key_bytes, 10);
        Ok(())
    });
}

#[test]
fn legacy_ports_keep_the_configured_host() {
    Jail::expect_with(|jail| {
        // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
        jail.clear_env();
        jail.set_env("KVSTORE_SERVER__LISTEN", "[::1]:1");
        jail.set_env("KVSTORE_SERVER__HEALTH_LISTEN", "");
        jail.set_env("GRPC_PORT", "50052");
        let s = load_in(jail, Flags::default()).unwrap().settings;
        assert_eq!(s.server.listen, "[::1]:50052".parse().unwrap());
        assert_eq!(s.server.health_listen, None);
        jail.set_env("HTTP_PORT", "8081");
        let s = load_in(jail, Flags::default()).unwrap().settings;
        assert_eq!(s.server.health_listen, Some("[::1]:8081".parse().unwrap()));
        Ok(())
    });
}

#[test]
fn without_a_config_file_the_defaults_apply() {
    Jail::expect_with(|jail| {
        // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
        jail.clear_env();
        // A kvstore.toml in the working directory is not read implicitly.
        jail.create_file("kvstore.toml", "[limits]\nmax_key_bytes = 10\n")?;
        let loaded = load_in(jail, Flags::default()).unwrap();
        assert_eq!(loaded.settings, Settings::default());
        assert!(loaded.ignored_env.is_empty());
        Ok(())
    });
}

#[test]
fn unknown_environment_variables_are_ignored_and_named() {
    Jail::expect_with(|jail| {
        // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
        jail.clear_env();
        jail.set_env("KVSTORE_SERVER__LISTNE", "x");
        jail.set_env("KVSTORE_ENDPOINT", "localhost:1");
        jail.set_env("KVSTORE_SERVER", "x");
        let loaded = load_in(jail, Flags::default()).unwrap();
        assert_eq!(loaded.settings, Settings::default());
        assert_eq!(
            loaded.ignored_env,
            ["KVSTORE_SERVER", "KVSTORE_SERVER__LISTNE"]
        );
        Ok(())
    });
}

#[test]
fn each_bad_input_is_one_line_naming_the_key_and_its_source() {
    Jail::expect_with(|jail| {
        // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
        jail.clear_env();
        let with_file = |body: &str| -> Result<String, figment::Error> {
            jail.create_file("bad.toml", body)?;
            Ok(error_in(
                jail,
                Flags {
                    config: Some("bad.toml".into()),
                    ..Flags::default()
                },
            ))
        };
        let cases = [
            (
                with_file("[server]\nlisten = \"nope\"\n")?,
                "server.listen",
                "bad.toml",
            ),
            (
                with_file("[server]\nlisten = \"0.0.0.0:70000\"\n")?,
                "server.listen",
                "bad.toml",
            ),
            (
                with_file("[server]\nlistne = \"x\"\n")?,
                "listne",
                "bad.toml",
            ),
            (
                with_file("[limits]\nmax_key_bytes = \"big\"\n")?,
                "limits.max_key_bytes",
                "bad.toml",
            ),
            (
                with_file("[limits]\nmax_key_bytes = 65536\n")?,
                "limits.max_key_bytes must be at most 65535",
                "bad.toml",
            ),
            (
                with_file("[shutdown]\ndrain_timeout = \"10 parsecs\"\n")?,
                "shutdown.drain_timeout",
                "bad.toml",
            ),
            (
                with_file("[subscriptions]\nbuffer = 0\n")?,
                "subscriptions.buffer",
                "bad.toml",
            ),
            (
                with_file("[log]\nformat = \"xml\"\n")?,
                "log.format",
                "bad.toml",
            ),
            (
                with_file("[server]\nmax_header_bytes = 100\n")?,
                "server.max_header_bytes",
                "bad.toml",
            ),
            (
                with_file("[server]\nhandshake_timeout = \"0s\"\n")?,
                "server.handshake_timeout",
                "bad.toml",
            ),
            (
                with_file("[server]\nrequest_body_timeout = \"0s\"\n")?,
                "server.request_body_timeout must be longer than 0s",
                "bad.toml",
            ),
            (
                with_file("[server]\nmax_request_bytes_in_flight = 4194304\n")?,
                "server.max_request_bytes_in_flight must be at least 4194309",
                "bad.toml",
            ),
            (
                with_file("[server]\nmax_answer_bytes_per_connection = 4194304\n")?,
                "server.max_answer_bytes_per_connection must be at least 4195333",
                "bad.toml",
            ),
            (
                with_file("[server]\nmax_answer_bytes_in_flight = 8388608\n")?,
                "server.max_answer_bytes_in_flight must be at least server.max_answer_bytes_per_connection (16777216)",
                "bad.toml",
            ),
            (
                with_file("[server]\nsend_timeout = \"0s\"\n")?,
                "server.send_timeout must be longer than 0s",
                "bad.toml",
            ),
            (
                with_file("[server]\nmax_control_frames = 99\n")?,
                "server.max_control_frames must be at least 100",
                "bad.toml",
            ),
            (
                with_file("[server]\nmax_connections = 0\n")?,
                "server.max_connections",
                "bad.toml",
            ),
            (
                with_file("[server]\nallowed_hosts = 5\n")?,
                "server.allowed_hosts: a list of names, or one string of comma-separated names",
                "bad.toml",
            ),
            (
                with_file("[server]\nallowed_hosts = [\"kvstore-1:8080\"]\n")?,
                "server.allowed_hosts entry \"kvstore-1:8080\" must be a host name",
                "bad.toml",
            ),
            (
                with_file("[server]\nmax_connections_per_address = 10001\n")?,
                "server.max_connections_per_address must be at most server.max_connections (10000)",
                "bad.toml",
            ),
            (
                with_file("[subscriptions]\nmax_per_client = 10001\n")?,
                "subscriptions.max_per_client must be at most subscriptions.max (10000)",
                "bad.toml",
            ),
            (
                with_file("[subscriptions]\nmax_per_clients = 1\n")?,
                "max_per_clients",
                "bad.toml",
            ),
            (
                with_file("[server]\nmax_health_watches = 0\n")?,
                "server.max_health_watches must be at least 1",
                "bad.toml",
            ),
            (
                with_file("[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\n")?,
                "server.trusted_proxies",
                "bad.toml",
            ),
            (
                with_file("[server]\ntrusted_proxies = [\"nginx\"]\n")?,
                "is not an IP address or CIDR range",
                "bad.toml",
            ),
            (
                with_file("[tls]\ncert = \"nowhere.pem\"\nkey = \"nowhere.key\"\n")?,
                "tls.cert cannot read nowhere.pem",
                "bad.toml",
            ),
            (with_file("[server\n")?, "line 1", "bad.toml"),
            (
                error_in(
                    jail,
                    Flags {
                        config: Some("missing.toml".into()),
                        ..Flags::default()
                    },
                ),
                "cannot read config file missing.toml",
                "",
            ),
            (
                error_in(
                    jail,
                    Flags {
                        listen: Some("localhost".into()),
                        ..Flags::default()
                    },
                ),
                "--listen",
                "command-line flag",
            ),
            (
                error_in(
                    jail,
                    Flags {
                        log_level: Some("kvstore=loud".into()),
                        ..Flags::default()
                    },
                ),
                "log.level",
                "command-line flag",
            ),
        ];
        for (message, key, source) in cases {
            assert!(message.starts_with("configuration error: "), "{message}");
            assert!(!message.contains('\n'), "{message}");
            assert!(message.contains(key), "{message:?} names {key}");
            assert!(message.contains(source), "{message:?} names {source}");
        }

        jail.set_env("KVSTORE_LIMITS__MAX_VALUE_BYTES", "-1");
        let message = error_in(jail, Flags::default());
        assert!(
            message.contains("LIMITS.MAX_VALUE_BYTES")
                || message.contains("limits.max_value_bytes"),
            "{message}"
        );
        assert!(message.contains("KVSTORE_"), "{message}");

        jail.set_env("KVSTORE_LIMITS__MAX_VALUE_BYTES", "1");
        jail.create_file("key.pem", "")?;
        jail.set_env("KVSTORE_TLS__CERT", "key.pem");
        jail.set_env("KVSTORE_TLS__KEY", "key.pem");
        let message = error_in(jail, Flags::default());
        assert!(
            message.contains("tls.cert key.pem: no certificate in it"),
            "{message}"
        );
        assert!(message.contains("KVSTORE_TLS__CERT"), "{message}");
        // Empty is off.
        jail.set_env("KVSTORE_TLS__CERT", "");
        jail.set_env("KVSTORE_TLS__KEY", "");

        jail.set_env("GRPC_PORT", "65536");
        let message = error_in(jail, Flags::default());
        assert!(message.contains("GRPC_PORT"), "{message}");
        Ok(())
    });
}

const DIGEST_A: &str = "f52fbd32b2b3b86ff88ef6c490628285f482af15ddcb29541f94bcf526a3f6c7";
const DIGEST_B: &str = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b";

#[test]
fn tokens_come_from_the_file_inline_and_the_environment() {
    Jail::expect_with(|jail| {
        // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
        jail.clear_env();
        jail.create_file(
            "tokens.txt",
            &format!(
                "# role digest name\n\nread {DIGEST_A} dashboard  # trailing comment\n  readwrite\t{}\n",
                DIGEST_B.to_uppercase()
            ),
        )?;
        jail.create_file(
            "kv.toml",
            &format!(
                "[auth]\nenabled = true\ntoken_file = \"tokens.txt\"\n\
                 tokens = [{{ sha256 = \"{}\", role = \"readwrite\", name = \"ci\" }}]\n",
                "cd".repeat(32)
            ),
        )?;
        let file = Flags {
            config: Some("kv.toml".into()),
            ..Flags::default()
        };
        let s = load_in(jail, file).unwrap().settings;
        assert!(s.auth.enabled);
        assert_eq!(s.auth.tokens[0].role, Role::ReadWrite);
        assert_eq!(crate::auth::Keyring::load(&s.auth).unwrap().len(), 3);
        // The file's digests stay in the file: --print-config shows only its path.
        let printed = s.to_toml();
        assert!(printed.contains("tokens.txt"), "{printed}");
        assert!(!printed.contains(DIGEST_A), "{printed}");

        jail.set_env("KVSTORE_AUTH__ENABLED", "true");
        jail.set_env("KVSTORE_AUTH__TOKEN_FILE", "tokens.txt");
        jail.set_env(
            "KVSTORE_AUTH__TOKENS",
            format!("[{{sha256=\"{}\", role=\"read\"}}]", "ef".repeat(32)),
        );
        jail.set_env("KVSTORE_AUTH__PROTECT_REFLECTION", "false");
        jail.set_env("KVSTORE_RATE_LIMIT__PER_CLIENT", "50");
        jail.set_env("KVSTORE_SERVER__ALLOWED_HOSTS", "kvstore-1, .example.org");
        jail.set_env("KVSTORE_LIMITS__MAX_HTTP_BODY_BYTES", "10");
        let loaded = load_in(jail, Flags::default()).unwrap();
        assert!(loaded.ignored_env.is_empty(), "{:?}", loaded.ignored_env);
        let s = loaded.settings;
        assert!(s.auth.enabled && !s.auth.protect_reflection);
        assert_eq!(s.auth.tokens[0].role, Role::Read);
        assert_eq!(crate::auth::Keyring::load(&s.auth).unwrap().len(), 3);
        assert_eq!(s.rate_limit.per_client, 50);
        assert_eq!(s.server.allowed_hosts, ["kvstore-1", ".example.org"]);
        assert_eq!(s.limits.max_http_body_bytes, 10);
        Ok(())
    });
}

#[test]
fn each_bad_token_entry_is_one_line_naming_its_place_but_not_its_content() {
    Jail::expect_with(|jail| {
        // The caller's environment (CI sets KVSTORE_REQUIRE_TOOLS) is not under test.
        jail.clear_env();
        let with_tokens = |file: &str, toml: &str| -> Result<String, figment::Error> {
            jail.create_file("tokens.txt", file)?;
            jail.create_file("kv.toml", &format!("[auth]\n{toml}"))?;
            Ok(error_in(
                jail,
                Flags {
                    config: Some("kv.toml".into()),
                    ..Flags::default()
                },
            ))
        };
        let file = "token_file = \"tokens.txt\"\n";
        let cases = [
            (
                with_tokens(
                    &format!("# ok\nread {DIGEST_A}\nreadwrite s3cret-token\n"),
                    file,
                )?,
                "auth.token_file tokens.txt:3: the second field must be a SHA-256 digest",
            ),
            (
                with_tokens(&format!("s3cret-token {DIGEST_A}\n"), file)?,
                "auth.token_file tokens.txt:1: the role (first field) must be read or readwrite",
            ),
            (
                with_tokens("s3cret-token\n", file)?,
                "auth.token_file tokens.txt:1: expected `ROLE SHA256 [NAME]`, found 1 fields",
            ),
            (
                with_tokens(
                    &format!("read {DIGEST_A} a\nreadwrite {DIGEST_A} b\n"),
                    file,
                )?,
                "auth.token_file tokens.txt:2: repeats the digest of token \"a\"",
            ),
            (
                with_tokens("", "token_file = \"missing.txt\"\n")?,
                "auth.token_file cannot read missing.txt",
            ),
            (
                with_tokens(
                    "",
                    "tokens = [{ sha256 = \"s3cret-token\", role = \"read\" }]\n",
                )?,
                "auth.tokens entry 1: sha256 must be a SHA-256 digest",
            ),
            (
                with_tokens(
                    "",
                    &format!("tokens = [{{ sha256 = \"{DIGEST_A}\", role = \"admin\" }}]\n"),
                )?,
                "auth.tokens",
            ),
            (
                with_tokens("", "enabled = true\n")?,
                "auth.enabled is true but no token is configured",
            ),
            (
                with_tokens("", "protect_metrics = \"yes\"\n")?,
                "auth.protect_metrics",
            ),
        ];
        for (message, expected) in cases {
            assert!(message.starts_with("configuration error: "), "{message}");
            assert!(!message.contains('\n'), "{message}");
            assert!(message.contains(expected), "{message:?} says {expected:?}");
            assert!(message.contains("kv.toml"), "{message:?} names the file");
            assert!(!message.contains("s3cret"), "{message:?} quotes a token");
        }
        Ok(())
    });
}
