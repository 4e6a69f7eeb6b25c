//! The API check program. `limiter_check` is never attached: the agent runs it with
//! BPF_PROG_TEST_RUN on a crafted check frame to decide an API check with the same maps and the
//! same code as the packets, so an address has one budget on the wire and in the API. API IDs
//! that are not addresses live in `NAMED` and `NAMED_STATIC`, the counterparts of `CLIENTS` and
//! `STATIC_CLIENTS`. A frame of probes (`CHECK_PROBE`) followed by `CHECK_UNLESS_VETOED` checks
//! spends all or none in one run: a probe that does not fit sets the frame's veto byte, and
//! the checks after it are then not made.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action, xdp_md},
    helpers::generated::bpf_loop,
    macros::xdp,
    programs::XdpContext,
};
use limiter_common::{
    CheckReply, CheckRequest, ClientState, GlobalStats, MapConfig,
    addr::ClientKey,
    maps::{
        CHECK_BATCH, CHECK_ETHERTYPE, CHECK_NAMED, CHECK_PROBE, CHECK_REPLY_OFFSET,
        CHECK_REQUEST_OFFSET, CHECK_SLOT_LEN, CHECK_SLOT_MASK, CHECK_STATIC, CHECK_UNLESS_VETOED,
        CHECK_VETO_OFFSET, CONFIG_CLUSTER, META_FLAG, VERDICT_ALLOWED, VERDICT_NEW,
        VERDICT_NOT_RESIDENT, VERDICT_OVERFLOW, VERDICT_VETOED, VERDICT_WONT_FIT, VERDICT_WRITTEN,
    },
};

use crate::{
    counter::add_up,
    entry::{
        Home, Located, Run, count_check, create_entry, decide_hits, locate_resolved, now_for,
        overflow_entry, set_policy,
    },
    maps::{CONFIG, GRANTS, NAMED, NAMED_STATIC},
    parse::{ptr_at, read},
};

/// Runs one API check (see the module docs). The frame carries a `CheckRequest` at
/// `CHECK_REQUEST_OFFSET`; the program writes a `CheckReply` at `CHECK_REPLY_OFFSET` and returns
/// `XDP_PASS`, or `XDP_ABORTED` for a frame that is not a check frame.
#[xdp]
pub fn limiter_check(ctx: XdpContext) -> u32 {
    try_check(&ctx).unwrap_or(xdp_action::XDP_ABORTED)
}

/// The state `bpf_loop` hands each iteration: the program's context (the frame).
#[repr(C)]
struct Slots {
    ctx: *mut xdp_md,
}

#[inline(always)]
fn try_check(ctx: &XdpContext) -> Option<u32> {
    if read::<u16>(ctx, 12).map(u16::from_be) != Some(CHECK_ETHERTYPE) {
        return None;
    }
    // At least one whole slot; then as many as the frame holds, up to CHECK_BATCH, in order.
    ptr_at::<CheckReply>(ctx, CHECK_REPLY_OFFSET)?;
    let len = ctx.data_end().saturating_sub(ctx.data());
    let slots = (len.saturating_sub(CHECK_REQUEST_OFFSET) / CHECK_SLOT_LEN).min(CHECK_BATCH);
    let mut state = Slots { ctx: ctx.ctx };
    // SAFETY: `check_slot` has the callback signature bpf_loop (Linux 5.17) calls, and `state`
    // outlives the call.
    unsafe {
        bpf_loop(
            slots as u32,
            check_slot as *mut c_void,
            (&raw mut state).cast(),
            0,
        );
    }
    Some(xdp_action::XDP_PASS)
}

/// One slot of a check frame: `bpf_loop`'s callback, verified once however many slots a frame
/// has. Returns 1 to stop (a slot it could not decide). The work is in the global function
/// [`limiter_check_slot`].
#[inline(never)]
extern "C" fn check_slot(index: u32, state: *mut c_void) -> i64 {
    // SAFETY: `state` is the `Slots` `try_check` passed.
    let ctx = unsafe { (*state.cast::<Slots>()).ctx };
    stop_or_continue(limiter_check_slot(ctx, index))
}

/// A `bpf_loop` callback's return value, 0 (continue) or 1 (stop), from the answer of a global
/// function, of which the verifier knows nothing but that it is a scalar (and a callback must
/// return a value it can prove to be 0 or 1). The volatile read keeps the compiler from dropping
/// the comparison on what it knows of the function.
#[inline(always)]
pub(crate) fn stop_or_continue(answer: i64) -> i64 {
    // SAFETY: a read of a local.
    if unsafe { core::ptr::read_volatile(&answer) } == 0 {
        0
    } else {
        1
    }
}

