// CUDA implementations of the torch_rankone ops. Nothing here synchronises with the host:
// tensor metadata goes to the device by an asynchronous copy from pinned memory, the k×k solve
// runs on the device, and c, lr and C are read by the kernels (device tensors) or passed as
// kernel arguments (CPU tensors, read on the host for free). Because of that per-call pinned
// table, the lowrank ops refuse to run under CUDA-graph capture (check_not_capturing).
//
// Only ATen core and c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in
// cuBLAS/cuSPARSE headers): the file then compiles against any CUDA toolkit with nvcc, which is
// what tests/test_ext.py checks on machines whose torch has no CUDA.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <utility>

#include "../common.h"

namespace torch_rankone::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 8192;  // elements per block of the lowrank passes (32 per thread)

// A scalar read by the kernel: from device memory when `dev` is set, else the host value.
struct ScalarArg {
  const double* dev;
  double host;
  __device__ double value() const { return dev != nullptr ? *dev : host; }
};

struct SmallMatrix {
  double v[kMaxRank * kMaxRank];
};

// Sum of `v` over the block, deterministic (fixed shuffle tree, then warps in order); the result
// is valid in thread 0. `scratch` holds kWarps doubles.
__device__ double block_sum(double v, double* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // scratch may still be read from the previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += scratch[w];
  }
  return total;
}

// Blocks of pass 1 that must fit on one SM together: the minBlocks of its __launch_bounds__,
// which caps the registers per thread at 65536 / (kThreads · blocks), 128 for two blocks. The
// k(k+1)/2 + k double accumulators live in registers: up to k = 7 the kernel needs at most 128
// (two or more blocks per SM without a cap), at k = 8 about 140, which would leave one block
// (8 warps) per SM, too few loads in flight for a bandwidth-bound pass; capped at 128 it spills
// 32-40 bytes per thread to local memory (L1) instead (ptxas -v, sm_90, CUDA 13). Smaller k get
// the number of blocks their natural register use already allows: a minBlocks below that lets
// ptxas unroll more and use *more* registers (k = 1 went from 30 to 84), lowering occupancy.
constexpr int gram_min_blocks(int k) {
  constexpr int blocks[kMaxRank] = {8, 5, 4, 4, 2, 2, 2, 2};
  return blocks[k - 1];
}

// Pass 1: one block per chunk; partials[s * nchunks + chunk] = sum s of the chunk.
template <int K, typename T>
__global__ void __launch_bounds__(kThreads, gram_min_blocks(K))
    gram_kernel(const TensorRec* tensors, const Chunk* chunks, int64_t nchunks,
                double* partials) {
  constexpr int S = num_sums(K);
  __shared__ double scratch[kWarps];
  const Chunk ch = chunks[blockIdx.x];
  const TensorRec& r = tensors[ch.tensor];
  const T* src[K + 1];  // u_0 .. u_{K-1}, g
#pragma unroll
  for (int j = 0; j < K; ++j) src[j] = static_cast<const T*>(r.u[j]);
  src[K] = static_cast<const T*>(r.g);
  double acc[S] = {};
  for (int64_t e = ch.begin + threadIdx.x; e < ch.end; e += kThreads) {
    double x[K + 1];
#pragma unroll
    for (int j = 0; j <= K; ++j) x[j] = static_cast<double>(src[j][e]);
    int s = 0;
#pragma unroll
    for (int i = 0; i < K; ++i) {
#pragma unroll
      for (int j = 0; j <= i; ++j, ++s) acc[s] += x[i] * x[j];
    }
#pragma unroll
    for (int i = 0; i < K; ++i) acc[s + i] += x[i] * x[K];
  }
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const double total = block_sum(acc[s], scratch);
    if (threadIdx.x == 0) partials[s * nchunks + blockIdx.x] = total;
  }
}

