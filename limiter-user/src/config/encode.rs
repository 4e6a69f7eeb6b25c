//! The kernel encoding of a validated config: the policy trie's keys and values, the static
//! clients' keys and the ID policies' keys (`limiter_common` defines the layouts).

use std::{collections::HashMap, net::IpAddr};

use limiter_common::{
    Policy,
    addr::{
        ClientKey, FAMILY_BITS, FAMILY_V4, GROUP_BITS_MASK, GROUP_SPLIT, MAX_V6_GROUP_BITS,
        PolicyKey, group_bits, group_of, policy_key_v4, policy_key_v6, v4_mapped,
    },
    maps::{ACTION_DROP, ACTION_LIMIT, ACTION_PASS},
};

use super::{Action, Cidr, ClientName, Config, Grouping, Match, Per, Resolved};

/// The policy trie's entries, `(prefix length, key) -> Policy` ([`Config::lpm_entries`]).
pub type TrieEntries = HashMap<(u32, PolicyKey), Policy, foldhash::fast::RandomState>;

impl Cidr {
    /// The policy-trie key: family byte, then the address ([`PolicyKey`]).
    pub fn lpm_key(&self) -> (u32, PolicyKey) {
        match self.addr {
            IpAddr::V4(v4) => policy_key_v4(v4.octets(), self.prefix as u32),
            IpAddr::V6(v6) => policy_key_v6(&v6.octets(), self.prefix as u32),
        }
    }

    /// The prefix a policy-trie key stands for (the inverse of [`Cidr::lpm_key`]).
    pub fn from_lpm(prefix_len: u32, key: &PolicyKey) -> Cidr {
        let prefix = prefix_len.saturating_sub(FAMILY_BITS) as u8;
        if key[0] == FAMILY_V4 {
            Cidr {
                addr: IpAddr::V4([key[1], key[2], key[3], key[4]].into()),
                prefix,
            }
        } else {
            #[expect(clippy::expect_used, reason = "an LPM key is 1 + 16 bytes")]
            let octets: [u8; 16] = key[1..].try_into().expect("16 bytes");
            Cidr {
                addr: IpAddr::V6(octets.into()),
                prefix,
            }
        }
    }

    /// The client-map key of a one-address prefix.
    pub fn client_key(&self) -> ClientKey {
        match self.addr {
            IpAddr::V4(v4) => v4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        }
    }
}

impl ClientName {
    /// The key of the ID's state in the `NAMED` maps: the first 16 bytes of its SHA-256 (a
    /// collision takes about 2^64 IDs, so it cannot be provoked by choosing IDs).
    pub fn key(&self) -> ClientKey {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(self.0.as_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        key
    }
}

impl Grouping {
    /// `Policy::group` for a policy of `cidr` written with `per` (`None`: the family default's);
    /// for `default` itself, `cidr` is the family's `/0`.
    ///
    /// A group never spans two policies: `per: /N` on a policy longer than /N groups the whole
    /// policy. An IPv6 group longer than `MAX_V6_GROUP_BITS` counts per address (the
    /// validation refuses such a `per` written on the policy; one inherited from `default`, on
    /// a policy longer than /104, means per address).
    pub fn group(&self, cidr: &Cidr, per: Option<Per>) -> u8 {
        let v6 = cidr.addr.is_ipv6();
        let per = per.unwrap_or(if v6 { self.default_v6 } else { self.default_v4 });
        let (full, group_max) = if v6 {
            (128, MAX_V6_GROUP_BITS)
        } else {
            (32, 31)
        };
        let bits = match per {
            Per::Address => return group_of(None),
            Per::Policy => cidr.prefix,
            Per::Prefix(n) => n.max(cidr.prefix),
        };
        if bits >= full || bits > group_max {
            group_of(None)
        } else {
            group_of(Some(bits))
        }
    }
}

/// `fe80::`, the link-local prefix (RFC 4291 §2.5.6), as trie key data.
const LINK_LOCAL: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

const FAMILY_V4_ALL: Cidr = Cidr {
    addr: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    prefix: 0,
};
const FAMILY_V6_ALL: Cidr = Cidr {
    addr: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    prefix: 0,
};

impl Config {
    /// The policy trie's entries: `(prefix length, key) -> Policy`. `default` is the bare entry
    /// of each family; a `0.0.0.0/0` or `::/0` policy takes its family's place.
    ///
    /// Besides the policies, one entry per `/k` group that a longer policy splits, where `k` is
    /// the family's usual group length (`MapConfig::fast_group`): a copy of the policy covering
    /// the group, marked `GROUP_SPLIT` (or that policy itself, marked, if it sits at exactly that
    /// prefix). The fast path finds a client under its family's usual group key without a trie
    /// lookup, which is only right if every address of that group has the same policy; in a
    /// split group the covering policy's addresses take a split group key instead, so an entry
    /// under the usual key never exists there (see `limiter_common::addr::group_key`).
    pub fn lpm_entries(&self) -> TrieEntries {
        let mut entries =
            TrieEntries::with_capacity_and_hasher(self.policies.len() + 2, Default::default());
        let mut default = self.default.to_policy(0);
        default.group = self.grouping.group(&FAMILY_V4_ALL, None);
        entries.insert(policy_key_v4([0; 4], 0), default);
        default.group = self.grouping.group(&FAMILY_V6_ALL, None);
        entries.insert(policy_key_v6(&[0; 16], 0), default);
        for (i, (m, resolved)) in self.policies.iter().enumerate() {
            if let Match::Prefix(cidr) = m {
                let mut policy = resolved.to_policy(policy_id(i));
                let per = self.grouping.policies.get(i).copied().flatten();
                policy.group = self.grouping.group(cidr, per);
                entries.insert(cidr.lpm_key(), policy);
            }
        }
        // Link-local sources (fe80::/10) count per address: every host on a link has its
        // link-local address in the same fe80::/64, so grouping them as global addresses are
        // would give one budget to a router's and every neighbour's discovery traffic. Unless a
        // policy says otherwise at fe80::/10 (or inside it, where it wins anyway).
        let link_local = policy_key_v6(&LINK_LOCAL, 10);
        if !entries.contains_key(&link_local) {
            let covering = (FAMILY_BITS..=link_local.0).rev().find_map(|len| {
                entries
                    .get(&mask_lpm(link_local.0, link_local.1, len))
                    .copied()
            });
            // Only where the covering policy groups by more than /10: grouping by less (say
            // `per: policy`, one budget for all of IPv6) is the operator's word on link-local
            // sources too, and an entry here would split that group for every IPv6 source.
            if let Some(mut policy) = covering
                && group_bits(policy.group)
                    .is_some_and(|bits| bits as u32 > link_local.0 - FAMILY_BITS)
            {
                policy.group = 0;
                entries.insert(link_local, policy);
            }
        }
        // The group of each family's bare entry (`default`, or the `/0` policy in its place).
        let [fast_v4, fast_v6] = self.fast_groups();
        let splits: Vec<(u32, PolicyKey)> = entries
            .keys()
            .filter_map(|&(len, key)| {
                let fast = if key[0] == FAMILY_V4 {
                    fast_v4
                } else {
                    fast_v6
                };
                let k = group_bits(fast)? as u32;
                (len > FAMILY_BITS + k).then(|| mask_lpm(len, key, FAMILY_BITS + k))
            })
            .collect();
        for region in splits {
            let fast = if region.1[0] == FAMILY_V4 {
                fast_v4
            } else {
                fast_v6
            };
            // The policy covering the region: the longest entry at or above it.
            let covering = (FAMILY_BITS..=region.0)
                .rev()
                .find_map(|len| entries.get(&mask_lpm(region.0, region.1, len)).copied());
            if let Some(mut policy) = covering
                && policy.group & GROUP_BITS_MASK == fast
            {
                policy.group |= GROUP_SPLIT;
                entries.insert(region, policy);
            }
        }
        entries
    }

