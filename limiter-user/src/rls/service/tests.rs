//! The field mapping and the all-or-nothing spending, over a simulated budget that keeps
//! client state as the check program does (`limiter_common::window::admit` on the slots, the
//! reply read by `check::decision`, the agent's own reading of the program's replies).

use std::{
    collections::HashMap,
    num::NonZeroU64,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use envoy_types::pb::{
    envoy::{
        extensions::common::ratelimit::v3::{
            RateLimitDescriptor,
            rate_limit_descriptor::{Entry, RateLimitOverride},
        },
        service::ratelimit::v3::rate_limit_response::Code,
    },
    google::protobuf::UInt64Value,
};
use limiter_common::{
    CheckReply, ClientState,
    maps::{ACTION_LIMIT, CHECK_NAMED, VERDICT_ALLOWED, VERDICT_NOT_RESIDENT, VERDICT_WRITTEN},
    window,
};
use tonic::Code as GrpcCode;

use super::*;
use crate::{
    check::{CheckError, PolicyView, all_or_none_in_two_runs, decision, read_needing_with},
    cluster::membership::ShareView,
    config::Config,
    rls::RlsConfig,
};

/// The check program's bookkeeping, simulated: one state per key, addresses under one policy.
struct Sim {
    clients: Mutex<HashMap<ClientKey, ClientState>>,
    now_ns: AtomicU64,
    address_policy: Policy,
    view: PolicyView,
    /// Every request seen, for asserting what was read and spent.
    seen: Mutex<Vec<CheckRequest>>,
    fail: AtomicBool,
    shares: Mutex<ShareView>,
    /// Requests decided all or none (`Budget::decide_all_or_none`).
    all_or_none: AtomicU64,
    /// The service's client locks, once the test hands them over: every check decided while
    /// its client's lock was free is counted in `unlocked`.
    locks: Mutex<Option<ClientLocks>>,
    unlocked: AtomicU64,
    /// Each `Budget::read_needing`'s `count_refused`, in order.
    reads: Mutex<Vec<bool>>,
}

impl Sim {
    fn new(dry_run: bool) -> Sim {
        let mode = if dry_run { "mode: dry-run\n" } else { "" };
        let config = Config::parse(&format!("{mode}default: {{ limit: 10, window: 1s }}\n"))
            .expect("config");
        Sim {
            clients: Mutex::new(HashMap::new()),
            now_ns: AtomicU64::new(1_000_000_000_000),
            address_policy: Policy {
                limit: 2,
                window_us: 1_000_000,
                id: 1,
                action: ACTION_LIMIT,
                group: 0,
            },
            view: PolicyView::new(&config),
            seen: Mutex::new(Vec::new()),
            fail: AtomicBool::new(false),
            shares: Mutex::new(ShareView::ALONE),
            all_or_none: AtomicU64::new(0),
            locks: Mutex::new(None),
            unlocked: AtomicU64::new(0),
            reads: Mutex::new(Vec::new()),
        }
    }

    fn advance(&self, d: Duration) {
        self.now_ns.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
    }

    fn spent(&self) -> Vec<(ClientKey, u32)> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|r| r.hits > 0)
            .map(|r| (r.key, r.hits))
            .collect()
    }
}

impl Budget for Sim {
    fn decide(&self, requests: &[CheckRequest]) -> Result<Vec<Decision>, CheckError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(CheckError::Unanswered);
        }
        self.seen.lock().unwrap().extend_from_slice(requests);
        if let Some(locks) = &*self.locks.lock().unwrap() {
            let free = requests.iter().filter(|r| !locks.held(r)).count();
            self.unlocked.fetch_add(free as u64, Ordering::SeqCst);
        }
        let now = self.now_ns.load(Ordering::SeqCst);
        let mut clients = self.clients.lock().unwrap();
        Ok(requests
            .iter()
            .map(|r| {
                let policy = if r.flags & CHECK_NAMED != 0 {
                    r.policy
                } else {
                    self.address_policy
                };
                let mut verdict = VERDICT_WRITTEN;
                let state = match clients.get_mut(&r.key) {
                    Some(s) => {
                        if s.window_us != policy.window_us {
                            s.slots = [0, 0];
                        }
                        s.limit = policy.limit;
                        s.window_us = policy.window_us;
                        s
                    }
                    None if r.hits == 0 => {
                        verdict |= VERDICT_NOT_RESIDENT;
                        let fresh = ClientState::fresh(&policy, 0);
                        let reply = CheckReply {
                            state: fresh,
                            now_ns: now,
                            verdict,
                            _pad: 0,
                        };
                        return decision(&reply, 0, &self.view);
                    }
                    None => clients
                        .entry(r.key)
                        .or_insert_with(|| ClientState::fresh(&policy, 0)),
                };
                let window_ns = NonZeroU64::new(u64::from(state.window_us) * 1000).unwrap();
                if r.hits > 0
                    && window::admit(&mut state.slots, now, window_ns, state.limit, r.hits)
                {
                    verdict |= VERDICT_ALLOWED;
                }
                let reply = CheckReply {
                    state: *state,
                    now_ns: now,
                    verdict,
                    _pad: 0,
                };
                decision(&reply, r.hits, &self.view)
            })
            .collect())
    }

    fn decide_all_or_none(&self, checks: &[(CheckRequest, u32)]) -> Result<AllOrNone, CheckError> {
        self.all_or_none.fetch_add(1, Ordering::SeqCst);
        all_or_none_in_two_runs(checks, |c| self.read_needing(c, true), |r| self.decide(r))
    }

    fn read_needing(
        &self,
        checks: &[(CheckRequest, u32)],
        count_refused: bool,
    ) -> Result<Vec<(Decision, bool)>, CheckError> {
        self.reads.lock().unwrap().push(count_refused);
        read_needing_with(checks, |r| self.decide(r))
    }

    fn dry_run(&self) -> bool {
        self.view.dry_run()
    }

    fn share_view(&self) -> ShareView {
        *self.shares.lock().unwrap()
    }
}

const CONFIG: &str = "domain: web
descriptors:
  - key: path
    rate_limit: { unit: second, requests_per_unit: 3, name: per_path }
  - key: user
    rate_limit: { unit: minute, requests_per_unit: 5 }
  - key: tier
    value: small
    rate_limit: { unit: hour, requests_per_unit: 1 }
  - key: banned
    rate_limit: { unit: second, requests_per_unit: 0 }
  - key: shadow
    shadow_mode: true
    rate_limit: { unit: second, requests_per_unit: 1 }
  - key: masked_remote_address
    shadow_mode: true
    rate_limit: { unit: second, requests_per_unit: 100 }
  - key: free
    rate_limit: { unlimited: true }
  - key: remote_address
    rate_limit: { unit: second, requests_per_unit: 100 }
";

fn service_with(sim: Sim, options: RlsOptions) -> (RlsService<Sim>, Arc<Sim>) {
    service_of(CONFIG, sim, options)
}

fn service_of(config: &str, sim: Sim, options: RlsOptions) -> (RlsService<Sim>, Arc<Sim>) {
    let sim = Arc::new(sim);
    let store = Arc::new(RlsStore::fixed(RlsConfig::parse(config).expect("config")));
    (RlsService::new(Arc::clone(&sim), store, options), sim)
}

fn service() -> (RlsService<Sim>, Arc<Sim>) {
    service_with(Sim::new(false), RlsOptions::default())
}

fn desc(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        ..RateLimitDescriptor::default()
    }
}

fn request(descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: "web".into(),
        descriptors,
        hits_addend: 0,
    }
}

fn codes(r: &RateLimitResponse) -> (i32, Vec<i32>) {
    (r.overall_code, r.statuses.iter().map(|s| s.code).collect())
}

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

