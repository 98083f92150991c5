"""The optional compiled STDF record loop (edgegw/stdf/_accel.c).

Everything else is in pyproject.toml.  The extension is optional twice over: a machine
without a C compiler installs edgegw without it (``optional=True``), and edgegw runs the
pure-Python decoder wherever the module is missing (or EDGEGW_STDF_ACCEL=0).  It is
built against the stable ABI (CPython >= 3.11), so one wheel per platform serves every
supported Python: pip builds this platform's (``pip install .``, ``pip wheel .``, the
offline bundle); packaging/build-windows-wheel.sh cross-builds Windows' on Linux.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "edgegw.stdf._accel",
            sources=["edgegw/stdf/_accel.c"],
            py_limited_api=True,
            define_macros=[("Py_LIMITED_API", "0x030B0000")],
            optional=True,
        )
    ],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
