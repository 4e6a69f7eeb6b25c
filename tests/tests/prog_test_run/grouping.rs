//! Grouping (`per`): a rotating IPv6 source is one /64 client, a policy and its prefix groups share
//! one budget, a longer policy splits a group, and a reload's regrouping retires old entries.

use super::*;

/// The `i`-th address of the /64 `2001:db8:ROT::/64`, spread over the interface ID the way
/// privacy addresses are (RFC 8981): every packet a new source.
fn rotating_v6(net: u16, i: u64) -> IpAddr {
    let iid = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let a = (0x2001_0db8_u128 << 96) | ((net as u128) << 64) | iid as u128;
    IpAddr::V6(a.into())
}

/// Sends one packet from each of `n` sources; returns how many passed.
fn send_each(lim: &Limiter, sources: impl Iterator<Item = IpAddr>) -> Result<usize> {
    let mut passed = 0;
    for src in sources {
        passed += lim.send(src, 1)?;
    }
    Ok(passed)
}

/// Issue 13's attack: a host sends from a new address of its /64 with every packet. Counted per
/// address each packet had a fresh budget; counted per /64 (IPv6's default) the /64 gets its
/// limit, in one entry.
#[test]
fn a_rotating_ipv6_source_gets_its_64s_limit_once() -> Result<()> {
    const LIMIT: usize = 10;
    in_one_window(HOUR_NS, |_| {
        let per_address =
            format!("default: {{ limit: {LIMIT}, window: 1h, per: {{ ipv6: address }} }}\n");
        let lim = Limiter::new(4096, &per_address)?;
        let before = send_each(&lim, (0..10 * LIMIT as u64).map(|i| rotating_v6(1, i)))?;
        check_eq!(
            before,
            10 * LIMIT,
            "per address: every packet a fresh budget"
        );
        check_eq!(lim.global()?.new_clients, 10 * LIMIT as u64);

        let lim = Limiter::new(
            4096,
            &format!("default: {{ limit: {LIMIT}, window: 1h }}\n"),
        )?;
        let after = send_each(&lim, (0..10 * LIMIT as u64).map(|i| rotating_v6(1, i)))?;
        check_eq!(after, LIMIT, "per /64: the limit, once");
        let g = lim.global()?;
        check_eq!((g.new_clients, g.passed, g.dropped), (1, 10, 90));
        let clients = lim.tables.clients()?;
        check_eq!(clients.len(), 1);
        let (key, state) = clients[0];
        check_eq!(
            limiter_user::stats::client_label(&key),
            "2001:db8:0:1::/64".to_string()
        );
        check_eq!((state.total_passed(), state.dropped_count()), (10, 90));
        // Another /64 is another client.
        check_eq!(send_each(&lim, (0..20).map(|i| rotating_v6(2, i)))?, LIMIT);
        Ok(())
    })
}

/// `per: policy` gives the whole prefix one budget; `per: /24` one per /24 inside a /16; a
/// group never spans two policies, and a longer policy inside a group takes its own addresses.
#[test]
fn per_policy_and_per_prefix_share_one_budget() -> Result<()> {
    let yaml = "\
default: { limit: 100, window: 1h }
policies:
  - { match: 10.1.0.0/24, limit: 5, window: 1h, per: policy }
  - { match: 10.1.0.7, limit: 2, window: 1h }
  - { match: 10.2.0.0/16, limit: 3, window: 1h, per: /24 }
  - { match: 10.2.9.0/24, limit: 4, window: 1h, per: /16 }
";
    in_one_window(HOUR_NS, |_| {
        let lim = Limiter::new(1024, yaml)?;
        // 40 sources of 10.1.0.0/24, two packets each: 5 in all.
        let shared = send_each(
            &lim,
            (0..40u8).flat_map(|i| [v4(10, 1, 0, 100 + i), v4(10, 1, 0, 100 + i)]),
        )?;
        check_eq!(shared, 5);
        // The exact-address policy inside it is its own client.
        check_eq!(lim.send(v4(10, 1, 0, 7), 5)?, 2);
        // Per /24 inside 10.2/16: 3 for each /24.
        check_eq!(
            send_each(&lim, (0..10u8).map(|i| v4(10, 2, 1, i)))?,
            3,
            "10.2.1.0/24"
        );
        check_eq!(
            send_each(&lim, (0..10u8).map(|i| v4(10, 2, 2, i)))?,
            3,
            "10.2.2.0/24"
        );
        // `per: /16` on a /24 groups the /24 only, apart from the /16 policy's groups.
        check_eq!(
            send_each(&lim, (0..10u8).map(|i| v4(10, 2, 9, i)))?,
            4,
            "10.2.9.0/24"
        );
        // Elsewhere IPv4 counts per address.
        check_eq!(lim.send(v4(10, 3, 0, 1), 3)?, 3);
        check_eq!(lim.send(v4(10, 3, 0, 2), 3)?, 3);
        let labels: Vec<String> = lim
            .tables
            .clients()?
            .iter()
            .map(|(k, _)| limiter_user::stats::client_label(k))
            .collect();
        for want in [
            "10.1.0.0/24",
            "10.1.0.7",
            "10.2.1.0/24",
            "10.2.2.0/24",
            "10.2.9.0/24",
        ] {
            ensure!(labels.iter().any(|l| l == want), "no {want} in {labels:?}");
        }
        Ok(())
    })
}