#[test]
fn a_descriptor_admits_exactly_its_limit_and_reports_it() {
    let (svc, sim) = service();
    let req = request(vec![desc(&[("path", "/a")])]);
    for left in [2, 1, 0] {
        let r = svc.answer(&req).unwrap();
        assert_eq!(codes(&r), (OK, vec![OK]));
        let s = &r.statuses[0];
        assert_eq!(s.limit_remaining, left);
        let limit = s.current_limit.as_ref().unwrap();
        assert_eq!(
            (limit.requests_per_unit, limit.unit, limit.name.as_str()),
            (3, PbUnit::Second as i32, "per_path")
        );
        let reset = s.duration_until_reset.as_ref().unwrap();
        // Zero while one more is left; then the time until one more is admitted.
        assert_eq!(
            reset.seconds == 0 && reset.nanos == 0,
            left > 0,
            "{reset:?}"
        );
    }
    let r = svc.answer(&req).unwrap();
    assert_eq!(codes(&r), (OVER, vec![OVER]));
    let reset = r.statuses[0].duration_until_reset.unwrap();
    let wait = Duration::new(reset.seconds as u64, reset.nanos as u32);
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(1100),
        "{wait:?}"
    );
    // Another path is another client.
    assert_eq!(
        svc.answer(&request(vec![desc(&[("path", "/b")])]))
            .unwrap()
            .overall_code,
        OK
    );
    // Waiting that long admits one more.
    sim.advance(wait);
    assert_eq!(svc.answer(&req).unwrap().overall_code, OK);
}

#[test]
fn a_denied_request_spends_nothing_from_its_other_descriptors() {
    let (svc, sim) = service();
    let both = request(vec![desc(&[("user", "ann")]), desc(&[("tier", "small")])]);
    assert_eq!(codes(&svc.answer(&both).unwrap()), (OK, vec![OK, OK]));
    // `tier` (1 per hour) is out: the request is denied, `user` is not spent.
    for _ in 0..10 {
        let r = svc.answer(&both).unwrap();
        assert_eq!(codes(&r), (OVER, vec![OK, OVER]));
        assert_eq!(r.statuses[0].limit_remaining, 4);
    }
    let user = client_key("web", &[("user", "ann")]);
    let tier = client_key("web", &[("tier", "small")]);
    assert_eq!(sim.spent(), vec![(user, 1), (tier, 1)]);
    // `user` alone still has its 4.
    let alone = request(vec![desc(&[("user", "ann")])]);
    let lefts: Vec<u32> = (0..5)
        .map(|_| svc.answer(&alone).unwrap().statuses[0].limit_remaining)
        .collect();
    assert_eq!(lefts, [3, 2, 1, 0, 0]);
}

#[test]
fn two_descriptors_of_one_client_must_fit_together() {
    let (svc, sim) = service();
    let user = request(vec![desc(&[("user", "fay")])]);
    for _ in 0..4 {
        assert_eq!(svc.answer(&user).unwrap().overall_code, OK);
    }
    // One left: the same descriptor twice needs two, so neither is spent.
    let twice = request(vec![desc(&[("user", "fay")]), desc(&[("user", "fay")])]);
    let before = sim.spent().len();
    assert_eq!(
        codes(&svc.answer(&twice).unwrap()),
        (OVER, vec![OVER, OVER])
    );
    assert_eq!(sim.spent().len(), before, "nothing spent");
    assert_eq!(svc.answer(&user).unwrap().statuses[0].limit_remaining, 0);
}

#[test]
fn hits_addend_zero_means_one_and_a_descriptor_may_override_it() {
    let (svc, _) = service();
    let mut req = request(vec![desc(&[("user", "bo")])]);
    req.hits_addend = 0;
    assert_eq!(svc.answer(&req).unwrap().statuses[0].limit_remaining, 4);
    req.hits_addend = 3;
    assert_eq!(svc.answer(&req).unwrap().statuses[0].limit_remaining, 1);
    // 2 more do not fit in the 1 left: denied, nothing spent.
    req.hits_addend = 2;
    let r = svc.answer(&req).unwrap();
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OVER, 1));
    // The descriptor's own hits_addend wins over the request's.
    let mut d = desc(&[("user", "bo")]);
    d.hits_addend = Some(UInt64Value { value: 1 });
    req.descriptors = vec![d];
    let r = svc.answer(&req).unwrap();
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 0));
}

/// A descriptor's own `hits_addend: 0` spends nothing and asks whether its client has a hit
/// left: OVER_LIMIT once it has none, and then the request's other descriptors are not spent.
#[test]
fn a_descriptor_of_no_hits_is_a_probe() {
    let (svc, sim) = service();
    let mut probe = desc(&[("user", "fay")]);
    probe.hits_addend = Some(UInt64Value { value: 0 });
    let r = svc.answer(&request(vec![probe.clone()])).unwrap();
    assert_eq!(codes(&r), (OK, vec![OK]));
    assert_eq!(r.statuses[0].limit_remaining, 5, "nothing spent");
    let mut five = request(vec![desc(&[("user", "fay")])]);
    five.hits_addend = 5;
    assert_eq!(codes(&svc.answer(&five).unwrap()), (OK, vec![OK]));
    let r = svc.answer(&request(vec![probe.clone()])).unwrap();
    assert_eq!(codes(&r), (OVER, vec![OVER]), "none left");
    // Beside another descriptor: denied whole, the other not spent.
    let before = sim.spent().len();
    let r = svc
        .answer(&request(vec![desc(&[("path", "/z")]), probe.clone()]))
        .unwrap();
    assert_eq!(codes(&r), (OVER, vec![OK, OVER]));
    assert_eq!(sim.spent().len(), before);
    assert_eq!(r.statuses[0].limit_remaining, 3, "path not spent");
    // On the same client as a descriptor that spends: one left is not enough for both, and
    // both say so (as two descriptors on one client that fit alone but not together).
    let (svc, _) = service();
    let mut four = request(vec![desc(&[("user", "gus")])]);
    four.hits_addend = 4;
    svc.answer(&four).unwrap();
    let mut probe = desc(&[("user", "gus")]);
    probe.hits_addend = Some(UInt64Value { value: 0 });
    let r = svc
        .answer(&request(vec![desc(&[("user", "gus")]), probe]))
        .unwrap();
    assert_eq!(codes(&r), (OVER, vec![OVER, OVER]));
    assert_eq!(r.statuses[0].limit_remaining, 1, "the spend did not happen");
}

#[test]
fn a_request_limit_override_replaces_the_rule() {
    let (svc, _) = service();
    let mut d = desc(&[("nothing-configured", "x")]);
    d.limit = Some(RateLimitOverride {
        requests_per_unit: 2,
        unit: PbUnit::Minute as i32,
    });
    let req = request(vec![d]);
    let r = svc.answer(&req).unwrap();
    let limit = r.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.requests_per_unit, limit.unit),
        (2, PbUnit::Minute as i32)
    );
    assert_eq!(svc.answer(&req).unwrap().overall_code, OK);
    assert_eq!(svc.answer(&req).unwrap().overall_code, OVER);
}

