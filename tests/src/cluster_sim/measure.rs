//! Measurement: what each client is admitted per window (accuracy), and the bytes and CPU
//! time each member spends (cost).

use std::time::Duration;

use super::{Event, Sim};

/// A window is measured in this many slices: sliding windows move a slice at a time.
pub const SLICES: u32 = 10;

#[derive(Debug, Clone, Default)]
pub(super) struct NodeStats {
    pub(super) rounds: u64,
    /// Heartbeats without their enrolment entries, and answers.
    pub(super) heartbeat_bytes: u64,
    /// The reports and grants carried in heartbeats.
    pub(super) enrolment_bytes: u64,
    pub(super) reports: u64,
    pub(super) grants: u64,
    /// Thread CPU time of enrolment work (rounds, taking messages in) since the last round.
    pub(super) cpu_pending: Duration,
    pub(super) cpu: Duration,
    pub(super) cpu_rounds: Vec<Duration>,
}

/// What the measurement collects.
#[derive(Debug, Clone, Default)]
pub(super) struct Measure {
    from: Duration,
    until: Option<Duration>,
    slice: Duration,
    /// Slices of a client kept: [`SLICES`] closed ones and those still open.
    kept: usize,
    /// Slices closed, and whole windows among them.
    closed: u64,
    windows: u64,
    /// admitted / min(rate, L) of each client in each window (back to back from the start).
    window_ratios: Vec<f64>,
    /// The largest admitted / L of any client in any window of a policy window's length that
    /// starts at a slice boundary, and which.
    worst_window: f64,
    worst_window_client: usize,
    pub(super) node_stats: Vec<NodeStats>,
}

/// The limits in force of a tracked client on each member over time, for the time from a
/// demand change until it is in force everywhere.
#[derive(Debug, Clone)]
pub(super) struct Track {
    since: Duration,
    initial: Vec<u32>,
    pub(super) changes: Vec<(Duration, usize, u32)>,
    /// (end, admitted) of every sliding window of the measurement since.
    sliding: Vec<(Duration, f64)>,
}

/// Accuracy over the measurement.
#[derive(Debug, Clone, Copy, Default)]
pub struct Accuracy {
    /// Windows measured.
    pub windows: u64,
    /// Per client, admitted / (M·min(rate, L)) over the M windows: quantiles across clients.
    pub median: f64,
    pub p01: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
    /// Per client and real window, admitted / min(rate, L): median and 1st percentile.
    pub window_median: f64,
    pub window_p01: f64,
    /// The largest admitted / L in any window of the policy window's length (sliding by a
    /// tenth of it), and of which client.
    pub worst_window: f64,
    pub worst_window_client: usize,
    /// The clients with the largest and the smallest admitted / (M·min(rate, L)).
    pub most_client: usize,
    pub least_client: usize,
}

/// Wire and CPU cost per member over the measurement.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    /// Members that ran throughout (averaged over).
    pub nodes: usize,
    pub seconds: f64,
    /// Bytes sent per member per second: all, and the enrolment entries alone.
    pub bytes_per_second: f64,
    pub enrolment_bytes_per_second: f64,
    /// Per member per round: bytes sent, enrolment bytes, heartbeat (and answer) bytes.
    pub bytes_per_round: f64,
    pub enrolment_bytes_per_round: f64,
    pub heartbeat_bytes_per_round: f64,
    /// Reports and grants sent per member per round.
    pub entries_per_round: f64,
    /// Thread CPU time of a member's enrolment work per round (the round itself and taking in
    /// the messages that came since the last): mean and 99th percentile.
    pub cpu_mean: Duration,
    pub cpu_p99: Duration,
}

/// Thread CPU time.
pub(super) fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

impl Sim {
    /// Starts measuring accuracy, bytes and CPU time now.
    pub fn start_measuring(&mut self) {
        let slice = self.cfg.window / SLICES;
        // A slice is closed once every member counted its packets: two sync intervals later.
        let open = (2 * self.cfg.sync).as_nanos().div_ceil(slice.as_nanos()) as usize + 1;
        let kept = SLICES as usize + open;
        for c in &mut self.clients {
            c.slices = vec![0.0; kept];
            c.total = 0.0;
        }
        self.measure = Some(Measure {
            from: self.real,
            slice,
            kept,
            node_stats: self.nodes.iter().map(|n| n.stats.clone()).collect(),
            ..Measure::default()
        });
        let first = self.real + slice + 2 * self.cfg.sync;
        self.schedule(first, Event::Window(0));
    }

