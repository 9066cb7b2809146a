//! The Kafka sink's record values: each row of a frame as compact JSON, byte for byte what
//! `orjson.dumps` writes for the row's `as_dicts` dict (`connectors/kafka.py` is the
//! specification): datetimes (UTC or naive) as `YYYY-MM-DDTHH:MM:SS.mmmZ`, float32 widened to
//! float64, NaN and infinities as null.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::json::{escape, push_float};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    TextView, // Arrow's string_view (polars' own layout): 16-byte views, long values in blocks
    Int(usize, bool), // width in bytes, signed
    Float32,
    Float64,
    Bool,
    Timestamp(i64), // UTC or naive, in units of 1/n s: written as ISO text with milliseconds
    Null,
}

impl Kind {
    fn parse(name: &str) -> PyResult<Kind> {
        Ok(match name {
            "string_view" => Kind::TextView,
            "int8" => Kind::Int(1, true),
            "int16" => Kind::Int(2, true),
            "int32" => Kind::Int(4, true),
            "int64" => Kind::Int(8, true),
            "uint8" => Kind::Int(1, false),
            "uint16" => Kind::Int(2, false),
            "uint32" => Kind::Int(4, false),
            "uint64" => Kind::Int(8, false),
            "float" => Kind::Float32,
            "double" => Kind::Float64,
            "bool" => Kind::Bool,
            "null" => Kind::Null,
            other => {
                let unit = other
                    .strip_prefix("timestamp[")
                    .and_then(|t| t.strip_suffix(", tz=UTC]").or_else(|| t.strip_suffix("]")));
                match unit {
                    Some("ms") => Kind::Timestamp(1_000),
                    Some("us") => Kind::Timestamp(1_000_000),
                    Some("ns") => Kind::Timestamp(1_000_000_000),
                    _ => return Err(PyValueError::new_err(format!("unsupported type {other}"))),
                }
            }
        })
    }

    /// Bytes per value in the values buffer (0: bit-packed, or none).
    fn width(self) -> usize {
        match self {
            Kind::Int(width, _) => width,
            Kind::Float32 => 4,
            Kind::Float64 | Kind::Timestamp(_) => 8,
            Kind::TextView => 16,
            Kind::Bool | Kind::Null => 0,
        }
    }
}

/// An Arrow buffer by address and size, as pyarrow's `Buffer.address` / `.size` give it.
pub(crate) type RawBuffer = Option<(usize, usize)>;

struct Column<'a> {
    key: Vec<u8>, // `"name":`
    kind: Kind,
    offset: usize, // of the array into its buffers
    validity: Option<&'a [u8]>,
    data: &'a [u8],        // text: the views
    blocks: Vec<&'a [u8]>, // text: the data buffers long values point into
}

pub(crate) fn bit(bits: &[u8], i: usize) -> bool {
    bits[i / 8] & (1 << (i % 8)) != 0
}

fn le<const N: usize>(data: &[u8], i: usize) -> [u8; N] {
    data[i * N..(i + 1) * N].try_into().unwrap()
}