#[test]
fn unlimited_unmatched_shadow_and_blocked_descriptors() {
    let (svc, sim) = service();
    let r = svc
        .answer(&request(vec![
            desc(&[("free", "x")]),
            desc(&[("unknown", "y")]),
        ]))
        .unwrap();
    assert_eq!(codes(&r), (OK, vec![OK, OK]));
    assert_eq!(r.statuses[0].limit_remaining, u32::MAX);
    assert!(r.statuses[1].current_limit.is_none());
    // Shadow mode: over its limit, still OK.
    let shadow = request(vec![desc(&[("shadow", "s")])]);
    for _ in 0..3 {
        assert_eq!(codes(&svc.answer(&shadow).unwrap()), (OK, vec![OK]));
    }
    // requests_per_unit 0: denied, and the other descriptor is not spent.
    let before = sim.spent().len();
    let r = svc
        .answer(&request(vec![
            desc(&[("user", "cy")]),
            desc(&[("banned", "b")]),
        ]))
        .unwrap();
    assert_eq!(codes(&r), (OVER, vec![OK, OVER]));
    assert_eq!(sim.spent().len(), before);
    assert_eq!(r.statuses[0].limit_remaining, 5);
}

/// A shadow descriptor on the same client as an enforced one never denies the request: the
/// enforced one needs only its own hits left, the shadow one is spent only if both fit.
#[test]
fn a_shadow_descriptor_on_an_enforced_ones_client_never_denies() {
    let (svc, sim) = service();
    // The address's policy: 2 a second; one spent alone leaves 1.
    let enforced = desc(&[("remote_address", "192.0.2.9")]);
    let shadow = desc(&[("masked_remote_address", "192.0.2.9/32")]);
    assert_eq!(
        codes(&svc.answer(&request(vec![enforced.clone()])).unwrap()),
        (OK, vec![OK])
    );
    // Both: 1 left, 2 asked. The enforced one fits and is spent; the shadow one is over (OK,
    // as shadow mode answers) and not spent. The request was OVER_LIMIT: the shadow's hits
    // were counted against the enforced descriptor.
    let before = sim.spent().len();
    let r = svc
        .answer(&request(vec![enforced.clone(), shadow.clone()]))
        .unwrap();
    assert_eq!(codes(&r), (OK, vec![OK, OK]));
    assert_eq!(
        sim.spent().len(),
        before + 1,
        "the enforced one spent alone"
    );
    assert_eq!(
        (r.statuses[0].limit_remaining, r.statuses[1].limit_remaining),
        (0, 0),
        "the shadow one has what the enforced one left"
    );
    // Counted as what it is: over its limit, let through by shadow mode (its own hit alone
    // fitted the read, but not beside the enforced one's).
    let shadow_counts = svc
        .store
        .hits()
        .snapshot()
        .series
        .into_iter()
        .find(|s| s.descriptor == "masked_remote_address")
        .map(|s| s.counts)
        .expect("counted");
    assert_eq!(
        (
            shadow_counts.over_limit,
            shadow_counts.shadow_mode,
            shadow_counts.within_limit
        ),
        (1, 1, 0)
    );
    // Now nothing left: the enforced one denies, nothing is spent.
    let before = sim.spent().len();
    let r = svc.answer(&request(vec![enforced, shadow])).unwrap();
    assert_eq!(codes(&r).0, OVER);
    assert_eq!(sim.spent().len(), before);
}

#[test]
fn a_remote_address_descriptor_is_the_address_client() {
    let (svc, sim) = service();
    let req = request(vec![desc(&[("remote_address", "192.0.2.7")])]);
    // The agent's policy for the address (2 per second in the simulation), not the rule's 100.
    let r = svc.answer(&req).unwrap();
    let limit = r.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.requests_per_unit, limit.unit),
        (2, PbUnit::Second as i32)
    );
    assert_eq!(svc.answer(&req).unwrap().overall_code, OK);
    assert_eq!(svc.answer(&req).unwrap().overall_code, OVER);
    let addr = crate::check::ClientId::Addr("192.0.2.7".parse().unwrap()).key();
    let seen = sim.seen.lock().unwrap();
    assert!(
        seen.iter()
            .all(|r| r.key == addr && r.flags & CHECK_NAMED == 0)
    );
    drop(seen);
    // Off: the address is a named client under the rule's limit.
    let (svc, sim) = service_with(
        Sim::new(false),
        RlsOptions {
            address_clients: false,
            ..RlsOptions::default()
        },
    );
    let r = svc.answer(&req).unwrap();
    assert_eq!(r.statuses[0].limit_remaining, 99);
    assert!(
        sim.seen
            .lock()
            .unwrap()
            .iter()
            .all(|r| r.flags & CHECK_NAMED != 0)
    );
    assert_eq!(
        address_of(&[("masked_remote_address", "10.1.2.0/24")]),
        Some("10.1.2.0".parse().unwrap())
    );
    assert_eq!(
        address_of(&[("remote_address", "::ffff:10.0.0.1")]),
        Some("10.0.0.1".parse().unwrap())
    );
    assert_eq!(address_of(&[("remote_address", "ff02::1")]), None);
    assert_eq!(
        address_of(&[("remote_address", "1.2.3.4"), ("path", "/")]),
        None
    );
}

#[test]
fn headers_and_body_when_asked_for() {
    let (svc, _) = service_with(
        Sim::new(false),
        RlsOptions {
            headers: true,
            deny_body: Some(b"slow down".to_vec()),
            ..RlsOptions::default()
        },
    );
    let req = request(vec![desc(&[("user", "di")]), desc(&[("path", "/x")])]);
    let headers = |r: &RateLimitResponse| -> Vec<(String, String)> {
        r.response_headers_to_add
            .iter()
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect()
    };
    let r = svc.answer(&req).unwrap();
    // The tighter descriptor (`path`: 2 of 3 left, against 4 of 5) is the one reported.
    assert_eq!(
        headers(&r),
        [
            ("RateLimit-Limit".to_string(), "3".to_string()),
            ("RateLimit-Remaining".to_string(), "2".to_string()),
            ("RateLimit-Reset".to_string(), "0".to_string()),
        ]
    );
    assert!(r.raw_body.is_empty());
    svc.answer(&req).unwrap();
    svc.answer(&req).unwrap();
    let r = svc.answer(&req).unwrap();
    assert_eq!(r.overall_code, OVER);
    let h = headers(&r);
    assert_eq!(h[1], ("RateLimit-Remaining".to_string(), "0".to_string()));
    // Whole seconds, rounded up, of the denied descriptor's wait (a second and the coarse
    // clock's tick here).
    let wait = r.statuses[1].duration_until_reset.unwrap();
    let seconds = (wait.seconds + i64::from(wait.nanos > 0)).to_string();
    assert!(seconds == "1" || seconds == "2", "{wait:?}");
    assert_eq!(h[2], ("RateLimit-Reset".to_string(), seconds.clone()));
    assert_eq!(h[3], ("Retry-After".to_string(), seconds));
    assert_eq!(r.raw_body, b"slow down");
}

