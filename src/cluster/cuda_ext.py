"""Unfused CUDA backend of :mod:`cluster.ops`: AutoFocusFormer's original kernel design.

Three gather products run as separate CUDA kernels (``csrc/``, registered as
``torch.ops.cluster.*``) and everything between them is plain PyTorch, composed as
AFF's ``ClusterAttention`` module does::

    attn = qk_forward(q, k, member_idx) * scale + pe_table[pe_idx]     # [B, H, N, M]
    attn = softmax(cat(attn, blank logit)) in float32, back to q's dtype
    out  = av_forward(attn_without_blank, v, member_idx) + p_blank * blank_v

It is the baseline the fused backends are measured against, so it keeps the original's
memory traffic (the [B, H, N, M] logits round-trip through global memory). Differences
from the original kernels: float32 accumulation for half types, bfloat16, 64-bit index
arithmetic, masks with exact zero weight, and an optional deterministic backward.

Ops (all take a trailing ``deterministic=False``; forwards ignore it):

``qk_forward(q, k, member_idx)``            -> attn ``[B,H,N,M]``
``av_forward(attn, v, member_idx)``         -> out ``[B,H,N,D]``
``wf_forward(weights, feat, member_idx)``   -> out ``[B,N,W,C]``
and ``*_backward(grad, *inputs)`` returning the gradients of the two float inputs.

Determinism: the key-side gradients (dk, dv, d_feat) sum over every (query, slot) that
names a key. By default that is an ``atomicAdd`` into a float32 buffer, like the
original: fast, not bitwise reproducible. With ``deterministic=True`` each backward
instead sorts ``member_idx`` into a reverse map (key -> the slots naming it) and lets
one thread sum each output in a fixed order. The rest of the composition is PyTorch;
the position-bias gradient comes from ``index_put_`` (indexing backward), which
PyTorch makes deterministic under ``torch.use_deterministic_algorithms(True)``.

Loading: a prebuilt ``cluster._C`` if importable, else a just-in-time build with
``torch.utils.cpp_extension.load`` into ``$CLUSTER_EXT_DIR`` or
``~/.cache/cluster-attention/ext-<torch>-<cuda>``, only when a CUDA device and nvcc are
present. Nothing is built at import. ``python -m cluster.cuda_ext build`` builds ahead of
time; ``python -m cluster.cuda_ext check-compile`` compiles ``csrc/`` without a GPU.
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

from . import reference

__all__ = [
    "MAX_HEAD_DIM",
    "unavailable_reason",
    "cluster_attention",
    "weighted_features",
    "query_key",
    "attention_value",
    "load",
    "build_dir",
    "csrc_dir",
    "main",
]

# The kernels loop over D serially in one thread and have no hard limit; beyond this the
# unfused design is the wrong tool and no cluster-attention model uses such heads.
MAX_HEAD_DIM = 1024

NAMESPACE = "cluster"
EXT_NAME = "cluster_cuda_ext"
DEFAULT_ARCH_LIST = "8.0;9.0"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The C++ schemas (csrc/cluster_ops.cpp), repeated so that the Python side can be
# exercised against emulated ops on a machine without CUDA; a GPU test checks they agree.
SCHEMAS = {
    "qk_forward": "qk_forward(Tensor q, Tensor k, Tensor member_idx, bool deterministic=False) -> Tensor",
    "qk_backward": "qk_backward(Tensor grad_attn, Tensor q, Tensor k, Tensor member_idx, "
                   "bool deterministic=False) -> (Tensor, Tensor)",
    "av_forward": "av_forward(Tensor attn, Tensor v, Tensor member_idx, bool deterministic=False) -> Tensor",
    "av_backward": "av_backward(Tensor grad_out, Tensor attn, Tensor v, Tensor member_idx, "
                   "bool deterministic=False) -> (Tensor, Tensor)",
    "wf_forward": "wf_forward(Tensor weights, Tensor feat, Tensor member_idx, bool deterministic=False) -> Tensor",
    "wf_backward": "wf_backward(Tensor grad_out, Tensor weights, Tensor feat, Tensor member_idx, "
                   "bool deterministic=False) -> (Tensor, Tensor)",
}

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


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if the CUDA backend runs on ``device`` with ``dtype``, else why not.

    On a CUDA device the first call loads the extension, building it if needed.
    """
    device = torch.device(device)
    if dtype not in DTYPES:
        return f"the cuda backend supports float32, float16 and bfloat16, not {dtype}"
    if device.type != "cuda":
        why = _environment_reason()
        return why if why is not None else f"no CUDA device: the tensors are on {device}"
    return _load_once()


