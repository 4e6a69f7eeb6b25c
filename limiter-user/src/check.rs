//! API checks: "may this client spend `hits` now?", decided by the XDP program's own code on the
//! XDP program's own maps.
//!
//! The agent runs the `limiter_check` program with BPF_PROG_TEST_RUN on a check frame (about a
//! microsecond). For an address the program finds the client exactly as a packet would
//! (`CLIENTS`, `STATIC_CLIENTS`, the policy trie), so the wire and the API share one budget; for
//! another ID it uses the `NAMED` maps with the policy the agent resolved (exact ID, else the
//! default). What the reply's state means for the caller (remaining, reset and retry times) is
//! computed here with `limiter_common::window`, the same arithmetic the program decides with.

use std::{
    collections::HashMap,
    hash::BuildHasherDefault,
    net::IpAddr,
    num::NonZeroU64,
    os::fd::{AsFd as _, OwnedFd},
    str::FromStr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use limiter_common::{
    CheckReply, CheckRequest, ClientState, Policy,
    addr::{ClientKey, v4_mapped},
    maps::{
        ACTION_DROP, ACTION_PASS, CHECK_NAMED, CHECK_PROBE, CHECK_STATIC, CHECK_UNLESS_VETOED,
        CheckSlot, VERDICT_ALLOWED, VERDICT_NEW, VERDICT_NOT_RESIDENT, VERDICT_OVERFLOW,
        VERDICT_VETOED, VERDICT_WONT_FIT, VERDICT_WRITTEN, grew_hot,
    },
    window,
};

use crate::{
    cluster::membership::ShareView,
    config::{Action, ClientName, Config, Match, Mode, looks_like_address},
    datapath::{CHECK_FRAME, TestRunFrame, XDP_PASS},
};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("client_id: {0}")]
    InvalidId(String),
    #[error("running the check program")]
    Run(#[from] std::io::Error),
    #[error("the check program rejected the check frame (return value {0})")]
    Rejected(u32),
    #[error("the check program left a check unanswered (no policy matched the client)")]
    Unanswered,
}

/// A client as the API names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientId {
    /// The same client as this source address's packets.
    Addr(IpAddr),
    /// Any other ID.
    Named(ClientName),
}

impl ClientId {
    /// The client's key in its map.
    pub fn key(&self) -> ClientKey {
        match self {
            ClientId::Addr(IpAddr::V4(v4)) => v4_mapped(v4.octets()),
            ClientId::Addr(IpAddr::V6(v6)) => v6.octets(),
            ClientId::Named(name) => name.key(),
        }
    }
}

impl FromStr for ClientId {
    type Err = CheckError;

    /// An address if it parses as one; a prefix or a malformed address is an error (a check is
    /// for one client); anything else is an ID under [`ClientName`]'s rules.
    fn from_str(s: &str) -> Result<Self, CheckError> {
        if let Ok(addr) = s.parse::<IpAddr>() {
            // An IPv4-mapped IPv6 address is the IPv4 client, as on the wire it would be a
            // malformed source.
            let addr = match addr {
                IpAddr::V6(v6) if v6.is_multicast() => {
                    return Err(CheckError::InvalidId(format!(
                        "{s:?} is an IPv6 multicast address, which no packet comes from \
                         (RFC 4291 section 2.7): no client has it"
                    )));
                }
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
                v4 => v4,
            };
            return Ok(ClientId::Addr(addr));
        }
        if looks_like_address(s) {
            return Err(CheckError::InvalidId(format!(
                "{s:?} is neither one IP address nor an ID (IDs shaped like addresses or prefixes are not allowed)"
            )));
        }
        ClientName::new(s)
            .map(ClientId::Named)
            .map_err(CheckError::InvalidId)
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientId::Addr(a) => a.fmt(f),
            ClientId::Named(n) => n.fmt(f),
        }
    }
}

/// The answer to one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Admitted (for `hits == 0`: one more hit would be). In dry-run mode always true.
    pub allowed: bool,
    /// Denied, but the agent runs in dry-run mode, so `allowed` is true.
    pub dry_run_denied: bool,
    pub action: Action,
    /// Allowance per window (`u32::MAX` for an allow-listed client, 0 for a blocked one).
    pub limit: u32,
    /// Hits the client could still spend now.
    pub remaining: u32,
    pub reset_after: Duration,
    /// When denied and waiting helps: how long until the same check would be admitted.
    pub retry_after: Option<Duration>,
    /// How long until one more hit would be admitted, if nothing else is spent meanwhile:
    /// zero while one is left now, `None` when waiting cannot help (a `drop` policy).
    pub next_after: Option<Duration>,
    pub window: Duration,
    /// The `match` of the policy that applied (`default` for the default).
    pub policy: Arc<str>,
    /// Current sliding-window estimate.
    pub estimate: u64,
    pub passed: u64,
    pub dropped: u64,
    /// The client has an entry in the maps.
    pub resident: bool,
    /// The client had no entry, and this check made one (or, with `overflow`, charged the
    /// shared overflow budget): what a TCP caller's new-client cap counts.
    pub new: bool,
    /// The entry could not be created (map full): the check was charged to the shared overflow
    /// budget, as a packet would be.
    pub overflow: bool,
    /// Under a `scope: global` policy: its limit across the cluster (`limit` is this node's
    /// share of it).
    pub global_limit: Option<u32>,
}

