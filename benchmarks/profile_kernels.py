"""Where the time of one triton forward+backward step goes: GPU time per kernel.

Runs `steps` forward+backward steps of the triton backend (fast and deterministic mode) on
AFF-built inputs under torch.profiler and prints, per dtype and mode, every GPU kernel with
its time per step and launch count, largest first, and their total. Complements bench.py,
which times whole steps: this says which kernel to work on.

    python benchmarks/profile_kernels.py [--shapes affmae_stage1,config_3_large]
                                         [--dtypes bf16,fp32] [--steps 10] [--top 12] [--log FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def profile_case(x, det: bool, steps: int) -> tuple[list[tuple[str, float, int]], float]:
    """(kernel name, ms per step, launches per step) of `steps` fwd+bwd steps, largest first,
    and the wall time per step of as many unprofiled steps."""
    from torch.profiler import ProfilerActivity, profile

    step = bench.make_step(bench.make_attention("triton-det" if det else "triton", False), x,
                           "fwd+bwd")

    def run():
        for t in x.leaves():
            t.grad = None
        step()

    for _ in range(3):  # compile and warm the caches outside the profile
        run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None)
        if us is None:  # older torch
            us = ev.cuda_time_total
        if us > 0:
            rows.append((ev.key, us / 1e3 / steps, round(ev.count / steps)))
    return sorted(rows, key=lambda r: -r[1]), wall_ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="affmae_stage1", help=f"comma-separated, of {', '.join(bench.SHAPES)}")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=12, help="kernels listed per case")
    p.add_argument("--log", default=None, help="also write the report to this file")
    opt = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    dev = torch.device("cuda")
    lines = [f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
             f"triton {__import__('triton').__version__}, commit {bench.git_state()[0][:12]}"]
    cases = [(shape, name, det) for shape in opt.shapes.split(",")
             for name in opt.dtypes.split(",") for det in (False, True)]
    base = {}
    for shape, name, det in cases:
        if shape not in base:
            base[shape] = bench.build_inputs(bench.SHAPES[shape], dev)
            lines.append(f"## {shape} (B, N, C, H, M) = {bench.SHAPES[shape]}")
        dtype = bench.DTYPES[bench.DTYPE_ALIASES.get(name, name)]
        x = base[shape].cast(dtype, True)
        rows, wall_ms = profile_case(x, det, opt.steps)
        total = sum(r[1] for r in rows)
        # Wall time well above the kernels' sum means the step waits on the host
        # (Python, launches), not on the GPU.
        lines.append(f"==== {shape} {dtype} deterministic={det}: GPU time per step {total:.3f} ms, "
                     f"wall {wall_ms:.3f} ms ({opt.steps} steps) ====")
        lines += [f"  {ms:8.3f} ms  x{n:<3d} {key[:100]}" for key, ms, n in rows[:opt.top]]
        rest = sum(r[1] for r in rows[opt.top:])
        if rest:
            lines.append(f"  {rest:8.3f} ms        ({len(rows) - opt.top} more kernels)")
    report = "\n".join(lines)
    print(report, flush=True)
    if opt.log:
        Path(opt.log).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
