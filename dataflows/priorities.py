"""The worker thread comes first: Kafka's helper threads run at a lower priority.

A process runs the dataflow on one Python thread, its bottleneck. librdkafka's threads (`rdk:*`,
several per client) and the compiled Kafka writer's (`kafka-writer`) do their share beside it. When
the cores are busy, a helper that holds a core as the worker wakes (after each hand-off to polars'
pool, say) keeps it waiting; with a higher nice value the helpers get what the worker leaves, and
still every core that is idle. librdkafka starts threads as its clients connect, so a daemon
thread looks for new ones every second. Linux only (elsewhere this does nothing).
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)

HELPER_THREAD_PREFIXES = ("rdk:", "kafka-writer")
TASKS = "/proc/self/task"


def thread_names() -> dict[int, str]:
    """The threads of this process by id, with their names (threads that end meanwhile left out)."""
    names = {}
    for tid in os.listdir(TASKS):
        try:
            with open(f"{TASKS}/{tid}/comm") as f:
                names[int(tid)] = f.read().rstrip("\n")
        except FileNotFoundError:
            continue
    return names


def lower_helper_threads(nice: int) -> int:
    """Give every helper thread of this process at least `nice`; returns how many it changed."""
    changed = 0
    for tid, name in thread_names().items():
        try:
            helper = name.startswith(HELPER_THREAD_PREFIXES)
            if helper and os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                changed += 1
        except ProcessLookupError:
            continue  # the thread ended meanwhile
    return changed


class _HelperPriority(threading.Thread):
    def __init__(self, nice: int, interval_s: float):
        super().__init__(name="helper-priority", daemon=True)
        self._nice = nice
        self._interval_s = interval_s

    def run(self) -> None:
        while True:
            try:
                lower_helper_threads(self._nice)
            except OSError as exc:  # e.g. a nice value the process may not set: stop trying
                log.warning("helper threads keep the worker's priority: %s", exc)
                return
            time.sleep(self._interval_s)


def start(nice: int, interval_s: float = 1.0) -> None:
    """Keep the helper threads of this process at `nice` from now on (0: leave them be)."""
    if nice > 0 and os.path.isdir(TASKS):
        _HelperPriority(nice, interval_s).start()
