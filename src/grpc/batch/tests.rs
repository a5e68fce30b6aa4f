//! Batch on the wire against prost: decoding in place, encoding straight into the answer,
//! and the load tool's client side.

use std::time::Duration;

use prop::collection::vec;
use prop::sample::Index;
use proptest::prelude::*;

use super::*;
use crate::record::{Meta, Record, Value};
use crate::store::{Conflict, Deleted};

/// Empty, short, any Unicode, and long enough for a two-byte length.
fn text() -> impl Strategy<Value = String> {
    prop_oneof!["", "[a-z]{1,8}", "\\PC{0,20}", "x{128,200}"]
}

fn request() -> impl Strategy<Value = pb::BatchRequest> {
    let op = prop_oneof![
        Just(None),
        text().prop_map(|key| Some(batch_op::Op::Get(pb::GetRequest { key }))),
        (text(), text(), any::<Option<i64>>(), any::<i64>()).prop_map(
            |(key, value, expected_mod_revision, ttl_ms)| {
                Some(batch_op::Op::Set(pb::SetRequest {
                    key,
                    value,
                    expected_mod_revision,
                    ttl_ms,
                }))
            }
        ),
        (text(), any::<Option<i64>>()).prop_map(|(key, expected_mod_revision)| {
            Some(batch_op::Op::Delete(pb::DeleteRequest {
                key,
                expected_mod_revision,
            }))
        }),
    ];
    vec(op.prop_map(|op| pb::BatchOp { op }), 0..20).prop_map(|ops| pb::BatchRequest { ops })
}

fn result() -> impl Strategy<Value = OpResult> {
    let found = (text(), text(), any::<[u64; 3]>(), any::<Option<u64>>()).prop_map(
        |(key, value, [create_revision, mod_revision, version], ttl)| KeyValue {
            value: Value::of(&Record::new(&key, &value, Meta::default())),
            create_revision,
            mod_revision,
            version,
            ttl: ttl.map(Duration::from_nanos),
        },
    );
    prop_oneof![
        (prop::option::of(found), any::<u64>())
            .prop_map(|(found, revision)| OpResult::Get(found, revision)),
        any::<u64>().prop_map(OpResult::Set),
        (any::<Option<u64>>(), any::<u64>()).prop_map(|(prev_mod_revision, revision)| {
            OpResult::Delete(Deleted {
                prev_mod_revision,
                revision,
            })
        }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(expected, actual)| OpResult::Conflict(Conflict { expected, actual })),
    ]
}

fn prost_ops(request: &pb::BatchRequest) -> Vec<WireOp<'_>> {
    request.ops.iter().map(WireOp::from).collect()
}

proptest! {
    /// What protobuf libraries write is read in place, and read as prost reads it.
    #[test]
    fn plain_requests_are_read_in_place_as_prost_reads_them(request in request()) {
        let bytes = request.encode_to_vec();
        prop_assert_eq!(count_ops(&bytes), Some(request.ops.len()));
        let count = request.ops.len();
        prop_assert_eq!(read_plain(&bytes, count), Some(prost_ops(&request)));
        if let Some(max) = count.checked_sub(1) {
            prop_assert_eq!(read_plain(&bytes, max), None);
        }
    }

    /// Whatever the bytes, the ops are prost's, or there is an error where prost has one.
    #[test]
    fn any_bytes_give_prosts_ops_or_an_error_where_prost_has_one(
        request in request(),
        edits in vec((any::<Index>(), any::<u8>()), 0..4),
        tail in vec(any::<u8>(), 0..8),
    ) {
        let mut bytes = request.encode_to_vec();
        for (at, byte) in edits {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
        }
        bytes.extend(tail);
        let encoded = EncodedBatch(Bytes::from(bytes.clone()));
        let mut decoded = None;
        match (encoded.ops(usize::MAX, &mut decoded), pb::BatchRequest::decode(&bytes[..])) {
            (Ok(ours), Ok(prosts)) => {
                prop_assert_eq!(ours, prost_ops(&prosts));
                // One op fewer allowed, and the batch is refused with its size.
                let count = prosts.ops.len();
                if let Some(max) = count.checked_sub(1) {
                    let mut decoded = None;
                    let refused = encoded.ops(max, &mut decoded);
                    prop_assert!(
                        matches!(refused, Err(Unread::TooMany(n)) if n == count),
                        "{refused:?}"
                    );
                }
            }
            (Err(_), Err(_)) => {}
            (ours, prosts) => prop_assert!(false, "ours {ours:?}, prost's {prosts:?}"),
        }
    }

    /// A reply is byte for byte the BatchResponse that prost writes.
    #[test]
    fn replies_are_what_prost_writes(results in vec(result(), 0..20), revision in any::<u64>()) {
        let expected = pb::BatchResponse {
            results: results
                .iter()
                .map(|result| pb::BatchResult {
                    result: Some(result_message(result)),
                })
                .collect(),
            revision: wire(revision),
        };
        let mut bytes = Vec::new();
        BatchReply { results, revision }.encode(&mut bytes);
        prop_assert_eq!(bytes, expected.encode_to_vec());
    }
}

