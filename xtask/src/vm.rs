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
//!    iproute2 `ip` and util-linux `nsenter` in /usr/bin, ahead of busybox's applets in /bin on
//!    PATH (busybox's `ip` cannot create named veth peers), `limiter`, the test binaries, every
//!    shared library `ldd` lists for them with the dynamic loader, the kernel's veth.ko and /init.
//! 4. Boots it with `qemu-system-x86_64 -nic none -no-reboot -nographic` (serial console
//!    ttyS0, `panic=-1`). /init mounts proc, sysfs, devtmpfs, bpffs, tmpfs on /run and /tmp,
//!    loads veth, brings lo up and runs each test binary with `--test-threads=1` (and the
//!    arguments after `--`), printing `VMTEST-BINARY NAME exit=N` after each and
//!    `VMTEST-DONE status=N` at the end, then powers off.
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

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, BufRead as _, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use crate::process;
use crate::workspace::Workspace;

const QEMU: &str = "qemu-system-x86_64";
const QEMU_PACKAGE: &str = "qemu-system-x86";
/// The suite QEMU comes from when the preinstalled qemu-utils does (see [`install_tools`]).
const BACKPORTS: &str = "bookworm-backports";
const BACKPORTS_VERSION_TAG: &str = "~bpo12";
const APT_SOURCES_DIR: &str = "/etc/apt/sources.list.d";
const APT_SOURCES_LIST: &str = "/etc/apt/sources.list";
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const BUSYBOX_PACKAGE: &str = "busybox-static";
const TESTS_PACKAGE: &str = "limiter-tests";
const MEMORY_MIB: &str = "2048";
const CPUS: &str = "2";
/// `quiet` keeps kernel chatter out of the test output; errors and panics still print.
const KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";
/// Printed by /init once it has mounted everything, before the first test binary.
const READY_MARKER: &str = "VMTEST-KERNEL ";
const BINARY_MARKER: &str = "VMTEST-BINARY ";
const DONE_MARKER: &str = "VMTEST-DONE status=";
/// Printed by /init when its setup went wrong (e.g. veth could not be loaded).
const WARNING_MARKER: &str = "VMTEST-WARNING ";
const PANIC_TEXT: &str = "Kernel panic - not syncing";
/// How long QEMU may take to power off after the final marker.
const POWEROFF_GRACE: Duration = Duration::from_secs(30);
/// Kernel options the tests need, with the values that do: BPF with BTF (CO-RE), namespaces,
/// IPv6, packet sockets (the VLAN tests), and what this VM boots with.
const REQUIRED_CONFIG: &[(&str, &[&str])] = &[
    ("CONFIG_BPF_SYSCALL", &["y"]),
    ("CONFIG_DEBUG_INFO_BTF", &["y"]),
    ("CONFIG_NET_NS", &["y"]),
    ("CONFIG_IPV6", &["y"]),
    ("CONFIG_PACKET", &["y"]),
    ("CONFIG_VETH", &["y", "m"]),
    ("CONFIG_BLK_DEV_INITRD", &["y"]),
    ("CONFIG_DEVTMPFS", &["y"]),
    ("CONFIG_TMPFS", &["y"]),
    ("CONFIG_SERIAL_8250_CONSOLE", &["y"]),
];

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
    /// Fail if the VM has not finished after this many seconds.
    #[arg(long, default_value_t = 900, value_name = "SECONDS")]
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

#[derive(Clone, Copy, clap::ValueEnum)]
enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

// ---------------------------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------------------------

/// Installs QEMU unless it is there. The image's qemu-utils comes from bookworm-backports, and
/// bookworm's qemu-system-x86 7.2 cannot be installed beside it (qemu-utils 10 Breaks
/// qemu-system-common << 8.0, so apt would remove qemu-utils). QEMU therefore comes from the
/// suite of the installed qemu-utils: bookworm-backports, whose apt source is added from the
/// mirror the Debian source already uses, when qemu-utils is a backport; the default suite
/// otherwise. `--no-install-recommends` keeps out the GUI and block-driver extras.
pub fn install_tools() -> Result<()> {
    if process::find_executable(QEMU).is_some() {
        eprintln!("ok: {QEMU} installed");
        return Ok(());
    }
    let suite = qemu_suite();
    if let Some(suite) = suite {
        ensure_apt_suite(suite).with_context(|| format!("adding the apt source for {suite}"))?;
    }
    eprintln!("installing: Debian package {QEMU_PACKAGE}");
    apt_update()?;
    let mut install = process::command("apt-get");
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .stdin(Stdio::null());
    if let Some(suite) = suite {
        install.args(["-t", suite]);
    }
    process::run(install.arg(QEMU_PACKAGE))
}

/// The suite to take QEMU from: bookworm-backports when the installed qemu-utils is from there.
fn qemu_suite() -> Option<&'static str> {
    let version = process::stdout_of(process::command("dpkg-query").args([
        "-W",
        "-f=${Status} ${Version}",
        "qemu-utils",
    ]))?;
    let installed = version.starts_with("install ok installed");
    (installed && version.contains(BACKPORTS_VERSION_TAG)).then_some(BACKPORTS)
}

fn apt_update() -> Result<()> {
    process::run(
        process::command("apt-get")
            .arg("update")
            .stdin(Stdio::null()),
    )
}

