//! The benchmark's processes: servers in the namespace as daemons, commands with a timeout,
//! and Ctrl-C handling.

use std::{
    fs,
    io::{Read as _, Seek as _, SeekFrom},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{command::describe, netns::in_netns};

pub(super) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub(super) extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

pub(super) fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// `nsenter --net=/run/netns/NS PROGRAM`: the program runs in the namespace (nsenter execs it,
/// so the child's pid is the program's).
pub(super) fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("nsenter");
    command.arg(format!("--net=/run/netns/{ns}")).arg(program);
    command
}

/// The last `max` bytes of a file, for error messages.
pub(super) fn tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    text.trim().to_owned()
}

/// A background server, stopped when dropped (SIGTERM, SIGKILL after 3 s). Its output goes to
/// `log`. It runs in its own process group, so a Ctrl-C reaches only this program, which then
/// stops it.
pub(super) struct Daemon {
    pub(super) name: &'static str,
    pub(super) child: Child,
    pub(super) log: PathBuf,
}

impl Daemon {
    pub(super) fn spawn(name: &'static str, mut command: Command, log: PathBuf) -> Result<Daemon> {
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(
                file.try_clone()
                    .with_context(|| format!("duplicating {}", log.display()))?,
            )
            .stderr(file)
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("starting the {name}: `{}`", describe(&command)))?;
        Ok(Daemon { name, child, log })
    }

    /// Fails, with its output, if it has exited.
    pub(super) fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self
            .child
            .try_wait()
            .with_context(|| format!("waiting for the {}", self.name))?
        {
            bail!(
                "the {} exited ({status}); its output:\n{}",
                self.name,
                tail(&self.log, 4000)
            );
        }
        Ok(())
    }

    /// Waits until `addr` accepts TCP connections inside namespace `ns`.
    pub(super) fn wait_listening(
        &mut self,
        ns: &str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.ensure_running()
                .with_context(|| format!("before listening on {addr}"))?;
            if listening(ns, addr)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the {} did not listen on {addr} within {timeout:?}; its output:\n{}",
                    self.name,
                    tail(&self.log, 4000)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "warning: the {} ignored SIGTERM for 3 s; killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(super) fn listening(ns: &str, addr: SocketAddr) -> Result<bool> {
    in_netns(ns, || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })
}

/// A directory removed when dropped.
pub(super) struct TempDir(pub(super) PathBuf);

impl TempDir {
    pub(super) fn new(tag: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `command` to completion within `timeout`; its stdout, or an error with its stderr.
pub(super) fn output_of(command: &mut Command, timeout: Duration) -> Result<String> {
    crate::command::run_ok_within(command, timeout)
}

/// 32 hex digits from /dev/urandom: the agent's API token for this run.
pub(super) fn random_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub(super) fn find_executable(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    })
}
