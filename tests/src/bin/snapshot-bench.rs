//! Snapshot benchmark; see `limiter_tests::bench::snapshot`.
//! `snapshot-bench [--clients N] [--write FILE]`; needs root.

use clap::Parser as _;
use limiter_tests::bench::snapshot::{Args, run};

fn main() -> anyhow::Result<()> {
    run(&Args::parse())
}
