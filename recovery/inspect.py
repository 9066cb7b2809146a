"""`inspect`: what a recovery store holds and where a resumed run would start."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime
from typing import Any

from recovery.store import (
    SOURCE_STEP_SUFFIX,
    Snapshot,
    Store,
    epoch_ranges,
    kafka_key,
)

_NO_WATERMARK = -(2**62)  # operators.event_time.NO_WATERMARK


def iso_ms(epoch_ms: int | None) -> str | None:
    if epoch_ms is None or epoch_ms <= _NO_WATERMARK:
        return None
    try:
        stamp = datetime.fromtimestamp(epoch_ms / 1000, UTC)
    except (OverflowError, ValueError, OSError):
        return "end"  # at or derived from END_WATERMARK: the input has ended
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def summarize(value: object) -> Any:
    """A JSON-able summary of one snapshot value of this project's steps."""
    kind = type(value).__name__
    if value is None:
        return None
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return {"offset": value[0], "line": value[1]}  # JSON Lines source
    if kind == "ClockState":
        return {
            "partition": value.partition,
            "max_event_time": iso_ms(value.max_event_ms),
            "watermark": iso_ms(value.watermark_ms),
        }
    if kind == "SinkState":
        return {
            "tail_from": {str(p): o for p, o in sorted(value.tail_from.items())},
            "revision_floors": len(value.floors),
        }
    if kind in ("WindowState", "SessionState"):
        clock = getattr(value, "clock", None)
        watermarks = getattr(clock, "partition_watermarks", {}) or {}
        out: dict[str, Any] = {
            "watermark": iso_ms(min(watermarks.values(), default=_NO_WATERMARK)),
            "source_partitions": len(watermarks),
            "horizon": iso_ms(value.horizon_ms),
            "dropped_events": value.dropped_events,
        }
        if kind == "WindowState":
            cells = value.table.entries()  # (key, count, users, revision)
            emitted = sum(1 for *_, revision in cells if revision >= 0)
            out |= {
                "cells": len(cells),
                "not_emitted": len(cells) - emitted,
                "kept_for_late": emitted,
                "events": sum(count for _, count, _, _ in cells),
            }
        else:
            # (tenant, user_id, start, end, count, revision, dirty) per session
            segments = [s for _, group in value.table.groups() for s in group]
            out |= {
                "session_ids": len(value.table),
                "open": sum(1 for s in segments if s[5] < 0),
                "events": sum(s[4] for s in segments),
            }
        return out
    if isinstance(value, dict):
        return {"type": "dict", "len": len(value)}
    return {"type": kind, "repr": repr(value)[:120]}


def _value(snap: Snapshot) -> Any:
    if snap.deleted:
        return {"deleted": True}
    try:
        return summarize(snap.value())
    except (
        pickle.UnpicklingError,
        ImportError,
        AttributeError,
        TypeError,
        ValueError,
        EOFError,
        KeyError,
        IndexError,
    ) as exc:  # one bad value must not hide the rest
        return {"unreadable": f"{type(exc).__name__}: {exc}"}


def _role(step_id: str) -> str:
    local = step_id.rsplit(".", 1)[-1]
    if step_id.endswith(SOURCE_STEP_SUFFIX):
        return "source"
    if local.startswith(("local_", "kafka_", "postgres_", "opensearch_", "redis_", "s3_")):
        return "sink"
    return "state"


def describe(
    store: Store, *, active: list[str] | None = None, epoch: int | None = None
) -> dict[str, Any]:
    """The store, with the state a run resuming from `epoch` (default: the resume epoch) loads
    under each step's `at_resume`."""
    resume = store.resume_epoch
    at_resume = store.snapshots_at(resume if epoch is None else epoch)
    steps: dict[str, Any] = {}
    for step, keys in store.step_keys.items():
        all_epochs = [e for epochs in keys.values() for e in epochs]
        steps[step] = {
            "role": _role(step),
            "keys": len(keys),
            "epochs": [min(all_epochs), max(all_epochs)],
            "at_resume": {},
        }
    for snap in at_resume:
        steps[snap.step_id]["at_resume"][snap.state_key] = {
            "epoch": snap.epoch,
            "partition": snap.partition,
            "value": _value(snap),
        }

    source: dict[str, Any] | None = None
    source_step = store.source_step()
    if source_step is not None:
        positions = steps[source_step]["at_resume"]
        values = {key: entry["value"] for key, entry in positions.items()}
        if values and all(kafka_key(k) and isinstance(v, int) for k, v in values.items()):
            topics: dict[str, dict[str, int]] = {}
            for key, offset in values.items():
                topic, partition = kafka_key(key)
                topics.setdefault(topic, {})[str(partition)] = offset
            source = {"kind": "kafka", "step": source_step, "offsets": topics}
        elif values and all(isinstance(v, dict) and "offset" in v for v in values.values()):
            source = {"kind": "file", "step": source_step, "files": values}
        else:
            source = {"kind": "unknown", "step": source_step, "values": values}

    last = store.last_execution
    commit = store.commit_epoch
    return {
        "dir": str(store.directory),
        "active": active or [],
        "partitions": {
            "count": store.part_count,
            "files": {str(p.index): p.path.name for p in store.partitions},
        },
        "executions": [
            {
                "ex_num": ex.ex_num,
                "worker_count": ex.worker_count,
                "resume_epoch": ex.resume_epoch,
                "created_at": ex.created_at,
                "frontiers": {str(w): f for w, f in ex.frontiers.items()},
            }
            for ex in store.executions
        ],
        "resume": {
            "execution": store.next_execution,
            "epoch": resume,
            "fresh": last is None,
            "problem": store.resume_problem(),
        },
        "state_at_epoch": resume if epoch is None else epoch,
        "commits": {str(i): e for i, e in store.commits.items()},
        "rewind": {
            "oldest_epoch": store.oldest_rewind_epoch,
            "newest_epoch": resume,
            "note": None
            if commit is None or commit + 1 < resume
            else "only the resume epoch itself: superseded snapshots are not kept "
            "(backup interval 0)",
        },
        "epochs": {
            "count": len(store.epochs),
            "ranges": [list(r) for r in epoch_ranges(store.epochs)],
        },
        "steps": steps,
        "source": source,
    }


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    return str(value)


