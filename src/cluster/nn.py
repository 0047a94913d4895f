"""AutoFocusFormer-compatible attention module.

``ClusterAttention`` keeps AFF's parameter names and shapes (``q``, ``kv``, ``blank_k``,
``blank_v``, ``pos_embed``, ``proj``) so an AFF checkpoint's state_dict loads unchanged, and
AFF's call ``forward(feat, member_idx, cluster_mask, pe_idx, global_attn)``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, reference
from .neighbors import relative_position_table

__all__ = ["ClusterAttention"]


class ClusterAttention(nn.Module):
    """Local attention over nearest clusters (or global attention), AFF's module.

    Args:
        dim: channels C. num_heads: heads H (C % H == 0).
        attn_drop: dropout on attention weights. The fused kernels have no dropout, so in
            training with ``attn_drop > 0`` the local path runs the reference computation
            (and says so once per module with a warning).
        proj_drop: dropout after the output projection.
        backend: "auto" | "reference" | "triton" | "cuda" for the local path.
        fallback: if the chosen backend cannot run on the input's device/dtype, warn once
            and use the reference backend instead of raising.
        rel_pos_width: R of the relative-position table ((2R+1)^2 rows); AFF uses
            ``img_size // 4 - 1`` (55 for 224-pixel images).
        deterministic: passed to the op (None follows torch's deterministic setting).
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 backend: str = "auto", *, fallback: bool = False, rel_pos_width: int = 55,
                 deterministic: bool | None = None):
        super().__init__()
        if dim < 1 or num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if backend != "auto" and backend not in ops.BACKENDS:
            raise ValueError(f"backend: expected one of {ops.BACKENDS + ('auto',)}, got {backend!r}")
        self.dim = dim
        self.pos_dim = 2
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.backend = backend
        self.fallback = fallback
        self.deterministic = deterministic
        self.rel_pos_width = rel_pos_width

        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.blank_k = nn.Parameter(torch.randn(dim))
        self.blank_v = nn.Parameter(torch.randn(dim))
        self.pos_embed = nn.Linear(self.pos_dim + 3, num_heads)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # Not persistent: AFF keeps the table outside the state_dict, and so must we for
        # checkpoints to load unchanged.
        self.register_buffer("pre_table", relative_position_table(rel_pos_width), persistent=False)
        self._warned: set[str] = set()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, backend={self.backend!r}, "
                f"rel_pos_width={self.rel_pos_width}")

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _local_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        if self.backend == "auto" or not self.fallback:
            return self.backend
        why = ops.backend_unavailable_reason(self.backend, device, dtype)
        if why is None:
            return self.backend
        self._warn_once(f"fallback-{device.type}-{dtype}",
                        f"ClusterAttention: backend {self.backend!r} unavailable ({why}); "
                        "using the reference backend")
        return "reference"

    def forward(self, feat: torch.Tensor, member_idx: torch.Tensor | None,
                cluster_mask: torch.Tensor | None, pe_idx: torch.Tensor,
                global_attn: bool) -> torch.Tensor:
        """
        Args:
            feat: [B, N, C] token features.
            member_idx: [B, N, M] neighbour token indices (ignored when global_attn).
            cluster_mask: [B, N, M] nonzero = valid neighbour, or None
                (global mode: None or [B, N, N]).
            pe_idx: [B, N, M] (local) or [B, N, N] (global) rows of the position table.
            global_attn: attend to all N tokens instead of the neighbourhood.
        Returns [B, N, C].
        """
        if not isinstance(feat, torch.Tensor) or feat.dim() != 3 or feat.shape[-1] != self.dim:
            got = tuple(feat.shape) if isinstance(feat, torch.Tensor) else type(feat).__name__
            raise ValueError(f"feat: expected shape [B, N, C] with C={self.dim}, got {got}")
        b, n, c = feat.shape
        h = self.num_heads
        d = c // h
        q = self.q(feat).view(b, n, h, d).permute(0, 2, 1, 3)  # b x h x n x d, a view
        kv = self.kv(feat).view(b, n, h, 2, d).permute(3, 0, 2, 1, 4)  # 2 x b x h x n x d
        k, v = kv[0], kv[1]
        pe_table = self.pos_embed(self.pre_table.to(feat.dtype))  # T x h
        blank_k = self.blank_k.view(h, d)
        blank_v = self.blank_v.view(h, d)

        if global_attn:
            out = self._global(q, k, v, pe_table, pe_idx, cluster_mask, blank_k, blank_v)
        else:
            if member_idx is None:
                raise ValueError("member_idx: required when global_attn is False")
            if self.training and self.attn_drop.p > 0:
                self._warn_once("attn_drop", "ClusterAttention: attn_drop > 0 in training runs "
                                "the reference (unfused) path; the fused kernels have no dropout")
                out = reference.cluster_attention(
                    q, k, v, member_idx, pe_table, pe_idx, cluster_mask, blank_k, blank_v,
                    self.scale, attn_dropout=self.attn_drop,
                )
            else:
                out = ops.cluster_attention(
                    q, k, v, member_idx, pe_table=pe_table, pe_idx=pe_idx, mask=cluster_mask,
                    blank_k=blank_k, blank_v=blank_v, scale=self.scale,
                    backend=self._local_backend(q.device, q.dtype),
                    deterministic=self.deterministic,
                )
        out = out.permute(0, 2, 1, 3).reshape(b, n, c)
        return self.proj_drop(self.proj(out))

    def _global(self, q, k, v, pe_table, pe_idx, cluster_mask, blank_k, blank_v):
        b, h, n, d = q.shape
        if not isinstance(pe_idx, torch.Tensor) or tuple(pe_idx.shape) != (b, n, n):
            got = tuple(pe_idx.shape) if isinstance(pe_idx, torch.Tensor) else type(pe_idx).__name__
            raise ValueError(f"pe_idx: expected shape [B, N, N] = {(b, n, n)} in global mode, got {got}")
        bias = pe_table[pe_idx.long()].permute(0, 3, 1, 2)  # b x h x n x n
        if cluster_mask is not None:
            if tuple(cluster_mask.shape) != (b, n, n):
                raise ValueError(f"cluster_mask: expected None or shape [B, N, N] = {(b, n, n)} "
                                 f"in global mode, got {tuple(cluster_mask.shape)}")
            bias = bias.masked_fill((cluster_mask == 0).unsqueeze(1), float("-inf"))
        # The blank token is one more key with zero bias; it keeps every row non-empty.
        k = torch.cat([k, blank_k.to(k.dtype)[None, :, None, :].expand(b, h, 1, d)], dim=2)
        v = torch.cat([v, blank_v.to(v.dtype)[None, :, None, :].expand(b, h, 1, d)], dim=2)
        bias = torch.cat([bias, bias.new_zeros(b, h, n, 1)], dim=-1)
        p = self.attn_drop.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p,
                                              scale=self.scale)
