//! The check program (the agent's API checks): where it looks, which checks create entries, one
//! run per capped call, and frames spent all or none.

use super::*;

/// The check program honours `CONFIG_NO_STATIC` as the packet path does: with the flag clear it
/// reads a static client's window, set it looks past `STATIC_CLIENTS` (so the agent must never
/// set it over a static entry; see `a_new_exact_address_policy_moves_the_client_with_its_count`).
#[test]
fn checks_look_in_static_clients_unless_the_agent_says_it_is_empty() -> Result<()> {
    let yaml = "default: { limit: 7, window: 1h }\npolicies:\n  - { match: 10.0.0.5, limit: 8, window: 1h }\n";
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, yaml)?;
        let checker = lim.checker(yaml)?;
        let src = v4(10, 0, 0, 5);
        check_eq!(lim.send(src, 5)?, 5);
        let id = limiter_user::check::ClientId::Addr(src);
        check_eq!(checker.check(&id, 0)?.remaining, 3);
        let config = lim.tables.map_config()?;
        ensure!(
            config.flags & CONFIG_NO_STATIC == 0,
            "an exact-address policy is in force"
        );
        lim.tables.config.set(
            0,
            limiter_common::MapConfig {
                flags: config.flags | CONFIG_NO_STATIC,
                ..config
            },
            0,
        )?;
        check_eq!(
            checker.check(&id, 0)?.remaining,
            8,
            "the static entry skipped"
        );
        lim.tables.config.set(0, config, 0)?;
        check_eq!(checker.check(&id, 0)?.remaining, 3);
        Ok(())
    })
}

/// A check that makes a client's entry says so (`VERDICT_NEW`, `Decision::new`, what the
/// new-client cap charges): an address's first check with hits, and an ID's, but not a read, not
/// a later check, and not a second check of the same new address in one frame.
#[test]
fn a_check_that_creates_an_entry_says_so() -> Result<()> {
    use limiter_user::check::ClientId;
    let yaml = "default: { limit: 7, window: 1h }\n";
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, yaml)?;
        let checker = lim.checker(yaml)?;
        let a = ClientId::Addr(v4(10, 0, 0, 5));
        let b = ClientId::Addr(v4(10, 0, 0, 6));
        let sent = ClientId::Addr(v4(10, 0, 0, 7));
        let named: ClientId = "tenant-1".parse()?;
        check_eq!(lim.send(v4(10, 0, 0, 7), 1)?, 1);
        let new = |checks: &[(&ClientId, u32)]| -> Result<Vec<bool>> {
            Ok(checker.check_all(checks)?.iter().map(|d| d.new).collect())
        };
        // A read creates nothing; a packet's entry is not the check's.
        check_eq!(new(&[(&a, 0), (&sent, 1)])?, vec![false, false]);
        check_eq!(lim.global()?.new_clients, 1);
        check_eq!(
            new(&[(&a, 1), (&a, 1), (&b, 2), (&named, 1)])?,
            vec![true, false, true, true]
        );
        check_eq!(new(&[(&a, 1), (&b, 1), (&named, 1)])?, vec![false; 3]);
        check_eq!(
            lim.global()?.new_clients,
            4,
            "the packet's, a's, b's and tenant-1's"
        );
        Ok(())
    })
}

/// Under a TCP caller's new-client cap, a call whose addresses could all be new and still fit
/// takes one program run and is charged the entries it created; one that might not fit reads
/// its addresses first (two runs), and is refused whole, nothing spent, when they do not fit.
#[test]
fn a_capped_call_that_fits_takes_one_run() -> Result<()> {
    use std::num::NonZeroU32;

    use limiter_user::{
        api::{CallerKey, CallerLimits, Rate, Role, Who},
        check::ClientId,
    };
    let yaml = "default: { limit: 7, window: 1h }\n";
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, yaml)?;
        let checker = lim.checker(yaml)?;
        // 10 a second: refills one per 100 ms, far slower than this test's calls.
        let ten = NonZeroU32::new(10).context("10")?;
        let limits = CallerLimits::new(
            None,
            Some(Rate {
                per_second: ten,
                burst: ten,
            }),
        );
        let caller = CallerKey {
            role: Role::Check,
            who: Who::Addr(v4(192, 0, 2, 1)),
        };
        let ids: Vec<ClientId> = (0..8).map(|i| ClientId::Addr(v4(10, 0, 0, i))).collect();
        let call = |ids: &[ClientId]| {
            let checks: Vec<(&ClientId, u32)> = ids.iter().map(|id| (id, 1)).collect();
            let runs = checker.runs();
            let answer = limits.check_capped(&checker, &caller, &checks);
            (answer, checker.runs() - runs)
        };
        // 6 new of 10: one run, 6 spent (4 left).
        let (answer, runs) = call(&ids[..6]);
        check_eq!((answer?.len(), runs), (6, 1));
        // 6 known: 6 do not fit in the 4 left, so they are read first: two runs, none spent.
        let (answer, runs) = call(&ids[..6]);
        check_eq!((answer?.len(), runs), (6, 2));
        // 4 of them: held, given back; one run.
        let (answer, runs) = call(&ids[..4]);
        check_eq!((answer?.len(), runs), (4, 1));
        // 2 known and 2 new: one run; 2 left.
        let (answer, runs) = call(&ids[4..8]);
        check_eq!((answer?.len(), runs), (4, 1));
        check_eq!(lim.global()?.new_clients, 8);
        // 3 new do not fit in 2: read (one run), refused, nothing spent or created.
        let more: Vec<ClientId> = (8..11).map(|i| ClientId::Addr(v4(10, 0, 0, i))).collect();
        let (answer, runs) = call(&more);
        let refused = answer.expect_err("over the cap");
        ensure!(
            refused.message().contains("would create 3 client entries"),
            "{}",
            refused.message()
        );
        check_eq!(runs, 1);
        check_eq!(lim.global()?.new_clients, 8);
        // 2 do.
        let (answer, runs) = call(&more[..2]);
        check_eq!((answer?.len(), runs), (2, 1));
        check_eq!(lim.global()?.new_clients, 10);
        Ok(())
    })
}

