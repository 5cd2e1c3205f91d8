"""The one C extension; everything else about the package is in setup.cfg.

setup.cfg cannot declare extension modules. The extension is optional: where it does not build (no C
compiler), the same ctx2 decoder runs in numpy, bit for bit the same and slower.
"""

import sys

from setuptools import Extension, setup

# FP exception flags are never read, and without them GCC and Clang vectorise floor, min and max
FAST_FLAGS = [] if sys.platform == "win32" else ["-fno-trapping-math"]

setup(
    ext_modules=[
        Extension(
            "pillow_sdlatent.core.coders._ctx2_native",
            sources=["pillow_sdlatent/core/coders/_ctx2_native.c"],
            extra_compile_args=FAST_FLAGS,
            optional=True,
        )
    ]
)
