//! Cluster sync benchmark (simulated); see `limiter_tests::bench::cluster`.
//! `cluster-bench [--clients H,...] [--nodes N,...] [--seconds S] [--samples K] [--write FILE]`.

use clap::Parser as _;
use limiter_tests::{
    bench::cluster::{Args, run},
    heap::Counting,
};

/// Counts the heap, for the report's memory per member.
#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() -> anyhow::Result<()> {
    run(&Args::parse())
}
