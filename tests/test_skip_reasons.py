"""A test that cannot run here says why: the reason of a skip made inside a Trio test or
its async fixture reaches the report (tests/skipreasons.py), as a plain test's does."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

TESTS = '''
import pytest
import trio


async def test_in_the_body():
    pytest.skip("no broker: mosquitto is not installed")


async def test_in_a_nursery():
    async with trio.open_nursery():
        pytest.skip("no Redis: redis-server is not installed")


@pytest.fixture
async def server():
    pytest.skip("no loop device for the ext4 image")
    yield


async def test_in_an_async_fixture(server):
    pass


def test_plain():
    pytest.skip("a plain test's reason")


async def test_failing_beside_a_skip():
    async def fail():
        raise RuntimeError("boom")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fail)
        await trio.sleep(0.01)
        pytest.skip("hidden by the failure")
'''


def test_each_skip_is_reported_with_its_reason_and_place(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("from skipreasons import pytest_pyfunc_call  # noqa: F401\n")
    pytester.makepyfile(test_skips=TESTS)
    result = pytester.runpytest("-o", "trio_mode=true", "-rs", "-p", "no:xdist")
    result.stdout.fnmatch_lines_random([
        "SKIPPED * test_skips.py:6: no broker: mosquitto is not installed",
        "SKIPPED * test_skips.py:11: no Redis: redis-server is not installed",
        "SKIPPED * test_skips.py:16: no loop device for the ext4 image",
        "SKIPPED * test_skips.py:*: a plain test's reason",
    ])
    assert "Skipped\n" not in result.stdout.str()
    # a failure beside a skip is still a failure, never a skip
    result.assert_outcomes(skipped=4, failed=1)
