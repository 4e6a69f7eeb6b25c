//! API callers and what each may spend: a rate limit on calls (a CheckBatch counting one call per
//! check) and a cap on the client entries its checks may create in the packet path's map, both
//! per caller. A TCP caller is its role and its certificate subject (mutual TLS) or, without one,
//! its role and peer IP address (not the port: a new connection is the same caller). The Unix
//! socket (mode 0600, root only) is exempt from both.
//!
//! The call limit is `governor`'s keyed GCRA limiter (the crate the API benchmark's floor server
//! uses): exact to the nanosecond, a few atomic operations per call, no timer task. The
//! new-client cap is the same algorithm on the same clock, in [`Holds`]: it can also hold tokens
//! for a call and give back the ones the call did not use, which `governor` cannot, so that a
//! call whose addresses could all be new and still fit is checked at once, without first reading
//! each address to count the new ones. Keys idle long enough to be back at a full bucket are
//! pruned every [`PRUNE_EVERY`] charges.

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    num::NonZeroU32,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock, Reference as _},
    middleware::NoOpMiddleware,
    state::keyed::DashMapStateStore,
};
use tonic::Status;

use super::{auth::Role, convert::check_status};
use crate::check::{Checker, ClientId, Decision, entry_candidates};

/// A request's caller, put in its extensions by the access layer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    /// The Unix socket: admin, not limited per caller.
    Unix,
    Tcp(CallerKey),
}

impl Caller {
    /// The caller of a request that went through the access layer.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::internal("the request has no caller (no access layer)"))
    }
}

/// One TCP caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallerKey {
    pub role: Role,
    pub who: Who,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Who {
    /// The certificate subject (mutual TLS).
    Subject(Arc<str>),
    /// The peer's IPv4 address, or its IPv6 /64 (see [`Who::peer`]).
    Addr(IpAddr),
    /// A TCP connection without a peer address (never seen in practice).
    Unknown,
}

impl Who {
    /// The caller a peer address is: its IPv4 address (an IPv4-mapped IPv6 peer included), or
    /// the /64 of an IPv6 one, as the connection caps count sources (`admission`). A host
    /// usually holds a whole /64: keyed by address, each of its 2^64 addresses would get a
    /// bucket of its own, and a caller could escape its rate and its new-client cap by
    /// connecting from a new address.
    pub fn peer(ip: IpAddr) -> Who {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Who::Addr(IpAddr::V6(prefix.into()))
            }
            v4 => Who::Addr(v4),
        }
    }
}

impl fmt::Display for CallerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.who {
            Who::Subject(s) => write!(f, "{} caller {s:?}", self.role),
            Who::Addr(a @ IpAddr::V4(_)) => write!(f, "{} caller {a}", self.role),
            Who::Addr(a) => write!(f, "{} caller {a}/64", self.role),
            Who::Unknown => write!(f, "{} caller (no peer address)", self.role),
        }
    }
}

/// A rate: `per_second` tokens refilled per second, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Rate {
    fn quota(self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }
}

/// Default `--api-caller-rate`: calls per second per TCP caller (a CheckBatch counts its checks).
pub const DEFAULT_CALLER_RATE: u32 = 50_000;
/// Default `--api-new-clients-per-second`: client entries one TCP caller's checks may create
/// per second (a map of a million clients then takes 1000 s to cycle).
pub const DEFAULT_NEW_CLIENTS_PER_SECOND: u32 = 1_000;
/// Keys idle long enough to be back at a full bucket are dropped every this many charges.
const PRUNE_EVERY: u64 = 1 << 14;

type Keyed<C> =
    RateLimiter<CallerKey, DashMapStateStore<CallerKey>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One keyed limit and what it is called in answers.
struct Limit<C: Clock> {
    limiter: Keyed<C>,
    rate: Rate,
}

