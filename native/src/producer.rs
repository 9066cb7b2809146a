//! Kafka records of a frame, encoded from its Arrow buffers and handed straight to the librdkafka
//! producer inside a confluent-kafka `Producer`: no Python object per record, and one C call each
//! instead of a `Producer.produce` call (argument parsing, a topic lookup by name). The
//! `Producer` keeps doing everything else (transactions, poll, flush), so the records join its
//! open transaction. The handle comes from the `Producer` (see `rdkafka`).

use std::ffi::{c_int, c_void, CString};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::encode::{ColumnSpec, RowEncoder, TextColumn};
use crate::rdkafka::{Client, Handle, RD_KAFKA_PRODUCER};

const RD_KAFKA_MSG_F_COPY: c_int = 0x2;
const QUEUE_FULL: c_int = -184; // RD_KAFKA_RESP_ERR__QUEUE_FULL

// rd_kafka_vtype_t
const VTYPE_END: c_int = 0;
const VTYPE_RKT: c_int = 2;
const VTYPE_VALUE: c_int = 4;
const VTYPE_KEY: c_int = 5;
const VTYPE_MSGFLAGS: c_int = 7;

/// `rd_kafka_vu_t`: a type tag and a 64-byte union.
#[repr(C)]
#[derive(Clone, Copy)]
struct Vu {
    vtype: c_int,
    value: VuValue,
}

#[repr(C)]
#[derive(Clone, Copy)]
union VuValue {
    ptr: *const c_void,
    int: c_int,
    mem: (*const c_void, usize),
    _pad: [u8; 64],
}

impl Vu {
    fn ptr(vtype: c_int, ptr: *const c_void) -> Vu {
        Vu {
            vtype,
            value: VuValue { ptr },
        }
    }
    fn int(vtype: c_int, int: c_int) -> Vu {
        Vu {
            vtype,
            value: VuValue { int },
        }
    }
    fn mem(vtype: c_int, bytes: &[u8]) -> Vu {
        let mem = (bytes.as_ptr().cast(), bytes.len());
        Vu {
            vtype,
            value: VuValue { mem },
        }
    }
}

/// Produces the rows of a frame through the librdkafka handle of a confluent-kafka `Producer`.
#[pyclass(frozen)]
pub struct RecordWriter {
    client: Client,
}

#[pymethods]
impl RecordWriter {
    /// `producer`: a confluent-kafka `Producer`; `library`, `handle_offset`: see `Client`;
    /// `client_id`: the producer's `client.id`.
    #[new]
    fn new(
        producer: Bound<'_, PyAny>,
        library: &str,
        handle_offset: usize,
        client_id: &str,
    ) -> PyResult<RecordWriter> {
        let client = Client::new(
            producer,
            library,
            handle_offset,
            RD_KAFKA_PRODUCER,
            client_id,
        )?;
        Ok(RecordWriter { client })
    }

    /// Produces rows `start..length` of `columns` to `topic` as JSON values (as `json_rows`
    /// writes them), keyed by the text column `keys` (a null: no key; partitioned by key, as
    /// `produce` does), until all are queued or the local queue is full; returns the index of
    /// the first row not produced. A row it cannot write raises ValueError before any is
    /// produced; a record librdkafka refuses raises `confluent_kafka.KafkaException`.
    #[pyo3(signature = (topic, length, columns, keys, start=0))]
    fn produce(
        &self,
        py: Python<'_>,
        topic: &str,
        length: usize,
        columns: Vec<ColumnSpec>,
        keys: Option<ColumnSpec>,
        start: usize,
    ) -> PyResult<usize> {
        let encoder = RowEncoder::new(length, columns)?;
        encoder.check(length)?;
        let keys = keys.map(|spec| TextColumn::new(length, spec)).transpose()?;
        let api = &self.client.api;
        let name = CString::new(topic)?;
        // SAFETY: `handle` is a live producer (the Producer object is kept alive)
        let topic_handle = unsafe {
            (api.topic_new)(
                self.client.handle as Handle,
                name.as_ptr(),
                std::ptr::null_mut(),
            )
        };
        if topic_handle.is_null() {
            return Err(PyValueError::new_err(format!(
                "no topic handle for {topic}"
            )));
        }
        // raw pointers are not Send: they cross into the GIL-free closure as addresses
        let (handle, topic_handle) = (self.client.handle, topic_handle as usize);
        let (next, error) = py.allow_threads(|| {
            let (handle, topic_handle) = (handle as Handle, topic_handle as *mut c_void);
            let mut value = Vec::with_capacity(4096);
            let mut produce_from = |mut next: usize| -> PyResult<(usize, c_int)> {
                while next < length {
                    value.clear();
                    encoder.write(next, &mut value)?; // cannot fail: checked above
                    let key = match &keys {
                        Some(keys) => keys.get(next)?,
                        None => None,
                    };
                    let args = [
                        Vu::ptr(VTYPE_RKT, topic_handle),
                        Vu::int(VTYPE_MSGFLAGS, RD_KAFKA_MSG_F_COPY),
                        Vu::mem(VTYPE_VALUE, &value),
                        key.map_or(Vu::int(VTYPE_END, 0), |key| Vu::mem(VTYPE_KEY, key)),
                    ];
                    let count = if key.is_some() { 4 } else { 3 };
                    // SAFETY: librdkafka copies value and key (F_COPY) before produceva returns
                    unsafe {
                        let failure = (api.produceva)(handle, args.as_ptr().cast(), count);
                        if !failure.is_null() {
                            let error = (api.error_code)(failure);
                            (api.error_destroy)(failure);
                            return Ok((next, error));
                        }
                    }
                    next += 1;
                }
                Ok((next, 0))
            };
            let outcome = produce_from(start);
            // SAFETY: queued records hold their own references to the topic
            unsafe { (api.topic_destroy)(topic_handle) };
            outcome
        })?;
        if error != 0 && error != QUEUE_FULL {
            let kafka = py.import("confluent_kafka")?;
            let reason = kafka.getattr("KafkaError")?.call1((error,))?;
            return Err(PyErr::from_value(
                kafka.getattr("KafkaException")?.call1((reason,))?,
            ));
        }
        Ok(next)
    }
}
