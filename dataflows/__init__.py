"""The event pipeline's dataflow, its settings and operations (metrics, logging)."""

import os

# One polars thread per process unless set otherwise. A process runs the dataflow on one Python
# thread and scales by processes; polars' pool only spun (sched_yield) between the small per-batch
# operations, ~8% of the job's CPU taken from the broker and the other process. Set before polars
# is first imported (it reads the variable then).
os.environ.setdefault("POLARS_MAX_THREADS", "1")
