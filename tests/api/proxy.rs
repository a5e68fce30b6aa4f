//! The server in single-port mode behind Debian's nginx, configured by config/nginx.conf (the
//! file compose.yaml's `proxy` profile uses): gRPC and the HTTP routes through its one TLS
//! port. The clients are grpcurl and curl, because the project's own clients speak cleartext.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::oneshot;
use tokio::time::timeout;

use crate::helpers::{PATIENCE, TestServer, require_tool, spawn_with, test_settings};

/// The upstream and the listen port as config/nginx.conf has them for compose; the test
/// replaces both and nothing else.
const CONFIG_UPSTREAM: &str = "kvstore-proxied:50051";
const CONFIG_LISTEN: &str = "listen 8443 ";

/// nginx's default `grpc_read_timeout`: without the config's longer one, a stream that is
/// quiet for this long is cut by the proxy.
const NGINX_DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// grpcurl exits with 64 + the gRPC status code; UNAVAILABLE is 14.
const GRPCURL_EXIT_UNAVAILABLE: i32 = 64 + 14;

struct Tools {
    nginx: PathBuf,
    grpcurl: PathBuf,
    curl: PathBuf,
    openssl: PathBuf,
}

/// Every outside tool the test needs, or `None` after saying loudly which one is missing.
fn tools() -> Option<Tools> {
    Some(Tools {
        nginx: require_tool("nginx")?,
        grpcurl: require_tool("grpcurl")?,
        curl: require_tool("curl")?,
        openssl: require_tool("openssl")?,
    })
}

/// A private nginx on a free 127.0.0.1 port in front of `upstream`. Dropping it stops nginx by
/// PID and removes its directory, also when a test fails half-way.
struct Proxy {
    nginx: Option<Child>,
    dir: PathBuf,
    addr: SocketAddr,
    grpcurl: PathBuf,
    curl: PathBuf,
}

