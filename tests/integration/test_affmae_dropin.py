"""AFF-MAE's drop-in use of the two import paths, as its own test code uses them.

AFF-MAE's tests import ``cluster.cluster_attn.ClusterAttention`` (the new implementation,
triton backend) and ``cluster.archive.aff.ClusterAttention`` (the old one, cuda backend),
construct them with ``(dim=, num_heads=[, proj_drop=])`` only, build ``pe_idx`` against the
relative-position table of 2048-pixel inputs (``rel_pos_width = 2048 // 4 - 1 = 511``) from
per-token nearest clusters, run forward and backward under ``torch.amp.autocast`` and compare
the new path with the old one (same state_dict in both). Every test here runs unchanged
against both paths; where a backend is absent (no CUDA extension, no GPU) the path falls back
to the reference backend with a warning, which is tested too.

Tolerances: new vs old, max-abs error over max(1, max |old|) at most 1e-3 (forward) and 2e-3
(gradients) in float32, x100 for 16-bit autocast (AFF-MAE's max-abs rules, on tensors of
order 1); each path vs the float64 reference by the repo's rules (cluster.testing: float32
elementwise atol = rtol = 1e-4 / 1e-3, 16-bit at most 2x the error of the PyTorch reference
run under the same autocast plus one rounding unit).

Layouts: "dense" (a full 10 x 10 grid, as a stage before token dropping) and "sparse" (100
tokens scattered over a 512 x 512 grid, as after heavy dropping at 2048 pixels: offsets of
hundreds of cells, pe_idx spread over most of the 1023 x 1023 table).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch

import cluster
from cluster import neighbors, ops, testing
from cluster.archive.aff import ClusterAttention as OldAttention
from cluster.cluster_attn import ClusterAttention as NewAttention
from cluster.nn import AFFMAE_REL_POS_WIDTH, needed_rel_pos_width

R = 511  # AFF-MAE: 2048 // 4 - 1
T = (2 * R + 1) ** 2
B, N, C, H, M, CS = 2, 100, 32, 2, 32, 8  # N = 12 clusters of 8 + a short last one of 4
PATHS = {"new": (NewAttention, "triton"), "old": (OldAttention, "cuda")}
LAYOUTS = {"dense": (10, 10), "sparse": (512, 512)}
AMP = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
CTORS = {"dim_heads": {}, "proj_drop": {"proj_drop": 0.1}}
TOL_FWD, TOL_BWD, LOWP_SCALE = 1e-3, 2e-3, 100.0
FALLBACK = "using the reference backend"


@pytest.fixture(autouse=True, scope="module")
def _interpreter_tail_block(device):
    """On the CPU only: the triton backend's backward tail sums d_pe_table in programs of
    64 entries, which the interpreter runs one by one (32k programs, ~2 minutes, for the
    2M entries of a 1023^2 x 2 table). Wider programs sum the same entries in the same
    order; GPUs keep the kernel's own setting."""
    if device.type != "cpu":
        yield
        return
    try:
        from cluster.triton_kernels import tuning
    except Exception:  # triton absent: the new path falls back, nothing to widen
        yield
        return
    with tuning.override(TAIL_PE_BLOCK=1 << 16):
        yield


def _amp_dtype(name: str, device: torch.device):
    if name == "fp16" and device.type == "cpu":
        pytest.skip("CPU autocast runs bfloat16 here; float16 autocast is run on GPUs")
    return AMP[name]


@dataclass
class Layout:
    feat: torch.Tensor  # [B, N, C] float64
    member_idx: torch.Tensor
    cluster_mask: torch.Tensor
    pe_idx: torch.Tensor
    dout: torch.Tensor  # [B, N, C] float64


_LAYOUTS: dict = {}


def _layout(name: str) -> Layout:
    if name not in _LAYOUTS:
        h, w = LAYOUTS[name]
        pos = neighbors.make_synthetic_positions(B, N, h, w, seed=5)
        nb = neighbors.build_neighborhoods(pos, CS, M, h, w, R=R, knn_method="torch")
        assert not nb.cluster_mask.all()  # the short last cluster is masked
        g = torch.Generator().manual_seed(11)
        feat = torch.randn(B, N, C, generator=g, dtype=torch.float64)
        dout = torch.randn(B, N, C, generator=g, dtype=torch.float64)
        _LAYOUTS[name] = Layout(feat, nb.member_idx, nb.cluster_mask, nb.pe_idx, dout)
    return _LAYOUTS[name]


