"""The worker thread comes first: Kafka's helper threads run at a lower priority.

A process runs the dataflow on one Python thread, its bottleneck. librdkafka's threads (`rdk:*`,
several per client) and the compiled Kafka writer's (`kafka-writer`) do their share beside it. When
the cores are busy, a helper that holds a core as the worker wakes (after each hand-off to polars'
pool, say) keeps it waiting; with a higher nice value the helpers get what the worker leaves, and
still every core that is idle. librdkafka starts threads as its clients connect, so a daemon
thread looks for new ones every second. Linux only (elsewhere this does nothing).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Container

log = logging.getLogger(__name__)

HELPER_THREAD_PREFIXES = ("rdk:", "kafka-writer")
TASKS = "/proc/self/task"


def thread_names(skip: Container[int] = ()) -> dict[int, str]:
    """The threads of this process by id, with their names (threads that end meanwhile, and those
    in `skip`, left out)."""
    names = {}
    for tid in map(int, os.listdir(TASKS)):
        if tid in skip:
            continue
        try:
            with open(f"{TASKS}/{tid}/comm") as f:
                names[tid] = f.read().rstrip("\n")
        except FileNotFoundError:
            continue
    return names


def lower_helper_threads(nice: int, settled: set[int] | None = None) -> int:
    """Give every helper thread of this process at least `nice`; returns how many it changed.

    With `settled`, the threads in it are not looked at again, and those whose role is known are
    added: helpers, and threads named otherwise than the main thread (a thread starts with the
    name of the thread that made it, the worker's for the writers, and names itself right after).
    Each name is a file read that hands the GIL to and from the worker."""
    if settled is not None:
        settled.intersection_update(map(int, os.listdir(TASKS)))  # ended threads' ids go
    names = thread_names(skip=settled or ())
    main = names.get(os.getpid())  # never settled: named as itself
    changed = 0
    for tid, name in names.items():
        helper = name.startswith(HELPER_THREAD_PREFIXES)
        try:
            if helper and os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                changed += 1
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        if settled is not None and (helper or name != main):
            settled.add(tid)
    return changed


class _HelperPriority(threading.Thread):
    def __init__(self, nice: int, interval_s: float):
        super().__init__(name="helper-priority", daemon=True)
        self._nice = nice
        self._interval_s = interval_s

    def run(self) -> None:
        settled: set[int] = set()
        while True:
            try:
                lower_helper_threads(self._nice, settled)
            except OSError as exc:  # e.g. a nice value the process may not set: stop trying
                log.warning("helper threads keep the worker's priority: %s", exc)
                return
            time.sleep(self._interval_s)


def name_this_thread(name: str) -> None:
    """Give the calling thread `name` (up to 15 bytes) as the kernel shows it (`top -H`,
    `/proc/<pid>/task/*/comm`, `perf`), which this module reads; Python's thread names stay
    inside Python. Linux only (elsewhere this does nothing)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):  # not Linux, or no prctl
        pass


_PR_SET_NAME = 15


def start(nice: int, interval_s: float = 1.0) -> None:
    """Keep the helper threads of this process at `nice` from now on (0: leave them be)."""
    if nice > 0 and os.path.isdir(TASKS):
        _HelperPriority(nice, interval_s).start()
