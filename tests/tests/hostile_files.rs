//! The agent against a hostile local user (README "Files the agent writes", "Privileges" and the
//! API socket): symlinks planted where it writes, state directories others can write, files too
//! large to read, every way of stopping, and the agent run with capabilities only, as `nobody`.
//! Root only (the test itself); run one at a time (`--test-threads=1`).
//!
//! Limits use `window: 1h`, so a fresh client is admitted exactly `limit` packets as long as no
//! hour boundary of CLOCK_MONOTONIC falls inside the test ([`ExactWindow`]).

use std::{
    fs,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::ExitStatus,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use limiter_tests::{
    agent::{Agent, client_counts, run_limiter},
    fixture::{ExactWindow, TempDir},
    netns::{TestNet, in_netns, pin_dir, sender_v4},
    require_root,
    traffic::{UDP_PORT, send_and_count},
};

/// Longest any one test's exact-count phase may take; the hour window must not end inside it.
const TEST_SPAN: Duration = Duration::from_secs(60);

/// Five packets an hour for everyone: exact counts.
const CONFIG: &str = "default: {limit: 5, window: 1h}\n";

/// The uid and gid of `nobody`/`nogroup` on Debian (numeric: the VM of `cargo xtask vm-test` has
/// no /etc/passwd).
const NOBODY: u32 = 65534;

/// Waits up to `timeout` for the agent to exit; its status.
fn wait_exit(agent: &Agent, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = agent.exited()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            bail!(
                "the agent did not exit within {timeout:?}; its stderr:\n{}",
                agent.stderr()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to `timeout` for `cond`.
fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            bail!("{what} within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Starts an agent that is expected to refuse to start; returns its stderr after checking it
/// exited with a failure and left nothing attached, pinned, or bound at `socket`.
fn refused_start(net: &TestNet, extra: &[&str], wrapper: &[&str], socket: &Path) -> Result<String> {
    let agent = Agent::spawn_wrapped(net, CONFIG, extra, wrapper)?;
    let status = wait_exit(&agent, Duration::from_secs(15))?;
    let log = agent.stderr();
    ensure!(!status.success(), "the agent started; its stderr:\n{log}");
    ensure!(!agent.xdp_attached()?, "XDP left attached:\n{log}");
    ensure!(
        !pin_dir(&net.receiver_if).join("CLIENTS").exists(),
        "maps left pinned:\n{log}"
    );
    if let Ok(meta) = fs::symlink_metadata(socket) {
        ensure!(
            !meta.file_type().is_socket(),
            "a socket was left at {}:\n{log}",
            socket.display()
        );
    }
    Ok(log)
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).map_or(0, |m| m.mode() & 0o7777)
}

fn is_regular(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file())
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// A file someone else owns that the agent must never write: content and mode are checked.
struct Victim {
    path: PathBuf,
}

impl Victim {
    const CONTENT: &'static [u8] = b"precious: must not be written by the agent\n";

    fn new(dir: &TempDir, name: &str) -> Result<Victim> {
        let path = dir.join(name);
        fs::write(&path, Victim::CONTENT)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
        Ok(Victim { path })
    }

    fn assert_untouched(&self) {
        assert_eq!(
            fs::read(&self.path).unwrap_or_default(),
            Victim::CONTENT,
            "{} was written through a link",
            self.path.display()
        );
        assert_eq!(
            mode(&self.path),
            0o644,
            "{} changed mode",
            self.path.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Symlinks planted where the agent writes
// ---------------------------------------------------------------------------------------------

/// A symlink at the API socket's path: the agent neither binds through it, nor removes it, nor
/// changes the mode of what it points to; it refuses to start, naming the path.
#[test]
fn a_symlink_at_the_socket_path_is_not_followed() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("socket-link")?;
    let victim = Victim::new(&dir, "victim")?;
    let socket = dir.join("api.sock");
    symlink(&victim.path, &socket)?;
    let log = refused_start(&net, &["--api-socket", &path_arg(&socket)], &[], &socket)?;
    assert!(
        log.contains(&format!(
            "API socket path {} exists and is not a socket (a symlink)",
            socket.display()
        )),
        "{log}"
    );
    assert!(fs::symlink_metadata(&socket)?.file_type().is_symlink());
    victim.assert_untouched();
    Ok(())
}

/// Symlinks at every name an attacker could guess in the state directory (the old fixed
/// temporary names, one of the random form, the snapshot's own name): the snapshot and the
/// overlay are written as new 0600 files, and nothing is written through a link.
#[test]
fn state_files_are_0600_and_never_written_through_planted_links() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("state-links")?;
    let state = dir.join("state");
    fs::create_dir(&state)?;
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700))?;
    let iface = net.receiver_if.clone();
    let names = [
        format!("{iface}.snapshot"),
        format!(".{iface}.snapshot.tmp"),
        format!("{iface}.snapshot.tmp"),
        format!(".{iface}.snapshot.0123456789abcdef.tmp"),
        format!(".{iface}.overlay.yaml.tmp"),
        format!("{iface}.overlay.yaml.tmp"),
        format!(".{iface}.overlay.yaml.0123456789abcdef.tmp"),
    ];
    let mut victims = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let victim = Victim::new(&dir, &format!("victim-{i}"))?;
        symlink(&victim.path, state.join(name))?;
        victims.push(victim);
    }
    let socket = dir.join("api.sock");
    let agent = Agent::start_with(
        &net,
        CONFIG,
        &[
            "--state-dir",
            &path_arg(&state),
            "--snapshot-interval",
            "100ms",
            "--api-socket",
            &path_arg(&socket),
        ],
    )?;
    let snapshot = state.join(format!("{iface}.snapshot"));
    wait_until(Duration::from_secs(5), "no snapshot written", || {
        is_regular(&snapshot)
    })?;
    // An API change writes the overlay.
    let out = run_limiter(
        &agent.ns,
        &[
            "limits",
            "set",
            "198.18.0.0/24",
            "--limit",
            "3",
            "--window",
            "1h",
            "--api",
            &path_arg(&socket),
        ],
    )?;
    ensure!(
        out.status.success(),
        "limits set failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let overlay = state.join(format!("{iface}.overlay.yaml"));
    assert!(is_regular(&overlay), "no overlay written");
    assert_eq!(mode(&snapshot), 0o600, "the snapshot lists clients");
    assert_eq!(mode(&overlay), 0o600, "the overlay");
    let status = agent.terminate()?;
    assert!(status.success(), "{status}: {}", agent.stderr());
    assert_eq!(mode(&snapshot), 0o600, "the final snapshot");
    for victim in &victims {
        victim.assert_untouched();
    }
    // The link at the snapshot's own name was read as a (bad) snapshot and moved aside, never
    // written; links at the old fixed temporary names are still links (never opened); the one of
    // the random form was unlinked as a stale temporary file, not followed.
    for name in &names[1..3] {
        assert!(
            fs::symlink_metadata(state.join(name))?
                .file_type()
                .is_symlink(),
            "{name}"
        );
    }
    assert!(!state.join(&names[3]).exists());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// State directories other users could write
// ---------------------------------------------------------------------------------------------

/// A state directory of mode 0777, or another user's, is refused at start with an error naming
/// it and what is wrong, before anything is read from it (a planted overlay that would let
/// everything pass is never in force) or attached.
#[test]
fn a_state_directory_others_can_write_is_refused() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("open-state")?;
    let state = dir.join("state");
    fs::create_dir(&state)?;
    fs::set_permissions(&state, fs::Permissions::from_mode(0o777))?;
    fs::write(
        state.join(format!("{}.overlay.yaml", net.receiver_if)),
        "version: 1\ndefault: {action: pass}\n",
    )?;
    let socket = dir.join("api.sock");
    let args = [
        "--state-dir",
        &path_arg(&state),
        "--api-socket",
        &path_arg(&socket),
    ];
    let log = refused_start(&net, &args, &[], &socket)?;
    assert!(
        log.contains(&format!(
            "the state directory {} is writable by group and others (mode 0777)",
            state.display()
        )),
        "{log}"
    );
    assert!(log.contains("chmod go-w"), "{log}");
    assert_eq!(mode(&state), 0o777, "the agent changed the operator's mode");

    // Owner-only, but another user's.
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700))?;
    std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY))?;
    let log = refused_start(&net, &args, &[], &socket)?;
    assert!(
        log.contains(&format!(
            "the state directory {} is owned by uid {NOBODY}, not by the agent's uid 0",
            state.display()
        )),
        "{log}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Files too large to read
// ---------------------------------------------------------------------------------------------

/// `text` padded with a comment to exactly `size` bytes.
fn padded(text: &str, size: usize) -> String {
    let mut out = text.to_owned();
    out.push('#');
    out.extend(std::iter::repeat_n('x', size - text.len() - 2));
    out.push('\n');
    assert_eq!(out.len(), size);
    out
}

/// A config file over 16 MiB is refused naming the file, its size and the cap: at start the
/// agent stops; on a reload the policies in force stay (checked with real traffic).
#[test]
fn an_oversized_config_is_rejected_and_the_policies_in_force_stay() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("large-config")?;
    let socket = dir.join("api.sock");
    let big = padded("default: {limit: 1000, window: 1h}\n", 17 << 20);
    let agent = Agent::spawn(&net, &big, &["--api-socket", &path_arg(&socket)])?;
    let status = wait_exit(&agent, Duration::from_secs(15))?;
    let log = agent.stderr();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "config {} is 17 MiB, over the cap of 16 MiB",
            agent.config_path.display()
        )),
        "{log}"
    );
    assert!(!agent.xdp_attached()?);
    assert!(!socket.exists());
    drop(agent);

    let agent = Agent::start(&net, CONFIG)?;
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let src = sender_v4(0).into();
    let got = send_and_count(&net, &counter, &[(src, 3)])?;
    assert_eq!(got[&src], 3);
    let generation = agent.generation()?;
    let from = agent.stderr().len();
    agent.write_config(&padded("default: {limit: 1000, window: 1h}\n", 17 << 20))?;
    let needle = format!(
        "config {} is 17 MiB, over the cap of 16 MiB; the policies in force stay in force",
        agent.config_path.display()
    );
    wait_until(Duration::from_secs(3), "no rejection logged", || {
        agent
            .stderr()
            .get(from..)
            .is_some_and(|l| l.contains(&needle))
    })?;
    // Still the old limit: 2 of the 5 are left, whatever is sent.
    let got = send_and_count(&net, &counter, &[(src, 10)])?;
    assert_eq!(
        got[&src], 2,
        "the oversized config's limit of 1000 took effect"
    );
    assert_eq!(agent.generation()?, generation);
    assert_eq!(client_counts(&agent.stats()?, src), (5, 8));
    window.check();
    Ok(())
}

