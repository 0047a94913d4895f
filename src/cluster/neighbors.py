"""Neighbourhoods for cluster attention, built from token positions.

Cluster attention (AutoFocusFormer, "AFF", Ziwen et al., CVPR 2023) lets each token attend
to the tokens of a few nearby *clusters* instead of a fixed square window, so it works on
irregular point sets (AFF drops tokens adaptively, so the survivors no longer form a grid).
This module turns a batch of 2-D token positions into the index tensors the op
(``cluster.ops.cluster_attention``) and the module (``cluster.ClusterAttention``) consume.

Pipeline (``build_neighborhoods``)
----------------------------------
1. **Balanced clustering.** Tokens are sorted along a Hilbert curve over the ``h x w`` grid
   (``space_filling_order``) and cut into consecutive chunks of ``cluster_size`` tokens.
   A space-filling curve keeps nearby cells nearby in 1-D, so each chunk is spatially
   compact, and every cluster has the same size (the last one excepted), which is what
   makes the attention kernels regular. This is AFF's ``space_filling_cluster``-style
   reordering: after it, the tokens of a cluster are contiguous and cluster ``c`` holds
   reordered tokens ``c*cluster_size .. (c+1)*cluster_size - 1``.
2. **Nearest clusters, per token (AFF).** Each cluster's mean position is computed over
   its real tokens, and each *token* gets the ``nnc = nbhd_size // cluster_size`` cluster
   means nearest to its own position, nearest first (``knn``; torch or KeOps): AFF's
   ``nearest_cluster = knn(pos, cluster_mean_pos, nnc)``. The 8 tokens of a cluster
   therefore usually have different lists (their union is some 10 to 13 clusters).
   ``lists="cluster"`` is a cheaper variant that is *not* AFF's: the ``nnc`` clusters
   nearest to each cluster's mean (itself first), one list shared by the cluster's
   tokens; an AFF checkpoint evaluated with it sees other neighbours.
3. **Token neighbourhoods.** A token's list is the tokens of its ``nnc`` clusters, whole
   clusters in order, ``M = nnc * cluster_size`` of them (``member_idx``). When ``N`` is
   not a multiple of ``cluster_size`` the last cluster is short; the slots for its missing
   tokens point at a real token (``N - 1``, so gathers stay in range) and are marked
   invalid in ``cluster_mask``.
4. **Relative positions.** ``pe_idx`` indexes AFF's relative-position table
   (``relative_position_table``): the rounded offset ``(dx, dy)`` from query to neighbour,
   clamped to ``[-R, R]``, as row ``(dy + R) * (2R + 1) + (dx + R)``. The module embeds the
   table's (dx, dy, dist, sin, cos) columns with a linear layer to get a per-head bias.

All randomness (``make_synthetic_positions``) comes from a local ``torch.Generator``, so
results depend only on the seed, never on global RNG state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import keops_probe

__all__ = [
    "Neighborhoods",
    "build_neighborhoods",
    "knn",
    "make_synthetic_positions",
    "relative_position_table",
    "space_filling_order",
]

KNN_METHODS = ("auto", "torch", "keops")
# "aff": each token's own nearest clusters (AFF's); "cluster": one list per cluster.
LISTS = ("aff", "cluster")

# Upper bound on the elements of one chunk's [B, Qc, P] distance matrix in the torch kNN,
# so memory stays bounded whatever Q is (16M float64 = 128 MiB, twice while the y term is
# added).
_KNN_CHUNK_ELEMS = 1 << 24

_KEOPS_INSTALL_HINT = ("pykeops is not installed; install it with `pip install pykeops` "
                       "(or `pip install cluster-attention[keops]`); it needs a C++ compiler "
                       "(and nvcc for CUDA tensors)")


# --------------------------------------------------------------------------- helpers

def _check_int(name: str, value, minimum: int) -> int:
    # bool is an int subclass, and True as a cluster size is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _check_pos(name: str, pos, *, n_dims: int = 3) -> torch.Tensor:
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(pos).__name__}")
    if pos.dim() != n_dims or pos.shape[-1] != 2:
        raise ValueError(f"{name}: expected shape [B, N, 2], got {tuple(pos.shape)}")
    if not pos.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {pos.dtype}")
    return pos


# --------------------------------------------------------------------------- position table

def relative_position_table(R: int) -> torch.Tensor:
    """AFF's relative-position table: one row per integer offset in ``[-R, R]^2``.

    Row ``(dy + R) * (2R + 1) + (dx + R)`` holds ``(dx, dy, dist, sin, cos)`` with
    ``dist = sqrt(dx^2 + dy^2)``, ``sin = dy / dist``, ``cos = dx / dist``; the zero
    offset's 0/0 is replaced by 0, as AFF does. Returns float32 ``[(2R+1)^2, 5]``.
    """
    R = _check_int("R", R, 0)
    r = torch.arange(-R, R + 1, dtype=torch.float32)
    dy, dx = torch.meshgrid(r, r, indexing="ij")  # dy varies along rows: matches the row index
    dist = torch.sqrt(dx * dx + dy * dy)
    table = torch.stack([dx, dy, dist, dy / dist, dx / dist], dim=-1).reshape(-1, 5)
    return torch.nan_to_num(table, nan=0.0, posinf=0.0, neginf=0.0)


# --------------------------------------------------------------------------- synthetic positions

def make_synthetic_positions(B: int, N: int, h: int, w: int, *, seed: int = 0,
                             grid: bool = True) -> torch.Tensor:
    """``[B, N, 2]`` float32 token positions ``(x, y)`` on an ``h x w`` grid.

    Each batch element takes ``N`` distinct cells (a random subset when ``N < h*w``, as
    after AFF's token dropping) in random order, so the clustering has real work to do.
    ``grid=False`` adds a jitter inside each cell (strictly between the cell's integer
    corner and the next), so positions are not integers but still floor to their cell.
    Deterministic in ``seed``; the global RNG is not touched.
    """
    B = _check_int("B", B, 1)
    N = _check_int("N", N, 1)
    h = _check_int("h", h, 1)
    w = _check_int("w", w, 1)
    if N > h * w:
        raise ValueError(f"N: {N} tokens do not fit in distinct cells of a {h} x {w} grid "
                         f"({h * w} cells)")
    g = torch.Generator().manual_seed(int(seed))
    # One random permutation per batch element: its first N cells are a uniform random
    # subset, already in random (shuffled) order.
    cells = torch.argsort(torch.rand(B, h * w, generator=g), dim=1)[:, :N]
    pos = torch.stack([cells % w, cells // w], dim=-1).to(torch.float32)
    if not grid:
        # Kept inside [0.1, 0.9) of the cell: never exactly integer, never in the next cell.
        pos = pos + 0.1 + 0.8 * torch.rand(B, N, 2, generator=g)
    return pos


# --------------------------------------------------------------------------- space-filling curve

def _hilbert_index(x: torch.Tensor, y: torch.Tensor, order: int) -> torch.Tensor:
    """Distance along the Hilbert curve of a ``2^order`` square, vectorised (int64)."""
    n = 1 << order
    d = torch.zeros_like(x)
    s = n >> 1
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.long()) ^ ry.long())
        # Rotate the quadrant so the sub-curve is in standard orientation for the next bit.
        flip = (~ry) & rx
        x = torch.where(flip, n - 1 - x, x)
        y = torch.where(flip, n - 1 - y, y)
        swap = ~ry
        x, y = torch.where(swap, y, x), torch.where(swap, x, y)
        s >>= 1
    return d


def space_filling_order(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Permutation ``[B, N]`` sorting tokens along a Hilbert curve over the ``h x w`` grid.

    Positions are floored to their cell (and clamped into the grid, so slightly outside
    points still sort sensibly); tokens in the same cell keep their input order (stable
    sort), which makes the result deterministic. Cutting the sorted sequence into
    consecutive chunks of ``cluster_size`` gives balanced, spatially compact clusters.
    """
    pos = _check_pos("pos", pos)
    h = _check_int("h", h, 1)
    w = _check_int("w", w, 1)
    order = max(1, math.ceil(math.log2(max(h, w))))
    cell = torch.floor(pos.detach()).long()
    x = cell[..., 0].clamp(0, w - 1)
    y = cell[..., 1].clamp(0, h - 1)
    key = _hilbert_index(x, y, order)
    return torch.sort(key, dim=1, stable=True).indices


# --------------------------------------------------------------------------- kNN

def _keops_usable(device: torch.device) -> bool:
    """For ``method="auto"``: whether KeOps may be used on ``device``.

    Never calls KeOps in this process: the verdict comes from ``keops_probe.probe_keops``
    (a child process, cached per machine and software versions). pykeops not installed:
    False, silently. Installed but the probe failed (crash, error, timeout): False, with one
    ``KeOpsFallbackWarning`` per process and key.
    """
    if not keops_probe.keops_installed():
        return False
    res = keops_probe.probe_keops(device)
    if not res.ok:
        keops_probe.warn_fallback(res)
    return res.ok


def _keops_check(device: torch.device) -> None:
    """For ``method="keops"``: raise, rather than call a KeOps that would crash or fail."""
    if not keops_probe.keops_installed():
        raise ImportError(_KEOPS_INSTALL_HINT)
    res = keops_probe.probe_keops(device)
    if not res.ok:
        raise RuntimeError(f"knn(method='keops'): PyKeOps is unusable here, so it was not "
                           f"called. {res.describe()}. Use method='torch' or 'auto', or "
                           f"{keops_probe.REPROBE_HINT} once KeOps is fixed")


def _sq_dist(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``[B, Q, P]`` squared distances, computed per coordinate.

    Differences rather than ``|q|^2 - 2 q.p + |p|^2``: exact on integer grids, so ties stay
    ties and the index tie-break is meaningful. One coordinate at a time because
    broadcasting over a trailing dimension of 2 is several times slower on CPU.
    """
    d = q[:, :, None, 0] - p[:, None, :, 0]
    d.mul_(d)
    dy = q[:, :, None, 1] - p[:, None, :, 1]
    return d.addcmul_(dy, dy)


def _smallest_k(d: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest entries of each row of ``d``, ordered by (value, index).

    The exact fallback of ``_knn_torch`` for rows too long to pack the index into the
    distance's low bits. topk promises nothing about which of several equal values it
    returns, so topk only supplies the k-th smallest value; the set is then every entry
    below it plus the lowest-index entries equal to it, which is what a stable sort would
    pick. (Two host syncs per call: ``over.any()`` and ``nonzero``.)
    """
    kth = torch.topk(d, k, dim=-1, largest=False, sorted=False).values.amax(-1, keepdim=True)
    below = d < kth
    at = d == kth
    chosen = below | at
    over = chosen.sum(-1) > k  # rows with more ties at the k-th value than room for them
    if over.any():
        # Only those rows need the (costly, full-row) running count to keep the lowest indices.
        rows = over.nonzero(as_tuple=True)
        room = k - below[rows].sum(-1, keepdim=True)
        chosen[rows] = below[rows] | (at[rows] & (torch.cumsum(at[rows], dim=-1) <= room))
    # Exactly k per row, so the row-major nonzero list reshapes into [..., k], index order.
    idx = chosen.nonzero()[:, -1].view(*d.shape[:-1], k)
    perm = torch.sort(d.gather(-1, idx), dim=-1, stable=True).indices
    return idx.gather(-1, perm)


# The packed kNN keeps at least 52 - 24 = 28 of float64's mantissa bits; longer rows (over
# 2^24 points) take the exact, slower _smallest_k.
_KNN_PACK_MAX_BITS = 24


def _group_size(P: int, k: int, device_type: str) -> int:
    """Points per group of ``_knn_torch``'s two-stage selection, or 0 for one plain topk.

    About ``sqrt(P / k)`` (a power of two), which balances the first topk (over ``P / S``
    group minima) against the second (over ``k * S`` candidates); 0 when there would be
    fewer than ``2 k`` groups, where the stages would not save anything, and on the CPU,
    where topk is cheap next to the distances and the stages cost 15-40 % more.
    """
    if device_type != "cuda":
        return 0
    S = 1 << max(0, int(math.log2(math.sqrt(P / k))))
    return S if S >= 2 and -(-P // S) >= 2 * k else 0


def _knn_torch(queries, points, k, valid_points):
    """Chunked exact-difference distances, selected by ``topk`` on packed keys; no host syncs.

    Keys: a squared distance ``d >= 0`` in float64 orders like its bit pattern read as
    int64. The pattern's low ``b = bit_length(P' - 1)`` bits (mantissa bits; ``P'`` is ``P``
    padded to whole groups) are replaced by the point's index, so keys are unique and the
    ``k`` smallest keys, ascending, are the ``k`` nearest points by (distance, index); the
    index is read back from the low bits.
    Distances equal to within a relative ``2^(b-52)`` (4.5e-13 for P = 2048) count as ties:
    exact ties (integer grids, cluster means of them) stay ties and go to the lower index.
    Invalid points get ``d = inf``, so they follow every valid one, by index.

    Selection, exact, in two stages (``_group_size``): the points are cut into groups of
    ``S`` consecutive indices, and a group's key is ``(its minimum d, group index)``
    packed the same way, which orders groups like their smallest element keys (lower group,
    lower indices). The ``k`` nearest points lie in at most ``k`` groups, each with a
    minimum at most the ``k``-th nearest's key, so in the ``k`` groups of smallest key:
    one ``topk`` over ``P / S`` group keys, a gather of ``k * S`` candidates, a ``topk``
    over those (``topk`` over whole rows is the slow part on a GPU). Results are identical
    to one ``topk`` over whole rows.
    """
    B, Q, _ = queries.shape
    P = points.shape[1]
    q = queries.detach().double()
    p = points.detach().double()
    dev = q.device
    invalid = None if valid_points is None else ~valid_points[:, None, :]
    if max(1, (P - 1).bit_length()) > _KNN_PACK_MAX_BITS:
        chunk = max(1, _KNN_CHUNK_ELEMS // max(1, B * P))
        out = []
        for s in range(0, Q, chunk):
            d = _sq_dist(q[:, s:s + chunk], p)
            if invalid is not None:
                d.masked_fill_(invalid, math.inf)
            out.append(_smallest_k(d, k))
        return torch.cat(out, dim=1)
    S = _group_size(P, k, dev.type)
    G = -(-P // S) if S else 0
    Pp = G * S if S else P  # points padded to whole groups: padding at d = inf, last
    if Pp > P:
        p = torch.cat([p, p[:, :1].expand(B, Pp - P, 2)], dim=1)
        pad = torch.zeros(B, 1, Pp, dtype=torch.bool, device=dev)
        pad[..., P:] = True
        invalid = pad if invalid is None else torch.cat([invalid, pad[..., P:]], dim=-1)
    if S:
        # Slot-major columns: point g*S + s goes to column s*G + g, so a group's minimum is
        # a reduction over a strided dimension with G contiguous lanes (much faster on a GPU
        # than reducing S contiguous elements).
        p = p.view(B, G, S, 2).transpose(1, 2).reshape(B, Pp, 2)
        if invalid is not None:
            invalid = invalid.view(B, 1, G, S).transpose(-1, -2).reshape(B, 1, Pp)
    bits = max(1, (Pp - 1).bit_length())
    low = (1 << bits) - 1
    chunk = max(1, _KNN_CHUNK_ELEMS // max(1, B * Pp))
    index = torch.arange(Pp, dtype=torch.int64, device=dev)
    slot_col = index[:S] * G  # column offset of slot s
    out = torch.empty(B, Q, k, dtype=torch.int64, device=dev)
    for s in range(0, Q, chunk):
        d = _sq_dist(q[:, s:s + chunk], p)
        if invalid is not None:
            d.masked_fill_(invalid, math.inf)
        if S:
            c = d.shape[1]
            gkey = d.view(B, c, S, G).amin(2).view(torch.int64)
            gkey.bitwise_and_(~low).bitwise_or_(index[:G])
            g = torch.topk(gkey, k, dim=-1, largest=False, sorted=False).values
            g = g.bitwise_and_(low)[..., None]  # [B, c, k, 1] chosen groups
            cols = (g + slot_col).view(B, c, k * S)
            key = d.gather(-1, cols).view(torch.int64).bitwise_and_(~low)
            key.bitwise_or_((g * S + index[:S]).view(B, c, k * S))  # the points' own indices
        else:
            key = d.view(torch.int64).bitwise_and_(~low).bitwise_or_(index)
        top = torch.topk(key, k, dim=-1, largest=False, sorted=True).values
        out[:, s:s + chunk] = top.bitwise_and_(low)
    return out


def _knn_keops(queries, points, k, valid_points):
    q = queries.detach().to(torch.float32).contiguous()
    p = points.detach().to(torch.float32).contiguous()
    if valid_points is not None:
        # Moving invalid points far away (rather than adding inf) keeps KeOps' comparisons
        # finite; they can then only be chosen after every valid point.
        far = p.abs().amax() * 4 + 1e6
        p = torch.where(valid_points[..., None], p, far)
    idx = keops_probe.keops_argkmin(q, p, k)
    # KeOps' order among equal distances is unspecified; re-sort its picks by
    # (distance, index) so the output follows the same convention as the torch path.
    idx_sorted = torch.sort(idx, dim=-1).values
    dist = _sq_dist_pairs(queries.detach().double(), points.detach().double(), idx_sorted)
    if valid_points is not None:
        dist = dist.masked_fill(~valid_points.gather(1, idx_sorted.flatten(1)).view_as(idx_sorted),
                                math.inf)
    perm = torch.sort(dist, dim=-1, stable=True).indices
    return idx_sorted.gather(-1, perm)


def _sq_dist_pairs(q: torch.Tensor, p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Squared distance from each query to each of its ``idx`` points: ``[B, Q, k]``."""
    B, Q, k = idx.shape
    pts = p.gather(1, idx.reshape(B, Q * k, 1).expand(-1, -1, 2)).view(B, Q, k, 2)
    return (pts - q[:, :, None, :]).pow(2).sum(-1)


def knn(queries: torch.Tensor, points: torch.Tensor, k: int, method: str = "auto",
        valid_points: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``[B, Q, k]`` of each query's ``k`` nearest points, nearest first.

    Distance is squared Euclidean. On the torch path ties are broken by lower point index
    (exact-difference float64 distances; see ``_knn_torch`` for what counts as a tie), so
    the result is deterministic. Invalid points (``valid_points`` False) are never chosen
    before a valid one; if a row has fewer than ``k`` valid points, the remaining picks are
    invalid points.

    method: ``"torch"`` (chunked over queries, bounded memory, no host syncs in the loop),
    ``"keops"`` (``pykeops.torch.LazyTensor.argKmin``, computed in float32; its picks are
    then ordered by (distance, index), but which of several equidistant points at the k-th
    place it picks may differ from the torch path), or ``"auto"``: KeOps for CUDA tensors
    when pykeops is installed and ``cluster.keops_probe`` says it works, torch otherwise
    (on CPU always torch: as fast at these sizes, and no per-``k`` compile).

    KeOps is never called in this process before a probe in a *child* process has run it
    (PyKeOps' compile can segfault, e.g. 2.3 under CUDA 13, which no ``try`` survives); the
    verdict is cached per machine and software versions, in memory and in
    ``cluster.keops_probe.cache_dir()``. With a failed verdict, ``"auto"`` uses torch and
    says so once per process (``keops_probe.KeOpsFallbackWarning``), and ``"keops"`` raises
    ``RuntimeError`` with the verdict (``ImportError`` with an install hint when pykeops is
    not installed). Re-probe: ``CLUSTER_KEOPS_REPROBE=1``, ``keops_probe.probe_keops(device,
    refresh=True)`` or ``keops_probe.clear_cache()``.
    """
    queries = _check_pos("queries", queries)
    points = _check_pos("points", points)
    if queries.shape[0] != points.shape[0]:
        raise ValueError(f"points: batch size {points.shape[0]} differs from queries' "
                         f"{queries.shape[0]}")
    if queries.device != points.device:
        raise ValueError(f"points: on {points.device}, queries on {queries.device}")
    k = _check_int("k", k, 1)
    if k > points.shape[1]:
        raise ValueError(f"k: {k} exceeds the number of points ({points.shape[1]})")
    if method not in KNN_METHODS:
        raise ValueError(f"method: expected one of {KNN_METHODS}, got {method!r}")
    # NaN compares false with everything, which would break the tie-break's exact-k count.
    # One host sync for both checks; the message names the culprit only on failure.
    if not bool(torch.isfinite(queries).all() & torch.isfinite(points).all()):
        name = "queries" if not torch.isfinite(queries).all() else "points"
        raise ValueError(f"{name}: contains NaN or inf")
    if valid_points is not None:
        if not isinstance(valid_points, torch.Tensor) or valid_points.dtype != torch.bool:
            raise TypeError("valid_points: expected a bool tensor [B, P] or None")
        if tuple(valid_points.shape) != tuple(points.shape[:2]):
            raise ValueError(f"valid_points: expected shape {tuple(points.shape[:2])}, "
                             f"got {tuple(valid_points.shape)}")
        valid_points = valid_points.to(points.device)
    if queries.shape[1] == 0:
        return torch.empty(queries.shape[0], 0, k, dtype=torch.long, device=queries.device)
    if method == "auto":
        use_keops = queries.device.type == "cuda" and _keops_usable(queries.device)
        method = "keops" if use_keops else "torch"
    elif method == "keops":
        _keops_check(queries.device)
    if method == "keops":
        return _knn_keops(queries, points, k, valid_points)
    return _knn_torch(queries, points, k, valid_points)


# --------------------------------------------------------------------------- neighbourhoods

@dataclass
class Neighborhoods:
    """What ``build_neighborhoods`` returns; every index refers to the *reordered* tokens.

    order: ``[B, N]`` permutation applied to the input (``pos = pos_in.gather(1, order)``;
        apply the same to features before the attention and its inverse after).
    pos: ``[B, N, 2]`` positions in the new order.
    member_idx: ``[B, N, M]`` int64 neighbour tokens of each token, ``M = nnc*cluster_size``.
    cluster_mask: ``[B, N, M]`` bool, False for slots of the short last cluster's missing
        tokens (those slots point at token ``N - 1``).
    pe_idx: ``[B, N, M]`` int64 rows of ``relative_position_table(R)``.
    nearest_clusters: int64 cluster ids, nearest first: ``[B, N, nnc]`` per token for
        ``lists="aff"``; ``[B, NC, nnc]`` per cluster, its own id first, for ``"cluster"``.
    lists: ``"aff"`` or ``"cluster"``, as asked of ``build_neighborhoods``.
    """

    order: torch.Tensor
    pos: torch.Tensor
    member_idx: torch.Tensor
    cluster_mask: torch.Tensor
    pe_idx: torch.Tensor
    nearest_clusters: torch.Tensor
    cluster_size: int
    table_width: int
    R: int
    lists: str = "aff"

    @property
    def num_clusters(self) -> int:
        return -(-self.pos.shape[1] // self.cluster_size)

    @property
    def nnc(self) -> int:
        return self.nearest_clusters.shape[2]


def _self_first(nearest: torch.Tensor) -> torch.Tensor:
    """Put each cluster's own id first in its kNN list.

    On grids two clusters can share a mean, and then kNN may rank the other one first, or
    even leave the cluster itself out; AFF's convention (and the tests') is self first.
    """
    B, NC, k = nearest.shape
    own = torch.arange(NC, device=nearest.device).view(1, NC, 1)
    is_own = nearest == own
    # Rows that contain themselves: move it to the front, the rest keep their order.
    moved = nearest.gather(-1, torch.sort((~is_own).to(torch.int8), dim=-1, stable=True).indices)
    # Rows that do not (an equidistant cluster took its place): prepend, drop the farthest.
    prepended = torch.cat([own.expand(B, NC, 1), nearest[..., :-1]], dim=-1)
    return torch.where(is_own.any(-1, keepdim=True), moved, prepended)


def build_neighborhoods(pos: torch.Tensor, cluster_size: int, nbhd_size: int, h: int, w: int,
                        *, R: int | None = None, knn_method: str = "auto",
                        lists: str = "aff") -> Neighborhoods:
    """Cluster tokens and build each token's neighbourhood (see the module docstring).

    Args:
        pos: ``[B, N, 2]`` float positions ``(x, y)`` on an ``h x w`` grid (not
            necessarily integer; cells are ``floor(pos)``).
        cluster_size: tokens per cluster (>= 1; 1 makes every token its own cluster).
        nbhd_size: neighbours per token, a positive multiple of ``cluster_size``; the
            ``nbhd_size // cluster_size`` nearest clusters are used.
        h, w: grid size, for the space-filling curve and the default ``R``.
        R: half-width of the relative-position table; default ``max(h, w) - 1`` (covers
            every offset on the grid). Offsets beyond ``R`` are clamped to ``[-R, R]``
            (they share the table's edge rows) rather than rejected, as AFF does when its
            table is smaller than the image.
        knn_method: ``"auto" | "torch" | "keops"``, see ``knn``.
        lists: ``"aff"`` (default): each token's own ``nnc`` nearest cluster means, as AFF
            and AFF-MAE build them; ``"cluster"``: one list per cluster (the clusters
            nearest to its mean, itself first), shared by its tokens: cheaper, not AFF's.
    """
    pos = _check_pos("pos", pos)
    cluster_size = _check_int("cluster_size", cluster_size, 1)
    if isinstance(nbhd_size, bool) or not isinstance(nbhd_size, int):
        raise TypeError(f"nbhd_size: expected an int, got {type(nbhd_size).__name__}")
    h = _check_int("h", h, 1)
    w = _check_int("w", w, 1)
    R = max(h, w) - 1 if R is None else _check_int("R", R, 0)
    if knn_method not in KNN_METHODS:
        raise ValueError(f"knn_method: expected one of {KNN_METHODS}, got {knn_method!r}")
    if lists not in LISTS:
        raise ValueError(f"lists: expected one of {LISTS}, got {lists!r}")
    B, N, _ = pos.shape
    if N == 0:
        raise ValueError("pos: expected at least one token (N >= 1)")
    if not torch.isfinite(pos).all():
        raise ValueError("pos: contains NaN or inf")
    NC = -(-N // cluster_size)
    if nbhd_size < 1 or nbhd_size % cluster_size != 0:
        raise ValueError(f"nbhd_size: expected a positive multiple of cluster_size "
                         f"({cluster_size}), got {nbhd_size}")
    nnc = nbhd_size // cluster_size
    if nnc > NC:
        raise ValueError(f"nbhd_size: {nbhd_size} needs {nnc} clusters of {cluster_size}, "
                         f"but N={N} tokens make only {NC}")
    dev = pos.device
    cs = cluster_size

    # 1. balanced clustering along the curve
    order = space_filling_order(pos, h, w)
    pos_s = pos.gather(1, order[..., None].expand(-1, -1, 2))

    # 2. cluster means over real tokens only (a short last cluster's padding left out)
    pad = NC * cs - N
    padded = torch.cat([pos_s.detach().double(), pos_s.new_zeros(B, pad, 2, dtype=torch.float64)],
                       dim=1)
    counts = torch.full((NC,), float(cs), dtype=torch.float64, device=dev)
    counts[-1] = cs - pad
    means = padded.view(B, NC, cs, 2).sum(2) / counts[None, :, None]
    M = nnc * cs
    width = 2 * R + 1
    # float32 holds the row index exactly while the table has < 2^24 rows; beyond, float64.
    fdt = torch.float32 if width * width < (1 << 24) else torch.float64
    ps = pos_s.detach().to(fdt)
    slot = torch.arange(cs, device=dev)

    if lists == "aff":
        # 3. each token's own nearest clusters; their whole clusters are its list.
        nearest = knn(pos_s, means, nnc, method=knn_method)  # [B, N, nnc]
        members = (nearest[..., None] * cs + slot).reshape(B, N, M)
        cluster_mask = members < N
        member_idx = members.clamp_(max=N - 1)
    else:
        # 3. one list per cluster, built per cluster and broadcast over its tokens.
        nearest = _self_first(knn(means, means, nnc, method=knn_method))  # [B, NC, nnc]
        members = (nearest[..., None] * cs + slot).reshape(B, NC, M)
        valid = members < N
        members.clamp_(max=N - 1)

        def per_token(t):
            return t[:, :, None, :].expand(B, NC, cs, M).reshape(B, NC * cs, M)[:, :N].contiguous()

        member_idx = per_token(members)
        cluster_mask = per_token(valid)

    # 4. relative-position indices (also for masked slots, so every index is a valid row)
    nb_pos = ps.gather(1, member_idx.view(B, N * M, 1).expand(-1, -1, 2)).view(B, N, M, 2)
    off = (nb_pos - ps[:, :, None, :]).round_().clamp_(-R, R)  # [B, N, M, 2]
    pe_idx = off[..., 1].mul_(width).add_(off[..., 0]).add_(R * width + R).long()

    return Neighborhoods(
        order=order, pos=pos_s, member_idx=member_idx, cluster_mask=cluster_mask,
        pe_idx=pe_idx, nearest_clusters=nearest, cluster_size=cs, table_width=width, R=R,
        lists=lists,
    )
