"""Read and carefully edit a Bytewax 0.21 recovery store (a directory of SQLite partitions).

Layout of one partition (`python -m bytewax.recovery <dir> <count>` creates `part-<i>.sqlite3`;
Bytewax finds partitions by the `.sqlite3` extension and the `parts` row inside, not by name):

    parts(part_index, part_count)                      the partition's identity
    exs(ex_num, worker_count, resume_epoch)            one row per execution (run) of the dataflow
    fronts(ex_num, worker_index, worker_frontier)      per worker: the oldest epoch not yet done
    commits(part_index, commit_epoch)                  garbage collection done up to this epoch
    snaps(step_id, state_key, snap_epoch, ser_change)  pickled state of a key at the end of an epoch

`exs`, `fronts` and `snaps` rows are spread over the partitions by a hash; only the union of all
partitions means anything. How Bytewax 0.21 uses them (the SQL is in its binary):

* **Resume epoch.** Take the highest `ex_num` in `exs`; for each of its workers the frontier is the
  highest of its `fronts` row and that execution's own `resume_epoch`; the lowest over the workers
  is the epoch the next run resumes from. No execution at all: epoch 1.
* **State on resume.** For every (step, key), the snapshot with the highest `snap_epoch` *below*
  the resume epoch; a NULL `ser_change` means the key was deleted.
* **Garbage collection.** After the epochs of the backup interval (`-b`) have passed, a partition
  records `commit_epoch = C` and deletes, per key, every snapshot older than the newest one at or
  below C. With `-b 0`, C is the resume epoch − 1: nothing older than the last snapshot is kept.
  Bytewax refuses to resume from an epoch below a partition's `commit_epoch`.
* Snapshots are written at the end of each epoch, only for keys that changed in it (sources:
  every partition, every epoch).

Snapshot values are pickles of this project's objects (offsets, `ClockState`, `SinkState`, pickled
window/session state). They are read with an unpickler that only resolves this project's classes
and plain containers, so reading a store never runs arbitrary code.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import pickle
import re
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

DEFAULT_EPOCH = 1  # Bytewax's resume epoch of a store no run has written to
SOURCE_STEP_SUFFIX = ".read"  # the dataflow's input step is `op.input("read", ...)`
_KAFKA_KEY = re.compile(r"^(?P<topic>.+)/(?P<partition>\d+)$")

# SQLite's unix VFS: every open connection to a WAL database holds a shared lock on this byte
# of the `-shm` file (the "DMS" slot, (22 + 8) * 4 + 8) for as long as it is open.
_SHM_DMS_BYTE = 128


class StoreError(Exception):
    """The store is missing, inconsistent, or the operation would lose data."""


# --- partitions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    path: Path
    index: int
    count: int


def partition_files(directory: Path) -> list[Path]:
    """Files Bytewax would open as recovery partitions: `*.sqlite3` directly in the directory."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix == ".sqlite3" and p.is_file())


def connect(path: Path, *, write: bool = False) -> sqlite3.Connection:
    """A connection to an existing partition (never creates one).

    Reads use a read-write connection too when the file allows it: the last connection to a WAL
    database to close folds the `-wal` file back and removes it and the `-shm` file, as Bytewax's
    own connections do, whereas a read-only connection leaves both behind. Nothing is written.
    """
    uri = path.resolve().as_uri()
    try:
        conn = sqlite3.connect(f"{uri}?mode=rw", uri=True, timeout=5.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError:
        if write:
            raise
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=5.0)
        conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def read_partitions(directory: Path) -> list[Partition]:
    """Every partition in `directory`, checked for a complete, consistent set."""
    parts = []
    for path in partition_files(directory):
        try:
            with closing(connect(path)) as conn:
                rows = conn.execute("SELECT part_index, part_count FROM parts").fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path} is not a recovery partition: {exc}") from exc
        if len(rows) != 1:
            raise StoreError(f"{path} is not a recovery partition (parts rows: {rows})")
        parts.append(Partition(path, rows[0][0], rows[0][1]))
    return parts


def check_complete(parts: list[Partition]) -> int:
    """The partition count of a complete, consistent set; raises StoreError otherwise."""
    if not parts:
        raise StoreError("no recovery partitions found")
    counts = {p.count for p in parts}
    if len(counts) != 1:
        raise StoreError(
            "partitions of different stores are mixed: part counts "
            + ", ".join(f"{p.path.name}={p.count}" for p in parts)
        )
    (count,) = counts
    indices = sorted(p.index for p in parts)
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise StoreError(f"partition(s) {duplicates} present more than once")
    missing = sorted(set(range(count)) - set(indices))
    if missing:
        raise StoreError(f"partition(s) {missing} of {count} missing")
    return count


