"""Lazy JIT build of the two extensions, and `python -m warp_kernel.build` to build ahead of time.

Two separate extensions, so the CPU path works where nvcc is missing:
  cpu:  csrc/warp_ssim_cpu.cpp                       (c++ with OpenMP)
  cuda: csrc/warp_ssim_cuda.cu + warp_ssim_cuda.cpp  (nvcc + c++)
Each is built with torch.utils.cpp_extension.load (ninja) on first use, cached in a build
directory and re-used by later processes; nothing is built at import. A failed build warns once,
naming the reason and the fallback, and the backend is then reported unavailable.

Environment:
  WARP_KERNEL_BUILD_DIR  cache root (default: $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions,
                         under a py<ver>_torch<ver> subdirectory)
  CUDA_HOME              CUDA toolkit with nvcc (e.g. /usr/local/cuda); unset, torch guesses
                         it from the nvcc on PATH, and where that guess has no headers the
                         build takes the toolkit that nvcc runs, or /usr/local/cuda
  TORCH_CUDA_ARCH_LIST   GPU archs, e.g. "8.6" or "7.5;8.0+PTX"; default: the visible GPUs, or
                         DEFAULT_CUDA_ARCHS when there is none
  WARP_KERNEL_CPU_ISA    instruction set of the CPU extension: "auto" (default: what
                         torch.backends.cpu.get_cpu_capability() reports, AVX512 -> x86-64-v4,
                         AVX2 -> x86-64-v3, else baseline), one of x86-64-v4, x86-64-v3,
                         baseline, or "native" (-march=native)
  MAX_JOBS               parallel compile jobs (ninja)
"""

import logging
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from warp_kernel import cli

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = ["warp_ssim_cpu.cpp"]
CUDA_SOURCES = ["warp_ssim_cuda.cu", "warp_ssim_cuda.cpp"]
HEADERS = [
    "warp_ssim_math.h",
    "warp_ssim_args.h",
    "warp_ssim_checks.h",
    "warp_ssim_ops.h",
    "warp_ssim_cuda.h",
    "warp_ssim_cuda_backend.h",
    "warp_ssim_kernels.cuh",
]
# The CUDA kernels compiled for CPU threads: lets machines without a GPU test them.
EMULATION_SOURCES = ["warp_ssim_emulated.cpp", "cuda_emulation.h"]
# Turing (T4), Ampere and Ada (sm_80 code runs on 8.x), PTX for everything newer.
DEFAULT_CUDA_ARCHS = "7.5;8.0+PTX"

_lock = threading.RLock()
_modules = {}  # backend -> loaded module
_failures = {}  # backend -> reason it is unavailable
_warned = set()  # backends whose failure has been reported


def source_files():
    """Every file the extensions are built from (for packaging: ship these as package data)."""
    return [CSRC / name for name in CPU_SOURCES + CUDA_SOURCES + HEADERS + EMULATION_SOURCES]


