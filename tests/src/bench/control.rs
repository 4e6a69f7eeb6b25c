//! The control plane with a large blocklist: a real agent (`LIMITER_BIN`) on a test network,
//! started with N `/24` policies, then a one-line edit of its config file, the same edit
//! applied by SIGHUP, and one policy set through the API, each timed, while another thread calls
//! `Stats.Global` and `Check` back to back and records how long each call waited.
//! `cargo xtask bench` runs it.
//!
//! Usage: `control-bench [--policies 1000,30000,31743,100000] [--rounds 5] [--write FILE]` (a
//! count over `MAX_POLICIES` is reported as not run)

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use limiter_user::{config::MAX_POLICIES, proto};

use crate::{agent::Agent, api::Api, fixture::TempDir, netns::TestNet};

/// `control-bench [--policies N,...] [--rounds R] [--write FILE]`.
#[derive(clap::Parser)]
#[command(about = "Control plane at scale: start, reload and API changes with N policies")]
pub struct Args {
    /// Policy counts to measure (each a config of that many `/24` policies).
    #[arg(long, value_delimiter = ',', default_value = "1000,30000,31743,100000")]
    pub policies: Vec<usize>,
    /// Repetitions of each timed change.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Also write the report (markdown) to FILE.
    #[arg(long, value_name = "FILE")]
    pub write: Option<String>,
}

/// How long a test API call may take before the benchmark gives up on it.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The `/24` of policy `i`: 16.0.0.0/24, 16.0.1.0/24, ...
fn prefix(i: usize) -> String {
    format!("{}.{}.{}.0/24", 16 + (i >> 16), (i >> 8) & 0xff, i & 0xff)
}

/// A config of `n` `/24` policies, policy `edited` (if any) with limit `limit` instead of 100.
fn config(n: usize, edited: Option<(usize, u32)>) -> String {
    let mut text = String::with_capacity(64 * n + 64);
    text.push_str("default: { limit: 1000, window: 1s }\npolicies:\n");
    for i in 0..n {
        let limit = match edited {
            Some((e, limit)) if e == i => limit,
            _ => 100,
        };
        text.push_str(&format!(
            "  - {{ match: {}, limit: {limit}, window: 1s }}\n",
            prefix(i)
        ));
    }
    text
}

/// One call of the prober: when it started and how long it took.
#[derive(Clone, Copy)]
struct Call {
    start: Instant,
    took: Duration,
}

/// Calls `Stats.Global` and `Check` back to back on its own connection until stopped.
struct Prober {
    calls: Arc<Mutex<Vec<Call>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Result<()>>>,
}

impl Prober {
    fn start(socket: &str) -> Result<Prober> {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut api = Api::unix(socket, CALL_TIMEOUT)?;
        let (c, s) = (calls.clone(), stop.clone());
        let thread = thread::spawn(move || -> Result<()> {
            while !s.load(Ordering::Relaxed) {
                for check in [false, true] {
                    let start = Instant::now();
                    if check {
                        api.check("control-bench-client", 1)?;
                    } else {
                        api.global()?;
                    }
                    let call = Call {
                        start,
                        took: start.elapsed(),
                    };
                    c.lock().unwrap_or_else(|e| e.into_inner()).push(call);
                }
                thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        });
        Ok(Prober {
            calls,
            stop,
            thread: Some(thread),
        })
    }

    /// The longest call that overlapped `[from, to]`.
    fn longest(&self, from: Instant, to: Instant) -> Duration {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|c| c.start < to && c.start + c.took > from)
            .map(|c| c.took)
            .max()
            .unwrap_or_default()
    }

    /// The median call over everything recorded (the baseline).
    fn median(&self) -> Duration {
        let mut took: Vec<Duration> = self
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|c| c.took)
            .collect();
        took.sort();
        took.get(took.len() / 2).copied().unwrap_or_default()
    }

    fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the prober panicked"))?
                .context("the prober's API call"),
            None => Ok(()),
        }
    }
}

/// What one policy count measured.
struct Row {
    policies: usize,
    start: Duration,
    edit: Vec<Duration>,
    sighup: Vec<Duration>,
    set: Vec<Duration>,
    /// The longest Stats/Check call during the reloads (edit and SIGHUP), and during the sets.
    blocked_reload: Duration,
    blocked_set: Duration,
    baseline_call: Duration,
}

