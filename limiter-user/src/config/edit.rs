//! Edits the text of a limiter YAML config so that a policy changed through the gRPC API can be
//! written back to the file, keeping its comments, key order and entry order.
//!
//! serde_yaml only *reads*: it gives the values the file holds before the edit and checks the
//! values it holds after. The edits work on lines: the top-level keys start at column 0, the
//! `policies:` entries are the `- ` lines at one indentation, and an entry is either block style
//! (`- match: x` and indented keys, one key per line) or flow style on one line
//! (`- { match: x, limit: 5, window: 1s }`). Only the lines of the entry (or `default`) that
//! change are rewritten: a key whose value stays keeps its line byte for byte (so a quoted
//! `match: "10.0.0.0/8"` stays quoted), a changed value keeps the key's trailing comment, and
//! every other line of the file is copied unchanged.
//!
//! Every result is parsed again and compared with the values the edit should produce (the
//! edited entry, every other entry and top-level key unchanged and in order); a mismatch is an
//! [`EditError`], never a wrong file. What the editor cannot locate with certainty (anchors or
//! aliases, a flow-style `policies: [...]`, an entry whose values span several lines) is an
//! error that names the line, rather than a guess.
//!
//! [`write_atomic`] then replaces the file: temporary file, fsync, rename, fsync of the directory.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use serde_yaml::{Mapping, Value};

/// One policy as written in the file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuleText {
    /// The `match` value exactly as the user would write it: `10.0.0.0/8`, `192.0.2.7`,
    /// `2001:db8::/32`, or an exact client ID (any text; quoted in the file when needed).
    pub matches: String,
    pub limit: Option<u32>,
    /// A window with its unit, e.g. `500ms`.
    pub window: Option<String>,
    /// `limit`, `pass` or `drop`; `None` leaves the key out.
    pub action: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("the config is not valid YAML: {0}")]
    Yaml(#[source] serde_yaml::Error),
    #[error("the config is not a mapping of top-level keys (`default:`, `policies:`, ...)")]
    NotAMapping,
    #[error("cannot edit {what} safely: {reason}")]
    Unsupported { what: String, reason: String },
    #[error(
        "policies has {count} entries with match {matches:?}; remove the duplicates by hand first"
    )]
    Duplicate { matches: String, count: usize },
    #[error("`default` needs at least one of `limit`, `window`, `action`")]
    EmptyDefault,
    /// The edited text does not read back as the intended values; nothing should be written.
    #[error("the edit does not read back as intended ({detail}); the file was not changed")]
    Verify { detail: String },
}

fn unsupported(what: impl Into<String>, reason: impl Into<String>) -> EditError {
    EditError::Unsupported {
        what: what.into(),
        reason: reason.into(),
    }
}

/// Replaces the `policies` entry whose `match` equals `rule.matches` (compared as parsed YAML
/// values, so `match: "10.0.0.0/8"` and `match: 10.0.0.0/8` are the same) in place, in its own
/// style; or appends it after the last entry, in the style of that entry (creating `policies:`
/// at the end of the file when absent, and filling `policies: []` or an empty `policies:`).
/// A replaced entry's keys other than `match`, `limit`, `window` and `action`, which a
/// [`RuleText`] cannot express, are kept as they are.
pub fn upsert_policy(text: &str, rule: &RuleText) -> Result<String, EditError> {
    let mut doc = Doc::parse(text)?;
    let fields = Fields::new(rule, true);
    let entry = Value::Mapping(fields.mapping());
    let mut expected = doc.root.clone();
    match doc.policies()? {
        Seq::Absent => {
            let at = doc.lines.len();
            let mut new = vec![String::from("policies:")];
            new.extend(block_entry(NEW_INDENT, 1, &fields));
            doc.splice(at, at, new);
            expected.insert("policies".into(), Value::Sequence(vec![entry]));
        }
        Seq::Empty {
            header,
            rewrite,
            insert_at,
        } => {
            doc.splice(insert_at, insert_at, block_entry(NEW_INDENT, 1, &fields));
            if rewrite {
                doc.set_inline(header, None);
            }
            expected.insert("policies".into(), Value::Sequence(vec![entry]));
        }
        Seq::Block {
            ind, items, values, ..
        } => {
            let mut seq = values.clone();
            match find_entry(&values, &rule.matches)? {
                Some(i) => {
                    let item = &items[i];
                    let what = entry_name(i, &rule.matches);
                    let existing = values[i]
                        .as_mapping()
                        .ok_or_else(|| unsupported(&what, "the entry is not a mapping of keys"))?;
                    match item.style {
                        Style::Flow => {
                            let line = doc.flow_entry_line(item, ind, existing, &fields, &what)?;
                            doc.splice(item.start, item.start + 1, vec![line]);
                        }
                        Style::Block | Style::BlockBelow => {
                            let key_col =
                                (item.style == Style::Block).then_some(ind + 1 + item.gap);
                            let map = BlockMap {
                                header: item.start,
                                header_indent: ind,
                                key_col,
                                body_end: item.body_end,
                            };
                            let new = doc.edit_block_map(&map, existing, &fields, &what)?;
                            doc.splice(item.start, item.body_end, new);
                        }
                    }
                    seq[i] = Value::Mapping(fields.merged(existing));
                }
                None => {
                    let last = items.last().expect("a block sequence has entries");
                    let mut new = Vec::new();
                    // Entries separated by blank lines get a blank line before the new one too.
                    if items.len() >= 2 && is_blank(&doc.lines[last.start - 1].text) {
                        new.push(String::new());
                    }
                    match last.style {
                        Style::Flow => {
                            let pad = doc.flow_pad(last, ind);
                            new.push(format!(
                                "{}-{}{}",
                                spaces(ind),
                                spaces(last.gap),
                                new_flow_map(&fields, pad)
                            ));
                        }
                        Style::Block => new.extend(block_entry(ind, last.gap, &fields)),
                        Style::BlockBelow => new.extend(block_entry(ind, 1, &fields)),
                    }
                    doc.splice(last.body_end, last.body_end, new);
                    seq.push(entry);
                }
            }
            expected.insert("policies".into(), Value::Sequence(seq));
        }
    }
    doc.finish(&expected)
}

/// Removes the `policies` entry whose `match` equals `matches`, with the comment lines inside
/// it (indented under its `- `); comments above it at the `- ` column stay. Removing the last
/// entry leaves `policies: []`. `Ok(None)` when no entry matches.
pub fn remove_policy(text: &str, matches: &str) -> Result<Option<String>, EditError> {
    let mut doc = Doc::parse(text)?;
    let Seq::Block {
        header,
        items,
        values,
        ..
    } = doc.policies()?
    else {
        return Ok(None);
    };
    let Some(i) = find_entry(&values, matches)? else {
        return Ok(None);
    };
    let item = &items[i];
    doc.splice(item.start, item.body_end, Vec::new());
    doc.collapse_blank(item.start);
    if items.len() == 1 {
        doc.set_inline(header, Some("[]"));
    }
    let mut seq = values;
    seq.remove(i);
    let mut expected = doc.root.clone();
    expected.insert("policies".into(), Value::Sequence(seq));
    doc.finish(&expected).map(Some)
}

/// Replaces the value of `default:` with `rule`'s `limit`, `window` and `action` (`matches` is
/// ignored), in its own style and position; appended at the end of the file when absent.
/// Other keys of `default` are kept, as in [`upsert_policy`].
pub fn set_default(text: &str, rule: &RuleText) -> Result<String, EditError> {
    let fields = Fields::new(rule, false);
    if fields.0.is_empty() {
        return Err(EditError::EmptyDefault);
    }
    let mut doc = Doc::parse(text)?;
    let mut expected = doc.root.clone();
    let kept = match doc.root.get("default") {
        Some(Value::Mapping(existing)) => fields.merged(existing),
        _ => fields.mapping(),
    };
    expected.insert("default".into(), Value::Mapping(kept));
    let Some(&TopKey {
        line: header, end, ..
    }) = doc.top_key("default")
    else {
        let at = doc.lines.len();
        let line = format!("default: {}", new_flow_map(&fields, " "));
        doc.splice(at, at, vec![line]);
        return doc.finish(&expected);
    };
    doc.check_no_anchors(header, end, "default")?;
    let existing = doc.root.get("default").cloned().unwrap_or(Value::Null);
    let head = doc.lines[header].text.clone();
    let scan = scan_line(&head);
    let colon = scan.colon.expect("a top-level key line has a colon");
    let inline = head[colon + 1..scan.code_end].trim();
    let content = (header + 1..end).find(|&i| is_content(&doc.lines[i].text));
    let problem = |reason: String| unsupported("default", reason);
    match (content, existing) {
        (Some(first), Value::Mapping(existing)) if inline.is_empty() => {
            let last = (first..end)
                .rev()
                .find(|&i| is_content(&doc.lines[i].text))
                .expect("the first content line is content");
            let map = BlockMap {
                header,
                header_indent: 0,
                key_col: None,
                body_end: doc.attached_comments_end(last + 1, end, 0),
            };
            let new = doc.edit_block_map(&map, &existing, &fields, "default")?;
            doc.splice(header, map.body_end, new);
        }
        (None, Value::Null) if is_null_word(inline) => {
            let flow = new_flow_map(&fields, " ");
            doc.lines[header].text = replace_value(&head, colon + 1, scan.code_end, &flow);
        }
        (None, Value::Mapping(existing)) if inline.starts_with('{') && inline.ends_with('}') => {
            let start = head.len() - head[colon + 1..].trim_start().len();
            let parsed: Option<Value> = serde_yaml::from_str(&head[start..scan.code_end]).ok();
            if parsed.as_ref().and_then(Value::as_mapping) != Some(&existing) {
                return Err(problem(format!(
                    "line {}: its flow mapping does not end on this line",
                    header + 1
                )));
            }
            let pad = flow_pad_of(&head[start..]);
            let inner = &head[start + 1..scan.code_end - 1];
            let flow = flow_map(inner, &existing, &fields, pad).ok_or_else(|| {
                problem(format!(
                    "line {}: could not tell its keys apart to keep the ones a policy has not",
                    header + 1
                ))
            })?;
            doc.lines[header].text = replace_value(&head, start, scan.code_end, &flow);
        }
        _ => {
            return Err(problem(format!(
                "line {}: `default` must be a mapping such as `{{ limit: 1000, window: 1s }}` \
                 or indented `limit:`/`window:` lines",
                header + 1
            )));
        }
    }
    doc.finish(&expected)
}

