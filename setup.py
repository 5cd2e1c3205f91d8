"""The one C extension; everything else about the package is in setup.cfg.

setup.cfg cannot declare extension modules. The extension is optional: where it does not build (no C
compiler), the same ctx2 decoder runs in numpy, bit for bit the same and slower.
"""

import sys

from setuptools import Extension, setup

# FP exception flags are never read, and without them GCC and Clang vectorise floor, min and max;
# -pthread: the decoder runs its network on a second thread
FLAGS = [] if sys.platform == "win32" else ["-fno-trapping-math", "-pthread"]

setup(
    ext_modules=[
        Extension(
            "pillow_sdlatent.core.coders._ctx2_native",
            sources=["pillow_sdlatent/core/coders/_ctx2_native.c"],
            extra_compile_args=FLAGS,
            extra_link_args=[flag for flag in FLAGS if flag == "-pthread"],
            optional=True,
        )
    ]
)
