// Device kernels of the unfused cluster-attention ops (AutoFocusFormer's design: one
// kernel per product, composed in Python).
//
// Only TensorBase and the dispatch macros are included here, not ATen/ATen.h: nvcc's
// host pass over the full ATen headers costs minutes per architecture, and everything
// that needs the full Tensor API (checks, allocation, sorting) lives in cluster_ops.cpp.
//
// Every kernel is a grid-stride loop over one output element per thread with 64-bit
// linear indices, so tensors past 2^31 elements neither overflow nor need a grid that
// large. Products are accumulated in opmath (float32 for half types) and rounded once.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

namespace cluster_ext {
namespace {

constexpr int kThreads = 256;
// Beyond this many blocks the grid-stride loop takes over; it bounds launch overhead
// for huge tensors while still filling every SM of current GPUs many times over.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

inline unsigned blocks_for(int64_t total) {
  return static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks));
}

#define CLUSTER_GRID_STRIDE(t, total)                                           \
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; \
       t < (total); t += static_cast<int64_t>(blockDim.x) * gridDim.x)

// Out-of-range neighbour indices would read or write arbitrary memory; a device assert
// turns that into an error. The Python layer checks ranges once before launching.
template <typename index_t>
__device__ __forceinline__ int64_t load_index(const index_t* idx, int64_t pos, int64_t upper) {
  const int64_t key = static_cast<int64_t>(idx[pos]);
  CUDA_KERNEL_ASSERT(key >= 0 && key < upper);
  return key;
}

// out[b,h,i,j] = <x[b,h,i,:], y[b,h,idx[b,i,j],:]>   (qk forward; d_attn of av backward)
template <typename scalar_t, typename index_t>
__global__ void gather_dot_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                  const index_t* __restrict__ idx, scalar_t* __restrict__ out,
                                  int64_t H, int64_t N, int64_t Nk, int64_t M, int64_t D,
                                  int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  CLUSTER_GRID_STRIDE(t, total) {
    const int64_t j = t % M;
    const int64_t row = t / M;  // (b*H + h)*N + i
    const int64_t i = row % N;
    const int64_t bh = row / N;
    const int64_t b = bh / H;
    const int64_t key = load_index(idx, (b * N + i) * M + j, Nk);
    const scalar_t* xr = x + row * D;
    const scalar_t* yr = y + (bh * Nk + key) * D;
    acc_t acc = 0;
    for (int64_t d = 0; d < D; ++d) {
      acc += static_cast<acc_t>(xr[d]) * static_cast<acc_t>(yr[d]);
    }
    out[t] = static_cast<scalar_t>(acc);
  }
}

// out[b,h,i,d] = sum_j w[b,h,i,j] * y[b,h,idx[b,i,j],d]   (av forward; dq of qk backward)
// Threads of a warp share (b,h,i) and walk d, so the gathered rows are read coalesced.
template <typename scalar_t, typename index_t>
__global__ void gather_wsum_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ y,
                                   const index_t* __restrict__ idx, scalar_t* __restrict__ out,
                                   int64_t H, int64_t N, int64_t Nk, int64_t M, int64_t D,
                                   int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  CLUSTER_GRID_STRIDE(t, total) {
    const int64_t d = t % D;
    const int64_t row = t / D;  // (b*H + h)*N + i
    const int64_t i = row % N;
    const int64_t bh = row / N;
    const int64_t b = bh / H;
    const scalar_t* wr = w + row * M;
    const index_t* ir = idx + (b * N + i) * M;
    const scalar_t* yb = y + bh * Nk * D + d;
    acc_t acc = 0;
    for (int64_t j = 0; j < M; ++j) {
      const int64_t key = load_index(ir, j, Nk);
      acc += static_cast<acc_t>(wr[j]) * static_cast<acc_t>(yb[key * D]);
    }
    out[t] = static_cast<scalar_t>(acc);
  }
}

