//! Control-plane benchmark; see `limiter_tests::bench::control`.
//! `control-bench [--policies N,...] [--rounds R] [--write FILE]`; needs root.

use clap::Parser as _;
use limiter_tests::bench::control::{Args, run};

fn main() -> anyhow::Result<()> {
    run(&Args::parse())
}
