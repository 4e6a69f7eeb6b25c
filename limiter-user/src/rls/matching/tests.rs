//! Conformance vectors written from the examples of envoyproxy/ratelimit's README (its
//! "Examples" section) and the protocol's documentation of `RateLimitRequest`, plus the
//! config's validation messages.

use super::*;
use crate::rls::config::{RlsConfigError, window};

fn config(yaml: &str) -> RlsConfig {
    RlsConfig::parse(yaml).unwrap_or_else(|e| panic!("valid config: {e}"))
}

fn d<'a>(entries: &[(&'a str, &'a str)]) -> Descriptor<'a> {
    Descriptor {
        entries: entries.to_vec(),
        limit_override: None,
    }
}

/// `(requests_per_unit, unit, shadow)` of the one descriptor `entries`, `None` when unlimited
/// or not limited at all.
fn limit(config: &RlsConfig, domain: &str, entries: &[(&str, &str)]) -> Applies {
    limits_for(config, domain, &[d(entries)]).remove(0)
}

fn per(rpu: u32, unit: Unit) -> Applies {
    Applies::Limited(Limit {
        requests_per_unit: rpu,
        unit,
        name: None,
        shadow_mode: false,
        quota_mode: false,
        shared: Vec::new(),
        metric_key: None,
        metadata: None,
        overridden: false,
        series: None,
    })
}

#[test]
fn example_1_key_and_value() {
    let c = config(
        "domain: mongo_cps
descriptors:
  - key: database
    value: users
    rate_limit:
      unit: second
      requests_per_unit: 500

  - key: database
    value: default
    rate_limit:
      unit: second
      requests_per_unit: 500
",
    );
    assert_eq!(
        limit(&c, "mongo_cps", &[("database", "users")]),
        per(500, Unit::Second)
    );
    assert_eq!(
        limit(&c, "mongo_cps", &[("database", "default")]),
        per(500, Unit::Second)
    );
    // No key-only rule: another value is not limited.
    assert_eq!(
        limit(&c, "mongo_cps", &[("database", "other")]),
        Applies::Nothing
    );
    // Another domain knows none of it.
    assert_eq!(
        limit(&c, "other", &[("database", "users")]),
        Applies::Nothing
    );
}

const EXAMPLE_2: &str = "domain: messaging
descriptors:
  # Only allow 5 marketing messages a day
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit:
          unit: day
          requests_per_unit: 5

  # Only allow 100 messages a day to any unique phone number
  - key: to_number
    rate_limit:
      unit: day
      requests_per_unit: 100
";

#[test]
fn example_2_nested_lists_and_several_descriptors() {
    let c = config(EXAMPLE_2);
    let request = [
        d(&[("message_type", "marketing"), ("to_number", "2061111111")]),
        d(&[("to_number", "2061111111")]),
    ];
    assert_eq!(
        limits_for(&c, "messaging", &request),
        vec![per(5, Unit::Day), per(100, Unit::Day)]
    );
    // The placeholder level has no limit of its own.
    assert_eq!(
        limit(&c, "messaging", &[("message_type", "marketing")]),
        Applies::Nothing
    );
    // Another message type is not under the nested rule.
    assert_eq!(
        limit(
            &c,
            "messaging",
            &[("message_type", "transactional"), ("to_number", "1")]
        ),
        Applies::Nothing
    );
    // A day is enforced as its hourly share over a sliding hour.
    assert_eq!(window(100, Unit::Day), (4, 3_600_000_000));
    assert_eq!(window(5, Unit::Day), (1, 3_600_000_000));
    assert_eq!(window(0, Unit::Day), (0, 3_600_000_000));
    assert_eq!(window(500, Unit::Second), (500, 1_000_000));
    assert_eq!(window(7, Unit::Hour), (7, 3_600_000_000));
    assert!(c.notes.iter().any(
        |n| n.contains("100 per day is enforced as 4 per sliding hour") && !n.contains("WARNING")
    ));
    // Below one an hour the share rounds up: said as a warning with the factor.
    let loose = config(
        "domain: d
descriptors:
  - key: k
    rate_limit: { unit: day, requests_per_unit: 1 }
",
    );
    assert!(
        loose
            .notes
            .iter()
            .any(|n| n.contains("WARNING: that admits up to 24 per day, 24.0x")),
        "{:?}",
        loose.notes
    );
}

