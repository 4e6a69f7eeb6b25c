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

use std::{
    collections::HashMap,
    ffi::CString,
    fs,
    io::{self, Read as _, Write as _},
    mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde_json::Value;

/// The receiver's IPv4 address (on its veth, /24).
pub const RECEIVER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The receiver's IPv6 address (on its veth, /64).
pub const RECEIVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1);
/// MAC address of the receiver's veth.
pub const RECEIVER_MAC: [u8; 6] = [0x02, 0x6c, 0x74, 0, 0, 0x01];
/// MAC address of the sender's veth.
pub const SENDER_MAC: [u8; 6] = [0x02, 0x6c, 0x74, 0, 0, 0x02];
/// How many IPv4 and how many IPv6 addresses the sender has: [`sender_v4`]`(0..SENDERS)`,
/// [`sender_v6`]`(0..SENDERS)`.
pub const SENDERS: u8 = 48;
/// 802.1Q id of the single-tagged subnet 198.18.10.0/24.
pub const VLAN_ID: u16 = 10;
/// 802.1ad (outer) id of the double-tagged subnet 198.18.20.0/24.
pub const QINQ_OUTER: u16 = 20;
/// 802.1Q (inner) id of the double-tagged subnet 198.18.20.0/24.
pub const QINQ_INNER: u16 = 30;
/// Tag protocol identifiers.
pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;

/// The `i`-th sender IPv4 address: 198.18.0.(10 + i).
pub fn sender_v4(i: u8) -> Ipv4Addr {
    assert!(
        i < SENDERS,
        "sender_v4({i}): the sender has {SENDERS} addresses"
    );
    Ipv4Addr::new(198, 18, 0, 10 + i)
}

/// The `i`-th sender IPv6 address: fd00:77::(0x10 + i).
pub fn sender_v6(i: u8) -> Ipv6Addr {
    assert!(
        i < SENDERS,
        "sender_v6({i}): the sender has {SENDERS} addresses"
    );
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x10 + i as u16)
}

/// A source address in the 802.1Q subnet: 198.18.10.`host`.
pub fn vlan_v4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 10, host)
}

/// A source address in the QinQ subnet: 198.18.20.`host`.
pub fn qinq_v4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 20, host)
}

/// The 802.1Q tag stack of the 198.18.10.0/24 subnet.
pub const VLAN_TAGS: &[(u16, u16)] = &[(TPID_8021Q, VLAN_ID)];
/// The QinQ tag stack of the 198.18.20.0/24 subnet, outermost first.
pub const QINQ_TAGS: &[(u16, u16)] = &[(TPID_8021AD, QINQ_OUTER), (TPID_8021Q, QINQ_INNER)];

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

