"""The Gluon float32 forward (cluster.triton_kernels.gluon_forward) and its dispatch.

The kernel itself runs on a GPU only (Gluon has no CPU interpreter); there it is checked
against the float64 reference, against the triton FMA path (outputs and log-sum-exp), and
through the backward. The dispatch rules run everywhere.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from cluster import ops, reference, testing
from cluster.testing import random_case

from .. import _triton

_DEV, _WHY = _triton.DEV, _triton.WHY
pytestmark = _triton.PYTESTMARK
if _WHY is None:
    from cluster.triton_kernels import forward, gluon_forward, launch, tuning

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="Gluon kernels need a GPU")


@pytest.mark.parametrize("D,M,want", [
    (32, 64, (32, 32)), (32, 48, (32, 32)), (32, 32, (32, 32)), (12, 7, (32, 32)),
    (64, 70, (32, 64)), (33, 65, (32, 64)), (65, 64, None), (128, 16, None), (32, 0, None),
    (32, 256, (32, 32)), (32, 257, None),
])
def test_blocks(D, M, want):
    assert gluon_forward.blocks(D, M) == want


def test_dispatch(monkeypatch):
    # float32 on a GPU with Triton >= 3.6 and TUNING_GLUON on, D <= 64, a bias table that
    # int32 offsets reach.
    monkeypatch.setattr(launch, "_INTERPRET", False)
    monkeypatch.setattr(launch, "_TRITON_RELEASE", (3, 6))
    with tuning.override(TUNING_GLUON={"fwd": True}):
        assert forward._gluon_blocks(32, 64, torch.float32) == (32, 32)
        assert forward._gluon_blocks(32, 64, torch.float32, pe_span=2**31 - 1) == (32, 32)
        assert forward._gluon_blocks(32, 64, torch.float32, pe_span=2**31) is None
        assert forward._gluon_blocks(128, 64, torch.float32) is None
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            assert forward._gluon_blocks(32, 64, dtype) is None
        with tuning.override(TUNING_GLUON={"fwd": False}):
            assert forward._gluon_blocks(32, 64, torch.float32) is None
        monkeypatch.setattr(launch, "_TRITON_RELEASE", (3, 5))
        assert forward._gluon_blocks(32, 64, torch.float32) is None
        monkeypatch.setattr(launch, "_TRITON_RELEASE", (3, 6))
        monkeypatch.setattr(launch, "_INTERPRET", True)
        assert forward._gluon_blocks(32, 64, torch.float32) is None


@pytest.mark.skipif(_WHY is not None or gluon_forward.gluon is None,
                    reason="this Triton has no Gluon")
def test_newer_triton_takes_the_fma_kernel_with_a_warning(monkeypatch):
    """A Triton past the Gluon API the kernel was built against (3.9 removed a call it
    uses) must never fail in a user's step: the float32 forward falls back and says so."""
    import warnings

    monkeypatch.setattr(launch, "_INTERPRET", False)
    last = gluon_forward.MAX_TRITON
    monkeypatch.setattr(launch, "_TRITON_RELEASE", last)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert forward._gluon_blocks(32, 64, torch.float32) == (32, 32)
    monkeypatch.setattr(launch, "_TRITON_RELEASE", (last[0], last[1] + 1))
    with pytest.warns(RuntimeWarning, match="FMA group kernel"):
        assert forward._gluon_blocks(32, 64, torch.float32) is None
    assert not gluon_forward.available((3, 9)) and gluon_forward.untested_release((3, 9))
    assert gluon_forward.available((3, 6)) and gluon_forward.available((3, 8))


