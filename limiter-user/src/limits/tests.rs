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
