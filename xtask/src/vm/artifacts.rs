//! Building `limiter` and the `limiter-tests` test executables for the VM, found through cargo's
//! JSON messages.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

use crate::workspace::Workspace;

const TESTS_PACKAGE: &str = "limiter-tests";
/// Test files named `*_sim` are simulations of pure userspace code with virtual time
/// (`cluster_sim`, `adaptive_sim`): they touch no kernel, so booting another kernel tests
/// nothing new, and `cargo xtask test` already runs them on the host. Under TCG `cluster_sim`
/// alone took 329 of the VM's 1,218 s (2026-12-04).
const SIMULATION_SUFFIX: &str = "_sim";

/// An executable cargo built: `kind` is the target kind (`lib`, `bin`, `test`).
pub(super) struct Artifact {
    pub(super) name: String,
    pub(super) kind: String,
    pub(super) executable: PathBuf,
    pub(super) test: bool,
}

impl Artifact {
    /// Its file name inside the VM: `KIND-NAME`, unique within one package.
    pub(super) fn vm_name(&self) -> String {
        format!("{}-{}", self.kind, self.name)
    }
}

pub(super) fn build_limiter(workspace: &Workspace, profile: &[&str]) -> Result<PathBuf> {
    let args = [&["build", "-p", "limiter-user", "--bins"], profile].concat();
    let artifacts = cargo_artifacts(workspace, &args)?;
    artifacts
        .into_iter()
        .find(|artifact| artifact.name == "limiter" && !artifact.test)
        .map(|artifact| artifact.executable)
        .context("cargo built no `limiter` executable")
}

/// Test files whose tests are userspace behaviour over the same programs and maps that the
/// other files load and drive on the VM's kernel: a cluster of agents over loopback (the
/// kernel's side of global limits, grants and their leases, is `prog_test_run`'s `cluster`
/// module), and hostile callers and API calls. `cargo xtask test` runs them on the host. Under
/// TCG they took 269 of the VM's 1,108 s (2026-12-07; `cluster` alone 170 s), which CI's 45
/// minutes had no room for as the suites grow. (`hostile_files` stays: its agent running with
/// capabilities only, not root, is the bpf() syscall's permission checks, which differ between
/// kernels.)
const HOST_ONLY: [&str; 4] = ["cluster", "cluster_net", "hostile_api", "hostile_callers"];

/// Every test executable of `limiter-tests` that exercises the kernel: its library's, its
/// binaries' and tests/*.rs but the simulations ([`SIMULATION_SUFFIX`]) and [`HOST_ONLY`].
pub(super) fn build_tests(workspace: &Workspace, profile: &[&str]) -> Result<Vec<Artifact>> {
    let args = [&["test", "--no-run", "-p", TESTS_PACKAGE], profile].concat();
    let artifacts = cargo_artifacts(workspace, &args)?;
    let tests: Vec<Artifact> = artifacts.into_iter().filter(runs_in_vm).collect();
    ensure!(!tests.is_empty(), "cargo built no test executable");
    Ok(tests)
}

/// A test executable that is neither a simulation nor [`HOST_ONLY`].
fn runs_in_vm(artifact: &Artifact) -> bool {
    let host_only = artifact.kind == "test"
        && (artifact.name.ends_with(SIMULATION_SUFFIX)
            || HOST_ONLY.contains(&artifact.name.as_str()));
    artifact.test && !host_only
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

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
    fn simulations_and_userspace_suites_stay_on_the_host() {
        let artifact = |name: &str, kind: &str| Artifact {
            name: name.to_owned(),
            kind: kind.to_owned(),
            executable: PathBuf::from("/t/x"),
            test: true,
        };
        assert!(!runs_in_vm(&artifact("cluster_sim", "test")));
        assert!(!runs_in_vm(&artifact("adaptive_sim", "test")));
        assert!(!runs_in_vm(&artifact("cluster", "test")));
        assert!(!runs_in_vm(&artifact("hostile_api", "test")));
        assert!(runs_in_vm(&artifact("hostile_files", "test")));
        assert!(runs_in_vm(&artifact("prog_test_run", "test")));
        assert!(runs_in_vm(&artifact("fault_tolerance", "test")));
        assert!(runs_in_vm(&artifact("limiter_tests", "lib")));
    }
}
