//! The kernel the VM boots: Debian's cloud kernel of a series (fetched as a package) or a given
//! bzImage, its release read from the bzImage header, its config checked for what the tests
//! need, and its veth module found.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context as _, Result, ensure};

use super::packages::fetch_package;
use super::tools::{BACKPORTS, apt_update};
use crate::process;

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

/// A kernel image to boot and what was found beside it.
pub(super) struct Kernel {
    pub(super) image: PathBuf,
    pub(super) release: String,
    /// The veth module, if veth is not built in.
    pub(super) veth: Option<PathBuf>,
}

/// Fetches (for `6.1`/`6.12`) or takes (a path) the kernel image, finds its config and veth
/// module, and checks the config.
pub(super) fn resolve_kernel(choice: &str, cache: &Path) -> Result<Kernel> {
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
pub(super) fn module_bytes(module: &Path) -> Result<Vec<u8>> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
