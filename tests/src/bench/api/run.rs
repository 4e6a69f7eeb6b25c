//! The whole benchmark (`api-bench run`): the namespace, the three systems, every case per round.

use std::{
    fs,
    io::Write as _,
    net::SocketAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::load::LoadReport;
use super::placement::{Cpus, Placement, RedisRole, Servers, generator_cpus};
use super::process::{
    Daemon, TempDir, check_interrupted, find_executable, in_ns, listening, on_signal, output_of,
    random_token, tail,
};
use super::redis::{build_redis_cell, redis_benchmark, target_dir};
use super::report::{Measurement, ReportInput, Row, Rows, report};
use super::{
    BATCH, BATCH_CONCURRENCY, FLOOR_ADDR, IdKind, LIMIT, LIMITER_ADDR, Mode, Only,
    REDIS_CELL_VERSION, REDIS_PORT, RLS_ADDR, RLS_CONCURRENCY, RLS_REDIS_ADDR, RunArgs,
    UNARY_CONCURRENCY, limiter_config, limiter_deny_config, rls_config,
};
use crate::{
    agent::{Agent, agent_has_option, limiter_bin},
    bench::report::{date, read_trimmed},
    netns::TestNet,
};

/// The gRPC services under test.
pub(super) struct Target {
    pub(super) system: String,
    pub(super) addr: &'static str,
    pub(super) token: Option<String>,
    pub(super) id_kind: IdKind,
    /// `--mode rls`: half of the paths denied (`load --free-half`).
    pub(super) free_half: bool,
}

pub(super) struct Bench<'a> {
    pub(super) args: &'a RunArgs,
    pub(super) ns: String,
    pub(super) exe: PathBuf,
    /// Every CPU of the run.
    pub(super) all: Cpus,
}

impl Bench<'_> {
    /// Runs one `load` in the namespace.
    pub(super) fn load(
        &self,
        target: &Target,
        placement: Placement,
        mode: Mode,
        concurrency: usize,
    ) -> Result<LoadReport> {
        check_interrupted()?;
        let mut command = in_ns(&self.ns, &self.exe);
        generator_cpus(placement, &self.all).apply_to_command(&mut command);
        command.args([
            "load".to_owned(),
            "--target".to_owned(),
            format!("http://{}", target.addr),
            "--concurrency".to_owned(),
            concurrency.to_string(),
            "--duration".to_owned(),
            format!("{}ms", self.args.duration.as_millis()),
            "--warmup".to_owned(),
            format!("{}ms", self.args.warmup.as_millis()),
            "--mode".to_owned(),
            format!("{mode:?}").to_lowercase(),
            "--batch".to_owned(),
            BATCH.to_string(),
            "--ids".to_owned(),
            self.args.ids.to_string(),
            "--id-kind".to_owned(),
            target.id_kind.as_str().to_owned(),
        ]);
        if let Some(token) = &target.token {
            command.args(["--token", token]);
        }
        if target.free_half {
            command.arg("--free-half");
        }
        let what = format!(
            "{} {mode:?} at concurrency {concurrency}, {} CPUs",
            target.system,
            placement.as_str()
        );
        let timeout = self.args.warmup + self.args.duration + Duration::from_secs(30);
        let stdout = output_of(&mut command, timeout).with_context(|| format!("load: {what}"));
        // A Ctrl-C also stops the load generator: report the interruption, not its failure.
        check_interrupted()?;
        let stdout = stdout?;
        let report: LoadReport = serde_json::from_str(stdout.trim())
            .with_context(|| format!("load: {what}: parsing its report {stdout:?}"))?;
        ensure!(
            report.calls > 0,
            "load: {what}: no call succeeded ({} errors, first: {})",
            report.errors,
            report.first_error.as_deref().unwrap_or("none")
        );
        eprintln!(
            "{what}: {:.0} calls/s, {:.0} decisions/s, p50 {:.0} µs, p99 {:.0} µs, {:.1}% denied, {} errors",
            report.calls_per_s(),
            report.decisions_per_s(),
            report.p50_us,
            report.p99_us,
            100.0 * report.denied as f64 / report.decisions.max(1) as f64,
            report.errors
        );
        Ok(report)
    }
}