// ---------------------------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------------------------

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
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
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
fn run_ok(command: &mut Command) -> Result<String> {
    let line = describe(command);
    let output = run_with_timeout(command, Duration::from_secs(10))?;
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `ip -n NS -batch -` with `lines` on stdin: one process for many changes.
fn ip_batch(ns: &str, lines: &[String]) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting `ip -batch`")?;
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(lines.join("\n").as_bytes())?;
        stdin.write_all(b"\n")?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "`ip -n {ns} -batch` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

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

// ---------------------------------------------------------------------------------------------
// Namespaces
// ---------------------------------------------------------------------------------------------

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

/// Process ids of the agents started on one [`TestNet`], killed when it is dropped.
type AgentRegistry = Arc<Mutex<Vec<u32>>>;

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
        // Quiet IPv6 on the veth: no router solicitations, no link-local address (and so no DAD
        // or MLD from one). Set before the link goes up; the test addresses are `nodad`.
        for (ns, dev) in [(s_ns, s_if), (r_ns, r_if)] {
            in_netns(ns, || -> Result<()> {
                for (key, value) in [
                    ("router_solicitations", "0"),
                    ("accept_ra", "0"),
                    ("addr_gen_mode", "1"),
                ] {
                    let path = format!("/proc/sys/net/ipv6/conf/{dev}/{key}");
                    fs::write(&path, value).with_context(|| format!("writing {path}"))?;
                }
                Ok(())
            })??;
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

        // Wait for carrier at both ends: before it, the veth's qdisc silently drops.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let up = [(s_ns, s_if), (r_ns, r_if)].iter().all(|(ns, dev)| {
                run_ok(Command::new("ip").args(["-n", ns, "-br", "link", "show", dev]))
                    .is_ok_and(|out| out.split_whitespace().nth(1) == Some("UP"))
            });
            if up {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the veth pair did not come up within 5 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
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

    /// A UDP socket in the sender namespace bound to `src` (port chosen by the kernel).
    pub fn udp_sender(&self, src: IpAddr) -> Result<UdpSocket> {
        self.in_sender(|| -> Result<UdpSocket> {
            let socket = UdpSocket::bind(SocketAddr::new(src, 0))
                .with_context(|| format!("binding a UDP socket to {src}"))?;
            set_int_opt(&socket, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 4 << 20)?;
            Ok(socket)
        })?
    }

    /// A dual-stack UDP socket in the receiver namespace bound to `[::]:port` with a 32 MiB
    /// receive buffer, counting datagrams per source address on a background thread.
    pub fn udp_counter(&self, port: u16) -> Result<PacketCounter> {
        let socket = self.in_receiver(|| dual_stack_udp(port))??;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let mut buf = vec![0u8; 2048];
        Ok(PacketCounter::spawn(move || {
            match socket.recv_from(&mut buf) {
                Ok((_, from)) => Ok(Some(from.ip().to_canonical())),
                Err(e) if is_timeout(&e) => Ok(None),
                Err(e) => Err(e),
            }
        }))
    }

    /// An `AF_PACKET` socket on the receiver's veth counting UDP frames to `port` per source
    /// address, whatever VLAN tags they carry: every frame that the XDP program passed.
    pub fn frame_counter(&self, port: u16) -> Result<PacketCounter> {
        let ifname = self.receiver_if.clone();
        let socket = self.in_receiver(|| packet_socket(&ifname, libc::ETH_P_ALL as u16))??;
        set_timeout(&socket, Duration::from_millis(50))?;
        set_int_opt(&socket, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 32 << 20)?;
        let mut buf = vec![0u8; 4096];
        Ok(PacketCounter::spawn(move || {
            // SAFETY: an all-zero sockaddr_ll is valid; recvfrom writes at most `len` bytes.
            let mut from: libc::sockaddr_ll = unsafe { mem::zeroed() };
            let mut len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            let n = unsafe {
                libc::recvfrom(
                    socket.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut from).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return if is_timeout(&e) { Ok(None) } else { Err(e) };
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                return Ok(None);
            }
            Ok(udp_source(&buf[..n as usize], port))
        }))
    }

    /// An `AF_PACKET` socket on the sender's veth for raw (e.g. VLAN-tagged) frames.
    pub fn raw_sender(&self) -> Result<RawSender> {
        let ifname = self.sender_if.clone();
        let (socket, ifindex) = self.in_sender(|| -> Result<(OwnedFd, i32)> {
            // Protocol 0: this socket only sends.
            let socket = packet_socket(&ifname, 0)?;
            Ok((socket, if_index(&ifname)?))
        })??;
        set_int_opt(&socket, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 4 << 20)?;
        Ok(RawSender { socket, ifindex })
    }

    /// The kill list agents register in.
    fn registry(&self) -> AgentRegistry {
        Arc::clone(&self.agents)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Agents whose guard was leaked: an agent holds the namespace (and the veth) alive.
        let pids: Vec<u32> = mem::take(&mut *self.agents.lock().unwrap_or_else(|e| e.into_inner()));
        for pid in pids {
            // SAFETY: plain syscalls on a child process of ours that is still registered
            // (unregistered once reaped, so the pid cannot have been reused).
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
                libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
            }
        }
        for ns in self.created.iter().rev() {
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
        let _ = fs::remove_dir_all(pin_dir(&self.receiver_if));
    }
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

// ---------------------------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------------------------

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn cvt(ret: libc::c_int, what: &str) -> Result<libc::c_int> {
    if ret < 0 {
        return Err(io::Error::last_os_error()).context(what.to_owned());
    }
    Ok(ret)
}

fn set_int_opt(fd: &impl AsRawFd, level: i32, name: i32, value: i32) -> Result<()> {
    // SAFETY: `value` is a live c_int of the given size.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    cvt(ret, "setsockopt").map(drop)
}

fn set_timeout(fd: &impl AsRawFd, timeout: Duration) -> Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a live timeval.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    cvt(ret, "setsockopt(SO_RCVTIMEO)").map(drop)
}

