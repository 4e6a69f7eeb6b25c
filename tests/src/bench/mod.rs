//! The benchmarks `cargo xtask bench` runs, each behind a thin binary of the same name: the XDP
//! fast path (`xdp-bench`), snapshots (`snapshot-bench`), the gRPC API (`api-bench`), the
//! adaptive loop (`adapt-bench`), the control plane with many policies (`control-bench`),
//! cluster sync at scale, simulated (`cluster-bench`) and live traffic against nftables
//! (`live-bench`). Each prints a markdown section and
//! `--write`s it for BENCHMARKS.md.

pub mod adapt;
pub mod api;
pub mod cluster;
pub mod control;
pub mod live;
pub mod report;
pub mod snapshot;
pub mod xdp;
