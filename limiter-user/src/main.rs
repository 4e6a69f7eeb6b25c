//! `limiter`: the agent and its command-line tools.

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use limiter_user::{
    agent::{self, AgentOptions},
    datapath::{self, AttachMode, DEFAULT_MAX_CLIENTS, Tables},
    stats,
};

#[derive(Parser)]
#[command(
    name = "limiter",
    version,
    about = "Per-client packet rate limiting in XDP"
)]
struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the XDP program on an interface, apply the policies in FILE and keep them
    /// in step with it until SIGINT/SIGTERM.
    Agent {
        /// Interface to attach to.
        #[arg(long)]
        iface: String,
        /// YAML policy file; changes are applied without restart.
        #[arg(long)]
        config: PathBuf,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
        xdp_mode: AttachMode,
        /// Capacity of the dynamic-client map (least recently used clients are evicted).
        #[arg(long, default_value_t = DEFAULT_MAX_CLIENTS, value_parser = clap::value_parser!(u32).range(1..))]
        max_clients: u32,
        /// Directory of the client-state snapshot (`IFACE.snapshot`), restored after a reboot.
        #[arg(long, default_value = "/var/lib/limiter")]
        state_dir: PathBuf,
        /// How often client state is snapshotted, e.g. 5s, 500ms (also on shutdown).
        #[arg(long, default_value = "5s", value_parser = parse_interval)]
        snapshot_interval: Duration,
        /// Replace an XDP program of another tool already attached to the interface (without
        /// this, the agent refuses to start).
        #[arg(long)]
        replace: bool,
    },
    /// Detach the program pinned for an interface (even while an agent runs) and remove its
    /// pins: for uninstalling, or to stop enforcement that outlived a crashed agent.
    Detach {
        /// Interface to detach from.
        #[arg(long)]
        iface: String,
    },
    /// Print global counters and the busiest clients (reads the pinned maps).
    Stats {
        /// Interface the agent runs on.
        #[arg(long)]
        iface: String,
        /// How many clients to list (0: all).
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// `--snapshot-interval`: a duration with a unit, 100ms to 1h.
fn parse_interval(s: &str) -> Result<Duration, String> {
    let window: limiter_user::policy::Window = s.parse()?;
    let d = Duration::from_micros(window.micros as u64);
    if d < Duration::from_millis(100) {
        return Err(format!("{s:?} is too short: at least 100ms"));
    }
    Ok(d)
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent {
            iface,
            config,
            xdp_mode,
            max_clients,
            state_dir,
            snapshot_interval,
            replace,
        } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(agent::run(AgentOptions {
                iface,
                config,
                mode: xdp_mode,
                max_clients,
                state_dir,
                snapshot_interval,
                replace,
            }))
        }
        Command::Detach { iface } => {
            datapath::check_environment()?;
            if datapath::detach_pinned(&iface)? {
                println!(
                    "detached limiter from {iface} and removed {}",
                    datapath::pin_dir(&iface).display()
                );
            } else {
                println!("nothing to detach: no limiter pins for {iface}");
            }
            Ok(())
        }
        Command::Stats { iface, top, json } => {
            let tables = Tables::open_pinned(&iface)?;
            let snapshot = stats::snapshot(&tables, &iface, top)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot)?);
            } else {
                print!("{}", snapshot.render());
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
