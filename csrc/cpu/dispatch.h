// Run-time choice of the CPU loops: each instruction-set variant of cpu/kernels.h exposes one
// table of function pointers, and the ops call through the table of the active variant.
#pragma once

#include "../common.h"

namespace torch_rankone::cpu {

// gathered_outer_accumulate: H tile edge, and indices packed per panel (the two panels and a
// tile's increment, 270 KB in float64, stay in a core's L2 cache).
constexpr int64_t kOuterBlock = 96;
constexpr int64_t kOuterDepth = 128;
constexpr int64_t kOuterWorkspace = 2 * kOuterDepth * kOuterBlock + kOuterBlock * kOuterBlock;

template <typename T>
constexpr int dtype_index() {
  return sizeof(T) == sizeof(double) ? 1 : 0;
}

using Pass1Fn = void (*)(const TensorRec*, const Chunk*, int64_t first, int64_t last,
                         double* partials);
using Pass2Fn = void (*)(const TensorRec*, const Chunk*, int64_t first, int64_t last,
                         const double* coefs);
using OuterFn = void (*)(const OuterArgs&, const int64_t* tiles, int64_t first, int64_t last,
                         void* workspace);

struct KernelTable {
  Pass1Fn pass1[2][kMaxRank];     // [dtype_index][k - 1]
  Pass2Fn pass2[2][kMaxRank][2];  // [dtype_index][k - 1][in_place]
  OuterFn outer[2];               // [dtype_index]; workspace: kOuterWorkspace elements
};

namespace baseline {
const KernelTable& kernel_table();
}
namespace avx2 {
// nullptr unless this build has the variant (GCC or Clang on x86-64).
const KernelTable* kernel_table();
}

// The table in use: AVX2+FMA when the CPU has it, else the baseline (SSE2 on x86-64).
const KernelTable& kernels();

// Name of the variant in use ("avx2" or "baseline"), and a switch for tests and benchmarks:
// "baseline", "avx2" or "auto". Returns false (and changes nothing) if the CPU or the build
// cannot run the requested variant.
const char* isa();
bool set_isa(const char* name);

}  // namespace torch_rankone::cpu
