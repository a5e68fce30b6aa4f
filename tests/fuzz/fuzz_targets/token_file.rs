//! Token file text (`auth::Keyring::add_file_text`): never a panic; every line with fields
//! becomes a token, or the error names the line and says what is wrong without quoting it
//! (a misplaced token may be among its fields).

#![no_main]

use std::path::Path;

use kvstore::auth::Keyring;
use libfuzzer_sys::fuzz_target;

const ROLE: &str = "the role (first field) must be read or readwrite";
const DIGEST: &str = "the second field must be a SHA-256 digest (64 hex digits), not the token itself: `kvstore-server hash-token` prints it";

fuzz_target!(|text: &str| {
    let fields = |line: &str| {
        let content = line.split('#').next().unwrap_or_default();
        content.split_whitespace().count()
    };
    let mut keyring = Keyring::default();
    match keyring.add_file_text(Path::new("tokens.txt"), text) {
        Ok(()) => {
            let tokens = text.lines().filter(|line| fields(line) > 0).count();
            assert_eq!(keyring.len(), tokens);
        }
        Err(err) => {
            assert_eq!(err.key, "auth.token_file");
            let (n, problem) = err
                .problem
                .strip_prefix("tokens.txt:")
                .and_then(|rest| rest.split_once(": "))
                .unwrap_or_else(|| panic!("names the file and line: {err}"));
            let n: usize = n.parse().expect("a line number");
            let line = text.lines().nth(n - 1).expect("the line exists");
            let count = format!(
                "expected `ROLE SHA256 [NAME]`, found {} fields",
                fields(line)
            );
            let repeat = problem.starts_with("repeats the digest of token \"")
                && problem.ends_with("\"; each token has one role");
            assert!(
                problem == ROLE || problem == DIGEST || problem == count || repeat,
                "{problem:?}"
            );
        }
    }
});
