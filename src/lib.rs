//! Pure core of the Cocos manager.
//!
//! Everything here is deterministic and free of I/O: the configuration model
//! and its validation, the QEMU command line, the host-port pool, Go-style
//! durations, the files handed to the guest, and the generated wire types.
//! The actors crate owns every effect and calls into this crate.

pub mod attestation;
pub mod config;
pub mod duration;
pub mod guest;
pub mod ports;
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
