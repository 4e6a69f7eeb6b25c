//! YAML policies: parsing, validation, and the map entries they become.
//!
//! Every check happens here, before anything touches the maps, so a config with an error is
//! rejected whole and the policies in force stay in force.

use std::{collections::HashMap, fmt, net::IpAddr, str::FromStr};

use limiter_common::{
    Policy,
    addr::{ClientKey, FAMILY_BITS, FAMILY_V4, PolicyKey, policy_key_v4, policy_key_v6, v4_mapped},
    maps::{ACTION_DROP, ACTION_LIMIT, ACTION_PASS},
    window::{MAX_WINDOW_US, MIN_WINDOW_US},
};
use serde::{Deserialize, Deserializer, de};

use crate::adaptive::{AdaptiveConfig, AdaptiveError};

/// Most policies one config may hold: a client entry stores its policy's id in 15 bits
/// (`limiter_common::maps::MAX_POLICY_ID`; the `POLICIES` trie has room for these plus
/// `default`).
pub const MAX_POLICIES: usize = limiter_common::maps::MAX_POLICY_ID as usize;
/// Most exact-address policies (the size of the never-evicted `STATIC_CLIENTS` map).
pub const MAX_STATIC_CLIENTS: usize = 65_536;

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

/// A window length, written `10ms`, `1.5s`, `2m`, `1h`; between 10 ms and 1 h.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub micros: u32,
}

/// A duration written with a unit (`250us`, `10ms`, `1.5s`, `2m`, `1h`), in whole microseconds;
/// `what` names it in errors (`window`, `period`). Range checks are the caller's.
pub fn parse_duration_us(s: &str, what: &str) -> Result<f64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let unit_us: f64 = match unit.trim() {
        "us" | "µs" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => {
            return Err(format!(
                "invalid {what} {s:?}: expected a number with a unit of ms, s, m or h, like 500ms or 1s"
            ));
        }
    };
    let number: f64 = number
        .parse()
        .map_err(|_| format!("invalid {what} {s:?}: {number:?} is not a number"))?;
    let micros = number * unit_us;
    if (micros - micros.round()).abs() > 1e-6 {
        return Err(format!(
            "invalid {what} {s:?}: not a whole number of microseconds"
        ));
    }
    Ok(micros.round())
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
        Ok(cidr)
    }
}

impl Cidr {
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
}

impl Rule {
    /// The rule's limit fields.
    pub fn limit(&self) -> Limit {
        Limit {
            limit: self.limit,
            window: self.window,
            action: self.action,
            weight: self.weight.clone(),
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
        let file: File = serde_yaml::from_str(text).map_err(|e| locate_value_error(e, text))?;
        file.adaptive
            .validate()
            .map_err(|e| adaptive_error(&e, text))?;
        let match_lines = match_lines(text);
        let line_of = |i: usize| {
            LineHint(
                match_lines
                    .get(i)
                    .copied()
                    .filter(|_| match_lines.len() == file.policies.len()),
            )
        };
        let default_invalid = |message| PolicyError::Invalid {
            field: "default".into(),
            line: LineHint(line_of_key(text, "default")),
            message,
        };
        let default = resolve(&file.default).map_err(default_invalid)?;
        let mut weights = Vec::with_capacity(file.policies.len() + 1);
        weights.push(weight(file.default.weight.as_ref()).map_err(default_invalid)?);
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
                resolve(&rule.limit()).map_err(invalid)?,
            ));
            weights.push(weight(rule.weight.as_ref()).map_err(invalid)?);
        }
        let statics = policies
            .iter()
            .filter(|(m, _)| m.as_prefix().is_some_and(Cidr::is_host))
            .count();
        if statics > MAX_STATIC_CLIENTS {
            return Err(PolicyError::TooManyStatic { count: statics });
        }
        Ok(Config {
            mode: file.mode,
            default,
            policies,
            weights,
            adaptive: file.adaptive,
        })
    }

    /// The weight of policy `id` (0 is `default`); [`DEFAULT_WEIGHT`] for an unknown id.
    pub fn weight(&self, id: u16) -> f64 {
        self.weights
            .get(id as usize)
            .copied()
            .unwrap_or(DEFAULT_WEIGHT)
    }

    /// The limit, window and action of policy `id` as configured (0 is `default`), before any
    /// adaptive scaling; `None` for an unknown id.
    pub fn policy_base(&self, id: u16) -> Option<Resolved> {
        match id {
            0 => Some(self.default),
            id => self.policies.get(id as usize - 1).map(|(_, r)| *r),
        }
    }

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