/// An `AF_INET6` UDP socket with `IPV6_V6ONLY` off (IPv4 arrives as `::ffff:a.b.c.d`), bound to
/// `[::]:port`, with a 32 MiB receive buffer. Call inside the receiver namespace.
fn dual_stack_udp(port: u16) -> Result<UdpSocket> {
    // SAFETY: plain socket(2).
    let fd = cvt(
        unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) },
        "socket(AF_INET6)",
    )?;
    // SAFETY: a fresh fd we own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int_opt(&socket, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    set_int_opt(&socket, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 32 << 20)?;
    // SAFETY: an all-zero sockaddr_in6 is the unspecified address.
    let mut addr: libc::sockaddr_in6 = unsafe { mem::zeroed() };
    addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    addr.sin6_port = port.to_be();
    // SAFETY: `addr` is a live sockaddr_in6 of the given length.
    let ret = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const addr).cast(),
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    cvt(ret, &format!("binding [::]:{port}"))?;
    Ok(UdpSocket::from(socket))
}

fn if_index(ifname: &str) -> Result<i32> {
    let name = CString::new(ifname)?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::last_os_error()).with_context(|| format!("interface {ifname}")),
        i => Ok(i as i32),
    }
}

/// An `AF_PACKET`/`SOCK_RAW` socket bound to `ifname` (call inside its namespace); `protocol`
/// 0 receives nothing.
fn packet_socket(ifname: &str, protocol: u16) -> Result<OwnedFd> {
    let ifindex = if_index(ifname)?;
    // SAFETY: plain socket(2).
    let fd = cvt(
        unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol.to_be() as i32,
            )
        },
        "socket(AF_PACKET)",
    )?;
    // SAFETY: a fresh fd we own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is valid.
    let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol.to_be();
    addr.sll_ifindex = ifindex;
    // SAFETY: `addr` is a live sockaddr_ll of the given length.
    let ret = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const addr).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    cvt(ret, &format!("binding a packet socket to {ifname}"))?;
    Ok(socket)
}

/// The source address of a UDP datagram to `port` in an Ethernet frame with any number of VLAN
/// tags (the kernel may already have moved the outermost one into metadata).
fn udp_source(frame: &[u8], port: u16) -> Option<IpAddr> {
    let be16 = |at: usize| -> Option<u16> {
        Some(u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?))
    };
    let mut ethertype = be16(12)?;
    let mut off = 14;
    while ethertype == TPID_8021Q || ethertype == TPID_8021AD {
        ethertype = be16(off + 2)?;
        off += 4;
    }
    let (src, udp): (IpAddr, usize) = match ethertype {
        0x0800 => {
            let ihl = (*frame.get(off)? & 0x0f) as usize * 4;
            if *frame.get(off + 9)? != libc::IPPROTO_UDP as u8 {
                return None;
            }
            let b: [u8; 4] = frame.get(off + 12..off + 16)?.try_into().ok()?;
            (IpAddr::from(b), off + ihl)
        }
        0x86dd => {
            if *frame.get(off + 6)? != libc::IPPROTO_UDP as u8 {
                return None;
            }
            let b: [u8; 16] = frame.get(off + 8..off + 24)?.try_into().ok()?;
            (IpAddr::from(b), off + 40)
        }
        _ => return None,
    };
    (be16(udp + 2)? == port).then_some(src)
}

// ---------------------------------------------------------------------------------------------
// Counting received packets
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct CounterState {
    counts: Mutex<HashMap<IpAddr, u64>>,
    total: AtomicU64,
    /// Nanoseconds since `epoch` of the last counted packet.
    last_ns: AtomicU64,
    error: Mutex<Option<String>>,
}

