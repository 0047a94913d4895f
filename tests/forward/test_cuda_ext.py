"""The unfused CUDA extension (cluster.cuda_ext): loading, interface, forward of each op.

Without CUDA the GPU tests skip with the backend's own reason; what does run here is the
module's CPU side: importing it, its reasons, the command-line helpers, the schemas
against csrc/, and the Python half of the backend (fake impls, autograd wiring, the AFF
composition) driven through *emulated* ops: the same schemas defined in a test namespace
with PyTorch implementations. The GPU tests compare the real kernels with
cluster.reference.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from cluster import cuda_build, cuda_ext, ops, reference

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
# (rtol, atol) of one op's forward against float64 math on the same (rounded) inputs:
# the kernels accumulate in float32 and round once, so only the output rounding remains.
OP_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2),
          torch.float64: (1e-12, 1e-12)}
VARIANTS = {
    "plain": dict(pe=False, mask=False, blank=False),
    "pe": dict(pe=True, mask=False, blank=False),
    "mask": dict(pe=False, mask=True, blank=False),
    "blank": dict(pe=False, mask=False, blank=True),
    "all": dict(pe=True, mask=True, blank=True),
    "masked_rows_blank": dict(pe=True, mask=True, blank=True, empty_rows=True),
    "masked_rows_no_blank": dict(pe=True, mask=True, blank=False, empty_rows=True),
}


# ------------------------------------------------------------------------- test inputs


def make_attention_case(B=2, H=3, N=16, D=8, M=6, *, seed=0, dtype=torch.float32, device="cpu",
                        index_dtype=torch.int64, pe=True, mask=True, blank=True, dup=True,
                        empty_rows=False, T=7):
    """Tiny random inputs of cluster attention, from a fixed seed.

    dup: about a quarter of the slots repeat the row's first neighbour; empty_rows:
    every fourth query has all its slots masked.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(device, dtype)

    case = dict(q=randn(B, H, N, D), k=randn(B, H, N, D), v=randn(B, H, N, D))
    idx = torch.randint(0, max(N, 1), (B, N, M), generator=g)
    if dup and idx.numel():
        rep = torch.rand(B, N, M, generator=g) < 0.25
        idx = torch.where(rep, idx[..., :1].expand_as(idx), idx)
    case["member_idx"] = idx.to(device, index_dtype)
    case["pe_table"] = randn(T, H, s=0.5) if pe else None
    case["pe_idx"] = torch.randint(0, T, (B, N, M), generator=g).to(device, index_dtype) if pe else None
    if mask or empty_rows:
        valid = torch.rand(B, N, M, generator=g) > 0.25
        if empty_rows:
            valid[:, ::4] = False
        case["mask"] = valid.to(device)
    else:
        case["mask"] = None
    case["blank_k"] = randn(H, D) if blank else None
    case["blank_v"] = randn(H, D) if blank else None
    return case


