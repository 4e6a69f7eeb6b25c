//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`, decided with the check
//! program (see `check`): each limited descriptor is a client of the sliding window with its
//! limit, keyed by (domain, the descriptor's entries), in the `NAMED` map; a descriptor whose
//! only entry is `remote_address` (or `masked_remote_address`) is that address's client and
//! spends the budget its packets spend at the XDP fast path, under the agent's policy for the
//! address (unless [`RlsOptions::address_clients`] is off).
//!
//! **All or nothing.** Every descriptor's client is probed first (would the hits the request needs
//! of it be admitted? nothing spent); if one would be denied the request is OVER_LIMIT and nothing
//! is spent, so a denied request never eats another descriptor's budget (descriptors of one client
//! must fit together). Otherwise every descriptor is spent. When every descriptor is enforced, the
//! probes and the spends are one program run for up to 15 checks ([`Checker::check_all_or_none`]:
//! the program itself skips the spends after a probe that does not fit; more take a read and then,
//! if all fit, the spend); with a `shadow_mode` or `quota_mode` descriptor or in dry-run mode, a
//! read and then the spend of what fits (a shadow or quota descriptor over its limit is not
//! spent); with a blocked descriptor, a read only (nothing is spent); a single check is simply
//! spent. `quota_mode` descriptors deny the request only together: when every one is over (a
//! blocked one always is, one in `shadow_mode` never), as envoyproxy/ratelimit's quota mode.
//! All under the locks of the request's clients (one of
//! [`CLIENT_LOCKS`](super::budget::CLIENT_LOCKS) per client key, by its hash; a request takes
//! those of its clients in index order), so no other call of this service spends from those
//! clients between a probe (or read) and the spend, while calls about other clients go on (one
//! lock for every call would stop every serving thread whenever the holder's thread is preempted
//! while it holds it). Only address clients can still change in between (their packets,
//! `limiter.v1` checks of the address, and calls about other addresses of its group do not take
//! its lock): should such a client run out in those microseconds, its descriptor is OVER_LIMIT
//! and the others were spent.
//!
//! **Fields.** `overall_code` is OK or OVER_LIMIT. One status per descriptor, in order: `code`,
//! `current_limit` (the rule's `requests_per_unit`, `unit` and `name`; for an address client
//! the agent's policy, see `response::address_limit`), `limit_remaining` (the hits the client
//! could still spend now) and `duration_until_reset`: windows slide, so there is no reset instant;
//! it is the time until one more request would be admitted if nothing else is spent meanwhile
//! (zero while one is left). An unlimited descriptor is OK with `limit_remaining` `u32::MAX`;
//! one no rule matches is OK without `current_limit`. A `shadow_mode` rule (and every rule while
//! the agent runs in dry-run mode) reports OK whatever it would have said.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use envoy_types::pb::envoy::service::ratelimit::v3::{
    RateLimitRequest, RateLimitResponse,
    rate_limit_response::rate_limit::Unit as PbUnit,
    rate_limit_service_server::{RateLimitService, RateLimitServiceServer},
};
use limiter_common::{
    CheckRequest, Policy,
    addr::ClientKey,
    maps::{ACTION_LIMIT, MAX_POLICY_ID},
};
use tonic::{Request, Response, Status};

use super::{
    RlsConfig, RlsStore,
    budget::{Budget, ClientLocks, unavailable},
    config::{Unit, window},
    hits,
    matching::{Applies, Descriptor, Limit, limits_for, with_shared},
};
use crate::{
    check::{AllOrNone, Checker, Decision, address_request, named_request, same_client},
    config::Action,
};

/// The policy id the entries of the service's local rules carry (`#32767` in `limiter stats`),
/// above every config's (`config::RESERVED_POLICY_IDS`); under `--rls-scope global` the rules'
/// entries carry the id of their limit across the cluster instead (`RlsConfig::global_id`).
pub const RLS_POLICY_ID: u16 = MAX_POLICY_ID;

/// Largest request accepted (Envoy's are a few hundred bytes).
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Most descriptors in one request.
pub const MAX_DESCRIPTORS: usize = 64;

