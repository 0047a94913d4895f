"""Locating, building and loading the CUDA extension behind :mod:`cluster.cuda_ext`.

The backend itself (the composition of the qk / av / wf ops, their fake impls and autograd)
is in :mod:`cluster.cuda_ext`; this module finds ``csrc/`` and nvcc, builds the extension
with ``torch.utils.cpp_extension`` on first use, loads it once per process, compiles
``csrc/`` without a GPU (``check-compile``) and holds the command line
``python -m cluster.cuda_ext {build,check-compile}``.

Loading: a prebuilt ``cluster._C`` if importable, else a just-in-time build into
``$CLUSTER_EXT_DIR`` or ``~/.cache/cluster-attention/ext-<torch>-<cuda>``, only when a CUDA
device and nvcc are present; a cached build is used without nvcc. Nothing is built at import.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import torch

__all__ = ["load", "build_dir", "csrc_dir", "sources", "find_nvcc", "check_compile", "main"]

NAMESPACE = "cluster"
EXT_NAME = "cluster_cuda_ext"
DEFAULT_ARCH_LIST = "8.0;9.0"

# No --use_fast_math: this is the exact-float32 baseline the fused backends are judged by.
EXTRA_CFLAGS = ["-O3"]
EXTRA_CUDA_CFLAGS = ["-O3"]


# ============================================================== locating and building


def csrc_dir() -> Path | None:
    """The C++/CUDA sources: shipped as package data, or the repository's csrc/."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent.parent / "csrc"):
        if (cand / "cluster_ops.cpp").is_file():
            return cand
    return None


def sources() -> list[Path]:
    d = csrc_dir()
    if d is None:
        return []
    return sorted(d.glob("*.cpp")) + sorted(d.glob("*.cu"))


def build_dir() -> Path:
    """Where the JIT build lives: $CLUSTER_EXT_DIR, else a per-torch, per-CUDA cache."""
    env = os.environ.get("CLUSTER_EXT_DIR")
    if env:
        return Path(env).expanduser()
    cuda = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    return Path.home() / ".cache" / "cluster-attention" / f"ext-{torch.__version__}-{cuda}"