def active_partitions(directory: Path) -> list[Path]:
    """Partitions some process on this machine has open (a running dataflow, a backup, ...).

    Uses SQLite's own lock: an open connection to a WAL database holds a shared lock on its
    `-shm` file. Only processes that share this filesystem's locks are seen (same machine, or
    same pod); it is no proof that no other host is running the dataflow.
    Call it before this process opens any connection to the store: closing a descriptor drops
    every POSIX lock this process holds on that file.
    """
    busy = []
    for path in partition_files(directory):
        shm = path.with_name(path.name + "-shm")
        try:
            fd = os.open(shm, os.O_RDWR)
        except FileNotFoundError:
            continue  # no shared memory: nobody has it open in WAL mode
        except PermissionError:
            busy.append(path)  # cannot tell; err on the safe side
            continue
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _SHM_DMS_BYTE, os.SEEK_SET)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                busy.append(path)
            else:
                raise
        else:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, _SHM_DMS_BYTE, os.SEEK_SET)
        finally:
            os.close(fd)
    return busy


def ensure_stopped(directory: Path) -> None:
    busy = active_partitions(directory)
    if busy:
        raise StoreError(
            "the store is in use (a running dataflow or another tool has "
            + ", ".join(p.name for p in busy)
            + " open); stop the job first"
        )


# --- snapshot values ---------------------------------------------------------------------------

_SAFE_GLOBALS = {
    ("builtins", name)
    for name in (
        "set",
        "frozenset",
        "dict",
        "list",
        "tuple",
        "bytes",
        "bytearray",
        "str",
        "int",
        "float",
        "bool",
        "complex",
        "slice",
        "range",
    )
} | {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("collections", "deque"),
    ("copyreg", "_reconstructor"),
    ("datetime", "datetime"),
    ("datetime", "date"),
    ("datetime", "time"),
    ("datetime", "timedelta"),
    ("datetime", "timezone"),
    ("zoneinfo", "ZoneInfo"),
}
_PROJECT_PACKAGES = ("operators", "connectors", "dataflows")


class _ProjectUnpickler(pickle.Unpickler):
    """Resolves only plain containers and classes defined in this project's packages."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module.split(".")[0] in _PROJECT_PACKAGES:
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a snapshot")


def load_value(blob: bytes | None) -> object:
    """A snapshot's value; state a step pickled itself (bytes holding a pickle) is unwrapped."""
    if blob is None:
        return None
    value = _ProjectUnpickler(io.BytesIO(blob)).load()
    if isinstance(value, bytes) and value[:1] == b"\x80":
        try:
            value = _ProjectUnpickler(io.BytesIO(value)).load()
        except (pickle.UnpicklingError, EOFError, ValueError):
            pass  # plain bytes after all
    return value


def dump_offset(offset: int) -> bytes:
    """A Kafka source partition's snapshot value: the next offset to read."""
    return pickle.dumps(int(offset), protocol=4)


# --- the store ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Execution:
    ex_num: int
    worker_count: int
    resume_epoch: int
    created_at: str
    partition: int
    frontiers: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    step_id: str
    state_key: str
    epoch: int
    partition: int
    blob: bytes | None

    @property
    def deleted(self) -> bool:
        return self.blob is None

    def value(self) -> object:
        return load_value(self.blob)


