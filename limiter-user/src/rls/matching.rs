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
//!   dropped (that descriptor has no limit this time);
//! - an entry a `share_threshold` wildcard matched (at any depth of the walk) takes the
//!   wildcard as written for its value in the descriptor's client: every value it matches
//!   spends one budget;
//! - the series a limit's hits are counted in is named as envoyproxy/ratelimit names its stats:
//!   the rule's path, where an entry matched by its key alone or by a wildcard on a rule with
//!   `value_to_metric` takes the request's value (a `share_threshold` wildcard's own text), and
//!   `detailed_metric` (which wins) names it by the request's entries (the wildcard's text for a
//!   shared one).

use std::collections::HashSet;

use super::{
    config::{Matched, RlsConfig, Rule, Unit},
    hits::SeriesRef,
};

/// Entries a `share_threshold` wildcard matched: (index, the wildcard as written).
pub type Shared = Vec<(usize, String)>;

/// A descriptor as matching sees it.
#[derive(Debug, Clone)]
pub struct Descriptor<'a> {
    /// `(key, value)` in order.
    pub entries: Vec<(&'a str, &'a str)>,
    /// The request's per-descriptor `limit` (`requests_per_unit`, `unit`).
    pub limit_override: Option<(u32, Unit)>,
}

/// The limit that applies to one descriptor.
#[derive(Debug, Clone, PartialEq)]
pub enum Applies {
    /// No rule: the descriptor is not limited (OK, no `current_limit`).
    Nothing,
    /// `unlimited: true`: OK, remaining reported as `u32::MAX`.
    Unlimited,
    Limited(Limit),
}

/// A limit to enforce.
#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    pub requests_per_unit: u32,
    pub unit: Unit,
    /// The `rate_limit.name`, reported in `current_limit`.
    pub name: Option<String>,
    /// Denials are reported but never enforced.
    pub shadow_mode: bool,
    /// `quota_mode`: over its limit, it denies the request only if every quota descriptor of
    /// the request is over.
    pub quota_mode: bool,
    /// Entries a `share_threshold` wildcard matched: (index, the wildcard as written), which
    /// the descriptor's client and detailed series take for the entry's value.
    pub shared: Shared,
    /// The series key its hits are counted under when request values name it
    /// (`value_to_metric`; `detailed_metric` with a shared entry); `None`: the rule's own series
    /// (or, `detailed_metric`, the request's entries).
    pub metric_key: Option<String>,
    /// The rule's `metadata`, for the response's dynamic metadata.
    pub metadata: Option<std::sync::Arc<envoy_types::pb::google::protobuf::Struct>>,
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
    find(config, domain, entries).map(|(rule, _)| rule)
}

/// [`rule_for`], with the entries a `share_threshold` wildcard matched on the way (allocated
/// only if there are any).
fn find<'c>(
    config: &'c RlsConfig,
    domain: &str,
    entries: &[(&str, &str)],
) -> Option<(&'c Rule, Shared)> {
    let mut found = None;
    let mut shared = Vec::new();
    walk(config, domain, entries, |i, rule, matched| {
        if let Matched::Wildcard(raw) = matched
            && rule.share_threshold
        {
            shared.push((i, raw.to_string()));
        }
        if rule.rate_limit.is_some() && i + 1 == entries.len() {
            found = Some(rule);
        }
    });
    found.map(|rule| (rule, shared))
}

/// Calls `visit` with each entry's index, rule and how it matched, down the nested lists, as
/// far as the entries find rules.
fn walk<'c>(
    config: &'c RlsConfig,
    domain: &str,
    entries: &[(&str, &str)],
    mut visit: impl FnMut(usize, &'c Rule, Matched<'c>),
) {
    let Some(mut list) = config.domains.get(domain).map(|d| &d.descriptors) else {
        return;
    };
    for (i, (key, value)) in entries.iter().enumerate() {
        let Some((rule, matched)) = list.lookup(key, value) else {
            return;
        };
        visit(i, rule, matched);
        if rule.children.is_empty() {
            return;
        }
        list = &rule.children;
    }
}

/// The series key of `rule`'s hits (the limit of `entries`, `shared` its entries a
/// `share_threshold` wildcard matched) when request values name it (see the module docs).
fn metric_key(
    config: &RlsConfig,
    domain: &str,
    entries: &[(&str, &str)],
    rule: &Rule,
    shared: &[(usize, String)],
) -> Option<String> {
    if rule.detailed_metric {
        // The request's entries: `hits` builds that key itself unless an entry is shared.
        return (!shared.is_empty()).then(|| detailed_key(entries, shared));
    }
    if !rule.metric_values {
        return None;
    }
    let mut key = String::new();
    walk(config, domain, entries, |i, level, matched| {
        let value = entries[i].1;
        // What envoyproxy/ratelimit writes for the entry in its stats key.
        let written = match matched {
            Matched::Value => value,
            Matched::Wildcard(raw) if level.share_threshold => raw,
            Matched::Wildcard(_) | Matched::Key if level.value_to_metric => value,
            Matched::Wildcard(raw) => raw,
            Matched::Key => "",
        };
        if i > 0 {
            key.push('.');
        }
        key.push_str(entries[i].0);
        if !written.is_empty() {
            key.push('_');
            key.push_str(written);
        }
    });
    Some(key)
}

/// A detailed series' key: the request's entries, a shared entry's value the wildcard's text.
fn detailed_key(entries: &[(&str, &str)], shared: &[(usize, String)]) -> String {
    super::hits::descriptor_key(&with_shared(entries, shared))
}

/// `entries` with each entry a `share_threshold` wildcard matched (`shared`) valued as the
/// wildcard is written: what names the descriptor's client and detailed series.
pub fn with_shared<'a>(
    entries: &[(&'a str, &'a str)],
    shared: &'a [(usize, String)],
) -> Vec<(&'a str, &'a str)> {
    let mut entries = entries.to_vec();
    for (i, raw) in shared {
        entries[*i].1 = raw.as_str();
    }
    entries
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
    let rules: Vec<Option<(&Rule, Shared)>> = descriptors
        .iter()
        .map(|d| match d.limit_override {
            Some(_) => None,
            None => find(config, domain, &d.entries),
        })
        .collect();
    let replaced: HashSet<&str> = rules
        .iter()
        .flatten()
        .flat_map(|(r, _)| r.rate_limit.iter().flat_map(|l| l.replaces.iter()))
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
                    quota_mode: false,
                    shared: Vec::new(),
                    metric_key: None,
                    metadata: None,
                    overridden: true,
                    series: configured.overrides.clone(),
                });
            }
            let Some((rule, shared)) = rule else {
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
                    quota_mode: rule.quota_mode,
                    metric_key: metric_key(config, domain, &d.entries, rule, &shared),
                    shared,
                    metadata: rule.metadata.clone(),
                    overridden: false,
                    series: rule.series.clone(),
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
