"""Test data, configurations and tolerance rules shared by the test suite and `nox -s validate`.

One source of truth: the pytest suite (tests/conftest.py) and the validation job
(`python -m cluster.validate`) both import from here, so they build the same inputs and
judge them by the same rules.

Tolerance rules
---------------
float32 (and float64): ``|x - ref64| <= atol + rtol * |ref64|`` elementwise, with
forward 1e-4, backward 1e-3, loss 1e-4 (both atol and rtol).

float16 / bfloat16 (the flash-attention rule): a backend's max error against the float64
reference may be at most ``LOWP_FACTOR`` (2x) the max error of the plain PyTorch reference
run in the same low precision, plus a small absolute floor (one unit of the dtype's
rounding at the output's magnitude).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "CONFIGS",
    "LISTS",
    "RAGGED_CONFIGS",
    "Config",
    "TOLERANCES",
    "LOWP_FACTOR",
    "AttentionInputs",
    "make_inputs",
    "grouped_member_idx",
    "clustered_member_idx",
    "random_case",
    "check_config",
    "max_errors",
    "within_fp32_tolerance",
    "within_lowp_rule",
]


@dataclass(frozen=True)
class Config:
    name: str
    B: int
    N: int
    C: int
    H: int
    M: int
    cluster_size: int = 8
    # ragged extras may break the suite's usual constraints on purpose
    ragged: bool = False

    @property
    def D(self) -> int:
        return self.C // self.H


CONFIGS = (
    Config("config_1_small", B=1, N=64, C=8, H=1, M=32),
    Config("config_2_medium", B=16, N=128, C=16, H=2, M=48),
    Config("config_3_large", B=32, N=256, C=256, H=8, M=64),
)

# Sizes that trip block-size assumptions: N not a multiple of the cluster size (padded,
# masked last cluster), odd head dims, M not a multiple of 8 or of a block.
RAGGED_CONFIGS = (
    Config("ragged_n61_d12_m24", B=2, N=61, C=36, H=3, M=24, ragged=True),
    Config("ragged_n100_d20_m40", B=3, N=100, C=40, H=2, M=40, ragged=True),
    Config("ragged_m5_c3", B=2, N=37, C=14, H=2, M=5, cluster_size=1, ragged=True),
)

# Neighbour lists of the suite: "aff" (each token's own nearest clusters, AFF's, the default
# of every input) and "cluster" (one list per cluster, the shared lists' fast paths).
LISTS = ("aff", "cluster")

TOLERANCES = {
    "forward": 1e-4,
    "backward": 1e-3,
    "loss": 1e-4,
}
LOWP_FACTOR = 2.0


def check_config(cfg: Config) -> None:
    """The suite's constraints on a configuration; raises ValueError naming the broken one."""
    rules = [
        (cfg.B >= 1, "B >= 1"),
        (cfg.N >= 32, "N >= 32"),
        (cfg.C >= cfg.H, "C >= H"),
        (cfg.C % cfg.H == 0, "C % H == 0"),
        (cfg.M < cfg.N, "M < N"),
    ]
    for ok, rule in rules:
        if not ok:
            raise ValueError(f"config {cfg.name}: constraint {rule} violated ({cfg})")


