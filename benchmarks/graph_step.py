"""Host overhead vs GPU time: the triton fast-mode fwd+bwd step, eager and as a CUDA graph.

On a host that issues launches slowly, the eager step at small AFF shapes takes the host's
time, not the GPU's. This script captures one step (forward, backward, check_indices=False,
fast mode: the deterministic mode reads a flag on the host and cannot be captured) in a
CUDA graph and times its replay next to the eager step (triton.testing.do_bench, median).
With --compile it also times the step under ``torch.compile(mode="reduce-overhead")``, which
records CUDA graphs itself: what a training script gets without capturing by hand.

    python benchmarks/graph_step.py [--shapes affmae_stage1,config_3_large] [--dtypes bf16,fp32]
                                    [--compile]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def time_case(x) -> tuple[float, float]:
    """(eager ms, graph replay ms) of one fast-mode fwd+bwd step on inputs ``x``."""
    import triton

    from cluster import ops

    def step():
        out = ops.cluster_attention(
            x.q, x.k, x.v, x.member_idx, pe_table=x.pe_table, pe_idx=x.pe_idx, mask=x.mask,
            blank_k=x.blank_k, blank_v=x.blank_v, scale=x.scale, backend="triton",
            deterministic=False, check_indices=False)
        out.backward(x.dout)

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


def time_compiled(x) -> float:
    """ms per fast-mode fwd+bwd step of the op under torch.compile(mode="reduce-overhead")."""
    import torch._dynamo
    import triton

    from cluster import ops

    torch._dynamo.reset()

    def attn(q, k, v, pe_table, blank_k, blank_v):
        return ops.cluster_attention(
            q, k, v, x.member_idx, pe_table=pe_table, pe_idx=x.pe_idx, mask=x.mask,
            blank_k=blank_k, blank_v=blank_v, scale=x.scale, backend="triton",
            deterministic=False, check_indices=False)

    compiled = torch.compile(attn, mode="reduce-overhead", fullgraph=True)

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
    p.add_argument("--compile", action="store_true",
                   help='also time the step under torch.compile(mode="reduce-overhead")')
    opt = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"commit {bench.git_state()[0][:12]}", flush=True)
    for shape in opt.shapes.split(","):
        base = bench.build_inputs(bench.SHAPES[shape], dev)
        for name in opt.dtypes.split(","):
            x = base.cast(bench.DTYPES[bench.DTYPE_ALIASES.get(name, name)], True)
            eager_ms, graph_ms = time_case(x)
            line = (f"{shape} {name} fast fwd+bwd: eager {eager_ms:.3f} ms, "
                    f"CUDA graph replay {graph_ms:.3f} ms")
            if opt.compile:
                line += f", torch.compile reduce-overhead {time_compiled(x):.3f} ms"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
