//! Columns built in Arrow's layout and handed to Python as `bytes` buffers, from which
//! `operators.model.frame_of_buffers` (and the decoder's `_native_frame`) make a frame without
//! copying: the decoder's rows and the session table's closed sessions come out this way, with no
//! Python object per value.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

/// Rows after which text columns reserve room for the rest (see `reserve_like_sample`).
pub(crate) const SAMPLE_ROWS: usize = 64;

/// How a column holds its values.
enum Layout {
    Fixed,
    /// Arrow's large_string: the values one after the other in `data`, int64 offsets.
    Text {
        offsets: Vec<i64>,
    },
    /// Arrow's string_view, as polars holds text: a 16-byte view per value, short values (up to
    /// 12 bytes) inline, longer ones pointing into `shared` (buffer 0: text the values were read
    /// from, which Python hands to Arrow as it is) or else into `data` (buffer 1). Values read
    /// from a record are not copied at all.
    Views {
        views: Vec<u8>,
        shared: (usize, usize),
    },
}

/// Views index buffers with an i32.
const MAX_VIEW_BUFFER: usize = i32::MAX as usize;

/// One column: values (text as bytes plus offsets or views, numbers little-endian) and validity.
pub(crate) struct Column {
    layout: Layout,
    data: Vec<u8>,
    valid: Vec<bool>,
}

impl Column {
    /// A column of text (Arrow's large_string) for about `capacity` rows.
    pub(crate) fn text(capacity: usize) -> Column {
        let mut offsets = Vec::with_capacity(capacity + 1);
        offsets.push(0);
        Column {
            layout: Layout::Text { offsets },
            data: Vec::with_capacity(capacity * 24),
            valid: Vec::with_capacity(capacity),
        }
    }

    /// A column of text as string views for about `capacity` rows; values that lie within
    /// `shared` point into it (it must outlive the column's Arrow array: Python hands the same
    /// bytes over as buffer 0).
    pub(crate) fn views(capacity: usize, shared: &[u8]) -> Column {
        // beyond what a view can address, the shared text is not pointed into
        let shared = if shared.len() <= MAX_VIEW_BUFFER {
            (shared.as_ptr() as usize, shared.len())
        } else {
            (0, 0)
        };
        Column {
            layout: Layout::Views {
                views: Vec::with_capacity(capacity * 16),
                shared,
            },
            data: Vec::new(),
            valid: Vec::with_capacity(capacity),
        }
    }

    /// A column of `width`-byte values for about `capacity` rows.
    pub(crate) fn fixed(width: usize, capacity: usize) -> Column {
        Column {
            layout: Layout::Fixed,
            data: Vec::with_capacity(capacity * width),
            valid: Vec::with_capacity(capacity),
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.valid.len()
    }

    /// Appends a text value, or a null.
    pub(crate) fn push_text(&mut self, value: Option<&str>) {
        let Some(text) = value else {
            match &mut self.layout {
                Layout::Text { offsets } => offsets.push(self.data.len() as i64),
                Layout::Views { views, .. } => views.extend_from_slice(&[0; 16]),
                Layout::Fixed => unreachable!("text into a fixed-width column"),
            }
            self.valid.push(false);
            return;
        };
        let bytes = text.as_bytes();
        if let Layout::Views { views, shared } = &mut self.layout {
            let at = (bytes.as_ptr() as usize).wrapping_sub(shared.0);
            // a short value goes inline in its view, a long one in the shared text stays there
            if bytes.len() <= 12 || (at < shared.1 && at + bytes.len() <= shared.1) {
                push_view(views, bytes, 0, at);
                self.valid.push(true);
                return;
            }
        }
        self.push_text_with(|data| data.extend_from_slice(bytes));
    }

    /// Appends the text `write` appends to the column's data.
    pub(crate) fn push_text_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.data.len();
        write(&mut self.data);
        match &mut self.layout {
            Layout::Text { offsets } => offsets.push(self.data.len() as i64),
            Layout::Views { views, .. } => {
                push_view(views, &self.data[start..], 1, start);
                if self.data.len() - start <= 12 {
                    self.data.truncate(start); // inline in its view
                }
            }
            Layout::Fixed => unreachable!("text into a fixed-width column"),
        }
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
        if !matches!(self.layout, Layout::Fixed) && sampled > 0 && rows > sampled {
            let per_row = self.data.len().div_ceil(sampled);
            self.data.reserve((rows - sampled) * per_row * 9 / 8);
        }
    }

    /// (values, offsets or None, validity bitmap or None when every row has a value); for
    /// string views (the data buffer of values not in the shared text, views, validity).
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
        let second = match &self.layout {
            Layout::Text { offsets } => {
                let bytes: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
                PyBytes::new(py, &bytes).into_any()
            }
            Layout::Views { views, .. } => {
                if self.data.len() > MAX_VIEW_BUFFER {
                    return Err(PyValueError::new_err(
                        "string views: more than 2 GiB of text in one column",
                    ));
                }
                PyBytes::new(py, views).into_any()
            }
            Layout::Fixed => py.None().into_bound(py),
        };
        PyTuple::new(
            py,
            [PyBytes::new(py, &self.data).into_any(), second, validity],
        )
    }
}

/// Appends the view of `value`, which lies at `offset` in buffer `buffer` (unless it is short
/// enough to be inline).
fn push_view(views: &mut Vec<u8>, value: &[u8], buffer: u32, offset: usize) {
    let mut view = [0u8; 16];
    view[..4].copy_from_slice(&(value.len() as u32).to_le_bytes());
    if value.len() <= 12 {
        view[4..4 + value.len()].copy_from_slice(value);
    } else {
        view[4..8].copy_from_slice(&value[..4]);
        view[8..12].copy_from_slice(&buffer.to_le_bytes());
        view[12..].copy_from_slice(&(offset as u32).to_le_bytes());
    }
    views.extend_from_slice(&view);
}
