use limiter_common::{
    addr::{policy_key_v4, policy_key_v6, v4_mapped},
    maps::ACTION_PASS,
};

use super::{locate::KeyLines, *};

const EXAMPLE: &str = "\
mode: enforce            # or dry-run
default: { limit: 1000, window: 1s }
policies:
  - match: 10.0.0.0/8
    limit: 100
    window: 500ms
  - match: 2001:db8::/32
    limit: 50
    window: 1s
  - match: 192.0.2.7
    action: pass
  - match: 198.51.100.0/24
    action: drop
";

fn err(text: &str) -> String {
    Config::parse(text).unwrap_err().to_string()
}

#[test]
fn parses_the_readme_example() {
    let c = Config::parse(EXAMPLE).unwrap();
    assert_eq!(c.mode, Mode::Enforce);
    assert_eq!(c.default.limit, 1000);
    assert_eq!(c.default.window.micros, 1_000_000);
    assert_eq!(c.policies.len(), 4);
    assert_eq!(c.policies[0].1.window.micros, 500_000);
    assert_eq!(c.policies[2].1.action, Action::Pass);
    assert_eq!(c.static_clients(), vec![v4_mapped([192, 0, 2, 7])]);
    let lpm = c.lpm_entries();
    assert_eq!(lpm.len(), 6);
    assert_eq!(lpm[&policy_key_v4([10, 0, 0, 0], 8)].limit, 100);
    assert_eq!(lpm[&policy_key_v4([192, 0, 2, 7], 32)].action, ACTION_PASS);
    assert_eq!(lpm[&policy_key_v4([0; 4], 0)].id, 0);
    assert_eq!(lpm[&policy_key_v6(&[0; 16], 0)].id, 0);
}

#[test]
fn windows_parse_and_bound() {
    assert_eq!("10ms".parse::<Window>().unwrap().micros, 10_000);
    assert_eq!("1.5s".parse::<Window>().unwrap().micros, 1_500_000);
    assert_eq!("1h".parse::<Window>().unwrap().micros, 3_600_000_000);
    assert_eq!("2m".parse::<Window>().unwrap().to_string(), "2m");
    assert!(
        "9ms"
            .parse::<Window>()
            .unwrap_err()
            .contains("between 10ms and 1h")
    );
    assert!(
        "2h".parse::<Window>()
            .unwrap_err()
            .contains("between 10ms and 1h")
    );
    assert!("5x".parse::<Window>().unwrap_err().contains("unit"));
    assert!("s".parse::<Window>().unwrap_err().contains("not a number"));
}

#[test]
fn cidrs_parse_strictly() {
    assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().lpm_key().0, 16);
    assert_eq!("2001:db8::/32".parse::<Cidr>().unwrap().lpm_key().0, 40);
    for text in ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7", "::/0"] {
        let c: Cidr = text.parse().unwrap();
        let (len, key) = c.lpm_key();
        assert_eq!(Cidr::from_lpm(len, &key), c);
    }
    assert!("192.0.2.7".parse::<Cidr>().unwrap().is_host());
    assert!(
        "10.0.0.1/8"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("did you mean 10.0.0.0/8")
    );
    assert!(
        "10.0.0.0/33"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("0 to 32")
    );
    assert!(
        "10.0.0.300"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("not an IPv4 or IPv6")
    );
    assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().lpm_key().0, 8);
}

