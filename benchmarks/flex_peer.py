"""FlexAttention as a peer of cluster attention: the comparison row ``flex`` of bench.py.

This is cluster attention written the way a user of ``torch.nn.attention.flex_attention``
would write it, not a backend of ``cluster.ops``:

* keys and values are the N tokens plus the blank as one extra key, index N, per head
  (``blank_k`` / ``blank_v`` concatenated to ``k`` / ``v``): ``KV_LEN = N + 1``;
* ``mask_mod(b, h, q_idx, kv_idx)`` admits the blank (``kv_idx == N``) and every key whose
  cluster ``kv_idx // cluster_size`` is one of query ``q_idx``'s clusters, read from a
  membership table ``member[B, N, W]`` (bool, W >= NC + 1 columns, one per cluster) built
  from ``member_idx`` and ``cluster_mask``. The padded slots of a short last cluster (they
  point at token N - 1 and are masked) do not exist as keys at all: the table has one
  entry per cluster, and a cluster's keys are its real tokens only;
* ``score_mod`` adds the relative-position bias ``pe_table[row, h]``, ``row`` computed from
  the token positions of query and key exactly as ``cluster.neighbors`` computes ``pe_idx``
  (``dx = round(pos[kv, 0] - pos[q, 0])`` clamped to ``[-R, R]``, likewise ``dy``,
  ``row = (dy + R) * (2R + 1) + (dx + R)``), and 0 for the blank key;
* the block mask (BLOCK_SIZE x BLOCK_SIZE tiles, 64 by default) is built either from the
  clusters' own kv block lists (``method="kv-blocks"``, the default: O(B * N * nnc) work, no
  dense mask, no compile; ``BlockMask.from_kv_blocks``) or with ``create_block_mask`` evaluated
  eagerly, one batch element at a time so that the dense ``[N, N + 1]`` mask of only one
  image exists at once (``method="create"``). Both give the same BlockMask, partial and
  full tiles alike (tests/integration/test_flex_peer.py checks it). The blank, key N, sits
  in a kv block of its own when N is a multiple of the block size: every query block then
  visits one more (nearly empty) tile, a cost of writing the blank as a key. The block size
  must be a multiple of the kernel's tiles (64 x 64 forward and backward on an H100/H200 at
  D=32 in torch 2.13's defaults; a block size they do not divide is refused by inductor).

The mask is a set: a key is admitted once. ``cluster.ops.cluster_attention`` counts a
duplicated slot once per occurrence, so the two agree only on lists without duplicates,
which AFF's lists are (each token's nnc nearest clusters are distinct). The peer also needs
whole-cluster lists (slots ``j*cs .. j*cs + cs - 1`` = the tokens of one cluster, the
short last cluster's missing tokens masked), which is what ``build_neighborhoods`` returns
for both ``lists="aff"`` and ``lists="cluster"``. ``cluster_membership`` checks both and
raises ``ValueError`` otherwise.

Gradients flow into q, k, v, blank_k, blank_v (through the concatenation) and pe_table
(a tensor captured by ``score_mod``: torch's compiled FlexAttention backward supports
gradients into captured buffers; ``FlexRunner`` falls back to a detached pe_table, and says
so, if the installed torch refuses). torch has no FlexAttention backward on the CPU, and
on the CPU the peer runs FlexAttention eagerly (unfused; materialises the scores): fine
for the tiny smoke case, not a timing.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

DEFAULT_BLOCK_SIZE = 64
BLOCK_MASK_METHODS = ("kv-blocks", "create")


def _flex():
    import torch.nn.attention.flex_attention as fa
    return fa


def unavailable_reason(device: torch.device, head_dim: int | None = None,
                       mode: str | None = None) -> str | None:
    """Why the flex peer cannot run here (None: it can), for ``mode`` "fwd" / "fwd+bwd"."""
    try:
        fa = _flex()
        fa.flex_attention, fa.BlockMask.from_kv_blocks, fa.create_block_mask  # noqa: B018
    except (ImportError, AttributeError) as exc:
        return (f"torch {torch.__version__} has no usable torch.nn.attention.flex_attention "
                f"({type(exc).__name__}: {exc})")
    if device.type == "cpu" and mode == "fwd+bwd":
        return f"FlexAttention has no backward on the CPU (torch {torch.__version__})"
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
            if not has_triton():
                return "compiled FlexAttention needs triton on CUDA, and it is not usable here"
        except ImportError:
            pass
        if head_dim is not None and head_dim < 16:
            return f"head dim D={head_dim} < 16: FlexAttention's Triton kernels need D >= 16"
    elif device.type != "cpu":
        return f"the flex peer runs on CUDA (compiled) or the CPU (eager), not {device.type}"
    return None


# ------------------------------------------------------------------------------ tables

def cluster_membership(member_idx: torch.Tensor, mask: torch.Tensor | None,
                       cluster_size: int) -> torch.Tensor:
    """Each token's clusters ``[B, N, nnc]`` (int64), from whole-cluster member lists.

    Raises ValueError if a token's valid slots hold a token twice (duplicate slots: the
    op counts each occurrence, a FlexAttention mask admits a key once) or if the lists are
    not whole clusters (group ``j`` of ``cluster_size`` slots = the tokens
    ``c*cs .. c*cs + cs - 1`` of one cluster ``c``, exactly those ``< N`` valid).
    """
    B, N, M = member_idx.shape
    cs = cluster_size
    idx = member_idx.long()
    valid = (torch.ones_like(idx, dtype=torch.bool) if mask is None else mask.bool())
    # duplicates among the valid slots: sort, masked slots as distinct negatives
    sentinel = -1 - torch.arange(M, device=idx.device)
    srt = torch.where(valid, idx, sentinel).sort(-1).values
    dup = srt[..., 1:] == srt[..., :-1]
    if bool(dup.any()):
        b, i, j = (int(t) for t in dup.nonzero()[0])
        raise ValueError(
            f"flex peer: duplicate slots: token {i} of batch {b} lists token {int(srt[b, i, j])} "
            f"more than once; cluster_attention counts each occurrence, a FlexAttention mask "
            f"admits a key once, so the peer assumes member lists without duplicates")
    if M % cs:
        raise ValueError(f"flex peer: M={M} slots are not whole clusters of {cs}")
    nnc = M // cs
    g_idx = idx.view(B, N, nnc, cs)
    g_valid = valid.view(B, N, nnc, cs)
    first = g_idx[..., 0]
    expect = first[..., None] + torch.arange(cs, device=idx.device)
    real = expect < N
    ok = ((first % cs == 0) & (g_valid == real).all(-1) & ((g_idx == expect) | ~real).all(-1))
    if not bool(ok.all()):
        b, i, j = (int(t) for t in (~ok).nonzero()[0])
        raise ValueError(
            f"flex peer: slots {j * cs}..{j * cs + cs - 1} of token {i} (batch {b}) are not the "
            f"tokens of one cluster of {cs} (the short last cluster's missing tokens masked): "
            f"the peer's mask is per cluster")
    return first // cs


@dataclass
class FlexMasks:
    """What the peer's mods and kernel read, built once per batch of positions."""

    member: torch.Tensor       # [B, N, W] bool: query's cluster list, W covers every kv block
    pos: torch.Tensor          # [B, KVP, 2] float32 positions, zero past N (the blank, padding)
    block_mask: object         # torch.nn.attention.flex_attention.BlockMask
    N: int
    R: int
    cluster_size: int
    block_size: int
    method: str
    build_s: float             # wall time of build_masks (synchronised)
    tiles: int                 # (q block, kv block) tiles per image x images
    partial_tiles: int
    full_tiles: int

    @property
    def sparsity_pct(self) -> float:
        """Share of the tiles the kernel skips."""
        return 100.0 * (1.0 - (self.partial_tiles + self.full_tiles) / self.tiles)

    def nbytes(self) -> int:
        bm = self.block_mask
        ts = [self.member, self.pos] + [getattr(bm, a, None) for a in (
            "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
            "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")]
        return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def make_mask_mod(member: torch.Tensor, N: int, cluster_size: int):
    def mask_mod(b, h, q_idx, kv_idx):
        # the blank (kv_idx == N) or a key of one of the query's clusters
        return (kv_idx == N) | member[b, q_idx, kv_idx // cluster_size]
    return mask_mod


def make_score_mod(pos: torch.Tensor, pe_table: torch.Tensor, N: int, R: int):
    width = 2 * R + 1

    def score_mod(score, b, h, q_idx, kv_idx):
        dx = (pos[b, kv_idx, 0] - pos[b, q_idx, 0]).round().clamp(-R, R)
        dy = (pos[b, kv_idx, 1] - pos[b, q_idx, 1]).round().clamp(-R, R)
        row = ((dy + R) * width + (dx + R)).to(torch.int64)
        return score + torch.where(kv_idx == N, 0.0, pe_table[row, h])
    return score_mod


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, NQB, NKB] bool -> (num_blocks [B, 1, NQB], indices [B, 1, NQB, NKB]) int32,
    a row's blocks first in ascending order (as create_block_mask orders them)."""
    num = dense.sum(-1, dtype=torch.int32)
    idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True)
    return num[:, None].contiguous(), idx.to(torch.int32)[:, None].contiguous()


