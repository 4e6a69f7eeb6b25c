//! The CLI's rendering: the `limiter stats` report, the client tables and the formatting of
//! durations, actions and policies that the commands print with.

use std::{fmt::Write as _, time::Duration};

use crate::{config::Window, proto, stats::Report};

/// The plain-text `limiter stats` report.
pub fn report(report: &Report) -> String {
    let g = &report.global;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "limiter on {}: {}, mode {}, policy generation {}",
        report.iface,
        if report.attached {
            "attached"
        } else {
            "not attached"
        },
        report.mode,
        report.generation
    );
    let _ = writeln!(
        out,
        "packets: passed {}  dropped {}  non-ip {}  malformed {}",
        g.passed, g.dropped, g.non_ip, g.malformed
    );
    let _ = writeln!(
        out,
        "clients: resident {}  created {}  map-full {}  policy lookups {}  contended {}",
        g.clients, g.new_clients, g.map_full, g.resolves, g.contended
    );
    let _ = writeln!(
        out,
        "limited: held {}  moved in {}  refused (map full) {}",
        g.limited, g.limited_moves, g.limited_full
    );
    let a = &report.adaptive;
    if a.enabled {
        let _ = writeln!(
            out,
            "adaptive: cpu {:.0}%  load factor {:.3}  tracking {} clients  period {}ms  periods {}",
            a.cpu * 100.0,
            a.load_factor,
            a.tracked,
            a.period_ms,
            a.periods
        );
    } else {
        let _ = writeln!(out, "adaptive: off");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<39} {:<28} {:>6} {:>10} {:>10} {:>6} {:>6} {:>10} {:>10} {:>12} {:>12}",
        "CLIENT",
        "POLICY",
        "ACTION",
        "WINDOW",
        "ALLOWANCE",
        "SCALE",
        "UTIL",
        "REMAINING",
        "RATE/S",
        "PASSED",
        "DROPPED"
    );
    for c in &report.clients {
        let policy = marked_policy(&c.policy, c.is_static, c.limited);
        let (window, allowance, scale, util, remaining) = match c.action {
            "limit" => (
                Window {
                    micros: (c.window_ms * 1000.0).round() as u32,
                }
                .to_string(),
                c.allowance.to_string(),
                format!("{:.2}", c.scale),
                format!("{:.2}", c.utilisation),
                c.remaining.to_string(),
            ),
            _ => Default::default(),
        };
        let dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
        let _ = writeln!(
            out,
            "{:<39} {:<28} {:>6} {:>10} {:>10} {:>6} {:>6} {:>10} {:>10.1} {:>12} {:>12}",
            c.addr.to_string(),
            policy,
            c.action,
            dash(window),
            dash(allowance),
            dash(scale),
            dash(util),
            dash(remaining),
            c.rate_per_s,
            c.passed,
            c.dropped
        );
    }
    out
}

pub fn show_duration(d: Option<&prost_types::Duration>) -> String {
    d.map_or("-".into(), |d| {
        short_duration(Duration::new(
            d.seconds.max(0) as u64,
            d.nanos.max(0) as u32,
        ))
    })
}

/// `d` to three significant digits in its largest unit of s, ms, µs and ns (`2.95s`, `948µs`,
/// `23.9ms`, `1s`), so that columns of them line up.
pub fn short_duration(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    let (value, unit) = [(1e9, "s"), (1e6, "ms"), (1e3, "µs")]
        .into_iter()
        .find(|(scale, _)| ns >= *scale)
        .map_or((ns, "ns"), |(scale, unit)| (ns / scale, unit));
    let decimals = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    let text = format!("{value:.decimals$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        &text
    };
    format!("{text}{unit}")
}

pub fn action_name(action: i32) -> &'static str {
    match proto::Action::try_from(action) {
        Ok(proto::Action::Pass) => "pass",
        Ok(proto::Action::Drop) => "drop",
        _ => "limit",
    }
}

