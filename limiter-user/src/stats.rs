//! `limiter stats`: global counters and the busiest clients, read from the pinned maps (works
//! while the agent runs, and after it is gone while the pins remain).

use std::{collections::HashMap, fmt::Write as _, net::IpAddr, num::NonZeroU64};

use limiter_common::{
    ClientState, GlobalStats,
    addr::{ClientKey, as_v4},
    maps::{ACTION_DROP, ACTION_PASS, FLAG_STATIC, MODE_DRY_RUN},
    window::estimate_at,
};
use serde::Serialize;

use crate::{
    datapath::{DatapathError, LINK_PIN, Tables, pin_dir, policy_entries},
    policy::{Cidr, Window},
};

#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub iface: String,
    pub mode: &'static str,
    pub generation: u32,
    /// The program is attached through the pinned link (false after an orderly stop, or before
    /// the agent attached).
    pub attached: bool,
    pub global: Global,
    /// The busiest clients by current rate, then by lifetime packets.
    pub clients: Vec<ClientRow>,
}

#[derive(Debug, Serialize)]
pub struct Global {
    pub passed: u64,
    pub dropped: u64,
    pub non_ip: u64,
    pub malformed: u64,
    pub new_clients: u64,
    pub map_full: u64,
    pub resolves: u64,
    pub contended: u64,
    /// Client entries resident now (dynamic and static).
    pub clients: u64,
}

#[derive(Debug, Serialize)]
pub struct ClientRow {
    pub addr: IpAddr,
    /// The matching policy's `match` (`default` for the default policy).
    pub policy: String,
    /// Named by an exact-address policy: never evicted.
    #[serde(rename = "static")]
    pub is_static: bool,
    pub action: &'static str,
    /// Effective allowance per window.
    pub limit: u32,
    /// Effective window.
    pub window_ms: f64,
    /// Sliding-window estimate of packets in the last window.
    pub estimate: u64,
    pub rate_per_s: f64,
    /// Packets the client may still send now (`limit - estimate`).
    pub allowance: u64,
    pub passed: u64,
    pub dropped: u64,
}

/// A clock's reading in nanoseconds.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the XDP program's window numbers count.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

pub fn addr_of(key: &ClientKey) -> IpAddr {
    match as_v4(key) {
        Some(v4) => IpAddr::V4(v4.into()),
        None => IpAddr::V6((*key).into()),
    }
}

fn action_name(action: u8) -> &'static str {
    match action {
        ACTION_PASS => "pass",
        ACTION_DROP => "drop",
        _ => "limit",
    }
}

/// One client's row at `now_ns`.
pub fn client_row(key: &ClientKey, state: &ClientState, policy: String, now_ns: u64) -> ClientRow {
    let window_ns = state.window_us as u64 * 1000;
    let estimate = NonZeroU64::new(window_ns).map_or(0, |w| estimate_at(&state.slots, now_ns, w));
    let window_s = window_ns as f64 / 1e9;
    ClientRow {
        addr: addr_of(key),
        policy,
        is_static: state.flags & FLAG_STATIC != 0,
        action: action_name(state.action),
        limit: state.limit,
        window_ms: state.window_us as f64 / 1000.0,
        estimate,
        rate_per_s: if window_s > 0.0 {
            estimate as f64 / window_s
        } else {
            0.0
        },
        allowance: (state.limit as u64).saturating_sub(estimate),
        passed: state.total_passed(),
        dropped: state.dropped,
    }
}

/// Reads the maps. `top == 0` lists every client.
pub fn snapshot(tables: &Tables, iface: &str, top: usize) -> Result<Snapshot, DatapathError> {
    let config = tables.map_config()?;
    let g: GlobalStats = tables.global()?;
    let names: HashMap<u16, String> = policy_entries(tables)
        .into_iter()
        .map(|((prefix, key), p)| {
            let name = if p.id == 0 {
                "default".to_string()
            } else {
                Cidr::from_lpm(prefix, &key).to_string()
            };
            (p.id, name)
        })
        .collect();
    let now = monotonic_ns();
    let entries = tables.clients()?;
    let resident = entries.len() as u64;
    let mut rows: Vec<ClientRow> = entries
        .iter()
        .map(|(k, s)| {
            let name = names
                .get(&s.policy)
                .cloned()
                .unwrap_or_else(|| format!("#{}", s.policy));
            client_row(k, s, name, now)
        })
        .collect();
    rows.sort_by(|a, b| {
        b.rate_per_s
            .total_cmp(&a.rate_per_s)
            .then((b.passed + b.dropped).cmp(&(a.passed + a.dropped)))
            .then(a.addr.cmp(&b.addr))
    });
    if top > 0 {
        rows.truncate(top);
    }
    Ok(Snapshot {
        iface: iface.to_string(),
        mode: if config.mode == MODE_DRY_RUN {
            "dry-run"
        } else {
            "enforce"
        },
        generation: config.generation,
        attached: pin_dir(iface).join(LINK_PIN).exists(),
        global: Global {
            passed: g.passed,
            dropped: g.dropped,
            non_ip: g.non_ip,
            malformed: g.malformed,
            new_clients: g.new_clients,
            map_full: g.map_full,
            resolves: g.resolves,
            contended: g.contended,
            clients: resident,
        },
        clients: rows,
    })
}

impl Snapshot {
    /// The plain-text report.
    pub fn render(&self) -> String {
        let g = &self.global;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "limiter on {}: {}, mode {}, policy generation {}",
            self.iface,
            if self.attached {
                "attached"
            } else {
                "not attached"
            },
            self.mode,
            self.generation
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
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<39} {:<28} {:>6} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
            "CLIENT",
            "POLICY",
            "ACTION",
            "WINDOW",
            "LIMIT",
            "ALLOWANCE",
            "RATE/S",
            "PASSED",
            "DROPPED"
        );
        for c in &self.clients {
            let policy = if c.is_static {
                format!("{} (static)", c.policy)
            } else {
                c.policy.clone()
            };
            let (window, limit, allowance) = match c.action {
                "limit" => (
                    Window {
                        micros: (c.window_ms * 1000.0) as u32,
                    }
                    .to_string(),
                    c.limit.to_string(),
                    c.allowance.to_string(),
                ),
                _ => ("-".into(), "-".into(), "-".into()),
            };
            let _ = writeln!(
                out,
                "{:<39} {:<28} {:>6} {:>10} {:>10} {:>10} {:>10.1} {:>12} {:>12}",
                c.addr.to_string(),
                policy,
                c.action,
                window,
                limit,
                allowance,
                c.rate_per_s,
                c.passed,
                c.dropped
            );
        }
        out
    }
}
