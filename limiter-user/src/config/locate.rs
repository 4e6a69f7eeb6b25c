//! Locating config errors in the file's text: serde_yaml places some errors at the enclosing
//! mapping, and the validation after parsing has no positions at all; these text searches point
//! at the line of the field (never used to decide validity).

use super::{AdaptiveError, LineHint, PolicyError};

/// An `adaptive` knob out of range, as `adaptive.<field> (line N): must be ..., got ...`, at
/// the line of the key if it is written, else of the nearest enclosing key that is (a knob
/// left at its default can break a constraint relative to another one).
pub(super) fn adaptive_error(e: &AdaptiveError, text: &str) -> PolicyError {
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
pub(super) fn locate_value_error(e: serde_yaml::Error, text: &str) -> PolicyError {
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
pub(super) fn match_lines(text: &str) -> Vec<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let code = l.split('#').next().unwrap_or("");
            code.contains("match:")
        })
        .map(|(i, _)| i + 1)
        .collect()
}

pub(super) fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let prefix = format!("{key}:");
    text.lines()
        .position(|l| l.starts_with(&prefix))
        .map(|i| i + 1)
}

/// `line` without its comment (a `#` at its start or after whitespace).
pub(super) fn strip_comment(line: &str) -> &str {
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
pub(super) fn line_of_path(text: &str, path: &[&str]) -> Option<usize> {
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
pub(super) fn find_key(code: &str, from: usize, key: &str) -> Option<(usize, usize)> {
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
