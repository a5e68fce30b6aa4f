//! The Batch RPC on the wire. A batch costs per op, not per call, so it skips the generated
//! message types: ops are read in place from the request's bytes, keys and values borrowed,
//! and each get is written from the stored value straight into the response, so an op
//! allocates nothing of its own. The bytes are still `BatchRequest` and `BatchResponse` of
//! proto/kvstore.proto; the tests hold both directions to prost's encoding. A client that
//! costs per op too (the load tool) writes its ops with [`WireOp::put`] and counts the
//! results with [`ResultCounts`], through [`CountingBatchCodec`].

use prost::Message;
use prost::bytes::{Buf, BufMut, Bytes};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use super::{delete_response, get_response, ttl_ms, wire};
use crate::pb::{self, batch_op, batch_result};
use crate::store::{KeyValue, OpResult};

/// Protobuf wire types.
const VARINT: u64 = 0;
const I64: u64 = 1;
const LEN: u64 = 2;
const START_GROUP: u64 = 3;
const END_GROUP: u64 = 4;
const I32: u64 = 5;

/// A Batch request as it arrived: an encoded `BatchRequest`, read by [`EncodedBatch::ops`].
#[derive(Debug, Clone)]
pub struct EncodedBatch(Bytes);

/// A Batch's answer, encoded as a `BatchResponse` on its way out.
#[derive(Debug)]
pub struct BatchReply {
    /// One result per op, in the order of the ops.
    pub results: Vec<OpResult>,
    /// The store's revision after the batch.
    pub revision: u64,
}

/// One op as the request has it, before validation, its strings borrowed from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireOp<'a> {
    /// A `GetRequest`.
    Get {
        /// Its `key`.
        key: &'a str,
    },
    /// A `SetRequest`.
    Set {
        /// Its `key`.
        key: &'a str,
        /// Its `value`.
        value: &'a str,
        /// Its `expected_mod_revision`, if present.
        expected_mod_revision: Option<i64>,
        /// Its `ttl_ms`.
        ttl_ms: i64,
    },
    /// A `DeleteRequest`.
    Delete {
        /// Its `key`.
        key: &'a str,
        /// Its `expected_mod_revision`, if present.
        expected_mod_revision: Option<i64>,
    },
    /// A `BatchOp` with no op in it.
    Empty,
}

/// Why a Batch request yields no ops.
#[derive(Debug)]
pub enum Unread {
    /// It is not a `BatchRequest`.
    Malformed(prost::DecodeError),
    /// It holds this many ops, over the limit it was read with.
    TooMany(usize),
}

impl EncodedBatch {
    /// The request's ops, at most `max` of them. The plain encoding that protobuf libraries
    /// write is read in place; anything else (a field repeated or unknown, say) and
    /// malformed requests are left to prost, whose message is kept in `decoded` to lend the
    /// ops their strings. A request over the limit is refused with its count, taken from
    /// its framing before prost decodes a single op.
    pub fn ops<'a>(
        &'a self,
        max: usize,
        decoded: &'a mut Option<pb::BatchRequest>,
    ) -> Result<Vec<WireOp<'a>>, Unread> {
        if let Some(ops) = read_plain(&self.0, max) {
            return Ok(ops);
        }
        if let Some(count) = count_ops(&self.0).filter(|&count| count > max) {
            return Err(Unread::TooMany(count));
        }
        let request = pb::BatchRequest::decode(self.0.clone()).map_err(Unread::Malformed)?;
        let request = decoded.insert(request);
        // Counted above unless nested past prost's limit, which prost refuses.
        if request.ops.len() > max {
            return Err(Unread::TooMany(request.ops.len()));
        }
        Ok(request.ops.iter().map(WireOp::from).collect())
    }
}

impl<'a> From<&'a pb::BatchOp> for WireOp<'a> {
    fn from(op: &'a pb::BatchOp) -> Self {
        match &op.op {
            Some(batch_op::Op::Get(get)) => Self::Get { key: &get.key },
            Some(batch_op::Op::Set(set)) => Self::Set {
                key: &set.key,
                value: &set.value,
                expected_mod_revision: set.expected_mod_revision,
                ttl_ms: set.ttl_ms,
            },
            Some(batch_op::Op::Delete(delete)) => Self::Delete {
                key: &delete.key,
                expected_mod_revision: delete.expected_mod_revision,
            },
            None => Self::Empty,
        }
    }
}

