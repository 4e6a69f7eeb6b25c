//! Spawning child processes: every child sees `$CARGO_HOME/bin` on its PATH (that is where
//! `cargo install` puts bpf-linker), and every failure names the command line that failed.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// A command for `program` whose PATH also contains `$CARGO_HOME/bin`.
pub fn command(program: impl Into<OsString>) -> Command {
    let mut command = Command::new(program.into());
    if let Some(path) = path_with_cargo_bin() {
        command.env("PATH", path);
    }
    command
}

/// Runs `command` with inherited stdio, echoing it first; fails unless it exits successfully.
pub fn run(command: &mut Command) -> Result<()> {
    let line = describe(command);
    eprintln!("+ {line}");
    let status = command
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `command` quietly and returns its stdout, or `None` if it cannot start or fails.
pub fn stdout_of(command: &mut Command) -> Option<String> {
    let output = command
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `$CARGO_HOME/bin`, defaulting to `~/.cargo/bin`.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let cargo_home = match std::env::var_os("CARGO_HOME") {
        Some(home) => PathBuf::from(home),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cargo"),
    };
    Some(cargo_home.join("bin"))
}

/// Finds an executable named `name` on PATH or in `$CARGO_HOME/bin`.
pub fn find_executable(name: &str) -> Option<PathBuf> {
    let path = path_with_cargo_bin()?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|file| is_executable(file))
}

/// The current PATH with `$CARGO_HOME/bin` appended if it is not already there.
fn path_with_cargo_bin() -> Option<OsString> {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&current).collect();
    if let Some(cargo_bin) = cargo_bin_dir()
        && !dirs.contains(&cargo_bin)
    {
        dirs.push(cargo_bin);
    }
    std::env::join_paths(dirs).ok()
}

fn is_executable(file: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    file.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// The command line as a shell-like string, with any environment it sets up front.
fn describe(command: &Command) -> String {
    let envs = command
        .get_envs()
        .filter(|(key, _)| *key != "PATH")
        .filter_map(|(key, value)| Some(format!("{}={}", key.display(), value?.display())));
    let program = std::iter::once(command.get_program().display().to_string());
    let args = command.get_args().map(|arg| arg.display().to_string());
    envs.chain(program)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}
