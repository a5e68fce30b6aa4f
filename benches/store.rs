//! Criterion micro-benchmarks of the `Store` alone, with no gRPC in front: get and set with every
//! core hammering one store, what idle subscribers cost a set, and a prefix listing in a large
//! map. `cargo bench --bench store` runs them in about a minute; load tests through the server
//! are `kvstore-bench`'s.

use std::hint::black_box;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvstore::config::{Settings, SubscriptionSettings};
use kvstore::store::{SetOptions, Start, Store};

/// Keys the get and set benchmarks spread over.
const KEYS: u64 = 100_000;

/// Idle subscribers in the subscription benchmark.
const SUBSCRIBERS: usize = 10_000;

/// The map of the listing benchmark, and the size of the prefix it lists.
const LIST_MAP: u64 = 1_000_000;
const LIST_PAGE: usize = 1000;

fn key(index: u64) -> String {
    format!("key:{index:012}")
}

/// A store as the server builds it by default, with room for `subscribers` subscriptions.
fn store(subscribers: usize) -> Store {
    let settings = Settings::default();
    let subscriptions = SubscriptionSettings {
        max: settings.subscriptions.max.max(subscribers),
        ..settings.subscriptions.store
    };
    Store::new(subscriptions, settings.history)
}

fn filled(subscribers: usize, count: u64) -> (Store, Vec<String>) {
    let store = store(subscribers);
    let keys: Vec<String> = (0..count).map(key).collect();
    for key in &keys {
        store
            .set(key.clone(), "v".repeat(64), SetOptions::default())
            .expect("an unguarded set cannot conflict");
    }
    (store, keys)
}

/// The `i`th key a thread touches: scattered over the key space, and different per thread, so
/// threads contend for the store's lock rather than for one entry's cache line.
fn scattered(thread: usize, i: u64) -> usize {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ thread as u64) as usize
}

/// Runs `op(thread, i)` for `i` in `0..iters` on every thread at once, started together, and
/// returns the time until the slowest finished.
fn hammer(threads: usize, iters: u64, op: impl Fn(usize, u64) + Sync) -> Duration {
    let start = Barrier::new(threads);
    thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|thread| {
                let (start, op) = (&start, &op);
                scope.spawn(move || {
                    start.wait();
                    let began = Instant::now();
                    for i in 0..iters {
                        op(thread, i);
                    }
                    began.elapsed()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("a benchmark thread panicked"))
            .max()
            .unwrap_or_default()
    })
}

/// Get and set with one thread per core on one store. One iteration is one operation on every
/// thread, so the reported throughput is the store's total.
fn contended(c: &mut Criterion) {
    let threads = thread::available_parallelism().map_or(2, |n| n.get());
    let (store, keys) = filled(0, KEYS);
    let value = "v".repeat(64);
    let mut group = c.benchmark_group("contended");
    group.throughput(Throughput::Elements(threads as u64));
    group.bench_function(BenchmarkId::new("get", threads), |b| {
        b.iter_custom(|iters| {
            hammer(threads, iters, |thread, i| {
                let key = &keys[scattered(thread, i) % keys.len()];
                black_box(store.get(key));
            })
        })
    });
    group.bench_function(BenchmarkId::new("set", threads), |b| {
        b.iter_custom(|iters| {
            hammer(threads, iters, |thread, i| {
                let key = &keys[scattered(thread, i) % keys.len()];
                black_box(store.set(key.clone(), value.clone(), SetOptions::default()))
                    .expect("an unguarded set cannot conflict");
            })
        })
    });
    group.finish();
}

/// A set with no subscribers, and with 10,000 whose prefixes never match the key: the
/// subscriber index should make them cost next to nothing.
fn idle_subscribers(c: &mut Criterion) {
    let mut group = c.benchmark_group("set_with_idle_subscribers");
    for subscribers in [0, SUBSCRIBERS] {
        let (store, keys) = filled(subscribers, KEYS);
        // Held open until the benchmark ends; dropping one unsubscribes it.
        let _subscriptions: Vec<_> = (0..subscribers)
            .map(|i| {
                store
                    .subscribe(format!("idle/{i}/"), Start::Now)
                    .expect("the limit allows every subscriber")
            })
            .collect();
        let value = "v".repeat(64);
        let mut i = 0;
        group.bench_function(BenchmarkId::from_parameter(subscribers), |b| {
            b.iter(|| {
                i += 1;
                let key = keys[scattered(0, i) % keys.len()].clone();
                store
                    .set(key, value.clone(), SetOptions::default())
                    .expect("an unguarded set cannot conflict")
            })
        });
    }
    group.finish();
}

/// One page of the 1,000 keys under a prefix, among 1,000,000 keys.
fn list_prefix(c: &mut Criterion) {
    let (store, _) = filled(0, LIST_MAP);
    // key:000000123000 to key:000000123999.
    let prefix = "key:000000123";
    assert_eq!(
        store.list(prefix, "", LIST_PAGE, usize::MAX).items.len(),
        LIST_PAGE
    );
    let mut group = c.benchmark_group("list");
    group.throughput(Throughput::Elements(LIST_PAGE as u64));
    group.bench_function("1000_of_1000000", |b| {
        b.iter(|| black_box(store.list(prefix, "", LIST_PAGE, usize::MAX)))
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = contended, idle_subscribers, list_prefix
}
criterion_main!(benches);
