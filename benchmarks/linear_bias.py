"""The bias gradient of the module's projections: ways to sum grad [B*N, C] over its rows.

nn.Linear's backward sums its output gradient over the rows for the bias (torch's column
reduction), and at ``affmae_stage1`` that costs more than the GEMMs beside it (module_step's
profile). This times the alternatives on the same gradient, with GB/s against the bytes read
and the error against a float64 sum, so a module change picks one on a measurement.

    python benchmarks/linear_bias.py [--rows 131072] [--cols 96,192] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _ways():
    # name -> f(g, ones) giving the [C] row sum of g [R, C] in g's dtype
    return {
        "sum(0)": lambda g, ones: g.sum(0),
        "mv(g.t(), ones)": lambda g, ones: torch.mv(g.t(), ones),
        "ones @ g": lambda g, ones: (ones[None, :] @ g)[0],
        "sum(1) of [R/64, 64, C], sum(0)": lambda g, ones: g.view(-1, 64, g.shape[1]).sum(1).sum(0),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=64 * 2048, help="B*N (default %(default)s)")
    p.add_argument("--cols", default="96,192", help="output features of the projections")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("linear_bias: needs a CUDA device", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, rows {a.rows}")
    for dtype in [getattr(torch, d) for d in a.dtypes.split(",")]:
        for cols in map(int, a.cols.split(",")):
            gen = torch.Generator(device="cuda").manual_seed(0)
            g = torch.randn(a.rows, cols, device="cuda", dtype=dtype, generator=gen)
            ones = torch.ones(a.rows, device="cuda", dtype=dtype)
            want = g.double().sum(0)
            nbytes = g.numel() * g.element_size()
            for name, f in _ways().items():
                ms = do_bench(lambda f=f, g=g, ones=ones: f(g, ones), warmup=25, rep=200, return_mode="median")
                err = ((f(g, ones).double() - want).abs().max() / want.abs().max()).item()
                row = {"dtype": str(dtype).removeprefix("torch."), "rows": a.rows, "cols": cols,
                       "way": name, "us": ms * 1e3, "GB/s": nbytes / ms / 1e6, "relerr": err}
                rows.append(row)
                print(f"{row['dtype']:>9} {cols:4d}  {name:32s} {row['us']:8.1f} us "
                      f"{row['GB/s']:7.0f} GB/s  relerr {err:.1e}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
