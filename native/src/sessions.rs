//! Sessions by `session_id`, compiled: the same state machine as `SessionTable` in
//! `operators/sessions.py` (the specification), over events handed over as columns.
//!
//! `session_events` splits a batch's events by shard (CRC32 of the session id, as
//! `operators.sharding` does) into `ShardEvents`; a shard's `SessionTable` cuts them into
//! per-session segments (a new one where two consecutive events of a session, in time order, are
//! more than the gap apart) and folds those in exactly as the Python table does.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::chunk_log::ChunkLog;
use crate::columns::Column;
use crate::encode::{iso_millis, ColumnSpec};
use crate::shard_events::{split, Columns, ShardEvents, Texts};

/// A batch's events with a session id, by shard: `length` rows of the columns session_id, tenant,
/// user_id (string_view, as polars holds text) and timestamp (int64 epoch ms), in that order.
#[pyfunction]
pub fn session_events(
    length: usize,
    columns: Vec<ColumnSpec>,
    shards: u32,
) -> PyResult<Vec<(u32, ShardEvents)>> {
    split(
        length,
        columns,
        Columns::Sessions,
        shards,
        |[session_id, ..], key| Ok(session_id.map(|id| key.update(id.as_bytes())).is_some()),
    )
}

/// One session (or, for a session id that came back after the gap, one of its sessions).
#[derive(Clone)]
struct Segment {
    tenant: Arc<str>,
    user_id: Option<Box<str>>,
    start: i64,
    end: i64,
    count: i64,
    revision: i64, // -1: not emitted yet
    dirty: bool,   // changed since it was last emitted
}

type Tuple = (String, Option<String>, i64, i64, i64, i64, bool);
/// A snapshot chunk as `restore` takes it: its bytes, its session ids and their segments.
type DecodedChunk = (Py<PyBytes>, Vec<String>, Vec<Vec<Tuple>>);

impl Segment {
    fn new(tenant: Arc<str>, user_id: Option<&str>, start: i64, end: i64, count: i64) -> Self {
        let user_id = user_id.map(Box::from);
        Segment {
            tenant,
            user_id,
            start,
            end,
            count,
            revision: -1,
            dirty: true,
        }
    }

    fn tuple(&self) -> Tuple {
        let user_id = self.user_id.as_deref().map(String::from);
        let (start, end, count, revision) = (self.start, self.end, self.count, self.revision);
        (
            self.tenant.to_string(),
            user_id,
            start,
            end,
            count,
            revision,
            self.dirty,
        )
    }

    /// Fold a segment in if it comes within `gap` of this one (as `merge` would).
    fn extend(
        &mut self,
        tenant: &Arc<str>,
        user_id: Option<&str>,
        other: (i64, i64, i64),
        gap: i64,
    ) -> bool {
        let (start, end, count) = other;
        if !(self.start - gap <= end && start <= self.end + gap) {
            return false;
        }
        if self.start < start {
            if self.user_id.is_none() {
                self.user_id = user_id.map(Box::from);
            }
        } else {
            self.tenant = tenant.clone();
            if user_id.is_some() {
                self.user_id = user_id.map(Box::from);
            }
            self.start = start;
        }
        self.end = self.end.max(end);
        self.count += count;
        self.dirty = true;
        true
    }
}

/// Fold into `new` the segments of `group` it comes within `gap` of; the segments kept.
fn merge(group: Vec<Segment>, mut new: Segment, gap: i64) -> Vec<Segment> {
    let mut kept = Vec::with_capacity(group.len() + 1);
    for old in group {
        if old.start - gap <= new.end && new.start <= old.end + gap {
            if old.start < new.start {
                new.tenant = old.tenant;
                if old.user_id.is_some() {
                    new.user_id = old.user_id;
                }
            } else if new.user_id.is_none() {
                new.user_id = old.user_id;
            }
            new.start = new.start.min(old.start);
            new.end = new.end.max(old.end);
            new.count += old.count;
            new.revision = new.revision.max(old.revision);
        } else {
            kept.push(old);
        }
    }
    kept.push(new);
    kept
}

/// The sessions of one shard by id, with when to look at each id again.
#[pyclass(module = "pipeline_native")]
pub struct SessionTable {
    gap: i64,
    retention: i64,
    sessions: FxHashMap<Arc<str>, Vec<Segment>>,
    // (when, session id): due no later than the id's next close or expiry; may be early.
    deadlines: BinaryHeap<Reverse<(i64, Arc<str>)>>,
    changed: FxHashSet<Arc<str>>, // written or deleted since the last seal
    tenants: FxHashSet<Arc<str>>,
    log: ChunkLog<Arc<str>>,
}

