//! Compiled hot paths of the pipeline, each with a Python specification it is tested against:
//! contract validation (`operators/validate.py`, here), the Kafka sink's JSON values
//! (`connectors/kafka.py`, in `encode`), the session and window tables (`operators/sessions.py`
//! and `operators/windows.py`, in `sessions` and `windows`) and enrichment's distinct values
//! (`operators/enrich.py`, in `dictionary`).
//!
//! `ContractDecoder.decode` takes a batch of raw record values and returns the rows of the records
//! it accepts as Arrow-layout column buffers, plus the indices of the records it defers. It accepts
//! a record only when the Python path would accept it and build exactly the same row; everything
//! else (invalid JSON, a failed check, a timestamp layout or a value it does not handle) is
//! deferred, and the Python path decides it, DLQ reason and message included. So this module never
//! rejects anything itself and has no error messages to keep in step.

use std::borrow::Cow;
use std::collections::HashMap;

use rustc_hash::FxHashMap;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

mod chunk_log;
mod columns;
mod consumer;
mod dictionary;
mod encode;
mod json;
mod producer;
mod rdkafka;
mod sessions;
mod shard_events;
mod windows;
use columns::{Column, SAMPLE_ROWS};
use json::{dump, members_of, object_members, Members, Raw};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    Num,
    Bool,
    Obj,
    Arr,
    Timestamp,
}

impl Kind {
    fn parse(name: &str) -> PyResult<Kind> {
        Ok(match name {
            "string" => Kind::Str,
            "integer" => Kind::Int,
            "number" => Kind::Num,
            "boolean" => Kind::Bool,
            "object" => Kind::Obj,
            "array" => Kind::Arr,
            "timestamp" => Kind::Timestamp,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown field type {other:?}"
                )))
            }
        })
    }
}

/// The layout of an output column.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    Text,
    Int32,
    Millis,
}

struct Field {
    name: String,
    kind: Kind,
    required: bool,
    members: Option<Vec<Field>>,
    slot: Option<usize>, // output column this field fills
    envelope: bool,      // top-level schema_urn / version: matched when the contract was chosen
}

/// A value of the row being built; borrowed from the parsed document where it can be.
enum Cell<'a> {
    Null,
    Str(&'a str),
    Owned(String),
    Int(i64),
}

impl<'a> Cell<'a> {
    /// A string's value: borrowed from the record unless it had escapes.
    fn text(value: Cow<'a, str>) -> Cell<'a> {
        match value {
            Cow::Borrowed(s) => Cell::Str(s),
            Cow::Owned(s) => Cell::Owned(s),
        }
    }

    fn as_text(&self) -> Option<&str> {
        match self {
            Cell::Str(s) => Some(s),
            Cell::Owned(s) => Some(s.as_str()),
            _ => None,
        }
    }
}

impl ColumnKind {
    /// An empty column of this kind; text values that lie in `shared` are not copied.
    fn column(self, capacity: usize, shared: &[u8]) -> Column {
        match self {
            ColumnKind::Text => Column::views(capacity, shared),
            ColumnKind::Int32 => Column::fixed(4, capacity),
            ColumnKind::Millis => Column::fixed(8, capacity),
        }
    }

    /// Appends a cell that `ContractDecoder::fields` found to fit a column of this kind.
    fn push(self, column: &mut Column, cell: &Cell) {
        let valid = !matches!(cell, Cell::Null);
        let value = if let Cell::Int(v) = cell { *v } else { 0 };
        match self {
            ColumnKind::Text => column.push_text(cell.as_text()),
            ColumnKind::Int32 => column.push_value((value as i32).to_le_bytes(), valid),
            ColumnKind::Millis => column.push_value(value.to_le_bytes(), valid),
        }
    }
}

/// One contract: its fields in declared order, each knowing the column it fills.
struct Contract {
    fields: Vec<Field>,
}

#[pyclass(frozen)]
struct ContractDecoder {
    contracts: Vec<Contract>,
    by_urn: FxHashMap<String, Vec<(i64, usize)>>, // urn → (version, contract)
    columns: Vec<ColumnKind>,
    event_id: usize, // column of the event id (seed of a derived correlation id)
    correlation_id: usize, // column of the correlation id
    namespace: Vec<u8>, // uuid5 namespace of derived correlation ids
    max_bytes: usize, // larger records are deferred (the Python path rejects them unread)
    min_ms: i64,
    max_ms: i64, // exclusive
}

/// (schema_urn, version, fields, {column: dotted path of the field that fills it})
type ContractSpec<'py> = (String, i64, Bound<'py, PyAny>, HashMap<String, String>);
type FieldSpec<'py> = (String, String, bool, Option<Bound<'py, PyAny>>);

