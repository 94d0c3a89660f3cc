// The CPU loops, compiled once per instruction set. kernels_<isa>.cpp defines TR_ISA_NS, switches
// the target instruction set on (a pragma) and then includes this file, so every function here is
// generated for that instruction set. Keep it free of library templates (std::min, containers,
// ATen): an instantiation emitted here under the pragma could be picked by the linker for the
// baseline code too and crash CPUs without AVX2. The dispatcher picks a table at run time.
//
// Loops are written over small fixed-size blocks of independent lanes so that the compiler
// vectorises them without -ffast-math (which would also break NaN propagation): each lane is
// its own running sum, and lanes are added in a fixed order at the end.
#pragma once

#include "../common.h"
#include "dispatch.h"

#ifndef TR_ISA_NS
#error "define TR_ISA_NS before including kernels.h"
#endif

#if defined(__GNUC__)
#define TR_INLINE inline __attribute__((always_inline))
#define TR_UNROLL _Pragma("GCC unroll 64")
#else
#define TR_INLINE __forceinline
#define TR_UNROLL
#endif

namespace torch_rankone::cpu::TR_ISA_NS {

inline int64_t lesser(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------------
// Vec<T, W>: W lanes of T. GCC/Clang vector extensions, which the compiler maps onto the
// translation unit's instruction set (one 256-bit register per Vec<double, 4> with AVX2, two
// SSE2 registers in the baseline); a plain array elsewhere. Explicit vectors make the loops
// vectorise the same way whatever the compiler's cost model prefers (left to itself, GCC
// vectorised the outer-product loop across indices, with gathers). Multiply-adds fuse into FMA
// instructions where the target has them (-ffp-contract=fast).
// ---------------------------------------------------------------------------------------------

#if defined(__GNUC__)
template <typename T, int W>
struct VecOf {
  typedef T type __attribute__((vector_size(W * sizeof(T))));
};
template <typename T, int W>
using Vec = typename VecOf<T, W>::type;

template <typename T, int W>
TR_INLINE Vec<T, W> splat(T x) {
  return x - Vec<T, W>{};  // folds to a broadcast (x − 0 = x exactly; x + 0 would not, for −0)
}
template <typename T, int W>
TR_INLINE Vec<T, W> load(const T* p) {
  Vec<T, W> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T, int W>
TR_INLINE void store(T* p, Vec<T, W> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
template <typename To, typename From, int W>
TR_INLINE Vec<To, W> convert(Vec<From, W> v) {
  return __builtin_convertvector(v, Vec<To, W>);
}
#else
template <typename T, int W>
struct Vec {
  T v[W];
  TR_INLINE Vec& operator+=(const Vec& o) { for (int i = 0; i < W; ++i) v[i] += o.v[i]; return *this; }
  TR_INLINE Vec& operator-=(const Vec& o) { for (int i = 0; i < W; ++i) v[i] -= o.v[i]; return *this; }
  TR_INLINE friend Vec operator+(Vec a, const Vec& b) { return a += b; }
  TR_INLINE friend Vec operator*(Vec a, const Vec& b) { for (int i = 0; i < W; ++i) a.v[i] *= b.v[i]; return a; }
};
template <typename T, int W>
TR_INLINE Vec<T, W> splat(T x) { Vec<T, W> r; for (int i = 0; i < W; ++i) r.v[i] = x; return r; }
template <typename T, int W>
TR_INLINE Vec<T, W> load(const T* p) { Vec<T, W> r; for (int i = 0; i < W; ++i) r.v[i] = p[i]; return r; }
template <typename T, int W>
TR_INLINE void store(T* p, Vec<T, W> v) { for (int i = 0; i < W; ++i) p[i] = v.v[i]; }
template <typename To, typename From, int W>
TR_INLINE Vec<To, W> convert(Vec<From, W> v) {
  Vec<To, W> r; for (int i = 0; i < W; ++i) r.v[i] = static_cast<To>(v.v[i]); return r;
}
#endif

constexpr int kLanes = 4;  // doubles per vector in the lowrank passes (256 bits)
using Vd = Vec<double, kLanes>;

template <typename T>
TR_INLINE Vd load_double(const T* p) {
  if constexpr (sizeof(T) == sizeof(double)) {
    return load<double, kLanes>(p);
  } else {
    return convert<double, T, kLanes>(load<T, kLanes>(p));
  }
}

template <typename T>
TR_INLINE void store_double(T* p, Vd v) {
  if constexpr (sizeof(T) == sizeof(double)) {
    store<double, kLanes>(p, v);
  } else {
    store<T, kLanes>(p, convert<T, double, kLanes>(v));
  }
}

// Copies the last n < W elements of the K+1 streams at `src` into zero-padded blocks, so that
// tails run through the same vector code as the body. Zeros add nothing to any sum.
template <int K, int W, typename T>
TR_INLINE void pad_tail(const T* const* src, int64_t n, T (&dst)[K][W], const T** ptrs) {
  TR_UNROLL for (int j = 0; j < K; ++j) {
    for (int w = 0; w < W; ++w) dst[j][w] = w < n ? src[j][w] : T(0);
    ptrs[j] = dst[j];
  }
}

// ---------------------------------------------------------------------------------------------
// lowrank_solve(_update), pass 1: G = UᵀU (lower triangle) and b = Uᵀg, summed in double.
// ---------------------------------------------------------------------------------------------

// Adds NV·kLanes elements of u_0..u_{K-1} (u[K] = g) into acc; lanes are separate running sums.
template <int K, int NV, typename T>
TR_INLINE void gram_step(const T* const* u, Vd (&acc)[num_sums(K)][NV]) {
  TR_UNROLL for (int q = 0; q < NV; ++q) {
    Vd x[K + 1];
    TR_UNROLL for (int j = 0; j <= K; ++j) x[j] = load_double(u[j] + q * kLanes);
    int s = 0;
    TR_UNROLL for (int i = 0; i < K; ++i) {
      TR_UNROLL for (int j = 0; j <= i; ++j, ++s) acc[s][q] += x[i] * x[j];
    }
    TR_UNROLL for (int i = 0; i < K; ++i) acc[s + i][q] += x[i] * x[K];
  }
}

// Writes the num_sums(K) sums of every chunk in [first, last) to partials[chunk * num_sums(K)].
template <int K, typename T>
void pass1(const TensorRec* tensors, const Chunk* chunks, int64_t first, int64_t last,
           double* partials) {
  constexpr int S = num_sums(K);
  constexpr int NV = K <= 2 ? 2 : 1;  // vectors per sum: enough independent FMA chains
  constexpr int W = NV * kLanes;
  for (int64_t ci = first; ci < last; ++ci) {
    const Chunk ch = chunks[ci];
    const TensorRec& r = tensors[ch.tensor];
    const T* src[K + 1];
    TR_UNROLL for (int j = 0; j < K; ++j) src[j] = static_cast<const T*>(r.u[j]) + ch.begin;
    src[K] = static_cast<const T*>(r.g) + ch.begin;
    const int64_t n = ch.end - ch.begin;
    Vd acc[S][NV] = {};
    const T* cur[K + 1];
    int64_t e = 0;
    for (; e + W <= n; e += W) {
      TR_UNROLL for (int j = 0; j <= K; ++j) cur[j] = src[j] + e;
      gram_step<K, NV>(cur, acc);
    }
    if (e < n) {
      T tail[K + 1][W];
      TR_UNROLL for (int j = 0; j <= K; ++j) cur[j] = src[j] + e;
      pad_tail<K + 1, W>(cur, n - e, tail, cur);
      gram_step<K, NV>(cur, acc);
    }
    double* out = partials + ci * S;
    for (int s = 0; s < S; ++s) {
      double lanes[W];
      TR_UNROLL for (int q = 0; q < NV; ++q) store<double, kLanes>(lanes + q * kLanes, acc[s][q]);
      double total = 0.0;
      TR_UNROLL for (int w = 0; w < W; ++w) total += lanes[w];
      out[s] = total;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Pass 2: out = p + scale·(g − U a) in place, or scale·(g − U a); in double, rounded once.
// ---------------------------------------------------------------------------------------------

constexpr int kPass2Vectors = 2;
constexpr int kPass2Width = kPass2Vectors * kLanes;

// One block of kPass2Width elements; u[K] = g. Everything is loaded before `out` is stored, so
// out may be one of the inputs element-wise.
template <int K, bool InPlace, typename T>
TR_INLINE void update_step(const T* const* u, T* out, const Vd* a, Vd scale) {
  TR_UNROLL for (int q = 0; q < kPass2Vectors; ++q) {
    Vd s = load_double(u[K] + q * kLanes);
    TR_UNROLL for (int j = 0; j < K; ++j) s -= a[j] * load_double(u[j] + q * kLanes);
    if constexpr (InPlace) {
      store_double(out + q * kLanes, load_double(out + q * kLanes) + scale * s);
    } else {
      store_double(out + q * kLanes, scale * s);
    }
  }
}

// coefs = [a_0 .. a_{K-1}, scale].
template <int K, bool InPlace, typename T>
void pass2(const TensorRec* tensors, const Chunk* chunks, int64_t first, int64_t last,
           const double* coefs) {
  constexpr int W = kPass2Width;
  Vd a[K];
  TR_UNROLL for (int j = 0; j < K; ++j) a[j] = splat<double, kLanes>(coefs[j]);
  const Vd scale = splat<double, kLanes>(coefs[K]);
  for (int64_t ci = first; ci < last; ++ci) {
    const Chunk ch = chunks[ci];
    const TensorRec& r = tensors[ch.tensor];
    const T* src[K + 1];
    TR_UNROLL for (int j = 0; j < K; ++j) src[j] = static_cast<const T*>(r.u[j]) + ch.begin;
    src[K] = static_cast<const T*>(r.g) + ch.begin;
    T* out = static_cast<T*>(r.out) + ch.begin;
    const int64_t n = ch.end - ch.begin;
    const T* cur[K + 1];
    int64_t e = 0;
    for (; e + W <= n; e += W) {
      TR_UNROLL for (int j = 0; j <= K; ++j) cur[j] = src[j] + e;
      update_step<K, InPlace>(cur, out + e, a, scale);
    }
    if (e < n) {  // the tail, through zero-padded copies of the inputs and of out
      const T* cur_out[K + 2];
      TR_UNROLL for (int j = 0; j <= K; ++j) cur_out[j] = src[j] + e;
      cur_out[K + 1] = out + e;
      T tail[K + 2][W];
      pad_tail<K + 2, W>(cur_out, n - e, tail, cur_out);
      update_step<K, InPlace>(cur_out, tail[K + 1], a, scale);
      for (int64_t w = 0; w < n - e; ++w) out[e + w] = tail[K + 1][w];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// gathered_outer_accumulate: H += Σ_t coef_t A[idx_t] A[idx_t]ᵀ.
//
// A small GEMM on the gathered rows, blocked like one. H is cut into kOuterBlock² tiles and only
// tiles on or above the diagonal are computed (the update is symmetric). For a tile and up to
// kOuterDepth indices at a time, the tile's column slices of the rows A[idx_t] are copied into
// two contiguous panels (one scaled by coef_t, both zero-padded to the tile edge); MR×NR register
// blocks multiply them into the tile's increment. The increment is then added to H once, and its
// transpose below the diagonal. So each entry of H is read and written once, and only a
// kOuterDepth × kOuterBlock slice of the gathered rows exists at any time (never A[idx]).
// ---------------------------------------------------------------------------------------------

// dst[s][n] = scale_s · A[idx[t0 + s], c0 + n] for n < nc, zero up to kOuterBlock.
template <typename T, bool Scaled>
TR_INLINE void pack_panel(const OuterArgs& p, int64_t c0, int64_t nc, int64_t t0, int64_t t1,
                          T* dst) {
  const T* A = static_cast<const T*>(p.A);
  const T* coef = static_cast<const T*>(p.coef);
  for (int64_t t = t0; t < t1; ++t, dst += kOuterBlock) {
    const T* row = A + p.idx[t] * p.lda + c0;
    const T cf = Scaled ? coef[t] : T(1);
    int64_t n = 0;
    for (; n < nc; ++n) dst[n] = Scaled ? cf * row[n] : row[n];
    for (; n < kOuterBlock; ++n) dst[n] = T(0);
  }
}

// inc[m][0:NR] (+)= Σ_s pi[s][m] · pj[s][0:NR] for m < MR; rows kOuterBlock apart.
template <typename T, int MR>
TR_INLINE void outer_micro(const T* pi, const T* pj, int64_t depth, T* inc, bool accumulate) {
  constexpr int V = 32 / sizeof(T);  // lanes of a 256-bit vector; NR = 2V
  using VT = Vec<T, V>;
  VT acc[MR][2] = {};
  for (int64_t s = 0; s < depth; ++s, pi += kOuterBlock, pj += kOuterBlock) {
    const VT x0 = load<T, V>(pj), x1 = load<T, V>(pj + V);
    TR_UNROLL for (int m = 0; m < MR; ++m) {
      const VT xi = splat<T, V>(pi[m]);
      acc[m][0] += xi * x0;
      acc[m][1] += xi * x1;
    }
  }
  TR_UNROLL for (int m = 0; m < MR; ++m) {
    T* row = inc + m * kOuterBlock;
    if (accumulate) {
      acc[m][0] += load<T, V>(row);
      acc[m][1] += load<T, V>(row + V);
    }
    store<T, V>(row, acc[m][0]);
    store<T, V>(row + V, acc[m][1]);
  }
}

// Processes the tiles (I, J) = (tiles[2q], tiles[2q+1]) for q in [first, last), I ≤ J; tiles
// of one row block in a row reuse its packed panel.
template <typename T>
void outer(const OuterArgs& p, const int64_t* tiles, int64_t first, int64_t last,
           void* workspace) {
  constexpr int MR = 6;               // 6×2 accumulators + 3 operands: the 16 AVX2 registers
  constexpr int NR = 64 / sizeof(T);  // two 256-bit vectors per row of the register block
  constexpr int64_t B = kOuterBlock;
  static_assert(B % MR == 0 && B % NR == 0, "register blocks must tile a tile");
  T* pi = static_cast<T*>(workspace);
  T* pj = pi + kOuterDepth * B;
  T* inc = pj + kOuterDepth * B;
  T* H = static_cast<T*>(p.H);
  const int64_t d = p.d;
  int64_t packed_i = -1;  // the row block in pi, kept across tiles when all indices fit one panel
  for (int64_t q = first; q < last; ++q) {
    const int64_t ib = tiles[2 * q] * B, ni = lesser(d, ib + B) - ib;
    const int64_t jb = tiles[2 * q + 1] * B, nj = lesser(d, jb + B) - jb;
    const bool diagonal = ib == jb;
    for (int64_t t0 = 0; t0 < p.t; t0 += kOuterDepth) {
      const int64_t t1 = lesser(p.t, t0 + kOuterDepth);
      if (ib != packed_i || p.t > kOuterDepth) pack_panel<T, false>(p, ib, ni, t0, t1, pi);
      packed_i = ib;
      pack_panel<T, true>(p, jb, nj, t0, t1, pj);
      for (int64_t i0 = 0; i0 < ni; i0 += MR) {
        for (int64_t j0 = 0; j0 < nj; j0 += NR) {
          if (diagonal && j0 + NR <= i0) continue;  // strictly below the diagonal
          outer_micro<T, MR>(pi + i0, pj + j0, t1 - t0, inc + i0 * B + j0, t0 > 0);
        }
      }
    }
    // Entries with j ≥ i go to H[i][j]; those with j > i also to H[j][i].
    for (int64_t m = 0; m < ni; ++m) {
      T* h = H + (ib + m) * d + jb;
      for (int64_t n = diagonal ? m : 0; n < nj; ++n) h[n] += inc[m * B + n];
    }
    for (int64_t n = 0; n < nj; ++n) {
      T* h = H + (jb + n) * d + ib;
      const int64_t m_end = diagonal ? n : ni;
      for (int64_t m = 0; m < m_end; ++m) h[m] += inc[m * B + n];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The table the dispatcher indexes: [dtype][k - 1](, in place).
// ---------------------------------------------------------------------------------------------

template <typename T, int K>
void fill(KernelTable& table) {
  constexpr int D = dtype_index<T>();
  table.pass1[D][K - 1] = &pass1<K, T>;
  table.pass2[D][K - 1][0] = &pass2<K, false, T>;
  table.pass2[D][K - 1][1] = &pass2<K, true, T>;
  if constexpr (K > 1) fill<T, K - 1>(table);
}

inline KernelTable make_table() {
  KernelTable table{};
  fill<float, kMaxRank>(table);
  fill<double, kMaxRank>(table);
  table.outer[dtype_index<float>()] = &outer<float>;
  table.outer[dtype_index<double>()] = &outer<double>;
  return table;
}

}  // namespace torch_rankone::cpu::TR_ISA_NS