/// Waits until the API reports a policy generation above `before`; returns when it did.
fn wait_generation(api: &Api, before: u64, timeout: Duration) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let generation = api
            .call(
                api.clients
                    .stats
                    .clone()
                    .global(proto::GlobalStatsRequest {}),
            )?
            .policy_generation;
        if generation > before {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("the generation stayed at {generation} for {timeout:?}");
        }
        thread::sleep(Duration::from_millis(2));
    }
}

fn measure(n: usize, rounds: usize) -> Result<Row> {
    let net = TestNet::new()?;
    let dir = TempDir::new("control-bench")?;
    let socket = dir.join("api.sock").to_string_lossy().into_owned();
    let text = config(n, None);
    let t0 = Instant::now();
    let agent = Agent::spawn_on(&net.agent_target(), &text, &["--api-socket", &socket])?;
    loop {
        if agent.xdp_attached()? {
            break;
        }
        if let Some(status) = agent.exited()? {
            bail!("the agent exited ({status}):\n{}", agent.stderr());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("not attached after 60 s:\n{}", agent.stderr());
        }
        thread::sleep(Duration::from_millis(5));
    }
    let start = t0.elapsed();
    agent.wait_ready(Duration::from_secs(60))?;
    let mut api = Api::unix(&socket, CALL_TIMEOUT)?;
    let prober = Prober::start(&socket)?;
    thread::sleep(Duration::from_millis(200));

    let generation = |api: &mut Api| -> Result<u64> { Ok(api.global()?.policy_generation) };
    // When each change ran: the prober's calls overlapping them are looked at once it has
    // stopped, so that a call still blocked when the change returned is counted.
    let mut reloads = Vec::new();
    let mut edit = Vec::new();
    let mut sighup = Vec::new();
    let pid = agent.pid().context("the agent has no pid")? as libc::pid_t;
    for round in 0..rounds {
        // A one-line edit, picked up by the agent's poll of the file (every 200 ms).
        let line = (round * 7919) % n;
        let before = generation(&mut api)?;
        let t = Instant::now();
        agent.write_config(&config(n, Some((line, 200 + round as u32))))?;
        let done = wait_generation(&api, before, Duration::from_secs(30))?;
        edit.push(done - t);
        reloads.push((t, done));
        thread::sleep(Duration::from_millis(300));
        // The same kind of edit, applied at once by SIGHUP (the file is written first and the
        // poll may take it up; only a SIGHUP that moves the generation counts).
        let before = generation(&mut api)?;
        let hup_text = config(n, Some(((line + 1) % n, 300 + round as u32)));
        // Written while the poll is not looking: rename is atomic, and the poll then applies
        // it; to time SIGHUP alone, the write and the signal go together.
        let t = Instant::now();
        agent.write_config(&hup_text)?;
        // SAFETY: kill(2) with a live child's pid and SIGHUP has no memory-safety preconditions.
        if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
            bail!("kill -HUP {pid}: {}", std::io::Error::last_os_error());
        }
        let done = wait_generation(&api, before, Duration::from_secs(30))?;
        sighup.push(done - t);
        reloads.push((t, done));
        thread::sleep(Duration::from_millis(300));
    }
    let mut set = Vec::new();
    let mut sets = Vec::new();
    for round in 0..rounds {
        let policy = proto::Policy {
            r#match: prefix((round * 104_729) % n),
            limit: Some(50 + round as u32),
            window: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            action: proto::Action::Limit as i32,
            scope: proto::Scope::Unspecified as i32,
        };
        let t = Instant::now();
        api.set(policy).context("Limits.Set")?;
        let done = Instant::now();
        set.push(done - t);
        sets.push((t, done));
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(200));
    let longest = |windows: &[(Instant, Instant)]| {
        windows
            .iter()
            .map(|&(from, to)| prober.longest(from, to))
            .max()
            .unwrap_or_default()
    };
    let (blocked_reload, blocked_set) = (longest(&reloads), longest(&sets));
    let baseline_call = prober.median();
    prober.stop()?;
    drop(api);
    agent.terminate()?;
    Ok(Row {
        policies: n,
        start,
        edit,
        sighup,
        set,
        blocked_reload,
        blocked_set,
        baseline_call,
    })
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn max(v: &[Duration]) -> Duration {
    v.iter().copied().max().unwrap_or_default()
}

