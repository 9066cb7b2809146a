//! Kafka records of a frame, encoded from its Arrow buffers and handed straight to the librdkafka
//! producer inside a confluent-kafka `Producer`: no Python object per record, and one C call each
//! instead of a `Producer.produce` call (argument parsing, a topic lookup by name). The
//! `Producer` keeps doing everything else (transactions, poll, flush), so the records join its
//! open transaction. The handle comes from the `Producer` (see `rdkafka`).
//!
//! Encoding and queueing run on a thread of the writer's own, which never takes the GIL: the
//! dataflow's worker thread (the one Python thread that does all the work) only checks a frame
//! and hands it over, and goes on with the next batch meanwhile.

use std::collections::VecDeque;
use std::ffi::{c_int, c_void, CString};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::encode::{ColumnSpec, RowEncoder, TextColumn};
use crate::rdkafka::{Client, Handle, Librdkafka, RD_KAFKA_PRODUCER};

const RD_KAFKA_MSG_F_COPY: c_int = 0x2;
const QUEUE_FULL: c_int = -184; // RD_KAFKA_RESP_ERR__QUEUE_FULL
const INVALID_ARG: c_int = -186; // RD_KAFKA_RESP_ERR__INVALID_ARG
const UNKNOWN_TOPIC: c_int = -188; // RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC

/// The name of a writer's thread (`dataflows.priorities` lowers its priority below the worker's).
const WRITER_THREAD: &str = "kafka-writer";

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

/// A frame to produce: its rows' encoder and keys, borrowing the Arrow buffers that `keepalive`
/// holds.
struct Job {
    topic: CString,
    length: usize,
    encoder: RowEncoder<'static>,
    keys: Option<TextColumn<'static>>,
    keepalive: Py<PyAny>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    pending: usize, // frames queued or being produced
    // The Arrow arrays of produced frames: released by the next call from Python (with the GIL)
    finished: Vec<Py<PyAny>>,
    error: Option<c_int>, // the first error librdkafka returned; later frames are dropped
    closing: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    queued: Condvar,   // a frame was queued, or the writer is closing
    produced: Condvar, // `pending` went down
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Produces the rows of frames through the librdkafka handle of a confluent-kafka `Producer`.
#[pyclass(frozen)]
pub struct RecordWriter {
    client: Client,
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
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
        Ok(RecordWriter {
            client,
            shared: Arc::default(),
            worker: Mutex::new(None),
        })
    }

    /// Queues rows `0..length` of `columns` to be produced to `topic` as JSON values (as
    /// `json_rows` writes them), keyed by the text column `keys` (a null: no key; partitioned by
    /// key, as `produce` does). `keepalive` holds the Arrow arrays of the buffers until they are
    /// produced. A row it cannot write raises ValueError and nothing is queued; an error of an
    /// earlier frame raises `confluent_kafka.KafkaException`.
    fn submit(
        &self,
        py: Python<'_>,
        topic: &str,
        length: usize,
        columns: Vec<ColumnSpec>,
        keys: Option<ColumnSpec>,
        keepalive: Py<PyAny>,
    ) -> PyResult<()> {
        self.settle(py)?;
        let encoder = RowEncoder::new(length, columns)?;
        encoder.check(length)?;
        let keys = keys.map(|spec| TextColumn::new(length, spec)).transpose()?;
        let job = Job {
            topic: CString::new(topic)?,
            length,
            encoder,
            keys,
            keepalive,
        };
        self.start_worker()?;
        let mut state = self.shared.lock();
        state.pending += 1;
        state.queue.push_back(job);
        self.shared.queued.notify_one();
        Ok(())
    }

    /// Waits up to `timeout` seconds (without the GIL) until fewer than `below` frames are
    /// queued or being produced; True if so. Raises the error a frame met, if one did.
    #[pyo3(signature = (timeout, below=1))]
    fn wait(&self, py: Python<'_>, timeout: f64, below: usize) -> PyResult<bool> {
        let shared = Arc::clone(&self.shared);
        let done = py.allow_threads(move || {
            let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
            let mut state = shared.lock();
            while state.pending >= below && state.error.is_none() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                state = shared
                    .produced
                    .wait_timeout(state, left)
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0;
            }
            state.pending < below
        });
        self.settle(py)?;
        Ok(done)
    }
}

