//! The protobuf codec of the client and of every server method but Batch (which has its own,
//! in src/grpc/batch.rs): tonic-prost's, with a smaller encode buffer. A response stream
//! holds its encode buffer for its whole life, so tonic's default of 8 KiB would be most of
//! an idle Subscribe's memory (docs/performance.md, memory per subscriber); the messages
//! here are mostly a few hundred bytes, and a larger one grows the buffer as needed. A Batch is a single response, whose
//! default 8 KiB buffer lives only as long as the call.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The encode buffer a call or stream starts with.
const ENCODE_BUFFER_BYTES: usize = 1024;

/// tonic's default: a stream yields to the runtime after encoding this much at once.
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

/// [`ProstCodec`] with an encode buffer of [`ENCODE_BUFFER_BYTES`].
#[derive(Debug, Clone, Copy)]
pub struct KvCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for KvCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for KvCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(
            ENCODE_BUFFER_BYTES,
            YIELD_THRESHOLD_BYTES,
        ))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::default())
    }
}
