//! Tumbling event-time windows, compiled: the same table as `WindowTable` in
//! `operators/windows.py` (the specification), over events handed over as columns.
//!
//! `window_events` splits a batch's events by shard (CRC32 of `tenant \x1f type`, as
//! `operators.sharding` does) into `ShardEvents`; a shard's `WindowTable` folds each event into
//! the cell of every window size it falls in. A cell holds its distinct user ids as numbers: each
//! user id string is held once per shard, for as long as a cell holds it, so no per-event or
//! per-user Python object is made. Snapshot chunks are those of the Python table (user ids packed
//! into one string per cell), so either table resumes from the other's snapshots.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PySet, PyString};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::encode::{iso_millis, ColumnSpec};
use crate::shard_events::{split, Columns, ShardEvents};

/// Label and length of each window size (`WINDOW_SIZES_MS` in `operators/windows.py`).
const SIZES: [(&str, i64); 3] = [("1m", 60_000), ("5m", 300_000), ("1h", 3_600_000)];
/// Every size is a whole number of the smallest.
const BASE_MS: i64 = 60_000;
/// Delimits the user ids of a cell in a snapshot chunk (`_SEPARATOR` in `operators/windows.py`).
const SEPARATOR: char = '\0';
const NO_TENANT_OR_TYPE: &str = "window events: an event has no tenant or type";

/// A batch's events by shard: `length` rows of the columns tenant, type, user_id (string_view, as
/// polars holds text) and timestamp (int64 epoch ms), in that order.
#[pyfunction]
pub fn window_events(
    length: usize,
    columns: Vec<ColumnSpec>,
    shards: u32,
) -> PyResult<Vec<(u32, ShardEvents)>> {
    split(
        length,
        columns,
        Columns::Windows,
        shards,
        |[tenant, etype, _], key| {
            let (Some(tenant), Some(etype)) = (tenant, etype) else {
                return Err(PyValueError::new_err(NO_TENANT_OR_TYPE));
            };
            key.update(tenant.as_bytes());
            key.update(b"\x1f");
            key.update(etype.as_bytes());
            Ok(true)
        },
    )
}

/// A cell: tenant and type (as numbers of the table's `names`), the window size (an index into
/// `SIZES`) and the window's start.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    tenant: u32,
    etype: u32,
    size: u8,
    start: i64,
}

impl Key {
    fn end(&self) -> i64 {
        self.start + SIZES[self.size as usize].1
    }
}

/// A key as Python holds it: (tenant, event type, window label, window start).
type KeyTuple = (String, String, String, i64);

struct Cell {
    count: i64,
    users: FxHashSet<u32>, // numbers of the table's `users`
    revision: i64,         // -1: not emitted yet
    // An open cell's users as its last snapshot packed them, and those added since: the next
    // snapshot extends the text instead of packing an hour of users anew (see `encode`).
    packed: Option<String>,
    added: Vec<u32>,
}

impl Cell {
    fn new(count: i64, users: FxHashSet<u32>, revision: i64, packed: Option<String>) -> Cell {
        let added = Vec::new();
        Cell {
            count,
            users,
            revision,
            packed,
            added,
        }
    }
}

/// Tenants and event types by number; a shard sees a few, kept for its life.
#[derive(Default)]
struct Names {
    ids: FxHashMap<Arc<str>, u32>,
    names: Vec<Arc<str>>,
}

impl Names {
    fn id(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let name: Arc<str> = Arc::from(name);
        let id = self.names.len() as u32;
        self.names.push(name.clone());
        self.ids.insert(name, id);
        id
    }
}

/// User ids by number, each freed when the last cell holding it is.
#[derive(Default)]
struct Users {
    ids: FxHashMap<Arc<str>, u32>,
    names: Vec<Option<Arc<str>>>,
    cells: Vec<u32>, // how many cells hold each
    free: Vec<u32>,
}

impl Users {
    fn id(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let name: Arc<str> = Arc::from(name);
        let id = match self.free.pop() {
            Some(id) => {
                self.names[id as usize] = Some(name.clone());
                id
            }
            None => {
                self.names.push(Some(name.clone()));
                self.cells.push(0);
                (self.names.len() - 1) as u32
            }
        };
        self.ids.insert(name, id);
        id
    }

