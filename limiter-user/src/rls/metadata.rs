//! The response's dynamic metadata (`--rls-dynamic-metadata`), as envoyproxy/ratelimit writes
//! it with `RESPONSE_DYNAMIC_METADATA`: Envoy stores it under its rate limit filter's namespace
//! (`envoy.filters.http.ratelimit`), where routes, access logs and later filters read it.
//!
//! It holds the request's `domain`; its `descriptors`, each with its `entries` as `key=value`
//! strings, its `limit` override (`requests_per_unit:N unit:UNIT`) and its own `hitsAddend` when
//! set; the request's `hitsAddend` when not 0; and `metadata`: the `metadata` maps of the rules
//! whose descriptors passed, merged in request order (a key already there is kept, and two maps
//! under one key are merged the same way). A rule's `metadata` is read from the config into a
//! `google.protobuf.Struct` at load: keys are written as text (`1: x` is the key "1"), numbers
//! become doubles, and a YAML tag is refused.

use std::collections::HashMap;

use envoy_types::pb::{
    envoy::service::ratelimit::v3::{RateLimitRequest, rate_limit_response::rate_limit::Unit},
    google::protobuf::{ListValue, NullValue, Struct, Value, value::Kind},
};

/// A rule's `metadata` map as a `Struct`, or what in it cannot be one (the path of the value).
pub fn from_yaml(map: &serde_yaml::Mapping) -> Result<Struct, String> {
    let mut fields = HashMap::with_capacity(map.len());
    for (k, v) in map {
        let key = key_text(k).ok_or_else(|| "a key must be a scalar".to_string())?;
        let value = value(v).map_err(|e| format!("{key}: {e}"))?;
        fields.insert(key, value);
    }
    Ok(Struct { fields })
}

fn key_text(k: &serde_yaml::Value) -> Option<String> {
    Some(match k {
        serde_yaml::Value::String(s) => s.clone(),
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::Bool(b) => b.to_string(),
        serde_yaml::Value::Null => "<nil>".to_string(),
        _ => return None,
    })
}

fn value(v: &serde_yaml::Value) -> Result<Value, String> {
    let kind = match v {
        serde_yaml::Value::Null => Kind::NullValue(NullValue::NullValue as i32),
        serde_yaml::Value::Bool(b) => Kind::BoolValue(*b),
        serde_yaml::Value::Number(n) => Kind::NumberValue(
            n.as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| format!("{n} is not a finite number"))?,
        ),
        serde_yaml::Value::String(s) => Kind::StringValue(s.clone()),
        serde_yaml::Value::Sequence(items) => Kind::ListValue(ListValue {
            values: items
                .iter()
                .enumerate()
                .map(|(i, item)| value(item).map_err(|e| format!("[{i}]: {e}")))
                .collect::<Result<_, _>>()?,
        }),
        serde_yaml::Value::Mapping(map) => Kind::StructValue(from_yaml(map)?),
        serde_yaml::Value::Tagged(t) => return Err(format!("the tag {} is not supported", t.tag)),
    };
    Ok(Value { kind: Some(kind) })
}

/// Adds `src`'s fields that `dest` does not have; a field both have as maps is merged the same
/// way, any other field of `dest` is kept.
pub fn merge(dest: &mut Struct, src: &Struct) {
    for (k, v) in &src.fields {
        match dest.fields.get_mut(k) {
            None => {
                dest.fields.insert(k.clone(), v.clone());
            }
            Some(Value {
                kind: Some(Kind::StructValue(d)),
            }) => {
                if let Some(Kind::StructValue(s)) = &v.kind {
                    merge(d, s);
                }
            }
            Some(_) => {}
        }
    }
}