/// How the service answers.
#[derive(Debug, Clone)]
pub struct RlsOptions {
    /// A descriptor whose only entry is `remote_address` or `masked_remote_address` is the
    /// address's client, sharing its packets' budget (`--rls-address-clients`, on by default).
    pub address_clients: bool,
    /// Add `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` and, when denied,
    /// `Retry-After` to `response_headers_to_add` (`--rls-headers`; see `response`).
    pub headers: bool,
    /// The body of a denied request (`raw_body`), if set (`--rls-deny-body`).
    pub deny_body: Option<Vec<u8>>,
    /// The config's rules are limits across the cluster (`--rls-scope global`): each agent
    /// enforces its share of a rule's limit, as for a global policy's cold share.
    pub global: bool,
    /// Answer with dynamic metadata (`--rls-dynamic-metadata`; see `metadata`).
    pub dynamic_metadata: bool,
}

impl Default for RlsOptions {
    fn default() -> RlsOptions {
        RlsOptions {
            address_clients: true,
            headers: false,
            deny_body: None,
            global: false,
            dynamic_metadata: false,
        }
    }
}

/// The service (see the module docs).
pub struct RlsService<B = Checker> {
    budget: Arc<B>,
    store: Arc<RlsStore>,
    options: RlsOptions,
    /// Held from the read to the spend, per client key (see the module docs); shared by the
    /// serving threads' services.
    locks: ClientLocks,
    /// Counts the calls this service answers (one per serving thread, see `listen`).
    calls: Option<Arc<AtomicU64>>,
}

impl<B: Budget> RlsService<B> {
    pub fn new(budget: Arc<B>, store: Arc<RlsStore>, options: RlsOptions) -> RlsService<B> {
        RlsService {
            budget,
            store,
            options,
            locks: ClientLocks::new(),
            calls: None,
        }
    }

    /// The same service (the same budget, config and client locks) counting its calls in
    /// `calls`: one per serving thread.
    pub fn counting_calls(&self, calls: Arc<AtomicU64>) -> RlsService<B> {
        RlsService {
            budget: Arc::clone(&self.budget),
            store: Arc::clone(&self.store),
            options: self.options.clone(),
            locks: self.locks.clone(),
            calls: Some(calls),
        }
    }

