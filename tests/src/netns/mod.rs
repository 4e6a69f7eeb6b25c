//! A two-namespace test network and the `limiter agent` guard the privileged tests and the demo
//! run against.
//!
//! [`TestNet`] creates a sender and a receiver network namespace joined by a veth pair:
//!
//! ```text
//!   sender ns                                     receiver ns
//!   ls<pid>x<n>  02:6c:74:00:00:02  <-- veth -->  lr<pid>x<n>  02:6c:74:00:00:01
//!   198.18.0.10..   fd00:77::10..                 198.18.0.1/24  fd00:77::1/64
//! ```
//!
//! The receiver's veth is where the agent attaches (`--xdp-mode native` works on veth). Every
//! address lives inside these two namespaces; the root namespace is never touched, and dropping
//! the guard (also while unwinding from a panic) kills any agent and deletes both namespaces,
//! which destroys the veth pair.
//!
//! The sender has permanent neighbour entries for the receiver, so no ARP or neighbour
//! solicitation ever queues (or, for IPv6, counts against) a test client: every IP packet the
//! limiter sees from a sender address is one the test sent.
//!
//! # VLANs
//! This kernel is built without 802.1Q support (`CONFIG_VLAN_8021Q` is not set), so VLAN
//! subinterfaces cannot be created. Tagged traffic is therefore sent as raw Ethernet frames from
//! an `AF_PACKET` socket on the sender's veth ([`RawSender`], tags written into the frame bytes,
//! so no transmit VLAN offload can move them into metadata) and counted with an `AF_PACKET` socket
//! on the receiver's veth ([`TestNet::frame_counter`]), which sees every frame the XDP program
//! passed. The subnets are 198.18.10.0/24 (802.1Q id [`VLAN_ID`]) and 198.18.20.0/24 (802.1ad
//! [`QINQ_OUTER`] + 802.1Q [`QINQ_INNER`]).
//!
//! # Several agents
//! [`ClusterNet`] is the same idea with one sender and one receiver namespace joined by several
//! veth pairs, one agent per receiver veth; see its module.

mod addresses;
mod cluster;

