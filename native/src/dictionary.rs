//! The distinct values of a text column and each row's number among them, so that enrichment
//! looks each distinct IP and user agent up once per batch (`operators/enrich.py`,
//! `dictionary_codes`, whose Python loop is the specification).

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use rustc_hash::FxBuildHasher;

use crate::encode::{ColumnSpec, TextColumn};

/// For the `length` rows of a string_view `column`: each row's code as native-endian uint32
/// (0 for a null, then 1, 2, … in order of first appearance) and the distinct values in code
/// order.
#[pyfunction]
pub fn dictionary_codes<'py>(
    py: Python<'py>,
    length: usize,
    column: ColumnSpec,
) -> PyResult<(Bound<'py, PyBytes>, Vec<Bound<'py, PyString>>)> {
    let column = TextColumn::new(length, column)?;
    let mut code_of: HashMap<&[u8], u32, FxBuildHasher> = HashMap::default();
    let mut distinct = Vec::new();
    let mut codes = Vec::with_capacity(length * 4);
    for row in 0..length {
        let code = match column.get(row)? {
            None => 0,
            Some(value) => match code_of.entry(value) {
                Entry::Occupied(entry) => *entry.get(),
                Entry::Vacant(entry) => {
                    distinct.push(value);
                    *entry.insert(distinct.len() as u32)
                }
            },
        };
        codes.extend_from_slice(&code.to_ne_bytes());
    }
    let distinct = distinct
        .into_iter()
        .map(|value| {
            let text = std::str::from_utf8(value)
                .map_err(|_| PyValueError::new_err("a text value that is not UTF-8"))?;
            Ok(PyString::new(py, text))
        })
        .collect::<PyResult<_>>()?;
    Ok((PyBytes::new(py, &codes), distinct))
}
