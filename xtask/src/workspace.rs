//! The workspace xtask lives in: where it is, how to run cargo in it, where binaries land.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result};

use crate::process;

pub struct Workspace {
    root: PathBuf,
    cargo: String,
}

/// The cargo profiles whose output directories xtask reads.
#[derive(Clone, Copy)]
pub enum Profile {
    Debug,
    Release,
}

impl Workspace {
    /// The workspace's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The workspace containing this crate (the parent of xtask's manifest directory), driven by
    /// the cargo that runs xtask (`$CARGO`), or `cargo` from PATH.
    pub fn locate() -> Result<Self> {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir
            .parent()
            .with_context(|| format!("{} has no parent directory", manifest_dir.display()))?
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        Ok(Self { root, cargo })
    }

    /// `cargo <args>` run from the workspace root.
    pub fn cargo<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = process::command(&self.cargo);
        command.args(args).current_dir(&self.root);
        command
    }

    /// Absolute path of binary `name` built with `profile`, honouring `CARGO_TARGET_DIR`.
    pub fn binary(&self, profile: Profile, name: &str) -> PathBuf {
        let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => self.root.join(dir),
            None => self.root.join("target"),
        };
        let profile_dir = match profile {
            Profile::Debug => "debug",
            Profile::Release => "release",
        };
        target_dir.join(profile_dir).join(name)
    }
}
