//! The kernel encoding of a validated config: the policy trie's keys and values, the static
//! clients' keys and the ID policies' keys (`limiter_common` defines the layouts).

use std::{collections::HashMap, net::IpAddr};

use limiter_common::{
    Policy,
    addr::{ClientKey, FAMILY_BITS, FAMILY_V4, PolicyKey, policy_key_v4, policy_key_v6, v4_mapped},
    maps::{ACTION_DROP, ACTION_LIMIT, ACTION_PASS},
};

use super::{Action, Cidr, ClientName, Config, Match, Resolved};

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

impl Config {
    /// The policy trie's entries: `(prefix length, key) -> Policy`. `default` is the bare entry
    /// of each family; a `0.0.0.0/0` or `::/0` policy takes its family's place.
    pub fn lpm_entries(&self) -> HashMap<(u32, PolicyKey), Policy> {
        let mut entries = HashMap::with_capacity(self.policies.len() + 2);
        entries.insert(policy_key_v4([0; 4], 0), self.default.to_policy(0));
        entries.insert(policy_key_v6(&[0; 16], 0), self.default.to_policy(0));
        for (i, (m, resolved)) in self.policies.iter().enumerate() {
            if let Match::Prefix(cidr) = m {
                entries.insert(cidr.lpm_key(), resolved.to_policy(policy_id(i)));
            }
        }
        entries
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
            _pad: 0,
        }
    }
}
