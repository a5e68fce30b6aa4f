//! `kvstore-client`: the command-line client of the kvstore gRPC API (get, set, delete, list,
//! subscribe, health), printing text for people or one JSON object per line for scripts. It also
//! accepts the flags of the original Go client (`-op=get -key=user:1`), so existing scripts keep
//! working.

mod commands;
mod output;
mod subscribe;

use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum, error::ErrorKind};
use kvstore::client::{self, Client, ClientBuilder, RetryPolicy, Tls};
use kvstore::token::BearerToken;

use crate::output::{Output, report};

const EXIT_NOT_FOUND: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_FAILURE: u8 = 3;
const EXIT_GUARD_MISMATCH: u8 = 4;

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
        value_parser = server_address
    )]
    server: String,

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
    /// The client these options describe. Its TLS is on with --tls, an https:// address,
    /// --ca-cert or --client-cert; a file that cannot be used is an error naming its flag.
    /// Calls are not retried: a command fails as soon as its call does (a subscription with
    /// --resume resumes).
    fn client(&self) -> anyhow::Result<ClientBuilder> {
        let mut builder = Client::builder([self.server.clone()])
            .retry(RetryPolicy::default().attempts(1))
            .token(self.token.clone().unwrap_or_default());
        let TlsArgs {
            tls,
            ca_cert,
            client_cert,
            client_key,
        } = &self.tls;
        if *tls || ca_cert.is_some() || client_cert.is_some() {
            let mut settings = Tls::new();
            if let Some(path) = ca_cert {
                let pem = read_pem("--ca-cert", path)?;
                settings = settings
                    .ca_certificate(pem)
                    .map_err(|err| anyhow::anyhow!("--ca-cert {}: {err}", path.display()))?;
            }
            if let Some((cert, key)) = client_cert.as_ref().zip(client_key.as_ref()) {
                settings = settings.identity(
                    read_pem("--client-cert", cert)?,
                    read_pem("--client-key", key)?,
                );
            }
            builder = builder.tls(settings);
        }
        Ok(builder)
    }
}

fn read_pem(flag: &str, path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}: cannot read", path.display()))
}

/// Checks an address as clap parses the flag, so a bad one is a usage error.
fn server_address(addr: &str) -> Result<String, String> {
    kvstore::endpoint::parse_url(addr).map(|_| addr.to_owned())
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
pub(crate) struct SubscribeArgs {
    /// A key prefix, without wildcards; "" matches every key.
    pub(crate) pattern: String,
    /// First replay the retained changes from revision N on, then continue live.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
    pub(crate) from_revision: Option<i64>,
    /// First print the current value of every matching key, then continue live.
    #[arg(long, conflicts_with = "from_revision")]
    pub(crate) initial: bool,
    /// Have the server report the revision reached after this long without a change.
    #[arg(long, value_name = "DURATION", value_parser = parse_millis)]
    pub(crate) progress: Option<i64>,
    /// After a lag or a lost connection, subscribe again from the last revision seen.
    #[arg(long)]
    pub(crate) resume: bool,
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
    let (common, command) = parse_args(std::env::args_os().collect());
    let builder = match common.client() {
        Ok(builder) => builder,
        Err(err) => {
            report(format_args!("kvstore-client: {err:#}"));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let client = match builder.connect().await {
        Ok(client) => client,
        // Settings TLS refuses are the user's to fix, like a bad flag.
        Err(err @ client::Error::Config(_)) => {
            report(format_args!("kvstore-client: {err}"));
            return ExitCode::from(EXIT_USAGE);
        }
        Err(err) => {
            report(format_args!("kvstore-client: {err}"));
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match run(client, common.output, command).await {
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

async fn run(client: Client, output: Output, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Get { key } => commands::get(&client, key, output).await,
        Command::Set {
            key,
            value,
            ttl,
            if_revision,
            if_absent,
        } => {
            let mut options = client::SetOptions::new();
            if let Some(ms) = ttl {
                options = options.ttl(std::time::Duration::from_millis(ms.unsigned_abs()));
            }
            if let Some(revision) = if_revision {
                options = options.if_mod_revision(revision);
            }
            if if_absent {
                options = options.if_absent();
            }
            commands::set(&client, key, value, options, output).await
        }
        Command::Delete { key, if_revision } => {
            commands::delete(&client, key, if_revision, output).await
        }
        Command::List { prefix, limit } => commands::list(&client, prefix, limit, output).await,
        Command::Subscribe(args) => subscribe::subscribe(&client, args, output).await,
        Command::Health => commands::health(&client, output).await,
    }
}
