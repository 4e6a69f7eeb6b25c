//! The policy store's pure parts: what the rate limit service's global limits add.

use super::*;

/// The rate limit service's global limits join the global limits and the cluster's only in
/// a cluster: outside one, global limits in force would set the programs' cluster flag, and
/// grants left pinned from a cluster would be applied again.
#[test]
fn the_service_s_global_limits_count_only_in_a_cluster() {
    let service = [GlobalPolicy {
        id: 32000,
        matches: "rate limit service: 30 per 1000000 µs".into(),
        limit: 30,
        window_us: 1_000_000,
        grouping: String::new(),
    }];
    let alone = Config::parse("default: { limit: 10, window: 1s }\n").unwrap();
    assert!(
        with_shares(&alone, &service, &ShareView::ALONE)
            .global_limits
            .is_empty()
    );
    assert!(policies_for_cluster(&alone, &service).global.is_empty());
    let member = Config::parse(
        "default: { limit: 10, window: 1s }
cluster:
  node_id: n1
  listen: 127.0.0.1:7201
  peers: [\"127.0.0.1:7202\"]
  token_file: /etc/limiter/cluster.token
",
    )
    .unwrap();
    let view = ShareView {
        members: 2,
        ..ShareView::ALONE
    };
    let applied = with_shares(&member, &service, &view);
    assert_eq!(
        applied.global_limits.get(&32000),
        Some(&30),
        "L, not the share"
    );
    assert_eq!(policies_for_cluster(&member, &service).global, service);
}

/// Members compare a global policy's grouping with its match, limit and window: grouped
/// differently, the same traffic would be different clients on different members. Its
/// position in the config is not compared.
#[test]
fn a_global_policy_is_named_by_its_content_and_grouping() {
    let cluster = "cluster: { node_id: n1, listen: \"127.0.0.1:7201\", peers: [\"127.0.0.1:7202\"], token_file: /unused }\n";
    let global = "  - { match: 10.0.0.0/8, limit: 30, window: 1s, scope: global }\n";
    let local = "  - { match: 192.0.2.0/24, limit: 5, window: 1s }\n";
    let config = |default: &str, policies: &str| {
        Config::parse(&format!(
            "default: {default}\npolicies:\n{policies}{cluster}"
        ))
        .unwrap()
    };
    let plain = "{ limit: 10, window: 1s }";
    let first = policies_for_cluster(&config(plain, &format!("{global}{local}")), &[]);
    let second = policies_for_cluster(&config(plain, &format!("{local}{global}")), &[]);
    assert_eq!((first.global[0].id, second.global[0].id), (1, 2));
    assert_eq!(first.global[0].wire_name(), second.global[0].wire_name());
    assert_eq!(first.hash(), second.hash());
    let grouped = policies_for_cluster(
        &config(
            "{ limit: 10, window: 1s, per: { ipv4: /24 } }",
            &format!("{global}{local}"),
        ),
        &[],
    );
    assert_eq!(grouped.global[0].grouping, "per /24");
    assert_ne!(first.global[0].wire_name(), grouped.global[0].wire_name());
    assert_ne!(first.hash(), grouped.hash());
}

/// A policy inside a global policy's prefix takes its addresses out of it, so members compare
/// the holes carved in each global policy: a local /16 or one address inside a global /8 on
/// one member only is another view, whatever the order; a policy beside the global one, or
/// around it, is not compared.
#[test]
fn policies_nested_in_a_global_one_are_part_of_the_view() {
    let cluster = "cluster: { node_id: n1, listen: \"127.0.0.1:7201\", peers: [\"127.0.0.1:7202\"], token_file: /unused }\n";
    let global = "  - { match: 10.0.0.0/8, limit: 30, window: 1s, scope: global }\n";
    let v6 = "  - { match: \"2001:db8::/32\", limit: 30, window: 1s, scope: global }\n";
    let cluster_of = |policies: &str| {
        policies_for_cluster(
            &Config::parse(&format!(
                "default: {{ limit: 10, window: 1s }}\npolicies:\n{global}{v6}{policies}{cluster}"
            ))
            .unwrap(),
            &[],
        )
    };
    let beside = "  - { match: 192.0.2.0/24, limit: 5, window: 1s }\n  - { match: 0.0.0.0/4, limit: 5, window: 1s }\n  - { match: \"2001:db9::/48\", limit: 5, window: 1s }\n";
    let inside = "  - { match: 10.1.0.0/16, limit: 5, window: 1s }\n  - { match: 10.2.3.4, action: pass }\n  - { match: \"2001:db8:1::/48\", limit: 5, window: 1s }\n";
    let alone = cluster_of("");
    assert!(alone.nested.is_empty());
    assert_eq!(cluster_of(beside).nested, Vec::<String>::new());
    assert_eq!(alone.hash(), cluster_of(beside).hash());
    let carved = cluster_of(inside);
    assert_eq!(
        carved.nested,
        [
            "10.0.0.0/8 > 10.1.0.0/16",
            "10.0.0.0/8 > 10.2.3.4",
            "2001:db8::/32 > 2001:db8:1::/48",
        ]
    );
    assert_ne!(alone.hash(), carved.hash());
    let reordered = "  - { match: \"2001:db8:1::/48\", limit: 5, window: 1s }\n  - { match: 10.2.3.4, action: pass }\n  - { match: 10.1.0.0/16, limit: 5, window: 1s }\n";
    assert_eq!(carved.hash(), cluster_of(reordered).hash());
    // A global policy inside another is nested in it too (and compared as a global policy),
    // and a policy inside both is nested in each.
    let inner = cluster_of(
        "  - { match: 10.9.0.0/16, limit: 30, window: 1s, scope: global }\n  - { match: 10.9.8.0/24, limit: 5, window: 1s }\n",
    );
    assert_eq!(
        inner.nested,
        [
            "10.0.0.0/8 > 10.9.0.0/16",
            "10.0.0.0/8 > 10.9.8.0/24",
            "10.9.0.0/16 > 10.9.8.0/24"
        ]
    );
    // A `drop` policy only admits less: a member's own blocklist is not compared. One address
    // of IPv6 is, in canonical form however it is written.
    let blocked = cluster_of(
        "  - { match: 10.7.0.0/16, action: drop }\n  - { match: \"2001:DB8:0:0::1\", limit: 5, window: 1s }\n",
    );
    assert_eq!(blocked.nested, ["2001:db8::/32 > 2001:db8::1"]);
    // `::/0` holds every IPv6 policy, and nothing of IPv4's.
    let everything = policies_for_cluster(
        &Config::parse(&format!(
            "default: {{ limit: 10, window: 1s }}\npolicies:\n  - {{ match: \"::/0\", limit: 30, window: 1s, scope: global }}\n  - {{ match: \"2001:db8::/32\", limit: 5, window: 1s }}\n  - {{ match: 10.0.0.0/8, limit: 5, window: 1s }}\n{cluster}"
        ))
        .unwrap(),
        &[],
    );
    assert_eq!(everything.nested, ["::/0 > 2001:db8::/32"]);
}
