//! `SnapshotLog` (`operators/snapshot_log.py`, the specification) kept by a compiled table: the
//! table's snapshot as pickled chunks, oldest first. Each seal writes one new chunk with the
//! entries changed since the one before, rewrites the chunks that are half dead or more, and
//! absorbs the chunks before the new one while they hold no more live entries than it.
//!
//! Kept beside the table so that the keys an epoch changed (tens of thousands a second, live)
//! never cross into Python: done there, the bookkeeping cost more than the rest of the epoch.

use std::hash::Hash;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use rustc_hash::FxHashMap;

struct Chunk<K> {
    id: u64,
    data: Py<PyBytes>, // the pickled chunk
    keys: Vec<K>,      // every key written into it, live or not
    live: usize,       // keys whose latest version is this chunk's
}

pub(crate) struct ChunkLog<K> {
    chunks: Vec<Chunk<K>>,
    home: FxHashMap<K, u64>, // key → the id of the chunk with its latest version
    next_id: u64,
}

impl<K> Default for ChunkLog<K> {
    fn default() -> Self {
        ChunkLog {
            chunks: Vec::new(),
            home: FxHashMap::default(),
            next_id: 0,
        }
    }
}

impl<K: Eq + Hash + Clone> ChunkLog<K> {
    /// The snapshot as chunks: those kept, then one with the `changed` keys that are still
    /// `present` (a deleted key gets no tombstone, see the specification) and the live keys of
    /// the chunks it replaces, written by `encode` as a dict to pickle.
    pub(crate) fn seal<'py>(
        &mut self,
        py: Python<'py>,
        changed: Vec<K>,
        present: impl Fn(&K) -> bool,
        encode: impl FnOnce(&[K]) -> PyResult<Bound<'py, PyDict>>,
    ) -> PyResult<Vec<Py<PyBytes>>> {
        for key in &changed {
            if let Some(id) = self.home.remove(key) {
                if let Some(chunk) = self.chunks.iter_mut().find(|chunk| chunk.id == id) {
                    chunk.live -= 1;
                }
            }
        }
        let mut keys: Vec<K> = changed.into_iter().filter(|key| present(key)).collect();
        let mut kept = Vec::with_capacity(self.chunks.len() + 1);
        for chunk in std::mem::take(&mut self.chunks) {
            if chunk.live * 2 <= chunk.keys.len() {
                keys.extend(self.live_keys(&chunk));
            } else {
                kept.push(chunk);
            }
        }
        while let Some(last) = kept.last() {
            if last.live > keys.len() {
                break;
            }
            let absorbed = kept.pop().expect("a last chunk");
            keys.extend(self.live_keys(&absorbed));
        }
        if !keys.is_empty() {
            let pickle = py.import("pickle")?;
            let protocol = pickle.getattr("HIGHEST_PROTOCOL")?;
            let data = pickle
                .call_method1("dumps", (encode(&keys)?, protocol))?
                .downcast_into::<PyBytes>()?
                .unbind();
            let id = self.new_id();
            for key in &keys {
                self.home.insert(key.clone(), id);
            }
            let live = keys.len();
            kept.push(Chunk {
                id,
                data,
                keys,
                live,
            });
        }
        self.chunks = kept;
        Ok(self.chunks.iter().map(|c| c.data.clone_ref(py)).collect())
    }

    /// Take over a snapshot's chunk, oldest first, with the keys written into it: a later
    /// chunk's version of a key is its latest. `finish_restore` when all are in.
    pub(crate) fn restore_chunk(&mut self, data: Py<PyBytes>, keys: Vec<K>) {
        let id = self.new_id();
        for key in &keys {
            self.home.insert(key.clone(), id);
        }
        self.chunks.push(Chunk {
            id,
            data,
            keys,
            live: 0,
        });
    }

    /// After the chunks are restored: `dropped` keys (those the restore leaves out) are no
    /// chunk's live entries; every other key counts for the chunk with its latest version.
    pub(crate) fn finish_restore<'a>(&mut self, dropped: impl IntoIterator<Item = &'a K>)
    where
        K: 'a,
    {
        for key in dropped {
            self.home.remove(key);
        }
        let index: FxHashMap<u64, usize> = (self.chunks.iter().enumerate())
            .map(|(i, chunk)| (chunk.id, i))
            .collect();
        for id in self.home.values() {
            self.chunks[index[id]].live += 1;
        }
    }

    /// Chunks held, their bytes, entries written into them and entries still live.
    pub(crate) fn stats(&self, py: Python<'_>) -> [(&'static str, usize); 4] {
        [
            ("chunks", self.chunks.len()),
            (
                "bytes",
                (self.chunks.iter())
                    .map(|chunk| chunk.data.bind(py).as_bytes().len())
                    .sum(),
            ),
            (
                "entries",
                self.chunks.iter().map(|chunk| chunk.keys.len()).sum(),
            ),
            ("live", self.home.len()),
        ]
    }

    fn live_keys<'a>(&'a self, chunk: &'a Chunk<K>) -> impl Iterator<Item = K> + 'a {
        (chunk.keys.iter())
            .filter(|key| self.home.get(*key) == Some(&chunk.id))
            .cloned()
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}
