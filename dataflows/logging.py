"""Structured logs: one JSON object per line on stderr.

    from dataflows.logging import configure
    configure()                      # once, at start; level from LOG_LEVEL (Settings.log_level)

    log = logging.getLogger(__name__)
    log.warning("sink write retried", extra={"correlation_id": cid, "sink": "postgres"})

gives

    {"ts": "2026-11-22T04:00:00.000Z", "level": "WARNING", "logger": "connectors.postgres",
     "message": "sink write retried", "correlation_id": "...", "sink": "postgres"}

(on one line). `ts` is UTC with milliseconds; `correlation_id` and any other `extra=` keys are
added when given; an exception adds `exc_info` (the formatted traceback, still on one line since
JSON escapes newlines). Bytewax's own Rust-side messages are not Python log records and keep
their own format.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from dataflows.config import Settings

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts, level, logger, message, then extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        correlation_id = getattr(record, "correlation_id", None)
        if correlation_id is not None:
            entry["correlation_id"] = correlation_id
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in entry and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


class _JsonHandler(logging.StreamHandler):
    """Marks the handler `configure` installed, so calling it again replaces it."""


def configure(
    level: str | int | None = None,
    *,
    settings: Settings | None = None,
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Send the root logger's records as JSON lines to `stream` (stderr) at `level`.

    `level` defaults to `settings.log_level` (LOG_LEVEL, default INFO). Calling it again
    replaces the handler it installed before; other handlers are left alone.
    """
    if level is None:
        if settings is None:
            from dataflows.config import Settings

            settings = Settings()
        level = settings.log_level
    if isinstance(level, str):
        level = level.strip().upper()
    handler = _JsonHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _JsonHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def quiet_interrupts() -> None:
    """Log the end of a run by an interrupt (SIGINT: Ctrl-C, the image's stop signal) as one JSON
    line instead of a `KeyboardInterrupt` traceback; the exit status stays that of an interrupt
    (130). Other uncaught exceptions keep the hook that was there.

    With processes (`-i/-a`, or `BYTEWAX_POD_NAME` on Kubernetes) the workers run on threads of
    their own and Bytewax stops them cleanly before the interrupt reaches the top. A single process
    (`python -m bytewax.run dataflows.main`) runs its worker on the main thread, where Bytewax 0.21
    takes an interrupt as a worker failure (a panic, "signal received", exit status 1): the
    uncommitted epoch is replayed on resume, as after a crash."""
    previous = sys.excepthook
    if getattr(previous, "quiets_interrupts", False):  # installed already
        return

    def hook(kind, value, traceback) -> None:
        if issubclass(kind, KeyboardInterrupt):
            logging.getLogger("dataflows").info("stopped by an interrupt")
            return
        previous(kind, value, traceback)

    hook.quiets_interrupts = True
    sys.excepthook = hook
