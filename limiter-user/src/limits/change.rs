//! What a policy change is: which policy ([`Selector`]), what happened ([`ChangeKind`]), where
//! it came from ([`Source`]); and the changes between two configs ([`diff`]), which the store
//! announces to `Watch` subscribers.

/// Maps keyed by the operator's matches: a fast hasher (the keys are not the network's).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use crate::config::{Config, Match, Resolved, Scope};

/// What a policy is keyed by: the default, or a `match`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    Default,
    Match(Match),
}

impl std::str::FromStr for Selector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "default" {
            Ok(Selector::Default)
        } else {
            s.parse().map(Selector::Match)
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Default => f.write_str("default"),
            Selector::Match(m) => m.fmt(f),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Set,
    Deleted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Api,
    File,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::File => "file",
        }
    }
}

/// One policy created, replaced or removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: ChangeKind,
    pub selector: Selector,
    /// The policy as it is now (for `Deleted`: as it was).
    pub limit: Resolved,
    /// Its scope (the config file's), likewise.
    pub scope: Scope,
    pub generation: u32,
    pub source: Source,
}

/// The policy changes from `old` to `new`: the default if it changed, then every policy set or
/// replaced (in `new`'s order), then every one removed (in `old`'s order). Linear in the
/// policies: `old`'s are looked up by match.
pub fn diff(old: &Config, new: &Config, generation: u32, source: Source) -> Vec<Change> {
    let mut out = Vec::new();
    let change = |kind, selector, limit, scope| Change {
        kind,
        selector,
        limit,
        scope,
        generation,
        source,
    };
    // A change of grouping (`per`) alone is a change of the policy too.
    let default_per = |c: &Config| (c.grouping.default_v4, c.grouping.default_v6);
    if old.default != new.default || default_per(old) != default_per(new) {
        out.push(change(
            ChangeKind::Set,
            Selector::Default,
            new.default,
            Scope::Local,
        ));
    }
    // As is a change of scope (local or global) alone: a global policy's share is its limit
    // here. What a policy is besides its limit: its grouping and its scope.
    let besides = |c: &Config, i: usize| {
        (
            c.grouping.policies.get(i).copied().flatten(),
            c.scope(i as u16 + 1),
        )
    };
    // The policies both have in the same places (all of them, after an edit of one or an API
    // change of one) are compared in place; only the rest is looked up by match.
    let common = old
        .policies
        .iter()
        .zip(&new.policies)
        .take_while(|((om, _), (nm, _))| om == nm)
        .count();
    let scope = |c: &Config, i: usize| c.scope(i as u16 + 1);
    for (i, (m, r)) in new.policies[..common].iter().enumerate() {
        if old.policies[i].1 != *r || besides(old, i) != besides(new, i) {
            let selector = Selector::Match(m.clone());
            out.push(change(ChangeKind::Set, selector, *r, scope(new, i)));
        }
    }
    // A config never holds two policies of one match (`Config::parse` refuses it).
    let old_index: HashMap<&Match, usize> = by_match(&old.policies[common..], common);
    let new_index: HashMap<&Match, usize> = by_match(&new.policies[common..], common);
    for (i, (m, r)) in new.policies.iter().enumerate().skip(common) {
        let same = old_index
            .get(m)
            .is_some_and(|&j| old.policies[j].1 == *r && besides(old, j) == besides(new, i));
        if !same {
            let selector = Selector::Match(m.clone());
            out.push(change(ChangeKind::Set, selector, *r, scope(new, i)));
        }
    }
    for (j, (m, r)) in old.policies.iter().enumerate().skip(common) {
        if !new_index.contains_key(m) {
            let selector = Selector::Match(m.clone());
            out.push(change(ChangeKind::Deleted, selector, *r, scope(old, j)));
        }
    }
    out
}

