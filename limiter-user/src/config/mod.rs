//! The config: its schema (policies and the `adaptive` section), the validation every policy
//! passes whether it comes from the file or from the API, the kernel encoding of policies into
//! map keys and values ([`encode`]), and the location of errors in the file's text.
//!
//! Every check happens here, before anything touches the maps, so a config with an error is
//! rejected whole and the policies in force stay in force.

mod adaptive;
mod encode;
pub use self::encode::TrieEntries;
mod locate;
pub mod overlay;
mod per;

use std::{collections::HashMap, fmt, net::IpAddr, str::FromStr};

use limiter_common::window::{MAX_WINDOW_US, MIN_WINDOW_US};
use serde::{Deserialize, Deserializer, de};

pub use self::adaptive::{
    AdaptiveConfig, AdaptiveError, DEFAULT_PERIOD_US, LoadBands, MAX_PERIOD_US, MIN_PERIOD_US,
};
pub(crate) use self::locate::KeyLines;
use self::locate::{adaptive_error, locate_value_error};
use self::per::check_per;
pub use self::per::{DEFAULT_V6_PER, DefaultPer, Grouping, Per};
use crate::cluster::config::{ClusterConfig, RawCluster};
pub use crate::duration::parse_duration_us;

/// Policy ids above every config's (the top of the 15 bits an entry stores its policy's id in,
/// `limiter_common::maps::MAX_POLICY_ID`), kept for the entries of Envoy's rate limit service
/// (`crate::rls`): its local rules' id, and one per distinct limit of its rules when they are
/// global across the cluster.
pub const RESERVED_POLICY_IDS: u16 = 1024;
/// Most policies one config may hold: a client entry stores its policy's id in 15 bits, less
/// the [`RESERVED_POLICY_IDS`] (the `POLICIES` trie has room for these plus `default`).
pub const MAX_POLICIES: usize =
    (limiter_common::maps::MAX_POLICY_ID - RESERVED_POLICY_IDS) as usize;
/// Most exact-address policies (the size of the never-evicted `STATIC_CLIENTS` map).
pub const MAX_STATIC_CLIENTS: usize = 65_536;
/// Largest config file the agent reads (`crate::capped_read`). The largest valid config,
/// `MAX_POLICIES` policies each naming a 256-byte ID with every key at its longest (about 340
/// bytes a policy, 11 MB in all), fits with room for comments; a bigger file is a wrong path or
/// a mistake, refused before it is read into memory.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Syntax, unknown or missing fields, or a field with a bad type; serde_yaml's message names
    /// the field path, line and column.
    #[error(transparent)]
    Yaml(#[from] serde_yaml::Error),
    #[error("{field}{line}: {message}")]
    Invalid {
        field: String,
        line: LineHint,
        message: String,
    },
    /// A file with nothing but comments and blank lines: a truncated write, or the wrong file.
    #[error(
        "the config is empty: it needs at least `default:` (e.g. `default: {{ limit: 100, window: 1s }}`)"
    )]
    Empty,
    #[error("too many policies: {count} (at most {MAX_POLICIES})")]
    TooMany { count: usize },
    #[error("too many exact-address policies: {count} (at most {MAX_STATIC_CLIENTS})")]
    TooManyStatic { count: usize },
}

/// ` (line N)` when the line is known.
#[derive(Debug, Clone, Copy, Default)]
pub struct LineHint(pub Option<usize>);

impl fmt::Display for LineHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(f, " (line {line})"),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Drop what is over the limit.
    #[default]
    Enforce,
    /// Count what would be dropped, drop nothing.
    DryRun,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Limit to `limit` per `window`.
    #[default]
    Limit,
    /// Never limited (allow list).
    Pass,
    /// Always dropped (block list).
    Drop,
}

/// Where a policy's limit holds: on this host alone, or across the cluster (issue 12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Each host enforces the whole limit for the traffic it sees.
    #[default]
    Local,
    /// The limit holds for the client's total across the members of the `cluster:` section:
    /// each member enforces its share.
    Global,
}