use std::{
    fs,
    io::{self, Write as _},
    mem,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{agent::AgentTarget, command::run_ok};

pub use self::{addresses::*, cluster::*};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// `ip -n NS -batch -` with `lines` on stdin: one process for many changes.
fn ip_batch(ns: &str, lines: &[String]) -> Result<()> {
    ip_batch_with(ns, &[], lines)
}

/// [`ip_batch`] with `options` (such as `-6`, which a batch line cannot carry) before `-batch`.
fn ip_batch_with(ns: &str, options: &[&str], lines: &[String]) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", ns])
        .args(options)
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting `ip -batch`")?;
    {
        let mut stdin = child
            .stdin
            .take()
            .context("`ip -batch`'s stdin was not piped")?;
        stdin.write_all(lines.join("\n").as_bytes())?;
        stdin.write_all(b"\n")?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "`ip -n {ns} {}-batch` failed ({}): {}",
            options.iter().map(|o| format!("{o} ")).collect::<String>(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn enter_netns(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: a valid namespace fd; this changes only the calling thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("setns({path})"));
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside network namespace `ns` and returns its result. Sockets
/// created by `f` stay in that namespace wherever they are used later. A panic in `f` is
/// resumed on the calling thread.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    thread::scope(|scope| {
        let handle = scope.spawn(|| -> Result<T> {
            enter_netns(ns)?;
            Ok(f())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Like [`in_netns`] but in the background: the thread keeps running after this returns.
pub fn spawn_in_netns<T, F>(ns: &str, f: F) -> JoinHandle<Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns = ns.to_owned();
    thread::spawn(move || -> Result<T> {
        enter_netns(&ns)?;
        Ok(f())
    })
}

/// Process ids of the agents started on one [`TestNet`] or [`ClusterNet`], killed when it is
/// dropped.
pub(crate) type AgentRegistry = Arc<Mutex<Vec<u32>>>;

/// Two network namespaces joined by a veth pair; see the module documentation.
pub struct TestNet {
    /// Sender namespace name (under /run/netns).
    pub sender_ns: String,
    /// Receiver namespace name (under /run/netns).
    pub receiver_ns: String,
    /// The sender's end of the veth pair.
    pub sender_if: String,
    /// The receiver's end of the veth pair, where the agent attaches. Unique machine-wide, since
    /// the agent's pin directory `/sys/fs/bpf/limiter/IFACE` is shared by all namespaces.
    pub receiver_if: String,
    agents: AgentRegistry,
    created: Vec<String>,
}

impl TestNet {
    /// Creates both namespaces, the veth pair, the addresses and the neighbour entries, and
    /// waits until the link is up at both ends.
    pub fn new() -> Result<TestNet> {
        sweep_stale();
        let pid = std::process::id();
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        // "lt" + pid (<= 7 digits) + "s"/"r" + n: short and unique on this machine.
        let mut net = TestNet {
            sender_ns: format!("lt{pid}s{n}"),
            receiver_ns: format!("lt{pid}r{n}"),
            sender_if: format!("ls{pid}x{n}"),
            receiver_if: format!("lr{pid}x{n}"),
            agents: Arc::default(),
            created: Vec::new(),
        };
        assert!(net.receiver_if.len() <= 15 && net.sender_if.len() <= 15);
        // Stale pins of an earlier process with the same pid would be adopted with their counters.
        let _ = fs::remove_dir_all(pin_dir(&net.receiver_if));
        for ns in [net.sender_ns.clone(), net.receiver_ns.clone()] {
            run_ok(Command::new("ip").args(["netns", "add", &ns]))?;
            net.created.push(ns);
        }
        net.setup().with_context(|| {
            format!(
                "setting up test network {} <-> {}",
                net.sender_ns, net.receiver_ns
            )
        })?;
        Ok(net)
    }

    fn setup(&self) -> Result<()> {
        let (s_ns, r_ns, s_if, r_if) = (
            &self.sender_ns,
            &self.receiver_ns,
            &self.sender_if,
            &self.receiver_if,
        );
        run_ok(Command::new("ip").args([
            "-n",
            s_ns,
            "link",
            "add",
            s_if,
            "address",
            &mac_string(&SENDER_MAC),
            "type",
            "veth",
            "peer",
            "name",
            r_if,
            "address",
            &mac_string(&RECEIVER_MAC),
            "netns",
            r_ns,
        ]))?;
        for (ns, dev) in [(s_ns, s_if), (r_ns, r_if)] {
            quiet_ipv6(ns, dev)?;
        }

        let mut sender = vec![format!("link set lo up"), format!("link set {s_if} up")];
        for i in 0..SENDERS {
            sender.push(format!("addr add {}/24 dev {s_if}", sender_v4(i)));
            sender.push(format!("addr add {}/64 dev {s_if} nodad", sender_v6(i)));
        }
        let rmac = mac_string(&RECEIVER_MAC);
        sender.push(format!(
            "neigh replace {RECEIVER_V4} lladdr {rmac} dev {s_if} nud permanent"
        ));
        sender.push(format!(
            "neigh replace {RECEIVER_V6} lladdr {rmac} dev {s_if} nud permanent"
        ));
        ip_batch(s_ns, &sender)?;

        let smac = mac_string(&SENDER_MAC);
        let mut receiver = vec![
            format!("link set lo up"),
            format!("link set {r_if} up"),
            format!("addr add {RECEIVER_V4}/24 dev {r_if}"),
            format!("addr add {RECEIVER_V6}/64 dev {r_if} nodad"),
        ];
        for i in 0..SENDERS {
            receiver.push(format!(
                "neigh replace {} lladdr {smac} dev {r_if} nud permanent",
                sender_v4(i)
            ));
            receiver.push(format!(
                "neigh replace {} lladdr {smac} dev {r_if} nud permanent",
                sender_v6(i)
            ));
        }
        ip_batch(r_ns, &receiver)?;

        wait_links_up(&[(s_ns, s_if), (r_ns, r_if)])
    }

    /// Runs `f` inside the sender namespace (see [`in_netns`]).
    pub fn in_sender<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.sender_ns, f)
    }

    /// Runs `f` inside the receiver namespace (see [`in_netns`]).
    pub fn in_receiver<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.receiver_ns, f)
    }

    /// `ip -n RECEIVER link show RECEIVER_IF` (to see whether an XDP program is attached).
    pub fn receiver_link(&self) -> Result<String> {
        run_ok(Command::new("ip").args([
            "-n",
            &self.receiver_ns,
            "link",
            "show",
            &self.receiver_if,
        ]))
    }

    /// Where [`Agent::spawn_on`](crate::agent::Agent::spawn_on) starts an agent on this
    /// network: the receiver's veth in the receiver namespace (where
    /// [`Agent::spawn`](crate::agent::Agent::spawn) starts it); dropping the network kills it.
    pub fn agent_target(&self) -> AgentTarget {
        AgentTarget {
            ns: self.receiver_ns.clone(),
            iface: self.receiver_if.clone(),
            registry: Arc::clone(&self.agents),
        }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        teardown(&self.agents, &self.created, &[&self.receiver_if]);
    }
}

/// Deletes the namespaces an earlier test process of this crate left behind, and kills what
/// still runs in them. Dropping a network cleans up after a failure or a panic, but a process
/// ended by a signal (a `timeout`, an interrupted run) runs no destructor, and its namespaces
/// (named by its pid, see [`namespace_owner`]) would stay until the machine restarts. Once per
/// process, before its first network.
pub(crate) fn sweep_stale() {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        let Ok(entries) = fs::read_dir("/run/netns") else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = namespace_owner(&name) else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            // Agents the dead process started: no longer anyone's children, so only killed.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
                for pid in String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: a plain syscall.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            eprintln!("note: deleting namespace {name}, left by test process {pid}");
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
        }
    });
}

