//! A real server in the test's process (the library's `bind`/`run`, on 127.0.0.1:0), for the
//! load tool to run against.

use std::net::SocketAddr;
use std::time::Duration;

use kvstore::config::Settings;
use kvstore::startup::Startup;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A server running until [`TestServer::shutdown`].
pub struct TestServer {
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    running: JoinHandle<anyhow::Result<()>>,
}

/// Binds with the defaults on 127.0.0.1:0 and serves.
pub async fn spawn_server() -> TestServer {
    let mut settings = Settings::default();
    settings.server.listen = "127.0.0.1:0".parse().unwrap();
    settings.server.health_listen = None;
    settings.shutdown.drain_timeout = Duration::from_secs(5);
    let startup = Startup::from_settings(settings).unwrap();
    let server = kvstore::server::bind(startup).await.unwrap();
    let addr = server.listen_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    TestServer {
        addr,
        stop,
        running,
    }
}

impl TestServer {
    /// Asks the server to stop, and waits up to `patience` for it to drain.
    pub async fn shutdown(self, patience: Duration) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(patience, self.running)
            .await
            .expect("the server drains in time")
            .unwrap()
            .unwrap();
    }
}
