//! Policies: the longest prefix wins, actions, dry run, reloads, IPv4 and IPv6 kept apart, and the
//! periodic refresh of an idle client's cached policy.

use super::*;

#[test]
fn longest_prefix_wins_and_each_address_is_a_client() -> Result<()> {
    let yaml = "\
default: { limit: 2, window: 1h, per: address }
policies:
  - { match: 10.0.0.0/8, limit: 3, window: 1h }
  - { match: 10.1.2.0/24, limit: 4, window: 1h }
  - { match: 10.1.2.3, limit: 5, window: 1h }
  - { match: 2001:db8::/32, limit: 6, window: 1h }
  - { match: 2001:db8:1:2::/64, limit: 7, window: 1h }
";
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, yaml)?;
        let cases = [
            (v4(10, 9, 9, 9), 3, 1),
            (v4(10, 1, 3, 1), 3, 1),
            (v4(10, 1, 2, 9), 4, 2),
            (v4(10, 1, 2, 10), 4, 2),
            (v4(10, 1, 2, 255), 4, 2),
            (v4(10, 1, 2, 3), 5, 3),
            (v4(11, 0, 0, 1), 2, 0),
            (v4(9, 255, 255, 255), 2, 0),
            (v6("2001:db8:ffff::1"), 6, 4),
            (v6("2001:db8::1"), 6, 4),
            (v6("2001:db8:1:2::5"), 7, 5),
            (v6("2001:db8:1:2:ffff:ffff:ffff:ffff"), 7, 5),
            (v6("2001:db8:1:3::5"), 6, 4),
            (v6("2001:db9::1"), 2, 0),
            // IPv6 addresses whose low 32 bits are inside 10.0.0.0/8 are not IPv4 clients.
            (v6("::a01:203"), 2, 0),
            (v6("2001:db8:1:2::a01:203"), 7, 5),
            (v6("64:ff9b::a01:203"), 2, 0),
        ];
        for (src, limit, policy) in cases {
            let verdicts = lim.verdicts(&udp_from(src), 10)?;
            expect_limit(&verdicts, limit).with_context(|| format!("{src}"))?;
            let c = lim.client(src).context("no client")?;
            check_eq!(
                (c.total_passed(), c.dropped_count(), c.limit, c.policy()),
                (limit as u64, 10 - limit as u64, limit as u32, policy),
                "{src}"
            );
            check_eq!(c.flags() & FLAG_STATIC != 0, policy == 3, "{src}");
        }
        let g = lim.global()?;
        let passed: u64 = cases.iter().map(|c| c.1 as u64).sum();
        check_eq!(
            (g.passed, g.dropped),
            (passed, 10 * cases.len() as u64 - passed)
        );
        // The exact-address client is static, not a new dynamic one.
        check_eq!(g.new_clients, cases.len() as u64 - 1);
        Ok(())
    })
}

#[test]
fn pass_and_drop_actions() -> Result<()> {
    let yaml = "\
default: { limit: 3, window: 1h }
policies:
  - { match: 192.0.2.0/24, action: pass }
  - { match: 198.51.100.0/24, action: drop }
  - { match: 203.0.113.0/24, limit: 0, window: 1h }
  - { match: 2001:db8:a::/48, action: pass }
  - { match: 2001:db8:d::/48, action: drop }
  - { match: 2001:db8:e::7, action: drop, limit: 0 }
";
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, yaml)?;
        const N: usize = 50;
        let cases = [
            (v4(192, 0, 2, 1), N, Some(ACTION_PASS)),
            (v6("2001:db8:a::1"), N, Some(ACTION_PASS)),
            (v4(198, 51, 100, 1), 0, Some(ACTION_DROP)),
            (v6("2001:db8:d::1"), 0, Some(ACTION_DROP)),
            (v6("2001:db8:e::7"), 0, Some(ACTION_DROP)),
            (v4(203, 0, 113, 1), 0, None),
            (v4(203, 0, 114, 1), 3, None),
        ];
        for (src, passes, action) in cases {
            let verdicts = lim.verdicts(&udp_from(src), N)?;
            expect_limit(&verdicts, passes).with_context(|| format!("{src}"))?;
            let c = lim.client(src).context("no client")?;
            check_eq!(
                (c.total_passed(), c.dropped_count()),
                (passes as u64, (N - passes) as u64),
                "{src}"
            );
            if let Some(action) = action {
                check_eq!(c.action(), action, "{src}");
            }
        }
        let g = lim.global()?;
        check_eq!((g.passed, g.dropped), (2 * N as u64 + 3, 5 * N as u64 - 3));
        Ok(())
    })
}

