"""Shared fixtures.

Tests marked `servers` need the local stack (stack/stack.sh). The first such test in a
session runs `bash stack/stack.sh up`, which returns at once when everything is already
running, so plain `pytest` works as well as `make test`. Servers started this way are left
running afterwards (`make stack-down` stops them); `make test` stops them itself.
Set STACK_AUTOSTART=0 to use servers started some other way.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from dataflows import metrics
from dataflows.config import Settings

ROOT = Path(__file__).resolve().parent.parent

# No test process serves /metrics: importing dataflows.main starts the endpoint of whatever
# `metrics.get()` returns, so it returns a no-op unless a test installs its own recorder.
metrics.install(metrics.NoopMetrics())


@pytest.fixture(scope="session")
def stack() -> None:
    """The local server stack, started once per session when not already running."""
    if os.environ.get("STACK_AUTOSTART", "1") == "0":
        return
    result = subprocess.run(
        ["bash", str(ROOT / "stack" / "stack.sh"), "up"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        pytest.fail(
            f"stack/stack.sh up failed (exit {result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _servers_for_marked_tests(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("servers") is not None:
        request.getfixturevalue("stack")


@pytest.fixture
def settings() -> Settings:
    return Settings()


@pytest.fixture
def unique() -> str:
    """A short name unique to this test run, safe for topics, tables, indices and buckets."""
    return f"t{uuid.uuid4().hex[:12]}"
