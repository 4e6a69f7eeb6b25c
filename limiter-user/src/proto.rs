//! Code generated from `proto/limiter.proto` (package `limiter.v1`).
#![expect(
    clippy::all,
    clippy::allow_attributes,
    unused_qualifications,
    missing_docs,
    reason = "generated code (tonic-prost-build)"
)]

tonic::include_proto!("limiter.v1");

/// Between the members of a cluster (`proto/cluster.proto`, package `limiter.cluster.v1`).
pub mod cluster {
    tonic::include_proto!("limiter.cluster.v1");
}

/// The encoded descriptor set of `limiter.proto`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("limiter_descriptor");
