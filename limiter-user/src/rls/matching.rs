//! Which limit applies to each descriptor of a request, by envoyproxy/ratelimit's rules:
//!
//! - the domain must be configured, else no descriptor has a limit;
//! - a descriptor carrying a limit override uses it (whatever the rules say);
//! - otherwise its entries are walked down the nested lists, entry `i` at depth `i`: `key` with
//!   `value` exactly, else the first wildcard value of `key` (`*` anywhere, each matching any
//!   run of characters) the value matches, else `key` alone. A rule's `rate_limit` applies only
//!   at the depth of the request's last entry (a two-entry descriptor never takes a
//!   first-level limit), and the walk stops where a rule has no nested list;
//! - a limit named in the `replaces` of another descriptor's limit in the same request is
//!   dropped (that descriptor has no limit this time).

use std::collections::HashSet;

use super::{
    config::{RlsConfig, Rule, Unit},
    hits::SeriesRef,
};

/// A descriptor as matching sees it.
#[derive(Debug, Clone)]
pub struct Descriptor<'a> {
    /// `(key, value)` in order.
    pub entries: Vec<(&'a str, &'a str)>,
    /// The request's per-descriptor `limit` (`requests_per_unit`, `unit`).
    pub limit_override: Option<(u32, Unit)>,
}

/// The limit that applies to one descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applies {
    /// No rule: the descriptor is not limited (OK, no `current_limit`).
    Nothing,
    /// `unlimited: true`: OK, remaining reported as `u32::MAX`.
    Unlimited,
    Limited(Limit),
}

/// A limit to enforce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub requests_per_unit: u32,
    pub unit: Unit,
    /// The `rate_limit.name`, reported in `current_limit`.
    pub name: Option<String>,
    /// Denials are reported but never enforced.
    pub shadow_mode: bool,
    /// Came from the request's override, not from a rule.
    pub overridden: bool,
    /// Where its hits are counted (`None`: the config was not installed, as in tests).
    pub series: Option<SeriesRef>,
}

/// The rule whose limit applies to `entries` in `domain`'s rules, if any (see the module docs).
pub fn rule_for<'c>(
    config: &'c RlsConfig,
    domain: &str,
    entries: &[(&str, &str)],
) -> Option<&'c Rule> {
    let mut list = &config.domains.get(domain)?.descriptors;
    let mut found = None;
    for (i, (key, value)) in entries.iter().enumerate() {
        let Some(rule) = list.lookup(key, value) else {
            break;
        };
        if rule.rate_limit.is_some() && i + 1 == entries.len() {
            found = Some(rule);
        }
        if rule.children.is_empty() {
            break;
        }
        list = &rule.children;
    }
    found
}

/// The limit of each descriptor, in order (see the module docs).
pub fn limits_for(
    config: &RlsConfig,
    domain: &str,
    descriptors: &[Descriptor<'_>],
) -> Vec<Applies> {
    let Some(configured) = config.domains.get(domain) else {
        return vec![Applies::Nothing; descriptors.len()];
    };
    let rules: Vec<Option<&Rule>> = descriptors
        .iter()
        .map(|d| match d.limit_override {
            Some(_) => None,
            None => rule_for(config, domain, &d.entries),
        })
        .collect();
    let replaced: HashSet<&str> = rules
        .iter()
        .flatten()
        .flat_map(|r| r.rate_limit.iter().flat_map(|l| l.replaces.iter()))
        .map(String::as_str)
        .collect();
    descriptors
        .iter()
        .zip(rules)
        .map(|(d, rule)| {
            if let Some((requests_per_unit, unit)) = d.limit_override {
                return Applies::Limited(Limit {
                    requests_per_unit,
                    unit,
                    name: None,
                    shadow_mode: false,
                    overridden: true,
                    series: configured.overrides.clone(),
                });
            }
            let Some(rule) = rule else {
                return Applies::Nothing;
            };
            let Some(limit) = &rule.rate_limit else {
                return Applies::Nothing;
            };
            if limit.name.as_deref().is_some_and(|n| replaced.contains(n)) {
                return Applies::Nothing;
            }
            match limit.limit {
                None => Applies::Unlimited,
                Some((requests_per_unit, unit)) => Applies::Limited(Limit {
                    requests_per_unit,
                    unit,
                    name: limit.name.clone(),
                    shadow_mode: rule.shadow_mode,
                    overridden: false,
                    series: rule.series.clone(),
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
