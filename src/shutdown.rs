//! The process signals that begin a graceful shutdown: Ctrl-C (SIGINT) or SIGTERM. A second
//! signal during the drain exits at once.

use tracing::{info, warn};

/// Completes on the first SIGINT or SIGTERM, and arms the second to exit the process at
/// once: an operator pressing Ctrl-C twice means it.
pub async fn signal() {
    let name = next_signal().await;
    info!(signal = name, "shutdown signal received");
    tokio::spawn(async {
        let name = next_signal().await;
        warn!(signal = name, "second signal: exiting at once");
        std::process::exit(130);
    });
}

async fn next_signal() -> &'static str {
    let ctrl_c = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => {}
            Err(err) => {
                warn!(error = %err, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(err) => {
                warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => "SIGINT",
        () = terminate => "SIGTERM",
    }
}
