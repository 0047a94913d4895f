// Operator schemas, argument checks and host-side glue of the unfused cluster-attention
// ops (torch.ops.cluster.*). Kernels are in cluster_kernels.cu; fake (meta) impls and
// autograd formulas are registered from Python in cluster/cuda_ext.py, which is why the
// library names that module with set_python_module.
//
// Every op takes `deterministic`; forwards ignore it, it is in their schema only so the
// Python autograd formula can hand it on to the matching backward, where True swaps the
// atomic scatter for a gather through a sorted reverse map (bitwise reproducible).

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <Python.h>

#include <initializer_list>
#include <string>
#include <tuple>
#include <utility>

namespace cluster_ext {

void launch_gather_dot(const at::TensorBase& x, const at::TensorBase& y, const at::TensorBase& idx,
                       const at::TensorBase& out);
void launch_gather_wsum(const at::TensorBase& w, const at::TensorBase& y, const at::TensorBase& idx,
                        const at::TensorBase& out);
void launch_scatter_atomic(const at::TensorBase& w, const at::TensorBase& x, const at::TensorBase& idx,
                           const at::TensorBase& dy_acc);
void launch_scatter_csr(const at::TensorBase& w, const at::TensorBase& x, const at::TensorBase& perm,
                        const at::TensorBase& ptr, const at::TensorBase& dy);
void launch_wf_forward(const at::TensorBase& weights, const at::TensorBase& feat,
                       const at::TensorBase& idx, const at::TensorBase& out);
void launch_wf_grad_weights(const at::TensorBase& grad_out, const at::TensorBase& feat,
                            const at::TensorBase& idx, const at::TensorBase& dw);
void launch_wf_grad_feat_atomic(const at::TensorBase& grad_out, const at::TensorBase& weights,
                                const at::TensorBase& idx, const at::TensorBase& df_acc);
void launch_wf_grad_feat_csr(const at::TensorBase& grad_out, const at::TensorBase& weights,
                             const at::TensorBase& perm, const at::TensorBase& ptr,
                             const at::TensorBase& df);

namespace {

using at::Tensor;

constexpr int64_t kAny = -1;

// Messages are built from strings only: integers go through std::to_string, never an
// ostream. On the lent H100 image the extension links its own copy of libstdc++, and a
// stream from that copy formatting an integer faults on the locale of the other copy
// (seen as a segfault in every shape error before this was changed).
std::string dims_str(c10::ArrayRef<int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i > 0) s += ", ";
    s += dims[i] == kAny ? std::string("*") : std::to_string(dims[i]);
  }
  return s + "]";
}

// `layout` names the axes (e.g. "[B, H, N, D]"); kAny marks sizes this op does not pin.
void check_shape(const char* op, const char* name, const Tensor& t, const char* layout,
                 std::initializer_list<int64_t> expected) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  int64_t axis = 0;
  for (int64_t e : expected) {
    if (!ok) break;
    ok = e == kAny || t.size(axis) == e;
    ++axis;
  }
  if (!ok) {
    const std::string msg = std::string(op) + ": " + name + ": expected shape " + layout + " = " +
                            dims_str(c10::ArrayRef<int64_t>(expected.begin(), expected.size())) +
                            ", got " + dims_str(t.sizes());
    TORCH_CHECK(false, msg);
  }
}

void check_float(const char* op, const char* name, const Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op,
              ": ", name, ": expected dtype float32, float16, bfloat16 or float64, got ", st);
}

void check_same_dtype(const char* op, const char* name, const Tensor& t, const char* ref_name,
                      const Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, ": expected dtype ",
              ref.scalar_type(), " (that of ", ref_name, "), got ", t.scalar_type());
}

void check_index(const char* op, const Tensor& idx) {
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, op,
              ": member_idx: expected dtype int32 or int64, got ", idx.scalar_type());
}

void check_device(const char* op, const char* name, const Tensor& t, const char* ref_name,
                  const Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, ": expected a tensor on ", ref.device(),
              " (the device of ", ref_name, "), got ", t.device());
}

at::ScalarType acc_type(const Tensor& t) {
  return at::toOpMathType(t.scalar_type());
}