fn build_fields(
    specs: &Bound<PyAny>,
    prefix: &str,
    paths: &HashMap<String, usize>,
    columns: &[ColumnKind],
    top: bool,
) -> PyResult<Vec<Field>> {
    let mut fields = Vec::new();
    for spec in specs.try_iter()? {
        let (name, kind, required, members): FieldSpec = spec?.extract()?;
        let kind = Kind::parse(&kind)?;
        let path = format!("{prefix}{name}");
        let slot = paths.get(&path).copied();
        let envelope = top && (name == "schema_urn" || name == "version");
        let members = match members {
            Some(m) if kind == Kind::Obj => Some(build_fields(
                &m,
                &format!("{path}."),
                paths,
                columns,
                false,
            )?),
            _ => None,
        };
        if let Some(slot) = slot {
            let fits = match columns[slot] {
                ColumnKind::Text => {
                    matches!(kind, Kind::Str | Kind::Obj | Kind::Arr) && members.is_none()
                }
                ColumnKind::Int32 => kind == Kind::Int,
                ColumnKind::Millis => kind == Kind::Timestamp,
            };
            if !fits {
                return Err(PyValueError::new_err(format!(
                    "field {path:?} cannot fill its column"
                )));
            }
        }
        if envelope
            && !matches!(
                (name.as_str(), kind),
                ("schema_urn", Kind::Str) | ("version", Kind::Int)
            )
        {
            return Err(PyValueError::new_err(format!(
                "envelope field {path:?} has an unexpected type"
            )));
        }
        fields.push(Field {
            name,
            kind,
            required,
            members,
            slot,
            envelope,
        });
    }
    Ok(fields)
}

#[pymethods]
impl ContractDecoder {
    /// `columns`: (name, "text" | "int32" | "millis") of the output; `contracts`: (schema_urn,
    /// version, fields, {column: dotted path}), fields as (name, type, required, members or None).
    #[new]
    #[pyo3(signature = (columns, contracts, namespace, max_bytes, min_ms, max_ms))]
    fn new(
        columns: Vec<(String, String)>,
        contracts: Vec<ContractSpec>,
        namespace: Vec<u8>,
        max_bytes: usize,
        min_ms: i64,
        max_ms: i64,
    ) -> PyResult<Self> {
        let mut kinds = Vec::new();
        let mut index = HashMap::new();
        for (i, (name, kind)) in columns.iter().enumerate() {
            kinds.push(match kind.as_str() {
                "text" => ColumnKind::Text,
                "int32" => ColumnKind::Int32,
                "millis" => ColumnKind::Millis,
                other => {
                    return Err(PyValueError::new_err(format!(
                        "unknown column kind {other:?}"
                    )))
                }
            });
            index.insert(name.clone(), i);
        }
        let column = |name: &str| {
            index
                .get(name)
                .copied()
                .ok_or_else(|| PyValueError::new_err(format!("no column {name:?}")))
        };
        let (event_id, correlation_id) = (column("event_id")?, column("correlation_id")?);
        if kinds[event_id] != ColumnKind::Text || kinds[correlation_id] != ColumnKind::Text {
            return Err(PyValueError::new_err(
                "event_id and correlation_id must be text columns",
            ));
        }
        let mut built = Vec::new();
        let mut by_urn: FxHashMap<String, Vec<(i64, usize)>> = FxHashMap::default();
        for (urn, version, fields, paths) in contracts {
            let mut slots = HashMap::new();
            for (col, path) in paths {
                slots.insert(path, column(&col)?);
            }
            let fields = build_fields(&fields, "", &slots, &kinds, true)?;
            if !fields
                .iter()
                .any(|f| f.name == "event_id" && f.slot == Some(event_id))
            {
                return Err(PyValueError::new_err(format!(
                    "{urn} v{version}: no event_id field"
                )));
            }
            by_urn.entry(urn).or_default().push((version, built.len()));
            built.push(Contract { fields });
        }
        Ok(ContractDecoder {
            contracts: built,
            by_urn,
            columns: kinds,
            event_id,
            correlation_id,
            namespace,
            max_bytes,
            min_ms,
            max_ms,
        })
    }

