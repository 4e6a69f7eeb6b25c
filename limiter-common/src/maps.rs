//! Values of the BPF maps. Every type is `#[repr(C)]` with its fields ordered so that there is no
//! implicit padding (the kernel copies values byte for byte; padding would leak or mismatch), and
//! each size is asserted at compile time.

/// Version of the map layout: the set of maps, their key and value types. Bump it with any
/// change to them; an agent finding pinned maps of another version never runs its program
/// against them.
pub const LAYOUT_VERSION: u32 = 7;

/// `Policy::action`: limit the client with `limit` per `window_us`.
pub const ACTION_LIMIT: u8 = 0;
/// `Policy::action`: never limited (allow list); still counted.
pub const ACTION_PASS: u8 = 1;
/// `Policy::action`: always dropped (block list), the same as `limit: 0`.
pub const ACTION_DROP: u8 = 2;

/// `ClientState::flags`: the entry lives in a never-evicted map (`STATIC_CLIENTS` for an
/// exact-address policy, `NAMED_STATIC` for an exact-ID one).
pub const FLAG_STATIC: u8 = 1;
/// `ClientState::flags`: the client's key was pushed to `ACTIVE` for the agent's adaptive
/// controller, which now tracks it; it is pushed again only after the agent releases it (an
/// adapt request with `ADAPT_RELEASE`), so the ring carries each newly active client once, not
/// one record per window.
pub const FLAG_REPORTED: u8 = 2;

/// Bits of the lifetime counters `passed` and `dropped` in their words; the 16 bits above hold
/// the entry's policy metadata (see [`ClientState`]). 2^48 packets are 219 days of a client
/// flooding a 10 GbE link with minimum-size frames on its own; the counters then wrap modulo
/// 2^48, and the writers keep the wrap from carrying into the metadata.
pub const COUNTER_BITS: u32 = 48;
/// The counter part of a counter word.
pub const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;
/// The 15-bit field in bits 48..63 of a counter word (generation tag or policy id).
pub const META_MASK: u64 = 0x7fff << COUNTER_BITS;
/// Bit 63 of a counter word (`FLAG_STATIC` in `passed`, `FLAG_REPORTED` in `dropped`).
pub const META_FLAG: u64 = 1 << 63;
/// Policy ids fit the 15-bit field of the `dropped` word.
pub const MAX_POLICY_ID: u16 = 0x7fff;
/// Generation tags are the low 15 bits of `MapConfig::generation`. The agent never uses a
/// generation whose tag is 0, so a tag of 0 always means "re-resolve", and it refreshes every
/// resident entry in place [`GENERATION_SWEEP`] generations after its last refresh, so no
/// entry's tag can be 2^15 generations old and alias the current one.
pub const GENERATION_TAG_MASK: u32 = 0x7fff;
/// Generations between two in-place refreshes of every entry (see [`GENERATION_TAG_MASK`]).
pub const GENERATION_SWEEP: u32 = 1 << 14;

/// The generation tag an entry stores for `MapConfig::generation` `generation`.
#[inline(always)]
pub const fn generation_tag(generation: u32) -> u16 {
    (generation & GENERATION_TAG_MASK) as u16
}

/// `MapConfig::mode`: drop what is over the limit.
pub const MODE_ENFORCE: u32 = 0;
/// `MapConfig::mode`: count what would be dropped, drop nothing.
pub const MODE_DRY_RUN: u32 = 1;

/// A resolved policy: the value of the `POLICIES` LPM trie, keyed by prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Packets admitted per window.
    pub limit: u32,
    /// Window length in microseconds (10 ms ..= 1 h fits in a `u32`).
    pub window_us: u32,
    /// Index of the policy in the config file (0 is `default`); shown by `limiter stats`.
    pub id: u16,
    /// One of `ACTION_*`.
    pub action: u8,
    /// How the policy groups addresses into clients: 0 per address, else the group's prefix
    /// length + 1, with `addr::GROUP_SPLIT` (see `addr::group_key`). Layout 5 wrote 0 here, the
    /// meaning it had then.
    pub group: u8,
}

/// Per-client state: the value of `CLIENTS` (LRU), `STATIC_CLIENTS`, `LIMITED`, `NAMED` and
/// `NAMED_STATIC`.
///
/// 40 bytes. The kernel adds 48 bytes per element (`struct htab_elem`), the 16-byte key and a
/// 16-byte hash bucket (`struct bucket`, one per entry at a power-of-two size): 120 bytes per
/// client, under the 128-byte budget at 1M clients
/// (`htab_map_mem_usage`, kernel/bpf/hashtab.c). Five words, so the policy metadata rides in the
/// top 16 bits of the two lifetime counters:
///
/// | word | bits 0..48 | bits 48..63 | bit 63 |
/// |---|---|---|---|
/// | `passed` | packets passed, except those in `slots` | generation tag | `FLAG_STATIC` |
/// | `dropped` | packets dropped | policy id | `FLAG_REPORTED` |
///
/// The action is not stored: a `pass` entry has `window_us == 0`, a `drop` entry `limit == 0`
/// (`drop` is `limit: 0`), every other entry limits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientState {
    /// Sliding-window slots indexed by window parity, each `tag << 32 | count` (see
    /// [`crate::window`]); updated with compare-and-swap.
    pub slots: [u64; 2],
    /// Counter word: packets passed over the entry's lifetime, except those still counted in
    /// `slots` (use [`ClientState::total_passed`]); the generation tag the cached policy was
    /// resolved at; `FLAG_STATIC`. Folding the slots in once per window instead of adding per
    /// packet saves an atomic add on the hot path.
    pub passed: u64,
    /// Counter word: packets dropped (or, in dry-run, that would have been) over the entry's
    /// lifetime; the id of the cached policy; `FLAG_REPORTED`.
    pub dropped: u64,
    /// Effective allowance: packets admitted per effective window (0: `drop`).
    pub limit: u32,
    /// Effective window in microseconds (0: `pass`).
    pub window_us: u32,
}