    fn name(&self, id: u32) -> &str {
        self.names[id as usize]
            .as_deref()
            .expect("a held user id has a name")
    }

    fn hold(&mut self, id: u32) {
        self.cells[id as usize] += 1;
    }

    fn release(&mut self, id: u32) {
        self.cells[id as usize] -= 1;
        self.forget_if_unheld(id);
    }

    fn forget_if_unheld(&mut self, id: u32) {
        if self.cells[id as usize] == 0 {
            if let Some(name) = self.names[id as usize].take() {
                self.ids.remove(&name);
                self.free.push(id);
            }
        }
    }
}

/// The windows of one shard: cells by key, the ones not emitted yet by end (`pending`), the
/// emitted ones by end (kept for late corrections until the horizon passes it).
#[pyclass(module = "pipeline_native")]
pub struct WindowTable {
    retention: i64,
    /// Windows that ended at or before this are gone for good.
    #[pyo3(get, set)]
    horizon_ms: i64,
    /// Events that came for a window past the horizon, counted once per window size.
    #[pyo3(get, set)]
    dropped_events: i64,
    names: Names,
    users: Users,
    cells: FxHashMap<Key, Cell>,
    pending: BinaryHeap<Reverse<(i64, Key)>>,
    emitted: BinaryHeap<Reverse<(i64, Key)>>,
    revised: FxHashSet<Key>, // emitted cells changed since the last `emit`
    changed: FxHashSet<Key>, // cells written or deleted since the last `take_changed`
}

impl WindowTable {
    /// A key in the order the Python table sorts its key tuples.
    fn order(&self, key: &Key) -> (&str, &str, &str, i64) {
        let names = &self.names.names;
        let (tenant, etype) = (&names[key.tenant as usize], &names[key.etype as usize]);
        (tenant, etype, SIZES[key.size as usize].0, key.start)
    }

    fn key_of(&self, (tenant, etype, label, start): &KeyTuple) -> Option<Key> {
        Some(Key {
            tenant: *self.names.ids.get(tenant.as_str())?,
            etype: *self.names.ids.get(etype.as_str())?,
            size: SIZES.iter().position(|(l, _)| l == label)? as u8,
            start: *start,
        })
    }

    fn emit_cell<'py>(&mut self, py: Python<'py>, key: Key) -> PyResult<Bound<'py, PyDict>> {
        let cell = self.cells.get_mut(&key).expect("an emitted key has a cell");
        self.changed.insert(key);
        let end = key.end();
        if cell.revision < 0 {
            self.emitted.push(Reverse((end, key)));
        }
        cell.revision += 1;
        (cell.packed, cell.added) = (None, Vec::new()); // rarely snapshotted again
        let (count, unique, revision) = (cell.count, cell.users.len(), cell.revision);
        let (tenant, etype, label, start) = self.order(&key);
        let row = PyDict::new(py);
        row.set_item("tenant", tenant)?;
        row.set_item("event_type", etype)?;
        row.set_item("window", label)?;
        row.set_item("window_start", iso(start)?)?;
        row.set_item("window_end", iso(end)?)?;
        row.set_item("count", count)?;
        row.set_item("unique_users", unique)?;
        row.set_item("revision", revision)?;
        Ok(row)
    }

    fn expire(&mut self, horizon: i64) {
        if horizon <= self.horizon_ms {
            return;
        }
        self.horizon_ms = horizon;
        while let Some(&Reverse((end, key))) = self.emitted.peek() {
            if end > horizon {
                break;
            }
            self.emitted.pop();
            if let Some(cell) = self.cells.remove(&key) {
                for user in cell.users {
                    self.users.release(user);
                }
            }
            self.changed.insert(key);
        }
    }
}

/// A cell's users as a snapshot chunk holds them: packed text (each id after a separator, and one
/// more at the end), or a set when an id contains the separator.
fn users_object<'py>(py: Python<'py>, users: &Users, cell: &Cell) -> PyResult<Bound<'py, PyAny>> {
    let mut packed = String::with_capacity(1 + cell.users.len() * 12);
    packed.push(SEPARATOR);
    if pack(users, cell.users.iter().copied(), &mut packed) {
        return Ok(PyString::new(py, &packed).into_any());
    }
    let names = cell.users.iter().map(|&user| users.name(user));
    Ok(PySet::new(py, names)?.into_any())
}

