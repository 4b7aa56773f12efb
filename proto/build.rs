//! Compile the .proto files with protox (pure Rust: no system protoc needed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/weft/kds/v1/kds.proto",
        "proto/weft/dataplane/v1/dataplane.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
