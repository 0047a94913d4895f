"""Public ops: argument validation (once, before any launch) and backend dispatch.

Backends are modules exposing the same small interface:

``unavailable_reason(device, dtype) -> str | None``
    None when the backend can run on that device and dtype, else a sentence saying why not.
``MAX_HEAD_DIM``
    the largest head dimension D the backend accepts.
``cluster_attention(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale, deterministic)``
    differentiable; receives arguments already checked and normalised by :func:`check_inputs`.
``weighted_features(weights, feat, member_idx)``
    differentiable.
"""

from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass

import torch

from . import reference

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "check_inputs",
    "cluster_attention",
    "resolve_backend",
    "weighted_features",
]

BACKENDS = ("reference", "triton", "cuda")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


class _ReferenceBackend:
    """Adapter giving the reference module the backend interface."""

    MAX_HEAD_DIM = 1 << 30

    @staticmethod
    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    @staticmethod
    def cluster_attention(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale,
                          deterministic):
        return reference.cluster_attention(
            q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v, scale
        )

    @staticmethod
    def weighted_features(weights, feat, member_idx):
        return reference.weighted_features(weights, feat, member_idx)


_BACKEND_MODULES = {"triton": "cluster.triton_kernels", "cuda": "cluster.cuda_ext"}


def _backend_module(name: str):
    """Import a backend lazily, so that `import cluster` never fails because of one."""
    if name == "reference":
        return _ReferenceBackend, None
    # sys.modules first: torch.compile cannot trace importlib, and after the first call
    # the module is always there, so compiled callers see no graph break.
    mod = sys.modules.get(_BACKEND_MODULES[name])
    if mod is not None:
        return mod, None
    try:
        mod = importlib.import_module(_BACKEND_MODULES[name])
    except Exception as exc:  # ImportError, or a broken install of triton
        return None, f"importing {_BACKEND_MODULES[name]} failed: {type(exc).__name__}: {exc}"
    return mod, None


def _dtype_ok(backend: str, dtype: torch.dtype) -> bool:
    if backend == "cuda":
        return dtype in FLOAT_DTYPES
    return dtype in FLOAT_DTYPES + (torch.float64,)


def backend_unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if backend ``name`` runs on ``device`` with ``dtype``, else why it does not."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}"
    if not _dtype_ok(name, dtype):
        return f"backend {name!r} does not support dtype {dtype}"
    mod, why = _backend_module(name)
    if mod is None:
        return why
    return mod.unavailable_reason(torch.device(device), dtype)


def available_backends(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, str | None]:
    """Map every backend to None (usable here) or the reason it is not."""
    return {name: backend_unavailable_reason(name, torch.device(device), dtype) for name in BACKENDS}


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn ``backend`` (possibly "auto") into a concrete, usable backend name or raise."""
    if backend == "auto":
        # On the CPU the reference beats the Triton interpreter by orders of magnitude,
        # so "auto" only picks a kernel backend on a GPU.
        if device.type == "cuda":
            for name in ("triton", "cuda"):
                if backend_unavailable_reason(name, device, dtype) is None:
                    return name
        return "reference"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS + ('auto',)}, got {backend!r}")
    why = backend_unavailable_reason(backend, device, dtype)
    if why is not None:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable: {why}")
    return backend


@dataclass
class CheckedInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    member_idx: torch.Tensor
    pe_table: torch.Tensor | None
    pe_idx: torch.Tensor | None
    mask: torch.Tensor | None
    blank_k: torch.Tensor | None
    blank_v: torch.Tensor | None
    scale: float
    backend: str


def _expect_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def _expect_shape(name: str, x: torch.Tensor, shape: tuple, what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {what} = {tuple(shape)}, got {tuple(x.shape)}")


def _expect_device(name: str, x: torch.Tensor, device: torch.device, ref: str = "q") -> None:
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of {ref}), got {x.device}")


def _expect_index(name: str, x: torch.Tensor, upper: int, upper_name: str,
                  check_range: bool) -> tuple | None:
    """The dtype check now; the range check, if wanted, as a spec for :func:`_check_ranges`."""
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected dtype int32 or int64, got {x.dtype}")
    return (name, x, upper, upper_name) if check_range and x.numel() > 0 else None


def _check_ranges(specs) -> None:
    """Every index tensor's min and max, read back in one device synchronisation."""
    specs = [s for s in specs if s is not None]
    if not specs:
        return
    bounds = torch.stack([torch.stack(torch.aminmax(x)).long() for _, x, _, _ in specs]).tolist()
    for (name, _, upper, upper_name), (lo, hi) in zip(specs, bounds):
        if lo < 0 or hi >= upper:
            raise IndexError(
                f"{name}: values must lie in [0, {upper_name}) = [0, {upper}), "
                f"found min {lo}, max {hi}"
            )


