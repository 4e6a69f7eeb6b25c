//! Booting the VM: the accelerator (KVM only where it can boot a stock kernel, else TCG), the
//! QEMU command line, and running QEMU while streaming its serial console until /init's final
//! marker, a kernel panic, QEMU's exit or the timeout ends the run.

use std::fs;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::initramfs::{DONE_MARKER, READY_MARKER};
use super::kernel::Kernel;
use super::tools::QEMU;
use crate::process;

const MEMORY_MIB: &str = "2048";
const CPUS: &str = "2";
const PANIC_TEXT: &str = "Kernel panic - not syncing";
/// How long QEMU may take to power off after the final marker.
const POWEROFF_GRACE: Duration = Duration::from_secs(30);

/// The `--accel` choice.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(super) enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator QEMU runs with; for TCG, why KVM is not used.
#[derive(Clone, Copy)]
pub(super) enum Accel {
    Kvm,
    Tcg(&'static str),
}

impl Accel {
    pub(super) fn describe(self) -> String {
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

pub(super) fn choose_accel(choice: AccelChoice) -> Accel {
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

/// The QEMU command that boots `kernel` with `initramfs` and kernel command line `cmdline`.
pub(super) fn command(kernel: &Kernel, initramfs: &Path, accel: Accel, cmdline: &str) -> Command {
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
pub(super) enum Ending {
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
pub(super) struct Console {
    pub(super) lines: Vec<String>,
    /// The status on /init's final marker line.
    done: Option<i32>,
    /// Whether the kernel printed a panic.
    panicked: bool,
    /// From QEMU's start to /init's first line, and to the end.
    pub(super) boot: Option<Duration>,
    pub(super) total: Duration,
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
pub(super) fn run_vm(mut command: Command, timeout: Duration) -> Result<(Console, Ending)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_console() {
        assert_eq!(done_status("VMTEST-DONE status=1"), Some(1));
        assert_eq!(
            strip_escapes("\x1bc\x1b[?7l\x1b[2JVMTEST-KERNEL 6.1\r\n"),
            "VMTEST-KERNEL 6.1"
        );
    }
}
