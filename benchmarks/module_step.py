"""The module's step against the op's: what ClusterAttention adds around cluster_attention.

At ``affmae_stage1`` (B=64, N=2048, C=96, H=3, M=64; AFF's per-token lists from
``cluster.neighbors.build_neighborhoods(..., knn_method="torch")`` on synthetic positions of
a 46 x 45 grid), for each backend (triton; cuda where the extension loads), each
relative-position table (``--rel-pos-widths``, default AFF's R=55 and AFF-MAE's R=511, a
1023 x 1023 = 1046529-row table) and each dtype (bf16 under ``torch.autocast``, float32):

- ``module``: ``cluster.ClusterAttention`` forward + backward of a fixed dL/dout, the q / kv
  / proj projections and the bias table ``pos_embed(pre_table)`` included; ``module-nocheck``
  the same with ``check_indices=False`` (no index-range check, so no device sync);
- ``op``: ``cluster.ops.cluster_attention`` on q / k / v of the same shape ([B, H, N, D],
  16-bit under bf16, as autocast gives the module) with a float32 [T, H] pe_table and float32
  blank_k / blank_v (what the module hands the op under autocast), the same member_idx,
  cluster_mask and pe_idx; ``op-nocheck`` with ``check_indices=False``;
- ``op-compact`` (where T > 1 row): the op on only the rows of the table that pe_idx uses
  (rows lo..hi, pe_idx - lo): what a module that passed a compact table would pay;
- ``module-fwd`` / ``op-fwd``: the forwards alone, under no_grad;
- ``bias-table``: ``pos_embed(pre_table)`` forward + backward alone (the table's share).

Per case: median time (``triton.testing.do_bench`` on a GPU; perf_counter on the CPU), the
peak memory of one step above what was allocated before it, and the device syncs of one step
(``torch.cuda.set_sync_debug_mode``: every ``.item()``, ``nonzero``, blocking copy). For the
module and the op (checked) of every backend x R x dtype a torch.profiler breakdown: the top
CUDA kernels by device time per step, the module's kernels beside the op's (what the module
adds), the top ops by self device time, and the CUDA runtime calls per step
(cudaStreamSynchronize, cudaMemcpyAsync, launches). Also the triton backend's d_pe_table
replica count for each T (``_dpe_replicas``: the fast backward's atomics spread over at most
128 copies of the table, capped at 16 MiB).

Writes ``<out>/module-step-<device>-<date>[-tag].json`` and ``.txt`` (readable summary).

    python benchmarks/module_step.py --out benchmarks/results/experiments          # GPU, ~2-4 min
    python benchmarks/module_step.py --device cpu --smoke --out /tmp/ms   # CPU, tiny shape

``--smoke`` runs a tiny shape (B=1, N=68, C=16, H=2, M=16; R=3 and 7 unless given) with a
few repetitions, checks the module's output against the op called by hand on the module's
own projections, and exits 1 on a mismatch or a crash.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if (REPO / "src" / "cluster").is_dir():
    sys.path.insert(0, str(REPO / "src"))

SHAPE = ("affmae_stage1", (64, 2048, 96, 3, 64))
SMOKE_SHAPE = ("smoke_tiny", (1, 68, 16, 2, 16))
CLUSTER_SIZE = 8
PROFILE_STEPS = 5
TOP = 12
RUNTIME_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
                 "cudaMemcpyAsync", "cudaMemsetAsync", "cudaLaunchKernel", "cuLaunchKernel",
                 "cuLaunchKernelEx", "aten::_local_scalar_dense", "aten::item", "aten::nonzero")
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def grid_for(N: int) -> tuple[int, int]:
    # benchmarks/bench.py's grid: nearly full, 46 x 45 for N = 2048.
    h = math.ceil(math.sqrt(N))
    return h, math.ceil(N / h)


# ------------------------------------------------------------------------------ inputs

class Inputs:
    """Everything of one (R, dtype): the module's feat / lists and the op's q / k / v."""

    def __init__(self, dims, R, device, index_dtype, seed=0):
        import torch

        from cluster import neighbors

        B, N, C, H, M = dims
        D = C // H
        h, w = grid_for(N)
        pos = neighbors.make_synthetic_positions(B, N, h, w, seed=seed, grid=True).to(device)
        nb = neighbors.build_neighborhoods(pos, CLUSTER_SIZE, M, h, w, R=R, knn_method="torch")
        self.R, self.T = R, (2 * R + 1) ** 2
        self.member_idx = nb.member_idx.to(index_dtype).contiguous()
        self.cluster_mask = nb.cluster_mask.contiguous()
        self.pe_idx = nb.pe_idx.to(index_dtype).contiguous()
        lo, hi = (int(t) for t in torch.aminmax(self.pe_idx))
        self.pe_lo, self.pe_hi = lo, hi
        self.pe_idx_compact = (self.pe_idx - lo).contiguous()
        g = torch.Generator(device=device).manual_seed(seed + 1)

        def randn(*shape):
            return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

        self.feat = randn(B, N, C)
        self.dout_mod = randn(B, N, C)
        self.q, self.k, self.v, self.dout_op = (randn(B, H, N, D) for _ in range(4))
        self.pe_table = randn(self.T, H) * 0.5
        self.blank_k, self.blank_v = randn(H, D), randn(H, D)
        self.scale = D ** -0.5


def leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


# ------------------------------------------------------------------------------ steps

def make_module(C, H, backend, R, device, check_indices=True):
    import torch

    from cluster.nn import ClusterAttention

    torch.manual_seed(0)
    return ClusterAttention(C, H, backend=backend, rel_pos_width=R,
                            check_indices=check_indices).to(device)


def module_steps(m, x: Inputs, amp, device):
    """(fwd+bwd step, fwd step, grads to reset) of the module under autocast ``amp``."""
    import torch

    feat = leaf(x.feat)
    dout = x.dout_mod.to(amp or torch.float32)
    args = (x.member_idx, x.cluster_mask, x.pe_idx, False)

    def fwd():
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            return m(feat, *args)

    return (*_step_and_forward(fwd, dout), [feat, *m.parameters()])


def _step_and_forward(fwd, dout):
    """(forward + backward of ``dout``, forward under no_grad) of the callable ``fwd``."""
    import torch

    def step():
        out = fwd()
        out.backward(dout)
        return out

    def fwd_only():
        with torch.no_grad():
            return fwd()

    return step, fwd_only


def op_steps(x: Inputs, backend, amp, check_indices=True, compact=False):
    import torch

    from cluster import ops

    act = amp or torch.float32
    q, k, v = leaf(x.q, act), leaf(x.k, act), leaf(x.v, act)
    if compact:
        pe = leaf(x.pe_table[x.pe_lo:x.pe_hi + 1])
        pe_idx = x.pe_idx_compact
    else:
        pe, pe_idx = leaf(x.pe_table), x.pe_idx
    bk, bv = leaf(x.blank_k), leaf(x.blank_v)  # float32 beside 16-bit q, as under autocast
    dout = x.dout_op.to(act)

    def fwd():
        return ops.cluster_attention(q, k, v, x.member_idx, pe_table=pe, pe_idx=pe_idx,
                                     mask=x.cluster_mask, blank_k=bk, blank_v=bv, scale=x.scale,
                                     backend=backend, check_indices=check_indices)

    return (*_step_and_forward(fwd, dout), [q, k, v, pe, bk, bv])


def bias_table_step(m, x: Inputs, amp, device):
    import torch

    feat = x.feat
    g = torch.randn(x.T, m.num_heads, device=device, generator=torch.Generator(device=device).manual_seed(3))

    def step():
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            pe = m._bias_table(feat)
        pe.backward(g)
        return pe

    return step, list(m.pos_embed.parameters())


# ------------------------------------------------------------------------------ measurements

def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_none(tensors) -> None:
    for t in tensors:
        t.grad = None


def time_step(step, grads, device, opt) -> float:
    """Median ms of one call."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(step, warmup=opt.warmup_ms, rep=opt.rep_ms, grad_to_none=grads,
                              return_mode="median"))
    times = []
    for _ in range(opt.cpu_reps):
        set_none(grads)
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(step, grads, device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    set_none(grads)
    gc.collect()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 1)


