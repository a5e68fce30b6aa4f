//! Compiles `proto/kvstore.proto` with the pure-Rust `protox` compiler, so building
//! needs no `protoc`, and writes the descriptor set that server reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/kvstore.proto";
    println!("cargo:rerun-if-changed={proto}");

    let fds = protox::compile([proto], ["proto"])?;

    // tonic-prost-build only writes a descriptor set on the protoc path, so write it here
    // for `tonic::include_file_descriptor_set!`.
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("kvstore_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // A smaller encode buffer per call and stream; see src/codec.rs.
        .codec_path("crate::codec::KvCodec")
        .compile_fds(fds)?;
    Ok(())
}