class _Spy:
    """Counts launches of a kernel and passes them on."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def gluon_on(monkeypatch):
    """The Gluon forward, its launches counted."""
    spy = _Spy(forward._attn_fwd_gluon_kernel)
    monkeypatch.setattr(forward, "_attn_fwd_gluon_kernel", spy)
    return spy


def _args(c):
    return (c["q"], c["k"], c["v"], c["member_idx"], c["pe_table"], c["pe_idx"], c["mask"],
            c["blank_k"], c["blank_v"])


def _fp32(c):
    return {n: (t.float() if t is not None and t.is_floating_point() else t)
            for n, t in c.items()}


# (B, H, N, D, M) and the case's options: shared lists, broken groups (every other group
# strays), one chunk of 32 slots or several (up to 3), D under 32 (columns past D masked),
# D = 64 (two 32-column blocks), N not a multiple of 8, rows with nothing valid, and one
# head with one chunk (random_lists: the head loop Triton 3.6 folded and then failed to
# compile).
CASES = [
    pytest.param((2, 3, 64, 32, 64), dict(group=8), id="shared_m64"),
    pytest.param((2, 2, 61, 32, 48), dict(group=8, stray_every=2), id="strays_m48"),
    pytest.param((1, 2, 45, 12, 70), dict(group=8, empty_rows=True), id="chunks_d12_empty"),
    pytest.param((2, 2, 40, 64, 33), dict(group=8, stray_every=3), id="d64_m33_strays"),
    pytest.param((1, 2, 24, 32, 16), dict(group=8, pe=False, blank=False), id="m16_plain"),
    pytest.param((1, 2, 37, 32, 40), dict(group=8, empty_rows=True, blank=False),
                 id="empty_rows_no_blank"),
    pytest.param((2, 1, 30, 20, 24), dict(mask=False), id="random_lists"),
]


@gpu
@pytest.mark.parametrize("shape,opts", CASES)
def test_forward_matches_reference(shape, opts, gluon_on, device):
    B, H, N, D, M = shape
    seed = zlib.crc32(repr((shape, opts)).encode()) % 1000
    case = random_case(B, H, N, D, M, seed=seed, device=device, **opts)
    want = reference.cluster_attention(*_args(case), scale=0.3)
    c32 = _fp32(case)
    out, lse, _ = forward._attn_forward(*_args(c32), 0.3)
    assert gluon_on.launches == 1
    assert out.dtype == torch.float32
    assert testing.within_fp32_tolerance(out, want, testing.TOLERANCES["forward"]), \
        f"max abs err {testing.max_errors(out, want)[0]:.3e}"
    # The same inputs through the triton FMA path: outputs and log-sum-exp (+inf on
    # empty rows) agree to float32 rounding.
    with tuning.override(TUNING_GLUON={"fwd": False}):
        out_t, lse_t, _ = forward._attn_forward(*_args(c32), 0.3)
    assert gluon_on.launches == 1
    torch.testing.assert_close(out, out_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_t, rtol=1e-5, atol=1e-5)


@gpu
def test_gradients_through_gluon_forward(gluon_on, device):
    # The backward reads the forward's output and log-sum-exp.
    case = random_case(2, 2, 56, 32, 40, seed=31, device=device, group=8, stray_every=3,
                       empty_rows=True)
    dout = testing.upstream_grad((2, 2, 56, 32), seed=31).to(device)
    names = ("q", "k", "v", "pe_table", "blank_k", "blank_v")

    def grads(c, backend):
        leaves = {n: c[n].detach().clone().requires_grad_(True) for n in names}
        kw = {n: leaves.get(n, c[n]) for n in ("pe_table", "pe_idx", "mask", "blank_k",
                                               "blank_v")}
        out = ops.cluster_attention(leaves["q"], leaves["k"], leaves["v"], c["member_idx"],
                                    **kw, backend=backend)
        out.backward(dout.to(out.dtype))
        return {n: leaves[n].grad for n in names}

    got = grads(_fp32(case), "triton")
    assert gluon_on.launches == 1
    want = grads(case, "reference")
    for n in names:
        assert testing.within_fp32_tolerance(got[n], want[n], testing.TOLERANCES["backward"]), \
            f"{n}: max abs err {testing.max_errors(got[n], want[n])[0]:.3e}"
