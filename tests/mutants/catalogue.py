"""The planted bugs of ``nox -s mutants``: one plausible mistake per entry, as exact text.

Each entry names the file (relative to the repository root), says in one line what the
bug is, gives the exact original text (it must occur exactly once in the file:
tests/mutants/test_catalogue.py checks this) and its replacement, and the pytest
arguments a maintainer would run for that module (paths, ``-k`` selections). An entry
with ``equivalent`` set is a change that cannot be a bug (same results); it is run like
the others and reported as "equivalent" with that reason, outside the score.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    id: str
    module: str
    what: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    equivalent: str = ""


# ----------------------------------------------------------------- test selections
# The union map and kernels (AFF's per-token lists of whole clusters), against Python and
# the float64 reference.
UNION = ("tests/backward/test_union.py",)
DOC = "tests/integration/test_documented_behaviour.py"
NEIGHBORS = ("tests/integration/test_neighbors.py", "tests/integration/test_neighborhood_lists.py",
             DOC, "-k", "not keops and not cuda")
MODULE = ("tests/integration/test_module.py", DOC)
VALIDATION = ("tests/integration/test_validation.py", DOC)
SUITE_CHECKS = ("tests/integration/test_suite_catches_bugs.py",)
# The reference against the per-query loop, the module and the triton backend on both
# kinds of lists (config_1_small: "aff" and "cluster"), forward and backward.
REFERENCE = ("tests/forward/test_forward.py", "tests/backward/test_backward.py",
             "tests/integration/test_module.py", DOC, "-k",
             "loop_definition or empty_rows_without_blank or global_mode or local_equals_op"
             " or dropout")
# Triton on AFF's per-token lists and the shared lists (make_inputs lists="aff"/"cluster")
TRITON_FWD = ("tests/forward/test_forward.py", "-k",
              "test_forward_matches_reference and triton and config_1_small and fp32")
TRITON_BWD = ("tests/backward/test_backward.py", "-k",
              "test_gradients_match_reference and triton and config_1_small and fp32")
# The group kernels (shared lists, and groups whose lists differ: "strays")
GROUP_FWD = ("tests/forward/test_triton_kernels.py", "-k",
             "test_group_shared_lists_fp32 and n61_h3_d12_m24 and pe_mask_blank")
GROUP_BWD_Q = ("tests/backward/test_triton_backward.py", "-k",
               "test_group_shared_lists_backward_fp32 and n61_h3_d12_m24 and pe_mask_blank")
# The group test (common._group_slots) is shared by the group forward and the query-cluster
# backward: in the forward the per-query kernel redoes the groups its own test finds
# broken, so the backward's sums (blank, bias table) are where a wrong verdict shows.
GROUP_FWD_BWD = ("tests/forward/test_triton_kernels.py", "tests/backward/test_triton_backward.py",
                 "-k", "(test_group_shared_lists_fp32 or test_group_shared_lists_backward_fp32)"
                 " and n61_h3_d12_m24 and pe_mask_blank")
KEY_CLUSTER = ("tests/backward/test_triton_backward.py", "-k",
               "test_key_cluster_backward_fp32 and n61_h3_d12_m24 and pe_mask_blank")
WEIGHTED = ("tests/forward/test_triton_kernels.py", "tests/forward/test_documented_kernels.py",
            "-k", "weighted_features")

TK = "src/cluster/triton_kernels/"

CATALOGUE: tuple[Mutant, ...] = (
    # ------------------------------------------------------------- reference
    Mutant("reference-blank-unscaled", "src/cluster/reference.py",
           "the blank's logit is not multiplied by the scale",
           "blank_logit = scale * (q * blank_k.to(dt)[None, :, None, :]).sum(-1, keepdim=True)",
           "blank_logit = (q * blank_k.to(dt)[None, :, None, :]).sum(-1, keepdim=True)",
           REFERENCE),
    Mutant("reference-dropout-spares-blank", "src/cluster/reference.py",
           "attention dropout applied to the neighbours' weights only, not the blank's",
           "    if attn_dropout is not None:\n        p = attn_dropout(p)\n"
           "    if blank_k is not None:\n        p, p_blank = p[..., :-1], p[..., -1:]\n",
           "    if blank_k is not None:\n        p, p_blank = p[..., :-1], p[..., -1:]\n"
           "    if attn_dropout is not None:\n        p = attn_dropout(p)\n",
           REFERENCE),
    Mutant("reference-empty-row-nan", "src/cluster/reference.py",
           "masked_softmax divides by a zero denominator on rows with nothing valid (NaN)",
           "denom = torch.where(denom > 0, denom, torch.ones_like(denom))",
           "denom = denom",
           REFERENCE),
    Mutant("reference-global-key-mask-inverted", "src/cluster/reference.py",
           "global_attention keeps the masked keys and drops the valid ones",
           "valid = (key_mask != 0)[:, None, None, :]", "valid = (key_mask == 0)[:, None, None, :]",
           REFERENCE),
    # ------------------------------------------------------------- ops
    Mutant("ops-refuse-float32-params", "src/cluster/ops.py",
           "float32 parameters beside 16-bit activations refused",
           "if x.dtype != q.dtype and not (low and x.dtype == torch.float32):",
           "if x.dtype != q.dtype:",
           VALIDATION),
    Mutant("ops-accept-any-float-param", "src/cluster/ops.py",
           "a parameter of any float dtype accepted (a silent cast)",
           "if x.dtype != q.dtype and not (low and x.dtype == torch.float32):",
           "if x.dtype != q.dtype and x.dtype not in FLOAT_DTYPES + (torch.float64,):",
           VALIDATION),
    Mutant("ops-kv-dtype-unchecked", "src/cluster/ops.py",
           "k / v of another dtype than q accepted",
           "if x.dtype != q.dtype:\n", "if False:\n",
           VALIDATION),
    Mutant("ops-deterministic-none-false", "src/cluster/ops.py",
           "deterministic=None resolves to False whatever torch asks for",
           "deterministic = torch.are_deterministic_algorithms_enabled()", "deterministic = False",
           VALIDATION),
    Mutant("ops-deterministic-explicit-ignored", "src/cluster/ops.py",
           "an explicit deterministic is overridden by torch's global flag",
           "a.scale, bool(deterministic),", "a.scale, torch.are_deterministic_algorithms_enabled(),",
           VALIDATION),
    Mutant("ops-index-range-off-by-one", "src/cluster/ops.py",
           "an index equal to the upper bound (N or T) passes the range check",
           "if lo < 0 or hi >= upper:", "if lo < 0 or hi > upper:",
           VALIDATION),
    Mutant("ops-int-mask-negative-invalid", "src/cluster/ops.py",
           "integer masks: negative values read as invalid (documented: nonzero = valid)",
           "mask = mask != 0", "mask = mask > 0",
           VALIDATION),
    Mutant("ops-default-scale", "src/cluster/ops.py",
           "default scale D ** 0.5 instead of D ** -0.5",
           "scale = D**-0.5", "scale = D**0.5",
           VALIDATION),
    # ------------------------------------------------------------- nn
    Mutant("nn-global-dropout-in-eval", "src/cluster/nn.py",
           "global mode drops attention weights in eval mode too",
           "p = self.attn_drop.p if self.training else 0.0", "p = self.attn_drop.p",
           MODULE),
    Mutant("nn-eval-takes-unfused-path", "src/cluster/nn.py",
           "eval mode with attn_drop > 0 runs the reference path instead of the backend's op",
           "if self.training and self.attn_drop.p > 0:", "if self.attn_drop.p > 0:",
           MODULE),
    Mutant("nn-train-dropout-missing", "src/cluster/nn.py",
           "the training path with attn_drop > 0 applies no attention dropout",
           "a.scale, attn_dropout=self.attn_drop,", "a.scale, attn_dropout=None,",
           MODULE),
    Mutant("nn-scale-over-channels", "src/cluster/nn.py",
           "logit scale from all channels C instead of the head dim",
           "self.scale = (dim // num_heads) ** -0.5", "self.scale = dim ** -0.5",
           MODULE),
    Mutant("nn-global-mask-inverted", "src/cluster/nn.py",
           "global mode masks the valid keys instead of the invalid ones",
           "bias.masked_fill((cluster_mask == 0).unsqueeze(1)",
           "bias.masked_fill((cluster_mask != 0).unsqueeze(1)",
           MODULE),
    Mutant("nn-deterministic-not-passed", "src/cluster/nn.py",
           "the module's deterministic argument never reaches the op",
           "deterministic=self.deterministic, check_indices=self.check_indices,",
           "deterministic=None, check_indices=self.check_indices,",
           MODULE),
    # ------------------------------------------------------------- neighbors
    Mutant("neighbors-mean-over-padding", "src/cluster/neighbors.py",
           "the short last cluster's mean divides by the full cluster size",
           "counts[-1] = cs - pad", "counts[-1] = cs",
           NEIGHBORS),
    Mutant("neighbors-pad-with-last-token", "src/cluster/neighbors.py",
           "the short last cluster is padded with copies of its last token before the mean",
           "pos_s.new_zeros(B, pad, 2, dtype=torch.float64)",
           "pos_s[:, -1:].detach().double().expand(B, pad, 2)",
           NEIGHBORS),
    Mutant("neighbors-padding-slot-valid", "src/cluster/neighbors.py",
           "AFF lists: the first padding slot of the short cluster counted as valid",
           "cluster_mask = members < N", "cluster_mask = members <= N",
           NEIGHBORS),
    Mutant("neighbors-aff-lists-from-cluster-mean", "src/cluster/neighbors.py",
           "AFF lists ranked from the token's cluster mean, not the token's own position",
           "nearest = knn(pos_s, means, nnc, method=knn_method)",
           "nearest = knn(means.repeat_interleave(cs, 1)[:, :N].float(), means, nnc, method=knn_method)",
           NEIGHBORS),
    Mutant("neighbors-pe-idx-dx-dy-swapped", "src/cluster/neighbors.py",
           "pe_idx rows built with dx and dy swapped",
           "pe_idx = off[..., 1].mul_(width).add_(off[..., 0])",
           "pe_idx = off[..., 0].mul_(width).add_(off[..., 1])",
           NEIGHBORS),
    Mutant("neighbors-hilbert-weight", "src/cluster/neighbors.py",
           "the Hilbert index weights a level by s instead of s * s (curve no longer compact)",
           "d += s * s * ((3 * rx.long()) ^ ry.long())", "d += s * ((3 * rx.long()) ^ ry.long())",
           NEIGHBORS),
    Mutant("neighbors-shared-lists-not-self-first", "src/cluster/neighbors.py",
           "shared lists: a cluster's own id is no longer forced first",
           "return torch.where(is_own.any(-1, keepdim=True), moved, prepended)",
           "return nearest",
           NEIGHBORS),
    # ------------------------------------------------------------- testing
    Mutant("testing-fp32-tolerance-any", "src/cluster/testing.py",
           "within_fp32_tolerance passes when any element (not all) is close",
           "return bool(ok.all())", "return bool(ok.any())",
           SUITE_CHECKS + (DOC,)),
    Mutant("testing-duplicates-recipe-noop", "src/cluster/testing.py",
           "make_inputs(duplicates=True) makes no duplicated neighbours",
           "member_idx = torch.where(dup, member_idx[..., :1].expand_as(member_idx), member_idx)",
           "member_idx = member_idx",
           SUITE_CHECKS + (DOC,)),
    Mutant("testing-lists-ignored", "src/cluster/testing.py",
           "make_inputs ignores lists= (every input gets AFF's lists)",
           "R=R, knn_method=knn_method, lists=lists)", "R=R, knn_method=knn_method)",
           SUITE_CHECKS + (DOC,)),
    Mutant("testing-lowp-bound-loose", "src/cluster/testing.py",
           "within_lowp_rule's bound gets an absolute term of 1 (passes almost anything)",
           "bound = LOWP_FACTOR * pt_err + lowp_atol(ref, dtype)",
           "bound = LOWP_FACTOR * pt_err + 1.0",
           SUITE_CHECKS + (DOC,)),
    # ------------------------------------------------------------- triton kernels
    Mutant("triton-fwd-mask-ignored", TK + "forward.py",
           "forward (per-query and LEAD rows): masked slots keep their logits",
           "        s = tl.where(ok, s, NEG_INF)\n        m_new", "        s = s\n        m_new",
           TRITON_FWD),
    Mutant("triton-fwd-blank-value-dropped", TK + "forward.py",
           "forward rows: the blank's value is not added to the output",
           "acc = tl.zeros([BLOCK_Q, BLOCK_D], ACC) + bv[None, :]",
           "acc = tl.zeros([BLOCK_Q, BLOCK_D], ACC)",
           TRITON_FWD),
    Mutant("triton-fwd-shared-list-bias-dropped", TK + "forward.py",
           "forward, shared list (LEAD path): the position bias is left out",
           "            s += tl.load(PE + pe * spet + h * speh, mask=ok, other=0.0).to(ACC)\n        else:",
           "            s += 0.0\n        else:",
           GROUP_FWD),
    Mutant("triton-group-test-always-shared", TK + "common.py",
           "the group test calls every group shared, so per-token lists go to the group kernel",
           "stray = tl.max(tl.max((ok & (idx != lead[None, :])).to(tl.int32), 1), 0)",
           "stray = tl.max(tl.max((ok & (idx != idx)).to(tl.int32), 1), 0)",
           GROUP_FWD_BWD),
    Mutant("triton-broken-rows-inverted", TK + "common.py",
           "after a group kernel the per-query kernel takes the shared groups, not the broken ones",
           "return q_ok & (rows > 0)", "return q_ok & (rows == 0)",
           GROUP_FWD),
    Mutant("triton-broken-rows-all", TK + "common.py",
           "after a group kernel the per-query kernel redoes every row, shared groups too",
           "return q_ok & (rows > 0)", "return q_ok & (rows >= 0)",
           GROUP_FWD,
           equivalent="the per-query kernel computes any row correctly, so recomputing the "
                      "shared groups stores the same values over the group kernel's (only "
                      "slower); no output can tell"),
    Mutant("triton-bwd-q-delta-missing", TK + "backward_q.py",
           "per-query dq: ds = p * dp without subtracting delta",
           "        ds = p * (dp - delta[:, None])\n        dq += tl.sum(",
           "        ds = p * dp\n        dq += tl.sum(",
           TRITON_BWD),
    Mutant("triton-bwd-blank-ds-delta-missing", TK + "backward_q.py",
           "the blank's ds without subtracting delta",
           "dsb = pb * (tl.sum(do * bv[None, :], 1) - delta)", "dsb = pb * tl.sum(do * bv[None, :], 1)",
           TRITON_BWD),
    Mutant("triton-bwd-group-dq-from-p", TK + "backward_q.py",
           "query-cluster (group) backward: dq accumulates p k instead of ds k",
           "dq += _mma(ds.to(k.dtype), k, UPCAST).to(ACC)\n            _bwd_q_dpe(",
           "dq += _mma(p.to(k.dtype), k, UPCAST).to(ACC)\n            _bwd_q_dpe(",
           GROUP_BWD_Q),
    Mutant("triton-bwd-kv-dv-from-ds", TK + "backward_kv.py",
           "per-key backward: dv accumulates ds dout instead of p dout",
           "dv += tl.sum(p[:, :, None] * dot, 1)", "dv += tl.sum(ds[:, :, None] * dot, 1)",
           TRITON_BWD),
    Mutant("triton-bwd-kv-dk-unscaled", TK + "backward_kv.py",
           "dk stored without the logit scale",
           "dk = dk * scale_hi + dk * scale_lo", "dk = dk",
           TRITON_BWD),
    Mutant("triton-bwd-key-cluster-dv-from-ds", TK + "backward_kv.py",
           "key-cluster (group) backward: dv accumulates ds dout instead of p dout",
           "dv += _mma(p.to(dot.dtype), dot, UPCAST).to(ACC)", "dv += _mma(ds.to(dot.dtype), dot, UPCAST).to(ACC)",
           KEY_CLUSTER),
    Mutant("triton-union-map-duplicates-merged", TK + "union.py",
           "union map: a query naming one cluster twice gets one entry (its second use lost)",
           "key = tl.where(cid >= 0, cid * JB + occ, -1)", "key = tl.where(cid >= 0, cid * JB, -1)",
           UNION),
    Mutant("triton-union-map-straddle-unchecked", TK + "union.py",
           "union map: a slot block naming tokens of two clusters passes as whole",
           "bad_c = used & ((hi != lo) | (hi % GROUP != 0) | oor)",
           "bad_c = used & ((hi % GROUP != 0) | oor)",
           UNION),
    Mutant("triton-union-map-follows-masked-lead", TK + "union.py",
           "union map: a query takes the lead's entries where the lead masks a block it lists",
           "(ok & (~lead_ok | (idx != lead)))", "(ok & (idx != lead))",
           UNION),
    Mutant("triton-union-mask-ignored", TK + "union.py",
           "union kernels: masked slots of a listed cluster count",
           "        ok = ok & (tl.load(MASK + off, mask=listed, other=0) != 0)\n    return",
           "        ok = ok\n    return",
           UNION),
    Mutant("triton-key-cluster-slot-ignored", TK + "backward_kv.py",
           "key-cluster backward: queries of a group that do not name the cluster contribute",
           "q_ok = e_ok & (qi < N) & (jq >= 0)", "q_ok = e_ok & (qi < N)",
           UNION),
    Mutant("triton-dq-store-contiguous-stride", TK + "backward_q.py",
           "per-query backward: dq stored with [B, H, N, D] strides, not out's (q's layout)",
           "\n    tl.store(DQ + h * soh + offs_q[:, None] * son",
           "\n    tl.store(DQ + h * N * D + offs_q[:, None] * D",
           ("tests/backward/test_union.py", "-k", "module_layout")),
    Mutant("triton-dk-store-contiguous-stride", TK + "backward_kv.py",
           "key-cluster backward: dk / dv stored with [B, H, N, D] strides, not k's layout",
           "_bwd_kv_store(DK, DV, (h + hr) * sdkh + keys * sdkn, dc,",
           "_bwd_kv_store(DK, DV, (h + hr) * N * D + keys * D, dc,",
           ("tests/backward/test_union.py", "-k", "module_layout")),
    Mutant("triton-dk-rows-store-contiguous-stride", TK + "backward_kv.py",
           "per-key backward: dk / dv stored with [B, H, N, D] strides, not k's layout",
           "_bwd_kv_store(DK, DV, h * sdkh + offs_k * sdkn, offs_d,",
           "_bwd_kv_store(DK, DV, h * N * D + offs_k * D, offs_d,",
           ("tests/backward/test_union.py", "-k", "module_layout")),
    Mutant("triton-token-map-skipped-when-flagged", TK + "backward.py",
           "key side: no token-level map (nor per-key kernel) even for batches the map flags",
           "tokens = kv_group is None or flags is None or flags.any() is not False",
           "tokens = kv_group is None",
           ("tests/backward/test_union.py", "-k", "token_map")),
    Mutant("triton-reverse-map-fill-off-by-one", TK + "reverse_map.py",
           "the counting sort's fill writes each entry one place late",
           "mask=ok, sem=\"relaxed\") - 1", "mask=ok, sem=\"relaxed\")",
           TRITON_BWD),
    Mutant("triton-weighted-no-accumulate", TK + "weighted.py",
           "weighted_features keeps only the last chunk of slots",
           "            acc += tl.sum(wt[:, :, None] * ft, 1)", "            acc = tl.sum(wt[:, :, None] * ft, 1)",
           WEIGHTED),
)
