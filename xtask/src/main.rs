//! `cargo xtask <command>`: sets up the toolchain, builds, tests, benchmarks and demos the
//! limiter. Run `cargo xtask --help` for the commands.

mod process;
mod setup;
mod tasks;
mod vm;
mod workspace;

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use workspace::Workspace;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for the limiter workspace"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the toolchain (Debian packages, rustup `system` toolchain, bpf-linker, bpffs),
    /// skipping steps already done.
    Setup,
    /// Build the release `limiter` binary (and the eBPF program it embeds).
    Build,
    /// Run every test suite, including the privileged ones (needs root). Arguments after `--` go
    /// to the test binaries, e.g. `cargo xtask test -- window`.
    Test {
        /// Passed to the test binaries (name filters, `--nocapture`, ...).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "TEST_ARGS"
        )]
        args: Vec<String>,
    },
    /// Run the benchmarks (XDP fast path, snapshot, gRPC API) and rewrite BENCHMARKS.md.
    /// Arguments after `--` go to `xdp-bench`.
    Bench {
        /// Passed to `xdp-bench`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "BENCH_ARGS"
        )]
        args: Vec<String>,
    },
    /// Build the release `limiter` and run the demo against it (needs root). Arguments after `--`
    /// go to the demo.
    Demo {
        /// Passed to the demo binary.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "DEMO_ARGS"
        )]
        args: Vec<String>,
    },
    /// Render the adaptive controller's simulations as SVG charts under docs/ (no root).
    PlotAdaptive,
    /// Boot a kernel (default: Debian's 6.1 cloud kernel) in QEMU and run the privileged tests
    /// inside it. Arguments after `--` go to the test binaries.
    VmTest(vm::Args),
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    let workspace = Workspace::locate()?;
    match command {
        Command::Setup => setup::run(&workspace),
        Command::Build => {
            setup::ensure(&workspace)?;
            tasks::build(&workspace)
        }
        Command::Test { args } => {
            require_root(
                "test",
                "the privileged tests create network namespaces and attach XDP",
            )?;
            setup::ensure(&workspace)?;
            tasks::test(&workspace, &args)
        }
        Command::Bench { args } => {
            setup::ensure(&workspace)?;
            tasks::bench(&workspace, &args)
        }
        Command::Demo { args } => {
            require_root("demo", "it creates network namespaces and attaches XDP")?;
            setup::ensure(&workspace)?;
            tasks::demo(&workspace, &args)
        }
        Command::PlotAdaptive => {
            setup::ensure(&workspace)?;
            tasks::plot_adaptive(&workspace)
        }
        Command::VmTest(args) => {
            setup::ensure(&workspace)?;
            vm::install_tools()?;
            vm::run(&workspace, &args)
        }
    }
}

/// Refuses to run `command` without root, saying `why` it needs root.
fn require_root(command: &str, why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "`cargo xtask {command}` must run as root ({why}); try `sudo -E cargo xtask {command}`"
        );
    }
    Ok(())
}