impl Scope {
    /// As the config file writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Local => "local",
            Scope::Global => "global",
        }
    }
}

/// A window length, written `10ms`, `1.5s`, `2m`, `1h`; between 10 ms and 1 h.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub micros: u32,
}

impl Window {
    /// A window of `micros` µs, checked against the 10 ms to 1 h range.
    pub fn from_micros(micros: u64) -> Result<Window, String> {
        match u32::try_from(micros) {
            Ok(micros) if (MIN_WINDOW_US..=MAX_WINDOW_US).contains(&micros) => {
                Ok(Window { micros })
            }
            _ => Err("must be between 10ms and 1h".into()),
        }
    }
}

impl FromStr for Window {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let micros = parse_duration_us(s, "window")?;
        if !(MIN_WINDOW_US as f64..=MAX_WINDOW_US as f64).contains(&micros) {
            return Err(format!(
                "window {:?} is out of range: it must be between 10ms and 1h",
                s.trim()
            ));
        }
        Ok(Window {
            micros: micros as u32,
        })
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = self.micros as u64;
        match us {
            _ if us.is_multiple_of(3_600_000_000) => write!(f, "{}h", us / 3_600_000_000),
            _ if us.is_multiple_of(60_000_000) => write!(f, "{}m", us / 60_000_000),
            _ if us.is_multiple_of(1_000_000) => write!(f, "{}s", us / 1_000_000),
            _ if us.is_multiple_of(1_000) => write!(f, "{}ms", us / 1_000),
            _ => write!(f, "{us}us"),
        }
    }
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| de::Error::custom(format!("`window`: {e}")))
    }
}

/// An IPv4 or IPv6 prefix (`10.0.0.0/8`, `2001:db8::/32`) or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// One address rather than a prefix.
    pub fn is_host(&self) -> bool {
        self.prefix == max_prefix(&self.addr)
    }
}

fn max_prefix(addr: &IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr_s, prefix_s) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 or IPv6 address or CIDR prefix"))?;
        let max = max_prefix(&addr);
        let prefix = match prefix_s {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("{s:?}: prefix length must be 0 to {max}")),
            },
        };
        let cidr = Cidr { addr, prefix };
        let masked = cidr.masked();
        if masked != addr {
            return Err(format!(
                "{s:?} has address bits set beyond the /{prefix} prefix; did you mean {masked}/{prefix}?"
            ));
        }
        // Multicast (`ff00::/8`) is never a source (RFC 4291 section 2.7; the fast path counts
        // such packets as malformed), and client keys use that range for groups of addresses.
        if let (IpAddr::V6(v6), 8..) = (addr, prefix)
            && v6.is_multicast()
        {
            return Err(format!(
                "{s:?} is inside ff00::/8, IPv6 multicast, which no packet comes from: a policy \
                 for it would never match"
            ));
        }
        // An IPv4-mapped address (`::ffff:a.b.c.d`, or a prefix inside `::ffff:0:0/96`) is how
        // IPv4 clients are keyed: as an IPv6 policy it would take an IPv4 client's key while no
        // IPv6 packet can come from it (such sources are malformed on the wire).
        if let (IpAddr::V6(v6), 96..) = (addr, prefix)
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            let v4_form = if prefix == 128 {
                v4.to_string()
            } else {
                format!("{v4}/{}", prefix - 96)
            };
            return Err(format!(
                "{s:?} is an IPv4-mapped IPv6 address, which no IPv6 packet comes from; IPv4 \
                 clients are matched by IPv4 addresses: write {v4_form}"
            ));
        }
        Ok(cidr)
    }
}

impl Cidr {
    /// The prefix of length `prefix` that holds this one (`prefix` no longer than its own).
    pub fn within(&self, prefix: u8) -> Cidr {
        let outer = Cidr {
            addr: self.addr,
            prefix: prefix.min(self.prefix),
        };
        Cidr {
            addr: outer.masked(),
            ..outer
        }
    }