// dy[b,h,idx[b,i,j],d] += w[b,h,i,j] * x[b,h,i,d]   (dk of qk backward; dv of av backward)
// A key is named by any number of (query, slot) pairs, duplicates included, so the
// sums meet in an opmath buffer through atomics: fast, but the order is not fixed.
template <typename scalar_t, typename index_t>
__global__ void scatter_atomic_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ x,
                                      const index_t* __restrict__ idx,
                                      at::opmath_type<scalar_t>* __restrict__ dy, int64_t H,
                                      int64_t N, int64_t Nk, int64_t M, int64_t D, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  CLUSTER_GRID_STRIDE(t, total) {
    const int64_t d = t % D;
    const int64_t row = t / D;  // (b*H + h)*N + i
    const int64_t i = row % N;
    const int64_t bh = row / N;
    const int64_t b = bh / H;
    const acc_t xv = static_cast<acc_t>(x[t]);
    const scalar_t* wr = w + row * M;
    const index_t* ir = idx + (b * N + i) * M;
    acc_t* db = dy + bh * Nk * D + d;
    for (int64_t j = 0; j < M; ++j) {
      const int64_t key = load_index(ir, j, Nk);
      atomicAdd(db + key * D, static_cast<acc_t>(wr[j]) * xv);
    }
  }
}

// Same sum as scatter_atomic_kernel, gathered per key through the reverse map instead:
// perm lists a batch's flattened (i*M + j) positions sorted by key, ptr[b,key] where a
// key's run starts. Each output is summed by one thread in a fixed order: bitwise
// reproducible.
template <typename scalar_t>
__global__ void scatter_csr_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ x,
                                   const int64_t* __restrict__ perm, const int64_t* __restrict__ ptr,
                                   scalar_t* __restrict__ dy, int64_t H, int64_t N, int64_t Nk,
                                   int64_t M, int64_t D, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  CLUSTER_GRID_STRIDE(t, total) {
    const int64_t d = t % D;
    const int64_t row = t / D;  // (b*H + h)*Nk + key
    const int64_t key = row % Nk;
    const int64_t bh = row / Nk;
    const int64_t b = bh / H;
    const int64_t* pb = perm + b * N * M;
    const int64_t begin = ptr[b * (Nk + 1) + key];
    const int64_t end = ptr[b * (Nk + 1) + key + 1];
    const scalar_t* wb = w + bh * N * M;
    const scalar_t* xb = x + bh * N * D + d;
    acc_t acc = 0;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t pos = pb[p];  // i*M + j
      acc += static_cast<acc_t>(wb[pos]) * static_cast<acc_t>(xb[(pos / M) * D]);
    }
    dy[t] = static_cast<scalar_t>(acc);
  }
}

// out[b,i,w,c] = sum_j weights[b,i,j,w] * feat[b,idx[b,i,j],c]
template <typename scalar_t, typename index_t>
__global__ void wf_forward_kernel(const scalar_t* __restrict__ weights,
                                  const scalar_t* __restrict__ feat, const index_t* __restrict__ idx,
                                  scalar_t* __restrict__ out, int64_t N, int64_t Nf, int64_t M,
                                  int64_t W, int64_t C, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  CLUSTER_GRID_STRIDE(t, total) {
    const int64_t c = t % C;
    const int64_t r = t / C;  // (b*N + i)*W + w
    const int64_t w = r % W;
    const int64_t bi = r / W;
    const int64_t b = bi / N;
    const scalar_t* wr = weights + bi * M * W + w;
    const index_t* ir = idx + bi * M;
    const scalar_t* fb = feat + b * Nf * C + c;
    acc_t acc = 0;
    for (int64_t j = 0; j < M; ++j) {
      const int64_t key = load_index(ir, j, Nf);
      acc += static_cast<acc_t>(wr[j * W]) * static_cast<acc_t>(fb[key * C]);
    }
    out[t] = static_cast<scalar_t>(acc);
  }
}

// d_weights[b,i,j,w] = <grad_out[b,i,w,:], feat[b,idx[b,i,j],:]>
template <typename scalar_t, typename index_t>
__global__ void wf_grad_weights_kernel(const scalar_t* __restrict__ grad_out,
                                       const scalar_t* __restrict__ feat,
                                       const index_t* __restrict__ idx, scalar_t* __restrict__ dw,
                                       int64_t N, int64_t Nf, int64_t M, int64_t W, int64_t C,
                                       int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  CLUSTER_GRID_STRIDE(t, total) {
    const int64_t w = t % W;
    const int64_t slot = t / W;  // (b*N + i)*M + j
    const int64_t bi = slot / M;
    const int64_t b = bi / N;
    const int64_t key = load_index(idx, slot, Nf);
    const scalar_t* gr = grad_out + (bi * W + w) * C;
    const scalar_t* fr = feat + (b * Nf + key) * C;
    acc_t acc = 0;
    for (int64_t c = 0; c < C; ++c) {
      acc += static_cast<acc_t>(gr[c]) * static_cast<acc_t>(fr[c]);
    }
    dw[t] = static_cast<scalar_t>(acc);
  }
}