/// An overlay over 32 MiB and a snapshot larger than the maps can hold are refused unread,
/// naming the file, its size and the cap: the config file's policies are in force (the
/// overlay's `default: pass` is not), the snapshot is moved aside, API changes are refused.
#[test]
fn an_oversized_overlay_or_snapshot_is_refused_and_the_config_stays_in_force() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("large-state")?;
    let state = dir.join("state");
    fs::create_dir(&state)?;
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700))?;
    let iface = net.receiver_if.clone();
    let overlay = state.join(format!("{iface}.overlay.yaml"));
    fs::write(
        &overlay,
        padded("version: 1\ndefault: {action: pass}\n", 33 << 20),
    )?;
    // The harness runs the agent with --max-clients 65536: its maps hold 65,536 dynamic,
    // 65,536 exact-address and 65,536 held limited clients (--max-limited's default), 64 bytes
    // each in a snapshot, plus 68 bytes of header and checksum.
    let cap = 68 + (65_536 + 65_536 + 65_536) * 64;
    let snapshot = state.join(format!("{iface}.snapshot"));
    fs::write(&snapshot, vec![0u8; cap + 1])?;
    let socket = dir.join("api.sock");
    let agent = Agent::start_with(
        &net,
        CONFIG,
        &[
            "--state-dir",
            &path_arg(&state),
            "--api-socket",
            &path_arg(&socket),
        ],
    )?;
    let log = agent.stderr();
    assert!(
        log.contains(&format!(
            "the policy overlay {} is 33 MiB, over the cap of 32 MiB",
            overlay.display()
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "the snapshot {} is {:.1} MiB ({} bytes), over the cap of",
            snapshot.display(),
            (cap + 1) as f64 / f64::from(1 << 20),
            cap + 1
        )),
        "{log}"
    );
    assert!(!snapshot.exists(), "the snapshot was not moved aside");
    assert!(
        fs::read_dir(&state)?.filter_map(Result::ok).any(|e| e
            .file_name()
            .to_string_lossy()
            .contains(".snapshot.corrupt-")),
        "no .corrupt- file"
    );
    // The file's limit, not the overlay's pass.
    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let src = sender_v4(1).into();
    let got = send_and_count(&net, &counter, &[(src, 12)])?;
    assert_eq!(got[&src], 5);
    window.check();
    // API changes are refused rather than overwriting the overlay.
    let out = run_limiter(
        &agent.ns,
        &[
            "limits",
            "set",
            "default",
            "--action",
            "pass",
            "--api",
            &path_arg(&socket),
        ],
    )?;
    assert!(!out.status.success(), "an API change was accepted");
    assert_eq!(
        fs::metadata(&overlay)?.len(),
        33 << 20,
        "the overlay was rewritten"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Every way of stopping removes the socket
// ---------------------------------------------------------------------------------------------

/// SIGTERM and SIGINT stop the agent in order and remove its socket; so does a start that fails
/// after the socket was bound (the metrics port in use); SIGKILL leaves it, and the next agent
/// replaces it as stale; a socket another process listens on stops the start and is left alone.
#[test]
fn every_way_of_stopping_removes_the_socket() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dir = TempDir::new("stop-socket")?;
    let socket = dir.join("api.sock");
    let socket_arg = path_arg(&socket);
    for (name, signal) in [("SIGTERM", libc::SIGTERM), ("SIGINT", libc::SIGINT)] {
        let agent = Agent::start_with(&net, CONFIG, &["--api-socket", &socket_arg])?;
        assert!(fs::symlink_metadata(&socket)?.file_type().is_socket());
        assert_eq!(mode(&socket), 0o600);
        let pid = agent.pid().context("no pid")? as i32;
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(pid, signal) };
        let status = wait_exit(&agent, Duration::from_secs(10))?;
        assert!(status.success(), "{name}: {status}: {}", agent.stderr());
        assert!(!socket.exists(), "{name} left the socket behind");
    }

    // A start that fails after binding the socket: the metrics port is taken in the agent's
    // namespace.
    let taken = in_netns(&net.receiver_ns, || {
        std::net::TcpListener::bind("127.0.0.1:0")
    })??;
    let metrics = taken.local_addr()?.to_string();
    let log = refused_start(
        &net,
        &["--api-socket", &socket_arg, "--metrics", &metrics],
        &[],
        &socket,
    )?;
    assert!(log.contains("binding the metrics listener"), "{log}");
    assert!(!socket.exists(), "a failed start left the socket behind");
    drop(taken);

    // SIGKILL: nothing can clean up; the next agent replaces the stale socket.
    let agent = Agent::start_with(&net, CONFIG, &["--api-socket", &socket_arg])?;
    agent.kill()?;
    assert!(fs::symlink_metadata(&socket)?.file_type().is_socket());
    drop(agent);
    let agent = Agent::start_with(&net, CONFIG, &["--api-socket", &socket_arg])?;
    assert!(
        agent.stderr().contains("replacing a stale API socket"),
        "{}",
        agent.stderr()
    );
    let out = run_limiter(
        &agent.ns,
        &["check", "198.18.0.99", "--hits", "0", "--api", &socket_arg],
    )?;
    assert!(
        out.status.success(),
        "the new socket does not answer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // While it listens, a second agent on the same socket is refused and leaves it alone.
    let second = TestNet::new()?;
    let log = refused_start(
        &second,
        &["--api-socket", &socket_arg],
        &[],
        Path::new("/nonexistent"),
    )?;
    assert!(log.contains("is in use by another process"), "{log}");
    assert!(fs::symlink_metadata(&socket)?.file_type().is_socket());
    drop(second);
    assert!(agent.terminate()?.success());
    assert!(!socket.exists());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Capabilities only
// ---------------------------------------------------------------------------------------------

/// `setpriv` arguments that run the rest of the command line as `nobody` with exactly `caps`
/// (names as setpriv spells them: `bpf`, `net_admin`, `perfmon`), in every set that matters.
fn as_nobody_with(caps: &[&str]) -> Vec<String> {
    let plus: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
    let plus = plus.join(",");
    let with_all_cleared = if plus.is_empty() {
        "-all".to_owned()
    } else {
        format!("-all,{plus}")
    };
    let mut args = vec![
        "setpriv".to_owned(),
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".to_owned(),
        format!("--inh-caps={with_all_cleared}"),
        format!("--bounding-set={with_all_cleared}"),
    ];
    if !plus.is_empty() {
        args.push(format!("--ambient-caps={plus}"));
    }
    args
}

/// The directories an agent that is not root needs made for it: its state directory, its socket
/// directory and its pin directory, owned by `nobody`.
struct NobodyDirs {
    dir: TempDir,
    state: PathBuf,
    socket: PathBuf,
    pins: PathBuf,
}

impl NobodyDirs {
    fn new(net: &TestNet, tag: &str) -> Result<NobodyDirs> {
        let dir = TempDir::new(tag)?;
        let state = dir.join("state");
        let run = dir.join("run");
        for (path, mode) in [(&state, 0o700), (&run, 0o755)] {
            fs::create_dir(path)?;
            fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
            std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY))?;
        }
        let pins = pin_dir(&net.receiver_if);
        fs::create_dir_all(&pins).with_context(|| format!("creating {}", pins.display()))?;
        fs::set_permissions(&pins, fs::Permissions::from_mode(0o700))?;
        std::os::unix::fs::chown(&pins, Some(NOBODY), Some(NOBODY))?;
        let bpffs = fs::metadata("/sys/fs/bpf")?.mode();
        ensure!(
            bpffs & 0o001 != 0,
            "/sys/fs/bpf (mode {:04o}) is not searchable by others: a non-root agent cannot \
             reach its pins (README, Privileges)",
            bpffs & 0o7777
        );
        Ok(NobodyDirs {
            socket: run.join("api.sock"),
            dir,
            state,
            pins,
        })
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--state-dir".to_owned(),
            path_arg(&self.state),
            "--api-socket".to_owned(),
            path_arg(&self.socket),
            "--snapshot-interval".to_owned(),
            "200ms".to_owned(),
        ]
    }
}

