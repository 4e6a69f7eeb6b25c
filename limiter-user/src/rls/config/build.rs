//! Building a domain from one file's YAML: each descriptor, its rate limit and its nested
//! descriptors, with errors that name the file, the field's path and its line.

use std::{collections::HashSet, sync::Arc};

use super::{
    Descriptors, Domain, RateLimit, RlsConfigError, Rule, Unit, Wildcard,
    raw::{RawDescriptor, RawFile, RawRateLimit, check_keys},
    window,
};
use crate::config::{KeyLines, LineHint};

/// The warning for a key where envoyproxy/ratelimit does not read it (see the module docs),
/// or the error for a key inside it that it refuses.
fn misplaced_note(
    cx: &Context<'_>,
    at: &str,
    (key, value): (&str, &serde_yaml::Value),
) -> Result<String, RlsConfigError> {
    let (file, lines) = (cx.file, cx.lines);
    let field = if at.is_empty() {
        key.to_string()
    } else {
        format!("{at}.{key}")
    };
    if key != "metadata" {
        check_keys(value, &field).map_err(|(field, message)| (cx.invalid)(&field, message))?;
    }
    let line = LineHint(line_of(lines, &field));
    Ok(format!(
        "{file}: {field}{line}: WARNING: ignored, as envoyproxy/ratelimit ignores it: `{key}` \
         does nothing here{}",
        match key {
            "domain" => " (it belongs at the top of the file)",
            "key" | "value" | "rate_limit" | "descriptors" | "shadow_mode" | "quota_mode"
            | "detailed_metric" | "value_to_metric" | "share_threshold" | "metadata" =>
                " (it belongs on a descriptor)",
            "unit" | "requests_per_unit" | "unlimited" | "name" | "replaces" =>
                " (it belongs in a rate_limit)",
            _ => "",
        }
    ))
}

/// Builds one file's domain, checking what envoyproxy/ratelimit checks at load.
pub(super) fn parse_domain(
    file: &str,
    text: &str,
) -> Result<(Domain, Vec<String>), RlsConfigError> {
    let raw: RawFile = serde_yaml::from_str(text).map_err(|source| RlsConfigError::Yaml {
        file: file.to_string(),
        source,
    })?;
    let lines = KeyLines::of(text);
    let invalid = |field: &str, message: String| RlsConfigError::Invalid {
        file: file.to_string(),
        field: field.to_string(),
        line: LineHint(line_of(&lines, field)),
        message,
    };
    let name = match raw.domain.clone() {
        Some(d) if !d.is_empty() => d,
        _ => {
            return Err(invalid(
                "domain",
                "a config file must name its domain".into(),
            ));
        }
    };
    let cx = Context {
        file,
        lines: &lines,
        invalid: &invalid,
    };
    let mut notes: Vec<String> = raw
        .misplaced()
        .into_iter()
        .map(|misplaced| misplaced_note(&cx, "", misplaced))
        .collect::<Result<_, _>>()?;
    let descriptors = build_list(
        &raw.descriptors,
        &Level {
            field: "descriptors",
            parent: &name,
            metric_values: false,
        },
        &cx,
        &mut notes,
    )?;
    let domain = Domain {
        name,
        descriptors,
        file: file.to_string(),
        overrides: None,
    };
    // A `replaces` that names no limit of the domain replaces nothing: envoyproxy/ratelimit
    // loads it, and so does this, with a warning (a typo would otherwise go unseen).
    let rules = domain.descriptors.rules();
    let names: HashSet<&str> = rules
        .iter()
        .filter_map(|r| r.rate_limit.as_ref()?.name.as_deref())
        .collect();
    for limit in rules.iter().filter_map(|r| r.rate_limit.as_ref()) {
        for (replaced, field) in limit.replaces.iter().zip(&limit.replaces_fields) {
            if !names.contains(replaced.as_str()) {
                notes.push(format!(
                    "{file}: {field}{}: WARNING: no rate_limit of the domain is named \
                     {replaced:?}, so it replaces nothing",
                    LineHint(line_of(&lines, field))
                ));
            }
        }
    }
    Ok((domain, notes))
}

