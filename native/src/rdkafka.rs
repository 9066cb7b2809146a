//! The librdkafka that confluent-kafka loaded, and the `rd_kafka_t` inside its client objects.
//!
//! librdkafka's functions come from the library confluent-kafka loaded (found through its
//! compiled module), and the `rd_kafka_t` from a `Producer` or `Consumer` object: the first field
//! after the Python object header, where confluent-kafka's `Handle` has kept it since its first
//! release. `client_handle` checks that it is a client of the expected kind and client id.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

pub type Handle = *mut c_void;
pub type Queue = *mut c_void;

pub const RD_KAFKA_PRODUCER: c_int = 0;
pub const RD_KAFKA_CONSUMER: c_int = 1;

/// `rd_kafka_message_t`, as librdkafka declares it.
#[repr(C)]
pub struct Message {
    pub err: c_int,
    pub rkt: *mut c_void,
    pub partition: i32,
    pub payload: *const u8,
    pub len: usize,
    pub key: *const c_void,
    pub key_len: usize,
    pub offset: i64,
    pub private: *mut c_void,
}

extern "C" {
    fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn dlerror() -> *const c_char;
}
const RTLD_NOW: c_int = 2;

/// The librdkafka functions used here.
#[derive(Clone, Copy)]
pub struct Librdkafka {
    pub produceva: unsafe extern "C" fn(Handle, *const c_void, usize) -> *mut c_void,
    pub error_code: unsafe extern "C" fn(*const c_void) -> c_int,
    pub error_destroy: unsafe extern "C" fn(*mut c_void),
    pub topic_new: unsafe extern "C" fn(Handle, *const c_char, *mut c_void) -> *mut c_void,
    pub topic_destroy: unsafe extern "C" fn(*mut c_void),
    pub name: unsafe extern "C" fn(Handle) -> *const c_char,
    pub kind: unsafe extern "C" fn(Handle) -> c_int,
    pub queue_get_partition: unsafe extern "C" fn(Handle, *const c_char, i32) -> Queue,
    pub queue_forward: unsafe extern "C" fn(Queue, Queue),
    pub queue_destroy: unsafe extern "C" fn(Queue),
    pub consume_batch_queue: unsafe extern "C" fn(Queue, c_int, *mut *mut Message, usize) -> isize,
    pub message_timestamp: unsafe extern "C" fn(*const Message, *mut c_int) -> i64,
    pub message_destroy: unsafe extern "C" fn(*mut Message),
    pub err2str: unsafe extern "C" fn(c_int) -> *const c_char,
    pub fatal_error: unsafe extern "C" fn(Handle, *mut c_char, usize) -> c_int,
}

impl Librdkafka {
    /// The functions as the shared object `path` (or one it depends on) defines them.
    pub fn load(path: &str) -> PyResult<Librdkafka> {
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
                queue_get_partition: function(library, "rd_kafka_queue_get_partition")?,
                queue_forward: function(library, "rd_kafka_queue_forward")?,
                queue_destroy: function(library, "rd_kafka_queue_destroy")?,
                consume_batch_queue: function(library, "rd_kafka_consume_batch_queue")?,
                message_timestamp: function(library, "rd_kafka_message_timestamp")?,
                message_destroy: function(library, "rd_kafka_message_destroy")?,
                err2str: function(library, "rd_kafka_err2str")?,
                fatal_error: function(library, "rd_kafka_fatal_error")?,
            })
        }
    }

    /// The `rd_kafka_t` of a confluent-kafka client object, checked to be of `kind`
    /// (`RD_KAFKA_PRODUCER`/`RD_KAFKA_CONSUMER`) with the client id `client_id`.
    pub fn client_handle(
        &self,
        client: &Bound<'_, PyAny>,
        handle_offset: usize,
        kind: c_int,
        client_id: &str,
    ) -> PyResult<Handle> {
        // SAFETY: a confluent-kafka Handle holds its rd_kafka_t * right after the object header
        let handle = unsafe {
            *(client.as_ptr() as *const u8)
                .add(handle_offset)
                .cast::<Handle>()
        };
        let role = if kind == RD_KAFKA_PRODUCER {
            "producer"
        } else {
            "consumer"
        };
        let expected = format!("{client_id}#{role}-");
        let matches = !handle.is_null()
            && unsafe { (self.kind)(handle) } == kind
            && unsafe { CStr::from_ptr((self.name)(handle)) }
                .to_bytes()
                .starts_with(expected.as_bytes());
        if !matches {
            return Err(PyRuntimeError::new_err(format!(
                "not the librdkafka {role} of this object (confluent-kafka changed its layout?)"
            )));
        }
        Ok(handle)
    }

    /// librdkafka's description of an error code.
    pub fn describe(&self, code: c_int) -> String {
        // SAFETY: rd_kafka_err2str returns a static NUL-terminated string for any code
        unsafe { CStr::from_ptr((self.err2str)(code)) }
            .to_string_lossy()
            .into_owned()
    }
}

/// The librdkafka handle of a confluent-kafka client object, and the library's functions. Holds
/// the object, so that the handle stays alive.
pub struct Client {
    pub handle: usize, // rd_kafka_t *, as an address: raw pointers do not cross threads
    pub api: Librdkafka,
    _object: Py<PyAny>,
}

impl Client {
    /// The client `object`, checked to be a `kind` with `client_id` (see `client_handle`);
    /// `library`: the path of confluent-kafka's compiled module; `handle_offset`: the size of
    /// a Python object header (`object.__basicsize__`).
    pub fn new(
        object: Bound<'_, PyAny>,
        library: &str,
        handle_offset: usize,
        kind: c_int,
        client_id: &str,
    ) -> PyResult<Client> {
        let api = Librdkafka::load(library)?;
        let handle = api.client_handle(&object, handle_offset, kind, client_id)?;
        Ok(Client {
            handle: handle as usize,
            api,
            _object: object.unbind(),
        })
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
