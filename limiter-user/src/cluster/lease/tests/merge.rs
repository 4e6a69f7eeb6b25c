//! How the ledger merges one holder's reports (duplicates, reordering, incarnations), on an
//! owner with L = 300 over three members (cold share 100): holders a (whose reports are merged)
//! and b enrolled, the third member not; a lease of half a second and a window of a second.

use proptest::prelude::*;

use super::*;

const COLD: u32 = 100;
const OTHERS: u32 = 1;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A run of a's reports as far as it went: the newest's seq, and the grant it said it applied
/// and the message it echoed (indices into [`Owner::grants`] and [`Owner::messages`]).
#[derive(Debug, Clone, Copy)]
struct Last {
    seq: u64,
    applied: Option<usize>,
    echo: Option<usize>,
}

/// The owner after some rounds, and what a was sent in them.
#[derive(Debug, Clone)]
struct Owner {
    ledger: Ledger,
    a: NodeId,
    /// The grants (seq) and messages (number) sent to a, oldest first.
    grants: Vec<u64>,
    messages: Vec<u64>,
    /// a's newest report in the rounds.
    last: Last,
    /// When the reports under test arrive: after the last round.
    now: Duration,
}

/// Rounds 50 ms apart in which a and b report their demand (b what its window holds too,
/// and the grant and message it got last); a gets the round's message when `heard`, and its
/// next reports apply that grant and echo that message.
fn owner(rounds: &[(u32, u32, bool)]) -> Owner {
    let [a, b] = ["a", "b"].map(|s| NodeId::new(s).expect("id"));
    let mut ledger = Ledger::new(300, half_second_lease()).with_window(Duration::from_secs(1));
    ledger.enrol(&a);
    ledger.enrol(&b);
    let (mut grants, mut messages) = (Vec::new(), Vec::new());
    let (mut applied, mut echo) = (None, None);
    let (mut b_applied, mut b_echo) = (None, None);
    let mut at = Duration::ZERO;
    for (i, &(a_demand, b_demand, heard)) in (1u64..).zip(rounds) {
        at = ms(50 * (i - 1));
        let report = Report {
            seq: i,
            demand: a_demand,
            used: 0,
            applied: applied.map(|g: usize| grants[g]),
            echo: echo.map(|m: usize| messages[m]),
            raise_left: None,
        };
        ledger.receive(&a, at, report);
        let report = Report {
            seq: i,
            demand: b_demand,
            used: b_demand.min(150),
            applied: b_applied,
            echo: b_echo,
            raise_left: None,
        };
        ledger.receive(&b, at, report);
        for (id, message) in ledger.round(at, COLD, OTHERS) {
            if id != a {
                b_echo = Some(message.message);
                b_applied = message.grant.map(|g| g.seq).or(b_applied);
                continue;
            }
            messages.push(message.message);
            if let Some(g) = message.grant
                && grants.last() != Some(&g.seq)
            {
                grants.push(g.seq);
            }
            if heard {
                echo = Some(messages.len() - 1);
                if let Some(g) = message.grant {
                    applied = grants.iter().position(|&s| s == g.seq);
                }
            }
        }
    }
    Owner {
        ledger,
        a,
        grants,
        messages,
        last: Last {
            seq: rounds.len() as u64,
            applied,
            echo,
        },
        now: at + ms(30),
    }
}

/// One report of a, relative to the one before: its seq `gap` further (sent `gap` × 10 ms
/// later on a's clock); `applied`: no grant (a holder drops its grant for the owner's
/// silence, and reports none while the datapath refuses it), or the grant applied before
/// or one up to so many newer; its echo up to so many messages newer.
#[derive(Debug, Clone)]
struct Step {
    gap: u64,
    demand: u32,
    used: u32,
    applied: Option<usize>,
    echo: usize,
}

fn step() -> impl Strategy<Value = Step> {
    (
        1u64..4,
        0u32..400,
        prop_oneof![Just(0u32), 0u32..400],
        prop::option::weighted(0.7, 0usize..3),
        0usize..3,
    )
        .prop_map(|(gap, demand, used, applied, echo)| Step {
            gap,
            demand,
            used,
            applied,
            echo,
        })
}

