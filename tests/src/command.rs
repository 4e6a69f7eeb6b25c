//! Running the commands the harness needs (`ip`, `nsenter`, `limiter`): bounded in time, with
//! their output captured and the command line named in every error.

use std::{
    io::Read as _,
    process::{Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Sends SIGTERM to `child` and waits for it to exit, killing it after `grace`.
pub fn terminate(child: &mut std::process::Child, grace: Duration) -> Result<ExitStatus> {
    // SAFETY: signalling our own child, not yet reaped (the caller holds it).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            eprintln!(
                "warning: pid {} ignored SIGTERM for {grace:?}; killing it",
                child.id()
            );
            let _ = child.kill();
            return Ok(child.wait()?);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `command` to completion, killing it after `timeout`; captures stdout and stderr.
pub fn run_with_timeout(command: &mut Command, timeout: Duration) -> Result<Output> {
    let line = describe(command);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{line}`"))?;
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child
        .stdout
        .take()
        .context("the child's stdout was not piped")?;
    let mut err = child
        .stderr
        .take()
        .context("the child's stderr was not piped")?;
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{line}` did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// Runs `command` (10 s timeout) and fails, with its stderr, unless it succeeds.
pub fn run_ok(command: &mut Command) -> Result<String> {
    run_ok_within(command, Duration::from_secs(10))
}

/// Runs `command` within `timeout` and fails, with its stderr, unless it succeeds; its stdout.
pub fn run_ok_within(command: &mut Command, timeout: Duration) -> Result<String> {
    let line = describe(command);
    let output = run_with_timeout(command, timeout)?;
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The command line, for messages.
pub fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
