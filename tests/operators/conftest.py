import pytest

from operators import sessions


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
