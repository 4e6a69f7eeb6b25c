//! envoyproxy/ratelimit's configuration, read as that service reads it: one YAML document per
//! file with a `domain` and nested `descriptors` (`key`, optional `value` with `*` wildcards
//! anywhere in it, `rate_limit { unit, requests_per_unit, unlimited, name, replaces }`,
//! `shadow_mode`, `quota_mode`, `detailed_metric`, `value_to_metric`, `share_threshold`,
//! `metadata`, `descriptors`), from one file or from every `*.yaml` / `*.yml` file of a
//! directory (not its subdirectories; dotfiles skipped), one domain per file.
//!
//! Errors name the file, the field's path and its line (`descriptors[0].rate_limit.unit (line
//! 5): ...`), as the agent's own config does. envoyproxy/ratelimit checks a key's name, not its
//! place: one of its keys where its decoder does not read it (`shadow_mode` inside
//! `rate_limit`, say) loads there and does nothing. It loads here too, with a warning naming it,
//! so a file that works there works here; a key it does not know is an error in both.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use envoy_types::pb::google::protobuf::Struct;

use limiter_common::{maps::MAX_POLICY_ID, window::MAX_WINDOW_US};

use super::hits::SeriesRef;
use crate::{
    capped_read,
    cluster::{GlobalPolicy, membership::stable_hash},
    config::{KeyLines, LineHint, RESERVED_POLICY_IDS},
};

mod build;
mod files;
mod raw;

use self::{
    build::parse_domain,
    files::{fingerprint, read_files},
};

/// Why a rate limit service config was refused.
#[derive(Debug, thiserror::Error)]
pub enum RlsConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    ReadCapped {
        path: PathBuf,
        #[source]
        source: capped_read::CappedReadError,
    },
    /// Syntax, unknown fields or a field of the wrong type: serde_yaml's message names the
    /// field's path, line and column.
    #[error("{file}")]
    Yaml {
        file: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{file}: {field}{line}: {message}")]
    Invalid {
        file: String,
        field: String,
        line: LineHint,
        message: String,
    },
    #[error("{path}: no *.yaml or *.yml file in the directory")]
    Empty { path: PathBuf },
    /// Under `--rls-scope global` each distinct limit of the rules is one of the cluster's
    /// global limits, with a policy id of its own (see [`RlsConfig::global_id`]).
    #[error(
        "--rls-scope global: the rules have {count} distinct limits (requests_per_unit per \
         unit, as enforced), and at most {MAX_GLOBAL_LIMITS} can be global across the cluster"
    )]
    TooManyGlobalLimits { count: usize },
}

/// Most distinct limits the rules may have under `--rls-scope global`: one policy id each, of
/// the ids kept for the service (`config::RESERVED_POLICY_IDS`) below its local rules' own.
pub const MAX_GLOBAL_LIMITS: usize = RESERVED_POLICY_IDS as usize - 1;

/// The policy ids of `limits` (sorted, distinct; at most [`MAX_GLOBAL_LIMITS`] get one): each
/// limit's id is drawn from a hash of the limit itself, the next free one below on a collision
/// (wrapping around), taking the limits in order. Every member serving the same rules draws the
/// same ids, and a reload that adds or removes a limit leaves the ids of the others as they
/// were, unless it takes or frees a slot on a collision's path: an entry keeps its policy across
/// most reloads, as it could not if ids were positions in the list. (The cluster's members name
/// the limit to each other by its content, whatever its id: `cluster::GlobalPolicy::wire_name`.)
fn global_ids(limits: &[(u32, u32)]) -> Vec<u16> {
    let mut taken = vec![false; MAX_GLOBAL_LIMITS];
    limits
        .iter()
        .take(MAX_GLOBAL_LIMITS)
        .map(|&(allowance, window_us)| {
            let mut bytes = [0u8; 8];
            bytes[..4].copy_from_slice(&allowance.to_le_bytes());
            bytes[4..].copy_from_slice(&window_us.to_le_bytes());
            let mut slot = (stable_hash(&bytes) % MAX_GLOBAL_LIMITS as u64) as usize;
            while taken[slot] {
                slot = (slot + 1) % MAX_GLOBAL_LIMITS;
            }
            taken[slot] = true;
            MAX_POLICY_ID - 1 - slot as u16
        })
        .collect()
}

