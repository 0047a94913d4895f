"""Time the kNN of cluster.neighbors (torch and KeOps) and build_neighborhoods at AFF shapes.

The kNN is the one build_neighborhoods runs for AFF's lists: queries are the N tokens (in
Hilbert order), points the NC = N / 8 cluster means (float64), k = nbhd_size / 8.

    name            B      N    NC  k
    affmae_stage1  64   2048   256  8
    highres        16  16384  2048  6
    tiny            2    256    32  8     (the CPU default: a check that the script runs)

Rows: knn(method="torch"), knn(method="keops"), and build_neighborhoods(..., lists="aff")
with knn_method "torch" and "keops". KeOps is only called after cluster.keops_probe said it
works; the probe runs KeOps in a child process, so a KeOps that segfaults (PyKeOps 2.3 under
CUDA 13) gives a "skipped" row with the probe's reason, never a dead script.

Time: median (and min) over --reps calls after --warmup calls, each call bracketed by CUDA
events on a GPU (perf_counter with synchronize on the CPU). The first call is timed apart
(KeOps compiles its formula for each k there). The KeOps picks are checked against the
torch ones: same distances (float64) per slot.

    python benchmarks/knn_bench.py --out knn.json            # GPU: both shapes
    python benchmarks/knn_bench.py --device cpu              # CPU: tiny shape only
    python benchmarks/knn_bench.py --shapes highres --reprobe --reps 10

Exit status 0 unless a timed call raised or KeOps disagreed with torch (then 1).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Benchmark the checkout this script lives in, not whichever copy happens to be installed.
if (REPO / "src" / "cluster").is_dir():
    sys.path.insert(0, str(REPO / "src"))

from cluster import keops_probe, neighbors  # noqa: E402

# name: (B, N, k); cluster size 8 throughout, so NC = N / 8 and nbhd_size = 8 k
SHAPES = {
    "affmae_stage1": (64, 2048, 8),
    "highres": (16, 16384, 6),
    "tiny": (2, 256, 8),
}
CLUSTER = 8


def log(msg: str) -> None:
    print(msg, flush=True)


def grid_for(N: int) -> tuple[int, int]:
    h = math.ceil(math.sqrt(N))
    return h, math.ceil(N / h)


def knn_inputs(B: int, N: int, device: torch.device):
    """Positions, and the (tokens, means) pair build_neighborhoods hands to knn."""
    h, w = grid_for(N)
    pos = neighbors.make_synthetic_positions(B, N, h, w, seed=0).to(device)
    order = neighbors.space_filling_order(pos, h, w)
    pos_s = pos.gather(1, order[..., None].expand(-1, -1, 2))
    means = pos_s.double().view(B, N // CLUSTER, CLUSTER, 2).mean(2)
    return pos, pos_s, means, (h, w)


def time_fn(fn, device: torch.device, warmup: int, reps: int) -> dict:
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times),
            "first_call_s": first, "reps": reps}


def same_distances(q, p, a, b) -> bool:
    def dist(idx):
        B, Q, k = idx.shape
        pts = p.double().gather(1, idx.reshape(B, Q * k, 1).expand(-1, -1, 2)).view(B, Q, k, 2)
        return (pts - q.double()[:, :, None]).pow(2).sum(-1)

    return bool(torch.equal(dist(a), dist(b)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None,
                    help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--shapes", default=None,
                    help=f"comma list of {', '.join(SHAPES)} (default: affmae_stage1,highres "
                         "on a GPU, tiny on the CPU)")
    ap.add_argument("--methods", default="torch,keops", help="comma list of torch, keops")
    ap.add_argument("--reps", type=int, default=None, help="timed calls (default 20; CPU 3)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-build", action="store_true", help="skip the build_neighborhoods rows")
    ap.add_argument("--reprobe", action="store_true",
                    help="probe KeOps again rather than trust a cached verdict")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None
                              else device.index)
        torch.cuda.set_device(device)
    shapes = (args.shapes.split(",") if args.shapes
              else ["affmae_stage1", "highres"] if device.type == "cuda" else ["tiny"])
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        ap.error(f"unknown shapes {bad}; known: {list(SHAPES)}")
    methods = args.methods.split(",")
    if any(m not in ("torch", "keops") for m in methods):
        ap.error("--methods: torch and/or keops")
    reps = args.reps or (20 if device.type == "cuda" else 3)

    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "pykeops": keops_probe._version("pykeops"), "python": platform.python_version(),
        "host": platform.node(),
    }
    log("# " + ", ".join(f"{k}={v}" for k, v in meta.items()))

    probe = None
    if "keops" in methods:
        # Child process: whatever KeOps does there, this script goes on.
        probe = keops_probe.probe_keops(device, refresh=args.reprobe)
        log(f"# {probe.describe()} [source={probe.source}, {probe.seconds:.1f} s]")
        meta["keops_probe"] = {"ok": probe.ok, "status": probe.status, "reason": probe.reason,
                               "source": probe.source, "seconds": round(probe.seconds, 2)}
    meta["auto_picks"] = ("keops" if device.type == "cuda" and probe is not None and probe.ok
                          else "torch")

    rows, failed = [], False
    for name in shapes:
        B, N, k = SHAPES[name]
        pos, pos_s, means, (h, w) = knn_inputs(B, N, device)
        ref = neighbors.knn(pos_s, means, k, method="torch")
        for what in ("knn", "build"):
            if what == "build" and args.no_build:
                continue
            for m in methods:
                row = {"shape": name, "B": B, "N": N, "NC": N // CLUSTER, "k": k,
                       "what": what, "method": m}
                rows.append(row)
                if m == "keops" and not probe.ok:
                    row.update(status="skipped", reason=probe.describe())
                    continue
                if what == "knn":
                    fn = functools.partial(neighbors.knn, pos_s, means, k, method=m)
                else:
                    fn = functools.partial(neighbors.build_neighborhoods, pos, CLUSTER,
                                           CLUSTER * k, h, w, knn_method=m, lists="aff")
                try:
                    row.update(time_fn(fn, device, args.warmup, reps), status="ok")
                    if what == "knn" and m == "keops":
                        row["same_as_torch"] = same_distances(pos_s, means, fn(), ref)
                        failed |= not row["same_as_torch"]
                except Exception as e:  # noqa: BLE001 -- a row's failure is reported, not fatal
                    row.update(status="error", reason=f"{type(e).__name__}: {e}")
                    traceback.print_exc()
                    failed = True
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    log("")
    log(f"{'shape':<14} {'B':>3} {'N':>6} {'NC':>5} {'k':>2}  {'what':<6} {'method':<6} "
        f"{'median ms':>10} {'min ms':>9} {'first s':>8}  note")
    for r in rows:
        if r["status"] == "ok":
            note = "" if "same_as_torch" not in r else (
                "same distances as torch" if r["same_as_torch"] else "DIFFERS from torch")
            log(f"{r['shape']:<14} {r['B']:>3} {r['N']:>6} {r['NC']:>5} {r['k']:>2}  "
                f"{r['what']:<6} {r['method']:<6} {r['median_ms']:>10.3f} {r['min_ms']:>9.3f} "
                f"{r['first_call_s']:>8.3f}  {note}")
        else:
            log(f"{r['shape']:<14} {r['B']:>3} {r['N']:>6} {r['NC']:>5} {r['k']:>2}  "
                f"{r['what']:<6} {r['method']:<6} {'-':>10} {'-':>9} {'-':>8}  "
                f"{r['status']}: {r['reason']}")
    log(f"# knn(method='auto') would use: {meta['auto_picks']}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        log(f"# wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