impl Proxy {
    async fn start(tools: &Tools, upstream: SocketAddr) -> Proxy {
        let dir = std::env::temp_dir().join(format!(
            "kvstore-proxy-{}-{}",
            std::process::id(),
            upstream.port()
        ));
        std::fs::create_dir_all(dir.join("tls")).unwrap();
        let addr = free_port();
        let mut proxy = Proxy {
            nginx: None,
            dir,
            addr,
            grpcurl: tools.grpcurl.clone(),
            curl: tools.curl.clone(),
        };
        proxy.make_certificate(&tools.openssl).await;
        std::fs::write(proxy.dir.join("nginx.conf"), config_for(upstream, addr)).unwrap();

        let prefix = format!("{}/", proxy.dir.display());
        let conf = proxy.dir.join("nginx.conf");
        // The pid file goes to the prefix too, never to the system's /run/nginx.pid.
        let globals = format!("pid {}/nginx.pid;", proxy.dir.display());
        let checked = Command::new(&tools.nginx)
            .args(["-t", "-e", "stderr", "-p", &prefix, "-c"])
            .arg(&conf)
            .args(["-g", &globals])
            .kill_on_drop(true)
            .output()
            .await
            .unwrap();
        assert!(
            checked.status.success(),
            "nginx -t rejects the configuration:\n{}",
            String::from_utf8_lossy(&checked.stderr)
        );

        let mut nginx = Command::new(&tools.nginx)
            .args(["-e", "stderr", "-p", &prefix, "-c"])
            .arg(&conf)
            .args(["-g", &format!("daemon off; {globals}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting nginx");
        let stdout = nginx.stdout.take().unwrap();
        let stderr = nginx.stderr.take().unwrap();
        proxy.nginx = Some(nginx);

        // nginx opens its listening socket before it starts the workers, so this line means
        // connections are accepted. Its log is echoed, and shown if the test fails.
        let (started, workers_started) = oneshot::channel();
        tokio::spawn(async move {
            let mut started = Some(started);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("nginx: {line}");
                if line.contains("start worker process")
                    && let Some(started) = started.take()
                {
                    let _ = started.send(());
                }
            }
        });
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("nginx access: {line}");
            }
        });
        timeout(PATIENCE, workers_started)
            .await
            .expect("nginx starts in time")
            .expect("nginx starts its workers (see its log above)");
        proxy
    }

    /// A self-signed certificate for 127.0.0.1, in tls/ beside nginx.conf, where the config
    /// looks for it.
    async fn make_certificate(&self, openssl: &Path) {
        let tls = self.dir.join("tls");
        let made = Command::new(openssl)
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
            .args(["-subj", "/CN=localhost", "-addext"])
            .args(["subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout"])
            .arg(tls.join("key.pem"))
            .arg("-out")
            .arg(tls.join("cert.pem"))
            .kill_on_drop(true)
            .output()
            .await
            .unwrap();
        assert!(
            made.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&made.stderr)
        );
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("tls/cert.pem")
    }

    /// grpcurl set up for the proxy: TLS verified against our certificate, the API from
    /// proto/ (the reflection service is tested separately).
    fn grpcurl(&self) -> Command {
        let mut command = Command::new(&self.grpcurl);
        command
            .arg("-cacert")
            .arg(self.cert())
            .args([
                "-import-path",
                concat!(env!("CARGO_MANIFEST_DIR"), "/proto"),
            ])
            .args(["-proto", "kvstore.proto"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// One unary call through the proxy; the request goes on stdin (values can be large).
    async fn call(&self, method: &str, request: Value) -> Value {
        let mut child = self
            .grpcurl()
            .args(["-d", "@", &self.addr.to_string()])
            .arg(format!("kvstore.KeyValueStore/{method}"))
            .spawn()
            .expect("starting grpcurl");
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(request.to_string().as_bytes())
            .await
            .unwrap();
        drop(stdin);
        let out = timeout(PATIENCE, child.wait_with_output())
            .await
            .expect("grpcurl answers in time")
            .unwrap();
        assert!(
            out.status.success(),
            "{method} through nginx failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("grpcurl prints the response as JSON")
    }

    async fn subscribe(&self, pattern: &str) -> Subscription {
        let mut child = self
            .grpcurl()
            .args(["-d", &json!({ "key_pattern": pattern }).to_string()])
            .arg(self.addr.to_string())
            .arg("kvstore.KeyValueStore/Subscribe")
            .stdin(Stdio::null())
            .spawn()
            .expect("starting grpcurl");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Subscription { child, lines }
    }

    /// A GET over HTTP/1.1 through the proxy: (HTTP version, status, body).
    async fn http1_get(&self, path: &str) -> (String, u16, String) {
        let out = Command::new(&self.curl)
            .args(["--silent", "--show-error", "--http1.1", "--cacert"])
            .arg(self.cert())
            .args(["--write-out", "\n%{http_version} %{http_code}"])
            .arg(format!("https://{}{path}", self.addr))
            .kill_on_drop(true)
            .output();
        let out = timeout(PATIENCE, out)
            .await
            .expect("curl answers in time")
            .unwrap();
        assert!(
            out.status.success(),
            "curl {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, last) = text.rsplit_once('\n').unwrap();
        let (version, status) = last.split_once(' ').unwrap();
        (version.into(), status.parse().unwrap(), body.into())
    }

    /// Stops nginx (SIGTERM: the master stops its workers, then exits) and waits for it.
    async fn stop(mut self) {
        let mut nginx = self.nginx.take().expect("nginx was started");
        signal(&nginx, Signal::SIGTERM);
        let status = timeout(PATIENCE, nginx.wait())
            .await
            .expect("nginx stops in time")
            .unwrap();
        assert!(status.success(), "nginx exited with {status}");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut nginx) = self.nginx.take() {
            // Only reached when a test failed before `stop`. SIGKILL would orphan the workers
            // (still holding the port), so ask the master to stop them first.
            signal(&nginx, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(nginx.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = nginx.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn signal(child: &Child, signal: Signal) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid.try_into().expect("pid fits i32")), signal);
    }
}

/// A port that was free a moment ago: the OS picks it, and nginx binds it right after.
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// config/nginx.conf with the test's upstream and listen address in place of compose's.
fn config_for(upstream: SocketAddr, listen: SocketAddr) -> String {
    let config = include_str!("../../config/nginx.conf");
    assert_eq!(
        config.matches(CONFIG_LISTEN).count(),
        1,
        "config/nginx.conf listens on one port"
    );
    assert!(
        config.contains(CONFIG_UPSTREAM),
        "{CONFIG_UPSTREAM} upstream"
    );
    config
        .replace(CONFIG_UPSTREAM, &upstream.to_string())
        .replace(CONFIG_LISTEN, &format!("listen {listen} "))
}

/// An open Subscribe through the proxy, read as grpcurl prints it: one JSON object per event.
struct Subscription {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Subscription {
    /// The next event, or `None` once the stream has ended.
    async fn next_event(&mut self) -> Option<Value> {
        let mut object = String::new();
        while let Some(line) = self.lines.next_line().await.unwrap() {
            object.push_str(&line);
            // grpcurl indents everything inside an event, so a bare brace closes it.
            if line == "}" {
                return Some(serde_json::from_str(&object).expect("an event in JSON"));
            }
        }
        None
    }

    /// Waits for grpcurl to exit: its status and what it printed on stderr.
    async fn finish(mut self) -> (ExitStatus, String) {
        let mut stderr = String::new();
        let mut pipe = self.child.stderr.take().unwrap();
        timeout(PATIENCE, pipe.read_to_string(&mut stderr))
            .await
            .expect("grpcurl closes stderr in time")
            .unwrap();
        let status = timeout(PATIENCE, self.child.wait())
            .await
            .expect("grpcurl exits in time")
            .unwrap();
        (status, stderr)
    }
}

async fn single_port_server(drain_delay: Duration) -> TestServer {
    let mut settings = test_settings();
    settings.server.health_listen = None;
    // As behind nginx in production: each of its connections carries many clients.
    settings.server.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    settings.shutdown.drain_delay = drain_delay;
    spawn_with(settings).await
}

fn assert_event(event: Option<Value>, key: &str, value: &str) {
    let event = event.expect("an event, not the end of the stream");
    assert_eq!(event["changeType"], "SET", "{event}");
    assert_eq!(
        (&event["key"], &event["value"]),
        (&json!(key), &json!(value))
    );
}

#[tokio::test]
async fn get_set_and_health_checks_pass_through_nginx_on_one_port() {
    let Some(tools) = tools() else { return };
    let server = single_port_server(Duration::ZERO).await;
    let proxy = Proxy::start(&tools, server.grpc_addr).await;

    let set = proxy
        .call("Set", json!({ "key": "user:1", "value": "Alice" }))
        .await;
    assert_eq!(set["success"], true, "{set}");
    let got = proxy.call("Get", json!({ "key": "user:1" })).await;
    assert_eq!(
        (&got["value"], &got["found"]),
        (&json!("Alice"), &json!(true))
    );
    // A value at the server's limit (1 MiB) fits through the proxy's body size limit.
    let big = "v".repeat(1 << 20);
    proxy
        .call("Set", json!({ "key": "big", "value": big }))
        .await;
    let got = proxy.call("Get", json!({ "key": "big" })).await;
    assert_eq!(got["value"].as_str().map(str::len), Some(1 << 20));

    for (path, body) in [
        ("/health/live", r#"{"status":"alive"}"#),
        ("/health/ready", r#"{"status":"ready"}"#),
    ] {
        let answer = proxy.http1_get(path).await;
        assert_eq!(answer, ("1.1".into(), 200, body.into()), "{path}");
    }

    // gRPC health, found through the reflection service: the /grpc. routes work too.
    let health = Command::new(&tools.grpcurl)
        .arg("-cacert")
        .arg(proxy.cert())
        .arg(proxy.addr.to_string())
        .arg("grpc.health.v1.Health/Check")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let health = String::from_utf8_lossy(&health.stdout);
    assert!(health.contains(r#""status": "SERVING""#), "{health}");

    proxy.stop().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_subscription_through_nginx_outlives_its_default_timeout_and_ends_unavailable_on_shutdown()
 {
    let Some(tools) = tools() else { return };
    // Long enough to see readiness fail through the proxy before the streams end.
    let mut server = single_port_server(Duration::from_secs(3)).await;
    let proxy = Proxy::start(&tools, server.grpc_addr).await;

    let mut users = proxy.subscribe("user:").await;
    server.wait_for_subscriptions(1).await;
    proxy
        .call("Set", json!({ "key": "user:1", "value": "Alice" }))
        .await;
    assert_event(
        timeout(PATIENCE, users.next_event()).await.unwrap(),
        "user:1",
        "Alice",
    );

    // Quiet for longer than nginx's default read timeout: the stream must stay open, with
    // nothing arriving and nothing ending it.
    let quiet = NGINX_DEFAULT_READ_TIMEOUT + Duration::from_secs(5);
    if let Ok(next) = timeout(quiet, users.next_event()).await {
        let ended = next.is_none();
        let (status, stderr) = users.finish().await;
        panic!("the quiet stream got {next:?} (ended: {ended}, grpcurl {status}): {stderr}");
    }
    proxy
        .call("Set", json!({ "key": "user:2", "value": "Bob" }))
        .await;
    assert_event(
        timeout(PATIENCE, users.next_event()).await.unwrap(),
        "user:2",
        "Bob",
    );

    // What SIGTERM does: readiness fails first, seen through the proxy, ...
    server.begin_shutdown();
    timeout(PATIENCE, async {
        loop {
            match proxy.http1_get("/health/ready").await {
                (_, 503, body) => break assert_eq!(body, r#"{"status":"draining"}"#),
                (_, 200, _) => continue,
                other => panic!("readiness while draining: {other:?}"),
            }
        }
    })
    .await
    .expect("readiness turns 503 through the proxy");
    // ... then the stream ends with UNAVAILABLE, as the proxy's client sees it.
    assert_eq!(
        timeout(PATIENCE, users.next_event()).await.unwrap(),
        None,
        "no event after shutdown"
    );
    let (status, stderr) = users.finish().await;
    assert_eq!(status.code(), Some(GRPCURL_EXIT_UNAVAILABLE), "{stderr}");
    assert!(stderr.contains("Code: Unavailable"), "{stderr}");

    server.stopped().await;
    proxy.stop().await;
}