/// Checks a limit as written and resolves it (`limit`/`window`/`action` rules); the message
/// names the problem, the caller names the policy.
pub(crate) fn resolve(limit: &Limit) -> Result<Resolved, String> {
    match limit.action {
        Action::Limit => {
            let count = limit
                .limit
                .ok_or("`limit` is required (packets per window; 0 blocks)")?;
            let window = limit
                .window
                .ok_or("`window` is required, e.g. `window: 1s`")?;
            Ok(Resolved {
                action: Action::Limit,
                limit: count,
                window,
            })
        }
        Action::Pass => {
            if limit.limit.is_some() || limit.window.is_some() {
                return Err("`action: pass` is never limited: remove `limit` and `window`".into());
            }
            Ok(Resolved {
                action: Action::Pass,
                limit: 0,
                window: UNUSED_WINDOW,
            })
        }
        Action::Drop => {
            if limit.limit.is_some_and(|l| l != 0) || limit.window.is_some() {
                return Err("`action: drop` blocks every packet: remove `window`, and `limit` unless it is 0".into());
            }
            Ok(Resolved {
                action: Action::Drop,
                limit: 0,
                window: UNUSED_WINDOW,
            })
        }
    }
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

/// An `adaptive` knob out of range, as `adaptive.<field> (line N): must be ..., got ...`, at
/// the line of the key if it is written, else of the nearest enclosing key that is (a knob
/// left at its default can break a constraint relative to another one).
fn adaptive_error(e: &AdaptiveError, text: &str) -> PolicyError {
    let path: Vec<&str> = std::iter::once("adaptive")
        .chain(e.field.split('.'))
        .collect();
    let line = (1..=path.len())
        .rev()
        .find_map(|n| line_of_path(text, &path[..n]));
    PolicyError::Invalid {
        field: format!("adaptive.{}", e.field),
        line: LineHint(line),
        message: format!("must be {}, got {}", e.constraint, e.value),
    }
}

/// serde_yaml places an error raised while parsing a value (a bad `window` or `match`) at the
/// start of the enclosing mapping; this moves it to the line of the field itself and names the
/// field in the path (`policies[0].window (line 6): ...`).
fn locate_value_error(e: serde_yaml::Error, text: &str) -> PolicyError {
    let (message, Some(location)) = (e.to_string(), e.location()) else {
        return PolicyError::Yaml(e);
    };
    // `adaptive.period`'s own parser says `invalid period "5x": ...` (or `period "..." is out
    // of range`), and serde_yaml names it after, and places it at, the `adaptive` mapping.
    if let Some(detail) = message
        .strip_prefix("adaptive: ")
        .filter(|d| d.starts_with("invalid period ") || d.starts_with("period \""))
    {
        let detail = detail
            .rfind(" at line ")
            .map_or(detail, |end| &detail[..end]);
        return PolicyError::Invalid {
            field: "adaptive.period".into(),
            line: LineHint(line_of_path(text, &["adaptive", "period"]).or(Some(location.line()))),
            message: detail.to_string(),
        };
    }
    for key in ["window", "match"] {
        let tag = format!("`{key}`: ");
        let Some(at) = message.find(&tag) else {
            continue;
        };
        let path = message[..at].trim_end_matches(": ").trim_end_matches(':');
        let detail = &message[at + tag.len()..];
        let detail = detail
            .rfind(" at line ")
            .map_or(detail, |end| &detail[..end]);
        let needle = format!("{key}:");
        let line = text
            .lines()
            .enumerate()
            .skip(location.line().saturating_sub(1))
            .find(|(_, l)| l.split('#').next().unwrap_or("").contains(&needle))
            .map_or(location.line(), |(i, _)| i + 1);
        let field = if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        };
        return PolicyError::Invalid {
            field,
            line: LineHint(Some(line)),
            message: detail.to_string(),
        };
    }
    PolicyError::Yaml(e)
}

