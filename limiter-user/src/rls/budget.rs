//! Where the rate limit service's checks are decided ([`Budget`]: the check program, or a
//! simulation in tests), and the client locks that keep a request's probe (or read) and spend
//! together against the service's other calls ([`ClientLocks`]).

use std::sync::{Arc, Mutex, MutexGuard};

use limiter_common::{CheckRequest, maps::CHECK_NAMED};
use tonic::Status;

use crate::{
    check::{AllOrNone, CheckError, Checker, Decision, all_or_none_in_two_runs, read_needing_with},
    cluster::membership::ShareView,
};

/// Locks the service's calls hold from their read to their spend, each for the client keys
/// that hash to it (see the service's docs): enough that two calls about different clients
/// rarely share one.
pub const CLIENT_LOCKS: usize = 256;

/// Where the service's checks are decided: the check program, or a simulation in tests.
pub trait Budget: Send + Sync + 'static {
    /// Decides `requests` in order.
    fn decide(&self, requests: &[CheckRequest]) -> Result<Vec<Decision>, CheckError>;
    /// Spends checks all or none: only if each client has the hits the request needs of it
    /// (the `u32` beside each check) left (see [`Checker::check_all_or_none`]).
    fn decide_all_or_none(&self, checks: &[(CheckRequest, u32)]) -> Result<AllOrNone, CheckError> {
        all_or_none_in_two_runs(checks, |c| self.read_needing(c, true), |r| self.decide(r))
    }
    /// Reads each check's client (nothing spent) and says whether the hits beside the check fit;
    /// with `count_refused` the hits of a client that is short count in its `dropped` (see
    /// [`Checker::read_needing`]; a simulation counts nothing).
    fn read_needing(
        &self,
        checks: &[(CheckRequest, u32)],
        _count_refused: bool,
    ) -> Result<Vec<(Decision, bool)>, CheckError> {
        read_needing_with(checks, |r| self.decide(r))
    }
    /// The agent runs in dry-run mode (denials are reported as allowed).
    fn dry_run(&self) -> bool;
    /// What a global limit's share here derives from (cluster membership).
    fn share_view(&self) -> ShareView;
}

impl Budget for Checker {
    fn decide(&self, requests: &[CheckRequest]) -> Result<Vec<Decision>, CheckError> {
        self.check_requests(requests)
    }

    fn decide_all_or_none(&self, checks: &[(CheckRequest, u32)]) -> Result<AllOrNone, CheckError> {
        self.check_all_or_none(checks)
    }

    fn read_needing(
        &self,
        checks: &[(CheckRequest, u32)],
        count_refused: bool,
    ) -> Result<Vec<(Decision, bool)>, CheckError> {
        Checker::read_needing(self, checks, count_refused)
    }

    fn dry_run(&self) -> bool {
        self.view().dry_run()
    }

    fn share_view(&self) -> ShareView {
        Checker::share_view(self)
    }
}

/// [`CLIENT_LOCKS`] locks, shared by every serving thread's copy of the service.
#[derive(Clone)]
pub struct ClientLocks(Arc<[Mutex<()>]>);

impl ClientLocks {
    pub fn new() -> ClientLocks {
        ClientLocks((0..CLIENT_LOCKS).map(|_| Mutex::new(())).collect())
    }

    /// The locks of the checks' clients, taken in index order (so two holders never wait for
    /// each other's), each once.
    pub fn hold<'a>(
        &self,
        checks: impl IntoIterator<Item = &'a CheckRequest>,
    ) -> Vec<MutexGuard<'_, ()>> {
        let mut locks: Vec<usize> = checks.into_iter().map(lock_of).collect();
        locks.sort_unstable();
        locks.dedup();
        locks
            .into_iter()
            .map(|i| self.0[i].lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    /// Whether `other` is the same set of locks.
    pub fn same(&self, other: &ClientLocks) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Lock `i`, alone (tests).
    #[cfg(test)]
    pub fn lock(&self, i: usize) -> std::sync::TryLockResult<MutexGuard<'_, ()>> {
        self.0[i].try_lock()
    }

    /// Whether the lock of `check`'s client is held (tests).
    #[cfg(test)]
    pub fn held(&self, check: &CheckRequest) -> bool {
        self.lock(lock_of(check)).is_err()
    }
}

impl Default for ClientLocks {
    fn default() -> ClientLocks {
        ClientLocks::new()
    }
}

/// The index of a check's client lock: its key's leading bytes (a SHA-256 prefix for a named
/// client; an address's low bytes, which vary most, for an address client), and whether it is
/// named.
fn lock_of(r: &CheckRequest) -> usize {
    let k = &r.key;
    let mixed = u64::from_le_bytes([k[0], k[1], k[2], k[3], k[12], k[13], k[14], k[15]])
        ^ u64::from(r.flags & CHECK_NAMED);
    // Fibonacci hashing: the product's top bits depend on every input bit.
    (mixed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize % CLIENT_LOCKS
}

/// A failure to decide is UNAVAILABLE, so that Envoy's `failure_mode_deny` decides, never a
/// silent OK.
pub fn unavailable(e: CheckError) -> Status {
    Status::unavailable(format!(
        "the rate limit service could not decide: {}",
        crate::error_chain(&e)
    ))
}