/// Adds `APT_SOURCES_DIR/SUITE.sources` unless an apt source already names `suite`, with the
/// mirror and keyring of the bookworm source.
fn ensure_apt_suite(suite: &str) -> Result<()> {
    let sources = read_apt_sources()?;
    if sources.iter().any(|text| names_suite(text, suite)) {
        return Ok(());
    }
    let (uri, keyring) = sources
        .iter()
        .find_map(|text| bookworm_source(text))
        .context("no apt source for Debian bookworm to take the mirror from")?;
    let file = Path::new(APT_SOURCES_DIR).join(format!("{suite}.sources"));
    eprintln!("installing: apt source {}", file.display());
    let stanza = format!(
        "# Added by `cargo xtask setup`: QEMU comes from here, like the preinstalled qemu-utils.\n\
         Types: deb\nURIs: {uri}\nSuites: {suite}\nComponents: main\nSigned-By: {keyring}\n"
    );
    fs::write(&file, stanza).with_context(|| format!("writing {}", file.display()))
}

/// The text of /etc/apt/sources.list and of every *.list and *.sources file beside it.
fn read_apt_sources() -> Result<Vec<String>> {
    let mut files = vec![PathBuf::from(APT_SOURCES_LIST)];
    if let Ok(entries) = fs::read_dir(APT_SOURCES_DIR) {
        for entry in entries {
            let path = entry
                .with_context(|| format!("listing {APT_SOURCES_DIR}"))?
                .path();
            let name = path.to_string_lossy();
            if name.ends_with(".list") || name.ends_with(".sources") {
                files.push(path);
            }
        }
    }
    Ok(files
        .iter()
        .filter_map(|file| fs::read_to_string(file).ok())
        .collect())
}

/// Whether an uncommented line of an apt source file names `suite` as a word.
fn names_suite(text: &str, suite: &str) -> bool {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .any(|line| line.split_whitespace().any(|word| word == suite))
}

/// The URI and keyring of the source for suite `bookworm`, in deb822 (`URIs:`, `Suites:`,
/// `Signed-By:` fields) or one-line (`deb [signed-by=K] URI bookworm main`) format.
fn bookworm_source(text: &str) -> Option<(String, String)> {
    bookworm_stanza(text).or_else(|| bookworm_line(text))
}

fn bookworm_stanza(text: &str) -> Option<(String, String)> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(str::trim)
        };
        let suites = field("Suites:")?;
        if !suites.split_whitespace().any(|suite| suite == "bookworm") {
            return None;
        }
        let uri = field("URIs:")?.split_whitespace().next()?;
        let keyring = field("Signed-By:").unwrap_or(DEBIAN_KEYRING);
        Some((uri.to_owned(), keyring.to_owned()))
    })
}

fn bookworm_line(text: &str) -> Option<(String, String)> {
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("deb ")?;
        let (options, rest) = match rest.trim_start().strip_prefix('[') {
            Some(bracketed) => bracketed.split_once(']')?,
            None => ("", rest),
        };
        let mut words = rest.split_whitespace();
        let uri = words.next()?;
        (words.next()? == "bookworm").then_some(())?;
        let keyring = options
            .split_whitespace()
            .find_map(|option| option.strip_prefix("signed-by="))
            .unwrap_or(DEBIAN_KEYRING);
        Some((uri.to_owned(), keyring.to_owned()))
    })
}

// ---------------------------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------------------------

