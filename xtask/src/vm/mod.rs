//! `cargo xtask vm-test`: runs the `limiter-tests` test binaries (the privileged integration
//! tests: network namespaces, veth, XDP attach, real traffic) inside a QEMU virtual machine that
//! boots another kernel than the host's, by default Debian bookworm's 6.1 cloud kernel. It needs
//! no root once QEMU is installed.
//!
//! 1. Builds the debug (or with `--release`, release) `limiter` binary and the test binaries
//!    (`cargo test --no-run`), found through cargo's JSON messages. Under TCG the release build
//!    runs the suite about twice as fast, and timing-sensitive tests see speeds nearer the host's.
//! 2. Fetches the kernel package and busybox-static with `apt-get download` into
//!    `target/vm/debs/` and unpacks them with `dpkg -x` into `target/vm/pkgs/`. Both are kept as
//!    a cache (the kernel package is resolved through `linux-image-cloud-amd64` on every run, so a
//!    new kernel ABI is fetched; delete `target/vm` to refresh the rest).
//! 3. Writes `target/vm/initramfs.cpio` (newc, uncompressed): static busybox, the host's real
//!    iproute2 `ip` and util-linux `nsenter` and `setpriv` in /usr/bin, ahead of busybox's applets in /bin on
//!    PATH (busybox's `ip` cannot create named veth peers), `limiter`, the test binaries, every
//!    shared library `ldd` lists for them with the dynamic loader, the kernel's veth.ko and /init.
//! 4. Boots it with `qemu-system-x86_64 -nic none -no-reboot -nographic` (serial console
//!    ttyS0, `panic=-1`). /init mounts proc, sysfs, devtmpfs, bpffs, tmpfs on /run and /tmp,
//!    loads veth, brings lo up and runs each test binary with `--test-threads=1` (and the
//!    arguments after `--`), printing `VMTEST-BINARY NAME exit=N` after each and
//!    `VMTEST-DONE status=N` at the end, then powers off. The `*_sim` simulations are left out:
//!    they touch no kernel, and `cargo xtask test` runs them on the host.
//!
//! The serial output is streamed and parsed: the command fails when a test fails, the kernel
//! panics (`panic=-1` reboots and `-no-reboot` turns that into QEMU exiting), the VM runs longer
//! than `--timeout`, or QEMU exits without the final marker, and says which.
//!
//! `--kernel PATH` boots any x86 bzImage. Its release is read from the bzImage header; its
//! config is looked for as `config-RELEASE` beside it, `.config` of a build tree
//! (`arch/x86/boot/bzImage`) or `/boot/config-RELEASE`, and checked when found. veth must be
//! built in or found as `../lib/modules/RELEASE/kernel/drivers/net/veth.ko[.xz|.zst]` relative to
//! the image's directory, in `/lib/modules/RELEASE/...` or as a build tree's
//! `drivers/net/veth.ko`; it is loaded without dependencies, so any other module a test needs
//! must be built in.
//!
//! Acceleration: KVM only where it really works. Machines of this project's kind expose a PVM
//! `/dev/kvm` (module `kvm_pvm`) that runs only PVM-enabled guest kernels: stock kernels stall or
//! fail with an emulation error. So KVM is used only when `kvm_intel` or `kvm_amd` is loaded,
//! `kvm_pvm` is not and `/dev/kvm` opens; otherwise TCG (`-accel tcg -cpu max`), where Debian's
//! cloud kernel reaches /init in about 5 s.
//!
//! The parts, each depending only on those listed before it: [`tools`] installs QEMU and
//! refreshes apt, [`packages`] fetches and unpacks Debian packages, [`kernel`] resolves and
//! checks the kernel, [`artifacts`] builds the binaries, [`initramfs`] writes the VM's root file
//! system and /init, [`qemu`] boots it and reads its console, [`report`] tallies the results.

mod artifacts;
mod initramfs;
mod kernel;
mod packages;
mod qemu;
mod report;
mod tools;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::process;
use crate::workspace::Workspace;

