//! Compiles the gRPC contract in `proto/` with a vendored `protoc`, so a
//! fresh machine needs nothing installed beyond the Rust toolchain.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tollgate_descriptor.bin"))
        .compile_with_config(
            config,
            &[
                std::path::Path::new("proto/tollgate/v1/common.proto"),
                std::path::Path::new("proto/tollgate/v1/quota.proto"),
                std::path::Path::new("proto/tollgate/v1/admin.proto"),
            ],
            &[std::path::Path::new("proto"), well_known.as_path()],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