    fn masked(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_host() {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| de::Error::custom(format!("`match`: {e}")))
    }
}

/// Longest client ID (API checks and `match`), in bytes.
pub const MAX_ID_LEN: usize = 256;

/// An API client ID that is not an address: 1 to 256 bytes of UTF-8 without control characters,
/// not `default`, and not shaped like an address (see [`Match`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientName(String);

impl ClientName {
    pub fn new(s: &str) -> Result<ClientName, String> {
        if s.is_empty() {
            return Err("an ID must not be empty".into());
        }
        if s.len() > MAX_ID_LEN {
            return Err(format!(
                "an ID is at most {MAX_ID_LEN} bytes, this one has {}",
                s.len()
            ));
        }
        if let Some(c) = s.chars().find(|c| c.is_control()) {
            return Err(format!("an ID must not contain control characters ({c:?})"));
        }
        if s.trim() != s {
            return Err(format!(
                "{s:?}: an ID must not start or end with whitespace (a padded address or `default` would read as an ID)"
            ));
        }
        if s == "default" {
            return Err("`default` names the default policy, not an ID".into());
        }
        Ok(ClientName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a policy matches: an address prefix (or one address), or one exact API client ID.
///
/// A string is an address if it parses as one. A string made only of hex digits, `.`, `:` and
/// `/`, with at least one of the separators, that does not parse (`10.0.0.0/33`,
/// `2001:db8::g`) is rejected as a malformed address rather than taken as an ID, so a typo never
/// silently becomes a policy for a client ID nobody uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    Prefix(Cidr),
    Id(ClientName),
}

impl Match {
    pub fn as_prefix(&self) -> Option<&Cidr> {
        match self {
            Match::Prefix(c) => Some(c),
            Match::Id(_) => None,
        }
    }

    pub fn as_id(&self) -> Option<&ClientName> {
        match self {
            Match::Prefix(_) => None,
            Match::Id(id) => Some(id),
        }
    }
}

/// Whether `s` is shaped like an address or prefix (see [`Match`]).
pub fn looks_like_address(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '/'))
        && s.contains(['.', ':', '/'])
}

impl FromStr for Match {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.parse::<Cidr>() {
            Ok(cidr) => Ok(Match::Prefix(cidr)),
            Err(e) if looks_like_address(s.trim()) => Err(e),
            Err(_) => ClientName::new(s).map(Match::Id),
        }
    }
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Match::Prefix(c) => c.fmt(f),
            Match::Id(id) => id.fmt(f),
        }
    }
}

impl<'de> Deserialize<'de> for Match {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| de::Error::custom(format!("`match`: {e}")))
    }
}

/// A limit as written: `limit`, `window`, `action`, `weight`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub limit: Option<u32>,
    pub window: Option<Window>,
    #[serde(default)]
    pub action: Action,
    /// As written (any YAML value); [`Config::parse`] checks it is a positive finite number.
    #[serde(default)]
    pub weight: Option<serde_yaml::Value>,
    /// `default` only: how each family's addresses group into clients (see [`Grouping`]).
    #[serde(default)]
    pub per: Option<DefaultPer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(rename = "match")]
    pub matches: Match,
    pub limit: Option<u32>,
    pub window: Option<Window>,
    #[serde(default)]
    pub action: Action,
    /// As written (any YAML value); [`Config::parse`] checks it is a positive finite number.
    #[serde(default)]
    pub weight: Option<serde_yaml::Value>,
    /// How the policy groups its addresses into clients; absent: as `default` does for the
    /// family.
    #[serde(default)]
    pub per: Option<Per>,
    /// `global`: the limit holds across the cluster (needs a `cluster:` section).
    #[serde(default)]
    pub scope: Scope,
}

