//! Stock gRPC clients against the agent's API: Python's grpcio and grpcio-reflection
//! (`tests/python/stock_clients.py`, run with the venv `cargo xtask setup` makes at
//! /opt/limiter-grpcio), with no stubs generated from limiter.proto: the script gets the messages
//! from the agent's reflection service, v1alpha (the only version grpcio-reflection speaks).
//!
//! - On the Unix socket, grpc-core sends the socket path as `:authority`, which the agent's
//!   HTTP/2 stack (h2) resets with PROTOCOL_ERROR; the README's one-line client option
//!   `grpc.default_authority=localhost` makes it work. Both are asserted, so the README stays
//!   true (and this test says so the day h2 accepts it).
//! - Over TCP, the bearer token in `authorization` metadata.
//!
//! Root only (the agent attaches XDP in a test namespace). Without the venv the test is skipped,
//! saying so; under `CI=true` it fails instead, like `require_root!`.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use limiter_tests::{
    agent::Agent,
    command::run_with_timeout,
    fixture::{ExactWindow, TempDir, in_ci, wait_until},
    netns::TestNet,
    require_root,
};
use serde_json::Value;

/// The Python of the venv with grpcio and grpcio-reflection (`cargo xtask setup`), unless
/// `LIMITER_GRPCIO_PYTHON` names another.
const VENV_PYTHON: &str = "/opt/limiter-grpcio/bin/python3";
/// The TCP API port, on 127.0.0.1 of the receiver namespace (only that namespace reaches it).
const API_PORT: u16 = 7443;
/// The admin token (written to a mode 0600 file).
const TOKEN: &str = "stock-clients-test-token-0123456789";
/// The check role's token: `Check`, health and reflection only.
const CHECK_TOKEN: &str = "stock-clients-check-token-0123456789";
/// Longest one run of the script may take.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the test's checks take; the hour window must not end inside them.
const TEST_SPAN: Duration = Duration::from_secs(60);

const CONFIG: &str = "\
# stock gRPC clients test
mode: enforce
default: {limit: 1000, window: 1h}
policies:
  - match: 198.18.0.16/28
    limit: 20
    window: 1h
";

/// The venv's Python, or `None` (the test skips) when it is missing; under `CI=true` a missing
/// venv fails the test, so CI cannot pass without running it.
fn grpcio_python() -> Option<PathBuf> {
    let python = std::env::var_os("LIMITER_GRPCIO_PYTHON")
        .map_or_else(|| PathBuf::from(VENV_PYTHON), PathBuf::from);
    let usable = python.is_file()
        && Command::new(&python)
            .args(["-c", "import grpc, grpc_reflection"])
            .status()
            .is_ok_and(|s| s.success());
    if usable {
        return Some(python);
    }
    assert!(
        !in_ci(),
        "{} with grpcio and grpcio-reflection is missing and CI=true is set, so this test fails \
         instead of skipping; run `cargo xtask setup`",
        python.display()
    );
    eprintln!(
        "skipped: {} with grpcio and grpcio-reflection is missing (`cargo xtask setup` makes it); \
         under CI=true this is a failure",
        python.display()
    );
    None
}

/// tests/python/stock_clients.py.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/stock_clients.py")
}

/// Runs the script with `args` (in namespace `ns` if given) and parses the JSON it prints.
fn run(python: &Path, ns: Option<&str>, args: &[&str]) -> Result<Value> {
    let mut command = match ns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg(python);
            c
        }
        None => Command::new(python),
    };
    command.arg(script()).args(args);
    let out = run_with_timeout(&mut command, SCRIPT_TIMEOUT)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "stock_clients.py {args:?} failed ({}): stdout {stdout:?}, stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("stock_clients.py {args:?}: not JSON: {stdout:?}"))
}

/// Writes `text` to `name` in `dir`, mode 0600 (as the agent wants its token files).
fn secret(dir: &TempDir, name: &str, text: &str) -> Result<String> {
    let path = dir.write(name, &format!("{text}\n"))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {path}"))?;
    Ok(path)
}

/// Asserts a Check answer: allowed or not, the policy's limit and what remains.
fn assert_check(got: &Value, allowed: bool, remaining: u64, what: &str) {
    assert_eq!(got["allowed"], allowed, "{what}: {got}");
    assert_eq!(got["limit"], 20, "{what}: {got}");
    assert_eq!(got["remaining"], remaining, "{what}: {got}");
    assert_eq!(got["policy"], "198.18.0.16/28", "{what}: {got}");
}