impl Decision {
    /// Whether `hits` fit in what a read (this decision) found left: what the check program's
    /// probe decides from the same state (`ClientState::admits`, the one-run all-or-none),
    /// here for a read run's answer (the two-run one).
    pub fn fits(&self, hits: u32) -> bool {
        match self.action {
            Action::Pass => true,
            Action::Drop => false,
            Action::Limit => self.remaining >= hits,
        }
    }
}

/// What the agent's current config says about IDs (policies, names); swapped on every apply.
#[derive(Debug, Clone, Default)]
pub struct PolicyView {
    /// Exact-ID policies by the ID's map key (its SHA-256 prefix, computed once per check).
    named: HashMap<ClientKey, Policy, BuildHasherDefault<KeyHasher>>,
    default: Policy,
    /// `matches[id - 1]` is the `match` of policy `id` (written out when asked: formatting
    /// every one on each change would cost a large policy set milliseconds).
    matches: Vec<Match>,
    dry_run: bool,
    /// Global policies' limits across the cluster, by policy id.
    global_limits: std::collections::BTreeMap<u16, u32>,
}

impl PolicyView {
    pub fn new(config: &Config) -> PolicyView {
        let matches = config.policies.iter().map(|(m, _)| m.clone()).collect();
        PolicyView {
            named: config
                .named_policies()
                .into_iter()
                .map(|(name, policy)| (name.key(), policy))
                .collect(),
            default: config.default_policy(),
            matches,
            dry_run: config.mode == Mode::DryRun,
            global_limits: config.global_limits.clone(),
        }
    }

    /// The agent runs in dry-run mode: checks that would be denied are allowed, and say so.
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// The id of the policy a check of the API ID whose entry's key is `key` resolves to now:
    /// its exact-ID policy's, else the default's.
    pub fn id_policy(&self, key: &ClientKey) -> u16 {
        self.named.get(key).map_or(self.default.id, |p| p.id)
    }

    /// The limit across the cluster of policy `id`, if it is a global one.
    pub fn global_limit(&self, id: u16) -> Option<u32> {
        self.global_limits.get(&id).copied()
    }

    /// The `match` of policy `id`.
    pub fn name(&self, id: u16) -> Arc<str> {
        match id.checked_sub(1) {
            None => Arc::from("default"),
            Some(i) => match self.matches.get(i as usize) {
                Some(m) => Arc::from(m.to_string()),
                None => Arc::from(format!("#{id}")),
            },
        }
    }
}

/// Runs checks; shared by every API task (BPF_PROG_TEST_RUN needs no locking).
pub struct Checker {
    prog: OwnedFd,
    view: RwLock<Arc<PolicyView>>,
    /// What the shares of global limits derive from now (cluster membership), for callers that
    /// bring limits of their own (Envoy's rate limit service).
    shares: RwLock<ShareView>,
    /// Clients of global policies that checks found hot, for the cluster's enrolment.
    hot: Arc<HotIds>,
    /// Program runs so far ([`Checker::runs`]).
    runs: AtomicU64,
}

/// Clients (API IDs and addresses, by the key of their entry) under a global policy that checks
/// found hot since the cluster's enrolment last took them: admitted hits that took the count in
/// a window to 0.8 of the share in force (`limiter_common::maps::grew_hot`, the fast path's
/// trigger for packets), or a denial. The programs report packets on the kernel's ring;
/// checks are noted here instead, so a check-role caller cannot fill the ring. Each key once
/// until taken; at most [`HotIds::CAPACITY`] (more are dropped, and come again with their next
/// window's crossing or denial).
#[derive(Default)]
pub struct HotIds(std::sync::Mutex<std::collections::HashSet<ClientKey>>);

impl HotIds {
    pub const CAPACITY: usize = 4096;

    fn note(&self, key: ClientKey) {
        let mut ids = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if ids.len() < Self::CAPACITY {
            ids.insert(key);
        }
    }

    /// The IDs noted since the last call.
    pub fn take(&self) -> Vec<ClientKey> {
        let mut ids = self.0.lock().unwrap_or_else(|e| e.into_inner());
        ids.drain().collect()
    }
}

impl Checker {
    /// `prog` is a descriptor of the loaded `limiter_check` program.
    pub fn new(prog: OwnedFd, config: &Config) -> Checker {
        Checker {
            prog,
            view: RwLock::new(Arc::new(PolicyView::new(config))),
            shares: RwLock::new(ShareView::ALONE),
            hot: Arc::new(HotIds::default()),
            runs: AtomicU64::new(0),
        }
    }

    /// The clients of global policies that checks found hot (see [`HotIds`]).
    pub fn hot_ids(&self) -> Arc<HotIds> {
        Arc::clone(&self.hot)
    }