    /// The tonic server of this service.
    pub fn server(self) -> RateLimitServiceServer<RlsService<B>> {
        RateLimitServiceServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Answers one request (see the module docs).
    pub fn answer(&self, request: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        let parsed = parse(request)?;
        let config = self.store.current();
        let descriptors: Vec<Descriptor<'_>> =
            parsed.iter().map(|p| p.descriptor.clone()).collect();
        let limits = limits_for(&config, &request.domain, &descriptors);
        let plans: Vec<Plan> = parsed
            .iter()
            .zip(limits)
            .map(|(p, applies)| self.plan(&config, &request.domain, p, applies))
            .collect();
        let quotas = Quotas::of(&plans);
        let outcomes = self.run(&plans, quotas)?;
        count(&parsed, &plans, &outcomes);
        Ok(self.response(request, &plans, quotas, &outcomes))
    }

    /// What to do for one descriptor.
    fn plan(&self, config: &RlsConfig, domain: &str, p: &Parsed<'_>, applies: Applies) -> Plan {
        let limit = match applies {
            Applies::Nothing => return Plan::NoLimit,
            Applies::Unlimited => return Plan::Unlimited,
            Applies::Limited(limit) => limit,
        };
        let address = self
            .options
            .address_clients
            .then(|| address_of(&p.descriptor.entries))
            .flatten();
        if let Some(addr) = address {
            return Plan::Check {
                request: address_request(addr, p.hits),
                limit,
                address: true,
            };
        }
        if limit.requests_per_unit == 0 {
            return Plan::Blocked(limit);
        }
        let (allowance, window_us) = window(limit.requests_per_unit, limit.unit);
        // A rule's limit across the cluster: this agent's share of it (the cold share ⌊L/N⌋;
        // 0 while joining; per `partition` while cut off), so the agents' admissions never sum
        // above it, under the id of that limit, by which the cluster enrols a descriptor that
        // grows hot and splits L by where its requests arrive (the check program then decides
        // with this node's grant). A request's own override is not the cluster's to agree on: it
        // stays local.
        let global = (self.options.global && !limit.overridden)
            .then(|| config.global_id(allowance, window_us))
            .flatten();
        let (allowance, id) = match global {
            Some(id) => (self.budget.share_view().share(allowance), id),
            None => (allowance, RLS_POLICY_ID),
        };
        let policy = Policy {
            limit: allowance,
            window_us,
            id,
            action: ACTION_LIMIT,
            group: 0,
        };
        let key = if limit.shared.is_empty() {
            client_key(domain, &p.descriptor.entries)
        } else {
            // A `share_threshold` wildcard's values are one client, named by the wildcard.
            client_key(domain, &with_shared(&p.descriptor.entries, &limit.shared))
        };
        Plan::Check {
            request: named_request(key, p.hits, policy),
            limit,
            address: false,
        }
    }

    /// Probes (or reads) every check, then spends all of them or none (see the module docs).
    fn run(&self, plans: &[Plan], quotas: Quotas) -> Result<Vec<Option<Outcome>>, Status> {
        let checks: Vec<(usize, CheckRequest, Role)> = plans
            .iter()
            .enumerate()
            .filter_map(|(i, plan)| match plan {
                Plan::Check { request, limit, .. } => Some((i, *request, Role::of(limit))),
                _ => None,
            })
            .collect();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; plans.len()];
        if checks.is_empty() {
            return Ok(outcomes);
        }
        let dry_run = self.budget.dry_run();
        // A blocked descriptor (requests_per_unit 0) denies the request before anything is read,
        // and so do blocked quota descriptors when they are all the request's quota descriptors.
        let blocked = !dry_run
            && (plans
                .iter()
                .any(|p| matches!(p, Plan::Blocked(l) if Role::of(l) == Role::Enforced))
                || quotas.all_out(0));
        // What each check's client must have left: the hits of the request's checks on that
        // client (two descriptors can name one client, and each alone may fit while both
        // together do not). An enforced check needs only the enforced ones' (a shadow or quota
        // descriptor must never deny the request on its own); a quota one the enforced ones' and
        // its own (quotas on one client are spent in turn, as many as fit); a shadow one every
        // check's, so that it is spent only when the others beside it fit too.
        // A descriptor of no hits (its own `hits_addend: 0`) asks whether its client has any
        // left: every check on that client needs one more than the request's hits on it (the
        // same need for each, so the client is probed once, and a refused probe counts one
        // refused hit, not one per check).
        let needed: Vec<u32> = checks
            .iter()
            .map(|(i, r, role)| {
                // By the rules' modes, not by dry-run mode: in dry-run mode the checks need
                // what they would need if enforced.
                let counted = || {
                    checks.iter().filter(|(j, _, other)| match role {
                        Role::Enforced => *other == Role::Enforced,
                        Role::Quota => *other == Role::Enforced || j == i,
                        Role::Shadow => true,
                    })
                };
                let hits = hits_on_client(r, counted());
                let probed = counted().any(|(_, o, _)| o.hits == 0 && same_client(r, o));
                if probed { hits.saturating_add(1) } else { hits }
            })
            .collect();
        let _held = self.locks.hold(checks.iter().map(|(_, r, _)| r));
        // Every check enforced and none blocked (the common case): all or none in one program
        // run, each client probed for what it needs, then spent.
        if checks.len() > 1
            && !blocked
            && !dry_run
            && checks.iter().all(|(_, _, role)| *role == Role::Enforced)
        {
            let requests: Vec<(CheckRequest, u32)> = checks
                .iter()
                .zip(&needed)
                .map(|((_, r, _), n)| (*r, *n))
                .collect();
            match self
                .budget
                .decide_all_or_none(&requests)
                .map_err(unavailable)?
            {
                AllOrNone::Spent(spent) => {
                    // A descriptor of no hits had one left beside the others' (`needed`).
                    for (((i, r, _), d), n) in checks.iter().zip(spent).zip(&needed) {
                        let over = (d.dry_run_denied || !d.allowed) && r.hits > 0;
                        outcomes[*i] = Some(Outcome {
                            decision: d,
                            over,
                            spent: !over,
                            needed: *n,
                        });
                    }
                }
                AllOrNone::Refused(read) => {
                    for (((i, _, _), (d, fits)), n) in checks.iter().zip(read).zip(&needed) {
                        outcomes[*i] = Some(Outcome {
                            decision: d,
                            over: !fits,
                            spent: false,
                            needed: *n,
                        });
                    }
                }
            }
            return Ok(outcomes);
        }
        self.read_then_spend(&checks, &needed, blocked, quotas, &mut outcomes)?;
        Ok(outcomes)
    }

