//! Admission of TCP connections to the agent's listeners (the API's and the metrics endpoint's):
//! caps on the connections open at once, in total and per source, so that callers without
//! credentials cannot take the descriptors the agent needs for its own work (the Unix socket,
//! config reloads, snapshots).
//!
//! A source is one IPv4 address, or one IPv6 /64: a host is usually given a whole /64 (RFC 6177
//! recommends /48 to /64 per site), so counting IPv6 addresses one by one would give a single
//! host 2^64 budgets. An IPv4-mapped IPv6 peer (`::ffff:a.b.c.d`, from a dual-stack listener)
//! is its IPv4 address.
//!
//! Connections over a cap are accepted and closed at once by the listener (not left in the
//! kernel's accept queue), so that each refusal is counted and the queue never fills with
//! connections the agent will not serve. (The API's listener first tries to make room under its
//! total cap by displacing a connection that has not authenticated: `api::connection`.)

use std::{
    collections::HashMap,
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

/// How many connections a listener serves at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// In total.
    pub total: usize,
    /// From one source (an IPv4 address or an IPv6 /64).
    pub per_source: usize,
}

/// Whom a connection is counted against: an IPv4 address, or the /64 of an IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    V4(Ipv4Addr),
    /// The upper 64 bits of the address.
    V6Prefix(u64),
}

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4),
                None => Source::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::V4(v4) => write!(f, "{v4}"),
            Source::V6Prefix(prefix) => {
                write!(f, "{}/64", Ipv6Addr::from(u128::from(*prefix) << 64))
            }
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener serves its total cap already.
    Total,
    /// The connection's source holds its cap already.
    PerSource,
}

impl Refusal {
    /// The `reason` label of `limiter_connections_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Total => "total",
            Refusal::PerSource => "per_address",
        }
    }
}

/// The connections one listener holds, counted against its [`Caps`].
#[derive(Debug)]
pub struct Admission {
    caps: Caps,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    open: usize,
    /// Open connections by source; a source with none has no entry, so the table holds at
    /// most `caps.total` entries.
    by_source: HashMap<Source, usize>,
}

impl Admission {
    pub fn new(caps: Caps) -> Arc<Admission> {
        Arc::new(Admission {
            caps,
            table: Mutex::new(Table::default()),
        })
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // Every update below leaves the table consistent before anything can panic.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a connection from `peer`, or says why not. The slot is given back when the
    /// returned [`Slot`] is dropped.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Refusal> {
        let source = Source::of(peer);
        let mut table = self.table();
        let from_source = table.by_source.get(&source).copied().unwrap_or(0);
        if from_source >= self.caps.per_source {
            return Err(Refusal::PerSource);
        }
        if table.open >= self.caps.total {
            return Err(Refusal::Total);
        }
        table.open += 1;
        table.by_source.insert(source, from_source + 1);
        Ok(Slot {
            admission: Arc::clone(self),
            source,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.table().open
    }

    /// Connections open now from `peer`'s source.
    pub fn open_from(&self, peer: IpAddr) -> usize {
        self.table()
            .by_source
            .get(&Source::of(peer))
            .copied()
            .unwrap_or(0)
    }

    fn release(&self, source: Source) {
        let mut table = self.table();
        table.open = table.open.saturating_sub(1);
        if let Some(count) = table.by_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                table.by_source.remove(&source);
            }
        }
    }
}

/// One admitted connection's place; dropping it gives the place back.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    source: Source,
}

impl Slot {
    pub fn source(&self) -> Source {
        self.source
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.release(self.source);
    }
}

/// Wait after `accept` failed for want of resources (descriptors, memory) before trying again:
/// retrying at once would spin (the connection stays queued, so `accept` fails again at once),
/// and the condition usually clears when connections close.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What a failed `accept` means for a listener.
#[derive(Debug, PartialEq, Eq)]
pub enum AcceptFailure {
    /// A problem of the connection being accepted (aborted by its client, a network error
    /// Linux reports through `accept`): skip it.
    Connection,
    /// The process or system is out of descriptors or memory: wait [`ACCEPT_BACKOFF`] and try
    /// again.
    Resources,
    /// The listening socket is unusable: give up.
    Listener,
}