/// One slot of a check frame (see [`check_slot`]), in a global function (`#[no_mangle]`: BTF
/// linkage global), which the verifier checks once, on its own, as it checks a program: its
/// arguments typed by their BTF (`ctx` the program's context, `index` any scalar), and each call
/// only checked against that signature.
///
/// Why not in the callback itself: the verifier walks a `bpf_loop` callback as the body of a loop
/// (Linux 6.7, "bpf: verify callbacks as if they are called unknown number of times"), and while
/// it explores that loop it only prunes a path against a state whose scalar ranges contain the
/// path's, precise or not. Two paths that differ only in a constant (a counter 0 or 1, a verdict
/// bit, a window length's range) were both walked to the end (4,659 states reached the reply
/// write in the callback, differing in such slots), so every branch of the decision multiplied
/// the paths: 1M instructions, E2BIG, on 6.18.44-fc-v1272 (whose verifier tracks stack liveness
/// path-insensitively: `mark_read 0`). In a global function they prune as a program's do: 106k
/// instructions for the whole program.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn limiter_check_slot(ctx: *mut xdp_md, index: u32) -> i64 {
    let ctx = XdpContext::new(ctx);
    // bpf_loop runs at most CHECK_BATCH iterations (`try_check`). The mask bounds the slot
    // offset for the verifier, which knows nothing of the index but its type (a comparison would
    // let the compiler drop it); the frame bounds check below is what keeps the read inside.
    let index = index as usize & CHECK_SLOT_MASK;
    // Before the slot's bounds check, which would imply this one: the compiler would drop it,
    // and the verifier does not carry the slot's range over to the frame's start.
    let Some(veto) = ptr_at::<u8>(&ctx, CHECK_VETO_OFFSET) else {
        return 1;
    };
    let veto = veto.cast_mut();
    let Some(config) = CONFIG.get(0) else {
        return 1;
    };
    let offset = CHECK_REQUEST_OFFSET + index * CHECK_SLOT_LEN;
    let Some(request_at) = ptr_at::<CheckRequest>(&ctx, offset) else {
        return 1;
    };
    // SAFETY: `ptr_at` checked that the request lies inside the frame.
    let mut request = unsafe { request_at.read_unaligned() };
    let Some(reply) = ptr_at::<CheckReply>(&ctx, offset + size_of::<CheckRequest>()) else {
        return 1;
    };
    // All or none (`CHECK_PROBE`, `CHECK_UNLESS_VETOED`): a vetoed check is not made.
    // SAFETY: `ptr_at` checked that the veto byte and the reply lie inside the frame.
    unsafe {
        if request.flags & CHECK_UNLESS_VETOED != 0 && veto.read_volatile() != 0 {
            (&raw mut (*reply.cast_mut()).verdict)
                .write_unaligned(VERDICT_WRITTEN | VERDICT_VETOED);
            return 0;
        }
    }
    let probe = request.flags & CHECK_PROBE != 0;
    let need = request.hits;
    if probe {
        request.hits = 0;
    }
    let mut counted = GlobalStats::default();
    let done = check_one(
        &request,
        if probe { need } else { 0 },
        reply.cast_mut(),
        config,
        &mut counted,
    );
    count_check(&counted);
    let Some((key, wont_fit)) = done else {
        return 1;
    };
    if wont_fit {
        // SAFETY: `check_one` wrote the reply, inside the frame (`ptr_at`).
        unsafe {
            let verdict = (&raw const (*reply).verdict).read_unaligned();
            (&raw mut (*reply.cast_mut()).verdict).write_unaligned(verdict | VERDICT_WONT_FIT);
            veto.write_volatile(1);
        }
    }
    // The key of the client's entry over the request's (see `check_one`), once its paths have
    // joined: written inside them, the verifier would explore the store once for each.
    // SAFETY: `ptr_at` checked that the request lies inside the frame.
    unsafe { (&raw mut (*request_at.cast_mut()).key).write_unaligned(key) };
    0
}

