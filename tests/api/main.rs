//! End-to-end tests: the real server on 127.0.0.1:0, spoken to over TCP with the generated
//! gRPC client, plain HTTP/1.1 and HTTP/2, and the real binaries.

mod answers;
mod auth;
mod bad_input;
mod binaries;
mod bounded;
mod browser;
mod client;
mod client_library;
mod conformance;
mod connections;
mod faults;
mod health;
mod helpers;
mod hostile;
mod kv;
mod load;
mod logs;
mod metrics;
mod open_files;
mod proxy;
mod rate_limit;
mod share;
mod shutdown;
mod subscribe;
mod tls;
