//! Debian packages (the kernel, busybox-static) fetched with `apt-get download` into
//! `target/vm/debs/` and unpacked with `dpkg -x` into `target/vm/pkgs/`, both kept as a cache.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context as _, Result};

use super::tools::apt_update;
use crate::process;

/// The unpacked root of Debian package `name`: `apt-get download` into `cache/debs` (skipped if
/// a `NAME_*.deb` is already there) and `dpkg -x` into `cache/pkgs/STEM`.
pub(super) fn fetch_package(cache: &Path, name: &str) -> Result<PathBuf> {
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