    /// `values`: the raw records. Returns (indices of the deferred records, one column per
    /// output column for the accepted ones, in record order). A text column is a string view
    /// column as (data, views, validity) whose views point into the data only (`decode_packed`:
    /// also into its `values`, as buffer 0).
    fn decode<'py>(
        &self,
        py: Python<'py>,
        values: Vec<Bound<'py, PyAny>>,
    ) -> PyResult<(Vec<usize>, Vec<Bound<'py, PyTuple>>)> {
        let records: Vec<Option<&[u8]>> = values
            .iter()
            .map(|value| {
                value
                    .downcast::<PyBytes>()
                    .ok()
                    .map(|bytes| bytes.as_bytes())
            })
            .collect();
        self.decode_records(py, values.len(), records.into_iter(), &[], None)
    }

    /// As `decode`, of records one after the other in `values`, each ending where `ends` (an
    /// array of native-endian int64, as `RecordReader.read` returns it) says. Given where the
    /// records came from, `label` ("topic/partition") and arrays like `ends` with each record's
    /// `offsets` and `ingested_ms` (epoch milliseconds), two more columns follow: `ingested_at`
    /// (millis) and `source` (`"<label>/<offset>"`).
    #[pyo3(signature = (values, ends, label=None, offsets=None, ingested_ms=None))]
    fn decode_packed<'py>(
        &self,
        py: Python<'py>,
        values: &[u8],
        ends: &[u8],
        label: Option<&str>,
        offsets: Option<&[u8]>,
        ingested_ms: Option<&[u8]>,
    ) -> PyResult<(Vec<usize>, Vec<Bound<'py, PyTuple>>)> {
        let ends = int64s(ends);
        let count = ends.len();
        if ends.windows(2).any(|pair| pair[0] > pair[1])
            || ends.first().is_some_and(|&end| end < 0)
            || ends.last().is_some_and(|&end| end as usize > values.len())
        {
            return Err(PyValueError::new_err(
                "record ends out of order or past the values",
            ));
        }
        let origin = match (label, offsets, ingested_ms) {
            (None, None, None) => None,
            (Some(label), Some(offsets), Some(ingested)) => {
                let (offsets, ingested) = (int64s(offsets), int64s(ingested));
                if offsets.len() != count || ingested.len() != count {
                    return Err(PyValueError::new_err(
                        "one offset and one ingestion time per record",
                    ));
                }
                Some(Origin {
                    label: label.as_bytes().to_vec(),
                    offsets,
                    ingested,
                })
            }
            _ => {
                return Err(PyValueError::new_err(
                    "label, offsets and ingested_ms come together",
                ))
            }
        };
        let starts = std::iter::once(0).chain(ends.iter().copied());
        let records = starts
            .zip(&ends)
            .map(|(start, &end)| Some(&values[start as usize..end as usize]));
        self.decode_records(py, count, records, values, origin.as_ref())
    }
}

/// Native-endian int64s, as Python's `array("q")` holds them.
fn int64s(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|value| i64::from_ne_bytes(value.try_into().unwrap()))
        .collect()
}

/// Where the records of a poll came from: the `ingested_at` and `source` of each.
struct Origin {
    label: Vec<u8>, // "topic/partition"
    offsets: Vec<i64>,
    ingested: Vec<i64>, // epoch ms
}

impl ContractDecoder {
    /// `decode` of `count` records (None: not bytes, deferred), with the `origin` columns if
    /// given. Text columns are string views: a value that lies in `shared` (the records' own
    /// buffer, or empty) points into it. The records are read without the GIL, so a read-ahead
    /// thread decodes while the worker runs Python; only the hand-over of the columns takes it.
    fn decode_records<'py, 'a>(
        &self,
        py: Python<'py>,
        count: usize,
        records: impl Iterator<Item = Option<&'a [u8]>> + Send,
        shared: &[u8],
        origin: Option<&Origin>,
    ) -> PyResult<(Vec<usize>, Vec<Bound<'py, PyTuple>>)> {
        let (deferred, columns) = py.allow_threads(|| self.rows(count, records, shared, origin));
        let columns = columns
            .into_iter()
            .map(|c| c.into_python(py))
            .collect::<PyResult<_>>()?;
        Ok((deferred, columns))
    }

