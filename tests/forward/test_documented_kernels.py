"""Triton kernel behaviour that one chunk of slots cannot show (issue 32, survivors of
``nox -s mutants``): weighted_features over lists longer than one chunk."""

from __future__ import annotations

import pytest
import torch

from cluster import ops, reference

from .. import _triton

_DEV, _WHY = _triton.DEV, _triton.WHY
pytestmark = _triton.PYTESTMARK

if _WHY is None:
    from cluster.triton_kernels import weighted


@pytest.mark.parametrize("dims", [(2, 20, 30, 40, 2, 80), (1, 9, 50, 67, 1, 24)],
                         ids=["m40_c80", "m67_c24"])
def test_weighted_features_sums_every_chunk_of_slots(dims):
    B, N, Nf, M, W, C = dims
    _, slots, _ = weighted._wf_blocks(C, M, torch.float32)
    assert slots < M  # several chunks per row
    g = torch.Generator().manual_seed(17)
    w = torch.randn(B, N, M, W, generator=g, dtype=torch.float64)
    f = torch.randn(B, Nf, C, generator=g, dtype=torch.float64)
    idx = torch.randint(0, Nf, (B, N, M), generator=g)
    ref = reference.weighted_features(w, f, idx)
    # the loop definition, independent of the reference's gather and einsum
    loop = torch.zeros(B, N, W, C, dtype=torch.float64)
    for j in range(M):
        loop += w[:, :, j, :, None] * torch.stack([f[b, idx[b, :, j]] for b in range(B)])[:, :, None]
    torch.testing.assert_close(ref, loop, rtol=1e-12, atol=1e-12)
    out = ops.weighted_features(w.to(_DEV), f.to(_DEV), idx.to(_DEV), backend="triton")
    torch.testing.assert_close(out.cpu(), loop, rtol=1e-12, atol=1e-12)
    out32 = ops.weighted_features(w.float().to(_DEV), f.float().to(_DEV), idx.int().to(_DEV),
                                  backend="triton")
    torch.testing.assert_close(out32.cpu().double(), loop, rtol=1e-4, atol=1e-4)