impl ClientState {
    /// A new entry under `policy`, resolved at `generation`.
    #[inline(always)]
    pub fn fresh(policy: &Policy, generation: u32) -> ClientState {
        let (limit, window_us) = policy.entry_limits();
        ClientState {
            slots: [0, 0],
            passed: (generation_tag(generation) as u64) << COUNTER_BITS,
            dropped: ((policy.id & MAX_POLICY_ID) as u64) << COUNTER_BITS,
            limit,
            window_us,
        }
    }

    /// Packets passed over the entry's lifetime, modulo 2^48. Admitted packets are counted in
    /// the window slots and folded into `passed` when their slot is reused for a later window,
    /// so the total is `passed` plus what both slots hold.
    ///
    /// Wrapping: when the agent rescales an entry's window (adaptive windows) it carries the
    /// used fraction of the allowance into the new window as a count in a slot and subtracts that
    /// count from `passed`, so `passed` alone can be transiently "negative" (wrapped) while the
    /// sum stays exact.
    #[inline(always)]
    pub fn total_passed(&self) -> u64 {
        self.passed
            .wrapping_add(crate::window::slot_count(self.slots[0]) as u64)
            .wrapping_add(crate::window::slot_count(self.slots[1]) as u64)
            & COUNTER_MASK
    }

    /// The `passed` counter alone (without the slots), modulo 2^48.
    #[inline(always)]
    pub fn passed_count(&self) -> u64 {
        self.passed & COUNTER_MASK
    }

    /// Packets dropped over the entry's lifetime, modulo 2^48.
    #[inline(always)]
    pub fn dropped_count(&self) -> u64 {
        self.dropped & COUNTER_MASK
    }

    /// The generation tag the cached policy was resolved at (0: re-resolve).
    #[inline(always)]
    pub fn generation_tag(&self) -> u16 {
        ((self.passed & META_MASK) >> COUNTER_BITS) as u16
    }

    /// Whether the cached policy was resolved at `MapConfig::generation` `generation`.
    #[inline(always)]
    pub fn is_current(&self, generation: u32) -> bool {
        self.generation_tag() == generation_tag(generation)
    }

    /// `Policy::id` of the cached policy.
    #[inline(always)]
    pub fn policy(&self) -> u16 {
        ((self.dropped & META_MASK) >> COUNTER_BITS) as u16
    }

    /// `FLAG_*` bits.
    #[inline(always)]
    pub fn flags(&self) -> u8 {
        let mut flags = 0;
        if self.passed & META_FLAG != 0 {
            flags |= FLAG_STATIC;
        }
        if self.dropped & META_FLAG != 0 {
            flags |= FLAG_REPORTED;
        }
        flags
    }

    /// Whether `hits` more hits would be admitted at `now_ns` (on the entry's clock) by the state
    /// as it is, as the programs decide a spend (`window::decide`), without spending: the probe
    /// of an all-or-none check (`CHECK_PROBE`). A `pass` entry admits anything, a `drop` entry
    /// nothing, not even 0 hits; 0 hits always fit a limited entry, even one over its limit
    /// (whose limit was lowered), as they fit in what a read reports left.
    #[inline(always)]
    pub fn admits(&self, now_ns: u64, hits: u32) -> bool {
        match core::num::NonZeroU64::new(u64::from(self.window_us) * 1000) {
            None => true,
            Some(window_ns) => {
                self.limit != 0
                    && (hits == 0
                        || !matches!(
                            crate::window::decide(&self.slots, now_ns, window_ns, self.limit, hits),
                            crate::window::Verdict::Deny
                        ))
            }
        }
    }

    /// `ACTION_*` of the cached policy, from the limits it gave the entry.
    #[inline(always)]
    pub fn action(&self) -> u8 {
        if self.window_us == 0 {
            ACTION_PASS
        } else if self.limit == 0 {
            ACTION_DROP
        } else {
            ACTION_LIMIT
        }
    }

    /// Sets the `passed` counter (without the slots), modulo 2^48, keeping the metadata.
    pub fn set_passed_count(&mut self, passed: u64) {
        self.passed = (self.passed & !COUNTER_MASK) | (passed & COUNTER_MASK);
    }

    /// Sets the `dropped` counter, modulo 2^48, keeping the metadata.
    pub fn set_dropped_count(&mut self, dropped: u64) {
        self.dropped = (self.dropped & !COUNTER_MASK) | (dropped & COUNTER_MASK);
    }

    /// Sets the generation tag (0 makes the next packet re-resolve the policy).
    pub fn set_generation_tag(&mut self, tag: u16) {
        self.passed = with_meta(self.passed, tag);
    }

    /// Sets the cached policy id (at most [`MAX_POLICY_ID`]).
    pub fn set_policy(&mut self, id: u16) {
        self.dropped = with_meta(self.dropped, id);
    }

    /// Sets the `FLAG_*` bits.
    pub fn set_flags(&mut self, flags: u8) {
        self.passed = (self.passed & !META_FLAG) | ((flags & FLAG_STATIC != 0) as u64) << 63;
        self.dropped = (self.dropped & !META_FLAG) | ((flags & FLAG_REPORTED != 0) as u64) << 63;
    }
}

/// A counter word with its 15-bit field set to `value`.
#[inline(always)]
pub const fn with_meta(word: u64, value: u16) -> u64 {
    (word & !META_MASK) | (((value & MAX_POLICY_ID) as u64) << COUNTER_BITS)
}