def _require() -> None:
    why = _load_once()
    if why is not None:
        from .ops import BackendUnavailableError

        raise BackendUnavailableError(f"backend 'cuda' is unavailable: {why}")


# ================================================ fake impls and autograd (Python side)


def _register_python_side(ns: str) -> None:
    """Fake impls (for torch.compile / meta tensors) and autograd formulas of ``ns::*``.

    Takes the namespace so the same registrations can be checked on CPU against
    emulated ops. Must run from this module: the C++ library names it as the home of
    its fake impls (set_python_module).
    """
    if ns in _State.registered:
        return
    ops = getattr(torch.ops, ns)

    def qk_forward_fake(q, k, member_idx, deterministic=False):
        torch._check(q.dim() == 4 and member_idx.dim() == 3, lambda: "qk_forward: bad ranks")
        return q.new_empty((q.shape[0], q.shape[1], q.shape[2], member_idx.shape[2]))

    def qk_backward_fake(grad_attn, q, k, member_idx, deterministic=False):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    def av_forward_fake(attn, v, member_idx, deterministic=False):
        torch._check(attn.dim() == 4 and v.dim() == 4, lambda: "av_forward: bad ranks")
        return v.new_empty((attn.shape[0], attn.shape[1], attn.shape[2], v.shape[3]))

    def av_backward_fake(grad_out, attn, v, member_idx, deterministic=False):
        return attn.new_empty(attn.shape), v.new_empty(v.shape)

    def wf_forward_fake(weights, feat, member_idx, deterministic=False):
        torch._check(weights.dim() == 4 and feat.dim() == 3, lambda: "wf_forward: bad ranks")
        return feat.new_empty((weights.shape[0], weights.shape[1], weights.shape[3], feat.shape[2]))

    def wf_backward_fake(grad_out, weights, feat, member_idx, deterministic=False):
        return weights.new_empty(weights.shape), feat.new_empty(feat.shape)

    for name, fn in (("qk_forward", qk_forward_fake), ("qk_backward", qk_backward_fake),
                     ("av_forward", av_forward_fake), ("av_backward", av_backward_fake),
                     ("wf_forward", wf_forward_fake), ("wf_backward", wf_backward_fake)):
        torch.library.register_fake(f"{ns}::{name}", fn)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3])
        ctx.deterministic = bool(inputs[3]) if len(inputs) > 3 else False
        ctx.n_inputs = len(inputs)

    def grads(ctx, first, second):
        need = ctx.needs_input_grad
        return ((first if need[0] else None), (second if need[1] else None),
                *([None] * (ctx.n_inputs - 2)))

    def qk_backward(ctx, grad):
        q, k, member_idx = ctx.saved_tensors
        return grads(ctx, *ops.qk_backward(grad, q, k, member_idx, ctx.deterministic))

    def av_backward(ctx, grad):
        attn, v, member_idx = ctx.saved_tensors
        return grads(ctx, *ops.av_backward(grad, attn, v, member_idx, ctx.deterministic))

    def wf_backward(ctx, grad):
        weights, feat, member_idx = ctx.saved_tensors
        return grads(ctx, *ops.wf_backward(grad, weights, feat, member_idx, ctx.deterministic))

    torch.library.register_autograd(f"{ns}::qk_forward", qk_backward, setup_context=setup)
    torch.library.register_autograd(f"{ns}::av_forward", av_backward, setup_context=setup)
    torch.library.register_autograd(f"{ns}::wf_forward", wf_backward, setup_context=setup)
    _State.registered.add(ns)


