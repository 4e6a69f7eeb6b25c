//! `Ledger::round` as it was before it kept the sums of the bounds up to date (it summed every
//! other holder's bound at every instant, for every holder: O(n³)), kept as the reference the
//! faster one must agree with, decision for decision.

use proptest::prelude::*;

use super::*;
use crate::cluster::lease::account::Counted;

fn round(ledger: &mut Ledger, now: Duration, cold: u32, others: u32) -> Vec<(NodeId, ToHolder)> {
    let timing = ledger.timing;
    let budget = u64::from(ledger.limit).saturating_sub(u64::from(cold) * u64::from(others));
    let lease = timing.stretched(timing.lease);
    let wants: Vec<u32> = ledger
        .holders
        .values()
        .map(|a| a.demand_at(now, &timing))
        .collect();
    let mut targets = shares::targets(budget, &wants);
    if ledger.releasing || now < ledger.no_raise_until {
        for t in &mut targets {
            *t = (*t).min(cold);
        }
    }
    for account in ledger.holders.values_mut() {
        account.compact(now);
    }
    let ids: Vec<NodeId> = ledger.holders.keys().cloned().collect();
    let now_bounds: Vec<u32> = ledger
        .holders
        .values()
        .map(|a| a.bound_at(now, cold, &timing))
        .collect();
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| (targets[i] > now_bounds[i], targets[i]));
    let mut grants: Vec<Option<Grant>> = vec![None; ids.len()];
    for i in order {
        if now < ledger.no_raise_until {
            continue;
        }
        let Some((answers, received)) = ledger.holders[&ids[i]].last_report else {
            continue;
        };
        let lapses_at = received + lease;
        let value = feasible(ledger, i, &ids, targets[i], now, lapses_at, cold, budget);
        let seq = ledger.next_grant;
        let account = ledger.holders.get_mut(&ids[i]).expect("a holder");
        // A cut is not renewed (as in `Ledger::round`).
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
                ledger.next_grant += 1;
                account.live.push(Counted {
                    seq,
                    value,
                    answers,
                    lapses_at,
                });
                Grant {
                    seq,
                    value,
                    answers,
                }
            }
        });
    }
    let mut out = Vec::with_capacity(ids.len());
    for (account, (id, grant)) in ledger.holders.values_mut().zip(ids.into_iter().zip(grants)) {
        let message = account.next_message;
        account.next_message += 1;
        account.sent.push(message, now);
        out.push((
            id,
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

#[expect(clippy::too_many_arguments, reason = "the reference, as it was")]
fn feasible(
    ledger: &Ledger,
    i: usize,
    ids: &[NodeId],
    target: u32,
    now: Duration,
    lapses_at: Duration,
    cold: u32,
    budget: u64,
) -> u32 {
    let timing = &ledger.timing;
    let lapses_at = lapses_at.max(now);
    let mut instants: Vec<Duration> = vec![now, lapses_at];
    for account in ledger.holders.values() {
        instants.extend(account.changes(timing).filter(|&t| t > now));
    }
    let mine = &ledger.holders[&ids[i]];
    let mut value = target;
    for at in instants {
        let rest: u64 = ids
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, id)| u64::from(ledger.holders[id].counted_at(at, cold, timing)))
            .sum();
        let room = budget.saturating_sub(rest);
        // What it may enforce stays possible, but not the cold share it is counted at for want
        // of an applied grant (see `Sums::feasible`).
        let cap = u64::from(mine.bound_with(false, at, cold, timing)).max(room);
        let cap = u32::try_from(cap).unwrap_or(u32::MAX);
        if at < lapses_at {
            value = value.min(cap);
        } else if cap < cold {
            // After its lease the grant counts as min(value, cold).
            value = value.min(cap);
        }
    }
    value
}

#[derive(Debug, Clone)]
enum Op {
    Enrol(usize),
    /// A report from `node`: its seq goes back by `back` (a late or duplicate copy); it
    /// acknowledges the grant and echoes the message picked by `applied` and `echo` among
    /// those sent to it (`None`: none).
    Report {
        node: usize,
        demand: u32,
        /// What the holder's window holds as admitted.
        used: u32,
        back: u8,
        applied: Option<prop::sample::Index>,
        echo: Option<prop::sample::Index>,
    },
    /// Time moves on by this many ms, then a round with this cold share and others.
    Round {
        ms: u16,
        cold: u32,
        others: u32,
    },
    Release,
}

fn op(limit: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0usize..12).prop_map(Op::Enrol),
        6 => (
            0usize..12,
            prop_oneof![0..limit.max(1) * 2, Just(0)],
            prop_oneof![Just(0), 0..limit.max(1) * 2],
            prop_oneof![4 => Just(0u8), 1 => 0u8..3],
            prop::option::weighted(0.7, any::<prop::sample::Index>()),
            prop::option::weighted(0.8, any::<prop::sample::Index>()),
        )
            .prop_map(|(node, demand, used, back, applied, echo)| Op::Report {
                node,
                demand,
                used,
                back,
                applied,
                echo
            }),
        4 => (0u16..700, 0..=limit / 2, 0u32..4)
            .prop_map(|(ms, cold, others)| Op::Round { ms, cold, others }),
        1 => Just(Op::Release),
    ]
}

