//! The owner's side of a lease: the holders enrolled for one client and the grants it issues them.

use std::{collections::BTreeMap, time::Duration};

use super::{
    Colds, Grant, Report, Terms, Timing, ToHolder,
    account::{Account, Counted},
    sums::Sums,
};
use crate::cluster::{NodeId, shares};

/// The owner's side for one client: the enrolled holders and what each may be enforcing.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub(super) limit: u32,
    pub(super) timing: Timing,
    /// The policy window: a holder's reported `used` counts for two of them (stretched) after
    /// the report arrives, or until the next report (see [`Account::counted_at`]).
    window: Duration,
    pub(super) next_grant: u64,
    /// Until then (owner clock) no grant goes above the cold share: a new owner's learning
    /// mode, during which raises another ledger of the client issued lapse.
    pub(super) no_raise_until: Duration,
    /// Releasing: no grant above the cold share any more (see [`Ledger::releasable`]).
    pub(super) releasing: bool,
    /// The first message number of a new holder's account.
    first_message: u64,
    /// The first grant number of this ledger: a holder that reports applying an older one
    /// applied another ledger's grant (an earlier owner's), which this one does not account for.
    first_grant: u64,
    pub(super) holders: BTreeMap<NodeId, Account>,
}

impl Ledger {
    pub fn new(limit: u32, timing: Timing) -> Ledger {
        Ledger::numbered_from(limit, timing, 1, Duration::ZERO)
    }

    /// A ledger whose grants and messages are numbered from `first` (the agent takes it from an
    /// increasing counter and its incarnation, so a holder never mistakes an earlier ledger's
    /// grant for a newer one of this), issuing no raise before `no_raise_until` (learning mode:
    /// a stretched lease after it is created, any raise of an earlier owner has lapsed).
    pub fn numbered_from(
        limit: u32,
        timing: Timing,
        first: u64,
        no_raise_until: Duration,
    ) -> Ledger {
        Ledger {
            limit,
            timing,
            window: Duration::ZERO,
            next_grant: first.max(1),
            no_raise_until,
            releasing: false,
            first_message: first.max(1),
            first_grant: first.max(1),
            holders: BTreeMap::new(),
        }
    }

    /// Counts each holder's reported `used` for two `window`s (stretched) after its report (see
    /// [`Account::counted_at`]). A ledger without a window ignores `used`.
    pub fn with_window(mut self, window: Duration) -> Ledger {
        self.window = window;
        self
    }

    /// How long a new owner stays in learning mode: a lease on a holder's clock, seen on the
    /// owner's.
    pub fn learning(timing: &Timing) -> Duration {
        timing.stretched(timing.lease)
    }

    /// The limit L this ledger splits.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Enrols `node` (nothing changes if it is enrolled): it enforces the cold share until it
    /// applies a grant.
    pub fn enrol(&mut self, node: &NodeId) {
        if self.holders.contains_key(node) {
            return;
        }
        self.holders.insert(
            node.clone(),
            Account::enrolled(self.first_message, self.next_grant),
        );
    }

    /// `node`'s agent started again and numbers its reports from `first_report` on: it may have
    /// lost the grant it applied (a start without pins enforces the cold share once it has
    /// joined), so it is counted at the cold share at least until a report of the new run says
    /// it applied a grant of this ledger, no older than one it applied before (the new run
    /// takes whatever grant reaches it first, a late copy of an older one included). Its grants
    /// stay counted too (a start with pins keeps enforcing them). A late report of the earlier
    /// run is ignored: what it says was applied may be gone.
    pub fn holder_restarted(&mut self, node: &NodeId, first_report: u64) {
        if let Some(account) = self.holders.get_mut(node) {
            account.cold_possible = true;
            account.reports_from = account.reports_from.max(first_report);
            // Its grant goes out again at once, not at the next keepalive.
            account.acked = None;
        }
    }

    /// Whether `node` is enrolled.
    pub fn is_enrolled(&self, node: &NodeId) -> bool {
        self.holders.contains_key(node)
    }

    /// Σ of the enrolled holders' reported demand at `now`, packets per window (see
    /// [`Account::demand_at`]).
    pub fn demand(&self, now: Duration) -> u64 {
        self.holders
            .values()
            .map(|a| u64::from(a.demand_at(now, &self.timing)))
            .sum()
    }

    /// The largest demand one holder reports (as [`Ledger::demand`] counts it).
    pub fn peak_demand(&self, now: Duration) -> u32 {
        self.holders
            .values()
            .map(|a| a.demand_at(now, &self.timing))
            .max()
            .unwrap_or(0)
    }