/// A time unit of `rate_limit.unit` (and of the protocol's `RateLimit.Unit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    /// Case-insensitive, as envoyproxy/ratelimit reads it.
    pub fn parse(s: &str) -> Option<Unit> {
        Some(match s.to_ascii_lowercase().as_str() {
            "second" => Unit::Second,
            "minute" => Unit::Minute,
            "hour" => Unit::Hour,
            "day" => Unit::Day,
            "week" => Unit::Week,
            "month" => Unit::Month,
            "year" => Unit::Year,
            _ => return None,
        })
    }

    /// The unit's length, as envoyproxy/ratelimit counts it (a month is 30 days, a year 365).
    pub fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3600,
            Unit::Day => 86_400,
            Unit::Week => 7 * 86_400,
            Unit::Month => 30 * 86_400,
            Unit::Year => 365 * 86_400,
        }
    }

    /// The unit as the config writes it (`second`).
    pub fn name(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }
}

/// The sliding window a limit of `requests_per_unit` per `unit` is enforced with.
///
/// Units up to an hour are windows of that length with that allowance. The check program's
/// windows are at most an hour (`window_us` is a `u32` of microseconds), so a longer unit is
/// enforced as its hourly share, `requests_per_unit * 3600 / unit_seconds` rounded down (at least
/// 1 when `requests_per_unit` is not 0), over a sliding hour: a steady client gets the same
/// total over the unit, but a burst of the whole unit's allowance at once is not admitted.
pub fn window(requests_per_unit: u32, unit: Unit) -> (u32, u32) {
    let seconds = unit.seconds();
    let hour_us = u64::from(MAX_WINDOW_US);
    let unit_us = seconds * 1_000_000;
    if unit_us <= hour_us {
        return (requests_per_unit, unit_us as u32);
    }
    let share = u64::from(requests_per_unit) * 3600 / seconds;
    let share = if requests_per_unit > 0 {
        share.max(1)
    } else {
        0
    };
    (share as u32, MAX_WINDOW_US)
}

/// A rule's `rate_limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// `name`: what other rules' `replaces` refer to, and the name reported in `current_limit`.
    pub name: Option<String>,
    /// The names of the limits this one replaces when both apply to one request.
    pub replaces: Vec<String>,
    /// Where each of `replaces` is written (`descriptors[0].rate_limit.replaces[0].name`),
    /// for messages.
    pub replaces_fields: Vec<String>,
    /// `None`: `unlimited: true`.
    pub limit: Option<(u32, Unit)>,
}

/// One entry of a `descriptors` list, with its nested list.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `domain.key_value.key...`, the rule's path as envoyproxy/ratelimit names it in logs.
    pub path: String,
    pub rate_limit: Option<RateLimit>,
    pub shadow_mode: bool,
    /// `quota_mode`: over its limit, this rule's descriptor denies the request only if every
    /// `quota_mode` descriptor of the request is over too (see `service`).
    pub quota_mode: bool,
    pub detailed_metric: bool,
    /// `value_to_metric`: a request value this rule matched by its key alone or by a wildcard
    /// names the series of the limit found at or below it (see `matching`).
    pub value_to_metric: bool,
    /// `value_to_metric` is set on this rule or on one it is nested in: its limit's series may
    /// be named by request values, so it is counted as a detailed series (see `hits`).
    pub metric_values: bool,
    /// `share_threshold` (only on a wildcard value): every value the wildcard matches is one
    /// client, named by the wildcard as written, rather than a client per value.
    pub share_threshold: bool,
    /// `metadata`: merged into the response's dynamic metadata when this rule's descriptor
    /// passes (see `service`).
    pub metadata: Option<Arc<Struct>>,
    pub children: Descriptors,
    /// The line the rule starts at, for messages.
    pub line: Option<usize>,
    /// Its hit counters, once the config is installed (`hits`); `None` without a `rate_limit`.
    pub series: Option<SeriesRef>,
}

/// A `descriptors` list, indexed for matching: by key, then exact values, wildcard values
/// (in file order) and the key-only rule.
#[derive(Debug, Clone, Default)]
pub struct Descriptors {
    by_key: HashMap<String, KeyRules>,
}

#[derive(Debug, Clone, Default)]
struct KeyRules {
    values: HashMap<String, Rule>,
    wildcards: Vec<(Wildcard, Rule)>,
    any: Option<Rule>,
}