/// `Uid:` and `CapEff:` of a process, from /proc.
fn uid_and_caps(pid: u32) -> Result<(u32, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    let uid = field("Uid:")?
        .split_whitespace()
        .nth(1)
        .context("no effective uid")?
        .parse()?;
    let caps = u64::from_str_radix(field("CapEff:")?, 16)?;
    Ok((uid, caps))
}

/// Run as `nobody` with only CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, the agent loads, pins,
/// attaches and limits real traffic exactly; its API answers; it snapshots; SIGTERM stops it
/// cleanly (detached, socket removed).
#[test]
fn a_capabilities_only_agent_attaches_and_enforces() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dirs = NobodyDirs::new(&net, "caps-only")?;
    let wrapper = as_nobody_with(&["bpf", "net_admin", "perfmon"]);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let args = dirs.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::spawn_wrapped(&net, CONFIG, &args, &wrapper)?;
    agent.wait_ready(Duration::from_secs(15))?;

    let pid = agent.pid().context("no pid")?;
    let (uid, caps) = uid_and_caps(pid)?;
    assert_eq!(uid, NOBODY, "the agent is not running as nobody");
    // CAP_NET_ADMIN is 12, CAP_PERFMON 38, CAP_BPF 39 (linux/capability.h).
    let want = 1u64 << 12 | 1 << 38 | 1 << 39;
    assert_eq!(
        caps, want,
        "effective capabilities {caps:#x}, want {want:#x}"
    );
    assert_eq!(fs::metadata(dirs.pins.join("CLIENTS"))?.uid(), NOBODY);

    let counter = net.udp_counter(UDP_PORT)?;
    let window = ExactWindow::start(TEST_SPAN);
    let src = sender_v4(2).into();
    let got = send_and_count(&net, &counter, &[(src, 20)])?;
    window.check();
    assert_eq!(got[&src], 5, "a capabilities-only agent does not limit");
    assert_eq!(client_counts(&agent.stats()?, src), (5, 15));

    let out = run_limiter(
        &agent.ns,
        &[
            "check",
            "198.18.0.99",
            "--hits",
            "0",
            "--api",
            &path_arg(&dirs.socket),
        ],
    )?;
    assert!(
        out.status.success(),
        "the API does not answer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let socket = fs::symlink_metadata(&dirs.socket)?;
    assert_eq!((socket.uid(), socket.mode() & 0o7777), (NOBODY, 0o600));
    let snapshot = dirs.state.join(format!("{}.snapshot", net.receiver_if));
    wait_until(Duration::from_secs(5), "no snapshot written", || {
        is_regular(&snapshot)
    })?;
    let meta = fs::metadata(&snapshot)?;
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (NOBODY, 0o600));

    let status = agent.terminate()?;
    assert!(status.success(), "{status}: {}", agent.stderr());
    assert!(!agent.xdp_attached()?, "still attached after SIGTERM");
    assert!(!dirs.socket.exists(), "socket left behind");
    drop(dirs.dir);
    Ok(())
}