    /// Starts releasing the client: from now on no grant goes above the cold share.
    pub fn release(&mut self) {
        self.releasing = true;
    }

    pub fn is_releasing(&self) -> bool {
        self.releasing
    }

    /// In learning mode at `now`: no grant yet (see [`Ledger::numbered_from`]).
    pub fn is_learning(&self, now: Duration) -> bool {
        now < self.no_raise_until
    }

    /// Releasing, and no holder can be enforcing more than the cold share any more (every raise
    /// was superseded or its lease is over on the owner's clock): the holders may go back to the
    /// cold share, which sums to at most L, and the ledger may be dropped.
    pub fn releasable(&self, now: Duration, cold: u32) -> bool {
        self.releasing
            && self
                .holders
                .values()
                .all(|a| a.live.iter().all(|g| g.value <= cold || g.lapses_at <= now))
    }

    /// Drops the accounts of holders that are not among `members` (in order) any more:
    /// forgotten by the view (`super::membership`). The view counts no share for them, so
    /// an account kept would be counted at a cold share (or what it last admitted) for a node
    /// that is not there. An account goes only once none of its raises can be in force (each
    /// past its lease on the owner's clock) and what it reported admitted has left its window;
    /// until then it is counted as before. A node that comes back is enrolled afresh, counted at
    /// the cold share, its messages numbered above those the dropped account sent. Returns how
    /// many holders that are not members are left.
    pub fn forget_gone(&mut self, members: &[NodeId], now: Duration, cold: u32) -> usize {
        debug_assert!(members.is_sorted(), "members in order");
        let mut left = 0;
        let mut first_message = self.first_message;
        self.holders.retain(|node, account| {
            if members.binary_search(node).is_ok() {
                return true;
            }
            let raised = account
                .live
                .iter()
                .any(|g| g.value > cold && g.lapses_at > now);
            let admitted = account.used.is_some_and(|(_, until)| until > now);
            if raised || admitted {
                left += 1;
                return true;
            }
            first_message = first_message.max(account.next_message);
            false
        });
        self.first_message = first_message;
        left
    }

    /// Each enrolled holder, in id order, with its reported demand at `now` (as
    /// [`Ledger::demand`] counts it) and the newest grant sent to it, at most `cold` once its
    /// lease is over (`None`: none, it enforces the cold share): for `limiter cluster status`.
    pub fn holders_view(&self, now: Duration, cold: u32) -> Vec<(NodeId, u32, Option<u32>)> {
        self.holders
            .iter()
            .map(|(node, a)| {
                let newest = a.live.iter().max_by_key(|g| g.seq).map(|g| {
                    if now < g.lapses_at {
                        g.value
                    } else {
                        g.value.min(cold)
                    }
                });
                (node.clone(), a.demand_at(now, &self.timing), newest)
            })
            .collect()
    }

    /// The enrolled holders.
    pub fn enrolled(&self) -> impl Iterator<Item = &NodeId> {
        self.holders.keys()
    }

    /// Takes in `report` from `node`, received at `now` (owner clock). Reports from members not
    /// enrolled are ignored (see [`Ledger::enrol_and_receive`]).
    pub fn receive(&mut self, node: &NodeId, now: Duration, report: Report) {
        self.take_report(node, now, report, false);
    }

    /// [`Ledger::enrol`] then [`Ledger::receive`], with one search of the holders: a member
    /// that reports is live, and one that restarted enrols again.
    pub fn enrol_and_receive(&mut self, node: &NodeId, now: Duration, report: Report) {
        self.take_report(node, now, report, true);
    }