/// Counts received packets per source address on a background thread until dropped.
pub struct PacketCounter {
    state: Arc<CounterState>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PacketCounter {
    /// Spawns the counting thread around `recv_one`, which waits a short while (its socket's
    /// timeout) for one packet: `Ok(Some(source))` counts it, `Ok(None)` counts nothing.
    fn spawn(
        mut recv_one: impl FnMut() -> io::Result<Option<IpAddr>> + Send + 'static,
    ) -> PacketCounter {
        let state = Arc::new(CounterState::default());
        let stop = Arc::new(AtomicBool::new(false));
        let epoch = Instant::now();
        let thread = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match recv_one() {
                        Ok(Some(ip)) => {
                            *state
                                .counts
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .entry(ip)
                                .or_default() += 1;
                            state.total.fetch_add(1, Ordering::Relaxed);
                            state
                                .last_ns
                                .store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            *state.error.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(e.to_string());
                            return;
                        }
                    }
                }
            })
        };
        PacketCounter {
            state,
            epoch,
            stop,
            thread: Some(thread),
        }
    }

    /// Packets counted so far, per source address (IPv4 as IPv4, not IPv4-mapped).
    pub fn counts(&self) -> HashMap<IpAddr, u64> {
        self.state
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Packets counted so far from `ip`.
    pub fn count(&self, ip: impl Into<IpAddr>) -> u64 {
        self.counts().get(&ip.into()).copied().unwrap_or(0)
    }

    /// Packets counted so far from all sources.
    pub fn total(&self) -> u64 {
        self.state.total.load(Ordering::Relaxed)
    }

    /// Waits until no packet has arrived for `idle` (counted from the later of the last packet
    /// and this call), at most 30 s, and returns the counts. Fails if the receiving thread hit
    /// an error.
    pub fn wait_idle(&self, idle: Duration) -> Result<HashMap<IpAddr, u64>> {
        let start = self.epoch.elapsed();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(e) = self
                .state
                .error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                bail!("receiving: {e}");
            }
            let last = Duration::from_nanos(self.state.last_ns.load(Ordering::Relaxed)).max(start);
            let now = self.epoch.elapsed();
            if now.saturating_sub(last) >= idle {
                return Ok(self.counts());
            }
            if Instant::now() >= deadline {
                bail!("traffic did not go idle within 30 s");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// [`PacketCounter::wait_idle`] with the usual 400 ms.
    pub fn settle(&self) -> Result<HashMap<IpAddr, u64>> {
        self.wait_idle(Duration::from_millis(400))
    }
}

impl Drop for PacketCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sending
// ---------------------------------------------------------------------------------------------

/// Light pacing: `burst` packets back to back, then `pause`.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    pub burst: u32,
    pub pause: Duration,
}

impl Default for Pacing {
    /// 8 packets per 250 µs (at most ~32k packets/s): far below what the veth ring and the
    /// receiver drain, so nothing is lost outside the limiter.
    fn default() -> Self {
        Pacing {
            burst: 8,
            pause: Duration::from_micros(250),
        }
    }
}

/// Longest a bounded send may take.
const SEND_TIME_LIMIT: Duration = Duration::from_secs(30);

fn payload(seq: u64) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[..16].copy_from_slice(b"limiter-test-pkt");
    p[16..24].copy_from_slice(&seq.to_be_bytes());
    p
}

