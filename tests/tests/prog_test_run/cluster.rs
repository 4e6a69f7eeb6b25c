//! A cluster member's programs: grants replace the cold share while their lease runs, and kept
//! clients are reported hot by their denials.

use super::*;

const GLOBAL: &str = "\
default: { limit: 1000, window: 1h }
policies:
  - match: 10.230.0.0/24
    limit: 30
    window: 1h
    scope: global
  - match: 10.230.1.7
    limit: 30
    window: 1h
    scope: global
  - match: tenant-gold
    limit: 30
    window: 1h
    scope: global
cluster:
  node_id: n1
  listen: 127.0.0.1:7201
  peers: [\"127.0.0.1:7202\", \"127.0.0.1:7203\"]
  token_file: /unused
";

/// The program loaded with [`GLOBAL`] applied as one of 3 connected members (each global limit
/// at its cold share, `CONFIG_CLUSTER` set), the cluster's handles on its maps, and a checker.
fn cluster_member() -> Result<(
    Limiter,
    datapath::grants::ClusterMaps,
    limiter_user::check::Checker,
)> {
    use limiter_user::{
        check::Checker,
        cluster::{
            config::Partition,
            membership::{Phase, ShareView},
        },
        datapath::grants::ClusterMaps,
        limits::with_shares,
    };
    let mut ebpf = datapath::load(&LoadOptions {
        pin_dir: None,
        max_clients: 1024,
        ..LoadOptions::default()
    })
    .context("loading the object (needs root)")?;
    let mut tables = Tables::take(&mut ebpf)?;
    let view = ShareView {
        members: 3,
        phase: Phase::Connected,
        partition: Partition::Share,
    };
    let config = with_shares(&Config::parse(GLOBAL)?, &[], &view);
    tables.apply(&config)?;
    let check_program = datapath::load_check_program(&mut ebpf)?;
    let program: &mut Xdp = ebpf
        .program_mut(datapath::PROGRAM)
        .context("no limiter program")?
        .try_into()?;
    program.load()?;
    let adapt = datapath::load_adapt_program(&mut ebpf)?;
    let maps = ClusterMaps::take(&mut ebpf, &tables, adapt)?;
    let checker = Checker::new(check_program, &config);
    Ok((Limiter { ebpf, tables }, maps, checker))
}

/// A cluster member's fast path (global policies in force, so `CONFIG_CLUSTER` is set): a
/// client with a grant in `GRANTS` is decided with the grant while its lease runs and with
/// `min(grant, cold share)` after (a raise lapses in the kernel, a cut stays); a client without
/// one gets the cold share; each client is reported on `HOT` by the packet that takes its count
/// to 0.8 of that allowance (not one before it), and once more as it moves into `LIMITED`; and
/// the check program decides and reports with the same allowance.
#[test]
fn grants_replace_the_cold_share_while_their_lease_runs() -> Result<()> {
    use limiter_common::Grant;
    use limiter_user::check::ClientId;
    limiter_tests::require_root!();
    in_one_window(HOUR_NS, |_| {
        let (lim, mut grants, checker) = cluster_member()?;
        let src = |last: u8| IpAddr::V4(Ipv4Addr::new(10, 230, 0, last));
        let key = |last: u8| v4_mapped([10, 230, 0, last]);
        let now = monotonic_ns();
        let grant = |value: u32, until_ns: u64| Grant {
            value,
            silence_ms: 0,
            until_ns,
        };
        let refused = grants.write(&[
            // A raise whose lease runs for the hour.
            (key(1), Some(grant(25, now + HOUR_NS))),
            // A raise whose lease is over: the cold share.
            (key(2), Some(grant(25, now - 1_000_000_000))),
            // A cut (no lease): for good.
            (key(3), Some(grant(4, 0))),
            // A cut whose lease is over: still a cut.
            (key(4), Some(grant(6, now - 1_000_000_000))),
        ]);
        ensure!(
            refused.is_empty(),
            "grant writes refused: {}",
            refused.len()
        );
        // The check program reads with the grant's allowance too.
        let read = checker.check(&ClientId::Addr(src(1)), 0)?;
        check_eq!(
            (read.limit, read.remaining, read.global_limit),
            (25, 25, Some(30))
        );
        check_eq!(checker.check(&ClientId::Addr(src(3)), 0)?.limit, 4);
        for (last, expected) in [(1, 25), (2, 10), (3, 4), (4, 6), (5, 10)] {
            // 0.8 of the allowance in force, rounded up: 20, 8, 4, 5, 8.
            let at = hot_count(expected as u32) as usize;
            check_eq!(
                lim.send(src(last), at - 1)?,
                at - 1,
                "client 10.230.0.{last}"
            );
            check_eq!(
                grants.hot(),
                Vec::<ClientKey>::new(),
                "client 10.230.0.{last} below 0.8 of its allowance"
            );
            check_eq!(lim.send(src(last), 1)?, 1);
            check_eq!(
                grants.hot(),
                vec![key(last)],
                "client 10.230.0.{last} at 0.8 of its allowance: hot before any drop"
            );
            check_eq!(
                lim.send(src(last), 40)?,
                expected - at,
                "client 10.230.0.{last}"
            );
            check_eq!(
                grants.hot(),
                vec![key(last)],
                "client 10.230.0.{last} over its limit: reported again as it moves"
            );
        }
        // A check spends from the same budget: the raised client has none left.
        let spent = checker.check(&ClientId::Addr(src(1)), 1)?;
        check_eq!((spent.allowed, spent.limit), (false, 25));
        // The grant withdrawn: the cold share again, already spent.
        ensure!(grants.write(&[(key(1), None)]).is_empty());
        check_eq!(lim.send(src(1), 5)?, 0);
        check_eq!(checker.check(&ClientId::Addr(src(1)), 0)?.limit, 10);
        Ok(())
    })
}

/// Clients whose entries never move into `LIMITED` are reported hot all the same: an
/// exact-address client (`STATIC_CLIENTS`) on `HOT` at 0.8 of its share and by its dropped
/// packets (the first, then one per 256), and an API ID under a global policy by the checker
/// (`HotIds`), which sees the denials, and the probes and reads that refuse an all-or-none
/// request (the check program reports nothing on the ring: a check-role caller could fill it).
/// Otherwise a global client that only the API sees, or one with an exact-address policy, would
/// never be enrolled and stay at the cold share wherever its demand is. The agent's cluster maps
/// find the entries wherever they live.
#[test]
fn kept_clients_are_reported_hot_by_their_denials() -> Result<()> {
    use limiter_user::check::ClientId;
    limiter_tests::require_root!();
    in_one_window(HOUR_NS, |_| {
        let (lim, mut maps, checker) = cluster_member()?;
        let hot_ids = checker.hot_ids();
        let exact = IpAddr::V4(Ipv4Addr::new(10, 230, 1, 7));
        let gold: ClientId = "tenant-gold".parse()?;
        let local: ClientId = "some-local-id".parse()?;
        let checked = IpAddr::V4(Ipv4Addr::new(10, 230, 0, 9));
        // The exact address's packets: its cold share of 10, reported at the 8th, and again at
        // the first dropped.
        check_eq!(lim.send(exact, 8)?, 8);
        check_eq!(
            maps.hot(),
            vec![ClientId::Addr(exact).key()],
            "the exact address at 0.8 of its share"
        );
        check_eq!(lim.send(exact, 32)?, 2);
        check_eq!(
            maps.hot(),
            vec![ClientId::Addr(exact).key()],
            "the exact address's first drop"
        );
        // The ID's checks, one hit each: 10 allowed, 5 denied, noted once; nothing on the ring.
        let allowed = (0..15)
            .map(|_| checker.check(&gold, 1).map(|d| d.allowed))
            .collect::<Result<Vec<_>, _>>()?;
        check_eq!(allowed.iter().filter(|a| **a).count(), 10);
        check_eq!(hot_ids.take(), vec![gold.key()], "the API ID");
        check_eq!(hot_ids.take(), Vec::<ClientKey>::new(), "taken");
        // An ID under a local policy (the default) is not the cluster's.
        checker.check(&local, 2_000)?;
        check_eq!(hot_ids.take(), Vec::<ClientKey>::new(), "a local ID");
        // An address only checked through the API: a denied check notes it, under the key of
        // its entry, which the check program writes back (it has no packets to report it)...
        let spent = checker.check(&ClientId::Addr(checked), 12)?;
        check_eq!(spent.allowed, false);
        check_eq!(
            maps.hot(),
            Vec::<ClientKey>::new(),
            "checks never report on the ring"
        );
        check_eq!(
            hot_ids.take(),
            vec![ClientId::Addr(checked).key()],
            "a denied address"
        );
        // ...and so do admitted hits that take its count to 0.8 of its share (8 of 10).
        check_eq!(checker.check(&ClientId::Addr(checked), 7)?.allowed, true);
        check_eq!(hot_ids.take(), Vec::<ClientKey>::new(), "7 of 10");
        check_eq!(checker.check(&ClientId::Addr(checked), 1)?.allowed, true);
        check_eq!(
            hot_ids.take(),
            vec![ClientId::Addr(checked).key()],
            "the checked address at 0.8 of its share"
        );
        check_eq!(maps.hot(), Vec::<ClientKey>::new(), "still not on the ring");
        // A request refused all or none notes the address as a denied check would.
        let refused_noting = |checks: &[(limiter_common::CheckRequest, u32)], what: &str| {
            let refused = checker.check_all_or_none(checks)?;
            ensure!(
                matches!(refused, limiter_user::check::AllOrNone::Refused(_)),
                "{what}: {refused:?}"
            );
            check_eq!(
                hot_ids.take(),
                vec![ClientId::Addr(checked).key()],
                "{what}"
            );
            Ok(())
        };
        // Refused by the address's probe (3 needed, 2 left); the local ID with room beside it
        // is not the cluster's.
        refused_noting(
            &[
                (limiter_user::check::address_request(checked, 3), 3),
                (
                    limiter_user::check::address_request(
                        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                        1,
                    ),
                    1,
                ),
            ],
            "refused by its probe",
        )?;
        // By the read of a request too big for one run (16 checks: a read, then the spend only
        // if all fit).
        let mut many = vec![(limiter_user::check::address_request(checked, 3), 3)];
        many.extend((1..16).map(|i| {
            let other = IpAddr::V4(Ipv4Addr::new(192, 0, 2, i));
            (limiter_user::check::address_request(other, 1), 1)
        }));
        refused_noting(&many, "refused by its read")?;
        // The rate limit service reads through its budget (shadow descriptors, dry-run mode):
        // the checker's read notes the client, though such a read refuses nothing.
        let read = limiter_user::rls::budget::Budget::read_needing(
            &checker,
            &[(limiter_user::check::address_request(checked, 3), 3)],
            true,
        )?;
        check_eq!(
            read.iter().map(|(_, fits)| *fits).collect::<Vec<_>>(),
            vec![false]
        );
        check_eq!(
            hot_ids.take(),
            vec![ClientId::Addr(checked).key()],
            "a short read through the service's budget"
        );
        // Each has an entry the agent's enrolment reads (its counters are its demand), and the
        // read frames of the adapt program find what the lookups key by key find: in
        // `STATIC_CLIENTS`, `LIMITED` (the address checked over its share, moved there by its
        // first dropped packet: 2 of its 10 are left), `CLIENTS` (one that passed),
        // `NAMED_STATIC` and `NAMED` (the local ID), and nothing for one without an entry.
        let moves = lim.global()?.limited_moves;
        check_eq!(lim.send(checked, 3)?, 2);
        check_eq!(
            lim.global()?.limited_moves,
            moves + 1,
            "the checked address moved"
        );
        check_eq!(
            maps.hot(),
            vec![ClientId::Addr(checked).key()],
            "the checked address reported hot again as it moves"
        );
        let passing = IpAddr::V4(Ipv4Addr::new(10, 230, 0, 77));
        check_eq!(lim.send(passing, 2)?, 2);
        let keys: Vec<ClientKey> = [
            exact,
            checked,
            passing,
            IpAddr::V4(Ipv4Addr::new(10, 230, 0, 78)),
        ]
        .into_iter()
        .map(|a| ClientId::Addr(a).key())
        .chain([gold.key(), local.key()])
        .collect();
        // Not `entries`, which falls back to the lookups if the frames fail.
        let framed = maps.read_frames(&keys)?;
        let one_by_one: Vec<_> = keys.iter().map(|k| maps.entry(k)).collect();
        check_eq!(
            framed,
            one_by_one,
            "read frames against lookups, key by key"
        );
        check_eq!(
            framed.iter().map(Option::is_some).collect::<Vec<_>>(),
            vec![true, true, true, false, true, true]
        );
        for (what, key) in [("exact", ClientId::Addr(exact).key()), ("ID", gold.key())] {
            let (entry, id) = maps
                .entry(&key)
                .with_context(|| format!("no entry for the {what}"))?;
            ensure!(
                id == (what == "ID"),
                "the {what} client's entry is in the wrong map"
            );
            ensure!(
                entry.dropped_count() > 0,
                "the {what} client's entry counts no drop"
            );
        }
        // Paced: 30 dropped so far; the 256th reports again, the next 100 do not.
        check_eq!(lim.send(exact, 225)?, 0);
        check_eq!(
            maps.hot(),
            Vec::<ClientKey>::new(),
            "255 dropped: no second report"
        );
        check_eq!(lim.send(exact, 1)?, 0);
        check_eq!(
            maps.hot(),
            vec![ClientId::Addr(exact).key()],
            "the 256th dropped"
        );
        check_eq!(lim.send(exact, 100)?, 0);
        check_eq!(maps.hot(), Vec::<ClientKey>::new());
        Ok(())
    })
}

/// A share change (a member joins: every cold share falls) keeps what a global client's window
/// has counted, also for a client the adaptive loop tracks (`FLAG_REPORTED`, set by the fast
/// path on every limit client while adaptive is on). The loop's rescale of an adapted entry
/// (carry the used fraction into the new allowance) must not apply: a global client's window
/// counts packets its owner has counted against a grant, not a fraction of the cold share, and
/// scaling them down with the cold share would let the node admit them again under a raise
/// still in force (here 15 counted of a raise to 20; the cold share falls from 10 to 7, and
/// the count scaled with it, to 11, let 9 more through where 5 were left).
#[test]
fn a_share_change_keeps_a_tracked_global_clients_count() -> Result<()> {
    use limiter_common::Grant;
    use limiter_user::{
        cluster::{
            config::Partition,
            membership::{Phase, ShareView},
        },
        limits::with_shares,
    };
    limiter_tests::require_root!();
    in_one_window(HOUR_NS, |_| {
        let (mut lim, mut grants, _) = cluster_member()?;
        let src = IpAddr::V4(Ipv4Addr::new(10, 230, 0, 1));
        let raise = Grant {
            value: 20,
            silence_ms: 0,
            until_ns: monotonic_ns() + HOUR_NS,
        };
        ensure!(grants.write(&[(key_of(src), Some(raise))]).is_empty());
        check_eq!(lim.send(src, 15)?, 15);
        let mut state = lim.client(src).context("no entry")?;
        state.set_flags(FLAG_REPORTED);
        lim.tables.clients.insert(key_of(src), state, 0)?;
        // A fourth member: L = 30 over 4, a cold share of 7.
        let view = ShareView {
            members: 4,
            phase: Phase::Connected,
            partition: Partition::Share,
        };
        lim.tables
            .apply(&with_shares(&Config::parse(GLOBAL)?, &[], &view))?;
        check_eq!(lim.send(src, 10)?, 5, "the raise's 20 less the 15 counted");
        let c = lim.client(src).context("no entry")?;
        check_eq!((c.limit, c.total_passed()), (7, 20));
        Ok(())
    })
}
