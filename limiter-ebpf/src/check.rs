//! The API check program. `limiter_check` is never attached: the agent runs it with
//! BPF_PROG_TEST_RUN on a crafted check frame to decide an API check with the same maps and the
//! same code as the packets, so an address has one budget on the wire and in the API. API IDs
//! that are not addresses live in `NAMED` and `NAMED_STATIC`, the counterparts of `CLIENTS` and
//! `STATIC_CLIENTS`.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    macros::xdp,
    programs::XdpContext,
};
use limiter_common::{
    CheckReply, CheckRequest, ClientState, GlobalStats, MapConfig,
    maps::{
        CHECK_BATCH, CHECK_ETHERTYPE, CHECK_NAMED, CHECK_REPLY_OFFSET, CHECK_REQUEST_OFFSET,
        CHECK_SLOT_LEN, CHECK_STATIC, META_FLAG, VERDICT_ALLOWED, VERDICT_NOT_RESIDENT,
        VERDICT_OVERFLOW, VERDICT_WRITTEN,
    },
};

use crate::{
    entry::{
        Home, Located, Run, count_check, create_entry, decide_hits, locate_resolved, now_for,
        overflow_entry, set_policy,
    },
    maps::{CONFIG, NAMED, NAMED_STATIC},
    parse::{ptr_at, read},
};

/// Runs one API check (see the module docs). The frame carries a `CheckRequest` at
/// `CHECK_REQUEST_OFFSET`; the program writes a `CheckReply` at `CHECK_REPLY_OFFSET` and returns
/// `XDP_PASS`, or `XDP_ABORTED` for a frame that is not a check frame.
#[xdp]
pub fn limiter_check(ctx: XdpContext) -> u32 {
    try_check(&ctx).unwrap_or(xdp_action::XDP_ABORTED)
}

#[inline(always)]
fn try_check(ctx: &XdpContext) -> Option<u32> {
    if read::<u16>(ctx, 12).map(u16::from_be) != Some(CHECK_ETHERTYPE) {
        return None;
    }
    let config = CONFIG.get(0)?;
    // At least one whole slot; then as many as the frame holds, up to CHECK_BATCH, in order.
    ptr_at::<CheckReply>(ctx, CHECK_REPLY_OFFSET)?;
    for i in 0..CHECK_BATCH {
        let offset = CHECK_REQUEST_OFFSET + i * CHECK_SLOT_LEN;
        let Some(request) = read::<CheckRequest>(ctx, offset) else {
            break;
        };
        let Some(reply) = ptr_at::<CheckReply>(ctx, offset + size_of::<CheckRequest>()) else {
            break;
        };
        // Counters go to STATS after each check, so that nothing but the slot index carries
        // from one iteration to the next and the verifier's states stay prunable.
        let mut counted = GlobalStats::default();
        let done = check_one(&request, reply.cast_mut(), config, &mut counted);
        count_check(&counted);
        if done.is_none() {
            break;
        }
    }
    Some(xdp_action::XDP_PASS)
}

/// Decides one check and writes its reply.
#[inline(always)]
fn check_one(
    request: &CheckRequest,
    reply: *mut CheckReply,
    config: &MapConfig,
    counted: &mut GlobalStats,
) -> Option<()> {
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
        // One lookup path for reads and checks that spend (the verifier walks each copy in
        // each of the CHECK_BATCH iterations). Wherever the entry lives, a denied check does
        // not move it to `LIMITED` (the client's next dropped packet does): the move's map
        // updates take the verifier past its one-million-instruction budget.
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
                state_ptr = create_entry(&policy, &k, config, counted, Run::Agent).map(|(p, _)| p);
            }
        }
        if counted.map_full != full_before {
            verdict |= VERDICT_OVERFLOW;
        }
    }
    let mut now = 0;
    let state = match state_ptr {
        Some(mut p) => {
            if request.hits != 0 {
                // SAFETY: live map value. `Home::Kept`: never moved here (see above).
                let outcome =
                    unsafe { decide_hits(&key, p, Home::Kept, request.hits, Run::Agent, counted) };
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
    // SAFETY: `ptr_at` checked that the reply area lies inside the frame.
    unsafe {
        reply.write_unaligned(CheckReply {
            state,
            now_ns: now,
            verdict: verdict | VERDICT_WRITTEN,
            _pad: 0,
        })
    };
    Some(())
}
