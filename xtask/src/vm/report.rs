//! The result of a VM run: libtest's per-test lines and /init's per-binary lines tallied from
//! the console, the summary printed, and the verdict (which fails the command unless every test
//! binary passed, naming why).

use std::time::Duration;

use anyhow::{Result, bail};

use super::initramfs::{BINARY_MARKER, DONE_MARKER, WARNING_MARKER};
use super::qemu::{Console, Ending};
use super::tools::QEMU;

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
pub(super) fn report(
    console: &Console,
    ending: &Ending,
    release: &str,
    elapsed: Duration,
) -> Result<()> {
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
    }
}
