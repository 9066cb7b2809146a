"""Recovery-store and DLQ tooling: `python -m recovery <command> --help`.

    init        create the recovery store (idempotent)
    inspect     partitions, resume epoch, snapshots, source positions, sink states
    rewind      make the next run reprocess from an earlier epoch, offsets or time
    replay-dlq  produce dead-lettered records back into the input topic (or a file)

Settings (brokers, topics, consumer group) come from the same environment as the pipeline;
`--dir` defaults to `BYTEWAX_RECOVERY_DIRECTORY`. Exit status: 0 done, 1 refused or failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from recovery.store import StoreError


def _dir(value: str | None) -> Path:
    value = value or os.environ.get("BYTEWAX_RECOVERY_DIRECTORY")
    if not value:
        raise StoreError("give --dir or set BYTEWAX_RECOVERY_DIRECTORY")
    return Path(value)


def _settings():
    from dataflows.config import Settings

    return Settings()


def _print(args, data: dict, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def cmd_init(args) -> int:
    from recovery.store import init_store

    _, message = init_store(_dir(args.dir), args.partitions)
    print(message)
    return 0


def cmd_inspect(args) -> int:
    from recovery.inspect import describe, format_text
    from recovery.store import Store, active_partitions

    directory = _dir(args.dir)
    active = [p.name for p in active_partitions(directory)]
    info = describe(Store.open(directory), active=active, epoch=args.epoch)
    _print(args, info, format_text(info, keys_per_step=args.keys))
    return 0


def cmd_rewind(args) -> int:
    from recovery.rewind import parse_offsets, parse_time, rewind_offsets, rewind_to_epoch

    directory = _dir(args.dir)
    backup_dir = Path(args.backup_dir) if args.backup_dir else None
    if args.epoch is not None:
        if args.dry_run:
            raise StoreError("--dry-run applies to --to-offsets / --to-time; use inspect")
        result = rewind_to_epoch(
            directory, args.epoch, backup=not args.no_backup, backup_dir=backup_dir
        )
        lines = [
            (
                f"rewound from epoch {result['from_epoch']} to {result['to_epoch']}: deleted "
                f"{result['deleted_snapshots']} snapshot(s) of epoch {result['to_epoch']} or later"
            ),
            f"backup: {result['backup'] or 'none (--no-backup)'}",
            *(
                f"Kafka sink partition first written after epoch {result['to_epoch'] - 1}, "
                f"resumed from its starting position: {name}"
                for name in result["kafka_sink_starts"]
            ),
            "source position the next run starts from (was → now):",
        ]
        for key, pos in result["source"].items():
            lines.append(f"  {key}: {pos['before']} → {pos['after']}")
            if pos["after"] is None:
                lines.append(
                    "    (no position in the store: the source starts this partition from the "
                    "consumer group's offset, or the beginning)"
                )
        lines.append(
            "all state (windows, sessions, clocks, sink positions) is that of the same epoch; "
            "outputs of the rewound epochs are written again (the sinks are idempotent)"
        )
        _print(args, result, "\n".join(lines))
        return 0

    when = parse_time(args.to_time) if args.to_time else None
    offsets = parse_offsets(args.to_offsets) if args.to_offsets else None
    result = rewind_offsets(
        directory,
        _settings(),
        offsets=offsets,
        when=when,
        topic=args.topic,
        group=args.group,
        verify=not args.no_verify,
        dry_run=args.dry_run,
        backup=not args.no_backup,
        backup_dir=backup_dir,
    )
    verb = "would set" if result["dry_run"] else "set"
    lines = [f"{verb} Kafka source positions (resume epoch {result['resume_epoch']}):"]
    for change in result["changes"]:
        moved = change["reprocess"]
        note = (
            ""
            if moved is None
            else f", {moved} record(s) read again"
            if moved > 0
            else f", {-moved} record(s) SKIPPED"
            if moved < 0
            else ", unchanged"
        )
        lines.append(
            f"  {change['partition']}: {change['old']} → {change['new']} in {change['where']}{note}"
        )
    if not result["dry_run"]:
        lines.append(f"backup: {result['backup'] or 'none'}")
    lines.append(
        "windows, sessions and event-time clocks are NOT rewound: re-read events count again "
        "(mostly as late events). See docs/runbook.md, 'Rewind and reprocess'."
    )
    _print(args, result, "\n".join(lines))
    return 0


def cmd_replay_dlq(args) -> int:
    from recovery import dlq
    from recovery.rewind import parse_time

    since = parse_time(args.since) if args.since else None
    reasons = set(args.reason) if args.reason else None
    settings = None
    if args.from_dir:
        entries = dlq.read_files(Path(args.from_dir))
        to_kafka = args.to_kafka
    else:
        settings = _settings()
        topic = args.from_topic or settings.kafka_topic_dlq
        entries = dlq.read_topic(settings, topic, since)
        to_kafka = args.out is None
    if to_kafka:
        settings = settings or _settings()
        name = f"Kafka topic {settings.kafka_topic_raw}"
        target = None if args.dry_run else dlq.KafkaTarget(settings, settings.kafka_topic_raw)
    else:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = Path(args.out or f"dlq-replay-{stamp}.jsonl")
        name = f"file {path}"
        target = None if args.dry_run else dlq.FileTarget(path)
    summary = dlq.replay(
        entries, target, target_name=name, reasons=reasons, since=since, limit=args.limit
    )
    _print(args, summary.as_dict(), summary.text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recovery",
        description="Recovery store and DLQ tooling (stop the job before changing a store).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    dir_help = "recovery directory (default: $BYTEWAX_RECOVERY_DIRECTORY)"

    init = commands.add_parser("init", help="create the recovery store if it does not exist")
    init.add_argument("--dir", help=dir_help)
    init.add_argument("--partitions", type=int, required=True, help="number of partitions")
    init.set_defaults(func=cmd_init)

    inspect = commands.add_parser("inspect", help="show what the store holds")
    inspect.add_argument("--dir", help=dir_help)
    inspect.add_argument("--json", action="store_true", help="everything, as JSON")
    inspect.add_argument("--keys", type=int, default=8, help="state keys shown per step")
    inspect.add_argument(
        "--epoch", type=int, help="show the state a run resuming from this epoch would load"
    )
    inspect.set_defaults(func=cmd_inspect)

    rewind = commands.add_parser("rewind", help="reprocess from an earlier point on the next run")
    rewind.add_argument("--dir", help=dir_help)
    where = rewind.add_mutually_exclusive_group(required=True)
    where.add_argument("--epoch", type=int, help="resume from this epoch (all state goes back)")
    where.add_argument(
        "--to-offsets", metavar="TOPIC/PARTITION=OFFSET,...", help="set Kafka source offsets"
    )
    where.add_argument(
        "--to-time", metavar="ISO", help="set every partition to its first offset at this time"
    )
    rewind.add_argument("--topic", help="topic for --to-time (default: the store's, else raw)")
    rewind.add_argument("--group", help="consumer group (default: KAFKA_CONSUMER_GROUP)")
    rewind.add_argument("--dry-run", action="store_true", help="show the change, make none")
    rewind.add_argument(
        "--no-verify", action="store_true", help="do not check offsets against the broker"
    )
    rewind.add_argument("--backup-dir", help="copy the store here first (default: inside it)")
    rewind.add_argument("--no-backup", action="store_true", help="do not copy the store first")
    rewind.add_argument("--json", action="store_true")
    rewind.set_defaults(func=cmd_rewind)

    replay = commands.add_parser("replay-dlq", help="replay dead-lettered records")
    source = replay.add_mutually_exclusive_group()
    source.add_argument("--from-topic", help="DLQ topic (default: KAFKA_TOPIC_DLQ)")
    source.add_argument("--from-dir", help="local sink DLQ directory or file (out/dlq)")
    replay.add_argument("--reason", action="append", help="only this reason (repeatable)")
    replay.add_argument("--since", metavar="ISO", help="only records dead-lettered from then on")
    replay.add_argument("--limit", type=int, help="replay at most this many records")
    replay.add_argument("--dry-run", action="store_true", help="count only, write nothing")
    replay.add_argument(
        "--to-kafka", action="store_true", help="with --from-dir: produce to KAFKA_TOPIC_RAW"
    )
    replay.add_argument("--out", help="write raw records to this JSON Lines file instead")
    replay.add_argument("--json", action="store_true")
    replay.set_defaults(func=cmd_replay_dlq)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "limit", None) is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if getattr(args, "to_kafka", False) and getattr(args, "out", None):
        parser.error("--to-kafka and --out exclude each other")
    try:
        return args.func(args)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
