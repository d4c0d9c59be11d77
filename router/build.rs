// Generates the admin API's gRPC code from proto/ (needs protoc; e2e/bin/setup installs it).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/cellplane/router/v1/admin.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
