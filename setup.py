"""Build gradreg_fast and its extension ``gradreg_fast._C``.

Environment switches (read at build time, never guessed from the GPUs that happen to be visible):

GRADREG_SKIP_EXT=1      install pure Python; ``gradreg_fast.backends()`` then reports the C++/CUDA
                        backends as unavailable and ``import gradreg_fast`` says so once.
GRADREG_CUDA=auto|1|0   CUDA kernels. ``1`` builds them and fails if the installed torch is not a
                        CUDA build or no CUDA toolkit is found; ``0`` builds the CPU kernels only;
                        ``auto`` (default) builds them exactly when the installed torch is a CUDA
                        build AND a CUDA toolkit is found (CUDA_HOME, CUDA_PATH or /usr/local/cuda).
TORCH_CUDA_ARCH_LIST    target GPU architectures for a CUDA build, e.g. "9.0" for H100/H200. Unset, torch
                        targets the visible GPUs; with none visible (a build node), setup.py sets
                        DEFAULT_CUDA_ARCHS ("8.0;9.0+PTX": A100, H100/H200, PTX for newer cards) and says so.
GRADREG_PTXAS_VERBOSE=1 adds -Xptxas=-v to the CUDA compile: ptxas prints each kernel's registers, spills and
                        shared memory into the build log (scripts/cuda_build_check.sh turns it into
                        benchmarks/results/gpu_resources_cuda.md). No effect on the code generated.

Build against the torch you run: ``pip install --no-build-isolation .``
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
PACKAGES = find_packages(include=["gradreg_fast", "gradreg_fast.*"])


def _flag(name: str, default: str) -> str:
    value = os.environ.get(name, default).strip().lower()
    return value


def _write_build_info(**info) -> None:
    path = os.path.join(ROOT, "gradreg_fast", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time.\n")
        for key, value in info.items():
            f.write(f"{key} = {value!r}\n")


def _extensions():
    if _flag("GRADREG_SKIP_EXT", "0") in ("1", "true", "yes"):
        _write_build_info(torch_version=None, with_cuda=False, extension=False)
        print("gradreg_fast: GRADREG_SKIP_EXT=1, installing pure Python (no C++/CUDA kernels)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover - build-time message
        sys.exit(
            "gradreg_fast: building the extension needs torch at build time "
            f"({exc}). Install torch first and build with `pip install --no-build-isolation .`, "
            "or set GRADREG_SKIP_EXT=1 for a pure-Python install."
        )

    mode = _flag("GRADREG_CUDA", "auto")
    if mode not in ("auto", "1", "0"):
        sys.exit(f"gradreg_fast: GRADREG_CUDA must be auto, 1 or 0, got {mode!r}")
    torch_is_cuda = torch.version.cuda is not None
    toolkit = cpp_extension.CUDA_HOME
    if mode == "1":
        if not torch_is_cuda:
            sys.exit("gradreg_fast: GRADREG_CUDA=1 but the installed torch is a CPU build; "
                     "install a CUDA build of torch or use GRADREG_CUDA=0")
        if toolkit is None:
            sys.exit("gradreg_fast: GRADREG_CUDA=1 but no CUDA toolkit was found; "
                     "set CUDA_HOME to the toolkit (the folder holding bin/nvcc)")
        with_cuda = True
    elif mode == "0":
        with_cuda = False
    else:
        with_cuda = torch_is_cuda and toolkit is not None

    sources = [os.path.join("csrc", "gradreg.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -fno-trapping-math lets the element loops with selects (relu masks, clamps) vectorize; no FP
    # exception flags are relied on. The C++ standard is chosen by torch (C++17 up to 2.13, C++20 from 2.14).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    extra = {"cxx": cxx}
    define_macros = []
    ext_cls = cpp_extension.CppExtension
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
        if _flag("GRADREG_PTXAS_VERBOSE", "0") in ("1", "true", "yes"):
            extra["nvcc"].append("-Xptxas=-v")
        define_macros.append(("GRADREG_WITH_CUDA", None))
        ext_cls = cpp_extension.CUDAExtension
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # torch would otherwise ask the (absent) GPU for its architecture and fail obscurely
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
            print(f"gradreg_fast: no GPU visible and TORCH_CUDA_ARCH_LIST unset: compiling the CUDA kernels "
                  f"for {DEFAULT_CUDA_ARCHS} (set TORCH_CUDA_ARCH_LIST to choose, or GRADREG_CUDA=0 for none)")
    print(f"gradreg_fast: building _C with CPU kernels{' and CUDA kernels' if with_cuda else ''} "
          f"(GRADREG_CUDA={mode}, torch {torch.__version__}, CUDA toolkit {toolkit})")
    _write_build_info(torch_version=torch.__version__, with_cuda=with_cuda, extension=True)
    ext = ext_cls(
        name="gradreg_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="gradreg_fast",
    version="0.1.0",
    description="Fast gradient and Jacobian penalties (DoubleBack, SpectReg, FrobReg, JacReg) for PyTorch",
    long_description=(open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md"))
                      else ""),
    long_description_content_type="text/markdown",
    packages=PACKAGES,
    python_requires=">=3.11",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "hypothesis"],
        "bench": ["tqdm", "matplotlib"],
        "experiments": ["mlxtend", "tqdm", "matplotlib"],
        # examples/lightning_digits.py and its test (any torch the package supports satisfies it)
        "lightning": ["lightning>=2.1,<3", "mlxtend"],
        # the third-party zoo (gradreg_fast.testing.third_party, tests/test_third_party.py). torchvision's
        # wheels pair with the package index's own (CUDA) torch builds: install it beside such a torch
        "models": ["transformers", "timm", "torchvision"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
