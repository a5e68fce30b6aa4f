//! `kvstore-client`: the command-line client of the kvstore gRPC API (get, set, delete, list,
//! subscribe, health), printing text for people or one JSON object per line for scripts. It also
//! accepts the flags of the original Go client (`-op=get -key=user:1`), so existing scripts keep
//! working.

use std::{
    error::Error,
    ffi::OsString,
    fmt,
    io::{self, Write},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum, error::ErrorKind};
use kvstore::auth::BearerToken;
use kvstore::pb::{self, change_event::ChangeType, key_value_store_client::KeyValueStoreClient};
use serde::Serialize;
use tokio::time::Instant;
use tonic::{
    Code, Status,
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Every KV call carries the `--token`, if one was given.
type Client = KeyValueStoreClient<InterceptedService<Channel, BearerToken>>;

const EXIT_NOT_FOUND: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_FAILURE: u8 = 3;
const EXIT_GUARD_MISMATCH: u8 = 4;

/// Far above the server's value limit (1 MiB by default), so that limit is the one that applies
/// and is reported with its setting's name, rather than a client-side decoding error.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// humantime cannot format year 10000 or later.
const MAX_FORMATTABLE_MS: u64 = 253_402_300_800_000;

/// Items per List call: the server's default page, well under its cap.
const LIST_PAGE: u32 = 1000;

/// `subscribe --resume` retries a lost subscription after these delays, doubling from the
/// first to the second, and gives up after failing for the third without a break.
const RESUME_FIRST_DELAY: Duration = Duration::from_millis(100);
const RESUME_MAX_DELAY: Duration = Duration::from_secs(5);
const RESUME_GIVE_UP: Duration = Duration::from_secs(30);

/// The trailer of a subscription ended for lagging: the last revision the server delivered.
const LAST_REVISION_TRAILER: &str = "kvstore-last-revision";

const AFTER_HELP: &str = "\
Exit codes:
  0  success, including a subscription stopped with Ctrl-C
  1  get, delete: the key does not exist
  2  usage error, or a --ca-cert, --client-cert or --client-key file that cannot be used
  3  the server is unreachable or answered with an error status, the server ended a
     subscription (or subscribe --resume gave up), or health is not SERVING
  4  set, delete: the --if-revision or --if-absent guard did not match; nothing changed

The original Go client's flags also work:
  kvstore-client -server=localhost:50051 -op=set -key=user:1 -value=Alice
  kvstore-client -op=get -key=user:1
  kvstore-client -op=subscribe -pattern=user:";

/// Command-line client of the kvstore gRPC API.
#[derive(Debug, Parser)]
#[command(name = "kvstore-client", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    common: Common,

    #[command(subcommand)]
    command: Command,
}

/// The options of both the subcommand and the Go flag forms.
#[derive(Debug, Args)]
struct Common {
    /// Server address: host:port, http://host:port, or https://host:port (TLS).
    #[arg(
        long,
        global = true,
        env = "KVSTORE_ENDPOINT",
        default_value = "localhost:50051",
        value_parser = kvstore::endpoint::parse_url
    )]
    server: Endpoint,

    /// Output format of the results on stdout; errors are always text on stderr.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,

    /// Bearer token for a server with authentication on; prefer the environment variable,
    /// which other users cannot see in the process list.
    #[arg(
        long,
        global = true,
        env = "KVSTORE_TOKEN",
        hide_env_values = true,
        value_parser = BearerToken::parse
    )]
    token: Option<BearerToken>,
    #[command(flatten)]
    tls: TlsArgs,
}

/// TLS to the server: on with --tls, an https:// address, --ca-cert or --client-cert.
#[derive(Debug, Args)]
struct TlsArgs {
    /// Connect with TLS. Without --ca-cert, the server's certificate must chain to a public CA
    /// (Mozilla's roots, built in).
    #[arg(long, global = true)]
    tls: bool,

    /// Trust only the CA certificates in this PEM file (a private CA). Implies --tls.
    #[arg(long, global = true, value_name = "PATH", env = "KVSTORE_CA_CERT")]
    ca_cert: Option<PathBuf>,

