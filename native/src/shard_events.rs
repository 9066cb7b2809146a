//! A batch's events split by state shard, as columns: what the event-time gate hands each shard
//! of the session table (`sessions`) and of the window table (`windows`). Three text columns and
//! the event time; they pickle as bytes, since a shard may live in another process.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::encode::{buffer, ColumnSpec, TextColumn};

/// Text values in one buffer; value `i` is `data[ends[i - 1]..ends[i]]`, None where not valid.
/// Written as the data, then each value's length as a little-endian i32 (-1: None): the layout
/// of event pickles and of the session table's packed snapshot chunks (`_unpack_texts` in
/// `operators/sessions.py`).
#[derive(Default, Clone)]
pub(crate) struct Texts {
    pub(crate) data: String,
    ends: Vec<usize>,
    valid: Vec<bool>,
}

impl Texts {
    pub(crate) fn push(&mut self, value: Option<&str>) {
        if let Some(value) = value {
            self.data.push_str(value);
        }
        self.ends.push(self.data.len());
        self.valid.push(value.is_some());
    }

    pub(crate) fn get(&self, i: usize) -> Option<&str> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.valid[i].then(|| &self.data[start..self.ends[i]])
    }

    /// Each value's length as a little-endian i32, -1 for None.
    pub(crate) fn lengths(&self) -> Vec<u8> {
        let mut lengths = Vec::with_capacity(self.ends.len() * 4);
        let mut start = 0;
        for (&end, &valid) in self.ends.iter().zip(&self.valid) {
            let length = if valid { (end - start) as i32 } else { -1 };
            lengths.extend_from_slice(&length.to_le_bytes());
            start = end;
        }
        lengths
    }

    fn write(&self, out: &mut Vec<u8>) {
        put(out, self.data.len() as u64);
        out.extend_from_slice(self.data.as_bytes());
        out.extend_from_slice(&self.lengths());
    }

    fn read(input: &mut &[u8], n: usize) -> PyResult<Texts> {
        let size = take(input)? as usize;
        let data = String::from_utf8(bytes(input, size)?.to_vec())
            .map_err(|_| PyValueError::new_err("shard events: text is not UTF-8"))?;
        let mut texts = Texts {
            data,
            ends: Vec::with_capacity(n),
            valid: Vec::with_capacity(n),
        };
        let mut end = 0;
        for length in bytes(input, n.saturating_mul(4))?.chunks_exact(4) {
            let length = i32::from_le_bytes(length.try_into().unwrap());
            let valid = length >= 0;
            end += length.max(0) as usize;
            if length < -1 || end > size || !texts.data.is_char_boundary(end) {
                return Err(PyValueError::new_err("shard events: bad text lengths"));
            }
            texts.ends.push(end);
            texts.valid.push(valid);
        }
        Ok(texts)
    }
}

fn put(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn bytes<'a>(input: &mut &'a [u8], n: usize) -> PyResult<&'a [u8]> {
    if input.len() < n {
        return Err(PyValueError::new_err("shard events: truncated"));
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Ok(head)
}

fn take(input: &mut &[u8]) -> PyResult<u64> {
    Ok(u64::from_le_bytes(bytes(input, 8)?.try_into().unwrap()))
}

/// What the three text columns of `ShardEvents` hold: which table they are for.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Columns {
    #[default]
    Sessions, // session_id, tenant, user_id
    Windows, // tenant, type, user_id
}

impl Columns {
    fn names(self) -> [&'static str; 3] {
        match self {
            Columns::Sessions => ["session_id", "tenant", "user_id"],
            Columns::Windows => ["tenant", "type", "user_id"],
        }
    }
}

/// The events of one batch for one shard, in batch order: three text columns (`columns` says
/// which) and the event time in epoch milliseconds. Pickles as bytes (it crosses processes).
#[pyclass(module = "pipeline_native")]
#[derive(Default, Clone)]
pub struct ShardEvents {
    pub(crate) columns: Columns,
    pub(crate) texts: [Texts; 3],
    pub(crate) times: Vec<i64>,
}

impl ShardEvents {
    /// The events, if they are of `columns`.
    pub(crate) fn of(&self, columns: Columns) -> PyResult<&ShardEvents> {
        if self.columns != columns {
            return Err(PyValueError::new_err(format!(
                "shard events of {:?}, expected {columns:?}",
                self.columns
            )));
        }
        Ok(self)
    }
}