    /// One check, a shadow or quota descriptor, dry-run mode or a blocked descriptor: a read
    /// first (unless one check alone: spending it is all or nothing already), then the spend of
    /// what fits (a shadow or quota descriptor over its limit is not spent: it would be refused
    /// anyway), or nothing if the request is denied: an enforced one does not fit, or no quota
    /// one does (a blocked quota descriptor never does). Under the checks' client locks.
    fn read_then_spend(
        &self,
        checks: &[(usize, CheckRequest, Role)],
        needed: &[u32],
        blocked: bool,
        quotas: Quotas,
        outcomes: &mut [Option<Outcome>],
    ) -> Result<(), Status> {
        let dry_run = self.budget.dry_run();
        let read = if checks.len() == 1 && !blocked {
            None
        } else {
            let reads: Vec<(CheckRequest, u32)> = checks
                .iter()
                .zip(needed)
                .map(|((_, r, _), n)| (*r, *n))
                .collect();
            // A blocked descriptor refuses the request whatever the reads find: they count no
            // refused hits (the other descriptors' clients did not refuse it).
            Some(
                self.budget
                    .read_needing(&reads, !blocked)
                    .map_err(unavailable)?,
            )
        };
        if let Some(read) = &read {
            let quotas_out = checks
                .iter()
                .zip(read)
                .filter(|((_, _, role), (_, fits))| *role == Role::Quota && !fits)
                .count();
            let denied = blocked
                || (!dry_run && quotas.all_out(quotas_out))
                || checks
                    .iter()
                    .zip(read)
                    .any(|((_, _, role), (_, fits))| !dry_run && *role == Role::Enforced && !fits);
            if denied {
                for (((i, _, _), (d, fits)), n) in checks.iter().zip(read).zip(needed) {
                    outcomes[*i] = Some(Outcome {
                        decision: d.clone(),
                        over: !fits,
                        spent: false,
                        needed: *n,
                    });
                }
                return Ok(());
            }
        }
        // The enforced checks first: a shadow check is spent only if the sum of the request's
        // checks on its client fit at the read, but a packet landing before the spend could
        // still leave an enforced one short after a shadow one was spent before it. Then the
        // quotas, and the shadow checks; of each, the probes (no hits) last, so that a probe
        // sees what the spends of its kind left.
        let mut spend: Vec<usize> = (0..checks.len())
            .filter(|&k| read.as_ref().is_none_or(|read| read[k].1))
            .collect();
        spend.sort_by_key(|&k| (checks[k].2, checks[k].1.hits == 0));
        let requests: Vec<CheckRequest> = spend.iter().map(|&k| checks[k].1).collect();
        let spent = self.budget.decide(&requests).map_err(unavailable)?;
        for (k, d) in spend.iter().zip(spent) {
            let over = if checks[*k].1.hits > 0 {
                d.dry_run_denied || !d.allowed
            } else {
                // No hits: over when nothing is left. After a read it had one left beside the
                // hits it needs of its client (`needed`), which are spent before it; a quota
                // probe does not need the other quotas' hits, which may take the last one.
                d.remaining == 0
            };
            outcomes[checks[*k].0] = Some(Outcome {
                decision: d,
                over,
                spent: !over,
                needed: needed[*k],
            });
        }
        if let Some(read) = read {
            // Not spent because its read did not fit what the request needs of its client (a
            // shadow check beside enforced ones on its client, or any check in dry-run mode):
            // over, whether or not its own hits alone would have fitted; what it has left is
            // what the read found less what this request spent from its client since.
            for (k, (i, r, _)) in checks.iter().enumerate() {
                if outcomes[*i].is_none() {
                    let (d, fits) = &read[k];
                    let spent_since = hits_on_client(
                        r,
                        checks
                            .iter()
                            .filter(|(j, _, _)| outcomes[*j].as_ref().is_some_and(|o| o.spent)),
                    );
                    let mut decision = d.clone();
                    decision.remaining = decision.remaining.saturating_sub(spent_since);
                    outcomes[*i] = Some(Outcome {
                        decision,
                        over: !*fits,
                        spent: false,
                        needed: needed[k],
                    });
                }
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl<B: Budget> RateLimitService for RlsService<B> {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        if let Some(calls) = &self.calls {
            calls.fetch_add(1, Ordering::Relaxed);
        }
        // A few microseconds (one program run; two with a shadow descriptor, in dry-run mode or
        // past 15 descriptors): decided on the serving thread.
        self.answer(request.get_ref()).map(Response::new)
    }
}

/// One descriptor of the request, validated.
struct Parsed<'a> {
    descriptor: Descriptor<'a>,
    hits: u32,
}

/// How a descriptor's limit decides the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    /// Over its limit, it denies the request (spent first).
    Enforced,
    /// `quota_mode`: over its limit, it denies the request only if every quota descriptor of
    /// the request is over (envoyproxy/ratelimit's quota mode); spent when it fits.
    Quota,
    /// `shadow_mode` (which wins over `quota_mode`): never denies; spent when it fits.
    Shadow,
}

/// A request's `quota_mode` descriptors.
#[derive(Debug, Clone, Copy)]
struct Quotas {
    /// All of them, in shadow mode too (never out: the request is never denied for its
    /// quotas, as envoyproxy/ratelimit counts it).
    descriptors: usize,
    /// Those of `requests_per_unit: 0`, not in shadow mode: out whatever is read.
    blocked: usize,
}

impl Quotas {
    fn of(plans: &[Plan]) -> Quotas {
        let mut quotas = Quotas {
            descriptors: 0,
            blocked: 0,
        };
        for plan in plans {
            if let Plan::Blocked(limit) | Plan::Check { limit, .. } = plan
                && limit.quota_mode
            {
                quotas.descriptors += 1;
                if matches!(plan, Plan::Blocked(_)) && !limit.shadow_mode {
                    quotas.blocked += 1;
                }
            }
        }
        quotas
    }