#[test]
fn example_3_key_and_value_before_key_only() {
    let c = config(
        "domain: edge_proxy_per_ip
descriptors:
  - key: remote_address
    rate_limit:
      unit: second
      requests_per_unit: 10

  # Black list IP
  - key: remote_address
    value: 50.0.0.5
    rate_limit:
      unit: second
      requests_per_unit: 0
",
    );
    assert_eq!(
        limit(&c, "edge_proxy_per_ip", &[("remote_address", "50.0.0.1")]),
        per(10, Unit::Second)
    );
    assert_eq!(
        limit(&c, "edge_proxy_per_ip", &[("remote_address", "50.0.0.5")]),
        per(0, Unit::Second)
    );
}

#[test]
fn example_4_a_rule_applies_at_the_depth_of_the_request() {
    let flat = config(
        "domain: example4
descriptors:
  - key: key
    value: value
    rate_limit:
      requests_per_unit: 300
      unit: second
",
    );
    let two = [("key", "value"), ("subkey", "subvalue")];
    assert_eq!(limit(&flat, "example4", &two), Applies::Nothing);
    assert_eq!(
        limit(&flat, "example4", &[("key", "value")]),
        per(300, Unit::Second)
    );
    let nested = config(
        "domain: example4
descriptors:
  - key: key
    value: value
    descriptors:
      - key: subkey
        rate_limit:
          requests_per_unit: 300
          unit: second
",
    );
    assert_eq!(limit(&nested, "example4", &two), per(300, Unit::Second));
    // One entry short of the rule's depth: nothing.
    assert_eq!(
        limit(&nested, "example4", &[("key", "value")]),
        Applies::Nothing
    );
    // One entry deeper than the rules go: nothing.
    assert_eq!(
        limit(
            &nested,
            "example4",
            &[("key", "value"), ("subkey", "x"), ("more", "y")]
        ),
        Applies::Nothing
    );
}

#[test]
fn example_5_unlimited() {
    let c = config(
        "domain: internal
descriptors:
  - key: ldap
    rate_limit:
      unlimited: true

  - key: azure
    rate_limit:
      unit: minute
      requests_per_unit: 100
",
    );
    assert_eq!(limit(&c, "internal", &[("ldap", "x")]), Applies::Unlimited);
    assert_eq!(
        limit(&c, "internal", &[("azure", "x")]),
        per(100, Unit::Minute)
    );
}

#[test]
fn example_6_shadow_mode() {
    let c = config(
        "domain: example6
descriptors:
  - key: service
    descriptors:
      - key: user
        value: user-a
        rate_limit:
          requests_per_unit: 10
          unit: second
        shadow_mode: true
      - key: user
        value: user-b
        rate_limit:
          requests_per_unit: 20
          unit: second
",
    );
    let a = limit(
        &c,
        "example6",
        &[("service", "auth-service"), ("user", "user-a")],
    );
    assert!(matches!(
        a,
        Applies::Limited(Limit {
            requests_per_unit: 10,
            shadow_mode: true,
            ..
        })
    ));
    let b = limit(
        &c,
        "example6",
        &[("service", "auth-service"), ("user", "user-b")],
    );
    assert_eq!(b, per(20, Unit::Second));
}

