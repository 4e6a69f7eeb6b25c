//! `limiter`: the agent and its command-line tools.

use std::{io::IsTerminal as _, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand, builder::TypedValueParser as _};
use limiter_user::{
    admission::Caps,
    agent::{self, AgentOptions},
    api::{self, ApiOptions, ConnectionLimits, TlsFiles},
    cli::{
        client::{self, Target, status_error},
        render::{
            self, action_name, client_table, global_client_table, show_duration, show_policy,
        },
    },
    datapath::{
        self, AttachMode, DEFAULT_MAX_CLIENTS, DEFAULT_MAX_GLOBAL_CLIENTS, DEFAULT_MAX_IDS,
        DEFAULT_MAX_LIMITED, Tables,
    },
    proto, stats,
};

/// The most entries `--max-clients`, `--max-limited`, `--max-ids` and `--max-global-clients`
/// take: 2^27, a map of 15 GiB at 120 bytes an entry. The kernel sizes a hash map's buckets as
/// the next power of two and refuses more than `U32_MAX / 16` of them (E2BIG,
/// kernel/bpf/hashtab.c `htab_map_alloc`), so 2^27 is the largest size it takes; and it
/// refuses only at the load, after the maps of another size pinned before were set aside: a
/// larger value is refused here, naming the option, before anything is touched.
const MAX_MAP_ENTRIES: i64 = 1 << 27;

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
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start; the agent's options are most of it"
)]
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
        #[arg(long, default_value_t = DEFAULT_MAX_CLIENTS, value_parser = clap::value_parser!(u32).range(1..=MAX_MAP_ENTRIES))]
        max_clients: u32,
        /// Directory of the client-state snapshot (`IFACE.snapshot`), restored after a reboot.
        #[arg(long, default_value = "/var/lib/limiter")]
        state_dir: PathBuf,
        /// How often client state is snapshotted, e.g. 5s, 500ms (also on shutdown); stretched
        /// to 20 times the last snapshot's CPU time if longer (at most 5% of a CPU).
        #[arg(long, default_value = "5s", value_parser = parse_interval)]
        snapshot_interval: Duration,
        /// Replace an XDP program of another tool already attached to the interface (without
        /// this, the agent refuses to start).
        #[arg(long)]
        replace: bool,
        /// Capacity of the never-evicted map that holds clients over their limit, so that a flood
        /// of new sources cannot evict them and reset their windows (120 bytes an entry).
        #[arg(long, default_value_t = DEFAULT_MAX_LIMITED, value_parser = clap::value_parser!(u32).range(1..=MAX_MAP_ENTRIES))]
        max_limited: u32,
        /// With a `cluster:` section: most global clients this node holds grants for, and most it
        /// owns (never evicted; ~100 bytes each in the kernel, and about 1.7 KiB each of the
        /// agent's own memory with their histories). A client past it keeps its cold share
        /// (safe; `limiter cluster status` counts them).
        #[arg(long, default_value_t = DEFAULT_MAX_GLOBAL_CLIENTS, value_parser = clap::value_parser!(u32).range(1..=MAX_MAP_ENTRIES))]
        max_global_clients: u32,
        /// Capacity of the map of API client IDs that are not addresses (LRU).
        #[arg(long, default_value_t = DEFAULT_MAX_IDS, value_parser = clap::value_parser!(u32).range(1..=MAX_MAP_ENTRIES))]
        max_ids: u32,
        /// The API's Unix socket (mode 0600) [default: /run/limiter/IFACE.sock].
        #[arg(long)]
        api_socket: Option<PathBuf>,
        /// Also serve the API on this TCP address; needs --api-token-file and/or the three
        /// --api-tls-* files (mutual TLS).
        #[arg(long)]
        api_listen: Option<SocketAddr>,
        /// File holding the admin bearer token (every method) TCP clients may send (mode 0600,
        /// 16+ characters).
        #[arg(long)]
        api_token_file: Option<PathBuf>,
        #[command(flatten)]
        access: AccessArgs,
        /// The API's TLS certificate (PEM).
        #[arg(long, requires = "api_tls_key")]
        api_tls_cert: Option<PathBuf>,
        /// The API's TLS private key (PEM).
        #[arg(long, requires = "api_tls_cert")]
        api_tls_key: Option<PathBuf>,
        /// CA (PEM) that client certificates must chain to (mutual TLS); without it, TLS only
        /// encrypts and clients authenticate with the bearer token.
        #[arg(long, requires = "api_tls_cert")]
        api_tls_client_ca: Option<PathBuf>,
        /// Most checks in one CheckBatch call.
        #[arg(long, default_value_t = api::DEFAULT_MAX_BATCH as u32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        api_max_batch: u32,
        /// TCP API connections served at once; past it a new one displaces the oldest that has
        /// made no authenticated call (limiter_connections_displaced_total), or is closed at once
        /// if all have (limiter_connections_refused_total). Lowered at start if the open-files
        /// limit cannot hold them.
        #[arg(long, default_value_t = api::DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..=1_000_000).map(|n| n as usize))]
        api_max_connections: usize,
        /// TCP API connections served at once from one source: an IPv4 address, or an IPv6 /64.
        #[arg(long, default_value_t = api::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS, value_parser = clap::value_parser!(u32).range(1..=1_000_000).map(|n| n as usize))]
        api_max_connections_per_address: usize,
        /// Time a TCP API connection has to complete TLS and make its first authenticated call
        /// before it is closed, e.g. 10s.
        #[arg(long, default_value = "10s", value_parser = parse_interval)]
        api_auth_timeout: Duration,
        /// Time a TCP API connection may stay without an authenticated call in flight before it
        /// is closed, e.g. 5m.
        #[arg(long, default_value = "5m", value_parser = parse_interval)]
        api_idle_timeout: Duration,
        /// Serve Prometheus metrics on http://ADDR/metrics.
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// Metrics connections served at once; more are closed at once and counted.
        #[arg(long, default_value_t = limiter_user::metrics::DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..=1_000_000).map(|n| n as usize))]
        metrics_max_connections: usize,
        /// Metrics connections served at once from one source: an IPv4 address, or an IPv6 /64.
        #[arg(long, default_value_t = limiter_user::metrics::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS, value_parser = clap::value_parser!(u32).range(1..=1_000_000).map(|n| n as usize))]
        metrics_max_connections_per_address: usize,
        /// Adaptive windows: read the CPU load from this file (`0.93` or `93%`, re-read every
        /// period) instead of measuring the machine's.
        #[arg(long)]
        load_file: Option<PathBuf>,
        #[command(flatten)]
        rls: RlsArgs,
    },
    /// Ask a running agent whether a client may spend HITS now (an IP address or any ID).
    Check {
        /// The client: an IP address (shares the budget of its packets) or an ID.
        id: String,
        /// Hits to spend; 0 only reads.
        #[arg(long, default_value_t = 1)]
        hits: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Change a running agent's policies (applied at once and kept in its policy overlay under
    /// --state-dir, merged over the config file, which is never written).
    Limits {
        #[command(subcommand)]
        command: LimitsCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The cluster a running agent is a member of: its members, which answer, and the share
    /// of each global policy it enforces.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// A live view of the busiest clients, refreshed every second.
    Top {
        /// How many clients.
        #[arg(short, default_value_t = 20)]
        n: u32,
        /// Stop after this many refreshes (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        iterations: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Detach the program pinned for an interface (even while an agent runs) and remove its
    /// pins: for uninstalling, or to stop enforcement that outlived a crashed agent.
    Detach {
        /// Interface to detach from.
        #[arg(long)]
        iface: String,
    },
    /// Print global counters and the busiest clients: from the pinned maps, or with --api (or
    /// without --iface) from a running agent's API.
    Stats {
        /// Interface the agent runs on.
        #[arg(long)]
        iface: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
        /// How many clients to list (0: all from the pinned maps with --iface; through the API
        /// at most 1000, and 0 asks for 1000).
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Envoy's rate limit service (`envoy.service.ratelimit.v3`), served by the agent.
#[derive(Args)]
struct RlsArgs {
    /// Serve Envoy's rate limit service (ShouldRateLimit, and grpc.health.v1) on this TCP
    /// address: plaintext h2c on a loopback address, elsewhere only with --rls-tls-cert and
    /// --rls-tls-key.
    #[arg(long, requires = "rls_config")]
    rls_listen: Option<SocketAddr>,
    /// The rate limit service's config, in envoyproxy/ratelimit's YAML: one file, or a
    /// directory whose *.yaml and *.yml files are read (one domain each). Changes are applied
    /// without restart; a config that does not load leaves the one in force.
    #[arg(long, requires = "rls_listen")]
    rls_config: Option<PathBuf>,
    /// Whether a descriptor whose only entry is `remote_address` (or `masked_remote_address`)
    /// is that address's client, spending the budget its packets spend under the agent's policy
    /// for it (`false`: a client of its own under the rule's limit).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    rls_address_clients: bool,
    /// Add RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset (and Retry-After when denied)
    /// to the rate limit service's answers, for Envoy to add to its responses.
    #[arg(long)]
    rls_headers: bool,
    /// File whose content is the body Envoy sends with a denial (raw_body).
    #[arg(long, requires = "rls_listen")]
    rls_deny_body: Option<PathBuf>,
    /// `global`: the rate limit service's rules are limits across the cluster (the agent's
    /// `cluster:` section), each agent enforcing its share ⌊L/N⌋, as a global policy's cold
    /// share, and a descriptor that grows hot enrolled by demand as a global client is (every
    /// agent must serve the same rules; at most 1,023 distinct limits); `local`: each agent the
    /// whole limit.
    #[arg(long, value_enum, default_value_t = RlsScope::Local, requires = "rls_listen")]
    rls_scope: RlsScope,
    /// Most metrics series keyed by request values (rules with `detailed_metric: true`, and
    /// descriptors with their own `limit`); hits of keys beyond it are counted in
    /// limiter_rls_unrecorded_hits_total.
    #[arg(
        long,
        default_value_t = limiter_user::rls::hits::DEFAULT_MAX_DETAILED_SERIES,
        value_name = "N"
    )]
    rls_metrics_max_detailed: usize,
    /// Threads serving the rate limit service, each with its own connections (Envoy keeps one
    /// per worker) and a single-threaded runtime of its own. Default: half the CPUs, at least
    /// one (Envoy, on the same host, needs the others).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    rls_threads: Option<u16>,
    /// The rate limit service's TLS certificate (PEM).
    #[arg(long, requires_all = ["rls_tls_key", "rls_listen"])]
    rls_tls_cert: Option<PathBuf>,
    /// The rate limit service's TLS private key (PEM).
    #[arg(long, requires = "rls_tls_cert")]
    rls_tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to (mutual TLS: Envoy authenticates with
    /// its certificate; the protocol carries no token).
    #[arg(long, requires = "rls_tls_cert")]
    rls_tls_client_ca: Option<PathBuf>,
}

/// What a rate limit service rule limits (`--rls-scope`).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RlsScope {
    Local,
    Global,
}

impl RlsArgs {
    fn options(self) -> anyhow::Result<Option<limiter_user::rls::listen::RlsAgentOptions>> {
        let (Some(listen), Some(config)) = (self.rls_listen, self.rls_config) else {
            return Ok(None);
        };
        let deny_body = match &self.rls_deny_body {
            None => None,
            Some(path) => Some(
                limiter_user::capped_read::read_to_string(path, 64 * 1024, "--rls-deny-body")?
                    .into_bytes(),
            ),
        };
        let tls = match (self.rls_tls_cert, self.rls_tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca: self.rls_tls_client_ca,
            }),
            _ => None,
        };
        Ok(Some(limiter_user::rls::listen::RlsAgentOptions {
            listen,
            config,
            tls,
            service: limiter_user::rls::service::RlsOptions {
                address_clients: self.rls_address_clients,
                headers: self.rls_headers,
                deny_body,
                global: self.rls_scope == RlsScope::Global,
            },
            max_detailed_series: self.rls_metrics_max_detailed,
            threads: self
                .rls_threads
                .map_or_else(limiter_user::rls::listen::default_threads, usize::from),
        }))
    }
}

