//! Where the processes of a case run.
//!
//! - `Shared`: every process may run on every CPU, and the scheduler places the service under
//!   test, its load generator and their neighbours together (on this 2-CPU machine the
//!   generator's threads and the service's take turns on the same CPUs).
//! - `Isolated`: the load generator on one CPU ([`GENERATOR_CPU`]), the servers on another
//!   ([`SERVICE_CPU`]: the service under test, and the others, idle meanwhile), so that the
//!   generator's scheduling does not show in the service's figures, and each service gets the
//!   same one CPU for all it runs. A Redis that a service calls as its backend runs beside the
//!   load generator (of the two placements measured by hand, the one that gave that service
//!   more; one on another host would cost the service no CPU either, but add a network round
//!   trip); where Redis is the service (redis-cell), it runs on the service's CPU and
//!   `redis-benchmark` on the generator's.
//!
//! The servers are started once, their threads sized for the whole machine, and moved between
//! the placements while they run.

use std::{fs, os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, Result, bail};

/// The CPU of the load generator in the isolated placement.
pub(super) const GENERATOR_CPU: usize = 0;
/// The CPU of the service under test in the isolated placement.
pub(super) const SERVICE_CPU: usize = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Placement {
    Shared,
    Isolated,
}

impl Placement {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Placement::Shared => "shared",
            Placement::Isolated => "isolated",
        }
    }

    /// The placements a run measures: both where the machine has the two CPUs the isolated one
    /// needs.
    pub(super) fn all(cpus: &Cpus) -> Vec<Placement> {
        if cpus.has(GENERATOR_CPU) && cpus.has(SERVICE_CPU) {
            vec![Placement::Isolated, Placement::Shared]
        } else {
            vec![Placement::Shared]
        }
    }
}

/// A set of CPUs.
#[derive(Clone, Copy)]
pub(super) struct Cpus(libc::cpu_set_t);

impl Cpus {
    pub(super) fn one(cpu: usize) -> Cpus {
        // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET stays inside it for cpu <
        // CPU_SETSIZE, which the callers' constants are.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            Cpus(set)
        }
    }

    /// The CPUs the calling thread may run on (at the start of a run: every CPU the benchmark
    /// was given, which the shared placement gives back to every process).
    pub(super) fn current() -> Result<Cpus> {
        // SAFETY: a zeroed cpu_set_t is valid to fill; pid 0 is the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
            }
            Ok(Cpus(set))
        }
    }

    fn has(&self, cpu: usize) -> bool {
        // SAFETY: reads the set; cpu is a small constant.
        unsafe { libc::CPU_ISSET(cpu, &self.0) }
    }

    /// Sets every thread of process `pid` to these CPUs. Threads it starts later inherit the
    /// set of the thread that starts them; a thread started while the threads are walked may
    /// be missed by the first walk, so they are walked twice.
    pub(super) fn apply_to_process(&self, pid: u32) -> Result<()> {
        for _ in 0..2 {
            let tasks = fs::read_dir(format!("/proc/{pid}/task"))
                .with_context(|| format!("listing the threads of process {pid}"))?;
            for task in tasks {
                let Some(tid) = task
                    .ok()
                    .and_then(|t| t.file_name().to_str()?.parse::<libc::pid_t>().ok())
                else {
                    continue;
                };
                // SAFETY: sets the affinity of a thread id; a thread that ended meanwhile
                // fails with ESRCH, which is ignored.
                let set =
                    unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &self.0) };
                if set != 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::ESRCH) {
                        bail!("setting the CPUs of thread {tid} of process {pid}: {e}");
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs `command`'s program on these CPUs (set between fork and exec; its threads inherit
    /// them).
    pub(super) fn apply_to_command(&self, command: &mut Command) {
        let set = self.0;
        // SAFETY: sched_setaffinity is async-signal-safe, and the closure touches nothing else.
        unsafe {
            command.pre_exec(move || {
                if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// The servers' processes, placed before each case.
#[derive(Default)]
pub(super) struct Servers {
    /// The agent (limiter.v1 and its rate limit service).
    pub(super) agent: Option<u32>,
    pub(super) floor: Option<u32>,
    pub(super) redis: Option<u32>,
    /// The Redis-backed rate limit service.
    pub(super) rls_redis: Option<u32>,
}

/// What the case measures, for where Redis runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum RedisRole {
    /// redis-cell rows: Redis is the service under test.
    Service,
    /// Everything else: Redis is at most a backend.
    Backend,
}

impl Servers {
    /// Places the servers for a case (see the module docs); `all` is every CPU of the run.
    pub(super) fn place(&self, placement: Placement, redis: RedisRole, all: &Cpus) -> Result<()> {
        let (service, backend) = match placement {
            Placement::Shared => (*all, *all),
            Placement::Isolated => (Cpus::one(SERVICE_CPU), Cpus::one(GENERATOR_CPU)),
        };
        for pid in [self.agent, self.floor, self.rls_redis]
            .into_iter()
            .flatten()
        {
            service.apply_to_process(pid)?;
        }
        if let Some(pid) = self.redis {
            match redis {
                RedisRole::Service => service.apply_to_process(pid)?,
                RedisRole::Backend => backend.apply_to_process(pid)?,
            }
        }
        Ok(())
    }
}

/// Where a case's load generator runs.
pub(super) fn generator_cpus(placement: Placement, all: &Cpus) -> Cpus {
    match placement {
        Placement::Shared => *all,
        Placement::Isolated => Cpus::one(GENERATOR_CPU),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_and_its_threads_move_to_the_set_and_back() {
        let all = Cpus::current().unwrap();
        if !all.has(0) {
            return;
        }
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        let pid = child.id();
        let read = || {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap()
                .trim()
                .to_owned()
        };
        Cpus::one(0).apply_to_process(pid).unwrap();
        assert_eq!(read(), "0");
        all.apply_to_process(pid).unwrap();
        let back = read();
        let _ = child.kill();
        let _ = child.wait();
        let mine = fs::read_to_string("/proc/self/status").unwrap();
        let mine = mine
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim();
        assert_eq!(back, mine);
    }

    #[test]
    fn a_command_starts_on_its_set() {
        let all = Cpus::current().unwrap();
        if !all.has(0) {
            return;
        }
        let mut command = Command::new("grep");
        command.args(["Cpus_allowed_list", "/proc/self/status"]);
        Cpus::one(0).apply_to_command(&mut command);
        let out = command.output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .last(),
            Some("0")
        );
    }
}