impl SessionTable {
    fn intern_tenant(&mut self, tenant: &str) -> Arc<str> {
        if let Some(known) = self.tenants.get(tenant) {
            return known.clone();
        }
        let tenant: Arc<str> = Arc::from(tenant);
        self.tenants.insert(tenant.clone());
        tenant
    }

    fn next_due(&self, group: &[Segment]) -> i64 {
        let (gap, retention) = (self.gap, self.retention);
        let due = |s: &Segment| {
            if s.dirty {
                s.end + gap
            } else {
                s.end + gap + retention
            }
        };
        group.iter().map(due).min().expect("a group is never empty")
    }

    fn segments(&mut self, group: Vec<Tuple>) -> Vec<Segment> {
        (group.into_iter())
            .map(
                |(tenant, user_id, start, end, count, revision, dirty)| Segment {
                    tenant: self.intern_tenant(&tenant),
                    user_id: user_id.map(Box::from),
                    start,
                    end,
                    count,
                    revision,
                    dirty,
                },
            )
            .collect()
    }

    fn clear(&mut self) {
        self.sessions.clear();
        self.deadlines.clear();
        self.changed.clear();
        self.log = ChunkLog::default();
    }

    fn derive_deadlines(&mut self) {
        let deadlines = (self.sessions.iter())
            .map(|(id, group)| Reverse((self.next_due(group), id.clone())))
            .collect();
        self.deadlines = deadlines;
    }

    fn absorb_segment(
        &mut self,
        session_id: &str,
        tenant: &str,
        user_id: Option<&str>,
        span: (i64, i64, i64),
        past_retention: i64,
        dropped: &mut i64,
    ) {
        let (start, end, count) = span;
        if end <= past_retention {
            *dropped += count; // ended by the horizon: closed too long ago
            return;
        }
        let tenant = self.intern_tenant(tenant);
        let gap = self.gap;
        let key = match self.sessions.get_key_value(session_id) {
            Some((key, _)) => key.clone(),
            None => Arc::from(session_id),
        };
        self.changed.insert(key.clone());
        let Some(group) = self.sessions.get_mut(&key) else {
            let new = Segment::new(tenant, user_id, start, end, count);
            self.sessions.insert(key.clone(), vec![new]);
            self.deadlines.push(Reverse((end + gap, key)));
            return;
        };
        let due = if group.len() == 1 && group[0].extend(&tenant, user_id, span, gap) {
            if group[0].revision < 0 {
                return; // still open: its entry is due no later than its new close
            }
            group[0].end + gap // a correction: its entry is one for expiry, too late
        } else {
            let new = Segment::new(tenant, user_id, start, end, count);
            *group = merge(std::mem::take(group), new, gap);
            group.last().unwrap().end + gap
        };
        self.deadlines.push(Reverse((due, key)));
    }
}

/// A segment as it was emitted.
struct Closed {
    tenant: Arc<str>,
    user_id: Option<Box<str>>,
    start: i64,
    end: i64,
    count: i64,
    revision: i64,
}

impl Closed {
    fn of(s: &Segment) -> Closed {
        Closed {
            tenant: s.tenant.clone(),
            user_id: s.user_id.clone(),
            start: s.start,
            end: s.end,
            count: s.count,
            revision: s.revision,
        }
    }
}

/// `(rows, columns)` of closed sessions, the columns of `SESSION_SCHEMA` in
/// `operators/sessions.py` as `columns::Column` hands them over: tenant, user_id, session_id,
/// start and end (ISO text with milliseconds), duration_s, event_count, revision.
fn session_columns<'py>(
    py: Python<'py>,
    closed: &[(i64, Arc<str>, Closed)],
) -> PyResult<(usize, Vec<Bound<'py, PyTuple>>)> {
    let n = closed.len();
    let mut texts: Vec<Column> = (0..5).map(|_| Column::text(n)).collect();
    let (mut duration, mut count, mut revision) = (
        Column::fixed(8, n),
        Column::fixed(8, n),
        Column::fixed(8, n),
    );
    for (_, session_id, s) in closed {
        texts[0].push_text(Some(&s.tenant));
        texts[1].push_text(s.user_id.as_deref());
        texts[2].push_text(Some(session_id));
        for (column, ms) in texts[3..].iter_mut().zip([s.start, s.end]) {
            let text = iso_millis(ms)?;
            column.push_text_with(|data| data.extend_from_slice(&text));
        }
        duration.push_value(((s.end - s.start) as f64 / 1000.0).to_le_bytes(), true);
        count.push_value(s.count.to_le_bytes(), true);
        revision.push_value(s.revision.to_le_bytes(), true);
    }
    let columns = texts
        .into_iter()
        .chain([duration, count, revision])
        .map(|c| c.into_python(py))
        .collect::<PyResult<_>>()?;
    Ok((n, columns))
}

