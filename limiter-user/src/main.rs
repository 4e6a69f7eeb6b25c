//! `limiter`: the agent and its command-line tools.

use std::{io::IsTerminal as _, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand, builder::TypedValueParser as _};
use limiter_user::{
    admission::Caps,
    agent::{self, AgentOptions},
    api::{self, ApiOptions, ConnectionLimits, TlsFiles},
    cli::{
        check::check,
        client::Target,
        cluster, limits, render,
        stats::{remote_stats, top},
    },
    datapath::{
        self, AttachMode, DEFAULT_MAX_CLIENTS, DEFAULT_MAX_GLOBAL_CLIENTS, DEFAULT_MAX_IDS,
        DEFAULT_MAX_LIMITED, Tables,
    },
    stats,
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
    /// Answer with dynamic metadata, as envoyproxy/ratelimit's RESPONSE_DYNAMIC_METADATA: the
    /// request's domain, descriptors and hits, and the `metadata` of the rules whose
    /// descriptors passed, for Envoy to store under its rate limit filter's namespace.
    #[arg(long, requires = "rls_listen")]
    rls_dynamic_metadata: bool,
    /// `global`: the rate limit service's rules are limits across the cluster (the agent's
    /// `cluster:` section), each agent enforcing its share ⌊L/N⌋, as a global policy's cold
    /// share, and a descriptor that grows hot enrolled by demand as a global client is (every
    /// agent must serve the same rules; at most 1,023 distinct limits); `local`: each agent the
    /// whole limit.
    #[arg(long, value_enum, default_value_t = RlsScope::Local, requires = "rls_listen")]
    rls_scope: RlsScope,
    /// Most metrics series keyed by request values (rules with `detailed_metric: true` or
    /// `value_to_metric: true`, and descriptors with their own `limit`); hits of keys beyond it are counted in
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
                dynamic_metadata: self.rls_dynamic_metadata,
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
    /// Threads that run large CheckBatches (more than 124 checks; smaller ones and single
    /// checks are decided on the async runtime), per lane: TCP callers share one lane, the Unix
    /// socket has its own [default: one per CPU].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
    api_check_threads: Option<u32>,
    /// Large CheckBatches per lane that may wait for a check thread; more answer
    /// RESOURCE_EXHAUSTED.
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
    /// Stop counting a decommissioned member (its host gone, or its program detached): a
    /// member a `peers` endpoint answered as counts for the life of the agent otherwise. Remove
    /// it from `peers` first, and run this on every agent.
    Forget {
        /// The member's `node_id`, as `limiter cluster status` lists it.
        #[arg(value_name = "NODE_ID")]
        node_id: String,
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
        /// `local` or `global`: refuse the change unless the policy has this scope (which only
        /// the config file sets; a policy it does not have is local).
        #[arg(long)]
        scope: Option<String>,
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
        Command::Check { id, hits, api } => {
            if !block_on(check(id, hits, api.target(None)))? {
                // A distinct status so scripts can branch on the decision.
                std::process::exit(3);
            }
            Ok(())
        }
        Command::Limits { command, api } => {
            let target = api.target(None);
            match command {
                LimitsCommand::Set {
                    matches,
                    limit,
                    window,
                    action,
                    scope,
                } => block_on(limits::set(matches, limit, window, action, scope, target)),
                LimitsCommand::Get { matches } => block_on(limits::get(matches, target)),
                LimitsCommand::Rm { matches } => block_on(limits::rm(matches, target)),
                LimitsCommand::Ls => block_on(limits::ls(target)),
                LimitsCommand::Effective => block_on(limits::effective(target)),
            }
        }
        Command::Cluster { command, api } => match command {
            ClusterCommand::Status { json } => block_on(cluster::status(json, api.target(None))),
            ClusterCommand::Forget { node_id } => {
                block_on(cluster::forget(node_id, api.target(None)))
            }
        },
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

fn block_on<T>(f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
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
