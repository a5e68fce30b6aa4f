//! How long a writer waits while the store does work proportional to its data: a writer sets
//! keys in a loop over a store of a million keys while (a) ten subscribers ask for a snapshot
//! of every key and read nothing, (b) every key expires in the same second, and (c) 10,000
//! subscribers of one prefix leave at once. Prints the writer's p50, p99 and max latency per
//! case, with a quiet round first as the baseline. Last, (d): what a set of a 4 KiB key
//! costs with 4,096 idle subscribers, one at each prefix length, that it does not match.
//!
//! `cargo bench --bench stalls` (about a minute); `KVSTORE_STALL_KEYS=N` for another size.

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use kvstore::config::{Settings, SubscriptionSettings};
use kvstore::store::{SetOptions, Start, Store};

/// Subscribers that leave together in case (c).
const LEAVERS: usize = 10_000;

fn store() -> Store {
    let settings = Settings::default();
    let subscriptions = SubscriptionSettings {
        max: LEAVERS + 100,
        ..settings.subscriptions.store
    };
    Store::new(subscriptions, settings.history)
}

/// Fills the store; with `expire_at`, every key gets a TTL that ends then.
fn fill(store: &Store, keys: usize, expire_at: Option<Instant>) {
    for i in 0..keys {
        let options = SetOptions {
            expected_mod_revision: None,
            ttl: expire_at.map(|at| at.saturating_duration_since(Instant::now())),
        };
        store
            .set(format!("key:{i:09}"), "v".repeat(16), options)
            .expect("no guard");
    }
}

/// Sets keys in a loop (not the filled ones) until `stop`, and returns each set's latency.
fn writer(store: &Store, stop: &AtomicBool) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(1 << 20);
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) && latencies.len() < 50_000_000 {
        let started = Instant::now();
        store
            .set(format!("w:{}", i % 1000), "x".into(), SetOptions::default())
            .expect("no guard");
        latencies.push(started.elapsed());
        i += 1;
        // A writer at a steady rate, not one that owns the lock.
        thread::sleep(Duration::from_micros(50));
    }
    latencies
}

/// Runs `event` on another thread while the writer writes for `length`, the event starting
/// a quarter of the way in; returns the writer's latencies.
fn measure(store: &Store, length: Duration, event: impl FnOnce() + Send) -> Vec<Duration> {
    let stop = AtomicBool::new(false);
    let start = Barrier::new(2);
    thread::scope(|scope| {
        let writing = scope.spawn(|| {
            start.wait();
            writer(store, &stop)
        });
        start.wait();
        thread::sleep(length / 4);
        event();
        thread::sleep(length * 3 / 4);
        stop.store(true, Ordering::Relaxed);
        writing.join().expect("the writer does not panic")
    })
}

fn report(case: &str, mut latencies: Vec<Duration>) {
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    println!(
        "{case:<46} {:>8} sets  p50 {:>9.3?}  p99 {:>9.3?}  max {:>9.3?}",
        latencies.len(),
        at(0.5),
        at(0.99),
        latencies[latencies.len() - 1]
    );
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        println!("stalls: bench");
        return;
    }
    let keys = std::env::var("KVSTORE_STALL_KEYS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let length = Duration::from_secs(4);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");

    let quiet = store();
    fill(&quiet, keys, None);
    report("quiet (baseline)", measure(&quiet, length, || {}));

    let snapshots = store();
    fill(&snapshots, keys, None);
    let mut held = Vec::new();
    report(
        "(a) 10 unread snapshots of every key",
        measure(&snapshots, length, || {
            for _ in 0..10 {
                held.push(snapshots.subscribe(String::new(), Start::Snapshot));
            }
        }),
    );
    drop(held);
    drop(snapshots);

    // (b) Every key gets a TTL ending in the same second; the store's background task
    // sweeps them as the server runs it.
    let expiring = store();
    let stop = tokio_util::sync::CancellationToken::new();
    let sweeper = runtime.spawn({
        let (expiring, stop) = (expiring.clone(), stop.clone());
        async move { expiring.expire_until(stop.cancelled_owned()).await }
    });
    // Far enough ahead for the fill to end first.
    let expire_at = Instant::now() + Duration::from_secs(8);
    fill(&expiring, keys, Some(expire_at));
    assert!(Instant::now() + length / 4 < expire_at, "filled too slowly");
    thread::sleep((expire_at - length / 4).saturating_duration_since(Instant::now()));
    report(
        "(b) every key expires in the same second",
        measure(&expiring, length, || {}),
    );
    assert!(expiring.len() <= 1000, "{} keys left", expiring.len());
    stop.cancel();
    runtime.block_on(sweeper).expect("the sweeper ends");
    drop(expiring);

    let leaving = store();
    fill(&leaving, keys, None);
    let subscribers: Vec<_> = (0..LEAVERS)
        .map(|_| leaving.subscribe("key:".into(), Start::Now))
        .collect();
    let mut subscribers = Some(subscribers);
    report(
        "(c) 10,000 subscribers of one prefix leave",
        measure(&leaving, length, || drop(subscribers.take())),
    );
    drop(leaving);

    let lengths = store();
    let mean_set = |store: &Store| {
        let started = Instant::now();
        for i in 0..2_000u32 {
            let key = format!("{i:04}{}", "b".repeat(4092));
            store
                .set(key, "v".into(), SetOptions::default())
                .expect("no guard");
        }
        started.elapsed() / 2_000
    };
    let alone = mean_set(&lengths);
    let idle: Vec<_> = (1..=4096)
        .map(|n| lengths.subscribe("a".repeat(n), Start::Now))
        .collect();
    let with = mean_set(&lengths);
    println!(
        "(d) a set of a 4 KiB key: {alone:.1?} alone, {with:.1?} with 4,096 prefix lengths subscribed ({:.2}x)",
        with.as_secs_f64() / alone.as_secs_f64()
    );
    drop(idle);
}