    /// The cluster's share view changed (the policy store calls this whenever it takes one up).
    pub fn set_share_view(&self, view: ShareView) {
        *self.shares.write().unwrap_or_else(|e| e.into_inner()) = view;
    }

    /// What the shares of global limits derive from now ([`ShareView::ALONE`] outside a cluster).
    pub fn share_view(&self) -> ShareView {
        *self.shares.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `config` the one checks resolve IDs against (call after applying it to the maps).
    pub fn set_config(&self, config: &Config) {
        let view = Arc::new(PolicyView::new(config));
        let replaced = std::mem::replace(
            &mut *self.view.write().unwrap_or_else(|e| e.into_inner()),
            view,
        );
        // Freed out of the lock checks take.
        drop(replaced);
    }

    pub fn view(&self) -> Arc<PolicyView> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Decides `hits` hits for `id` (0: read only).
    pub fn check(&self, id: &ClientId, hits: u32) -> Result<Decision, CheckError> {
        let mut out = self.check_all(&[(id, hits)])?;
        Ok(out.remove(0))
    }

    /// Decides checks in order, up to `CHECK_BATCH` per program run (one syscall).
    pub fn check_all(&self, checks: &[(&ClientId, u32)]) -> Result<Vec<Decision>, CheckError> {
        let view = self.view();
        let requests: Vec<CheckRequest> = checks
            .iter()
            .map(|(id, hits)| request(id, *hits, &view))
            .collect();
        self.run_requests(&requests, &view)
    }

    /// Decides checks the caller resolved itself (see [`address_request`] and
    /// [`named_request`]), in order: how a check with its own limit and window, not one of the
    /// config's policies, is run (Envoy's rate limit service).
    pub fn check_requests(&self, requests: &[CheckRequest]) -> Result<Vec<Decision>, CheckError> {
        self.run_requests(requests, &self.view())
    }

    /// Spends checks all or none, in one program run when they fit a frame twice over. Each
    /// check comes with the hits the request needs of its client (its own, or the sum of
    /// the request's checks of that client): every client is first probed for those, and
    /// the checks are then spent, in order, only if every probe fits (`CHECK_PROBE`,
    /// `CHECK_UNLESS_VETOED`). More checks than that take a read and then the spend
    /// ([`all_or_none_in_two_runs`]), each one run per frame of checks. A packet or check
    /// that lands between a probe and its spend can still deny the spend (its decision says
    /// so); the caller keeps its own other calls out (the rate limit service's client
    /// locks).
    pub fn check_all_or_none(
        &self,
        checks: &[(CheckRequest, u32)],
    ) -> Result<AllOrNone, CheckError> {
        if checks.is_empty() {
            return Ok(AllOrNone::Spent(Vec::new()));
        }
        if checks.len() * 2 > CHECK_FRAME.batch {
            return all_or_none_in_two_runs(
                checks,
                |c| self.read_needing(c, true),
                |r| self.check_requests(r),
            );
        }
        let view = self.view();
        // A client checked more than once under one policy for the same need is probed once: the
        // others' probes ask for nothing (which always fits) and answer as the first does, so
        // that a refusal counts the hits refused once in the client's `dropped`.
        let first = first_of_each_client(checks);
        let requests: Vec<CheckRequest> = checks
            .iter()
            .zip(&first)
            .enumerate()
            .map(|(i, ((c, needed), &first))| CheckRequest {
                hits: if first == i { *needed } else { 0 },
                flags: c.flags | CHECK_PROBE,
                ..*c
            })
            .chain(checks.iter().map(|(c, _)| CheckRequest {
                flags: c.flags | CHECK_UNLESS_VETOED,
                ..*c
            }))
            .collect();
        let mut slots = Vec::with_capacity(requests.len());
        self.run_frame(&mut TestRunFrame::new(CHECK_FRAME), &requests, &mut slots)?;
        let (probes, spends) = slots.split_at(checks.len());
        Ok(self.all_or_none(probes, spends, checks, &first, &view))
    }

    /// Reads each check's client (nothing spent, no entry created) and says whether the hits
    /// beside the check (what the request needs of the client) fit. A client of a global policy
    /// with an entry that is short of what the request needs of it is noted hot, as a denied
    /// check or a refusing probe is (the rate limit service reads before it spends requests of
    /// more than 15 checks, those of more than one check with a shadow descriptor or in dry-run
    /// mode, and every request with a blocked descriptor; a shadow descriptor's or a dry run's
    /// short read is noted as its denied check would be, though it refuses nothing).
    ///
    /// With `count_refused` (the reads decide the request: a short one refuses it, or would
    /// outside dry-run and shadow mode) each client is read by a probe for what the request
    /// needs of it, which counts those hits in the client's `dropped` when they do not fit, as
    /// `check_all_or_none`'s probes do: a member of a cluster reports demand as passed +
    /// dropped, and a request refused whole spends nothing. A client checked more than once is
    /// probed once, for the most its checks need (see `asked_of_each_client`). Without it (a
    /// request refused whatever the reads say: a blocked descriptor) nothing is counted.
    pub fn read_needing(
        &self,
        checks: &[(CheckRequest, u32)],
        count_refused: bool,
    ) -> Result<Vec<(Decision, bool)>, CheckError> {
        let view = self.view();
        let asked = count_refused.then(|| asked_of_each_client(checks));
        let reads: Vec<CheckRequest> = checks
            .iter()
            .enumerate()
            .map(|(i, (c, _))| match &asked {
                // A probe reads as a check of 0 hits does (the program asks `hits` of it).
                Some(asked) => CheckRequest {
                    hits: asked[i],
                    flags: c.flags | CHECK_PROBE,
                    ..*c
                },
                None => CheckRequest { hits: 0, ..*c },
            })
            .collect();
        let mut out = Vec::with_capacity(checks.len());
        self.run_all(&reads, |k, slot| {
            let d = decision(&slot.reply, 0, &view);
            let fits = d.fits(checks[k].1);
            // Only a client with an entry: the key of a read of an address without one is the
            // address's, not its group's (the program wrote the entry's key back).
            if !fits && d.global_limit.is_some() && d.resident {
                self.hot.note(slot.request.key);
            }
            out.push((d, fits));
        })?;
        Ok(out)
    }

    /// What one request's probe slots and check slots of a run say (see
    /// [`Checker::check_all_or_none`]).
    fn all_or_none(
        &self,
        probes: &[CheckSlot],
        spends: &[CheckSlot],
        checks: &[(CheckRequest, u32)],
        first: &[usize],
        view: &PolicyView,
    ) -> AllOrNone {
        if spends.iter().any(|s| s.reply.verdict & VERDICT_VETOED != 0) {
            // A probe set the veto: nothing was spent. A global client whose probe did not fit
            // was as good as denied, and is noted hot as a denied check is (under the key of
            // its entry, which the program wrote back): a client refused only in such requests
            // would otherwise never be reported.
            return AllOrNone::Refused(
                probes
                    .iter()
                    .zip(first)
                    .map(|(p, &first)| {
                        let d = decision(&p.reply, 0, view);
                        let fits = probes[first].reply.verdict & VERDICT_WONT_FIT == 0;
                        // Only a client with an entry: the key of a read of an address without
                        // one is the address's, not its group's.
                        if !fits && d.global_limit.is_some() && d.resident {
                            self.hot.note(p.request.key);
                        }
                        (d, fits)
                    })
                    .collect(),
            );
        }
        AllOrNone::Spent(
            spends
                .iter()
                .zip(checks)
                .map(|(slot, (request, _))| self.answer(slot, request, view))
                .collect(),
        )
    }

    fn run_requests(
        &self,
        all: &[CheckRequest],
        view: &PolicyView,
    ) -> Result<Vec<Decision>, CheckError> {
        let mut out = Vec::with_capacity(all.len());
        self.run_all(all, |k, slot| out.push(self.answer(slot, &all[k], view)))?;
        Ok(out)
    }

    /// Runs `all` in order, a frame at a time, and gives each slot as the program left it to
    /// `each` with its index in `all`.
    fn run_all(
        &self,
        all: &[CheckRequest],
        mut each: impl FnMut(usize, &CheckSlot),
    ) -> Result<(), CheckError> {
        let mut frame = TestRunFrame::new(CHECK_FRAME);
        let mut slots = Vec::with_capacity(frame.batch());
        for (n, requests) in all.chunks(frame.batch()).enumerate() {
            self.run_frame(&mut frame, requests, &mut slots)?;
            for (k, slot) in slots.iter().enumerate() {
                each(n * frame.batch() + k, slot);
            }
        }
        Ok(())
    }

    /// One run of the check program over `requests` (at most a frame's), every slot as the
    /// program left it in `slots` (the program writes an address's entry key over the
    /// request's); an error unless the program passed the frame and answered every slot.
    fn run_frame(
        &self,
        frame: &mut TestRunFrame,
        requests: &[CheckRequest],
        slots: &mut Vec<CheckSlot>,
    ) -> Result<(), CheckError> {
        let ret =
            frame.run_into::<CheckRequest, CheckSlot>(self.prog.as_fd(), requests, 0, slots)?;
        self.runs.fetch_add(1, Ordering::Relaxed);
        if ret != XDP_PASS {
            return Err(CheckError::Rejected(ret));
        }
        if slots.iter().any(|s| s.reply.verdict & VERDICT_WRITTEN == 0) {
            return Err(CheckError::Unanswered);
        }
        Ok(())
    }

    /// Runs of the check program so far (each one BPF_PROG_TEST_RUN call that returned).
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// The decision of a check the program answered, noted if it found a global client hot.
    fn answer(&self, slot: &CheckSlot, request: &CheckRequest, view: &PolicyView) -> Decision {
        let d = decision(&slot.reply, request.hits, view);
        if d.global_limit.is_some() && hot_check(&slot.reply, request, &d) {
            // An ID's entry is keyed by the ID, an address's by what the program found.
            self.hot.note(slot.request.key);
        }
        d
    }
}

impl Checker {
    /// How many of `candidates` (from [`entry_candidates`]: the distinct addresses a call checks
    /// with hits > 0) have no entry now, and so would have one made by their check. Found by
    /// reading each (hits 0) through the check program, which resolves it exactly as its check
    /// will and creates nothing; IDs that are not addresses have maps of their own and are not
    /// candidates.
    pub fn new_address_entries(&self, candidates: &[&ClientId]) -> Result<u32, CheckError> {
        if candidates.is_empty() {
            return Ok(0);
        }
        let reads: Vec<(&ClientId, u32)> = candidates.iter().map(|&id| (id, 0)).collect();
        let absent = self
            .check_all(&reads)?
            .iter()
            .filter(|d| !d.resident)
            .count();
        Ok(u32::try_from(absent).unwrap_or(u32::MAX))
    }
}

/// The distinct addresses of `checks` checked with hits > 0, each once, in order: the entries
/// in the packet path's map the checks could create, at most.
pub fn entry_candidates<'a>(checks: &[(&'a ClientId, u32)]) -> Vec<&'a ClientId> {
    let mut seen = std::collections::HashSet::new();
    checks
        .iter()
        .filter(|(id, hits)| *hits > 0 && matches!(id, ClientId::Addr(_)) && seen.insert(id.key()))
        .map(|(id, _)| *id)
        .collect()
}