/// Append the names of `ids` to `packed`, each followed by the separator; false if a name holds
/// the separator (the text is then of no use).
fn pack(users: &Users, ids: impl Iterator<Item = u32>, packed: &mut String) -> bool {
    for id in ids {
        let name = users.name(id);
        if name.as_bytes().contains(&(SEPARATOR as u8)) {
            return false;
        }
        packed.push_str(name);
        packed.push(SEPARATOR);
    }
    true
}

/// `ms` as ISO text with milliseconds, as every output writes times.
fn iso(ms: i64) -> PyResult<String> {
    Ok(iso_millis(ms)?.iter().map(|&b| char::from(b)).collect()) // ASCII
}

#[pymethods]
impl WindowTable {
    #[new]
    fn new(retention_ms: i64) -> Self {
        WindowTable {
            retention: retention_ms,
            horizon_ms: -(1 << 62),
            dropped_events: 0,
            names: Names::default(),
            users: Users::default(),
            cells: FxHashMap::default(),
            pending: BinaryHeap::new(),
            emitted: BinaryHeap::new(),
            revised: FxHashSet::default(),
            changed: FxHashSet::default(),
        }
    }

    /// Fold a batch's events into their cells; an event for a window that ended by the horizon
    /// is dropped (and counted) instead of opening the window again.
    fn absorb(&mut self, events: &ShardEvents) -> PyResult<()> {
        let events = events.of(Columns::Windows)?;
        let [tenants, types, user_ids] = &events.texts;
        for (i, &time) in events.times.iter().enumerate() {
            let (Some(tenant), Some(etype)) = (tenants.get(i), types.get(i)) else {
                return Err(PyValueError::new_err(NO_TENANT_OR_TYPE));
            };
            let (tenant, etype) = (self.names.id(tenant), self.names.id(etype));
            let user = user_ids.get(i).map(|user| self.users.id(user));
            let base = time.div_euclid(BASE_MS) * BASE_MS;
            for (size, &(_, length)) in SIZES.iter().enumerate() {
                let start = base - base.rem_euclid(length);
                let key = Key {
                    tenant,
                    etype,
                    size: size as u8,
                    start,
                };
                if let Some(cell) = self.cells.get_mut(&key) {
                    self.changed.insert(key);
                    if cell.revision >= 0 {
                        self.revised.insert(key);
                    }
                    cell.count += 1;
                    if let Some(user) = user {
                        if cell.users.insert(user) {
                            self.users.hold(user);
                            if cell.packed.is_some() {
                                cell.added.push(user);
                            }
                        }
                    }
                } else if start + length <= self.horizon_ms {
                    self.dropped_events += 1;
                } else {
                    let mut users = FxHashSet::default();
                    if let Some(user) = user {
                        users.insert(user);
                        self.users.hold(user);
                    }
                    self.cells.insert(key, Cell::new(1, users, -1, None));
                    self.changed.insert(key);
                    self.pending.push(Reverse((start + length, key)));
                }
            }
            if let Some(user) = user {
                self.users.forget_if_unheld(user); // every window of the event was dropped
            }
        }
        Ok(())
    }