def _expect_param(name: str, x: torch.Tensor, shape: tuple, what: str, q: torch.Tensor) -> None:
    _expect_tensor(name, x)
    _expect_shape(name, x, shape, what)
    _expect_device(name, x, q.device)
    # Parameters may stay in float32 next to low-precision activations (autocast keeps
    # them so); anything else would be a silent cast and is refused.
    low = q.dtype in (torch.float16, torch.bfloat16)
    if x.dtype != q.dtype and not (low and x.dtype == torch.float32):
        also = " or torch.float32" if low else ""
        raise TypeError(f"{name}: expected dtype {q.dtype} (that of q){also}, got {x.dtype}")


def check_inputs(
    q, k, v, member_idx, *, pe_table=None, pe_idx=None, mask=None, blank_k=None, blank_v=None,
    scale=None, backend="auto", check_indices=True,
) -> CheckedInputs:
    """Every argument check of :func:`cluster_attention`, in one place, before any launch.

    Raises TypeError (wrong type or dtype), ValueError (shape, device, pairing, scale,
    backend name), IndexError (index out of range, only if ``check_indices``; it costs one
    device synchronisation) or BackendUnavailableError. Returns normalised arguments:
    the mask becomes bool, ``scale`` a float, ``backend`` a concrete backend name.
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("member_idx", member_idx)):
        _expect_tensor(name, x)
    if q.dim() != 4:
        raise ValueError(f"q: expected 4 dims [B, H, N, D], got shape {tuple(q.shape)}")
    B, H, N, D = q.shape
    if D < 1:
        raise ValueError("q: head dimension D must be >= 1")
    allowed = FLOAT_DTYPES + (torch.float64,)
    if q.dtype not in allowed:
        raise TypeError(f"q: expected dtype float32, float16, bfloat16 or float64, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        _expect_shape(name, x, q.shape, "[B, H, N, D] of q")
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (that of q), got {x.dtype}")
        _expect_device(name, x, q.device)

    if member_idx.dim() != 3 or member_idx.shape[0] != B or member_idx.shape[1] != N:
        raise ValueError(
            f"member_idx: expected shape [B, N, M] with B={B}, N={N}, got {tuple(member_idx.shape)}"
        )
    M = member_idx.shape[2]
    if M < 1:
        raise ValueError("member_idx: expected M >= 1 neighbours per query, got M=0")
    _expect_device("member_idx", member_idx, q.device)
    ranges = [_expect_index("member_idx", member_idx, N, "N", check_indices)]

    if (pe_table is None) != (pe_idx is None):
        raise ValueError("pe_table and pe_idx: give both or neither")
    if pe_table is not None:
        _expect_tensor("pe_table", pe_table)
        _expect_tensor("pe_idx", pe_idx)
        if pe_table.dim() != 2 or pe_table.shape[1] != H:
            raise ValueError(f"pe_table: expected shape [T, H] with H={H}, got {tuple(pe_table.shape)}")
        if pe_table.shape[0] < 1:
            raise ValueError("pe_table: expected at least one row (T >= 1)")
        _expect_param("pe_table", pe_table, tuple(pe_table.shape), "[T, H]", q)
        _expect_shape("pe_idx", pe_idx, (B, N, M), "[B, N, M] of member_idx")
        _expect_device("pe_idx", pe_idx, q.device)
        ranges.append(_expect_index("pe_idx", pe_idx, pe_table.shape[0], "T", check_indices))

    if mask is not None:
        _expect_tensor("mask", mask)
        _expect_shape("mask", mask, (B, N, M), "[B, N, M] of member_idx")
        _expect_device("mask", mask, q.device)
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"mask: expected a bool or integer tensor (nonzero = valid), got {mask.dtype}")
        if mask.dtype != torch.bool:
            mask = mask != 0

    if (blank_k is None) != (blank_v is None):
        raise ValueError("blank_k and blank_v: give both or neither")
    if blank_k is not None:
        _expect_param("blank_k", blank_k, (H, D), "[H, D]", q)
        _expect_param("blank_v", blank_v, (H, D), "[H, D]", q)

    if scale is None:
        scale = D**-0.5
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite Python number or None, got {scale!r}")

    _check_ranges(ranges)
    name = resolve_backend(backend, q.device, q.dtype)
    limit = _backend_module(name)[0].MAX_HEAD_DIM
    if D > limit:
        raise ValueError(f"q: head dimension D={D} exceeds backend {name!r}'s limit of {limit}")
    return CheckedInputs(q, k, v, member_idx, pe_table, pe_idx, mask, blank_k, blank_v,
                         float(scale), name)


def cluster_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    member_idx: torch.Tensor,
    *,
    pe_table: torch.Tensor | None = None,
    pe_idx: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    blank_k: torch.Tensor | None = None,
    blank_v: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    deterministic: bool | None = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """Cluster attention: each query attends to its listed neighbours plus a blank token.

    Args:
        q, k, v: ``[B, H, N, D]``, float32 / float16 / bfloat16 (float64 on the reference
            and triton backends), one dtype for all three.
        member_idx: ``[B, N, M]`` int32/int64 in ``[0, N)``, shared by all heads; duplicates
            count once per occurrence; masked slots must hold in-range indices too.
        pe_table: ``[T, H]`` per-head bias table, with ``pe_idx``: ``[B, N, M]`` in ``[0, T)``.
        mask: ``[B, N, M]`` bool or integer, nonzero = valid; None = all valid.
        blank_k, blank_v: ``[H, D]`` extra key/value per head (both or neither).
        scale: logit scale, default ``D ** -0.5``.
        backend: "auto" | "reference" | "triton" | "cuda".
        deterministic: backward without float atomics and in a fixed summation order,
            bitwise reproducible; otherwise some gradients (triton: d_pe_table, dk, dv) are
            equal only up to rounding between runs. None follows
            ``torch.are_deterministic_algorithms_enabled()``.
        check_indices: check index ranges (one device sync); switch off only for inputs
            already known to be valid.

    Returns ``[B, H, N, D]`` in q's dtype. Parameters (pe_table, blank_*) may be float32
    beside low-precision q; their gradients come back in their own dtype. The triton
    backend lays the output and q's gradient out in memory as q is (dense, in the order of
    q's strides): for a q that is a ``[B, N, H, D]`` buffer seen as ``[B, H, N, D]``, the
    output's ``permute(0, 2, 1, 3).reshape(B, N, H * D)`` copies nothing.
    """
    a = check_inputs(
        q, k, v, member_idx, pe_table=pe_table, pe_idx=pe_idx, mask=mask, blank_k=blank_k,
        blank_v=blank_v, scale=scale, backend=backend, check_indices=check_indices,
    )
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if a.q.numel() == 0:
        # Nothing to launch; the reference keeps the autograd graph connected.
        mod = _ReferenceBackend
    else:
        mod = _backend_module(a.backend)[0]
    return mod.cluster_attention(
        a.q, a.k, a.v, a.member_idx, a.pe_table, a.pe_idx, a.mask, a.blank_k, a.blank_v,
        a.scale, bool(deterministic),
    )


def weighted_features(
    weights: torch.Tensor,
    feat: torch.Tensor,
    member_idx: torch.Tensor,
    *,
    backend: str = "auto",
    check_indices: bool = True,
) -> torch.Tensor:
    """``out[b,i,w,c] = sum_j weights[b,i,j,w] * feat[b, member_idx[b,i,j], c]``.

    weights ``[B, N, M, W]`` and feat ``[B, Nf, C]`` share one float dtype; member_idx
    ``[B, N, M]`` int32/int64 in ``[0, Nf)``. Returns ``[B, N, W, C]``.
    """
    _expect_tensor("weights", weights)
    _expect_tensor("feat", feat)
    _expect_tensor("member_idx", member_idx)
    if member_idx.dim() != 3:
        raise ValueError(f"member_idx: expected shape [B, N, M], got {tuple(member_idx.shape)}")
    B, N, M = member_idx.shape
    if feat.dim() != 3 or feat.shape[0] != B:
        raise ValueError(f"feat: expected shape [B, Nf, C] with B={B}, got {tuple(feat.shape)}")
    if weights.dim() != 4 or tuple(weights.shape[:3]) != (B, N, M):
        raise ValueError(
            f"weights: expected shape [B, N, M, W] with (B, N, M)={(B, N, M)}, got {tuple(weights.shape)}"
        )
    if feat.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"feat: expected a float dtype, got {feat.dtype}")
    if weights.dtype != feat.dtype:
        raise TypeError(f"weights: expected dtype {feat.dtype} (that of feat), got {weights.dtype}")
    _expect_device("weights", weights, feat.device, "feat")
    _expect_device("member_idx", member_idx, feat.device, "feat")
    if M < 1:
        raise ValueError("member_idx: expected M >= 1, got M=0")
    _check_ranges([_expect_index("member_idx", member_idx, feat.shape[1], "Nf", check_indices)])
    name = resolve_backend(backend, feat.device, feat.dtype)
    if weights.numel() == 0 or feat.numel() == 0:
        name = "reference"
    return _backend_module(name)[0].weighted_features(weights, feat, member_idx)