/// What [`Checker::check_all_or_none`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllOrNone {
    /// Every probe fitted, and every check was spent: each one's decision, in order (one may
    /// still be denied, by hits that came between its probe and its spend).
    Spent(Vec<Decision>),
    /// A probe did not fit, and nothing was spent: each check's client as a read found it, and
    /// whether the hits the request needed of it fitted.
    Refused(Vec<(Decision, bool)>),
}

/// Whether two checks are of one client (the same key in the same map).
pub fn same_client(a: &CheckRequest, b: &CheckRequest) -> bool {
    a.key == b.key && (a.flags & CHECK_NAMED) == (b.flags & CHECK_NAMED)
}

/// For each check, the hits its probe asks in [`Checker::read_needing`]: at the first check of
/// each client under each policy, the most any of that client's checks needs (what the
/// request asks of the client in all: a shadow descriptor's need also counts the enforced
/// checks beside it), 0 at the others, so that a short client's refused hits are counted once.
/// When the enforced checks fit and only a shadow one is short, the enforced hits are spent
/// and counted again in that figure: the client's demand is overstated by them (and by one
/// for a probe of no hits, which asks one more than the request's hits), never more.
fn asked_of_each_client(checks: &[(CheckRequest, u32)]) -> Vec<u32> {
    let mut asked = vec![0; checks.len()];
    for (i, (c, needed)) in checks.iter().enumerate() {
        let first = checks[..i]
            .iter()
            .position(|(o, _)| same_client(c, o) && o.policy == c.policy)
            .unwrap_or(i);
        asked[first] = asked[first].max(*needed);
    }
    asked
}