impl WireOp<'_> {
    /// Appends this op to an encoded `BatchRequest`: the plain encoding, as prost writes it
    /// (each field in order, left out at its default), which [`EncodedBatch::ops`] reads in
    /// place. A request is its ops one after another, so a client builds one without a
    /// message or a string per op.
    pub fn put(&self, request: &mut impl BufMut) {
        // The op's message number in the `BatchOp.op` oneof, its key and value, then its
        // `expected_mod_revision` (field 3 of a set, 2 of a delete) and `ttl_ms` (4).
        let (number, key, value, expected, ttl_ms) = match *self {
            Self::Get { key } => (1, key, "", None, 0),
            Self::Set {
                key,
                value,
                expected_mod_revision,
                ttl_ms,
            } => (2, key, value, expected_mod_revision.map(|e| (3, e)), ttl_ms),
            Self::Delete {
                key,
                expected_mod_revision,
            } => (3, key, "", expected_mod_revision.map(|e| (2, e)), 0),
            Self::Empty => {
                put_key(request, 1, LEN);
                put_varint(request, 0);
                return;
            }
        };
        let int_len = |int: i64| 1 + varint_len(int as u64);
        let message_len = text_len(key.as_bytes())
            + text_len(value.as_bytes())
            + expected.map_or(0, |(_, e)| int_len(e))
            + if ttl_ms == 0 { 0 } else { int_len(ttl_ms) };
        put_key(request, 1, LEN);
        put_varint(
            request,
            (1 + varint_len(message_len as u64) + message_len) as u64,
        );
        put_key(request, number, LEN);
        put_varint(request, message_len as u64);
        put_text(request, 1, key);
        put_text(request, 2, value);
        if let Some((field, expected)) = expected {
            // Optional: present even at 0.
            put_key(request, field, VARINT);
            put_varint(request, expected as u64);
        }
        put_int(request, 4, ttl_ms);
    }
}

/// The results of a `BatchResponse` counted by kind, read from its framing without decoding
/// a single result: what a client that only checks its answers needs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResultCounts {
    /// `GetResponse`s, found or not.
    pub gets: u64,
    /// `SetResponse`s.
    pub sets: u64,
    /// `DeleteResponse`s.
    pub deletes: u64,
    /// `Conflict`s.
    pub conflicts: u64,
    /// Results holding nothing, or a kind this version does not know.
    pub unknown: u64,
}

impl ResultCounts {
    /// Counts the results (field 1) of an encoded `BatchResponse` by the field of the
    /// `BatchResult.result` oneof each holds; other fields are skipped. `None` if the
    /// framing is malformed or cut short.
    pub fn of(mut response: &[u8]) -> Option<Self> {
        let mut counts = Self::default();
        while !response.is_empty() {
            let (number, wire_type) = key(&mut response)?;
            if (number, wire_type) != (1, LEN) {
                skip(&mut response, number, wire_type, 0)?;
                continue;
            }
            let mut result = bytes(&mut response)?;
            let kind = if result.is_empty() {
                0
            } else {
                key(&mut result)?.0
            };
            *match kind {
                1 => &mut counts.gets,
                2 => &mut counts.sets,
                3 => &mut counts.deletes,
                4 => &mut counts.conflicts,
                _ => &mut counts.unknown,
            } += 1;
        }
        Some(counts)
    }
}

/// How many ops (field 1) a `BatchRequest` holds, from its framing alone: every field's
/// key and length, no op's contents. `None` if the framing is malformed, or an op is not
/// length-delimited; prost then says what is wrong.
fn count_ops(mut request: &[u8]) -> Option<usize> {
    let mut count = 0;
    while !request.is_empty() {
        let (number, wire_type) = key(&mut request)?;
        if number == 1 {
            if wire_type != LEN {
                return None;
            }
            count += 1;
        }
        skip(&mut request, number, wire_type, 0)?;
    }
    Some(count)
}

/// Skips the value of field `number`: a group up to its end, nested no deeper than prost
/// decodes.
fn skip(buf: &mut &[u8], number: u64, wire_type: u64, depth: u32) -> Option<()> {
    match wire_type {
        VARINT => {
            varint(buf)?;
        }
        I64 => *buf = buf.get(8..)?,
        LEN => {
            bytes(buf)?;
        }
        START_GROUP if depth < 100 => loop {
            let (inner, inner_type) = key(buf)?;
            if inner_type == END_GROUP {
                return (inner == number).then_some(());
            }
            skip(buf, inner, inner_type, depth + 1)?;
        },
        I32 => *buf = buf.get(4..)?,
        _ => return None,
    }
    Some(())
}

/// The ops of a `BatchRequest` in the plain encoding: every field known and at most once
/// in its message, every string valid UTF-8, at most `max` ops. `None` for anything else,
/// even when valid, since merging repeated fields is prost's business.
fn read_plain(mut request: &[u8], max: usize) -> Option<Vec<WireOp<'_>>> {
    // A get of a 16-byte key takes 20 bytes; large values must not make room for more.
    let mut ops = Vec::with_capacity((request.len() / 20).min(max));
    while !request.is_empty() {
        if ops.len() == max {
            return None;
        }
        if key(&mut request)? != (1, LEN) {
            return None;
        }
        ops.push(read_op(bytes(&mut request)?)?);
    }
    Some(ops)
}