def _from_kv_blocks(partial, full, BS, mask_mod, N):
    fa = _flex()
    kv_num, kv_idx = _ordered(partial)
    fkv_num, fkv_idx = _ordered(full)
    return fa.BlockMask.from_kv_blocks(kv_num, kv_idx, fkv_num, fkv_idx, BLOCK_SIZE=BS,
                                       mask_mod=mask_mod, seq_lengths=(N, N + 1))


def _kv_block_tiles(clusters: torch.Tensor, N: int, cs: int, BS: int):
    """(partial, full) [B, NQB, NKB] bool tiles from each token's clusters: a tile's count of
    admitted (query, key) pairs, full when it is BS * BS (edge tiles never are, as in
    create_block_mask, which pads the dense mask with False)."""
    B, _, nnc = clusters.shape
    dev = clusters.device
    NQB, NKB = -(-N // BS), -(-(N + 1) // BS)
    qb = (torch.arange(N, device=dev) // BS).view(1, N, 1)
    kb = clusters * cs // BS  # BS % cs == 0: a cluster lies in one kv block
    ntok = (N - clusters * cs).clamp(max=cs)
    lin = (torch.arange(B, device=dev).view(B, 1, 1) * NQB + qb) * NKB + kb
    cnt = torch.zeros(B * NQB * NKB, dtype=torch.int64, device=dev)
    cnt.index_add_(0, lin.reshape(-1), ntok.reshape(-1))
    cnt = cnt.view(B, NQB, NKB)
    qlen = (N - torch.arange(NQB, device=dev) * BS).clamp(max=BS)
    cnt[:, :, N // BS] += qlen  # every query admits the blank once
    full = cnt == BS * BS
    return (cnt > 0) & ~full, full


def build_masks(member_idx: torch.Tensor, cluster_mask: torch.Tensor | None, pos: torch.Tensor,
                R: int, *, cluster_size: int = 8, block_size: int = DEFAULT_BLOCK_SIZE,
                method: str = "kv-blocks") -> FlexMasks:
    """Membership table, padded positions and BlockMask of one batch of neighbourhoods.

    ``pos``: ``[B, N, 2]`` token positions in the order of ``member_idx`` (the reordered
    ``Neighborhoods.pos``); ``R``: the relative-position table's half-width.
    """
    if method not in BLOCK_MASK_METHODS:
        raise ValueError(f"method: expected one of {BLOCK_MASK_METHODS}, got {method!r}")
    cs, BS = cluster_size, block_size
    if BS < cs or BS % cs:
        raise ValueError(f"block_size: expected a multiple of the cluster size {cs}, got {BS}")
    B, N, _ = member_idx.shape
    if tuple(pos.shape) != (B, N, 2):
        raise ValueError(f"pos: expected shape {(B, N, 2)}, got {tuple(pos.shape)}")
    dev = member_idx.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    clusters = cluster_membership(member_idx, cluster_mask, cs)
    kvp = -(-(N + 1) // BS) * BS  # kv length rounded up to whole blocks
    # W covers kv_idx // cs for every kv_idx of the padded blocks (a kernel may evaluate
    # mask_mod there before masking it out); all False past the real clusters.
    W = max(-(-kvp // cs), -(-N // cs) + 1)
    member = torch.zeros(B, N, W, dtype=torch.bool, device=dev)
    member.scatter_(2, clusters, True)
    pos_kv = torch.zeros(B, kvp, 2, dtype=torch.float32, device=dev)
    pos_kv[:, :N] = pos.to(device=dev, dtype=torch.float32)
    mask_mod = make_mask_mod(member, N, cs)
    if method == "kv-blocks":
        partial, full = _kv_block_tiles(clusters, N, cs, BS)
        block_mask = _from_kv_blocks(partial, full, BS, mask_mod, N)
    else:
        fa = _flex()
        parts = []
        for b in range(B):  # one image's dense [N, N + 1] mask at a time
            bm = fa.create_block_mask(make_mask_mod(member[b:b + 1], N, cs), 1, 1, N, N + 1,
                                      device=dev, BLOCK_SIZE=BS)
            parts.append(bm)
        NKB = -(-(N + 1) // BS)
        partial = torch.cat([_dense_of(p.kv_num_blocks, p.kv_indices, NKB) for p in parts])
        full = torch.cat([_dense_of(p.full_kv_num_blocks, p.full_kv_indices, NKB) for p in parts])
        block_mask = _from_kv_blocks(partial, full, BS, mask_mod, N)
    sync()
    build_s = time.perf_counter() - t0
    tiles = partial.numel()
    return FlexMasks(member=member, pos=pos_kv, block_mask=block_mask, N=N, R=R, cluster_size=cs,
                     block_size=BS, method=method, build_s=build_s, tiles=tiles,
                     partial_tiles=int(partial.sum()), full_tiles=int(full.sum()))


def _dense_of(num: torch.Tensor | None, idx: torch.Tensor | None, NKB: int) -> torch.Tensor:
    """[B, 1, NQB] counts + [B, 1, NQB, >=1] indices -> [B, NQB, NKB] bool tiles."""
    if num is None:
        raise ValueError("create_block_mask returned no full-block tensors")
    B, _, NQB = num.shape
    d = torch.zeros(B, NQB, NKB + 1, dtype=torch.bool, device=num.device)
    keep = torch.arange(idx.shape[-1], device=num.device) < num[:, 0, :, None]
    # entries past a row's count are undefined: send them to the spare column NKB
    cols = torch.where(keep, idx[:, 0].long(), NKB)
    d.scatter_(-1, cols, True)
    return d[..., :NKB]


# ------------------------------------------------------------------------------ the attention

_compiled = {}


def compiled_flex_attention():
    """``torch.compile(flex_attention)``, one per process (static shapes, no graph breaks:
    a silent eager fallback would materialise the [B, H, N, N + 1] scores)."""
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(_flex().flex_attention, dynamic=False, fullgraph=True)
    return _compiled["fn"]


def flex_cluster_attention(q, k, v, masks: FlexMasks, *, pe_table=None, blank_k, blank_v,
                           scale=None, compiled: bool = True) -> torch.Tensor:
    """Cluster attention through FlexAttention: ``[B, H, N, D]`` like the op's output.

    ``q, k, v``: ``[B, H, N, D]``; ``pe_table``: ``[(2R+1)^2, H]`` or None (no bias);
    ``blank_k, blank_v``: ``[H, D]`` (required: the blank is key N).
    """
    B, H, N, D = q.shape
    if N != masks.N:
        raise ValueError(f"q: N={N}, the masks were built for N={masks.N}")
    if blank_k is None or blank_v is None:
        raise ValueError("blank_k, blank_v: the flex peer needs the blank key and value")
    width = 2 * masks.R + 1
    if pe_table is not None and tuple(pe_table.shape) != (width * width, H):
        raise ValueError(f"pe_table: expected shape {(width * width, H)} for R={masks.R}, "
                         f"got {tuple(pe_table.shape)}")
    if not torch.is_grad_enabled():
        # FlexAttention on the CPU refuses inputs that require grad, even under no_grad.
        q, k, v, blank_k, blank_v = (t.detach() for t in (q, k, v, blank_k, blank_v))
        pe_table = pe_table.detach() if pe_table is not None else None
    kk = torch.cat([k, blank_k.to(k.dtype)[None, :, None, :].expand(B, H, 1, D)], dim=2)
    vv = torch.cat([v, blank_v.to(v.dtype)[None, :, None, :].expand(B, H, 1, D)], dim=2)
    score_mod = (make_score_mod(masks.pos, pe_table, N, masks.R) if pe_table is not None else None)
    scale = D ** -0.5 if scale is None else scale
    if compiled:
        return compiled_flex_attention()(q, kk, vv, score_mod=score_mod,
                                         block_mask=masks.block_mask, scale=scale)
    with warnings.catch_warnings():  # eager on purpose (the CPU, the tests): no advice needed
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        return _flex().flex_attention(q, kk, vv, score_mod=score_mod,
                                      block_mask=masks.block_mask, scale=scale)


def raise_recompile_limit(at_least: int = 64) -> None:
    """Each shape x dtype x (forward, forward+backward) compiles flex_attention anew; the
    default limit of 8 would end in an error (fullgraph) after a few shapes."""
    import torch._dynamo.config as cfg
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), at_least))


class FlexRunner:
    """bench.py's ``flex`` row: ``runner(x)`` with x carrying q, k, v, member_idx, mask, pos,
    R, pe_table, blank_k, blank_v, scale. The masks are built in the first call of each case
    (so first_call_s includes them; ``new_case`` starts one) and reused by the timed calls."""

    def __init__(self, *, compiled: bool, block_size: int = DEFAULT_BLOCK_SIZE,
                 method: str = "kv-blocks", cluster_size: int = 8):
        self.compiled, self.block_size, self.method, self.cs = compiled, block_size, method, cluster_size
        self.masks: FlexMasks | None = None
        self.pe_grad_reason: str | None = None
        if compiled:
            raise_recompile_limit()

    def new_case(self) -> None:
        self.masks = None

    def _build(self, x) -> FlexMasks:
        return build_masks(x.member_idx, x.mask, x.pos, x.R, cluster_size=self.cs,
                           block_size=self.block_size, method=self.method)

    def __call__(self, x):
        if self.masks is None:
            self.masks = self._build(x)
        pe = x.pe_table
        if self.pe_grad_reason is not None:
            pe = pe.detach()
        try:
            return self._attn(x, pe)
        except Exception as exc:
            if (not pe.requires_grad or not torch.is_grad_enabled()
                    or "out of memory" in str(exc).lower()):
                raise
            # A torch without gradients into captured score_mod tensors: run on, say so.
            self.pe_grad_reason = (f"no gradient into pe_table (captured by score_mod): "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            return self._attn(x, pe.detach())

    def _attn(self, x, pe):
        return flex_cluster_attention(x.q, x.k, x.v, self.masks, pe_table=pe, blank_k=x.blank_k,
                                      blank_v=x.blank_v, scale=x.scale, compiled=self.compiled)

    def after_first_call(self, x) -> dict:
        """The record's flex fields, after the case's first call: the block mask's method,
        size, build time in that call and warm (a rebuild, timed here), sparsity, memory."""
        m = self.masks
        if m is None:
            return {}
        warm = self._build(x).build_s
        fields = {"block_mask_method": m.method, "block_size": m.block_size,
                  "block_mask_s": round(m.build_s, 4), "block_mask_warm_s": round(warm, 4),
                  "block_sparsity_pct": round(m.sparsity_pct, 2),
                  "block_tiles": {"partial": m.partial_tiles, "full": m.full_tiles, "all": m.tiles},
                  "masks_mib": round(m.nbytes() / 2**20, 1), "compiled": self.compiled,
                  "kv_len": m.N + 1}
        if self.pe_grad_reason:
            fields["pe_grad"] = self.pe_grad_reason
        return fields