/// For each check, the index of the first check of the same client under the same policy for
/// the same need (itself if none came before): the one that probes it (see
/// [`Checker::check_all_or_none`]). Under another policy (a rate limit service descriptor with
/// its own `limit` beside one without) the program judges the need against that policy's limit,
/// so such a check is probed itself.
fn first_of_each_client(checks: &[(CheckRequest, u32)]) -> Vec<usize> {
    checks
        .iter()
        .enumerate()
        .map(|(i, (c, needed))| {
            checks[..i]
                .iter()
                .position(|(o, n)| same_client(c, o) && o.policy == c.policy && n == needed)
                .unwrap_or(i)
        })
        .collect()
}

/// All or none in two runs: `read` says of every check whether the hits the request needs of
/// its client fit (nothing spent), then, if all do, `spend` spends them. What
/// [`Checker::check_all_or_none`] does for more checks than a frame holds twice over, and a
/// simulated budget's way.
pub fn all_or_none_in_two_runs(
    checks: &[(CheckRequest, u32)],
    read: impl FnOnce(&[(CheckRequest, u32)]) -> Result<Vec<(Decision, bool)>, CheckError>,
    spend: impl FnOnce(&[CheckRequest]) -> Result<Vec<Decision>, CheckError>,
) -> Result<AllOrNone, CheckError> {
    let read = read(checks)?;
    if read.iter().all(|(_, fits)| *fits) {
        let spends: Vec<CheckRequest> = checks.iter().map(|(c, _)| *c).collect();
        return spend(&spends).map(AllOrNone::Spent);
    }
    Ok(AllOrNone::Refused(read))
}

