import ctypes
import os
import sys
import threading
import time

import pytest

from dataflows import priorities

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="thread names and nice: Linux")

PR_SET_NAME = 15


def _named_thread(name: bytes, ready: threading.Event, done: threading.Event, ids: dict):
    def run():
        ctypes.CDLL(None).prctl(PR_SET_NAME, name, 0, 0, 0)
        ids[name] = threading.get_native_id()
        ready.set()
        done.wait(10)

    return threading.Thread(target=run, daemon=True)


def test_only_helper_threads_get_the_lower_priority():
    names = (b"rdk:broker7", b"kafka-writer", b"polars-0", b"rdk-lookalike")
    done, ids = threading.Event(), {}
    started = []
    for name in names:
        ready = threading.Event()
        _named_thread(name, ready, done, ids).start()
        started.append(ready)
    try:
        assert all(ready.wait(10) for ready in started)
        # every helper of this process, these two and any a Kafka client of another test left
        helpers = [
            tid
            for tid, name in priorities.thread_names().items()
            if name.startswith(("rdk:", "kafka-w"))
        ]
        assert sum(os.getpriority(os.PRIO_PROCESS, tid) < 7 for tid in helpers) >= 2
        # (at least ours: such a leftover client may start or end threads meanwhile)
        assert priorities.lower_helper_threads(7) >= 2
        expected = {b"rdk:broker7": 7, b"kafka-writer": 7, b"polars-0": 0, b"rdk-lookalike": 0}
        nice = {name: os.getpriority(os.PRIO_PROCESS, tid) for name, tid in ids.items()}
        assert nice == expected
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0  # the worker's
        # threads already at (or below) that priority are left as they are
        priorities.lower_helper_threads(7)
        priorities.lower_helper_threads(3)
        nice = {name: os.getpriority(os.PRIO_PROCESS, tid) for name, tid in ids.items()}
        assert nice == expected
    finally:
        done.set()


def test_threads_whose_role_is_known_are_not_read_again():
    done, renamed, ids = threading.Event(), threading.Event(), {}
    ready = {name: threading.Event() for name in (b"rdk:broker8", b"polars-1")}
    threads = [_named_thread(name, ready[name], done, ids) for name in ready]
    unnamed_ready, rename = threading.Event(), threading.Event()

    def unnamed():  # keeps the name it inherits until told to name itself a writer
        ids["unnamed"] = threading.get_native_id()
        unnamed_ready.set()
        rename.wait(10)
        ctypes.CDLL(None).prctl(PR_SET_NAME, b"kafka-writer", 0, 0, 0)
        renamed.set()
        done.wait(10)

    threads.append(threading.Thread(target=unnamed, daemon=True))
    for thread in threads:
        thread.start()
    try:
        assert all(event.wait(10) for event in [*ready.values(), unnamed_ready])
        settled: set[int] = set()
        priorities.lower_helper_threads(7, settled)
        assert {ids[b"rdk:broker8"], ids[b"polars-1"]} <= settled
        assert ids["unnamed"] not in settled and os.getpid() not in settled
        assert os.getpriority(os.PRIO_PROCESS, ids[b"rdk:broker8"]) == 7
        # the thread that was still unnamed is read again, and found once it names itself
        rename.set()
        assert renamed.wait(10)
        assert priorities.lower_helper_threads(7, settled) >= 1  # a leftover client's may join
        assert os.getpriority(os.PRIO_PROCESS, ids["unnamed"]) == 7
        assert ids["unnamed"] in settled
    finally:
        done.set()
    for thread in threads:
        thread.join(10)
    # a joined thread's task can outlive `join` for a moment (Python lets go of it first)
    ended = {ids[b"rdk:broker8"], ids[b"polars-1"], ids["unnamed"]}
    deadline = time.monotonic() + 10
    while ended & set(map(int, os.listdir(priorities.TASKS))) and time.monotonic() < deadline:
        time.sleep(0.01)
    priorities.lower_helper_threads(7, settled)
    assert not settled & ended  # ended: gone