/// Replaces `path` with `text` atomically: a temporary file in the same directory is written,
/// fsynced, renamed over `path`, and the directory fsynced, so a crash leaves either the old or
/// the new file whole. The new file keeps the old one's permission bits (and its owner and
/// group when the process may set them). A symlink at `path` is followed: its target is replaced.
/// Errors name the path.
pub fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // Every error names the file, then the step that failed.
    let failed = |step: String| {
        let path = path.to_path_buf();
        move |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("cannot write {}: {step}: {e}", path.display()),
            )
        }
    };
    let target: PathBuf = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            fs::canonicalize(path).map_err(failed("resolving the symlink".into()))?
        }
        _ => path.to_path_buf(),
    };
    let old = match fs::metadata(&target) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(failed(format!("reading {}", target.display()))(e)),
    };
    let Some(name) = target.file_name() else {
        return Err(failed("not a file path".into())(
            io::ErrorKind::InvalidInput.into(),
        ));
    };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let step = |what: &str| failed(format!("{what} {}", tmp.display()));
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(step("creating"))?;
        file.write_all(text.as_bytes()).map_err(step("writing"))?;
        if let Some(old) = &old {
            let new = file.metadata().map_err(step("reading"))?;
            if (new.uid(), new.gid()) != (old.uid(), old.gid()) {
                // Keeping the owner needs privileges the agent usually has; without them the
                // file belongs to the writer, as any editor would leave it.
                match std::os::unix::fs::fchown(&file, Some(old.uid()), Some(old.gid())) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
                    Err(e) => return Err(step("setting the owner of")(e)),
                }
            }
            file.set_permissions(old.permissions())
                .map_err(step("setting the permissions of"))?;
        }
        file.sync_all().map_err(step("fsyncing"))?;
        drop(file);
        fs::rename(&tmp, &target).map_err(step("renaming"))
    };
    if let Err(e) = write() {
        // Best effort: the temporary file may not exist (creating it failed).
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // The new text is in place once renamed; a failed directory fsync only weakens its
    // durability across a crash, so it is reported, not returned (returning it would make the
    // caller undo a change that did take effect).
    if let Err(e) = File::open(&dir).and_then(|d| d.sync_all()) {
        tracing::warn!(
            "{} was written, but fsyncing its directory {} failed: {e}",
            target.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Indentation of the `- ` of entries written into a `policies:` that has none.
const NEW_INDENT: usize = 2;

/// The keys of a policy as they will be written, in the order new keys are added.
struct Fields(Vec<Field>);

struct Field {
    key: &'static str,
    value: Value,
    /// The value as written in a block mapping and in a flow mapping.
    block: String,
    flow: String,
}

impl Field {
    fn text(key: &'static str, s: &str) -> Field {
        Field {
            key,
            value: Value::String(s.to_string()),
            block: scalar(s, false),
            flow: scalar(s, true),
        }
    }
}

impl Fields {
    fn new(rule: &RuleText, with_match: bool) -> Fields {
        let mut fields = Vec::new();
        if with_match {
            fields.push(Field::text("match", &rule.matches));
        }
        if let Some(limit) = rule.limit {
            fields.push(Field {
                key: "limit",
                value: Value::Number(limit.into()),
                block: limit.to_string(),
                flow: limit.to_string(),
            });
        }
        if let Some(window) = &rule.window {
            fields.push(Field::text("window", window));
        }
        if let Some(action) = &rule.action {
            fields.push(Field::text("action", action));
        }
        Fields(fields)
    }

    fn get(&self, key: &str) -> Option<&Field> {
        self.0.iter().find(|f| f.key == key)
    }

    fn mapping(&self) -> Mapping {
        self.0
            .iter()
            .map(|f| (Value::String(f.key.into()), f.value.clone()))
            .collect()
    }

    /// The mapping an existing one becomes: these fields, and its keys that are not policy keys.
    fn merged(&self, existing: &Mapping) -> Mapping {
        let mut out: Mapping = existing
            .iter()
            .filter(|(k, _)| !is_policy_key(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.extend(self.mapping());
        out
    }
}

/// The keys a [`RuleText`] sets; an edit leaves any other key of an entry as it is.
const POLICY_KEYS: [&str; 4] = ["match", "limit", "window", "action"];

fn is_policy_key(key: &Value) -> bool {
    key.as_str().is_some_and(|k| POLICY_KEYS.contains(&k))
}

/// A block-style entry: `- key: value` and the other keys under it.
fn block_entry(ind: usize, gap: usize, fields: &Fields) -> Vec<String> {
    let cind = ind + 1 + gap;
    fields
        .0
        .iter()
        .enumerate()
        .map(|(n, f)| {
            if n == 0 {
                format!("{}-{}{}: {}", spaces(ind), spaces(gap), f.key, f.block)
            } else {
                format!("{}{}: {}", spaces(cind), f.key, f.block)
            }
        })
        .collect()
}

/// A new flow mapping `{ key: value, ... }` of `fields`.
fn new_flow_map(fields: &Fields, pad: &str) -> String {
    flow_map("", &Mapping::new(), fields, pad).expect("an empty mapping has no keys to keep")
}

/// The flow mapping `existing` (written `{inner}`) becomes: its keys keep their order, and their
/// text when their value stays (keys a policy does not set always stay); keys of `fields` that
/// it lacks follow, and its policy keys not in `fields` go. `None` when a key to keep cannot be
/// told apart in `inner`.
fn flow_map(inner: &str, existing: &Mapping, fields: &Fields, pad: &str) -> Option<String> {
    let old_parts = flow_parts(inner, existing);
    let old_text = |key: &str| {
        old_parts
            .as_ref()
            .and_then(|old| old.iter().find(|(k, _)| k == key))
            .map(|(_, text)| text.clone())
    };
    let mut parts = Vec::new();
    for (key, value) in existing {
        if !is_policy_key(key) {
            parts.push(old_text(key.as_str()?)?);
            continue;
        }
        let Some(field) = key.as_str().and_then(|k| fields.get(k)) else {
            continue;
        };
        let kept = (*value == field.value)
            .then(|| old_text(field.key))
            .flatten();
        parts.push(kept.unwrap_or_else(|| format!("{}: {}", field.key, field.flow)));
    }
    for field in &fields.0 {
        if !existing.contains_key(field.key) {
            parts.push(format!("{}: {}", field.key, field.flow));
        }
    }
    if parts.is_empty() {
        return Some("{}".into());
    }
    Some(format!("{{{pad}{}{pad}}}", parts.join(", ")))
}

/// The `key: value` texts of a one-line flow mapping's inside, each checked to read back as
/// the key's value in `existing`; `None` when they cannot be told apart with certainty.
fn flow_parts(inner: &str, existing: &Mapping) -> Option<Vec<(String, String)>> {
    let mut parts = Vec::new();
    let (mut quote, mut depth, mut start) = (None::<Quoted>, 0usize, 0);
    let mut prev_sig: Option<char> = None;
    let mut pieces = Vec::new();
    let mut chars = inner.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match quote {
            Some(ref mut q) => {
                if q.ends_at(c, &mut chars) {
                    quote = None;
                }
            }
            None => match c {
                '"' | '\'' if matches!(prev_sig, None | Some(',' | ':' | '[' | '{')) => {
                    quote = Some(Quoted::new(c));
                }
                '[' | '{' => depth += 1,
                ']' | '}' => depth = depth.checked_sub(1)?,
                ',' if depth == 0 => {
                    pieces.push(&inner[start..i]);
                    start = i + 1;
                }
                _ => {}
            },
        }
        if !c.is_whitespace() && quote.is_none() {
            prev_sig = Some(c);
        }
    }
    if quote.is_some() || depth != 0 {
        return None;
    }
    pieces.push(&inner[start..]);
    for piece in pieces {
        let piece = piece.trim();
        if piece.is_empty() {
            continue;
        }
        let colon = scan_line(piece).colon?;
        let key = key_name(&piece[..colon])?;
        let read: Mapping = serde_yaml::from_str(&format!("{{{piece}}}")).ok()?;
        let want: Mapping = [(Value::String(key.clone()), existing.get(&key)?.clone())]
            .into_iter()
            .collect();
        if read != want {
            return None;
        }
        parts.push((key, piece.to_string()));
    }
    Some(parts)
}

/// The padding inside a flow mapping's braces: `""` for `{match: x}`, `" "` for `{ match: x }`
/// (and for `{}`, which shows no preference).
fn flow_pad_of(flow: &str) -> &'static str {
    match flow.strip_prefix('{').and_then(|rest| rest.chars().next()) {
        Some(c) if c != ' ' && c != '}' => "",
        _ => " ",
    }
}

/// A scalar as written in the file: plain when that reads back as the same string in the given
/// context (and looks like text to any YAML reader), double-quoted with escapes otherwise.
fn scalar(s: &str, flow: bool) -> String {
    if plain_ok(s, flow) {
        s.to_string()
    } else {
        double_quoted(s)
    }
}

fn plain_ok(s: &str, flow: bool) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    if !first.is_ascii_alphanumeric()
        || s.ends_with(':')
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/:@+-".contains(c))
    {
        return false;
    }
    // Words YAML 1.1 readers take for booleans or null.
    let lower = s.to_ascii_lowercase();
    if ["y", "n", "yes", "no", "on", "off", "true", "false", "null"].contains(&lower.as_str()) {
        return false;
    }
    // Text without letters that is not an address or prefix may read as a number somewhere
    // (`12:30` is a YAML 1.1 integer).
    let address = s
        .split('/')
        .next()
        .is_some_and(|a| a.parse::<IpAddr>().is_ok());
    if !s.chars().any(|c| c.is_ascii_alphabetic()) && !address {
        return false;
    }
    let probe = if flow {
        format!("{{k: {s}}}")
    } else {
        format!("k: {s}")
    };
    serde_yaml::from_str::<Mapping>(&probe)
        .is_ok_and(|m| m.get("k").and_then(Value::as_str) == Some(s))
}

fn double_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02X}", c as u32));
            }
            // C1 controls, line and paragraph separators, BOM and non-characters: not printable
            // in YAML, or easy to lose.
            c if (0x80..=0x9f).contains(&(c as u32))
                || matches!(
                    c,
                    '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
                ) =>
            {
                out.push_str(&format!("\\u{:04X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The entry of `values` whose `match` is `matches`; an error when several are.
fn find_entry(values: &[Value], matches: &str) -> Result<Option<usize>, EditError> {
    // Compared as policies compare them: `10.0.0.1/32` is `10.0.0.1`, `2001:DB8::/32` is
    // `2001:db8::/32`; strings that are not valid matches compare as written.
    let wanted = matches.parse::<crate::config::Match>().ok();
    let same = |s: &str| match (&wanted, s.parse::<crate::config::Match>()) {
        (Some(w), Ok(m)) => *w == m,
        _ => s == matches,
    };
    let found: Vec<usize> = values
        .iter()
        .enumerate()
        .filter(|(_, v)| {
            v.as_mapping()
                .and_then(|m| m.get("match"))
                .and_then(Value::as_str)
                .is_some_and(same)
        })
        .map(|(i, _)| i)
        .collect();
    match found[..] {
        [] => Ok(None),
        [i] => Ok(Some(i)),
        _ => Err(EditError::Duplicate {
            matches: matches.to_string(),
            count: found.len(),
        }),
    }
}

fn entry_name(i: usize, matches: &str) -> String {
    format!("policies[{i}] (match {matches:?})")
}

/// The file as lines, with the values serde_yaml reads from it.
struct Doc {
    bom: bool,
    lines: Vec<Line>,
    /// Line ending of new lines: the file's own (`\r\n` if it has any).
    nl: &'static str,
    /// Whether the text ended with a line ending (a missing one is added while editing and
    /// removed again by [`Doc::render`]).
    final_nl: bool,
    root: Mapping,
    top: Vec<TopKey>,
}

struct Line {
    text: String,
    eol: &'static str,
}

/// A top-level key: its line, and where its value's lines end (the next top-level key or
/// document marker, or the end of the file).
struct TopKey {
    line: usize,
    key: String,
    end: usize,
}

/// The `policies` value as the lines hold it.
enum Seq {
    Absent,
    /// `policies:` with no entries: empty, `~`, `null` or `[]`. `rewrite` when the line holds
    /// such a value, which goes when entries are added; entries are inserted at `insert_at`.
    Empty {
        header: usize,
        rewrite: bool,
        insert_at: usize,
    },
    /// A block sequence: `- ` lines at column `ind`, one per value.
    Block {
        header: usize,
        ind: usize,
        items: Vec<Item>,
        values: Vec<Value>,
    },
}

/// One `- ` entry of a block sequence.
struct Item {
    /// The `- ` line.
    start: usize,
    /// End (exclusive) of the entry: its last content line, then the comment lines indented
    /// under it that directly follow.
    body_end: usize,
    style: Style,
    /// Spaces between `-` and the entry's text.
    gap: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// `- { match: x, ... }`
    Flow,
    /// `- match: x` and the other keys under it.
    Block,
    /// `-` (or `- # comment`) with every key on the lines under it.
    BlockBelow,
}

/// A block mapping to edit: the entry's `- ` line (or the `default:` line) and its key lines.
struct BlockMap {
    header: usize,
    /// Indentation of the header line's `-` (or of `default:`); keys are indented more.
    header_indent: usize,
    /// Column of a key on the header line itself (`- match: x`).
    key_col: Option<usize>,
    body_end: usize,
}

impl Doc {
    fn parse(text: &str) -> Result<Doc, EditError> {
        let (bom, body) = match text.strip_prefix('\u{feff}') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let root = match serde_yaml::from_str::<Value>(body).map_err(EditError::Yaml)? {
            Value::Mapping(m) => m,
            Value::Null => Mapping::new(),
            _ => return Err(EditError::NotAMapping),
        };
        let nl = if body.contains("\r\n") { "\r\n" } else { "\n" };
        let lines: Vec<Line> = body
            .split_inclusive('\n')
            .map(|piece| {
                if let Some(text) = piece.strip_suffix("\r\n") {
                    Line {
                        text: text.into(),
                        eol: "\r\n",
                    }
                } else if let Some(text) = piece.strip_suffix('\n') {
                    Line {
                        text: text.into(),
                        eol: "\n",
                    }
                } else {
                    Line {
                        text: piece.into(),
                        eol: nl,
                    }
                }
            })
            .collect();
        let mut found: Vec<(usize, Option<String>)> = Vec::new();
        let mut boundaries = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            match top_level(&line.text) {
                TopLine::Inside => {}
                TopLine::Marker => boundaries.push(i),
                TopLine::Key(key) => {
                    boundaries.push(i);
                    found.push((i, key));
                }
            }
        }
        let expected: Vec<Option<&str>> = root.keys().map(Value::as_str).collect();
        let located: Vec<Option<&str>> = found.iter().map(|(_, k)| k.as_deref()).collect();
        if expected.contains(&None) || expected != located {
            let keys = |ks: &[Option<&str>]| {
                ks.iter()
                    .map(|k| k.unwrap_or("?"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(unsupported(
                "the file",
                format!(
                    "its top-level keys ({}) are not each at the start of a line as `key:` \
                     (found {})",
                    keys(&expected),
                    keys(&located)
                ),
            ));
        }
        let top = found
            .into_iter()
            .map(|(line, key)| TopKey {
                line,
                key: key.expect("checked against the mapping's keys"),
                end: boundaries
                    .iter()
                    .copied()
                    .find(|&b| b > line)
                    .unwrap_or(lines.len()),
            })
            .collect();
        Ok(Doc {
            bom,
            lines,
            nl,
            final_nl: body.is_empty() || body.ends_with('\n'),
            root,
            top,
        })
    }

    fn top_key(&self, key: &str) -> Option<&TopKey> {
        self.top.iter().find(|t| t.key == key)
    }

    fn policies(&self) -> Result<Seq, EditError> {
        let Some(&TopKey {
            line: header, end, ..
        }) = self.top_key("policies")
        else {
            return Ok(Seq::Absent);
        };
        self.check_no_anchors(header, end, "policies")?;
        let head = &self.lines[header].text;
        let scan = scan_line(head);
        let colon = scan.colon.expect("a top-level key line has a colon");
        let inline = head[colon + 1..scan.code_end].trim();
        let value = self.root.get("policies").unwrap_or(&Value::Null);
        let (ind, items) = self.items(header + 1, end)?;
        if items.is_empty() {
            let empty = match value {
                Value::Null => is_null_word(inline),
                Value::Sequence(s) => s.is_empty() && inline.replace([' ', '\t'], "") == "[]",
                _ => false,
            };
            if !empty {
                return Err(unsupported(
                    "policies",
                    format!(
                        "line {}: `policies` must be a list with one `- ` line per entry, not `{inline}`",
                        header + 1
                    ),
                ));
            }
            return Ok(Seq::Empty {
                header,
                rewrite: !inline.is_empty(),
                insert_at: self.attached_comments_end(header + 1, end, 0),
            });
        }
        let values = match value {
            Value::Sequence(values) if inline.is_empty() && values.len() == items.len() => {
                values.clone()
            }
            _ => {
                return Err(unsupported(
                    "policies",
                    format!(
                        "line {}: could not match its `- ` lines to its entries",
                        header + 1
                    ),
                ));
            }
        };
        Ok(Seq::Block {
            header,
            ind,
            items,
            values,
        })
    }

    /// The `- ` entries in lines `from..end`, all at the indentation of the first one.
    fn items(&self, from: usize, end: usize) -> Result<(usize, Vec<Item>), EditError> {
        let mut ind = None;
        let mut starts = Vec::new();
        for i in from..end {
            let text = &self.lines[i].text;
            if !is_content(text) {
                continue;
            }
            let indent = indent_of(text);
            let ind = *ind.get_or_insert(indent);
            if indent == ind && is_dash(&text[indent..]) {
                starts.push(i);
            } else if indent <= ind || starts.is_empty() {
                return Err(unsupported(
                    "policies",
                    format!(
                        "line {}: expected a `- ` list entry at column {}",
                        i + 1,
                        ind + 1
                    ),
                ));
            }
        }
        let ind = ind.unwrap_or(NEW_INDENT);
        let items = starts
            .iter()
            .enumerate()
            .map(|(n, &start)| {
                let span_end = starts.get(n + 1).copied().unwrap_or(end);
                let last = (start..span_end)
                    .rev()
                    .find(|&i| is_content(&self.lines[i].text))
                    .unwrap_or(start);
                let after_dash = &self.lines[start].text[ind + 1..];
                let gap = indent_of(after_dash);
                let rest = &after_dash[gap..];
                let style = if rest.starts_with('{') {
                    Style::Flow
                } else if rest.is_empty() || rest.starts_with('#') {
                    Style::BlockBelow
                } else {
                    Style::Block
                };
                Item {
                    start,
                    body_end: self.attached_comments_end(last + 1, span_end, ind),
                    style,
                    gap: gap.max(1),
                }
            })
            .collect();
        Ok((ind, items))
    }

    /// `from` moved past the comment lines indented more than `indent` that directly follow.
    fn attached_comments_end(&self, mut from: usize, end: usize, indent: usize) -> usize {
        while from < end && {
            let text = &self.lines[from].text;
            is_comment(text) && indent_of(text) > indent
        } {
            from += 1;
        }
        from
    }

    fn check_no_anchors(&self, from: usize, end: usize, what: &str) -> Result<(), EditError> {
        match (from..end).find(|&i| scan_line(&self.lines[i].text).anchor_or_alias) {
            Some(i) => Err(unsupported(
                what,
                format!(
                    "line {} uses a YAML anchor or alias (`&name`, `*name`); expand it by hand first",
                    i + 1
                ),
            )),
            None => Ok(()),
        }
    }

    /// The padding style of a flow entry: `{ match: x }` or `{match: x}`.
    fn flow_pad(&self, item: &Item, ind: usize) -> &'static str {
        flow_pad_of(&self.lines[item.start].text[ind + 1 + item.gap..])
    }

    /// The new `- { ... }` line of a flow entry.
    fn flow_entry_line(
        &self,
        item: &Item,
        ind: usize,
        existing: &Mapping,
        fields: &Fields,
        what: &str,
    ) -> Result<String, EditError> {
        let text = &self.lines[item.start].text;
        let scan = scan_line(text);
        let at = ind + 1 + item.gap;
        let one_line = item.body_end == item.start + 1
            || (item.start + 1..item.body_end).all(|i| !is_content(&self.lines[i].text));
        let read: Option<Mapping> = text[at..scan.code_end]
            .ends_with('}')
            .then(|| serde_yaml::from_str(&text[at..scan.code_end]).ok())
            .flatten();
        if !one_line || read.as_ref() != Some(existing) {
            return Err(unsupported(
                what,
                format!(
                    "line {}: its flow mapping `{{ ... }}` does not end on this line",
                    item.start + 1
                ),
            ));
        }
        let inner = &text[at + 1..scan.code_end - 1];
        let flow =
            flow_map(inner, existing, fields, flow_pad_of(&text[at..])).ok_or_else(|| {
                unsupported(
                    what,
                    format!(
                        "line {}: could not tell its keys apart to keep the ones a policy has not",
                        item.start + 1
                    ),
                )
            })?;
        Ok(replace_value(text, at, scan.code_end, &flow))
    }

    /// The new lines `map.header..map.body_end` of a block mapping set to `fields`: keys whose
    /// value stays keep their line, changed values keep the key's comment, policy keys not in
    /// `fields` go (other keys stay), new keys follow the last key. Every key must be on one
    /// line of its own.
    fn edit_block_map(
        &self,
        map: &BlockMap,
        existing: &Mapping,
        fields: &Fields,
        what: &str,
    ) -> Result<Vec<String>, EditError> {
        let problem =
            |line: usize, reason: &str| unsupported(what, format!("line {}: {reason}", line + 1));
        let mut keys: Vec<(usize, usize, String)> = Vec::new();
        let mut cind = map.key_col;
        if let Some(col) = map.key_col {
            keys.push((map.header, col, String::new()));
        }
        for i in map.header + 1..map.body_end {
            let text = &self.lines[i].text;
            if !is_content(text) {
                continue;
            }
            let indent = indent_of(text);
            if indent != *cind.get_or_insert(indent) || indent <= map.header_indent {
                return Err(problem(
                    i,
                    "a value spans several lines; keep each key on one line (`key: value`)",
                ));
            }
            keys.push((i, indent, String::new()));
        }
        for (i, col, name) in &mut keys {
            let text = &self.lines[*i].text;
            let scan = scan_line(text);
            let key = scan
                .colon
                .filter(|&c| c > *col)
                .and_then(|c| key_name(&text[*col..c]));
            let Some(key) = key else {
                return Err(problem(*i, "expected `key: value`"));
            };
            let want: Mapping = existing
                .get(&key)
                .map(|v| (Value::String(key.clone()), v.clone()))
                .into_iter()
                .collect();
            let read: Option<Mapping> = serde_yaml::from_str(&text[*col..scan.code_end]).ok();
            if want.is_empty() || read.as_ref() != Some(&want) {
                return Err(problem(
                    *i,
                    &format!("the value of `{key}` is not on this line alone"),
                ));
            }
            *name = key;
        }
        if keys.len() != existing.len() {
            return Err(unsupported(
                what,
                format!(
                    "line {}: could not find each of its keys on a line of its own",
                    map.header + 1
                ),
            ));
        }
        let cind = cind.expect("a block mapping has a key line");
        let last_key = keys.last().expect("a block mapping has a key line").0;
        let mut out = Vec::new();
        for i in map.header..map.body_end {
            let text = &self.lines[i].text;
            match keys.iter().find(|(k, _, _)| *k == i) {
                None => out.push(text.clone()),
                Some((_, col, key)) => match fields.get(key) {
                    None if !POLICY_KEYS.contains(&key.as_str()) => out.push(text.clone()),
                    Some(field) if existing.get(key) == Some(&field.value) => {
                        out.push(text.clone());
                    }
                    Some(field) => {
                        let scan = scan_line(text);
                        let colon = scan.colon.expect("checked above");
                        out.push(replace_value(text, colon + 1, scan.code_end, &field.block));
                    }
                    // A key on the `- ` line that goes: the `-` stays, the keys follow below.
                    None if i == map.header => {
                        let scan = scan_line(text);
                        let comment = scan.comment.map_or("", |c| &text[c..]);
                        let dash = &text[..*col];
                        out.push(if comment.is_empty() {
                            dash.trim_end().to_string()
                        } else {
                            format!("{dash}{comment}")
                        });
                    }
                    None => {}
                },
            }
            if i == last_key {
                for field in &fields.0 {
                    if !existing.contains_key(field.key) {
                        out.push(format!("{}{}: {}", spaces(cind), field.key, field.block));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Sets the inline value of a top-level key line (`None`: no value), keeping its comment.
    fn set_inline(&mut self, line: usize, value: Option<&str>) {
        let text = self.lines[line].text.clone();
        let scan = scan_line(&text);
        let colon = scan.colon.expect("a top-level key line has a colon");
        self.lines[line].text = match value {
            Some(v) => replace_value(&text, colon + 1, scan.code_end, v),
            // The comment keeps its column: the old value's width becomes blanks.
            None if scan.comment.is_some() => format!(
                "{}{}{}",
                &text[..=colon],
                spaces(text[colon + 1..scan.code_end].chars().count()),
                &text[scan.code_end..]
            ),
            None => text[..=colon].to_string(),
        };
    }

    fn splice(&mut self, start: usize, end: usize, new: Vec<String>) {
        let nl = self.nl;
        self.lines.splice(
            start..end,
            new.into_iter().map(|text| Line { text, eol: nl }),
        );
    }

    /// After lines were removed at `at`: two blank lines that met there become one.
    fn collapse_blank(&mut self, at: usize) {
        if at > 0
            && at < self.lines.len()
            && is_blank(&self.lines[at - 1].text)
            && is_blank(&self.lines[at].text)
        {
            self.lines.remove(at);
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        if self.bom {
            out.push('\u{feff}');
        }
        for line in &self.lines {
            out.push_str(&line.text);
            out.push_str(line.eol);
        }
        if !self.final_nl {
            let trimmed = out
                .strip_suffix("\r\n")
                .or_else(|| out.strip_suffix('\n'))
                .map(str::len);
            if let Some(len) = trimmed {
                out.truncate(len);
            }
        }
        out
    }

    /// The edited text, if it reads back as `expected` with the top-level keys in order.
    fn finish(&self, expected: &Mapping) -> Result<String, EditError> {
        let out = self.render();
        let verify = |detail: String| EditError::Verify { detail };
        let body = out.strip_prefix('\u{feff}').unwrap_or(&out);
        let got = match serde_yaml::from_str::<Value>(body) {
            Ok(Value::Mapping(m)) => m,
            Ok(Value::Null) => Mapping::new(),
            Ok(_) => return Err(verify("the result is not a mapping".into())),
            Err(e) => return Err(verify(format!("the result is not valid YAML: {e}"))),
        };
        if !got.keys().eq(expected.keys()) {
            return Err(verify("the top-level keys changed".into()));
        }
        for (key, want) in expected {
            let have = got.get(key).unwrap_or(&Value::Null);
            if have == want {
                continue;
            }
            let key = key.as_str().unwrap_or("?");
            let detail = match (have, want) {
                (Value::Sequence(h), Value::Sequence(w)) if h.len() != w.len() => {
                    format!("`{key}` has {} entries instead of {}", h.len(), w.len())
                }
                (Value::Sequence(h), Value::Sequence(w)) => {
                    let i = h.iter().zip(w).position(|(a, b)| a != b).unwrap_or(0);
                    format!(
                        "`{key}[{i}]` reads back as {:?} instead of {:?}",
                        h[i], w[i]
                    )
                }
                _ => format!("`{key}` reads back as {have:?} instead of {want:?}"),
            };
            return Err(verify(detail));
        }
        Ok(out)
    }
}

enum TopLine {
    /// Blank, a comment, or inside a value.
    Inside,
    /// `---`, `...` or a `%` directive.
    Marker,
    /// A line at column 0 that should be a key: its name, if it reads as one.
    Key(Option<String>),
}

fn top_level(text: &str) -> TopLine {
    let Some(first) = text.chars().next() else {
        return TopLine::Inside;
    };
    if first == ' ' || first == '\t' || first == '#' || is_dash(text) {
        return TopLine::Inside;
    }
    let marker = (text.starts_with("---") || text.starts_with("..."))
        && text[3..].chars().next().is_none_or(char::is_whitespace);
    if marker || first == '%' {
        return TopLine::Marker;
    }
    TopLine::Key(scan_line(text).colon.and_then(|c| key_name(&text[..c])))
}

/// A simple key's name: plain, or quoted.
fn key_name(text: &str) -> Option<String> {
    let text = text.trim();
    if text.starts_with(['"', '\'']) {
        return serde_yaml::from_str::<String>(text).ok();
    }
    if text.is_empty() || text.starts_with(['?', '&', '*', '!', '{', '[', '|', '>', '@', '`', '-'])
    {
        return None;
    }
    Some(text.to_string())
}

/// What [`scan_line`] finds in one line.
struct LineScan {
    /// End of the line's YAML: before trailing blanks and the comment.
    code_end: usize,
    /// Start of the comment (`#`).
    comment: Option<usize>,
    /// The first `:` outside quotes and flow collections that is followed by a blank or the end:
    /// the end of a block mapping key.
    colon: Option<usize>,
    anchor_or_alias: bool,
}

/// Inside a quoted scalar while scanning a line.
struct Quoted {
    /// `"` or `'`.
    quote: char,
    /// The previous character was a backslash escape (double quotes only).
    escaped: bool,
}

impl Quoted {
    fn new(quote: char) -> Quoted {
        Quoted {
            quote,
            escaped: false,
        }
    }

    /// Whether `c` closes the scalar. In double quotes `\` escapes the next character; in
    /// single quotes `''` is an escaped quote, whose second half is taken from `chars`.
    fn ends_at(
        &mut self,
        c: char,
        chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>,
    ) -> bool {
        if self.quote == '"' {
            if self.escaped {
                self.escaped = false;
            } else if c == '\\' {
                self.escaped = true;
            } else {
                return c == '"';
            }
            return false;
        }
        if c != '\'' {
            return false;
        }
        if chars.peek().is_some_and(|&(_, n)| n == '\'') {
            chars.next();
            return false;
        }
        true
    }
}

/// Finds the comment, the key's colon, and anchors or aliases in one line, skipping quoted
/// scalars. A quote opens a scalar only where a scalar may start: at the start, or after a
/// blank that follows `:`, a `- ` or `? ` indicator, or (inside `{}`/`[]`) after `,`, `[` or `{`.
fn scan_line(line: &str) -> LineScan {
    let mut quote: Option<Quoted> = None;
    let mut depth = 0usize;
    let mut prev: Option<char> = None;
    let mut last_sig: Option<char> = None;
    let mut only_indicators = true;
    let mut comment = None;
    let mut colon = None;
    let mut anchor_or_alias = false;
    let mut chars = line.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match quote {
            Some(ref mut q) => {
                if q.ends_at(c, &mut chars) {
                    quote = None;
                }
            }
            None if c == '#' && prev.is_none_or(char::is_whitespace) => {
                comment = Some(i);
                break;
            }
            None if c.is_whitespace() => {}
            None => {
                let after_blank = match last_sig {
                    None => true,
                    Some(':') => true,
                    Some('-' | '?') => only_indicators,
                    Some(',' | '[' | '{') => depth > 0,
                    Some(_) => false,
                };
                let at_token = match prev {
                    None => true,
                    Some(p) if p.is_whitespace() => after_blank,
                    Some('[' | '{' | ',') => depth > 0,
                    Some(_) => false,
                };
                match c {
                    '"' | '\'' if at_token => quote = Some(Quoted::new(c)),
                    '&' | '*' if at_token => anchor_or_alias = true,
                    '[' | '{' if at_token || depth > 0 => depth += 1,
                    ']' | '}' if depth > 0 => depth -= 1,
                    ':' if depth == 0
                        && colon.is_none()
                        && chars.peek().is_none_or(|&(_, n)| n.is_whitespace()) =>
                    {
                        colon = Some(i);
                    }
                    _ => {}
                }
                if !matches!(c, '-' | '?') {
                    only_indicators = false;
                }
                last_sig = Some(c);
            }
        }
        prev = Some(c);
    }
    let code_end = line[..comment.unwrap_or(line.len())].trim_end().len();
    LineScan {
        code_end,
        comment,
        colon,
        anchor_or_alias,
    }
}

/// `text` with `text[start..code_end]` (a value) replaced by `value`. A comment after it keeps
/// its column where the new value leaves room; trailing blanks without a comment go.
fn replace_value(text: &str, start: usize, code_end: usize, value: &str) -> String {
    let old = &text[start..code_end];
    let value_at = old.len() - old.trim_start().len();
    // After a colon: the blanks before the old value stay (one space if there was no value).
    let lead = match &old[..value_at] {
        "" if start == code_end => " ",
        blanks => blanks,
    };
    let mut out = format!("{}{lead}{value}", &text[..start]);
    let trail = &text[code_end..];
    if let Some(hash) = trail.find('#') {
        let blanks = trail[..hash].chars().count();
        let old_len = old.chars().count();
        let new_len = lead.chars().count() + value.chars().count();
        let width = (blanks + old_len).saturating_sub(new_len).max(1);
        out.push_str(&spaces(width));
        out.push_str(&trail[hash..]);
    }
    out
}

fn is_null_word(s: &str) -> bool {
    matches!(s, "" | "~" | "null" | "Null" | "NULL")
}

fn is_dash(s: &str) -> bool {
    s == "-" || s.starts_with("- ") || s.starts_with("-\t")
}

fn is_blank(s: &str) -> bool {
    s.trim().is_empty()
}

fn is_comment(s: &str) -> bool {
    s.trim_start().starts_with('#')
}

/// Neither blank nor a comment.
fn is_content(s: &str) -> bool {
    !is_blank(s) && !is_comment(s)
}

fn indent_of(s: &str) -> usize {
    s.len() - s.trim_start_matches(' ').len()
}

fn spaces(n: usize) -> String {
    " ".repeat(n)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use proptest::prelude::*;

    use super::*;
    use crate::config::Config;

    /// The README's example, comments included.
    const README: &str = "\
mode: enforce            # or dry-run: count what would be dropped, drop nothing
default: { limit: 1000, window: 1s }
policies:
  - match: 10.0.0.0/8    # CIDR or one address, IPv4 or IPv6; the longest prefix wins
    limit: 100
    window: 500ms
  - match: 2001:db8::/32
    limit: 50
    window: 1s
  - match: 192.0.2.7
    action: pass         # never limited (allow list)
  - match: 198.51.100.0/24
    action: drop         # always dropped (block list); `limit: 0` does the same
";

    fn rule(
        matches: &str,
        limit: Option<u32>,
        window: Option<&str>,
        action: Option<&str>,
    ) -> RuleText {
        RuleText {
            matches: matches.into(),
            limit,
            window: window.map(Into::into),
            action: action.map(Into::into),
        }
    }

    fn limited(matches: &str, limit: u32, window: &str) -> RuleText {
        rule(matches, Some(limit), Some(window), None)
    }

    fn pass(matches: &str) -> RuleText {
        rule(matches, None, None, Some("pass"))
    }

    fn value_of(r: &RuleText) -> Value {
        Value::Mapping(Fields::new(r, true).mapping())
    }

    fn policies(text: &str) -> Vec<Value> {
        let root: Value = serde_yaml::from_str(text).unwrap();
        match root.get("policies") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => v.as_sequence().unwrap().clone(),
        }
    }

    fn matches(text: &str) -> Vec<String> {
        policies(text)
            .iter()
            .map(|p| p["match"].as_str().unwrap().to_string())
            .collect()
    }

    /// Asserts the output still reads as a valid config (for IP/CIDR matches).
    fn valid(text: &str) -> &str {
        if let Err(e) = Config::parse(text) {
            panic!("{e}\n{text}");
        }
        text
    }

    /// The lines removed from `before` and added in `after` (longest common subsequence), so a
    /// test can state the whole change: every other line is byte for byte the same.
    fn diff(before: &str, after: &str) -> (Vec<String>, Vec<String>) {
        let a: Vec<&str> = before.split_inclusive('\n').collect();
        let b: Vec<&str> = after.split_inclusive('\n').collect();
        let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
        for i in (0..a.len()).rev() {
            for j in (0..b.len()).rev() {
                lcs[i][j] = if a[i] == b[j] {
                    lcs[i + 1][j + 1] + 1
                } else {
                    lcs[i + 1][j].max(lcs[i][j + 1])
                };
            }
        }
        let (mut i, mut j, mut removed, mut added) = (0, 0, Vec::new(), Vec::new());
        while i < a.len() || j < b.len() {
            if i < a.len() && j < b.len() && a[i] == b[j] {
                i += 1;
                j += 1;
            } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
                added.push(b[j].trim_end_matches('\n').to_string());
                j += 1;
            } else {
                removed.push(a[i].trim_end_matches('\n').to_string());
                i += 1;
            }
        }
        (removed, added)
    }

    fn assert_diff(before: &str, after: &str, removed: &[&str], added: &[&str]) {
        let (r, a) = diff(before, after);
        let r: Vec<&str> = r.iter().map(String::as_str).collect();
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        assert_eq!((r.as_slice(), a.as_slice()), (removed, added), "\n{after}");
    }

    fn unsupported_reason(e: EditError) -> String {
        match e {
            EditError::Unsupported { .. } => e.to_string(),
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    #[test]
    fn readme_replace_middle_entry_changes_one_line() {
        let out = upsert_policy(README, &limited("2001:db8::/32", 75, "1s")).unwrap();
        assert_diff(README, valid(&out), &["    limit: 50"], &["    limit: 75"]);
    }

    #[test]
    fn readme_unchanged_rule_is_a_no_op() {
        let out = upsert_policy(README, &limited("10.0.0.0/8", 100, "500ms")).unwrap();
        assert_eq!(out, README);
        assert_eq!(upsert_policy(README, &pass("192.0.2.7")).unwrap(), README);
    }

    #[test]
    fn readme_changed_value_keeps_the_comment_column() {
        let out = upsert_policy(README, &rule("192.0.2.7", None, None, Some("drop"))).unwrap();
        assert_diff(
            README,
            valid(&out),
            &["    action: pass         # never limited (allow list)"],
            &["    action: drop         # never limited (allow list)"],
        );
        let text = "default: { limit: 1, window: 1s }\npolicies:\n  - match: 10.0.0.0/8\n    limit: 100    # raised for backups\n    window: 1s\n";
        let out = upsert_policy(text, &limited("10.0.0.0/8", 100_000, "1s")).unwrap();
        assert_diff(
            text,
            valid(&out),
            &["    limit: 100    # raised for backups"],
            &["    limit: 100000 # raised for backups"],
        );
        let out = upsert_policy(&out, &limited("10.0.0.0/8", 5, "1s")).unwrap();
        assert!(
            out.contains("    limit: 5      # raised for backups\n"),
            "{out}"
        );
    }

    #[test]
    fn readme_switch_to_pass_drops_limit_and_window() {
        let out = upsert_policy(README, &pass("10.0.0.0/8")).unwrap();
        assert_diff(
            README,
            valid(&out),
            &["    limit: 100", "    window: 500ms"],
            &["    action: pass"],
        );
        let back = upsert_policy(&out, &limited("10.0.0.0/8", 100, "500ms")).unwrap();
        assert_eq!(back, README);
        let out = upsert_policy(README, &rule("192.0.2.7", Some(0), None, Some("drop"))).unwrap();
        assert!(
            valid(&out).contains(
                "  - match: 192.0.2.7\n    action: drop         # never limited (allow list)\n    limit: 0\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn readme_append_in_block_style_after_the_last_entry() {
        let out = upsert_policy(README, &limited("203.0.113.0/24", 10, "1.5s")).unwrap();
        assert_eq!(
            valid(&out),
            format!("{README}  - match: 203.0.113.0/24\n    limit: 10\n    window: 1.5s\n")
        );
        let out = upsert_policy(README, &pass("::")).unwrap();
        assert!(
            valid(&out).ends_with("  - match: \"::\"\n    action: pass\n"),
            "{out}"
        );
        assert_eq!(remove_policy(&out, "::").unwrap().unwrap(), README);
    }

    #[test]
    fn readme_remove_first_middle_last() {
        let out = remove_policy(README, "10.0.0.0/8").unwrap().unwrap();
        assert_diff(
            README,
            valid(&out),
            &[
                "  - match: 10.0.0.0/8    # CIDR or one address, IPv4 or IPv6; the longest prefix wins",
                "    limit: 100",
                "    window: 500ms",
            ],
            &[],
        );
        let out = remove_policy(README, "192.0.2.7").unwrap().unwrap();
        assert_diff(
            README,
            valid(&out),
            &[
                "  - match: 192.0.2.7",
                "    action: pass         # never limited (allow list)",
            ],
            &[],
        );
        let out = remove_policy(README, "198.51.100.0/24").unwrap().unwrap();
        assert_diff(
            README,
            valid(&out),
            &[
                "  - match: 198.51.100.0/24",
                "    action: drop         # always dropped (block list); `limit: 0` does the same",
            ],
            &[],
        );
        assert!(remove_policy(README, "10.0.0.0/9").unwrap().is_none());
        assert!(remove_policy(README, "10.0.0.0").unwrap().is_none());
    }

    #[test]
    fn removing_every_entry_leaves_an_empty_list_and_adding_fills_it() {
        let mut text = README.to_string();
        for m in [
            "2001:db8::/32",
            "10.0.0.0/8",
            "198.51.100.0/24",
            "192.0.2.7",
        ] {
            text = remove_policy(&text, m).unwrap().unwrap();
            valid(&text);
        }
        assert_eq!(
            text,
            "mode: enforce            # or dry-run: count what would be dropped, drop nothing\n\
             default: { limit: 1000, window: 1s }\npolicies: []\n"
        );
        let out = upsert_policy(&text, &limited("10.0.0.0/8", 1, "1s")).unwrap();
        assert!(
            valid(&out)
                .ends_with("policies:\n  - match: 10.0.0.0/8\n    limit: 1\n    window: 1s\n"),
            "{out}"
        );
    }

    #[test]
    fn only_entry_removed_keeps_the_comments_around_it() {
        let text = "\
default: { limit: 10, window: 1s }
policies:    # exceptions to the default
  # the monitoring host
  - match: 192.0.2.7   # nagios
    # never limit it
    action: pass
    # (see ticket 42)

  # add more here
# end
";
        let out = remove_policy(text, "192.0.2.7").unwrap().unwrap();
        assert_eq!(
            valid(&out),
            "\
default: { limit: 10, window: 1s }
policies: [] # exceptions to the default
  # the monitoring host

  # add more here
# end
"
        );
        let again = upsert_policy(&out, &pass("192.0.2.7")).unwrap();
        assert_eq!(
            valid(&again),
            "\
default: { limit: 10, window: 1s }
policies:    # exceptions to the default
  # the monitoring host
  - match: 192.0.2.7
    action: pass

  # add more here
# end
"
        );
    }

    #[test]
    fn empty_and_null_policies_are_filled() {
        for (head, after) in [
            ("policies: []\n", "policies:\n"),
            (
                "policies: [ ]   # none yet\n",
                "policies:       # none yet\n",
            ),
            ("policies:\n", "policies:\n"),
            ("policies: ~ # none\n", "policies:   # none\n"),
            ("policies: null\n", "policies:\n"),
        ] {
            let text = format!("mode: dry-run\n{head}default: {{ limit: 10, window: 1s }}\n");
            let out = upsert_policy(&text, &limited("10.0.0.0/8", 5, "1s")).unwrap();
            assert_eq!(
                valid(&out),
                format!(
                    "mode: dry-run\n{after}  - match: 10.0.0.0/8\n    limit: 5\n    window: 1s\n\
                     default: {{ limit: 10, window: 1s }}\n"
                )
            );
            assert!(remove_policy(&text, "10.0.0.0/8").unwrap().is_none());
        }
    }

    #[test]
    fn absent_policies_are_created_at_the_end() {
        let text = "# limiter\ndefault: { limit: 10, window: 1s }  # everyone\n# end\n";
        let out = upsert_policy(text, &pass("192.0.2.7")).unwrap();
        assert_eq!(
            valid(&out),
            format!("{text}policies:\n  - match: 192.0.2.7\n    action: pass\n")
        );
        assert!(remove_policy(text, "192.0.2.7").unwrap().is_none());
        // No newline at the end: still none after the edit.
        let out = upsert_policy("default: { limit: 10, window: 1s }", &pass("192.0.2.7")).unwrap();
        assert_eq!(
            valid(&out),
            "default: { limit: 10, window: 1s }\npolicies:\n  - match: 192.0.2.7\n    action: pass"
        );
        // An empty file (not a valid config, but a valid YAML document).
        let out = upsert_policy("", &pass("192.0.2.7")).unwrap();
        assert_eq!(out, "policies:\n  - match: 192.0.2.7\n    action: pass\n");
    }

    const FLOW: &str = "\
default: { limit: 10, window: 1s }
policies:
  - { match: 0.0.0.0, action: pass }       # DHCP discovery
  - { match: \"::\", action: pass }          # DAD, MLD
  - { match: 10.0.0.0/8, limit: 100, window: 1s }
";

    #[test]
    fn flow_entries_stay_flow() {
        let out = upsert_policy(FLOW, &limited("0.0.0.0", 5, "1s")).unwrap();
        assert_diff(
            FLOW,
            valid(&out),
            &["  - { match: 0.0.0.0, action: pass }       # DHCP discovery"],
            &["  - { match: 0.0.0.0, limit: 5, window: 1s } # DHCP discovery"],
        );
        // The quoted match keeps its quotes; unchanged values keep their text.
        let out = upsert_policy(FLOW, &rule("::", None, None, Some("drop"))).unwrap();
        assert_diff(
            FLOW,
            valid(&out),
            &["  - { match: \"::\", action: pass }          # DAD, MLD"],
            &["  - { match: \"::\", action: drop }          # DAD, MLD"],
        );
        let out = upsert_policy(FLOW, &limited("10.0.0.0/8", 100, "2m")).unwrap();
        assert_diff(
            FLOW,
            valid(&out),
            &["  - { match: 10.0.0.0/8, limit: 100, window: 1s }"],
            &["  - { match: 10.0.0.0/8, limit: 100, window: 2m }"],
        );
        let out = upsert_policy(FLOW, &limited("2001:db8::/32", 50, "1s")).unwrap();
        assert_diff(
            FLOW,
            valid(&out),
            &[],
            &["  - { match: 2001:db8::/32, limit: 50, window: 1s }"],
        );
        let out = remove_policy(FLOW, "::").unwrap().unwrap();
        assert_diff(
            FLOW,
            valid(&out),
            &["  - { match: \"::\", action: pass }          # DAD, MLD"],
            &[],
        );
        // Tight braces stay tight.
        let tight = "default: {limit: 10, window: 1s}\npolicies:\n- {match: 10.0.0.0/8, limit: 1, window: 1s}\n";
        let out = upsert_policy(tight, &pass("192.0.2.7")).unwrap();
        assert!(
            valid(&out).ends_with("- {match: 192.0.2.7, action: pass}\n"),
            "{out}"
        );
        let out = upsert_policy(tight, &limited("10.0.0.0/8", 2, "1s")).unwrap();
        assert!(
            valid(&out).ends_with("\n- {match: 10.0.0.0/8, limit: 2, window: 1s}\n"),
            "{out}"
        );
        let out = set_default(tight, &limited("", 20, "1s")).unwrap();
        assert!(
            valid(&out).starts_with("default: {limit: 20, window: 1s}\n"),
            "{out}"
        );
    }

    #[test]
    fn mixed_styles_append_like_the_last_entry() {
        let text = "default: { limit: 10, window: 1s }\npolicies:\n  - { match: 0.0.0.0, action: pass }\n  -   match: 10.0.0.0/8\n      limit: 1\n      window: 1s\n";
        let out = upsert_policy(text, &pass("192.0.2.7")).unwrap();
        assert!(
            valid(&out).ends_with("  -   match: 192.0.2.7\n      action: pass\n"),
            "{out}"
        );
        let text = "default: { limit: 10, window: 1s }\npolicies:\n  - match: 10.0.0.0/8\n    limit: 1\n    window: 1s\n  -  {match: 0.0.0.0, action: pass}\n";
        let out = upsert_policy(text, &pass("192.0.2.7")).unwrap();
        assert!(
            valid(&out).ends_with("  -  {match: 192.0.2.7, action: pass}\n"),
            "{out}"
        );
    }

    #[test]
    fn quoted_matches_are_found_by_value() {
        let text = "default: { limit: 10, window: 1s }\npolicies:\n  - match: \"10.0.0.0/8\"   # quoted\n    limit: 1\n    window: 1s\n  - match: '192.0.2.7'\n    action: pass\n  - { match: \"198.51.100.0/24\", action: drop }\n";
        let out = upsert_policy(text, &limited("10.0.0.0/8", 2, "1s")).unwrap();
        assert_diff(text, valid(&out), &["    limit: 1"], &["    limit: 2"]);
        let out =
            upsert_policy(text, &rule("198.51.100.0/24", Some(0), None, Some("drop"))).unwrap();
        assert_diff(
            text,
            valid(&out),
            &["  - { match: \"198.51.100.0/24\", action: drop }"],
            &["  - { match: \"198.51.100.0/24\", action: drop, limit: 0 }"],
        );
        let out = remove_policy(text, "192.0.2.7").unwrap().unwrap();
        assert_diff(
            text,
            valid(&out),
            &["  - match: '192.0.2.7'", "    action: pass"],
            &[],
        );
        assert_eq!(matches(&out), ["10.0.0.0/8", "198.51.100.0/24"]);
    }

    const IDS: &[&str] = &[
        "tenant-acme",
        "tenant acme",
        "a # not a comment",
        "#hash",
        "key: value",
        "trailing:",
        "it's",
        "\"double\"",
        "'single'",
        "  leading spaces",
        "trailing space ",
        "back\\slash",
        "- dash",
        "*star",
        "&amp",
        "!bang",
        "{brace}",
        "[bracket]",
        "a, b",
        "%percent",
        "@at",
        "`tick",
        "|pipe",
        ">gt",
        "?q",
        "yes",
        "No",
        "null",
        "~",
        "true",
        "123",
        "1e3",
        "0x1F",
        "12:30",
        "1.5",
        ".inf",
        "ünïcødé ✓",
        "日本",
        "",
        "tab\there",
        "line\nbreak",
        "bell\u{7}",
        "nel\u{85}",
        "sep\u{2028}",
        "bom\u{feff}",
    ];

    #[test]
    fn ids_with_special_characters_round_trip() {
        for template in [README, FLOW, "default: { limit: 1, window: 1s }\n"] {
            for id in IDS {
                let r = limited(id, 5, "1s");
                let out = upsert_policy(template, &r).unwrap_or_else(|e| panic!("{id:?}: {e}"));
                let mut want = policies(template);
                want.push(value_of(&r));
                assert_eq!(policies(&out), want, "{id:?}\n{out}");
                let again = upsert_policy(&out, &pass(id)).unwrap();
                *want.last_mut().unwrap() = value_of(&pass(id));
                assert_eq!(policies(&again), want, "{id:?}\n{again}");
                let removed = remove_policy(&again, id).unwrap().unwrap();
                if template.contains("policies") {
                    assert_eq!(removed, template, "{id:?}");
                } else {
                    assert_eq!(removed, format!("{template}policies: []\n"), "{id:?}");
                }
            }
        }
        let out = upsert_policy(README, &pass("tenant-acme")).unwrap();
        assert!(
            out.ends_with("  - match: tenant-acme\n    action: pass\n"),
            "{out}"
        );
        let out = upsert_policy(README, &pass("a # b")).unwrap();
        assert!(
            out.ends_with("  - match: \"a # b\"\n    action: pass\n"),
            "{out}"
        );
        let out = upsert_policy(FLOW, &pass("it's \"x\"")).unwrap();
        assert!(
            out.ends_with("  - { match: \"it's \\\"x\\\"\", action: pass }\n"),
            "{out}"
        );
    }

    #[test]
    fn existing_entries_with_special_ids_are_found() {
        let text = "\
default: { limit: 1, window: 1s }
policies:
  - match: 'it''s # here'   # the quote is doubled
    limit: 1
    window: 1s
  - { match: \"a, b: {c}\", limit: 2, window: 1s }   # flow with indicators inside
  - match: tenant:acme
    action: pass
";
        let out = upsert_policy(text, &limited("it's # here", 3, "1s")).unwrap();
        assert_diff(text, &out, &["    limit: 1"], &["    limit: 3"]);
        let out = upsert_policy(text, &limited("a, b: {c}", 3, "1s")).unwrap();
        assert_diff(
            text,
            &out,
            &["  - { match: \"a, b: {c}\", limit: 2, window: 1s }   # flow with indicators inside"],
            &["  - { match: \"a, b: {c}\", limit: 3, window: 1s }   # flow with indicators inside"],
        );
        let out = remove_policy(text, "tenant:acme").unwrap().unwrap();
        assert_diff(
            text,
            &out,
            &["  - match: tenant:acme", "    action: pass"],
            &[],
        );
    }

    #[test]
    fn comments_inside_an_entry_go_with_it_comments_above_stay() {
        let text = "\
default: { limit: 10, window: 1s }
policies:
  # offices
  - match: 10.0.0.0/8   # all of them
    # doubled for the backup window
    limit: 200
    window: 1s
    # review in May
  # partners
  - match: 198.51.100.0/24
    limit: 5
    window: 1s

    # a comment after a blank line, at the entry's indentation
  - match: 192.0.2.7
    action: pass
";
        let out = remove_policy(text, "10.0.0.0/8").unwrap().unwrap();
        assert_diff(
            text,
            valid(&out),
            &[
                "  - match: 10.0.0.0/8   # all of them",
                "    # doubled for the backup window",
                "    limit: 200",
                "    window: 1s",
                "    # review in May",
            ],
            &[],
        );
        let out = remove_policy(text, "198.51.100.0/24").unwrap().unwrap();
        assert_diff(
            text,
            valid(&out),
            &[
                "  - match: 198.51.100.0/24",
                "    limit: 5",
                "    window: 1s",
            ],
            &[],
        );
        // Replacing keeps every comment of the entry, and new keys follow the last key.
        let out = upsert_policy(
            text,
            &rule("10.0.0.0/8", Some(300), Some("2s"), Some("limit")),
        )
        .unwrap();
        assert_diff(
            text,
            valid(&out),
            &["    limit: 200", "    window: 1s"],
            &["    limit: 300", "    window: 2s", "    action: limit"],
        );
        let out = upsert_policy(text, &pass("10.0.0.0/8")).unwrap();
        assert_diff(
            text,
            valid(&out),
            &["    limit: 200", "    window: 1s"],
            &["    action: pass"],
        );
        assert!(out.contains(
            "    # doubled for the backup window\n    action: pass\n    # review in May\n"
        ));
    }

    #[test]
    fn entries_with_keys_below_the_dash() {
        let text = "\
default: { limit: 10, window: 1s }
policies:
  -   # the office
    match: 10.0.0.0/8
    limit: 1
    window: 1s
  -
    match: 192.0.2.7
    action: pass
";
        let out = upsert_policy(text, &limited("10.0.0.0/8", 2, "1s")).unwrap();
        assert_diff(text, valid(&out), &["    limit: 1"], &["    limit: 2"]);
        let out = upsert_policy(text, &limited("203.0.113.0/24", 2, "1s")).unwrap();
        assert!(valid(&out).ends_with(
            "    action: pass\n  - match: 203.0.113.0/24\n    limit: 2\n    window: 1s\n"
        ));
        let out = remove_policy(text, "10.0.0.0/8").unwrap().unwrap();
        assert_eq!(matches(valid(&out)), ["192.0.2.7"]);
    }

    #[test]
    fn removing_the_key_on_the_dash_line_keeps_the_dash() {
        let text = "default: { limit: 10, window: 1s }\npolicies:\n  - limit: 5     # five\n    match: 10.0.0.0/8\n    window: 1s\n";
        let out = upsert_policy(text, &pass("10.0.0.0/8")).unwrap();
        assert_eq!(
            valid(&out),
            "default: { limit: 10, window: 1s }\npolicies:\n  - # five\n    match: 10.0.0.0/8\n    action: pass\n"
        );
        let text = "default: { limit: 10, window: 1s }\npolicies:\n  - limit: 5\n    match: 10.0.0.0/8\n    window: 1s\n";
        let out = upsert_policy(text, &pass("10.0.0.0/8")).unwrap();
        assert_eq!(
            valid(&out),
            "default: { limit: 10, window: 1s }\npolicies:\n  -\n    match: 10.0.0.0/8\n    action: pass\n"
        );
    }

    #[test]
    fn sequences_at_the_key_indentation() {
        let text = "policies:\n- match: 10.0.0.0/8\n  limit: 1\n  window: 1s\n- match: 192.0.2.7\n  action: pass\ndefault:\n  limit: 10\n  window: 1s\n";
        let out = upsert_policy(text, &limited("198.51.100.0/24", 3, "1s")).unwrap();
        assert_diff(
            text,
            valid(&out),
            &[],
            &["- match: 198.51.100.0/24", "  limit: 3", "  window: 1s"],
        );
        assert!(out.contains("  action: pass\n- match: 198.51.100.0/24\n"));
        let out = remove_policy(text, "10.0.0.0/8").unwrap().unwrap();
        assert_diff(
            text,
            valid(&out),
            &["- match: 10.0.0.0/8", "  limit: 1", "  window: 1s"],
            &[],
        );
        let out = upsert_policy(text, &limited("192.0.2.7", 1, "10ms")).unwrap();
        assert_diff(
            text,
            valid(&out),
            &["  action: pass"],
            &["  limit: 1", "  window: 10ms"],
        );
    }

    #[test]
    fn blank_line_separated_entries() {
        let text = "\
default: { limit: 10, window: 1s }

policies:
  - match: 10.0.0.0/8
    limit: 1
    window: 1s

  - match: 192.0.2.7
    action: pass

  - match: 198.51.100.0/24
    action: drop

mode: enforce
";
        let out = upsert_policy(text, &pass("203.0.113.9")).unwrap();
        // (The diff pairs the blank line the other way round; the `contains` below is exact.)
        assert_diff(
            text,
            valid(&out),
            &[],
            &["  - match: 203.0.113.9", "    action: pass", ""],
        );
        assert!(
            out.contains("    action: drop\n\n  - match: 203.0.113.9\n    action: pass\n\nmode:")
        );
        for m in ["10.0.0.0/8", "192.0.2.7", "198.51.100.0/24"] {
            let out = remove_policy(text, m).unwrap().unwrap();
            assert!(!valid(&out).contains("\n\n\n"), "{out}");
            assert_eq!(policies(&out).len(), 2);
        }
    }

    #[test]
    fn default_flow_replaced_in_place() {
        let out = set_default(README, &limited("ignored", 2000, "1s")).unwrap();
        assert_diff(
            README,
            valid(&out),
            &["default: { limit: 1000, window: 1s }"],
            &["default: { limit: 2000, window: 1s }"],
        );
        let text =
            "# header\ndefault: { limit: 1000, window: 1s }   # everyone else\npolicies: []\n";
        let out = set_default(text, &limited("", 50, "500ms")).unwrap();
        assert_diff(
            text,
            valid(&out),
            &["default: { limit: 1000, window: 1s }   # everyone else"],
            &["default: { limit: 50, window: 500ms }  # everyone else"],
        );
        let out = set_default(text, &rule("", None, None, Some("pass"))).unwrap();
        assert_diff(
            text,
            valid(&out),
            &["default: { limit: 1000, window: 1s }   # everyone else"],
            &["default: { action: pass }              # everyone else"],
        );
    }

    #[test]
    fn default_block_replaced_with_comments_around() {
        let text = "\
mode: enforce
# what nobody else matches
default:          # the fallback
  # per client
  limit: 1000     # packets
  window: 1s      # per second
  # (tuned in March)

# exceptions
policies:
  - match: 10.0.0.0/8
    limit: 100
    window: 500ms
";
        let out = set_default(text, &limited("", 10, "1s")).unwrap();
        assert_diff(
            text,
            valid(&out),
            &["  limit: 1000     # packets"],
            &["  limit: 10       # packets"],
        );
        let out = set_default(text, &rule("", Some(0), None, Some("drop"))).unwrap();
        assert_diff(
            text,
            valid(&out),
            &[
                "  limit: 1000     # packets",
                "  window: 1s      # per second",
            ],
            &["  limit: 0        # packets", "  action: drop"],
        );
        let out = set_default(text, &limited("", 1000, "1s")).unwrap();
        assert_eq!(out, text);
    }

    #[test]
    fn default_null_absent_or_empty() {
        let text = "default:   # to be set\npolicies: []\n";
        let out = set_default(text, &limited("", 10, "1s")).unwrap();
        assert_eq!(
            valid(&out),
            "default: { limit: 10, window: 1s } # to be set\npolicies: []\n"
        );
        let text = "default: ~\n";
        let out = set_default(text, &limited("", 10, "1s")).unwrap();
        assert_eq!(valid(&out), "default: { limit: 10, window: 1s }\n");
        let text = "default: {}\n";
        let out = set_default(text, &limited("", 10, "1s")).unwrap();
        assert_eq!(valid(&out), "default: { limit: 10, window: 1s }\n");
        let text = "policies:\n  - match: 192.0.2.7\n    action: pass\n";
        let out = set_default(text, &limited("", 10, "1s")).unwrap();
        assert_eq!(
            valid(&out),
            format!("{text}default: {{ limit: 10, window: 1s }}\n")
        );
        assert!(matches!(
            set_default(README, &RuleText::default()),
            Err(EditError::EmptyDefault)
        ));
    }

    #[test]
    fn keys_a_rule_cannot_express_are_kept() {
        // Not valid for today's `Config` (unknown keys), so checked through serde_yaml only.
        let text = "\
default:
  limit: 10
  note: everyone else   # kept
  window: 1s
policies:
  - match: 10.0.0.0/8
    owner: \"netops\"     # kept
    limit: 1
    window: 1s
  - { match: 192.0.2.7, owner: 'mon # 1', action: pass }
";
        let out = upsert_policy(text, &pass("10.0.0.0/8")).unwrap();
        assert_diff(
            text,
            &out,
            &["    limit: 1", "    window: 1s"],
            &["    action: pass"],
        );
        let out = upsert_policy(text, &limited("192.0.2.7", 3, "1s")).unwrap();
        assert_diff(
            text,
            &out,
            &["  - { match: 192.0.2.7, owner: 'mon # 1', action: pass }"],
            &["  - { match: 192.0.2.7, owner: 'mon # 1', limit: 3, window: 1s }"],
        );
        assert_eq!(policies(&out)[1]["owner"], Value::String("mon # 1".into()));
        let out = set_default(text, &rule("", None, None, Some("pass"))).unwrap();
        assert_diff(
            text,
            &out,
            &["  limit: 10", "  window: 1s"],
            &["  action: pass"],
        );
        assert!(out.starts_with("default:\n  note: everyone else   # kept\n  action: pass\n"));
        let e = upsert_policy(
            "policies:\n  - { match: a, x: [1, {b: 2}], limit: 1 }\n",
            &pass("a"),
        );
        assert!(e.is_ok(), "{e:?}");
    }

    #[test]
    fn unsafe_inputs_are_rejected_with_a_reason() {
        let anchors =
            "default: &d { limit: 10, window: 1s }\npolicies:\n  - match: 10.0.0.0/8\n    <<: *d\n";
        let e = unsupported_reason(upsert_policy(anchors, &pass("192.0.2.7")).unwrap_err());
        assert!(
            e.contains("policies") && e.contains("line 4") && e.contains("alias"),
            "{e}"
        );
        let e = unsupported_reason(set_default(anchors, &limited("", 1, "1s")).unwrap_err());
        assert!(e.contains("default") && e.contains("line 1"), "{e}");
        let anchored = "default: { limit: 10, window: 1s }\npolicies:\n  - &p { match: 10.0.0.0/8, limit: 1, window: 1s }\nother: *p\n";
        let e = unsupported_reason(upsert_policy(anchored, &pass("192.0.2.7")).unwrap_err());
        assert!(e.contains("line 3"), "{e}");

        let flow_seq = "default: { limit: 10, window: 1s }\npolicies: [ { match: 10.0.0.0/8, limit: 1, window: 1s } ]\n";
        let e = unsupported_reason(upsert_policy(flow_seq, &pass("192.0.2.7")).unwrap_err());
        assert!(e.contains("line 2") && e.contains("list"), "{e}");
        assert!(remove_policy(flow_seq, "10.0.0.0/8").is_err());

        let multi_line_flow = "default: { limit: 10, window: 1s }\npolicies:\n  - { match: 10.0.0.0/8,\n      limit: 1, window: 1s }\n  - match: 192.0.2.7\n    action: pass\n";
        let e =
            unsupported_reason(upsert_policy(multi_line_flow, &pass("10.0.0.0/8")).unwrap_err());
        assert!(e.contains("policies[0]") && e.contains("line 3"), "{e}");
        // Entries that are not edited may be written any way.
        let out = upsert_policy(
            multi_line_flow,
            &rule("192.0.2.7", None, None, Some("drop")),
        )
        .unwrap();
        assert_diff(
            multi_line_flow,
            valid(&out),
            &["    action: pass"],
            &["    action: drop"],
        );
        let out = remove_policy(multi_line_flow, "10.0.0.0/8")
            .unwrap()
            .unwrap();
        assert_eq!(matches(valid(&out)), ["192.0.2.7"]);

        let folded = "default: { limit: 10, window: 1s }\npolicies:\n  - match: 10.0.0.0/8\n    limit: 1\n    window: >-\n      1s\n";
        let e =
            unsupported_reason(upsert_policy(folded, &limited("10.0.0.0/8", 2, "1s")).unwrap_err());
        assert!(e.contains("line 5") || e.contains("line 6"), "{e}");
        // A quoted scalar folded over two lines reads as "10.0.0.0/8 ".
        let split_quoted = "default: { limit: 10, window: 1s }\npolicies:\n  - match: \"10.0.0.0/8\n      \"\n    limit: 1\n";
        let e = upsert_policy(split_quoted, &limited("10.0.0.0/8 ", 2, "1s")).unwrap_err();
        let e = unsupported_reason(e);
        assert!(
            e.contains("line 4") && e.contains("spans several lines"),
            "{e}"
        );

        let dup = "default: { limit: 10, window: 1s }\npolicies:\n  - { match: tenant, action: pass }\n  - { match: \"tenant\", action: drop }\n";
        let e = upsert_policy(dup, &pass("tenant")).unwrap_err();
        assert!(matches!(e, EditError::Duplicate { count: 2, .. }), "{e}");
        assert!(remove_policy(dup, "tenant").is_err());

        assert!(matches!(
            upsert_policy("- a\n- b\n", &pass("x")),
            Err(EditError::NotAMapping)
        ));
        assert!(matches!(
            upsert_policy("policies: [\n", &pass("x")),
            Err(EditError::Yaml(_))
        ));
        let e =
            upsert_policy("{default: {limit: 1, window: 1s}}\n", &pass("192.0.2.7")).unwrap_err();
        assert!(unsupported_reason(e).contains("top-level keys"));
        let e = upsert_policy(
            "default: {limit: 1, window: 1s}\npolicies:\n  match: 10.0.0.0/8\n",
            &pass("x"),
        )
        .unwrap_err();
        assert!(unsupported_reason(e).contains("line 3"));
        let e = set_default("default: 5\n", &limited("", 1, "1s")).unwrap_err();
        assert!(unsupported_reason(e).contains("must be a mapping"));
        // Messages name the problem.
        let e = EditError::Duplicate {
            matches: "10.0.0.0/8".into(),
            count: 2,
        };
        assert_eq!(
            e.to_string(),
            "policies has 2 entries with match \"10.0.0.0/8\"; remove the duplicates by hand first"
        );
    }

    #[test]
    fn quoted_top_level_keys_and_document_markers() {
        let text = "%YAML 1.2\n---\n\"default\": { limit: 10, window: 1s }\n'policies':\n  - match: 10.0.0.0/8\n    limit: 1\n    window: 1s\n...\n";
        let out = upsert_policy(text, &limited("10.0.0.0/8", 2, "1s")).unwrap();
        assert_diff(text, valid(&out), &["    limit: 1"], &["    limit: 2"]);
        let out = upsert_policy(text, &pass("192.0.2.7")).unwrap();
        assert!(
            valid(&out).ends_with("    window: 1s\n  - match: 192.0.2.7\n    action: pass\n...\n")
        );
    }

    #[test]
    fn line_endings_and_bom_are_kept() {
        let crlf = README.replace('\n', "\r\n");
        let out = upsert_policy(&crlf, &limited("2001:db8::/32", 75, "1s")).unwrap();
        assert_eq!(
            out,
            README
                .replace("limit: 50", "limit: 75")
                .replace('\n', "\r\n")
        );
        let out = upsert_policy(&crlf, &pass("203.0.113.1")).unwrap();
        assert!(out.ends_with("\r\n  - match: 203.0.113.1\r\n    action: pass\r\n"));
        assert!(!out.replace("\r\n", "").contains('\n'));
        let bom = format!("\u{feff}{README}");
        let out = remove_policy(&bom, "192.0.2.7").unwrap().unwrap();
        assert!(out.starts_with("\u{feff}mode: enforce"));
        let without_nl = README.trim_end();
        let out = upsert_policy(
            without_nl,
            &rule("198.51.100.0/24", Some(0), None, Some("drop")),
        )
        .unwrap();
        assert!(out.ends_with("    action: drop         # always dropped (block list); `limit: 0` does the same\n    limit: 0"), "{out}");
        let out = remove_policy(without_nl, "198.51.100.0/24")
            .unwrap()
            .unwrap();
        assert!(
            out.ends_with("    action: pass         # never limited (allow list)"),
            "{out:?}"
        );
    }

    #[test]
    fn scalars_are_plain_only_when_safe() {
        for plain in [
            "10.0.0.0/8",
            "192.0.2.7",
            "2001:db8::/32",
            "2001:db8::1",
            "500ms",
            "1.5s",
            "tenant-acme",
            "pass",
        ] {
            assert_eq!(scalar(plain, false), plain);
            assert_eq!(scalar(plain, true), plain);
        }
        for quoted in [
            "::",
            "::1",
            "::ffff:0:0/96",
            "123",
            "1e3",
            "0x1F",
            "yes",
            "off",
            "12:30",
            "a b",
            "a#b",
            "",
        ] {
            assert!(scalar(quoted, false).starts_with('"'), "{quoted}");
            assert!(scalar(quoted, true).starts_with('"'), "{quoted}");
        }
        assert_eq!(
            double_quoted("a\"b\\c\u{1}\u{2028}"),
            "\"a\\\"b\\\\c\\x01\\u2028\""
        );
    }

    #[test]
    fn scan_line_finds_comments_colons_and_aliases() {
        let s = scan_line("  - match: 'it''s # x'   # real");
        assert_eq!(s.comment, Some(25));
        assert_eq!(s.code_end, 22);
        assert_eq!(s.colon, Some(9));
        let s = scan_line("  - { match: \"a # b\", limit: 1 }#no # yes");
        assert_eq!(s.comment, Some(36));
        assert_eq!(s.colon, None);
        let s = scan_line("key: o'brien # c");
        assert_eq!(s.comment, Some(13));
        assert!(!s.anchor_or_alias);
        assert!(scan_line("  - *ref").anchor_or_alias);
        assert!(scan_line("a: &x 1").anchor_or_alias);
        assert!(scan_line("a: [1, *x]").anchor_or_alias);
        assert!(!scan_line("a: b*c&d # *e").anchor_or_alias);
        assert!(!scan_line("a: \"*x\"").anchor_or_alias);
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("limiter-config-edit-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn write_atomic_replaces_and_keeps_permissions() {
        let dir = temp_dir("write");
        let path = dir.join("limiter.yaml");
        fs::write(&path, README).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let out = upsert_policy(README, &pass("203.0.113.1")).unwrap();
        write_atomic(&path, &out).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), out);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o640
        );
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["limiter.yaml"], "no temporary file is left");
        // A new file.
        let fresh = dir.join("new.yaml");
        write_atomic(&fresh, "default: { limit: 1, window: 1s }\n").unwrap();
        assert_eq!(
            fs::read_to_string(&fresh).unwrap(),
            "default: { limit: 1, window: 1s }\n"
        );
        // A symlink stays a symlink; its target is replaced.
        let link = dir.join("link.yaml");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        write_atomic(&link, README).unwrap();
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), README);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o640
        );
        // Errors name the path.
        let missing = dir.join("no-such-dir").join("limiter.yaml");
        let e = write_atomic(&missing, README).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot write {}: creating ", missing.display())),
            "{e}"
        );
        // A failed write leaves the old file and no temporary file.
        let ro = dir.join("ro");
        fs::create_dir(&ro).unwrap();
        fs::write(ro.join("limiter.yaml"), README).unwrap();
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o500)).unwrap();
        let denied = write_atomic(&ro.join("limiter.yaml"), "x: 1\n");
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o700)).unwrap();
        if let Err(e) = denied {
            // (Root may write anyway; then there is nothing to check.)
            assert!(e.to_string().contains("limiter.yaml"), "{e}");
            assert_eq!(fs::read_to_string(ro.join("limiter.yaml")).unwrap(), README);
            assert_eq!(fs::read_dir(&ro).unwrap().count(), 1);
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Commented configs for the property tests: comments tagged `in:MATCH` are inside that
    /// entry (they go when it is removed); every other comment line must survive every edit.
    const COMMENTED: &[&str] = &[
        "\
# limiter config
mode: enforce   # top
default: { limit: 1000, window: 1s }   # everyone
policies:   # the list
  # first group
  - match: 10.0.0.0/8    # in:10.0.0.0/8
    # in:10.0.0.0/8
    limit: 100
    window: 500ms
  # between
  - match: 192.0.2.7
    action: pass
    # in:192.0.2.7

  # after a blank line
  - { match: tenant-acme, limit: 5, window: 1s }  # in:tenant-acme
# trailing
",
        "\
default:
  # per client
  limit: 10   # packets
  window: 1s
policies:
- { match: 0.0.0.0, action: pass }   # in:0.0.0.0
# between
- { match: \"::\", action: pass }
# end
",
        "# nothing yet\ndefault: { limit: 1, window: 1s }\npolicies: []   # none\n# end\n",
        "# no policies key\ndefault: { limit: 1, window: 1s }  # d\n# end\n",
    ];

    /// Lines the robustness property assembles files from: mostly invalid combinations, and
    /// some valid ones with shapes the editor must refuse rather than mangle.
    const ODD_LINES: &[&str] = &[
        "policies:",
        "policies: []",
        "policies: [ {match: 10.0.0.0/8, limit: 1} ]",
        "default: { limit: 1, window: 1s }",
        "default:",
        "default: &d {limit: 2}",
        "mode: enforce # m",
        "  limit: 3",
        "\twindow: 1s",
        "  - match: 10.0.0.0/8",
        "  - match: \"q # r\"   # c",
        "  - match: 'it''s'",
        "    limit: 5",
        "    window: 1s",
        "    action: |",
        "      pass",
        "    window: >-",
        "      1s",
        "  - { match: 192.0.2.7, action: pass }  # f",
        "  - {match: 'it''s', limit: 1,",
        "      window: 1s}",
        "  - &a { match: 10.0.0.0/8 }",
        "  - *a",
        "    <<: *d",
        "  -",
        "  - # dash comment",
        "    match: 192.0.2.7",
        "- match: 10.0.0.0/8",
        "  limit: 1",
        "  # comment",
        "# col0",
        "",
        "---",
        "...",
        "\"policies\":",
        "? complex",
    ];

    const POOL: &[&str] = &[
        "10.0.0.0/8",
        "192.0.2.7",
        "2001:db8::/32",
        "198.51.100.0/24",
        "0.0.0.0",
        "::",
        "tenant-acme",
        "a # b",
        "x: y",
        "'q'",
        "  lead",
        "\"dq\"",
    ];

    #[derive(Debug, Clone)]
    enum Op {
        Upsert(RuleText),
        Remove(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let windows = prop::sample::select(vec!["10ms", "500ms", "1s", "1.5s", "2m", "1h"]);
        let rule = prop_oneof![
            (0..10_000u32, windows.clone()).prop_map(|(l, w)| limited("", l, w)),
            (0..10_000u32, windows).prop_map(|(l, w)| rule("", Some(l), Some(w), Some("limit"))),
            Just(pass("")),
            Just(rule("", None, None, Some("drop"))),
            Just(rule("", Some(0), None, Some("drop"))),
        ];
        prop_oneof![
            2 => (0..POOL.len(), rule).prop_map(|(i, mut r)| {
                r.matches = POOL[i].into();
                Op::Upsert(r)
            }),
            1 => (0..POOL.len()).prop_map(Op::Remove),
        ]
    }

    fn is_address(m: &str) -> bool {
        m.parse::<crate::config::Cidr>().is_ok()
    }

    proptest! {
        #[test]
        fn edits_keep_comments_and_follow_the_model(
            template in 0..COMMENTED.len(),
            ops in prop::collection::vec(op(), 1..24),
        ) {
            let original = COMMENTED[template];
            let outside: Vec<&str> = original
                .lines()
                .filter(|l| is_comment(l) && !l.contains("in:"))
                .collect();
            let mut text = original.to_string();
            let mut model = policies(original);
            let mut removed: Vec<String> = Vec::new();
            for op in ops {
                match op {
                    Op::Upsert(r) => {
                        text = upsert_policy(&text, &r).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
                        let v = value_of(&r);
                        match model.iter().position(|p| p["match"].as_str() == Some(&r.matches)) {
                            Some(i) => model[i] = v,
                            None => model.push(v),
                        }
                    }
                    Op::Remove(i) => {
                        let m = POOL[i];
                        let present = model.iter().position(|p| p["match"].as_str() == Some(m));
                        let out = remove_policy(&text, m).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
                        prop_assert_eq!(out.is_some(), present.is_some());
                        if let (Some(out), Some(at)) = (out, present) {
                            text = out;
                            model.remove(at);
                            removed.push(m.to_string());
                        }
                    }
                }
                prop_assert_eq!(&policies(&text), &model, "{}", text);
                // Every comment outside the entries is still there, in order.
                let mut lines = text.lines();
                for c in &outside {
                    prop_assert!(lines.any(|l| l == *c), "lost {:?}:\n{}", c, text);
                }
                // Comments inside an entry (on its lines or their own) live as long as the entry.
                for m in POOL {
                    let tag = format!("# in:{m}");
                    let count = |t: &str| t.lines().filter(|l| l.ends_with(&tag)).count();
                    let want = if removed.iter().any(|r| r == m) { 0 } else { count(original) };
                    prop_assert_eq!(count(&text), want, "{}\n{}", tag, text);
                }
                if model.iter().all(|p| is_address(p["match"].as_str().unwrap())) {
                    prop_assert!(Config::parse(&text).is_ok(), "{:?}\n{}", Config::parse(&text).err(), text);
                }
            }
        }

        #[test]
        fn odd_files_give_an_error_or_exactly_the_edit(
            lines in prop::collection::vec(prop::sample::select(ODD_LINES), 0..14),
            target in prop::sample::select(vec!["10.0.0.0/8", "192.0.2.7", "q # r", "it's", "new"]),
            kind in 0..3u8,
        ) {
            let text = lines.join("\n");
            let r = match kind {
                0 => limited(target, 9, "1s"),
                1 => pass(target),
                _ => rule(target, Some(0), None, Some("drop")),
            };
            let before: Option<Mapping> = serde_yaml::from_str(&text).ok();
            let others = |m: &Mapping| -> Vec<(Value, Value)> {
                m.iter()
                    .filter(|(k, _)| !matches!(k.as_str(), Some("policies" | "default")))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            };
            let is_target = |p: &Value| p.get("match").and_then(Value::as_str) == Some(target);
            let want = value_of(&r);
            if let Ok(out) = upsert_policy(&text, &r) {
                let before = before.clone().expect("an edited file was valid YAML");
                let after: Mapping = serde_yaml::from_str(&out).unwrap();
                prop_assert_eq!(others(&before), others(&after));
                let (old, new) = (policies(&text), policies(&out));
                let hit: Vec<&Value> = new.iter().filter(|p| is_target(p)).collect();
                prop_assert_eq!(hit.len(), 1, "{}", out);
                for key in ["limit", "window", "action"] {
                    prop_assert_eq!(hit[0].get(key), want.get(key));
                }
                let rest = |v: &[Value]| v.iter().filter(|p| !is_target(p)).cloned().collect::<Vec<_>>();
                prop_assert_eq!(rest(&old), rest(&new));
            }
            if let Ok(Some(out)) = remove_policy(&text, target) {
                let mut want = policies(&text);
                want.retain(|p| !is_target(p));
                prop_assert_eq!(policies(&out), want);
                let after: Mapping = serde_yaml::from_str(&out).unwrap();
                prop_assert_eq!(others(before.as_ref().unwrap()), others(&after));
            }
            if let Ok(out) = set_default(&text, &r) {
                let after: Mapping = serde_yaml::from_str(&out).unwrap();
                let d = &after["default"];
                for key in ["limit", "window", "action"] {
                    prop_assert_eq!(d.get(key), want.get(key));
                }
                prop_assert_eq!(after.get("policies"), before.as_ref().unwrap().get("policies"));
            }
        }

        #[test]
        fn any_id_round_trips(id in any::<String>(), template in 0..COMMENTED.len()) {
            let original = COMMENTED[template];
            prop_assume!(!policies(original).iter().any(|p| p["match"].as_str() == Some(&id)));
            let r = limited(&id, 7, "1s");
            let out = upsert_policy(original, &r).map_err(|e| TestCaseError::fail(format!("{id:?}: {e}")))?;
            let mut want = policies(original);
            want.push(value_of(&r));
            prop_assert_eq!(policies(&out), want);
            let back = remove_policy(&out, &id).map_err(|e| TestCaseError::fail(e.to_string()))?.unwrap();
            if serde_yaml::from_str::<Mapping>(original).unwrap().contains_key("policies") {
                prop_assert_eq!(back, original);
            } else {
                prop_assert_eq!(back, format!("{original}policies: []\n"));
            }
        }
    }

    #[test]
    fn entries_are_found_by_policy_value_not_spelling() {
        let text = "default: { limit: 5, window: 1s }\npolicies:\n  - match: 10.0.0.1/32\n    limit: 1\n    window: 1s\n  - match: 2001:DB8::/32\n    limit: 2\n    window: 1s\n";
        let rule = RuleText {
            matches: "10.0.0.1".into(),
            limit: Some(9),
            window: Some("1s".into()),
            action: None,
        };
        let out = upsert_policy(text, &rule).unwrap();
        let config = crate::config::Config::parse(&out).unwrap();
        assert_eq!(config.policies.len(), 2, "{out}");
        assert_eq!(config.policies[0].1.limit, 9);
        let out = remove_policy(text, "2001:db8::/32")
            .unwrap()
            .expect("found");
        assert_eq!(
            crate::config::Config::parse(&out).unwrap().policies.len(),
            1
        );
    }
}