#[test]
fn example_7_replaces() {
    let c = config(
        "domain: example7
descriptors:
  - key: key_1
    value: value_1
    descriptors:
      - key: user
        value: bkthomps
        rate_limit:
          name: specific_limit
          requests_per_unit: 5
          unit: second
  - key: key_2
    value: value_2
    descriptors:
      - key: user
        value: bkthomps
        rate_limit:
          replaces:
            - name: specific_limit
          requests_per_unit: 10
          unit: second
",
    );
    let one = d(&[("key_1", "value_1"), ("user", "bkthomps")]);
    let two = d(&[("key_2", "value_2"), ("user", "bkthomps")]);
    let named = Applies::Limited(Limit {
        requests_per_unit: 5,
        unit: Unit::Second,
        name: Some("specific_limit".into()),
        shadow_mode: false,
        quota_mode: false,
        shared: Vec::new(),
        metric_key: None,
        metadata: None,
        overridden: false,
        series: None,
    });
    assert_eq!(
        limits_for(&c, "example7", std::slice::from_ref(&one)),
        vec![named]
    );
    assert_eq!(
        limits_for(&c, "example7", std::slice::from_ref(&two)),
        vec![per(10, Unit::Second)]
    );
    // Both in one request: the replaced limit does not apply (and is not spent).
    assert_eq!(
        limits_for(&c, "example7", &[one, two]),
        vec![Applies::Nothing, per(10, Unit::Second)]
    );
}

#[test]
fn example_8_detailed_metric_changes_no_match() {
    let c = config(
        "domain: example8
descriptors:
  - key: key1
    detailed_metric: true
    rate_limit:
      unit: minute
      requests_per_unit: 10
  - key: key1
    value: value1
    rate_limit:
      unit: minute
      requests_per_unit: 20
",
    );
    assert_eq!(
        limit(&c, "example8", &[("key1", "unspecified")]),
        per(10, Unit::Minute)
    );
    assert_eq!(
        limit(&c, "example8", &[("key1", "value1")]),
        per(20, Unit::Minute)
    );
}

#[test]
fn example_9_wildcards_after_exact_values_before_key_only() {
    let c = config(
        "domain: example9
descriptors:
  - key: key1
    value: value*
    rate_limit:
      unit: minute
      requests_per_unit: 20
  - key: key1
    value: value9
    rate_limit:
      unit: minute
      requests_per_unit: 9
  - key: key1
    rate_limit:
      unit: minute
      requests_per_unit: 1
",
    );
    assert_eq!(
        limit(&c, "example9", &[("key1", "value_1")]),
        per(20, Unit::Minute)
    );
    assert_eq!(
        limit(&c, "example9", &[("key1", "value")]),
        per(20, Unit::Minute)
    );
    assert_eq!(
        limit(&c, "example9", &[("key1", "value9")]),
        per(9, Unit::Minute)
    );
    assert_eq!(
        limit(&c, "example9", &[("key1", "other")]),
        per(1, Unit::Minute)
    );
}

#[test]
fn a_request_override_applies_in_a_known_domain_only() {
    let c = config(EXAMPLE_2);
    let mut over = d(&[("anything", "x")]);
    over.limit_override = Some((42, Unit::Minute));
    let got = limits_for(&c, "messaging", std::slice::from_ref(&over));
    assert!(matches!(
        &got[0],
        Applies::Limited(Limit {
            requests_per_unit: 42,
            unit: Unit::Minute,
            overridden: true,
            ..
        })
    ));
    assert_eq!(limits_for(&c, "unknown", &[over]), vec![Applies::Nothing]);
}

#[test]
fn values_may_be_yaml_numbers_and_units_any_case() {
    let c = config(
        "domain: 7
descriptors:
  - key: code
    value: 500
    rate_limit: { unit: SECOND, requests_per_unit: 3 }
",
    );
    assert_eq!(limit(&c, "7", &[("code", "500")]), per(3, Unit::Second));
}

fn error(yaml: &str) -> String {
    match RlsConfig::parse(yaml) {
        Ok(_) => panic!("must be refused:\n{yaml}"),
        // As the agent says it: the error and its sources.
        Err(e) => crate::error_chain(&e),
    }
}

