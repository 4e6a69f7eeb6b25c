//! `cargo xtask demo`: the limiter at work on a veth pair between two network namespaces.
//!
//! Three polite clients, one allow-listed client and one abusive client send UDP to a receiver
//! behind `limiter agent` (default policy: 100 packets per 1 s window). Every second a table
//! shows, per client, what it sent, what the receiver got, what the limiter dropped, and the
//! limiter's own view (`limiter stats --json`): the abusive client is cut to ~100 packets/s
//! while everyone else is untouched. Ctrl-C stops early; everything is cleaned up either way.
//!
//! Options: `--seconds N` (default 20, at most 600).

use std::{
    io::{IsTerminal as _, Write as _},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde_json::Value;

use crate::{
    agent::{Agent, find_client, limiter_bin},
    netns::{RECEIVER_V4, RECEIVER_V6, TestNet, sender_v4, sender_v6},
    traffic::send_udp_at_rate,
};

const PORT: u16 = 5300;
const DEFAULT_SECONDS: u64 = 20;
const MAX_SECONDS: u64 = 600;

const CONFIG: &str = "# limiter demo
mode: enforce
default: {limit: 100, window: 1s}
policies:
  - match: 198.18.0.20        # a trusted monitoring host
    action: pass
";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

struct Client {
    name: &'static str,
    addr: IpAddr,
    rate: f64,
    sent: Arc<AtomicU64>,
}

/// What the table shows for one client at one moment.
#[derive(Default, Clone, Copy)]
struct Sample {
    sent: u64,
    received: u64,
}

/// `demo [--seconds N]`.
#[derive(clap::Parser)]
#[command(about = "The limiter at work on a veth pair between two network namespaces (root)")]
pub struct Args {
    /// How long the clients send, in seconds.
    #[arg(long, default_value_t = DEFAULT_SECONDS,
          value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    pub seconds: u64,
}

/// Runs the demo for `args.seconds`.
pub fn run(args: &Args) -> Result<()> {
    let seconds = args.seconds;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and attaches XDP: run it as root");
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };

    let bin = limiter_bin();
    if !bin.is_file() {
        bail!(
            "no limiter binary at {} (set LIMITER_BIN or run `cargo xtask demo`)",
            bin.display()
        );
    }
    println!("limiter demo: setting up two network namespaces and a veth pair ...");
    let net = TestNet::new()?;
    let agent = Agent::start(&net, CONFIG)?;
    println!(
        "agent attached to {} ({}); policies:\n{CONFIG}",
        net.receiver_if,
        bin.display()
    );
    let counter = net.udp_counter(PORT)?;

    let clients = [
        ("polite-1", sender_v4(0).into(), 30.0),
        ("polite-2", sender_v4(1).into(), 45.0),
        ("polite-3 (v6)", sender_v6(2).into(), 60.0),
        ("trusted", sender_v4(10).into(), 300.0),
        ("abusive", sender_v4(3).into(), 2000.0),
    ]
    .map(|(name, addr, rate): (&str, IpAddr, f64)| Client {
        name,
        addr,
        rate,
        sent: Arc::default(),
    });

    let stop = Arc::new(AtomicBool::new(false));
    let duration = Duration::from_secs(seconds);
    let mut senders = Vec::new();
    for client in &clients {
        let socket = net.udp_sender(client.addr)?;
        let dst = match client.addr {
            IpAddr::V4(_) => SocketAddr::new(RECEIVER_V4.into(), PORT),
            IpAddr::V6(_) => SocketAddr::new(RECEIVER_V6.into(), PORT),
        };
        let (rate, stop, sent) = (client.rate, Arc::clone(&stop), Arc::clone(&client.sent));
        senders.push(thread::spawn(move || {
            send_udp_at_rate(&socket, dst, rate, duration, &stop, &sent)
        }));
    }

    let tty = std::io::stdout().is_terminal();
    let start = Instant::now();
    let mut previous = vec![Sample::default(); clients.len()];
    let mut tick = 1;
    while !INTERRUPTED.load(Ordering::Relaxed) && start.elapsed() < duration {
        let next = start + Duration::from_secs(tick);
        while Instant::now() < next && !INTERRUPTED.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(50).min(next - Instant::now()));
        }
        if INTERRUPTED.load(Ordering::Relaxed) {
            break;
        }
        let stats = agent.stats().unwrap_or(Value::Null);
        let now = samples(&clients, &counter);
        let mut out = String::new();
        if tty {
            out.push_str("\x1b[H\x1b[2J");
        }
        out.push_str(&format!(
            "limiter demo  t={tick:>3}s / {seconds}s   iface {}   (Ctrl-C stops)\n\n",
            net.receiver_if
        ));
        out.push_str(&table(&clients, &previous, &now, &stats));
        out.push_str(&global_line(&stats));
        print!("{out}");
        let _ = std::io::stdout().flush();
        previous = now;
        tick += 1;
    }

    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        match sender.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("a sender failed: {e:#}"),
            Err(_) => eprintln!("a sender panicked"),
        }
    }
    let elapsed = start.elapsed().as_secs_f64().max(1.0);
    counter.settle()?;
    let stats = agent.stats().unwrap_or(Value::Null);
    let totals = samples(&clients, &counter);
    if INTERRUPTED.load(Ordering::Relaxed) {
        println!("\ninterrupted; summary so far:");
    }
    println!("\nsummary after {elapsed:.1} s:\n");
    println!(
        "{:<14} {:<15} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "client", "address", "sent", "received", "dropped", "sent/s", "recv/s"
    );
    for (client, total) in clients.iter().zip(&totals) {
        let dropped = client_u64(&stats, client.addr, "dropped");
        println!(
            "{:<14} {:<15} {:>9} {:>9} {:>9} {:>10.1} {:>10.1}",
            client.name,
            client.addr.to_string(),
            total.sent,
            total.received,
            dropped,
            total.sent as f64 / elapsed,
            total.received as f64 / elapsed
        );
    }
    let abusive = clients.len() - 1;
    println!(
        "\nthe abusive client sent {:.0} packets/s and got {:.0}/s through (limit 100 per 1 s \
         window); the polite and the allow-listed clients lost nothing: {}",
        totals[abusive].sent as f64 / elapsed,
        totals[abusive].received as f64 / elapsed,
        if clients[..abusive]
            .iter()
            .zip(&totals)
            .all(|(_, t)| t.received == t.sent)
        {
            "yes"
        } else {
            "NO"
        }
    );
    drop(counter);
    drop(agent);
    drop(net);
    println!("cleaned up: agent stopped, pins and namespaces removed");
    Ok(())
}