/// The agent's API roles beyond the admin token, its per-caller limits and check threads.
#[derive(Args)]
struct AccessArgs {
    /// File holding the check role's bearer token (mode 0600, 16+ characters): Check,
    /// CheckBatch, health and reflection only; other methods answer PERMISSION_DENIED.
    #[arg(long, requires = "api_listen")]
    api_check_token_file: Option<PathBuf>,
    /// With mutual TLS: a client certificate common name (CN) with the admin role; repeat for
    /// more. With neither this nor --api-check-subject, every certificate of the CA is admin.
    #[arg(long, value_name = "CN", requires = "api_tls_client_ca")]
    api_admin_subject: Vec<String>,
    /// With mutual TLS: a client certificate common name (CN) with the check role; repeat for
    /// more. Certificates whose CN has no role are refused (PERMISSION_DENIED).
    #[arg(long, value_name = "CN", requires = "api_tls_client_ca")]
    api_check_subject: Vec<String>,
    /// API calls per second per TCP caller (role and peer address, or certificate subject), a
    /// CheckBatch counting one call per check; `off` for no limit. The Unix socket is exempt.
    #[arg(long, default_value_t = PerSecond::On(api::DEFAULT_CALLER_RATE), value_parser = parse_per_second)]
    api_caller_rate: PerSecond,
    /// Calls a TCP caller may make at once above its rate [default: the rate, at least
    /// --api-max-batch].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    api_caller_burst: Option<u32>,
    /// Client entries in the packet path's map one TCP caller's checks may create per second
    /// (checks of addresses with an entry are not counted); `off` for no cap. Over the cap a
    /// call answers RESOURCE_EXHAUSTED and checks nothing.
    #[arg(long, default_value_t = PerSecond::On(api::DEFAULT_NEW_CLIENTS_PER_SECOND), value_parser = parse_per_second)]
    api_new_clients_per_second: PerSecond,
    /// Threads that run checks (BPF_PROG_TEST_RUN), per lane: TCP callers share one lane, the
    /// Unix socket has its own [default: one per CPU].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
    api_check_threads: Option<u32>,
    /// Calls per lane that may wait for a check thread; more answer RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = api::DEFAULT_CHECK_QUEUE as u32, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    api_check_queue: u32,
}