    /// `MapConfig::fast_group`: the `Policy::group` of each family's bare trie entry (`[IPv4,
    /// IPv6]`), i.e. `default`'s grouping for the family, or that of a `0.0.0.0/0` or `::/0`
    /// policy in its place: the grouping of every address no longer policy matches, which the
    /// fast path tries first. `lpm_entries` marks the groups split against the same values.
    pub fn fast_groups(&self) -> [u8; 2] {
        let root = |all: &Cidr| {
            let per = self
                .policies
                .iter()
                .position(|(m, _)| m.as_prefix() == Some(all))
                .and_then(|i| self.grouping.policies.get(i).copied().flatten());
            self.grouping.group(all, per)
        };
        [root(&FAMILY_V4_ALL), root(&FAMILY_V6_ALL)]
    }

    /// Addresses named by an exact-address policy (kept in the never-evicted static map).
    pub fn static_clients(&self) -> Vec<ClientKey> {
        self.policies
            .iter()
            .filter_map(|(m, _)| m.as_prefix())
            .filter(|c| c.is_host())
            .map(Cidr::client_key)
            .collect()
    }

    /// The exact-ID policies, as the map policy each ID's checks carry.
    pub fn named_policies(&self) -> HashMap<ClientName, Policy> {
        self.policies
            .iter()
            .enumerate()
            .filter_map(|(i, (m, r))| Some((m.as_id()?.clone(), r.to_policy(policy_id(i)))))
            .collect()
    }

    /// The default as a map policy (id 0).
    pub fn default_policy(&self) -> Policy {
        self.default.to_policy(0)
    }
}

/// The trie key `(len, key)` cut to its first `to` bits (family byte included).
fn mask_lpm(len: u32, key: PolicyKey, to: u32) -> (u32, PolicyKey) {
    let to = to.min(len);
    let mut out = [0u8; 17];
    for (i, byte) in key.iter().enumerate() {
        let keep = (to as usize).saturating_sub(i * 8).min(8);
        out[i] = if keep == 0 {
            0
        } else {
            byte & (0xffu8 << (8 - keep))
        };
    }
    (to, out)
}

/// The map id of `policies[i]`. Ids are u16 for the map; beyond that stats show the last id,
/// decisions are unaffected.
fn policy_id(i: usize) -> u16 {
    u16::try_from(i + 1).unwrap_or(u16::MAX)
}

impl Resolved {
    pub fn to_policy(self, id: u16) -> Policy {
        let action = match self.action {
            Action::Limit => ACTION_LIMIT,
            Action::Pass => ACTION_PASS,
            Action::Drop => ACTION_DROP,
        };
        Policy {
            limit: self.limit,
            window_us: self.window.micros,
            id,
            action,
            // Set by `Config::lpm_entries` for address policies; IDs are one client each.
            group: 0,
        }
    }
}