impl Rule {
    /// The rule's limit fields.
    pub fn limit(&self) -> Limit {
        Limit {
            limit: self.limit,
            window: self.window,
            action: self.action,
            weight: self.weight.clone(),
            per: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    mode: Mode,
    default: Limit,
    #[serde(default)]
    policies: Vec<Rule>,
    /// An absent section, and one with every key commented out (`adaptive:` alone), is the
    /// default: off.
    #[serde(default, deserialize_with = "null_is_default")]
    adaptive: AdaptiveConfig,
    /// Absent: the agent limits alone, as before the cluster existed.
    #[serde(default)]
    cluster: Option<RawCluster>,
}

fn null_is_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<T, D::Error> {
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

/// A policy's weight when it has none.
pub const DEFAULT_WEIGHT: f64 = 1.0;

/// A validated limit, ready for the maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub action: Action,
    /// Packets per window (0 for `drop`, unused for `pass`).
    pub limit: u32,
    /// Window (unused for `pass` and `drop`).
    pub window: Window,
}

/// A validated policy set.
///
/// Not `Eq`: the adaptive knobs are floating point.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub mode: Mode,
    pub default: Resolved,
    /// In file order; policy id `i + 1` is `policies[i]`, id 0 is `default`.
    pub policies: Vec<(Match, Resolved)>,
    /// Weight of each policy for weighted fair shares under overload, indexed by policy id
    /// (`weights[0]` is `default`'s, `weights[i + 1]` is `policies[i]`'s), so one longer than
    /// `policies`. Each is positive and finite; [`DEFAULT_WEIGHT`] where none is written. Use
    /// [`Config::weight`] to look one up.
    pub weights: Vec<f64>,
    /// The `adaptive` section, validated ([`AdaptiveConfig::default`], i.e. off, if absent).
    pub adaptive: AdaptiveConfig,
    /// How addresses group into clients (`per`), validated.
    pub grouping: Grouping,
    /// The scope of each policy, indexed like `weights` (`default` is always local).
    pub scopes: Vec<Scope>,
    /// The `cluster:` section, validated; `None` without one.
    pub cluster: Option<ClusterConfig>,
    /// What is valid but likely a mistake (a global limit close to the member count), for the
    /// agent to log when it takes the config up.
    pub warnings: Vec<String>,
    /// In the config the maps hold (`limits::with_shares`): each global policy's limit across
    /// the cluster, by policy id, its `limit` being this node's share. Empty as parsed.
    pub global_limits: std::collections::BTreeMap<u16, u32>,
}

/// Placeholder window for `pass`/`drop` policies, which never consult it.
const UNUSED_WINDOW: Window = Window { micros: 1_000_000 };

impl Config {
    /// Parses and validates a config file's text.
    ///
    /// Besides `limit`, `window` and `action`, `default` and each policy may carry a `weight`
    /// (a positive finite number, default 1): its share under overload relative to the other
    /// policies' clients. It is accepted on `pass` and `drop` policies too, where it has no
    /// effect: an API edit that turns a weighted policy into `pass` or `drop` keeps the keys it
    /// does not manage, so rejecting it there would make such an edit fail. An optional
    /// `adaptive` section holds the [`AdaptiveConfig`] knobs; it is validated even when
    /// `enabled: false`, so a bad knob is caught before it is switched on.
    pub fn parse(text: &str) -> Result<Config, PolicyError> {
        if text.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
        }) {
            return Err(PolicyError::Empty);
        }
        let file: Result<File, _> = serde_yaml::from_str(text);
        // Positions only for a file with something to point at: the common valid file pays
        // nothing more than its validation.
        let positions = std::cell::OnceCell::new();
        let lines = || positions.get_or_init(|| KeyLines::of(text));
        let file = file.map_err(|e| locate_value_error(e, lines()))?;
        file.adaptive
            .validate()
            .map_err(|e| adaptive_error(&e, lines()))?;
        let line_of = |i: usize| LineHint(lines().line(&format!("policies[{i}].match")));
        let default_invalid = |message| PolicyError::Invalid {
            field: "default".into(),
            line: LineHint(lines().line("default")),
            message,
        };
        let default = file
            .default
            .resolve()
            .map_err(|e| default_invalid(e.message))?;
        let mut weights = Vec::with_capacity(file.policies.len() + 1);
        weights.push(weight(file.default.weight.as_ref()).map_err(default_invalid)?);
        let per_invalid = |message| PolicyError::Invalid {
            field: "default.per".into(),
            line: LineHint(lines().line("default.per").or(lines().line("default"))),
            message,
        };
        let (default_v4, default_v6) = match &file.default.per {
            None => (Per::Address, DEFAULT_V6_PER),
            Some(DefaultPer::Both(per)) => match per {
                Per::Prefix(n) => {
                    return Err(per_invalid(format!(
                        "`default` covers both families, so a prefix length needs one per \
                         family: write `per: {{ ipv4: /{n}, ipv6: /64 }}` (either may be left \
                         out: IPv4 counts per address, IPv6 per /64)"
                    )));
                }
                per => (*per, *per),
            },
            Some(DefaultPer::Families { ipv4, ipv6 }) => {
                (ipv4.unwrap_or(Per::Address), ipv6.unwrap_or(DEFAULT_V6_PER))
            }
        };
        for (family, per, v6) in [("ipv4", default_v4, false), ("ipv6", default_v6, true)] {
            check_per(per, None, v6).map_err(|message| {
                let field = format!("default.per.{family}");
                PolicyError::Invalid {
                    line: LineHint(
                        lines()
                            .line(&field)
                            .or(lines().line("default.per"))
                            .or(lines().line("default")),
                    ),
                    field,
                    message,
                }
            })?;
        }
        let mut pers = Vec::with_capacity(file.policies.len());
        if file.policies.len() > MAX_POLICIES {
            return Err(PolicyError::TooMany {
                count: file.policies.len(),
            });
        }
        let mut seen: HashMap<&Match, usize> = HashMap::new();
        let mut policies = Vec::with_capacity(file.policies.len());
        for (i, rule) in file.policies.iter().enumerate() {
            let invalid = |message: String| PolicyError::Invalid {
                field: format!("policies[{i}] (match {})", rule.matches),
                line: line_of(i),
                message,
            };
            if let Some(first) = seen.insert(&rule.matches, i) {
                return Err(invalid(format!(
                    "duplicate match: policies[{first}] already matches {}",
                    rule.matches
                )));
            }
            policies.push((
                rule.matches.clone(),
                rule.limit().resolve().map_err(|e| invalid(e.message))?,
            ));
            weights.push(weight(rule.weight.as_ref()).map_err(invalid)?);
            if let Some(per) = rule.per {
                let per_invalid = |message: String| PolicyError::Invalid {
                    field: format!("policies[{i}].per (match {})", rule.matches),
                    line: LineHint(lines().line(&format!("policies[{i}].per")).or(line_of(i).0)),
                    message,
                };
                match &rule.matches {
                    Match::Id(_) => {
                        return Err(per_invalid(
                            "`per` groups addresses; a policy for a client ID has one client, \
                             the ID: remove `per`"
                                .into(),
                        ));
                    }
                    Match::Prefix(cidr) => {
                        check_per(per, Some(cidr), cidr.addr.is_ipv6()).map_err(per_invalid)?;
                    }
                }
            }
            pers.push(rule.per);
        }
        let statics = policies
            .iter()
            .filter(|(m, _)| m.as_prefix().is_some_and(Cidr::is_host))
            .count();
        if statics > MAX_STATIC_CLIENTS {
            return Err(PolicyError::TooManyStatic { count: statics });
        }
        let cluster = match &file.cluster {
            None => None,
            Some(raw) => Some(raw.validate().map_err(|e| {
                let field = format!("cluster.{}", e.field);
                PolicyError::Invalid {
                    line: LineHint(lines().line(&field).or(lines().line("cluster"))),
                    field,
                    message: e.message,
                }
            })?),
        };
        let mut scopes = Vec::with_capacity(file.policies.len() + 1);
        scopes.push(Scope::Local);
        scopes.extend(file.policies.iter().map(|rule| rule.scope));
        let warnings = check_scopes(&policies, &scopes, cluster.as_ref(), |i, key| {
            LineHint(
                lines()
                    .line(&format!("policies[{i}].{key}"))
                    .or(line_of(i).0),
            )
        })?;
        Ok(Config {
            mode: file.mode,
            default,
            policies,
            weights,
            adaptive: file.adaptive,
            grouping: Grouping {
                default_v4,
                default_v6,
                policies: pers,
            },
            scopes,
            cluster,
            warnings,
            global_limits: Default::default(),
        })
    }

    /// The weight of policy `id` (0 is `default`); [`DEFAULT_WEIGHT`] for an unknown id.
    pub fn weight(&self, id: u16) -> f64 {
        self.weights
            .get(id as usize)
            .copied()
            .unwrap_or(DEFAULT_WEIGHT)
    }

    /// The scope of policy `id` (0 is `default`, always local); local for an unknown id.
    pub fn scope(&self, id: u16) -> Scope {
        self.scopes
            .get(id as usize)
            .copied()
            .unwrap_or(Scope::Local)
    }

    /// The limit, window and action of policy `id` as configured (0 is `default`), before any
    /// adaptive scaling; `None` for an unknown id.
    pub fn policy_base(&self, id: u16) -> Option<Resolved> {
        match id {
            0 => Some(self.default),
            id => self.policies.get(id as usize - 1).map(|(_, r)| *r),
        }
    }

    /// The `match` of policy `id` as written (`default` for 0).
    pub fn policy_name(&self, id: u16) -> String {
        match id {
            0 => "default".into(),
            id => self
                .policies
                .get(id as usize - 1)
                .map_or_else(|| format!("#{id}"), |(m, _)| m.to_string()),
        }
    }
}