impl Policy {
    /// The `(limit, window_us)` an entry under this policy starts with: `pass` is a zero
    /// window, `drop` a zero limit (see [`ClientState`]).
    #[inline(always)]
    pub fn entry_limits(&self) -> (u32, u32) {
        match self.action {
            ACTION_PASS => (u32::MAX, 0),
            // Any valid window: a zero one would read as `pass`.
            ACTION_DROP => (0, self.window_us.max(crate::window::MIN_WINDOW_US)),
            _ => (self.limit, self.window_us),
        }
    }
}

/// EtherType of a check frame: the agent runs the `limiter_check` program on one with
/// BPF_PROG_TEST_RUN to decide an API check with the fast path's own maps and code. 0x88B5 is
/// IEEE 802's "local experimental" EtherType; such frames never come from the wire to this
/// program (the attached `limiter` program passes them as non-IP).
pub const CHECK_ETHERTYPE: u16 = 0x88B5;
/// Offset of the [`CheckRequest`] in a check frame: after the 14-byte Ethernet header and two
/// bytes of padding, so that it is 8-byte aligned.
pub const CHECK_REQUEST_OFFSET: usize = 16;
/// Offset of the [`CheckReply`] the program writes into the frame.
pub const CHECK_REPLY_OFFSET: usize = CHECK_REQUEST_OFFSET + size_of::<CheckRequest>();
/// Length of a check frame with one check.
pub const CHECK_FRAME_LEN: usize = CHECK_REPLY_OFFSET + size_of::<CheckReply>();
/// A request and its reply: a frame carries up to [`CHECK_BATCH`] of these back to back from
/// `CHECK_REQUEST_OFFSET`, decided in order in one program run.
pub const CHECK_SLOT_LEN: usize = size_of::<CheckRequest>() + size_of::<CheckReply>();
/// Most checks in one check frame. One BPF_PROG_TEST_RUN call costs about 0.8 µs of fixed
/// overhead here, so many checks per call amortise it (measured: 1.6 µs per check alone, 0.63 µs
/// in frames of 4). The program runs its slots with `bpf_loop` (Linux 5.17, commit
/// e6f2dd0f8067), whose callback the verifier checks as one function rather than once per slot,
/// so the number is not bounded by the verifier's budget (unrolled, 4 slots exceeded it) but by
/// the frame: BPF_PROG_TEST_RUN takes an XDP frame of one page less 256 bytes of headroom and
/// the tailroom (`bpf_prog_test_run_xdp`), 3,072 bytes at the largest `CONFIG_MAX_SKB_FRAGS`
/// (45, configurable since 6.3); beyond, the kernel puts the rest in a fragment the program
/// cannot read. 31 slots fit.
pub const CHECK_BATCH: usize = 31;
/// Bounds a slot's index for the verifier (the next power of two less one; the frame's bounds
/// check does the rest).
pub const CHECK_SLOT_MASK: usize = CHECK_BATCH.next_power_of_two() - 1;
const _: () = assert!(CHECK_REQUEST_OFFSET + CHECK_BATCH * CHECK_SLOT_LEN <= 3072);

/// `CheckRequest::flags`: `key` names a client ID (a hash of it) in the `NAMED` maps, and
/// `policy` is the one to apply; otherwise `key` is an address, resolved like a packet's.
pub const CHECK_NAMED: u32 = 1;
/// `CheckRequest::flags` with `CHECK_NAMED`: the ID has an exact-ID policy; its state lives in
/// `NAMED_STATIC`, which LRU eviction never touches.
pub const CHECK_STATIC: u32 = 2;
/// `CheckRequest::flags`: a probe. The client is read as with `hits` 0 (nothing spent, no entry
/// created), and if `hits` would not be admitted now ([`ClientState::admits`] on the state
/// read) the program sets the frame's veto byte (at [`CHECK_VETO_OFFSET`]) and
/// `VERDICT_WONT_FIT`. With `CHECK_UNLESS_VETOED` slots after them, probes make a frame all or
/// none in one program run: the agent probes every client for the hits the frame's checks
/// spend of it (their sum, when two name one client), then every check is spent, or none is
/// (Envoy's rate limit service spends a request's descriptors so).
pub const CHECK_PROBE: u32 = 4;
/// `CheckRequest::flags`: made only if no probe before it in the frame set the veto; otherwise
/// answered `VERDICT_VETOED` without touching the client.
pub const CHECK_UNLESS_VETOED: u32 = 8;
/// Offset of the check frame's veto byte: the first of the two spare bytes between the
/// Ethernet header and the first slot, which the agent zeroes before every run.
pub const CHECK_VETO_OFFSET: usize = 14;

/// `CheckReply::verdict`: the hits were admitted (set only for `hits > 0`; for a read the agent
/// derives the answer from the reply's state).
pub const VERDICT_ALLOWED: u32 = 1;
/// `CheckReply::verdict` bit: the client has no entry and none was created (`hits == 0`); the
/// reply's state is the fresh state its policy would give it.
pub const VERDICT_NOT_RESIDENT: u32 = 2;
/// `CheckReply::verdict` bit: no entry could be created and the check was charged to the shared
/// overflow budget (see `GlobalStats::map_full`).
pub const VERDICT_OVERFLOW: u32 = 4;
/// `CheckReply::verdict` bit: the program wrote this reply (a slot it stopped before, e.g. for
/// a client no policy matched, lacks it and must not be read as a decision).
pub const VERDICT_WRITTEN: u32 = 8;
/// `CheckReply::verdict` bit of a `CHECK_PROBE` slot: its `hits` would not be admitted now, and
/// the program set the frame's veto.
pub const VERDICT_WONT_FIT: u32 = 16;
/// `CheckReply::verdict` bit of a `CHECK_UNLESS_VETOED` slot: the frame's veto was set, so the
/// check was not made (the reply carries no state).
pub const VERDICT_VETOED: u32 = 32;
/// `CheckReply::verdict` bit: the client had no entry, and this check (`hits > 0`) made one, or,
/// with `VERDICT_OVERFLOW`, charged the shared overflow budget because the map could not take
/// one. The agent charges such checks to a TCP caller's new-client cap.
pub const VERDICT_NEW: u32 = 64;