    /// Stops the measurement at the end of the last whole window (runs on to count it) and
    /// returns accuracy and cost.
    pub fn stop_measuring(&mut self) -> (Accuracy, Cost) {
        let Some(m) = &self.measure else {
            return (Accuracy::default(), Cost::default());
        };
        let elapsed = self.real.saturating_sub(m.from);
        let whole = (elapsed.as_nanos() / self.cfg.window.as_nanos()) as u64;
        let end = m.from + self.cfg.window * whole as u32;
        if let Some(m) = &mut self.measure {
            m.until = Some(end);
        }
        // Let every member count its packets up to the end.
        self.run_for(2 * self.cfg.sync + Duration::from_millis(1));
        let Some(m) = self.measure.take() else {
            return (Accuracy::default(), Cost::default());
        };
        let windows = m.windows.max(1);
        let mut totals: Vec<(f64, usize)> = self
            .clients
            .iter()
            .enumerate()
            .filter(|(_, c)| c.demand.rate > 0.0)
            .map(|(i, c)| {
                let most = windows as f64 * c.demand.rate.min(f64::from(self.cfg.limit));
                (c.total / most, i)
            })
            .collect();
        totals.sort_by(|a, b| a.0.total_cmp(&b.0));
        let most_client = totals.last().map_or(0, |t| t.1);
        let least_client = totals.first().map_or(0, |t| t.1);
        let totals: Vec<f64> = totals.into_iter().map(|t| t.0).collect();
        let mut per_window = m.window_ratios.clone();
        per_window.sort_by(f64::total_cmp);
        let accuracy = Accuracy {
            windows: m.windows,
            median: quantile(&totals, 0.5),
            p01: quantile(&totals, 0.01),
            p99: quantile(&totals, 0.99),
            min: totals.first().copied().unwrap_or(f64::NAN),
            max: totals.last().copied().unwrap_or(f64::NAN),
            window_median: quantile(&per_window, 0.5),
            window_p01: quantile(&per_window, 0.01),
            worst_window: m.worst_window,
            worst_window_client: m.worst_window_client,
            most_client,
            least_client,
        };
        let seconds = (end - m.from).as_secs_f64();
        let mut cost = Cost {
            seconds,
            ..Cost::default()
        };
        let mut cpu: Vec<Duration> = Vec::new();
        let (mut bytes, mut enrol, mut heartbeat, mut entries, mut rounds) = (0, 0, 0, 0, 0);
        for (node, before) in self.nodes.iter().zip(&m.node_stats) {
            // Members that joined during the measurement count from when they joined.
            let s = &node.stats;
            bytes += s.heartbeat_bytes + s.enrolment_bytes
                - before.heartbeat_bytes
                - before.enrolment_bytes;
            enrol += s.enrolment_bytes - before.enrolment_bytes;
            heartbeat += s.heartbeat_bytes - before.heartbeat_bytes;
            entries += s.reports + s.grants - before.reports - before.grants;
            rounds += s.rounds - before.rounds;
            cpu.extend(&s.cpu_rounds[before.cpu_rounds.len()..]);
            cost.nodes += 1;
        }
        let per_node_second = (cost.nodes as f64 * seconds).max(f64::MIN_POSITIVE);
        let rounds = (rounds as f64).max(1.0);
        cost.bytes_per_second = bytes as f64 / per_node_second;
        cost.enrolment_bytes_per_second = enrol as f64 / per_node_second;
        cost.bytes_per_round = bytes as f64 / rounds;
        cost.enrolment_bytes_per_round = enrol as f64 / rounds;
        cost.heartbeat_bytes_per_round = heartbeat as f64 / rounds;
        cost.entries_per_round = entries as f64 / rounds;
        cpu.sort();
        if !cpu.is_empty() {
            cost.cpu_mean = cpu.iter().sum::<Duration>() / cpu.len() as u32;
            cost.cpu_p99 = cpu[((cpu.len() - 1) as f64 * 0.99).round() as usize];
        }
        (accuracy, cost)
    }