/// With any one of the three capabilities missing, the agent stops at start with a line naming
/// it (and only it) and what it is for, before anything is loaded or attached.
#[test]
fn a_missing_capability_is_named_at_start() -> Result<()> {
    require_root!();
    let net = TestNet::new()?;
    let dirs = NobodyDirs::new(&net, "caps-missing")?;
    let args = dirs.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let all = [
        ("bpf", "CAP_BPF"),
        ("net_admin", "CAP_NET_ADMIN"),
        ("perfmon", "CAP_PERFMON"),
    ];
    for (missing, name) in all {
        let caps: Vec<&str> = all
            .iter()
            .map(|(c, _)| *c)
            .filter(|c| *c != missing)
            .collect();
        let wrapper = as_nobody_with(&caps);
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let log = refused_start(&net, &args, &wrapper, &dirs.socket)?;
        assert!(log.contains(&format!("limiter lacks {name} (")), "{log}");
        for (_, other) in all.iter().filter(|(c, _)| *c != missing) {
            assert!(!log.contains(&format!("lacks {other}")), "{log}");
        }
    }
    // None at all: all three named, in one line.
    let wrapper = as_nobody_with(&[]);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let log = refused_start(&net, &args, &wrapper, &dirs.socket)?;
    assert!(
        log.contains("limiter lacks CAP_BPF (")
            && log.contains(", CAP_NET_ADMIN (")
            && log.contains(", CAP_PERFMON ("),
        "{log}"
    );
    Ok(())
}
