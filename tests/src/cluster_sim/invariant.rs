//! The invariant: every client's limits in force sum to at most L. The sums are kept
//! incrementally as grants, leases and cold shares change, checked, and recounted.

use std::time::Duration;

use super::{COARSE_SLACK, Event, Grant, Sim, datapath::Entry};

/// A sum above L: when, for which client, and what each member enforced.
#[derive(Debug, Clone)]
pub struct Violation {
    pub real: Duration,
    pub client: usize,
    pub sum: i64,
    pub limit: u32,
    /// (member, limit in force, cold share, phase, alive) for each member whose limit is not
    /// its cold share, then the cold shares.
    pub detail: String,
}

impl Sim {
    fn record_change(&mut self, i: usize, c: u32, limit: u32) {
        if let Some(track) = self.tracked.get_mut(&c) {
            track.changes.push((self.real, i, limit));
        }
    }

    fn check(&mut self, c: u32) {
        self.checks += 1;
        let sum = self.cold_sum + self.clients[c as usize].excess;
        if sum > i64::from(self.cfg.limit) {
            self.violation(c, sum);
        }
    }

    fn check_all(&mut self) {
        let limit = i64::from(self.cfg.limit);
        for c in 0..self.clients.len() {
            self.checks += 1;
            let sum = self.cold_sum + self.clients[c].excess;
            if sum > limit {
                self.violation(c as u32, sum);
            }
        }
    }

    fn violation(&mut self, c: u32, sum: i64) {
        self.violation_count += 1;
        self.last_violation = Some(self.real);
        self.worst_excess = self.worst_excess.max(sum - i64::from(self.cfg.limit));
        if self.violations.len() >= 20 {
            return;
        }
        let mut detail = String::new();
        for node in &self.nodes {
            if let Some(e) = node.grants.get(&c)
                && e.counted != node.cold
            {
                detail.push_str(&format!(
                    "{}: {} (grant {} until {:?} on its clock {:?}; cold {}, {}, {}) ",
                    node.id,
                    e.counted,
                    e.grant.value,
                    Duration::from_nanos(e.grant.until_ns),
                    node.clock.at(self.real),
                    node.cold,
                    node.share.phase.as_str(),
                    if node.alive { "alive" } else { "dead" },
                ));
            }
        }
        let colds: Vec<u32> = self.nodes.iter().map(|n| n.cold).collect();
        detail.push_str(&format!("; cold shares {colds:?}"));
        self.violations.push(Violation {
            real: self.real,
            client: c as usize,
            sum,
            limit: self.cfg.limit,
            detail,
        });
    }

    /// Member `i`'s cold share becomes `cold` (its share view changed).
    pub(super) fn set_cold(&mut self, i: usize, cold: u32) {
        let real = self.real;
        let node = &mut self.nodes[i];
        let old = node.cold;
        if old == cold {
            return;
        }
        node.cold = cold;
        self.cold_sum += i64::from(cold) - i64::from(old);
        let now_ns = node.clock.at(real).as_nanos() as u64;
        let mut changed = Vec::new();
        for (c, e) in node.grants.iter_mut() {
            let before = i64::from(e.counted) - i64::from(old);
            e.counted = e.grant.limit_at(now_ns, cold);
            let after = i64::from(e.counted) - i64::from(cold);
            self.clients[*c as usize].excess += after - before;
            changed.push((*c, e.counted));
        }
        for (c, limit) in changed {
            self.record_change(i, c, limit);
        }
        let ungranted: Vec<u32> = self
            .tracked
            .keys()
            .copied()
            .filter(|c| !self.nodes[i].grants.contains_key(c))
            .collect();
        for c in ungranted {
            self.record_change(i, c, cold);
        }
        self.check_all();
    }

    pub(super) fn set_grant(
        &mut self,
        i: usize,
        c: u32,
        value: u32,
        until: Option<Duration>,
        silence: Duration,
    ) {
        let real = self.real;
        let node = &mut self.nodes[i];
        let now = node.clock.at(real);
        let until_ns = until.map_or(0, |u| u.saturating_sub(COARSE_SLACK).as_nanos() as u64);
        let grant = Grant {
            value,
            silence_ms: u32::try_from(silence.as_millis()).unwrap_or(u32::MAX),
            until_ns,
        };
        let counted = grant.limit_at(now.as_nanos() as u64, node.cold);
        let before = node
            .grants
            .insert(c, Entry { grant, counted })
            .map_or(0, |e| i64::from(e.counted) - i64::from(node.cold));
        self.clients[c as usize].excess += i64::from(counted) - i64::from(node.cold) - before;
        // Also for a grant at most the cold share now: the cold share may fall below it before
        // the lease ends.
        if until_ns > now.as_nanos() as u64 {
            let at = node.clock.real_at(Duration::from_nanos(until_ns));
            self.schedule(
                at,
                Event::Lapse {
                    node: i,
                    client: c,
                    until_ns,
                },
            );
        }
        self.record_change(i, c, counted);
        self.check(c);
    }

    pub(super) fn clear_grant(&mut self, i: usize, c: u32) {
        let node = &mut self.nodes[i];
        if let Some(e) = node.grants.remove(&c) {
            self.clients[c as usize].excess -= i64::from(e.counted) - i64::from(node.cold);
            let cold = node.cold;
            self.record_change(i, c, cold);
        }
    }

    pub(super) fn lapse(&mut self, i: usize, c: u32, until_ns: u64) {
        let real = self.real;
        let node = &mut self.nodes[i];
        let now_ns = node.clock.at(real).as_nanos() as u64;
        let cold = node.cold;
        let Some(e) = node.grants.get_mut(&c) else {
            return;
        };
        if e.grant.until_ns != until_ns {
            return;
        }
        let after = e.grant.limit_at(now_ns, cold);
        assert!(
            after <= e.counted,
            "a lease that ends never raises the limit ({} -> {after})",
            e.counted
        );
        self.clients[c as usize].excess -= i64::from(e.counted) - i64::from(after);
        e.counted = after;
        self.record_change(i, c, after);
    }

    /// Recounts every client's sum from the grants and cold shares, and checks it against the
    /// incremental one.
    pub(super) fn recount(&mut self) {
        self.recounts += 1;
        let mut excess = vec![0i64; self.clients.len()];
        for node in &self.nodes {
            let now_ns = node.clock.at(self.real).as_nanos() as u64;
            for (c, e) in &node.grants {
                let mut limit = e.grant.limit_at(now_ns, node.cold);
                // A lease that ends at this very instant: its event may come after this one.
                if limit != e.counted
                    && node.clock.real_at(Duration::from_nanos(e.grant.until_ns)) == self.real
                {
                    limit = e.counted;
                }
                assert_eq!(
                    limit, e.counted,
                    "client {c} on {}: counted at {} but in force {limit}",
                    node.id, e.counted
                );
                excess[*c as usize] += i64::from(limit) - i64::from(node.cold);
            }
        }
        let cold_sum: i64 = self.nodes.iter().map(|n| i64::from(n.cold)).sum();
        assert_eq!(cold_sum, self.cold_sum, "the cold shares' sum drifted");
        for (c, (client, counted)) in self.clients.iter().zip(excess).enumerate() {
            assert_eq!(
                client.excess, counted,
                "client {c}: the incremental sum drifted from the recount at {:?}",
                self.real
            );
        }
    }
}
