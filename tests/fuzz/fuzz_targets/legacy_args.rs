//! The Go client's command line rewritten for clap (`legacy_args::rewrite`), against a model
//! of Go's flag package: the rewritten line must carry the same flags with byte-for-byte the
//! same values (a value starting with `-` included), and the same arguments after them.

#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use arbitrary::Arbitrary;
use kvstore::legacy_args::rewrite;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Arg {
    /// `-name`, `--name`, with `=value` attached or not.
    Flag {
        two_dashes: bool,
        name: Name,
        attached: Option<Vec<u8>>,
    },
    /// Anything at all: a value, a word, invalid UTF-8.
    Word(Vec<u8>),
    DoubleDash,
}

#[derive(Debug, Arbitrary)]
enum Name {
    Op,
    Server,
    Key,
    Value,
    Pattern,
    Tls,
    H,
    Help,
    Other(String),
}

impl Arg {
    fn os(&self) -> OsString {
        match self {
            Arg::Flag {
                two_dashes,
                name,
                attached,
            } => {
                let mut bytes = if *two_dashes {
                    b"--".to_vec()
                } else {
                    b"-".to_vec()
                };
                bytes.extend_from_slice(match name {
                    Name::Op => b"op",
                    Name::Server => b"server",
                    Name::Key => b"key",
                    Name::Value => b"value",
                    Name::Pattern => b"pattern",
                    Name::Tls => b"tls",
                    Name::H => b"h",
                    Name::Help => b"help",
                    Name::Other(other) => other.as_bytes(),
                });
                if let Some(value) = attached {
                    bytes.push(b'=');
                    bytes.extend_from_slice(value);
                }
                OsString::from_vec(bytes)
            }
            Arg::Word(bytes) => OsString::from_vec(bytes.clone()),
            Arg::DoubleDash => "--".into(),
        }
    }
}

fuzz_target!(|input: Vec<Arg>| {
    let mut args = vec![OsString::from("kvstore-client")];
    args.extend(input.iter().map(Arg::os));
    let rewritten = rewrite(&args);

    let go_form = args[1..]
        .iter()
        .take_while(|arg| arg.as_bytes() != b"--")
        .any(|arg| {
            let arg = arg.as_bytes();
            let name = arg.strip_prefix(b"--").or_else(|| arg.strip_prefix(b"-"));
            name.is_some_and(|name| name == b"op" || name.starts_with(b"op="))
        });
    assert_eq!(rewritten.is_some(), go_form, "{args:?}");
    let Some(rewritten) = rewritten else {
        return;
    };
    assert_eq!(rewritten[0], args[0]);
    if let Some(go) = go_parse(&args[1..]) {
        assert_eq!(clap_view(&rewritten[1..]), go, "{args:?} -> {rewritten:?}");
    }
});

/// Flags as (name, value) and the arguments after them.
type Parsed = (Vec<(Vec<u8>, Option<Vec<u8>>)>, Vec<OsString>);

/// What Go's flag package makes of the arguments, with every flag but the `tls` switch
/// taking a value; `None` where Go stops with an error or help, which clap reports too.
fn go_parse(args: &[OsString]) -> Option<Parsed> {
    let mut flags = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let bytes = arg.as_bytes();
        if bytes.len() < 2 || bytes[0] != b'-' {
            let mut after = vec![arg.clone()];
            after.extend(rest.cloned());
            return Some((flags, after));
        }
        if bytes == b"--" {
            // Go drops it; clap needs it, to take what follows as arguments.
            let mut after = vec![arg.clone()];
            after.extend(rest.cloned());
            return Some((flags, after));
        }
        // Not text: kvstore-client passes it on for clap to refuse, as Go refuses it.
        arg.to_str()?;
        let name = bytes.strip_prefix(b"--").unwrap_or(&bytes[1..]);
        if name.is_empty() || name[0] == b'-' || name[0] == b'=' {
            return None;
        }
        let (name, attached) = match name.iter().position(|&b| b == b'=') {
            Some(at) => (&name[..at], Some(name[at + 1..].to_vec())),
            None => (name, None),
        };
        let value = match (name, attached) {
            (b"h" | b"help", _) => return None,
            (_, Some(value)) => Some(value),
            (b"tls", None) => None,
            (_, None) => Some(rest.next()?.as_bytes().to_vec()),
        };
        flags.push((name.to_vec(), value));
    }
    Some((flags, Vec::new()))
}

/// How clap reads the rewritten arguments: `--name=value` and `--name` until the first
/// argument that is neither.
fn clap_view(args: &[OsString]) -> Parsed {
    let mut flags = Vec::new();
    for (i, arg) in args.iter().enumerate() {
        let bytes = arg.as_bytes();
        let flag = bytes.strip_prefix(b"--").filter(|name| !name.is_empty());
        let Some(flag) = flag else {
            return (flags, args[i..].to_vec());
        };
        match flag.iter().position(|&b| b == b'=') {
            Some(at) => flags.push((flag[..at].to_vec(), Some(flag[at + 1..].to_vec()))),
            None => flags.push((flag.to_vec(), None)),
        }
    }
    (flags, Vec::new())
}
