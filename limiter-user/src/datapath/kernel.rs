//! The kernel features the XDP program and the agent use, checked at start: a kernel that lacks
//! one fails with a line that names it and the Linux release that brought it, rather than with a
//! verifier log or an `EINVAL` halfway through loading.
//!
//! Each feature is probed where that is cheap (aya's map-type and helper probes, a six-instruction
//! program, a bpf(2) command on a closed descriptor), so a distribution kernel with backports
//! passes and one built without a feature fails; the version string decides only when a probe
//! itself fails in an unexpected way. Releases and commits are those of torvalds/linux.

use std::{io, os::fd::FromRawFd as _, os::fd::OwnedFd};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
    util::KernelVersion,
};

/// The oldest release with every feature in [`FEATURES`] (the README's requirement).
pub const MINIMUM: (u8, u8) = (5, 17);

/// One kernel feature the program or the agent needs.
#[derive(Debug, Clone, Copy)]
pub struct Feature {
    /// What it is, as the error names it.
    pub what: &'static str,
    /// The release that brought it.
    pub since: (u8, u8),
    /// The commit that brought it (abbreviated id).
    pub commit: &'static str,
    probe: Probe,
}

#[derive(Debug, Clone, Copy)]
enum Probe {
    Program(ProgramType),
    Map(MapType),
    Helper(BpfHelper),
    /// A bpf(2) command, called with the descriptor at this byte offset of its attribute set to
    /// -1: `EBADF` means the kernel knows the command, `EINVAL` that it does not.
    Command {
        cmd: libc::c_long,
        fd_offset: usize,
    },
    /// Loading a program with a BPF_ATOMIC compare-and-exchange.
    AtomicCmpxchg,
    /// The kernel's own BTF in sysfs.
    KernelBtf,
}

/// `BPF_MAP_LOOKUP_BATCH` and the offset of `map_fd` in `bpf_attr.batch`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BATCH_MAP_FD_OFFSET: usize = 36;
/// `BPF_LINK_DETACH` and the offset of `link_fd` in `bpf_attr.link_detach`.
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_PROG_LOAD: libc::c_long = 5;

/// What the program and the agent use, oldest first.
pub const FEATURES: [Feature; 11] = [
    Feature {
        what: "XDP programs",
        since: (4, 8),
        commit: "6a773a15a1e8",
        probe: Probe::Program(ProgramType::Xdp),
    },
    Feature {
        what: "LRU hash maps",
        since: (4, 10),
        commit: "29ba732acbee",
        probe: Probe::Map(MapType::LruHash),
    },
    Feature {
        what: "LPM trie maps",
        since: (4, 11),
        commit: "b95a5c4db09b",
        probe: Probe::Map(MapType::LpmTrie),
    },
    Feature {
        what: "kernel BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF), by which the verifier \
               types the context argument of the check and adapt programs' global functions",
        since: (5, 4),
        commit: "341dfcf8d78e",
        probe: Probe::KernelBtf,
    },
    Feature {
        what: "the bpf_jiffies64 helper",
        since: (5, 5),
        commit: "5576b991e9c1",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_jiffies64),
    },
    Feature {
        // Generic lookup batch cb4d03ab499d, for hash maps 057996380a42 (both 5.6).
        what: "batched map operations (BPF_MAP_LOOKUP_BATCH)",
        since: (5, 6),
        commit: "cb4d03ab499d",
        probe: Probe::Command {
            cmd: BPF_MAP_LOOKUP_BATCH,
            fd_offset: BATCH_MAP_FD_OFFSET,
        },
    },
    Feature {
        what: "ring buffer maps",
        since: (5, 8),
        commit: "457f44363a88",
        probe: Probe::Map(MapType::RingBuf),
    },
    Feature {
        // BPF_LINK_DETACH (73b11c2ab072) came in the same release; it is what is probed.
        what: "bpf_link attachment of XDP programs",
        since: (5, 9),
        commit: "aa8d3a716b59",
        probe: Probe::Command {
            cmd: BPF_LINK_DETACH,
            fd_offset: 0,
        },
    },
    Feature {
        what: "the bpf_ktime_get_coarse_ns helper",
        since: (5, 11),
        commit: "d05512618056",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_ktime_get_coarse_ns),
    },
    Feature {
        what: "BPF atomic compare-and-exchange instructions",
        since: (5, 12),
        commit: "5ffa25502b5a",
        probe: Probe::AtomicCmpxchg,
    },
    Feature {
        what: "the bpf_loop helper",
        since: (5, 17),
        commit: "e6f2dd0f8067",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_loop),
    },
];

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{}", missing_message(running, missing))]
    Missing {
        /// The running kernel's version, if it could be read.
        running: Option<String>,
        missing: Vec<Feature>,
    },
}