/// Decides one check and writes its reply; returns the key of the client's entry (an ID's, an
/// address's own or its group's), which `check_slot` writes over the request's key in the frame
/// for the agent to report a global client that grows hot through the API (see `Checker`'s hot
/// notices), and for a probe (`need`, the hits it asks about; 0 for any other check) whether
/// they do not fit. A probe that does not fit counts them as dropped, as a denied check does:
/// the client was asked for them and refused, and a member of a cluster reports demand as
/// passed + dropped (a rate limit service request denied by one descriptor spends nothing, and
/// without this its demand would never show above what it was admitted).
#[inline(always)]
fn check_one(
    request: &CheckRequest,
    need: u32,
    reply: *mut CheckReply,
    config: &MapConfig,
    counted: &mut GlobalStats,
) -> Option<(ClientKey, bool)> {
    let mut verdict = 0;
    let mut state_ptr = None;
    let mut fresh = None;
    // The key of the client's entry: the ID's, or the address's own or its group's.
    let mut key = request.key;
    if request.flags & CHECK_NAMED != 0 {
        let static_id = request.flags & CHECK_STATIC != 0;
        // The other map too: while the agent moves an ID between the two (its exact-ID policy
        // was just added or removed) a check may still carry the old flag, and must find the
        // ID's state rather than start it afresh.
        let found = if static_id {
            NAMED_STATIC
                .get_ptr_mut(&request.key)
                .or_else(|| NAMED.get_ptr_mut(&request.key))
        } else {
            NAMED
                .get_ptr_mut(&request.key)
                .or_else(|| NAMED_STATIC.get_ptr_mut(&request.key))
        };
        if let Some(p) = found {
            // SAFETY: live map value; the agent passes the ID's current policy. Should the id not
            // be stored (contended), the next check of the ID stores it.
            unsafe { set_policy(p, &request.policy) };
            state_ptr = Some(p);
        } else if request.hits == 0 {
            fresh = Some(ClientState::fresh(&request.policy, 0));
        } else {
            verdict |= VERDICT_NEW;
            let mut entry = ClientState::fresh(&request.policy, 0);
            let created = if static_id {
                entry.passed |= META_FLAG; // FLAG_STATIC
                NAMED_STATIC.insert(&request.key, &entry, BPF_NOEXIST as u64)
            } else {
                NAMED.insert(&request.key, &entry, BPF_NOEXIST as u64)
            }
            .is_ok();
            let again = if static_id {
                NAMED_STATIC.get_ptr_mut(&request.key)
            } else {
                NAMED.get_ptr_mut(&request.key)
            };
            if let Some(p) = again {
                counted.new_clients += created as u64;
                state_ptr = Some(p);
            } else {
                verdict |= VERDICT_OVERFLOW;
                state_ptr = overflow_entry(&request.policy, 0, counted, Run::Agent);
            }
        }
    } else {
        // Through the trie (`locate_resolved`): one lookup path for reads and for checks that
        // spend. A denied check does not move the entry into `LIMITED` (the client's next
        // dropped packet does): a check-role caller could otherwise fill that never-evicted map
        // without sending a packet, by checking clients it spends out itself.
        let full_before = counted.map_full;
        match locate_resolved(&request.key, config, counted)? {
            Located::Found(p, _, k) => {
                key = k;
                state_ptr = Some(p);
            }
            Located::Missing(policy, _) if request.hits == 0 => {
                fresh = Some(ClientState::fresh(&policy, config.generation));
            }
            Located::Missing(policy, k) => {
                key = k;
                verdict |= VERDICT_NEW;
                state_ptr = create_entry(&policy, &k, config, counted, Run::Agent).map(|(p, _)| p);
            }
        }
        if counted.map_full != full_before {
            verdict |= VERDICT_OVERFLOW;
        }
    }
    let mut now = 0;
    let cluster = config.flags & CONFIG_CLUSTER != 0;
    let mut state = match state_ptr {
        Some(mut p) => {
            if request.hits != 0 {
                // SAFETY: live map value. `Home::Kept`: a denied check never moves the entry into
                // `LIMITED` (see above).
                let outcome = unsafe {
                    decide_hits(
                        &key,
                        p,
                        Home::Kept,
                        request.hits,
                        Run::Agent,
                        cluster,
                        counted,
                    )
                };
                if outcome.admitted {
                    verdict |= VERDICT_ALLOWED;
                }
                now = outcome.now;
                p = outcome.entry;
            }
            // SAFETY: live map value; a torn read of a slot another CPU is changing is not
            // possible (aligned 8-byte loads), and the copy is only reported.
            unsafe { core::ptr::read_volatile(p) }
        }
        None => {
            verdict |= VERDICT_NOT_RESIDENT;
            fresh?
        }
    };
    if now == 0 {
        now = now_for(state.window_us, Run::Agent);
    }
    // A global client's grant replaces the cold share in the decision (`decide_hits`): the reply
    // reports the allowance the decision used, so the agent's `remaining` and retry times are
    // this node's share in force.
    if cluster {
        // SAFETY: the value is copied at once; the agent replaces a grant whole (a hash map
        // update swaps in a new element).
        if let Some(grant) = unsafe { GRANTS.get(&key) }.copied() {
            state.limit = grant.limit_at(now, state.limit);
        }
    }
    let wont_fit = need != 0 && !state.admits(now, need);
    if wont_fit && let Some(p) = state_ptr {
        // SAFETY: live map value (a probe never reaches the shared overflow budget: with no hits
        // a missing client is read fresh, not created).
        unsafe { add_up(&raw mut (*p).dropped, u64::from(need)) };
    }
    // SAFETY: `ptr_at` checked that the reply area lies inside the frame.
    unsafe {
        reply.write_unaligned(CheckReply {
            state,
            now_ns: now,
            verdict: verdict | VERDICT_WRITTEN,
            _pad: 0,
        })
    };
    Some((key, wont_fit))
}
