"""Operating the recovery store and the dead-letter queue: `python -m recovery --help`.

`store` reads and edits Bytewax 0.21's SQLite recovery partitions, `inspect` describes them,
`rewind` moves the point a resumed run starts from, `dlq` replays dead-lettered records.
The procedures are in docs/runbook.md ("Recovery store", "Rewind and reprocess", "DLQ
reprocessing").
"""