/// A denial's headers describe a denied descriptor, with none left, even when another
/// descriptor has less left (as envoyproxy/ratelimit reports the over-limit one); its status
/// still says what fewer hits would find.
#[test]
fn a_denials_headers_are_the_denied_descriptors() {
    let (svc, _) = service_with(
        Sim::new(false),
        RlsOptions {
            headers: true,
            ..RlsOptions::default()
        },
    );
    let header_of = |r: &RateLimitResponse, key: &str| {
        r.response_headers_to_add
            .iter()
            .find(|h| h.key == key)
            .map(|h| h.value.clone())
    };
    // `path` 3 a second: 2 left after one hit. `user` 5 a minute: 4 hits of 5 spent, 1 left.
    svc.answer(&request(vec![desc(&[("path", "/y")])])).unwrap();
    let mut four = request(vec![desc(&[("user", "ed")])]);
    four.hits_addend = 4;
    svc.answer(&four).unwrap();
    // 2 hits on each: `path` fits (2 left), `user` does not (1 left): denied, by `user`.
    let mut req = request(vec![desc(&[("path", "/y")]), desc(&[("user", "ed")])]);
    req.hits_addend = 2;
    let r = svc.answer(&req).unwrap();
    assert_eq!(codes(&r), (OVER, vec![OK, OVER]));
    assert_eq!(
        r.statuses[1].limit_remaining, 1,
        "the status: one hit would fit"
    );
    assert_eq!(header_of(&r, "RateLimit-Limit").as_deref(), Some("5"));
    assert_eq!(header_of(&r, "RateLimit-Remaining").as_deref(), Some("0"));
    // One hit is left, so no wait for one hit measures when two would fit: no Retry-After
    // (not `Retry-After: 0`, which would ask for the same refusal at once).
    assert_eq!(header_of(&r, "Retry-After"), None);
    // Beside a descriptor that never admits, no Retry-After either, whatever the other waits.
    let mut one = request(vec![desc(&[("user", "ed")])]);
    one.hits_addend = 1;
    svc.answer(&one).unwrap();
    let r = svc
        .answer(&request(vec![
            desc(&[("user", "ed")]),
            desc(&[("banned", "x")]),
        ]))
        .unwrap();
    assert_eq!(codes(&r), (OVER, vec![OVER, OVER]));
    assert!(r.statuses[0].duration_until_reset.unwrap().seconds > 0);
    assert_eq!(header_of(&r, "Retry-After"), None);
    // Alone and out of hits: the wait for one.
    let r = svc.answer(&request(vec![desc(&[("user", "ed")])])).unwrap();
    assert_eq!(codes(&r), (OVER, vec![OVER]));
    let retry: u64 = header_of(&r, "Retry-After").unwrap().parse().unwrap();
    assert!(retry > 0, "{retry}");
    // Out of hits and asking two: the wait for one does not say when two fit.
    let mut two = request(vec![desc(&[("user", "ed")])]);
    two.hits_addend = 2;
    let r = svc.answer(&two).unwrap();
    assert_eq!(codes(&r), (OVER, vec![OVER]));
    assert_eq!(header_of(&r, "Retry-After"), None);
}

/// A descriptor of `requests_per_unit: 0` never admits: its denial carries no `Retry-After`
/// (no retry helps), and its quota's reset is the end of its unit, not now.
#[test]
fn a_blocked_descriptor_sends_no_retry_after() {
    let (svc, _) = service_with(
        Sim::new(false),
        RlsOptions {
            headers: true,
            ..RlsOptions::default()
        },
    );
    let r = svc
        .answer(&request(vec![desc(&[("banned", "b")])]))
        .unwrap();
    assert_eq!(codes(&r), (OVER, vec![OVER]));
    let wait = r.statuses[0].duration_until_reset.unwrap();
    assert_eq!((wait.seconds, wait.nanos), (1, 0), "its unit: a second");
    let keys: Vec<&str> = r
        .response_headers_to_add
        .iter()
        .map(|h| h.key.as_str())
        .collect();
    assert_eq!(
        keys,
        ["RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"]
    );
    assert_eq!(r.response_headers_to_add[2].value, "1");
}

#[test]
fn dry_run_reports_ok() {
    let (svc, _) = service_with(Sim::new(true), RlsOptions::default());
    let req = request(vec![desc(&[("tier", "small")]), desc(&[("user", "ed")])]);
    for _ in 0..3 {
        assert_eq!(codes(&svc.answer(&req).unwrap()), (OK, vec![OK, OK]));
    }
}

#[test]
fn bad_requests_name_the_field_and_failures_are_unavailable() {
    let (svc, sim) = service();
    let mut req = request(vec![desc(&[("user", "x")])]);
    req.domain.clear();
    let e = svc.answer(&req).unwrap_err();
    assert_eq!(e.code(), GrpcCode::InvalidArgument);
    assert!(e.message().starts_with("domain:"), "{}", e.message());
    let e = svc.answer(&request(vec![])).unwrap_err();
    assert_eq!(e.code(), GrpcCode::InvalidArgument);
    assert!(e.message().starts_with("descriptors:"), "{}", e.message());
    let e = svc.answer(&request(vec![desc(&[])])).unwrap_err();
    assert!(
        e.message().starts_with("descriptors[0].entries:"),
        "{}",
        e.message()
    );
    let mut negative = desc(&[("user", "x")]);
    negative.is_negative_hits = true;
    let e = svc
        .answer(&request(vec![desc(&[("user", "x")]), negative]))
        .unwrap_err();
    assert!(
        e.message().starts_with("descriptors[1].is_negative_hits:"),
        "{}",
        e.message()
    );
    let mut bad_unit = desc(&[("user", "x")]);
    bad_unit.limit = Some(RateLimitOverride {
        requests_per_unit: 1,
        unit: 0,
    });
    let e = svc.answer(&request(vec![bad_unit])).unwrap_err();
    assert!(
        e.message().starts_with("descriptors[0].limit.unit:"),
        "{}",
        e.message()
    );
    // Nothing was checked for any of them.
    assert!(sim.seen.lock().unwrap().is_empty());
    sim.fail.store(true, Ordering::SeqCst);
    let e = svc
        .answer(&request(vec![desc(&[("user", "x")])]))
        .unwrap_err();
    assert_eq!(e.code(), GrpcCode::Unavailable);
    // A request with no limited descriptor needs no check, and answers.
    assert_eq!(
        svc.answer(&request(vec![desc(&[("free", "x")])]))
            .unwrap()
            .overall_code,
        OK
    );
}

#[test]
fn client_keys_differ_by_domain_and_entries() {
    let a = client_key("d", &[("k", "v")]);
    assert_ne!(a, client_key("e", &[("k", "v")]));
    assert_ne!(a, client_key("d", &[("k", "w")]));
    assert_ne!(
        client_key("d", &[("ab", "c")]),
        client_key("d", &[("a", "bc")])
    );
    assert_eq!(a, client_key("d", &[("k", "v")]));
}

/// `--rls-scope global`: a rule's limit is the cluster's, and this agent enforces its share as
/// a global policy's cold share is (⌊L/N⌋; nothing while joining; `partition` while cut off). A
/// request's own override stays a local limit; `current_limit` stays the rule's.
#[test]
fn a_global_scope_enforces_this_agents_share_of_each_rule() {
    use crate::cluster::{
        config::Partition,
        membership::{Phase, ShareView},
    };
    let options = RlsOptions {
        address_clients: false,
        global: true,
        ..RlsOptions::default()
    };
    let (svc, sim) = service_with(Sim::new(false), options);
    let three = ShareView {
        members: 3,
        phase: Phase::Connected,
        partition: Partition::Share,
    };
    *sim.shares.lock().unwrap() = three;
    let ask = |addr: &str| {
        svc.answer(&request(vec![desc(&[("remote_address", addr)])]))
            .unwrap()
    };
    let r = ask("192.0.2.1");
    assert_eq!(r.statuses[0].limit_remaining, 32, "⌊100/3⌋ = 33, one spent");
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .map(|l| l.requests_per_unit),
        Some(100)
    );
    // Joining: nothing.
    *sim.shares.lock().unwrap() = ShareView::JOINING;
    assert_eq!(codes(&ask("192.0.2.2")), (OVER, vec![OVER]));
    // Cut off under `local`: the whole limit.
    *sim.shares.lock().unwrap() = ShareView {
        phase: Phase::CutOff,
        partition: Partition::Local,
        ..three
    };
    assert_eq!(ask("192.0.2.3").statuses[0].limit_remaining, 99);
    // A request's own limit is not the cluster's: local.
    *sim.shares.lock().unwrap() = three;
    let mut d = desc(&[("remote_address", "192.0.2.4")]);
    d.limit = Some(RateLimitOverride {
        requests_per_unit: 50,
        unit: PbUnit::Second as i32,
    });
    let r = svc.answer(&request(vec![d])).unwrap();
    assert_eq!(r.statuses[0].limit_remaining, 49);
    // The local scope (the default) ignores the share view.
    let (svc, sim) = service_with(
        Sim::new(false),
        RlsOptions {
            address_clients: false,
            ..RlsOptions::default()
        },
    );
    *sim.shares.lock().unwrap() = three;
    let r = svc
        .answer(&request(vec![desc(&[("remote_address", "192.0.2.5")])]))
        .unwrap();
    assert_eq!(r.statuses[0].limit_remaining, 99);
}