#[test]
fn errors_name_the_field_and_its_line() {
    let e = error("descriptors:\n  - key: a\n");
    assert_eq!(e, "config: domain: a config file must name its domain");
    let e = error(
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unit: fortnight\n      requests_per_unit: 1\n",
    );
    assert!(
        e.starts_with(
            "config: descriptors[0].rate_limit.unit (line 5): invalid rate limit unit \"fortnight\""
        ),
        "{e}"
    );
    let e = error("domain: d\ndescriptors:\n  - key: a\n    descriptors:\n      - value: b\n");
    assert!(
        e.starts_with(
            "config: descriptors[0].descriptors[0].key (line 5): a descriptor needs a key"
        ),
        "{e}"
    );
    let e = error(
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unlimited: true\n      unit: second\n",
    );
    assert!(
        e.starts_with("config: descriptors[0].rate_limit.unlimited (line 5)"),
        "{e}"
    );
    let e =
        error("domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      requests_per_unit: 1\n");
    assert!(
        e.starts_with("config: descriptors[0].rate_limit.unit (line 4): a rate_limit needs a unit"),
        "{e}"
    );
    let e = error("domain: d\ndescriptors:\n  - key: a\n    value: b\n  - key: a\n    value: b\n");
    assert!(
        e.starts_with(
            "config: descriptors[1].key (line 5): duplicate descriptor composite key \"d.a_b\""
        ),
        "{e}"
    );
    let e = error(
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      name: me\n      unit: second\n      requests_per_unit: 1\n      replaces:\n        - name: me\n",
    );
    assert!(
        e.starts_with(
            "config: descriptors[0].rate_limit.replaces[0].name (line 9): a rate_limit cannot \
             replace itself"
        ),
        "{e}"
    );
    let e = error("domain: d\ndescriptors:\n  - key: a\n    value: b\n    share_threshold: true\n");
    assert!(
        e.starts_with(
            "config: descriptors[0].share_threshold (line 5): share_threshold can only be used \
             with a wildcard value"
        ),
        "{e}"
    );
    let e = error("domain: d\ndescriptors:\n  - key: a\n    metadata: {x: !t 1}\n");
    assert!(
        e.starts_with("config: descriptors[0].metadata (line 4): not a metadata map: x: the tag"),
        "{e}"
    );
    // Unknown fields and bad types: serde_yaml's message, with the path and the line.
    let e = error("domain: d\ndescriptors:\n  - key: a\n    rate_limt: {}\n");
    assert!(
        e.contains("descriptors[0]: unknown field `rate_limt`") && e.contains("line 4"),
        "{e}"
    );
    assert_eq!(e.matches("unknown field").count(), 1, "said once: {e}");
    let e = error(
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unit: second\n      requests_per_unit: -1\n",
    );
    assert!(
        e.contains("requests_per_unit") && e.contains("line 6"),
        "{e}"
    );
}

#[test]
fn a_domain_in_two_files_is_refused() {
    let files = [
        ("a.yaml".to_string(), "domain: d\n".to_string()),
        ("b.yaml".to_string(), "# b\ndomain: d\n".to_string()),
    ];
    let e = RlsConfig::from_files(&files).unwrap_err();
    assert!(matches!(e, RlsConfigError::Invalid { .. }));
    assert_eq!(
        e.to_string(),
        "b.yaml: domain (line 2): duplicate domain \"d\": a.yaml has it too (one file per domain)"
    );
}

