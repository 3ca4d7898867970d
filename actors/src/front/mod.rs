//! The front: the gRPC API (Cocos-compatible service, health, reflection)
//! and the HTTP health/metrics endpoint. It only turns requests into
//! messages for the supervisor.

pub mod grpc;
pub mod http;
