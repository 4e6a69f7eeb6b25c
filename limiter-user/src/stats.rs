//! The one read model of what the datapath reports: global counters and status ([`Figures`]) and
//! resident entries ([`Resident`]), read by the CLI's `limiter stats`, the API's Stats service
//! and the agent's Prometheus endpoint, and client rows ([`ClientRow`]). Works while the agent runs, and after
//! it is gone while the pins remain.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
    num::NonZeroU64,
    os::fd::AsFd as _,
    time::Instant,
};

use aya::maps::lpm_trie::Key;
use limiter_common::{
    AdaptiveStatus, ClientState, GlobalStats, Policy,
    addr::{Client, ClientKey, client_of, keyed_by, policy_key_of},
    maps::{ACTION_DROP, ACTION_LIMIT, ACTION_PASS, FLAG_STATIC, MODE_DRY_RUN, generation_tag},
    window::estimate_at,
};
use serde::Serialize;

use crate::{
    config::Cidr,
    datapath::{ClientMaps, DatapathError, LINK_PIN, Tables, pin_dir, policy_entries},
};

/// The global figures of the maps at one moment, read with a handful of lookups: what every
/// consumer reports, together with [`Resident`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Figures {
    /// The per-CPU `STATS` counters, summed over CPUs.
    pub global: GlobalStats,
    /// The policy generation: bumped on every policy change.
    pub policy_generation: u32,
    /// The program is attached through the pinned link (false after an orderly stop, or before
    /// the agent attached).
    pub attached: bool,
    /// Over-limit packets are counted, not dropped.
    pub dry_run: bool,
    /// The adaptive controller's status, as the agent last wrote it.
    pub adaptive: AdaptiveStatus,
}

impl Figures {
    /// Reads the figures of `iface`'s maps: cheap lookups, fit to run under the policy lock.
    pub fn read(tables: &Tables, iface: &str) -> Result<Figures, DatapathError> {
        let config = tables.map_config()?;
        Ok(Figures {
            global: tables.global()?,
            policy_generation: config.generation,
            attached: attached(iface),
            dry_run: config.mode == MODE_DRY_RUN,
            adaptive: tables.adaptive_status()?,
        })
    }
}

/// Client entries resident in the kernel maps. No map type keeps an element count user space can
/// read, so counting them walks the client maps: on handles of their own
/// ([`Tables::client_maps`]), outside any lock, one batch in memory at a time, and shared by
/// concurrent callers ([`Walks`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resident {
    /// Entries keyed by an IP address (dynamic and static).
    pub addresses: u64,
    /// Entries keyed by a named ID (from the API).
    pub ids: u64,
    /// Of `addresses`, those held in `LIMITED` (over their limit in a window not yet over).
    pub limited: u64,
}

impl Resident {
    /// Walks `maps`.
    pub fn count(maps: &ClientMaps) -> Result<Resident, DatapathError> {
        let (addresses, ids, limited) = maps.resident()?;
        Ok(Resident {
            addresses,
            ids,
            limited,
        })
    }
}

/// The agent's walks of the client maps (for `Stats.Global`, `Stats.Top` and the metrics
/// endpoint): one at a time, and the resident counts of the last one shared.
///
/// A walk costs the kernel a copy of every entry (about 0.4 s for a million clients) but holds
/// only one batch at a time in the agent. Concurrent callers never each start one: a caller who
/// needs counts from a walk that started after some moment (for `Stats.Global`: its own arrival)
/// waits for the walk in progress and then takes the last walk's counts if they are recent
/// enough, else walks itself; a burst of callers costs at most two walks. The turn is held by
/// the walk itself, not by its caller: a caller cancelled while its walk runs (a short
/// `grpc-timeout`, say) leaves the walk to finish and record its counts before the next begins,
/// so cancelled callers can never pile walks up (each holds duplicated map descriptors).
#[derive(Debug, Default)]
pub struct Walks {
    /// When the last complete walk started, and what it counted; the lock is held during a walk.
    last: std::sync::Arc<tokio::sync::Mutex<Option<(Instant, Resident)>>>,
}

