"""Host overhead vs GPU time: the triton fwd+bwd step, eager and as a CUDA graph.

On a host that issues launches slowly, the eager step at small AFF shapes takes the host's
time, not the GPU's. This script captures one step (forward, backward, check_indices=False)
in a CUDA graph, in the fast and the deterministic mode (neither reads anything back on the
host since 813d25a), and times its replay next to the eager step (triton.testing.do_bench,
median). With --compile it also times the step under ``torch.compile(mode="reduce-overhead")``,
which records CUDA graphs itself: what a training script gets without capturing by hand.

    python benchmarks/graph_step.py [--shapes affmae_stage1,config_3_large] [--dtypes bf16,fp32]
                                    [--modes fast,det] [--compile] [--pin-cpu CORE]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

MODES = {"fast": False, "det": True}


def attention(x, deterministic: bool):
    """The op on ``x``'s index tensors, taking the six leaves (q, k, v, pe_table, blank_k,
    blank_v) as arguments: the eager step passes x's, the compiled step its graph inputs."""
    from cluster import ops

    def attn(q, k, v, pe_table, blank_k, blank_v):
        return ops.cluster_attention(
            q, k, v, x.member_idx, pe_table=pe_table, pe_idx=x.pe_idx, mask=x.mask,
            blank_k=blank_k, blank_v=blank_v, scale=x.scale, backend="triton",
            deterministic=deterministic, check_indices=False)
    return attn


def time_case(x, deterministic: bool) -> tuple[float, float]:
    """(eager ms, graph replay ms) of one fwd+bwd step on inputs ``x``."""
    import triton

    attn = attention(x, deterministic)

    def step():
        attn(*x.leaves()).backward(x.dout)

    def eager():
        for t in x.leaves():
            t.grad = None
        step()

    # Warm up (compiles, allocator pools) on a side stream, as graph capture requires.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager()
    torch.cuda.current_stream().wait_stream(side)
    for t in x.leaves():
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    replay = triton.testing.do_bench(graph.replay, warmup=30, rep=300, return_mode="median")
    return triton.testing.do_bench(eager, warmup=30, rep=300, return_mode="median"), replay


def time_compiled(x, deterministic: bool) -> float:
    """ms per fwd+bwd step of the op under torch.compile(mode="reduce-overhead")."""
    import torch._dynamo
    import triton

    torch._dynamo.reset()
    compiled = torch.compile(attention(x, deterministic), mode="reduce-overhead",
                             fullgraph=True)

    def step():
        torch.compiler.cudagraph_mark_step_begin()
        for t in x.leaves():
            t.grad = None
        compiled(*x.leaves()).backward(x.dout)

    for _ in range(5):  # compile, then record the graphs
        step()
    return triton.testing.do_bench(step, warmup=30, rep=300, return_mode="median")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="affmae_stage1,config_3_large,aff_tiny_stage2")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--modes", default="fast,det", help="comma-separated subset of fast,det")
    p.add_argument("--pin-cpu", type=int, default=None, metavar="CORE",
                   help="run the process on this one CPU core (as bench.py --pin-cpu)")
    p.add_argument("--compile", action="store_true",
                   help='also time the step under torch.compile(mode="reduce-overhead")')
    opt = p.parse_args(argv)
    modes = opt.modes.split(",")
    if unknown := sorted(set(modes) - set(MODES)):
        p.error(f"--modes: unknown {unknown}; expected a subset of {sorted(MODES)}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    if opt.pin_cpu is not None:
        os.sched_setaffinity(0, {opt.pin_cpu})  # before the autograd engine's threads start
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"commit {bench.git_state()[0][:12]}, CPU cores {sorted(os.sched_getaffinity(0))}",
          flush=True)
    for shape in opt.shapes.split(","):
        base = bench.build_inputs(bench.SHAPES[shape], dev)
        for name in opt.dtypes.split(","):
            dtype = bench.DTYPES[bench.DTYPE_ALIASES.get(name, name)]
            for mode in modes:
                # Fresh leaves per mode: the compiled step's AccumulateGrad nodes, kept alive
                # by the leaves, sit on the default stream and broke the next mode's capture.
                x = base.cast(dtype, True)
                eager_ms, graph_ms = time_case(x, MODES[mode])
                line = (f"{shape} {name} {mode} fwd+bwd: eager {eager_ms:.3f} ms, "
                        f"CUDA graph replay {graph_ms:.3f} ms")
                if opt.compile:
                    line += (f", torch.compile reduce-overhead "
                             f"{time_compiled(x, MODES[mode]):.3f} ms")
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