/// A `value` with `*` in it, anywhere and any number of times (envoyproxy/ratelimit's
/// README, example 9): each `*` matches any run of characters, the empty one too; the
/// literal parts between must appear in order, the first at the start and the last at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wildcard {
    /// The value as written: a request value equal to it is this rule's, before any wildcard
    /// is tried (envoyproxy/ratelimit keeps its wildcard rules under their text, which its
    /// exact lookup finds first).
    raw: String,
    /// The value split at each `*`: what it starts with, the parts between two `*`s, and what
    /// it ends with (`a*` is `"a"`, none, `""`).
    first: String,
    middle: Vec<String>,
    last: String,
}

impl Wildcard {
    /// `value` as a wildcard, if it has a `*`.
    pub fn new(value: &str) -> Option<Wildcard> {
        let mut parts = value.split('*').map(str::to_string);
        let first = parts.next()?;
        let mut middle: Vec<String> = parts.collect();
        // No `*`: no part after the first, so no wildcard.
        let last = middle.pop()?;
        Some(Wildcard {
            raw: value.to_string(),
            first,
            middle,
            last,
        })
    }

    pub fn matches(&self, value: &str) -> bool {
        // The prefix, then the suffix of what is left: the two never overlap.
        let Some(mut between) = value
            .strip_prefix(self.first.as_str())
            .and_then(|v| v.strip_suffix(self.last.as_str()))
        else {
            return false;
        };
        for part in &self.middle {
            match between.find(part.as_str()) {
                Some(at) => between = &between[at + part.len()..],
                None => return false,
            }
        }
        true
    }
}

/// How a request entry found its rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matched<'c> {
    /// By `key` and `value` exactly (a wildcard rule's own text included).
    Value,
    /// By the wildcard value written as this.
    Wildcard(&'c str),
    /// By `key` alone.
    Key,
}

impl Descriptors {
    /// The rule for one request entry: `key` with `value` exactly (a wildcard rule's own text
    /// included), else the first wildcard (in file order) `value` matches, else `key` alone.
    pub fn lookup(&self, key: &str, value: &str) -> Option<(&Rule, Matched<'_>)> {
        let rules = self.by_key.get(key)?;
        let wildcards = || rules.wildcards.iter();
        if let Some(rule) = rules.values.get(value) {
            return Some((rule, Matched::Value));
        }
        if let Some((_, rule)) = wildcards().find(|(w, _)| w.raw == value) {
            return Some((rule, Matched::Value));
        }
        if let Some((w, rule)) = wildcards().find(|(w, _)| w.matches(value)) {
            return Some((rule, Matched::Wildcard(&w.raw)));
        }
        rules.any.as_ref().map(|rule| (rule, Matched::Key))
    }

    /// No rules: a rule without a nested list ends the walk.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Calls `f` on every rule of this list and of the lists nested in it.
    pub fn for_each_rule_mut(&mut self, f: &mut impl FnMut(&mut Rule)) {
        for rules in self.by_key.values_mut() {
            let all = rules
                .values
                .values_mut()
                .chain(rules.wildcards.iter_mut().map(|(_, r)| r))
                .chain(rules.any.iter_mut());
            for rule in all {
                f(rule);
                rule.children.for_each_rule_mut(f);
            }
        }
    }

    /// Every rule of this list and of the lists nested in it.
    fn rules(&self) -> Vec<&Rule> {
        let mut out = Vec::new();
        for rules in self.by_key.values() {
            let all = rules
                .values
                .values()
                .chain(rules.wildcards.iter().map(|(_, r)| r))
                .chain(rules.any.iter());
            for rule in all {
                out.push(rule);
                out.extend(rule.children.rules());
            }
        }
        out
    }
}

/// One file's domain.
#[derive(Debug, Clone)]
pub struct Domain {
    /// `domain`.
    pub name: String,
    pub descriptors: Descriptors,
    /// The file it came from.
    pub file: String,
    /// The hit counters of its descriptors' own `limit` overrides, once the config is
    /// installed (`hits`).
    pub overrides: Option<SeriesRef>,
}

