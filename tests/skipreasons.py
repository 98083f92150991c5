"""A Trio test's ``pytest.skip(reason)`` is reported with its reason.

pytest-trio 0.8 turns a skip raised inside ``trio.run`` (there wrapped in an exception
group) into a bare ``pytest.skip()``: "cannot start a broker: ..." read only "Skipped".  The
group is that bare skip's ``__context__``; its one leaf, re-raised, is the skip the test
made, with its reason and its place.  conftest.py imports the hook.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, object, object]:
    """The skip a Trio test made, for pytest-trio's bare one (the module's docstring)."""
    try:
        return (yield)
    except pytest.skip.Exception as exc:
        leaves = _leaves(exc.__context__) if not exc.msg else []
        if len(leaves) == 1 and isinstance(leaves[0], pytest.skip.Exception):
            raise leaves[0] from None
        raise


def _leaves(exc: BaseException | None) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [] if exc is None else [exc]
