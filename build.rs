//! Compiles `proto/kvstore.proto` with the pure-Rust `protox` compiler, so building
//! needs no `protoc`, and writes the descriptor set that server reflection serves.
//!
//! The messages and the client come from tonic-prost-build. The server is generated from
//! the same service definition through tonic-build's manual builder, because one method,
//! Batch, has a codec of its own (src/grpc/batch.rs); every other method keeps prost's.

use std::{env, fs, path::PathBuf};

use prost::Message;
use prost_types::FileDescriptorProto;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/kvstore.proto";
    println!("cargo:rerun-if-changed={proto}");

    let fds = protox::compile([proto], ["proto"])?;

    // tonic-prost-build only writes a descriptor set on the protoc path, so write it here
    // for `tonic::include_file_descriptor_set!`.
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("kvstore_descriptor.bin"), fds.encode_to_vec())?;

    let file = fds.file.iter().find(|f| f.name() == "kvstore.proto");
    let server = server(file.ok_or("kvstore.proto is not in its descriptor set")?)?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        // A smaller encode buffer per call and stream; see src/pb/codec.rs.
        .codec_path("crate::pb::codec::KvCodec")
        .compile_fds(fds)?;
    tonic_build::manual::Builder::new()
        .build_client(false)
        .build_transport(false)
        .compile(&[server]);
    Ok(())
}

/// The proto's one service, each method with its comment, its message types from `pb`, and
/// its codec.
fn server(file: &FileDescriptorProto) -> Result<tonic_build::manual::Service, String> {
    let [service] = file.service.as_slice() else {
        return Err("kvstore.proto should define exactly one service".into());
    };
    let mut builder = tonic_build::manual::Service::builder()
        .name(service.name())
        .package(file.package());
    for (i, method) in service.method.iter().enumerate() {
        let comment = file
            .source_code_info
            .iter()
            .flat_map(|info| &info.location)
            // 6: a file's services, 2: a service's methods.
            .find(|location| location.path == [6, 0, 2, i as i32])
            .map_or("", |location| location.leading_comments());
        let message = |name: &str| format!("crate::pb::{}", name.trim_start_matches(".kvstore."));
        let (input, output, codec) = match method.name() {
            "Batch" => (
                "crate::grpc::batch::EncodedBatch".to_owned(),
                "crate::grpc::batch::BatchReply".to_owned(),
                "crate::grpc::batch::BatchCodec",
            ),
            _ => (
                message(method.input_type()),
                message(method.output_type()),
                "crate::pb::codec::KvCodec",
            ),
        };
        let mut m = tonic_build::manual::Method::builder()
            .name(snake_case(method.name())?)
            .route_name(method.name())
            .comment(comment.trim_end())
            .input_type(input)
            .output_type(output)
            .codec_path(codec);
        if method.client_streaming() {
            m = m.client_streaming();
        }
        if method.server_streaming() {
            m = m.server_streaming();
        }
        builder = builder.method(m.build());
    }
    Ok(builder.build())
}

/// A method's Rust name, as tonic-prost-build names it on the client. Only plain CamelCase
/// letters (`ListKeys`, not `ListKVs` or `Get2`) are converted; anything else is refused
/// here rather than given a name the client does not share. (A keyword such as `Type`
/// fails to compile, loudly enough.)
fn snake_case(name: &str) -> Result<String, String> {
    let bytes = name.as_bytes();
    let plain = bytes.first().is_some_and(u8::is_ascii_uppercase)
        && bytes.iter().all(u8::is_ascii_alphabetic)
        && !bytes
            .windows(2)
            .any(|pair| pair.iter().all(u8::is_ascii_uppercase));
    if !plain {
        return Err(format!(
            "rpc {name}: build.rs names only plain CamelCase methods; extend its snake_case"
        ));
    }
    let mut snake = String::new();
    for (i, c) in name.char_indices() {
        if c.is_ascii_uppercase() && i > 0 {
            snake.push('_');
        }
        snake.push(c.to_ascii_lowercase());
    }
    Ok(snake)
}
