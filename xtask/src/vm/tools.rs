//! Installing QEMU for `vm-test`, from the apt suite the preinstalled qemu-utils comes from
//! (adding the bookworm-backports apt source when needed), and refreshing apt's package lists.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context as _, Result};

use crate::process;

/// The QEMU program that boots the VM.
pub(super) const QEMU: &str = "qemu-system-x86_64";
const QEMU_PACKAGE: &str = "qemu-system-x86";
/// The suite QEMU comes from when the preinstalled qemu-utils does (see [`install_tools`]).
pub(super) const BACKPORTS: &str = "bookworm-backports";
const BACKPORTS_VERSION_TAG: &str = "~bpo12";
const APT_SOURCES_DIR: &str = "/etc/apt/sources.list.d";
const APT_SOURCES_LIST: &str = "/etc/apt/sources.list";
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

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

pub(super) fn apt_update() -> Result<()> {
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
}