/// Each check's decision and whether the hits beside it fit, from `decide` of reads (hits 0)
/// of the checks' clients: [`Checker::read_needing`] without its hot notes.
pub fn read_needing_with(
    checks: &[(CheckRequest, u32)],
    decide: impl FnOnce(&[CheckRequest]) -> Result<Vec<Decision>, CheckError>,
) -> Result<Vec<(Decision, bool)>, CheckError> {
    let reads: Vec<CheckRequest> = checks
        .iter()
        .map(|(c, _)| CheckRequest { hits: 0, ..*c })
        .collect();
    Ok(decide(&reads)?
        .into_iter()
        .zip(checks)
        .map(|(d, (_, needed))| {
            let fits = d.fits(*needed);
            (d, fits)
        })
        .collect())
}

/// A check of an address's client, resolved by the program exactly as its packets are (the
/// config's policy for the address, one budget with the wire).
pub fn address_request(addr: IpAddr, hits: u32) -> CheckRequest {
    CheckRequest {
        key: ClientId::Addr(addr).key(),
        hits,
        ..CheckRequest::default()
    }
}

/// A check of the named client `key` (in the `NAMED` map) under `policy`, which the caller
/// chose: the entry takes that policy's limit and window.
pub fn named_request(key: ClientKey, hits: u32, policy: Policy) -> CheckRequest {
    CheckRequest {
        key,
        hits,
        flags: CHECK_NAMED,
        policy,
        ..CheckRequest::default()
    }
}

/// The request for one check: an address is resolved by the program; an ID carries its policy.
fn request(id: &ClientId, hits: u32, view: &PolicyView) -> CheckRequest {
    let key = id.key();
    let mut request = CheckRequest {
        key,
        hits,
        ..CheckRequest::default()
    };
    if let ClientId::Named(_) = id {
        request.flags = CHECK_NAMED;
        match view.named.get(&key) {
            Some(policy) => {
                request.flags |= CHECK_STATIC;
                request.policy = *policy;
            }
            None => request.policy = view.default,
        }
    }
    request
}

/// Hashes a `ClientKey` of a named ID by its first eight bytes: the key is already a SHA-256
/// prefix, uniform and not choosable, so hashing it again (SipHash) would only cost time. The
/// map holds only the config's exact-ID policies; lookups of arbitrary IDs never insert.
#[derive(Default)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 16]` hashes as its length (a usize) then its bytes: keep the bytes' prefix.
        if bytes.len() >= 8 {
            #[expect(clippy::expect_used, reason = "a slice of 8 bytes is an [u8; 8]")]
            let prefix: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
            self.0 = u64::from_ne_bytes(prefix);
        }
    }

    fn write_usize(&mut self, _len: usize) {}
}

/// The resolution of CLOCK_MONOTONIC_COARSE (one kernel tick, e.g. 4 ms at HZ=250).
fn coarse_tick() -> Duration {
    static TICK: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *TICK.get_or_init(|| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid out-pointer.
        let ok = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } == 0;
        if ok {
            Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
        } else {
            // The longest tick Linux has (HZ=100).
            Duration::from_millis(10)
        }
    })
}

/// Whether a check of a global client found it hot (see [`HotIds`]): its admitted hits crossed
/// 0.8 of the share in force, or it was denied (an address too: one checked only through the
/// API has no packets to report it, and the program wrote its entry's key back). Never for a
/// check the maps had no room for (`VERDICT_OVERFLOW`): it counted against the shared overflow
/// budget, not an entry of the client's own.
fn hot_check(reply: &CheckReply, request: &CheckRequest, d: &Decision) -> bool {
    if reply.verdict & VERDICT_OVERFLOW != 0 || request.hits == 0 {
        return false;
    }
    let s = &reply.state;
    let admitted = reply.verdict & VERDICT_ALLOWED != 0;
    let crossed = admitted
        && NonZeroU64::new(u64::from(s.window_us) * 1000)
            .is_some_and(|w| grew_hot(&s.slots, reply.now_ns, w, s.limit, request.hits));
    crossed || !d.allowed || d.dry_run_denied
}