    fn take_report(&mut self, node: &NodeId, now: Duration, report: Report, enrol: bool) {
        let account = if enrol {
            let (first_message, first_grant) = (self.first_message, self.next_grant);
            self.holders
                .entry(node.clone())
                .or_insert_with(|| Account::enrolled(first_message, first_grant))
        } else {
            let Some(account) = self.holders.get_mut(node) else {
                return;
            };
            account
        };
        if report.seq < account.reports_from
            || account
                .last_report
                .is_some_and(|(seq, _)| seq >= report.seq)
        {
            return; // old or duplicate: the newer one already counted
        }
        account.last_report = Some((report.seq, now));
        account.demand = report.demand;
        // At most L: more is a bug or a hostile peer, and would only hold raises back.
        account.used = (!self.window.is_zero() && report.used > 0).then(|| {
            (
                report.used.min(self.limit),
                now + self.timing.stretched(self.window * 2),
            )
        });
        // This ledger's grants to this account (not an earlier, dropped account's), and none
        // older than one it applied: those stopped counting when it did (`live` keeps only
        // newer ones), so a holder that goes back to one (a new run of its agent, which takes
        // whatever grant arrives first, a late copy of an older one included) is not counted by
        // them but at the cold share at least, as it may enforce a lapsed grant's
        // `min(value, cold)`.
        let first = self
            .first_grant
            .max(account.first_grant)
            .max(account.acked_ever);
        let ours = report
            .applied
            .is_some_and(|a| a >= first && a < self.next_grant);
        if !ours && let Some(left) = report.raise_left {
            // Received after the holder sent it: the lease ends before `now + left` stretched.
            let until = now + self.timing.stretched(left);
            self.no_raise_until = self.no_raise_until.max(until);
        }
        // Another ledger's grant (an earlier owner's, or another node's, whose numbers may be
        // larger than ours, or one this ledger sent an account of the holder it dropped): not
        // ours to account for; the holder stays counted at the cold
        // share at least (its raises lapse during learning mode).
        if let Some(applied) = report
            .applied
            .filter(|&a| a >= first && a < self.next_grant)
        {
            // It never goes back to an older grant, nor to the cold share (until silence or a
            // release, which the bound covers).
            account.live.retain(|g| g.seq >= applied);
            account.lapsed = account.lapsed.filter(|&(seq, _)| seq >= applied);
            account.cold_possible = false;
            account.acked = account.acked.max(Some(applied));
            account.acked_ever = account.acked_ever.max(applied);
        } else {
            // A newer report that applies no grant of this ledger: whatever the holder applied
            // before, it enforces none of it now (it dropped it for the owner's silence, was
            // released or let go, or started again, and a message without a grant, as in
            // learning mode, does not bring it back). It may enforce the cold share: counted
            // so, even as its echo ends the silence on this side, until it reports applying
            // one of this ledger's grants again; its newest grant goes out again each round.
            account.cold_possible = true;
            account.acked = None;
        }
        if let Some(echo) = report.echo
            && let Some(at) = account.sent.at(echo)
        {
            account.echoed_sent_at = Some(account.echoed_sent_at.map_or(at, |a| a.max(at)));
        }
    }

    /// One round at `now` (owner clock) with `cold` the cold share and `others` the members not
    /// enrolled: the grants to send, one message per holder (holders whose grant is unchanged get
    /// it again, as a heartbeat; holders that never reported get none, as a grant needs a report
    /// to count its lease from).
    ///
    /// The targets are the water-filled demand. Each holder's grant is then the largest value up
    /// to its target that keeps, at every instant from now on, the bounds of all holders plus the
    /// cold shares of the others ≤ L. The bounds are step functions of time, so checking the
    /// instants where one of them changes covers all instants. Holders are taken cuts first, then
    /// raises from the smallest target up (max-min: the room goes to the small first).
    ///
    /// The sum of the bounds at those instants is computed once and kept up to date as grants
    /// are issued ([`Sums`]): a round costs O(n log n) for n holders (each has a few grants in
    /// flight), and an idle holder whose grant stays as it is costs no check at all.
    pub fn round(&mut self, now: Duration, cold: u32, others: u32) -> Vec<(NodeId, ToHolder)> {
        self.round_counting(now, &uniform(cold, others), false)
    }

    /// [`Ledger::round`], but a holder gets a message only when it is due one: a grant issued
    /// this round, or one it has not acknowledged yet (sent again every round until it does:
    /// the copy may have been lost), its first message, or none for [`Timing::keepalive`]. What
    /// the ledger counts is the same: a message withheld would only have carried a grant the
    /// holder already has. A holder that hears the owner less often counts as silent sooner on
    /// both sides, never later on the owner's: the owner counts from the newest message the
    /// holder echoed, which the holder received no later than its newest.
    pub fn round_due(&mut self, now: Duration, cold: u32, others: u32) -> Vec<(NodeId, ToHolder)> {
        self.round_counting(now, &uniform(cold, others), true)
    }

    /// [`Ledger::round`] (or, `due`, [`Ledger::round_due`]) with each member counted at the
    /// cold share it may hold ([`Colds`]).
    pub fn round_counting(
        &mut self,
        now: Duration,
        colds: &Colds<'_>,
        due: bool,
    ) -> Vec<(NodeId, ToHolder)> {
        let keepalive = if due {
            self.timing.keepalive()
        } else {
            Duration::ZERO
        };
        self.round_with(now, colds, keepalive)
    }