/// Runs the benchmark and prints (and with `--write` writes) the report.
pub fn run(args: &Args) -> Result<()> {
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for &n in &args.policies {
        if n > MAX_POLICIES {
            skipped.push(n);
            continue;
        }
        eprintln!("control-bench: {n} policies");
        rows.push(measure(n, args.rounds).with_context(|| format!("{n} policies"))?);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let pair = |v: &[Duration]| format!("{:.0} / {:.0} ms", ms(median(v)), ms(max(v)));
    let mut report = format!(
        "## Control plane\n\n{} · {}. A real agent (release build) on a veth in a test \
         namespace, its config `N` `/24` policies (`- {{ match: 16.0.0.0/24, limit: 100, \
         window: 1s }}`, ...); {} rounds of each change, median / max. **Start**: from spawning \
         `limiter agent` to its XDP program on the interface (the policies are written before \
         it attaches). **Edit**: one line of the file rewritten (rename over it) until \
         `Stats.Global` shows the new policy generation; the agent polls the file every 200 \
         ms, so up to 200 ms of it is the poll. **SIGHUP**: the same, signalled at once. \
         **API set**: one `Limits.Set` of an existing policy, until it returns (applied). \
         **Blocked**: the longest `Stats.Global` or `Check` call that overlapped a reload or a \
         set, from a client calling both back to back (its median call is the last column). \
         Targets at 30,000: edit applied < 300 ms, API set < 20 ms, start < 1 s, blocked a \
         few ms.\n\n\
         | policies | start | edit applied | SIGHUP applied | API set | blocked (reload / set) | \
         median call |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        crate::bench::report::machine(),
        crate::bench::report::date(),
        args.rounds,
    );
    for r in &rows {
        report.push_str(&format!(
            "| {} | {:.0} ms | {} | {} | {} | {:.1} / {:.1} ms | {:.2} ms |\n",
            r.policies,
            ms(r.start),
            pair(&r.edit),
            pair(&r.sighup),
            pair(&r.set),
            ms(r.blocked_reload),
            ms(r.blocked_set),
            ms(r.baseline_call),
        ));
    }
    if let Some(r) = rows.iter().find(|r| r.policies == 30_000) {
        let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
        let reload = median(&r.sighup);
        let blocked = r.blocked_reload.max(r.blocked_set);
        report.push_str(&format!(
            "\nTargets at 30,000 policies: a reload (SIGHUP, no poll) applied in {:.0} ms (< 300 \
             ms: {}); an API set in {:.0} ms (< 20 ms: {}); start to attached {:.0} ms (< 1 s: \
             {}); Stats/Check blocked at most {:.1} ms (a few ms, < 10: {}).\n",
            ms(reload),
            verdict(reload < Duration::from_millis(300)),
            ms(median(&r.set)),
            verdict(median(&r.set) < Duration::from_millis(20)),
            ms(r.start),
            verdict(r.start < Duration::from_secs(1)),
            ms(blocked),
            verdict(blocked < Duration::from_millis(10)),
        ));
    }
    for n in skipped {
        report.push_str(&format!(
            "\n{n} policies: not run, a config holds at most {MAX_POLICIES} (policy ids are 15 \
             bits in a client entry, the top 1,024 kept for the rate limit service's).\n"
        ));
    }
    print!("{report}");
    if let Some(file) = &args.write {
        std::fs::write(file, &report).with_context(|| format!("writing {file}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_valid_and_an_edit_changes_one_line() {
        let a = config(300, None);
        let b = config(300, Some((257, 7)));
        let parsed = limiter_user::config::Config::parse(&a).unwrap();
        assert_eq!(parsed.policies.len(), 300);
        assert_eq!(prefix(257), "16.1.1.0/24");
        assert_eq!(prefix(65_536), "17.0.0.0/24");
        let differing = a.lines().zip(b.lines()).filter(|(x, y)| x != y).count();
        assert_eq!(differing, 1);
        assert!(limiter_user::config::Config::parse(&b).is_ok());
    }
}