    /// Present this certificate (PEM) to a server that verifies clients. Implies --tls.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "KVSTORE_CLIENT_CERT",
        requires = "client_key"
    )]
    client_cert: Option<PathBuf>,

    /// The private key (PEM) of --client-cert.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "KVSTORE_CLIENT_KEY",
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
}

impl Common {
    /// Switches the endpoint to TLS when the flags or the address ask for it.
    fn apply_tls(&mut self) -> anyhow::Result<()> {
        let TlsArgs {
            tls,
            ca_cert,
            client_cert,
            client_key,
        } = &self.tls;
        let https = self.server.uri().scheme_str() == Some("https");
        if !(*tls || https || ca_cert.is_some() || client_cert.is_some()) {
            return Ok(());
        }
        let settings = kvstore::endpoint::ClientTls {
            ca_cert: ca_cert.clone(),
            identity: client_cert.clone().zip(client_key.clone()),
        };
        self.server = kvstore::endpoint::with_tls(self.server.clone(), &settings)?;
        Ok(())
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the value of KEY with its revision (exit 1 if the key does not exist).
    Get {
        /// The key to read.
        key: String,
    },
    /// Store VALUE under KEY, replacing any previous value and TTL.
    Set {
        /// The key to write.
        key: String,
        /// The value; may be empty.
        value: String,
        /// Remove the key after this long: 30s, 5m, 1h 30m.
        #[arg(long, value_name = "DURATION", value_parser = parse_millis)]
        ttl: Option<i64>,
        /// Store only if the key was last changed at revision N (exit 4 otherwise).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(0..))]
        if_revision: Option<i64>,
        /// Store only if the key does not exist (exit 4 otherwise).
        #[arg(long, conflicts_with = "if_revision")]
        if_absent: bool,
    },
    /// Remove KEY (exit 1 if it does not exist).
    Delete {
        /// The key to remove.
        key: String,
        /// Remove only if the key was last changed at revision N (exit 4 otherwise).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(0..))]
        if_revision: Option<i64>,
    },
    /// Print every key that starts with PREFIX, with its value, in key order.
    List {
        /// A key prefix, without wildcards; "" (the default) lists every key.
        #[arg(default_value = "")]
        prefix: String,
        /// Stop after N keys; without it, every matching key is printed.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
    /// Print every change to a key that starts with PATTERN, until Ctrl-C.
    Subscribe(SubscribeArgs),
    /// Check the server's gRPC health (exit 3 unless SERVING).
    Health,
}

#[derive(Debug, Args)]
struct SubscribeArgs {
    /// A key prefix, without wildcards; "" matches every key.
    pattern: String,
    /// First replay the retained changes from revision N on, then continue live.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
    from_revision: Option<i64>,
    /// First print the current value of every matching key, then continue live.
    #[arg(long, conflicts_with = "from_revision")]
    initial: bool,
    /// Have the server report the revision reached after this long without a change.
    #[arg(long, value_name = "DURATION", value_parser = parse_millis)]
    progress: Option<i64>,
    /// After a lag or a lost connection, subscribe again from the last revision seen.
    #[arg(long)]
    resume: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    /// Lines for people: `user:1 = Alice`.
    Text,
    /// One JSON object per line.
    Json,
}

/// The original Go client's flags, once `kvstore::legacy_args` has rewritten them for clap.
#[derive(Debug, Parser)]
#[command(
    name = "kvstore-client",
    about = "Command-line client of the kvstore gRPC API, with the original Go client's flags",
    long_about = None,
    override_usage = "kvstore-client [-server=ADDR] -op=get|set|subscribe [-key=KEY] [-value=VALUE] [-pattern=PREFIX]",
    after_help = AFTER_HELP
)]
struct LegacyArgs {
    #[command(flatten)]
    common: Common,

    /// The operation to run.
    #[arg(long, value_enum)]
    op: LegacyOp,

    /// The key, for get and set.
    #[arg(long)]
    key: Option<String>,

    /// The value, for set.
    #[arg(long, default_value = "")]
    value: String,