fn ops() -> impl Strategy<Value = (u32, Vec<Op>)> {
    (1u32..400).prop_flat_map(|limit| (Just(limit), prop::collection::vec(op(limit), 1..150)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// On ledgers built by random reports (late, duplicate, acknowledging any grant sent,
    /// echoing any message), rounds at random instants with random cold shares, releases and
    /// learning mode, the round keeps exactly the decisions of the reference: the same
    /// messages, and the same state after.
    #[test]
    fn round_decides_as_the_reference(
        (limit, ops) in ops(),
        lease_ms in 50u64..2_000,
        silence_factor in 2u64..6,
        learning_ms in prop_oneof![Just(0u64), 0u64..3_000],
        window_ms in prop_oneof![Just(0u64), 50u64..3_000],
    ) {
        let timing = Timing::new(
            Duration::from_millis(lease_ms),
            Duration::from_millis(lease_ms * silence_factor),
            1000,
        )
        .expect("valid timing");
        let ids: Vec<NodeId> = (0..12)
            .map(|i| NodeId::new(&format!("n{i}")).expect("a valid id"))
            .collect();
        let start = Duration::from_secs(100);
        let mut ledger =
            Ledger::numbered_from(limit, timing, 1, start + Duration::from_millis(learning_ms))
                .with_window(Duration::from_millis(window_ms));
        let mut now = start;
        let mut seqs = [0u64; 12];
        // Per node: the grant seqs and message numbers sent to it.
        let mut sent: Vec<(Vec<u64>, Vec<u64>)> = vec![(Vec::new(), Vec::new()); 12];
        for op in &ops {
            match op {
                Op::Enrol(node) => ledger.enrol(&ids[*node]),
                Op::Report { node, demand, used, back, applied, echo } => {
                    seqs[*node] += 1;
                    let (grants, messages) = &sent[*node];
                    let report = Report {
                        seq: seqs[*node].saturating_sub(u64::from(*back)),
                        demand: *demand,
                        used: *used,
                        applied: applied
                            .filter(|_| !grants.is_empty())
                            .map(|i| grants[i.index(grants.len())]),
                        echo: echo
                            .filter(|_| !messages.is_empty())
                            .map(|i| messages[i.index(messages.len())]),
                        raise_left: None,
                    };
                    ledger.receive(&ids[*node], now, report);
                }
                Op::Round { ms, cold, others } => {
                    now += Duration::from_millis(u64::from(*ms));
                    let mut expected = ledger.clone();
                    let want = round(&mut expected, now, *cold, *others);
                    let got = ledger.round(now, *cold, *others);
                    prop_assert_eq!(&got, &want);
                    prop_assert_eq!(format!("{ledger:?}"), format!("{expected:?}"));
                    for (id, message) in got {
                        let at = ids.iter().position(|i| *i == id).expect("a node");
                        sent[at].1.push(message.message);
                        if let Some(g) = message.grant {
                            sent[at].0.push(g.seq);
                        }
                    }
                }
                Op::Release => ledger.release(),
            }
        }
    }
}

/// A larger ledger than the proptest builds, run as the owner runs it: 64 holders, three of
/// them busy, every report acknowledging the holder's newest grant and echoing its newest
/// message, with every fifth report lost.
#[test]
fn a_large_ledger_decides_as_the_reference() {
    let timing =
        Timing::new(Duration::from_secs(1), Duration::from_secs(3), 1000).expect("valid timing");
    let mut ledger = Ledger::new(6_400, timing);
    let ids: Vec<NodeId> = (0..64)
        .map(|i| NodeId::new(&format!("n{i}")).expect("a valid id"))
        .collect();
    for id in &ids {
        ledger.enrol(id);
    }
    let mut now = Duration::from_secs(10);
    let mut seq = 0;
    let mut newest: Vec<(Option<u64>, Option<u64>)> = vec![(None, None); ids.len()];
    for r in 0..60u32 {
        now += Duration::from_millis(50);
        for (i, id) in ids.iter().enumerate() {
            seq += 1;
            if seq % 5 == 0 {
                continue;
            }
            let demand = match i {
                0 => 15_000 + r * 10,
                1 => 3_000,
                2 => 900 + (r % 7) * 50,
                _ => 0,
            };
            ledger.receive(
                id,
                now,
                Report {
                    seq,
                    demand,
                    used: 0,
                    applied: newest[i].0,
                    echo: newest[i].1,
                    raise_left: None,
                },
            );
        }
        let mut expected = ledger.clone();
        let want = round(&mut expected, now, 100, 0);
        let got = ledger.round(now, 100, 0);
        assert_eq!(got, want, "round {r}");
        for (i, (_, message)) in got.iter().enumerate() {
            newest[i] = (
                message.grant.map(|g| g.seq).or(newest[i].0),
                Some(message.message),
            );
        }
    }
}