#[test]
fn errors_name_the_field_and_line() {
    let e = err(
        "default: { limit: 10, window: 1s }\npolicies:\n  - match: 10.0.0.0/8\n    limit: 5\n    window: 5x\n",
    );
    assert!(
        e.contains("policies[0].window (line 5): invalid window \"5x\""),
        "{e}"
    );
    let e = err(
        "default: { limit: 10, window: 1s }\npolicies:\n  - match: 10.0.0.0/33\n    limit: 5\n    window: 1s\n",
    );
    assert!(
        e.contains("policies[0].match (line 3): \"10.0.0.0/33\""),
        "{e}"
    );
    let e = err(
        "default: { limit: 10, window: 1s }\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 2h }\n",
    );
    assert!(
        e.contains("policies[0].window (line 3): window \"2h\" is out of range"),
        "{e}"
    );
    let e = err("default: { limit: 10, window: 0s }\n");
    assert!(e.contains("default.window (line 1)"), "{e}");
    let e = err("default: { limit: -1, window: 1s }\n");
    assert!(e.contains("default.limit") && e.contains("line 1"), "{e}");
    let e = err("default: { limit: 4294967296, window: 1s }\n");
    assert!(e.contains("default.limit"), "{e}");
    let e =
        err("default: { limit: 10, window: 1s }\npolicies:\n  - match: 10.0.0.0/8\n    limt: 5\n");
    assert!(e.contains("limt") && e.contains("line 4"), "{e}");
    let e = err("mode: enforced\ndefault: { limit: 10, window: 1s }\n");
    assert!(e.contains("mode") && e.contains("enforced"), "{e}");
    let e = err("policies: []\n");
    assert!(e.contains("missing field `default`"), "{e}");
}

#[test]
fn cross_field_errors_name_the_policy_and_line() {
    let e =
        err("default: { limit: 10, window: 1s }\npolicies:\n  - match: 10.0.0.0/8\n    limit: 5\n");
    assert!(
        e.contains("policies[0] (match 10.0.0.0/8) (line 3)") && e.contains("`window` is required"),
        "{e}"
    );
    let e = err(
        "default: { limit: 10, window: 1s }\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 1s }\n  - { match: 10.0.0.0/8, limit: 2, window: 1s }\n",
    );
    assert!(
        e.contains("policies[1]") && e.contains("line 4") && e.contains("duplicate"),
        "{e}"
    );
    let e = err(
        "default: { limit: 10, window: 1s }\npolicies:\n  - { match: 192.0.2.7, action: pass, limit: 3 }\n",
    );
    assert!(e.contains("remove `limit` and `window`"), "{e}");
    let e = err("default: { window: 1s }\n");
    assert!(
        e.contains("default (line 1)") && e.contains("`limit` is required"),
        "{e}"
    );
}

#[test]
fn unspecified_addresses_are_host_policies() {
    let c = Config::parse(
            "default: { limit: 10, window: 1s }\npolicies:\n  - { match: 0.0.0.0, action: pass }\n  - { match: \"::\", action: pass }\n",
        )
        .unwrap();
    assert_eq!(c.static_clients(), vec![v4_mapped([0; 4]), [0; 16]]);
}

#[test]
fn limit_zero_and_drop_block() {
    let c = Config::parse("default: { limit: 0, window: 1s }\npolicies:\n  - { match: 192.0.2.9, action: drop, limit: 0 }\n").unwrap();
    assert_eq!(c.default.limit, 0);
    assert_eq!(c.policies[0].1.action, Action::Drop);
    let c = Config::parse("mode: dry-run\ndefault: { limit: 4294967295, window: 1h }\n").unwrap();
    assert_eq!(c.mode, Mode::DryRun);
    assert_eq!(c.default.limit, u32::MAX);
}

#[test]
fn matches_are_prefixes_or_ids_never_mistyped_addresses() {
    assert!(matches!(
        "10.0.0.0/8".parse::<Match>(),
        Ok(Match::Prefix(_))
    ));
    assert!(matches!(
        "2001:db8::1".parse::<Match>(),
        Ok(Match::Prefix(_))
    ));
    assert!(matches!("tenant-acme".parse::<Match>(), Ok(Match::Id(_))));
    assert!(matches!(
        "api key #7: \"x\"".parse::<Match>(),
        Ok(Match::Id(_))
    ));
    // Digits alone (a customer number) are an ID; anything address-shaped must parse.
    assert!(matches!("12345".parse::<Match>(), Ok(Match::Id(_))));
    for typo in [
        "10.0.0.0/33",
        "10.0.0.1/8",
        "2001:db8::12345/64",
        "1.2.3",
        "::/129",
    ] {
        let e = typo.parse::<Match>();
        assert!(e.is_err(), "{typo} must be rejected, got {e:?}");
    }
    assert!("".parse::<Match>().unwrap_err().contains("empty"));
    assert!("default".parse::<Match>().unwrap_err().contains("default"));
    assert!("a\nb".parse::<Match>().unwrap_err().contains("control"));
    assert!(
        "x".repeat(257)
            .parse::<Match>()
            .unwrap_err()
            .contains("256")
    );
    assert!("x".repeat(256).parse::<Match>().is_ok());
}