impl Column<'_> {
    fn millis(&self, i: usize, per_second: i64) -> i64 {
        i64::from_le_bytes(le(self.data, i)).div_euclid(per_second / 1000)
    }

    fn is_null(&self, i: usize) -> bool {
        self.kind == Kind::Null || self.validity.is_some_and(|v| !bit(v, i))
    }

    /// Fails where `write` would fail for `row` (a view outside its buffers, a timestamp outside
    /// years 0-9999), without writing.
    fn check(&self, row: usize) -> PyResult<()> {
        let i = self.offset + row;
        match self.kind {
            _ if self.is_null(i) => {}
            Kind::TextView => {
                self.view(i)?;
            }
            Kind::Timestamp(per_second) => within_iso_years(self.millis(i, per_second))?,
            _ => {}
        }
        Ok(())
    }

    fn write(&self, row: usize, out: &mut Vec<u8>) -> PyResult<()> {
        let i = self.offset + row;
        if self.is_null(i) {
            out.extend_from_slice(b"null");
            return Ok(());
        }
        match self.kind {
            Kind::TextView => escape(self.view(i)?, out),
            Kind::Int(1, true) => int(i8::from_le_bytes(le(self.data, i)), out),
            Kind::Int(2, true) => int(i16::from_le_bytes(le(self.data, i)), out),
            Kind::Int(4, true) => int(i32::from_le_bytes(le(self.data, i)), out),
            Kind::Int(8, true) => int(i64::from_le_bytes(le(self.data, i)), out),
            Kind::Int(1, false) => int(self.data[i], out),
            Kind::Int(2, false) => int(u16::from_le_bytes(le(self.data, i)), out),
            Kind::Int(4, false) => int(u32::from_le_bytes(le(self.data, i)), out),
            Kind::Int(_, _) => int(u64::from_le_bytes(le(self.data, i)), out),
            Kind::Float32 => float(f32::from_le_bytes(le(self.data, i)) as f64, out),
            Kind::Float64 => float(f64::from_le_bytes(le(self.data, i)), out),
            Kind::Bool => out.extend_from_slice(if bit(self.data, i) { b"true" } else { b"false" }),
            Kind::Timestamp(per_second) => write_iso_millis(self.millis(i, per_second), out)?,
            Kind::Null => unreachable!(),
        }
        Ok(())
    }
}

/// Rows ahead of the one being written whose values `Column::prefetch` asks for: a string's text
/// is fetched once its view has arrived (asked for `PREFETCH_ROWS` rows before).
const PREFETCH_ROWS: usize = 32;

impl<'a> Column<'a> {
    /// Asks the CPU to start fetching what writing rows ahead of `row` will read.
    #[inline]
    fn prefetch(&self, row: usize) {
        let i = self.offset + row;
        let width = self.kind.width();
        if width > 0 {
            prefetch(self.data, (i + PREFETCH_ROWS) * width);
        }
        let near = i + PREFETCH_ROWS / 2;
        if self.kind == Kind::TextView && (near + 1) * 16 <= self.data.len() {
            let view = &self.data[near * 16..near * 16 + 16];
            if u32::from_le_bytes(le(view, 0)) > 12 {
                let block = u32::from_le_bytes(le(view, 2)) as usize;
                if let Some(data) = self.blocks.get(block) {
                    prefetch(data, u32::from_le_bytes(le(view, 3)) as usize);
                }
            }
        }
    }

    /// The bytes of view `i`: inline up to 12 bytes, else (block, offset) into the blocks.
    fn view(&self, i: usize) -> PyResult<&'a [u8]> {
        let view: &'a [u8] = &self.data[i * 16..i * 16 + 16];
        let length = u32::from_le_bytes(le(view, 0)) as usize;
        if length <= 12 {
            return Ok(&view[4..4 + length]);
        }
        let block = u32::from_le_bytes(le(view, 2)) as usize;
        let start = u32::from_le_bytes(le(view, 3)) as usize;
        self.blocks
            .get(block)
            .and_then(|data| data.get(start..start + length))
            .ok_or_else(|| PyValueError::new_err("a string view points outside its buffers"))
    }
}

/// A hint to fetch the cache line of `data[at]` (nothing if `at` is past the end).
#[inline]
fn prefetch(data: &[u8], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if at < data.len() {
        // SAFETY: a prefetch of an address inside `data`; it reads nothing and cannot fault
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().add(at).cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at);
}

fn int(value: impl itoa::Integer, out: &mut Vec<u8>) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

fn float(f: f64, out: &mut Vec<u8>) {
    if f.is_finite() {
        push_float(f, out);
    } else {
        out.extend_from_slice(b"null"); // as orjson writes NaN and infinities
    }
}

