//! The commands that build and run the project: `build`, `test`, `bench` and `demo`.

use anyhow::{Context as _, Result, bail};

use crate::process;
use crate::workspace::{Profile, Workspace};

/// Tells the integration tests and the demo which `limiter` binary to run.
const LIMITER_BIN_ENV: &str = "LIMITER_BIN";

/// Crates whose tests need no privileges and may run in parallel.
const UNPRIVILEGED_TEST_PACKAGES: &[&str] = &["limiter-common", "limiter-user", "xtask"];
/// Creates network namespaces and attaches XDP programs: needs root and runs one test at a time.
const PRIVILEGED_TEST_PACKAGE: &str = "limiter-tests";

/// `cargo xtask build`: the release `limiter` binary (its build.rs builds the eBPF program).
pub fn build(workspace: &Workspace) -> Result<()> {
    build_limiter(workspace, Profile::Release).context("build")
}

/// `cargo xtask test`: builds the debug `limiter`, then runs every test suite, continuing past a
/// failing suite so one run reports all failures. `test_args` go to the test binaries.
pub fn test(workspace: &Workspace, test_args: &[String]) -> Result<()> {
    build_limiter(workspace, Profile::Debug).context("test")?;
    let limiter = workspace.binary(Profile::Debug, "limiter");
    let suites = [
        (
            "unprivileged tests",
            test_unprivileged(workspace, &limiter, test_args),
        ),
        (
            "privileged tests",
            test_privileged(workspace, &limiter, test_args),
        ),
    ];
    let failed: Vec<String> = suites
        .into_iter()
        .filter_map(|(suite, result)| result.err().map(|err| format!("{suite}: {err:#}")))
        .collect();
    if !failed.is_empty() {
        bail!("test: {}", failed.join("; "));
    }
    eprintln!("test: all suites passed");
    Ok(())
}

/// `cargo xtask bench`: runs the XDP benchmark, passing `bench_args` to it.
pub fn bench(workspace: &Workspace, bench_args: &[String]) -> Result<()> {
    let mut command = workspace.cargo([
        "run",
        "--release",
        "-p",
        PRIVILEGED_TEST_PACKAGE,
        "--bin",
        "xdp-bench",
    ]);
    command.arg("--").args(bench_args);
    process::run(&mut command).context("bench")
}

/// `cargo xtask demo`: builds the release `limiter` and runs the demo against it.
pub fn demo(workspace: &Workspace, demo_args: &[String]) -> Result<()> {
    build_limiter(workspace, Profile::Release).context("demo")?;
    let limiter = workspace.binary(Profile::Release, "limiter");
    let mut command = workspace.cargo([
        "run",
        "--release",
        "-p",
        PRIVILEGED_TEST_PACKAGE,
        "--bin",
        "demo",
    ]);
    command
        .env(LIMITER_BIN_ENV, &limiter)
        .arg("--")
        .args(demo_args);
    process::run(&mut command).context("demo")
}

fn build_limiter(workspace: &Workspace, profile: Profile) -> Result<()> {
    let mut command = workspace.cargo(["build", "-p", "limiter-user", "--bins"]);
    if let Profile::Release = profile {
        command.arg("--release");
    }
    process::run(&mut command)
}

fn test_unprivileged(
    workspace: &Workspace,
    limiter: &std::path::Path,
    test_args: &[String],
) -> Result<()> {
    let mut command = workspace.cargo(["test", "--no-fail-fast"]);
    for package in UNPRIVILEGED_TEST_PACKAGES {
        command.args(["-p", package]);
    }
    command
        .env(LIMITER_BIN_ENV, limiter)
        .arg("--")
        .args(test_args);
    process::run(&mut command)
}

fn test_privileged(
    workspace: &Workspace,
    limiter: &std::path::Path,
    test_args: &[String],
) -> Result<()> {
    let mut command = workspace.cargo(["test", "--no-fail-fast", "-p", PRIVILEGED_TEST_PACKAGE]);
    command
        .env(LIMITER_BIN_ENV, limiter)
        .args(["--", "--test-threads=1"])
        .args(test_args);
    process::run(&mut command)
}
