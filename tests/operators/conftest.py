import pytest

from operators import sessions


@pytest.fixture(params=["compiled", "python"])
def session_engine(request, monkeypatch):
    """The test runs with the compiled session table (`native/`) and with the Python one, its
    specification."""
    if sessions.compiled is None:
        pytest.fail("the compiled module (native/) is not installed: run `make install`")
    # set either way, so that whatever the test switches to is undone after it
    monkeypatch.setattr(
        sessions, "compiled", None if request.param == "python" else sessions.compiled
    )
    return request.param
