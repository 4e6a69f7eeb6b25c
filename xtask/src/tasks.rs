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

/// `cargo xtask test`: builds the debug `limiter`, then runs every suite (formatting, clippy,
/// the unprivileged and the privileged tests), continuing past a failing suite so one run reports
/// all failures. `test_args` go to the test binaries.
pub fn test(workspace: &Workspace, test_args: &[String]) -> Result<()> {
    build_limiter(workspace, Profile::Debug).context("test")?;
    let limiter = workspace.binary(Profile::Debug, "limiter");
    let suites = [
        ("formatting", check_formatting(workspace)),
        ("clippy", check_lints(workspace)),
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

/// `cargo xtask bench`: builds the release `limiter`, runs the XDP benchmark (passing
/// `bench_args` to it), the snapshot, gRPC API, adaptive-loop, control-plane, cluster-sync and
/// live-traffic benchmarks, prints them and writes them to BENCHMARKS.md.
pub fn bench(workspace: &Workspace, bench_args: &[String]) -> Result<()> {
    build_limiter(workspace, Profile::Release).context("bench")?;
    let limiter = workspace.binary(Profile::Release, "limiter");
    let out_dir = workspace.root().join("target").join("bench");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("bench: creating {}", out_dir.display()))?;
    let xdp = out_dir.join("xdp.md");
    let snapshot = out_dir.join("snapshot.md");
    let api = out_dir.join("api.md");
    run_bench_binary(workspace, &limiter, "xdp-bench", &[], &xdp, bench_args)?;
    run_bench_binary(workspace, &limiter, "snapshot-bench", &[], &snapshot, &[])?;
    run_bench_binary(workspace, &limiter, "api-bench", &["run"], &api, &[])?;
    let adaptive = out_dir.join("adaptive.md");
    run_bench_binary(workspace, &limiter, "adapt-bench", &[], &adaptive, &[])?;
    let control = out_dir.join("control.md");
    run_bench_binary(workspace, &limiter, "control-bench", &[], &control, &[])?;
    let cluster = out_dir.join("cluster.md");
    run_bench_binary(workspace, &limiter, "cluster-bench", &[], &cluster, &[])?;
    let live = out_dir.join("live.md");
    run_bench_binary(workspace, &limiter, "live-bench", &[], &live, &[])?;
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path).with_context(|| format!("bench: reading {}", path.display()))
    };
    let report = format!(
        "# Benchmarks\n\nWritten by `cargo xtask bench`; rerun it to refresh. Targets are checked here, \
         never by timed tests. Every ratio is against a baseline measured in the same run.\n\n{}\n\
         ## Snapshots\n\nThe agent's own snapshot code (`limiter_user::snapshot`) on a private map \
         holding one million clients; the file is fsynced and renamed as in production.\n\n{}\n{}\n{}\n{}\n{}\n{}",
        read(&xdp)?.replacen("# XDP benchmark", "## XDP fast path", 1),
        read(&snapshot)?,
        read(&api)?,
        read(&adaptive)?,
        read(&control)?,
        read(&cluster)?,
        read(&live)?,
    );
    let target = workspace.root().join("BENCHMARKS.md");
    let old = match std::fs::read_to_string(&target) {
        Ok(old) => old,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(e).with_context(|| format!("bench: reading {}", target.display()));
        }
    };
    let report = with_measured_by_hand(report, &old)?;
    std::fs::write(&target, report)
        .with_context(|| format!("bench: writing {}", target.display()))?;
    eprintln!("bench: wrote {}", target.display());
    Ok(())
}

/// The heading of BENCHMARKS.md's last section, which holds what was measured by hand (A/B runs
/// of a change, experiments): `cargo xtask bench` does not measure it, so it keeps it.
const MEASURED_BY_HAND: &str = "## Measured by hand";

/// The generated `report` followed by the section measured by hand of the `old` BENCHMARKS.md,
/// if it has one (from its heading, a line of its own, to the end; line ends made `\n`). An
/// error if the generated report has such a heading itself: kept after it, the section would
/// take the generated text after that heading along at every run.
fn with_measured_by_hand(mut report: String, old: &str) -> Result<String> {
    let heading_at = |text: &str| {
        text.match_indices(MEASURED_BY_HAND)
            .find(|(i, _)| {
                let line_start = *i == 0 || text[..*i].ends_with('\n');
                let rest = &text[i + MEASURED_BY_HAND.len()..];
                line_start
                    && (rest.is_empty() || rest.starts_with('\n') || rest.starts_with("\r\n"))
            })
            .map(|(i, _)| i)
    };
    anyhow::ensure!(
        heading_at(&report).is_none(),
        "bench: the generated report has a \"{MEASURED_BY_HAND}\" heading of its own"
    );
    if let Some(i) = heading_at(old) {
        if !report.ends_with("\n\n") {
            report.push_str(if report.ends_with('\n') { "\n" } else { "\n\n" });
        }
        report.push_str(&old[i..].replace("\r\n", "\n"));
    }
    Ok(report)
}

