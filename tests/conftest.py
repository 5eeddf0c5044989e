"""Test-session settings: the backend timings that ``backend="auto"`` reads are kept in a
temporary cache, so a developer's recorded timings never change what the tests pick, and the
tests never write to the developer's cache."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_timing_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPILEDOPT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