# ======================================================================== composition


def _compose_attention(ops, q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v,
                       scale, deterministic):
    """AFF's module around the qk / av ops of namespace ``ops``."""
    dt = q.dtype
    attn = ops.qk_forward(q, k, member_idx, deterministic) * scale  # [B, H, N, M]
    if pe_table is not None:
        attn = attn + pe_table.to(dt)[pe_idx.long()].permute(0, 3, 1, 2)
    valid = None
    if mask is not None:
        valid = mask.unsqueeze(1).expand_as(attn)
    if blank_k is not None:
        blank_logit = scale * (q * blank_k.to(dt)[None, :, None, :]).sum(-1, keepdim=True)
        attn = torch.cat([attn, blank_logit], dim=-1)
        if valid is not None:
            valid = torch.cat([valid, torch.ones_like(valid[..., :1])], dim=-1)
    # AFF fills masked slots with a large negative number; exact -inf with a guarded
    # denominator gives them weight 0 and leaves fully masked rows at 0 instead of NaN.
    # Half types take the softmax in float32 (float64 stays float64 for gradchecks).
    acc = torch.float64 if dt == torch.float64 else torch.float32
    p = reference.masked_softmax(attn.to(acc), valid).to(dt)
    if blank_k is not None:
        p, p_blank = p[..., :-1], p[..., -1:]
    out = ops.av_forward(p, v, member_idx, deterministic)
    if blank_v is not None:
        out = out + p_blank * blank_v.to(dt)[None, :, None, :]
    return out


def cluster_attention(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale,
                      deterministic):
    """Cluster attention from the unfused kernels; arguments checked by :func:`cluster.ops.check_inputs`.

    ``deterministic=True`` selects the atomic-free backward kernels (see the module
    docstring); the forward is deterministic either way.
    """
    _require()
    return _compose_attention(torch.ops.cluster, q, k, v, member_idx, pe_table, pe_idx, mask,
                              blank_k, blank_v, float(scale), bool(deterministic))


def weighted_features(weights, feat, member_idx):
    """``out[b,i,w,c] = sum_j weights[b,i,j,w] * feat[b, member_idx[b,i,j], c]``.

    The backward is atomic-free when ``torch.are_deterministic_algorithms_enabled()``.
    """
    _require()
    return torch.ops.cluster.wf_forward(weights, feat, member_idx,
                                        torch.are_deterministic_algorithms_enabled())


def query_key(q, k, member_idx, deterministic: bool = False):
    """``attn[b,h,i,j] = <q[b,h,i], k[b,h,member_idx[b,i,j]]>``, differentiable."""
    _require()
    return torch.ops.cluster.qk_forward(q, k, member_idx, deterministic)


def attention_value(attn, v, member_idx, deterministic: bool = False):
    """``out[b,h,i] = sum_j attn[b,h,i,j] * v[b,h,member_idx[b,i,j]]``, differentiable."""
    _require()
    return torch.ops.cluster.av_forward(attn, v, member_idx, deterministic)


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
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 16, 8, generator=g), torch.randn(2, 3, 16, 8, generator=g)
    idx = torch.randint(0, 16, (2, 16, 5), generator=g)
    got = query_key(q.cuda(), k.cuda(), idx.cuda()).cpu()
    err = (got - reference.query_key(q, k, idx)).abs().max().item()
    ok = err < 1e-5
    return ok, f"self test qk_forward fp32: max abs error {err:.2e} ({'ok' if ok else 'FAILED'})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.cuda_ext", description=__doc__.split("\n")[0])
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


# The C++ library names this module as the home of its fake impls, so torch imports it
# when it meets the ops without them (library loaded as `cluster._C` or by hand):
# register them then, without building anything.
if __name__ != "__main__" and _ops_defined():
    _register_python_side(NAMESPACE)

if __name__ == "__main__":
    # Run the imported module's main: fake impls must be registered from
    # `cluster.cuda_ext`, the module the C++ library names, not from `__main__`.
    sys.exit(importlib.import_module("cluster.cuda_ext").main())