@dataclass
class Store:
    directory: Path
    partitions: list[Partition]
    part_count: int
    executions: list[Execution]
    commits: dict[int, int]  # partition index -> commit epoch
    epochs: list[int]  # every snapshot epoch present
    step_keys: dict[str, dict[str, list[int]]]  # step -> key -> epochs present

    @classmethod
    def open(cls, directory: Path) -> Store:
        if not directory.is_dir():
            raise StoreError(f"{directory} does not exist")
        parts = read_partitions(directory)
        count = check_complete(parts)
        executions: dict[int, dict] = {}
        fronts: dict[int, dict[int, int]] = {}
        commits: dict[int, int] = {}
        epochs: set[int] = set()
        step_keys: dict[str, dict[str, list[int]]] = {}
        for part in parts:
            with closing(connect(part.path)) as conn:
                for ex_num, workers, resume, created in conn.execute(
                    "SELECT ex_num, worker_count, resume_epoch, created_at FROM exs"
                ):
                    if ex_num in executions:
                        raise StoreError(f"execution {ex_num} recorded twice")
                    executions[ex_num] = {
                        "ex_num": ex_num,
                        "worker_count": workers,
                        "resume_epoch": resume,
                        "created_at": created,
                        "partition": part.index,
                    }
                for ex_num, worker, frontier in conn.execute(
                    "SELECT ex_num, worker_index, worker_frontier FROM fronts"
                ):
                    per_ex = fronts.setdefault(ex_num, {})
                    per_ex[worker] = max(per_ex.get(worker, frontier), frontier)
                for index, epoch in conn.execute("SELECT part_index, commit_epoch FROM commits"):
                    commits[index] = epoch
                for step, key, epoch in conn.execute(
                    "SELECT step_id, state_key, snap_epoch FROM snaps ORDER BY snap_epoch"
                ):
                    epochs.add(epoch)
                    step_keys.setdefault(step, {}).setdefault(key, []).append(epoch)
        execution_list = [
            Execution(**row, frontiers=dict(sorted(fronts.get(num, {}).items())))
            for num, row in sorted(executions.items())
        ]
        return cls(
            directory=directory,
            partitions=sorted(parts, key=lambda p: p.index),
            part_count=count,
            executions=execution_list,
            commits=dict(sorted(commits.items())),
            epochs=sorted(epochs),
            step_keys={s: dict(sorted(k.items())) for s, k in sorted(step_keys.items())},
        )

    # -- epochs --

    @property
    def last_execution(self) -> Execution | None:
        return self.executions[-1] if self.executions else None

    @property
    def resume_epoch(self) -> int:
        """The epoch the next run starts from, computed as Bytewax 0.21 does."""
        last = self.last_execution
        if last is None:
            return DEFAULT_EPOCH
        per_worker = {w: last.resume_epoch for w in range(last.worker_count)}
        for worker, frontier in last.frontiers.items():
            per_worker[worker] = max(per_worker.get(worker, frontier), frontier)
        return min(per_worker.values())

    @property
    def next_execution(self) -> int:
        last = self.last_execution
        return 0 if last is None else last.ex_num + 1

    @property
    def commit_epoch(self) -> int | None:
        return max(self.commits.values()) if self.commits else None

    @property
    def oldest_rewind_epoch(self) -> int:
        """The earliest resume epoch whose state is still complete in the store.

        Garbage collection at commit epoch C keeps, per key, the newest snapshot at or below C,
        so resuming from E (which loads the newest snapshot below E) is exact for E ≥ C + 1.
        And every source partition must have a position below E: without one the source would
        start that partition from the consumer group's offset, not from epoch E.
        """
        commit = self.commit_epoch
        oldest = DEFAULT_EPOCH if commit is None else commit + 1
        source = self.source_step()
        for epochs in self.step_keys.get(source, {}).values() if source else ():
            oldest = max(oldest, epochs[0] + 1)
        return min(oldest, self.resume_epoch)

    def resume_problem(self) -> str | None:
        """Why Bytewax would refuse to resume from this store, if it would."""
        too_new = [i for i, c in self.commits.items() if c > self.resume_epoch]
        if too_new:
            return (
                f"partition(s) {too_new} were garbage-collected past the resume epoch "
                f"{self.resume_epoch}; Bytewax will refuse to resume"
            )
        return None

    # -- snapshots --

    def snapshots_at(self, epoch: int | None = None, step: str | None = None) -> list[Snapshot]:
        """Per (step, key) the snapshot a run resuming from `epoch` loads (default: the resume
        epoch), including deletions (blob None)."""
        epoch = self.resume_epoch if epoch is None else epoch
        found: dict[tuple[str, str], Snapshot] = {}
        query = (
            "SELECT step_id, state_key, MAX(snap_epoch) FROM snaps WHERE snap_epoch < ?1"
            + (" AND step_id = ?2" if step else "")
            + " GROUP BY step_id, state_key"
        )
        params: tuple = (epoch, step) if step else (epoch,)
        for part in self.partitions:
            with closing(connect(part.path)) as conn:
                for step_id, key, snap_epoch in conn.execute(query, params).fetchall():
                    (blob,) = conn.execute(
                        "SELECT ser_change FROM snaps WHERE step_id = ? AND state_key = ? "
                        "AND snap_epoch = ?",
                        (step_id, key, snap_epoch),
                    ).fetchone()
                    snap = Snapshot(step_id, key, snap_epoch, part.index, blob)
                    other = found.get((step_id, key))
                    if other is None or other.epoch < snap.epoch:
                        found[(step_id, key)] = snap
        return sorted(found.values(), key=lambda s: (s.step_id, s.state_key))

    def source_step(self) -> str | None:
        steps = [s for s in self.step_keys if s.endswith(SOURCE_STEP_SUFFIX)]
        return steps[0] if len(steps) == 1 else None

    def partition(self, index: int) -> Partition:
        return next(p for p in self.partitions if p.index == index)

    def snapshot(self, step: str, key: str, epoch: int) -> Snapshot | None:
        for part in self.partitions:
            with closing(connect(part.path)) as conn:
                row = conn.execute(
                    "SELECT ser_change FROM snaps WHERE step_id = ? AND state_key = ? "
                    "AND snap_epoch = ?",
                    (step, key, epoch),
                ).fetchone()
            if row is not None:
                return Snapshot(step, key, epoch, part.index, row[0])
        return None


