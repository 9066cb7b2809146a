//! The records of one topic partition, read straight from librdkafka's queue of that partition
//! inside a confluent-kafka `Consumer`: no `Message` object and no `bytes` per record. A read
//! hands back the values one after the other in one buffer, with their ends, offsets and
//! timestamps as arrays: what the compiled decoder and the frame of a batch are built from.
//!
//! The partition's queue is taken off the consumer queue (`rd_kafka_queue_forward(queue,
//! NULL)`, as librdkafka documents for reading partitions on their own), so only the partition's
//! records and errors come here. Everything else (client errors, commit results) stays on the
//! consumer queue, which the `Consumer` serves with its callbacks in place (`poll`). The handle
//! comes from the `Consumer` (see `rdkafka`).

use std::ffi::{c_int, CString};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::rdkafka::{Client, Handle, Librdkafka, Message, Queue, RD_KAFKA_CONSUMER};

const PARTITION_EOF: c_int = -191; // RD_KAFKA_RESP_ERR__PARTITION_EOF

/// What one read returns: values, ends, offsets, timestamps, whether the end of the partition
/// was reached, and the other errors as (code, reason, fatal).
type Read<'py> = (
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    bool,
    Vec<(c_int, String, bool)>,
);

#[pyclass]
pub struct RecordReader {
    queue: usize, // rd_kafka_queue_t * of the partition; 0 once closed
    client: Client,
}

#[pymethods]
impl RecordReader {
    /// `consumer`: a confluent-kafka `Consumer` that has `topic`/`partition` assigned;
    /// `library`, `handle_offset`, `client_id`: as for `RecordWriter`.
    #[new]
    fn new(
        consumer: Bound<'_, PyAny>,
        library: &str,
        handle_offset: usize,
        client_id: &str,
        topic: &str,
        partition: i32,
    ) -> PyResult<RecordReader> {
        let client = Client::new(
            consumer,
            library,
            handle_offset,
            RD_KAFKA_CONSUMER,
            client_id,
        )?;
        let (api, name) = (&client.api, CString::new(topic)?);
        // SAFETY: a live consumer; the queue is ours to destroy (`close`, `drop`)
        let queue =
            unsafe { (api.queue_get_partition)(client.handle as Handle, name.as_ptr(), partition) };
        if queue.is_null() {
            return Err(PyValueError::new_err(format!(
                "no queue for {topic}/{partition}"
            )));
        }
        unsafe { (api.queue_forward)(queue, std::ptr::null_mut()) };
        Ok(RecordReader {
            queue: queue as usize,
            client,
        })
    }

    /// Up to `max` records, waiting up to `timeout_ms` for the first. Returns `(values, ends,
    /// offsets, timestamps, ended, errors)`: the values one after the other; the end of each in
    /// `values`, its offset and its timestamp in milliseconds (`now_ms` where the record has
    /// none), as native-endian int64 arrays; whether the end of the partition was reached; other
    /// errors as (code, reason, fatal).
    fn read<'py>(
        &self,
        py: Python<'py>,
        max: usize,
        timeout_ms: i32,
        now_ms: i64,
    ) -> PyResult<Read<'py>> {
        if self.queue == 0 {
            return Err(PyRuntimeError::new_err("the record reader is closed"));
        }
        let api = &self.client.api;
        let mut messages: Vec<*mut Message> = vec![std::ptr::null_mut(); max];
        let (queue, slots) = (self.queue, messages.as_mut_ptr() as usize);
        // SAFETY: the queue is live until `close`; librdkafka fills at most `max` slots
        let count = py.allow_threads(|| unsafe {
            (api.consume_batch_queue)(queue as Queue, timeout_ms, slots as *mut *mut Message, max)
        });
        let count = usize::try_from(count).map_err(|_| {
            PyRuntimeError::new_err("rd_kafka_consume_batch_queue failed on the partition queue")
        })?;
        messages.truncate(count);
        let owned = Owned { api, messages };
        // SAFETY: each message is ours until `owned` destroys it, after its last use here
        let taken: Vec<&Message> = owned.messages.iter().map(|&m| unsafe { &*m }).collect();
        let payload = |m: &Message| -> &[u8] {
            if m.payload.is_null() {
                &[]
            } else {
                unsafe { std::slice::from_raw_parts(m.payload, m.len) }
            }
        };
        let records: Vec<&Message> = taken.iter().copied().filter(|m| m.err == 0).collect();
        let total = records.iter().map(|m| m.len).sum();
        let values = PyBytes::new_with(py, total, |buffer| {
            let mut at = 0;
            for m in &records {
                buffer[at..at + m.len].copy_from_slice(payload(m));
                at += m.len;
            }
            Ok(())
        })?;
        let (mut ends, mut offsets, mut stamps) = (
            Vec::with_capacity(records.len() * 8),
            Vec::with_capacity(records.len() * 8),
            Vec::with_capacity(records.len() * 8),
        );
        let mut end = 0i64;
        for m in &records {
            end += m.len as i64;
            ends.extend_from_slice(&end.to_ne_bytes());
            offsets.extend_from_slice(&m.offset.to_ne_bytes());
            let mut kind: c_int = 0;
            // SAFETY: a live message
            let stamp = unsafe { (api.message_timestamp)(*m, &mut kind) };
            stamps.extend_from_slice(&(if stamp > 0 { stamp } else { now_ms }).to_ne_bytes());
        }
        let mut ended = false;
        let mut errors = Vec::new();
        for m in taken.iter().filter(|m| m.err != 0) {
            if m.err == PARTITION_EOF {
                ended = true;
                continue;
            }
            let reason = if m.payload.is_null() {
                api.describe(m.err)
            } else {
                String::from_utf8_lossy(payload(m)).into_owned()
            };
            // SAFETY: a live consumer; no error text is asked for
            let fatal =
                unsafe { (api.fatal_error)(self.client.handle as Handle, std::ptr::null_mut(), 0) }
                    != 0;
            errors.push((m.err, reason, fatal));
        }
        Ok((
            values,
            PyBytes::new(py, &ends),
            PyBytes::new(py, &offsets),
            PyBytes::new(py, &stamps),
            ended,
            errors,
        ))
    }

    /// Gives the partition queue back; call before closing the `Consumer`.
    fn close(&mut self) {
        if self.queue != 0 {
            // SAFETY: our reference, released once
            unsafe { (self.client.api.queue_destroy)(self.queue as Queue) };
            self.queue = 0;
        }
    }
}

/// Messages taken from librdkafka, destroyed when this goes (an error on the way included).
struct Owned<'a> {
    api: &'a Librdkafka,
    messages: Vec<*mut Message>,
}

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        for &m in &self.messages {
            // SAFETY: each message was taken once and is destroyed once
            unsafe { (self.api.message_destroy)(m) };
        }
    }
}

impl Drop for RecordReader {
    fn drop(&mut self) {
        self.close();
    }
}
