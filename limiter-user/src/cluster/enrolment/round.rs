//! One enrolment round: each held client's report and each owned client's grants, and the
//! grant changes for the datapath.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use super::{
    Enrolment, GrantMsg, Outgoing, PolicyInfo, QUIET_BEFORE_RELEASE, ReportMsg, Reported, View,
    Write, WriteGrants, is_hot, written,
};
use crate::cluster::{NodeId, PolicyName, demand::demand, lease::Colds, owner, shares::cold_share};

impl Enrolment {
    /// [`Enrolment::round_writing`] with a datapath that takes every change: returns the
    /// messages and the changes, in order.
    pub fn round(
        &mut self,
        now: Duration,
        view: &View<'_>,
        info: &dyn Fn(PolicyName) -> Option<PolicyInfo>,
    ) -> (BTreeMap<NodeId, Outgoing>, Vec<Write>) {
        let mut all = Vec::new();
        let out = self.round_writing(now, view, info, &mut |writes: &[Write]| {
            all.extend_from_slice(writes);
            Vec::new()
        });
        (out, all)
    }

    /// One round at `now`: the holders' reports and the owners' grants, by member (this node's
    /// own are delivered here and not returned). Grant changes go to `write` first (the grants
    /// received since the last round), so that each report says which grant the datapath
    /// holds, never one it refused, and again at the end (this node's own grants, releases).
    pub fn round_writing(
        &mut self,
        now: Duration,
        view: &View<'_>,
        info: &dyn Fn(PolicyName) -> Option<PolicyInfo>,
        write: &mut WriteGrants<'_>,
    ) -> BTreeMap<NodeId, Outgoing> {
        self.flush(now, write);
        self.take_pending(now, view);
        let mut out: BTreeMap<NodeId, Outgoing> = BTreeMap::new();
        // Holders: demand, then a report; drop a client whose owner is silent and that is idle.
        let silence = self.timing.silence();
        let mut dropped = Vec::new();
        let mut busy = Vec::new();
        let mut lapsed = 0;
        // A reload that changed a policy (or dropped it) has every holder looked at.
        let reloaded = self
            .seen_policies
            .iter()
            .any(|(&name, &seen)| info(name) != seen);
        if reloaded {
            self.seen_policies.clear();
        }
        for (client, held) in self.held.iter_mut() {
            if !reloaded && held.quiet_until.is_some_and(|until| now < until) {
                continue;
            }
            written::wake(held, &mut self.written, client);
            let policy = *self
                .seen_policies
                .entry(held.policy)
                .or_insert_with(|| info(held.policy));
            let Some(policy) = policy else {
                // A reload here dropped or changed its policy: its owner may not have that
                // reload yet, and counts a cut it acknowledged until this node is silent.
                written::keep_cut(&mut self.written, client, held.cold, now);
                dropped.push(*client);
                continue;
            };
            held.window = Some(policy.window);
            held.cold = Some(policy.cold);
            held.demand = demand(&held.samples, now, policy.window);
            if let Some(&cap) = self.caps.get(client) {
                // What this node would admit of more: the owner gives the rest to others.
                held.demand = held.demand.min(cap);
            }
            let in_force = held.holder.in_force(now);
            if let Some((value, Some(until))) = in_force
                && until <= now
                && value > policy.cold
            {
                let seq = held.holder.in_force_seq(now);
                if held.lapsed != seq {
                    held.lapsed = seq;
                    lapsed += 1;
                }
            }
            // The owner silent for the silence limit (or never heard: it opened no ledger, the
            // demand was not hot): back to the cold share. A client still hot is held afresh at
            // once, attached to the owner rendezvous picks now, rather than at its next notice
            // (the programs report it again in the next window it reaches 0.8 of its share; a
            // ring that was full may have lost that one too).
            if held.holder.owner_silent(now) && now.saturating_sub(held.attached_at) >= silence {
                dropped.push(*client);
                if is_hot(held.demand, policy.cold) {
                    busy.push((*client, held.policy, std::mem::take(&mut held.samples)));
                }
                continue;
            }
            // What the datapath holds, not what the holder took in: a refused write leaves the
            // older grant in force, and the owner must go on counting it. Only a grant of this
            // holder's owner: what the maps keep after a release or drop (adopted pins are kept
            // for a silence limit) may be another owner's, whose numbers this owner cannot tell
            // from its own.
            let own = held.holder.in_force_seq(now);
            let written = self.written.get(client);
            let applied = written.and_then(|w| w.seq).filter(|&seq| own == Some(seq));
            // The lease left on what the kernel holds (an adopted grant's included).
            let raise_left = written
                .and_then(|w| w.until?.checked_sub(now))
                .filter(|d| !d.is_zero());
            let next = Reported {
                at: now,
                idle: if held.demand > 0 || held.used > 0 {
                    0
                } else {
                    held.reported.map_or(1, |r| r.idle.saturating_add(1))
                },
                applied,
                echo: held.holder.echo(),
            };
            // A raise in force: its lease is what the owner renews, answering the newest report.
            let raise = written.is_some_and(|w| {
                w.value != u32::MAX && w.value > policy.cold && w.until.is_some_and(|u| u > now)
            });
            if !next.has_news(held.reported, raise, held.holder.keepalive()) {
                // Nothing to tell: quiet until time alone could change that. Its grant in force
                // (if any) is wanted as it is meanwhile: stamped so, if the last writes wanted
                // it (not if the datapath refused it: that one is offered again each round).
                if held.is_idle()
                    && !raise
                    && (in_force.is_none()
                        || written::hush(&mut self.written, client, self.writes_made))
                {
                    held.quiet_until = Some(held.quiet_deadline(now, silence, in_force));
                }
                continue;
            }
            held.reported = Some(next);
            let mut report = held.holder.report(now, held.demand, held.used);
            report.applied = applied;
            report.raise_left = raise_left;
            out.entry(held.owner.clone())
                .or_default()
                .reports
                .push(ReportMsg {
                    client: *client,
                    policy: held.policy,
                    report,
                });
        }
        self.raises_lapsed += lapsed;
        for client in dropped {
            self.held.remove(&client);
        }
        for (client, policy, samples) in busy {
            self.hot(now, view, client, policy);
            if let Some(held) = self.held.get_mut(&client) {
                held.samples = samples;
            }
        }
        if let Some(mine) = out.remove(&self.me) {
            for msg in mine.reports {
                let me = self.me.clone();
                self.receive_report(now, view, &me, msg, info(msg.policy));
            }
        }
        // Owners: enrol the live members, water-fill, release what is quiet. Enrolling and the
        // owner check are done again only when the view changed (O(members) hashes a client).
        let mut closed = Vec::new();
        let view_changed = view.agreed
            && (self.checked_view.0 != view.members || self.checked_view.1 != view.live);
        if view_changed {
            self.checked_view = (view.members.to_vec(), view.live.to_vec());
        }
        // Per (L, this node's cold share): the members whose maps hold a larger one (by index
        // in `view.members`, in order, with it), usually none.
        let mut larger: HashMap<(u32, u32), Vec<(usize, u32)>> = HashMap::new();
        for (client, owned) in self.owned.iter_mut() {
            let Some(policy) = info(owned.policy) else {
                closed.push(*client);
                continue;
            };
            // A ledger not checked under this view (new, or created while views differed) may
            // hold members that this view no longer has, as one whose view changed may.
            let recheck = view_changed || !owned.checked;
            if view.agreed && recheck {
                owned.checked = true;
                for member in view.live {
                    owned.ledger.enrol(member);
                }
                // Rendezvous now picks another member (one joined): hand the client over by
                // releasing it (no more raises; the holders go back to the cold share once none
                // can be in force), so two ledgers never raise the same client for long.
                if owner::owner(client, view.members) != Some(&self.me) {
                    owned.ledger.release();
                }
            }
            // The ledger's budget is another L: release and start afresh. (In the agent a
            // policy's name is its content, so a reload that changes L renames the policy and
            // the ledger is closed above; this holds for callers whose names outlive L.)
            if policy.limit != owned.ledger.limit() {
                owned.ledger.release();
            }
            let cold = policy.cold;
            // Holders the view no longer has (a member heard from only, never through an
            // endpoint, is forgotten after a while of silence) hold no share in it: their
            // accounts go once none of their raises can be in force, or each would hold a cold
            // share of L for as long as the client stays hot.
            if view.agreed && (recheck || owned.gone > 0) {
                owned.gone = owned.ledger.forget_gone(view.members, now, cold);
            }
            // The members not enrolled are counted at the cold share, or the larger one their
            // maps hold (one that has not taken up a join yet); holders that are not members any
            // more (`gone`, exact once the view agrees) are counted by their own accounts, and
            // are not among them.
            let gone = if view.agreed { owned.gone } else { 0 };
            let enrolled = owned.ledger.enrolled().count().saturating_sub(gone) as u32;
            let others = view.agreed_members.saturating_sub(enrolled);
            let lagging = &*larger.entry((policy.limit, cold)).or_insert_with(|| {
                (view.counts.iter().enumerate())
                    .filter_map(|(i, n)| Some((i, cold_share(policy.limit, (*n)?))))
                    .filter(|&(_, c)| c > cold)
                    .collect()
            });
            let above: u64 = lagging
                .iter()
                .filter(|&&(i, _)| {
                    (view.members.get(i)).is_some_and(|m| !owned.ledger.is_enrolled(m))
                })
                .map(|&(_, c)| u64::from(c - cold))
                .sum();
            let of = |member: &NodeId| {
                let i = view.members.binary_search(member).ok()?;
                let j = lagging.binary_search_by_key(&i, |&(j, _)| j).ok()?;
                Some(lagging[j].1)
            };
            let colds = Colds {
                share: cold,
                of: &of,
                others: u64::from(cold) * u64::from(others) + above,
            };
            // Not while a member is hot: a polite client near its cold share on one member keeps
            // its slack (the member would report it hot again at once).
            let quiet = owned.ledger.demand(now) * 2 <= u64::from(cold) * u64::from(enrolled)
                && !is_hot(owned.ledger.peak_demand(now), cold);
            owned.quiet_since = if quiet {
                owned.quiet_since.or(Some(now))
            } else {
                None
            };
            if !owned.ledger.is_releasing()
                && owned
                    .quiet_since
                    .is_some_and(|q| now.saturating_sub(q) >= QUIET_BEFORE_RELEASE)
            {
                owned.ledger.release();
            }
            let release = owned.ledger.releasable(now, cold);
            // The release goes to every holder (the ledger is dropped after it): one not told
            // would keep its cut until the owner's silence.
            let messages = owned.ledger.round_counting(now, &colds, !release);
            for (node, message) in messages {
                out.entry(node).or_default().grants.push(GrantMsg {
                    client: *client,
                    policy: owned.policy,
                    message,
                    release,
                });
            }
            if release {
                closed.push(*client);
            }
        }
        for client in closed {
            self.owned.remove(&client);
        }
        if let Some(mine) = out.remove(&self.me) {
            for msg in mine.grants {
                let me = self.me.clone();
                self.receive_grant(now, view, &me, msg, info(msg.policy));
            }
        }
        self.flush(now, write);
        out
    }
}
