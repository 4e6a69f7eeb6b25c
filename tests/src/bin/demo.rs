//! `cargo xtask demo`; see `limiter_tests::demo`. `demo [--seconds N]`; needs root.

use std::process::ExitCode;

use clap::Parser as _;
use limiter_tests::demo::{Args, run};

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