#[pymethods]
impl SessionTable {
    #[new]
    fn new(gap_ms: i64, retention_ms: i64) -> Self {
        SessionTable {
            gap: gap_ms,
            retention: retention_ms,
            sessions: FxHashMap::default(),
            deadlines: BinaryHeap::new(),
            changed: FxHashSet::default(),
            tenants: FxHashSet::default(),
            log: ChunkLog::default(),
        }
    }

    /// Fold a batch's events in; returns how many were dropped for ending by `past_retention`.
    fn absorb(&mut self, events: &ShardEvents, past_retention: i64) -> PyResult<i64> {
        let events = events.of(Columns::Sessions)?;
        let [session_ids, tenants, user_ids] = &events.texts;
        let times = &events.times;
        // The events of each session id, stably sorted by time, cut where the gap is exceeded.
        let mut by_session: FxHashMap<&str, Vec<usize>> = FxHashMap::default();
        for i in 0..times.len() {
            let session_id = session_ids.get(i).unwrap_or_default();
            by_session.entry(session_id).or_default().push(i);
        }
        let mut dropped = 0;
        for (session_id, mut rows) in by_session {
            rows.sort_by_key(|&i| times[i]);
            let mut first = 0;
            for k in 1..=rows.len() {
                if k < rows.len() && times[rows[k]] - times[rows[k - 1]] <= self.gap {
                    continue;
                }
                let segment = &rows[first..k];
                let tenant = tenants.get(segment[0]).ok_or_else(|| {
                    PyValueError::new_err(format!("session {session_id}: an event has no tenant"))
                })?;
                let user_id = segment.iter().find_map(|&i| user_ids.get(i));
                let span = (times[segment[0]], times[rows[k - 1]], segment.len() as i64);
                self.absorb_segment(
                    session_id,
                    tenant,
                    user_id,
                    span,
                    past_retention,
                    &mut dropped,
                );
                first = k;
            }
        }
        Ok(dropped)
    }