    fn round_with(
        &mut self,
        now: Duration,
        colds: &Colds<'_>,
        keepalive: Duration,
    ) -> Vec<(NodeId, ToHolder)> {
        let timing = self.timing;
        let cold = colds.share;
        let budget = u64::from(self.limit).saturating_sub(colds.others);
        let lease = timing.stretched(timing.lease);
        let wants: Vec<u32> = self
            .holders
            .values()
            .map(|a| a.demand_at(now, &timing))
            .collect();
        let mut targets = shares::targets(budget, &wants);
        if self.releasing || now < self.no_raise_until {
            for t in &mut targets {
                *t = (*t).min(cold);
            }
        }
        for account in self.holders.values_mut() {
            account.compact(now);
        }
        let mut grants: Vec<Option<Grant>> = vec![None; self.holders.len()];
        // Learning mode sends no grant at all: capping at the cold share would *raise* a holder
        // an earlier ledger had cut while others still enforce its raises.
        if now >= self.no_raise_until {
            // Each holder's cold share as counted: what it may enforce without a grant in force.
            let counted: Vec<u32> = self.holders.keys().map(|id| colds.of(id)).collect();
            let mut accounts: Vec<&mut Account> = self.holders.values_mut().collect();
            let now_bounds: Vec<u32> = accounts
                .iter()
                .zip(&counted)
                .map(|(a, &c)| a.bound_at(now, c, &timing))
                .collect();
            let mut order: Vec<usize> = (0..accounts.len()).collect();
            order.sort_by_key(|&i| (targets[i] > now_bounds[i], targets[i]));
            let mut sums = Sums::new(&accounts, now, lease, &counted, &timing);
            for i in order {
                let account = &mut *accounts[i];
                let Some((answers, received)) = account.last_report else {
                    continue;
                };
                let lapses_at = received + lease;
                let target = targets[i];
                // An idle holder's grant, re-sent: its target is the value of its newest grant,
                // at most the cold share (so the same before and after its lease). The holder's
                // bound is at least that value at every instant from now on, so the check
                // below would allow all of it; it is skipped.
                let idle = account
                    .live
                    .last()
                    .is_some_and(|g| g.value == target && target <= cold);
                let value = if idle {
                    target
                } else {
                    sums.feasible(account, target, now, lapses_at, counted[i], budget, &timing)
                };
                // The same value, at most the cold share or with more than half its lease to go:
                // send it again (the holder ignores a grant it has, and takes it back if it
                // dropped it for silence; the message still shows the owner alive). A cut is
                // not renewed: its lease changes nothing of what either side counts.
                let unchanged = account.live.last().filter(|g| {
                    g.value == value && (value <= cold || g.lapses_at >= now + timing.lease / 2)
                });
                grants[i] = Some(match unchanged {
                    Some(g) => Grant {
                        seq: g.seq,
                        value,
                        answers: g.answers,
                    },
                    None => {
                        let seq = self.next_grant;
                        self.next_grant += 1;
                        sums.issue(
                            account,
                            Counted {
                                seq,
                                value,
                                answers,
                                lapses_at,
                            },
                            now,
                            counted[i],
                            &timing,
                        );
                        Grant {
                            seq,
                            value,
                            answers,
                        }
                    }
                });
            }
        }
        let mut out = Vec::with_capacity(self.holders.len());
        for ((id, account), grant) in self.holders.iter_mut().zip(grants) {
            // A grant issued this round is above every acknowledged one, so unacknowledged too.
            let due = grant.is_some_and(|g| account.acked.is_none_or(|a| a < g.seq))
                || account.last_report.is_none()
                || account
                    .sent
                    .newest_at()
                    .is_none_or(|at| now.saturating_sub(at) >= keepalive);
            if !due {
                continue;
            }
            let message = account.next_message;
            account.next_message += 1;
            account.sent.push(message, now);
            out.push((
                id.clone(),
                ToHolder {
                    message,
                    grant,
                    terms: Some(Terms {
                        lease: timing.lease,
                        silence: timing.silence,
                    }),
                },
            ));
        }
        out
    }

    /// The most that all members may be enforcing at `now`: the bounds of the enrolled plus the
    /// cold shares of the `others`. Never above L (the tests assert it; `round` keeps it).
    pub fn in_force_bound(&self, now: Duration, cold: u32, others: u32) -> u64 {
        let fixed = u64::from(cold) * u64::from(others);
        fixed
            + self
                .holders
                .values()
                .map(|a| u64::from(a.bound_at(now, cold, &self.timing)))
                .sum::<u64>()
    }
}

/// Every member counted at the cold share `cold`, `others` of them not enrolled.
fn uniform(cold: u32, others: u32) -> Colds<'static> {
    Colds {
        share: cold,
        of: &|_| None,
        others: u64::from(cold) * u64::from(others),
    }
}