// d_feat[b,idx[b,i,j],c] += sum_w weights[b,i,j,w] * grad_out[b,i,w,c], through atomics
// for the same reason as scatter_atomic_kernel.
template <typename scalar_t, typename index_t>
__global__ void wf_grad_feat_atomic_kernel(const scalar_t* __restrict__ grad_out,
                                           const scalar_t* __restrict__ weights,
                                           const index_t* __restrict__ idx,
                                           at::opmath_type<scalar_t>* __restrict__ df, int64_t N,
                                           int64_t Nf, int64_t M, int64_t W, int64_t C,
                                           int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  CLUSTER_GRID_STRIDE(t, total) {
    const int64_t c = t % C;
    const int64_t bi = t / C;  // b*N + i
    const int64_t b = bi / N;
    const scalar_t* gr = grad_out + bi * W * C + c;
    const index_t* ir = idx + bi * M;
    acc_t* db = df + b * Nf * C + c;
    for (int64_t j = 0; j < M; ++j) {
      const int64_t key = load_index(ir, j, Nf);
      const scalar_t* wr = weights + (bi * M + j) * W;
      acc_t s = 0;
      for (int64_t w = 0; w < W; ++w) {
        s += static_cast<acc_t>(wr[w]) * static_cast<acc_t>(gr[w * C]);
      }
      atomicAdd(db + key * C, s);
    }
  }
}

// Deterministic d_feat through the reverse map (see scatter_csr_kernel).
template <typename scalar_t>
__global__ void wf_grad_feat_csr_kernel(const scalar_t* __restrict__ grad_out,
                                        const scalar_t* __restrict__ weights,
                                        const int64_t* __restrict__ perm,
                                        const int64_t* __restrict__ ptr, scalar_t* __restrict__ df,
                                        int64_t N, int64_t Nf, int64_t M, int64_t W, int64_t C,
                                        int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  CLUSTER_GRID_STRIDE(t, total) {
    const int64_t c = t % C;
    const int64_t r = t / C;  // b*Nf + f
    const int64_t f = r % Nf;
    const int64_t b = r / Nf;
    const int64_t* pb = perm + b * N * M;
    const int64_t begin = ptr[b * (Nf + 1) + f];
    const int64_t end = ptr[b * (Nf + 1) + f + 1];
    acc_t acc = 0;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t pos = pb[p];  // i*M + j
      const int64_t bi = b * N + pos / M;
      const scalar_t* wr = weights + (b * N * M + pos) * W;
      const scalar_t* gr = grad_out + bi * W * C + c;
      acc_t s = 0;
      for (int64_t w = 0; w < W; ++w) {
        s += static_cast<acc_t>(wr[w]) * static_cast<acc_t>(gr[w * C]);
      }
      acc += s;
    }
    df[t] = static_cast<scalar_t>(acc);
  }
}

}  // namespace

// Launchers. The caller (cluster_ops.cpp) has checked shapes, dtypes and devices, made
// every tensor contiguous, set the device guard and skipped empty outputs; sizes are
// read back from the tensors so the two files cannot disagree about them.

