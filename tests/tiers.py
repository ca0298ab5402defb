"""The names of heavy fixtures: those that load a model, start Ray, spawn a process or serve
on a socket. `@heavy` above a fixture's `@pytest.fixture` puts every test that uses it, even
through another fixture, in the `integration` tier instead of `unit` (see conftest.py)."""

HEAVY_FIXTURES: set[str] = set()


def heavy(fixture):
    HEAVY_FIXTURES.add(getattr(fixture, "name", None) or fixture.__name__)
    return fixture