/// The one-line message for the features a kernel lacks.
fn missing_message(running: &Option<String>, missing: &[Feature]) -> String {
    let kernel = match running {
        Some(v) => format!("this kernel (Linux {v})"),
        None => "this kernel".to_string(),
    };
    let list = missing
        .iter()
        .map(|f| {
            format!(
                "{} (Linux {}.{}, commit {})",
                f.what, f.since.0, f.since.1, f.commit
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{kernel} lacks {list}; limiter needs Linux >= {}.{}",
        MINIMUM.0, MINIMUM.1
    )
}

/// `KernelVersion::code()` of `major.minor`.
fn code(major: u8, minor: u8) -> u32 {
    (u32::from(major) << 16) | (u32::from(minor) << 8)
}

/// Whether a feature is there, from its probe and, when the probe failed, from the version
/// (`KernelVersion::code()`, if known); with neither, it is assumed there and the load itself
/// reports what is wrong.
fn present(probed: Result<bool, String>, running: Option<u32>, since: (u8, u8)) -> bool {
    match (probed, running) {
        (Ok(found), _) => found,
        (Err(_), Some(running)) => running >= code(since.0, since.1),
        (Err(_), None) => true,
    }
}

/// Checks every feature in [`FEATURES`]; needs root (the probes load programs and create maps).
pub fn check() -> Result<(), KernelError> {
    let version = KernelVersion::current().ok();
    let missing: Vec<Feature> = FEATURES
        .iter()
        .filter(|f| {
            let probed = probe(f.probe);
            if let Err(error) = &probed {
                tracing::debug!(
                    feature = f.what,
                    "kernel feature probe failed ({error}); going by the version"
                );
            }
            !present(probed, version.map(KernelVersion::code), f.since)
        })
        .copied()
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KernelError::Missing {
            running: version.map(|v| v.to_string()),
            missing,
        })
    }
}

fn probe(probe: Probe) -> Result<bool, String> {
    match probe {
        Probe::Program(kind) => is_program_supported(kind).map_err(|e| e.to_string()),
        Probe::Map(kind) => is_map_supported(kind).map_err(|e| e.to_string()),
        Probe::Helper(helper) => {
            is_helper_supported(ProgramType::Xdp, helper).map_err(|e| e.to_string())
        }
        Probe::Command { cmd, fd_offset } => {
            let mut attr = [0u8; 64];
            attr[fd_offset..fd_offset + 4].copy_from_slice(&(-1i32).to_ne_bytes());
            match bpf(cmd, &mut attr) {
                Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
                Err(e) => Err(e.to_string()),
                Ok(_) => Err("succeeded on a closed descriptor".into()),
            }
        }
        Probe::AtomicCmpxchg => atomic_cmpxchg(),
        Probe::KernelBtf => kernel_btf(),
    }
}

/// Whether the kernel exposes its BTF: absent from a mounted sysfs means built without it; no
/// sysfs at all (an unusual container) is a failed probe, which goes by the version.
fn kernel_btf() -> Result<bool, String> {
    match std::fs::metadata("/sys/kernel/btf/vmlinux") {
        Ok(_) => Ok(true),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                && std::path::Path::new("/sys/kernel").is_dir() =>
        {
            Ok(false)
        }
        Err(e) => Err(format!("/sys/kernel/btf/vmlinux: {e}")),
    }
}

/// One BPF instruction (`struct bpf_insn`).
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut i = [0u8; 8];
    i[0] = code;
    i[1] = dst | (src << 4);
    i[2..4].copy_from_slice(&off.to_ne_bytes());
    i[4..8].copy_from_slice(&imm.to_ne_bytes());
    i
}