use initramfs::Payload;
use qemu::AccelChoice;
pub use tools::install_tools;

const BUSYBOX_PACKAGE: &str = "busybox-static";
/// `quiet` keeps kernel chatter out of the test output; errors and panics still print.
const KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// `cargo xtask vm-test` options.
#[derive(clap::Args)]
pub struct Args {
    /// Kernel to boot: `6.1` (Debian bookworm's cloud kernel), `6.12` (bookworm-backports' cloud
    /// kernel) or the path of an x86 bzImage.
    #[arg(long, default_value = "6.1", value_name = "6.1|6.12|PATH")]
    kernel: String,
    /// QEMU accelerator; `auto` uses KVM only where it can boot a stock kernel.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// Fail if the VM has not finished after this many seconds. Under TCG (no usable KVM) the
    /// whole suite takes about 15 minutes on 2 cores; 30 leaves room for a slower machine.
    #[arg(long, default_value_t = 1800, value_name = "SECONDS")]
    timeout: u64,
    /// Build `limiter` and the tests with the release profile (faster under emulation).
    #[arg(long)]
    release: bool,
    /// More kernel command-line arguments (e.g. `loglevel=7` to see the kernel's messages).
    #[arg(long, value_name = "ARGS")]
    append: Option<String>,
    /// Passed to every test binary (name filter, `--nocapture`, ...).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "TEST_ARGS"
    )]
    args: Vec<String>,
}

/// `cargo xtask vm-test`: builds, boots, runs the tests in the VM and reports their result.
pub fn run(workspace: &Workspace, args: &Args) -> Result<()> {
    let started = Instant::now();
    let cache = vm_dir(workspace)?;
    let profile: &[&str] = if args.release { &["--release"] } else { &[] };
    let limiter =
        artifacts::build_limiter(workspace, profile).context("vm-test: building `limiter`")?;
    let tests = artifacts::build_tests(workspace, profile)
        .context("vm-test: building the test binaries")?;
    let kernel =
        kernel::resolve_kernel(&args.kernel, &cache).context("vm-test: preparing the kernel")?;
    let busybox = packages::fetch_package(&cache, BUSYBOX_PACKAGE)
        .context("vm-test: fetching busybox")?
        .join("bin/busybox");
    let archive = cache.join("initramfs.cpio");
    let payload = Payload {
        busybox: &busybox,
        limiter: &limiter,
        tests: &tests,
        veth: kernel.veth.as_deref(),
        test_args: &args.args,
    };
    initramfs::write(&archive, &payload)
        .with_context(|| format!("vm-test: writing {}", archive.display()))?;
    let accel = qemu::choose_accel(args.accel);
    eprintln!(
        "vm-test: prepared in {:.1} s; booting {} with {}",
        started.elapsed().as_secs_f64(),
        kernel.release,
        accel.describe()
    );
    let cmdline = match &args.append {
        Some(extra) => format!("{KERNEL_CMDLINE} {extra}"),
        None => KERNEL_CMDLINE.to_owned(),
    };
    let command = qemu::command(&kernel, &archive, accel, &cmdline);
    let (console, ending) = qemu::run_vm(command, Duration::from_secs(args.timeout))?;
    report::report(&console, &ending, &kernel.release, started.elapsed())
}

/// `target/vm`, created if needed (the target directory comes from `cargo metadata`).
fn vm_dir(workspace: &Workspace) -> Result<PathBuf> {
    let metadata = process::stdout_of(&mut workspace.cargo([
        "metadata",
        "--format-version",
        "1",
        "--no-deps",
    ]))
    .context("`cargo metadata` failed")?;
    let metadata: Value = serde_json::from_str(&metadata).context("parsing `cargo metadata`")?;
    let target = metadata["target_directory"]
        .as_str()
        .context("`cargo metadata` has no target_directory")?;
    let dir = Path::new(target).join("vm");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