/// 0000-01-01T00:00:00.000Z and 9999-12-31T23:59:59.999Z: the years `write_iso_millis` writes.
const MIN_ISO_MS: i64 = -62_167_219_200_000;
const MAX_ISO_MS: i64 = 253_402_300_799_999;

fn within_iso_years(ms: i64) -> PyResult<()> {
    if !(MIN_ISO_MS..=MAX_ISO_MS).contains(&ms) {
        return Err(PyValueError::new_err(format!(
            "timestamp {ms} ms is outside years 0-9999"
        )));
    }
    Ok(())
}

/// `ms` as `%Y-%m-%dT%H:%M:%S%.3fZ`; years 0 to 9999 only (polars writes others differently).
pub(crate) fn iso_millis(ms: i64) -> PyResult<[u8; 24]> {
    within_iso_years(ms)?;
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    // civil_from_days (Howard Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    debug_assert!((0..=9999).contains(&year));
    let mut text = *b"0000-00-00T00:00:00.000Z";
    let fields = [
        (0, 4, year),
        (5, 2, month),
        (8, 2, day),
        (11, 2, in_day / 3_600_000),
        (14, 2, in_day / 60_000 % 60),
        (17, 2, in_day / 1000 % 60),
        (20, 3, in_day % 1000),
    ];
    for (at, width, mut value) in fields {
        for position in (at..at + width).rev() {
            text[position] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    Ok(text)
}

/// `iso_millis` as a JSON string.
pub(crate) fn write_iso_millis(ms: i64, out: &mut Vec<u8>) -> PyResult<()> {
    let mut quoted = [b'"'; 26];
    quoted[1..25].copy_from_slice(&iso_millis(ms)?);
    out.extend_from_slice(&quoted);
    Ok(())
}

pub(crate) fn buffer<'a>(raw: RawBuffer, needed: usize, what: &str) -> PyResult<&'a [u8]> {
    let Some((address, size)) = raw else {
        if needed == 0 {
            return Ok(&[]); // e.g. the data of a text column whose values are all empty
        }
        return Err(PyValueError::new_err(format!("{what}: buffer missing")));
    };
    if size < needed {
        return Err(PyValueError::new_err(format!(
            "{what}: buffer of {size} bytes, need {needed}"
        )));
    }
    if size == 0 {
        return Ok(&[]);
    }
    // SAFETY: the caller passes the addresses of live pyarrow buffers of at least `size` bytes
    // and keeps their table alive for the duration of this call.
    Ok(unsafe { std::slice::from_raw_parts(address as *const u8, size) })
}

/// A column of a frame as Python hands it over: (name, Arrow type name, array offset, buffers as
/// pyarrow lists them).
pub(crate) type ColumnSpec = (String, String, usize, Vec<RawBuffer>);

/// JSON objects of the rows of a frame's columns.
pub(crate) struct RowEncoder<'a> {
    columns: Vec<Column<'a>>,
}

impl<'a> RowEncoder<'a> {
    /// The encoder of `length` rows of `columns` (buffers checked to hold them).
    pub(crate) fn new(length: usize, columns: Vec<ColumnSpec>) -> PyResult<RowEncoder<'a>> {
        let mut parsed = Vec::with_capacity(columns.len());
        for (i, (name, type_name, offset, buffers)) in columns.into_iter().enumerate() {
            let mut key = Vec::from(if i == 0 { "{" } else { "," });
            escape(name.as_bytes(), &mut key);
            key.push(b':');
            parsed.push(Column::new(
                key, &name, &type_name, offset, length, &buffers,
            )?);
        }
        Ok(RowEncoder { columns: parsed })
    }

    /// Fails as `write` would for one of the `length` rows, without writing any: a caller that
    /// must not stop half-way checks first.
    pub(crate) fn check(&self, length: usize) -> PyResult<()> {
        for column in &self.columns {
            for row in 0..length {
                column.check(row)?;
            }
        }
        Ok(())
    }

    /// Row `row` as one JSON object, appended to `out`.
    pub(crate) fn write(&self, row: usize, out: &mut Vec<u8>) -> PyResult<()> {
        // A frame's columns are far apart in memory and a row reads one value of each: without
        // asking ahead, most of the encoder's time went into waiting for those reads.
        for column in &self.columns {
            column.prefetch(row);
        }
        for column in &self.columns {
            out.extend_from_slice(&column.key);
            column.write(row, out)?;
        }
        out.extend_from_slice(if self.columns.is_empty() { b"{}" } else { b"}" });
        Ok(())
    }
}

