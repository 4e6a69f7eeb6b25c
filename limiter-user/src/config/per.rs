//! How a policy groups source addresses into clients (`per`): the forms it is written in, for a
//! policy and for `default`, and the checks a written grouping passes. Its kernel encoding (a
//! `Policy::group` byte) is in `encode`.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, de};

use super::Cidr;

/// How a policy groups source addresses into clients, each with its own budget (`per`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Per {
    /// Every address is its own client (`per: address`).
    Address,
    /// Every address the policy matches shares one budget (`per: policy`); a longer policy
    /// inside it still takes its own addresses.
    Policy,
    /// Every address shares a budget with the others of its `/N` (`per: /64`); the policy's own
    /// prefix if that is longer.
    Prefix(u8),
}

/// IPv6's grouping where the config names none: one client per /64, the smallest prefix a site
/// is assigned (RFC 6177 recommends /48 or /56 for sites, RFC 7421 fixes the /64 subnet): one
/// host controls every address of its /64 and can send from a new one with every packet.
pub const DEFAULT_V6_PER: Per = Per::Prefix(64);

impl FromStr for Per {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "address" => Ok(Per::Address),
            "policy" => Ok(Per::Policy),
            t => match t.strip_prefix('/').map(str::parse::<u8>) {
                Some(Ok(n)) if n <= 128 => Ok(Per::Prefix(n)),
                _ => Err(format!(
                    "{s:?} is not a grouping: write `address`, `policy` or a prefix length like /64"
                )),
            },
        }
    }
}

impl fmt::Display for Per {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Per::Address => f.write_str("address"),
            Per::Policy => f.write_str("policy"),
            Per::Prefix(n) => write!(f, "/{n}"),
        }
    }
}

impl Per {
    /// A `per` as written: a string, or what a user may write by mistake (`per: 64`, a
    /// mapping), each refused saying what to write.
    fn from_value(value: &serde_yaml::Value) -> Result<Per, String> {
        use serde_yaml::Value;
        let got = match value {
            Value::String(s) => return s.parse(),
            Value::Number(n) => {
                return Err(format!(
                    "{n} is not a grouping: a prefix length is written with its slash, like \
                     /{n}; or write `address` or `policy`"
                ));
            }
            Value::Null => "nothing",
            Value::Bool(_) => "a boolean",
            Value::Sequence(_) => "a list",
            Value::Mapping(_) => "a mapping",
            Value::Tagged(_) => "a tagged value",
        };
        Err(format!(
            "expected `address`, `policy` or a prefix length like /64, got {got}"
        ))
    }
}

impl<'de> Deserialize<'de> for Per {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_yaml::Value::deserialize(d)?;
        Per::from_value(&value).map_err(|e| de::Error::custom(format!("`per`: {e}")))
    }
}

/// `default`'s `per`: `address` or `policy` for both families, or one per family
/// (`{ ipv4: .., ipv6: .. }`, either left out: that family's usual grouping).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DefaultPer {
    Both(Per),
    Families {
        ipv4: Option<Per>,
        ipv6: Option<Per>,
    },
}

impl<'de> Deserialize<'de> for DefaultPer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_yaml::Value::deserialize(d)?;
        let invalid = |e: String| de::Error::custom(format!("`per`: {e}"));
        let serde_yaml::Value::Mapping(families) = &value else {
            return Per::from_value(&value)
                .map(DefaultPer::Both)
                .map_err(invalid);
        };
        let (mut ipv4, mut ipv6) = (None, None);
        for (key, per) in families {
            let slot = match key.as_str() {
                Some("ipv4") => &mut ipv4,
                Some("ipv6") => &mut ipv6,
                _ => {
                    let shown = match key {
                        serde_yaml::Value::String(s) => format!("`{s}`"),
                        other => serde_yaml::to_string(other)
                            .map_or_else(|_| "?".into(), |s| format!("`{}`", s.trim())),
                    };
                    return Err(invalid(format!(
                        "unknown key {shown}: the per-family form has `ipv4` and `ipv6`"
                    )));
                }
            };
            let family = key.as_str().unwrap_or_default();
            *slot = Some(Per::from_value(per).map_err(|e| invalid(format!("{family}: {e}")))?);
        }
        Ok(DefaultPer::Families { ipv4, ipv6 })
    }
}

/// How addresses group into clients: `default`'s grouping of each family, which a policy without
/// `per` follows, and each policy's own (`None`: follows the default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grouping {
    pub default_v4: Per,
    pub default_v6: Per,
    /// Indexed like [`Config::policies`].
    pub policies: Vec<Option<Per>>,
}

impl Default for Grouping {
    fn default() -> Self {
        Grouping {
            default_v4: Per::Address,
            default_v6: DEFAULT_V6_PER,
            policies: Vec::new(),
        }
    }
}

/// Checks a `per` as written for a policy of `cidr` (`None`: `default`) in its family.
///
/// A group as long as an address is one address (`per: /128`, `per: policy` on a host): per
/// address, accepted. An IPv6 group between /105 and /127 cannot be keyed
/// ([`limiter_common::addr::MAX_V6_GROUP_BITS`]) and is refused rather than silently counted per
/// address.
pub(super) fn check_per(per: Per, cidr: Option<&Cidr>, v6: bool) -> Result<(), String> {
    use limiter_common::addr::MAX_V6_GROUP_BITS;
    let (family, max) = if v6 { ("IPv6", 128) } else { ("IPv4", 32) };
    let prefix = cidr.map_or(0, |c| c.prefix);
    let bits = match per {
        Per::Address => return Ok(()),
        Per::Prefix(n) if n > max => {
            return Err(format!(
                "/{n} is longer than an {family} address (at most /{max})"
            ));
        }
        // A group never spans two policies: `/N` on a longer policy groups the policy.
        Per::Prefix(n) => n.max(prefix),
        Per::Policy => prefix,
    };
    if !v6 || bits == max || bits <= MAX_V6_GROUP_BITS {
        return Ok(());
    }
    Err(match per {
        Per::Prefix(n) if n > MAX_V6_GROUP_BITS => format!(
            "an IPv6 group is at most /{MAX_V6_GROUP_BITS} (its key holds \
             {MAX_V6_GROUP_BITS} prefix bits): write a shorter prefix, or `per: address`"
        ),
        _ => format!(
            "this /{prefix} policy is longer than the /{MAX_V6_GROUP_BITS} an IPv6 group can \
             be, so its addresses cannot share one budget: write `per: address`, or leave \
             `per` out (a policy longer than /{MAX_V6_GROUP_BITS} counts per address)"
        ),
    })
}