def _state(ctor: str) -> dict:
    """One set of weights for every module of a test: an old-path module's state_dict."""
    torch.manual_seed(0)
    return {k: v.clone() for k, v in OldAttention(dim=C, num_heads=H, **CTORS[ctor]).state_dict().items()}


@dataclass
class Result:
    out: torch.Tensor  # float64 on the CPU
    grads: dict  # "feat" and every parameter, float64 on the CPU
    warnings: list


def _run(module, layout: Layout, device, amp, dtype=torch.float32) -> Result:
    """Forward and backward of a fixed dL/dout through ``module``, AFF-MAE's way."""
    module.to(device)
    feat = layout.feat.to(device=device, dtype=dtype).clone().requires_grad_(True)  # a fresh leaf
    args = (layout.member_idx.to(device), layout.cluster_mask.to(device), layout.pe_idx.to(device))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(123)  # the same dropout masks in every module of a test
        with torch.amp.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            out = module(feat, *args, False)
        assert out.shape == feat.shape and torch.isfinite(out).all()
        (out.to(dtype) * layout.dout.to(device=device, dtype=dtype)).sum().backward()
    grads = {"feat": feat.grad}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    for n, g in grads.items():
        assert g is not None and torch.isfinite(g).all(), n
    return Result(out.detach().double().cpu(), {n: g.detach().double().cpu() for n, g in grads.items()},
                  [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])


_RUNS: dict = {}


def _path_run(path: str, layout: str, amp_name: str, ctor: str, device) -> Result:
    """Memoised per (path, layout, autocast, constructor, device): results only, so no test
    depends on another's state (the triton interpreter's runs take seconds on the CPU)."""
    key = (path, layout, amp_name, ctor, str(device))
    if key not in _RUNS:
        cls = PATHS[path][0]
        torch.manual_seed(0)
        m = cls(dim=C, num_heads=H, **CTORS[ctor])  # AFF-MAE's construction: nothing else
        m.load_state_dict(_state(ctor), strict=True)
        _RUNS[key] = _run(m, _layout(layout), device, AMP[amp_name])
    return _RUNS[key]


def _reference_run(layout: str, amp_name: str, device, *, fp64: bool) -> Result:
    """cluster.reference through cluster.ClusterAttention: float64 on the CPU, or the
    16-bit PyTorch baseline under the same autocast on ``device``."""
    key = ("reference", layout, "fp64" if fp64 else amp_name, "dim_heads", "cpu" if fp64 else str(device))
    if key not in _RUNS:
        m = cluster.ClusterAttention(C, H, backend="reference", rel_pos_width=R)
        m.load_state_dict(_state("dim_heads"), strict=True)
        if fp64:
            _RUNS[key] = _run(m.double(), _layout(layout), torch.device("cpu"), None, torch.float64)
        else:
            _RUNS[key] = _run(m, _layout(layout), device, AMP[amp_name])
    return _RUNS[key]


def _scaled_max_abs(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).abs().max()) / max(1.0, float(ref.abs().max()))


# ------------------------------------------------------------------------------ defaults

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ctor", CTORS)
def test_compat_paths_default_to_affmae_table(path, ctor):
    cls, backend = PATHS[path]
    m = cls(dim=C, num_heads=H, **CTORS[ctor])
    assert m.rel_pos_width == AFFMAE_REL_POS_WIDTH == 511
    assert tuple(m.pre_table.shape) == (T, 5) == (1023 * 1023, 5)
    assert m.backend == backend and m.fallback
    assert "pre_table" not in m.state_dict()  # non-persistent: AFF checkpoints load unchanged


def test_cluster_attention_keeps_aff_table():
    m = cluster.ClusterAttention(dim=C, num_heads=H)
    assert m.rel_pos_width == 55 and tuple(m.pre_table.shape) == (111 * 111, 5)
    assert cluster.nn.AFF_REL_POS_WIDTH == 55


@pytest.mark.parametrize("path", PATHS)
def test_compat_keywords_stay_overridable(path):
    cls, _ = PATHS[path]
    m = cls(dim=C, num_heads=H, rel_pos_width=55, backend="reference", fallback=False,
            deterministic=True, attn_drop=0.1)
    assert (m.rel_pos_width, m.backend, m.fallback, m.deterministic) == (55, "reference", False, True)
    assert tuple(m.pre_table.shape) == (111 * 111, 5) and m.attn_drop.p == 0.1