/// `bytes` as text; ASCII (most ids) is checked a word at a time, faster than a UTF-8 check.
fn utf8(bytes: &[u8]) -> PyResult<&str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is UTF-8.
        return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes).map_err(|_| PyValueError::new_err("text is not UTF-8"))
}

/// The bytes of the values of a text column (string_view), None for a null: message keys.
pub(crate) struct TextColumn<'a>(Column<'a>);

impl<'a> TextColumn<'a> {
    pub(crate) fn new(
        length: usize,
        (name, type_name, offset, buffers): ColumnSpec,
    ) -> PyResult<Self> {
        let column = Column::new(Vec::new(), &name, &type_name, offset, length, &buffers)?;
        if column.kind != Kind::TextView {
            return Err(PyValueError::new_err(format!(
                "{name}: {type_name} is not string_view"
            )));
        }
        let column = TextColumn(column);
        for row in 0..length {
            column.get(row)?; // every view within the buffers: `get` cannot fail later
        }
        Ok(column)
    }

    /// `get` as text (Arrow text is UTF-8; checked all the same).
    pub(crate) fn get_str(&self, row: usize) -> PyResult<Option<&'a str>> {
        self.get(row)?.map(utf8).transpose()
    }

    pub(crate) fn get(&self, row: usize) -> PyResult<Option<&'a [u8]>> {
        let i = self.0.offset + row;
        if self.0.validity.is_some_and(|v| !bit(v, i)) {
            return Ok(None);
        }
        self.0.view(i).map(Some)
    }
}

impl<'a> Column<'a> {
    fn new(
        key: Vec<u8>,
        name: &str,
        type_name: &str,
        offset: usize,
        length: usize,
        buffers: &[RawBuffer],
    ) -> PyResult<Column<'a>> {
        let kind = Kind::parse(type_name)?;
        let end = offset + length;
        let validity = match buffers.first() {
            Some(Some(_)) if kind != Kind::Null => Some(buffer(buffers[0], end.div_ceil(8), name)?),
            _ => None,
        };
        let data = match kind {
            Kind::Null => &[][..],
            Kind::Bool => buffer(*buffers.get(1).unwrap_or(&None), end.div_ceil(8), name)?,
            _ => buffer(*buffers.get(1).unwrap_or(&None), end * kind.width(), name)?,
        };
        // Arrow text is UTF-8 (pyarrow and polars check it)
        let blocks = match kind {
            Kind::TextView => buffers[2.min(buffers.len())..]
                .iter()
                .map(|raw| buffer(*raw, 0, name))
                .collect::<PyResult<_>>()?,
            _ => Vec::new(),
        };
        Ok(Column {
            key,
            kind,
            offset,
            validity,
            data,
            blocks,
        })
    }
}

/// `length` rows of `columns` as one JSON object each.
#[pyfunction]
pub fn json_rows<'py>(
    py: Python<'py>,
    length: usize,
    columns: Vec<ColumnSpec>,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let encoder = RowEncoder::new(length, columns)?;
    let mut rows = Vec::with_capacity(length);
    let mut out = Vec::with_capacity(1024);
    for row in 0..length {
        out.clear();
        encoder.write(row, &mut out)?;
        rows.push(PyBytes::new(py, &out));
    }
    Ok(rows)
}
