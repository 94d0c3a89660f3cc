// Input validation shared by the CPU and CUDA implementations: every message names the argument,
// the tensor (U[j][i] is column j's tensor for parameter i) and what was expected instead.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cstring>
#include <string>

#include "common.h"

namespace torch_rankone {
namespace {

std::string u_name(int64_t j, int64_t i) {
  return "U[" + std::to_string(j) + "][" + std::to_string(i) + "]";
}

std::string indexed(const char* name, int64_t i) {
  return std::string(name) + "[" + std::to_string(i) + "]";
}

// A 0-d floating tensor on the CPU (read on the host) or on `device` (read by the kernels).
void check_scalar(const char* op, const char* name, const at::Tensor& s, c10::Device device) {
  TORCH_CHECK(s.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(s.dim() == 0, op, ": ", name, " must be a 0-d tensor (a scalar), got shape ",
                    s.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(s.scalar_type()), op, ": ", name,
                   " must have a floating dtype, got ", s.scalar_type());
  TORCH_CHECK(s.device().is_cpu() || s.device() == device, op, ": ", name, " is on ", s.device(),
              "; it must be on the CPU or on ", device, " like the tensors");
}

// The ops are not differentiable: refuse inputs that autograd would track instead of silently
// returning results without gradients (torch_rankone._ext sends such calls to the references).
void check_no_grad(const char* op, const std::string& name, const at::Tensor& t) {
  TORCH_CHECK(!(t.requires_grad() && c10::GradMode::is_enabled()), op, ": ", name,
              " requires grad and grad mode is on, but this op is not differentiable; call it "
              "under torch.no_grad()");
}

}  // namespace

LowrankProblem check_lowrank(const char* op, c10::DeviceType expected, at::TensorList params,
                             at::TensorList g, at::TensorList U, const at::Tensor& C,
                             const at::Tensor& c, const at::Tensor& lr, int64_t chunk_elems) {
  const bool in_place = lr.defined();
  const auto n = static_cast<int64_t>(g.size());
  TORCH_CHECK(C.defined(), op, ": C is undefined");
  TORCH_CHECK_VALUE(C.dim() == 2 && C.size(0) == C.size(1), op,
                    ": C must be a square k×k matrix, got shape ", C.sizes());
  const int64_t k = C.size(0);
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxRank, op, ": the rank k = C.size(0) must be in [1, ",
                    kMaxRank, "], got ", k, " (use the reference implementation for larger k)");
  TORCH_CHECK_TYPE(at::isFloatingType(C.scalar_type()), op, ": C must have a floating dtype, got ",
                   C.scalar_type());
  TORCH_CHECK_VALUE(static_cast<int64_t>(U.size()) == k * n, op, ": U has ", U.size(),
                    " tensors, expected k·n = ", k, "·", n,
                    " (k = C.size(0) columns of one tensor per entry of g, column j at U[j·n + i])");
  TORCH_CHECK_VALUE(!in_place || static_cast<int64_t>(params.size()) == n, op, ": params has ",
                    params.size(), " tensors but g has ", n);

  LowrankProblem prob;
  prob.k = static_cast<int>(k);
  if (n > 0) {
    prob.dtype = g[0].scalar_type();
    prob.device = g[0].device();
  } else {
    prob.device = C.device();
  }
  TORCH_CHECK(prob.device.type() == expected, op, ": the tensors are on ", prob.device,
              " but this is the ", c10::DeviceTypeName(expected), " implementation");
  TORCH_CHECK_TYPE(n == 0 || prob.dtype == at::kFloat || prob.dtype == at::kDouble, op,
                   ": g[0] has dtype ", prob.dtype, "; supported are float32 and float64");
  TORCH_CHECK(C.device().is_cpu() || C.device() == prob.device, op, ": C is on ", C.device(),
              "; it must be on the CPU or on ", prob.device, " like the tensors");
  check_scalar(op, "c", c, prob.device);
  if (in_place) check_scalar(op, "lr", lr, prob.device);

  auto check_like = [&](const at::Tensor& t, const std::string& name, int64_t i) {
    TORCH_CHECK(t.defined(), op, ": ", name, " is undefined (None)");
    TORCH_CHECK_TYPE(t.scalar_type() == prob.dtype, op, ": ", name, " has dtype ",
                     t.scalar_type(), " but g[0] has ", prob.dtype,
                     "; params, g and U must share one dtype");
    TORCH_CHECK(t.device() == prob.device, op, ": ", name, " is on ", t.device(),
                " but g[0] is on ", prob.device, "; params, g and U must be on one device");
    TORCH_CHECK_VALUE(t.sizes() == g[i].sizes(), op, ": ", name, " has shape ", t.sizes(),
                      " but g[", i, "] has shape ", g[i].sizes());
    check_no_grad(op, name, t);
  };
  // Read-only inputs may be non-contiguous: they are read through a contiguous copy.
  auto contiguous = [&](const at::Tensor& t) -> const void* {
    if (t.is_contiguous()) return t.const_data_ptr();
    prob.keep_alive.push_back(t.contiguous());
    return prob.keep_alive.back().const_data_ptr();
  };

