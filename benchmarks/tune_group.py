"""Settings of the group kernels (forward, query-side and key-cluster backward): on or off,
num_warps, heads per tile, for the key-cluster backward map entries per chunk, and the
register cap of the kernel (cluster.triton_kernels.tuning: TUNING_GROUP, TUNING_GROUP_HEADS,
KV_GROUP_TILE, TUNING_MAXNREG), each setting applied through tuning.override over the
tables as they are.

For each shape and dtype, profiles forward+backward steps of the triton backend (fast mode,
torch.profiler, as profile_kernels.py) under every setting and prints the GPU time per step
of the tuned kernel and of the whole step. Kernel times, not step times: on a GPU whose
host cannot issue the step as fast as the GPU runs it, do_bench times the host. warps 0 is
the per-query / per-key kernel. Copy the winners into the tables by hand (and their figures
into benchmarks/TUNING.md). Needs a CUDA GPU.

    python benchmarks/tune_group.py [--kind fwd|bwd_q|bwd_kv] [--shapes affmae_stage1,highres]
                                    [--dtypes bf16] [--warps 0,1,2,4] [--maxnreg 0,128,96]
                                    [--steps 10] [--log FILE]

--warps limits the sweep to those num_warps (0 = the per-query / per-key kernel);
--maxnreg sweeps register caps (0 = the compiler's choice) at the table's heads per tile
and map entries. One warp per program is the usual choice here, and ptxas then gives it
up to 255 registers, i.e. 8 resident programs (8 warps) per SM: a cap trades spills for
more programs in flight.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import profile_kernels  # noqa: E402

KERNELS = {"fwd": ("_attn_fwd_cluster_kernel", "_attn_fwd_kernel"),
           "bwd_q": ("_attn_bwd_q_cluster_kernel", "_attn_bwd_q_kernel"),
           "bwd_kv": ("_attn_bwd_kv_cluster_kernel", "_attn_bwd_kv_kernel")}
WARPS = (1, 2, 4)
HEADS = (1, 2)
ENTRIES = (2, 4, 8)


def settings(kind: str, tuning, warps=None, maxnreg=None):
    """(warps, heads, map entries per chunk or None, register cap or None); warps 0 is the
    ungrouped kernel. Without register caps: every warps x heads x entries; with them,
    each cap at the tables' heads and entries."""
    warps = (0,) + WARPS if warps is None else warps
    if maxnreg is None:
        heads = HEADS if kind in tuning.TUNING_GROUP_HEADS else (1,)
        entries = ENTRIES if kind == "bwd_kv" else (None,)
        for w in warps:
            if w == 0:
                yield 0, 1, None, None
            else:
                yield from ((w, h, e, None) for h, e in itertools.product(heads, entries))
        return
    heads = tuning.TUNING_GROUP_HEADS.get(kind, 1)
    for w, cap in itertools.product(warps, maxnreg):
        yield w, heads, None, cap or None


def _ints(text: str | None):
    return None if text is None else tuple(int(x) for x in text.split(","))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="bwd_kv", choices=tuple(KERNELS))
    p.add_argument("--shapes", default=",".join(bench.SHAPES),
                   help=f"comma-separated, of {', '.join(bench.SHAPES)}")
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--warps", default=None, help="comma-separated num_warps; 0 = ungrouped")
    p.add_argument("--maxnreg", default=None, help="comma-separated register caps; 0 = none")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--log", default=None, help="also write the lines to this file")
    opt = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    import triton

    from cluster.triton_kernels import common, tuning

    dev = torch.device("cuda")
    lines = [f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
             f"triton {triton.__version__}, commit {bench.git_state()[0][:12]}; "
             f"{opt.kind}: GPU ms per fwd+bwd step (fast mode, {opt.steps} profiled steps)"]
    print(lines[0], flush=True)
    for shape in opt.shapes.split(","):
        B, N, C, H, M = bench.SHAPES[shape]
        block_d = max(16, triton.next_power_of_2(C // H))
        base = bench.build_inputs(bench.SHAPES[shape], dev)
        for name in opt.dtypes.split(","):
            dtype = bench.DTYPES[bench.DTYPE_ALIASES.get(name, name)]
            width = 2 if dtype in (torch.float16, torch.bfloat16) else 4
            x = base.cast(dtype, True)
            for warps, heads, entries, cap in settings(
                    opt.kind, tuning, _ints(opt.warps), _ints(opt.maxnreg)):
                kernel_key = opt.kind + ("_group" if warps else "")
                # The tuned kernel's cap: the one swept, else none (the compiler's choice).
                knobs = {"TUNING_GROUP": {(opt.kind, width): warps},
                         "TUNING_MAXNREG": {(kernel_key, width): cap or None}}
                if opt.kind in tuning.TUNING_GROUP_HEADS:
                    knobs["TUNING_GROUP_HEADS"] = {opt.kind: heads}
                if entries is not None:
                    knobs["KV_GROUP_TILE"] = entries * common._GROUP * block_d
                with tuning.override(**knobs):
                    rows, _wall = profile_kernels.profile_case(x, False, opt.steps)
                kernel = sum(ms for key, ms, _n in rows if key in KERNELS[opt.kind])
                total = sum(ms for _key, ms, _n in rows)
                what = ("ungrouped" if warps == 0 else
                        f"warps {warps}, heads {heads}"
                        + ("" if entries is None else f", entries {entries}"))
                if opt.maxnreg is not None:
                    what += f", maxnreg {cap or 'none'}"
                line = (f"{shape} {name} {opt.kind} ({what}): kernel {kernel:.4f} ms, "
                        f"step {total:.4f} ms")
                lines.append(line)
                print(line, flush=True)
    if opt.log:
        Path(opt.log).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