impl RecordWriter {
    /// Releases the arrays of produced frames; raises the error a frame met.
    fn settle(&self, py: Python<'_>) -> PyResult<()> {
        let (finished, error) = {
            let mut state = self.shared.lock();
            (std::mem::take(&mut state.finished), state.error)
        };
        drop(finished);
        match error {
            Some(code) => {
                let kafka = py.import("confluent_kafka")?;
                let reason = kafka.getattr("KafkaError")?.call1((code,))?;
                Err(PyErr::from_value(
                    kafka.getattr("KafkaException")?.call1((reason,))?,
                ))
            }
            None => Ok(()),
        }
    }

    fn start_worker(&self) -> PyResult<()> {
        let mut worker = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if worker.is_none() {
            let (shared, handle, api) = (
                Arc::clone(&self.shared),
                self.client.handle,
                self.client.api,
            );
            let thread = std::thread::Builder::new()
                .name(WRITER_THREAD.into())
                .spawn(move || produce_queued(&shared, handle, api))?;
            *worker = Some(thread);
        }
        Ok(())
    }
}

impl Drop for RecordWriter {
    /// Stops the thread (frames not produced yet are dropped: the transaction they belong to is
    /// not committed) before the `Producer` can go.
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.queued.notify_one();
        let worker = self.worker.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(worker) = worker.take() {
            let _ = worker.join();
        }
    }
}

/// The writer's thread: produces queued frames in order until the writer closes.
fn produce_queued(shared: &Shared, handle: usize, api: Librdkafka) {
    let mut value = Vec::with_capacity(4096);
    loop {
        let (job, failed) = {
            let mut state = shared.lock();
            loop {
                if state.closing {
                    return;
                }
                if let Some(job) = state.queue.pop_front() {
                    break (job, state.error.is_some());
                }
                state = shared
                    .queued
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        };
        let error = if failed {
            0
        } else {
            produce_job(&job, handle, &api, &mut value, shared)
        };
        let mut state = shared.lock();
        if error != 0 && state.error.is_none() {
            state.error = Some(error);
        }
        state.pending -= 1;
        state.finished.push(job.keepalive);
        shared.produced.notify_all();
    }
}

/// Queues every row of `job`; waits while librdkafka's queue is full (its broker threads empty
/// it). Returns 0, or the error librdkafka returned (the rest of the frame is not produced).
fn produce_job(
    job: &Job,
    handle: usize,
    api: &Librdkafka,
    value: &mut Vec<u8>,
    shared: &Shared,
) -> c_int {
    let handle = handle as Handle;
    // SAFETY: `handle` is a live producer: the writer holds the Producer and joins this thread
    let topic = unsafe { (api.topic_new)(handle, job.topic.as_ptr(), std::ptr::null_mut()) };
    if topic.is_null() {
        return UNKNOWN_TOPIC;
    }
    let mut error = 0;
    let mut row = 0;
    while row < job.length {
        value.clear();
        // cannot fail: `submit` checked every row and key
        if job.encoder.write(row, value).is_err() {
            error = INVALID_ARG;
            break;
        }
        let key = job
            .keys
            .as_ref()
            .and_then(|keys| keys.get(row).ok().flatten());
        let args = [
            Vu::ptr(VTYPE_RKT, topic),
            Vu::int(VTYPE_MSGFLAGS, RD_KAFKA_MSG_F_COPY),
            Vu::mem(VTYPE_VALUE, value),
            key.map_or(Vu::int(VTYPE_END, 0), |key| Vu::mem(VTYPE_KEY, key)),
        ];
        let count = if key.is_some() { 4 } else { 3 };
        // SAFETY: librdkafka copies value and key (F_COPY) before produceva returns
        let code = unsafe {
            let failure = (api.produceva)(handle, args.as_ptr().cast(), count);
            if failure.is_null() {
                0
            } else {
                let code = (api.error_code)(failure);
                (api.error_destroy)(failure);
                code
            }
        };
        match code {
            0 => row += 1,
            // Room comes back as delivered records are freed, which happens when the Producer
            // is polled (confluent-kafka asks for every delivery report and drops the successful
            // ones itself): the worker polls while it waits for this thread
            QUEUE_FULL if !shared.lock().closing => std::thread::sleep(Duration::from_millis(1)),
            _ => {
                error = code;
                break;
            }
        }
    }
    // SAFETY: queued records hold their own references to the topic
    unsafe { (api.topic_destroy)(topic) };
    error
}
