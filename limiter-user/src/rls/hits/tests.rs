//! Keys, the near-limit split, the cap on detailed series, and reloads.

use super::*;

const CONFIG: &str = "domain: web
descriptors:
  - key: path
    rate_limit: { unit: second, requests_per_unit: 10 }
  - key: user
    detailed_metric: true
    rate_limit: { unit: minute, requests_per_unit: 5 }
  - key: tier
    value: gold
    descriptors:
      - key: client
        value: app*
        shadow_mode: true
        rate_limit: { unit: second, requests_per_unit: 1 }
";

fn installed(text: &str, cap: usize) -> (RlsHits, RlsConfig) {
    let hits = RlsHits::new(cap);
    let mut config = RlsConfig::parse(text).expect("config");
    hits.install(&mut config);
    (hits, config)
}

fn within(hits: u32) -> Outcome {
    Outcome {
        hits,
        limit: Some(10),
        used_before: 0,
        over: false,
        shadow: false,
    }
}

/// The series of the rule `entries` match.
fn series<'c>(config: &'c RlsConfig, entries: &[(&str, &str)]) -> &'c Series {
    let rule = crate::rls::matching::rule_for(config, "web", entries).expect("a rule");
    &rule.series.as_ref().expect("installed").0
}

fn keys(hits: &RlsHits) -> Vec<(String, String, Counts)> {
    hits.snapshot()
        .series
        .into_iter()
        .map(|s| (s.domain, s.descriptor, s.counts))
        .collect()
}

fn counts(within_limit: u64, over_limit: u64, near_limit: u64, shadow_mode: u64) -> Counts {
    Counts {
        within_limit,
        over_limit,
        near_limit,
        shadow_mode,
    }
}

#[test]
fn descriptor_keys_are_spelled_as_envoyproxy_ratelimit_does() {
    assert_eq!(descriptor_key(&[("path", "/a")]), "path_/a");
    assert_eq!(
        descriptor_key(&[("tier", "gold"), ("client", "app1")]),
        "tier_gold.client_app1"
    );
    assert_eq!(descriptor_key(&[("generic_key", "")]), "generic_key");
}

#[test]
fn a_rule_is_counted_under_its_config_key_and_detailed_ones_under_the_request_values() {
    let (hits, config) = installed(CONFIG, 100);
    // Every limited rule has a series from the start, at zero; a detailed rule has none until
    // a request names one.
    assert_eq!(
        keys(&hits),
        vec![
            ("web".into(), "path".into(), Counts::default()),
            (
                "web".into(),
                "tier_gold.client_app*".into(),
                Counts::default()
            ),
        ]
    );
    series(&config, &[("path", "/a")]).record(&[("path", "/a")], &within(1));
    series(&config, &[("path", "/b")]).record(&[("path", "/b")], &within(2));
    series(&config, &[("user", "ann")]).record(&[("user", "ann")], &within(1));
    series(&config, &[("user", "bob")]).record(&[("user", "bob")], &within(3));
    series(&config, &[("user", "ann")]).record(&[("user", "ann")], &within(1));
    let entries = [("tier", "gold"), ("client", "app7")];
    series(&config, &entries).record(
        &entries,
        &Outcome {
            hits: 2,
            limit: Some(1),
            used_before: 1,
            over: true,
            shadow: true,
        },
    );
    assert_eq!(
        keys(&hits),
        vec![
            ("web".into(), "path".into(), counts(3, 0, 0, 0)),
            (
                "web".into(),
                "tier_gold.client_app*".into(),
                counts(0, 2, 0, 2)
            ),
            ("web".into(), "user_ann".into(), counts(2, 0, 0, 0)),
            ("web".into(), "user_bob".into(), counts(3, 0, 0, 0)),
        ]
    );
    let snapshot = hits.snapshot();
    assert_eq!(
        (snapshot.detailed_series, snapshot.unrecorded),
        (2, 0),
        "{snapshot:?}"
    );
}

#[test]
fn near_limit_counts_the_admitted_hits_above_80_percent() {
    assert_eq!(near_threshold(10), 8);
    assert_eq!(near_threshold(3), 2);
    assert_eq!(near_threshold(1), 0);
    let at = |used_before, hits| {
        Outcome {
            used_before,
            ..within(hits)
        }
        .counts()
    };
    // Up to 8 of 10 used: not near.
    assert_eq!(at(0, 8), counts(8, 0, 0, 0));
    assert_eq!(at(7, 1), counts(1, 0, 0, 0));
    // The 9th and 10th hits are near; a call straddling the threshold, only its part above.
    assert_eq!(at(8, 1), counts(1, 0, 1, 0));
    assert_eq!(at(7, 3), counts(3, 0, 2, 0));
    assert_eq!(at(0, 10), counts(10, 0, 2, 0));
    // Refused hits are over, never near; shadow mode counts them again as shadow_mode.
    let over = Outcome {
        over: true,
        ..at_outcome(10, 1)
    };
    assert_eq!(over.counts(), counts(0, 1, 0, 0));
    let shadow = Outcome {
        shadow: true,
        ..over
    };
    assert_eq!(shadow.counts(), counts(0, 1, 0, 1));
    // No limit (an allow-listed address): never near.
    let free = Outcome {
        limit: None,
        used_before: 1_000,
        ..within(5)
    };
    assert_eq!(free.counts(), counts(5, 0, 0, 0));
}

