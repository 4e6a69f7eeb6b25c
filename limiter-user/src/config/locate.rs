//! Locating config errors in the file's text: serde_yaml places some errors at the enclosing
//! mapping, and the validation after parsing has no positions at all. A second parse of the text
//! into YAML events by yaml-rust2, which keeps a position per event, maps the path of every key to
//! its line ([`KeyLines`]); it only ever points at a line, never decides validity.

use std::collections::HashMap;

use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::Marker,
};

use super::{AdaptiveError, LineHint, PolicyError};

/// An `adaptive` knob out of range, as `adaptive.<field> (line N): must be ..., got ...`, at
/// the line of the key if it is written, else of the nearest enclosing key that is (a knob
/// left at its default can break a constraint relative to another one).
pub(super) fn adaptive_error(e: &AdaptiveError, lines: &KeyLines) -> PolicyError {
    let path: Vec<&str> = std::iter::once("adaptive")
        .chain(e.field.split('.'))
        .collect();
    let line = (1..=path.len())
        .rev()
        .find_map(|n| lines.line(&path[..n].join(".")));
    PolicyError::Invalid {
        field: format!("adaptive.{}", e.field),
        line: LineHint(line),
        message: format!("must be {}, got {}", e.constraint, e.value),
    }
}

/// serde_yaml places an error raised while parsing a value (a bad `window` or `match`) at the
/// start of the enclosing mapping; this moves it to the line of the field itself and names the
/// field in the path (`policies[0].window (line 6): ...`).
pub(super) fn locate_value_error(e: serde_yaml::Error, lines: &KeyLines) -> PolicyError {
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
            line: LineHint(lines.line("adaptive.period").or(Some(location.line()))),
            message: detail.to_string(),
        };
    }
    for key in ["window", "match", "per"] {
        let tag = format!("`{key}`: ");
        let Some(at) = message.find(&tag) else {
            continue;
        };
        let path = message[..at].trim_end_matches(": ").trim_end_matches(':');
        let detail = &message[at + tag.len()..];
        let detail = detail
            .rfind(" at line ")
            .map_or(detail, |end| &detail[..end]);
        let field = if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        };
        let line = lines.line(&field).unwrap_or(location.line());
        return PolicyError::Invalid {
            field,
            line: LineHint(Some(line)),
            message: detail.to_string(),
        };
    }
    PolicyError::Yaml(e)
}

/// The 1-based line of every mapping key of a YAML document, by its path: `default`,
/// `adaptive.load.high`, `policies[0].match` (a key that is itself a collection, never used in a
/// config, is `?`). Empty when the text is not YAML; serde_yaml then says why.
#[derive(Debug, Default)]
pub(crate) struct KeyLines(HashMap<String, usize>);

impl KeyLines {
    pub(crate) fn of(text: &str) -> KeyLines {
        let mut walk = Walk::default();
        match Parser::new_from_str(text).load(&mut walk, false) {
            Ok(()) => KeyLines(walk.lines),
            Err(_) => KeyLines::default(),
        }
    }

    /// The line of the key at `path`, if it is written.
    pub(crate) fn line(&self, path: &str) -> Option<usize> {
        self.0.get(path).copied()
    }
}

/// A collection being walked, with the path of its own value.
enum Open {
    /// `key` is the key whose value comes next; `None` while a key is awaited.
    Mapping { path: String, key: Option<String> },
    /// `index` is the index of the next entry.
    Sequence { path: String, index: usize },
}

/// Records the line of each key as the parser's events go by.
#[derive(Default)]
struct Walk {
    open: Vec<Open>,
    lines: HashMap<String, usize>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

impl Walk {
    /// A node (scalar, alias or collection) ended inside the innermost collection: it was a key
    /// (`key` names it) or a value.
    fn node_done(&mut self, key: impl FnOnce() -> String) {
        match self.open.last_mut() {
            Some(Open::Mapping {
                key: next @ None, ..
            }) => *next = Some(key()),
            Some(Open::Mapping { key: next, .. }) => *next = None,
            Some(Open::Sequence { index, .. }) => *index += 1,
            None => {}
        }
    }

    /// The path of a collection starting inside the innermost one.
    fn child_path(&self) -> String {
        match self.open.last() {
            None => String::new(),
            Some(Open::Mapping {
                path,
                key: Some(key),
            }) => join(path, key),
            Some(Open::Mapping { path, key: None }) => join(path, "?"),
            Some(Open::Sequence { path, index }) => format!("{path}[{index}]"),
        }
    }
}

impl MarkedEventReceiver for Walk {
    fn on_event(&mut self, event: Event, mark: Marker) {
        match event {
            Event::Scalar(value, ..) => {
                if let Some(Open::Mapping { path, key: None }) = self.open.last() {
                    let at = join(path, &value);
                    self.lines.entry(at).or_insert(mark.line());
                }
                self.node_done(|| value);
            }
            Event::Alias(_) => self.node_done(|| "*".to_owned()),
            Event::MappingStart(..) => {
                let path = self.child_path();
                self.open.push(Open::Mapping { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.child_path();
                self.open.push(Open::Sequence { path, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.open.pop();
                self.node_done(|| "?".to_owned());
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}