/// A keyed GCRA limit, as `governor`'s (the same quota and clock), whose tokens can also be
/// held for a call and partly given back ([`Holds::give_back`]).
///
/// Giving back is exact: the bucket ends as if the hold had taken only what the call used. GCRA
/// keeps one time per caller, its theoretical arrival time `tat`, and a take of cost `c` at
/// `now` sets `tat ← max(tat, now) + c`. Unrolled, `tat` is the largest of `tat₀ + Σc` and, for
/// every take `i`, `tᵢ + Σ_{j≥i} cⱼ`: taking `r` less at a hold lowers the terms that start at
/// or before it by `r` and leaves the later ones, so the bucket becomes `max(tat − r, floor)`,
/// where `floor` is the largest of the later terms (a take that found the bucket full after the
/// hold makes it `tat` itself, and nothing comes back: the full bucket already had the tokens,
/// and never holds more than its burst). Each open hold keeps its `floor`, updated by every
/// later take (`floor ← max(floor, now) + c`) and by the give-back of a later hold.
struct Holds<C: Clock> {
    rate: Rate,
    /// Nanoseconds per token (GCRA's emission interval); the bucket holds `rate.burst` of them.
    interval: u64,
    clock: C,
    start: C::Instant,
    buckets: Mutex<HashMap<CallerKey, Bucket>>,
    /// Numbers the holds, in the order they were taken.
    next_hold: AtomicU64,
}

/// One caller's bucket. Times are nanoseconds after [`Holds::start`].
#[derive(Debug, Clone)]
struct Bucket {
    /// The theoretical arrival time: the bucket is full at or before it.
    tat: u64,
    /// The holds not given back yet, oldest first: (number, floor).
    open: Vec<(u64, u64)>,
}

/// Tokens [`CallerLimits::hold_new_clients`] held for a call.
#[derive(Debug, Clone, Copy)]
pub struct NewClientHold {
    tokens: u32,
    /// Its number in [`Holds::next_hold`]'s order.
    id: u64,
}