    /// The key prefix, for subscribe; "" matches every key.
    #[arg(long, default_value = "")]
    pattern: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LegacyOp {
    Get,
    Set,
    Subscribe,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let (mut common, command) = parse_args(std::env::args_os().collect());
    if let Err(err) = common.apply_tls() {
        report(format_args!("kvstore-client: {err:#}"));
        return ExitCode::from(EXIT_USAGE);
    }
    match run(common, command).await {
        Ok(code) => code,
        Err(err) => {
            report(format_args!("kvstore-client: {err:#}"));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Parses either form of the command line; clap exits with 2 on a usage error.
fn parse_args(args: Vec<OsString>) -> (Common, Command) {
    let Some(args) = kvstore::legacy_args::rewrite(&args) else {
        let cli = Cli::parse_from(args);
        return (cli.common, cli.command);
    };
    let legacy = LegacyArgs::parse_from(args);
    let key = |op: &str| {
        legacy.key.clone().unwrap_or_else(|| {
            LegacyArgs::command()
                .error(
                    ErrorKind::MissingRequiredArgument,
                    format!("-op={op} needs -key=KEY"),
                )
                .exit()
        })
    };
    let command = match legacy.op {
        LegacyOp::Get => Command::Get { key: key("get") },
        LegacyOp::Set => Command::Set {
            key: key("set"),
            value: legacy.value.clone(),
            ttl: None,
            if_revision: None,
            if_absent: false,
        },
        LegacyOp::Subscribe => Command::Subscribe(SubscribeArgs {
            pattern: legacy.pattern.clone(),
            from_revision: None,
            initial: false,
            progress: None,
            resume: false,
        }),
    };
    (legacy.common, command)
}

/// A humantime duration (`30s`, `1m 30s`) in whole milliseconds, the unit of the API. Zero means
/// "none" on the wire, so a duration that rounds down to it is refused rather than ignored.
fn parse_millis(duration: &str) -> Result<i64, String> {
    let duration = humantime::parse_duration(duration).map_err(|err| err.to_string())?;
    match i64::try_from(duration.as_millis()) {
        Ok(0) => Err("must be at least 1ms".into()),
        Ok(ms) => Ok(ms),
        Err(_) => Err("too long".into()),
    }
}

async fn run(common: Common, command: Command) -> anyhow::Result<ExitCode> {
    let Common {
        server,
        output,
        token,
        ..
    } = common;
    let channel = server.connect().await.map_err(|err| {
        let url = server.uri().to_string();
        let url = url.trim_end_matches('/');
        anyhow::anyhow!("cannot reach server at {url}: {}", causes(&err))
    })?;
    let client = KeyValueStoreClient::with_interceptor(channel.clone(), token.unwrap_or_default())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    match command {
        Command::Get { key } => get(client, key, output).await,
        Command::Set {
            key,
            value,
            ttl,
            if_revision,
            if_absent,
        } => {
            // The API spells "must not exist" as an expected revision of 0.
            let expected = if if_absent { Some(0) } else { if_revision };
            let request = pb::SetRequest {
                key,
                value,
                expected_mod_revision: expected,
                ttl_ms: ttl.unwrap_or(0),
            };
            set(client, request, output).await
        }
        Command::Delete { key, if_revision } => delete(client, key, if_revision, output).await,
        Command::List { prefix, limit } => list(client, prefix, limit, output).await,
        Command::Subscribe(args) => subscribe(client, args, output).await,
        Command::Health => health(channel, output).await,
    }
}

async fn get(mut client: Client, key: String, output: Output) -> anyhow::Result<ExitCode> {
    let response = client
        .get(pb::GetRequest { key: key.clone() })
        .await
        .map_err(StatusError)
        .context("get failed")?
        .into_inner();
    match output {
        Output::Text if response.found => {
            let expires = match response.ttl_ms {
                0 => String::new(),
                ms => format!(", expires in {}", format_ttl(ms)),
            };
            print_line(format_args!(
                "{key} = {}  (revision {}, version {}{expires})",
                response.value, response.mod_revision, response.version
            ))?;
        }
        Output::Text => report(format_args!("kvstore-client: key {key:?} not found")),
        Output::Json => print_json(&GetJson {
            key: &key,
            value: &response.value,
            found: response.found,
            create_revision: response.create_revision,
            mod_revision: response.mod_revision,
            version: response.version,
            ttl_ms: response.ttl_ms,
            revision: response.revision,
        })?,
    }
    Ok(if response.found {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_FOUND)
    })
}

async fn set(
    mut client: Client,
    request: pb::SetRequest,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let key = request.key.clone();
    let response = match client.set(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return write_refused("set", status),
    };
    // This server reports failures as a status, but the Go server it replaces answered
    // `success = false`, and this client may still talk to one.
    if !response.success {
        anyhow::bail!("set failed: {}", response.message);
    }
    match output {
        Output::Text if response.message.is_empty() => print_line(format_args!("OK"))?,
        Output::Text => print_line(format_args!("OK: {}", response.message))?,
        Output::Json => print_json(&SetJson {
            key: &key,
            success: response.success,
            message: &response.message,
            revision: response.revision,
        })?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn delete(
    mut client: Client,
    key: String,
    if_revision: Option<i64>,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let request = pb::DeleteRequest {
        key: key.clone(),
        expected_mod_revision: if_revision,
    };
    let response = match client.delete(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return write_refused("delete", status),
    };
    match output {
        Output::Text if response.deleted => print_line(format_args!(
            "deleted {key} (was at revision {})",
            response.prev_mod_revision
        ))?,
        Output::Text => report(format_args!("kvstore-client: key {key:?} not found")),
        Output::Json => print_json(&DeleteJson {
            key: &key,
            deleted: response.deleted,
            prev_mod_revision: response.prev_mod_revision,
            revision: response.revision,
        })?,
    }
    Ok(if response.deleted {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_FOUND)
    })
}

/// A write's failure. A compare-and-set guard that did not match is an expected outcome, not an
/// error: it is reported with the server's message (which names the current revision) and exit
/// code 4.
fn write_refused(op: &str, status: Status) -> anyhow::Result<ExitCode> {
    let guard_mismatch = status.code() == Code::FailedPrecondition;
    let err = anyhow::Error::new(StatusError(status)).context(format!("{op} failed"));
    if !guard_mismatch {
        return Err(err);
    }
    report(format_args!("kvstore-client: {err:#}"));
    Ok(ExitCode::from(EXIT_GUARD_MISMATCH))
}

/// Pages through the keys, printing each page as it arrives. Pages may be read at different
/// revisions; `subscribe --initial` is the consistent snapshot.
async fn list(
    mut client: Client,
    prefix: String,
    limit: Option<u64>,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let mut left = limit.unwrap_or(u64::MAX);
    let mut start_after = String::new();
    while left > 0 {
        let page = u32::try_from(left).map_or(LIST_PAGE, |left| left.min(LIST_PAGE));
        let response = client
            .list(pb::ListRequest {
                prefix: prefix.clone(),
                limit: page,
                start_after: start_after.clone(),
            })
            .await
            .map_err(StatusError)
            .context("list failed")?
            .into_inner();
        // Never more than asked for, even from a server that ignores the limit.
        for item in response.items.iter().take(page as usize) {
            let written = match output {
                Output::Text => write_line(format_args!("{} = {}", item.key, item.value)),
                Output::Json => write_json(&KeyValueJson::from(item)),
            };
            match written {
                Ok(()) => left -= 1,
                Err(err) if reader_gone(&err) => return Ok(ExitCode::SUCCESS),
                Err(err) => return Err(err).context("writing to stdout"),
            }
        }
        if !response.more {
            break;
        }
        // A next page that does not move forward would repeat this one forever.
        anyhow::ensure!(
            response.next_start_after > start_after,
            "list failed: the server's next page starts at {:?}, not after {start_after:?}",
            response.next_start_after
        );
        start_after = response.next_start_after;
    }
    Ok(ExitCode::SUCCESS)
}

async fn subscribe(
    client: Client,
    args: SubscribeArgs,
    output: Output,
) -> anyhow::Result<ExitCode> {
    // `ctrl_c` installs its handler when first polled, and `biased` polls it before `follow`
    // announces the subscription: a Ctrl-C right after the announcement, or while resuming,
    // must end with exit 0, not kill us.
    tokio::select! {
        biased;
        signal = tokio::signal::ctrl_c() => {
            signal.context("listening for Ctrl-C")?;
            Ok(ExitCode::SUCCESS)
        }
        code = follow(client, args, output) => code,
    }
}

/// Prints the subscription's events until it fails, resubscribing after a lag or a lost
/// connection when asked with `--resume`.
async fn follow(
    mut client: Client,
    args: SubscribeArgs,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let mut request = pb::SubscribeRequest {
        key_pattern: args.pattern,
        start_revision: args.from_revision.unwrap_or(0),
        initial: args.initial,
        progress_interval_ms: args.progress.unwrap_or(0),
    };
    if args.resume && request.start_revision == 0 && !request.initial {
        // "From now on" names no revision, and the server cannot say which one a stream began
        // after until it has sent something. Starting at a revision read first lets even a
        // stream lost before its first event resume without a gap.
        request.start_revision = current_revision(&mut client, &request.key_pattern).await? + 1;
    }
    let mut stream = match client.subscribe(request.clone()).await {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == Code::OutOfRange => {
            return Err(compacted(request.start_revision, status));
        }
        Err(status) => return Err(StatusError(status)).context("subscribe failed"),
    };
    // The server registers the subscription before it sends the response headers, so from here
    // on no write is missed; tests wait for this line before writing.
    report(format_args!(
        "subscribed to {:?} (Ctrl-C to stop)",
        request.key_pattern
    ));

    // The first revision not yet printed (0 until a snapshot is complete): what a resumed
    // subscription starts from. Replay and live events arrive in increasing revision order,
    // so every change below it has been printed. A snapshot's events come in key order and
    // say nothing of the revisions between them; its end marker, a PROGRESS event at its
    // revision, counts for all of them.
    let mut resume_from = request.start_revision;
    let mut backoff = Backoff::default();
    loop {
        let ended = loop {
            let event = match stream.message().await {
                Ok(Some(event)) => event,
                Ok(None) => break None,
                Err(status) => break Some(status),
            };
            // Revision 0 is an old server's: it knows no revisions.
            if event.revision > 0 && !event.initial {
                resume_from = resume_from.max(event.revision + 1);
            }
            backoff.delivered();
            match print_event(&event, output) {
                Ok(()) => {}
                // The reader went away (`| head`): like Ctrl-C, that is the user stopping us.
                Err(err) if reader_gone(&err) => return Ok(ExitCode::SUCCESS),
                Err(err) => return Err(err).context("writing to stdout"),
            }
        };
        let mut reason = match ended {
            Some(status) if args.resume && resumable(&status) => {
                // Events already in flight reach us before the trailer, so ours is usually the
                // same; the higher one is still the safe start.
                if let Some(last) = last_revision(&status) {
                    resume_from = resume_from.max(last + 1);
                }
                StatusError(status).to_string()
            }
            Some(status) => {
                return Err(StatusError(status)).context("subscription ended by the server");
            }
            // The server always ends a stream with a status, so a bare end is a broken one.
            None if args.resume => "the stream ended without a status".to_owned(),
            None => anyhow::bail!("subscription ended by the server without a status"),
        };

        if resume_from > 0 {
            request.start_revision = resume_from;
            request.initial = false;
            report(format_args!(
                "kvstore-client: resuming from revision {resume_from} after: {reason}"
            ));
        } else {
            // A snapshot cut short: it starts again, and its keys are printed again.
            report(format_args!(
                "kvstore-client: subscribing again with --initial after: {reason}"
            ));
        }
        stream = loop {
            backoff.wait(&reason).await?;
            match client.subscribe(request.clone()).await {
                Ok(response) => {
                    backoff.accepted();
                    break response.into_inner();
                }
                Err(status) if status.code() == Code::OutOfRange => {
                    return Err(compacted(request.start_revision, status));
                }
                Err(status) if resumable(&status) => reason = StatusError(status).to_string(),
                Err(status) => return Err(StatusError(status)).context("subscribe failed"),
            }
        };
    }
}

/// The store's current revision, from the smallest List that reports it.
async fn current_revision(client: &mut Client, prefix: &str) -> anyhow::Result<i64> {
    let page = client
        .list(pb::ListRequest {
            prefix: prefix.to_owned(),
            limit: 1,
            start_after: String::new(),
        })
        .await
        .map_err(StatusError)
        .context("subscribe failed: reading the current revision")?
        .into_inner();
    Ok(page.revision)
}

/// OUT_OF_RANGE: the history from `start` on is no longer retained (compacted), so the changes
/// since cannot be replayed; only a fresh snapshot can continue.
fn compacted(start: i64, status: Status) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot subscribe from revision {start}: {}; re-run with --initial to start from the \
         current values",
        StatusError(status)
    )
}

/// Whether a subscription that ended with `status` may be resumed: the server shed it (a lag,
/// a shutdown, an overload) or the connection broke, which tonic reports as UNKNOWN, INTERNAL
/// or CANCELLED with the transport error as the source. The server's own statuses carry no
/// source.
fn resumable(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::ResourceExhausted => true,
        Code::Unknown | Code::Internal | Code::Cancelled => status.source().is_some(),
        _ => false,
    }
}

/// The last revision a lagging subscriber was sent, from its stream's trailer.
fn last_revision(status: &Status) -> Option<i64> {
    let value = status.metadata().get(LAST_REVISION_TRAILER)?;
    value.to_str().ok()?.parse().ok().filter(|last| *last > 0)
}

/// Paces `subscribe --resume`. After a stream that delivered something the first attempt is
/// immediate (a lag is resumed at once); each failure then doubles the delay up to
/// [`RESUME_MAX_DELAY`], so a server that accepts and at once drops us is not hammered.
/// [`RESUME_GIVE_UP`] of failures with no subscription accepted in between gives up.
#[derive(Default)]
struct Backoff {
    delay: Duration,
    failing_since: Option<Instant>,
}

impl Backoff {
    fn delivered(&mut self) {
        self.delay = Duration::ZERO;
    }

