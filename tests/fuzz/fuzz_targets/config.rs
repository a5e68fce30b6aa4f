//! Config file text through the server's own extraction and checks (`config::from_toml`,
//! then `Startup::build`, which reads the files it names): never a panic; either settings that print (`--print-config`) and parse back to
//! themselves, or one line of error.

#![no_main]

use kvstore::config::{ConfigError, Settings};
use kvstore::startup::Startup;
use libfuzzer_sys::{Corpus, fuzz_target};

fuzz_target!(|text: &str| -> Corpus {
    if names_files_elsewhere(text) {
        return Corpus::Reject;
    }
    match checked(text) {
        Ok(settings) => {
            let printed = settings.to_toml();
            assert_eq!(
                checked(&printed).as_ref(),
                Ok(&settings),
                "printed:\n{printed}"
            );
        }
        Err(err) => {
            let message = err.to_string();
            assert!(message.starts_with("configuration error: "), "{message:?}");
            assert!(!message.contains(['\n', '\r']), "{message:?}");
        }
    }
    Corpus::Keep
});

/// The settings of a config file with this text, as the server would start with them.
fn checked(text: &str) -> Result<Settings, ConfigError> {
    let loaded = kvstore::config::from_toml(text)?;
    Startup::build(loaded).map(|startup| startup.settings)
}

/// Whether a string in the text could name a file outside the working directory. The checks
/// read the TLS and token files; /dev/zero or a FIFO would hang the run without finding a
/// bug, so such inputs are skipped.
fn names_files_elsewhere(text: &str) -> bool {
    fn any_path(value: &toml::Value) -> bool {
        match value {
            toml::Value::String(s) => s.contains('/'),
            toml::Value::Array(items) => items.iter().any(any_path),
            toml::Value::Table(table) => table.values().any(any_path),
            _ => false,
        }
    }
    text.parse::<toml::Table>()
        .is_ok_and(|table| table.values().any(any_path))
}
