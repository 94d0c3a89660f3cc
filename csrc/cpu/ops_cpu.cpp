// CPU implementations of the torch_rankone ops: validation, at::parallel_for over chunks or
// tiles, and the k×k solve between the two passes. The loops themselves are in kernels.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <tuple>
#include <vector>

#include "../common.h"
#include "dispatch.h"

namespace torch_rankone::cpu {
namespace {

constexpr int64_t kChunk = 1 << 14;         // elements per chunk (and per partial sum)
constexpr int64_t kParallelBelow = 1 << 16;  // fewer elements (or multiply-adds): one thread

bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

const KernelTable* best_table() {
  return cpu_has_avx2() && avx2::kernel_table() ? avx2::kernel_table() : &baseline::kernel_table();
}

std::atomic<const KernelTable*> active{nullptr};

// Lowrank solve on a validated problem whose outputs are bound: pass 1 (partial sums per chunk,
// in parallel), their sum in chunk order, the k×k solve, pass 2 (in parallel). In place, pass 2
// is skipped when the solve failed (NaN coefficients) or lr/c is not finite; returns whether it ran.
bool run_lowrank(const LowrankProblem& prob, bool in_place, double* sums_out = nullptr) {
  const KernelTable& table = kernels();
  const int D = prob.dtype == at::kDouble ? 1 : 0;
  const int k = prob.k, S = num_sums(k);
  const auto nchunks = static_cast<int64_t>(prob.chunks.size());
  int64_t numel = 0;
  for (const TensorRec& r : prob.tensors) numel += r.numel;
  const int64_t grain = numel < kParallelBelow ? nchunks + 1 : 1;

  std::vector<double> partials(nchunks * S);
  at::parallel_for(0, nchunks, grain, [&](int64_t first, int64_t last) {
    table.pass1[D][k - 1](prob.tensors.data(), prob.chunks.data(), first, last, partials.data());
  });
  double sums[num_sums(kMaxRank)] = {};
  for (int64_t ci = 0; ci < nchunks; ++ci) {
    for (int s = 0; s < S; ++s) sums[s] += partials[ci * S + s];
  }
  if (sums_out != nullptr) std::memcpy(sums_out, sums, S * sizeof(double));
  double coefs[kMaxRank + 1];
  woodbury_coefficients(k, sums, prob.C, prob.c, coefs);
  coefs[k] = output_scale(in_place, prob.c, prob.lr);
  const bool solved = update_applies(k, coefs);  // all a_j NaN on failure
  if (in_place && !solved) return false;

  at::parallel_for(0, nchunks, grain, [&](int64_t first, int64_t last) {
    table.pass2[D][k - 1][in_place](prob.tensors.data(), prob.chunks.data(), first, last, coefs);
  });
  return solved;
}

std::vector<at::Tensor> lowrank_solve(at::TensorList g, at::TensorList U, const at::Tensor& C,
                                      const at::Tensor& c) {
  LowrankProblem prob = check_lowrank("torch_rankone.lowrank_solve", c10::kCPU, {}, g, U, C, c,
                                      at::Tensor(), kChunk);
  std::vector<at::Tensor> y = bind_outputs(prob, {}, g);
  run_lowrank(prob, /*in_place=*/false);
  return y;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> lowrank_solve_gram(at::TensorList g,
                                                                    at::TensorList U,
                                                                    const at::Tensor& C,
                                                                    const at::Tensor& c) {
  LowrankProblem prob = check_lowrank("torch_rankone.lowrank_solve_gram", c10::kCPU, {}, g, U, C,
                                      c, at::Tensor(), kChunk);
  std::vector<at::Tensor> y = bind_outputs(prob, {}, g);
  at::Tensor sums = at::empty({num_sums(prob.k)}, at::TensorOptions().dtype(at::kDouble));
  run_lowrank(prob, /*in_place=*/false, sums.data_ptr<double>());
  return {y, sums};
}

at::Tensor lowrank_solve_update(at::TensorList params, at::TensorList g, at::TensorList U,
                                const at::Tensor& C, const at::Tensor& c, const at::Tensor& lr) {
  LowrankProblem prob = check_lowrank("torch_rankone.lowrank_solve_update", c10::kCPU, params, g,
                                      U, C, c, lr, kChunk);
  const std::vector<at::Tensor> outs = bind_outputs(prob, params, g);
  const bool applied = run_lowrank(prob, /*in_place=*/true);
  finish_update(params, outs);
  return at::scalar_tensor(applied, at::TensorOptions().dtype(at::kBool));
}

void gathered_outer_accumulate(const at::Tensor& H, const at::Tensor& A, const at::Tensor& idx,
                               const at::Tensor& coef) {
  const OuterProblem prob =
      check_outer("torch_rankone.gathered_outer_accumulate", c10::kCPU, H, A, idx, coef);
  const OuterArgs& args = prob.args;
  H.unsafeGetTensorImpl()->bump_version();
  if (args.t == 0 || args.d == 0) return;
  // Tiles (I, J), I ≤ J, dealt to the threads by estimated cost, largest first to the least
  // loaded thread (a diagonal tile costs half its area): contiguous ranges would be unbalanced.
  const int64_t blocks = (args.d + kOuterBlock - 1) / kOuterBlock;
  const bool serial = args.d * args.d * args.t < 2 * kParallelBelow;
  const int64_t nbins = serial ? 1 : std::max<int64_t>(1, at::get_num_threads());
  struct Tile {
    int64_t I, J, cost;
  };
  std::vector<Tile> order;
  for (int64_t I = 0; I < blocks; ++I) {
    for (int64_t J = I; J < blocks; ++J) {
      const int64_t rows = std::min(kOuterBlock, args.d - I * kOuterBlock);
      const int64_t cols = std::min(kOuterBlock, args.d - J * kOuterBlock);
      order.push_back({I, J, I == J ? rows * cols / 2 : rows * cols});
    }
  }
  std::stable_sort(order.begin(), order.end(),
                   [](const Tile& a, const Tile& b) { return a.cost > b.cost; });
  std::vector<std::vector<int64_t>> bins(nbins);
  std::vector<int64_t> load(nbins, 0);
  for (const Tile& tile : order) {
    const auto b = std::min_element(load.begin(), load.end()) - load.begin();
    bins[b].insert(bins[b].end(), {tile.I, tile.J});
    load[b] += tile.cost;
  }
  const OuterFn outer = kernels().outer[H.scalar_type() == at::kDouble ? 1 : 0];
  at::parallel_for(0, nbins, 1, [&](int64_t first, int64_t last) {
    thread_local std::vector<double> workspace(kOuterWorkspace);  // panels + tile, per thread
    for (int64_t b = first; b < last; ++b) {
      outer(args, bins[b].data(), 0, static_cast<int64_t>(bins[b].size() / 2), workspace.data());
    }
  });
}

}  // namespace

const KernelTable& kernels() {
  const KernelTable* table = active.load(std::memory_order_relaxed);
  if (table == nullptr) {
    table = best_table();
    active.store(table, std::memory_order_relaxed);
  }
  return *table;
}

const char* isa() { return &kernels() == &baseline::kernel_table() ? "baseline" : "avx2"; }

bool set_isa(const char* name) {
  if (std::strcmp(name, "auto") == 0) {
    active.store(best_table());
  } else if (std::strcmp(name, "baseline") == 0) {
    active.store(&baseline::kernel_table());
  } else if (std::strcmp(name, "avx2") == 0 && cpu_has_avx2() && avx2::kernel_table()) {
    active.store(avx2::kernel_table());
  } else {
    return false;
  }
  return true;
}

}  // namespace torch_rankone::cpu

TORCH_LIBRARY_IMPL(torch_rankone, CPU, m) {
  m.impl("lowrank_solve", &torch_rankone::cpu::lowrank_solve);
  m.impl("lowrank_solve_gram", &torch_rankone::cpu::lowrank_solve_gram);
  m.impl("lowrank_solve_update", &torch_rankone::cpu::lowrank_solve_update);
  m.impl("gathered_outer_accumulate", &torch_rankone::cpu::gathered_outer_accumulate);
}