/// One `BatchOp`: its oneof, holding a `GetRequest` (1), `SetRequest` (2) or
/// `DeleteRequest` (3), or nothing.
fn read_op(mut op: &[u8]) -> Option<WireOp<'_>> {
    if op.is_empty() {
        return Some(WireOp::Empty);
    }
    let (number, wire_type) = key(&mut op)?;
    if wire_type != LEN {
        return None;
    }
    let message = bytes(&mut op)?;
    if !op.is_empty() {
        return None;
    }
    let text = |field| match field {
        Field::Text(text) => text,
        _ => "",
    };
    let int = |field| match field {
        Field::Int(int) => Some(int),
        _ => None,
    };
    Some(match number {
        1 => {
            let [key] = read_fields(message, [LEN])?;
            WireOp::Get { key: text(key) }
        }
        2 => {
            let [key, value, expected, ttl] = read_fields(message, [LEN, LEN, VARINT, VARINT])?;
            WireOp::Set {
                key: text(key),
                value: text(value),
                expected_mod_revision: int(expected),
                ttl_ms: int(ttl).unwrap_or(0),
            }
        }
        3 => {
            let [key, expected] = read_fields(message, [LEN, VARINT])?;
            WireOp::Delete {
                key: text(key),
                expected_mod_revision: int(expected),
            }
        }
        _ => return None,
    })
}

#[derive(Debug, Clone, Copy)]
enum Field<'a> {
    Absent,
    Text(&'a str),
    Int(i64),
}

/// The fields of a message whose field number `n` has the wire type `types[n - 1]`: a
/// string (`LEN`) or an int64 (`VARINT`).
fn read_fields<const N: usize>(mut message: &[u8], types: [u64; N]) -> Option<[Field<'_>; N]> {
    let mut fields = [Field::Absent; N];
    while !message.is_empty() {
        let (number, wire_type) = key(&mut message)?;
        let i = usize::try_from(number).ok()?.checked_sub(1)?;
        if types.get(i) != Some(&wire_type) || !matches!(fields[i], Field::Absent) {
            return None;
        }
        fields[i] = if wire_type == LEN {
            Field::Text(std::str::from_utf8(bytes(&mut message)?).ok()?)
        } else {
            // int64 travels as its two's-complement bits.
            Field::Int(varint(&mut message)? as i64)
        };
    }
    Some(fields)
}

/// A field's key: its number and wire type.
#[inline]
fn key(buf: &mut &[u8]) -> Option<(u64, u64)> {
    let key = varint(buf)?;
    Some((key >> 3, key & 7))
}

/// A length-delimited field's bytes.
#[inline]
fn bytes<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(varint(buf)?).ok()?;
    let (bytes, rest) = buf.split_at_checked(len)?;
    *buf = rest;
    Some(bytes)
}

/// A base-128 varint of at most ten bytes, the tenth holding only the top bit, as prost
/// reads them.
#[inline]
fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0;
    for i in 0..10 {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return (i < 9 || byte < 2).then_some(value);
        }
    }
    None
}

impl BatchReply {
    /// The `BatchResponse`. Gets, nearly every op of a typical batch, are written by hand
    /// from the stored value; the other results go through their prost messages.
    fn encode(&self, buf: &mut impl BufMut) {
        for result in &self.results {
            // Field 1, `results`.
            put_key(buf, 1, LEN);
            match result {
                OpResult::Get(found, revision) => put_get(buf, found.as_ref(), *revision),
                other => {
                    let message = pb::BatchResult {
                        result: Some(result_message(other)),
                    };
                    put_varint(buf, message.encoded_len() as u64);
                    message.encode_raw(buf);
                }
            }
        }
        put_int(buf, 2, wire(self.revision));
    }
}

/// One result as its prost message.
fn result_message(result: &OpResult) -> batch_result::Result {
    match result {
        OpResult::Get(found, revision) => {
            batch_result::Result::Get(get_response(found.clone(), *revision))
        }
        OpResult::Set(revision) => batch_result::Result::Set(pb::SetResponse {
            success: true,
            // Left empty: a message per op would cost more than the op.
            message: String::new(),
            revision: wire(*revision),
        }),
        OpResult::Delete(deleted) => batch_result::Result::Delete(delete_response(*deleted)),
        OpResult::Conflict(conflict) => batch_result::Result::Conflict(pb::Conflict {
            mod_revision: wire(conflict.actual),
            message: conflict.to_string(),
        }),
    }
}

