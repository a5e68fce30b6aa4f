//! kvstore-server: settings -> telemetry -> bind -> run until SIGINT/SIGTERM, then drain.
//! Exit codes: 0 after a clean or signal-initiated shutdown, 1 on a runtime failure (such
//! as a port in use), 2 on a usage or configuration error.

use std::cell::Cell;
use std::convert::Infallible;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kvstore::config::{self, Flags};
use kvstore::startup::Startup;
use kvstore::{auth, open_files, server, shutdown, telemetry};
use tracing::{error, info, warn};

// mimalloc: the request path allocates a little per call (HTTP/2 frames, protobuf
// messages, events); measured against glibc malloc with h2load, see the commit message.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    // Transparent huge pages off for this process: mimalloc asks for them on its arenas
    // (MADV_HUGEPAGE), and khugepaged then refills what mimalloc hands back to the OS, 2 MiB
    // at a time wherever one 4 KiB page of the range is still in use. With them, RSS went
    // from 15 MiB, once 10,000 subscribers had left, back to 29 MiB within 80 s.
    #[cfg(target_os = "linux")]
    if let Err(err) = nix::sys::prctl::set_thp_disable(true) {
        warn!(error = %err, "could not turn transparent huge pages off: memory freed after a load may return");
    }
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
        .on_thread_park(return_free_memory)
        .build()
        .context("starting the async runtime")?;
    let workers = runtime.metrics().num_workers();
    // This future runs on the main thread, not on a worker (so do the accept loops).
    runtime.block_on(async {
        let signal = shutdown::signal();
        let server = server::bind(startup).await?;
        tokio::select! {
            result = server.run(signal) => result,
            never = memory_rounds(workers) => match never {},
        }
    })
}

/// How often each thread of the runtime hands the memory it holds unused back to the OS.
const MEMORY_ROUND_EVERY: Duration = Duration::from_secs(1);

/// The current memory round; a worker that has not collected in it does so as it next parks.
static MEMORY_ROUND: AtomicU64 = AtomicU64::new(0);
/// Collects done so far by the workers.
static COLLECTS: AtomicU64 = AtomicU64::new(0);

/// Every [`MEMORY_ROUND_EVERY`], collects on the main thread (it runs the accept loops) and
/// wakes the idle workers, so that each parks again and collects (see [`return_free_memory`]).
/// Must run outside the workers: a task spawned from there goes to the runtime's shared
/// queue, and tokio wakes a sleeping worker to take it.
async fn memory_rounds(workers: usize) -> Infallible {
    let workers = workers as u64;
    let mut every = tokio::time::interval(MEMORY_ROUND_EVERY);
    loop {
        every.tick().await;
        collect();
        MEMORY_ROUND.fetch_add(1, Ordering::Relaxed);
        let before = COLLECTS.load(Ordering::Relaxed);
        // tokio wakes a sleeping worker for a queued task only while no other is looking for
        // work, and the one that slept least first; so each task holds its worker until the
        // next has started on another (a relay, at most 200 µs each), and the loop repeats
        // until every worker has collected. A busy worker collects once it runs out of work,
        // so stop after a few tries.
        for _ in 0..4 * workers {
            tokio::time::sleep(Duration::from_millis(1)).await;
            if COLLECTS.load(Ordering::Relaxed) - before >= workers {
                break;
            }
            for task in 1..=workers {
                tokio::spawn(wake_task(task < workers));
            }
        }
    }
}

/// Wake tasks started so far.
static WAKE_TASKS: AtomicU64 = AtomicU64::new(0);

/// A wake task of [`memory_rounds`]. Unless it is the last of its batch, it keeps its worker
/// busy until another wake task has started, so that tokio wakes another sleeping worker
/// for it, or 200 µs have passed.
async fn wake_task(hold: bool) {
    let me = WAKE_TASKS.fetch_add(1, Ordering::Relaxed) + 1;
    let started = Instant::now();
    while hold
        && WAKE_TASKS.load(Ordering::Relaxed) == me
        && started.elapsed() < Duration::from_micros(200)
    {
        std::thread::yield_now();
    }
}

/// Runs on a runtime worker thread as it parks: once per memory round, hands the memory its
/// allocator heap holds but no longer uses back to the OS.
///
/// mimalloc frees lazily, and only on the thread that allocated: blocks other threads free
/// wait in that thread's pages until it allocates again, and empty pages are decommitted a
/// second later, by whichever thread next frees a page. A worker that sleeps does neither,
/// so after 10,000 subscribers left about 58 MiB stayed resident with 0.3 MiB of it live;
/// a forced collect on each worker brought RSS back to its baseline. A forced collect costs
/// thousands of instructions and a worker parks after every call at low load, hence rounds.
fn return_free_memory() {
    thread_local! {
        static COLLECTED_IN: Cell<u64> = const { Cell::new(0) };
    }
    let round = MEMORY_ROUND.load(Ordering::Relaxed);
    if COLLECTED_IN.get() == round {
        return;
    }
    COLLECTED_IN.set(round);
    collect();
    COLLECTS.fetch_add(1, Ordering::Relaxed);
}

/// Frees the calling thread's empty allocator pages and decommits them at once.
fn collect() {
    // SAFETY: mi_collect has no preconditions: it frees and decommits what the calling
    // thread's heap (and the arenas, under their own locks) hold unused.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_collect(true)
    };
}
