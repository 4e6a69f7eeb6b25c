//! Heartbeats and their answers between members: the links that delay and lose them, and
//! their size on the wire (the real prost messages of `proto/cluster.proto`).

use std::{net::SocketAddr, time::Duration};

use limiter_user::{
    cluster::NodeId,
    proto::cluster::{GrantValue, Heartbeat},
};
use prost::Message as _;

use super::{
    Event, Heard, MAX_CLIENTS_PER_MESSAGE, Outgoing, PolicyInfo, Sim, Terms, View, Views,
    measure::cpu_now,
    member::{node_addr, node_id},
    membership,
};

pub(super) enum Message {
    Heartbeat {
        from: usize,
        to: usize,
        report: membership::Report,
        outgoing: Option<Outgoing>,
    },
    Answer {
        from: usize,
        to: usize,
        report: membership::Report,
        echo: u64,
    },
}

/// Bytes a length-delimited field of `len` bytes takes with its key (field numbers < 16).
fn field_len(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

impl Sim {
    pub(super) fn send_heartbeats(&mut self, i: usize, now: Duration) {
        let instant = self.t0 + now;
        let fixed = self.cfg.views == Views::Fixed;
        let members = self.nodes.len() as u32;
        let node = &mut self.nodes[i];
        let me = if fixed {
            membership::Report {
                node: node.id.clone(),
                incarnation: node.incarnation,
                seq: node.seq,
                members,
                view_hash: 0x7e57_7e57_7e57_7e57,
                policies_hash: 0x7e57_7e57_7e57_7e57,
                share_members: members,
            }
        } else {
            node.membership
                .report(node.incarnation, node.seq, instant, &node.share)
        };
        node.report = Some(me.clone());
        let endpoints: Vec<SocketAddr> = if fixed {
            (0..self.nodes.len())
                .filter(|&j| j != i)
                .map(node_addr)
                .collect()
        } else {
            self.nodes[i].membership.endpoints().collect()
        };
        let half_timeout = self.cfg.peer_timeout / 2;
        for addr in endpoints {
            let Some(&j) = self.addrs.get(&addr) else {
                continue;
            };
            let node = &mut self.nodes[i];
            if node
                .in_flight
                .get(&addr)
                .is_some_and(|&(_, sent)| now.saturating_sub(sent) < half_timeout)
            {
                continue;
            }
            node.seq += 1;
            let report = membership::Report {
                seq: node.seq,
                ..me.clone()
            };
            let peer = if fixed {
                Some(node_id(j))
            } else {
                node.membership.endpoint_node(addr).cloned()
            };
            let outgoing = peer.clone().and_then(|id| {
                let waiting = node.outbox.get_mut(&id)?;
                let out = waiting.take(MAX_CLIENTS_PER_MESSAGE);
                if waiting.is_empty() {
                    node.outbox.remove(&id);
                }
                Some(out)
            });
            if !fixed {
                node.in_flight.insert(addr, (node.seq, now));
            }
            // Addressed to the member last heard at the address, as the agent's are.
            let base = heartbeat_len(&report, 0, peer.as_ref());
            let entries = outgoing.as_ref().map_or(0, |o| self.outgoing_len(o));
            let node = &mut self.nodes[i];
            node.stats.heartbeat_bytes += base as u64;
            node.stats.enrolment_bytes += entries as u64;
            if let Some(o) = &outgoing {
                node.stats.reports += o.reports.len() as u64;
                node.stats.grants += o.grants.len() as u64;
            }
            if fixed {
                // The answer, as `take_heartbeat` would count it (none is simulated).
                self.nodes[j].stats.heartbeat_bytes +=
                    heartbeat_len(&report, report.seq, None) as u64;
                if outgoing.is_none() {
                    continue;
                }
            }
            self.send(
                i,
                j,
                Message::Heartbeat {
                    from: i,
                    to: j,
                    report,
                    outgoing,
                },
            );
        }
    }

    /// Bytes the enrolment entries of `out` add to a heartbeat.
    fn outgoing_len(&mut self, out: &Outgoing) -> usize {
        let mut len = 0;
        for r in &out.reports {
            let m = &mut self.scratch_report;
            m.client.clear();
            m.client.extend_from_slice(&r.client);
            m.policy = r.policy;
            m.seq = r.report.seq;
            m.demand = r.report.demand;
            m.applied = r.report.applied;
            m.echo = r.report.echo;
            len += field_len(m.encoded_len());
        }
        for g in &out.grants {
            let m = &mut self.scratch_grant;
            m.client.clear();
            m.client.extend_from_slice(&g.client);
            m.policy = g.policy;
            m.message = g.message.message;
            m.grant = g.message.grant.map(|v| GrantValue {
                seq: v.seq,
                value: v.value,
                answers: v.answers,
            });
            m.release = g.release;
            (m.lease_ms, m.silence_ms) = wire_terms(g.message.terms);
            len += field_len(m.encoded_len());
        }
        len
    }

    fn send(&mut self, from: usize, to: usize, message: Message) {
        let (up, delay) = self.links[from][to];
        if !up || (self.cfg.loss > 0.0 && self.rng.unit() < self.cfg.loss) {
            return;
        }
        let jitter = self.rng.duration(Duration::ZERO, self.cfg.jitter);
        let slot = match self.free.pop() {
            Some(s) => {
                self.slab[s as usize] = Some(message);
                s
            }
            None => {
                self.slab.push(Some(message));
                (self.slab.len() - 1) as u32
            }
        };
        self.schedule(self.real + delay + jitter, Event::Deliver(slot));
    }

    pub(super) fn deliver(&mut self, slot: u32) {
        let Some(message) = self.slab[slot as usize].take() else {
            return;
        };
        self.free.push(slot);
        match message {
            Message::Heartbeat {
                from,
                to,
                report,
                outgoing,
            } => self.take_heartbeat(from, to, &report, outgoing),
            Message::Answer {
                from,
                to,
                report,
                echo,
            } => {
                let node = &mut self.nodes[to];
                if !node.alive {
                    return;
                }
                let now = node.clock.at(self.real);
                let addr = node_addr(from);
                let half_timeout = self.cfg.peer_timeout / 2;
                match node.in_flight.get(&addr) {
                    Some(&(seq, sent)) if seq == echo && now - sent < half_timeout => {
                        node.in_flight.remove(&addr);
                        // A refusal (a peer claiming this member's id) cannot happen here.
                        let heard =
                            node.membership
                                .answered(addr, self.t0 + sent, &report, self.t0 + now);
                        if heard == Ok(Heard::Restarted) {
                            node.enrolment
                                .holder_restarted(&report.node, report.incarnation);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Member `to` takes in a heartbeat (its membership part, then its enrolment messages,
    /// as the agent's `heartbeat` handler) and answers.
    fn take_heartbeat(
        &mut self,
        from: usize,
        to: usize,
        report: &membership::Report,
        outgoing: Option<Outgoing>,
    ) {
        let real = self.real;
        let node = &mut self.nodes[to];
        if !node.alive {
            return;
        }
        let now = node.clock.at(real);
        let instant = self.t0 + now;
        let fixed = self.cfg.views == Views::Fixed;
        if !fixed {
            match node.membership.heard(report, instant) {
                Ok(Heard::Known) => {}
                // Before the answer, as the agent does.
                Ok(Heard::Restarted) => node
                    .enrolment
                    .holder_restarted(&report.node, report.incarnation),
                Err(_) => return,
            }
        }
        node.seq += 1;
        let answer = match &node.report {
            Some(me) => membership::Report {
                seq: node.seq,
                ..me.clone()
            },
            None => node
                .membership
                .report(node.incarnation, node.seq, instant, &node.share),
        };
        if let Some(out) = outgoing
            && !(out.reports.is_empty() && out.grants.is_empty())
        {
            let started = cpu_now();
            let info = PolicyInfo {
                limit: self.cfg.limit,
                window: self.cfg.window,
                cold: node.cold,
            };
            let share = node.share;
            let sender = node_id(from);
            // The view is read only for a client this member neither owns nor holds.
            let needs_view = out.reports.iter().any(|r| !node.enrolment.owns(&r.client))
                || out.grants.iter().any(|g| !node.enrolment.holds(&g.client));
            let (members, live, agreed) = match (needs_view, fixed) {
                (true, false) => node.membership.enrolment_view(instant),
                (true, true) => (self.everyone.to_vec(), self.everyone.to_vec(), true),
                (false, _) => (Vec::new(), Vec::new(), false),
            };
            let view = View {
                members: &members,
                live: &live,
                agreed_members: share.members,
                agreed,
                // Taking messages in counts nothing (the rounds do).
                counts: &[],
            };
            for msg in out.reports {
                node.enrolment
                    .receive_report(now, &view, &sender, msg, Some(info));
            }
            for mut msg in out.grants {
                // Through the wire: the lease in whole ms down, the silence limit up.
                let (lease_ms, silence_ms) = wire_terms(msg.message.terms);
                msg.message.terms = msg.message.terms.map(|_| Terms {
                    lease: Duration::from_millis(u64::from(lease_ms)),
                    silence: Duration::from_millis(u64::from(silence_ms)),
                });
                node.enrolment
                    .receive_grant(now, &view, &sender, msg, Some(info));
            }
            node.stats.cpu_pending += cpu_now() - started;
        }
        if fixed {
            return;
        }
        let echo = report.seq;
        let len = heartbeat_len(&answer, echo, None);
        self.nodes[to].stats.heartbeat_bytes += len as u64;
        self.send(
            to,
            from,
            Message::Answer {
                from: to,
                to: from,
                report: answer,
                echo,
            },
        );
    }
}

/// A grant's terms as the wire carries them: the lease in ms rounded down, the silence limit
/// rounded up (0, 0: none).
fn wire_terms(terms: Option<Terms>) -> (u32, u32) {
    terms.map_or((0, 0), |t| {
        (
            u32::try_from(t.lease.as_millis()).unwrap_or(u32::MAX),
            u32::try_from(t.silence.as_nanos().div_ceil(1_000_000)).unwrap_or(u32::MAX),
        )
    })
}

/// Bytes of a heartbeat (or answer) without enrolment entries, addressed to `to`.
fn heartbeat_len(report: &membership::Report, echo: u64, to: Option<&NodeId>) -> usize {
    Heartbeat {
        node_id: report.node.to_string(),
        incarnation: report.incarnation,
        seq: report.seq,
        echo,
        members: report.members,
        view_hash: report.view_hash,
        policies_hash: report.policies_hash,
        share_members: report.share_members,
        nonce: 0x5eed_5eed_5eed_5eed,
        reports: Vec::new(),
        grants: Vec::new(),
        to_node_id: to.map(ToString::to_string).unwrap_or_default(),
    }
    .encoded_len()
}