/// Under `--rls-scope global` each distinct limit of the rules (as enforced: a day's as its
/// hourly share) is one of the cluster's global limits, with a policy id of its own below the
/// local rules' that its descriptors' entries carry: how members name the limit to each other,
/// and how the checker tells a global client that grows hot. The ids come from the limits
/// themselves, so a reload that adds a rule leaves the others' as they were. A request's own
/// override, and the local scope, carry the local rules' id.
#[test]
fn a_global_scope_names_each_limit_of_the_rules_by_an_id_of_its_own() {
    let config = RlsConfig::parse(CONFIG).unwrap();
    // `banned` (0) and `free` (unlimited) are not limits; two rules of 100 a second are one.
    assert_eq!(
        config.limits,
        [
            (1, 1_000_000),
            (1, 3_600_000_000),
            (3, 1_000_000),
            (5, 60_000_000),
            (100, 1_000_000)
        ]
    );
    let policies: Vec<(u16, u32, u32)> = config
        .global_policies()
        .iter()
        .map(|g| (g.id, g.limit, g.window_us))
        .collect();
    let limits: Vec<(u32, u32)> = policies.iter().map(|&(_, l, w)| (l, w)).collect();
    assert_eq!(limits, config.limits);
    let mut ids: Vec<u16> = policies.iter().map(|&(id, ..)| id).collect();
    assert!(
        ids.iter()
            .all(|&id| usize::from(id) > crate::config::MAX_POLICIES && id < RLS_POLICY_ID),
        "{ids:?}"
    );
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 5, "one id per limit");
    let per_path = config.global_id(3, 1_000_000).unwrap();
    assert_eq!(config.global_id(4, 1_000_000), None, "no rule's limit");
    // A rule of a new limit added: the others keep their ids; the same rules, the same ids.
    let more = RlsConfig::parse(&format!(
        "{CONFIG}  - key: team\n    rate_limit: {{ unit: minute, requests_per_unit: 7 }}\n"
    ))
    .unwrap();
    assert_eq!(more.limits.len(), 6);
    for &(id, l, w) in &policies {
        assert_eq!(more.global_id(l, w), Some(id), "{l} per {w} µs");
    }
    assert_eq!(
        RlsConfig::parse(CONFIG).unwrap().global_policies(),
        config.global_policies()
    );

    let ids = |options: RlsOptions, overridden: bool| {
        let (svc, sim) = service_with(Sim::new(false), options);
        let mut path = desc(&[("path", "/a")]);
        if overridden {
            path.limit = Some(RateLimitOverride {
                requests_per_unit: 3,
                unit: PbUnit::Second as i32,
            });
        }
        svc.answer(&request(vec![path, desc(&[("user", "u")])]))
            .unwrap();
        let seen = sim.seen.lock().unwrap();
        let of = |entries: &[(&str, &str)]| {
            let key = client_key("web", entries);
            let mut ids: Vec<u16> = seen
                .iter()
                .filter(|r| r.key == key)
                .map(|r| r.policy.id)
                .collect();
            ids.dedup();
            ids
        };
        (of(&[("path", "/a")]), of(&[("user", "u")]))
    };
    let global = RlsOptions {
        address_clients: false,
        global: true,
        ..RlsOptions::default()
    };
    let per_user = config.global_id(5, 60_000_000).unwrap();
    assert_eq!(ids(global.clone(), false), (vec![per_path], vec![per_user]));
    assert_eq!(
        ids(global, true),
        (vec![RLS_POLICY_ID], vec![per_user]),
        "a request's own limit stays local"
    );
    assert_eq!(
        ids(RlsOptions::default(), false),
        (vec![RLS_POLICY_ID], vec![RLS_POLICY_ID])
    );
}

/// Rules with more distinct limits than there are global ids are refused under
/// `--rls-scope global` (at start, and on a reload, which keeps the config in force), naming
/// the count and the cap; the local scope takes them.
#[test]
fn a_global_scope_refuses_more_limits_than_it_has_ids_for() {
    let rules: String = (1..=1024)
        .map(|i| {
            format!("  - key: k{i}\n    rate_limit: {{ unit: second, requests_per_unit: {i} }}\n")
        })
        .collect();
    let dir = tempfile::Builder::new()
        .prefix("limiter-rls-global-")
        .tempdir()
        .unwrap();
    let path = dir.path().join("rls.yaml");
    std::fs::write(&path, format!("domain: web\ndescriptors:\n{rules}")).unwrap();
    let hits = || Arc::new(hits::RlsHits::new(10));
    let refused = RlsStore::load(path.clone(), hits(), true)
        .map(|_| ())
        .unwrap_err();
    assert_eq!(
        refused.to_string(),
        "--rls-scope global: the rules have 1024 distinct limits (requests_per_unit per unit, as \
         enforced), and at most 1023 can be global across the cluster"
    );
    let local = RlsStore::load(path.clone(), hits(), false).unwrap();
    assert!(
        local.global_policies().is_empty(),
        "local: none are the cluster's"
    );
    // A global store over 1023 of them, each with an id of its own; 1024 on a reload are
    // refused and the 1023 stay.
    let fewer: String = rules
        .lines()
        .take(2 * 1023)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, format!("domain: web\ndescriptors:\n{fewer}")).unwrap();
    let store = RlsStore::load(path.clone(), hits(), true).unwrap();
    let mut ids: Vec<u16> = store.global_policies().iter().map(|g| g.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 1023);
    std::fs::write(&path, format!("domain: web\ndescriptors:\n{rules}")).unwrap();
    assert!(store.reread(true).is_none(), "refused");
    assert_eq!(store.current().limits.len(), 1023);
}

/// A config whose global limits the maps refused stays out of force and is not read again at
/// every poll: only once its files change, on SIGHUP (`force`), or when its retry is due.
#[test]
fn a_config_the_maps_refused_is_read_again_when_it_changes_on_sighup_or_when_due() {
    let dir = tempfile::Builder::new()
        .prefix("limiter-rls-refused-")
        .tempdir()
        .unwrap();
    let path = dir.path().join("rls.yaml");
    let config = |per_second: u32| {
        format!(
            "domain: web\ndescriptors:\n  - key: k\n    rate_limit: {{ unit: second, \
             requests_per_unit: {per_second} }}\n"
        )
    };
    std::fs::write(&path, config(5)).unwrap();
    let store = RlsStore::load(path.clone(), Arc::new(hits::RlsHits::new(10)), true).unwrap();
    let limits = |store: &RlsStore| store.current().limits.clone();
    let before = limits(&store);
    std::fs::write(&path, config(6)).unwrap();
    let later = std::time::Instant::now() + Duration::from_secs(3600);
    let reread = store.reread(false).expect("changed files are read");
    assert!(reread.fingerprint().is_some(), "settled while read");
    store.refused(reread.fingerprint(), later);
    assert!(
        store.reread(false).is_none(),
        "the same files are not read again at the next poll"
    );
    assert_eq!(limits(&store), before, "the config in force stays");
    let again = store.reread(true).expect("SIGHUP reads them again");
    store.refused(again.fingerprint(), std::time::Instant::now());
    let due = store
        .reread(false)
        .expect("read again once the retry is due");
    store.refused(due.fingerprint(), later);
    assert!(
        store.reread(false).is_none(),
        "and not again before the next"
    );
    std::fs::write(&path, config(7)).unwrap();
    let changed = store.reread(false).expect("files changed since are read");
    store.install(changed);
    assert_ne!(
        limits(&store),
        before,
        "and put in force once the maps take them"
    );
    assert!(store.reread(false).is_none(), "then not read again");
}

