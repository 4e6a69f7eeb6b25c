//! Adaptive-loop benchmark; see `limiter_tests::bench::adapt`. `adapt-bench [--write FILE]`;
//! needs root.

use clap::Parser as _;
use limiter_tests::bench::adapt::{Args, run};

fn main() -> anyhow::Result<()> {
    run(&Args::parse())
}
