"""Builds fastrnn._C, the C++ CPU engine, against the installed torch."""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(
    os.path.relpath(path, HERE) for path in glob.glob(os.path.join(HERE, "csrc", "**", "*.cpp"), recursive=True)
)

setup(
    ext_modules=[
        CppExtension(
            name="fastrnn._C",
            sources=SOURCES,
            include_dirs=[os.path.join(HERE, "csrc")],
            # -fno-trapping-math lets the pointwise loops vectorise (no FP traps are used).
            extra_compile_args=["-O3", "-fopenmp", "-fno-trapping-math"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
