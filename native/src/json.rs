//! JSON as the decoder reads it: one pass over a record's text that checks all of it (RFC 8259)
//! and hands back the members of the top-level object, each value read only as far as the
//! decoder needs: scalars as values, strings as their text (unescaped when asked for), objects
//! and arrays as their text, scanned again only if a contract looks inside. It replaced a parse
//! into a tree (serde_json), which cost more than reading the record.
//!
//! A record this refuses is deferred to the Python path, never rejected here. Where parsers
//! differ, it refuses what orjson (the Python path's) refuses: a lone surrogate in a string, a
//! number beyond a double's range. Nesting deeper than 127 is refused too and left to the Python
//! path (orjson reads up to 1,024).

use std::borrow::Cow;

/// Deepest nesting of arrays and objects accepted.
const MAX_DEPTH: u32 = 127;

/// A JSON value: scalars as read, strings and containers as their text in the document.
#[derive(Clone, Copy)]
pub enum Raw<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64), // above i64::MAX
    Float(f64),
    Str(Text<'a>),
    Obj(&'a str), // from `{` to `}`
    Arr(&'a str), // from `[` to `]`
}

/// A string's text between its quotes, escapes and all.
#[derive(Clone, Copy)]
pub struct Text<'a> {
    raw: &'a str,
    escaped: bool,
}

impl<'a> Text<'a> {
    /// The string's value: borrowed unless it has escapes.
    pub fn value(&self) -> Cow<'a, str> {
        if self.escaped {
            Cow::Owned(unescape(self.raw))
        } else {
            Cow::Borrowed(self.raw)
        }
    }
}

/// The members of an object, in document order (a repeated key is kept: the last one counts).
pub type Members<'a> = Vec<(Cow<'a, str>, Raw<'a>)>;

/// The members of the object that is the whole of `record` (whitespace around it allowed), into
/// `members` (cleared first). None if `record` is not valid JSON or not an object.
pub fn object_members<'a>(record: &'a [u8], members: &mut Members<'a>) -> Option<()> {
    // one UTF-8 check of the whole record (SIMD): strings are then slices of valid text
    let text = simdutf8::basic::from_utf8(record).ok()?;
    let mut scan = Scan::new(text);
    scan.space();
    scan.expect(b'{')?;
    scan.depth = 1;
    members.clear();
    scan.members(members)?;
    scan.space();
    (scan.at == scan.bytes.len()).then_some(())
}

/// The members of `object`, a `Raw::Obj`'s text (already checked).
pub fn members_of<'a>(object: &'a str, members: &mut Members<'a>) -> Option<()> {
    let mut scan = Scan::new(object);
    scan.expect(b'{')?;
    scan.depth = 1;
    members.clear();
    scan.members(members)
}

/// `value` as compact JSON as `orjson.dumps` writes what `orjson.loads` gives for it; None where
/// that is not certain (a repeated key, `-0`): the Python path then decides.
pub fn dump(value: &Raw, out: &mut Vec<u8>) -> Option<()> {
    match *value {
        Raw::Obj(text) | Raw::Arr(text) => Scan::new(text).dump_container(out),
        Raw::Null => {
            out.extend_from_slice(b"null");
            Some(())
        }
        Raw::Bool(b) => {
            out.extend_from_slice(if b { b"true" } else { b"false" });
            Some(())
        }
        Raw::Int(v) => {
            out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
            Some(())
        }
        Raw::UInt(v) => {
            out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
            Some(())
        }
        Raw::Float(f) => dump_float(f, out),
        Raw::Str(text) => {
            dump_text(text, out);
            Some(())
        }
    }
}

fn dump_float(f: f64, out: &mut Vec<u8>) -> Option<()> {
    // read as the float -0.0 here, as the integer 0 by orjson: ambiguous
    if f == 0.0 && f.is_sign_negative() {
        return None;
    }
    push_float(f, out);
    Some(())
}

fn dump_text(text: Text, out: &mut Vec<u8>) {
    if text.escaped {
        escape(unescape(text.raw).as_bytes(), out);
    } else {
        // nothing in it needs escaping (checked when scanned)
        out.reserve(text.raw.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.raw.as_bytes());
        out.push(b'"');
    }
}

struct Scan<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
    depth: u32,
}