/// The line of `field`, else of the nearest enclosing key that is written.
fn line_of(lines: &KeyLines, field: &str) -> Option<usize> {
    let mut path = field;
    loop {
        if let Some(line) = lines.line(path) {
            return Some(line);
        }
        // Drop the last `.key` or `[i]`.
        let cut = path.rfind(['.', '['])?;
        path = &path[..cut];
        if path.is_empty() {
            return None;
        }
    }
}

/// What a file's lists are built with.
struct Context<'a> {
    file: &'a str,
    lines: &'a KeyLines,
    invalid: &'a dyn Fn(&str, String) -> RlsConfigError,
}

/// Where a list sits in the file.
struct Level<'a> {
    /// Its field path (`descriptors[0].descriptors`).
    field: &'a str,
    /// The path of the rule it is nested in (the domain at the top).
    parent: &'a str,
    /// `value_to_metric` is set on a rule it is nested in.
    metric_values: bool,
}

fn build_list(
    raw: &[RawDescriptor],
    level: &Level<'_>,
    cx: &Context<'_>,
    notes: &mut Vec<String>,
) -> Result<Descriptors, RlsConfigError> {
    let (lines, invalid) = (cx.lines, cx.invalid);
    let (field, parent) = (level.field, level.parent);
    let mut list = Descriptors::default();
    for (i, d) in raw.iter().enumerate() {
        let at = format!("{field}[{i}]");
        for misplaced in d.misplaced() {
            notes.push(misplaced_note(cx, &at, misplaced)?);
        }
        let key = match &d.key {
            Some(k) if !k.is_empty() => k.clone(),
            _ => {
                // At the entry's own line: that of the first of its keys that is written.
                let line = ["key", "value", "rate_limit", "descriptors", "shadow_mode"]
                    .iter()
                    .find_map(|k| lines.line(&format!("{at}.{k}")));
                let mut e = invalid(&format!("{at}.key"), "a descriptor needs a key".into());
                if let (RlsConfigError::Invalid { line: at_line, .. }, Some(line)) = (&mut e, line)
                {
                    *at_line = LineHint(Some(line));
                }
                return Err(e);
            }
        };
        let value = d.value.clone().filter(|v| !v.is_empty());
        let path = match &value {
            Some(v) => format!("{parent}.{key}_{v}"),
            None => format!("{parent}.{key}"),
        };
        let rate_limit = match &d.rate_limit {
            None => None,
            Some(r) => Some(build_limit(
                r,
                &format!("{at}.rate_limit"),
                &path,
                cx,
                notes,
            )?),
        };
        let wildcard = value.as_deref().and_then(Wildcard::new);
        if d.share_threshold && wildcard.is_none() {
            return Err(invalid(
                &format!("{at}.share_threshold"),
                format!(
                    "share_threshold can only be used with a wildcard value (one with a `*`), \
                     and {path:?} has none"
                ),
            ));
        }
        let metadata = match &d.metadata {
            Some(m) if !m.is_empty() => Some(Arc::new(
                crate::rls::metadata::from_yaml(m).map_err(|e| {
                    invalid(
                        &format!("{at}.metadata"),
                        format!("not a metadata map: {e}"),
                    )
                })?,
            )),
            _ => None,
        };
        let metric_values = level.metric_values || d.value_to_metric;
        let children = build_list(
            &d.descriptors,
            &Level {
                field: &format!("{at}.descriptors"),
                parent: &path,
                metric_values,
            },
            cx,
            notes,
        )?;
        let rule = Rule {
            path: path.clone(),
            rate_limit,
            shadow_mode: d.shadow_mode,
            quota_mode: d.quota_mode,
            detailed_metric: d.detailed_metric,
            value_to_metric: d.value_to_metric,
            metric_values,
            share_threshold: d.share_threshold,
            metadata,
            children,
            line: line_of(lines, &format!("{at}.key")),
            series: None,
        };
        let rules = list.by_key.entry(key).or_default();
        let duplicate = match value {
            None => rules.any.replace(rule).is_some(),
            Some(v) => match wildcard {
                Some(wildcard) => {
                    let dup = rules.wildcards.iter().any(|(w, _)| *w == wildcard);
                    rules.wildcards.push((wildcard, rule));
                    dup
                }
                None => rules.values.insert(v, rule).is_some(),
            },
        };
        if duplicate {
            return Err(invalid(
                &format!("{at}.key"),
                format!("duplicate descriptor composite key {path:?}"),
            ));
        }
    }
    Ok(list)
}