/// A per-second rate flag: a positive number, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PerSecond {
    On(u32),
    Off,
}

impl std::fmt::Display for PerSecond {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PerSecond::On(n) => write!(f, "{n}"),
            PerSecond::Off => f.write_str("off"),
        }
    }
}

fn parse_per_second(s: &str) -> Result<PerSecond, String> {
    if s == "off" {
        return Ok(PerSecond::Off);
    }
    match s.parse::<u32>() {
        Ok(n) if n > 0 => Ok(PerSecond::On(n)),
        _ => Err(format!(
            "{s:?} is not a positive number per second or `off`"
        )),
    }
}

impl AccessArgs {
    /// The API's access options; `check_token` read from its file by the caller.
    fn options(
        &self,
        check_token: Option<String>,
        max_batch: u32,
    ) -> anyhow::Result<api::AccessOptions> {
        let positive = |n: u32| std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN);
        let caller_rate = match self.api_caller_rate {
            PerSecond::Off => None,
            PerSecond::On(n) => {
                let burst = self.api_caller_burst.unwrap_or(n.max(max_batch));
                if burst < max_batch {
                    anyhow::bail!(
                        "--api-caller-burst {burst} is below --api-max-batch {max_batch}: a full CheckBatch could never pass"
                    );
                }
                Some(api::Rate {
                    per_second: positive(n),
                    burst: positive(burst),
                })
            }
        };
        if caller_rate.is_none() && self.api_caller_burst.is_some() {
            anyhow::bail!("--api-caller-burst needs a rate: --api-caller-rate is off");
        }
        let new_clients = match self.api_new_clients_per_second {
            PerSecond::Off => None,
            PerSecond::On(n) => Some(api::Rate {
                per_second: positive(n),
                burst: positive(n),
            }),
        };
        Ok(api::AccessOptions {
            check_token,
            admin_subjects: self.api_admin_subject.clone(),
            check_subjects: self.api_check_subject.clone(),
            caller_rate,
            new_clients,
            check_threads: self
                .api_check_threads
                .map_or_else(api::default_check_threads, |n| n as usize),
            check_queue: self.api_check_queue as usize,
        })
    }
}