#[test]
fn dry_run_passes_everything_and_counts_would_be_drops() -> Result<()> {
    let yaml = "\
mode: dry-run
default: { limit: 5, window: 1h }
policies:
  - { match: 198.51.100.0/24, action: drop }
";
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, yaml)?;
        let (a, b) = (v4(192, 0, 2, 1), v4(198, 51, 100, 1));
        check_eq!(lim.verdicts(&udp_from(a), 12)?, vec![XDP_PASS; 12]);
        check_eq!(lim.verdicts(&udp_from(b), 4)?, vec![XDP_PASS; 4]);
        check_eq!(lim.client_counts(a)?, (5, 7));
        check_eq!(lim.client_counts(b)?, (0, 4));
        let g = lim.global()?;
        check_eq!((g.passed, g.dropped), (5, 11));
        Ok(())
    })
}

#[test]
fn reload_keeps_window_state_unless_the_window_changes() -> Result<()> {
    let before = "\
default: { limit: 7, window: 1h }
policies:
  - { match: 10.0.0.0/8, limit: 5, window: 1h }
  - { match: 172.16.0.0/16, limit: 5, window: 1h }
  - { match: 172.17.0.0/16, limit: 5, window: 1h }
";
    let after = "\
default: { limit: 7, window: 1h }
policies:
  - { match: 10.0.0.0/8, limit: 8, window: 1h }
  - { match: 172.16.0.0/16, limit: 5, window: 30m }
";
    // The 30-minute window's boundaries include the hour's.
    in_one_window(HOUR_NS / 2, |_| {
        let mut lim = Limiter::new(1024, before)?;
        let raised = v4(10, 0, 0, 1);
        let other = v4(11, 0, 0, 1);
        let rewindowed = v4(172, 16, 0, 1);
        let removed = v4(172, 17, 0, 1);
        expect_limit(&lim.verdicts(&udp_from(raised), 7)?, 5)?;
        expect_limit(&lim.verdicts(&udp_from(other), 9)?, 7)?;
        expect_limit(&lim.verdicts(&udp_from(rewindowed), 6)?, 5)?;
        expect_limit(&lim.verdicts(&udp_from(removed), 5)?, 5)?;
        let other_before = lim.client(other).context("other")?;

        lim.apply(after)?;
        // Raised from 5 to 8 inside the same window: exactly 3 more.
        expect_limit(&lim.verdicts(&udp_from(raised), 10)?, 3)?;
        check_eq!(lim.client_counts(raised)?, (8, 2 + 7));
        // Another client's entry is untouched by the reload itself.
        let other_after = lim.client(other).context("other")?;
        check_eq!(
            (other_after.total_passed(), other_after.dropped_count()),
            (other_before.total_passed(), other_before.dropped_count())
        );
        check_eq!(other_after.slots, other_before.slots);
        check_eq!(lim.send(other, 1)?, 0);
        // A new window length starts the window afresh: the full 5 again.
        expect_limit(&lim.verdicts(&udp_from(rewindowed), 8)?, 5)?;
        let c = lim.client(rewindowed).context("rewindowed")?;
        check_eq!(
            (c.total_passed(), c.dropped_count(), c.window_us),
            (10, 1 + 3, 1_800_000_000)
        );
        // Its policy removed, the client falls back to the default (same window: 5 of 7 used).
        expect_limit(&lim.verdicts(&udp_from(removed), 5)?, 2)?;
        let c = lim.client(removed).context("removed")?;
        check_eq!(
            (c.total_passed(), c.dropped_count(), c.limit, c.policy()),
            (7, 3, 7, 0)
        );

        // Lowering a limit below what was already admitted admits nothing more.
        lim.apply("default: { limit: 7, window: 1h }\npolicies:\n  - { match: 10.0.0.0/8, limit: 2, window: 1h }\n")?;
        check_eq!(lim.send(raised, 3)?, 0);
        Ok(())
    })
}

