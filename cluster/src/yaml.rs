//! A fast path for the YAML that Kubernetes manifests are written in:
//! block mappings and sequences, plain and quoted scalars, one-line flow
//! collections and literal block scalars, transcoded to JSON text in one
//! pass so that serde_json builds the typed objects directly.
//!
//! `to_json` answers `None` for anything outside that subset (anchors,
//! tags, folded or multi-line scalars, floats, YAML 1.1 words such as
//! `yes`, duplicate keys, odd indentation...), and the caller parses the
//! document with serde-saphyr instead. Whenever it answers, the JSON means
//! exactly what serde-saphyr makes of the document: the differential tests
//! hold it to that, on every manifest in the repository and on mutations
//! of them.

use std::fmt::Write;

/// The document as JSON text, or `None` when it needs the full parser.
pub fn to_json(doc: &str) -> Option<String> {
    // Tabs, CR, control and other non-printable characters: the full
    // parser decides what they mean (or rejects them).
    if doc.bytes().any(|b| b < 0x20 && b != b'\n' || b == 0x7f)
        || !doc.is_ascii()
            && doc
                .chars()
                .any(|c| matches!(c, '\u{80}'..='\u{9f}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'))
    {
        return None;
    }
    let mut lines: Vec<Line> = doc
        .split('\n')
        .map(|raw| {
            let text = raw.trim_start_matches(' ');
            Line {
                raw,
                indent: raw.len() - text.len(),
                text,
                content: !(text.is_empty() || text.starts_with('#')),
            }
        })
        .collect();
    if lines.last().is_some_and(|l| l.raw.is_empty()) {
        lines.pop();
    }
    let mut t = Transcoder {
        lines,
        pos: 0,
        inline: None,
        depth: 0,
        out: String::with_capacity(doc.len() + doc.len() / 4),
    };
    let (indent, _) = t.peek()?;
    t.block(indent)?;
    if t.peek().is_some() {
        return None;
    }
    Some(t.out)
}

/// One line of the document, measured once.
struct Line<'a> {
    raw: &'a str,
    indent: usize,
    /// Without the indentation.
    text: &'a str,
    /// Not blank and not a comment.
    content: bool,
}

struct Transcoder<'a> {
    lines: Vec<Line<'a>>,
    pos: usize,
    /// The rest of a `- key: value` line, read as a line of its own at the
    /// column where `key` starts.
    inline: Option<(usize, &'a str)>,
    /// Collections open around the current line.
    depth: usize,
    out: String,
}

/// Deeper nesting than this goes to the full parser, which refuses it:
/// recursion here stays bounded whatever the input.
const MAX_DEPTH: usize = crate::files::MAX_DEPTH;

fn is_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

impl<'a> Transcoder<'a> {
    /// The next line with content (indent, text without the indent),
    /// skipping blank and comment lines. Does not consume it.
    fn peek(&mut self) -> Option<(usize, &'a str)> {
        if let Some(l) = self.inline {
            return Some(l);
        }
        while let Some(line) = self.lines.get(self.pos) {
            if line.content {
                return Some((line.indent, line.text));
            }
            self.pos += 1;
        }
        None
    }

    fn consume(&mut self) {
        if self.inline.take().is_none() {
            self.pos += 1;
        }
    }

    /// A mapping or a sequence whose lines start at column `indent`.
    fn block(&mut self, indent: usize) -> Option<()> {
        let (_, text) = self.peek()?;
        if is_item(text) {
            self.sequence(indent)
        } else {
            self.mapping(indent)
        }
    }

    fn mapping(&mut self, indent: usize) -> Option<()> {
        self.enter()?;
        self.out.push('{');
        // Where each key's JSON text sits in `out`, to refuse duplicates.
        let mut keys: Vec<(usize, usize)> = Vec::new();
        while let Some((ind, text)) = self.peek() {
            if ind < indent {
                break;
            }
            if ind > indent || is_item(text) {
                return None;
            }
            let (key, rest) = split_key(text)?;
            self.consume();
            if !keys.is_empty() {
                self.out.push(',');
            }
            let start = self.out.len();
            key.write(&mut self.out);
            let end = self.out.len();
            if keys.iter().any(|&(s, e)| self.out[s..e] == self.out[start..end]) {
                return None;
            }
            keys.push((start, end));
            self.out.push(':');
            self.value(indent, rest, true)?;
        }
        self.out.push('}');
        self.depth -= 1;
        Some(())
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }

    fn sequence(&mut self, indent: usize) -> Option<()> {
        self.enter()?;
        self.out.push('[');
        let mut first = true;
        while let Some((ind, text)) = self.peek() {
            if ind < indent || (ind == indent && !is_item(text)) {
                // The end of a sequence under a key at the same column.
                break;
            }
            if ind > indent {
                return None;
            }
            if !first {
                self.out.push(',');
            }
            first = false;
            let rest = text[1..].trim_start_matches(' ');
            let column = indent + (text.len() - rest.len());
            if is_item(rest) {
                return None;
            }
            if split_key(rest).is_some() {
                // `- key: value`: a mapping that starts on the item's line.
                self.inline = Some((column, rest));
                self.pos += 1;
                self.mapping(column)?;
            } else {
                self.consume();
                self.value(indent, rest, false)?;
            }
        }
        self.out.push(']');
        self.depth -= 1;
        Some(())
    }

    /// The value after `key:` (or `-`) of a node at column `indent`. An
    /// empty `rest` means a nested block, or null; under a key, a
    /// sequence may sit at the key's own column.
    fn value(&mut self, indent: usize, rest: &'a str, under_key: bool) -> Option<()> {
        let rest = strip_comment(rest)?;
        if rest.is_empty() {
            return match self.peek() {
                Some((ind, _)) if ind > indent => self.block(ind),
                Some((ind, text)) if under_key && ind == indent && is_item(text) => self.sequence(ind),
                _ => {
                    self.out.push_str("null");
                    Some(())
                }
            };
        }
        match rest.as_bytes()[0] {
            b'|' => self.literal(indent, rest),
            b'[' | b'{' => {
                let mut s = rest;
                flow(&mut s, &mut self.out, self.depth)?;
                only_comment(s).then_some(())
            }
            b'"' | b'\'' => {
                let (value, after) = quoted(rest)?;
                if !only_comment(after) {
                    return None;
                }
                json_string(&value, &mut self.out);
                Some(())
            }
            _ => {
                if find_pair(rest, b':', b' ').is_some() || rest.ends_with(':') {
                    return None;
                }
                plain(rest, &mut self.out)
            }
        }
    }

    /// A literal block scalar (`|`, `|-`, `|+`) of a node at column `indent`.
    fn literal(&mut self, indent: usize, header: &str) -> Option<()> {
        let keep = match header {
            "|" => None,
            "|-" => Some(false),
            "|+" => Some(true),
            _ => return None,
        };
        // Content lines without their indentation; blank lines as "".
        let mut lines: Vec<&str> = Vec::new();
        let mut column = None;
        while let Some(line) = self.lines.get(self.pos) {
            let ind = line.indent;
            if line.text.is_empty() {
                // Spaces beyond the indentation would be content.
                if ind > column.unwrap_or(indent) {
                    return None;
                }
                lines.push("");
                self.pos += 1;
                continue;
            }
            if ind <= indent {
                break;
            }
            let c = *column.get_or_insert(ind);
            if ind < c {
                return None;
            }
            lines.push(&line.raw[c..]);
            self.pos += 1;
        }
        let last = lines.iter().rposition(|l| !l.is_empty())?;
        let trailing = lines.len() - 1 - last;
        let mut content = lines[..=last].join("\n");
        match keep {
            None => content.push('\n'),
            Some(false) => {}
            Some(true) => content.extend(std::iter::repeat_n('\n', trailing + 1)),
        }
        json_string(&content, &mut self.out);
        Some(())
    }
}

/// A mapping key: plain text (borrowed) or a quoted scalar's value.
enum Key<'a> {
    Plain(&'a str),
    Quoted(String),
}

impl Key<'_> {
    fn write(&self, out: &mut String) {
        match self {
            Key::Plain(k) => json_string(k, out),
            Key::Quoted(k) => json_string(k, out),
        }
    }
}

/// `key: rest` → (the key, rest). `None` when the line is not a mapping
/// entry this subset reads.
fn split_key(text: &str) -> Option<(Key<'_>, &str)> {
    let first = *text.as_bytes().first()?;
    if first == b'"' || first == b'\'' {
        let (key, after) = quoted(text)?;
        let rest = after.strip_prefix(':')?;
        if !(rest.is_empty() || rest.starts_with(' ')) {
            return None;
        }
        return Some((Key::Quoted(key), rest.trim_start_matches(' ')));
    }
    let end = match find_pair(text, b':', b' ') {
        Some(i) => i,
        None if text.ends_with(':') => text.len() - 1,
        None => return None,
    };
    let key = &text[..end];
    if key.is_empty()
        || key.ends_with(' ')
        || find_pair(key, b' ', b'#').is_some()
        || INDICATORS.contains(&key.as_bytes()[0])
        || resolves(key) != Scalar::Str
    {
        return None;
    }
    Some((Key::Plain(key), text[end + 1..].trim_start_matches(' ')))
}

