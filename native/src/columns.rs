//! Columns built in Arrow's layout and handed to Python as `bytes` buffers, from which
//! `operators.model.frame_of_buffers` makes a frame without copying: the decoder's rows and the
//! session table's closed sessions come out this way, with no Python object per value.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

/// Rows after which text columns reserve room for the rest (see `reserve_like_sample`).
pub(crate) const SAMPLE_ROWS: usize = 64;

/// One column: values (text as bytes plus int64 offsets, numbers little-endian) and validity.
pub(crate) struct Column {
    text: bool,
    data: Vec<u8>,
    offsets: Vec<i64>, // text only
    valid: Vec<bool>,
}

impl Column {
    /// A column of text (Arrow's large_string) for about `capacity` rows.
    pub(crate) fn text(capacity: usize) -> Column {
        let mut offsets = Vec::with_capacity(capacity + 1);
        offsets.push(0);
        Column {
            text: true,
            data: Vec::with_capacity(capacity * 24),
            offsets,
            valid: Vec::with_capacity(capacity),
        }
    }

    /// A column of `width`-byte values for about `capacity` rows.
    pub(crate) fn fixed(width: usize, capacity: usize) -> Column {
        Column {
            text: false,
            data: Vec::with_capacity(capacity * width),
            offsets: Vec::new(),
            valid: Vec::with_capacity(capacity),
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.valid.len()
    }

    /// Appends a text value, or a null.
    pub(crate) fn push_text(&mut self, value: Option<&str>) {
        match value {
            Some(text) => self.push_text_with(|data| data.extend_from_slice(text.as_bytes())),
            None => {
                self.offsets.push(self.data.len() as i64);
                self.valid.push(false);
            }
        }
    }

    /// Appends the text `write` appends to the column's data.
    pub(crate) fn push_text_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        write(&mut self.data);
        self.offsets.push(self.data.len() as i64);
        self.valid.push(true);
    }

    /// Appends a fixed-width value (its little-endian bytes); a null if not `valid`.
    pub(crate) fn push_value<const N: usize>(&mut self, bytes: [u8; N], valid: bool) {
        self.data.extend_from_slice(&bytes);
        self.valid.push(valid);
    }

    /// Reserves room for `rows` in all as the rows so far need, plus an eighth: text columns start
    /// small, and growing one of megabytes by doubling copies it again and again.
    pub(crate) fn reserve_like_sample(&mut self, rows: usize) {
        let sampled = self.valid.len();
        if self.text && sampled > 0 && rows > sampled {
            let per_row = self.data.len().div_ceil(sampled);
            self.data.reserve((rows - sampled) * per_row * 9 / 8);
        }
    }

    /// (values, offsets or None, validity bitmap or None when every row has a value)
    pub(crate) fn into_python<'py>(self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let validity = if self.valid.iter().all(|&v| v) {
            py.None().into_bound(py)
        } else {
            let mut bitmap = vec![0u8; self.valid.len().div_ceil(8)];
            for (i, _) in self.valid.iter().enumerate().filter(|(_, &v)| v) {
                bitmap[i / 8] |= 1 << (i % 8);
            }
            PyBytes::new(py, &bitmap).into_any()
        };
        let offsets = if self.text {
            let bytes: Vec<u8> = self.offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
            PyBytes::new(py, &bytes).into_any()
        } else {
            py.None().into_bound(py)
        };
        PyTuple::new(
            py,
            [PyBytes::new(py, &self.data).into_any(), offsets, validity],
        )
    }
}