def format_text(info: dict[str, Any], *, keys_per_step: int = 8) -> str:
    lines = [f"recovery store {info['dir']}"]
    parts = info["partitions"]
    lines.append(f"  partitions: {parts['count']} ({', '.join(parts['files'].values())})")
    if info["active"]:
        lines.append(f"  IN USE by another process: {', '.join(info['active'])}")
    resume = info["resume"]
    if resume["fresh"]:
        lines.append("  resume: no run has written to this store yet (a run starts at epoch 1)")
    else:
        lines.append(
            f"  resume: execution {resume['execution']} starts at epoch {resume['epoch']} "
            f"(loads each key's newest snapshot below it)"
        )
    if resume["problem"]:
        lines.append(f"  PROBLEM: {resume['problem']}")
    for ex in info["executions"][-5:]:
        fronts = ", ".join(f"w{w}:{f}" for w, f in ex["frontiers"].items()) or "none"
        lines.append(
            f"    execution {ex['ex_num']}: {ex['worker_count']} worker(s), resumed at epoch "
            f"{ex['resume_epoch']}, frontiers {fronts}, started {ex['created_at']}"
        )
    if len(info["executions"]) > 5:
        lines.append(f"    ... {len(info['executions']) - 5} earlier execution(s)")
    commits = info["commits"]
    lines.append(
        "  garbage-collected up to epoch: "
        + (", ".join(f"p{i}:{e}" for i, e in commits.items()) if commits else "nothing yet")
    )
    rewind = info["rewind"]
    lines.append(
        f"  rewind --epoch possible to: {rewind['oldest_epoch']}..{rewind['newest_epoch']}"
        + (f" ({rewind['note']})" if rewind["note"] else "")
    )
    ranges = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in info["epochs"]["ranges"])
    lines.append(f"  snapshot epochs present: {ranges or 'none'}")

    source = info["source"]
    if source is not None:
        at = info["state_at_epoch"]
        when = "the resume epoch" if at == resume["epoch"] else f"epoch {at} (as --epoch {at})"
        lines.append(f"  source ({source['kind']}, step {source['step']}) at {when}:")
        if source["kind"] == "kafka":
            for topic, offsets in source["offsets"].items():
                for partition, offset in sorted(offsets.items(), key=lambda kv: int(kv[0])):
                    lines.append(f"    {topic}/{partition}: next offset {offset}")
        elif source["kind"] == "file":
            for name, pos in source["files"].items():
                lines.append(f"    {name}: byte offset {pos['offset']}, line {pos['line']}")
        else:
            for key, value in source["values"].items():
                lines.append(f"    {key}: {_short(value)}")

    for role, title in (("sink", "sinks"), ("state", "stateful steps")):
        chosen = {s: d for s, d in info["steps"].items() if d["role"] == role}
        if not chosen:
            continue
        lines.append(f"  {title}:")
        for step, detail in chosen.items():
            lines.append(
                f"    {step}: {detail['keys']} key(s), epochs {detail['epochs'][0]}"
                f"..{detail['epochs'][1]}"
            )
            entries = list(detail["at_resume"].items())
            for key, entry in entries[:keys_per_step]:
                lines.append(f"      {key} @{entry['epoch']}: {_short(entry['value'])}")
            if len(entries) > keys_per_step:
                lines.append(f"      ... {len(entries) - keys_per_step} more (--json for all)")
    return "\n".join(lines)
