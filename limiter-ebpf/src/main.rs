//! The XDP fast path. For every frame: parse to the source address, find the client's state with
//! one hash lookup, and admit or drop it with the sliding-window counter from `limiter-common`.
//! No packet ever waits on userspace.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// BPF has no atomic CAS in Rust's high-level atomics (`atomic_cas: false` in rustc's bpf target
// spec); the intrinsics lower to BPF_ATOMIC instructions (`lock *(u64 *)` add and cmpxchg,
// kernel >= 5.12: https://git.kernel.org/torvalds/c/5ffa25502b5a). limiter-user's build.rs
// enables them for this crate alone through RUSTC_BOOTSTRAP.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "core::intrinsics atomics; see above")
)]
// aya-ebpf's map methods take keys and values as `impl Borrow<K>`, so clippy asks for every
// `MAP.get_ptr_mut(&request.key)` to pass the key by value. That would copy each 16-byte key (and
// each `ClientState` inserted) into a new stack slot for the helper to point at, where the
// reference already points at stack memory: more of the 512-byte BPF stack and more instructions
// in the batch loops whose verifier state count is already near its limit (see `events`).
#![cfg_attr(
    target_arch = "bpf",
    expect(
        clippy::needless_borrows_for_generic_args,
        reason = "BPF map keys and values are passed by reference on purpose; see above"
    )
)]

#[cfg(target_arch = "bpf")]
mod adapt;
#[cfg(all(target_arch = "bpf", feature = "bench"))]
mod bench;
#[cfg(target_arch = "bpf")]
mod check;
#[cfg(target_arch = "bpf")]
mod counter;
#[cfg(target_arch = "bpf")]
mod entry;
#[cfg(target_arch = "bpf")]
mod events;
#[cfg(target_arch = "bpf")]
mod fast_path;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // This crate is only meaningful for the BPF target; limiter-user's build.rs builds it.
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects programs that could reach this; it is never called.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
