"""The main job: every backend present here against the float64 reference and each other.

``python -m cluster.validate`` (what ``nox -s validate`` runs) builds the inputs of the
suite's configurations (plus ragged extras), runs each available backend forward and
backward in every dtype it supports, and prints one table: backend x dtype x
configuration, max abs / rel error of the output and of each gradient, pass/fail by the
suite's rules (cluster.testing). The table is also written to ``reports/validate.json`` and
``reports/validate.md``. Exit status 1 if anything fails, 2 if nothing could run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

import torch

from . import ops, testing

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
GRADS = ("q", "k", "v", "pe_table", "blank_k", "blank_v")


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _supported(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    why = ops.backend_unavailable_reason(backend, device, dtype)
    if why is None and device.type == "cpu" and backend == "triton" and dtype != torch.float32:
        # The interpreter emulates half types through numpy; its numbers say nothing about
        # the GPU kernels' rounding, so only float32 is judged on the CPU.
        why = "low-precision Triton is validated on a GPU only"
    return why


def _judge(x, ref, pt, dtype, tol):
    abs_err, rel_err = testing.max_errors(x, ref)
    if dtype == torch.float32:
        ok = testing.within_fp32_tolerance(x, ref, tol)
        bound = tol
    else:
        ok, _, bound = testing.within_lowp_rule(x, pt, ref, dtype)
    return {"abs": abs_err, "rel": rel_err, "bound": bound, "ok": bool(ok)}


def run_one(cfg, backend, dtype, device, seed, recipe, deterministic=None) -> dict:
    ref = testing.reference_result(cfg, seed=seed, **recipe)
    x = testing.make_inputs(cfg, seed=seed, **recipe)
    t0 = time.perf_counter()
    out, grads = testing.run_case(x.to(dtype, device, requires_grad=True), backend=backend,
                                  dout=ref["dout"], deterministic=deterministic)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    pt_out, pt_grads = (None, {})
    if dtype != torch.float32:
        pt_out, pt_grads = testing.run_case(x.to(dtype, device, requires_grad=True),
                                            backend="reference", dout=ref["dout"])
    res = {"out": _judge(out, ref["out"], pt_out, dtype, testing.TOLERANCES["forward"])}
    for name in GRADS:
        if name in grads:
            res["d" + name] = _judge(grads[name], ref["grads"][name], pt_grads.get(name), dtype,
                                     testing.TOLERANCES["backward"])
    return {"results": res, "ok": all(r["ok"] for r in res.values()), "seconds": wall}


def _pairwise(cfg, backends, dtype, device, seed, lists="aff") -> list[dict]:
    """New vs old: max difference between each pair of kernel backends on identical inputs."""
    rows = []
    x = testing.make_inputs(cfg, seed=seed, lists=lists)
    outs = {}
    for b in backends:
        try:
            outs[b] = testing.run_case(x.to(dtype, device), backend=b)[0]
        except Exception:  # run_one has already recorded this backend's crash as a failure
            continue
    names = sorted(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            rows.append({"config": cfg.name, "lists": lists, "dtype": str(dtype).replace("torch.", ""),
                         "pair": f"{a} vs {b}", "max_abs": testing.max_errors(outs[a], outs[b])[0]})
    return rows


def _fmt(e: dict) -> str:
    mark = "" if e["ok"] else " FAIL"
    return f"{e['abs']:.1e}/{e['rel']:.1e}{mark}"


def to_markdown(report: dict) -> str:
    lines = [
        "# Validation report",
        "",
        f"{report['date']} · device `{report['device_name']}` · torch {report['torch']} · "
        f"triton {report['triton']} · python {report['python']}",
        "",
        "Each cell: max abs / max rel error against the float64 reference. float32 passes when "
        "every element is within atol = rtol = 1e-4 (forward) or 1e-3 (gradients); float16 / "
        "bfloat16 when the error is at most 2x that of the PyTorch reference in the same dtype "
        "plus one rounding unit.",
        "",
        "lists: `aff` = each token's own nearest clusters (AFF's, what an AFF model feeds the "
        "op); `cluster` = one list shared by a cluster's tokens (the shared lists' fast paths).",
        "",
        "| backend | mode | dtype | config | lists | out | " + " | ".join("d" + g for g in GRADS) + " | pass |",
        "|---|---|---|---|---|---|" + "---|" * len(GRADS) + "---|",
    ]
    for r in report["cases"]:
        cells = [_fmt(r["results"][k]) if k in r["results"] else "-" for k in ["out"] + ["d" + g for g in GRADS]]
        lines.append(f"| {r['backend']} | {r['mode']} | {r['dtype']} | {r['config']} | "
                     f"{r.get('lists', 'aff')} | "
                     + " | ".join(cells) + f" | {'yes' if r['ok'] else '**NO**'} |")
    if report["skipped"]:
        lines += ["", "## Not run here", ""]
        lines += [f"- {s['backend']} {s['dtype']}: {s['reason']}" for s in report["skipped"]]
    if report["pairs"]:
        lines += ["", "## Backends against each other (max abs difference of outputs)", "",
                  "| config | lists | dtype | pair | max abs |", "|---|---|---|---|---|"]
        lines += [f"| {p['config']} | {p.get('lists', 'aff')} | {p['dtype']} | {p['pair']} | {p['max_abs']:.2e} |"
                  for p in report["pairs"]]
    lines += ["", f"**Verdict: {report['verdict']}** ({report['n_pass']} passed, "
              f"{report['n_fail']} failed, {report['seconds']:.0f} s)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.validate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default=",".join(ops.BACKENDS),
                   help="comma-separated subset of %(default)s")
    p.add_argument("--dtypes", default="fp32,fp16,bf16",
                   help="comma-separated from fp32, fp16, bf16 (or float32, float16, bfloat16); "
                        "default %(default)s")
    p.add_argument("--configs", default="all",
                   help="comma-separated from " + ", ".join(c.name for c in (*testing.CONFIGS, *testing.RAGGED_CONFIGS))
                        + ", or 'all' (suite + ragged) or 'suite'; default %(default)s")
    p.add_argument("--lists", default="aff,cluster",
                   help="neighbour lists, comma-separated from aff, cluster: aff (AFF's per-token "
                        "lists) at every configuration, cluster (shared lists) as extra cases "
                        "at the suite configurations; default %(default)s")
    p.add_argument("--seed", type=int, default=2024, help="seed of the inputs (default %(default)s)")
    p.add_argument("--out", default="reports",
                   help="folder for validate.json / validate.md (default %(default)s)")
    args = p.parse_args(argv)

    device = _device()
    configs = list(testing.CONFIGS) + list(testing.RAGGED_CONFIGS)
    if args.configs == "suite":
        configs = list(testing.CONFIGS)
    elif args.configs != "all":
        wanted = args.configs.split(",")
        unknown = [w for w in wanted if w not in {c.name for c in configs}]
        if unknown:
            p.error(f"--configs: unknown {', '.join(unknown)}; expected names from "
                    f"{', '.join(c.name for c in configs)}, or all, or suite")
        configs = [c for c in configs if c.name in wanted]
    backends = [b for b in args.backends.split(",") if b]
    if not backends or any(b not in ops.BACKENDS for b in backends):
        p.error(f"--backends: expected names from {', '.join(ops.BACKENDS)}, got {args.backends!r}")
    dnames = [DTYPE_NAMES.get(d, d) for d in args.dtypes.split(",") if d]
    if any(d not in DTYPES for d in dnames):
        p.error(f"--dtypes: expected names from {', '.join([*DTYPES, *DTYPE_NAMES])}, got {args.dtypes!r}")
    dtypes = [DTYPES[d] for d in dnames]
    lists = [x for x in args.lists.split(",") if x]
    if not lists or any(x not in testing.LISTS for x in lists):
        p.error(f"--lists: expected names from {', '.join(testing.LISTS)}, got {args.lists!r}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "absent"

    print(f"cluster validate: device {device} ({name}), torch {torch.__version__}, "
          f"triton {triton_version}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}",
          flush=True)
    cases, skipped, pairs = [], [], []
    t_start = time.perf_counter()
    plan = []
    for backend in backends:
        modes = [("", None)]
        if backend == "triton":
            modes = [("fast", False), ("deterministic", True)]
        for dtype in dtypes:
            why = _supported(backend, device, dtype)
            if why is not None:
                skipped.append({"backend": backend, "dtype": str(dtype).replace("torch.", ""),
                                "reason": why})
                print(f"  skip {backend} {dtype}: {why}", flush=True)
                continue
            for mode, det in modes:
                for lst in lists:
                    for cfg in configs:
                        if lst == "aff" or not cfg.ragged:
                            plan.append((backend, mode, det, dtype, cfg, lst))
    for n, (backend, mode, det, dtype, cfg, lst) in enumerate(plan, 1):
        recipe = dict(duplicates=True, empty_rows=True) if cfg.ragged else {}
        recipe["lists"] = lst
        dname = str(dtype).replace("torch.", "")
        try:
            r = run_one(cfg, backend, dtype, device, args.seed, recipe, det)
        except Exception as exc:  # a crash is a failure with its message in the report
            r = {"results": {"out": {"abs": float("inf"), "rel": float("inf"), "bound": 0,
                                     "ok": False}},
                 "ok": False, "seconds": 0.0, "error": f"{type(exc).__name__}: {exc}"}
        r.update(backend=backend, mode=mode or "-", dtype=dname, config=cfg.name, lists=lst)
        cases.append(r)
        worst = max(v["rel"] for v in r["results"].values())
        status = "ok  " if r["ok"] else "FAIL"
        print(f"[{n:3d}/{len(plan)}] {status} {backend:9s} {mode or '-':13s} {dname:8s} "
              f"{cfg.name:22s} {lst:7s} worst rel err {worst:.2e}  {r['seconds']:.2f}s"
              + (f"  {r['error']}" if "error" in r else ""), flush=True)

    kernel_backends = [b for b in backends if b != "reference"]
    for dtype in dtypes:
        present = [b for b in kernel_backends if _supported(b, device, dtype) is None]
        if len(present) + 1 >= 2:
            for cfg in testing.CONFIGS:
                if any(c["config"] == cfg.name for c in cases):
                    for lst in lists:
                        pairs += _pairwise(cfg, present + ["reference"], dtype, device,
                                           args.seed + 1, lst)

    n_fail = sum(not c["ok"] for c in cases)
    verdict = "PASS" if cases and n_fail == 0 else ("NOTHING RAN" if not cases else "FAIL")
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "device_name": name, "torch": torch.__version__,
        "triton": triton_version, "python": platform.python_version(),
        "tolerances": testing.TOLERANCES, "lowp_factor": testing.LOWP_FACTOR,
        "cases": cases, "skipped": skipped, "pairs": pairs,
        "n_pass": len(cases) - n_fail, "n_fail": n_fail, "verdict": verdict,
        "seconds": time.perf_counter() - t_start,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "validate.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = to_markdown(report)
    with open(os.path.join(args.out, "validate.md"), "w") as f:
        f.write(md)
    print()
    print(md)
    print(f"written: {os.path.join(args.out, 'validate.json')}, {os.path.join(args.out, 'validate.md')}")
    return 0 if verdict == "PASS" else (2 if not cases else 1)


if __name__ == "__main__":
    sys.exit(main())