pub fn show_policy(p: &proto::Policy) -> String {
    let what = match proto::Action::try_from(p.action) {
        Ok(proto::Action::Pass) => format!("{}: pass", p.r#match),
        Ok(proto::Action::Drop) => format!("{}: drop", p.r#match),
        _ => format!(
            "{}: limit {} per {}",
            p.r#match,
            p.limit.unwrap_or(0),
            show_duration(p.window.as_ref())
        ),
    };
    // Local is the rule (and an older agent says neither).
    if p.scope == proto::Scope::Global as i32 {
        format!("{what}, scope global")
    } else {
        what
    }
}

/// `limits ls`: each policy with the layer it comes from (`file`, `overlay`, ...).
pub fn policy_table(list: &proto::ListLimitsResponse) -> String {
    let mut out = format!("{:<24}  POLICY\n", "LAYER");
    for (i, p) in list.policies.iter().enumerate() {
        let layer = list.layers.get(i).map_or("?", String::as_str);
        out.push_str(&format!("{layer:<24}  {}\n", show_policy(p)));
    }
    out
}

/// The busiest clients as a table.
/// The global clients among `clients` (empty if none): their limit across the cluster, this
/// node's share in force, the owner splitting it and the demand reported.
pub fn global_client_table(clients: &[proto::ClientStats]) -> String {
    let rows: Vec<(&proto::ClientStats, &proto::ClientCluster)> = clients
        .iter()
        .filter_map(|c| Some((c, c.cluster.as_ref()?)))
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\n{:<40} {:>10} {:>10} {:>10} {:<20} {:>10} {:>14}\n",
        "GLOBAL CLIENT", "LIMIT", "SHARE", "GRANT", "OWNER", "DEMAND", "CLUSTER DEMAND"
    );
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for (c, g) in rows {
        let _ = writeln!(
            out,
            "{:<40} {:>10} {:>10} {:>10} {:<20} {:>10} {:>14}",
            c.client_id,
            g.global_limit,
            g.share,
            opt(g.grant.map(u64::from)),
            if g.owner.is_empty() { "-" } else { &g.owner },
            opt(g.demand.map(u64::from)),
            opt(g.cluster_demand),
        );
    }
    out
}

/// A client's policy as the tables show it: `(static)` after it for a client named by an
/// exact-address policy, `(held)` for one held in `LIMITED`.
fn marked_policy(policy: &str, is_static: bool, limited: bool) -> String {
    if is_static {
        format!("{policy} (static)")
    } else if limited {
        format!("{policy} (held)")
    } else {
        policy.to_string()
    }
}

pub fn client_table(clients: &[proto::ClientStats]) -> String {
    let mut out = format!(
        "{:<40} {:<28} {:>6} {:>10} {:>9} {:>6} {:>6} {:>10} {:>10} {:>12} {:>12}\n",
        "CLIENT",
        "POLICY",
        "ACTION",
        "ALLOWANCE",
        "WINDOW",
        "SCALE",
        "UTIL",
        "RATE/S",
        "REMAINING",
        "PASSED",
        "DROPPED"
    );
    for c in clients {
        let policy = marked_policy(&c.policy, c.is_static, c.limited);
        let window = c
            .window
            .as_ref()
            .map_or(0.0, |d| d.seconds as f64 + d.nanos as f64 / 1e9);
        let rate = if window > 0.0 {
            c.estimate as f64 / window
        } else {
            0.0
        };
        let _ = writeln!(
            out,
            "{:<40} {:<28} {:>6} {:>10} {:>9} {:>6.2} {:>6.2} {:>10.1} {:>10} {:>12} {:>12}",
            c.client_id,
            policy,
            action_name(c.action),
            c.limit,
            show_duration(c.window.as_ref()),
            c.scale,
            c.utilisation,
            rate,
            (c.limit as u64).saturating_sub(c.estimate),
            c.passed,
            c.dropped
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_shown_to_three_digits() {
        let cases = [
            (Duration::from_nanos(2_950_465_854), "2.95s"),
            (Duration::from_nanos(948_155), "948µs"),
            (Duration::from_nanos(23_927_867), "23.9ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_secs(3600), "3600s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_nanos(999), "999ns"),
            (Duration::ZERO, "0ns"),
        ];
        for (d, shown) in cases {
            assert_eq!(short_duration(d), shown, "{d:?}");
        }
    }
}