/// A host policy inside an IPv6 /64 splits it: the host keeps its own budget, the rest of the /64
/// shares one, and neither finds the other's entry under the /64's usual key. A reload that
/// removes the host policy joins the host to the /64's group.
#[test]
fn a_longer_policy_splits_a_64_without_sharing_its_budget() -> Result<()> {
    let split = "\
default: { limit: 3, window: 1h }
policies:
  - { match: 2001:db8::1, limit: 10, window: 1h }
  - { match: 2001:db8:0:1::/64, limit: 4, window: 1h }
  - { match: 2001:db8:0:1::8/126, limit: 6, window: 1h, per: address }
";
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, split)?;
        // The rest of 2001:db8::/64 first, so that its group entry exists when the host sends.
        check_eq!(
            send_each(&lim, (2..12u16).map(|i| v6(&format!("2001:db8::{i:x}"))))?,
            3
        );
        check_eq!(lim.send(v6("2001:db8::1"), 20)?, 10);
        check_eq!(
            lim.send(v6("2001:db8::c"), 2)?,
            0,
            "the /64's rest is spent"
        );
        // A /64 policy holding a per-address /126: its own /64 group, split; each address of
        // the /126 its own 6.
        check_eq!(
            send_each(&lim, (1..7u16).map(|i| v6(&format!("2001:db8:0:1::{i:x}"))))?,
            4
        );
        check_eq!(lim.send(v6("2001:db8:0:1::8"), 10)?, 6);
        check_eq!(lim.send(v6("2001:db8:0:1::9"), 10)?, 6);
        // An unsplit /64 next to them: its own 3.
        check_eq!(
            send_each(&lim, (1..9u16).map(|i| v6(&format!("2001:db8:0:2::{i:x}"))))?,
            3
        );
        // Without the host policy, the host is one more address of its /64, whose group starts
        // afresh under the usual key (the split group's entry is left to age out).
        lim.apply("default: { limit: 3, window: 1h }\n")?;
        check_eq!(lim.send(v6("2001:db8::1"), 2)?, 2);
        check_eq!(lim.send(v6("2001:db8::5"), 2)?, 1);
        Ok(())
    })
}

/// A reload that changes how a prefix groups leaves the old group's entry to no one: the first
/// packet that finds it stale under the fast key deletes it, so it neither takes room nor, kept
/// warm by lookups, outlives the 15-bit generation tag and reads as current again.
#[test]
fn an_entry_a_reload_regroups_is_retired_by_the_next_packet() -> Result<()> {
    in_one_window(HOUR_NS, |_| {
        let mut lim = Limiter::new(1024, "default: { limit: 3, window: 1h }\n")?;
        check_eq!(lim.send(v6("2001:db8::2"), 5)?, 3);
        let labels = |lim: &Limiter| -> Result<Vec<String>> {
            Ok(lim
                .tables
                .clients()?
                .iter()
                .map(|(k, _)| limiter_user::stats::client_label(k))
                .collect())
        };
        check_eq!(labels(&lim)?, vec!["2001:db8::/64".to_string()]);
        // A host policy splits the /64: the group's entry under the fast key is no one's.
        lim.apply(
            "default: { limit: 3, window: 1h }\npolicies:\n  - { match: 2001:db8::1, action: pass }\n",
        )?;
        check_eq!(
            lim.send(v6("2001:db8::2"), 5)?,
            3,
            "the split rest starts afresh"
        );
        let held: Vec<_> = lim
            .tables
            .clients()?
            .into_iter()
            .filter(|(_, s)| s.flags() & FLAG_STATIC == 0)
            .collect();
        let decoded: Vec<_> = held
            .iter()
            .map(|(k, s)| (limiter_common::addr::client_of(k), s.total_passed()))
            .collect();
        check_eq!(held.len(), 1, "{decoded:?}");
        check_eq!(
            limiter_common::addr::client_of(&held[0].0),
            limiter_common::addr::Client::GroupV6 {
                prefix: "2001:db8::".parse::<std::net::Ipv6Addr>()?.octets(),
                bits: 64,
                split: true
            }
        );
        check_eq!(lim.send(v6("2001:db8::1"), 5)?, 5);
        Ok(())
    })
}
