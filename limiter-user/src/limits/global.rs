//! The global policies as the cluster and the maps see them: what the cluster's node is told
//! of the policies in force, and the config the maps enforce on this node (each global limit
//! replaced by this node's share of it).

use std::collections::{BTreeSet, HashMap};

use limiter_common::addr::group_bits;

use crate::{
    cluster::{ClusterPolicies, GlobalPolicy, membership::ShareView},
    config::{Action, Cidr, Config, Match, Resolved, Scope},
};

/// The `cluster:` section and global limits of `config`, and in a cluster `service`'s: those of
/// Envoy's rate limit service's rules under `--rls-scope global` (their ids above every
/// config's).
pub fn policies_for_cluster(config: &Config, service: &[GlobalPolicy]) -> ClusterPolicies {
    let service = in_cluster(config, service);
    ClusterPolicies {
        config: config.cluster.clone(),
        global: global_policies(config)
            .map(|(i, r)| GlobalPolicy {
                id: i as u16 + 1,
                matches: config.policies[i].0.to_string(),
                limit: r.limit,
                window_us: r.window.micros,
                // The group the programs key its addresses by (`Grouping::group`, as the maps
                // get it), not the `per` as written: `per: policy` and `per: /8` on a /8 key the
                // same clients.
                grouping: config.policies[i]
                    .0
                    .as_prefix()
                    .map(|cidr| {
                        let per = config.grouping.policies.get(i).copied().flatten();
                        match group_bits(config.grouping.group(cidr, per)) {
                            None => "per address".to_string(),
                            Some(bits) => format!("per /{bits}"),
                        }
                    })
                    .unwrap_or_default(),
            })
            .chain(service.iter().cloned())
            .collect(),
        nested: nested_in_global(config),
    }
}

/// Each `limit` or `pass` policy whose prefix lies inside a global policy's (a longer prefix, or
/// one address), as `GLOBAL > NESTED`, sorted (see `ClusterPolicies::nested`). Each policy is
/// looked up under the prefix lengths global policies have, so many policies cost a few hash
/// lookups each, not a comparison with every global policy.
fn nested_in_global(config: &Config) -> Vec<String> {
    let global: HashMap<Cidr, &Match> = global_policies(config)
        .filter_map(|(i, _)| {
            let matches = &config.policies[i].0;
            matches.as_prefix().map(|cidr| (*cidr, matches))
        })
        .collect();
    let lengths: BTreeSet<(bool, u8)> = global
        .keys()
        .map(|c| (c.addr.is_ipv4(), c.prefix))
        .collect();
    let (global, lengths) = (&global, &lengths);
    let mut nested: Vec<String> = config
        .policies
        .iter()
        .filter(|(_, r)| r.action != Action::Drop)
        .filter_map(|(m, _)| m.as_prefix().map(|cidr| (m, cidr)))
        .flat_map(|(m, cidr)| {
            lengths
                .iter()
                .filter(move |&&(v4, len)| v4 == cidr.addr.is_ipv4() && len < cidr.prefix)
                .filter_map(move |&(_, len)| global.get(&cidr.within(len)))
                .map(move |outer| format!("{outer} > {m}"))
        })
        .collect();
    nested.sort_unstable();
    nested
}

/// The global `limit` policies of `config`: index into `policies`, and the policy.
fn global_policies(config: &Config) -> impl Iterator<Item = (usize, &Resolved)> {
    config
        .policies
        .iter()
        .enumerate()
        .filter(|(i, (_, r))| {
            r.action == Action::Limit && config.scope(*i as u16 + 1) == Scope::Global
        })
        .map(|(i, (_, r))| (i, r))
}

/// `service`, if `config` has a `cluster:` section, else none: outside a cluster the rate limit
/// service's rules are whole limits (the share view is alone), and global limits in force would
/// set the programs' cluster flag, under which they apply the grants still pinned in `GRANTS`
/// (a cluster left, or maps adopted from a member).
fn in_cluster<'a>(config: &Config, service: &'a [GlobalPolicy]) -> &'a [GlobalPolicy] {
    if config.cluster.is_some() {
        service
    } else {
        &[]
    }
}

/// `config` with each global `limit` policy's limit replaced by `view`'s share of it: what the
/// maps and the checker enforce on this node. In a cluster `service`'s limits (the rate limit
/// service's rules under `--rls-scope global`, which pass their share with each check) join the
/// global limits, so the checker notes their clients hot and the programs decide them with
/// grants.
pub fn with_shares(config: &Config, service: &[GlobalPolicy], view: &ShareView) -> Config {
    let mut applied = config.clone();
    let global: Vec<usize> = global_policies(config).map(|(i, _)| i).collect();
    for i in global {
        let limit = &mut applied.policies[i].1.limit;
        applied.global_limits.insert(i as u16 + 1, *limit);
        *limit = view.share(*limit);
    }
    for g in in_cluster(config, service) {
        applied.global_limits.insert(g.id, g.limit);
    }
    applied
}
