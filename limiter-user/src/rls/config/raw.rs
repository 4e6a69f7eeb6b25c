//! The file as serde reads it, before any meaning is given to it: a struct per place of
//! envoyproxy/ratelimit's format, each also taking that service's keys it ignores there (see
//! the module docs of `config`), and scalars read as the text written.

use serde::{Deserialize, Deserializer};

/// A scalar read as text, as envoyproxy/ratelimit's YAML decoder reads `key` and `value`: as
/// written (`value: 500` is the string "500", `value: 2.10` is "2.10", not "2.1").
fn scalar<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<Text>::deserialize(d)?.map(|t| t.0))
}

/// A scalar's text (see [`scalar`]).
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
        }
        // A plain scalar comes as its text, whatever it looks like.
        d.deserialize_str(Visitor)
    }
}

/// A key of envoyproxy/ratelimit's where its decoder does not read it: taken and ignored (see
/// the module docs), once the keys in it are checked as that service checks them
/// ([`check_keys`]).
type Misplaced = Option<serde_yaml::Value>;

/// Every key envoyproxy/ratelimit knows (its `validKeys`): it refuses any other, anywhere in a
/// file, and takes these anywhere.
const VALID_KEYS: [&str; 16] = [
    "domain",
    "key",
    "value",
    "descriptors",
    "rate_limit",
    "unit",
    "requests_per_unit",
    "unlimited",
    "shadow_mode",
    "quota_mode",
    "name",
    "replaces",
    "detailed_metric",
    "value_to_metric",
    "share_threshold",
    "metadata",
];

/// Checks the keys inside a misplaced value at `field` as envoyproxy/ratelimit checks every
/// key: each a known one (what is under `metadata` excepted), and each list one of maps.
/// Returns the field and what is wrong with it.
pub(super) fn check_keys(value: &serde_yaml::Value, field: &str) -> Result<(), (String, String)> {
    match value {
        serde_yaml::Value::Mapping(map) => {
            for (k, v) in map {
                let Some(key) = k.as_str() else {
                    return Err((field.to_string(), format!("the key {k:?} is not a string")));
                };
                let at = format!("{field}.{key}");
                if !VALID_KEYS.contains(&key) {
                    return Err((at, format!("unknown key `{key}`")));
                }
                if key != "metadata" {
                    check_keys(v, &at)?;
                }
            }
            Ok(())
        }
        serde_yaml::Value::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                let at = format!("{field}[{i}]");
                if !item.is_mapping() {
                    return Err((at, "a list here must hold maps".to_string()));
                }
                check_keys(item, &at)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A raw struct of the file, as serde reads it: its own fields, then a [`Misplaced`] field for
/// each of envoyproxy/ratelimit's keys that it ignores there, and `misplaced()` listing those
/// present with their values.
macro_rules! raw {
    (
        $(#[$meta:meta])*
        struct $name:ident { $($(#[$field_meta:meta])* $field:ident: $ty:ty,)* }
        misplaced { $($key:ident),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct $name {
            $($(#[$field_meta])* pub(super) $field: $ty,)*
            $(#[serde(default)] $key: Misplaced,)+
        }

        impl $name {
            pub(super) fn misplaced(&self) -> Vec<(&'static str, &serde_yaml::Value)> {
                [$((stringify!($key), self.$key.as_ref())),+]
                    .into_iter()
                    .filter_map(|(name, value)| Some((name, value?)))
                    .collect()
            }
        }
    };
}

raw! {
    struct RawFile {
        #[serde(default, deserialize_with = "scalar")]
        domain: Option<String>,
        #[serde(default)]
        descriptors: Vec<RawDescriptor>,
    }
    misplaced {
        key, value, rate_limit, unit, requests_per_unit, unlimited, name, replaces, shadow_mode,
        quota_mode, detailed_metric, value_to_metric, share_threshold, metadata,
    }
}

raw! {
    struct RawDescriptor {
        #[serde(default, deserialize_with = "scalar")]
        key: Option<String>,
        #[serde(default, deserialize_with = "scalar")]
        value: Option<String>,
        rate_limit: Option<RawRateLimit>,
        #[serde(default)]
        descriptors: Vec<RawDescriptor>,
        #[serde(default)]
        shadow_mode: bool,
        #[serde(default)]
        quota_mode: bool,
        #[serde(default)]
        detailed_metric: bool,
        #[serde(default)]
        value_to_metric: bool,
        #[serde(default)]
        share_threshold: bool,
        /// Sent to Envoy in the response's dynamic metadata (see `service`), not read here.
        #[serde(default)]
        metadata: Option<serde_yaml::Mapping>,
    }
    misplaced { domain, unit, requests_per_unit, unlimited, name, replaces }
}

raw! {
    struct RawRateLimit {
        #[serde(default, deserialize_with = "scalar")]
        unit: Option<String>,
        requests_per_unit: Option<u32>,
        #[serde(default)]
        unlimited: bool,
        #[serde(default, deserialize_with = "scalar")]
        name: Option<String>,
        #[serde(default)]
        replaces: Vec<RawReplace>,
    }
    misplaced {
        domain, key, value, rate_limit, descriptors, shadow_mode, quota_mode, detailed_metric,
        value_to_metric, share_threshold, metadata,
    }
}

raw! {
    struct RawReplace {
        #[serde(default, deserialize_with = "scalar")]
        name: Option<String>,
    }
    misplaced {
        domain, key, value, rate_limit, descriptors, unit, requests_per_unit, unlimited,
        replaces, shadow_mode, quota_mode, detailed_metric, value_to_metric, share_threshold,
        metadata,
    }
}