/// How the client commands reach the agent.
#[derive(Args, Clone)]
struct ApiArgs {
    /// The agent's API: a Unix socket path or an http(s):// URL [default: the only socket in
    /// /run/limiter; for `stats`, the socket of its --iface].
    #[arg(long, global = true)]
    api: Option<String>,
    /// File with the bearer token (TCP).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// CA certificate that signed the agent's (https).
    #[arg(long, global = true)]
    tls_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS.
    #[arg(long, global = true, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Client key for mutual TLS.
    #[arg(long, global = true, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl ApiArgs {
    fn target(&self, iface: Option<&str>) -> Target {
        Target {
            api: self.api.clone(),
            iface: iface.map(str::to_string),
            token_file: self.token_file.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
        }
    }
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// This node, its phase, the member count, each peer and each global policy's share.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum LimitsCommand {
    /// Create or replace the policy for MATCH (`default`, a CIDR, an address or an ID).
    Set {
        #[arg(value_name = "MATCH")]
        matches: String,
        /// Hits per window (0 blocks).
        #[arg(long)]
        limit: Option<u32>,
        /// Window, e.g. 500ms, 1s, 1m.
        #[arg(long)]
        window: Option<String>,
        /// `limit` (the default), `pass` (never limited) or `drop` (always dropped).
        #[arg(long, default_value = "limit")]
        action: String,
    },
    /// Show the policy for MATCH.
    Get {
        #[arg(value_name = "MATCH")]
        matches: String,
    },
    /// Remove the policy for MATCH: the one set through the API (the config file's, if it has
    /// one, is then in force again), else the config file's. `default` removes the one set
    /// through the API.
    Rm {
        #[arg(value_name = "MATCH")]
        matches: String,
    },
    /// List the policies (the default first), each with its layer: `file`, `overlay` (set
    /// through the API) or `overlay (overrides file)`.
    Ls,
    /// Print the policies in force as a config file (YAML), to fold the changes made through
    /// the API into the config file.
    Effective,
}

