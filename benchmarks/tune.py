"""Tile and warp sweep of the triton attention kernels (cluster.triton_kernels.tuning.TUNING).

Coordinate search per kernel and value width on AFF-built inputs: first num_warps, then rows
per program, then the gather-tile budget, each step keeping the best so far; the other two
kernels keep their current entries. The forward is timed alone, the backward kernels by
forward + backward (fast mode). Times are medians of triton.testing.do_bench.

    python benchmarks/tune.py [--shape affmae_stage1] [--out benchmarks/results/experiments]

Writes tune-<device>-<date>.json and .md with every configuration tried and the best entry
per kernel; copy the winners into TUNING by hand (a benchmark, not a self-modifying module)
and their figures into benchmarks/TUNING.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

WARPS = (1, 2, 4, 8)
ROWS = (4, 8, 16, 32)
BUDGETS = (1024, 2048, 4096, 8192)
DTYPES = {4: torch.float32, 2: torch.bfloat16}


def timer(x, mode):
    import triton

    attn = bench.make_attention("triton", False)
    step = bench.make_step(attn, x, mode)

    def run():
        for t in x.leaves():
            t.grad = None
        step()
    return triton.testing.do_bench(run, warmup=25, rep=150, return_mode="median")


def try_cfg(tuning, x, kind, width, dtype, mode, cfg, seen, rows_out) -> float:
    """Time one TUNING entry (cached in ``seen``); a failing config counts as infinitely slow."""
    if cfg in seen:
        return seen[cfg]
    try:
        with tuning.override(TUNING={(kind, width): cfg}):
            ms = timer(x, mode)
    except Exception as exc:  # e.g. out of shared memory or registers
        print(f"  {kind} {dtype} {cfg}: failed ({type(exc).__name__})", flush=True)
        ms = float("inf")
    seen[cfg] = ms
    rows_out.append({"kind": kind, "dtype": str(dtype).removeprefix("torch."), "rows": cfg[0],
                     "max_slots": cfg[1], "budget": cfg[2], "warps": cfg[3], "mode": mode, "ms": ms})
    print(f"  {kind:6s} {str(dtype):15s} rows={cfg[0]:2d} budget={cfg[2]:5d} warps={cfg[3]}: "
          f"{mode} {ms:.3f} ms", flush=True)
    return ms


def main(argv=None) -> int:
    from cluster.triton_kernels import tuning

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="affmae_stage1", choices=list(bench.SHAPES))
    p.add_argument("--kinds", default="fwd,bwd_q,bwd_kv")
    p.add_argument("--out", default="benchmarks/results/experiments")
    p.add_argument("--tag", default="", help="appended to the result file names, so runs of one day do not overwrite")
    opt = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    dev = torch.device("cuda")
    base = bench.build_inputs(bench.SHAPES[opt.shape], dev)
    start = dict(tuning.TUNING)
    rows_out, best = [], {}
    # Each kernel's best entry stays in force while the later kernels are searched.
    with contextlib.ExitStack() as kept:
        for width, dtype in DTYPES.items():
            x = base.cast(dtype, True)
            for kind in opt.kinds.split(","):
                mode = "fwd" if kind == "fwd" else "fwd+bwd"
                cur = start[kind, width]
                seen: dict[tuple, float] = {}

                for axis, values in ((3, WARPS), (0, ROWS), (2, BUDGETS)):
                    for val in values:
                        cfg = list(cur)
                        cfg[axis] = val
                        try_cfg(tuning, x, kind, width, dtype, mode, tuple(cfg), seen, rows_out)
                    cur = min(seen, key=seen.get)
                kept.enter_context(tuning.override(TUNING={(kind, width): cur}))
                best[f"{kind}/{width}"] = {"cfg": cur, "ms": seen[cur],
                                           "start_ms": seen.get(start[kind, width])}
    stem = f"tune-{bench.device_slug(torch.cuda.get_device_name(dev))}-{datetime.date.today().isoformat()}"
    stem += f"-{opt.tag}" if opt.tag else ""
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "shape": opt.shape,
            "commit": bench.git_state()[0], "start": {f"{k}/{w}": v for (k, w), v in start.items()}}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "best": best, "runs": rows_out}, indent=1))
    md = [f"# Triton tile sweep — {meta['device']}, {opt.shape}", "",
          f"torch {meta['torch']} · triton {meta['triton']}. Entry = (rows, max slots, tile budget, num_warps).", "",
          "| kernel / width | start | start ms | best | best ms |", "|---|---|---:|---|---:|"]
    for key, b in best.items():
        k, w = key.split("/")
        md.append(f"| {k} / {'fp32' if w == '4' else 'bf16'} | {start[k, int(w)]} | {b['start_ms']:.3f} | "
                  f"{tuple(b['cfg'])} | {b['ms']:.3f} |")
    md += ["", "Every configuration tried:", "", "| kernel | dtype | rows | budget | warps | timed | ms |",
           "|---|---|---:|---:|---:|---|---:|"]
    md += [f"| {r['kind']} | {r['dtype']} | {r['rows']} | {r['budget']} | {r['warps']} | {r['mode']} | {r['ms']:.3f} |"
           for r in rows_out]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[:6 + len(best)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