/// Retries a send that failed for lack of buffer space a bounded number of times.
fn send_retrying(mut send: impl FnMut() -> io::Result<usize>) -> Result<()> {
    let mut attempts = 0;
    loop {
        match send() {
            Ok(_) => return Ok(()),
            Err(e)
                if attempts < 100
                    && (e.raw_os_error() == Some(libc::ENOBUFS) || is_timeout(&e)) =>
            {
                attempts += 1;
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends `count` datagrams from `socket` to `dst` with `pacing`; returns how many were sent
/// (all of them, or an error).
pub fn send_udp(socket: &UdpSocket, dst: SocketAddr, count: u64, pacing: Pacing) -> Result<u64> {
    let start = Instant::now();
    for seq in 0..count {
        send_retrying(|| socket.send_to(&payload(seq), dst))
            .with_context(|| format!("sending to {dst}"))?;
        if pacing.burst > 0 && (seq + 1) % pacing.burst as u64 == 0 {
            thread::sleep(pacing.pause);
        }
        ensure!(
            start.elapsed() < SEND_TIME_LIMIT,
            "sending {count} datagrams took over {SEND_TIME_LIMIT:?}"
        );
    }
    Ok(count)
}

/// Sends at `rate` datagrams per second for at most `duration`, or until `stop` is set, adding
/// each sent datagram to `sent`. Returns the number sent.
pub fn send_udp_at_rate(
    socket: &UdpSocket,
    dst: SocketAddr,
    rate: f64,
    duration: Duration,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> Result<u64> {
    let start = Instant::now();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        let due = (elapsed.as_secs_f64() * rate) as u64 + 1;
        while seq < due {
            send_retrying(|| socket.send_to(&payload(seq), dst))?;
            seq += 1;
            sent.fetch_add(1, Ordering::Relaxed);
        }
        thread::sleep(Duration::from_secs_f64((1.0 / rate).clamp(0.0002, 0.01)));
    }
    Ok(seq)
}

/// Sends raw Ethernet frames out of the sender's veth.
pub struct RawSender {
    socket: OwnedFd,
    ifindex: i32,
}

impl RawSender {
    /// Sends one frame as is.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: an all-zero sockaddr_ll is valid.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_protocol = u16::from_be_bytes([frame[12], frame[13]]).to_be();
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        send_retrying(|| {
            // SAFETY: `frame` and `addr` are live for the call.
            let n = unsafe {
                libc::sendto(
                    self.socket.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const addr).cast(),
                    mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        })
        .context("sending a raw frame")
    }

    /// Sends `count` UDP frames from `src` to the receiver's address of the same family on
    /// `port`, with the VLAN `tags` (outermost first), paced like [`send_udp`].
    pub fn send_udp(
        &self,
        tags: &[(u16, u16)],
        src: IpAddr,
        port: u16,
        count: u64,
        pacing: Pacing,
    ) -> Result<u64> {
        let dst = match src {
            IpAddr::V4(_) => IpAddr::V4(RECEIVER_V4),
            IpAddr::V6(_) => IpAddr::V6(RECEIVER_V6),
        };
        let start = Instant::now();
        for seq in 0..count {
            let frame = udp_frame(tags, src, dst, 40000, port, &payload(seq));
            self.send(&frame)?;
            if pacing.burst > 0 && (seq + 1) % pacing.burst as u64 == 0 {
                thread::sleep(pacing.pause);
            }
            ensure!(
                start.elapsed() < SEND_TIME_LIMIT,
                "sending {count} frames took over {SEND_TIME_LIMIT:?}"
            );
        }
        Ok(count)
    }
}

fn checksum_add(mut sum: u32, bytes: &[u8]) -> u32 {
    for chunk in bytes.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += word as u32;
    }
    sum
}

fn checksum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame from [`SENDER_MAC`] to [`RECEIVER_MAC`] with VLAN `tags` (outermost first,
/// `(tpid, vid)`) carrying a UDP datagram with correct IP and UDP checksums.
pub fn udp_frame(
    tags: &[(u16, u16)],
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut frame = Vec::with_capacity(14 + 4 * tags.len() + 40 + udp_len);
    frame.extend_from_slice(&RECEIVER_MAC);
    frame.extend_from_slice(&SENDER_MAC);
    for (tpid, vid) in tags {
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            frame.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = 64;
            ip[9] = libc::IPPROTO_UDP as u8;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let csum = checksum_fold(checksum_add(0, &ip));
            ip[10..12].copy_from_slice(&csum.to_be_bytes());
            let mut sum = checksum_add(0, &s.octets());
            sum = checksum_add(sum, &d.octets());
            sum += libc::IPPROTO_UDP as u32 + udp_len as u32;
            let csum = match checksum_fold(checksum_add(sum, &udp)) {
                0 => 0xffff,
                c => c,
            };
            udp[6..8].copy_from_slice(&csum.to_be_bytes());
            frame.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            frame.extend_from_slice(&0x86ddu16.to_be_bytes());
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
            ip[6] = libc::IPPROTO_UDP as u8;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            let mut sum = checksum_add(0, &s.octets());
            sum = checksum_add(sum, &d.octets());
            sum += udp_len as u32 + libc::IPPROTO_UDP as u32;
            let csum = match checksum_fold(checksum_add(sum, &udp)) {
                0 => 0xffff,
                c => c,
            };
            udp[6..8].copy_from_slice(&csum.to_be_bytes());
            frame.extend_from_slice(&ip);
        }
        _ => panic!("udp_frame: {src} and {dst} are of different families"),
    }
    frame.extend_from_slice(&udp);
    frame
}

// ---------------------------------------------------------------------------------------------
// The agent
// ---------------------------------------------------------------------------------------------

/// `/sys/fs/bpf/limiter/IFACE`, where the agent pins its maps.
pub fn pin_dir(iface: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/limiter").join(iface)
}

/// A running `limiter agent` on a [`TestNet`]'s receiver veth. Dropping it stops the agent
/// (SIGTERM, SIGKILL after 5 s) and removes its pinned maps.
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
            &net.receiver_if,
            "--config",
            &config_arg,
            "--xdp-mode",
            "native",
            "--max-clients",
            "65536",
        ];
        // Keep client-state snapshots and policy overlays (newer agents write them) out of
        // /var/lib, unless the test gives its own state dir.
        let state_dir = dir.join("state").to_string_lossy().into_owned();
        if agent_has_option("--state-dir") && !extra_args.contains(&"--state-dir") {
            args.extend(["--state-dir", &state_dir]);
        }
        args.extend_from_slice(extra_args);
        let mut command = limiter_command(&net.receiver_ns, &args);
        command
            .stdin(Stdio::null())
            .stdout(stderr.try_clone()?)
            .stderr(stderr)
            // Its own process group: a Ctrl-C in the terminal reaches the demo, which stops the
            // agent itself after cleaning up.
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("starting `{}`", describe(&command)))?;
        let registry = net.registry();
        registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        Ok(Agent {
            child: Mutex::new(Some(child)),
            iface: net.receiver_if.clone(),
            ns: net.receiver_ns.clone(),
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
    /// dropped, for a next agent to adopt; the [`TestNet`] still removes them.
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
        // SAFETY: signalling our own, not yet reaped, child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                eprintln!("warning: the agent ignored SIGTERM for 5 s; killing it");
                let _ = child.kill();
                break child.wait()?;
            }
            thread::sleep(Duration::from_millis(10));
        };
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
    let output = run_limiter(ns, &["stats", "--iface", iface, "--json", "--top", "0"])?;
    if !output.status.success() {
        bail!(
            "`limiter stats --iface {iface} --json` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "`limiter stats --json` printed invalid JSON: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// The entry of `stats["clients"]` whose `addr` is `addr`.
pub fn find_client(stats: &Value, addr: impl Into<IpAddr>) -> Option<&Value> {
    let addr = addr.into();
    stats["clients"].as_array()?.iter().find(|c| {
        c["addr"]
            .as_str()
            .and_then(|a| a.parse::<IpAddr>().ok())
            .is_some_and(|a| a.to_canonical() == addr)
    })
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

// ---------------------------------------------------------------------------------------------
// Window boundaries
// ---------------------------------------------------------------------------------------------

/// CLOCK_MONOTONIC, the clock the XDP program's windows are aligned to.
pub fn monotonic() -> Duration {
    // SAFETY: an all-zero timespec is valid; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The fixed window (of `window` length) that CLOCK_MONOTONIC is in now.
pub fn window_index(window: Duration) -> u128 {
    monotonic().as_nanos() / window.as_nanos()
}

/// With `window: 1h` the limiter is exact only while no hour boundary of CLOCK_MONOTONIC falls
/// between a client's first and last packet. If the next boundary is less than `needed` away,
/// sleeps until just past it (at most `needed`) and says so. Returns the hour index to check
/// against afterwards with [`window_index`].
pub fn clear_of_hour_boundary(needed: Duration) -> u128 {
    let hour = Duration::from_secs(3600);
    let into = Duration::from_nanos((monotonic().as_nanos() % hour.as_nanos()) as u64);
    let left = hour - into;
    if left < needed {
        let wait = left + Duration::from_millis(50);
        eprintln!("an hour boundary of CLOCK_MONOTONIC is {left:?} away: waiting {wait:?}");
        thread::sleep(wait);
    }
    window_index(hour)
}

/// The UDP port the privileged tests' receivers listen on.
pub const UDP_PORT: u16 = 5300;

/// The receiver's address in `src`'s family, on [`UDP_PORT`].
pub fn receiver_for(src: IpAddr) -> SocketAddr {
    match src {
        IpAddr::V4(_) => SocketAddr::new(RECEIVER_V4.into(), UDP_PORT),
        IpAddr::V6(_) => SocketAddr::new(RECEIVER_V6.into(), UDP_PORT),
    }
}

/// Sends `count` datagrams from `src` to the receiver (light pacing).
pub fn send(net: &TestNet, src: impl Into<IpAddr>, count: u64) -> Result<u64> {
    let src = src.into();
    let socket = net.udp_sender(src)?;
    send_udp(&socket, receiver_for(src), count, Pacing::default())
}

/// Sends `count` datagrams from each source (one after the other), waits until the receiver is
/// idle, and returns how many each source got through.
pub fn send_and_count(
    net: &TestNet,
    counter: &PacketCounter,
    sends: &[(IpAddr, u64)],
) -> Result<HashMap<IpAddr, u64>> {
    let before = counter.settle()?;
    for (src, count) in sends {
        send(net, *src, *count)?;
    }
    let after = counter.settle()?;
    Ok(sends
        .iter()
        .map(|(src, _)| {
            let got = after.get(src).copied().unwrap_or(0) - before.get(src).copied().unwrap_or(0);
            (*src, got)
        })
        .collect())
}
