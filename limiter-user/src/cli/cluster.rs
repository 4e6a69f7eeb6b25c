//! `limiter cluster status`: the cluster a running agent is a member of, as a table or JSON;
//! `limiter cluster forget`: stop counting a decommissioned member.

use crate::{
    cli::{
        client::{self, Target, status_error},
        render::show_duration,
    },
    proto,
};

/// Prints the cluster status of the agent at `target`: its node, phase and members, each
/// peer, each global policy's share, enrolment, the clients it owns (the busiest 20, with the
/// demand across the cluster and how the limit is split) and sync traffic (`json`:
/// machine-readable).
pub async fn status(json: bool, target: Target) -> anyhow::Result<()> {
    let mut c = client::connect(&target).await?;
    let s = c
        .cluster
        .status(proto::ClusterStatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let ms = |d: Option<&prost_types::Duration>| {
        d.map(|d| d.seconds as f64 * 1e3 + d.nanos as f64 / 1e6)
    };
    if json {
        let out = serde_json::json!({
            "configured": s.configured, "not_taken_up": s.not_taken_up,
            "sync_interval_ms": ms(s.sync_interval.as_ref()),
            "peer_timeout_ms": ms(s.peer_timeout.as_ref()),
            "node_id": s.node_id, "incarnation": s.incarnation,
            "listen": s.listen, "phase": s.phase, "partition": s.partition,
            "members": s.members, "agreed_members": s.agreed_members,
            "views_agree": s.views_agree,
            "peers": s.peers.iter().map(|p| serde_json::json!({
                "address": p.address, "node_id": p.node_id, "live": p.live,
                "since_ms": ms(p.since.as_ref()), "incarnation": p.incarnation,
                "members": p.members, "agrees": p.agrees, "differs": p.differs,
                "rtt_ms": ms(p.rtt.as_ref()),
            })).collect::<Vec<_>>(),
            "policies": s.policies.iter().map(|g| serde_json::json!({
                "match": g.r#match, "limit": g.limit, "share": g.share,
                "window_ms": ms(g.window.as_ref()),
            })).collect::<Vec<_>>(),
            "enrolment": s.enrolment.as_ref().map(|e| serde_json::json!({
                "owned": e.owned, "held": e.held, "granted": e.granted,
                "refused": e.refused, "foreign": e.foreign, "unwritten": e.unwritten,
                "learning": e.learning, "raises_lapsed": e.raises_lapsed,
                "capped": e.capped, "over_budget": e.over_budget,
            })),
            "owned_clients": s.owned_clients.iter().map(|o| serde_json::json!({
                "client": o.client, "policy": o.policy, "global_limit": o.global_limit,
                "cluster_demand": o.cluster_demand, "learning": o.learning,
                "holders": o.holders.iter().map(|h| serde_json::json!({
                    "node_id": h.node_id, "demand": h.demand, "grant": h.grant,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "traffic": s.traffic.as_ref().map(|t| serde_json::json!({
                "rounds": t.rounds, "round_time_ms": ms(t.round_time.as_ref()),
                "bytes_sent": t.bytes_sent, "bytes_received": t.bytes_received,
                "heartbeats_failed": t.heartbeats_failed,
            })),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if !s.configured {
        if s.not_taken_up.is_empty() {
            println!("not a cluster member: the config has no `cluster:` section");
        } else {
            println!("not a cluster member: {}", s.not_taken_up);
        }
        return Ok(());
    }
    if !s.not_taken_up.is_empty() {
        println!("NOT TAKEN UP: {}", s.not_taken_up);
    }
    println!(
        "node {}  incarnation {}  listen {}  sync_interval {}  peer_timeout {}\nphase {}  \
         partition {}  members {} (agreed {}){}",
        s.node_id,
        s.incarnation,
        s.listen,
        show_duration(s.sync_interval.as_ref()),
        show_duration(s.peer_timeout.as_ref()),
        s.phase,
        s.partition,
        s.members,
        s.agreed_members,
        if s.views_agree { "" } else { "  VIEWS DIFFER" }
    );
    println!(
        "\n{:<28} {:<20} {:<5} {:>10} {:>10} {:>8}",
        "PEER", "NODE", "LIVE", "SINCE", "RTT", "MEMBERS"
    );
    for p in &s.peers {
        println!(
            "{:<28} {:<20} {:<5} {:>10} {:>10} {:>8}{}",
            if p.address.is_empty() {
                "(heard only)"
            } else {
                &p.address
            },
            if p.node_id.is_empty() {
                "?"
            } else {
                &p.node_id
            },
            if p.live { "yes" } else { "no" },
            show_duration(p.since.as_ref()),
            show_duration(p.rtt.as_ref()),
            p.members,
            match (p.agrees || p.node_id.is_empty(), p.differs.is_empty()) {
                (true, _) => String::new(),
                (false, true) => "  differs".to_string(),
                (false, false) => format!("  differs: {}", p.differs.join(", ")),
            }
        );
    }
    println!(
        "\n{:<40} {:>10} {:>10} {:>10}",
        "GLOBAL POLICY", "LIMIT", "SHARE", "WINDOW"
    );
    for g in &s.policies {
        println!(
            "{:<40} {:>10} {:>10} {:>10}",
            g.r#match,
            g.limit,
            g.share,
            show_duration(g.window.as_ref())
        );
    }
    if let Some(e) = &s.enrolment {
        println!(
            "\nenrolment: owns {} hot clients, holds {} ({} with a grant in force); refused {} \
             (--max-global-clients), ignored {} grant messages (not the owner's, or not under the \
             client's global policy); the maps refused {} \
             grant changes",
            e.owned, e.held, e.granted, e.refused, e.foreign, e.unwritten
        );
        println!(
            "  {} owned in learning mode; {} raises held here ran out before a newer grant; {} capped \
             by adaptation (overloaded); {} peer messages ignored past a heartbeat's budget",
            e.learning, e.raises_lapsed, e.capped, e.over_budget
        );
    }
    if !s.owned_clients.is_empty() {
        println!(
            "\n{:<40} {:<28} {:>10} {:>14}  SPLIT (member demand/grant; - for the cold share)",
            "OWNED CLIENT", "POLICY", "LIMIT", "CLUSTER DEMAND"
        );
        for o in &s.owned_clients {
            let split: Vec<String> = o
                .holders
                .iter()
                .map(|h| {
                    let grant = h.grant.map_or("-".to_string(), |g| g.to_string());
                    format!("{} {}/{grant}", h.node_id, h.demand)
                })
                .collect();
            println!(
                "{:<40} {:<28} {:>10} {:>14}  {}{}",
                o.client,
                o.policy,
                o.global_limit,
                o.cluster_demand,
                if o.learning { "(learning) " } else { "" },
                split.join(", ")
            );
        }
    }
    if let Some(t) = &s.traffic {
        println!(
            "sync: {} rounds ({} in all), {} bytes sent, {} received, {} heartbeats unanswered",
            t.rounds,
            show_duration(t.round_time.as_ref()),
            t.bytes_sent,
            t.bytes_received,
            t.heartbeats_failed
        );
    }
    Ok(())
}

/// Asks the agent at `target` to stop counting member `node_id` (decommissioned), and says what
/// changed and what is left to do.
pub async fn forget(node_id: String, target: Target) -> anyhow::Result<()> {
    let mut c = client::connect(&target).await?;
    let r = c
        .cluster
        .forget(proto::ClusterForgetRequest {
            node_id: node_id.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let leaves = r
        .leaves_in
        .as_ref()
        .filter(|d| d.seconds > 0 || d.nanos > 0);
    match leaves {
        None => println!(
            "{node_id} no longer counts here: members {} → {}",
            r.members_before, r.members_after
        ),
        Some(d) => println!(
            "{node_id} {}: it was heard from within the forget delay and counts {} more \
             (members {} now)",
            if r.was_learned {
                "is forgotten"
            } else {
                "was only heard from, never through an endpoint, and leaves on its own"
            },
            show_duration(Some(d)),
            r.members_after
        ),
    }
    println!(
        "agreed member count (the shares'): {}; it falls once no member reports more{}",
        r.agreed_members,
        if r.was_learned {
            format!(": forget {node_id} on every agent that dialled it")
        } else {
            String::new()
        }
    );
    Ok(())
}