def build_root():
    """Directory under which the two extensions are built and cached."""
    root = os.environ.get("WARP_KERNEL_BUILD_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    root = Path(root) if root else Path.home() / ".cache" / "torch_extensions"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    return root / tag.replace("+", "_")


_ISA_FLAGS = {
    "x86-64-v4": (
        "x86v4",
        ["-march=x86-64-v4", "-mtune=icelake-server", "-mprefer-vector-width=512"],
    ),
    "x86-64-v3": ("x86v3", ["-march=x86-64-v3", "-mtune=skylake"]),
    "native": ("native", ["-march=native"]),
    "baseline": ("base", []),
}


# The instruction set PyTorch's own CPU kernels dispatch to on this machine (which the user can
# lower with ATEN_CPU_CAPABILITY) -> the level the CPU extension is built for. PyTorch's AVX512
# asks for avx512f/bw/vl/dq and AVX2 for avx2 + fma; x86-64-v4 adds avx512cd and x86-64-v3
# bmi1/bmi2/lzcnt/movbe/f16c, which every CPU with those has.
_ISA_OF_CAPABILITY = {"AVX512": "x86-64-v4", "AVX2": "x86-64-v3"}


def _cpu_isa():
    """(name suffix, compiler flags) for the CPU extension. A cached library only runs on CPUs
    with the instruction set it was built for, so the level is part of the extension's name:
    x86-64-v4 (AVX-512), x86-64-v3 (AVX2, FMA) or the compiler's baseline. The tuning options
    let the compiler use gather instructions for the bilinear samples."""
    isa = os.environ.get("WARP_KERNEL_CPU_ISA", "auto")
    if isa == "auto":
        isa = _ISA_OF_CAPABILITY.get(torch.backends.cpu.get_cpu_capability(), "baseline")
    if isa not in _ISA_FLAGS:
        raise ValueError(f"WARP_KERNEL_CPU_ISA={isa!r} is not one of auto, {', '.join(_ISA_FLAGS)}")
    return _ISA_FLAGS[isa]


def _cuda_arch_flags():
    """-gencode flags, always explicit so that the build cache is keyed on them."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not archs and torch.cuda.is_available():
        caps = sorted(
            {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        )
        archs = ";".join(f"{major}.{minor}" for major, minor in caps) + "+PTX"
    archs = archs or DEFAULT_CUDA_ARCHS
    flags = []
    for arch in archs.replace(" ", ";").split(";"):
        if not arch:
            continue
        number = arch.split("+")[0].replace(".", "")
        if not number.isdigit():
            raise ValueError(f"TORCH_CUDA_ARCH_LIST entry {arch!r} is not like '8.6' or '8.6+PTX'")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def _cpp_extension():
    """torch.utils.cpp_extension, imported without the "No CUDA runtime is found" line it logs
    on every machine without a GPU (where the CUDA extension still builds, and the CPU one is
    the one used)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _missing_tools(backend):
    """Why the toolchain cannot build `backend`, or None."""
    cpp_extension = _cpp_extension()
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed (pip install ninja)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found; set CXX)"
    if backend == "cuda":
        if torch.version.cuda is None:
            return "this PyTorch build has no CUDA support"
        # Where the build will look: torch's CUDA_HOME ($CUDA_HOME, $CUDA_PATH, the folder above
        # the nvcc on PATH, /usr/local/cuda), whose include/ (and $CUDA_INC_PATH) it compiles with.
        home = cpp_extension.CUDA_HOME
        if home is None:
            return "no CUDA toolkit found (set CUDA_HOME to the CUDA toolkit, e.g. /usr/local/cuda)"
        missing = _toolkit_missing(Path(home))
        if missing is None:
            return None
        # torch's guess from an nvcc wrapper on PATH (/usr/local/bin/nvcc gives /usr/local) has
        # no headers: build with the toolkit that nvcc belongs to, or a standard one, instead
        other = next((t for t in _other_toolkits(Path(home)) if _toolkit_missing(t) is None), None)
        if other is not None:
            cpp_extension.CUDA_HOME = str(other)  # what the build joins include/ and bin/ to
            return None
        return (
            f"the CUDA toolkit torch found at {home} has no {missing} "
            "(set CUDA_HOME to the CUDA toolkit, e.g. /usr/local/cuda)"
        )
    return None


# Where CUDA toolkits install, tried when torch's CUDA_HOME has no headers
CUDA_TOOLKIT_FOLDERS = ("/usr/local/cuda",)


def _toolkit_missing(home):
    """What the build needs that the toolkit folder `home` lacks ("bin/nvcc" or
    "include/cuda_runtime.h", also looked for in $CUDA_INC_PATH), or None."""
    includes = [home / "include"]
    if os.environ.get("CUDA_INC_PATH"):
        includes.append(Path(os.environ["CUDA_INC_PATH"]))
    if not (home / "bin" / "nvcc").exists():
        return "bin/nvcc"
    if not any((folder / "cuda_runtime.h").exists() for folder in includes):
        return "include/cuda_runtime.h"
    return None