const ADAPTIVE: &str = "\
default: { limit: 1000, window: 1s }
adaptive:
  enabled: true
  min_scale: 0.5           # s >= min_scale
  max_scale: 8
  min_load_factor: 0.25
  step: 1.5
  alpha: 1
  dwell: 4
  idle_periods: 60
  grow_below: 0.4
  grow_after: 3
  shrink_above: 0.9
  load:
    high: 0.9
    low: 0.5
  period: 250ms
policies:
  - match: 10.0.0.0/8
    limit: 100
    window: 500ms
";

/// `ADAPTIVE` with the line of `key` (its first occurrence) replaced by `line`.
fn adaptive_with(key: &str, line: &str) -> String {
    let mut done = false;
    ADAPTIVE
        .lines()
        .map(|l| {
            if !done && l.trim_start().starts_with(&format!("{key}:")) {
                done = true;
                format!("{line}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect()
}

#[test]
fn adaptive_section_parses_every_knob() {
    let c = Config::parse(ADAPTIVE).unwrap();
    let want = AdaptiveConfig {
        enabled: true,
        min_scale: 0.5,
        max_scale: 8.0,
        min_load_factor: 0.25,
        step: 1.5,
        alpha: 1.0,
        dwell: 4,
        idle_periods: 60,
        grow_below: 0.4,
        grow_after: 3,
        shrink_above: 0.9,
        load: LoadBands {
            high: 0.9,
            low: 0.5,
        },
        period: Window { micros: 250_000 },
    };
    assert_eq!(c.adaptive, want);
    assert_eq!(c.policies.len(), 1);
    // Flow style, and partial sections keep the other defaults.
    let c = Config::parse(
        "default: { limit: 1, window: 1s }\nadaptive: { enabled: true, load: { high: 0.95 } }\n",
    )
    .unwrap();
    assert!(c.adaptive.enabled);
    assert_eq!(c.adaptive.load.high, 0.95);
    assert_eq!(c.adaptive.load.low, 0.60);
    assert_eq!(c.adaptive.step, AdaptiveConfig::default().step);
}

#[test]
fn adaptive_section_defaults_when_absent_or_off() {
    let c = Config::parse(EXAMPLE).unwrap();
    assert_eq!(c.adaptive, AdaptiveConfig::default());
    assert!(!c.adaptive.enabled);
    for text in [
        "default: { limit: 1, window: 1s }\nadaptive: { enabled: false }\n",
        "default: { limit: 1, window: 1s }\nadaptive: {}\n",
        "default: { limit: 1, window: 1s }\nadaptive:\n  # enabled: true\n",
    ] {
        let c = Config::parse(text).unwrap();
        assert_eq!(c.adaptive, AdaptiveConfig::default(), "{text}");
    }
}

#[test]
fn adaptive_errors_name_the_knob_and_line() {
    let cases = [
        (
            "min_scale",
            "  min_scale: 0",
            "adaptive.min_scale (line 4): must be in (0, 1], got 0",
        ),
        (
            "min_scale",
            "  min_scale: 1.5",
            "adaptive.min_scale (line 4): must be in (0, 1]",
        ),
        (
            "max_scale",
            "  max_scale: 0.5",
            "adaptive.max_scale (line 5): must be >= 1",
        ),
        (
            "step",
            "  step: 1",
            "adaptive.step (line 7): must be > 1 and finite, got 1",
        ),
        ("step", "  step: .inf", "adaptive.step (line 7)"),
        ("alpha", "  alpha: 0", "adaptive.alpha (line 8)"),
        (
            "dwell",
            "  dwell: 0",
            "adaptive.dwell (line 9): must be >= 1, got 0",
        ),
        (
            "shrink_above",
            "  shrink_above: 0.3",
            "adaptive.shrink_above (line 13): must be > grow_below (0.4)",
        ),
        (
            "high",
            "    high: 0.5",
            "adaptive.load.low (line 16): must be >= 0 and < load.high (0.5), got 0.5",
        ),
        (
            "high",
            "    high: 1.2",
            "adaptive.load.high (line 15): must be in (0, 1], got 1.2",
        ),
    ];
    for (key, line, want) in cases {
        let text = adaptive_with(key, line);
        let e = err(&text);
        assert!(e.contains(want), "{line:?}: {e}\n{text}");
    }
    // Flow style: the knob's line.
    let e = err(
        "default: { limit: 1, window: 1s }\n\nadaptive: { enabled: true,\n  load: { high: 0.4, low: 0.4 } }\n",
    );
    assert!(e.contains("adaptive.load.low (line 4)"), "{e}");
    // A knob left at its default that breaks a constraint: the nearest written key.
    let e = err("default: { limit: 1, window: 1s }\nadaptive:\n  load: { low: 0.9 }\n");
    assert!(e.contains("adaptive.load.low (line 3)"), "{e}");
    let e = err("default: { limit: 1, window: 1s }\nadaptive:\n  grow_below: 0.9\n");
    assert!(
        e.contains("adaptive.shrink_above (line 2): must be > grow_below (0.9)"),
        "{e}"
    );
    // Checked even when off.
    let e = err("default: { limit: 1, window: 1s }\nadaptive: { enabled: false, step: 0.5 }\n");
    assert!(e.contains("adaptive.step (line 2)"), "{e}");
    // `period`: out of range (checked by `validate`), and unparsable (by its deserializer).
    let range = "must be between 100ms and 60s";
    for (period, want) in [
        ("50ms", format!("adaptive.period (line 17): {range}")),
        ("2m", format!("adaptive.period (line 17): {range}")),
        ("99999999999s", "adaptive.period (line 17): period".into()),
        (
            "5x",
            "adaptive.period (line 17): invalid period \"5x\"".into(),
        ),
        (
            "1.5",
            "adaptive.period (line 17): invalid period \"1.5\"".into(),
        ),
        (
            "0.0000001s",
            "adaptive.period (line 17): invalid period".into(),
        ),
    ] {
        let e = err(&adaptive_with("period", &format!("  period: {period}")));
        assert!(
            e.contains(&want) && !e.contains(" at line "),
            "{period}: {e}"
        );
    }
    let e =
        err("default: { limit: 1, window: 1s }\nadaptive:\n  enabled: true\n\n  period: 7 # s\n");
    assert!(
        e.contains("adaptive.period (line 5): invalid period \"7\": expected a number with a unit"),
        "{e}"
    );
    let e = err("default: { limit: 1, window: 1s }\nadaptive: { enabled: true, period: 1x }\n");
    assert!(
        e.contains("adaptive.period (line 2): invalid period"),
        "{e}"
    );
    let e = err("default: { limit: 1, window: 1s }\nadaptive: { enabled: true, period: [1] }\n");
    assert!(e.contains("adaptive.period") && e.contains("line 2"), "{e}");
}

#[test]
fn adaptive_unknown_keys_and_bad_types_name_the_key_and_line() {
    let cases = [
        (
            "min_scale",
            "  min_scal: 0.5",
            &["unknown field `min_scal`", "line 4"][..],
        ),
        (
            "min_scale",
            "  min_scale: half",
            &[
                "adaptive.min_scale",
                "invalid type: string \"half\"",
                "line 4",
            ],
        ),
        ("dwell", "  dwell: -1", &["adaptive.dwell", "line 9"]),
        ("dwell", "  dwell: 2.5", &["adaptive.dwell", "line 9"]),
        ("enabled", "  enabled: on", &["adaptive.enabled", "line 3"]),
        (
            "high",
            "    hi: 0.9",
            &["adaptive.load", "unknown field `hi`", "line 15"],
        ),
        (
            "high",
            "    high: \"0.9\"",
            &["adaptive.load.high", "line 15"],
        ),
    ];
    for (key, line, wants) in cases {
        let text = adaptive_with(key, line);
        let e = err(&text);
        for want in wants {
            assert!(e.contains(want), "{line:?}: {want:?} not in {e}");
        }
    }
    let e = err("default: { limit: 1, window: 1s }\nadaptive: 3\n");
    assert!(e.contains("adaptive") && e.contains("line 2"), "{e}");
}

#[test]
fn weights_parse_and_look_up_by_policy_id() {
    let c = Config::parse(
            "default: { limit: 10, window: 1s, weight: 0.5 }\npolicies:\n  - match: 10.0.0.0/8\n    limit: 5\n    window: 1s\n    weight: 3\n  - { match: tenant-gold, limit: 9, window: 1s }\n  - { match: 192.0.2.7, action: pass, weight: 2.5 }\n",
        )
        .unwrap();
    assert_eq!(c.weights, vec![0.5, 3.0, 1.0, 2.5]);
    assert_eq!(c.weight(0), 0.5);
    assert_eq!(c.weight(1), 3.0);
    assert_eq!(c.weight(2), DEFAULT_WEIGHT);
    assert_eq!(c.weight(3), 2.5);
    assert_eq!(c.weight(4), DEFAULT_WEIGHT, "unknown id");
    assert_eq!(c.weight(u16::MAX), DEFAULT_WEIGHT);
    let c = Config::parse(EXAMPLE).unwrap();
    assert_eq!(c.weights, vec![1.0; 5]);
    // `weight: ~` is no weight.
    let c = Config::parse("default: { limit: 10, window: 1s, weight: ~ }\n").unwrap();
    assert_eq!(c.weight(0), 1.0);
    // Tiny and huge, as long as positive and finite.
    let c = Config::parse("default: { limit: 10, window: 1s, weight: 1e-9 }\n").unwrap();
    assert_eq!(c.weight(0), 1e-9);
    let c = Config::parse("default: { limit: 10, window: 1s, weight: 1e300 }\n").unwrap();
    assert_eq!(c.weight(0), 1e300);
}

#[test]
fn weight_errors_name_the_policy() {
    for (weight, shown) in [
        ("0", "got 0"),
        ("-1", "got -1"),
        ("-0.5", "got -0.5"),
        (".nan", "got .nan"),
        (".inf", "got .inf"),
        ("-.inf", "got -.inf"),
        ("heavy", "got the string \"heavy\""),
        ("\"2\"", "got the string \"2\""),
        ("true", "got true"),
        ("[1]", "got a list"),
        ("{ x: 1 }", "got a mapping"),
    ] {
        let text = format!(
            "default: {{ limit: 10, window: 1s }}\npolicies:\n  - {{ match: 10.0.0.0/9, limit: 1, window: 1s }}\n  - match: 10.128.0.0/9\n    limit: 5\n    window: 1s\n    weight: {weight}\n"
        );
        let e = err(&text);
        assert!(
                e.contains("policies[1] (match 10.128.0.0/9) (line 4): `weight` must be a positive finite number")
                    && e.contains(shown),
                "{weight}: {e}"
            );
    }
    let e = err("default: { limit: 10, window: 1s, weight: 0 }\n");
    assert_eq!(
        e,
        "default (line 1): `weight` must be a positive finite number (default 1), got 0"
    );
    // On `pass` and `drop` a weight is accepted (and has no effect), but still checked.
    let e = err(
        "default: { limit: 10, window: 1s }\npolicies:\n  - { match: 192.0.2.7, action: drop, weight: -2 }\n",
    );
    assert!(
        e.contains("policies[0] (match 192.0.2.7) (line 3): `weight`"),
        "{e}"
    );
}

#[test]
fn policy_base_is_the_configured_limit() {
    let c = Config::parse(EXAMPLE).unwrap();
    assert_eq!(c.policy_base(0), Some(c.default));
    let first = c.policy_base(1).unwrap();
    assert_eq!(
        (first.action, first.limit, first.window.micros),
        (Action::Limit, 100, 500_000)
    );
    assert_eq!(c.policy_base(3).unwrap().action, Action::Pass);
    assert_eq!(c.policy_base(4).unwrap().action, Action::Drop);
    assert_eq!(c.policy_base(5), None);
}

#[test]
fn key_lines_are_found_in_block_and_flow_style() {
    let text = "default: { limit: 1, window: 1s }\nadaptive:   # knobs\n  # load: here\n  step: 2\n  load:\n\n    low: 0.1\n    high: 0.2\n  'alpha' : 0.5\nmode: enforce\n";
    let lines = KeyLines::of(text);
    assert_eq!(lines.line("default"), Some(1));
    assert_eq!(lines.line("default.window"), Some(1));
    assert_eq!(lines.line("adaptive"), Some(2));
    assert_eq!(lines.line("adaptive.step"), Some(4));
    assert_eq!(lines.line("adaptive.load"), Some(5));
    assert_eq!(lines.line("adaptive.load.high"), Some(8));
    assert_eq!(lines.line("adaptive.alpha"), Some(9));
    assert_eq!(lines.line("adaptive.mode"), None);
    assert_eq!(lines.line("adaptive.dwell"), None);
    let lines = KeyLines::of("adaptive: { min_scale_x: 1, min_scale: 0.5, load: {high: 0.2} }\n");
    assert_eq!(lines.line("adaptive.min_scale"), Some(1));
    assert_eq!(lines.line("adaptive.load.high"), Some(1));
    // Policies by index, whatever the style; a `match:` in a comment or a string is no key.
    let text = "policies:\n  # match: commented out\n  - { match: a, action: pass }\n  - note: \"match: x\"\n    match: b\n    action: drop\n  -\n    match: c\n";
    let lines = KeyLines::of(text);
    assert_eq!(lines.line("policies[0].match"), Some(3));
    assert_eq!(lines.line("policies[1].match"), Some(5));
    assert_eq!(lines.line("policies[2].match"), Some(8));
    assert_eq!(lines.line("policies[3].match"), None);
    // Not YAML: nothing to point at.
    assert_eq!(KeyLines::of("a: [\n").line("a"), None);
}

#[test]
fn id_policies_are_named_policies_not_trie_entries() {
    let c = Config::parse(
            "default: { limit: 5, window: 1s }\npolicies:\n  - match: 10.0.0.0/8\n    limit: 1\n    window: 1s\n  - match: tenant-gold\n    limit: 9\n    window: 2s\n",
        )
        .unwrap();
    assert_eq!(c.lpm_entries().len(), 3);
    let named = c.named_policies();
    let gold = named[&ClientName::new("tenant-gold").unwrap()];
    assert_eq!((gold.limit, gold.window_us, gold.id), (9, 2_000_000, 2));
    assert_eq!(c.policy_name(2), "tenant-gold");
    assert_eq!(c.policy_name(0), "default");
    // Keys are a hash prefix: stable, and distinct for distinct IDs.
    let a = ClientName::new("a").unwrap();
    assert_eq!(a.key(), ClientName::new("a").unwrap().key());
    assert_ne!(a.key(), ClientName::new("b").unwrap().key());
    let e = err(
        "default: { limit: 5, window: 1s }\npolicies:\n  - match: t\n    limit: 1\n    window: 1s\n  - match: t\n    limit: 2\n    window: 1s\n",
    );
    assert!(e.contains("duplicate match"), "{e}");
}

#[test]
fn ipv4_mapped_policies_are_rejected_naming_the_ipv4_form() {
    for (text, v4_form) in [
        ("::ffff:192.0.2.7", "write 192.0.2.7"),
        ("::ffff:192.0.2.0/120", "write 192.0.2.0/24"),
        ("::ffff:0:0/96", "write 0.0.0.0/0"),
    ] {
        let e = text.parse::<Cidr>().unwrap_err();
        assert!(
            e.contains("IPv4-mapped") && e.contains(v4_form),
            "{text}: {e}"
        );
        // The API's `match` parses the same way.
        assert!(text.parse::<Match>().is_err(), "{text}");
    }
    // Wider prefixes that merely contain the mapped space, and the IPv4 forms, stay valid.
    for ok in [
        "::/0",
        "::/64",
        "192.0.2.7",
        "192.0.2.0/24",
        "::fffe:c000:207",
    ] {
        assert!(ok.parse::<Cidr>().is_ok(), "{ok}");
    }
    let e = err(
        "default: { limit: 1, window: 1s }\npolicies:\n  - match: \"::ffff:10.1.2.3\"\n    action: pass\n",
    );
    assert!(
        e.contains("policies[0].match (line 3)") && e.contains("write 10.1.2.3"),
        "{e}"
    );
}
