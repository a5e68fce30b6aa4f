//! What `kvstore-client` prints: results on stdout as text for people or one JSON object per
//! line for scripts, notes and errors on stderr. Every line is flushed as it is written.

use std::fmt;
use std::io::{self, Write};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use clap::ValueEnum;
use kvstore::client::{Change, ChangeKind, DeleteResponse, GetResponse, KeyValue, SetResponse};
use serde::Serialize;

/// humantime cannot format year 10000 or later.
const MAX_FORMATTABLE_MS: u64 = 253_402_300_800_000;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    /// Lines for people: `user:1 = Alice`.
    Text,
    /// One JSON object per line.
    Json,
}

impl Output {
    /// A get's answer: the value with its revision, or a note on stderr when the key is missing.
    pub fn get(self, key: &str, response: &GetResponse) -> anyhow::Result<()> {
        match (self, &response.kv) {
            (Output::Text, Some(kv)) => {
                let expires = match ttl_ms(kv.ttl) {
                    0 => String::new(),
                    ms => format!(", expires in {}", format_ttl(ms)),
                };
                print_line(format_args!(
                    "{key} = {}  (revision {}, version {}{expires})",
                    kv.value, kv.mod_revision, kv.version
                ))
            }
            (Output::Text, None) => {
                report(format_args!("kvstore-client: key {key:?} not found"));
                Ok(())
            }
            (Output::Json, kv) => print_json(&GetJson {
                key,
                value: kv.as_ref().map_or("", |kv| &kv.value),
                found: kv.is_some(),
                create_revision: kv.as_ref().map_or(0, |kv| kv.create_revision),
                mod_revision: kv.as_ref().map_or(0, |kv| kv.mod_revision),
                version: kv.as_ref().map_or(0, |kv| kv.version),
                ttl_ms: kv.as_ref().map_or(0, |kv| ttl_ms(kv.ttl)),
                revision: response.revision,
            }),
        }
    }

    pub fn set(self, key: &str, response: &SetResponse) -> anyhow::Result<()> {
        match self {
            Output::Text if response.message.is_empty() => print_line(format_args!("OK")),
            Output::Text => print_line(format_args!("OK: {}", response.message)),
            Output::Json => print_json(&SetJson {
                key,
                success: true,
                message: &response.message,
                revision: response.revision,
            }),
        }
    }

    pub fn delete(self, key: &str, response: &DeleteResponse) -> anyhow::Result<()> {
        match self {
            Output::Text if response.deleted => print_line(format_args!(
                "deleted {key} (was at revision {})",
                response.prev_mod_revision
            )),
            Output::Text => {
                report(format_args!("kvstore-client: key {key:?} not found"));
                Ok(())
            }
            Output::Json => print_json(&DeleteJson {
                key,
                deleted: response.deleted,
                prev_mod_revision: response.prev_mod_revision,
                revision: response.revision,
            }),
        }
    }

    /// One key of a listing.
    pub fn item(self, item: &KeyValue) -> io::Result<()> {
        match self {
            Output::Text => write_line(format_args!("{} = {}", item.key, item.value)),
            Output::Json => write_json(&KeyValueJson::from(item)),
        }
    }

    pub fn health(self, status: &str) -> anyhow::Result<()> {
        match self {
            Output::Text => print_line(format_args!("{status}")),
            Output::Json => print_json(&HealthJson { status }),
        }
    }

    pub fn change(self, change: &Change) -> io::Result<()> {
        let time = format_time(change.timestamp_ms);
        let kind = change.kind.as_str();
        match self {
            Output::Text => {
                let time = time.unwrap_or_else(|| change.timestamp_ms.to_string());
                let head = format!("{time} #{} {kind}", change.revision);
                let note = if change.initial {
                    " (initial)"
                } else if change.expired {
                    " (expired)"
                } else {
                    ""
                };
                match change.kind {
                    ChangeKind::Set => write_line(format_args!(
                        "{head} {} = {}{note}",
                        change.key, change.value
                    )),
                    ChangeKind::Delete | ChangeKind::Other(_) => {
                        write_line(format_args!("{head} {}{note}", change.key))
                    }
                }
            }
            Output::Json => write_json(&EventJson {
                kind,
                key: &change.key,
                value: &change.value,
                timestamp: change.timestamp_ms,
                time,
                revision: change.revision,
                expired: change.expired,
                initial: change.initial,
            }),
        }
    }

    /// Not a change: in text, a status for the person watching, kept out of the data.
    pub fn progress(self, revision: i64) -> io::Result<()> {
        match self {
            Output::Text => {
                report(format_args!("at revision {revision}"));
                Ok(())
            }
            Output::Json => write_json(&ProgressJson {
                kind: "PROGRESS",
                revision,
            }),
        }
    }
}

fn ttl_ms(ttl: Option<Duration>) -> i64 {
    ttl.map_or(0, |ttl| i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
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

impl<'a> From<&'a KeyValue> for KeyValueJson<'a> {
    fn from(item: &'a KeyValue) -> Self {
        Self {
            key: &item.key,
            value: &item.value,
            create_revision: item.create_revision,
            mod_revision: item.mod_revision,
            version: item.version,
            ttl_ms: ttl_ms(item.ttl),
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
pub fn reader_gone(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::BrokenPipe
}

/// Writes one line to stderr. If stderr itself is gone there is nowhere left to report that.
pub fn report(line: fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "{line}");
}