    fn accepted(&mut self) {
        self.failing_since = None;
    }

    /// Waits before the next attempt, or fails once attempts have failed for too long.
    async fn wait(&mut self, reason: &str) -> anyhow::Result<()> {
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= RESUME_GIVE_UP {
            anyhow::bail!(
                "gave up resuming after {}: {reason}",
                humantime::format_duration(RESUME_GIVE_UP)
            );
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).clamp(RESUME_FIRST_DELAY, RESUME_MAX_DELAY);
        Ok(())
    }
}

async fn health(channel: Channel, output: Output) -> anyhow::Result<ExitCode> {
    let response = HealthClient::new(channel)
        // "" asks about the whole server rather than one service.
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(StatusError)
        .context("health check failed")?
        .into_inner();
    let status = response.status();
    match output {
        Output::Text => print_line(format_args!("{}", status.as_str_name()))?,
        Output::Json => print_json(&HealthJson {
            status: status.as_str_name(),
        })?,
    }
    Ok(if status == ServingStatus::Serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    })
}

fn print_event(event: &pb::ChangeEvent, output: Output) -> io::Result<()> {
    let change = event.change_type();
    if change == ChangeType::Progress {
        // Not a change: in text, a status for the person watching, kept out of the data.
        return match output {
            Output::Text => {
                report(format_args!("at revision {}", event.revision));
                Ok(())
            }
            Output::Json => write_json(&ProgressJson {
                kind: change.as_str_name(),
                revision: event.revision,
            }),
        };
    }
    let time = format_time(event.timestamp);
    match output {
        Output::Text => {
            let time = time.unwrap_or_else(|| event.timestamp.to_string());
            let head = format!("{time} #{} {}", event.revision, change.as_str_name());
            let note = if event.initial {
                " (initial)"
            } else if event.expired {
                " (expired)"
            } else {
                ""
            };
            match change {
                ChangeType::Set => {
                    write_line(format_args!("{head} {} = {}{note}", event.key, event.value))
                }
                ChangeType::Delete | ChangeType::Progress | ChangeType::Unknown => {
                    write_line(format_args!("{head} {}{note}", event.key))
                }
            }
        }
        Output::Json => write_json(&EventJson {
            kind: change.as_str_name(),
            key: &event.key,
            value: &event.value,
            timestamp: event.timestamp,
            time,
            revision: event.revision,
            expired: event.expired,
            initial: event.initial,
        }),
    }
}