/// An IPv6 packet whose source is an IPv4-mapped address (`::ffff:a.b.c.d`, which the kernel's
/// IPv6 input drops anyway) is malformed: it must not be charged to the IPv4 client a.b.c.d.
#[test]
fn ipv4_mapped_ipv6_sources_are_not_ipv4_clients() -> Result<()> {
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, "default: { limit: 5, window: 1h }\n")?;
        check_eq!(lim.send(v6("::ffff:192.0.2.7"), 5)?, 5);
        check_eq!(lim.global()?.malformed, 5);
        check_eq!(
            lim.send(v4(192, 0, 2, 7), 5)?,
            5,
            "IPv4 192.0.2.7 lost its budget to IPv6 packets"
        );
        Ok(())
    })
}

/// An IPv6 policy whose prefix covers `::ffff:0:0/96` must not apply to IPv4 clients (the policy
/// trie keeps the families apart).
#[test]
fn ipv6_policies_do_not_apply_to_ipv4() -> Result<()> {
    let yaml =
        "default: { limit: 5, window: 1h }\npolicies:\n  - { match: \"::/8\", action: drop }\n";
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, yaml)?;
        check_eq!(lim.send(v6("::1"), 1)?, 0);
        check_eq!(
            lim.send(v4(192, 0, 2, 7), 1)?,
            1,
            "IPv4 matched the IPv6 policy ::/8"
        );
        Ok(())
    })
}

/// `match: ::/0` replaces `default` for IPv6 clients only; IPv4 clients keep the default.
#[test]
fn ipv6_catch_all_does_not_replace_the_default() -> Result<()> {
    let yaml = "default: { limit: 5, window: 1h }\npolicies:\n  - { match: \"::/0\", limit: 1, window: 1h }\n";
    if Config::parse(yaml).is_err() {
        return Ok(()); // Rejecting the duplicate is also a fix.
    }
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, yaml)?;
        check_eq!(lim.send(v6("2001:db8::1"), 5)?, 1);
        check_eq!(
            lim.send(v4(192, 0, 2, 7), 5)?,
            5,
            "the IPv4 client lost the default"
        );
        Ok(())
    })
}

/// Entries keep a 15-bit generation tag, so the agent refreshes every entry in place 2^14
/// generations after the last refresh. Without that an entry idle for 2^15 policy changes would
/// alias the current generation and keep a stale policy; with it every refresh keeps the counts.
#[test]
fn the_periodic_refresh_keeps_an_idle_client_from_aliasing_an_old_policy() -> Result<()> {
    let yaml = |limit: u32| format!("default: {{ limit: {limit}, window: 1h }}\n");
    // Jumps the generation to just before `next`, as that many reloads that did not touch the
    // client would (no refresh is due before `next`).
    let jump = |lim: &mut Limiter, next: u32| -> Result<()> {
        let config = limiter_common::MapConfig {
            generation: next - 1,
            ..lim.tables.map_config()?
        };
        lim.tables.config.set(0, config, 0)?;
        Ok(())
    };
    for refresh in [true, false] {
        in_one_window(HOUR_NS, |_| {
            let mut lim = Limiter::new(64, &yaml(5))?;
            if refresh {
                let program = datapath::load_adapt_program(&mut lim.ebpf)?;
                lim.tables.set_refresher(program);
            }
            let client = v4(10, 0, 0, 1);
            check_eq!(lim.send(client, 3)?, 3);
            check_eq!(lim.client(client).context("no entry")?.generation_tag(), 1);

            // Generation 16385, 2^14 after the client's: a refresh is due.
            jump(&mut lim, GENERATION_SWEEP + 1)?;
            lim.apply(&yaml(7))?;
            let c = lim.client(client).context("no entry")?;
            if refresh {
                check_eq!(
                    (c.limit, c.generation_tag(), c.total_passed()),
                    (7, 16385, 3)
                );
            } else {
                check_eq!((c.limit, c.generation_tag(), c.total_passed()), (5, 1, 3));
            }
            // Generation 32769 (32768 has tag 0, which is never used), 2^14 after the refresh:
            // its tag is 1 again.
            jump(&mut lim, 2 * GENERATION_SWEEP + 1)?;
            lim.apply(&yaml(9))?;
            check_eq!(
                lim.tables.map_config()?.generation,
                2 * GENERATION_SWEEP + 1
            );
            if refresh {
                // Refreshed again in place, so its next packets are decided under 9.
                check_eq!(lim.send(client, 10)?, 6);
            } else {
                // Tag 1 from generation 1 reads as current: the stale limit of 5 still holds.
                check_eq!(lim.send(client, 10)?, 2);
            }
            Ok(())
        })?;
    }
    Ok(())
}
