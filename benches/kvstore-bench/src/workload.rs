//! What the calls of a run do: the key space, how keys are picked, gets against sets.

use std::sync::Arc;

use anyhow::Context;
use kvstore::pb::{BatchOp, GetRequest, SetRequest, batch_op};
use rand::RngExt;
use rand::rngs::SmallRng;
use rand_distr::{Distribution, Zipf};

use crate::{KeyArgs, KeyDistribution, Mix};

/// The zipf exponent: close to 1, as in YCSB, so a few keys take most of the load.
pub const ZIPF_EXPONENT: f64 = 0.99;

/// Keys start with this, then zero-padded digits up to `--key-size`.
pub const KEY_PREFIX: &str = "key:";

/// Keys per Batch call when `--preload` fills the key space.
pub const PRELOAD_BATCH: u64 = 1000;

/// Keys `key:` + zero-padded index, all exactly `--key-size` bytes, so runs against the same
/// server find each other's keys.
#[derive(Debug, Clone, Copy)]
pub struct KeySpace {
    pub count: u64,
    pub digits: usize,
}

impl KeySpace {
    pub fn new(args: &KeyArgs) -> anyhow::Result<Self> {
        let needed = (args.keys - 1).to_string().len();
        let digits = args
            .key_size
            .checked_sub(KEY_PREFIX.len())
            .filter(|&digits| digits >= needed)
            .with_context(|| {
                format!(
                    "--key-size {} cannot name {} keys: it needs at least {} bytes",
                    args.key_size,
                    args.keys,
                    KEY_PREFIX.len() + needed
                )
            })?;
        Ok(Self {
            count: args.keys,
            digits,
        })
    }

    pub fn key(&self, index: u64) -> String {
        let mut key = String::new();
        self.write_key(index, &mut key);
        key
    }

    /// Replaces `key` with the key of `index`. Not `format!`: its padding machinery was 5% of
    /// this tool's CPU in a Batch run.
    pub fn write_key(&self, index: u64, key: &mut String) {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(index);
        key.clear();
        key.push_str(KEY_PREFIX);
        key.extend(std::iter::repeat_n(
            '0',
            self.digits.saturating_sub(digits.len()),
        ));
        key.push_str(digits);
    }
}

pub enum Picker {
    Uniform(u64),
    Zipf(Zipf<f64>),
}

impl Picker {
    pub fn pick(&self, rng: &mut SmallRng) -> u64 {
        match self {
            Self::Uniform(count) => rng.random_range(0..*count),
            // Zipf samples are whole numbers from 1 to the key count.
            Self::Zipf(zipf) => zipf.sample(rng) as u64 - 1,
        }
    }
}

/// What the calls of a run do: which keys, how many gets, what value the sets write.
pub struct Workload {
    pub keys: KeySpace,
    pub picker: Picker,
    pub get_ratio: f64,
    pub value: Arc<str>,
}

/// One operation, sent alone (unary) or as part of a Batch.
pub enum Call {
    Get(GetRequest),
    Set(SetRequest),
}

impl From<Call> for BatchOp {
    fn from(call: Call) -> Self {
        let op = match call {
            Call::Get(request) => batch_op::Op::Get(request),
            Call::Set(request) => batch_op::Op::Set(request),
        };
        Self { op: Some(op) }
    }
}

impl Workload {
    pub fn new(mix: &Mix) -> anyhow::Result<Self> {
        let keys = KeySpace::new(&mix.keys)?;
        let picker = match mix.distribution {
            KeyDistribution::Uniform => Picker::Uniform(keys.count),
            KeyDistribution::Zipf => Picker::Zipf(
                Zipf::new(keys.count as f64, ZIPF_EXPONENT).context("zipf distribution")?,
            ),
        };
        Ok(Self {
            keys,
            picker,
            get_ratio: mix.get_ratio,
            value: "x".repeat(mix.keys.value_size).into(),
        })
    }

    /// The next op's key index, and whether it is a get.
    pub fn pick(&self, rng: &mut SmallRng) -> (u64, bool) {
        (self.picker.pick(rng), rng.random_bool(self.get_ratio))
    }

    pub fn call(&self, rng: &mut SmallRng) -> Call {
        let (index, get) = self.pick(rng);
        if get {
            Call::Get(GetRequest {
                key: self.keys.key(index),
            })
        } else {
            Call::Set(SetRequest {
                key: self.keys.key(index),
                value: self.value.to_string(),
                ..SetRequest::default()
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_exactly_the_key_size() {
        let keys = |count, key_size| {
            KeySpace::new(&KeyArgs {
                keys: count,
                key_size,
                value_size: 0,
            })
        };
        let space = keys(1_000_000, 16).unwrap();
        assert_eq!(space.key(7), "key:000000000007");
        assert_eq!(space.key(999_999), "key:000000999999");
        assert!(keys(1_000_000, 9).is_err(), "6 digits do not fit in 5");
        assert_eq!(keys(10, 5).unwrap().key(9), "key:9");
    }
}
