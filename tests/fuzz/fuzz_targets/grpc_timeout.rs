//! The `grpc-timeout` header (`guard::parse_grpc_timeout`) against the spec's grammar:
//! `TimeoutValue TimeoutUnit`, 1 to 8 ASCII digits then one of `H M S m u n`.

#![no_main]

use std::time::Duration;

use kvstore::guard::parse_grpc_timeout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|value: &str| {
    assert_eq!(parse_grpc_timeout(value), model(value), "{value:?}");
});

fn model(value: &str) -> Option<Duration> {
    let (unit, digits) = value.as_bytes().split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount = digits
        .iter()
        .fold(0u128, |n, d| n * 10 + u128::from(d - b'0'));
    let nanos_per_unit: u128 = match unit {
        b'H' => 3_600_000_000_000,
        b'M' => 60_000_000_000,
        b'S' => 1_000_000_000,
        b'm' => 1_000_000,
        b'u' => 1_000,
        b'n' => 1,
        _ => return None,
    };
    let nanos = amount * nanos_per_unit;
    Some(Duration::new(
        u64::try_from(nanos / 1_000_000_000).unwrap(),
        u32::try_from(nanos % 1_000_000_000).unwrap(),
    ))
}