/// 1-based lines of each `match:` key, in order (policies are matched to them by position).
fn match_lines(text: &str) -> Vec<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let code = l.split('#').next().unwrap_or("");
            code.contains("match:")
        })
        .map(|(i, _)| i + 1)
        .collect()
}

fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let prefix = format!("{key}:");
    text.lines()
        .position(|l| l.starts_with(&prefix))
        .map(|i| i + 1)
}

/// `line` without its comment (a `#` at its start or after whitespace).
fn strip_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    let end = (0..bytes.len())
        .find(|&i| bytes[i] == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()))
        .unwrap_or(bytes.len());
    &line[..end]
}

/// 1-based line of the key at `path` (`["adaptive", "load", "high"]`): a top-level key, then
/// each next key inside the value of the one before, in block or flow style. The value of a key
/// at column `c` is the rest of its line plus the following lines indented deeper than `c`.
/// A text search, not a parse: good enough to point at a line, never used to decide validity.
fn line_of_path(text: &str, path: &[&str]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().map(strip_comment).collect();
    let (first, rest) = path.split_first()?;
    let mut line = line_of_key(text, first)? - 1;
    let (mut column, mut value_from) = (0, first.len() + 1);
    for key in rest {
        let region = std::iter::once((line, value_from)).chain(
            (line + 1..lines.len())
                .take_while(|&l| {
                    let code = lines[l];
                    code.trim().is_empty() || code.len() - code.trim_start().len() > column
                })
                .map(|l| (l, 0)),
        );
        let (l, at, end) = region
            .filter_map(|(l, from)| find_key(lines[l], from, key).map(|(at, end)| (l, at, end)))
            .next()?;
        (line, column, value_from) = (l, at, end);
    }
    Some(line + 1)
}