/// Each limited descriptor's hits are counted in its rule's series as its status says:
/// within or over the limit, near it, let through by shadow mode; in a refused request the
/// descriptor that fitted counts within (nothing spent), and a descriptor no rule limits is not
/// counted.
#[test]
fn hits_are_counted_per_rule() {
    let (svc, _sim) = service();
    let counts = |descriptor: &str| {
        svc.store
            .hits()
            .snapshot()
            .series
            .into_iter()
            .find(|s| s.domain == "web" && s.descriptor == descriptor)
            .map(|s| s.counts)
    };
    let expect = |within_limit, over_limit, near_limit, shadow_mode| {
        Some(hits::Counts {
            within_limit,
            over_limit,
            near_limit,
            shadow_mode,
        })
    };
    // path: 3 a second, the 3rd above ⌊0.8 × 3⌋ = 2.
    for _ in 0..4 {
        svc.answer(&request(vec![desc(&[("path", "/a")])])).unwrap();
    }
    assert_eq!(counts("path"), expect(3, 1, 1, 0));
    // shadow: 1 a second, in shadow mode: answered OK, the second over (and the first near:
    // ⌊0.8 × 1⌋ = 0, as in envoyproxy/ratelimit).
    for _ in 0..2 {
        let r = svc
            .answer(&request(vec![desc(&[("shadow", "x")])]))
            .unwrap();
        assert_eq!(r.overall_code, OK);
    }
    assert_eq!(counts("shadow"), expect(1, 1, 1, 1));
    // banned (0): over without a check. The request is refused and nothing spent; user, which
    // fitted, is counted as its status says (within).
    let r = svc
        .answer(&request(vec![
            desc(&[("user", "u")]),
            desc(&[("banned", "b")]),
        ]))
        .unwrap();
    assert_eq!(codes(&r), (OVER, vec![OK, OVER]));
    assert_eq!(counts("banned"), expect(0, 1, 0, 0));
    assert_eq!(counts("user"), expect(1, 0, 0, 0));
    // Unlimited and unmatched descriptors are not counted.
    svc.answer(&request(vec![
        desc(&[("free", "f")]),
        desc(&[("nope", "n")]),
    ]))
    .unwrap();
    assert_eq!(counts("free"), None);
    assert_eq!(counts("nope"), None);
}

/// Every read and spend runs under the locks of the request's clients, on each path: one
/// check, all or none, and read then spend (shadow, blocked), refused or not; so no other call
/// of the service spends from a client between a request's read and its spend.
#[test]
fn every_check_is_decided_under_its_clients_lock() {
    let (svc, sim) = service();
    *sim.locks.lock().unwrap() = Some(svc.locks.clone());
    let requests = [
        vec![desc(&[("path", "/a")])],
        vec![desc(&[("path", "/a")]), desc(&[("user", "u")])],
        vec![
            desc(&[("path", "/b")]),
            desc(&[("remote_address", "192.0.2.5")]),
        ],
        vec![desc(&[("path", "/a")]), desc(&[("shadow", "s")])],
        vec![desc(&[("user", "v")]), desc(&[("banned", "b")])],
    ];
    for _ in 0..5 {
        for descriptors in &requests {
            svc.answer(&request(descriptors.clone())).unwrap();
        }
    }
    assert!(
        sim.spent().len() > 10,
        "the requests were read and spent: {:?}",
        sim.spent()
    );
    assert_eq!(sim.unlocked.load(Ordering::SeqCst), 0);
    // The detector sees a check decided outside the service.
    sim.decide(&[named_request([3; 16], 1, sim.address_policy)])
        .unwrap();
    assert_eq!(sim.unlocked.load(Ordering::SeqCst), 1);
}

/// A serving thread's copy of the service shares the original's client locks (all or nothing
/// across threads needs them: with locks of its own, two threads could read and spend one client
/// at once) and its budget, and counts the calls it answers in its own counter.
#[test]
fn a_threads_copy_shares_the_client_locks_and_counts_its_calls() {
    let (svc, sim) = service();
    let calls = Arc::new(AtomicU64::new(0));
    let copy = svc.counting_calls(Arc::clone(&calls));
    assert!(svc.locks.same(&copy.locks));
    assert!(Arc::ptr_eq(&svc.budget, &copy.budget));
    let held = copy.locks.lock(7).expect("lock");
    assert!(svc.locks.lock(7).is_err(), "the lock is one");
    drop(held);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let req = request(vec![desc(&[("path", "/a")])]);
    for _ in 0..3 {
        runtime
            .block_on(copy.should_rate_limit(Request::new(req.clone())))
            .expect("answered");
    }
    // An invalid call counts too: it was answered.
    let _ = runtime.block_on(copy.should_rate_limit(Request::new(request(Vec::new()))));
    assert_eq!(calls.load(Ordering::Relaxed), 4);
    // The original counts nothing, and the copy spent the budget both see.
    let r = svc.answer(&req).expect("answered");
    assert_eq!(
        codes(&r),
        (OVER, vec![OVER]),
        "3 of /a's 3 spent through the copy"
    );
    drop(sim);
}

/// The service's reads before a spend count the hits a short client was asked for (its
/// `dropped`, which a cluster member reports as demand) when they decide the request: beside a
/// shadow descriptor, in dry-run mode; not when a blocked descriptor refuses the request
/// whatever they find. (All enforced, the budget decides all or none itself, and its read of
/// more than 15 descriptors counts: prog_test_run's all-or-none test.)
#[test]
fn reads_count_refused_hits_unless_a_blocked_descriptor_refuses_the_request() {
    let (svc, sim) = service();
    let reads = |sim: &Sim| std::mem::take(&mut *sim.reads.lock().unwrap());
    svc.answer(&request(vec![
        desc(&[("path", "/a")]),
        desc(&[("shadow", "s")]),
    ]))
    .unwrap();
    assert_eq!(reads(&sim), vec![true], "beside a shadow descriptor");
    svc.answer(&request(vec![
        desc(&[("path", "/a")]),
        desc(&[("banned", "b")]),
    ]))
    .unwrap();
    assert_eq!(reads(&sim), vec![false], "beside a blocked descriptor");
    let (svc, sim) = service_with(Sim::new(true), RlsOptions::default());
    svc.answer(&request(vec![
        desc(&[("path", "/a")]),
        desc(&[("user", "u")]),
    ]))
    .unwrap();
    assert_eq!(reads(&sim), vec![true], "dry-run mode");
}

/// A request whose descriptors are all enforced is decided all or none by the budget (one
/// program run on the agent); one with a shadow descriptor, a blocked one, a single check, or
/// in dry-run mode takes the service's read and spend of what fits.
#[test]
fn enforced_requests_are_decided_all_or_none_by_the_budget() {
    let (svc, sim) = service();
    let calls = || sim.all_or_none.load(Ordering::SeqCst);
    let both = request(vec![desc(&[("path", "/a")]), desc(&[("user", "u")])]);
    assert_eq!(codes(&svc.answer(&both).unwrap()), (OK, vec![OK, OK]));
    assert_eq!(calls(), 1);
    for other in [
        request(vec![desc(&[("path", "/a")]), desc(&[("shadow", "s")])]),
        request(vec![desc(&[("path", "/a")]), desc(&[("banned", "b")])]),
        request(vec![desc(&[("path", "/a")])]),
    ] {
        svc.answer(&other).unwrap();
    }
    assert_eq!(calls(), 1);
    let (svc, sim) = service_with(Sim::new(true), RlsOptions::default());
    svc.answer(&both).unwrap();
    assert_eq!(sim.all_or_none.load(Ordering::SeqCst), 0, "dry-run mode");
}