/// The index of each of `policies` (which start at index `first` of their config), by match.
fn by_match(policies: &[(Match, Resolved)], first: usize) -> HashMap<&Match, usize> {
    policies
        .iter()
        .enumerate()
        .map(|(i, (m, _))| (m, first + i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        Config::parse(yaml).expect("valid config")
    }

    fn described(changes: &[Change]) -> Vec<(ChangeKind, String, u32)> {
        changes
            .iter()
            .map(|c| (c.kind, c.selector.to_string(), c.limit.limit))
            .collect()
    }

    #[test]
    fn a_change_of_grouping_alone_is_a_change() {
        let old = config(
            "default: { limit: 5, window: 1s }\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 1s }\n",
        );
        let new = config(
            "default: { limit: 5, window: 1s, per: { ipv6: /56 } }\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 1s, per: policy }\n",
        );
        assert_eq!(
            described(&diff(&old, &new, 2, Source::File)),
            [
                (ChangeKind::Set, "default".to_string(), 5),
                (ChangeKind::Set, "10.0.0.0/8".to_string(), 1)
            ]
        );
        assert!(diff(&new, &new, 3, Source::File).is_empty());
    }

    #[test]
    fn diff_lists_the_default_then_sets_then_removals() {
        let old = config(
            "default: { limit: 10, window: 1s }\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 1s }\n  - { match: tenant-a, limit: 2, window: 1s }\n  - { match: 192.0.2.1, limit: 3, window: 1s }\n",
        );
        let new = config(
            "default: { limit: 20, window: 1s }\npolicies:\n  - { match: 192.0.2.1, limit: 3, window: 1s }\n  - { match: tenant-a, limit: 5, window: 1s }\n  - { match: tenant-b, limit: 6, window: 1s }\n",
        );
        let changes = diff(&old, &new, 7, Source::File);
        assert_eq!(
            described(&changes),
            [
                (ChangeKind::Set, "default".into(), 20),
                (ChangeKind::Set, "tenant-a".into(), 5),
                (ChangeKind::Set, "tenant-b".into(), 6),
                // A removed policy is reported as it was.
                (ChangeKind::Deleted, "10.0.0.0/8".into(), 1),
            ]
        );
        assert!(
            changes
                .iter()
                .all(|c| c.generation == 7 && c.source == Source::File)
        );
    }

    /// A policy that turns global or local is a change (its limit here is a share, or whole):
    /// the reload's log counts it.
    #[test]
    fn a_change_of_scope_alone_is_a_change() {
        let text = |scope: &str| {
            format!(
                "default: {{ limit: 10, window: 1s }}\npolicies:\n  - {{ match: 10.0.0.0/8, limit: 30, \
                 window: 1s{scope} }}\ncluster: {{ node_id: n1, listen: \"127.0.0.1:7201\", peers: \
                 [\"127.0.0.1:7202\"], token_file: /unused }}\n"
            )
        };
        let (local, global) = (config(&text("")), config(&text(", scope: global")));
        let to_global = diff(&local, &global, 1, Source::File);
        assert_eq!(
            described(&to_global),
            vec![(ChangeKind::Set, "10.0.0.0/8".to_string(), 30)]
        );
        // The notice says the scope (the only thing that changed).
        assert_eq!(to_global[0].scope, Scope::Global);
        let to_local = diff(&global, &local, 1, Source::File);
        assert_eq!(to_local.len(), 1);
        assert_eq!(to_local[0].scope, Scope::Local);
        // A global policy removed: its notice says what it was.
        let empty = config(
            "default: { limit: 10, window: 1s }\ncluster: { node_id: n1, listen: \"127.0.0.1:7201\", \
             peers: [\"127.0.0.1:7202\"], token_file: /unused }\n",
        );
        let removed = diff(&global, &empty, 1, Source::File);
        assert_eq!(
            (removed[0].kind, removed[0].scope),
            (ChangeKind::Deleted, Scope::Global)
        );
    }

    #[test]
    fn diff_of_equal_configs_is_empty_and_reordering_is_no_change() {
        let a = config(
            "default: { limit: 10, window: 1s }\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 1s }\n  - { match: tenant-a, action: pass }\n",
        );
        let b = config(
            "default: { limit: 10, window: 1s }\npolicies:\n  - { match: tenant-a, action: pass }\n  - { match: 10.0.0.0/8, limit: 1, window: 1s }\n",
        );
        assert!(diff(&a, &a, 1, Source::Api).is_empty());
        assert!(diff(&a, &b, 1, Source::Api).is_empty());
        // A changed window alone is a change.
        let c = config(
            "default: { limit: 10, window: 2s }\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 1s }\n  - { match: tenant-a, action: pass }\n",
        );
        assert_eq!(
            described(&diff(&a, &c, 1, Source::Api)),
            [(ChangeKind::Set, "default".into(), 10)]
        );
    }

    /// The diff as it was first written (quadratic): the reference the linear one must equal.
    fn quadratic(old: &Config, new: &Config, generation: u32, source: Source) -> Vec<Change> {
        let mut out = Vec::new();
        let change = |kind, selector, limit, scope| Change {
            kind,
            selector,
            limit,
            scope,
            generation,
            source,
        };
        let default_per = |c: &Config| (c.grouping.default_v4, c.grouping.default_v6);
        if old.default != new.default || default_per(old) != default_per(new) {
            out.push(change(
                ChangeKind::Set,
                Selector::Default,
                new.default,
                Scope::Local,
            ));
        }
        // What a policy is besides its limit: its grouping and its scope.
        let besides = |c: &Config, i: usize| {
            (
                c.grouping.policies.get(i).copied().flatten(),
                c.scope(i as u16 + 1),
            )
        };
        for (i, (m, r)) in new.policies.iter().enumerate() {
            let same = old
                .policies
                .iter()
                .enumerate()
                .any(|(j, (om, or))| om == m && or == r && besides(old, j) == besides(new, i));
            if !same {
                let scope = new.scope(i as u16 + 1);
                out.push(change(
                    ChangeKind::Set,
                    Selector::Match(m.clone()),
                    *r,
                    scope,
                ));
            }
        }
        for (j, (m, r)) in old.policies.iter().enumerate() {
            if !new.policies.iter().any(|(nm, _)| nm == m) {
                let scope = old.scope(j as u16 + 1);
                out.push(change(
                    ChangeKind::Deleted,
                    Selector::Match(m.clone()),
                    *r,
                    scope,
                ));
            }
        }
        out
    }

    /// A config of some of `pool`'s matches, each with a limit, a `per` or none, in an order.
    fn pool_config(entries: &[(usize, u32, u8)]) -> Config {
        let pool = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "192.0.2.0/24",
            "tenant-a",
            "tenant-b",
            "2001:db8::/32",
        ];
        let mut text = String::from("default: { limit: 10, window: 1s }\npolicies:\n");
        let mut seen = std::collections::HashSet::new();
        for &(i, limit, per) in entries {
            let m = pool[i % pool.len()];
            if !seen.insert(m) {
                continue;
            }
            let per = match per % 3 {
                1 if !m.starts_with("tenant") => ", per: policy",
                _ => "",
            };
            text.push_str(&format!(
                "  - {{ match: {m}, limit: {}, window: 1s{per} }}\n",
                limit % 3
            ));
        }
        config(&text)
    }

    proptest::proptest! {
        #[test]
        fn the_linear_diff_equals_the_quadratic_one(
            old in proptest::collection::vec((0..6usize, 0..3u32, 0..3u8), 0..8),
            new in proptest::collection::vec((0..6usize, 0..3u32, 0..3u8), 0..8),
        ) {
            let (old, new) = (pool_config(&old), pool_config(&new));
            proptest::prop_assert_eq!(
                diff(&old, &new, 3, Source::Api),
                quadratic(&old, &new, 3, Source::Api)
            );
        }
    }

    #[test]
    fn the_linear_diff_equals_the_quadratic_one_at_scale() {
        let text = |edit: usize, drop: usize| {
            let mut t = String::from("default: { limit: 10, window: 1s }\npolicies:\n");
            for i in 0..3000usize {
                if i == drop {
                    continue;
                }
                let limit = if i == edit { 7 } else { 100 };
                t.push_str(&format!(
                    "  - {{ match: 16.{}.{}.0/24, limit: {limit}, window: 1s }}\n",
                    i >> 8,
                    i & 0xff
                ));
            }
            config(&t)
        };
        let (old, new) = (text(usize::MAX, 10), text(2999, 20));
        let changes = diff(&old, &new, 1, Source::File);
        assert_eq!(changes, quadratic(&old, &new, 1, Source::File));
        assert_eq!(
            described(&changes),
            [
                (ChangeKind::Set, "16.0.10.0/24".into(), 100),
                (ChangeKind::Set, "16.11.183.0/24".into(), 7),
                (ChangeKind::Deleted, "16.0.20.0/24".into(), 100),
            ]
        );
    }
}