/// The dynamic metadata of the answer to `request`, `passed` the `metadata` of the rules whose
/// descriptors passed, in request order (see the module docs).
pub fn response<'a>(
    request: &RateLimitRequest,
    passed: impl Iterator<Item = &'a Struct>,
) -> Struct {
    let string = |s: String| Value {
        kind: Some(Kind::StringValue(s)),
    };
    let number = |n: f64| Value {
        kind: Some(Kind::NumberValue(n)),
    };
    let descriptors = request
        .descriptors
        .iter()
        .map(|d| {
            let mut fields = HashMap::new();
            let entries = d
                .entries
                .iter()
                .map(|e| string(format!("{}={}", e.key, e.value)))
                .collect();
            fields.insert(
                "entries".to_string(),
                Value {
                    kind: Some(Kind::ListValue(ListValue { values: entries })),
                },
            );
            if let Some(limit) = &d.limit {
                let unit = Unit::try_from(limit.unit)
                    .map_or_else(|_| limit.unit.to_string(), |u| u.as_str_name().to_string());
                fields.insert(
                    "limit".to_string(),
                    string(format!(
                        "requests_per_unit:{} unit:{unit}",
                        limit.requests_per_unit
                    )),
                );
            }
            if let Some(hits) = &d.hits_addend {
                fields.insert("hitsAddend".to_string(), number(hits.value as f64));
            }
            Value {
                kind: Some(Kind::StructValue(Struct { fields })),
            }
        })
        .collect();
    let mut fields = HashMap::new();
    fields.insert("domain".to_string(), string(request.domain.clone()));
    fields.insert(
        "descriptors".to_string(),
        Value {
            kind: Some(Kind::ListValue(ListValue {
                values: descriptors,
            })),
        },
    );
    if request.hits_addend != 0 {
        fields.insert(
            "hitsAddend".to_string(),
            number(f64::from(request.hits_addend)),
        );
    }
    let mut merged = Struct::default();
    for m in passed {
        merge(&mut merged, m);
    }
    if !merged.fields.is_empty() {
        fields.insert(
            "metadata".to_string(),
            Value {
                kind: Some(Kind::StructValue(merged)),
            },
        );
    }
    Struct { fields }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> serde_yaml::Mapping {
        serde_yaml::from_str(text).expect("a mapping")
    }

    fn s(v: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(v.to_string())),
        }
    }

    #[test]
    fn yaml_becomes_a_struct() {
        let m = from_yaml(&yaml(
            "service: a\nweight: 3\non: true\n1: one\nnested: {x: [1, b, null]}\n",
        ))
        .expect("converts");
        assert_eq!(m.fields["service"], s("a"));
        assert_eq!(m.fields["weight"].kind, Some(Kind::NumberValue(3.0)));
        assert_eq!(m.fields["on"].kind, Some(Kind::BoolValue(true)));
        assert_eq!(m.fields["1"], s("one"));
        let Some(Kind::StructValue(nested)) = &m.fields["nested"].kind else {
            panic!("a struct");
        };
        let Some(Kind::ListValue(list)) = &nested.fields["x"].kind else {
            panic!("a list");
        };
        assert_eq!(list.values.len(), 3);
        assert_eq!(list.values[1], s("b"));
        let e = from_yaml(&yaml("a: {b: !tag x}\n")).expect_err("a tag");
        assert!(e.starts_with("a: b: the tag"), "{e}");
        let e = from_yaml(&yaml("a: [1, .nan]\n")).expect_err("NaN");
        assert_eq!(e, "a: [1]: .nan is not a finite number");
    }

    #[test]
    fn merging_keeps_what_is_there_and_merges_maps() {
        let mut dest = from_yaml(&yaml("a: 1\nm: {x: 1}\n")).unwrap();
        let src = from_yaml(&yaml("a: 2\nb: 3\nm: {x: 2, y: 2}\n")).unwrap();
        merge(&mut dest, &src);
        assert_eq!(
            dest,
            from_yaml(&yaml("a: 1\nb: 3\nm: {x: 1, y: 2}\n")).unwrap()
        );
    }
}