/// envoyproxy/ratelimit's newer keys: `share_threshold`, `quota_mode`, `value_to_metric`,
/// `metadata`.
const NEWER: &str = "domain: web
descriptors:
  - key: file
    value: \"docs/*\"
    share_threshold: true
    value_to_metric: true
    rate_limit: { unit: second, requests_per_unit: 2 }
  - key: file
    value: \"img/*\"
    rate_limit: { unit: second, requests_per_unit: 2 }
  - key: bucket
    value: \"b*\"
    share_threshold: true
    descriptors:
      - key: user
        rate_limit: { unit: second, requests_per_unit: 1 }
  - key: service_1
    quota_mode: true
    metadata: { route: { name: one }, weight: 1 }
    rate_limit: { unit: second, requests_per_unit: 1 }
  - key: service_2
    quota_mode: true
    metadata: { route: { name: two, extra: x } }
    rate_limit: { unit: second, requests_per_unit: 2 }
  - key: closed
    quota_mode: true
    rate_limit: { unit: second, requests_per_unit: 0 }
  - key: soft
    quota_mode: true
    shadow_mode: true
    rate_limit: { unit: second, requests_per_unit: 1 }
  - key: per_minute
    quota_mode: true
    rate_limit: { unit: minute, requests_per_unit: 1 }
  - key: pool
    value: \"q*\"
    quota_mode: true
    share_threshold: true
    rate_limit: { unit: second, requests_per_unit: 1 }
  - key: path
    rate_limit: { unit: second, requests_per_unit: 5 }
  - key: method
    value_to_metric: true
    rate_limit: { unit: second, requests_per_unit: 5 }
";

fn newer(options: RlsOptions) -> RlsService<Sim> {
    service_of(NEWER, Sim::new(false), options).0
}

fn admitted(svc: &RlsService<Sim>, entries: &[(&str, &str)], n: usize) -> usize {
    let req = request(vec![desc(entries)]);
    (0..n)
        .filter(|_| svc.answer(&req).unwrap().overall_code == OK)
        .count()
}

/// `share_threshold`: every value its wildcard matches spends one budget, also when the limit
/// is on a rule nested below the wildcard; without it each value has its own.
#[test]
fn a_share_threshold_wildcard_is_one_client_for_all_its_values() {
    let svc = newer(RlsOptions::default());
    assert_eq!(admitted(&svc, &[("file", "docs/a.pdf")], 1), 1);
    assert_eq!(
        admitted(&svc, &[("file", "docs/b.csv")], 3),
        1,
        "2 for all of docs/*"
    );
    assert_eq!(admitted(&svc, &[("file", "img/a.png")], 3), 2);
    assert_eq!(
        admitted(&svc, &[("file", "img/b.png")], 3),
        2,
        "2 for each of img/*"
    );
    // Nested: the bucket entry is shared, the user entry is not.
    assert_eq!(admitted(&svc, &[("bucket", "b1"), ("user", "u")], 1), 1);
    assert_eq!(admitted(&svc, &[("bucket", "b2"), ("user", "u")], 1), 0);
    assert_eq!(admitted(&svc, &[("bucket", "b2"), ("user", "v")], 1), 1);
}

/// `quota_mode`: a quota descriptor over its limit denies the request only when every quota
/// descriptor of it is over (its status says OVER_LIMIT either way); an admitted request spends
/// the quotas that had room; an enforced descriptor over its limit denies as ever, spending
/// nothing.
#[test]
fn quota_descriptors_deny_only_together() {
    let svc = newer(RlsOptions {
        headers: true,
        ..RlsOptions::default()
    });
    let both = request(vec![
        desc(&[("service_1", "a")]),
        desc(&[("service_2", "a")]),
    ]);
    let r = svc.answer(&both).unwrap();
    assert_eq!(codes(&r), (OK, vec![OK, OK]));
    assert_eq!(
        (r.statuses[0].limit_remaining, r.statuses[1].limit_remaining),
        (0, 1)
    );
    // service_1 is out, service_2 has room: admitted, service_2 spent.
    let r = svc.answer(&both).unwrap();
    assert_eq!(codes(&r), (OK, vec![OVER, OK]));
    assert_eq!(r.statuses[1].limit_remaining, 0);
    // The headers are not those of the quota that was out.
    assert!(
        r.response_headers_to_add
            .iter()
            .all(|h| h.key != "Retry-After"),
        "{:?}",
        r.response_headers_to_add
    );
    // Both out: denied, with a Retry-After.
    let r = svc.answer(&both).unwrap();
    assert_eq!(codes(&r), (OVER, vec![OVER, OVER]));
    assert!(
        r.response_headers_to_add
            .iter()
            .any(|h| h.key == "Retry-After"),
        "{:?}",
        r.response_headers_to_add
    );
    // One quota alone denies as any limit does; a blocked one (0) is a quota that is out.
    let one = request(vec![desc(&[("service_1", "b")])]);
    assert_eq!(codes(&svc.answer(&one).unwrap()), (OK, vec![OK]));
    assert_eq!(codes(&svc.answer(&one).unwrap()), (OVER, vec![OVER]));
    let closed = request(vec![desc(&[("service_2", "c")]), desc(&[("closed", "c")])]);
    assert_eq!(codes(&svc.answer(&closed).unwrap()), (OK, vec![OK, OVER]));
    let only_closed = request(vec![desc(&[("path", "/q")]), desc(&[("closed", "c")])]);
    assert_eq!(
        codes(&svc.answer(&only_closed).unwrap()),
        (OVER, vec![OK, OVER])
    );
    // An enforced descriptor over its limit denies whatever the quotas say; nothing is spent.
    let path = request(vec![desc(&[("path", "/p")])]);
    for _ in 0..5 {
        assert_eq!(svc.answer(&path).unwrap().overall_code, OK);
    }
    let with_quota = request(vec![desc(&[("path", "/p")]), desc(&[("service_2", "d")])]);
    assert_eq!(
        codes(&svc.answer(&with_quota).unwrap()),
        (OVER, vec![OVER, OK])
    );
    assert_eq!(admitted(&svc, &[("service_2", "d")], 3), 2, "nothing spent");
    assert_eq!(admitted(&svc, &[("path", "/q")], 6), 5, "nothing spent");
}

