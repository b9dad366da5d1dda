"""Build script for bucketmoo_kernels.

The pure-Python package (reference, Triton kernels, DDP hook) always installs. Native
extensions are added by ``_extensions()`` below when their toolchain is present.

Environment variables:
    BUCKETMOO_SKIP_CPU_BUILD=1    do not build the C++/OpenMP CPU extension
    BUCKETMOO_SKIP_CUDA_BUILD=1   do not build the CUDA extension
    BUCKETMOO_FORCE_CUDA_BUILD=1  build the CUDA extension even if no GPU is visible
    BUCKETMOO_CUDA_ARCHS="80;90"  CUDA architectures to build for (default 80;90)
    MAX_JOBS                      parallel compile jobs (respected by torch's builder)

Install into an environment that already has torch (metadata and extras: pyproject.toml):
    pip install --no-build-isolation -e .                       # a checkout
    pip install --no-build-isolation bucketmoo_kernels-*.tar.gz  # the sdist (MANIFEST.in lists
                                                                 # every source the build needs)
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    print(f"bucketmoo_kernels setup: {msg}", file=sys.stderr)


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cpu_extension(cpp_extension):
    """The C++/OpenMP CPU extension ``bucketmoo_kernels._cpu`` (csrc/cpu + python/ bindings)."""
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
                   + [p for p in glob.glob(os.path.join(ROOT, "python", "*.cpp"))
                      if os.path.basename(p) != "cuda_ops.cpp"])
    # -fno-wrapv: Python's own CFLAGS carry -fwrapv, which stops GCC from vectorising the
    # gram loops (3x slower); nothing here relies on signed overflow wrapping.
    # -g0: Python's CFLAGS carry -g; a release build needs no debug info (smaller, faster to build).
    cxx = ["-O3", "-DNDEBUG", "-fno-wrapv", "-fvisibility=hidden", "-g0"]
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    else:
        _say("OpenMP flags are only set on Linux; the CPU kernels run single-threaded here")
    if _flag("BUCKETMOO_CPU_NATIVE"):
        # Only for a build that runs on this machine: never ship a wheel built like this.
        cxx.append("-march=native")
        _say("BUCKETMOO_CPU_NATIVE=1: compiling the CPU extension with -march=native")
    return cpp_extension.CppExtension(
        "bucketmoo_kernels._cpu", sources,
        include_dirs=[ROOT], extra_compile_args={"cxx": cxx}, extra_link_args=link)


def _cuda_archs():
    archs = os.environ.get("BUCKETMOO_CUDA_ARCHS", "80;90").replace(",", ";")
    flags = []
    for arch in (a.strip() for a in archs.split(";")):
        if arch:
            num = arch.replace(".", "").replace("sm_", "")
            flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return flags


def _cuda_extension(torch, cpp_extension):
    """The CUDA extension ``bucketmoo_kernels._cuda`` (csrc/cuda/*.cu + python/cuda_ops.cpp),
    or None with the reason printed."""
    if _flag("BUCKETMOO_SKIP_CUDA_BUILD"):
        _say("skipping the CUDA extension: BUCKETMOO_SKIP_CUDA_BUILD is set")
        return None
    forced = _flag("BUCKETMOO_FORCE_CUDA_BUILD")
    cu_sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    binding = os.path.join(ROOT, "python", "cuda_ops.cpp")
    if not cu_sources or not os.path.exists(binding):
        _say("skipping the CUDA extension: no csrc/cuda/*.cu or python/cuda_ops.cpp in this tree")
        return None
    if not forced:
        if not torch.version.cuda:
            _say(f"skipping the CUDA extension: torch {torch.__version__} is not a CUDA build "
                 "(BUCKETMOO_FORCE_CUDA_BUILD=1 to try anyway)")
            return None
        if cpp_extension.CUDA_HOME is None:
            _say("skipping the CUDA extension: no CUDA toolkit found (set CUDA_HOME, or "
                 "BUCKETMOO_FORCE_CUDA_BUILD=1)")
            return None
    _say(f"building the CUDA extension for archs {os.environ.get('BUCKETMOO_CUDA_ARCHS', '80;90')}"
         + (" (forced)" if forced else ""))
    try:
        return cpp_extension.CUDAExtension(
            "bucketmoo_kernels._cuda", _rel(cu_sources + [binding]),
            include_dirs=[ROOT],
            extra_compile_args={"cxx": ["-O3", "-DNDEBUG"],
                                "nvcc": ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr",
                                         "-lineinfo"] + _cuda_archs()})
    except (OSError, RuntimeError) as exc:
        if forced:
            raise RuntimeError(f"BUCKETMOO_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be "
                               f"configured: {exc}") from exc
        _say(f"skipping the CUDA extension: {exc}")
        return None


def _extensions():
    """Native extensions to build and the build_ext command class.

    Never imports anything that would make pip resolve torch: without torch in the build
    environment (e.g. pip's build isolation) the pure-Python package installs alone.
    """
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001
        _say(f"torch is not importable ({type(exc).__name__}: {exc}): installing the pure-Python "
             "package only, without native extensions. Install torch first and use "
             "pip install --no-build-isolation to build them.")
        return [], {}
    exts = []
    if _flag("BUCKETMOO_SKIP_CPU_BUILD"):
        _say("skipping the CPU extension: BUCKETMOO_SKIP_CPU_BUILD is set")
    else:
        _say(f"building the CPU extension bucketmoo_kernels._cpu against torch {torch.__version__}")
        exts.append(_cpu_extension(cpp_extension))
    cuda = _cuda_extension(torch, cpp_extension)
    if cuda is not None:
        exts.append(cuda)
    if not exts:
        return [], {}
    if os.environ.get("MAX_JOBS"):
        _say(f"MAX_JOBS={os.environ['MAX_JOBS']} parallel compile jobs")
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=cpp_extension.is_ninja_available())
    return exts, {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

# The metadata (name, version, dependencies, extras) lives in pyproject.toml's [project]
# table; this script only adds the native extensions, built against the installed torch.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