    /// Records, from now on, what each member enforces for client `c`: see
    /// [`Sim::settled_after`].
    pub fn track(&mut self, c: usize) {
        let initial = (0..self.nodes.len()).map(|i| self.in_force(i, c)).collect();
        self.tracked.insert(
            c as u32,
            Track {
                since: self.real,
                initial,
                changes: Vec::new(),
                sliding: Vec::new(),
            },
        );
    }

    /// For a tracked client: what it was admitted in each window of the policy window's length
    /// (ending at each slice boundary of the measurement) since it is tracked.
    pub fn sliding(&self, c: usize) -> &[(Duration, f64)] {
        self.tracked
            .get(&(c as u32))
            .map_or(&[], |t| t.sliding.as_slice())
    }

    /// For a client tracked since a change of its demand: how long after it every member's
    /// limit in force came within `tolerance` (a fraction of the value, at least one packet) of
    /// what it enforces now, for good. `None` if it is not tracked. Stops tracking it.
    pub fn settled_after(&mut self, c: usize, tolerance: f64) -> Option<Duration> {
        let track = self.tracked.remove(&(c as u32))?;
        let mut settled = Duration::ZERO;
        for i in 0..track.initial.len() {
            let end = self.in_force(i, c);
            let near = |v: u32| {
                (f64::from(v) - f64::from(end)).abs() <= (f64::from(end) * tolerance).max(1.0)
            };
            let mut at = if near(track.initial[i]) {
                None
            } else {
                Some(track.since)
            };
            let mut was_near = near(track.initial[i]);
            for &(t, node, v) in &track.changes {
                if node != i {
                    continue;
                }
                let now_near = near(v);
                if now_near && !was_near {
                    at = Some(t);
                }
                was_near = now_near;
            }
            if let Some(t) = at {
                settled = settled.max(t - track.since);
            }
        }
        Some(settled)
    }
    /// `admitted` packets of client `c` between real times `a` and `b`, spread evenly.
    pub(super) fn admit(&mut self, c: u32, a: Duration, b: Duration, admitted: f64) {
        let Some(m) = &self.measure else {
            return;
        };
        let (w, kept) = (m.slice, m.kept as u64);
        let (from, until) = (m.from, m.until);
        // Spread over the whole span, counted only within the measurement.
        let full = b.saturating_sub(a).as_secs_f64().max(f64::MIN_POSITIVE);
        let (a, b) = (a.max(from), until.map_or(b, |u| b.min(u)).max(a.max(from)));
        if b <= a {
            return;
        }
        let client = &mut self.clients[c as usize];
        let mut t = a;
        while t < b {
            let k = ((t - from).as_nanos() / w.as_nanos()) as u64;
            let end = (from + w * (k as u32 + 1)).min(b);
            let part = admitted * (end - t).as_secs_f64() / full;
            client.slices[(k % kept) as usize] += part;
            client.total += part;
            t = end;
        }
    }

    /// Slice `k` of the measurement is over and counted: the window of the last [`SLICES`]
    /// slices ends with it.
    pub(super) fn close_window(&mut self, k: u64) {
        let limit = f64::from(self.cfg.limit);
        let sync = self.cfg.sync;
        let Some(m) = &mut self.measure else {
            return;
        };
        let end = m.from + m.slice * (k as u32 + 1);
        if m.until.is_some_and(|u| end > u) {
            return;
        }
        m.closed += 1;
        let (kept, slices) = (m.kept as u64, u64::from(SLICES));
        let whole = (k + 1).is_multiple_of(slices);
        if k + 1 >= slices {
            for (c, client) in self.clients.iter_mut().enumerate() {
                let admitted: f64 = (k + 1 - slices..=k)
                    .map(|j| client.slices[(j % kept) as usize])
                    .sum();
                if let Some(track) = self.tracked.get_mut(&(c as u32)) {
                    track.sliding.push((end, admitted));
                }
                if client.demand.rate > 0.0 {
                    if whole {
                        m.window_ratios
                            .push(admitted / client.demand.rate.min(limit));
                    }
                    if admitted / limit > m.worst_window {
                        m.worst_window = admitted / limit;
                        m.worst_window_client = c;
                    }
                }
                // The oldest slice leaves every later window.
                client.slices[((k + 1 - slices) % kept) as usize] = 0.0;
            }
        }
        if whole {
            m.windows += 1;
        }
        let next = m.from + m.slice * (k as u32 + 2) + 2 * sync;
        self.schedule(next, Event::Window(k + 1));
    }
}
