//! Pure core of the Cocos manager.
//!
//! Everything here is deterministic and free of I/O: the configuration model
//! and its validation, the QEMU command line, the host-port pool, Go-style
//! durations, the files handed to the guest, and the generated wire types.
//! The actors crate owns every effect and calls into this crate.

pub mod agent;
pub mod attestation;
pub mod cgroup;
pub mod config;
pub mod duration;
pub mod events;
pub mod guest;
pub mod lifecycle;
pub mod ports;
pub mod privilege;
pub mod qemu;
pub mod record;
pub mod restart;

/// Generated gRPC types for the Cocos-compatible `manager` package.
pub mod proto {
    tonic::include_proto!("manager");

    /// Encoded descriptor set of `manager.proto`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/manager_descriptor.bin"));
}

/// The server's own reading of the `manager` wire (`proto/manager_server.proto`):
/// the same service and messages, with the requests' string fields as bytes
/// so that the server checks UTF-8 itself and names the field. Server only;
/// the answers are the public [`proto`] types. Not a contract: clients use
/// [`proto`], and reflection serves `manager.proto`.
pub mod server_proto {
    include!(concat!(env!("OUT_DIR"), "/server/manager.rs"));
}

/// Generated gRPC types of the operator's extension service,
/// `cocos.manager.v1.Operator` (`proto/operator.proto`): client and server.
pub mod operator_proto {
    tonic::include_proto!("cocos.manager.v1");

    /// Encoded descriptor set of `operator.proto`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/operator_descriptor.bin"));
}