/// The first `key:` (plain or quoted) in `code` at or after byte `from`, as a mapping key:
/// preceded by the line start, whitespace, `{` or `,`, and followed by `:` and whitespace, `}`,
/// `,` or the line end. Returns the key's start and the byte after its `:`.
fn find_key(code: &str, from: usize, key: &str) -> Option<(usize, usize)> {
    let bytes = code.as_bytes();
    for quote in ["", "\"", "'"] {
        let needle = format!("{quote}{key}{quote}");
        let mut search = from;
        while let Some(found) = code.get(search..)?.find(&needle) {
            let at = search + found;
            search = at + 1;
            let before_ok = at == 0 || matches!(bytes[at - 1], b' ' | b'\t' | b'{' | b',' | b'-');
            let after = code[at + needle.len()..].trim_start_matches([' ', '\t']);
            let colon_ok = after
                .strip_prefix(':')
                .is_some_and(|v| v.is_empty() || v.starts_with([' ', '\t', '}', ',']));
            if before_ok && colon_ok {
                let end = code.len() - after.len() + 1;
                return Some((at, end));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "\
mode: enforce            # or dry-run
default: { limit: 1000, window: 1s }
policies:
  - match: 10.0.0.0/8
    limit: 100
    window: 500ms
  - match: 2001:db8::/32
    limit: 50
    window: 1s
  - match: 192.0.2.7
    action: pass
  - match: 198.51.100.0/24
    action: drop
";

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_the_readme_example() {
        let c = Config::parse(EXAMPLE).unwrap();
        assert_eq!(c.mode, Mode::Enforce);
        assert_eq!(c.default.limit, 1000);
        assert_eq!(c.default.window.micros, 1_000_000);
        assert_eq!(c.policies.len(), 4);
        assert_eq!(c.policies[0].1.window.micros, 500_000);
        assert_eq!(c.policies[2].1.action, Action::Pass);
        assert_eq!(c.static_clients(), vec![v4_mapped([192, 0, 2, 7])]);
        let lpm = c.lpm_entries();
        assert_eq!(lpm.len(), 6);
        assert_eq!(lpm[&policy_key_v4([10, 0, 0, 0], 8)].limit, 100);
        assert_eq!(lpm[&policy_key_v4([192, 0, 2, 7], 32)].action, ACTION_PASS);
        assert_eq!(lpm[&policy_key_v4([0; 4], 0)].id, 0);
        assert_eq!(lpm[&policy_key_v6(&[0; 16], 0)].id, 0);
    }

    #[test]
    fn windows_parse_and_bound() {
        assert_eq!("10ms".parse::<Window>().unwrap().micros, 10_000);
        assert_eq!("1.5s".parse::<Window>().unwrap().micros, 1_500_000);
        assert_eq!("1h".parse::<Window>().unwrap().micros, 3_600_000_000);
        assert_eq!("2m".parse::<Window>().unwrap().to_string(), "2m");
        assert!(
            "9ms"
                .parse::<Window>()
                .unwrap_err()
                .contains("between 10ms and 1h")
        );
        assert!(
            "2h".parse::<Window>()
                .unwrap_err()
                .contains("between 10ms and 1h")
        );
        assert!("5x".parse::<Window>().unwrap_err().contains("unit"));
        assert!("s".parse::<Window>().unwrap_err().contains("not a number"));
    }

    #[test]
    fn cidrs_parse_strictly() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().lpm_key().0, 16);
        assert_eq!("2001:db8::/32".parse::<Cidr>().unwrap().lpm_key().0, 40);
        for text in ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7", "::/0"] {
            let c: Cidr = text.parse().unwrap();
            let (len, key) = c.lpm_key();
            assert_eq!(Cidr::from_lpm(len, &key), c);
        }
        assert!("192.0.2.7".parse::<Cidr>().unwrap().is_host());
        assert!(
            "10.0.0.1/8"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("did you mean 10.0.0.0/8")
        );
        assert!(
            "10.0.0.0/33"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("0 to 32")
        );
        assert!(
            "10.0.0.300"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("not an IPv4 or IPv6")
        );
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().lpm_key().0, 8);
    }

    #[test]
    fn errors_name_the_field_and_line() {
        let e = err(
            "default: { limit: 10, window: 1s }\npolicies:\n  - match: 10.0.0.0/8\n    limit: 5\n    window: 5x\n",
        );
        assert!(
            e.contains("policies[0].window (line 5): invalid window \"5x\""),
            "{e}"
        );
        let e = err(
            "default: { limit: 10, window: 1s }\npolicies:\n  - match: 10.0.0.0/33\n    limit: 5\n    window: 1s\n",
        );
        assert!(
            e.contains("policies[0].match (line 3): \"10.0.0.0/33\""),
            "{e}"
        );
        let e = err(
            "default: { limit: 10, window: 1s }\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 2h }\n",
        );
        assert!(
            e.contains("policies[0].window (line 3): window \"2h\" is out of range"),
            "{e}"
        );
        let e = err("default: { limit: 10, window: 0s }\n");
        assert!(e.contains("default.window (line 1)"), "{e}");
        let e = err("default: { limit: -1, window: 1s }\n");
        assert!(e.contains("default.limit") && e.contains("line 1"), "{e}");
        let e = err("default: { limit: 4294967296, window: 1s }\n");
        assert!(e.contains("default.limit"), "{e}");
        let e = err(
            "default: { limit: 10, window: 1s }\npolicies:\n  - match: 10.0.0.0/8\n    limt: 5\n",
        );
        assert!(e.contains("limt") && e.contains("line 4"), "{e}");
        let e = err("mode: enforced\ndefault: { limit: 10, window: 1s }\n");
        assert!(e.contains("mode") && e.contains("enforced"), "{e}");
        let e = err("policies: []\n");
        assert!(e.contains("missing field `default`"), "{e}");
    }

    #[test]
    fn cross_field_errors_name_the_policy_and_line() {
        let e = err(
            "default: { limit: 10, window: 1s }\npolicies:\n  - match: 10.0.0.0/8\n    limit: 5\n",
        );
        assert!(
            e.contains("policies[0] (match 10.0.0.0/8) (line 3)")
                && e.contains("`window` is required"),
            "{e}"
        );
        let e = err(
            "default: { limit: 10, window: 1s }\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 1s }\n  - { match: 10.0.0.0/8, limit: 2, window: 1s }\n",
        );
        assert!(
            e.contains("policies[1]") && e.contains("line 4") && e.contains("duplicate"),
            "{e}"
        );
        let e = err(
            "default: { limit: 10, window: 1s }\npolicies:\n  - { match: 192.0.2.7, action: pass, limit: 3 }\n",
        );
        assert!(e.contains("remove `limit` and `window`"), "{e}");
        let e = err("default: { window: 1s }\n");
        assert!(
            e.contains("default (line 1)") && e.contains("`limit` is required"),
            "{e}"
        );
    }

    #[test]
    fn unspecified_addresses_are_host_policies() {
        let c = Config::parse(
            "default: { limit: 10, window: 1s }\npolicies:\n  - { match: 0.0.0.0, action: pass }\n  - { match: \"::\", action: pass }\n",
        )
        .unwrap();
        assert_eq!(c.static_clients(), vec![v4_mapped([0; 4]), [0; 16]]);
    }

    #[test]
    fn limit_zero_and_drop_block() {
        let c = Config::parse("default: { limit: 0, window: 1s }\npolicies:\n  - { match: 192.0.2.9, action: drop, limit: 0 }\n").unwrap();
        assert_eq!(c.default.limit, 0);
        assert_eq!(c.policies[0].1.action, Action::Drop);
        let c =
            Config::parse("mode: dry-run\ndefault: { limit: 4294967295, window: 1h }\n").unwrap();
        assert_eq!(c.mode, Mode::DryRun);
        assert_eq!(c.default.limit, u32::MAX);
    }

    #[test]
    fn matches_are_prefixes_or_ids_never_mistyped_addresses() {
        assert!(matches!(
            "10.0.0.0/8".parse::<Match>(),
            Ok(Match::Prefix(_))
        ));
        assert!(matches!(
            "2001:db8::1".parse::<Match>(),
            Ok(Match::Prefix(_))
        ));
        assert!(matches!("tenant-acme".parse::<Match>(), Ok(Match::Id(_))));
        assert!(matches!(
            "api key #7: \"x\"".parse::<Match>(),
            Ok(Match::Id(_))
        ));
        // Digits alone (a customer number) are an ID; anything address-shaped must parse.
        assert!(matches!("12345".parse::<Match>(), Ok(Match::Id(_))));
        for typo in [
            "10.0.0.0/33",
            "10.0.0.1/8",
            "2001:db8::12345/64",
            "1.2.3",
            "::/129",
        ] {
            let e = typo.parse::<Match>();
            assert!(e.is_err(), "{typo} must be rejected, got {e:?}");
        }
        assert!("".parse::<Match>().unwrap_err().contains("empty"));
        assert!("default".parse::<Match>().unwrap_err().contains("default"));
        assert!("a\nb".parse::<Match>().unwrap_err().contains("control"));
        assert!(
            "x".repeat(257)
                .parse::<Match>()
                .unwrap_err()
                .contains("256")
        );
        assert!("x".repeat(256).parse::<Match>().is_ok());
    }

    const ADAPTIVE: &str = "\
default: { limit: 1000, window: 1s }
adaptive:
  enabled: true
  min_scale: 0.5           # s >= min_scale
  max_scale: 8
  min_load_factor: 0.25
  step: 1.5
  alpha: 1
  dwell: 4
  idle_periods: 60
  grow_below: 0.4
  grow_after: 3
  shrink_above: 0.9
  load:
    high: 0.9
    low: 0.5
  period: 250ms
