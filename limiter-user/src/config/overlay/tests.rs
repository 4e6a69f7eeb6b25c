use std::os::unix::fs::PermissionsExt as _;

use proptest::prelude::*;

use super::*;
use crate::config::Window;

const FILE: &str = "\
mode: dry-run
default: { limit: 1000, window: 1s, weight: 2 }   # the operator's
policies:
  - match: 10.0.0.0/8
    limit: 100
    window: 500ms
    weight: 3
  - { match: 192.0.2.7, action: pass }
  - { match: tenant-gold, limit: 9, window: 2s }
adaptive: { enabled: true, period: 250ms }
";

fn m(s: &str) -> Match {
    s.parse().unwrap()
}

fn limit(count: u32, window: &str) -> Resolved {
    Resolved {
        action: Action::Limit,
        limit: count,
        window: window.parse().unwrap(),
    }
}

fn pass() -> Resolved {
    Config::parse("default: { action: pass }\n")
        .unwrap()
        .default
}

fn file() -> Config {
    Config::parse(FILE).unwrap()
}

fn path() -> PathBuf {
    PathBuf::from("/var/lib/limiter/eth0.overlay.yaml")
}

fn policy(c: &Config, s: &str) -> Option<Resolved> {
    c.policies.iter().find(|(p, _)| *p == m(s)).map(|(_, r)| *r)
}

#[test]
fn an_empty_overlay_is_the_file() {
    let e = merge(FILE, &Overlay::default()).unwrap();
    assert_eq!(e.config, file());
    assert_eq!(e.layers, [Layer::File; 4]);
    assert!(e.removed.is_empty() && e.stale_removals.is_empty());
}

#[test]
fn the_overlay_takes_precedence_and_new_policies_come_after_the_file() {
    let mut o = Overlay::default();
    o.set_default(limit(50, "1m"));
    o.set_policy(&m("10.0.0.0/8"), limit(7, "10ms"));
    o.set_policy(&m("2001:db8::/32"), limit(1, "1h"));
    o.set_policy(&m("tenant-new"), pass());
    o.remove_policy(&m("192.0.2.7"), &file()).unwrap();
    let e = merge(FILE, &o).unwrap();
    let c = &e.config;
    assert_eq!(c.default, limit(50, "1m"));
    let order: Vec<String> = c.policies.iter().map(|(p, _)| p.to_string()).collect();
    assert_eq!(
        order,
        ["10.0.0.0/8", "tenant-gold", "2001:db8::/32", "tenant-new"]
    );
    assert_eq!(policy(c, "10.0.0.0/8"), Some(limit(7, "10ms")));
    assert_eq!(policy(c, "tenant-gold"), Some(limit(9, "2s")));
    assert_eq!(policy(c, "tenant-new"), Some(pass()));
    assert_eq!(policy(c, "192.0.2.7"), None);
    assert_eq!(
        e.layers,
        [
            Layer::OverlayOverridesFile,
            Layer::OverlayOverridesFile,
            Layer::File,
            Layer::Overlay,
            Layer::Overlay
        ]
    );
    assert_eq!(e.layer_of(&m("tenant-gold")), Some(Layer::File));
    assert_eq!(e.layer_of(&m("192.0.2.7")), None);
    assert_eq!(e.removed, [(m("192.0.2.7"), pass())]);
    // The file's weights stay with an overridden policy (an API edit of the file kept them);
    // a new policy has the default weight.
    assert_eq!(c.weights, [2.0, 3.0, 1.0, 1.0, 1.0]);
    // `mode` and `adaptive` are the file's.
    assert_eq!(c.mode, file().mode);
    assert_eq!(c.adaptive, file().adaptive);
    assert!(c.adaptive.enabled);
    // The rendered config reads back into the same config.
    assert_eq!(Config::parse(&e.yaml()).unwrap(), e.config);
}

