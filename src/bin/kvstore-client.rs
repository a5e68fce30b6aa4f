//! `kvstore-client`: the command-line client of the kvstore gRPC API (get, set, subscribe,
//! health), printing text for people or one JSON object per line for scripts. It also accepts
//! the flags of the original Go client (`-op=get -key=user:1`), so existing scripts keep working.

use std::{
    error::Error,
    ffi::OsString,
    fmt,
    io::{self, Write},
    pin::pin,
    process::ExitCode,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum, error::ErrorKind};
use kvstore::pb::{self, change_event::ChangeType, key_value_store_client::KeyValueStoreClient};
use serde::Serialize;
use tonic::{
    Code, Status,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const EXIT_NOT_FOUND: u8 = 1;
const EXIT_FAILURE: u8 = 3;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Far above the server's value limit (1 MiB by default), so that limit is the one that applies
/// and is reported with its setting's name, rather than a client-side decoding error.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// humantime cannot format year 10000 or later.
const MAX_FORMATTABLE_MS: u64 = 253_402_300_800_000;

const AFTER_HELP: &str = "\
Exit codes:
  0  success, including a subscription stopped with Ctrl-C
  1  get: the key does not exist
  2  usage error
  3  the server is unreachable or answered with an error status, the server ended a
     subscription, or health is not SERVING

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
    /// Server address: host:port or http://host:port.
    #[arg(
        long,
        global = true,
        env = "KVSTORE_ENDPOINT",
        default_value = "localhost:50051",
        value_parser = parse_server
    )]
    server: Endpoint,

    /// Output format of the results on stdout; errors are always text on stderr.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the value of KEY (exit 1 if the key does not exist).
    Get {
        /// The key to read.
        key: String,
    },
    /// Store VALUE under KEY, replacing any previous value.
    Set {
        /// The key to write.
        key: String,
        /// The value; may be empty.
        value: String,
    },
    /// Print every change made from now on to a key that starts with PATTERN, until Ctrl-C.
    Subscribe {
        /// A key prefix, without wildcards; "" matches every key.
        pattern: String,
    },
    /// Check the server's gRPC health (exit 3 unless SERVING).
    Health,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    /// Lines for people: `user:1 = Alice`.
    Text,
    /// One JSON object per line.
    Json,
}

/// The original Go client's flags, once `legacy_args` has rewritten them for clap.
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
    let (common, command) = parse_args(std::env::args_os().collect());
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
    let Some(args) = legacy_args(&args) else {
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
        },
        LegacyOp::Subscribe => Command::Subscribe {
            pattern: legacy.pattern.clone(),
        },
    };
    (legacy.common, command)
}

/// Returns the arguments rewritten for `LegacyArgs` when they use the Go client's `-op` flag, or
/// `None` for the subcommand form.
///
/// Go's flag package takes `-flag=value`, `--flag=value`, `-flag value` and `--flag value`, and
/// every Go client flag takes a value. Each becomes `--flag=value`, so that a value starting
/// with `-` stays a value.
fn legacy_args(args: &[OsString]) -> Option<Vec<OsString>> {
    let (program, rest) = args.split_first()?;
    let is_legacy = rest.iter().take_while(|arg| *arg != "--").any(|arg| {
        let arg = arg.to_string_lossy();
        let name = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'));
        name.is_some_and(|name| name == "op" || name.starts_with("op="))
    });
    if !is_legacy {
        return None;
    }

    let mut rewritten = vec![program.clone()];
    let mut rest = rest.iter();
    while let Some(arg) = rest.next() {
        let flag = arg
            .to_str()
            .filter(|arg| arg.len() > 1 && *arg != "--")
            .and_then(|arg| arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')));
        let Some(flag) = flag else {
            // Go stops at the first non-flag; clap then rejects it as unexpected.
            rewritten.push(arg.clone());
            rewritten.extend(rest.cloned());
            break;
        };
        if flag == "h" {
            rewritten.push("-h".into());
        } else if flag.contains('=') || flag == "help" {
            rewritten.push(format!("--{flag}").into());
        } else if let Some(value) = rest.next() {
            let mut joined = OsString::from(format!("--{flag}="));
            joined.push(value);
            rewritten.push(joined);
        } else {
            rewritten.push(format!("--{flag}").into());
        }
    }
    Some(rewritten)
}

/// Accepts `host:port` or a full `http://host:port` URL.
fn parse_server(addr: &str) -> Result<Endpoint, String> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(url.clone()).map_err(|err| format!("{url}: {err}"))?;
    let uri = endpoint.uri();
    if uri.scheme_str() != Some("http") {
        // tonic is built without TLS, so https could never connect.
        return Err(format!("{url}: only http:// is supported"));
    }
    if uri.port().is_none() || !matches!(uri.path(), "" | "/") {
        return Err(format!("{url}: expected host:port or http://host:port"));
    }
    Ok(endpoint.connect_timeout(CONNECT_TIMEOUT))
}

