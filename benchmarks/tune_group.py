"""Group kernels on or off, and their num_warps (cluster.triton_kernels.TUNING_GROUP).

For each dtype, times one triton step at an AFF shape with the per-query / per-key kernel
(warps 0) and with the group kernel at 1, 2, 4 warps (triton.testing.do_bench, median):
the forward for --kind fwd, forward+backward for --kind bwd_kv (the key-cluster backward).
Prints one line per setting; copy the winner into TUNING_GROUP by hand. Needs a CUDA GPU.

    python benchmarks/tune_group.py [--kind fwd] [--shape affmae_stage1] [--dtypes bf16,fp32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="affmae_stage1", help=f"one of {', '.join(bench.SHAPES)}")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--kind", default="fwd", choices=("fwd", "bwd_kv"))
    opt = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    import triton

    from cluster import triton_kernels as tk

    base = bench.build_inputs(bench.SHAPES[opt.shape], torch.device("cuda"))
    start = dict(tk.TUNING_GROUP)
    for name in opt.dtypes.split(","):
        dtype = bench.DTYPES[bench.DTYPE_ALIASES.get(name, name)]
        width = 2 if dtype in (torch.float16, torch.bfloat16) else 4
        mode = "fwd" if opt.kind == "fwd" else "fwd+bwd"
        x = base.cast(dtype, mode != "fwd")
        step = bench.make_step(bench.make_attention("triton", False), x, mode)

        def run(x=x, step=step):
            for t in x.leaves():
                t.grad = None
            step()

        for warps in (0, 1, 2, 4):
            tk.TUNING_GROUP[opt.kind, width] = warps
            ms = triton.testing.do_bench(run, warmup=30, rep=200, return_mode="median")
            kernel = "ungrouped" if warps == 0 else f"group, {warps} warps"
            print(f"{opt.shape} {dtype} {mode} ({opt.kind} {kernel}): {ms:.4f} ms", flush=True)
        tk.TUNING_GROUP.clear()
        tk.TUNING_GROUP.update(start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
