use limiter_common::{
    addr::{
        GROUP_BITS_MASK, GROUP_SPLIT, PolicyKey, group_bits, group_of, policy_key_v4,
        policy_key_v6, v4_mapped,
    },
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
    assert_eq!(lpm.len(), 7, "with the link-local entry");
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
    assert_eq!(c.lpm_entries().len(), 4, "with the link-local entry");
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

/// A config of `default` (with `default_per`, YAML, if any) and `policies`, one flow mapping
/// each without `limit`/`window` (added).
fn with_per(default_per: Option<&str>, policies: &[&str]) -> String {
    let mut text = String::from("default:\n  limit: 10\n  window: 1s\n");
    if let Some(per) = default_per {
        text.push_str(&format!("  per: {per}\n"));
    }
    text.push_str("policies:\n");
    for p in policies {
        text.push_str(&format!("  - {{ {p}, limit: 1, window: 1s }}\n"));
    }
    text
}

fn trie_key(cidr: &str) -> (u32, PolicyKey) {
    cidr.parse::<Cidr>().unwrap().lpm_key()
}

/// The `Policy::group` of the trie entry for `cidr` (which must exist).
fn group_at(c: &Config, cidr: &str) -> u8 {
    c.lpm_entries()
        .get(&trie_key(cidr))
        .unwrap_or_else(|| panic!("no trie entry for {cidr}"))
        .group
}

#[test]
fn per_parses_in_each_form() {
    let c = Config::parse(&with_per(
        None,
        &[
            "match: 10.0.0.0/8, per: address",
            "match: 10.1.0.0/16, per: policy",
            "match: 2001:db8::/32, per: /48",
            "match: 2001:db9::/32",
            "match: 10.2.0.0/16, per: /32",
            "match: 2001:dba::/112, per: /128",
        ],
    ))
    .unwrap();
    assert_eq!(
        c.grouping,
        Grouping {
            default_v4: Per::Address,
            default_v6: Per::Prefix(64),
            policies: vec![
                Some(Per::Address),
                Some(Per::Policy),
                Some(Per::Prefix(48)),
                None,
                Some(Per::Prefix(32)),
                Some(Per::Prefix(128)),
            ],
        }
    );
    assert_eq!(
        c.grouping,
        Grouping {
            policies: c.grouping.policies.clone(),
            ..Grouping::default()
        }
    );
    for (written, v4, v6) in [
        ("address", Per::Address, Per::Address),
        ("policy", Per::Policy, Per::Policy),
        ("{ ipv6: address }", Per::Address, Per::Address),
        ("{ ipv4: /24 }", Per::Prefix(24), Per::Prefix(64)),
        ("{ ipv4: policy, ipv6: /56 }", Per::Policy, Per::Prefix(56)),
        ("{}", Per::Address, Per::Prefix(64)),
        (
            "\n    ipv4: /16\n    ipv6: /48",
            Per::Prefix(16),
            Per::Prefix(48),
        ),
    ] {
        let c = Config::parse(&with_per(Some(written), &[])).unwrap();
        assert_eq!(
            (c.grouping.default_v4, c.grouping.default_v6),
            (v4, v6),
            "{written}"
        );
    }
    for per in [Per::Address, Per::Policy, Per::Prefix(64)] {
        assert_eq!(per.to_string().parse::<Per>(), Ok(per));
    }
}

#[test]
fn per_errors_name_the_field_and_line() {
    let policy = |per: &str, m: &str| {
        format!(
            "default: {{ limit: 1, window: 1s }}\npolicies:\n  - match: {m}\n    limit: 1\n    window: 1s\n    per: {per}\n"
        )
    };
    for (per, m, expect) in [
        (
            "/x",
            "10.0.0.0/8",
            "policies[0].per (line 6): \"/x\" is not a grouping: write `address`, `policy` or a prefix length like /64",
        ),
        (
            "5",
            "10.0.0.0/8",
            "policies[0].per (line 6): 5 is not a grouping: a prefix length is written with its slash, like /5",
        ),
        (
            "[a]",
            "10.0.0.0/8",
            "policies[0].per (line 6): expected `address`, `policy` or a prefix length like /64, got a list",
        ),
        (
            "/129",
            "2001:db8::/32",
            "policies[0].per (line 6): \"/129\" is not a grouping",
        ),
        (
            "/33",
            "10.0.0.0/8",
            "policies[0].per (match 10.0.0.0/8) (line 6): /33 is longer than an IPv4 address (at most /32)",
        ),
        (
            "/110",
            "2001:db8::/48",
            "policies[0].per (match 2001:db8::/48) (line 6): an IPv6 group is at most /104",
        ),
        (
            "policy",
            "2001:db8::/112",
            "policies[0].per (match 2001:db8::/112) (line 6): this /112 policy is longer than the /104 an IPv6 group can be",
        ),
        (
            "/64",
            "2001:db8::/112",
            "policies[0].per (match 2001:db8::/112) (line 6): this /112 policy is longer than the /104",
        ),
        (
            "policy",
            "tenant-gold",
            "policies[0].per (match tenant-gold) (line 6): `per` groups addresses; a policy for a client ID has one client",
        ),
    ] {
        let e = err(&policy(per, m));
        assert!(e.contains(expect), "per: {per} on {m}: {e}");
    }
    // Longest group, and groups as long as an address (per address), are accepted.
    for (per, m) in [
        ("/104", "2001:db8::/48"),
        ("policy", "2001:db8::/104"),
        ("/128", "2001:db8::/112"),
        ("policy", "2001:db8::1"),
        ("/32", "10.0.0.0/8"),
        ("policy", "10.0.0.1"),
    ] {
        assert!(Config::parse(&policy(per, m)).is_ok(), "per: {per} on {m}");
    }
    let default = |per: &str| format!("default:\n  limit: 1\n  window: 1s\n  per: {per}\n");
    for (per, expect) in [
        (
            "/64",
            "default.per (line 4): `default` covers both families, so a prefix length needs one per family: write `per: { ipv4: /64, ipv6: /64 }`",
        ),
        ("/x", "default.per (line 4): \"/x\" is not a grouping"),
        (
            "{ ipv4: address, ipv7: /64 }",
            "default.per (line 4): unknown key `ipv7`: the per-family form has `ipv4` and `ipv6`",
        ),
        (
            "{ ipv6: 64 }",
            "default.per (line 4): ipv6: 64 is not a grouping: a prefix length is written with its slash, like /64",
        ),
        (
            "\n    ipv4: address\n    ipv6: /x",
            "default.per (line 4): ipv6: \"/x\" is not a grouping",
        ),
        (
            "\n    ipv4: /33",
            "default.per.ipv4 (line 5): /33 is longer than an IPv4 address",
        ),
        (
            "\n    ipv4: /8\n    ipv6: /120",
            "default.per.ipv6 (line 6): an IPv6 group is at most /104",
        ),
    ] {
        let e = err(&default(per));
        assert!(e.contains(expect), "default per: {per}: {e}");
    }
}

#[test]
fn policies_group_as_written_never_across_policies() {
    let c = Config::parse(&with_per(
        None,
        &[
            "match: 10.0.0.0/24, per: policy",
            "match: 10.1.0.0/24, per: /16",
            "match: 10.2.0.0/16, per: /24",
            "match: 10.3.0.0/16",
            "match: 2001:db8::/48",
            "match: 2001:db9::/48, per: /56",
            "match: 2001:dba::/104",
            "match: 2001:dbb::/112",
            "match: 2001:dbc::/112, per: address",
            "match: 2001:dbd::/32, per: policy",
            "match: 192.0.2.1, per: policy",
        ],
    ))
    .unwrap();
    // The defaults: IPv4 per address, IPv6 per /64.
    assert_eq!(group_at(&c, "0.0.0.0/0"), 0);
    assert_eq!(group_at(&c, "::/0"), group_of(Some(64)));
    assert_eq!(group_at(&c, "10.0.0.0/24"), group_of(Some(24)));
    // A /16 group on a /24 policy: the /24 (a group never spans two policies).
    assert_eq!(group_at(&c, "10.1.0.0/24"), group_of(Some(24)));
    assert_eq!(group_at(&c, "10.2.0.0/16"), group_of(Some(24)));
    assert_eq!(group_at(&c, "10.3.0.0/16"), 0);
    assert_eq!(group_at(&c, "2001:db8::/48"), group_of(Some(64)));
    assert_eq!(group_at(&c, "2001:db9::/48"), group_of(Some(56)));
    assert_eq!(group_at(&c, "2001:dba::/104"), group_of(Some(104)));
    // Longer than an IPv6 group can be, without `per`: per address.
    assert_eq!(group_at(&c, "2001:dbb::/112"), 0);
    assert_eq!(group_at(&c, "2001:dbc::/112"), 0);
    assert_eq!(group_at(&c, "2001:dbd::/32"), group_of(Some(32)));
    assert_eq!(group_at(&c, "192.0.2.1"), 0);
    // The policies longer than /64 each split a /64 of the default's: marked (see
    // `groups_a_longer_policy_splits_are_marked_in_the_trie`); nothing else is added.
    let lpm = c.lpm_entries();
    assert_eq!(lpm.len(), 2 + 11 + 3 + 1, "with the link-local entry");
    for split in ["2001:dba::/64", "2001:dbb::/64", "2001:dbc::/64"] {
        assert_eq!(
            lpm[&trie_key(split)].group,
            group_of(Some(64)) | GROUP_SPLIT
        );
    }
    assert_eq!(group_bits(group_at(&c, "2001:db9::/48")), Some(56));
}

#[test]
fn groups_a_longer_policy_splits_are_marked_in_the_trie() {
    // A host inside the default's /64: the rest of that /64 is the default's, marked split.
    let c = Config::parse(&with_per(None, &["match: \"2001:db8::1\""])).unwrap();
    let lpm = c.lpm_entries();
    assert_eq!(lpm.len(), 5, "with the link-local entry");
    assert_eq!(lpm[&trie_key("2001:db8::1")].group, 0);
    let marker = lpm[&trie_key("2001:db8::/64")];
    let mut expected = c.default_policy();
    expected.group = group_of(Some(64)) | GROUP_SPLIT;
    assert_eq!(marker, expected);
    // The default unmarked elsewhere.
    assert_eq!(lpm[&policy_key_v6(&[0; 16], 0)].group, group_of(Some(64)));

    // Inside a /48 policy grouped per /64 (as the default): the /48's copy is the marker.
    let c = Config::parse(&with_per(
        None,
        &["match: 2001:db8::/48", "match: \"2001:db8:0:5::9\""],
    ))
    .unwrap();
    let marker = c.lpm_entries()[&trie_key("2001:db8:0:5::/64")];
    assert_eq!(
        (marker.id, marker.group),
        (1, group_of(Some(64)) | GROUP_SPLIT)
    );
    assert_eq!(group_at(&c, "2001:db8::/48"), group_of(Some(64)));

    // No marker where the covering policy groups otherwise: the fast key (a /64 group key)
    // is never written there.
    for (default_per, covering) in [
        (Some("{ ipv6: address }"), None),
        (None, Some("match: 2001:db8::/48, per: policy")),
        (None, Some("match: 2001:db8::/48, per: /56")),
        (None, Some("match: 2001:db8::/48, per: address")),
    ] {
        let mut policies = vec!["match: \"2001:db8::1\""];
        policies.extend(covering);
        let c = Config::parse(&with_per(default_per, &policies)).unwrap();
        let lpm = c.lpm_entries();
        assert!(
            !lpm.contains_key(&trie_key("2001:db8::/64")),
            "{default_per:?} {covering:?}"
        );
        // Plus the link-local entry where the default groups IPv6.
        assert_eq!(
            lpm.len(),
            2 + policies.len() + usize::from(default_per.is_none()),
            "{default_per:?} {covering:?}"
        );
    }

    // A policy exactly at /64 with a host inside it: that policy's own entry is marked.
    let c = Config::parse(&with_per(
        None,
        &[
            "match: \"2001:db8:0:1::/64\"",
            "match: \"2001:db8:0:1::5\"",
            "match: \"2001:db8:0:2::/64\"",
        ],
    ))
    .unwrap();
    let lpm = c.lpm_entries();
    assert_eq!(lpm.len(), 6, "with the link-local entry");
    let own = lpm[&trie_key("2001:db8:0:1::/64")];
    assert_eq!((own.id, own.group), (1, group_of(Some(64)) | GROUP_SPLIT));
    assert_eq!(
        lpm[&trie_key("2001:db8:0:2::/64")].group,
        group_of(Some(64))
    );

    // Two hosts in one /64, and an IPv4 default grouped per /24: one marker per group.
    let c = Config::parse(&with_per(
        Some("{ ipv4: /24 }"),
        &[
            "match: 10.0.0.7",
            "match: 10.0.0.9",
            "match: \"2001:db8::1\"",
            "match: \"2001:db8::2\"",
        ],
    ))
    .unwrap();
    let lpm = c.lpm_entries();
    assert_eq!(lpm.len(), 2 + 4 + 2 + 1, "with the link-local entry");
    assert_eq!(
        lpm[&trie_key("10.0.0.0/24")].group,
        group_of(Some(24)) | GROUP_SPLIT
    );
    assert_eq!(lpm[&trie_key("10.0.0.0/24")].id, 0);
    assert_eq!(
        lpm[&trie_key("2001:db8::/64")].group,
        group_of(Some(64)) | GROUP_SPLIT
    );
}

#[test]
fn the_fast_group_is_each_familys_bare_entry() {
    for (default_per, policies, fast) in [
        (None, vec![], [0, group_of(Some(64))]),
        (
            Some("{ ipv4: /24, ipv6: /56 }"),
            vec![],
            [group_of(Some(24)), group_of(Some(56))],
        ),
        (Some("{ ipv6: address }"), vec![], [0, 0]),
        (
            Some("policy"),
            vec![],
            [group_of(Some(0)), group_of(Some(0))],
        ),
        // A `/0` policy takes its family's place, grouped as written or as the default.
        (
            None,
            vec![
                "match: \"::/0\", per: address",
                "match: 0.0.0.0/0, per: /16",
            ],
            [group_of(Some(16)), 0],
        ),
        (
            Some("{ ipv6: /48 }"),
            vec!["match: \"::/0\""],
            [0, group_of(Some(48))],
        ),
        // Longer policies do not change it.
        (
            None,
            vec![
                "match: 10.0.0.0/8, per: policy",
                "match: \"2001:db8::/32\", per: /48",
            ],
            [0, group_of(Some(64))],
        ),
    ] {
        let c = Config::parse(&with_per(default_per, &policies)).unwrap();
        assert_eq!(c.fast_groups(), fast, "{default_per:?} {policies:?}");
        let lpm = c.lpm_entries();
        // Without the split mark: with `per: policy` (a /0 group) every longer entry splits
        // the family's root, the link-local one included.
        assert_eq!(
            [
                lpm[&policy_key_v4([0; 4], 0)].group & GROUP_BITS_MASK,
                lpm[&policy_key_v6(&[0; 16], 0)].group & GROUP_BITS_MASK
            ],
            fast,
            "{default_per:?} {policies:?}"
        );
    }
}

#[test]
fn multicast_policies_are_rejected() {
    for text in ["ff02::1", "ff00::/8", "ff05::/16"] {
        let e = text.parse::<Cidr>().unwrap_err();
        assert!(e.contains("multicast"), "{text}: {e}");
    }
    // Prefixes that merely contain ff00::/8 match other sources too.
    for ok in ["::/0", "f000::/4", "fe80::/10"] {
        assert!(ok.parse::<Cidr>().is_ok(), "{ok}");
    }
}

#[test]
fn link_local_sources_count_per_address_unless_a_policy_says_otherwise() {
    use limiter_common::addr::{group_of, policy_key_v6};
    let link_local = policy_key_v6(
        &"fe80::".parse::<std::net::Ipv6Addr>().unwrap().octets(),
        10,
    );
    let c = Config::parse("default: { limit: 5, window: 1s }\n").unwrap();
    let lpm = c.lpm_entries();
    let entry = lpm[&link_local];
    assert_eq!((entry.group, entry.id, entry.limit), (0, 0, 5));
    // The default's own grouping stays /64 elsewhere.
    assert_eq!(lpm[&policy_key_v6(&[0; 16], 0)].group, group_of(Some(64)));
    // Per address already, or one budget for all of IPv6 (`per: policy`): nothing added.
    for per in ["address", "policy", "{ ipv6: /8 }"] {
        let c = Config::parse(&format!(
            "default: {{ limit: 5, window: 1s, per: {per} }}\n"
        ))
        .unwrap();
        assert!(!c.lpm_entries().contains_key(&link_local), "{per}");
    }
    // A policy at fe80::/10 is the operator's.
    let c = Config::parse(
        "default: { limit: 5, window: 1s }\npolicies:\n  - { match: fe80::/10, limit: 9, window: 1s, per: /64 }\n",
    )
    .unwrap();
    let entry = c.lpm_entries()[&link_local];
    assert_eq!((entry.group, entry.limit), (group_of(Some(64)), 9));
    // A shorter policy covering it is copied, per address.
    let c = Config::parse(
        "default: { limit: 5, window: 1s }\npolicies:\n  - { match: fe00::/7, limit: 7, window: 1s }\n",
    )
    .unwrap();
    let entry = c.lpm_entries()[&link_local];
    assert_eq!((entry.group, entry.limit, entry.id), (0, 7, 1));
}

const CLUSTER: &str = "\
default: { limit: 1000, window: 1s }
policies:
  - match: 10.230.0.0/24
    limit: 40
    window: 1s
    scope: global
  - match: 10.231.0.0/24
    limit: 40
    window: 1s
cluster:
  node_id: n1
  listen: 127.0.0.1:7201
  peers: [\"127.0.0.1:7202\", \"127.0.0.1:7203\"]
  token_file: /etc/limiter/cluster.token
";

#[test]
fn global_policies_and_the_cluster_section_are_read() {
    let c = Config::parse(CLUSTER).unwrap();
    assert_eq!(c.scope(0), Scope::Local);
    assert_eq!(c.scope(1), Scope::Global);
    assert_eq!(c.scope(2), Scope::Local);
    let cluster = c.cluster.as_ref().expect("cluster section");
    assert_eq!(cluster.configured_members(), 3);
    assert_eq!(
        c.warnings.len(),
        0,
        "40 is not below 10 × 3 members: {:?}",
        c.warnings
    );
    // Without the section, as before the cluster existed.
    assert!(Config::parse(EXAMPLE).unwrap().cluster.is_none());
}

#[test]
fn global_policies_need_a_cluster_and_a_limit_of_at_least_the_member_count() {
    let without = CLUSTER.split("cluster:").next().unwrap();
    let e = err(without);
    assert!(
        e.contains("policies[0].scope (match 10.230.0.0/24) (line 6)") && e.contains("`cluster:`"),
        "{e}"
    );
    let e = err(&CLUSTER.replace(
        "limit: 40\n    window: 1s\n    scope",
        "limit: 2\n    window: 1s\n    scope",
    ));
    assert!(
        e.contains("policies[0].limit (match 10.230.0.0/24) (line 4): limit 2 is below the cluster's 3 members"),
        "{e}"
    );
    let c = Config::parse(&CLUSTER.replace(
        "limit: 40\n    window: 1s\n    scope",
        "limit: 29\n    window: 1s\n    scope",
    ))
    .unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(c.warnings[0].contains("below 10×"), "{}", c.warnings[0]);
    // Accepted (without effect) on pass and drop, as `weight` is.
    let c = Config::parse(&CLUSTER.replace(
        "limit: 40\n    window: 1s\n    scope",
        "action: pass\n    scope",
    ))
    .unwrap();
    assert_eq!(c.scope(1), Scope::Global);
    let e = err(&CLUSTER.replace("scope: global", "scope: everywhere"));
    assert!(e.contains("scope") && e.contains("line 6"), "{e}");
}

#[test]
fn cluster_section_errors_name_the_field_and_line() {
    let e = err(&CLUSTER.replace("listen: 127.0.0.1:7201", "listen: nowhere"));
    assert!(e.starts_with("cluster.listen (line 12)"), "{e}");
    let e = err(&CLUSTER.replace("  token_file: /etc/limiter/cluster.token\n", ""));
    assert!(e.starts_with("cluster.token_file (line 10)"), "{e}");
    let e = err(&CLUSTER.replace("node_id: n1", "node_id: n1\n  gossip: true"));
    assert!(e.contains("gossip"), "{e}");
}

#[test]
fn an_empty_config_says_so() {
    for text in [
        "",
        "\n\n",
        "# all commented out\n#default: { limit: 5, window: 1s }\n",
        "---\n",
    ] {
        let e = Config::parse(text).expect_err("empty").to_string();
        assert!(
            e.contains("the config is empty") && e.contains("default:"),
            "{e}"
        );
    }
}
