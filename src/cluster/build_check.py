"""Do the triton backend's kernels build for a GPU, checked on a machine without one?

The CPU suite runs the kernels under Triton's interpreter, which executes each kernel as
Python and never compiles it: a kernel the compiler rejects (a variable with one type in an
``if`` branch and another in the ``else``, an op the language lacks) passes every CPU test
and fails at the first launch on a GPU. The interpreter also runs other configurations than
a GPU does (bigger row blocks, no FTZ inline assembly, float64 group kernels), so some GPU
code is never even interpreted. This check closes both gaps:

1. ``record``: small forward and backward calls of every code path (float32, float16,
   bfloat16, float64; with and without pe / mask / blank; fast and deterministic; the
   per-row and the cluster-group kernels; weighted features) with the backend's host code
   deciding as on a GPU, noting each kernel launch's argument types, constexpr values and
   launch options instead of running it (the host code never reads a kernel's results, so
   nothing downstream depends on them);
2. ``compile``: each distinct launch compiled by Triton's front end (Python AST -> Triton IR,
   where type errors surface; ``--full`` goes on through PTX to a cubin with ptxas) for a
   CUDA target. No GPU is needed.

``python -m cluster.build_check [--arch 90 80] [--full]`` runs both and exits non-zero if a
kernel fails to build or no recorded launch reaches it. Compiling needs the kernels as
Triton decorates them without the interpreter: with ``TRITON_INTERPRET=1`` set, the check
runs itself again in a process without it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time

# Tensor dtypes as Triton's signature strings.
_POINTER_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
                  "int32": "i32", "int64": "i64", "int16": "i16", "int8": "i8", "uint8": "u8",
                  "bool": "i1"}


def _describe(value):
    import torch

    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    if value is None or isinstance(value, str):
        return ["value", value]
    return ["tl", str(value)]  # a triton dtype passed as a constexpr


def record() -> list:
    """Step 1: the distinct launches [kernel name, {argument: description}, options] of
    small calls of every code path, with the host code deciding as on a GPU; no kernel runs."""
    import torch

    from cluster import testing
    from cluster import triton_kernels as tk
    from cluster.triton_kernels import common, forward, launch, tuning

    launches: dict[str, list] = {}

    def run(self, grid, args, options):
        fn = self.fn.fn
        const = {n for n, p in inspect.signature(fn).parameters.items()
                 if "constexpr" in str(p.annotation)}
        values = {self.names[i]: _describe(a) for i, a in enumerate(args)}
        opts = {}
        for k, v in options.items():
            if k in self.param_set:
                values[k] = _describe(v)
            else:
                opts[k] = v
        # Runtime integers matter to the compiler by width and by what the JIT specializes
        # on (equal to 1, a multiple of 16): one launch per class.
        key_values = {k: (v if k in const or v[0] != "int" else
                          ["int", abs(v[1]) >= 2**31, v[1] == 1, v[1] % 16 == 0])
                      for k, v in values.items()}
        key = json.dumps([fn.__name__, key_values, opts], sort_keys=True, default=str)
        launches.setdefault(key, [fn.__name__, values, opts])

    # The launcher records instead of launching, and the host code decides as on a GPU (block
    # sizes, FTZ, dot flags, kernel choices): the package's two switches, restored below.
    # No kernel runs, so no map flag is ever computed: the host reads every flag as unknown
    # (as in a CUDA graph's capture) and records the launches the device would decide on.
    saved = (launch._Launch.run, launch._INTERPRET, common._HostFlags.any)
    launch._Launch.run = run
    launch._INTERPRET = False
    common._HostFlags.any = lambda self: None
    group_on = {key: warps or 2 for key, warps in tuning.TUNING_GROUP.items()}
    union_on = {key: warps or 1 for key, warps in tuning.TUNING_UNION.items()}
    try:
        # The triton kernels with the table's group kernels, then with every group and union
        # kernel on; the Gluon forward and the weighted features follow with them still on.
        with tuning.override(TUNING_GLUON={"fwd": False}):
            _attention_passes(tk, testing)
            with tuning.override(TUNING_GROUP=group_on, TUNING_UNION=union_on):
                _attention_passes(tk, testing)
                if forward._attn_fwd_gluon_kernel is not None:
                    with tuning.override(TUNING_GLUON={"fwd": True}):
                        for flags in (dict(pe=True, mask=True, blank=True),
                                      dict(pe=False, mask=False, blank=False)):
                            _attention_step(tk, testing, torch.float32, flags, False)
                        # One head: H, heads per program and head groups all 1 (see
                        # gluon_forward).
                        _attention_step(tk, testing, torch.float32,
                                        dict(pe=True, mask=False, blank=True), False, heads=1)
                g = torch.Generator().manual_seed(0)
                for dtype in (torch.float32, torch.bfloat16, torch.float64):
                    w = torch.randn(1, 24, 16, 3, generator=g).to(dtype).requires_grad_(True)
                    f = torch.randn(1, 24, 8, generator=g).to(dtype).requires_grad_(True)
                    idx = torch.randint(0, 24, (1, 24, 16), generator=g)
                    tk.weighted_features(w, f, idx).float().sum().backward()
    finally:
        launch._Launch.run, launch._INTERPRET, common._HostFlags.any = saved
    return list(launches.values())


def _attention_passes(tk, testing) -> None:
    """Every dtype, with and without pe / mask / blank, fast and deterministic."""
    import torch

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for flags in (dict(pe=True, mask=True, blank=True),
                      dict(pe=False, mask=False, blank=False)):
            for deterministic in (False, True):
                _attention_step(tk, testing, dtype, flags, deterministic)


def _attention_step(tk, testing, dtype, flags, deterministic, heads=2) -> None:
    case = testing.random_case(1, heads, 24, 16, 16, seed=1, group=8, whole_clusters=True,
                               **flags)
    c = {k: (v.to(dtype).requires_grad_(k in ("q", "k", "v", "pe_table", "blank_k", "blank_v"))
             if v is not None and v.is_floating_point() else v) for k, v in case.items()}
    out = tk.cluster_attention(c["q"], c["k"], c["v"], c["member_idx"], c["pe_table"],
                               c["pe_idx"], c["mask"], c["blank_k"], c["blank_v"], 16 ** -0.5,
                               deterministic)
    out.float().sum().backward()


def _signature(jf, values: dict):
    """(signature, constexprs, attributes) of one recorded launch, specialized as Triton's
    JIT specializes a launch: an integer equal to 1 becomes the constant 1, an integer that
    is a multiple of 16 and every tensor's address (torch allocates at 16-byte multiples or
    more) carry divisibility 16, except where the kernel opts out (do_not_specialize,
    do_not_specialize_on_alignment). Folding and vectorizing follow from these, and so do
    compiler failures of that specialization alone (Triton 3.6 fails on the Gluon forward
    with its head count specialized to 1: gluon_forward)."""
    import triton.language as tl

    dtypes = {str(getattr(tl, n)): getattr(tl, n) for n in
              ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
               "uint8")}
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(jf.params):
        kind, v = values.get(p.name, ["default", p.default])
        free = getattr(p, "do_not_specialize", False)
        aligned = not free and not getattr(p, "do_not_specialize_on_alignment", False)
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const[p.name] = dtypes[v] if kind == "tl" else v
        elif kind == "tensor":
            sig[p.name] = "*" + _POINTER_TYPES[v]
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif kind == "bool":
            sig[p.name] = "i1"
        elif kind == "int":
            if v == 1 and not free:
                sig[p.name], const[p.name] = "constexpr", 1
                continue
            sig[p.name] = "i64" if abs(v) >= 2**31 else "i32"
            if aligned and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif kind == "float":
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{jf.__name__}: argument {p.name}: cannot type {kind} {v!r}")
    return sig, const, attrs


def compile_launches(launches: list, arch: int, full: bool, module=None) -> list[tuple]:
    """Step 2 (no interpreter): compile each launch for CUDA ``arch`` (e.g. 90); returns
    (kernel name, options, error message or None, seconds) per launch. ``module`` holds
    the kernels by name (default: every kernel of cluster.triton_kernels, its kernels())."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    from cluster.triton_kernels.launch import _Launch

    try:
        from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
    except ImportError:  # a Triton without Gluon has no Gluon kernels to build
        GluonASTSource = GluonJITFunction = None

    if module is None:
        from cluster import triton_kernels

        kernels = triton_kernels.kernels()
    else:
        kernels = vars(module)
    target = GPUTarget("cuda", arch, 32)
    backend = CUDABackend(target)
    results = []
    for name, values, opts in launches:
        kernel = kernels[name]
        jf = kernel.fn if isinstance(kernel, _Launch) else kernel
        opts = {k: v for k, v in opts.items() if v is not None}
        t0 = time.perf_counter()
        try:
            sig, const, attrs = _signature(jf, values)
            gluon = GluonJITFunction is not None and isinstance(jf, GluonJITFunction)
            src = (GluonASTSource if gluon else ASTSource)(jf, sig, const, attrs)
            if full:
                triton.compile(src, target=target, options=opts)
            else:
                # The front end alone (triton.compile's first stage): AST -> Triton IR.
                options = backend.parse_options(opts)
                context = triton._C.libtriton.ir.context()
                triton._C.libtriton.ir.load_dialects(context)
                backend.load_dialects(context)
                src.make_ir(target, options, backend.get_codegen_implementation(options),
                            backend.get_module_map(), context)
            err = None
        except Exception as e:  # noqa: BLE001 - every failure is reported, none hidden
            err = error_text(e)
        results.append((name, opts, err, time.perf_counter() - t0))
    return results