impl<'a> Scan<'a> {
    fn new(text: &'a str) -> Scan<'a> {
        Scan {
            text,
            bytes: text.as_bytes(),
            at: 0,
            depth: 0,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn space(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// After an object's `{`: its members up to and including the `}`.
    fn members(&mut self, members: &mut Members<'a>) -> Option<()> {
        self.space();
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        loop {
            self.space();
            self.expect(b'"')?;
            let key = self.string()?.value();
            self.space();
            self.expect(b':')?;
            self.space();
            members.push((key, self.value()?));
            self.space();
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// The value that starts here (after any whitespace).
    fn value(&mut self) -> Option<Raw<'a>> {
        let start = self.at;
        match self.peek()? {
            b'"' => {
                self.at += 1;
                self.string().map(Raw::Str)
            }
            open @ (b'{' | b'[') => {
                self.container(open)?;
                let text = &self.text[start..self.at];
                Some(if open == b'{' {
                    Raw::Obj(text)
                } else {
                    Raw::Arr(text)
                })
            }
            b't' => self.literal(b"true", Raw::Bool(true)),
            b'f' => self.literal(b"false", Raw::Bool(false)),
            b'n' => self.literal(b"null", Raw::Null),
            _ => self.number(),
        }
    }

    fn literal(&mut self, word: &[u8], value: Raw<'a>) -> Option<Raw<'a>> {
        self.bytes[self.at..].starts_with(word).then(|| {
            self.at += word.len();
            value
        })
    }

    /// Checks the array or object that starts here and moves past it.
    fn container(&mut self, open: u8) -> Option<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return None;
        }
        self.at += 1;
        let close = if open == b'{' { b'}' } else { b']' };
        self.space();
        if self.peek()? == close {
            self.at += 1;
        } else {
            loop {
                self.space();
                if open == b'{' {
                    self.expect(b'"')?;
                    self.string()?;
                    self.space();
                    self.expect(b':')?;
                    self.space();
                }
                self.value()?;
                self.space();
                match self.peek()? {
                    b',' => self.at += 1,
                    b if b == close => {
                        self.at += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        self.depth -= 1;
        Some(())
    }

    /// After a string's opening quote: checks it up to its closing quote, which it moves past.
    fn string(&mut self) -> Option<Text<'a>> {
        let start = self.at;
        let mut escaped = false;
        loop {
            let stop = self.at + first_escaped(&self.bytes[self.at..])?;
            match self.bytes[stop] {
                b'"' => {
                    self.at = stop + 1;
                    return Some(Text {
                        raw: &self.text[start..stop],
                        escaped,
                    });
                }
                b'\\' => {
                    escaped = true;
                    self.at = stop + 1 + escape_length(&self.bytes[stop + 1..])?;
                }
                _ => return None, // a control character
            }
        }
    }

    fn number(&mut self) -> Option<Raw<'a>> {
        let start = self.at;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.at += 1;
        }
        let digits_from = self.at;
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        let digits_to = self.at;
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.one_or_more_digits()?;
            integer = false;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.one_or_more_digits()?;
            integer = false;
        }
        let text = &self.text[start..self.at];
        if integer {
            // as orjson reads integers: i64, else u64, else a double; `-0` and
            // negatives below i64::MIN are doubles
            if let Ok(magnitude) = self.text[digits_from..digits_to].parse::<u64>() {
                if !negative {
                    return Some(i64::try_from(magnitude).map_or(Raw::UInt(magnitude), Raw::Int));
                }
                let value = (magnitude as i64).wrapping_neg();
                if value < 0 {
                    return Some(Raw::Int(value));
                }
            }
        }
        let value: f64 = text.parse().ok()?;
        value.is_finite().then_some(Raw::Float(value))
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }

    fn one_or_more_digits(&mut self) -> Option<()> {
        let from = self.at;
        self.digits();
        (self.at > from).then_some(())
    }

    /// The object or array that starts here, written as `dump` writes it.
    fn dump_container(&mut self, out: &mut Vec<u8>) -> Option<()> {
        if self.peek()? == b'{' {
            self.at += 1;
            let mut members = Members::new();
            self.members(&mut members)?;
            out.push(b'{');
            for (i, (key, value)) in members.iter().enumerate() {
                // a repeated key keeps its first place and its last value in Python
                if members[..i].iter().any(|(k, _)| k == key) {
                    return None;
                }
                if i > 0 {
                    out.push(b',');
                }
                escape(key.as_bytes(), out);
                out.push(b':');
                dump(value, out)?;
            }
            out.push(b'}');
            return Some(());
        }
        self.expect(b'[')?;
        out.push(b'[');
        self.space();
        if self.peek()? == b']' {
            self.at += 1;
        } else {
            loop {
                self.space();
                dump(&self.value()?, out)?;
                self.space();
                match self.peek()? {
                    b',' => {
                        self.at += 1;
                        out.push(b',');
                    }
                    b']' => {
                        self.at += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        out.push(b']');
        Some(())
    }
}

/// How many bytes after a backslash its escape takes; None if it is not a valid escape (a lone
/// surrogate included).
fn escape_length(after: &[u8]) -> Option<usize> {
    match *after.first()? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(1),
        b'u' => match hex4(&after[1..])? {
            0xD800..=0xDBFF => match after.get(5..7)? {
                b"\\u" if (0xDC00..=0xDFFF).contains(&hex4(&after[7..])?) => Some(11),
                _ => None,
            },
            0xDC00..=0xDFFF => None,
            _ => Some(5),
        },
        _ => None,
    }
}

fn hex4(bytes: &[u8]) -> Option<u32> {
    let digits = bytes.get(..4)?;
    digits
        .iter()
        .try_fold(0, |code, &b| Some(code * 16 + (b as char).to_digit(16)?))
}

/// The value of a string's text that `Scan::string` checked.
fn unescape(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut value = String::with_capacity(raw.len());
    let mut at = 0;
    while let Some(i) = bytes[at..].iter().position(|&b| b == b'\\') {
        value.push_str(&raw[at..at + i]);
        let escape = at + i + 1;
        let length = escape_length(&bytes[escape..]).expect("a checked escape");
        value.push(match bytes[escape] {
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let code = hex4(&bytes[escape + 1..]).unwrap();
                let code = if length == 11 {
                    let low = hex4(&bytes[escape + 7..]).unwrap();
                    0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                } else {
                    code
                };
                char::from_u32(code).expect("surrogates come in pairs")
            }
            other => other as char, // `"`, `\\` or `/`
        });
        at = escape + length;
    }
    value.push_str(&raw[at..]);
    value
}

/// A float as orjson writes it: ryu's shortest round-trip digits and layout (plain from 1e-5 up to
/// 1e16, else with an exponent), with a `+` in positive exponents (`1e+16`, `1e-7`).
pub fn push_float(f: f64, out: &mut Vec<u8>) {
    let mut buffer = ryu::Buffer::new();
    let text = buffer.format_finite(f).as_bytes();
    match text.iter().position(|&c| c == b'e') {
        Some(e) if text[e + 1] != b'-' => {
            out.extend_from_slice(&text[..=e]);
            out.push(b'+');
            out.extend_from_slice(&text[e + 1..]);
        }
        _ => out.extend_from_slice(text),
    }
}

/// Bytes that JSON text must escape: `"`, `\\` and the control characters.
const fn escaped_bytes() -> [bool; 256] {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
}

static ESCAPED: [bool; 256] = escaped_bytes();

/// Where the first byte of `text` that JSON must escape is, if any: a string's end (or an escape)
/// when reading, the next escape when writing. Most values (user agents, URLs, ids) have none,
/// and a byte-by-byte scan was the encoder's largest cost: sixteen bytes at a time (SSE2, which
/// every x86-64 has), then eight, then one by one.
fn first_escaped(text: &[u8]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    let at = {
        let at = text.len() / 16 * 16;
        if let Some(found) = first_escaped_sse2(&text[..at]) {
            return Some(found);
        }
        at
    };
    #[cfg(not(target_arch = "x86_64"))]
    let at = 0;
    first_escaped_swar(&text[at..]).map(|i| at + i)
}

/// `first_escaped` of a text whose length is a multiple of 16.
#[cfg(target_arch = "x86_64")]
fn first_escaped_sse2(text: &[u8]) -> Option<usize> {
    use std::arch::x86_64::*;
    debug_assert_eq!(text.len() % 16, 0);
    // SAFETY: SSE2 is part of x86-64; every load reads 16 bytes inside `text`
    unsafe {
        let quote = _mm_set1_epi8(b'"' as i8);
        let backslash = _mm_set1_epi8(b'\\' as i8);
        let below_space = _mm_set1_epi8(0x1f);
        for (i, chunk) in text.chunks_exact(16).enumerate() {
            let bytes = _mm_loadu_si128(chunk.as_ptr().cast());
            // unsigned b <= 0x1f exactly when max(b, 0x1f) == 0x1f
            let control = _mm_cmpeq_epi8(_mm_max_epu8(bytes, below_space), below_space);
            let special = _mm_or_si128(
                control,
                _mm_or_si128(
                    _mm_cmpeq_epi8(bytes, quote),
                    _mm_cmpeq_epi8(bytes, backslash),
                ),
            );
            let mask = _mm_movemask_epi8(special);
            if mask != 0 {
                return Some(i * 16 + mask.trailing_zeros() as usize);
            }
        }
    }
    None
}

/// `first_escaped` eight bytes at a time, in portable code.
fn first_escaped_swar(text: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // the lowest flagged byte of each test is exact (borrows only run upwards), so the lowest
    // flagged byte of all three is the first match
    let flags = |word: u64| {
        let zero_in = |v: u64| v.wrapping_sub(ONES) & !v;
        let control = word.wrapping_sub(ONES * 0x20) & !word;
        (control | zero_in(word ^ (ONES * b'"' as u64)) | zero_in(word ^ (ONES * b'\\' as u64)))
            & HIGHS
    };
    let mut chunks = text.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let found = flags(u64::from_le_bytes(chunk.try_into().unwrap()));
        if found != 0 {
            return Some(at + found.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    let rest = chunks.remainder();
    rest.iter()
        .position(|&b| ESCAPED[b as usize])
        .map(|i| at + i)
}

/// UTF-8 `text` as a JSON string, escaped as orjson does (`\\n` and friends, else `\\u00xx`;
/// nothing else).
pub fn escape(text: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(text.len() + 2);
    out.push(b'"');
    let mut start = 0;
    while let Some(at) = first_escaped(&text[start..]) {
        let i = start + at;
        out.extend_from_slice(&text[start..i]);
        let b = text[i];
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xf) as usize],
            ]),
        }
        start = i + 1;
    }
    out.extend_from_slice(&text[start..]);
    out.push(b'"');
}
