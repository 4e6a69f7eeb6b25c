//! The capabilities the agent needs, what each is for, and the check at start that names the
//! missing ones. The agent does not need to be root: uid 0 is only one way to hold them.
//!
//! | capability | what for (kernel/bpf/syscall.c, Linux ≥ 5.8) |
//! | --- | --- |
//! | `CAP_BPF` | creating the maps (`LRU_HASH` and `LPM_TRIE` need it), loading any program, BPF_OBJ_PIN/GET of the pins under `/sys/fs/bpf` |
//! | `CAP_NET_ADMIN` | loading XDP programs (a networking program type, `is_net_admin_prog_type`), attaching to the interface (bpf_link or netlink `RTM_SETLINK`) |
//! | `CAP_PERFMON` | the verifier's trust: with `CAP_BPF` alone it checks the programs as an untrusted loader's (`allow_ptr_leaks`, `bypass_spec_v1` and `allow_uninit_stack` are `perfmon_capable()` in kernel/bpf/verifier.c), and on 6.18 it rejects `limiter_adapt` with EACCES |
//!
//! `CAP_SYS_ADMIN` implies `CAP_BPF` and `CAP_PERFMON` (`bpf_capable()`, `perfmon_capable()`).
//! `CAP_SYS_RESOURCE` is not needed: since Linux 5.11 BPF memory is charged to the memory cgroup,
//! not to `RLIMIT_MEMLOCK` (series "bpf: switch to memcg-based memory accounting", e.g. commit
//! 3ac1f01b43b6 "bpf: Eliminate rlimit-based memory accounting for bpf progs"), and the agent
//! needs 5.17 anyway ([`super::kernel`]); so the agent never raises the memlock limit.

use std::collections::HashSet;

use caps::{CapSet, Capability};

/// One capability the agent needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub capability: Capability,
    /// What the agent uses it for, for the error message.
    pub what_for: &'static str,
}

/// What `limiter agent` needs, in the order they are reported.
pub const AGENT: [Need; 3] = [
    Need {
        capability: Capability::CAP_BPF,
        what_for: "to create the BPF maps, load the programs and pin them under /sys/fs/bpf",
    },
    Need {
        capability: Capability::CAP_NET_ADMIN,
        what_for: "to load an XDP program and attach it to the interface",
    },
    Need {
        capability: Capability::CAP_PERFMON,
        what_for: "for the verifier to accept the programs: without it they are checked as an \
                   untrusted loader's and rejected",
    },
];

/// The needs `effective` does not meet (`CAP_SYS_ADMIN` stands in for `CAP_BPF` and
/// `CAP_PERFMON`, as in the kernel).
pub fn missing(needs: &[Need], effective: &HashSet<Capability>) -> Vec<Need> {
    needs
        .iter()
        .copied()
        .filter(|need| {
            let admin_covers = matches!(
                need.capability,
                Capability::CAP_BPF | Capability::CAP_PERFMON
            ) && effective.contains(&Capability::CAP_SYS_ADMIN);
            !effective.contains(&need.capability) && !admin_covers
        })
        .collect()
}

/// The missing capabilities, for [`super::DatapathError::MissingCapabilities`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing(pub Vec<Need>);

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, need) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} ({})", need.capability, need.what_for)?;
        }
        Ok(())
    }
}

/// The capabilities in this thread's effective set (the agent's threads all have the same).
pub fn effective() -> std::io::Result<HashSet<Capability>> {
    caps::read(None, CapSet::Effective).map_err(|e| std::io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(caps: &[Capability]) -> HashSet<Capability> {
        caps.iter().copied().collect()
    }

    #[test]
    fn the_three_capabilities_are_enough_and_each_missing_one_is_named() {
        use Capability::*;
        assert!(missing(&AGENT, &set(&[CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON])).is_empty());
        let without_perfmon = missing(&AGENT, &set(&[CAP_BPF, CAP_NET_ADMIN]));
        assert_eq!(
            without_perfmon
                .iter()
                .map(|n| n.capability)
                .collect::<Vec<_>>(),
            [CAP_PERFMON]
        );
        let none = missing(&AGENT, &set(&[]));
        assert_eq!(none.len(), 3);
        let shown = Missing(none).to_string();
        for name in ["CAP_BPF (", "CAP_NET_ADMIN (", "CAP_PERFMON ("] {
            assert!(shown.contains(name), "{shown}");
        }
    }

    #[test]
    fn cap_sys_admin_stands_in_for_bpf_and_perfmon_but_not_net_admin() {
        use Capability::*;
        assert!(missing(&AGENT, &set(&[CAP_SYS_ADMIN, CAP_NET_ADMIN])).is_empty());
        assert_eq!(
            missing(&AGENT, &set(&[CAP_SYS_ADMIN]))
                .iter()
                .map(|n| n.capability)
                .collect::<Vec<_>>(),
            [CAP_NET_ADMIN]
        );
    }
}
