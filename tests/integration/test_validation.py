"""Bad inputs raise the documented exception, naming the argument, before any launch."""

from __future__ import annotations

import pytest
import torch

from cluster import ops, testing


def _good(**over):
    B, H, N, D, M, T = 2, 2, 40, 4, 8, 9
    g = torch.Generator().manual_seed(0)
    a = dict(
        q=torch.randn(B, H, N, D, generator=g), k=torch.randn(B, H, N, D, generator=g),
        v=torch.randn(B, H, N, D, generator=g),
        member_idx=torch.randint(0, N, (B, N, M), generator=g),
        pe_table=torch.randn(T, H, generator=g), pe_idx=torch.randint(0, T, (B, N, M), generator=g),
        mask=torch.rand(B, N, M, generator=g) > 0.2,
        blank_k=torch.randn(H, D, generator=g), blank_v=torch.randn(H, D, generator=g),
    )
    a.update(over)
    return a


def _call(**over):
    a = _good(**over)
    backend = a.pop("backend", "reference")
    return ops.cluster_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("member_idx"),
                                 backend=backend, **a)


def test_good_inputs_pass():
    assert _call().shape == (2, 2, 40, 4)


CASES = [
    (dict(q=torch.randn(2, 40, 4)), ValueError, r"q: expected 4 dims"),
    (dict(q=torch.randn(2, 2, 40, 4).int()), TypeError, r"q: expected dtype"),
    (dict(k=torch.randn(2, 2, 41, 4)), ValueError, r"k: expected shape"),
    (dict(v=torch.randn(2, 2, 40, 4).double()), TypeError, r"v: expected dtype"),
    (dict(member_idx=torch.zeros(2, 40, dtype=torch.long)), ValueError, r"member_idx: expected shape"),
    (dict(member_idx=torch.zeros(2, 40, 8)), TypeError, r"member_idx: expected dtype int32 or int64"),
    (dict(member_idx=torch.full((2, 40, 8), 40)), IndexError, r"member_idx: values must lie in \[0, N\)"),
    (dict(member_idx=torch.full((2, 40, 8), -1)), IndexError, r"member_idx: .*min -1"),
    (dict(member_idx=torch.zeros(2, 40, 0, dtype=torch.long)), ValueError, r"member_idx: expected M >= 1"),
    (dict(pe_table=None), ValueError, r"pe_table and pe_idx: give both or neither"),
    (dict(pe_table=torch.randn(9, 3)), ValueError, r"pe_table: expected shape \[T, H\]"),
    (dict(pe_idx=torch.full((2, 40, 8), 9)), IndexError, r"pe_idx: values must lie in \[0, T\)"),
    (dict(pe_idx=torch.zeros(2, 40, 7, dtype=torch.long)), ValueError, r"pe_idx: expected shape"),
    (dict(mask=torch.ones(2, 40, 8)), TypeError, r"mask: expected a bool or integer"),
    (dict(mask=torch.ones(2, 40, 9, dtype=torch.bool)), ValueError, r"mask: expected shape"),
    (dict(blank_v=None), ValueError, r"blank_k and blank_v: give both or neither"),
    (dict(blank_k=torch.randn(2, 5)), ValueError, r"blank_k: expected shape \[H, D\]"),
    (dict(blank_k=torch.randn(2, 4).half()), TypeError, r"blank_k: expected dtype"),
    (dict(scale=float("nan")), ValueError, r"scale: expected a finite"),
    (dict(scale=torch.tensor(1.0)), ValueError, r"scale"),
    (dict(backend="fast"), ValueError, r"backend: expected one of"),
    (dict(q=[1, 2]), TypeError, r"q: expected a torch.Tensor"),
]


@pytest.mark.parametrize("over,exc,msg", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_input_raises(over, exc, msg):
    with pytest.raises(exc, match=msg):
        _call(**over)


def test_integer_mask_is_accepted_and_equals_bool():
    a = _call()
    b = _call(mask=_good()["mask"].to(torch.uint8))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_unavailable_backend_says_why():
    if torch.cuda.is_available():
        pytest.skip("every backend may be present on a GPU machine")
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        _call(backend="cuda")


def test_float64_refused_by_cuda_backend():
    reason = ops.backend_unavailable_reason("cuda", torch.device("cpu"), torch.float64)
    assert reason is not None and "float64" in reason


def test_index_check_can_be_skipped():
    # documented escape hatch: no device sync; valid data still gives the same result
    a = _good()
    out = ops.cluster_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("member_idx"),
                                backend="reference", check_indices=False, **a)
    torch.testing.assert_close(out, _call())


def test_index_check_reads_back_once(monkeypatch):
    """The documented cost: one read-back (device sync) for member_idx and pe_idx together,
    and no scalar conversions of device values (each would be a sync of its own)."""
    reads = []
    real_tolist = torch.Tensor.tolist

    def tolist(self):
        reads.append(tuple(self.shape))
        return real_tolist(self)

    def no_scalar(self, *a):
        raise AssertionError("a scalar read-back: one device sync per call")

    a = _good()
    q, k, v, idx = a.pop("q"), a.pop("k"), a.pop("v"), a.pop("member_idx")
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    for name in ("item", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, no_scalar)
    ops.check_inputs(q, k, v, idx, **a, backend="reference")
    assert reads == [(2, 2)]


def test_weighted_features_checks():
    w = torch.randn(2, 10, 4, 3)
    f = torch.randn(2, 12, 5)
    idx = torch.randint(0, 12, (2, 10, 4))
    assert ops.weighted_features(w, f, idx, backend="reference").shape == (2, 10, 3, 5)
    with pytest.raises(IndexError, match=r"member_idx: values must lie in \[0, Nf\)"):
        ops.weighted_features(w, f, idx + 12, backend="reference")
    with pytest.raises(ValueError, match="weights: expected shape"):
        ops.weighted_features(w[:, :9], f, idx, backend="reference")
    with pytest.raises(TypeError, match="weights: expected dtype"):
        ops.weighted_features(w.double(), f, idx, backend="reference")


def test_weighted_features_matches_loop():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 6, 3, 2, generator=g, dtype=torch.float64)
    f = torch.randn(2, 7, 4, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 7, (2, 6, 3), generator=g)
    out = ops.weighted_features(w, f, idx, backend="reference")
    exp = torch.zeros_like(out)
    for b in range(2):
        for i in range(6):
            for j in range(3):
                exp[b, i] += w[b, i, j][:, None] * f[b, idx[b, i, j]][None, :]
    torch.testing.assert_close(out, exp)


@pytest.mark.parametrize("cfg,rule", [
    (testing.Config("b0", B=0, N=64, C=8, H=1, M=8), "B >= 1"),
    (testing.Config("n16", B=1, N=16, C=8, H=1, M=8), "N >= 32"),
    (testing.Config("c2h4", B=1, N=64, C=2, H=4, M=8), "C >= H"),
    (testing.Config("c10h4", B=1, N=64, C=10, H=4, M=8), "C % H == 0"),
    (testing.Config("m64", B=1, N=64, C=8, H=1, M=64), "M < N"),
])
def test_config_constraints(cfg, rule):
    with pytest.raises(ValueError, match=rule.replace("%", "%")):
        testing.check_config(cfg)


def test_suite_configs_satisfy_constraints():
    ids = [c.name for c in testing.CONFIGS]
    assert ids == ["config_1_small", "config_2_medium", "config_3_large"]
    for c in testing.CONFIGS:
        testing.check_config(c)