async fn run(common: Common, command: Command) -> anyhow::Result<ExitCode> {
    let Common { server, output } = common;
    let channel = server.connect().await.map_err(|err| {
        let url = server.uri().to_string();
        let url = url.trim_end_matches('/');
        anyhow::anyhow!("cannot reach server at {url}: {}", causes(&err))
    })?;
    let client = KeyValueStoreClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    match command {
        Command::Get { key } => get(client, key, output).await,
        Command::Set { key, value } => set(client, key, value, output).await,
        Command::Subscribe { pattern } => subscribe(client, pattern, output).await,
        Command::Health => health(channel, output).await,
    }
}

async fn get(
    mut client: KeyValueStoreClient<Channel>,
    key: String,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let response = client
        .get(pb::GetRequest { key: key.clone() })
        .await
        .map_err(StatusError)
        .context("get failed")?
        .into_inner();
    match output {
        Output::Text if response.found => print_line(format_args!("{key} = {}", response.value))?,
        Output::Text => report(format_args!("kvstore-client: key {key:?} not found")),
        Output::Json => print_json(&GetJson {
            key: &key,
            value: &response.value,
            found: response.found,
        })?,
    }
    Ok(if response.found {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_FOUND)
    })
}

async fn set(
    mut client: KeyValueStoreClient<Channel>,
    key: String,
    value: String,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let response = client
        .set(pb::SetRequest {
            key: key.clone(),
            value,
        })
        .await
        .map_err(StatusError)
        .context("set failed")?
        .into_inner();
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
        })?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn subscribe(
    mut client: KeyValueStoreClient<Channel>,
    pattern: String,
    output: Output,
) -> anyhow::Result<ExitCode> {
    // `ctrl_c` installs its handler when first polled, so it is polled before the subscription
    // is announced: a Ctrl-C right after the announcement must end with exit 0, not kill us.
    let mut ctrl_c = pin!(tokio::signal::ctrl_c());
    let response = tokio::select! {
        biased;
        signal = &mut ctrl_c => {
            signal.context("listening for Ctrl-C")?;
            return Ok(ExitCode::SUCCESS);
        }
        response = client.subscribe(pb::SubscribeRequest { key_pattern: pattern.clone() }) => response,
    };
    let mut stream = response
        .map_err(StatusError)
        .context("subscribe failed")?
        .into_inner();
    // The server registers the subscription before it sends the response headers, so from here
    // on no write is missed; tests wait for this line before writing.
    report(format_args!("subscribed to {pattern:?} (Ctrl-C to stop)"));

    loop {
        let message = tokio::select! {
            signal = &mut ctrl_c => {
                signal.context("listening for Ctrl-C")?;
                return Ok(ExitCode::SUCCESS);
            }
            message = stream.message() => message,
        };
        let event = match message {
            Ok(Some(event)) => event,
            Err(status) => {
                return Err(StatusError(status)).context("subscription ended by the server");
            }
            // The server always ends a stream with a reason, so a bare end is a failure too.
            Ok(None) => anyhow::bail!("subscription ended by the server without a status"),
        };
        match print_event(&event, output) {
            Ok(()) => {}
            // The reader went away (`| head`): like Ctrl-C, that is the user stopping us.
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
            Err(err) => return Err(err).context("writing to stdout"),
        }
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
    let time = format_time(event.timestamp);
    match output {
        Output::Text => {
            let time = time.unwrap_or_else(|| event.timestamp.to_string());
            let change = change.as_str_name();
            match event.change_type() {
                ChangeType::Set => write_line(format_args!(
                    "{time} {change} {} = {}",
                    event.key, event.value
                )),
                ChangeType::Delete | ChangeType::Unknown => {
                    write_line(format_args!("{time} {change} {}", event.key))
                }
            }
        }
        Output::Json => write_json(&EventJson {
            kind: change.as_str_name(),
            key: &event.key,
            value: &event.value,
            timestamp: event.timestamp,
            time,
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

#[derive(Serialize)]
struct GetJson<'a> {
    key: &'a str,
    value: &'a str,
    found: bool,
}

#[derive(Serialize)]
struct SetJson<'a> {
    key: &'a str,
    success: bool,
    message: &'a str,
}

#[derive(Serialize)]
struct EventJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    key: &'a str,
    value: &'a str,
    timestamp: i64,
    time: Option<String>,
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
        f.write_str(code_name(self.0.code()))?;
        if !self.0.message().is_empty() {
            write!(f, ": {}", self.0.message())?;
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
