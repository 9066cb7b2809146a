import pytest

from operators import sessions, windows

# The compiled tables as imported (`native/`, built by `make install`), whatever a test switches.
COMPILED = {sessions: sessions.compiled, windows: windows.compiled}


def _compiled(module):
    if COMPILED[module] is None:
        pytest.fail("the compiled module (native/) is not installed: run `make install`")
    return COMPILED[module]


def _use(monkeypatch, engine: str, *modules) -> str:
    """Run the test with the compiled tables of `modules`, or with the Python ones (their
    specification); set either way, so that whatever the test switches to is undone after it."""
    for module in modules:
        monkeypatch.setattr(module, "compiled", None if engine == "python" else _compiled(module))
    return engine


@pytest.fixture
def compiled_sessions():
    """The compiled session module; required."""
    return _compiled(sessions)


@pytest.fixture
def compiled_windows():
    """The compiled window module; required."""
    return _compiled(windows)


@pytest.fixture(params=["compiled", "python"])
def session_engine(request, monkeypatch):
    """The test runs with the compiled session table and with the Python one."""
    return _use(monkeypatch, request.param, sessions)


@pytest.fixture(params=["compiled", "python"])
def window_engine(request, monkeypatch):
    """The test runs with the compiled window table and with the Python one."""
    return _use(monkeypatch, request.param, windows)


@pytest.fixture(params=["compiled", "python"])
def table_engine(request, monkeypatch):
    """The test runs with both compiled tables (sessions and windows), then with both Python
    ones."""
    return _use(monkeypatch, request.param, sessions, windows)


@pytest.fixture
def python_windows(monkeypatch):
    """The Python window table, for tests of its own representation."""
    _use(monkeypatch, "python", windows)