/// The checks [`Config::parse`] makes of the whole policy set, for one made without parsing
/// (the file with the policy overlay merged over it, whose every policy and `per` was checked
/// where it came from): the number of policies, of exact-address policies, and the global
/// limits. Returns the warnings; errors name no line (there is no text).
pub(crate) fn check_merged(
    policies: &[(Match, Resolved)],
    scopes: &[Scope],
    cluster: Option<&ClusterConfig>,
) -> Result<Vec<String>, PolicyError> {
    if policies.len() > MAX_POLICIES {
        return Err(PolicyError::TooMany {
            count: policies.len(),
        });
    }
    let statics = policies
        .iter()
        .filter(|(m, _)| m.as_prefix().is_some_and(Cidr::is_host))
        .count();
    if statics > MAX_STATIC_CLIENTS {
        return Err(PolicyError::TooManyStatic { count: statics });
    }
    check_scopes(policies, scopes, cluster, |_, _| LineHint(None))
}

/// Checks the global policies of `policies` (scopes indexed by policy id, 0 the default's)
/// against `cluster`: each needs the section, and a `limit` policy at least one per member.
/// Returns the warnings (a global limit below 10× the members); `line(i, key)` is where
/// `policies[i].key` is written, if known.
fn check_scopes(
    policies: &[(Match, Resolved)],
    scopes: &[Scope],
    cluster: Option<&ClusterConfig>,
    line: impl Fn(usize, &str) -> LineHint,
) -> Result<Vec<String>, PolicyError> {
    let mut warnings = Vec::new();
    for (i, (matches, resolved)) in policies.iter().enumerate() {
        if scopes.get(i + 1).copied().unwrap_or_default() == Scope::Local {
            continue;
        }
        let invalid = |key: &str, message: String| PolicyError::Invalid {
            field: format!("policies[{i}].{key} (match {matches})"),
            line: line(i, key),
            message,
        };
        let Some(cluster) = cluster else {
            return Err(invalid(
                "scope",
                "`scope: global` holds a limit across the members of a cluster: add a \
                `cluster:` section (node_id, listen, peers, token_file), or remove `scope`"
                    .into(),
            ));
        };
        if resolved.action != Action::Limit {
            // Accepted, and without effect, as `weight` is: an API edit that turns a global
            // policy into `pass` or `drop` keeps the file's keys.
            continue;
        }
        let members = cluster.configured_members();
        if resolved.limit < members {
            return Err(invalid(
                "limit",
                format!(
                    "limit {} is below the cluster's {members} members: each member enforces \
                its share ⌊limit / members⌋, which would be 0 (the policy is `scope: global`)",
                    resolved.limit
                ),
            ));
        }
        if u64::from(resolved.limit) < 10 * u64::from(members) {
            warnings.push(format!(
                "policies[{i}] (match {matches}){}: global limit {} is below 10× the cluster's \
                {members} members: the shares ⌊limit / members⌋ round away up to {} of it",
                line(i, "match"),
                resolved.limit,
                members - 1
            ));
        }
    }
    Ok(warnings)
}