/// The first `a` immediately followed by `b` (a two-byte search without
/// the setup cost of a general substring search).
fn find_pair(s: &str, a: u8, b: u8) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut from = 0;
    while let Some(i) = bytes[from..].iter().position(|&c| c == a) {
        let at = from + i;
        match bytes.get(at + 1) {
            Some(&c) if c == b => return Some(at),
            Some(_) => from = at + 1,
            None => return None,
        }
    }
    None
}

/// Characters that cannot start a plain scalar here.
const INDICATORS: &[u8] = b"-?:,[]{}#&*!|>'\"%@`~";

/// Whether what follows a quoted scalar or flow collection is nothing or a
/// comment.
fn only_comment(after: &str) -> bool {
    let t = after.trim_start_matches(' ');
    t.is_empty() || t.starts_with('#') && t.len() < after.len()
}

/// `rest` without a trailing ` # comment` (quotes and flow collections are
/// read to their end before any `#` is taken for a comment).
fn strip_comment(rest: &str) -> Option<&str> {
    let rest = rest.trim_end_matches(' ');
    match rest.as_bytes().first() {
        None => Some(rest),
        Some(b'#') => Some(""),
        Some(b'"' | b'\'' | b'[' | b'{') => Some(rest),
        _ => Some(match find_pair(rest, b' ', b'#') {
            Some(i) => rest[..i].trim_end_matches(' '),
            None => rest,
        }),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Scalar {
    Null,
    Bool(bool),
    Int,
    Str,
    /// Anything whose meaning this subset does not decide (floats, octal,
    /// YAML 1.1 words, ...).
    Unsure,
}

/// What a plain scalar means, in the cases this subset decides.
fn resolves(s: &str) -> Scalar {
    let b = s.as_bytes();
    // Most scalars are names: a letter first and longer than any keyword.
    if s.len() > 5 && b[0].is_ascii_alphabetic() {
        return Scalar::Str;
    }
    match s {
        "null" => return Scalar::Null,
        "true" => return Scalar::Bool(true),
        "false" => return Scalar::Bool(false),
        _ => {}
    }
    let digits = s.strip_prefix('-').unwrap_or(s);
    if !digits.is_empty() && digits.len() <= 18 && digits.bytes().all(|c| c.is_ascii_digit()) {
        return if digits.len() > 1 && digits.starts_with('0') || s == "-0" {
            Scalar::Unsure
        } else {
            Scalar::Int
        };
    }
    if b[0].is_ascii_digit() || matches!(b[0], b'+' | b'-' | b'.') {
        // Floats, hex, octal, underscores, infinities: the full parser
        // decides. Addresses and versions (`10.96.0.1`, `1.2.3`) are strings.
        let number_like = s.bytes().all(|c| c.is_ascii_hexdigit() || b"+-._xXoO".contains(&c));
        let dots = s.bytes().filter(|&c| c == b'.').count();
        if number_like && dots <= 1 || s.contains(':') || s.contains('_') {
            return Scalar::Unsure;
        }
        let special = |w: &[u8]| b.windows(3).any(|x| x.eq_ignore_ascii_case(w));
        if special(b"inf") || special(b"nan") {
            return Scalar::Unsure;
        }
        return Scalar::Str;
    }
    const WORDS: [&str; 11] = ["null", "true", "false", "yes", "no", "on", "off", "y", "n", "~", ""];
    if WORDS.iter().any(|w| w.eq_ignore_ascii_case(s)) {
        return Scalar::Unsure;
    }
    Scalar::Str
}

/// A plain scalar in block context.
fn plain(s: &str, out: &mut String) -> Option<()> {
    let first = s.as_bytes()[0];
    // `-1` and `-foo` are plain scalars; `- x` is not.
    if INDICATORS.contains(&first) && !(first == b'-' && s.len() > 1 && !s.starts_with("- ")) {
        return None;
    }
    match resolves(s) {
        Scalar::Null => out.push_str("null"),
        Scalar::Bool(b) => out.push_str(if b { "true" } else { "false" }),
        Scalar::Int => out.push_str(s),
        Scalar::Str => json_string(s, out),
        Scalar::Unsure => return None,
    }
    Some(())
}

/// A one-line flow collection or scalar at the start of `s`, inside
/// `depth` collections; advances `s` past it.
fn flow(s: &mut &str, out: &mut String, depth: usize) -> Option<()> {
    *s = s.trim_start_matches(' ');
    let open = *s.as_bytes().first()?;
    match open {
        b'[' | b'{' => {
            if depth >= MAX_DEPTH {
                return None;
            }
            let close = if open == b'[' { b']' } else { b'}' };
            out.push(open as char);
            *s = &s[1..];
            let mut first = true;
            loop {
                *s = s.trim_start_matches(' ');
                if s.as_bytes().first() == Some(&close) {
                    *s = &s[1..];
                    break;
                }
                if !first {
                    out.push(',');
                }
                first = false;
                if open == b'{' {
                    flow_key(s, out)?;
                    out.push(':');
                }
                flow(s, out, depth + 1)?;
                *s = s.trim_start_matches(' ');
                match s.as_bytes().first()? {
                    b',' => {
                        *s = &s[1..];
                        // `[a, ]` is fine; `[a, , b]` and `[,]` are not.
                        let next = s.trim_start_matches(' ');
                        if next.starts_with(',') {
                            return None;
                        }
                    }
                    c if *c == close => {}
                    _ => return None,
                }
            }
            out.push(close as char);
            Some(())
        }
        b'"' | b'\'' => {
            let (value, after) = quoted(s)?;
            json_string(&value, out);
            *s = after;
            Some(())
        }
        _ => {
            let end = s.find([',', ']', '}', '[', '{', '#']).unwrap_or(s.len());
            let scalar = s[..end].trim_end_matches(' ');
            if scalar.is_empty() || find_pair(scalar, b':', b' ').is_some() || scalar.ends_with(':') {
                return None;
            }
            plain(scalar, out)?;
            *s = &s[end..];
            Some(())
        }
    }
}

/// `key:` inside `{...}`; the key is plain or quoted and followed by `: `.
fn flow_key(s: &mut &str, out: &mut String) -> Option<()> {
    let first = *s.as_bytes().first()?;
    if first == b'"' || first == b'\'' {
        let (key, after) = quoted(s)?;
        let rest = after.strip_prefix(": ")?;
        json_string(&key, out);
        *s = rest;
        return Some(());
    }
    let end = find_pair(s, b':', b' ')?;
    let key = &s[..end];
    if key.is_empty()
        || key.ends_with(' ')
        || key.contains([',', '[', ']', '{', '}', '#', ':'])
        || INDICATORS.contains(&key.as_bytes()[0])
        || resolves(key) != Scalar::Str
    {
        return None;
    }
    json_string(key, out);
    *s = &s[end + 2..];
    Some(())
}

/// A single- or double-quoted scalar on one line: (its value, the rest).
fn quoted(s: &str) -> Option<(String, &str)> {
    let quote = s.as_bytes()[0];
    let body = &s[1..];
    let mut value = String::new();
    if quote == b'\'' {
        let mut rest = body;
        loop {
            let i = rest.find('\'')?;
            value.push_str(&rest[..i]);
            if rest[i + 1..].starts_with('\'') {
                value.push('\'');
                rest = &rest[i + 2..];
            } else {
                return Some((value, &rest[i + 1..]));
            }
        }
    }
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &body[i + 1..])),
            '\\' => {
                let (_, e) = chars.next()?;
                match e {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    '/' => value.push('/'),
                    'n' => value.push('\n'),
                    't' => value.push('\t'),
                    'r' => value.push('\r'),
                    '0' => value.push('\0'),
                    'u' => {
                        let hex: String = (0..4).map(|_| chars.next().map(|(_, h)| h)).collect::<Option<_>>()?;
                        let code = u32::from_str_radix(&hex, 16).ok()?;
                        value.push(char::from_u32(code)?);
                    }
                    _ => return None,
                }
            }
            _ => value.push(c),
        }
    }
    None
}

fn json_string(s: &str, out: &mut String) {
    out.push('"');
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f) {
        out.push_str(s);
        out.push('"');
        return;
    }
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\t' => "\\t",
            b'\r' => "\\r",
            0..=0x1f | 0x7f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}
