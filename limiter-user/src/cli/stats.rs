//! The API's counters and busiest clients: `limiter stats` through a running agent's API, and
//! `limiter top`, its live view.

use std::{io::IsTerminal as _, time::Duration};

use crate::{
    cli::{
        client::{self, Target, status_error},
        render::{action_name, client_table, global_client_table},
    },
    proto,
};

/// The agent's global counters, then its `n` busiest clients.
async fn global_and_top(
    c: &mut client::Clients,
    n: u32,
) -> anyhow::Result<(proto::GlobalStats, Vec<proto::ClientStats>)> {
    let g = c
        .stats
        .global(proto::GlobalStatsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let clients = c
        .stats
        .top(proto::TopRequest { n })
        .await
        .map_err(status_error)?
        .into_inner()
        .clients;
    Ok((g, clients))
}

/// Prints the global counters and the `top` busiest clients of the agent at `target`
/// (`json`: machine-readable).
pub async fn remote_stats(top: usize, json: bool, target: Target) -> anyhow::Result<()> {
    let mut c = client::connect(&target).await?;
    let (g, clients) = global_and_top(&mut c, u32::try_from(top).unwrap_or(u32::MAX)).await?;
    if json {
        let rows: Vec<serde_json::Value> = clients
            .iter()
            .map(|c| {
                let window_s = c
                    .window
                    .as_ref()
                    .map_or(0.0, |d| d.seconds as f64 + d.nanos as f64 / 1e9);
                // `addr`, `static` and `rate_per_s` as `limiter stats --iface` names them.
                serde_json::json!({
                    "client": c.client_id, "addr": c.client_id, "static": c.is_static,
                    "limited": c.limited,
                    "rate_per_s": if window_s > 0.0 { c.estimate as f64 / window_s } else { 0.0 },
                    "policy": c.policy, "action": action_name(c.action),
                    "limit": c.limit, "allowance": c.limit, "estimate": c.estimate,
                    "remaining": (c.limit as u64).saturating_sub(c.estimate),
                    "scale": c.scale, "utilisation": c.utilisation,
                    "passed": c.passed, "dropped": c.dropped,
                    "window_ms": c.window.as_ref().map_or(0.0, |d| d.seconds as f64 * 1e3 + d.nanos as f64 / 1e6),
                    "cluster": c.cluster.as_ref().map(|g| serde_json::json!({
                        "global_limit": g.global_limit, "share": g.share, "grant": g.grant,
                        "owner": g.owner, "demand": g.demand, "cluster_demand": g.cluster_demand,
                    })),
                })
            })
            .collect();
        let out = serde_json::json!({
            "global": {
                "passed": g.packets_passed, "dropped": g.packets_dropped, "non_ip": g.packets_non_ip,
                "malformed": g.packets_malformed, "new_clients": g.clients_created, "map_full": g.map_full,
                "limited_moves": g.limited_moves, "limited_full": g.limited_full,
                "limited": g.clients_limited, "clients": g.clients_resident, "ids": g.ids_resident, "checks_allowed": g.checks_allowed,
                "checks_denied": g.checks_denied, "config_reloads": g.config_reloads,
                "config_rejects": g.config_rejects,
            },
            "adaptive": {
                "enabled": g.adaptive, "cpu": g.cpu, "load_factor": g.load_factor,
                "tracked": g.adaptive_tracked,
            },
            "generation": g.policy_generation, "dry_run": g.dry_run, "attached": g.attached,
            "clients": rows,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "mode {}  generation {}  attached {}\npackets passed {}  dropped {}  non-IP {}  malformed {}\nclients {}  IDs {}  created {}  map-full {}\nlimited: held {}  moved in {}  refused (map full) {}\nchecks allowed {}  denied {}  config reloads {}  rejects {}\n{}\n",
            if g.dry_run { "dry-run" } else { "enforce" },
            g.policy_generation,
            g.attached,
            g.packets_passed,
            g.packets_dropped,
            g.packets_non_ip,
            g.packets_malformed,
            g.clients_resident,
            g.ids_resident,
            g.clients_created,
            g.map_full,
            g.clients_limited,
            g.limited_moves,
            g.limited_full,
            g.checks_allowed,
            g.checks_denied,
            g.config_reloads,
            g.config_rejects,
            if g.adaptive {
                format!(
                    "adaptive: cpu {:.0}%  load factor {:.3}  tracking {} clients",
                    g.cpu * 100.0,
                    g.load_factor,
                    g.adaptive_tracked
                )
            } else {
                "adaptive: off".to_string()
            }
        );
        print!("{}", client_table(&clients));
        print!("{}", global_client_table(&clients));
    }
    Ok(())
}

/// Prints the packet and check counters and the `n` busiest clients of the agent at `target`
/// every second, clearing the screen on a terminal, until interrupted or after `iterations`
/// refreshes (0: no end).
pub async fn top(n: u32, iterations: u64, target: Target) -> anyhow::Result<()> {
    let mut c = client::connect(&target).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let tty = std::io::stdout().is_terminal();
    let mut done = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let (g, clients) = global_and_top(&mut c, n).await?;
        if tty {
            // Clear the screen and go home.
            print!("\x1b[2J\x1b[H");
        }
        println!(
            "limiter top  packets passed {}  dropped {}  clients {}  held {}  IDs {}  checks allowed {}  denied {}\n",
            g.packets_passed,
            g.packets_dropped,
            g.clients_resident,
            g.clients_limited,
            g.ids_resident,
            g.checks_allowed,
            g.checks_denied
        );
        print!("{}", client_table(&clients));
        done += 1;
        if iterations != 0 && done >= iterations {
            return Ok(());
        }
    }
}
