"""Builds fastrnn._C, the C++ CPU engine, against the installed torch.

A compiled torch extension loads only into the torch it was built with, so
the build records that torch: beside the extension (``fastrnn/_build_info.py``,
checked at import), and in the metadata of what it installs or packs into a
wheel, which requires exactly that torch release. A source distribution
keeps the supported range.
"""

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(
    os.path.relpath(path, HERE) for path in glob.glob(os.path.join(HERE, "csrc", "**", "*.cpp"), recursive=True)
)
SUPPORTED_TORCH = "torch>=2.4"
# The release the extension is built against, without a local label (+cpu, +cu126):
# builds of one release share the C++ ABI the extension links to.
BUILT_TORCH = torch.__version__.split("+")[0]


class BuildWithTorchVersion(BuildExtension):
    """Builds the extension and writes, beside it, the torch it was built for."""

    def run(self):
        super().run()
        folder = os.path.dirname(self.get_ext_fullpath("fastrnn._C"))
        with open(os.path.join(folder, "_build_info.py"), "w") as f:
            f.write('"""Written by the build: the torch release fastrnn._C was compiled against."""\n\n'
                    f"TORCH_VERSION = {BUILT_TORCH!r}\n")


# Whatever compiles the extension (a wheel, an install, an editable install)
# requires the torch it compiles against; a source distribution, built
# anywhere, keeps the supported range. (Under the standard frontend a wheel's
# metadata is prepared by its own setup.py run, apart from the wheel build.)
BUILDING_SDIST = "sdist" in sys.argv[1:]

setup(
    install_requires=[SUPPORTED_TORCH if BUILDING_SDIST else f"torch=={BUILT_TORCH}"],
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
    cmdclass={"build_ext": BuildWithTorchVersion},
)
