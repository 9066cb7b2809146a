//! A parsed JSON document that borrows its strings from the input where it can (no escapes), and
//! keeps object members as a list in document order: cheaper to build than `serde_json::Value`.
//! serde_json does the parsing, so what it rejects (invalid UTF-8, lone surrogates, numbers out of
//! range, trailing characters, nesting deeper than 128) is rejected here too.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, Error, MapAccess, SeqAccess, Visitor};

pub enum Json<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64), // above i64::MAX
    Float(f64),
    Str(Cow<'a, str>),
    Arr(Vec<Json<'a>>),
    Obj(Vec<(Cow<'a, str>, Json<'a>)>), // duplicates kept: the last one counts
}

impl<'a> Json<'a> {
    pub fn parse(raw: &'a [u8]) -> Option<Json<'a>> {
        // One UTF-8 check of the whole record (SIMD) instead of one per string as `from_slice`
        // makes: the same records pass, in less time.
        serde_json::from_str(simdutf8::basic::from_utf8(raw).ok()?).ok()
    }

    /// An integer as Python holds it (within i64).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Json::Int(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value of `key` in an object (the last one, as for a Python dict).
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Obj(members) => members.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(Json::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(i64::try_from(v).map_or(Json::UInt(v), Json::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Json<'de>, E> {
        Ok(Json::Float(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Owned(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Arr(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        // most objects of an event have a few to a dozen members: no regrowing for them
        let mut members = Vec::with_capacity(16);
        while let Some(Key(key)) = map.next_key()? {
            members.push((key, map.next_value()?));
        }
        Ok(Json::Obj(members))
    }
}

/// An object key, borrowed when it has no escapes (serde's own `Cow<str>` always copies).
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match deserializer.deserialize_str(JsonVisitor)? {
            Json::Str(key) => Ok(Key(key)),
            _ => Err(D::Error::custom("an object key that is not a string")),
        }
    }
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

/// Where the first byte of `text` that JSON must escape is, if any. Eight bytes at a time: most
/// values (user agents, URLs, ids) have none, and a byte-by-byte scan was the encoder's largest
/// cost.
fn first_escaped(text: &[u8]) -> Option<usize> {
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