/// a's reports by `steps`, going on from `last`, as a real holder sends them: seqs grow, the
/// grant it applies never goes back (though it may apply none between), its echo never goes
/// back, and the lease left on what its kernel holds (if any: one that ends `lease_end` ms
/// after the instant the steps' send times count from) shrinks.
fn reports(owner: &Owner, last: Last, steps: &[Step], lease_end: Option<u64>) -> Vec<Report> {
    let Last {
        mut seq,
        mut applied,
        mut echo,
    } = last;
    let newest = |v: &[u64]| v.len().checked_sub(1);
    let mut sent = 0;
    steps
        .iter()
        .map(|s| {
            seq += s.gap;
            sent += 10 * s.gap;
            let grant = s.applied.and_then(|newer| {
                let g = applied
                    .map_or(newer, |g| g + newer)
                    .min(newest(&owner.grants)?);
                applied = Some(g);
                Some(owner.grants[g])
            });
            echo = newest(&owner.messages).map(|l| echo.map_or(s.echo, |m| m + s.echo).min(l));
            Report {
                seq,
                demand: s.demand,
                used: s.used,
                applied: grant,
                echo: echo.map(|m| owner.messages[m]),
                raise_left: lease_end
                    .and_then(|end| end.checked_sub(sent))
                    .filter(|&left| left > 0)
                    .map(ms),
            }
        })
        .collect()
}

/// The owner's ledger after taking `reports` in `order` (indices; one of `reports.len()` or
/// more is a copy), the `j`th `spacing` × `j` after `owner.now`, as the agent takes a report
/// (enrolling a member not enrolled: a is). `keep`: which of them arrive (by index).
fn delivered(
    owner: &Owner,
    reports: &[Report],
    order: &[usize],
    spacing: Duration,
    keep: impl Fn(usize) -> bool,
) -> Ledger {
    let mut ledger = owner.ledger.clone();
    for (j, &i) in (0u32..).zip(order) {
        let i = i % reports.len();
        if keep(i) {
            ledger.enrol_and_receive(&owner.a, owner.now + spacing * j, reports[i]);
        }
    }
    ledger
}

/// [`delivered`], every report at `owner.now`.
fn at_once(owner: &Owner, reports: &[Report], order: &[usize]) -> Ledger {
    delivered(owner, reports, order, Duration::ZERO, |_| true)
}

/// Demand, peak demand, bounds on what is in force, a round's messages.
type Shown = (u64, u32, Vec<u64>, Vec<(NodeId, ToHolder)>);

/// What a ledger shows at `now`: its demand, its peak demand, its bound on what is in force
/// at `now` and every 50 ms for 3.5 s (past every lease, silence limit and window the reports
/// start), and the messages of a round at `now` (run on a copy).
fn shown(ledger: &Ledger, now: Duration) -> Shown {
    let bounds = (0..70)
        .map(|k| ledger.in_force_bound(now + ms(50 * k), COLD, OTHERS))
        .collect();
    let messages = ledger.clone().round(now, COLD, OTHERS);
    (
        ledger.demand(now),
        ledger.peak_demand(now),
        bounds,
        messages,
    )
}

/// A random order of `n` reports, each once or twice: indices below `2n`, `i + n` a copy of
/// `i`.
fn order(n: usize) -> impl Strategy<Value = Vec<usize>> {
    (
        Just((0..2 * n).collect::<Vec<usize>>()).prop_shuffle(),
        prop::collection::vec(prop::bool::weighted(0.4), n),
    )
        .prop_map(move |(order, twice)| {
            order
                .into_iter()
                .filter(|&i| i < n || twice[i - n])
                .collect()
        })
}

fn rounds() -> impl Strategy<Value = Vec<(u32, u32, bool)>> {
    prop::collection::vec((0u32..400, 0u32..400, prop::bool::weighted(0.7)), 1..12)
}

/// Rounds, a's reports after them (and when the lease its kernel holds ends), and two orders.
type Case = (
    Vec<(u32, u32, bool)>,
    Vec<Step>,
    Option<u64>,
    Vec<usize>,
    Vec<usize>,
);

