"""The STDF decoder's two record loops, as fixtures: the compiled one (``_accel.c``, when
it was built) and the pure-Python one, which is the reference and always available.

``python_decoder``: the test checks the Python loop's own fast paths (tail memos, GDR
layouts, lazily compiled decoders): it runs on that loop.  ``each_decoder``: the test is a
specification of decoding; it runs on both loops.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from edgegw.stdf import decoder


def require_compiled() -> None:
    """Skip the test where the compiled loop was not built (no C compiler at install);
    under CI (``CI=true``) fail instead: the test command installs with a compiler."""
    if decoder.accelerator_built():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("the compiled record loop (edgegw.stdf._accel) was not built")
    pytest.skip("the compiled record loop was not built (no C compiler at install)")


@pytest.fixture
def python_decoder() -> Iterator[None]:
    was = decoder.accelerator_active()
    decoder.set_accelerator(False)
    try:
        yield
    finally:
        decoder.set_accelerator(was)


@pytest.fixture(params=["compiled", "python"])
def each_decoder(request: pytest.FixtureRequest) -> Iterator[str]:
    was = decoder.accelerator_active()
    if request.param == "compiled":
        require_compiled()
    decoder.set_accelerator(request.param == "compiled")
    try:
        yield request.param
    finally:
        decoder.set_accelerator(was)