/// An API check, as the agent writes it into a check frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckRequest {
    /// The client: an address (IPv4-mapped) or the first 16 bytes of the SHA-256 of an ID.
    pub key: [u8; 16],
    /// Hits to consume; 0 reads without consuming (and creates no entry). For `CHECK_PROBE`, the
    /// hits to probe for (nothing is consumed).
    pub hits: u32,
    /// `CHECK_*`.
    pub flags: u32,
    /// For `CHECK_NAMED`: the ID's policy, resolved by the agent.
    pub policy: Policy,
    pub _pad: u32,
}

/// The program's answer, written over the frame's reply area.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckReply {
    /// The client's state right after the decision.
    pub state: ClientState,
    /// The CLOCK_MONOTONIC time the decision was taken at (ns).
    pub now_ns: u64,
    /// `VERDICT_*` bits.
    pub verdict: u32,
    pub _pad: u32,
}

/// A slot of a check frame as the program leaves it: the request, whose key the program
/// overwrites for an address with the key of its client's entry (the address's own, or its
/// group's), and the reply. A read (`hits` 0) of an address that has no entry leaves the
/// address itself (nothing was created, and a read is never noted hot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckSlot {
    pub request: CheckRequest,
    pub reply: CheckReply,
}

/// `MapConfig::flags`: adaptive windows are on; the fast path reports newly active clients to the
/// agent through `ACTIVE`.
pub const CONFIG_ADAPTIVE: u32 = 1;
/// `MapConfig::flags`: the agent is a cluster member enforcing global policies. The programs
/// push the key of a client of a global policy (`GLOBAL_POLICIES`) to `HOT` when it grows hot
/// (see [`hot_count`]), and decide clients that have an entry in `GRANTS` with the allowance the
/// grant gives.
pub const CONFIG_CLUSTER: u32 = 2;
/// `MapConfig::flags`: `STATIC_CLIENTS` is empty (the config has no exact-address policy), so
/// the packet and check paths skip its lookup: a client over its limit, held in `LIMITED`,
/// otherwise pays a miss there on every packet it drops (6–9% of the receiver's time per packet
/// at 100k sources, measured). The agent clears the flag, and waits for running programs to end,
/// before it puts the first entry in the map, and sets it only after the map is emptied; clear
/// (as older agents leave it), the lookup is made. An older agent adopting maps pinned by this
/// one only clears it with its first policy write, after its static entries went in.
pub const CONFIG_NO_STATIC: u32 = 4;

/// Size of the `HOT` ring buffer: the keys of the global clients the programs report hot while
/// `CONFIG_CLUSTER` is set, for the agent's cluster enrolment (24 bytes a record: 10,922 notices
/// between two reads, one sync interval apart). A client is reported when its count in a window
/// reaches [`hot_count`] of its share in force (once per window: the one admission that takes
/// the count there), when a packet of it moves its entry into `LIMITED`, and on its first
/// denial and one in 256 after that in an entry that does not move. A refused push is not
/// retried: the next window's crossing reports the client again, and the agent also finds
/// global clients in `LIMITED` when it starts.
pub const HOT_RING_BYTES: u32 = 1 << 18;

/// The count in one window at which a client of a global policy grows hot on this node: 0.8 of
/// the share in force (`limit`), rounded up, so that its owner can enrol it, and give it slack,
/// before it loses a packet. 0 for a `limit` of 0 (a count never crosses it).
#[inline(always)]
pub const fn hot_count(limit: u32) -> u32 {
    // ⌈4·limit / 5⌉; `4 · u32::MAX` fits a u64.
    (limit as u64 * 4).div_ceil(5) as u32
}

/// Whether a window's count going from `before` to `after` crosses [`hot_count`] of `limit`:
/// `before < ⌈0.8 · limit⌉ ≤ after`, computed without a division (for integer counts,
/// `c ≥ ⌈4·limit/5⌉` exactly when `5·c ≥ 4·limit`; all in u64, which holds `5 · u32::MAX`). The
/// fast path's test, on the one admission that takes the count there.
#[inline(always)]
pub const fn crosses_hot(before: u32, after: u32, limit: u32) -> bool {
    let at = limit as u64 * 4;
    (before as u64 * 5) < at && (after as u64 * 5) >= at
}

/// Whether `hits` admitted at `now_ns` took an entry's count in the current window from below
/// [`hot_count`] of `limit` (the share in force) to at or above it ([`crosses_hot`]): the
/// crossing the fast path reports once per window, computed by the agent from a check's reply
/// (`slots` after the decision). A check admitted on another CPU in between may take the
/// crossing from both: the next window's brings it.
pub fn grew_hot(
    slots: &[u64; 2],
    now_ns: u64,
    window_ns: core::num::NonZeroU64,
    limit: u32,
    hits: u32,
) -> bool {
    let (_, count) = crate::window::counts(slots, now_ns / window_ns);
    hits != 0 && crosses_hot(count.saturating_sub(hits), count, limit)
}

/// Words of the `GLOBAL_POLICIES` bitmap: one bit for each policy id up to [`MAX_POLICY_ID`].
pub const GLOBAL_POLICY_WORDS: usize = (MAX_POLICY_ID as usize + 1) / 64;

/// The value of `GLOBAL_POLICIES`' one entry, written by the agent with the policies: bit
/// `id % 64` of word `id / 64` is set for each global `limit` policy. The programs read it only
/// when a client grows hot, to report to `HOT` the clients the cluster splits and no other.
pub type GlobalPolicies = [u64; GLOBAL_POLICY_WORDS];