// For every batch: the flattened (i*M + j) positions of member_idx in ascending key
// order (stable, so ties keep ascending position) and, per key, where its run starts.
// Built from ATen's sort and searchsorted, both deterministic.
std::pair<Tensor, Tensor> reverse_map(const Tensor& idx, int64_t n_keys) {
  const int64_t B = idx.size(0);
  const Tensor flat = idx.reshape({B, idx.size(1) * idx.size(2)}).to(at::kLong);
  Tensor sorted, perm;
  std::tie(sorted, perm) = at::sort(flat, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  const Tensor bounds =
      at::arange(n_keys + 1, flat.options()).unsqueeze(0).expand({B, n_keys + 1}).contiguous();
  Tensor ptr = at::searchsorted(sorted, bounds);
  return {perm.contiguous(), ptr.contiguous()};
}

// dy[b,h,key,:] = sum over (i,j) with idx[b,i,j] == key of w[b,h,i,j] * x[b,h,i,:]
Tensor scatter_rows(const Tensor& w, const Tensor& x, const Tensor& idx, const Tensor& like,
                    bool deterministic) {
  if (like.numel() == 0 || w.numel() == 0 || x.numel() == 0) {
    return at::zeros_like(like, at::MemoryFormat::Contiguous);
  }
  if (deterministic) {
    auto [perm, ptr] = reverse_map(idx, like.size(2));
    Tensor dy = at::empty_like(like, at::MemoryFormat::Contiguous);
    launch_scatter_csr(w, x, perm, ptr, dy);
    return dy;
  }
  Tensor acc = at::zeros(like.sizes(), like.options().dtype(acc_type(like)));
  launch_scatter_atomic(w, x, idx, acc);
  return acc.to(like.scalar_type());
}

void check_attention_operands(const char* op, const Tensor& q_like, const char* q_name,
                              const Tensor& kv, const char* kv_name, const Tensor& idx) {
  check_float(op, q_name, q_like);
  check_shape(op, q_name, q_like, "[B, H, N, D]", {kAny, kAny, kAny, kAny});
  const int64_t B = q_like.size(0), H = q_like.size(1), N = q_like.size(2), D = q_like.size(3);
  check_shape(op, kv_name, kv, "[B, H, Nk, D]", {B, H, kAny, D});
  check_same_dtype(op, kv_name, kv, q_name, q_like);
  check_shape(op, "member_idx", idx, "[B, N, M]", {B, N, kAny});
  check_index(op, idx);
  check_device(op, q_name, q_like, q_name, q_like);
  check_device(op, kv_name, kv, q_name, q_like);
  check_device(op, "member_idx", idx, q_name, q_like);
}

void check_weights(const char* op, const char* name, const Tensor& w, const Tensor& q_like,
                   const char* q_name, const Tensor& idx) {
  check_shape(op, name, w, "[B, H, N, M]",
              {q_like.size(0), q_like.size(1), q_like.size(2), idx.size(2)});
  check_same_dtype(op, name, w, q_name, q_like);
  check_device(op, name, w, q_name, q_like);
}

Tensor qk_forward(const Tensor& q, const Tensor& k, const Tensor& member_idx, bool /*deterministic*/) {
  constexpr const char* op = "cluster::qk_forward";
  check_attention_operands(op, q, "q", k, "k", member_idx);
  const c10::cuda::CUDAGuard guard(q.device());
  const Tensor qc = q.contiguous(), kc = k.contiguous(), ic = member_idx.contiguous();
  Tensor attn = at::empty({q.size(0), q.size(1), q.size(2), member_idx.size(2)}, q.options());
  launch_gather_dot(qc, kc, ic, attn);
  return attn;
}

std::tuple<Tensor, Tensor> qk_backward(const Tensor& grad_attn, const Tensor& q, const Tensor& k,
                                       const Tensor& member_idx, bool deterministic) {
  constexpr const char* op = "cluster::qk_backward";
  check_attention_operands(op, q, "q", k, "k", member_idx);
  check_weights(op, "grad_attn", grad_attn, q, "q", member_idx);
  const c10::cuda::CUDAGuard guard(q.device());
  const Tensor gc = grad_attn.contiguous(), qc = q.contiguous(), kc = k.contiguous();
  const Tensor ic = member_idx.contiguous();
  Tensor dq = at::empty_like(qc);
  launch_gather_wsum(gc, kc, ic, dq);
  Tensor dk = scatter_rows(gc, qc, ic, kc, deterministic);
  return {dq, dk};
}

Tensor av_forward(const Tensor& attn, const Tensor& v, const Tensor& member_idx, bool /*deterministic*/) {
  constexpr const char* op = "cluster::av_forward";
  check_float(op, "attn", attn);
  check_shape(op, "attn", attn, "[B, H, N, M]", {kAny, kAny, kAny, kAny});
  const int64_t B = attn.size(0), H = attn.size(1), N = attn.size(2), M = attn.size(3);
  check_shape(op, "v", v, "[B, H, Nk, D]", {B, H, kAny, kAny});
  check_same_dtype(op, "v", v, "attn", attn);
  check_shape(op, "member_idx", member_idx, "[B, N, M]", {B, N, M});
  check_index(op, member_idx);
  check_device(op, "attn", attn, "attn", attn);
  check_device(op, "v", v, "attn", attn);
  check_device(op, "member_idx", member_idx, "attn", attn);
  const c10::cuda::CUDAGuard guard(attn.device());
  const Tensor ac = attn.contiguous(), vc = v.contiguous(), ic = member_idx.contiguous();
  Tensor out = at::empty({B, H, N, v.size(3)}, v.options());
  launch_gather_wsum(ac, vc, ic, out);
  return out;
}

std::tuple<Tensor, Tensor> av_backward(const Tensor& grad_out, const Tensor& attn, const Tensor& v,
                                       const Tensor& member_idx, bool deterministic) {
  constexpr const char* op = "cluster::av_backward";
  // grad_out has the query-side layout [B, H, N, D]; v is the gathered side.
  check_attention_operands(op, grad_out, "grad_out", v, "v", member_idx);
  check_weights(op, "attn", attn, grad_out, "grad_out", member_idx);
  const c10::cuda::CUDAGuard guard(v.device());
  const Tensor gc = grad_out.contiguous(), ac = attn.contiguous(), vc = v.contiguous();
  const Tensor ic = member_idx.contiguous();
  Tensor d_attn = at::empty_like(ac);
  launch_gather_dot(gc, vc, ic, d_attn);
  Tensor dv = scatter_rows(ac, gc, ic, vc, deterministic);
  return {d_attn, dv};
}

void check_wf_operands(const char* op, const Tensor& weights, const Tensor& feat,
                       const Tensor& member_idx) {
  check_float(op, "feat", feat);
  check_shape(op, "feat", feat, "[B, Nf, C]", {kAny, kAny, kAny});
  check_shape(op, "member_idx", member_idx, "[B, N, M]", {feat.size(0), kAny, kAny});
  check_index(op, member_idx);
  check_shape(op, "weights", weights, "[B, N, M, W]",
              {feat.size(0), member_idx.size(1), member_idx.size(2), kAny});
  check_same_dtype(op, "weights", weights, "feat", feat);
  check_device(op, "feat", feat, "feat", feat);
  check_device(op, "weights", weights, "feat", feat);
  check_device(op, "member_idx", member_idx, "feat", feat);
}

Tensor wf_forward(const Tensor& weights, const Tensor& feat, const Tensor& member_idx,
                  bool /*deterministic*/) {
  constexpr const char* op = "cluster::wf_forward";
  check_wf_operands(op, weights, feat, member_idx);
  const c10::cuda::CUDAGuard guard(feat.device());
  const Tensor wc = weights.contiguous(), fc = feat.contiguous(), ic = member_idx.contiguous();
  Tensor out = at::empty({weights.size(0), weights.size(1), weights.size(3), feat.size(2)},
                         feat.options());
  launch_wf_forward(wc, fc, ic, out);
  return out;
}

std::tuple<Tensor, Tensor> wf_backward(const Tensor& grad_out, const Tensor& weights,
                                       const Tensor& feat, const Tensor& member_idx,
                                       bool deterministic) {
  constexpr const char* op = "cluster::wf_backward";
  check_wf_operands(op, weights, feat, member_idx);
  check_shape(op, "grad_out", grad_out, "[B, N, W, C]",
              {weights.size(0), weights.size(1), weights.size(3), feat.size(2)});
  check_same_dtype(op, "grad_out", grad_out, "feat", feat);
  check_device(op, "grad_out", grad_out, "feat", feat);
  const c10::cuda::CUDAGuard guard(feat.device());
  const Tensor gc = grad_out.contiguous(), wc = weights.contiguous(), fc = feat.contiguous();
  const Tensor ic = member_idx.contiguous();
  Tensor dw = at::empty_like(wc);
  launch_wf_grad_weights(gc, fc, ic, dw);
  Tensor df;
  if (fc.numel() == 0 || wc.numel() == 0) {
    df = at::zeros_like(fc);
  } else if (deterministic) {
    auto [perm, ptr] = reverse_map(ic, fc.size(1));
    df = at::empty_like(fc);
    launch_wf_grad_feat_csr(gc, wc, perm, ptr, df);
  } else {
    Tensor acc = at::zeros(fc.sizes(), fc.options().dtype(acc_type(fc)));
    launch_wf_grad_feat_atomic(gc, wc, ic, acc);
    df = acc.to(fc.scalar_type());
  }
  return {dw, df};
}

// Registered for the CPU key so that CPU tensors get an error instead of reaching a
// CUDA kernel (or the dispatcher's generic "no kernel" message).
void refuse_cpu(const c10::OperatorHandle& handle, torch::jit::Stack* /*stack*/) {
  TORCH_CHECK(false, "cluster CUDA ops need CUDA tensors, got cpu (in ", handle.schema().name(), ")");
}

constexpr const char* kOpNames[] = {"qk_forward", "qk_backward", "av_forward",
                                    "av_backward", "wf_forward", "wf_backward"};

}  // namespace
}  // namespace cluster_ext