def make_wf_case(B=2, N=12, Nf=10, M=5, W=3, C=7, *, seed=0, dtype=torch.float32, device="cpu",
                 index_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(B, N, M, W, generator=g, dtype=torch.float64).to(device, dtype)
    feat = torch.randn(B, Nf, C, generator=g, dtype=torch.float64).to(device, dtype)
    idx = torch.randint(0, max(Nf, 1), (B, N, M), generator=g).to(device, index_dtype)
    return weights, feat, idx


def attention_args(case, scale=None):
    """Positional arguments of a backend's cluster_attention (after ops.check_inputs)."""
    D = case["q"].shape[-1]
    return (case["q"], case["k"], case["v"], case["member_idx"], case["pe_table"], case["pe_idx"],
            case["mask"], case["blank_k"], case["blank_v"], float(D**-0.5 if scale is None else scale))


def reference_attention(case, scale=None):
    return reference.cluster_attention(*attention_args(case, scale))


def to_double(case, requires_grad=False):
    """float64 leaf copies of the float tensors (indices and mask unchanged)."""
    out = {}
    for name, x in case.items():
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.detach().double().requires_grad_(requires_grad)
        out[name] = x
    return out


# ------------------------------------------------------------------------ emulated ops

EMUL_NS = "cluster_emul"
DET_SEEN: list[bool] = []  # the deterministic flags that reached emulated backward ops
_EMUL_LIB = None


def _scatter_rows(w, x, idx, n_keys):
    """dy[b,h,idx[b,i,j]] += w[b,h,i,j] * x[b,h,i], summed over duplicates."""
    B, H, N, M = w.shape
    D = x.shape[-1]
    contrib = (w.unsqueeze(-1) * x.unsqueeze(3)).reshape(B, H, N * M, D)
    index = idx.long().reshape(B, 1, N * M, 1).expand(B, H, N * M, D)
    return torch.zeros(B, H, n_keys, D, dtype=x.dtype, device=x.device).scatter_add_(2, index, contrib)


def _emul_qk_forward(q, k, idx, deterministic=False):
    return reference.query_key(q, k, idx).contiguous()


def _emul_qk_backward(grad, q, k, idx, deterministic=False):
    DET_SEEN.append(bool(deterministic))
    return (reference.attention_value(grad, k, idx).contiguous(), _scatter_rows(grad, q, idx, k.shape[2]))


def _emul_av_forward(attn, v, idx, deterministic=False):
    return reference.attention_value(attn, v, idx).contiguous()


def _emul_av_backward(grad, attn, v, idx, deterministic=False):
    DET_SEEN.append(bool(deterministic))
    return (reference.query_key(grad, v, idx).contiguous(), _scatter_rows(attn, grad, idx, v.shape[2]))


def _emul_wf_forward(weights, feat, idx, deterministic=False):
    return reference.weighted_features(weights, feat, idx).contiguous()


def _emul_wf_backward(grad, weights, feat, idx, deterministic=False):
    DET_SEEN.append(bool(deterministic))
    B, N, M = idx.shape
    C = feat.shape[-1]
    index = idx.long().reshape(B, N * M, 1).expand(B, N * M, C)
    gathered = torch.gather(feat, 1, index).reshape(B, N, M, C)
    dw = torch.einsum("bnwc,bnmc->bnmw", grad, gathered).contiguous()
    contrib = torch.einsum("bnmw,bnwc->bnmc", weights, grad).reshape(B, N * M, C)
    df = torch.zeros_like(feat).scatter_add_(1, index, contrib)
    return dw, df


def emulated_ops():
    """torch.ops.cluster_emul: cuda_ext.SCHEMAS with PyTorch bodies, and cuda_ext's own
    fake impls and autograd formulas registered on top."""
    global _EMUL_LIB
    if _EMUL_LIB is None:
        lib = torch.library.Library(EMUL_NS, "DEF")
        bodies = {"qk_forward": _emul_qk_forward, "qk_backward": _emul_qk_backward,
                  "av_forward": _emul_av_forward, "av_backward": _emul_av_backward,
                  "wf_forward": _emul_wf_forward, "wf_backward": _emul_wf_backward}
        for name, schema in cuda_ext.SCHEMAS.items():
            lib.define(schema)
            for key in ("CPU", "CUDA"):
                lib.impl(name, bodies[name], key)
        cuda_ext._register_python_side(EMUL_NS)
        _EMUL_LIB = lib
    return getattr(torch.ops, EMUL_NS)


def compose(case, scale=None, deterministic=False, ops_ns=None):
    return cuda_ext._compose_attention(ops_ns or emulated_ops(), *attention_args(case, scale),
                                       deterministic)


# --------------------------------------------------------------- GPU availability

def gpu_reason() -> str | None:
    if not torch.cuda.is_available():
        return cuda_ext.unavailable_reason(torch.device("cuda"), torch.float32) or "no CUDA device"
    return cuda_ext.unavailable_reason(torch.device("cuda"), torch.float32)


# ================================================================ CPU: module and CLI


def test_import_does_not_build(tmp_path):
    # A fresh interpreter: importing and asking for reasons on the CPU must not build.
    code = ("import torch, cluster.cuda_ext as m;"
            "r = m.unavailable_reason(torch.device('cpu'), torch.float32);"
            "assert isinstance(r, str) and r, r;"
            "assert not m.cuda_build._State.tried;"
            "print('OK')")
    env = dict(os.environ, CLUSTER_EXT_DIR=str(tmp_path / "ext"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
    assert not (tmp_path / "ext").exists()


def test_unavailable_reason_on_cpu():
    why = cuda_ext.unavailable_reason(torch.device("cpu"), torch.float32)
    assert isinstance(why, str) and why
    assert "float64" in cuda_ext.unavailable_reason(torch.device("cpu"), torch.float64)
    if torch.version.cuda is None:
        assert "CPU build" in cuda_ext.unavailable_reason(torch.device("cuda"), torch.float32)
    assert ops.backend_unavailable_reason("cuda", torch.device("cpu"), torch.float32)


def test_interface():
    assert isinstance(cuda_ext.MAX_HEAD_DIM, int) and cuda_ext.MAX_HEAD_DIM >= 256
    for name in ("unavailable_reason", "cluster_attention", "weighted_features"):
        assert callable(getattr(cuda_ext, name))


def test_cuda_backend_on_cpu_raises():
    case = make_attention_case(seed=1)
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.cluster_attention(case["q"], case["k"], case["v"], case["member_idx"], backend="cuda")
    weights, feat, idx = make_wf_case()
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.weighted_features(weights, feat, idx, backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_backend_functions_raise_without_gpu():
    case = make_attention_case(seed=2)
    with pytest.raises(ops.BackendUnavailableError):
        cuda_ext.cluster_attention(*attention_args(case), False)
    with pytest.raises(ops.BackendUnavailableError):
        cuda_ext.weighted_features(*make_wf_case())
    with pytest.raises(RuntimeError, match="unavailable"):
        cuda_ext.load()


def test_sources_and_build_dir(monkeypatch, tmp_path):
    assert cuda_build.csrc_dir() is not None
    assert sorted(p.name for p in cuda_build.sources()) == ["cluster_kernels.cu", "cluster_ops.cpp"]
    monkeypatch.setenv("CLUSTER_EXT_DIR", str(tmp_path / "x"))
    assert cuda_build.build_dir() == tmp_path / "x"
    monkeypatch.delenv("CLUSTER_EXT_DIR")
    assert torch.__version__ in str(cuda_build.build_dir())


def test_arch_list(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    assert cuda_build._arch_list() == "7.5"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert cuda_build._arch_list().startswith(cuda_build.DEFAULT_ARCH_LIST)


@pytest.mark.parametrize("spec, expected", [
    ("90", ["-gencode=arch=compute_90,code=sm_90"]),
    ("8.0;9.0", ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]),
    ("9.0+PTX", ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]),
    ("sm_90a", ["-gencode=arch=compute_90a,code=sm_90a"]),
])
def test_gencode_flags(spec, expected):
    assert cuda_build._gencode_flags(spec) == expected


@pytest.mark.parametrize("spec", ["", "ninety", "9.x"])
def test_gencode_flags_refuse_nonsense(spec):
    with pytest.raises(ValueError, match="--arch"):
        cuda_build._gencode_flags(spec)


def test_check_compile_needs_cuda_torch(capsys):
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build; check-compile would really compile")
    assert cuda_build.main(["check-compile", "--arch", "90"]) == 2
    assert "CUDA build of torch" in capsys.readouterr().err


def test_compile_commands(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_build, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    cmds = dict((src.name, cmd) for src, cmd in cuda_build.compile_commands("8.0;9.0", tmp_path))
    cu, cpp = cmds["cluster_kernels.cu"], cmds["cluster_ops.cpp"]
    assert cu[0] == "/opt/cuda/bin/nvcc" and "-c" in cu and "-c" in cpp
    assert "-gencode=arch=compute_80,code=sm_80" in cu and "-gencode=arch=compute_90,code=sm_90" in cu
    assert not any(a.startswith("-gencode") for a in cpp)
    for cmd in (cu, cpp):
        assert any(a.startswith("-std=c++") for a in cmd)
        assert any(a.startswith("-I") and a.endswith("include") for a in cmd)
        assert "--use_fast_math" not in cmd


def test_check_compile_reports_each_file(monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cuda_build, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")

    def fake_run(cmd, **kwargs):
        bad = cmd[2].endswith(".cu")
        return subprocess.CompletedProcess(cmd, int(bad), "", "kernel.cu(1): error: nope" if bad else "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert cuda_build.main(["check-compile", "--arch", "90", "--jobs", "2"]) == 1
    out, err = capsys.readouterr()
    assert "ok" in out and "FAILED" in out and "1/2 compiled" in out
    assert "error: nope" in err


def test_build_command_reports_reason(capsys):
    if gpu_reason() is None:
        pytest.skip("a GPU is present: `build` would build")
    assert cuda_build.main(["build"]) == 1
    assert "unavailable" in capsys.readouterr().err


@pytest.fixture
def pretend_gpu(monkeypatch, tmp_path):
    """cuda_ext's loader as on a GPU host without a usable build, on any machine."""
    monkeypatch.setenv("CLUSTER_EXT_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(cuda_build, "_environment_reason", lambda: None)
    monkeypatch.setattr(cuda_build, "_ops_defined", lambda: False)
    monkeypatch.setattr(cuda_build, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    return tmp_path / "ext"


def test_build_failure_names_its_log(pretend_gpu, monkeypatch):
    def fail(verbose):
        raise RuntimeError("Error building extension: nvcc said no")

    monkeypatch.setattr(cuda_build, "_jit_build", fail)
    why = cuda_build._try_load(False)
    log = pretend_gpu / "build.log"
    assert why == f"build failed, see {log}"
    assert "nvcc said no" in log.read_text()


def test_missing_nvcc_and_ninja_are_reported(pretend_gpu, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert "ninja not found" in cuda_build._try_load(False)
    monkeypatch.setattr(cuda_build, "find_nvcc", lambda: None)
    assert "nvcc not found" in cuda_build._try_load(False)


def test_cached_build_is_used_without_nvcc(pretend_gpu, monkeypatch):
    pretend_gpu.mkdir(parents=True)
    lib = pretend_gpu / f"{cuda_build.EXT_NAME}.so"
    lib.write_bytes(b"")
    loaded = []
    monkeypatch.setattr(cuda_build, "find_nvcc", lambda: None)
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    assert cuda_build._try_load(False) is None
    assert loaded == [str(lib)]


def _cpp_schemas() -> dict[str, str]:
    text = (cuda_build.csrc_dir() / "cluster_ops.cpp").read_text()
    found = {}
    for call in re.findall(r"m\.def\(((?:\s*\"[^\"]*\")+)\s*\)", text):
        schema = "".join(re.findall(r"\"([^\"]*)\"", call))
        found[schema.split("(")[0]] = schema
    return found


def test_schemas_match_csrc():
    assert _cpp_schemas() == cuda_ext.SCHEMAS


# ================================================ CPU: Python side on emulated ops


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_composition_matches_reference(variant):
    case = to_double(make_attention_case(seed=3, **VARIANTS[variant]))
    got = compose(case)
    want = reference_attention(case)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(got).all()


def test_composition_fully_masked_rows_are_zero():
    case = to_double(make_attention_case(seed=4, pe=True, mask=True, blank=False, empty_rows=True))
    out = compose(case)
    assert torch.equal(out[:, :, ::4], torch.zeros_like(out[:, :, ::4]))


def test_composition_low_precision_runs_softmax_in_float32():
    case = make_attention_case(seed=5, dtype=torch.bfloat16, **VARIANTS["all"])
    out = compose(case)
    assert out.dtype == torch.bfloat16
    ref = reference_attention(to_double(case))
    assert (out.double() - ref).abs().max() < 5e-2


def test_emulated_ops_pass_opcheck():
    ns = emulated_ops()
    case = to_double(make_attention_case(seed=6, pe=False, mask=False, blank=False))
    q, k, v, idx = case["q"], case["k"], case["v"], case["member_idx"]
    attn = reference.query_key(q, k, idx)
    weights, feat, widx = make_wf_case(dtype=torch.float64)
    for op, args in ((ns.qk_forward, (q, k, idx)), (ns.av_forward, (attn, v, idx)),
                     (ns.wf_forward, (weights, feat, widx))):
        grad_args = tuple(a.detach().requires_grad_(a.is_floating_point()) for a in args)
        torch.library.opcheck(op, grad_args)


def test_compile_traces_through_fake_impls():
    import torch._dynamo

    ns = emulated_ops()
    case = to_double(make_attention_case(seed=7, **VARIANTS["all"]))

    def fn(q, k, v):
        c = dict(case, q=q, k=k, v=v)
        return cuda_ext._compose_attention(ns, *attention_args(c), False)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    leaves = [case[n].clone().requires_grad_() for n in ("q", "k", "v")]
    out = compiled(*leaves)
    torch.testing.assert_close(out, fn(case["q"], case["k"], case["v"]))
    out.sum().backward()
    assert all(x.grad is not None for x in leaves)


# ========================================================= GPU: the kernels themselves


def _op_inputs(op, dtype, device, index_dtype, seed=0, **shape):
    case = make_attention_case(seed=seed, dtype=dtype, device=device, index_dtype=index_dtype,
                               pe=False, mask=False, blank=False, **shape)
    if op == "qk":
        return case["q"], case["k"], case["member_idx"]
    if op == "av":
        g = torch.Generator().manual_seed(seed + 100)
        B, H, N, _ = case["q"].shape
        attn = torch.rand(B, H, N, case["member_idx"].shape[-1], generator=g).to(device, dtype)
        return attn, case["v"], case["member_idx"]
    return make_wf_case(seed=seed, dtype=dtype, device=device, index_dtype=index_dtype)


_CUDA_OPS = {"qk": "qk_forward", "av": "av_forward", "wf": "wf_forward"}
_REF_OPS = {"qk": reference.query_key, "av": reference.attention_value, "wf": reference.weighted_features}


def _run_op(op, *args, deterministic=False):
    return getattr(torch.ops.cluster, _CUDA_OPS[op])(*args, deterministic)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("dtype", FLOATS + (torch.float64,), ids=lambda d: DT_IDS[d])
@pytest.mark.parametrize("op", ["qk", "av", "wf"])
def test_op_forward_matches_reference(cuda, op, dtype, index_dtype):
    args = _op_inputs(op, dtype, cuda, index_dtype, seed=10)
    got = _run_op(op, *args)
    assert got.dtype == dtype and got.is_contiguous()
    want = _REF_OPS[op](*[a.double() if a.is_floating_point() else a for a in args])
    rtol, atol = OP_TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("op", ["qk", "av", "wf"])
def test_op_index_dtypes_agree(cuda, op):
    a32 = _op_inputs(op, torch.float32, cuda, torch.int32, seed=11)
    a64 = _op_inputs(op, torch.float32, cuda, torch.int64, seed=11)
    assert torch.equal(_run_op(op, *a32), _run_op(op, *a64))


def test_duplicate_indices_count_per_occurrence(cuda):
    q, k, _ = _op_inputs("qk", torch.float32, cuda, torch.int64, seed=12)
    B, H, N, D = q.shape
    idx = torch.full((B, N, 4), 3, dtype=torch.int64, device=cuda)
    attn = torch.ones(B, H, N, 4, device=cuda)
    out = torch.ops.cluster.av_forward(attn, k, idx)
    torch.testing.assert_close(out, 4 * k[:, :, 3:4].expand(B, H, N, D), rtol=1e-6, atol=1e-6)
    qk = torch.ops.cluster.qk_forward(q, k, idx)
    assert torch.equal(qk, qk[..., :1].expand_as(qk))


@pytest.mark.parametrize("op", ["qk", "av", "wf"])
@pytest.mark.parametrize("empty", ["B", "N"])
def test_empty_inputs_return_empty(cuda, op, empty):
    shape = dict(B=0) if empty == "B" else dict(N=0)
    if op == "wf":
        args = make_wf_case(**shape, device=cuda)
        want_shape = (args[0].shape[0], args[0].shape[1], args[0].shape[3], args[1].shape[2])
    else:
        args = _op_inputs(op, torch.float32, cuda, torch.int64, **shape)
        want_shape = (*args[0].shape[:3], args[2].shape[-1] if op == "qk" else args[1].shape[-1])
    out = _run_op(op, *args)
    assert tuple(out.shape) == want_shape and out.numel() == 0


@pytest.mark.parametrize("op", ["qk", "av", "wf"])
def test_noncontiguous_inputs(cuda, op):
    args = _op_inputs(op, torch.float32, cuda, torch.int64, seed=13)
    # Same values, strided storage: transposed copies viewed back, and a strided index.
    def strided(x):
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    nc = tuple(strided(a) for a in args)
    assert not any(a.is_contiguous() for a in nc if a.dim() > 1 and a.shape[0] > 1)
    assert torch.equal(_run_op(op, *nc), _run_op(op, *args))


def test_cpu_tensors_raise_clear_error(cuda):
    q, k, idx = _op_inputs("qk", torch.float32, "cpu", torch.int64)
    with pytest.raises(RuntimeError, match="need CUDA tensors, got cpu"):
        torch.ops.cluster.qk_forward(q, k, idx)
    w, f, widx = make_wf_case()
    with pytest.raises(RuntimeError, match="need CUDA tensors, got cpu"):
        torch.ops.cluster.wf_forward(w, f, widx)


def test_bad_arguments_are_named(cuda):
    q, k, idx = _op_inputs("qk", torch.float32, cuda, torch.int64)
    # The whole message, sizes included: formatting the integers once crashed the process.
    B, H, N, D = q.shape
    want = rf"q: expected shape \[B, H, N, D\] = \[\*, \*, \*, \*\], got \[{H}, {N}, {D}\]"
    with pytest.raises(RuntimeError, match=want):
        torch.ops.cluster.qk_forward(q[0], k, idx)
    with pytest.raises(RuntimeError, match="k: expected dtype"):
        torch.ops.cluster.qk_forward(q, k.half(), idx)
    with pytest.raises(RuntimeError, match="member_idx: expected dtype int32 or int64"):
        torch.ops.cluster.qk_forward(q, k, idx.float())
    with pytest.raises(RuntimeError, match="member_idx: expected a CUDA tensor"):
        torch.ops.cluster.qk_forward(q, k, idx.cpu())
    with pytest.raises(RuntimeError, match="member_idx: expected shape"):
        torch.ops.cluster.qk_forward(q, k, idx[:, :-1])
    attn, v, aidx = _op_inputs("av", torch.float32, cuda, torch.int64)
    with pytest.raises(RuntimeError, match="v: expected shape"):
        torch.ops.cluster.av_forward(attn, v[:, :1], aidx)
    w, f, widx = make_wf_case(device=cuda)
    with pytest.raises(RuntimeError, match="weights: expected shape"):
        torch.ops.cluster.wf_forward(w[:, :-1], f, widx)


def test_registered_schemas_match(cuda):
    for name, schema in cuda_ext.SCHEMAS.items():
        assert str(getattr(torch.ops.cluster, name).default._schema) == f"cluster::{schema}"


@pytest.mark.parametrize("op", ["qk", "av", "wf"])
def test_opcheck(cuda, op):
    args = _op_inputs(op, torch.float32, cuda, torch.int64, seed=14)
    args = tuple(a.detach().requires_grad_(a.is_floating_point()) for a in args)
    torch.library.opcheck(getattr(torch.ops.cluster, _CUDA_OPS[op]).default, args)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_traces_qk(cuda, compile_backend):
    import torch._dynamo

    if compile_backend == "inductor":
        pytest.importorskip("triton")
    q, k, idx = _op_inputs("qk", torch.float32, cuda, torch.int64, seed=15)

    def fn(q, k):
        return torch.ops.cluster.qk_forward(q, k, idx).softmax(-1)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=compile_backend, fullgraph=True)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    out = compiled(qg, kg)
    torch.testing.assert_close(out, fn(q, k), rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    assert qg.grad is not None and kg.grad is not None


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_full_op_is_one_graph(cuda, compile_backend):
    import torch._dynamo

    if compile_backend == "inductor":
        pytest.importorskip("triton")
    case = make_attention_case(B=1, H=2, N=19, D=8, M=5, seed=16, device=cuda, **VARIANTS["all"])
    floats = ("q", "k", "v", "pe_table", "blank_k", "blank_v")

    def loss(c):
        # check_indices=False: the range check reads values back to the host, a graph
        # break by design.
        out = ops.cluster_attention(c["q"], c["k"], c["v"], c["member_idx"], pe_table=c["pe_table"],
                                    pe_idx=c["pe_idx"], mask=c["mask"], blank_k=c["blank_k"],
                                    blank_v=c["blank_v"], scale=0.3, backend="cuda",
                                    check_indices=False)
        return (out * out).sum()

    def grads(fn):
        c = {n: (x.clone().requires_grad_() if n in floats else x) for n, x in case.items()}
        value = fn(c)
        return value, torch.autograd.grad(value, [c[n] for n in floats])

    torch._dynamo.reset()
    want, want_grads = grads(loss)
    got, got_grads = grads(torch.compile(loss, backend=compile_backend, fullgraph=True))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ============================================== GPU: the composed op vs the reference


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_cluster_attention_fp32_matches_reference(cuda, variant, index_dtype):
    case = make_attention_case(B=2, H=2, N=24, D=16, M=8, seed=20, device=cuda,
                               index_dtype=index_dtype, **VARIANTS[variant])
    out = ops.cluster_attention(case["q"], case["k"], case["v"], case["member_idx"],
                                pe_table=case["pe_table"], pe_idx=case["pe_idx"], mask=case["mask"],
                                blank_k=case["blank_k"], blank_v=case["blank_v"], backend="cuda")
    want = reference_attention(to_double(case))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: DT_IDS[d])
@pytest.mark.parametrize("variant", ["plain", "all", "masked_rows_no_blank"])
def test_cluster_attention_low_precision(cuda, variant, dtype):
    case = make_attention_case(B=2, H=2, N=24, D=16, M=8, seed=21, device=cuda, dtype=dtype,
                               **VARIANTS[variant])
    out = ops.cluster_attention(case["q"], case["k"], case["v"], case["member_idx"],
                                pe_table=case["pe_table"], pe_idx=case["pe_idx"], mask=case["mask"],
                                blank_k=case["blank_k"], blank_v=case["blank_v"], backend="cuda")
    assert out.dtype == dtype
    want = reference_attention(to_double(case))
    # flash-attention's rule: at most twice the error of PyTorch in the same precision,
    # plus one rounding unit at the output's magnitude.
    pt_err = (reference_attention(case).double() - want).abs().max().item()
    err = (out.double() - want).abs().max().item()
    floor = torch.finfo(dtype).eps * max(want.abs().max().item(), 1.0)
    assert err <= 2 * pt_err + floor, (err, pt_err)


def test_weighted_features_through_ops(cuda):
    weights, feat, idx = make_wf_case(seed=22, device=cuda)
    out = ops.weighted_features(weights, feat, idx, backend="cuda")
    want = reference.weighted_features(weights.double(), feat.double(), idx)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_large_head_dim_limit_is_enforced(cuda):
    D = cuda_ext.MAX_HEAD_DIM + 1
    q = torch.zeros(1, 1, 2, D, device=cuda)
    idx = torch.zeros(1, 2, 1, dtype=torch.int64, device=cuda)
    with pytest.raises(ValueError, match="head dimension"):
        ops.cluster_attention(q, q, q, idx, backend="cuda")


def test_build_cli_self_test(cuda, capsys):
    assert cuda_build.main(["build"]) == 0
    out = capsys.readouterr().out
    assert "self test" in out and "(ok)" in out
