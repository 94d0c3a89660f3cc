// The CPU loops for the compiler's default target (SSE2 on x86-64, NEON on arm64).
#define TORCH_RANKONE_KERNEL_ONLY
#define TR_ISA_NS baseline
#include "kernels.h"

namespace torch_rankone::cpu::baseline {

const KernelTable& kernel_table() {
  static const KernelTable table = make_table();
  return table;
}

}  // namespace torch_rankone::cpu::baseline