/// RFC 3339 in UTC with milliseconds, or `None` for a timestamp before 1970 or after year 9999,
/// which humantime cannot show.
fn format_time(unix_ms: i64) -> Option<String> {
    let unix_ms = u64::try_from(unix_ms)
        .ok()
        .filter(|ms| *ms < MAX_FORMATTABLE_MS)?;
    let time = UNIX_EPOCH + Duration::from_millis(unix_ms);
    Some(humantime::format_rfc3339_millis(time).to_string())
}

/// A time to live as people read it: `29s`, `1h 2m 3s`. Rounded up to whole seconds, so a key
/// just set with `--ttl 30s` shows `30s`, not `29s`; under a second, in milliseconds.
fn format_ttl(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    humantime::format_duration(Duration::from_secs(ms.div_ceil(1000))).to_string()
}

#[derive(Serialize)]
struct GetJson<'a> {
    key: &'a str,
    value: &'a str,
    found: bool,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    ttl_ms: i64,
    revision: i64,
}

#[derive(Serialize)]
struct SetJson<'a> {
    key: &'a str,
    success: bool,
    message: &'a str,
    revision: i64,
}

#[derive(Serialize)]
struct DeleteJson<'a> {
    key: &'a str,
    deleted: bool,
    prev_mod_revision: i64,
    revision: i64,
}

