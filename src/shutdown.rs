//! The process signals that begin a graceful shutdown: Ctrl-C (SIGINT) or SIGTERM. A second
//! signal during the drain exits at once.

use tracing::{info, warn};

/// Listens for SIGINT and SIGTERM from the moment it is called (so a signal sent as soon as
/// the server logs that it is listening is caught, not fatal), and returns a future that
/// completes on the first one and arms the second to exit the process at once: an operator
/// pressing Ctrl-C twice means it. Call it inside the runtime.
pub fn signal() -> impl Future<Output = ()> {
    // One set of listeners serves both signals. A listener created after the first signal
    // can still observe that same signal, which would turn one SIGTERM into an exit.
    let mut signals = Signals::new();
    async move {
        let name = signals.next().await;
        info!(signal = name, "shutdown signal received");
        tokio::spawn(async move {
            let name = signals.next().await;
            warn!(signal = name, "second signal: exiting at once");
            std::process::exit(130);
        });
    }
}

#[cfg(unix)]
struct Signals {
    interrupt: Option<tokio::signal::unix::Signal>,
    terminate: Option<tokio::signal::unix::Signal>,
}

#[cfg(unix)]
impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &str| {
            signal(kind)
                .inspect_err(|err| warn!(error = %err, "cannot listen for {name}"))
                .ok()
        };
        Self {
            interrupt: listen(SignalKind::interrupt(), "SIGINT"),
            terminate: listen(SignalKind::terminate(), "SIGTERM"),
        }
    }

    async fn next(&mut self) -> &'static str {
        async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = recv(&mut self.interrupt) => "SIGINT",
            () = recv(&mut self.terminate) => "SIGTERM",
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> Self {
        Self
    }

    async fn next(&mut self) -> &'static str {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "Ctrl-C",
            Err(err) => {
                warn!(error = %err, "cannot listen for Ctrl-C");
                std::future::pending().await
            }
        }
    }
}