def cuda_home() -> Path | None:
    """The CUDA toolkit root; `which nvcc` may be a wrapper script outside it."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = Path(nvcc).resolve().parent.parent
        if (root / "include" / "cuda_runtime_api.h").is_file():
            return root
    default = Path("/usr/local/cuda")
    return default if (default / "bin" / "nvcc").exists() else None


def find_nvcc() -> str | None:
    home = cuda_home()
    if home is not None and (home / "bin" / "nvcc").exists():
        return str(home / "bin" / "nvcc")
    return shutil.which("nvcc")


def _nvidia_wheel_includes() -> list[Path]:
    """Header folders of the nvidia-* wheels a CUDA build of torch depends on.

    A minimal toolkit lacks some headers that torch's CUDA headers name (cusparse.h,
    cublas_v2.h); these fill the gaps. They are searched after everything else so that a
    full toolkit's own headers always win.
    """
    found = []
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        root = Path(site) / "nvidia"
        if root.is_dir():
            found += sorted(p for p in root.glob("*/include") if p.is_dir())
    return found


def _arch_list() -> str:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    archs = DEFAULT_ARCH_LIST.split(";")
    # A GPU outside the default families (e.g. sm_100) runs nothing built for 8.0/9.0.
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if major not in (8, 9):
            archs.append(f"{major}.{minor}")
    return ";".join(archs)


class _State:
    lock = threading.Lock()
    tried = False
    reason: str | None = "not loaded yet"
    origin: str | None = None
    registered: set[str] = set()


def _environment_reason() -> str | None:
    if torch.version.cuda is None:
        return f"torch has no CUDA (CPU build {torch.__version__})"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def _cached_library() -> Path | None:
    lib = build_dir() / f"{EXT_NAME}.so"
    return lib if lib.is_file() else None


def _jit_build(verbose: bool) -> str:
    """Build (or reuse) the extension in build_dir() and load it; returns the .so path."""
    from torch.utils import cpp_extension

    srcs = sources()
    if not srcs:
        raise FileNotFoundError("csrc/ not found next to the package or in the repository")
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    home = cuda_home()
    # torch guesses the toolkit from `which nvcc`, which a wrapper script defeats; name
    # the real one's headers and libraries explicitly.
    includes = [str(home / "include")] if home else []
    ldflags = [f"-L{home / d}" for d in ("lib64", "lib") if home and (home / d).is_dir()]
    fill = [f for d in _nvidia_wheel_includes() for f in ("-idirafter", str(d))]
    fill_cuda = [f"-Xcompiler=-idirafter,{d}" for d in _nvidia_wheel_includes()]
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_list()
    try:
        cpp_extension.load(
            name=EXT_NAME,
            sources=[str(s) for s in srcs],
            build_directory=str(out),
            extra_cflags=EXTRA_CFLAGS + fill,
            extra_cuda_cflags=EXTRA_CUDA_CFLAGS + fill_cuda,
            extra_include_paths=includes,
            extra_ldflags=ldflags,
            is_python_module=False,
            verbose=verbose,
        )
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    return str(out / f"{EXT_NAME}.so")


def _load_once(verbose: bool = False) -> str | None:
    """Load the extension the first time it is needed; returns why not, or None."""
    # Unlocked fast path: after the first call this is all torch.compile traces through.
    if _State.tried:
        return _State.reason
    with _State.lock:
        if not _State.tried:
            reason = _try_load(verbose)
            if reason is None:
                # The C++ library names cluster.cuda_ext as the home of its fake impls.
                from .cuda_ext import _register_python_side

                _register_python_side(NAMESPACE)
            _State.reason = reason
            _State.tried = True
        return _State.reason


def _ops_defined() -> bool:
    try:
        getattr(torch.ops, NAMESPACE).qk_forward  # noqa: B018  (the lookup is the test)
    except (AttributeError, RuntimeError):
        return False
    return True


def _try_load(verbose: bool) -> str | None:
    why = _environment_reason()
    if why is not None:
        return why
    if _ops_defined():
        _State.origin = "already registered in this process"
        return None
    try:
        importlib.import_module("cluster._C")
        _State.origin = "prebuilt module cluster._C"
        return None
    except ImportError:
        pass
    except Exception as exc:  # a stale build for another torch: fall through to the JIT build
        if verbose:
            print(f"cluster._C is unusable ({type(exc).__name__}: {exc}); building instead",
                  file=sys.stderr)
    if find_nvcc() is None:
        cached = _cached_library()
        if cached is None:
            return "nvcc not found (set CUDA_HOME or put nvcc on PATH) and no prebuilt extension"
        torch.ops.load_library(str(cached))
        _State.origin = f"cached build {cached}"
        return None
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja), needed to build the extension"
    log = build_dir() / "build.log"
    try:
        if not verbose and _cached_library() is None:
            print(f"cluster.cuda_ext: building the CUDA extension into {build_dir()} "
                  f"(first use only, about a minute)", file=sys.stderr)
        _State.origin = _jit_build(verbose)
    except Exception as exc:
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(f"{type(exc).__name__}: {exc}\n")
        except OSError:
            return f"build failed ({type(exc).__name__}: {exc}); the log could not be written to {log}"
        return f"build failed, see {log}"
    return None


def load(verbose: bool = False) -> str:
    """Load (building if needed) the extension; returns where it came from or raises."""
    why = _load_once(verbose)
    if why is not None:
        raise RuntimeError(f"cluster CUDA extension unavailable: {why}")
    return _State.origin or ""


# ============================================================== compile-only check


def _cxx_standard() -> str:
    """The C++ standard torch's own extension builds use (c++17 up to torch 2.9, then c++20)."""
    from torch.utils import cpp_extension

    found = re.findall(r"-std=c\+\+(\d+)", inspect.getsource(cpp_extension))
    return f"c++{max(found, key=int)}" if found else "c++17"


def _gencode_flags(arch_list: str) -> list[str]:
    """"80;90", "8.0 9.0+PTX", "sm_90a" -> nvcc -gencode flags."""
    flags = []
    for item in re.split(r"[;,\s]+", arch_list.strip()):
        if not item:
            continue
        ptx = item.upper().endswith("+PTX")
        arch = item[:-4] if ptx else item
        arch = arch.lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise ValueError(f"--arch: cannot read {item!r}; expected e.g. 80, 9.0, 90a or 9.0+PTX")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    if not flags:
        raise ValueError("--arch: no architecture given")
    return flags