/// `cargo xtask vm-test`: builds, boots, runs the tests in the VM and reports their result.
pub fn run(workspace: &Workspace, args: &Args) -> Result<()> {
    let started = Instant::now();
    let cache = vm_dir(workspace)?;
    let profile: &[&str] = if args.release { &["--release"] } else { &[] };
    let limiter = build_limiter(workspace, profile).context("vm-test: building `limiter`")?;
    let tests = build_tests(workspace, profile).context("vm-test: building the test binaries")?;
    let kernel = resolve_kernel(&args.kernel, &cache).context("vm-test: preparing the kernel")?;
    let busybox = fetch_package(&cache, BUSYBOX_PACKAGE)
        .context("vm-test: fetching busybox")?
        .join("bin/busybox");
    let initramfs = cache.join("initramfs.cpio");
    let payload = Payload {
        busybox: &busybox,
        limiter: &limiter,
        tests: &tests,
        veth: kernel.veth.as_deref(),
        test_args: &args.args,
    };
    write_initramfs(&initramfs, &payload)
        .with_context(|| format!("vm-test: writing {}", initramfs.display()))?;
    let accel = choose_accel(args.accel);
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
    let command = qemu_command(&kernel, &initramfs, accel, &cmdline);
    let (console, ending) = run_vm(command, Duration::from_secs(args.timeout))?;
    report(&console, &ending, &kernel.release, started.elapsed())
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

// ---------------------------------------------------------------------------------------------
// Building
// ---------------------------------------------------------------------------------------------

/// An executable cargo built: `kind` is the target kind (`lib`, `bin`, `test`).
struct Artifact {
    name: String,
    kind: String,
    executable: PathBuf,
    test: bool,
}

impl Artifact {
    /// Its file name inside the VM: `KIND-NAME`, unique within one package.
    fn vm_name(&self) -> String {
        format!("{}-{}", self.kind, self.name)
    }
}

fn build_limiter(workspace: &Workspace, profile: &[&str]) -> Result<PathBuf> {
    let args = [&["build", "-p", "limiter-user", "--bins"], profile].concat();
    let artifacts = cargo_artifacts(workspace, &args)?;
    artifacts
        .into_iter()
        .find(|artifact| artifact.name == "limiter" && !artifact.test)
        .map(|artifact| artifact.executable)
        .context("cargo built no `limiter` executable")
}

/// Every test executable of `limiter-tests`: its library's, its binaries' and tests/*.rs.
fn build_tests(workspace: &Workspace, profile: &[&str]) -> Result<Vec<Artifact>> {
    let args = [&["test", "--no-run", "-p", TESTS_PACKAGE], profile].concat();
    let artifacts = cargo_artifacts(workspace, &args)?;
    let tests: Vec<Artifact> = artifacts.into_iter().filter(|a| a.test).collect();
    ensure!(!tests.is_empty(), "cargo built no test executable");
    Ok(tests)
}

/// Runs `cargo ARGS --message-format=json-render-diagnostics` and returns the executables it
/// reports (diagnostics still go to stderr).
fn cargo_artifacts(workspace: &Workspace, args: &[&str]) -> Result<Vec<Artifact>> {
    let line = format!(
        "cargo {} --message-format=json-render-diagnostics",
        args.join(" ")
    );
    eprintln!("+ {line}");
    let output = workspace
        .cargo(args)
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    ensure!(
        output.status.success(),
        "`{line}` failed ({})",
        output.status
    );
    Ok(parse_artifacts(&String::from_utf8_lossy(&output.stdout)))
}

/// The `compiler-artifact` messages with an executable, from cargo's JSON lines.
fn parse_artifacts(json_lines: &str) -> Vec<Artifact> {
    json_lines
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter_map(|message| {
            Some(Artifact {
                name: message["target"]["name"].as_str()?.to_owned(),
                kind: message["target"]["kind"][0].as_str()?.to_owned(),
                executable: PathBuf::from(message["executable"].as_str()?),
                test: message["profile"]["test"].as_bool()?,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Debian packages
// ---------------------------------------------------------------------------------------------

/// The unpacked root of Debian package `name`: `apt-get download` into `cache/debs` (skipped if
/// a `NAME_*.deb` is already there) and `dpkg -x` into `cache/pkgs/STEM`.
fn fetch_package(cache: &Path, name: &str) -> Result<PathBuf> {
    let debs = cache.join("debs");
    let deb = match cached_deb(&debs, name)? {
        Some(deb) => deb,
        None => download_deb(&debs, name)?,
    };
    unpack_deb(&deb, &cache.join("pkgs"))
}

fn cached_deb(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    if !dir.exists() {
        return Ok(None);
    }
    let prefix = format!("{name}_");
    let entries = fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        if file.starts_with(&prefix) && file.ends_with(".deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// `apt-get download NAME` in `dir`, refreshing the package lists once if it fails (a fresh
/// machine may have none, an old one may name versions the mirror dropped).
fn download_deb(dir: &Path, name: &str) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let download = || {
        process::run(
            process::command("apt-get")
                .args(["download", name])
                .current_dir(dir)
                .stdin(Stdio::null()),
        )
    };
    if download().is_err() {
        eprintln!("apt-get download {name} failed; refreshing the package lists and retrying");
        apt_update()?;
        download()?;
    }
    cached_deb(dir, name)?.with_context(|| {
        format!(
            "`apt-get download {name}` left no {name}_*.deb in {}",
            dir.display()
        )
    })
}

/// `dpkg -x DEB` into `pkgs/STEM` (through a `.partial` directory, so an interrupted unpack is
/// redone), unless that is already there.
fn unpack_deb(deb: &Path, pkgs: &Path) -> Result<PathBuf> {
    let stem = deb
        .file_stem()
        .with_context(|| format!("{} has no file name", deb.display()))?;
    let root = pkgs.join(stem);
    if root.exists() {
        return Ok(root);
    }
    let partial = pkgs.join(format!("{}.partial", stem.to_string_lossy()));
    if partial.exists() {
        fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    fs::create_dir_all(pkgs).with_context(|| format!("creating {}", pkgs.display()))?;
    process::run(process::command("dpkg").arg("-x").arg(deb).arg(&partial))?;
    fs::rename(&partial, &root).with_context(|| format!("renaming {}", partial.display()))?;
    Ok(root)
}

// ---------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------

/// A kernel image to boot and what was found beside it.
struct Kernel {
    image: PathBuf,
    release: String,
    /// The veth module, if veth is not built in.
    veth: Option<PathBuf>,
}

/// Fetches (for `6.1`/`6.12`) or takes (a path) the kernel image, finds its config and veth
/// module, and checks the config.
fn resolve_kernel(choice: &str, cache: &Path) -> Result<Kernel> {
    let image = match debian_kernel_series(choice) {
        Some((series, metapackage)) => debian_kernel(cache, series, metapackage)?,
        None => PathBuf::from(choice),
    };
    let bytes = fs::read(&image).with_context(|| format!("reading {}", image.display()))?;
    let release = bzimage_release(&bytes).with_context(|| {
        format!(
            "{} is not an x86 bzImage (no kernel version in its setup header)",
            image.display()
        )
    })?;
    let veth = find_veth(&image, &release);
    check_config(&image, &release, veth.as_deref())?;
    match &veth {
        Some(module) => eprintln!("vm-test: kernel {release}, veth from {}", module.display()),
        None => eprintln!("vm-test: kernel {release}, no veth module (must be built in)"),
    }
    Ok(Kernel {
        image,
        release,
        veth,
    })
}

/// The kernel series and Debian metapackage (`NAME[/SUITE]`) a `--kernel` value names.
fn debian_kernel_series(choice: &str) -> Option<(&'static str, &'static str)> {
    match choice {
        "6.1" => Some(("6.1", "linux-image-cloud-amd64")),
        "6.12" => Some(("6.12", "linux-image-cloud-amd64/bookworm-backports")),
        _ => None,
    }
}

/// Downloads the kernel package `metapackage` depends on and returns its vmlinuz.
fn debian_kernel(cache: &Path, series: &str, metapackage: &str) -> Result<PathBuf> {
    let package = match image_package(metapackage, series) {
        Some(package) => package,
        None => {
            apt_update()?;
            image_package(metapackage, series).with_context(|| {
                format!(
                    "`apt-cache depends {metapackage}` names no linux-image-{series}.* package \
                     (6.12 needs the {BACKPORTS} apt source)"
                )
            })?
        }
    };
    let release = package.trim_start_matches("linux-image-");
    let root = fetch_package(cache, &package)?;
    Ok(root.join("boot").join(format!("vmlinuz-{release}")))
}

fn image_package(metapackage: &str, series: &str) -> Option<String> {
    let output = process::stdout_of(process::command("apt-cache").args(["depends", metapackage]))?;
    parse_image_dependency(&output, series)
}

/// The `linux-image-SERIES.*` package in `apt-cache depends` output.
fn parse_image_dependency(output: &str, series: &str) -> Option<String> {
    let prefix = format!("linux-image-{series}.");
    output
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|package| package.starts_with(&prefix))
        .map(str::to_owned)
}

/// The release (`uname -r`) in a bzImage's setup header: the kernel_version field at 0x20e
/// points (minus 0x200) at a NUL-terminated `RELEASE (builder) #1 SMP ...` string.
fn bzimage_release(image: &[u8]) -> Option<String> {
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let pointer = u16::from_le_bytes([*image.get(0x20e)?, *image.get(0x20f)?]);
    let start = usize::from(pointer) + 0x200;
    let text = image.get(start..)?;
    let end = text.iter().position(|&byte| byte == 0)?;
    let version = std::str::from_utf8(&text[..end]).ok()?;
    version.split_whitespace().next().map(str::to_owned)
}

/// The directory of a kernel build tree `image` is in (`TREE/arch/x86/boot/bzImage`).
fn build_tree(image: &Path) -> Option<&Path> {
    image.parent()?.parent()?.parent()?.parent()
}

fn find_config(image: &Path, release: &str) -> Option<PathBuf> {
    let dir = image.parent()?;
    let mut candidates = vec![dir.join(format!("config-{release}"))];
    candidates.extend(build_tree(image).map(|tree| tree.join(".config")));
    candidates.push(PathBuf::from(format!("/boot/config-{release}")));
    candidates.into_iter().find(|path| path.is_file())
}

fn find_veth(image: &Path, release: &str) -> Option<PathBuf> {
    let dir = image.parent()?;
    let module_dirs = [
        dir.join("../lib/modules").join(release),
        PathBuf::from("/lib/modules").join(release),
    ];
    let mut candidates: Vec<PathBuf> = module_dirs
        .iter()
        .flat_map(|modules| {
            ["veth.ko", "veth.ko.xz", "veth.ko.zst"]
                .map(|file| modules.join("kernel/drivers/net").join(file))
        })
        .collect();
    candidates.extend(build_tree(image).map(|tree| tree.join("drivers/net/veth.ko")));
    candidates.into_iter().find(|path| path.is_file())
}

/// Checks the kernel config for what the tests need, when a config can be found.
fn check_config(image: &Path, release: &str, veth: Option<&Path>) -> Result<()> {
    let Some(path) = find_config(image, release) else {
        eprintln!("vm-test: warning: no config found for {release}; not checking BPF/BTF/XDP");
        return Ok(());
    };
    let config =
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let missing = missing_options(&config);
    ensure!(
        missing.is_empty(),
        "{} lacks what the tests need: {}",
        path.display(),
        missing.join(", ")
    );
    let veth_is_module = config.lines().any(|line| line == "CONFIG_VETH=m");
    ensure!(
        !veth_is_module || veth.is_some(),
        "{} builds veth as a module, but no veth.ko was found for {release}",
        path.display()
    );
    Ok(())
}

/// The [`REQUIRED_CONFIG`] options `config` does not set to an accepted value.
fn missing_options(config: &str) -> Vec<String> {
    REQUIRED_CONFIG
        .iter()
        .filter(|(option, accepted)| {
            !config.lines().any(|line| {
                line.split_once('=')
                    .is_some_and(|(name, value)| name == *option && accepted.contains(&value))
            })
        })
        .map(|(option, accepted)| format!("{option}={}", accepted.join("|")))
        .collect()
}

/// The module's bytes, decompressed if it is `.ko.xz` or `.ko.zst` (with `xz`/`zstd`).
fn module_bytes(module: &Path) -> Result<Vec<u8>> {
    let name = module.to_string_lossy();
    let decompressor = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        return fs::read(module).with_context(|| format!("reading {}", module.display()));
    };
    let output = process::command(decompressor)
        .arg("-dc")
        .arg(module)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{decompressor} -dc {name}`"))?;
    ensure!(
        output.status.success(),
        "`{decompressor} -dc {name}` failed ({})",
        output.status
    );
    Ok(output.stdout)
}

// ---------------------------------------------------------------------------------------------
// The initramfs
// ---------------------------------------------------------------------------------------------

/// What goes into the initramfs besides the host's `ip`, `nsenter` and shared libraries.
struct Payload<'a> {
    busybox: &'a Path,
    limiter: &'a Path,
    tests: &'a [Artifact],
    veth: Option<&'a Path>,
    test_args: &'a [String],
}

/// Where the veth module goes in the VM.
const VETH_IN_VM: &str = "lib/modules/veth.ko";
/// Where the `limiter` binary goes in the VM (the tests find it through LIMITER_BIN).
const LIMITER_IN_VM: &str = "usr/bin/limiter";

fn write_initramfs(path: &Path, payload: &Payload<'_>) -> Result<()> {
    let programs = vm_programs(payload)?;
    let libraries = shared_libraries(programs.iter().map(|(_, host)| host.as_path()))?;
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut cpio = Cpio::new(BufWriter::new(file));
    for dir in ["dev", "proc", "sys", "run", "tmp", "root", "etc", "bin"] {
        cpio.dir(dir)?;
    }
    cpio.char_device("dev/console", 5, 1)?;
    add_file(&mut cpio, "bin/busybox", 0o755, payload.busybox)?;
    let scratch = path.with_extension("strip");
    for (in_vm, host) in &programs {
        add_stripped(&mut cpio, in_vm, host, &scratch)?;
    }
    let _ = fs::remove_file(&scratch);
    for library in &libraries {
        let in_vm = library.to_string_lossy();
        add_file(&mut cpio, in_vm.trim_start_matches('/'), 0o755, library)?;
    }
    if let Some(veth) = payload.veth {
        cpio.file(VETH_IN_VM, 0o644, &module_bytes(veth)?)?;
    }
    cpio.file("init", 0o755, init_script(payload).as_bytes())?;
    cpio.finish()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn add_file<W: Write>(cpio: &mut Cpio<W>, in_vm: &str, perm: u32, host: &Path) -> Result<()> {
    let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
    cpio.file(in_vm, perm, &data)
        .with_context(|| format!("adding {} as /{in_vm}", host.display()))
}

/// Adds a program without its debug info (`strip --strip-debug` into `scratch`): the debug
/// test binaries carry hundreds of MB of DWARF, which the VM's RAM-backed rootfs would have to
/// hold twice while unpacking (it ran out at 2 GiB with a 769 MB initramfs).
fn add_stripped<W: Write>(
    cpio: &mut Cpio<W>,
    in_vm: &str,
    host: &Path,
    scratch: &Path,
) -> Result<()> {
    let output = process::command("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(scratch)
        .arg(host)
        .stdin(Stdio::null())
        .output()
        .context("could not start `strip` (binutils)")?;
    ensure!(
        output.status.success(),
        "`strip --strip-debug {}` failed ({}): {}",
        host.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    add_file(cpio, in_vm, 0o755, scratch)
}

/// `(path in the VM, path on the host)` of every dynamically linked program the VM runs.
fn vm_programs(payload: &Payload<'_>) -> Result<Vec<(String, PathBuf)>> {
    let mut programs = vec![
        ("usr/bin/ip".to_owned(), host_tool("ip", "-V", "iproute2")?),
        (
            "usr/bin/nsenter".to_owned(),
            host_tool("nsenter", "--version", "util-linux")?,
        ),
        (LIMITER_IN_VM.to_owned(), payload.limiter.to_path_buf()),
    ];
    for test in payload.tests {
        programs.push((format!("tests/{}", test.vm_name()), test.executable.clone()));
    }
    Ok(programs)
}

/// The host's `name` on PATH, checked to be the real tool (its `version_flag` output names
/// `package`), not a busybox applet.
fn host_tool(name: &str, version_flag: &str, package: &str) -> Result<PathBuf> {
    let path = process::find_executable(name)
        .with_context(|| format!("`{name}` ({package}) is not on PATH"))?;
    let version = process::stdout_of(process::command(&path).arg(version_flag))
        .with_context(|| format!("`{} {version_flag}` failed", path.display()))?;
    ensure!(
        version.contains(package),
        "`{} {version_flag}` does not name {package}: {}",
        path.display(),
        version.trim()
    );
    Ok(path)
}

/// Every shared library (and the dynamic loader) `ldd` lists for `programs`.
fn shared_libraries<'a>(programs: impl Iterator<Item = &'a Path>) -> Result<BTreeSet<PathBuf>> {
    let mut libraries = BTreeSet::new();
    for program in programs {
        let output = process::command("ldd")
            .arg(program)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("could not start `ldd {}`", program.display()))?;
        let text = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() && text.contains("not a dynamic executable") {
            continue;
        }
        ensure!(
            output.status.success(),
            "`ldd {}` failed ({})",
            program.display(),
            output.status
        );
        libraries.extend(parse_ldd(&text).with_context(|| format!("`ldd {}`", program.display()))?);
    }
    Ok(libraries)
}

/// The absolute paths in `ldd` output (`libc.so.6 => /lib/.../libc.so.6 (0x...)`,
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`); the vDSO has none.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in text.lines() {
        ensure!(
            !line.contains("not found"),
            "missing library: {}",
            line.trim()
        );
        if let Some(path) = line.split_whitespace().find(|word| word.starts_with('/')) {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// `'word'` for sh, with embedded quotes escaped.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The /init script: mounts, veth, lo, then every test binary in turn, then power off.
fn init_script(payload: &Payload<'_>) -> String {
    let args: Vec<String> = payload.test_args.iter().map(|a| shell_quote(a)).collect();
    let mut names: Vec<String> = payload.tests.iter().map(Artifact::vm_name).collect();
    names.sort();
    let load_veth = match payload.veth {
        Some(_) => format!("insmod /{VETH_IN_VM} || echo '{WARNING_MARKER}insmod veth.ko failed'"),
        None => format!(
            "[ -d /sys/module/veth ] || echo '{WARNING_MARKER}veth is neither built in nor shipped'"
        ),
    };
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1 LIMITER_BIN=/{LIMITER_IN_VM}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs tmpfs /run
mkdir -p /run/netns
mount -t tmpfs tmpfs /tmp
{load_veth}
ip link set lo up
echo "{READY_MARKER}$(uname -r)"
status=0
for name in {names}; do
    echo "{BINARY_MARKER}$name start"
    /tests/$name --test-threads=1 {args}
    rc=$?
    echo "{BINARY_MARKER}$name exit=$rc"
    [ $rc -eq 0 ] || status=1
done
echo "{DONE_MARKER}$status"
poweroff -f
"#,
        names = names.join(" "),
        args = args.join(" "),
    )
}

/// A writer of newc ("070701") cpio archives, the format the kernel unpacks as initramfs. It
/// adds each entry's missing parent directories first, so the kernel can create the entry.
struct Cpio<W: Write> {
    out: W,
    written: u64,
    next_inode: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Cpio {
            out,
            written: 0,
            next_inode: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn dir(&mut self, path: &str) -> io::Result<()> {
        if self.dirs.contains(path) {
            return Ok(());
        }
        self.parents(path)?;
        self.dirs.insert(path.to_owned());
        self.entry(path, 0o040_755, (0, 0), &[])
    }

    fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.parents(path)?;
        self.entry(path, 0o100_000 | perm, (0, 0), data)
    }

    fn char_device(&mut self, path: &str, major: u32, minor: u32) -> io::Result<()> {
        self.parents(path)?;
        self.entry(path, 0o020_600, (major, minor), &[])
    }

    /// Writes the trailer and flushes; returns the writer.
    fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        match path.rsplit_once('/') {
            Some((parent, _)) => self.dir(parent),
            None => Ok(()),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::other(format!("{name} is too large for cpio")))?;
        let inode = self.next_inode;
        self.next_inode += 1;
        let fields = [
            inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let header: String = fields.iter().map(|field| format!("{field:08x}")).collect();
        self.write(format!("070701{header}").as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let padding = (4 - self.written % 4) % 4;
        self.write(&[0; 3][..padding as usize])
    }
}

// ---------------------------------------------------------------------------------------------
// Booting
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Accel {
    Kvm,
    Tcg(&'static str),
}

impl Accel {
    fn describe(self) -> String {
        match self {
            Accel::Kvm => "KVM".to_owned(),
            Accel::Tcg(why) => format!("TCG ({why})"),
        }
    }

    fn qemu_args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg(_) => ["-accel", "tcg", "-cpu", "max"],
        }
    }
}

fn choose_accel(choice: AccelChoice) -> Accel {
    match choice {
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg("--accel tcg"),
        AccelChoice::Auto => match kvm_unusable() {
            Some(why) => Accel::Tcg(why),
            None => Accel::Kvm,
        },
    }
}

/// Why KVM cannot boot a stock kernel here, or `None` if it can.
fn kvm_unusable() -> Option<&'static str> {
    let module = |name: &str| Path::new("/sys/module").join(name).exists();
    if module("kvm_pvm") {
        return Some("/dev/kvm is PVM, which boots only PVM guest kernels");
    }
    if !module("kvm_intel") && !module("kvm_amd") {
        return Some("no kvm_intel or kvm_amd module");
    }
    let opens = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    (!opens).then_some("cannot open /dev/kvm")
}

fn qemu_command(kernel: &Kernel, initramfs: &Path, accel: Accel, cmdline: &str) -> Command {
    let mut command = process::command(QEMU);
    command
        .args(accel.qemu_args())
        .args(["-smp", CPUS, "-m", MEMORY_MIB])
        .args(["-nic", "none", "-no-reboot", "-nographic"])
        .arg("-kernel")
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(cmdline);
    command
}

/// How the VM run ended.
enum Ending {
    /// /init printed the final marker with this status.
    Done(i32),
    /// The kernel panicked; the panic line.
    Panic(String),
    /// Killed after the timeout.
    Timeout(Duration),
    /// QEMU exited without the final marker or a panic.
    Exited(String),
}

/// The serial console of one VM run.
struct Console {
    lines: Vec<String>,
    /// The status on /init's final marker line.
    done: Option<i32>,
    /// Whether the kernel printed a panic.
    panicked: bool,
    /// From QEMU's start to /init's first line, and to the end.
    boot: Option<Duration>,
    total: Duration,
}

impl Console {
    /// Echoes and keeps `line`, noting /init's markers and kernel panics.
    fn record(&mut self, line: String, since_start: Duration) {
        println!("{line}");
        if self.boot.is_none() && line.contains(READY_MARKER) {
            self.boot = Some(since_start);
        }
        self.done = self.done.or_else(|| done_status(&line));
        self.panicked |= line.contains(PANIC_TEXT);
        self.lines.push(line);
    }

    /// Whether the VM has nothing left to do but power off (or reboot, after a panic).
    fn finished(&self) -> bool {
        self.done.is_some() || self.panicked
    }
}

/// Runs QEMU, echoing its serial console line by line, until it exits or `timeout` passes.
fn run_vm(mut command: Command, timeout: Duration) -> Result<(Console, Ending)> {
    eprintln!("+ {}", describe(&command));
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("could not start {QEMU}"))?;
    let lines = read_lines(&mut child)?;
    let mut console = Console {
        lines: Vec::new(),
        done: None,
        panicked: false,
        boot: None,
        total: Duration::ZERO,
    };
    let mut deadline = started + timeout;
    let exited = loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => console.record(line, started.elapsed()),
            Err(mpsc::RecvTimeoutError::Timeout) => break false,
            Err(mpsc::RecvTimeoutError::Disconnected) => break true,
        }
        if console.finished() {
            deadline = deadline.min(Instant::now() + POWEROFF_GRACE);
        }
    };
    let status = if exited {
        child.wait()
    } else {
        let _ = child.kill();
        let status = child.wait();
        // The line being written when QEMU died, e.g. `test NAME ... ` of a hung test.
        while let Ok(line) = lines.recv_timeout(Duration::from_secs(2)) {
            console.record(line, started.elapsed());
        }
        status
    };
    let status = status.with_context(|| format!("waiting for {QEMU}"))?;
    console.total = started.elapsed();
    let ending = ending(&console, exited.then_some(status), timeout);
    Ok((console, ending))
}

/// How the run ended: the final marker wins, then a panic, then the timeout or QEMU's exit.
fn ending(console: &Console, exit: Option<ExitStatus>, timeout: Duration) -> Ending {
    if let Some(status) = console.done {
        return Ending::Done(status);
    }
    if let Some(panic) = console.lines.iter().find(|line| line.contains(PANIC_TEXT)) {
        return Ending::Panic(panic.trim().to_owned());
    }
    match exit {
        Some(status) => Ending::Exited(status.to_string()),
        None => Ending::Timeout(timeout),
    }
}

/// Lines of the child's stdout, cleaned by [`strip_escapes`], from a reader thread.
fn read_lines(child: &mut Child) -> Result<mpsc::Receiver<String>> {
    let stdout = child.stdout.take().context("QEMU's stdout is not piped")?;
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buffer = Vec::new();
        while reader.read_until(b'\n', &mut buffer).is_ok_and(|n| n > 0) {
            let line = strip_escapes(&String::from_utf8_lossy(&buffer));
            if sender.send(line).is_err() {
                break;
            }
            buffer.clear();
        }
    });
    Ok(receiver)
}

/// `line` without carriage returns, the line end and terminal escape sequences (the firmware
/// resets the terminal with `ESC c ESC [?7l ESC [2J` before the kernel prints).
fn strip_escapes(line: &str) -> String {
    let mut clean = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: `[`, parameters, then a final byte in @..~; otherwise one character.
                if chars.next() == Some('[') {
                    chars.by_ref().find(|c| ('@'..='~').contains(c));
                }
            }
            '\r' | '\n' => {}
            c => clean.push(c),
        }
    }
    clean
}

