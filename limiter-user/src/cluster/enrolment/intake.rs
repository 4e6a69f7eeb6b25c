//! Taking in peers' enrolment messages: a holder's reports on the owner's side, an owner's
//! grants on the holder's, and the budget of rendezvous hashes one heartbeat may cost.

use std::time::Duration;

use super::{Enrolment, GrantMsg, Outgoing, Owned, PolicyInfo, ReportMsg, View, is_hot, written};
use crate::cluster::{NodeId, PolicyName, lease::Ledger, owner};

/// The most rendezvous hashes (one per member, SHA-256) the enrolment messages of one heartbeat
/// may cost, half for its reports and half for its grants: those about clients this node
/// neither owns nor holds, which open a ledger or an attachment if this node (or the sender) is
/// the owner. A member holding the cluster's credentials could otherwise send 25,000 of each
/// for random clients and hold the enrolment lock for 50,000 × members hashes, heartbeat after
/// heartbeat: at 50 members, 152 ms for the 50,000 checks against 4 ms for the 1,310 this
/// budget allows (release build on the 2-CPU test machine, 2026-12-07, a probe not kept). The
/// others are ignored, as if lost on the way: the sender sends them again (a hot client's
/// report every round, a grant not acknowledged every round), and `take_in` starts at another
/// place in the next heartbeat. An honest heartbeat carries this many only when thousands of
/// clients grow hot at once.
pub const MAX_HASHES_PER_HEARTBEAT: usize = 1 << 16;

/// Takes `members` hashes from `budget`: false when it has fewer left.
fn spend(budget: &mut usize, members: usize) -> bool {
    match budget.checked_sub(members) {
        Some(left) => {
            *budget = left;
            true
        }
        None => false,
    }
}

/// `items` from `start % len` on, wrapping around.
fn rotated<T>(items: &[T], start: u64) -> impl Iterator<Item = &T> {
    let at = if items.is_empty() {
        0
    } else {
        (start % items.len() as u64) as usize
    };
    items[at..].iter().chain(&items[..at])
}

impl Enrolment {
    /// Takes in the enrolment messages of one heartbeat of `from`, with at most
    /// [`MAX_HASHES_PER_HEARTBEAT`] rendezvous hashes for those about clients this node neither
    /// owns nor holds, starting at another place each time. Returns how many such messages were
    /// ignored for want of hashes.
    pub fn take_in(
        &mut self,
        now: Duration,
        view: &View<'_>,
        from: &NodeId,
        incoming: &Outgoing,
        info: &dyn Fn(PolicyName) -> Option<PolicyInfo>,
    ) -> u64 {
        // xorshift64: a start that does not follow the order the sender keeps.
        self.rotation ^= self.rotation << 13;
        self.rotation ^= self.rotation >> 7;
        self.rotation ^= self.rotation << 17;
        let mut ignored = 0;
        let mut budget = MAX_HASHES_PER_HEARTBEAT / 2;
        for &msg in rotated(&incoming.reports, self.rotation) {
            if !self.report_within(now, view, from, msg, info(msg.policy), &mut budget) {
                ignored += 1;
            }
        }
        let mut budget = MAX_HASHES_PER_HEARTBEAT / 2;
        for &msg in rotated(&incoming.grants, self.rotation) {
            if !self.grant_within(now, view, from, msg, info(msg.policy), &mut budget) {
                ignored += 1;
            }
        }
        self.over_budget += ignored;
        ignored
    }

    /// Takes in a holder's report. `info`: the report's policy here (`None`: not a global policy
    /// of this node's config; the report is ignored).
    pub fn receive_report(
        &mut self,
        now: Duration,
        view: &View<'_>,
        from: &NodeId,
        msg: ReportMsg,
        info: Option<PolicyInfo>,
    ) {
        self.report_within(now, view, from, msg, info, &mut { usize::MAX });
    }