/// Whether policy `id` is global in `bits` (ids above [`MAX_POLICY_ID`] are read modulo it, as
/// the entries store them).
#[inline(always)]
pub fn is_global(bits: &GlobalPolicies, id: u16) -> bool {
    let id = (id & MAX_POLICY_ID) as usize;
    (bits[(id >> 6) & (GLOBAL_POLICY_WORDS - 1)] >> (id & 63)) & 1 != 0
}

/// Sets policy `id`'s bit in `bits` (see [`is_global`]).
pub fn set_global(bits: &mut GlobalPolicies, id: u16) {
    let id = (id & MAX_POLICY_ID) as usize;
    bits[(id >> 6) & (GLOBAL_POLICY_WORDS - 1)] |= 1 << (id & 63);
}

/// A global client's allowance from its owner in the cluster: the value of `GRANTS`, keyed like
/// the client's entry. The fast path decides the client with [`Grant::limit_at`] instead of the
/// entry's own limit (the cold share). The lease is enforced here, in the kernel: a raise lapses
/// at `until_ns` back to the cold share even if the agent that wrote it is dead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// Packets per policy window the owner granted.
    pub value: u32,
    /// The agent's, never read here: the silence limit (ms) the holder kept the grant under, so
    /// that an agent restarting with a shorter one keeps an adopted grant as long as its owner
    /// counts on it.
    pub silence_ms: u32,
    /// CLOCK_MONOTONIC (ns) at which the lease ends: from then on the grant counts only as far
    /// as it is below the cold share (a cut stays, a raise lapses).
    pub until_ns: u64,
}

impl Grant {
    /// The allowance at `now_ns` for an entry whose own limit (the cold share) is `cold`.
    #[inline(always)]
    pub fn limit_at(&self, now_ns: u64, cold: u32) -> u32 {
        if now_ns < self.until_ns || self.value < cold {
            self.value
        } else {
            cold
        }
    }
}

/// The single entry of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapConfig {
    /// Bumped by the agent on every policy change; clients re-resolve lazily.
    pub generation: u32,
    /// `MODE_ENFORCE` or `MODE_DRY_RUN`.
    pub mode: u32,
    /// `CONFIG_*` bits.
    pub flags: u32,
    /// The group length (a `Policy::group` value, without `GROUP_SPLIT`) the fast path tries
    /// first for an IPv4 and an IPv6 source: that of the family's bare trie entry (`default`, or
    /// a `0.0.0.0/0` or `::/0` policy in its place), which most policies inherit.
    /// A packet whose client is keyed otherwise pays a policy lookup (see `addr::group_key`).
    pub fast_group: [u8; 2],
    pub _pad: u16,
}

/// Size of the `ACTIVE` ring buffer, which carries the key of each newly active client from the
/// fast path to the agent's adaptive controller. A record is the 16-byte key plus the ring's
/// 8-byte header, so 1 MiB holds 43,690 records: that many clients can become active within one
/// controller period before reports are refused. A refused report is not lost for good: the
/// client stays unreported and is offered again at its next window rollover.
pub const ACTIVE_RING_BYTES: u32 = 1 << 20;

/// EtherType of an adapt frame: the agent runs the `limiter_adapt` program on one with
/// BPF_PROG_TEST_RUN to change the effective window and allowance of clients in place (see
/// [`AdaptSlot`]). Another IEEE 802 "local experimental" value; the attached program passes such
/// frames as non-IP.
pub const ADAPT_ETHERTYPE: u16 = 0x88B6;
/// Offset of the first [`AdaptSlot`] in an adapt frame (8-byte aligned, like check frames).
pub const ADAPT_OFFSET: usize = 16;
/// Length of one slot.
pub const ADAPT_SLOT_LEN: usize = size_of::<AdaptSlot>();
/// Most slots in one adapt frame: one BPF_PROG_TEST_RUN call costs ~0.8 µs of fixed overhead,
/// so batching amortises it. The program runs its slots with `bpf_loop` (Linux 5.17, commit
/// e6f2dd0f8067), whose callback the verifier checks once: unrolled, the policy refresh and
/// rescale with their compare-and-swap branches let only 4 slots fit its budget (10k changes
/// took 2,500 calls; now 157). 64 slots of 40 bytes fit the 3,072 bytes a test-run frame can
/// carry (see [`CHECK_BATCH`]).
pub const ADAPT_BATCH: usize = 64;
/// Bounds a slot's index for the verifier (see [`CHECK_SLOT_MASK`]).
pub const ADAPT_SLOT_MASK: usize = ADAPT_BATCH.next_power_of_two() - 1;
const _: () = assert!(ADAPT_OFFSET + ADAPT_BATCH * ADAPT_SLOT_LEN <= 3072);

/// Bytes 14..16 of an adapt frame (after the ethertype): what its slots are. [`AdaptSlot`]s,
/// changes to apply.
pub const ADAPT_KIND_WRITE: u16 = 0;
/// Bytes 14..16 of an adapt frame: [`AdaptRead`]s, entries to copy out. The adaptive loop reads
/// its tracked clients' counters this way, dozens per call, instead of one lookup syscall each.
pub const ADAPT_KIND_READ: u16 = 1;
/// Length of one read slot.
pub const ADAPT_READ_LEN: usize = size_of::<AdaptRead>();
/// Most read slots in one adapt frame.
pub const ADAPT_READ_BATCH: usize = (3072 - ADAPT_OFFSET) / ADAPT_READ_LEN;
/// Bounds a read slot's index for the verifier.
pub const ADAPT_READ_MASK: usize = ADAPT_READ_BATCH.next_power_of_two() - 1;