#[test]
fn a_directory_loads_its_yaml_files_and_skips_the_rest() {
    let dir = std::env::temp_dir().join(format!("limiter-rls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), EXAMPLE_2).unwrap();
    std::fs::write(dir.join("b.yml"), "domain: other\n").unwrap();
    std::fs::write(dir.join(".hidden.yaml"), "not: [yaml").unwrap();
    std::fs::write(dir.join("notes.txt"), "not: [yaml").unwrap();
    let (c, first) = RlsConfig::load(&dir).unwrap();
    let mut domains: Vec<&str> = c.domains.keys().map(String::as_str).collect();
    domains.sort();
    assert_eq!(domains, ["messaging", "other"]);
    assert_eq!(RlsConfig::fingerprint_of(&dir).unwrap(), first);
    std::fs::write(dir.join("b.yml"), "domain: changed\n").unwrap();
    assert_ne!(RlsConfig::fingerprint_of(&dir).unwrap(), first);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Example 9 of envoyproxy/ratelimit's README (since its wildcard matching took `*` anywhere):
/// a middle wildcard needs the prefix and the suffix, several match their segments in order,
/// and each `*` matches the empty run too.
#[test]
fn example_9_wildcards_in_the_middle_and_several() {
    let c = config(
        "domain: example9
descriptors:
  - key: path
    value: /api/*/action
    rate_limit: { unit: minute, requests_per_unit: 20 }
  - key: route
    value: /api/*/resource/*/action
    rate_limit: { unit: minute, requests_per_unit: 30 }
  - key: route
    value: \"*\"
    rate_limit: { unit: minute, requests_per_unit: 1 }
",
    );
    let at = |key: &str, value: &str| limit(&c, "example9", &[(key, value)]);
    assert_eq!(at("path", "/api/123/action"), per(20, Unit::Minute));
    assert_eq!(at("path", "/api/user-id/action"), per(20, Unit::Minute));
    assert_eq!(at("path", "/api//action"), per(20, Unit::Minute));
    assert_eq!(at("path", "/api/123/other"), Applies::Nothing);
    assert_eq!(
        at("path", "/api/action"),
        Applies::Nothing,
        "prefix and suffix overlap"
    );
    assert_eq!(
        at("route", "/api/v1/resource/123/action"),
        per(30, Unit::Minute)
    );
    // Not in order: the file's next wildcard, `*`, takes it (and the empty value).
    assert_eq!(
        at("route", "/api/v1/action/123/resource"),
        per(1, Unit::Minute)
    );
    assert_eq!(at("route", ""), per(1, Unit::Minute));
    // A value that is a wildcard rule's own text is that rule's, whatever comes first (as
    // envoyproxy/ratelimit's exact lookup finds it).
    assert_eq!(
        at("route", "/api/*/resource/*/action"),
        per(30, Unit::Minute)
    );
    let c = config(
        "domain: example9
descriptors:
  - key: route
    value: \"*\"
    rate_limit: { unit: minute, requests_per_unit: 1 }
  - key: route
    value: /api/*
    rate_limit: { unit: minute, requests_per_unit: 2 }
",
    );
    assert_eq!(
        limit(&c, "example9", &[("route", "/api/*")]),
        per(2, Unit::Minute)
    );
    assert_eq!(
        limit(&c, "example9", &[("route", "/api/x")]),
        per(1, Unit::Minute)
    );
}

mod wildcards {
    use proptest::prelude::*;

    use crate::rls::config::Wildcard;

    proptest! {
        /// The literal parts in order, with anything between them, always match; a trailing
        /// `*` alone is the prefix match it was before wildcards could sit anywhere.
        #[test]
        fn parts_in_order_with_anything_between_match(
            parts in prop::collection::vec("[a-c/]{0,3}", 2..5),
            fill in prop::collection::vec("[a-d/*]{0,4}", 5),
            value in "[a-c/]{0,6}",
            prefix in "[a-c/]{0,3}",
        ) {
            let pattern = parts.join("*");
            let wildcard = Wildcard::new(&pattern).expect("a * in it");
            let mut built = parts[0].clone();
            for (part, between) in parts[1..].iter().zip(&fill) {
                built.push_str(between);
                built.push_str(part);
            }
            prop_assert!(wildcard.matches(&built), "{pattern:?} ~ {built:?}");
            let trailing = Wildcard::new(&format!("{prefix}*")).expect("a * in it");
            prop_assert_eq!(trailing.matches(&value), value.starts_with(prefix.as_str()));
        }

        /// Against a reference: a regular expression of the same pattern, anchored.
        #[test]
        fn matches_as_an_anchored_regular_expression_would(
            pattern in "[ab*]{1,6}",
            value in "[ab]{0,8}",
        ) {
            prop_assume!(pattern.contains('*'));
            let wildcard = Wildcard::new(&pattern).expect("a * in it");
            prop_assert_eq!(wildcard.matches(&value), reference(&pattern, &value));
        }
    }

    /// `*` as any run, by recursion: slow and plainly right.
    fn reference(pattern: &str, value: &str) -> bool {
        match pattern.split_once('*') {
            None => pattern == value,
            Some((head, tail)) => value.strip_prefix(head).is_some_and(|rest| {
                (0..=rest.len())
                    .filter(|&i| rest.is_char_boundary(i))
                    .any(|i| reference(tail, &rest[i..]))
            }),
        }
    }
}

#[test]
fn values_are_read_as_written() {
    let c = config(
        "domain: d
descriptors:
  - key: version
    value: 2.10
    rate_limit: { unit: second, requests_per_unit: 1 }
  - key: mask
    value: 0x1F
    rate_limit: { unit: second, requests_per_unit: 2 }
  - key: flag
    value: yes
    rate_limit: { unit: second, requests_per_unit: 3 }
  - key: n
    value: 007
    rate_limit: { unit: second, requests_per_unit: 4 }
",
    );
    assert_eq!(limit(&c, "d", &[("version", "2.10")]), per(1, Unit::Second));
    assert_eq!(limit(&c, "d", &[("version", "2.1")]), Applies::Nothing);
    assert_eq!(limit(&c, "d", &[("mask", "0x1F")]), per(2, Unit::Second));
    assert_eq!(limit(&c, "d", &[("flag", "yes")]), per(3, Unit::Second));
    assert_eq!(limit(&c, "d", &[("n", "007")]), per(4, Unit::Second));
    // A map where text is expected is still an error, at its line.
    let e = error("domain: d\ndescriptors:\n  - key: a\n    value: {x: 1}\n");
    assert!(
        e.contains("descriptors[0].value") && e.contains("line 4"),
        "{e}"
    );
}

#[test]
fn keys_envoyproxy_ratelimit_ignores_where_they_are_load_with_a_warning() {
    let c = config(
        "domain: d
shadow_mode: true
descriptors:
  - key: a
    unit: second
    rate_limit:
      unit: second
      requests_per_unit: 1
      shadow_mode: true
      replaces:
        - name: nope
          unit: minute
",
    );
    // The misplaced shadow_mode does nothing: the limit is enforced.
    assert_eq!(limit(&c, "d", &[("a", "x")]), per(1, Unit::Second));
    let notes = c.notes.join("\n");
    for expected in [
        "config: shadow_mode (line 2): WARNING: ignored, as envoyproxy/ratelimit ignores it: \
         `shadow_mode` does nothing here (it belongs on a descriptor)",
        "config: descriptors[0].unit (line 5): WARNING: ignored",
        "config: descriptors[0].rate_limit.shadow_mode (line 9): WARNING: ignored",
        "config: descriptors[0].rate_limit.replaces[0].unit (line 12): WARNING: ignored",
        "config: descriptors[0].rate_limit.replaces[0].name (line 11): WARNING: no \
         rate_limit of the domain is named \"nope\", so it replaces nothing",
    ] {
        assert!(notes.contains(expected), "{expected}\nnot in:\n{notes}");
    }
    assert_eq!(c.notes.len(), 5, "{notes}");
    // A key envoyproxy/ratelimit does not know is an error, as there: where it is read, and
    // inside a key it ignores (whose keys it checks all the same).
    let e = error("domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      burst: 3\n");
    assert!(
        e.contains("unknown field `burst`") && e.contains("line 5"),
        "{e}"
    );
    let e = error("domain: d\nrate_limit:\n  unit: second\n  burst: 3\ndescriptors: []\n");
    assert_eq!(e, "config: rate_limit.burst (line 4): unknown key `burst`");
    let e = error("domain: d\ndescriptors:\n  - key: a\n    replaces: [x]\n");
    assert_eq!(
        e,
        "config: descriptors[0].replaces[0] (line 4): a list here must hold maps"
    );
    // Under `metadata` any key goes.
    config("domain: d\nmetadata: {anything: {at: all}}\n");
}
