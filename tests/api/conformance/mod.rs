//! The data-model contract (issue #22), checked against every backend through the real
//! server on loopback: concurrent seeded clients are recorded (`workload`), beside a
//! reference subscriber to every key, and the recording is checked exactly (`checker`).
//!
//! Adding a backend: add one entry to [`BACKENDS`], a name and a function returning the
//! `Settings` that select it (from `test_settings()`, so the listeners stay on loopback).
//! A backend is not done until every test here passes for it.
//!
//! CI runs a few thousand operations with a fixed seed; a longer run:
//! `KVSTORE_CONFORMANCE_OPS=200000 KVSTORE_CONFORMANCE_SEED=7 cargo test --release --test api conformance -- --nocapture`.

mod checker;
mod record;
mod scenarios;
mod selftest;
mod workload;

use kvstore::config::Settings;

use crate::helpers::test_settings;
use record::Run;

/// A backend the suite runs against.
struct Backend {
    name: &'static str,
    settings: fn() -> Settings,
}

const BACKENDS: &[Backend] = &[Backend {
    name: "memory",
    settings: test_settings,
}];

/// The seed of the clients' generators: `KVSTORE_CONFORMANCE_SEED`, or a fixed one.
fn seed() -> u64 {
    env_or("KVSTORE_CONFORMANCE_SEED", 22)
}

/// Client calls per run (a paged List counts once): `KVSTORE_CONFORMANCE_OPS`, or a few
/// seconds' worth in a debug build.
fn ops() -> usize {
    env_or("KVSTORE_CONFORMANCE_OPS", 3000)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
        Err(_) => default,
    }
}

/// Checks `run`, prints what was checked, and fails with the first violation.
fn judge(backend: &str, scenario: &str, run: &Run) {
    let report = checker::check(run);
    let events = run.history.len() + run.streams.iter().map(|s| s.events.len()).sum::<usize>();
    eprintln!(
        "conformance {backend}/{scenario}: seed {}, {} operations, {events} events, {} checks",
        seed(),
        run.calls.len(),
        report.checks
    );
    if let Some(first) = report.violations.first() {
        panic!(
            "conformance {backend}/{scenario}, seed {} ({} ops): {}{} violations; the first:\n{first}\n\
             reproduce with KVSTORE_CONFORMANCE_SEED={} KVSTORE_CONFORMANCE_OPS={}",
            seed(),
            ops(),
            report.violations.len(),
            if report.violations.len() == 100 {
                "+"
            } else {
                ""
            },
            seed(),
            ops()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_keeps_the_contract_under_concurrent_clients() {
    for backend in BACKENDS {
        let run = scenarios::clients(
            (backend.settings)(),
            seed(),
            ops(),
            scenarios::max_time(ops()),
        )
        .await;
        judge(backend.name, "clients", &run);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_ends_a_lagging_stream_after_a_gap_free_prefix_it_can_resume() {
    for backend in BACKENDS {
        let run = scenarios::lag((backend.settings)()).await;
        judge(backend.name, "lag", &run);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_refuses_a_resume_from_before_its_retained_history() {
    for backend in BACKENDS {
        let run = scenarios::compaction((backend.settings)()).await;
        judge(backend.name, "compaction", &run);
    }
}