/// A resident entry to copy out, as the agent writes it into a read frame of the adapt program
/// (see [`ADAPT_KIND_READ`]); the program fills `state`, `home` and `result` in place.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdaptRead {
    /// The entry's key.
    pub key: [u8; 16],
    /// A copy of the entry (volatile reads of each word: counters other CPUs change may be a
    /// few packets apart, which a rate does not mind).
    pub state: ClientState,
    /// Where it lives: `HOME_CLIENTS`, `HOME_STATIC`, `HOME_LIMITED`, `HOME_NAMED_STATIC` or
    /// `HOME_NAMED`.
    pub home: u32,
    /// `ADAPT_APPLIED` (copied) or `ADAPT_NOT_RESIDENT`; 0: not reached.
    pub result: u32,
}

/// `AdaptRead::home`: the entry is in `CLIENTS` (LRU).
pub const HOME_CLIENTS: u32 = 0;
/// `AdaptRead::home`: the entry is in `STATIC_CLIENTS`.
pub const HOME_STATIC: u32 = 1;
/// `AdaptRead::home`: the entry is in `LIMITED`.
pub const HOME_LIMITED: u32 = 2;
/// `AdaptRead::home`: the entry is an API ID's, in `NAMED_STATIC` (address keys and ID keys,
/// SHA-256 prefixes, do not meet).
pub const HOME_NAMED_STATIC: u32 = 3;
/// `AdaptRead::home`: the entry is an API ID's, in `NAMED` (LRU).
pub const HOME_NAMED: u32 = 4;

/// `AdaptSlot::flags`: the agent stops tracking the client: return it to the policy it resolves
/// to (the slot's `limit`, `window_us` and `generation` are ignored) and clear its
/// `FLAG_REPORTED`, so that its next window reports it again.
pub const ADAPT_RELEASE: u32 = 1;
/// `AdaptSlot::flags`: only bring the client's cached policy up to the current generation (the
/// agent's in-place refresh of every entry, see [`GENERATION_SWEEP`]); `result` is
/// `ADAPT_UNCHANGED`, `ADAPT_STALE` (contended: the client is busy and its packets will refresh
/// it), or `ADAPT_NOT_RESIDENT`.
pub const ADAPT_REFRESH: u32 = 2;

/// `AdaptSlot::result`: the window and allowance were changed and the slots rescaled.
pub const ADAPT_APPLIED: u32 = 1;
/// `AdaptSlot::result`: the entry already had this window and allowance.
pub const ADAPT_UNCHANGED: u32 = 2;
/// `AdaptSlot::result`: the client has no entry (evicted, or never created).
pub const ADAPT_NOT_RESIDENT: u32 = 3;
/// `AdaptSlot::result`: the request was computed for another policy generation; nothing changed.
pub const ADAPT_STALE: u32 = 4;
/// `AdaptSlot::result`: the client's policy does not limit it (`pass` or `drop`); only
/// `ADAPT_RELEASE` was applied.
pub const ADAPT_SKIPPED: u32 = 5;
/// `AdaptSlot::result`: the window is outside 10 ms ..= 1 h or the allowance is 0.
pub const ADAPT_INVALID: u32 = 6;

/// One change of a client's effective window and allowance, as the agent writes it into an adapt
/// frame; the program writes `result` in place.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdaptSlot {
    /// The client's address (IPv4-mapped).
    pub key: [u8; 16],
    /// Effective allowance `A` per effective window.
    pub limit: u32,
    /// Effective window `W`, µs.
    pub window_us: u32,
    /// `MapConfig::generation` the agent computed this for; another one makes it `ADAPT_STALE`.
    pub generation: u32,
    /// `ADAPT_*` request bits.
    pub flags: u32,
    /// `ADAPT_*` result, written by the program (0: not reached).
    pub result: u32,
    pub _pad: u32,
}

/// Operator view of the adaptive controller, the single entry of the `ADAPTIVE` array: written
/// by the agent once per period, read by `limiter stats`. Never read by the XDP programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdaptiveStatus {
    /// Smoothed CPU utilisation, parts per million.
    pub cpu_ppm: u32,
    /// Global load factor `g`, parts per million.
    pub load_factor_ppm: u32,
    /// Controller period, µs (0: adaptive windows are off).
    pub period_us: u32,
    /// Clients the controller tracks.
    pub tracked: u32,
    /// Periods run since the agent started.
    pub periods: u64,
}

/// Host side only: the BPF target has no floating point.
#[cfg(feature = "user")]
impl AdaptiveStatus {
    /// The agent runs the controller.
    pub fn enabled(&self) -> bool {
        self.period_us != 0
    }

    /// Smoothed CPU utilisation, 0 to 1.
    pub fn cpu(&self) -> f64 {
        self.cpu_ppm as f64 / 1e6
    }

    /// The global load factor `g` in force: 1 while adaptive windows are off.
    pub fn load_factor(&self) -> f64 {
        if self.enabled() {
            self.load_factor_ppm as f64 / 1e6
        } else {
            1.0
        }
    }
}

/// Global counters, one copy per CPU (`STATS` per-CPU array); the reader sums them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalStats {
    /// IP packets passed by the limiter (including allow-listed clients).
    pub passed: u64,
    /// IP packets dropped (in dry-run: that would have been dropped; they pass).
    pub dropped: u64,
    /// Frames that are not IPv4 or IPv6; passed untouched.
    pub non_ip: u64,
    /// Truncated or malformed frames; passed untouched.
    pub malformed: u64,
    /// Client entries created in `CLIENTS`. Once the map is full each one evicts the least
    /// recently used dynamic client.
    pub new_clients: u64,
    /// Packets whose client entry could not be created (map full and nothing evictable); they
    /// were charged to the shared `OVERFLOW` budget instead of passing unlimited.
    pub map_full: u64,
    /// Policy lookups in the LPM trie (first packet of a client, or after a policy change).
    pub resolves: u64,
    /// Packets denied because the window state was contended past the retry bound.
    pub contended: u64,
    /// Clients moved from `CLIENTS` into the never-evicted `LIMITED` map on their first dropped
    /// packet, so that a flood of new sources cannot evict them and hand them a fresh window.
    pub limited_moves: u64,
    /// Dropped packets of a `CLIENTS` entry that could not move into `LIMITED` because it was
    /// full: the client stayed in `CLIENTS`, where eviction can still reset it.
    pub limited_full: u64,
}