proptest! {
    /// An op put by hand is what prost writes for it, so a request built op by op is
    /// read in place.
    #[test]
    fn ops_put_by_hand_are_what_prost_writes(request in request()) {
        let mut bytes = Vec::new();
        for op in prost_ops(&request) {
            op.put(&mut bytes);
        }
        prop_assert_eq!(&bytes, &request.encode_to_vec());
        prop_assert_eq!(read_plain(&bytes, usize::MAX), Some(prost_ops(&request)));
    }

    /// Results are counted by kind as prost decodes them, however their fields are set.
    #[test]
    fn results_are_counted_by_kind(results in vec(result(), 0..20), empty in 0..3usize) {
        let mut response = pb::BatchResponse {
            results: results
                .iter()
                .map(|result| pb::BatchResult {
                    result: Some(result_message(result)),
                })
                .collect(),
            revision: 42,
        };
        response.results.extend(vec![pb::BatchResult { result: None }; empty]);
        let count = |kind: fn(&OpResult) -> bool| results.iter().filter(|r| kind(r)).count() as u64;
        let expected = ResultCounts {
            gets: count(|r| matches!(r, OpResult::Get(..))),
            sets: count(|r| matches!(r, OpResult::Set(..))),
            deletes: count(|r| matches!(r, OpResult::Delete(..))),
            conflicts: count(|r| matches!(r, OpResult::Conflict(..))),
            unknown: empty as u64,
        };
        let bytes = response.encode_to_vec();
        prop_assert_eq!(ResultCounts::of(&bytes), Some(expected));
        prop_assert_eq!(ResultCounts::of(&bytes[..bytes.len() - 1]), None, "cut short");
    }
}

/// An unknown field, even a group, does not hide how many ops a request holds; a field 1
/// that is not an op is prost's to refuse.
#[test]
fn ops_are_counted_past_unknown_fields_and_groups() {
    let get = |key: &str| pb::BatchOp {
        op: Some(batch_op::Op::Get(pb::GetRequest { key: key.into() })),
    };
    let mut bytes = pb::BatchRequest {
        ops: vec![get("a"), get("b"), get("c")],
    }
    .encode_to_vec();
    // Field 5 as a group holding field 6 as a group holding a varint, then field 7 as
    // fixed32: not plain, so it is left to prost, which skips them.
    bytes.extend([5 << 3 | 3, 6 << 3 | 3, 8, 1, 6 << 3 | 4, 5 << 3 | 4]);
    bytes.extend([7 << 3 | 5, 0, 0, 0, 0]);
    assert_eq!(count_ops(&bytes), Some(3));
    let encoded = EncodedBatch(Bytes::from(bytes));
    let mut decoded = None;
    assert!(matches!(
        encoded.ops(2, &mut decoded),
        Err(Unread::TooMany(3))
    ));
    let ops = encoded.ops(3, &mut decoded).unwrap();
    assert_eq!(
        ops,
        [
            WireOp::Get { key: "a" },
            WireOp::Get { key: "b" },
            WireOp::Get { key: "c" }
        ]
    );

    let not_ops = EncodedBatch(Bytes::from_static(&[1 << 3, 0, 1 << 3, 0]));
    assert_eq!(count_ops(&not_ops.0), None);
    assert!(matches!(
        not_ops.ops(1, &mut None),
        Err(Unread::Malformed(_))
    ));
}

/// A oneof field twice in one op is merged, as protobuf says; prost does that for us.
#[test]
fn repeated_fields_are_merged_as_prost_merges_them() {
    let set = |key: &str, value: &str, ttl_ms| pb::BatchOp {
        op: Some(batch_op::Op::Set(pb::SetRequest {
            key: key.into(),
            value: value.into(),
            expected_mod_revision: None,
            ttl_ms,
        })),
    };
    let op: Vec<u8> = [set("a", "1", 0), set("", "2", 5)]
        .iter()
        .flat_map(Message::encode_to_vec)
        .collect();
    let request = pb::BatchRequest {
        ops: vec![pb::BatchOp::decode(&op[..]).unwrap()],
    };
    let mut bytes = vec![1 << 3 | LEN as u8, op.len() as u8];
    bytes.extend(&op);
    assert_eq!(read_plain(&bytes, 1), None, "not the plain encoding");
    let merged = WireOp::Set {
        key: "a",
        value: "2",
        expected_mod_revision: None,
        ttl_ms: 5,
    };
    assert_eq!(prost_ops(&request), [merged]);
    let mut decoded = None;
    let encoded = EncodedBatch(Bytes::from(bytes));
    assert_eq!(encoded.ops(1, &mut decoded).unwrap(), [merged]);
}
