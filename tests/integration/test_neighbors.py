"""cluster.neighbors: position table, synthetic positions, clustering, kNN, neighbourhoods."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest
import torch

from cluster import keops_probe
from cluster import neighbors as nbr

HAS_KEOPS = importlib.util.find_spec("pykeops") is not None


def _build(B=3, N=128, h=12, w=11, cs=8, nbhd=32, seed=0, grid=True, lists="cluster", **kw):
    # The shared per-cluster lists; AFF's per-token lists: test_neighborhood_lists.py.
    pos = nbr.make_synthetic_positions(B, N, h, w, seed=seed, grid=grid)
    return pos, nbr.build_neighborhoods(pos, cs, nbhd, h, w, knn_method="torch", lists=lists, **kw)


# --------------------------------------------------------------------------- table

def test_relative_position_table_values():
    R = 3
    W = 2 * R + 1
    t = nbr.relative_position_table(R)
    assert t.shape == (W * W, 5) and t.dtype == torch.float32
    assert torch.isfinite(t).all()

    def row(dx, dy):
        return t[(dy + R) * W + (dx + R)].tolist()

    assert row(0, 0) == [0.0, 0.0, 0.0, 0.0, 0.0]
    assert row(1, 0) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert row(0, -2) == [0.0, -2.0, 2.0, -1.0, 0.0]
    assert row(-3, 3) == pytest.approx([-3.0, 3.0, 3 * math.sqrt(2), 2**-0.5, -(2**-0.5)])
    assert nbr.relative_position_table(0).tolist() == [[0.0] * 5]
    with pytest.raises(ValueError, match="R"):
        nbr.relative_position_table(-1)


# --------------------------------------------------------------------------- positions

def test_synthetic_positions_distinct_integer_cells():
    B, N, h, w = 4, 100, 9, 13
    pos = nbr.make_synthetic_positions(B, N, h, w, seed=3)
    assert pos.shape == (B, N, 2) and pos.dtype == torch.float32
    assert torch.equal(pos, pos.round())
    assert (pos[..., 0] >= 0).all() and (pos[..., 0] < w).all()
    assert (pos[..., 1] >= 0).all() and (pos[..., 1] < h).all()
    cells = pos[..., 1] * w + pos[..., 0]
    for b in range(B):
        assert cells[b].unique().numel() == N
    # Shuffled, not in raster order; and a subset differing between batch elements.
    assert not torch.equal(cells[0], cells[0].sort().values)
    assert not torch.equal(cells[0].sort().values, cells[1].sort().values)


def test_synthetic_positions_jitter_and_errors():
    pos = nbr.make_synthetic_positions(2, 50, 8, 8, seed=1, grid=False)
    assert (pos != pos.round()).all()
    cells = pos.floor()
    assert (cells[..., 1] * 8 + cells[..., 0]).unique(dim=1).shape[1] == 50
    full = nbr.make_synthetic_positions(1, 64, 8, 8, seed=0)
    assert (full[0, :, 1] * 8 + full[0, :, 0]).sort().values.tolist() == list(range(64))
    with pytest.raises(ValueError, match="N"):
        nbr.make_synthetic_positions(1, 65, 8, 8)


def test_determinism_and_no_global_rng():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = nbr.make_synthetic_positions(2, 60, 9, 9, seed=5, grid=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = nbr.make_synthetic_positions(2, 60, 9, 9, seed=5, grid=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, nbr.make_synthetic_positions(2, 60, 9, 9, seed=6, grid=False))
    _, n1 = _build(seed=2)
    _, n2 = _build(seed=2)
    for f in ("order", "pos", "member_idx", "cluster_mask", "pe_idx", "nearest_clusters"):
        assert torch.equal(getattr(n1, f), getattr(n2, f)), f


# --------------------------------------------------------------------------- clustering

def _mean_intra_cluster_dist(pos, cs):
    B, N, _ = pos.shape
    c = pos[:, : N // cs * cs].reshape(B, -1, cs, 2)
    return torch.cdist(c, c).mean().item()


def test_space_filling_order_is_compact_permutation():
    B, N, h, w, cs = 4, 256, 20, 20, 8
    pos = nbr.make_synthetic_positions(B, N, h, w, seed=0)
    order = nbr.space_filling_order(pos, h, w)
    assert order.shape == (B, N) and order.dtype == torch.int64
    for b in range(B):
        assert torch.equal(order[b].sort().values, torch.arange(N))
    sorted_pos = pos.gather(1, order[..., None].expand(-1, -1, 2))
    curve = _mean_intra_cluster_dist(sorted_pos, cs)
    shuffled = _mean_intra_cluster_dist(pos, cs)
    assert curve < 0.3 * shuffled, (curve, shuffled)
    # On a full power-of-two grid a Hilbert curve moves one cell at a time.
    full = nbr.make_synthetic_positions(1, 64, 8, 8, seed=0)
    fs = full.gather(1, nbr.space_filling_order(full, 8, 8)[..., None].expand(-1, -1, 2))
    steps = (fs[0, 1:] - fs[0, :-1]).abs().sum(-1)
    assert (steps == 1).all()


def test_space_filling_order_ties_are_stable():
    pos = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [1.2, 1.7], [1.0, 1.0]]])
    order = nbr.space_filling_order(pos, 2, 2)
    same_cell = [i for i in order[0].tolist() if i != 1]
    assert same_cell == [0, 2, 3]


# --------------------------------------------------------------------------- kNN

def test_knn_torch_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 10, (3, 40, 2), generator=g).float()  # integer grid: many ties
    p = torch.randint(0, 10, (3, 70, 2), generator=g).float()
    k = 9
    idx = nbr.knn(q, p, k, method="torch")
    assert idx.shape == (3, 40, k) and idx.dtype == torch.int64
    d = torch.cdist(q.double(), p.double()) ** 2
    got = d.gather(-1, idx)
    ref = d.topk(k, largest=False).values
    assert torch.allclose(got, ref)
    # The tie-break: exactly what a stable sort of the distances picks.
    exact = ((q[:, :, None].double() - p[:, None].double()) ** 2).sum(-1)
    assert torch.equal(idx, exact.sort(dim=-1, stable=True).indices[..., :k])


def test_knn_chunking_and_valid_points(monkeypatch):
    g = torch.Generator().manual_seed(1)
    q = torch.rand(2, 33, 2, generator=g) * 5
    p = torch.rand(2, 20, 2, generator=g) * 5
    full = nbr.knn(q, p, 4, method="torch")
    monkeypatch.setattr(nbr, "_KNN_CHUNK_ELEMS", 7)
    assert torch.equal(nbr.knn(q, p, 4, method="torch"), full)
    valid = torch.rand(2, 20, generator=g) > 0.5
    idx = nbr.knn(q, p, 4, method="torch", valid_points=valid)
    n_valid = valid.sum(-1)
    for b in range(2):
        picked_valid = valid[b][idx[b]]
        m = min(4, int(n_valid[b]))
        assert picked_valid[:, :m].all()


def _stable_knn(q, p, k, valid=None):
    # Brute force: exact float64 distances, invalid points at inf, stable sort (index ties).
    d = ((q[:, :, None].double() - p[:, None].double()) ** 2).sum(-1)
    if valid is not None:
        d = d.masked_fill(~valid[:, None, :], math.inf)
    return d.sort(dim=-1, stable=True).indices[..., :k]


@pytest.mark.parametrize("path", ["grouped", "S=2", "S=3", "plain", "exact"])
def test_knn_torch_paths_tie_break_by_index(path, monkeypatch):
    # Every torch path gives exactly what a stable sort gives, invalid points included
    # (last, by index): the two-stage selection (groups of S points; 3 leaves a short last
    # group, padded), one topk over whole rows, and the exact _smallest_k for long rows.
    if path == "exact":
        monkeypatch.setattr(nbr, "_KNN_PACK_MAX_BITS", 0)
    elif path == "plain":
        monkeypatch.setattr(nbr, "_group_size", lambda P, k, dev: 0)
    else:  # the CPU's default is "plain"; force the GPU's two stages
        S = 4 if path == "grouped" else int(path[2:])  # grouped: 4 as the GPU would pick
        assert path != "grouped" or nbr._group_size(37, 2, "cuda") == 4
        monkeypatch.setattr(nbr, "_group_size", lambda P, k, dev: S if 2 * k <= P // 3 else 0)
    g = torch.Generator().manual_seed(2)
    q = torch.randint(0, 6, (2, 50, 2), generator=g).float()
    p = torch.randint(0, 6, (2, 37, 2), generator=g).double()  # float64, as the means are
    valid = torch.rand(2, 37, generator=g) > 0.7
    for k in (1, 2, 5, 37):
        assert torch.equal(nbr.knn(q, p, k, method="torch"), _stable_knn(q, p, k))
        assert torch.equal(nbr.knn(q, p, k, method="torch", valid_points=valid),
                           _stable_knn(q, p, k, valid))
    monkeypatch.setattr(nbr, "_KNN_CHUNK_ELEMS", 100)  # several chunks, 1 query per chunk
    assert torch.equal(nbr.knn(q, p, 5, method="torch", valid_points=valid),
                       _stable_knn(q, p, 5, valid))
    # Jittered positions, cluster-mean-like points: no ties, the same order as exact.
    qj = nbr.make_synthetic_positions(2, 200, 15, 15, seed=4, grid=False)
    pj = qj.double().view(2, 25, 8, 2).mean(2)
    assert torch.equal(nbr.knn(qj, pj, 6, method="torch"), _stable_knn(qj, pj, 6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_knn_torch_cuda_matches_cpu():
    pos = nbr.make_synthetic_positions(4, 2048, 46, 45, seed=1)
    means = pos.double().view(4, 256, 8, 2).mean(2)
    want = nbr.knn(pos, means, 8, method="torch")
    assert torch.equal(nbr.knn(pos.cuda(), means.cuda(), 8, method="torch").cpu(), want)
    g = nbr.make_synthetic_positions(2, 300, 20, 20, seed=3)  # integer grid: many ties
    assert torch.equal(nbr.knn(g.cuda(), g.cuda(), 9, method="torch").cpu(),
                       _stable_knn(g, g, 9))


def test_knn_errors():
    x = torch.rand(1, 5, 2)
    with pytest.raises(ValueError, match="k"):
        nbr.knn(x, x, 6, method="torch")
    with pytest.raises(ValueError, match="method"):
        nbr.knn(x, x, 2, method="faiss")
    with pytest.raises(ValueError, match="points"):
        nbr.knn(x, torch.rand(2, 5, 2), 2, method="torch")
    with pytest.raises(TypeError, match="queries"):
        nbr.knn(x.long(), x, 2, method="torch")


def test_knn_keops_missing_raises_with_hint(monkeypatch):
    # A None entry in sys.modules makes the import fail as if pykeops were not installed.
    monkeypatch.setitem(sys.modules, "pykeops", None)
    monkeypatch.setitem(sys.modules, "pykeops.torch", None)
    x = torch.rand(1, 5, 2)
    with pytest.raises(ImportError, match="pip install pykeops"):
        nbr.knn(x, x, 2, method="keops")
    # "auto" never fails for want of KeOps.
    assert nbr.knn(x, x, 2, method="auto").shape == (1, 5, 2)


@pytest.mark.skipif(not HAS_KEOPS, reason="pykeops not installed")
@pytest.mark.parametrize("dev", ["cpu", "cuda"])
def test_knn_keops_matches_torch_distances(dev, tmp_path_factory, monkeypatch):
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    # Compiled formulas go to a scratch folder unless the user chose one (read at import);
    # the probe's verdict to one of this session's, not to the user's cache.
    if "KEOPS_CACHE_FOLDER" not in os.environ:
        monkeypatch.setenv("KEOPS_CACHE_FOLDER", str(tmp_path_factory.mktemp("keops")))
    monkeypatch.setenv("CLUSTER_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cluster-cache"))
    # Ask the crash-safe probe first: where KeOps would segfault (PyKeOps 2.3 under CUDA 13)
    # or cannot compile, skip with its verdict rather than lose the worker.
    verdict = keops_probe.probe_keops(dev)
    if not verdict.ok:
        pytest.skip(verdict.describe())
    pos = nbr.make_synthetic_positions(2, 90, 10, 10, seed=0).to(dev)
    q = pos[:, :30]
    ik = nbr.knn(q, pos, 6, method="keops")
    it = nbr.knn(q, pos, 6, method="torch")
    d = torch.cdist(q.double(), pos.double(), compute_mode="donot_use_mm_for_euclid_dist") ** 2
    assert torch.equal(d.gather(-1, ik), d.gather(-1, it))
    # Ordering convention: ascending distance, ties by index.
    dk = d.gather(-1, ik)
    assert (dk[..., 1:] >= dk[..., :-1]).all()
    same = dk[..., 1:] == dk[..., :-1]
    assert (ik[..., 1:] > ik[..., :-1])[same].all()
    # Same k (6 clusters of 8) so KeOps reuses the formula compiled above.
    valid = torch.arange(90, device=dev).expand(2, 90) % 3 != 0
    ik = nbr.knn(q, pos, 6, method="keops", valid_points=valid)
    it = nbr.knn(q, pos, 6, method="torch", valid_points=valid)
    assert valid.gather(1, ik.flatten(1)).all()
    assert torch.equal(d.gather(-1, ik), d.gather(-1, it))
    nk = nbr.build_neighborhoods(pos, 8, 48, 10, 10, knn_method="keops", lists="cluster")
    nt = nbr.build_neighborhoods(pos, 8, 48, 10, 10, knn_method="torch", lists="cluster")
    assert torch.equal(nk.order, nt.order)
    means = nt.pos[:, :88].reshape(2, 11, 8, 2).double().mean(2)
    means = torch.cat([means, nt.pos[:, 88:].double().mean(1, keepdim=True)], dim=1)
    dc = torch.cdist(means, means) ** 2
    assert torch.allclose(dc.gather(-1, nk.nearest_clusters), dc.gather(-1, nt.nearest_clusters))
    assert (nk.nearest_clusters[..., 0] == torch.arange(12, device=dev)).all()


# --------------------------------------------------------------------------- neighbourhoods

@pytest.mark.parametrize("N,cs,nbhd", [(128, 8, 32), (61, 8, 24), (37, 1, 5), (100, 4, 40)])
def test_neighborhood_structure(N, cs, nbhd):
    B, h, w = 3, 8, 16
    pos, nb = _build(B=B, N=N, h=h, w=w, cs=cs, nbhd=nbhd)
    NC, nnc = -(-N // cs), nbhd // cs
    M = nbhd
    assert nb.member_idx.shape == nb.cluster_mask.shape == nb.pe_idx.shape == (B, N, M)
    assert nb.member_idx.dtype == nb.pe_idx.dtype == torch.int64
    assert nb.cluster_mask.dtype == torch.bool
    assert nb.nearest_clusters.shape == (B, NC, nnc)
    assert nb.table_width == 2 * nb.R + 1 and nb.R == max(h, w) - 1 and nb.cluster_size == cs
    assert torch.equal(nb.pos, pos.gather(1, nb.order[..., None].expand(-1, -1, 2)))
    assert (nb.member_idx >= 0).all() and (nb.member_idx < N).all()
    assert (nb.pe_idx >= 0).all() and (nb.pe_idx < nb.table_width**2).all()
    # Each cluster's nearest cluster is itself, and its clusters are distinct.
    assert torch.equal(nb.nearest_clusters[..., 0], torch.arange(NC).expand(B, NC))
    assert (nb.nearest_clusters.sort(-1).values.diff(dim=-1) > 0).all()
    tok_cluster = torch.arange(N) // cs
    for n in range(N):
        c = tok_cluster[n]
        own = torch.arange(c * cs, min((c + 1) * cs, N))
        assert torch.equal(nb.member_idx[:, n, : own.numel()], own.expand(B, -1))
        assert torch.equal(nb.member_idx[:, n], nb.member_idx[:, c * cs])  # shared by cluster
        assert torch.equal(nb.cluster_mask[:, n], nb.cluster_mask[:, c * cs])
    # member_idx is exactly the tokens of nearest_clusters (padding aside).
    slots = (nb.nearest_clusters[:, tok_cluster, :, None] * cs + torch.arange(cs)).flatten(2)
    assert torch.equal(nb.cluster_mask, slots < N)
    assert torch.equal(nb.member_idx, slots.clamp(max=N - 1))


def test_nearest_clusters_are_nearest_by_mean():
    _, nb = _build(B=2, N=96, h=10, w=10, cs=8, nbhd=32)
    means = nb.pos.view(2, 12, 8, 2).double().mean(2)
    d = torch.cdist(means, means) ** 2
    got = d.gather(-1, nb.nearest_clusters)
    assert torch.allclose(got, d.topk(4, largest=False).values)


def test_pe_idx_decodes_to_rounded_offsets():
    for grid, R in ((True, None), (False, None), (False, 2)):
        pos, nb = _build(B=2, N=80, h=9, w=10, cs=8, nbhd=40, grid=grid, R=R)
        W, R_ = nb.table_width, nb.R
        dx = nb.pe_idx % W - R_
        dy = nb.pe_idx // W - R_
        B, N, M = nb.member_idx.shape
        nbp = nb.pos.gather(1, nb.member_idx.view(B, -1, 1).expand(-1, -1, 2)).view(B, N, M, 2)
        off = (nbp - nb.pos[:, :, None]).round().clamp(-R_, R_)
        assert torch.equal(dx.float(), off[..., 0]) and torch.equal(dy.float(), off[..., 1])
        if R == 2:
            assert (dx.abs() == 2).any()  # clamping actually happened
        # The table row at pe_idx holds that same offset.
        table = nbr.relative_position_table(R_)
        assert torch.equal(table[nb.pe_idx][..., :2], off)


def test_padding_last_cluster_masked():
    N, cs = 61, 8
    _, nb = _build(B=3, N=N, h=8, w=8, cs=cs, nbhd=32)
    last = (N - 1) // cs  # cluster 7: tokens 56..60 real, 3 slots padded
    B, NC, nnc = nb.nearest_clusters.shape
    tok_cluster = torch.arange(N) // cs
    for b in range(B):
        for n in range(N):
            for j, c in enumerate(nb.nearest_clusters[b, tok_cluster[n]].tolist()):
                mask = nb.cluster_mask[b, n, j * cs:(j + 1) * cs]
                idx = nb.member_idx[b, n, j * cs:(j + 1) * cs]
                if c == last:
                    assert mask.tolist() == [True] * 5 + [False] * 3
                    assert idx.tolist() == [56, 57, 58, 59, 60, 60, 60, 60]
                else:
                    assert mask.all()
    # The short cluster's mean uses only its 5 real tokens: it is its own nearest.
    assert (nb.nearest_clusters[:, last, 0] == last).all()
    appearances = int((nb.nearest_clusters[:, tok_cluster] == last).sum())
    assert int((~nb.cluster_mask).sum()) == 3 * appearances


def test_build_neighborhoods_errors():
    pos = nbr.make_synthetic_positions(1, 64, 8, 8)
    for bad in (0, 12, -8):
        with pytest.raises(ValueError, match="nbhd_size"):
            nbr.build_neighborhoods(pos, 8, bad, 8, 8, knn_method="torch")
    with pytest.raises(ValueError, match="nbhd_size"):
        nbr.build_neighborhoods(pos, 8, 72, 8, 8, knn_method="torch")  # 9 clusters of 8 > 8
    with pytest.raises(TypeError, match="nbhd_size"):
        nbr.build_neighborhoods(pos, 8, 32.0, 8, 8)
    with pytest.raises(ValueError, match="cluster_size"):
        nbr.build_neighborhoods(pos, 0, 32, 8, 8)
    with pytest.raises(TypeError, match="cluster_size"):
        nbr.build_neighborhoods(pos, True, 32, 8, 8)
    with pytest.raises(ValueError, match="pos"):
        nbr.build_neighborhoods(pos[0], 8, 32, 8, 8)
    with pytest.raises(TypeError, match="pos"):
        nbr.build_neighborhoods(pos.long(), 8, 32, 8, 8)
    with pytest.raises(ValueError, match="pos"):
        nbr.build_neighborhoods(pos.clone().fill_(float("nan")), 8, 32, 8, 8)
    with pytest.raises(ValueError, match="knn_method"):
        nbr.build_neighborhoods(pos, 8, 32, 8, 8, knn_method="ball_tree")
    with pytest.raises(ValueError, match="R"):
        nbr.build_neighborhoods(pos, 8, 32, 8, 8, R=-1)
    with pytest.raises(ValueError, match="lists"):
        nbr.build_neighborhoods(pos, 8, 32, 8, 8, lists="token")
