//! Test support for the privileged tests, and, apart from it, the benchmarks, the demo and the
//! adaptive controller's charts (each behind a thin binary in `src/bin/`).

// The harness: what the privileged tests run against.
pub mod agent;
pub mod api;
pub mod clock;
pub mod command;
pub mod envoy;
pub mod fixture;
pub mod frames;
pub mod heap;
pub mod netns;
pub mod traffic;

// Shared by the tests and the charts.
pub mod adaptive_sim;
// Shared by the cluster simulation tests and the cluster benchmark.
pub mod cluster_sim;

// The binaries' bodies.
pub mod bench;
pub mod demo;
pub mod plot;