impl AcceptFailure {
    pub fn of(err: &io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => Self::Resources,
            Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EFAULT) => Self::Listener,
            // ECONNABORTED, EINTR, EPERM (a firewall), and the network errors accept(2) says to
            // treat like EAGAIN (ENETDOWN, EPROTO, EHOSTUNREACH, ...): each consumed one
            // queued connection, so retrying cannot spin.
            _ => Self::Connection,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_are_classified() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(
            AcceptFailure::of(&os(libc::ECONNABORTED)),
            AcceptFailure::Connection
        );
        assert_eq!(
            AcceptFailure::of(&os(libc::EPROTO)),
            AcceptFailure::Connection
        );
        assert_eq!(
            AcceptFailure::of(&os(libc::EMFILE)),
            AcceptFailure::Resources
        );
        assert_eq!(
            AcceptFailure::of(&os(libc::ENOBUFS)),
            AcceptFailure::Resources
        );
        assert_eq!(AcceptFailure::of(&os(libc::EBADF)), AcceptFailure::Listener);
        assert_eq!(
            AcceptFailure::of(&os(libc::EINVAL)),
            AcceptFailure::Listener
        );
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_source_cap_refuses_the_next_and_a_release_admits_again() {
        let admission = Admission::new(Caps {
            total: 100,
            per_source: 3,
        });
        let mut held: Vec<Slot> = (0..3)
            .map(|_| admission.admit(ip("192.0.2.1")).unwrap())
            .collect();
        assert_eq!(
            admission.admit(ip("192.0.2.1")).unwrap_err(),
            Refusal::PerSource
        );
        // Another address is not affected.
        let other = admission.admit(ip("192.0.2.2")).unwrap();
        assert_eq!(admission.open(), 4);
        assert_eq!(admission.open_from(ip("192.0.2.1")), 3);
        held.pop();
        assert_eq!(admission.open_from(ip("192.0.2.1")), 2);
        let again = admission.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(admission.open(), 4);
        drop((held, other, again));
        assert_eq!(admission.open(), 0);
    }

    #[test]
    fn total_cap_refuses_every_source_until_one_closes() {
        let admission = Admission::new(Caps {
            total: 4,
            per_source: 2,
        });
        let mut held: Vec<Slot> = ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3"]
            .into_iter()
            .map(|a| admission.admit(ip(a)).unwrap())
            .collect();
        assert_eq!(admission.admit(ip("10.0.0.4")).unwrap_err(), Refusal::Total);
        // A source at its own cap is refused for that, whatever the total.
        assert_eq!(
            admission.admit(ip("10.0.0.1")).unwrap_err(),
            Refusal::PerSource
        );
        held.pop();
        assert!(admission.admit(ip("10.0.0.4")).is_ok());
        // The slot above was dropped at once: three held.
        assert_eq!(admission.open(), 3);
    }

    #[test]
    fn every_slot_released_leaves_an_empty_table() {
        let admission = Admission::new(Caps {
            total: 1000,
            per_source: 1000,
        });
        let slots: Vec<Slot> = (0..500u32)
            .map(|i| admission.admit(IpAddr::V4(Ipv4Addr::from(i % 7))).unwrap())
            .collect();
        assert_eq!(admission.open(), 500);
        drop(slots);
        assert_eq!(admission.open(), 0);
        assert!(admission.table().by_source.is_empty());
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source_and_mapped_ipv4_is_its_address() {
        let admission = Admission::new(Caps {
            total: 100,
            per_source: 2,
        });
        let a = admission.admit(ip("2001:db8:1:2::1")).unwrap();
        let b = admission
            .admit(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
            .unwrap();
        assert_eq!(
            admission.admit(ip("2001:db8:1:2:abcd::9")).unwrap_err(),
            Refusal::PerSource,
            "a third address of the same /64"
        );
        assert!(
            admission.admit(ip("2001:db8:1:3::1")).is_ok(),
            "the next /64"
        );
        assert_eq!(a.source().to_string(), "2001:db8:1:2::/64");
        drop((a, b));

        let v4 = admission.admit(ip("198.51.100.7")).unwrap();
        let mapped = admission.admit(ip("::ffff:198.51.100.7")).unwrap();
        assert_eq!(mapped.source(), Source::V4(Ipv4Addr::new(198, 51, 100, 7)));
        assert_eq!(
            admission.admit(ip("198.51.100.7")).unwrap_err(),
            Refusal::PerSource
        );
        drop((v4, mapped));
        assert_eq!(admission.open(), 0);
    }
}