@dataclass
class AttentionInputs:
    """Everything cluster_attention takes, plus the neighbourhood it was built from."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    member_idx: torch.Tensor
    pe_table: torch.Tensor | None
    pe_idx: torch.Tensor | None
    mask: torch.Tensor | None
    blank_k: torch.Tensor | None
    blank_v: torch.Tensor | None
    extras: dict = field(default_factory=dict)

    def kwargs(self) -> dict:
        return dict(pe_table=self.pe_table, pe_idx=self.pe_idx, mask=self.mask,
                    blank_k=self.blank_k, blank_v=self.blank_v)

    def float_tensors(self) -> dict[str, torch.Tensor]:
        """The differentiable inputs, by argument name (None ones left out)."""
        names = ("q", "k", "v", "pe_table", "blank_k", "blank_v")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def to(self, dtype: torch.dtype | None = None, device=None, requires_grad: bool = False,
           param_dtype: torch.dtype | None = None) -> AttentionInputs:
        """A detached copy: activations in ``dtype``, parameters in ``param_dtype`` (default dtype)."""
        pd = param_dtype or dtype

        def f(x, dt):
            if x is None:
                return None
            y = x.detach().to(device=device or x.device, dtype=dt if x.is_floating_point() else x.dtype)
            if requires_grad and y.is_floating_point():
                y.requires_grad_(True)
            return y

        return AttentionInputs(
            f(self.q, dtype), f(self.k, dtype), f(self.v, dtype), f(self.member_idx, None),
            f(self.pe_table, pd), f(self.pe_idx, None), f(self.mask, None),
            f(self.blank_k, pd), f(self.blank_v, pd), dict(self.extras),
        )


def _grid_shape(n: int) -> tuple[int, int]:
    """A near-square h x w grid with h * w >= n."""
    h = max(1, int(math.sqrt(n)))
    w = -(-n // h)
    return h, w


def make_inputs(
    cfg: Config,
    *,
    seed: int,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    pe: bool = True,
    mask: bool = True,
    blank: bool = True,
    duplicates: bool = False,
    empty_rows: bool = False,
    index_dtype: torch.dtype = torch.int64,
    knn_method: str = "torch",
    lists: str = "aff",
) -> AttentionInputs:
    """Realistic inputs for one configuration, built the way an AFF layer builds them.

    Token positions on an h x w grid (tokens past N dropped, so the last cluster is padded
    when N is not a multiple of the cluster size), clustered by ``cluster.neighbors``; the
    nearest ``M / cluster_size`` clusters of each token (``lists="aff"``, AFF's own lists)
    or of each cluster (``lists="cluster"``, one list shared by a cluster's tokens) give
    member_idx, cluster_mask and pe_idx. Optionally: duplicated neighbours (a token listed twice), rows with every slot
    masked, random extra masking so masks are not only padding.

    All randomness comes from one torch.Generator seeded with ``seed`` (no global RNG state).
    """
    from . import neighbors

    g = torch.Generator().manual_seed(seed)
    B, N, H, D, M = cfg.B, cfg.N, cfg.H, cfg.D, cfg.M
    cs = cfg.cluster_size
    h, w = _grid_shape(N)
    pos = neighbors.make_synthetic_positions(B, N, h, w, seed=seed, grid=True)
    R = max(h, w)
    nb = neighbors.build_neighborhoods(pos, cs, M, h, w, R=R, knn_method=knn_method, lists=lists)
    member_idx = nb.member_idx
    m_actual = member_idx.shape[-1]
    if m_actual != M:
        raise ValueError(f"config {cfg.name}: neighbourhoods gave M={m_actual}, expected {M}")
    valid = nb.cluster_mask
    if valid is None:
        valid = torch.ones(B, N, M, dtype=torch.bool)
    pe_idx = nb.pe_idx
    T = nb.table_width**2

    if duplicates:
        # Point a random quarter of the slots at the token in slot 0: the same key is then
        # named several times by one query, and its gradient must accumulate each time.
        dup = torch.rand(B, N, M, generator=g) < 0.25
        member_idx = torch.where(dup, member_idx[..., :1].expand_as(member_idx), member_idx)
    if mask:
        valid = valid & (torch.rand(B, N, M, generator=g) > 0.15)
    if empty_rows:
        valid = valid.clone()
        valid[:, :: max(1, N // 5)] = False

    def randn(*shape, s=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * s

    q = randn(B, H, N, D)
    k = randn(B, H, N, D)
    v = randn(B, H, N, D)
    pe_table = randn(T, H, s=0.5) if pe else None
    blank_k = randn(H, D) if blank else None
    blank_v = randn(H, D) if blank else None
    inputs = AttentionInputs(
        q, k, v, member_idx.to(index_dtype), pe_table,
        pe_idx.to(index_dtype) if pe else None, valid if (mask or empty_rows or nb.cluster_mask is not None) else None,
        blank_k, blank_v, extras={"pos": nb.pos, "h": h, "w": w, "R": R, "lists": lists,
                                    "neighborhoods": nb},
    )
    return inputs.to(dtype=dtype, device=device)


def grouped_member_idx(B: int, N: int, M: int, *, group: int, generator: torch.Generator,
                       stray_every: int = 0) -> torch.Tensor:
    """Random key lists [B, N, M] shared by each run of ``group`` consecutive queries, the
    way AFF's clusters share theirs (the layout the triton backend's group kernels exploit;
    lists may name a key twice). ``stray_every`` > 0: in every ``stray_every``-th group one
    query's slot names another key, so that group no longer shares one list."""
    n_groups = -(-N // group)
    lists = torch.randint(0, N, (B, n_groups, M), generator=generator)
    idx = lists.repeat_interleave(group, dim=1)[:, :N].clone()
    if stray_every:
        for first in range(0, N, group * stray_every):
            span = min(group, N - first)
            row = first + int(torch.randint(0, span, (1,), generator=generator))
            slot = int(torch.randint(0, M, (1,), generator=generator))
            idx[:, row, slot] = (idx[:, row, slot] + 1) % N
    return idx


def clustered_member_idx(B: int, N: int, M: int, *, group: int,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """AFF's exact layout with random neighbours: each run of ``group`` queries shares one
    list made of ``M // group`` whole key clusters (cluster c = tokens c*group ..
    c*group + group-1, in order; a cluster may repeat). Returns (member_idx [B, N, M],
    valid [B, N, M]); slots for the missing tokens of a short last cluster point at N - 1
    and are invalid, as in ``build_neighborhoods``."""
    n_groups = -(-N // group)
    clusters = torch.randint(0, n_groups, (B, n_groups, M // group), generator=generator)
    tok = clusters[..., None] * group + torch.arange(group)
    valid = tok < N
    tok = torch.where(valid, tok, torch.full_like(tok, N - 1))
    idx = tok.reshape(B, n_groups, M).repeat_interleave(group, dim=1)[:, :N]
    valid = valid.reshape(B, n_groups, M).repeat_interleave(group, dim=1)[:, :N]
    return idx.contiguous(), valid.contiguous()


def per_token_cluster_idx(B: int, N: int, M: int, *, group: int, pool: int,
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """AFF's per-token layout with random neighbours: each query lists ``M // group`` whole
    key clusters of its own (distinct, in random order), drawn from a pool of ``pool``
    clusters per run of ``group`` queries, so that a run's union has at most ``pool``
    clusters. Returns (member_idx [B, N, M], valid [B, N, M]); a short last cluster's
    missing tokens point at N - 1 and are invalid, as in ``build_neighborhoods``."""
    J = M // group
    if pool < J:
        raise ValueError(f"pool: expected at least M // group = {J} clusters, got {pool}")
    n_groups = -(-N // group)
    pools = torch.stack([torch.randperm(n_groups, generator=generator)[:pool]
                         for _ in range(B * n_groups)]) if pool <= n_groups else \
        torch.randint(0, n_groups, (B * n_groups, pool), generator=generator)
    pools = pools.reshape(B, n_groups, pool)
    pick = torch.argsort(torch.rand(B, n_groups * group, pool, generator=generator), dim=-1)[..., :J]
    clusters = torch.gather(pools.repeat_interleave(group, dim=1), 2, pick)[:, :N]
    tok = clusters[..., None] * group + torch.arange(group)
    valid = tok < N
    tok = torch.where(valid, tok, torch.full_like(tok, N - 1))
    return tok.reshape(B, N, M).contiguous(), valid.reshape(B, N, M).contiguous()


def random_case(B: int, H: int, N: int, D: int, M: int, *, seed: int, device="cpu", T: int = 7,
                pe: bool = True, mask: bool = True, blank: bool = True, dup: bool = True,
                empty_rows: bool = False, index_dtype: torch.dtype = torch.int64,
                group: int = 0, stray_every: int = 0, whole_clusters: bool = False,
                per_token_pool: int = 0) -> dict:
    """Random float64 kernel-test inputs (dict of the op's arguments by name): member_idx
    with duplicates (a quarter of the slots repeat slot 0's key), masks with ~20 % of the
    slots off, and with ``empty_rows`` every fourth query fully masked.

    group > 0: runs of ``group`` queries share one key list (AFF's clusters), with per-query
    masks and pe_idx, and no per-query duplicates; ``stray_every`` breaks the sharing of
    every such group (see grouped_member_idx). whole_clusters: lists of whole key clusters
    as AFF builds them (clustered_member_idx), the layout of the key-cluster backward; a
    short last cluster's slots are masked. per_token_pool > 0: each query's own whole
    clusters from a pool of that many per cluster of queries (per_token_cluster_idx), the
    layout of AFF's per-token lists that the union kernels take."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(device)

    q, k, v = randn(B, H, N, D), randn(B, H, N, D), randn(B, H, N, D)
    idx = torch.randint(0, N, (B, N, M), generator=g)
    pad_valid = None
    if per_token_pool:
        idx, pad_valid = per_token_cluster_idx(B, N, M, group=8, pool=per_token_pool,
                                               generator=g)
    elif whole_clusters:
        idx, pad_valid = clustered_member_idx(B, N, M, group=8, generator=g)
    elif group:
        idx = grouped_member_idx(B, N, M, group=group, generator=g, stray_every=stray_every)
    elif dup:
        rep = torch.rand(B, N, M, generator=g) < 0.25
        idx = torch.where(rep, idx[..., :1].expand_as(idx), idx)
    valid = None
    if mask or empty_rows:
        valid = torch.rand(B, N, M, generator=g) > 0.2
        if empty_rows:
            valid[:, ::4] = False
    if pad_valid is not None and not bool(pad_valid.all()):
        valid = pad_valid if valid is None else valid & pad_valid
    pe_table = randn(T, H, s=0.5) if pe else None
    pe_idx = torch.randint(0, T, (B, N, M), generator=g).to(index_dtype).to(device) if pe else None
    bk = randn(H, D) if blank else None
    bv = randn(H, D) if blank else None
    return dict(q=q, k=k, v=v, member_idx=idx.to(index_dtype).to(device), pe_table=pe_table,
                pe_idx=pe_idx, mask=None if valid is None else valid.to(device),
                blank_k=bk, blank_v=bv)


def max_errors(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max |ref|) with NaN mapped to inf."""
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if x.numel() == 0:
        return 0.0, 0.0
    diff = (x - ref).abs()
    if not torch.isfinite(diff).all():
        return math.inf, math.inf
    abs_err = float(diff.max())
    scale = float(ref.abs().max())
    return abs_err, abs_err / scale if scale > 0 else abs_err


def within_fp32_tolerance(x: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    """Elementwise |x - ref| <= tol + tol * |ref| (atol = rtol = tol), NaN never passes."""
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if x.shape != ref.shape:
        return False
    ok = (x - ref).abs() <= tol + tol * ref.abs()
    return bool(ok.all())


def lowp_atol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """One rounding unit of ``dtype`` at the reference's magnitude."""
    return torch.finfo(dtype).eps * max(1.0, float(ref.detach().abs().max()))


def within_lowp_rule(x: torch.Tensor, pt_lowp: torch.Tensor, ref: torch.Tensor,
                     dtype: torch.dtype) -> tuple[bool, float, float]:
    """flash-attention's rule: err(x) <= 2 * err(PyTorch in dtype) + atol. Returns (ok, err, bound)."""
    err = max_errors(x, ref)[0]
    pt_err = max_errors(pt_lowp, ref)[0]
    bound = LOWP_FACTOR * pt_err + lowp_atol(ref, dtype)
    return err <= bound, err, bound


# --------------------------------------------------------------------------- runs and results

def upstream_grad(out_shape, seed: int) -> torch.Tensor:
    """The fixed dL/dout every backward comparison uses (float64, CPU)."""
    g = torch.Generator().manual_seed(seed + 7919)
    return torch.randn(*out_shape, generator=g, dtype=torch.float64)


def run_case(inputs: AttentionInputs, *, backend: str, dout: torch.Tensor | None = None,
             deterministic: bool | None = None, scale: float | None = None):
    """Run one backend on ``inputs`` (already in the wanted dtype/device, requires_grad set
    on the float tensors if gradients are wanted). Returns (out, {name: grad})."""
    from . import ops

    out = ops.cluster_attention(inputs.q, inputs.k, inputs.v, inputs.member_idx,
                                **inputs.kwargs(), scale=scale, backend=backend,
                                deterministic=deterministic)
    grads = {}
    if dout is not None:
        leaves = {n: t for n, t in inputs.float_tensors().items() if t.requires_grad}
        gs = torch.autograd.grad(out, list(leaves.values()),
                                 dout.to(device=out.device, dtype=out.dtype), allow_unused=True)
        grads = {n: (g if g is not None else torch.zeros_like(t))
                 for (n, t), g in zip(leaves.items(), gs)}
    return out, grads


def reference_result(cfg: Config, *, seed: int, **recipe) -> dict:
    """float64 reference output and gradients for ``make_inputs(cfg, seed=seed, **recipe)``."""
    x = make_inputs(cfg, seed=seed, **recipe).to(torch.float64, requires_grad=True)
    B, H, N, D = x.q.shape
    dout = upstream_grad((B, H, N, D), seed)
    out, grads = run_case(x, backend="reference", dout=dout)
    return {"out": out.detach(), "grads": {n: g.detach() for n, g in grads.items()}, "dout": dout}


# --------------------------------------------------------------------------- sharding, devices

def parse_shard(spec: str) -> tuple[int, int]:
    """'i/K' (1-based) -> (i, K); ValueError on anything else."""
    try:
        i, k = (int(s) for s in spec.split("/"))
    except Exception:
        raise ValueError(f"--shard: expected i/K with integers, got {spec!r}") from None
    if not (k >= 1 and 1 <= i <= k):
        raise ValueError(f"--shard: expected 1 <= i <= K, got {spec!r}")
    return i, k


def shard_of(key: str, k: int) -> int:
    """1-based shard of a test id: a stable hash, the same on every machine and run."""
    import zlib

    return zlib.crc32(key.encode()) % k + 1


def split_shard(items, i: int, k: int, key=str):
    """(kept, dropped): the items whose key hashes to shard i of k."""
    keep, drop = [], []
    for it in items:
        (keep if shard_of(key(it), k) == i else drop).append(it)
    return keep, drop


def worker_device(worker_index: int | None, cuda_count: int) -> torch.device:
    """The device an xdist worker uses: its own GPU (worker index modulo the GPU count) on
    a GPU host, the CPU otherwise. worker_index None = not under xdist."""
    if cuda_count <= 0:
        return torch.device("cpu")
    return torch.device("cuda", (worker_index or 0) % cuda_count)