/// Interprets the program's reply.
pub fn decision(reply: &CheckReply, hits: u32, view: &PolicyView) -> Decision {
    let s: &ClientState = &reply.state;
    let window_ns = NonZeroU64::new(s.window_us as u64 * 1000).unwrap_or(NonZeroU64::MIN);
    let mut d = Decision {
        allowed: false,
        dry_run_denied: false,
        action: Action::Limit,
        limit: s.limit,
        remaining: 0,
        reset_after: Duration::ZERO,
        retry_after: None,
        next_after: None,
        window: Duration::from_nanos(window_ns.get()),
        policy: view.name(s.policy()),
        estimate: 0,
        passed: s.total_passed(),
        dropped: s.dropped_count(),
        resident: reply.verdict & VERDICT_NOT_RESIDENT == 0,
        new: reply.verdict & VERDICT_NEW != 0,
        overflow: reply.verdict & VERDICT_OVERFLOW != 0,
        global_limit: None,
    };
    match s.action() {
        ACTION_PASS => {
            d.action = Action::Pass;
            d.allowed = true;
            d.limit = u32::MAX;
            d.remaining = u32::MAX;
            d.next_after = Some(Duration::ZERO);
        }
        ACTION_DROP => {
            d.action = Action::Drop;
            d.limit = 0;
        }
        _ => {
            d.global_limit = view.global_limits.get(&s.policy()).copied();
            d.estimate = window::estimate_at(&s.slots, reply.now_ns, window_ns);
            d.remaining = (s.limit as u64).saturating_sub(d.estimate) as u32;
            d.reset_after =
                Duration::from_nanos(window::reset_after(&s.slots, reply.now_ns, window_ns));
            d.allowed = if hits == 0 {
                d.remaining >= 1
            } else {
                reply.verdict & VERDICT_ALLOWED != 0
            };
            if !d.allowed {
                d.retry_after =
                    window::admitted_after(&s.slots, reply.now_ns, window_ns, s.limit, hits.max(1))
                        .map(Duration::from_nanos);
            }
            d.next_after = if d.remaining >= 1 {
                Some(Duration::ZERO)
            } else {
                window::admitted_after(&s.slots, reply.now_ns, window_ns, s.limit, 1)
                    .map(Duration::from_nanos)
            };
            // Windows of a second or more are timed with the coarse clock, which runs up to one
            // tick behind real time: a caller waiting the exact time on its own clock could
            // come back a tick early. Add the tick so that waiting the time always suffices.
            if s.window_us >= window::COARSE_CLOCK_MIN_WINDOW_US {
                let tick = coarse_tick();
                d.reset_after += tick;
                d.retry_after = d.retry_after.map(|r| r + tick);
                d.next_after = d.next_after.map(|r| if r.is_zero() { r } else { r + tick });
            }
        }
    }
    if view.dry_run && !d.allowed {
        d.allowed = true;
        d.dry_run_denied = true;
        d.retry_after = None;
    }
    d
}

#[cfg(test)]
mod tests {
    use limiter_common::maps::VERDICT_WRITTEN;
    use proptest::prelude::*;

    use super::*;

    fn view(yaml: &str) -> PolicyView {
        PolicyView::new(&Config::parse(yaml).expect("valid config"))
    }

    const CONFIG: &str = "\
default: { limit: 10, window: 100ms }
policies:
  - match: 10.0.0.0/8
    action: pass
  - match: 192.0.2.0/24
    action: drop
";

    /// A reply for a fresh entry of `config`'s policy `id`.
    fn reply(config: &Config, id: u16, verdict: u32) -> CheckReply {
        let policy = config.policy_base(id).expect("policy").to_policy(id);
        CheckReply {
            state: ClientState::fresh(&policy, 1),
            now_ns: 1_000_000_000,
            verdict: verdict | VERDICT_WRITTEN,
            _pad: 0,
        }
    }

    /// A check of a global client is noted hot when its admitted hits take the count in the
    /// window to 0.8 of the share in force (an address too, by the key the program echoes), or
    /// when it is denied; not below it, not for a read, not on the overflow budget.
    #[test]
    fn a_check_that_crosses_four_fifths_of_the_share_is_hot() {
        let config = Config::parse(CONFIG).expect("valid config");
        let v = PolicyView::new(&config);
        let window = 1_000_000_000u64;
        let now = 42 * window + 5;
        let at = |count: u32, verdict: u32| {
            let mut r = reply(&config, 0, verdict);
            r.state.limit = 10;
            r.state.window_us = 1_000_000;
            r.state.slots[window::slot_of(42)] = window::slot(42, count);
            r.now_ns = now;
            r
        };
        let address = CheckRequest {
            hits: 1,
            ..CheckRequest::default()
        };
        let hot = |r: &CheckReply, q: &CheckRequest| {
            let d = decision(r, q.hits, &v);
            hot_check(r, q, &d)
        };
        assert!(hot(&at(8, VERDICT_ALLOWED), &address));
        assert!(!hot(&at(7, VERDICT_ALLOWED), &address));
        assert!(!hot(&at(9, VERDICT_ALLOWED), &address));
        let read = CheckRequest { hits: 0, ..address };
        assert!(!hot(&at(8, VERDICT_ALLOWED), &read));
        // Three hits from 6 to 9 cross 8.
        let three = CheckRequest { hits: 3, ..address };
        assert!(hot(&at(9, VERDICT_ALLOWED), &three));
        // A denied address or ID is noted, unless the check fell on the overflow budget.
        assert!(hot(&at(10, 0), &address));
        let id = CheckRequest {
            flags: CHECK_NAMED,
            ..address
        };
        assert!(hot(&at(10, 0), &id));
        assert!(!hot(&at(10, VERDICT_OVERFLOW), &address));
        assert!(!hot(&at(8, VERDICT_ALLOWED | VERDICT_OVERFLOW), &address));
    }

