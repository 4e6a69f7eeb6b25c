//! XDP benchmark; see `limiter_tests::bench::xdp`. `xdp-bench [--repeat N] [--write FILE]`;
//! needs root.

use clap::Parser as _;
use limiter_tests::bench::xdp::{Args, run};

fn main() -> anyhow::Result<()> {
    run(&Args::parse())
}
