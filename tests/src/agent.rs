//! The `limiter` binary under test and a running `limiter agent` on a [`TestNet`] (or on any
//! [`AgentTarget`], such as a [`ClusterNet`](crate::netns::ClusterNet) node): starting it,
//! waiting for its policies, reloading its config, stopping it, and reading `limiter stats`.

use std::{
    fs,
    net::IpAddr,
    os::unix::{
        fs::FileTypeExt as _,
        process::{CommandExt as _, ExitStatusExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

use crate::{
    command::{describe, run_ok, run_with_timeout},
    netns::{AgentRegistry, TestNet, pin_dir},
};

/// Numbers the agents' temporary directories.
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// The `limiter` binary under test: `$LIMITER_BIN`, else `limiter` next to (or one directory
/// above) the running executable, which is `target/PROFILE/limiter` for test binaries in
/// `target/PROFILE/deps/` and for binaries in `target/PROFILE/`.
pub fn limiter_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("LIMITER_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates = [dir.join("limiter"), dir.join("../limiter")];
    candidates
        .iter()
        .find(|p| p.is_file())
        .unwrap_or(&candidates[1])
        .clone()
}

/// `nsenter --net=/run/netns/NS LIMITER_BIN ARGS...`.
pub fn limiter_command(ns: &str, args: &[&str]) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{ns}"))
        .arg(limiter_bin())
        .args(args);
    command
}

/// Whether `limiter agent --help` lists `option`.
pub fn agent_has_option(option: &str) -> bool {
    static HELP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HELP.get_or_init(|| {
        run_with_timeout(
            Command::new(limiter_bin()).args(["agent", "--help"]),
            Duration::from_secs(10),
        )
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
    })
    .contains(option)
}

/// Runs `limiter ARGS...` in namespace `ns` to completion (20 s timeout).
pub fn run_limiter(ns: &str, args: &[&str]) -> Result<Output> {
    run_with_timeout(&mut limiter_command(ns, args), Duration::from_secs(20))
}

/// Where an agent runs: a network namespace, the interface in it that the agent attaches to,
/// and the kill list of the test network that owns both (so that dropping the network kills
/// the agent even if its guard leaked). From [`TestNet::agent_target`] or
/// [`ClusterNet::agent_target`](crate::netns::ClusterNet::agent_target).
#[derive(Clone)]
pub struct AgentTarget {
    /// The namespace the agent runs in (under /run/netns).
    pub ns: String,
    /// The interface it attaches to; unique machine-wide (its pin directory is).
    pub iface: String,
    pub(crate) registry: AgentRegistry,
}

/// A running `limiter agent` on an [`AgentTarget`] (a [`TestNet`]'s receiver veth, say).
/// Dropping it stops the agent (SIGTERM, SIGKILL after 5 s) and removes its pinned maps.
pub struct Agent {
    child: Mutex<Option<Child>>,
    /// The interface the agent is attached to.
    pub iface: String,
    /// The namespace the agent runs in.
    pub ns: String,
    /// The config file the agent polls.
    pub config_path: PathBuf,
    stderr_path: PathBuf,
    dir: PathBuf,
    registry: AgentRegistry,
    exit: Mutex<Option<ExitStatus>>,
    keep_pins: bool,
}

impl Agent {
    /// The agent's `--state-dir` (snapshot, policy overlay) unless the test gave one.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Starts `limiter agent --iface RECEIVER_IF --config FILE --xdp-mode native
    /// --max-clients 65536` in the receiver namespace with `config` as the config file, and waits
    /// until `limiter stats` shows the policies applied (generation >= 1).
    pub fn start(net: &TestNet, config: &str) -> Result<Agent> {
        Agent::start_with(net, config, &[])
    }

    /// [`Agent::start`] with extra command-line arguments.
    pub fn start_with(net: &TestNet, config: &str, extra_args: &[&str]) -> Result<Agent> {
        let agent = Agent::spawn(net, config, extra_args)?;
        agent.wait_ready(Duration::from_secs(15))?;
        Ok(agent)
    }

    /// Starts the agent without waiting for it.
    pub fn spawn(net: &TestNet, config: &str, extra_args: &[&str]) -> Result<Agent> {
        Agent::spawn_on(&net.agent_target(), config, extra_args)
    }

    /// [`Agent::start_with`] on `target`: starts `limiter agent --iface IFACE ...` in the
    /// target's namespace and waits until its policies are applied and its program attached.
    pub fn start_on(target: &AgentTarget, config: &str, extra_args: &[&str]) -> Result<Agent> {
        let agent = Agent::spawn_on(target, config, extra_args)?;
        agent.wait_ready(Duration::from_secs(15))?;
        Ok(agent)
    }

    /// [`Agent::spawn`] on `target`: starts the agent without waiting for it.
    pub fn spawn_on(target: &AgentTarget, config: &str, extra_args: &[&str]) -> Result<Agent> {
        Agent::spawn_with(target, config, extra_args, &[], |_| {})
    }

    /// [`Agent::spawn_on`] through `wrapper` (a command and its arguments that execs the rest of
    /// its command line in the same process, such as `env VAR=VALUE`: the agent's pid is the one
    /// [`Agent::kill`] signals); an empty `wrapper` is none.
    pub fn spawn_on_wrapped(
        target: &AgentTarget,
        config: &str,
        extra_args: &[&str],
        wrapper: &[&str],
    ) -> Result<Agent> {
        Agent::spawn_with(target, config, extra_args, wrapper, |_| {})
    }

    /// [`Agent::spawn`], with `adjust` applied to the command before it runs (to set resource
    /// limits, say).
    pub fn spawn_adjusted(
        net: &TestNet,
        config: &str,
        extra_args: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Result<Agent> {
        Agent::spawn_with(&net.agent_target(), config, extra_args, &[], adjust)
    }

    /// Starts the agent without waiting for it, through `wrapper` (a command and its arguments
    /// that runs the rest of its command line, such as `setpriv ...`), inside the namespace.
    pub fn spawn_wrapped(
        net: &TestNet,
        config: &str,
        extra_args: &[&str],
        wrapper: &[&str],
    ) -> Result<Agent> {
        Agent::spawn_with(&net.agent_target(), config, extra_args, wrapper, |_| {})
    }

    fn spawn_with(
        target: &AgentTarget,
        config: &str,
        extra_args: &[&str],
        wrapper: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Result<Agent> {
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("limiter-test-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config_path = dir.join("limiter.yaml");
        fs::write(&config_path, config)?;
        let stderr_path = dir.join("agent.stderr");
        let stderr = fs::File::create(&stderr_path)?;
        let config_arg = config_path.to_string_lossy().into_owned();
        let mut args = vec![
            "agent",
            "--iface",
            &target.iface,
            "--config",
            &config_arg,
            "--xdp-mode",
            "native",
        ];
        // The test's own `--max-clients` (clap takes an option once) or the harness's.
        if !extra_args.contains(&"--max-clients") {
            args.extend(["--max-clients", "65536"]);
        }
        // Keep client-state snapshots and policy overlays (newer agents write them) out of
        // /var/lib, unless the test gives its own state dir.
        let state_dir = dir.join("state").to_string_lossy().into_owned();
        if agent_has_option("--state-dir") && !extra_args.contains(&"--state-dir") {
            args.extend(["--state-dir", &state_dir]);
        }
        args.extend_from_slice(extra_args);
        let mut command = if wrapper.is_empty() {
            limiter_command(&target.ns, &args)
        } else {
            let mut command = Command::new("nsenter");
            command
                .arg(format!("--net=/run/netns/{}", target.ns))
                .args(wrapper)
                .arg(limiter_bin())
                .args(&args);
            command
        };
        command
            .stdin(Stdio::null())
            .stdout(stderr.try_clone()?)
            .stderr(stderr)
            // Its own process group: a Ctrl-C in the terminal reaches the demo, which stops the
            // agent itself after cleaning up.
            .process_group(0);
        adjust(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("starting `{}`", describe(&command)))?;
        let registry = Arc::clone(&target.registry);
        registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        Ok(Agent {
            child: Mutex::new(Some(child)),
            iface: target.iface.clone(),
            ns: target.ns.clone(),
            config_path,
            stderr_path,
            dir,
            registry,
            exit: Mutex::new(None),
            keep_pins: false,
        })
    }

    /// Waits until `limiter stats` reports generation >= 1; fails early if the agent exits.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        // Under emulation (`cargo xtask vm-test` without KVM) loading and verifying the programs
        // alone can take most of the time a host needs for everything.
        let timeout = if std::env::var_os("LIMITER_EMULATED").is_some() {
            timeout * 4
        } else {
            timeout
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited()? {
                bail!(
                    "the agent exited ({status}) before applying its policies; its stderr:\n{}",
                    self.stderr()
                );
            }
            // The agent writes the policies before it attaches (so that the first packet is
            // already limited): generation >= 1 alone does not mean traffic is limited yet.
            let last_error = match self.stats() {
                Ok(stats) if stats["generation"].as_u64().unwrap_or(0) >= 1 => {
                    if self.xdp_attached()? {
                        return Ok(());
                    }
                    "policies applied, no XDP program attached yet".to_owned()
                }
                Ok(stats) => format!("generation still 0: {stats}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "the agent did not apply its policies within {timeout:?} (last `limiter stats`: \
                     {last_error}); its stderr:\n{}",
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether `ip link` shows an XDP program on the agent's interface.
    pub fn xdp_attached(&self) -> Result<bool> {
        let link = run_ok(Command::new("ip").args(["-n", &self.ns, "link", "show", &self.iface]))?;
        Ok(link_has_xdp(&link))
    }

    /// The agent's exit status if it has exited.
    pub fn exited(&self) -> Result<Option<ExitStatus>> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let mut exit = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        if exit.is_none()
            && let Some(c) = child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            *exit = Some(status);
            let pid = c.id();
            *child = None;
            self.unregister(pid);
        }
        Ok(*exit)
    }

    fn unregister(&self, pid: u32) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| *p != pid);
    }

    /// The process id of the agent.
    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(Child::id)
    }

    /// Everything the agent has written to stderr (and stdout) so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits up to `timeout` for `needle` to appear in the agent's stderr.
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stderr().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `limiter stats --iface IFACE --json --top 0`, parsed.
    pub fn stats(&self) -> Result<Value> {
        stats_json(&self.ns, &self.iface)
    }

    /// The policy generation `limiter stats` reports.
    pub fn generation(&self) -> Result<u64> {
        let stats = self.stats()?;
        stats["generation"]
            .as_u64()
            .ok_or_else(|| anyhow!("`limiter stats --json` has no numeric generation: {stats}"))
    }

    /// Replaces the config file atomically (write a temporary file, then rename over it).
    pub fn write_config(&self, config: &str) -> Result<()> {
        let tmp = self.dir.join("limiter.yaml.tmp");
        fs::write(&tmp, config)?;
        fs::rename(&tmp, &self.config_path)?;
        Ok(())
    }

    /// Writes `config` and waits (at most `timeout`) until the generation moves past the one
    /// before the write; returns the new generation and how long that took.
    pub fn reload(&self, config: &str, timeout: Duration) -> Result<(u64, Duration)> {
        let before = self.generation()?;
        self.write_config(config)?;
        let start = Instant::now();
        loop {
            let generation = self.generation()?;
            if generation > before {
                return Ok((generation, start.elapsed()));
            }
            if start.elapsed() >= timeout {
                bail!(
                    "the agent did not apply the new config within {timeout:?} (generation still \
                     {generation}); its stderr:\n{}",
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Leaves the pinned maps (and a crashed agent's pinned link) in place when the guard is
    /// dropped, for a next agent to adopt; the network (a [`TestNet`] or a
    /// [`ClusterNet`](crate::netns::ClusterNet)) still removes them.
    pub fn keep_pins(&mut self) {
        self.keep_pins = true;
    }

    /// Kills the agent with SIGKILL (a crash) and waits for it.
    pub fn kill(&self) -> Result<ExitStatus> {
        if let Some(status) = self.exited()? {
            return Ok(status);
        }
        let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            bail!("the agent is not running");
        };
        child.kill()?;
        let status = child.wait()?;
        self.unregister(child.id());
        *self.exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
        Ok(status)
    }

    /// Waits until `limiter stats` reports a generation of at least `min`.
    pub fn wait_generation(&self, min: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let generation = self.generation()?;
            if generation >= min {
                return Ok(generation);
            }
            if Instant::now() >= deadline {
                bail!(
                    "generation still {generation} after {timeout:?} (waiting for {min}); the \
                     agent's stderr:\n{}",
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and waits for the agent to exit (SIGKILL after 5 s); returns its status.
    pub fn terminate(&self) -> Result<ExitStatus> {
        if let Some(status) = self.exited()? {
            return Ok(status);
        }
        let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            bail!("the agent is not running");
        };
        let status = crate::command::terminate(&mut child, Duration::from_secs(5))?;
        // Killed after ignoring SIGTERM for the whole grace (a machine too loaded for it to stop
        // in time): it could not remove its default socket, so the harness does, rather than
        // leave one per test in /run/limiter (a socket given with --api-socket lives in the
        // test's own directory). An agent that stops by itself removes its own.
        let socket = PathBuf::from(format!("/run/limiter/{}.sock", self.iface));
        if status.signal() == Some(libc::SIGKILL)
            && fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket())
        {
            let _ = fs::remove_file(&socket);
        }
        self.unregister(child.id());
        *self.exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
        Ok(status)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.terminate() {
            eprintln!("warning: stopping the agent: {e:#}");
        }
        if thread::panicking() {
            eprintln!(
                "---- agent stderr ({}) ----\n{}----",
                self.iface,
                self.stderr()
            );
        }
        if !self.keep_pins {
            let _ = fs::remove_dir_all(pin_dir(&self.iface));
        }
        // An agent killed with SIGKILL could not remove its default API socket: it goes here,
        // unless another agent on the interface answers on it by now.
        let socket = limiter_user::api::default_socket(&self.iface);
        if std::os::unix::net::UnixStream::connect(&socket).is_err() {
            let _ = fs::remove_file(&socket);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Whether `ip link show DEV` output shows an XDP program (`xdp` in the flags line, and a
/// `prog/xdp` line).
pub fn link_has_xdp(ip_link_show: &str) -> bool {
    ip_link_show
        .split_whitespace()
        .any(|w| w == "xdp" || w == "xdpgeneric" || w == "xdpdrv" || w.starts_with("prog/xdp"))
}

/// `limiter stats --iface IFACE --json --top 0` in namespace `ns`, parsed.
pub fn stats_json(ns: &str, iface: &str) -> Result<Value> {
    limiter_json(ns, &["stats", "--iface", iface, "--json", "--top", "0"])
}

/// `limiter stats --api SOCKET --json --top 0` in namespace `ns`, parsed.
pub fn api_stats_json(ns: &str, socket: &str) -> Result<Value> {
    limiter_json(ns, &["stats", "--api", socket, "--json", "--top", "0"])
}

/// `limiter ARGS` in namespace `ns`, its output parsed as JSON; an error says what failed.
fn limiter_json(ns: &str, args: &[&str]) -> Result<Value> {
    let output = run_limiter(ns, args)?;
    let command = format!("`limiter {}`", args.join(" "));
    if !output.status.success() {
        bail!(
            "{command} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "{command} printed invalid JSON: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// The row of `client` (an address or an ID, as shown) in the `clients` of
/// [`api_stats_json`].
pub fn api_row<'a>(stats: &'a Value, client: &str) -> Option<&'a Value> {
    stats["clients"]
        .as_array()?
        .iter()
        .find(|r| r["client"] == client)
}

/// The entry of `stats["clients"]` whose `addr` is `addr`, else the group (a prefix) it is counted
/// in.
pub fn find_client(stats: &Value, addr: impl Into<IpAddr>) -> Option<&Value> {
    let addr = addr.into().to_canonical();
    let rows = stats["clients"].as_array()?;
    rows.iter()
        .find(|c| {
            c["addr"]
                .as_str()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .is_some_and(|a| a.to_canonical() == addr)
        })
        .or_else(|| {
            rows.iter().find(|c| {
                c["addr"]
                    .as_str()
                    .is_some_and(|group| prefix_contains(group, addr))
            })
        })
}

/// Whether the prefix `group` (`2001:db8::/64`, as stats show a group of addresses counted as
/// one client) contains `addr`.
pub fn prefix_contains(group: &str, addr: IpAddr) -> bool {
    let Some((net, len)) = group.split_once('/') else {
        return false;
    };
    let (Ok(net), Ok(len)) = (net.parse::<IpAddr>(), len.parse::<u32>()) else {
        return false;
    };
    match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) if len <= 32 => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) if len <= 128 => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// `(passed, dropped)` of client `addr` in `stats`, `(0, 0)` if it is not listed.
pub fn client_counts(stats: &Value, addr: impl Into<IpAddr>) -> (u64, u64) {
    find_client(stats, addr).map_or((0, 0), |c| {
        (
            c["passed"].as_u64().unwrap_or(0),
            c["dropped"].as_u64().unwrap_or(0),
        )
    })
}