    /// Every quota descriptor is out, `out` of the checked ones (not in shadow mode) beside
    /// the blocked ones.
    fn all_out(self, checked_out: usize) -> bool {
        self.descriptors > 0 && self.blocked + checked_out == self.descriptors
    }
}

impl Role {
    fn of(limit: &Limit) -> Role {
        if limit.shadow_mode {
            Role::Shadow
        } else if limit.quota_mode {
            Role::Quota
        } else {
            Role::Enforced
        }
    }
}

/// What the service does for one descriptor.
#[derive(Debug, Clone)]
enum Plan {
    NoLimit,
    Unlimited,
    /// `requests_per_unit: 0`: denied without a check.
    Blocked(Limit),
    Check {
        request: CheckRequest,
        limit: Limit,
        /// The address's client (the agent's policy, not `limit`, decides).
        address: bool,
    },
}

/// A check's decision, and whether its hits were (or would have been) refused.
#[derive(Debug, Clone)]
struct Outcome {
    decision: Decision,
    over: bool,
    /// The hits were spent (`decision` says what is left after them; otherwise what was left
    /// before).
    spent: bool,
    /// What the request needed of its client (see `run`): a denial's wait is known only for
    /// one hit.
    needed: u32,
}

/// Counts each limited descriptor's hits in its rule's series (see `hits`).
fn count(parsed: &[Parsed<'_>], plans: &[Plan], outcomes: &[Option<Outcome>]) {
    for ((p, plan), outcome) in parsed.iter().zip(plans).zip(outcomes) {
        let (limit, counted) = match (plan, outcome) {
            (Plan::Blocked(limit), _) => (
                limit,
                hits::Outcome {
                    hits: p.hits,
                    limit: Some(0),
                    used_before: 0,
                    over: true,
                    shadow: limit.shadow_mode,
                },
            ),
            (Plan::Check { limit, .. }, Some(o)) => {
                let d = &o.decision;
                let used = d.limit.saturating_sub(d.remaining);
                (
                    limit,
                    hits::Outcome {
                        hits: p.hits,
                        limit: (d.action != Action::Pass).then_some(d.limit),
                        used_before: if o.spent {
                            used.saturating_sub(p.hits)
                        } else {
                            used
                        },
                        over: o.over,
                        shadow: limit.shadow_mode,
                    },
                )
            }
            _ => continue,
        };
        if let Some(series) = &limit.series {
            match &limit.metric_key {
                Some(key) => series.0.record_as(key, &counted),
                None => series.0.record(&p.descriptor.entries, &counted),
            }
        }
    }
}

/// The hits of those of `checks` that are on `r`'s client (saturating).
fn hits_on_client<'a>(
    r: &CheckRequest,
    checks: impl Iterator<Item = &'a (usize, CheckRequest, Role)>,
) -> u32 {
    checks
        .filter(|(_, o, _)| same_client(r, o))
        .fold(0u32, |sum, (_, o, _)| sum.saturating_add(o.hits))
}

/// Validates the request (INVALID_ARGUMENT naming the field) and resolves each descriptor's
/// hits: its own `hits_addend` if set, else the request's, where 0 means 1.
fn parse(request: &RateLimitRequest) -> Result<Vec<Parsed<'_>>, Status> {
    if request.domain.is_empty() {
        return Err(Status::invalid_argument("domain: must not be empty"));
    }
    if request.descriptors.is_empty() {
        return Err(Status::invalid_argument(
            "descriptors: at least one descriptor is needed",
        ));
    }
    if request.descriptors.len() > MAX_DESCRIPTORS {
        return Err(Status::invalid_argument(format!(
            "descriptors: {} in one request, at most {MAX_DESCRIPTORS}",
            request.descriptors.len()
        )));
    }
    let default_hits = request.hits_addend.max(1);
    request
        .descriptors
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if d.entries.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "descriptors[{i}].entries: a descriptor needs at least one entry"
                )));
            }
            if d.is_negative_hits {
                return Err(Status::invalid_argument(format!(
                    "descriptors[{i}].is_negative_hits: giving hits back is not supported"
                )));
            }
            let hits = match &d.hits_addend {
                Some(h) => u32::try_from(h.value).map_err(|_| {
                    Status::invalid_argument(format!(
                        "descriptors[{i}].hits_addend: {} is more than {}",
                        h.value,
                        u32::MAX
                    ))
                })?,
                None => default_hits,
            };
            let limit_override = match &d.limit {
                None => None,
                Some(o) => {
                    let unit = PbUnit::try_from(o.unit).ok().and_then(unit_of).ok_or_else(
                        || {
                            Status::invalid_argument(format!(
                                "descriptors[{i}].limit.unit: {} is not a unit (SECOND to YEAR)",
                                o.unit
                            ))
                        },
                    )?;
                    Some((o.requests_per_unit, unit))
                }
            };
            Ok(Parsed {
                descriptor: Descriptor {
                    entries: d
                        .entries
                        .iter()
                        .map(|e| (e.key.as_str(), e.value.as_str()))
                        .collect(),
                    limit_override,
                },
                hits,
            })
        })
        .collect()
}