#[test]
fn an_overlay_weight_replaces_the_files() {
    let text = "version: 1\ndefault: { limit: 5, window: 1s, weight: 0.5 }\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 1s, weight: 4 }\n";
    let o = Overlay::parse(text, &path()).unwrap();
    let e = merge(FILE, &o).unwrap();
    assert_eq!(e.config.weights, [0.5, 4.0, 1.0, 1.0]);
    // Setting through the API keeps the entry's weight.
    let mut o = o;
    o.set_policy(&m("10.0.0.0/8"), pass());
    o.set_default(limit(6, "1s"));
    assert_eq!(
        merge(FILE, &o).unwrap().config.weights,
        [0.5, 4.0, 1.0, 1.0]
    );
}

#[test]
fn an_overridden_policy_keeps_the_files_per() {
    use crate::config::{Grouping, Per};
    let text = "\
default:
  limit: 1000
  window: 1s
  per: { ipv4: /24, ipv6: address }
policies:
  - { match: 10.0.0.0/8, limit: 100, window: 1s, per: policy, weight: 3 }
  - { match: \"2001:db8::/32\", limit: 5, window: 1s, per: /48 }
  - { match: 192.0.2.0/24, limit: 5, window: 1s }
";
    let file = Config::parse(text).unwrap();
    let mut o = Overlay::default();
    o.set_default(limit(50, "1m"));
    o.set_policy(&m("10.0.0.0/8"), limit(7, "10ms"));
    o.set_policy(&m("2001:db8::/32"), pass());
    o.set_policy(&m("192.0.2.0/24"), limit(1, "1s"));
    o.set_policy(&m("198.51.100.0/24"), limit(2, "1s"));
    let e = merge(text, &o).unwrap();
    let c = &e.config;
    assert_eq!(policy(c, "10.0.0.0/8"), Some(limit(7, "10ms")));
    assert_eq!(c.default, limit(50, "1m"));
    // `per` as the file wrote it, the default's per-family map included; a policy only the
    // overlay has (and one the file wrote without `per`) follows the default.
    assert_eq!(
        c.grouping,
        Grouping {
            default_v4: Per::Prefix(24),
            default_v6: Per::Address,
            policies: vec![Some(Per::Policy), Some(Per::Prefix(48)), None, None],
        }
    );
    assert_eq!(c.grouping.default_v4, file.grouping.default_v4);
    // The trie groups as the file's does.
    let trie = c.lpm_entries();
    for (key, p) in file.lpm_entries() {
        assert_eq!(trie[&key].group, p.group, "{key:?}");
    }
    // The weight stays too, and the text reads back into the same config.
    assert_eq!(c.weights, [1.0, 3.0, 1.0, 1.0, 1.0]);
    assert!(e.yaml().contains("per: policy"), "{}", e.yaml());
    assert_eq!(Config::parse(&e.yaml()).unwrap(), e.config);
    // Without the overlay's default, the file's default (with its `per`) is in force.
    o.unset_default();
    let c = merge(text, &o).unwrap().config;
    assert_eq!(
        (c.grouping.default_v4, c.grouping.default_v6),
        (Per::Prefix(24), Per::Address)
    );
}

#[test]
fn rm_of_an_overlay_entry_restores_the_files_policy_then_removes_it() {
    let f = file();
    let mut o = Overlay::default();
    let gold = m("tenant-gold");
    o.set_policy(&gold, limit(1, "1s"));
    assert_eq!(
        policy(&merge(FILE, &o).unwrap().config, "tenant-gold"),
        Some(limit(1, "1s"))
    );
    // First rm: the API's entry goes, the file's policy is back, from the file.
    assert_eq!(
        o.remove_policy(&gold, &f).unwrap(),
        Removal::RestoredFile(limit(9, "2s"))
    );
    assert!(o.is_empty());
    let e = merge(FILE, &o).unwrap();
    assert_eq!(policy(&e.config, "tenant-gold"), Some(limit(9, "2s")));
    assert_eq!(e.layer_of(&gold), Some(Layer::File));
    // Second rm: a tombstone removes the file's policy without touching the file.
    assert_eq!(
        o.remove_policy(&gold, &f).unwrap(),
        Removal::Tombstoned(limit(9, "2s"))
    );
    let e = merge(FILE, &o).unwrap();
    assert_eq!(policy(&e.config, "tenant-gold"), None);
    assert_eq!(e.removed, [(gold.clone(), limit(9, "2s"))]);
    // Third: nothing left to remove.
    let err = o.remove_policy(&gold, &f).unwrap_err();
    assert_eq!(err.to_string(), "no policy matches tenant-gold");
    // `set` after a removal drops the tombstone.
    o.set_policy(&gold, limit(3, "1s"));
    assert!(o.removed.is_empty());
    let e = merge(FILE, &o).unwrap();
    assert_eq!(policy(&e.config, "tenant-gold"), Some(limit(3, "1s")));
    assert_eq!(e.layer_of(&gold), Some(Layer::OverlayOverridesFile));
    // An overlay-only policy: rm removes it, a second rm finds nothing.
    let new = m("198.51.100.0/24");
    o.set_policy(&new, limit(2, "1s"));
    assert_eq!(
        o.remove_policy(&new, &f).unwrap(),
        Removal::Removed(limit(2, "1s"))
    );
    assert!(matches!(
        o.remove_policy(&new, &f),
        Err(OverlayError::NotFound(_))
    ));
    assert!(matches!(
        o.remove_policy(&m("203.0.113.0/24"), &f),
        Err(OverlayError::NotFound(_))
    ));
}

#[test]
fn unsetting_the_default_restores_the_files() {
    let mut o = Overlay::default();
    assert!(!o.unset_default());
    o.set_default(pass());
    assert_eq!(merge(FILE, &o).unwrap().config.default, pass());
    assert!(o.unset_default());
    let e = merge(FILE, &o).unwrap();
    assert_eq!(e.config.default, limit(1000, "1s"));
    assert_eq!(e.layer(0), Layer::File);
}

#[test]
fn tombstones_of_policies_the_file_dropped_are_inert_and_pruned() {
    let mut o = Overlay::default();
    o.remove_policy(&m("192.0.2.7"), &file()).unwrap();
    o.remove_policy(&m("tenant-gold"), &file()).unwrap();
    // The operator drops 192.0.2.7 from the file.
    let edited = FILE.replace("  - { match: 192.0.2.7, action: pass }\n", "");
    let e = merge(&edited, &o).unwrap();
    assert_eq!(e.stale_removals, [m("192.0.2.7")]);
    assert_eq!(e.removed.len(), 1);
    let stale = o.prune(&Config::parse(&edited).unwrap());
    assert_eq!(stale, [m("192.0.2.7")]);
    assert_eq!(o.removed, [m("tenant-gold")]);
    // Written again later, it is in force.
    let e = merge(FILE, &o).unwrap();
    assert_eq!(policy(&e.config, "192.0.2.7"), Some(pass()));
}

#[test]
fn the_overlay_round_trips_through_its_text() {
    let mut o = Overlay::default();
    o.set_default(limit(4_294_967_295, "1h"));
    o.set_policy(&m("10.0.0.0/8"), limit(0, "10ms"));
    o.set_policy(&m("2001:db8::1"), pass());
    o.set_policy(&m("12345"), limit(1, "1500ms"));
    o.set_policy(
        &m("api key #7: \"x\""),
        Config::parse("default: { action: drop }\n")
            .unwrap()
            .default,
    );
    o.policies[0].1.weight = Some(2.5);
    o.removed.push(m("192.0.2.7"));
    let text = o.to_yaml();
    assert!(text.contains("version: 1"), "{text}");
    assert_eq!(Overlay::parse(&text, &path()).unwrap(), o);
    assert_eq!(
        Overlay::parse(&Overlay::default().to_yaml(), &path()).unwrap(),
        Overlay::default()
    );
}

fn corrupt(text: &str) -> String {
    let e = Overlay::parse(text, &path()).unwrap_err();
    assert!(matches!(e, OverlayError::Corrupt { .. }), "{e:?}");
    let e = e.to_string();
    assert!(
        e.starts_with("the policy overlay /var/lib/limiter/eth0.overlay.yaml is corrupt: "),
        "{e}"
    );
    e
}

#[test]
fn a_newer_version_is_refused_as_such() {
    let e = Overlay::parse("version: 2\nsomething_new: [1]\n", &path()).unwrap_err();
    assert!(
        matches!(e, OverlayError::FutureVersion { found: 2, .. }),
        "{e:?}"
    );
    let e = e.to_string();
    assert!(
        e.contains("/var/lib/limiter/eth0.overlay.yaml has version 2")
            && e.contains("reads version 1"),
        "{e}"
    );
    assert!(corrupt("version: 0\n").contains("`version` must be 1, got 0"));
    assert!(corrupt("version: one\n").contains("`version` must be 1, got one"));
    assert!(corrupt("version: -3\n").contains("`version` must be 1"));
    assert!(corrupt("policies: []\n").contains("no `version` field"));
}

/// Policies earlier versions accepted for addresses no packet comes from (IPv4-mapped, multicast)
/// are dropped from an overlay, not taken for corruption: the rest stays in force.
#[test]
fn unmatchable_policies_are_dropped_from_the_overlay_and_the_rest_kept() {
    let text = "version: 1
policies:
  - { match: \"::ffff:192.0.2.7\", action: drop }
  - { match: 10.0.0.0/8, action: drop }
  - { match: \"ff02::/16\", limit: 1, window: 1s }
removed:
  - \"ff05::1\"
  - 192.0.2.0/24
";
    let o = Overlay::parse(text, Path::new("o.yaml")).unwrap();
    let matches: Vec<String> = o.policies.iter().map(|(m, _)| m.to_string()).collect();
    assert_eq!(matches, ["10.0.0.0/8"]);
    let removed: Vec<String> = o.removed.iter().map(ToString::to_string).collect();
    assert_eq!(removed, ["192.0.2.0/24"]);
    // Other bad matches are still corruption.
    assert!(
        Overlay::parse(
            "version: 1\npolicies:\n  - { match: 10.0.0.1/8, action: drop }\n",
            Path::new("o.yaml")
        )
        .is_err()
    );
}

#[test]
fn a_corrupt_overlay_is_refused_with_the_problem() {
    let cases = [
        ("", "the file is empty"),
        ("  \n", "the file is empty"),
        ("version: 1\npolicies: [\n", "line"),
        ("[1, 2]\n", "invalid type"),
        ("version: 1\npolices: []\n", "unknown field `polices`"),
        (
            "version: 1\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 2h }\n",
            "out of range",
        ),
        (
            "version: 1\npolicies:\n  - { match: 10.0.0.1/8, limit: 1, window: 1s }\n",
            "did you mean 10.0.0.0/8",
        ),
        (
            "version: 1\npolicies:\n  - { match: 10.0.0.0/8, action: pass, limit: 3 }\n",
            "policies[0] (match 10.0.0.0/8): `action: pass` is never limited",
        ),
        (
            "version: 1\npolicies:\n  - { match: t, limit: 1, window: 1s }\n  - { match: t, action: drop }\n",
            "policies[1] (match t): duplicate match",
        ),
        (
            "version: 1\npolicies:\n  - { match: t, limit: 1, window: 1s, weight: 0 }\n",
            "policies[0] (match t): `weight` must be a positive finite number",
        ),
        (
            "version: 1\ndefault: { limit: 1 }\n",
            "default: `window` is required",
        ),
        (
            "version: 1\npolicies:\n  - { match: t, action: pass }\nremoved: [t]\n",
            "removed[0] (t): also set under `policies`",
        ),
        (
            "version: 1\nremoved: [t, t]\n",
            "removed[1] (t): listed twice",
        ),
        (
            "version: 1\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 1s, per: policy }\n",
            "policies[0] (match 10.0.0.0/8): `per` is not an overlay key",
        ),
        (
            "version: 1\ndefault: { limit: 1, window: 1s, per: address }\n",
            "default: `per` is not an overlay key",
        ),
    ];
    for (text, want) in cases {
        let e = corrupt(text);
        assert!(e.contains(want), "{text:?}: {want:?} not in {e}");
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "limiter-overlay-{name}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn load_and_store_under_the_state_dir() {
    let dir = scratch("store");
    let path = overlay_path(&dir.join("state"), "eth0");
    assert!(path.ends_with("state/eth0.overlay.yaml"));
    // None yet: empty.
    assert_eq!(Overlay::load(&path).unwrap(), Overlay::default());
    let mut o = Overlay::default();
    o.set_policy(&m("10.0.0.0/8"), limit(1, "1s"));
    o.removed.push(m("tenant-gold"));
    o.store(&path).unwrap();
    assert_eq!(Overlay::load(&path).unwrap(), o);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // Replaced whole, nothing else left in the directory.
    o.set_default(pass());
    o.store(&path).unwrap();
    assert_eq!(Overlay::load(&path).unwrap(), o);
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["eth0.overlay.yaml"]);
    // Not text, and not readable as a file: errors naming the file.
    std::fs::write(&path, b"version: 1\n\xff\n").unwrap();
    let e = Overlay::load(&path).unwrap_err().to_string();
    assert!(e.contains("eth0.overlay.yaml is corrupt: not UTF-8"), "{e}");
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let e = Overlay::load(&path).unwrap_err();
    assert!(matches!(e, OverlayError::Read(_)), "{e:?}");
    assert!(e.to_string().contains("eth0.overlay.yaml"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_invalid_file_or_merge_is_an_error() {
    let e = merge("default: { limit: 1 }\n", &Overlay::default()).unwrap_err();
    assert!(matches!(e, MergeError::File(_)), "{e:?}");
    let shown = crate::error_chain(&e);
    assert!(shown.contains("`window` is required"), "{shown}");
    // The file at the most policies there may be, and the overlay adds one.
    let mut text = String::from("default: { limit: 1, window: 1s }\npolicies:\n");
    for i in 0..config::MAX_POLICIES {
        text.push_str(&format!("  - {{ match: id-{i}, action: pass }}\n"));
    }
    let mut o = Overlay::default();
    assert!(merge(&text, &o).is_ok());
    o.set_policy(&m("one-more"), pass());
    let e = merge(&text, &o).unwrap_err();
    assert!(
        matches!(e, MergeError::Effective(PolicyError::TooMany { .. })),
        "{e:?}"
    );
    // Replacing one of them is fine.
    let mut o = Overlay::default();
    o.set_policy(&m("id-7"), limit(1, "1s"));
    assert_eq!(
        merge(&text, &o).unwrap().layer(8),
        Layer::OverlayOverridesFile
    );
}

#[test]
fn the_rendered_config_says_where_things_come_from_and_parses_back() {
    let paths = (Path::new("/etc/limiter.yaml"), path());
    let e = merge(FILE, &Overlay::default()).unwrap();
    let text = e.render(paths.0, &paths.1);
    assert!(text.contains("The overlay changes nothing"), "{text}");
    assert_eq!(Config::parse(&text).unwrap(), file());
    let mut o = Overlay::default();
    o.set_policy(&m("tenant-gold"), pass());
    o.set_policy(&m("tenant-new"), pass());
    o.remove_policy(&m("192.0.2.7"), &file()).unwrap();
    let e = merge(FILE, &o).unwrap();
    let text = e.render(paths.0, &paths.1);
    assert!(
        text.contains(
            "/etc/limiter.yaml with the policy overlay /var/lib/limiter/eth0.overlay.yaml"
        ) && text.contains(
            "# Set through the API: tenant-gold (overlay (overrides file)), tenant-new (overlay)."
        ) && text.contains("# Removed through the API (not below): 192.0.2.7."),
        "{text}"
    );
    assert_eq!(Config::parse(&text).unwrap(), e.config);
    // Folding: the rendered config as the file, and an empty overlay, is the same config.
    assert_eq!(merge(&text, &Overlay::default()).unwrap().config, e.config);
}

// Property: for any file and any sequence of API changes, the merge follows the precedence,
// its YAML parses back into the same config, and the overlay's text into the same overlay.

fn resolved() -> impl Strategy<Value = Resolved> {
    prop_oneof![
        (any::<u32>(), MIN_WINDOW..=MAX_WINDOW).prop_map(|(limit, micros)| Resolved {
            action: Action::Limit,
            limit,
            window: Window { micros },
        }),
        Just(pass()),
        Just(
            Config::parse("default: { action: drop }\n")
                .unwrap()
                .default
        ),
    ]
}

const MIN_WINDOW: u32 = limiter_common::window::MIN_WINDOW_US;
const MAX_WINDOW: u32 = limiter_common::window::MAX_WINDOW_US;

/// Matches: a few addresses and prefixes, and IDs of any printable text (quoting).
fn matches() -> impl Strategy<Value = Vec<Match>> {
    let fixed = [
        "10.0.0.0/8",
        "10.1.0.0/16",
        "192.0.2.7",
        "2001:db8::/32",
        "::1",
    ];
    prop::collection::vec("[ -~]{1,12}", 0..6).prop_map(move |ids| {
        let mut all: Vec<Match> = fixed.iter().map(|s| m(s)).collect();
        for id in ids {
            if let Ok(id @ Match::Id(_)) = id.parse::<Match>()
                && !all.contains(&id)
            {
                all.push(id);
            }
        }
        all
    })
}

#[derive(Debug, Clone)]
enum Op {
    Set(usize, Resolved),
    SetDefault(Resolved),
    Remove(usize),
    UnsetDefault,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<usize>(), resolved()).prop_map(|(i, r)| Op::Set(i, r)),
        resolved().prop_map(Op::SetDefault),
        any::<usize>().prop_map(Op::Remove),
        Just(Op::UnsetDefault),
    ]
}

proptest! {
    #[test]
    fn merge_follows_the_precedence_and_round_trips(
        pool in matches(),
        in_file in prop::collection::vec(any::<bool>(), 16),
        file_limits in prop::collection::vec(resolved(), 17),
        weights in prop::collection::vec(prop::option::of(1u32..100), 17),
        ops in prop::collection::vec(op(), 0..24),
        dry_run in any::<bool>(),
    ) {
        // The file: a default, and some of the pool.
        let mut file = Mapping::new();
        if dry_run {
            file.insert("mode".into(), "dry-run".into());
        }
        let w = |i: usize| weights[i].map(|w| Value::from(f64::from(w) / 4.0));
        file.insert("default".into(), entry_value(None, &file_limits[16].into(), w(16).as_ref()));
        let file_policies: Vec<Value> = pool
            .iter()
            .enumerate()
            .filter(|(i, _)| in_file[*i])
            .map(|(i, p)| entry_value(Some(p), &file_limits[i].into(), w(i).as_ref()))
            .collect();
        file.insert("policies".into(), Value::Sequence(file_policies));
        let text = format!("# a comment\n{}", serde_yaml::to_string(&file).unwrap());
        let file_config = Config::parse(&text).unwrap();

        let mut o = Overlay::default();
        for op in &ops {
            match op {
                Op::Set(i, r) => o.set_policy(&pool[i % pool.len()], *r),
                Op::SetDefault(r) => o.set_default(*r),
                Op::Remove(i) => {
                    let _ = o.remove_policy(&pool[i % pool.len()], &file_config);
                }
                Op::UnsetDefault => {
                    o.unset_default();
                }
            }
        }
        prop_assert_eq!(Overlay::parse(&o.to_yaml(), &path()).unwrap(), o.clone());

        let e = merge(&text, &o).unwrap();
        prop_assert_eq!(Config::parse(&e.yaml()).unwrap(), e.config.clone());
        prop_assert_eq!(e.config.mode, file_config.mode);
        prop_assert_eq!(e.layers.len(), e.config.policies.len() + 1);
        prop_assert_eq!(e.config.default, o.default.map_or(file_config.default, |d| d.limit));
        for p in &pool {
            let in_overlay = o.policies.iter().find(|(q, _)| q == p).map(|(_, e)| e.limit);
            let in_file = policy_of(&file_config, p);
            let want = match (in_overlay, o.removed.contains(p)) {
                (Some(r), _) => Some(r),
                (None, true) => None,
                (None, false) => in_file,
            };
            prop_assert_eq!(policy_of(&e.config, p), want, "{}", p);
            let layer = match (in_overlay.is_some(), in_file.is_some()) {
                (true, true) => Some(Layer::OverlayOverridesFile),
                (true, false) => Some(Layer::Overlay),
                (false, _) => want.map(|_| Layer::File),
            };
            prop_assert_eq!(e.layer_of(p), layer, "{}", p);
        }
    }
}

fn policy_of(c: &Config, p: &Match) -> Option<Resolved> {
    c.policies.iter().find(|(q, _)| q == p).map(|(_, r)| *r)
}

/// A file with a cluster of 3 members and one global policy (10.230.0.0/24, limit 40).
const CLUSTER_FILE: &str = "\
default: { limit: 1000, window: 1s }
policies:
  - { match: 10.230.0.0/24, limit: 40, window: 1s, scope: global, weight: 2 }
  - { match: 10.231.0.0/24, limit: 40, window: 1s }
cluster:
  node_id: n1
  listen: 127.0.0.1:7201
  peers: [\"127.0.0.1:7202\", \"127.0.0.1:7203\"]
  token_file: /etc/limiter/cluster.token
";

#[test]
fn the_merge_keeps_the_file_s_scope_and_checks_global_limits_as_the_file_s_are() {
    let mut o = Overlay::default();
    o.set_policy(&m("10.230.0.0/24"), limit(29, "1s"));
    let e = merge(CLUSTER_FILE, &o).unwrap();
    assert_eq!(e.config.scope(1), Scope::Global);
    assert_eq!(e.config.weight(1), 2.0);
    assert_eq!(e.config.warnings.len(), 1, "{:?}", e.config.warnings);
    assert!(
        e.config.warnings[0].contains("below 10×"),
        "{:?}",
        e.config.warnings
    );
    // What the text says, but for the warning's line (the text's, not the file's).
    let mut reread = Config::parse(&e.yaml()).unwrap();
    reread.warnings.clear();
    let mut config = e.config.clone();
    config.warnings.clear();
    assert_eq!(reread, config);
    // A share of 0 is refused, as it is in the file.
    o.set_policy(&m("10.230.0.0/24"), limit(2, "1s"));
    let e = merge(CLUSTER_FILE, &o).unwrap_err();
    let shown = crate::error_chain(&e);
    assert!(
        matches!(e, MergeError::Effective(_))
            && shown.contains(
                "policies[0].limit (match 10.230.0.0/24): limit 2 is below the cluster's 3 members"
            ),
        "{shown}"
    );
    // Removing the global policy leaves none, and no warning.
    let mut o = Overlay::default();
    o.remove_policy(&m("10.230.0.0/24"), &Config::parse(CLUSTER_FILE).unwrap())
        .unwrap();
    let e = merge(CLUSTER_FILE, &o).unwrap();
    assert_eq!(e.config.scopes, [Scope::Local, Scope::Local]);
    assert!(e.config.warnings.is_empty());
    assert_eq!(Config::parse(&e.yaml()).unwrap(), e.config);
}

#[test]
fn a_large_merge_equals_its_text_read_back() {
    let mut text = String::from("default: { limit: 1000, window: 1s, weight: 3 }\npolicies:\n");
    for i in 0..5000usize {
        let per = if i % 7 == 0 { ", per: /28" } else { "" };
        text.push_str(&format!(
            "  - {{ match: 16.{}.{}.0/24, limit: {}, window: 1s{per} }}\n",
            i >> 8,
            i & 0xff,
            i % 50
        ));
    }
    let file = Config::parse(&text).unwrap();
    let mut o = Overlay::default();
    o.set_default(limit(7, "2s"));
    for i in (0..5000usize).step_by(97) {
        o.set_policy(&m(&format!("16.{}.{}.0/24", i >> 8, i & 0xff)), pass());
    }
    for i in (3..5000usize).step_by(101) {
        o.remove_policy(&m(&format!("16.{}.{}.0/24", i >> 8, i & 0xff)), &file)
            .unwrap();
    }
    o.set_policy(&m("tenant-x"), limit(5, "1m"));
    let e = merge(&text, &o).unwrap();
    assert_eq!(e.config.weight(0), 3.0);
    assert_eq!(e.layers.len(), e.config.policies.len() + 1);
    assert_eq!(Config::parse(&e.yaml()).unwrap(), e.config);
}