#[derive(Serialize)]
struct KeyValueJson<'a> {
    key: &'a str,
    value: &'a str,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    ttl_ms: i64,
}

impl<'a> From<&'a pb::KeyValue> for KeyValueJson<'a> {
    fn from(item: &'a pb::KeyValue) -> Self {
        Self {
            key: &item.key,
            value: &item.value,
            create_revision: item.create_revision,
            mod_revision: item.mod_revision,
            version: item.version,
            ttl_ms: item.ttl_ms,
        }
    }
}

#[derive(Serialize)]
struct EventJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    key: &'a str,
    value: &'a str,
    timestamp: i64,
    time: Option<String>,
    revision: i64,
    expired: bool,
    initial: bool,
}

#[derive(Serialize)]
struct ProgressJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    revision: i64,
}

#[derive(Serialize)]
struct HealthJson<'a> {
    status: &'a str,
}

fn print_line(line: fmt::Arguments<'_>) -> anyhow::Result<()> {
    write_line(line).context("writing to stdout")
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    write_json(value).context("writing to stdout")
}

/// Flushes each line: stdout is often a pipe, and a subscriber's reader needs each event as it
/// arrives.
fn write_line(line: fmt::Arguments<'_>) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()
}

fn write_json(value: &impl Serialize) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    serde_json::to_writer(&mut stdout, value)?;
    writeln!(stdout)?;
    stdout.flush()
}

