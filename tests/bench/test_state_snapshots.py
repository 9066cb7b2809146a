"""The in-process state benchmark runs end to end and its logs hold exactly the live state."""

import re

from bench import state_snapshots


def test_reports_every_minute_and_the_logs_of_the_state(capsys):
    assert state_snapshots.main(["--rate", "300", "--seconds", "61", "--shards", "2"]) == 0
    out = capsys.readouterr().out
    minutes = re.findall(
        r"^\s+(\d+)s  cells=([\d,]+) session_ids=([\d,]+) users_in_cells=[\d,]+ rss=\d+MB",
        out,
        re.MULTILINE,
    )
    assert [m[0] for m in minutes] == ["60", "61"]
    cells, session_ids = (int(n.replace(",", "")) for n in minutes[-1][1:])
    assert cells > 0 and session_ids > 0
    windows_log = re.search(r"windows snapshot logs: .*'live': (\d+)", out)
    sessions_log = re.search(r"sessions snapshot logs: .*'live': (\d+)", out)
    assert int(windows_log.group(1)) == cells  # every cell held is in a chunk, nothing else
    assert int(sessions_log.group(1)) == session_ids


def test_a_shorter_gap_and_retention_hold_fewer_sessions(capsys):
    def session_ids(*extra: str) -> int:
        assert (
            state_snapshots.main(["--rate", "300", "--seconds", "60", "--shards", "2", *extra]) == 0
        )
        out = capsys.readouterr().out
        return int(re.search(r"session_ids=([\d,]+)", out).group(1).replace(",", ""))

    assert session_ids("--gap-s", "5", "--retention-s", "5") < session_ids()