/// A frame of probes and `CHECK_UNLESS_VETOED` checks spends all or none in one run: every
/// check when each client has what the request needs of it, none (and the program says which
/// probe did not fit) otherwise, also for two checks of one client; a request too big for one
/// frame takes a read and a spend, with the same answer.
#[test]
fn a_probed_frame_spends_all_or_none() -> Result<()> {
    use limiter_user::check::{AllOrNone, address_request, named_request};
    let yaml = "default: { limit: 7, window: 1h }\npolicies:\n  - { match: 10.0.0.0/8, limit: 5, window: 1h }\n";
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, yaml)?;
        let checker = lim.checker(yaml)?;
        let policy = limiter_common::Policy {
            limit: 3,
            window_us: 3_600_000_000,
            id: 9,
            action: limiter_common::maps::ACTION_LIMIT,
            group: 0,
        };
        let addr = address_request(v4(10, 0, 0, 5), 2);
        let named = |i: u8, hits| named_request([i; 16], hits, policy);
        // Each client read (nothing spent).
        let read = |requests: &[limiter_common::CheckRequest]| {
            let reads: Vec<_> = requests
                .iter()
                .map(|r| limiter_common::CheckRequest { hits: 0, ..*r })
                .collect();
            checker.check_requests(&reads)
        };
        let remaining = |requests: &[limiter_common::CheckRequest]| -> Result<Vec<u32>> {
            Ok(read(requests)?.iter().map(|d| d.remaining).collect())
        };
        let dropped = |requests: &[limiter_common::CheckRequest]| -> Result<Vec<u64>> {
            Ok(read(requests)?.iter().map(|d| d.dropped).collect())
        };
        let needing = |requests: &[limiter_common::CheckRequest], needed: &[u32]| {
            requests
                .iter()
                .copied()
                .zip(needed.iter().copied())
                .collect::<Vec<_>>()
        };
        let both = [addr, named(1, 2)];
        let runs = checker.runs();
        let AllOrNone::Spent(spent) = checker.check_all_or_none(&needing(&both, &[2, 2]))? else {
            bail!("both fit, but the frame was vetoed");
        };
        check_eq!(checker.runs() - runs, 1, "probes and checks in one run");
        ensure!(spent.iter().all(|d| d.allowed), "{spent:?}");
        check_eq!(remaining(&both)?, vec![3, 1]);
        // The ID has 1 left of the 2 asked: neither is spent.
        let AllOrNone::Refused(read) = checker.check_all_or_none(&needing(&both, &[2, 2]))? else {
            bail!("the ID has 1 left, yet both were spent");
        };
        check_eq!(
            read.iter()
                .map(|(d, fits)| (d.remaining, *fits))
                .collect::<Vec<_>>(),
            vec![(3, true), (1, false)]
        );
        check_eq!(remaining(&both)?, vec![3, 1], "nothing spent");
        // The probe that did not fit counted the hits it asked as dropped (a denied check's
        // way: demand is passed + dropped); the one that fit counted nothing.
        check_eq!(dropped(&both)?, vec![0, 2]);
        // Two checks of one client must fit together (3 left).
        let twice = [addr, addr];
        let AllOrNone::Refused(read) = checker.check_all_or_none(&needing(&twice, &[4, 4]))? else {
            bail!("4 asked of a client with 3 left, yet spent");
        };
        check_eq!(
            read.iter().map(|(_, fits)| *fits).collect::<Vec<_>>(),
            vec![false, false],
            "both checks of the client answer as its probe"
        );
        check_eq!(remaining(&twice)?, vec![3, 3]);
        // One client probed once for both checks: its 4 refused hits counted once.
        check_eq!(dropped(&twice)?, vec![4, 4]);
        // One ID under two policies (a rate limit service descriptor with its own `limit`
        // beside one without): each is probed against its own, so the tighter refuses and
        // nothing is spent.
        let loose = named_request(
            [7; 16],
            2,
            limiter_common::Policy {
                limit: 100,
                ..policy
            },
        );
        let tight = named_request([7; 16], 2, limiter_common::Policy { limit: 1, ..policy });
        ensure!(matches!(
            checker.check_all_or_none(&needing(&[loose, tight], &[4, 4]))?,
            AllOrNone::Refused(_)
        ));
        check_eq!(remaining(&[loose])?, vec![100], "nothing spent");
        let twice = [address_request(v4(10, 0, 0, 5), 1), addr];
        ensure!(matches!(
            checker.check_all_or_none(&needing(&twice, &[3, 3]))?,
            AllOrNone::Spent(_)
        ));
        check_eq!(remaining(&twice)?, vec![0, 0]);
        // 16 checks (more than a frame holds twice over), the last over its limit: a read, no
        // spend. Then with room: every one spent.
        let mut many: Vec<_> = (10..25).map(|i| named(i, 1)).collect();
        many.push(named(1, 2));
        let mut needed = [1u32; 16];
        needed[15] = 2;
        let runs = checker.runs();
        ensure!(matches!(
            checker.check_all_or_none(&needing(&many, &needed))?,
            AllOrNone::Refused(_)
        ));
        check_eq!(checker.runs() - runs, 1, "a read, and no spend after it");
        check_eq!(remaining(&many[..1])?, vec![3], "nothing spent");
        // The read that refused counted the 2 hits it asked of the short client as dropped, as
        // the probe above did (2 then, 4 now), and nothing of the clients that had room.
        check_eq!(dropped(&many[14..])?, vec![0, 4]);
        // A read that decides nothing (a request a blocked descriptor refuses) counts nothing;
        // one that decides counts again.
        checker.read_needing(&needing(&many[15..], &[2]), false)?;
        check_eq!(dropped(&many[15..])?, vec![4]);
        checker.read_needing(&needing(&many[15..], &[2]), true)?;
        check_eq!(dropped(&many[15..])?, vec![6]);
        many[15] = named(1, 1);
        let runs = checker.runs();
        ensure!(matches!(
            checker.check_all_or_none(&needing(&many, &[1; 16]))?,
            AllOrNone::Spent(_)
        ));
        check_eq!(checker.runs() - runs, 2, "a read, then the spend");
        check_eq!(remaining(&many[..1])?, vec![2]);
        check_eq!(remaining(&many[15..])?, vec![0]);
        // 40 checks of distinct clients (two frames of reads, the second partial), each with
        // its own limit: every read answers its own check, and the last, short, refuses all.
        let distinct = |i: u8, hits| {
            named_request(
                [100 + i; 16],
                hits,
                limiter_common::Policy {
                    limit: 50 + u32::from(i),
                    ..policy
                },
            )
        };
        let mut wide: Vec<_> = (0..40).map(|i| (distinct(i, 1), 1)).collect();
        wide[39].1 = 90;
        let runs = checker.runs();
        let AllOrNone::Refused(read) = checker.check_all_or_none(&wide)? else {
            bail!("the 40th client has 89 left of the 90 asked, yet all were spent");
        };
        check_eq!(checker.runs() - runs, 2, "two frames of reads, no spend");
        // The short client had no entry yet, and a read creates none: nothing to count in.
        check_eq!(dropped(&[wide[38].0, wide[39].0])?, vec![0, 0]);
        check_eq!(
            read.iter()
                .map(|(d, fits)| (d.remaining, *fits))
                .collect::<Vec<_>>(),
            (0..40u32).map(|i| (50 + i, i != 39)).collect::<Vec<_>>()
        );
        wide[39].1 = 1;
        let runs = checker.runs();
        let AllOrNone::Spent(spent) = checker.check_all_or_none(&wide)? else {
            bail!("every client has room, yet the request was refused");
        };
        check_eq!(
            checker.runs() - runs,
            4,
            "two frames of reads, two of spends"
        );
        check_eq!(
            spent.iter().map(|d| d.remaining).collect::<Vec<_>>(),
            (0..40u32).map(|i| 50 + i - 1).collect::<Vec<_>>()
        );
        // A check of 0 hits fits a client over its limit (its limit lowered to 1, 3 counted),
        // as it fits what a read reports left.
        let lowered = named_request([1; 16], 0, limiter_common::Policy { limit: 1, ..policy });
        let with_zero = [lowered, address_request(v4(10, 0, 0, 6), 1)];
        ensure!(matches!(
            checker.check_all_or_none(&needing(&with_zero, &[0, 1]))?,
            AllOrNone::Spent(_)
        ));
        check_eq!(remaining(&with_zero)?, vec![0, 4]);
        Ok(())
    })
}