/// Whether a write failed because the reader of stdout went away (`| head`).
fn reader_gone(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::BrokenPipe
}

/// Writes one line to stderr. If stderr itself is gone there is nowhere left to report that.
fn report(line: fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "{line}");
}

/// A gRPC status shown as `INVALID_ARGUMENT: message`, the names the proto and other gRPC tools
/// use, instead of tonic's Display (`code: 'Client specified an invalid argument'`).
#[derive(Debug)]
struct StatusError(Status);

impl fmt::Display for StatusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let message = self.0.message();
        f.write_str(code_name(self.0.code()))?;
        if !message.is_empty() {
            write!(f, ": {message}")?;
        }
        // A status tonic made from a broken connection keeps the transport error as its
        // source, and only that says why: `tcp connect error: Connection refused`.
        if let Some(source) = self.0.source() {
            let causes = causes(source);
            let untold = causes
                .strip_prefix(message)
                .map_or(causes.as_str(), |rest| rest.trim_start_matches(": "));
            if !untold.is_empty() {
                write!(f, ": {untold}")?;
            }
        }
        Ok(())
    }
}

impl Error for StatusError {}

/// The causes of an error, outermost first, skipping the bare "transport error" that tonic puts
/// on top and the repeats hyper adds ("tcp connect error: tcp connect error: ...").
fn causes(err: &(dyn Error + 'static)) -> String {
    let mut line = String::new();
    let mut last = String::new();
    for cause in std::iter::successors(err.source().or(Some(err)), |&err| err.source()) {
        let text = cause.to_string();
        if text != last {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        last = text;
    }
    line
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