/// Loads `*(u64 *)(r10 - 8) = 0; r0 = cmpxchg(r10 - 8, r0 = 0, r1 = 0); return XDP_PASS`. A
/// kernel before 5.12 rejects the instruction's `imm` (BPF_CMPXCHG) with `EINVAL`.
fn atomic_cmpxchg() -> Result<bool, String> {
    const MOV64_IMM: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const STX_DW: u8 = 0x7b; // BPF_STX | BPF_MEM | BPF_DW
    const ATOMIC_DW: u8 = 0xdb; // BPF_STX | BPF_ATOMIC | BPF_DW
    const CMPXCHG: i32 = 0xf1; // BPF_CMPXCHG (includes BPF_FETCH)
    const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
    let program = [
        insn(MOV64_IMM, 1, 0, 0, 0),
        insn(STX_DW, 10, 1, -8, 0),
        insn(MOV64_IMM, 0, 0, 0, 0),
        insn(ATOMIC_DW, 10, 1, -8, CMPXCHG),
        insn(MOV64_IMM, 0, 0, 0, 2), // XDP_PASS
        insn(EXIT, 0, 0, 0, 0),
    ];
    let license = c"GPL";
    // `bpf_attr` for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license; the rest zero.
    let mut attr = [0u8; 64];
    attr[0..4].copy_from_slice(&6u32.to_ne_bytes()); // BPF_PROG_TYPE_XDP
    attr[4..8].copy_from_slice(&(program.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(program.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => {
            // SAFETY: BPF_PROG_LOAD returned a new descriptor that nothing else owns.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            Ok(true)
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// bpf(2) with an attribute of `attr.len()` bytes; returns the syscall's result.
fn bpf(cmd: libc::c_long, attr: &mut [u8; 64]) -> io::Result<i32> {
    // SAFETY: `attr` is a zero-initialised buffer of the size passed, a valid prefix of
    // `union bpf_attr` for the commands used here; any pointers in it (program, license) outlive
    // the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        i32::try_from(r).map_err(|_| io::Error::other("bpf(2) returned an out-of-range value"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_are_oldest_first_and_the_minimum_is_the_newest() {
        assert!(FEATURES.windows(2).all(|w| w[0].since <= w[1].since));
        assert_eq!(FEATURES.last().map(|f| f.since), Some(MINIMUM));
    }

    #[test]
    fn a_probe_decides_over_the_version() {
        let (new, old) = (code(6, 18), code(5, 4));
        // A backport on an old kernel, a feature built out of a new one.
        assert!(present(Ok(true), Some(old), (5, 8)));
        assert!(!present(Ok(false), Some(new), (5, 8)));
    }

    #[test]
    fn a_failed_probe_goes_by_the_version() {
        let failed = || Err("EPERM".to_string());
        assert!(present(failed(), Some(code(5, 12)), (5, 12)));
        assert!(present(failed(), Some(code(6, 1)), (5, 12)));
        assert!(!present(failed(), Some(code(5, 11)), (5, 12)));
        // 5.9 < 5.10: numeric, not textual.
        assert!(!present(failed(), Some(code(5, 9)), (5, 10)));
        assert!(present(failed(), None, (5, 12)));
    }

    #[test]
    fn version_codes_match_aya() {
        let v = KernelVersion::new(5, 12, 7);
        assert!(v.code() >= code(5, 12));
        assert!(v.code() < code(5, 13));
        assert!(KernelVersion::new(5, 11, 255).code() < code(5, 12));
    }

    #[test]
    fn the_message_names_what_is_missing_and_the_kernel_that_brings_it() {
        let missing = vec![FEATURES[6], FEATURES[9]];
        let error = KernelError::Missing {
            running: Some("5.4.0".into()),
            missing,
        };
        assert_eq!(
            error.to_string(),
            "this kernel (Linux 5.4.0) lacks ring buffer maps (Linux 5.8, commit 457f44363a88), \
             BPF atomic compare-and-exchange instructions (Linux 5.12, commit 5ffa25502b5a); \
             limiter needs Linux >= 5.17"
        );
        let error = KernelError::Missing {
            running: None,
            missing: vec![FEATURES[8]],
        };
        assert!(error.to_string().starts_with(
            "this kernel lacks the bpf_ktime_get_coarse_ns helper (Linux 5.11, commit d05512618056)"
        ));
    }
}