/// `--snapshot-interval`: a duration with a unit, 100ms to 1h.
fn parse_interval(s: &str) -> Result<Duration, String> {
    let micros = limiter_user::duration::parse_duration_us(s, "interval")?;
    let d = Duration::from_micros(micros as u64);
    if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&d) {
        return Err(format!(
            "interval {s:?} is out of range: it must be 100ms to 1h"
        ));
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
            max_ids,
            max_limited,
            max_global_clients,
            api_socket,
            api_listen,
            api_token_file,
            access,
            api_tls_cert,
            api_tls_key,
            api_tls_client_ca,
            api_max_batch,
            api_max_connections,
            api_max_connections_per_address,
            api_auth_timeout,
            api_idle_timeout,
            metrics,
            metrics_max_connections,
            metrics_max_connections_per_address,
            load_file,
            rls,
        } => {
            let rls = rls.options()?;
            let (token, check_token) = api::read_tokens(
                api_token_file.as_deref(),
                access.api_check_token_file.as_deref(),
            )?;
            let access = access.options(check_token, api_max_batch)?;
            let tls = match (api_tls_cert, api_tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert,
                    key,
                    client_ca: api_tls_client_ca,
                }),
                _ => None,
            };
            let authenticated = token.is_some()
                || access.check_token.is_some()
                || tls.as_ref().is_some_and(|t| t.client_ca.is_some());
            if api_listen.is_some() && !authenticated {
                anyhow::bail!(
                    "--api-listen needs --api-token-file, --api-check-token-file or --api-tls-client-ca (mutual TLS): the TCP API is never served without authentication"
                );
            }
            // Two workers: API calls are served while the agent's own loop runs.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let api = ApiOptions {
                socket: api_socket.unwrap_or_else(|| api::default_socket(&iface)),
                listen: api_listen,
                token,
                tls,
                max_batch: api_max_batch as usize,
                connections: ConnectionLimits {
                    caps: Caps {
                        total: api_max_connections,
                        per_source: api_max_connections_per_address.min(api_max_connections),
                    },
                    auth_timeout: api_auth_timeout,
                    idle_timeout: api_idle_timeout,
                },
                access,
            };
            // Bad role options (a subject in both roles, ...) stop the start here.
            api.credentials()?;
            runtime.block_on(agent::run(AgentOptions {
                iface,
                config,
                mode: xdp_mode,
                max_clients,
                max_ids,
                max_limited,
                max_global_clients,
                state_dir,
                snapshot_interval,
                replace,
                api,
                metrics,
                metrics_caps: Caps {
                    total: metrics_max_connections,
                    per_source: metrics_max_connections_per_address.min(metrics_max_connections),
                },
                load_file,
                rls,
            }))
        }
        Command::Check { id, hits, api } => block_on(check(id, hits, api.target(None))),
        Command::Limits { command, api } => block_on(limits(command, api.target(None))),
        Command::Cluster {
            command: ClusterCommand::Status { json },
            api,
        } => block_on(cluster_status(json, api.target(None))),
        Command::Top { n, iterations, api } => block_on(top(n, iterations, api.target(None))),
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
        Command::Stats {
            iface,
            api,
            top,
            json,
        } => {
            let Some(iface) = iface.filter(|_| api.api.is_none()) else {
                return block_on(remote_stats(top, json, api.target(None)));
            };
            let tables = Tables::open_pinned(&iface)?;
            let snapshot = stats::report(&tables, &iface, top)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot)?);
            } else {
                print!("{}", render::report(&snapshot));
            }
            Ok(())
        }
    }
}