@pytest.mark.parametrize("path", PATHS)
def test_aff_checkpoint_loads_into_compat_path(path):
    """Parameters do not depend on R: an AFF (R=55) checkpoint loads strictly at R=511."""
    aff = cluster.ClusterAttention(C, H)
    m = PATHS[path][0](dim=C, num_heads=H)
    res = m.load_state_dict(aff.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys


# ------------------------------------------------------------------------------ new vs old

@pytest.mark.parametrize("layout,ctor,amp", [
    ("dense", "dim_heads", "fp32"),
    ("dense", "dim_heads", "fp16"),
    ("dense", "dim_heads", "bf16"),
    ("dense", "proj_drop", "bf16"),
    ("sparse", "dim_heads", "fp32"),
])
def test_new_matches_old(layout, ctor, amp, device):
    """AFF-MAE's comparison: the same state_dict in both paths, forward and backward.
    (16-bit runs use the dense layout: at offsets of hundreds of cells a random pos_embed
    makes biases of ~100, which the old path adds in 16 bits and the new one in float32,
    so there the two differ by the old path's rounding; the float64 test covers it.)"""
    _amp_dtype(amp, device)
    new = _path_run("new", layout, amp, ctor, device)
    old = _path_run("old", layout, amp, ctor, device)
    scale = 1.0 if amp == "fp32" else LOWP_SCALE
    err = _scaled_max_abs(new.out, old.out)
    assert err <= TOL_FWD * scale, ("out", err)
    for name, g in old.grads.items():
        err = _scaled_max_abs(new.grads[name], g)
        assert err <= TOL_BWD * scale, (name, err, float(g.abs().max()))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("amp", AMP)
def test_path_matches_float64_reference(path, layout, amp, device, fwd_tol, bwd_tol, request):
    amp_dtype = _amp_dtype(amp, device)
    if device.type == "cuda" and path == "new" and layout == "sparse" and amp_dtype is not None:
        # Seen on the H200 (triton 3.6): pos_embed.bias's gradient (the sum of every slot's
        # dS, which cancels to nearly zero) bf16 0.0397 against a bound of 0.0185, fp16 0.0037
        # against 0.0026, everything else within the rule; the dense layout passes. Open on the
        # issue of the AFF-list kernels; strict, so a fix shows here.
        request.applymarker(pytest.mark.xfail(
            strict=True, reason="triton 16-bit: pos_embed.bias gradient over the 2x rule at "
                                "offsets of hundreds of cells (open, see the issue notes)"))
    got = _path_run(path, layout, amp, "dim_heads", device)
    ref = _reference_run(layout, amp, device, fp64=True)
    if amp_dtype is None:
        assert testing.within_fp32_tolerance(got.out, ref.out, fwd_tol), testing.max_errors(got.out, ref.out)
        for name, g in ref.grads.items():
            assert testing.within_fp32_tolerance(got.grads[name], g, bwd_tol), \
                (name, testing.max_errors(got.grads[name], g))
        return
    lowp = _reference_run(layout, amp, device, fp64=False)
    ok, err, bound = testing.within_lowp_rule(got.out, lowp.out, ref.out, amp_dtype)
    assert ok, ("out", err, bound)
    for name, g in ref.grads.items():
        ok, err, bound = testing.within_lowp_rule(got.grads[name], lowp.grads[name], g, amp_dtype)
        assert ok, (name, err, bound)


# ------------------------------------------------------------------------------ autocast dtypes

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_autocast_keeps_bias_table_float32(path, amp, device, monkeypatch):
    """Under autocast q, k, v are 16-bit and the bias table reaches the op in float32
    (the op takes float32 parameters beside 16-bit activations; nothing is downcast)."""
    amp_dtype = _amp_dtype(amp, device)
    seen = {}
    real = ops.cluster_attention

    def spy(q, k, v, member_idx, **kw):
        seen.update(q=q.dtype, pe_table=kw["pe_table"].dtype, blank_k=kw["blank_k"].dtype)
        return real(q, k, v, member_idx, **kw)

    monkeypatch.setattr(ops, "cluster_attention", spy)
    lay = _layout("dense")
    m = PATHS[path][0](dim=C, num_heads=H).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fallback, tested below
        with torch.no_grad(), torch.amp.autocast(device.type, dtype=amp_dtype):
            m(lay.feat.float().to(device), lay.member_idx.to(device), lay.cluster_mask.to(device),
              lay.pe_idx.to(device), False)
    assert seen == {"q": amp_dtype, "pe_table": torch.float32, "blank_k": torch.float32}


# ------------------------------------------------------------------------------ errors

def test_aff_table_rejects_affmae_indices_naming_rel_pos_width():
    """What a new user met: cluster.ClusterAttention (R=55) fed pe_idx built for R=511."""
    lay = _layout("dense")
    m = cluster.ClusterAttention(dim=C, num_heads=H, backend="reference")
    hi = int(lay.pe_idx.max())
    need = needed_rel_pos_width(hi)
    assert (2 * need + 1) ** 2 > hi >= (2 * need - 1) ** 2  # the smallest table that holds it
    with pytest.raises(IndexError) as info:
        m(lay.feat.float(), lay.member_idx, lay.cluster_mask, lay.pe_idx, False)
    msg = str(info.value)
    assert msg.startswith("pe_idx:")
    for part in ("rel_pos_width", "R=55", "T=(2R+1)^2=12321", f"max {hi}",
                 f"rel_pos_width >= {need}"):
        assert part in msg, (part, msg)


@pytest.mark.parametrize("path", PATHS)
def test_out_of_range_pe_idx_names_needed_r_before_any_launch(path, device, monkeypatch):
    def no_launch(*a, **k):
        raise AssertionError("a backend ran on out-of-range indices")

    monkeypatch.setattr(ops._ReferenceBackend, "cluster_attention", staticmethod(no_launch))
    for name in ("triton", "cuda"):
        mod = ops._backend_module(name)[0]
        if mod is not None:
            monkeypatch.setattr(mod, "cluster_attention", no_launch)
    lay = _layout("dense")
    pe_idx = lay.pe_idx.clone()
    pe_idx[1, 7, 3] = T  # one row past the 1023 x 1023 table: needs R = 512
    m = PATHS[path][0](dim=C, num_heads=H).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(IndexError, match=r"rel_pos_width R=511.*rel_pos_width >= 512") as info:
            m(lay.feat.float().to(device), lay.member_idx.to(device), lay.cluster_mask.to(device),
              pe_idx.to(device), False)
    assert f"T=(2R+1)^2={T}" in str(info.value)


@pytest.mark.parametrize("path", PATHS)
def test_global_mode_out_of_range_pe_idx(path, device):
    m = PATHS[path][0](dim=C, num_heads=H).to(device)
    pe_idx = torch.full((1, 16, 16), T // 2, dtype=torch.long)
    pe_idx[0, 3, 4] = T + 5000  # 1025^2 <= row < 1027^2: needs R = 513
    with pytest.raises(IndexError, match=r"pe_idx:.*rel_pos_width R=511.*rel_pos_width >= 513"):
        m(torch.randn(1, 16, C, device=device), None, None, pe_idx.to(device), True)
    pe_idx[0, 3, 4] = -1
    with pytest.raises(IndexError, match="negative"):
        m(torch.randn(1, 16, C, device=device), None, None, pe_idx.to(device), True)


# ------------------------------------------------------------------------------ fallbacks

@pytest.mark.parametrize("path", PATHS)
def test_fallback_warning_where_backend_absent(path, device):
    """A path whose backend cannot run here says so once and uses the reference; one whose
    backend runs gives no fallback warning. (On this CPU machine: the old path, no CUDA
    extension.)"""
    backend = PATHS[path][1]
    for amp in ("fp32", "bf16"):
        dtype = AMP[amp] or torch.float32
        absent = ops.backend_unavailable_reason(backend, device, dtype)
        run = _path_run(path, "dense", amp, "dim_heads", device)
        fallbacks = [w for w in run.warnings if FALLBACK in w]
        if absent is None:
            assert not fallbacks, run.warnings
        else:
            assert len(fallbacks) == 1 and repr(backend) in fallbacks[0], run.warnings


def test_new_path_falls_back_with_warning(monkeypatch):
    """Where triton cannot run, the new path warns once and still matches the reference."""
    real = ops.backend_unavailable_reason
    monkeypatch.setattr(ops, "backend_unavailable_reason",
                        lambda name, dev, dt: "no triton (test)" if name == "triton" else real(name, dev, dt))
    lay = _layout("dense")
    m = NewAttention(dim=C, num_heads=H)
    ref = cluster.ClusterAttention(C, H, backend="reference", rel_pos_width=R)
    ref.load_state_dict(m.state_dict())
    args = (lay.feat.float(), lay.member_idx, lay.cluster_mask, lay.pe_idx, False)
    with pytest.warns(RuntimeWarning, match="'triton' unavailable .no triton .test..; using the reference"):
        out = m(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per module
        m(*args)
    torch.testing.assert_close(out, ref(*args), atol=0, rtol=0)
