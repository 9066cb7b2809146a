//! Kafka records of a frame, encoded from its Arrow buffers and handed straight to the librdkafka
//! producer inside a confluent-kafka `Producer`: no Python object per record, and one C call each
//! instead of a `Producer.produce` call (argument parsing, a topic lookup by name). The
//! `Producer` keeps doing everything else (transactions, poll, flush), so the records join its
//! open transaction.
//!
//! librdkafka's functions come from the library confluent-kafka loaded (found through its
//! compiled module), and the `rd_kafka_t` from the `Producer` object: the first field after the
//! Python object header, where confluent-kafka's `Handle` has kept it since its first release.
//! `RecordWriter::new` checks that it is a producer handle with the configured client id.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::encode::{ColumnSpec, RowEncoder, TextColumn};

type Handle = *mut c_void;

const RD_KAFKA_PRODUCER: c_int = 0;
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

extern "C" {
    fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn dlerror() -> *const c_char;
}
const RTLD_NOW: c_int = 2;

/// The librdkafka functions used here.
struct Librdkafka {
    produceva: unsafe extern "C" fn(Handle, *const Vu, usize) -> *mut c_void,
    error_code: unsafe extern "C" fn(*const c_void) -> c_int,
    error_destroy: unsafe extern "C" fn(*mut c_void),
    topic_new: unsafe extern "C" fn(Handle, *const c_char, *mut c_void) -> *mut c_void,
    topic_destroy: unsafe extern "C" fn(*mut c_void),
    name: unsafe extern "C" fn(Handle) -> *const c_char,
    kind: unsafe extern "C" fn(Handle) -> c_int,
}

impl Librdkafka {
    /// The functions as the shared object `path` (or one it depends on) defines them.
    fn load(path: &str) -> PyResult<Librdkafka> {
        let path = CString::new(path)?;
        // SAFETY: a library that is already loaded (as confluent-kafka's is) is only referenced
        // again, never unloaded; each symbol is read as the type librdkafka declares it with.
        unsafe {
            let library = dlopen(path.as_ptr(), RTLD_NOW);
            if library.is_null() {
                return Err(PyRuntimeError::new_err(format!(
                    "dlopen: {}",
                    last_dl_error()
                )));
            }
            Ok(Librdkafka {
                produceva: function(library, "rd_kafka_produceva")?,
                error_code: function(library, "rd_kafka_error_code")?,
                error_destroy: function(library, "rd_kafka_error_destroy")?,
                topic_new: function(library, "rd_kafka_topic_new")?,
                topic_destroy: function(library, "rd_kafka_topic_destroy")?,
                name: function(library, "rd_kafka_name")?,
                kind: function(library, "rd_kafka_type")?,
            })
        }
    }
}

/// The function `name` of a loaded `library` as `F`, an `unsafe extern "C" fn` type.
///
/// # Safety
/// `F` must be the function's C signature.
unsafe fn function<F: Copy>(library: *mut c_void, name: &str) -> PyResult<F> {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    let c_name = CString::new(name)?;
    let found = dlsym(library, c_name.as_ptr());
    if found.is_null() {
        return Err(PyRuntimeError::new_err(format!(
            "{name} not found in librdkafka"
        )));
    }
    Ok(std::mem::transmute_copy(&found))
}

fn last_dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated message
    let message = unsafe { dlerror() };
    if message.is_null() {
        return "unknown error".into();
    }
    unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned()
}

/// Produces the rows of a frame through the librdkafka handle of a confluent-kafka `Producer`.
#[pyclass(frozen)]
pub struct RecordWriter {
    handle: usize, // rd_kafka_t *
    librdkafka: Librdkafka,
    _producer: Py<PyAny>, // keeps the handle alive
}

#[pymethods]
impl RecordWriter {
    /// `producer`: a confluent-kafka `Producer`; `library`: the path of confluent-kafka's
    /// compiled module; `handle_offset`: the size of a Python object header
    /// (`object.__basicsize__`); `client_id`: the producer's `client.id`.
    #[new]
    fn new(
        producer: Bound<'_, PyAny>,
        library: &str,
        handle_offset: usize,
        client_id: &str,
    ) -> PyResult<RecordWriter> {
        let librdkafka = Librdkafka::load(library)?;
        // SAFETY: a confluent-kafka Handle holds its rd_kafka_t * right after the object header
        let handle = unsafe {
            *(producer.as_ptr() as *const u8)
                .add(handle_offset)
                .cast::<Handle>()
        };
        let expected = format!("{client_id}#producer-");
        let is_producer = !handle.is_null()
            && unsafe { (librdkafka.kind)(handle) } == RD_KAFKA_PRODUCER
            && unsafe { CStr::from_ptr((librdkafka.name)(handle)) }
                .to_bytes()
                .starts_with(expected.as_bytes());
        if !is_producer {
            return Err(PyRuntimeError::new_err(
                "not the librdkafka producer of this Producer (confluent-kafka changed its layout?)",
            ));
        }
        Ok(RecordWriter {
            handle: handle as usize,
            librdkafka,
            _producer: producer.unbind(),
        })
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
        let api = &self.librdkafka;
        let name = CString::new(topic)?;
        // SAFETY: `handle` is a live producer (the Producer object is kept alive)
        let topic_handle =
            unsafe { (api.topic_new)(self.handle as Handle, name.as_ptr(), std::ptr::null_mut()) };
        if topic_handle.is_null() {
            return Err(PyValueError::new_err(format!(
                "no topic handle for {topic}"
            )));
        }
        // raw pointers are not Send: they cross into the GIL-free closure as addresses
        let (handle, topic_handle) = (self.handle, topic_handle as usize);
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
                        let failure = (api.produceva)(handle, args.as_ptr(), count);
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