impl GlobalStats {
    /// Adds another CPU's counters to these.
    pub fn add(&mut self, other: &GlobalStats) {
        self.passed += other.passed;
        self.dropped += other.dropped;
        self.non_ip += other.non_ip;
        self.malformed += other.malformed;
        self.new_clients += other.new_clients;
        self.map_full += other.map_full;
        self.resolves += other.resolves;
        self.contended += other.contended;
        self.limited_moves += other.limited_moves;
        self.limited_full += other.limited_full;
    }
}

const _: () = assert!(size_of::<Policy>() == 12);
const _: () = assert!(size_of::<Grant>() == 16);
const _: () = assert!(size_of::<ClientState>() == 40);
const _: () = assert!(size_of::<MapConfig>() == 16);
const _: () = assert!(size_of::<AdaptSlot>() == 40);
const _: () = assert!(size_of::<AdaptRead>() == 64);
const _: () = assert!(size_of::<AdaptiveStatus>() == 24);
const _: () = assert!(size_of::<GlobalStats>() == 80);
const _: () = assert!(size_of::<CheckRequest>() == 40);
const _: () = assert!(size_of::<CheckReply>() == 56);
const _: () = assert!(size_of::<GlobalPolicies>() == 4096);
const _: () = assert!(size_of::<CheckSlot>() == CHECK_SLOT_LEN);

#[cfg(feature = "user")]
mod pod {
    // Every one of these is `#[repr(C)]`, built only of integers, without padding (sizes are
    // asserted above), so every bit pattern is a valid value.
    // SAFETY: `Policy` is repr(C) integers without padding (see above).
    unsafe impl aya::Pod for super::Policy {}
    // SAFETY: `ClientState` is repr(C) integers without padding (see above).
    unsafe impl aya::Pod for super::ClientState {}
    // SAFETY: `MapConfig` is repr(C) integers without padding (see above).
    unsafe impl aya::Pod for super::MapConfig {}
    // SAFETY: `GlobalStats` is repr(C) integers without padding (see above).
    unsafe impl aya::Pod for super::GlobalStats {}
    // SAFETY: `CheckRequest` is repr(C) integers without padding (see above).
    unsafe impl aya::Pod for super::CheckRequest {}
    // SAFETY: `CheckReply` is repr(C) integers without padding (see above).
    unsafe impl aya::Pod for super::CheckReply {}
    // SAFETY: `CheckSlot` is two such structs, without padding (see above).
    unsafe impl aya::Pod for super::CheckSlot {}
    // SAFETY: `AdaptSlot` is repr(C) integers without padding (see above).
    unsafe impl aya::Pod for super::AdaptSlot {}
    // SAFETY: `#[repr(C)]`, only integers and a `ClientState`, no padding (64 bytes, asserted).
    unsafe impl aya::Pod for super::AdaptRead {}
    // SAFETY: `AdaptiveStatus` is repr(C) integers without padding (see above).
    unsafe impl aya::Pod for super::AdaptiveStatus {}
    // SAFETY: `Grant` is repr(C) integers without padding (see above).
    unsafe impl aya::Pod for super::Grant {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(limit: u32, window_us: u32, id: u16, action: u8) -> Policy {
        Policy {
            limit,
            window_us,
            id,
            action,
            group: 0,
        }
    }

    #[test]
    fn a_fresh_entry_carries_its_policy_in_the_counter_words() {
        let s = ClientState::fresh(&policy(100, 1_000_000, 0x7abc, ACTION_LIMIT), 0x1_8005);
        assert_eq!(
            (s.limit, s.window_us, s.action()),
            (100, 1_000_000, ACTION_LIMIT)
        );
        assert_eq!((s.policy(), s.generation_tag(), s.flags()), (0x7abc, 5, 0));
        assert!(s.is_current(0x1_8005) && s.is_current(5) && !s.is_current(6));
        assert_eq!((s.total_passed(), s.dropped_count()), (0, 0));
    }

    #[test]
    fn the_hot_count_is_four_fifths_rounded_up() {
        for (limit, hot) in [
            (0, 0),
            (1, 1),
            (4, 4),
            (5, 4),
            (10, 8),
            (11, 9),
            (1000, 800),
        ] {
            assert_eq!(hot_count(limit), hot, "limit {limit}");
        }
        assert_eq!(hot_count(u32::MAX), 3_435_973_836);
        for limit in 0..10_000u32 {
            let hot = hot_count(limit);
            assert!(5 * u64::from(hot) >= 4 * u64::from(limit));
            assert!(hot == 0 || 5 * u64::from(hot - 1) < 4 * u64::from(limit));
        }
    }