def compile_commands(arch_list: str, out_dir: Path) -> list[tuple[Path, list[str]]]:
    """One compile-only command per source, with the flags a JIT build would use."""
    from torch.utils import cpp_extension

    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    home = cuda_home()
    std = f"-std={_cxx_standard()}"
    includes = [f"-I{p}" for p in cpp_extension.include_paths("cpu")]
    if home is not None:
        includes.append(f"-I{home / 'include'}")
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    defines = [f"-DTORCH_EXTENSION_NAME={EXT_NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    fill = _nvidia_wheel_includes()
    cxx = os.environ.get("CXX", "c++")
    cmds = []
    for src in sources():
        obj = out_dir / (src.name + ".o")
        if src.suffix == ".cu":
            cmd = [nvcc, "-c", str(src), "-o", str(obj), *includes, *defines,
                   *cpp_extension.COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC", std,
                   *_gencode_flags(arch_list), *EXTRA_CUDA_CFLAGS,
                   *[f"-Xcompiler=-idirafter,{d}" for d in fill]]
        else:
            cmd = [cxx, "-c", str(src), "-o", str(obj), "-fPIC", std, *includes, *defines,
                   *EXTRA_CFLAGS, *[f for d in fill for f in ("-idirafter", str(d))]]
        cmds.append((src, cmd))
    return cmds


def check_compile(arch_list: str = DEFAULT_ARCH_LIST, jobs: int = 2, verbose: bool = False) -> int:
    """Compile every csrc source (no linking, no GPU); prints per-file times, returns 0 if all built."""
    import tempfile

    if torch.version.cuda is None:
        print(f"check-compile needs a CUDA build of torch; this is {torch.__version__} "
              f"(e.g. a venv with torch==2.14.1)", file=sys.stderr)
        return 2
    if not sources():
        print("check-compile: csrc/ not found", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cluster-check-compile-") as tmp:
        try:
            cmds = compile_commands(arch_list, Path(tmp))
        except (RuntimeError, ValueError) as exc:
            print(f"check-compile: {exc}", file=sys.stderr)
            return 2
        print(f"check-compile: torch {torch.__version__}, nvcc {find_nvcc()}, arch {arch_list}, "
              f"{len(cmds)} files, {jobs} jobs", flush=True)

        def run(item):
            src, cmd = item
            if verbose:
                print(" ".join(cmd), flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            return src, proc, time.perf_counter() - t0

        t_all = time.perf_counter()
        failed = 0
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for src, proc, secs in pool.map(run, cmds):
                status = "ok" if proc.returncode == 0 else "FAILED"
                print(f"  {status:6s} {src.name:24s} {secs:7.1f} s", flush=True)
                if proc.returncode != 0:
                    failed += 1
                    print((proc.stdout + proc.stderr)[-8000:], file=sys.stderr)
        print(f"check-compile: {len(cmds) - failed}/{len(cmds)} compiled in "
              f"{time.perf_counter() - t_all:.1f} s wall", flush=True)
    return 1 if failed else 0


# ======================================================================== command line


def _self_test() -> tuple[bool, str]:
    from . import reference
    from .cuda_ext import query_key

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 16, 8, generator=g), torch.randn(2, 3, 16, 8, generator=g)
    idx = torch.randint(0, 16, (2, 16, 5), generator=g)
    got = query_key(q.cuda(), k.cuda(), idx.cuda()).cpu()
    err = (got - reference.query_key(q, k, idx)).abs().max().item()
    ok = err < 1e-5
    return ok, f"self test qk_forward fp32: max abs error {err:.2e} ({'ok' if ok else 'FAILED'})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.cuda_ext",
                                     description="Build, load or compile-check the CUDA extension of cluster.cuda_ext.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build/load the extension into the cache, then self-test on a GPU")
    b.add_argument("--verbose", action="store_true")
    c = sub.add_parser("check-compile", help="compile csrc/ without linking (no GPU needed; CUDA torch)")
    c.add_argument("--arch", default=DEFAULT_ARCH_LIST,
                   help=f'architectures, e.g. "90" or "8.0;9.0+PTX" (default "{DEFAULT_ARCH_LIST}", as the build)')
    c.add_argument("--jobs", type=int, default=2, help="files compiled in parallel (default 2)")
    c.add_argument("--verbose", action="store_true", help="print the compiler command lines")
    args = parser.parse_args(argv)

    if args.cmd == "check-compile":
        return check_compile(args.arch, args.jobs, args.verbose)
    why = _load_once(verbose=args.verbose)
    if why is not None:
        print(f"cluster CUDA extension unavailable: {why}", file=sys.stderr)
        return 1
    print(f"cluster CUDA extension loaded: {_State.origin}")
    print(f"build directory: {build_dir()}  (TORCH_CUDA_ARCH_LIST={_arch_list()})")
    ok, line = _self_test()
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
