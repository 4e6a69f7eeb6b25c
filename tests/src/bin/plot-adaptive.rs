//! `cargo xtask plot-adaptive`; see `limiter_tests::plot`. `plot-adaptive [--out DIR]`.

use clap::Parser as _;
use limiter_tests::plot::{Args, run};

fn main() -> anyhow::Result<()> {
    run(&Args::parse())
}