#[pymethods]
impl ShardEvents {
    #[new]
    fn new() -> Self {
        ShardEvents::default()
    }

    fn __len__(&self) -> usize {
        self.times.len()
    }

    fn __getstate__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let mut out = vec![self.columns as u8];
        put(&mut out, self.times.len() as u64);
        for time in &self.times {
            out.extend_from_slice(&time.to_le_bytes());
        }
        for texts in &self.texts {
            texts.write(&mut out);
        }
        PyBytes::new(py, &out)
    }

    fn __setstate__(&mut self, state: &[u8]) -> PyResult<()> {
        let mut input = state;
        self.columns = match bytes(&mut input, 1)? {
            [0] => Columns::Sessions,
            [1] => Columns::Windows,
            _ => return Err(PyValueError::new_err("shard events: unknown columns")),
        };
        let n = take(&mut input)? as usize;
        let times = bytes(&mut input, n.saturating_mul(8))?;
        self.times = times
            .chunks_exact(8)
            .map(|t| i64::from_le_bytes(t.try_into().unwrap()))
            .collect();
        self.texts = [
            Texts::read(&mut input, n)?,
            Texts::read(&mut input, n)?,
            Texts::read(&mut input, n)?,
        ];
        if !input.is_empty() {
            return Err(PyValueError::new_err("shard events: trailing bytes"));
        }
        Ok(())
    }
}

/// Split `length` rows of the three string_view columns of `kind` and an int64 `timestamp` column
/// (epoch ms), in that order, by shard: `shard_key` feeds the row's key to the hasher (its CRC32
/// picks the shard, as `operators.sharding` does) and returns false to leave the row out. Only
/// shards with events are returned.
pub(crate) fn split(
    length: usize,
    columns: Vec<ColumnSpec>,
    kind: Columns,
    shards: u32,
    shard_key: impl Fn([Option<&str>; 3], &mut crc32fast::Hasher) -> PyResult<bool>,
) -> PyResult<Vec<(u32, ShardEvents)>> {
    if shards == 0 {
        return Err(PyValueError::new_err("shards must be at least 1"));
    }
    let names: Vec<(&str, &str)> = columns
        .iter()
        .map(|c| (c.0.as_str(), c.1.as_str()))
        .collect();
    let wanted: Vec<(&str, &str)> = kind
        .names()
        .iter()
        .map(|name| (*name, "string_view"))
        .chain([("timestamp", "int64")])
        .collect();
    if names != wanted {
        return Err(PyValueError::new_err(format!(
            "shard events: columns {names:?}, expected {wanted:?}"
        )));
    }
    let mut columns = columns.into_iter();
    let texts = [
        TextColumn::new(length, columns.next().unwrap())?,
        TextColumn::new(length, columns.next().unwrap())?,
        TextColumn::new(length, columns.next().unwrap())?,
    ];
    let (_, _, time_offset, time_buffers) = columns.next().unwrap();
    if time_buffers
        .first()
        .is_some_and(|validity| validity.is_some())
    {
        return Err(PyValueError::new_err("event times must not be null"));
    }
    let time_data = buffer(
        *time_buffers.get(1).unwrap_or(&None),
        (time_offset + length) * 8,
        "timestamp",
    )?;
    let events = ShardEvents {
        columns: kind,
        ..ShardEvents::default()
    };
    let mut by_shard: Vec<ShardEvents> = vec![events; shards as usize];
    for row in 0..length {
        let values = [
            texts[0].get_str(row)?,
            texts[1].get_str(row)?,
            texts[2].get_str(row)?,
        ];
        let mut key = crc32fast::Hasher::new();
        if !shard_key(values, &mut key)? {
            continue;
        }
        let events = &mut by_shard[(key.finalize() % shards) as usize];
        for (column, value) in events.texts.iter_mut().zip(values) {
            column.push(value);
        }
        let i = time_offset + row;
        events.times.push(i64::from_le_bytes(
            time_data[i * 8..i * 8 + 8].try_into().unwrap(),
        ));
    }
    Ok((0..shards)
        .zip(by_shard)
        .filter(|(_, events)| !events.times.is_empty())
        .collect())
}