    /// The sessions that closed (or changed after closing) by `watermark`, as `(rows, columns)`
    /// (see `session_columns`), in the order of their close, then session id; sessions that end
    /// by `horizon` are freed.
    fn emit<'py>(
        &mut self,
        py: Python<'py>,
        watermark: i64,
        horizon: i64,
    ) -> PyResult<(usize, Vec<Bound<'py, PyTuple>>)> {
        let mut closed: Vec<(i64, Arc<str>, Closed)> = Vec::new();
        let gap = self.gap;
        while let Some(Reverse((when, _))) = self.deadlines.peek() {
            if *when > watermark {
                break;
            }
            let Reverse((_, session_id)) = self.deadlines.pop().unwrap();
            let Some(group) = self.sessions.get_mut(&session_id) else {
                continue;
            };
            let mut emitted = false;
            for s in group.iter_mut() {
                let closes_at = s.end + gap;
                if s.dirty && closes_at <= watermark {
                    s.revision += 1;
                    s.dirty = false;
                    closed.push((closes_at, session_id.clone(), Closed::of(s)));
                    emitted = true;
                }
            }
            let before = group.len();
            group.retain(|s| s.end + gap > horizon);
            let expired = group.len() < before;
            if group.is_empty() {
                self.sessions.remove(&session_id);
            } else {
                let due = self.next_due(&self.sessions[&session_id]);
                self.deadlines.push(Reverse((due, session_id.clone())));
            }
            if emitted || expired {
                self.changed.insert(session_id);
            }
        }
        closed.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        session_columns(py, &closed)
    }

    fn __len__(&self) -> usize {
        self.sessions.len()
    }

    fn __contains__(&self, session_id: &str) -> bool {
        self.sessions.contains_key(session_id)
    }

    /// The table's snapshot as chunks (see `ChunkLog`): those kept, then one with the sessions
    /// changed since the last seal.
    fn seal(&mut self, py: Python<'_>) -> PyResult<Vec<Py<PyBytes>>> {
        let changed: Vec<Arc<str>> = self.changed.drain().collect();
        let sessions = &self.sessions;
        self.log.seal(
            py,
            changed,
            |id| sessions.contains_key(id),
            |ids| encode_chunk(py, sessions, ids),
        )
    }

    /// Load a snapshot's chunks, oldest first, each with its session ids and their segments
    /// (`_decode_groups` in `operators/sessions.py`): a later chunk's version of a session id
    /// replaces an earlier one's. Ids whose every segment closed by `horizon` are left out (they
    /// expired; a deletion leaves no tombstone, so an older chunk may still hold them).
    fn restore(&mut self, chunks: Vec<DecodedChunk>, horizon: i64) -> PyResult<()> {
        self.clear();
        for (data, session_ids, groups) in chunks {
            if session_ids.len() != groups.len() {
                return Err(PyValueError::new_err(format!(
                    "a chunk of {} session ids with {} groups",
                    session_ids.len(),
                    groups.len()
                )));
            }
            let keys: Vec<Arc<str>> = session_ids.into_iter().map(Arc::from).collect();
            for (key, group) in keys.iter().zip(groups) {
                let group = self.segments(group);
                self.sessions.insert(key.clone(), group);
            }
            self.log.restore_chunk(data, keys);
        }
        let gap = self.gap;
        let expired: Vec<Arc<str>> = (self.sessions.iter())
            .filter(|(_, group)| !group.iter().any(|s| s.end + gap > horizon))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            self.sessions.remove(id);
        }
        self.log.finish_restore(&expired);
        self.derive_deadlines();
        Ok(())
    }

    /// Replace the sessions by `entries` (session id, its segments as tuples of
    /// (tenant, user_id, start, end, count, revision, dirty)), all of which the next seal writes
    /// (a snapshot from before the chunks); deadlines are derived, one per id.
    fn load(&mut self, entries: Vec<(String, Vec<Tuple>)>) {
        self.clear();
        for (session_id, group) in entries {
            if group.is_empty() {
                continue;
            }
            let group = self.segments(group);
            self.sessions.insert(Arc::from(session_id), group);
        }
        self.changed.extend(self.sessions.keys().cloned());
        self.derive_deadlines();
    }

    /// Chunks held, their bytes, entries written into them and entries still live.
    fn snapshot_stats(&self, py: Python<'_>) -> FxHashMap<&'static str, usize> {
        self.log.stats(py).into_iter().collect()
    }

    /// Every session id with its segments as `load` takes them.
    fn groups(&self) -> Vec<(String, Vec<Tuple>)> {
        let groups = self.sessions.iter();
        groups
            .map(|(id, group)| (id.to_string(), group.iter().map(Segment::tuple).collect()))
            .collect()
    }

    /// The deadline entries, in no particular order.
    #[getter]
    fn deadlines(&self) -> Vec<(i64, String)> {
        self.deadlines
            .iter()
            .map(|Reverse((when, id))| (*when, id.to_string()))
            .collect()
    }
}

/// The sessions of `session_ids` as a snapshot chunk in the packed layout: little-endian columns
/// as bytes (see `_decode_groups` in `operators/sessions.py`), pickled at once.
fn encode_chunk<'py>(
    py: Python<'py>,
    sessions: &FxHashMap<Arc<str>, Vec<Segment>>,
    session_ids: &[Arc<str>],
) -> PyResult<Bound<'py, PyDict>> {
    let mut ids = Texts::default();
    let mut tenants = Texts::default();
    let mut user_ids = Texts::default();
    let (mut per_id, mut dirty) = (Vec::new(), Vec::new());
    let [mut start, mut end, mut count, mut revision] = [(); 4].map(|_| Vec::new());
    for id in session_ids {
        let group =
            (sessions.get(id)).ok_or_else(|| PyValueError::new_err(format!("no session {id}")))?;
        ids.push(Some(id));
        per_id.extend_from_slice(&(group.len() as u32).to_le_bytes());
        for s in group {
            tenants.push(Some(&s.tenant));
            user_ids.push(s.user_id.as_deref());
            start.extend_from_slice(&s.start.to_le_bytes());
            end.extend_from_slice(&s.end.to_le_bytes());
            count.extend_from_slice(&s.count.to_le_bytes());
            revision.extend_from_slice(&s.revision.to_le_bytes());
            dirty.push(s.dirty as u8);
        }
    }
    let chunk = PyDict::new(py);
    chunk.set_item("layout", "packed")?;
    for (name, column) in [
        ("session_id_lengths", ids.lengths()),
        ("session_ids", ids.data.into_bytes()),
        ("segments_per_id", per_id),
        ("tenant_lengths", tenants.lengths()),
        ("tenants", tenants.data.into_bytes()),
        ("user_id_lengths", user_ids.lengths()),
        ("user_ids", user_ids.data.into_bytes()),
        ("start", start),
        ("end", end),
        ("count", count),
        ("revision", revision),
        ("dirty", dirty),
    ] {
        chunk.set_item(name, PyBytes::new(py, &column))?;
    }
    Ok(chunk)
}