def error_text(exc: BaseException) -> str:
    """The exception and every cause behind it, one line each: Triton's CompilationError
    shows the source excerpt, while the compiler's own message (for example a Gluon API
    that a release removed) is in the exception it was raised from."""
    lines, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        lines.append(("caused by " if lines else "") + f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.build_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[90],
                    help="CUDA compute capabilities to build for, e.g. 90 80 (default 90)")
    ap.add_argument("--full", action="store_true",
                    help="go on through PTX to a cubin (ptxas; minutes), not only through the "
                         "front end (seconds)")
    ap.add_argument("--launches", metavar="JSON",
                    help="compile these recorded launches (a list of [kernel, arguments, "
                         "options]) instead of recording")
    ap.add_argument("--save", metavar="JSON", help="also write the recorded launches here")
    ap.add_argument("--report", metavar="JSON",
                    help="also write the verdict here: triton, ok, failing and unreached kernels, "
                         "kernels this Triton does not use")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        args = sys.argv[1:] if argv is None else list(argv)
        return subprocess.call([sys.executable, "-m", "cluster.build_check", *args], env=env)
    import triton

    from cluster import triton_kernels as tk
    from cluster.triton_kernels import forward, gluon_forward

    t0 = time.perf_counter()
    if a.launches:
        with open(a.launches) as fh:
            launches = json.load(fh)
    else:
        launches = record()
        print(f"build_check: recorded {len(launches)} launches in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    if a.save:
        with open(a.save, "w") as fh:
            json.dump(launches, fh, default=str)
    every = sorted(tk.kernels())
    # Kernels this Triton does not use are not built: the Gluon forward is None, not a
    # _Launch, outside the releases its Gluon API was written for.
    unused = {}
    if forward._attn_fwd_gluon_kernel is None:
        unused["_attn_fwd_gluon_kernel"] = (
            f"not used under triton {triton.__version__}: the Gluon float32 forward is built "
            f"for {'.'.join(map(str, gluon_forward.MIN_TRITON))}-"
            f"{'.'.join(map(str, gluon_forward.MAX_TRITON))}; "
            "the float32 forward takes the FMA group kernel")
    for name, why in unused.items():
        print(f"build_check: {name} {why}", flush=True)
    stage = "cubin" if a.full else "Triton IR (front end)"
    failed, failing = 0, set()
    for arch in a.arch:
        print(f"build_check: {len(launches)} launches of {len(every)} kernels -> {stage}, "
              f"sm_{arch}, triton {triton.__version__}", flush=True)
        for name, opts, err, secs in compile_launches(launches, arch, a.full):
            if err is None:
                print(f"  ok    {secs:5.1f} s  {name} {opts}", flush=True)
            else:
                failed += 1
                failing.add(name)
                print(f"  FAIL  {name} {opts}\n{err}", flush=True)
    missing = sorted(set(every) - {name for name, _v, _o in launches})
    for name in missing:
        print(f"  NOT REACHED  {name}: no recorded launch builds it", flush=True)
    print(f"build_check: {failed} failed, {len(missing)} kernels not reached "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    ok = not failed and not missing
    if a.report:
        with open(a.report, "w") as fh:
            json.dump({"triton": triton.__version__, "ok": ok, "stage": stage,
                       "arch": a.arch, "launches": len(launches), "failed": failed,
                       "failing": sorted(failing), "not_reached": missing, "unused": unused,
                       "seconds": round(time.perf_counter() - t0, 1)}, fh, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
