//! kvstore-server: settings -> telemetry -> bind -> run until SIGINT/SIGTERM, then drain;
//! the allocator and its tuning are in `alloc`.
//! Exit codes: 0 after a clean or signal-initiated shutdown, 1 on a runtime failure (such
//! as a port in use), 2 on a usage or configuration error.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kvstore::config::{self, Flags};
use kvstore::startup::Startup;
use kvstore::{auth, open_files, server, shutdown, telemetry};
use tracing::{error, info, warn};

mod alloc;

/// A key-value store with prefix change streams, serving gRPC and HTTP on one port.
///
/// Settings are layered, later winning: built-in defaults < the TOML file (--config or
/// KVSTORE_CONFIG) < KVSTORE_* environment variables (KVSTORE_SERVER__LISTEN, ...) < the
/// legacy GRPC_PORT / HTTP_PORT < these flags. config/kvstore.toml documents every key.
#[derive(Debug, Parser)]
#[command(version, max_term_width = 100)]
struct Cli {
    /// TOML configuration file; it must exist. Without one the built-in defaults apply.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Main listener, gRPC and HTTP on one port (server.listen) [default: 0.0.0.0:50051]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Legacy HTTP-only health listener; "" turns it off (server.health_listen) [default: 0.0.0.0:8080]
    #[arg(long, value_name = "ADDR")]
    health_listen: Option<String>,
    /// A level (trace, debug, info, warn, error) or a filter such as kvstore=debug (log.level);
    /// RUST_LOG wins when set
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// json or text (log.format) [default: json]
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Tool>,
}

#[derive(Debug, Subcommand)]
enum Tool {
    /// Read a bearer token on stdin (one trailing newline is ignored) and print the SHA-256
    /// digest that auth.tokens and auth.token_file want: `kvstore-server hash-token < token`.
    HashToken,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Tool::HashToken) = cli.command {
        return hash_token();
    }
    let flags = Flags {
        config: cli.config,
        listen: cli.listen,
        health_listen: cli.health_listen,
        log_level: cli.log_level,
        log_format: cli.log_format,
    };
    let loaded = match config::load(&flags) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("kvstore-server: {err}");
            return ExitCode::from(2);
        }
    };
    let startup = match Startup::build(loaded) {
        Ok(startup) => startup,
        Err(err) => {
            eprintln!("kvstore-server: {err}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        print!("{}", startup.settings.to_toml());
        return ExitCode::SUCCESS;
    }
    let filter = startup.log_filter.clone();
    if let Err(err) = telemetry::init(filter, startup.settings.log.format) {
        eprintln!("kvstore-server: configuration error: {err:#}");
        return ExitCode::from(2);
    }
    if !startup.ignored_env.is_empty() {
        warn!(
            variables = startup.ignored_env.join(", "),
            "ignoring environment variables that name no setting"
        );
    }
    match run(startup) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!(error = format!("{err:#}"), "server failed");
            eprintln!("kvstore-server: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exit 2 when stdin holds no usable token, as for any other usage error.
fn hash_token() -> ExitCode {
    let mut input = String::new();
    if let Err(err) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("kvstore-server: reading the token from stdin: {err}");
        return ExitCode::from(2);
    }
    let token = input
        .strip_suffix('\n')
        .map_or(input.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
    match auth::hash_token(token) {
        Ok(digest) => {
            println!("{digest}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("kvstore-server: hash-token: {err}");
            ExitCode::from(2)
        }
    }
}

fn run(startup: Startup) -> anyhow::Result<()> {
    alloc::tune();
    // Every connection is a file descriptor; the server caps connections below the soft
    // limit (see kvstore::open_files), so take all the hard limit allows first.
    match open_files::raise_to_hard() {
        Ok(Some((before, after))) => info!(
            from = before.soft,
            to = after.soft,
            "raised the open-file limit (RLIMIT_NOFILE) to its hard limit"
        ),
        Ok(None) => {}
        Err(err) => {
            warn!(error = %err, "could not raise the open-file limit (RLIMIT_NOFILE) to its hard limit")
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // This future runs on the main thread, not on a worker (so do the accept loops).
    runtime.block_on(async {
        let server = server::bind(startup).await?;
        server.run(shutdown::signal()).await
    })
}