/// The pid in the name of a namespace this crate's networks make (`lt`/`lc` + pid + `s`/`r` +
/// a number), if `name` is one.
fn namespace_owner(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix("lt")
        .or_else(|| name.strip_prefix("lc"))?;
    let end = rest.find(['s', 'r'])?;
    let (pid, tail) = rest.split_at(end);
    let n = &tail[1..];
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    (digits(pid) && digits(n))
        .then(|| pid.parse().ok())
        .flatten()
}

/// What dropping a network does: kills the agents still in `agents` (a guard leaked, or the
/// test panicked before dropping it: an agent holds the namespace, and its interface, alive),
/// deletes the namespaces in `namespaces` (last first), which destroys their veth pairs, and
/// removes the pin directories and default API sockets of `ifaces`, shared by all namespaces.
fn teardown(agents: &AgentRegistry, namespaces: &[String], ifaces: &[&str]) {
    let pids: Vec<u32> = mem::take(&mut *agents.lock().unwrap_or_else(|e| e.into_inner()));
    for pid in pids {
        // SAFETY: plain syscalls on a child process of ours that is still registered
        // (unregistered once reaped, so the pid cannot have been reused).
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
            libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
        }
    }
    for ns in namespaces.iter().rev() {
        let result = Command::new("ip")
            .args(["netns", "del", ns])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match result {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: `ip netns del {ns}` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: `ip netns del {ns}`: {e}"),
        }
    }
    for iface in ifaces {
        let _ = fs::remove_dir_all(pin_dir(iface));
        // The default API socket of an agent killed above: only the agent could have removed
        // it, and the interface (so the name) is gone with the namespace.
        let _ = fs::remove_file(limiter_user::api::default_socket(iface));
    }
}

/// Writes each `(KEY, value)` to `/proc/sys/net/KEY` as seen from namespace `ns`.
fn write_sysctls(ns: &str, settings: &[(String, &str)]) -> Result<()> {
    in_netns(ns, || -> Result<()> {
        for (key, value) in settings {
            let path = format!("/proc/sys/net/{key}");
            fs::write(&path, value).with_context(|| format!("writing {path} in namespace {ns}"))?;
        }
        Ok(())
    })?
}

/// Quiets IPv6 on `dev` in `ns`: no router solicitations, no link-local address (and so no DAD
/// or MLD from one). Call before the link goes up; the test addresses are added `nodad`.
fn quiet_ipv6(ns: &str, dev: &str) -> Result<()> {
    let settings = [
        ("router_solicitations", "0"),
        ("accept_ra", "0"),
        ("addr_gen_mode", "1"),
    ]
    .map(|(key, value)| (format!("ipv6/conf/{dev}/{key}"), value));
    write_sysctls(ns, &settings)
}

/// Waits (at most 5 s) for carrier on every `(namespace, device)`: before it, a veth's qdisc
/// silently drops.
fn wait_links_up(links: &[(&str, &str)]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let down: Vec<&str> = links
            .iter()
            .filter(|(ns, dev)| {
                !run_ok(Command::new("ip").args(["-n", ns, "-br", "link", "show", dev]))
                    .is_ok_and(|out| out.split_whitespace().nth(1) == Some("UP"))
            })
            .map(|(_, dev)| *dev)
            .collect();
        if down.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("veth {} did not come up within 5 s", down.join(", "));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `dev` in namespace `ns` as `ip -j -s link show` describes it (its XDP program, its counters).
pub fn link_json(ns: &str, dev: &str) -> Result<serde_json::Value> {
    let out = run_ok(Command::new("ip").args(["-n", ns, "-j", "-s", "link", "show", "dev", dev]))?;
    let json: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("`ip -n {ns} -j -s link show dev {dev}` printed {out:?}"))?;
    Ok(json[0].clone())
}

/// The `rx` or `tx` packet count of `dev` in namespace `ns` (`ip -s link`; a veth's `rx` counts
/// the frames its XDP program dropped too).
pub fn link_packets(ns: &str, dev: &str, direction: &str) -> Result<u64> {
    let link = link_json(ns, dev)?;
    link["stats64"][direction]["packets"]
        .as_u64()
        .with_context(|| format!("no {direction} packet count for {dev} in {link}"))
}

/// `/sys/fs/bpf/limiter/IFACE`, where the agent pins its maps.
pub fn pin_dir(iface: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/limiter").join(iface)
}

#[cfg(test)]
mod tests {
    use super::namespace_owner;

    #[test]
    fn only_this_crates_namespaces_name_an_owner() {
        assert_eq!(namespace_owner("lt4242s3"), Some(4242));
        assert_eq!(namespace_owner("lc21159r6"), Some(21159));
        for other in [
            "vt", "lt", "lts1", "lt12x3", "lt12s", "lc12r3x", "ltabcs1", "ns1",
        ] {
            assert_eq!(namespace_owner(other), None, "{other}");
        }
    }
}
