//! The original Go client's command line (`-server=ADDR -op=get -key=user:1`), rewritten into
//! the `--flag=value` form that `kvstore-client`'s clap parser takes. Kept apart from the
//! binary so the rewriting can be fuzzed; clap still does all the checking.

use std::ffi::OsString;

/// Returns the arguments (the program's name first) rewritten for clap when they use the Go
/// client's `-op` flag, or `None` for the subcommand form.
///
/// Go's flag package takes `-flag=value`, `--flag=value`, `-flag value` and `--flag value`, and
/// every Go client flag takes a value. Each becomes `--flag=value`, so that a value starting
/// with `-` stays a value.
pub fn rewrite(args: &[OsString]) -> Option<Vec<OsString>> {
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
        } else if flag == "tls" {
            // Ours, not the Go client's: a switch, so it takes no value.
            rewritten.push("--tls".into());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn each_go_flag_form_becomes_one_flag_with_its_value() {
        let rewritten = rewrite(&args(&[
            "kvstore-client",
            "-server",
            "localhost:1",
            "--op=set",
            "-key=k",
            "--value",
            "-5",
            "-tls",
        ]));
        assert_eq!(
            rewritten,
            Some(args(&[
                "kvstore-client",
                "--server=localhost:1",
                "--op=set",
                "--key=k",
                "--value=-5",
                "--tls",
            ]))
        );
    }

    #[test]
    fn only_an_op_flag_before_a_double_dash_makes_the_go_form() {
        assert_eq!(rewrite(&args(&["c", "get", "k"])), None);
        assert_eq!(rewrite(&args(&["c", "set", "k", "--", "-op"])), None);
        assert_eq!(rewrite(&args(&[])), None);
        // Go stops at the first non-flag; clap then refuses what follows.
        assert_eq!(
            rewrite(&args(&["c", "-op", "get", "stray", "-key", "k"])),
            Some(args(&["c", "--op=get", "stray", "-key", "k"]))
        );
    }
}