/// Python's grpcio on the Unix socket (with the README's option; without it the call fails as
/// the README says) and over TCP with the token: Check answers right and spends the same
/// budget, and reflection v1alpha lists the API.
#[test]
fn python_grpcio_calls_the_api_on_the_socket_and_over_tcp() -> Result<()> {
    require_root!();
    let Some(python) = grpcio_python() else {
        return Ok(());
    };
    let net = TestNet::new()?;
    let dir = TempDir::new("stock")?;
    let socket = dir.join("api.sock").to_string_lossy().into_owned();
    let token = secret(&dir, "token", TOKEN)?;
    let check_token = secret(&dir, "check-token", CHECK_TOKEN)?;
    let listen = format!("127.0.0.1:{API_PORT}");
    let _agent = Agent::start_with(
        &net,
        CONFIG,
        &[
            "--api-socket",
            &socket,
            "--api-listen",
            &listen,
            "--api-token-file",
            &token,
            "--api-check-token-file",
            &check_token,
        ],
    )?;
    let window = ExactWindow::start(TEST_SPAN);
    let unix = format!("unix:{socket}");
    let localhost = ["--authority", "localhost"];

    // Without the option: grpc-core's `:authority` is the socket path, which h2 resets
    // (PROTOCOL_ERROR, RST_STREAM code 1), so grpcio reports INTERNAL. The day this passes, the
    // README's note on `grpc.default_authority` can go.
    let plain = run(&python, None, &[&unix, "raw-check"])?;
    assert_eq!(plain["error"], "INTERNAL", "without the option: {plain}");
    assert!(
        plain["details"]
            .as_str()
            .is_some_and(|d| d.contains("RST_STREAM") && d.contains("error code 1")),
        "without the option: {plain}"
    );

    // With it: reflection v1alpha lists the API, and Check (messages from reflection) answers.
    let listed = run(
        &python,
        None,
        &[&unix, localhost[0], localhost[1], "services"],
    )?;
    let services = listed["services"]
        .as_array()
        .with_context(|| format!("no services: {listed}"))?;
    for wanted in [
        "limiter.v1.RateLimiter",
        "limiter.v1.Limits",
        "limiter.v1.Stats",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.iter().any(|s| s == wanted),
            "reflection v1alpha does not list {wanted}: {listed}"
        );
    }
    let got = run(
        &python,
        None,
        &[
            &unix,
            localhost[0],
            localhost[1],
            "check",
            "198.18.0.17",
            "5",
        ],
    )?;
    assert_check(&got, true, 15, "Check 5 on the socket");

    // Over TCP with the token, in the receiver namespace: the same client's budget. The agent
    // may still be binding the TCP listener.
    let ns = net.receiver_ns.as_str();
    let tcp = listen.as_str();
    let with_token = ["--token-file", token.as_str()];
    let got = wait_until("the TCP API answers", Duration::from_secs(10), || {
        let got = run(
            &python,
            Some(ns),
            &[
                tcp,
                with_token[0],
                with_token[1],
                "check",
                "198.18.0.17",
                "5",
            ],
        )?;
        Ok((got["error"] != "UNAVAILABLE").then_some(got))
    })?;
    assert_check(&got, true, 10, "Check 5 over TCP");
    let got = run(
        &python,
        Some(ns),
        &[
            tcp,
            with_token[0],
            with_token[1],
            "check",
            "198.18.0.17",
            "11",
        ],
    )?;
    assert_check(
        &got,
        false,
        10,
        "Check 11 over TCP with the admin token, 10 left",
    );
    let listed = run(
        &python,
        Some(ns),
        &[tcp, with_token[0], with_token[1], "services"],
    )?;
    assert!(
        listed["services"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s == "limiter.v1.RateLimiter")),
        "reflection v1alpha over TCP: {listed}"
    );
    // Without the token: refused, and nothing spent.
    let refused = run(&python, Some(ns), &[tcp, "check", "198.18.0.17", "1"])?;
    assert_eq!(
        refused["error"], "UNAUTHENTICATED",
        "without the token: {refused}"
    );
    let got = run(
        &python,
        Some(ns),
        &[
            tcp,
            with_token[0],
            with_token[1],
            "check",
            "198.18.0.17",
            "0",
        ],
    )?;
    assert_check(&got, true, 10, "Check 0 over TCP after the refused call");
    window.check();
    Ok(())
}