    /// The indices of the deferred records and the columns of the accepted ones.
    fn rows<'a>(
        &self,
        count: usize,
        records: impl Iterator<Item = Option<&'a [u8]>>,
        shared: &[u8],
        origin: Option<&Origin>,
    ) -> (Vec<usize>, Vec<Column>) {
        let mut kinds = self.columns.clone();
        if origin.is_some() {
            kinds.extend([ColumnKind::Millis, ColumnKind::Text]);
        }
        let mut columns: Vec<Column> = kinds.iter().map(|k| k.column(count, shared)).collect();
        let width = self.columns.len();
        let mut deferred = Vec::new();
        let mut number = itoa::Buffer::new();
        let mut members = Members::new(); // one record's, reused
        for (i, record) in records.enumerate() {
            let parsed = match record {
                Some(raw) if raw.len() <= self.max_bytes => object_members(raw, &mut members),
                _ => None,
            };
            match parsed.and_then(|()| self.row(&members)) {
                Some(cells) => {
                    for ((column, kind), cell) in columns.iter_mut().zip(&kinds).zip(&cells) {
                        kind.push(column, cell);
                    }
                    if let Some(origin) = origin {
                        columns[width].push_value(origin.ingested[i].to_le_bytes(), true);
                        columns[width + 1].push_text_with(|data| {
                            data.extend_from_slice(&origin.label);
                            data.push(b'/');
                            data.extend_from_slice(number.format(origin.offsets[i]).as_bytes());
                        });
                    }
                    if columns[0].rows() == SAMPLE_ROWS {
                        for column in columns.iter_mut() {
                            column.reserve_like_sample(count);
                        }
                    }
                }
                None => deferred.push(i),
            }
        }
        (deferred, columns)
    }

    /// The row of a record that is an object with these members, or None to defer the record.
    fn row<'a>(&self, members: &Members<'a>) -> Option<Vec<Cell<'a>>> {
        let last = |key: &str| members.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v);
        let Some(Raw::Str(urn)) = last("schema_urn") else {
            return None;
        };
        let Some(&Raw::Int(version)) = last("version") else {
            return None;
        };
        let &(_, contract) = self
            .by_urn
            .get(&*urn.value())?
            .iter()
            .find(|(v, _)| *v == version)?;
        let mut cells: Vec<Cell> = (0..self.columns.len()).map(|_| Cell::Null).collect();
        if !self.fields(members, &self.contracts[contract].fields, &mut cells) {
            return None;
        }
        if cells[self.correlation_id]
            .as_text()
            .is_none_or(str::is_empty)
        {
            let seed = cells[self.event_id].as_text()?;
            cells[self.correlation_id] = Cell::Owned(uuid5(&self.namespace, seed));
        }
        Some(cells)
    }

    /// Checks `specs` against an object's members as the generated Python fast path does; fills
    /// their cells.
    fn fields<'a>(
        &self,
        members: &[(Cow<'a, str>, Raw<'a>)],
        specs: &[Field],
        cells: &mut [Cell<'a>],
    ) -> bool {
        // each spec's value: the last member of its name, as in a Python dict
        let mut found: Vec<Option<Raw<'a>>> = vec![None; specs.len()];
        // members mostly come in the contract's order: look from after the last one found
        let mut next = 0;
        for (key, value) in members {
            if let Some(i) = (next..specs.len())
                .chain(0..next)
                .find(|&i| specs[i].name == *key)
            {
                found[i] = Some(*value);
                next = i + 1;
            }
        }
        for (spec, value) in specs.iter().zip(found) {
            let Some(value) = value.filter(|v| !matches!(v, Raw::Null)) else {
                if spec.required || spec.envelope {
                    return false;
                }
                continue; // the cells of an absent field (and of its members) stay null
            };
            let cell = match (spec.kind, value) {
                // urn and version equal the contract's: it was chosen by them
                (_, Raw::Str(s)) if spec.envelope => Cell::text(s.value()),
                (_, Raw::Int(v)) if spec.envelope => Cell::Int(v),
                (Kind::Str, Raw::Str(s)) => {
                    let text = s.value();
                    if spec.required && text.is_empty() {
                        return false;
                    }
                    Cell::text(text)
                }
                (Kind::Timestamp, Raw::Str(s)) => match parse_iso_millis(&s.value()) {
                    Some(ms) => Cell::Int(ms),
                    None => return false,
                },
                (Kind::Timestamp, Raw::Int(ms)) => Cell::Int(ms),
                (Kind::Int, Raw::Int(v)) => Cell::Int(v),
                (Kind::Int, Raw::UInt(_)) => Cell::Null, // a valid integer, but no column value
                (Kind::Num, Raw::Int(_) | Raw::UInt(_) | Raw::Float(_))
                | (Kind::Bool, Raw::Bool(_)) => Cell::Null,
                (Kind::Obj, Raw::Obj(text)) if spec.members.is_some() => {
                    let mut inner = Members::new();
                    if members_of(text, &mut inner).is_none()
                        || !self.fields(&inner, spec.members.as_ref().unwrap(), cells)
                    {
                        return false;
                    }
                    continue;
                }
                (Kind::Obj, Raw::Obj(_)) | (Kind::Arr, Raw::Arr(_)) => {
                    if spec.slot.is_none() {
                        continue;
                    }
                    let mut text = Vec::new();
                    if dump(&value, &mut text).is_none() {
                        return false;
                    }
                    // parts of valid strings and ASCII: valid UTF-8
                    Cell::Owned(String::from_utf8(text).expect("JSON text is UTF-8"))
                }
                _ => return false,
            };
            if spec.kind == Kind::Timestamp {
                let Cell::Int(ms) = cell else { unreachable!() };
                if !(self.min_ms..self.max_ms).contains(&ms) {
                    return false;
                }
            }
            if let Some(slot) = spec.slot {
                let fits = match (self.columns[slot], &cell) {
                    (ColumnKind::Text, Cell::Str(_) | Cell::Owned(_)) => true,
                    (ColumnKind::Int32, Cell::Int(v)) => i32::try_from(*v).is_ok(),
                    (ColumnKind::Millis, Cell::Int(_)) => true,
                    _ => false,
                };
                if !fits {
                    return false;
                }
                cells[slot] = cell;
            }
        }
        true
    }
}

