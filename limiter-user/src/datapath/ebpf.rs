//! The embedded XDP objects.

/// The eBPF object built by build.rs, aligned for aya's ELF parser: the one the agent loads.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/limiter"));

/// The same program built with limiter-ebpf's `bench` feature: `OBJECT` plus the benchmark-only
/// programs (`limiter_baseline`, `limiter_bench_cycle`) and their map, for the benchmarks and
/// tests (`datapath::load_object`). Never loaded by the agent.
#[cfg(feature = "bench")]
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/limiter-bench"));