/// The address of a descriptor that is one `remote_address` entry (an address) or one
/// `masked_remote_address` entry (`address/length`, the address taken as written: the agent's
/// own grouping decides which addresses share its budget).
pub fn address_of(entries: &[(&str, &str)]) -> Option<IpAddr> {
    let [(key, value)] = entries else {
        return None;
    };
    let text = match *key {
        "remote_address" => *value,
        "masked_remote_address" => value.split_once('/').map_or(*value, |(a, _)| a),
        _ => return None,
    };
    let addr: IpAddr = text.parse().ok()?;
    // As the API's checks: an IPv4-mapped address is the IPv4 client; multicast has none.
    match addr {
        IpAddr::V6(v6) if v6.is_multicast() => None,
        IpAddr::V6(v6) => Some(v6.to_ipv4_mapped().map_or(addr, IpAddr::V4)),
        v4 => Some(v4),
    }
}

/// The `NAMED` key of a descriptor's client: a SHA-256 prefix of the domain and the entries,
/// each length-prefixed, after a marker no `limiter.v1` ID can start with (IDs have no control
/// characters), so the service's clients never share a budget with the API's IDs.
pub fn client_key(domain: &str, entries: &[(&str, &str)]) -> ClientKey {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(b"\0rls\0");
    let mut field = |s: &str| {
        h.update((s.len() as u32).to_le_bytes());
        h.update(s.as_bytes());
    };
    field(domain);
    for (k, v) in entries {
        field(k);
        field(v);
    }
    let digest = h.finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

fn unit_of(unit: PbUnit) -> Option<Unit> {
    Some(match unit {
        PbUnit::Unknown => return None,
        PbUnit::Second => Unit::Second,
        PbUnit::Minute => Unit::Minute,
        PbUnit::Hour => Unit::Hour,
        PbUnit::Day => Unit::Day,
        PbUnit::Week => Unit::Week,
        PbUnit::Month => Unit::Month,
        PbUnit::Year => Unit::Year,
    })
}

mod response;
#[cfg(test)]
mod tests;