/// uuid5(namespace, seed) as text, as `uuid.uuid5` formats it.
fn uuid5(namespace: &[u8], seed: &str) -> String {
    use sha1::Digest;
    let mut hasher = sha1::Sha1::new();
    hasher.update(namespace);
    hasher.update(seed.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hasher.finalize()[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x50;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            text.push('-');
        }
        text.push(HEX[(b >> 4) as usize] as char);
        text.push(HEX[(b & 0xf) as usize] as char);
    }
    text
}

fn digits(b: &[u8]) -> Option<i64> {
    let mut n = 0i64;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + (c - b'0') as i64;
    }
    Some(n)
}

/// Days from 1970-01-01 to a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Epoch milliseconds of `YYYY-MM-DDTHH:MM:SS[.f…]` followed by `Z`, `±HH:MM` or `±HHMM`, as
/// `(datetime.fromisoformat(s) - epoch) // 1 ms` computes them (fractions beyond microseconds
/// truncated). None for every other text, valid ISO-8601 included: the Python path parses it.
fn parse_iso_millis(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (digits(&b[0..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
    let (hour, minute, second) = (
        digits(&b[11..13])?,
        digits(&b[14..16])?,
        digits(&b[17..19])?,
    );
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if year < 1 || !(1..=12).contains(&month) || day < 1 || day > month_days[(month - 1) as usize] {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b[i] == b'.' {
        let start = i + 1;
        let end = start + b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
        if end == start || end - start > 9 {
            return None;
        }
        let kept = &b[start..end.min(start + 6)];
        micros = digits(kept)? * 10i64.pow(6 - kept.len() as u32);
        i = end;
    }
    let offset_s = match &b[i..] {
        [b'Z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] | [sign @ (b'+' | b'-'), h1, h2, m1, m2] => {
            let (h, m) = (digits(&[*h1, *h2])?, digits(&[*m1, *m2])?);
            if h > 23 || m > 59 {
                return None;
            }
            let offset = h * 3600 + m * 60;
            if *sign == b'-' {
                -offset
            } else {
                offset
            }
        }
        _ => return None,
    };
    let seconds =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_s;
    Some((seconds * 1_000_000 + micros).div_euclid(1000))
}

#[pymodule]
fn pipeline_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ContractDecoder>()?;
    m.add_function(wrap_pyfunction!(encode::json_rows, m)?)?;
    m.add_function(wrap_pyfunction!(dictionary::dictionary_codes, m)?)?;
    m.add_class::<producer::RecordWriter>()?;
    m.add_class::<consumer::RecordReader>()?;
    m.add_class::<shard_events::ShardEvents>()?;
    m.add_class::<sessions::SessionTable>()?;
    m.add_function(wrap_pyfunction!(sessions::session_events, m)?)?;
    m.add_class::<windows::WindowTable>()?;
    m.add_function(wrap_pyfunction!(windows::window_events, m)?)?;
    Ok(())
}