impl<C: Clock> Holds<C> {
    fn new(rate: Rate, clock: C) -> Self {
        let per_token = Duration::from_secs(1) / rate.per_second.get();
        Holds {
            rate,
            // At least 1 ns, as governor: above 10^9 a second the division gives 0.
            interval: u64::try_from(per_token.as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
            start: clock.now(),
            clock,
            buckets: Mutex::new(HashMap::new()),
            next_hold: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.clock.now().duration_since(self.start).as_u64()
    }

    /// Takes `n` tokens from `caller`'s bucket, to hold them if `hold` (returns the hold's
    /// number). `Err(Some(wait))`: not there until `wait` from now; `Err(None)`: `n` exceeds the
    /// burst. Nothing is taken on an error.
    fn take(
        &self,
        caller: &CallerKey,
        n: NonZeroU32,
        hold: bool,
    ) -> Result<Option<u64>, Option<Duration>> {
        if n > self.rate.burst {
            return Err(None);
        }
        let now = self.now();
        let cost = self.interval.saturating_mul(u64::from(n.get()));
        let tolerance = self
            .interval
            .saturating_mul(u64::from(self.rate.burst.get()));
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let tat = buckets.get(caller).map_or(now, |b| b.tat.max(now));
        let after = tat.saturating_add(cost);
        if after - now > tolerance {
            return Err(Some(Duration::from_nanos(after - now - tolerance)));
        }
        let bucket = match buckets.get_mut(caller) {
            Some(b) => b,
            None => buckets.entry(caller.clone()).or_insert(Bucket {
                tat: now,
                open: Vec::new(),
            }),
        };
        bucket.tat = after;
        for (_, floor) in &mut bucket.open {
            *floor = (*floor).max(now).saturating_add(cost);
        }
        let id = hold.then(|| self.next_hold.fetch_add(1, Ordering::Relaxed));
        if let Some(id) = id {
            bucket.open.push((id, 0));
        }
        Ok(id)
    }

    /// Ends hold `id` of `caller`, giving `n` of its tokens back (see the type's docs).
    fn give_back(&self, caller: &CallerKey, id: u64, n: u32) {
        let refund = self.interval.saturating_mul(u64::from(n));
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        // Gone: pruned with a full bucket, which already had the tokens.
        let Some(bucket) = buckets.get_mut(caller) else {
            return;
        };
        let Some(at) = bucket.open.iter().position(|&(open, _)| open == id) else {
            return;
        };
        let (_, floor) = bucket.open.remove(at);
        bucket.tat = bucket.tat.saturating_sub(refund).max(floor);
        // The older holds' floors counted this one's tokens in full.
        for (_, older) in &mut bucket.open[..at] {
            *older = older.saturating_sub(refund).max(floor);
        }
    }

    /// Drops the callers whose bucket is full again.
    fn prune(&self) {
        let now = self.now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        // A full bucket's open holds have nothing to give back.
        buckets.retain(|_, b| b.tat > now);
        buckets.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// The per-caller limits of the TCP API (see the module docs). `None` limits are off.
pub struct CallerLimits<C: Clock = DefaultClock> {
    calls: Option<Limit<C>>,
    new_clients: Option<Holds<C>>,
    charges: AtomicU64,
}

impl CallerLimits<DefaultClock> {
    pub fn new(calls: Option<Rate>, new_clients: Option<Rate>) -> CallerLimits<DefaultClock> {
        CallerLimits::with_clock(calls, new_clients, &DefaultClock::default())
    }
}

impl<C: Clock + Clone> CallerLimits<C> {
    pub fn with_clock(calls: Option<Rate>, new_clients: Option<Rate>, clock: &C) -> Self {
        let limit = |rate: Rate| Limit {
            limiter: RateLimiter::dashmap_with_clock(rate.quota(), clock.clone()),
            rate,
        };
        CallerLimits {
            calls: calls.map(limit),
            new_clients: new_clients.map(|rate| Holds::new(rate, clock.clone())),
            charges: AtomicU64::new(0),
        }
    }

    /// Whether checks must count the client entries they would create.
    pub fn caps_new_clients(&self) -> bool {
        self.new_clients.is_some()
    }

    /// Charges `n` calls to `caller`, or answers RESOURCE_EXHAUSTED naming the limit.
    pub fn charge_calls(&self, caller: &CallerKey, n: u32) -> Result<(), Status> {
        let Some(limit) = &self.calls else {
            return Ok(());
        };
        self.charge(limit, caller, n).map_err(|wait| match wait {
            Some(wait) => Status::resource_exhausted(format!(
                "{caller} is over its API rate limit of {} calls per second, burst {} \
                 (--api-caller-rate, --api-caller-burst; a CheckBatch counts one call per \
                 check): retry after {} ms",
                limit.rate.per_second,
                limit.rate.burst,
                wait.as_millis().max(1)
            )),
            None => Status::resource_exhausted(format!(
                "{caller}: {n} calls at once is more than the burst of {} (--api-caller-burst)",
                limit.rate.burst
            )),
        })
    }

    /// Charges `n` new client entries to `caller`, or answers RESOURCE_EXHAUSTED naming the cap.
    pub fn charge_new_clients(&self, caller: &CallerKey, n: u32) -> Result<(), Status> {
        let Some(limit) = &self.new_clients else {
            return Ok(());
        };
        let Some(n) = NonZeroU32::new(n) else {
            return Ok(());
        };
        self.count_charge();
        limit.take(caller, n, false).map(drop).map_err(|wait| {
            let retry = match wait {
                Some(wait) => format!("retry after {} ms", wait.as_millis().max(1)),
                None => format!("send at most {} such checks per call", limit.rate.burst),
            };
            Status::resource_exhausted(format!(
                "{caller} is over its cap of {} new address clients per second \
                 (--api-new-clients-per-second): this call would create {n} client entries in \
                 the packet path's map, and nothing was checked; {retry} (checks of addresses \
                 that already have an entry are not capped)",
                limit.rate.per_second
            ))
        })
    }

    /// Holds `most` of `caller`'s new-client tokens for a call whose checks could create that many
    /// entries, if the bucket has them (`None` if not; nothing to hold always holds). The call
    /// then gives back what its checks did not create ([`Self::release_new_clients`]).
    /// Meanwhile the held tokens are spent for the caller's other calls: a call of new addresses
    /// may be refused by up to what its concurrent calls hold, for as long as they take.
    pub fn hold_new_clients(&self, caller: &CallerKey, most: u32) -> Option<NewClientHold> {
        let (Some(limit), Some(tokens)) = (&self.new_clients, NonZeroU32::new(most)) else {
            return Some(NewClientHold { tokens: 0, id: 0 });
        };
        self.count_charge();
        let id = limit.take(caller, tokens, true).ok()??;
        Some(NewClientHold { tokens: most, id })
    }

    /// Ends `hold`: of its tokens, the call's checks created `created` entries; the rest go
    /// back, exactly: the bucket ends as if the hold had taken only `created` (or all it held,
    /// if they created more).
    pub fn release_new_clients(&self, caller: &CallerKey, hold: NewClientHold, created: u32) {
        if let Some(limit) = &self.new_clients
            && hold.tokens > 0
        {
            limit.give_back(caller, hold.id, hold.tokens.saturating_sub(created));
        }
    }

    /// Decides `checks` for `caller` under its new-client cap: a call over it is refused whole,
    /// nothing spent. If every address could be new and the caller could still have them, the
    /// tokens are held, the checks spent at once (one program run per frame), and what they did
    /// not create given back; else the addresses are read first (a run more) to count the new
    /// ones exactly.
    pub fn check_capped(
        &self,
        checker: &Checker,
        caller: &CallerKey,
        checks: &[(&ClientId, u32)],
    ) -> Result<Vec<Decision>, Status> {
        let candidates = entry_candidates(checks);
        let most = u32::try_from(candidates.len()).unwrap_or(u32::MAX);
        if let Some(hold) = self.hold_new_clients(caller, most) {
            let decisions = checker.check_all(checks);
            let created = match &decisions {
                Ok(decisions) => checks
                    .iter()
                    .zip(decisions)
                    .filter(|((id, _), d)| d.new && matches!(id, ClientId::Addr(_)))
                    .count(),
                // A failed run keeps all it held: some frames may have created entries.
                Err(_) => usize::MAX,
            };
            let created = u32::try_from(created).unwrap_or(u32::MAX);
            self.release_new_clients(caller, hold, created);
            return decisions.map_err(check_status);
        }
        let new = checker
            .new_address_entries(&candidates)
            .map_err(check_status)?;
        self.charge_new_clients(caller, new)?;
        checker.check_all(checks).map_err(check_status)
    }

    /// Counts a charge, pruning idle callers every [`PRUNE_EVERY`].
    fn count_charge(&self) {
        if self.charges.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.prune();
        }
    }

    /// `Err(Some(wait))`: over the limit until `wait` from now; `Err(None)`: `n` exceeds the burst.
    fn charge(&self, limit: &Limit<C>, caller: &CallerKey, n: u32) -> Result<(), Option<Duration>> {
        let Some(n) = NonZeroU32::new(n) else {
            return Ok(());
        };
        self.count_charge();
        match limit.limiter.check_key_n(caller, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Some(not_until.wait_time_from(limit.limiter.clock().now()))),
            Err(_insufficient) => Err(None),
        }
    }

    /// Drops the keys of callers that are back at a full bucket.
    pub fn prune(&self) {
        if let Some(limit) = &self.calls {
            limit.limiter.retain_recent();
            limit.limiter.shrink_to_fit();
        }
        if let Some(limit) = &self.new_clients {
            limit.prune();
        }
    }

    /// Callers with state (tests).
    pub fn tracked(&self) -> usize {
        let calls = self.calls.as_ref().map_or(0, |l| l.limiter.len());
        let new_clients = self.new_clients.as_ref().map_or(0, Holds::len);
        calls.max(new_clients)
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;
    use tonic::Code;

    use super::*;

    fn rate(per_second: u32, burst: u32) -> Rate {
        Rate {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    fn caller(role: Role, addr: &str) -> CallerKey {
        CallerKey {
            role,
            who: Who::Addr(addr.parse().unwrap()),
        }
    }

    #[test]
    fn an_ipv6_caller_is_its_slash_64() {
        let a = Who::peer("2001:db8:1:2::1".parse().unwrap());
        let b = Who::peer("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = Who::peer("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            Who::peer("::ffff:192.0.2.7".parse().unwrap()),
            Who::Addr("192.0.2.7".parse().unwrap())
        );
        let key = CallerKey {
            role: Role::Check,
            who: a,
        };
        assert_eq!(key.to_string(), "check caller 2001:db8:1:2::/64");
    }

    #[test]
    fn a_caller_over_its_call_rate_is_refused_and_others_are_not() {
        let clock = FakeRelativeClock::default();
        let limits = CallerLimits::with_clock(Some(rate(10, 20)), None, &clock);
        let a = caller(Role::Check, "192.0.2.1");
        let b = caller(Role::Check, "192.0.2.2");
        let admin_a = caller(Role::Admin, "192.0.2.1");
        for _ in 0..20 {
            limits.charge_calls(&a, 1).unwrap();
        }
        let e = limits.charge_calls(&a, 1).unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(
            e.message().starts_with(
                "check caller 192.0.2.1 is over its API rate limit of 10 calls per second, burst 20"
            ),
            "{}",
            e.message()
        );
        assert!(
            e.message().contains("retry after 100 ms"),
            "{}",
            e.message()
        );
        // Another address, or the same address with the other role, is another caller.
        limits.charge_calls(&b, 20).unwrap();
        limits.charge_calls(&admin_a, 20).unwrap();
        // A batch counts its checks; more than the burst at once never passes.
        let e = limits.charge_calls(&b, 1).unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(
            limits
                .charge_calls(&a, 21)
                .unwrap_err()
                .message()
                .contains("more than the burst of 20")
        );
        // The bucket refills at the rate.
        clock.advance(Duration::from_millis(300));
        for _ in 0..3 {
            limits.charge_calls(&a, 1).unwrap();
        }
        assert!(limits.charge_calls(&a, 1).is_err());
        // Nothing is charged for zero calls.
        limits.charge_calls(&a, 0).unwrap();
    }

    #[test]
    fn the_new_client_cap_counts_entries_per_caller() {
        let clock = FakeRelativeClock::default();
        let limits = CallerLimits::with_clock(None, Some(rate(5, 5)), &clock);
        assert!(limits.caps_new_clients());
        let a = CallerKey {
            role: Role::Check,
            who: Who::Subject(Arc::from("CN=web, O=Example")),
        };
        limits.charge_new_clients(&a, 3).unwrap();
        let e = limits.charge_new_clients(&a, 3).unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(
            e.message().starts_with(
                "check caller \"CN=web, O=Example\" is over its cap of 5 new address clients per second"
            ),
            "{}",
            e.message()
        );
        assert!(e.message().contains("would create 3 client entries"));
        // A refused charge spends nothing: the 2 left are still there.
        limits.charge_new_clients(&a, 2).unwrap();
        assert!(limits.charge_new_clients(&a, 1).is_err());
        // Calls are not limited here, and 0 new entries are always fine.
        limits.charge_calls(&a, 1_000_000).unwrap();
        limits.charge_new_clients(&a, 0).unwrap();
        clock.advance(Duration::from_secs(1));
        limits.charge_new_clients(&a, 5).unwrap();
        let off = CallerLimits::new(None, None);
        assert!(!off.caps_new_clients());
        off.charge_new_clients(&a, u32::MAX).unwrap();
    }

    #[test]
    fn held_new_client_tokens_a_call_did_not_use_are_given_back() {
        let clock = FakeRelativeClock::default();
        let limits = CallerLimits::with_clock(None, Some(rate(10, 10)), &clock);
        let a = caller(Role::Check, "192.0.2.1");
        // A call that could create 8 entries holds 8; meanwhile 2 are left for other calls.
        let hold = limits.hold_new_clients(&a, 8).unwrap();
        assert!(limits.hold_new_clients(&a, 3).is_none());
        // It created 2 and gives the other 6 back: as if 2 had been charged.
        limits.release_new_clients(&a, hold, 2);
        limits.charge_new_clients(&a, 8).unwrap();
        assert!(limits.charge_new_clients(&a, 1).is_err());
        // A refused hold takes nothing; nothing to hold always holds.
        assert!(limits.hold_new_clients(&a, 1).is_none());
        let nothing = limits.hold_new_clients(&a, 0).unwrap();
        limits.release_new_clients(&a, nothing, 0);
        clock.advance(Duration::from_secs(1));
        // More than the burst never holds, and takes nothing either.
        assert!(limits.hold_new_clients(&a, 11).is_none());
        let hold = limits.hold_new_clients(&a, 10).unwrap();
        // Creating more than was held gives nothing back (and takes nothing more).
        limits.release_new_clients(&a, hold, 12);
        assert!(limits.hold_new_clients(&a, 1).is_none());
        // Off: every hold holds.
        let off = CallerLimits::new(None, None);
        let hold = off.hold_new_clients(&a, u32::MAX).unwrap();
        off.release_new_clients(&a, hold, 5);
    }

    /// Tokens held across a refill are not given back on top of it: a bucket never holds more
    /// than its burst (found by review: 12 entries in a millisecond at a burst of 10).
    #[test]
    fn tokens_held_before_the_bucket_refilled_are_not_given_back() {
        let clock = FakeRelativeClock::default();
        let limits = CallerLimits::with_clock(None, Some(rate(10, 10)), &clock);
        let a = caller(Role::Check, "192.0.2.1");
        // A long call holds 2 of a full bucket, and creates nothing.
        let long = limits.hold_new_clients(&a, 2).unwrap();
        // 300 ms later the bucket is full again: another call takes all 10 and creates them.
        clock.advance(Duration::from_millis(300));
        let other = limits.hold_new_clients(&a, 10).unwrap();
        limits.release_new_clients(&a, other, 10);
        // The long call ends: its 2 are not given back, the full bucket had them already.
        clock.advance(Duration::from_millis(1));
        limits.release_new_clients(&a, long, 0);
        assert!(limits.hold_new_clients(&a, 2).is_none());
        // Without a refill in between, they are, as if never taken: the full bucket gains
        // nothing in the 100 ms the long call takes, and the other call leaves 2 of 10.
        clock.advance(Duration::from_secs(1));
        let long = limits.hold_new_clients(&a, 2).unwrap();
        clock.advance(Duration::from_millis(100));
        let other = limits.hold_new_clients(&a, 8).unwrap();
        limits.release_new_clients(&a, other, 8);
        limits.release_new_clients(&a, long, 0);
        limits.charge_new_clients(&a, 2).unwrap();
        assert!(limits.charge_new_clients(&a, 1).is_err());
    }

    /// One operation of a caller on its new-client cap, for the property tests.
    #[derive(Debug, Clone)]
    enum CapOp {
        Advance(u64),
        Charge(u32),
        /// Holds `tokens`, of which the call creates `created`; the hold ends (what was not
        /// created given back) `ends_after` operations later, or never.
        Hold {
            tokens: u32,
            created: u32,
            ends_after: usize,
        },
    }

    fn cap_op() -> impl proptest::strategy::Strategy<Value = CapOp> {
        use proptest::prelude::*;
        prop_oneof![
            (0u64..400_000).prop_map(CapOp::Advance),
            (0u32..15).prop_map(CapOp::Charge),
            (0u32..15, 0u32..20, 0usize..6).prop_map(|(tokens, created, ends_after)| {
                CapOp::Hold {
                    tokens,
                    created: created.min(tokens),
                    ends_after,
                }
            }),
        ]
    }

    proptest::proptest! {
        /// The new-client cap decides every charge as `governor`'s keyed limiter does with the
        /// same quota and clock (the call limit's), and so do holds given back at once.
        #[test]
        fn the_new_client_cap_decides_as_governor_does(
            per_second in 1u32..2000,
            burst in 1u32..50,
            steps in proptest::collection::vec((0u64..3_000_000, 0u32..60, proptest::bool::ANY), 1..200),
        ) {
            let clock = FakeRelativeClock::default();
            let quota = rate(per_second, burst);
            let ours = CallerLimits::with_clock(None, Some(quota), &clock);
            let theirs = CallerLimits::with_clock(Some(quota), None, &clock);
            let a = caller(Role::Check, "192.0.2.1");
            for (advance_us, n, hold) in steps {
                clock.advance(Duration::from_micros(advance_us));
                if hold && let Some(held) = ours.hold_new_clients(&a, n) {
                    // Held and given back whole at once: changes nothing.
                    ours.release_new_clients(&a, held, 0);
                }
                let mine = ours.charge_new_clients(&a, n).is_ok();
                let governor = theirs.charge_calls(&a, n).is_ok();
                proptest::prop_assert_eq!(mine, governor, "charge of {} after {} µs", n, advance_us);
            }
        }

        /// Whatever calls hold, create and give back, and however long they take, the entries
        /// charged never exceed the cap's contract: in any span of time Δ (from one operation
        /// to a later one), at most burst + Δ · rate, counting a call's entries at its hold. And
        /// whenever no hold is open, the bucket is exactly a GCRA's that was charged only what
        /// each call created, at its hold.
        #[test]
        fn holds_never_let_a_caller_past_its_cap(
            per_second in 1u32..50,
            burst in 1u32..20,
            ops in proptest::collection::vec(cap_op(), 1..120),
        ) {
            let clock = FakeRelativeClock::default();
            let limits = CallerLimits::with_clock(None, Some(rate(per_second, burst)), &clock);
            let a = caller(Role::Check, "192.0.2.1");
            let interval = 1_000_000_000 / u64::from(per_second);
            let mut now = 0u64;
            // The GCRA that is charged what each call created, at its hold.
            let mut model = 0u64;
            let charge = |model: &mut u64, now: u64, n: u32| {
                *model = (*model).max(now) + interval * u64::from(n);
            };
            // (time, entries) of every charge and hold that created entries.
            let mut spent: Vec<(u64, u32)> = Vec::new();
            // Open holds: (operations left, hold, created).
            let mut open: Vec<(usize, NewClientHold, u32)> = Vec::new();
            for op in ops {
                match op {
                    CapOp::Advance(us) => {
                        clock.advance(Duration::from_micros(us));
                        now += us * 1000;
                    }
                    CapOp::Charge(n) => {
                        if limits.charge_new_clients(&a, n).is_ok() {
                            spent.push((now, n));
                            if n > 0 {
                                charge(&mut model, now, n);
                            }
                        }
                    }
                    CapOp::Hold { tokens, created, ends_after } => {
                        if let Some(hold) = limits.hold_new_clients(&a, tokens) {
                            spent.push((now, created));
                            open.push((ends_after, hold, created));
                            if tokens > 0 {
                                charge(&mut model, now, created);
                            }
                        }
                    }
                }
                for (left, _, _) in &mut open {
                    *left = left.saturating_sub(1);
                }
                for (_, hold, created) in open.extract_if(.., |(left, _, _)| *left == 0) {
                    limits.release_new_clients(&a, hold, created);
                }
                if open.is_empty() {
                    let Some(holds) = &limits.new_clients else {
                        unreachable!("the cap is on");
                    };
                    let tat = holds.buckets.lock().unwrap().get(&a).map_or(0, |b| b.tat);
                    proptest::prop_assert_eq!(tat.max(now), model.max(now), "at {} ns", now);
                }
            }
            for (i, &(from, _)) in spent.iter().enumerate() {
                let mut total = 0u64;
                for &(at, n) in &spent[i..] {
                    total += u64::from(n);
                    let allowed = u64::from(burst) + (at - from) / interval;
                    proptest::prop_assert!(
                        total <= allowed,
                        "{} entries from {} ns to {} ns, at most {}", total, from, at, allowed
                    );
                }
            }
        }
    }

    #[test]
    fn idle_callers_are_pruned() {
        let clock = FakeRelativeClock::default();
        let limits = CallerLimits::with_clock(Some(rate(10, 10)), Some(rate(10, 10)), &clock);
        for i in 0..100u8 {
            let who = caller(Role::Check, &format!("192.0.2.{i}"));
            limits.charge_calls(&who, 5).unwrap();
            limits.charge_new_clients(&who, 5).unwrap();
        }
        assert_eq!(limits.tracked(), 100);
        clock.advance(Duration::from_secs(2));
        limits.prune();
        assert_eq!(limits.tracked(), 0);
    }
}
