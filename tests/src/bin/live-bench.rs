//! Live-traffic benchmark; see `limiter_tests::bench::live`. `live-bench [--rounds N]
//! [--seconds S] [--sources LIST] [--write FILE]`; needs root.

use clap::Parser as _;
use limiter_tests::bench::live::{Args, run};

fn main() -> anyhow::Result<()> {
    run(&Args::parse())
}