/// The rate limit service rows' systems.
pub(super) const RLS_AGENT: &str = "limiter, Envoy rate limit service";
pub(super) const RLS_REDIS: &str = "Redis-backed rate limit service (fixed window)";

/// What the limiter rows could not be measured for, when they were not.
pub(super) enum Limiter {
    Running { agent: Agent, token: String },
    Missing(String),
}

/// The redis-cell rows: measured, or why not.
pub(super) enum Redis {
    Running(Daemon),
    Missing(String),
}

pub(super) fn run(args: &RunArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("api-bench run creates network namespaces and attaches XDP: run it as root");
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        for signal in [libc::SIGINT, libc::SIGTERM] {
            libc::signal(
                signal,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
    let load_before = read_trimmed("/proc/loadavg");
    let all = Cpus::current()?;
    let placements = Placement::all(&all);
    let date = date();
    let exe = std::env::current_exe().context("locating this executable")?;
    let bench_dir = target_dir().join("bench");
    let tmp = TempDir::new("limiter-api-bench")?;

    let redis_cell_dir = bench_dir.join("redis-cell");
    eprintln!(
        "building redis-cell {REDIS_CELL_VERSION} into {}",
        redis_cell_dir.display()
    );
    let module = build_redis_cell(&redis_cell_dir);

    let net = TestNet::new().context("creating the benchmark's network namespaces")?;
    let ns = net.receiver_ns.clone();

    let floor_addr: SocketAddr = FLOOR_ADDR.parse().context("FLOOR_ADDR")?;
    let mut floor = Daemon::spawn(
        "governor floor server",
        {
            let mut command = in_ns(&ns, &exe);
            command.args(["floor-server", "--listen", FLOOR_ADDR]);
            command
        },
        tmp.0.join("floor.log"),
    )?;
    floor.wait_listening(&ns, floor_addr, Duration::from_secs(10))?;

    let mut redis = match (&module, find_executable("redis-server")) {
        (Err(e), _) => Redis::Missing(format!("redis-cell did not build: {e:#}")),
        (Ok(_), None) => Redis::Missing(
            "`redis-server` is not installed (`cargo xtask setup` installs it)".into(),
        ),
        (Ok(module), Some(server)) => {
            let mut command = in_ns(&ns, server);
            command
                .args(["--bind", "127.0.0.1", "--port", &REDIS_PORT.to_string()])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(&tmp.0)
                .arg("--loadmodule")
                .arg(module);
            let mut daemon = Daemon::spawn("redis-server", command, tmp.0.join("redis.log"))?;
            daemon.wait_listening(
                &ns,
                SocketAddr::from(([127, 0, 0, 1], REDIS_PORT)),
                Duration::from_secs(10),
            )?;
            // The module answers: `CL.THROTTLE` gives 5 integers, the first 0 (allowed).
            let reply = output_of(
                in_ns(&ns, "redis-cli")
                    .args(["-p", &REDIS_PORT.to_string(), "CL.THROTTLE", "bench-check"])
                    .args([
                        (LIMIT - 1).to_string(),
                        LIMIT.to_string(),
                        "1".into(),
                        "1".into(),
                    ]),
                Duration::from_secs(10),
            )
            .context("redis-cli CL.THROTTLE")?;
            ensure!(
                reply.lines().count() == 5 && reply.lines().next() == Some("0"),
                "CL.THROTTLE answered {reply:?}; redis-server's log:\n{}",
                tail(&daemon.log, 4000)
            );
            Redis::Running(daemon)
        }
    };

    // Envoy's rate limit service, in agents that have it.
    let rls_served = limiter_bin().is_file() && agent_has_option("--rls-listen");
    let rls_path = tmp.0.join("rls.yaml");
    fs::write(&rls_path, rls_config())
        .with_context(|| format!("writing {}", rls_path.display()))?;
    let rls_path = rls_path.to_string_lossy().into_owned();
    let limiter = if !limiter_bin().is_file() {
        Limiter::Missing(format!(
            "no limiter binary at {} (set LIMITER_BIN or run `cargo xtask bench`)",
            limiter_bin().display()
        ))
    } else if !agent_has_option("--api-listen") {
        Limiter::Missing(format!(
            "`{} agent` has no `--api-listen` (no gRPC API in this build)",
            limiter_bin().display()
        ))
    } else {
        let token = random_token()?;
        let token_file = tmp.0.join("api-token");
        // The agent refuses a token file others can read.
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&token_file)
            .and_then(|mut file| file.write_all(token.as_bytes()))
            .with_context(|| format!("writing {}", token_file.display()))?;
        let socket = tmp.0.join("api.sock");
        let socket = socket.to_string_lossy();
        let token_path = token_file.to_string_lossy();
        let mut args = vec![
            "--api-socket",
            &socket,
            "--api-listen",
            LIMITER_ADDR,
            "--api-token-file",
            &token_path,
        ];
        // The load generator is one caller sending far more than the per-caller defaults: raise
        // them out of the way, but keep them on, so that their cost is measured (the new-client
        // cap reads each address before checking it).
        if agent_has_option("--api-caller-rate") {
            args.extend([
                "--api-caller-rate",
                "1000000000",
                "--api-new-clients-per-second",
                "1000000000",
            ]);
        }
        if rls_served {
            args.extend(["--rls-listen", RLS_ADDR, "--rls-config", &rls_path]);
        }
        let agent =
            Agent::start_with(&net, &limiter_config(), &args).context("starting the agent")?;
        let limiter_addr: SocketAddr = LIMITER_ADDR.parse().context("LIMITER_ADDR")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listening(&ns, limiter_addr)? {
            if let Some(status) = agent.exited()? {
                bail!(
                    "the agent exited ({status}) before serving {LIMITER_ADDR}:\n{}",
                    agent.stderr()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "the agent did not listen on {LIMITER_ADDR} within 10 s; its stderr:\n{}",
                agent.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
        Limiter::Running { agent, token }
    };

    let bench = Bench {
        args,
        ns: ns.clone(),
        exe,
        all,
    };
    let mut servers = Servers {
        agent: match &limiter {
            Limiter::Running { agent, .. } => agent.pid(),
            Limiter::Missing(_) => None,
        },
        floor: Some(floor.child.id()),
        redis: match &redis {
            Redis::Running(daemon) => Some(daemon.child.id()),
            Redis::Missing(_) => None,
        },
        rls_redis: None,
    };
    let floor_target = Target {
        system: "governor floor".into(),
        addr: FLOOR_ADDR,
        token: None,
        id_kind: IdKind::Address,
        free_half: false,
    };
    let rls_only = args.only == Some(Only::Rls);
    let mut targets = vec![floor_target];
    if !rls_only && let Limiter::Running { token, .. } = &limiter {
        for id_kind in [IdKind::Address, IdKind::Name] {
            targets.push(Target {
                system: format!("limiter, {} IDs", id_kind.as_str()),
                addr: LIMITER_ADDR,
                token: Some(token.clone()),
                id_kind,
                free_half: false,
            });
        }
    }

    // Round by round, case by case, every system in turn: a drift in the machine's speed
    // touches all alike, and the median round of each case drops the outliers.
    ensure!(args.rounds > 0, "--rounds must be positive");
    // `--only rls`: of these, the floor's Check at the service's target concurrency, for scale.
    let cases: Vec<(Mode, usize)> = if rls_only {
        vec![(Mode::Unary, RLS_CONCURRENCY)]
    } else {
        UNARY_CONCURRENCY
            .iter()
            .map(|&c| (Mode::Unary, c))
            .chain([(Mode::Batch, BATCH_CONCURRENCY)])
            .collect()
    };
    let mut rows = Rows(
        placements
            .iter()
            .flat_map(|&placement| {
                cases.iter().flat_map({
                    let targets = &targets;
                    move |&(mode, concurrency)| {
                        targets.iter().map(move |target| {
                            Row::grpc(&target.system, placement, mode, concurrency)
                        })
                    }
                })
            })
            .collect(),
    );
    let redis_rows = [
        (BATCH, "redis-cell, pipelined (-P 100)"),
        (1, "redis-cell, unpipelined (-P 1)"),
    ];
    // (placement, pipeline, requests, row) of each redis-cell case.
    let mut redis_cases = Vec::new();
    if !rls_only && let Redis::Running(_) = &redis {
        for &placement in &placements {
            servers.place(placement, RedisRole::Service, &all)?;
            for (pipeline, label) in redis_rows {
                check_interrupted()?;
                // Warm-up, which also sizes the measured runs to about `duration`.
                let (warm_rps, ..) = redis_benchmark(
                    &ns,
                    pipeline,
                    BATCH_CONCURRENCY,
                    100_000,
                    args.ids,
                    &generator_cpus(placement, &all),
                )
                .with_context(|| format!("redis-benchmark warm-up: {label}"))?;
                let requests =
                    ((warm_rps * args.duration.as_secs_f64()) as u64).clamp(50_000, 50_000_000);
                redis_cases.push((placement, pipeline, requests, rows.0.len()));
                rows.0.push(Row {
                    system: label.to_owned(),
                    placement,
                    case: None,
                    call: "CL.THROTTLE",
                    in_flight: if pipeline == 1 {
                        BATCH_CONCURRENCY.to_string()
                    } else {
                        format!("{BATCH_CONCURRENCY} × {pipeline}")
                    },
                    rounds: Vec::new(),
                });
            }
        }
    }
    // Envoy's rate limit service on the agent, and the Redis-backed service it replaces.
    let mut rls_targets = Vec::new();
    if let (Limiter::Running { .. }, true) = (&limiter, rls_served) {
        rls_targets.push(Target {
            system: RLS_AGENT.into(),
            addr: RLS_ADDR,
            token: None,
            id_kind: IdKind::Address,
            free_half: false,
        });
    }
    let rls_redis = match &redis {
        Redis::Running(_) => {
            let mut command = in_ns(&ns, &bench.exe);
            command
                .args(["rls-redis-server", "--listen", RLS_REDIS_ADDR, "--redis"])
                .arg(format!("127.0.0.1:{REDIS_PORT}"))
                .args(["--config", &rls_path]);
            let mut daemon = Daemon::spawn(
                "Redis-backed rate limit service",
                command,
                tmp.0.join("rls-redis.log"),
            )?;
            daemon.wait_listening(
                &ns,
                RLS_REDIS_ADDR.parse().context("RLS_REDIS_ADDR")?,
                Duration::from_secs(10),
            )?;
            servers.rls_redis = Some(daemon.child.id());
            rls_targets.push(Target {
                system: RLS_REDIS.into(),
                addr: RLS_REDIS_ADDR,
                token: None,
                id_kind: IdKind::Address,
                free_half: false,
            });
            Some(daemon)
        }
        Redis::Missing(_) => None,
    };
    for &placement in &placements {
        for target in &rls_targets {
            for concurrency in UNARY_CONCURRENCY {
                rows.0
                    .push(Row::grpc(&target.system, placement, Mode::Rls, concurrency));
            }
        }
    }
    for round in 1..=args.rounds {
        eprintln!("round {round} of {}", args.rounds);
        for &placement in &placements {
            servers.place(placement, RedisRole::Backend, &all)?;
            for &(mode, concurrency) in &cases {
                for target in &targets {
                    let report = bench.load(target, placement, mode, concurrency)?;
                    rows.get_mut(&target.system, placement, mode, concurrency)
                        .context("a row for every case")?
                        .rounds
                        .push((&report).into());
                }
            }
            for concurrency in UNARY_CONCURRENCY {
                for target in &rls_targets {
                    let report = bench.load(target, placement, Mode::Rls, concurrency)?;
                    rows.get_mut(&target.system, placement, Mode::Rls, concurrency)
                        .context("a row for every case")?
                        .rounds
                        .push((&report).into());
                }
            }
        }
        if let Redis::Running(daemon) = &mut redis {
            for &(placement, pipeline, requests, row) in &redis_cases {
                check_interrupted()?;
                servers.place(placement, RedisRole::Service, &all)?;
                let label = &rows.0[row].system;
                let (rps, p50_ms, p99_ms) = redis_benchmark(
                    &ns,
                    pipeline,
                    BATCH_CONCURRENCY,
                    requests,
                    args.ids,
                    &generator_cpus(placement, &all),
                )
                .with_context(|| format!("redis-benchmark: {label}"))?;
                daemon.ensure_running()?;
                eprintln!(
                    "{label}, {} CPUs: {rps:.0} decisions/s, p50 {p50_ms} ms, p99 {p99_ms} ms",
                    placement.as_str()
                );
                rows.0[row].rounds.push(Measurement {
                    calls_per_s: (pipeline == 1).then_some(rps),
                    decisions_per_s: rps,
                    p50_us: p50_ms * 1e3,
                    p99_us: p99_ms * 1e3,
                    denied: None,
                    errors: None,
                });
            }
        }
    }
    if let Redis::Missing(reason) = &redis {
        eprintln!("redis-cell not measured: {reason}");
    }
    let redis_pipelined = redis_cases
        .iter()
        .filter(|&&(_, pipeline, ..)| pipeline == BATCH)
        .filter_map(|&(placement, _, _, row)| {
            rows.0[row].median().map(|m| (placement, m.decisions_per_s))
        })
        .collect();

    // Denials, after the comparison: one round, in the first placement. The rate limit services
    // first: requests with `/free/` paths half the time (no reload: the config has the rule from
    // the start).
    let denials = placements[0];
    servers.place(denials, RedisRole::Backend, &all)?;
    let mut rls_denied_case = false;
    for target in &mut rls_targets {
        target.free_half = true;
        let report = bench.load(target, denials, Mode::Rls, RLS_CONCURRENCY)?;
        let mut row = Row::grpc(
            &format!("{}, ~50% denied", target.system),
            denials,
            Mode::Rls,
            RLS_CONCURRENCY,
        );
        row.rounds.push((&report).into());
        rows.0.push(row);
        rls_denied_case = true;
    }
    // Then limiter.v1 (the reload changes the agent's policies).
    let mut denied_case = false;
    if !rls_only && let Limiter::Running { agent, token } = &limiter {
        agent
            .reload(&limiter_deny_config(), Duration::from_secs(10))
            .context("reloading the agent with the denial config")?;
        let target = Target {
            system: "limiter, address IDs, ~50% denied".into(),
            addr: LIMITER_ADDR,
            token: Some(token.clone()),
            id_kind: IdKind::Address,
            free_half: false,
        };
        for (mode, concurrency) in [(Mode::Unary, 16), (Mode::Batch, BATCH_CONCURRENCY)] {
            let report = bench.load(&target, denials, mode, concurrency)?;
            let mut row = Row::grpc(&target.system, denials, mode, concurrency);
            row.rounds.push((&report).into());
            rows.0.push(row);
        }
        denied_case = true;
    }

    // Every server back on every CPU before the report (they stop after it).
    servers.place(Placement::Shared, RedisRole::Backend, &all)?;
    let md = report(&ReportInput {
        args,
        placements: &placements,
        date,
        load_before,
        rows: &rows,
        limiter: match &limiter {
            Limiter::Running { .. } => None,
            Limiter::Missing(reason) => Some(reason.as_str()),
        },
        redis: match &redis {
            Redis::Running(_) => None,
            Redis::Missing(reason) => Some(reason.as_str()),
        },
        redis_pipelined,
        denied_case,
        rls_denied_case,
    })?;
    print!("{md}");
    if let Some(path) = &args.write {
        fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    // Stopped in this order: the load is done; the servers, then the namespaces.
    drop(limiter);
    drop(rls_redis);
    drop(redis);
    drop(floor);
    drop(net);
    Ok(())
}