def _other_toolkits(home):
    """The toolkit folders that home/bin/nvcc really runs: the one it links to, or the nvcc a
    small wrapper script execs (exec /usr/local/cuda-13.0/bin/nvcc "$@"); then
    CUDA_TOOLKIT_FOLDERS."""
    nvcc, found = home / "bin" / "nvcc", []
    if nvcc.is_file():
        found.append(nvcc.resolve().parent.parent)
        if nvcc.stat().st_size < 4096:
            try:
                text = nvcc.read_text(errors="replace")
            except OSError:
                text = ""
            for word in text.replace('"', " ").replace("'", " ").split():
                if word.startswith("/") and word.endswith("/bin/nvcc"):
                    found.append(Path(word).parent.parent)
    standard = [Path(folder) for folder in CUDA_TOOLKIT_FOLDERS]
    # by its standard name where it has one (/usr/local/cuda for /usr/local/cuda-13.0), so that
    # the build is the one CUDA_HOME=/usr/local/cuda gives, and shares its cache
    named = {folder.resolve(): folder for folder in reversed(standard) if folder.exists()}
    found = [named.get(folder.resolve(), folder) for folder in found] + standard
    return [folder for folder in found if folder != home]


def _build(backend, verbose):
    cpp_extension = _cpp_extension()

    common = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-DNDEBUG"]
    if backend == "cpu":
        suffix, isa_flags = _cpu_isa()
        name = f"warp_kernel_cpu_{suffix}"
        sources = CPU_SOURCES
        kwargs = {"extra_cflags": common + isa_flags, "extra_ldflags": ["-fopenmp"]}
    else:
        name = "warp_kernel_cuda"
        sources = CUDA_SOURCES
        kwargs = {
            "extra_cflags": ["-O3", "-DNDEBUG"],
            "extra_cuda_cflags": ["-O3", "-DNDEBUG", "-lineinfo", *_cuda_arch_flags()],
            "with_cuda": True,
        }
    directory = build_root() / name
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(CSRC / s) for s in sources],
        extra_include_paths=[str(CSRC)],
        build_directory=str(directory),
        verbose=verbose,
        **kwargs,
    )


def load(backend, verbose=False, warn=True):
    """The loaded extension module for `backend` ("cpu" or "cuda"), building it on first use,
    or None if it cannot be built: then `failure(backend)` gives the reason, and the first call
    with warn=True issues the one warning about it."""
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"backend must be 'cpu' or 'cuda', got {backend!r}")
    with _lock:
        if backend in _modules:
            return _modules[backend]
        if backend not in _failures:
            reason = _missing_tools(backend)
            if reason is None:
                try:
                    _modules[backend] = _build(backend, verbose)
                    return _modules[backend]
                except Exception as e:  # noqa: BLE001 - any build failure means: fall back
                    lines = [line for line in str(e).strip().splitlines() if line.strip()]
                    reason = f"build failed: {type(e).__name__}: " + " | ".join(lines[-6:])[-600:]
            _failures[backend] = reason
        if warn and backend not in _warned:
            _warned.add(backend)
            name = "cpp" if backend == "cpu" else "cuda"
            warnings.warn(
                f"warp_kernel: the {name} backend is unavailable ({_failures[backend]}); "
                "falling back to the pure-PyTorch ops (impl='torch').",
                RuntimeWarning,
                stacklevel=3,
            )
        return None


def failure(backend):
    """Why `backend` could not be loaded (None if it loaded or was never tried)."""
    return _failures.get(backend)


def main(argv=None):
    parser = cli.Parser(
        prog="python -m warp_kernel.build",
        description="Build the warp_kernel extensions ahead of time.",
    )
    parser.add_argument("--backend", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 if any requested build fails"
    )
    args = parser.parse_args(argv)
    ok = True
    print(f"build directory: {build_root()}")
    for backend in ["cpu", "cuda"] if args.backend == "all" else [args.backend]:
        start = time.perf_counter()
        module = load(backend, verbose=args.verbose, warn=False)
        seconds = time.perf_counter() - start
        if module is None:
            ok = False
            print(f"{backend}: FAILED after {seconds:.1f} s: {failure(backend)}")
        else:
            print(f"{backend}: ok ({seconds:.1f} s) {module.__file__}")
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