void launch_gather_dot(const at::TensorBase& x, const at::TensorBase& y, const at::TensorBase& idx,
                       const at::TensorBase& out) {
  const int64_t H = x.size(1), N = x.size(2), D = x.size(3), Nk = y.size(2), M = idx.size(2);
  const int64_t total = out.numel();
  if (total == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cluster_gather_dot", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "cluster_gather_dot", [&] {
      gather_dot_kernel<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), idx.const_data_ptr<index_t>(),
          out.mutable_data_ptr<scalar_t>(), H, N, Nk, M, D, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_gather_wsum(const at::TensorBase& w, const at::TensorBase& y, const at::TensorBase& idx,
                        const at::TensorBase& out) {
  const int64_t H = w.size(1), N = w.size(2), M = w.size(3), Nk = y.size(2), D = y.size(3);
  const int64_t total = out.numel();
  if (total == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "cluster_gather_wsum", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "cluster_gather_wsum", [&] {
      gather_wsum_kernel<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
          w.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), idx.const_data_ptr<index_t>(),
          out.mutable_data_ptr<scalar_t>(), H, N, Nk, M, D, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_scatter_atomic(const at::TensorBase& w, const at::TensorBase& x, const at::TensorBase& idx,
                           const at::TensorBase& dy_acc) {
  const int64_t H = w.size(1), N = w.size(2), M = w.size(3), Nk = dy_acc.size(2), D = x.size(3);
  const int64_t total = x.numel();
  if (total == 0 || dy_acc.numel() == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "cluster_scatter_atomic", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "cluster_scatter_atomic", [&] {
      scatter_atomic_kernel<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
          w.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), idx.const_data_ptr<index_t>(),
          dy_acc.mutable_data_ptr<acc_t>(), H, N, Nk, M, D, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_scatter_csr(const at::TensorBase& w, const at::TensorBase& x, const at::TensorBase& perm,
                        const at::TensorBase& ptr, const at::TensorBase& dy) {
  const int64_t H = w.size(1), N = w.size(2), M = w.size(3), Nk = dy.size(2), D = dy.size(3);
  const int64_t total = dy.numel();
  if (total == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "cluster_scatter_csr", [&] {
    scatter_csr_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        w.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), perm.const_data_ptr<int64_t>(),
        ptr.const_data_ptr<int64_t>(), dy.mutable_data_ptr<scalar_t>(), H, N, Nk, M, D, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_wf_forward(const at::TensorBase& weights, const at::TensorBase& feat,
                       const at::TensorBase& idx, const at::TensorBase& out) {
  const int64_t N = weights.size(1), M = weights.size(2), W = weights.size(3);
  const int64_t Nf = feat.size(1), C = feat.size(2);
  const int64_t total = out.numel();
  if (total == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "cluster_wf_forward", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "cluster_wf_forward", [&] {
      wf_forward_kernel<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
          weights.const_data_ptr<scalar_t>(), feat.const_data_ptr<scalar_t>(),
          idx.const_data_ptr<index_t>(), out.mutable_data_ptr<scalar_t>(), N, Nf, M, W, C, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_wf_grad_weights(const at::TensorBase& grad_out, const at::TensorBase& feat,
                            const at::TensorBase& idx, const at::TensorBase& dw) {
  const int64_t N = dw.size(1), M = dw.size(2), W = dw.size(3);
  const int64_t Nf = feat.size(1), C = feat.size(2);
  const int64_t total = dw.numel();
  if (total == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "cluster_wf_grad_weights", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "cluster_wf_grad_weights", [&] {
      wf_grad_weights_kernel<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), feat.const_data_ptr<scalar_t>(),
          idx.const_data_ptr<index_t>(), dw.mutable_data_ptr<scalar_t>(), N, Nf, M, W, C, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_wf_grad_feat_atomic(const at::TensorBase& grad_out, const at::TensorBase& weights,
                                const at::TensorBase& idx, const at::TensorBase& df_acc) {
  const int64_t B = weights.size(0), N = weights.size(1), M = weights.size(2), W = weights.size(3);
  const int64_t Nf = df_acc.size(1), C = df_acc.size(2);
  const int64_t total = B * N * C;
  if (total == 0 || df_acc.numel() == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(), "cluster_wf_grad_feat", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "cluster_wf_grad_feat", [&] {
      wf_grad_feat_atomic_kernel<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(),
          idx.const_data_ptr<index_t>(), df_acc.mutable_data_ptr<acc_t>(), N, Nf, M, W, C, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_wf_grad_feat_csr(const at::TensorBase& grad_out, const at::TensorBase& weights,
                             const at::TensorBase& perm, const at::TensorBase& ptr,
                             const at::TensorBase& df) {
  const int64_t N = weights.size(1), M = weights.size(2), W = weights.size(3);
  const int64_t Nf = df.size(1), C = df.size(2);
  const int64_t total = df.numel();
  if (total == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(), "cluster_wf_grad_feat_det", [&] {
    wf_grad_feat_csr_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        grad_out.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(),
        perm.const_data_ptr<int64_t>(), ptr.const_data_ptr<int64_t>(), df.mutable_data_ptr<scalar_t>(),
        N, Nf, M, W, C, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cluster_ext