    /// [`Enrolment::receive_report`], with at most `budget` rendezvous hashes to spend: false
    /// if the report was ignored for want of them.
    fn report_within(
        &mut self,
        now: Duration,
        view: &View<'_>,
        from: &NodeId,
        msg: ReportMsg,
        info: Option<PolicyInfo>,
        budget: &mut usize,
    ) -> bool {
        let Some(info) = info else {
            return true;
        };
        if !self.owned.contains_key(&msg.client) {
            // A ledger opens for hot demand, 0.8 of the cold share or more, as the programs report
            // it (a report that is not hot, such as a released holder's last one, opens nothing).
            // The cheap tests first: the owner's is a hash per member, and a message may carry
            // tens of thousands of reports.
            if !(view.agreed && is_hot(msg.report.demand, info.cold)) {
                return true;
            }
            if !spend(budget, view.members.len()) {
                return false;
            }
            if owner::owner(&msg.client, view.members) != Some(&self.me) {
                return true;
            }
            if self.owned.len() >= self.capacity {
                self.refused += 1;
                return true;
            }
            let first = self.number(now);
            let mut ledger = Ledger::numbered_from(
                info.limit,
                self.timing,
                first,
                now + Ledger::learning(&self.timing),
            )
            .with_window(info.window);
            for member in view.live {
                ledger.enrol(member);
            }
            self.owned.insert(
                msg.client,
                Owned {
                    policy: msg.policy,
                    ledger,
                    quiet_since: None,
                    checked: false,
                    gone: 0,
                },
            );
        }
        let Some(owned) = self.owned.get_mut(&msg.client) else {
            return true;
        };
        if owned.policy != msg.policy {
            return true;
        }
        // A member that reports is live; one that restarted enrols again. A holder enrolled
        // here, whatever the view (views may differ meanwhile), is looked at again by the next
        // round whose view agrees: it may be a member that view no longer has.
        if !owned.ledger.is_enrolled(from) {
            owned.gone += 1;
        }
        owned.ledger.enrol_and_receive(from, now, msg.report);
        true
    }

    /// Takes in an owner's message; `info` is the message's policy here (`None`: not a global
    /// policy of this node).
    ///
    /// Only the client's owner may grant, only under a global policy of this node (the one the
    /// client is held under), and no grant is above the policy's L: no share of L is larger, so
    /// a larger value (a member's bug, or a hostile one holding the cluster's credentials) is
    /// taken as L. Grants otherwise are counted as foreign and ignored.
    pub fn receive_grant(
        &mut self,
        now: Duration,
        view: &View<'_>,
        from: &NodeId,
        msg: GrantMsg,
        info: Option<PolicyInfo>,
    ) {
        self.grant_within(now, view, from, msg, info, &mut { usize::MAX });
    }

    /// [`Enrolment::receive_grant`], with at most `budget` rendezvous hashes to spend: false if
    /// the message was ignored for want of them.
    fn grant_within(
        &mut self,
        now: Duration,
        view: &View<'_>,
        from: &NodeId,
        mut msg: GrantMsg,
        info: Option<PolicyInfo>,
        budget: &mut usize,
    ) -> bool {
        let Some(info) = info else {
            self.foreign += 1;
            return true;
        };
        if let Some(grant) = &mut msg.message.grant {
            // Below u32::MAX too: `written` marks a grant the maps refused with it.
            grant.value = grant.value.min(info.limit).min(u32::MAX - 1);
        }
        match self.held.get_mut(&msg.client) {
            Some(held) if held.policy != msg.policy => self.foreign += 1,
            Some(held) if held.owner == *from => {
                // A release older than a message heard since (a late copy, or an earlier
                // ledger's) would drop a grant the owner's newer ledger counts.
                if msg.release && held.holder.echo().is_some_and(|e| msg.message.message < e) {
                    return true;
                }
                written::wake(held, &mut self.written, &msg.client);
                if msg.release {
                    self.held.remove(&msg.client);
                } else {
                    held.holder.receive(now, msg.message);
                }
            }
            Some(_) => self.foreign += 1,
            None => {
                if msg.release {
                    return true;
                }
                if !view.agreed {
                    self.foreign += 1;
                    return true;
                }
                if !spend(budget, view.members.len()) {
                    return false;
                }
                if owner::owner(&msg.client, view.members) != Some(from) {
                    self.foreign += 1;
                    return true;
                }
                if self.attach(msg.client, from.clone(), msg.policy, now)
                    && let Some(held) = self.held.get_mut(&msg.client)
                {
                    held.holder.receive(now, msg.message);
                }
            }
        }
        true
    }
}
