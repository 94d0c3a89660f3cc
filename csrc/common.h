// Shared by the CPU and CUDA kernels of torch_rankone._C: plain-data descriptions of a
// multi-tensor problem, the k×k Woodbury solve, and the host-side input validation.
//
// Everything above the `#ifndef TORCH_RANKONE_KERNEL_ONLY` guard is plain C++ usable from device
// code and from the instruction-set-specific CPU translation units (which must not instantiate
// library templates, see cpu/kernels.h); the validation below it needs ATen.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TR_HD __host__ __device__
#else
#define TR_HD
#endif

namespace torch_rankone {

// Largest rank k of lowrank_solve(_update): the kernels keep k(k+1)/2 + k running sums per thread.
constexpr int kMaxRank = 8;

// Number of running sums of pass 1: the lower triangle of G = UᵀU (row-major, i ≥ j), then b = Uᵀg.
TR_HD constexpr int num_sums(int k) { return k * (k + 1) / 2 + k; }

// One parameter tensor i of a lowrank problem: g_i, U_{0,i}..U_{k-1,i} (read) and the output,
// which is p_i (updated in place) or y_i. All contiguous with `numel` elements of one dtype.
struct TensorRec {
  const void* g;
  const void* u[kMaxRank];
  void* out;
  int64_t numel;
};

// A contiguous slice [begin, end) of tensor `tensor`: the unit of parallel work and of the
// partial sums of pass 1 (which are added in chunk order, so results do not depend on the
// number of threads).
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

TR_HD inline double magnitude(double x) { return x < 0.0 ? -x : x; }

TR_HD inline bool is_finite(double x) {
#if defined(__CUDA_ARCH__)
  return ::isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// Woodbury coefficients a = (c·I + C G)⁻¹ C b for k ≤ kMaxRank, in double.
//
// `sums` holds G (packed lower triangle) and b as laid out by num_sums(); C is row-major k×k.
// Gaussian elimination with partial pivoting. Whenever the system is singular (a zero pivot) or
// any input or result is not finite, every a_j is NaN: the optimizers mask non-finite updates on
// device, so a failed solve must never look like a valid finite step.
TR_HD inline void woodbury_coefficients(int k, const double* sums, const double* C, double c,
                                        double* a) {
  double M[kMaxRank][kMaxRank + 1];  // [c·I + C G | C b]
  const double* b = sums + k * (k + 1) / 2;
  bool ok = is_finite(c);
  for (int i = 0; i < k; ++i) {
    for (int j = 0; j <= k; ++j) {
      double s = (j == i) ? c : 0.0;
      for (int l = 0; l < k; ++l) {
        const double v = (j < k) ? sums[l >= j ? l * (l + 1) / 2 + j : j * (j + 1) / 2 + l] : b[l];
        s += C[i * k + l] * v;
      }
      M[i][j] = s;
      ok = ok && is_finite(s);
    }
  }
  for (int col = 0; col < k && ok; ++col) {
    int piv = col;
    for (int r = col + 1; r < k; ++r) {
      if (magnitude(M[r][col]) > magnitude(M[piv][col])) piv = r;
    }
    if (M[piv][col] == 0.0) {
      ok = false;
      break;
    }
    if (piv != col) {
      for (int j = col; j <= k; ++j) {
        const double t = M[col][j];
        M[col][j] = M[piv][j];
        M[piv][j] = t;
      }
    }
    for (int r = col + 1; r < k; ++r) {
      const double f = M[r][col] / M[col][col];
      for (int j = col; j <= k; ++j) M[r][j] -= f * M[col][j];
    }
  }
  for (int i = k - 1; i >= 0 && ok; --i) {
    double s = M[i][k];
    for (int j = i + 1; j < k; ++j) s -= M[i][j] * a[j];
    a[i] = s / M[i][i];
    ok = is_finite(a[i]);
  }
  if (!ok) {
    for (int i = 0; i < k; ++i) a[i] = NAN;
  }
}

// Factor applied to s = g − U a by pass 2: out = p + scale·s in place (p ← p − lr·s/c), out = scale·s
// for y = s/c.
TR_HD inline double output_scale(bool in_place, double c, double lr) {
  return in_place ? -lr / c : 1.0 / c;
}

// Whether the in-place pass 2 runs, given coefs = [a_0 .. a_{k-1}, scale]: every coefficient and
// the scale −lr/c are finite (a failed solve makes every a_j NaN; lr = NaN vetoes the step). Both
// implementations test exactly this, each value, and return it as the op's `applied` result;
// with every tensor empty the solve still runs (on G = 0, b = 0), so the answer is the same.
TR_HD inline bool update_applies(int k, const double* coefs) {
  bool ok = is_finite(coefs[k]);
  for (int j = 0; j < k; ++j) ok = ok && is_finite(coefs[j]);
  return ok;
}

// Arguments of the gathered outer-product accumulation H += Σ_t coef_t A[idx_t] A[idx_t]ᵀ, H d×d
// and A n×d (rows `lda` apart), both contiguous along rows.
struct OuterArgs {
  void* H;
  const void* A;
  const int64_t* idx;
  const void* coef;
  int64_t d;
  int64_t lda;
  int64_t t;
};

}  // namespace torch_rankone

#ifndef TORCH_RANKONE_KERNEL_ONLY
#include <ATen/core/Tensor.h>

#include <vector>

namespace torch_rankone {

// A validated lowrank_solve(_update) call: contiguous tensors, their records and chunks, and the
// k×k data as doubles when they live on the host (else `C_dev`/`c_dev`/`lr_dev` are set).
struct LowrankProblem {
  int k = 0;
  at::ScalarType dtype = at::kFloat;
  c10::Device device = c10::Device(c10::kCPU);
  std::vector<at::Tensor> keep_alive;  // contiguous copies of non-contiguous inputs
  std::vector<TensorRec> tensors;
  std::vector<Chunk> chunks;
  double C[kMaxRank * kMaxRank] = {};
  double c = 0.0, lr = 0.0;
  at::Tensor C_dev, c_dev, lr_dev;  // float64 copies on the device, for device-resident inputs
};

// Checks device, dtype, shapes and rank of a lowrank_solve(_update) call and builds its plan
// (chunks of at most `chunk_elems` elements). `params` is empty and `lr` undefined for the
// out-of-place op. Errors name the argument, the tensor index and what was expected.
LowrankProblem check_lowrank(const char* op, c10::DeviceType expected, at::TensorList params,
                             at::TensorList g, at::TensorList U, const at::Tensor& C,
                             const at::Tensor& c, const at::Tensor& lr, int64_t chunk_elems);

// The tensors pass 2 writes, and the records pointed at them: fresh y_i for the out-of-place op
// (`params` empty), else p_i itself or, for a non-contiguous p_i, a contiguous copy that
// finish_update() copies into p_i afterwards (it also bumps the params' version counters).
std::vector<at::Tensor> bind_outputs(LowrankProblem& prob, at::TensorList params,
                                     at::TensorList g);
void finish_update(at::TensorList params, const std::vector<at::Tensor>& outs);

// A validated gathered_outer_accumulate call: kernel arguments and the tensors they point into
// (A is copied only when its columns are not unit-stride).
struct OuterProblem {
  OuterArgs args;
  at::Tensor A, idx, coef;
};

// On the CPU this also checks that every index is in range (IndexError). The CUDA op does not
// (reading device indices would synchronise with the host): torch_rankone._ext checks indices
// while they are still on the host, and device-resident ones only when asked (check_indices);
// the CUDA kernel asserts on device as a last resort.
OuterProblem check_outer(const char* op, c10::DeviceType expected, const at::Tensor& H,
                         const at::Tensor& A, const at::Tensor& idx, const at::Tensor& coef);

}  // namespace torch_rankone
#endif