fn case() -> impl Strategy<Value = Case> {
    (
        rounds(),
        prop::collection::vec(step(), 1..8),
        prop::option::weighted(0.2, 0u64..300),
    )
        .prop_flat_map(|(rounds, steps, lease_end)| {
            let n = steps.len();
            (
                Just(rounds),
                Just(steps),
                Just(lease_end),
                order(n),
                order(n),
            )
        })
}

/// Rounds, the late reports of a's earlier run, the reports of its new run, how far the new
/// run's numbers start above the earlier run's newest, an order of both (the earlier run's
/// reports have the lower indices) and the time between two arrivals (ms).
type Restart = (
    Vec<(u32, u32, bool)>,
    Vec<Step>,
    Vec<Step>,
    u64,
    Vec<usize>,
    u64,
);

fn restart() -> impl Strategy<Value = Restart> {
    (
        rounds(),
        prop::collection::vec(step(), 1..6),
        prop::collection::vec(step(), 0..5),
        1u64..1_000,
        prop_oneof![Just(0u64), 1u64..100],
    )
        .prop_flat_map(|(rounds, old, new, above, spacing)| {
            let n = old.len() + new.len();
            (
                Just(rounds),
                Just(old),
                Just(new),
                Just(above),
                order(n),
                Just(spacing),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// One holder's reports (seqs that grow, some sent twice; as a real holder sends them:
    /// the grant it applies never goes back, though it may apply none between, its echo
    /// never goes back, the lease left on its kernel shrinks), taken by the owner at one
    /// instant in two random orders, each report once or twice:
    /// - once the newest has been taken, the others and every copy, in any order, change
    ///   nothing at all, at that instant or later: the ledger is the one that took the
    ///   newest alone (idempotent, duplicates and stale reports ignored);
    /// - in any order, the demand and the peak demand are the newest report's;
    /// - in any order, the bound on what is in force (now, and at every instant through the
    ///   leases, silence limit and windows the reports start) is at most the one after the
    ///   newest alone and at least the one after all of them in seq order; and it is the
    ///   newest alone's, and so is the round's every message, when the newest report applies
    ///   a grant of the ledger and no report that applies none says its kernel holds a lease.
    ///
    /// Not order-free in full, for a sound reason. The ledger takes a report only if it is
    /// newer than the last it took, and takes from it, besides what the newest decides
    /// (demand, `used`, when it arrived, whether the holder applies a grant of the ledger),
    /// knowledge that stays true later: the grant applied (the holder never goes back to an
    /// older one, so older grants stop counting) and the lease left on its kernel (learning
    /// mode lasts until it is over). An older report that arrives before the newest adds
    /// that knowledge; one that arrives after is ignored. So when the newest report applies
    /// no grant (the holder dropped it for the owner's silence, or the datapath refused a
    /// write), an older report taken first can leave the owner counting less than the newest
    /// alone would (its older grants no longer counted), and a lease an older one reported
    /// can keep the owner in learning mode longer. Either way what the owner counts stays a
    /// bound on what the holder may enforce (`shares_in_force_never_sum_above_the_limit`
    /// delivers reports late and twice too); only how tight it is depends on the order.
    ///
    /// At one instant because the ledger records when the newest report arrived: a grant's
    /// lease and the demand's life count from then, and the report's `used` for two windows
    /// after. The same reports arriving at other instants leave another ledger.
    #[test]
    fn a_holders_reports_merge_by_the_newest_whatever_the_order(
        (rounds, steps, lease_end, one, other) in case(),
    ) {
        let owner = owner(&rounds);
        let reports = reports(&owner, owner.last, &steps, lease_end);
        let n = reports.len();
        let newest = n - 1;
        let alone = at_once(&owner, &reports, &[newest]);
        let shown_alone = shown(&alone, owner.now);
        // The newest alone is taken: the demand is a's newest report's and b's last (30 ms old,
        // within its life), not a comparison of the ledger with itself.
        let (a_demand, b_demand) = (reports[newest].demand, rounds[rounds.len() - 1].1);
        prop_assert_eq!(
            (shown_alone.0, shown_alone.1),
            (u64::from(a_demand) + u64::from(b_demand), a_demand.max(b_demand))
        );
        let in_seq_order: Vec<usize> = (0..n).collect();
        let informed = shown(&at_once(&owner, &reports, &in_seq_order), owner.now);
        let exact = reports[newest].applied.is_some()
            && reports
                .iter()
                .all(|r| r.applied.is_some() || r.raise_left.is_none());
        for order in [&one, &other] {
            // The newest first: the rest, then or 20 ms apart after, change nothing at all
            // (the whole state, so nothing it shows either).
            let late: Vec<usize> = [newest].iter().chain(order).copied().collect();
            for spacing in [Duration::ZERO, ms(20)] {
                let ledger = delivered(&owner, &reports, &late, spacing, |_| true);
                prop_assert_eq!(format!("{ledger:?}"), format!("{alone:?}"));
            }
            // Any order.
            let got = shown(&at_once(&owner, &reports, order), owner.now);
            prop_assert_eq!((got.0, got.1), (shown_alone.0, shown_alone.1));
            for (k, ((&b, &most), &least)) in
                got.2.iter().zip(&shown_alone.2).zip(&informed.2).enumerate()
            {
                prop_assert!(
                    least <= b && b <= most,
                    "{} ms on: a bound of {b}, not within [{least}, {most}]",
                    50 * k
                );
            }
            if exact {
                prop_assert_eq!(&got, &shown_alone);
            }
        }
    }

    /// A holder's agent started again, numbering its reports from `first_report` on
    /// ([`Ledger::holder_restarted`]): late reports of its earlier run (seqs below
    /// `first_report`, all newer than any the owner took before), in any order, each once
    /// or twice, anywhere among the new run's reports, at one instant or spread out, change
    /// nothing at all: the ledger is the one that took the new run's reports alone, in their
    /// order and at their instants (and, with none, the one the restart left).
    #[test]
    fn reports_of_an_earlier_run_change_nothing_whatever_the_order(
        (rounds, old, new, above, order, spacing) in restart(),
    ) {
        let mut owner = owner(&rounds);
        let earlier = reports(&owner, owner.last, &old, None);
        let first_report = earlier[earlier.len() - 1].seq + above;
        owner.ledger.holder_restarted(&owner.a, first_report);
        // The new run starts afresh: nothing applied or echoed yet.
        let start = Last {
            seq: first_report - 1,
            applied: None,
            echo: None,
        };
        let later = reports(&owner, start, &new, None);
        let all: Vec<Report> = earlier.iter().chain(&later).copied().collect();
        let spacing = ms(spacing);
        let mixed = delivered(&owner, &all, &order, spacing, |_| true);
        let alone = delivered(&owner, &all, &order, spacing, |i| i >= earlier.len());
        prop_assert_eq!(format!("{mixed:?}"), format!("{alone:?}"));
        // The new run's reports are taken (a ledger that took none would pass the above).
        let taken = order.iter().any(|&i| i % all.len() >= earlier.len());
        prop_assert_eq!(
            taken,
            format!("{alone:?}") != format!("{:?}", owner.ledger),
            "the new run's reports {} the ledger",
            if taken { "did not change" } else { "changed" }
        );
        let end = owner.now + spacing * order.len() as u32;
        prop_assert_eq!(shown(&mixed, end), shown(&alone, end));
    }
}

/// The boundary of a restart: after `holder_restarted(a, F)` a report numbered `F - 1` (the
/// earlier run's) is ignored and one numbered `F` (the new run's first) is taken.
#[test]
fn a_restart_takes_reports_from_its_first_number_on() {
    let rounds = [(50, 40, true), (60, 40, true)];
    let mut owner = owner(&rounds);
    let first = owner.last.seq + 10;
    owner.ledger.holder_restarted(&owner.a, first);
    let report = |seq, demand| Report {
        seq,
        demand,
        used: 0,
        applied: None,
        echo: None,
        raise_left: None,
    };
    let mut ledger = owner.ledger.clone();
    ledger.enrol_and_receive(&owner.a, owner.now, report(first - 1, 200));
    assert_eq!(
        ledger.demand(owner.now),
        60 + 40,
        "the earlier run's report is ignored"
    );
    ledger.enrol_and_receive(&owner.a, owner.now, report(first, 200));
    assert_eq!(
        ledger.demand(owner.now),
        200 + 40,
        "the new run's first report is taken"
    );
}