/// Every domain the service knows.
#[derive(Debug, Clone, Default)]
pub struct RlsConfig {
    /// By name.
    pub domains: HashMap<String, Domain>,
    /// What is worth saying at load beyond errors (limits of a day or longer, enforced as an
    /// hourly share).
    pub notes: Vec<String>,
    /// The distinct limits of the rules, `(allowance, window_us)` as enforced ([`window`]), in
    /// order: under `--rls-scope global` each is one of the cluster's global limits
    /// ([`RlsConfig::global_id`]).
    pub limits: Vec<(u32, u32)>,
    /// The policy id of each of `limits` under `--rls-scope global` (see `global_ids`).
    ids: Vec<u16>,
}

impl RlsConfig {
    /// Loads `path`: one file, or every `*.yaml` / `*.yml` file of a directory. Also returns a
    /// fingerprint of what was read (names and contents), to tell a changed config from the
    /// one in force without parsing it.
    pub fn load(path: &Path) -> Result<(RlsConfig, u64), RlsConfigError> {
        let files = read_files(path)?;
        let fingerprint = fingerprint(&files);
        Ok((RlsConfig::from_files(&files)?, fingerprint))
    }

    /// What `load` would read, fingerprinted (see [`RlsConfig::load`]).
    pub fn fingerprint_of(path: &Path) -> Result<u64, RlsConfigError> {
        Ok(fingerprint(&read_files(path)?))
    }

    /// One domain per file; a domain in two files is an error (as envoyproxy/ratelimit without
    /// `MERGE_DOMAIN_CONFIG`).
    pub fn from_files(files: &[(String, String)]) -> Result<RlsConfig, RlsConfigError> {
        let mut config = RlsConfig::default();
        for (file, text) in files {
            let (domain, notes) = parse_domain(file, text)?;
            if let Some(other) = config.domains.get(&domain.name) {
                return Err(RlsConfigError::Invalid {
                    file: file.clone(),
                    field: "domain".into(),
                    line: LineHint(KeyLines::of(text).line("domain")),
                    message: format!(
                        "duplicate domain {:?}: {} has it too (one file per domain)",
                        domain.name, other.file
                    ),
                });
            }
            config.notes.extend(notes);
            config.domains.insert(domain.name.clone(), domain);
        }
        let mut limits: Vec<(u32, u32)> = config
            .domains
            .values()
            .flat_map(|d| d.descriptors.rules())
            .filter_map(|rule| match rule.rate_limit.as_ref()?.limit? {
                (0, _) => None,
                (requests, unit) => Some(window(requests, unit)),
            })
            .collect();
        limits.sort_unstable();
        limits.dedup();
        config.ids = global_ids(&limits);
        config.limits = limits;
        Ok(config)
    }

    /// The policy id the entries of rules whose limit is `(allowance, window_us)` carry under
    /// `--rls-scope global`, one per distinct limit of the rules, below the local rules'
    /// `RLS_POLICY_ID` (see `global_ids`): how the agent tells which limit across the cluster
    /// an entry is under (members name it to each other by its content). `None`
    /// for a limit no rule has (a request's own override, which stays local).
    pub fn global_id(&self, allowance: u32, window_us: u32) -> Option<u16> {
        let i = self.limits.binary_search(&(allowance, window_us)).ok()?;
        self.ids.get(i).copied()
    }

    /// Refuses rules with more distinct limits than there are global ids for.
    pub fn check_global(&self) -> Result<(), RlsConfigError> {
        if self.limits.len() > MAX_GLOBAL_LIMITS {
            return Err(RlsConfigError::TooManyGlobalLimits {
                count: self.limits.len(),
            });
        }
        Ok(())
    }

    /// The cluster's global limits these rules make under `--rls-scope global` (see
    /// [`RlsConfig::global_id`]); members compare them through the view hash, so every member
    /// must serve the same rules.
    pub fn global_policies(&self) -> Vec<GlobalPolicy> {
        self.limits
            .iter()
            .filter_map(|&(allowance, window_us)| {
                Some(GlobalPolicy {
                    id: self.global_id(allowance, window_us)?,
                    matches: format!("rate limit service: {allowance} per {window_us} µs"),
                    limit: allowance,
                    window_us,
                    grouping: String::new(),
                })
            })
            .collect()
    }

    /// Parses one file's text.
    pub fn parse(text: &str) -> Result<RlsConfig, RlsConfigError> {
        RlsConfig::from_files(&[("config".to_string(), text.to_string())])
    }
}