/// A `BatchResult` holding a `GetResponse` (field 1), after its key: its length, then the
/// response's fields in order, each left out at its default as proto3 does. The fields
/// around the value are put together on the stack first: a byte at a time, `buf` checks
/// its capacity on every byte.
fn put_get(buf: &mut impl BufMut, found: Option<&KeyValue>, revision: u64) {
    let (value, ints): (&[u8], _) = match found {
        Some(kv) => (
            kv.value.as_bytes(),
            [
                1, // found
                wire(kv.create_revision),
                wire(kv.mod_revision),
                wire(kv.version),
                ttl_ms(kv.ttl),
                wire(revision),
            ],
        ),
        None => (&[], [0, 0, 0, 0, 0, wire(revision)]),
    };
    // At most six fields of one key byte and a ten-byte varint each.
    let (tail, tail_len) = on_stack::<66>(|rest| {
        for (number, int) in (2..).zip(ints) {
            put_int(rest, number, int);
        }
    });
    let len = text_len(value) + tail_len;
    // Two keys and lengths, and the value's key and length.
    let (head, head_len) = on_stack::<33>(|rest| {
        put_varint(rest, (1 + varint_len(len as u64) + len) as u64);
        put_key(rest, 1, LEN);
        put_varint(rest, len as u64);
        if !value.is_empty() {
            put_key(rest, 1, LEN);
            put_varint(rest, value.len() as u64);
        }
    });
    buf.put_slice(&head[..head_len]);
    buf.put_slice(value);
    buf.put_slice(&tail[..tail_len]);
}

/// What `write` puts in an array of `N` bytes, and how many bytes that is.
#[inline]
fn on_stack<const N: usize>(write: impl FnOnce(&mut &mut [u8])) -> ([u8; N], usize) {
    let mut bytes = [0; N];
    let mut rest = &mut bytes[..];
    write(&mut rest);
    let len = N - rest.len();
    (bytes, len)
}

/// The encoded length of a string field numbered below 16 (a one-byte key).
#[inline]
fn text_len(text: &[u8]) -> usize {
    if text.is_empty() {
        0
    } else {
        1 + varint_len(text.len() as u64) + text.len()
    }
}

/// A string field numbered below 16, unless it is empty.
#[inline]
fn put_text(buf: &mut impl BufMut, number: u8, text: &str) {
    if !text.is_empty() {
        put_key(buf, number, LEN);
        put_varint(buf, text.len() as u64);
        buf.put_slice(text.as_bytes());
    }
}

/// An int64 field numbered below 16, unless it is 0.
#[inline]
fn put_int(buf: &mut impl BufMut, number: u8, value: i64) {
    if value != 0 {
        put_key(buf, number, VARINT);
        put_varint(buf, value as u64);
    }
}

#[inline]
fn put_key(buf: &mut impl BufMut, number: u8, wire_type: u64) {
    buf.put_u8(number << 3 | wire_type as u8);
}

#[inline]
fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

#[inline]
fn put_varint(buf: &mut impl BufMut, mut value: u64) {
    while value >= 0x80 {
        buf.put_u8(value as u8 | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

/// The codec of the Batch method: hands the request's bytes over whole and encodes a
/// [`BatchReply`].
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchCodec;

impl Codec for BatchCodec {
    type Encode = BatchReply;
    type Decode = EncodedBatch;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        *self
    }

    fn decoder(&mut self) -> Self {
        *self
    }
}

impl Encoder for BatchCodec {
    type Item = BatchReply;
    type Error = Status;

    fn encode(&mut self, reply: BatchReply, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        reply.encode(buf);
        Ok(())
    }
}

impl Decoder for BatchCodec {
    type Item = EncodedBatch;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<EncodedBatch>, Status> {
        // The message is already whole and contiguous: this takes it without a copy.
        Ok(Some(EncodedBatch(buf.copy_to_bytes(buf.remaining()))))
    }
}

/// The client side of the Batch method for a client that writes its requests op by op
/// ([`WireOp::put`]) and only counts the results: sends the request's bytes as they are and
/// decodes the answer into its [`ResultCounts`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingBatchCodec;

impl Codec for CountingBatchCodec {
    type Encode = Bytes;
    type Decode = ResultCounts;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        *self
    }

    fn decoder(&mut self) -> Self {
        *self
    }
}

impl Encoder for CountingBatchCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, request: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put(request);
        Ok(())
    }
}

impl Decoder for CountingBatchCodec {
    type Item = ResultCounts;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<ResultCounts>, Status> {
        // Whole and contiguous, as in `BatchCodec`: taken without a copy.
        let response = buf.copy_to_bytes(buf.remaining());
        ResultCounts::of(&response).map(Some).ok_or_else(|| {
            Status::internal("decoding a Batch response: its framing is malformed or cut short")
        })
    }
}

#[cfg(test)]
mod tests;
