//! kvstore: a key-value store with prefix change streams, serving gRPC and HTTP on one port.
//!
//! # Layout
//!
//! - [`store`]: the concurrent map; every write is published to the matching subscribers.
//! - [`record`]: one stored key in one allocation, shared by the map, the history and the streams.
//! - `index`: the map's records in key order and by key hash.
//! - [`pubsub`]: change events and the subscriber registry, indexed by prefix, with bounded queues.
//! - [`grpc`]: the `kvstore.KeyValueStore` service: validation and protobuf <-> domain conversion;
//!   [`grpc::batch`], the Batch method's own codec.
//! - [`http`]: the HTTP routes (`/health/live`, `/health/ready`); [`health_watch`]: the cap
//!   on gRPC health Watch streams.
//! - [`guard`]: the KV guard: in-flight limit, unary deadline, and the gate shutdown closes.
//! - [`header_limit`]: `server.max_header_bytes`, in front of every route.
//! - [`request_body`]: every gRPC request message held to a size, a time to arrive and one
//!   budget of bytes still arriving; single-message calls read whole before the guard.
//! - [`answers`]: answers built and not yet taken, held to one budget and a share per
//!   connection; the send deadline of each HTTP/2 stream.
//! - [`metrics`]: the counters the server bumps as it works, and the layer that counts gRPC
//!   calls; [`exporter`]: `GET /metrics`, which reads them and the store's state.
//! - [`browser`]: what keeps web pages out: gRPC only as gRPC, the Host check of the HTTP
//!   routes (`server.allowed_hosts`).
//! - [`caller`]: who is calling, by token or address; [`auth`]: bearer tokens and roles; [`rate_limit`]: the per-client request rate limit;
//!   [`share`]: each client's share of the open subscriptions and of their progress events.
//! - [`server`]: binds the listeners, builds the router and runs until shutdown, then drains;
//!   the accept loop and its connection limits.
//! - [`open_files`]: the open-file limit, raised at start-up; it caps connections when low.
//! - [`tls`]: the main listener's TLS configuration, from the `[tls]` files.
//! - [`token`]: what a bearer token may look like, and the interceptor clients send it with.
//! - [`shutdown`]: the process signals that begin a graceful shutdown.
//! - [`config`]: layered settings, range-checked: data only; [`startup`]: what the server
//!   runs with, built from them once (TLS, tokens, allowed hosts, log filter).
//! - [`telemetry`]: logging, set up once by the binary.
//! - [`client`]: the Rust client library: connect with failover, retry what is safe, typed
//!   calls, and a subscription that resumes by itself.
//! - [`endpoint`]: the server address the command-line tools and the client accept.
//! - [`legacy_args`]: the original Go client's flags, rewritten for `kvstore-client`.

pub mod answers;
pub mod auth;
pub mod browser;
pub mod caller;
pub mod client;
pub mod config;
pub mod endpoint;
pub mod exporter;
pub mod grpc;
pub mod guard;
pub mod header_limit;
pub mod health_watch;
pub mod http;
mod index;
pub mod legacy_args;
pub mod metrics;
pub mod open_files;
pub mod pubsub;
pub mod rate_limit;
pub mod record;
pub mod request_body;
pub mod server;
pub mod share;
pub mod shutdown;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod token;

/// The generated protobuf types, client and server of `proto/kvstore.proto`, and [`pb::codec`],
/// the protobuf codec of the client and of the service's methods, with a small encode buffer.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("kvstore");
    // The server, generated from the same service by build.rs.
    include!(concat!(env!("OUT_DIR"), "/kvstore.KeyValueStore.rs"));

    /// The encoded descriptor set of `kvstore.proto`, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("kvstore_descriptor");

    /// The codec the generated client and server use, beside them.
    #[warn(missing_docs, clippy::all)]
    pub mod codec;
    /// The trailer names of the wire contract.
    #[warn(missing_docs, clippy::all)]
    pub mod trailers;
}
