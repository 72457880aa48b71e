"""The C part of the build; everything else is declared in pyproject.toml.

edge._logline makes the access-log line of an ordinary request (edge/_logline.c): a line made
in Python costs more than issue 6's 10 % of a small hit. It is optional: without a C compiler
the install goes on, and the edge makes every line in Python and says so when it starts.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "edge._logline",
            sources=["edge/_logline.c"],
            # The same float operations as the Python path, never fused into one (a line's
            # durations must be the Python path's to the digit).
            extra_compile_args=["-O2", "-ffp-contract=off", "-Wall", "-Wextra"],
            optional=True,
        )
    ]
)