/// `cargo run --release -p limiter-tests --bin BIN -- SUBCOMMAND... --write REPORT ARGS...`,
/// with `LIMITER_BIN` naming the release `limiter`.
fn run_bench_binary(
    workspace: &Workspace,
    limiter: &std::path::Path,
    bin: &str,
    subcommand: &[&str],
    report: &std::path::Path,
    args: &[String],
) -> Result<()> {
    let mut command = workspace.cargo([
        "run",
        "--release",
        "-p",
        PRIVILEGED_TEST_PACKAGE,
        "--bin",
        bin,
    ]);
    command
        .env(LIMITER_BIN_ENV, limiter)
        .arg("--")
        .args(subcommand)
        .arg("--write")
        .arg(report)
        .args(args);
    process::run(&mut command).with_context(|| format!("bench: {bin}"))
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

/// `cargo xtask plot-adaptive`: the adaptive controller's simulations as SVGs in `docs/`
/// (deterministic: the same bytes every run, so a diff shows a behaviour change).
pub fn plot_adaptive(workspace: &Workspace) -> Result<()> {
    let mut command = workspace.cargo([
        "run",
        "-p",
        PRIVILEGED_TEST_PACKAGE,
        "--bin",
        "plot-adaptive",
    ]);
    command
        .arg("--")
        .arg("--out")
        .arg(workspace.root().join("docs"));
    process::run(&mut command).context("plot-adaptive")
}

fn build_limiter(workspace: &Workspace, profile: Profile) -> Result<()> {
    let mut command = workspace.cargo(["build", "-p", "limiter-user", "--bins"]);
    if let Profile::Release = profile {
        command.arg("--release");
    }
    process::run(&mut command)
}

/// `cargo fmt --all -- --check`: fails, listing the differences, if any file is not formatted.
fn check_formatting(workspace: &Workspace) -> Result<()> {
    let mut command = workspace.cargo(["fmt", "--all", "--", "--check"]);
    process::run(&mut command)
}

/// `cargo clippy --workspace --all-targets -- -D warnings`: every warning of the workspace lints
/// (root Cargo.toml) fails the suite.
fn check_lints(workspace: &Workspace) -> Result<()> {
    let mut command = workspace.cargo([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    process::run(&mut command)?;
    check_bpf_lints(workspace)
}

/// Clippy on limiter-ebpf for the BPF target: on the host every program module is compiled out
/// (`cfg(target_arch = "bpf")`), so the workspace run above never sees the program. It uses the
/// toolchain that builds the program (rustup's `system`, with Debian's `rust-web-clippy`), the
/// flags aya-build passes (see limiter-user/build.rs), and a target directory of its own so the
/// host build is not invalidated. `--lib --bins` only: there are no tests for the BPF target.
fn check_bpf_lints(workspace: &Workspace) -> Result<()> {
    let mut command = process::command("rustup");
    command
        .args(["run", "system", "cargo", "clippy", "-p", "limiter-ebpf"])
        .args(["--target", "bpfel-unknown-none", "--lib", "--bins"])
        .args(["--features", "bench", "--target-dir"])
        .arg(workspace.root().join("target").join("clippy-bpf"))
        .args(["--", "-D", "warnings"])
        .current_dir(workspace.root())
        .env("RUSTC_BOOTSTRAP", "aya_ebpf,limiter")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"",
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A regenerated BENCHMARKS.md keeps the old one's section measured by hand, whole, after
    /// the generated sections, and only that: a mention of the heading inside a line is not it.
    #[test]
    fn the_section_measured_by_hand_survives_a_rerun() -> Result<()> {
        let old = "# Benchmarks\n\n## gRPC API\n\nold figures, see \"## Measured by hand\"\n\n\
                   ## Measured by handoff, not it\n\n## Measured by hand\n\n### An A/B\n\n| a | b |\n";
        assert_eq!(
            with_measured_by_hand("# Benchmarks\n\n## gRPC API\n\nnew figures\n".into(), old)?,
            "# Benchmarks\n\n## gRPC API\n\nnew figures\n\n## Measured by hand\n\n### An A/B\n\n\
             | a | b |\n"
        );
        assert_eq!(
            with_measured_by_hand("new\n".into(), "# Benchmarks\n\nno such section\n")?,
            "new\n"
        );
        assert_eq!(with_measured_by_hand("new".into(), "")?, "new");
        // CRLF in the old file: the kept section takes the report's `\n`.
        assert_eq!(
            with_measured_by_hand("new\n".into(), "old\r\n## Measured by hand\r\n\r\nx\r\n")?,
            "new\n\n## Measured by hand\n\nx\n"
        );
        // A generated heading of the same name is refused, not spliced around.
        assert!(with_measured_by_hand("## Measured by hand\n".into(), old).is_err());
        Ok(())
    }
}
