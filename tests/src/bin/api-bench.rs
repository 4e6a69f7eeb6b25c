//! gRPC API benchmark; see `limiter_tests::bench::api`.
//! `api-bench run|floor-server|load ...`; `run` needs root.

use clap::Parser as _;
use limiter_tests::bench::api::{Cli, execute};

fn main() -> anyhow::Result<()> {
    execute(Cli::parse())
}