TORCH_LIBRARY(cluster, m) {
  m.set_python_module("cluster.cuda_ext");
  m.def("qk_forward(Tensor q, Tensor k, Tensor member_idx, bool deterministic=False) -> Tensor");
  m.def(
      "qk_backward(Tensor grad_attn, Tensor q, Tensor k, Tensor member_idx, "
      "bool deterministic=False) -> (Tensor, Tensor)");
  m.def("av_forward(Tensor attn, Tensor v, Tensor member_idx, bool deterministic=False) -> Tensor");
  m.def(
      "av_backward(Tensor grad_out, Tensor attn, Tensor v, Tensor member_idx, "
      "bool deterministic=False) -> (Tensor, Tensor)");
  m.def(
      "wf_forward(Tensor weights, Tensor feat, Tensor member_idx, bool deterministic=False) -> Tensor");
  m.def(
      "wf_backward(Tensor grad_out, Tensor weights, Tensor feat, Tensor member_idx, "
      "bool deterministic=False) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cluster, CUDA, m) {
  m.impl("qk_forward", &cluster_ext::qk_forward);
  m.impl("qk_backward", &cluster_ext::qk_backward);
  m.impl("av_forward", &cluster_ext::av_forward);
  m.impl("av_backward", &cluster_ext::av_backward);
  m.impl("wf_forward", &cluster_ext::wf_forward);
  m.impl("wf_backward", &cluster_ext::wf_backward);
}

TORCH_LIBRARY_IMPL(cluster, CPU, m) {
  for (const char* name : cluster_ext::kOpNames) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cluster_ext::refuse_cpu>());
  }
}

// Lets a setuptools build install this library as the importable module `cluster._C`;
// loading it runs the registrations above. The fake impls and autograd formulas live in
// cluster.cuda_ext, so importing the module pulls that in too: torch.compile would
// otherwise meet ops it cannot trace. The JIT build loads the library as a plain shared
// object and never calls this.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* python_side = PyImport_ImportModule("cluster.cuda_ext");
  if (python_side == nullptr) {
    return nullptr;
  }
  // Idempotent; needed when cluster.cuda_ext was imported before this library existed.
  PyObject* done = PyObject_CallMethod(python_side, "_register_python_side", "s", "cluster");
  Py_DECREF(python_side);
  if (done == nullptr) {
    return nullptr;
  }
  Py_DECREF(done);
  return PyModule_Create(&module_def);
}