/// `--rls-dynamic-metadata`: the request's domain, descriptors and hits, and the `metadata` of
/// the rules whose descriptors passed, merged in request order.
#[test]
fn dynamic_metadata_carries_the_passed_rules_metadata() {
    use envoy_types::pb::google::protobuf::{Struct, value::Kind};
    let svc = newer(RlsOptions {
        dynamic_metadata: true,
        ..RlsOptions::default()
    });
    fn field(s: &Struct, path: &[&str]) -> Option<Kind> {
        let (first, rest) = path.split_first()?;
        let kind = s.fields.get(*first)?.kind.clone()?;
        match kind {
            _ if rest.is_empty() => Some(kind),
            Kind::StructValue(next) => field(&next, rest),
            _ => None,
        }
    }
    let text = |v: &str| Some(Kind::StringValue(v.to_string()));
    let mut both = request(vec![
        desc(&[("service_1", "a")]),
        desc(&[("service_2", "a")]),
    ]);
    both.hits_addend = 1;
    let r = svc.answer(&both).unwrap();
    let m = r.dynamic_metadata.expect("dynamic metadata");
    assert_eq!(field(&m, &["domain"]), text("web"));
    assert_eq!(field(&m, &["hitsAddend"]), Some(Kind::NumberValue(1.0)));
    let Some(Kind::ListValue(descriptors)) = field(&m, &["descriptors"]) else {
        panic!("descriptors: {m:?}");
    };
    let Some(Kind::StructValue(first)) = &descriptors.values[0].kind else {
        panic!("a descriptor");
    };
    let Some(Kind::ListValue(entries)) = field(first, &["entries"]) else {
        panic!("entries");
    };
    assert_eq!(entries.values[0].kind, text("service_1=a"));
    // Both passed: service_1's metadata first, service_2's adds what it lacks.
    assert_eq!(field(&m, &["metadata", "route", "name"]), text("one"));
    assert_eq!(field(&m, &["metadata", "route", "extra"]), text("x"));
    assert_eq!(
        field(&m, &["metadata", "weight"]),
        Some(Kind::NumberValue(1.0))
    );
    // service_1 is out: service_2's alone.
    let m = svc.answer(&both).unwrap().dynamic_metadata.unwrap();
    assert_eq!(field(&m, &["metadata", "route", "name"]), text("two"));
    assert_eq!(field(&m, &["metadata", "weight"]), None);
    // Without the option, none.
    let plain = newer(RlsOptions::default());
    assert!(plain.answer(&both).unwrap().dynamic_metadata.is_none());
}

/// `value_to_metric`: a rule matched by its key alone (or a wildcard) counts under the
/// request's value; a `share_threshold` wildcard under its own text.
#[test]
fn value_to_metric_names_series_by_the_request_values() {
    let svc = newer(RlsOptions::default());
    for (key, value) in [
        ("method", "GET"),
        ("method", "GET"),
        ("method", "POST"),
        ("path", "/a"),
        ("file", "docs/x"),
        ("file", "docs/y"),
    ] {
        svc.answer(&request(vec![desc(&[(key, value)])])).unwrap();
    }
    let series: Vec<(String, u64)> = svc
        .store
        .hits()
        .snapshot()
        .series
        .into_iter()
        .map(|s| (s.descriptor, s.counts.total_hits()))
        .filter(|(_, hits)| *hits > 0)
        .collect();
    assert_eq!(
        series,
        [
            ("file_docs/*".to_string(), 2),
            ("method_GET".to_string(), 2),
            ("method_POST".to_string(), 1),
            ("path".to_string(), 1),
        ]
    );
}

/// Quota descriptors beside enforced, shadow and blocked ones, in dry-run mode, and on one
/// shared client; and the headers they give.
#[test]
fn quota_descriptors_among_others() {
    let header = |r: &RateLimitResponse, name: &str| {
        r.response_headers_to_add
            .iter()
            .find(|h| h.key == name)
            .map(|h| h.value.clone())
    };
    let svc = newer(RlsOptions {
        headers: true,
        ..RlsOptions::default()
    });
    // An enforced descriptor that fits beside quotas that are all out: denied, nothing spent.
    assert_eq!(admitted(&svc, &[("service_1", "e")], 1), 1);
    let req = request(vec![desc(&[("path", "/e")]), desc(&[("service_1", "e")])]);
    assert_eq!(codes(&svc.answer(&req).unwrap()), (OVER, vec![OK, OVER]));
    assert_eq!(admitted(&svc, &[("path", "/e")], 6), 5, "nothing spent");
    // A quota in shadow mode is never out, so the quotas never deny (as envoyproxy/ratelimit
    // counts it): its statuses say OK.
    let req = request(vec![desc(&[("soft", "s")]), desc(&[("service_1", "e")])]);
    for _ in 0..3 {
        assert_eq!(codes(&svc.answer(&req).unwrap()), (OK, vec![OK, OVER]));
    }
    // The quotas' Retry-After is the shortest wait among them: per_minute is out for about a
    // minute, service_1 for about a second.
    assert_eq!(admitted(&svc, &[("per_minute", "w")], 1), 1);
    let req = request(vec![
        desc(&[("per_minute", "w")]),
        desc(&[("service_1", "e")]),
    ]);
    let r = svc.answer(&req).unwrap();
    assert_eq!(codes(&r), (OVER, vec![OVER, OVER]));
    let retry: u64 = header(&r, "Retry-After")
        .expect("a Retry-After")
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{r:?}");
    // Admitted with one quota out: the headers are the quota with room's.
    let req = request(vec![
        desc(&[("service_1", "e")]),
        desc(&[("service_2", "h")]),
    ]);
    let r = svc.answer(&req).unwrap();
    assert_eq!(codes(&r), (OK, vec![OVER, OK]));
    assert_eq!(header(&r, "RateLimit-Limit").as_deref(), Some("2"));
    assert_eq!(header(&r, "RateLimit-Remaining").as_deref(), Some("1"));
    // Two quotas on one shared client with one hit left: one is spent, the request admitted.
    let req = request(vec![desc(&[("pool", "q1")]), desc(&[("pool", "q2")])]);
    assert_eq!(codes(&svc.answer(&req).unwrap()), (OK, vec![OK, OVER]));
    assert_eq!(codes(&svc.answer(&req).unwrap()), (OVER, vec![OVER, OVER]));
    // A probe (no hits) beside a quota that takes its client's last hit: over, whichever
    // comes first.
    let mut probe = desc(&[("pool", "q4")]);
    probe.hits_addend = Some(UInt64Value { value: 0 });
    for req in [
        request(vec![desc(&[("pool", "q5")]), probe.clone()]),
        request(vec![probe.clone(), desc(&[("pool", "q5")])]),
    ] {
        let (svc, sim) = service_of(NEWER, Sim::new(false), RlsOptions::default());
        let r = svc.answer(&req).unwrap();
        let (overall, statuses) = codes(&r);
        assert_eq!(overall, OK, "{r:?}");
        assert_eq!(statuses.iter().filter(|&&c| c == OVER).count(), 1, "{r:?}");
        assert_eq!(sim.spent().len(), 1, "the quota with hits spent");
    }
    // A quota out beside a blocked one: every quota out, denied.
    assert_eq!(admitted(&svc, &[("service_2", "z")], 2), 2);
    let req = request(vec![desc(&[("service_2", "z")]), desc(&[("closed", "z")])]);
    assert_eq!(codes(&svc.answer(&req).unwrap()), (OVER, vec![OVER, OVER]));
}

/// Dry-run mode never denies for quotas, blocked ones included, and spends what it would
/// spend if they were not there.
#[test]
fn dry_run_quotas_report_ok() {
    let (svc, _) = service_of(NEWER, Sim::new(true), RlsOptions::default());
    let beside_blocked = request(vec![desc(&[("path", "/d")]), desc(&[("closed", "d")])]);
    let lefts: Vec<u32> = (0..3)
        .map(|_| svc.answer(&beside_blocked).unwrap().statuses[0].limit_remaining)
        .collect();
    assert_eq!(lefts, [4, 3, 2], "path is spent");
    for req in [
        request(vec![desc(&[("closed", "c")])]),
        request(vec![desc(&[("path", "/q")]), desc(&[("closed", "c")])]),
        request(vec![
            desc(&[("service_1", "a")]),
            desc(&[("service_2", "a")]),
        ]),
    ] {
        for _ in 0..4 {
            let r = svc.answer(&req).unwrap();
            assert_eq!(r.overall_code, OK, "{r:?}");
            assert!(r.statuses.iter().all(|s| s.code == OK), "{r:?}");
        }
    }
}