fn at_outcome(used_before: u32, hits: u32) -> Outcome {
    Outcome {
        used_before,
        ..within(hits)
    }
}

#[test]
fn detailed_series_are_capped_and_what_does_not_fit_is_counted() {
    let (hits, config) = installed(CONFIG, 3);
    let user = series(&config, &[("user", "x")]);
    for i in 0..1_000 {
        let name = format!("u{i}");
        user.record(&[("user", &name)], &within(2));
    }
    // Known keys still count once the cap is reached.
    user.record(&[("user", "u0")], &within(1));
    let long = "x".repeat(MAX_DETAILED_KEY_BYTES);
    user.record(&[("user", &long)], &within(7));
    let snapshot = hits.snapshot();
    assert_eq!(snapshot.detailed_series, 3);
    assert_eq!(snapshot.max_detailed_series, 3);
    assert_eq!(snapshot.unrecorded, 997 * 2 + 7);
    let detailed: Vec<(String, u64)> = snapshot
        .series
        .iter()
        .filter(|s| s.descriptor.starts_with("user_"))
        .map(|s| (s.descriptor.clone(), s.counts.total_hits()))
        .collect();
    assert_eq!(detailed.len(), 3, "{detailed:?}");
    assert_eq!(
        detailed.iter().map(|(_, n)| n).sum::<u64>(),
        3 * 2 + 1,
        "{detailed:?}"
    );
}

#[test]
fn reloads_keep_the_series_of_rules_that_stay_and_drop_the_others() {
    let (hits, config) = installed(CONFIG, 2);
    series(&config, &[("path", "/a")]).record(&[("path", "/a")], &within(4));
    series(&config, &[("user", "ann")]).record(&[("user", "ann")], &within(1));
    series(&config, &[("user", "bob")]).record(&[("user", "bob")], &within(1));
    assert_eq!(hits.snapshot().detailed_series, 2);

    // `path` stays (with a new limit), `user` and `tier` go, `ip` comes.
    let mut next = RlsConfig::parse(
        "domain: web
descriptors:
  - key: path
    rate_limit: { unit: second, requests_per_unit: 20 }
  - key: ip
    detailed_metric: true
    rate_limit: { unit: second, requests_per_unit: 1 }
",
    )
    .expect("config");
    hits.install(&mut next);
    drop(config);
    assert_eq!(
        keys(&hits),
        vec![("web".into(), "path".into(), counts(4, 0, 0, 0))]
    );
    // The room the dropped detailed series held is free again.
    let snapshot = hits.snapshot();
    assert_eq!(snapshot.detailed_series, 0);
    let ip = series(&next, &[("ip", "1")]);
    ip.record(&[("ip", "1")], &within(1));
    ip.record(&[("ip", "2")], &within(1));
    ip.record(&[("ip", "3")], &within(1));
    let snapshot = hits.snapshot();
    assert_eq!((snapshot.detailed_series, snapshot.unrecorded), (2, 1));

    // A domain that goes takes its series with it.
    let mut other = RlsConfig::parse(
        "domain: api
descriptors:
  - key: k
    rate_limit: { unit: second, requests_per_unit: 1 }
",
    )
    .expect("config");
    hits.install(&mut other);
    drop(next);
    assert_eq!(
        keys(&hits),
        vec![("api".into(), "k".into(), Counts::default())]
    );
    assert_eq!(hits.snapshot().detailed_series, 0);
}

#[test]
fn counting_from_many_threads_loses_nothing() {
    let (hits, config) = installed(CONFIG, 100);
    let path = series(&config, &[("path", "/")]);
    let user = series(&config, &[("user", "x")]);
    std::thread::scope(|s| {
        for t in 0..4 {
            s.spawn(move || {
                for i in 0..10_000 {
                    path.record(&[("path", "/")], &within(1));
                    let name = format!("u{}", (i + t) % 50);
                    user.record(&[("user", &name)], &within(1));
                }
            });
        }
    });
    let snapshot = hits.snapshot();
    let total = |prefix: &str| -> u64 {
        snapshot
            .series
            .iter()
            .filter(|s| s.descriptor.starts_with(prefix))
            .map(|s| s.counts.total_hits())
            .sum()
    };
    assert_eq!(total("path"), 40_000);
    assert_eq!(total("user_"), 40_000);
    assert_eq!(snapshot.detailed_series, 50);
}

/// Two rules whose stat keys are equal (`key: a_b`, and `key: a` with `value: b`) count in one
/// series, as equal stat keys are one stat in envoyproxy/ratelimit: neither rule's hits vanish.
#[test]
fn rules_with_one_stat_key_share_one_series() {
    let (hits, config) = installed(
        "domain: web
descriptors:
  - key: a_b
    rate_limit: { unit: second, requests_per_unit: 10 }
  - key: a
    value: b
    rate_limit: { unit: second, requests_per_unit: 10 }
",
        100,
    );
    series(&config, &[("a_b", "x")]).record(&[("a_b", "x")], &within(1));
    series(&config, &[("a", "b")]).record(&[("a", "b")], &within(2));
    assert_eq!(
        keys(&hits),
        vec![("web".into(), "a_b".into(), counts(3, 0, 0, 0))]
    );
}