fn build_limit(
    r: &RawRateLimit,
    at: &str,
    path: &str,
    cx: &Context<'_>,
    notes: &mut Vec<String>,
) -> Result<RateLimit, RlsConfigError> {
    let invalid = cx.invalid;
    for misplaced in r.misplaced() {
        notes.push(misplaced_note(cx, at, misplaced)?);
    }
    let unit = match r.unit.as_deref() {
        None | Some("") => None,
        Some(u) => Some(Unit::parse(u).ok_or_else(|| {
            invalid(
                &format!("{at}.unit"),
                format!(
                    "invalid rate limit unit {u:?}: one of second, minute, hour, day, week, month, year"
                ),
            )
        })?),
    };
    let limit = if r.unlimited {
        if unit.is_some() || r.requests_per_unit.is_some() {
            return Err(invalid(
                &format!("{at}.unlimited"),
                "an unlimited rate_limit takes no unit or requests_per_unit".into(),
            ));
        }
        None
    } else {
        let Some(unit) = unit else {
            return Err(invalid(
                &format!("{at}.unit"),
                "a rate_limit needs a unit (second, minute, hour, day, week, month, year) or unlimited: true".into(),
            ));
        };
        let rpu = r.requests_per_unit.unwrap_or(0);
        if unit.seconds() > 3600 && rpu > 0 {
            let (share, _) = window(rpu, unit);
            // Rounded up to one an hour, a small allowance over a long unit is loosened: 1 per
            // day becomes 24 a day.
            let per_unit = u64::from(share) * unit.seconds() / 3600;
            let loosened = if per_unit > u64::from(rpu) {
                format!(
                    "; WARNING: that admits up to {per_unit} per {}, {:.1}x the limit (an hourly \
                     share cannot be smaller than 1)",
                    unit.name(),
                    per_unit as f64 / f64::from(rpu)
                )
            } else {
                String::new()
            };
            notes.push(format!(
                "{path}: {rpu} per {} is enforced as {share} per sliding hour (windows are at most an hour){loosened}",
                unit.name()
            ));
        }
        Some((rpu, unit))
    };
    let name = r.name.clone().filter(|n| !n.is_empty());
    let (mut replaces, mut replaces_fields) = (Vec::new(), Vec::new());
    for (j, rep) in r.replaces.iter().enumerate() {
        for misplaced in rep.misplaced() {
            notes.push(misplaced_note(
                cx,
                &format!("{at}.replaces[{j}]"),
                misplaced,
            )?);
        }
        match &rep.name {
            Some(n) if name.as_ref() == Some(n) => {
                return Err(invalid(
                    &format!("{at}.replaces[{j}].name"),
                    format!("a rate_limit cannot replace itself ({n:?} is its own name)"),
                ));
            }
            Some(n) if !n.is_empty() => {
                replaces.push(n.clone());
                replaces_fields.push(format!("{at}.replaces[{j}].name"));
            }
            _ => {
                return Err(invalid(
                    &format!("{at}.replaces[{j}].name"),
                    "a replaces entry needs the name of the rate_limit it replaces".into(),
                ));
            }
        }
    }
    Ok(RateLimit {
        name,
        replaces,
        replaces_fields,
        limit,
    })
}