    #[test]
    fn crossing_without_a_division_agrees_with_the_hot_count() {
        for limit in (0..2_000u32).chain([u32::MAX - 1, u32::MAX]) {
            let at = hot_count(limit);
            for before in [0, at.saturating_sub(2), at.saturating_sub(1), at, at + 1] {
                for after in [before, before + 1, at, at + 1, limit] {
                    let expected = before < at && after >= at;
                    assert_eq!(
                        crosses_hot(before, after, limit),
                        expected,
                        "limit {limit}, {before} → {after}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_check_grows_hot_once_a_window() {
        use crate::window::admit;
        use core::num::NonZeroU64 as WindowNs;
        let w = WindowNs::new(1_000_000_000).unwrap();
        let mut slots = [0u64; 2];
        let t = 7 * w.get() + 1;
        // Share 10: hot at the 8th hit, and only there.
        let (mut hot, mut at) = (0, 0);
        for i in 1..=10 {
            assert!(admit(&mut slots, t, w, 10, 1));
            if grew_hot(&slots, t, w, 10, 1) {
                hot += 1;
                at = i;
            }
        }
        assert_eq!((hot, at), (1, 8));
        // A batch that jumps over 8 crosses too; a read never does.
        let mut slots = [0u64; 2];
        assert!(admit(&mut slots, t, w, 10, 5) && !grew_hot(&slots, t, w, 10, 5));
        assert!(admit(&mut slots, t, w, 10, 4) && grew_hot(&slots, t, w, 10, 4));
        assert!(!grew_hot(&slots, t, w, 10, 0));
        // A later window starts below it again.
        let next = t + 2 * w.get();
        assert!(admit(&mut slots, next, w, 10, 8) && grew_hot(&slots, next, w, 10, 8));
    }

    #[test]
    fn the_global_policy_bits_name_each_id() {
        let mut bits = [0u64; GLOBAL_POLICY_WORDS];
        for id in [0, 1, 63, 64, 4097, MAX_POLICY_ID] {
            assert!(!is_global(&bits, id));
            set_global(&mut bits, id);
            assert!(is_global(&bits, id));
        }
        let set = (0..=MAX_POLICY_ID)
            .filter(|&id| is_global(&bits, id))
            .count();
        assert_eq!(set, 6);
    }

    proptest::proptest! {
        /// A probe answers what a spend of the same hits on the same state would (the sliding
        /// window's own `admit`, for hits > 0), and what a read says is left (the estimate
        /// leaves room for them: 0 hits always fit) for a limit; anything for `pass`, nothing
        /// for `drop`; and it changes nothing.
        #[test]
        fn a_probe_admits_what_a_spend_would(
            counts in proptest::array::uniform2(0u32..40),
            tags in proptest::array::uniform2(0u32..6),
            window_ms in 10u64..3_000,
            at in 0u64..6_000_000_000,
            limit in 0u32..40,
            hits in 0u32..45,
            action in 0u8..3,
        ) {
            use crate::window::{admit, estimate_at, slot};
            let policy = policy(limit, window_ms as u32 * 1000, 1, action);
            let mut state = ClientState::fresh(&policy, 1);
            state.slots = [slot(tags[0], counts[0]), slot(tags[1], counts[1])];
            let before = state;
            let probed = state.admits(at, hits);
            proptest::prop_assert_eq!(state, before);
            let expected = match state.action() {
                ACTION_PASS => true,
                ACTION_DROP => false,
                _ => {
                    let w = core::num::NonZeroU64::new(u64::from(state.window_us) * 1000).unwrap();
                    let mut slots = state.slots;
                    let left = u64::from(state.limit).saturating_sub(estimate_at(&slots, at, w));
                    let fits = u64::from(hits) <= left;
                    if hits > 0 {
                        let admitted = admit(&mut slots, at, w, state.limit, hits);
                        proptest::prop_assert_eq!(admitted, fits);
                    }
                    fits
                }
            };
            proptest::prop_assert_eq!(probed, expected);
        }
    }

    #[test]
    fn the_action_is_carried_by_the_limits() {
        let pass = ClientState::fresh(&policy(9, 1_000_000, 1, ACTION_PASS), 1);
        assert_eq!((pass.window_us, pass.action()), (0, ACTION_PASS));
        let drop = ClientState::fresh(&policy(9, 0, 2, ACTION_DROP), 1);
        assert_eq!((drop.limit, drop.action()), (0, ACTION_DROP));
        assert!(drop.window_us >= crate::window::MIN_WINDOW_US);
        let zero = ClientState::fresh(&policy(0, 1_000_000, 3, ACTION_LIMIT), 1);
        assert_eq!(zero.action(), ACTION_DROP);
    }

    #[test]
    fn setters_touch_only_their_own_bits() {
        let mut s = ClientState::fresh(&policy(5, 10_000, 3, ACTION_LIMIT), 7);
        s.set_flags(FLAG_STATIC | FLAG_REPORTED);
        s.set_passed_count(u64::MAX);
        s.set_dropped_count((1 << 48) + 9);
        assert_eq!((s.passed_count(), s.dropped_count()), (COUNTER_MASK, 9));
        assert_eq!((s.policy(), s.generation_tag()), (3, 7));
        assert_eq!(s.flags(), FLAG_STATIC | FLAG_REPORTED);
        s.set_policy(MAX_POLICY_ID);
        s.set_generation_tag(0);
        s.set_flags(0);
        assert_eq!((s.passed_count(), s.dropped_count()), (COUNTER_MASK, 9));
        assert_eq!(
            (s.policy(), s.generation_tag(), s.flags()),
            (MAX_POLICY_ID, 0, 0)
        );
    }

    #[test]
    fn a_raise_lapses_to_the_cold_share_and_a_cut_stays() {
        let raise = Grant {
            value: 25,
            silence_ms: 0,
            until_ns: 1_000,
        };
        assert_eq!(
            (raise.limit_at(999, 10), raise.limit_at(1_000, 10)),
            (25, 10)
        );
        let cut = Grant { value: 4, ..raise };
        assert_eq!((cut.limit_at(999, 10), cut.limit_at(5_000, 10)), (4, 4));
    }

    #[test]
    fn total_passed_wraps_modulo_2_48() {
        let mut s = ClientState::fresh(&policy(5, 10_000, 3, ACTION_LIMIT), 7);
        // A rescale left `passed` 4 "below zero" and carried 6 into a slot.
        s.set_passed_count(4u64.wrapping_neg());
        s.slots = [crate::window::slot(10, 6), crate::window::slot(9, 1)];
        assert_eq!(s.total_passed(), 3);
        assert_eq!(s.generation_tag(), 7);
    }
}