def sync_count(step, grads, device) -> int | None:
    """Synchronising CUDA calls of one step, as torch's sync debug mode reports them."""
    import torch

    if device.type != "cuda":
        return None
    set_none(grads)
    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    sync(device)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def _dev_time(ev, self_only: bool) -> float:
    names = (("self_device_time_total", "self_cuda_time_total") if self_only
             else ("device_time_total", "cuda_time_total"))
    for n in names:
        v = getattr(ev, n, None)
        if v is not None:
            return float(v)
    return 0.0


def profile_step(step, grads, device, steps=PROFILE_STEPS, warm=2) -> dict:
    """Kernels by device time (a CUDA-only trace: nothing counted twice), then ops by self
    device / CPU time and the runtime calls (a CPU + CUDA trace); all per step."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warm):
        set_none(grads)
        step()
    sync(device)
    res: dict = {"steps": steps}
    if device.type == "cuda":
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                set_none(grads)
                step()
            sync(device)
        kernels = defaultdict(float)
        counts = Counter()
        for ev in prof.key_averages():
            kernels[ev.key] += _dev_time(ev, False) / steps
            counts[ev.key] += ev.count / steps
        res["kernel_us_per_step"] = round(sum(kernels.values()), 2)
        res["kernels"] = {k: {"us": round(u, 2), "calls": round(counts[k], 2)}
                          for k, u in sorted(kernels.items(), key=lambda kv: -kv[1])}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            set_none(grads)
            step()
        sync(device)
    ops_t, runtime = {}, Counter()
    for ev in prof.key_averages():
        if ev.key in RUNTIME_CALLS:
            runtime[ev.key] += ev.count / steps
        if ev.key.startswith("aten::") or ev.key.startswith("cluster"):
            ops_t[ev.key] = {"self_device_us": round(_dev_time(ev, True) / steps, 2),
                             "self_cpu_us": round(float(getattr(ev, "self_cpu_time_total", 0.0)) / steps, 2),
                             "calls": round(ev.count / steps, 2)}
    key = "self_device_us" if device.type == "cuda" else "self_cpu_us"
    res["ops"] = dict(sorted(ops_t.items(), key=lambda kv: -kv[1][key])[:3 * TOP])
    res["runtime_calls_per_step"] = {k: round(v, 2) for k, v in sorted(runtime.items())}
    return res


def kernel_delta(mod: dict, op: dict) -> list[dict]:
    """The module's kernels beside the op's, largest extra device time first."""
    mk, ok = mod.get("kernels", {}), op.get("kernels", {})
    rows = []
    for name in set(mk) | set(ok):
        m = mk.get(name, {"us": 0.0, "calls": 0})
        o = ok.get(name, {"us": 0.0, "calls": 0})
        rows.append({"kernel": name, "module_us": m["us"], "op_us": o["us"],
                     "extra_us": round(m["us"] - o["us"], 2), "module_calls": m["calls"],
                     "op_calls": o["calls"]})
    return sorted(rows, key=lambda r: -r["extra_us"])


# ------------------------------------------------------------------------------ smoke check

def check_module_equals_op(m, x: Inputs, backend) -> float:
    """Max |module - op by hand| (float32, the module's own projections)."""
    import torch

    from cluster import ops

    with torch.no_grad():
        out = m(x.feat, x.member_idx, x.cluster_mask, x.pe_idx, False)
        B, N, C = x.feat.shape
        H = m.num_heads
        D = C // H
        q = m.q(x.feat).view(B, N, H, D).permute(0, 2, 1, 3)
        kv = m.kv(x.feat).view(B, N, H, 2, D).permute(3, 0, 2, 1, 4)
        o = ops.cluster_attention(q, kv[0], kv[1], x.member_idx, pe_table=m.pos_embed(m.pre_table),
                                  pe_idx=x.pe_idx, mask=x.cluster_mask, blank_k=m.blank_k.view(H, D),
                                  blank_v=m.blank_v.view(H, D), backend=backend)
        expect = m.proj(o.permute(0, 2, 1, 3).reshape(B, N, C))
    return float((out - expect).abs().max())


# ------------------------------------------------------------------------------ run

def git_state() -> str:
    """bench.py's commit / dirty rule (CLUSTER_GIT_COMMIT first), as "<commit>[+dirty]"."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import git_state as bench_git_state

    commit, dirty = bench_git_state()
    return commit[:12] + ("+dirty" if dirty else "")


def run(opt) -> tuple[dict, int]:
    import torch

    from cluster import ops

    device = torch.device(opt.device)
    name, dims = SMOKE_SHAPE if opt.smoke else SHAPE
    B, N, C, H, M = dims
    index_dtype = {"int64": torch.int64, "int32": torch.int32}[opt.index_dtype]
    dtypes = {"bf16": torch.bfloat16, "fp32": None}
    dtypes = {k: v for k, v in dtypes.items() if k in opt.dtypes.split(",")}
    widths = [int(r) for r in opt.rel_pos_widths.split(",")]
    failures = 0
    meta = {
        "shape": name, "dims": dict(B=B, N=N, C=C, H=H, M=M, D=C // H), "grid": grid_for(N),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "git": git_state(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "index_dtype": opt.index_dtype,
        "args": vars(opt),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    backends, skipped = [], {}
    for b in opt.backends.split(","):
        log(f"backend {b}: checking availability (the cuda backend builds its extension on first use)")
        why = ops.backend_unavailable_reason(b, device, torch.float32)
        if why is None:
            backends.append(b)
        else:
            skipped[b] = why
            log(f"backend {b}: skipped ({why})")
    meta["backends"], meta["skipped"] = backends, skipped
    notes = {"tables": {}}
    try:
        from cluster.triton_kernels.backward_tail import _dpe_replicas

        for R in widths:
            T = (2 * R + 1) ** 2
            notes["tables"][R] = {
                "T": T, "pre_table_mib": round(T * 5 * 4 / 2**20, 2),
                "pe_table_mib_fp32": round(T * H * 4 / 2**20, 2),
                "dpe_replicas_fast_fp32": _dpe_replicas(T, H, torch.float32),
                "dpe_replicas_det_int64": _dpe_replicas(T, H, torch.int64),
                "dpe_replica_mib_fast_fp32": round(_dpe_replicas(T, H, torch.float32) * T * H * 4 / 2**20, 2),
            }
    except Exception as exc:
        notes["tables_error"] = f"{type(exc).__name__}: {exc}"
    cases, profiles = [], []

    def record(what, backend, R, dt, step, grads, **extra):
        nonlocal failures
        rec = {"what": what, "backend": backend, "R": R, "T": (2 * R + 1) ** 2, "dtype": dt, **extra}
        try:
            set_none(grads)
            step()  # first call: compile / build outside the timing
            sync(device)
            rec["ms"] = round(time_step(step, grads, device, opt), 4)
            rec["peak_mib"] = peak_mib(step, grads, device)
            rec["syncs"] = sync_count(step, grads, device)
            rec["status"] = "ok"
        except Exception as exc:
            failures += 1
            rec["status"] = "error"
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
        cases.append(rec)
        log(f"  {backend:>6} R={R:<4} {dt:>4} {what:<15} " + (
            f"{rec['ms']:9.4f} ms  peak {rec['peak_mib']} MiB  syncs {rec['syncs']}"
            if rec["status"] == "ok" else rec["error"]))
        return rec

    for R in widths:
        log(f"R={R}: building neighbourhoods (B={B}, N={N}, M={M}, grid {grid_for(N)}, knn torch)")
        x = Inputs(dims, R, device, index_dtype)
        log(f"R={R}: T={x.T}, pe_idx rows {x.pe_lo}..{x.pe_hi} ({x.pe_hi - x.pe_lo + 1} rows used)")
        for backend in backends:
            for dt, amp in dtypes.items():
                if opt.smoke and amp is None:
                    m = make_module(C, H, backend, R, device)
                    err = check_module_equals_op(m, x, backend)
                    ok = err <= 1e-5
                    failures += not ok
                    log(f"  smoke check {backend} R={R}: module vs op by hand max err {err:.2e} "
                        f"({'ok' if ok else 'MISMATCH'})")
                m = make_module(C, H, backend, R, device)
                step, fwd, grads = module_steps(m, x, amp, device)
                rec_mod = record("module", backend, R, dt, step, grads)
                prof_mod = _profile("module", backend, R, dt, step, grads, device, profiles, opt)
                m.check_indices = False
                record("module-nocheck", backend, R, dt, step, grads)
                m.check_indices = True
                record("module-fwd", backend, R, dt, fwd, [])
                step, fwd, grads = op_steps(x, backend, amp)
                rec_op = record("op", backend, R, dt, step, grads)
                prof_op = _profile("op", backend, R, dt, step, grads, device, profiles, opt)
                record("op-fwd", backend, R, dt, fwd, [])
                step, _, grads = op_steps(x, backend, amp, check_indices=False)
                record("op-nocheck", backend, R, dt, step, grads)
                if x.pe_hi - x.pe_lo + 1 < x.T:
                    step, _, grads = op_steps(x, backend, amp, compact=True)
                    record("op-compact", backend, R, dt, step, grads,
                           T_compact=x.pe_hi - x.pe_lo + 1)
                if prof_mod and prof_op and "kernels" in prof_mod:
                    prof_mod["extra_vs_op"] = kernel_delta(prof_mod, prof_op)[:TOP * 2]
                if rec_mod.get("ms") is not None and rec_op.get("ms") is not None:
                    rec_mod["extra_ms_vs_op"] = round(rec_mod["ms"] - rec_op["ms"], 4)
                del m
                free(device)
        # the bias table's own cost (backend-independent)
        m = make_module(C, H, "reference", R, device)
        for dt, amp in dtypes.items():
            step, grads = bias_table_step(m, x, amp, device)
            record("bias-table", "-", R, dt, step, grads)
        del m, x
        free(device)
    return {"meta": meta, "notes": notes, "cases": cases, "profiles": profiles}, failures


def _profile(what, backend, R, dt, step, grads, device, profiles, opt):
    try:
        p = profile_step(step, grads, device, steps=opt.profile_steps, warm=0 if opt.smoke else 2)
    except Exception as exc:
        log(f"    profile of {what} failed: {type(exc).__name__}: {str(exc)[:200]}")
        return None
    p.update(what=what, backend=backend, R=R, dtype=dt)
    profiles.append(p)
    if "kernel_us_per_step" in p:
        log(f"    profiled {what}: {p['kernel_us_per_step']:.1f} us of kernels per step, runtime calls "
            f"{p['runtime_calls_per_step']}")
    return p


def free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ report

def _case(cases, **key):
    for c in cases:
        if all(c.get(k) == v for k, v in key.items()):
            return c
    return {}


def _syncs(g) -> str:
    return "/".join(str(g[w].get("syncs", "-")) for w in ("module", "module-nocheck", "op", "op-nocheck"))


def _ms(c) -> str:
    return f"{c['ms']:.4f}" if c.get("ms") is not None else "-"


def summary(res: dict) -> str:
    meta, cases, notes = res["meta"], res["cases"], res["notes"]
    lines = [f"module step vs op step: {meta['shape']} {meta['dims']} grid {meta['grid']} on "
             f"{meta['device']}", f"torch {meta['torch']}, triton {meta['triton']}, git {meta['git']}, "
             f"{meta['date']}, index dtype {meta['index_dtype']}"]
    if meta["skipped"]:
        lines.append("skipped backends: " + "; ".join(f"{k}: {v}" for k, v in meta["skipped"].items()))
    lines.append("")
    lines.append("tables: " + "; ".join(
        f"R={R}: T={t['T']}, pre_table {t['pre_table_mib']} MiB, pe_table {t['pe_table_mib_fp32']} MiB, "
        f"d_pe_table replicas {t['dpe_replicas_fast_fp32']} (fast, {t['dpe_replica_mib_fast_fp32']} MiB) / "
        f"{t['dpe_replicas_det_int64']} (deterministic)" for R, t in notes.get("tables", {}).items()))
    lines.append("")
    hdr = (f"{'backend':>7} {'R':>4} {'dtype':>5} | {'module':>9} {'mod-nochk':>9} {'op':>9} {'op-nochk':>9} "
           f"{'op-compact':>10} | {'extra':>8} {'check':>7} | {'mod fwd':>8} {'op fwd':>8} | "
           f"{'peak mod':>8} {'peak op':>8} | {'syncs m/mn/o/on':>15} | {'table':>7}")
    lines += ["fwd+bwd ms (median); extra = module - op; check = module - module-nocheck; peak MiB of one "
              "step; syncs per step (sync debug mode: module / module-nocheck / op / op-nocheck); "
              "table = pos_embed(pre_table) fwd+bwd ms", hdr, "-" * len(hdr)]
    keys = sorted({(c["backend"], c["R"], c["dtype"]) for c in cases if c["backend"] != "-"},
                  key=lambda k: (k[0], k[1], k[2]))
    for b, R, dt in keys:
        g = {w: _case(cases, backend=b, R=R, dtype=dt, what=w) for w in
             ("module", "module-nocheck", "op", "op-nocheck", "op-compact", "module-fwd", "op-fwd")}
        tab = _case(cases, backend="-", R=R, dtype=dt, what="bias-table")
        extra = (f"{g['module']['ms'] - g['op']['ms']:+.4f}" if g["module"].get("ms") is not None
                 and g["op"].get("ms") is not None else "-")
        check = (f"{g['module']['ms'] - g['module-nocheck']['ms']:+.4f}"
                 if g["module"].get("ms") is not None and g["module-nocheck"].get("ms") is not None else "-")
        comp = _ms(g["op-compact"])
        if g["op-compact"].get("T_compact"):
            comp += f" (T={g['op-compact']['T_compact']})"
        lines.append(
            f"{b:>7} {R:>4} {dt:>5} | {_ms(g['module']):>9} {_ms(g['module-nocheck']):>9} {_ms(g['op']):>9} "
            f"{_ms(g['op-nocheck']):>9} {comp:>10} | {extra:>8} {check:>7} | {_ms(g['module-fwd']):>8} "
            f"{_ms(g['op-fwd']):>8} | {str(g['module'].get('peak_mib', '-')):>8} "
            f"{str(g['op'].get('peak_mib', '-')):>8} | "
            f"{_syncs(g):>15} | {_ms(tab):>7}")
    for p in res["profiles"]:
        if p["what"] != "module":
            continue
        op = next((q for q in res["profiles"] if q["what"] == "op" and
                   (q["backend"], q["R"], q["dtype"]) == (p["backend"], p["R"], p["dtype"])), None)
        lines.append("")
        head = f"[{p['backend']} R={p['R']} {p['dtype']}] module"
        if "kernel_us_per_step" in p:
            head += f" {p['kernel_us_per_step']:.1f} us of kernels per step"
            if op and "kernel_us_per_step" in op:
                head += f", op {op['kernel_us_per_step']:.1f} us"
        lines.append(head + f"; runtime calls per step: module {p['runtime_calls_per_step']}"
                     + (f", op {op['runtime_calls_per_step']}" if op else ""))
        if p.get("extra_vs_op"):
            lines.append("  where the module's extra device time goes (us per step, module - op):")
            for r in p["extra_vs_op"][:TOP]:
                if abs(r["extra_us"]) < 0.05:
                    continue
                lines.append(f"    {r['extra_us']:+9.2f}  ({r['module_us']:8.2f} vs {r['op_us']:8.2f}, "
                             f"{r['module_calls']:g} vs {r['op_calls']:g} calls)  {r['kernel'][:110]}")
        key = "self_device_us" if "kernel_us_per_step" in p else "self_cpu_us"
        top = list(p["ops"].items())[:TOP // 2]
        lines.append(f"  top ops of the module by {key}: " + ", ".join(
            f"{k} {v[key]:.1f} ({v['calls']:g})" for k, v in top))
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/module_step.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny shape, few reps, correctness check")
    p.add_argument("--backends", default="triton,cuda", help="comma-separated (default %(default)s)")
    p.add_argument("--dtypes", default="bf16,fp32", help="bf16 (autocast) and/or fp32 (default %(default)s)")
    p.add_argument("--rel-pos-widths", default=None,
                   help="comma-separated R values (default 55,511; with --smoke 3,7: the CPU's "
                        "interpreter sums d_pe_table 64 entries a program)")
    p.add_argument("--index-dtype", choices=("int64", "int32"), default="int64",
                   help="member_idx / pe_idx dtype, as build_neighborhoods gives them (default %(default)s)")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=150.0, help="do_bench's timed time per case")
    p.add_argument("--cpu-reps", type=int, default=None, help="timed calls per case on the CPU (3; --smoke 1)")
    p.add_argument("--profile-steps", type=int, default=None,
                   help=f"steps per profiler trace ({PROFILE_STEPS}; --smoke 1)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "experiments"))
    p.add_argument("--tag", default="")
    opt = p.parse_args(argv)
    if opt.rel_pos_widths is None:
        opt.rel_pos_widths = "3,7" if opt.smoke else "55,511"
    if opt.cpu_reps is None:
        opt.cpu_reps = 1 if opt.smoke else 3
    if opt.profile_steps is None:
        opt.profile_steps = 1 if opt.smoke else PROFILE_STEPS
    return opt


def main(argv=None) -> int:
    opt = parse_args(argv)
    if opt.device == "auto":
        import torch

        opt.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opt.device == "cpu":
        # Triton's interpreter; read when the kernels are decorated, so before cluster imports them.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if opt.device == "cpu" and not opt.smoke:
        log("note: the full shape on the CPU takes very long (Triton interpreter); use --smoke")
    res, failures = run(opt)
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", res["meta"]["device"].lower()).strip("-") or "device"
    stem = f"module-step-{slug}-{datetime.now().strftime('%Y-%m-%d')}" + (f"-{opt.tag}" if opt.tag else "")
    text = summary(res)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out / f"{stem}.txt").write_text(text)
    print("\n" + text, flush=True)
    log(f"wrote {out / (stem + '.json')} and .txt; {failures} failure(s)")
    if failures:
        return 1
    return 0 if res["cases"] else 2


if __name__ == "__main__":
    sys.exit(main())