  prob.tensors.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    check_like(g[i], indexed("g", i), i);
    if (in_place) check_like(params[i], indexed("params", i), i);
    TensorRec& rec = prob.tensors[i];
    rec.g = contiguous(g[i]);
    for (int64_t j = 0; j < k; ++j) {
      check_like(U[j * n + i], u_name(j, i), i);
      rec.u[j] = contiguous(U[j * n + i]);
    }
    rec.numel = g[i].numel();
    for (int64_t b = 0; b < rec.numel; b += chunk_elems) {
      prob.chunks.push_back({i, b, std::min(rec.numel, b + chunk_elems)});
    }
  }

  // The k×k data: on the host as doubles, or float64 copies on the device (no synchronisation).
  if (C.device().is_cpu()) {
    const at::Tensor C64 = C.to(at::kDouble).contiguous();
    std::memcpy(prob.C, C64.const_data_ptr<double>(), sizeof(double) * k * k);
  } else {
    prob.C_dev = C.to(at::kDouble).contiguous();
  }
  auto read = [&](const at::Tensor& s, double& host, at::Tensor& dev) {
    if (s.device().is_cpu()) {
      host = s.item<double>();
    } else {
      dev = s.to(at::kDouble);
    }
  };
  read(c, prob.c, prob.c_dev);
  if (in_place) read(lr, prob.lr, prob.lr_dev);
  return prob;
}

std::vector<at::Tensor> bind_outputs(LowrankProblem& prob, at::TensorList params,
                                     at::TensorList g) {
  std::vector<at::Tensor> outs;
  outs.reserve(g.size());
  for (size_t i = 0; i < g.size(); ++i) {
    if (params.empty()) {
      outs.push_back(at::empty(g[i].sizes(), g[i].options()));
    } else {
      outs.push_back(params[i].is_contiguous() ? params[i] : params[i].contiguous());
    }
    prob.tensors[i].out = outs.back().data_ptr();
  }
  return outs;
}

void finish_update(at::TensorList params, const std::vector<at::Tensor>& outs) {
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].is_contiguous()) params[i].copy_(outs[i]);
    // Like any in-place op: autograd must see that the tensor changed.
    params[i].unsafeGetTensorImpl()->bump_version();
  }
}

OuterProblem check_outer(const char* op, c10::DeviceType expected, const at::Tensor& H,
                         const at::Tensor& A, const at::Tensor& idx, const at::Tensor& coef) {
  TORCH_CHECK(H.defined() && A.defined() && idx.defined() && coef.defined(), op,
              ": H, A, idx and coef must all be tensors");
  TORCH_CHECK(H.device().type() == expected, op, ": H is on ", H.device(), " but this is the ",
              c10::DeviceTypeName(expected), " implementation");
  TORCH_CHECK_TYPE(H.scalar_type() == at::kFloat || H.scalar_type() == at::kDouble, op,
                   ": H has dtype ", H.scalar_type(), "; supported are float32 and float64");
  TORCH_CHECK_VALUE(H.dim() == 2 && H.size(0) == H.size(1), op,
                    ": H must be a square d×d matrix, got shape ", H.sizes());
  TORCH_CHECK_VALUE(H.is_contiguous(), op,
                    ": H must be contiguous (it is updated in place), got strides ", H.strides());
  TORCH_CHECK_VALUE(A.dim() == 2 && A.size(1) == H.size(0), op,
                    ": A must be an n×d matrix with d = ", H.size(0), " (H's size), got shape ",
                    A.sizes());
  TORCH_CHECK_VALUE(idx.dim() == 1, op, ": idx must be 1-D, got shape ", idx.sizes());
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, op, ": idx must have dtype int64, got ",
                   idx.scalar_type());
  TORCH_CHECK_VALUE(coef.dim() == 1 && coef.size(0) == idx.size(0), op,
                    ": coef must be 1-D with one entry per index (", idx.size(0), "), got shape ",
                    coef.sizes());
  for (const auto& [name, t] : {std::pair{"A", &A}, {"idx", &idx}, {"coef", &coef}}) {
    TORCH_CHECK(t->device() == H.device(), op, ": ", name, " is on ", t->device(),
                " but H is on ", H.device());
  }
  for (const auto& [name, t] : {std::pair{"A", &A}, {"coef", &coef}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == H.scalar_type(), op, ": ", name, " has dtype ",
                     t->scalar_type(), " but H has ", H.scalar_type());
  }
  for (const auto& [name, t] : {std::pair{"H", &H}, {"A", &A}, {"coef", &coef}}) {
    check_no_grad(op, name, *t);
  }
  OuterProblem prob;
  // Rows of A are read in place; only a matrix without unit column stride is copied (once).
  prob.A = A.stride(1) == 1 ? A : A.contiguous();
  prob.idx = idx.contiguous();
  prob.coef = coef.contiguous();
  if (expected == c10::kCPU && idx.numel() > 0) {
    const auto [lo, hi] = at::aminmax(prob.idx);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK_INDEX(lo_v >= 0 && hi_v < A.size(0), op, ": idx must lie in [0, ", A.size(0),
                      ") (the rows of A), got values in [", lo_v, ", ", hi_v, "]");
  }
  prob.args = OuterArgs{H.data_ptr(),
                        prob.A.const_data_ptr(),
                        prob.idx.const_data_ptr<int64_t>(),
                        prob.coef.const_data_ptr(),
                        H.size(0),
                        prob.A.stride(0),
                        idx.size(0)};
  return prob;
}

}  // namespace torch_rankone