impl Walks {
    /// Resident counts from a walk that started at `since` or later: the last one's, or those
    /// of `walk`, run now on the blocking pool. An error of `walk` is returned and not kept.
    pub async fn resident<E: Send + 'static>(
        &self,
        since: Instant,
        walk: impl FnOnce() -> Result<Resident, E> + Send + 'static,
    ) -> Result<Result<Resident, E>, tokio::task::JoinError> {
        let mut last = self.last.clone().lock_owned().await;
        if let Some((started, resident)) = *last
            && started >= since
        {
            return Ok(Ok(resident));
        }
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let outcome = walk();
            if let Ok(resident) = &outcome {
                *last = Some((started, *resident));
            }
            outcome
        })
        .await
    }

    /// [`Walks::resident`] for a caller already on the blocking pool (not a runtime worker):
    /// `walk` runs on the calling thread.
    pub fn blocking_resident<E>(
        &self,
        since: Instant,
        walk: impl FnOnce() -> Result<Resident, E>,
    ) -> Result<Resident, E> {
        let mut last = self.last.blocking_lock();
        if let Some((started, resident)) = *last
            && started >= since
        {
            return Ok(resident);
        }
        let started = Instant::now();
        let resident = walk()?;
        *last = Some((started, resident));
        Ok(resident)
    }

    /// Runs `walk`, which visits every entry and counts what it visited, on the blocking pool in
    /// its turn; its counts become the last walk's.
    pub async fn walk<T: Send + 'static, E: Send + 'static>(
        &self,
        walk: impl FnOnce() -> Result<(T, Resident), E> + Send + 'static,
    ) -> Result<Result<(T, Resident), E>, tokio::task::JoinError> {
        let mut last = self.last.clone().lock_owned().await;
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let outcome = walk();
            if let Ok((_, resident)) = &outcome {
                *last = Some((started, *resident));
            }
            outcome
        })
        .await
    }
}

/// What `limiter stats` shows: the figures, and the busiest clients.
#[derive(Debug, Serialize)]
pub struct Report {
    pub iface: String,
    pub mode: &'static str,
    pub generation: u32,
    /// The program is attached through the pinned link (false after an orderly stop, or before
    /// the agent attached).
    pub attached: bool,
    pub global: Global,
    /// The adaptive controller, as the agent last reported it.
    pub adaptive: Adaptive,
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
    /// Clients moved into the never-evicted `LIMITED` map on their first dropped packet.
    pub limited_moves: u64,
    /// Dropped packets of clients that could not move into `LIMITED` (full; `--max-limited`).
    pub limited_full: u64,
    /// Client entries resident now (dynamic, static and limited).
    pub clients: u64,
    /// Of those, clients held in `LIMITED`.
    pub limited: u64,
}

/// The adaptive controller's global state (see `limiter_common::AdaptiveStatus`).
#[derive(Debug, Serialize)]
pub struct Adaptive {
    /// The agent runs the controller (`adaptive: { enabled: true }`).
    pub enabled: bool,
    pub period_ms: f64,
    /// Smoothed CPU utilisation, 0 to 1.
    pub cpu: f64,
    /// Global load factor `g`.
    pub load_factor: f64,
    /// Clients the controller tracks (active within `idle_periods`).
    pub tracked: u32,
    /// Periods run since the agent started.
    pub periods: u64,
}

#[derive(Debug, Serialize)]
pub struct ClientRow {
    /// The client's address, or its group's prefix (`2001:db8:1:2::/64`, see `per`).
    pub addr: String,
    /// The matching policy's `match` (`default` for the default policy).
    pub policy: String,
    /// Named by an exact-address policy: never evicted.
    #[serde(rename = "static")]
    pub is_static: bool,
    /// Held in `LIMITED`: over its limit in a window not yet over, never evicted.
    pub limited: bool,
    pub action: &'static str,
    /// Effective allowance `A` per effective window (the same as `allowance`; kept for
    /// scripts written before adaptive windows).
    pub limit: u32,
    /// Effective window `W`.
    pub window_ms: f64,
    /// Effective allowance `A`: packets admitted per `W`.
    pub allowance: u32,
    /// `W / window` of the client's policy: the adaptive scale `s` (1 when adaptive windows
    /// are off, or the client is not adapted).
    pub scale: f64,
    /// Admitted rate over the effective window (`estimate / W`) divided by the policy's rate
    /// `limit / window`: how much of its long-run rate the client uses.
    pub utilisation: f64,
    /// Sliding-window estimate of packets in the last window.
    pub estimate: u64,
    pub rate_per_s: f64,
    /// Packets the client may still send now (`allowance - estimate`).
    pub remaining: u64,
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

/// How a client key reads: its address, or its group's prefix (`2001:db8:1:2::/64`).
pub fn client_label(key: &ClientKey) -> String {
    match client_of(key) {
        Client::V4(a) => Ipv4Addr::from(a).to_string(),
        Client::V6(a) => Ipv6Addr::from(a).to_string(),
        Client::GroupV4 { prefix, bits, .. } => format!("{}/{bits}", Ipv4Addr::from(prefix)),
        Client::GroupV6 { prefix, bits, .. } => format!("{}/{bits}", Ipv6Addr::from(prefix)),
    }
}

fn action_name(action: u8) -> &'static str {
    match action {
        ACTION_PASS => "pass",
        ACTION_DROP => "drop",
        _ => "limit",
    }
}