fn done_status(line: &str) -> Option<i32> {
    let (_, status) = line.split_once(DONE_MARKER)?;
    status.trim().parse().ok()
}

/// The command line, for echoing.
fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------------------------

/// The per-test and per-binary results on the console.
#[derive(Default, Debug, PartialEq)]
struct Tally {
    passed: usize,
    failed: Vec<String>,
    ignored: usize,
    /// Binaries that failed (`NAME exit=N`) or started without an exit line.
    failed_binaries: Vec<String>,
}

/// Counts libtest's `test NAME ... ok|FAILED|ignored` lines and checks every binary that started
/// also printed its exit line.
fn tally(lines: &[String]) -> Tally {
    let mut tally = Tally::default();
    let mut running: Option<String> = None;
    for line in lines {
        if let Some((name, result)) = test_result(line) {
            match result {
                "ok" => tally.passed += 1,
                "FAILED" => tally.failed.push(name.to_owned()),
                _ => tally.ignored += 1,
            }
        }
        let Some(marker) = line.split_once(BINARY_MARKER).map(|(_, rest)| rest) else {
            continue;
        };
        match marker.rsplit_once(' ') {
            Some((name, "start")) => running = Some(name.to_owned()),
            Some((name, exit)) => {
                running = None;
                if exit != "exit=0" {
                    tally.failed_binaries.push(format!("{name} {exit}"));
                }
            }
            None => {}
        }
    }
    if let Some(name) = running {
        tally.failed_binaries.push(format!("{name} never finished"));
    }
    tally
}