fn block_on(f: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

async fn check(id: String, hits: u32, target: Target) -> anyhow::Result<()> {
    let mut c = client::connect(&target).await?;
    let r = c
        .rate_limiter
        .check(proto::CheckRequest {
            client_id: id.clone(),
            hits: Some(hits),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "{id}: {}{}  limit {}{} per {}  remaining {}  reset in {}  retry in {}  (policy {}, {})",
        if r.allowed { "allowed" } else { "denied" },
        if r.dry_run_denied {
            " (dry-run: would be denied)"
        } else {
            ""
        },
        r.limit,
        r.global_limit
            .map(|g| format!(" (this node's share of {g} across the cluster)"))
            .unwrap_or_default(),
        show_duration(r.window.as_ref()),
        r.remaining,
        show_duration(r.reset_after.as_ref()),
        show_duration(r.retry_after.as_ref()),
        r.policy,
        action_name(r.action),
    );
    if !r.allowed {
        // A distinct status so scripts can branch on the decision.
        std::process::exit(3);
    }
    Ok(())
}

async fn limits(command: LimitsCommand, target: Target) -> anyhow::Result<()> {
    let mut c = client::connect(&target).await?;
    match command {
        LimitsCommand::Set {
            matches,
            limit,
            window,
            action,
        } => {
            let action = match action.as_str() {
                "limit" => proto::Action::Limit,
                "pass" => proto::Action::Pass,
                "drop" => proto::Action::Drop,
                other => anyhow::bail!("--action {other:?}: expected limit, pass or drop"),
            };
            let window = window
                .map(|w| {
                    w.parse::<limiter_user::config::Window>()
                        .map_err(|e| anyhow::anyhow!("--window: {e}"))
                })
                .transpose()?
                .map(|w| prost_types::Duration {
                    seconds: (w.micros / 1_000_000) as i64,
                    nanos: (w.micros % 1_000_000) as i32 * 1000,
                });
            let change = c
                .limits
                .set(proto::SetLimitRequest {
                    policy: Some(proto::Policy {
                        r#match: matches,
                        limit,
                        window,
                        action: action as i32,
                    }),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if let Some(p) = change.policy {
                println!("set {} (generation {})", show_policy(&p), change.generation);
            }
        }
        LimitsCommand::Get { matches } => {
            let p = c
                .limits
                .get(proto::GetLimitRequest { r#match: matches })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", show_policy(&p));
        }
        LimitsCommand::Rm { matches } => {
            let change = c
                .limits
                .delete(proto::DeleteLimitRequest { r#match: matches })
                .await
                .map_err(status_error)?
                .into_inner();
            if let Some(p) = change.policy {
                let restored = change.kind == proto::limit_change::Kind::Set as i32;
                println!(
                    "{} {} (generation {})",
                    if restored {
                        "removed the API's policy; in force again from the config file:"
                    } else {
                        "removed"
                    },
                    show_policy(&p),
                    change.generation
                );
            }
        }
        LimitsCommand::Ls => {
            let list = c
                .limits
                .list(proto::ListLimitsRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            print!("{}", render::policy_table(&list));
        }
        LimitsCommand::Effective => {
            let effective = c
                .limits
                .effective(proto::EffectiveConfigRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            print!("{}", effective.yaml);
        }
    }
    Ok(())
}

async fn cluster_status(json: bool, target: Target) -> anyhow::Result<()> {
    let mut c = client::connect(&target).await?;
    let s = c
        .cluster
        .status(proto::ClusterStatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let ms = |d: Option<&prost_types::Duration>| {
        d.map(|d| d.seconds as f64 * 1e3 + d.nanos as f64 / 1e6)
    };
    if json {
        let out = serde_json::json!({
            "configured": s.configured, "not_taken_up": s.not_taken_up,
            "sync_interval_ms": ms(s.sync_interval.as_ref()),
            "peer_timeout_ms": ms(s.peer_timeout.as_ref()),
            "node_id": s.node_id, "incarnation": s.incarnation,
            "listen": s.listen, "phase": s.phase, "partition": s.partition,
            "members": s.members, "agreed_members": s.agreed_members,
            "views_agree": s.views_agree,
            "peers": s.peers.iter().map(|p| serde_json::json!({
                "address": p.address, "node_id": p.node_id, "live": p.live,
                "since_ms": ms(p.since.as_ref()), "incarnation": p.incarnation,
                "members": p.members, "agrees": p.agrees, "differs": p.differs,
                "rtt_ms": ms(p.rtt.as_ref()),
            })).collect::<Vec<_>>(),
            "policies": s.policies.iter().map(|g| serde_json::json!({
                "match": g.r#match, "limit": g.limit, "share": g.share,
                "window_ms": ms(g.window.as_ref()),
            })).collect::<Vec<_>>(),
            "enrolment": s.enrolment.as_ref().map(|e| serde_json::json!({
                "owned": e.owned, "held": e.held, "granted": e.granted,
                "refused": e.refused, "foreign": e.foreign, "unwritten": e.unwritten,
                "learning": e.learning, "raises_lapsed": e.raises_lapsed,
                "capped": e.capped,
            })),
            "traffic": s.traffic.as_ref().map(|t| serde_json::json!({
                "rounds": t.rounds, "round_time_ms": ms(t.round_time.as_ref()),
                "bytes_sent": t.bytes_sent, "bytes_received": t.bytes_received,
                "heartbeats_failed": t.heartbeats_failed,
            })),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if !s.configured {
        if s.not_taken_up.is_empty() {
            println!("not a cluster member: the config has no `cluster:` section");
        } else {
            println!("not a cluster member: {}", s.not_taken_up);
        }
        return Ok(());
    }
    if !s.not_taken_up.is_empty() {
        println!("NOT TAKEN UP: {}", s.not_taken_up);
    }
    println!(
        "node {}  incarnation {}  listen {}  sync_interval {}  peer_timeout {}\nphase {}  \
         partition {}  members {} (agreed {}){}",
        s.node_id,
        s.incarnation,
        s.listen,
        show_duration(s.sync_interval.as_ref()),
        show_duration(s.peer_timeout.as_ref()),
        s.phase,
        s.partition,
        s.members,
        s.agreed_members,
        if s.views_agree { "" } else { "  VIEWS DIFFER" }
    );
    println!(
        "\n{:<28} {:<20} {:<5} {:>10} {:>10} {:>8}",
        "PEER", "NODE", "LIVE", "SINCE", "RTT", "MEMBERS"
    );
    for p in &s.peers {
        println!(
            "{:<28} {:<20} {:<5} {:>10} {:>10} {:>8}{}",
            if p.address.is_empty() {
                "(heard only)"
            } else {
                &p.address
            },
            if p.node_id.is_empty() {
                "?"
            } else {
                &p.node_id
            },
            if p.live { "yes" } else { "no" },
            show_duration(p.since.as_ref()),
            show_duration(p.rtt.as_ref()),
            p.members,
            match (p.agrees || p.node_id.is_empty(), p.differs.is_empty()) {
                (true, _) => String::new(),
                (false, true) => "  differs".to_string(),
                (false, false) => format!("  differs: {}", p.differs.join(", ")),
            }
        );
    }
    println!(
        "\n{:<40} {:>10} {:>10} {:>10}",
        "GLOBAL POLICY", "LIMIT", "SHARE", "WINDOW"
    );
    for g in &s.policies {
        println!(
            "{:<40} {:>10} {:>10} {:>10}",
            g.r#match,
            g.limit,
            g.share,
            show_duration(g.window.as_ref())
        );
    }
    if let Some(e) = &s.enrolment {
        println!(
            "\nenrolment: owns {} hot clients, holds {} ({} with a grant in force); refused {} \
             (--max-global-clients), ignored {} grant messages (not the owner's, or not under the \
             client's global policy); the maps refused {} \
             grant changes",
            e.owned, e.held, e.granted, e.refused, e.foreign, e.unwritten
        );
        println!(
            "  {} owned in learning mode; {} raises held here ran out before a newer grant; {} capped \
             by adaptation (overloaded)",
            e.learning, e.raises_lapsed, e.capped
        );
    }
    if let Some(t) = &s.traffic {
        println!(
            "sync: {} rounds ({} in all), {} bytes sent, {} received, {} heartbeats unanswered",
            t.rounds,
            show_duration(t.round_time.as_ref()),
            t.bytes_sent,
            t.bytes_received,
            t.heartbeats_failed
        );
    }
    Ok(())
}

async fn remote_stats(top: usize, json: bool, target: Target) -> anyhow::Result<()> {
    let mut c = client::connect(&target).await?;
    let g = c
        .stats
        .global(proto::GlobalStatsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let clients = c
        .stats
        .top(proto::TopRequest {
            n: u32::try_from(top).unwrap_or(u32::MAX),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .clients;
    if json {
        let rows: Vec<serde_json::Value> = clients
            .iter()
            .map(|c| {
                let window_s = c
                    .window
                    .as_ref()
                    .map_or(0.0, |d| d.seconds as f64 + d.nanos as f64 / 1e9);
                // `addr`, `static` and `rate_per_s` as `limiter stats --iface` names them.
                serde_json::json!({
                    "client": c.client_id, "addr": c.client_id, "static": c.is_static,
                    "limited": c.limited,
                    "rate_per_s": if window_s > 0.0 { c.estimate as f64 / window_s } else { 0.0 },
                    "policy": c.policy, "action": action_name(c.action),
                    "limit": c.limit, "allowance": c.limit, "estimate": c.estimate,
                    "remaining": (c.limit as u64).saturating_sub(c.estimate),
                    "scale": c.scale, "utilisation": c.utilisation,
                    "passed": c.passed, "dropped": c.dropped,
                    "window_ms": c.window.as_ref().map_or(0.0, |d| d.seconds as f64 * 1e3 + d.nanos as f64 / 1e6),
                    "cluster": c.cluster.as_ref().map(|g| serde_json::json!({
                        "global_limit": g.global_limit, "share": g.share, "grant": g.grant,
                        "owner": g.owner, "demand": g.demand, "cluster_demand": g.cluster_demand,
                    })),
                })
            })
            .collect();
        let out = serde_json::json!({
            "global": {
                "passed": g.packets_passed, "dropped": g.packets_dropped, "non_ip": g.packets_non_ip,
                "malformed": g.packets_malformed, "new_clients": g.clients_created, "map_full": g.map_full,
                "limited_moves": g.limited_moves, "limited_full": g.limited_full,
                "limited": g.clients_limited, "clients": g.clients_resident, "ids": g.ids_resident, "checks_allowed": g.checks_allowed,
                "checks_denied": g.checks_denied, "config_reloads": g.config_reloads,
                "config_rejects": g.config_rejects,
            },
            "adaptive": {
                "enabled": g.adaptive, "cpu": g.cpu, "load_factor": g.load_factor,
                "tracked": g.adaptive_tracked,
            },
            "generation": g.policy_generation, "dry_run": g.dry_run, "attached": g.attached,
            "clients": rows,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "mode {}  generation {}  attached {}\npackets passed {}  dropped {}  non-IP {}  malformed {}\nclients {}  IDs {}  created {}  map-full {}\nlimited: held {}  moved in {}  refused (map full) {}\nchecks allowed {}  denied {}  config reloads {}  rejects {}\n{}\n",
            if g.dry_run { "dry-run" } else { "enforce" },
            g.policy_generation,
            g.attached,
            g.packets_passed,
            g.packets_dropped,
            g.packets_non_ip,
            g.packets_malformed,
            g.clients_resident,
            g.ids_resident,
            g.clients_created,
            g.map_full,
            g.clients_limited,
            g.limited_moves,
            g.limited_full,
            g.checks_allowed,
            g.checks_denied,
            g.config_reloads,
            g.config_rejects,
            if g.adaptive {
                format!(
                    "adaptive: cpu {:.0}%  load factor {:.3}  tracking {} clients",
                    g.cpu * 100.0,
                    g.load_factor,
                    g.adaptive_tracked
                )
            } else {
                "adaptive: off".to_string()
            }
        );
        print!("{}", client_table(&clients));
        print!("{}", global_client_table(&clients));
    }
    Ok(())
}

async fn top(n: u32, iterations: u64, target: Target) -> anyhow::Result<()> {
    let mut c = client::connect(&target).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let tty = std::io::stdout().is_terminal();
    let mut done = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let g = c
            .stats
            .global(proto::GlobalStatsRequest {})
            .await
            .map_err(status_error)?
            .into_inner();
        let clients = c
            .stats
            .top(proto::TopRequest { n })
            .await
            .map_err(status_error)?
            .into_inner()
            .clients;
        if tty {
            // Clear the screen and go home.
            print!("\x1b[2J\x1b[H");
        }
        println!(
            "limiter top  packets passed {}  dropped {}  clients {}  held {}  IDs {}  checks allowed {}  denied {}\n",
            g.packets_passed,
            g.packets_dropped,
            g.clients_resident,
            g.clients_limited,
            g.ids_resident,
            g.checks_allowed,
            g.checks_denied
        );
        print!("{}", client_table(&clients));
        done += 1;
        if iterations != 0 && done >= iterations {
            return Ok(());
        }
    }
}

fn main() -> ExitCode {
    // A command's output piped into `head` ends quietly when the pipe closes, as other tools'
    // does, instead of panicking in `println!` (Rust's runtime ignores SIGPIPE). The agent
    // ignores it again: a peer or an API client that goes away must not kill it.
    // SAFETY: setting a signal's disposition, before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    if matches!(cli.command, Command::Agent { .. }) {
        // SAFETY: as above.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    }
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