fn samples(clients: &[Client], counter: &crate::traffic::PacketCounter) -> Vec<Sample> {
    let counts = counter.counts();
    clients
        .iter()
        .map(|c| Sample {
            sent: c.sent.load(Ordering::Relaxed),
            received: counts.get(&c.addr).copied().unwrap_or(0),
        })
        .collect()
}

fn client_u64(stats: &Value, addr: IpAddr, field: &str) -> u64 {
    find_client(stats, addr)
        .and_then(|c| c[field].as_u64())
        .unwrap_or(0)
}

fn window_text(ms: f64) -> String {
    if ms >= 1000.0 && ms % 1000.0 == 0.0 {
        format!("{}s", ms / 1000.0)
    } else {
        format!("{ms}ms")
    }
}

fn table(clients: &[Client], previous: &[Sample], now: &[Sample], stats: &Value) -> String {
    let mut out = format!(
        "{:<14} {:<15} {:>7} {:>7} {:>9} {:>9} {:>9} | {:<9} {:>8} {:>12}\n",
        "client",
        "address",
        "sent/s",
        "recv/s",
        "sent",
        "received",
        "dropped",
        "policy",
        "rate/s",
        "limit"
    );
    out.push_str(&"-".repeat(out.len() - 1));
    out.push('\n');
    for ((client, before), after) in clients.iter().zip(previous).zip(now) {
        let view = find_client(stats, client.addr);
        let field = |name: &str| view.map(|c| c[name].clone()).unwrap_or(Value::Null);
        let policy = match field("action").as_str() {
            Some("pass") => "allow".to_owned(),
            Some("drop") => "block".to_owned(),
            _ => field("policy").as_str().unwrap_or("-").to_owned(),
        };
        let limit = match (field("action").as_str(), field("limit").as_u64()) {
            (Some("limit"), Some(limit)) => format!(
                "{limit}/{}",
                window_text(field("window_ms").as_f64().unwrap_or(0.0))
            ),
            (Some(_), _) => "-".to_owned(),
            _ => String::new(),
        };
        // The sliding-window rate only means something for limited clients.
        let rate = match (field("action").as_str(), field("rate_per_s").as_f64()) {
            (Some("limit"), Some(rate)) => format!("{rate:.1}"),
            _ => "-".to_owned(),
        };
        out.push_str(&format!(
            "{:<14} {:<15} {:>7} {:>7} {:>9} {:>9} {:>9} | {:<9} {:>8} {:>12}\n",
            client.name,
            client.addr.to_string(),
            after.sent - before.sent,
            after.received - before.received,
            after.sent,
            after.received,
            field("dropped").as_u64().unwrap_or(0),
            policy,
            rate,
            limit
        ));
    }
    out
}

fn global_line(stats: &Value) -> String {
    let g = &stats["global"];
    let n = |k: &str| g[k].as_u64().unwrap_or(0);
    format!(
        "\nlimiter: generation {}, mode {}, passed {}, dropped {}, clients {}\n",
        stats["generation"].as_u64().unwrap_or(0),
        stats["mode"].as_str().unwrap_or("?"),
        n("passed"),
        n("dropped"),
        n("clients"),
    )
}