/// A client's adaptive scale `W / w` and utilisation (admitted rate over its effective window
/// divided by its policy's `limit / window`), given its policy as configured: `(1, 0)` for a
/// client that is not limited, or whose entry a packet has not filled in yet.
pub fn adaptation(state: &ClientState, base: Option<&Policy>, rate_per_s: f64) -> (f64, f64) {
    match base {
        Some(p)
            if p.window_us > 0
                && p.limit > 0
                && state.window_us > 0
                && state.action() == ACTION_LIMIT =>
        {
            (
                state.window_us as f64 / p.window_us as f64,
                rate_per_s * p.window_us as f64 / (p.limit as f64 * 1e6),
            )
        }
        _ => (1.0, 0.0),
    }
}

/// One client's row at `now_ns`; `base` is its policy as configured (for scale and
/// utilisation).
pub fn client_row(
    key: &ClientKey,
    state: &ClientState,
    policy: String,
    base: Option<&Policy>,
    now_ns: u64,
) -> ClientRow {
    let window_ns = state.window_us as u64 * 1000;
    let estimate = NonZeroU64::new(window_ns).map_or(0, |w| estimate_at(&state.slots, now_ns, w));
    let window_s = window_ns as f64 / 1e9;
    let rate_per_s = if window_s > 0.0 {
        estimate as f64 / window_s
    } else {
        0.0
    };
    let (scale, utilisation) = adaptation(state, base, rate_per_s);
    ClientRow {
        addr: client_label(key),
        policy,
        is_static: state.flags() & FLAG_STATIC != 0,
        limited: false,
        action: action_name(state.action()),
        limit: state.limit,
        window_ms: state.window_us as f64 / 1000.0,
        allowance: state.limit,
        scale,
        utilisation,
        estimate,
        rate_per_s,
        remaining: (state.limit as u64).saturating_sub(estimate),
        passed: state.total_passed(),
        dropped: state.dropped_count(),
    }
}

/// Whether the program is attached to `iface` through its pinned link: the pin is there, and
/// the link is on the interface of that name now (deleting the interface detaches the link
/// and leaves the pin).
fn attached(iface: &str) -> bool {
    let pin = pin_dir(iface).join(LINK_PIN);
    if !pin.exists() {
        return false;
    }
    // A link that cannot be opened or read (no privileges): the pin says it.
    let Ok(link) = crate::datapath::syscall::obj_get(&pin) else {
        return true;
    };
    let Ok(ifindex) = crate::datapath::syscall::xdp_link_ifindex(link.as_fd()) else {
        return true;
    };
    ifindex != 0 && crate::datapath::lifecycle::if_index(iface).is_ok_and(|i| i == ifindex)
}

/// `state` as its next packet will find it, if the policies in force have not re-resolved it
/// yet: after a reload (it still names the policy it was under, which a reload may have
/// renumbered) and for an exact-address client that has sent nothing yet (written blank). The
/// policy is the trie's match for its key, with that policy's limits (an adapted client's
/// packet rescales what it has used; the loop's next period adapts it again). `None` for an
/// entry that is current, or that no policy keys any more (a reload changed how addresses
/// group: eviction or the `LIMITED` sweep removes it).
pub(crate) fn as_resolved(
    tables: &Tables,
    key: &ClientKey,
    state: &ClientState,
    generation: u32,
) -> Option<ClientState> {
    if state.is_current(generation) {
        return None;
    }
    let (len, data) = policy_key_of(key);
    let policy = tables.policies.get(&Key::new(len, data), 0).ok()?;
    if !keyed_by(key, policy.group) {
        return None;
    }
    let mut resolved = *state;
    (resolved.limit, resolved.window_us) = policy.entry_limits();
    resolved.set_policy(policy.id);
    resolved.set_generation_tag(generation_tag(generation));
    Some(resolved)
}