// Between the passes, one block: the sums over chunks (in a fixed order; none when every tensor
// is empty), the k×k solve, and coefs = [a_0 .. a_{K-1}, scale, applies]: applies is 1 when the
// in-place pass 2 runs (update_applies: every a_j and the scale finite, exactly the CPU test),
// else 0. Pass 2 and the op's `applied` result both read that one entry.
template <int K>
__global__ void __launch_bounds__(kThreads)
    solve_kernel(const double* partials, int64_t nchunks, SmallMatrix C_host, const double* C_dev,
                 ScalarArg c, ScalarArg lr, bool in_place, double* coefs) {
  constexpr int S = num_sums(K);
  __shared__ double scratch[kWarps];
  double sums[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    double v = 0.0;
    for (int64_t i = threadIdx.x; i < nchunks; i += kThreads) v += partials[s * nchunks + i];
    sums[s] = block_sum(v, scratch);
  }
  if (threadIdx.x == 0) {
    const double cv = c.value();
    woodbury_coefficients(K, sums, C_dev != nullptr ? C_dev : C_host.v, cv, coefs);
    coefs[K] = output_scale(in_place, cv, in_place ? lr.value() : 0.0);
    coefs[K + 1] = update_applies(K, coefs) ? 1.0 : 0.0;
  }
}

// Pass 2: out = p + scale·(g − U a) in place, or scale·(g − U a); in double, rounded once. In
// place it writes nothing when solve_kernel cleared `applies` (the solve failed, giving NaN
// coefficients, or scale = −lr/c is not finite).
template <int K, bool InPlace, typename T>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const TensorRec* tensors, const Chunk* chunks, const double* coefs) {
  const Chunk ch = chunks[blockIdx.x];
  const TensorRec& r = tensors[ch.tensor];
  double a[K];
#pragma unroll
  for (int j = 0; j < K; ++j) a[j] = coefs[j];
  const double scale = coefs[K];
  if (InPlace && coefs[K + 1] == 0.0) return;
  const T* g = static_cast<const T*>(r.g);
  T* out = static_cast<T*>(r.out);
  for (int64_t e = ch.begin + threadIdx.x; e < ch.end; e += kThreads) {
    double s = static_cast<double>(g[e]);
#pragma unroll
    for (int j = 0; j < K; ++j) s -= a[j] * static_cast<double>(static_cast<const T*>(r.u[j])[e]);
    if constexpr (InPlace) {
      out[e] = static_cast<T>(static_cast<double>(out[e]) + scale * s);
    } else {
      out[e] = static_cast<T>(scale * s);
    }
  }
}

// Calls f(std::integral_constant<int, k>{}) for 1 ≤ k ≤ kMaxRank.
template <int K = 1, typename F>
void dispatch_rank(int k, F&& f) {
  if constexpr (K <= kMaxRank) {
    if (k == K) {
      f(std::integral_constant<int, K>{});
    } else {
      dispatch_rank<K + 1>(k, std::forward<F>(f));
    }
  }
}

ScalarArg scalar_arg(double host, const at::Tensor& dev) {
  return {dev.defined() ? dev.const_data_ptr<double>() : nullptr, host};
}

// The lowrank ops copy a per-call table of tensor pointers from pinned host memory to the device.
// A CUDA graph would record that copy with the pinned buffer's address, which the caching host
// allocator hands to later calls: a replay would read whatever pointers are there by then. So
// the ops refuse to run under stream capture (cudaStreamIsCapturing is the query CUDA allows
// during a capture; it does not synchronise).
void check_not_capturing(const char* op, cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  TORCH_CHECK(status == cudaStreamCaptureStatusNone, op,
              ": cannot be captured in a CUDA graph (it passes a per-call table of tensor "
              "pointers from pinned host memory, which a replay would read stale); run it outside "
              "the capture, or set TORCH_RANKONE_DISABLE_EXT=1 to use the pure-PyTorch references");
}

