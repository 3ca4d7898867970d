// Compiles the protos with protox (pure Rust), so a fresh machine needs no
// system `protoc`.
//
// - proto/manager.proto, the wire contract: the public types, client and
//   server (cocos_core::proto); its descriptor set is kept for reflection.
// - proto/manager_server.proto, the server's own reading of the same wire
//   (string fields of requests as bytes, so the server checks UTF-8 itself):
//   server only, in its own output folder since its package is also
//   `manager` (cocos_core::server_proto). Its answers are the public types.
// - proto/operator.proto, the operator's extension service
//   (`cocos.manager.v1.Operator`): client and server
//   (cocos_core::operator_proto), with its descriptor set for reflection.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/manager.proto");
    println!("cargo:rerun-if-changed=proto/manager_server.proto");
    println!("cargo:rerun-if-changed=proto/operator.proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);

    let fds = protox::compile(["manager.proto"], ["proto"])?;
    let descriptor_path = out.join("manager_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;

    let server_fds = protox::compile(["manager_server.proto"], ["proto"])?;
    let server_out = out.join("server");
    std::fs::create_dir_all(&server_out)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .out_dir(&server_out)
        .extern_path(".manager.CreateRes", "crate::proto::CreateRes")
        .extern_path(".manager.CVMInfoRes", "crate::proto::CvmInfoRes")
        .extern_path(
            ".manager.AttestationPolicyRes",
            "crate::proto::AttestationPolicyRes",
        )
        .compile_fds(server_fds)?;

    let operator_fds = protox::compile(["operator.proto"], ["proto"])?;
    std::fs::write(
        out.join("operator_descriptor.bin"),
        prost::Message::encode_to_vec(&operator_fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(operator_fds)?;
    Ok(())
}