/// `(name, result)` of a libtest result line `test NAME ... RESULT`.
fn test_result(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("test ")?;
    let (name, result) = rest.split_once(" ... ")?;
    let result = result.trim();
    let result = if result.starts_with("ignored") {
        "ignored"
    } else {
        result
    };
    matches!(result, "ok" | "FAILED" | "ignored").then_some((name, result))
}

/// Prints the summary and fails unless every test binary passed.
fn report(console: &Console, ending: &Ending, release: &str, elapsed: Duration) -> Result<()> {
    let tally = tally(&console.lines);
    let boot = console.boot.map_or("never".to_owned(), |boot| {
        format!("{:.1} s", boot.as_secs_f64())
    });
    eprintln!(
        "vm-test: kernel {release}: /init after {boot}, VM ran {:.1} s, {:.1} s in all",
        console.total.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!(
        "vm-test: {} passed, {} failed, {} skipped",
        tally.passed,
        tally.failed.len(),
        tally.ignored
    );
    for warning in console.lines.iter().filter(|l| l.contains(WARNING_MARKER)) {
        eprintln!("vm-test: {}", warning.trim());
    }
    verdict(ending, &tally, console.lines.last())
}

fn verdict(ending: &Ending, tally: &Tally, last_line: Option<&String>) -> Result<()> {
    let last = last_line.map_or("(none)", String::as_str);
    match ending {
        Ending::Panic(line) => bail!("vm-test: the kernel panicked: {line}"),
        Ending::Timeout(timeout) => bail!(
            "vm-test: the VM did not finish within {} s (hang?); unfinished: {}; last console \
             line: {last}",
            timeout.as_secs(),
            tally.failed_binaries.join(", ")
        ),
        Ending::Exited(status) => bail!(
            "vm-test: {QEMU} exited ({status}) without the final `{DONE_MARKER}N` line; \
             last console line: {last}"
        ),
        Ending::Done(status) if *status != 0 || !tally.failed_binaries.is_empty() => bail!(
            "vm-test: tests failed in the VM: {}; test binaries: {}",
            if tally.failed.is_empty() {
                "(no failed test line)".to_owned()
            } else {
                tally.failed.join(", ")
            },
            tally.failed_binaries.join(", ")
        ),
        Ending::Done(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_bookworm_source() {
        let deb822 = "Types: deb\n# comment\nURIs: http://mirror.example/debian\n\
                      Suites: bookworm bookworm-updates\nComponents: main\n\
                      Signed-By: /k.gpg\n\nTypes: deb\nURIs: http://sec.example\n\
                      Suites: bookworm-security\n";
        assert_eq!(
            bookworm_source(deb822),
            Some((
                "http://mirror.example/debian".to_owned(),
                "/k.gpg".to_owned()
            ))
        );
        let one_line = "deb [arch=amd64 signed-by=/s.gpg] http://m.example/debian bookworm main\n";
        assert_eq!(
            bookworm_source(one_line),
            Some(("http://m.example/debian".to_owned(), "/s.gpg".to_owned()))
        );
        assert_eq!(
            bookworm_source("deb http://m.example/debian bookworm-updates main\n"),
            None
        );
        assert!(names_suite("Suites: bookworm-backports\n", BACKPORTS));
        assert!(!names_suite("# Suites: bookworm-backports\n", BACKPORTS));
    }

    #[test]
    fn parses_cargo_artifacts() {
        let json = r#"{"reason":"compiler-artifact","target":{"name":"agent","kind":["test"]},"profile":{"test":true},"executable":"/t/debug/deps/agent-1"}
{"reason":"compiler-artifact","target":{"name":"limiter_tests","kind":["lib"]},"profile":{"test":false},"executable":null}
{"reason":"build-finished","success":true}"#;
        let artifacts = parse_artifacts(json);
        assert_eq!(artifacts.len(), 1);
        assert_eq!(artifacts[0].vm_name(), "test-agent");
        assert_eq!(artifacts[0].executable, Path::new("/t/debug/deps/agent-1"));
        assert!(artifacts[0].test);
    }

    #[test]
    fn parses_the_image_dependency() {
        let output = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_image_dependency(output, "6.1").as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(parse_image_dependency(output, "6.12"), None);
    }

    #[test]
    fn reads_the_bzimage_release() {
        let mut image = vec![0u8; 0x400];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        let version = b"6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
        image[0x300..0x300 + version.len()].copy_from_slice(version);
        assert_eq!(
            bzimage_release(&image).as_deref(),
            Some("6.1.0-56-cloud-amd64")
        );
        assert_eq!(bzimage_release(&[0; 0x300]), None);
    }

    #[test]
    fn checks_the_kernel_config() {
        let good: String = REQUIRED_CONFIG
            .iter()
            .map(|(option, values)| format!("{option}={}\n", values[values.len() - 1]))
            .collect();
        assert!(missing_options(&good).is_empty());
        let bad = good.replace(
            "CONFIG_DEBUG_INFO_BTF=y",
            "# CONFIG_DEBUG_INFO_BTF is not set",
        );
        assert_eq!(missing_options(&bad), ["CONFIG_DEBUG_INFO_BTF=y"]);
    }

    #[test]
    fn parses_ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }

    #[test]
    fn writes_newc_cpio() {
        let mut cpio = Cpio::new(Vec::new());
        cpio.file("a/b", 0o644, b"hello").unwrap();
        let archive = cpio.finish().unwrap();
        assert_eq!(archive.len() % 4, 0);
        let text = String::from_utf8_lossy(&archive);
        // The parent directory `a` comes before `a/b`, and the trailer last.
        let dir = text.find("a\0").unwrap();
        let file = text.find("a/b\0").unwrap();
        assert!(archive.starts_with(b"070701") && dir < file);
        assert!(text.contains("hello") && text.contains("TRAILER!!!\0"));
        // a/b: mode 0100644, size 5, name size 4.
        let header = &text[file - 110..file];
        assert_eq!(&header[14..22], "000081a4");
        assert_eq!(&header[54..62], "00000005");
        assert_eq!(&header[94..102], "00000004");
    }

    #[test]
    fn quotes_test_arguments() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        let tests = [Artifact {
            name: "agent".to_owned(),
            kind: "test".to_owned(),
            executable: PathBuf::from("/x"),
            test: true,
        }];
        let args = ["window".to_owned()];
        let payload = Payload {
            busybox: Path::new("/b"),
            limiter: Path::new("/l"),
            tests: &tests,
            veth: None,
            test_args: &args,
        };
        let script = init_script(&payload);
        assert!(script.contains("for name in test-agent; do"));
        assert!(script.contains("/tests/$name --test-threads=1 'window'"));
    }

    #[test]
    fn tallies_results() {
        let lines: Vec<String> = [
            "VMTEST-BINARY test-agent start",
            "test a ... ok",
            "test b ... FAILED",
            "test c ... ignored, needs x",
            "test result: FAILED. 1 passed; 1 failed; 1 ignored",
            "VMTEST-BINARY test-agent exit=101",
            "VMTEST-BINARY test-prog start",
            "test d ... ok",
        ]
        .map(str::to_owned)
        .to_vec();
        let tally = tally(&lines);
        assert_eq!(tally.passed, 2);
        assert_eq!(tally.failed, ["b"]);
        assert_eq!(tally.ignored, 1);
        assert_eq!(
            tally.failed_binaries,
            ["test-agent exit=101", "test-prog never finished"]
        );
        assert_eq!(done_status("VMTEST-DONE status=1"), Some(1));
        assert_eq!(
            strip_escapes("\x1bc\x1b[?7l\x1b[2JVMTEST-KERNEL 6.1\r\n"),
            "VMTEST-KERNEL 6.1"
        );
    }
}