// Returns the device buffer [a_0 .. a_{k-1}, scale, applies] (see solve_kernel). The k×k solve
// always runs, also when every tensor is empty (no chunks: G = 0, b = 0), so that a non-finite
// c or lr vetoes the update exactly as on the CPU.
at::Tensor run_lowrank(const LowrankProblem& prob, bool in_place) {
  const auto n = static_cast<int64_t>(prob.tensors.size());
  const auto nchunks = static_cast<int64_t>(prob.chunks.size());
  const c10::cuda::CUDAGuard guard(prob.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // Records and chunks, copied to the device asynchronously from pinned memory (the caching
  // host allocator keeps the buffer alive until the copy has run). None without chunks.
  const TensorRec* tensors = nullptr;
  const Chunk* chunks = nullptr;
  at::Tensor meta;
  if (nchunks > 0) {
    const int64_t rec_bytes = n * static_cast<int64_t>(sizeof(TensorRec));
    const int64_t bytes = rec_bytes + nchunks * static_cast<int64_t>(sizeof(Chunk));
    at::Tensor host =
        at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.mutable_data_ptr(), prob.tensors.data(), rec_bytes);
    std::memcpy(static_cast<char*>(host.mutable_data_ptr()) + rec_bytes, prob.chunks.data(),
                bytes - rec_bytes);
    meta = host.to(prob.device, at::kByte, /*non_blocking=*/true);
    tensors = reinterpret_cast<const TensorRec*>(meta.const_data_ptr<uint8_t>());
    chunks = reinterpret_cast<const Chunk*>(meta.const_data_ptr<uint8_t>() + rec_bytes);
  }

  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(prob.device);
  at::Tensor partials = at::empty({num_sums(prob.k) * nchunks}, f64);
  at::Tensor coefs = at::empty({prob.k + 2}, f64);
  SmallMatrix C_host;
  std::memcpy(C_host.v, prob.C, sizeof(C_host.v));
  const double* C_dev = prob.C_dev.defined() ? prob.C_dev.const_data_ptr<double>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES(prob.dtype, "torch_rankone.lowrank", [&] {
    dispatch_rank(prob.k, [&](auto rank) {
      constexpr int K = decltype(rank)::value;
      if (nchunks > 0) {
        gram_kernel<K, scalar_t><<<nchunks, kThreads, 0, stream>>>(
            tensors, chunks, nchunks, partials.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      solve_kernel<K><<<1, kThreads, 0, stream>>>(
          partials.const_data_ptr<double>(), nchunks, C_host, C_dev, scalar_arg(prob.c, prob.c_dev),
          scalar_arg(prob.lr, prob.lr_dev), in_place, coefs.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (nchunks == 0) return;
      if (in_place) {
        apply_kernel<K, true, scalar_t>
            <<<nchunks, kThreads, 0, stream>>>(tensors, chunks, coefs.const_data_ptr<double>());
      } else {
        apply_kernel<K, false, scalar_t>
            <<<nchunks, kThreads, 0, stream>>>(tensors, chunks, coefs.const_data_ptr<double>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return coefs;
}

std::vector<at::Tensor> lowrank_solve(at::TensorList g, at::TensorList U, const at::Tensor& C,
                                      const at::Tensor& c) {
  constexpr const char* op = "torch_rankone.lowrank_solve";
  LowrankProblem prob = check_lowrank(op, c10::kCUDA, {}, g, U, C, c, at::Tensor(), kChunk);
  const c10::cuda::CUDAGuard guard(prob.device);
  check_not_capturing(op, c10::cuda::getCurrentCUDAStream());
  std::vector<at::Tensor> y = bind_outputs(prob, {}, g);
  if (!prob.chunks.empty()) run_lowrank(prob, /*in_place=*/false);  // else nothing to write
  return y;
}

at::Tensor lowrank_solve_update(at::TensorList params, at::TensorList g, at::TensorList U,
                                const at::Tensor& C, const at::Tensor& c, const at::Tensor& lr) {
  constexpr const char* op = "torch_rankone.lowrank_solve_update";
  LowrankProblem prob = check_lowrank(op, c10::kCUDA, params, g, U, C, c, lr, kChunk);
  const c10::cuda::CUDAGuard guard(prob.device);
  check_not_capturing(op, c10::cuda::getCurrentCUDAStream());
  const std::vector<at::Tensor> outs = bind_outputs(prob, params, g);
  const at::Tensor coefs = run_lowrank(prob, /*in_place=*/true);
  finish_update(params, outs);
  // Whether pass 2 ran: the flag it tested, on the device (no host synchronisation).
  return coefs.select(0, prob.k + 1).ne(0.0);
}

// ---------------------------------------------------------------------------------------------
// gathered_outer_accumulate: one block per kOuterTile² tile of H on or above the diagonal. The
// tile's column slices of kOuterDepth gathered rows at a time go to shared memory (one side
// scaled by coef), each thread accumulates a 4×4 register block; the tile is added to H once
// and, off the diagonal, mirrored below it. The index range is not checked before the launch (on
// device memory that would need a host synchronisation): torch_rankone._ext checks indices that
// are still on the host before copying them, and device-resident ones with check_indices=True.
// An index out of range that reaches the kernel trips CUDA_KERNEL_ASSERT (a device-side assert,
// after which the CUDA context is unusable), never a silent out-of-bounds read.
// ---------------------------------------------------------------------------------------------

constexpr int kOuterTile = 64;
constexpr int kOuterDepth = 16;
constexpr int kOuterReg = 4;  // (kOuterTile / kOuterReg)² = kThreads threads per tile
static_assert((kOuterTile / kOuterReg) * (kOuterTile / kOuterReg) == kThreads);

template <typename T>
__global__ void __launch_bounds__(kThreads)
    outer_kernel(OuterArgs p, int64_t rows_of_A, int64_t tiles_per_side) {
  // blockIdx.x enumerates the upper triangle of tiles row by row.
  int64_t q = blockIdx.x, I = 0;
  while (q >= tiles_per_side - I) q -= tiles_per_side - I++;
  const int64_t J = I + q;
  const int64_t i_base = I * kOuterTile, j_base = J * kOuterTile, d = p.d;
  const T* A = static_cast<const T*>(p.A);
  const T* coef = static_cast<const T*>(p.coef);
  __shared__ T panel_i[kOuterDepth][kOuterTile], panel_j[kOuterDepth][kOuterTile];
  const int tx = threadIdx.x % (kOuterTile / kOuterReg), ty = threadIdx.x / (kOuterTile / kOuterReg);
  T acc[kOuterReg][kOuterReg] = {};
  for (int64_t t0 = 0; t0 < p.t; t0 += kOuterDepth) {
    for (int l = threadIdx.x; l < kOuterDepth * kOuterTile; l += kThreads) {
      const int s = l / kOuterTile, col = l % kOuterTile;
      const int64_t t = t0 + s;
      T vi = T(0), vj = T(0);
      if (t < p.t) {
        const int64_t row = p.idx[t];
        CUDA_KERNEL_ASSERT(row >= 0 && row < rows_of_A);
        const T* a = A + row * p.lda;
        if (i_base + col < d) vi = a[i_base + col];
        if (j_base + col < d) vj = coef[t] * a[j_base + col];
      }
      panel_i[s][col] = vi;
      panel_j[s][col] = vj;
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kOuterDepth; ++s) {
      T xi[kOuterReg], xj[kOuterReg];
#pragma unroll
      for (int m = 0; m < kOuterReg; ++m) {
        xi[m] = panel_i[s][ty * kOuterReg + m];
        xj[m] = panel_j[s][tx * kOuterReg + m];
      }
#pragma unroll
      for (int m = 0; m < kOuterReg; ++m) {
#pragma unroll
        for (int n = 0; n < kOuterReg; ++n) acc[m][n] += xi[m] * xj[n];
      }
    }
    __syncthreads();
  }
  T* H = static_cast<T*>(p.H);
#pragma unroll
  for (int m = 0; m < kOuterReg; ++m) {
#pragma unroll
    for (int n = 0; n < kOuterReg; ++n) {
      const int64_t i = i_base + ty * kOuterReg + m, j = j_base + tx * kOuterReg + n;
      // Entries with j ≥ i are added at (i, j) and, if j > i, at (j, i): each entry of H is
      // written by exactly one thread, and H stays exactly symmetric if it was.
      if (i < d && j < d && j >= i) {
        H[i * d + j] += acc[m][n];
        if (j > i) H[j * d + i] += acc[m][n];
      }
    }
  }
}

void gathered_outer_accumulate(const at::Tensor& H, const at::Tensor& A, const at::Tensor& idx,
                               const at::Tensor& coef) {
  const OuterProblem prob =
      check_outer("torch_rankone.gathered_outer_accumulate", c10::kCUDA, H, A, idx, coef);
  H.unsafeGetTensorImpl()->bump_version();
  if (prob.args.t == 0 || prob.args.d == 0) return;
  const c10::cuda::CUDAGuard guard(H.device());
  const int64_t side = (prob.args.d + kOuterTile - 1) / kOuterTile;
  const int64_t blocks = side * (side + 1) / 2;
  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "torch_rankone.gathered_outer_accumulate", [&] {
    outer_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        prob.args, A.size(0), side);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace torch_rankone::cuda

TORCH_LIBRARY_IMPL(torch_rankone, CUDA, m) {
  m.impl("lowrank_solve", &torch_rankone::cuda::lowrank_solve);
  m.impl("lowrank_solve_update", &torch_rankone::cuda::lowrank_solve_update);
  m.impl("gathered_outer_accumulate", &torch_rankone::cuda::gathered_outer_accumulate);
}