def kafka_key(state_key: str) -> tuple[str, int] | None:
    match = _KAFKA_KEY.match(state_key)
    return (match["topic"], int(match["partition"])) if match else None


def epoch_ranges(epochs: Iterable[int]) -> list[tuple[int, int]]:
    """[1, 2, 3, 7, 8] -> [(1, 3), (7, 8)]"""
    ranges: list[list[int]] = []
    for epoch in sorted(set(epochs)):
        if ranges and epoch == ranges[-1][1] + 1:
            ranges[-1][1] = epoch
        else:
            ranges.append([epoch, epoch])
    return [(a, b) for a, b in ranges]


# --- creating and editing ------------------------------------------------------------------------


def init_store(directory: Path, count: int) -> tuple[bool, str]:
    """Create a store of `count` partitions unless it exists; (created, message).

    Idempotent for the same count; refuses another count, an incomplete set, or a directory
    holding anything else (so a mistyped path never mixes with other data). Hidden entries
    (a `.rewind-backup-*` copy, an old store moved aside into `.old-*`) and `lost+found` are
    not in the way: Bytewax only opens `*.sqlite3` files directly in the directory.
    """
    from bytewax.recovery import init_db_dir

    if count < 1:
        raise StoreError("--partitions must be at least 1")
    if directory.exists() and not directory.is_dir():
        raise StoreError(f"{directory} exists and is not a directory")
    if partition_files(directory):
        parts = read_partitions(directory)
        present = check_complete(parts)
        if present != count:
            raise StoreError(
                f"{directory} holds a store of {present} partitions, not {count}; the count is "
                "fixed for the life of a store (start from scratch with an empty directory)"
            )
        return False, f"recovery store present: {present} partitions in {directory}"
    if directory.is_dir():
        others = sorted(
            p.name
            for p in directory.iterdir()
            if p.name != "lost+found" and not p.name.startswith(".")
        )
        if others:
            raise StoreError(
                f"{directory} holds other files but no recovery partitions ("
                + ", ".join(others[:5])
                + (", ..." if len(others) > 5 else "")
                + "); refusing to initialise"
            )
    directory.mkdir(parents=True, exist_ok=True)
    init_db_dir(directory, count)
    check_complete(read_partitions(directory))
    return True, f"created {count} recovery partitions in {directory}"


def backup_store(store: Store, target: Path) -> list[Path]:
    """A consistent copy of every partition (SQLite's backup API) into `target`."""
    target.mkdir(parents=True, exist_ok=False)
    copies = []
    for part in store.partitions:
        copy = target / part.path.name
        with closing(connect(part.path)) as src, closing(sqlite3.connect(copy)) as dst:
            src.backup(dst)
        copies.append(copy)
    return copies


def default_backup_dir(directory: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    # Inside the store's own volume (a pod's root filesystem is read-only); the leading dot and
    # the missing `.sqlite3` suffix keep Bytewax from taking it for a partition.
    return directory / f".rewind-backup-{stamp}"


@contextmanager
def writing(part: Partition) -> Iterator[sqlite3.Connection]:
    """One write transaction on a partition (BEGIN IMMEDIATE ... COMMIT)."""
    with closing(connect(part.path, write=True)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