impl Limit {
    /// Validates a limit, from the file or from the API: the one place its rules live.
    pub fn resolve(&self) -> Result<Resolved, LimitError> {
        let invalid = |field, message: &str| LimitError {
            field,
            message: message.to_string(),
        };
        match self.action {
            Action::Limit => {
                let count = self.limit.ok_or_else(|| {
                    invalid(
                        "limit",
                        "`limit` is required (packets per window; 0 blocks)",
                    )
                })?;
                let window = self
                    .window
                    .ok_or_else(|| invalid("window", "`window` is required, e.g. `window: 1s`"))?;
                Ok(Resolved {
                    action: Action::Limit,
                    limit: count,
                    window,
                })
            }
            Action::Pass => {
                let field = if self.limit.is_some() {
                    "limit"
                } else {
                    "window"
                };
                if self.limit.is_some() || self.window.is_some() {
                    return Err(invalid(
                        field,
                        "`action: pass` is never limited: remove `limit` and `window`",
                    ));
                }
                Ok(Resolved {
                    action: Action::Pass,
                    limit: 0,
                    window: UNUSED_WINDOW,
                })
            }
            Action::Drop => {
                let bad_limit = self.limit.is_some_and(|l| l != 0);
                if bad_limit || self.window.is_some() {
                    return Err(invalid(
                        if bad_limit { "limit" } else { "window" },
                        "`action: drop` blocks every packet: remove `window`, and `limit` unless it is 0",
                    ));
                }
                Ok(Resolved {
                    action: Action::Drop,
                    limit: 0,
                    window: UNUSED_WINDOW,
                })
            }
        }
    }
}

/// A limit that breaks a rule: the field at fault (`limit` or `window`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct LimitError {
    pub field: &'static str,
    pub message: String,
}

/// A `weight` as written, checked: absent is [`DEFAULT_WEIGHT`].
pub(crate) fn weight(written: Option<&serde_yaml::Value>) -> Result<f64, String> {
    let Some(value) = written else {
        return Ok(DEFAULT_WEIGHT);
    };
    match value.as_f64() {
        Some(w) if w.is_finite() && w > 0.0 => Ok(w),
        _ => {
            let shown = match value {
                serde_yaml::Value::String(s) => format!("the string {s:?}"),
                serde_yaml::Value::Number(n) => n.to_string(),
                serde_yaml::Value::Bool(b) => b.to_string(),
                serde_yaml::Value::Sequence(_) => "a list".into(),
                serde_yaml::Value::Mapping(_) => "a mapping".into(),
                _ => "a non-number".into(),
            };
            Err(format!(
                "`weight` must be a positive finite number (default 1), got {shown}"
            ))
        }
    }
}

#[cfg(test)]
mod tests;
