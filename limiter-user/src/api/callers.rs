//! API callers and what each may spend: a rate limit on calls (a CheckBatch counting one call per
//! check) and a cap on the client entries its checks may create in the packet path's map, both
//! per caller. A TCP caller is its role and its certificate subject (mutual TLS) or, without one,
//! its role and peer IP address (not the port: a new connection is the same caller). The Unix
//! socket (mode 0600, root only) is exempt from both.
//!
//! Both limits are `governor`'s keyed GCRA limiter (the crate the API benchmark's floor server
//! uses): exact to the nanosecond, a few atomic operations per call, no timer task; keys idle
//! long enough to be back at a full bucket are pruned every [`PRUNE_EVERY`] charges.

use std::{
    fmt,
    net::IpAddr,
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    middleware::NoOpMiddleware,
    state::keyed::DashMapStateStore,
};
use tonic::Status;

use super::auth::Role;

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

/// The per-caller limits of the TCP API (see the module docs). `None` limits are off.
pub struct CallerLimits<C: Clock = DefaultClock> {
    calls: Option<Limit<C>>,
    new_clients: Option<Limit<C>>,
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
            new_clients: new_clients.map(limit),
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
        self.charge(limit, caller, n).map_err(|wait| {
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

    /// `Err(Some(wait))`: over the limit until `wait` from now; `Err(None)`: `n` exceeds the burst.
    fn charge(&self, limit: &Limit<C>, caller: &CallerKey, n: u32) -> Result<(), Option<Duration>> {
        let Some(n) = NonZeroU32::new(n) else {
            return Ok(());
        };
        if self.charges.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.prune();
        }
        match limit.limiter.check_key_n(caller, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Some(not_until.wait_time_from(limit.limiter.clock().now()))),
            Err(_insufficient) => Err(None),
        }
    }

    /// Drops the keys of callers that are back at a full bucket.
    pub fn prune(&self) {
        for limit in [&self.calls, &self.new_clients].into_iter().flatten() {
            limit.limiter.retain_recent();
            limit.limiter.shrink_to_fit();
        }
    }

    /// Callers with state (tests).
    pub fn tracked(&self) -> usize {
        [&self.calls, &self.new_clients]
            .into_iter()
            .flatten()
            .map(|l| l.limiter.len())
            .max()
            .unwrap_or(0)
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
    fn idle_callers_are_pruned() {
        let clock = FakeRelativeClock::default();
        let limits = CallerLimits::with_clock(Some(rate(10, 10)), None, &clock);
        for i in 0..100u8 {
            limits
                .charge_calls(&caller(Role::Check, &format!("192.0.2.{i}")), 5)
                .unwrap();
        }
        assert_eq!(limits.tracked(), 100);
        clock.advance(Duration::from_secs(2));
        limits.prune();
        assert_eq!(limits.tracked(), 0);
    }
}
