"""Build script for bucketmoo_kernels.

The pure-Python package (reference, Triton kernels, DDP hook) always installs. Native
extensions are added by ``_extensions()`` below when their toolchain is present.

Environment variables:
    BUCKETMOO_SKIP_CPU_BUILD=1    do not build the C++/OpenMP CPU extension
    BUCKETMOO_SKIP_CUDA_BUILD=1   do not build the CUDA extension
    BUCKETMOO_FORCE_CUDA_BUILD=1  build the CUDA extension even if no GPU is visible
    BUCKETMOO_CUDA_ARCHS="80;90"  CUDA architectures to build for (default 80;90)
    MAX_JOBS                      parallel compile jobs (respected by torch's builder)

Install into an environment that already has torch:
    pip install --no-build-isolation -e .
"""

import os

from setuptools import find_packages, setup


def _extensions():
    """Native extensions to build, and the build_ext command class (none yet)."""
    return [], {}


ext_modules, cmdclass = _extensions()

setup(
    name="bucketmoo_kernels",
    version="0.1.0",
    description="Fused kernels for Bucket-Level multi-objective optimisation (MGDA and friends) "
                "in data-parallel training",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(os.path.dirname(__file__), "README.md")) else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["bucketmoo_kernels", "bucketmoo_kernels.*"]),
    # torch is not pinned here on purpose (pip would otherwise pull a CUDA build on CPU machines):
    # install your torch first. numpy is used by the solvers' tests and the benchmarks.
    install_requires=["numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "hypothesis", "scipy"],
        "demo": ["matplotlib", "tqdm", "babel"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
