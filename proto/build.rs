//! Compile proto/herd.proto with protox (a protobuf compiler in Rust), so building needs no
//! system `protoc`.
fn main() {
    println!("cargo:rerun-if-changed=proto/herd.proto");
    let fds = protox::compile(["proto/herd.proto"], ["proto"]).expect("proto/herd.proto compiles");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)
        .expect("generating the gRPC code");
}