policies:
  - match: 10.0.0.0/8
    limit: 100
    window: 500ms
";

    /// `ADAPTIVE` with the line of `key` (its first occurrence) replaced by `line`.
    fn adaptive_with(key: &str, line: &str) -> String {
        let mut done = false;
        ADAPTIVE
            .lines()
            .map(|l| {
                if !done && l.trim_start().starts_with(&format!("{key}:")) {
                    done = true;
                    format!("{line}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect()
    }

    #[test]
    fn adaptive_section_parses_every_knob() {
        let c = Config::parse(ADAPTIVE).unwrap();
        let want = AdaptiveConfig {
            enabled: true,
            min_scale: 0.5,
            max_scale: 8.0,
            min_load_factor: 0.25,
            step: 1.5,
            alpha: 1.0,
            dwell: 4,
            idle_periods: 60,
            grow_below: 0.4,
            grow_after: 3,
            shrink_above: 0.9,
            load: crate::adaptive::LoadBands {
                high: 0.9,
                low: 0.5,
            },
            period: Window { micros: 250_000 },
        };
        assert_eq!(c.adaptive, want);
        assert_eq!(c.policies.len(), 1);
        // Flow style, and partial sections keep the other defaults.
        let c = Config::parse(
            "default: { limit: 1, window: 1s }\nadaptive: { enabled: true, load: { high: 0.95 } }\n",
        )
        .unwrap();
        assert!(c.adaptive.enabled);
        assert_eq!(c.adaptive.load.high, 0.95);
        assert_eq!(c.adaptive.load.low, 0.60);
        assert_eq!(c.adaptive.step, AdaptiveConfig::default().step);
    }

    #[test]
    fn adaptive_section_defaults_when_absent_or_off() {
        let c = Config::parse(EXAMPLE).unwrap();
        assert_eq!(c.adaptive, AdaptiveConfig::default());
        assert!(!c.adaptive.enabled);
        for text in [
            "default: { limit: 1, window: 1s }\nadaptive: { enabled: false }\n",
            "default: { limit: 1, window: 1s }\nadaptive: {}\n",
            "default: { limit: 1, window: 1s }\nadaptive:\n  # enabled: true\n",
        ] {
            let c = Config::parse(text).unwrap();
            assert_eq!(c.adaptive, AdaptiveConfig::default(), "{text}");
        }
    }

    #[test]
    fn adaptive_errors_name_the_knob_and_line() {
        let cases = [
            (
                "min_scale",
                "  min_scale: 0",
                "adaptive.min_scale (line 4): must be in (0, 1], got 0",
            ),
            (
                "min_scale",
                "  min_scale: 1.5",
                "adaptive.min_scale (line 4): must be in (0, 1]",
            ),
            (
                "max_scale",
                "  max_scale: 0.5",
                "adaptive.max_scale (line 5): must be >= 1",
            ),
            (
                "step",
                "  step: 1",
                "adaptive.step (line 7): must be > 1 and finite, got 1",
            ),
            ("step", "  step: .inf", "adaptive.step (line 7)"),
            ("alpha", "  alpha: 0", "adaptive.alpha (line 8)"),
            (
                "dwell",
                "  dwell: 0",
                "adaptive.dwell (line 9): must be >= 1, got 0",
            ),
            (
                "shrink_above",
                "  shrink_above: 0.3",
                "adaptive.shrink_above (line 13): must be > grow_below (0.4)",
            ),
            (
                "high",
                "    high: 0.5",
                "adaptive.load.low (line 16): must be >= 0 and < load.high (0.5), got 0.5",
            ),
            (
                "high",
                "    high: 1.2",
                "adaptive.load.high (line 15): must be in (0, 1], got 1.2",
            ),
        ];
        for (key, line, want) in cases {
            let text = adaptive_with(key, line);
            let e = err(&text);
            assert!(e.contains(want), "{line:?}: {e}\n{text}");
        }
        // Flow style: the knob's line.
        let e = err(
            "default: { limit: 1, window: 1s }\n\nadaptive: { enabled: true,\n  load: { high: 0.4, low: 0.4 } }\n",
        );
        assert!(e.contains("adaptive.load.low (line 4)"), "{e}");
        // A knob left at its default that breaks a constraint: the nearest written key.
        let e = err("default: { limit: 1, window: 1s }\nadaptive:\n  load: { low: 0.9 }\n");
        assert!(e.contains("adaptive.load.low (line 3)"), "{e}");
        let e = err("default: { limit: 1, window: 1s }\nadaptive:\n  grow_below: 0.9\n");
        assert!(
            e.contains("adaptive.shrink_above (line 2): must be > grow_below (0.9)"),
            "{e}"
        );
        // Checked even when off.
        let e = err("default: { limit: 1, window: 1s }\nadaptive: { enabled: false, step: 0.5 }\n");
        assert!(e.contains("adaptive.step (line 2)"), "{e}");
        // `period`: out of range (checked by `validate`), and unparsable (by its deserializer).
        let range = "must be between 100ms and 60s";
        for (period, want) in [
            ("50ms", format!("adaptive.period (line 17): {range}")),
            ("2m", format!("adaptive.period (line 17): {range}")),
            ("99999999999s", "adaptive.period (line 17): period".into()),
            (
                "5x",
                "adaptive.period (line 17): invalid period \"5x\"".into(),
            ),
            (
                "1.5",
                "adaptive.period (line 17): invalid period \"1.5\"".into(),
            ),
            (
                "0.0000001s",
                "adaptive.period (line 17): invalid period".into(),
            ),
        ] {
            let e = err(&adaptive_with("period", &format!("  period: {period}")));
            assert!(
                e.contains(&want) && !e.contains(" at line "),
                "{period}: {e}"
            );
        }
        let e = err(
            "default: { limit: 1, window: 1s }\nadaptive:\n  enabled: true\n\n  period: 7 # s\n",
        );
        assert!(
            e.contains(
                "adaptive.period (line 5): invalid period \"7\": expected a number with a unit"
            ),
            "{e}"
        );
        let e = err("default: { limit: 1, window: 1s }\nadaptive: { enabled: true, period: 1x }\n");
        assert!(
            e.contains("adaptive.period (line 2): invalid period"),
            "{e}"
        );
        let e =
            err("default: { limit: 1, window: 1s }\nadaptive: { enabled: true, period: [1] }\n");
        assert!(e.contains("adaptive.period") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn adaptive_unknown_keys_and_bad_types_name_the_key_and_line() {
        let cases = [
            (
                "min_scale",
                "  min_scal: 0.5",
                &["unknown field `min_scal`", "line 4"][..],
            ),
            (
                "min_scale",
                "  min_scale: half",
                &[
                    "adaptive.min_scale",
                    "invalid type: string \"half\"",
                    "line 4",
                ],
            ),
            ("dwell", "  dwell: -1", &["adaptive.dwell", "line 9"]),
            ("dwell", "  dwell: 2.5", &["adaptive.dwell", "line 9"]),
            ("enabled", "  enabled: on", &["adaptive.enabled", "line 3"]),
            (
                "high",
                "    hi: 0.9",
                &["adaptive.load", "unknown field `hi`", "line 15"],
            ),
            (
                "high",
                "    high: \"0.9\"",
                &["adaptive.load.high", "line 15"],
            ),
        ];
        for (key, line, wants) in cases {
            let text = adaptive_with(key, line);
            let e = err(&text);
            for want in wants {
                assert!(e.contains(want), "{line:?}: {want:?} not in {e}");
            }
        }
        let e = err("default: { limit: 1, window: 1s }\nadaptive: 3\n");
        assert!(e.contains("adaptive") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn weights_parse_and_look_up_by_policy_id() {
        let c = Config::parse(
            "default: { limit: 10, window: 1s, weight: 0.5 }\npolicies:\n  - match: 10.0.0.0/8\n    limit: 5\n    window: 1s\n    weight: 3\n  - { match: tenant-gold, limit: 9, window: 1s }\n  - { match: 192.0.2.7, action: pass, weight: 2.5 }\n",
        )
        .unwrap();
        assert_eq!(c.weights, vec![0.5, 3.0, 1.0, 2.5]);
        assert_eq!(c.weight(0), 0.5);
        assert_eq!(c.weight(1), 3.0);
        assert_eq!(c.weight(2), DEFAULT_WEIGHT);
        assert_eq!(c.weight(3), 2.5);
        assert_eq!(c.weight(4), DEFAULT_WEIGHT, "unknown id");
        assert_eq!(c.weight(u16::MAX), DEFAULT_WEIGHT);
        let c = Config::parse(EXAMPLE).unwrap();
        assert_eq!(c.weights, vec![1.0; 5]);
        // `weight: ~` is no weight.
        let c = Config::parse("default: { limit: 10, window: 1s, weight: ~ }\n").unwrap();
        assert_eq!(c.weight(0), 1.0);
        // Tiny and huge, as long as positive and finite.
        let c = Config::parse("default: { limit: 10, window: 1s, weight: 1e-9 }\n").unwrap();
        assert_eq!(c.weight(0), 1e-9);
        let c = Config::parse("default: { limit: 10, window: 1s, weight: 1e300 }\n").unwrap();
        assert_eq!(c.weight(0), 1e300);
    }

    #[test]
    fn weight_errors_name_the_policy() {
        for (weight, shown) in [
            ("0", "got 0"),
            ("-1", "got -1"),
            ("-0.5", "got -0.5"),
            (".nan", "got .nan"),
            (".inf", "got .inf"),
            ("-.inf", "got -.inf"),
            ("heavy", "got the string \"heavy\""),
            ("\"2\"", "got the string \"2\""),
            ("true", "got true"),
            ("[1]", "got a list"),
            ("{ x: 1 }", "got a mapping"),
        ] {
            let text = format!(
                "default: {{ limit: 10, window: 1s }}\npolicies:\n  - {{ match: 10.0.0.0/9, limit: 1, window: 1s }}\n  - match: 10.128.0.0/9\n    limit: 5\n    window: 1s\n    weight: {weight}\n"
            );
            let e = err(&text);
            assert!(
                e.contains("policies[1] (match 10.128.0.0/9) (line 4): `weight` must be a positive finite number")
                    && e.contains(shown),
                "{weight}: {e}"
            );
        }
        let e = err("default: { limit: 10, window: 1s, weight: 0 }\n");
        assert_eq!(
            e,
            "default (line 1): `weight` must be a positive finite number (default 1), got 0"
        );
        // On `pass` and `drop` a weight is accepted (and has no effect), but still checked.
        let e = err(
            "default: { limit: 10, window: 1s }\npolicies:\n  - { match: 192.0.2.7, action: drop, weight: -2 }\n",
        );
        assert!(
            e.contains("policies[0] (match 192.0.2.7) (line 3): `weight`"),
            "{e}"
        );
    }

    #[test]
    fn policy_base_is_the_configured_limit() {
        let c = Config::parse(EXAMPLE).unwrap();
        assert_eq!(c.policy_base(0), Some(c.default));
        let first = c.policy_base(1).unwrap();
        assert_eq!(
            (first.action, first.limit, first.window.micros),
            (Action::Limit, 100, 500_000)
        );
        assert_eq!(c.policy_base(3).unwrap().action, Action::Pass);
        assert_eq!(c.policy_base(4).unwrap().action, Action::Drop);
        assert_eq!(c.policy_base(5), None);
    }

    #[test]
    fn key_lines_are_found_in_block_and_flow_style() {
        let text = "default: { limit: 1, window: 1s }\nadaptive:   # knobs\n  # load: here\n  step: 2\n  load:\n\n    low: 0.1\n    high: 0.2\n  'alpha' : 0.5\nmode: enforce\n";
        assert_eq!(line_of_path(text, &["adaptive"]), Some(2));
        assert_eq!(line_of_path(text, &["adaptive", "step"]), Some(4));
        assert_eq!(line_of_path(text, &["adaptive", "load"]), Some(5));
        assert_eq!(line_of_path(text, &["adaptive", "load", "high"]), Some(8));
        assert_eq!(line_of_path(text, &["adaptive", "alpha"]), Some(9));
        assert_eq!(line_of_path(text, &["adaptive", "mode"]), None);
        assert_eq!(line_of_path(text, &["adaptive", "dwell"]), None);
        let text = "adaptive: { min_scale_x: 1, min_scale: 0.5, load: {high: 0.2} }\n";
        assert_eq!(line_of_path(text, &["adaptive", "min_scale"]), Some(1));
        assert_eq!(line_of_path(text, &["adaptive", "load", "high"]), Some(1));
        assert_eq!(
            find_key("a: { min_scale_x: 1, min_scale: 0.5 }", 0, "min_scale"),
            Some((21, 31))
        );
    }

    #[test]
    fn id_policies_are_named_policies_not_trie_entries() {
        let c = Config::parse(
            "default: { limit: 5, window: 1s }\npolicies:\n  - match: 10.0.0.0/8\n    limit: 1\n    window: 1s\n  - match: tenant-gold\n    limit: 9\n    window: 2s\n",
        )
        .unwrap();
        assert_eq!(c.lpm_entries().len(), 3);
        let named = c.named_policies();
        let gold = named[&ClientName::new("tenant-gold").unwrap()];
        assert_eq!((gold.limit, gold.window_us, gold.id), (9, 2_000_000, 2));
        assert_eq!(c.policy_name(2), "tenant-gold");
        assert_eq!(c.policy_name(0), "default");
        // Keys are a hash prefix: stable, and distinct for distinct IDs.
        let a = ClientName::new("a").unwrap();
        assert_eq!(a.key(), ClientName::new("a").unwrap().key());
        assert_ne!(a.key(), ClientName::new("b").unwrap().key());
        let e = err(
            "default: { limit: 5, window: 1s }\npolicies:\n  - match: t\n    limit: 1\n    window: 1s\n  - match: t\n    limit: 2\n    window: 1s\n",
        );
        assert!(e.contains("duplicate match"), "{e}");
    }
}