    /// The rows to emit at `watermark`: emitted cells changed since the last call (sorted by key),
    /// then the windows that ended by it (by end, then key); windows that ended by
    /// `watermark - retention` are freed.
    fn emit<'py>(&mut self, py: Python<'py>, watermark: i64) -> PyResult<Bound<'py, PyList>> {
        let mut revised: Vec<Key> = self.revised.drain().collect();
        revised.sort_by(|a, b| self.order(a).cmp(&self.order(b)));
        let mut due: Vec<(i64, Key)> = Vec::new();
        while let Some(&Reverse((end, key))) = self.pending.peek() {
            if end > watermark {
                break;
            }
            self.pending.pop();
            due.push((end, key));
        }
        due.sort_by(|a, b| (a.0, self.order(&a.1)).cmp(&(b.0, self.order(&b.1))));
        let rows = PyList::empty(py);
        for key in revised
            .into_iter()
            .chain(due.into_iter().map(|(_, key)| key))
        {
            rows.append(self.emit_cell(py, key)?)?;
        }
        self.expire(watermark.saturating_sub(self.retention));
        Ok(rows)
    }

    fn __len__(&self) -> usize {
        self.cells.len()
    }

    fn __contains__(&self, key: KeyTuple) -> bool {
        self.key_of(&key)
            .is_some_and(|key| self.cells.contains_key(&key))
    }

    /// User ids the cells hold, counted once per cell.
    fn users_held(&self) -> usize {
        self.cells.values().map(|cell| cell.users.len()).sum()
    }

    /// Every cell as `load` takes it: (key, count, users as a snapshot chunk holds them,
    /// revision).
    fn entries<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let entries = PyList::empty(py);
        for (key, cell) in &self.cells {
            let users = users_object(py, &self.users, cell)?;
            entries.append((self.order(key), cell.count, users, cell.revision))?;
        }
        Ok(entries)
    }

    /// The keys of the cells written or deleted since the last call.
    fn take_changed<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let changed = std::mem::take(&mut self.changed);
        PyList::new(py, changed.iter().map(|key| self.order(key)))
    }

    /// The cells of `keys` as a snapshot chunk: `keys`, then `counts`, `users` (see
    /// `users_object`) and `revisions`, a list each.
    fn encode<'py>(
        &mut self,
        py: Python<'py>,
        keys: Bound<'py, PyList>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (counts, users, revisions) = (PyList::empty(py), PyList::empty(py), PyList::empty(py));
        for item in keys.iter() {
            let key_tuple: KeyTuple = item.extract()?;
            let key = self.key_of(&key_tuple);
            let cell = key
                .and_then(|key| self.cells.get_mut(&key))
                .ok_or_else(|| PyValueError::new_err(format!("no window cell {key_tuple:?}")))?;
            if cell.revision < 0 {
                let packable = match cell.packed.as_mut() {
                    Some(packed) => pack(&self.users, cell.added.iter().copied(), packed),
                    None => {
                        let packed = cell.packed.insert(String::from(SEPARATOR));
                        pack(&self.users, cell.users.iter().copied(), packed)
                    }
                };
                cell.added.clear();
                if !packable {
                    cell.packed = None; // an id holds the separator: a set from now on
                }
            }
            counts.append(cell.count)?;
            match &cell.packed {
                Some(packed) => users.append(PyString::new(py, packed))?,
                None => users.append(users_object(py, &self.users, cell)?)?,
            }
            revisions.append(cell.revision)?;
        }
        let chunk = PyDict::new(py);
        chunk.set_item("keys", keys)?;
        chunk.set_item("counts", counts)?;
        chunk.set_item("users", users)?;
        chunk.set_item("revisions", revisions)?;
        Ok(chunk)
    }

    /// Replace the cells by `entries` (key, count, users as packed text or a collection of ids,
    /// revision); which windows are pending or emitted follows from the revisions.
    fn load(&mut self, entries: Vec<(KeyTuple, i64, Bound<'_, PyAny>, i64)>) -> PyResult<()> {
        let retention = self.retention;
        *self = WindowTable::new(retention);
        for ((tenant, etype, label, start), count, users, revision) in entries {
            let size = SIZES
                .iter()
                .position(|(l, _)| *l == label)
                .ok_or_else(|| PyValueError::new_err(format!("no window size {label:?}")))?;
            let key = Key {
                tenant: self.names.id(&tenant),
                etype: self.names.id(&etype),
                size: size as u8,
                start,
            };
            let mut ids = FxHashSet::default();
            let mut add = |name: &str| {
                let id = self.users.id(name);
                if ids.insert(id) {
                    self.users.hold(id);
                }
            };
            let mut kept = None;
            if let Ok(packed) = users.downcast::<PyString>() {
                let packed = packed.to_str()?;
                if revision < 0 {
                    kept = Some(packed.to_owned()); // the next snapshot extends it
                }
                let inner = packed
                    .strip_prefix(SEPARATOR)
                    .and_then(|rest| rest.strip_suffix(SEPARATOR));
                if let Some(inner) = inner {
                    inner.split(SEPARATOR).for_each(&mut add);
                }
            } else {
                for name in users.try_iter()? {
                    add(name?.extract::<&str>()?);
                }
            }
            let heap = if revision < 0 {
                &mut self.pending
            } else {
                &mut self.emitted
            };
            heap.push(Reverse((key.end(), key)));
            self.cells
                .insert(key, Cell::new(count, ids, revision, kept));
        }
        Ok(())
    }
}