    #[test]
    fn ids_parse_as_one_address_or_a_name() {
        let id = |s: &str| s.parse::<ClientId>();
        assert_eq!(
            id("192.0.2.1").unwrap(),
            ClientId::Addr("192.0.2.1".parse().unwrap())
        );
        // An IPv4-mapped IPv6 address is the IPv4 client.
        assert_eq!(
            id("::ffff:192.0.2.1").unwrap(),
            ClientId::Addr("192.0.2.1".parse().unwrap())
        );
        assert!(
            matches!(id("tenant-acme").unwrap(), ClientId::Named(n) if n.as_str() == "tenant-acme")
        );
        for bad in [
            "10.0.0.0/8",
            "10.0.0.300",
            "",
            "default",
            " padded",
            "ff02::1",
        ] {
            assert!(
                matches!(id(bad), Err(CheckError::InvalidId(_))),
                "{bad:?} must be rejected"
            );
        }
        assert_eq!(
            id("2001:db8::1").unwrap().key(),
            "2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
    }

    #[test]
    fn a_limited_client_with_room_is_allowed_with_its_remaining_hits() {
        let config = Config::parse(CONFIG).unwrap();
        let v = PolicyView::new(&config);
        let d = decision(&reply(&config, 0, VERDICT_ALLOWED), 1, &v);
        assert!(d.allowed && !d.dry_run_denied);
        assert_eq!(
            (d.action, d.limit, d.remaining, d.estimate),
            (Action::Limit, 10, 10, 0)
        );
        assert_eq!(d.window, Duration::from_millis(100));
        assert_eq!(&*d.policy, "default");
        assert!(d.resident && !d.overflow);
        // The program refused the hits: denied, and told when to retry.
        let d = decision(&reply(&config, 0, 0), 1, &v);
        assert!(!d.allowed);
        // A read (0 hits) is allowed while one more hit would be.
        assert!(decision(&reply(&config, 0, 0), 0, &v).allowed);
    }

    #[test]
    fn pass_and_drop_policies_decide_without_counting() {
        let config = Config::parse(CONFIG).unwrap();
        let v = PolicyView::new(&config);
        let pass = decision(&reply(&config, 1, VERDICT_NOT_RESIDENT), 5, &v);
        assert!(pass.allowed && !pass.resident && !pass.new);
        assert_eq!(
            (pass.action, pass.limit, pass.remaining),
            (Action::Pass, u32::MAX, u32::MAX)
        );
        assert_eq!(&*pass.policy, "10.0.0.0/8");
        assert_eq!(&*v.name(2), "192.0.2.0/24");
        assert_eq!(&*v.name(3), "#3", "an id past the policies");
        let drop = decision(&reply(&config, 2, VERDICT_OVERFLOW | VERDICT_NEW), 1, &v);
        assert!(!drop.allowed && drop.overflow && drop.new);
        assert_eq!(
            (drop.action, drop.limit, drop.retry_after),
            (Action::Drop, 0, None)
        );
    }

    /// A read that counts what it refuses asks each client once per policy, for the most its
    /// checks need (an enforced descriptor's need and a shadow one's beside it on the same
    /// client differ: probed for each, the short client counted both).
    #[test]
    fn a_counting_read_asks_each_client_once_for_the_most_its_checks_need() {
        let policy = Policy {
            limit: 5,
            window_us: 1_000_000,
            id: 3,
            action: limiter_common::maps::ACTION_LIMIT,
            group: 0,
        };
        let other = Policy { id: 4, ..policy };
        let a = named_request([1; 16], 1, policy);
        let b = named_request([2; 16], 1, policy);
        let checks = [
            (a, 1),
            (b, 3),
            (a, 2),
            (named_request([1; 16], 1, other), 1),
            (a, 2),
        ];
        assert_eq!(asked_of_each_client(&checks), vec![2, 3, 0, 1, 0]);
    }

    #[test]
    fn dry_run_allows_what_it_would_deny_and_says_so() {
        let yaml = format!("mode: dry-run\n{CONFIG}");
        let config = Config::parse(&yaml).unwrap();
        let d = decision(&reply(&config, 2, 0), 1, &view(&yaml));
        assert!(d.allowed && d.dry_run_denied);
        assert_eq!(d.retry_after, None);
        let ok = decision(&reply(&config, 0, VERDICT_ALLOWED), 1, &view(&yaml));
        assert!(ok.allowed && !ok.dry_run_denied);
    }

    proptest! {
        /// The check program's probe (`ClientState::admits`) and the agent's reading of a read
        /// (`Decision::fits`) agree on every state, so a request is refused alike in one run
        /// or two.
        #[test]
        fn a_probe_and_a_read_agree_on_what_fits(
            counts in proptest::array::uniform2(0u32..40),
            tags in proptest::array::uniform2(0u32..6),
            window_ms in 10u32..3_000,
            at in 0u64..6_000_000_000,
            limit in 0u32..40,
            hits in 0u32..45,
            action in 0u8..3,
        ) {
            let policy = Policy { limit, window_us: window_ms * 1000, id: 1, action, group: 0 };
            let mut state = ClientState::fresh(&policy, 1);
            state.slots = [window::slot(tags[0], counts[0]), window::slot(tags[1], counts[1])];
            let reply = CheckReply { state, now_ns: at, verdict: VERDICT_WRITTEN, _pad: 0 };
            let read = decision(&reply, 0, &PolicyView::default());
            prop_assert_eq!(state.admits(at, hits), read.fits(hits));
        }
    }
}