/// Reads the maps. `top == 0` lists every client.
pub fn report(tables: &Tables, iface: &str, top: usize) -> Result<Report, DatapathError> {
    let figures = Figures::read(tables, iface)?;
    let g = figures.global;
    let policies: HashMap<u16, (String, Policy)> = policy_entries(tables)
        .into_iter()
        .map(|((prefix, key), p)| {
            let name = if p.id == 0 {
                "default".to_string()
            } else {
                Cidr::from_lpm(prefix, &key).to_string()
            };
            (p.id, (name, p))
        })
        .collect();
    let status = figures.adaptive;
    let now = monotonic_ns();
    let maps = tables.client_maps()?;
    let entries = maps.addresses()?;
    let held = maps.limited_keys()?;
    let row = |k: &ClientKey, s: &ClientState| {
        let base = policies.get(&s.policy());
        let name = base.map_or_else(|| format!("#{}", s.policy()), |(n, _)| n.clone());
        let mut row = client_row(k, s, name, base.map(|(_, p)| p), now);
        row.limited = held.contains(k);
        row
    };
    let mut rows: Vec<(ClientRow, usize)> = entries
        .iter()
        .enumerate()
        .map(|(i, (k, s))| (row(k, s), i))
        .collect();
    rows.sort_by(|(a, _), (b, _)| {
        b.rate_per_s
            .total_cmp(&a.rate_per_s)
            .then((b.passed.wrapping_add(b.dropped)).cmp(&a.passed.wrapping_add(a.dropped)))
            .then(a.addr.cmp(&b.addr))
    });
    if top > 0 {
        rows.truncate(top);
    }
    // Rows shown of entries the policies in force have not re-resolved yet (they are, on their
    // next packet) are shown as that packet will find them.
    let rows: Vec<ClientRow> = rows
        .into_iter()
        .map(|(shown, i)| {
            let (k, s) = &entries[i];
            match as_resolved(tables, k, s, figures.policy_generation) {
                Some(resolved) => row(k, &resolved),
                None => shown,
            }
        })
        .collect();
    Ok(Report {
        iface: iface.to_string(),
        mode: if figures.dry_run {
            "dry-run"
        } else {
            "enforce"
        },
        generation: figures.policy_generation,
        attached: figures.attached,
        global: Global {
            passed: g.passed,
            dropped: g.dropped,
            non_ip: g.non_ip,
            malformed: g.malformed,
            new_clients: g.new_clients,
            map_full: g.map_full,
            resolves: g.resolves,
            contended: g.contended,
            limited_moves: g.limited_moves,
            limited_full: g.limited_full,
            // The rows' own walk: one walk, and a count that agrees with the rows.
            clients: entries.len() as u64,
            limited: held.len() as u64,
        },
        adaptive: Adaptive {
            enabled: status.enabled(),
            period_ms: status.period_us as f64 / 1000.0,
            cpu: status.cpu(),
            load_factor: status.load_factor(),
            tracked: status.tracked,
            periods: status.periods,
        },
        clients: rows,
    })
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        },
        time::Duration,
    };

    use super::*;

    /// A walk that takes 50 ms and counts itself: its counts say which walk they came from.
    fn counting_walk(walks: &Arc<AtomicU64>) -> impl FnOnce() -> Result<Resident, ()> + use<> {
        let walks = Arc::clone(walks);
        move || {
            let n = walks.fetch_add(1, Ordering::SeqCst) + 1;
            std::thread::sleep(Duration::from_millis(50));
            Ok(Resident {
                addresses: n,
                ..Resident::default()
            })
        }
    }

    /// Twenty callers at once, each wanting counts from a walk that started after it arrived,
    /// cost at most two walks; each gets counts no older than its arrival.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_walks() {
        let shared = Arc::new(Walks::default());
        let walks = Arc::new(AtomicU64::new(0));
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let (shared, walks) = (Arc::clone(&shared), Arc::clone(&walks));
                tokio::spawn(async move {
                    let arrived = Instant::now();
                    let counts = shared
                        .resident(arrived, counting_walk(&walks))
                        .await
                        .unwrap()
                        .unwrap();
                    (arrived, counts)
                })
            })
            .collect();
        for caller in callers {
            let (_, counts) = caller.await.unwrap();
            assert!((1..=2).contains(&counts.addresses), "{counts:?}");
        }
        assert!(walks.load(Ordering::SeqCst) <= 2);

        // A caller arriving later gets a walk of its own, not the old counts.
        let later = shared
            .resident(Instant::now(), counting_walk(&walks))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(later.addresses, walks.load(Ordering::SeqCst));

        // One that accepts counts from a minute back reuses the last walk.
        let before = walks.load(Ordering::SeqCst);
        let since = Instant::now() - Duration::from_secs(60);
        let reused = shared
            .resident(since, counting_walk(&walks))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (reused.addresses, walks.load(Ordering::SeqCst)),
            (before, before)
        );
    }
}
