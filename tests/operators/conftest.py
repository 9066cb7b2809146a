import pytest

from operators import sessions, windows


@pytest.fixture
def compiled_sessions():
    """The compiled session module (`native/`, built by `make install`); required."""
    if sessions.compiled is None:
        pytest.fail("the compiled module (native/) is not installed: run `make install`")
    return sessions.compiled


@pytest.fixture(params=["compiled", "python"])
def session_engine(request, monkeypatch, compiled_sessions):
    """The test runs with the compiled session table and with the Python one, its
    specification."""
    # set either way, so that whatever the test switches to is undone after it
    monkeypatch.setattr(
        sessions, "compiled", None if request.param == "python" else compiled_sessions
    )
    return request.param


@pytest.fixture
def compiled_windows():
    """The compiled window module (`native/`, built by `make install`); required."""
    if windows.compiled is None:
        pytest.fail("the compiled module (native/) is not installed: run `make install`")
    return windows.compiled


@pytest.fixture(params=["compiled", "python"])
def window_engine(request, monkeypatch, compiled_windows):
    """The test runs with the compiled window table and with the Python one, its
    specification."""
    monkeypatch.setattr(
        windows, "compiled", None if request.param == "python" else compiled_windows
    )
    return request.param


@pytest.fixture
def python_windows(monkeypatch):
    """The Python window table, for tests of its own representation."""
    monkeypatch.setattr(windows, "compiled", None)


@pytest.fixture(params=["compiled", "python"])
def table_engine(request, monkeypatch, compiled_sessions, compiled_windows):
    """The test runs with both compiled tables (sessions and windows), then with both Python
    ones."""
    python = request.param == "python"
    monkeypatch.setattr(sessions, "compiled", None if python else compiled_sessions)
    monkeypatch.setattr(windows, "compiled", None if python else compiled_windows)
    return request.param
