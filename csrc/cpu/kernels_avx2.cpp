// The CPU loops compiled for AVX2 + FMA (x86-64 with GCC or Clang), used only when the CPU has
// both (checked at run time), so the wheel still runs on older x86-64 CPUs. The target switch
// comes after the standard headers, so only the functions defined in kernels.h are affected.
#define TORCH_RANKONE_KERNEL_ONLY
#include <cmath>
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TR_HAVE_AVX2_VARIANT 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define TR_ISA_NS avx2
#include "kernels.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else
#include "dispatch.h"
#endif

namespace torch_rankone::cpu::avx2 {

// Only called after the dispatcher has checked the CPU (make_table runs AVX2 code).
const KernelTable* kernel_table() {
#if defined(TR_HAVE_AVX2_VARIANT)
  static const KernelTable table = make_table();
  return &table;
#else
  return nullptr;
#endif
}

}  // namespace torch_rankone::cpu::avx2
